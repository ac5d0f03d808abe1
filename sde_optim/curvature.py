"""Hessian curvature of any ``nn.Module`` loss through Hessian-vector products.

The curvature the theory predicts (THEORY E7) is the trace of the Hessian of the
population risk ``R`` in the parameters ``theta``. For the diagonal linear network
``beta = u * v`` on a teacher with features ``x ~ N(0, diag(h))`` (``h_i = lambda_i / d``)
the Hessian is block diagonal with 2x2 blocks

    H_i = h_i [[v_i^2,                2 beta_i - beta*_i],
               [2 beta_i - beta*_i,   u_i^2            ]],

so ``tr H = sum_i h_i (u_i^2 + v_i^2) = (1/d) sum_i lambda_i rho_i``, which is the
``"curvature"`` observable of :func:`sde_optim.observables.measure`. For a general model
the Hessian is never formed: both estimators below only need products ``H v``.

Conventions shared by every function here:

* ``loss_fn(model, batch) -> 0-d tensor``. The model is called by ``loss_fn`` itself, so
  ``loss_fn`` may use anything of the model (``model(x)``, ``model.beta``, ...); pass e.g.
  ``lambda m, _: problem.population_risk(m.beta)`` to get the Hessian of ``R`` (E7).
  :func:`half_mse` is ``mean((model(x) - y)^2) / 2`` for a batch ``(x, y)`` and
  :func:`supervised_loss` turns a criterion ``(prediction, target)`` into this form.
* The variables are the model's parameters with ``requires_grad=True`` (frozen
  parameters and buffers are constants). Vectors are dicts ``name -> tensor`` keyed like
  :func:`trainable_parameters`, each of the parameter's shape, dtype and device.
* The loss is evaluated with the whole model in eval mode (``model.eval()``): BatchNorm in
  train mode would make the loss depend on batch statistics and every probe would update
  its running statistics, and dropout would make the loss random, so neither has a
  well-defined Hessian. BatchNorm therefore uses its running statistics and dropout is off.
  Every submodule's ``training`` flag is restored afterwards, also on error.
* Nothing is left behind: no ``.grad`` is written (parameters' ``.grad`` are exactly as
  before the call), no autograd graph survives the call, the global RNG is not consumed.
  Randomness comes only from ``generator``, a ``torch.Generator`` on the model's device
  (``None``: a fresh generator seeded with 0, so results are reproducible and a training
  run's random stream is unchanged by a measurement).
* Results are 0-d tensors on the model's device in the parameters' dtype (no host sync).

Two ways to compute ``H v`` (``method``):

* ``"func"``: forward-over-reverse, ``torch.func.jvp(torch.func.grad(L), (theta,), (v,))``
  with ``L(theta) = loss_fn(model with parameters theta, batch)`` built by
  :func:`functional_loss` (``torch.func.functional_call``); the model's own parameters are
  never touched. One forward, one backward and one forward-mode pass per product.
* ``"double_backward"``: ``g = autograd.grad(L, theta, create_graph=True)`` once, then
  ``H v = autograd.grad(g, theta, grad_outputs=v)`` per product (the graph of ``g`` is kept
  for the duration of one estimator call only). Works for models torch.func cannot
  transform (custom ``autograd.Function`` without ``setup_context``/``jvp``, ``.item()``
  or data-dependent control flow in the forward, ...).
* ``"auto"`` (default): ``"func"``, falling back to ``"double_backward"`` with a
  ``RuntimeWarning`` when torch.func raises. A common case: ``F.mse_loss`` /
  ``nn.MSELoss`` with ``reduction="mean"`` fails under forward-over-reverse in current
  torch ("ZeroTensors are immutable", pytorch/pytorch#123996); :func:`half_mse` does not.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from ._validation import check_choice, check_generator, check_int

__all__ = [
    "LossFn",
    "functional_loss",
    "half_mse",
    "hessian_trace",
    "hvp",
    "supervised_loss",
    "top_eigenvalue",
    "trainable_parameters",
]

LossFn = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(model, batch) -> 0-d tensor``."""

_METHODS = ("auto", "func", "double_backward")
_Vector = tuple[Tensor, ...]
_Operator = Callable[[_Vector], _Vector]


# ---------------------------------------------------------------------- losses
def half_mse(model: nn.Module, batch: Any) -> Tensor:
    """``mean((model(x) - y)^2) / 2`` for ``batch = (x, y)``; prediction and target must share a shape."""
    x, y = batch
    pred = model(x)
    if pred.shape != y.shape:
        raise ValueError(f"model(x) has shape {tuple(pred.shape)} but the target has shape {tuple(y.shape)}; they must match")
    return 0.5 * (pred - y).pow(2).mean()


def supervised_loss(criterion: Callable[[Tensor, Tensor], Tensor]) -> LossFn:
    """``loss_fn(model, (x, y)) = criterion(model(x), y)`` for a criterion such as ``nn.MSELoss()``."""

    def loss_fn(model: nn.Module, batch: Any) -> Tensor:
        x, y = batch
        return criterion(model(x), y)

    return loss_fn


