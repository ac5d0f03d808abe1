"""Optimality statistics of THEORY E7, each defined once.

Every observable is ``offset + mean_i g(c_i)`` over coordinates ``i`` for a per-coordinate
function ``g`` of a :class:`CoordinateState`. Measurement (``measure``: the mean over the
network's coordinates) and prediction (the theory's weighted integral over coordinate
types, ``sum_tau pi_tau int g p_tau dphi``) both call the same ``g``, so the two can never
silently disagree about what "curvature" or "l1" means.

All quantities are in ``(u, v)`` coordinates (THEORY §3): ``beta = u v``,
``rho = u^2 + v^2``, ``q = u^2 - v^2``. ``param_scale`` is ``J^T J`` of the map from the
network's own parameters to ``(u, v)`` (1 for ``"uv"``, 2 for ``"pm"``), which multiplies
the Hessian trace and the squared gradient norm measured in the network's parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor

__all__ = ["CoordinateState", "Observable", "OBSERVABLES", "measure", "resolve_observables", "coordinate_state",
           "relative_error"]


def relative_error(measured: float, predicted: float) -> float:
    """The logged ``{obs}/rel_error``: ``|m - p| / |p|``; 0 when both vanish (e.g. l1 at a zero initialization:
    the PDE gives ~1e-14 there), inf when only p does. Observables are O(1) in THEORY's normalization, so a
    difference below 1e-12 is rounding."""
    diff = abs(measured - predicted)
    if diff <= 1e-12:
        return 0.0
    return diff / abs(predicted) if predicted != 0 else float("inf")


@dataclass(frozen=True)
class CoordinateState:
    """Per-coordinate quantities, all broadcastable to one shape ``(..., n)``.

    Attributes:
        lam: ``lambda_i`` (THEORY §1 scaling, ``lambda = d * feature_variance``).
        beta_star: teacher coefficient ``beta*_i``.
        beta: current ``beta_i = u_i v_i``.
        rho: ``u_i^2 + v_i^2``.
        q: imbalance ``u_i^2 - v_i^2``.
        param_scale: ``J^T J`` factor of the network's parametrization (float).
    """

    lam: Tensor
    beta_star: Tensor
    beta: Tensor
    rho: Tensor
    q: Tensor
    param_scale: float = 1.0

    @property
    def residual(self) -> Tensor:
        """``r = beta - beta*``."""
        return self.beta - self.beta_star

    @classmethod
    def from_uv(cls, lam: Tensor, beta_star: Tensor, u: Tensor, v: Tensor, param_scale: float = 1.0) -> "CoordinateState":
        """The state of coordinates ``(u, v)`` (any broadcastable shapes): ``beta = u v``, ``rho = u^2 + v^2``,
        ``q = u^2 - v^2`` (THEORY §3)."""
        uu, vv = u * u, v * v
        return cls(lam, beta_star, u * v, uu + vv, uu - vv, param_scale)


@dataclass(frozen=True)
class Observable:
    """One statistic of E7: ``value = offset(noise_std) + mean_i density(c_i)``.

    Attributes:
        name: tag used in predictions, logs and figures.
        density: per-coordinate ``g(c)``; returns a tensor of the broadcast shape.
        description: one line with the formula (for docs and figure titles).
        log_scale: whether plots should use a log axis.
        noise_offset: if true, ``sigma^2 / 2`` is added (the risk).
    """

    name: str
    density: Callable[[CoordinateState], Tensor]
    description: str
    log_scale: bool = False
    noise_offset: bool = False

    def offset(self, noise_std: float) -> float:
        return 0.5 * noise_std**2 if self.noise_offset else 0.0


# Support-recovery thresholds (E7): an off-support coordinate counts as recovered when
# |beta_i| < SUPPORT_TOL, an on-support one when |beta_i - beta*_i| < SUPPORT_TOL * |beta*_i|.
SUPPORT_TOL = 0.1


def _support_density(c: CoordinateState) -> Tensor:
    on = c.beta_star != 0
    off_ok = (~on) & (c.beta.abs() < SUPPORT_TOL)
    on_ok = on & ((c.beta - c.beta_star).abs() < SUPPORT_TOL * c.beta_star.abs())
    return (off_ok | on_ok).to(c.beta.dtype)


OBSERVABLES: dict[str, Observable] = {
    o.name: o
    for o in (
        Observable("risk", lambda c: 0.5 * c.lam * c.residual**2,
                   "R = sigma^2/2 + (1/2d) sum lambda (beta - beta*)^2  (E1)", log_scale=True, noise_offset=True),
        Observable("excess_risk", lambda c: 0.5 * c.lam * c.residual**2,
                   "R - sigma^2/2  (E1)", log_scale=True),
        Observable("curvature", lambda c: c.param_scale * c.lam * c.rho,
                   "Hessian trace of R: (1/d) sum lambda (u^2 + v^2)  (E7)"),
        Observable("distance", lambda c: c.residual**2,
                   "(1/d) ||beta - beta*||^2  (E7)", log_scale=True),
        Observable("l1", lambda c: c.beta.abs(), "(1/d) ||beta||_1  (E7)"),
        Observable("imbalance", lambda c: c.q.abs(), "(1/d) sum |u^2 - v^2|  (E4, E7)", log_scale=True),
        Observable("support_recovery", _support_density,
                   f"fraction of coordinates recovered (|beta| < {SUPPORT_TOL} off support, "
                   f"within {SUPPORT_TOL:.0%} of beta* on it)  (E7)"),
        Observable("grad_norm", lambda c: c.param_scale * c.lam**2 * c.residual**2 * c.rho,
                   "d ||grad_theta R||^2 = (1/d) sum lambda^2 r^2 rho  (E7)", log_scale=True),
    )
}

DEFAULT_OBSERVABLES = ("risk", "curvature")


def resolve_observables(names: str | Iterable[str] | None) -> tuple[Observable, ...]:
    """Observables by name; ``None`` gives :data:`DEFAULT_OBSERVABLES`, ``"all"`` every one."""
    if names is None:
        names = DEFAULT_OBSERVABLES
    elif names == "all":
        names = tuple(OBSERVABLES)
    elif isinstance(names, str):
        names = (names,)
    out = []
    for n in names:
        if n not in OBSERVABLES:
            raise ValueError(f"observables must be names from {sorted(OBSERVABLES)} (or 'all'); got {n!r}")
        out.append(OBSERVABLES[n])
    return tuple(out)


def coordinate_state(problem, model) -> CoordinateState:
    """The :class:`CoordinateState` of a depth-2 ``DiagonalLinearNetwork`` on a ``TeacherProblem``.

    Shapes ``(d,)``, in the problem's dtype and on the model's device; detached.
    """
    if model.dim != problem.dim:
        raise ValueError(f"model.dim ({model.dim}) must equal problem.dim ({problem.dim})")
    u, v = model.uv_state()
    dtype = problem.dtype
    u, v = u.to(dtype), v.to(dtype)
    return CoordinateState.from_uv(problem.spectrum.to(u.device), problem.beta_star.to(u.device), u, v, model.lr_scale)


@torch.no_grad()
def measure(problem, model, observables: str | Iterable[str] | None = None) -> dict[str, Tensor]:
    """Exact values of the observables for the current network (THEORY E7).

    Returns 0-d tensors on the model's device (no host sync), keyed by observable name.
    """
    c = coordinate_state(problem, model)
    return {o.name: o.density(c).mean() + o.offset(problem.noise_std) for o in resolve_observables(observables)}
