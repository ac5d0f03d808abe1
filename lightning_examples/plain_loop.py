"""Plain PyTorch: one sparse DLN teacher trained with torch.optim.SGD, HomogenizedSGD and SVAG.

Each optimizer is dropped into an ordinary training loop; the script prints the risk
curves side by side against SGD time t = k / d (THEORY E2). Run::

    python lightning_examples/plain_loop.py --dim 1024 --lr 0.5 --horizon 6

The functions ``train_sgd``, ``train_homogenized`` and ``train_svag`` are reused by
``benchmarks/sgd_reproduction.py``.
"""

from __future__ import annotations

import argparse

import torch

from sde_optim import SVAG, DiagonalLinearNetwork, HomogenizedSGD, StructuredNoise, TeacherProblem, measure


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (model(x) - y).pow(2).mean()


def _model(problem: TeacherProblem, alpha: float, init: str) -> DiagonalLinearNetwork:
    return DiagonalLinearNetwork(problem.dim, alpha=alpha, init=init, dtype=problem.dtype, device=problem.device)


def _record(problem, model, out, k, every):
    if k % every == 0:
        out.append(measure(problem, model, "risk")["risk"])


def train_sgd(problem: TeacherProblem, *, lr: float, batch_size: int, steps: int, seed: int,
              alpha: float = 0.1, init: str = "unbalanced", record_every: int = 1) -> torch.Tensor:
    """Streaming ``torch.optim.SGD`` (fresh samples every step); risk every ``record_every`` steps."""
    model = _model(problem, alpha, init)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator(device=problem.device).manual_seed(seed)
    risks: list[torch.Tensor] = []
    for k in range(steps + 1):
        _record(problem, model, risks, k, record_every)
        if k == steps:
            break
        x, y = problem.sample(batch_size, generator=gen)
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
    return torch.stack(risks)


def train_homogenized(problem: TeacherProblem, *, lr: float, batch_size: int, steps: int, seed: int,
                      noise_scale: float = 1.0, alpha: float = 0.1, init: str = "unbalanced",
                      record_every: int = 1) -> torch.Tensor:
    """HomogenizedSGD with the exact population gradient as drift and structured noise (E3)."""
    model = _model(problem, alpha, init)
    opt = HomogenizedSGD(model.parameters(), lr=lr, batch_size=batch_size, noise=StructuredNoise(problem, model),
                         noise_scale=noise_scale, generator=torch.Generator(device=problem.device).manual_seed(seed))
    risks: list[torch.Tensor] = []
    for k in range(steps + 1):
        _record(problem, model, risks, k, record_every)
        if k == steps:
            break
        opt.zero_grad()
        problem.population_risk(model.beta).backward()
        opt.step()
    return torch.stack(risks)


def train_svag(problem: TeacherProblem, *, lr: float, batch_size: int, steps: int, seed: int, l: int = 4,
               alpha: float = 0.1, init: str = "unbalanced", record_every: int = 1) -> torch.Tensor:
    """SVAG with amplification ``l``: ``l * steps`` updates cover ``steps`` SGD steps of time;
    the risk is recorded every ``record_every`` SGD steps (every ``l * record_every`` updates)."""
    model = _model(problem, alpha, init)
    opt = SVAG(model.parameters(), lr=lr, l=l)
    gen = torch.Generator(device=problem.device).manual_seed(seed)
    risks: list[torch.Tensor] = []
    for k in range(l * steps + 1):
        _record(problem, model, risks, k, l * record_every)
        if k == l * steps:
            break
        (x1, y1), (x2, y2) = problem.sample(batch_size, generator=gen), problem.sample(batch_size, generator=gen)
        opt.zero_grad()
        opt.combine_losses(_loss(model, x1, y1), _loss(model, x2, y2)).backward()
        opt.step()
    return torch.stack(risks)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--noise-std", type=float, default=0.0)
    ap.add_argument("--horizon", type=float, default=6.0, help="SGD time t = steps / dim")
    ap.add_argument("--svag-l", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    problem = TeacherProblem.sparse(args.dim, args.density, noise_std=args.noise_std, seed=args.seed)
    steps = int(args.horizon * args.dim)
    every = max(args.dim // 2, 1)
    common = dict(lr=args.lr, batch_size=args.batch_size, steps=steps, seed=args.seed, record_every=every)
    curves = {
        "SGD": train_sgd(problem, **common),
        "HomogenizedSGD": train_homogenized(problem, **common),
        "gradient descent (noise 0)": train_homogenized(problem, noise_scale=0.0, **common),
        f"SVAG l={args.svag_l}": train_svag(problem, l=args.svag_l, **common),
    }
    print(f"risk on the sparse teacher, d={args.dim}, lr={args.lr}, B={args.batch_size}, noise_std={args.noise_std}")
    print(f"{'t':>6}" + "".join(f"{name:>28}" for name in curves))
    for i in range(len(next(iter(curves.values())))):
        print(f"{i * every / args.dim:6.2f}" + "".join(f"{float(c[i]):28.5g}" for c in curves.values()))


if __name__ == "__main__":
    main()
