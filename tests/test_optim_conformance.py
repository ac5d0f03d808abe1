"""PyTorch's generic optimizer tests, ported to HomogenizedSGD and SVAG (issue 16).

Source: pytorch/pytorch ``test/test_optim.py`` (class ``TestOptimRenewed``), driven by
``torch/testing/_internal/common_optimizers.py`` (``optim_inputs_func_sgd``,
``optim_error_inputs_func_sgd``, the SGD entry of ``optim_db``), and the optimizer-facing part
of ``test/optim/test_lrscheduler.py``, as of torch 2.13. Each test names its source; the body
keeps PyTorch's assertions. ``torch.optim.SGD`` runs through the same tests as the reference
(it must pass them unchanged, which checks the port itself).

Configurations (``CASES``): torch.optim.SGD; SVAG (l = 4); HomogenizedSGD with EmpiricalNoise
and with StructuredNoise, each at noise_scale 0 and 1.

* EmpiricalNoise covers the test's own parameters: a probe model (a random linear regression
  on all of them, 8 samples, batch 2, so c^2 = 1/2 - 1/8) gives the per-sample gradients, and a
  step pre-hook hands it its batch before every step.
* StructuredNoise exists only for a DiagonalLinearNetwork, so the structured configurations
  get the test's parameters plus, in a last parameter group, a DLN of dimension 8 with its
  structured noise and exact drift (a step pre-hook puts the population-risk gradient in its
  ``.grad``). PyTorch's assertions are on the test's parameters; the noise model, its
  generator and its state still go through every code path (state_dict, pickling, hooks).

Differences by design (README, "Differences from torch.optim.SGD") are asserted as such: no
sparse or complex parameters and no fused/differentiable/capturable flags (clear errors), no
default ``lr`` (a TypeError naming it), and noise that moves parameters at zero gradient.
"""

from __future__ import annotations

import copy
import functools
import gc
import math
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
from torch import nn
from torch.nn import Parameter
from torch.optim import SGD, Optimizer
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    CyclicLR,
    ExponentialLR,
    LinearLR,
    MultiStepLR,
    OneCycleLR,
    PolynomialLR,
    ReduceLROnPlateau,
    SequentialLR,
    StepLR,
)
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from sde_optim import SVAG, DiagonalLinearNetwork, EmpiricalNoise, HomogenizedSGD, StructuredNoise, TeacherProblem


