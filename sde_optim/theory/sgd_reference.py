"""Plain streaming SGD of the depth-2 diagonal network, vectorized over independent runs.

This is the ground truth the theory is tested against: exact minibatch SGD in ``(u, v)``
(THEORY §1) with fresh Gaussian samples every step, ``R`` runs simulated at once as a batch
dimension.  For a ``"pm"`` network, SGD with step ``lr`` is SGD in ``(u, v)`` with step
``lr * model.lr_scale`` (exact at depth 2), so one simulator covers both parametrizations.

Per step, with ``x`` of shape ``(R, B, d)`` and ``y = x beta* + sigma xi``:
``e = x beta - y``, ``g = (1/B) sum_b e_b x_b`` (the gradient in ``beta``), then
``u <- u - gamma g v``, ``v <- v - gamma g u`` (simultaneous update).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor

from .._validation import check_int
from ..observables import CoordinateState, resolve_observables
from .types import effective_step

__all__ = ["SGDRun", "sgd_step", "simulate_sgd"]


def sgd_step(u: Tensor, v: Tensor, x: Tensor, y: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """One SGD step on ``l = (<x, u v> - y)^2 / 2`` averaged over the batch.

    ``u, v``: ``(..., d)``; ``x``: ``(..., B, d)``; ``y``: ``(..., B)``.  Returns the new ``(u, v)``.
    """
    beta = u * v
    e = (x * beta.unsqueeze(-2)).sum(-1) - y  # (..., B)
    g = (e.unsqueeze(-1) * x).mean(-2)  # (..., d)
    return u - gamma * g * v, v - gamma * g * u


@dataclass
class SGDRun:
    """Observable curves of ``R`` independent SGD runs.

    Attributes:
        steps: recorded SGD step numbers ``(n,)``; t: ``steps / d`` (E2).
        values: name -> ``(R, n)`` per-run curves (measured with the E7 densities).
        diverged: ``(R,)`` bool, runs whose risk became non-finite or exceeded the cap.
    """

    steps: Tensor
    t: Tensor
    values: dict[str, Tensor]
    diverged: Tensor

    def mean(self, name: str) -> Tensor:
        return self.values[name].mean(0)


@torch.no_grad()
def simulate_sgd(
    problem,
    model,
    *,
    lr: float,
    batch_size: int,
    record_steps: Tensor | Iterable[int],
    num_runs: int = 4,
    observables=None,
    generator: torch.Generator | None = None,
    blowup_factor: float = 1e6,
    sample_dtype: torch.dtype | None = torch.float32,
) -> SGDRun:
    """Run ``num_runs`` independent SGD trajectories from ``model``'s state (not modified).

    ``record_steps``: increasing step numbers (0 allowed) at which the E7 observables are
    measured.  Runs whose risk exceeds ``blowup_factor * R(0)`` (checked at the recorded
    steps) are flagged in ``diverged`` and their state set to ``nan``.  The Gaussian samples
    are drawn in ``sample_dtype`` (float32 by default: 4x faster on CPU, statistically
    indistinguishable here) and used in the problem's dtype; ``None`` draws them in the
    problem's dtype.
    """
    batch_size = check_int("batch_size", batch_size, minimum=1)
    num_runs = check_int("num_runs", num_runs, minimum=1)
    gamma = effective_step(model, lr)
    obs = resolve_observables(observables)
    rec = torch.as_tensor(list(record_steps) if not isinstance(record_steps, Tensor) else record_steps, dtype=torch.int64)
    u0, v0 = model.uv_state()
    dtype, dev = problem.dtype, problem.device
    u = u0.to(dtype=dtype, device=dev).expand(num_runs, -1).clone()
    v = v0.to(dtype=dtype, device=dev).expand(num_runs, -1).clone()
    lam, bstar, sd = problem.spectrum, problem.beta_star, problem.feature_variance.sqrt()
    d = problem.dim
    alive = torch.ones(num_runs, dtype=torch.bool, device=dev)
    cap = None
    out = {o.name: [] for o in obs}

    def measure_now():
        c = CoordinateState(lam, bstar, u * v, u * u + v * v, u * u - v * v, float(model.lr_scale))
        for o in obs:
            out[o.name].append(o.density(c).mean(-1) + o.offset(problem.noise_std))
        return (0.5 * lam * (u * v - bstar) ** 2).mean(-1)

    k = 0
    chunk = max(1, min(256, (1 << 22) // max(1, num_runs * batch_size * (d + 1))))  # noise drawn in blocks
    sigma = problem.noise_std
    for target in rec.tolist():
        while k < target:
            n = min(chunk, target - k)
            z = torch.randn(n, num_runs, batch_size, d + 1, generator=generator, dtype=sample_dtype or dtype,
                            device=dev).to(dtype)
            for j in range(n):
                x = z[j, ..., :d] * sd
                # e = <x, beta> - y = <x, beta - beta*> - sigma xi (same as y = <x, beta*> + sigma xi)
                e = torch.matmul(x, (u * v - bstar).unsqueeze(-1)).squeeze(-1) - sigma * z[j, ..., d]
                g = torch.matmul(e.unsqueeze(-2), x).squeeze(-2) / batch_size
                u, v = u - gamma * g * v, v - gamma * g * u
            k += n
        risk = measure_now()
        if cap is None:
            cap = blowup_factor * float(risk.max().clamp_min(1e-300))
        bad = alive & ~(torch.isfinite(risk) & (risk < cap))
        if bool(bad.any()):  # freeze diverged runs at a non-finite state so they stay flagged
            alive = alive & ~bad
            u = torch.where(alive[:, None], u, torch.full_like(u, float("nan")))
            v = torch.where(alive[:, None], v, torch.full_like(v, float("nan")))
    return SGDRun(rec, rec.to(dtype) / d, {n: torch.stack(v_, dim=1) for n, v_ in out.items()}, ~alive)
