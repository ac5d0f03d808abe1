"""Tests of the theory engine (sde_optim.theory): PDE E6, particles E4-E5, ODE limits, E9,
predict() against real SGD, and argument validation.

Runs in well under a minute on 2 CPU cores; long statistical runs are marked ``slow``.
"""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sde_optim import DiagonalLinearNetwork, TeacherProblem
from sde_optim.observables import OBSERVABLES, measure
from sde_optim.theory import (
    Prediction,
    coordinate_types,
    critical_lr,
    gradient_flow_closed_form,
    isotropic_linear_risk,
    phi_to_uv,
    predict,
    solve_fokker_planck,
    uv_to_phi,
)
from sde_optim.theory.fokker_planck import FokkerPlanckSolution, MeanFieldDynamics, StiffSolve, solve_on_grid
import sde_optim.theory.grid_check as gc
from sde_optim.theory.stability import e8_estimate
from sde_optim.theory.predict import FINITE_D_STEP, FiniteDimensionWarning
from sde_optim.simulation import sgd_step, simulate_sgd
from sde_optim.theory.odes import escape_time
from problems import section6

F64 = torch.float64


# ----------------------------------------------------------------------------- PDE invariants
@pytest.mark.parametrize("noise_std,init,batch", [(0.0, "unbalanced", 1), (0.3, "balanced", 4)])
def test_pde_conserves_mass_and_positivity(noise_std, init, batch):
    problem, model = section6(noise_std=noise_std, init=init)
    types = coordinate_types(problem, model)
    dyn = MeanFieldDynamics(types, 0.5, batch, noise_std)
    sol = solve_fokker_planck(dyn, torch.linspace(0, 6, 13, dtype=F64), tol=3e-3)
    total = sol.mass.sum(-1)  # (n, T): one per type and time
    assert torch.allclose(total, torch.ones_like(total), rtol=0, atol=1e-12)
    assert float(sol.mass.min()) >= 0.0
    assert sol.tail_mass < 1e-3  # the co-moving window holds the density


# ----------------------------------------------------------------------------- coordinates
@settings(max_examples=200, deadline=None, derandomize=True)  # the same examples in every run
@given(st.floats(-50, 50), st.floats(-50, 50))
def test_phi_uv_roundtrip(u, v):
    u_t, v_t = torch.tensor(u, dtype=F64), torch.tensor(v, dtype=F64)
    q = u_t * u_t - v_t * v_t
    if float(q.abs()) < 1e-6 * float(u_t * u_t + v_t * v_t) or float(u_t * u_t + v_t * v_t) < 1e-12:
        return  # balanced/zero points have no phi (they use psi = log|beta|, THEORY §3)
    q2, phi = uv_to_phi(u_t, v_t)
    u2, v2 = phi_to_uv(q2, phi)
    # (u, v) and (-u, -v) are the same network; phi_to_uv returns the representative with u >= 0
    scale = max(abs(u), abs(v))
    err = min(max(abs(float(u2) * s - u), abs(float(v2) * s - v)) for s in (1.0, -1.0))
    assert err <= 1e-9 * scale
    assert float(u2) >= 0


# ----------------------------------------------------------------------------- THEORY §6 numbers
def test_section6_sanity_numbers():
    problem, model = section6()
    pred = predict(problem, model, lr=0.5, batch_size=1, steps=20 * problem.dim, num_points=41)
    assert pred.info["num_types"] == 3 and pred.info["types_exact"]
    vals = pred.at_step(torch.tensor([2000, 3000, 4000, 5000]))
    quoted = torch.tensor([0.0464, 0.0410, 0.0310, 0.0184], dtype=F64)
    # THEORY §6 (corrected) quotes these to three digits, from the converged PDE at d = 16384 and
    # SGD at d = 4096: the rounding of the quotes is <= 0.3 %; accept 0.5 %.
    assert torch.allclose(vals["risk"], quoted, rtol=5e-3)
    assert abs(float(pred.at_step(8000)["risk"]) - 6.2e-4) / 6.2e-4 < 0.01  # "6.2e-4 at t = 8": 2 digits
    c = pred.curves["curvature"]
    assert abs(float(c[0]) - 0.02) < 1e-12  # C(0) = lambda * 2 alpha^2 exactly
    assert abs(float(c[-1]) - 0.219) / 0.219 < 5e-3  # "rises to about 0.219" (t = 20 here)
    # "R = 2.0e-5 at t = 12, 1.6e-5 at t = 20" (two digits): the slow tail of the off-support coordinates
    tail = pred.at_step(torch.tensor([12000, 20000]))["risk"]
    assert torch.allclose(tail, torch.tensor([2.0e-5, 1.6e-5], dtype=F64), rtol=0.03)
    assert float(c[-1]) > float(c[0]) and float(pred.curves["risk"][-1]) < 1e-3 * 0.05


# ----------------------------------------------------------------------------- PDE vs particles
def test_pde_matches_particles():
    problem, model = section6()
    steps = 4 * problem.dim
    pde = predict(problem, model, lr=0.5, batch_size=1, steps=steps, num_points=5, tol=1e-3)
    parts = predict(problem, model, lr=0.5, batch_size=1, steps=steps, num_points=5, method="particles",
                    options=dict(num_particles=1500, num_replicas=8, dt=2e-3, generator=torch.Generator().manual_seed(0)))
    # Tolerance: the particle curve is the mean of K = 8 independent McKean-Vlasov replicas, and
    # its standard error is std_K / sqrt(K) (this includes the feedback of each replica's R on
    # its particles, which the i.i.d. formula misses).  A two-sided 99.9 % bound for a mean with
    # K - 1 = 7 degrees of freedom is t = 5.41 SE; on top we allow the deterministic errors:
    # the PDE's (tol = 1e-3 relative) and the Euler-Maruyama weak error at dt = 2e-3
    # (extrapolated, so O(dt^2); measured below 1e-3 relative by halving dt).
    for name in ("risk", "curvature"):
        a, b, se = pde.curves[name][1:], parts.curves[name][1:], parts.stderr[name][1:]
        assert bool(((a - b).abs() <= 5.41 * se + 2e-3 * a.abs()).all()), (name, a, b, se)


def test_particle_extrapolation_removes_euler_bias():
    # Noisy setting of the theory benchmark (gamma = 2, B = 4, sigma = 0.2).  At a coarse dt = 1.6e-2
    # plain Euler-Maruyama over-estimates the plateau risk (measured +1.8e-3 relative); Richardson
    # (2 X_h - X_2h) removes the O(dt) term (measured -1.6e-4).  Both runs use the same generator
    # seed, so they share the h-system's noise.  Statistic: mean over the plateau t in [4, 8] of the
    # relative difference to the PDE (tol 1e-4); its standard error is ~2e-4 (4 replicas x 4000
    # particles: replica SE ~4.7e-4 per point, 5 nearly independent points, the risk's correlation
    # time ~0.25 being below their spacing 1).  The plain run must be off by > 1e-3 (5 SE), the
    # extrapolated one by < 7e-4 (3.3 SE).
    problem, model = section6(noise_std=0.2)
    steps = 8 * problem.dim
    pde = predict(problem, model, lr=2.0, batch_size=4, steps=steps, num_points=9, tol=1e-4)
    bias = {}
    for extrapolate in (False, True):
        parts = predict(problem, model, lr=2.0, batch_size=4, steps=steps, num_points=9, method="particles",
                        options=dict(num_particles=12000, num_replicas=4, dt=1.6e-2, extrapolate=extrapolate,
                                     generator=torch.Generator().manual_seed(3)))
        rel = (parts.curves["risk"] - pde.curves["risk"]) / pde.curves["risk"]
        bias[extrapolate] = float(rel[4:].mean())
    assert bias[False] > 1e-3, bias
    assert abs(bias[True]) < 7e-4, bias


# ----------------------------------------------------------------------------- PDE resolution
def test_pde_error_estimate_is_met_and_honest():
    # THEORY §6 at gamma = 0.5: the a posteriori estimate must be below tol, and the true error
    # (against a 1024-cell solve with 10x finer local steps, itself ~1e-4 accurate) within a small
    # multiple of it (Richardson assumes second order; measured ratios 2.9-4.5 where 4 is assumed).
    problem, model = section6()
    steps = 10 * problem.dim
    ref = predict(problem, model, lr=0.5, batch_size=1, steps=steps, num_points=21,
                  solver_options=dict(num_cells=1024, step_tol=1e-4))
    for tol in (3e-3, 1e-3):
        pred = predict(problem, model, lr=0.5, batch_size=1, steps=steps, num_points=21, tol=tol)
        est = pred.info["error_estimate"]
        assert est is not None and est <= tol
        for name in ("risk", "curvature"):
            err = float(((pred.curves[name] - ref.curves[name]).abs() / ref.curves[name]).max())
            assert err <= 3 * tol, (tol, name, err, est)
    fixed = predict(problem, model, lr=0.5, batch_size=1, steps=steps, num_points=5, solver_options=dict(num_cells=64))
    assert fixed.info["error_estimate"] is None and fixed.info["num_cells"] == 64


