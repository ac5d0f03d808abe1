"""The Fokker-Planck solve's MPRK22 step as one compiled loop nest on the CPU (issue 12).

:func:`~sde_optim.theory.fokker_planck._integrate_mprk22` spends its time in per-operation overhead: on a few types
of a few hundred cells one evaluation of the state (E4-E7, the moments, the Scharfetter-Gummel bands) is about
60 torch operations of a few microseconds each, for about a microsecond of arithmetic per cell.  Here the same
step is one call: the plan of the grid's motion, both stages' statistics and solves, the step's error, and on
acceptance the new state's statistics.  The exponentials of the cell loops are :func:`_exp`-style polynomials
(numba would call the C library one element at a time), in loops of their own so that they vectorize.

What is *not* written again: the E7 densities are the registry's own (:data:`~sde_optim.observables.OBSERVABLES`'s
``risk`` and ``curvature`` lambdas, compiled by numba on a per-cell :class:`CoordinateState` look-alike), and the
bands and eliminations are :mod:`~sde_optim.theory.sg_operator`'s compiled kernels.  What is written as scalar
arithmetic a second time, next to the tensor code it mirrors: the state map (E5 / psi, as
:func:`~sde_optim.theory.coords.phi_to_state` and :func:`~sde_optim.theory.coords.psi_to_state`), the drift and
diffusion (E5, E6, :class:`~sde_optim.theory.dynamics.MeanFieldDynamics`), the quadrature weights and moments, the
grid's plan and the Peclet numbers (:class:`~sde_optim.theory.fokker_planck._Grid`), and the step's error
(:func:`~sde_optim.theory.fokker_planck._step_errors`).  The torch path stays the definition and the path on
every other device (and on the CPU with ``SDE_OPTIM_COMPILED_STEP=0``); the tests compare the two on every kind of
type, a batch with schedules, weight decay and momentum, the step limit and float32.  numba keys its disk cache on
the pickled closure of each kernel; the only closure variable is a hash of the code compiled in from other modules
(the registry's densities, ``CoordinateState.residual``, sg_operator's kernels), so a change to any of them
recompiles (tested).  A numba error (a platform or version the kernels do not compile on) makes the solver fall
back to the torch path with a warning.

Shapes: ``G`` members of a batch, ``T`` types, ``N`` cells; arrays are numpy views of the solver's CPU tensors
(float32 or float64; numba compiles one version per dtype, cached on disk).
"""

from __future__ import annotations

import hashlib
import marshal
import math
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from ..observables import OBSERVABLES, CoordinateState
from .sg_operator import _kernels as _sg_kernels
from .types import KIND_PHI, KIND_PSI

__all__ = ["compiled_kernels", "TYPE_FIELDS"]

# rows of the (7, T) array of per-type constants the kernels take
TYPE_FIELDS = ("lam", "bstar", "q0", "sign", "kind", "weight", "active")
_MAX_TYPE_TV = 0.25  # the largest total-variation change of any one type's law in one step (both steps' step control)
# _exp's constants: log2(e), log(2) in two parts (the high part exact in 33 bits), 1 / k!
_LOG2E, _LN2_HI, _LN2_LO = 1.44269504088896338700e+00, 6.93147180369123816490e-01, 1.90821492927058770002e-10
_EXP_TAYLOR = tuple(1.0 / math.factorial(k) for k in range(14))
# the kernels and their helpers, set by compiled_kernels (module globals: see there)
_floor = _exp = _exponent = _state = _drift = _plan = _assemble = _evaluate = _attempt = None
_risk_density = _curvature_density = _bands = _eliminate = _as_float = None


class _Cell(NamedTuple):
    """One cell's :class:`~sde_optim.observables.CoordinateState` as scalars (a tuple on the stack in compiled code):
    what the registry's densities read, ``residual`` included (see :func:`compiled_kernels`)."""

    lam: float
    beta_star: float
    beta: float
    rho: float
    q: float
    param_scale: float


