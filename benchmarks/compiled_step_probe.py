"""What a compiled MPRK22 step would buy: the PDE's time per step against a numba kernel of the same work (issue 12).

A cost probe for a design decision (whether to add a compiled inner loop), not a solver: the kernel below does
the work of one step of ``fokker_planck._integrate_mprk22`` for phi types with constant coefficients -- two
evaluations (the E5 state map at the cell centres and faces, the E7 risk and curvature densities, the drift,
the fourth-order weights and the moments), two Scharfetter-Gummel assemblies, two tridiagonal solves (Thomas,
no pivoting: the matrices are M-matrices) and the step's error -- on synthetic data of the same shape, fused
into one loop nest.  Its numbers are never used as predictions; the library's definitions of the observables
stay in ``sde_optim/observables.py``.

For each case the types and cells are those of a real solve: ``predict`` on a setting of
``benchmarks/theory_accuracy.py`` captures its dynamics, one ``solve_on_grid`` at the stated cells and step
tolerance is timed (torch, per accepted step), then the kernel at the same ``(types, cells)``.  One thread, both
in the same process, so the ratio compares.  numba is a dependency of the package since the sixteenth session (its tridiagonal solve and SG bands, ``sde_optim/theory/sg_operator.py``); this probe fuses the whole step.

    python benchmarks/compiled_step_probe.py
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from _threads import pin_threads

pin_threads("1")

import numpy as np  # noqa: E402
import torch  # noqa: E402 - after the thread environment

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _capture import captured_dynamics  # noqa: E402

import sde_optim.theory.fokker_planck as fp  # noqa: E402

try:
    from numba import njit
except ImportError:  # pragma: no cover - a probe for a decision, run by hand
    sys.exit("compiled_step_probe.py needs numba (a dependency of sde-optim: reinstall the package)")

# (setting, lr, d, tol of the capturing predict, cells, step tolerance): a small grid (dispatch-bound), the
# near-critical grid of THEORY §6 at lr 8, a grid-check subset and the widest type ladder of issue 10's settings
CASES = [("iso-s6", 4.0, 4096, 0.5, 480, 1e-3), ("iso-s6", 8.0, 4096, 0.5, 3840, 1e-3),
         ("pl-sparse-gauss", 0.5, 16384, 0.5, 240, 1e-3), ("lu-dense-gauss", 0.5, 16384, 1e-2, 60, 0.016)]


@njit
def _evaluate(mass, m, s, q, lam, bstar, weight, xi, inner, gamma, obs, a_faces, moments):
    types, cells = mass.shape
    risk = 0.0
    for t in range(types):
        hq = 0.5 * abs(q[t])
        e_xi = e_xi2 = e_a = e_xia = 0.0
        for j in range(cells):
            e = math.exp(min(max(m[t] + s[t] * xi[j], -300.0), 300.0))
            beta, rho = 0.5 * hq * (e - 1.0 / e), hq * (e + 1.0 / e)
            r = beta - bstar[t]
            left = mass[t, j - 1] if j > 0 else 0.0
            right = mass[t, j + 1] if j < cells - 1 else 0.0
            w = mass[t, j] * (13.0 / 12.0) - (left + right) / 24.0
            obs[0, t, j] = 0.5 * lam[t] * r * r * weight[t]
            obs[1, t, j] = lam[t] * rho * weight[t]
            risk += obs[0, t, j] * w
            a = -2.0 * gamma * lam[t] * r
            e_xi += w * xi[j]
            e_xi2 += w * xi[j] * xi[j]
            e_a += w * a
            e_xia += w * a * xi[j]
        for j in range(cells - 1):
            e = math.exp(min(max(m[t] + s[t] * inner[j], -300.0), 300.0))
            a_faces[t, j] = -2.0 * gamma * lam[t] * (0.5 * hq * (e - 1.0 / e) - bstar[t])
        moments[t, 0], moments[t, 1] = e_xi, e_xi2 - e_xi * e_xi
        moments[t, 2], moments[t, 3] = e_a, e_xia - e_xi * e_a
    return risk


@njit
def _assemble(a_faces, s, vm, diffusion, inner, gap, width, lo, dg, up):
    types, cells = dg.shape
    for t in range(types):
        dxi = max(diffusion[t] / (s[t] * s[t]), 1e-300)
        for j in range(cells):
            dg[t, j] = lo[t, j] = up[t, j] = 0.0
        for j in range(cells - 1):
            pe = (a_faces[t, j] - vm[t]) / s[t] * gap[j] / dxi
            z = max(abs(pe), 1e-308)
            b = z / math.expm1(z)
            cp = dxi / gap[j] * (b + max(pe, 0.0)) / width[j]
            cm = dxi / gap[j] * (b - min(pe, 0.0)) / width[j + 1]
            lo[t, j + 1], up[t, j] = cp, cm
            dg[t, j] -= cp
            dg[t, j + 1] -= cm


@njit
def _solve(lo, dg, up, rhs, h, scale, out):
    """``(I - h A diag(scale)) y = rhs`` per type by the Thomas algorithm."""
    types, cells = dg.shape
    c = np.empty(cells)
    for t in range(types):
        b = 1.0 - h * dg[t, 0] * scale[t, 0]
        c[0] = -h * up[t, 0] * scale[t, 1] / b
        out[t, 0] = rhs[t, 0] / b
        for j in range(1, cells):
            low = -h * lo[t, j] * scale[t, j - 1]
            b = 1.0 - h * dg[t, j] * scale[t, j] - low * c[j - 1]
            if j < cells - 1:
                c[j] = -h * up[t, j] * scale[t, j + 1] / b
            out[t, j] = (rhs[t, j] - low * out[t, j - 1]) / b
        for j in range(cells - 2, -1, -1):
            out[t, j] -= c[j] * out[t, j + 1]


@njit
def _step(mass, m, s, q, lam, bstar, weight, xi, inner, gap, width, gamma, nu, h, ones, obs, a_faces, moments,
          lo, dg, up, lo1, dg1, up1, y1, y2, ratio):
    types, cells = mass.shape
    risk = _evaluate(mass, m, s, q, lam, bstar, weight, xi, inner, gamma, obs, a_faces, moments)
    vm = moments[:, 2].copy()
    _assemble(a_faces, s, vm, 4.0 * nu * lam * risk, inner, gap, width, lo, dg, up)
    _solve(lo, dg, up, mass, h, ones, y1)
    np.maximum(y1, 0.0, y1)
    risk1 = _evaluate(y1, m + h * vm, s, q, lam, bstar, weight, xi, inner, gamma, obs, a_faces, moments)
    _assemble(a_faces, s, vm, 4.0 * nu * lam * risk1, inner, gap, width, lo1, dg1, up1)
    for t in range(types):
        for j in range(cells):
            ratio[t, j] = mass[t, j] / y1[t, j] if y1[t, j] > 0 else 1.0
            lo[t, j] = 0.5 * (lo[t, j] + lo1[t, j])
            up[t, j] = 0.5 * (up[t, j] + up1[t, j])
            dg[t, j] = 0.5 * (dg[t, j] + dg1[t, j])
    _solve(lo, dg, up, mass, h, ratio, y2)
    err = 0.0
    for t in range(types):
        for j in range(cells):
            y2[t, j] = max(y2[t, j], 0.0)
            err += weight[t] * abs(y2[t, j] - y1[t, j]) * (obs[0, t, j] + obs[1, t, j])
    return err


def kernel_ms_per_step(types: int, cells: int, repeats: int = 100) -> tuple[float, float]:
    """(first call in s, including numba's compile; ms per step after it) on a Gaussian law over the stretched grid."""
    rng = np.random.default_rng(0)
    faces = np.sinh(0.5 * np.linspace(-20.0, 20.0, cells + 1)) / 0.5
    xi = 0.5 * (faces[1:] + faces[:-1])
    inner, gap, width = faces[1:-1], np.diff(xi), np.diff(faces)
    mass = np.exp(-0.5 * xi**2)[None].repeat(types, 0)
    mass /= mass.sum(1, keepdims=True)
    per_type = [rng.normal(size=types) * 0.1, np.full(types, 0.2), np.full(types, 0.01), rng.random(types) + 0.5,
                rng.normal(size=types) * 0.1, np.full(types, 1.0 / types)]
    buffers = [np.ones((types, cells)), np.empty((2, types, cells)), np.empty((types, cells - 1)), np.empty((types, 4)),
               *(np.empty((types, cells)) for _ in range(9))]
    args = (mass, *per_type, xi, inner, gap, width, 0.5, 0.25, 1e-3, *buffers)
    t0 = time.perf_counter()
    _step(*args)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(repeats):
        _step(*args)
    return first, (time.perf_counter() - t0) / repeats * 1e3


def torch_ms_per_step(name: str, lr: float, d: int, tol: float, cells: int, step_tol: float) -> tuple[int, int, float]:
    """(types, cells, ms per accepted step) of one ``solve_on_grid`` on the dynamics ``predict`` builds for the setting
    (the solve with the most types, as the type quadrature's finest)."""
    dynamics, t_out, opts = captured_dynamics(name, lr, d, tol)
    t0 = time.perf_counter()
    sol = fp.solve_on_grid(dynamics, t_out, cells, step_tol, **opts)
    elapsed = time.perf_counter() - t0
    return dynamics.types.num_types, sol.xi.numel(), elapsed / len(sol.schedule) * 1e3


def main() -> None:
    print(f"# torch {torch.__version__}, threads={torch.get_num_threads()}, numpy {np.__version__}")
    print(f"{'setting':<18} {'lr':>4} {'d':>6} {'types':>6} {'cells':>6} {'torch ms/step':>14} {'kernel ms/step':>15} "
          f"{'ratio':>6} {'first call s':>13}")
    for name, lr, d, tol, cells, step_tol in CASES:
        types, n, torch_ms = torch_ms_per_step(name, lr, d, tol, cells, step_tol)
        first, kernel_ms = kernel_ms_per_step(types, n)
        print(f"{name:<18} {lr:>4g} {d:>6} {types:>6} {n:>6} {torch_ms:>14.3f} {kernel_ms:>15.3f} "
              f"{torch_ms / kernel_ms:>6.1f} {first:>13.1f}", flush=True)


if __name__ == "__main__":
    main()
