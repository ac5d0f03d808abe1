"""What :class:`HomogenizedSGD` and :class:`SVAG` share: hyperparameter validation with
``torch.optim.SGD``'s rules, the step pipeline (directions, non-finite policy, momentum,
update), step counting, pickling and the extra entries of ``state_dict``."""

from __future__ import annotations

import functools
import math
from itertools import chain
from operator import is_
from typing import Any, Callable, Iterable, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from .._validation import check_choice
from . import functional
from .functional import (
    Gate,
    NoiseTerm,
    NonFiniteUpdateError,
    all_finite,
    apply_,
    directions,
    finite_on_cpu,
    momentum_,
    nesterov,
    resolve_foreach,
    sanitize,
)

NONFINITE_POLICIES = ("skip", "raise")

# Group keys added after the first release, with the value that reproduces the old behaviour:
# a state_dict saved before them loads and steps as it did (torch fills its own the same way).
_LATER_GROUP_KEYS = {"foreach": None, "maximize": False, "momentum": 0.0, "dampening": 0.0, "nesterov": False}


class _Batch(NamedTuple):
    """One parameter group's share of a step: the parameters that have a gradient, and those gradients."""

    group: dict[str, Any]
    params: list[Tensor]
    grads: list[Tensor]


try:  # the registries torch.optim.Optimizer's step wrapper reads (torch >= 2.0)
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks
except ImportError:  # pragma: no cover - another torch: keep torch's own wrapper
    _global_optimizer_pre_hooks = _global_optimizer_post_hooks = None


def _hooked_step(step: Callable[..., Any]) -> Callable[..., Any]:
    """``step`` wrapped as ``torch.optim.Optimizer`` wraps it (global and per-optimizer pre/post hooks,
    in torch's order and with torch's arguments; ``_optimizer_step_code``; the profiler label
    ``Optimizer.step#<class>.step``), except that the label's ``record_function`` is entered only
    while a profiler runs (``torch.profiler``, the legacy one, NVTX or ITT ranges). Outside it the scope does nothing but cost: on the CPU
    build measured it made each operation inside dearer, ~60-100 us per HomogenizedSGD step at
    d = 1e5 in a training loop (docs/benchmarks.md). Marked ``hooked`` so torch does not wrap it again.
    Every subclass's ``step`` is wrapped (:meth:`_SGDFamily.__init_subclass__`); one that calls
    ``super().step()`` runs the hooks once, in the outermost wrapper."""

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        self = args[0]
        if self.__dict__.get("_stepping"):  # a subclass's step calling super().step(): its wrapper ran the hooks
            return step(*args, **kwargs)
        self._stepping = True
        try:
            if torch.autograd._profiler_enabled():  # any profiler: torch.profiler, legacy, NVTX, ITT
                with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
                    return _run_with_hooks(step, args, kwargs)
            if (_global_optimizer_pre_hooks or self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks
                    or _global_optimizer_post_hooks):
                return _run_with_hooks(step, args, kwargs)
            out = step(*args, **kwargs)  # no hooks registered
            self._optimizer_step_code()
            return out
        finally:
            self._stepping = False

    wrapper.hooked = True  # type: ignore[attr-defined]
    return wrapper


