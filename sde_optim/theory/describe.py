"""Read the SGD to predict off a live optimizer and its learning-rate schedulers (THEORY §7, E10).

:func:`describe_sgd` turns a ``torch.optim.SGD`` (or :class:`~sde_optim.HomogenizedSGD`, which
simulates the same SDE) and its schedulers into an :class:`~sde_optim.theory.dynamics.SGDConfig`
without disturbing them: a deep copy of the optimizer and schedulers together is stepped through
the horizon and its learning rates are recorded.  A scheduler whose future depends on metrics
(``ReduceLROnPlateau``) cannot be replayed: the description keeps the current learning rate from
then on and says so in its notes (and a warning).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Sequence

import torch
from torch import Tensor

from .._validation import check_int
from .dynamics import ScheduleLike, SGDConfig

__all__ = ["describe_sgd", "named_sgd", "SUPPORTED_OPTIMIZERS"]

SUPPORTED_OPTIMIZERS = ("torch.optim.SGD", "sde_optim.HomogenizedSGD", "sde_optim.SVAG")
_HYPER = ("momentum", "dampening", "nesterov", "weight_decay")


def describe_sgd(optimizer: torch.optim.Optimizer, schedulers: Sequence[Any] = (), *, steps: int,
                 batch_size: ScheduleLike = 1) -> tuple[SGDConfig, list[str]]:
    """The :class:`SGDConfig` of ``optimizer`` over its next ``steps`` SGD steps, and notes on what was assumed.

    Args:
        optimizer: ``torch.optim.SGD``, :class:`~sde_optim.HomogenizedSGD` or :class:`~sde_optim.SVAG` (one
            SGD step of time is ``l`` SVAG steps); every param group must share the learning rate and
            the SGD hyper-parameters (one ``lr`` for every coordinate is what the theory models), and
            ``maximize`` must be off.  Anything else is a ``TypeError`` / ``ValueError`` naming what is
            supported.
        schedulers: learning-rate schedulers of ``optimizer``, each as the scheduler itself (stepped after
            every optimizer step) or ``(scheduler, every_n_steps)`` (stepped after every ``n``-th, e.g. once
            per epoch).  They are replayed on a deep copy: the originals are not touched.  A momentum they
            move too (``OneCycleLR``, ``CyclicLR``: ``cycle_momentum=True`` by default) enters through each step's
            effective step ``lr (1 - dampening) / (1 - momentum)`` (E11 pointwise), written as the lr schedule at
            the largest momentum, with a note.
        steps: horizon in SGD steps (>= 1).  batch_size: the SGD batch ``B`` (a number or a schedule).

    A scheduler whose ``step`` needs a metric (``ReduceLROnPlateau``) has no knowable future: the learning
    rate is held at its current value and a note (and ``RuntimeWarning``) says so.
    """
    steps = check_int("steps", steps, minimum=1)
    per_sgd_step = _time_factor(optimizer)
    group = _common_group(optimizer)
    pairs = [_as_pair(s) for s in schedulers]
    notes: list[str] = []
    replayable, frozen = [], []
    for sched, every in pairs:
        if getattr(sched, "optimizer", optimizer) is not optimizer:
            raise ValueError(f"scheduler {type(sched).__name__} belongs to another optimizer")
        (frozen if _needs_metrics(sched) else replayable).append((sched, every))
    for sched, _ in frozen:
        notes.append(f"{type(sched).__name__} reacts to metrics: its future cannot be known, the prediction assumes "
                     f"the current learning rate {group['lr']:g} from now on")
        warnings.warn(f"describe_sgd: {notes[-1]}", RuntimeWarning, stacklevel=2)
    lr: ScheduleLike = float(group["lr"])
    hyper = {k: group[k] for k in _HYPER}
    if replayable:
        lrs, momenta = _replay(optimizer, replayable, steps * per_sgd_step)
        lr = torch.tensor(lrs[::per_sgd_step], dtype=torch.float64)
        if len(set(momenta)) > 1:
            lr, hyper["momentum"] = _fold_momentum(lr, torch.tensor(momenta[::per_sgd_step], dtype=torch.float64))
            notes.append(f"the momentum follows a schedule ({min(momenta):g} to {max(momenta):g}): it enters through the "
                         f"effective step lr (1 - dampening) / (1 - momentum) of each step (E11 pointwise, as E10 takes "
                         f"the lr), written as the lr schedule at the largest momentum, {hyper['momentum']:g}")
    return SGDConfig(lr=lr, batch_size=batch_size, **hyper), notes


def _fold_momentum(lr: Tensor, momentum: Tensor) -> tuple[Tensor, float]:
    """A per-step momentum ``mu_k`` (``OneCycleLR``, ``CyclicLR`` with ``cycle_momentum``) as an lr schedule at one
    momentum: ``lr_k (1 - mu_max) / (1 - mu_k)`` at ``mu_max`` has the effective step ``lr_k (1 - tau) / (1 - mu_k)``
    of every step (E11; the buffer remembers ``1/(1 - mu)`` steps, while ``mu`` changes over ``O(d)`` of them).
    ``mu_max`` is also what the E11 validity warning then checks (the largest ``1/((1 - mu) d)``)."""
    top = float(momentum.max())
    if top >= 1.0:
        raise ValueError(f"the scheduled momentum reaches {top:g}; the prediction needs momentum in [0, 1)")
    return lr * (1.0 - top) / (1.0 - momentum), top


def named_sgd(steps: int, *, lr: float, batch_size: ScheduleLike = 1, momentum: float = 0.0, dampening: float = 0.0,
              nesterov: bool = False, weight_decay: float = 0.0, schedule: str = "constant") -> SGDConfig:
    """The :class:`SGDConfig` of ``torch.optim.SGD(lr, momentum, ...)`` with the scheduler ``schedule`` names
    (:mod:`sde_optim.optim.schedules`) over ``steps`` steps: both are built on a dummy parameter and read by
    :func:`describe_sgd`, so the schedule is torch's own (what the CLI and the benchmarks predict)."""
    from ..optim.schedules import make_scheduler

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr, momentum=momentum, dampening=dampening,
                          nesterov=nesterov, weight_decay=weight_decay)
    scheduler = make_scheduler(opt, schedule, steps)
    return describe_sgd(opt, [scheduler] if scheduler is not None else [], steps=steps, batch_size=batch_size)[0]


