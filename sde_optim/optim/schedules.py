"""Learning-rate schedules by name, as ordinary ``torch.optim.lr_scheduler`` objects (THEORY §7, E10).

One small grammar serves the CLI (``--schedule``), the Lightning examples (``--scheduler``) and
:class:`~sde_optim.lightning.TeacherRegression`, so the schedule that is trained is the schedule
that is predicted (:func:`~sde_optim.theory.describe_sgd` replays the scheduler built here):

* ``"constant"``: no scheduler;
* ``"cosine"``: ``CosineAnnealingLR(T_max=total_steps)``, from ``lr`` to 0 over the run;
* ``"step:N:G"``: ``StepLR(step_size=N, gamma=G)``, the lr times ``G`` every ``N`` steps (jumps, solved
  as jumps by the PDE);
* ``"warmup-cosine:W"``: ``LinearLR`` from ``lr / W`` to ``lr`` over ``W`` steps, then cosine to 0
  over the remaining ``total_steps - W`` (``SequentialLR``).

Every scheduler is stepped once per optimizer step (Lightning ``interval="step"``).
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR, StepLR

from .._validation import check_float, check_int

__all__ = ["SCHEDULES", "make_scheduler", "check_schedule"]

SCHEDULES = ("constant", "cosine", "step:N:G", "warmup-cosine:W")


def check_schedule(spec: str) -> str:
    """``spec`` if it parses (:func:`_parse`), else a ``ValueError`` naming the accepted forms."""
    _parse(spec)
    return spec


def _parse(spec: str) -> tuple[str, tuple]:
    if not isinstance(spec, str):
        raise TypeError(f"schedule must be a string, one of {', '.join(SCHEDULES)}; got {type(spec).__name__}")
    name, *args = spec.strip().split(":")
    try:
        if name in ("constant", "cosine") and not args:
            return name, ()
        if name == "step" and len(args) == 2:
            every = check_int("step schedule N", int(args[0]), minimum=1)
            return name, (every, check_float("step schedule G", float(args[1]), minimum=0.0, maximum=1.0, strict=True))
        if name == "warmup-cosine" and len(args) == 1:
            return name, (check_int("warmup-cosine W", int(args[0]), minimum=1),)
    except ValueError as err:
        raise ValueError(f"schedule {spec!r}: {err}") from None
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)} (N, W integers >= 1, G in (0, 1]); got {spec!r}")


def make_scheduler(optimizer: torch.optim.Optimizer, spec: str, total_steps: int) -> LRScheduler | None:
    """The scheduler ``spec`` names for ``optimizer`` over ``total_steps`` optimizer steps (``None`` for constant)."""
    name, args = _parse(spec)
    total = check_int("total_steps", total_steps, minimum=1)
    if name == "constant":
        return None
    if name == "cosine":
        return CosineAnnealingLR(optimizer, T_max=total)
    if name == "step":
        return StepLR(optimizer, step_size=args[0], gamma=args[1])
    warmup = args[0]
    if warmup >= total:
        raise ValueError(f"warmup-cosine:W needs W < the run's {total} steps; got W = {warmup}")
    return SequentialLR(optimizer, [LinearLR(optimizer, start_factor=1.0 / warmup, total_iters=warmup),
                                    CosineAnnealingLR(optimizer, T_max=total - warmup)], milestones=[warmup])
