"""Log measured observables next to the theory's prediction during ordinary training."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import replace
from typing import Any, Iterable, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from .._validation import check_choice, check_float, check_int, check_strategy
from ..models import DiagonalLinearNetwork
from ..observables import measure, relative_error, resolve_observables
from ..optim import SVAG, HomogenizedSGD
from ..plotting import comparison_figure, prediction_series
from ..teacher import TeacherProblem, TeacherSpec, as_teacher_problem
from ..theory import METHODS, Prediction, SGDConfig, critical_lr, describe_sgd, predict
from ._monitor import FEW_POINTS, MonitorCallback

__all__ = ["TheoryMonitor", "DEPARTURES", "Method", "BATCH_ATTRIBUTE", "TIME_ATTRIBUTE"]

Method = Literal["pde", "particles", "ode", "gradient_flow"]
"""The prediction methods of :func:`sde_optim.predict` (``sde_optim.theory.METHODS``)."""

# The one declared place for the SGD being predicted, when not passed to the monitor (see the class docstring).
BATCH_ATTRIBUTE = "sgd_global_batch_size"
TIME_ATTRIBUTE = "sgd_steps_per_step"

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


class TheoryMonitor(MonitorCallback):
    """Track risk, curvature, ... of a :class:`~sde_optim.DiagonalLinearNetwork` against the PDE.

    At the start of training the callback reads the SGD the run performs off the trainer: the
    optimizer's ``lr``, ``momentum``, ``dampening``, ``nesterov`` and ``weight_decay`` and the
    future learning rates of its schedulers (``configure_optimizers``' ``lr_scheduler``, with
    their ``interval`` and ``frequency``), replayed on a deep copy by
    :func:`sde_optim.theory.describe_sgd` (THEORY §7, E10-E12), and the SGD batch and time scale
    from one declared place (below). It computes the prediction once (:func:`sde_optim.predict`,
    THEORY E6/E7) up to ``trainer.max_steps``, on global rank zero, broadcast to the others. If
    the prediction diverges, it warns before the first step, naming the predicted critical
    learning rate (in units of the schedule's peak; :func:`sde_optim.critical_lr` at ``rel_tol=0.05``,
    whose grid-checked search takes tens of seconds to minutes at large ``d`` before training starts).

    Only the SGD of THEORY is predicted: ``torch.optim.SGD``, :class:`~sde_optim.HomogenizedSGD`
    and :class:`~sde_optim.SVAG`, one learning rate and one set of hyper-parameters for every
    param group, ``maximize=False``, one optimizer. Anything else (Adam, RMSprop, ...) is a
    ``TypeError`` / ``ValueError`` at the start of training naming what is supported: no curve
    is drawn for an optimizer the theory does not model.

    At optimizer steps ``0, n, 2n, ...`` (``n`` = ``every_n_steps``; when ``None``, about 32
    measurements over ``max_steps``, or the steps of another monitor given ``every_n_steps``:
    see :mod:`sde_optim.lightning._monitor`) it writes to every logger, once per step, at the
    logger step ``global_step`` (the number of optimizer steps taken):

    * ``{obs}/measured``: the exact value from the teacher (E7, :func:`sde_optim.measure`);
    * ``{obs}/predicted``: the prediction at the same SGD step;
    * ``{obs}/rel_error``: ``|measured - predicted| / |predicted|``;
    * ``{obs}/scatter`` (methods ``"pde"``, ``"gradient_flow"``): how far one run at this ``d`` is expected to stray
      from the prediction, relative (one standard deviation, :attr:`Prediction.scatter`): a ``rel_error`` within
      about twice it is the run's own finite-``d`` noise, not a departure from the theory. The figure draws it
      as a band around the prediction, and the departure test below allows for it.

    With a TensorBoard logger it also registers a custom-scalar layout that overlays
    measured and predicted in one chart per observable (with :class:`CurvatureMonitor`'s
    Hutchinson trace in the curvature chart when both run). At fit end it draws the figure
    (prediction line, measurements as markers), saves it as ``theory_monitor.png`` in the
    logger's directory (or ``trainer.default_root_dir`` without a logger), adds it to
    TensorBoard, and prints a summary table that says how many measurements its maximum
    errors come from (and warns when they are fewer than ``FEW_POINTS`` = 5).

    Batch size and time, declared once. The prediction needs the batch ``B`` of the SGD the run
    performs, over all processes, and how many SGD steps of time one optimizer step covers.
    Each is read from exactly one place:

    * the argument (``batch_size``, ``sgd_steps_per_step``) if given, else
    * the LightningModule attribute ``sgd_global_batch_size`` (int: ``B`` summed over all DDP
      processes) and ``sgd_steps_per_step`` (float: 1 for SGD and HomogenizedSGD, ``1 / l`` for
      :class:`~sde_optim.SVAG`), read at fit start (a property may use ``self.trainer.world_size``).

    :class:`~sde_optim.lightning.TeacherRegression` declares both. Without either, fit start
    raises a ``ValueError`` naming both ways. (For one release a module that declares neither
    still gets the old guess, from ``pl_module.sgd_batch_size`` times the world size,
    ``HomogenizedSGD.batch_size`` or the data module's ``batch_size``, and ``1 / l`` for SVAG,
    with a ``FutureWarning``.) A declared batch that differs from ``HomogenizedSGD.batch_size``,
    or a time scale that differs from ``1 / l`` under SVAG, is warned about.

    A learning rate the prediction did not foresee (a ``ReduceLROnPlateau`` step, a scheduler
    stepped by hand, an lr set by another callback) is detected at each measurement: the callback
    warns once, logs ``theory/assumptions_hold`` = 0 from that point on (1 before), draws those
    points apart in the figure ("not predicted") and leaves them out of the summary's errors and
    of the departure test.

    Departure: the first logged step at which ``risk/rel_error`` exceeds its allowance (or the
    measured or predicted risk is not finite) is kept in ``departure_step``, and ``departure``
    says which of three cases it is. The allowance is ``threshold``, widened to ``scatter_sigmas``
    times the prediction's ``risk/scatter`` at that step where that is larger: one run strays from the
    d -> infinity curves by its own finite-``d`` noise (THEORY §1), which a fixed threshold mistook for a
    departure (plain SGD, 256 runs, 33 measurements each: 71-99 % of the runs "left" the prediction at
    ``d = 64`` and 30 % at ``d = 1024`` on THEORY §6's setting; with the allowance 2-5 % and 1 %,
    ``benchmarks/departure_rate.py``). The cases:

    * ``"diverged as predicted"``: the prediction diverges (``prediction.divergence_step``) and
      the measured risk is above the prediction or not finite;
    * ``"diverged against the prediction"``: the prediction stays bounded but training diverged:
      the measured risk is not finite or above ``blowup_factor`` times the risk at step 0 (the
      divergence criterion of :func:`sde_optim.predict`). A departure first classified as
      ``"left the prediction"`` is upgraded when training diverges later;
    * ``"left the prediction"``: any other departure (training stays finite but more than
      its allowance away, e.g. a predicted blow-up that training does not follow).

    ``None`` while training follows the prediction.

    Distributed (DDP, ``ddp_spawn``): the prediction and the critical learning rate are computed
    on global rank zero only and broadcast; the parameters are identical on all ranks, so the
    measured values need no reduction (each rank measures, loggers write on rank zero only,
    each step once). Under ``ddp_spawn`` the fit runs in spawned processes: this object in the
    launching process keeps no history (read the logs or the figure). Sharding strategies (FSDP,
    DeepSpeed, ModelParallel) are refused at setup.

    Args:
        problem: the teacher the network is trained on (a :class:`~sde_optim.TeacherProblem`, or a
            :class:`~sde_optim.TeacherSpec`, built once here).
        every_n_steps: optimizer steps between measurements (>= 1), or ``None`` (see above).
        observables: names from :data:`sde_optim.OBSERVABLES` (default risk and curvature).
        method: prediction method passed to :func:`sde_optim.predict`.
        lr: a constant learning rate to predict instead of the optimizer's and its schedulers' (> 0), e.g. to
            see what another lr would do; the other hyper-parameters are still read from the optimizer, and
            the optimizer's lr is then not checked against it.
        batch_size: the global SGD batch ``B`` (>= 1); default: ``pl_module.sgd_global_batch_size``.
        sgd_steps_per_step: SGD steps of time per optimizer step (> 0); default:
            ``pl_module.sgd_steps_per_step``.
        threshold: relative risk error that counts as leaving the prediction (> 0), at least.
        scatter_sigmas: the allowance is at least this many one-run standard deviations ``risk/scatter``
            (>= 0; 0: ``threshold`` alone). The default 5 leaves room for the predicted scatter reading 1.4-2.1x
            low on sparse teachers at ``d >= 64`` (fluctuations shared by all coordinates, through ``R(t)`` and the
            common sample, are not in it) and for the ~33 measurements of a run each having a chance to stray.
        blowup_factor: measured risk above this times the risk at step 0 counts as diverged (> 1).
        save_figure: draw and save the figure at fit end.
    """

    def __init__(
        self,
        problem: TeacherProblem | TeacherSpec,
        *,
        every_n_steps: int | None = None,
        observables: Iterable[str] | str | None = ("risk", "curvature"),
        method: Method = "pde",
        lr: float | None = None,
        batch_size: int | None = None,
        sgd_steps_per_step: float | None = None,
        threshold: float = 0.25,
        scatter_sigmas: float = 5.0,
        blowup_factor: float = 1e4,
        save_figure: bool = True,
    ) -> None:
        super().__init__(every_n_steps)
        self.problem = as_teacher_problem(problem)
        self.observables = tuple(o.name for o in resolve_observables(observables))
        if "risk" not in self.observables:
            self.observables = ("risk",) + self.observables
        self.method = check_choice("method", method, METHODS)
        self.lr = None if lr is None else check_float("lr", lr, minimum=0.0, strict=True)
        self.batch_size = None if batch_size is None else check_int("batch_size", batch_size, minimum=1)
        self.sgd_steps_per_step = (None if sgd_steps_per_step is None else
                                   check_float("sgd_steps_per_step", sgd_steps_per_step, minimum=0.0, strict=True))
        self.threshold = check_float("threshold", threshold, minimum=0.0, strict=True)
        self.scatter_sigmas = check_float("scatter_sigmas", scatter_sigmas, minimum=0.0)
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
        self._sgd: SGDConfig | None = None
        self._assumptions_hold = True
        self._batch_used: int | None = None
        self._initial: tuple[torch.Tensor, torch.Tensor, str] | None = None
        self._time_per_step = 1.0
        self._sgd_horizon = 0
        self._lr_peak = 0.0

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer.strategy, "TheoryMonitor")

    def _declared_sgd(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[int, float]:
        """``(global SGD batch, SGD steps per optimizer step)``: the argument, else the module's attribute."""
        batch = self.batch_size if self.batch_size is not None else getattr(pl_module, BATCH_ATTRIBUTE, None)
        per_step = self.sgd_steps_per_step if self.sgd_steps_per_step is not None else getattr(pl_module, TIME_ATTRIBUTE, None)
        if batch is None or per_step is None:
            batch, per_step = _legacy_sgd(trainer, pl_module, batch, per_step)
        batch = check_int(f"{type(pl_module).__name__}.{BATCH_ATTRIBUTE}", batch, minimum=1)
        per_step = check_float(f"{type(pl_module).__name__}.{TIME_ATTRIBUTE}", per_step, minimum=0.0, strict=True)
        opt = trainer.optimizers[0]
        if isinstance(opt, HomogenizedSGD) and opt.batch_size != batch:
            rank_zero_warn(f"TheoryMonitor predicts SGD with batch {batch}, but HomogenizedSGD simulates batch {opt.batch_size}")
        if isinstance(opt, SVAG) and not math.isclose(per_step, 1.0 / opt.l):
            rank_zero_warn(f"TheoryMonitor counts {per_step:g} SGD steps per optimizer step, but SVAG(l={opt.l:g}) "
                           f"covers {1.0 / opt.l:g}")
        return batch, per_step

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_prediction(trainer, pl_module)
        self._register_layout(trainer)
        if trainer.global_step == 0 and not self.history["step"]:
            self._log(trainer, pl_module, 0)

    def _describe(self, trainer: pl.Trainer, horizon: int, batch: int) -> SGDConfig:
        """The SGD of this run over ``horizon`` SGD steps: :func:`describe_sgd` on the trainer's optimizer and
        schedulers (``interval="epoch"`` schedulers step every ``frequency`` epochs of optimizer steps)."""
        if len(trainer.optimizers) != 1:
            raise ValueError(f"TheoryMonitor predicts one SGD; the module configures {len(trainer.optimizers)} optimizers")
        opt = trainer.optimizers[0]
        schedulers = []
        for config in trainer.lr_scheduler_configs:
            every = config.frequency
            if config.interval == "epoch":
                per_epoch = _optimizer_steps_per_epoch(trainer)
                if per_epoch is None:
                    rank_zero_warn(f"TheoryMonitor: {type(config.scheduler).__name__} steps once per epoch, but the epoch "
                                   "length is unknown (an iterable dataset without len): the prediction assumes the "
                                   "current learning rate, and points after a change are marked")
                    continue
                every *= per_epoch
            schedulers.append((config.scheduler, every))
        with warnings.catch_warnings():
            if not trainer.is_global_zero:  # every rank replays the same schedulers: warn once, on rank zero
                warnings.simplefilter("ignore")
            sgd, _ = describe_sgd(opt, schedulers, steps=horizon, batch_size=batch)  # warns on a metric-driven scheduler
        if self.lr is not None:
            if schedulers:
                rank_zero_warn(f"TheoryMonitor(lr={self.lr:g}) predicts a constant learning rate; the run's schedulers "
                               "are ignored by the prediction")
            sgd = SGDConfig(lr=self.lr, batch_size=batch, momentum=sgd.momentum, dampening=sgd.dampening,
                            nesterov=sgd.nesterov, weight_decay=sgd.weight_decay)
        return sgd

    def _extended(self, trainer: pl.Trainer, horizon: int, batch: int) -> SGDConfig:
        """The stored SGD for the steps already taken, then the trainer's from the current step to ``horizon``."""
        assert self._sgd is not None
        first = self._sgd
        done = min(int(trainer.global_step * self._time_per_step), self._sgd_horizon)
        later = self._describe(trainer, horizon - done, batch)
        if first.constant and later.constant and (first.lr, first.batch_size) == (later.lr, later.batch_size):
            return later
        if first.weight_decay != later.weight_decay:  # kappa = d lr_eff wd (E12) takes one weight decay
            rank_zero_warn(f"TheoryMonitor: the weight decay changed on resume ({first.weight_decay:g} -> "
                           f"{later.weight_decay:g}); the prediction applies {later.weight_decay:g} to the "
                           f"{done} SGD steps already taken too (one weight decay per prediction, E12)")
        # one momentum for both parts, each keeping its own effective step lr (1 - tau) / (1 - mu) (E11): a resumed
        # run's momentum may differ from the stored one (changed, or moved by a scheduler: describe_sgd writes a
        # scheduled momentum as the lr at its largest value, which differs between the two spans); each part keeps
        # its own batch size (E10)
        merged = SGDConfig(lr=1.0, momentum=max(first.momentum, later.momentum), dampening=later.dampening,
                           nesterov=later.nesterov, weight_decay=later.weight_decay)

        def joined(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.cat([a.expand(self._sgd_horizon)[:done], b.expand(horizon - done)])

        lr = joined(first.lr_schedule(self._sgd_horizon) * (first.momentum_factor / merged.momentum_factor),
                    later.lr_schedule(horizon - done) * (later.momentum_factor / merged.momentum_factor))
        batches = joined(first.batch_schedule(self._sgd_horizon), later.batch_schedule(horizon - done))
        return replace(merged, lr=lr, batch_size=batches)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.optimizers:
            raise ValueError("TheoryMonitor needs an optimizer to read the learning rate from")
        if trainer.max_steps is None or trainer.max_steps < 1:
            raise ValueError("TheoryMonitor needs Trainer(max_steps=...) >= 1 to set the prediction's horizon")

    def _start_prediction(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        batch, self._time_per_step = self._declared_sgd(trainer, pl_module)
        self._resolve_cadence(trainer)
        horizon = max(1, math.ceil(trainer.max_steps * self._time_per_step))
        if self._sgd is None:
            self._sgd, self._sgd_horizon = self._describe(trainer, horizon, batch), horizon
        elif self._sgd_horizon < horizon:  # resumed with a longer horizon: the schedulers are at step `done` now
            self._sgd, self._sgd_horizon = self._extended(trainer, horizon, batch), horizon
        self._lr_used = self._sgd.lr_at(0)
        self._lr_peak = float(self._sgd.lr_schedule(horizon).max())
        network = _find_network(pl_module)
        if self._initial is None:  # a fresh fit: the prediction starts from the current state
            u, v = network.uv_state()
            self._initial = (u.detach().cpu().clone(), v.detach().cpu().clone(), network.parametrization)
        elif self.prediction is not None and int(self.prediction.steps[-1]) >= horizon:
            return  # resumed: the restored prediction already covers the horizon
        # (resumed with a longer horizon: predict again from the initial state, not the current one)
        model = DiagonalLinearNetwork.from_state(self._initial[0], self._initial[1], parametrization=self._initial[2])
        self.prediction, crit = trainer.strategy.broadcast(
            self._predict(model, batch, horizon) if trainer.is_global_zero else None, src=0)
        self._batch_used = batch
        if crit is not None:
            rank_zero_warn(
                f"TheoryMonitor: at lr={self._lr_used:g} ({_describe_extras(self._sgd)}) and batch size {batch} the "
                f"PDE predicts that the risk diverges at SGD step {self.prediction.divergence_step}; predicted "
                f"critical lr: {crit:.4g}" + (" (peak of the schedule)" if not self._sgd.constant else "")
            )

    def _predict(self, model: DiagonalLinearNetwork, batch: int, horizon: int) -> tuple[Prediction, float | None]:
        """The prediction and, if it diverges, the predicted critical lr (run on global rank zero)."""
        prediction = predict(self.problem, model, sgd=self._sgd, steps=horizon, method=self.method,
                             observables=self.observables)
        if prediction.divergence_step is None:
            return prediction, None
        return prediction, critical_lr(self.problem, model, sgd=self._sgd, steps=horizon, rel_tol=0.05,
                                       decay=False).bounded

    # ------------------------------------------------------------------ per step
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if not self._due(step) or (self.history["step"] and self.history["step"][-1] >= step):
            return
        self._log(trainer, pl_module, step)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        assert self.prediction is not None
        sgd_step = step * self._time_per_step
        self._check_lr(trainer, step, sgd_step)
        measured = measure(self.problem, _find_network(pl_module), self.observables)
        predicted = self.prediction.at_step(sgd_step)
        metrics = {"theory/assumptions_hold": float(self._assumptions_hold)}
        self.history["step"].append(step)
        self.history.setdefault("assumptions_hold", []).append(self._assumptions_hold)
        for name in self.observables:
            m, p = float(measured[name]), float(predicted[name])
            values = {"measured": m, "predicted": p, "rel_error": relative_error(m, p)}
            if f"{name}_scatter" in predicted:  # the PDE's (and gradient flow's): one run's expected spread at this d
                values["scatter"] = float(predicted[f"{name}_scatter"])
            for key, value in values.items():
                metrics[f"{name}/{key}"] = value
                self.history.setdefault(f"{name}/{key}", []).append(value)
        if self._assumptions_hold:
            self._check_departure(step, metrics["risk/measured"], metrics["risk/predicted"], metrics.get("risk/scatter"))
        self._write(trainer, metrics, step)

    def _check_lr(self, trainer: pl.Trainer, step: int, sgd_step: float) -> None:
        """Mark this and later points if the optimizer's lr is not the one the prediction assumed at this step."""
        assert self._sgd is not None
        k = int(sgd_step)
        if self.lr is not None or not self._assumptions_hold or k != sgd_step or k >= self._sgd_horizon:
            return  # lr given: predicting another lr on purpose; already marked; inside an SVAG step; or the lr
            # after the last step, which no step uses
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        lr_now = float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)  # once per measurement, not per step
        expected = self._sgd.lr_at(k)
        if math.isclose(lr_now, expected, rel_tol=1e-6, abs_tol=1e-9 * self._lr_peak):
            return
        self._assumptions_hold = False
        rank_zero_warn(f"TheoryMonitor: at step {step} the learning rate is {lr_now:g}, the prediction assumed "
                       f"{expected:g}; later points are marked theory/assumptions_hold = 0 and left out of the errors")

    def allowance(self, scatter: float | None) -> float:
        """The relative risk error that still follows the prediction: ``max(threshold, scatter_sigmas * scatter)``
        (``scatter``: the prediction's ``risk/scatter`` at that step, if it has one)."""
        if scatter is None or not math.isfinite(scatter):
            return self.threshold
        return max(self.threshold, self.scatter_sigmas * scatter)

    def _check_departure(self, step: int, measured: float, predicted: float, scatter: float | None = None) -> None:
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
        allowed = self.allowance(scatter)
        if finite and abs(measured - predicted) <= allowed * abs(predicted):
            return
        self.departure_step = step
        above = math.isfinite(predicted) and measured > predicted
        if diverged or (above and self.prediction.divergence_step is not None):
            self.departure = self._divergence_kind()
        else:
            self.departure = LEFT
        widened = "" if allowed == self.threshold else f" ({self.scatter_sigmas:g} x one run's scatter at d = {self.problem.dim})"
        rank_zero_warn(f"TheoryMonitor: at step {step} the measured risk {measured:.4g} is more than "
                       f"{allowed:.0%}{widened} away from the predicted {predicted:.4g}: {self.departure}")

    def _divergence_kind(self) -> str:
        assert self.prediction is not None
        return AS_PREDICTED if self.prediction.divergence_step is not None else AGAINST_PREDICTION

    # ------------------------------------------------------------------ layout, figure, summary
    def layout_charts(self, trainer: pl.Trainer) -> dict[str, list[str]]:
        """One chart per observable: measured and predicted overlaid."""
        return {name: [f"{name}/measured", f"{name}/predicted"] for name in self.observables}

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
        rank_zero_info(self.summary())
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
        predicted, scatter = prediction_series(self.prediction, self.observables)
        hold = self._hold_mask()
        measured = {}
        for label, keep in (("training", True), ("training (lr not predicted)", False)):
            idx = [i for i, h in enumerate(hold) if h is keep]
            if idx:
                measured[label] = {n: ([steps[i] for i in idx], [self.history[f"{n}/measured"][i] for i in idx])
                                   for n in self.observables}
        extras = "" if self._sgd is None else f", {_describe_extras(self._sgd)}"
        title = f"lr={self._lr_used:g}{extras}, batch={self._batch_used}, d={self.problem.dim}"
        return comparison_figure(predicted, measured, title=title, scatter=scatter)

    def _hold_mask(self) -> list[bool]:
        return list(self.history.get("assumptions_hold", [True] * len(self.history["step"])))

    def summary(self) -> str:
        """The table printed at fit end: last values and maximum relative errors, with the number of
        measurements they come from (and a warning line when those are fewer than ``FEW_POINTS``), and, where the
        prediction has a one-run scatter, the largest error in units of it (``rel_error / scatter``: a few is the
        run's own finite-``d`` noise)."""
        steps = self.history["step"]
        lines = [f"{len(steps)} measurement(s) at optimizer steps {steps[0]}..{steps[-1]}"
                 + (f" every {self._every}" if self._every else ""),
                 f"{'observable':<18}{'measured (last)':>16}{'predicted':>14}{'max rel err':>13}{'in scatters':>13}"]
        hold = self._hold_mask()
        for n in self.observables:
            errors = [e for e, h in zip(self.history[f"{n}/rel_error"], hold) if h]
            worst = f"{max(errors):>13.2%}" if errors else f"{'-':>13}"
            spread = self.history.get(f"{n}/scatter", [])
            units = [e / s for e, s, h in zip(self.history[f"{n}/rel_error"], spread, hold) if h and s > 0]
            worst_units = f"{max(units):>13.1f}" if units else f"{'-':>13}"
            lines.append(f"{n:<18}{self.history[f'{n}/measured'][-1]:>16.5g}{self.history[f'{n}/predicted'][-1]:>14.5g}"
                         f"{worst}{worst_units}")
        if not all(hold):
            first = steps[hold.index(False)]
            lines.append(f"{hold.count(False)} measurement(s) from step {first} on had a learning rate the prediction "
                         "did not assume: left out of the errors")
        if len(steps) < FEW_POINTS:
            lines.append(f"only {len(steps)} measurement(s): too few for the maximum error to describe the run; "
                         "lower every_n_steps (or leave it None)")
        if self.departure_step is not None:
            lines.append(f"departure from the prediction at step {self.departure_step}: {self.departure}")
        return "TheoryMonitor summary\n" + "\n".join(lines)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "prediction": None if self.prediction is None else self.prediction.to_dict(),
            "history": {k: list(v) for k, v in self.history.items()},
            "departure_step": self.departure_step,
            "departure": self.departure,
            "batch_size": self._batch_used,
            "initial": self._initial,
            "sgd": None if self._sgd is None else (self._sgd.to_dict(self._sgd_horizon), self._sgd_horizon),
            "assumptions_hold": self._assumptions_hold,
            **self._cadence_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pred = state_dict.get("prediction")
        self.prediction = None if pred is None else Prediction(**pred)
        self.history = {k: list(v) for k, v in state_dict["history"].items()}
        self.departure_step = state_dict["departure_step"]
        self.departure = state_dict["departure"]
        self._batch_used = state_dict.get("batch_size")
        self._initial = state_dict.get("initial")
        sgd = state_dict.get("sgd")
        if sgd is not None:
            self._sgd, self._sgd_horizon = SGDConfig.from_dict(sgd[0]), sgd[1]
        self._assumptions_hold = state_dict.get("assumptions_hold", True)
        self._load_cadence_state(state_dict)


def _optimizer_steps_per_epoch(trainer: pl.Trainer) -> int | None:
    """Optimizer steps in one training epoch (``None`` when the epoch length is unknown)."""
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        return None
    return max(1, math.ceil(int(batches) / trainer.accumulate_grad_batches))


def _describe_extras(sgd: SGDConfig) -> str:
    """``momentum=0.9, nesterov, wd=1e-4, lr schedule`` -- what is not plain constant-lr SGD."""
    return ", ".join(sgd.options() + ([] if sgd.constant else ["lr schedule"])) or "plain SGD"


# ---------------------------------------------------------------------- deprecated (remove in the next release)
def _legacy_sgd(trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, per_step: Any) -> tuple[Any, Any]:
    """The guess of release 0.1 for what was not declared, with a ``FutureWarning``; ``ValueError`` if none.

    Batch: ``pl_module.sgd_batch_size`` (per process) times the world size, else
    ``HomogenizedSGD.batch_size``, else the data module's ``batch_size`` times the world size.
    Time: ``1 / l`` under SVAG, else 1.
    """
    opt, world, found = trainer.optimizers[0], trainer.world_size, []
    if batch is None:
        per_process = getattr(pl_module, "sgd_batch_size", None)
        dm_batch = getattr(trainer.datamodule, "batch_size", None)
        if per_process is not None:
            batch, source = int(per_process) * world, "the module's sgd_batch_size x world size"
        elif isinstance(opt, HomogenizedSGD):
            batch, source = opt.batch_size, "HomogenizedSGD.batch_size"
        elif dm_batch is not None:
            batch, source = int(dm_batch) * world, "the data module's batch_size x world size"
        else:
            raise ValueError(
                "TheoryMonitor needs the global batch size of the SGD it predicts: pass "
                f"TheoryMonitor(batch_size=...) or give the LightningModule an attribute {BATCH_ATTRIBUTE} "
                "(the batch summed over all processes)")
        found.append(f"batch size {batch} from {source} (declare TheoryMonitor(batch_size=...) or "
                     f"pl_module.{BATCH_ATTRIBUTE})")
    if per_step is None:
        per_step = 1.0 / opt.l if isinstance(opt, SVAG) else 1.0
        found.append(f"{per_step:g} SGD steps per optimizer step from the optimizer's type (declare "
                     f"TheoryMonitor(sgd_steps_per_step=...) or pl_module.{TIME_ATTRIBUTE})")
    rank_zero_warn("TheoryMonitor guessed " + " and ".join(found) + "; guessing is deprecated and will be removed "
                   "in the next release", category=FutureWarning)
    return batch, per_step
