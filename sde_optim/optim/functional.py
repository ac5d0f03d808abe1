"""Functional SGD-type updates shared by :class:`HomogenizedSGD` and :class:`SVAG`.

Like ``torch.optim.sgd``: the optimizer classes are thin wrappers that collect parameters
and hyperparameters and call these functions, which have a single-tensor and a
``foreach`` path. A step is split into phases so that a whole step (all parameter groups)
can be checked for non-finite values *before* any parameter or momentum buffer changes:

1. :func:`directions`: ``d = g + weight_decay * p + noise_scale * xi`` per parameter (``g``
   the gradient, negated with ``maximize``; ``xi`` the noise, THEORY §2/E3);
2. :func:`all_finite`: one device-side flag for all ``d`` (no host synchronization), or on a CPU
   :func:`finite_on_cpu`, read on the host;
3. :func:`momentum_` (and :func:`nesterov`): ``torch.optim.SGD``'s momentum buffer on ``d``
   (THEORY §7, E11);
4. :func:`apply_`: ``p <- p - lr * u``.

Under ``nonfinite="skip"`` on an accelerator the flag gates phases 3 and 4 through 0-d tensors
(a :class:`Gate`), after :func:`sanitize` made ``d`` finite (so that a factor 0 really zeroes it):
a skipped step changes nothing and costs no synchronization. With ``noise_scale = 0`` or
no noise and an open gate the arithmetic is that of ``torch.optim.SGD``, operation for
operation, so results are bitwise equal.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = [
    "NoiseTerm",
    "Gate",
    "directions",
    "all_finite",
    "finite_on_cpu",
    "sanitize",
    "momentum_",
    "nesterov",
    "apply_",
    "resolve_foreach",
    "NonFiniteUpdateError",
]


class NonFiniteUpdateError(FloatingPointError):
    """A step's update (gradient, weight decay or noise) had a NaN or Inf entry.

    Raised before any parameter or optimizer state was modified.
    """


class NoiseTerm(NamedTuple):
    """The noise of one parameter, ``coeff * factor`` or ``coeff * factor * shared`` (elementwise).

    The product form lets a noise model hand over its chain rule unevaluated (StructuredNoise:
    ``factor`` the other parameter of a coordinate, ``shared`` the beta-noise, E3), so that
    :func:`directions` forms drift plus noise in one ``addcmul`` pass.
    """

    factor: Tensor
    shared: Tensor | None = None
    coeff: float = 1.0

    def materialize(self) -> Tensor:
        """The noise as a new tensor of the parameter's shape."""
        if self.shared is None:
            return self.factor * self.coeff
        return torch.mul(self.factor, self.shared).mul_(self.coeff)


class Gate:
    """Device-side decision of ``nonfinite="skip"``: open for a finite step, closed for a skipped one.

    ``ok`` is the 0-d bool flag. :meth:`select_like` turns it into the 0-d factors that gate
    buffers and parameters without a host synchronization: one ``where`` per factor and step,
    on constants kept in ``constants`` (a dict the caller keeps across steps; never saved).
    """

    def __init__(self, ok: Tensor, constants: dict[tuple, Tensor] | None = None) -> None:
        self.ok = ok
        self._constants = {} if constants is None else constants
        self._factors: dict[tuple, Tensor] = {}

    def select_like(self, t: Tensor, if_open: float, if_closed: float) -> Tensor:
        """0-d tensor of ``t``'s dtype and device: ``if_open`` for a finite step, else ``if_closed``."""
        key = (t.dtype, t.device, if_open, if_closed)
        f = self._factors.get(key)
        if f is None:
            f = self._factors[key] = torch.where(self.ok.to(t.device), self._constant(t, if_open),
                                                 self._constant(t, if_closed))
        return f

    def _constant(self, t: Tensor, value: float) -> Tensor:
        key = (t.dtype, t.device, value)
        c = self._constants.get(key)
        if c is None:
            if len(self._constants) > 64:  # a scheduler changes lr every step: keep it bounded
                self._constants.clear()
            c = self._constants[key] = torch.full((), value, dtype=t.dtype, device=t.device)
        return c


# Reading a CPU tensor on the host is no synchronization: on a CPU a step decides "skip" on the host
# and folds 0-d factors (the noise scale) into Python numbers. False runs, on a CPU, what an
# accelerator runs (the tests set it so, so that a CI without a GPU covers both paths).
CPU_READS_ON_HOST = True


def resolve_foreach(tensors: Sequence[Tensor], foreach: bool | None) -> bool:
    """``foreach`` as given, or torch's default: the multi-tensor path only on devices with foreach kernels."""
    if foreach is not None:
        return foreach
    if not tensors:
        return False
    t0 = tensors[0]
    return t0.device.type in _foreach_devices() and all(
        t.device == t0.device and t.dtype == t0.dtype for t in tensors
    )