# ---------------------------------------------------------------------- parameters
def trainable_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The parameters the Hessian is taken in: ``name -> parameter`` with ``requires_grad=True``."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("model has no parameter with requires_grad=True; the Hessian has no variables")
    return params


class _LossModule(nn.Module):
    """``forward() = loss_fn(model, batch)``, so that ``functional_call`` swaps the model's parameters
    for everything ``loss_fn`` does with the model, not only ``model.forward``."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, batch: Any) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.batch = batch

    def forward(self) -> Tensor:
        return self.loss_fn(self.model, self.batch)


def functional_loss(model: nn.Module, loss_fn: LossFn, batch: Any) -> Callable[[dict[str, Tensor]], Tensor]:
    """``L(params) = loss_fn(model with its parameters replaced by params, batch)``.

    ``params`` maps (a subset of) parameter names of ``model`` to tensors of their shapes;
    unnamed parameters and all buffers keep their current values. Built with
    ``torch.func.functional_call``, so ``L`` is a pure function that torch.func can transform.
    The model's mode is whatever it is when ``L`` is called.
    """
    wrapper = _LossModule(model, loss_fn, batch)

    def loss(params: dict[str, Tensor]) -> Tensor:
        return torch.func.functional_call(wrapper, {f"model.{n}": p for n, p in params.items()}, ())

    return loss


# ---------------------------------------------------------------------- HVP operators
def _func_operator(model: nn.Module, loss_fn: LossFn, batch: Any, names: list[str], theta: _Vector) -> _Operator:
    loss = functional_loss(model, loss_fn, batch)
    grad = torch.func.grad(lambda t: loss(dict(zip(names, t))))

    def matvec(vec: _Vector) -> _Vector:
        return tuple(h.detach() for h in torch.func.jvp(grad, (theta,), (vec,))[1])

    return matvec


def _double_backward_operator(model: nn.Module, loss_fn: LossFn, batch: Any, params: _Vector) -> _Operator:
    loss = loss_fn(model, batch)
    if not loss.requires_grad:  # the loss does not depend on the parameters: H = 0
        return lambda vec: tuple(torch.zeros_like(v) for v in vec)
    grads = torch.autograd.grad(loss, params, create_graph=True, materialize_grads=True)
    live = [i for i, g in enumerate(grads) if g.requires_grad]

    def matvec(vec: _Vector) -> _Vector:
        if not live:  # the loss is linear in the parameters
            return tuple(torch.zeros_like(v) for v in vec)
        return torch.autograd.grad(
            [grads[i] for i in live], params, grad_outputs=[vec[i] for i in live],
            retain_graph=True, materialize_grads=True,
        )

    return matvec


def _auto_operator(model: nn.Module, loss_fn: LossFn, batch: Any, names: list[str], params: _Vector) -> _Operator:
    state: dict[str, _Operator] = {"op": _func_operator(model, loss_fn, batch, names, _detached(params))}

    def matvec(vec: _Vector) -> _Vector:
        if "fallback" in state:
            return state["fallback"](vec)
        try:
            return state["op"](vec)
        except (RuntimeError, NotImplementedError) as exc:
            warnings.warn(
                f"torch.func could not differentiate this model ({type(exc).__name__}: {exc}); "
                "using double backward (autograd.grad with create_graph=True) instead",
                RuntimeWarning, stacklevel=3,
            )
            state["fallback"] = _double_backward_operator(model, loss_fn, batch, params)
            return state["fallback"](vec)

    return matvec


def _operator(model: nn.Module, loss_fn: LossFn, batch: Any, method: str) -> tuple[list[str], _Vector, _Operator]:
    """``(names, parameters, matvec)`` with ``matvec(v) = H v`` for tuples aligned with ``names``."""
    check_choice("method", method, _METHODS)
    named = trainable_parameters(model)
    names, params = list(named), tuple(named.values())
    batch = _to_device(batch, params[0].device)
    if method == "func":
        return names, params, _func_operator(model, loss_fn, batch, names, _detached(params))
    if method == "double_backward":
        return names, params, _double_backward_operator(model, loss_fn, batch, params)
    return names, params, _auto_operator(model, loss_fn, batch, names, params)


# ---------------------------------------------------------------------- context
@contextlib.contextmanager
def _measurement_mode(model: nn.Module) -> Iterator[None]:
    """Whole model in eval mode with gradients enabled; every submodule's mode restored on exit."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("Hessian-vector products need autograd; they cannot run under torch.inference_mode()")
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