# ----------------------------------------------------------------------------- configurations
# common_optimizers.optim_inputs_func_sgd (torch 2.13), verbatim
def sgd_inputs() -> list[dict[str, Any]]:
    return [
        {},
        {"lr": 1e-2},
        {"lr": torch.tensor(0.001)},
        {"weight_decay": 0.5},
        {"momentum": 0.9},
        {"weight_decay": 0.1, "maximize": True},
        {"momentum": 0.9, "dampening": 0.5},
        {"momentum": 0.9, "weight_decay": 0.1},
        {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
    ]


def all_inputs() -> list[dict[str, Any]]:
    """_get_optim_inputs_including_global_cliquey_kwargs with supported_impls=("foreach",): each
    input with foreach=False and foreach=True (fused and differentiable are not supported, see
    test_unsupported_flags_are_refused)."""
    return [{**kw, "foreach": f} for kw in sgd_inputs() for f in (False, True)]


def few_inputs() -> list[dict[str, Any]]:
    """Where PyTorch crosses all inputs with a second parametrization that is about something else
    (named parameters, contiguity under schedulers), the second axis runs on these, which between
    them take every code path (plain, tensor lr, momentum, nesterov with weight decay, maximize),
    to keep the suite fast; the full input list still runs with the first value of that axis."""
    picked = [sgd_inputs()[i] for i in (0, 2, 5, 6, 8)]
    return [{**kw, "foreach": f} for kw in picked for f in (False, True)]


# common_optimizers: the SGD entry's scheduler_inputs
SCHEDULER_INPUTS = (
    [lambda opt: StepLR(opt, gamma=0.9, step_size=10)],
    [lambda opt: LinearLR(opt, start_factor=0.4, end_factor=0.8, total_iters=4)],
    [lambda opt: StepLR(opt, gamma=0.9, step_size=10), lambda opt: LinearLR(opt, start_factor=0.4, end_factor=0.6, total_iters=4)],
    [lambda opt: StepLR(opt, gamma=0.99, step_size=10), lambda opt: ExponentialLR(opt, gamma=0.99), lambda opt: ReduceLROnPlateau(opt)],
    [lambda opt: ConstantLR(opt, factor=0.4, total_iters=4)],
    [lambda opt: PolynomialLR(opt, power=0.9, total_iters=4)],
    [lambda opt: StepLR(opt, gamma=0.9, step_size=10), lambda opt: ReduceLROnPlateau(opt)],
)

# common_optimizers: SGD's not_og_supported_flags (flags newer than the original optimizer); for
# ours, every group key added since the first release: a state_dict saved before them must load and step
TORCH_NOT_OG_SUPPORTED_FLAGS = ("foreach", "differentiable", "fused", "maximize", "capturable")
NOT_OG_SUPPORTED_FLAGS = ("foreach", "maximize", "momentum", "dampening", "nesterov")


def _groups(params: Any) -> Any:
    """The params argument as a list of group dicts (iterables materialized), or as given if a tensor."""
    if isinstance(params, torch.Tensor):
        return params
    params = list(params)
    if params and isinstance(params[0], dict):
        return [{**g, "params": g["params"] if isinstance(g["params"], torch.Tensor) else list(g["params"])}
                for g in params]
    return [{"params": params}]


def _tensors(groups: Any) -> list[torch.Tensor]:
    if isinstance(groups, torch.Tensor):
        return [groups]
    out = []
    for g in groups:
        ps = [g["params"]] if isinstance(g["params"], torch.Tensor) else g["params"]
        out += [p[1] if isinstance(p, tuple) else p for p in ps]
    return out


class _Probe(nn.Module):
    """A random linear regression on arbitrary tensors: ``out_m = sum_j <x_m[slice_j], p_j>``, so
    that EmpiricalNoise has per-sample gradients for every one of them."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        super().__init__()
        self.tensors = [t for t in tensors if t.requires_grad]

    def parameters(self, recurse: bool = True):  # the test's tensors, not registered submodules
        return iter(self.tensors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, offset = torch.zeros(x.shape[0], dtype=x.dtype), 0
        for t in self.tensors:
            n = t.numel()
            out = out + (x[:, offset:offset + n].to(t.dtype) * t.reshape(-1)).sum(1).to(x.dtype)
            offset += n
        return out[:, None]


def _empirical(params: Any, noise_scale: float, **kwargs: Any) -> HomogenizedSGD:
    groups = _groups(params)
    tensors = [t for t in _tensors(groups) if isinstance(t, torch.Tensor)]
    probe = _Probe(tensors)
    gen = torch.Generator().manual_seed(7)
    x = 0.1 * torch.randn(8, max(1, sum(t.numel() for t in probe.tensors)), generator=gen, dtype=torch.float64)
    y = torch.randn(8, 1, generator=gen, dtype=torch.float64)
    opt = HomogenizedSGD(groups, lr=kwargs.pop("lr", 1e-3), batch_size=2, noise=EmpiricalNoise(probe),
                         noise_scale=noise_scale, seed=0, **kwargs)
    opt.register_step_pre_hook(lambda o, args, kw: o.set_batch(x, y))
    return opt


def _structured(params: Any, noise_scale: float, **kwargs: Any) -> HomogenizedSGD:
    groups = _groups(params)
    tensors = _tensors(groups)
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)
    problem = TeacherProblem.sparse(8, 0.25, noise_std=0.1, seed=0)
    g = torch.Generator().manual_seed(3)
    dln = DiagonalLinearNetwork(8, init=(torch.randn(8, generator=g), torch.randn(8, generator=g)), dtype=dtype)
    named = not isinstance(groups, torch.Tensor) and any(
        isinstance(g["params"], list) and g["params"] and isinstance(g["params"][0], tuple) for g in groups)
    aux = [("dln.u", dln.u), ("dln.v", dln.v)] if named else [dln.u, dln.v]
    if not isinstance(groups, torch.Tensor):
        groups = groups + [{"params": aux, "momentum": 0.0, "dampening": 0.0, "nesterov": False}]
    opt = HomogenizedSGD(groups, lr=kwargs.pop("lr", 1e-3), batch_size=2, noise=StructuredNoise(problem, dln),
                         noise_scale=noise_scale, seed=0, **kwargs)

    def drift(o: Optimizer, args: Any, kw: Any) -> None:
        with torch.enable_grad():
            dln.u.grad, dln.v.grad = torch.autograd.grad(problem.population_risk(dln.beta), [dln.u, dln.v])

    opt.register_step_pre_hook(drift)
    return opt


@dataclass
class Case:
    name: str
    build: Callable[..., Optimizer]
    noisy: bool = False  # noise reaches the test's own parameters


CASES = [
    Case("sgd", lambda params, **kw: SGD(params, **kw)),
    Case("svag", lambda params, **kw: SVAG(params, lr=kw.pop("lr", 1e-3), l=4, **kw)),
    Case("homogenized-empirical-ns0", functools.partial(_empirical, noise_scale=0.0)),
    Case("homogenized-empirical-ns1", functools.partial(_empirical, noise_scale=1.0), noisy=True),
    Case("homogenized-structured-ns0", functools.partial(_structured, noise_scale=0.0)),
    Case("homogenized-structured-ns1", functools.partial(_structured, noise_scale=1.0)),
]
OURS = [c for c in CASES if c.name != "sgd"]


def cases(which=CASES):
    return pytest.mark.parametrize("case", which, ids=[c.name for c in which])


def assert_equal(a: Any, b: Any, *, exact: bool = True) -> None:
    """Recursive equality for state dicts: tensors bitwise (or torch's default tolerances)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if exact:
            assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b), (a, b)
        else:
            torch.testing.assert_close(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (a.keys(), b.keys())
        for k in a:
            assert_equal(a[k], b[k], exact=exact)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_equal(x, y, exact=exact)
    else:
        assert a == b, (a, b)


def _weight_bias(contiguous: bool = True, dtype=torch.float32):
    if contiguous:
        return Parameter(torch.randn((10, 5), dtype=dtype)), Parameter(torch.randn(10, dtype=dtype))
    return Parameter(torch.randn((10, 5, 2), dtype=dtype)[..., 0]), Parameter(torch.randn((10, 2), dtype=dtype)[..., 0])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------- TestOptimRenewed
def test_optim_infos_do_not_specify_global_cliquey_kwargs():
    """test_optim_infos_do_not_specify_global_cliquey_kwargs"""
    for kwargs in sgd_inputs():
        assert not any(f in kwargs for f in ("foreach", "fused", "differentiable"))


def _error_inputs():
    """common_optimizers.get_error_inputs_for_all_optims + optim_error_inputs_func_sgd (CPU)."""
    p, p2 = Parameter(torch.randn(1, 1)), Parameter(torch.randn(1, 1))
    return [
        (p, {}, TypeError, "params argument given to the optimizer should be an iterable of Tensors or dicts"),
        ([p, p], {}, UserWarning, ".*a parameter group with duplicate parameters.*"),
        ([{"params": p}, {"params": p}], {}, ValueError, "some parameters appear in more than one parameter group"),
        (None, {"lr": torch.tensor([0.001, 0.001])}, ValueError, "Tensor lr must be 1-element"),
        ([("weight", p), p2], {}, ValueError,
         "all optimizer params should be with/without names. Some param names are missing"),
        ([{"params": [p], "lr": 1e-2}, {"params": [("weight", p2)]}], {}, ValueError,
         "all optimizer param groups should be with/without names. cannot add param group with names to the optimizer"),
        (None, {"lr": 1e-2, "momentum": -0.5}, ValueError, "Invalid momentum value: -0.5"),
    ]


@cases()
def test_errors(case):
    """test_errors (all CONSTRUCTION_ERROR for SGD)"""
    for params, kwargs, error, regex in _error_inputs():
        params = [Parameter(torch.randn(1, 1))] if params is None else params
        if issubclass(error, Warning):
            with pytest.warns(error, match=regex):
                case.build(params, **kwargs)
        else:
            with pytest.raises(error, match=regex):
                case.build(params, **kwargs)


def _schedulers_or_none(with_lrsched):
    return SCHEDULER_INPUTS if with_lrsched else [None]


def _descend(optimizer, problem, schedulers, through_step):
    """20 steps on ``(weight.mv(input) + bias).pow(2).sum()`` with schedulers (the loop of the
    goes-right-direction tests; the closure goes to step() or runs before it). Returns the loss
    before and after."""
    closure = functools.partial(fwd_bwd, optimizer, *problem)
    initial_value = closure().item()
    for _ in range(20):
        if through_step:
            loss = optimizer.step(closure)
        else:
            loss = closure()
            optimizer.step()
        _step_schedulers(schedulers, loss)
    return initial_value, closure().item()


def _group_loop(optimizer, problem, before_step=lambda: None):
    """The param-group tests' loop: 20 steps; the first loss, and the last step's loss (taken before it)."""
    weight, bias, inpt = problem
    initial_value = (weight.mv(inpt) + bias).pow(2).sum().item()
    for _ in range(20):
        loss = fwd_bwd(optimizer, *problem)
        before_step()
        optimizer.step()
    return initial_value, loss.item()


def _assert_direction(kwargs, initial_value, final_value):
    if kwargs.get("maximize", False):
        assert final_value > initial_value
    else:
        assert final_value < initial_value


def _step_schedulers(schedulers, loss):
    for scheduler in schedulers:
        if isinstance(scheduler, ReduceLROnPlateau):
            scheduler.step(loss)
        else:
            scheduler.step()


@cases()
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("with_lrsched", [True, False])
def test_forloop_goes_right_direction(case, contiguous, with_lrsched):
    """test_forloop_goes_right_direction. With noise (empirical, noise_scale 1) the probe's noise
    per coordinate is ~5e-2 against a drift of ~10, so 20 steps still go the drift's way.
    Under schedulers (7 lists): few_inputs()."""
    inputs = sgd_inputs if not with_lrsched else lambda: [k for k in few_inputs() if not k["foreach"]]
    for schedulers_constructor in _schedulers_or_none(with_lrsched):
        for kwargs in inputs():
            kwargs["foreach"] = False  # force forloop
            weight, bias = _weight_bias(contiguous)
            inpt = torch.randn(5)
            optimizer = case.build([weight, bias], **kwargs)
            schedulers = [s(optimizer) for s in (schedulers_constructor or [])]
            _assert_direction(kwargs, *_descend(optimizer, (weight, bias, inpt), schedulers, through_step=False))


@cases()
def test_param_group_with_lrscheduler_goes_right_direction(case):
    """test_param_group_with_lrscheduler_goes_right_direction (no lr in the first group: the
    optimizer's default, 1e-3 for ours, see test_no_default_lr)"""
    for schedulers_c in SCHEDULER_INPUTS:
        weight, bias = _weight_bias()
        inpt = torch.randn(5)
        optimizer = case.build([{"params": [weight]}, {"params": [bias], "lr": 0.01}])
        schedulers = [scheduler_c(optimizer) for scheduler_c in schedulers_c]
        initial_value, final_value = _descend(optimizer, (weight, bias, inpt), schedulers, through_step=True)
        assert final_value < initial_value


@cases()
def test_tensor_lr(case):
    """test_tensor_lr. PyTorch's loop forgets to call step() for optimizers that take no closure
    (it only runs the closures); here both optimizers step, so the assertion has teeth."""
    for kwargs in all_inputs():
        weight, bias = _weight_bias()
        weight_c = weight.detach().clone().requires_grad_(True)
        bias_c = bias.detach().clone().requires_grad_(True)
        inpt = torch.randn(5)
        kwargs.pop("lr", None)
        kwargs["lr"] = 1e-3
        optimizer_r = case.build([weight, bias], **kwargs)
        kwargs["lr"] = torch.tensor(kwargs["lr"])
        optimizer = case.build([weight_c, bias_c], **kwargs)

        def closure(optim, w, b, i):
            optim.zero_grad()
            loss = (w.mv(i) + b).pow(2).sum()
            loss.backward()
            return loss

        for _ in range(5):
            optimizer_r.step(functools.partial(closure, optimizer_r, weight, bias, inpt))
            optimizer.step(functools.partial(closure, optimizer, weight_c, bias_c, inpt))
            assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c)


@cases(OURS)
def test_rosenbrock_sparse_is_refused(case):
    """test_rosenbrock_sparse: sparse gradients are not supported (by design); a step with one
    raises before any parameter changes."""
    params = [Parameter(torch.tensor([1.5, 1.5]))]
    optimizer = case.build(params, lr=4.8e-3)
    params[0].grad = torch.sparse_coo_tensor(torch.tensor([[0, 0]]), torch.tensor([1.0, 2.0]), (2,))
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        optimizer.step()
    assert torch.equal(params[0].detach(), torch.tensor([1.5, 1.5]))


@cases(OURS)
def test_complex_is_refused(case):
    """test_complex / test_complex_2d: complex parameters are refused at construction (by design:
    the noise models are real); view_as_real is the way, as PyTorch's tests themselves compare."""
    with pytest.raises(TypeError, match="complex parameters are not supported"):
        case.build([torch.randn(10, 5, dtype=torch.complex64, requires_grad=True)])


@cases(OURS)
@pytest.mark.parametrize("flag", ["fused", "differentiable", "capturable"])
def test_unsupported_flags_are_refused(case, flag):
    """supported_impls of our entries is ("foreach",): torch's other flags are refused by name."""
    with pytest.raises(TypeError, match=flag):
        case.build([Parameter(torch.randn(2))], **{flag: True})


@cases(OURS)
def test_no_default_lr(case):
    """torch.optim.SGD defaults to lr=1e-3; ours require it (a step size of an SDE is never a
    harmless default): a TypeError naming lr."""
    cls = type(case.build([Parameter(torch.randn(2))]))
    kwargs = {"batch_size": 1, "noise": EmpiricalNoise(nn.Linear(1, 1))} if cls is HomogenizedSGD else {}
    with pytest.raises(TypeError, match="lr"):
        cls([Parameter(torch.randn(2))], **kwargs)


def _compare_between(inputs, models, optimizers):
    """_compare_between (TestOptimRenewed helper): 7 iterations, a layer frozen at 3 and thawed
    at 5, no gradients at 2; parameters and optimizer state must agree (here bitwise)."""
    for i in range(7):
        state, updated_params = [], []
        for inpt, model, optimizer in zip([inputs, inputs], models, optimizers):
            optimizer.zero_grad()
            if i == 3:
                model[2].requires_grad_(False)
            if i == 5:
                model[2].requires_grad_(True)
            if i != 2:
                model(inpt).sum().backward()
            optimizer.step()
            state.append(optimizer.state)
            updated_params.append(model.parameters())
        og_state, new_state = state
        for og_p, new_p in zip(updated_params[0], updated_params[1]):
            assert torch.equal(og_p, new_p)
            og_p_state, new_p_state = og_state[og_p], new_state[new_p]
            assert set(og_p_state) == set(new_p_state)
            for k in og_p_state:
                assert torch.equal(og_p_state[k], new_p_state[k])


@cases()
def test_foreach_matches_forloop(case):
    """test_foreach_matches_forloop (_test_derived_optimizers with flag "foreach", float64)"""
    dtype = torch.float64
    for kwargs in sgd_inputs():
        models, optimizers = [], []
        for flag_value in (False, True):
            kwargs["foreach"] = flag_value
            inpt = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype).reshape(3, 2)
            torch.manual_seed(1)
            model = nn.Sequential(nn.Linear(2, 3), nn.Sigmoid(), nn.Linear(3, 1), nn.Sigmoid()).to(dtype)
            # PyTorch's test leaves this scalar uninitialized (torch.empty); the empirical noise's
            # probe couples every parameter, so garbage here (up to 1e146 seen in CI) made the two
            # runs differ by chance: a fixed value keeps the comparison about foreach alone.
            empty_param = torch.full((), 0.5, dtype=dtype, requires_grad=True)
            empty_param.grad = torch.rand_like(empty_param)
            params = list(model.parameters()) + [empty_param]
            optimizer = case.build(params, **kwargs)
            models.append(model)
            optimizers.append(optimizer)
        _compare_between(inpt, models, optimizers)


