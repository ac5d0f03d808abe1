"""The Fokker-Planck step's SG operator (``sde_optim.theory.sg_operator``): the compiled CPU bands and elimination
against the torch formulas, LAPACK ``gtsv`` and the dense path, and how a singular or non-finite system is kept
apart."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sde_optim.theory import sg_operator
from sde_optim.theory.sg_operator import dense_implicit_solve, implicit_solve, sg_bands, system_bands

F64 = torch.float64


def generator_bands(shape: tuple[int, ...], n: int, seed: int, dtype=F64, spread: float = 50.0) -> torch.Tensor:
    """``(3, *shape, n)`` bands of a Scharfetter-Gummel-like generator: non-negative off-diagonals (up to ``spread``,
    log-spread over 6 decades so rows of very different stiffness meet), zero column sums, zero-flux ends."""
    g = torch.Generator().manual_seed(seed)
    cp = spread * 10.0 ** (-6.0 * torch.rand(*shape, n - 1, generator=g, dtype=F64))  # flux j -> j+1
    cm = spread * 10.0 ** (-6.0 * torch.rand(*shape, n - 1, generator=g, dtype=F64))  # flux j+1 -> j
    bands = torch.zeros(3, *shape, n, dtype=F64)
    lo, dg, up = bands.unbind(0)
    lo[..., 1:] = cp
    up[..., :-1] = cm
    dg[..., :-1] -= cp
    dg[..., 1:] -= cm
    return bands.to(dtype)


def gtsv_reference(h: float, bands: torch.Tensor, rhs: torch.Tensor, col_scale=None, other=None) -> torch.Tensor:
    """The previous CPU path: the bands of ``I - h M`` formed with torch operations, one LAPACK ``gtsv`` per
    system."""
    from scipy.linalg import lapack

    n = rhs.shape[-1]
    lo, dg, up = (x.reshape(-1, n) for x in system_bands(h, bands, col_scale, other))
    gtsv = lapack.dgtsv if rhs.dtype == F64 else lapack.sgtsv
    out = []
    for k, r in enumerate(rhs.reshape(-1, n)):
        res = gtsv(lo[k, 1:].numpy().copy(), dg[k].numpy().copy(), up[k, :-1].numpy().copy(), r.numpy().copy())
        assert res[-1] == 0
        out.append(torch.from_numpy(res[3]))
    return torch.stack(out).reshape(rhs.shape)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("stage", [1, 2])
def test_the_compiled_elimination_is_lapack_gtsv_bit_for_bit(dtype, stage):
    """On the solver's matrices (column-diagonally-dominant M-matrices) partial pivoting never exchanges rows, and the
    compiled elimination does gtsv's arithmetic in gtsv's order: the same numbers to the last bit, in both stages
    of MPRK22 (stage 2: a column scaling and a second generator), for steps from stiff (h = 10) to small."""
    shape, n = (2, 7), 40
    bands = generator_bands(shape, n, seed=0, dtype=dtype)
    other = generator_bands(shape, n, seed=1, dtype=dtype)
    g = torch.Generator().manual_seed(2)
    rhs = torch.rand(*shape, n, generator=g, dtype=F64).to(dtype)
    scale = (0.2 + 5.0 * torch.rand(*shape, n, generator=g, dtype=F64)).to(dtype)
    for h in (10.0, 0.3, 1e-4):
        args = (h, bands, rhs) if stage == 1 else (h, bands, rhs, scale, other)
        assert torch.equal(implicit_solve(*args), gtsv_reference(*args))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 70), types=st.integers(1, 21), h=st.floats(1e-6, 1e3), seed=st.integers(0, 10_000),
       stage=st.sampled_from([1, 2]))
def test_the_compiled_and_dense_paths_agree_on_any_shape(n, types, h, seed, stage):
    """Any number of cells (one included) and of types (a multiple of the kernel's block of 8 or not): the compiled
    elimination and the dense LU (the path off the CPU) solve the same system, and the solution conserves mass
    (column sums of ``I - h M`` are 1)."""
    bands = generator_bands((types,), n, seed) if n > 1 else torch.zeros(3, types, 1, dtype=F64)
    g = torch.Generator().manual_seed(seed + 1)
    rhs = torch.rand(types, n, generator=g, dtype=F64)
    extra = () if stage == 1 else (0.5 + torch.rand(types, n, generator=g, dtype=F64), generator_bands((types,), max(n, 2), seed + 2)[..., :n])
    if stage == 2 and n == 1:
        extra = (extra[0], torch.zeros(3, types, 1, dtype=F64))
    fast, dense = implicit_solve(h, bands, rhs, *extra), dense_implicit_solve(h, bands, rhs, *extra)
    torch.testing.assert_close(fast, dense, rtol=1e-9, atol=1e-12 * float(rhs.abs().max()))
    if stage == 1:
        torch.testing.assert_close(fast.sum(-1), rhs.sum(-1), rtol=1e-10, atol=0.0)


def test_a_nan_stays_in_its_own_system():
    """The batch is many independent systems: as one block-diagonal LAPACK call, elimination carried a member's nan
    across the zero couplings of the block ends (0 * nan = nan) into every member, and a sweep whose largest lr
    overflowed returned nan curves (estimate inf) for all twelve members (best_lr's coarse sweep).  Here a nan in
    one type's bands leaves every other type's solution as it is alone."""
    bands = generator_bands((3, 2), 6, seed=3)
    rhs = torch.rand(3, 2, 6, generator=torch.Generator().manual_seed(4), dtype=F64)
    alone = implicit_solve(0.5, bands, rhs)
    bands[1, 1, 0, 2] = float("nan")
    out = implicit_solve(0.5, bands, rhs)
    assert bool(torch.isnan(out[1, 0]).all())
    keep = torch.ones(3, 2, dtype=torch.bool)
    keep[1, 0] = False
    assert torch.equal(out[keep], alone[keep])


def test_a_zero_pivot_is_nan_for_that_system_not_an_exception():
    """A singular ``I - h M`` (only coefficients out of floating range make one: bands of ~1e109 from a law that blew
    up) raised ``RuntimeError: tridiagonal solve failed (LAPACK info=14094)`` out of ``predict`` on a power-law
    spectrum at lr 1, B = 4, d = 1024, where a divergence is the answer.  The system's solution is nan (the step
    control rejects the step and stops the member as diverged), the others are solved as alone, on both paths."""
    bands = generator_bands((3, 2), 5, seed=5)
    rhs = torch.rand(3, 2, 5, generator=torch.Generator().manual_seed(6), dtype=F64)
    alone = implicit_solve(1.0, bands, rhs)
    bands[:, 1, 1, :2] = torch.tensor([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0]], dtype=F64)  # row 0 of I - M: [0, 1, 0 ...]
    for solve in (implicit_solve, dense_implicit_solve):
        out = solve(1.0, bands, rhs)
        assert bool(torch.isnan(out[1, 1]).any())
        keep = torch.ones(3, 2, dtype=torch.bool)
        keep[1, 1] = False
        torch.testing.assert_close(out[keep], alone[keep], rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_compiled_bands_are_the_torch_formulas_to_rounding(dtype, monkeypatch):
    """The SG bands from Peclet numbers of every regime (|pe| from 1e-300 to 1e3, both signs, exact zeros, dense on
    both sides of the series' edge at 1/2, past the underflow of B at 709, nan) by the compiled pass and by the torch
    formulas (the path off the CPU): the same to a few units of the last place (the compiled B is its Taylor series
    below 1/2, within 1e-19 of the value: rounding of the two evaluations, ~2 ulp each, then one product and one
    sum of same-signed terms per entry), zeros and nans in the same places, zero column sums and the unused ends zero."""
    g = torch.Generator().manual_seed(7)
    shape, n = (2, 9), 65
    mag = 10.0 ** (torch.rand(*shape, n - 1, generator=g, dtype=F64) * 12.0 - 9.0)
    mag[1] = torch.rand(shape[1], n - 1, generator=g, dtype=F64)  # [0, 1): the series and the division near 1/2
    pe = torch.where(torch.rand(*shape, n - 1, generator=g, dtype=F64) < 0.5, -mag, mag)
    pe[0, 0, :8] = torch.tensor([0.0, -0.0, 1e-300, -800.0, 0.5, -0.5, 0.49999999, 709.0])
    pe = pe.to(dtype)
    dxi = (10.0 ** torch.rand(*shape, generator=g, dtype=F64)).to(dtype)
    xi = torch.sinh(torch.linspace(-3.0, 3.0, 2 * n + 1, dtype=F64))
    faces, centres = xi[::2], xi[1::2]
    gap, width = centres[1:] - centres[:-1], faces[1:] - faces[:-1]
    left, right = (1.0 / (gap * width[:-1])).to(dtype), (1.0 / (gap * width[1:])).to(dtype)
    fast = sg_bands(pe, dxi, left, right)
    monkeypatch.setattr(sg_operator, "_compiled", lambda x: False)
    slow = sg_bands(pe, dxi, left, right)
    eps = torch.finfo(dtype).eps
    assert torch.equal(fast == 0, slow == 0)
    torch.testing.assert_close(fast, slow, rtol=8 * eps, atol=0.0)
    pe[1, 2, 3] = math.nan  # a nan Peclet number: nan weights on that face in both
    with_nan = sg_bands(pe, dxi, left, right)
    assert bool(with_nan[0, 1, 2, 4].isnan()) and bool(with_nan[2, 1, 2, 3].isnan())
    monkeypatch.undo()
    assert torch.equal(sg_bands(pe, dxi, left, right).isnan(), with_nan.isnan())
    assert fast.shape == (3, *shape, n)
    assert bool((fast[0, ..., 0] == 0).all()) and bool((fast[2, ..., -1] == 0).all())
    col = fast[1].clone()  # column k: diagonal k + lower of row k + 1 + upper of row k - 1
    col[..., :-1] += fast[0, ..., 1:]
    col[..., 1:] += fast[2, ..., :-1]
    scale = fast.abs().amax(0)
    assert bool((col.abs() <= 4 * torch.finfo(dtype).eps * scale).all())
