"""Log measured observables next to the theory's prediction during ordinary training."""

from __future__ import annotations

import math
import os
from typing import Any, Iterable

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from .._validation import check_choice, check_float, check_int, check_strategy
from ..models import DiagonalLinearNetwork
from ..observables import measure, resolve_observables
from ..optim import SVAG, HomogenizedSGD
from ..plotting import comparison_figure
from ..teacher import TeacherProblem
from ..theory import METHODS, Prediction, critical_lr, predict

__all__ = ["TheoryMonitor", "DEPARTURES"]

# The three ways training can leave the prediction (``TheoryMonitor.departure``).
AS_PREDICTED = "diverged as predicted"
AGAINST_PREDICTION = "diverged against the prediction"
LEFT = "left the prediction"
DEPARTURES = (AS_PREDICTED, AGAINST_PREDICTION, LEFT)


def _find_network(module: torch.nn.Module) -> DiagonalLinearNetwork:
    for m in module.modules():
        if isinstance(m, DiagonalLinearNetwork):
            return m
    raise ValueError("TheoryMonitor needs a DiagonalLinearNetwork inside the LightningModule; none was found")


def _relative_error(measured: float, predicted: float) -> float:
    """``|m - p| / |p|``; 0 when both vanish (e.g. l1 at a zero initialization: the PDE gives
    ~1e-14 there), inf when only p does. Observables are O(1) in THEORY's normalization, so a
    difference below 1e-12 is rounding."""
    diff = abs(measured - predicted)
    if diff <= 1e-12:
        return 0.0
    return diff / abs(predicted) if predicted != 0 else math.inf


