"""Wall-time overhead of TheoryMonitor and CurvatureMonitor at their default settings.

The main example's setting (DLN on the sparse teacher, torch.optim.SGD, batch 1) is fitted
with both callbacks at their defaults under Lightning's ``SimpleProfiler``, which times every
callback hook inside the same run. Reported per callback: the time spent in its hooks as a
fraction of the fit's wall time, split into the one-off set-up (``on_fit_start``: the
prediction) and the per-step work. Measuring inside one run avoids comparing separate fits,
whose wall times vary by more than the overhead on a shared machine (+-15 % seen here).

    python benchmarks/callback_overhead.py [--dim 1024] [--steps 6144] [--threads 1]

The measurement steps are written per callback (how many times each measured).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.profilers import SimpleProfiler

from sde_optim import TeacherProblem
from sde_optim.lightning import CurvatureMonitor, TheoryMonitor
from sde_optim.lightning import TeacherDataModule
from sde_optim.lightning import TeacherRegression


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=6144, help="optimizer steps (default 6144: the main example, t = 6)")
    ap.add_argument("--accelerator", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    problem = TeacherProblem.sparse(args.dim, 0.1, seed=0)
    # Defaults: about 32 measurements each, at the same steps; CurvatureMonitor on the population loss.
    callbacks = [TheoryMonitor(problem, save_figure=False), CurvatureMonitor()]
    profiler = SimpleProfiler(extended=False)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_steps=args.steps, logger=pl.loggers.CSVLogger(tempfile.mkdtemp(prefix="sde_optim_overhead_")),
                         callbacks=callbacks, profiler=profiler, accelerator=args.accelerator, devices=1,
                         limit_val_batches=0, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    t0 = time.perf_counter()
    trainer.fit(TeacherRegression(problem, lr=0.5, sgd_batch_size=1), datamodule=TeacherDataModule(problem, batch_size=1, val_size=16))
    total = time.perf_counter() - t0
    print(f"# d={args.dim}, {args.steps} steps, accelerator={args.accelerator}, threads={torch.get_num_threads()}, "
          f"torch {torch.__version__}; fit wall time {total:.2f} s ({total / args.steps * 1e3:.3f} ms/step)")
    print(f"{'callback':<18} {'set-up s':>9} {'per-step s':>11} {'set-up %':>9} {'per-step %':>11} {'total %':>8}")
    totals = [0.0, 0.0]
    for cb in callbacks:
        name = type(cb).__name__
        setup = per_step = 0.0
        for action, durations in profiler.recorded_durations.items():
            if f"[Callback]{name}" in action:
                if action.endswith("on_fit_start") or action.endswith("setup"):
                    setup += sum(durations)
                else:
                    per_step += sum(durations)
        totals[0] += setup
        totals[1] += per_step
        print(f"{name:<18} {setup:9.3f} {per_step:11.3f} {setup / total:9.2%} {per_step / total:11.2%} "
              f"{(setup + per_step) / total:8.2%}  ({args.steps // cb.cadence(trainer) + 1} measurements)")
    print(f"{'both':<18} {totals[0]:9.3f} {totals[1]:11.3f} {totals[0] / total:9.2%} {totals[1] / total:11.2%} "
          f"{sum(totals) / total:8.2%}")


if __name__ == "__main__":
    main()
