"""Finite-volume solver of the mean-field Fokker-Planck system E6 (with E4 for ``q``).

Per type ``tau`` the density ``p_tau(t, x)`` of the well-posed coordinate ``x`` (``phi`` of
E5, or ``psi = log|beta|`` for balanced types, THEORY §3) solves

    d/dt p = -d/dx [ a_tau(x, t) p ] + D_tau(t) d^2/dx^2 p,        p(0) = delta(x0)
    a = -2 gamma lam (beta - beta*)                          (phi, E5/E6)
    a = -2 gamma lam (beta - beta*) sgn(beta) - 2 gamma^2 lam R/B   (psi, THEORY §3 end)
    D = 4 gamma^2 lam R(t) / B,   q_tau(t) = q0 exp(-2 gamma^2 lam I(t) / B),  I' = R  (E4)
    R(t) = sigma^2/2 + sum_tau pi_tau int lam (beta - beta*)^2 / 2 p_tau dx

Numerics (see THEORY §4, "A measured warning about grids"):

* **Co-moving grid per type.** ``x = m_tau(t) + s_tau(t) g(xi)`` on a fixed uniform grid
  ``xi in [-L, L]`` with ``N`` cells, stretched by ``g = sinh(alpha xi) / alpha`` (cells grow like
  ``cosh(alpha xi)`` towards a window of 20 standard deviations, :class:`_Grid`).  In ``xi`` the equation is the same Fokker-Planck
  equation with drift ``(a - m' - s' xi)/s`` and diffusion ``D/s^2`` (an ALE change of
  variables, exact for any grid motion), so the grid may move however is convenient: over each
  time step it moves with one velocity, onto the law's mean and spread predicted for the end
  of the step from the discrete moments (``mu' = E[a]``, ``V' = 2 Cov(x, a) + 2 D`` with the drift
  linearized, solved exactly over the step: stable for any step however fast a type relaxes).
  A support type whose density collapses like ``sqrt(R)`` keeps the same number of cells
  across it and no remapping diffusion is introduced.  (An earlier version evolved ``m, s``
  by the moment ODEs with a weak relaxation onto the discrete moments; at a variance
  equilibrium that ODE is neutral to ``s != std``, so on a spectrum with a spike -- a type
  relaxing 100x faster than the rest -- the grid stayed 3x too wide, the law collapsed into one
  cell and the fourth-order quadrature returned a negative risk.)
* **Scharfetter-Gummel flux** (exponential fitting) on every face: exact for constant
  coefficients in both the diffusive and the advective limit; the semi-discrete operator
  has non-negative off-diagonals and zero-flux ends, so mass is conserved to round-off and
  positivity is preserved by the exact semi-discrete flow.
* **Delta start.** The solve starts at ``t0`` (default ``1e-4``) from the analytic
  short-time solution, a Gaussian of mean ``x0 + a(x0) t0`` and variance ``2 D(0) t0``
  (cell averages through the normal CDF).
* **Time integration: an implicit scheme, chosen by measurement.**  The method of lines
  through :func:`torchdiffeq.odeint` (dopri5, rtol 1e-6) was tried first.  On THEORY §6 (3
  types, horizon ``t = 20``) it needed 1664 / 4766 / 16220 right-hand-side evaluations and
  2.8 / 10.9 / 32 s (2 shared cores) for ``N = 48 / 96 / 192`` cells: the count grows like
  ``N^2``, the signature of diffusive stiffness (``D/s^2 h^2``), so it was dropped.  The
  integrator is MPRK22 (modified Patankar-Runge-Kutta, second order, linearly implicit: two
  tridiagonal M-matrix solves per step, so positivity and mass conservation hold for every
  step size), with adaptive steps (:func:`_integrate_mprk22`).
* **Quadrature.** Observables and ``R`` use fourth-order weights from the cell masses
  (:func:`quadrature_weights`, a Sheppard-type correction of the midpoint rule).
  Measured spatial error (THEORY §6, ``sigma = 0``, ``t <= 20``, vs ``N = 384``):
  1.2e-2 / 5.7e-3 / 2.0e-3 / 1.4e-3 at ``N = 48 / 64 / 96 / 128``; with the plain midpoint
  rule the late-time risk was 0.9 % off at ``N = 64``.  A uniform grid over the whole phi
  range is not used at all (THEORY §4's warning): the co-moving grid keeps ``N / 2L`` cells per standard
  deviation of every type at every time; ``N`` is chosen by the a posteriori error check of
  :func:`solve_fokker_planck` (5 to 10 per standard deviation on easy problems at ``tol = 1e-3``,
  about 80 near the critical step).
* **Richardson in the cells.** On the same time steps the cells converge at second order, and the grid check
  answers with the extrapolation of its last two grids where that is the better answer (:func:`refine_grid_batch`,
  :attr:`FokkerPlanckSolution.coarser`): 4x fewer cells near the critical lr for the same error.
* **Divergence.** When ``R`` exceeds ``blowup_factor * R(0)`` the integration stops and the state is held;
  :attr:`FokkerPlanckSolution.diverged_at` is the first output time past the threshold.

All tensors are float64 by default and live on the types' device.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .._validation import check_float, check_int
from ..observables import OBSERVABLES, CoordinateState
from .compiled_step import _MAX_TYPE_TV, TYPE_FIELDS, compiled_kernels  # (_MAX_TYPE_TV: both steps' cap)
from .dynamics import MeanFieldDynamics, _state_cap
from .statistics import tiny, weighted
from .sg_operator import _compiled, _scalar, implicit_solve, sg_bands

_RISK, _CURVATURE = OBSERVABLES["risk"], OBSERVABLES["curvature"]

__all__ = ["FokkerPlanckSolution", "solve_fokker_planck", "solve_on_grid", "solve_batch_on_grid", "refine_grid", "refine_grid_batch", "refine_grid_on_subset",
           "grid_level", "cells_for_tolerance", "MeanFieldDynamics", "Budget", "WorkLimitError"]


STRETCH = 0.5  # alpha of the cell map g(xi) = sinh(alpha xi) / alpha (see _Grid)
# Whether solves on the CPU (float32/float64) take the compiled step (compiled_step.py) instead of the torch operations
# of _Grid (the definition, and the path on every other device); the tests compare the two.  SDE_OPTIM_COMPILED_STEP=0
# in the environment turns it off (a numba problem on some platform: the torch path is 1.6-8x slower, the same answers)
COMPILED_STEP = os.environ.get("SDE_OPTIM_COMPILED_STEP", "1") != "0"


def _stretch(xi: Tensor) -> Tensor:
    """The cell map ``g(xi) = sinh(alpha xi) / alpha`` (``alpha`` = :data:`STRETCH`; ``xi`` itself for 0)."""
    return xi if STRETCH == 0 else torch.sinh(STRETCH * xi) / STRETCH


# The window widens with the cells: WINDOW_GROWTH std per doubling above WINDOW_BASE_CELLS (see grid_window).
WINDOW_GROWTH, WINDOW_BASE_CELLS = 3.0, 60

# Default cap of the grid refinement in cell updates (types x cells x operator evaluations, summed over its solves).
# One cell update costs ~0.1-0.3 us here (a 193-type, 539-cell solve of 6950 evaluations: 106 s), so 1e9 is a few
# minutes at most; the accuracy tables' predictions spend at most 2.7e8 in all their solves (pl-sparse-gauss at
# d = 16384), THEORY §6 and two-level-noisy at 0.8x the critical lr 2.0e8 and 4.0e8 (docs/benchmarks.md).
MAX_WORK = 1e9


def grid_window(n_cells: int, half_width: float) -> float:
    """Half-width (std units) of the window of a grid of ``n_cells`` cells: ``half_width`` up to
    :data:`WINDOW_BASE_CELLS` cells, then :data:`WINDOW_GROWTH` more per doubling (26 at 240 cells, 35 at 1920).

    So the window's truncation error falls with the cells, and every pair of solves the grid check compares
    (``N`` and ``2 N`` cells, :func:`refine_grid_batch`) sees it: a fixed window's error does not fall with
    refinement, so no pair of grids could measure it.  Measured at ``d = 4096`` (same central cells and steps, 20
    against 30 and 45 std): THEORY §6 at lr 4 and 8, 5.3e-4 and 1.8e-4 (an error the check did not see, half the
    default tol; the share of ``R`` in the end cells was 3-60x smaller, so it is no estimate of it), lr 0.5 1e-5,
    two-level-noisy 1e-7; 3 std more cut it ~2x near the critical lr.  The price: the centre keeps the spacing of
    ``N`` cells over ``half_width``, so a wider window has more cells (:class:`_Grid`; ``L = asinh(alpha W)/alpha``
    grows like ``2 log W``: 9 % more at 240 cells, 19 % at 1920, 21 % at 3840).
    """
    return half_width + WINDOW_GROWTH * max(0.0, math.log2(n_cells / WINDOW_BASE_CELLS))


def reference_half_width(half_width: float) -> float:
    """The uniform reference grid's half-width ``L`` whose image ``g(L)`` is the window ``half_width`` (std units)."""
    return half_width if STRETCH == 0 else math.asinh(STRETCH * half_width) / STRETCH


def cells_for_tolerance(tol: float, half_width: float) -> int:
    """Number of cells for a target relative accuracy ``tol`` of the observables.

    Measured on the uniform grid of earlier versions (cells ``h = 2L/N`` wide in units of the type's standard
    deviation, ``L`` its half-width; THEORY §6, ``sigma = 0``, ``gamma = 0.5``, ``t <= 20``, against ``N = 384``):
    largest relative risk/curvature error 1.15e-2, 5.7e-3, 2.0e-3, 1.4e-3 at ``N = 48, 64, 96, 128`` (``L = 9``),
    i.e. about ``0.08 h^2``; with ``sigma = 0.3, B = 4, gamma = 2`` about ``0.015 h^2``.  So ``h = sqrt(tol / 0.1)``
    and ``N = 2 L / h`` with ``L = 0.6 half_width``: the uniform grid's count at the default window (12 of 20 std),
    kept for the stretched cells (:class:`_Grid`), which are then twice as fine at the centre.  Fewer cells (the
    stretched grid's own ``2 L_ref / h``) were tried: the combination technique of the continuous-types path
    (:func:`refine_grid_on_subset`) measures the types' effect on level 0 (``N / 4`` cells), whose cells at the
    window's edge were then 7 std wide, and its estimate no longer fell with the level (a log-uniform spectrum at
    ``d = 2048`` refined to 1088 cells and 6 minutes instead of 136 cells in 5 s).  Clamped to ``[32, 1024]``.
    """
    h = math.sqrt(tol / 0.1)
    return int(min(1024, max(32, math.ceil(2 * 0.6 * half_width / h))))


class WorkLimitError(RuntimeError):
    """A prediction needed more work than its budget allows (the message names the knob to turn)."""


class Budget:
    """A cap on operator evaluations (and, optionally, seconds) shared by every solve of one prediction."""

    def __init__(self, max_evaluations: int | None = None, max_seconds: float | None = None) -> None:
        import time

        self.max_evaluations = max_evaluations
        self.max_seconds = max_seconds
        self.used = 0
        self._clock = time.perf_counter
        self._start = self._clock()

    def spend(self, n: int = 1) -> None:
        self.used += n
        if self.max_evaluations is not None and self.used > self.max_evaluations:
            raise WorkLimitError(f"the prediction needed more than max_evaluations={self.max_evaluations} operator "
                                 "evaluations; raise max_evaluations, relax tol, or shorten the horizon (steps)")
        if self.max_seconds is not None and self._clock() - self._start > self.max_seconds:
            raise WorkLimitError(f"the prediction ran longer than max_seconds={self.max_seconds:g} s; raise "
                                 "max_seconds, relax tol, or shorten the horizon (steps)")