@cases()
def test_param_groups_weight_decay(case):
    """test_param_groups_weight_decay"""
    for kwargs in all_inputs():
        weight_kwargs = kwargs
        bias_kwargs = copy.deepcopy(kwargs)
        bias_kwargs["weight_decay"] = 0.0
        weight, bias = _weight_bias()
        inpt = torch.randn(5)
        optimizer = case.build([dict(params=[weight], **weight_kwargs), dict(params=[bias], **bias_kwargs)])
        _assert_direction(kwargs, *_group_loop(optimizer, (weight, bias, inpt)))


@cases()
def test_param_groups_lr(case):
    """test_param_groups_lr"""
    for kwargs in all_inputs():
        if "lr" not in kwargs or kwargs["lr"] == 0:
            kwargs["lr"] = 1e-3
        outer_kwargs = {"lr": 1e-28}
        weight, bias = _weight_bias()
        irrelevant = Parameter(torch.randn(2))
        irrelevant_clone = irrelevant.clone()
        inpt = torch.randn(5)
        optimizer = case.build([dict(params=[weight, bias], **kwargs), dict(params=[irrelevant])], **outer_kwargs)
        _assert_direction(kwargs, *_group_loop(optimizer, (weight, bias, inpt),
                                               lambda: setattr(irrelevant, "grad", torch.rand_like(irrelevant))))
        assert torch.equal(irrelevant, irrelevant_clone)


