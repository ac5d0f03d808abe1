"""Particle method: Euler-Maruyama of the mean-field SDE E4-E5 (THEORY §4).

``P`` particles per type, each following

    dx = a_tau(x, t) dt + sqrt(2 D_tau(t)) dW,      D_tau = 4 gamma^2 lam R(t) / B

(``x = phi`` of E5, or ``psi = log|beta|`` for balanced types), with ``q_tau`` from E4 and the
risk ``R(t)`` computed from the particles themselves (McKean-Vlasov).  This is the unbiased
Monte Carlo of the PDE E6 up to the ``O(dt)`` weak error of Euler-Maruyama and the
``O(1/sqrt(P))`` statistical error, which :class:`ParticleSolution` reports as standard errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor

from .._validation import check_float, check_int
from ..observables import Observable
from .fokker_planck import MeanFieldDynamics
from .statistics import e8_local_rate, observable_values

__all__ = ["ParticleSolution", "simulate_particles"]


@dataclass
class ParticleSolution:
    """Observable curves from the particle method.

    Attributes:
        t: output times ``(n,)``.
        values: observable name -> ``(n,)`` curve (mean over replicas).
        stderr: observable name -> ``(n,)`` Monte Carlo standard error of ``values``.  With
            ``K >= 2`` replicas it is ``std_K / sqrt(K)`` of the independent replica curves,
            which includes the McKean-Vlasov feedback (each replica's fluctuations of ``R``
            move all its particles); with one replica it is the i.i.d. value
            ``sqrt(sum_tau pi_tau^2 Var_tau[g] / P)``, which ignores that feedback.
        replicas: observable name -> ``(K, n)`` per-replica curves.
        local_rate: ``-d log R/dt`` from E8 ``(n,)`` (replica mean).
        diverged_at: first output time at which a replica's ``R`` exceeded ``blowup_factor R(0)``.
    """

    t: Tensor
    values: dict[str, Tensor]
    stderr: dict[str, Tensor]
    replicas: dict[str, Tensor]
    local_rate: Tensor
    diverged_at: float | None


def simulate_particles(
    dynamics: MeanFieldDynamics,
    t_out: Tensor,
    observables: Iterable[Observable],
    *,
    num_particles: int = 10_000,
    num_replicas: int = 1,
    dt: float = 2e-3,
    generator: torch.Generator | None = None,
    blowup_factor: float = 1e4,
) -> ParticleSolution:
    """Euler-Maruyama of E4-E5 with ``num_particles`` per type and replica, outputs at ``t_out``.

    ``num_replicas`` independent particle systems (each with its own ``R(t)``) run as one
    batch.  Each interval between output times is split into equal steps of at most ``dt``.
    ``generator`` (on the types' device) makes the run reproducible.
    """
    num_particles = check_int("num_particles", num_particles, minimum=2)
    num_replicas = check_int("num_replicas", num_replicas, minimum=1)
    dt = check_float("dt", dt, minimum=0.0, strict=True)
    observables = tuple(observables)
    types = dynamics.types
    dtype, dev = types.lam.dtype, types.lam.device
    t_out = torch.as_tensor(t_out, dtype=dtype, device=dev)
    if t_out.ndim != 1 or bool((t_out[1:] <= t_out[:-1]).any()) or float(t_out[0]) < 0:
        raise ValueError("t_out must be a 1-d increasing tensor of times >= 0")
    n_types, K, P = types.num_types, num_replicas, num_particles
    x = types.x0[None, :, None].expand(K, n_types, P).clone()  # (K, T, P)
    weight = dynamics.weight / P  # (T, 1)
    integral = torch.zeros(K, 1, 1, dtype=dtype, device=dev)
    t = 0.0
    per_rep: dict[str, list[Tensor]] = {o.name: [] for o in observables}
    iid_se: dict[str, list[Tensor]] = {o.name: [] for o in observables}
    rates: list[Tensor] = []
    diverged_at = None
    r_ref = None

    def risk_now(c):
        return dynamics.risk(c, weight).reshape(K, 1, 1)

    def is_bad(risk) -> bool:
        return (not bool(torch.isfinite(risk).all())) or (r_ref is not None and float(risk.max()) > blowup_factor * max(r_ref, 1e-300))

    for t_target in t_out.tolist():
        n_steps = max(0, math.ceil((t_target - t) / dt - 1e-9))
        h = (t_target - t) / n_steps if n_steps else 0.0
        for _ in range(n_steps):
            if diverged_at is not None:
                break
            c = dynamics.state(x, dynamics.q(integral))
            risk = risk_now(c)
            if r_ref is None:
                r_ref = float(risk.max())
            if is_bad(risk):
                diverged_at = t_target
                break
            a = dynamics.drift(c.beta, risk)
            noise = torch.randn(x.shape, generator=generator, dtype=dtype, device=dev)
            x = x + a * h + torch.sqrt(2.0 * dynamics.diffusion(risk) * h) * noise
            integral = integral + risk * h
        t = t_target
        c = dynamics.state(x, dynamics.q(integral))
        risk = risk_now(c)
        if r_ref is None:
            r_ref = float(risk.max())
        if diverged_at is None and is_bad(risk):
            diverged_at = t_target
        vals = observable_values(c, weight, observables, dynamics.noise_std)  # each (K,)
        for o in observables:
            per_rep[o.name].append(vals[o.name])
            var = o.density(c).expand_as(x).var(dim=-1)  # (K, T)
            iid_se[o.name].append(torch.sqrt((dynamics.weight[:, 0] ** 2 * var).sum(-1) / P).mean() / math.sqrt(K))
        rates.append(e8_local_rate(c, weight, dynamics.gamma, dynamics.batch_size, risk[:, 0, 0], dynamics.noise_scale).mean())
    replicas = {k: torch.stack(v, dim=1) for k, v in per_rep.items()}  # (K, n)
    values = {k: v.mean(0) for k, v in replicas.items()}
    if K >= 2:
        stderr = {k: v.std(0) / math.sqrt(K) for k, v in replicas.items()}
    else:
        stderr = {k: torch.stack(v) for k, v in iid_se.items()}
    return ParticleSolution(t_out, values, stderr, replicas, torch.stack(rates), diverged_at)
