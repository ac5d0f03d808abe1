"""The main example: watch SGD on a diagonal linear network follow its predicted curves.

A DLN (beta = u * v) is trained with Lightning on the streaming sparse teacher of THEORY §1
(fresh samples every step, generated on the training device). Before the first step the
PDE (THEORY E6) predicts the risk and the curvature (Hessian trace, E7); during training
``TheoryMonitor`` logs measured, predicted and their relative error to TensorBoard, and
``CurvatureMonitor`` logs a Hutchinson estimate of the same Hessian trace (and the top
eigenvalue) from Hessian-vector products. At the end a figure is saved next to the logs.

    python lightning_examples/sparse_regression.py                    # ~1 min on 2 CPU cores
    python lightning_examples/sparse_regression.py --optimizer homogenized
    python lightning_examples/sparse_regression.py --accelerator gpu --dim 16384
    tensorboard --logdir runs                                         # then open the SCALARS/CUSTOM SCALARS tabs
"""

from __future__ import annotations

import argparse
import os
import sys

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from sde_optim import TeacherProblem
from sde_optim.lightning import CurvatureMonitor, TheoryMonitor
from sde_optim.lightning import TeacherDataModule
from sde_optim.lightning import OPTIMIZERS, TeacherRegression


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=1024, help="input dimension d (default 1024)")
    ap.add_argument("--density", type=float, default=0.1, help="fraction of nonzero teacher entries (default 0.1)")
    ap.add_argument("--spectrum", default="isotropic", choices=["isotropic", "two-level", "power-law"])
    ap.add_argument("--lr", type=float, default=0.5, help="SGD step size (default 0.5)")
    ap.add_argument("--batch-size", type=int, default=1, help="SGD batch size B per process (default 1)")
    ap.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default 6 * dim, t = 6)")
    ap.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS)
    ap.add_argument("--svag-l", type=float, default=4.0, help="SVAG amplification l (default 4)")
    ap.add_argument("--noise-std", type=float, default=0.0, help="label noise sigma (default 0)")
    ap.add_argument("--alpha", type=float, default=0.1, help="initialization scale (default 0.1)")
    ap.add_argument("--init", default="unbalanced", choices=["unbalanced", "balanced"])
    ap.add_argument("--every-n-steps", type=int, default=None, help="steps between measurements (default dim / 8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--logdir", default="runs", help="TensorBoard log directory (default runs/)")
    ap.add_argument("--accelerator", default="auto")
    ap.add_argument("--devices", default="auto")
    ap.add_argument("--strategy", default="auto")
    ap.add_argument("--no-curvature-monitor", action="store_true", help="skip the Hutchinson curvature estimates")
    return ap.parse_args(argv)


def build(args: argparse.Namespace):
    """(module, data module, callbacks) for the arguments; also used by the tests."""
    pl.seed_everything(args.seed, workers=True, verbose=False)
    problem = TeacherProblem.sparse(args.dim, args.density, spectrum=args.spectrum, noise_std=args.noise_std, seed=args.seed)
    module = TeacherRegression(problem, lr=args.lr, sgd_batch_size=args.batch_size, optimizer=args.optimizer,
                               svag_l=args.svag_l, alpha=args.alpha, init=args.init)
    steps_per_sgd_step = args.svag_l if args.optimizer == "svag" else 1
    every = args.every_n_steps or max(1, args.dim // 8) * int(steps_per_sgd_step)
    data = TeacherDataModule(problem, batch_size=module.loader_batch_size, seed=args.seed, val_size=2048,
                             steps_per_epoch=every * 8)
    callbacks: list[pl.Callback] = [TheoryMonitor(problem, every_n_steps=every, observables=("risk", "curvature"))]
    if not args.no_curvature_monitor:
        def population_risk(pl_module, batch):  # the Hessian of R itself (E7), comparable to the prediction
            return pl_module.teacher().population_risk(pl_module.model.beta)

        callbacks.append(CurvatureMonitor(every_n_steps=every, probe_batch=1, hutchinson_samples=16, power_iters=10,
                                          loss_fn=population_risk, seed=args.seed))
    return module, data, callbacks, every


def main(argv: list[str] | None = None) -> TheoryMonitor:
    args = parse_args(argv)
    steps_per_sgd_step = args.svag_l if args.optimizer == "svag" else 1
    if args.max_steps is None:
        args.max_steps = int(6 * args.dim * steps_per_sgd_step)
    module, data, callbacks, every = build(args)
    logger = TensorBoardLogger(args.logdir, name="sparse_regression", default_hp_metric=False)
    trainer = pl.Trainer(
        max_steps=args.max_steps, accelerator=args.accelerator, devices=args.devices, strategy=args.strategy,
        logger=logger, callbacks=callbacks, log_every_n_steps=every, default_root_dir=args.logdir,
        enable_progress_bar=sys.stderr.isatty(), enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data)
    monitor = callbacks[0]
    assert isinstance(monitor, TheoryMonitor)
    if trainer.is_global_zero:
        print(f"TensorBoard logs: {logger.log_dir}\nfigure: {monitor.figure_path}\n"
              f"view with: tensorboard --logdir {os.path.relpath(args.logdir)}")
    return monitor


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    main()
