"""Many learning rates in one solve (predict_sweep, the batched Fokker-Planck system) and best_lr (issue 12)."""

from __future__ import annotations

import warnings

import pytest
import torch

from sde_optim import DiagonalLinearNetwork, TeacherProblem, best_lr, predict, predict_sweep
from sde_optim.theory.dynamics import CoefficientBatch, MeanFieldDynamics, SGDConfig
from sde_optim.theory.fokker_planck import solve_batch_on_grid, solve_on_grid
from sde_optim.simulation import simulate_sgd
from sde_optim.theory import FiniteDimensionWarning
from sde_optim.theory.quadrature import coordinate_types
from problems import section6

F64 = torch.float64


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    ok = torch.isfinite(a) & torch.isfinite(b)
    return float(((a - b).abs() / a.abs())[ok].max())


def test_a_batch_of_one_is_the_single_solve_bit_for_bit():
    problem, model = section6(d=500, noise_std=0.2)
    types = coordinate_types(problem, model)
    coef = SGDConfig(lr=1.0, batch_size=2).coefficients(500, 1.0, 3000)
    t = torch.linspace(0, 6, 13, dtype=F64)
    single = solve_on_grid(MeanFieldDynamics(types, coef, noise_std=0.2), t, 64, 1e-3)
    (batched,) = solve_batch_on_grid(MeanFieldDynamics(types, CoefficientBatch([coef]), noise_std=0.2), t, 64, 1e-3)
    assert torch.equal(single.mass, batched.mass) and torch.equal(single.risk, batched.risk)


def test_batch_members_agree_with_their_own_solves_and_a_divergent_member_leaves():
    """Shared time steps change each member only by its step-control error (step_tol 1e-3 here: measured
    differences <= 1.2e-3 on THEORY §6); a member that blows up is frozen at the same output time as alone."""
    problem, model = section6(d=1000)
    types = coordinate_types(problem, model)
    lrs = [0.5, 2.0, 40.0]
    coefs = [SGDConfig(lr=lr).coefficients(1000, 1.0, 5000) for lr in lrs]
    t = torch.linspace(0, 5, 26, dtype=F64)
    alone = [solve_on_grid(MeanFieldDynamics(types, c), t, 96, 1e-3, dim=1000) for c in coefs]
    together = solve_batch_on_grid(MeanFieldDynamics(types, CoefficientBatch(coefs)), t, 96, 1e-3, dim=1000)
    for a, b in zip(alone, together):
        assert a.diverged_at == b.diverged_at
        assert _rel(a.risk, b.risk) < 3e-3
    assert together[2].diverged_at is not None and together[0].diverged_at is None


def test_predict_sweep_matches_predict_within_tol():
    problem, model = section6(d=1000, noise_std=0.1)
    steps = 4000
    lrs = [0.3, 1.0, 3.0]
    sweep = predict_sweep(problem, model, lr=lrs, batch_size=[1, 4], steps=steps, num_points=41, tol=3e-3)
    assert len(sweep) == 6
    for (lr, b), got in zip([(a, b) for a in lrs for b in (1, 4)], sweep):
        alone = predict(problem, model, lr=lr, batch_size=b, steps=steps, num_points=41, tol=3e-3)
        assert got.info["lr"] == pytest.approx(lr) and got.info["batch_size"] == b
        assert got.info["error_estimate"] <= 3e-3
        for name in ("risk", "curvature"):  # both within tol of the exact curve: within 2 tol of each other
            assert _rel(alone.curves[name], got.curves[name]) < 6e-3


@pytest.mark.parametrize("member_batch,budget,groups", [(None, None, [3]), (None, 1, [1, 1, 1]), (1, None, [1, 1, 1]),
                                                         (2, None, [2, 1])])
def test_a_sweeps_grid_check_runs_member_batch_members_at_a_time(member_batch, budget, groups, monkeypatch):
    """The grid check of a sweep takes its members in groups of ``member_batch``, by default as many as fit the memory
    budget (all three here; one at a time when a member's estimate alone passes it), each group's answers within tol."""
    import sde_optim.theory.solvers as solvers

    if budget is not None:
        monkeypatch.setattr(solvers, "BATCH_BYTES", budget)

    seen = []
    real = solvers.refine_grid_batch

    def spy(dynamics, t_out, coarse, **kwargs):
        seen.append(len(coarse))
        assert (dynamics.groups or 1) == len(coarse)  # the group's own coefficients, not the whole batch's
        return real(dynamics, t_out, coarse, **kwargs)

    monkeypatch.setattr(solvers, "refine_grid_batch", spy)
    problem, model = section6(d=1000, noise_std=0.1)
    options = {} if member_batch is None else {"member_batch": member_batch}
    lrs = [0.3, 1.0, 3.0]
    sweep = predict_sweep(problem, model, lr=lrs, steps=4000, num_points=41, tol=3e-3, options=options)
    assert seen == groups
    for lr, got in zip(lrs, sweep):
        assert got.info["lr"] == pytest.approx(lr) and got.info["error_estimate"] <= 3e-3
    with pytest.raises(ValueError, match="member_batch"):
        predict_sweep(problem, model, lr=lrs, steps=4000, num_points=41, tol=3e-3, options={"member_batch": 0})


