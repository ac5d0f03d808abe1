"""``sde-optim``: predict, compare and find the stability edge from the command line.

    sde-optim predict --dim 4096 --lr 0.5 --horizon 8 --csv pred.csv --png pred.png
    sde-optim compare --dim 2048 --lr 0.5 --horizon 6 --seeds 2 --logdir runs/compare
    sde-optim critical-lr --dim 4096 --batch-size 1 --horizon 10

All sizes are in THEORY's conventions: features x ~ N(0, lambda / d) with mean(lambda) = 1,
SGD time t = k / d (E2); ``--horizon`` is in units of t.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from typing import Sequence

import torch

from .models import DiagonalLinearNetwork
from .observables import OBSERVABLES
from .teacher import TeacherProblem

__all__ = ["main", "build_parser"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _float_in(lo: float, hi: float = math.inf, *, strict: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = math.isfinite(value) and (value > lo if strict else value >= lo) and value <= hi
        if not ok:
            rng = f"{'>' if strict else '>='} {lo}" + ("" if hi == math.inf else f" and <= {hi}")
            raise argparse.ArgumentTypeError(f"expected a number {rng}, got {text!r}")
        return value
    return parse


def _add_problem_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("problem and network")
    g.add_argument("--dim", type=_positive_int, default=2048, help="dimension d (default 2048)")
    g.add_argument("--density", type=_float_in(0, 1), default=0.1, help="teacher support fraction (default 0.1)")
    g.add_argument("--spectrum", choices=["isotropic", "two-level", "power-law"], default="isotropic")
    g.add_argument("--noise-std", type=_float_in(0), default=0.0, help="label noise sigma (default 0)")
    g.add_argument("--alpha", type=_float_in(0), default=0.1, help="initialization scale (default 0.1)")
    g.add_argument("--init", choices=["unbalanced", "balanced"], default="unbalanced")
    g.add_argument("--seed", type=int, default=0, help="teacher seed (default 0)")
    g.add_argument("--batch-size", type=_positive_int, default=1, help="SGD batch size (default 1)")
    g.add_argument("--horizon", type=_float_in(0, strict=True), default=6.0, help="SGD time t = steps / d (default 6)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sde-optim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="predict risk/curvature curves; print a table, write CSV/PNG")
    _add_problem_args(p)
    p.add_argument("--lr", type=_float_in(0, strict=True), default=0.5)
    p.add_argument("--method", choices=["pde", "particles", "ode", "gradient_flow"], default="pde")
    p.add_argument("--observables", default="risk,curvature", help=f"comma-separated, from {', '.join(OBSERVABLES)} or 'all'")
    p.add_argument("--rows", type=_positive_int, default=13, help="table rows (default 13)")
    p.add_argument("--csv", help="write the curves to this CSV file")
    p.add_argument("--png", help="write a figure to this PNG file")

    c = sub.add_parser("compare", help="run SGD and HomogenizedSGD against the PDE; TensorBoard logs and a PNG")
    _add_problem_args(c)
    c.add_argument("--lr", type=_float_in(0, strict=True), default=0.5)
    c.add_argument("--seeds", type=_positive_int, default=2, help="runs per optimizer (default 2)")
    c.add_argument("--points", type=_positive_int, default=48, help="measurements per run (default 48)")
    c.add_argument("--logdir", default="runs/compare", help="TensorBoard directory (default runs/compare)")
    c.add_argument("--png", help="figure path (default LOGDIR/compare.png)")

    k = sub.add_parser("critical-lr", help="predicted largest stable learning rate")
    _add_problem_args(k)
    return ap


def _setup(args) -> tuple[TeacherProblem, DiagonalLinearNetwork, int]:
    problem = TeacherProblem.sparse(args.dim, args.density, spectrum=args.spectrum, noise_std=args.noise_std, seed=args.seed)
    model = DiagonalLinearNetwork(args.dim, alpha=args.alpha, init=args.init, dtype=torch.float64)
    return problem, model, max(1, int(round(args.horizon * args.dim)))


def _observable_names(text: str) -> list[str]:
    if text == "all":
        return list(OBSERVABLES)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in OBSERVABLES]
    if not names or unknown:
        raise ValueError(f"--observables must be names from {', '.join(OBSERVABLES)} or 'all'; got {text!r}")
    return names


def _cmd_predict(args) -> None:
    from .theory import predict

    problem, model, steps = _setup(args)
    names = _observable_names(args.observables)
    pred = predict(problem, model, lr=args.lr, batch_size=args.batch_size, steps=steps, method=args.method, observables=names)
    rows = torch.linspace(0, len(pred.steps) - 1, min(args.rows, len(pred.steps))).round().long().unique()
    print(f"{'step':>9} {'t':>7} " + " ".join(f"{n:>14}" for n in names) + f" {'rate -dlogR/dt':>15}")
    for i in rows.tolist():
        vals = " ".join(f"{float(pred.curves[n][i]):14.6g}" for n in names)
        print(f"{int(pred.steps[i]):9d} {float(pred.t[i]):7.3f} {vals} {float(pred.local_rate[i]):15.4g}")
    if pred.divergence_step is not None:
        print(f"the risk is predicted to diverge at SGD step {pred.divergence_step}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "t", *names, "local_rate"])
            for i in range(len(pred.steps)):
                w.writerow([int(pred.steps[i]), float(pred.t[i]), *(float(pred.curves[n][i]) for n in names), float(pred.local_rate[i])])
        print(f"wrote {args.csv}")
    if args.png:
        from .plotting import comparison_figure

        fig = comparison_figure({n: (pred.steps.tolist(), pred.curves[n].tolist()) for n in names}, {},
                                title=f"{args.method} prediction: d={args.dim}, lr={args.lr}, B={args.batch_size}")
        fig.savefig(args.png, dpi=110)
        print(f"wrote {args.png}")


def _cmd_compare(args) -> None:
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    from .plotting import comparison_figure
    from .simulation import train_homogenized, train_sgd
    from .theory import predict

    problem, model, steps = _setup(args)
    names = ["risk", "curvature"]
    every = max(1, steps // args.points)
    pred = predict(problem, model, lr=args.lr, batch_size=args.batch_size, steps=steps, observables=names)
    runs = {"SGD": train_sgd, "HomogenizedSGD": train_homogenized}
    common = dict(lr=args.lr, batch_size=args.batch_size, steps=steps, record_every=every, alpha=args.alpha,
                  init=args.init, observables=names)
    measured: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    with tqdm(total=len(runs) * args.seeds, desc="runs", disable=None) as bar:
        for label, fn in runs.items():
            curves = []
            for s in range(args.seeds):
                curves.append(fn(problem, seed=1000 + s, **common))
                bar.update()
            xs = list(range(0, steps + 1, every))
            measured[label] = {n: (xs, torch.stack([c[n] for c in curves]).mean(0).tolist()) for n in names}
    os.makedirs(args.logdir, exist_ok=True)
    series = {"pde": {n: (pred.steps.tolist(), pred.curves[n].tolist()) for n in names}, **measured}
    for label, obs in series.items():
        with SummaryWriter(os.path.join(args.logdir, label.lower())) as w:  # one run group: pde, sgd, homogenizedsgd
            for n, (xs, ys) in obs.items():
                for x, y in zip(xs, ys):
                    w.add_scalar(n, y, global_step=int(x))
    png = args.png or os.path.join(args.logdir, "compare.png")
    fig = comparison_figure(series["pde"], measured, title=f"d={args.dim}, lr={args.lr}, B={args.batch_size}, {args.seeds} seeds")
    fig.savefig(png, dpi=110)
    for label in measured:
        xs, ys = measured[label]["risk"]
        rel = max(abs(y - p) / p for y, p in zip(ys, (pred.at_step(x)["risk"] for x in xs)))
        print(f"{label:<16} max relative risk deviation from the PDE: {rel:.2%} (mean of {args.seeds} runs)")
    print(f"TensorBoard: tensorboard --logdir {args.logdir}\nfigure: {png}")


def _cmd_critical_lr(args) -> None:
    from .theory import critical_lr

    problem, model, steps = _setup(args)
    res = critical_lr(problem, model, batch_size=args.batch_size, steps=steps)
    print(f"predicted critical lr (risk bounded over t <= {args.horizon}): {res.bounded:.6g}")
    if res.decay is not None:
        print(f"largest lr for which the risk decays to zero: {res.decay:.6g}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = {"predict": _cmd_predict, "compare": _cmd_compare, "critical-lr": _cmd_critical_lr}[args.command]
    try:
        command(args)
    except (ValueError, TypeError) as exc:
        parser.exit(2, f"sde-optim {args.command}: error: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
