"""The SGD being predicted and the mean-field coefficients it induces, owned in one place.

:class:`SGDConfig` describes what ``torch.optim.SGD`` does with its schedulers (THEORY §7):
the learning rate (a number, a per-step sequence or a callable of the step), the batch size
(likewise), ``momentum``, ``dampening``, ``nesterov``, ``weight_decay`` with torch's meanings and
validation, and the SDE's ``noise_scale``.  :meth:`SGDConfig.coefficients` turns it into
:class:`Coefficients`, the functions of SGD time ``t = k / d`` (E2) that every solver reads:

* the ``(u, v)`` step ``gamma(t) = lr_scale * lr_eff(t)`` with the momentum-effective learning rate
  ``lr_eff = lr (1 - dampening) / (1 - momentum)`` (Nesterov: ``lr / (1 - momentum)``, E11);
* the noise factor ``nu(t) = noise_scale^2 gamma(t)^2 / B(t)`` of E3-E6 (diffusion ``4 nu lam R``,
  imbalance decay ``2 nu lam R``, E4);
* the weight-decay rate ``kappa(t) = d lr_eff(t) weight_decay`` (E12; the user's ``lr``, not
  ``gamma``) and its integral ``K(t)``.

Schedules enter pointwise (E10).  The per-step values are interpolated linearly in ``t`` between
steps, except at *jumps* (a change larger than 1 % of the schedule's largest value from one step
to the next, e.g. ``StepLR``), which are kept as breakpoints: solvers stop there and evaluate the
coefficients on each side (:attr:`Coefficients.breakpoints`).

:class:`MeanFieldDynamics` combines the coefficients with a set of coordinate types: the drift,
diffusion and imbalance of E4-E6 per type, used by the PDE, the particles and the ODEs.
"""

from __future__ import annotations

import bisect
import copy
import math
import warnings
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Callable, Sequence, Union

import torch
from torch import Tensor

from .._validation import check_float, check_int
from ..observables import CoordinateState
from .coords import phi_to_state, psi_to_state
from .statistics import risk_of
from .types import KIND_FROZEN, KIND_PHI, KIND_PSI, CoordinateTypes

__all__ = ["SGDConfig", "Coefficients", "CoefficientBatch", "MeanFieldDynamics", "effective_step", "JUMP"]

ScheduleLike = Union[float, int, Sequence[float], Tensor, Callable[[int], float]]

JUMP = 1e-2  # a step-to-step change above this share of the schedule's largest value is a jump


def effective_step(model, lr: float) -> float:
    """``gamma = lr * model.lr_scale``: the SGD step in ``(u, v)`` coordinates (THEORY §1)."""
    lr = check_float("lr", lr, minimum=0.0, strict=True)
    return lr * float(model.lr_scale)


def _schedule(name: str, value: ScheduleLike, steps: int, *, integer: bool = False, positive: bool = True) -> Tensor:
    """Per-step float64 values ``(steps,)`` of a number, a sequence (at least ``steps`` long) or a callable."""
    if callable(value) and not isinstance(value, Tensor):
        vals = []
        for k in range(steps):
            v = value(k)
            vals.append(check_int(f"{name}({k})", v, minimum=1) if integer else
                        check_float(f"{name}({k})", v, minimum=0.0))
        out = torch.tensor(vals, dtype=torch.float64)
    elif isinstance(value, (Sequence, Tensor)) and not isinstance(value, str):
        seq = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
        if seq.numel() < steps:
            raise ValueError(f"{name} schedule has {seq.numel()} values but the prediction needs {steps} "
                             f"(one per SGD step up to the horizon); give at least {steps}")
        out = seq[:steps].clone()
        if not bool(torch.isfinite(out).all()):
            bad = int((~torch.isfinite(out)).nonzero()[0, 0])
            raise ValueError(f"{name}[{bad}] must be a finite number, got {float(out[bad])}")
        if bool((out < 0).any()):
            bad = int((out < 0).nonzero()[0, 0])
            raise ValueError(f"{name}[{bad}] must be >= 0, got {float(out[bad])}")
        if integer and (bool((out < 1).any()) or bool((out != out.round()).any())):
            raise ValueError(f"{name} must be integers >= 1 at every step")
    else:
        v = check_int(name, value, minimum=1) if integer else check_float(name, value, minimum=0.0)
        out = torch.full((steps,), float(v), dtype=torch.float64)
    if positive and not integer and bool((out == 0).all()):
        raise ValueError(f"{name} must be > 0 at some step (it is 0 throughout)")
    return out


