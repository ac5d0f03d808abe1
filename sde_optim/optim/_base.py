"""What :class:`HomogenizedSGD` and :class:`SVAG` share: validation, the non-finite policy,
step counting and the extra entries of ``state_dict``."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from .._validation import check_choice, check_float
from .functional import NonFiniteUpdateError, all_finite, apply_directions

NONFINITE_POLICIES = ("skip", "raise")


class _SGDFamily(Optimizer):
    """Base class. Subclasses compute per-group update directions; this class applies them.

    Non-finite policy (``nonfinite=``):

    * ``"skip"`` (default): a step whose update has any NaN/Inf entry leaves every parameter
      unchanged and increments :attr:`skipped_steps`. Decided on the device, so it costs no
      host synchronization; the noise drawn for the skipped step is consumed.
    * ``"raise"``: :class:`NonFiniteUpdateError` naming the step number; parameters, optimizer
      state and the random stream are exactly as before the call. Checking needs one host
      synchronization per step.
    """

    _extra_key = "sde_optim"

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], *, nonfinite: str) -> None:
        check_float("lr", defaults["lr"], minimum=0.0)
        check_float("weight_decay", defaults["weight_decay"], minimum=0.0)
        self.nonfinite = check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        super().__init__(params, defaults)
        self._steps = 0
        self._skipped: Tensor | None = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key in ("lr", "weight_decay"):
            if key in param_group:
                check_float(key, param_group[key], minimum=0.0)
        super().add_param_group(param_group)
        _check_representable(self.param_groups[-1])

    @property
    def skipped_steps(self) -> Tensor:
        """Number of steps skipped for non-finite updates (0-d int64 tensor; no sync to read lazily)."""
        if self._skipped is None:
            return torch.zeros((), dtype=torch.int64)
        return self._skipped

    @staticmethod
    def _evaluate(closure: Callable[[], Tensor] | None) -> Tensor | None:
        """Run ``closure`` (loss and backward) with gradients enabled, as ``torch.optim.SGD`` does."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _params_with_grad(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        return params, [p.grad for p in params]

    def _apply(self, updates: list[tuple[dict[str, Any], list[Tensor], list[Tensor]]], lr_factor: float = 1.0,
               rng: tuple[torch.Generator, Tensor] | None = None) -> None:
        """Apply ``(group, params, directions)`` under the non-finite policy, then count the step.

        ``rng``: ``(generator, state before this step's draws)``, restored on ``"raise"``.
        """
        self._steps += 1
        all_dirs = [d for _, _, dirs in updates for d in dirs]
        mask = None
        if all_dirs:
            ok = all_finite(all_dirs)
            if self.nonfinite == "raise":
                if not bool(ok):
                    self._steps -= 1
                    if rng is not None:
                        rng[0].set_state(rng[1])
                    raise NonFiniteUpdateError(
                        f"{type(self).__name__}: non-finite gradient or noise at step {self._steps + 1} "
                        "(1-based); parameters and optimizer state are unchanged"
                    )
            else:
                mask = ok
                self._skipped = (self.skipped_steps.to(ok.device) + (~ok).to(torch.int64))
        for group, params, dirs in updates:
            apply_directions(params, dirs, lr=group["lr"] * lr_factor, mask=mask, foreach=group.get("foreach"))

    def _extra_state(self) -> dict[str, Any]:
        return {"steps": self._steps, "skipped_steps": None if self._skipped is None else self._skipped.cpu()}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self._steps = int(extra["steps"])
        skipped = extra.get("skipped_steps")
        self._skipped = None if skipped is None else skipped.clone()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state[self._extra_key] = self._extra_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop(self._extra_key, None)
        super().load_state_dict(state_dict)
        if extra is not None:
            self._load_extra_state(extra)


def _check_representable(group: dict[str, Any]) -> None:
    """The group's scalar factors must fit the parameters' dtype (they are the ``alpha`` of foreach ops)."""
    for p in group["params"]:
        if not p.is_floating_point():
            raise TypeError(f"parameters must be floating tensors, got one of dtype {p.dtype}")
        top = torch.finfo(p.dtype).max
        for key in ("lr", "weight_decay", "noise_scale"):
            if abs(group.get(key, 0.0)) > top:
                raise ValueError(f"{key} must be <= {top:.4g} (the largest {p.dtype} value) for these parameters; "
                                 f"got {group[key]}")
