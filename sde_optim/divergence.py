"""When a risk curve has diverged: one criterion for predictions, simulations and monitors.

A run (or a predicted curve) has diverged at the first time its risk is not finite or exceeds
``blowup_factor`` times its initial risk.  :data:`BLOWUP_FACTOR` is the default everywhere; callers
that need another threshold (the critical-learning-rate search, which asks for boundedness only)
pass their own.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._validation import check_float

__all__ = ["BLOWUP_FACTOR", "exceeds", "first_divergence", "check_blowup_factor"]

BLOWUP_FACTOR = 1e4


def check_blowup_factor(value) -> float:
    """``blowup_factor`` must be a number > 1 (at or below 1 a run 'diverges' without growing)."""
    return check_float("blowup_factor", value, minimum=1.0, strict=True)


def exceeds(risk: Tensor, risk0, blowup_factor: float = BLOWUP_FACTOR) -> Tensor:
    """Elementwise: ``risk`` is not finite or above ``blowup_factor * risk0`` (bool tensor, no host sync)."""
    return ~torch.isfinite(risk) | (risk > blowup_factor * risk0)


def first_divergence(risk: Tensor, t: Tensor, blowup_factor: float = BLOWUP_FACTOR) -> float | None:
    """The first ``t`` at which the curve ``risk`` ``(n,)`` has diverged (reference ``risk[0]``), or None."""
    bad = exceeds(risk, risk[0], blowup_factor)
    return float(t[int(bad.nonzero()[0, 0])]) if bool(bad.any()) else None
