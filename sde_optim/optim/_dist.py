"""The few ``torch.distributed`` operations the SDE optimizers need to keep DDP replicas identical.

All are no-ops (no communication, no synchronization) outside an initialized process group
or with a single process, so single-device code pays nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["world_size", "broadcast_generator", "all_reduce_mean_"]


def world_size() -> int:
    """Number of processes in the default group (1 when ``torch.distributed`` is not initialized)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def broadcast_generator(generator: torch.Generator) -> None:
    """Give ``generator`` rank zero's state on every rank (one collective; call once, not per step)."""
    if world_size() == 1:
        return
    state = [generator.get_state()]
    torch.distributed.broadcast_object_list(state, src=0)
    generator.set_state(state[0])


def all_reduce_mean_(tensors: list[Tensor]) -> None:
    """In-place mean over ranks (device-side collective, no host synchronization)."""
    n = world_size()
    if n == 1:
        return
    for t in tensors:
        torch.distributed.all_reduce(t)
        t.div_(n)
