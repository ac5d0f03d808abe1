"""Public prediction API: :func:`predict` and :func:`critical_lr` (THEORY §4-§5).

``predict`` maps the user's problem, network and SGD hyper-parameters to the mean-field
description (types, ``gamma = lr * model.lr_scale``, time ``t = k/d`` of E2) and returns the
E7 observable curves, the E8 local rate and the predicted divergence step, computed by one of

* ``"pde"`` -- the Fokker-Planck system E6 (:mod:`.fokker_planck`), the default;
* ``"particles"`` -- Euler-Maruyama of E4-E5 (:mod:`.particles`), with standard errors;
* ``"gradient_flow"`` -- noise scale 0 (:func:`.odes.gradient_flow`);
* ``"ode"`` -- the linear least-squares system E9 of the *linear* model ``f(x) = <x, w>``
  started at ``w0 = beta(theta0)`` on the same data (THEORY §5 sanity case); only the
  observables that are functions of ``E[(w - beta*)^2]`` (risk, excess_risk, distance) exist.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch
from torch import Tensor

from .._validation import check_choice, check_float, check_int
from ..models import DiagonalLinearNetwork
from ..observables import OBSERVABLES, measure, resolve_observables
from ..teacher import TeacherProblem
from .fokker_planck import MeanFieldDynamics, grid_level, refine_grid, refine_grid_on_subset, solve_on_grid
from .odes import gradient_flow, linear_least_squares
from .particles import simulate_particles
from .statistics import e8_local_rate, observable_values
from .quadrature import TypeCheck, TypeSolve, coordinate_columns, coordinate_types, solve_with_type_control
from .types import CoordinateTypes, effective_step, exact_types

__all__ = ["Prediction", "predict", "CriticalLR", "critical_lr", "METHODS"]

METHODS = ("pde", "particles", "ode", "gradient_flow")
_ODE_OBSERVABLES = ("risk", "excess_risk", "distance")


@dataclass
class Prediction:
    """Predicted curves at SGD steps ``steps`` (int64, ``(n,)``) and times ``t = steps / d`` (E2).

    Attributes:
        curves: observable name -> ``(n,)`` (``nan`` after a predicted divergence).
        local_rate: ``-d log R / dt`` from E8 (``(n,)``).
        divergence_step: first predicted step with ``R > blowup_factor R(0)``, else ``None``.
        stderr: Monte Carlo standard errors of the curves (``"particles"`` only), else empty.
        info: method, lr, gamma, batch_size, dim, noise_std, number of types, binning error,
            solver diagnostics.
    """

    steps: Tensor
    t: Tensor
    curves: dict[str, Tensor]
    local_rate: Tensor
    divergence_step: int | None
    stderr: dict[str, Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def at_step(self, k: int | float | Tensor) -> dict[str, Tensor | float]:
        """Curves linearly interpolated at SGD step(s) ``k`` (scalar -> floats, tensor -> tensors).

        ``k`` must lie in ``[steps[0], steps[-1]]``.
        """
        scalar = not isinstance(k, Tensor) or k.ndim == 0
        kk = torch.as_tensor(k, dtype=self.t.dtype).reshape(-1)
        lo, hi = float(self.steps[0]), float(self.steps[-1])
        if bool(((kk < lo) | (kk > hi)).any()):
            raise ValueError(f"k must lie in [{int(lo)}, {int(hi)}] (the predicted steps); got {k}")
        x = self.steps.to(self.t.dtype)
        idx = torch.searchsorted(x, kk, right=True).clamp(1, x.numel() - 1)
        x0, x1 = x[idx - 1], x[idx]
        wgt = torch.where(x1 > x0, (kk - x0) / (x1 - x0), torch.zeros_like(kk))
        out: dict[str, Tensor | float] = {}
        for name, y in {**self.curves, "local_rate": self.local_rate}.items():
            v = y[idx - 1] + wgt * (y[idx] - y[idx - 1])
            out[name] = float(v[0]) if scalar else v
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python/tensor dict (for :func:`torch.save`, JSON after ``.tolist()``)."""
        return {
            "steps": self.steps, "t": self.t, "curves": dict(self.curves), "local_rate": self.local_rate,
            "divergence_step": self.divergence_step, "stderr": dict(self.stderr), "info": dict(self.info),
        }

    def save(self, path) -> None:
        torch.save(self.to_dict(), path)

    @classmethod
    def load(cls, path) -> "Prediction":
        d = torch.load(path, weights_only=False)
        return cls(d["steps"], d["t"], d["curves"], d["local_rate"], d["divergence_step"], d.get("stderr", {}), d.get("info", {}))


