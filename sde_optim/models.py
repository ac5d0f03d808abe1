"""The diagonal linear network (THEORY §1).

``beta(theta) = u * v`` (parametrization ``"uv"``) or ``beta = w_plus**depth - w_minus**depth``
(``"pm"``), prediction ``f(x) = <x, beta>``. At depth 2 the two are the same network under
the linear change ``u = w_plus + w_minus``, ``v = w_plus - w_minus`` (THEORY §1): SGD with
step ``lr`` on ``(w_plus, w_minus)`` equals SGD with step ``2 * lr`` on ``(u, v)``, which
``lr_scale`` reports so that the theory can always work in ``(u, v)``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from ._validation import check_choice, check_float, check_int

__all__ = ["DiagonalLinearNetwork"]

_PARAMETRIZATIONS = ("uv", "pm")
_INITS = ("unbalanced", "balanced")


class DiagonalLinearNetwork(nn.Module):
    """Diagonal linear network ``f(x) = <x, beta(theta)>`` on ``dim`` inputs.

    Args:
        dim: number of input features ``d`` (>= 1).
        parametrization: ``"uv"`` (``beta = u * v``, parameters ``u``, ``v``) or ``"pm"``
            (``beta = w_plus**depth - w_minus**depth``, parameters ``w_plus``, ``w_minus``).
        init: ``"unbalanced"``, ``"balanced"`` or an explicit pair of tensors of shape ``(dim,)``
            giving the initial parameters in the chosen parametrization (``(u0, v0)`` or
            ``(w_plus0, w_minus0)``).

            * ``"uv"``/``"unbalanced"``: ``u0 = sqrt(2) alpha, v0 = 0`` (``beta0 = 0``,
              imbalance ``q0 = 2 alpha^2``, THEORY §6);
            * ``"uv"``/``"balanced"``: ``u0 = v0 = alpha`` (``beta0 = alpha^2``, ``q0 = 0``);
            * ``"pm"``/``"unbalanced"``: ``w_plus0 = w_minus0 = alpha`` (``beta0 = 0``, the
              standard small initialization of the +- network; at depth 2 this is the
              ``"uv"`` network with ``u0 = 2 alpha, v0 = 0``);
            * ``"pm"``/``"balanced"``: ``w_plus0 = alpha, w_minus0 = 0`` (``beta0 = alpha^depth``;
              at depth 2 the ``"uv"`` network with ``u0 = v0 = alpha``).
        alpha: initialization scale, a number >= 0 or a tensor of shape ``(dim,)`` with
            entries >= 0 (per-coordinate scale). Ignored for explicit tensors.
        depth: exponent of the ``"pm"`` parametrization (>= 2). ``"uv"`` is depth 2 only.
        dtype, device: of the parameters (any floating dtype, any device).
    """

    def __init__(
        self,
        dim: int,
        *,
        parametrization: str = "uv",
        init: str | Sequence[Tensor] = "unbalanced",
        alpha: float | Tensor = 0.1,
        depth: int = 2,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.dim = check_int("dim", dim, minimum=1)
        self.parametrization = check_choice("parametrization", parametrization, _PARAMETRIZATIONS)
        self.depth = check_int("depth", depth, minimum=2)
        if self.parametrization == "uv" and self.depth != 2:
            raise ValueError(f"depth must be 2 for parametrization 'uv' (beta = u * v); got {depth}. Use parametrization='pm' for depth > 2")
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        first, second = self._initial_values(init, alpha, dtype, device)
        names = ("u", "v") if self.parametrization == "uv" else ("w_plus", "w_minus")
        self._names = names
        self.register_parameter(names[0], nn.Parameter(first))
        self.register_parameter(names[1], nn.Parameter(second))

    # ------------------------------------------------------------------ construction
    def _initial_values(self, init, alpha, dtype, device) -> tuple[Tensor, Tensor]:
        if isinstance(init, str):
            check_choice("init", init, _INITS)
            a = self._alpha_tensor(alpha, dtype, device)
            zero = torch.zeros_like(a)
            if self.parametrization == "uv":
                return (math.sqrt(2.0) * a, zero) if init == "unbalanced" else (a.clone(), a.clone())
            return (a.clone(), a.clone()) if init == "unbalanced" else (a.clone(), zero)
        if not isinstance(init, (tuple, list)) or len(init) != 2 or not all(isinstance(t, Tensor) for t in init):
            raise TypeError(
                f"init must be 'unbalanced', 'balanced' or a pair of tensors of shape ({self.dim},); got {type(init).__name__}"
            )
        out = []
        for label, t in zip(("init[0]", "init[1]"), init):
            if t.shape != (self.dim,):
                raise ValueError(f"{label} must have shape ({self.dim},), got {tuple(t.shape)}")
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise ValueError(f"{label} must be a floating tensor with finite entries")
            out.append(t.detach().to(dtype=dtype, device=device if device is not None else t.device).clone())
        return out[0], out[1]

    def _alpha_tensor(self, alpha, dtype, device) -> Tensor:
        if isinstance(alpha, Tensor):
            if alpha.ndim == 0:
                alpha = alpha.expand(self.dim)
            if alpha.shape != (self.dim,):
                raise ValueError(f"alpha must be a number or a tensor of shape ({self.dim},), got shape {tuple(alpha.shape)}")
            if not bool(torch.isfinite(alpha).all()) or bool((alpha < 0).any()):
                raise ValueError("alpha must have finite entries >= 0")
            return alpha.detach().to(dtype=dtype, device=device if device is not None else alpha.device).clone()
        a = check_float("alpha", alpha, minimum=0.0)
        return torch.full((self.dim,), a, dtype=dtype, device=device)

    @classmethod
    def from_state(cls, u: Tensor, v: Tensor, *, parametrization: str = "uv") -> "DiagonalLinearNetwork":
        """A depth-2 network whose ``(u, v)`` state is the given one (THEORY §1).

        For ``parametrization="pm"`` the parameters are ``w_plus = (u + v) / 2``,
        ``w_minus = (u - v) / 2``, so ``beta = u * v`` either way.
        """
        if not isinstance(u, Tensor) or not isinstance(v, Tensor):
            raise TypeError("u and v must be tensors")
        if u.ndim != 1 or u.shape != v.shape:
            raise ValueError(f"u and v must be 1-d tensors of equal shape; got {tuple(u.shape)} and {tuple(v.shape)}")
        check_choice("parametrization", parametrization, _PARAMETRIZATIONS)
        if not u.is_floating_point() or u.dtype != v.dtype:
            raise TypeError("u and v must share one floating dtype")
        pair = (u, v) if parametrization == "uv" else ((u + v) / 2, (u - v) / 2)
        return cls(u.shape[0], parametrization=parametrization, init=pair, dtype=u.dtype, device=u.device)

    # ------------------------------------------------------------------ observables
    @property
    def beta(self) -> Tensor:
        """Effective linear predictor ``beta(theta)``, shape ``(dim,)``; differentiable."""
        a, b = self._pair()
        if self.parametrization == "uv":
            return a * b
        return a.pow(self.depth) - b.pow(self.depth)

    @property
    def lr_scale(self) -> float:
        """Factor mapping this network's SGD step size to the step size in ``(u, v)`` (THEORY §1).

        1 for ``"uv"``; 2 for ``"pm"`` at depth 2 (the map ``w -> (u, v)`` has ``J^T J = 2 I``,
        which also multiplies Hessian traces and squared gradient norms by 2).
        """
        self._require_depth_two("lr_scale")
        return 1.0 if self.parametrization == "uv" else 2.0

    def uv_state(self) -> tuple[Tensor, Tensor]:
        """The ``(u, v)`` coordinates of the current state (depth 2 only), detached, shapes ``(dim,)``."""
        self._require_depth_two("uv_state")
        a, b = (p.detach() for p in self._pair())
        if self.parametrization == "uv":
            return a, b
        return a + b, a - b

    def imbalance(self) -> Tensor:
        """Imbalance ``q = u^2 - v^2`` per coordinate (THEORY E4), shape ``(dim,)``.

        For ``"pm"`` at depth 2 this is ``4 w_plus w_minus``. Conserved by gradient flow;
        contracted by SGD noise (E4).
        """
        self._require_depth_two("imbalance")
        a, b = self._pair()
        if self.parametrization == "uv":
            return a * a - b * b
        return 4.0 * a * b

    def forward(self, x: Tensor) -> Tensor:
        """``f(x) = <x, beta>`` for ``x`` of shape ``(..., dim)``; returns shape ``(...)``."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.ndim == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (..., {self.dim}), got {tuple(x.shape)}")
        return x @ self.beta

    def extra_repr(self) -> str:
        return f"dim={self.dim}, parametrization={self.parametrization!r}, depth={self.depth}"

    # ------------------------------------------------------------------ helpers
    def _pair(self) -> tuple[Tensor, Tensor]:
        return getattr(self, self._names[0]), getattr(self, self._names[1])

    def _require_depth_two(self, what: str) -> None:
        if self.depth != 2:
            raise ValueError(f"{what} is defined for depth 2 only (THEORY §1); this network has depth={self.depth}")