@cases()
def test_step_is_noop_when_params_have_no_grad(case):
    """test_step_is_noop_when_params_have_no_grad (PyTorch only runs the step; we also assert the no-op)"""
    params = [torch.randn(2, 3, requires_grad=False) for _ in range(2)]
    old_params = [p.detach().clone() for p in params]

    def closure():
        return torch.tensor([1.0])

    for kwargs in all_inputs():
        optimizer = case.build(params, **kwargs)
        optimizer.step(closure)
        assert all(torch.equal(a, b) for a, b in zip(params, old_params))


@cases()
def test_step_is_noop_for_zero_grads(case):
    """test_step_is_noop_for_zero_grads. By design, noise moves parameters even at zero gradient
    (it is SGD's gradient noise, not a function of this gradient): with EmpiricalNoise at
    noise_scale 1 the test asserts that the parameter moves; every other case is a no-op."""
    param = torch.randn((5, 1), requires_grad=True)
    old_param = param.detach().clone()

    def closure():
        return torch.tensor([1.0])

    for kwargs in all_inputs():
        if kwargs.get("weight_decay", 0) != 0:
            continue
        params = [param]
        optimizer = case.build(params, **kwargs)
        params[0].grad = torch.zeros_like(params[0])
        optimizer.step(closure)
        if case.noisy:
            assert not torch.equal(old_param, params[0])
            with torch.no_grad():
                params[0].copy_(old_param)
        else:
            assert torch.equal(old_param, params[0])


