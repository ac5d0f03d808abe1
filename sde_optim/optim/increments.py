"""Standardized increments of the Euler-Maruyama step: what multiplies the noise's square root.

One step of THEORY E3 adds ``sqrt(c^2 2 R h_i) z_i`` to coordinate ``i``, where ``z`` has
independent entries of mean 0 and variance 1. Two kinds:

* ``"gaussian"``: ``z_i ~ N(0, 1)``, the Brownian increment of E3 itself (Euler-Maruyama).
* ``"rademacher"``: ``z_i = +-1`` with probability 1/2 each: the *simplified weak Euler scheme*
  (Kloeden & Platen, Numerical Solution of SDEs, §14.1). It matches the Gaussian's first three
  moments, so every expectation of a smooth function of the path (the risk curve, the curvature,
  their laws over runs) converges at the same weak order 1 in ``dt = 1/d``; only the single
  path differs. SGD's own gradient noise is not Gaussian either: at one step per ``1/d`` of
  time each coordinate's noise adds up over many steps, and only its covariance survives in the
  limit (THEORY §2). It is drawn from 64-bit random words, one bit per entry, ~14x cheaper
  than ``normal_`` on a CPU (whose mt19937 stream costs one 32-bit word per Gaussian): see
  docs/benchmarks.md, "Optimizer step".

Both draw from an explicit ``torch.Generator`` only, on any device and floating dtype.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["INCREMENTS", "draw_increments_"]

INCREMENTS = ("gaussian", "rademacher")

_SIGNS: dict[torch.device, Tensor] = {}  # per device: 256 sign patterns of 8 int8, as int64


def draw_increments_(t: Tensor, generator: torch.Generator, kind: str,
                     scratch: dict[str, Any] | None = None, scale: Tensor | None = None) -> Tensor:
    """Fill ``t`` (any shape, floating) in place with independent standardized increments of ``kind``
    (one of :data:`INCREMENTS`) drawn from ``generator``, times ``scale`` when given; returns ``t``.

    ``scratch``: a dict the caller keeps across calls (never saved), where ``"rademacher"`` keeps
    its integer buffers (``5 n / 8`` bytes) and views so that a step allocates nothing and
    recomputes no shapes; ``None``: temporaries.
    ``scale``: a 0-d tensor on ``t``'s device (e.g. the noise's ``sqrt(2 R)``, never read on the host).
    """
    if kind == "gaussian":
        t.normal_(generator=generator)
        return t if scale is None else t.mul_(scale)
    if kind == "rademacher":
        return _rademacher_(t, generator, {} if scratch is None else scratch, scale)
    raise ValueError(f"increments must be one of {INCREMENTS}, got {kind!r}")


def _rademacher_(t: Tensor, generator: torch.Generator, scratch: dict[str, Any], scale: Tensor | None) -> Tensor:
    """``t`` filled with independent +-``scale``: one random byte per 8 entries, through a 256-entry sign table.

    Words: ``ceil(n / 64)`` full-range 64-bit integers (every bit uniform); each of their bytes
    indexes a table whose entry is the byte's 8 signs as 8 ``int8`` packed in one ``int64`` (entry
    ``k`` is ``+1`` where bit ``k`` is set, else ``-1``), so one gather of 8-byte words writes 8
    signs per random byte; one conversion writes ``t`` (a gather of 32-byte float rows costs twice
    both together on a CPU). Cost: ``n / 64`` words of the generator, passes over ``n / 8`` bytes
    and ``n`` bytes, and one pass writing ``t`` (two with ``scale``), against one word per entry for
    ``normal_``. The buffers and views of a target are kept in ``scratch`` (a step of the optimizer
    draws into the same buffer every time: its plan is made once).
    """
    n = t.numel()
    if n == 0:
        return t
    plan = _plan(t, scratch)
    plan.words.random_(_LOW, None, generator=generator)  # the full 64-bit range: every bit uniform
    plan.index.copy_(plan.bytes)
    torch.index_select(_sign_table(t.device), 0, plan.index, out=plan.codes)
    plan.flat.copy_(plan.signs)
    if scale is not None:
        plan.flat.mul_(scale)
    if plan.staged:  # a non-contiguous target, filled through a contiguous buffer
        t.copy_(plan.flat.view(t.shape))
    return t


_LOW = -(2**63)


class _Plan(NamedTuple):
    """Buffers and views of one Rademacher target (which it keeps alive, so its address is not reused):
    the words and their bytes, the int32 index, the gathered codes and their first ``n`` signs
    (``int8``), and the target as a flat tensor (a staging buffer when it is not contiguous)."""

    target: Tensor
    shape: torch.Size
    ptr: int
    words: Tensor
    bytes: Tensor
    index: Tensor
    codes: Tensor
    signs: Tensor
    flat: Tensor
    staged: bool


def _plan(t: Tensor, scratch: dict[str, Any]) -> _Plan:
    """The plan for ``t`` in ``scratch["plan"]`` (made anew for another tensor, or when ``t`` was resized or
    its storage replaced)."""
    plan = scratch.get("plan")
    if plan is not None and plan.target is t and plan.shape == t.shape and plan.ptr == t.data_ptr():
        return plan  # the same tensor, unmoved and unresized (dtype and strides come with it)
    n, device = t.numel(), t.device
    nbytes = (n + 7) // 8
    words = torch.empty((n + 63) // 64, dtype=torch.int64, device=device)
    codes = torch.empty(nbytes, dtype=torch.int64, device=device)
    staged = not t.is_contiguous()
    flat = torch.empty(n, dtype=t.dtype, device=device) if staged else t.view(-1)
    plan = _Plan(t, t.shape, t.data_ptr(), words, words.view(torch.uint8)[:nbytes],
                 torch.empty(nbytes, dtype=torch.int32, device=device), codes, codes.view(torch.int8)[:n], flat, staged)
    scratch["plan"] = plan
    return plan


def _sign_table(device: torch.device) -> Tensor:
    """``table[b]``: the signs of byte ``b``'s bits as 8 ``int8`` (``+1`` where bit ``k`` is set, else ``-1``, in
    memory order ``k = 0..7``) packed in one ``int64`` (shape ``(256,)``), cached per device."""
    table = _SIGNS.get(device)
    if table is None:
        bits = torch.arange(256, device=device).unsqueeze(1).bitwise_right_shift(torch.arange(8, device=device)) & 1
        table = _SIGNS[device] = (2 * bits - 1).to(torch.int8).contiguous().view(torch.int64).view(256)
    return table
