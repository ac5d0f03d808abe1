"""The compiled CPU step of the Fokker-Planck solve (``sde_optim/theory/compiled_step.py``) against the torch step it
mirrors (``_Grid.statistics`` / ``attempt``): every statistic, one step, and whole solves, on every kind of type
(phi, psi, frozen), a batch with schedules and weight decay, the step limit, and float32; and the registry's
densities being the ones it uses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import sde_optim.theory.fokker_planck as fp
from sde_optim.observables import OBSERVABLES, Observable
from sde_optim.theory import compiled_step
from sde_optim.theory.dynamics import CoefficientBatch, MeanFieldDynamics, SGDConfig
from sde_optim.theory.types import KIND_FROZEN, KIND_PHI, KIND_PSI, CoordinateTypes

F64 = torch.float64
D = 2000  # the d of the coefficients (and of the step limit)


def mixed_types(dtype=F64) -> CoordinateTypes:
    """Six types of every kind: phi with v0 = 0 and with an imbalance of either sign, psi of both signs (u0 = +-v0),
    frozen (u0 = v0 = 0); a spread spectrum and a teacher with zero, positive and negative entries."""
    t = lambda *v: torch.tensor(v, dtype=F64)  # noqa: E731
    types = CoordinateTypes(t(0.5, 1.0, 3.0, 2.0, 1.5, 0.8), t(0.0, 1.0, -0.6, 0.4, 0.0, 0.7),
                            t(0.1, 0.2, 0.05, 0.15, 0.0, 0.12), t(0.0, 0.05, 0.2, -0.15, 0.0, 0.12),
                            t(0.2, 0.2, 0.15, 0.15, 0.1, 0.2), True, D)
    assert sorted(set(types.kind.tolist())) == [KIND_PHI, KIND_PSI, KIND_FROZEN]
    return types.to(dtype=dtype)


def dynamics(case: str, dtype=F64) -> MeanFieldDynamics:
    types = mixed_types(dtype)
    if case == "constant":
        return MeanFieldDynamics(types, SGDConfig(lr=0.4, batch_size=2).coefficients(D, 1.0, 4 * D), noise_std=0.1)
    # three members: a step decay, a warmup with weight decay, a batch-size schedule with momentum
    steps = 4 * D
    decay = [0.6 if k < steps // 2 else 0.2 for k in range(steps)]
    warm = [0.5 * min(1.0, (k + 1) / D) for k in range(steps)]
    configs = [SGDConfig(lr=decay), SGDConfig(lr=warm, weight_decay=2e-5),
               SGDConfig(lr=0.3, batch_size=[1 if k < D else 4 for k in range(steps)], momentum=0.5)]
    batch = CoefficientBatch([c.coefficients(D, 1.0, steps) for c in configs], dtype=dtype)
    return MeanFieldDynamics(types, batch, noise_std=0.05, param_scale=1.3)


def state_after(dyn: MeanFieldDynamics, n_cells: int, t_end: float):
    """A grid (with the step limit) and the state ``(mass, m, s, int R)`` of every member after a short torch solve (the
    law spread, off the initial Gaussian)."""
    fp.COMPILED_STEP = False
    try:
        sols = fp.solve_batch_on_grid(dyn, torch.tensor([t_end], dtype=dyn.lam.dtype), n_cells, 1e-3, dim=D)
    finally:
        fp.COMPILED_STEP = True
    state = tuple(torch.stack([getattr(x, f)[-1] for x in sols]) for f in ("mass", "center", "scale", "integral_r"))
    grid = fp._Grid(dyn, n_cells, 20.0, (dyn.coef.stability_factor(), D))
    assert grid.compiled
    return grid, state


def compare(a: torch.Tensor, b: torch.Tensor, rtol: float, what: str, scale: float | None = None) -> None:
    """``|a - b| <= rtol * scale`` (default scale: ``max |b|``)."""
    scale = b.abs().amax().clamp_min(torch.finfo(b.dtype).tiny) if scale is None else scale
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), what
    err = float(((a - b).abs() / scale).amax())
    assert err <= rtol, f"{what}: {err:.3g}"


# float64: the same formulas in another order (sums, fused multiply-adds): agreement to ~1e-13 measured; 1e-11 allows
# the few condition-number-amplified entries (a Peclet number near a sign change).  float32: ~1e-6 measured
# (the compiled kernel evaluates some scalars in float64), 1e-4 for the same reason.
RTOL = {F64: 1e-11, torch.float32: 1e-4}


@pytest.mark.parametrize("case", ["constant", "batch"])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("scheme", fp.SCHEMES)
def test_the_compiled_statistics_and_step_are_the_torch_ones(case, dtype, scheme):
    dyn = dynamics(case, dtype)
    grid, (mass, m, s, integral) = state_after(dyn, 48, 0.6)
    grid.scheme = scheme
    t, h = 0.6, 0.01
    with torch.inference_mode():
        grid.compiled = True
        fast = grid.statistics(mass, m, s, integral, t)
        fast_step = grid.attempt(fast, mass, m, s, integral, t, h, 1e-3)
        fast_stiffness = grid.stiffness.clone()
        grid.compiled = False
        ref = grid.statistics(mass, m, s, integral, t)
        ref_step = grid.attempt(ref, mass, m, s, integral, t, h, 1e-3)
    compare(fast_stiffness, grid.stiffness, RTOL[dtype], "stiffness")
    for label, a, b, rtol in (("", fast, ref, RTOL[dtype]), ("new state's ", fast_step[5], ref_step[5], 10 * RTOL[dtype])):
        for name in ("risk", "a", "diffusion", "var_xi", "e_a", "cov_xi_a", "observed", "observed_total", "per_type",
                     "tail_share", "unstable"):
            compare(getattr(a, name), getattr(b, name), rtol, label + name)
        # the mean of a centred law is a cancellation (~1e-8 of its spread in float32): on the scale of the spread
        compare(a.e_xi, b.e_xi, rtol, label + "e_xi", scale=float(b.var_xi.sqrt().amax()))
    for name, x, y in zip(("mass", "m", "s", "int R"), fast_step[:4], ref_step[:4]):
        compare(x, y, RTOL[dtype], name)
    np.testing.assert_allclose(fast_step[4], ref_step[4], rtol=1e3 * RTOL[dtype])  # differences of near-equal laws


def test_the_step_limit_and_tail_share_count_the_same_cells():
    """The expected count of coordinates past the step limit, with a limit inside the law (most cells past it), and
    the share of the excess risk in the end cells."""
    dyn = dynamics("constant")
    grid, (mass, m, s, integral) = state_after(dyn, 48, 0.6)
    with torch.inference_mode():
        grid.step_limit = (1e-3, D)  # gamma lam rho / d > 1e-3: part of the law
        grid.compiled = True
        fast = grid.statistics(mass, m, s, integral, 0.6)
        grid.compiled = False
        ref = grid.statistics(mass, m, s, integral, 0.6)
    assert 0 < float(ref.unstable) < D
    compare(fast.unstable, ref.unstable, 1e-12, "unstable")
    compare(fast.tail_share, ref.tail_share, 1e-12, "tail share")


@pytest.mark.parametrize("case", ["constant", "batch"])
@pytest.mark.parametrize("scheme", fp.SCHEMES)
def test_whole_solves_agree_on_the_same_steps_and_take_the_same_steps(case, scheme):
    """The torch solve's steps replayed by the compiled one give the same curves; the adaptive compiled solve takes
    the same steps up to rounding (its errors agree to rounding, and no error falls within rounding of step_tol's
    accept/reject edge on these cases)."""
    dyn = dynamics(case)
    t_out = torch.linspace(0, 4, 9, dtype=F64)
    fp.COMPILED_STEP = False
    try:
        ref = fp.solve_batch_on_grid(dyn, t_out, 64, 1e-3, dim=D, scheme=scheme)
    finally:
        fp.COMPILED_STEP = True
    fast = fp.solve_batch_on_grid(dyn, t_out, 64, 1e-3, dim=D, scheme=scheme)
    replay = fp.solve_batch_on_grid(dyn, t_out, 64, 1e-3, dim=D, schedule=ref[0].schedule, scheme=scheme)
    for r, f, p in zip(ref, fast, replay):
        assert r.nfe == f.nfe and len(r.schedule) == len(f.schedule)
        np.testing.assert_allclose(f.schedule, r.schedule, rtol=1e-9)  # step sizes from errors equal to rounding
        compare(p.answer_curves(), r.answer_curves(), 1e-10, "replayed curves")
        compare(f.mass, r.mass, 1e-10, "laws")
        assert r.diverged_at == f.diverged_at


def test_a_failed_solve_rejects_the_step_in_both_paths():
    """A nan in a stage (a solve that failed) is an infinite error: the step is rejected, never accepted.  (The torch
    path took ``maximum(inf, nan) = nan`` before the non-finite check, and ``nan > step_tol`` is false.)"""
    y1 = torch.full((1, 2, 8), 0.125, dtype=F64)
    y2 = y1.clone()
    y2[0, 1, 3] = math.nan
    st1 = fp._Statistics(*(None,) * 7, observed=torch.ones(2, 1, 2, 8, dtype=F64),
                         observed_total=torch.ones(2, 1, dtype=F64), tail_share=None, unstable=None, per_type=None)
    weight = torch.tensor([0.5, 0.5], dtype=F64)
    one = torch.ones(1, dtype=F64)
    assert fp._step_errors(y1, y2, one, one, st1, weight, 1e-3) == [math.inf]
    dyn = dynamics("constant")
    grid, (mass, m, s, integral) = state_after(dyn, 48, 0.6)
    with torch.inference_mode():
        st0 = grid.statistics(mass, m, s, integral, 0.6)
        st0.a[0, 2, grid.xi.numel() + 5] = math.nan  # a drift at a face gone non-finite: that type's solve is nan
        *_, errors, end = grid.attempt(st0, mass, m, s, integral, 0.6, 0.01, 1e-3)
    assert errors == [math.inf] and end is None


def test_the_compiled_densities_are_the_registrys(monkeypatch):
    """The kernel compiles ``OBSERVABLES``' own risk and curvature lambdas: a different registry density changes what
    it computes (a second definition in the kernel would not), and numba's disk cache follows the change (its key
    holds the closure's pickled functions)."""
    dyn = dynamics("constant")
    grid, (mass, m, s, integral) = state_after(dyn, 24, 0.3)
    with torch.inference_mode():
        before = grid.statistics(mass, m, s, integral, 0.3)
        doubled = Observable("curvature", lambda c: 2.0 * c.param_scale * c.lam * c.rho, "twice the curvature")
        monkeypatch.setitem(OBSERVABLES, "curvature", doubled)
        compiled_step.compiled_kernels.cache_clear()
        try:
            after = grid.statistics(mass, m, s, integral, 0.3)
        finally:
            monkeypatch.undo()
            compiled_step.compiled_kernels.cache_clear()
    compare(after.observed[1], 2.0 * before.observed[1], 1e-15, "doubled curvature")
    compare(after.observed[0], before.observed[0], 0.0, "risk untouched")


