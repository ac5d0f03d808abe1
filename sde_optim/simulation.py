"""Reference runs on a teacher: streaming SGD, homogenized SGD and SVAG, observables over time.

These are the measurements every prediction is checked against (tests, benchmarks, the CLI's
``compare`` and the examples): each uses the real optimizer class in an ordinary loop.
SGD time ``t = k / d`` (THEORY E2). Every function returns ``{observable: (n,) tensor}`` with
the exact observables (E7, :func:`~sde_optim.measure`) at SGD steps
``0, record_every, 2 record_every, ...`` up to ``steps`` (``n = steps // record_every + 1``).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor

from ._validation import check_int
from .models import DiagonalLinearNetwork
from .observables import measure, resolve_observables
from .optim import SVAG, HomogenizedSGD, StructuredNoise
from .teacher import TeacherProblem

__all__ = ["train_sgd", "train_homogenized", "train_svag", "half_mse"]


def half_mse(model: torch.nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The minibatch loss of THEORY §1: ``mean (f(x) - y)^2 / 2``."""
    return 0.5 * (model(x) - y).pow(2).mean()


def _run(
    problem: TeacherProblem,
    model: DiagonalLinearNetwork,
    update: Callable[[], None],
    *,
    steps: int,
    record_every: int,
    observables: Iterable[str] | str | None,
    updates_per_step: int = 1,
) -> dict[str, Tensor]:
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


def train_sgd(problem: TeacherProblem, *, lr: float, batch_size: int, steps: int, seed: int, alpha: float = 0.1,
              init: str = "unbalanced", record_every: int = 1, observables=None) -> dict[str, Tensor]:
    """Streaming ``torch.optim.SGD``: a fresh minibatch from ``problem.sample`` every step."""
    model = _network(problem, alpha, init)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = _generator(problem, seed)

    def update() -> None:
        x, y = problem.sample(batch_size, generator=gen)
        opt.zero_grad()
        half_mse(model, x, y).backward()
        opt.step()

    return _run(problem, model, update, steps=steps, record_every=record_every, observables=observables)


def train_homogenized(problem: TeacherProblem, *, lr: float, batch_size: int, steps: int, seed: int,
                      noise_scale: float = 1.0, alpha: float = 0.1, init: str = "unbalanced", record_every: int = 1,
                      observables=None) -> dict[str, Tensor]:
    """:class:`~sde_optim.HomogenizedSGD`: exact population gradient as drift, structured noise (E3)."""
    model = _network(problem, alpha, init)
    opt = HomogenizedSGD(model.parameters(), lr=lr, batch_size=batch_size, noise=StructuredNoise(problem, model),
                         noise_scale=noise_scale, generator=_generator(problem, seed))

    def update() -> None:
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
        opt.combine_losses(half_mse(model, x1, y1), half_mse(model, x2, y2)).backward()
        opt.step()

    return _run(problem, model, update, steps=steps, record_every=record_every, observables=observables,
                updates_per_step=check_int("l", l, minimum=1))
