"""Distributed data parallel: 2 CPU processes (gloo) through Lightning's ``strategy="ddp"`` and
``"ddp_spawn"``.

Lightning's DDP launcher re-runs the launching script for the other ranks, which cannot be
pytest itself, so the test starts *this file* as a script in a subprocess (``__main__``
below). The script fits TeacherRegression with each optimizer on 2 ranks whose global torch
RNGs are seeded differently on purpose (so identical noise must come from the broadcast,
not from luck), and every rank saves what the assertions need. ``ddp_spawn`` pickles the
trainer, the module, the data module and the callbacks into spawned processes: the main
example runs that way in a subprocess of its own.

Subprocesses get this checkout first on ``PYTHONPATH``, so they test this working tree even
where another checkout of the package is installed.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
OPTIMIZERS = ("sgd", "homogenized", "svag")
STEPS, EVERY, WORLD, PER_RANK_BATCH = 12, 3, 2, 2


# ----------------------------------------------------------------------------- the worker script
def _recorder(record: dict):
    import pytorch_lightning as pl

    class Recorder(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            record.setdefault("first_x", batch[0][0].clone())

        def on_train_end(self, trainer, pl_module):
            opt = trainer.optimizers[0]
            record.update(params=[p.detach().clone() for p in pl_module.parameters()],
                          global_batch=pl_module.sgd_global_batch_size, rank=trainer.global_rank)
            if hasattr(opt, "generator"):
                record.update(seed=opt._seed, generator=opt.generator.get_state(), opt_batch=opt.batch_size)

    return Recorder()


def _fit(out: Path, optimizer: str) -> dict:
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger
    from pytorch_lightning.strategies import DDPStrategy

    from sde_optim import TeacherProblem
    from sde_optim.lightning import CurvatureMonitor, TheoryMonitor
    from sde_optim.lightning import TeacherDataModule
    from sde_optim.lightning import TeacherRegression

    problem = TeacherProblem.sparse(32, 0.25, seed=0)
    module = TeacherRegression(problem, lr=0.5, sgd_batch_size=PER_RANK_BATCH, optimizer=optimizer)
    data = TeacherDataModule(problem, batch_size=module.loader_batch_size, seed=1, val_size=8, steps_per_epoch=5)
    theory = TheoryMonitor(problem, every_n_steps=EVERY, method="gradient_flow", save_figure=False)
    record: dict = {}
    callbacks = [theory, CurvatureMonitor(every_n_steps=EVERY, probe_batch=2, hutchinson_samples=2, power_iters=2),
                 _recorder(record)]
    trainer = pl.Trainer(strategy=DDPStrategy(process_group_backend="gloo"), accelerator="cpu", devices=WORLD,
                         max_steps=STEPS, log_every_n_steps=EVERY, logger=CSVLogger(out, name=optimizer, version=0),
                         callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    record.update(monitor_batch=theory._batch_used, prediction=theory.prediction.curves["risk"])
    return record


def _empirical_noise_steps(rank: int) -> list[torch.Tensor]:
    """Three HomogenizedSGD(EmpiricalNoise) steps on a small MLP with rank-local batches, gradients
    averaged as DDP would; different seeds per rank. Returns the parameters."""
    from sde_optim import EmpiricalNoise, HomogenizedSGD
    from sde_optim.optim._dist import all_reduce_mean_

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = HomogenizedSGD(model.parameters(), lr=0.1, batch_size=2, noise=EmpiricalNoise(model), seed=rank)
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(3):
        x, y = torch.randn(4, 3, generator=gen), torch.randn(4, 1, generator=gen)
        opt.zero_grad()
        (0.5 * (model(x) - y).pow(2).sum(1).mean()).backward()
        all_reduce_mean_([p.grad for p in model.parameters()])
        opt.set_batch(x, y)
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _worker(out: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    records = {}
    for optimizer in OPTIMIZERS:
        torch.manual_seed(1000 + rank)  # deliberately different global RNGs on the two ranks
        records[optimizer] = _fit(out, optimizer)
    records["empirical"] = _empirical_noise_steps(rank) if torch.distributed.is_initialized() else None
    torch.save(records, out / f"rank{records['sgd']['rank']}.pt")
    if torch.distributed.is_initialized():
        # Lightning destroys only NCCL groups at exit; an undestroyed gloo group can abort the process
        # during interpreter shutdown ("terminate called without an active exception", pytorch#190489).
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------- the tests
def _env() -> dict[str, str]:
    """This checkout first on the path; without the seed that ``seed_everything`` in an earlier test of
    this session left in ``PL_GLOBAL_SEED``: Lightning reseeds every rank from it, which would make the
    ranks' global RNGs equal and hide what the worker checks."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {k: v for k, v in os.environ.items() if k not in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")}
    return {**env, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(out)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return out, ranks


def _logged_steps(out: Path, optimizer: str, tag: str) -> list[int]:
    with open(out / optimizer / "version_0" / "metrics.csv") as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get(tag)]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_ddp_replicas_stay_identical_and_use_the_global_batch(ddp_run, optimizer):
    _, (r0, r1) = ddp_run
    a, b = r0[optimizer], r1[optimizer]
    assert not torch.equal(a["first_x"], b["first_x"])  # each rank draws its own samples
    assert all(torch.equal(p, q) for p, q in zip(a["params"], b["params"]))  # bitwise, not approximately
    assert a["global_batch"] == b["global_batch"] == WORLD * PER_RANK_BATCH
    assert a["monitor_batch"] == b["monitor_batch"] == WORLD * PER_RANK_BATCH
    assert torch.equal(a["prediction"], b["prediction"])  # computed on rank 0, broadcast
    if optimizer == "homogenized":
        assert a["seed"] != b["seed"]  # construction drew different seeds ...
        assert torch.equal(a["generator"], b["generator"])  # ... and the broadcast made the streams one
        assert a["opt_batch"] == WORLD * PER_RANK_BATCH


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_ddp_metrics_are_logged_once_per_step(ddp_run, optimizer):
    out, _ = ddp_run
    for tag in ("risk/measured", "risk/predicted", "curvature/measured", "curvature/hessian_trace"):
        assert _logged_steps(out, optimizer, tag) == list(range(0, STEPS + 1, EVERY)), tag
    assert not (out / optimizer / "version_1").exists()  # one logger directory: only rank 0 wrote


