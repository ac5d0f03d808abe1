"""Hessian estimators (sde_optim.curvature) and the CurvatureMonitor callback."""

from __future__ import annotations

import csv
import warnings
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sde_optim import DiagonalLinearNetwork, TeacherProblem, measure
from sde_optim.lightning import CurvatureMonitor
from sde_optim.curvature import functional_loss, half_mse, hessian_trace, hvp, top_eigenvalue, trainable_parameters

F64 = torch.float64
TAGS = ("curvature/hessian_trace", "curvature/hessian_trace_stderr", "curvature/top_eigenvalue")


# ---------------------------------------------------------------------- helpers
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _problem(dim: int = 40) -> TeacherProblem:
    return TeacherProblem.sparse(dim, 0.3, spectrum="power-law", values="gaussian", noise_std=0.1, seed=3)


def _risk(problem: TeacherProblem):
    """loss_fn(model, batch) = R(beta(theta)), the population risk of THEORY E1 (the batch is unused)."""
    return lambda model, _batch: problem.population_risk(model.beta)


def _random_dln(problem: TeacherProblem, seed: int = 0) -> DiagonalLinearNetwork:
    g = _gen(seed)
    u, v = (torch.randn(problem.dim, generator=g, dtype=F64) for _ in range(2))
    return DiagonalLinearNetwork.from_state(u, v)


def _dln_with_diagonal_hessian(problem: TeacherProblem) -> DiagonalLinearNetwork:
    """u v = beta*/2, so the off-diagonal entries h_i (2 beta_i - beta*_i) of E7 vanish."""
    u = torch.rand(problem.dim, generator=_gen(1), dtype=F64) + 0.5
    return DiagonalLinearNetwork.from_state(u, problem.beta_star / (2 * u))


