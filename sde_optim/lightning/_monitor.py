"""What :class:`TheoryMonitor` and :class:`CurvatureMonitor` share: when they measure, how a
value is written, and the TensorBoard chart layout.

Cadence. A monitor measures the parameters after ``k`` optimizer steps for ``k = 0, n, 2n, ...``
and writes the values at logger step ``k``, once each, to every logger of the trainer
(``logger.log_metrics``, not ``LightningModule.log``: no aggregation, no flush schedule, no
``k - 1`` offset). ``n`` is the monitor's ``every_n_steps`` if given; else the first explicit
``every_n_steps`` among the trainer's monitors (so that the charts share their steps); else
``max(1, total // TARGET_POINTS)`` for a run of ``total`` optimizer steps
(``Trainer(max_steps=...)``, or Lightning's estimate for an epoch-based run), which gives
about ``TARGET_POINTS + 1`` measurements. The resolved ``n`` is checkpointed, so a resumed run
keeps its steps.
"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_warn

from .._validation import check_int

__all__ = ["MonitorCallback", "TARGET_POINTS", "FEW_POINTS", "default_every", "planned_points"]

TARGET_POINTS = 32
"""Measurements (after step 0) that a monitor without ``every_n_steps`` plans over the run."""

FEW_POINTS = 5
"""Fewer measurements than this are too few to judge a curve: warned about and flagged in summaries."""

LAYOUT_CATEGORY = "sde_optim"


def default_every(total_steps: int) -> int:
    """``max(1, total_steps // TARGET_POINTS)``: about ``TARGET_POINTS + 1`` measurements at 0, n, 2n, ..."""
    return max(1, int(total_steps) // TARGET_POINTS)


def planned_points(total_steps: int, every: int) -> int:
    """Number of measurements at steps ``0, every, 2 every, ... <= total_steps``."""
    return int(total_steps) // every + 1


def total_steps(trainer: pl.Trainer) -> int | None:
    """Optimizer steps the fit will take: ``max_steps``, else Lightning's estimate; ``None`` if unbounded."""
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return int(trainer.max_steps)
    estimate = trainer.estimated_stepping_batches
    return int(estimate) if math.isfinite(estimate) else None


class MonitorCallback(pl.Callback):
    """Base of the monitors: cadence (module docstring), direct writes, one shared chart layout."""

    def __init__(self, every_n_steps: int | None) -> None:
        super().__init__()
        self.every_n_steps = None if every_n_steps is None else check_int("every_n_steps", every_n_steps, minimum=1)
        self._every: int | None = None  # resolved at fit start, checkpointed

    # ------------------------------------------------------------------ cadence
    def cadence(self, trainer: pl.Trainer) -> int:
        """Optimizer steps between measurements in this fit (see the module docstring)."""
        if self.every_n_steps is not None:
            return self.every_n_steps
        if self._every is not None:  # restored from a checkpoint
            return self._every
        for cb in trainer.callbacks:
            if isinstance(cb, MonitorCallback) and cb.every_n_steps is not None:
                return cb.every_n_steps
        total = total_steps(trainer)
        if total is None:
            raise ValueError(f"{type(self).__name__}(every_n_steps=None) needs a run of known length to choose its "
                             "cadence: set Trainer(max_steps=...) or pass every_n_steps (an integer >= 1)")
        return default_every(total)

    def _resolve_cadence(self, trainer: pl.Trainer) -> None:
        """Fix ``self._every`` for this fit; warn when an explicit value gives fewer than ``FEW_POINTS`` points."""
        self._every = every = self.cadence(trainer)
        total = total_steps(trainer)
        if self.every_n_steps is not None and total is not None and planned_points(total, every) < FEW_POINTS:
            rank_zero_warn(
                f"{type(self).__name__}(every_n_steps={every}) measures only {planned_points(total, every)} time(s) in "
                f"{total} steps (steps 0, {every}, ...): too few to follow a curve; leave every_n_steps=None for "
                f"about {TARGET_POINTS} measurements"
            )

    def _due(self, step: int) -> bool:
        """Whether ``step`` is a measurement step (a Python int test: no device work)."""
        assert self._every is not None, "the cadence is resolved at fit start"
        return step % self._every == 0

    # ------------------------------------------------------------------ writing
    @staticmethod
    def _write(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
        """``metrics`` at logger step ``step`` to every logger, once (loggers write on global rank zero)."""
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def layout_charts(self, trainer: pl.Trainer) -> dict[str, list[str]]:
        """This monitor's charts for the custom-scalars layout: ``{chart title: [tags overlaid]}``."""
        return {}

    def _register_layout(self, trainer: pl.Trainer) -> None:
        """Write the merged chart layout of all the trainer's monitors, once (by the first monitor)."""
        monitors = [cb for cb in trainer.callbacks if isinstance(cb, MonitorCallback)]
        if not trainer.is_global_zero or monitors[0] is not self:
            return
        charts: dict[str, list[str]] = {}
        for monitor in monitors:
            for title, tags in monitor.layout_charts(trainer).items():
                charts.setdefault(title, []).extend(t for t in tags if t not in charts.get(title, ()))
        if not charts:
            return
        layout = {LAYOUT_CATEGORY: {title: ["Multiline", tags] for title, tags in charts.items()}}
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_custom_scalars(layout)

    # ------------------------------------------------------------------ state
    def _cadence_state(self) -> dict[str, Any]:
        return {"every": self._every}

    def _load_cadence_state(self, state: dict[str, Any]) -> None:
        self._every = state.get("every")
