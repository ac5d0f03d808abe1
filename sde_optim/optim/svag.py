"""SVAG: stochastic variance-amplified gradient (Li, Malladi, Arora 2021; THEORY §2)."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from .._validation import check_float
from ._base import _SGDFamily

__all__ = ["SVAG", "svag_weights"]


def svag_weights(l: float) -> tuple[float, float]:
    """``((1 + sqrt(2l - 1)) / 2, (1 - sqrt(2l - 1)) / 2)``: sum 1 (mean kept), squares sum ``l``
    (noise covariance times ``l``) for two independent minibatch gradients (THEORY §2)."""
    l = check_float("l", l, minimum=1.0)
    s = math.sqrt(2.0 * l - 1.0)
    return (1.0 + s) / 2.0, (1.0 - s) / 2.0


class SVAG(_SGDFamily):
    r"""SVAG: SGD on ``w1 * g1 + w2 * g2`` (two independent minibatches) with step ``lr / l``.

    The combined gradient has SGD's mean and ``l`` times its noise covariance; ``l`` SVAG
    steps cover the time of one SGD step, and as ``l`` grows at fixed ``lr`` the iterates
    converge weakly to the SGD SDE (THEORY §2). ``l = 1`` is plain SGD.

    The two-batch protocol: since the weights are linear, ``w1 g1 + w2 g2`` is the gradient
    of ``w1 L1 + w2 L2``, which :meth:`combine_losses` forms. So one backward per step,
    in a plain loop::

        opt = SVAG(model.parameters(), lr=0.5, l=4)
        for _ in range(4 * sgd_steps):             # l steps per SGD step
            (x1, y1), (x2, y2) = sample(B), sample(B)   # independent minibatches
            loss = opt.combine_losses(loss_fn(model(x1), y1), loss_fn(model(x2), y2))
            opt.zero_grad(); loss.backward(); opt.step()

    and in a ``LightningModule``: draw a batch of ``2B`` samples (e.g. a data module with
    twice the batch size), split it in halves in ``training_step`` and return
    ``self.optimizers().optimizer.combine_losses(loss(first), loss(second))`` — or compute
    the weights once with :func:`svag_weights`. Lightning's automatic optimization then
    calls :meth:`step` as for any optimizer.

    Distributed data parallel (DDP): SVAG draws no random numbers, so replicas stay identical
    because DDP all-reduces the gradient of the combined loss. Each rank combines its own two
    halves; the all-reduced gradient is ``w1 mean_r(g1_r) + w2 mean_r(g2_r)``, SVAG with the
    global batch (per-rank batch times world size).

    Args:
        params: parameters or param-group dicts.
        lr: the SGD step size (>= 0) being approximated; the actual step is ``lr / l``.
        l: amplification (>= 1).
        momentum, dampening, nesterov, weight_decay, maximize, foreach, nonfinite: as
            :class:`~sde_optim.HomogenizedSGD` (``torch.optim.SGD``'s, on the combined gradient).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor,
        *,
        l: float = 1,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        maximize: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "skip",
    ) -> None:
        self.weights = svag_weights(l)
        self.l = float(l)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
                        maximize=maximize, foreach=foreach)
        super().__init__(params, defaults, nonfinite=nonfinite)

    _pickled = _SGDFamily._pickled + ("weights", "l")

    def combine_losses(self, loss1: Tensor, loss2: Tensor) -> Tensor:
        """``w1 * loss1 + w2 * loss2`` for losses of two independent minibatches.

        At ``l = 1`` it returns ``loss1`` itself (``w2 = 0``), so SVAG(l=1) is bitwise SGD.
        """
        if self.l == 1.0:
            return loss1
        w1, w2 = self.weights
        return w1 * loss1 + w2 * loss2

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """``p <- p - (lr / l) u``, ``u`` torch.optim.SGD's update from the combined gradient."""
        loss = self._evaluate(closure)
        self._update(self._batches(), {}, lr_factor=1.0 / self.l)
        return loss
