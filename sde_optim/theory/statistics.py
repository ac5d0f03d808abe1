"""Weighted expectations of the E7 observables and the E8 risk drift over a type ensemble.

Every solver (PDE grid, particles, ODE) represents the mean-field law as points
``c[..., tau, k]`` (cell centres, particles, or one point per type) with weights
``w[tau, k]`` summing to 1 over ``(tau, k)`` (``pi_tau`` times the cell mass or ``1/P``).
A statistic ``(1/d) sum_i g(u_i, v_i, lambda_i, beta*_i)`` converges to
``sum_tau pi_tau int g p_tau`` (THEORY §4), here ``sum_{tau,k} w g(c)``, where ``g`` is the
``density`` of :data:`sde_optim.observables.OBSERVABLES`: predictions and measurements share
one definition.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from ..observables import OBSERVABLES, CoordinateState, Observable

__all__ = ["tiny", "weighted", "expectation", "observable_values", "risk_of", "e8_terms", "e8_local_rate", "finite_d_indicators"]


def tiny(x: Tensor) -> float:
    """The floor that keeps a division by a non-negative quantity of ``x``'s dtype finite: ``1e-300`` in float64, the
    smallest normal number where that underflows (float32: there ``1e-300`` is 0, and a zero ``l1`` at the start made
    its scatter ``0 / 0``)."""
    return max(1e-300, torch.finfo(x.dtype).tiny)


def weighted(values: Tensor, weight: Tensor) -> Tensor:
    """``values * weight`` with exactly 0 where the weight is 0 (broadcast shapes).

    A point without weight adds nothing, even where its density overflows: a wide law's grid reaches
    ``|phi| ~ 300`` (:class:`~sde_optim.theory.dynamics.MeanFieldDynamics` clamps there), where ``beta^2`` is finite
    but ``lambda^2 r^2 rho`` (E8, ``grad_norm``) is ``inf``, and ``inf * 0`` was a ``nan`` curve (THEORY §6 at
    ``lr = 11``, noiseless, ``d = 4096``: the E8 rate and ``grad_norm`` were ``nan`` from ``t = 2.45`` on).
    """
    return torch.where(weight == 0, 0.0, values * weight)


def expectation(values: Tensor, weight: Tensor) -> Tensor:
    """``sum_{tau,k} w[tau,k] values[..., tau, k]`` (zero-weight points add 0, :func:`weighted`): shape ``(...)``."""
    return weighted(values, weight).sum(dim=(-2, -1))


def observable_values(c: CoordinateState, weight: Tensor, observables: Iterable[Observable], noise_std: float) -> dict[str, Tensor]:
    """``offset(sigma) + E[density(c)]`` for each observable (E7); values of shape ``(...)``."""
    return {o.name: expectation(o.density(c), weight) + o.offset(noise_std) for o in observables}


def risk_of(c: CoordinateState, weight: Tensor, noise_std: float) -> Tensor:
    """``R = sigma^2/2 + E[lambda r^2 / 2]`` (E1/E6) via the registry's ``risk`` density."""
    o = OBSERVABLES["risk"]
    return expectation(o.density(c), weight) + o.offset(noise_std)


def e8_terms(c: CoordinateState, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(S1, S2, S3)`` of E8: ``E[lam^2 r^2 rho]``, ``E[lam^2 rho^2]``, ``E[lam^2 r beta]`` in ``(u, v)``."""
    lam2 = c.lam * c.lam
    r = c.residual
    s1 = expectation(lam2 * r * r * c.rho, weight)
    s2 = expectation(lam2 * c.rho * c.rho, weight)
    s3 = expectation(lam2 * r * c.beta, weight)
    return s1, s2, s3


def e8_local_rate(c: CoordinateState, weight: Tensor, risk: Tensor, gamma, noise) -> Tensor:
    """Local exponential rate ``-d log R / dt`` from E8 (with E10-E11: ``gamma`` the effective step at each time).

    ``dR/dt = -gamma S1 + nu R (S2 + 2 S3)`` with ``nu = noise_scale^2 gamma^2 / B`` (``noise``; 0 for gradient
    flow).  ``gamma``, ``noise``: numbers or tensors broadcastable to ``risk``'s shape ``(...)``.
    """
    s1, s2, s3 = e8_terms(c, weight)
    drdt = -gamma * s1 + noise * risk * (s2 + 2.0 * s3)
    return -drdt / risk


def finite_d_indicators(c: CoordinateState, weight: Tensor, dim: int, gamma: Tensor, noise_std: float,
                        observables: Iterable[Observable] = (), step_error: float = 1.0,
                        kappa: Tensor | float = 0.0) -> dict[str, Tensor]:
    """First-order effects of a finite ``d`` that the limit leaves out, shape ``(...)``: the scatter of the risk, the
    curvature and ``observables``, the step index of the risk and the curvature.

    Points ``c[..., tau, k]`` carry one law per type ``tau`` (weights ``w``, ``pi_tau = sum_k w``); ``gamma``: the
    effective step at each time, broadcastable to ``(...)``.

    * ``"<name>_scatter"``: one run's relative deviation from the limit through its coordinates' independent
      fluctuations, ``sqrt(sum_tau pi_tau Var_tau[g] / d) / (offset + E[g])`` (``g`` the E7 density): the spread
      within a type's law is SGD's noise; the spread between types is the problem's own, the same in every run.
      When a few coordinates carry the observable it does not average out (THEORY §1: the limit needs many
      coordinates to contribute, none dominating).
    * ``"<name>_step"``: the ``g``-weighted mean of ``gamma lambda rho / d``, one SGD step of a coordinate in units
      of its own curvature (E3 is the limit of small steps: a coordinate's drift per unit time is off by a relative
      amount of this order; 2 is where it diverges, :func:`~sde_optim.theory.predict`'s step stability), plus
      weight decay's own contraction per step ``kappa / d = lr_eff wd`` (E12; ``kappa`` at each time like
      ``gamma``), times ``step_error``: with momentum, the drift error of E11 at the same effective step is
      :attr:`~sde_optim.theory.SGDConfig.step_error_factor` times plain SGD's (19 at momentum 0.9).
    """
    out = {}
    decay = torch.as_tensor(kappa, dtype=c.rho.dtype, device=c.rho.device)
    step = (step_error / dim) * (gamma[..., None, None] * c.lam * c.rho + decay.reshape(*decay.shape, 1, 1))
    pi = weight.sum(-1)
    for o in {o.name: o for o in (OBSERVABLES["risk"], OBSERVABLES["curvature"], *observables)}.values():
        g = o.density(c)
        gw = weighted(g, weight)
        m1, m2 = gw.sum(-1), weighted(g, gw).sum(-1)
        within = (m2 - m1 * m1 / pi.clamp_min(tiny(pi))).clamp_min(0.0).sum(-1)
        total = m1.sum(-1)
        out[f"{o.name}_scatter"] = (within / dim).sqrt() / (total + o.offset(noise_std)).abs().clamp_min(tiny(total))
        if o.name in ("risk", "curvature"):
            out[f"{o.name}_step"] = (step * gw).sum(dim=(-2, -1)) / total.abs().clamp_min(tiny(total))
    return out
