"""The one SGD simulator (sde_optim.simulation): the vectorized update is torch.optim.SGD, step by step."""

from __future__ import annotations

import warnings

import pytest
import torch

from sde_optim import DiagonalLinearNetwork, TeacherProblem
from sde_optim.simulation import SGDRun, simulate_sgd, train_sgd

F64 = torch.float64

VARIANTS = [
    dict(lr=0.3),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.1, momentum=0.8, nesterov=True),
    dict(lr=0.1, momentum=0.7, dampening=0.3, weight_decay=0.01),
    dict(lr=[0.3] * 20 + [0.03] * 20, batch_size=[1] * 10 + [3] * 30, momentum=0.5),  # schedules, a jump in each
]


@pytest.mark.parametrize("parametrization", ["uv", "pm"])
@pytest.mark.parametrize("kw", VARIANTS, ids=["plain", "momentum", "nesterov", "dampening-wd", "schedules"])
def test_vectorized_update_equals_torch_sgd_step_by_step(parametrization, kw):
    # Same random stream, every recorded step: the hand-written (u, v) update and real torch.optim.SGD on the
    # network's own parameters (autograd) agree to round-off (float64: observed <= 3e-15).
    problem = TeacherProblem.sparse(64, 0.25, spectrum="power-law", noise_std=0.1, seed=1)
    model = DiagonalLinearNetwork(64, alpha=0.3, parametrization=parametrization, dtype=F64)
    runs = [simulate_sgd(problem, model, record_steps=range(0, 41), num_runs=2, observables="all",
                         generator=torch.Generator().manual_seed(0), implementation=impl, **kw)
            for impl in ("vectorized", "torch")]
    for name, values in runs[0].values.items():
        torch.testing.assert_close(values, runs[1].values[name], rtol=1e-12, atol=1e-13, msg=name)
    assert not bool(runs[0].diverged.any())


def test_model_is_not_modified_and_runs_are_independent():
    problem = TeacherProblem.sparse(128, 0.1, seed=2)
    model = DiagonalLinearNetwork(128, alpha=0.1, dtype=F64)
    before = [p.detach().clone() for p in model.parameters()]
    run = simulate_sgd(problem, model, lr=0.5, batch_size=1, record_steps=[0, 64], num_runs=3,
                       generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    risk = run.values["risk"]
    assert risk.shape == (3, 2) and bool((risk[:, 0] == risk[0, 0]).all()) and len(set(risk[:, 1].tolist())) == 3
    assert isinstance(run, SGDRun) and run.stderr("risk").shape == (2,)


def test_divergent_runs_are_flagged_and_frozen():
    problem = TeacherProblem.sparse(64, 0.2, seed=3)
    model = DiagonalLinearNetwork(64, alpha=0.3, dtype=F64)
    run = simulate_sgd(problem, model, lr=40.0, batch_size=1, record_steps=range(0, 400, 20), num_runs=2,
                       generator=torch.Generator().manual_seed(1))
    assert bool(run.diverged.all())
    assert bool(torch.isnan(run.values["risk"][:, -1]).all())


@pytest.mark.parametrize("bad, match", [
    (dict(record_steps=[3, 2]), "record_steps"),
    (dict(num_runs=0), "num_runs"),
    (dict(implementation="numpy"), "implementation"),
    (dict(momentum=-0.1), "momentum"),
    (dict(lr=[0.1, 0.2]), "schedule has 2 values"),
    (dict(blowup_factor=0.5), "blowup_factor"),
])
def test_bad_arguments_are_clear_errors(bad, match):
    problem = TeacherProblem.sparse(16, 0.25, seed=0)
    model = DiagonalLinearNetwork(16, dtype=F64)
    kw = {**dict(lr=0.1, batch_size=1, record_steps=[0, 5], num_runs=2), **bad}
    with pytest.raises((ValueError, TypeError), match=match):
        simulate_sgd(problem, model, **kw)


def test_train_sgd_is_one_torch_run_and_old_theory_names_warn():
    problem = TeacherProblem.sparse(32, 0.25, seed=0)
    curves = train_sgd(problem, lr=0.3, batch_size=2, steps=20, seed=5, record_every=5)
    assert curves["risk"].shape == (5,)
    import sde_optim.theory as theory

    with pytest.warns(DeprecationWarning, match="sde_optim.simulation"):
        assert theory.simulate_sgd is simulate_sgd
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from sde_optim.simulation import sgd_step  # noqa: F401  (the new home warns nothing)
