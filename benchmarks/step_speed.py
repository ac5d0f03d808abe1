"""The Fokker-Planck solve's compiled CPU step against its torch step, per accepted step (issue 12).

``sde_optim/theory/compiled_step.py`` does one MPRK22 step attempt (and the accepted state's statistics) in one
numba call; the torch operations of ``fokker_planck._Grid`` stay the definition and the path on other devices.
For each case the types and cells are those of a real solve: ``predict`` on a setting of
``benchmarks/theory_accuracy.py`` captures its dynamics (the solve with the most types), then one
``solve_on_grid`` at the stated cells and step tolerance is timed on each path, alternated (torch, compiled,
torch, compiled; the minimum of each), one thread, in one process.  The same steps are taken (the errors agree to
rounding); the table says so, and the largest relative difference of the two solves' curves.

    python benchmarks/step_speed.py
"""

from __future__ import annotations

import sys
from pathlib import Path

from _threads import pin_threads

pin_threads("1")

import torch  # noqa: E402 - after the thread environment

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _capture import captured_dynamics, switched, timed_solve  # noqa: E402

import sde_optim.theory.fokker_planck as fp  # noqa: E402

# (setting, lr, d, tol of the capturing predict, cells, step tolerance): small grids (per-step host overhead), the
# near-critical grid of THEORY §6 at lr 8, a grid-check subset and the widest type ladder of issue 10's settings
CASES = [("iso-s6", 0.5, 16384, 0.5, 120, 4e-3), ("iso-s6", 4.0, 4096, 0.5, 480, 1e-3),
         ("iso-s6", 8.0, 4096, 0.5, 3840, 1e-3), ("two-level-noisy", 2.0, 4096, 0.5, 480, 1e-3),
         ("pl-sparse-gauss", 0.5, 16384, 0.5, 240, 1e-3), ("lu-dense-gauss", 0.5, 16384, 1e-2, 60, 0.016)]


def main() -> None:
    print(f"# torch {torch.__version__}, threads={torch.get_num_threads()}")
    print(f"{'setting':<18} {'lr':>4} {'d':>6} {'types':>6} {'cells':>6} {'steps':>6} {'same':>5} {'torch ms/step':>14} "
          f"{'compiled ms/step':>17} {'ratio':>6} {'max rel diff':>13}")
    timed_solve(*captured_dynamics("iso-s6", 0.5, 1024, 0.5)[:2], 24, 1e-2, {})  # load (or compile) the kernels
    for name, lr, d, tol, cells, step_tol in CASES:
        dynamics, t_out, opts = captured_dynamics(name, lr, d, tol)
        runs = {False: [], True: []}
        for compiled in (False, True, False, True):
            with switched(fp, "COMPILED_STEP", compiled):
                runs[compiled].append(timed_solve(dynamics, t_out, cells, step_tol, opts))
        (t_torch, ref), (t_fast, fast) = (min(runs[c], key=lambda r: r[0]) for c in (False, True))
        steps = len(ref.schedule)
        same = steps == len(fast.schedule)
        a, b = ref.answer_curves(), fast.answer_curves()
        diff = float(((a - b).abs() / a.abs().clamp_min(1e-300)).max())
        print(f"{name:<18} {lr:>4g} {d:>6} {dynamics.types.num_types:>6} {ref.xi.numel():>6} {steps:>6} "
              f"{'yes' if same else 'no':>5} {t_torch / steps * 1e3:>14.3f} {t_fast / steps * 1e3:>17.3f} "
              f"{t_torch / t_fast:>6.2f} {diff:>13.1e}", flush=True)


if __name__ == "__main__":
    main()
