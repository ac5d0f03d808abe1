"""Log the Hessian trace and top eigenvalue of the loss on a fixed probe batch during training.

The quantities are those of :mod:`sde_optim.curvature` (Hutchinson trace with its standard
error, power-iteration top eigenvalue); for a teacher problem pass the population risk as
``loss_fn`` to log the curvature of THEORY E7.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import pytorch_lightning as pl
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from .. import curvature
from .._validation import check_choice, check_int, check_strategy

__all__ = ["CurvatureMonitor"]

TAGS = ("curvature/hessian_trace", "curvature/hessian_trace_stderr", "curvature/top_eigenvalue")


class CurvatureMonitor(pl.Callback):
    """Every ``every_n_steps`` optimizer steps, log the curvature of the loss on a fixed probe batch.

    Logged (``pl_module.log(..., on_step=True, on_epoch=False)``, so to every logger):

    * ``curvature/hessian_trace`` and ``curvature/hessian_trace_stderr``: Hutchinson estimate
      of ``tr H`` with ``hutchinson_samples`` Rademacher probes and its standard error;
    * ``curvature/top_eigenvalue``: power iteration with ``power_iters`` Hessian-vector products.

    ``H`` is the Hessian, in ``pl_module``'s trainable parameters, of ``loss_fn`` on the probe
    batch, evaluated in eval mode (BatchNorm on running statistics, no dropout; modes are
    restored, ``.grad`` untouched: see :mod:`sde_optim.curvature`).

    Timing. The check runs in ``on_train_batch_end`` when ``trainer.global_step`` (optimizer
    steps taken, this batch's included) is a positive multiple of ``every_n_steps``, once per
    step (gradient-accumulation micro-batches do not repeat it), at the parameters after
    that many steps. Lightning writes metrics logged in that hook under its logger step
    ``global_step - 1`` (the step of the batch's training loss), and only on steps where
    it flushes logs (``global_step`` a multiple of ``Trainer(log_every_n_steps=...)``), so
    ``every_n_steps`` should be a multiple of ``log_every_n_steps``; a warning at fit start
    says when it is not. :meth:`compute` gives the values at any other time.

    Distributed runs. Only global rank zero computes and logs (``rank_zero_only=True``,
    ``sync_dist=False``): the probe batch is rank zero's, the other ranks would only
    repeat the work on their own shard, and top eigenvalues cannot be averaged across
    ranks. The computation uses the unwrapped ``pl_module`` and ``torch.autograd.grad`` /
    torch.func, which trigger no gradient all-reduce. As with any ``rank_zero_only`` metric,
    the tags cannot be monitored by other callbacks (e.g. ``ModelCheckpoint``) in such runs.
    Sharding strategies (FSDP, DeepSpeed, ModelParallel) are refused at setup: the Hessian of
    a shard is not the Hessian of the model.

    Args:
        every_n_steps: optimizer steps between checks (>= 1). The default, 250, keeps the cost of
            the defaults (16 + 20 Hessian-vector products per check) near 3 % of the training
            time of the main example's DLN (d = 1024) on CPU (docs/benchmarks.md).
        probe_batch: the batch the Hessian is taken on. A tuple/list of tensors: used as given
            (it must be what ``loss_fn`` expects, e.g. ``(x, y)``). ``None``: the first
            training batch, captured whole. An int ``n >= 1``: the first ``n`` examples (along
            dim 0 of every tensor) of the first training batch, which must hold at least ``n``.
        hutchinson_samples: Rademacher probes per trace estimate (>= 1).
        power_iters: Hessian-vector products per top-eigenvalue estimate (>= 1).
        loss_fn: ``loss_fn(model, batch) -> 0-d tensor``, called with ``pl_module`` and the
            probe batch (e.g. ``lambda m, _: problem.population_risk(m.net.beta)`` for the
            exact risk of E7). ``None``: ``pl_module.loss_fn(pl_module(x), y)`` if the module
            has a ``loss_fn`` attribute (a criterion ``(prediction, target) -> scalar`` such
            as ``nn.MSELoss()``), else ``mean((pl_module(x) - y)^2) / 2`` (MSE / 2, the
            risk convention of THEORY E1), for a probe batch ``(x, y)``.
        seed: seed of the monitor's own ``torch.Generator`` (on the module's device) that
            draws the probes (>= 0). The global RNG is never used, so the monitor does not
            change the training run.
        method: how Hessian-vector products are computed (:mod:`sde_optim.curvature`):
            ``"double_backward"`` (default), ``"func"`` (torch.func forward-over-reverse) or
            ``"auto"`` (torch.func, falling back to double backward). Double backward is the
            default because it was measured faster on CPU with torch 2.13: 12x on a DLN
            (d = 1024) and 4.5x per product on a 1M-parameter MLP
            (``benchmarks/callback_overhead.py``, docs/benchmarks.md).

    State. :meth:`state_dict` holds the probe batch (on CPU), the generator state and the
    last step checked; a run resumed from a checkpoint (same device type) therefore uses
    the same probe batch and the same probe vectors as an uninterrupted run.
    """

    def __init__(
        self,
        *,
        every_n_steps: int = 250,
        probe_batch: None | int | Sequence[Tensor] = None,
        hutchinson_samples: int = 16,
        power_iters: int = 20,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        seed: int = 0,
        method: str = "double_backward",
    ) -> None:
        super().__init__()
        self.method = check_choice("method", method, ("double_backward", "func", "auto"))
        self.every_n_steps = check_int("every_n_steps", every_n_steps, minimum=1)
        self.hutchinson_samples = check_int("hutchinson_samples", hutchinson_samples, minimum=1)
        self.power_iters = check_int("power_iters", power_iters, minimum=1)
        self.seed = check_int("seed", seed, minimum=0)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, batch) or None, got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn
        self.probe_size, self.probe_batch = _probe_spec(probe_batch)
        self._generator: torch.Generator | None = None
        self._pending_generator_state: tuple[str, Tensor] | None = None
        self._last_step = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_steps=self.every_n_steps, hutchinson_samples=self.hutchinson_samples,
            power_iters=self.power_iters, seed=self.seed,
        )

    # ------------------------------------------------------------------ computation
    def compute(self, pl_module: torch.nn.Module) -> dict[str, Tensor]:
        """The three values now, as 0-d tensors on the module's device, keyed by tag."""
        if self.probe_batch is None:
            raise RuntimeError("no probe batch yet: pass probe_batch=(tensors...) or let fit capture the first training batch")
        loss_fn = self._resolve_loss(pl_module)
        gen = self._generator_on(next(pl_module.parameters()).device)
        trace, stderr = curvature.hessian_trace(
            pl_module, loss_fn, self.probe_batch, samples=self.hutchinson_samples, generator=gen, method=self.method
        )
        top, _ = curvature.top_eigenvalue(pl_module, loss_fn, self.probe_batch, iters=self.power_iters, generator=gen,
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

    def _capture(self, batch: Any) -> Any:
        if self.probe_size is None:
            return apply_to_collection(batch, Tensor, lambda t: t.detach().clone())
        return apply_to_collection(batch, Tensor, self._first_rows)

    def _first_rows(self, t: Tensor) -> Tensor:
        if t.ndim == 0 or t.shape[0] < self.probe_size:
            raise ValueError(
                f"probe_batch={self.probe_size} needs a first training batch with at least "
                f"{self.probe_size} examples along dim 0; got a tensor of shape {tuple(t.shape)}"
            )
        return t[: self.probe_size].detach().clone()

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer.strategy, "CurvatureMonitor")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = trainer.log_every_n_steps
        if n > 0 and self.every_n_steps % n != 0:
            rank_zero_warn(
                f"CurvatureMonitor(every_n_steps={self.every_n_steps}) is not a multiple of "
                f"Trainer(log_every_n_steps={n}): Lightning writes only the values of steps that are multiples of both"
            )

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.probe_batch is None:
            self.probe_batch = self._capture(batch)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or step == self._last_step or not trainer.is_global_zero:
            return
        self._last_step = step
        for tag, value in self.compute(pl_module).items():
            pl_module.log(tag, value, on_step=True, on_epoch=False, rank_zero_only=True, sync_dist=False)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        gen = self._generator
        return {
            "probe_batch": apply_to_collection(self.probe_batch, Tensor, lambda t: t.detach().cpu().clone()),
            "generator": None if gen is None else (gen.device.type, gen.get_state()),
            "last_step": self._last_step,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        missing = {"probe_batch", "generator", "last_step"} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict is missing keys {sorted(missing)}")
        self.probe_batch = state_dict["probe_batch"]
        self._generator = None
        self._pending_generator_state = state_dict["generator"]
        self._last_step = int(state_dict["last_step"])


def _probe_spec(probe_batch: Any) -> tuple[int | None, Any]:
    """``(size to capture or None, fixed batch or None)`` from the ``probe_batch`` argument."""
    if probe_batch is None:
        return None, None
    if isinstance(probe_batch, (tuple, list)) and probe_batch and all(isinstance(t, Tensor) for t in probe_batch):
        return None, tuple(t.detach().clone() for t in probe_batch)
    if isinstance(probe_batch, int) and not isinstance(probe_batch, bool):
        return check_int("probe_batch", probe_batch, minimum=1), None
    raise TypeError(f"probe_batch must be None, an int >= 1 or a non-empty tuple of tensors; got {type(probe_batch).__name__}")