@functools.lru_cache(maxsize=1)
def _foreach_devices() -> tuple[str, ...]:
    try:
        from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices

        return tuple(_get_foreach_kernels_supported_devices())
    except ImportError:  # pragma: no cover - older torch
        return ("cuda", "xpu")


def directions(
    params: list[Tensor],
    grads: list[Tensor],
    noises: list[NoiseTerm | None],
    *,
    weight_decay: float,
    maximize: bool,
    noise_scale: float,
    out: list[Tensor] | None = None,
    foreach: bool = False,
) -> list[Tensor]:
    """Update directions ``d_i = (+-g_i) + wd * p_i + s * xi_i`` (THEORY §2: drift plus scaled noise).

    ``noises[i]`` may be ``None`` (no noise for that parameter). Shapes follow ``params``;
    ``out[i]`` (same shape and dtype) receives ``d_i`` when given, else new tensors are
    allocated. When nothing is added to the gradient, ``d_i`` *is* ``grads[i]``: callers must not
    modify the returned tensors in place. The inputs are not modified.
    """
    add_noise = noise_scale != 0 and noises.count(None) < len(noises)
    if not (maximize or weight_decay != 0 or add_noise):
        return list(grads)
    if foreach:
        return _foreach_directions(params, grads, noises, weight_decay, maximize, noise_scale if add_noise else 0.0)
    return [_single_direction(p, g, n if add_noise else None, weight_decay, maximize, noise_scale, o)
            for p, g, n, o in zip(params, grads, noises, out or [None] * len(params))]


def _single_direction(p: Tensor, g: Tensor, n: NoiseTerm | None, wd: float, maximize: bool, s: float,
                      out: Tensor | None) -> Tensor:
    """One parameter of :func:`directions`: torch.optim.SGD's ops for ``+-g + wd p`` (bitwise the
    same), then the noise, in one pass with the drift when there is nothing else to add."""
    if maximize:
        d = torch.neg(g, out=out)
        if wd != 0:
            d.add_(p, alpha=wd)
    elif wd != 0:
        d = torch.add(g, p, alpha=wd, out=out)
    else:
        d = g
    if n is None:
        return d
    if n.shared is not None:  # StructuredNoise's chain rule: + s c factor * shared
        return torch.addcmul(g, n.factor, n.shared, value=s * n.coeff, out=out) if d is g else \
            d.addcmul_(n.factor, n.shared, value=s * n.coeff)
    return torch.add(g, n.factor, alpha=s * n.coeff, out=out) if d is g else d.add_(n.factor, alpha=s * n.coeff)


def _foreach_directions(params: list[Tensor], grads: list[Tensor], noises: list[NoiseTerm | None], wd: float,
                        maximize: bool, s: float) -> list[Tensor]:
    """The multi-tensor path of :func:`directions` (torch.optim.SGD's foreach ops for the drift)."""
    if maximize:
        d = list(torch._foreach_neg(grads))
        if wd != 0:
            torch._foreach_add_(d, params, alpha=wd)
    elif wd != 0:
        d = list(torch._foreach_add(grads, params, alpha=wd))
    else:
        d = list(grads)
    fresh = d is not grads and (maximize or wd != 0)  # d may be written in place
    prod = [i for i, n in enumerate(noises) if s != 0 and n is not None and n.shared is not None]
    if prod:
        args = ([d[i] for i in prod], [noises[i].factor for i in prod], [noises[i].shared for i in prod],  # type: ignore[union-attr]
                [s * noises[i].coeff for i in prod])  # type: ignore[union-attr]
        if fresh:
            torch._foreach_addcmul_(*args)  # type: ignore[arg-type]
        else:
            for i, t in zip(prod, torch._foreach_addcmul(*args)):  # type: ignore[arg-type]
                d[i] = t
    for i, n in enumerate(noises):
        if s != 0 and n is not None and n.shared is None:
            d[i] = d[i].add_(n.factor, alpha=s * n.coeff) if fresh else torch.add(d[i], n.factor, alpha=s * n.coeff)
    return d


def all_finite(tensors: Sequence[Tensor]) -> Tensor:
    """0-d bool tensor on the first tensor's device: every entry of every tensor is finite (no sync).

    Reads each tensor once (``aminmax``): NaN propagates to both extremes and +-Inf shows up in
    one of them, while finite values, however large, stay finite (unlike a sum, which
    overflows). Then, on 0-d tensors, ``s = min + max * 0`` (``max * 0`` is 0 or NaN, never an
    overflow) is finite exactly when both extremes are, and ``s - s == 0`` says so: four
    kernels for one tensor (the workspace of a whole step), only the first d-sized.
    """
    extremes: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        if t.numel():
            extremes.setdefault((t.dtype, t.device), []).extend(torch.aminmax(t))
    ok = None
    for vals in extremes.values():
        lo, hi = vals if len(vals) == 2 else torch.aminmax(torch.stack(vals))
        s = torch.addcmul(lo, hi, _zero(hi))
        flag = torch.eq(torch.sub(s, s), _zero(s))
        ok = flag if ok is None else torch.logical_and(ok, flag.to(ok.device))
    if ok is None:
        return torch.ones((), dtype=torch.bool, device=tensors[0].device if tensors else None)
    return ok


