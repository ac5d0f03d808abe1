"""HomogenizedSGD, its noise models, and SVAG (THEORY §2)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from sde_optim import (
    SVAG,
    DiagonalLinearNetwork,
    EmpiricalNoise,
    HomogenizedSGD,
    NonFiniteUpdateError,
    StructuredNoise,
    TeacherProblem,
    svag_weights,
)


def _random_dln(d, *, parametrization="uv", seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    init = (torch.randn(d, generator=g, dtype=dtype), torch.randn(d, generator=g, dtype=dtype))
    return DiagonalLinearNetwork(d, parametrization=parametrization, init=init, dtype=dtype)


def _draw(opt, n):
    return [opt.noise.sample(opt.batch_size, opt.generator, None) for _ in range(n)]


# ----------------------------------------------------------------------------- structured noise
@pytest.mark.parametrize("batch_size, drift_batch", [(1, None), (4, None), (2, 8)])
def test_structured_noise_has_target_covariance(batch_size, drift_batch):
    """u-noise_i = v_i * s_i * z_i and v-noise_i = u_i * s_i * z_i with s_i^2 = c^2 2 R h_i (E3).
    Normalized by v_i s_i the u-noise must be N(0, 1): with n = d * K = 64 * 2000 entries the
    mean of squares has standard error sqrt(2 / n) = 0.0039 (accept 4 SE); each coordinate's
    variance over K = 2000 draws has SE sqrt(2 / K) = 0.032 (accept 5 SE: with 64 coordinates
    the family-wise false-alarm rate is ~4e-5). The shared Brownian motion makes
    u-noise_i * u_i == v-noise_i * v_i exactly (correlation sign(u_i v_i))."""
    d, K = 64, 2000
    p = TeacherProblem.sparse(d, 0.25, spectrum="power-law", exponent=1.0, noise_std=0.3, seed=1)
    m = _random_dln(d)
    opt = HomogenizedSGD(m.parameters(), lr=0.1, batch_size=batch_size,
                         noise=StructuredNoise(p, m, drift_batch_size=drift_batch),
                         generator=torch.Generator().manual_seed(0))
    noise_u, noise_v = (torch.stack(x) for x in zip(*_draw(opt, K)))
    c2 = 1 / batch_size - (0 if drift_batch is None else 1 / drift_batch)
    s = torch.sqrt(c2 * 2 * p.population_risk(m.beta.detach()) * p.feature_variance)
    z = noise_u / (m.v.detach() * s)
    assert abs(float((z**2).mean()) - 1) < 4 * math.sqrt(2 / z.numel())
    assert float(((z**2).mean(0) - 1).abs().max()) < 5 * math.sqrt(2 / K)
    torch.testing.assert_close(noise_u * m.u.detach(), noise_v * m.v.detach())
    nu, nv = noise_u - noise_u.mean(0), noise_v - noise_v.mean(0)
    corr = (nu * nv).sum(0) / ((nu**2).sum(0) * (nv**2).sum(0)).sqrt()
    torch.testing.assert_close(corr, torch.sign(m.u * m.v).detach())  # +-1: one Brownian motion


def test_structured_noise_matches_real_sgd_gradient_variance():
    """Against real minibatch gradients: Var(g_beta_i) = 2 R h_i + h_i^2 r_i^2 for Gaussian
    features (THEORY §2); the structured model keeps 2 R h_i and drops the rank-one part, a
    relative difference h_i r_i^2 / (2R) = O(1/d). Compare the summed variance of the u-gradient,
    sum_i v_i^2 Var(g_beta_i), estimated from K = 20000 real SGD gradients: its relative
    standard error is about sqrt(2/K) / sqrt(d_eff) < 1 %; the dropped part is below 1 % here
    (d = 256), so the two must agree within 3 %."""
    d, K = 256, 20000
    p = TeacherProblem.sparse(d, 0.1, seed=2)
    m = _random_dln(d, seed=3)
    x, y = p.sample(K, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        e = x @ m.beta - y
        g_u = e[:, None] * x * m.v  # per-sample gradient in u (batch 1)
    measured = g_u.var(0).sum()
    opt = HomogenizedSGD(m.parameters(), lr=0.1, batch_size=1, noise=StructuredNoise(p, m),
                         generator=torch.Generator().manual_seed(5))
    predicted = (m.v.detach() ** 2 * 2 * p.population_risk(m.beta.detach()) * p.feature_variance).sum()
    assert abs(float(measured / predicted) - 1) < 0.03
    noise_u = torch.stack([n[0] for n in _draw(opt, 4000)])
    assert abs(float(noise_u.var(0).sum() / predicted) - 1) < 0.03


def test_structured_noise_pm_parametrization_uses_chain_rule():
    d = 16
    p = TeacherProblem.sparse(d, 0.25, seed=0)
    m = _random_dln(d, parametrization="pm")
    noise = StructuredNoise(p, m)
    n_plus, n_minus = noise.sample(1, torch.Generator().manual_seed(0), None)
    # d beta / d w+ = 2 w+, d beta / d w- = -2 w-: the implied beta-noise z is shared
    torch.testing.assert_close(n_plus / (2 * m.w_plus.detach()), -n_minus / (2 * m.w_minus.detach()))


# ----------------------------------------------------------------------------- empirical noise
def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double()


def test_empirical_noise_has_per_sample_covariance_of_an_mlp():
    """Reference: per-sample gradients by torch.func (vmap of grad), their sample covariance S
    (P x P, P = 31). EmpiricalNoise with M = 16, B = 4 must draw N(0, c^2 S), c^2 = 1/4 - 1/16.
    With K = 5000 draws an entry of the sample covariance has standard error
    sqrt((C_ii C_jj + C_ij^2) / K) for C = c^2 S; accept 5 SE over all P^2 = 961 entries."""
    from torch.func import functional_call, grad, vmap

    model = _mlp()
    M, B, K = 16, 4, 5000
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(M, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(M, 1, generator=gen, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(prm, xi, yi):
        out = functional_call(model, prm, (xi[None],))
        return 0.5 * ((out - yi[None]) ** 2).sum()

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    G = torch.cat([per_sample[k].reshape(M, -1) for k in params], 1)
    S = torch.cov(G.T)
    c2 = 1 / B - 1 / M
    C = c2 * S

    opt = HomogenizedSGD(model.parameters(), lr=0.1, batch_size=B, noise=EmpiricalNoise(model),
                         generator=torch.Generator().manual_seed(1))
    draws = []
    for _ in range(K):
        opt.set_batch(x, y)
        draws.append(torch.cat([n.reshape(-1) for n in opt.noise.sample(B, opt.generator, None)]))
    N = torch.stack(draws)
    emp = N.T @ N / K  # the noise has mean zero exactly
    se = torch.sqrt((torch.outer(C.diagonal(), C.diagonal()) + C**2) / K)
    assert float(((emp - C).abs() / se).max()) < 5
    assert all(p.grad is None for p in model.parameters())  # the noise pass leaves no .grad


def test_empirical_noise_refuses_batchnorm_in_training_and_small_batches():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    opt = HomogenizedSGD(model.parameters(), lr=0.1, batch_size=2, noise=EmpiricalNoise(model))
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.set_batch(x, y)
    with pytest.raises(ValueError, match="BatchNorm"):
        opt.step()
    model.eval()
    opt.set_batch(x, y)
    opt.step()  # eval-mode BatchNorm is a per-sample function: fine
    opt2 = HomogenizedSGD(model.parameters(), lr=0.1, batch_size=16, noise=EmpiricalNoise(model))
    opt2.set_batch(x, y)
    with pytest.raises(ValueError, match="M >= 16"):
        opt2.step()
    with pytest.raises(ValueError, match="set_batch"):
        opt2.step()  # the batch is consumed by a step, even a failed one: no stale noise


# ----------------------------------------------------------------------------- exact equalities
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_noise_scale_zero_is_exactly_gradient_descent(foreach, weight_decay):
    p = TeacherProblem.sparse(32, 0.25, seed=0)
    m1 = _random_dln(32)
    m2 = copy.deepcopy(m1)
    opt1 = HomogenizedSGD(m1.parameters(), lr=0.3, batch_size=1, noise=StructuredNoise(p, m1),
                          noise_scale=0.0, weight_decay=weight_decay, foreach=foreach)
    opt2 = torch.optim.SGD(m2.parameters(), lr=0.3, weight_decay=weight_decay, foreach=foreach)
    state = opt1.generator.get_state()
    for _ in range(20):
        for m, opt in ((m1, opt1), (m2, opt2)):
            opt.zero_grad()
            p.population_risk(m.beta).backward()
            opt.step()
    assert torch.equal(m1.u, m2.u) and torch.equal(m1.v, m2.v)
    assert torch.equal(opt1.generator.get_state(), state)  # no random numbers drawn


@pytest.mark.parametrize("foreach", [False, True])
def test_svag_l1_is_exactly_sgd_on_the_same_batch(foreach):
    p = TeacherProblem.sparse(32, 0.25, noise_std=0.1, seed=0)
    m1 = _random_dln(32, dtype=torch.float32)
    m2 = copy.deepcopy(m1)
    opt1 = SVAG(m1.parameters(), lr=0.2, l=1, foreach=foreach)
    opt2 = torch.optim.SGD(m2.parameters(), lr=0.2, foreach=foreach)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        x1, y1 = p.to(dtype=torch.float32).sample(4, generator=gen)
        x2, y2 = p.to(dtype=torch.float32).sample(4, generator=gen)
        opt1.zero_grad()
        opt1.combine_losses(0.5 * ((m1(x1) - y1) ** 2).mean(), 0.5 * ((m1(x2) - y2) ** 2).mean()).backward()
        opt1.step()
        opt2.zero_grad()
        (0.5 * ((m2(x1) - y1) ** 2).mean()).backward()
        opt2.step()
    assert torch.equal(m1.u, m2.u) and torch.equal(m1.v, m2.v)


@pytest.mark.parametrize("l", [1, 2, 4, 16, 7.5])
def test_svag_weights_keep_mean_and_scale_variance(l):
    w1, w2 = svag_weights(l)
    assert w1 + w2 == pytest.approx(1, abs=1e-14)
    assert w1**2 + w2**2 == pytest.approx(l, rel=1e-14)


def test_svag_gradient_has_l_times_the_sgd_covariance():
    """Combined gradient of two independent batch-1 samples, K = 20000 times, at a fixed state:
    its mean equals the population gradient and its variance is l times SGD's, which for batch 1
    is Var(g_beta) v^2; we compare summed variances (relative SE ~ sqrt(2/K)/sqrt(d_eff) < 1 %;
    accept 4 %)."""
    d, K, l = 64, 20000, 4.0
    p = TeacherProblem.sparse(d, 0.25, seed=0)
    m = _random_dln(d)
    w1, w2 = svag_weights(l)
    x, y = p.sample(2 * K, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        g = (x @ m.beta - y)[:, None] * x * m.v
    combined = w1 * g[:K] + w2 * g[K:]
    assert abs(float(combined.var(0).sum() / g.var(0).sum()) / l - 1) < 0.04


# ----------------------------------------------------------------------------- state and robustness
@pytest.mark.parametrize("kind", ["homogenized", "svag"])
def test_save_load_mid_run_continues_bit_identically(kind, tmp_path):
    p = TeacherProblem.sparse(64, 0.25, noise_std=0.2, seed=0)

    def make():
        torch.manual_seed(123)
        m = DiagonalLinearNetwork(64, alpha=0.1, dtype=torch.float32)
        if kind == "homogenized":
            return m, HomogenizedSGD(m.parameters(), lr=0.5, batch_size=2, noise=StructuredNoise(p, m))
        return m, SVAG(m.parameters(), lr=0.5, l=4)

    pf = p.to(dtype=torch.float32)

    def run(m, opt, steps, data_gen):
        for _ in range(steps):
            opt.zero_grad()
            if kind == "homogenized":
                pf.population_risk(m.beta).backward()
            else:
                (x1, y1), (x2, y2) = pf.sample(2, generator=data_gen), pf.sample(2, generator=data_gen)
                opt.combine_losses(0.5 * ((m(x1) - y1) ** 2).mean(), 0.5 * ((m(x2) - y2) ** 2).mean()).backward()
            opt.step()

    m_ref, opt_ref = make()
    run(m_ref, opt_ref, 40, torch.Generator().manual_seed(9))

    m, opt = make()
    data_gen = torch.Generator().manual_seed(9)
    run(m, opt, 20, data_gen)
    torch.save({"model": m.state_dict(), "opt": opt.state_dict(), "data": data_gen.get_state()}, tmp_path / "ck.pt")
    del m, opt
    ck = torch.load(tmp_path / "ck.pt")
    m2, opt2 = make()
    m2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    run(m2, opt2, 20, torch.Generator().manual_seed(0).set_state(ck["data"]))
    assert torch.equal(m2.u, m_ref.u) and torch.equal(m2.v, m_ref.v)
    if kind == "homogenized":
        assert torch.equal(opt2.generator.get_state(), opt_ref.generator.get_state())


def _nan_grad_setup(nonfinite):
    p = TeacherProblem.sparse(8, 0.25, seed=0)
    m = _random_dln(8)
    opt = HomogenizedSGD(m.parameters(), lr=0.1, batch_size=1, noise=StructuredNoise(p, m), nonfinite=nonfinite,
                         generator=torch.Generator().manual_seed(0))
    opt.zero_grad()
    p.population_risk(m.beta).backward()
    opt.step()  # one good step first
    opt.zero_grad()
    p.population_risk(m.beta).backward()
    m.u.grad[3] = float("nan")
    return m, opt


def test_nonfinite_gradient_is_skipped_and_counted():
    m, opt = _nan_grad_setup("skip")
    before = [t.detach().clone() for t in m.parameters()]
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert int(opt.skipped_steps) == 1
    m.u.grad.zero_()
    m.v.grad.zero_()
    opt.step()  # a finite step afterwards moves the parameters again (noise)
    assert not torch.equal(before[0], m.u.detach())
    assert int(opt.skipped_steps) == 1


def test_nonfinite_gradient_raises_with_step_number_and_changes_nothing():
    m, opt = _nan_grad_setup("raise")
    before = [t.detach().clone() for t in m.parameters()]
    rng = opt.generator.get_state()
    sd = copy.deepcopy(opt.state_dict())
    with pytest.raises(NonFiniteUpdateError, match="step 2"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert torch.equal(opt.generator.get_state(), rng)
    assert opt.state_dict()["sde_optim"]["steps"] == sd["sde_optim"]["steps"] == 1


def test_parameters_without_gradient_are_skipped():
    p = TeacherProblem.sparse(8, 0.25, seed=0)
    m = _random_dln(8)
    extra = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = HomogenizedSGD([{"params": m.parameters()}, {"params": [extra], "lr": 1.0}], lr=0.1, batch_size=1,
                         noise=StructuredNoise(p, m))
    opt.zero_grad()
    p.population_risk(m.beta).backward()
    opt.step()
    assert torch.equal(extra, torch.ones(3, dtype=torch.float64))


def test_per_group_noise_scale():
    p = TeacherProblem.sparse(8, 0.25, seed=0)
    m = _random_dln(8)
    u0 = m.u.detach().clone()
    opt = HomogenizedSGD([{"params": [m.u], "noise_scale": 0.0}, {"params": [m.v]}], lr=0.1, batch_size=1,
                         noise=StructuredNoise(p, m))
    opt.zero_grad()
    p.population_risk(m.beta).backward()
    g = m.u.grad.clone()
    opt.step()
    assert torch.equal(m.u.detach(), u0 - 0.1 * g)


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(lr=-0.1), ValueError, "lr"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(noise_scale=-1.0), ValueError, "noise_scale"),
        (dict(weight_decay=-1.0), ValueError, "weight_decay"),
        (dict(noise="structured"), ValueError, "noise must be a noise model"),
        (dict(noise=None), ValueError, "noise must be a noise model"),
        (dict(nonfinite="ignore"), ValueError, "nonfinite"),
        (dict(generator=3), TypeError, "generator"),
    ],
)
def test_homogenized_rejects_bad_arguments(kwargs, exc, words):
    p = TeacherProblem.sparse(8, 0.25, seed=0)
    m = _random_dln(8)
    args = dict(lr=0.1, batch_size=1, noise=StructuredNoise(p, m))
    args.update(kwargs)
    with pytest.raises(exc, match=words):
        HomogenizedSGD(m.parameters(), **args)


def test_noise_model_validation():
    p = TeacherProblem.sparse(8, 0.25, seed=0)
    with pytest.raises(TypeError, match="DiagonalLinearNetwork"):
        StructuredNoise(p, nn.Linear(8, 1))
    with pytest.raises(ValueError, match="model.dim"):
        StructuredNoise(p, DiagonalLinearNetwork(9))
    m = _random_dln(8)
    with pytest.raises(ValueError, match="params"):
        HomogenizedSGD([m.u], lr=0.1, batch_size=1, noise=StructuredNoise(p, m))
    opt = HomogenizedSGD(m.parameters(), lr=0.1, batch_size=4, noise=StructuredNoise(p, m, drift_batch_size=2))
    opt.zero_grad()
    p.population_risk(m.beta).backward()
    with pytest.raises(ValueError, match="M >= 4"):
        opt.step()
    opt_loss = HomogenizedSGD(m.parameters(), lr=0.1, batch_size=1, noise=StructuredNoise(p, m, risk="loss"))
    with pytest.raises(ValueError, match="closure"):
        opt_loss.step()
    with pytest.raises(ValueError, match="risk"):
        StructuredNoise(p, m, risk="estimate")


@pytest.mark.parametrize("l", [0.5, 0, float("nan"), -3])
def test_svag_rejects_bad_l(l):
    with pytest.raises(ValueError, match="l must be"):
        SVAG([nn.Parameter(torch.ones(2))], lr=0.1, l=l)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_homogenized_step_and_state():
    p = TeacherProblem.sparse(128, 0.1, seed=0, dtype=torch.float32, device="cuda")
    m = DiagonalLinearNetwork(128, device="cuda")
    opt = HomogenizedSGD(m.parameters(), lr=0.5, batch_size=1, noise=StructuredNoise(p, m))
    for _ in range(3):
        opt.zero_grad()
        p.population_risk(m.beta).backward()
        opt.step()
    assert opt.generator.device.type == "cuda"
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    assert m.u.is_cuda and torch.isfinite(m.u).all()
