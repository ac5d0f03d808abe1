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
  answers with the extrapolation of its last two grids where that is the better answer (:func:`~.grid_check.refine_grid_batch`,
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

import numpy as np
import torch
from torch import Tensor

from .._validation import check_choice, check_float, check_int
from ..observables import OBSERVABLES, CoordinateState
from .compiled_step import _MAX_TYPE_TV, TYPE_FIELDS, compiled_kernels  # (_MAX_TYPE_TV: both steps' cap)
from .dynamics import MeanFieldDynamics, _state_cap
from .statistics import tiny, weighted
from .sg_operator import _compiled, _scalar, implicit_solve, sg_bands

_RISK, _CURVATURE = OBSERVABLES["risk"], OBSERVABLES["curvature"]

__all__ = ["FokkerPlanckSolution", "solve_fokker_planck", "solve_on_grid", "solve_batch_on_grid",
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
    (``N`` and ``2 N`` cells, :func:`~.grid_check.refine_grid_batch`) sees it: a fixed window's error does not fall with
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
    (:func:`~.grid_check.refine_grid_on_subset`) measures the types' effect on level 0 (``N / 4`` cells), whose cells at the
    window's edge were then 7 std wide, and its estimate no longer fell with the level (a log-uniform spectrum at
    ``d = 2048`` refined to 1088 cells and 6 minutes instead of 136 cells in 5 s).  Clamped to ``[32, 1024]``.
    """
    h = math.sqrt(tol / 0.1)
    return int(min(1024, max(32, math.ceil(2 * 0.6 * half_width / h))))


SCHEMES = ("mprk22", "midpoint")  # the steps of _integrate_mprk22


class StiffSolve(Exception):
    """An MPRK22 solve met steps in which some type relaxes much faster than the step (``k h`` above the solve's
    ``stiff_limit``) while its step control rejected many attempts: there MPRK22 multiplies that type's deviation from
    its equilibrium by about ``-1/2`` per step, however short, and the step control cannot follow its error (see
    :func:`_integrate_mprk22`).  Raised so that the caller solves again, every solve of its checks with the midpoint
    rule (``scheme="midpoint"``).  ``kh``, ``t``: the step's; ``rejected``: the solve's share of rejected attempts."""

    def __init__(self, kh: float, t: float, rejected: float) -> None:
        super().__init__(f"a type with k h = {kh:.3g} at t = {t:.4g}, {100 * rejected:.0f} % of attempts rejected")
        self.kh, self.t, self.rejected = kh, t, rejected


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

    def again(self) -> "Budget":
        """A new count of evaluations under the same caps, on this budget's clock (``max_seconds`` counts from its start):
        a sweep's members solved one by one (:meth:`~sde_optim.theory.solvers.PDESolver.solve_batch`)."""
        fresh = Budget(self.max_evaluations, self.max_seconds)
        fresh._start = self._start
        return fresh

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
            and ``error_estimate`` is that answer's error (the grid check sets it, :func:`~.grid_check.refine_grid_batch`).  The
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
                 step_limit: tuple[float, int] | None = None, scheme: str = "mprk22") -> None:
        dtype, dev = dynamics.lam.dtype, dynamics.lam.device
        self.dyn = dynamics
        self.scheme = scheme  # the step of attempt: "mprk22" or "midpoint" (SCHEMES)
        self.stiffness: Tensor | None = None  # each member's largest k h over the types in the latest attempt (G,)
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
        self.stiffness = kh.amax(-1)
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
        y1 = op0.implicit_solve(h, mass).clamp_min_(0.0)  # MPRK22's stage 1; the midpoint rule's weight denominator
        rate0 = _per_group(coef.noise(t, 1)) * st0.risk  # integrand of I = int nu R (E4)
        i1 = integral + h * rate0
        if self.scheme == "midpoint":  # the stage at t + h/2 (on the grid there), the weights y_half / y1
            half = 0.5 * h
            y_half = op0.implicit_solve(half, mass).clamp_min_(0.0)
            st1 = self.statistics(y_half, m + half * vm, s + half * vs, integral + half * rate0, t + half, 1, full=False)
            op1 = self.assemble(st1, s + half * vs, vm, vs)
            ratio = torch.div(y_half, y1).masked_fill_(~(y1 > 0), 1.0)
            y2 = op1.implicit_solve(h, mass, col_scale=ratio).clamp_min_(0.0)
            i2 = integral + h * _per_group(coef.noise(t + half, 1)) * st1.risk
        else:
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
                              self._geometry[0], *self._scalars, *out.arrays[5:14])
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
        midpoint = self.scheme == "midpoint"
        coefh = self._members(t + 0.5 * h, 1)[0] if midpoint else coef0  # (unread by MPRK22)
        accepted = compiled_kernels()[1](
            np_(mass), np_(m), np_(s), np_(integral), np_(st0.risk), np_(st0.a), np_(st0.diffusion), np_(moments),
            coef0, coef1, coefh, coef2, limit2, dim, h, step_tol is not None, midpoint,
            0.0 if step_tol is None else step_tol, self._types, *self._geometry, *self._scalars,
            *(_scalar(mass, v) for v in (0.0, 1.0, -h, -0.5 * h)), *out.arrays)
        self.stiffness = out.tensors[14]
        y2, m1, s1, i2 = out.tensors[:4]
        return y2, m1, s1, i2, ([0.0] if step_tol is None else out.arrays[4].tolist()), (
            out.statistics if accepted else None)


