"""Log the Hessian trace and top eigenvalue of a loss during training (Hutchinson, power iteration).

The quantities are those of :mod:`sde_optim.curvature` (Hutchinson trace with its standard
error, power-iteration top eigenvalue). By default the loss is the module's exact population
loss when it has one (``TeacherRegression.population_loss``: the Hessian trace is then the
curvature of THEORY E7, the one ``TheoryMonitor`` logs as ``curvature/measured``), else the
training loss on a fixed probe batch of ``DEFAULT_PROBE_SIZE`` examples.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Mapping, Sequence

import pytorch_lightning as pl
import torch
from lightning_utilities.core.apply_func import apply_to_collection, apply_to_collections
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from .. import curvature
from .._validation import check_choice, check_int, check_strategy
from ._monitor import MonitorCallback

__all__ = ["CurvatureMonitor", "DEFAULT_PROBE_SIZE", "population_loss"]

TAGS = ("curvature/hessian_trace", "curvature/hessian_trace_stderr", "curvature/top_eigenvalue")

DEFAULT_PROBE_SIZE = 256
"""Examples in the default probe batch (of a module without ``population_loss``)."""


def population_loss(model: Any, batch: Any) -> Tensor:
    """``model.population_loss()`` (``batch`` is ignored): the probe loss of the population mode.

    A module-level function, so that the monitor pickles (``ddp_spawn``) with it.
    """
    return model.population_loss()


class CurvatureMonitor(MonitorCallback):
    """At optimizer steps ``0, n, 2n, ...``, log the curvature of a probe loss.

    Written with ``logger.log_metrics`` to every logger at logger step ``k`` (the parameters
    after ``k`` optimizer steps), once per measured step, on global rank zero:

    * ``curvature/hessian_trace`` and ``curvature/hessian_trace_stderr``: Hutchinson estimate
      of ``tr H`` with ``hutchinson_samples`` Rademacher probes and its standard error;
    * ``curvature/top_eigenvalue``: power iteration with ``power_iters`` Hessian-vector products.

    ``H`` is the Hessian, in ``pl_module``'s trainable parameters, of the probe loss, evaluated
    in eval mode (BatchNorm on running statistics, no dropout; modes are restored, ``.grad``
    untouched: see :mod:`sde_optim.curvature`). The probe loss, by default:

    * the module's ``population_loss()`` if it has one and neither ``probe_batch`` nor
      ``loss_fn`` is given (the exact risk of :class:`~sde_optim.lightning.TeacherRegression`, E1:
      the trace estimates the E7 curvature, and no samples are involved);
    * else ``loss_fn`` (or the module's criterion, or MSE / 2) on a fixed probe batch: the first
      ``DEFAULT_PROBE_SIZE`` = 256 examples of the training stream, gathered from as many training
      batches as needed. The Hessian of a loss on a handful of examples is mostly sampling noise
      (a batch of one gave -0.054 to 0.11 for an exact curvature of 0.02 to 0.15 on the README's
      DLN), hence the size.

    With a :class:`TheoryMonitor` that tracks the curvature, the TensorBoard custom-scalars chart
    ``curvature`` overlays ``curvature/measured`` (exact), ``curvature/predicted`` and
    ``curvature/hessian_trace``.

    Timing. ``n`` is ``every_n_steps`` if given, else a TheoryMonitor's explicit ``every_n_steps``,
    else about 32 measurements over ``max_steps`` (:mod:`sde_optim.lightning._monitor`), so that
    with a TheoryMonitor both log at the same steps. Step 0 is measured before the first
    optimizer step; a probe gathered from training batches is measured from the first
    scheduled step at which it is complete (step 0 when the first batch holds enough examples).
    Gradient-accumulation micro-batches do not repeat a measurement. :meth:`compute` gives the
    values at any other time.

    Distributed runs. Only global rank zero computes and logs: the probe batch is rank zero's,
    the other ranks would only repeat the work on their own shard, and top eigenvalues cannot
    be averaged across ranks. The computation uses the unwrapped ``pl_module`` and
    ``torch.autograd.grad`` / torch.func, which trigger no gradient all-reduce. Sharding
    strategies (FSDP, DeepSpeed, ModelParallel) are refused at setup: the Hessian of a shard is
    not the Hessian of the model. Under ``ddp_spawn`` the callback is pickled: a ``loss_fn``
    must then be a module-level function, not a lambda or a closure.

    Args:
        every_n_steps: optimizer steps between checks (>= 1), or ``None`` (above).
        probe_batch: the batch the Hessian is taken on. A tuple/list of tensors: used as given
            (it must be what ``loss_fn`` expects, e.g. ``(x, y)``). An int ``n >= 1``: the first
            ``n`` examples (along dim 0 of every tensor) of the training stream. ``None``: the
            population loss or ``DEFAULT_PROBE_SIZE`` examples (above).
        hutchinson_samples: Rademacher probes per trace estimate (>= 1).
        power_iters: Hessian-vector products per top-eigenvalue estimate (>= 1).
        loss_fn: ``loss_fn(model, batch) -> 0-d tensor``, called with ``pl_module`` and the
            probe batch. ``None``: ``pl_module.loss_fn(pl_module(x), y)`` if the module has a
            ``loss_fn`` attribute (a criterion ``(prediction, target) -> scalar`` such as
            ``nn.MSELoss()``), else ``mean((pl_module(x) - y)^2) / 2`` (MSE / 2, the risk
            convention of THEORY E1), for a probe batch ``(x, y)``.
        seed: seed of the monitor's own ``torch.Generator`` (on the module's device) that
            draws the probes (>= 0). The global RNG is never used, so the monitor does not
            change the training run.
        method: how Hessian-vector products are computed (:mod:`sde_optim.curvature`):
            ``"double_backward"`` (default), ``"func"`` (torch.func forward-over-reverse) or
            ``"auto"`` (torch.func, falling back to double backward). Double backward is the
            default because it was measured faster on CPU with torch 2.13: 12x on a DLN
            (d = 1024) and 4.5x per product on a 1M-parameter MLP
            (``benchmarks/callback_overhead.py``, docs/benchmarks.md).

    State. :meth:`state_dict` holds the probe batch (on CPU; also a partly gathered one), the
    generator state, the last step checked and the cadence; a run resumed from a checkpoint
    (same device type) therefore uses the same probe batch, probe vectors and steps as an
    uninterrupted run.
    """

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        probe_batch: None | int | Sequence[Tensor] = None,
        hutchinson_samples: int = 16,
        power_iters: int = 20,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        seed: int = 0,
        method: Literal["double_backward", "func", "auto"] = "double_backward",
    ) -> None:
        super().__init__(every_n_steps)
        self.method = check_choice("method", method, ("double_backward", "func", "auto"))
        self.hutchinson_samples = check_int("hutchinson_samples", hutchinson_samples, minimum=1)
        self.power_iters = check_int("power_iters", power_iters, minimum=1)
        self.seed = check_int("seed", seed, minimum=0)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, batch) or None, got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn
        self.probe_size, self.probe_batch = _probe_spec(probe_batch)
        self._captured: Any = None  # a probe batch being gathered from training batches
        self._generator: torch.Generator | None = None
        self._pending_generator_state: tuple[str, Tensor] | None = None
        self._last_step = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_steps=self.every_n_steps, hutchinson_samples=self.hutchinson_samples,
            power_iters=self.power_iters, seed=self.seed,
        )

    # ------------------------------------------------------------------ what is measured
    def uses_population_loss(self, pl_module: torch.nn.Module) -> bool:
        """Whether the probe loss is ``pl_module.population_loss()`` (no probe batch, no ``loss_fn``)."""
        return (self.probe_size is None and self.probe_batch is None and self.loss_fn is None
                and callable(getattr(pl_module, "population_loss", None)))

    def compute(self, pl_module: torch.nn.Module) -> dict[str, Tensor]:
        """The three values now, as 0-d tensors on the module's device, keyed by tag."""
        if self.uses_population_loss(pl_module):
            loss_fn, batch = population_loss, ()
        elif self.probe_batch is None:
            raise RuntimeError("no probe batch yet: pass probe_batch=(tensors...) or let fit gather it from training batches")
        else:
            loss_fn, batch = self._resolve_loss(pl_module), self.probe_batch
        gen = self._generator_on(next(pl_module.parameters()).device)
        trace, stderr = curvature.hessian_trace(pl_module, loss_fn, batch, samples=self.hutchinson_samples,
                                                generator=gen, method=self.method)
        top, _ = curvature.top_eigenvalue(pl_module, loss_fn, batch, iters=self.power_iters, generator=gen,
                                          method=self.method)
        return dict(zip(TAGS, (trace, stderr, top)))

    def _resolve_loss(self, pl_module: torch.nn.Module) -> Callable[[Any, Any], Tensor]:
        if self.loss_fn is not None:
            return self.loss_fn
        criterion = getattr(pl_module, "loss_fn", None)
        return curvature.supervised_loss(criterion) if callable(criterion) else curvature.half_mse

    def _generator_on(self, device: torch.device) -> torch.Generator:
        if self._generator is None:
            gen = torch.Generator(device=device).manual_seed(self.seed)
            if self._pending_generator_state is not None:
                saved_type, state = self._pending_generator_state
                if saved_type != device.type:
                    raise ValueError(f"the checkpointed probe generator is a {saved_type} generator; the module is on {device}")
                gen.set_state(state)
                self._pending_generator_state = None
            self._generator = gen
        return self._generator

    # ------------------------------------------------------------------ gathering the probe batch
    def _gather(self, batch: Any) -> None:
        """Append the first rows of ``batch`` still missing from the probe; complete it at ``probe_size``."""
        size = self.probe_size or DEFAULT_PROBE_SIZE
        have = 0 if self._captured is None else _rows(self._captured)
        rows = apply_to_collection(batch, Tensor, lambda t: _first_rows(t, size - have))
        self._captured = rows if self._captured is None else apply_to_collections(
            self._captured, rows, Tensor, lambda a, b: torch.cat([a, b]))
        if _rows(self._captured) >= size:
            self.probe_batch, self._captured = self._captured, None

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer.strategy, "CurvatureMonitor")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resolve_cadence(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._register_layout(trainer)
        self._measure(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.probe_batch is None and not self.uses_population_loss(pl_module):
            self._gather(batch)
            self._measure(trainer, pl_module)  # step 0, when the first batch completes the probe

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._measure(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._last_step < 0 and self.probe_batch is None and not self.uses_population_loss(pl_module):
            rank_zero_warn(f"CurvatureMonitor measured nothing: the training stream never filled its probe batch of "
                           f"{self.probe_size or DEFAULT_PROBE_SIZE} examples; pass probe_batch=(x, y) or a smaller int")

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Compute and write the values if this step is due, not yet written, and a probe exists."""
        step = trainer.global_step
        if step == self._last_step or not self._due(step) or not trainer.is_global_zero:
            return
        if self.probe_batch is None and not self.uses_population_loss(pl_module):
            return
        self._last_step = step
        self._write(trainer, {tag: float(value) for tag, value in self.compute(pl_module).items()}, step)

    def layout_charts(self, trainer: pl.Trainer) -> dict[str, list[str]]:
        """The trace joins the ``curvature`` chart when another monitor logs the exact curvature there."""
        others = [cb for cb in trainer.callbacks if isinstance(cb, MonitorCallback) and cb is not self]
        exact = any("curvature/measured" in tags for cb in others for tags in cb.layout_charts(trainer).values())
        return {"curvature": [TAGS[0]]} if exact else {}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        gen = self._generator
        return {
            "probe_batch": _to_cpu(self.probe_batch),
            "captured": _to_cpu(self._captured),
            "generator": None if gen is None else (gen.device.type, gen.get_state()),
            "last_step": self._last_step,
            **self._cadence_state(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        missing = {"probe_batch", "generator", "last_step"} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict is missing keys {sorted(missing)}")
        self.probe_batch = state_dict["probe_batch"]
        self._captured = state_dict.get("captured")
        self._generator = None
        self._pending_generator_state = state_dict["generator"]
        self._last_step = int(state_dict["last_step"])
        self._load_cadence_state(dict(state_dict))


def _probe_spec(probe_batch: Any) -> tuple[int | None, Any]:
    """``(size to gather or None, fixed batch or None)`` from the ``probe_batch`` argument."""
    if probe_batch is None:
        return None, None
    if isinstance(probe_batch, (tuple, list)) and probe_batch and all(isinstance(t, Tensor) for t in probe_batch):
        return None, tuple(t.detach().clone() for t in probe_batch)
    if isinstance(probe_batch, int) and not isinstance(probe_batch, bool):
        return check_int("probe_batch", probe_batch, minimum=1), None
    raise TypeError(f"probe_batch must be None, an int >= 1 or a non-empty tuple of tensors; got {type(probe_batch).__name__}")


def _rows(batch: Any) -> int:
    """Examples in ``batch``: dim 0 of its first tensor."""
    sizes: list[int] = []
    apply_to_collection(batch, Tensor, lambda t: sizes.append(t.shape[0] if t.ndim else 0))
    if not sizes:
        raise ValueError(f"CurvatureMonitor gathers its probe batch from training batches of tensors; got {type(batch).__name__}")
    return sizes[0]


def _first_rows(t: Tensor, n: int) -> Tensor:
    """A detached copy of the first ``n`` rows of ``t`` (all of them if it has fewer)."""
    if t.ndim == 0:
        raise ValueError("a probe batch is gathered along dim 0 of every tensor of the training batch; got a 0-d tensor")
    return t[:n].detach().clone()


def _to_cpu(batch: Any) -> Any:
    return apply_to_collection(batch, Tensor, lambda t: t.detach().cpu().clone())
