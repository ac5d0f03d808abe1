"""Deterministic ODE limits: gradient flow (THEORY §5) and linear least squares (E9).

* :func:`gradient_flow` -- noise scale 0 in E4-E6: ``q`` is constant and each type follows
  ``dphi/dt = -2 gamma lam (beta - beta*)`` (mirror descent with the hyperbolic-entropy
  potential; for balanced types ``dpsi/dt = -2 gamma lam (beta - beta*) sgn(beta)``).
  Solved with :func:`torchdiffeq.odeint` (dopri5).
* :func:`gradient_flow_closed_form` -- the same ODE solved exactly for one coordinate:
  with ``w = e^phi``, ``dw/dt = c w - (k/2)(w^2 - 1)`` (``c = 2 gamma lam beta*``,
  ``k = gamma lam |q|``) is a constant-coefficient Riccati equation, so
  ``(w - w+)/(w - w-) = const * exp(-sqrt(c^2 + k^2) t)`` with ``w+- = (c +- sqrt(c^2+k^2))/k``.
  As ``|q| -> 0`` a support coordinate jumps from 0 to ``beta*`` around
  ``t_esc = log(4|beta*|/|q|) / (2 gamma lam |beta*|)`` (incremental learning, the small
  initialization limit).
* :func:`linear_least_squares` -- E9 for the linear model ``f(x) = <x, w>``:
  ``dm/dt = -2 gamma lam m + 2 gamma^2 lam R / B``, ``R = sum pi lam m / 2 + sigma^2/2``;
  :func:`isotropic_linear_risk` its closed form for ``lam = 1``:
  ``R(t) = R_inf + (R0 - R_inf) exp(-(2 gamma - gamma^2/B) t)``, ``R_inf = sigma^2/(2 - gamma/B)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchdiffeq import odeint

from ..observables import CoordinateState
from .dynamics import Coefficients, MeanFieldDynamics

__all__ = ["gradient_flow", "gradient_flow_closed_form", "escape_time", "linear_least_squares", "isotropic_linear_risk",
           "odeint_piecewise"]


def gradient_flow(dynamics: MeanFieldDynamics, t_out: Tensor, *, rtol: float = 1e-10, atol: float = 1e-12) -> tuple[CoordinateState, Tensor]:
    """Gradient-flow trajectory of every type at ``t_out`` ``(n,)``.

    Returns the CoordinateState with fields of shape ``(n, T, 1)`` and the weights ``(T, 1)``
    (one point per type: the law stays a delta without noise).  The noise is ignored (treated as 0);
    schedules (E10), the momentum-effective step (E11) and weight decay (E12: ``q = q0 e^{-2K(t)}``,
    ``-2 kappa`` on balanced types) are not.
    """
    types = dynamics.types
    coef = dynamics.coef
    t_out = torch.as_tensor(t_out, dtype=types.lam.dtype, device=types.lam.device)
    zero = torch.zeros((), dtype=t_out.dtype)

    def rhs(t: float, x: Tensor, side: int) -> Tensor:
        q = dynamics.q(zero, t)  # no noise: only weight decay shrinks q (E4, E12)
        c = dynamics.state(x, q)
        base = -2.0 * coef.gamma(t, side) * dynamics.lam * (c.beta - dynamics.bstar)
        psi = base * dynamics.sign - 2.0 * coef.kappa(t, side)
        return torch.where(dynamics.is_phi, base, torch.where(dynamics.is_psi, psi, torch.zeros_like(base)))

    x0 = types.x0[:, None]
    xs = odeint_piecewise(rhs, x0, t_out, coef.breakpoints, rtol=rtol, atol=atol)
    states = [dynamics.state(x, dynamics.q(zero, float(t))) for x, t in zip(xs, t_out)]
    stack = lambda name: torch.stack([getattr(s, name).expand_as(x0) for s in states])  # noqa: E731
    c = CoordinateState(dynamics.lam, dynamics.bstar, stack("beta"), stack("rho"), stack("q"), dynamics.param_scale)
    return c, dynamics.weight


def odeint_piecewise(rhs, y0: Tensor, t_out: Tensor, breakpoints: list[float], *, rtol: float, atol: float) -> Tensor:
    """``y(t_out)`` ``(n, ...)`` of ``y' = rhs(t, y, side)`` from ``y(0) = y0``, solved by :func:`torchdiffeq.odeint`
    (dopri5) on each interval between the ``breakpoints`` (schedule jumps, E10), so no step straddles a jump:
    ``side`` is +1 inside an interval and -1 at its right end (the value before the jump)."""
    t_list = [float(x) for x in t_out]
    edges = [0.0] + [b for b in breakpoints if 0.0 < b < t_list[-1]] + [t_list[-1]]
    out: dict[int, Tensor] = {}
    y = y0
    for a, b in zip(edges[:-1], edges[1:]):
        inner = [k for k, x in enumerate(t_list) if a <= x <= b and k not in out]
        ts = sorted({a, b} | {t_list[k] for k in inner})
        if len(ts) < 2:
            continue

        def f(t, z, b=b):
            return rhs(float(t), z, -1 if float(t) >= b else 1)

        ys = odeint(f, y, torch.tensor(ts, dtype=t_out.dtype), method="dopri5", rtol=rtol, atol=atol)
        for k in inner:
            out[k] = ys[ts.index(t_list[k])]
        y = ys[-1]
    for k, x in enumerate(t_list):
        if k not in out:  # times at 0 (or a single point)
            out[k] = y0
    return torch.stack([out[k] for k in range(len(t_list))])


def gradient_flow_closed_form(t: Tensor, *, gamma: float, lam: float, beta_star: float, q: float, phi0: float) -> Tensor:
    """Exact ``phi(t)`` of ``dphi/dt = 2 gamma lam beta* - gamma lam |q| sinh(phi)`` (``q != 0``)."""
    c = 2.0 * gamma * lam * beta_star
    k = gamma * lam * abs(q)
    root = math.sqrt(c * c + k * k)
    w_plus, w_minus = (c + root) / k, (c - root) / k
    w0 = math.exp(phi0)
    ratio0 = (w0 - w_plus) / (w0 - w_minus)
    ratio = ratio0 * torch.exp(-root * t)
    w = (w_plus - ratio * w_minus) / (1.0 - ratio)
    return torch.log(w)


def escape_time(*, gamma: float, lam: float, beta_star: float, q: float) -> float:
    """Small-initialization escape time ``log(4|beta*|/|q|) / (2 gamma lam |beta*|)`` (leading order)."""
    return math.log(4.0 * abs(beta_star) / abs(q)) / (2.0 * gamma * lam * abs(beta_star))


def linear_least_squares(
    lam: Tensor, beta_star: Tensor, w0: Tensor, weight: Tensor, *, gamma: float | Coefficients, batch_size: int = 1,
    noise_std: float, t_out: Tensor, rtol: float = 1e-10, atol: float = 1e-14,
) -> tuple[Tensor, Tensor]:
    """E9: returns ``(R(t), m(t))`` of shapes ``(n,)`` and ``(n, T)`` for types with weights ``pi``.

    All type tensors of shape ``(T,)``; ``m0 = (w0 - beta*)^2``.  ``gamma``: the step (with ``batch_size``), or
    :class:`Coefficients` for schedules and momentum (E10-E11): ``dm/dt = -2 gamma(t) lam m + 2 nu(t) lam R``.
    """
    t_out = torch.as_tensor(t_out, dtype=lam.dtype, device=lam.device)
    coef = gamma if isinstance(gamma, Coefficients) else Coefficients.constant(float(gamma), batch_size)
    sigma2 = noise_std**2

    def risk(m):
        return 0.5 * (weight * lam * m).sum(-1) + 0.5 * sigma2

    def rhs(t, m, side):
        return -2.0 * coef.gamma(t, side) * lam * m + 2.0 * coef.noise(t, side) * lam * risk(m)

    ms = odeint_piecewise(rhs, (w0 - beta_star) ** 2, t_out, coef.breakpoints, rtol=rtol, atol=atol)
    return risk(ms), ms


def isotropic_linear_risk(t: Tensor, *, risk0: float, gamma: float, batch_size: int, noise_std: float) -> Tensor:
    """Closed form of E9 for ``lam = 1`` (THEORY §5); diverges for ``gamma > 2B``."""
    rate = 2.0 * gamma - gamma**2 / batch_size
    if rate == 0.0:
        return risk0 + gamma * noise_std**2 * t
    r_inf = gamma * noise_std**2 / rate
    return r_inf + (risk0 - r_inf) * torch.exp(-rate * t)
