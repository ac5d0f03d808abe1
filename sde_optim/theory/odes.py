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
from .fokker_planck import MeanFieldDynamics

__all__ = ["gradient_flow", "gradient_flow_closed_form", "escape_time", "linear_least_squares", "isotropic_linear_risk"]


def gradient_flow(dynamics: MeanFieldDynamics, t_out: Tensor, *, rtol: float = 1e-10, atol: float = 1e-12) -> tuple[CoordinateState, Tensor]:
    """Gradient-flow trajectory of every type at ``t_out`` ``(n,)``.

    Returns the CoordinateState with fields of shape ``(n, T, 1)`` and the weights ``(T, 1)``
    (one point per type: the law stays a delta without noise).  ``dynamics.noise_scale`` is
    ignored (treated as 0).
    """
    types = dynamics.types
    t_out = torch.as_tensor(t_out, dtype=types.lam.dtype, device=types.lam.device)
    zero = torch.zeros((), dtype=t_out.dtype, device=t_out.device)
    q = dynamics.q0  # constant without noise (E4)

    def rhs(t, x):
        c = dynamics.state(x, q)
        base = -2.0 * dynamics.gamma * dynamics.lam * (c.beta - dynamics.bstar)
        return torch.where(dynamics.is_phi, base, torch.where(dynamics.is_psi, base * dynamics.sign, torch.zeros_like(base)))

    x0 = types.x0[:, None]
    ts = t_out if float(t_out[0]) == 0.0 else torch.cat([zero[None], t_out])
    xs = odeint(rhs, x0, ts, method="dopri5", rtol=rtol, atol=atol)
    if float(t_out[0]) != 0.0:
        xs = xs[1:]
    states = [dynamics.state(x, q) for x in xs]
    stack = lambda name: torch.stack([getattr(s, name).expand_as(x0) for s in states])  # noqa: E731
    c = CoordinateState(dynamics.lam, dynamics.bstar, stack("beta"), stack("rho"), stack("q"), dynamics.param_scale)
    return c, dynamics.weight


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
    lam: Tensor, beta_star: Tensor, w0: Tensor, weight: Tensor, *, gamma: float, batch_size: int, noise_std: float,
    t_out: Tensor, rtol: float = 1e-10, atol: float = 1e-14,
) -> tuple[Tensor, Tensor]:
    """E9: returns ``(R(t), m(t))`` of shapes ``(n,)`` and ``(n, T)`` for types with weights ``pi``.

    All type tensors of shape ``(T,)``; ``m0 = (w0 - beta*)^2``.
    """
    t_out = torch.as_tensor(t_out, dtype=lam.dtype, device=lam.device)
    sigma2 = noise_std**2

    def risk(m):
        return 0.5 * (weight * lam * m).sum(-1) + 0.5 * sigma2

    def rhs(t, m):
        return -2.0 * gamma * lam * m + 2.0 * gamma**2 * lam * risk(m) / batch_size

    m0 = (w0 - beta_star) ** 2
    zero = torch.zeros(1, dtype=t_out.dtype, device=t_out.device)
    ts = t_out if float(t_out[0]) == 0.0 else torch.cat([zero, t_out])
    ms = odeint(rhs, m0, ts, method="dopri5", rtol=rtol, atol=atol)
    if float(t_out[0]) != 0.0:
        ms = ms[1:]
    return risk(ms), ms


def isotropic_linear_risk(t: Tensor, *, risk0: float, gamma: float, batch_size: int, noise_std: float) -> Tensor:
    """Closed form of E9 for ``lam = 1`` (THEORY §5); diverges for ``gamma > 2B``."""
    rate = 2.0 * gamma - gamma**2 / batch_size
    if rate == 0.0:
        return risk0 + gamma * noise_std**2 * t
    r_inf = gamma * noise_std**2 / rate
    return r_inf + (risk0 - r_inf) * torch.exp(-rate * t)