@dataclass
class FokkerPlanckSolution:
    """Solution of E6 on the co-moving grids at the output times.

    Attributes:
        t: output times, shape ``(n,)``.
        xi: cell centres ``g(xi_j)`` in the law's std units (the stretched map of :class:`_Grid`), shape ``(N,)``;
            ``h`` the spacing of the uniform reference grid ``xi_j``.
        mass: cell masses ``p dx`` per type, shape ``(n, T, N)`` (each type sums to 1).
        center, scale: ``m_tau(t)``, ``s_tau(t)``, shape ``(n, T)``.
        integral_r: the noise integral ``I(t) = int_0^t nu R`` of E4 (:class:`MeanFieldDynamics`), shape ``(n,)``.
        risk: ``R(t)``, shape ``(n,)``.
        diverged_at: first output time with ``R > blowup_factor R(0)`` (or non-finite), else None.
        nfe: right-hand-side evaluations; tail_mass: largest mass in an end cell over the run.
        error_estimate: a posteriori relative error of ``R`` and ``C`` (``None`` without refinement).
        levels: number of grids solved beyond the first (coarse) one.
        schedule: the time steps taken (from ``t0``), to replay on other types (:func:`solve_on_grid`).
        curves: ``(n, 2, T)`` each type's weighted contribution to the excess risk and the curvature (E7) at the
            output times, as the solve computed them (``None``: computed from the laws by :meth:`type_curves`).
        coarser: None, or the same law solved on the same time steps with half the cells: the answer is then the
            Richardson extrapolation ``(4 self - coarser) / 3`` of every curve (:meth:`terms`, :meth:`answer_curves`),
            and ``error_estimate`` is that answer's error (the grid check sets it, :func:`refine_grid_batch`).  The
            other fields are this solve's own.
    """

    t: Tensor
    xi: Tensor
    h: float
    mass: Tensor
    center: Tensor
    scale: Tensor
    integral_r: Tensor
    risk: Tensor
    dynamics: MeanFieldDynamics
    diverged_at: float | None
    nfe: int
    tail_mass: float
    error_estimate: float | None = None
    levels: int = 0
    schedule: list[float] = field(default_factory=list)
    curves: Tensor | None = None
    coarser: "FokkerPlanckSolution | None" = None

    def terms(self) -> list[tuple[float, "FokkerPlanckSolution"]]:
        """The answer as a combination ``[(coefficient, solve)]`` of plain solves: ``[(1, self)]``, or with
        :attr:`coarser` the Richardson extrapolation ``[(4/3, self), (-1/3, coarser)]`` (second order in the cells)."""
        if self.coarser is None:
            return [(1.0, self)]
        return [(4.0 / 3.0, self), (-1.0 / 3.0, self.coarser)]

    def answer_curves(self) -> Tensor:
        """``(2, n)``: ``R`` and ``C`` of the answer (:meth:`terms`) at the output times (what ``error_estimate``
        is the error of)."""
        return sum(a * _observed_curves(sol) for a, sol in self.terms())

    def imbalance_lost(self) -> float | None:
        """The first output time at which some ``phi`` type (of nonzero weight) has ``|q|`` below twice the dtype's
        smallest normal number, else None.  E4 takes ``|q|`` down at a rate ``2 gamma^2 lam R / B``; once it is that
        small the state map holds it there (:func:`~sde_optim.theory.coords.phi_to_state`), so the law no longer
        follows E4-E6 (the balanced coordinate ``psi`` would; a three-level spectrum with label noise at half the
        critical lr reaches it at ``t ~ 5.2``, docs/benchmarks.md).  ``|q|`` only decreases, so the last time decides."""
        dyn = self.dynamics
        watched = dyn.is_phi & (dyn.weight > 0)
        if not bool(watched.any()):
            return None
        limit = 2.0 * torch.finfo(dyn.q0.dtype).tiny

        def lost(i: int) -> bool:
            return bool(((dyn.q(self.integral_r[i], float(self.t[i])).abs() < limit) & watched).any())

        if not lost(self.t.numel() - 1):
            return None
        return float(self.t[next(i for i in range(self.t.numel()) if lost(i))])

    def points(self, times: slice = slice(None)) -> tuple[CoordinateState, Tensor]:
        """CoordinateState at all cell centres, fields ``(n, T, N)``, and quadrature weights ``pi * w(mass)``.

        ``w`` are the fourth-order weights of :func:`quadrature_weights`.  ``times``: only these output times
        (``n`` of them; a caller bounds its temporaries by taking the times in chunks, :meth:`chunks`).
        """
        dyn = self.dynamics
        x = self.center[times, :, None] + self.scale[times, :, None] * self.xi
        q = torch.stack([dyn.q(i, float(t)) for i, t in zip(self.integral_r[times], self.t[times])])  # (n, T, 1)
        return dyn.state(x, q), quadrature_weights(self.mass[times]) * dyn.weight  # the times in one call

    def chunks(self, points: int = 1 << 18) -> list[slice]:
        """Output times in consecutive slices of about ``points`` cell centres each (at least one time per slice):
        the observables of a many-type law at every output time, formed at once, took ``n T N`` (40 M on 1591
        types) per temporary, and their passes ran from memory instead of cache."""
        per = max(1, points // max(1, self.mass[0].numel()))
        return [slice(i, i + per) for i in range(0, self.t.numel(), per)]

    def type_curves(self) -> Tensor:
        """``(2, n, T)``: each type's weighted contribution to the excess risk and to the curvature (E7)."""
        if self.curves is not None:
            return self.curves.transpose(0, 1)
        c, w = self.points()
        return torch.stack([weighted(_RISK.density(c), w).sum(-1), weighted(_CURVATURE.density(c), w).sum(-1)])


def quadrature_weights(mass: Tensor) -> Tensor:
    """Fourth-order quadrature weights from cell masses: ``w = m - (m[j+1] - 2 m[j] + m[j-1]) / 24``.

    Cell masses placed at the centres overestimate ``int p g`` by ``(h^2/24) E[g'']`` (the
    midpoint/Sheppard bias: ``+h^2/12`` on a variance).  Summing by parts, subtracting
    ``h^2/24 g''`` at the centres equals using these weights (zero ghost cells).  They sum to
    the total mass up to the end cells' content.  Measured on THEORY §6: the late-time risk
    error at ``N = 64`` fell from 0.9 % (plain masses) to the values in the module docstring.
    """
    w = mass * (13.0 / 12.0)  # in place on shifted views: no padded copies (5x faster on many types)
    w[..., 1:].sub_(mass[..., :-1], alpha=1.0 / 24.0)
    w[..., :-1].sub_(mass[..., 1:], alpha=1.0 / 24.0)
    return w


def _gaussian_cells(xi_faces: Tensor) -> Tensor:
    cdf = 0.5 * torch.erfc(-xi_faces / math.sqrt(2.0))
    mass = cdf[1:] - cdf[:-1]
    return mass / mass.sum()


@dataclass
class _Statistics:
    """What one state ``(mass, m, s, int R)`` of every group and type determines (``(G, T, ...)``; ``G`` members of a
    :class:`~sde_optim.theory.dynamics.CoefficientBatch`, 1 for one SGD).

    Fields other than ``risk``, ``a``, ``diffusion``, ``observed`` and ``observed_total`` are None when computed with
    ``full=False``.  ``risk`` ``(G,)``; ``a``: drift at the cell centres then the interior faces ``(G, T, 2N - 1)``; ``diffusion``
    ``D`` ``(G, T)``; ``e_xi, var_xi, e_a, cov_xi_a`` ``(G, T)`` the discrete moments of ``xi`` and ``a``
    (fourth-order weights); ``observed`` ``(2, G, T, N)`` the weighted risk and curvature densities (E7) per cell
    and ``observed_total`` ``(2, G)`` their totals ``R`` (with ``sigma^2/2``) and ``C``, ``per_type`` ``(2, G, T)`` each
    type's share of the excess risk and of ``C``; ``tail_share`` ``(G,)`` the
    share of the excess risk in the two outermost cells on each side; ``unstable`` ``(G,)`` the expected number of
    coordinates past the discrete-step limit.
    """

    risk: Tensor
    a: Tensor
    diffusion: Tensor
    e_xi: Tensor
    var_xi: Tensor
    e_a: Tensor
    cov_xi_a: Tensor
    observed: Tensor
    observed_total: Tensor
    tail_share: Tensor
    unstable: Tensor
    per_type: Tensor
    moments: Tensor | None = None  # e_xi, var_xi, e_a, cov_xi_a stacked (4, G, T), where computed so (compiled path)

    def observable_error(self, change: Tensor) -> Tensor:
        """Per group ``(G,)``: the largest relative change of ``R`` or ``C`` that a mass change of size ``change``
        (``|dmass|``, ``(G, T, N)``) can cause (weighted L1)."""
        num = (change * self.observed).sum(dim=(-2, -1))
        return (num / self.observed_total.clamp_min(tiny(num))).amax(0)


@dataclass
class _Operator:
    """Tridiagonal generator ``d mass/dt = A mass``: ``bands`` ``(3, G, T, N)`` = lower (coefficient of ``mass[j-1]`` in
    row ``j``), diagonal, upper (of ``mass[j+1]``), with the unused ends zero (``lower[..., 0]``, ``upper[..., -1]``).
    One buffer for the three: scaling them is one pass."""

    bands: Tensor

    def implicit_solve(self, h: float, rhs: Tensor, col_scale: Tensor | None = None, other: "_Operator | None" = None) -> Tensor:
        """Solve ``(I - h M) y = rhs`` with ``M = A diag(col_scale)`` (+ ``other``'s ``A``, same grid): the bands of
        ``I - h M`` are formed inside the solve (:func:`~sde_optim.theory.sg_operator.implicit_solve`)."""
        return implicit_solve(h, self.bands, rhs, col_scale, None if other is None else other.bands)


class _Grid:
    """Reference grid ``xi`` per type, its motion, and the assembly of the SG operator (E6 in co-moving coordinates).

    The grid of type ``tau`` is ``x = m_tau + s_tau g``.  Over a step of length ``h`` it moves with a constant
    velocity ``(vm, vs)`` chosen by :meth:`plan`; the transport uses that same velocity (ALE), so the
    discretization is consistent for any grid motion and the motion only has to keep the law centred and
    resolved, not to be accurate.

    **Stretched cells.**  ``g = sinh(alpha xi) / alpha`` (``alpha`` = :data:`STRETCH`) of a uniform reference grid
    ``xi in [-L, L]``: cells ``h`` wide (std units) at the centre, ``h cosh(alpha xi)`` further out, and a window
    ``g(L)`` (``half_width``, 20 std) wider than the uniform 12 of earlier versions, with the same number of cells.
    ``n_cells`` over ``half_width`` sets ``h``; a finer grid's window is wider (:func:`grid_window`: 35 std at 1920
    cells), which adds cells at that ``h`` (``xi.numel() >= n_cells``; 19 % more at 1920).  Measured
    (d = 4096, exact types, against a uniform 2880-cell solve over 36 std; ``benchmarks`` notes in
    docs/benchmarks.md): at equal cells the largest risk error fell 2-4x on THEORY §6 at lr 4 and 8, the noisy
    isotropic and two-level settings (1.2x larger, 1.6e-4, at lr 0.5), because (i) a support type collapsing onto
    ``phi*`` is a narrow peak trailed by a far tail, whose std overstates the peak's width, and (ii) the uniform
    window of 12 std cut that tail: mass piled in the end cells and the risk was 0.6 % off at every ``N`` (THEORY §6,
    lr 4), an error no refinement of the cells could see.  The SG flux and the fourth-order quadrature carry over:
    the flux uses centre-to-centre gaps and cell widths, the quadrature is uniform in ``xi`` (the cell masses are
    ``int p dx`` over cells uniform in ``xi``, and ``x(xi)`` is smooth).
    """

    def __init__(self, dynamics: MeanFieldDynamics, n_cells: int, half_width: float,
                 step_limit: tuple[float, int] | None = None) -> None:
        dtype, dev = dynamics.lam.dtype, dynamics.lam.device
        self.dyn = dynamics
        self.window = grid_window(n_cells, half_width)
        ref_l = reference_half_width(self.window)
        # the spacing of n_cells over half_width: the window's widening adds cells, the centre stays as fine
        n_cells = max(n_cells, round(n_cells * ref_l / reference_half_width(half_width)))
        self.h = 2.0 * ref_l / n_cells
        ref = torch.linspace(-ref_l, ref_l, 2 * n_cells + 1, dtype=dtype, device=dev)  # faces and centres
        g = _stretch(ref)
        self.faces = g[::2]
        self.xi = g[1::2]  # cell centres (images of the uniform reference centres)
        self.inner = self.faces[1:-1]
        self.points = torch.cat([self.xi, self.inner])
        self.width = self.faces[1:] - self.faces[:-1]  # (N,)
        self.gap = self.xi[1:] - self.xi[:-1]  # centre-to-centre distance across each interior face, (N-1,)
        self.flux_left = 1.0 / (self.gap * self.width[:-1])  # the SG flux's geometry (assemble), (N-1,)
        self.flux_right = 1.0 / (self.gap * self.width[1:])
        self.step_limit = step_limit
        self.var_floor = float(self.width.min()) ** 2 / 12.0  # a uniform cell's variance (once: no sync per step)
        self.compiled = COMPILED_STEP and _compiled(self.xi)  # the step as one compiled call (compiled_step.py)
        self._memo: dict = {}  # side -> (coefficients, step limit, the compiled kernels' view of them)
        self._views: dict = {}  # id -> (tensor, numpy array) of the compiled path's output buffers (_outputs)
        self._buffers: dict = {}  # state shape -> the two sets of output buffers of the compiled step
        if self.compiled:
            dyn = dynamics
            fields = {"lam": dyn.lam, "bstar": dyn.bstar, "q0": dyn.q0, "sign": dyn.sign, "kind": dyn.types.kind[:, None],
                      "weight": dyn.weight, "active": dyn.active}
            self._types = torch.cat([fields[k].to(dtype) for k in TYPE_FIELDS], 1).T.contiguous().numpy()  # (7, T)
            self._geometry = tuple(x.contiguous().numpy() for x in (self.points, self.gap, self.flux_left,
                                                                     self.flux_right))
            self._scalars = (_state_cap(dtype), torch.finfo(dtype).tiny, tiny(self.xi), float(dyn.param_scale),
                             _RISK.offset(dyn.noise_std), self.var_floor)

    def statistics(self, mass: Tensor, m: Tensor, s: Tensor, integral: Tensor, t: float, side: int = 1,
                   full: bool = True) -> _Statistics:
        """Risk, drift, diffusion, moments and observed densities of a state at time ``t`` (see :class:`_Statistics`);
        ``side``: which side of a schedule's jump at ``t`` (+1 after, -1 before).  ``full=False`` (an intermediate
        stage, whose state only needs its operator and error) leaves out the moments, tail share and step limit."""
        if self.compiled:
            try:
                return self._compiled_statistics(mass, m, s, integral, t, side, full)
            except Exception as error:  # noqa: BLE001 - only numba's own errors are handled, the rest re-raised
                self._not_compiled(error)
        dyn, xi, n = self.dyn, self.xi, self.xi.numel()
        q = dyn.q(integral[:, None, None], t)  # (G, T, 1)
        both = dyn.state(torch.addcmul(m[..., None], s[..., None], self.points), q)  # cell centres, then interior faces
        c = CoordinateState(dyn.lam, dyn.bstar, both.beta[..., :n], both.rho[..., :n], both.q[..., :n], dyn.param_scale)
        qw = quadrature_weights(mass)
        # E7 densities from the registry (the same definitions as the measurement), times pi_tau
        observed = mass.new_empty(2, *mass.shape)  # (2, G, T, N)
        torch.mul(_RISK.density(c), dyn.weight, out=observed[0])
        torch.mul(_CURVATURE.density(c), dyn.weight, out=observed[1])
        per_type = (observed * qw).sum(-1)  # (2, G, T)
        totals = per_type.sum(-1)  # (2, G)
        risk = totals[0] + _RISK.offset(dyn.noise_std)
        diffusion = dyn.diffusion(risk[:, None, None], t, side)[..., 0].expand_as(m)
        a = dyn.drift(both.beta, risk[:, None, None], t, side)
        if not full:
            return _Statistics(risk, a, diffusion, None, None, None, None, observed, torch.stack([risk, totals[1]]),
                               None, None, per_type)
        dens = observed[0] * mass
        ends = dens[..., :2].sum(dim=(-2, -1)) + dens[..., -2:].sum(dim=(-2, -1))
        tail_share = ends / dens.sum(dim=(-2, -1)).clamp_min(tiny(ends))
        if self.step_limit is not None:
            factor, dim = self.step_limit  # past gamma lam rho / d > factor one discrete step is unstable
            limit = factor * dim / dyn.coef.gamma(t, side)
            past = torch.where(c.rho > limit / c.lam, mass, torch.zeros((), dtype=mass.dtype, device=mass.device))
            unstable = dim * (past.sum(-1) * dyn.weight[:, 0]).sum(-1)
        else:
            unstable = torch.zeros_like(risk)
        a_c = a[..., :n]
        wa = qw * a_c
        e_xi, e_xi2, e_a, e_xia = qw @ xi, qw @ (xi * xi), wa.sum(-1), wa @ xi
        var_xi = (e_xi2 - e_xi**2).clamp_min(self.var_floor)  # at least a uniform cell's variance
        return _Statistics(risk, a, diffusion, e_xi, var_xi, e_a, e_xia - e_xi * e_a, observed,
                           torch.stack([risk, totals[1]]), tail_share, unstable, per_type)

    def plan(self, st: _Statistics, m: Tensor, s: Tensor, h: float) -> tuple[Tensor, Tensor]:
        """Grid velocity over a step of length ``h``: along the law's predicted mean and spread, and onto them.

        The discrete moments give the law's mean ``mu = m + s E[xi]`` and variance ``V = s^2 Var[xi]``; with the
        drift linearized around them (``k = -Cov(x, a) / Var(x)``, the confinement rate) the moment equations
        ``mu' = E[a]``, ``V' = -2 k V + 2 D`` are solved exactly over the step, so the plan is stable for any
        ``h`` however fast a type relaxes (a spike of the spectrum).  The grid follows that prediction and
        closes its own offset from the law (``m - mu`` and ``s - std``) at the type's rate ``1 + |k| + D / V``:
        fast enough for a type that relaxes 100x faster than the rest, and never a finite jump in an
        infinitesimal step.  (Fitting the window to the law's support instead of ``L`` standard deviations
        was tried: 25 % smaller errors on a log-uniform spectrum, 8x larger late-time risk errors on THEORY §6,
        whose off-support laws need their tails.)
        """
        mu = m + s * st.e_xi
        var = s * s * st.var_xi
        std = torch.sqrt(var)
        k = -st.cov_xi_a / (s * st.var_xi)
        kh = k * h
        small = kh.abs() < 1e-8
        safe = torch.where(small, torch.ones_like(kh), kh)
        phi1 = torch.where(small, 1.0 - 0.5 * kh, -torch.expm1(-safe) / safe)  # (1 - e^-kh) / kh
        phi2 = torch.where(small, 1.0 - kh, -torch.expm1(-2.0 * safe) / (2.0 * safe))  # (1 - e^-2kh) / 2kh
        mu_end = mu + h * st.e_a * phi1
        std_end = torch.sqrt((var * torch.exp(-2.0 * kh) + 2.0 * h * st.diffusion * phi2).clamp_min(tiny(var)))
        keep = torch.exp(-h * (1.0 + k.abs() + st.diffusion / var))  # share of the grid's offset left after the step
        m_end = mu_end + (m - mu) * keep
        s_end = std_end * (1.0 + (s / std - 1.0) * keep)
        return (m_end - m) / h, (s_end - s) / h

    def assemble(self, st: _Statistics, s: Tensor, vm: Tensor, vs: Tensor) -> _Operator:
        """SG operator of the state ``st`` on the grid of spread ``s`` moving with velocity ``(vm, vs)``."""
        n = self.xi.numel()
        a_f = st.a[..., n:]
        dxi = torch.clamp(st.diffusion / (s * s), min=tiny(s))  # diffusion in xi, (G, T)
        # Peclet number pe = vel gap / dxi of the drift in xi at the interior faces, vel = (a - vm - vs g) / s (ALE);
        # divided by s then dxi: their product underflows in float32 for a frozen type (D = 0, s = 1e-8), and the
        # 0 * inf of its reciprocal stopped every float32 solve with a frozen type at its first step
        pe = (a_f - torch.addcmul(vm[..., None], vs[..., None], self.inner)).div_(s[..., None]).div_(dxi[..., None])
        pe.mul_(self.gap)
        bands = sg_bands(pe, dxi, self.flux_left, self.flux_right)  # the SG fluxes through the interior faces
        return _Operator(bands)

    def attempt(self, st0: _Statistics, mass: Tensor, m: Tensor, s: Tensor, integral: Tensor, t: float, h: float,
                step_tol: float | None) -> tuple[Tensor, Tensor, Tensor, Tensor, list[float], _Statistics | None]:
        """One MPRK22 step of length ``h`` from the state ``(mass, m, s, int R)`` at ``t`` with statistics ``st0``
        (:func:`_integrate_mprk22`): ``(mass, m, s, int R)`` at ``t + h``, each member's local error
        (:func:`_step_errors`; ``[0.0]`` when ``step_tol`` is None, a replayed step) and, when the step is accepted
        (every error at most ``step_tol``, or replayed), the new state's statistics at ``t + h`` (after a jump
        there), else None."""
        if self.compiled:
            try:
                return self._compiled_attempt(st0, mass, m, s, integral, t, h, step_tol)
            except Exception as error:  # noqa: BLE001 - only numba's own errors are handled, the rest re-raised
                self._not_compiled(error)
        coef = self.dyn.coef
        vm, vs = self.plan(st0, m, s, h)
        m1, s1 = m + h * vm, s + h * vs
        op0 = self.assemble(st0, s, vm, vs)
        y1 = op0.implicit_solve(h, mass).clamp_min_(0.0)
        rate0 = _per_group(coef.noise(t, 1)) * st0.risk  # integrand of I = int nu R (E4)
        i1 = integral + h * rate0
        st1 = self.statistics(y1, m1, s1, i1, t + h, -1, full=False)
        op1 = self.assemble(st1, s1, vm, vs)
        ratio = torch.div(mass, y1).masked_fill_(~(y1 > 0), 1.0)
        y2 = op0.implicit_solve(0.5 * h, mass, col_scale=ratio, other=op1).clamp_min_(0.0)
        i2 = integral + 0.5 * h * (rate0 + _per_group(coef.noise(t + h, -1)) * st1.risk)
        errors = [0.0] if step_tol is None else _step_errors(y1, y2, i1, i2, st1, self.dyn.weight[:, 0], step_tol)
        accepted = max(errors) <= step_tol if step_tol is not None else True
        return y2, m1, s1, i2, errors, self.statistics(y2, m1, s1, i2, t + h, 1) if accepted else None

    # ---------------------------------------------------------------- the compiled CPU path (compiled_step.py)
    def _not_compiled(self, error: Exception) -> None:
        """A numba error (the kernels failed to compile on this platform or numba version): warn once, and take the
        torch step from here on, in this grid and every later one (the same answers, 1.6-8x slower).  Any other
        error is re-raised."""
        global COMPILED_STEP
        if not type(error).__module__.startswith("numba"):
            raise error
        COMPILED_STEP = self.compiled = False
        warnings.warn(f"the compiled Fokker-Planck step is not available ({type(error).__name__}: "
                      f"{str(error).splitlines()[0] if str(error) else ''}); predictions use the torch step instead "
                      "(the same answers, 1.6-8x slower on the CPU). Please report it with your numba version; "
                      "SDE_OPTIM_COMPILED_STEP=0 selects the torch step without trying.", RuntimeWarning, stacklevel=3)

    def _members(self, t: float, side: int) -> tuple["np.ndarray", "np.ndarray", float]:
        """The compiled kernels' view of the coefficients at ``t`` on ``side``: ``(4, G)`` ``gamma, nu, kappa, K``, the
        step limit ``factor d / gamma`` ``(G,)`` (``inf`` without one) and its ``d`` (numpy; the same arrays while the
        coefficients and the step limit are the same objects and constant in time)."""
        coef, groups, step_limit = self.dyn.coef, self.dyn.groups, self.step_limit
        memo = self._memo.get(side)
        if memo is not None and memo[0] is coef and memo[1] is step_limit:
            return memo[2]
        kint = coef.kappa_integral(t) if self.dyn.decays else 0.0
        values = (coef.gamma(t, side), coef.noise(t, side), coef.kappa(t, side), kint)
        column = lambda v: torch.as_tensor(v, dtype=self.xi.dtype).reshape(-1).expand(groups or 1)  # noqa: E731
        coefs = torch.stack([column(v) for v in values]).numpy()
        if step_limit is None:
            limit, dim = np.full(groups or 1, np.inf, dtype=coefs.dtype), 0.0
        else:
            limit, dim = column(step_limit[0] * step_limit[1] / values[0]).contiguous().numpy(), float(step_limit[1])
        members = coef.members if groups is not None else [coef]
        if all(c.is_constant and not c.decays for c in members):
            self._memo[side] = (coef, step_limit, (coefs, limit, dim))
        return coefs, limit, dim

    def _numpy(self, x: Tensor) -> "np.ndarray":
        """``x`` as a C-contiguous numpy array: the one it wraps if it is one of the compiled path's outputs."""
        hit = self._views.get(id(x))
        return hit[1] if hit is not None and hit[0] is x else x.contiguous().numpy()

    def _outputs(self, mass: Tensor, avoid: tuple) -> "_StepOutputs":
        """Where a compiled step writes: one of two sets of buffers for states shaped as ``mass`` (allocated once per
        shape: a step's dozen arrays cost more to allocate and wrap than a small grid's step to compute), the one
        holding none of ``avoid`` (the inputs: a state and its statistics live in the set that computed them, and
        a rejected step's outputs are overwritten by the next attempt)."""
        pair = self._buffers.get(mass.shape)
        if pair is None:
            pair = self._buffers[mass.shape] = (_StepOutputs(mass.shape, self._types.dtype),
                                               _StepOutputs(mass.shape, self._types.dtype))
            for out in pair:
                self._views.update((id(t), (t, a)) for t, a in zip(out.tensors, out.arrays))
        first, second = pair
        return second if first.holds(avoid) else first

    def _compiled_statistics(self, mass: Tensor, m: Tensor, s: Tensor, integral: Tensor, t: float, side: int,
                             full: bool) -> _Statistics:
        """:meth:`statistics` by :func:`~sde_optim.theory.compiled_step.compiled_kernels`'s ``evaluate`` (new
        tensors: the call is rare, at the start and when members leave the batch)."""
        out = _StepOutputs(mass.shape, self._types.dtype)
        np_ = self._numpy
        compiled_kernels()[0](np_(mass), np_(m), np_(s), np_(integral), *self._members(t, side), full, self._types,
                              self._geometry[0], *self._scalars, *out.arrays[5:])
        if full:
            return out.statistics
        risk, a, diffusion, _, observed, totals, per_type = out.tensors[5:12]
        return _Statistics(risk, a, diffusion, None, None, None, None, observed, totals, None, None, per_type)

    def _compiled_attempt(self, st0: _Statistics, mass: Tensor, m: Tensor, s: Tensor, integral: Tensor, t: float,
                          h: float, step_tol: float | None):
        """:meth:`attempt` by :func:`~sde_optim.theory.compiled_step.compiled_kernels`'s ``attempt`` (which also
        evaluates the new state when the step is accepted).  The tensors returned are reused: a later attempt
        overwrites them once the integrator has moved on from them (see :meth:`_outputs`)."""
        np_ = self._numpy
        moments = st0.moments if st0.moments is not None else torch.stack([st0.e_xi, st0.var_xi, st0.e_a, st0.cov_xi_a])
        out = self._outputs(mass, (mass, st0.risk))
        coef0, coef1, (coef2, limit2, dim) = self._members(t, 1)[0], self._members(t + h, -1)[0], self._members(t + h, 1)
        accepted = compiled_kernels()[1](
            np_(mass), np_(m), np_(s), np_(integral), np_(st0.risk), np_(st0.a), np_(st0.diffusion), np_(moments),
            coef0, coef1, coef2, limit2, dim, h, step_tol is not None, 0.0 if step_tol is None else step_tol,
            self._types, *self._geometry, *self._scalars, *(_scalar(mass, v) for v in (0.0, 1.0, -h, -0.5 * h)),
            *out.arrays)
        y2, m1, s1, i2 = out.tensors[:4]
        return y2, m1, s1, i2, ([0.0] if step_tol is None else out.arrays[4].tolist()), (
            out.statistics if accepted else None)


class _StepOutputs:
    """What one compiled step writes (:meth:`_Grid._compiled_attempt`), as numpy arrays and tensors over them: the state
    ``mass, m, s, int R``, the errors ``(G,)``, then the statistics of ``compiled_step._evaluate`` (``risk, a,
    diffusion, moments, observed, totals, per_type, tail_share, unstable``), and the :class:`_Statistics` over them."""

    def __init__(self, shape: tuple[int, int, int], dtype) -> None:
        groups, types, n = shape
        shapes = ((groups, types, n), (groups, types), (groups, types), (groups,), (groups,),
                  (groups,), (groups, types, 2 * n - 1), (groups, types), (4, groups, types), (2, groups, types, n),
                  (2, groups), (2, groups, types), (groups,), (groups,))
        self.arrays = [np.empty(shape, dtype=dtype) for shape in shapes]
        self.tensors = [torch.from_numpy(a) for a in self.arrays]
        risk, a, diffusion, moments, observed, totals, per_type, tail_share, unstable = self.tensors[5:]
        self.statistics = _Statistics(risk, a, diffusion, *moments.unbind(0), observed, totals, tail_share, unstable,
                                      per_type, moments=moments)

    def holds(self, tensors: tuple[Tensor, ...]) -> bool:
        """Whether any of ``tensors`` is this set's state (its ``mass``) or statistics (its ``risk``)."""
        return any(x is self.tensors[0] or x is self.tensors[5] for x in tensors)


def grid_level(tol: float, half_width: float, step_tol: float | None, level: int, max_cells: int = 4096) -> tuple[int, float]:
    """``(cells, step tolerance)`` of refinement level ``level`` (0 = the coarsest of the a posteriori check).

    Level 1 is one level below the a priori map :func:`cells_for_tolerance` (cells / 2, step tolerance x 4),
    level 0 half of that again; each level doubles the cells and divides the step tolerance by 4, so both
    error sources fall about 4x per level (both are second order: the step control keeps the embedded
    first-order error per step ``~ dt^2`` near the tolerance).  The a priori map is capped at ``max_cells``
    (so level 2 is never finer than the cap).
    """
    n_prior = min(cells_for_tolerance(tol, half_width), max_cells)
    st = step_tol if step_tol is not None else tol
    return max(8, round(max(8, n_prior // 4) * 2.0**level)), 16.0 * st / 4.0**level


def check_level(tol: float, half_width: float, step_tol: float | None, max_cells: int,
                base: tuple[int, float] | None, level: int) -> tuple[int, float]:
    """``(cells, step tolerance)`` of level ``level`` of a grid check that starts on ``base`` (``(cells, step
    tolerance)``; None: :func:`grid_level`'s levels): each level doubles the cells and divides the step tolerance by 4."""
    if base is None:
        return grid_level(tol, half_width, step_tol, level, max_cells)
    return base[0] * 2**level, base[1] / 4.0**level


def solve_fokker_planck(
    dynamics: MeanFieldDynamics,
    t_out: Tensor,
    *,
    num_cells: int | None = None,
    tol: float = 1e-3,
    half_width: float = 20.0,
    t0: float = 1e-4,
    step_tol: float | None = None,
    blowup_factor: float = 1e4,
    tail_limit: float = 0.05,
    dim: int | None = None,
    max_steps: int = 200_000,
    refine: bool = True,
    max_cells: int = 4096,
    max_evaluations: int = 40_000,
    estimate_floor: float = 1e-3,
    max_work: float = MAX_WORK,
    **deprecated,
) -> FokkerPlanckSolution:
    """Solve E6 (with E4) at the increasing times ``t_out`` (shape ``(n,)``, ``t_out >= 0``).

    **Resolution from the tolerance, checked a posteriori.**  Unless ``num_cells`` is given, the system
    is solved on two consecutive levels of :func:`grid_level` (``N/2`` cells with local step tolerance
    ``4 s`` and ``N`` cells with ``s``); the relative difference of ``R`` and ``C`` between the two, divided
    by 3 (Richardson: both errors are second order, and the finer solve has half the cell width and
    half the step), is the error estimate of the finer solve.  While it exceeds ``tol`` the error is split
    into its space and time parts and the larger one is refined (:func:`refine_grid_batch`; up to
    ``max_cells``, with a warning if that is not enough).  The spatial error
    constant is problem dependent: measured against a 4096-cell solve it is about ``0.08 h^2``
    (``h`` = cell width in standard deviations) on THEORY §6 at ``gamma = 0.5`` but ``10 h^2``
    at ``gamma = 8`` (0.8x the decay-critical step), where the noise feeds back on ``R``
    and a wide, wall-bounded off-support law needs fine cells; no fixed ``tol -> N`` map
    serves both.

    Args:
        num_cells: cells per type ``N``; if given, one solve on that grid (no refinement).  ``N`` sets the spacing
            at the centre; a window widened past ``half_width`` (:func:`grid_window`) adds cells at that spacing.
        tol: target relative accuracy of ``R`` and ``C`` (sets the first ``N``, the refinement
            test and, unless given, ``step_tol``).
        half_width: half-width of the co-moving window in units of the type's standard deviation (the
            stretched cells of :class:`_Grid` reach it) on grids of up to 60 cells; finer grids widen it
            (:func:`grid_window`), so the grid check's estimate covers the window's truncation.
        t0: start time of the analytic Gaussian short-time solution.
        step_tol: local error tolerance of the adaptive implicit steps (weighted total-variation
            distance per step and relative change of ``R`` and ``C``); default ``tol``.
        blowup_factor: divergence threshold on ``R / R(0)``.
        tail_limit: the run is also declared divergent when more than this share of the
            excess risk sits in the outermost cells of the co-moving window: the law has become
            so heavy-tailed (``beta ~ e^x`` with a spread of several e-folds) that ``R`` is
            carried by its extreme tail, beyond the window and, at finite ``d``, by a few
            coordinates -- the onset of SGD's blow-up (checked against SGD in the benchmark).
        dim: if given (the ``d`` of the SGD run), the run is also declared divergent at the
            first step where the law puts at least one of ``d`` coordinates past the
            discrete-step limit ``gamma lam rho / d > 2`` (finite-``d`` SGD instability of a
            single coordinate, whose 2x2 Hessian block has top eigenvalue ``(lam/d) rho``
            near ``beta = beta*``; the continuous drift confines it, a discrete step does not).
        refine: run the a posteriori check and refinement above (ignored with ``num_cells``).
        max_cells: largest ``N`` the refinement may reach (``N`` as in ``num_cells``: a widened window adds
            its cells on top).
        max_evaluations: operator-evaluation budget of the refinement (each level costs about twice
            the previous one; the next level is skipped, with a warning, if it would exceed it).
        estimate_floor: the error estimate covers output times with ``R >= estimate_floor * R(0)``
            before any divergence (relative errors of a vanishing risk are not meaningful).
        max_work: the same kind of budget in cell updates, ``types x cells x evaluations`` summed over the
            refinement's solves (:data:`MAX_WORK`): an evaluation's cost grows with its size, so counting
            evaluations alone let a many-type refinement run for minutes.

    The keywords ``integrator``, ``rtol``, ``atol`` and ``relax`` of earlier versions are accepted with a
    ``DeprecationWarning`` and have no effect (one integrator, MPRK22; the grid motion needs no tuning).
    """
    for key in list(deprecated):
        if key not in ("integrator", "rtol", "atol", "relax"):
            raise TypeError(f"solve_fokker_planck() got an unexpected keyword argument {key!r}")
        if key == "integrator" and deprecated[key] != "mprk22":
            raise ValueError(f"integrator must be 'mprk22' (the only integrator since 0.2); got {deprecated[key]!r}")
        warnings.warn(f"solve_fokker_planck: {key!r} is deprecated and has no effect", DeprecationWarning, stacklevel=2)
    types = dynamics.types
    dtype, dev = types.lam.dtype, types.lam.device
    t_out = torch.as_tensor(t_out, dtype=dtype, device=dev)
    if t_out.ndim != 1 or t_out.numel() < 1 or bool((t_out[1:] <= t_out[:-1]).any()) or float(t_out[0]) < 0:
        raise ValueError("t_out must be a 1-d increasing tensor of times >= 0")
    tol = check_float("tol", tol, minimum=0.0, strict=True)
    half_width = check_float("half_width", half_width, minimum=2.0)
    max_cells = check_int("max_cells", max_cells, minimum=16)
    max_evaluations = check_int("max_evaluations", max_evaluations, minimum=1)
    max_work = check_float("max_work", max_work, minimum=0.0, strict=True)
    t0 = check_float("t0", t0, minimum=0.0, strict=True)
    opts = dict(half_width=half_width, t0=t0, blowup_factor=blowup_factor, tail_limit=tail_limit, dim=dim,
                max_steps=max_steps)
    if num_cells is not None:
        return solve_on_grid(dynamics, t_out, check_int("num_cells", num_cells, minimum=8),
                             step_tol if step_tol is not None else tol, **opts)
    if not refine:
        n, st = grid_level(tol, half_width, step_tol, 2, max_cells)  # the a priori resolution
        return solve_on_grid(dynamics, t_out, min(n, max_cells), st, **opts)
    coarse = solve_on_grid(dynamics, t_out, *grid_level(tol, half_width, step_tol, 0, max_cells), **opts)
    return refine_grid(dynamics, t_out, coarse, tol=tol, step_tol=step_tol, max_cells=max_cells,
                       max_evaluations=max_evaluations, estimate_floor=estimate_floor, max_work=max_work, **opts)


def refine_grid(dynamics: MeanFieldDynamics, t_out: Tensor, coarse: FokkerPlanckSolution, *, tol: float,
                step_tol: float | None, max_cells: int, max_evaluations: int, estimate_floor: float, tol_used: float = 0.0,
                base: tuple[int, float] | None = None, max_work: float = MAX_WORK, **opts) -> FokkerPlanckSolution:
    """The a posteriori grid check of :func:`solve_fokker_planck`, starting from a solve ``coarse`` on the grid
    ``base`` (``(cells, step tolerance)``; default level 0 of :func:`grid_level`).

    Solves the next levels of :func:`grid_level` until the Richardson estimate of ``R`` and ``C`` is below
    ``tol - tol_used`` (``tol_used``: the part of ``tol`` already taken by another error source); returns
    the finest solve with ``error_estimate`` and ``levels`` set, warning if a cap stops it first.
    """
    (fine,) = refine_grid_batch(dynamics, t_out, [coarse], tol=tol, step_tol=step_tol, max_cells=max_cells,
                                max_evaluations=max_evaluations, estimate_floor=estimate_floor, tol_used=tol_used,
                                base=base, max_work=max_work, **opts)
    return fine


def refine_grid_batch(dynamics: MeanFieldDynamics, t_out: Tensor, coarse: list[FokkerPlanckSolution], *, tol: float,
                      step_tol: float | None, max_cells: int, max_evaluations: int, estimate_floor: float,
                      tol_used: float = 0.0, base: tuple[int, float] | None = None, max_work: float = MAX_WORK,
                      **opts) -> list[FokkerPlanckSolution]:
    """:func:`refine_grid` for every member of a batch (``coarse``: their solves on the grid ``base``, one per
    member; "level 0" below is ``base``, default :func:`grid_level`'s level 0, and level 1 has twice its cells
    and a quarter of its step tolerance).

    **Level 1** (cells x 2, step tolerance / 4) is solved for every member, as one batch; the Richardson estimate
    of the pair (its difference over the order it shows, and the time error where the steps are capped: (a) and (b)
    below) is its error.  A member whose estimate is above ``tol - tol_used``
    then has its error **split by source**: one more solve with level 1's cells on level 0's time steps (replayed,
    :func:`solve_on_grid`'s ``schedule``) differs from level 0 only in space and from level 1 only in time, so
    ``X`` (space) and ``Tm`` (time) are estimated separately: ``Tm`` as a difference / 3 (second order in time),
    ``X`` as the difference itself (first order: near the critical lr the cells converge at order 1.1-1.4 only,
    measured on THEORY §6, where / 3 understated the error 2-4x).
    From there each refinement halves the cells (replaying the current time steps: a change in space only,
    whose pair estimate replaces ``X``) or divides the step tolerance by 4 (a change in time only, replacing
    ``Tm``), whichever source is larger, until ``X + Tm`` meets the tolerance.  From the second pair of a source
    on, its difference is divided by the observed reduction ``r - 1`` (:func:`_reduction`), so the order the
    pairs show is used, between one and two.  Near the critical learning rate
    the error is in space (the law's steep walls) and the time steps stay coarse; at small ``lr`` it is in time
    and the cells stay few (measured: docs/benchmarks.md).  The estimate reported is ``X + Tm``.

    ``Tm`` measured on other cells than the current solve's is measured again before the solve is accepted (a twin
    on the same cells with 4x the step tolerance, difference / 3): a ``Tm`` taken on level 1's cells, before the
    space refinement resolved the law, understated the time error 4x (THEORY §6, ``lr = 2``, ``tol = 2e-2``, on the
    stretched cells: estimate 1.6 % at 512 cells for a true 6.1 %, the steps of level 0 replayed throughout).  With
    the extrapolation below in view a second twin (16x) gives the order the pairs show (:func:`_time_divisor`): the
    single twin's / 3 understated the time error 1.7x at ``lr = 8``, ``tol = 1e-2``, where the steps converge at
    order ~1.4 only.
    ``X`` measured on other time steps than the current solve's is measured again before the solve is accepted
    (twins with 1/2 and 1/4 of the cells on the same steps: the difference to the first at the order the three
    show): the two errors interact, and carrying ``X`` across a 16x
    change of the steps understated the error 4x near the critical lr (THEORY §6, ``lr = 2``, ``tol = 2e-2``).

    A refinement that does not halve its source's difference (the pairs are not yet in their asymptotic range, e.g.
    a time step refined on too few cells to resolve the law) hands the next refinement to the other source.

    **Where the assumptions fail.**  (a) The first pair is divided by the order it shows against a level below level
    0 (:func:`_first_divisor`, 1/16 of level 1's work), and where that level diverged and level 0 did not, level 0
    is too coarse for any pair of it to answer (its ``X`` is unknown until a space pair of its own).  (b) Where a
    smaller step tolerance does not shorten the steps (other limits set them: :func:`_steps_moved`), a pair of step
    tolerances holds no time refinement: the member is *capped*, its ``Tm`` is measured by halving its steps
    (:func:`_halving_estimate`: the first pair's on level 0, later ones on the current cells), and its time
    refinements halve the steps (a replay) instead of dividing the step tolerance.  (c) Where the split's replay
    blows up and neither adaptive solve did, the other corner of the square splits the error: level 0's cells on
    level 1's steps and level 1's cells at level 0's step tolerance.  Measured before these (THEORY §6, d = 1000,
    t <= 5): at ``tol`` 0.02-0.1 estimates 3-15x below the error, some errors past ``tol`` (silent), and an
    estimate of inf after the work cap (power-law-B2-bal at 0.8x its critical lr); docs/benchmarks.md.

    **Richardson in the cells.**  On the same time steps the cells converge at second order once the law is
    resolved (differences ~4x smaller per doubling), so three solves on the current steps with cells ``N/4, N/2, N``
    (a recheck's twins, or space refinements replaying the same steps) also give the extrapolation
    ``(4 S_N - S_N/2) / 3`` and its space estimate ``x_ex`` (:func:`_extrapolation_estimate`).  Where ``x_ex`` plus
    the extrapolation's own ``Tm`` (the same pair one level up in time, extrapolated too: the twin with 4x the step
    tolerance, kept from the last time refinement or the recheck of ``Tm``, and its half-cells partner on its steps)
    is below the current solve's ``X + Tm``, the answer is the extrapolation (the solve's :attr:`~FokkerPlanckSolution.
    coarser` is set) and the estimate is its own.  What to refine next follows the better answer in view
    (:meth:`_CheckState.planned`).  Measured on THEORY §6 at 0.8x the critical lr (``d = 16384``,
    default tol): 1110 cells instead of 4660, 12.7 s instead of 16.9 s, error 2.4e-4 against 3.0e-4
    (docs/benchmarks.md).

    Members are solved together whenever they need the same next solve; a member leaves as soon as its own
    estimate meets the tolerance.  The caps (``max_cells``, ``max_evaluations``, ``max_work``) apply to each member's
    own solves; a member stopped by one keeps its last solve, with a warning giving its estimate.
    """
    half_width = opts["half_width"]
    n_prior = min(cells_for_tolerance(tol, half_width), max_cells)
    allowed = tol - tol_used
    coarse, groups = list(coarse), len(coarse)
    result: list[FokkerPlanckSolution | None] = [None] * groups
    spent = [c.nfe for c in coarse]
    work = [_work(c) for c in coarse]
    solves = [1] * groups

    def solve(members: list[int], n_cells: int, st: float, schedule: list[float] | None) -> list[FokkerPlanckSolution]:
        sub = dynamics if len(members) == groups else dynamics.with_coefficients(dynamics.coef.select(members))
        sols = solve_batch_on_grid(sub, t_out, n_cells, st, schedule=schedule, **opts)
        for g, sol in zip(members, sols):
            spent[g] += sol.nfe
            work[g] += _work(sol)
            solves[g] += 1
        return sols

    def over_budget(g: int, sol: FokkerPlanckSolution) -> bool:
        # the next solve costs about twice this one (cells x 2 on its steps, or about twice its steps)
        return _next_exceeds(spent[g], 2 * sol.nfe, max_evaluations, work[g], 2 * _work(sol), max_work)

    def finish(g: int, sol: FokkerPlanckSolution, estimate: float, coarser: FokkerPlanckSolution | None = None) -> None:
        sol.error_estimate, sol.levels, sol.coarser = estimate, solves[g] - 1, coarser
        result[g] = sol
        if estimate > allowed:
            who = f" (member {g} of a batch of {groups})" if groups > 1 else ""
            warnings.warn(f"Fokker-Planck solve{who}: estimated relative error {estimate:.2g} of the grid exceeds "
                          f"{allowed:.2g} (tol={tol:g}) with {sol.xi.numel()} cells and {spent[g]} operator evaluations "
                          f"(max_cells={max_cells}, max_evaluations={max_evaluations}, max_work={max_work:.3g} cell "
                          f"updates, {work[g]:.3g} spent); raise them or relax tol",
                          RuntimeWarning, stacklevel=4)

    def unconfirmed(sol: FokkerPlanckSolution) -> bool:
        # A predicted divergence is believed only from the a priori resolution on (a grid far too coarse
        # can blow up spuriously, and two such grids may agree).
        return sol.diverged_at is not None and sol.xi.numel() < n_prior

    (n0, st0), (n1, st1) = (check_level(tol, half_width, step_tol, max_cells, base, k) for k in (0, 1))
    everyone = list(range(groups))
    fine = dict(zip(everyone, solve(everyone, n1, st1, None)))
    # the order the first pair is at, from a level below level 0 (1/16 of level 1's work): see _first_divisor; where
    # that level diverged and level 0 did not, level 0 is a level from a spurious blow-up, far from the asymptotic
    # range: the first pair cannot answer, and its X is unknown until a space pair of its own (below)
    lows = dict(zip(everyone, solve(everyone, max(8, n0 // 2), 4.0 * st0, None)))
    div = {g: _first_divisor(fine[g], coarse[g], low, estimate_floor) for g, low in lows.items()}
    rough = {g for g, low in lows.items() if low.diverged_at != coarse[g].diverged_at}
    # where level 1's step tolerance did not shorten level 0's steps (other limits set them) the first pair holds no
    # time refinement: the time error is measured on level 0 by halving its steps (see _steps_moved)
    capped = [g for g in everyone if _replayable(coarse[g]) is not None and not _steps_moved(fine[g], coarse[g])]
    t_cap = {g: _halving_estimate(coarse[g], halved, estimate_floor) for g, halved in zip(capped, solve(
        capped, n0, st0, _halved(coarse[capped[0]].schedule)))} if capped else {}
    state: dict[int, _CheckState] = {}  # member -> where its split check stands
    split: list[int] = []
    for g, sol in fine.items():
        estimate = _pair_difference(sol, coarse[g], estimate_floor) / div[g] + t_cap.get(g, 0.0)
        if (estimate <= allowed and not unconfirmed(sol) and g not in rough) or over_budget(g, sol):
            finish(g, sol, estimate)
        else:
            split.append(g)
    failed: list[int] = []
    if split:  # level 1's cells on level 0's steps: space and time apart
        for g, mid in zip(split, solve(split, n1, st0, _replayable(coarse[split[0]]))):
            if mid.diverged_at != fine[g].diverged_at and fine[g].diverged_at == coarse[g].diverged_at:
                failed.append(g)  # the replay blew up where neither adaptive solve did: it splits nothing (below)
                continue
            space = _pair_difference(mid, coarse[g], estimate_floor)
            time = _pair_difference(fine[g], mid, estimate_floor)
            # space at the order the first pair showed (second at most: the first pair's difference is mostly the
            # cells' near the critical lr) until a pair of its own shows it; time at second order (MPRK22 with the
            # local error kept near the step tolerance; its own pairs show better or worse next)
            if g in rough:
                space = math.inf
            # capped: the pair (fine, mid) differs in steps that hardly differ; the time error is level 0's halving's
            t_err, raw_t, t_cells = (t_cap[g], math.inf, n0) if g in t_cap else (time / 3.0, time, n1)
            state[g] = _CheckState(fine[g], n1, st1, space / div[g], t_err, space, raw_t, True, None, t_cells,
                                   [fine[g]], capped=g in t_cap)
    if failed:
        # Level 0's steps carry no error control on level 1's cells, and near the critical lr they can blow up there
        # (power-law-B2-bal at 0.8x its critical lr, d = 16384: diverged at t = 4.56; both estimates were inf, and the
        # work cap then stopped the check with an estimate of inf).  The other corner of the same square splits the
        # error as well: level 0's cells on level 1's steps (space) and level 1's cells with adaptive steps at
        # level 0's step tolerance (time).
        halves = solve(failed, n0, st1, _replayable(fine[failed[0]]))
        for g, half, twin in zip(failed, halves, solve(failed, n1, st0, None)):
            space = math.inf if g in rough else _pair_difference(fine[g], half, estimate_floor)
            time = _pair_difference(fine[g], twin, estimate_floor)
            chain = [half, fine[g]] if _replayable(fine[g]) is not None else [fine[g]]
            capped_g = g in t_cap or not _steps_moved(fine[g], twin)  # the twin took the fine solve's steps: no pair
            t_err, raw_t, t_cells = ((t_cap.get(g, math.inf), math.inf, n0 if g in t_cap else 0) if capped_g
                                     else (time / 3.0, time, n1))
            state[g] = _CheckState(fine[g], n1, st1, space / div[g], t_err, space, raw_t, True, None, t_cells,
                                   chain, prev=None if capped_g else twin, capped=capped_g)
    while state:
        plans: dict[tuple, list[int]] = {}
        for g, c in list(state.items()):
            sol, n_cells, st = c.sol, c.cells, c.step_tol
            x_err, t_err = c.planned()
            if over_budget(g, sol):
                finish(g, sol, *c.answer())
                del state[g]
                continue
            halving = c.capped and _replayable(sol) is not None  # (a diverged solve's steps cannot be halved)
            if math.isinf(c.t_err) and c.t_cells != n_cells:  # Tm unknown (no time pair yet): measure it first
                plans.setdefault(("retime", n_cells, 4.0 * st, c.extrapolates()) if not halving else
                                 ("rehalve", n_cells, st, id(sol.schedule)), []).append(g)
                continue
            if x_err + t_err <= allowed and not unconfirmed(sol):
                if not c.x_fresh:  # X was measured on other time steps: measure it again on these (fewer cells, same steps)
                    plans.setdefault(("recheck", n_cells, st, id(_replayable(sol))), []).append(g)
                elif c.t_cells != n_cells:  # Tm was measured on other cells: again on these (step tolerance x 4)
                    plans.setdefault(("retime", n_cells, 4.0 * st, c.extrapolates()) if not halving else
                                     ("rehalve", n_cells, st, id(sol.schedule)), []).append(g)
                elif c.extrapolates() and c.t_ex is None and not c.capped:  # its own Tm (a pair a level up in time)
                    kept = None if c.prev is None else id(c.prev.schedule)
                    plans.setdefault(("retime_ex", n_cells, st, kept), []).append(g)
                else:
                    if c.capped and c.extrapolates() and c.t_ex is None:
                        # steps no tolerance sets: the extrapolation's two solves share them, and a time error that
                        # does not depend on the cells is the plain solve's (THEORY §6, 120 / 240 cells: 6.15e-4 /
                        # 6.05e-4 at lr 0.5, 4.06e-3 / 4.20e-3 at lr 2, 1.51e-2 / 1.52e-2 at lr 8)
                        c.t_ex = c.t_err
                    finish(g, sol, *c.answer())
                    del state[g]
                continue
            space = x_err >= t_err or unconfirmed(sol)
            if c.stalled is not None:  # the last refinement did not halve its source's difference: refine the other
                space = c.stalled == "time"
            if space and 2 * n_cells > max_cells:
                space = False if t_err > allowed / 2 else None
            if space is None:
                finish(g, sol, *c.answer())  # the space error needs more cells than max_cells
                del state[g]
                continue
            key = ("space", 2 * n_cells, st, id(_replayable(sol))) if space else (
                ("time", n_cells, st / 4.0, None) if not halving else ("halve", n_cells, st, id(sol.schedule)))
            plans.setdefault(key, []).append(g)
        for (kind, n_cells, st, tag), members in plans.items():
            schedule = None if kind == "time" else _replayable(state[members[0]].sol)
            if kind in ("halve", "rehalve"):  # steps set by other limits than the step tolerance: halved, replayed
                schedule = _halved(state[members[0]].sol.schedule)
            if kind == "rehalve":  # Tm of the current solve from its steps halved (it stays the answer)
                for g, halved in zip(members, solve(members, n_cells, st, schedule)):
                    c = state[g]
                    c.t_err, c.raw_t, c.t_cells = _halving_estimate(c.sol, halved, estimate_floor), math.inf, n_cells
                continue
            if kind == "recheck":  # X again on the current steps: twins with 1/2 and 1/4 of the cells, the order observed
                halves = solve(members, n_cells // 2, st, schedule)
                for g, half, quarter in zip(members, halves, solve(members, n_cells // 4, st, schedule)):
                    c = state[g]
                    raw = _pair_difference(c.sol, half, estimate_floor)
                    c.x_err = raw / _reduction(_pair_difference(half, quarter, estimate_floor), raw)
                    c.raw_x, c.x_fresh = raw, True
                    c.same_steps([quarter, half, c.sol] if schedule is not None else [c.sol], estimate_floor)
                continue
            if kind == "retime":  # Tm again on the current cells: a twin with 4x the step tolerance (second order);
                # with the extrapolation in view (its Tm then decides) a second twin, 16x, for the order the pairs show
                twins = solve(members, n_cells, st, None)
                seconds = solve(members, n_cells, 4.0 * st, None) if tag else [None] * len(members)  # tag: extrapolates
                for g, twin, twin2 in zip(members, twins, seconds):
                    c = state[g]
                    if not _steps_moved(c.sol, twin):  # the same steps: no time pair; halve them instead (next round)
                        c.capped, c.t_err, c.raw_t, c.t_cells, c.prev = True, math.inf, math.inf, 0, None
                        continue
                    raw = _pair_difference(c.sol, twin, estimate_floor)
                    # the order the last time pairs showed, if on cells at most a doubling away (second order if
                    # none did: a single twin's / 3 understated lr 8's time error at tol 0.02, order ~1.4 there)
                    c.t_div = ((c.t_div if 2 * c.t_cells >= n_cells else 3.0) if twin2 is None
                               else _time_divisor(twin, twin2, raw, estimate_floor))
                    c.t_err, c.raw_t, c.t_cells, c.prev = raw / c.t_div, raw, n_cells, twin
                continue
            if kind == "retime_ex":  # the twin one level up in time (kept, or solved) and its half-cells partner
                kept = tag is not None  # tag: the kept twin's steps
                twins = [state[g].prev for g in members] if kept else solve(members, n_cells, 4.0 * st, None)
                steps = _replayable(twins[0])
                halves = solve(members, n_cells // 2, 4.0 * st, steps) if steps is not None else [None] * len(members)
                for g, twin, half in zip(members, twins, halves):
                    c = state[g]
                    c.t_ex = math.inf if half is None else _pair_difference(
                        c.sol, twin, estimate_floor,
                        curves=(_extrapolated(c.sol, c.chain[-2]), _extrapolated(twin, half))) / (
                        c.t_div if kept else 1.0)  # the order the plain pair showed, else first
                continue
            for g, new in zip(members, solve(members, n_cells, st, schedule)):
                c = state[g]
                raw = _pair_difference(new, c.sol, estimate_floor)
                if kind == "time" and not _steps_moved(new, c.sol):  # a quarter of the step tolerance, the same steps
                    c.capped, c.t_err, c.raw_t, c.t_cells = True, math.inf, math.inf, 0  # halved from now on
                    continue
                halved, kind = kind == "halve", "time" if kind == "halve" else kind
                c.stalled = kind if not raw * 2.0 <= (c.raw_x if kind == "space" else c.raw_t) else None
                chain = c.chain + [new] if kind == "space" and schedule is not None else [new]
                c.prev = c.sol if kind == "time" and not halved else None  # a level up in time on the same cells
                c.sol, c.cells, c.step_tol = new, n_cells, st
                if kind == "space":
                    c.x_err, c.raw_x, c.x_fresh = raw / _reduction(c.raw_x, raw), raw, True
                    c.same_steps(chain, estimate_floor)
                else:
                    # the order of two time pairs on cells at most a doubling apart; one on far coarser cells can be
                    # inflated by an unresolved law (THEORY §6, lr 8, tol 1e-2: 0.0985 on 152 cells, then 0.0179 on
                    # 608 read as second order; the answer's error 9.8e-3 against an estimate of 7.9e-3): first order
                    c.t_div = _reduction(c.raw_t, raw) if 2 * c.t_cells >= n_cells else 1.0
                    c.t_err, c.raw_t, c.x_fresh, c.t_cells = raw / c.t_div, raw, False, n_cells
                    c.chain, c.t_ex = chain, None  # x_ex is carried, as X is, until measured again on these steps
    return result  # type: ignore[return-value]


@dataclass
class _CheckState:
    """Where one member's split grid check stands (:func:`refine_grid_batch`): its current solve, cells and step
    tolerance; the space and time estimates ``X``, ``Tm`` and the raw pair differences they came from; whether ``X``
    was measured on the current steps; the source whose last refinement stalled; the cells ``Tm`` was measured on;
    the solves on the current time steps (``chain``), the space estimate ``x_ex`` of the extrapolation of its last
    pair (``inf`` when there is none; carried across a time refinement, as ``X`` is) and its time estimate ``t_ex``
    (None until measured on the current cells and steps); the divisor ``t_div`` of the last ``Tm``; ``prev``, the solve
    on the current cells with 4x the step tolerance when there is one."""

    sol: FokkerPlanckSolution
    cells: int
    step_tol: float
    x_err: float
    t_err: float
    raw_x: float
    raw_t: float
    x_fresh: bool
    stalled: str | None
    t_cells: int
    chain: list[FokkerPlanckSolution]
    x_ex: float = math.inf
    t_ex: float | None = None
    t_div: float = 3.0
    prev: FokkerPlanckSolution | None = None
    capped: bool = False

    def same_steps(self, chain: list[FokkerPlanckSolution], floor: float) -> None:
        """``chain``: the solves on the current solve's time steps (cells doubling, the current one last); the
        estimate of the Richardson extrapolation of its last pair (:func:`_extrapolation_estimate`) on them."""
        self.chain, self.x_ex, self.t_ex = chain, _extrapolation_estimate(chain, floor), None

    def extrapolates(self) -> bool:
        """Whether the extrapolation of the chain's last pair is in view: its space estimate, measured on the current
        steps, below the current solve's ``X``."""
        return self.x_fresh and self.x_ex < self.x_err and len(self.chain) >= 2 and self.chain[-1] is self.sol

    def planned(self) -> tuple[float, float]:
        """``(X, Tm)`` of the better answer in view: the current solve, or the extrapolation (its ``Tm`` once
        measured, the current solve's until then); they decide what to refine next."""
        t_ex = self.t_err if self.t_ex is None else self.t_ex
        return (self.x_ex, t_ex) if self.x_ex + t_ex < self.x_err + self.t_err else (self.x_err, self.t_err)

    def answer(self) -> tuple[float, FokkerPlanckSolution | None]:
        """``(estimate, coarser)`` of the answer: the extrapolation of the chain's last pair (its partner) when both
        its estimates were measured on the current solve's cells and steps and their sum is the smaller one, else the
        current solve alone."""
        if self.extrapolates() and self.t_ex is not None and self.x_ex + self.t_ex < self.x_err + self.t_err:
            return self.x_ex + self.t_ex, self.chain[-2]
        return self.x_err + self.t_err, None


def _replayable(sol: FokkerPlanckSolution) -> list[float] | None:
    """``sol``'s time steps to replay on another grid, or None (adaptive steps) when it diverged: its steps end at the
    divergence, and a replay past them would cover the rest of the horizon in single steps."""
    return sol.schedule if sol.diverged_at is None else None


def _reduction(previous: float, latest: float) -> float:
    """``r - 1`` for the Richardson estimate ``latest / (r - 1)`` of the finer solve of a pair, where ``r`` is how much
    the differences of consecutive pairs shrank (``previous / latest``, the observed order: ``r = 2^p``), kept in
    ``[2, 4]``: at most second order (``/ 3``, the assumption of a single pair), and a slower convergence, or an
    unresolved pair (a divergence in one solve only), counted as first order (``/ 1``) rather than trusted further.  Measured near the critical lr on THEORY §6: the space
    differences shrink about 2.6x per halving of the cells (order ~1.4), so ``/ 3`` would understate the error
    about 1.8x."""
    if not math.isfinite(previous) or not math.isfinite(latest) or latest <= 0:
        return 1.0  # no order to see (an unresolved pair, or no difference left): first order
    return min(4.0, max(2.0, previous / latest)) - 1.0


def refine_grid_on_subset(dyn_s: MeanFieldDynamics, dyn_c: MeanFieldDynamics, t_out: Tensor, base_s: FokkerPlanckSolution,
                          base_c: FokkerPlanckSolution, *, tol: float, step_tol: float | None, max_cells: int,
                          max_evaluations: int, estimate_floor: float, tol_used: float = 0.0,
                          base: tuple[int, float] | None = None, max_work: float = MAX_WORK,
                          closer: Iterable[tuple[MeanFieldDynamics, FokkerPlanckSolution]] = (),
                          final: FokkerPlanckSolution | None = None, **opts) -> SubsetCheck | None:
    """The grid check of :func:`refine_grid` on a small type set ``S``, for a combination with many types ``F``.

    The many-type answer is then ``L_0(F) + [L_l(S) - L_0(S)]`` (level-0 solve of ``F`` plus the grid
    correction measured on ``S``, the combination technique of sparse grids): its grid error is that of
    ``L_l(S)`` (the Richardson estimate, as in :func:`refine_grid`) plus how much the correction depends on
    the types, estimated by the same correction on a coarser set ``C``: ``|G_l(S) - G_l(C)|`` with
    ``G_l = L_l - L_0``, relative to ``R`` and ``C`` (the correction varies less between ``S`` and ``F``,
    which are closer).  Both ``S`` and ``C`` at each level use the same time steps.  A level has twice the cells
    and a quarter of the step tolerance of the one before, unless that one missed the tolerance by less than 2x:
    then the next has ``r`` times the cells and ``1/r^2`` of the step tolerance with ``r^2`` twice the reduction
    needed (:func:`_next_ratio`), and its Richardson estimate is the pair's difference / ``(r^2 - 1)`` (a power
    law with a sparse Gaussian teacher at ``d = 16384``: level 1 missed by 12 %, and a whole level 2 was 13 s of a
    23 s prediction; its partial level, 185 cells instead of 240, about 60 % of that).  ``base_s``/``base_c``:
    their solves on the grid ``base`` (``(cells, step tolerance)``, default :func:`grid_level`'s level 0).

    ``closer``: further type sets between ``S`` and ``F`` (``(dynamics, solve on base)``, in the order of the type
    ladder, each with more types; taken one at a time, so an iterator may solve each only when it is needed).  The
    cross term does not fall with the grid (it tends to the type dependence of level 0's own grid error), and
    between the ladder's first two sets it can be most of it: on that power law
    ``|G(S) - G(C)|`` was 2.8e-4 (a third of the tolerance left, and the reason for level 2) where
    ``|G(F) - G(S)|`` was 1.6e-5 and the next pair's 1.4e-5.  So when level 1 misses because of the cross term
    (its estimate alone fits, or the cross term is over half the tolerance) the pair moves one set along:
    ``C <- S``, ``S <-`` the next of ``closer``, solved on level 1 with the same time steps (one solve, against a
    level at ``r^3`` the cost of both); its Richardson estimate uses its own base solve.  Past level 1 the move also
    solves the new set on the previous level (on the subset's steps there) for its Richardson estimate: a
    power law with a Gaussian teacher, sigma 1 and a random-scale init at ``d = 2048`` (silent_scan case 2301) missed
    on level 2 by its cross term (4.2e-4 + 3.7e-4 against 6.8e-4), and the fallback, the grid check on the final
    1055 types, took 40 of the prediction's 50 s.

    ``final``: the many types' solve on the base grid, ``L_0(F)``.  With it the cross term is scaled up by how much
    further ``F`` is from ``S`` than ``S`` from ``C`` on level 0 (:func:`_reach_cross`): two ladder sets a few types
    apart bound little about the types beyond them (silent_scan case 2300: the pair moved to sets of 124 and 120 types,
    cross 1.5e-6, while the true ``|G(F) - G(S)|`` on F = 194 types was 6.8e-6; scaled, 2.0e-5).

    Where a level took its predecessor's steps (other limits than the step tolerance set them: :func:`_steps_moved`)
    the pair's difference is the cells' alone, and the subset's time error is measured by halving its steps
    (:func:`_halving_estimate`) and added to the estimate; past half the tolerance the check returns None (the check
    on the final types then refines by halving the steps).

    Returns a :class:`SubsetCheck` (``L_l(S)``, its base solve, grid and cross estimates), or None if a solve
    diverges (a divergence is decided on the many types: the caller refines them instead) or if the cross estimate
    stays above half the tolerance without halving from one level to the next: it tends to the type dependence of
    level 0's own grid error, which no level removes (a steep power law at ``d = 4096``: 3.2e-3 at every level
    while the subset's grid estimate fell to 1.5e-5, and the levels went on to step tolerance 1.6e-5 for
    minutes).
    """
    half_width = opts["half_width"]
    allowed = tol - tol_used

    def judge(fine, coarse, other, base_s, base_c, ratio):  # a pair's (Richardson estimate, scaled cross term)
        cross = _cross_estimate(fine, base_s, other, base_c, estimate_floor)
        return (_richardson_estimate(fine, coarse, estimate_floor, ratio),
                _reach_cross(cross, base_s, base_c, final, estimate_floor))

    closer = iter(closer)
    level, spent, cross_before = 0, base_s.nfe + base_c.nfe, math.inf
    work = _work(base_s) + _work(base_c)
    coarse = base_s
    n_cells, st = check_level(tol, half_width, step_tol, max_cells, base, 0)
    ratio = 2.0  # the next level: cells x ratio, step tolerance / ratio^2 (both errors fall ~ratio^2)
    while True:
        level += 1
        before = (n_cells, st)  # the previous level's grid
        n_cells, st = max(n_cells + 1, round(n_cells * ratio)), st / ratio**2
        fine = solve_on_grid(dyn_s, t_out, n_cells, st, **opts)
        other = solve_on_grid(dyn_c, t_out, n_cells, st, schedule=fine.schedule, **opts)
        spent += fine.nfe + other.nfe
        work += _work(fine) + _work(other)
        if any(x.diverged_at is not None for x in (fine, other, base_s, base_c)):
            return None
        estimate, cross = judge(fine, coarse, other, base_s, base_c, ratio)
        while estimate + cross > allowed and (estimate <= allowed or cross > 0.5 * allowed):
            following = next(closer, None)  # the pair moves one set along the ladder (see above)
            if following is None:
                break
            dyn_n, base_n = following
            nxt = solve_on_grid(dyn_n, t_out, n_cells, st, schedule=fine.schedule, **opts)
            # its previous level (past level 1) on the subset's steps there, for its own Richardson estimate
            below = base_n if level == 1 else solve_on_grid(dyn_n, t_out, *before, schedule=coarse.schedule, **opts)
            spent += nxt.nfe + (below.nfe if level > 1 else 0)
            work += _work(nxt) + (_work(below) if level > 1 else 0.0)
            if any(x.diverged_at is not None for x in (nxt, base_n, below)):
                return None
            dyn_s, dyn_c, fine, other, base_s, base_c, coarse = dyn_n, dyn_s, nxt, fine, base_n, base_s, below
            estimate, cross = judge(fine, coarse, other, base_s, base_c, ratio)
        if not _steps_moved(fine, coarse):  # the level's steps are its predecessor's: the pair saw space only
            halved = solve_on_grid(dyn_s, t_out, n_cells, st, schedule=_halved(fine.schedule), **opts)
            spent, work = spent + halved.nfe, work + _work(halved)
            time_err = _halving_estimate(fine, halved, estimate_floor)
            if time_err > 0.5 * allowed:
                return None  # a finer step tolerance would not shorten them: the check on the final types halves them
            estimate += time_err
        ratio = _next_ratio(estimate, allowed - cross)
        if (estimate + cross <= allowed or ratio * n_cells > max_cells  # a level: cells and steps x ratio
                or _next_exceeds(spent, ratio**2 * fine.nfe, max_evaluations, work,
                                 ratio**2 * (_work(fine) + _work(other)), max_work)):
            break
        if cross > 0.5 * allowed and cross > 0.5 * cross_before:
            return None  # the correction's type dependence does not fall with the grid: check the final types instead
        coarse, cross_before = fine, cross
    if estimate + cross > allowed:
        warnings.warn(f"Fokker-Planck solve: estimated relative error {estimate + cross:.2g} of the grid "
                      f"({estimate:.2g} on the subset, {cross:.2g} from its types) exceeds {allowed:.2g} (tol={tol:g}) "
                      f"with {n_cells} cells and {spent} operator evaluations (max_cells={max_cells}, "
                      f"max_evaluations={max_evaluations}, max_work={max_work:.3g} cell updates, {work:.3g} spent); "
                      "raise them or relax tol", RuntimeWarning, stacklevel=3)
    fine.error_estimate = estimate + cross
    fine.levels = level
    return SubsetCheck(fine, base_s, estimate, cross)


class SubsetCheck(NamedTuple):
    """What :func:`refine_grid_on_subset` found: the subset's finest solve ``L_l(S)``, its solve on the base grid
    ``L_0(S)`` (the combination is ``L_0(F) + L_l(S) - L_0(S)``), the Richardson estimate and the cross estimate."""

    fine: "FokkerPlanckSolution"
    base: "FokkerPlanckSolution"
    estimate: float
    cross: float


def _cross_estimate(fine_s: "FokkerPlanckSolution", base_s: "FokkerPlanckSolution", fine_c: "FokkerPlanckSolution",
                    base_c: "FokkerPlanckSolution", floor: float) -> float:
    """How much the grid correction depends on the types: ``max |G(S) - G(C)| / |L(S)|`` over R and C (E7) and the
    output times with ``R >= floor R(0)``, ``G = L_fine - L_base`` (:func:`refine_grid_on_subset`)."""
    a = _observed_curves(fine_s)
    cross_abs = ((a - _observed_curves(base_s)) - (_observed_curves(fine_c) - _observed_curves(base_c))).abs()
    ok = torch.isfinite(a).all(0) & (fine_s.risk >= floor * fine_s.risk[0])
    return float((cross_abs / a.abs().clamp_min(tiny(a)))[:, ok].max()) if bool(ok.any()) else 0.0


def _reach_cross(cross: float, base_s: "FokkerPlanckSolution", base_c: "FokkerPlanckSolution",
                 final: "FokkerPlanckSolution | None", floor: float) -> float:
    """The cross term of :func:`refine_grid_on_subset` scaled to the distance from ``S`` to the final types ``F``:
    ``cross * max(1, d(F, S) / d(S, C))`` with ``d`` the level-0 difference of R and C (:func:`_pair_difference`);
    ``cross`` itself without ``final``.  Measured against the true ``|G(F) - G(S)|`` (docs/benchmarks.md, sixteenth
    session) on nine settings: the cross term alone was 0.23-18.7x the truth, scaled alone 0.64-4.2x, the larger of
    the two 1.5-18.7x."""
    if final is None:
        return cross
    near, far = _pair_difference(base_s, base_c, floor), _pair_difference(final, base_s, floor)
    if not far > near:  # F no further from S than C is (or nothing measured): the cross term as it is
        return cross
    return math.inf if near == 0.0 or math.isinf(far) else cross * far / near


def _next_ratio(estimate: float, room: float) -> float:
    """The refinement of the next level of :func:`refine_grid_on_subset`: cells x ``ratio``, step tolerance /
    ``ratio^2``, so that a second-order ``estimate`` falls ``ratio^2`` times.  A full level (2) unless the estimate
    needs less than half of that to fit in ``room`` (the tolerance left by the cross estimate): then ``ratio^2`` is
    twice the reduction needed (at least 1.25), and a level that just missed is not paid for at 4x its cost."""
    need = estimate / room if room > 0 else math.inf
    return 2.0 if not need < 2.0 else max(1.25, math.sqrt(2.0 * need))


def _next_exceeds(spent: int, next_evaluations: float, max_evaluations: int, work: float, next_work: float,
                  max_work: float) -> bool:
    """Whether the grid check's next solve(s), costing about ``next_evaluations`` operator evaluations and
    ``next_work`` cell updates, would take it past either soft cap (the caller then stops and warns)."""
    return spent + next_evaluations > max_evaluations or work + next_work > max_work


def _work(sol: "FokkerPlanckSolution") -> float:
    """A solve's cost in cell updates: ``types x cells x operator evaluations`` (one member of a batch)."""
    return float(sol.nfe) * sol.dynamics.types.num_types * sol.xi.numel()


def _observed_curves(sol: "FokkerPlanckSolution") -> Tensor:
    """``(2, n)``: ``R`` and ``C`` (E7) at the output times, from the solve's own per-type curves (computed once per
    solution: the grid check compares a solve with up to three others)."""
    curves = sol.__dict__.get("_observed")
    if curves is None:
        curves = sol.__dict__["_observed"] = torch.stack([sol.risk, sol.type_curves()[1].sum(-1)])
    return curves


def _richardson_estimate(fine: "FokkerPlanckSolution", coarse: "FokkerPlanckSolution", floor: float,
                         ratio: float = 2.0) -> float:
    """Estimated relative error of ``fine``: :func:`_pair_difference` / ``(ratio^2 - 1)`` (second order, cells x
    ``ratio`` and step tolerance / ``ratio^2``; / 3 for a whole level)."""
    return _pair_difference(fine, coarse, floor) / (ratio**2 - 1.0)


def _steps_moved(finer: "FokkerPlanckSolution", coarser: "FokkerPlanckSolution") -> bool:
    """Whether ``finer`` (a smaller step tolerance) took clearly more steps than ``coarser`` (at most
    :data:`_FEWER_STEPS` of them), so that their difference holds a time refinement.

    Where other limits set the steps (the output times, the per-type step in total variation) a step tolerance does
    not move them, and a pair of step tolerances shows no time error however large it is: THEORY §6 (d = 1000,
    t <= 5, 480 cells) at step tolerance 0.32 takes 32-35 steps at lr 0.5, 2 and 8, as does 4x that, for time errors
    of 2.7e-3, 0.11 and 0.80 (against 5 000-19 000 steps at 1e-6); at ``tol = 0.02``, lr 8, the grid check answered
    957 cells with an estimate of 3.3e-3 for an error of 4.8 %.  The time error of such steps is measured by halving
    them (:func:`_halving_estimate`)."""
    if finer.diverged_at is not None or coarser.diverged_at is not None:
        return True  # steps that end at a divergence are not counts of the same horizon: no claim
    return len(coarser.schedule) <= _FEWER_STEPS * len(finer.schedule)


def _halved(schedule: list[float]) -> list[float]:
    """Every step of ``schedule`` in two halves (a replay: the time refinement of steps no tolerance sets)."""
    return [x for h in schedule for x in (0.5 * h, 0.5 * h)]


def _halving_estimate(sol: "FokkerPlanckSolution", halved: "FokkerPlanckSolution", floor: float) -> float:
    """The time error of ``sol`` from ``halved`` (its steps halved, same cells): twice their difference, i.e. the
    error of a first-order method (``|S - S_h| (1 + 1 / (2^p - 1))``, ``p = 1``).  Measured on THEORY §6 (d = 1000,
    t <= 5, 120-480 cells, step tolerances 0.001-0.32, against 1e-6): halving shrank the differences 2.4-4.3x (order
    1.25-2.1), and twice the difference was 1.2-1.55x the true time error at lr 0.5, 2 and 8 (1.5x of it would have
    been 0.9x at lr 8)."""
    return 2.0 * _pair_difference(sol, halved, floor)


def _first_divisor(fine: "FokkerPlanckSolution", coarse: "FokkerPlanckSolution", low: "FokkerPlanckSolution",
                   floor: float) -> float:
    """The divisor of the grid check's first pair (levels 1 and 0): ``r - 1`` (:func:`_reduction`) from how much the
    pair's difference is smaller than that of level 0 and ``low``, a level below it (half its cells, 4x its step
    tolerance): 3 (Richardson's second order) only where the pairs show it, down to 1 (the difference itself) where
    they do not or where ``low`` diverged.

    The ``/ 3`` alone holds in the asymptotic range only, and a loose ``tol`` starts the check on grids far from it:
    THEORY §6 (d = 1000, t <= 5) at lr 4 with ``tol = 0.05`` accepted 64 cells (its level 0, 32 cells, the first
    of 8, 16, 32 that did not diverge) at an estimate of 3.2e-2 for a true error of 16.5 %; at lr 2, ``tol = 0.02``,
    1.5e-2 for 4.8 % (both silent)."""
    return _reduction(_pair_difference(coarse, low, floor), _pair_difference(fine, coarse, floor))


# A twin with 4x the step tolerance shows the order of the time error only if it took at most this share of the
# steps (second order: about half of them); THEORY §6 at lr 0.5 takes 449 and 425 steps at step tolerances 0.016 and
# 0.064 (the output times and the largest change per step set them), and the pair's ratio ~1 said nothing.
_FEWER_STEPS = 0.75


def _time_divisor(twin: "FokkerPlanckSolution", twin2: "FokkerPlanckSolution", raw: float, floor: float) -> float:
    """``r - 1`` for the time estimate ``raw / (r - 1)`` of a solve from its twins with 4x and 16x the step tolerance
    (:func:`_reduction` of the two pairs' differences), where the second twin took clearly fewer steps than the first
    (:data:`_FEWER_STEPS`); else 3 (second order, a single pair's assumption).  Measured on THEORY §6 at lr 8 on 608
    cells: time errors 2.6e-2, 1.0e-2, 2.8e-3 at step tolerances 1e-2, 2.5e-3, 6.25e-4 (order ~1.4, not 2)."""
    if len(twin2.schedule) > _FEWER_STEPS * len(twin.schedule):
        return 3.0
    return _reduction(_pair_difference(twin, twin2, floor), raw)


# Past this ratio of consecutive space differences (order ~1.6) a chain of solves is taken to be in the asymptotic
# range of the cells' second order, where the Richardson extrapolation of its last pair is tried.
_ASYMPTOTIC = 3.0


def _extrapolated(fine: "FokkerPlanckSolution", half: "FokkerPlanckSolution") -> Tensor:
    """``(2, n)``: the Richardson extrapolation ``(4 fine - half) / 3`` of R and C of two solves on the same time steps,
    ``half`` with half the cells (the second-order term of the cells cancels)."""
    a = _observed_curves(fine)
    return a + (a - _observed_curves(half)) / 3.0


def _extrapolation_estimate(chain: list["FokkerPlanckSolution"], floor: float) -> float:
    """Estimated relative error of the Richardson extrapolation of the last two solves of ``chain`` (solves on the
    same time steps, each with twice the cells of the one before; at least three), or ``inf``.

    ``E2 = (4 S - S_h) / 3`` and ``E1 = (4 S_h - S_q) / 3`` from the last three solves ``S_q, S_h, S``: where the
    plain differences shrink at least :data:`_ASYMPTOTIC`-fold (the second-order term dominates), the extrapolations
    converge at least at second order too, so ``E2``'s error is at most ``|E2 - E1| / 3``; else ``inf`` (no
    extrapolation).  Measured on THEORY §6 at 0.8x the critical lr (d = 16384, replayed steps, against the
    extrapolation of 3840 and 7680 cells): the plain solves' errors 1.8e-2, 4.6e-3, 1.1e-3 at 480, 960, 1920 cells
    fall 4x per doubling, the extrapolations' 1.3e-3, 6.0e-5, 4.1e-6 about 20x (order ~4, the scheme being
    symmetric); this estimate is then 5-7x above the error there, 2-4x on two-level-noisy (docs/benchmarks.md)."""
    if len(chain) < 3:
        return math.inf
    quarter, half, sol = chain[-3:]
    near, far = _pair_difference(sol, half, floor), _pair_difference(half, quarter, floor)
    if not (math.isfinite(far) and 0.0 < near and far >= _ASYMPTOTIC * near):
        return math.inf
    return _pair_difference(sol, quarter, floor, curves=(_extrapolated(sol, half), _extrapolated(half, quarter))) / 3.0


def _pair_difference(fine: "FokkerPlanckSolution", coarse: "FokkerPlanckSolution", floor: float,
                     curves: tuple[Tensor, Tensor] | None = None) -> float:
    """The largest relative difference ``max |fine - coarse| / |fine|`` of R and C between two solves.

    Taken over output times before the divergence, with ``R >= floor * R(0)``.  If only one of the two
    diverged, or they diverged at different output times, the divergence itself is unresolved: ``inf``; so is a risk
    below ``sigma^2 / 2`` in either (a negative excess risk: the fourth-order weights of a law collapsed into a few
    cells, seen in a best_lr sweep before the stall rule of :func:`refine_grid_batch`).  ``curves``: compare these
    ``(2, n)`` R and C instead of the two solves' own (their extrapolations, :func:`_extrapolation_estimate`).
    """
    if fine.diverged_at != coarse.diverged_at:  # one diverged, or both at different output times
        return math.inf
    floor_risk = _RISK.offset(fine.dynamics.noise_std)
    for sol in (fine, coarse):  # R below sigma^2/2 (a negative excess risk) is impossible: an unresolved law
        risk = sol.risk[torch.isfinite(sol.risk)]
        if risk.numel() and bool((risk < floor_risk - 1e-9 * max(floor_risk, float(risk.abs().max()))).any()):
            return math.inf
    a, b = curves if curves is not None else (_observed_curves(fine), _observed_curves(coarse))
    if curves is not None and bool((a[0] < floor_risk).any() | (b[0] < floor_risk).any()):
        return math.inf  # an extrapolation below sigma^2 / 2: the pairs are far from their asymptotic range
    ok = torch.isfinite(a).all(0) & torch.isfinite(b).all(0) & (fine.risk >= floor * fine.risk[0])
    for div in (fine.diverged_at, coarse.diverged_at):
        if div is not None:
            ok &= fine.t < div
    if not bool(ok.any()):
        return 0.0
    rel = ((a - b).abs() / a.abs().clamp_min(tiny(a)))[:, ok]
    return float(rel.max())


def solve_on_grid(dynamics: MeanFieldDynamics, t_out: Tensor, n_cells: int, step_tol: float, *, half_width: float = 20.0,
                  t0: float = 1e-4, blowup_factor: float = 1e4, tail_limit: float = 0.05, dim: int | None = None,
                  max_steps: int = 200_000, schedule: list[float] | None = None,
                  budget: Budget | None = None, on_step=None) -> FokkerPlanckSolution:
    """One solve of E6 on a fixed number of cells (see :func:`solve_fokker_planck`).

    ``schedule``: the time steps of an earlier solve (its :attr:`FokkerPlanckSolution.schedule`) to replay
    without error control (see :func:`_integrate_mprk22`).  ``budget``: charged one unit per operator
    evaluation (:class:`Budget`).  ``on_step(t)``: called after every accepted step (progress).
    """
    (sol,) = solve_batch_on_grid(dynamics, t_out, n_cells, step_tol, half_width=half_width, t0=t0,
                                 blowup_factor=blowup_factor, tail_limit=tail_limit, dim=dim, max_steps=max_steps,
                                 schedule=schedule, budget=budget, on_step=on_step)
    return sol


def solve_batch_on_grid(dynamics: MeanFieldDynamics, t_out: Tensor, n_cells: int, step_tol: float, *,
                        half_width: float = 20.0, t0: float = 1e-4, blowup_factor: float = 1e4, tail_limit: float = 0.05,
                        dim: int | None = None, max_steps: int = 200_000, schedule: list[float] | None = None,
                        budget: Budget | None = None, on_step=None) -> list[FokkerPlanckSolution]:
    """:func:`solve_on_grid` for every member of a batch of coefficients at once (one solution per member).

    ``dynamics`` with a :class:`~sde_optim.theory.dynamics.CoefficientBatch` of ``G`` members (or plain: ``G = 1``)
    is solved as one system with a leading group dimension: every operation is batched over the members, the
    time steps are shared (accepted when every member's local error is below ``step_tol``), and a member that
    diverges leaves the batch (its state frozen, as for one solve), so the others go on at their own pace.
    """
    types = dynamics.types
    dtype, dev = types.lam.dtype, types.lam.device
    groups = dynamics.groups or 1
    t_end = float(t_out[-1])
    if t_end > 0:
        t0 = min(t0, 0.5 * t_end)
    step_limit = (dynamics.coef.stability_factor(), dim) if dim is not None else None
    grid = _Grid(dynamics, n_cells, half_width, step_limit)
    n_types = types.num_types

    # Delta initial condition -> analytic short-time Gaussian at t0 (THEORY §4).
    x0 = types.x0[:, None]
    c0 = dynamics.state(x0, dynamics.q0)
    r0 = dynamics.risk(c0, dynamics.weight)
    a0 = dynamics.drift(c0.beta, r0, 0.0)
    d0 = dynamics.diffusion(r0, 0.0)
    m0 = (x0 + a0 * t0)[..., 0].expand(groups, n_types)
    s0 = torch.sqrt(2.0 * d0 * t0)[..., 0].expand(groups, n_types)
    s0 = torch.where(s0 > 0, s0, torch.full_like(s0, 1e-8))
    g0 = _gaussian_cells(grid.faces).expand(groups, n_types, grid.xi.numel()).clone()
    threshold = blowup_factor * max(float(r0), 1e-300)
    state0 = (g0, m0.clone(), s0.clone(), (_per_group(dynamics.coef.noise(0.0)) * r0 * t0).reshape(-1).expand(groups).clone())
    later = t_out[t_out > t0]
    if later.numel():
        with torch.inference_mode():  # no autograd bookkeeping per operation: a third of a small step's cost
            outs, nfe, tail_divs, taken = _integrate_mprk22(grid, state0, t0, later, step_tol, threshold, max_steps,
                                                            tail_limit, schedule, budget or Budget(), on_step)
        traj = tuple(torch.stack(z) for z in zip(*outs))  # stacked outside: ordinary tensors for the caller
    else:  # no output time after t0: an empty trajectory (state and per-type curves)
        curves0 = torch.zeros(groups, 2, n_types, dtype=dtype, device=dev)
        traj = tuple(z[None][:0] for z in (*state0, curves0))
        nfe, tail_divs, taken = 0, [None] * groups, []
    n_before = t_out.numel() - later.numel()
    sols = []
    for g in range(groups):
        mass, m, s, integral, curves = (z[:, g] for z in traj)
        member = dynamics.member(g) if dynamics.groups is not None else dynamics
        if n_before:  # times <= t0 take the exact (delta) initial law
            pad = lambda z, first: torch.cat([first.expand(n_before, *first.shape), z])  # noqa: E731
            mass = pad(mass, g0[g])
            m = pad(m, x0[:, 0])
            s = pad(s, torch.full_like(s0[g], 1e-12))
            integral = pad(integral, torch.zeros((), dtype=dtype, device=dev))
            head = FokkerPlanckSolution(t_out[:n_before], grid.xi, grid.h, mass[:n_before], m[:n_before], s[:n_before],
                                        integral[:n_before], torch.empty(0), member, None, 0, 0.0)
            curves = torch.cat([head.type_curves().transpose(0, 1), curves])
        sol = FokkerPlanckSolution(t_out, grid.xi, grid.h, mass, m, s, integral, torch.empty(0), member, None, nfe,
                                   float(torch.maximum(mass[..., 0], mass[..., -1]).max()), schedule=taken, curves=curves)
        risk = curves[:, 0].sum(-1) + _RISK.offset(dynamics.noise_std)  # E7 from the solve's own statistics
        sol.risk = risk
        bad = (~torch.isfinite(risk)) | (risk > threshold)
        if bool(bad.any()):
            sol.diverged_at = float(t_out[int(bad.nonzero()[0, 0])])
        tail_div = tail_divs[g]
        if tail_div is not None and (sol.diverged_at is None or tail_div < sol.diverged_at):
            sol.diverged_at = tail_div
        sols.append(sol)
    return sols


def _per_group(value):
    """A coefficient as a per-group factor: a float as it is, a batch's ``(G, 1, 1)`` as ``(G,)``."""
    return value.reshape(-1) if isinstance(value, Tensor) else value


def _integrate_mprk22(grid: _Grid, state0, t0: float, times: Tensor, step_tol: float, threshold: float, max_steps: int,
                      tail_limit: float, schedule: list[float] | None = None, budget: Budget | None = None, on_step=None):
    """Adaptive MPRK22 (modified Patankar-Runge-Kutta, Kopecz & Meister 2018, alpha = 1).

    For the linear conservative system ``y' = A(t) y`` (``A`` Metzler with zero column sums)
    the two stages are backward-Euler-like solves with M-matrices:
      stage 1: ``(I - dt A_n) y1 = y_n``;
      stage 2: ``(I - dt/2 (A_n diag(y_n / y1) + A_1)) y_{n+1} = y_n``,
    so ``y_{n+1} > 0`` and ``sum y_{n+1} = sum y_n`` for every ``dt`` (positive and
    conservative by construction), second order.  The grid moves with one velocity over the step
    (:meth:`_Grid.plan`), used by both stages, so ``y1`` and ``y_{n+1}`` live on the same grid and their
    difference is the local error of the law; ``int R`` uses Heun's method with the same stages.
    The step is accepted when, for every member of the batch, the weighted total variation
    ``sum_tau pi_tau |y1 - y_{n+1}|_1``, the change of ``R`` and ``C`` it implies and the relative error of
    ``int R`` are below ``step_tol`` (and no single type's law moved by more than ``_MAX_TYPE_TV`` in total
    variation).  State shapes: mass ``(G, T, N)``, ``m, s`` ``(G, T)``, ``int R`` ``(G,)``.

    A member that diverges (``R`` past ``threshold``, the tail or step limit, or no step resolving it) is frozen
    and leaves the batch; the rest go on.  ``schedule``: replay these step sizes instead (no error control): two
    solves on the same steps have the same time-discretization error to first order, so their difference
    isolates what else differs (the types).  Returns the trajectory (a list over the ``n`` output times of tuples
    ``(mass, m, s, int R, curves)`` with a leading ``G``), the operator evaluations, each member's tail-divergence
    time (or None) and the steps taken.  The curves are the per-type R and C (:class:`_Statistics`'s ``per_type``,
    ``(G, 2, T)``).  Runs under ``torch.inference_mode`` (:func:`solve_batch_on_grid`): its tensors are inference
    tensors, and the caller stacks the trajectory outside it.
    """
    mass, m, s, integral = state0
    frozen = [z.clone() for z in state0]  # every member's latest state (a diverged member's stays here)
    groups = mass.shape[0]
    alive = list(range(groups))
    tail_div: list[float | None] = [None] * groups
    taken: list[float] = []
    replay = iter(schedule) if schedule is not None else None
    dyn_all = grid.dyn
    t = t0
    dt = t0
    outs: list[tuple[Tensor, ...]] = []
    nfe = 0
    steps = 0
    mark = (t0, 0)  # (t, steps) at the last crawl check
    budget = budget or Budget()
    st0 = grid.statistics(mass, m, s, integral, t)
    nfe += 1
    frozen.append(st0.per_type.transpose(0, 1).clone())  # every member's latest per-type curves (G, 2, T)
    wanted = times.tolist()
    stops = sorted(set(wanted) | {b for b in dyn_all.coef.breakpoints if t0 < b < wanted[-1]})  # schedule jumps too

    def next_wanted(x: float) -> float:
        return min((w for w in wanted if w >= x * (1 - 1e-13)), default=wanted[-1])

    def drop(bad: list[int], t_target: float, tail: list[bool]) -> None:
        """Freeze the members at positions ``bad`` of the batch (their current state) and take them out."""
        nonlocal mass, m, s, integral, st0, alive
        for pos, is_tail in zip(bad, tail):
            g = alive[pos]
            for full, cur in zip(frozen, (mass, m, s, integral, st0.per_type.transpose(0, 1))):
                full[g] = cur[pos]
            if is_tail:
                tail_div[g] = next_wanted(t_target)  # first output time at or after the tail / step limit took over
        keep = [i for i in range(len(alive)) if i not in set(bad)]
        alive = [alive[i] for i in keep]
        if not alive:
            return
        idx = torch.tensor(keep, device=mass.device)
        mass, m, s, integral = mass[idx], m[idx], s[idx], integral[idx]
        if dyn_all.groups is not None:
            grid.dyn = dyn_all.with_coefficients(dyn_all.coef.select(alive))
            if grid.step_limit is not None:
                grid.step_limit = (grid.dyn.coef.stability_factor(), grid.step_limit[1])
        st0 = grid.statistics(mass, m, s, integral, t, 1)

    try:
        for t_target in stops:
            while alive and t < t_target * (1 - 1e-13):
                steps += 1
                if steps > max_steps:
                    raise RuntimeError(f"Fokker-Planck solve exceeded max_steps={max_steps} at t={t:.4g}")
                h = min(dt, t_target - t) if replay is None else min(next(replay, t_target - t), t_target - t)
                budget.spend(2)
                y2, m1, s1, i2, err_g, st2 = grid.attempt(st0, mass, m, s, integral, t, h, None if replay else step_tol)
                nfe += 1
                err = max(err_g)  # replayed steps are not controlled: no error to measure
                if err > step_tol:
                    if h < 1e-9 * max(t, 1e-3):
                        # No step resolves these members' laws any more (the observables are carried by cells tens of
                        # e-folds out: the onset of blow-up, seen on coarse grids).  Stop them: a divergence.
                        bad = [i for i, e in enumerate(err_g) if e > step_tol]
                        drop(bad, t_target, [True] * len(bad))
                        dt = t0
                        continue
                    dt = h * max(0.2, 0.9 * math.sqrt(step_tol / err))
                    continue
                t += h
                taken.append(h)
                if on_step is not None:
                    on_step(t)
                mass, m, s, integral, st0 = y2, m1, s1, i2, st2
                nfe += 1
                risk, tail, unstable = torch.stack([st0.risk, st0.tail_share, st0.unstable]).tolist()  # one host read
                risk_bad = [not math.isfinite(r) or r > threshold for r in risk]
                flags = [risk_bad, [not r and (x > tail_limit or u >= 1.0) for r, x, u in zip(risk_bad, tail, unstable)]]
                bad = [i for i in range(len(alive)) if flags[0][i] or flags[1][i]]
                if replay is None and steps - mark[1] >= _CRAWL_STEPS:
                    if t - mark[0] < _CRAWL_ADVANCE * max(t, 1e-3) and not bad:
                        # Steps accepted but vanishing (a blow-up approached in ever smaller steps, seen on grids far
                        # too coarse): the members that limit the step diverge here, the rest go on.
                        bad = [i for i, e in enumerate(err_g) if e >= 0.5 * err]
                        flags[1] = [True] * len(alive)
                    mark = (t, steps)
                if bad:
                    drop(bad, t_target, [flags[1][i] for i in bad])
                grow = min(2.0, max(0.2, 0.9 * math.sqrt(step_tol / err))) if err > 0 else 2.0
                if h == dt or grow < 1:
                    dt = h * grow
            if t_target in wanted or not alive:
                if alive:
                    idx = torch.tensor(alive, device=mass.device)
                    for full, cur in zip(frozen, (mass, m, s, integral, st0.per_type.transpose(0, 1))):
                        full[idx] = cur
                while len(outs) < len(wanted) and (wanted[len(outs)] <= t_target * (1 + 1e-13) or not alive):
                    outs.append(tuple(z.clone() for z in frozen))  # a diverged member: its frozen state (R > threshold)
            if len(outs) == len(wanted):
                break
    finally:
        grid.dyn = dyn_all
    return outs, nfe, tail_div, taken


def _step_errors(y1: Tensor, y2: Tensor, i1: Tensor, i2: Tensor, st1: _Statistics, weight: Tensor,
                 step_tol: float) -> list[float]:
    """Each member's local error of an MPRK22 step (:func:`_integrate_mprk22`): the largest of the weighted total
    variation ``sum_tau pi_tau |y1 - y2|_1`` of the laws ``(G, T, N)``, the change of ``R`` and ``C`` it implies and the
    relative error of ``int R`` (``(G,)``); a step that moves one type's law by more than ``_MAX_TYPE_TV`` counts as
    above ``step_tol``.  One host read: a list of ``G`` floats."""
    change = torch.sub(y2, y1).abs_()
    tv = change.sum(-1)  # (G, T)
    rel_i = torch.where(i2 > 0, (i2 - i1).abs() / i2.clamp_min(tiny(i2)), torch.zeros_like(i2))
    errs = torch.stack([(weight * tv).sum(-1), st1.observable_error(change), rel_i]).amax(0)  # (G,)
    errs = torch.maximum(errs, step_tol * tv.amax(-1) / _MAX_TYPE_TV * (tv.amax(-1) > _MAX_TYPE_TV))
    # a non-finite error rejects the step (after the maximum, which keeps a nan: a nan error compared below step_tol
    # and accepted a step whose solve had failed)
    errs = torch.where(torch.isfinite(errs), errs, torch.full_like(errs, math.inf))
    return errs.tolist()


# A solve that advances less than _CRAWL_ADVANCE x t in _CRAWL_STEPS accepted steps is crawling into a blow-up
# (THEORY §6 at 2x the critical lr on 8 cells: 20 000 steps of ~3e-11 at t = 1.2e-3); a sound solve takes steps of
# 1e-3 to 1e-1 of t, i.e. advances t by 40 % or more in 500 steps.
_CRAWL_STEPS, _CRAWL_ADVANCE = 500, 1e-3
