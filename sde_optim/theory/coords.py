"""The well-posed coordinates of THEORY §3 and their maps to ``(u, v)``.

* ``q = u^2 - v^2`` (imbalance, E4) and, for ``q != 0``, ``phi = asinh(2 beta / |q|)`` (E5), so
  ``beta = (|q|/2) sinh(phi)`` and ``rho = u^2 + v^2 = |q| cosh(phi)``.
* Balanced coordinates (``q = 0``, THEORY §3 end): ``psi = log|beta|`` with a fixed sign
  ``s = sgn(beta)``, so ``beta = s e^psi`` and ``rho = 2 e^psi``.

The maps are elementwise on tensors of any (broadcastable) shape.  ``(u, v)`` and
``(-u, -v)`` are the same network; the inverse maps return the representative with
``u >= 0``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["uv_to_phi", "phi_to_uv", "phi_to_state", "psi_to_state", "state_rho"]


def uv_to_phi(u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``(u, v) -> (q, phi)`` (E4, E5); ``phi`` is undefined (``nan``/``inf``) where ``q == 0``."""
    q = u * u - v * v
    return q, torch.asinh(2.0 * u * v / q.abs())


def phi_to_state(q: Tensor, phi: Tensor, cap: float = math.inf) -> tuple[Tensor, Tensor]:
    """``(q, phi) -> (beta, rho)`` with ``beta = |q| sinh(phi) / 2``, ``rho = |q| cosh(phi)`` (E5).

    Evaluated as ``(|q| / 2) e^|phi| = exp(|phi| + log(|q| / 2))`` (and the other term as ``(|q| / 2)^2`` over it):
    SGD's noise shrinks ``|q|`` by hundreds of e-folds (E4: at a rate ``2 gamma^2 lam R / B``) while ``beta`` stays of
    order one, so ``phi ~ log(4 beta / |q|)`` passes 300 and more, where ``e^phi`` alone overflows although the product
    does not (a three-level spectrum with label noise, ``B = 2``, at half the critical lr: ``|q| ~ e^-300`` by
    ``t ~ 2.1``, docs/benchmarks.md).  ``cap``: the exponent is capped there, so ``|beta|`` and ``rho`` stay below about
    ``e^cap`` (the state at ``phi`` clamped to ``+-(cap + log(2 / |q|))``)."""
    half = (0.5 * q.abs()).clamp_min(torch.finfo(q.dtype).tiny)  # (a q that underflowed to 0: beta, rho ~ 0)
    big = phi.abs().add_(torch.log(half))
    if cap < math.inf:
        big.clamp_(max=cap)
    big.exp_()  # (|q| / 2) e^|phi|: one exponential; the small term (|q| / 2) e^-|phi| = (|q| / 2)^2 / big
    small = (half * half) / big  # 0 where (|q| / 2)^2 underflows: then below the large term's rounding
    return torch.copysign(big - small, phi).mul_(0.5), big.add_(small)


def psi_to_state(sign: Tensor, psi: Tensor) -> tuple[Tensor, Tensor]:
    """Balanced coordinates ``(sgn beta, psi = log|beta|) -> (beta, rho)`` (THEORY §3 end)."""
    e = torch.exp(psi)
    return sign * e, 2.0 * e


def state_rho(q: Tensor, beta: Tensor) -> Tensor:
    """``rho = u^2 + v^2 = sqrt(q^2 + 4 beta^2)`` (identity of the depth-2 network)."""
    return torch.sqrt(q * q + 4.0 * beta * beta)


def phi_to_uv(q: Tensor, phi: Tensor) -> tuple[Tensor, Tensor]:
    """``(q, phi) -> (u, v)`` with ``u >= 0`` (inverse of :func:`uv_to_phi` up to ``(u, v) -> (-u, -v)``).

    ``u^2 = (rho + q) / 2``, ``v^2 = (rho - q) / 2`` and ``sgn(u v) = sgn(beta)``.
    """
    beta, rho = phi_to_state(q, phi)
    u = torch.sqrt(torch.clamp(0.5 * (rho + q), min=0.0))
    v_abs = torch.sqrt(torch.clamp(0.5 * (rho - q), min=0.0))
    # Where u is tiny (q < 0 and |beta| << |q|), sqrt loses relative accuracy of the small
    # factor; recover it from beta = u v, which holds to full precision.
    big_u = u >= v_abs
    v = torch.where(big_u, beta / torch.where(u > 0, u, torch.ones_like(u)), torch.where(beta < 0, -v_abs, v_abs))
    u = torch.where(big_u, u, beta.abs() / torch.where(v_abs > 0, v_abs, torch.ones_like(v_abs)))
    return u, v
