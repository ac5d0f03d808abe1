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
  limit (THEORY §2). It is drawn from 64-bit random words, one bit per entry, 7-10x cheaper
  than ``normal_`` on a CPU (whose mt19937 stream costs one 32-bit word per Gaussian): see
  docs/benchmarks.md, "Optimizer step".

Both draw from an explicit ``torch.Generator`` only, on any device and floating dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["INCREMENTS", "draw_increments_"]

INCREMENTS = ("gaussian", "rademacher")

_SIGNS: dict[tuple[torch.dtype, torch.device], Tensor] = {}  # (256, 8) sign patterns per dtype and device


def draw_increments_(t: Tensor, generator: torch.Generator, kind: str,
                     scratch: dict[str, Tensor] | None = None) -> Tensor:
    """Fill ``t`` (any shape, floating) in place with independent standardized increments of ``kind``
    (one of :data:`INCREMENTS`) drawn from ``generator``; returns ``t``.

    ``scratch``: a dict the caller keeps across calls (never saved), where ``"rademacher"`` keeps
    its integer buffers (``5 n / 8`` bytes) so that a step allocates nothing; ``None``: temporaries.
    """
    if kind == "gaussian":
        return t.normal_(generator=generator)
    if kind == "rademacher":
        return _rademacher_(t, generator, {} if scratch is None else scratch)
    raise ValueError(f"increments must be one of {INCREMENTS}, got {kind!r}")


def _rademacher_(t: Tensor, generator: torch.Generator, scratch: dict[str, Tensor]) -> Tensor:
    """``t`` filled with independent +-1: one random byte per 8 entries, through a 256 x 8 sign table.

    Words: ``ceil(n / 64)`` full-range 64-bit integers (every bit uniform); their bytes index the
    table (one gather writes 8 entries per byte). Cost: ``n / 64`` words of the generator, a pass
    over ``n / 8`` bytes and one pass writing ``t``, against one word per entry for ``normal_``.
    """
    n = t.numel()
    if n == 0:
        return t
    contiguous = t.is_contiguous()
    flat = t.view(-1) if contiguous else torch.empty(n, dtype=t.dtype, device=t.device)
    nbytes = (n + 7) // 8
    words, index = _buffer(scratch, "words", (n + 63) // 64, torch.int64, t.device), \
        _buffer(scratch, "index", nbytes, torch.int32, t.device)
    words.random_(-(2**63), None, generator=generator)  # the full 64-bit range: every bit uniform
    index.copy_(words.view(torch.uint8)[:nbytes])
    signs = _sign_table(t.dtype, t.device)
    whole = n // 8
    if whole:
        torch.index_select(signs, 0, index[:whole], out=flat[: 8 * whole].view(whole, 8))
    if n > 8 * whole:
        flat[8 * whole:] = signs[index[whole]][: n - 8 * whole]
    if not contiguous:
        t.copy_(flat.view(t.shape))
    return t


def _buffer(scratch: dict[str, Tensor], name: str, size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``scratch[name]`` with exactly ``size`` entries of ``dtype`` on ``device`` (made anew when it does not fit)."""
    buf = scratch.get(name)
    if buf is None or buf.numel() != size or buf.device != device:
        buf = scratch[name] = torch.empty(size, dtype=dtype, device=device)
    return buf


def _sign_table(dtype: torch.dtype, device: torch.device) -> Tensor:
    """``table[b, k] = +1`` if bit ``k`` of byte ``b`` is set, else ``-1`` (shape ``(256, 8)``), cached."""
    key = (dtype, device)
    table = _SIGNS.get(key)
    if table is None:
        bits = torch.arange(256, device=device).unsqueeze(1).bitwise_right_shift(torch.arange(8, device=device)) & 1
        table = _SIGNS[key] = (2 * bits - 1).to(dtype)
    return table
