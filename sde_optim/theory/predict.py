"""Public prediction API: :func:`predict` and its result :class:`Prediction` (THEORY §4-§7).

``predict`` maps the user's problem, network and SGD (``torch.optim.SGD``'s hyper-parameters with
schedules, :class:`~sde_optim.theory.dynamics.SGDConfig`) to the mean-field description
(coordinates, coefficients, time ``t = k/d`` of E2), runs one of the :data:`~.solvers.SOLVERS`
and returns the E7 observable curves, the E8 local rate and the predicted divergence step.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from dataclasses import replace
from itertools import product
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from .._validation import check_choice, check_float, check_int
from ..divergence import BLOWUP_FACTOR, check_blowup_factor
from ..models import DiagonalLinearNetwork
from ..observables import measure, resolve_observables
from ..teacher import TeacherProblem
from .dynamics import CoefficientBatch, ScheduleLike, SGDConfig
from .fokker_planck import Budget
from .quadrature import coordinate_columns
from .solvers import SOLVERS, Problem

__all__ = ["Prediction", "predict", "predict_sweep", "METHODS"]

METHODS = tuple(SOLVERS)


@dataclass
class Prediction:
    """Predicted curves at SGD steps ``steps`` (int64, ``(n,)``) and times ``t = steps / d`` (E2).

    Attributes:
        curves: observable name -> ``(n,)`` (``nan`` after a predicted divergence).
        local_rate: ``-d log R / dt`` from E8 (``(n,)``).
        divergence_step: first predicted step with ``R > blowup_factor R(0)``, else ``None``.
        stderr: Monte Carlo standard errors of the curves (``"particles"`` only), else empty.
        info: method, the SGD description, dim, noise_std, the error estimate of each source
            (``error_estimates``) and their sum (``error_estimate``), types, solver diagnostics, and
            ``finite_d`` (``"pde"``, ``"gradient_flow"``): the largest finite-``d`` indicators over the descent
            window (:func:`~sde_optim.theory.statistics.finite_d_indicators`; a ``FiniteDimensionWarning`` when
            they are large).
        scatter: observable -> ``(n,)`` (the risk, the curvature and the requested ones): how far one SGD run at
            this ``d`` is expected to stray from the curves, as a relative standard deviation (its coordinates'
            independent fluctuations: the spread within each type's law over ``d``; checked against 64 SGD seeds
            in docs/benchmarks.md); ``curves * scatter`` is a one-sigma band for single runs.  ``"pde"`` and
            ``"gradient_flow"`` (0: no noise) only, else empty.
    """

    steps: Tensor
    t: Tensor
    curves: dict[str, Tensor]
    local_rate: Tensor
    divergence_step: int | None
    stderr: dict[str, Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    scatter: dict[str, Tensor] = field(default_factory=dict)

    def at_step(self, k: int | float | Tensor) -> dict[str, Tensor | float]:
        """Curves, ``local_rate`` and the scatter (as ``"{name}_scatter"``) linearly interpolated at SGD step(s) ``k``
        (scalar -> floats, tensor -> tensors).

        ``k`` must lie in ``[steps[0], steps[-1]]`` (finite).
        """
        scalar = not isinstance(k, Tensor) or k.ndim == 0
        kk = torch.as_tensor(k, dtype=self.t.dtype).reshape(-1)
        if not bool(torch.isfinite(kk).all()):
            raise ValueError(f"k must be finite SGD steps in [{int(self.steps[0])}, {int(self.steps[-1])}]; got {k}")
        lo, hi = float(self.steps[0]), float(self.steps[-1])
        if bool(((kk < lo) | (kk > hi)).any()):
            raise ValueError(f"k must lie in [{int(lo)}, {int(hi)}] (the predicted steps); got {k}")
        x = self.steps.to(self.t.dtype)
        idx = torch.searchsorted(x, kk, right=True).clamp(1, x.numel() - 1)
        x0, x1 = x[idx - 1], x[idx]
        wgt = torch.where(x1 > x0, (kk - x0) / (x1 - x0), torch.zeros_like(kk))
        out: dict[str, Tensor | float] = {}
        scatter = {f"{name}_scatter": y for name, y in self.scatter.items()}
        for name, y in {**self.curves, "local_rate": self.local_rate, **scatter}.items():
            v = y[idx - 1] + wgt * (y[idx] - y[idx - 1])
            out[name] = float(v[0]) if scalar else v
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python/tensor dict (for :func:`torch.save`, JSON after ``.tolist()``)."""
        return {
            "steps": self.steps, "t": self.t, "curves": dict(self.curves), "local_rate": self.local_rate,
            "divergence_step": self.divergence_step, "stderr": dict(self.stderr), "info": dict(self.info),
            "scatter": dict(self.scatter),
        }

    def save(self, path) -> None:
        torch.save(self.to_dict(), path)

    @classmethod
    def load(cls, path) -> "Prediction":
        """A prediction saved by :meth:`save`.  Only tensors and plain types are read (``weights_only``): a file
        carrying any other pickled object is refused, so opening someone else's file cannot run their code."""
        try:
            d = torch.load(path, weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError (or a RuntimeError wrapping it) for foreign objects
            if isinstance(exc, (FileNotFoundError, IsADirectoryError, PermissionError)):
                raise
            raise ValueError(f"{path} is not a prediction file of tensors and plain values (refused to unpickle "
                             f"anything else: {type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
        missing = {"steps", "t", "curves", "local_rate", "divergence_step"} - set(d if isinstance(d, dict) else ())
        if missing:
            raise ValueError(f"{path} is not a prediction file (missing {sorted(missing)})")
        return cls(d["steps"], d["t"], d["curves"], d["local_rate"], d["divergence_step"], d.get("stderr", {}), d.get("info", {}),
                   d.get("scatter", {}))


def _check_model(problem, model) -> None:
    if not isinstance(problem, TeacherProblem):
        raise TypeError(f"problem must be a TeacherProblem, got {type(problem).__name__}")
    if not isinstance(model, DiagonalLinearNetwork):
        raise TypeError(f"model must be a DiagonalLinearNetwork, got {type(model).__name__}")
    if model.depth != 2:
        raise ValueError(f"model.depth must be 2 (the theory covers depth-2 networks, THEORY §1); got {model.depth}")
    if model.dim != problem.dim:
        raise ValueError(f"model.dim ({model.dim}) must equal problem.dim ({problem.dim})")
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p.detach()).all()):
            raise ValueError(f"model parameter {name!r} has non-finite entries: the prediction starts from the "
                             "network's current state, which must be finite")


