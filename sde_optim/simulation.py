"""Streaming SGD on the teacher: the one simulator every prediction is checked against (THEORY §1, §7).

:func:`simulate_sgd` runs ``num_runs`` independent SGD trajectories of a depth-2
:class:`~sde_optim.DiagonalLinearNetwork` at once (fresh Gaussian samples every step, one batch
dimension per run) with ``torch.optim.SGD``'s exact semantics -- learning-rate and batch-size
schedules (E10), momentum, dampening, Nesterov (E11) and coupled weight decay (E12) -- and records
the E7 observables at chosen steps.  Two implementations share the sampling and the recording:

* ``implementation="vectorized"`` (default): the update written out in ``(u, v)`` for all runs at
  once (``u, v`` of shape ``(runs, d)``); fast, used by the benchmarks;
* ``implementation="torch"``: one real ``torch.optim.SGD`` per run on the network's own parameters
  with autograd through ``half_mse``; the reference the vectorized path is tested equal to, step by
  step (``tests/test_simulation.py``).

For a ``"pm"`` network SGD with step ``lr`` on ``(w+, w-)`` is SGD in ``(u, v)`` with gradient step
``lr * lr_scale`` and weight-decay step ``lr * wd`` (the linear change of variables of THEORY §1), so
the vectorized path covers both parametrizations.

:func:`train_sgd`, :func:`train_homogenized` and :func:`train_svag` run one trajectory of SGD,
:class:`~sde_optim.HomogenizedSGD` and :class:`~sde_optim.SVAG` through the real optimizer classes and
return the observables every ``record_every`` steps (``{name: (n,) tensor}``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor

from ._validation import check_choice, check_int
from .curvature import half_mse
from .divergence import BLOWUP_FACTOR, check_blowup_factor, exceeds
from .models import DiagonalLinearNetwork
from .observables import OBSERVABLES, CoordinateState, coordinate_state, measure, resolve_observables
from .optim import SVAG, HomogenizedSGD, StructuredNoise
from .teacher import TeacherProblem
from .theory.dynamics import SGDConfig

__all__ = ["SGDRun", "simulate_sgd", "sgd_step", "train_sgd", "train_homogenized", "train_svag"]


@dataclass
class SGDRun:
    """Observable curves of ``R`` independent SGD runs.

    Attributes:
        steps: recorded SGD step numbers ``(n,)``; t: ``steps / d`` (E2).
        values: name -> ``(R, n)`` per-run curves (measured with the E7 densities).
        diverged: ``(R,)`` bool, runs whose risk became non-finite or exceeded the divergence threshold.
    """

    steps: Tensor
    t: Tensor
    values: dict[str, Tensor]
    diverged: Tensor

    def mean(self, name: str) -> Tensor:
        return self.values[name].mean(0)

    def stderr(self, name: str) -> Tensor:
        """Standard error of :meth:`mean` over runs (``std / sqrt(R)``; 0 for one run)."""
        v = self.values[name]
        return v.std(0) / v.shape[0] ** 0.5 if v.shape[0] > 1 else torch.zeros_like(v[0])


def sgd_step(u: Tensor, v: Tensor, x: Tensor, y: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """One plain SGD step on ``l = (<x, u v> - y)^2 / 2`` averaged over the batch.

    ``u, v``: ``(..., d)``; ``x``: ``(..., B, d)``; ``y``: ``(..., B)``.  Returns the new ``(u, v)``.
    """
    g = _beta_gradient(u * v, x, y)
    return u - gamma * g * v, v - gamma * g * u


def _beta_gradient(beta: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """``(1/B) sum_b (<x_b, beta> - y_b) x_b``: the minibatch gradient with respect to ``beta``, ``(..., d)``."""
    e = torch.matmul(x, beta.unsqueeze(-1)).squeeze(-1) - y  # (..., B)
    return torch.matmul(e.unsqueeze(-2), x).squeeze(-2) / x.shape[-2]


class _Samples:
    """Fresh Gaussian samples ``(x, y)`` of the problem for ``runs`` runs, drawn in blocks of steps.

    The batch size may change with the step; a block never spans a change.  Draws are in
    ``sample_dtype`` (float32 by default: 4x faster on CPU, statistically indistinguishable here) and
    used in the problem's dtype.  Both implementations of :func:`simulate_sgd` read the same stream.
    """

    def __init__(self, problem: TeacherProblem, runs: int, generator, sample_dtype) -> None:
        self.problem, self.runs, self.generator = problem, runs, generator
        self.sample_dtype = sample_dtype or problem.dtype
        self.sd = problem.feature_variance.sqrt()
        self._block: Tensor | None = None
        self._next = 0

    def draw(self, batch: int, upcoming: int) -> tuple[Tensor, Tensor]:
        """``x`` ``(runs, batch, d)``, ``y`` ``(runs, batch)`` for the next step (``upcoming`` steps keep ``batch``)."""
        p = self.problem
        d = p.dim
        if self._block is None or self._next >= self._block.shape[0] or self._block.shape[2] != batch:
            n = max(1, min(upcoming, 256, (1 << 22) // max(1, self.runs * batch * (d + 1))))
            self._block = torch.randn(n, self.runs, batch, d + 1, generator=self.generator, dtype=self.sample_dtype,
                                      device=p.device).to(p.dtype)
            self._next = 0
        z = self._block[self._next]
        self._next += 1
        x = z[..., :d] * self.sd
        return x, x @ p.beta_star + p.noise_std * z[..., d]


@torch.no_grad()
def simulate_sgd(
    problem: TeacherProblem,
    model: DiagonalLinearNetwork,
    *,
    lr=None,
    batch_size=1,
    record_steps: Tensor | Iterable[int],
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    sgd: SGDConfig | None = None,
    num_runs: int = 4,
    observables=None,
    generator: torch.Generator | None = None,
    blowup_factor: float = BLOWUP_FACTOR,
    sample_dtype: torch.dtype | None = torch.float32,
    implementation: str = "vectorized",
) -> SGDRun:
    """Run ``num_runs`` independent SGD trajectories from ``model``'s state (``model`` is not modified).

    The SGD is ``torch.optim.SGD``'s: the keywords (``lr`` and ``batch_size`` may be per-step sequences or
    callables of the step) or ``sgd`` (:class:`~sde_optim.theory.dynamics.SGDConfig`; its ``noise_scale``
    must be 1: this is real SGD).  ``record_steps``: increasing step numbers (0 allowed) at which the E7
    observables are measured.  Runs whose risk has diverged (:mod:`sde_optim.divergence`, checked at the
    recorded steps) are flagged in ``diverged`` and frozen at ``nan``.  ``implementation``: ``"vectorized"``
    or ``"torch"`` (module docstring); both use the same random stream.
    """
    if sgd is None:
        if lr is None:
            raise TypeError("simulate_sgd() needs the SGD: lr=... (with batch_size, momentum, ...) or sgd=SGDConfig(...)")
        sgd = SGDConfig(lr=lr, batch_size=batch_size, momentum=momentum, dampening=dampening, nesterov=nesterov,
                        weight_decay=weight_decay)
    if sgd.noise_scale != 1.0:
        raise ValueError(f"simulate_sgd runs real SGD: sgd.noise_scale must be 1, got {sgd.noise_scale}")
    num_runs = check_int("num_runs", num_runs, minimum=1)
    blowup_factor = check_blowup_factor(blowup_factor)
    implementation = check_choice("implementation", implementation, ("vectorized", "torch"))
    rec = torch.as_tensor(list(record_steps) if not isinstance(record_steps, Tensor) else record_steps, dtype=torch.int64)
    if rec.ndim != 1 or rec.numel() == 0 or bool((rec < 0).any()) or bool((rec[1:] <= rec[:-1]).any()):
        raise ValueError("record_steps must be a non-empty increasing sequence of steps >= 0")
    total = int(rec[-1])
    sgd.lr_schedule(max(total, 1)), sgd.batch_schedule(max(total, 1))  # validate every step up front
    runner = (_Vectorized if implementation == "vectorized" else _TorchSGD)(problem, model, sgd, num_runs)
    samples = _Samples(problem, num_runs, generator, sample_dtype)
    obs = resolve_observables(observables)
    out: dict[str, list[Tensor]] = {o.name: [] for o in obs}
    alive = torch.ones(num_runs, dtype=torch.bool, device=problem.device)
    risk0 = None
    k = 0
    for target in rec.tolist():
        while k < target:
            batch = sgd.batch_at(k)
            upcoming = target - k if isinstance(sgd.batch_size, int) else 1  # a block never spans a change of B
            x, y = samples.draw(batch, upcoming)
            runner.step(sgd.lr_at(k), x, y)
            k += 1
        c = runner.state()
        for o in obs:
            out[o.name].append(o.density(c).mean(-1) + o.offset(problem.noise_std))
        risk = OBSERVABLES["excess_risk"].density(c).mean(-1)  # the divergence test needs no sigma^2 / 2
        risk0 = risk.clamp_min(1e-300) if risk0 is None else risk0
        bad = alive & exceeds(risk, risk0, blowup_factor)
        if bool(bad.any()):  # freeze diverged runs at a non-finite state so they stay flagged
            alive = alive & ~bad
            runner.freeze(alive)
    return SGDRun(rec, rec.to(problem.dtype) / problem.dim, {n: torch.stack(v, dim=1) for n, v in out.items()}, ~alive)


class _Vectorized:
    """``torch.optim.SGD``'s update written out in ``(u, v)`` for all runs (THEORY §7), parameters ``(runs, d)``."""

    def __init__(self, problem: TeacherProblem, model: DiagonalLinearNetwork, sgd: SGDConfig, runs: int) -> None:
        u0, v0 = model.uv_state()
        dtype, dev = problem.dtype, problem.device
        self.u = u0.to(dtype=dtype, device=dev).expand(runs, -1).clone()
        self.v = v0.to(dtype=dtype, device=dev).expand(runs, -1).clone()
        self.problem, self.sgd, self.scale = problem, sgd, float(model.lr_scale)
        self.buf: tuple[Tensor, Tensor] | None = None

    def step(self, lr: float, x: Tensor, y: Tensor) -> None:
        sgd, u, v = self.sgd, self.u, self.v
        e = torch.matmul(x, (u * v).unsqueeze(-1)).squeeze(-1) - y  # (runs, B) residuals
        g = torch.matmul(e.unsqueeze(-2), x).squeeze(-2)  # B times the beta-gradient; lr_scale (pm: J^T J = 2)
        c = self.scale / x.shape[-2]
        if not sgd.weight_decay and not sgd.momentum:  # plain SGD: two fused passes
            self.u, self.v = torch.addcmul(u, g, v, value=-lr * c), torch.addcmul(v, g, u, value=-lr * c)
            return
        g = g * c
        du, dv = g * v, g * u
        if sgd.weight_decay:
            du, dv = du + sgd.weight_decay * u, dv + sgd.weight_decay * v
        if sgd.momentum:
            if self.buf is None:
                self.buf = (du.clone(), dv.clone())
            else:
                self.buf = tuple(b.mul_(sgd.momentum).add_(d, alpha=1.0 - sgd.dampening) for b, d in zip(self.buf, (du, dv)))
            bu, bv = self.buf
            du, dv = (du + sgd.momentum * bu, dv + sgd.momentum * bv) if sgd.nesterov else (bu, bv)
        self.u, self.v = u - lr * du, v - lr * dv

    def state(self):
        return _state(self.problem, self.u, self.v, self.scale)

    def freeze(self, alive: Tensor) -> None:
        nan = torch.full_like(self.u, float("nan"))
        self.u, self.v = torch.where(alive[:, None], self.u, nan), torch.where(alive[:, None], self.v, nan)