@cases()
def test_optimizer_can_be_printed(case):
    """test_optimizer_can_be_printed"""
    params = [Parameter(torch.randn(2, 3, requires_grad=True)) for _ in range(2)]
    for kwargs in all_inputs():
        optimizer = case.build(params, **kwargs)
        optimizer.__repr__()


def _small_linear():
    """The weight (2, 3), bias (2) and input (3) of TestOptimRenewed's state_dict tests."""
    return (Parameter(torch.randn(2, 3, requires_grad=True)), Parameter(torch.randn(2, requires_grad=True)),
            torch.randn(3, requires_grad=True))


def fwd_bwd(optim, w, b, i):
    optim.zero_grad()
    loss = (w.mv(i) + b).pow(2).sum()
    loss.backward()
    return loss


def _named(params, is_named):
    return [(f"name{i}", p) for i, p in enumerate(params)] if is_named else params


def _without_param_names(state_dict):
    new_state_dict = copy.deepcopy(state_dict)
    for pg in new_state_dict["param_groups"]:
        pg.pop("param_names", None)
    return new_state_dict


@cases()
@pytest.mark.parametrize("is_named_optim0", [True, False])
@pytest.mark.parametrize("is_named_optim1", [True, False])
def test_state_dict_deterministic(case, is_named_optim0, is_named_optim1):
    """test_state_dict_deterministic (named parameters: few_inputs()[::2], one foreach value each)"""
    weight, bias, inpt = _small_linear()

    for kwargs in all_inputs() if not (is_named_optim0 or is_named_optim1) else few_inputs()[::2]:
        optimizer = case.build(_named([weight, bias], is_named_optim0), **kwargs)
        closure = functools.partial(fwd_bwd, optimizer, weight, bias, inpt)
        for _ in range(10):
            closure()
            optimizer.step()
        with torch.no_grad():
            weight_c = Parameter(weight.clone())
            bias_c = Parameter(bias.clone())
        optimizer_c = case.build(_named([weight_c, bias_c], is_named_optim1), **kwargs)
        closure_c = functools.partial(fwd_bwd, optimizer_c, weight_c, bias_c, inpt)
        optimizer_c.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        for _ in range(10):
            closure()
            closure_c()
            optimizer.step()
            optimizer_c.step()
            assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c)
        assert_equal(_without_param_names(optimizer.state_dict()), _without_param_names(optimizer_c.state_dict()))
        optimizer_c.param_groups.extend(optimizer_c.param_groups)
        assert_equal(_without_param_names(optimizer.state_dict())["param_groups"][-1],
                     _without_param_names(optimizer_c.state_dict())["param_groups"][-1])


def _conv_bn():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(4, 2, 1, stride=2), nn.BatchNorm2d(2, eps=1e-05, momentum=0.1))
    return model, torch.rand(1, 4, 16, 16)


def _fwd_bwd(optim, mod, i):
    optim.zero_grad()
    loss = mod(i).sum()
    loss.backward()
    return loss


@cases()
def test_can_load_older_state_dict(case):
    """test_can_load_older_state_dict (not_og_supported_flags: every key added since our first release)"""
    for kwargs in all_inputs():
        model, inpt = _conv_bn()
        optimizer = case.build(model.parameters(), **kwargs)
        for _ in range(3):
            _fwd_bwd(optimizer, model, inpt)
            optimizer.step()
        old_state_dict = copy.deepcopy(optimizer.state_dict())
        for group in old_state_dict["param_groups"]:
            for flag in TORCH_NOT_OG_SUPPORTED_FLAGS if case.name == "sgd" else NOT_OG_SUPPORTED_FLAGS:
                group.pop(flag, None)
        optimizer.load_state_dict(old_state_dict)
        _fwd_bwd(optimizer, model, inpt)
        optimizer.step()


@cases()
@pytest.mark.parametrize("is_named_optim0", [True, False])
@pytest.mark.parametrize("is_named_optim1", [True, False])
def test_can_load_from_to_named_state_dict(case, is_named_optim0, is_named_optim1):
    """test_can_load_from_to_named_state_dict (named parameters: few_inputs())"""
    for kwargs in all_inputs() if not (is_named_optim0 or is_named_optim1) else few_inputs():
        model, inpt = _conv_bn()
        optimizer = case.build(model.named_parameters() if is_named_optim0 else model.parameters(), **kwargs)
        for _ in range(3):
            _fwd_bwd(optimizer, model, inpt)
            optimizer.step()
        old_state_dict = copy.deepcopy(optimizer.state_dict())
        optimizer2 = case.build(model.named_parameters() if is_named_optim1 else model.parameters(), **kwargs)
        optimizer2.load_state_dict(old_state_dict)
        _fwd_bwd(optimizer2, model, inpt)
        optimizer2.step()
        if is_named_optim0 or is_named_optim1:
            assert optimizer2.state_dict()["param_groups"][0]["param_names"] == ["0.weight", "0.bias", "1.weight", "1.bias"]