def test_predict_sweep_scales_a_schedule_and_keeps_momentum():
    problem, model = section6(d=500)
    shape = SGDConfig(lr=lambda k: 1.0 if k < 1000 else 0.5, momentum=0.5)
    sweep = predict_sweep(problem, model, sgd=shape, lr=[0.2, 0.4], steps=2000, num_points=21, tol=3e-3)
    alone = predict(problem, model, sgd=SGDConfig(lr=lambda k: 0.4 if k < 1000 else 0.2, momentum=0.5), steps=2000,
                    num_points=21, tol=3e-3)
    assert _rel(alone.curves["risk"], sweep[1].curves["risk"]) < 6e-3


@pytest.mark.parametrize("kwargs,match", [(dict(lr=[]), "at least one"), (dict(lr=[0.5, -1.0]), "lr"),
                                          (dict(lr=0.5, batch_size=[1, 0]), "batch_size"), (dict(lr=0.5, sgd=3), "sgd")])
def test_predict_sweep_validation(kwargs, match):
    problem, model = section6(d=50)
    with pytest.raises((ValueError, TypeError), match=match):
        predict_sweep(problem, model, steps=10, **kwargs)


def test_best_lr_is_the_predicted_minimum_inside_its_bracket():
    """With label noise the risk at a fixed budget is smallest at an interior lr (slow below, noise floor above):
    best_lr returns the least predicted risk of its final sweep, and that sweep brackets it."""
    problem, model = section6(d=500, noise_std=0.3)
    steps = 2 * 500
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no capped refinement anywhere at these settings
        res = best_lr(problem, model, steps=steps, batch_size=1, critical=20.0, upper=0.3, sweep_size=6, tol=3e-3,
                      num_points=21)
    assert res.lr in res.predictions and len(res.predictions) == 3
    assert res.risk == pytest.approx(float(res.final_risk.min()))
    assert res.candidates[0] < res.lr < res.candidates[-1]  # an interior minimum
    inner = int(torch.argmin(res.coarse_risk))
    assert 0 < inner < res.coarse_lr.numel() - 1
    again = predict(problem, model, lr=res.lr, batch_size=1, steps=steps, num_points=21, tol=3e-3)
    assert float(again.curves["risk"][-1]) == pytest.approx(res.risk, rel=6e-3)


def test_best_lr_validation():
    problem, model = section6(d=50)
    with pytest.raises(ValueError, match="upper"):
        best_lr(problem, model, steps=10, critical=1.0, upper=1.5)
    with pytest.raises(ValueError, match="critical"):
        best_lr(problem, model, steps=10, critical=-1.0)


def test_a_sweep_near_the_critical_lr_stays_above_the_noise_floor():
    """best_lr's coarse sweep (12 members, tol 1e-2) on an isotropic problem with label noise 0.2 and B = 4 returned,
    for its members near the critical lr (~67), risks of 0.004 and 0.0016, below sigma^2/2 = 0.02 (impossible),
    from 38 cells with an estimate of 2 %: the time step was refined on a grid that did not resolve the law (alone
    or in a batch of 3 the same lrs were right).  Seen in a benchmark run on an intermediate working tree and not
    reproduced on any commit; kept as the guard of what must hold: every member above the floor, within its tol
    (the grid check now also calls a risk below the floor unresolved)."""
    d = 16384
    problem = TeacherProblem.sparse(d, 0.1, noise_std=0.2, seed=1)
    model = DiagonalLinearNetwork(d, alpha=0.1, init="balanced", dtype=F64)
    lrs = [0.6656 * 80.0 ** (i / 11) for i in range(12)]  # best_lr's coarse sweep: [0.01, 0.8] x the critical lr
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        sweep = predict_sweep(problem, model, lr=lrs, batch_size=4, steps=3 * d, tol=1e-2, num_points=101)
    for pred in sweep:
        risk = pred.curves["risk"]
        assert bool((risk[torch.isfinite(risk)] >= 0.5 * 0.2**2).all())
        assert pred.info["error_estimate"] <= 1e-2


