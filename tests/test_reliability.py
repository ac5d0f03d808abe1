"""Exact resume, non-finite steps through Lightning, departure from the prediction, precision."""

from __future__ import annotations

import csv
import functools
import math
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from sde_optim import DiagonalLinearNetwork, NonFiniteUpdateError, TeacherProblem, measure, predict
from sde_optim.lightning import TheoryMonitor
from sde_optim.lightning.theory_monitor import DEPARTURES
from sde_optim.lightning import TeacherDataModule
from sde_optim.lightning import TeacherRegression
from sde_optim.simulation import simulate_sgd
from sde_optim.theory import Prediction

OPTIMIZERS = ("sgd", "homogenized", "svag")
STEPS_PER_EPOCH = 7
QUIET = dict(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False)


def _setup(optimizer: str, lr: float = 0.5, module_class=TeacherRegression, **module_kwargs):
    problem = TeacherProblem.sparse(32, 0.25, seed=0)
    module = module_class(problem, lr=lr, sgd_batch_size=2, optimizer=optimizer, **module_kwargs)
    data = TeacherDataModule(problem, batch_size=module.loader_batch_size, seed=1, val_size=16,
                             steps_per_epoch=STEPS_PER_EPOCH)
    return problem, module, data


def _trainer(max_steps: int, callbacks=(), logger=False, **kwargs) -> pl.Trainer:
    return pl.Trainer(max_steps=max_steps, logger=logger, callbacks=list(callbacks), enable_checkpointing=False,
                      num_sanity_val_steps=0, log_every_n_steps=1, **QUIET, **kwargs)


# ----------------------------------------------------------------------------- exact resume
def _fit(root: Path, optimizer: str, max_steps: int, version: int, ckpt=None, every_n_train_steps=None):
    """One fit with validation every epoch, a TheoryMonitor and a CSV log; returns (trainer, module)."""
    problem, module, data = _setup(optimizer, noise_seed=3)
    monitor = TheoryMonitor(problem, every_n_steps=3, method="gradient_flow", save_figure=False)
    callbacks = [monitor]
    if every_n_train_steps:
        callbacks.append(ModelCheckpoint(dirpath=root / "ck", save_last=True, every_n_train_steps=every_n_train_steps))
    trainer = pl.Trainer(max_steps=max_steps, logger=CSVLogger(root, name="log", version=version), callbacks=callbacks,
                         enable_checkpointing=bool(every_n_train_steps), num_sanity_val_steps=0, log_every_n_steps=1,
                         **QUIET)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    return trainer, module