def _output_steps(steps: int, num_points: int, device) -> Tensor:
    k = torch.linspace(0, steps, num_points, dtype=torch.float64).round().to(torch.int64)
    return torch.unique(k).to(device)


_DTYPES = (torch.float64, torch.float32)
_LEGACY_OPTIONS = ("generator", "num_particles", "num_replicas", "dt", "extrapolate", "step_stability")


def predict(
    problem: TeacherProblem,
    model: DiagonalLinearNetwork,
    *,
    lr: ScheduleLike | None = None,
    batch_size: ScheduleLike = 1,
    steps: int,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    noise_scale: float = 1.0,
    sgd: SGDConfig | None = None,
    method: str = "pde",
    observables: str | Iterable[str] | None = None,
    num_points: int = 201,
    tol: float = 1e-3,
    max_types: int = 4096,
    blowup_factor: float = BLOWUP_FACTOR,
    dtype: torch.dtype = torch.float64,
    options: dict[str, Any] | None = None,
    max_evaluations: int = 200_000,
    max_seconds: float | None = None,
    progress: bool | None = False,
    solver_options: dict[str, Any] | None = None,
    **legacy: Any,
) -> Prediction:
    """Predict the E7 observables over ``steps`` steps of SGD (THEORY §4-§7).

    The SGD is ``torch.optim.SGD``'s: pass its hyper-parameters (``lr``, ``momentum``, ``dampening``,
    ``nesterov``, ``weight_decay``, with torch's meanings and validation, plus ``batch_size``), or an
    :class:`~sde_optim.theory.dynamics.SGDConfig` as ``sgd``.  ``lr`` and ``batch_size`` may be schedules:
    a per-step sequence (at least ``steps`` long) or a callable of the step (E10; a scheduler's jumps are
    solved as jumps); :func:`~sde_optim.theory.describe_sgd` reads them off a live optimizer and scheduler.
    Momentum enters through the effective step ``lr (1 - dampening) / (1 - momentum)`` (Nesterov:
    ``lr / (1 - momentum)``, E11: a warning when ``1/(1 - momentum)`` is not much smaller than ``d``),
    weight decay through ``kappa = d lr_eff wd`` (E12).

    Args:
        problem, model: the teacher problem and the (depth-2) network at its initial state (finite).
        lr, batch_size, momentum, dampening, nesterov, weight_decay: the SGD (see above).
        steps: number of SGD steps (>= 1); horizon ``t = steps / d``.
        noise_scale: multiplies the gradient noise (1 = SGD, 0 = gradient flow: ``"pde"`` then solves the ODE).
        sgd: the whole description at once (instead of the keywords above).
        method: one of :data:`~sde_optim.theory.solvers.SOLVERS`: ``"pde"`` (default), ``"particles"``,
            ``"gradient_flow"``, ``"ode"`` (:mod:`sde_optim.theory.solvers`).
        observables: ``None`` (risk, curvature), ``"all"`` or names from ``OBSERVABLES``.
        num_points: number of output points (>= 2), evenly spaced in steps.
        tol: accuracy target: relative error of ``R`` and ``C`` (maximum over the output times with
            ``R >= 1e-3 R(0)``), estimated a posteriori from each source and met by refinement;
            ``info["error_estimates"]`` has the estimate of each source, ``info["error_estimate"]`` their sum:

            * ``"types"``: when the coordinates ``(lambda_i, beta*_i, u0_i, v0_i)`` take more than 64
              distinct values (a continuous spectrum, teacher or initialization) the coordinate
              distribution is replaced by an error-controlled quadrature
              (:mod:`sde_optim.theory.quadrature`), refined until its estimate is below ``tol / 2``;
            * ``"grid"`` (``"pde"``): the cells and time steps of the Fokker-Planck solve, refined until
              the rest of ``tol`` is met; where the cells converge at second order the answer is the Richardson
              extrapolation of the last two grids on the same time steps (``info["grid_extrapolated"]``) and the
              estimate is that answer's.

            If a cap stops a refinement first, a ``RuntimeWarning`` gives the estimate and the cap.
        max_types: cap on the number of quadrature types (sigma points) in one solve.
        blowup_factor: divergence threshold on ``R / R(0)`` (> 1, :mod:`sde_optim.divergence`).
        dtype: computation dtype, float64 (default) or float32.  float32 agrees with float64 within 2.5e-4 on the
            benchmark settings and is 1.2-1.4x faster with many types, but its rounding is not part of the error
            estimate, and near the critical lr it keeps the grid check from converging (it then warns: 5e-3 to
            8e-3 where float64 reaches 1e-3, docs/benchmarks.md).
        options: the method's own options (:mod:`sde_optim.theory.solvers`; e.g. ``{"num_particles": ...,
            "num_replicas": ..., "dt": ..., "generator": ...}`` for ``"particles"``, ``{"max_cells": ...}`` or
            ``{"step_stability": False}`` for ``"pde"``).  ``solver_options`` is the older name for the PDE's.
        max_evaluations, max_seconds: a hard bound on the work (Fokker-Planck operator evaluations of all
            solves together, and wall time): past it a :class:`~sde_optim.theory.fokker_planck.WorkLimitError`
            says which knob to turn.
        progress: show a progress bar (tqdm) of the solves on stderr; ``None`` shows it on a terminal only.

    The method options ``generator``, ``num_particles``, ``num_replicas``, ``dt``, ``extrapolate`` and
    ``step_stability`` are also accepted as keywords, with a ``DeprecationWarning`` (use ``options``).
    """
    options = _merge_options(options, solver_options, legacy)
    setup, k, info, fixed = _prepare(problem, model, lr=lr, batch_size=batch_size, steps=steps, momentum=momentum,
                                     dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
                                     noise_scale=noise_scale, sgd=sgd, method=method, observables=observables,
                                     num_points=num_points, tol=tol, max_types=max_types, blowup_factor=blowup_factor,
                                     dtype=dtype, max_evaluations=max_evaluations, max_seconds=max_seconds)
    if fixed is not None:
        return fixed
    method = info["solver"]
    legacy = {key: v for key, v in legacy.items() if key in SOLVERS[method].defaults}  # flat keywords: the method's own
    options = {**legacy, **options}
    if method != info["method"]:  # noise 0: the PDE is the gradient-flow ODE
        options = {key: v for key, v in options.items() if key in SOLVERS[method].defaults}
    with _progress_bar(progress, float(setup.t[-1])) as bar:
        setup.on_step = bar
        sol = SOLVERS[method](**options).solve(setup)
    return _finish(sol, setup, k, info)


