"""TheoryMonitor and the main example: measured vs predicted in TensorBoard (the CLI: test_cli.py)."""

from __future__ import annotations

import glob
import importlib.util
import math
import os
import re
import warnings
from pathlib import Path

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from tb_events import scalars as _scalars
from sde_optim import SVAG, DiagonalLinearNetwork, TeacherProblem, TeacherSpec
from sde_optim.lightning import CurvatureMonitor, TeacherDataModule, TeacherRegression, TheoryMonitor
from sde_optim.plotting import SCATTER_LABEL
from sde_optim.theory import SGDConfig

ROOT = Path(__file__).resolve().parents[1]


def _load_example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "lightning_examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _assert_real_plot(path):
    assert os.path.getsize(path) > 20_000  # a blank 1000x400 PNG compresses to a few kB
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
    assert float(img[..., :3].std()) > 0.05  # lines and text, not a blank canvas


def test_main_example_logs_measured_and_predicted(tmp_path):
    """d = 256, 384 SGD steps (t = 1.5), one run: the early phase is nearly deterministic, the
    single-run fluctuation of the risk at this size and time is below 2 % (measured over 8
    seeds: max 0.9 %) and the PDE agrees with the seed mean to ~1 %; accept 5 %. Curvature
    starts exactly at the prediction and moves ~20 % by t = 1.5: accept 5 % as well."""
    example = _load_example("sparse_regression")
    monitor = example.main(["--dim", "256", "--max-steps", "384", "--every-n-steps", "32",
                            "--logdir", str(tmp_path), "--accelerator", "cpu"])
    scalars = _scalars(tmp_path)
    for name in ("risk", "curvature"):
        for kind in ("measured", "predicted", "rel_error"):
            tag = f"{name}/{kind}"
            steps = [s for s, _ in scalars[tag]]
            assert steps == list(range(0, 385, 32)), tag
            assert all(math.isfinite(v) for _, v in scalars[tag])
        assert max(v for _, v in scalars[f"{name}/rel_error"]) < 0.05
    for tag in ("curvature/hessian_trace", "curvature/hessian_trace_stderr", "curvature/top_eigenvalue"):
        assert [s for s, _ in scalars[tag]] == list(range(0, 385, 32)), tag  # TheoryMonitor's steps, once each
    _assert_real_plot(monitor.figure_path)
    fig = monitor.figure()  # the prediction's one-run scatter as a band around it, in every panel
    assert all(any(c.get_label() == SCATTER_LABEL for c in ax.collections) for ax in fig.axes)
    plt.close(fig)
    _assert_hutchinson_follows_the_exact_curvature(scalars)


def _assert_hutchinson_follows_the_exact_curvature(scalars) -> float:
    """Hutchinson's trace of the population loss is an unbiased estimate of the E7 curvature measured
    at the same step. A single estimate from 16 probes has a noisy standard error of its own, so test
    the mean deviation over the n independent checks: its standard error is sqrt(mean(se^2) / n);
    accept 4 of them. Returns the relative difference of the two means over the run."""
    trace, se = dict(scalars["curvature/hessian_trace"]), dict(scalars["curvature/hessian_trace_stderr"])
    measured = dict(scalars["curvature/measured"])
    assert sorted(trace) == sorted(measured)  # the same steps
    devs = [trace[s] - measured[s] for s in trace]
    mean_se = math.sqrt(sum(se[s] ** 2 for s in trace) / len(trace) / len(trace))
    assert abs(sum(devs) / len(devs)) < 4 * mean_se
    return abs(sum(trace.values()) - sum(measured.values())) / sum(measured.values())


