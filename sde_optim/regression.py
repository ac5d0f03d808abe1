"""A LightningModule that trains a DiagonalLinearNetwork on a streaming teacher.

The optimizer is chosen by name, so the same module runs plain SGD (the thing the theory
predicts), HomogenizedSGD (its SDE, THEORY E3) and SVAG (Li-Malladi-Arora):

* ``"sgd"``: ``torch.optim.SGD`` on the minibatch loss ``mean (f(x) - y)^2 / 2``;
* ``"homogenized"``: :class:`~sde_optim.HomogenizedSGD` with the exact population gradient
  as drift and :class:`~sde_optim.StructuredNoise` of SGD with batch ``sgd_batch_size``;
  the batch is only used for the logged minibatch loss;
* ``"svag"``: :class:`~sde_optim.SVAG`; each step needs two independent minibatches, so the
  data module must deliver ``2 * sgd_batch_size`` samples per step (``loader_batch_size``
  says how many), split in halves here. ``svag_l`` optimizer steps make one SGD step of
  time: ``sgd_steps_per_step = 1 / svag_l``.

``sgd_batch_size`` and ``sgd_steps_per_step`` are what :class:`~sde_optim.callbacks.TheoryMonitor`
reads to line the prediction up with training.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from ._validation import check_choice, check_float, check_int
from .models import DiagonalLinearNetwork
from .optim import SVAG, HomogenizedSGD, StructuredNoise
from .teacher import TeacherProblem

__all__ = ["TeacherRegression", "OPTIMIZERS"]

OPTIMIZERS = ("sgd", "homogenized", "svag")


class TeacherRegression(pl.LightningModule):
    """Train ``DiagonalLinearNetwork(problem.dim, **network)`` on ``problem`` with a named optimizer.

    Args:
        problem: the teacher (also the source of the exact drift for ``"homogenized"``).
        lr: step size (> 0) of the SGD being run or approximated.
        sgd_batch_size: the SGD batch size ``B`` (>= 1).
        optimizer: ``"sgd"``, ``"homogenized"`` or ``"svag"``.
        svag_l: SVAG amplification (>= 1).
        noise_scale: HomogenizedSGD noise multiplier (>= 0).
        alpha, init, parametrization: passed to :class:`~sde_optim.DiagonalLinearNetwork`.
        dtype: parameter dtype (default float32).
    """

    def __init__(
        self,
        problem: TeacherProblem,
        *,
        lr: float,
        sgd_batch_size: int = 1,
        optimizer: str = "sgd",
        svag_l: float = 4,
        noise_scale: float = 1.0,
        alpha: float = 0.1,
        init: str = "unbalanced",
        parametrization: str = "uv",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if not isinstance(problem, TeacherProblem):
            raise TypeError(f"problem must be a TeacherProblem, got {type(problem).__name__}")
        self.problem = problem
        self.lr = check_float("lr", lr, minimum=0.0, strict=True)
        self.sgd_batch_size = check_int("sgd_batch_size", sgd_batch_size, minimum=1)
        self.optimizer_name = check_choice("optimizer", optimizer, OPTIMIZERS)
        self.svag_l = check_float("svag_l", svag_l, minimum=1.0)
        self.noise_scale = check_float("noise_scale", noise_scale, minimum=0.0)
        self.model = DiagonalLinearNetwork(problem.dim, alpha=alpha, init=init, parametrization=parametrization, dtype=dtype)
        self._device_problem: TeacherProblem | None = None
        self.save_hyperparameters(ignore=["problem"])

    # ------------------------------------------------------------------ bookkeeping for TheoryMonitor
    @property
    def loader_batch_size(self) -> int:
        """Samples the data module must deliver per optimizer step."""
        return 2 * self.sgd_batch_size if self.optimizer_name == "svag" else self.sgd_batch_size

    @property
    def sgd_steps_per_step(self) -> float:
        """SGD steps of time covered by one optimizer step (``1 / l`` for SVAG, else 1)."""
        return 1.0 / self.svag_l if self.optimizer_name == "svag" else 1.0

    def teacher(self) -> TeacherProblem:
        """The problem on this module's device and dtype (cached)."""
        p = self._device_problem
        if p is None or p.device != self.device:
            self._device_problem = p = self.problem.to(self.device, self.model.beta.dtype)
        return p

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self) -> None:
        self.teacher()  # move the problem once, outside any torch.func transform that may call teacher()

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    @staticmethod
    def loss_fn(prediction: Tensor, target: Tensor) -> Tensor:
        """``mean (f(x) - y)^2 / 2``, the per-sample loss of THEORY §1 averaged over the batch."""
        return 0.5 * (prediction - target).pow(2).mean()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if x.shape[0] != self.loader_batch_size:
            raise ValueError(
                f"optimizer {self.optimizer_name!r} with sgd_batch_size={self.sgd_batch_size} needs "
                f"{self.loader_batch_size} samples per step; the batch has {x.shape[0]}"
            )
        if self.optimizer_name == "svag":
            b = self.sgd_batch_size
            opt = self.optimizers().optimizer  # type: ignore[union-attr]
            loss = opt.combine_losses(self.loss_fn(self(x[:b]), y[:b]), self.loss_fn(self(x[b:]), y[b:]))
        else:
            loss = self.loss_fn(self(x), y)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False)
        if self.optimizer_name == "homogenized":
            return self.teacher().population_risk(self.model.beta)  # exact drift (E3)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = self.loss_fn(self(x.to(self.model.beta.dtype)), y.to(self.model.beta.dtype))
        self.log("val/loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def configure_optimizers(self) -> Any:
        params = self.model.parameters()
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(params, lr=self.lr)
        if self.optimizer_name == "svag":
            return SVAG(params, lr=self.lr, l=self.svag_l)
        noise = StructuredNoise(self.problem, self.model)
        return HomogenizedSGD(params, lr=self.lr, batch_size=self.sgd_batch_size, noise=noise, noise_scale=self.noise_scale)