MAX_SCHEDULE = 10**7  # per-step schedules longer than this are refused (memory and time of reading them)


def _length(value: ScheduleLike, steps: int) -> int:
    """How many per-step values a schedule needs: 1 for a constant, else ``steps`` (bounded)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return 1
    if steps > MAX_SCHEDULE:
        raise ValueError(f"a per-step schedule over steps={steps} (> {MAX_SCHEDULE}) is not supported; shorten the "
                         "horizon or use a constant")
    return steps


def _value_at(name: str, value: ScheduleLike, k: int) -> float:
    if callable(value) and not isinstance(value, Tensor):
        return float(value(k))
    if isinstance(value, (Sequence, Tensor)) and not isinstance(value, str):
        return float(value[k])
    return float(value)


@dataclass(frozen=True)
class SGDConfig:
    """The SGD being predicted: ``torch.optim.SGD``'s hyper-parameters, schedules included (THEORY §7).

    Attributes:
        lr: step size: a number (> 0), a per-step sequence (one value per SGD step, at least as many as
            steps predicted) or a callable ``step -> lr``; values >= 0 and finite (warmup may start at 0).
        batch_size: ``B``: an integer >= 1, a per-step sequence or a callable ``step -> B``.
        momentum, dampening, nesterov, weight_decay: as ``torch.optim.SGD`` (same validation): momentum in
            ``[0, 1)`` here (``>= 1`` has no stationary limit), Nesterov needs ``momentum > 0`` and
            ``dampening = 0``.
        noise_scale: multiplies the gradient noise of the SDE (1 = SGD, 0 = gradient flow).
    """

    lr: ScheduleLike
    batch_size: ScheduleLike = 1
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    noise_scale: float = 1.0

    def __post_init__(self) -> None:
        if not callable(self.lr) and not isinstance(self.lr, (Sequence, Tensor)):
            object.__setattr__(self, "lr", check_float("lr", self.lr, minimum=0.0, strict=True))
        if not callable(self.batch_size) and not isinstance(self.batch_size, (Sequence, Tensor)):
            object.__setattr__(self, "batch_size", check_int("batch_size", self.batch_size, minimum=1))
        momentum = check_float("momentum", self.momentum, minimum=0.0)
        if momentum >= 1.0:
            raise ValueError(f"momentum must be in [0, 1) (the mean-field limit needs a stationary buffer); got {momentum}")
        object.__setattr__(self, "momentum", momentum)
        object.__setattr__(self, "dampening", check_float("dampening", self.dampening, minimum=0.0, maximum=1.0))
        if not isinstance(self.nesterov, bool):
            raise TypeError(f"nesterov must be a bool, got {type(self.nesterov).__name__}")
        if self.nesterov and (momentum <= 0 or self.dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening (as torch.optim.SGD)")
        if self.dampening == 1.0 and momentum > 0:
            raise ValueError("dampening = 1 with momentum > 0 never moves the parameters (the buffer stays at the "
                             "first gradient times momentum^k); use dampening in [0, 1)")
        object.__setattr__(self, "weight_decay", check_float("weight_decay", self.weight_decay, minimum=0.0))
        object.__setattr__(self, "noise_scale", check_float("noise_scale", self.noise_scale, minimum=0.0))

    @property
    def momentum_factor(self) -> float:
        """``lr_eff / lr`` (E11): ``(1 - dampening) / (1 - momentum)``, or ``1 / (1 - momentum)`` with Nesterov."""
        if self.nesterov:
            return 1.0 / (1.0 - self.momentum)
        return (1.0 - self.dampening) / (1.0 - self.momentum)

    @property
    def step_error_factor(self) -> float:
        """How much larger E11's drift error is than plain SGD's at the same effective step ``s = gamma h`` (``h`` a
        coordinate's curvature): 1 without momentum.

        On a quadratic, plain SGD contracts by ``1 - s`` per step against the limit's ``e^-s``: a relative rate error
        ``s / 2``.  Heavy ball (raw step ``a = lr (1 - tau) h``) has the slow root ``1 - eps`` of
        ``r^2 - (1 + mu - a) r + mu``, ``eps = a / (1 - mu) + a^2 mu / (1 - mu)^3 + O(a^3)``: with ``s = a / (1 - mu)`` a
        relative rate error ``s (1/2 + mu / (1 - mu))``, i.e. ``(1 + mu) / (1 - mu)`` times plain SGD's (19 at
        ``mu = 0.9``: the buffer remembers gradients ``1 / (1 - mu)`` steps old).  Nesterov (slow root of
        ``r^2 - (1 + mu)(1 - a) r + mu (1 - a)``): ``eps = s + s^2 mu^2 / (1 - mu) + ...``, factor
        ``(1 - mu + 2 mu^2) / (1 - mu)``.  Measured: a power law with a Student-t
        teacher, ``B = 4``, at a fixed effective step and ``d = 2048``: curvature 3.8 / 3.9 / 8.3 / 15.3 % off SGD (16
        runs) at ``mu = 0 / 0.5 / 0.8 / 0.9``, where the plain step indicator was 0.021 (docs/benchmarks.md)."""
        mu = self.momentum
        if self.nesterov:
            return (1.0 - mu + 2.0 * mu * mu) / (1.0 - mu)
        return (1.0 + mu) / (1.0 - mu)

    @property
    def stability_factor(self) -> float:
        """Largest stable ``gamma * h`` of one step on a quadratic of curvature ``h``, ``gamma`` including the momentum
        factor: 2 for plain SGD; heavy ball ``2 (1 + mu) / (1 - tau)`` in the raw step, i.e. ``2 (1 + mu) / (1 - mu)``
        in the effective step without dampening; Nesterov ``2 (1 + mu) / ((1 + 2 mu)(1 - mu))``."""
        mu, tau = self.momentum, self.dampening
        if mu == 0:
            return 2.0
        raw = 2.0 * (1.0 + mu) / (1.0 + 2.0 * mu) if self.nesterov else 2.0 * (1.0 + mu) / (1.0 - tau)
        return raw * self.momentum_factor

    def options(self) -> list[str]:
        """What is not plain SGD, for titles and messages: ``["momentum=0.9", "nesterov", "wd=1e-4"]``."""
        parts = [f"momentum={self.momentum:g}"] if self.momentum else []
        parts += [f"dampening={self.dampening:g}"] if self.dampening else []
        parts += ["nesterov"] if self.nesterov else []
        parts += [f"wd={self.weight_decay:g}"] if self.weight_decay else []
        return parts

    def with_lr_scaled(self, factor: float) -> "SGDConfig":
        """The same SGD with every learning rate multiplied by ``factor`` (the shape of a schedule kept)."""
        lr = self.lr
        if callable(lr) and not isinstance(lr, Tensor):
            base = lr
            scaled = lambda k: factor * float(base(k))  # noqa: E731
        elif isinstance(lr, (Sequence, Tensor)):
            scaled = factor * torch.as_tensor(lr, dtype=torch.float64)
        else:
            scaled = factor * float(lr)
        return replace(self, lr=scaled)

    def lr_schedule(self, steps: int) -> Tensor:
        """Per-step learning rates ``(steps,)`` (float64); a constant is ``(1,)`` (it holds for every step)."""
        return _schedule("lr", self.lr, _length(self.lr, steps))

    def batch_schedule(self, steps: int) -> Tensor:
        """Per-step batch sizes ``(steps,)`` (float64 holding integers); a constant is ``(1,)``."""
        return _schedule("batch_size", self.batch_size, _length(self.batch_size, steps), integer=True)

    def lr_at(self, k: int) -> float:
        """The learning rate of SGD step ``k`` (0-based)."""
        return _value_at("lr", self.lr, k)

    def batch_at(self, k: int) -> int:
        """The batch size of SGD step ``k`` (0-based)."""
        return int(_value_at("batch_size", self.batch_size, k))

    @property
    def constant(self) -> bool:
        """Whether neither the learning rate nor the batch size is scheduled."""
        return isinstance(self.lr, float) and isinstance(self.batch_size, int)

    def to_dict(self, steps: int) -> dict:
        """Plain values for a checkpoint: schedules materialized over ``steps`` SGD steps (tensors)."""
        lr = self.lr if isinstance(self.lr, float) else self.lr_schedule(steps)
        batch = self.batch_size if isinstance(self.batch_size, int) else self.batch_schedule(steps).long()
        return {"lr": lr, "batch_size": batch, "momentum": self.momentum, "dampening": self.dampening,
                "nesterov": self.nesterov, "weight_decay": self.weight_decay, "noise_scale": self.noise_scale}

    @classmethod
    def from_dict(cls, state: dict) -> "SGDConfig":
        """The inverse of :meth:`to_dict`."""
        return cls(**state)

    def coefficients(self, dim: int, lr_scale: float, steps: int) -> "Coefficients":
        """The mean-field coefficients of this SGD on a ``dim``-coordinate network over ``steps`` SGD steps."""
        steps = check_int("steps", steps, minimum=1)
        lr = self.lr_schedule(steps) * self.momentum_factor
        batch = self.batch_schedule(steps)
        warn_momentum(self.momentum, dim)
        return Coefficients(dim=dim, gamma_steps=lr * lr_scale, batch_steps=batch, kappa_steps=dim * lr * self.weight_decay,
                            noise_scale=self.noise_scale, stability=self.stability_factor, lr_scale=lr_scale,
                            step_error=self.step_error_factor)


def warn_momentum(momentum: float, dim: int) -> None:
    """E11 holds while ``1 / (1 - momentum) << d``; its corrections are ``O(1 / ((1 - momentum) d))``: warn above 1 %."""
    if momentum > 0 and 1.0 / ((1.0 - momentum) * dim) > 0.01:
        warnings.warn(f"momentum {momentum} at d = {dim}: the mean-field prediction assumes 1/(1 - momentum) << d, and its "
                      f"corrections are of order 1/((1 - momentum) d) = {1.0 / ((1.0 - momentum) * dim):.2g} (THEORY E11)",
                      RuntimeWarning, stacklevel=5)


@dataclass
class _Piecewise:
    """A per-step schedule as a function of ``t = k / d``: linear between steps, jumps kept (see module docstring)."""

    knots: list[list[float]]  # per smooth piece: the knot times
    values: list[list[float]]  # per smooth piece: the values at the knots
    starts: list[float]  # start time of each piece
    constant: float | None

    @classmethod
    def from_steps(cls, v: Tensor, dim: int) -> "_Piecewise":
        vals = v.tolist()
        if all(x == vals[0] for x in vals):
            return cls([[0.0, len(vals) / dim]], [[vals[0], vals[0]]], [0.0], vals[0])
        top = max(abs(x) for x in vals)
        knots, values, starts = [[0.0]], [[vals[0]]], [0.0]
        for k in range(1, len(vals)):
            t = k / dim
            if abs(vals[k] - vals[k - 1]) > JUMP * top:  # a jump: close the piece (value held), open a new one
                knots[-1].append(t)
                values[-1].append(vals[k - 1])
                knots.append([t])
                values.append([vals[k]])
                starts.append(t)
            else:
                knots[-1].append(t)
                values[-1].append(vals[k])
        knots[-1].append(len(vals) / dim)
        values[-1].append(vals[-1])
        return cls(knots, values, starts, None)

    def __call__(self, t: float, side: int = 1) -> float:
        """Value at ``t``; at a jump ``side = +1`` gives the value after it, ``-1`` the one before."""
        if self.constant is not None:
            return self.constant
        i = bisect.bisect_right(self.starts, t) - 1 if side > 0 else bisect.bisect_left(self.starts, t) - 1
        i = min(max(i, 0), len(self.starts) - 1)
        ks, vs = self.knots[i], self.values[i]
        if t <= ks[0]:
            return vs[0]
        if t >= ks[-1]:
            return vs[-1]
        j = bisect.bisect_right(ks, t) - 1
        w = (t - ks[j]) / (ks[j + 1] - ks[j])
        return vs[j] + w * (vs[j + 1] - vs[j])

    @property
    def jumps(self) -> list[float]:
        return self.starts[1:]

    @staticmethod
    def _area(a: float, b: float, va: float, vb: float, hi: float) -> float:
        """The trapezoid of the segment ``[a, b]`` (values ``va``, ``vb``) up to ``hi <= b``."""
        return 0.5 * (va + (va + (vb - va) * (hi - a) / (b - a))) * (hi - a)

    @cached_property
    def _segments(self) -> tuple[list[float], list[tuple[float, float, float, float]], list[float]]:
        """Every segment's start, ``(a, b, va, vb)``, and the integral up to its start (summed in order)."""
        starts, segments, before, total = [], [], [], 0.0
        for ks, vs in zip(self.knots, self.values):
            for j in range(len(ks) - 1):
                seg = (ks[j], ks[j + 1], vs[j], vs[j + 1])
                starts.append(seg[0])
                segments.append(seg)
                before.append(total)
                total += self._area(*seg, seg[1])
        return starts, segments, before

    def integral(self, t: float) -> float:
        """``int_0^t`` of the function (trapezoid on the knots: exact for the piecewise-linear function).  The segments
        before ``t`` are summed once (a schedule given per step has a knot per step, and the solvers ask for ``K(t)``
        at every stage: summing from 0 each time took 8 of a 10 s prediction with weight decay and a step decay)."""
        if self.constant is not None:
            return self.constant * t
        starts, segments, before = self._segments
        n = bisect.bisect_left(starts, t)  # the segments that start before t: all but the last of them whole
        if n == 0:
            return 0.0
        a, b, va, vb = segments[n - 1]
        return before[n - 1] + self._area(a, b, va, vb, min(t, b))


