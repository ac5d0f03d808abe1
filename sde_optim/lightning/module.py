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

:attr:`~TeacherRegression.sgd_global_batch_size` and :attr:`~TeacherRegression.sgd_steps_per_step`
are the two attributes :class:`~sde_optim.lightning.TheoryMonitor` reads to line the prediction
up with training (the one place where the run declares them).

Distributed: under DDP with ``W`` processes ``sgd_batch_size`` is per process, so the SGD
being run (or emulated) has the global batch ``W * sgd_batch_size`` (:attr:`sgd_global_batch_size`):
DDP averages the ``"sgd"``/``"svag"`` gradients over ranks, and ``"homogenized"`` draws the
noise of that global batch (its drift, the population gradient, is the same on every rank).
Strategies that shard parameters or optimizer state (FSDP, DeepSpeed, ModelParallel) are
refused with a ``ValueError`` at setup.

Precision: parameters in ``dtype`` (float32 default; float64, bfloat16 and float16 work too),
the teacher is moved to that dtype once; ``Trainer(precision="bf16-mixed")`` (autocast) and
``"bf16-true"`` work on CPU and GPU.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any, Literal, get_args

import pytorch_lightning as pl
import torch
from torch import Tensor

from .._validation import check_choice, check_float, check_int, check_strategy
from ..models import DiagonalLinearNetwork
from ..optim import SVAG, HomogenizedSGD, StructuredNoise
from ..optim.increments import INCREMENTS
from ..optim.schedules import check_schedule, make_scheduler
from ..teacher import TeacherProblem, TeacherSpec, as_teacher_problem
from ..theory.dynamics import SGDConfig

__all__ = ["TeacherRegression", "OPTIMIZERS", "OptimizerName"]

OptimizerName = Literal["sgd", "homogenized", "svag"]
OPTIMIZERS = get_args(OptimizerName)


