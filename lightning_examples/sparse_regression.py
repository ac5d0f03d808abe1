"""The main example: watch SGD on a diagonal linear network follow its predicted curves.

A DLN (beta = u * v) is trained with Lightning on the streaming sparse teacher of THEORY §1
(fresh samples every step, generated on the training device). Before the first step the
PDE (THEORY E6) predicts the risk and the curvature (Hessian trace, E7); during training
``TheoryMonitor`` logs measured, predicted and their relative error to TensorBoard, and
``CurvatureMonitor`` logs a Hutchinson estimate of the same Hessian trace (and the top
eigenvalue) from Hessian-vector products. At the end a figure is saved next to the logs.

    python lightning_examples/sparse_regression.py                    # ~1 min on 2 CPU cores
    python lightning_examples/sparse_regression.py --optimizer homogenized
    python lightning_examples/sparse_regression.py --lr 0.05 --momentum 0.9 --scheduler cosine
    python lightning_examples/sparse_regression.py --accelerator gpu --dim 16384
    tensorboard --logdir runs                                         # then open the SCALARS/CUSTOM SCALARS tabs
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from sde_optim import TeacherSpec
from sde_optim.cli import add_sgd_arguments, example_parser
from sde_optim.lightning import OPTIMIZERS, CurvatureMonitor, TeacherDataModule, TeacherRegression, TheoryMonitor


def parser() -> argparse.ArgumentParser:
    ap = example_parser(__doc__, dim=1024, batch_help="SGD batch size B per process")
    ap.add_argument("--max-steps", type=int, default=None,
                    help="optimizer steps; None: 6 * dim SGD steps (t = 6), times l for svag")
    ap.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS,
                    help="torch.optim.SGD, HomogenizedSGD (its SDE) or SVAG")
    ap.add_argument("--svag-l", type=float, default=4.0, help="SVAG amplification l (optimizer svag)")
    ap.add_argument("--increments", default="gaussian", choices=["gaussian", "rademacher"],
                    help="HomogenizedSGD's noise draws (optimizer homogenized): Gaussian, or +-1 (same laws, cheaper)")
    add_sgd_arguments(ap, schedule_flag="--scheduler")  # --momentum --dampening --nesterov --weight-decay --scheduler
    ap.add_argument("--alpha", type=float, default=0.1, help="initialization scale")
    ap.add_argument("--init", default="unbalanced", choices=["unbalanced", "balanced"], help="initialization")
    ap.add_argument("--every-n-steps", type=int, default=None,
                    help="optimizer steps between measurements; None: about 32 measurements over the run")
    ap.add_argument("--val-size", type=int, default=1024,
                    help="held-out samples, streamed in batches, evaluated once at the end (val/loss)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the teacher, the data stream and the monitors")
    ap.add_argument("--logdir", default="runs", help="TensorBoard log directory (a new version_N folder per run)")
    ap.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu, ...")
    ap.add_argument("--devices", default="auto", help="Lightning devices: auto, or a number")
    ap.add_argument("--strategy", default="auto", help="Lightning strategy: auto, ddp, ddp_spawn")
    ap.add_argument("--no-curvature-monitor", action="store_true", help="skip the Hutchinson curvature estimates")
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parser().parse_args(argv)


def build(args: argparse.Namespace) -> tuple[TeacherRegression, TeacherDataModule, list[pl.Callback], int]:
    """(module, data module, callbacks, max_steps) for the arguments; also used by the tests.

    Raises ValueError/TypeError naming the bad argument.
    """
    pl.seed_everything(args.seed, workers=True, verbose=False)
    teacher = TeacherSpec.from_arguments(args, seed=args.seed)
    module = TeacherRegression(teacher, lr=args.lr, sgd_batch_size=args.batch_size, optimizer=args.optimizer,
                               svag_l=args.svag_l, alpha=args.alpha, init=args.init, momentum=args.momentum,
                               dampening=args.dampening, nesterov=args.nesterov, weight_decay=args.weight_decay,
                               scheduler=args.schedule, increments=args.increments)
    max_steps = args.max_steps if args.max_steps is not None else math.ceil(6 * args.dim / module.sgd_steps_per_step)
    if max_steps < 1:
        raise ValueError(f"--max-steps must be an integer >= 1, got {max_steps}")
    # One epoch: the (streamed) validation runs once, at the end; the monitors measure the exact risk throughout.
    data = TeacherDataModule(module.problem, batch_size=module.loader_batch_size, seed=args.seed,
                             val_size=args.val_size, steps_per_epoch=max_steps)
    callbacks: list[pl.Callback] = [TheoryMonitor(module.problem, every_n_steps=args.every_n_steps)]
    if not args.no_curvature_monitor:  # Hutchinson on the module's population loss: the E7 curvature
        callbacks.append(CurvatureMonitor(hutchinson_samples=16, power_iters=10, seed=args.seed))
    return module, data, callbacks, max_steps


def main(argv: list[str] | None = None) -> TheoryMonitor:
    ap = parser()
    args = ap.parse_args(argv)
    try:
        module, data, callbacks, max_steps = build(args)
    except (ValueError, TypeError) as exc:
        ap.error(str(exc))
    logger = TensorBoardLogger(args.logdir, name="sparse_regression", default_hp_metric=False)
    log_dir = logger.log_dir  # fixes the version now: spawned processes (ddp_spawn) write to this folder
    trainer = pl.Trainer(
        max_steps=max_steps, accelerator=args.accelerator, devices=args.devices, strategy=args.strategy,
        logger=logger, callbacks=callbacks, default_root_dir=args.logdir,
        enable_progress_bar=sys.stderr.isatty(), enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data)
    monitor = callbacks[0]
    assert isinstance(monitor, TheoryMonitor)
    if trainer.is_global_zero:
        figure = os.path.join(log_dir, "theory_monitor.png")  # written by rank zero, in this process or a spawned one
        print(f"TensorBoard logs: {log_dir}\nfigure: {figure if os.path.exists(figure) else None}\n"
              f"view with: tensorboard --logdir {os.path.relpath(args.logdir)}")
    return monitor


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    main()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # Lightning does this for NCCL only; gloo can abort at exit