@dataclass
class Coefficients:
    """Functions of SGD time of the mean-field limit (module docstring); built by :meth:`SGDConfig.coefficients`.

    ``gamma_steps`` (``(u, v)`` step with the momentum factor), ``batch_steps``, ``kappa_steps``: per-step
    values ``(steps,)``.  ``step_error``: :attr:`SGDConfig.step_error_factor` (the finite-``d`` step indicator's).
    """

    dim: int
    gamma_steps: Tensor
    batch_steps: Tensor
    kappa_steps: Tensor
    noise_scale: float = 1.0
    stability: float = 2.0
    lr_scale: float = 1.0
    step_error: float = 1.0
    _gamma: _Piecewise = field(init=False, repr=False)
    _batch: _Piecewise = field(init=False, repr=False)
    _kappa: _Piecewise = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._gamma = _Piecewise.from_steps(self.gamma_steps, self.dim)
        self._batch = _Piecewise.from_steps(self.batch_steps, self.dim)
        self._kappa = _Piecewise.from_steps(self.kappa_steps, self.dim)

    @classmethod
    def constant(cls, gamma: float, batch_size: float, noise_scale: float = 1.0, dim: int = 1,
                 kappa: float = 0.0) -> "Coefficients":
        """Constant coefficients (plain SGD, no schedule): ``gamma``, ``B``, ``noise_scale``, ``kappa``."""
        one = torch.ones(1, dtype=torch.float64)
        return cls(dim=dim, gamma_steps=gamma * one, batch_steps=float(batch_size) * one, kappa_steps=kappa * one,
                   noise_scale=noise_scale)

    @property
    def is_constant(self) -> bool:
        return all(f.constant is not None for f in (self._gamma, self._batch, self._kappa))

    @property
    def decays(self) -> bool:
        """Whether there is weight decay (E12) at some step."""
        return bool((self.kappa_steps != 0).any())

    @property
    def breakpoints(self) -> list[float]:
        """Times of the jumps of any schedule (solvers stop there)."""
        return sorted(set(self._gamma.jumps) | set(self._batch.jumps) | set(self._kappa.jumps))

    def gamma(self, t: float, side: int = 1) -> float:
        """``gamma(t)``: the ``(u, v)`` step including the momentum factor (E11)."""
        return self._gamma(t, side)

    def batch(self, t: float, side: int = 1) -> float:
        return self._batch(t, side)

    def noise(self, t: float, side: int = 1) -> float:
        """``nu(t) = noise_scale^2 gamma(t)^2 / B(t)``: diffusion ``4 nu lam R``, imbalance decay ``2 nu lam R`` (E3-E6)."""
        return self.noise_scale**2 * self.gamma(t, side) ** 2 / self.batch(t, side)

    def kappa(self, t: float, side: int = 1) -> float:
        """Weight-decay rate ``kappa(t) = d lr_eff(t) wd`` (E12)."""
        return self._kappa(t, side)

    def kappa_integral(self, t: float) -> float:
        """``K(t) = int_0^t kappa``."""
        return self._kappa.integral(t)

    @property
    def gamma_max(self) -> float:
        return float(self.gamma_steps.max())

    def stability_factor(self) -> float:
        """Largest stable ``gamma * h`` of one step on a quadratic of curvature ``h`` (see
        :attr:`SGDConfig.stability_factor`)."""
        return self.stability