def predict_sweep(
    problem: TeacherProblem,
    model: DiagonalLinearNetwork,
    *,
    lr: float | Sequence[float],
    batch_size: int | Sequence[int] | None = None,
    steps: int,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    noise_scale: float = 1.0,
    sgd: SGDConfig | None = None,
    method: str = "pde",
    observables: str | Iterable[str] | None = None,
    num_points: int = 201,
    tol: float = 1e-3,
    max_types: int = 4096,
    blowup_factor: float = BLOWUP_FACTOR,
    dtype: torch.dtype = torch.float64,
    options: dict[str, Any] | None = None,
    max_evaluations: int = 200_000,
    max_seconds: float | None = None,
) -> list[Prediction]:
    """:func:`predict` at several learning rates and batch sizes, solved as one system (issue 12).

    One :class:`Prediction` per pair of ``itertools.product(lr, batch_size)`` (learning rate major), each as
    :func:`predict` would return it for that pair, with the same ``tol`` semantics: the PDE solves every member in
    one batched Fokker-Planck system (:class:`~sde_optim.theory.dynamics.CoefficientBatch`), its type check on the
    largest estimate over the members and its grid check per member, in groups of members whose solves fit a memory
    budget (``options={"member_batch": ...}``, :class:`~sde_optim.theory.solvers.PDESolver`); a member that diverges
    leaves the batch.  Where a member's own work dwarfs what a batch shares (many types on the compiled CPU step:
    ``PDESolver._alone``; ``member_batch`` keeps the batch), each member is its :func:`predict` bit for bit, solved
    one after the other.  Other methods solve the members one after the other.

    ``lr`` is a number or a sequence of numbers (> 0) -- not a per-step schedule: that is :func:`predict`'s
    ``lr=[...]``, which is why the sweep has its own function.  With ``sgd`` (an
    :class:`~sde_optim.theory.dynamics.SGDConfig`) the sweep scales its learning-rate schedule so that its peak is
    each ``lr`` (the schedule's shape, momentum, weight decay kept) and ``batch_size``, if given, replaces its batch
    size (``None``: the ``sgd``'s, or 1).
    ``max_seconds`` bounds the whole sweep; ``max_evaluations`` a batch's evaluations (one per batched step), or each
    member's where members are solved one by one.  Other arguments: as :func:`predict`.
    """
    lrs = [check_float("lr", x, minimum=0.0, strict=True) for x in _as_list(lr)]
    batches = [None] if batch_size is None else [check_int("batch_size", b, minimum=1) for b in _as_list(batch_size)]
    if not lrs or not batches:
        raise ValueError("predict_sweep needs at least one lr and one batch_size")
    steps = check_int("steps", steps, minimum=1)
    if sgd is None:
        sgd = SGDConfig(lr=1.0, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
                        noise_scale=noise_scale)
    elif not isinstance(sgd, SGDConfig):
        raise TypeError(f"sgd must be an SGDConfig, got {type(sgd).__name__}")
    shape = sgd.with_lr_scaled(1.0 / float(sgd.lr_schedule(steps).max()))  # peak 1
    configs = [shape.with_lr_scaled(a) if b is None else replace(shape.with_lr_scaled(a), batch_size=b)
               for a, b in product(lrs, batches)]
    prepared = [_prepare(problem, model, lr=None, batch_size=1, steps=steps, momentum=0.0, dampening=0.0, nesterov=False,
                         weight_decay=0.0, noise_scale=1.0, sgd=c, method=method, observables=observables,
                         num_points=num_points, tol=tol, max_types=max_types, blowup_factor=blowup_factor, dtype=dtype,
                         max_evaluations=max_evaluations, max_seconds=max_seconds) for c in configs]
    if prepared[0][3] is not None:  # at a global minimizer: nothing moves, whatever the SGD
        return [fixed for *_, fixed in prepared]
    setup = replace(prepared[0][0], coef=CoefficientBatch([p[0].coef for p in prepared], dtype, problem.beta_star.device))
    solver = SOLVERS[prepared[0][2]["solver"]]
    options = dict(options or {})
    if solver.name != method:  # noise 0: the PDE is the gradient-flow ODE
        options = {key: v for key, v in options.items() if key in solver.defaults}
    sols = solver(**options).solve_batch(setup)
    preds = [_finish(sol, member, k, info, warn=False) for sol, (member, k, info, _) in zip(sols, prepared)]
    worst = max(preds, key=lambda p: _finite_d_excess(p.info.get("finite_d")))
    _warn_finite_d(worst.info.get("finite_d"), setup.dim)  # once for the sweep
    return preds


