"""Any model: HomogenizedSGD with empirical noise and CurvatureMonitor on an MLP.

SGD with a small batch B is simulated from gradients of a larger batch M: the drift is the
mean gradient over M samples and HomogenizedSGD adds the missing noise with the empirical
per-sample covariance scaled by 1/B - 1/M (THEORY §2), computed with one extra reweighted
backward pass. The same MLP is trained with torch.optim.SGD at batch B for comparison;
CurvatureMonitor logs the Hessian trace (Hutchinson) and top eigenvalue (power iteration)
of the loss on a fixed probe batch for both.

    python lightning_examples/general_model.py --steps 1500
    tensorboard --logdir runs/general_model

Each run writes a new folder ``runs/general_model/version_N`` with one TensorBoard run per
optimizer (``sgd/``, ``homogenized/``).
"""

from __future__ import annotations

import argparse
import os
import sys

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

import sde_optim
from sde_optim import EmpiricalNoise, HomogenizedSGD
from sde_optim.cli import ExampleHelpFormatter
from sde_optim.lightning import CurvatureMonitor


class TeacherMLPStream(IterableDataset):
    """Fresh samples ``x ~ N(0, I)``, ``y = teacher(x) + noise`` from a fixed random teacher MLP."""

    def __init__(self, dim: int, batch: int, seed: int, noise_std: float = 0.1) -> None:
        self.dim, self.batch, self.seed, self.noise_std = dim, batch, seed, noise_std
        torch.manual_seed(10_000 + seed)
        self.teacher = nn.Sequential(nn.Linear(dim, 32), nn.Tanh(), nn.Linear(32, 1)).requires_grad_(False)

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed)
        while True:
            x = torch.randn(self.batch, self.dim, generator=gen)
            yield x, self.teacher(x) + self.noise_std * torch.randn(self.batch, 1, generator=gen)


class MLPRegression(pl.LightningModule):
    def __init__(self, dim: int, lr: float, batch_size: int, optimizer: str) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
        self.lr, self.batch_size, self.optimizer_name = lr, batch_size, optimizer

    @staticmethod
    def loss_fn(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 0.5 * (prediction - target).pow(2).mean()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.optimizer_name == "homogenized":
            self.optimizers().optimizer.set_batch(x, y)  # the M samples behind this step's drift
        loss = self.loss_fn(self(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        noise = EmpiricalNoise(self.net, per_sample_loss=lambda out, y: 0.5 * (out - y).pow(2).sum(1))
        return HomogenizedSGD(self.parameters(), lr=self.lr, batch_size=self.batch_size, noise=noise)


def fit(optimizer: str, args: argparse.Namespace, version: int) -> float:
    pl.seed_everything(args.seed, verbose=False)
    loader_batch = args.drift_batch if optimizer == "homogenized" else args.batch_size
    data = DataLoader(TeacherMLPStream(args.dim, loader_batch, args.seed), batch_size=None)
    probe = next(iter(TeacherMLPStream(args.dim, 256, args.seed + 1)))
    module = MLPRegression(args.dim, args.lr, args.batch_size, optimizer)
    monitor = CurvatureMonitor(every_n_steps=args.every, probe_batch=probe, hutchinson_samples=16, power_iters=20)
    logger = TensorBoardLogger(args.logdir, name="general_model", version=version, sub_dir=optimizer)
    trainer = pl.Trainer(max_steps=args.steps, logger=logger,
                         callbacks=[monitor], log_every_n_steps=args.every, accelerator=args.accelerator, devices=1,
                         enable_checkpointing=False, enable_progress_bar=sys.stderr.isatty(), enable_model_summary=False)
    trainer.fit(module, train_dataloaders=data)
    with torch.no_grad():
        x, y = probe
        return float(module.loss_fn(module(x.to(module.device)), y.to(module.device)))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=ExampleHelpFormatter)
    ap.add_argument("--dim", type=int, default=16, help="input dimension of the teacher MLP")
    ap.add_argument("--lr", type=float, default=0.1, help="step size of both optimizers")
    ap.add_argument("--batch-size", type=int, default=8, help="the SGD batch B being simulated")
    ap.add_argument("--drift-batch", type=int, default=64, help="M, samples behind HomogenizedSGD's drift")
    ap.add_argument("--steps", type=int, default=1500, help="optimizer steps per fit")
    ap.add_argument("--every", type=int, default=100, help="optimizer steps between curvature checks")
    ap.add_argument("--seed", type=int, default=0, help="seed of the teacher, the data and the probe batch")
    ap.add_argument("--logdir", default="runs", help="TensorBoard log directory (a new version_N folder per run)")
    ap.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu, ...")
    ap.add_argument("--version", action="version", version=f"%(prog)s (sde-optim {sde_optim.__version__})")
    return ap


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parser().parse_args(argv)
    version = TensorBoardLogger(args.logdir, name="general_model").version  # this run's folder, for both fits
    losses = {name: fit(name, args, version) for name in ("sgd", "homogenized")}
    for name, loss in losses.items():
        print(f"{name:<12} held-out loss after {args.steps} steps: {loss:.5f}")
    print(f"TensorBoard logs: {os.path.join(args.logdir, 'general_model', f'version_{version}')}\n"
          f"view with: tensorboard --logdir {args.logdir}/general_model")
    return losses


if __name__ == "__main__":
    main()