class CoefficientBatch:
    """Several :class:`Coefficients` solved as one system (a sweep of learning rates or batch sizes, issue 12).

    The same methods as :class:`Coefficients`, returning ``(G, 1, 1)`` tensors (one value per member, shaped to
    broadcast over ``(types, cells)``) instead of floats, so that :class:`MeanFieldDynamics` and the
    Fokker-Planck solver carry a leading group dimension ``G`` with no other change.  Breakpoints are the union
    of the members'.  :meth:`select` keeps a subset (members that diverged leave the batch).
    """

    def __init__(self, members: Sequence[Coefficients], dtype: torch.dtype = torch.float64,
                 device: torch.device | str | None = None) -> None:
        if not members:
            raise ValueError("a CoefficientBatch needs at least one member")
        self.members = list(members)
        self.dtype, self.device = dtype, device
        self.noise_scale = self.members[0].noise_scale
        self.dim = self.members[0].dim

    def __len__(self) -> int:
        return len(self.members)

    def select(self, idx: Sequence[int]) -> "CoefficientBatch":
        return CoefficientBatch([self.members[i] for i in idx], self.dtype, self.device)

    def _col(self, values: list[float]) -> Tensor:
        return torch.tensor(values, dtype=self.dtype, device=self.device).reshape(-1, 1, 1)

    @property
    def decays(self) -> bool:
        return any(c.decays for c in self.members)

    @property
    def breakpoints(self) -> list[float]:
        return sorted(set().union(*(c.breakpoints for c in self.members)))

    def gamma(self, t: float, side: int = 1) -> Tensor:
        return self._col([c.gamma(t, side) for c in self.members])

    def batch(self, t: float, side: int = 1) -> Tensor:
        return self._col([c.batch(t, side) for c in self.members])

    def noise(self, t: float, side: int = 1) -> Tensor:
        return self._col([c.noise(t, side) for c in self.members])

    def kappa(self, t: float, side: int = 1) -> Tensor:
        return self._col([c.kappa(t, side) for c in self.members])

    def kappa_integral(self, t: float) -> Tensor:
        return self._col([c.kappa_integral(t) for c in self.members])

    def stability_factor(self) -> Tensor:
        return self._col([c.stability_factor() for c in self.members])