def _as_list(x) -> list:
    if isinstance(x, Tensor):
        return x.reshape(-1).tolist()
    return list(x) if isinstance(x, (list, tuple, range)) else [x]


def _prepare(problem, model, *, lr, batch_size, steps, momentum, dampening, nesterov, weight_decay, noise_scale, sgd,
             method, observables, num_points, tol, max_types, blowup_factor, dtype, max_evaluations, max_seconds):
    """Validate :func:`predict`'s arguments and build the solvers' :class:`~.solvers.Problem`.

    Returns ``(problem, steps k, info, fixed)``: ``fixed`` is the whole prediction when the network starts at a
    global minimizer (nothing to solve), else None; ``info["solver"]`` is the method that will run.
    """
    _check_model(problem, model)
    if sgd is None:
        if lr is None:
            raise TypeError("predict() needs the SGD: lr=... (with batch_size, momentum, ...) or sgd=SGDConfig(...)")
        sgd = SGDConfig(lr=lr, batch_size=batch_size, momentum=momentum, dampening=dampening, nesterov=nesterov,
                        weight_decay=weight_decay, noise_scale=noise_scale)
    elif not isinstance(sgd, SGDConfig):
        raise TypeError(f"sgd must be an SGDConfig, got {type(sgd).__name__}")
    steps = check_int("steps", steps, minimum=1)
    method = check_choice("method", method, METHODS)
    num_points = check_int("num_points", num_points, minimum=2)
    tol = check_float("tol", tol, minimum=1e-8, maximum=0.5)
    max_types = check_int("max_types", max_types, minimum=1)
    blowup_factor = check_blowup_factor(blowup_factor)
    max_evaluations = check_int("max_evaluations", max_evaluations, minimum=1)
    if max_seconds is not None:
        max_seconds = check_float("max_seconds", max_seconds, minimum=0.0, strict=True)
    if dtype not in _DTYPES:
        raise TypeError(f"dtype must be torch.float64 or torch.float32 (the solvers' dtypes); got {dtype!r}")
    obs = resolve_observables(observables)
    d = problem.dim
    problem64 = problem.to(dtype=torch.float64)
    columns = coordinate_columns(problem64, model)
    coef = sgd.coefficients(d, float(model.lr_scale), steps)
    k = _output_steps(steps, num_points, columns.device)
    t = k.to(dtype) / d
    info: dict[str, Any] = {"method": method, "sgd": _describe(sgd), "lr": _first(sgd.lr, steps), "gamma": coef.gamma(0.0),
                            "batch_size": _first(sgd.batch_size, steps), "dim": d, "noise_std": problem.noise_std,
                            "noise_scale": sgd.noise_scale}
    fixed = None
    if _at_global_minimum(columns, problem.noise_std):
        # R(0) = 0: every residual and the label noise vanish, so every per-sample gradient is zero and
        # SGD, E3 and E6 all stay at the initial point (a relative blow-up test would be meaningless).
        values = measure(problem64, model, [o.name for o in obs])
        curves = {n: v.to(dtype).expand(t.numel()).clone() for n, v in values.items()}
        info["solver"] = "fixed_point"
        fixed = Prediction(k, t, curves, torch.zeros_like(t), None, {}, info)
    else:
        info["solver"] = "gradient_flow" if method == "pde" and sgd.noise_scale == 0 else method
    setup = Problem(columns, coef, problem.noise_std, float(model.lr_scale), d, t, obs, tol, max_types, blowup_factor, dtype,
                    Budget(max_evaluations, max_seconds))
    return setup, k, info, fixed


