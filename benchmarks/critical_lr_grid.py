"""critical_lr with and without its grid check, side by side in one process.

For each setting of ``benchmarks/theory_accuracy.py`` (``make_setting``) at dimension ``--dim``:

* **unchecked**: the search on the a priori grid of its tol alone (``options={"num_cells": N0, "step_tol": s0}``,
  the grid that ``predict(..., options={"refine": False})`` uses and every solve of ``critical_lr`` used before the
  check): its answers, PDE solves and seconds;
* **checked**: ``critical_lr`` as it is (each edge carried to finer grids until it moves by at most ``rel_tol``):
  its answers, the grid it ends on, ``grid_estimate``, solves, seconds, and whether it warned;
* with ``--reference CELLS ...``: the bounded edge bisected (to 0.5 %) on fixed grids of these cells (step tolerance
  ``s0``), where the edge converges to.

One thread; every time in the same process, so the ratios compare.

    python benchmarks/critical_lr_grid.py --dim 16384 --settings iso-s6 two-level-noisy
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

from _threads import pin_threads

pin_threads("1")

import torch  # noqa: E402 - after the thread environment

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from theory_accuracy import CONTINUOUS_SETTINGS, make_setting  # noqa: E402

from sde_optim.theory import critical_lr, predict  # noqa: E402
from sde_optim.theory.fokker_planck import grid_level  # noqa: E402

DISCRETE = ["iso-s6", "iso-noisy-B4-bal", "two-level-noisy", "power-law-B2-bal", "pm-two-level-B3"]
TOL = 3e-3  # critical_lr's default


def timed(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
    checks = [str(w.message) for w in caught if str(w.message).startswith("critical_lr: the ")]
    return out, seconds, checks


def edge_on(problem, model, batch, steps, cells: int, step_tol: float, lo: float, hi: float) -> tuple[float, float]:
    """The bounded edge on one fixed grid, bisected from ``[lo, hi]`` (widened until it brackets) to 0.5 %."""
    def bounded(lr):
        return predict(problem, model, lr=lr, batch_size=batch, steps=steps, method="pde", observables=("risk",),
                       num_points=41, tol=TOL, blowup_factor=1e3,
                       options={"num_cells": cells, "step_tol": step_tol}).divergence_step is None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while not bounded(lo):
            lo, hi = lo / 1.5, lo
        while bounded(hi):
            lo, hi = hi, hi * 1.5
        while hi / lo > 1.005:
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if bounded(mid) else (lo, mid)
    return lo, hi


def fmt(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=16384)
    ap.add_argument("--settings", nargs="+", default=DISCRETE, choices=DISCRETE + CONTINUOUS_SETTINGS)
    ap.add_argument("--reference", type=int, nargs="*", default=[], help="cells of fixed grids to bisect the edge on")
    args = ap.parse_args(argv)
    n0, s0 = grid_level(TOL, 20.0, None, 2)
    print(f"# torch {torch.__version__}, threads={torch.get_num_threads()}, d={args.dim}, tol={TOL:g}, rel_tol 0.02; "
          f"first grid {n0} cells, step tolerance {s0:g}")
    print(f"{'setting':<20} {'unchecked':>9} {'decay':>7} {'solves':>6} {'s':>6} | {'checked':>8} {'decay':>7} "
          f"{'cells':>5} {'estimate':>8} {'solves':>6} {'s':>6} {'warned':>6} {'/unchecked':>10}")
    for name in args.settings:
        problem, model, _, batch, horizon = make_setting(name, args.dim)
        steps = int(horizon * args.dim)
        search = dict(batch_size=batch, steps=steps)
        old, t_old, _ = timed(lambda: critical_lr(problem, model, **search, options={"num_cells": n0, "step_tol": s0}))
        new, t_new, checks = timed(lambda: critical_lr(problem, model, **search))
        print(f"{name:<20} {old.bounded:9.4g} {fmt(old.decay):>7} {old.evaluations:6d} {t_old:6.1f} | "
              f"{new.bounded:8.4g} {fmt(new.decay):>7} {new.num_cells:5d} {new.grid_estimate:8.2g} {new.evaluations:6d} "
              f"{t_new:6.1f} {'yes' if checks else 'no':>6} {t_new / t_old:10.2f}", flush=True)
        for message in checks:
            print(f"#   warned: {message[:220]}")
        for cells in args.reference:
            start = time.perf_counter()
            lo, hi = edge_on(problem, model, batch, steps, cells, s0, new.bounded / 1.05, new.bounded * 1.05)
            print(f"#   bounded edge on {cells} cells (step tolerance {s0:g}): [{lo:.4g}, {hi:.4g}] "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