def _run_with_hooks(step: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """torch.optim.Optimizer.profile_hook_step's body: pre-hooks (may replace args/kwargs), step, post-hooks."""
    self = args[0]
    for pre_hook in chain(_global_optimizer_pre_hooks.values(), self._optimizer_step_pre_hooks.values()):
        result = pre_hook(self, args, kwargs)
        if result is not None:
            if isinstance(result, tuple) and len(result) == 2:
                args, kwargs = result
            else:
                raise RuntimeError(f"{step} must return None or a tuple of (new_args, new_kwargs), but got {result}.")
    out = step(*args, **kwargs)
    self._optimizer_step_code()
    for post_hook in chain(self._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()):
        post_hook(self, args, kwargs)
    return out


class _SGDFamily(Optimizer):
    """Base class. Subclasses supply the noise (if any); this class validates and applies updates.

    Per parameter, with ``g`` the gradient (negated with ``maximize``) and ``xi`` the noise::

        d = g + weight_decay * p + noise_scale * xi            (THEORY §2, E3)
        buf = d at the first step, else momentum * buf + (1 - dampening) * d
        u = d + momentum * buf (nesterov), buf (momentum > 0), d (momentum = 0)   (E11)
        p <- p - lr * u

    which is ``torch.optim.SGD`` exactly when there is no noise. Parameters without a gradient
    (frozen, unused) are skipped, as torch does. Hyperparameters are checked with torch's rules
    and messages, plus the accepted range.

    Non-finite policy (``nonfinite=``), decided on the whole step (all groups) before anything changes:

    * ``"skip"`` (default): a step whose direction ``d`` has any NaN/Inf entry leaves every
      parameter and momentum buffer unchanged and increments :attr:`skipped_steps`. On an
      accelerator it is decided on the device, so it costs no host synchronization (except once
      per parameter, at the step that creates its momentum buffer): a 0-d flag gates the update
      after the directions were made finite. On a CPU, where reading a tensor is no
      synchronization, it is decided on the host: a finite step is the plain update (no
      sanitizing pass, no gate), a skipped one returns before anything changes. Either way the
      noise drawn for the skipped step is consumed.
    * ``"raise"``: :class:`NonFiniteUpdateError` naming the step number; parameters, optimizer
      state and the random stream are exactly as before the call. Checking needs one host
      synchronization per step.

    Scratch memory: one tensor per parameter with a gradient (the direction ``d``), views of a
    flat buffer reused every step and never saved.
    """

    _extra_key = "sde_optim"
    _pickled: tuple[str, ...] = ("nonfinite", "_steps", "_skipped_before", "_finite", "_skip_calls")  # beyond torch's 3
    _group_keys: tuple[str, ...] = ("lr", "weight_decay")  # a state_dict without them is not ours

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("step")
        if step is not None and not getattr(step, "hooked", False) and _global_optimizer_pre_hooks is not None:
            cls.step = _hooked_step(step)  # type: ignore[method-assign]

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], *, nonfinite: str) -> None:
        _check_hyperparameters(defaults)
        self.nonfinite = check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        self._steps = 0
        # skipped steps = _skipped_before + _skip_calls - _finite: one kernel per step (counting the
        # finite ones on the device) instead of two; a step decided on the host is counted only
        # when skipped (in _skip_calls alone)
        self._skipped_before: Tensor | None = None  # as loaded from a state_dict
        self._finite: Tensor | None = None  # finite steps under "skip" since then (device)
        self._skip_calls = 0  # steps under "skip" counted since then (host)
        self._workspace = _Workspace()
        self._gate_constants: dict[tuple, Tensor] = {}  # 0-d constants of the skip gate, never saved
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ parameters and hyperparameters
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _check_hyperparameters({**self.defaults, **param_group})
        super().add_param_group(param_group)
        _check_params(self.param_groups[-1])

    @property
    def skipped_steps(self) -> Tensor:
        """Number of steps skipped for non-finite updates (0-d int64 tensor; no sync to read lazily)."""
        before = self._skipped_before
        if self._finite is None:
            return torch.zeros((), dtype=torch.int64) if before is None else before
        since = self._skip_calls - self._finite
        return since if before is None else since + before.to(since.device)

    @staticmethod
    def _evaluate(closure: Callable[[], Tensor] | None) -> Tensor | None:
        """Run ``closure`` (loss and backward) with gradients enabled, as ``torch.optim.SGD`` does."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _batches(self) -> list[_Batch]:
        """Per group, the parameters that have a gradient (frozen or unused ones are skipped, as in torch)."""
        batches = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                if not p.is_floating_point():
                    raise TypeError(f"{type(self).__name__}: a parameter of dtype {p.dtype} has a gradient; "
                                    "only floating parameters can be optimized")
            if params:
                batches.append(_Batch(group, params, [p.grad for p in params]))
        return batches

    # ------------------------------------------------------------------ the update
    def _update(self, batches: list[_Batch], noise_of: dict[int, NoiseTerm], lr_factor: float = 1.0,
                rng: tuple[torch.Generator, Tensor] | None = None) -> None:
        """Directions, non-finite policy, momentum and update for one step (see the class docstring).

        ``noise_of``: noise terms by ``id(param)``; ``rng``: ``(generator, its state before this
        step's draws)``, restored on ``"raise"``.
        """
        self._steps += 1
        if not batches:
            return
        layout = self._workspace.layout(batches)
        plans = []
        for bt, f, out in zip(batches, layout.foreach, layout.outs):
            g = bt.group
            dirs = directions(bt.params, bt.grads, [noise_of.get(id(p)) for p in bt.params],
                              weight_decay=g["weight_decay"], maximize=g["maximize"],
                              noise_scale=g.get("noise_scale", 0.0), out=out, foreach=f)
            plans.append((bt, dirs, out, f))
        # every direction written into the workspace (a noise-free parameter's is its own gradient, which the
        # workspace's slot for it never receives: checking that slot read uninitialized memory)
        in_workspace = all(out is not None and all(map(is_, dirs, out)) for _, dirs, out, _ in plans)
        checked = layout.spans if in_workspace else [d for _, dirs, _, _ in plans for d in dirs]
        gate = None
        if self.nonfinite == "raise" or (layout.on_cpu and functional.CPU_READS_ON_HOST):
            if not (finite_on_cpu(checked) if layout.on_cpu else bool(all_finite(checked))):  # "raise": one sync
                self._reject(checked[0].device, rng)  # raises under "raise"
                return
        else:  # "skip" on an accelerator: decided on the device, no synchronization
            ok = all_finite(checked)
            gate = self._gate(ok)
            if in_workspace:
                sanitize(layout.spans, layout.spans)
            else:
                plans = [(bt, sanitize(dirs, out or [None] * len(dirs)), out, f) for bt, dirs, out, f in plans]
            if self._creates_buffers(batches) and not bool(ok):
                return  # one-time sync: a skipped first momentum step must not create buffers
        for bt, dirs, out, f in plans:
            updates = self._momentum(bt, dirs, gate, out, f)
            lr = bt.group["lr"] if lr_factor == 1.0 else bt.group["lr"] * lr_factor
            apply_(bt.params, updates, lr=lr, gate=gate, foreach=f)

    def _reject(self, device: torch.device, rng: tuple[torch.Generator, Tensor] | None) -> None:
        """A step with a non-finite direction, decided on the host: ``"raise"`` restores the random
        stream and raises; ``"skip"`` counts it (the step then changes nothing)."""
        if self.nonfinite == "raise":
            self._steps -= 1
            if rng is not None:
                rng[0].set_state(rng[1])
            raise NonFiniteUpdateError(
                f"{type(self).__name__}: non-finite gradient or noise at step {self._steps + 1} "
                "(1-based); parameters and optimizer state are unchanged"
            )
        self._counter(device)
        self._skip_calls += 1  # a call not counted finite: skipped

    def _gate(self, ok: Tensor) -> Gate:
        """``"skip"`` decided on the device: count the step there and return the gate."""
        self._counter(ok.device).add_(ok)
        self._skip_calls += 1
        return Gate(ok, self._gate_constants)

    def _counter(self, device: torch.device) -> Tensor:
        """The device-side count of finite steps (made at the first count, or anew when the parameters moved)."""
        if self._finite is None or self._finite.device != device:
            self._skipped_before = None if self._finite is None and self._skipped_before is None else \
                self.skipped_steps.to(device)
            self._finite, self._skip_calls = torch.zeros((), dtype=torch.int64, device=device), 0
        return self._finite

    def _creates_buffers(self, batches: list[_Batch]) -> bool:
        return any(b.group["momentum"] != 0 and any("momentum_buffer" not in self.state.get(p, ()) for p in b.params)
                   for b in batches)

    def _momentum(self, b: _Batch, dirs: list[Tensor], gate: Gate | None, out: list[Tensor] | None,
                  foreach: bool) -> list[Tensor]:
        """torch.optim.SGD's momentum buffers in ``self.state[p]["momentum_buffer"]`` (E11); returns the updates."""
        mu = b.group["momentum"]
        if mu == 0:
            return dirs
        states = [self.state[p] for p in b.params]
        old = [i for i, s in enumerate(states) if s.get("momentum_buffer") is not None]
        if len(old) < len(states):
            for s, d in zip(states, dirs):  # first step of a parameter: buf = d (torch: a clone of the gradient)
                if s.get("momentum_buffer") is None:
                    s["momentum_buffer"] = torch.clone(d).detach()
        momentum_([dirs[i] for i in old], [states[i]["momentum_buffer"] for i in old], momentum=mu,
                  dampening=b.group["dampening"], gate=gate, foreach=foreach)
        bufs = [s["momentum_buffer"] for s in states]
        if not b.group["nesterov"]:
            return bufs
        return nesterov(dirs, bufs, momentum=mu, out=out, foreach=foreach)

    # ------------------------------------------------------------------ state
    def _extra_state(self) -> dict[str, Any]:
        counted = self._finite is not None or self._skipped_before is not None
        return {"optimizer": type(self).__name__, "steps": self._steps,
                "skipped_steps": self.skipped_steps.cpu() if counted else None}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self._steps = int(extra["steps"])
        skipped = extra.get("skipped_steps")
        self._skipped_before = None if skipped is None else skipped.clone()
        self._finite, self._skip_calls = None, 0

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state[self._extra_key] = self._extra_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict of this optimizer class (older versions too); refuse another optimizer's."""
        self._check_compatible(state_dict)
        state_dict = dict(state_dict)
        extra = state_dict.pop(self._extra_key)
        super().load_state_dict(state_dict)
        self._load_extra_state(extra)

    def _check_compatible(self, state_dict: dict[str, Any]) -> None:
        """A clear ``ValueError`` at load time for a state_dict this class did not write."""
        name = type(self).__name__
        extra = state_dict.get(self._extra_key) if isinstance(state_dict, dict) else None
        if not isinstance(extra, dict):
            raise ValueError(
                f"{name}.load_state_dict: this state_dict has no '{self._extra_key}' entry, which every "
                f"{name}.state_dict() has; it comes from another optimizer (torch.optim.SGD?). "
                f"Load a state_dict saved from a {name}"
            )
        saved = extra.get("optimizer") or ("HomogenizedSGD" if "generator_state" in extra else None)
        if saved is not None and saved != name:
            raise ValueError(f"{name}.load_state_dict: this state_dict was saved by {saved}, not {name}")
        for i, group in enumerate(state_dict.get("param_groups", [])):
            missing = [k for k in self._group_keys if k not in group]
            if missing:
                raise ValueError(f"{name}.load_state_dict: param_groups[{i}] lacks {missing}, which {name} "
                                 "writes; the state_dict comes from another optimizer")

    def __getstate__(self) -> dict[str, Any]:
        """What pickle, ``copy.deepcopy`` and ``torch.save(optimizer)`` keep: torch's three entries plus
        this class's attributes (noise model, generator, counters). Hooks are dropped, as torch does."""
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in self._pickled if k in self.__dict__})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for key, value in _LATER_GROUP_KEYS.items():
            self.defaults.setdefault(key, value)
            for group in self.param_groups:
                group.setdefault(key, value)
        self.__dict__.setdefault("nonfinite", "skip")
        self.__dict__.setdefault("_steps", 0)
        self.__dict__.setdefault("_skipped_before", self.__dict__.pop("_skipped", None))
        self.__dict__.setdefault("_finite", None)
        self.__dict__.setdefault("_skip_calls", 0)
        self._workspace = _Workspace()
        self._gate_constants: dict[tuple, Tensor] = {}