def _finish(sol, setup: Problem, k: Tensor, info: dict[str, Any], warn: bool = True) -> Prediction:
    """The :class:`Prediction` of a solver's :class:`~.solvers.Solution` (curves ``nan`` after a divergence);
    ``warn``: raise its :class:`FiniteDimensionWarning` here (a sweep warns once, for its worst member)."""
    info = {**info, **sol.info}
    if warn:
        _warn_finite_d(info.get("finite_d"), setup.dim)
    curves, rate, t, scatter = dict(sol.curves), sol.local_rate, setup.t, dict(sol.scatter)
    divergence_step = None
    if sol.diverged_at is not None:
        divergence_step = int(round(sol.diverged_at * setup.dim))
        after = t >= sol.diverged_at
        curves = {n: torch.where(after, torch.full_like(v, float("nan")), v) for n, v in curves.items()}
        rate = torch.where(after, torch.full_like(rate, float("nan")), rate)
        scatter = {n: torch.where(after, torch.full_like(v, float("nan")), v) for n, v in scatter.items()}
    return Prediction(k, t, curves, rate, divergence_step, dict(sol.stderr), info, scatter)


def _finite_d_excess(finite_d: dict[str, float] | None) -> float:
    """How far the finite-d indicators are past the warning's thresholds (> 1: past one of them; 0 without them)."""
    if not finite_d:
        return 0.0
    return max(max(finite_d["risk_step"], finite_d["curvature_step"]) / FINITE_D_STEP,
               max(finite_d["risk_scatter"], finite_d["curvature_scatter"]) / FINITE_D_SCATTER,
               _compound(finite_d) / FINITE_D_COMPOUND)


