"""TheoryMonitor predicts the SGD the trainer runs: momentum, weight decay, schedulers (THEORY §7, issue 11)."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

from tb_events import scalars as _scalars
from sde_optim import DiagonalLinearNetwork, TeacherSpec
from sde_optim.lightning import TeacherDataModule, TheoryMonitor
from sde_optim.optim.schedules import make_scheduler
from sde_optim.theory import describe_sgd, predict

ROOT = Path(__file__).resolve().parents[1]


def _fit(root, module, monitor, *, max_steps, steps_per_epoch=1000, ckpt=None, extra=()):
    data = TeacherDataModule(module.problem, batch_size=module.loader_batch_size, seed=1, val_size=8,
                             steps_per_epoch=steps_per_epoch)
    trainer = pl.Trainer(max_steps=max_steps, logger=TensorBoardLogger(root, name="r", version=0),
                         callbacks=[monitor, *extra], accelerator="cpu", enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=bool(extra), limit_val_batches=0)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    return trainer


def test_main_example_with_momentum_and_cosine_predicts_that_sgd(tmp_path):
    """The main example with ``--lr 0.1 --momentum 0.9 --scheduler cosine``: the logged prediction is the
    PDE of that SGD (momentum factor 10, cosine schedule; computed here independently from a fresh
    torch.optim.SGD + CosineAnnealingLR), every point is marked as within the assumptions, and the one run
    follows it. Tolerance: at d = 256, t = 1.5 the single-run fluctuation of the risk is below 2 % (see
    test_lightning's plain-SGD version) and the E11 correction is O(1/((1 - mu) d)) = 4 %; accept 8 %."""
    spec = importlib.util.spec_from_file_location("ex", ROOT / "lightning_examples" / "sparse_regression.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with pytest.warns(RuntimeWarning, match="momentum 0.9 at d = 256"):  # E11's validity warning, with its size
        monitor = example.main(["--dim", "256", "--max-steps", "384", "--every-n-steps", "32", "--lr", "0.1",
                                "--momentum", "0.9", "--scheduler", "cosine", "--no-curvature-monitor",
                                "--logdir", str(tmp_path), "--accelerator", "cpu"])
    scalars = _scalars(tmp_path)
    steps = list(range(0, 385, 32))
    assert [s for s, _ in scalars["theory/assumptions_hold"]] == steps
    assert all(v == 1.0 for _, v in scalars["theory/assumptions_hold"])
    # the same SGD described independently: its PDE at the logged steps
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
    sgd, _ = describe_sgd(opt, [make_scheduler(opt, "cosine", 384)], steps=384, batch_size=1)
    assert sgd.momentum_factor == pytest.approx(10.0) and sgd.lr_at(192) == pytest.approx(0.05)
    model = DiagonalLinearNetwork(256, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = predict(monitor.problem, model, sgd=sgd, steps=384, observables=("risk", "curvature"))
    logged, scatter = dict(scalars["risk/predicted"]), dict(scalars["risk/scatter"])
    for s in steps:
        assert logged[s] == pytest.approx(expected.at_step(s)["risk"], rel=1e-5)
        assert scatter[s] == pytest.approx(expected.at_step(s)["risk_scatter"], rel=1e-5, abs=1e-9)
    assert 0.0 < max(scatter.values()) < 0.1  # one run's risk at d = 256: a few percent
    # momentum made the steps 10x larger: the predicted descent is far from plain SGD at lr 0.05
    plain = predict(monitor.problem, model, lr=0.1, steps=384, observables=("risk",))
    assert plain.curves["risk"][-1] / expected.curves["risk"][-1] > 1.02
    assert max(v for _, v in scalars["risk/rel_error"]) < 0.08


class _Module(pl.LightningModule):
    """A DLN on the teacher's stream with a given optimizer factory and optional schedulers."""

    sgd_global_batch_size = 2
    sgd_steps_per_step = 1.0

    def __init__(self, make_opt, make_sched=None):
        super().__init__()
        self.problem = TeacherSpec(32, 0.25).build()
        self.net = DiagonalLinearNetwork(32, dtype=torch.float32)
        self.make_opt, self.make_sched = make_opt, make_sched
        self.loader_batch_size = 2

    def training_step(self, batch, batch_idx):
        x, y = batch
        return 0.5 * (self.net(x) - y).pow(2).mean()

    def configure_optimizers(self):
        opt = self.make_opt(self.parameters())
        if self.make_sched is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": self.make_sched(opt)}


def test_an_optimizer_the_theory_does_not_model_is_refused_naming_the_supported_ones(tmp_path):
    module = _Module(lambda p: torch.optim.Adam(p, lr=1e-2))
    with pytest.raises(TypeError, match=r"torch\.optim\.SGD.*got Adam"):
        _fit(tmp_path, module, TheoryMonitor(module.problem, save_figure=False), max_steps=4)
    maximize = _Module(lambda p: torch.optim.SGD(p, lr=0.1, maximize=True))
    with pytest.raises(ValueError, match="maximize"):
        _fit(tmp_path / "m", maximize, TheoryMonitor(maximize.problem, save_figure=False), max_steps=4)


def test_an_epoch_scheduler_is_replayed_at_its_epoch_boundaries(tmp_path):
    """StepLR(step_size=1, gamma=0.5) stepped per epoch of 8 steps: the predicted lr halves at steps 8, 16, 24,
    and the monitor's check of the optimizer's actual lr at every measurement never finds a mismatch."""
    module = _Module(lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.5, weight_decay=1e-3),
                     lambda o: {"scheduler": torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
                                "interval": "epoch"})
    monitor = TheoryMonitor(module.problem, every_n_steps=2, save_figure=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="TheoryMonitor: at step")
        _fit(tmp_path, module, monitor, max_steps=32, steps_per_epoch=8)
    sgd = monitor._sgd
    assert [sgd.lr_at(k) for k in (0, 7, 8, 15, 16, 24, 31)] == [0.5, 0.5, 0.25, 0.25, 0.125, 0.0625, 0.0625]
    assert (sgd.momentum, sgd.weight_decay) == (0.5, 1e-3)
    assert all(monitor.history["assumptions_hold"])


class _SetLR(pl.Callback):
    """Changes the lr by hand after optimizer step ``at`` (what no replay can foresee)."""

    def __init__(self, at):
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            trainer.optimizers[0].param_groups[0]["lr"] = 5.0


def test_an_unforeseen_lr_change_is_warned_about_marked_and_left_out(tmp_path):
    """lr 0.5 -> 5 by hand after the measurement at step 8 (so steps 8.. run at 5): the change shows at the next
    measurement, step 12 (the state at step 8 is before it), and from there on the points are logged with
    theory/assumptions_hold = 0, drawn apart, left out of the summary's errors and of the departure test."""
    module = _Module(lambda p: torch.optim.SGD(p, lr=0.5))
    monitor = TheoryMonitor(module.problem, every_n_steps=4, save_figure=True)
    with pytest.warns(UserWarning, match=r"at step 12 the learning rate is 5, the prediction assumed 0.5"):
        _fit(tmp_path, module, monitor, max_steps=32, extra=[_SetLR(8)])
    hold = dict(_scalars(tmp_path)["theory/assumptions_hold"])
    assert [hold[s] for s in range(0, 33, 4)] == [1.0, 1.0, 1.0] + [0.0] * 6
    assert monitor.departure_step is None  # a run outside the assumptions is not judged against the prediction
    assert "6 measurement(s) from step 12 on had a learning rate the prediction did not assume" in monitor.summary()


def test_a_metric_driven_scheduler_is_warned_about(tmp_path):
    module = _Module(lambda p: torch.optim.SGD(p, lr=0.5),
                     lambda o: {"scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(o), "monitor": "train_loss"})
    module.training_step = lambda batch, i=0: _log_loss(module, batch)
    with pytest.warns(RuntimeWarning, match="ReduceLROnPlateau reacts to metrics.*assumes the current learning rate"):
        _fit(tmp_path, module, TheoryMonitor(module.problem, save_figure=False), max_steps=4, steps_per_epoch=2)


def _log_loss(module, batch):
    x, y = batch
    loss = 0.5 * (module.net(x) - y).pow(2).mean()
    module.log("train_loss", loss)
    return loss


def test_resume_with_a_longer_horizon_splices_the_schedule(tmp_path):
    """StepLR(8, 0.5) per step, with momentum: fit 16 steps, then resume to 32. The monitor keeps the 16 learning
    rates it described at the start and replays the restored scheduler (at step 16) for the rest; the result is
    the schedule of an uninterrupted 32-step run, and the optimizer's lr matches it at every measurement."""
    def module():
        return _Module(lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.5),
                       lambda o: {"scheduler": torch.optim.lr_scheduler.StepLR(o, step_size=8, gamma=0.5),
                                  "interval": "step"})

    first = TheoryMonitor(module().problem, every_n_steps=4, save_figure=False)
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_train_steps=16)
    _fit(tmp_path / "a", module(), first, max_steps=16, extra=[ck])
    resumed = TheoryMonitor(module().problem, every_n_steps=4, save_figure=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="TheoryMonitor: at step")
        _fit(tmp_path / "a", module(), resumed, max_steps=32, ckpt=str(tmp_path / "ck" / "last.ckpt"),
             extra=[ModelCheckpoint(dirpath=tmp_path / "ck2")])
    full = TheoryMonitor(module().problem, every_n_steps=4, save_figure=False)
    _fit(tmp_path / "b", module(), full, max_steps=32)
    assert torch.equal(resumed._sgd.lr_schedule(32), full._sgd.lr_schedule(32))
    assert full._sgd.lr_at(31) == 0.0625 and all(resumed.history["assumptions_hold"])