def _readme_lightning_snippet() -> str:
    section = (ROOT / "README.md").read_text().split("\n## Lightning\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def _readme_tag_scheme() -> list[str]:
    """The tags in the first column of the README's tag table (Lightning section)."""
    section = (ROOT / "README.md").read_text().split("\n## Lightning\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [tag for row in rows for tag in re.findall(r"`([^`]+)`", row.split("|")[1])]


def test_readme_lightning_snippet_as_written(tmp_path, monkeypatch):
    """The README's Lightning snippet, executed verbatim in an empty folder: one version folder with one
    event file; every monitor tag written once per step at 0, n, 2n, ... (the same steps for both
    monitors); the Hutchinson trace follows the exact curvature (mean deviation within 4 of its
    standard errors, and the run means within 10 % of each other; measured on this snippet: 0.15
    standard errors, 0.5 %); and the tags are exactly the README's scheme."""
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme_snippet"}
    exec(compile(_readme_lightning_snippet(), str(ROOT / "README.md"), "exec"), namespace)
    trainer = namespace["trainer"]
    versions = sorted(p.name for p in (tmp_path / "lightning_logs").iterdir())
    assert versions == ["version_0"]
    assert len(glob.glob(str(tmp_path / "lightning_logs" / "version_0" / "events.out.tfevents.*"))) == 1
    scalars = _scalars(tmp_path / "lightning_logs")
    theory = next(cb for cb in trainer.callbacks if isinstance(cb, TheoryMonitor))
    every = theory.cadence(trainer)
    expected_steps = list(range(0, trainer.max_steps + 1, every))
    assert len(expected_steps) >= 17
    ours = [tag for tag in scalars if tag.split("/")[0] in theory.observables]
    for tag in ours:
        assert [s for s, _ in scalars[tag]] == expected_steps, tag  # each step once, both monitors alike
    assert _assert_hutchinson_follows_the_exact_curvature(scalars) < 0.10
    scheme = _readme_tag_scheme()
    documented = {t.replace("{observable}", o) for t in scheme for o in theory.observables}
    lightning_own = {"epoch", "hp_metric"}
    assert set(scalars) - lightning_own == documented


def test_curvature_chart_overlays_exact_predicted_and_hutchinson(tmp_path):
    monitors = [TheoryMonitor(TeacherSpec(32, 0.25), method="gradient_flow", save_figure=False),
                CurvatureMonitor(hutchinson_samples=2, power_iters=2)]
    _tiny_fit(tmp_path, monitors, max_steps=8)
    charts = _layout_charts(tmp_path)
    assert charts == {"risk": ["risk/measured", "risk/predicted"],
                      "curvature": ["curvature/measured", "curvature/predicted", "curvature/hessian_trace"]}
    _tiny_fit(tmp_path / "alone", [CurvatureMonitor(hutchinson_samples=2, power_iters=2)], max_steps=8)
    assert _layout_charts(tmp_path / "alone") == {}  # nothing to overlay without the exact curvature


def _layout_charts(logdir) -> dict[str, list[str]]:
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.util import tensor_util

    charts = {}
    for path in glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True):
        ea = EventAccumulator(path, size_guidance={"tensors": 0})
        ea.Reload()
        if "custom_scalars__config__" not in ea.Tags()["tensors"]:
            continue
        events = ea.Tensors("custom_scalars__config__")
        assert len(events) == 1  # one layout, written once
        layout = layout_pb2.Layout()
        layout.ParseFromString(tensor_util.make_ndarray(events[0].tensor_proto).item())
        for category in layout.category:
            charts.update({c.title: list(c.multiline.tag) for c in category.chart})
    return charts


def _tiny_fit(root, callbacks, *, max_steps, module=None, problem=None, **trainer_kwargs):
    """A TeacherRegression fit at d = 32 with a TensorBoard logger in ``root``; returns the trainer."""
    problem = problem or TeacherSpec(32, 0.25).build()
    module = module or TeacherRegression(problem, lr=0.5, sgd_batch_size=2)
    data = TeacherDataModule(problem, batch_size=getattr(module, "loader_batch_size", 2), seed=1, val_size=8)
    trainer = pl.Trainer(max_steps=max_steps, logger=TensorBoardLogger(root, name="r"), callbacks=callbacks,
                         accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, limit_val_batches=0, **trainer_kwargs)
    trainer.fit(module, datamodule=data)
    return trainer


def _fit(tmp_path, max_steps, ckpt=None, version=0):
    problem = TeacherProblem.sparse(128, 0.1, seed=0)
    module = TeacherRegression(problem, lr=0.5, sgd_batch_size=2)
    data = TeacherDataModule(problem, batch_size=2, seed=1, val_size=64, steps_per_epoch=40)
    monitor = TheoryMonitor(problem, every_n_steps=16, save_figure=False)
    trainer = pl.Trainer(max_steps=max_steps, logger=TensorBoardLogger(tmp_path, name="r", version=version),
                         callbacks=[monitor, ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_train_steps=48)],
                         accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    return monitor, module


def test_resume_continues_logging_without_gaps_or_duplicates(tmp_path):
    full, full_module = _fit(tmp_path / "full", 96)
    first, _ = _fit(tmp_path / "resumed", 48)
    resumed, resumed_module = _fit(tmp_path / "resumed", 96, ckpt=str(tmp_path / "resumed" / "ck" / "last.ckpt"))
    assert resumed.history["step"] == list(range(0, 97, 16))
    steps = sorted(s for s, _ in _scalars(tmp_path / "resumed")["risk/measured"])
    assert steps == list(range(0, 97, 16))  # both event files together: every point exactly once
    # the prediction was restored, not recomputed from the mid-run state
    assert torch.equal(resumed.prediction.curves["risk"], full.prediction.curves["risk"])
    # and training itself continued on the same data stream
    assert resumed.history["risk/measured"] == full.history["risk/measured"]


def test_monitor_warns_when_divergence_is_predicted(tmp_path):
    problem = TeacherProblem.sparse(64, 0.25, seed=0)
    module = TeacherRegression(problem, lr=20.0, sgd_batch_size=1)  # predicted critical lr here: 17.7 (10.1 unchecked)
    data = TeacherDataModule(problem, batch_size=1, val_size=16)
    monitor = TheoryMonitor(problem, every_n_steps=64, save_figure=False)
    trainer = pl.Trainer(max_steps=640, logger=False, callbacks=[monitor], accelerator="cpu", enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=data)
    messages = [str(w.message) for w in caught]
    assert any("predicts that the risk diverges" in m and "critical lr" in m for m in messages), messages
    assert monitor.prediction.divergence_step is not None


def test_monitor_rejects_bad_arguments():
    problem = TeacherProblem.sparse(8, 0.25)
    with pytest.raises(ValueError, match="every_n_steps"):
        TheoryMonitor(problem, every_n_steps=0)
    with pytest.raises(ValueError, match="observables"):
        TheoryMonitor(problem, observables=["risk", "entropy"])
    with pytest.raises(TypeError, match="problem"):
        TheoryMonitor("problem")


# ----------------------------------------------------------------------------- streamed validation
def test_validation_set_is_generated_batch_by_batch_in_the_modules_dtype(tmp_path):
    """Memory O(val_batch_size * d): the default batch holds at most 2**22 numbers, and nothing of
    size val_size * d exists; the same samples every pass; float32 batches for a float32 module."""
    problem = TeacherSpec(1 << 16, 0.1).build()  # float64 teacher
    data = TeacherDataModule(problem, batch_size=1, val_size=200)
    assert data.val_batch_size == 64  # 2**22 // 2**16
    loader = data.val_dataloader()
    assert not any(isinstance(v, torch.Tensor) and v.numel() > problem.dim for v in vars(loader.dataset).values())
    sizes = [x.shape[0] for x, _ in loader]
    assert sizes == [64, 64, 64, 8]
    first, again = next(iter(loader)), next(iter(data.val_dataloader()))
    assert torch.equal(first[0], again[0]) and first[0].dtype == torch.float64  # outside a trainer: the problem's

    class Seen(pl.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            self.dtype = batch[0].dtype

    seen, small = Seen(), TeacherSpec(64, 0.25).build()
    pl.Trainer(max_steps=2, logger=False, callbacks=[seen], accelerator="cpu", enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
               default_root_dir=tmp_path).fit(TeacherRegression(small, lr=0.5),
                                              datamodule=TeacherDataModule(small, batch_size=1, val_size=8,
                                                                           steps_per_epoch=2))
    assert seen.dtype == torch.float32


# ----------------------------------------------------------------------------- batch and time, declared once
class _OwnModule(pl.LightningModule):
    """A user's own module: a DLN trained with SGD on (x, y) batches; ``attrs`` become attributes."""

    def __init__(self, dim, optimizer="sgd", **attrs):
        super().__init__()
        self.net = DiagonalLinearNetwork(dim, dtype=torch.float32)
        self.optimizer_kind = optimizer
        for name, value in attrs.items():
            setattr(self, name, value)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return 0.5 * (self.net(x) - y).pow(2).mean()

    def configure_optimizers(self):
        if self.optimizer_kind == "svag":
            return SVAG(self.parameters(), lr=0.5, l=2)
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _own_fit(module, monitor, max_steps=4):
    problem = TeacherSpec(32, 0.25).build()
    x, y = problem.sample(64, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(x.float(), y.float()), batch_size=4)
    pl.Trainer(max_steps=max_steps, logger=False, callbacks=[monitor], accelerator="cpu", enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(module, train_dataloaders=loader)
    return monitor


def _monitor(**kwargs):
    return TheoryMonitor(TeacherSpec(32, 0.25), method="gradient_flow", save_figure=False, **kwargs)


def test_batch_and_time_come_from_the_argument_else_the_module_attributes():
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="TheoryMonitor guessed")  # no guessing either way
        declared = _own_fit(_OwnModule(32, sgd_global_batch_size=8, sgd_steps_per_step=0.5), _monitor())
        assert (declared._batch_used, declared._time_per_step) == (8, 0.5)
        assert int(declared.prediction.steps[-1]) == 2  # 4 optimizer steps of half an SGD step each
        argument = _own_fit(_OwnModule(32, sgd_global_batch_size=8, sgd_steps_per_step=0.5),
                            _monitor(batch_size=3, sgd_steps_per_step=1.0))
        assert (argument._batch_used, argument._time_per_step) == (3, 1.0)


def test_a_module_that_declares_nothing_gets_an_error_naming_both_ways():
    with pytest.raises(ValueError, match=r"TheoryMonitor\(batch_size=\.\.\.\).*sgd_global_batch_size"):
        _own_fit(_OwnModule(32, sgd_steps_per_step=1.0), _monitor())
    with pytest.raises(ValueError, match=r"_OwnModule\.sgd_global_batch_size must be an integer >= 1"):
        _own_fit(_OwnModule(32, sgd_global_batch_size=0, sgd_steps_per_step=1.0), _monitor())


def test_the_old_guess_still_works_for_one_release_with_a_future_warning():
    """Release 0.1 read a per-process ``sgd_batch_size`` (times the world size) and 1 / l under SVAG."""
    with pytest.warns(FutureWarning, match="guessed batch size 3 from the module's sgd_batch_size x world size .*"
                                           "and 0.5 SGD steps per optimizer step from the optimizer's type"):
        old = _own_fit(_OwnModule(32, optimizer="svag", sgd_batch_size=3), _monitor())
    assert (old._batch_used, old._time_per_step) == (3, 0.5)


@pytest.mark.parametrize("optimizer, batch, per_step", [("sgd", 2, 1.0), ("homogenized", 2, 1.0), ("svag", 2, 0.25)])
def test_teacher_regression_declares_what_the_monitor_reads(tmp_path, optimizer, batch, per_step):
    module = TeacherRegression(TeacherSpec(32, 0.25), lr=0.5, sgd_batch_size=2, optimizer=optimizer)
    monitor = _monitor()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="TheoryMonitor guessed")
        warnings.filterwarnings("error", message="TheoryMonitor (predicts|counts)")
        _tiny_fit(tmp_path, [monitor], max_steps=4, module=module)
    assert (monitor._batch_used, monitor._time_per_step) == (batch, per_step)
    assert module.sgd_global_batch_size == batch and module.sgd_steps_per_step == per_step
    with pytest.warns(DeprecationWarning, match="sgd_global_batch_size"):
        assert module.global_batch_size == batch


def test_teacher_regression_draws_homogenized_noise_with_the_chosen_increments(tmp_path):
    """increments="rademacher" reaches HomogenizedSGD's noise model (the cheaper draws on a CPU), is kept in
    the hyperparameters (so a checkpoint rebuilds it), and is refused with the optimizers that draw no noise."""
    module = TeacherRegression(TeacherSpec(32, 0.25), lr=0.5, sgd_batch_size=2, optimizer="homogenized",
                               increments="rademacher", noise_seed=0)
    trainer = _tiny_fit(tmp_path, [], max_steps=4, module=module)
    opt = trainer.optimizers[0]
    assert opt.noise.increments == "rademacher" and module.hparams["increments"] == "rademacher"
    assert bool(torch.isfinite(module.model.beta).all())
    assert TeacherRegression(TeacherSpec(32, 0.25), lr=0.5, optimizer="homogenized").increments == "gaussian"
    with pytest.raises(ValueError, match="increments applies to optimizer 'homogenized'"):
        TeacherRegression(TeacherSpec(32, 0.25), lr=0.5, optimizer="sgd", increments="rademacher")
    with pytest.raises(ValueError, match="increments"):
        TeacherRegression(TeacherSpec(32, 0.25), lr=0.5, optimizer="homogenized", increments="uniform")


def test_a_declared_batch_that_contradicts_the_optimizer_is_warned_about(tmp_path):
    module = TeacherRegression(TeacherSpec(32, 0.25), lr=0.5, sgd_batch_size=2, optimizer="homogenized")
    with pytest.warns(UserWarning, match="predicts SGD with batch 5, but HomogenizedSGD simulates batch 2"):
        _tiny_fit(tmp_path, [_monitor(batch_size=5)], max_steps=2, module=module)


# ----------------------------------------------------------------------------- cadence
def test_default_cadence_gives_about_32_measurements_and_monitors_share_steps(tmp_path):
    alone = _monitor()
    _tiny_fit(tmp_path / "a", [alone], max_steps=64)
    assert alone.history["step"] == list(range(0, 65, 2))  # 64 // 32
    theory, curv = _monitor(), CurvatureMonitor(every_n_steps=16, hutchinson_samples=2, power_iters=2)
    _tiny_fit(tmp_path / "b", [theory, curv], max_steps=64)
    assert theory.history["step"] == [0, 16, 32, 48, 64]  # takes the other monitor's explicit cadence
    assert [s for s, _ in _scalars(tmp_path / "b")["curvature/hessian_trace"]] == [0, 16, 32, 48, 64]


def test_too_few_measurements_are_warned_about_and_flagged_in_the_summary(tmp_path):
    monitor = _monitor(every_n_steps=40)
    with pytest.warns(UserWarning, match=r"TheoryMonitor\(every_n_steps=40\) measures only 2 time\(s\) in 64 steps"):
        _tiny_fit(tmp_path, [monitor], max_steps=64)
    assert monitor.history["step"] == [0, 40]
    assert "2 measurement(s)" in monitor.summary() and "only 2 measurement(s)" in monitor.summary()
    enough = _monitor()
    _tiny_fit(tmp_path / "ok", [enough], max_steps=64)
    assert "33 measurement(s)" in enough.summary() and "only" not in enough.summary()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_main_example_on_gpu(tmp_path):
    example = _load_example("sparse_regression")
    monitor = example.main(["--dim", "1024", "--max-steps", "512", "--every-n-steps", "128",
                            "--logdir", str(tmp_path), "--accelerator", "gpu", "--devices", "1"])
    assert max(monitor.history["risk/rel_error"]) < 0.05
    _assert_real_plot(monitor.figure_path)


@pytest.mark.parametrize("name", ["sparse_regression", "compare_optimizers", "lr_sweep", "general_model", "plain_loop"])
def test_every_example_has_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        _load_example(name).main(["--help"])
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["sparse_regression", "general_model", "plain_loop"])
def test_example_help_gives_every_flag_a_text_and_its_default(name, capsys):
    example = _load_example(name)
    with pytest.raises(SystemExit):
        example.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for action in example.parser()._actions:
        if action.dest in ("help", "version"):
            continue
        assert action.help, action.option_strings
        assert f"{action.option_strings[-1]}" in text and f"(default: {action.default})" in text, action.dest
    with pytest.raises(SystemExit) as exc:
        example.main(["--version"])
    assert exc.value.code == 0 and "sde-optim" in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["--dim", "3", "--density", "0.1"], "density=0.1 with dim=3"),
    (["--dim", "0"], "dim must be an integer >= 1"),
    (["--lr", "-1"], "lr must be > 0.0"),
    (["--every-n-steps", "0"], "every_n_steps must be an integer >= 1"),
    (["--val-size", "0"], "val_size must be an integer >= 1"),
    (["--max-steps", "0"], "--max-steps must be an integer >= 1"),
])
def test_main_example_refuses_bad_arguments_before_training(argv, words, capsys):
    with pytest.raises(SystemExit) as exc:
        _load_example("sparse_regression").main(argv)
    assert exc.value.code == 2
    assert words in capsys.readouterr().err


def test_a_resumed_prediction_keeps_each_spans_effective_step_when_the_momentum_differs():
    """The stored SGD's lr for the steps already taken, then the trainer's: with another momentum in the second span
    (a momentum changed on resume, or a scheduler's cycle written at a different largest momentum by describe_sgd),
    the first span's lr was read at the second's momentum (here 2x its effective step)."""
    monitor = TheoryMonitor(TeacherProblem.sparse(16, 0.25, seed=0), save_figure=False)
    monitor._sgd, monitor._sgd_horizon, monitor._time_per_step = SGDConfig(lr=0.1, momentum=0.9), 10, 1.0
    later = SGDConfig(lr=torch.full((6,), 0.2, dtype=torch.float64), momentum=0.95)
    monitor._describe = lambda trainer, steps, batch: later
    trainer = type("Trainer", (), {"global_step": 4})()
    sgd = monitor._extended(trainer, 10, 1)
    effective = sgd.lr_schedule(10) * sgd.momentum_factor
    torch.testing.assert_close(effective, torch.tensor([1.0] * 4 + [4.0] * 6, dtype=torch.float64))


def test_a_resumed_prediction_keeps_each_spans_batch_size_and_says_when_the_weight_decay_changed():
    """The join of the two spans took the trainer's batch size for the steps already taken too (here 2x their noise
    factor gamma^2 / B, E10), and the new weight decay for both without a word (kappa = d lr_eff wd takes one)."""
    monitor = TheoryMonitor(TeacherProblem.sparse(16, 0.25, seed=0), save_figure=False)
    monitor._sgd, monitor._sgd_horizon, monitor._time_per_step = SGDConfig(lr=0.1, batch_size=2), 10, 1.0
    later = SGDConfig(lr=0.1, batch_size=4, weight_decay=1e-3)
    monitor._describe = lambda trainer, steps, batch: later
    trainer = type("Trainer", (), {"global_step": 4})()
    with pytest.warns(UserWarning, match=r"weight decay changed on resume \(0 -> 0.001\).* 4 SGD steps already taken"):
        sgd = monitor._extended(trainer, 10, 4)
    torch.testing.assert_close(sgd.batch_schedule(10), torch.tensor([2.0] * 4 + [4.0] * 6, dtype=torch.float64))
    torch.testing.assert_close(sgd.lr_schedule(10), torch.full((10,), 0.1, dtype=torch.float64))