def test_main_example_runs_under_ddp_spawn(tmp_path):
    """2 spawned CPU processes (gloo): everything the example hands to the trainer pickles, and the
    launching process reports the folder and figure that rank zero wrote."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = 16
    cmd = [sys.executable, "lightning_examples/sparse_regression.py", "--dim", "64", "--max-steps", str(steps),
           "--strategy", "ddp_spawn", "--devices", "2", "--accelerator", "cpu", "--val-size", "8",
           "--logdir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "sparse_regression" / "version_0"
    assert re.search(r"TensorBoard logs: (.*)", proc.stdout).group(1) == str(run)
    assert re.search(r"figure: (.*)", proc.stdout).group(1) == str(run / "theory_monitor.png")
    assert (run / "theory_monitor.png").stat().st_size > 20_000
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]
    events = list(run.glob("events.out.tfevents.*"))
    assert len(events) == 1  # rank zero's writer only
    ea = EventAccumulator(str(events[0]), size_guidance={"scalars": 0})
    ea.Reload()
    for tag in ("risk/measured", "risk/predicted", "curvature/measured", "curvature/hessian_trace"):
        assert [e.step for e in ea.Scalars(tag)] == list(range(steps + 1)), tag  # 16 // 32 -> every step, once


def test_ddp_empirical_noise_is_identical_on_all_ranks(ddp_run):
    _, (r0, r1) = ddp_run
    assert all(torch.equal(p, q) for p, q in zip(r0["empirical"], r1["empirical"]))


# ----------------------------------------------------------------------------- sharding strategies
def _sharding_strategies():
    from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    # DeepSpeedStrategy's constructor needs deepspeed installed; the check only looks at the class.
    return [FSDPStrategy(), DeepSpeedStrategy.__new__(DeepSpeedStrategy), ModelParallelStrategy.__new__(ModelParallelStrategy)]


@pytest.mark.parametrize("strategy", _sharding_strategies(), ids=lambda s: type(s).__name__)
def test_sharding_strategies_are_refused(strategy):
    """Lightning refuses FSDP on CPU itself, so the setup hooks get a stand-in trainer."""
    from sde_optim import TeacherProblem
    from sde_optim.lightning import CurvatureMonitor, TheoryMonitor
    from sde_optim.lightning import TeacherRegression

    problem = TeacherProblem.sparse(8, 0.25)
    trainer = SimpleNamespace(strategy=strategy)
    module = TeacherRegression(problem, lr=0.1)
    module.trainer = trainer
    name = type(strategy).__name__
    with pytest.raises(ValueError, match=f"TeacherRegression does not support the {name}"):
        module.setup("fit")
    for callback in (TheoryMonitor(problem), CurvatureMonitor()):
        with pytest.raises(ValueError, match=f"{type(callback).__name__} does not support the {name}.*'ddp'"):
            callback.setup(trainer, module, "fit")


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
