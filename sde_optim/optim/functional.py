"""Functional SGD-type updates shared by :class:`HomogenizedSGD` and :class:`SVAG`.

Like ``torch.optim.sgd``: the optimizer classes are thin wrappers that collect parameters
and hyperparameters and call these functions, which have a single-tensor and a
``foreach`` path. The update is split in two phases so that a whole step (all parameter
groups) can be checked for non-finite values *before* any parameter changes:

1. :func:`directions`: ``d = grad + weight_decay * p + noise_scale * noise`` per parameter;
2. :func:`apply_directions`: ``p <- p - lr * d`` (optionally masked by a device-side flag,
   so a skipped step costs no host synchronization).

With ``noise_scale = 0`` or no noise the arithmetic is exactly that of
``torch.optim.SGD(momentum=0)``, operation for operation, so results are bitwise equal.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["directions", "apply_directions", "all_finite", "NonFiniteUpdateError"]


class NonFiniteUpdateError(FloatingPointError):
    """A step's update (gradient, weight decay or noise) had a NaN or Inf entry.

    Raised before any parameter or optimizer state was modified.
    """


def _can_foreach(tensors: Sequence[Tensor]) -> bool:
    if not tensors:
        return False
    t0 = tensors[0]
    return all(t.device == t0.device and t.dtype == t0.dtype and not t.is_sparse for t in tensors)


def directions(
    params: list[Tensor],
    grads: list[Tensor],
    noises: list[Tensor | None],
    *,
    weight_decay: float,
    noise_scale: float,
    foreach: bool | None = None,
) -> list[Tensor]:
    """Update directions ``d_i = g_i + wd * p_i + s * xi_i`` (THEORY §2: drift plus scaled noise).

    ``noises[i]`` may be ``None`` (no noise for that parameter); shapes follow ``params``.
    The inputs are not modified.
    """
    use_foreach = _can_foreach(params) if foreach is None else foreach
    add_noise = noise_scale != 0 and any(n is not None for n in noises)
    if use_foreach and (not add_noise or all(n is not None for n in noises)):
        d = list(grads) if weight_decay == 0 else list(torch._foreach_add(grads, params, alpha=weight_decay))
        if add_noise:
            d = list(torch._foreach_add(d, noises, alpha=noise_scale))  # type: ignore[arg-type]
        return d
    out = []
    for p, g, n in zip(params, grads, noises):
        d = g if weight_decay == 0 else g.add(p, alpha=weight_decay)
        if add_noise and n is not None:
            d = d.add(n, alpha=noise_scale)
        out.append(d)
    return out


def all_finite(tensors: Sequence[Tensor]) -> Tensor:
    """0-d bool tensor on the tensors' device: every entry of every tensor is finite (no sync).

    Checked on the sum of all entries (one read per tensor): NaN propagates, +-Inf stays
    infinite or becomes NaN. A finite sum can only overflow if the entries are within a
    factor ``numel`` of the dtype's maximum, which is itself a failed step.
    """
    return torch.isfinite(torch.stack([t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32) for t in tensors]).sum())


def apply_directions(
    params: list[Tensor],
    dirs: list[Tensor],
    *,
    lr: float,
    mask: Tensor | None = None,
    foreach: bool | None = None,
) -> None:
    """``p <- p - lr * d`` in place; where ``mask`` (0-d bool) is false the step is a no-op."""
    if mask is not None:
        dirs = [torch.where(mask, d, torch.zeros((), dtype=d.dtype, device=d.device)) for d in dirs]
    if (_can_foreach(params) if foreach is None else foreach):
        torch._foreach_add_(params, dirs, alpha=-lr)
        return
    for p, d in zip(params, dirs):
        p.add_(d, alpha=-lr)