class _TorchSGD:
    """One real ``torch.optim.SGD`` per run on a copy of the network, gradients by autograd through ``half_mse``."""

    def __init__(self, problem: TeacherProblem, model: DiagonalLinearNetwork, sgd: SGDConfig, runs: int) -> None:
        u0, v0 = model.uv_state()
        self.problem = problem
        self.nets = [DiagonalLinearNetwork.from_state(u0.to(problem.dtype), v0.to(problem.dtype),
                                                      parametrization=model.parametrization) for _ in range(runs)]
        self.opts = [torch.optim.SGD(n.parameters(), lr=1.0, momentum=sgd.momentum, dampening=sgd.dampening,
                                     nesterov=sgd.nesterov, weight_decay=sgd.weight_decay) for n in self.nets]
        self.scale = float(model.lr_scale)

    def step(self, lr: float, x: Tensor, y: Tensor) -> None:
        for r, (net, opt) in enumerate(zip(self.nets, self.opts)):
            for group in opt.param_groups:
                group["lr"] = lr
            with torch.enable_grad():
                opt.zero_grad()
                half_mse(net, (x[r], y[r])).backward()
            opt.step()

    def state(self):
        states = [coordinate_state(self.problem, n) for n in self.nets]
        stack = lambda name: torch.stack([getattr(c, name) for c in states])  # noqa: E731
        return type(states[0])(states[0].lam, states[0].beta_star, stack("beta"), stack("rho"), stack("q"), self.scale)

    def freeze(self, alive: Tensor) -> None:
        for ok, net in zip(alive.tolist(), self.nets):
            if not ok:
                for p in net.parameters():
                    p.data.fill_(float("nan"))


