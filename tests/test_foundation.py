"""DiagonalLinearNetwork, TeacherProblem and TeacherDataModule (THEORY §1-§3)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sde_optim import DiagonalLinearNetwork, TeacherProblem, measure
from sde_optim.lightning import TeacherDataModule, stream_seed

DTYPES = [torch.float32, torch.float64]


def _devices():
    devs = ["cpu"]
    if torch.cuda.is_available():
        devs.append("cuda")
    return devs


# ----------------------------------------------------------------------------- network
@pytest.mark.parametrize("dtype", DTYPES)
def test_initializations_follow_their_definitions(dtype):
    a = 0.3
    m = DiagonalLinearNetwork(5, init="unbalanced", alpha=a, dtype=dtype)
    assert torch.allclose(m.u, torch.full((5,), math.sqrt(2) * a, dtype=dtype))
    assert torch.equal(m.v, torch.zeros(5, dtype=dtype))
    assert torch.allclose(m.imbalance(), torch.full((5,), 2 * a * a, dtype=dtype))
    m = DiagonalLinearNetwork(5, init="balanced", alpha=a, dtype=dtype)
    assert torch.allclose(m.beta, torch.full((5,), a * a, dtype=dtype))
    assert torch.equal(m.imbalance(), torch.zeros(5, dtype=dtype))
    pm = DiagonalLinearNetwork(5, parametrization="pm", init="balanced", alpha=a, depth=3, dtype=dtype)
    assert torch.allclose(pm.beta, torch.full((5,), a**3, dtype=dtype))
    pm = DiagonalLinearNetwork(5, parametrization="pm", init="unbalanced", alpha=a, dtype=dtype)
    assert torch.equal(pm.beta, torch.zeros(5, dtype=dtype))
    u, v = pm.uv_state()  # w+ = w- = a  <=>  u = 2a, v = 0
    assert torch.allclose(u, torch.full((5,), 2 * a, dtype=dtype)) and torch.equal(v, torch.zeros(5, dtype=dtype))


def test_per_coordinate_alpha_and_explicit_init():
    alpha = torch.tensor([0.0, 0.1, 1.0], dtype=torch.float64)
    m = DiagonalLinearNetwork(3, init="balanced", alpha=alpha, dtype=torch.float64)
    assert torch.allclose(m.beta, alpha**2)
    u0, v0 = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([0.5, 0.5, -1.0])
    m = DiagonalLinearNetwork(3, init=(u0, v0))
    assert torch.equal(m.beta, u0 * v0)
    assert m.u.data_ptr() != u0.data_ptr()  # the module owns a copy


@pytest.mark.parametrize("parametrization", ["uv", "pm"])
@given(u=st.lists(st.floats(-3, 3), min_size=4, max_size=4), v=st.lists(st.floats(-3, 3), min_size=4, max_size=4))
@settings(max_examples=25, deadline=None, derandomize=True)  # the same examples in every run
def test_from_state_round_trips(parametrization, u, v):
    u, v = torch.tensor(u, dtype=torch.float64), torch.tensor(v, dtype=torch.float64)
    m = DiagonalLinearNetwork.from_state(u, v, parametrization=parametrization)
    u2, v2 = m.uv_state()
    assert torch.allclose(u2, u, atol=1e-12) and torch.allclose(v2, v, atol=1e-12)
    assert torch.allclose(m.beta, u * v, atol=1e-12)
    assert torch.allclose(m.imbalance(), u * u - v * v, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("parametrization", ["uv", "pm"])
def test_gradients_match_theory_section2_and_autograd(dtype, parametrization):
    """Per-sample gradient of l = (f(x) - y)^2 / 2 (THEORY §2): dl/du = e x v, dl/dv = e x u,
    with e = <x, beta> - y; for "pm" dl/dw+- = +-depth e x w+-^(depth-1)."""
    torch.manual_seed(0)
    d, B = 7, 5
    depth = 2 if parametrization == "uv" else 3
    m = DiagonalLinearNetwork(d, parametrization=parametrization, depth=depth,
                              init=(torch.randn(d, dtype=dtype), torch.randn(d, dtype=dtype)), dtype=dtype)
    x, y = torch.randn(B, d, dtype=dtype), torch.randn(B, dtype=dtype)
    loss = 0.5 * ((m(x) - y) ** 2).mean()
    loss.backward()
    e = (x @ m.beta - y).detach()
    g_beta = (e[:, None] * x).mean(0)  # gradient with respect to beta
    a, b = (p.detach() for p in m.parameters())
    if parametrization == "uv":
        expected = (g_beta * b, g_beta * a)
    else:
        expected = (depth * g_beta * a ** (depth - 1), -depth * g_beta * b ** (depth - 1))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for p, g in zip(m.parameters(), expected):
        torch.testing.assert_close(p.grad, g, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_population_gradient_matches_section2_drift(dtype):
    """Mean gradient of E1 in u_i is (lambda_i/d) r_i v_i, in v_i (lambda_i/d) r_i u_i (THEORY §2)."""
    p = TeacherProblem.sparse(50, 0.2, spectrum="power-law", exponent=0.7, seed=3, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    m = DiagonalLinearNetwork(50, init=(torch.randn(50, generator=g, dtype=dtype), torch.randn(50, generator=g, dtype=dtype)), dtype=dtype)
    p.population_risk(m.beta).backward()
    r = (m.beta - p.beta_star).detach()
    lam_d = p.spectrum / p.dim
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else {}
    torch.testing.assert_close(m.u.grad, lam_d * r * m.v.detach(), **tol)
    torch.testing.assert_close(m.v.grad, lam_d * r * m.u.detach(), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("parametrization", ["uv", "pm"])
def test_sgd_step_contracts_imbalance_exactly(dtype, parametrization):
    """THEORY E4, discrete form: one SGD step maps q_i -> (1 - lr_uv^2 g_i^2) q_i, g_i the
    stochastic gradient with respect to beta_i and lr_uv = lr * lr_scale."""
    torch.manual_seed(0)
    d, lr = 64, 0.3
    p = TeacherProblem.sparse(d, 0.25, noise_std=0.2, seed=0, dtype=dtype)
    m = DiagonalLinearNetwork(d, parametrization=parametrization,
                              init=(torch.randn(d, dtype=dtype), torch.randn(d, dtype=dtype)), dtype=dtype)
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        x, y = p.sample(4, generator=gen)
        q_before = m.imbalance().detach().clone()
        e = (m(x) - y).detach()
        g_beta = (e[:, None] * x).mean(0)
        opt.zero_grad()
        (0.5 * ((m(x) - y) ** 2).mean()).backward()
        opt.step()
        lr_uv = lr * m.lr_scale
        expected = (1 - lr_uv**2 * g_beta**2) * q_before
        eps = torch.finfo(dtype).eps
        # rounding: q is a difference of squares of O(1) numbers, so absolute error ~ a few eps * rho
        torch.testing.assert_close(m.imbalance().detach(), expected, rtol=0, atol=float(50 * eps * (1 + q_before.abs().max())))


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_shapes_and_any_dtype(dtype):
    m = DiagonalLinearNetwork(6, dtype=dtype)
    assert m.u.dtype == dtype
    assert m(torch.randn(3, 4, 6, dtype=dtype)).shape == (3, 4)
    assert m(torch.randn(6, dtype=dtype)).shape == ()


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(dim=0), ValueError, "dim"),
        (dict(dim=3.5), TypeError, "dim"),
        (dict(dim=4, alpha=-0.1), ValueError, "alpha"),
        (dict(dim=4, alpha=float("nan")), ValueError, "alpha"),
        (dict(dim=4, alpha=torch.tensor([0.1, -1.0, 0.1, 0.1])), ValueError, "alpha"),
        (dict(dim=4, alpha=torch.ones(3)), ValueError, "alpha"),
        (dict(dim=4, parametrization="xy"), ValueError, "parametrization"),
        (dict(dim=4, init="random"), ValueError, "init"),
        (dict(dim=4, init=(torch.ones(3), torch.ones(3))), ValueError, "init[0]"),
        (dict(dim=4, parametrization="pm", depth=1), ValueError, "depth"),
        (dict(dim=4, depth=3), ValueError, "depth"),
        (dict(dim=4, dtype=torch.int64), TypeError, "dtype"),
    ],
)
def test_network_rejects_bad_arguments(kwargs, exc, words):
    with pytest.raises(exc, match=words.replace("[", r"\[").replace("]", r"\]")):
        DiagonalLinearNetwork(**kwargs)


def test_forward_rejects_wrong_shape():
    m = DiagonalLinearNetwork(4)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 4\)"):
        m(torch.randn(2, 5))


def test_depth_three_has_no_uv_state():
    m = DiagonalLinearNetwork(4, parametrization="pm", depth=3)
    with pytest.raises(ValueError, match="depth 2"):
        m.imbalance()


# ----------------------------------------------------------------------------- teacher
@pytest.mark.parametrize("dtype", DTYPES)
def test_population_risk_matches_monte_carlo(dtype):
    """R(beta) (E1) against the sample mean of (<x, beta> - y)^2 / 2 over n = 200000 samples.
    The per-sample loss is (1/2) s^2 z^2 (s^2 = its exact 2R, z ~ N(0,1)), whose std is
    sqrt(2) R, so the standard error of the mean is sqrt(2) R / sqrt(n) ~ 0.3 % of R; we
    accept 4 standard errors."""
    p = TeacherProblem.sparse(40, 0.3, spectrum="two-level", noise_std=0.3, seed=2, dtype=dtype)
    beta = torch.randn(40, generator=torch.Generator().manual_seed(4), dtype=dtype)
    n = 200_000
    x, y = p.sample(n, generator=torch.Generator().manual_seed(9))
    losses = 0.5 * (x @ beta - y).double() ** 2
    mc, se = losses.mean(), losses.std() / math.sqrt(n)
    exact = p.population_risk(beta).double()
    assert abs(float(mc - exact)) < 4 * float(se)
    assert torch.allclose(p.excess_risk(beta), p.population_risk(beta) - 0.5 * 0.3**2)


def test_population_risk_is_batched_and_differentiable():
    p = TeacherProblem.sparse(10, 0.5, seed=0)
    betas = torch.randn(3, 2, 10, dtype=torch.float64, requires_grad=True)
    r = p.population_risk(betas)
    assert r.shape == (3, 2)
    r.sum().backward()
    torch.testing.assert_close(betas.grad, (betas - p.beta_star).detach() * p.feature_variance)
    torch.testing.assert_close(r[1, 0], p.population_risk(betas[1, 0]))


def test_sampled_feature_covariance_matches_feature_variance():
    """Sample covariance of n = 100000 draws: entry (i, j) has standard error
    sqrt(h_i h_j / n) (off-diagonal) and sqrt(2/n) h_i (diagonal); accept 5 standard errors
    over all d^2 = 64 entries (family-wise false alarm far below 1e-3)."""
    p = TeacherProblem.sparse(8, 0.25, spectrum="power-law", exponent=1.0, seed=1)
    n = 100_000
    x, y = p.sample(n, generator=torch.Generator().manual_seed(0))
    cov = x.T @ x / n
    h = p.feature_variance
    se = torch.sqrt(h[:, None] * h[None, :] / n)
    se.diagonal().copy_(math.sqrt(2 / n) * h)
    assert bool(((cov - torch.diag(h)).abs() < 5 * se).all())
    # labels: y - <x, beta*> is the label noise, here exactly 0
    assert torch.allclose(y, x @ p.beta_star)


def test_same_seed_same_stream():
    p = TeacherProblem.sparse(16, 0.25, noise_std=0.1, seed=0)
    a = p.sample(5, generator=torch.Generator().manual_seed(3))
    b = p.sample(5, generator=torch.Generator().manual_seed(3))
    c = p.sample(5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert torch.equal(TeacherProblem.sparse(16, 0.25, seed=7).beta_star, TeacherProblem.sparse(16, 0.25, seed=7).beta_star)


@pytest.mark.parametrize("spectrum", ["isotropic", "two-level", "power-law"])
@pytest.mark.parametrize("values", ["sign", "gaussian"])
def test_sparse_constructor_settings(spectrum, values):
    p = TeacherProblem.sparse(100, 0.1, spectrum=spectrum, values=values, seed=0)
    lam = p.spectrum
    assert torch.allclose(lam.mean(), torch.tensor(1.0, dtype=lam.dtype))
    assert int((p.beta_star != 0).sum()) == 10
    if values == "sign":
        assert set(p.beta_star[p.beta_star != 0].tolist()) <= {-1.0, 1.0}
    if spectrum == "two-level":
        assert torch.allclose(lam[0] / lam[-1], torch.tensor(10.0, dtype=lam.dtype))
    if spectrum == "power-law":
        assert bool((lam[1:] < lam[:-1]).all())


def test_theory_section6_initial_values():
    """THEORY §6: R(0) = 0.05 and C(0) = 0.02 for exactly 10 % +-1 support, alpha = 0.1."""
    p = TeacherProblem.sparse(1000, 0.1, seed=0)
    m = DiagonalLinearNetwork(1000, alpha=0.1, dtype=torch.float64)
    obs = measure(p, m, ["risk", "curvature"])
    assert torch.allclose(obs["risk"], torch.tensor(0.05, dtype=torch.float64))
    assert torch.allclose(obs["curvature"], torch.tensor(0.02, dtype=torch.float64))


def test_state_dict_round_trip_and_to():
    p = TeacherProblem.sparse(12, 0.5, noise_std=0.4, seed=1)
    q = TeacherProblem.from_state_dict(p.state_dict())
    assert torch.equal(q.beta_star, p.beta_star) and q.noise_std == p.noise_std
    r = p.to(dtype=torch.float32)
    assert r.dtype == torch.float32 and r.dim == 12


@pytest.mark.parametrize(
    "args, kwargs, exc, words",
    [
        ((torch.tensor([1.0, -1.0]), torch.zeros(2)), {}, ValueError, "feature_variance"),
        ((torch.tensor([1.0, float("inf")]), torch.zeros(2)), {}, ValueError, "feature_variance"),
        ((torch.ones(2), torch.tensor([0.0, float("nan")])), {}, ValueError, "beta_star"),
        ((torch.ones(2), torch.zeros(3)), {}, ValueError, "beta_star"),
        ((torch.ones(2, 2), torch.zeros(2, 2)), {}, ValueError, "feature_variance"),
        ((torch.ones(2), torch.zeros(2)), {"noise_std": -0.1}, ValueError, "noise_std"),
        ((torch.ones(2), torch.zeros(2)), {"noise_std": float("nan")}, ValueError, "noise_std"),
    ],
)
def test_teacher_rejects_bad_arguments(args, kwargs, exc, words):
    with pytest.raises(exc, match=words):
        TeacherProblem(*args, **kwargs)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(dim=0, density=0.1), "dim"),
        (dict(dim=10, density=1.5), "density"),
        (dict(dim=10, density=0.1, spectrum="flat"), "spectrum"),
        (dict(dim=10, density=0.1, values="uniform"), "values"),
        (dict(dim=10, density=0.1, exponent=-1.0), "exponent"),
        (dict(dim=10, density=0.1, ratio=0.0), "ratio"),
    ],
)
def test_sparse_rejects_bad_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words):
        TeacherProblem.sparse(**kwargs)


def test_risk_and_sample_reject_bad_shapes():
    p = TeacherProblem.sparse(4, 0.5)
    with pytest.raises(ValueError, match=r"beta must have shape \(\.\.\., 4\)"):
        p.population_risk(torch.zeros(5))
    with pytest.raises(ValueError, match="batch_size"):
        p.sample(0)


# ----------------------------------------------------------------------------- devices
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_network_and_teacher():
    p = TeacherProblem.sparse(256, 0.1, seed=0, dtype=torch.float32, device="cuda")
    m = DiagonalLinearNetwork(256, device="cuda")
    x, y = p.sample(8, generator=torch.Generator(device="cuda").manual_seed(0))
    assert x.is_cuda and y.is_cuda and m(x).is_cuda
    loss = p.population_risk(m.beta)
    loss.backward()
    assert m.u.grad.is_cuda
    assert measure(p, m)["risk"].is_cuda


# ----------------------------------------------------------------------------- data module
def test_stream_seed_is_a_function_of_all_keys():
    seeds = {stream_seed(0, r, k, m) for r in range(2) for k in range(50) for m in range(2)}
    assert len(seeds) == 200
    assert stream_seed(1, 2, 3) == stream_seed(1, 2, 3)


def test_data_module_streams_fresh_reproducible_batches(tmp_path):
    import pytorch_lightning as pl

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = DiagonalLinearNetwork(16, dtype=torch.float64)
            self.seen = []

        def training_step(self, batch, idx):
            x, y = batch
            self.seen.append(x.clone())
            return 0.5 * ((self.net(x) - y) ** 2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def run(seed):
        p = TeacherProblem.sparse(16, 0.25, seed=0)
        dm = TeacherDataModule(p, batch_size=4, seed=seed, val_size=8, steps_per_epoch=3)
        model = Recorder()
        pl.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                   limit_val_batches=0).fit(model, dm)
        return model.seen

    a, b, c = run(0), run(0), run(1)
    assert len(a) == 5 and all(x.shape == (4, 16) for x in a)
    assert all(torch.equal(s, t) for s, t in zip(a, b))  # same seed -> identical stream
    assert not torch.equal(a[0], c[0])  # another seed -> another stream
    assert len({tuple(x[0, :3].tolist()) for x in a}) == 5  # fresh samples every step, across epochs


def test_data_module_validation_set_is_fixed():
    p = TeacherProblem.sparse(8, 0.25, seed=0)
    dm = TeacherDataModule(p, batch_size=2, val_size=10, val_batch_size=4)
    xs = [b[0] for b in dm.val_dataloader()]
    assert [len(x) for x in xs] == [4, 4, 2]
    assert torch.equal(torch.cat(xs), torch.cat([b[0] for b in dm.val_dataloader()]))


@pytest.mark.parametrize("kwargs, words", [(dict(batch_size=0), "batch_size"), (dict(batch_size=2, val_size=0), "val_size")])
def test_data_module_rejects_bad_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words):
        TeacherDataModule(TeacherProblem.sparse(4, 0.5), **kwargs)


def test_old_lightning_import_paths_still_work_with_a_deprecation_warning():
    import importlib
    import sys

    import sde_optim.lightning as new

    for old, names in (("sde_optim.callbacks", ("TheoryMonitor", "CurvatureMonitor")),
                       ("sde_optim.regression", ("TeacherRegression",)), ("sde_optim.data", ("TeacherDataModule",))):
        sys.modules.pop(old, None)
        with pytest.warns(DeprecationWarning, match="sde_optim.lightning"):
            module = importlib.import_module(old)
        for name in names:
            assert getattr(module, name) is getattr(new, name)