def finite_on_cpu(tensors: Sequence[Tensor]) -> bool:
    """:func:`all_finite` for CPU tensors, read on the host (which on a CPU is no synchronization): a sum
    per tensor (one read, half the cost of ``aminmax`` there); a finite sum proves every entry finite, a
    non-finite one (a NaN/Inf entry, or finite entries whose sum overflows) is decided by the extremes."""
    for t in tensors:
        if t.numel() and not math.isfinite(t.sum()):
            lo, hi = torch.aminmax(t)
            if not (math.isfinite(lo) and math.isfinite(hi)):
                return False
    return True


_ZEROS: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def _zero(like: Tensor) -> Tensor:
    """A cached 0-d zero of ``like``'s dtype and device (never written)."""
    key = (like.dtype, like.device)
    z = _ZEROS.get(key)
    if z is None:
        z = _ZEROS[key] = torch.zeros((), dtype=like.dtype, device=like.device)
    return z


def sanitize(dirs: list[Tensor], out: Sequence[Tensor | None]) -> list[Tensor]:
    """``nan_to_num(d)`` into ``out`` (in place where ``out[i] is dirs[i]``, new where ``None``): finite,
    so that a closed :class:`Gate` (a factor 0) really zeroes a skipped step. Finite entries are kept bitwise."""
    return [torch.nan_to_num(d, nan=0.0, posinf=0.0, neginf=0.0, out=o) for d, o in zip(dirs, out)]


def momentum_(
    dirs: list[Tensor],
    bufs: list[Tensor],
    *,
    momentum: float,
    dampening: float,
    gate: Gate | None = None,
    foreach: bool = False,
) -> None:
    """torch.optim.SGD's momentum buffers (THEORY §7, E11), updated in place: ``buf <- mu buf + (1 - tau) d``.

    Shapes: ``bufs[i]`` like ``dirs[i]``. With a closed ``gate`` the buffers keep their values
    (``mu -> 1``, ``1 - tau -> 0`` as 0-d tensors: bitwise torch's arithmetic when open).
    """
    if not bufs:
        return
    if gate is None:
        if foreach:
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, dirs, alpha=1 - dampening)
        else:
            for b, d in zip(bufs, dirs):
                b.mul_(momentum).add_(d, alpha=1 - dampening)
        return
    for b, d in zip(bufs, dirs):
        b.mul_(gate.select_like(b, momentum, 1.0)).addcmul_(d, gate.select_like(b, 1 - dampening, 0.0))


def nesterov(dirs: list[Tensor], bufs: list[Tensor], *, momentum: float, out: list[Tensor] | None = None,
             foreach: bool = False) -> list[Tensor]:
    """torch's Nesterov update ``d + mu * buf`` (E11), into ``out`` when given (``d`` itself is never written)."""
    if foreach:
        return list(torch._foreach_add(dirs, bufs, alpha=momentum))
    return [torch.add(d, b, alpha=momentum, out=o) for d, b, o in zip(dirs, bufs, out or [None] * len(dirs))]


def apply_(
    params: list[Tensor],
    updates: list[Tensor],
    *,
    lr: float | Tensor,
    gate: Gate | None = None,
    foreach: bool = False,
) -> None:
    """``p <- p - lr * u`` in place; a closed ``gate`` makes it a no-op (``u`` must then be finite).

    A tensor ``lr`` (or a gate) multiplies through a 0-d tensor instead of a Python scalar:
    bitwise the same arithmetic, and no host synchronization.
    """
    if gate is None and not isinstance(lr, Tensor):
        if foreach:
            torch._foreach_add_(params, updates, alpha=-lr)
        else:
            for p, u in zip(params, updates):
                p.add_(u, alpha=-lr)
        return
    cache: dict[tuple[torch.dtype, torch.device], Tensor] = {}
    scales = [cache[k] if (k := (p.dtype, p.device)) in cache else cache.setdefault(k, _neg_lr(lr, p, gate))
              for p in params]
    if foreach:
        torch._foreach_addcmul_(params, updates, scales)
    else:
        for p, u, scale in zip(params, updates, scales):
            p.addcmul_(u, scale)


def _neg_lr(lr: float | Tensor, p: Tensor, gate: Gate | None) -> Tensor:
    """``-lr`` (``0`` for a closed gate) as a 0-d tensor usable with ``p``."""
    if not isinstance(lr, Tensor):
        return gate.select_like(p, -lr, 0.0)  # type: ignore[union-attr]
    neg = -lr.reshape(()).to(p.device)
    return neg if gate is None else neg * gate.select_like(neg, 1.0, 0.0)