@pytest.mark.parametrize("compiled", [False, True])
def test_a_float32_solve_with_a_frozen_type_runs_and_agrees_with_float64(compiled, monkeypatch):
    """A frozen type (``u0 = v0 = 0``: ``D = 0``, grid spread ``1e-8``) in float32: the torch path's Peclet scale
    ``1 / (s * dxi)`` underflowed to ``1 / 0`` and every such solve stopped at its first step as diverged."""
    monkeypatch.setattr(fp, "COMPILED_STEP", compiled)
    t = torch.linspace(0, 0.6, 4, dtype=F64)
    (ref,) = fp.solve_batch_on_grid(dynamics("constant"), t, 48, 1e-3, dim=D)
    (low,) = fp.solve_batch_on_grid(dynamics("constant", torch.float32), t.float(), 48, 1e-3, dim=D)
    assert low.diverged_at is None and len(low.schedule) > 10
    # float32 rounding over ~100 steps of a law carried to 1e-3: 1e-4 relative is 100x that rounding and 10x below
    # the step tolerance's effect
    assert float(((low.risk.double() - ref.risk).abs() / ref.risk).max()) < 1e-4


@pytest.mark.parametrize("init,noise_std,lr", [("unbalanced", 0.0, 4.0), ("balanced", 0.2, 1.0)])
def test_predict_is_the_same_on_either_step(init, noise_std, lr, monkeypatch):
    """The whole prediction (type quadrature, grid check, its extrapolation) on the torch step, the path CUDA takes,
    and on the compiled step: the same cells and curves (the errors agree to rounding, so the same steps)."""
    from problems import section6
    from sde_optim import predict

    d = 600
    problem, model = section6(d, noise_std, init=init)
    runs = {}
    for compiled in (False, True):
        monkeypatch.setattr(fp, "COMPILED_STEP", compiled)
        runs[compiled] = predict(problem, model, lr=lr, batch_size=2, steps=4 * d, num_points=41)
    ref, fast = runs[False], runs[True]
    assert ref.info["num_cells"] == fast.info["num_cells"]
    for name in ("risk", "curvature"):
        compare(fast.curves[name], ref.curves[name], 1e-9, name)