def _time_factor(optimizer) -> int:
    """Optimizer steps per SGD step of time: ``l`` for SVAG, 1 for SGD-like optimizers; others are refused."""
    from ..optim import SVAG, HomogenizedSGD

    if isinstance(optimizer, SVAG):
        if float(optimizer.l) != int(optimizer.l):
            raise ValueError(f"SVAG with a non-integer l = {optimizer.l} has no whole number of steps per SGD step")
        return int(optimizer.l)
    if type(optimizer) is torch.optim.SGD or isinstance(optimizer, HomogenizedSGD):
        return 1
    raise TypeError(f"the prediction models {', '.join(SUPPORTED_OPTIMIZERS)}; got {type(optimizer).__name__} "
                    "(its dynamics are not the SGD of THEORY §7)")


def _common_group(optimizer) -> dict[str, Any]:
    """The hyper-parameters shared by every param group (``ValueError`` if they differ or ``maximize`` is on)."""
    groups = optimizer.param_groups
    first = groups[0]
    for key in ("lr", *_HYPER, "maximize"):
        values = {repr(g.get(key)) for g in groups}
        if len(values) > 1:
            raise ValueError(f"param groups with different {key} ({sorted(values)}) are not modeled: the theory has one "
                             "SGD for every coordinate")
    if first.get("maximize", False):
        raise ValueError("maximize=True (gradient ascent) is not modeled by the prediction")
    out = {"lr": float(first["lr"]) if not isinstance(first["lr"], torch.Tensor) else float(first["lr"].item())}
    out.update({k: first.get(k, False if k == "nesterov" else 0.0) for k in _HYPER})
    return out


def _as_pair(item) -> tuple[Any, int]:
    if isinstance(item, tuple):
        sched, every = item
        return sched, check_int("every_n_steps", every, minimum=1)
    return item, 1


def _needs_metrics(sched) -> bool:
    return isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau)


def _replay(optimizer, schedulers: list[tuple[Any, int]], steps: int) -> tuple[list[float], list[float]]:
    """Learning rates and momenta of optimizer steps ``0 .. steps - 1`` under ``schedulers``, stepped on a deep copy
    (momentum 0 for a group without one)."""
    copies = copy.deepcopy((optimizer, [s for s, _ in schedulers]))  # one memo: the copies share the copied optimizer
    opt, scheds = copies
    lrs, momenta = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": nothing is optimized here
        for k in range(steps):
            lr = opt.param_groups[0]["lr"]
            lrs.append(float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr))
            momenta.append(float(opt.param_groups[0].get("momentum", 0.0)))
            for sched, (_, every) in zip(scheds, schedulers):
                if (k + 1) % every == 0:
                    sched.step()
    return lrs, momenta
