"""torch.optim.SGD vs HomogenizedSGD (its SDE, THEORY E3) vs the PDE, in one figure and one TensorBoard group.

Both optimizers train the same DLN on the same streaming teacher with Lightning; a
TheoryMonitor on each logs measured and predicted curves. The runs land side by side in
``LOGDIR/compare/{sgd,homogenized}``, so TensorBoard overlays them; the figure
``LOGDIR/compare/compare_optimizers.png`` draws both against the one prediction.

    python lightning_examples/compare_optimizers.py --dim 1024 --horizon 6
    tensorboard --logdir runs/compare
"""

from __future__ import annotations

import argparse
import os
import sys

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

from sde_optim import TeacherProblem
from sde_optim.lightning import TheoryMonitor
from sde_optim.lightning import TeacherDataModule
from sde_optim.plotting import comparison_figure
from sde_optim.lightning import TeacherRegression

OBSERVABLES = ("risk", "curvature", "l1", "imbalance")


def fit(problem: TeacherProblem, optimizer: str, args: argparse.Namespace) -> TheoryMonitor:
    pl.seed_everything(args.seed, verbose=False)
    module = TeacherRegression(problem, lr=args.lr, sgd_batch_size=args.batch_size, optimizer=optimizer)
    every = max(1, args.dim // 8)
    data = TeacherDataModule(problem, batch_size=module.loader_batch_size, seed=args.seed, val_size=256)
    monitor = TheoryMonitor(problem, every_n_steps=every, observables=OBSERVABLES, save_figure=False)
    logger = TensorBoardLogger(args.logdir, name="compare", version=optimizer, default_hp_metric=False)
    trainer = pl.Trainer(max_steps=int(args.horizon * args.dim), logger=logger, callbacks=[monitor],
                         accelerator=args.accelerator, devices=1, log_every_n_steps=every, limit_val_batches=0,
                         enable_checkpointing=False, enable_progress_bar=sys.stderr.isatty(), enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    return monitor


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--noise-std", type=float, default=0.0)
    ap.add_argument("--horizon", type=float, default=6.0, help="SGD time t = steps / dim (default 6)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--logdir", default="runs")
    ap.add_argument("--accelerator", default="auto")
    args = ap.parse_args(argv)
    problem = TeacherProblem.sparse(args.dim, 0.1, noise_std=args.noise_std, seed=args.seed)
    monitors = {name: fit(problem, name, args) for name in ("sgd", "homogenized")}
    pred = monitors["sgd"].prediction
    assert pred is not None
    predicted = {n: (pred.steps.tolist(), pred.curves[n].tolist()) for n in OBSERVABLES}
    measured = {label: {n: (m.history["step"], m.history[f"{n}/measured"]) for n in OBSERVABLES}
                for label, m in (("torch.optim.SGD", monitors["sgd"]), ("HomogenizedSGD", monitors["homogenized"]))}
    fig = comparison_figure(predicted, measured, title=f"SGD vs its SDE vs the PDE: d={args.dim}, lr={args.lr}, B={args.batch_size}")
    path = os.path.join(args.logdir, "compare", "compare_optimizers.png")
    fig.savefig(path, dpi=110)
    for label, m in monitors.items():
        print(f"{label:<12} max relative risk error vs PDE: {max(m.history['risk/rel_error']):.2%}")
    print(f"figure: {path}\nview with: tensorboard --logdir {os.path.join(args.logdir, 'compare')}")
    return path


if __name__ == "__main__":
    main()