class _Layout(NamedTuple):
    """How one step's parameters map onto the workspace: per batch, the multi-tensor flag and the
    scratch views (``None`` on the foreach path, which allocates like torch); the flat spans."""

    foreach: list[bool]
    outs: list[list[Tensor] | None]
    spans: list[Tensor]
    on_cpu: bool  # every parameter on a CPU


class _Workspace:
    """Scratch tensors for the update directions, one per parameter (same shape, dtype and device):
    views of one flat buffer per (device, dtype), reused every step, never saved or pickled.

    Reusing them matters at large ``d``: a fresh 40-MB temporary per step costs page faults
    that can double the step time (issue 15). The layout of a step is cached (keyed by the
    parameters that have a gradient), so a step pays no Python for it either.
    """

    def __init__(self) -> None:
        self._flat: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._layouts: dict[tuple, tuple[list[torch.Size], _Layout, list[Tensor]]] = {}  # shapes, layout, params

    def layout(self, batches: list[_Batch]) -> _Layout:
        """The step's layout; cached while the parameters with a gradient (and their shapes) stay the same."""
        params = [p for b in batches for p in b.params]
        key = (*map(id, params), *[b.group["foreach"] for b in batches])
        hit = self._layouts.get(key)  # holds its parameters: a live object with one of their ids is one of them
        if hit is not None and [p.shape for p in params] == hit[0]:
            return hit[1]
        foreach = [resolve_foreach(b.params, b.group["foreach"]) for b in batches]
        views, spans = self._carve([p for b, f in zip(batches, foreach) if not f for p in b.params])
        it = iter(views)
        result = _Layout(foreach, [None if f else [next(it) for _ in b.params] for b, f in zip(batches, foreach)],
                         spans, all(p.device.type == "cpu" for p in params))
        if len(self._layouts) >= 8:
            self._layouts.clear()
        self._layouts[key] = ([p.shape for p in params], result, params)
        return result

    def _carve(self, params: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Views shaped like ``params`` tiling one flat buffer per (device, dtype), and those spans."""
        need: dict[tuple[torch.device, torch.dtype], int] = {}
        for p in params:
            need[(p.device, p.dtype)] = need.get((p.device, p.dtype), 0) + p.numel()
        for k, n in need.items():
            if k not in self._flat or self._flat[k].numel() < n:
                self._flat[k] = torch.empty(n, dtype=k[1], device=k[0])
                self._layouts.clear()  # older views point into the replaced buffer
        offset = dict.fromkeys(need, 0)
        views = []
        for p in params:
            k = (p.device, p.dtype)
            views.append(self._flat[k][offset[k]:offset[k] + p.numel()].view(p.shape))
            offset[k] += p.numel()
        return views, [self._flat[k][:n] for k, n in need.items()]


def _check_lr(lr: Any) -> None:
    """torch's rule (a number or a 1-element tensor, >= 0) with a message giving the accepted range."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element; got a tensor of shape {tuple(lr.shape)}")
        if lr.is_complex() or lr.dtype == torch.bool:
            raise TypeError(f"lr must be a real number or a 1-element real tensor, got dtype {lr.dtype}")
        value = float(lr)  # construction-time check only, never per step
    elif isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"lr must be a real number or a 1-element tensor, got {type(lr).__name__}")
    else:
        value = float(lr)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"Invalid learning rate: {value} (lr must be a finite number >= 0)")


