"""Wall-time overhead of TheoryMonitor and CurvatureMonitor at their default settings.

The main example's setting (DLN on the sparse teacher, torch.optim.SGD, batch 1) is fitted
with no callback, each callback alone, and both, interleaved over repetitions (median), in
one run. Reported: fit wall time and its ratio to the fit without callbacks; the one-off
prediction at fit start is shown separately ("predict s"), because it does not grow with the
number of steps.

    python benchmarks/callback_overhead.py [--dim 1024] [--steps 3000] [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import pytorch_lightning as pl
import torch

from sde_optim import TeacherProblem
from sde_optim.callbacks import CurvatureMonitor, TheoryMonitor
from sde_optim.data import TeacherDataModule
from sde_optim.regression import TeacherRegression
from sde_optim.theory import predict


def _fit(problem, steps, callbacks, accelerator):
    pl.seed_everything(0, verbose=False)
    module = TeacherRegression(problem, lr=0.5, sgd_batch_size=1)
    data = TeacherDataModule(problem, batch_size=1, val_size=16)
    trainer = pl.Trainer(max_steps=steps, logger=pl.loggers.CSVLogger(tempfile.mkdtemp(prefix="sde_optim_overhead_")), callbacks=callbacks,
                         accelerator=accelerator, devices=1, limit_val_batches=0, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--accelerator", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    problem = TeacherProblem.sparse(args.dim, 0.1, seed=0)

    def population_risk(pl_module, batch):
        return pl_module.teacher().population_risk(pl_module.model.beta)

    configs = {
        "none": lambda: [],
        "TheoryMonitor": lambda: [TheoryMonitor(problem, save_figure=False)],
        "CurvatureMonitor": lambda: [CurvatureMonitor(probe_batch=1, loss_fn=population_risk)],
        "both": lambda: [TheoryMonitor(problem, save_figure=False), CurvatureMonitor(probe_batch=1, loss_fn=population_risk)],
    }
    t0 = time.perf_counter()
    from sde_optim import DiagonalLinearNetwork

    predict(problem, DiagonalLinearNetwork(args.dim, dtype=torch.float64), lr=0.5, batch_size=1, steps=args.steps)
    t_predict = time.perf_counter() - t0
    times = {k: [] for k in configs}
    for _ in range(args.reps):
        for k, make in configs.items():
            times[k].append(_fit(problem, args.steps, make(), args.accelerator))
    base = statistics.median(times["none"])
    print(f"# d={args.dim}, {args.steps} steps, median of {args.reps} interleaved fits, accelerator={args.accelerator}, "
          f"torch {torch.__version__}; one-off prediction at fit start: {t_predict:.2f} s")
    print(f"{'callbacks':<18} {'fit s':>8} {'ratio':>7} {'per-step overhead':>18} {'excl. prediction':>17}")
    for k in configs:
        t = statistics.median(times[k])
        extra = t_predict if "Theory" in k or k == "both" else 0.0
        print(f"{k:<18} {t:8.2f} {t / base:7.3f} {(t - base) / args.steps * 1e3:15.3f} ms {(t - extra) / base:17.3f}")


if __name__ == "__main__":
    main()