@lru_cache(maxsize=1)
def compiled_kernels():
    """``(evaluate, attempt)``, compiled on first use (see their docstrings below for the arguments): about 6 s per
    dtype once per environment, then loaded from numba's disk cache."""
    from llvmlite import ir
    from numba import njit
    from numba import types as nb_types
    from numba.extending import intrinsic, overload_attribute

    global _floor, _exp, _exponent, _state, _drift, _plan, _assemble, _evaluate, _attempt
    global _risk_density, _curvature_density, _bands, _eliminate, _as_float
    # The kernels and their helpers are module globals, not closure variables: numba keys its disk cache on the pickled
    # closure, and a dispatcher pickles with a per-process id (every process would compile again and add to the cache).
    # What the kernels compile in from other modules is tied to the cache by `stamp` instead (the only closure variable):
    # a change to a registry density, CoordinateState.residual or sg_operator's kernels makes a new key, so the cache
    # never serves code compiled from the old definitions (tested).
    _bands, _eliminate = _sg_kernels()
    external = (OBSERVABLES["risk"].density, OBSERVABLES["curvature"].density, CoordinateState.residual.fget,
                _bands.py_func, _eliminate.py_func)
    stamp = hashlib.sha256(b"".join(marshal.dumps(f.__code__) for f in external)).hexdigest()
    residual = njit(CoordinateState.residual.fget)  # the registry densities read c.residual: the class's own property

    def _residual(c):  # pragma: no cover - typing
        if getattr(c, "instance_class", None) is _Cell:
            return lambda c: residual(c)

    for tuple_type in (nb_types.NamedUniTuple, nb_types.NamedTuple):  # one dtype, or float32 fields mixed with float64
        overload_attribute(tuple_type, "residual")(_residual)


    def jit(fn):
        try:  # error_model numpy: x / 0 is inf or nan, as in torch (a law that blew up is detected, not raised)
            return njit(cache=True, error_model="numpy")(fn)
        except RuntimeError:  # no writable cache location: compile per process
            return njit(error_model="numpy")(fn)

    _risk_density = njit(inline="always")(OBSERVABLES["risk"].density)
    _curvature_density = njit(inline="always")(OBSERVABLES["curvature"].density)

    @njit(inline="always")
    def _floor(x, lo):  # pragma: no cover - compiled
        """``x.clamp_min(lo)``: a nan stays nan (``max`` would not say which it returns)."""
        return lo if x < lo else x

    @intrinsic
    def _as_float(typingctx, bits):  # pragma: no cover - typing
        """The float64 whose bits are the int64 ``bits`` (a register move: vectorizes)."""
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.DoubleType())
        return nb_types.float64(nb_types.int64), codegen

    @njit(inline="always")
    def _exp(x):  # pragma: no cover - compiled
        """``exp(x)`` within 1 ulp in float64, written so that a loop of it vectorizes (no call): ``2^k p(r)`` with
        ``r = x - k log 2`` (two-part ``log 2``), ``|r| <= log(2) / 2``, ``p`` the Taylor polynomial of degree 13
        (remainder below 1e-17), ``2^k`` from its bits in two factors (so that ``exp`` of ``-745 .. -708`` is the
        subnormal it should be); ``inf`` past 709.78, ``0`` below -745.2, nan kept.  numba calls the C library's
        ``exp`` one element at a time (4.4 ns here); this is 1.5 ns in a loop (tests: against numpy over the range)."""
        x = float(x)
        k = np.floor(x * _LOG2E + 0.5)
        k = -1080.0 if k < -1080.0 else (1030.0 if k > 1030.0 else k)
        r = (x - k * _LN2_HI) - k * _LN2_LO
        p = _EXP_TAYLOR[13]
        for i in range(12, 1, -1):
            p = p * r + _EXP_TAYLOR[i]
        p = (p * r) * r + r + 1.0
        ki = np.int64(k)
        k1 = ki // 2
        y = p * _as_float((k1 + 1023) << 52) * _as_float((ki - k1 + 1023) << 52)
        y = np.inf if x > 709.782712893384 else y
        y = 0.0 if x < -745.2 else y
        return x if x != x else y

    @njit(inline="always")
    def _exponent(kind, log_half, x, cap):  # pragma: no cover - compiled
        """The exponent of :meth:`MeanFieldDynamics.state` at coordinate ``x``: ``|phi| + log(|q| / 2)`` (E5,
        :func:`~sde_optim.theory.coords.phi_to_state`) or ``psi`` (THEORY §3 end), capped at ``cap``; comparisons
        written so that a nan stays nan (torch's clamp keeps it)."""
        if kind == KIND_PHI:
            e = abs(x) + log_half
            return cap if e > cap else e
        return cap if x > cap else (-cap if x < -cap else x)

    @njit(inline="always")
    def _state(kind, half, sign, x, big):  # pragma: no cover - compiled
        """``(beta, rho)`` at coordinate ``x`` from ``big = exp(_exponent(...))``: E5's ``beta = (|q|/2) sinh phi``,
        ``rho = |q| cosh phi`` as ``big`` and ``(|q|/2)^2 / big`` (``half = max(|q| / 2, smallest normal)``), psi's
        ``beta = sgn e^psi``, ``rho = 2 e^psi``, frozen ``(0, 0)``."""
        if kind == KIND_PHI:
            small = (half * half) / big
            return np.copysign(big - small, x) * 0.5, big + small
        if kind == KIND_PSI:
            return sign * big, 2.0 * big
        return 0.0, 0.0

    @njit(inline="always")
    def _drift(kind, lam, bstar, sign, beta, gamma, noise, kappa, risk):  # pragma: no cover - compiled
        """:meth:`MeanFieldDynamics.drift` for one cell: E5 for phi, THEORY §3's psi drift with E12's ``-2 kappa``."""
        base = -2.0 * gamma * lam * (beta - bstar)
        if kind == KIND_PHI:
            return base
        if kind == KIND_PSI:
            return base * sign - 2.0 * noise * lam * risk - 2.0 * kappa
        return 0.0

    @jit
    def _evaluate(mass, m, s, integral, coef, limit, dim, full, types, points, cap, normal, tiny, param_scale, offset,
                  var_floor, risk, a, diffusion, moments, observed, totals, per_type, tail_share,
                  unstable):  # pragma: no cover - compiled
        """:meth:`_Grid.statistics` of the state ``mass`` ``(G, T, N)``, ``m, s`` ``(G, T)``, ``int R`` ``(G,)``.

        ``coef`` ``(4, G)``: ``gamma, nu, kappa, K`` at the time and side; ``limit`` ``(G,)`` the step limit
        (``inf``: none) and ``dim`` its ``d``; ``types`` ``(7, T)`` (:data:`TYPE_FIELDS`); ``points`` ``(2N - 1,)``
        the cell centres then the interior faces; ``normal`` the dtype's smallest normal number (the state map's and the
        SG weights' floor), ``tiny`` :func:`~sde_optim.theory.statistics.tiny` (every other division's).  Writes ``risk`` ``(G,)`` (E1 with ``sigma^2/2``), ``a``
        ``(G, T, 2N - 1)`` the drift at centres then faces, ``diffusion`` ``(G, T)`` (E6), ``observed``
        ``(2, G, T, N)`` (E7 risk and curvature densities times ``pi``), ``totals`` ``(2, G)`` (``R``, ``C``),
        ``per_type`` ``(2, G, T)``; with ``full``: ``moments`` ``(4, G, T)`` (``E xi``, ``Var xi`` floored at
        ``var_floor``, ``E a``, ``Cov(xi, a)``, fourth-order weights), ``tail_share`` and ``unstable`` ``(G,)``."""
        _ = stamp  # (the cache key, see above)
        groups, ntypes, n = mass.shape
        xi = points[:n]
        for g in range(groups):
            gamma, noise, kappa, kint = coef[0, g], coef[1, g], coef[2, g], coef[3, g]
            total_r = 0.0
            total_c = 0.0
            ends = 0.0
            dens_sum = 0.0
            past = 0.0
            for t in range(ntypes):
                lam, bstar, kind, w = types[0, t], types[1, t], types[4, t], types[5, t]
                q = types[2, t] * np.exp(-(2.0 * lam * integral[g] + 2.0 * kint))
                half = _floor(0.5 * abs(q), normal)
                log_half = np.log(half)
                sign = types[3, t]
                sum_r = 0.0
                sum_c = 0.0
                mt, st = m[g, t], s[g, t]
                bar = limit[g] / lam
                type_past = 0.0
                # the exponentials first, one loop per kind at every point (a loop the compiler vectorizes), into `a`
                if kind == KIND_PHI:
                    for j in range(2 * n - 1):
                        a[g, t, j] = _exp(_exponent(KIND_PHI, log_half, mt + st * points[j], cap))
                elif kind == KIND_PSI:
                    for j in range(2 * n - 1):
                        a[g, t, j] = _exp(_exponent(KIND_PSI, log_half, mt + st * points[j], cap))
                for j in range(n):
                    beta, rho = _state(kind, half, sign, mt + st * xi[j], a[g, t, j])
                    a[g, t, j] = beta  # the _drift needs R: beta is kept here until the second pass
                    c = _Cell(lam, bstar, beta, rho, q, param_scale)
                    dr = _risk_density(c) * w
                    dc = _curvature_density(c) * w
                    observed[0, g, t, j] = dr
                    observed[1, g, t, j] = dc
                    qw = mass[g, t, j] * (13.0 / 12.0)
                    if j > 0:
                        qw -= mass[g, t, j - 1] * (1.0 / 24.0)
                    if j < n - 1:
                        qw -= mass[g, t, j + 1] * (1.0 / 24.0)
                    sum_r += dr * qw
                    sum_c += dc * qw
                    if full:
                        dm = dr * mass[g, t, j]
                        dens_sum += dm
                        if j < 2:
                            ends += dm
                        if j >= n - 2:  # (both, as the torch path's two sums, on a grid of fewer than 4 cells)
                            ends += dm
                        if rho > bar:
                            type_past += mass[g, t, j]
                for j in range(n, 2 * n - 1):
                    a[g, t, j] = _state(kind, half, sign, mt + st * points[j], a[g, t, j])[0]
                per_type[0, g, t] = sum_r
                per_type[1, g, t] = sum_c
                total_r += sum_r
                total_c += sum_c
                past += type_past * w
            r = total_r + offset
            risk[g] = r
            totals[0, g] = r
            totals[1, g] = total_c
            if full:
                tail_share[g] = ends / _floor(dens_sum, tiny)
                unstable[g] = dim * past
            for t in range(ntypes):
                lam, bstar, sign, kind = types[0, t], types[1, t], types[3, t], types[4, t]
                diffusion[g, t] = 4.0 * noise * lam * r * types[6, t]
                for j in range(2 * n - 1):
                    a[g, t, j] = _drift(kind, lam, bstar, sign, a[g, t, j], gamma, noise, kappa, r)
                if full:
                    e_xi = e_xi2 = e_a = e_xia = 0.0
                    for j in range(n):
                        qw = mass[g, t, j] * (13.0 / 12.0)
                        if j > 0:
                            qw -= mass[g, t, j - 1] * (1.0 / 24.0)
                        if j < n - 1:
                            qw -= mass[g, t, j + 1] * (1.0 / 24.0)
                        wa = qw * a[g, t, j]
                        e_xi += qw * xi[j]
                        e_xi2 += qw * (xi[j] * xi[j])
                        e_a += wa
                        e_xia += wa * xi[j]
                    moments[0, g, t] = e_xi
                    moments[1, g, t] = _floor(e_xi2 - e_xi * e_xi, var_floor)
                    moments[2, g, t] = e_a
                    moments[3, g, t] = e_xia - e_xi * e_a

    @njit(inline="always")
    def _plan(m, s, e_xi, var_xi, e_a, cov, diff, h, tiny):  # pragma: no cover - compiled
        """:meth:`_Grid.plan` for one type: the grid velocity ``(vm, vs)`` over a step ``h``."""
        mu = m + s * e_xi
        var = s * s * var_xi
        std = np.sqrt(var)
        k = -cov / (s * var_xi)
        kh = k * h
        if abs(kh) < 1e-8:
            phi1, phi2 = 1.0 - 0.5 * kh, 1.0 - kh
        else:
            phi1, phi2 = -np.expm1(-kh) / kh, -np.expm1(-2.0 * kh) / (2.0 * kh)
        mu_end = mu + h * e_a * phi1
        std_end = np.sqrt(_floor(var * np.exp(-2.0 * kh) + 2.0 * h * diff * phi2, tiny))
        keep = np.exp(-h * (1.0 + abs(k) + diff / var))
        m_end = mu_end + (m - mu) * keep
        s_end = std_end * (1.0 + (s / std - 1.0) * keep)
        return (m_end - m) / h, (s_end - s) / h

    @njit
    def _assemble(a, diffusion, s, vm, vs, inner, gap, fl, fr, tiny, zero, pe, small, out):  # pragma: no cover
        """:meth:`_Grid.assemble` then :func:`sg_bands` into ``out`` ``(3, G T, N)``; ``pe, small`` scratch
        ``(G T, N - 1)``.  The Peclet numbers are ``(a - vm - vs g) / s / D * gap`` as in the torch path, the two
        divisions as one product by their reciprocal where it is finite (a frozen type's ``D = 0``, ``s = 1e-8``
        overflows it in float32: the divisions then, so that ``0`` stays ``0``)."""
        groups, ntypes = s.shape
        faces = inner.shape[0]
        dxi = np.empty(groups * ntypes, dtype=s.dtype)
        for g in range(groups):
            for t in range(ntypes):
                row = g * ntypes + t
                sg, v0, v1 = s[g, t], vm[g, t], vs[g, t]
                k = _floor(diffusion[g, t] / (sg * sg), tiny)
                dxi[row] = k
                scale = 1.0 / sg / k
                if np.isfinite(scale):
                    for j in range(faces):
                        pe[row, j] = (a[g, t, faces + 1 + j] - (v0 + v1 * inner[j])) * scale * gap[j]
                else:
                    for j in range(faces):
                        pe[row, j] = (a[g, t, faces + 1 + j] - (v0 + v1 * inner[j])) / sg / k * gap[j]
        _bands(pe, dxi, fl, fr, zero, small, out)

    @jit
    def _attempt(mass, m, s, integral, risk0, a0, diffusion0, moments0, coef0, coef1, coefh, coef2, limit2, dim, h,
                 control, midpoint, step_tol, types, points, gap, fl, fr, cap, normal, tiny, param_scale, offset,
                 var_floor, zero, one, nh0, nh1, y2, m1, s1, i2, errors, risk2, a2, diffusion2, moments2, observed2,
                 totals2, per_type2, tail_share2, unstable2, stiffness):  # pragma: no cover - compiled
        """One step of length ``h`` from the state with statistics ``risk0, a0, diffusion0, moments0`` (of
        :func:`evaluate` with ``full``), as ``_Grid.attempt``: MPRK22, or with ``midpoint`` the modified Patankar
        midpoint rule.  Writes ``y2`` ``(G, T, N)``, ``m1, s1`` ``(G, T)``, ``i2`` ``(G,)``, ``stiffness`` ``(G,)``
        (each member's largest ``k h``, :meth:`_Grid.plan`) and, with ``control``, ``errors`` ``(G,)``
        (:func:`_step_errors`); returns whether the step is accepted (every error at most ``step_tol``, or not
        ``control``), and then writes the new state's full statistics into ``risk2 .. unstable2`` (:func:`evaluate`'s
        outputs).  ``coef0``: the coefficients at ``(t, +1)``, ``coef1`` at ``(t + h, -1)``, ``coefh`` at
        ``(t + h/2, +1)``, ``coef2`` at ``(t + h, +1)`` (``(4, G)`` as in :func:`evaluate`), ``limit2`` and ``dim``
        the step limit there; ``zero``, ``one``, ``nh0 = -h`` and ``nh1 = -h / 2`` scalars of the arrays' dtype
        (float32 stays float32 in the solves)."""
        _ = stamp  # (the cache key, see above)
        groups, ntypes, n = mass.shape
        inner = points[n:]
        rows = groups * ntypes
        vm = np.empty_like(m)
        vs = np.empty_like(m)
        for g in range(groups):
            most = -np.inf
            for t in range(ntypes):
                vm[g, t], vs[g, t] = _plan(m[g, t], s[g, t], moments0[0, g, t], moments0[1, g, t], moments0[2, g, t],
                                          moments0[3, g, t], diffusion0[g, t], h, tiny)
                m1[g, t] = m[g, t] + h * vm[g, t]
                s1[g, t] = s[g, t] + h * vs[g, t]
                kh = -moments0[3, g, t] / (s[g, t] * moments0[1, g, t]) * h  # as _plan's (a nan wins, as torch's amax)
                if most == most and (kh != kh or kh > most):
                    most = kh
            stiffness[g] = most
        pe = np.empty((rows, n - 1), dtype=mass.dtype)
        small = np.empty_like(pe)
        bands0 = np.empty((3, rows, n), dtype=mass.dtype)
        bands1 = np.empty_like(bands0)
        _assemble(a0, diffusion0, s, vm, vs, inner, gap, fl, fr, tiny, zero, pe, small, bands0)
        rhs = mass.reshape(rows, n)
        y1 = np.empty_like(mass)
        flat1 = y1.reshape(rows, n)
        pivots = np.empty((rows, n), dtype=mass.dtype)
        _eliminate(bands0, bands0, rhs, nh0, one, rhs, flat1, pivots, False, False)
        for r in range(rows):
            for j in range(n):
                if flat1[r, j] < 0.0:
                    flat1[r, j] = 0.0
        i1 = np.empty_like(integral)
        for g in range(groups):
            i1[g] = integral[g] + h * (coef0[1, g] * risk0[g])
        risk1 = np.empty_like(integral)
        a1 = np.empty_like(a0)
        diffusion1 = np.empty_like(diffusion0)
        observed1 = np.empty((2, groups, ntypes, n), dtype=mass.dtype)
        totals1 = np.empty((2, groups), dtype=mass.dtype)
        per_type1 = np.empty((2, groups, ntypes), dtype=mass.dtype)
        no_limit = np.full(groups, np.inf, dtype=mass.dtype)
        unused = np.empty(0, dtype=mass.dtype)  # moments, tail share and step limit: an intermediate stage has none
        ratio = np.empty((rows, n), dtype=mass.dtype)
        flat2 = y2.reshape(rows, n)
        if midpoint:  # the stage at t + h/2 (on the grid there), then one solve with the weights y_half / y1
            yh = np.empty_like(mass)
            flat_h = yh.reshape(rows, n)
            _eliminate(bands0, bands0, rhs, nh1, one, rhs, flat_h, pivots, False, False)
            mh = np.empty_like(m)
            sh = np.empty_like(s)
            ih = np.empty_like(integral)
            for r in range(rows):
                for j in range(n):
                    if flat_h[r, j] < 0.0:
                        flat_h[r, j] = 0.0
            for g in range(groups):
                ih[g] = integral[g] + 0.5 * h * (coef0[1, g] * risk0[g])
                for t in range(ntypes):
                    mh[g, t] = m[g, t] + 0.5 * h * vm[g, t]
                    sh[g, t] = s[g, t] + 0.5 * h * vs[g, t]
            # the second stage at t + h/2, weights y_half / y1, one backward-Euler-like solve (_integrate_mprk22)
            ys, ms, ss, is_, cs, num, first, nh, both = yh, mh, sh, ih, coefh, flat_h, bands1, nh0, False
        else:  # MPRK22: the stage at t + h, weights y_n / y1, the trapezoid of both stages' operators
            ys, ms, ss, is_, cs, num, first, nh, both = y1, m1, s1, i1, coef1, rhs, bands0, nh1, True
        _evaluate(ys, ms, ss, is_, cs, no_limit, 0.0, False, types, points, cap, normal, tiny, param_scale,
                  offset, var_floor, risk1, a1, diffusion1, np.empty((4, 0, 0), dtype=mass.dtype), observed1,
                  totals1, per_type1, unused, unused)
        _assemble(a1, diffusion1, ss, vm, vs, inner, gap, fl, fr, tiny, zero, pe, small, bands1)
        for r in range(rows):
            for j in range(n):
                ratio[r, j] = num[r, j] / flat1[r, j] if flat1[r, j] > 0.0 else one
        _eliminate(first, bands1, ratio, nh, one, rhs, flat2, pivots, True, both)
        for g in range(groups):
            if midpoint:
                i2[g] = integral[g] + h * (coefh[1, g] * risk1[g])
            else:
                i2[g] = integral[g] + 0.5 * h * (coef0[1, g] * risk0[g] + coef1[1, g] * risk1[g])
        for r in range(rows):
            for j in range(n):
                if flat2[r, j] < 0.0:
                    flat2[r, j] = 0.0
        accepted = True
        for g in range(groups if control else 0):
            tv_w = 0.0
            tv_max = 0.0
            num_r = 0.0
            num_c = 0.0
            for t in range(ntypes):
                tv = 0.0
                for j in range(n):
                    change = abs(y2[g, t, j] - y1[g, t, j])
                    tv += change
                    num_r += change * observed1[0, g, t, j]
                    num_c += change * observed1[1, g, t, j]
                tv_w += types[5, t] * tv
                if not tv <= tv_max:  # a nan is the largest
                    tv_max = tv
            err_r = num_r / _floor(totals1[0, g], tiny)
            err_c = num_c / _floor(totals1[1, g], tiny)
            err_i = abs(i2[g] - i1[g]) / _floor(i2[g], tiny) if i2[g] > 0.0 else 0.0
            err = max(max(tv_w, err_r), max(err_c, err_i))
            if tv_max > _MAX_TYPE_TV:
                err = max(err, step_tol * tv_max / _MAX_TYPE_TV)
            finite = np.isfinite(tv_w) and np.isfinite(err_r) and np.isfinite(err_c) and np.isfinite(err_i)
            errors[g] = err if finite and np.isfinite(err) else np.inf  # a non-finite error rejects the step
            if not errors[g] <= step_tol:
                accepted = False
        if accepted:
            _evaluate(y2, m1, s1, i2, coef2, limit2, dim, True, types, points, cap, normal, tiny, param_scale, offset,
                      var_floor, risk2, a2, diffusion2, moments2, observed2, totals2, per_type2, tail_share2, unstable2)
        return accepted

    return _evaluate, _attempt