@cases()
@pytest.mark.parametrize("is_named_optim", [True, False])
def test_save_load_equality_with_weights_only(case, is_named_optim):
    """test_save_load_equality_with_weights_only"""
    weight, bias, inpt = _small_linear()

    for kwargs in all_inputs():
        optimizer = case.build(_named([weight, bias], is_named_optim), **kwargs)
        closure = functools.partial(fwd_bwd, optimizer, weight, bias, inpt)
        for _ in range(3):
            optimizer.step(closure)
        sd = optimizer.state_dict()
        with tempfile.TemporaryFile() as f:
            torch.save(sd, f)
            f.seek(0)
            assert_equal(torch.load(f), sd)
            f.seek(0)
            assert_equal(torch.load(f, weights_only=True), sd)


@cases()
def test_load_nontensor_step(case):
    """test_load_nontensor_step (no 'step' entries in SGD-type state: loading and stepping must still work)"""
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)
    for kwargs in all_inputs():
        optimizer = case.build(params, **kwargs)
        for _ in range(3):
            optimizer.step()
        state_dict = copy.deepcopy(optimizer.state_dict())
        for p_state in state_dict["state"].values():
            if "step" in p_state and torch.is_tensor(p_state["step"]):
                p_state["step"] = p_state["step"].item()
        optimizer.load_state_dict(state_dict)
        optimizer.step()


def _state_dict_pre_hook(optimizer):
    optimizer.state["test"] = 1


def _state_dict_post_hook(optimizer, state_dict):
    if "test" in state_dict["state"]:
        state_dict["state"].pop("test")
        state_dict["ran_state_dict_pre_hook"] = True
    else:
        state_dict["ran_state_dict_pre_hook"] = False
    return state_dict


@cases()
def test_state_dict_hooks(case):
    """test_state_dict_pre_hook, test_state_dict_post_hook, test_state_dict_pre_post_hook"""
    for kwargs in all_inputs():
        param = torch.rand(2, 3, requires_grad=True)
        optim = case.build([param], **kwargs)
        optim.register_state_dict_pre_hook(_state_dict_pre_hook)
        assert optim.state_dict()["state"]["test"] == 1
        optim = case.build([param], **kwargs)
        optim.register_state_dict_post_hook(_state_dict_post_hook)
        assert not optim.state_dict()["ran_state_dict_pre_hook"]
        optim = case.build([param], **kwargs)
        optim.register_state_dict_pre_hook(_state_dict_pre_hook)
        optim.register_state_dict_post_hook(_state_dict_post_hook)
        state_dict = optim.state_dict()
        assert "test" not in state_dict["state"] and state_dict["ran_state_dict_pre_hook"]


def _load_state_dict_pre_hook1(optimizer, state_dict):
    state_dict["param_groups"][0]["lr"] = 0.002


def _load_state_dict_pre_hook2(optimizer, state_dict):
    my_state_dict = copy.deepcopy(state_dict)
    my_state_dict["param_groups"][0]["lr"] = 0.003
    return my_state_dict


def _load_state_dict_post_hook(optimizer):
    optimizer.state["ran_load_state_dict_pre_hook2"] = optimizer.param_groups[0]["lr"] == 0.003
    optimizer.state["ran_load_state_dict_post_hook"] = True


@cases()
def test_load_state_dict_hooks(case):
    """test_load_state_dict_pre_hook_and_prepend, test_load_state_dict_post_hook,
    test_load_state_dict_pre_post_hook"""
    for kwargs in all_inputs():
        param = torch.rand(2, 3, requires_grad=True)
        optim = case.build([param], **kwargs)
        state_dict = optim.state_dict()
        optim.register_load_state_dict_pre_hook(_load_state_dict_pre_hook1)
        optim.load_state_dict(state_dict)
        assert optim.param_groups[0]["lr"] == 0.002
        optim.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2, prepend=True)
        optim.load_state_dict(state_dict)
        assert optim.param_groups[0]["lr"] == 0.002  # prepend: hook1 runs last and wins

        optim = case.build([param], **kwargs)
        optim.register_load_state_dict_post_hook(_load_state_dict_post_hook)
        optim.load_state_dict(optim.state_dict())
        assert not optim.state["ran_load_state_dict_pre_hook2"] and optim.state["ran_load_state_dict_post_hook"]

        optim = case.build([param], **kwargs)
        optim.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2)
        optim.register_load_state_dict_post_hook(_load_state_dict_post_hook)
        optim.load_state_dict(optim.state_dict())
        assert optim.state["ran_load_state_dict_pre_hook2"] and optim.state["ran_load_state_dict_post_hook"]


@cases()
def test_step_pre_and_post_hooks(case):
    """test_step_post_hook, test_step_pre_hook"""
    params = [torch.tensor([1.0, 1.0])]
    for kwargs in all_inputs():
        for register, start, end in (("register_step_post_hook", 2, 6), ("register_step_pre_hook", 5, 9)):
            optim = case.build(params, **kwargs)
            data = [start]

            def hook(opt, args, kw):
                data[0] += 2

            handle = getattr(optim, register)(hook)
            optim.step()
            optim.step()
            assert data[0] == end
            handle.remove()
            optim.step()
            assert data[0] == end