def _state_cap(dtype: torch.dtype) -> float:
    """``log(max) / 8`` of ``dtype``: states are evaluated where ``|beta|`` and ``rho`` stay below ``max^(1/8)``
    (``beta^8``, the highest power any statistic takes, finite); cells further out hold no mass unless the run diverges.

    A bound on the coordinate itself does not do: in float32 ``e^300`` overflows, and so did ``beta^2`` at a window's
    edge (``x ~ 60`` with ``|q| ~ 1e-3``): the risk there was ``inf``, ``inf * 0`` a nan in the cell masses, and the
    solve diverged at its first steps, silently (a power law with a Gaussian teacher, ``d = 4096``); in float64 the
    former ``|x| <= 300`` cut the law of a type whose ``|q|`` the noise had taken below ``e^-300`` (E4), where ``phi``
    of any ``beta`` of order one is past 300: the curvature dropped 2.6x between two output times (a three-level
    spectrum, two-valued teacher, ``sigma = 0.05``, ``B = 2``, half the critical lr, ``t ~ 2.1``;
    docs/benchmarks.md)."""
    return math.log(torch.finfo(dtype).max) / 8.0


class MeanFieldDynamics:
    """Drift, diffusion and imbalance of E4-E6 (with E10-E12) for a set of types: used by every solver.

    Args:
        types: the coordinate types.
        gamma: a :class:`Coefficients` (schedules, momentum, weight decay), or the constant ``(u, v)`` step.
        batch_size, noise_scale: with a constant ``gamma``: ``B`` and the noise factor.
        noise_std: label noise ``sigma``.  param_scale: ``J^T J`` of the parametrization (observables).

    Time enters through the coefficients: ``q_tau(t) = q0 exp(-2 lam I(t) - 2 K(t))`` with the noise integral
    ``I(t) = int_0^t nu R`` (E4 with E10) and the weight-decay integral ``K`` (E12); ``I`` is what the solvers
    integrate along with the law.
    """

    def __init__(self, types: CoordinateTypes, gamma: float | Coefficients | CoefficientBatch, batch_size: float = 1,
                 noise_std: float = 0.0, noise_scale: float = 1.0, param_scale: float = 1.0) -> None:
        self.types = types
        if isinstance(gamma, (Coefficients, CoefficientBatch)):
            self.coef = gamma
        else:
            self.coef = Coefficients.constant(float(gamma), batch_size, noise_scale)
        self.noise_std = noise_std
        self.param_scale = param_scale
        col = lambda t: t[:, None]  # noqa: E731  (T,) -> (T, 1)
        self.lam = col(types.lam)
        self.bstar = col(types.beta_star)
        self.q0 = col(types.q0)
        self.sign = col(types.sign)
        self.is_phi = col(types.kind == KIND_PHI)
        self.is_psi = col(types.kind == KIND_PSI)
        self.active = col((types.kind != KIND_FROZEN).to(types.lam.dtype))
        self.weight = col(types.weight)
        kinds = set(types.kind.tolist())
        self.only = kinds.pop() if len(kinds) == 1 else None  # the single kind of all types, if so (fast paths)
        self.decays = self.coef.decays

    # ---------------------------------------------------------------- a batch of coefficients (issue 12)
    @property
    def groups(self) -> int | None:
        """``G`` when the coefficients are a :class:`CoefficientBatch` (states then carry a leading ``(G,)``), else None."""
        return len(self.coef) if isinstance(self.coef, CoefficientBatch) else None

    def with_coefficients(self, coef: Coefficients | CoefficientBatch) -> "MeanFieldDynamics":
        """The same types and problem under other coefficients (a batch member, or a subset of the batch)."""
        other = copy.copy(self)
        other.coef = coef
        other.decays = coef.decays
        return other

    def member(self, g: int) -> "MeanFieldDynamics":
        """Member ``g`` of a batch as a plain (unbatched) dynamics."""
        return self.with_coefficients(self.coef.members[g])

    # ---------------------------------------------------------------- constant-coefficient views (plain SGD)
    @property
    def gamma(self) -> float:
        """The step at ``t = 0`` (the step, for constant coefficients)."""
        return self.coef.gamma(0.0)

    @property
    def batch_size(self) -> float:
        return self.coef.batch(0.0)

    @property
    def noise_scale(self) -> float:
        return self.coef.noise_scale

    # ---------------------------------------------------------------- E4-E6
    def q(self, integral: Tensor, t: float = 0.0) -> Tensor:
        """``q_tau(t) = q0 exp(-2 lam I - 2 K(t))`` (E4, E12), shape ``(T, 1)`` (or that of ``integral`` x types)."""
        decay = 2.0 * self.lam * integral
        if self.decays:
            decay = decay + 2.0 * self.coef.kappa_integral(t)
        return self.q0 * torch.exp(-decay)

    def state(self, x: Tensor, q: Tensor) -> CoordinateState:
        """CoordinateState at coordinates ``x`` (shape ``(T, K)``) given ``q`` (``(T, 1)``).

        ``|beta|`` and ``rho`` are capped at ``max^(1/8)`` of the dtype (:func:`_state_cap`; the state at ``x`` clamped
        there): a grid cell further out holds no mass unless the run diverges, and an overflow there put
        ``inf * 0 = nan`` into the risk and the operator (a 20-std window on a wide law, at 0.7x the critical lr)."""
        cap = _state_cap(x.dtype)
        if self.only == KIND_PHI:
            beta, rho = phi_to_state(q, x, cap)
            return CoordinateState(self.lam, self.bstar, beta, rho, q.expand_as(x), self.param_scale)
        if self.only == KIND_PSI:
            beta, rho = psi_to_state(self.sign, x.clamp(-cap, cap))
            return CoordinateState(self.lam, self.bstar, beta, rho, q.expand_as(x), self.param_scale)
        beta_phi, rho_phi = phi_to_state(q, torch.where(self.is_phi, x, torch.zeros_like(x)), cap)
        beta_psi, rho_psi = psi_to_state(self.sign, torch.where(self.is_psi, x, torch.zeros_like(x)).clamp_(-cap, cap))
        zero = torch.zeros_like(x)
        beta = torch.where(self.is_phi, beta_phi, torch.where(self.is_psi, beta_psi, zero))
        rho = torch.where(self.is_phi, rho_phi, torch.where(self.is_psi, rho_psi, zero))
        return CoordinateState(self.lam, self.bstar, beta, rho, q.expand_as(x), self.param_scale)

    def drift(self, beta: Tensor, risk: Tensor, t: float = 0.0, side: int = 1) -> Tensor:
        """Drift of E5 (phi: ``-2 gamma lam (beta - beta*)``; weight decay leaves phi alone, E12) or of the psi
        equation (THEORY §3 end, with ``-2 kappa`` from E12), shape of ``beta``."""
        base = -2.0 * self.coef.gamma(t, side) * self.lam * (beta - self.bstar)
        if self.only == KIND_PHI:
            return base
        psi_extra = base * self.sign - 2.0 * self.coef.noise(t, side) * self.lam * risk - 2.0 * self.coef.kappa(t, side)
        if self.only == KIND_PSI:
            return psi_extra
        return torch.where(self.is_phi, base, torch.where(self.is_psi, psi_extra, torch.zeros_like(base)))

    def diffusion(self, risk: Tensor, t: float = 0.0, side: int = 1) -> Tensor:
        """``D_tau = 4 nu(t) lam R`` (E6), shape ``(T, 1)``; zero for frozen types."""
        return 4.0 * self.coef.noise(t, side) * self.lam * risk * self.active

    def risk(self, c: CoordinateState, weight: Tensor) -> Tensor:
        return risk_of(c, weight, self.noise_std)