def _compound(finite_d: dict[str, float]) -> float:
    return max(finite_d.get("risk_compound", 0.0), finite_d.get("curvature_compound", 0.0))


class FiniteDimensionWarning(RuntimeWarning):
    """The problem is too far from the ``d -> infinity`` limit for the prediction to describe SGD closely."""


# Above these, :func:`_warn_finite_d` warns: a coordinate's drift off by ~5 % per unit time, or one run's observable
# expected to deviate from the curve by a quarter of it.  The step's threshold was 0.1 until a randomized scan found
# SGD's mean 6.5 % off a silent prediction at step 0.073 (benchmarks/silent_scan.py case 1502, d = 2048, z = 5); there
# and on its neighbours the risk's error was 0.7-0.9x the step index (0.018 -> 1.3 %, 0.043 -> 2.9 %, 0.037 -> 2.9 %).
FINITE_D_STEP, FINITE_D_SCATTER = 0.05, 0.25
# The step index compounded over an observable's e-folds (info['finite_d']['<name>_compound']): above 1 the curve can
# be off by a factor e (case 2204: 10.4 where SGD's curvature was 146x below the prediction).
FINITE_D_COMPOUND = 1.0


def _warn_finite_d(finite_d: dict[str, float] | None, dim: int, where: str = "predict: at", stacklevel: int = 4,
                   source: str = "info['finite_d']") -> None:
    """Warn when :func:`~.statistics.finite_d_indicators` (largest over the descent window) say the limit leaves out a
    large effect: the coordinates that carry ``R`` or ``C`` take steps that are not small against their own curvature
    (E3 is the small-step limit), or a few coordinates carry them, so one run scatters widely (THEORY §1)."""
    if _finite_d_excess(finite_d) <= 1.0:
        return
    assert finite_d is not None
    step = max(finite_d["risk_step"], finite_d["curvature_step"])
    scatter = max(finite_d["risk_scatter"], finite_d["curvature_scatter"])
    causes = []
    if step > FINITE_D_STEP:
        causes.append(f"the coordinates that carry the risk and curvature take steps gamma lambda rho / d = {step:.2g} of "
                      f"their own curvature scale, weight decay's kappa / d and momentum's lag included "
                      f"(SGDConfig.step_error_factor; the SDE is the "
                      f"limit of small steps: their drift is off by a fraction of this order)")
    if scatter > FINITE_D_SCATTER:
        causes.append(f"a few coordinates carry the risk or curvature, so one run is expected to scatter by "
                      f"{scatter:.0%} around the curves")
    compound = _compound(finite_d)
    if compound > FINITE_D_COMPOUND:
        causes.append(f"the risk or curvature falls by so many e-folds that the steps' drift error compounds to "
                      f"{compound:.2g} in its exponent (the curve can be off by a factor e^{compound:.2g})")
    warnings.warn(f"{where} d = {dim} SGD is not close to the d -> infinity limit this prediction solves: "
                  f"{'; and '.join(causes)} ({source}; warned above step {FINITE_D_STEP:g}, scatter "
                  f"{FINITE_D_SCATTER:g} or compounded step {FINITE_D_COMPOUND:g})", FiniteDimensionWarning,
                  stacklevel=stacklevel)