@cases()
def test_step_hooks_see_and_replace_torchs_arguments(case):
    """As torch's wrapper: a hook gets (optimizer, args with the optimizer first, kwargs); a pre-hook
    returning (args, kwargs) replaces them (here: hands step a closure); anything else is an error."""
    param = torch.tensor([1.0, 1.0], requires_grad=True)
    optim = case.build([param])
    seen, calls = [], []

    def closure():
        calls.append(1)
        optim.zero_grad()
        loss = (param ** 2).sum()
        loss.backward()
        return loss

    h1 = optim.register_step_pre_hook(lambda o, a, k: seen.append((o, a, dict(k))) or ((a[0],), {"closure": closure}))
    h2 = optim.register_step_post_hook(lambda o, a, k: seen.append((o, a, dict(k))))
    loss = optim.step()
    assert calls == [1] and torch.equal(loss, torch.tensor(2.0))
    assert seen[0][0] is optim and seen[0][1] == (optim,) and seen[0][2] == {}
    assert seen[1][1] == (optim,) and seen[1][2] == {"closure": closure}
    h1.remove()
    h2.remove()
    optim.register_step_pre_hook(lambda o, a, k: 1)
    with pytest.raises(RuntimeError, match="must return None or a tuple"):
        optim.step()


def test_a_subclass_whose_step_calls_super_runs_the_hooks_once():
    """Each class's step is wrapped (hooks, profiler label); a subclass overriding step and calling
    super().step() must not run the hooks twice (torch's own wrapper patches only the instance's class)."""

    class Logged(HomogenizedSGD):
        def step(self, closure=None):
            self.calls = getattr(self, "calls", 0) + 1
            return super().step(closure)

    p = TeacherProblem.sparse(8, 0.25, seed=0)
    m = DiagonalLinearNetwork(8)
    opt = Logged(m.parameters(), lr=0.1, batch_size=1, noise=StructuredNoise(p, m), seed=0)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    p.population_risk(m.beta).backward()
    opt.step()
    assert seen == ["pre", "post"] and opt.calls == 1
    with torch.profiler.profile() as prof:
        opt.step()
    assert sum(e.name == "Optimizer.step#Logged.step" for e in prof.events()) == 1
    assert opt.state_dict()["sde_optim"]["steps"] == 2


@cases()
def test_step_carries_torchs_profiler_label_only_while_profiling(case, monkeypatch):
    """The trace of torch.profiler names the step 'Optimizer.step#<class>.step' as torch's wrapper
    does; outside the profiler no record_function scope is entered (it costs per operation)."""
    param = torch.tensor([1.0, 1.0], requires_grad=True)
    optim = case.build([param])
    param.grad = torch.ones_like(param)
    with torch.profiler.profile() as prof:
        optim.step()
    names = {e.name for e in prof.events()}
    assert f"Optimizer.step#{type(optim).__name__}.step" in names
    if not isinstance(optim, SGD):
        entered = []
        original = torch.autograd.profiler.record_function
        monkeypatch.setattr(torch.autograd.profiler, "record_function",
                            lambda *a, **k: entered.append(a) or original(*a, **k))
        optim.step()
        assert entered == []


@cases()
def test_step_all_hooks(case):
    """test_step_all_hooks"""
    params = [torch.tensor([1.0, 1.0])]
    for kwargs in all_inputs():
        optim = case.build(params, **kwargs)
        optim2 = SGD(params)
        data = []
        handles = [register_optimizer_step_pre_hook(lambda o, a, k: data.append(0)),
                   register_optimizer_step_post_hook(lambda o, a, k: data.append(5))]
        for o in (optim, optim2):
            handles += [o.register_step_pre_hook(lambda o, a, k: data.append(1)),
                        o.register_step_post_hook(lambda o, a, k: data.append(2))]
        try:
            optim.step()
            assert data == [0, 1, 2, 5]
            optim2.step()
            assert data == [0, 1, 2, 5, 0, 1, 2, 5]
            optim.step()
            assert data == [0, 1, 2, 5, 0, 1, 2, 5, 0, 1, 2, 5]
        finally:
            for h in handles:
                h.remove()
        optim.step()
        optim2.step()
        assert data == [0, 1, 2, 5, 0, 1, 2, 5, 0, 1, 2, 5]


@cases()
def test_deepcopy_copies_all_public_attrs(case):
    """test_deepcopy_copies_all_public_attrs"""
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)

    def public(obj):
        return {k for k in obj.__dict__ if not k.startswith("_")}

    for kwargs in all_inputs():
        optimizer = case.build(params, **kwargs)
        for _ in range(3):
            optimizer.step()
        assert public(optimizer) == public(copy.deepcopy(optimizer))


@cases()
def test_non_empty_state(case):
    """test_non_empty_state"""
    model = nn.Linear(5, 5)
    inpt = torch.rand(2, 5)
    for kwargs in sgd_inputs():
        optim = case.build(model.parameters(), **kwargs)
        optim.zero_grad()
        model(inpt).sum().backward()
        optim.step()
        for state in optim.state.values():
            assert len(state) > 0


# ----------------------------------------------------------------------------- test_lrscheduler.py
class _SchedulerTestNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 1, 1)
        self.conv2 = nn.Conv2d(1, 1, 1)


def _scheduler_opt(case):
    """TestLRScheduler.setUp: two groups, the second with a tensor lr."""
    net = _SchedulerTestNet()
    return case.build([{"params": net.conv1.parameters()}, {"params": net.conv2.parameters(), "lr": torch.tensor(0.5)}],
                      lr=0.05)


def _check_lrs(opt, targets, epoch):
    for param_group, target in zip(opt.param_groups, targets):
        assert float(param_group["lr"]) == pytest.approx(target[epoch], abs=1e-5)


def _run_scheduler(opt, scheduler, targets, epochs=10):
    """TestLRScheduler._test"""
    for epoch in range(epochs):
        _check_lrs(opt, targets, epoch)
        opt.step()
        scheduler.step()


