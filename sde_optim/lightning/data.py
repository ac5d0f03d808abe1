"""Streaming teacher data for Lightning (THEORY §1: one pass, fresh samples every step).

:class:`TeacherDataModule` never stores training data. Its train loader yields tiny
:class:`StreamRequest` placeholders; the module's ``on_after_batch_transfer`` hook turns
each into a fresh batch ``(x, y)`` generated *directly on the training device* with a
``torch.Generator`` on that device, seeded from ``(seed, global rank, global step,
micro-batch)``. So

* a GPU run does not copy a ``(B, d)`` batch from the host every step (only the
  placeholder, which holds no tensor, crosses);
* the stream is a pure function of the seed and the step: resuming from a checkpoint
  at step ``k`` continues with exactly the batches an uninterrupted run would have seen;
* under DDP every rank draws different samples (the rank is part of the seed).

The validation set is a fixed held-out sample from a separate stream, also generated batch by
batch when it is iterated (batch ``i`` seeded by ``(seed, -1, i)``), never stored: memory is
``O(val_batch_size * d)`` whatever ``val_size`` is.
"""

from __future__ import annotations

from typing import Any, Iterator

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from .._validation import check_int
from ..teacher import TeacherProblem, TeacherSpec, as_teacher_problem

__all__ = ["TeacherDataModule", "StreamRequest", "stream_seed"]

_MASK64 = (1 << 64) - 1

VAL_BATCH_NUMBERS = 1 << 22
"""Default cap on the numbers in one validation batch, ``val_batch_size * d`` (16 MiB in float32)."""


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stream_seed(*keys: int) -> int:
    """A 63-bit seed that is a well-mixed function of integer ``keys`` (SplitMix64 chain)."""
    h = 0
    for k in keys:
        h = _splitmix64(h ^ (int(k) & _MASK64))
    return h & ((1 << 63) - 1)


class StreamRequest:
    """Placeholder for one training batch; materialized on the device by the data module.

    A plain object (not a tensor, not a dataclass), so Lightning's batch transfer passes it
    through untouched.
    """

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"StreamRequest({self.index})"


class _Stream(IterableDataset):
    """Yields ``steps_per_epoch`` placeholders per epoch (no tensors, nothing to copy)."""

    def __init__(self, steps_per_epoch: int) -> None:
        self.steps_per_epoch = steps_per_epoch

    def __iter__(self) -> Iterator[StreamRequest]:
        return (StreamRequest(i) for i in range(self.steps_per_epoch))

    def __len__(self) -> int:
        return self.steps_per_epoch