def test_pde_estimate_is_honest_where_the_cells_converge_at_first_order():
    """Near the critical lr (THEORY §6, gamma = 2, t <= 5) the space error converges at order ~1.1-1.4 only
    (measured: 4.6 %, 2.2 %, 0.9 % at 104, 208, 416 cells), so Richardson's / 3 understated it: the grid check
    returned 104 cells with an estimate of 0.97 % (before the error split) or 1.26 % (split, without re-measuring
    the space error on the final time steps) while the true error was 4.6 %.  The split check must meet tol with an
    estimate that is not below the true error (against 832 cells with local steps 1e-3, itself ~1e-3 accurate)."""
    problem, model = section6()
    types = coordinate_types(problem, model)
    dyn = MeanFieldDynamics(types, 2.0, 1, 0.0)
    t = torch.linspace(0, 5, 21, dtype=F64)
    sol = solve_fokker_planck(dyn, t, tol=2e-2)
    ref = solve_fokker_planck(dyn, t, num_cells=832, step_tol=1e-3)
    true = max(float(((getattr_curve(sol, k) - getattr_curve(ref, k)).abs() / getattr_curve(ref, k).abs())
                     [ref.risk >= 1e-3 * ref.risk[0]].max()) for k in (0, 1))
    assert sol.error_estimate <= 2e-2
    assert true <= sol.error_estimate, (true, sol.error_estimate)


@pytest.mark.parametrize("lr,tol", [(4.0, 3e-3), (8.0, 1e-2)])
def test_the_grid_check_extrapolates_in_the_cells_and_says_how_well(lr, tol):
    """On the same time steps the cells converge at second order (THEORY §6 at 0.4x and 0.8x the decay-critical lr:
    the differences shrink ~4x per doubling), so the grid check answers with the Richardson extrapolation of its last
    pair (``coarser``: half the cells, the same steps), whose error it estimates from a third solve and from the pair
    one level up in time.  Measured (t <= 5, against the extrapolation of 768 and 1536 cells at step tolerance 2e-5,
    itself within 5e-5 of 1536/3072 at 1e-5): lr 4, tol 3e-3: 615 + 298 cells, estimate 2.2e-3, error 1.0e-3 (the
    plain 615-cell solve alone: 5.1e-3; the check without extrapolation went to 1264 cells, error 1.7e-3); lr 8,
    tol 1e-2: estimate 8.0e-3, error 2.7e-3.  There, before the time estimate's order was measured (a pair of twins),
    the estimate was 7.8e-3 for an error of 1.03e-2: the steps converge at order ~1.4 only at that step tolerance."""
    problem, model = section6()
    dyn = MeanFieldDynamics(coordinate_types(problem, model), lr, 1, 0.0)
    t = torch.linspace(0, 5, 21, dtype=F64)
    sol = solve_fokker_planck(dyn, t, tol=tol)
    assert sol.coarser is not None and sol.coarser.schedule == sol.schedule
    assert sol.coarser.xi.numel() < sol.xi.numel()
    coarse = solve_on_grid(dyn, t, 768, 2e-5)
    fine = solve_on_grid(dyn, t, 1536, 2e-5, schedule=coarse.schedule)
    ref = fine.answer_curves() + (fine.answer_curves() - coarse.answer_curves()) / 3.0
    ok = ref[0] >= 1e-3 * ref[0, 0]
    err = lambda c: float(((c - ref).abs() / ref.abs())[:, ok].max())  # noqa: E731
    assert err(sol.answer_curves()) <= sol.error_estimate <= tol, (err(sol.answer_curves()), sol.error_estimate)
    assert err(sol.answer_curves()) < 0.5 * err(torch.stack([sol.risk, sol.type_curves()[1].sum(-1)]))


@functools.lru_cache(maxsize=None)
def _section6_reference(lr: float, points: int = 21) -> tuple[MeanFieldDynamics, torch.Tensor, torch.Tensor]:
    """THEORY §6 (d = 1000) at ``lr``, t <= 5 (``points`` output times): ``(dynamics, t, R and C)``, the reference the grid check's
    answers are held to: the extrapolation of 768 and 1536 cells at step tolerance 2e-5 (within 5e-5 of 1536/3072 at
    1e-5 at lr 4 and 8, measured; 2-4 s)."""
    problem, model = section6()
    dyn = MeanFieldDynamics(coordinate_types(problem, model), lr, 1, 0.0)
    t = torch.linspace(0, 5, points, dtype=F64)
    coarse = solve_on_grid(dyn, t, 768, 2e-5)
    fine = solve_on_grid(dyn, t, 1536, 2e-5, schedule=coarse.schedule)
    return dyn, t, fine.answer_curves() + (fine.answer_curves() - coarse.answer_curves()) / 3.0


