"""How often ``TheoryMonitor``'s departure test fires on plain SGD, which the prediction describes.

A run of SGD at dimension ``d`` strays from the d -> infinity curves by its own finite-d noise (THEORY §1);
the monitor should not call that a departure. For each setting and ``d``: the PDE prediction (``predict``,
default tol, with its one-run scatter ``Prediction.scatter``), ``--runs`` SGD runs (``simulate_sgd``, one
generator seed for the whole table) measured at ``--points`` evenly spaced steps (the monitor's ~32
measurements), and the share of runs that some measurement flags as a departure:

* ``fixed``: ``|R - R_pred| / R_pred > threshold`` (0.25, the rule of releases <= 0.6);
* ``z = k``: ``> max(threshold, k x risk/scatter)`` (``TheoryMonitor.allowance`` with ``scatter_sigmas = k``;
  the default is 5).

Also printed: the largest predicted scatter over the run, the largest ratio of the measured one-run spread
(standard deviation over the runs, relative to the prediction) to the predicted scatter, and whether
``predict`` warned (``FiniteDimensionWarning``). The share's binomial standard error is at most
``0.5 / sqrt(runs)`` (3 % at 256 runs).

Settings (sparse teachers, plain SGD; all inside the theory's assumptions, so every flag is a false alarm):

* ``sparse25-B2``: 25 % +-1 teacher, alpha 0.5, lr 0.5, B = 2, noiseless, t <= 8;
* ``sparse25-noisy-B1``: 25 % +-1 teacher, label noise 0.1, alpha 0.3, lr 1, B = 1, t <= 6;
* ``s6``: THEORY §6 (10 % +-1 teacher, alpha 0.1, lr 0.5, B = 1, noiseless, t <= 10).

Usage:
  python benchmarks/departure_rate.py                 # 256 runs, d = 32 64 256 1024: ~6 min on one core
  python benchmarks/departure_rate.py --runs 64 --dims 64 256
Flags: --runs, --dims, --points, --sigmas, --threads
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from _threads import pin_threads

pin_threads("1")

import torch  # noqa: E402 - after the thread environment

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sde_optim import DiagonalLinearNetwork, TeacherProblem, predict  # noqa: E402
from sde_optim.lightning import TheoryMonitor  # noqa: E402
from sde_optim.simulation import simulate_sgd  # noqa: E402
from sde_optim.theory import FiniteDimensionWarning  # noqa: E402

F64 = torch.float64
SETTINGS = {  # name -> d -> (problem, model, lr, B, horizon t)
    "sparse25-B2": lambda d: (TeacherProblem.sparse(d, 0.25, seed=0), DiagonalLinearNetwork(d, alpha=0.5, dtype=F64),
                              0.5, 2, 8.0),
    "sparse25-noisy-B1": lambda d: (TeacherProblem.sparse(d, 0.25, noise_std=0.1, seed=0),
                                    DiagonalLinearNetwork(d, alpha=0.3, dtype=F64), 1.0, 1, 6.0),
    "s6": lambda d: (TeacherProblem.sparse(d, 0.1, seed=0), DiagonalLinearNetwork(d, alpha=0.1, dtype=F64), 0.5, 1, 10.0),
}


def row(name: str, d: int, args: argparse.Namespace, generator: torch.Generator) -> str:
    problem, model, lr, batch, horizon = SETTINGS[name](d)
    steps = int(horizon * d)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FiniteDimensionWarning)
        pred = predict(problem, model, lr=lr, batch_size=batch, steps=steps)
    warned = any(issubclass(w.category, FiniteDimensionWarning) for w in caught)
    record = torch.linspace(0, steps, args.points).round().long().unique()
    runs = simulate_sgd(problem, model, lr=lr, batch_size=batch, record_steps=record, num_runs=args.runs,
                        generator=generator)
    at = pred.at_step(record.to(F64))
    predicted, scatter = at["risk"], at["risk_scatter"]
    measured = runs.values["risk"].to(F64)
    rel = ((measured - predicted) / predicted).abs()
    spread = (measured.std(0) / predicted)[1:] / scatter[1:]  # t = 0 is exact: no spread either way
    shares = []
    for z in [0.0] + args.sigmas:
        monitor = TheoryMonitor(problem, scatter_sigmas=z)
        allowed = torch.tensor([monitor.allowance(float(s)) for s in scatter], dtype=F64)
        shares.append(float((rel > allowed).any(1).double().mean()))
    cols = " ".join(f"{s:>7.0%}" for s in shares)
    return (f"{name:<18} {d:>5} {float(scatter.max()):>8.2f} {float(spread.max()):>9.2f} {str(warned):>6} {cols}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=256)
    ap.add_argument("--dims", type=int, nargs="+", default=[32, 64, 256, 1024])
    ap.add_argument("--points", type=int, default=33, help="measurements per run")
    ap.add_argument("--sigmas", type=float, nargs="+", default=[3.0, 4.0, 5.0, 6.0])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--threads", default="1")
    args = ap.parse_args()
    torch.set_num_threads(int(args.threads))
    generator = torch.Generator().manual_seed(1)
    print(f"# torch {torch.__version__}, threads={torch.get_num_threads()}, runs={args.runs}, points={args.points}; "
          "share of plain-SGD runs flagged as a departure (threshold 0.25)")
    print(f"{'setting':<18} {'d':>5} {'scatter':>8} {'meas/pred':>9} {'warned':>6} {'fixed':>7} "
          + " ".join(f"{'z=' + format(z, 'g'):>7}" for z in args.sigmas))
    for name in args.settings:
        for d in args.dims:
            print(row(name, d, args, generator), flush=True)


if __name__ == "__main__":
    main()