def _merge_options(options, solver_options, legacy) -> dict[str, Any]:
    """The method's options from ``options`` and the older ``solver_options``; checks the deprecated flat keywords
    (each method later keeps those it takes, as before)."""
    unknown = sorted(set(legacy) - set(_LEGACY_OPTIONS))
    if unknown:
        raise TypeError(f"predict() got unexpected keyword argument(s) {unknown}")
    if legacy:
        warnings.warn(f"predict(): pass {sorted(legacy)} in options={{...}} (the flat keywords are deprecated)",
                      DeprecationWarning, stacklevel=3)
    return {**(solver_options or {}), **(options or {})}


def _first(value, steps: int):
    """A schedule's first value (for ``info``); plain numbers as they are."""
    if isinstance(value, (int, float)):
        return value
    if callable(value) and not isinstance(value, Tensor):
        return value(0)
    return float(torch.as_tensor(value).reshape(-1)[0])


def _describe(sgd: SGDConfig) -> dict[str, Any]:
    """Plain description of the SGD (schedules summarized) for ``info``."""
    def kind(v):
        return v if isinstance(v, (int, float)) else ("callable" if callable(v) and not isinstance(v, Tensor) else "sequence")
    return dict(lr=kind(sgd.lr), batch_size=kind(sgd.batch_size), momentum=sgd.momentum, dampening=sgd.dampening,
                nesterov=sgd.nesterov, weight_decay=sgd.weight_decay, noise_scale=sgd.noise_scale)


class _progress_bar:
    """A tqdm bar over SGD time (``progress`` True, or None on a terminal); a no-op callback otherwise."""

    def __init__(self, progress: bool | None, horizon: float) -> None:
        import sys

        show = sys.stderr.isatty() if progress is None else bool(progress)
        self.bar = None
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=horizon, desc="predict (SGD time t)", unit="t", leave=False,
                            bar_format="{l_bar}{bar}| {n:.2f}/{total:.2f} [{elapsed}<{remaining}]")
        self.last = 0.0

    def __enter__(self):
        return self if self.bar is not None else None

    def __call__(self, t: float) -> None:
        if t > self.last:  # each solve restarts at t = 0: show the furthest time reached by the current one
            self.bar.update(t - self.last)
        else:
            self.bar.reset(total=self.bar.total)
            self.bar.update(t)
        self.last = t

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def _at_global_minimum(columns: Tensor, noise_std: float) -> bool:
    """Whether ``R(0) = 0`` exactly: no label noise and ``beta0 = beta*`` wherever ``lambda > 0`` (``columns``: ``(d, 4)``)."""
    lam, bstar, u0, v0 = columns.unbind(1)
    return noise_std == 0 and bool(((u0 * v0 - bstar) * lam == 0).all())
