"""Plain PyTorch: one sparse DLN teacher trained with torch.optim.SGD, HomogenizedSGD and SVAG.

Each optimizer is dropped into an ordinary training loop; the script prints the risk
curves side by side against SGD time t = k / d (THEORY E2). Run::

    python lightning_examples/plain_loop.py --dim 1024 --lr 0.5 --horizon 6

The loops themselves are ``sde_optim.simulation.train_sgd``, ``train_homogenized`` and
``train_svag``: each a plain loop around the optimizer, worth reading.
"""

from __future__ import annotations

import argparse

from sde_optim import TeacherSpec
from sde_optim.cli import example_parser
from sde_optim.simulation import train_homogenized, train_sgd, train_svag


def parser() -> argparse.ArgumentParser:
    ap = example_parser(__doc__, dim=1024)
    ap.add_argument("--horizon", type=float, default=6.0, help="SGD time t = steps / dim")
    ap.add_argument("--svag-l", type=int, default=4, help="SVAG amplification l")
    ap.add_argument("--seed", type=int, default=0, help="seed of the teacher and of every run")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    try:
        problem = TeacherSpec.from_arguments(args, seed=args.seed).build()
    except (ValueError, TypeError) as exc:
        ap.error(str(exc))
    steps = int(args.horizon * args.dim)
    every = max(args.dim // 2, 1)
    common = dict(lr=args.lr, batch_size=args.batch_size, steps=steps, seed=args.seed, record_every=every)
    curves = {
        "SGD": train_sgd(problem, **common)["risk"],
        "HomogenizedSGD": train_homogenized(problem, **common)["risk"],
        "gradient descent (noise 0)": train_homogenized(problem, noise_scale=0.0, **common)["risk"],
        f"SVAG l={args.svag_l}": train_svag(problem, l=args.svag_l, **common)["risk"],
    }
    print(f"risk on the sparse teacher, d={args.dim}, lr={args.lr}, B={args.batch_size}, noise_std={args.noise_std}")
    print(f"{'t':>6}" + "".join(f"{name:>28}" for name in curves))
    for i in range(len(next(iter(curves.values())))):
        print(f"{i * every / args.dim:6.2f}" + "".join(f"{float(c[i]):28.5g}" for c in curves.values()))


if __name__ == "__main__":
    main()
