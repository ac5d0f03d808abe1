"""Gradient-noise models for :class:`~sde_optim.HomogenizedSGD` (THEORY §2).

A noise model draws ``xi`` with the covariance that the minibatch gradient of SGD with
batch size ``B`` has around its mean, *minus* what the drift already carries: when the
drift is the gradient of a minibatch of ``M`` samples, only ``Sigma (1/B - 1/M)`` is added,
so that drift plus noise has SGD's covariance ``Sigma / B`` (THEORY §2, ``c^2 = 1/B - 1/M``).

* :class:`StructuredNoise`: the exact homogenized noise of a
  :class:`~sde_optim.DiagonalLinearNetwork` on a :class:`~sde_optim.TeacherProblem` (E3):
  the beta-gradient noise is ``N(0, 2 R diag(h) / B)`` (``h`` the feature variances, the
  rank-one part dropped), shared by both parameters of a coordinate through the chain rule.
* :class:`EmpiricalNoise`: any model; the per-sample gradient covariance of a batch of
  ``M`` samples, drawn without ever forming per-sample gradients or a covariance matrix.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .._validation import check_choice, check_int
from ._dist import all_reduce_mean_, world_size
from ..models import DiagonalLinearNetwork
from ..teacher import TeacherProblem

__all__ = ["GradientNoise", "StructuredNoise", "EmpiricalNoise", "missing_variance"]


def missing_variance(batch_size: int, drift_batch_size: int | None) -> float:
    """``c^2 = 1/B - 1/M`` (THEORY §2); ``M = None`` means an exact (population) drift, ``c^2 = 1/B``."""
    if drift_batch_size is None:
        return 1.0 / batch_size
    if drift_batch_size < batch_size:
        raise ValueError(
            f"the drift's batch size M must be >= batch_size B (M >= {batch_size}); got M={drift_batch_size}: "
            "a smaller drift batch already has more noise than SGD with batch B"
        )
    return 1.0 / batch_size - 1.0 / drift_batch_size


class GradientNoise:
    """Base class: ``sample`` returns one noise tensor (or ``None``: no noise) per parameter it covers.

    Subclasses implement :meth:`sample` and list the parameters they cover in ``params``.
    """

    params: Sequence[Tensor]

    def sample(self, batch_size: int, generator: torch.Generator, loss: Tensor | None) -> list[Tensor | None]:
        """Noise for each of ``self.params`` with covariance ``c^2 Sigma`` (``c^2`` as above);
        ``None`` where it is exactly zero (nothing to add, nothing allocated)."""
        raise NotImplementedError

    def check_params(self, optimizer_params: Sequence[Tensor]) -> None:
        """Every covered parameter must be optimized (or the noise would go nowhere)."""
        ids = {id(p) for p in optimizer_params}
        if not all(id(p) in ids for p in self.params):
            raise ValueError(f"{type(self).__name__}: all of the model's parameters must be in the optimizer's params")


class StructuredNoise(GradientNoise):
    """Homogenized SGD noise of a diagonal linear network on a Gaussian teacher (THEORY E3).

    For SGD with batch ``B`` the minibatch gradient with respect to ``beta`` has covariance
    ``2 R diag(h) / B`` (``h = lambda / d`` the feature variances; the rank-one part
    ``2 K r r^T K / d^2`` is O(1/d) per coordinate and dropped, THEORY §2). The noise on each
    parameter is that beta-noise times ``d beta_i / d theta_i``, with one standard normal
    ``z_i`` per coordinate shared by its two parameters::

        u: v_i sqrt(c^2 2 R h_i) z_i     v: u_i sqrt(c^2 2 R h_i) z_i        ("uv")
        w+-: +-depth w+-^(depth-1) sqrt(c^2 2 R h_i) z_i                      ("pm")

    With an exact population-gradient drift (``problem.population_risk(model.beta).backward()``)
    one optimizer step is one Euler-Maruyama step of E3 with ``dt = 1/d``: one SGD step.

    Args:
        problem: the teacher; only ``feature_variance`` and ``noise_std`` are used.
        model: the :class:`~sde_optim.DiagonalLinearNetwork` being trained.
        drift_batch_size: ``M``, the number of samples behind the drift gradient, or ``None``
            for the exact population gradient (default).
        risk: where the current risk ``R`` comes from: ``"exact"`` (E1 from the model's beta,
            default) or ``"loss"`` (the loss returned by the optimizer's closure, an unbiased
            minibatch estimate of R; under DDP averaged over ranks, one all-reduce per step, so
            that every replica draws the same noise from the global-batch estimate).
    """

    def __init__(
        self,
        problem: TeacherProblem,
        model: DiagonalLinearNetwork,
        *,
        drift_batch_size: int | None = None,
        risk: str = "exact",
    ) -> None:
        if not isinstance(problem, TeacherProblem):
            raise TypeError(f"problem must be a TeacherProblem, got {type(problem).__name__}")
        if not isinstance(model, DiagonalLinearNetwork):
            raise TypeError(
                f"StructuredNoise needs a DiagonalLinearNetwork model, got {type(model).__name__}; "
                "use EmpiricalNoise for other models"
            )
        if model.dim != problem.dim:
            raise ValueError(f"model.dim ({model.dim}) must equal problem.dim ({problem.dim})")
        self.problem = problem
        self.model = model
        self.drift_batch_size = None if drift_batch_size is None else check_int("drift_batch_size", drift_batch_size, minimum=1)
        self.risk = check_choice("risk", risk, ("exact", "loss"))
        self.params = list(model._pair())
        self._local: TeacherProblem | None = None

    def _problem_like(self, like: Tensor) -> TeacherProblem:
        """The problem on the parameters' device and dtype (cached; moved once, not per step)."""
        p = self._local
        if p is None or p.device != like.device or p.dtype != like.dtype:
            self._local = p = self.problem.to(like.device, like.dtype)
        return p

    @torch.no_grad()
    def sample(self, batch_size: int, generator: torch.Generator, loss: Tensor | None) -> list[Tensor]:
        c2 = missing_variance(batch_size, self.drift_batch_size)
        a, b = self.params
        problem = self._problem_like(a)
        if self.risk == "exact":
            risk = problem.population_risk(self.model.beta.detach())
        elif loss is None:
            raise ValueError("StructuredNoise(risk='loss') needs the loss: pass a closure to step() that returns it")
        else:
            risk = loss.detach().clone()
            all_reduce_mean_([risk])
        z = torch.randn(a.shape, generator=generator, dtype=a.dtype, device=a.device)
        beta_noise = (2.0 * c2 * risk.to(a.dtype)).sqrt() * problem.feature_variance.sqrt() * z
        if self.model.parametrization == "uv":
            return [b * beta_noise, a * beta_noise]
        k = self.model.depth
        return [k * a.pow(k - 1) * beta_noise, -k * b.pow(k - 1) * beta_noise]


