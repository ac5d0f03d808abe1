"""Coordinate types of the mean-field limit (THEORY §4).

The PDE (E6) is one 1-d equation per coordinate *type* ``tau = (lambda, beta*, q0, phi0)``
with weight ``pi(tau)``: the empirical distribution of the ``d`` coordinates, or a
quadrature of it.  :func:`coordinate_types` groups coordinates **exactly** when the
per-coordinate fields ``(lambda, beta*, u0, v0)`` take at most ``max_types`` distinct rows;
otherwise it bins the fields with many distinct values (log-spaced bins for positive fields
spanning more than a decade, such as power-law spectra; equal-count quantile bins
otherwise; representative = bin mean, which keeps ``mean(lambda)`` and the weights exact)
and reports an error estimate (:attr:`CoordinateTypes.binning_error`).

Each type is one of three *kinds*:

* ``KIND_PHI`` (``q0 != 0``): coordinate ``phi = asinh(2 beta/|q|)`` (E5);
* ``KIND_PSI`` (``q0 == 0``, ``beta0 != 0``, balanced): ``psi = log|beta|``, sign fixed
  (THEORY §3 end);
* ``KIND_FROZEN`` (``u0 = v0 = 0``): the origin, a fixed point of SGD and of (E3).

The learning rate is mapped to the ``(u, v)`` step ``gamma = lr * model.lr_scale``
(THEORY §1; :func:`effective_step`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._validation import check_float, check_int
from ..observables import OBSERVABLES, CoordinateState, coordinate_state
from .coords import state_rho

__all__ = ["CoordinateTypes", "coordinate_types", "effective_step", "KIND_PHI", "KIND_PSI", "KIND_FROZEN"]

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
        return CoordinateState(self.lam, self.beta_star, self.beta0, state_rho(self.q0, self.beta0), self.q0, param_scale)

    def to(self, device=None, dtype=None) -> "CoordinateTypes":
        conv = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return CoordinateTypes(conv(self.lam), conv(self.beta_star), conv(self.u0), conv(self.v0), conv(self.weight),
                               self.exact, self.dim, self.binning_error)


def _bin_codes(x: Tensor, bins: int) -> Tensor:
    """Bin index for each entry of ``x`` (shape ``(d,)``), at most about ``bins`` bins; ties share a bin.

    * Positive fields spanning more than a decade (spectra) get equal-width bins in
      ``log x``: time scales are ``1/(gamma lambda)``, so this resolves them uniformly in
      relative terms (equal-count bins would lump a heavy tail, e.g. the top of a power law).
    * Otherwise: values carrying at least ``1/bins`` of the coordinates (atoms, e.g.
      ``beta* = 0`` of a sparse teacher) get their own bin; the rest are split by sign (a bin
      must not mix signs: its mean would cancel) and binned by equal counts, the bins shared
      between the signs in proportion to their counts.
    """
    uniq, inv, counts = torch.unique(x, return_inverse=True, return_counts=True)
    if uniq.numel() <= bins:
        return inv
    if bool((x > 0).all()) and float(x.max()) > 10.0 * float(x.min()):
        lx = torch.log(x)
        lo, hi = float(lx.min()), float(lx.max())
        return ((lx - lo) / (hi - lo) * bins).floor().clamp(0, bins - 1).to(torch.int64)
    n = x.numel()
    is_atom = counts * bins >= n
    atom_id = torch.cumsum(is_atom.to(torch.int64), 0) - 1
    codes = torch.where(is_atom[inv], atom_id[inv], torch.full_like(inv, -1))
    n_atoms = int(is_atom.sum())
    rest = ~is_atom[inv]
    groups = [rest & (x < 0), rest & (x >= 0)]
    sizes = [int(g.sum()) for g in groups]
    free = max(bins - n_atoms, sum(1 for z in sizes if z))
    offset = n_atoms
    for g, size in zip(groups, sizes):
        if size == 0:
            continue
        k = max(1, round(free * size / max(1, sum(sizes))))
        vals = x[g]
        order = torch.argsort(vals, stable=True)
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(size, device=x.device)
        c = (ranks * k) // size
        # equal values share the bin of their first occurrence
        u, iv = torch.unique(vals, return_inverse=True)
        first = torch.full((u.numel(),), size, dtype=c.dtype, device=x.device).scatter_reduce(0, iv, c, "amin")
        codes[g] = first[iv] + offset
        offset += k
    return codes


def coordinate_types(problem, model, *, max_types: int = 64) -> CoordinateTypes:
    """Group the coordinates of ``(problem, model)`` into at most ``max_types`` types (THEORY §4).

    Exact grouping when the rows ``(lambda_i, beta*_i, u0_i, v0_i)`` take at most ``max_types``
    distinct values; otherwise the fields with the most distinct values are binned by
    quantiles (numbers of bins chosen greedily so that their product is ``<= max_types``).
    Computed in float64 on the problem's device.
    """
    max_types = check_int("max_types", max_types, minimum=1)
    c = coordinate_state(problem, model)
    u, v = model.uv_state()
    dev = c.lam.device
    cols = torch.stack([c.lam, c.beta_star, u.to(dev), v.to(dev)], dim=1).to(torch.float64)
    d = cols.shape[0]
    rows, inv, counts = torch.unique(cols, dim=0, return_inverse=True, return_counts=True)
    if rows.shape[0] <= max_types:
        return CoordinateTypes(rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3], counts.to(torch.float64) / d, True, d)

    # Binning: each field gets ``bins[f]`` bins (its number of distinct values if that is
    # small); the field with the most bins is cut down until the product fits.
    distinct = [int(torch.unique(cols[:, f]).numel()) for f in range(4)]
    bins = list(distinct)
    while math.prod(bins) > max_types:
        f = max(range(4), key=lambda j: bins[j])
        others = math.prod(bins) // bins[f]
        bins[f] = max(1, min(bins[f] - 1, max_types // others))
    codes = torch.stack([_bin_codes(cols[:, f], bins[f]) for f in range(4)], dim=1)
    _, inv, counts = torch.unique(codes, dim=0, return_inverse=True, return_counts=True)
    sums = torch.zeros(counts.numel(), 4, dtype=torch.float64, device=dev).index_add_(0, inv, cols)
    rep = sums / counts[:, None].to(torch.float64)
    types = CoordinateTypes(rep[:, 0], rep[:, 1], rep[:, 2], rep[:, 3], counts.to(torch.float64) / d, False, d)
    types.binning_error = _binning_error(cols, types, inv, problem.noise_std)
    return types


def _binning_error(cols: Tensor, types: CoordinateTypes, inv: Tensor, noise_std: float) -> float:
    """Largest relative error of the binning on initial-time statistics and on E9 at ``t = 1/gamma``.

    Initial risk, curvature and the E8 descent term ``S1 = mean lam^2 r^2 rho`` are compared
    between the coordinates and the types; for the dynamics, the E9 linear-model risk
    ``R(t) = sigma^2/2 + mean lam (w0 - beta*)^2 exp(-2 lam t) / 2`` (its noiseless
    gradient-flow part, time in units of ``1/gamma``) at ``t = 1`` probes how well the binned
    spectrum reproduces the relaxation.
    """
    lam, bstar, u, v = cols.unbind(1)
    full = CoordinateState(lam, bstar, u * v, u * u + v * v, u * u - v * v)
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
