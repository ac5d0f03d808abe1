"""Property-based fuzzing of the public API: random argument combinations either work or raise
ValueError/TypeError (SystemExit(2) for the CLI) -- no other exception, no hang, no NaN result."""

from __future__ import annotations

import contextlib
import io
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sde_optim
from sde_optim import EmpiricalNoise, HomogenizedSGD, SVAG, DiagonalLinearNetwork, StructuredNoise, TeacherProblem
from sde_optim.lightning import CurvatureMonitor, TheoryMonitor
from sde_optim.cli import main as cli_main
from sde_optim.lightning import TeacherDataModule
from sde_optim.lightning import TeacherRegression
from sde_optim.theory import critical_lr, predict

# derandomize: CI must be reproducible, so the examples are a fixed pseudo-random draw.  Explore by removing it
# locally; a failure found that way becomes an explicit regression test (as the R(0) = 0 problem of
# tests/test_theory.py::test_prediction_at_a_global_minimizer_is_constant did).
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
SLOW_FUZZ = settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

# Values a caller might pass by mistake, mixed with valid ones.
NUMBERS = st.one_of(st.integers(-3, 6), st.floats(allow_nan=True, allow_infinity=True, width=32),
                    st.sampled_from([0, 1, 0.5, 1e-3, 2, 1e300]))
JUNK = st.one_of(st.none(), st.booleans(), st.text(max_size=3), st.just([1.0]), st.just(torch.ones(2)))
ANY = st.one_of(NUMBERS, JUNK)
DIMS = st.one_of(st.integers(-1, 6), JUNK)