# ---------------------------------------------------------------------- public estimators
def hvp(
    model: nn.Module, loss_fn: LossFn, batch: Any, vector: dict[str, Tensor], *, method: str = "auto"
) -> dict[str, Tensor]:
    """One Hessian-vector product ``H v`` of ``theta -> loss_fn(model(theta), batch)``.

    Args:
        vector: ``name -> tensor`` for every name of :func:`trainable_parameters` (shapes of
            the parameters).
        method: ``"auto"``, ``"func"`` or ``"double_backward"`` (module docstring).

    Returns:
        ``name -> (H v)[name]``, detached, shapes of the parameters.
    """
    with _measurement_mode(model):
        names, params, matvec = _operator(model, loss_fn, batch, method)
        missing = set(names) ^ set(vector)
        if missing:
            raise ValueError(f"vector must have exactly the keys of trainable_parameters(model); mismatched: {sorted(missing)}")
        vec = tuple(vector[n].to(dtype=p.dtype, device=p.device) for n, p in zip(names, params))
        return dict(zip(names, matvec(vec)))


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    samples: int,
    generator: torch.Generator | None = None,
    method: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Hutchinson estimate of ``tr H`` with Rademacher probes.

    ``tr H = E[z^T H z]`` for ``z`` with independent +-1 entries; the estimate is the mean of
    ``t_k = z_k^T H z_k`` over ``samples`` probes. Its variance per probe is
    ``2 sum_{i != j} H_ij^2``, so the estimate is exact for a diagonal Hessian (for the DLN,
    THEORY E7, exactly when ``2 beta_i = beta*_i`` for all i).

    Args:
        samples: number of probes (>= 1); cost is ``samples`` Hessian-vector products.
        generator: ``torch.Generator`` on the model's device (``None``: fresh, seeded 0).

    Returns:
        ``(estimate, standard_error)``: 0-d tensors; ``standard_error = std(t) / sqrt(samples)``
        with the unbiased sample std (NaN for ``samples == 1``: one probe says nothing about
        the spread).
    """
    samples = check_int("samples", samples, minimum=1)
    with _measurement_mode(model):
        _, params, matvec = _operator(model, loss_fn, batch, method)
        gen = _generator(generator, params[0].device)
        quad = torch.stack([_dot(z, matvec(z)) for z in (_rademacher(params, gen) for _ in range(samples))])
    if samples == 1:
        return quad[0], torch.full_like(quad[0], float("nan"))
    return quad.mean(), quad.std() / samples**0.5


def top_eigenvalue(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    iters: int,
    generator: torch.Generator | None = None,
    method: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Dominant Hessian eigenvalue by power iteration.

    From a Gaussian start ``v_0`` (unit norm), ``w_k = H v_k``, ``mu_k = <v_k, w_k>``
    (Rayleigh quotient), ``v_{k+1} = w_k / |w_k|``, for ``iters`` products. "Top" means
    largest in absolute value (the eigenvalue power iteration finds), returned with its
    sign; at a minimum (H positive semi-definite) that is the largest eigenvalue. The
    error of ``mu`` after k steps shrinks like ``(|lambda_2| / |lambda_1|)^(2k)``.

    Args:
        iters: number of Hessian-vector products (>= 1).
        generator: ``torch.Generator`` on the model's device for ``v_0`` (``None``: fresh, seeded 0).

    Returns:
        ``(estimate, residual)``: 0-d tensors; ``residual = |H v - mu v|`` for the last unit
        ``v``. H is symmetric, so some eigenvalue lies within ``residual`` of ``mu``
        (and within ``residual^2 / gap`` once ``mu`` is closer to lambda_1 than to the rest).
    """
    iters = check_int("iters", iters, minimum=1)
    with _measurement_mode(model):
        _, params, matvec = _operator(model, loss_fn, batch, method)
        v = _normalized(_gaussian(params, _generator(generator, params[0].device)))
        for _ in range(iters):
            w = matvec(v)
            mu = _dot(v, w)
            residual = _norm(tuple(a - mu * b for a, b in zip(w, v)))
            v = _normalized(w)
    return mu, residual


# ---------------------------------------------------------------------- vector helpers
def _dot(a: _Vector, b: _Vector) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))  # type: ignore[return-value]


def _norm(vec: _Vector) -> Tensor:
    return _dot(vec, vec).sqrt()


def _normalized(vec: _Vector) -> _Vector:
    norm = _norm(vec)
    # H v = 0 leaves v = 0, so the next Rayleigh quotient and residual are 0: correct for H = 0.
    safe = norm.clamp_min(torch.finfo(norm.dtype).tiny)
    return tuple(x / safe for x in vec)


def _rademacher(params: _Vector, gen: torch.Generator) -> _Vector:
    return tuple(
        torch.randint(0, 2, p.shape, generator=gen, device=p.device).to(p.dtype).mul_(2).sub_(1) for p in params
    )


def _gaussian(params: _Vector, gen: torch.Generator) -> _Vector:
    return tuple(torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype) for p in params)


def _detached(params: _Vector) -> _Vector:
    return tuple(p.detach() for p in params)


def _generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    if generator is None:
        return torch.Generator(device=device).manual_seed(0)
    return check_generator(generator, device, "the model's")


def _to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a (nested tuple/list/dict) batch moved to ``device``; anything else as is."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        moved = [_to_device(b, device) for b in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch
