"""Where SGD stops being stable: the predicted critical learning rate (THEORY §5, with E10-E12).

:func:`critical_lr` bisects the PDE prediction (:func:`~sde_optim.theory.predict`) in the learning rate,
starting from the cheap E8 estimate :func:`e8_estimate`.  The SGD may carry momentum, weight decay
and schedules (:class:`~sde_optim.theory.dynamics.SGDConfig`): the search scales the whole
learning-rate schedule and reports its peak, and momentum enters through the effective step (E11).
The coordinate types are built once (with the type check of :mod:`.quadrature`, at the E8
estimate) and reused by every solve of the search.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .._validation import check_float, check_int
from ..divergence import check_blowup_factor
from ..models import DiagonalLinearNetwork
from ..teacher import TeacherProblem
from .dynamics import SGDConfig
from .predict import (FiniteDimensionWarning, Prediction, _at_global_minimum, _check_model, _finish, _prepare,
                      _warn_finite_d, predict)
from .quadrature import coordinate_columns, coordinate_types
from .solvers import PDESolver

__all__ = ["CriticalLR", "critical_lr", "e8_estimate"]


@dataclass
class CriticalLR:
    """Predicted critical learning rates (in the network's own ``lr`` units; the peak of a schedule).

    Attributes:
        bounded: largest ``lr`` whose predicted risk stays below ``blowup_factor R(0)`` up to ``steps``.
        decay: (``noise_std = 0`` only) largest ``lr`` for which the predicted risk decays:
            ``R(T) <= decay_fraction R(0)`` and still decreasing at the horizon; else ``None``.
        e8_estimate: the cheap E8 bracket centre (see :func:`critical_lr`).
        rel_tol: relative width of the final bisection brackets.
        evaluations: number of PDE solves.
        finite_d: the finite-``d`` indicators of the solve at ``bounded`` (:func:`~.statistics.finite_d_indicators`,
            largest over its descent window, as a prediction's ``info["finite_d"]``): how far SGD at this ``d`` and
            at the answer is from the limit the answer is computed in (``{}`` when the solve reports none).
    """

    bounded: float
    decay: float | None
    e8_estimate: float
    rel_tol: float
    evaluations: int
    finite_d: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def e8_estimate(problem: TeacherProblem, model: DiagonalLinearNetwork, batch_size: float) -> float:
    """Cheap E8 estimate of the critical ``gamma`` (in ``(u, v)`` units, the momentum-effective step of E11).

    Near the teacher each coordinate is a linear regression with feature scale
    ``lam * rho*`` (``rho* = 2|beta*|`` once ``q`` is small), whose critical step is
    ``2B / mean(lam rho*)`` (E9 with the curvature in place of ``mean(lam)``); at the start E8's
    bracket ``-gamma S1 + gamma^2 R/B (S2 + 2 S3)`` changes sign at ``B S1 / (R (S2 + 2 S3))``.
    The smaller of the two (when defined) is the estimate.
    """
    types = coordinate_types(problem.to(dtype=torch.float64), model)
    c_star = float((types.weight * types.lam * torch.sqrt(types.q0**2 + 4 * types.beta_star**2)).sum())
    cands = []
    if c_star > 0:
        cands.append(2.0 * batch_size / c_star)
    c0 = types.initial_state()
    w = types.weight
    lam2 = c0.lam**2
    r = c0.residual
    s1 = float((w * lam2 * r * r * c0.rho).sum())
    s23 = float((w * lam2 * (c0.rho**2 + 2 * r * c0.beta)).sum())
    risk = float((w * 0.5 * c0.lam * r * r).sum()) + 0.5 * problem.noise_std**2
    if s23 > 0 and risk > 0 and s1 > 0:
        cands.append(batch_size * s1 / (risk * s23))
    return min(cands) if cands else 2.0 * batch_size / float(problem.spectrum.mean())


def critical_lr(
    problem: TeacherProblem,
    model: DiagonalLinearNetwork,
    *,
    batch_size: int = 1,
    steps: int,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    sgd: SGDConfig | None = None,
    rel_tol: float = 0.02,
    blowup_factor: float = 1e3,
    decay_fraction: float = 0.1,
    tol: float = 3e-3,
    num_points: int = 41,
    max_evaluations: int = 40,
    **predict_kwargs: Any,
) -> CriticalLR:
    """Largest ``lr`` whose PDE-predicted risk stays bounded over ``steps`` SGD steps (THEORY §5).

    The SGD is given by the keywords (as :func:`~sde_optim.theory.predict`) or by ``sgd`` (its ``lr``, a
    number or a schedule, sets the shape that is scaled; the result is in units of its peak).  The E8
    estimate (:func:`e8_estimate`, divided by the momentum factor of E11) centres a bracket that is widened
    by factors of 2 until it contains the transition, then bisected (geometrically) until
    ``hi / lo <= 1 + rel_tol``.  With ``noise_std = 0`` a second bisection finds the largest
    ``lr`` whose risk decays (``R(T) <= decay_fraction R(0)`` and ``dR/dt < 0`` at ``T``), bracketed by the
    first search's solves when one of them decays (THEORY §6 at ``d = 16384``: 15 solves instead of 17).
    Boundedness is assumed monotone in ``lr``; decay holds on a window of ``lr`` (too small makes
    no progress within the horizon), so its upper edge is searched below the stability limit and
    ``decay`` is ``None`` when no ``lr`` in ``[bounded / 256, bounded]`` decays within the horizon.
    A horizon so short that nothing diverges up to ``2^20`` times the E8 estimate is a
    ``ValueError``; ``max_evaluations`` bounds the number of PDE solves (``RuntimeError`` past it).

    The answer is the ``d -> infinity`` limit's.  Its finite-``d`` indicators (``finite_d``) are those of the solve at
    ``bounded``, where the steps are largest, and a :class:`~sde_optim.theory.FiniteDimensionWarning` says when they
    are past the thresholds of :func:`~sde_optim.theory.predict`'s: there SGD at this ``d`` can diverge well below
    the answer (a power law with a Gaussian teacher, ``B = 2``, momentum 0.9, ``d = 512``: answer 2.78, where one
    effective step is ``gamma lam rho / d = 1.16`` of the curvature scale (22 with momentum's lag,
    :attr:`~sde_optim.theory.SGDConfig.step_error_factor`), real SGD diverging at 1.0-1.4 for ``d`` = 512 to 8192,
    docs/benchmarks.md).

    Between the two thresholds the PDE predicts a bounded plateau (the noise keeps the
    support coordinates from converging; with balanced initialization it drives every
    ``beta`` to 0), not a divergence.  Divergence is ``R > blowup_factor R(0)``, an unresolved
    heavy tail of the law, or a coordinate past the discrete-step limit (:func:`~sde_optim.theory.predict`).
    """
    _check_model(problem, model)
    steps = check_int("steps", steps, minimum=1)
    rel_tol = check_float("rel_tol", rel_tol, minimum=0.0, strict=True)
    blowup_factor = check_blowup_factor(blowup_factor)
    max_evaluations = check_int("max_evaluations", max_evaluations, minimum=1)
    if sgd is None:
        sgd = SGDConfig(lr=1.0, batch_size=batch_size, momentum=momentum, dampening=dampening, nesterov=nesterov,
                        weight_decay=weight_decay)
    shape = sgd.with_lr_scaled(1.0 / float(sgd.lr_schedule(steps).max()))  # peak 1: the search variable is the peak
    if _at_global_minimum(coordinate_columns(problem.to(dtype=torch.float64), model), problem.noise_std):
        raise ValueError("the model starts at a global minimizer (R(0) = 0, noise_std = 0): SGD never moves, so every "
                         "lr is stable and there is no critical lr")
    options = {"refine": False, **(predict_kwargs.pop("options", None) or predict_kwargs.pop("solver_options", None) or {})}
    batch0 = float(shape.batch_schedule(1)[0])
    est = e8_estimate(problem, model, batch0) / (float(model.lr_scale) * shape.momentum_factor)
    count = [0]
    seen: dict[float, Prediction] = {}  # every solve so far, by lr

    def run(lr: float) -> Prediction:
        count[0] += 1
        if count[0] > max_evaluations:
            raise RuntimeError(f"critical_lr needed more than max_evaluations={max_evaluations} PDE solves; raise "
                               "max_evaluations or rel_tol")
        with warnings.catch_warnings():  # said once, at the answer (below)
            warnings.simplefilter("ignore", FiniteDimensionWarning)
            seen[lr] = predict(problem, model, sgd=shape.with_lr_scaled(lr), steps=steps, method="pde",
                               observables=("risk",), num_points=num_points, tol=tol, blowup_factor=blowup_factor,
                               options=options, **predict_kwargs)
        return seen[lr]

    first = seen[est] = _first_solve(problem, model, shape.with_lr_scaled(est), steps, num_points, tol, blowup_factor,
                                     options, predict_kwargs)
    count[0] += 1

    def bounded(p: Prediction) -> bool:
        return p.divergence_step is None

    def decays(p: Prediction) -> bool:
        r = p.curves["risk"]
        return p.divergence_step is None and float(r[-1]) <= decay_fraction * float(r[0]) and float(p.local_rate[-1]) > 0

    def bisect(pred, lo: float, hi: float) -> float:
        while hi / lo > 1.0 + rel_tol:
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if pred(run(mid)) else (lo, mid)
        return lo

    def search_bounded() -> float:
        lo = hi = est
        if bounded(first):
            while True:
                hi = 2.0 * lo
                if not bounded(run(hi)):
                    return bisect(bounded, lo, hi)
                lo = hi
                if lo > 2.0**20 * est:
                    raise ValueError(
                        f"steps={steps} is too short a horizon: the predicted risk stays bounded for every lr up to "
                        f"{lo:.3g} (2^20 times the E8 estimate); use a longer horizon"
                    )
        while True:
            lo = hi / 2.0
            if bounded(run(lo)):
                return bisect(bounded, lo, hi)
            hi = lo
            if lo < 1e-12 * est:
                raise RuntimeError("critical_lr found no stable learning rate")

    def search_decay(limit: float) -> float | None:
        # decay holds on a window of lr (too small: no progress within the horizon; too large: noise
        # floor), so look below the stability limit for a decaying lr, then bisect its upper edge.  The
        # stability search's solves already say where R decays: start from the largest that does, if any.
        decaying = [x for x, p in seen.items() if x <= limit and decays(p)]
        if decaying:
            lo = max(decaying)
            return bisect(decays, lo, min(x for x in seen if x > lo))  # none above lo decays: the edge is inside
        hi = limit
        for _ in range(8):
            lo = hi / 2.0
            if decays(run(lo)):
                return bisect(decays, lo, hi)
            hi = lo
        return None  # no lr in [limit / 256, limit] brings R below decay_fraction R(0) within the horizon

    lr_bounded = search_bounded()
    lr_decay = search_decay(lr_bounded) if problem.noise_std == 0 else None
    finite_d = dict(seen[lr_bounded].info.get("finite_d") or {})
    _warn_finite_d(finite_d, problem.dim, where=f"critical_lr: at its answer lr = {lr_bounded:.4g} and", stacklevel=3,
                   source="CriticalLR.finite_d")
    return CriticalLR(lr_bounded, lr_decay, est, rel_tol, count[0], finite_d)


def _first_solve(problem, model, sgd: SGDConfig, steps: int, num_points: int, tol: float, blowup_factor: float,
                 options: dict, predict_kwargs: dict) -> Prediction:
    """The solve at the E8 estimate; its (checked) types are put in ``options`` for every later solve."""
    if set(predict_kwargs) - {"dtype", "max_types", "max_evaluations", "max_seconds"}:
        raise TypeError(f"critical_lr() got unexpected keyword argument(s) {sorted(predict_kwargs)}")
    setup, k, info, fixed = _prepare(problem, model, lr=None, batch_size=1, steps=steps, momentum=0.0, dampening=0.0,
                                     nesterov=False, weight_decay=0.0, noise_scale=1.0, sgd=sgd, method="pde",
                                     observables=("risk",), num_points=num_points, tol=tol,
                                     max_types=predict_kwargs.get("max_types", 4096), blowup_factor=blowup_factor,
                                     dtype=predict_kwargs.get("dtype", torch.float64),
                                     max_evaluations=predict_kwargs.get("max_evaluations", 200_000),
                                     max_seconds=predict_kwargs.get("max_seconds"))
    sol = PDESolver(**{key: v for key, v in options.items() if key != "types"}).solve(setup)
    options["types"] = sol.types
    return _finish(sol, setup, k, info, warn=False)  # critical_lr warns at its answer