class TeacherRegression(pl.LightningModule):
    """Train ``DiagonalLinearNetwork(problem.dim, **network)`` on ``problem`` with a named optimizer.

    Args:
        problem: the teacher (also the source of the exact drift for ``"homogenized"``): a
            :class:`~sde_optim.TeacherProblem` or a :class:`~sde_optim.TeacherSpec` (built once
            here, and saved with the hyperparameters as a dict of its fields, which is also
            accepted, so ``load_from_checkpoint`` needs no problem).
        lr: step size (> 0) of the SGD being run or approximated.
        sgd_batch_size: the SGD batch size ``B`` per process (>= 1).
        optimizer: ``"sgd"``, ``"homogenized"`` or ``"svag"``.
        svag_l: SVAG amplification (>= 1).
        momentum, dampening, nesterov, weight_decay: as ``torch.optim.SGD``, for every optimizer (THEORY
            §7, E11-E12; what :class:`TheoryMonitor` reads and predicts).
        scheduler: a learning-rate schedule by name (:mod:`sde_optim.optim.schedules`: ``"constant"``,
            ``"cosine"``, ``"step:N:G"``, ``"warmup-cosine:W"``) over ``Trainer(max_steps)``, stepped
            every optimizer step.
        noise_scale: HomogenizedSGD noise multiplier (>= 0).
        alpha, init, parametrization: passed to :class:`~sde_optim.DiagonalLinearNetwork`.
        dtype: parameter dtype (default float32).
        noise_seed: seed of HomogenizedSGD's noise stream (integer >= 0). ``None`` (default):
            drawn from torch's global generator when the optimizer is created, so it depends on
            what used that generator before (seed it, e.g. ``seed_everything``, right before each
            fit to compare runs). A resumed fit restores the stream from the checkpoint either way.
        nonfinite: ``"skip"`` or ``"raise"``, the non-finite policy of HomogenizedSGD and SVAG
            (see :class:`~sde_optim.optim._base._SGDFamily`); ``"sgd"`` is plain
            ``torch.optim.SGD`` and accepts only the default.
        increments: the law of HomogenizedSGD's standardized draws, ``"gaussian"`` (default) or
            ``"rademacher"`` (the same risk and curvature laws at weak order 1, ~14x cheaper to draw on a
            CPU; :mod:`sde_optim.optim.increments`); only for ``optimizer="homogenized"``.
    """

    def __init__(
        self,
        problem: TeacherProblem | TeacherSpec,
        *,
        lr: float,
        sgd_batch_size: int = 1,
        optimizer: OptimizerName = "sgd",
        svag_l: float = 4,
        noise_scale: float = 1.0,
        alpha: float = 0.1,
        init: Literal["unbalanced", "balanced"] = "unbalanced",
        parametrization: Literal["uv", "pm"] = "uv",
        dtype: torch.dtype = torch.float32,
        noise_seed: int | None = None,
        nonfinite: Literal["skip", "raise"] = "skip",
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        scheduler: str = "constant",
        increments: Literal["gaussian", "rademacher"] = "gaussian",
    ) -> None:
        super().__init__()
        self.problem = as_teacher_problem(problem)
        self.lr = check_float("lr", lr, minimum=0.0, strict=True)
        self.sgd_batch_size = check_int("sgd_batch_size", sgd_batch_size, minimum=1)
        self.optimizer_name = check_choice("optimizer", optimizer, OPTIMIZERS)
        self.svag_l = check_float("svag_l", svag_l, minimum=1.0)
        self.noise_scale = check_float("noise_scale", noise_scale, minimum=0.0)
        self.noise_seed = None if noise_seed is None else check_int("noise_seed", noise_seed, minimum=0)
        self.nonfinite = check_choice("nonfinite", nonfinite, ("skip", "raise"))
        self.sgd_options = dataclasses.asdict(SGDConfig(lr=self.lr, momentum=momentum, dampening=dampening,
                                                        nesterov=nesterov, weight_decay=weight_decay))
        for key in ("lr", "batch_size", "noise_scale"):
            del self.sgd_options[key]
        self.scheduler = check_schedule(scheduler)
        if self.optimizer_name == "sgd" and self.nonfinite != "skip":
            raise ValueError("nonfinite applies to optimizer 'homogenized' or 'svag'; 'sgd' is plain torch.optim.SGD")
        self.increments = check_choice("increments", increments, INCREMENTS)
        if self.optimizer_name != "homogenized" and self.increments != "gaussian":
            raise ValueError(f"increments applies to optimizer 'homogenized' (its noise draws); {self.optimizer_name!r} "
                             "draws none")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.model = DiagonalLinearNetwork(self.problem.dim, alpha=alpha, init=init, parametrization=parametrization, dtype=dtype)
        self._device_problem: TeacherProblem | None = None
        described = isinstance(problem, (TeacherSpec, Mapping))
        self.save_hyperparameters(ignore=["dtype"] if described else ["problem", "dtype"])
        if isinstance(problem, TeacherSpec):  # plain data: checkpoints load with torch.load(weights_only=True)
            self.hparams["problem"] = dataclasses.asdict(problem)

    # ------------------------------------------------------------------ bookkeeping for TheoryMonitor
    @property
    def loader_batch_size(self) -> int:
        """Samples the data module must deliver per optimizer step (:meth:`samples_per_step`)."""
        return self.samples_per_step(self.sgd_batch_size, self.optimizer_name)

    @staticmethod
    def samples_per_step(sgd_batch_size: int, optimizer: OptimizerName) -> int:
        """Samples per optimizer step (per process): ``2 B`` for SVAG's two minibatches, else ``B``."""
        return 2 * sgd_batch_size if optimizer == "svag" else sgd_batch_size

    @property
    def sgd_global_batch_size(self) -> int:
        """The SGD batch over all processes: ``sgd_batch_size`` times the trainer's world size (1 without a trainer)."""
        trainer = self._trainer
        return self.sgd_batch_size * (trainer.world_size if trainer is not None else 1)

    @property
    def global_batch_size(self) -> int:
        """Deprecated name of :attr:`sgd_global_batch_size` (removed in the next release)."""
        warnings.warn("TeacherRegression.global_batch_size is deprecated; use sgd_global_batch_size",
                      DeprecationWarning, stacklevel=2)
        return self.sgd_global_batch_size

    @property
    def sgd_steps_per_step(self) -> float:
        """SGD steps of time covered by one optimizer step (``1 / l`` for SVAG, else 1)."""
        return 1.0 / self.svag_l if self.optimizer_name == "svag" else 1.0

    def population_loss(self) -> Tensor:
        """The exact population risk ``R(beta) = E (f(x) - y)^2 / 2`` (THEORY E1), a 0-d tensor.

        The expectation of :meth:`loss_fn` over fresh samples; its Hessian in ``(u, v)`` has trace
        ``(1/d) sum lambda_i (u_i^2 + v_i^2)``, the curvature of E7. :class:`CurvatureMonitor` uses it
        as its probe loss by default.
        """
        return self.teacher().population_risk(self.model.beta)

    def teacher(self) -> TeacherProblem:
        """The problem on this module's device and dtype (cached)."""
        p = self._device_problem
        if p is None or p.device != self.device or p.dtype != self.model.beta.dtype:
            self._device_problem = p = self.problem.to(self.device, self.model.beta.dtype)
        return p

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        check_strategy(self.trainer.strategy, "TeacherRegression")

    def on_fit_start(self) -> None:
        self.teacher()  # move the problem once, outside any torch.func transform that may call teacher()

    def on_train_start(self) -> None:
        self._logger_step_checked = False

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Lightning 2.6's epoch loop, when restarting, adds 1 to `_batches_that_stepped` (the
        # logger step of `self.log`) on the assumption that the checkpoint was written in
        # on_train_batch_end, before its own increment. A checkpoint from `trainer.save_checkpoint`
        # after a fit (or at an epoch end) already holds the incremented value, so the resumed
        # curves were shifted one step against an uninterrupted run. With this module's single
        # optimizer every batch that stepped is one optimizer step: the counter must equal
        # `global_step`. Set it once per fit, after the loop's reset (a no-op when it is right).
        if not getattr(self, "_logger_step_checked", True):
            self._logger_step_checked = True
            loop = self.trainer.fit_loop.epoch_loop
            if hasattr(loop, "_batches_that_stepped"):
                loop._batches_that_stepped = self.trainer.global_step

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
            return self.population_loss()  # exact drift (E3)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = self.loss_fn(self(x.to(self.model.beta.dtype)), y.to(self.model.beta.dtype))
        self.log("val/loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def configure_optimizers(self) -> Any:
        opt = self._optimizer()
        if self.scheduler == "constant":
            return opt
        trainer = self._trainer
        steps = trainer.max_steps if trainer is not None and trainer.max_steps and trainer.max_steps > 0 else None
        if steps is None:
            raise ValueError(f"scheduler={self.scheduler!r} needs Trainer(max_steps=...) >= 1 to know the run's length")
        return {"optimizer": opt, "lr_scheduler": {"scheduler": make_scheduler(opt, self.scheduler, steps),
                                                   "interval": "step", "frequency": 1}}

    def _optimizer(self) -> torch.optim.Optimizer:
        params, sgd = self.model.parameters(), self.sgd_options
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, **sgd)
        if self.optimizer_name == "svag":
            return SVAG(params, lr=self.lr, l=self.svag_l, nonfinite=self.nonfinite, **sgd)
        noise = StructuredNoise(self.problem, self.model, increments=self.increments)
        return HomogenizedSGD(params, lr=self.lr, batch_size=self.sgd_global_batch_size, noise=noise,
                              noise_scale=self.noise_scale, seed=self.noise_seed, nonfinite=self.nonfinite, **sgd)
