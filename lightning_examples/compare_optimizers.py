"""torch.optim.SGD vs HomogenizedSGD (its SDE, THEORY E3) vs the PDE, in one figure and one TensorBoard group.

Both optimizers train the same DLN on the same streaming teacher with Lightning, --seeds runs
each; a TheoryMonitor on every run logs {observable}/measured, {observable}/predicted and
{observable}/rel_error. Each invocation writes a new version folder,
LOGDIR/compare_optimizers/version_N/{sgd,homogenized}/seed_S, so TensorBoard overlays the runs
and a re-run never appends to an old one. The figure (PNG and PDF, default
LOGDIR/compare_optimizers/version_N/compare_optimizers.png) draws risk, curvature, l1 norm and
imbalance of both optimizers (mean +- 2 standard errors over seeds) against the one prediction.

    python lightning_examples/compare_optimizers.py --dim 1024 --horizon 6 --seeds 2
    tensorboard --logdir runs/compare_optimizers
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

from sde_optim import TeacherProblem
from sde_optim.cli import (MAX_DIM, HelpFormatter, check_output_dir, check_output_file, check_teacher_support,
                           float_in, int_in, positive_int, progress)
from sde_optim.lightning import TeacherDataModule, TeacherRegression, TheoryMonitor
from sde_optim.plotting import comparison_figure, prediction_series, save_figure

OBSERVABLES = ("risk", "curvature", "l1", "imbalance")
RUNS = {"sgd": "torch.optim.SGD", "homogenized": "HomogenizedSGD"}
MAX_STEPS = 10**6  # per run


def build_parser() -> argparse.ArgumentParser:
    """The example's arguments (every one with help and default)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--dim", type=int_in(1, MAX_DIM), default=1024, help="dimension d")
    ap.add_argument("--density", type=float_in(0, 1), default=0.1, help="teacher support fraction")
    ap.add_argument("--lr", type=float_in(0, strict=True), default=0.5, help="SGD step size")
    ap.add_argument("--batch-size", type=positive_int, default=1, help="SGD batch size B")
    ap.add_argument("--noise-std", type=float_in(0), default=0.0, help="label noise sigma")
    ap.add_argument("--horizon", type=float_in(0, strict=True), default=6.0, help="SGD time t = steps / d")
    ap.add_argument("--seeds", type=int_in(1, 64), default=1, help="runs per optimizer")
    ap.add_argument("--seed", type=int_in(0), default=0, help="teacher seed; run s uses data and noise seed seed + s")
    ap.add_argument("--logdir", default="runs", help="TensorBoard root (runs go to LOGDIR/compare_optimizers/version_N)")
    ap.add_argument("--png", default=None, help="figure path, .png (a .pdf is written next to it) "
                                                "(default: LOGDIR/compare_optimizers/version_N/compare_optimizers.png)")
    ap.add_argument("--accelerator", default="auto", help="Lightning accelerator: cpu, gpu, auto")
    return ap


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse and cross-check the arguments; a bad combination is an argparse error naming the flags."""
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        check_teacher_support(args.dim, args.density)
        check_output_dir("--logdir", args.logdir)
        if args.png:
            check_output_file("--png", args.png, ".png")
        if not 1 <= int(args.horizon * args.dim) <= MAX_STEPS:
            raise ValueError(f"--horizon {args.horizon:g} at --dim {args.dim} is {int(args.horizon * args.dim)} steps "
                             f"per run; this example accepts 1 to {MAX_STEPS}")
    except ValueError as exc:
        ap.error(str(exc))
    return args


def fit(problem: TeacherProblem, optimizer: str, seed: int, version: int, args: argparse.Namespace) -> TheoryMonitor:
    """One Lightning fit; its TheoryMonitor (history and prediction) is returned."""
    pl.seed_everything(seed, verbose=False)
    module = TeacherRegression(problem, lr=args.lr, sgd_batch_size=args.batch_size, optimizer=optimizer, noise_seed=seed)
    every = max(1, args.dim // 8)
    data = TeacherDataModule(problem, batch_size=module.loader_batch_size, seed=seed, val_size=256)
    monitor = TheoryMonitor(problem, every_n_steps=every, observables=OBSERVABLES, save_figure=False)
    logger = TensorBoardLogger(args.logdir, name="compare_optimizers", version=version,
                               sub_dir=os.path.join(optimizer, f"seed_{seed}"), default_hp_metric=False)
    trainer = pl.Trainer(max_steps=int(args.horizon * args.dim), logger=logger, callbacks=[monitor],
                         accelerator=args.accelerator, devices=1, log_every_n_steps=every, limit_val_batches=0,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    return monitor


def main(argv: list[str] | None = None) -> str:
    """Fit both optimizers ``--seeds`` times, draw the figure; returns the PNG path."""
    args = _parse(argv)
    problem = TeacherProblem.sparse(args.dim, args.density, noise_std=args.noise_std, seed=args.seed)
    version = TensorBoardLogger(args.logdir, name="compare_optimizers").version  # the next free version_N
    monitors: dict[str, list[TheoryMonitor]] = {name: [] for name in RUNS}
    with progress(len(RUNS) * args.seeds, "Lightning fits", unit="fit") as bar:
        for name in RUNS:
            for s in range(args.seeds):
                monitors[name].append(fit(problem, name, args.seed + s, version, args))
                bar.update()
    pred = monitors["sgd"][0].prediction
    assert pred is not None
    predicted, scatter = prediction_series(pred, OBSERVABLES)
    measured = {RUNS[name]: {n: (ms[0].history["step"], [m.history[f"{n}/measured"] for m in ms]) for n in OBSERVABLES}
                for name, ms in monitors.items()}
    fig = comparison_figure(predicted, measured, dim=args.dim, divergence_step=pred.divergence_step,
                            prediction_label="PDE prediction", scatter=scatter,
                            title=f"SGD vs its SDE vs the PDE: d={args.dim}, lr={args.lr:g}, B={args.batch_size}, "
                                  f"sigma={args.noise_std:g}, {args.seeds} seed(s)")
    run_dir = os.path.join(args.logdir, "compare_optimizers", f"version_{version}")
    written = save_figure(fig, args.png or os.path.join(run_dir, "compare_optimizers.png"))
    for name, ms in monitors.items():
        mean = np.mean([m.history["risk/measured"] for m in ms], axis=0)
        predicted_risk = np.array(ms[0].history["risk/predicted"])
        worst = max(max(m.history["risk/rel_error"]) for m in ms)
        print(f"{RUNS[name]:<16} max relative risk error vs PDE: {np.max(np.abs(mean / predicted_risk - 1)):.2%} "
              f"(mean of {len(ms)} runs; single runs: up to {worst:.2%})")
    print(f"figure: {', '.join(written)}\nTensorBoard runs: {run_dir}/{{sgd,homogenized}}/seed_S "
          f"(view with: tensorboard --logdir {os.path.join(args.logdir, 'compare_optimizers')})")
    return written[0]


if __name__ == "__main__":
    main()