def _accepts_or_refuses(fn, *args, **kwargs):
    """Call ``fn``; only success or ValueError/TypeError are allowed. Returns the result or None."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError) as exc:
        assert str(exc), "errors must say what was wrong"
        return None


def _problem(dim=4):
    return TeacherProblem.sparse(dim, 0.5, seed=0)


def _finite(result) -> bool:
    tensors = [t for t in (result if isinstance(result, (list, tuple)) else [result]) if isinstance(t, torch.Tensor)]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@FUZZ
@given(dim=DIMS, density=ANY, spectrum=st.sampled_from(["isotropic", "two-level", "power-law", "flat", 3]),
       values=st.sampled_from(["sign", "gaussian", None]), noise_std=ANY, exponent=ANY, ratio=ANY, seed=ANY)
def test_fuzz_teacher_problem(dim, density, spectrum, values, noise_std, exponent, ratio, seed):
    p = _accepts_or_refuses(TeacherProblem.sparse, dim, density, spectrum=spectrum, values=values,
                            noise_std=noise_std, exponent=exponent, ratio=ratio, seed=seed)
    if p is not None:
        assert _finite([p.feature_variance, p.beta_star]) and bool((p.feature_variance > 0).all())
        x, y = p.sample(3)
        assert _finite([x, y])
    _accepts_or_refuses(TeacherProblem, feature_variance=density, beta_star=exponent, noise_std=noise_std)


@FUZZ
@given(dim=DIMS, parametrization=st.sampled_from(["uv", "pm", "xy", None]), init=st.sampled_from(
    ["unbalanced", "balanced", "random", None]), alpha=ANY, depth=ANY,
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.int64, "float32"]))
def test_fuzz_network(dim, parametrization, init, alpha, depth, dtype):
    net = _accepts_or_refuses(DiagonalLinearNetwork, dim, parametrization=parametrization, init=init, alpha=alpha,
                              depth=depth, dtype=dtype)
    if net is not None:
        assert _finite(list(net.parameters())) and _finite(net(torch.ones(2, net.dim, dtype=net.beta.dtype)))


@FUZZ
@given(lr=ANY, batch_size=ANY, noise_scale=ANY, weight_decay=ANY, seed=ANY, nonfinite=st.sampled_from(
    ["skip", "raise", "ignore"]), drift_batch_size=ANY, risk=st.sampled_from(["exact", "loss", 0]),
       noise_kind=st.sampled_from(["structured", "empirical", "junk"]))
def test_fuzz_homogenized_sgd(lr, batch_size, noise_scale, weight_decay, seed, nonfinite, drift_batch_size, risk,
                              noise_kind):
    problem, net = _problem(), DiagonalLinearNetwork(4, dtype=torch.float64)
    noise = {"structured": lambda: StructuredNoise(problem, net, drift_batch_size=drift_batch_size, risk=risk),
             "empirical": lambda: EmpiricalNoise(net), "junk": lambda: object()}[noise_kind]
    noise = _accepts_or_refuses(noise)
    opt = _accepts_or_refuses(HomogenizedSGD, net.parameters(), lr, batch_size=batch_size, noise=noise,
                              noise_scale=noise_scale, weight_decay=weight_decay, seed=seed, nonfinite=nonfinite)
    if opt is None:
        return
    x, y = problem.sample(8)
    if noise_kind == "empirical":
        opt.set_batch(x, y)
    loss = 0.5 * (net(x) - y).pow(2).mean()
    loss.backward()
    _accepts_or_refuses(opt.step, lambda: loss.detach())  # risk="loss" needs the closure's loss
    assert _finite(list(net.parameters()))


@FUZZ
@given(lr=ANY, l=ANY, weight_decay=ANY, nonfinite=st.sampled_from(["skip", "raise", 1]))
def test_fuzz_svag(lr, l, weight_decay, nonfinite):
    net = DiagonalLinearNetwork(4)
    opt = _accepts_or_refuses(SVAG, net.parameters(), lr, l=l, weight_decay=weight_decay, nonfinite=nonfinite)
    if opt is not None:
        x = torch.ones(2, 4)
        opt.combine_losses(net(x).sum(), net(x).sum()).backward()
        opt.step()
        assert _finite(list(net.parameters()))


@FUZZ
@given(batch_size=ANY, seed=ANY, val_size=ANY, val_batch_size=ANY, steps_per_epoch=ANY)
def test_fuzz_data_module(batch_size, seed, val_size, val_batch_size, steps_per_epoch):
    dm = _accepts_or_refuses(TeacherDataModule, _problem(), batch_size, seed=seed, val_size=val_size,
                             val_batch_size=val_batch_size, steps_per_epoch=steps_per_epoch)
    if dm is not None:
        x, y = dm.make_batch(torch.device("cpu"), torch.float32, rank=0, step=3)
        assert x.shape == (dm.batch_size, 4) and _finite([x, y])


@FUZZ
@given(lr=ANY, sgd_batch_size=ANY, optimizer=st.sampled_from(["sgd", "homogenized", "svag", "adam"]), svag_l=ANY,
       noise_scale=ANY, alpha=ANY, noise_seed=ANY, nonfinite=st.sampled_from(["skip", "raise"]),
       dtype=st.sampled_from([torch.float32, torch.int32, None]))
def test_fuzz_regression(lr, sgd_batch_size, optimizer, svag_l, noise_scale, alpha, noise_seed, nonfinite, dtype):
    module = _accepts_or_refuses(TeacherRegression, _problem(), lr=lr, sgd_batch_size=sgd_batch_size,
                                 optimizer=optimizer, svag_l=svag_l, noise_scale=noise_scale, alpha=alpha,
                                 noise_seed=noise_seed, nonfinite=nonfinite, dtype=dtype)
    if module is not None:
        assert module.configure_optimizers() is not None


@FUZZ
@given(every=ANY, observables=st.sampled_from([None, "all", "risk", ["curvature"], ["entropy"], 3]),
       method=st.sampled_from(["pde", "particles", "ode", "gradient_flow", "magic"]), lr=st.one_of(st.none(), ANY),
       batch_size=st.one_of(st.none(), ANY), threshold=ANY, blowup=ANY, probe=st.one_of(st.none(), ANY),
       samples=ANY, iters=ANY, loss_fn=st.sampled_from([None, len, "loss"]))
def test_fuzz_monitors(every, observables, method, lr, batch_size, threshold, blowup, probe, samples, iters, loss_fn):
    _accepts_or_refuses(TheoryMonitor, _problem(), every_n_steps=every, observables=observables, method=method, lr=lr,
                        batch_size=batch_size, threshold=threshold, blowup_factor=blowup)
    _accepts_or_refuses(CurvatureMonitor, every_n_steps=every, probe_batch=probe, hutchinson_samples=samples,
                        power_iters=iters, loss_fn=loss_fn, seed=every)


@FUZZ
@given(observables=st.sampled_from([None, "all", "risk", ["l1", "support_recovery"], ["entropy"], 3, [None]]),
       dim=st.sampled_from([4, 5]))
def test_fuzz_measure(observables, dim):
    values = _accepts_or_refuses(sde_optim.measure, _problem(4), DiagonalLinearNetwork(dim), observables)
    if values is not None:
        assert all(math.isfinite(float(v)) for v in values.values())


@SLOW_FUZZ
@given(lr=ANY, batch_size=ANY, steps=st.one_of(st.integers(-1, 24), JUNK), method=st.sampled_from(
    ["pde", "particles", "ode", "gradient_flow", "x"]), num_points=st.one_of(st.integers(0, 5), JUNK),
       noise_scale=ANY)
def test_fuzz_predict(lr, batch_size, steps, method, num_points, noise_scale):
    observables = ("risk",) if method == "ode" else ("risk", "curvature")
    pred = _accepts_or_refuses(predict, _problem(8), DiagonalLinearNetwork(8, dtype=torch.float64), lr=lr,
                               batch_size=batch_size, steps=steps, method=method, num_points=num_points,
                               noise_scale=noise_scale, observables=observables, num_particles=64, tol=0.05)
    if pred is not None and pred.divergence_step is None:
        assert all(_finite(c) for c in pred.curves.values())


@SLOW_FUZZ
@given(batch_size=ANY, steps=st.one_of(st.integers(-1, 4), st.just(24), JUNK),
       rel_tol=st.one_of(st.sampled_from([0.5, 0.2]), ANY))
def test_fuzz_critical_lr(batch_size, steps, rel_tol):
    res = _accepts_or_refuses(critical_lr, _problem(8), DiagonalLinearNetwork(8, dtype=torch.float64),
                              batch_size=batch_size, steps=steps, rel_tol=rel_tol, tol=0.05)
    if res is not None:
        assert math.isfinite(res.bounded) and res.bounded > 0


CLI_VALUES = st.sampled_from(["0", "1", "2", "-1", "0.5", "nan", "inf", "x", "", "1e9", "8"])
CLI_OPTIONS = ["--dim", "--density", "--noise-std", "--alpha", "--seed", "--batch-size", "--horizon", "--lr",
               "--rows", "--method", "--observables", "--spectrum", "--init"]


@SLOW_FUZZ
@given(command=st.sampled_from(["predict", "critical-lr", "frobnicate"]),
       options=st.lists(st.tuples(st.sampled_from(CLI_OPTIONS), CLI_VALUES), max_size=3))
def test_fuzz_cli(command, options):
    """Small sizes are forced first (--dim 8 --horizon 0.5) so a valid draw stays fast; fuzzed
    options come later and override them (argparse keeps the last value)."""
    argv = [command, "--dim", "8", "--horizon", "0.5"] + [a for pair in options for a in pair]
    if any(opt == "--dim" and val in ("1e9",) for opt, val in options):
        return  # a valid but huge problem: not a validation question
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            assert cli_main(argv) == 0
        except SystemExit as exc:
            assert exc.code in (0, 2), (argv, exc.code)


@pytest.mark.parametrize("horizon", ["0.5", "0.125"])
def test_cli_critical_lr_short_horizon_is_an_answer_or_an_error_not_a_crash(horizon):
    """Short horizons once exhausted critical_lr's evaluation budget (RuntimeError, exit 1 with a
    traceback). Now: an answer (exit 0), or exit 2 saying the horizon is too short."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = cli_main(["critical-lr", "--dim", "8", "--horizon", horizon])
        except SystemExit as exc:
            code = exc.code
            assert "horizon" in err.getvalue()
    assert code in (0, 2)