class _StepOutputs:
    """What one compiled step writes (:meth:`_Grid._compiled_attempt`), as numpy arrays and tensors over them: the state
    ``mass, m, s, int R``, the errors ``(G,)``, then the statistics of ``compiled_step._evaluate`` (``risk, a,
    diffusion, moments, observed, totals, per_type, tail_share, unstable``), the stiffness ``(G,)``
    (:attr:`_Grid.stiffness`), and the :class:`_Statistics` over them."""

    def __init__(self, shape: tuple[int, int, int], dtype) -> None:
        groups, types, n = shape
        shapes = ((groups, types, n), (groups, types), (groups, types), (groups,), (groups,),
                  (groups,), (groups, types, 2 * n - 1), (groups, types), (4, groups, types), (2, groups, types, n),
                  (2, groups), (2, groups, types), (groups,), (groups,), (groups,))
        self.arrays = [np.empty(shape, dtype=dtype) for shape in shapes]
        self.tensors = [torch.from_numpy(a) for a in self.arrays]
        risk, a, diffusion, moments, observed, totals, per_type, tail_share, unstable = self.tensors[5:14]
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
    scheme: str = "mprk22",
    **deprecated,
) -> FokkerPlanckSolution:
    """Solve E6 (with E4) at the increasing times ``t_out`` (shape ``(n,)``, ``t_out >= 0``).

    **Resolution from the tolerance, checked a posteriori.**  Unless ``num_cells`` is given, the system
    is solved on two consecutive levels of :func:`grid_level` (``N/2`` cells with local step tolerance
    ``4 s`` and ``N`` cells with ``s``); the relative difference of ``R`` and ``C`` between the two, divided
    by 3 (Richardson: both errors are second order, and the finer solve has half the cell width and
    half the step), is the error estimate of the finer solve.  While it exceeds ``tol`` the error is split
    into its space and time parts and the larger one is refined (:func:`~.grid_check.refine_grid_batch`; up to
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
        scheme: the time step, ``"mprk22"`` or ``"midpoint"`` (:func:`_integrate_mprk22`: the second for solves
            in which a type relaxes much faster than the steps; :class:`~sde_optim.theory.solvers.PDESolver` chooses).

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
                max_steps=max_steps, scheme=check_choice("scheme", scheme, SCHEMES))
    if num_cells is not None:
        return solve_on_grid(dynamics, t_out, check_int("num_cells", num_cells, minimum=8),
                             step_tol if step_tol is not None else tol, **opts)
    if not refine:
        n, st = grid_level(tol, half_width, step_tol, 2, max_cells)  # the a priori resolution
        return solve_on_grid(dynamics, t_out, min(n, max_cells), st, **opts)
    coarse = solve_on_grid(dynamics, t_out, *grid_level(tol, half_width, step_tol, 0, max_cells), **opts)
    from .grid_check import refine_grid  # (the check solves on grids: it imports this module)

    return refine_grid(dynamics, t_out, coarse, tol=tol, step_tol=step_tol, max_cells=max_cells,
                       max_evaluations=max_evaluations, estimate_floor=estimate_floor, max_work=max_work, **opts)


def _observed_curves(sol: "FokkerPlanckSolution") -> Tensor:
    """``(2, n)``: ``R`` and ``C`` (E7) at the output times, from the solve's own per-type curves (computed once per
    solution: the grid check compares a solve with up to three others)."""
    curves = sol.__dict__.get("_observed")
    if curves is None:
        curves = sol.__dict__["_observed"] = torch.stack([sol.risk, sol.type_curves()[1].sum(-1)])
    return curves



def solve_on_grid(dynamics: MeanFieldDynamics, t_out: Tensor, n_cells: int, step_tol: float, *, half_width: float = 20.0,
                  t0: float = 1e-4, blowup_factor: float = 1e4, tail_limit: float = 0.05, dim: int | None = None,
                  max_steps: int = 200_000, schedule: list[float] | None = None,
                  budget: Budget | None = None, on_step=None, scheme: str = "mprk22",
                  stiff_limit: tuple[float, int, float] | None = None) -> FokkerPlanckSolution:
    """One solve of E6 on a fixed number of cells (see :func:`solve_fokker_planck`).

    ``schedule``: the time steps of an earlier solve (its :attr:`FokkerPlanckSolution.schedule`) to replay
    without error control (see :func:`_integrate_mprk22`).  ``budget``: charged one unit per operator
    evaluation (:class:`Budget`).  ``on_step(t)``: called after every accepted step (progress).  ``scheme``: the
    step, one of :data:`SCHEMES` (:func:`_integrate_mprk22`); ``stiff_limit = (kh, steps, rejected)``: raise
    :class:`StiffSolve` at an accepted MPRK22 step with some type's ``k h`` above ``kh`` once there have been ``steps``
    such steps and the solve has rejected at least the share ``rejected`` of its attempts (a solve whose steps a stiff
    type sets, see there; not in a replay of ``schedule``, whose steps the controller did not choose).
    """
    (sol,) = solve_batch_on_grid(dynamics, t_out, n_cells, step_tol, half_width=half_width, t0=t0,
                                 blowup_factor=blowup_factor, tail_limit=tail_limit, dim=dim, max_steps=max_steps,
                                 schedule=schedule, budget=budget, on_step=on_step, scheme=scheme,
                                 stiff_limit=stiff_limit)
    return sol


def solve_batch_on_grid(dynamics: MeanFieldDynamics, t_out: Tensor, n_cells: int, step_tol: float, *,
                        half_width: float = 20.0, t0: float = 1e-4, blowup_factor: float = 1e4, tail_limit: float = 0.05,
                        dim: int | None = None, max_steps: int = 200_000, schedule: list[float] | None = None,
                        budget: Budget | None = None, on_step=None, scheme: str = "mprk22",
                        stiff_limit: tuple[float, int, float] | None = None) -> list[FokkerPlanckSolution]:
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
    grid = _Grid(dynamics, n_cells, half_width, step_limit, check_choice("scheme", scheme, SCHEMES))
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
    n_before = t_out.numel() - later.numel()
    # the trajectory (mass, m, s, int R, per-type curves) at every output time, each (n, G, ...): times <= t0 take the
    # exact (delta) initial law, the integrator writes the later ones in place (ordinary tensors: made outside
    # inference mode; one copy of each output state, where a list stacked and padded per member made three)
    shapes = [z.shape for z in state0] + [(groups, 2, n_types)]
    traj = tuple(torch.empty(t_out.numel(), *shape, dtype=dtype, device=dev) for shape in shapes)
    traj[0][:n_before] = g0
    traj[1][:n_before] = x0[:, 0]
    traj[2][:n_before] = 1e-12
    traj[3][:n_before] = 0.0
    nfe, tail_divs, taken = 0, [None] * groups, []
    if later.numel():
        with torch.inference_mode():  # no autograd bookkeeping per operation: a third of a small step's cost
            nfe, tail_divs, taken = _integrate_mprk22(grid, state0, t0, later, step_tol, threshold, max_steps,
                                                      tail_limit, tuple(z[n_before:] for z in traj), schedule,
                                                      budget or Budget(), on_step, stiff_limit)
    sols = []
    for g in range(groups):
        # a member's own contiguous tensors (views of the trajectory when there is one member)
        mass, m, s, integral, curves = (z[:, g] if groups == 1 else z[:, g].contiguous() for z in traj)
        member = dynamics.member(g) if dynamics.groups is not None else dynamics
        if n_before:  # the initial law's curves
            head = FokkerPlanckSolution(t_out[:n_before], grid.xi, grid.h, mass[:n_before], m[:n_before], s[:n_before],
                                        integral[:n_before], torch.empty(0), member, None, 0, 0.0)
            curves[:n_before] = head.type_curves().transpose(0, 1)
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
                      tail_limit: float, out: tuple[Tensor, ...], schedule: list[float] | None = None,
                      budget: Budget | None = None, on_step=None,
                      stiff_limit: tuple[float, int, float] | None = None):
    """Adaptive MPRK22 (modified Patankar-Runge-Kutta, Kopecz & Meister 2018, alpha = 1).

    For the linear conservative system ``y' = A(t) y`` (``A`` Metzler with zero column sums)
    the two stages are backward-Euler-like solves with M-matrices:
      stage 1: ``(I - dt A_n) y1 = y_n``;
      stage 2: ``(I - dt/2 (A_n diag(y_n / y1) + A_1)) y_{n+1} = y_n``,
    so ``y_{n+1} > 0`` and ``sum y_{n+1} = sum y_n`` for every ``dt`` (positive and
    conservative by construction), second order.  The grid moves with one velocity over the step
    (:meth:`_Grid.plan`), used by both stages, so ``y1`` and ``y_{n+1}`` live on the same grid and their
    difference is the local error of the law; ``int R`` uses Heun's method with the same stages.

    **The stiff limit, and the midpoint rule** (``grid.scheme == "midpoint"``).  For a type relaxing much faster than
    the step (its confinement rate ``k = -Cov(x, a) / Var(x)`` of :meth:`_Grid.plan` with ``k h >> 1``) stage 1 lands
    on the equilibrium and stage 2 returns ``eq / (1 + eps / 2)`` from ``y_n = eq (1 + eps)``: MPRK22 multiplies the
    deviation by about ``-1/2`` per step however short the step, its error estimate stays near ``1.5 eps``, and the
    step control, unable to reduce it, sets the whole solve's steps by that one type (docs/benchmarks.md, the
    twenty-seventh session: the power-law setting at 0.4x the critical lr, 28 % of attempts rejected by one
    coordinate's type).  The modified Patankar midpoint rule with backward-Euler weights removes that factor:
      ``y_half = (I - dt/2 A_n)^-1 y_n`` (the stage at ``t + dt/2``, on the grid there);
      ``y1 = (I - dt A_n)^-1 y_n`` (as above: the weights' denominator and the embedded solution);
      ``y_{n+1} = (I - dt A_half diag(y_half / y1))^-1 y_n``, ``int R`` by the midpoint rule;
    positive and conservative for every ``dt`` (M-matrix solves, zero column sums), second order
    (``y_{n+1} / y1 = 1 + O(dt^2)``), and with ``y_half, y1 -> eq`` in the stiff limit the deviation is damped (on a
    two-state generator: amplification 0.022 at ``k h = 10`` against MPRK22's -0.322, the exact 4.5e-5).  Where
    nothing is stiff its error constant is larger (7 % on THEORY §6 at 0.8x the critical lr), so it is the step of
    solves that need it: ``stiff_limit = (kh, steps, rejected)`` makes an MPRK22 solve raise :class:`StiffSolve` at
    an accepted step with some ``k h`` above ``kh`` once ``steps`` such steps were taken and the share ``rejected`` of
    its attempts was rejected (a stiff type that stays at its equilibrium costs MPRK22 nothing), and :class:`~sde_optim.theory.solvers.PDESolver` then solves every solve of the
    prediction again with the midpoint rule (one scheme for all the solves that its checks compare).

    The step is accepted when, for every member of the batch, the weighted total variation
    ``sum_tau pi_tau |y1 - y_{n+1}|_1``, the change of ``R`` and ``C`` it implies and the relative error of
    ``int R`` are below ``step_tol`` (and no single type's law moved by more than ``_MAX_TYPE_TV`` in total
    variation).  State shapes: mass ``(G, T, N)``, ``m, s`` ``(G, T)``, ``int R`` ``(G,)``.

    A member that diverges (``R`` past ``threshold``, the tail or step limit, or no step resolving it) is frozen
    and leaves the batch; the rest go on.  ``schedule``: replay these step sizes instead (no error control): two
    solves on the same steps have the same time-discretization error to first order, so their difference
    isolates what else differs (the types).  Writes the trajectory into ``out``, ``(mass, m, s, int R, curves)``
    each ``(n, G, ...)`` over the ``n`` output times ``times``; returns the operator evaluations, each member's
    tail-divergence time (or None) and the steps taken.  The curves are the per-type R and C (:class:`_Statistics`'s
    ``per_type``, ``(G, 2, T)``).  Runs under ``torch.inference_mode`` (:func:`solve_batch_on_grid`): ``out`` is
    made outside it, so the caller's trajectory is made of ordinary tensors.
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
    written = 0  # output times of `out` written so far
    nfe = 0
    steps = 0
    mark = (t0, 0)  # (t, steps) at the last crawl check
    stiff_steps = 0  # accepted steps with some k h above stiff_limit[0]
    rejected = 0  # attempts the step control rejected
    # the stiff limit's watch (a replayed step is not the controller's: the last step of a replay into a blow-up has
    # k h ~ 1e7)
    watch = stiff_limit is not None and replay is None and grid.scheme == "mprk22"
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
                    rejected += 1
                    continue
                t += h
                taken.append(h)
                if on_step is not None:
                    on_step(t)
                mass, m, s, integral, st0 = y2, m1, s1, i2, st2
                nfe += 1
                read = [st0.risk, st0.tail_share, st0.unstable] + ([grid.stiffness] if watch else [])
                risk, tail, unstable, *stiff = torch.stack(read).tolist()  # one host read
                if watch and max(stiff[0]) > stiff_limit[0]:
                    stiff_steps += 1
                    if stiff_steps >= stiff_limit[1] and rejected >= stiff_limit[2] * steps:
                        raise StiffSolve(max(stiff[0]), t, rejected / steps)
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
                while written < len(wanted) and (wanted[written] <= t_target * (1 + 1e-13) or not alive):
                    for buf, z in zip(out, frozen):  # a diverged member: its frozen state (R > threshold)
                        buf[written] = z
                    written += 1
            if written == len(wanted):
                break
    finally:
        grid.dyn = dyn_all
    return nfe, tail_div, taken


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
