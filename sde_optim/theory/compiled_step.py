"""The Fokker-Planck solve's MPRK22 step as one compiled loop nest on the CPU (issue 12).

:func:`~sde_optim.theory.fokker_planck._integrate_mprk22` spends its time in per-operation overhead: on a few types
of a few hundred cells one evaluation of the state (E4-E7, the moments, the Scharfetter-Gummel bands) is about
60 torch operations of a few microseconds each, for about a microsecond of arithmetic per cell.  Here the same
step is one call: the plan of the grid's motion, both stages' statistics and solves, the step's error, and on
acceptance the new state's statistics.  The exponentials of the cell loops are :func:`_exp`-style polynomials
(numba would call the C library one element at a time), in loops of their own so that they vectorize.

Each type's solves and statistics run on the cells its mass can reach (``RANGES``, :func:`_closure`): on a large
grid about half the cells are far tails where the drift of ``sinh(phi)`` makes every SG flux exactly one-sided
(``|pe| > 709``, weight ``B = 0``), whose mass is exactly 0 and stays so.  A step widens a type's range face by face
until the flux out of it is exactly 0, evaluating the drift (and, for the step's error, the densities) where the
last state's window ends; the result is the whole grid's step bit for bit (tests: same steps, same laws), for about
half the work on the grids near the critical lr (docs/benchmarks.md, twenty-fourth session).

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
from . import sg_operator
from .sg_operator import _kernels as _sg_kernels
from .types import KIND_PHI, KIND_PSI

__all__ = ["compiled_kernels", "TYPE_FIELDS"]

# rows of the (7, T) array of per-type constants the kernels take
TYPE_FIELDS = ("lam", "bstar", "q0", "sign", "kind", "weight", "active")
_EXTEND = 32  # faces past a window evaluated at once when a step's closure reaches past it (_extend)
_MAX_TYPE_TV = 0.25  # the largest total-variation change of any one type's law in one step (both steps' step control)
# _exp's constants: log2(e), log(2) in two parts (the high part exact in 33 bits), 1 / k!
_LOG2E, _LN2_HI, _LN2_LO = 1.44269504088896338700e+00, 6.93147180369123816490e-01, 1.90821492927058770002e-10
_EXP_TAYLOR = tuple(1.0 / math.factorial(k) for k in range(14))
# the kernels and their helpers, set by compiled_kernels (module globals: see there)
_floor = _exp = _exponent = _state = _drift = _plan = _assemble = _evaluate = _attempt = None
_risk_density = _curvature_density = _bands = _eliminate = _as_float = _sg_weight = _sg_couplings = None
_support = _window = _type_state = _point = _observed_at = _scale = _peclet = None
_face_states = _face_drifts = _extend = _face_drift = _face_open = _closure = None
# whether the step runs each type's solves and statistics on the cells its mass can reach (the kernels' `ranged`;
# False: every cell, the same bits up to the sign of zeros: tests)
RANGES = True


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
    global _risk_density, _curvature_density, _bands, _eliminate, _as_float, _sg_weight, _sg_couplings
    global _support, _window, _type_state, _point, _observed_at, _scale, _peclet
    global _face_states, _face_drifts, _extend, _face_drift, _face_open, _closure
    # The kernels and their helpers are module globals, not closure variables: numba keys its disk cache on the pickled
    # closure, and a dispatcher pickles with a per-process id (every process would compile again and add to the cache).
    # What the kernels compile in from other modules is tied to the cache by `stamp` instead (the only closure variable):
    # a change to a registry density, CoordinateState.residual or sg_operator's kernels makes a new key, so the cache
    # never serves code compiled from the old definitions (tested).
    _bands, _eliminate = _sg_kernels()
    _sg_weight, _sg_couplings = sg_operator._weight, sg_operator._couplings
    external = (OBSERVABLES["risk"].density, OBSERVABLES["curvature"].density, CoordinateState.residual.fget,
                _bands.py_func, _eliminate.py_func, sg_operator._series.py_func, _sg_weight.py_func,
                _sg_couplings.py_func)
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

    @njit(inline="always")
    def _support(mass, g, t):  # pragma: no cover - compiled
        """The first and last cell of type ``t`` of member ``g`` whose mass is not 0 (``(0, -1)``: none)."""
        n = mass.shape[2]
        lo = 0
        while lo < n and mass[g, t, lo] == 0.0:
            lo += 1
        if lo == n:
            return 0, -1
        hi = n - 1
        while mass[g, t, hi] == 0.0:
            hi -= 1
        return lo, hi

    @njit(inline="always")
    def _window(lo, hi, n, ranged):  # pragma: no cover - compiled
        """``(c0, c1, f0, f1)``: the cells ``c0 .. c1`` and interior faces ``f0 .. f1`` (face ``f`` between cells
        ``f`` and ``f + 1``) at which :func:`evaluate` computes a type's statistics, from its mass's support
        ``lo .. hi`` (:func:`_support`) on ``n`` cells: the support, the cell on either side (the fourth-order
        weights reach it) and the faces around it; everything if not ``ranged``.  Outside, the mass is 0, so every
        sum there adds exact zeros (the densities are finite: the state cap)."""
        if not ranged:
            return 0, n - 1, 0, n - 2
        if hi < lo:
            return 0, -1, 0, -1
        return max(lo - 1, 0), min(hi + 1, n - 1), max(lo - 1, 0), min(hi, n - 2)

    @njit(inline="always")
    def _type_state(types, t, coef, g, integral, normal):  # pragma: no cover - compiled
        """``(q, max(|q| / 2, normal), its log)`` of type ``t`` of member ``g`` (E4's ``q`` at ``int R`` and ``K``)."""
        q = types[2, t] * np.exp(-(2.0 * types[0, t] * integral[g] + 2.0 * coef[3, g]))
        half = _floor(0.5 * abs(q), normal)
        return q, half, np.log(half)

    @njit(inline="always")
    def _point(types, t, coef, g, integral, m, s, x, cap, normal, buf):  # pragma: no cover - compiled
        """``(beta, rho, q)`` of type ``t`` of member ``g`` at the grid point ``x``, one point of :func:`evaluate`'s
        loops (``buf``: one element of the dtype, for the rounding of its store)."""
        kind = types[4, t]
        q, half, log_half = _type_state(types, t, coef, g, integral, normal)
        y = m[g, t] + s[g, t] * x
        buf[0] = _exp(_exponent(kind, log_half, y, cap)) if kind == KIND_PHI or kind == KIND_PSI else 0.0
        beta, rho = _state(kind, half, types[3, t], y, buf[0])
        return beta, rho, q

    @njit(inline="always")
    def _face_states(a, g, t, f0, f1, kind, half, log_half, sign, mt, st, points, cap):  # pragma: no cover
        """``beta`` at the interior faces ``f0 .. f1`` of type ``t`` of member ``g`` into ``a`` (the exponentials
        first, in a loop of their own per kind: it vectorizes)."""
        n = (points.shape[0] + 1) // 2
        if kind == KIND_PHI:
            for j in range(n + f0, n + f1 + 1):
                a[g, t, j] = _exp(_exponent(KIND_PHI, log_half, mt + st * points[j], cap))
        elif kind == KIND_PSI:
            for j in range(n + f0, n + f1 + 1):
                a[g, t, j] = _exp(_exponent(KIND_PSI, log_half, mt + st * points[j], cap))
        for j in range(n + f0, n + f1 + 1):
            a[g, t, j] = _state(kind, half, sign, mt + st * points[j], a[g, t, j])[0]

    @njit(inline="always")
    def _face_drifts(a, g, t, f0, f1, types, coef, r, n):  # pragma: no cover - compiled
        """The drift at the faces ``f0 .. f1`` from the ``beta`` there (:func:`_face_states`), in place."""
        lam, bstar, sign, kind = types[0, t], types[1, t], types[3, t], types[4, t]
        for j in range(n + f0, n + f1 + 1):
            a[g, t, j] = _drift(kind, lam, bstar, sign, a[g, t, j], coef[0, g], coef[1, g], coef[2, g], r)

    @njit(inline="always")
    def _extend(stage, g, t, f, ctx):  # pragma: no cover - compiled
        """Widen type ``t``'s face window in ``stage`` (its ``a`` and ``windows``, in place) to face ``f`` and
        :data:`_EXTEND` faces beyond, evaluating the drift there as :func:`evaluate` does (the same passes: the
        same bits); the faces past a state's window are a step's closure (:func:`_closure`)."""
        a, windows, coef, integral, m, s, risk = stage[0], stage[1], stage[2], stage[3], stage[4], stage[5], stage[6]
        types, points, cap, normal = ctx[0], ctx[1], ctx[5], ctx[6]
        n = (points.shape[0] + 1) // 2
        f0, f1 = windows[2, g, t], windows[3, g, t]
        if f1 < f0:  # an empty window (a type with no mass: never a closure's, kept for safety)
            j0, j1 = max(f - _EXTEND, 0), min(f + _EXTEND, n - 2)
            windows[2, g, t], windows[3, g, t] = j0, j1
        elif f > f1:
            j0, j1 = f1 + 1, min(f + _EXTEND, n - 2)
            windows[3, g, t] = j1
        else:
            j0, j1 = max(f - _EXTEND, 0), f0 - 1
            windows[2, g, t] = j0
        q, half, log_half = _type_state(types, t, coef, g, integral, normal)
        _face_states(a, g, t, j0, j1, types[4, t], half, log_half, types[3, t], m[g, t], s[g, t], points, cap)
        _face_drifts(a, g, t, j0, j1, types, coef, risk[g], n)

    @njit(inline="always")
    def _observed_at(types, t, coef, g, integral, m, s, x, cap, normal, param_scale, buf):  # pragma: no cover
        """The E7 risk and curvature densities times ``pi`` of type ``t`` of member ``g`` at the cell centre ``x``, as
        :func:`evaluate` writes them into ``observed``."""
        beta, rho, q = _point(types, t, coef, g, integral, m, s, x, cap, normal, buf)
        c = _Cell(types[0, t], types[1, t], beta, rho, q, param_scale)
        buf[0] = _risk_density(c) * types[5, t]
        dr = buf[0]
        buf[0] = _curvature_density(c) * types[5, t]
        return dr, buf[0]

    @jit
    def _evaluate(mass, m, s, integral, coef, limit, dim, full, ranged, windows, types, points, cap, normal, tiny,
                  param_scale, offset, var_floor, risk, a, diffusion, moments, observed, totals, per_type, tail_share,
                  unstable):  # pragma: no cover - compiled
        """:meth:`_Grid.statistics` of the state ``mass`` ``(G, T, N)``, ``m, s`` ``(G, T)``, ``int R`` ``(G,)``.

        ``coef`` ``(4, G)``: ``gamma, nu, kappa, K`` at the time and side; ``limit`` ``(G,)`` the step limit
        (``inf``: none) and ``dim`` its ``d``; ``types`` ``(7, T)`` (:data:`TYPE_FIELDS`); ``points`` ``(2N - 1,)``
        the cell centres then the interior faces; ``normal`` the dtype's smallest normal number (the state map's and the
        SG weights' floor), ``tiny`` :func:`~sde_optim.theory.statistics.tiny` (every other division's).  Writes ``risk`` ``(G,)`` (E1 with ``sigma^2/2``), ``a``
        ``(G, T, 2N - 1)`` the drift at centres then faces, ``diffusion`` ``(G, T)`` (E6), ``observed``
        ``(2, G, T, N)`` (E7 risk and curvature densities times ``pi``), ``totals`` ``(2, G)`` (``R``, ``C``),
        ``per_type`` ``(2, G, T)``; with ``full``: ``moments`` ``(4, G, T)`` (``E xi``, ``Var xi`` floored at
        ``var_floor``, ``E a``, ``Cov(xi, a)``, fourth-order weights), ``tail_share`` and ``unstable`` ``(G,)``.
        With ``ranged``, ``a`` and ``observed`` are written on each type's :func:`_window` only, written into
        ``windows`` ``(4, G, T)`` (the sums are the same: they add exact zeros elsewhere); :func:`attempt` computes
        them elsewhere where it needs them."""
        _ = stamp  # (the cache key, see above)
        groups, ntypes, n = mass.shape
        xi = points[:n]
        for g in range(groups):
            gamma, noise, kappa = coef[0, g], coef[1, g], coef[2, g]
            total_r = 0.0
            total_c = 0.0
            ends = 0.0
            dens_sum = 0.0
            past = 0.0
            for t in range(ntypes):
                lam, bstar, kind, w = types[0, t], types[1, t], types[4, t], types[5, t]
                q, half, log_half = _type_state(types, t, coef, g, integral, normal)
                lo, hi = _support(mass, g, t) if ranged else (0, n - 1)
                c0, c1, f0, f1 = _window(lo, hi, n, ranged)
                windows[0, g, t], windows[1, g, t], windows[2, g, t], windows[3, g, t] = c0, c1, f0, f1
                sign = types[3, t]
                sum_r = 0.0
                sum_c = 0.0
                mt, st = m[g, t], s[g, t]
                bar = limit[g] / lam
                type_past = 0.0
                # the exponentials first, one loop per kind at every point (a loop the compiler vectorizes), into `a`
                if kind == KIND_PHI:
                    for j in range(c0, c1 + 1):
                        a[g, t, j] = _exp(_exponent(KIND_PHI, log_half, mt + st * points[j], cap))
                elif kind == KIND_PSI:
                    for j in range(c0, c1 + 1):
                        a[g, t, j] = _exp(_exponent(KIND_PSI, log_half, mt + st * points[j], cap))
                for j in range(c0, c1 + 1):
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
                _face_states(a, g, t, f0, f1, kind, half, log_half, sign, mt, st, points, cap)
                per_type[0, g, t] = sum_r
                per_type[1, g, t] = sum_c
                total_r += sum_r
                total_c += sum_c
                past += type_past * w
            risk[g] = total_r + offset
            r = risk[g]  # (in the dtype: the drift evaluated by _extend reads it from here)
            totals[0, g] = r
            totals[1, g] = total_c
            if full:
                tail_share[g] = ends / _floor(dens_sum, tiny)
                unstable[g] = dim * past
            for t in range(ntypes):
                lam, bstar, sign, kind = types[0, t], types[1, t], types[3, t], types[4, t]
                c0, c1, f0, f1 = windows[0, g, t], windows[1, g, t], windows[2, g, t], windows[3, g, t]
                diffusion[g, t] = 4.0 * noise * lam * r * types[6, t]
                for j in range(c0, c1 + 1):
                    a[g, t, j] = _drift(kind, lam, bstar, sign, a[g, t, j], gamma, noise, kappa, r)
                _face_drifts(a, g, t, f0, f1, types, coef, r, n)
                if full:
                    e_xi = e_xi2 = e_a = e_xia = 0.0
                    for j in range(c0, c1 + 1):
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

    @njit(inline="always")
    def _scale(diffusion, sg, tiny):  # pragma: no cover - compiled
        """``(k, 1 / s / k)``: a type's diffusion in ``xi`` (``D / s^2``, floored at ``tiny``) and the factor of its
        Peclet numbers (:meth:`_Grid.assemble`)."""
        k = _floor(diffusion / (sg * sg), tiny)
        return k, 1.0 / sg / k

    @njit(inline="always")
    def _peclet(af, v0, v1, face, gap, sg, k, scale):  # pragma: no cover - compiled
        """The Peclet number ``(a - v0 - v1 face) / s / D * gap`` of a face with drift ``af``: the two divisions as
        one product by their reciprocal where it is finite (a frozen type's ``D = 0``, ``s = 1e-8`` overflows it in
        float32: the divisions then, so that ``0`` stays ``0``)."""
        if np.isfinite(scale):
            return (af - (v0 + v1 * face)) * scale * gap
        return (af - (v0 + v1 * face)) / sg / k * gap

    @njit(inline="always")
    def _face_drift(stage, g, t, f, ctx):  # pragma: no cover - compiled
        """The drift at face ``f`` of type ``t`` of member ``g`` in one stage, from ``a`` (its window widened first
        where ``f`` is past it, :func:`_extend`)."""
        windows = stage[1]
        if not windows[2, g, t] <= f <= windows[3, g, t]:
            _extend(stage, g, t, f, ctx)
        return stage[0][g, t, (ctx[1].shape[0] + 1) // 2 + f]

    @njit(inline="always")
    def _face_open(stage, g, t, f, right, vm, vs, ctx):  # pragma: no cover - compiled
        """Whether the SG flux out of face ``f``'s left cell to the right (``right``: ``cp``) or out of its right
        cell to the left (``cm``) in one stage's bands is not exactly 0, as the bands kernel forms it.  Where
        ``|pe| < safe`` (half the log of the dtype's largest number) and ``k * fl`` (or ``fr``) is at least ``kmin``
        (``e^-safe``) the weight ``B(|pe|) >= safe e^-safe`` and the product is a normal number: open, without the
        weight's ``expm1``; elsewhere the kernel's own arithmetic decides."""
        s, diffusion = stage[5], stage[7]
        points, gap, fl, fr, tiny, zero, buf, safe, kmin = (ctx[1], ctx[2], ctx[3], ctx[4], ctx[7], ctx[8], ctx[9],
                                                           ctx[10], ctx[11])
        n = (points.shape[0] + 1) // 2
        af = _face_drift(stage, g, t, f, ctx)
        k, scale = _scale(diffusion[g, t], s[g, t], tiny)
        buf[0] = _peclet(af, vm[g, t], vs[g, t], points[n + f], gap[f], s[g, t], k, scale)
        p = buf[0]
        buf[0] = k
        kr = buf[0]
        buf[0] = kr * (fl[f] if right else fr[f])
        if abs(p) < safe and buf[0] >= kmin:
            return True
        buf[0] = _sg_weight(abs(p), zero)
        cp, cm = _sg_couplings(buf[0], p, kr, fl[f], fr[f], zero)
        return (cp if right else cm) != 0.0

    @njit
    def _assemble(stage, vm, vs, ctx, first, last, pe, dxi, small, out):  # pragma: no cover - compiled
        """:meth:`_Grid.assemble` then :func:`sg_bands` into ``out`` ``(3, G T, N)`` on each system's cells
        ``first .. last`` (``(G T,)``; none where ``last < first``); ``pe`` and ``small`` scratch ``(G T, N - 1)``,
        ``dxi`` ``(G T,)``.  A type's window is widened first where the cells reach past it (:func:`_extend`)."""
        a, windows, s, diffusion = stage[0], stage[1], stage[5], stage[7]
        points, gap, fl, fr, tiny, zero = ctx[1], ctx[2], ctx[3], ctx[4], ctx[7], ctx[8]
        groups, ntypes = s.shape
        n = (points.shape[0] + 1) // 2
        for g in range(groups):
            for t in range(ntypes):
                row = g * ntypes + t
                sg, v0, v1 = s[g, t], vm[g, t], vs[g, t]
                k, scale = _scale(diffusion[g, t], sg, tiny)
                dxi[row] = k
                lo, hi = first[row], last[row] - 1  # the faces between the system's cells
                if lo <= hi:
                    if windows[3, g, t] < windows[2, g, t] or lo < windows[2, g, t]:
                        _extend(stage, g, t, lo, ctx)
                    if hi > windows[3, g, t]:
                        _extend(stage, g, t, hi, ctx)
                for j in range(lo, hi + 1):  # (a loop that vectorizes)
                    pe[row, j] = _peclet(a[g, t, n + j], v0, v1, points[n + j], gap[j], sg, k, scale)
        _bands(pe, dxi, fl, fr, zero, small, out, first, last)

    @njit
    def _closure(stage0, stage1, ratio, vm, vs, ctx, first, last):  # pragma: no cover - compiled
        """Widen each system's cells ``first .. last`` (in place) until no flux leaves them: the cells its solve can
        put mass in.  ``stage1`` None: stage 1's system ``I - h A0``, whose flux out of the right end is ``cp`` of
        ``A0`` at the end face; else stage 2's ``I - h/2 (A0 diag(ratio) + A1)``: ``cp0 ratio + cp1`` (the
        column of the inner cell scaled).  A range stops at a face only where its outward coupling is exactly 0
        (``|pe| > 709`` on the upwind side: the SG flux is exactly one-sided there) *and* no rounding made it so
        (``cp0 = 0`` or ``ratio = 0``, not a product that underflowed): then the cells beyond start empty and
        receive nothing, and the elimination on the range is the whole system's elimination bit for bit (its
        forward sweep enters the range with a zero coupling, its back substitution leaves it with zeros).  A nan
        coupling is not 0: the range grows to the whole system, whose solve is the nan it was."""
        groups, ntypes = vm.shape
        n = ratio.shape[1]
        for g in range(groups):
            for t in range(ntypes):
                row = g * ntypes + t
                if last[row] < first[row]:
                    continue
                while last[row] < n - 1:
                    f = last[row]
                    open0 = _face_open(stage0, g, t, f, True, vm, vs, ctx)
                    if stage1 is None:
                        stop = not open0
                    else:
                        stop = (not open0 or ratio[row, f] == 0.0) and not _face_open(stage1, g, t, f, True, vm, vs, ctx)
                    if stop:
                        break
                    last[row] += 1
                while first[row] > 0:
                    f = first[row] - 1
                    open0 = _face_open(stage0, g, t, f, False, vm, vs, ctx)
                    if stage1 is None:
                        stop = not open0
                    else:
                        stop = ((not open0 or ratio[row, f + 1] == 0.0)
                                and not _face_open(stage1, g, t, f, False, vm, vs, ctx))
                    if stop:
                        break
                    first[row] -= 1

    @jit
    def _attempt(mass, m, s, integral, risk0, a0, diffusion0, moments0, coef0, coef1, coef2, limit2, dim, h, control,
                 step_tol, ranged, types, points, gap, fl, fr, cap, normal, tiny, param_scale, offset, var_floor, zero,
                 one, nh0, nh1, y2, m1, s1, i2, errors, risk2, a2, diffusion2, moments2, observed2, totals2, per_type2,
                 tail_share2, unstable2):  # pragma: no cover - compiled
        """One MPRK22 step of length ``h`` from the state with statistics ``risk0, a0, diffusion0, moments0`` (of
        :func:`evaluate` with ``full``), as ``_Grid.attempt``: writes ``y2`` ``(G, T, N)``, ``m1, s1`` ``(G, T)``,
        ``i2`` ``(G,)`` and, with ``control``, ``errors`` ``(G,)`` (:func:`_step_errors`); returns whether the step is
        accepted (every error at most ``step_tol``, or not ``control``), and then writes the new state's full
        statistics into ``risk2 .. unstable2`` (:func:`evaluate`'s outputs).  ``coef0``: the coefficients at
        ``(t, +1)``, ``coef1`` at ``(t + h, -1)``, ``coef2`` at ``(t + h, +1)`` (``(4, G)`` as in :func:`evaluate`),
        ``limit2`` and ``dim`` the step limit there; ``zero``, ``one``, ``nh0 = -h`` and ``nh1 = -h / 2`` scalars of
        the arrays' dtype (float32 stays float32 in the solves).

        With ``ranged`` (``RANGES``) each type's two solves and statistics run on the cells their mass can reach
        (:func:`_closure`; outside, the mass is exactly 0 before and after the step): about half the cells of a
        large grid are far tails whose SG flux is exactly one-sided (``|pe| > 709``).  The step is the whole
        grid's step bit for bit wherever that one is finite (tests), up to the sign of zeros."""
        _ = stamp  # (the cache key, see above)
        groups, ntypes, n = mass.shape
        rows = groups * ntypes
        buf = np.empty(1, dtype=mass.dtype)
        safe = 4.0 * cap  # half the log of the dtype's largest number (cap is an eighth): _face_open
        ctx = (types, points, gap, fl, fr, cap, normal, tiny, zero, buf, safe, np.exp(-safe))
        vm = np.empty_like(m)
        vs = np.empty_like(m)
        first1 = np.empty(rows, dtype=np.int64)
        last1 = np.empty(rows, dtype=np.int64)
        windows0 = np.empty((4, groups, ntypes), dtype=np.int64)  # where a0 holds the drift (the last evaluation's)
        for g in range(groups):
            for t in range(ntypes):
                vm[g, t], vs[g, t] = _plan(m[g, t], s[g, t], moments0[0, g, t], moments0[1, g, t], moments0[2, g, t],
                                          moments0[3, g, t], diffusion0[g, t], h, tiny)
                m1[g, t] = m[g, t] + h * vm[g, t]
                s1[g, t] = s[g, t] + h * vs[g, t]
                lo, hi = _support(mass, g, t) if ranged else (0, n - 1)
                first1[g * ntypes + t], last1[g * ntypes + t] = lo, hi
                windows0[0, g, t], windows0[1, g, t], windows0[2, g, t], windows0[3, g, t] = _window(lo, hi, n, ranged)
        stage0 = (a0, windows0, coef0, integral, m, s, risk0, diffusion0)
        pe = np.empty((rows, n - 1), dtype=mass.dtype)
        small = np.empty_like(pe)
        dxi = np.empty(rows, dtype=mass.dtype)
        bands0 = np.empty((3, rows, n), dtype=mass.dtype)
        bands1 = np.empty_like(bands0)
        rhs = mass.reshape(rows, n)
        ratio = np.empty((rows, n), dtype=mass.dtype)
        _closure(stage0, None, ratio, vm, vs, ctx, first1, last1)
        _assemble(stage0, vm, vs, ctx, first1, last1, pe, dxi, small, bands0)
        y1 = np.empty_like(mass)
        flat1 = y1.reshape(rows, n)
        pivots = np.empty((rows, n), dtype=mass.dtype)
        _eliminate(bands0, bands0, rhs, nh0, one, rhs, flat1, pivots, False, False, first1, last1)
        for r in range(rows):
            for j in range(first1[r], last1[r] + 1):
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
        windows1 = np.empty_like(windows0)
        _evaluate(y1, m1, s1, i1, coef1, no_limit, 0.0, False, ranged, windows1, types, points, cap, normal, tiny,
                  param_scale, offset, var_floor, risk1, a1, diffusion1, np.empty((4, 0, 0), dtype=mass.dtype),
                  observed1, totals1, per_type1, unused, unused)
        stage1 = (a1, windows1, coef1, i1, m1, s1, risk1, diffusion1)
        for r in range(rows):  # (y1 and y_n are 0 outside stage 1's cells)
            for j in range(n):
                if first1[r] <= j <= last1[r]:
                    ratio[r, j] = rhs[r, j] / flat1[r, j] if flat1[r, j] > 0.0 else one
                else:
                    ratio[r, j] = one
        first2, last2 = first1.copy(), last1.copy()
        _closure(stage0, stage1, ratio, vm, vs, ctx, first2, last2)
        grow_first = np.zeros(rows, dtype=np.int64)  # the systems whose cells stage 2 widened: bands0 there again
        grow_last = np.full(rows, -1, dtype=np.int64)
        grown = False
        for r in range(rows):
            if first2[r] != first1[r] or last2[r] != last1[r]:
                grow_first[r], grow_last[r] = first2[r], last2[r]
                grown = True
        if grown:
            _assemble(stage0, vm, vs, ctx, grow_first, grow_last, pe, dxi, small, bands0)
        _assemble(stage1, vm, vs, ctx, first2, last2, pe, dxi, small, bands1)
        flat2 = y2.reshape(rows, n)
        _eliminate(bands0, bands1, ratio, nh1, one, rhs, flat2, pivots, True, True, first2, last2)
        for r in range(rows):
            for j in range(first2[r], last2[r] + 1):
                if flat2[r, j] < 0.0:
                    flat2[r, j] = 0.0
        for g in range(groups):
            i2[g] = integral[g] + 0.5 * h * (coef0[1, g] * risk0[g] + coef1[1, g] * risk1[g])
        accepted = True
        for g in range(groups if control else 0):
            tv_w = 0.0
            tv_max = 0.0
            num_r = 0.0
            num_c = 0.0
            for t in range(ntypes):
                tv = 0.0
                row = g * ntypes + t
                c0, c1 = windows1[0, g, t], windows1[1, g, t]
                for j in range(first2[row], last2[row] + 1):  # (y1 and y2 are 0 elsewhere)
                    change = abs(y2[g, t, j] - y1[g, t, j])
                    tv += change
                    if c0 <= j <= c1:
                        num_r += change * observed1[0, g, t, j]
                        num_c += change * observed1[1, g, t, j]
                    elif change != 0.0:  # mass where y1 has none, past its window
                        dr, dc = _observed_at(types, t, coef1, g, i1, m1, s1, points[j], cap, normal, param_scale, buf)
                        num_r += change * dr
                        num_c += change * dc
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
            _evaluate(y2, m1, s1, i2, coef2, limit2, dim, True, ranged, np.empty_like(windows0), types, points, cap,
                      normal, tiny, param_scale, offset, var_floor, risk2, a2, diffusion2, moments2, observed2, totals2,
                      per_type2, tail_share2, unstable2)
        return accepted

    return _evaluate, _attempt