@cases()
def test_lr_schedulers(case):
    """test_step_lr, test_multi_step_lr, test_exp_lr, test_cos_anneal_lr, test_linearlr, test_sequentiallr1"""
    epochs = 10
    eta_min = 1e-10
    linear = [0.5 + i * 0.5 / 4 for i in range(4)]
    expected = {
        "step": ([0.05] * 3 + [0.005] * 3 + [0.0005] * 3 + [0.00005] * 3, lambda o: StepLR(o, gamma=0.1, step_size=3)),
        "multistep": ([0.05] * 2 + [0.005] * 3 + [0.0005] * 4 + [0.00005] * 3,
                      lambda o: MultiStepLR(o, gamma=0.1, milestones=[2, 5, 9])),
        "exp": ([0.05 * (0.9**x) for x in range(epochs)], lambda o: ExponentialLR(o, gamma=0.9)),
        "cos": ([eta_min + (0.05 - eta_min) * (1 + math.cos(math.pi * x / epochs)) / 2 for x in range(epochs)],
                lambda o: CosineAnnealingLR(o, T_max=epochs, eta_min=eta_min)),
        "linear": ([x * 0.05 for x in linear] + [0.05] * (epochs - 4), lambda o: LinearLR(o, start_factor=0.5, total_iters=4)),
    }
    for single_targets, make in expected.values():
        opt = _scheduler_opt(case)
        _run_scheduler(opt, make(opt), [single_targets, [x * epochs for x in single_targets]], epochs)
    opt = _scheduler_opt(case)
    targets = [[0.05, 0.04, 0.032] + [0.05] * 4 + [0.005] * 4 + [0.0005] * 4 + [0.00005] * 4]
    sched = SequentialLR(opt, schedulers=[ExponentialLR(opt, gamma=0.8), StepLR(opt, gamma=0.1, step_size=4)],
                         milestones=[3])
    _run_scheduler(opt, sched, targets, 19)


@cases()
def test_reduce_lr_on_plateau_preserves_lr_type(case):
    """test_reduce_lr_on_plateau_preserves_lr_type: a tensor lr stays a tensor (no recompilation)"""
    opt = _scheduler_opt(case)
    types = [type(group["lr"]) for group in opt.param_groups]
    scheduler = ReduceLROnPlateau(opt, mode="min", patience=0)
    scheduler.step(1.0)
    scheduler.step(2.0)
    assert [type(group["lr"]) for group in opt.param_groups] == types


@cases()
def test_onecycle_lr_cycles_momentum(case):
    """test_onecycle_lr_linear_annealing (_test_cycle_lr): momentum is in our defaults, so the
    cycling schedulers drive it as they drive SGD's."""
    lr_target = [1, 13, 25, 21.5, 18, 14.5, 11, 7.5, 4, 0.5]
    momentum_target = [22, 11.5, 1, 4, 7, 10, 13, 16, 19, 22]
    opt = _scheduler_opt(case)
    scheduler = OneCycleLR(opt, max_lr=25, final_div_factor=2, base_momentum=1, max_momentum=22, total_steps=10,
                           anneal_strategy="linear")
    for batch_num in range(10):
        for group in opt.param_groups:
            assert float(group["lr"]) == pytest.approx(lr_target[batch_num], abs=1e-5)
            assert float(group["momentum"]) == pytest.approx(momentum_target[batch_num], abs=1e-5)
        opt.step()
        scheduler.step()


@cases()
def test_scheduler_warnings(case):
    """test_new_pattern_no_warning, test_old_pattern_warning: the schedulers' step-order check sees our step()"""
    opt = _scheduler_opt(case)
    scheduler = StepLR(opt, gamma=0.1, step_size=3)
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        for _ in range(35):
            opt.step()
            scheduler.step()
    assert len(ws) == 0, "No warning should be raised"
    opt = _scheduler_opt(case)
    scheduler = StepLR(opt, gamma=0.1, step_size=3)
    with pytest.warns(UserWarning, match=r"how-to-adjust-learning-rate"):
        for _ in range(35):
            scheduler.step()
            opt.step()


def test_no_cyclic_references():
    """test_no_cyclic_references, for every case: the optimizer (and its scheduler) are freed by
    reference counting alone. Garbage of earlier tests is collected once and the survivors frozen,
    so that each final collect sees only what this test made (and is fast)."""
    gc.collect()
    gc.freeze()
    try:
        for case in CASES:
            param = Parameter(torch.zeros(10))
            optim = case.build([param], lr=0.5)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optim, lambda epoch: 1.0)
            del scheduler
            assert len(gc.get_referrers(optim)) == 0, f"{case.name}: optimizer should contain no cyclic references"
            del optim
            assert gc.collect() == 0, f"{case.name}: optimizer should be garbage-collected on __del__"
    finally:
        gc.unfreeze()


@cases()
@pytest.mark.parametrize("weights_only", [True, False])
def test_lr_scheduler_state_dict_load(case, weights_only):
    """test_lr_scheduler_state_dict_load (the schedulers that touch optimizer hyperparameters)"""
    for make in (lambda o: StepLR(o, step_size=30), lambda o: ReduceLROnPlateau(o),
                 lambda o: CyclicLR(o, base_lr=0.01, max_lr=0.1),
                 lambda o: OneCycleLR(o, max_lr=0.01, total_steps=10, anneal_strategy="linear")):
        opt = _scheduler_opt(case)
        scheduler = make(opt)
        state_dict = scheduler.state_dict()
        with tempfile.TemporaryFile() as f:
            torch.save(state_dict, f)
            f.seek(0)
            loaded = torch.load(f, weights_only=weights_only)
        assert_equal(state_dict, loaded)
        scheduler2 = make(opt)
        scheduler2.load_state_dict(loaded)
        assert_equal(scheduler2.state_dict(), state_dict)
