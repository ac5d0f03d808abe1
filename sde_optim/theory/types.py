"""Coordinate types of the mean-field limit (THEORY §4).

The PDE (E6) is one 1-d equation per coordinate *type* ``tau = (lambda, beta*, q0, phi0)``
with weight ``pi(tau)``: the empirical distribution of the ``d`` coordinates
(:func:`exact_types`, when the rows ``(lambda, beta*, u0, v0)`` take few distinct values), or a
quadrature of it (:mod:`.quadrature`).

Each type is one of three *kinds*:

* ``KIND_PHI`` (``q0 != 0``): coordinate ``phi = asinh(2 beta/|q|)`` (E5);
* ``KIND_PSI`` (``q0 == 0``, ``beta0 != 0``, balanced): ``psi = log|beta|``, sign fixed
  (THEORY §3 end);
* ``KIND_FROZEN`` (``u0 = v0 = 0``): the origin, a fixed point of SGD and of (E3).

The learning rate is mapped to the ``(u, v)`` step ``gamma = lr * model.lr_scale``
(THEORY §1; :func:`effective_step`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._validation import check_float
from ..observables import OBSERVABLES, CoordinateState

__all__ = ["CoordinateTypes", "exact_types", "binning_error", "effective_step", "KIND_PHI", "KIND_PSI", "KIND_FROZEN"]

KIND_PHI, KIND_PSI, KIND_FROZEN = 0, 1, 2


def effective_step(model, lr: float) -> float:
    """``gamma = lr * model.lr_scale``: the SGD step in ``(u, v)`` coordinates (THEORY §1)."""
    lr = check_float("lr", lr, minimum=0.0, strict=True)
    return lr * float(model.lr_scale)


@dataclass
class CoordinateTypes:
    """Types ``tau`` with weights ``pi`` (all tensors of shape ``(T,)``, one dtype/device).

    Attributes:
        lam: ``lambda_tau``; beta_star: ``beta*_tau``; u0, v0: initial ``(u, v)``.
        q0: ``u0^2 - v0^2`` (E4); beta0: ``u0 v0``.
        x0: initial coordinate: ``phi0 = asinh(2 beta0/|q0|)`` (E5) for ``KIND_PHI``,
            ``psi0 = log|beta0|`` for ``KIND_PSI``, 0 for ``KIND_FROZEN``.
        sign: ``sgn(beta0)`` (+1 where ``beta0 = 0``); used by ``KIND_PSI``.
        kind: int64 kinds (``KIND_PHI``, ``KIND_PSI``, ``KIND_FROZEN``).
        weight: ``pi_tau`` (sum 1).
        exact: whether the types are the exact empirical distribution of the coordinates.
        binning_error: estimated relative error of the binning (0 when exact): the largest
            relative change of the initial risk, curvature and E8 descent term ``S1``
            between the coordinates and their types, and of the E9 linear-model risk at
            ``t = 1/gamma`` (which probes the spectrum's dynamics).
        dim: number of coordinates ``d`` they came from.
    """

    lam: Tensor
    beta_star: Tensor
    u0: Tensor
    v0: Tensor
    weight: Tensor
    exact: bool
    dim: int
    binning_error: float = 0.0
    q0: Tensor = field(init=False)
    beta0: Tensor = field(init=False)
    x0: Tensor = field(init=False)
    sign: Tensor = field(init=False)
    kind: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.q0 = self.u0 * self.u0 - self.v0 * self.v0
        self.beta0 = self.u0 * self.v0
        scale = self.u0 * self.u0 + self.v0 * self.v0
        balanced = self.q0.abs() <= 1e-12 * scale
        frozen = scale == 0
        self.kind = torch.where(frozen, KIND_FROZEN, torch.where(balanced, KIND_PSI, KIND_PHI)).to(torch.int64)
        self.q0 = torch.where(balanced, torch.zeros_like(self.q0), self.q0)
        self.sign = torch.where(self.beta0 < 0, -1.0, 1.0).to(self.lam.dtype)
        safe_q = torch.where(self.q0 == 0, torch.ones_like(self.q0), self.q0.abs())
        safe_b = torch.where(self.beta0 == 0, torch.ones_like(self.beta0), self.beta0.abs())
        phi0 = torch.asinh(2.0 * self.beta0 / safe_q)
        psi0 = torch.log(safe_b)
        self.x0 = torch.where(self.kind == KIND_PHI, phi0, torch.where(self.kind == KIND_PSI, psi0, torch.zeros_like(phi0)))

    @property
    def num_types(self) -> int:
        return int(self.weight.shape[0])

    def initial_state(self, param_scale: float = 1.0) -> CoordinateState:
        """The :class:`CoordinateState` of the types at ``t = 0``, shapes ``(T,)``."""
        return CoordinateState.from_uv(self.lam, self.beta_star, self.u0, self.v0, param_scale)

    def to(self, device=None, dtype=None) -> "CoordinateTypes":
        conv = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return CoordinateTypes(conv(self.lam), conv(self.beta_star), conv(self.u0), conv(self.v0), conv(self.weight),
                               self.exact, self.dim, self.binning_error)


def exact_types(columns: Tensor, *, max_types: int) -> CoordinateTypes | None:
    """The exact types of ``columns`` (``(d, 4)`` rows ``(lambda, beta*, u0, v0)``), or None if there are
    more than ``max_types`` distinct rows.  Weights are the rows' frequencies."""
    d = columns.shape[0]
    rows, counts = torch.unique(columns, dim=0, return_counts=True)
    if rows.shape[0] > max_types:
        return None
    return CoordinateTypes(rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3], counts.to(torch.float64) / d, True, d)


def binning_error(columns: Tensor, types: CoordinateTypes, noise_std: float) -> float:
    """A priori check of a quadrature: largest relative error of the initial risk, curvature and E8 term ``S1``
    between the coordinates ``columns`` (``(d, 4)``) and the ``types``, and of the E9 linear-model
    relaxation ``mean lam (w0 - beta*)^2 exp(-2 lam) / 2`` (its noiseless gradient-flow part at
    ``t = 1/gamma``), which probes the spectrum's dynamics.  Only the initial state and a linear model:
    :func:`sde_optim.predict` checks its types a posteriori on the predicted curves instead.
    """
    lam, bstar, u, v = columns.unbind(1)
    full = CoordinateState.from_uv(lam, bstar, u, v)
    typed = types.initial_state()
    w = types.weight
    errs = []
    for name in ("risk", "curvature", "grad_norm"):
        dens = OBSERVABLES[name].density
        a = float(dens(full).mean()) + OBSERVABLES[name].offset(noise_std)
        b = float((dens(typed) * w).sum()) + OBSERVABLES[name].offset(noise_std)
        errs.append(abs(a - b) / max(abs(a), 1e-300))
    a = float((0.5 * lam * (u * v - bstar) ** 2 * torch.exp(-2 * lam)).mean())
    b = float((0.5 * types.lam * (types.beta0 - types.beta_star) ** 2 * torch.exp(-2 * types.lam) * w).sum())
    if a > 0:
        errs.append(abs(a - b) / a)
    return max(errs)
