"""The compiled step on each type's reachable cells against the same step on every cell (issue 12).

``compiled_step.RANGES`` (default on) runs each type's solves and statistics on the cells its mass can reach; off,
on every cell of the grid.  The two are the same step bit for bit.  For each case the types are those of a real
solve (``predict`` on a setting of ``benchmarks/theory_accuracy.py`` at that lr captures its dynamics, the solve
with the most types); one ``solve_on_grid`` at the stated cells and step tolerance is timed each way, alternated
(every cell, ranges, every cell, ranges; the minimum of each), one thread, in one process.  The table gives the
share of cells holding mass at the end (what the ranges can skip is the rest, less each range's margin), the
milliseconds per step each way, their ratio, and whether the two solves took the same steps to the same curves
(bit for bit).

    python benchmarks/step_ranges.py
"""

from __future__ import annotations

import sys
from pathlib import Path

from _threads import pin_threads

pin_threads("1")

import torch  # noqa: E402 - after the thread environment

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _capture import captured_dynamics, switched, timed_solve  # noqa: E402

from sde_optim.theory import compiled_step  # noqa: E402

# (setting, lr, d, cells, step tolerance): issue 12's near-critical single predictions at d = 16384 (0.8x the
# critical lr of two-level-noisy and iso-noisy-B4-bal, 0.4x of iso-s6 and power-law-B2-bal) on the cells their grid
# check ends on, and small grids of few and of many types (the ranges' own cost)
CASES = [("two-level-noisy", 17.9, 16384, 2277, 1e-3), ("iso-noisy-B4-bal", 51.6, 16384, 2277, 1e-3),
         ("iso-s6", 4.05, 16384, 2277, 1e-3), ("power-law-B2-bal", 17.25, 16384, 1110, 1e-3),
         ("two-level-noisy", 0.3, 16384, 126, 1e-3), ("pl-sparse-gauss", 0.5, 4096, 126, 1e-3)]


def main() -> None:
    print(f"# torch {torch.__version__}, threads={torch.get_num_threads()}")
    print(f"{'setting':<18} {'lr':>6} {'d':>6} {'types':>6} {'cells':>6} {'steps':>6} {'held':>5} "
          f"{'every cell ms/step':>19} {'ranges ms/step':>15} {'ratio':>6} {'same bits':>9}")
    timed_solve(*captured_dynamics("iso-s6", 0.5, 1024, 0.5)[:2], 24, 1e-2, {})  # load (or compile) the kernels
    for name, lr, d, cells, step_tol in CASES:
        dynamics, t_out, opts = captured_dynamics(name, lr, d)
        runs = {False: [], True: []}
        for ranged in (False, True, False, True):
            with switched(compiled_step, "RANGES", ranged):
                runs[ranged].append(timed_solve(dynamics, t_out, cells, step_tol, opts))
        (t_every, every), (t_ranged, ranged) = (min(runs[r], key=lambda x: x[0]) for r in (False, True))
        steps = len(every.schedule)
        same = every.schedule == ranged.schedule and torch.equal(every.answer_curves(), ranged.answer_curves())
        held = float((every.mass[-1] != 0).double().mean())
        print(f"{name:<18} {lr:>6g} {d:>6} {dynamics.types.num_types:>6} {every.xi.numel():>6} {steps:>6} {held:>5.2f} "
              f"{t_every / steps * 1e3:>19.3f} {t_ranged / steps * 1e3:>15.3f} {t_every / t_ranged:>6.2f} "
              f"{'yes' if same else 'NO':>9}", flush=True)


if __name__ == "__main__":
    main()