class TheoryMonitor(pl.Callback):
    """Track risk, curvature, ... of a :class:`~sde_optim.DiagonalLinearNetwork` against the PDE.

    At fit start the callback reads the learning rate (first param group of the first
    optimizer) and the SGD batch size (see below) unless given, and computes the prediction
    once (:func:`sde_optim.predict`, THEORY E6/E7) up to ``trainer.max_steps``, on global rank
    zero, broadcast to the others. If the prediction diverges at that learning rate, it warns
    before the first step, naming the predicted critical learning rate.

    Every ``every_n_steps`` optimizer steps (and at step 0) it writes to every logger, at the
    logger step ``global_step`` (the number of optimizer steps taken):

    * ``{obs}/measured``: the exact value from the teacher (E7, :func:`sde_optim.measure`);
    * ``{obs}/predicted``: the prediction at the same SGD step;
    * ``{obs}/rel_error``: ``|measured - predicted| / |predicted|``.

    With a TensorBoard logger it also registers a custom-scalar layout that overlays
    measured and predicted in one chart per observable. At fit end it draws the figure
    (prediction line, measurements as markers), saves it as ``theory_monitor.png`` in the
    logger's directory (or ``trainer.default_root_dir`` without a logger), adds it to
    TensorBoard, and prints a summary table.

    Batch size and time: the SGD batch ``B`` is, in order, ``batch_size`` if given, the
    LightningModule's ``sgd_batch_size``, ``HomogenizedSGD.batch_size``, or the data module's
    ``batch_size``; under DDP the per-process batch is multiplied by the world size (the global
    batch). One optimizer step is one SGD step, except for :class:`~sde_optim.SVAG`, where it is
    ``1 / l`` of one.

    Learning-rate schedules are not predicted: if the learning rate changes during the fit
    the callback warns once and marks later points as outside the prediction's assumptions.

    Departure: the first logged step at which ``risk/rel_error`` exceeds ``threshold`` (or the
    measured or predicted risk is not finite) is kept in ``departure_step``, and ``departure``
    says which of three cases it is:

    * ``"diverged as predicted"``: the prediction diverges (``prediction.divergence_step``) and
      the measured risk is above the prediction or not finite;
    * ``"diverged against the prediction"``: the prediction stays bounded but training diverged:
      the measured risk is not finite or above ``blowup_factor`` times the risk at step 0 (the
      divergence criterion of :func:`sde_optim.predict`). A departure first classified as
      ``"left the prediction"`` is upgraded when training diverges later;
    * ``"left the prediction"``: any other departure (training stays finite but more than
      ``threshold`` away, e.g. a predicted blow-up that training does not follow).

    ``None`` while training follows the prediction.

    Distributed (DDP): the prediction and the critical learning rate are computed on global
    rank zero only and broadcast; the parameters are identical on all ranks, so the measured
    values need no reduction (each rank measures, loggers write on rank zero only, each step
    once). The batch size read from the module or data module is per process and is multiplied
    by the world size. Sharding strategies (FSDP, DeepSpeed, ModelParallel) are refused at setup.

    Args:
        problem: the teacher the network is trained on.
        every_n_steps: optimizer steps between measurements (>= 1).
        observables: names from :data:`sde_optim.OBSERVABLES` (default risk and curvature).
        method: prediction method passed to :func:`sde_optim.predict`.
        lr, batch_size: override what is read from the trainer.
        threshold: relative risk error that counts as leaving the prediction (> 0).
        blowup_factor: measured risk above this times the risk at step 0 counts as diverged (> 1).
        save_figure: draw and save the figure at fit end.
    """

    def __init__(
        self,
        problem: TeacherProblem,
        *,
        every_n_steps: int = 50,
        observables: Iterable[str] | str | None = ("risk", "curvature"),
        method: str = "pde",
        lr: float | None = None,
        batch_size: int | None = None,
        threshold: float = 0.25,
        blowup_factor: float = 1e4,
        save_figure: bool = True,
    ) -> None:
        if not isinstance(problem, TeacherProblem):
            raise TypeError(f"problem must be a TeacherProblem, got {type(problem).__name__}")
        self.problem = problem
        self.every_n_steps = check_int("every_n_steps", every_n_steps, minimum=1)
        self.observables = tuple(o.name for o in resolve_observables(observables))
        if "risk" not in self.observables:
            self.observables = ("risk",) + self.observables
        self.method = check_choice("method", method, METHODS)
        self.lr = None if lr is None else check_float("lr", lr, minimum=0.0, strict=True)
        self.batch_size = None if batch_size is None else check_int("batch_size", batch_size, minimum=1)
        self.threshold = check_float("threshold", threshold, minimum=0.0, strict=True)
        self.blowup_factor = check_float("blowup_factor", blowup_factor, minimum=1.0, strict=True)
        if not isinstance(save_figure, bool):
            raise TypeError(f"save_figure must be a bool, got {type(save_figure).__name__}")
        self.save_figure = save_figure
        self.prediction: Prediction | None = None
        self.history: dict[str, list[float]] = {"step": []}
        self.departure_step: int | None = None
        self.departure: str | None = None
        self.figure_path: str | None = None
        self._lr_used: float | None = None
        self._initial: tuple[torch.Tensor, torch.Tensor, str] | None = None
        self._time_per_step = 1.0
        self._warned_lr = False

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer.strategy, "TheoryMonitor")

    def _sgd_batch_size(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        if self.batch_size is not None:
            return self.batch_size
        per_process = getattr(pl_module, "sgd_batch_size", None)
        opt = trainer.optimizers[0] if trainer.optimizers else None
        if per_process is None and isinstance(opt, HomogenizedSGD):
            return opt.batch_size  # the optimizer simulates a given (global) batch size
        if per_process is None:
            dm = trainer.datamodule
            per_process = getattr(dm, "batch_size", None)
        if per_process is None:
            raise ValueError("TheoryMonitor cannot find the SGD batch size: pass batch_size=...")
        if isinstance(opt, HomogenizedSGD) and getattr(pl_module, "optimizer_name", "") == "homogenized":
            return opt.batch_size
        return int(per_process) * trainer.world_size

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.optimizers:
            raise ValueError("TheoryMonitor needs an optimizer to read the learning rate from")
        opt = trainer.optimizers[0]
        self._lr_used = self.lr if self.lr is not None else float(opt.param_groups[0]["lr"])
        self._time_per_step = 1.0 / opt.l if isinstance(opt, SVAG) else 1.0
        if trainer.max_steps is None or trainer.max_steps < 1:
            raise ValueError("TheoryMonitor needs Trainer(max_steps=...) >= 1 to set the prediction's horizon")
        horizon = max(1, math.ceil(trainer.max_steps * self._time_per_step))
        network = _find_network(pl_module)
        if self._initial is None:  # a fresh fit: the prediction starts from the current state
            u, v = network.uv_state()
            self._initial = (u.detach().cpu().clone(), v.detach().cpu().clone(), network.parametrization)
        elif self.prediction is not None and int(self.prediction.steps[-1]) >= horizon:
            return  # resumed: the restored prediction already covers the horizon
        # (resumed with a longer horizon: predict again from the initial state, not the current one)
        model = DiagonalLinearNetwork.from_state(self._initial[0], self._initial[1], parametrization=self._initial[2])
        batch = self._sgd_batch_size(trainer, pl_module)
        self.prediction, crit = trainer.strategy.broadcast(
            self._predict(model, batch, horizon) if trainer.is_global_zero else None, src=0)
        self._batch_used = batch
        if crit is not None:
            rank_zero_warn(
                f"TheoryMonitor: at lr={self._lr_used} and batch size {batch} the PDE predicts that the risk "
                f"diverges at SGD step {self.prediction.divergence_step}; predicted critical lr: {crit:.4g}"
            )
        self._register_layout(trainer)

    def _predict(self, model: DiagonalLinearNetwork, batch: int, horizon: int) -> tuple[Prediction, float | None]:
        """The prediction and, if it diverges, the predicted critical lr (run on global rank zero)."""
        prediction = predict(self.problem, model, lr=self._lr_used, batch_size=batch, steps=horizon,
                             method=self.method, observables=self.observables)
        if prediction.divergence_step is None:
            return prediction, None
        return prediction, critical_lr(self.problem, model, batch_size=batch, steps=horizon, rel_tol=0.05).bounded

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == 0 and not self.history["step"]:
            self._log(trainer, pl_module, 0)

    # ------------------------------------------------------------------ per step
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or (self.history["step"] and self.history["step"][-1] >= step):
            return
        self._log(trainer, pl_module, step)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        assert self.prediction is not None
        lr_now = float(trainer.optimizers[0].param_groups[0]["lr"])
        if self.lr is None and lr_now != self._lr_used and not self._warned_lr:
            rank_zero_warn(f"TheoryMonitor: the learning rate changed from {self._lr_used} to {lr_now} at step {step}; "
                           "the prediction assumes a constant learning rate and is not valid from here on")
            self._warned_lr = True
        sgd_step = step * self._time_per_step
        measured = measure(self.problem, _find_network(pl_module), self.observables)
        predicted = self.prediction.at_step(sgd_step)
        metrics = {}
        self.history["step"].append(step)
        for name in self.observables:
            m, p = float(measured[name]), float(predicted[name])
            rel = _relative_error(m, p)
            metrics.update({f"{name}/measured": m, f"{name}/predicted": p, f"{name}/rel_error": rel})
            for key, value in (("measured", m), ("predicted", p), ("rel_error", rel)):
                self.history.setdefault(f"{name}/{key}", []).append(value)
        self._check_departure(step, metrics["risk/measured"], metrics["risk/predicted"])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _check_departure(self, step: int, measured: float, predicted: float) -> None:
        """Record the first departure from the prediction and classify it (class docstring)."""
        assert self.prediction is not None
        diverged = not math.isfinite(measured) or measured > self.blowup_factor * self.history["risk/measured"][0]
        if self.departure == LEFT and diverged:  # a departure that turned into a divergence later
            self.departure = self._divergence_kind()
            rank_zero_warn(f"TheoryMonitor: at step {step} training diverged: {self.departure}")
            return
        if self.departure_step is not None:
            return
        finite = math.isfinite(measured) and math.isfinite(predicted)
        if finite and abs(measured - predicted) <= self.threshold * abs(predicted):
            return
        self.departure_step = step
        above = math.isfinite(predicted) and measured > predicted
        if diverged or (above and self.prediction.divergence_step is not None):
            self.departure = self._divergence_kind()
        else:
            self.departure = LEFT
        rank_zero_warn(f"TheoryMonitor: at step {step} the measured risk {measured:.4g} is more than "
                       f"{self.threshold:.0%} away from the predicted {predicted:.4g}: {self.departure}")

    def _divergence_kind(self) -> str:
        assert self.prediction is not None
        return AS_PREDICTED if self.prediction.divergence_step is not None else AGAINST_PREDICTION

    # ------------------------------------------------------------------ layout, figure, summary
    def _register_layout(self, trainer: pl.Trainer) -> None:
        layout = {"sde_optim": {name: ["Multiline", [f"{name}/measured", f"{name}/predicted"]] for name in self.observables}}
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                rank_zero_only(logger.experiment.add_custom_scalars)(layout)

    def _figure_dir(self, trainer: pl.Trainer) -> str:
        for logger in trainer.loggers:
            if getattr(logger, "log_dir", None):
                return str(logger.log_dir)
        return str(trainer.default_root_dir)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or self.prediction is None or not self.history["step"]:
            return
        if not trainer.loggers:
            rank_zero_info("TheoryMonitor: no logger attached; values are in TheoryMonitor.history")
        self._print_summary()
        if not self.save_figure:
            return
        fig = self.figure()
        directory = self._figure_dir(trainer)
        os.makedirs(directory, exist_ok=True)
        self.figure_path = os.path.join(directory, "theory_monitor.png")
        fig.savefig(self.figure_path, dpi=110)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure("sde_optim/theory_vs_measured", fig, global_step=trainer.global_step)
        import matplotlib.pyplot as plt

        plt.close(fig)

    def figure(self):
        """The measured-vs-predicted figure (matplotlib ``Figure``)."""
        assert self.prediction is not None
        steps = [s * self._time_per_step for s in self.history["step"]]
        pred_steps = self.prediction.steps.tolist()
        predicted = {n: (pred_steps, self.prediction.curves[n].tolist()) for n in self.observables}
        measured = {"training": {n: (steps, self.history[f"{n}/measured"]) for n in self.observables}}
        title = f"lr={self._lr_used:g}, batch={self._batch_used}, d={self.problem.dim}"
        return comparison_figure(predicted, measured, title=title)

    def _print_summary(self) -> None:
        lines = [f"{'observable':<18}{'measured (last)':>16}{'predicted':>14}{'max rel err':>13}"]
        for n in self.observables:
            lines.append(f"{n:<18}{self.history[f'{n}/measured'][-1]:>16.5g}{self.history[f'{n}/predicted'][-1]:>14.5g}"
                         f"{max(self.history[f'{n}/rel_error']):>13.2%}")
        if self.departure_step is not None:
            lines.append(f"departure from the prediction at step {self.departure_step}: {self.departure}")
        rank_zero_info("TheoryMonitor summary\n" + "\n".join(lines))

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "prediction": None if self.prediction is None else self.prediction.to_dict(),
            "history": {k: list(v) for k, v in self.history.items()},
            "departure_step": self.departure_step,
            "departure": self.departure,
            "batch_size": getattr(self, "_batch_used", None),
            "initial": self._initial,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pred = state_dict.get("prediction")
        self.prediction = None if pred is None else Prediction(**pred)
        self.history = {k: list(v) for k, v in state_dict["history"].items()}
        self.departure_step = state_dict["departure_step"]
        self.departure = state_dict["departure"]
        self._batch_used = state_dict.get("batch_size")
        self._initial = state_dict.get("initial")
