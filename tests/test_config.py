"""Teachers from plain fields (TeacherSpec) and the main job from a YAML file through LightningCLI."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import typing
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from sde_optim import TeacherProblem, TeacherSpec
from sde_optim.lightning import CurvatureMonitor, TeacherDataModule, TeacherRegression, TheoryMonitor
from sde_optim.lightning.theory_monitor import Method
from sde_optim.theory import METHODS

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "lightning_examples" / "sparse_regression.yaml"


# ----------------------------------------------------------------------------- TeacherSpec
@pytest.mark.parametrize("kwargs", [dict(), dict(spectrum="two-level", ratio=4.0, noise_std=0.1, seed=3),
                                    dict(spectrum="power-law", exponent=0.5, values="gaussian", seed=7)])
def test_spec_builds_the_same_teacher_as_sparse(kwargs):
    built, direct = TeacherSpec(64, 0.25, **kwargs).build(), TeacherProblem.sparse(64, 0.25, **kwargs)
    assert torch.equal(built.feature_variance, direct.feature_variance) and torch.equal(built.beta_star, direct.beta_star)
    assert built.noise_std == direct.noise_std


def test_spec_is_accepted_wherever_a_problem_is():
    spec = TeacherSpec(32, 0.25, seed=1)
    reference = spec.build()
    for problem in (TeacherRegression(spec, lr=0.5).problem, TeacherDataModule(spec, batch_size=2).problem,
                    TheoryMonitor(spec).problem, TeacherRegression(dataclasses.asdict(spec), lr=0.5).problem):
        assert isinstance(problem, TeacherProblem) and torch.equal(problem.beta_star, reference.beta_star)
    for make in (lambda p: TeacherRegression(p, lr=0.5), lambda p: TeacherDataModule(p, batch_size=2), TheoryMonitor):
        with pytest.raises(TypeError, match="problem must be a TeacherProblem or a TeacherSpec, got str"):
            make("teacher")
    with pytest.raises(TypeError, match=r"unknown: \['dimension'\]"):
        TeacherRegression({"dimension": 32}, lr=0.5)


def test_a_positive_density_with_no_support_is_refused_naming_density_and_dim():
    with pytest.raises(ValueError, match=r"density=0.1 with dim=3 gives round\(density \* dim\) = 0 .*density > 0.5 / dim"):
        TeacherSpec(3, 0.1)
    assert int((TeacherSpec(3, 0.2).build().beta_star != 0).sum()) == 1  # 0.6 rounds to one coordinate
    assert bool((TeacherSpec(3, 0.0).build().beta_star == 0).all())  # density 0: the zero teacher, on purpose


@pytest.mark.parametrize("kwargs, words", [
    (dict(dim=0), "dim must be an integer >= 1"), (dict(dim=8, density=1.5), "density must be >= 0.0 and <= 1.0"),
    (dict(dim=8, spectrum="flat"), "spectrum must be one of"), (dict(dim=8, values="uniform"), "values must be one of"),
    (dict(dim=8, noise_std=-1.0), "noise_std must be >= 0.0"), (dict(dim=8, ratio=0.0), "ratio must be > 0.0"),
    (dict(dim=8, exponent=-1.0), "exponent must be >= 0.0"),
])
def test_spec_checks_every_field_at_construction(kwargs, words):
    with pytest.raises(ValueError, match=words):
        TeacherSpec(**kwargs)
    with pytest.raises(TypeError, match="dim must be an integer"):
        TeacherSpec(8.5)


def test_spec_from_command_line_flags():
    parser = argparse.ArgumentParser()
    TeacherSpec.add_arguments(parser, dim=16)
    assert TeacherSpec.from_arguments(parser.parse_args([])) == TeacherSpec(16)
    args = parser.parse_args(["--dim", "8", "--density", "0.5", "--spectrum", "power-law", "--values", "gaussian",
                              "--noise-std", "0.2", "--exponent", "2", "--ratio", "3"])
    assert TeacherSpec.from_arguments(args, seed=4) == TeacherSpec(8, 0.5, "power-law", "gaussian", 0.2, 2.0, 3.0, 4)


def test_choices_are_literals_matching_what_is_accepted():
    hints = typing.get_type_hints(TeacherRegression.__init__)
    assert typing.get_args(hints["optimizer"]) == ("sgd", "homogenized", "svag")
    assert set(typing.get_args(Method)) == set(METHODS)  # TheoryMonitor(method=...) offers what predict accepts
    assert typing.get_args(typing.get_type_hints(TeacherSpec)["spectrum"]) == ("isotropic", "two-level", "power-law")


def test_spec_hyperparameters_are_plain_data_and_reload_without_a_problem(tmp_path):
    module = TeacherRegression(TeacherSpec(16, 0.25, seed=2), lr=0.5)
    assert module.hparams["problem"] == dataclasses.asdict(TeacherSpec(16, 0.25, seed=2))
    trainer = pl.Trainer(max_steps=2, logger=False, accelerator="cpu", enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=TeacherDataModule(module.problem, batch_size=1))
    trainer.save_checkpoint(tmp_path / "spec.ckpt")
    loaded = TeacherRegression.load_from_checkpoint(tmp_path / "spec.ckpt", weights_only=True)
    assert torch.equal(loaded.problem.beta_star, module.problem.beta_star)
    assert torch.equal(loaded.model.u, module.model.u)


# ----------------------------------------------------------------------------- LightningCLI
def _cli_main():
    pytest.importorskip("jsonargparse", reason="LightningCLI needs the cli extra: pip install -e '.[cli]'")
    spec = importlib.util.spec_from_file_location("cli_main", ROOT / "lightning_examples" / "cli_main.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.fixture(autouse=True)
def _restore_lightning_seed_environment(monkeypatch):
    """The config's ``seed_everything`` writes PL_GLOBAL_SEED / PL_SEED_WORKERS into os.environ; undo it."""
    for var in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)