def _error_against(curves: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest relative error of R and C over the descent window ``R >= 1e-3 R(0)`` of ``ref``."""
    ok = ref[0] >= 1e-3 * ref[0, 0]
    return float(((curves - ref).abs() / ref.abs())[:, ok].max())


@pytest.mark.parametrize("lr, tol", [(2.0, 0.05), (4.0, 0.05), (8.0, 0.02)])
def test_a_loose_tol_is_met_and_its_estimate_bounds_the_error(lr, tol):
    """A loose ``tol`` starts the grid check on coarse grids, where two of its assumptions fail: the first pair's
    Richardson ``/ 3`` (the pair far from its asymptotic range) and a time error seen through a pair of step
    tolerances (where other limits set the steps, both take the same steps).  Measured before (THEORY §6, d = 1000,
    t <= 5): lr 2, tol 0.05: estimate 4.3e-2 for an error of 13.6 %; lr 8, tol 0.02: 1.5e-2 for 1.7 %.  Now the first
    pair's order is read off a level below (``_first_divisor``) and the time error of steps no tolerance sets is
    measured by halving them (``_steps_moved``, ``_halving_estimate``): error <= estimate <= tol."""
    dyn, t, ref = _section6_reference(lr)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = solve_fokker_planck(dyn, t, tol=tol)
    assert _error_against(sol.answer_curves(), ref) <= sol.error_estimate <= tol


def test_a_loose_tol_on_a_grid_that_blew_up_below_is_met():
    """``predict`` at ``tol = 0.05`` (THEORY §6, lr 4): its first grids of 8 and 16 cells diverge, the grid check
    starts from 32, and it answered 64 cells with an estimate of 3.2e-2 for a risk 16.5 % off (silent).  A level
    below that blew up marks the first pair as far from the asymptotic range: the check refines; error <= estimate
    <= tol against the same prediction at the default tol (its own estimate added)."""
    problem, model = section6()
    ref = predict(problem, model, lr=4.0, steps=5000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loose = predict(problem, model, lr=4.0, steps=5000, tol=0.05)
    ok = ref.curves["risk"] >= 1e-3 * ref.curves["risk"][0]
    err = max(float(((loose.curves[k] - ref.curves[k]).abs() / ref.curves[k].abs())[ok].max())
              for k in ("risk", "curvature"))
    assert err - ref.info["error_estimate"] <= loose.info["error_estimate"] <= 0.05


def test_halving_the_steps_measures_a_time_error_a_step_tolerance_does_not_see():
    """At step tolerance 0.32 THEORY §6 (lr 2, 240 cells) takes the same 32 steps as at 4x that: the pair of step
    tolerances differs by nothing while the time error is 11 % (against step tolerance 1e-6 on the same cells).
    Halving the steps sees it: twice the difference is 1-2x the true error (measured 1.4x)."""
    dyn, t, _ = _section6_reference(2.0)
    sol = solve_on_grid(dyn, t, 240, 0.32)
    assert not gc._steps_moved(sol, solve_on_grid(dyn, t, 240, 1.28))
    halved = solve_on_grid(dyn, t, 240, 0.32, schedule=gc._halved(sol.schedule))
    true = _error_against(sol.answer_curves(), solve_on_grid(dyn, t, 240, 1e-6).answer_curves())
    assert 0.05 < true <= gc._halving_estimate(sol, halved, 1e-3) <= 2.0 * true



def test_the_halving_order_of_level_0_bounds_the_time_error_of_halvings_on_finer_cells():
    """Where the steps are capped (THEORY §6 at lr 0.5, step tolerance 0.32: a quarter of it takes the same steps)
    the grid check halves them, and divides a halving's difference by the order level 0's steps quartered show
    (``_halving_divisor``, with Roache's factor 1.25) instead of assuming first order, which overstated the halved
    steps' time error 2.7x and cost a second halving of every type (student-t at d = 4096: 28 -> 19 s).  Measured on
    60 cells, carried to 240: true error <= estimate <= 2x it (measured 1.3x), and at most half the first-order one."""
    dyn, t, _ = _section6_reference(0.5)
    steps = solve_on_grid(dyn, t, 60, 0.32).schedule
    chain = [solve_on_grid(dyn, t, 60, 0.32, schedule=s) for s in (steps, gc._halved(steps), gc._halved(gc._halved(steps)))]
    div = gc._halving_divisor(*chain, 1e-3)
    sol = solve_on_grid(dyn, t, 240, 0.08)
    assert not gc._steps_moved(sol, solve_on_grid(dyn, t, 240, 0.32))  # capped
    halved = solve_on_grid(dyn, t, 240, 0.08, schedule=gc._halved(sol.schedule))
    true = _error_against(halved.answer_curves(), solve_on_grid(dyn, t, 240, 1e-6).answer_curves())
    estimate = gc._pair_difference(sol, halved, 1e-3) / div
    assert true <= estimate <= 2.0 * true
    assert estimate <= 0.5 * gc._pair_difference(sol, halved, 1e-3)


def test_the_extrapolations_order_from_a_chain_of_four_bounds_their_error():
    """The grid check's extrapolation in the cells (``(4 S - S_h) / 3``) was estimated at second order, ``|E2 - E1| / 3``;
    the extrapolations converge faster (the scheme is symmetric), and a chain of four solves on the same steps shows by
    how much (``_extrapolation_divisor``: the ratio of the extrapolations' differences, kept in [4, 6]).  THEORY §6 at
    lr 4, fixed steps, 120-960 cells: ratio 8.6, so ``/ 5``; against the extrapolation of 960 and 1920 cells: true error
    <= estimate <= 4x it (measured 2.9x; ``/ 3`` 4.8x)."""
    dyn, t, _ = _section6_reference(4.0)
    steps = solve_on_grid(dyn, t, 240, 4e-3).schedule
    sols = [solve_on_grid(dyn, t, n, 4e-3, schedule=steps) for n in (120, 240, 480, 960, 1920)]
    chain, ref = sols[:4], gc._extrapolated(sols[4], sols[3])
    div = gc._extrapolation_divisor(chain, 1e-3)
    assert div == 5.0
    true = _error_against(gc._extrapolated(chain[-1], chain[-2]), ref)
    assert true <= gc._extrapolation_estimate(chain, 1e-3, div) <= 4.0 * true
    assert gc._extrapolation_divisor(chain[:3], 1e-3) is None  # three solves show no order of the extrapolations


def test_the_grid_check_measures_the_halvings_order_before_a_second_halving(monkeypatch):
    """THEORY §6 at lr 1 with 101 output times (they set the steps) and ``tol = 3e-3``: the check halves the steps of
    its cells once, and rather than halving them again at an assumed first order it measures the halvings' order on
    level 0's cells (the ``order`` solve) and carries it: its answer meets tol and its estimate bounds the error
    against 768 / 1536 cells extrapolated at step tolerance 2e-5 (measured 1.9e-3 for 1.7e-3; 768 cells alone are
    3.0e-4 from that reference)."""
    dyn, t, ref = _section6_reference(1.0, 101)
    kinds, run = [], gc._BatchCheck.run

    def recorded(self, key, members):
        kinds.append(key[0])
        return run(self, key, members)

    monkeypatch.setattr(gc._BatchCheck, "run", recorded)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = solve_fokker_planck(dyn, t, tol=3e-3)
    assert "order" in kinds and kinds.index("halve") < kinds.index("order")
    assert _error_against(sol.answer_curves(), ref) <= sol.error_estimate <= 3e-3

def test_a_split_whose_replay_blew_up_measures_both_sources_on_the_other_corner(monkeypatch):
    """The grid check splits its error with one replay: level 1's cells on level 0's steps.  Those steps carry no error
    control on the finer cells, and near the critical lr they can blow up where neither adaptive solve did
    (power-law-B2-bal at 0.8x its critical lr, d = 16384: the replay diverged at t = 4.56), which made both estimates
    inf: that prediction refined until the work cap stopped it with an estimate of inf.  The other corner of the
    same square splits the error as well: level 0's cells on level 1's steps (space) and level 1's cells with level
    0's step tolerance (time).  Forced here (the replay marked diverged) on THEORY §6 at lr 4: the check goes to that
    corner next, and its answer meets tol with an estimate that bounds its error."""
    dyn, t, ref = _section6_reference(4.0)
    solve, calls = gc.solve_batch_on_grid, []

    def replay_blows_up(d, t_out, n_cells, step_tol, **kw):
        sols = solve(d, t_out, n_cells, step_tol, **kw)
        calls.append((n_cells, step_tol, kw.get("schedule") is not None))
        if calls[-1][2] and sum(c[2] for c in calls) == 1:  # the split's replay
            sols[0].diverged_at = float(t_out[10])
        return sols

    monkeypatch.setattr(gc, "solve_batch_on_grid", replay_blows_up)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = solve_fokker_planck(dyn, t, tol=3e-3)
    (n1, st0, replayed), = [c for c in calls if c[2]][:1]
    at = calls.index((n1, st0, True))
    assert calls[at + 1:at + 3] == [(n1 // 2, st0 / 4.0, True), (n1, st0, False)]
    assert _error_against(sol.answer_curves(), ref) <= sol.error_estimate <= 3e-3


# ----------------------------------------------------------------------------- the time step's scheme
def test_the_midpoint_rule_is_second_order_in_time():
    """The modified Patankar midpoint rule (``scheme="midpoint"``, see ``_integrate_mprk22``) on fixed steps S, S/2, S/4
    (THEORY §6 at lr 4, 120 cells, so the cells' error cancels): the successive differences fall by 4 at second order
    (2 at first).  Measured 3.5 (MPRK22: 3.6)."""
    problem, model = section6()
    dyn = MeanFieldDynamics(coordinate_types(problem, model), 4.0, 1, 0.0)
    t = torch.linspace(0, 5, 21, dtype=F64)
    steps = solve_on_grid(dyn, t, 120, 1e-2, scheme="midpoint").schedule
    chain = [solve_on_grid(dyn, t, 120, 1e-2, schedule=s, scheme="midpoint").answer_curves()
             for s in (steps, gc._halved(steps), gc._halved(gc._halved(steps)))]
    ratio = float((chain[1] - chain[0]).abs().max() / (chain[2] - chain[1]).abs().max())
    assert 3.0 <= ratio <= 6.0


@pytest.mark.parametrize("lr", [4.0, 8.0])
def test_the_grid_check_on_the_midpoint_rule_meets_tol(lr):
    """Every check of :func:`solve_fokker_planck` holds with the midpoint rule as with MPRK22: THEORY §6 at lr 4 and 8
    (0.4x and 0.8x the critical lr), ``tol = 3e-3``: true error <= estimate <= tol (measured 4.3e-4 <= 6.3e-4 and
    9.3e-4 <= 1.9e-3; MPRK22 1.0e-3 <= 1.5e-3 and 8.0e-4 <= 1.8e-3)."""
    dyn, t, ref = _section6_reference(lr)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = solve_fokker_planck(dyn, t, tol=3e-3, scheme="midpoint")
    assert _error_against(sol.answer_curves(), ref) <= sol.error_estimate <= 3e-3


def test_a_stiff_limit_raises_at_its_counted_step_and_only_in_controlled_mprk22_steps():
    """``stiff_limit = (kh, n, share)``: :class:`StiffSolve` at an accepted step with some type's ``k h`` above kh (here
    every step: kh = -inf) once there were n such steps and the share of rejected attempts is at least ``share``, at
    that step's time; never in a replay of a schedule (steps the controller did not choose) nor with the midpoint
    rule; and an unknown scheme is refused by name."""
    problem, model = section6()
    dyn = MeanFieldDynamics(coordinate_types(problem, model), 4.0, 1, 0.0)
    t = torch.linspace(0, 5, 21, dtype=F64)
    seen: list[float] = []
    with pytest.raises(StiffSolve) as stiff:
        solve_on_grid(dyn, t, 60, 1e-2, on_step=seen.append, stiff_limit=(-math.inf, 5, 0.0))
    assert len(seen) == 5 and stiff.value.t == seen[-1] and math.isfinite(stiff.value.kh)
    plain = solve_on_grid(dyn, t, 60, 1e-2)
    assert plain.diverged_at is None
    accepted = len(plain.schedule)
    attempts = plain.nfe - 1 - accepted  # one evaluation per attempt, one more per accepted step, one at t0
    share = (attempts - accepted) / attempts
    assert share > 0.0  # the check below needs rejections (measured: 4 of 116 attempts)
    with pytest.raises(StiffSolve) as stiff:  # the whole solve's share is reached at its last step at the latest
        solve_on_grid(dyn, t, 60, 1e-2, stiff_limit=(-math.inf, 1, share))
    assert stiff.value.rejected >= share
    for limit in ((-math.inf, 1, 1.0), (math.inf, 1, 0.0)):  # no solve rejects every attempt; no k h is above inf
        solve_on_grid(dyn, t, 60, 1e-2, stiff_limit=limit)
    solve_on_grid(dyn, t, 60, 1e-2, schedule=plain.schedule, stiff_limit=(-math.inf, 1, 0.0))
    solve_on_grid(dyn, t, 60, 1e-2, scheme="midpoint", stiff_limit=(-math.inf, 1, 0.0))
    for call in (lambda: solve_on_grid(dyn, t, 60, 1e-2, scheme="rk4"),
                 lambda: solve_fokker_planck(dyn, t, tol=3e-3, scheme="rk4")):
        with pytest.raises(ValueError, match="scheme must be one of"):
            call()


def test_the_default_window_holds_the_tail_of_a_collapsing_law():
    """THEORY §6 at lr 4: a support type collapsing onto phi* is a narrow peak trailed by a far tail; a window of 12
    standard deviations cut that tail (mass piled in the end cells) and R was 0.5-0.6 % off at every cell count (measured:
    4.3e-3 / 5.6e-3 at 640 / 1280 uniform cells of the old grid, 5.0e-3 at 640 stretched cells).  The default window
    (20 std, widened with the cells: ``grid_window``) must stay within 2.5e-3 of a 36-std one at 640 cells."""
    problem, model = section6()
    dyn = MeanFieldDynamics(coordinate_types(problem, model), 4.0, 1, 0.0)
    t = torch.linspace(0, 3, 13, dtype=F64)
    wide = solve_on_grid(dyn, t, 1152, 1e-4, half_width=36.0)
    ok = wide.risk >= 1e-3 * wide.risk[0]
    assert _max_rel_risk(solve_on_grid(dyn, t, 640, 1e-4), wide, ok) <= 2.5e-3


def test_the_grid_check_sees_a_window_too_narrow_for_the_law():
    """The window's truncation error is part of what the grid check estimates: the window widens with the cells
    (``grid_window``), so every pair of solves it compares differs in the window too.  With a fixed window the error
    of a window too narrow for the law does not fall with the cells, and no pair sees it: THEORY §6 at lr 4 with an
    8-std window, ``tol = 1e-2``, the fixed window gave an estimate of 5.7e-3 for a true error of 2.1e-2 (measured);
    the widening one 5.5e-3 for 2.9e-3 (R and C, against a 36-std solve on 1152 cells)."""
    problem, model = section6()
    dyn = MeanFieldDynamics(coordinate_types(problem, model), 4.0, 1, 0.0)
    t = torch.linspace(0, 3, 13, dtype=F64)
    wide = solve_on_grid(dyn, t, 1152, 1e-4, half_width=36.0)
    ok = wide.risk >= 1e-3 * wide.risk[0]
    sol = solve_fokker_planck(dyn, t, tol=1e-2, half_width=8.0)
    true = max(float(((getattr_curve(sol, k) - getattr_curve(wide, k)).abs() / getattr_curve(wide, k))[ok].max())
               for k in (0, 1))
    assert sol.error_estimate <= 1e-2
    assert true <= sol.error_estimate, (true, sol.error_estimate)


def _spurious_level_0_setting():
    """A log-uniform spectrum (two decades) with a Gaussian teacher (d = 256, uv, alpha 0.1, sigma 0.1, B = 4, lr 0.5x
    the E8 edge, t <= 4): at ``tol = 1e-2`` level 0 has 19 cells, and the first type solve blows up on them at
    t = 3.6 while 38 cells do not (nor 76)."""
    d = 256
    g = torch.Generator().manual_seed(0)
    lam = 10 ** (2 * torch.rand(d, generator=g, dtype=F64))
    torch.randn(d, generator=g, dtype=F64)
    problem = TeacherProblem(lam / lam.mean() / d, torch.randn(d, generator=g, dtype=F64), 0.1)
    model = DiagonalLinearNetwork(d, alpha=0.1, init="unbalanced", dtype=F64)
    return problem, model, dict(lr=0.5 * e8_estimate(problem, model, 4) / float(model.lr_scale), batch_size=4,
                                steps=4 * d)


def _predict_without_check_warnings(problem, model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        warnings.simplefilter("ignore", FiniteDimensionWarning)  # d = 256: the finite-d indicators speak, not the check
        return predict(problem, model, **kw)


def test_the_type_check_leaves_a_level_0_grid_that_diverges_spuriously():
    """On :func:`_spurious_level_0_setting` the type quadrature measured its types on a spurious divergence (the code
    before: every one of the 256 coordinates, 30 s).  It now runs on 38 cells (``info["type_check_cells"]``): no
    divergence, an estimate within tol and no warning (measured: 221 types, 14 s; the slow test below checks the
    curves against exact types)."""
    problem, model, kw = _spurious_level_0_setting()
    pred = _predict_without_check_warnings(problem, model, tol=1e-2, **kw)
    assert pred.info["type_check_cells"] == 38 and pred.divergence_step is None
    assert pred.info["error_estimate"] <= 1e-2


@pytest.mark.slow
def test_the_type_check_on_resolved_cells_is_within_tol_of_exact_types():
    """The prediction above within tol of exact types (255 rows) on 120 cells at step tolerance 1e-3 (whose own error is
    ~1e-3; measured: 2e-3 / 6e-3 from exact types on 240 cells at 1e-4, 210 s)."""
    problem, model, kw = _spurious_level_0_setting()
    pred = _predict_without_check_warnings(problem, model, tol=1e-2, **kw)
    ref = predict(problem, model, options=dict(num_cells=120, step_tol=1e-3), max_types=4096, **kw)
    assert ref.info["num_types"] == problem.dim - 1  # exact (two coordinates share a row)
    ok = ref.curves["risk"] >= 1e-3 * ref.curves["risk"][0]
    for k in ("risk", "curvature"):
        assert float(((pred.curves[k] - ref.curves[k]).abs() / ref.curves[k])[ok].max()) <= 1e-2, k


def test_the_subset_grid_check_gives_up_when_the_type_dependence_does_not_fall():
    """The combination technique's cross term ``|G_l(S) - G_l(C)|`` tends to how much level 0's grid error depends
    on the types, which no level removes; when it stays above half the tolerance the check must hand over to the
    plain check on the final types (None) instead of refining the subset's grid to its caps (a steep power law at
    d = 4096 ran for minutes at step tolerance 1.6e-5).  Here S and C differ on purpose (THEORY §6 at lr 4 and at lr
    0.5): the corrections differ by level 0's whole grid error at lr 4."""
    from sde_optim.theory.fokker_planck import grid_level
    from sde_optim.theory.grid_check import refine_grid_on_subset

    problem, model = section6()
    types = coordinate_types(problem, model)
    t = torch.linspace(0, 3, 13, dtype=F64)
    dyn_s, dyn_c = MeanFieldDynamics(types, 4.0, 1, 0.0), MeanFieldDynamics(types, 0.5, 1, 0.0)
    n0, st0 = grid_level(1e-3, 20.0, None, 0)
    base_s = solve_on_grid(dyn_s, t, n0, st0)
    base_c = solve_on_grid(dyn_c, t, n0, st0, schedule=base_s.schedule)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no cap reached: it stops before
        found = refine_grid_on_subset(dyn_s, dyn_c, t, base_s, base_c, tol=1e-3, step_tol=None, max_cells=4096,
                                      max_evaluations=40_000, estimate_floor=1e-3, half_width=20.0)
    assert found is None


def test_the_grid_check_stops_at_its_work_cap_in_cell_updates_and_says_so():
    """``max_work`` counts cell updates (types x cells x evaluations), not evaluations: THEORY §6 at lr 4, which the
    check refines to ~1920 cells, stopped at 2e6 cell updates keeps its last solve and warns with its estimate (above
    tol, honestly), the cap and what was spent; the same call without the cap meets tol with no warning."""
    problem, model = section6()
    dyn = MeanFieldDynamics(coordinate_types(problem, model), 4.0, 1, 0.0)
    t = torch.linspace(0, 3, 13, dtype=F64)
    with pytest.warns(RuntimeWarning, match=r"max_work=2e\+06 cell updates, [0-9.e+]+ spent"):
        capped = solve_fokker_planck(dyn, t, tol=1e-3, max_work=2e6)
    assert capped.error_estimate > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        full = solve_fokker_planck(dyn, t, tol=1e-3)
    assert full.error_estimate <= 1e-3 and full.xi.numel() > capped.xi.numel()


def _max_rel_risk(sol, ref, ok) -> float:
    return float(((getattr_curve(sol, 0) - getattr_curve(ref, 0)).abs() / getattr_curve(ref, 0))[ok].max())


def test_a_state_with_an_imbalance_hundreds_of_e_folds_down_is_exact():
    """SGD's noise shrinks |q| by hundreds of e-folds (E4) while beta stays of order one, so phi = asinh(2 beta / |q|)
    passes 300; the state was evaluated at |phi| <= 300 (e^phi itself overflows at 710), which cut such a law: beta
    e^-100 too small at |q| = e^-400.  Now beta = |q| sinh(phi) / 2 and rho = |q| cosh(phi) to rounding, in float64
    and float32 alike (where the bound on |phi| follows |q| too)."""
    problem, model = section6()
    for dtype, log_q in ((F64, -400.0), (torch.float32, -60.0)):
        dyn = MeanFieldDynamics(coordinate_types(problem, model).to(dtype=dtype), 4.0, 1, 0.0)
        q = torch.full((dyn.lam.shape[0], 1), math.exp(log_q) if dtype == F64 else float(math.exp(log_q)), dtype=dtype)
        beta = torch.tensor([-1.5, -0.5, 1e-3, 0.7, 2.0], dtype=F64)
        phi = torch.asinh(2.0 * beta / math.exp(log_q))  # up to 400 + log(4 |beta|)
        c = dyn.state(phi.to(dtype).expand(q.shape[0], 5), q)
        rtol = 1e-12 if dtype == F64 else 2e-4  # float32: phi ~ 60 carries a rounding of 60 x 6e-8 into e^phi
        torch.testing.assert_close(c.beta[0].to(F64), beta, rtol=rtol, atol=0.0)
        torch.testing.assert_close(c.rho[0].to(F64), torch.sqrt(math.exp(2 * log_q) + 4 * beta**2), rtol=rtol, atol=0.0)


def test_the_curvature_is_continuous_where_the_noise_takes_the_imbalance_past_e_minus_300():
    """A three-level spectrum (0.5, 1, 3), a two-valued teacher (+0.6, -1.2 on 15 %), sigma 0.05, B = 2, uv alpha 0.08
    at lr 21.4 (half the critical lr): the lambda = 3 types' |q| falls at a rate 2 gamma^2 lam R / B ~ 140 (E4) and
    passes e^-300 at t ~ 2.1, where the state's former bound |phi| <= 300 cut their laws: the predicted curvature fell
    2.7x between two output times (measured; SGD at d = 16384 shows no such drop and stays within ~15 % of the
    prediction now, docs/benchmarks.md).  After the first unit of time it must change by at most 20 % per output
    interval (it falls by 3-5 % there now)."""
    d = 512
    g = torch.Generator().manual_seed(7)
    lam = torch.tensor([0.5, 1.0, 3.0], dtype=F64).repeat_interleave(d // 3 + 1)[:d][torch.randperm(d, generator=g)]
    beta = torch.zeros(d, dtype=F64)
    support = torch.randperm(d, generator=g)[: int(0.15 * d)]
    beta[support[: len(support) // 2]], beta[support[len(support) // 2:]] = 0.6, -1.2
    problem = TeacherProblem(lam / d, beta, noise_std=0.05)
    model = DiagonalLinearNetwork(d, alpha=0.08, init="unbalanced", dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # d = 512 is far from the limit (FiniteDimensionWarning): not the point here
        pred = predict(problem, model, lr=21.4, batch_size=2, steps=3 * d, num_points=13, tol=1e-2)
    c = pred.curves["curvature"][4:]  # t >= 1
    assert float((c[:-1] / c[1:]).max()) <= 1.2 and float((c[1:] / c[:-1]).max()) <= 1.2, c
    assert pred.info["imbalance_lost_at"] is None  # |q| >= e^-420 at t = 3: representable


def test_an_imbalance_that_underflows_is_reported_with_its_time():
    """Past ``|q| ~ 2 tiny`` (E4 at ``2 gamma^2 lam R / B ~ 140`` per unit time reaches it at t ~ 5 in the setting
    above: measured 4.96, where the curves then turn nan) the phi coordinate cannot follow ``q``: the solution
    names the first output time (``predict`` warns with it, ``info["imbalance_lost_at"]``).  Here the noise
    integral is laid out so that the lambda = 3 types cross it between the 7th and 8th of 10 times."""
    problem, model = section6()
    types = coordinate_types(problem, model)
    dyn = MeanFieldDynamics(types, 4.0, 1, 0.0)
    lam = float(dyn.lam.max())
    crossing = (math.log(float(dyn.q0.abs().max()) / (2.0 * torch.finfo(F64).tiny))) / (2.0 * lam)  # I at |q| = 2 tiny
    t = torch.linspace(0.0, 9.0, 10, dtype=F64)
    integral = t * crossing / 6.5  # crosses between t = 6 and t = 7
    empty = torch.empty(0, dtype=F64)
    sol = FokkerPlanckSolution(t, empty, 1.0, empty, empty, empty, integral, empty, dyn, None, 0, 0.0)
    assert sol.imbalance_lost() == 7.0
    short = FokkerPlanckSolution(t[:7], empty, 1.0, empty, empty, empty, integral[:7], empty, dyn, None, 0, 0.0)
    assert short.imbalance_lost() is None


def test_a_state_far_out_on_the_grid_stays_finite():
    """A 20-std window on a wide law reaches phi or psi of several hundred, where beta = e^x overflowed: inf * 0 = nan
    went into the risk and the operator, and a prediction at 0.7x the critical lr "diverged" (a two-level spectrum
    with the pm parametrization, d = 4096, lr 13, where SGD stays bounded in 4 of 4 runs).  States are evaluated
    where |beta| and rho stay below max^(1/8): beta, rho, the drift and the E7 densities must be finite out to
    |x| = 1e4."""
    for init in ("balanced", "unbalanced"):
        problem, model = section6(noise_std=0.2, init=init)
        dyn = MeanFieldDynamics(coordinate_types(problem, model), 4.0, 1, 0.2)
        x = torch.tensor([-1e4, -800.0, -300.0, 0.0, 300.0, 800.0, 1e4], dtype=F64).expand(dyn.lam.shape[0], 7)
        c = dyn.state(x, dyn.q0)
        risk = torch.tensor(0.1, dtype=F64)
        for value in (c.beta, c.rho, dyn.drift(c.beta, risk), OBSERVABLES["risk"].density(c), OBSERVABLES["curvature"].density(c)):
            assert bool(torch.isfinite(value).all())


def getattr_curve(sol, k: int) -> torch.Tensor:
    """R (k = 0) or C (k = 1) of a Fokker-Planck solution's answer (the extrapolation when the grid check chose one)
    at its output times."""
    return sol.answer_curves()[k]


def test_pde_refines_where_the_noise_feeds_back():
    # 0.8x the decay-critical step (gamma = 8): the noise feeds back on R, so the first grid (76 cells
    # at tol = 1e-2) is too coarse (measured 10 % error at 180 cells, t = 5): the check must refine,
    # and end within 2 tol of a 1024-cell, step_tol 3e-4 solve (itself ~0.5 % accurate); with a cap
    # that is too low it must say so.
    problem, model = section6()
    steps = 3 * problem.dim
    kw = dict(lr=8.0, batch_size=1, steps=steps, num_points=13)
    ref = predict(problem, model, **kw, solver_options=dict(num_cells=1024, step_tol=3e-4))
    pred = predict(problem, model, **kw, tol=1e-2)
    assert pred.info["num_cells"] > 76 and pred.info["error_estimate"] <= 1e-2
    err = float(((pred.curves["risk"] - ref.curves["risk"]).abs() / ref.curves["risk"]).max())
    assert err <= 2e-2, err
    with pytest.warns(RuntimeWarning, match="max_cells"):
        predict(problem, model, **kw, tol=1e-3, solver_options=dict(max_cells=128))


# ----------------------------------------------------------------------------- E9
@pytest.mark.parametrize("gamma,batch,noise", [(0.5, 1, 0.0), (1.5, 2, 0.4), (3.0, 1, 0.2)])
def test_e9_matches_isotropic_closed_form(gamma, batch, noise):
    d = 500
    problem = TeacherProblem.sparse(d, 0.2, noise_std=noise, seed=3)
    model = DiagonalLinearNetwork(d, alpha=0.3, init="balanced", dtype=F64)
    pred = predict(problem, model, lr=gamma, batch_size=batch, steps=5 * d, method="ode", observables="risk",
                   num_points=26, blowup_factor=1e300)
    r0 = float(problem.population_risk(model.beta.detach()))
    exact = isotropic_linear_risk(pred.t, risk0=r0, gamma=gamma, batch_size=batch, noise_std=noise)
    assert torch.allclose(pred.curves["risk"], exact, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- gradient flow
def test_gradient_flow_matches_independent_uv_ode():
    from scipy.integrate import solve_ivp

    d = 64
    problem = TeacherProblem.sparse(d, 0.25, spectrum="two-level", ratio=4.0, noise_std=0.1, seed=1)
    gen = torch.Generator().manual_seed(2)
    u0 = 0.2 + 0.1 * torch.rand(d, generator=gen, dtype=F64)
    v0 = 0.1 * torch.randn(d, generator=gen, dtype=F64)
    model = DiagonalLinearNetwork(d, init=(u0, v0), dtype=F64)
    gamma, steps = 0.7, 8 * d
    pred = predict(problem, model, lr=gamma, batch_size=1, steps=steps, method="gradient_flow",
                   observables=("risk", "curvature", "l1"), num_points=9, max_types=d)
    lam, bstar = problem.spectrum.numpy(), problem.beta_star.numpy()

    def rhs(_, y):  # du = -gamma lam r v, dv = -gamma lam r u (E3 without noise), in (u, v)
        u, v = y[:d], y[d:]
        r = u * v - bstar
        return list(-gamma * lam * r * v) + list(-gamma * lam * r * u)

    sol = solve_ivp(rhs, (0, float(pred.t[-1])), list(u0.numpy()) + list(v0.numpy()), t_eval=pred.t.numpy(),
                    rtol=1e-11, atol=1e-13, method="DOP853")
    u, v = torch.tensor(sol.y[:d].T), torch.tensor(sol.y[d:].T)
    risk = problem.population_risk(u * v)
    assert torch.allclose(pred.curves["risk"], risk, rtol=1e-7)
    assert torch.allclose(pred.curves["curvature"], problem.spectrum @ (u * u + v * v).T / d, rtol=1e-7)
    assert torch.allclose(pred.curves["l1"], (u * v).abs().mean(-1), rtol=1e-7)


def test_gradient_flow_closed_form_and_small_init_limit():
    d, gamma = 10, 0.5
    bstar = torch.zeros(d, dtype=F64)
    bstar[0] = 1.0
    problem = TeacherProblem(torch.full((d,), 1.0 / d, dtype=F64), bstar)
    gaps = []
    for alpha in (1e-2, 1e-4, 1e-6):
        model = DiagonalLinearNetwork(d, alpha=alpha, dtype=F64)  # q0 = 2 alpha^2, phi0 = 0
        q0 = 2 * alpha**2
        t_esc = escape_time(gamma=gamma, lam=1.0, beta_star=1.0, q=q0)
        steps = int(2 * t_esc * d)
        pred = predict(problem, model, lr=gamma, batch_size=1, steps=steps, method="gradient_flow",
                       observables="l1", num_points=steps + 1)
        beta = pred.curves["l1"] * d  # only coordinate 0 moves
        phi = gradient_flow_closed_form(pred.t, gamma=gamma, lam=1.0, beta_star=1.0, q=q0, phi0=0.0)
        assert torch.allclose(beta, 0.5 * q0 * torch.sinh(phi), rtol=1e-7, atol=1e-12)
        t_half = float(pred.t[int((beta >= 0.5).nonzero()[0, 0])])
        gaps.append(abs(t_half / t_esc - 1))
    # Small-initialization limit: the support coordinate jumps from 0 to beta* at t_esc
    # (incremental learning); the relative gap shrinks like 1/log(1/alpha).
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.05


# ----------------------------------------------------------------------------- real SGD
@pytest.mark.parametrize("parametrization", ["uv", "pm"])
def test_vectorized_sgd_equals_torch_optim(parametrization):
    d, lr, batch = 32, 0.3, 3
    problem = TeacherProblem.sparse(d, 0.25, noise_std=0.2, seed=4)
    model = DiagonalLinearNetwork(d, parametrization=parametrization, alpha=0.5, dtype=F64)
    u, v = (z.clone() for z in model.uv_state())  # uv_state() shares storage with the parameters
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        x, y = problem.sample(batch, generator=gen)
        opt.zero_grad()
        (0.5 * (model(x) - y) ** 2).mean().backward()
        opt.step()
        qb = u * u - v * v
        g = ((x @ (u * v) - y)[:, None] * x).mean(0)
        u, v = sgd_step(u, v, x, y, lr * model.lr_scale)
        # E4's discrete identity, exact for any step: q -> (1 - gamma^2 g^2) q
        assert torch.allclose(u * u - v * v, (1 - (lr * model.lr_scale) ** 2 * g * g) * qb, rtol=1e-10, atol=1e-14)
    u2, v2 = model.uv_state()
    assert torch.allclose(u, u2, rtol=1e-10, atol=1e-12) and torch.allclose(v, v2, rtol=1e-10, atol=1e-12)


def test_predict_matches_sgd():
    d = 1024
    problem = TeacherProblem.sparse(d, 0.1, spectrum="two-level", ratio=3.0, noise_std=0.1, seed=7)
    model = DiagonalLinearNetwork(d, alpha=0.1, dtype=F64)
    lr, batch, steps = 0.8, 2, 5 * d
    pred = predict(problem, model, lr=lr, batch_size=batch, steps=steps, num_points=17)
    run = simulate_sgd(problem, model, lr=lr, batch_size=batch, record_steps=pred.steps, num_runs=8,
                       generator=torch.Generator().manual_seed(8))
    # Tolerance: |SGD - PDE| <= 3 SE + 2 % of the value over the descent window R >= 1e-3 R(0),
    # SE = the 8 seeds' standard error (a t with 7 degrees of freedom: P(|t| > 3) = 0.02 per point,
    # and the 2 % below adds to it; with 4 seeds the SE was itself too noisy: 2 of 100 other generator
    # seeds failed in a flakiness audit).  The 2 % is the finite-d allowance for this setting: the
    # deterministic limit is exact only as d -> infinity, and here (noise floor, so R stays
    # O(1e-2)) the measured gap at d = 1024 was <= 1.3 % with seed SE ~1.4 % at that point.
    # A wrong constant in E4-E6 is a >10 % effect.  (Where R falls to ~1e-3 R(0) without a
    # noise floor the finite-d gap is larger, ~1/sqrt(d): see benchmarks/theory_accuracy.py.)
    risk = pred.curves["risk"]
    window = risk >= 1e-3 * risk[0]
    for name in ("risk", "curvature"):
        mean = run.mean(name)
        se = run.values[name].std(0) / math.sqrt(run.values[name].shape[0])
        err = (mean - pred.curves[name]).abs()
        assert bool((err[window] <= 3 * se[window] + 0.02 * pred.curves[name][window].abs()).all()), (name, err / mean)


# ----------------------------------------------------------------------------- types
def test_types_exact_and_binned():
    problem, model = section6(d=2000)
    types = coordinate_types(problem, model)
    assert types.exact and types.num_types == 3 and abs(float(types.weight.sum()) - 1) < 1e-15
    pl = TeacherProblem.sparse(4000, 0.1, spectrum="power-law", exponent=1.0, seed=2)
    m = DiagonalLinearNetwork(4000, alpha=0.1, dtype=F64)
    binned = coordinate_types(pl, m, max_types=48)
    assert not binned.exact and binned.num_types <= 48
    assert abs(float((binned.weight * binned.lam).sum()) - float(pl.spectrum.mean())) < 1e-12  # bin means keep mean(lambda)
    assert 0 <= binned.binning_error < 0.05
    # The prediction at t = 0 reproduces the measured observables of the network.
    pred = predict(pl, m, lr=0.3, batch_size=1, steps=10, observables="all", max_types=48, num_points=2)
    meas = measure(pl, m, "all")
    for name in OBSERVABLES:
        assert abs(float(pred.curves[name][0]) - float(meas[name])) <= 0.05 * abs(float(meas[name])) + 1e-12, name


# ----------------------------------------------------------------------------- API
def test_prediction_interpolation_and_save(tmp_path):
    problem, model = section6(d=200)
    pred = predict(problem, model, lr=0.5, batch_size=1, steps=400, method="gradient_flow", num_points=5)
    assert pred.steps.tolist() == [0, 100, 200, 300, 400]
    mid = pred.at_step(150)
    assert isinstance(mid["risk"], float)
    assert abs(mid["risk"] - 0.5 * float(pred.curves["risk"][1] + pred.curves["risk"][2])) < 1e-15
    both = pred.at_step(torch.tensor([0, 400]))
    assert torch.equal(both["risk"], pred.curves["risk"][[0, -1]])
    with pytest.raises(ValueError, match="k must lie"):
        pred.at_step(401)
    path = tmp_path / "pred.pt"
    pred.save(path)
    back = Prediction.load(path)
    assert torch.equal(back.curves["curvature"], pred.curves["curvature"]) and back.info == pred.info


def test_divergence_is_predicted():
    problem, model = section6(d=1000)
    # gamma = 40 is far above the E8 estimate (~9); between ~9 and ~30 the PDE predicts a bounded
    # plateau instead (see critical_lr's two thresholds).
    pred = predict(problem, model, lr=40.0, batch_size=1, steps=5 * problem.dim, num_points=51, tol=3e-3)
    assert pred.divergence_step is not None and 0 < pred.divergence_step <= 5 * problem.dim
    assert bool(torch.isnan(pred.curves["risk"][-1]))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(lr=0.0), ValueError, "lr"),
        (dict(lr=-1.0), ValueError, "lr"),
        (dict(steps=0), ValueError, "steps"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(method="sde"), ValueError, "method"),
        (dict(observables=("risk", "sharpness")), ValueError, "observables"),
        (dict(method="ode", observables="curvature"), ValueError, "observables"),
        (dict(lr="big"), TypeError, "lr"),
        (dict(steps=2.5), TypeError, "steps"),
    ],
)
def test_predict_validation(kwargs, exc, match):
    problem, model = section6(d=50)
    args = dict(lr=0.5, batch_size=1, steps=10)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        predict(problem, model, **args)


def test_predict_validation_models():
    problem, model = section6(d=50)
    with pytest.raises(ValueError, match="dim"):
        predict(problem, DiagonalLinearNetwork(49, dtype=F64), lr=0.5, batch_size=1, steps=10)
    with pytest.raises(ValueError, match="depth"):
        predict(problem, DiagonalLinearNetwork(50, parametrization="pm", depth=3, dtype=F64), lr=0.5, batch_size=1, steps=10)
    with pytest.raises(TypeError, match="model"):
        predict(problem, torch.nn.Linear(50, 1), lr=0.5, batch_size=1, steps=10)
    with pytest.raises(ValueError, match="depth"):
        critical_lr(problem, DiagonalLinearNetwork(50, parametrization="pm", depth=3, dtype=F64), batch_size=1, steps=10)


def test_prediction_at_a_global_minimizer_is_constant():
    # beta0 = beta* = 0 and sigma = 0: every per-sample gradient vanishes, SGD never moves (found by the CLI fuzz test).
    problem = TeacherProblem.sparse(1, 0.1, seed=0)
    model = DiagonalLinearNetwork(1, dtype=F64)
    assert float(problem.beta_star.abs().sum()) == 0
    pred = predict(problem, model, lr=1.0, batch_size=1, steps=5, num_points=3)
    assert pred.divergence_step is None and bool((pred.curves["risk"] == 0).all())
    assert torch.allclose(pred.curves["curvature"], torch.full((3,), 0.02, dtype=F64))
    with pytest.raises(ValueError, match="global minimizer"):
        critical_lr(problem, model, batch_size=1, steps=5)


@pytest.mark.slow
def test_critical_lr_brackets_divergence():
    problem, model = section6(d=1000)
    steps = 10 * problem.dim
    crit = critical_lr(problem, model, batch_size=1, steps=steps)
    assert crit.decay is not None and crit.decay <= crit.bounded * (1 + crit.rel_tol)
    below = predict(problem, model, lr=0.8 * crit.bounded, batch_size=1, steps=steps, num_points=41, blowup_factor=1e3)
    above = predict(problem, model, lr=1.25 * crit.bounded, batch_size=1, steps=steps, num_points=41, blowup_factor=1e3)
    assert below.divergence_step is None and above.divergence_step is not None


def test_critical_lr_answer_holds_on_a_finer_grid():
    """critical_lr bisected on the a priori grid of its tol and stopped there: THEORY §6 answered 24.85 on 143 cells
    where finer grids put the edge at 23.5 (6 % off with a 2 % bracket).  Its answer must now hold on a grid 4x finer
    in space and 16x in step tolerance, to within its bracket and its own grid estimate (the old answer, 24.85 here
    too, diverged there at 0.98x)."""
    from sde_optim.theory.fokker_planck import grid_level

    problem, model = section6(d=400)
    steps, tol = problem.dim, 3e-3
    crit = critical_lr(problem, model, batch_size=1, steps=steps, tol=tol)
    n0, st0 = grid_level(tol, 20.0, None, 2)
    bound = crit.rel_tol + crit.grid_estimate
    assert crit.num_cells > n0 and bound < 0.1

    def diverges(lr: float) -> bool:
        return predict(problem, model, lr=lr, batch_size=1, steps=steps, num_points=41, blowup_factor=1e3, tol=tol,
                       observables=("risk",), options={"num_cells": 4 * n0, "step_tol": st0 / 16}).divergence_step is not None

    assert not diverges(crit.bounded * (1 - bound)) and diverges(crit.bounded * (1 + crit.rel_tol + bound))


def test_the_predicted_scatter_of_one_run_matches_the_spread_of_sgd_seeds():
    """``Prediction.scatter``: one run's relative standard deviation around the curves at this d, from the
    coordinates' independent fluctuations (finite_d_indicators). Against 32 SGD seeds at d = 256: the measured
    spread over the predicted one, median over the output times, was 1.05 (risk) and 1.27 (curvature) here (the
    model leaves out the fluctuations all coordinates share, through R(t) and the common sample: measured 1.05-1.39
    up to d = 1024 on this setting, 0.97-1.05 with 64 seeds on the Student-t teacher, docs/benchmarks.md). The
    bounds are that stated accuracy, 1/1.5 to 1.5, widened by the 32-seed standard deviation's own Monte Carlo error
    (1/sqrt(2 x 31) = 13 %, x 2): 0.55 to 1.75. A scatter off by the missing sqrt(d) would read 16x or 1/16."""
    d = 256
    problem = TeacherProblem.sparse(d, 0.2, noise_std=0.3, seed=3)
    model = DiagonalLinearNetwork(d, alpha=0.1, dtype=torch.float64)
    pred = predict(problem, model, lr=1.0, batch_size=1, steps=3 * d, num_points=31)
    run = simulate_sgd(problem, model, lr=1.0, batch_size=1, record_steps=pred.steps, num_runs=32,
                       generator=torch.Generator().manual_seed(1))
    for name in ("risk", "curvature"):
        values = run.values[name]
        measured = (values.std(0) / values.mean(0))[1:]  # t = 0 is deterministic: both 0
        ratio = float((measured / pred.scatter[name][1:]).median())
        assert 0.55 <= ratio <= 1.75, (name, ratio)
    assert pred.info["finite_d"]["risk_scatter"] == pytest.approx(float(pred.scatter["risk"].max()))


def _steep_power_law(d: int):
    """lambda_i ~ i^-1.5 (mean 1), 50 % Rademacher teacher +-0.7, balanced init 0.2, sigma 0."""
    g = torch.Generator().manual_seed(0)
    lam = torch.arange(1, d + 1, dtype=torch.float64).pow(-1.5)
    sign = torch.where(torch.rand(d, generator=g, dtype=torch.float64) < 0.5, -0.7, 0.7).to(torch.float64)
    bstar = torch.where(torch.rand(d, generator=g, dtype=torch.float64) < 0.5, sign, torch.zeros(d, dtype=torch.float64))
    problem = TeacherProblem(lam / lam.mean() / d, bstar, 0.0)
    return problem, DiagonalLinearNetwork(d, alpha=0.2, init="balanced", dtype=torch.float64)


def test_a_sweep_warns_once_for_its_worst_member():
    """The step index grows with the lr (0.14 at lr 1, 0.27 at lr 2 here, both past FINITE_D_STEP): one warning for
    the sweep, with the worst member's numbers, not one per member (best_lr sweeps 8-16 learning rates twice)."""
    from sde_optim.theory import FiniteDimensionWarning, predict_sweep

    problem, model = _steep_power_law(1024)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        preds = predict_sweep(problem, model, lr=[1.0, 2.0], batch_size=8, steps=5 * 1024, num_points=21)
    found = [w for w in caught if issubclass(w.category, FiniteDimensionWarning)]
    worst = max(p.info["finite_d"]["curvature_step"] for p in preds)
    assert len(found) == 1 and f"= {worst:.2g} of" in str(found[0].message)
    assert FINITE_D_STEP < preds[0].info["finite_d"]["curvature_step"] < worst


def test_a_spectrum_whose_top_coordinates_take_large_steps_warns_that_the_limit_does_not_hold():
    """A steep power law lambda_i ~ i^-1.5: the top coordinate keeps lambda_1 / d ~ 0.38 at every d, so its SGD step
    gamma lambda rho / d stays O(1), and the continuous-time limit misses its drift (measured at d = 4096 against
    8 SGD seeds: risk 48 %, curvature 23 % off the prediction, whose own error estimate is 3e-4). predict must say
    so; an isotropic problem at the same d must not."""
    from sde_optim.theory import FiniteDimensionWarning

    d = 1024
    problem, model = _steep_power_law(d)
    with pytest.warns(FiniteDimensionWarning, match="gamma lambda rho / d = "):
        pred = predict(problem, model, lr=2.0, batch_size=8, steps=5 * d, num_points=21)
    assert pred.info["finite_d"]["curvature_step"] > 0.2  # 0.27 here
    with warnings.catch_warnings():
        warnings.simplefilter("error", FiniteDimensionWarning)
        iso = predict(TeacherProblem.sparse(d, 0.2, noise_std=0.1, seed=1), DiagonalLinearNetwork(d, alpha=0.1),
                      lr=0.5, batch_size=1, steps=3 * d, num_points=21)
    assert iso.info["finite_d"]["curvature_step"] < 0.01


def test_a_step_index_at_which_sgd_was_6_percent_off_warns():
    """``benchmarks/silent_scan.py`` case 1502 (two-level spectrum, Student-t teacher, +- parametrization, B = 16, 0.9x
    the E8 lr with a cosine decay, d = 2048): SGD's mean risk 6.5 % (z = 5, 8 runs) off a prediction that said nothing,
    whose indicators were these (step 0.073 against a threshold of 0.1 then; the error was 0.7-0.9x the step index
    there and on its neighbours, docs/benchmarks.md).  They warn now; the largest indicators of the benchmark settings
    at d = 1024 (spiked-random-init's, curvature step 0.029) do not."""
    from sde_optim.theory.predict import _warn_finite_d

    measured = dict(risk_step=0.0712, curvature_step=0.0735, risk_scatter=0.0523, curvature_scatter=0.0209)
    with pytest.warns(FiniteDimensionWarning, match="gamma lambda rho / d = 0.073 of"):
        _warn_finite_d(measured, 2048)
    benchmark = dict(risk_step=0.002, curvature_step=0.029, risk_scatter=0.048, curvature_scatter=0.093)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FiniteDimensionWarning)
        _warn_finite_d(benchmark, 1024)


def test_a_curvature_that_weight_decay_takes_down_hundreds_of_e_folds_warns():
    """``benchmarks/silent_scan.py`` case 2204 (isotropic, +-1 teacher, weight decay 0.01 at lr 4.27 under warmup-cosine,
    B = 16, d = 2048): every weight goes to 0 and the curvature falls by 332 e-folds; the step index (0.042) and the
    scatter were under their thresholds and SGD's curvature ended 146x below a silent prediction.  The step index is
    a relative error of the drift, so over an observable's e-folds it compounds in the exponent:
    ``info['finite_d']['curvature_compound']`` (sum of step x |d ln C|) warns above 1.  The same setting at d = 512
    (measured: compound 2.26, SGD's curvature e^0.83 = 2.3x below the prediction at the end, 4 runs whose log
    curvatures spread 0.04: the gap is 40 standard errors; 0.5 is the bound asserted).  The benchmark settings'
    compound indicators at d = 1024 are at most 0.09 (pl-sparse-gauss): they do not warn (docs/benchmarks.md)."""
    d = 512
    g = torch.Generator().manual_seed(0)
    bstar = torch.where(torch.rand(d, generator=g, dtype=F64) < 0.4, torch.sign(torch.randn(d, generator=g, dtype=F64)),
                        0.0)
    problem = TeacherProblem(torch.ones(d, dtype=F64) / d, bstar, 0.1)
    model = DiagonalLinearNetwork(d, alpha=0.1, dtype=F64)
    steps, lr = 4 * d, 4.27
    warm = steps // 10
    sched = [lr * (k + 1) / warm if k < warm else
             lr * 0.5 * (1 + math.cos(math.pi * (k - warm) / (steps - warm))) + 1e-3 * lr for k in range(steps)]
    kw = dict(lr=sched, batch_size=16, weight_decay=0.01)
    with pytest.warns(FiniteDimensionWarning, match="compounds to 2.3 in its exponent"):
        pred = predict(problem, model, steps=steps, num_points=41, **kw)
    assert pred.info["finite_d"]["curvature_step"] < FINITE_D_STEP  # the step index alone said nothing
    sgd = simulate_sgd(problem, model, record_steps=pred.steps, num_runs=4, generator=torch.Generator().manual_seed(1),
                       **kw)
    gap = float(torch.log(pred.curves["curvature"][-1] / sgd.values["curvature"].mean(0)[-1]))
    assert gap > 0.5  # measured 0.83: the warning is not a false alarm here


def test_a_point_without_weight_adds_nothing_to_an_expectation():
    """Zero-weight points contribute 0 even where the density is inf; a nan density with weight stays nan."""
    from sde_optim.theory.statistics import expectation

    values = torch.tensor([[math.inf, 2.0, -math.inf]], dtype=F64)
    weight = torch.tensor([[0.0, 0.25, 0.0]], dtype=F64)
    assert float(expectation(values, weight)) == 0.5
    assert math.isnan(float(expectation(torch.tensor([[math.nan, 1.0]], dtype=F64), torch.tensor([[0.5, 0.5]], dtype=F64))))


def test_a_wide_law_gives_finite_curves_where_a_density_overflows():
    """THEORY §6 (noiseless) at lr 11, past the decay-critical lr (~10) but bounded: the off-support type's law is
    wide in phi, its grid reaches |phi| ~ 300 (the state clamp), where lambda^2 r^2 rho (E8's S1, ``grad_norm``)
    is inf on cells without mass.  Before zero-weight points added 0 (``inf * 0 = nan``), the E8 rate and the
    ``grad_norm`` curve were nan from step 8448 of 10240 on, with no warning."""
    d = 1024
    problem = TeacherProblem.sparse(d, 0.1, noise_std=0.0, seed=0)
    model = DiagonalLinearNetwork(d, alpha=0.1, dtype=F64)
    pred = predict(problem, model, lr=11.0, steps=10 * d, num_points=41, tol=3e-3, observables="all",
                   options={"refine": False})
    assert pred.divergence_step is None
    assert bool(torch.isfinite(pred.local_rate).all())
    for name, curve in pred.curves.items():
        assert bool(torch.isfinite(curve).all()), name
    for name, curve in pred.scatter.items():
        assert bool(torch.isfinite(curve).all()), name


def test_float32_follows_float64_where_a_window_edge_overflowed():
    """``dtype=torch.float32`` on a power law with a Gaussian teacher and a small init (``|q0| = 2.5e-3``): the
    windows reach ``phi ~ 60``, where ``beta^2`` overflowed float32 (the state clamp, ``|phi| <= 300``, is float64's),
    and the solve diverged spuriously at step 410 of 2048 without a warning.  Each prediction is within tol = 1e-3
    of the limit by its own estimate, so the two must agree within 2 tol (measured: 1.3e-6)."""
    d = 512
    problem = TeacherProblem.sparse(d, 0.1, spectrum="power-law", exponent=1.0, values="gaussian", noise_std=0.2, seed=6)
    model = DiagonalLinearNetwork(d, alpha=0.05, dtype=F64)
    kw = dict(lr=0.5, batch_size=2, steps=4 * d, num_points=41)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FiniteDimensionWarning)
        ref = predict(problem, model, **kw)
        low = predict(problem, model, dtype=torch.float32, **kw)
    assert ref.divergence_step is None and low.divergence_step is None
    assert low.curves["risk"].dtype == torch.float32
    window = ref.curves["risk"] >= 1e-3 * ref.curves["risk"][0]
    for name in ("risk", "curvature"):
        rel = (low.curves[name].double() - ref.curves[name]).abs() / ref.curves[name].abs()
        assert float(rel[window].max()) <= 2e-3, name


@pytest.mark.parametrize("method", ["pde", "gradient_flow"])
def test_float32_outputs_are_finite_where_an_observable_starts_at_zero(method):
    """``l1`` is 0 at an unbalanced start (``v0 = 0``): its scatter divided 0 by ``clamp_min(1e-300)``, which is 0 in
    float32, and came out nan; the guards now take the dtype's own floor (``statistics.tiny``)."""
    d = 256
    problem = TeacherProblem.sparse(d, 0.1, noise_std=0.1, seed=1)
    model = DiagonalLinearNetwork(d, alpha=0.1, dtype=F64)
    pred = predict(problem, model, lr=0.5, steps=4 * d, method=method, observables="all", dtype=torch.float32,
                   num_points=21)
    for name, values in {**pred.curves, **pred.scatter, "local_rate": pred.local_rate}.items():
        assert bool(torch.isfinite(values).all()), name