def _check_real(name: str, value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"Invalid {what}: {value} ({name} must be a finite number)")
    return value


def _check_hyperparameters(h: dict[str, Any]) -> None:
    """torch.optim.SGD's checks and messages, with the accepted range; ``h`` maps names to values."""
    _check_lr(h["lr"])
    if _check_real("weight_decay", h["weight_decay"], "weight_decay value") < 0:
        raise ValueError(f"Invalid weight_decay value: {h['weight_decay']} (weight_decay must be >= 0)")
    if _check_real("momentum", h.get("momentum", 0.0), "momentum value") < 0:
        raise ValueError(f"Invalid momentum value: {h['momentum']} (momentum must be >= 0)")
    _check_real("dampening", h.get("dampening", 0.0), "dampening value")
    for flag in ("nesterov", "maximize"):
        if not isinstance(h.get(flag, False), bool):
            raise TypeError(f"{flag} must be True or False, got {h[flag]!r}")
    if h.get("foreach") is not None and not isinstance(h["foreach"], bool):
        raise TypeError(f"foreach must be True, False or None, got {h['foreach']!r}")
    if h.get("nesterov", False) and (h.get("momentum", 0.0) <= 0 or h.get("dampening", 0.0) != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening "
                         f"(nesterov=True needs momentum > 0 and dampening = 0; got momentum={h.get('momentum')}, "
                         f"dampening={h.get('dampening')})")


def _check_params(group: dict[str, Any]) -> None:
    """Real floating parameters (others are skipped like torch does, unless they get a gradient);
    no complex or sparse ones; scalar factors that fit the dtype (they are ``alpha`` of in-place ops)."""
    for p in group["params"]:
        if p.is_complex():
            raise TypeError("complex parameters are not supported (the noise models are real); "
                            "optimize torch.view_as_real(p) instead")
        if p.layout != torch.strided:
            raise TypeError(f"only dense (strided) parameters are supported, got layout {p.layout}")
        if not p.is_floating_point():
            continue
        top = torch.finfo(p.dtype).max
        for key in ("lr", "weight_decay", "noise_scale"):
            value = float(group.get(key, 0.0))
            if abs(value) > top:
                raise ValueError(f"{key} must be <= {top:.4g} (the largest {p.dtype} value) for these parameters; "
                                 f"got {value}")