def _dense_hessian(model: nn.Module, loss_fn, batch) -> torch.Tensor:
    """The dense Hessian in the flattened trainable parameters, by torch.autograd.functional.hessian."""
    params = trainable_parameters(model)
    loss = functional_loss(model, loss_fn, batch)

    def flat_loss(flat: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(flat, [p.numel() for p in params.values()])
        return loss({n: x.view_as(p) for (n, p), x in zip(params.items(), pieces)})

    return torch.autograd.functional.hessian(flat_loss, torch.cat([p.detach().reshape(-1) for p in params.values()]))


def _tiny_mlp(seed: int = 2, *, batchnorm: bool = False) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    g = _gen(seed)
    layers = [nn.Linear(3, 4), nn.Tanh()] + ([nn.BatchNorm1d(4), nn.Dropout(0.5)] if batchnorm else []) + [nn.Linear(4, 1)]
    model = nn.Sequential(*layers).to(F64)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
    x, y = torch.randn(16, 3, generator=g, dtype=F64), torch.randn(16, 1, generator=g, dtype=F64)
    return model, (x, y)


# ---------------------------------------------------------------------- E7 trace
def test_curvature_observable_is_the_dense_hessian_trace_of_the_population_risk():
    # The E7 observable (1/d) sum lambda_i rho_i equals tr H exactly (lambda_i / d = h_i); no factor d.
    problem = _problem()
    model = _random_dln(problem)
    dense = _dense_hessian(model, _risk(problem), None)
    torch.testing.assert_close(dense.trace(), measure(problem, model, "curvature")["curvature"], rtol=1e-12, atol=0)
    # and the 2x2 block structure of E7: H[u_i, v_i] = h_i (2 beta_i - beta*_i), H[u_i, u_i] = h_i v_i^2
    d, h = problem.dim, problem.feature_variance
    u, v = model.uv_state()
    torch.testing.assert_close(dense[:d, d:], torch.diag(h * (2 * u * v - problem.beta_star)), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(dense[:d, :d], torch.diag(h * v * v), rtol=1e-12, atol=1e-15)


def test_hutchinson_trace_agrees_with_the_exact_e7_trace_within_its_standard_error():
    problem = _problem()
    model = _random_dln(problem)
    exact = measure(problem, model, "curvature")["curvature"]
    samples = 64
    est, stderr = hessian_trace(model, _risk(problem), None, samples=samples, generator=_gen(7))
    # Hutchinson is unbiased; with Rademacher z, z^T H z = tr H + 2 sum_i c_i z_ui z_vi with
    # c_i = h_i (2 beta_i - beta*_i) (E7 blocks), a sum of 40 independent terms, so the mean of
    # 64 probes is close to Gaussian: a 4-sigma miss has probability ~6e-5 (and the seed is fixed).
    assert abs(est - exact) <= 4 * stderr
    # The reported standard error estimates the exact one, sqrt(Var / samples) with Var = 4 sum c_i^2.
    # The sample std of 64 near-Gaussian values has a relative spread of about 1/sqrt(2 * 63) = 9 %,
    # so [0.6, 1.5] is more than 4 of its standard deviations wide on each side.
    beta = model.beta.detach()
    exact_se = (4 * ((problem.feature_variance * (2 * beta - problem.beta_star)) ** 2).sum() / samples).sqrt()
    assert 0.6 < stderr / exact_se < 1.5


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    # With a diagonal H every Rademacher probe gives z^T H z = sum_i H_ii z_i^2 = tr H exactly.
    problem = _problem()
    model = _dln_with_diagonal_hessian(problem)
    exact = measure(problem, model, "curvature")["curvature"]
    est, stderr = hessian_trace(model, _risk(problem), None, samples=3, generator=_gen(0))
    # only float64 rounding of ~80-term sums remains
    torch.testing.assert_close(est, exact, rtol=1e-13, atol=0)
    assert stderr <= 1e-13 * exact


def test_single_probe_has_no_standard_error():
    problem = _problem()
    est, stderr = hessian_trace(_random_dln(problem), _risk(problem), None, samples=1)
    assert torch.isfinite(est) and torch.isnan(stderr)


# ---------------------------------------------------------------------- top eigenvalue
def test_top_eigenvalue_matches_eigvalsh_of_the_dense_hessian():
    model, batch = _tiny_mlp(seed=2)
    eig = torch.linalg.eigvalsh(_dense_hessian(model, half_mse, batch))
    magnitudes = eig.abs().sort(descending=True).values
    # Preconditions of the case: the dominant eigenvalue is the largest (positive) one, with a gap.
    assert eig[-1] == magnitudes[0] and magnitudes[1] / magnitudes[0] < 0.35
    est, residual = top_eigenvalue(model, half_mse, batch, iters=30, generator=_gen(0))
    # The Rayleigh-quotient error decays like (0.35)^(2 * 30) ~ 1e-27 times O(1): 1e-4 relative is loose.
    torch.testing.assert_close(est, eig[-1], rtol=1e-4, atol=0)
    # Symmetric H: an eigenvalue lies within the residual of the estimate, and it has converged.
    assert (est - eig[-1]).abs() <= residual + 1e-12 and residual < 1e-6


# ---------------------------------------------------------------------- side effects
def _mixed_mode_model():
    model, batch = _tiny_mlp(batchnorm=True)
    model.train()
    model[3].eval()  # the dropout layer: modes are restored per submodule, not globally
    model[0].weight.grad = torch.randn(model[0].weight.shape, generator=_gen(5), dtype=F64)
    return model, batch


@pytest.mark.parametrize(
    "estimate",
    [
        lambda m, b, method: hessian_trace(m, half_mse, b, samples=4, method=method),
        lambda m, b, method: top_eigenvalue(m, half_mse, b, iters=4, method=method),
        lambda m, b, method: tuple(hvp(m, half_mse, b, {n: torch.ones_like(p) for n, p in m.named_parameters()}, method=method).values()),
    ],
    ids=["trace", "top_eigenvalue", "hvp"],
)
@pytest.mark.parametrize("method", ["func", "double_backward"])
def test_modes_grads_and_buffers_are_left_as_they_were(estimate, method):
    model, batch = _mixed_mode_model()
    modes = [m.training for m in model.modules()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    out = estimate(model, batch, method)
    assert [m.training for m in model.modules()] == modes
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None) if g is None else torch.equal(p.grad, g)
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers))  # BatchNorm ran in eval mode
    assert all(not t.requires_grad and t.grad_fn is None for t in out)  # no graph kept alive


def test_modes_are_restored_when_the_loss_raises():
    model, batch = _mixed_mode_model()
    modes = [m.training for m in model.modules()]

    def broken(m, b):
        raise KeyError("boom")

    with pytest.raises(KeyError):
        hessian_trace(model, broken, batch, samples=2, method="double_backward")
    assert [m.training for m in model.modules()] == modes


def test_train_mode_batchnorm_and_dropout_are_evaluated_in_eval_mode():
    model, batch = _mixed_mode_model()
    in_train = hessian_trace(model, half_mse, batch, samples=8, generator=_gen(3))
    model.eval()
    in_eval = hessian_trace(model, half_mse, batch, samples=8, generator=_gen(3))
    assert all(torch.equal(a, b) for a, b in zip(in_train, in_eval))


