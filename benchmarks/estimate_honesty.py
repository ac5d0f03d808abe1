"""Does the PDE's error estimate bound its error, at every tol?  (The grid check's honesty, issues 10 and 12.)

For each case and each ``--tols`` value, ``predict`` at that tol is compared with the same prediction at the
reference tol ``--ref-tol`` (largest relative error of ``R`` and ``C`` over the descent window ``R >= 1e-3 R(0)`` of
the reference); the row says whether the error is within the estimate (``err <= est``, the reference's own estimate
added to the error's allowance: ``ok`` when ``err - est_ref <= est``) and within tol.  A loose tol starts the grid
check on coarse grids, where its assumptions are weakest (a pair far from its asymptotic range; steps that no step
tolerance sets): the place to look for estimates below the error.

Cases: ``section6:LR`` (THEORY §6, d = ``--dim``, t <= 5) or a setting of ``theory_accuracy.py`` (``NAME`` at its
own lr, or ``NAME:LR``), at d = ``--dim``.

    python benchmarks/estimate_honesty.py --dim 1000
    python benchmarks/estimate_honesty.py --dim 2048 --cases pl-sparse-gauss --tols 0.1 0.02 0.01
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from _threads import pin_threads

pin_threads("1")

import torch  # noqa: E402 - after the thread environment

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from theory_accuracy import make_setting  # noqa: E402

from sde_optim import DiagonalLinearNetwork, TeacherProblem  # noqa: E402
from sde_optim.theory import predict  # noqa: E402

DEFAULT_CASES = ["section6:0.5", "section6:2", "section6:4", "section6:8"]


def case(name: str, dim: int) -> tuple[dict, str]:
    """``predict``'s arguments (``tol`` aside) for one case, and its label."""
    base, _, lr = name.partition(":")
    if base == "section6":
        problem = TeacherProblem.sparse(dim, 0.1, noise_std=0.0, seed=0)
        model = DiagonalLinearNetwork(dim, alpha=0.1, dtype=torch.float64)
        return dict(problem=problem, model=model, lr=float(lr), steps=5 * dim), f"THEORY §6, lr {float(lr):g}"
    problem, model, lr0, batch, horizon = make_setting(base, dim)
    lr = float(lr) if lr else lr0
    return (dict(problem=problem, model=model, lr=lr, batch_size=batch, steps=int(horizon * dim)),
            f"{base}, lr {lr:g}")


def error(pred, ref) -> float:
    """Largest relative error of R and C against ``ref`` over its descent window."""
    ok = ref.curves["risk"] >= 1e-3 * ref.curves["risk"][0]
    return max(float(((pred.curves[k] - ref.curves[k]).abs() / ref.curves[k].abs())[ok].max())
               for k in ("risk", "curvature"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=1000)
    ap.add_argument("--cases", nargs="+", default=DEFAULT_CASES)
    ap.add_argument("--tols", nargs="+", type=float, default=[0.1, 0.05, 0.02, 0.01, 3e-3])
    ap.add_argument("--ref-tol", type=float, default=1e-4)
    args = ap.parse_args()
    print(f"# torch {torch.__version__}, threads={torch.get_num_threads()}, d={args.dim}, reference tol {args.ref_tol:g}")
    print(f"{'case':34s} {'tol':>6s} {'s':>6s} {'cells':>6s} {'estimate':>9s} {'error':>9s} {'err<=est':>8s} "
          f"{'<=tol':>6s} {'warned':>6s}")
    for name in args.cases:
        kw, label = case(name, args.dim)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = predict(**kw, tol=args.ref_tol)
        ref_est = ref.info["error_estimate"]
        print(f"# {label}: reference estimate {ref_est:.2g}")
        for tol in args.tols:
            start = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                pred = predict(**kw, tol=tol)
            seconds = time.perf_counter() - start
            est, err = pred.info["error_estimate"], error(pred, ref)
            warned = any("Fokker-Planck" in str(w.message) for w in caught)
            print(f"{label:34s} {tol:6.3g} {seconds:6.1f} {pred.info['num_cells']:6d} {est:9.3g} {err:9.3g} "
                  f"{'yes' if err - ref_est <= est else 'NO':>8s} {'yes' if err <= tol else 'NO':>6s} "
                  f"{'yes' if warned else 'no':>6s}", flush=True)


if __name__ == "__main__":
    main()
