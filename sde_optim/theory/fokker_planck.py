"""Finite-volume solver of the mean-field Fokker-Planck system E6 (with E4 for ``q``).

Per type ``tau`` the density ``p_tau(t, x)`` of the well-posed coordinate ``x`` (``phi`` of
E5, or ``psi = log|beta|`` for balanced types, THEORY §3) solves

    d/dt p = -d/dx [ a_tau(x, t) p ] + D_tau(t) d^2/dx^2 p,        p(0) = delta(x0)
    a = -2 gamma lam (beta - beta*)                          (phi, E5/E6)
    a = -2 gamma lam (beta - beta*) sgn(beta) - 2 gamma^2 lam R/B   (psi, THEORY §3 end)
    D = 4 gamma^2 lam R(t) / B,   q_tau(t) = q0 exp(-2 gamma^2 lam I(t) / B),  I' = R  (E4)
    R(t) = sigma^2/2 + sum_tau pi_tau int lam (beta - beta*)^2 / 2 p_tau dx

Numerics (see THEORY §4, "A measured warning about grids"):

* **Co-moving grid per type.** ``x = m_tau(t) + s_tau(t) xi`` on a fixed uniform grid
  ``xi in [-L, L]`` with ``N`` cells; ``m`` and ``s`` follow the type's mean and standard
  deviation through their exact moment equations ``m' = E[a]``,
  ``(s^2)' = 2 Cov(x, a) + 2 D`` plus a weak relaxation onto the discrete moments.  In
  ``xi`` the equation is the same Fokker-Planck equation with drift
  ``(a - m' - s' xi)/s`` and diffusion ``D/s^2`` (an ALE change of variables, exact for any
  grid motion), so a support type whose density collapses like ``sqrt(R)`` keeps the same
  number of cells across it and no remapping diffusion is introduced.
* **Scharfetter-Gummel flux** (exponential fitting) on every face: exact for constant
  coefficients in both the diffusive and the advective limit; the semi-discrete operator
  has non-negative off-diagonals and zero-flux ends, so mass is conserved to round-off and
  positivity is preserved by the exact semi-discrete flow.
* **Delta start.** The solve starts at ``t0`` (default ``1e-4``) from the analytic
  short-time solution, a Gaussian of mean ``x0 + a(x0) t0`` and variance ``2 D(0) t0``
  (cell averages through the normal CDF).
* **Time integration: an implicit scheme, chosen by measurement.**  The method of lines
  through :func:`torchdiffeq.odeint` (dopri5, rtol 1e-6) was tried first
  (``integrator="torchdiffeq"``).  On THEORY §6 (3 types, horizon ``t = 20``) it needed
  1664 / 4766 / 16220 right-hand-side evaluations and 2.8 / 10.9 / 32 s (2 shared cores) for
  ``N = 48 / 96 / 192`` cells: the count grows like ``N^2``, the signature of diffusive
  stiffness (``D/s^2 h^2``), so it cannot meet a 2 s budget at the accuracy needed.  The
  default is therefore MPRK22 (modified Patankar-Runge-Kutta, second order, linearly
  implicit: two tridiagonal M-matrix solves per step, so positivity and mass conservation
  hold for every step size), with adaptive steps; on the same problem it needs about 740
  operator evaluations for any ``N`` (about 1 s).  torchdiffeq is kept for the ODE parts
  (:mod:`.odes`).
* **Quadrature.** Observables and ``R`` use fourth-order weights from the cell masses
  (:func:`quadrature_weights`, a Sheppard-type correction of the midpoint rule).
  Measured spatial error (THEORY §6, ``sigma = 0``, ``t <= 20``, vs ``N = 384``):
  1.2e-2 / 5.7e-3 / 2.0e-3 / 1.4e-3 at ``N = 48 / 64 / 96 / 128``; with the plain midpoint
  rule the late-time risk was 0.9 % off at ``N = 64``.  A uniform grid over the whole phi
  range is not used at all (THEORY §4's warning): the co-moving grid keeps ``N / 2L`` cells per standard
  deviation of every type at every time; ``N`` is chosen by the a posteriori error check of
  :func:`solve_fokker_planck` (5 to 10 per standard deviation on easy problems at ``tol = 1e-3``,
  about 80 near the critical step).
* **Divergence.** When ``R`` exceeds ``blowup_factor * R(0)`` the integration stops (the
  torchdiffeq path freezes its right-hand side instead) and the state is held;
  :attr:`FokkerPlanckSolution.diverged_at` is the first output time past the threshold.

All tensors are float64 by default and live on the types' device.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor
from torchdiffeq import odeint

from .._validation import check_float, check_int
from ..observables import OBSERVABLES, CoordinateState
from .coords import phi_to_state, psi_to_state
from .statistics import risk_of
from .types import KIND_FROZEN, KIND_PHI, KIND_PSI, CoordinateTypes

_RISK, _CURVATURE = OBSERVABLES["risk"], OBSERVABLES["curvature"]

__all__ = ["FokkerPlanckSolution", "solve_fokker_planck", "cells_for_tolerance", "MeanFieldDynamics"]


def cells_for_tolerance(tol: float, half_width: float) -> int:
    """Number of cells for a target relative accuracy ``tol`` of the observables.

    The scheme is second order in ``h = 2L/N`` (in units of the type's standard deviation).
    Measured on THEORY §6 (``sigma = 0``, ``gamma = 0.5``, ``t <= 20``) against ``N = 384``:
    largest relative risk/curvature error 1.15e-2, 5.7e-3, 2.0e-3, 1.4e-3 at ``N = 48, 64, 96,
    128`` (``L = 9``), i.e. about ``0.08 h^2``; with ``sigma = 0.3, B = 4, gamma = 2`` about
    ``0.015 h^2``.  So ``h = sqrt(tol / 0.1)``.  Clamped to ``[32, 1024]``.
    """
    h = math.sqrt(tol / 0.1)
    return int(min(1024, max(32, math.ceil(2 * half_width / h))))


class MeanFieldDynamics:
    """Shared coefficients of E4-E6 for a set of types (used by the PDE and the particles).

    Args:
        types: the coordinate types; gamma: ``(u, v)`` step; batch_size: ``B``;
        noise_std: label noise ``sigma``; noise_scale: factor on the gradient noise
        (1 = SGD, 0 = gradient flow).
    """

    def __init__(self, types: CoordinateTypes, gamma: float, batch_size: int, noise_std: float,
                 noise_scale: float = 1.0, param_scale: float = 1.0) -> None:
        self.types = types
        self.gamma = gamma
        self.batch_size = batch_size
        self.noise_std = noise_std
        self.noise_scale = noise_scale
        self.param_scale = param_scale
        col = lambda t: t[:, None]  # noqa: E731  (T,) -> (T, 1)
        self.lam = col(types.lam)
        self.bstar = col(types.beta_star)
        self.q0 = col(types.q0)
        self.sign = col(types.sign)
        self.is_phi = col(types.kind == KIND_PHI)
        self.is_psi = col(types.kind == KIND_PSI)
        self.active = col((types.kind != KIND_FROZEN).to(types.lam.dtype))
        self.weight = col(types.weight)
        self.noise_var = noise_scale**2 * gamma**2 / batch_size  # gamma^2/B (times noise scale^2)
        kinds = set(types.kind.tolist())
        self.only = kinds.pop() if len(kinds) == 1 else None  # the single kind of all types, if so (fast paths)

    def q(self, integral_r: Tensor) -> Tensor:
        """``q_tau(t) = q0 exp(-2 gamma^2 lam I / B)`` (E4), shape ``(T, 1)``."""
        return self.q0 * torch.exp(-2.0 * self.noise_var * self.lam * integral_r)

    def state(self, x: Tensor, q: Tensor) -> CoordinateState:
        """CoordinateState at coordinates ``x`` (shape ``(T, K)``) given ``q`` (``(T, 1)``)."""
        if self.only == KIND_PHI:
            beta, rho = phi_to_state(q, x)
            return CoordinateState(self.lam, self.bstar, beta, rho, q.expand_as(x), self.param_scale)
        beta_phi, rho_phi = phi_to_state(q, torch.where(self.is_phi, x, torch.zeros_like(x)))
        beta_psi, rho_psi = psi_to_state(self.sign, torch.where(self.is_psi, x, torch.zeros_like(x)))
        zero = torch.zeros_like(x)
        beta = torch.where(self.is_phi, beta_phi, torch.where(self.is_psi, beta_psi, zero))
        rho = torch.where(self.is_phi, rho_phi, torch.where(self.is_psi, rho_psi, zero))
        return CoordinateState(self.lam, self.bstar, beta, rho, q.expand_as(x), self.param_scale)

    def drift(self, beta: Tensor, risk: Tensor) -> Tensor:
        """Drift ``a_tau`` of E5 (phi) or of the psi equation (THEORY §3 end), shape of ``beta``."""
        g = self.gamma
        base = -2.0 * g * self.lam * (beta - self.bstar)
        if self.only == KIND_PHI:
            return base
        psi_extra = base * self.sign - 2.0 * self.noise_var * self.lam * risk
        return torch.where(self.is_phi, base, torch.where(self.is_psi, psi_extra, torch.zeros_like(base)))

    def diffusion(self, risk: Tensor) -> Tensor:
        """``D_tau = 4 gamma^2 lam R / B`` (E6), shape ``(T, 1)``; zero for frozen types."""
        return 4.0 * self.noise_var * self.lam * risk * self.active

    def risk(self, c: CoordinateState, weight: Tensor) -> Tensor:
        return risk_of(c, weight, self.noise_std)


def _bernoulli(z: Tensor) -> Tensor:
    """``B(z) = z / (e^z - 1)`` with ``B(0) = 1``, stable for all ``z``."""
    small = z.abs() < 1e-6
    zs = torch.where(small, torch.ones_like(z), z)
    return torch.where(small, 1.0 - 0.5 * z, zs / torch.expm1(zs))


@dataclass
class FokkerPlanckSolution:
    """Solution of E6 on the co-moving grids at the output times.

    Attributes:
        t: output times, shape ``(n,)``.
        xi: cell centres of the reference grid, shape ``(N,)``; ``h`` its spacing.
        mass: cell masses ``p dx`` per type, shape ``(n, T, N)`` (each type sums to 1).
        center, scale: ``m_tau(t)``, ``s_tau(t)``, shape ``(n, T)``.
        integral_r: ``int_0^t R``, shape ``(n,)``.
        risk: ``R(t)``, shape ``(n,)``.
        diverged_at: first output time with ``R > blowup_factor R(0)`` (or non-finite), else None.
        nfe: right-hand-side evaluations; tail_mass: largest mass in an end cell over the run.
        error_estimate: a posteriori relative error of ``R`` and ``C`` (``None`` without refinement).
        levels: number of grids solved beyond the first (coarse) one.
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

    def points(self) -> tuple[CoordinateState, Tensor]:
        """CoordinateState at all cell centres, fields ``(n, T, N)``, and quadrature weights ``pi * w(mass)``.

        ``w`` are the fourth-order weights of :func:`quadrature_weights`.
        """
        dyn = self.dynamics
        x = self.center[..., None] + self.scale[..., None] * self.xi
        q = torch.stack([dyn.q(i) for i in self.integral_r])  # (n, T, 1)
        states = [dyn.state(x[k], q[k]) for k in range(x.shape[0])]
        stack = lambda name: torch.stack([getattr(s, name).expand_as(x[0]) for s in states])  # noqa: E731
        c = CoordinateState(dyn.lam, dyn.bstar, stack("beta"), stack("rho"), stack("q"), dyn.param_scale)
        return c, quadrature_weights(self.mass) * dyn.weight


def tridiagonal_solve(lower: Tensor, diag: Tensor, upper: Tensor, rhs: Tensor) -> Tensor:
    """Batched tridiagonal solve; rows ``j``: ``lower[j] y[j-1] + diag[j] y[j] + upper[j] y[j+1] = rhs[j]``.

    All arguments ``(T, N)`` (``lower[:, 0]``, ``upper[:, -1]`` ignored).  On CPU: one LAPACK
    ``gtsv`` call on the block-diagonal system of size ``T N``; elsewhere a dense batched solve.
    """
    if diag.device.type == "cpu" and diag.dtype in (torch.float64, torch.float32):
        from scipy.linalg import lapack  # local import: only the CPU path needs it

        # The batch as one block-diagonal system of size T*N (no coupling across rows): one LAPACK call.
        gtsv = lapack.dgtsv if diag.dtype == torch.float64 else lapack.sgtsv
        lo, up = lower.clone(), upper.clone()
        lo[:, 0] = 0.0
        up[:, -1] = 0.0
        res = gtsv(lo.reshape(-1)[1:].numpy(), diag.reshape(-1).numpy(), up.reshape(-1)[:-1].numpy(),
                   rhs.reshape(-1).numpy())
        if res[-1] != 0:
            raise RuntimeError(f"tridiagonal solve failed (LAPACK info={res[-1]})")
        return torch.from_numpy(res[3]).reshape(rhs.shape)
    a = torch.diag_embed(diag) + torch.diag_embed(upper[:, :-1], 1) + torch.diag_embed(lower[:, 1:], -1)
    return torch.linalg.solve(a, rhs.unsqueeze(-1)).squeeze(-1)


def quadrature_weights(mass: Tensor) -> Tensor:
    """Fourth-order quadrature weights from cell masses: ``w = m - (m[j+1] - 2 m[j] + m[j-1]) / 24``.

    Cell masses placed at the centres overestimate ``int p g`` by ``(h^2/24) E[g'']`` (the
    midpoint/Sheppard bias: ``+h^2/12`` on a variance).  Summing by parts, subtracting
    ``h^2/24 g''`` at the centres equals using these weights (zero ghost cells).  They sum to
    the total mass up to the end cells' content.  Measured on THEORY §6: the late-time risk
    error at ``N = 64`` fell from 0.9 % (plain masses) to the values in the module docstring.
    """
    padded = torch.nn.functional.pad(mass, (1, 1))
    return mass - (padded[..., 2:] - 2.0 * mass + padded[..., :-2]) / 24.0


def _gaussian_cells(xi_faces: Tensor) -> Tensor:
    cdf = 0.5 * torch.erfc(-xi_faces / math.sqrt(2.0))
    mass = cdf[1:] - cdf[:-1]
    return mass / mass.sum()


@dataclass
class _Operator:
    """Tridiagonal generator ``d mass/dt = A mass`` at one state, with the grid/ODE rates.

    ``diag``, ``upper`` (coefficient of ``mass[j+1]`` in row ``j``), ``lower`` (of ``mass[j-1]``),
    each ``(T, N)`` (unused ends zero); ``dm``, ``ds`` ``(T,)``; ``risk`` 0-d.
    """

    diag: Tensor
    upper: Tensor
    lower: Tensor
    dm: Tensor
    ds: Tensor
    risk: Tensor
    tail_share: Tensor  # share of the excess risk carried by the two outermost cells on each side
    unstable: Tensor  # expected number of coordinates with lam rho > rho_limit (0 when no limit)
    observed: Tensor  # (2, T, N): pi lam r^2 / 2 and pi lam rho per cell (the risk and curvature densities, E7)
    observed_total: Tensor  # (2,): R (with sigma^2 / 2) and the curvature C

    def observable_error(self, dmass: Tensor) -> float:
        """Largest relative change of ``R`` or ``C`` that a mass change ``dmass`` ``(T, N)`` can cause (weighted L1)."""
        num = (dmass.abs() * self.observed).sum(dim=(-2, -1))
        return float((num / self.observed_total.clamp_min(1e-300)).max())

    def apply(self, mass: Tensor) -> Tensor:
        out = self.diag * mass
        out[:, :-1] += self.upper[:, :-1] * mass[:, 1:]
        out[:, 1:] += self.lower[:, 1:] * mass[:, :-1]
        return out

    def implicit_solve(self, h: float, rhs: Tensor, col_scale: Tensor | None = None, other: "_Operator | None" = None) -> Tensor:
        """Solve ``(I - h M) y = rhs`` with ``M = A diag(col_scale)`` (+ ``other``'s ``A``, same grid).

        A column scaling keeps ``M`` tridiagonal: entry ``(j, k)`` is multiplied by ``col_scale[k]``.
        """
        cs = col_scale if col_scale is not None else torch.ones_like(self.diag)
        dg = self.diag * cs
        up = torch.zeros_like(dg)
        lo = torch.zeros_like(dg)
        up[:, :-1] = self.upper[:, :-1] * cs[:, 1:]
        lo[:, 1:] = self.lower[:, 1:] * cs[:, :-1]
        if other is not None:
            dg, up, lo = dg + other.diag, up + other.upper, lo + other.lower
        return tridiagonal_solve(-h * lo, 1.0 - h * dg, -h * up, rhs)


class _Grid:
    """Reference grid ``xi`` and the assembly of the SG operator (E6 in co-moving coordinates)."""

    def __init__(self, dynamics: MeanFieldDynamics, n_cells: int, half_width: float, relax: float,
                 step_limit: tuple[float, int] | None = None) -> None:
        dtype, dev = dynamics.lam.dtype, dynamics.lam.device
        self.dyn = dynamics
        self.h = 2.0 * half_width / n_cells
        self.faces = torch.linspace(-half_width, half_width, n_cells + 1, dtype=dtype, device=dev)
        self.xi = 0.5 * (self.faces[1:] + self.faces[:-1])
        self.inner = self.faces[1:-1]
        self.points = torch.cat([self.xi, self.inner])
        self.relax = relax
        self.step_limit = step_limit

    def operator(self, mass: Tensor, m: Tensor, s: Tensor, integral: Tensor) -> _Operator:
        dyn, xi, h, n = self.dyn, self.xi, self.h, self.xi.numel()
        q = dyn.q(integral)
        both = dyn.state(m[:, None] + s[:, None] * self.points, q)  # cell centres, then interior faces
        c = CoordinateState(dyn.lam, dyn.bstar, both.beta[:, :n], both.rho[:, :n], both.q[:, :n], dyn.param_scale)
        qw = quadrature_weights(mass)
        # E7 densities from the registry (the same definitions as the measurement), times pi_tau
        observed = torch.stack([_RISK.density(c), _CURVATURE.density(c)]) * dyn.weight
        totals = (observed * qw).sum(dim=(-2, -1))
        risk = totals[0] + _RISK.offset(dyn.noise_std)
        totals = torch.stack([risk, totals[1]])
        dens = observed[0] * mass
        tail_share = (dens[:, :2].sum() + dens[:, -2:].sum()) / dens.sum().clamp_min(1e-300)
        if self.step_limit is not None:
            limit, dim = self.step_limit
            unstable = dim * ((c.lam * c.rho > limit).to(mass.dtype) * mass * dyn.weight).sum()
        else:
            unstable = torch.zeros((), dtype=mass.dtype, device=mass.device)
        a = dyn.drift(both.beta, risk)  # (T, 2N - 1)
        a_c, a_f = a[:, :n], a[:, n:]
        diff = dyn.diffusion(risk)[:, 0]
        e_xi, e_xi2, e_a, e_xia = (qw * torch.stack([xi.expand_as(a_c), (xi * xi).expand_as(a_c), a_c, xi * a_c])).sum(-1)
        var_xi = e_xi2 - e_xi**2
        cov_xi_a = e_xia - e_xi * e_a
        # Moment equations m' = E[a], (s^2)' = 2 Cov(x, a) + 2D, relaxed onto the discrete moments.
        dm = e_a + self.relax * s * e_xi
        ds = cov_xi_a + diff / s + self.relax * s * (torch.sqrt(torch.clamp(var_xi, min=0.0)) - 1.0)
        vel = (a_f - dm[:, None] - ds[:, None] * self.inner) / s[:, None]  # drift in xi at interior faces
        dxi = torch.clamp(diff / (s * s), min=1e-300)[:, None]  # diffusion in xi
        pe = vel * h / dxi
        # flux J_{j+1/2} = cp_j mass_j - cm_j mass_{j+1}, cp = coef B(-pe), cm = coef B(pe); one Bernoulli
        # evaluation through B(-|z|) = B(|z|) + |z| (a sum of non-negative terms: no cancellation)
        coef = dxi / (h * h)
        small = _bernoulli(pe.abs())
        large = small + pe.abs()
        ahead = pe >= 0
        cp = coef * torch.where(ahead, large, small)
        cm = coef * torch.where(ahead, small, large)
        pad = torch.nn.functional.pad
        upper, lower = pad(cm, (0, 1)), pad(cp, (1, 0))
        diag = -(pad(cp, (0, 1)) + pad(cm, (1, 0)))
        return _Operator(diag, upper, lower, dm, ds, risk, tail_share, unstable, observed, totals)


def solve_fokker_planck(
    dynamics: MeanFieldDynamics,
    t_out: Tensor,
    *,
    num_cells: int | None = None,
    tol: float = 1e-3,
    half_width: float = 12.0,
    t0: float = 1e-4,
    integrator: str = "mprk22",
    rtol: float = 1e-6,
    atol: float = 1e-9,
    step_tol: float | None = None,
    relax: float = 1.0,
    blowup_factor: float = 1e4,
    tail_limit: float = 0.05,
    dim: int | None = None,
    max_steps: int = 200_000,
    refine: bool = True,
    max_cells: int = 4096,
    max_evaluations: int = 40_000,
    estimate_floor: float = 1e-3,
) -> FokkerPlanckSolution:
    """Solve E6 (with E4) at the increasing times ``t_out`` (shape ``(n,)``, ``t_out >= 0``).

    **Resolution from the tolerance, checked a posteriori.**  Unless ``num_cells`` is given,
    the system is solved twice, on ``N/2`` cells with local step tolerance ``4 s`` and on ``N``
    cells with ``s``, starting from ``N = cells_for_tolerance(tol) / 2`` and ``s = 4 step_tol``
    (one level below the a priori map, which the check makes safe); the relative difference of ``R``
    and ``C`` between the two, divided by 3 (Richardson: both errors are second order, and the
    finer solve has half the cell width and half the step), is the error estimate of the finer
    solve.  While it exceeds ``tol`` the cells are doubled and ``step_tol`` divided by 4 (up to
    ``max_cells``, with a warning if that is not enough).  The spatial error
    constant is problem dependent: measured against a 4096-cell solve it is about ``0.08 h^2``
    (``h`` = cell width in standard deviations) on THEORY §6 at ``gamma = 0.5`` but ``10 h^2``
    at ``gamma = 8`` (0.8x the decay-critical step), where the noise feeds back on ``R``
    and a wide, wall-bounded off-support law needs fine cells; no fixed ``tol -> N`` map
    serves both.  Likewise the time-step error of a local tolerance ``3e-3`` is 1e-4 relative
    on the first and 1 % on the second (at ``t = 1.5``, the collapse of the support laws).

    Args:
        num_cells: cells per type ``N``; if given, one solve on that grid (no refinement).
        tol: target relative accuracy of ``R`` and ``C`` (sets the first ``N``, the refinement
            test and, unless given, ``step_tol``).
        half_width: grid half-width ``L`` in units of the type's standard deviation.
        t0: start time of the analytic Gaussian short-time solution.
        integrator: ``"mprk22"`` (default; linearly implicit, unconditionally positive and
            conservative, second order, adaptive) or ``"torchdiffeq"`` (method of lines with
            ``odeint(method="dopri5", rtol, atol)``; kept for the stiffness measurement).
        step_tol: local error tolerance of the adaptive implicit steps (total-variation
            distance per step); default ``tol``.
        relax: rate (per unit ``t``) pulling the grid onto the discrete mean and spread.
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
        max_cells: largest ``N`` the refinement may reach.
        max_evaluations: operator-evaluation budget of the refinement (each level costs about twice
            the previous one; the next level is skipped, with a warning, if it would exceed it).
        estimate_floor: the error estimate covers output times with ``R >= estimate_floor * R(0)``
            before any divergence (relative errors of a vanishing risk are not meaningful).
    """
    if integrator not in ("mprk22", "torchdiffeq"):
        raise ValueError(f"integrator must be 'mprk22' or 'torchdiffeq'; got {integrator!r}")
    types = dynamics.types
    dtype, dev = types.lam.dtype, types.lam.device
    t_out = torch.as_tensor(t_out, dtype=dtype, device=dev)
    if t_out.ndim != 1 or t_out.numel() < 1 or bool((t_out[1:] <= t_out[:-1]).any()) or float(t_out[0]) < 0:
        raise ValueError("t_out must be a 1-d increasing tensor of times >= 0")
    tol = check_float("tol", tol, minimum=0.0, strict=True)
    half_width = check_float("half_width", half_width, minimum=2.0)
    max_cells = check_int("max_cells", max_cells, minimum=16)
    max_evaluations = check_int("max_evaluations", max_evaluations, minimum=1)
    t0 = check_float("t0", t0, minimum=0.0, strict=True)
    st = step_tol if step_tol is not None else tol
    opts = dict(half_width=half_width, t0=t0, integrator=integrator, rtol=rtol, atol=atol, relax=relax,
                blowup_factor=blowup_factor, tail_limit=tail_limit, dim=dim, max_steps=max_steps)
    if num_cells is not None:
        return _solve_on_grid(dynamics, t_out, check_int("num_cells", num_cells, minimum=8), st, **opts)
    n_cells = min(cells_for_tolerance(tol, half_width), max_cells)
    if not refine:
        return _solve_on_grid(dynamics, t_out, n_cells, st, **opts)
    # Both errors are second order in (h, dt), and the step control keeps the embedded first-order error
    # per step ~ dt^2 near step_tol (measured: nfe x3.5 for step_tol / 10): each level doubles the cells and
    # divides step_tol by 4 (halving dt), so the error falls ~4x per level (Richardson's 3 below).
    # The check makes the answer safe, so the first pair starts one level below the a priori map
    # (cells_for_tolerance is calibrated on an easy problem; most problems then stop at the first pair).
    n_prior = n_cells
    n_cells, st = max(16, n_cells // 2), 4.0 * st
    coarse = _solve_on_grid(dynamics, t_out, max(8, n_cells // 2), 4.0 * st, **opts)
    fine = _solve_on_grid(dynamics, t_out, n_cells, st, **opts)
    levels, spent = 1, coarse.nfe + fine.nfe
    while True:
        estimate = _richardson_estimate(fine, coarse, estimate_floor)
        # A predicted divergence is believed only from the a priori resolution on (a grid far too coarse
        # can blow up spuriously, and two such grids may agree).
        unconfirmed = fine.diverged_at is not None and n_cells < n_prior
        if (estimate <= tol and not unconfirmed) or 2 * n_cells > max_cells or spent + 2 * fine.nfe > max_evaluations:
            break
        n_cells, st = 2 * n_cells, st / 4.0
        coarse, fine = fine, _solve_on_grid(dynamics, t_out, n_cells, st, **opts)
        levels, spent = levels + 1, spent + fine.nfe
    if estimate > tol:
        warnings.warn(f"Fokker-Planck solve: estimated relative error {estimate:.2g} exceeds tol={tol:g} with "
                      f"{n_cells} cells and {spent} operator evaluations (max_cells={max_cells}, "
                      f"max_evaluations={max_evaluations}); raise them or relax tol", RuntimeWarning, stacklevel=2)
    fine.error_estimate = estimate
    fine.levels = levels
    return fine


def _observed_curves(sol: "FokkerPlanckSolution") -> Tensor:
    """``(2, n)``: ``R`` and ``C`` (E7) at the output times."""
    c, w = sol.points()
    return torch.stack([sol.risk, (_CURVATURE.density(c) * w).sum(dim=(-2, -1))])


def _richardson_estimate(fine: "FokkerPlanckSolution", coarse: "FokkerPlanckSolution", floor: float) -> float:
    """Estimated relative error of ``fine``: ``max |fine - coarse| / (3 |fine|)`` over R and C (second order).

    Taken over output times before the divergence, with ``R >= floor * R(0)``.  If only one of the two
    diverged, or they diverged at different output times, the divergence itself is unresolved: ``inf``.
    """
    if fine.diverged_at != coarse.diverged_at:  # one diverged, or both at different output times
        return math.inf
    a, b = _observed_curves(fine), _observed_curves(coarse)
    ok = torch.isfinite(a).all(0) & torch.isfinite(b).all(0) & (fine.risk >= floor * fine.risk[0])
    for div in (fine.diverged_at, coarse.diverged_at):
        if div is not None:
            ok &= fine.t < div
    if not bool(ok.any()):
        return 0.0
    rel = ((a - b).abs() / a.abs().clamp_min(1e-300))[:, ok]
    return float(rel.max()) / 3.0


def _solve_on_grid(dynamics: MeanFieldDynamics, t_out: Tensor, n_cells: int, step_tol: float, *, half_width: float,
                   t0: float, integrator: str, rtol: float, atol: float, relax: float, blowup_factor: float,
                   tail_limit: float, dim: int | None, max_steps: int) -> FokkerPlanckSolution:
    """One solve of E6 on a fixed number of cells (see :func:`solve_fokker_planck`)."""
    types = dynamics.types
    dtype, dev = types.lam.dtype, types.lam.device
    t_end = float(t_out[-1])
    if t_end > 0:
        t0 = min(t0, 0.5 * t_end)
    step_limit = (2.0 * dim / dynamics.gamma, dim) if dim is not None else None
    grid = _Grid(dynamics, n_cells, half_width, relax, step_limit)
    n_types = types.num_types

    # Delta initial condition -> analytic short-time Gaussian at t0 (THEORY §4).
    x0 = types.x0[:, None]
    c0 = dynamics.state(x0, dynamics.q0)
    r0 = dynamics.risk(c0, dynamics.weight)
    a0 = dynamics.drift(c0.beta, r0)
    d0 = dynamics.diffusion(r0)
    m0 = (x0 + a0 * t0)[:, 0]
    s0 = torch.sqrt(2.0 * d0 * t0)[:, 0]
    s0 = torch.where(s0 > 0, s0, torch.full_like(s0, 1e-8))
    g0 = _gaussian_cells(grid.faces).expand(n_types, n_cells).clone()
    threshold = blowup_factor * max(float(r0), 1e-300)
    state0 = (g0, m0, s0, (r0 * t0).reshape(()))
    later = t_out[t_out > t0]
    if later.numel():
        if integrator == "torchdiffeq":
            traj, nfe = _integrate_torchdiffeq(grid, state0, t0, later, rtol, atol, threshold)
            tail_div = None
        else:
            traj, nfe, tail_div = _integrate_mprk22(grid, state0, t0, later, step_tol, threshold, max_steps, tail_limit)
    else:
        traj, nfe, tail_div = tuple(z[:0] for z in (g0[None], m0[None], s0[None], r0.reshape(1))), 0, None
    mass, m, s, integral = traj
    n_before = t_out.numel() - later.numel()
    if n_before:  # times <= t0 take the exact (delta) initial law
        pad = lambda z, first: torch.cat([first.expand(n_before, *first.shape), z])  # noqa: E731
        mass = pad(mass, g0)
        m = pad(m, x0[:, 0])
        s = pad(s, torch.full_like(s0, 1e-12))
        integral = pad(integral, torch.zeros((), dtype=dtype, device=dev))
    sol = FokkerPlanckSolution(t_out, grid.xi, grid.h, mass, m, s, integral, torch.empty(0), dynamics, None, nfe,
                               float(torch.maximum(mass[..., 0], mass[..., -1]).max()))
    c, w = sol.points()
    risk = risk_of(c, w, dynamics.noise_std)
    sol.risk = risk
    bad = (~torch.isfinite(risk)) | (risk > threshold)
    if bool(bad.any()):
        sol.diverged_at = float(t_out[int(bad.nonzero()[0, 0])])
    if tail_div is not None and (sol.diverged_at is None or tail_div < sol.diverged_at):
        sol.diverged_at = tail_div
    return sol


def _integrate_torchdiffeq(grid: _Grid, state0, t0: float, times: Tensor, rtol: float, atol: float, threshold: float):
    """Method of lines with :func:`torchdiffeq.odeint` (explicit adaptive RK)."""
    nfe = [0]

    def rhs(t, y):
        nfe[0] += 1
        mass, m, s, integral = y
        op = grid.operator(mass, m, s, integral)
        if not bool(torch.isfinite(op.risk)) or float(op.risk) > threshold:
            return tuple(torch.zeros_like(z) for z in y)
        return op.apply(mass), op.dm, op.ds, op.risk.reshape(())

    ts = torch.cat([times.new_tensor([t0]), times])
    out = odeint(rhs, state0, ts, method="dopri5", rtol=rtol, atol=atol)
    return tuple(z[1:] for z in out), nfe[0]


def _integrate_mprk22(grid: _Grid, state0, t0: float, times: Tensor, step_tol: float, threshold: float, max_steps: int,
                      tail_limit: float):
    """Adaptive MPRK22 (modified Patankar-Runge-Kutta, Kopecz & Meister 2018, alpha = 1).

    For the linear conservative system ``y' = A(t) y`` (``A`` Metzler with zero column sums)
    the two stages are backward-Euler-like solves with M-matrices:
      stage 1: ``(I - dt A_n) y1 = y_n``;
      stage 2: ``(I - dt/2 (A_n diag(y_n / y1) + A_1)) y_{n+1} = y_n``,
    so ``y_{n+1} > 0`` and ``sum y_{n+1} = sum y_n`` for every ``dt`` (positive and
    conservative by construction), second order.  The scalar ODEs ``(m, s, int R)`` use
    Heun's method with the same stages; ``|y1 - y_{n+1}|`` (first vs second order) is the
    local error estimate driving the step size.
    """
    mass, m, s, integral = state0
    t = t0
    dt = t0
    outs: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    nfe = 0
    steps = 0
    diverged = False
    tail_div = None
    op = grid.operator(mass, m, s, integral)
    nfe += 1
    for t_target in times.tolist():
        while t < t_target * (1 - 1e-13) and not diverged:
            steps += 1
            if steps > max_steps:
                raise RuntimeError(f"Fokker-Planck solve exceeded max_steps={max_steps} at t={t:.4g}")
            h = min(dt, t_target - t)
            y1 = op.implicit_solve(h, mass).clamp_min(0.0)
            m1, s1, i1 = m + h * op.dm, s + h * op.ds, integral + h * op.risk
            stalled = h < 1e-9 * max(t, 1e-3)
            collapsed = bool((s1 <= 0).any())
            if collapsed and not stalled:
                dt = h / 4
                continue
            if not collapsed:
                op1 = grid.operator(y1, m1, s1, i1)
                nfe += 1
                ratio = torch.where(y1 > 0, mass / torch.where(y1 > 0, y1, torch.ones_like(y1)), torch.ones_like(y1))
                y2 = op.implicit_solve(0.5 * h, mass, col_scale=ratio, other=op1).clamp_min(0.0)
                m2 = m + 0.5 * h * (op.dm + op1.dm)
                s2 = s + 0.5 * h * (op.ds + op1.ds)
                i2 = integral + 0.5 * h * (op.risk + op1.risk)
                errs = (
                    float((y2 - y1).abs().sum(-1).max()),
                    op1.observable_error(y2 - y1),
                    float(((m2 - m1).abs() / s2).max()),
                    float(((s2 - s1).abs() / s2).max()),
                    float((i2 - i1).abs() / max(float(i2), 1e-300)) if float(i2) > 0 else 0.0,
                )
                err = max(errs) if all(map(math.isfinite, errs)) else math.inf
            if stalled and (collapsed or err > step_tol):
                # No step resolves the law any more: its spread collapses, or the observables are carried
                # by cells tens of e-folds out (the onset of blow-up, seen on coarse grids).  Stop and call
                # it a divergence, like the tail criterion below.
                diverged = True
                tail_div = t_target
                break
            if err > step_tol:
                dt = h * max(0.2, 0.9 * math.sqrt(step_tol / err))
                continue
            t += h
            mass, m, s, integral = y2, m2, s2, i2
            op = grid.operator(mass, m, s, integral)
            nfe += 1
            if not bool(torch.isfinite(op.risk)) or float(op.risk) > threshold:
                diverged = True
            elif float(op.tail_share) > tail_limit or float(op.unstable) >= 1.0:
                diverged = True
                tail_div = t_target  # first output time at or after the tail / step limit took over
            grow = min(2.0, max(0.2, 0.9 * math.sqrt(step_tol / err))) if err > 0 else 2.0
            if h == dt or grow < 1:
                dt = h * grow
        outs.append((mass, m, s, integral))  # after a divergence: the frozen state (R > threshold)
    return tuple(torch.stack(z) for z in zip(*outs)), nfe, tail_div