# ---------------------------------------------------------------------- fallback path
def test_double_backward_equals_torch_func():
    model, batch = _tiny_mlp(batchnorm=True)
    vector = {n: torch.randn(p.shape, generator=_gen(4), dtype=F64) for n, p in model.named_parameters()}
    a, b = (hvp(model, half_mse, batch, vector, method=m) for m in ("func", "double_backward"))
    for n in vector:  # two exact float64 computations of the same product: rounding only
        torch.testing.assert_close(a[n], b[n], rtol=1e-12, atol=1e-13)
    ta, tb = (hessian_trace(model, half_mse, batch, samples=5, generator=_gen(1), method=m) for m in ("func", "double_backward"))
    torch.testing.assert_close(ta, tb, rtol=1e-12, atol=1e-13)


class _Square(torch.autograd.Function):
    """x^2 with a double-differentiable backward but no setup_context/jvp: torch.func rejects it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class _SquareNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.3, -1.2, 2.0], dtype=F64))

    def forward(self, x):
        return x @ _Square.apply(self.w)


def test_auto_falls_back_to_double_backward_when_torch_func_fails():
    model = _SquareNet()
    batch = (torch.randn(8, 3, generator=_gen(0), dtype=F64), torch.randn(8, generator=_gen(1), dtype=F64))
    with pytest.raises(RuntimeError):
        hessian_trace(model, half_mse, batch, samples=2, method="func")
    vector = {"w": torch.randn(3, generator=_gen(2), dtype=F64)}
    with pytest.warns(RuntimeWarning, match="double backward"):
        auto = hvp(model, half_mse, batch, vector)
    x, y = batch
    dense = torch.autograd.functional.hessian(lambda w: 0.5 * ((x @ (w * w) - y) ** 2).mean(), model.w.detach())
    torch.testing.assert_close(auto["w"], dense @ vector["w"], rtol=1e-12, atol=1e-13)  # float64 rounding only


# ---------------------------------------------------------------------- argument checks
@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: CurvatureMonitor(every_n_steps=0), "every_n_steps"),
        (lambda: CurvatureMonitor(hutchinson_samples=0), "hutchinson_samples"),
        (lambda: CurvatureMonitor(power_iters=0), "power_iters"),
        (lambda: CurvatureMonitor(probe_batch=0), "probe_batch"),
        (lambda: hessian_trace(_tiny_mlp()[0], half_mse, _tiny_mlp()[1], samples=0), "samples"),
        (lambda: top_eigenvalue(_tiny_mlp()[0], half_mse, _tiny_mlp()[1], iters=0), "iters"),
    ],
)
def test_bad_counts_raise_value_error_naming_parameter_and_range(call, name):
    with pytest.raises(ValueError, match=rf"{name} must be an integer >= 1"):
        call()


def test_hvp_rejects_a_vector_with_wrong_keys():
    model, batch = _tiny_mlp()
    with pytest.raises(ValueError, match="vector must have exactly the keys"):
        hvp(model, half_mse, batch, {"0.weight": torch.ones(4, 3, dtype=F64)})


# ---------------------------------------------------------------------- CurvatureMonitor
class _Regression(pl.LightningModule):
    def __init__(self, problem: TeacherProblem, lr: float = 0.5):
        super().__init__()
        self.net = DiagonalLinearNetwork(problem.dim, alpha=0.3, dtype=F64)
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return half_mse(self, batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class _PopulationRegression(_Regression):
    """Declares its exact population loss, as TeacherRegression does."""

    def __init__(self, problem: TeacherProblem, lr: float = 0.5):
        super().__init__(problem, lr)
        self.problem = problem

    def population_loss(self):
        return self.problem.population_risk(self.net.beta)


def _loader(problem: TeacherProblem, n: int = 100, seed: int = 11) -> DataLoader:
    x, y = problem.sample(n, generator=_gen(seed))
    return DataLoader(TensorDataset(x, y), batch_size=10, shuffle=False)


def _trainer(tmp_path, name: str, monitor: CurvatureMonitor, max_steps: int) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path, name=name),
        callbacks=[monitor], log_every_n_steps=5, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )


def _logged(trainer: pl.Trainer) -> dict[int, dict[str, float]]:
    """logger step -> {tag: value} for the curvature tags in the CSV log; each step at most once."""
    with open(f"{trainer.logger.log_dir}/metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get(TAGS[0])]
    steps = [int(r["step"]) for r in rows]
    assert len(steps) == len(set(steps)), steps
    return {int(r["step"]): {t: float(r[t]) for t in TAGS} for r in rows}


def test_monitor_logs_the_tags_at_0_n_2n_and_reproduces_the_e7_trace(tmp_path):
    problem = _problem(10)
    module = _Regression(problem)
    monitor = CurvatureMonitor(every_n_steps=5, probe_batch=4, hutchinson_samples=32, power_iters=10,
                               loss_fn=lambda m, b: problem.population_risk(m.net.beta))
    trainer = _trainer(tmp_path, "run", monitor, max_steps=20)
    trainer.fit(module, _loader(problem))
    logged = _logged(trainer)
    # the parameters after 0, 5, ..., 20 optimizer steps, written at those logger steps
    assert sorted(logged) == [0, 5, 10, 15, 20]
    # the probe batch is the first 4 examples of the first training batch
    first_x, first_y = next(iter(_loader(problem)))
    assert torch.equal(monitor.probe_batch[0], first_x[:4]) and torch.equal(monitor.probe_batch[1], first_y[:4])
    # the last check saw the final parameters: same 4-standard-error reasoning as the direct test
    last = logged[20]
    exact = float(measure(problem, module.net, "curvature")["curvature"])
    assert abs(last[TAGS[0]] - exact) <= 4 * last[TAGS[1]]
    assert module.training and module.net.training  # training mode survived the checks


def test_monitor_gathers_its_probe_from_several_batches_and_starts_when_it_is_complete(tmp_path):
    problem = _problem(10)
    monitor = CurvatureMonitor(every_n_steps=5, probe_batch=25, hutchinson_samples=2, power_iters=2)
    trainer = _trainer(tmp_path, "gather", monitor, max_steps=20)
    trainer.fit(_Regression(problem), _loader(problem))
    x, y = problem.sample(100, generator=_gen(11))
    assert torch.equal(monitor.probe_batch[0], x[:25]) and torch.equal(monitor.probe_batch[1], y[:25])
    # batches of 10: complete at the third batch (step 2), so step 0 is skipped and 5 is the first check
    assert sorted(_logged(trainer)) == [5, 10, 15, 20]


def test_monitor_default_probe_is_256_examples_without_a_population_loss(tmp_path):
    problem = _problem(10)
    monitor = CurvatureMonitor(every_n_steps=5, hutchinson_samples=2, power_iters=2)
    trainer = _trainer(tmp_path, "default", monitor, max_steps=30)
    trainer.fit(_Regression(problem), _loader(problem))  # 10 batches of 10 per epoch, repeated
    assert monitor.probe_batch[0].shape == (256, problem.dim)
    assert sorted(_logged(trainer)) == [25, 30]  # the 26th batch (step 25) completes the probe
    with pytest.warns(UserWarning, match="measured nothing.*256 examples"):
        _trainer(tmp_path, "short", CurvatureMonitor(every_n_steps=5), max_steps=10).fit(_Regression(problem), _loader(problem))


def test_monitor_uses_the_population_loss_by_default(tmp_path):
    """A module with population_loss(): no probe batch, step 0 measured before the first step, and the
    values are those of the explicit population-risk probe (same seed, same Rademacher vectors)."""
    problem = _problem(10)
    monitor = CurvatureMonitor(every_n_steps=5, hutchinson_samples=8, power_iters=4)
    assert monitor.uses_population_loss(_PopulationRegression(problem))
    assert not CurvatureMonitor(probe_batch=4).uses_population_loss(_PopulationRegression(problem))
    module = _PopulationRegression(problem, lr=0.0)  # frozen: every check sees the initial parameters
    trainer = _trainer(tmp_path, "population", monitor, max_steps=10)
    trainer.fit(module, _loader(problem))
    assert monitor.probe_batch is None
    logged = _logged(trainer)
    assert sorted(logged) == [0, 5, 10]
    explicit = CurvatureMonitor(probe_batch=(torch.zeros(1),), hutchinson_samples=8, power_iters=4,
                                loss_fn=_risk(problem)).compute(module.net)
    assert logged[0][TAGS[0]] == pytest.approx(float(explicit[TAGS[0]]), rel=1e-12)


def test_monitor_state_dict_gives_identical_probe_batch_and_probes(tmp_path):
    problem = _problem(10)
    module = _Regression(problem)
    first = CurvatureMonitor(every_n_steps=5, probe_batch=6)
    _trainer(tmp_path, "a", first, max_steps=10).fit(module, _loader(problem))
    resumed = CurvatureMonitor(every_n_steps=5, probe_batch=6)
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(resumed.probe_batch, first.probe_batch))
    fresh = CurvatureMonitor(every_n_steps=5, probe_batch=tuple(first.probe_batch))
    after_resume, uninterrupted, from_seed = (m.compute(module) for m in (resumed, first, fresh))
    assert all(torch.equal(after_resume[t], uninterrupted[t]) for t in TAGS)
    # the generator state matters: a fresh generator draws other probes (three checks have run)
    assert not torch.equal(from_seed[TAGS[0]], uninterrupted[TAGS[0]])


def test_monitor_resumed_from_a_checkpoint_logs_what_an_uninterrupted_run_logs(tmp_path):
    # lr = 0 freezes the parameters, so the logged values depend only on the monitor's own state
    # (probe batch, generator, last step); whether Lightning resumes the training trajectory is not tested here.
    problem = _problem(10)
    make = lambda: CurvatureMonitor(every_n_steps=5, probe_batch=4, hutchinson_samples=4, power_iters=3)  # noqa: E731
    straight = _trainer(tmp_path, "straight", make(), max_steps=20)
    straight.fit(_Regression(problem, lr=0.0), _loader(problem))
    first_half = _trainer(tmp_path, "half", make(), max_steps=10)
    first_half.fit(_Regression(problem, lr=0.0), _loader(problem))
    first_half.save_checkpoint(tmp_path / "half.ckpt")
    resumed = make()
    second_half = _trainer(tmp_path, "resumed", resumed, max_steps=20)
    # other data: a probe batch captured afresh would differ from the checkpointed one
    second_half.fit(_Regression(problem, lr=0.0), _loader(problem, seed=12), ckpt_path=tmp_path / "half.ckpt")
    first_x, _ = next(iter(_loader(problem)))
    assert torch.equal(resumed.probe_batch[0], first_x[:4])
    expected = _logged(straight)
    assert sorted(expected) == [0, 5, 10, 15, 20] and sorted(_logged(first_half)) == [0, 5, 10]
    assert expected[15] != expected[5]  # the generator advances: later checks draw other probes
    assert _logged(second_half) == {s: expected[s] for s in (15, 20)}  # step 10 is not written again


def test_monitor_default_loss_uses_the_modules_criterion(tmp_path):
    problem = _problem(10)
    module = _Regression(problem)
    batch = problem.sample(8, generator=_gen(2))
    half = CurvatureMonitor(probe_batch=batch).compute(module)
    module.loss_fn = nn.MSELoss()  # mean squared error = 2 x (MSE / 2): every Hessian doubles
    with warnings.catch_warnings():  # F.mse_loss needs the double-backward fallback (pytorch/pytorch#123996)
        warnings.simplefilter("ignore", RuntimeWarning)
        full = CurvatureMonitor(probe_batch=batch).compute(module)
    for t in TAGS:
        torch.testing.assert_close(full[t], 2 * half[t], rtol=1e-12, atol=0)


def test_monitor_cadence_default_and_warning_for_too_few_points(tmp_path):
    problem = _problem(10)
    auto = CurvatureMonitor(hutchinson_samples=2, power_iters=2)
    trainer = _trainer(tmp_path, "auto", auto, max_steps=64)
    trainer.fit(_PopulationRegression(problem), _loader(problem))
    assert sorted(_logged(trainer)) == list(range(0, 65, 2))  # 64 // 32 = 2: 33 measurements
    with pytest.warns(UserWarning, match=r"every_n_steps=8\) measures only 2 time\(s\) in 10 steps"):
        _trainer(tmp_path, "few", CurvatureMonitor(every_n_steps=8), max_steps=10).fit(_PopulationRegression(problem),
                                                                                      _loader(problem))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*CurvatureMonitor.*")
        _trainer(tmp_path, "enough", CurvatureMonitor(every_n_steps=2), max_steps=10).fit(_PopulationRegression(problem),
                                                                                         _loader(problem))


def test_monitor_cadence_for_an_epoch_based_run_and_an_unbounded_one(tmp_path):
    problem = _problem(10)
    monitor = CurvatureMonitor(hutchinson_samples=2, power_iters=2)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=CSVLogger(tmp_path, name="epochs"), callbacks=[monitor],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(_PopulationRegression(problem), _loader(problem))  # 2 epochs of 10 batches: 20 // 32 -> every step
    assert sorted(_logged(trainer)) == list(range(21))
    unbounded = SimpleNamespace(callbacks=[], max_steps=-1, estimated_stepping_batches=float("inf"))
    with pytest.raises(ValueError, match=r"every_n_steps=None\) needs a run of known length.*max_steps"):
        CurvatureMonitor().cadence(unbounded)
