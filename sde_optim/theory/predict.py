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
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch
from torch import Tensor

from .._validation import check_choice, check_float, check_int
from ..models import DiagonalLinearNetwork
from ..observables import OBSERVABLES, resolve_observables
from ..teacher import TeacherProblem
from .fokker_planck import MeanFieldDynamics, solve_fokker_planck
from .odes import gradient_flow, linear_least_squares
from .particles import simulate_particles
from .statistics import e8_local_rate, observable_values
from .types import CoordinateTypes, coordinate_types, effective_step

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
    max_types: int = 128,
    tol: float = 1e-3,
    num_particles: int = 10_000,
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
        max_types: type budget (:func:`coordinate_types`).  128 by default: on the benchmark's
            Gaussian teacher (continuous ``beta*``, two-level spectrum, d = 16384) the curvature
            error against SGD is 2.7 % with 64 types and 1.2 % with 128 (the PDE costs ~2x).
        tol: PDE accuracy target: relative error of ``R`` and ``C``, estimated a posteriori and met
            by refining the grid (:func:`solve_fokker_planck`; ``info["error_estimate"]``).  num_particles (per type and replica),
            num_replicas, dt, extrapolate (Richardson in ``dt``): particle method (:func:`simulate_particles`).
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
    problem64 = problem.to(dtype=dtype)
    types = coordinate_types(problem64, model, max_types=max_types).to(dtype=dtype)
    dyn = MeanFieldDynamics(types, gamma, batch_size, problem.noise_std, noise_scale, float(model.lr_scale))
    k = _output_steps(steps, num_points, types.lam.device)
    t = k.to(dtype) / d
    info: dict[str, Any] = {
        "method": method, "lr": lr, "gamma": gamma, "batch_size": batch_size, "dim": d, "noise_std": problem.noise_std,
        "num_types": types.num_types, "types_exact": types.exact, "binning_error": types.binning_error,
        "noise_scale": noise_scale,
    }
    stderr: dict[str, Tensor] = {}
    if _at_global_minimum(types, problem.noise_std):
        # R(0) = 0: every residual and the label noise vanish, so every per-sample gradient is zero and
        # SGD, E3 and E6 all stay at the initial point (a relative blow-up test would be meaningless).
        c0 = types.initial_state(float(model.lr_scale))
        col = lambda z: z[:, None]  # noqa: E731
        c0 = type(c0)(col(c0.lam), col(c0.beta_star), col(c0.beta), col(c0.rho), col(c0.q), c0.param_scale)
        values = observable_values(c0, col(types.weight), obs, problem.noise_std)
        curves = {n: v.expand(t.numel()).clone() for n, v in values.items()}
        info["solver"] = "fixed_point"
        return Prediction(k, t, curves, torch.zeros_like(t), None, stderr, info)
    if method == "pde" and noise_scale == 0:
        method = "gradient_flow"  # zero diffusion: the law stays a delta on the ODE path (exact)
    info["solver"] = method
    if method == "pde":
        sol = solve_fokker_planck(dyn, t, tol=tol, blowup_factor=blowup_factor, dim=d if step_stability else None,
                                  **(solver_options or {}))
        c, w = sol.points()
        curves = observable_values(c, w, obs, problem.noise_std)
        rate = e8_local_rate(c, w, gamma, batch_size, sol.risk, noise_scale)
        diverged_at = sol.diverged_at
        info.update(num_cells=int(sol.xi.numel()), operator_evaluations=sol.nfe, tail_mass=sol.tail_mass,
                    error_estimate=sol.error_estimate)
    elif method == "particles":
        ps = simulate_particles(dyn, t, obs, num_particles=num_particles, num_replicas=num_replicas, dt=dt,
                                extrapolate=extrapolate,
                                generator=generator, blowup_factor=blowup_factor)
        curves, stderr, rate, diverged_at = ps.values, ps.stderr, ps.local_rate, ps.diverged_at
        info.update(num_particles=num_particles, num_replicas=num_replicas, dt=dt, extrapolate=extrapolate)
    elif method == "gradient_flow":
        c, w = gradient_flow(dyn, t)
        curves = observable_values(c, w, obs, problem.noise_std)
        risk = observable_values(c, w, (OBSERVABLES["risk"],), problem.noise_std)["risk"]
        rate = e8_local_rate(c, w, gamma, batch_size, risk, noise_scale=0.0)
        diverged_at = None
    else:
        curves, rate, diverged_at = _predict_linear(types, gamma, batch_size, problem.noise_std, t, obs, blowup_factor)
    divergence_step = None
    if diverged_at is not None:
        divergence_step = int(round(diverged_at * d))
        after = t >= diverged_at
        curves = {n: torch.where(after, torch.full_like(v, float("nan")), v) for n, v in curves.items()}
        rate = torch.where(after, torch.full_like(rate, float("nan")), rate)
    return Prediction(k, t, dict(curves), rate, divergence_step, stderr, info)


def _at_global_minimum(types: CoordinateTypes, noise_std: float) -> bool:
    """Whether ``R(0) = 0`` exactly: no label noise and ``beta0 = beta*`` wherever ``lambda > 0``."""
    return noise_std == 0 and bool(((types.beta0 - types.beta_star) * types.lam == 0).all())


def _predict_linear(types: CoordinateTypes, gamma, batch_size, noise_std, t, obs, blowup_factor):
    """E9 curves for the linear model started at ``w0 = beta0`` (see module docstring)."""
    risk, m = linear_least_squares(types.lam, types.beta_star, types.beta0, types.weight, gamma=gamma,
                                   batch_size=batch_size, noise_std=noise_std, t_out=t)
    dmdt = -2.0 * gamma * types.lam * m + 2.0 * gamma**2 * types.lam * risk[:, None] / batch_size
    rate = -(0.5 * (types.weight * types.lam * dmdt).sum(-1)) / risk
    values = {"risk": risk, "excess_risk": risk - 0.5 * noise_std**2, "distance": (types.weight * m).sum(-1)}
    bad = (~torch.isfinite(risk)) | (risk > blowup_factor * float(risk[0]))
    diverged_at = float(t[int(bad.nonzero()[0, 0])]) if bool(bad.any()) else None
    return {o.name: values[o.name] for o in obs}, rate, diverged_at


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
    if _at_global_minimum(coordinate_types(problem.to(dtype=torch.float64), model), problem.noise_std):
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