def _curves(root: Path) -> dict[str, dict[int, str]]:
    """tag -> {step: value as written}; every (tag, step) must appear at most once over all versions."""
    out: dict[str, dict[int, str]] = {}
    for path in sorted(root.glob("log/version_*/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                for tag, value in row.items():
                    if tag not in ("step", "epoch") and value:
                        assert int(row["step"]) not in out.setdefault(tag, {}), (tag, row["step"])
                        out[tag][int(row["step"])] = value
    return out


def _optimizer_state(trainer: pl.Trainer) -> dict:
    state = trainer.optimizers[0].state_dict()
    extra = state.get("sde_optim", {})
    return {"state": state["state"], **{k: v for k, v in extra.items()}}


def _assert_same_state(a, b) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same_state(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


# "save_checkpoint": trainer.save_checkpoint after a fit that stopped at an epoch end (step 14 =
# 2 epochs of 7); "mid-epoch": ModelCheckpoint's last.ckpt written inside the second epoch (step 10).
@pytest.mark.parametrize("how, half", [("save_checkpoint", 2 * STEPS_PER_EPOCH), ("mid-epoch", 10)])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path, optimizer, how, half):
    full_trainer, full = _fit(tmp_path / "full", optimizer, 2 * half, version=0)
    if how == "save_checkpoint":
        first, _ = _fit(tmp_path / "split", optimizer, half, version=0)
        ckpt = tmp_path / "half.ckpt"
        first.save_checkpoint(ckpt)
    else:  # written by ModelCheckpoint inside on_train_batch_end, with the loops mid-epoch
        _fit(tmp_path / "split", optimizer, half, version=0, every_n_train_steps=half)
        ckpt = tmp_path / "split" / "ck" / "last.ckpt"
    torch.manual_seed(12345)  # the resumed process's global RNG differs: nothing may depend on it
    resumed_trainer, resumed = _fit(tmp_path / "split", optimizer, 2 * half, version=1, ckpt=ckpt)
    assert resumed_trainer.global_step == full_trainer.global_step == 2 * half
    assert all(torch.equal(p, q) for p, q in zip(full.parameters(), resumed.parameters()))
    _assert_same_state(_optimizer_state(full_trainer), _optimizer_state(resumed_trainer))
    full_curves, split_curves = _curves(tmp_path / "full"), _curves(tmp_path / "split")
    for tag in ("train/loss", "risk/measured", "risk/predicted", "curvature/measured"):
        assert split_curves[tag] == full_curves[tag], tag
    assert sorted(full_curves["train/loss"]) == list(range(2 * half))


def test_without_a_noise_seed_the_stream_follows_the_global_rng():
    """The root cause of the resume discrepancy once observed (~7e-3): two HomogenizedSGD fits in one
    process draw their noise seed from the global RNG, which the first fit has advanced. Resume itself
    restores the stream; comparing against another fit needs the same seed (noise_seed or seeding)."""
    seeds = []
    for noise_seed in (None, None, 7, 7):
        _, module, _ = _setup("homogenized", noise_seed=noise_seed)
        seeds.append(module.configure_optimizers()._seed)
    assert seeds[0] != seeds[1] and seeds[2] == seeds[3] == 7


# ----------------------------------------------------------------------------- non-finite steps
class _Poisoned(TeacherRegression):
    """Returns a non-finite loss (hence gradient) at optimizer step ``poison_step``."""

    poison_step, poison = 3, float("nan")

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * self.poison if self.trainer.global_step == self.poison_step else loss


class _Snapshots(pl.Callback):
    """Parameters and optimizer extra state before and after every optimizer step."""

    def __init__(self):
        self.before, self.after = {}, {}

    def _snap(self, trainer, module):
        opt = trainer.optimizers[0]
        gen = getattr(opt, "generator", None)
        return ([p.detach().clone() for p in module.parameters()], opt._steps,
                None if gen is None else gen.get_state())

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before[trainer.global_step] = self._snap(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.after[trainer.global_step - 1] = self._snap(trainer, module)


def _poisoned_fit(optimizer: str, poison: float, nonfinite: str, steps: int = 6):
    _, module, data = _setup(optimizer, module_class=_Poisoned, nonfinite=nonfinite, noise_seed=0)
    module.poison = poison
    snaps = _Snapshots()
    trainer = _trainer(steps, callbacks=[snaps], limit_val_batches=0)
    return trainer, module, data, snaps


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
@pytest.mark.parametrize("optimizer", ["homogenized", "svag"])
def test_nonfinite_step_is_skipped_and_counted_in_a_fit(optimizer, poison):
    trainer, module, data, snaps = _poisoned_fit(optimizer, poison, "skip")
    trainer.fit(module, datamodule=data)
    k = _Poisoned.poison_step
    params_before, _, _ = snaps.before[k]
    params_after, steps_after, _ = snaps.after[k]
    assert all(torch.equal(p, q) for p, q in zip(params_before, params_after))  # untouched
    assert steps_after == k + 1 and int(trainer.optimizers[0].skipped_steps) == 1
    assert all(bool(torch.isfinite(p).all()) for p in module.parameters())
    assert not torch.equal(snaps.after[k + 1][0][0], params_after[0])  # and training went on


@pytest.mark.parametrize("optimizer", ["homogenized", "svag"])
def test_nonfinite_step_raises_with_step_number_in_a_fit(optimizer):
    trainer, module, data, snaps = _poisoned_fit(optimizer, float("nan"), "raise")
    k = _Poisoned.poison_step
    with pytest.raises(NonFiniteUpdateError, match=f"at step {k + 1} "):
        trainer.fit(module, datamodule=data)
    params, steps, gen_state = snaps.before[k]
    opt = trainer.optimizers[0]
    assert all(torch.equal(p, q) for p, q in zip(params, module.parameters()))
    assert opt._steps == steps == k
    if gen_state is not None:
        assert torch.equal(opt.generator.get_state(), gen_state)  # the random stream is rewound too


def test_sgd_module_accepts_only_the_default_nonfinite_policy():
    with pytest.raises(ValueError, match="nonfinite"):
        TeacherRegression(TeacherProblem.sparse(8, 0.25), lr=0.1, optimizer="sgd", nonfinite="raise")


# ----------------------------------------------------------------------------- departure from the prediction
def _monitor_with(divergence_step, predicted=1.0):
    """A monitor holding a flat prediction (``nan`` after ``divergence_step``) and a measured R(0) = 1."""
    monitor = TheoryMonitor(TeacherProblem.sparse(8, 0.25), threshold=0.25, blowup_factor=100.0, save_figure=False)
    steps = torch.arange(0, 101)
    risk = torch.full((101,), predicted, dtype=torch.float64)
    if divergence_step is not None:
        risk[divergence_step:] = float("nan")
    monitor.prediction = Prediction(steps, steps / 8.0, {"risk": risk}, risk.clone(), divergence_step)
    monitor.history["risk/measured"] = [1.0]
    return monitor


@pytest.mark.parametrize(
    "divergence_step, sequence, step, departure",
    [
        (None, [(1.1, 1.0), (0.9, 1.0)], None, None),                     # within 25 %: no departure
        (None, [(1.1, 1.0), (2.0, 1.0), (50.0, 1.0)], 1, DEPARTURES[2]),  # left, finite, below blow-up
        (None, [(1.0, 1.0), (math.inf, 1.0)], 1, DEPARTURES[1]),          # blew up, prediction bounded
        (None, [(0.5, 1.0), (500.0, 1.0)], 0, DEPARTURES[1]),             # left first, diverged later
        (50, [(1.0, 1.0), (1.5, 1.0)], 1, DEPARTURES[0]),                 # above a diverging prediction
        (50, [(1.0, 1.0), (math.nan, math.nan)], 1, DEPARTURES[0]),       # both blew up
        (50, [(1.0, 1.0), (0.9, math.nan)], 1, DEPARTURES[2]),            # prediction blew up, training did not
        (50, [(0.5, 1.0), (1e3, math.nan)], 0, DEPARTURES[0]),            # left first, diverged as predicted
    ],
)
def test_departure_is_classified(divergence_step, sequence, step, departure):
    monitor = _monitor_with(divergence_step)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k, (measured, predicted) in enumerate(sequence):
            monitor._check_departure(k, measured, predicted)
    assert (monitor.departure_step, monitor.departure) == (step, departure)
    assert bool(caught) == (departure is not None)  # a departure is announced, following is silent




@pytest.mark.parametrize("scatter, departs, allowed", [(None, True, "25%"), (math.nan, True, "25%"), (0.02, True, "25%"),
                                                      (0.1, True, "50% (5 x one run's scatter at d = 8)"),
                                                      (0.2, False, None)])
def test_departure_allows_for_one_runs_scatter(scatter, departs, allowed):
    """The allowance is ``max(threshold, scatter_sigmas x risk/scatter)``: a run 60 % off a prediction whose one-run
    scatter is 20 % is within its own noise; at 10 % it has left (and the warning says by how much it was allowed)."""
    monitor = _monitor_with(None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor._check_departure(3, 1.6, 1.0, scatter)
    assert (monitor.departure_step is not None) == departs
    assert [str(w.message) for w in caught] == ([] if not departs else [
        f"TheoryMonitor: at step 3 the measured risk 1.6 is more than {allowed} away from the predicted 1: {DEPARTURES[2]}"])


def test_summary_gives_the_largest_error_in_scatters():
    """The summary's last column: max over measurements of rel_error / scatter (the point at t = 0 has scatter 0 and
    is left out); '-' for an observable without a scatter (e.g. method 'particles')."""
    monitor = _monitor_with(None)
    monitor.history = {"step": [0, 10, 20], "risk/measured": [1.0, 1.2, 0.5], "risk/predicted": [1.0, 1.0, 0.6],
                       "risk/rel_error": [0.0, 0.2, 1 / 6], "risk/scatter": [0.0, 0.1, 0.05],
                       "curvature/measured": [1.0, 1.0, 1.0], "curvature/predicted": [1.0, 1.0, 1.1],
                       "curvature/rel_error": [0.0, 0.0, 1 / 11]}
    rows = {line.split()[0]: line.split() for line in monitor.summary().splitlines()[3:5]}
    assert rows["risk"][-2:] == ["20.00%", "3.3"] and rows["curvature"][-2:] == ["9.09%", "-"]


def test_plain_sgd_at_small_d_does_not_leave_the_prediction():
    """Plain SGD, which the prediction describes up to its finite-d noise: 64 runs at d = 64 (sparse teacher, alpha 0.5,
    lr 0.5, B = 2, t <= 8), 33 measurements each. A fixed 25 % threshold called 80 % of them departures (256 runs:
    80 %); the scatter-aware allowance 4 % (256 runs). Bounds from the binomial error of 64 runs (se <= 6.3 %): at
    least 50 % (old rule, > 4 se below 80 %) and at most 15 % (new rule, > 4 se above 4 %)."""
    d = 64
    problem = TeacherProblem.sparse(d, 0.25, seed=0)
    model = DiagonalLinearNetwork(d, alpha=0.5, dtype=torch.float64)
    pred = predict(problem, model, lr=0.5, batch_size=2, steps=8 * d)
    steps = torch.linspace(0, 8 * d, 33).round().long()
    runs = simulate_sgd(problem, model, lr=0.5, batch_size=2, record_steps=steps, num_runs=64,
                        generator=torch.Generator().manual_seed(1))
    at = pred.at_step(steps.to(torch.float64))
    rel = ((runs.values["risk"].to(torch.float64) - at["risk"]) / at["risk"]).abs()
    monitor = TheoryMonitor(problem)
    allowed = torch.tensor([monitor.allowance(float(s)) for s in at["risk_scatter"]], dtype=torch.float64)
    fixed = float((rel > monitor.threshold).any(1).double().mean())
    aware = float((rel > allowed).any(1).double().mean())
    assert fixed >= 0.5 and aware <= 0.15, (fixed, aware)


@pytest.mark.parametrize("lr, monitor_lr, departure", [(40.0, None, DEPARTURES[1]), (0.5, 8.0, DEPARTURES[2])])
def test_departure_in_a_fit(lr, monitor_lr, departure):
    """Gradient-flow predictions never diverge. lr=40 (B=2, d=32) blows SGD up within a few steps:
    diverged against the prediction. A monitor told lr=8 while training runs at 0.5 predicts a far
    faster descent: training stays finite and leaves it."""
    problem, module, data = _setup("sgd", lr=lr)
    monitor = TheoryMonitor(problem, every_n_steps=5, method="gradient_flow", lr=monitor_lr, save_figure=False)
    with pytest.warns(UserWarning, match=departure):
        _trainer(60, callbacks=[monitor], limit_val_batches=0).fit(module, datamodule=data)
    assert monitor.departure == departure and monitor.departure_step > 0


# ----------------------------------------------------------------------------- precision
class _BatchDtype(pl.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.dtype = batch[0].dtype


def _risk_after_fit(optimizer: str, dtype: torch.dtype, precision: str) -> tuple[float, torch.dtype, TheoryMonitor]:
    problem, module, data = _setup(optimizer, dtype=dtype, noise_seed=0)
    monitor, seen = TheoryMonitor(problem, every_n_steps=20, method="gradient_flow", save_figure=False), _BatchDtype()
    _trainer(60, callbacks=[monitor, seen], precision=precision, limit_val_batches=0).fit(module, datamodule=data)
    assert seen.dtype == module.model.u.dtype  # the data module follows the parameters' dtype
    assert monitor.prediction.curves["risk"].dtype == torch.float64  # the theory stays in float64
    return float(measure(problem, module.model)["risk"]), module.model.u.dtype, monitor


@functools.lru_cache(maxsize=None)
def _float32_risk(optimizer: str) -> float:
    return _risk_after_fit(optimizer, torch.float32, "32-true")[0]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("dtype, precision, param_dtype", [
    (torch.bfloat16, "32-true", torch.bfloat16),
    (torch.float16, "32-true", torch.float16),
    (torch.float32, "bf16-mixed", torch.float32),
    (torch.float32, "bf16-true", torch.bfloat16),
])
def test_low_precision_training_follows_float32(optimizer, dtype, precision, param_dtype):
    """60 steps at d = 32 from R(0) = 0.125; float32 and low precision see the same data and noise
    streams (drawn in the working dtype, so equal up to rounding). Measured: the final risks differ
    by at most 0.36 % (sgd in bf16/fp16; bf16-mixed < 0.01 %); accept 2 %."""
    reference = _float32_risk(optimizer)
    risk, got_dtype, _ = _risk_after_fit(optimizer, dtype, precision)
    assert got_dtype == param_dtype
    assert math.isfinite(risk) and risk < 0.125
    assert abs(risk - reference) < 0.02 * reference
