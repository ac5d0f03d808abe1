"""The Scharfetter-Gummel operator of the Fokker-Planck step (E6): its bands, and ``(I - h (A diag(c) + B)) y = r``.

On each type's co-moving grid (:class:`~sde_optim.theory.fokker_planck._Grid`) the generator ``A`` of E6 is
tridiagonal: the flux through an interior face is ``J = cp m_j - cm m_{j+1}`` with Scharfetter-Gummel weights of
the face's Peclet number (:func:`sg_bands`).  Each MPRK22 step solves two implicit systems per type with it (``T``
types of ``N`` cells, ``G`` members of a sweep: independent tridiagonal systems of a few dozen to a few thousand
rows, :func:`implicit_solve`).  ``A`` and ``B`` have non-negative off-diagonals and zero column sums, so ``I - h M``
is a strictly column-diagonally-dominant M-matrix for every ``h > 0`` and column scaling ``c > 0``: Gaussian
elimination without pivoting is stable, and it is what partial pivoting (LAPACK ``gtsv``) does on such a matrix.

* **CPU** (float32/float64): compiled loops (numba).  The bands are formed from the Peclet numbers in one pass
  instead of about ten, the Bernoulli weights ``B(|pe|)`` by their Taylor series below ``|pe| = 1/2`` (a loop that
  vectorizes) and ``|pe| / expm1(|pe|)`` above: the torch formulas' bands to a few units of the last place (tests);
  the elimination forms the bands of
  ``I - h M`` from ``A``, ``c`` and ``B`` as it goes and follows ``gtsv``'s arithmetic without its row
  interchanges (``f = l_j / d_{j-1}``, ``d_j -= f u_{j-1}``, ``r_j -= f r_{j-1}``; back substitution by division),
  eight systems side by side: ``gtsv`` solved one system after another, each a chain of dependent divisions.
  The elimination gives ``gtsv``'s results bit for bit (tests) in a third of its time, the bands 0.6x the torch
  formulas' time (``docs/benchmarks.md``, sixteenth session).  The first call compiles (about a second per dtype,
  cached on disk by numba).
* **Elsewhere** (CUDA, other dtypes): the same formulas as torch operations, and a dense batched LU per system
  (:func:`dense_implicit_solve`), no host sync.

A zero or non-finite pivot (only coefficients out of floating range make one: a law that blew up, bands of
~1e109 seen) makes that system's solution ``nan`` instead of raising: the integrator rejects the step, and a
member that no step resolves is stopped as diverged.  Systems never mix: one type's ``nan`` stays in that type.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

__all__ = ["sg_bands", "implicit_solve", "system_bands", "dense_implicit_solve", "dense_tridiagonal_solve"]

_BLOCK = 8  # systems eliminated side by side, so that their chains of dependent divisions overlap
# B(z) = z / (e^z - 1) = 1 - z / 2 + sum_k B_2k z^2k / (2k)!: the coefficients B_2k / (2k)! to k = 8 (the bands kernel)
_B2, _B4, _B6, _B8 = 1.0 / 12.0, -1.0 / 720.0, 1.0 / 30240.0, -1.0 / 1209600.0
_EXPM1_OVERFLOW = 709.782712893384  # expm1(z) is inf past log(largest float64): B(z) = 0 there
_B10, _B12, _B14, _B16 = 1.0 / 47900160.0, -691.0 / 1307674368000.0, 1.0 / 74724249600.0, -3617.0 / 10670622842880000.0


def _compiled(x: Tensor) -> bool:
    """Whether the compiled CPU loops take ``x`` (float32/float64 on the CPU)."""
    return x.device.type == "cpu" and x.dtype in (torch.float64, torch.float32)


@lru_cache(maxsize=1)
def _kernels():
    """``(bands, eliminate)``, compiled on first use (importing numba and loading its on-disk cache cost ~0.6 s once
    per process; compiling ~1 s per dtype, once per environment)."""
    from numba import njit

    def jit(fn):
        # error_model numpy: x / 0 is inf or nan, not an exception (a zero pivot is detected, not raised)
        try:
            return njit(cache=True, error_model="numpy")(fn)
        except RuntimeError:  # no writable cache location (a read-only install without a home): compile per process
            return njit(error_model="numpy")(fn)

    @jit
    def bands(pe, dxi, fl, fr, zero, small, out):  # pragma: no cover - compiled
        """:func:`sg_bands`'s formulas in one pass: ``pe`` ``(S, N - 1)``; ``dxi`` ``(S,)``; ``fl``, ``fr``
        ``(N - 1,)``; ``out`` ``(3, S, N)``; ``zero`` of the dtype; ``small`` scratch ``(S, N - 1)`` (``B(|pe|)``).

        ``B(z) = z / expm1(z)`` below ``|z| = 1/2`` is its Taylor series (the Bernoulli numbers to ``z^16``,
        remainder below ``4e-20`` of the value), a loop that vectorizes: an ``expm1`` per face, one element at a
        time, was a fifth of a step's time on a few types of ~2000 cells (docs/benchmarks.md, twenty-third
        session); the faces at ``|z| >= 1/2`` (a coarse grid, a far tail) take ``z / expm1(z)`` in a second pass,
        0 past ``expm1``'s overflow without calling it (float32's ``expm1`` overflows earlier: ``z / inf = 0`` too).
        A nan Peclet number gives a nan weight, ``|z| > 709`` a zero one, as the torch formulas."""
        systems, faces = pe.shape
        for s in range(systems):
            wide = 0
            for j in range(faces):
                z = abs(pe[s, j])
                w = z * z
                series = w * (_B16 * w + _B14) + _B12
                series = w * (w * (w * (w * series + _B10) + _B8) + _B6)
                small[s, j] = (w * (w * (series + _B4) + _B2) - 0.5 * z) + 1.0
                wide += 1 if z >= 0.5 else 0
            if wide:
                for j in range(faces):
                    z = abs(pe[s, j])
                    if z >= _EXPM1_OVERFLOW:  # z / inf (half the faces on a few types of ~2000 cells: far tails)
                        small[s, j] = zero
                    elif z >= 0.5:
                        small[s, j] = z / np.expm1(z)
            k = dxi[s]
            cm_prev = zero
            for j in range(faces):
                b = small[s, j]
                p = pe[s, j]
                cp = (k * fl[j]) * (b + (zero if p < zero else p))  # clamp_min(0): nan stays nan
                cm = (k * fr[j]) * (b - (zero if p > zero else p))
                out[0, s, j + 1] = cp
                out[2, s, j] = cm
                out[1, s, j] = -cp if j == 0 else (-cp) - cm_prev
                cm_prev = cm
            out[0, s, 0] = zero
            out[2, s, faces] = zero
            out[1, s, faces] = zero - cm_prev

    @jit
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

    return bands, eliminate


def _flat(x: Tensor, n: int):
    """``x`` as a contiguous ``(S, n)`` numpy array (a view where it can be)."""
    return x.reshape(-1, n).contiguous().numpy()


def _scalar(x: Tensor, value: float):
    """``value`` as a numpy scalar of ``x``'s dtype: a compiled loop then computes in that dtype (float32 stays
    float32, as in torch)."""
    return (np.float64 if x.dtype == torch.float64 else np.float32)(value)


def sg_bands(pe: Tensor, dxi: Tensor, flux_left: Tensor, flux_right: Tensor) -> Tensor:
    """Bands ``(3, ..., N)`` (lower, diagonal, upper; ``lower[..., 0] = upper[..., -1] = 0``) of the SG generator
    ``d mass/dt = A mass`` on ``N`` cells from the Peclet numbers ``pe`` ``(..., N - 1)`` at the interior faces.

    The flux through face ``j + 1/2`` is ``J = cp_j mass_j - cm_j mass_{j+1}`` with ``cp = D B(-pe) / (gap width_j)``
    and ``cm = D B(pe) / (gap width_{j+1})`` (``B(z) = z / (e^z - 1)``; ``dxi`` ``(...)`` the diffusion ``D``,
    ``flux_left``/``flux_right`` ``(N - 1,)`` the geometry ``1 / (gap width)``).  One Bernoulli evaluation through
    ``B(-z) = B(z) + z``: ``B(-pe) = B(|pe|) + max(pe, 0)`` and ``B(pe) = B(|pe|) - min(pe, 0)`` (sums of non-negative
    terms: no cancellation); ``B(|z|) = |z| / expm1(|z|)`` with ``|z|`` floored at the smallest normal number
    (``B(0) = 1`` exactly) and 0 for ``|z| > 709`` (the compiled kernel: its Taylor series below ``|z| = 1/2``, the
    same to rounding).  Zero column sums: mass is conserved to round-off.
    """
    n = pe.shape[-1] + 1
    if _compiled(pe):  # B(|pe|) by its series where |pe| < 1/2 (the bands kernel)
        out = pe.new_empty(3, pe[..., 0].numel(), n)
        flat = _flat(pe, n - 1)
        _kernels()[0](flat, dxi.reshape(-1).contiguous().numpy(), flux_left.contiguous().numpy(),
                      flux_right.contiguous().numpy(), _scalar(pe, 0.0), np.empty_like(flat), out.numpy())
        return out.reshape(3, *pe.shape[:-1], n)
    zs = pe.abs().clamp_min_(torch.finfo(pe.dtype).tiny)
    small = zs / torch.expm1(zs)
    bands = pe.new_empty(3, *pe.shape[:-1], n)  # lower, diagonal, upper: written in place, no padded copies
    lo, dg, up = bands.unbind(0)
    cp = torch.mul(dxi[..., None] * flux_left, small + pe.clamp_min(0.0), out=lo[..., 1:])
    cm = torch.mul(dxi[..., None] * flux_right, small - pe.clamp_max(0.0), out=up[..., :-1])
    lo[..., 0] = 0.0
    up[..., -1] = 0.0
    torch.neg(cp, out=dg[..., :-1])
    dg[..., -1] = 0.0
    dg[..., 1:].sub_(cm)
    return bands


def implicit_solve(h: float, bands: Tensor, rhs: Tensor, col_scale: Tensor | None = None,
                   other: Tensor | None = None) -> Tensor:
    """``y`` with ``(I - h M) y = rhs``, ``M = A diag(col_scale) + B`` (``col_scale`` None: 1; ``other`` None: 0).

    ``bands``, ``other``: ``(3, ..., N)`` lower (coefficient of ``y[j-1]`` in row ``j``), diagonal, upper of ``A``
    and ``B``, with ``lower[..., 0] = upper[..., -1] = 0``; ``rhs``, ``col_scale``: ``(..., N)``; returns ``(..., N)``.
    A column scaling keeps ``M`` tridiagonal: entry ``(j, k)`` of ``A`` is multiplied by ``col_scale[k]``.  On CPU
    in float32/float64 the compiled elimination, elsewhere :func:`dense_implicit_solve`.
    """
    if not _compiled(rhs):
        return dense_implicit_solve(h, bands, rhs, col_scale, other)
    a = bands.reshape(3, -1, rhs.shape[-1]).contiguous()
    r = rhs.reshape(-1, rhs.shape[-1]).contiguous()
    c = r if col_scale is None else col_scale.reshape(r.shape).contiguous()  # r: a placeholder, never read
    b = a if other is None else other.reshape(a.shape).contiguous()
    out, pivots = torch.empty_like(r), torch.empty_like(r)
    _kernels()[1](a.numpy(), b.numpy(), c.numpy(), _scalar(r, -h), _scalar(r, 1.0), r.numpy(), out.numpy(), pivots.numpy(),
              col_scale is not None, other is not None)
    return out.reshape(rhs.shape)


def system_bands(h: float, bands: Tensor, col_scale: Tensor | None = None,
                 other: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(lower, diag, upper)`` of ``I - h (A diag(col_scale) + B)`` with torch operations (the arguments of
    :func:`implicit_solve`), formed in place on a copy of ``bands``."""
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
    return lo, dg, up


def dense_implicit_solve(h: float, bands: Tensor, rhs: Tensor, col_scale: Tensor | None = None,
                         other: Tensor | None = None) -> Tensor:
    """:func:`implicit_solve` with torch operations: :func:`system_bands`, then :func:`dense_tridiagonal_solve`
    (any device and dtype, no host sync)."""
    return dense_tridiagonal_solve(*system_bands(h, bands, col_scale, other), rhs)


def dense_tridiagonal_solve(lower: Tensor, diag: Tensor, upper: Tensor, rhs: Tensor) -> Tensor:
    """Rows ``j``: ``lower[j] y[j-1] + diag[j] y[j] + upper[j] y[j+1] = rhs[j]``, all ``(..., N)``
    (``lower[..., 0]``, ``upper[..., -1]`` ignored): one dense batched LU per system (``(..., N, N)``); a singular
    system is ``nan`` (``solve_ex``: no host sync)."""
    a = torch.diag_embed(diag) + torch.diag_embed(upper[..., :-1], 1) + torch.diag_embed(lower[..., 1:], -1)
    y, info = torch.linalg.solve_ex(a, rhs.unsqueeze(-1))
    return y.squeeze(-1).masked_fill((info > 0).unsqueeze(-1), math.nan)
