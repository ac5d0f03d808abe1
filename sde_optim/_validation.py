"""Argument checks shared by every public entry point.

Each check raises ``ValueError`` (bad value) or ``TypeError`` (bad type) with a message
that names the parameter and the accepted range, so that a user who passes a wrong
argument learns which one and what would have been accepted.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

__all__ = [
    "check_generator",
    "check_choice",
    "check_finite_tensor",
    "check_float",
    "check_int",
    "check_strategy",
]


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    """Return ``value`` as ``int``; it must be an integer (not bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int,)) and not (
        isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point()
    ):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


def check_float(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    strict: bool = False,
    maximum: float | None = None,
) -> float:
    """Return ``value`` as a finite ``float`` in ``[minimum, maximum]`` (``(minimum, ...`` if ``strict``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    lo = "" if minimum is None else (f"> {minimum}" if strict else f">= {minimum}")
    hi = "" if maximum is None else f"<= {maximum}"
    accepted = " and ".join(s for s in (lo, hi) if s) or "finite"
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number ({accepted}), got {value}")
    if minimum is not None and (value < minimum or (strict and value == minimum)):
        raise ValueError(f"{name} must be {accepted}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be {accepted}, got {value}")
    return value


def check_generator(generator: Any, device: torch.device | str, owner: str) -> torch.Generator | None:
    """``generator`` must be None or a ``torch.Generator`` on the device type of ``device`` (``owner`` names what
    it draws for, e.g. "the model's", in the message)."""
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    device = torch.device(device)
    if generator.device.type != device.type:
        raise ValueError(f"generator must be on {owner} device ({device}), got one on {generator.device}")
    return generator


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """``value`` must be one of ``choices`` (strings)."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_finite_tensor(name: str, value: Any, *, nonnegative: bool = False, positive: bool = False) -> torch.Tensor:
    """``value`` must be a floating tensor (or convertible) with finite entries.

    This validation runs in constructors, never in per-step hot paths, so the host sync
    it implies is acceptable.
    """
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value, dtype=torch.get_default_dtype())
        except Exception as exc:  # pragma: no cover - message is what matters
            raise TypeError(f"{name} must be a tensor of real numbers, got {type(value).__name__}") from exc
    if not value.is_floating_point():
        value = value.to(torch.get_default_dtype())
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} must have finite entries (no NaN or Inf)")
    if positive and not bool((value > 0).all()):
        raise ValueError(f"{name} must have entries > 0")
    if nonnegative and not bool((value >= 0).all()):
        raise ValueError(f"{name} must have entries >= 0")
    return value


_SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


def check_strategy(strategy: Any, who: str) -> None:
    """Refuse Lightning strategies that shard parameters or optimizer state.

    The SDE optimizers draw noise per parameter from the *whole* parameter (StructuredNoise
    needs all of ``u`` and ``v`` to form ``beta``) and the theory monitors read the whole
    network, so they need every rank to hold full replicas, as single-device and DDP
    strategies do. Checked by class name along the MRO so that DeepSpeed need not be installed.
    """
    names = {cls.__name__ for cls in type(strategy).__mro__}
    sharded = sorted(names.intersection(_SHARDED_STRATEGIES))
    if sharded:
        raise ValueError(
            f"{who} does not support the {sharded[0]} strategy (it shards parameters or optimizer state); "
            "use strategy='auto' (one device), 'ddp' or 'ddp_spawn'"
        )
