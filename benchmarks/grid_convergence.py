"""How the cells converge on the same time steps, plain and extrapolated (the grid check's Richardson step, issue 12).

For each case, the Fokker-Planck dynamics ``predict`` builds (``_capture.py``) are solved once with adaptive steps
at the first cell count and ``--step-tol``, then at every other cell count on those steps (replayed, so the solves
differ in the cells only).  Each solve's ``R`` and ``C`` are compared with the extrapolation ``(4 S_2N - S_N) / 3``
of the two finest (largest relative error over the output times with ``R >= 1e-3 R(0)``), and so is the
extrapolation of each consecutive pair; ``ratio`` is how much the plain pair differences shrank (4: second order).
Near the critical lr the plain errors fall 4x per doubling and the extrapolations' 10-20x.

    python benchmarks/grid_convergence.py --dim 16384
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _threads import pin_threads

pin_threads("1")

import torch  # noqa: E402 - after the thread environment

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _capture import captured_dynamics  # noqa: E402

import sde_optim.theory.fokker_planck as fp  # noqa: E402

# (setting, lr): issue 12's rows at 0.8x their critical lr (benchmarks/prediction_speed.py at d = 16384)
CASES = [("iso-s6", 8.09), ("iso-noisy-B4-bal", 51.6), ("two-level-noisy", 21.0)]


def relative(a: torch.Tensor, b: torch.Tensor, ok: torch.Tensor) -> float:
    """Largest relative difference of the ``(2, n)`` curves ``a`` against ``b`` over the times ``ok``."""
    return float(((a - b).abs() / b.abs())[:, ok].max())


def study(name: str, lr: float, d: int, cells: list[int], step_tol: float) -> None:
    dynamics, t_out, opts = captured_dynamics(name, lr, d)
    sols, seconds, schedule = [], [], None
    for n in cells:
        start = time.perf_counter()
        sols.append(fp.solve_on_grid(dynamics, t_out, n, step_tol, schedule=schedule, **opts))
        seconds.append(time.perf_counter() - start)
        schedule = sols[0].schedule
    curves = [s.answer_curves() for s in sols]
    ref = curves[-1] + (curves[-1] - curves[-2]) / 3.0
    ok = ref[0] >= 1e-3 * ref[0, 0]
    print(f"# {name}, lr {lr:g}, d = {d}: {dynamics.types.num_types} types, {len(schedule)} steps (step tolerance "
          f"{step_tol:g}), against the extrapolation of {cells[-2]} and {cells[-1]} cells")
    print(f"{'cells':>6} {'in all':>6} {'s':>6} {'plain err':>10} {'extrap err':>11} {'pair diff':>10} {'ratio':>6}")
    diffs = []
    for i, (n, sol, c) in enumerate(zip(cells, sols, curves)):
        line = f"{n:>6} {sol.xi.numel():>6} {seconds[i]:>6.2f} {relative(c, ref, ok):>10.2e}"
        if i:
            diffs.append(relative(c, curves[i - 1], ok))
            extrap = c + (c - curves[i - 1]) / 3.0
            ratio = f"{diffs[-2] / diffs[-1]:>6.2f}" if len(diffs) > 1 else f"{'':>6}"
            line += f" {relative(extrap, ref, ok):>11.2e} {diffs[-1]:>10.2e} {ratio}"
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=16384)
    parser.add_argument("--cells", type=int, nargs="+", default=[120, 240, 480, 960, 1920, 3840, 7680])
    parser.add_argument("--step-tol", type=float, default=2.5e-4)
    parser.add_argument("--settings", nargs="+", default=None, help="names from CASES (default all)")
    parser.add_argument("--threads", default="1")
    args = parser.parse_args()
    print(f"# torch {torch.__version__}, threads={torch.get_num_threads()}")
    for name, lr in CASES:
        if args.settings is None or name in args.settings:
            study(name, lr, args.dim, args.cells, args.step_tol)


if __name__ == "__main__":
    main()