def test_a_prediction_whose_solve_meets_a_zero_pivot_diverges():
    """The setting of the test above at d = 1024 (lambda_i ~ i^-1/2 with mean 1, Gaussian teacher, alpha 0.3, lr 1,
    B = 4): predict returns a divergence early in the horizon, as SGD does there, instead of raising."""
    d = 1024
    i = torch.arange(1, d + 1, dtype=F64)
    lam = i**-0.5 * (d / (i**-0.5).sum())
    problem = TeacherProblem(lam, 4.0 * torch.randn(d, generator=torch.Generator().manual_seed(0), dtype=F64) / d**0.5)
    model = DiagonalLinearNetwork(d, alpha=0.3, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FiniteDimensionWarning)
        pred = predict(problem, model, lr=1.0, batch_size=4, steps=6 * d)
    assert pred.divergence_step is not None and pred.divergence_step < d
    run = simulate_sgd(problem, model, lr=1.0, batch_size=4, record_steps=[0, d], num_runs=4,
                       generator=torch.Generator().manual_seed(2))
    assert bool(run.diverged.all())  # SGD diverges within the first unit of time too


def test_a_sweeps_base_grid_is_refined_while_a_members_divergence_is_spurious(monkeypatch):
    """The type check's grid (the grid check's level 0): doubled while some member's divergence there vanishes or
    moves by more than 10 % on twice the cells (a blow-up of the coarse grid), kept where every divergence stays (a
    member past its critical lr diverges by design, as in best_lr's sweeps)."""
    from types import SimpleNamespace as NS

    import sde_optim.theory.solvers as solvers

    finer = {120: [NS(diverged_at=1.02), NS(diverged_at=None)], 240: [NS(diverged_at=1.03), NS(diverged_at=None)]}
    calls = []
    monkeypatch.setattr(solvers, "solve_batch_on_grid", lambda dyn, t, n, st, **kw: calls.append(n) or finer[n])
    solver, problem = solvers.PDESolver(), NS(tol=1e-3, t=None, dynamics=lambda types: None)
    # member 1 blew up at t = 0.5 on 60 cells and not on 120: the base moves to 120 cells (and stays: 240 agrees)
    sols, base = solver._resolved_base(problem, None, [NS(diverged_at=1.0), NS(diverged_at=0.5)], (60, 4e-3), {})
    assert base == (120, 4e-3) and sols is finer[120] and calls == [120, 240]
    # member 0 diverges at about the same time on 120 cells: a divergence by design, the base stays on 60 cells
    calls.clear()
    level0 = [NS(diverged_at=1.0), NS(diverged_at=None)]
    sols, base = solver._resolved_base(problem, None, level0, (60, 4e-3), {})
    assert base is None and sols is level0 and calls == [120]


def test_a_sweep_is_one_batch_unless_its_members_own_work_dwarfs_what_it_shares(monkeypatch):
    """PDESolver._alone: member by member from ALONE_CELLS type-cells of the first type set on level 0, on the
    compiled CPU step only, never when member_batch is given; the members' budgets count their own evaluations on
    the sweep's clock."""
    from types import SimpleNamespace as NS

    import sde_optim.theory.fokker_planck as fp
    import sde_optim.theory.solvers as solvers

    solver, t = solvers.PDESolver(), torch.linspace(0.0, 1.0, 5, dtype=F64)
    limit = solvers.PDESolver.ALONE_CELLS
    assert solver._alone(NS(t=t), NS(num_types=limit // 60 + 1), 60)
    assert not solver._alone(NS(t=t), NS(num_types=limit // 60 - 1), 60)
    assert not solvers.PDESolver(member_batch=4)._alone(NS(t=t), NS(num_types=limit), 60)
    assert not solver._alone(NS(t=t.half()), NS(num_types=limit), 60)  # no compiled step for float16
    monkeypatch.setattr(fp, "COMPILED_STEP", False)
    assert not solver._alone(NS(t=t), NS(num_types=limit), 60)  # the torch path: the batch shares its operations
    budget = fp.Budget(max_evaluations=10, max_seconds=5.0)
    budget.spend(3)
    again = budget.again()
    assert (again.used, again.max_evaluations, again.max_seconds, again._start) == (0, 10, 5.0, budget._start)
    # a few-type sweep (THEORY section 6: 2 types) stays one batch: its members share one count of evaluations
    problem, model = section6(d=1000, noise_std=0.1)
    sweep = predict_sweep(problem, model, lr=[0.3, 1.0], steps=4000, num_points=41, tol=3e-3)
    assert sweep[0].info["operator_evaluations"] == sweep[1].info["operator_evaluations"]
