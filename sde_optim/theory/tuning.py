"""The best learning rate before training: the ``lr`` that minimizes the predicted risk at a step budget.

:func:`best_lr` searches the PDE prediction (THEORY E6-E7 with E10-E12) over learning rates below the
predicted critical one (:func:`~sde_optim.theory.critical_lr`, THEORY §5) with two batched sweeps
(:func:`~sde_optim.theory.predict_sweep`): a coarse geometric sweep over ``[lower, upper] x critical``,
then a finer one between the neighbours of the coarse minimum.  The SGD's batch size, momentum, weight decay
and schedule shape are kept; the learning rate (the peak of a schedule) is what is searched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._validation import check_float, check_int
from ..models import DiagonalLinearNetwork
from ..teacher import TeacherProblem
from .dynamics import SGDConfig
from .predict import Prediction, predict_sweep
from .stability import critical_lr

__all__ = ["BestLR", "best_lr"]


@dataclass
class BestLR:
    """The learning rate with the least predicted risk at the budget, with what it was chosen from.

    Attributes:
        lr: the best learning rate found (the peak of the schedule), one of ``candidates``.
        risk: its predicted risk ``R`` at the budget (E7).
        critical: the predicted critical learning rate (``critical_lr(...).bounded``), for context.
        steps: the budget (SGD steps).
        candidates: the learning rates of the final sweep (the bracket of the minimum), increasing, ``(K,)``.
        final_risk: the predicted risk at the budget of each candidate, ``(K,)`` (``inf`` where it diverges).
        predictions: the predictions of the best learning rate and of its two neighbours among the candidates
            (``lr -> Prediction``), to draw next to each other.
        tolerance: relative spacing of the final sweep around ``lr`` (how finely it was located).
        coarse_lr, coarse_risk: the first sweep over ``[lower, upper] x critical`` (at ``coarse_tol``).
    """

    lr: float
    risk: float
    critical: float
    steps: int
    candidates: Tensor
    final_risk: Tensor
    predictions: dict[float, Prediction] = field(default_factory=dict)
    tolerance: float = 0.0
    coarse_lr: Tensor | None = None
    coarse_risk: Tensor | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "risk": self.risk, "critical": self.critical, "steps": self.steps,
                "candidates": self.candidates.tolist(), "final_risk": self.final_risk.tolist(), "tolerance": self.tolerance,
                "coarse_lr": None if self.coarse_lr is None else self.coarse_lr.tolist(),
                "coarse_risk": None if self.coarse_risk is None else self.coarse_risk.tolist()}


def best_lr(
    problem: TeacherProblem,
    model: DiagonalLinearNetwork,
    *,
    steps: int,
    batch_size: int = 1,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    sgd: SGDConfig | None = None,
    critical: float | None = None,
    lower: float = 0.01,
    upper: float = 0.8,
    sweep_size: int = 12,
    tol: float = 1e-3,
    coarse_tol: float = 1e-2,
    num_points: int = 101,
    **predict_kwargs: Any,
) -> BestLR:
    """The learning rate that minimizes the predicted risk after ``steps`` SGD steps (issue 12).

    The SGD is given by the keywords (as :func:`~sde_optim.theory.predict`) or by ``sgd``, whose learning-rate
    schedule sets the shape that is scaled (the result is its peak).  ``critical`` (default: computed by
    :func:`~sde_optim.theory.critical_lr` over the same budget, grid-checked: often the larger part of the cost;
    pass it when known) bounds the search: a first sweep of
    ``sweep_size`` learning rates geometric in ``[lower critical, upper critical]`` at ``max(tol, coarse_tol)``
    (it only has to bracket the minimum), then ``sweep_size`` from one neighbour of its minimum to the other at
    ``tol``; the best of those is returned.  A minimum at the top of the range means the budget rewards the
    largest stable step (noiseless problems): raise ``upper`` (at most 1) to look closer to the critical lr,
    where predictions cost more.  Other keywords go to every prediction (:func:`~sde_optim.theory.predict_sweep`).
    """
    steps = check_int("steps", steps, minimum=1)
    lower = check_float("lower", lower, minimum=0.0, strict=True)
    upper = check_float("upper", upper, minimum=lower, maximum=1.0, strict=True)
    sweep_size = check_int("sweep_size", sweep_size, minimum=3)
    coarse_tol = check_float("coarse_tol", coarse_tol, minimum=0.0, maximum=0.5, strict=True)
    if sgd is None:
        sgd = SGDConfig(lr=1.0, batch_size=batch_size, momentum=momentum, dampening=dampening, nesterov=nesterov,
                        weight_decay=weight_decay)
    if critical is None:
        critical = critical_lr(problem, model, sgd=sgd, steps=steps, decay=False,
                               **{k: v for k, v in predict_kwargs.items() if k in ("dtype", "max_types")}).bounded
    critical = check_float("critical", critical, minimum=0.0, strict=True)

    def sweep(lrs: list[float], accuracy: float) -> dict[float, Prediction]:
        return dict(zip(lrs, predict_sweep(problem, model, sgd=sgd, lr=lrs, steps=steps, tol=accuracy,
                                           num_points=num_points, **predict_kwargs)))

    def final(p: Prediction) -> float:
        r = float(p.curves["risk"][-1])
        return r if p.divergence_step is None and math.isfinite(r) else math.inf

    lo, hi = lower * critical, upper * critical
    # The coarse sweep only brackets the minimum: at a looser tol (met, so the bracket is right unless two of its
    # risks differ by less than it), which is much cheaper near the critical lr.
    coarse = sweep([lo * (hi / lo) ** (i / (sweep_size - 1)) for i in range(sweep_size)], max(tol, coarse_tol))
    xs = list(coarse)
    k = min(range(sweep_size), key=lambda i: final(coarse[xs[i]]))
    if not math.isfinite(final(coarse[xs[k]])):
        raise RuntimeError(f"every learning rate in [{lo:.3g}, {hi:.3g}] is predicted to diverge within {steps} steps")
    a, b = xs[max(k - 1, 0)], xs[min(k + 1, sweep_size - 1)]
    found = sweep([a * (b / a) ** (i / (sweep_size - 1)) for i in range(sweep_size)], tol)  # the bracket, at tol
    lrs = sorted(found)
    risks = [final(found[x]) for x in lrs]
    j = min(range(len(lrs)), key=risks.__getitem__)
    near = {lrs[i]: found[lrs[i]] for i in (j - 1, j, j + 1) if 0 <= i < len(lrs)}
    spacing = (b / a) ** (1.0 / (sweep_size - 1)) - 1.0
    return BestLR(lrs[j], risks[j], critical, steps, torch.tensor(lrs, dtype=torch.float64),
                  torch.tensor(risks, dtype=torch.float64), near, spacing, torch.tensor(xs, dtype=torch.float64),
                  torch.tensor([final(coarse[x]) for x in xs], dtype=torch.float64))