class _ValidationStream(IterableDataset):
    """The fixed validation set, generated batch by batch on ``device`` in ``dtype`` when iterated.

    Batch ``i`` holds samples ``[i * batch_size, (i + 1) * batch_size)`` of ``size``, drawn with a
    generator seeded by ``stream_seed(seed, -1, i)``: the same samples every epoch, one batch in
    memory at a time.
    """

    def __init__(self, problem: TeacherProblem, size: int, batch_size: int, seed: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.problem, self.size, self.batch_size, self.seed = problem, size, batch_size, seed
        self.device, self.dtype = device, dtype

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        problem = self.problem.to(self.device, self.dtype)
        gen = torch.Generator(device=self.device)
        for i, start in enumerate(range(0, self.size, self.batch_size)):
            gen.manual_seed(stream_seed(self.seed, -1, i))
            yield problem.sample(min(self.batch_size, self.size - start), generator=gen)

    def __len__(self) -> int:
        return -(-self.size // self.batch_size)


def _collate_request(batch: Any) -> Any:
    return batch


def _batch_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of ``module``'s first floating parameter, else ``module.dtype``."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return getattr(module, "dtype", torch.get_default_dtype())


class TeacherDataModule(pl.LightningDataModule):
    """Fresh Gaussian teacher samples every training step, generated on the training device.

    Args:
        problem: the :class:`~sde_optim.TeacherProblem` to sample from (it is moved to the
            training device when batches are made), or a :class:`~sde_optim.TeacherSpec`.
        batch_size: samples per step *per process* (>= 1). Under DDP the global batch is
            ``batch_size * world_size``.
        seed: seed of the training stream and of the validation set.
        val_size: number of held-out validation samples (>= 1).
        val_batch_size: validation batch size (>= 1); default ``min(val_size, 2**22 // d)``
            (at least 1), so that one validation batch holds at most ``2**22`` numbers.
        steps_per_epoch: training steps per epoch (>= 1); the stream itself never repeats.

    Validation batches are generated when the loader is iterated (nothing is stored), on the
    module's device in its parameters' dtype inside a ``Trainer``, on the problem's device in
    its dtype outside one.

    Training batches are ``(x, y)`` with shapes ``(batch_size, d)`` and ``(batch_size,)`` in
    the dtype of the LightningModule's first floating parameter (``module.dtype`` if it has
    none), so a float64 problem feeds a float32 model, and a bfloat16/float16 model (built in
    that dtype, or converted by ``precision="bf16-true"``) gets batches in its own dtype; under
    ``precision="bf16-mixed"`` the parameters stay float32 and so do the batches (autocast casts
    inside the matmul). The samples are drawn in that dtype. The seed of the batch of optimizer step ``k`` (micro-batch ``m``
    under gradient accumulation) on global rank ``r`` is ``stream_seed(seed, r, k, m)``.
    Outside a Lightning ``Trainer`` use ``problem.sample`` directly.
    """

    def __init__(
        self,
        problem: TeacherProblem | TeacherSpec,
        batch_size: int,
        *,
        seed: int = 0,
        val_size: int = 4096,
        val_batch_size: int | None = None,
        steps_per_epoch: int = 1000,
    ) -> None:
        super().__init__()
        self.problem = as_teacher_problem(problem)
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.seed = check_int("seed", seed)
        self.val_size = check_int("val_size", val_size, minimum=1)
        default_val_batch = min(self.val_size, max(1, VAL_BATCH_NUMBERS // self.problem.dim))
        self.val_batch_size = check_int("val_batch_size", default_val_batch if val_batch_size is None else val_batch_size,
                                        minimum=1)
        self.steps_per_epoch = check_int("steps_per_epoch", steps_per_epoch, minimum=1)
        self._device_problem: TeacherProblem | None = None
        self._generator: torch.Generator | None = None
        self._last_step = -1
        self._micro = 0

    def setup(self, stage: str) -> None:
        # A new fit (or a resumed one) starts counting micro-batches afresh, even if this module
        # object already served a fit that stopped in the middle of a step.
        self._last_step, self._micro = -1, 0

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Stream(self.steps_per_epoch), batch_size=None, collate_fn=_collate_request)

    def val_dataloader(self) -> DataLoader:
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is not None:
            device, dtype = module.device, _batch_dtype(module)
        else:
            device, dtype = self.problem.device, self.problem.dtype
        stream = _ValidationStream(self.problem, self.val_size, self.val_batch_size, self.seed, device, dtype)
        return DataLoader(stream, batch_size=None)

    # ------------------------------------------------------------------ materialization
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not isinstance(batch, StreamRequest):
            return batch
        trainer = self.trainer
        if trainer is None:
            raise RuntimeError("TeacherDataModule batches are made by a Lightning Trainer; outside one use problem.sample")
        module = trainer.lightning_module
        return self.make_batch(module.device, _batch_dtype(module), rank=trainer.global_rank, step=trainer.global_step)

    def make_batch(self, device: torch.device, dtype: torch.dtype, *, rank: int, step: int) -> tuple[Tensor, Tensor]:
        """The training batch of optimizer step ``step`` on ``rank``, generated on ``device`` in ``dtype``.

        Consecutive calls with the same ``step`` are successive micro-batches of that step.
        """
        p = self._device_problem
        if p is None or p.device != torch.device(device) or p.dtype != dtype:
            self._device_problem = self.problem.to(device, dtype)
            self._generator = torch.Generator(device=device)
        self._micro = self._micro + 1 if step == self._last_step else 0
        self._last_step = step
        assert self._generator is not None
        self._generator.manual_seed(stream_seed(self.seed, rank, step, self._micro))
        return self._device_problem.sample(self.batch_size, generator=self._generator)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "batch_size": self.batch_size, "problem": self.problem.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("seed") != self.seed or state_dict.get("batch_size") != self.batch_size:
            raise ValueError(
                "checkpoint was written with TeacherDataModule(seed="
                f"{state_dict.get('seed')}, batch_size={state_dict.get('batch_size')}); this module has "
                f"seed={self.seed}, batch_size={self.batch_size}: resuming would change the data stream"
            )