def _state(problem: TeacherProblem, u: Tensor, v: Tensor, param_scale: float) -> CoordinateState:
    """The :class:`~sde_optim.observables.CoordinateState` of ``(runs, d)`` states (E7 densities)."""
    return CoordinateState.from_uv(problem.spectrum, problem.beta_star, u, v, param_scale)


# ------------------------------------------------------------------------- one trajectory through an optimizer class
def _run(problem: TeacherProblem, model: DiagonalLinearNetwork, update: Callable[[], None], *, steps: int,
         record_every: int, observables: Iterable[str] | str | None, updates_per_step: int = 1) -> dict[str, Tensor]:
    """Call ``update`` ``updates_per_step`` times per SGD step and record every ``record_every`` steps."""
    steps = check_int("steps", steps, minimum=1)
    record_every = check_int("record_every", record_every, minimum=1)
    names = [o.name for o in resolve_observables(observables or ("risk",))]
    out: dict[str, list[Tensor]] = {n: [] for n in names}
    for k in range(steps + 1):
        if k % record_every == 0:
            for n, v in measure(problem, model, names).items():
                out[n].append(v)
        if k < steps:
            for _ in range(updates_per_step):
                update()
    return {n: torch.stack(v) for n, v in out.items()}


def _network(problem: TeacherProblem, alpha: float, init: str) -> DiagonalLinearNetwork:
    return DiagonalLinearNetwork(problem.dim, alpha=alpha, init=init, dtype=problem.dtype, device=problem.device)