def _check_inputs(problem, model, lr, batch_size, steps, method) -> tuple[float, int, int, str]:
    if not isinstance(problem, TeacherProblem):
        raise TypeError(f"problem must be a TeacherProblem, got {type(problem).__name__}")
    if not isinstance(model, DiagonalLinearNetwork):
        raise TypeError(f"model must be a DiagonalLinearNetwork, got {type(model).__name__}")
    if model.depth != 2:
        raise ValueError(f"model.depth must be 2 (the theory covers depth-2 networks, THEORY §1); got {model.depth}")
    lr = check_float("lr", lr, minimum=0.0, strict=True)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    steps = check_int("steps", steps, minimum=1)
    method = check_choice("method", method, METHODS)
    if model.dim != problem.dim:
        raise ValueError(f"model.dim ({model.dim}) must equal problem.dim ({problem.dim})")
    return lr, batch_size, steps, method


def _output_steps(steps: int, num_points: int, device) -> Tensor:
    k = torch.linspace(0, steps, num_points, dtype=torch.float64).round().to(torch.int64)
    return torch.unique(k).to(device)


def predict(
    problem: TeacherProblem,
    model: DiagonalLinearNetwork,
    *,
    lr: float,
    batch_size: int,
    steps: int,
    method: str = "pde",
    observables: str | Iterable[str] | None = None,
    num_points: int = 201,
    generator: torch.Generator | None = None,
    max_types: int = 4096,
    tol: float = 1e-3,
    num_particles: int = 32_768,
    num_replicas: int = 1,
    dt: float = 2e-3,
    extrapolate: bool = True,
    noise_scale: float = 1.0,
    blowup_factor: float = 1e4,
    step_stability: bool = True,
    dtype: torch.dtype = torch.float64,
    solver_options: dict[str, Any] | None = None,
) -> Prediction:
    """Predict the E7 observables of ``steps`` SGD steps with step ``lr`` and batch ``batch_size``.

    Args:
        problem, model: the teacher problem and the (depth-2) network at its initial state.
        lr: the network's SGD step size (> 0); ``gamma = lr * model.lr_scale``.
        batch_size: ``B`` (>= 1).  steps: number of SGD steps (>= 1); horizon ``t = steps / d``.
        method: ``"pde"`` | ``"particles"`` | ``"ode"`` | ``"gradient_flow"`` (module docstring).
        observables: ``None`` (risk, curvature), ``"all"`` or names from ``OBSERVABLES``.
        num_points: number of output points (>= 2), evenly spaced in steps.
        generator: randomness of ``"particles"`` (on the problem's device).
        tol: accuracy target: relative error of ``R`` and ``C`` (maximum over the output times with
            ``R >= 1e-3 R(0)``), estimated a posteriori from each source and met by refinement;
            ``info["error_estimates"]`` has the estimate of each source, ``info["error_estimate"]`` their sum:

            * ``"types"``: when the coordinates ``(lambda_i, beta*_i, u0_i, v0_i)`` take more than 64
              distinct values (a continuous spectrum, teacher or initialization) the coordinate
              distribution is replaced by an error-controlled quadrature
              (:mod:`sde_optim.theory.quadrature`), refined until its estimate is below ``tol / 2``;
            * ``"grid"`` (``"pde"``): the cells and time steps of the Fokker-Planck solve, refined until
              the rest of ``tol`` is met (:func:`solve_fokker_planck`; with many types the grid is
              refined on a subset of them and combined, :func:`refine_grid_on_subset`).

            If a cap stops a refinement first, a ``RuntimeWarning`` gives the estimate and the cap.
        max_types: cap on the number of quadrature types (sigma points) in one solve.
        num_particles, num_replicas, dt, extrapolate: particle method (:func:`simulate_particles`) on the
            exact coordinates: ``num_particles`` particles per replica in total, the same number for each
            distinct coordinate row (weighted by its frequency), so at least the number of distinct rows;
            no quadrature, only Monte Carlo error.  Richardson extrapolation in ``dt``.
        noise_scale: multiplies the gradient noise (1 = SGD); ``"pde"``/``"particles"`` only.  With
            ``noise_scale = 0`` E6 has no diffusion and transports the delta initial law along the
            gradient-flow ODE, so ``"pde"`` solves that ODE (``info["solver"] = "gradient_flow"``).
        blowup_factor: divergence threshold on ``R / R(0)``.
        step_stability: (``"pde"``) also predict divergence when, at any solver step, the law
            puts at least one of the ``d`` coordinates beyond the discrete-step stability limit
            ``gamma lam rho / d > 2`` (the top eigenvalue of coordinate ``i``'s 2x2 Hessian
            block, ``(lam/d) rho`` near ``beta = beta*``, E7): the SDE's drift confines
            such coordinates but a discrete SGD step overshoots and blows them up.  This is a
            finite-``d`` effect the continuum limit cannot see by itself.
        dtype: computation dtype (float64 default).  solver_options: extra keyword
            arguments for :func:`solve_fokker_planck`.
    """
    lr, batch_size, steps, method = _check_inputs(problem, model, lr, batch_size, steps, method)
    num_points = check_int("num_points", num_points, minimum=2)
    noise_scale = check_float("noise_scale", noise_scale, minimum=0.0)
    obs = resolve_observables(observables)
    if method == "ode":
        bad = [o.name for o in obs if o.name not in _ODE_OBSERVABLES]
        if bad:
            raise ValueError(f"observables for method 'ode' (linear model, E9) must be among {_ODE_OBSERVABLES}; got {bad}")
    gamma = effective_step(model, lr)
    d = problem.dim
    problem64 = problem.to(dtype=torch.float64)
    columns = coordinate_columns(problem64, model)
    k = _output_steps(steps, num_points, columns.device)
    t = k.to(dtype) / d
    info: dict[str, Any] = {
        "method": method, "lr": lr, "gamma": gamma, "batch_size": batch_size, "dim": d, "noise_std": problem.noise_std,
        "noise_scale": noise_scale,
    }

    def dynamics(types: CoordinateTypes) -> MeanFieldDynamics:
        return MeanFieldDynamics(types.to(dtype=dtype), gamma, batch_size, problem.noise_std, noise_scale,
                                 float(model.lr_scale))

    stderr: dict[str, Tensor] = {}
    if _at_global_minimum(columns, problem.noise_std):
        # R(0) = 0: every residual and the label noise vanish, so every per-sample gradient is zero and
        # SGD, E3 and E6 all stay at the initial point (a relative blow-up test would be meaningless).
        values = measure(problem64, model, [o.name for o in obs])
        curves = {n: v.to(dtype).expand(t.numel()).clone() for n, v in values.items()}
        info["solver"] = "fixed_point"
        return Prediction(k, t, curves, torch.zeros_like(t), None, stderr, info)
    if method == "pde" and noise_scale == 0:
        method = "gradient_flow"  # zero diffusion: the law stays a delta on the ODE path (exact)
    info["solver"] = method
    control = dict(tol=tol, max_types=max_types, noise_std=problem.noise_std)
    if method == "pde":
        terms, check = _solve_pde(columns, dynamics, t, control, dict(blowup_factor=blowup_factor,
                                  dim=d if step_stability else None, **(solver_options or {})))
        curves, rate = _combine([(a, _pde_outputs(sol, obs, gamma, batch_size, noise_scale)) for a, sol in terms])
        head = terms[0][1]
        diverged_at = head.diverged_at
        grid_estimate = head.error_estimate
        info.update(num_cells=int(head.xi.numel()), operator_evaluations=sum(sol.nfe for _, sol in terms),
                    tail_mass=head.tail_mass, grid_combination=len(terms) > 1,
                    error_estimates={"grid": grid_estimate, "types": check.estimate},
                    error_estimate=None if grid_estimate is None else grid_estimate + check.estimate)
    elif method == "particles":
        types = exact_types(columns, max_types=columns.shape[0])
        num_particles = check_int("num_particles", num_particles, minimum=types.num_types)  # at least one per type
        ps = simulate_particles(dynamics(types), t, obs, num_particles=num_particles // types.num_types,
                                num_replicas=num_replicas, dt=dt, extrapolate=extrapolate, generator=generator,
                                blowup_factor=blowup_factor)
        curves, stderr, rate, diverged_at = ps.values, ps.stderr, ps.local_rate, ps.diverged_at
        check = TypeCheck(None, types, 0.0, 1, types.num_types)  # exact coordinates: no type error
        info.update(num_particles=num_particles, num_replicas=num_replicas, dt=dt, extrapolate=extrapolate)
    elif method == "gradient_flow":
        def solve_gf(types: CoordinateTypes) -> TypeSolve:
            c, w = gradient_flow(dynamics(types), t)
            per_type = torch.stack([(OBSERVABLES[n].density(c) * w).sum(-1) for n in ("risk", "curvature")])
            return TypeSolve((c, w), per_type, None)

        check = _controlled(columns, solve_gf, t, control)
        c, w = check.solve.result
        curves = observable_values(c, w, obs, problem.noise_std)
        risk = observable_values(c, w, (OBSERVABLES["risk"],), problem.noise_std)["risk"]
        rate = e8_local_rate(c, w, gamma, batch_size, risk, noise_scale=0.0)
        diverged_at = None
        info.update(error_estimates={"types": check.estimate}, error_estimate=check.estimate)
    else:
        def solve_linear(types: CoordinateTypes) -> TypeSolve:
            res = _predict_linear(types.to(dtype=dtype), gamma, batch_size, problem.noise_std, t, blowup_factor)
            return TypeSolve(res, res[3], res[2])

        check = _controlled(columns, solve_linear, t, control)
        values, rate, diverged_at, _ = check.solve.result
        curves = {o.name: values[o.name] for o in obs}
        info.update(error_estimates={"types": check.estimate}, error_estimate=check.estimate)
    info.update(num_types=check.types.num_types, types_exact=check.types.exact, type_solves=check.solves)
    divergence_step = None
    if diverged_at is not None:
        divergence_step = int(round(diverged_at * d))
        after = t >= diverged_at
        curves = {n: torch.where(after, torch.full_like(v, float("nan")), v) for n, v in curves.items()}
        rate = torch.where(after, torch.full_like(rate, float("nan")), rate)
    return Prediction(k, t, dict(curves), rate, divergence_step, stderr, info)


def _at_global_minimum(columns: Tensor, noise_std: float) -> bool:
    """Whether ``R(0) = 0`` exactly: no label noise and ``beta0 = beta*`` wherever ``lambda > 0`` (``columns``: ``(d, 4)``)."""
    lam, bstar, u0, v0 = columns.unbind(1)
    return noise_std == 0 and bool(((u0 * v0 - bstar) * lam == 0).all())


def _controlled(columns: Tensor, solve, t: Tensor, control: dict[str, Any]) -> TypeCheck:
    """:func:`solve_with_type_control` at ``control["tol"] / 2`` (the other half is the solver's), warning when a
    cap stops the type refinement above it."""
    check = solve_with_type_control(columns, solve, t, tol=0.5 * control["tol"], max_types=control["max_types"],
                                    noise_std=control["noise_std"])
    if check.estimate > 0.5 * control["tol"]:
        warnings.warn(f"predict: estimated relative error {check.estimate:.2g} of the type quadrature exceeds "
                      f"tol/2 = {0.5 * control['tol']:g} with {check.types.num_types} types ({check.solves} solves, "
                      f"max_types={control['max_types']}); raise max_types or relax tol", RuntimeWarning, stacklevel=3)
    return check


def _solve_pde(columns: Tensor, dynamics, t: Tensor, control: dict[str, Any], options: dict[str, Any]):
    """E6 with both error sources controlled: types at grid level 0, then the grid at the final types.

    Returns ``[(coefficient, FokkerPlanckSolution), ...]`` whose combination of outputs is the answer (one
    solve, or the grid combination of :func:`refine_grid_on_subset`; the first term's ``error_estimate`` is the
    grid's) and the :class:`TypeCheck`.  ``options``: keywords of :func:`solve_fokker_planck`; ``num_cells``
    (one grid) or ``refine=False`` (the a priori grid) skip the grid check.
    """
    options = dict(options)
    tol = control["tol"]
    num_cells, refine = options.pop("num_cells", None), options.pop("refine", True)
    step_tol = options.pop("step_tol", None)
    refine_keys = ("max_cells", "max_evaluations", "estimate_floor")
    refine_opts = {key: options.pop(key) for key in refine_keys if key in options}
    opts = {"half_width": 12.0, **options}
    if num_cells is not None:
        n, st = int(num_cells), (step_tol if step_tol is not None else tol)
    elif not refine:
        n, st = grid_level(tol, opts["half_width"], step_tol, 2, refine_opts.get("max_cells", 4096))
    else:
        n, st = grid_level(tol, opts["half_width"], step_tol, 0, refine_opts.get("max_cells", 4096))

    schedule: list[float] | None = None

    def solve(types: CoordinateTypes) -> TypeSolve:
        # every type solve replays the first one's time steps: their differences are then the types' alone
        nonlocal schedule
        sol = solve_on_grid(dynamics(types), t, n, st, schedule=schedule, **opts)
        schedule = sol.schedule if schedule is None else schedule
        return TypeSolve(sol, sol.type_curves(), sol.diverged_at)

    check = _controlled(columns, solve, t, control)
    sol = check.solve.result
    if num_cells is not None or not refine:
        return [(1.0, sol)], check
    grid = {**dict(max_cells=4096, max_evaluations=40_000, estimate_floor=1e-3), **refine_opts}
    grid.update(tol=tol, step_tol=step_tol, tol_used=min(check.estimate, 0.5 * tol), **opts)
    if check.first is not None and check.first[1].num_types < check.types.num_types:
        # many types: refine the grid on the first two type sets and combine (refine_grid_on_subset)
        (first, types_s), (coarsest, types_c) = check.first, check.coarsest
        found = refine_grid_on_subset(dynamics(types_s), dynamics(types_c), t, first.result, coarsest.result, **grid)
        if found is not None:
            return [(1.0, found[0]), (1.0, sol), (-1.0, first.result)], check
    return [(1.0, refine_grid(dynamics(check.types), t, sol, **grid))], check


def _pde_outputs(sol, obs, gamma: float, batch_size: int, noise_scale: float) -> tuple[dict[str, Tensor], Tensor]:
    """The E7 curves and the E8 local rate of one Fokker-Planck solution."""
    c, w = sol.points()
    curves = observable_values(c, w, obs, sol.dynamics.noise_std)
    return curves, e8_local_rate(c, w, gamma, batch_size, sol.risk, noise_scale)


def _combine(terms: list[tuple[float, tuple[dict[str, Tensor], Tensor]]]) -> tuple[dict[str, Tensor], Tensor]:
    """``sum_i a_i (curves_i, rate_i)`` (one term: returned as is)."""
    if len(terms) == 1:
        return terms[0][1]
    curves = {n: sum(a * out[0][n] for a, out in terms) for n in terms[0][1][0]}
    return curves, sum(a * out[1] for a, out in terms)


def _predict_linear(types: CoordinateTypes, gamma, batch_size, noise_std, t, blowup_factor):
    """E9 for the linear model started at ``w0 = beta0`` (module docstring): ``(values, rate, diverged_at, per_type)``.

    ``per_type`` ``(2, n, T)``: each type's contribution to the excess risk and to the distance.
    """
    risk, m = linear_least_squares(types.lam, types.beta_star, types.beta0, types.weight, gamma=gamma,
                                   batch_size=batch_size, noise_std=noise_std, t_out=t)
    dmdt = -2.0 * gamma * types.lam * m + 2.0 * gamma**2 * types.lam * risk[:, None] / batch_size
    rate = -(0.5 * (types.weight * types.lam * dmdt).sum(-1)) / risk
    values = {"risk": risk, "excess_risk": risk - 0.5 * noise_std**2, "distance": (types.weight * m).sum(-1)}
    bad = (~torch.isfinite(risk)) | (risk > blowup_factor * float(risk[0]))
    diverged_at = float(t[int(bad.nonzero()[0, 0])]) if bool(bad.any()) else None
    per_type = torch.stack([0.5 * types.weight * types.lam * m, types.weight * m])
    return values, rate, diverged_at, per_type


@dataclass
class CriticalLR:
    """Predicted critical learning rates (in the network's own ``lr`` units).

    Attributes:
        bounded: largest ``lr`` whose predicted risk stays below ``blowup_factor R(0)`` up to ``steps``.
        decay: (``noise_std = 0`` only) largest ``lr`` for which the predicted risk decays:
            ``R(T) <= decay_fraction R(0)`` and still decreasing at the horizon; else ``None``.
        e8_estimate: the cheap E8 bracket centre (see :func:`critical_lr`).
        rel_tol: relative width of the final bisection brackets.
        evaluations: number of PDE solves.
    """

    bounded: float
    decay: float | None
    e8_estimate: float
    rel_tol: float
    evaluations: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _e8_estimate(problem: TeacherProblem, model: DiagonalLinearNetwork, batch_size: int) -> float:
    """Cheap E8 estimate of the critical ``gamma`` (in ``(u, v)`` units).

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
    batch_size: int,
    steps: int,
    rel_tol: float = 0.02,
    blowup_factor: float = 1e3,
    decay_fraction: float = 0.1,
    tol: float = 3e-3,
    num_points: int = 41,
    max_evaluations: int = 40,
    **predict_kwargs: Any,
) -> CriticalLR:
    """Largest ``lr`` whose PDE-predicted risk stays bounded over ``steps`` SGD steps (THEORY §5).

    The E8 estimate (:func:`_e8_estimate`) centres a bracket that is widened by factors of 2
    until it contains the transition, then bisected (geometrically) until
    ``hi / lo <= 1 + rel_tol``.  With ``noise_std = 0`` a second bisection finds the largest
    ``lr`` whose risk decays (``R(T) <= decay_fraction R(0)`` and ``dR/dt < 0`` at ``T``).
    Boundedness is assumed monotone in ``lr``; decay holds on a window of ``lr`` (too small makes
    no progress within the horizon), so its upper edge is searched below the stability limit and
    ``decay`` is ``None`` when no ``lr`` in ``[bounded / 256, bounded]`` decays within the horizon.
    A horizon so short that nothing diverges up to ``2^20`` times the E8 estimate is a
    ``ValueError``.

    Between the two thresholds the PDE predicts a bounded plateau (the noise keeps the
    support coordinates from converging; with balanced initialization it drives every
    ``beta`` to 0), not a divergence.  Divergence is ``R > blowup_factor R(0)``, an unresolved
    heavy tail of the law, or a coordinate past the discrete-step limit (:func:`predict`).
    """
    _check_inputs(problem, model, 1.0, batch_size, steps, "pde")
    rel_tol = check_float("rel_tol", rel_tol, minimum=0.0, strict=True)
    if _at_global_minimum(coordinate_columns(problem.to(dtype=torch.float64), model), problem.noise_std):
        raise ValueError("the model starts at a global minimizer (R(0) = 0, noise_std = 0): SGD never moves, so every "
                         "lr is stable and there is no critical lr")
    # Only boundedness is asked of each solve: skip the a posteriori grid refinement unless told otherwise.
    solver_options = {"refine": False, **(predict_kwargs.pop("solver_options", None) or {})}
    scale = float(model.lr_scale)
    est = _e8_estimate(problem, model, batch_size) / scale
    count = [0]

    def run(lr: float) -> Prediction:
        count[0] += 1
        if count[0] > max_evaluations:
            raise RuntimeError(f"critical_lr needed more than max_evaluations={max_evaluations} PDE solves")
        return predict(problem, model, lr=lr, batch_size=batch_size, steps=steps, method="pde", observables=("risk",),
                       num_points=num_points, tol=tol, blowup_factor=blowup_factor, solver_options=solver_options,
                       **predict_kwargs)

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
        if bounded(run(est)):
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
        # floor), so look below the stability limit for a decaying lr, then bisect its upper edge.
        hi = limit
        for _ in range(8):
            lo = hi / 2.0
            if decays(run(lo)):
                return bisect(decays, lo, hi)
            hi = lo
        return None  # no lr in [limit / 256, limit] brings R below decay_fraction R(0) within the horizon

    lr_bounded = search_bounded()
    lr_decay = search_decay(lr_bounded) if problem.noise_std == 0 else None
    return CriticalLR(lr_bounded, lr_decay, est, rel_tol, count[0])