def _half_squared_error(output: Tensor, target: Tensor) -> Tensor:
    return 0.5 * (output - target).pow(2).reshape(output.shape[0], -1).sum(1)


class EmpiricalNoise(GradientNoise):
    """Noise with the empirical per-sample gradient covariance of any model (THEORY §2).

    With per-sample losses ``l_1..l_M`` on the batch given to :meth:`set_batch`, per-sample
    gradients ``g_m`` and mean ``g_bar``, the noise is ``c / sqrt(M - 1) sum_m z_m (g_m - g_bar)``,
    ``z_m ~ N(0, 1)``, whose covariance is ``c^2`` times the sample covariance of the ``g_m``.
    Because ``sum_m z_m (g_m - g_bar) = grad sum_m (z_m - z_bar) l_m``, it is computed with
    **one** extra backward pass of a reweighted loss: no per-sample gradient, no covariance
    matrix, memory as for an ordinary backward.

    Args:
        model: any ``nn.Module``; BatchNorm layers in training mode couple the samples of a
            batch, so the per-sample losses are not those of single samples: refused with a
            ``ValueError`` (put them in eval mode or use another normalization). Dropout is
            allowed: the noise pass draws its own masks, so dropout's randomness is part of
            the per-sample covariance it sees.
        per_sample_loss: ``(output, target) -> (M,)`` per-sample losses; default
            ``0.5 * ||output - target||^2`` per sample.

    Before each optimizer step call ``set_batch(inputs, targets)`` with the ``M >= B``
    samples whose mean gradient is the drift (usually the training batch).

    Under DDP with ``W`` ranks each rank holds ``M`` different samples and the drift is the
    mean over ``W M`` of them (DDP's all-reduce). Every rank draws its noise from its own
    samples with ``c^2 = W (1/B - 1/(W M))`` (``B`` the global batch) and the noises are
    averaged over ranks (one all-reduce per parameter): the ranks' samples are independent,
    so the average has covariance ``(1/B - 1/(W M)) Sigma``, and it is the same on every rank.
    """

    def __init__(self, model: nn.Module, per_sample_loss: Callable[[Tensor, Tensor], Tensor] | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.per_sample_loss = per_sample_loss or _half_squared_error
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._batch: tuple[Tensor, Tensor] | None = None

    def set_batch(self, inputs: Tensor, targets: Tensor) -> None:
        """The ``M`` samples behind the next step's drift (leading dimension ``M >= 2``)."""
        if inputs.shape[0] != targets.shape[0]:
            raise ValueError(f"inputs and targets must have the same number of samples; got {inputs.shape[0]} and {targets.shape[0]}")
        if inputs.shape[0] < 2:
            raise ValueError(f"EmpiricalNoise needs M >= 2 samples to estimate a covariance; got M={inputs.shape[0]}")
        self._batch = (inputs, targets)

    def _check_model(self) -> None:
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                raise ValueError(
                    "EmpiricalNoise: BatchNorm in training mode couples the samples of a batch, so per-sample "
                    "gradients are undefined; put BatchNorm layers in eval mode or use LayerNorm/GroupNorm"
                )

    def sample(self, batch_size: int, generator: torch.Generator, loss: Tensor | None) -> list[Tensor]:
        if self._batch is None:
            raise ValueError("EmpiricalNoise: call optimizer.set_batch(inputs, targets) before each step")
        self._check_model()
        inputs, targets = self._batch
        self._batch = None
        m = inputs.shape[0]
        ranks = world_size()
        c2 = ranks * missing_variance(batch_size, ranks * m)
        if c2 == 0.0:  # M = B: the drift already has SGD's noise
            return [None] * len(self.params)
        ref = self.params[0]
        z = torch.randn(m, generator=generator, dtype=ref.dtype, device=ref.device)
        weights = (z - z.mean()) * math.sqrt(c2 / (m - 1))
        with torch.enable_grad():
            losses = self.per_sample_loss(self.model(inputs), targets)
            if losses.shape != (m,):
                raise ValueError(f"per_sample_loss must return shape ({m},), got {tuple(losses.shape)}")
            grads = torch.autograd.grad((weights.to(losses.dtype) * losses).sum(), self.params, allow_unused=True)
        noise = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]
        all_reduce_mean_(noise)
        return noise
