"""Batched tridiagonal solves of the Fokker-Planck step (E6): ``(I - h (A diag(c) + B)) y = r`` per type.

Each MPRK22 step of :func:`~sde_optim.theory.fokker_planck.solve_fokker_planck` solves two such systems per type
(``T`` types of ``N`` cells, ``G`` members of a sweep): independent tridiagonal systems of a few dozen to a few
thousand rows.  ``A`` and ``B`` are Scharfetter-Gummel generators (non-negative off-diagonals, zero column sums),
so ``I - h M`` is a strictly column-diagonally-dominant M-matrix for every ``h > 0`` and column scaling ``c > 0``:
Gaussian elimination without pivoting is stable, and it is what partial pivoting (LAPACK ``gtsv``) does on such a
matrix anyway.

* **CPU** (float32/float64): one compiled loop nest (numba) forms the bands of ``I - h M`` from ``A``, ``c`` and
  ``B`` and eliminates, a block of types at a time.  The elimination follows ``gtsv``'s arithmetic without its row
  interchanges (``f = l_j / d_{j-1}``, ``d_j -= f u_{j-1}``, ``r_j -= f r_{j-1}``; back substitution by division),
  so the results are those of ``gtsv`` bit for bit on these matrices; it is 4x faster, because ``gtsv`` solves one
  system after another, each a chain of dependent divisions, where a block of 8 types keeps 8 chains in flight
  (measured in ``docs/benchmarks.md``, sixteenth session), and the bands are formed in the same pass instead of
  five full-array passes.  The first call compiles (about a second per dtype; cached on disk by numba).
* **Elsewhere** (CUDA, other dtypes): the bands with torch operations and a dense batched LU per system
  (:func:`dense_implicit_solve`), no host sync.

A zero or non-finite pivot (only coefficients out of floating range make one: a law that blew up, bands of
~1e109 seen) makes that system's solution ``nan`` instead of raising: the integrator rejects the step, and a
member that no step resolves is stopped as diverged.  Systems never mix: one type's ``nan`` stays in that type.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

__all__ = ["implicit_solve", "dense_implicit_solve", "dense_tridiagonal_solve"]

_BLOCK = 8  # systems eliminated side by side (their division chains overlap); 4-16 measured within 10 %


@lru_cache(maxsize=1)
def _kernel():
    """The compiled elimination (built on first use: importing numba costs ~0.3 s, compiling ~1 s per dtype, once
    per environment with numba's on-disk cache)."""
    import numpy as np
    from numba import njit

    @njit(cache=True, nogil=True, error_model="numpy")  # numpy: x / 0 is inf or nan, not an exception
    def eliminate(a, b, c, nh, one, rhs, out, d, has_c, has_b):  # pragma: no cover - compiled
        """``a``, ``b``: bands ``(3, S, N)`` (lower, diagonal, upper; unused ends zero); ``c``, ``rhs``, ``out``,
        ``d`` (scratch): ``(S, N)``; ``nh = -h`` and ``one`` scalars of the arrays' dtype (float32 stays float32).
        Solves ``(I - h (A diag(c) + B)) out = rhs`` per row ``s``."""
        systems, n = rhs.shape
        for s0 in range(0, systems, _BLOCK):
            s1 = min(systems, s0 + _BLOCK)
            for s in range(s0, s1):  # row 0: its diagonal and right-hand side
                dg = a[1, s, 0]
                if has_c:
                    dg = dg * c[s, 0]
                if has_b:
                    dg = dg + b[1, s, 0]
                d[s, 0] = dg * nh + one
                out[s, 0] = rhs[s, 0]
            for j in range(1, n):  # forward elimination, f = l_j / d_{j-1}
                for s in range(s0, s1):
                    lo, dg, up = a[0, s, j], a[1, s, j], a[2, s, j - 1]
                    if has_c:
                        lo, dg, up = lo * c[s, j - 1], dg * c[s, j], up * c[s, j]
                    if has_b:
                        lo, dg, up = lo + b[0, s, j], dg + b[1, s, j], up + b[2, s, j - 1]
                    f = (lo * nh) / d[s, j - 1]
                    d[s, j] = (dg * nh + one) - f * (up * nh)
                    out[s, j] = rhs[s, j] - f * out[s, j - 1]
            for s in range(s0, s1):  # back substitution
                out[s, n - 1] = out[s, n - 1] / d[s, n - 1]
            for j in range(n - 2, -1, -1):
                for s in range(s0, s1):
                    up = a[2, s, j]
                    if has_c:
                        up = up * c[s, j + 1]
                    if has_b:
                        up = up + b[2, s, j]
                    out[s, j] = (out[s, j] - (up * nh) * out[s, j + 1]) / d[s, j]
            for s in range(s0, s1):  # a zero or non-finite pivot: this system is nan (no exception, no mixing)
                bad = False
                for j in range(n):
                    if d[s, j] == 0.0 or not np.isfinite(d[s, j]):
                        bad = True
                if bad:
                    for j in range(n):
                        out[s, j] = np.nan

    return eliminate


def implicit_solve(h: float, bands: Tensor, rhs: Tensor, col_scale: Tensor | None = None,
                   other: Tensor | None = None) -> Tensor:
    """``y`` with ``(I - h M) y = rhs``, ``M = A diag(col_scale) + B`` (``col_scale`` None: 1; ``other`` None: 0).

    ``bands``, ``other``: ``(3, ..., N)`` lower (coefficient of ``y[j-1]`` in row ``j``), diagonal, upper of ``A``
    and ``B``, with ``lower[..., 0] = upper[..., -1] = 0``; ``rhs``, ``col_scale``: ``(..., N)``; returns ``(..., N)``.
    A column scaling keeps ``M`` tridiagonal: entry ``(j, k)`` of ``A`` is multiplied by ``col_scale[k]``.  On CPU
    in float32/float64 the compiled elimination, elsewhere :func:`dense_implicit_solve`.
    """
    if not (rhs.device.type == "cpu" and rhs.dtype in (torch.float64, torch.float32)):
        return dense_implicit_solve(h, bands, rhs, col_scale, other)
    a = bands.reshape(3, -1, rhs.shape[-1]).contiguous()
    r = rhs.reshape(-1, rhs.shape[-1]).contiguous()
    c = r if col_scale is None else col_scale.reshape(r.shape).contiguous()  # r: a placeholder, never read
    b = a if other is None else other.reshape(a.shape).contiguous()
    out, pivots = torch.empty_like(r), torch.empty_like(r)
    scalar = r.numpy().dtype.type
    _kernel()(a.numpy(), b.numpy(), c.numpy(), scalar(-h), scalar(1.0), r.numpy(), out.numpy(), pivots.numpy(),
              col_scale is not None, other is not None)
    return out.reshape(rhs.shape)


def dense_implicit_solve(h: float, bands: Tensor, rhs: Tensor, col_scale: Tensor | None = None,
                         other: Tensor | None = None) -> Tensor:
    """:func:`implicit_solve` with torch operations: the bands of ``I - h M`` formed in place on a copy, then
    :func:`dense_tridiagonal_solve` (any device and dtype, no host sync)."""
    m = bands.clone()
    if col_scale is not None:
        lo, dg, up = m.unbind(0)
        lo[..., 1:].mul_(col_scale[..., :-1])
        dg.mul_(col_scale)
        up[..., :-1].mul_(col_scale[..., 1:])
    if other is not None:
        m.add_(other)
    m.mul_(-h)
    lo, dg, up = m.unbind(0)
    dg.add_(1.0)  # 1 - h d: the same rounding as the compiled path
    return dense_tridiagonal_solve(lo, dg, up, rhs)


def dense_tridiagonal_solve(lower: Tensor, diag: Tensor, upper: Tensor, rhs: Tensor) -> Tensor:
    """Rows ``j``: ``lower[j] y[j-1] + diag[j] y[j] + upper[j] y[j+1] = rhs[j]``, all ``(..., N)``
    (``lower[..., 0]``, ``upper[..., -1]`` ignored): one dense batched LU per system (``(..., N, N)``); a singular
    system is ``nan`` (``solve_ex``: no host sync)."""
    a = torch.diag_embed(diag) + torch.diag_embed(upper[..., :-1], 1) + torch.diag_embed(lower[..., 1:], -1)
    y, info = torch.linalg.solve_ex(a, rhs.unsqueeze(-1))
    return y.squeeze(-1).masked_fill((info > 0).unsqueeze(-1), math.nan)