TINY = ["--model.problem.dim=64", "--trainer.max_steps=32", "--data.steps_per_epoch=32", "--data.val_size=8",
        "--trainer.enable_progress_bar=false", "--curvature_monitor.hutchinson_samples=2",
        "--curvature_monitor.power_iters=2"]


def test_yaml_config_trains_and_writes_measured_and_predicted_risk(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    main = _cli_main()
    monkeypatch.chdir(tmp_path)  # the config logs to runs/ under the working directory
    cli = main(["fit", "--config", str(CONFIG), *TINY])
    assert cli.trainer.global_step == 32
    run = tmp_path / "runs" / "sparse_regression_cli" / "version_0"
    (events,) = run.glob("events.out.tfevents.*")
    ea = EventAccumulator(str(events), size_guidance={"scalars": 0})
    ea.Reload()
    for tag in ("risk/measured", "risk/predicted", "curvature/measured", "curvature/hessian_trace"):
        assert [e.step for e in ea.Scalars(tag)] == list(range(33)), tag  # 32 // 32: every step, once
    measured, predicted = ea.Scalars("risk/measured")[-1].value, ea.Scalars("risk/predicted")[-1].value
    # d = 64, t = 0.5: the early descent is nearly deterministic; single runs with data seeds 0-3 stayed
    # within 0.12-0.38 % of the PDE over the whole run; 10 % only guards against a wrong batch or time scale.
    assert abs(measured - predicted) < 0.1 * predicted and measured < ea.Scalars("risk/measured")[0].value
    assert (run / "theory_monitor.png").exists() and (run / "config.yaml").exists()


def test_config_gives_the_teacher_once_and_the_data_batch_follows_the_optimizer(tmp_path, monkeypatch):
    main = _cli_main()
    monkeypatch.chdir(tmp_path)
    cli = main(["--config", str(CONFIG), *TINY, "--model.optimizer=svag", "--model.sgd_batch_size=3"], run=False)
    theory = next(cb for cb in cli.trainer.callbacks if isinstance(cb, TheoryMonitor))
    assert any(isinstance(cb, CurvatureMonitor) for cb in cli.trainer.callbacks)
    assert cli.model.problem is cli.datamodule.problem is theory.problem  # built once, shared
    assert cli.model.problem.dim == 64
    assert cli.datamodule.batch_size == 6  # SVAG: two minibatches of 3 per step
    assert cli.model.sgd_steps_per_step == 0.25


def test_config_errors_name_the_field(tmp_path, monkeypatch):
    """jsonargparse builds the TeacherSpec when it instantiates the module: the spec's own message surfaces."""
    main = _cli_main()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"density=0.1 with dim=3 gives round\(density \* dim\) = 0"):
        main(["--config", str(CONFIG), "--model.problem.dim=3", "--model.problem.density=0.1"], run=False)