def _generator(problem: TeacherProblem, seed: int) -> torch.Generator:
    return torch.Generator(device=problem.device).manual_seed(seed)


def train_sgd(problem: TeacherProblem, *, lr=None, batch_size=1, steps: int, seed: int, alpha: float = 0.1,
              init: str = "unbalanced", record_every: int = 1, observables=None,
              sgd: SGDConfig | None = None) -> dict[str, Tensor]:
    """Streaming ``torch.optim.SGD`` (:func:`simulate_sgd` with ``implementation="torch"``, one run).

    The SGD: ``lr`` and ``batch_size``, or ``sgd`` (:class:`~sde_optim.theory.dynamics.SGDConfig`: schedules,
    momentum, weight decay)."""
    steps = check_int("steps", steps, minimum=1)
    record_every = check_int("record_every", record_every, minimum=1)
    run = simulate_sgd(problem, _network(problem, alpha, init), lr=lr, batch_size=batch_size, sgd=sgd,
                       record_steps=range(0, steps + 1, record_every), num_runs=1, observables=observables or ("risk",),
                       generator=_generator(problem, seed), implementation="torch", sample_dtype=None)
    return {n: v[0] for n, v in run.values.items()}


def train_homogenized(problem: TeacherProblem, *, lr=None, batch_size: int = 1, steps: int, seed: int,
                      noise_scale: float = 1.0, alpha: float = 0.1, init: str = "unbalanced", record_every: int = 1,
                      observables=None, sgd: SGDConfig | None = None, increments: str = "gaussian") -> dict[str, Tensor]:
    """:class:`~sde_optim.HomogenizedSGD`: exact population gradient as drift, structured noise (E3).

    The SGD it simulates: ``lr`` and ``batch_size``, or ``sgd`` (an lr schedule is set on the param group
    before each step, as a scheduler would; the batch size must be constant). ``increments``: the law of
    the noise's standardized draws (:class:`~sde_optim.StructuredNoise`)."""
    if sgd is None:
        sgd = SGDConfig(lr=lr, batch_size=batch_size)
    elif lr is not None:
        raise TypeError("train_homogenized() takes lr=... or sgd=..., not both")
    if not isinstance(sgd.batch_size, int):
        raise ValueError("train_homogenized simulates a constant batch size; got a batch-size schedule")
    model = _network(problem, alpha, init)
    opt = HomogenizedSGD(model.parameters(), lr=sgd.lr_at(0), batch_size=sgd.batch_size,
                         noise=StructuredNoise(problem, model, increments=increments), noise_scale=noise_scale,
                         generator=_generator(problem, seed), momentum=sgd.momentum, dampening=sgd.dampening,
                         nesterov=sgd.nesterov, weight_decay=sgd.weight_decay)
    k = 0

    def update() -> None:
        nonlocal k
        for group in opt.param_groups:
            group["lr"] = sgd.lr_at(k)
        k += 1
        opt.zero_grad()
        problem.population_risk(model.beta).backward()
        opt.step()

    return _run(problem, model, update, steps=steps, record_every=record_every, observables=observables)


def train_svag(problem: TeacherProblem, *, lr: float, batch_size: int, steps: int, seed: int, l: int = 4,
               alpha: float = 0.1, init: str = "unbalanced", record_every: int = 1, observables=None) -> dict[str, Tensor]:
    """:class:`~sde_optim.SVAG` with two fresh minibatches per update; ``l`` updates per SGD step of time."""
    model = _network(problem, alpha, init)
    opt = SVAG(model.parameters(), lr=lr, l=l)
    gen = _generator(problem, seed)

    def update() -> None:
        (x1, y1), (x2, y2) = problem.sample(batch_size, generator=gen), problem.sample(batch_size, generator=gen)
        opt.zero_grad()
        opt.combine_losses(half_mse(model, (x1, y1)), half_mse(model, (x2, y2))).backward()
        opt.step()

    return _run(problem, model, update, steps=steps, record_every=record_every, observables=observables,
                updates_per_step=check_int("l", l, minimum=1))