def test_the_compiled_exponentials_are_within_an_ulp_or_two_of_numpys():
    """``_exp`` (range reduction and a polynomial, so that the cell loops vectorize) against numpy's ``exp`` over its
    whole range and at the edges (overflow, subnormals, nan)."""
    compiled_step.compiled_kernels()
    exp = compiled_step._exp
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-745.0, 709.78, 4000), rng.uniform(-1.0, 1.0, 2000), [0.0, -0.0, 1e-300, 709.78]])
    got, ref = np.array([exp(v) for v in x]), np.exp(x)
    normal = ref >= np.finfo(np.float64).tiny
    assert np.max(np.abs(got - ref)[normal] / np.spacing(ref[normal])) <= 1.0
    assert np.max(np.abs(got - ref)[~normal]) <= 5e-324  # subnormals: within one unit of the last place there too
    for v, want in ((709.79, np.inf), (1e4, np.inf), (np.inf, np.inf), (-745.3, 0.0), (-np.inf, 0.0)):
        assert exp(v) == want
    assert np.isnan(exp(np.nan))


def test_a_kernel_that_does_not_compile_falls_back_to_the_torch_step_with_a_warning(monkeypatch):
    """numba failing on some platform or version (here: a typing error raised by the kernels' loader) costs speed,
    not the prediction: one warning, the torch step, the same curve; an error of any other kind is not swallowed."""
    from numba.core.errors import TypingError

    dyn = dynamics("constant")
    t = torch.linspace(0, 0.6, 4, dtype=F64)
    (ref,) = fp.solve_batch_on_grid(dyn, t, 32, 1e-3, dim=D)

    def broken():
        raise TypingError("a kernel that does not type on this numba")

    monkeypatch.setattr(fp, "compiled_kernels", broken)
    monkeypatch.setattr(fp, "COMPILED_STEP", True)
    with pytest.warns(RuntimeWarning, match="compiled Fokker-Planck step is not available.*TypingError"):
        (fallback,) = fp.solve_batch_on_grid(dyn, t, 32, 1e-3, dim=D)
    assert fp.COMPILED_STEP is False  # later grids take the torch step without trying again
    compare(fallback.mass, ref.mass, 1e-10, "laws")

    def buggy():
        raise ValueError("a bug, not a platform")

    monkeypatch.setattr(fp, "compiled_kernels", buggy)
    monkeypatch.setattr(fp, "COMPILED_STEP", True)
    with pytest.raises(ValueError, match="a bug"):
        fp.solve_batch_on_grid(dyn, t, 32, 1e-3, dim=D)
