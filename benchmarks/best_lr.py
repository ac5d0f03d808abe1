"""``sde_optim.theory.best_lr`` checked against SGD: the predicted best learning rate for a step budget.

Two settings of ``benchmarks/theory_accuracy.py`` (``make_setting``) with label noise, where the SGD
risk at a fixed budget of ``steps = t_budget * d`` steps has an interior minimum over the learning
rate: too small an lr does not finish the descent within the budget, too large an lr sits on a higher
noise floor (and, past the critical lr, diverges).

* ``two-level-noisy``: two-level spectrum (ratio 4), sparse +-1 teacher, noise 0.1, B = 1, unbalanced
  init; budget t = 4 (half its horizon); 11 lrs from 0.8 to 8 (ratio 10^0.1).  Sharp minimum.
* ``iso-noisy-B4-bal``: isotropic spectrum, sparse +-1 teacher, noise 0.2, B = 4, balanced init;
  budget t = 3 (half its horizon); 10 lrs from 0.5 to 8 (ratio 16^(1/9)).  Flat minimum: the noise
  floor grows slowly with the lr.

In both the best lr lies far below the critical lr (printed as ``lr/lr_c``; ``critical_lr`` over the
same budget): the noise floor rises long before the dynamics become unstable.

For every grid lr, SGD (``sde_optim.simulation.simulate_sgd``, vectorized over ``--seeds`` seeds, fresh
Gaussian samples every step, the same seeds at every lr: common random numbers) gives the risk at the
budget, mean over seeds and its standard error; a diverged run counts as risk = inf.  When
``sde_optim.theory`` exposes ``best_lr``, the script also prints the PDE-predicted risk at the budget at
every grid lr (column ``pred``), calls ``best_lr(problem, model, steps=steps, batch_size=B)``, runs SGD
(same seeds) at its ``lr`` and checks the issue's criterion: the SGD risk there is within 5 % of the best
SGD risk on the grid.  Without ``best_lr`` that comparison is skipped (one line says so).

Printed: one table per d (setting, lr, lr/lr_c, SGD mean risk at the budget, se, diverged runs, pred,
SGD seconds) and one summary line per setting (grid minimum and whether it is interior; with ``best_lr``:
predicted lr and risk, SGD risk at it, excess over the grid's best in %, within 5 % or not).

Usage:
  python benchmarks/best_lr.py --sgd-cache FILE       # d = 16384, 4 seeds: ~50 min on one core (SGD: 1-3 min per
                                                      # lr); ~8 min again from the cache (PDE, critical_lr, best_lr)
  python benchmarks/best_lr.py --dims 1024            # quick look (~4 min)
Flags: --dims, --seeds, --settings NAME..., --points, --tol, --threads, --sgd-cache FILE, --pred, --json PATH
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

from _threads import pin_threads

pin_threads("1")  # before torch loads (benchmarks/_threads.py)

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from theory_accuracy import cached_sgd, fmt, make_setting, table

from sde_optim.theory import critical_lr, predict

try:
    from sde_optim.theory import best_lr
except ImportError:  # being written (issue: best_lr checked against SGD)
    best_lr = None

TOLERANCE = 0.05  # the issue: SGD at the predicted lr within 5 % of the grid's best


def geometric_grid(lo: float, hi: float, num: int) -> list[float]:
    """``num`` learning rates from ``lo`` to ``hi`` (both included), equally spaced in log."""
    return [lo * (hi / lo) ** (i / (num - 1)) for i in range(num)]


# name -> (budget as a fraction of the setting's horizon, lr grid); the grids hold the SGD minimum at d = 16384
SETTINGS = {
    "two-level-noisy": (0.5, geometric_grid(0.8, 8.0, 11)),
    "iso-noisy-B4-bal": (0.5, geometric_grid(0.5, 8.0, 10)),
}


def fingerprint(problem, model) -> str:
    """Short hash of everything SGD depends on in the setting (spectrum, teacher, noise, initial state, lr scale),
    so that a cache entry is never reused for a changed ``make_setting``."""
    h = hashlib.sha1()
    u, v = model.uv_state()
    for x in (problem.feature_variance, problem.beta_star, u, v):
        h.update(x.detach().to(torch.float64).cpu().contiguous().numpy().tobytes())
    h.update(f"{problem.noise_std!r}|{float(model.lr_scale)!r}".encode())
    return h.hexdigest()[:12]


def record_steps(steps: int, points: int) -> torch.Tensor:
    """``points`` steps from 0 to ``steps`` (the last one is the budget)."""
    return torch.linspace(0, steps, points, dtype=torch.float64).round().to(torch.int64).unique()


def sgd_at_budget(args, name: str, problem, model, lr: float, batch: int, steps: int) -> dict:
    """SGD risk at the budget over ``args.seeds`` seeds (memoized in ``--sgd-cache``): mean, standard error, per run."""
    d = problem.dim
    seed = 100 + d
    key = (f"best_lr|{name}|{fingerprint(problem, model)}|d={d}|lr={lr:.12g}|B={batch}|steps={steps}"
           f"|points={args.points}|seeds={args.seeds}|seed={seed}|samples=float32")
    t0 = time.perf_counter()
    run = cached_sgd(args, key, problem=problem, model=model, lr=lr, batch_size=batch,
                     record_steps=record_steps(steps, args.points), num_runs=args.seeds,
                     generator=torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - t0
    final = run.values["risk"][:, -1].clone()
    final[run.diverged] = math.inf  # a diverged run is frozen at nan: it counts as infinite risk
    n = final.numel()
    if bool(torch.isfinite(final).all()):
        mean, se = float(final.mean()), (float(final.std()) / math.sqrt(n) if n > 1 else 0.0)
    else:
        mean, se = math.inf, math.nan
    return {"lr": lr, "mean": mean, "se": se, "runs": final.tolist(), "diverged": int(run.diverged.sum()),
            "sgd_s": seconds, "curve_t": run.t.tolist(), "curve_mean": run.mean("risk").tolist()}


def predicted_risk(args, problem, model, lr: float, batch: int, steps: int) -> float:
    """PDE-predicted risk at the budget (``inf`` when the prediction diverges)."""
    pred = predict(problem, model, lr=lr, batch_size=batch, steps=steps, observables="risk", num_points=args.points,
                   tol=args.tol)
    r = float(pred.curves["risk"][-1])
    return r if pred.divergence_step is None and math.isfinite(r) else math.inf


def run_setting(args, name: str, d: int, rows: list, out: list) -> None:
    """The SGD grid of one setting at dimension ``d``, then (with ``best_lr``) the predicted lr; appends table rows."""
    problem, model, _, batch, horizon = make_setting(name, d)
    fraction, grid = SETTINGS[name]
    t_budget = fraction * horizon
    steps = int(t_budget * d)
    t0 = time.perf_counter()
    crit = critical_lr(problem, model, batch_size=batch, steps=steps).bounded
    t_crit = time.perf_counter() - t0
    print(f"   [{name} d={d}] budget t = {t_budget:g} ({steps} steps), B = {batch}, critical lr {crit:.4g} "
          f"({t_crit:.0f} s); grid {grid[0]:.3g} .. {grid[-1]:.3g} = {grid[0] / crit:.3g}x .. {grid[-1] / crit:.3g}x",
          flush=True)
    with_pred = args.pred or best_lr is not None
    entries = []
    for lr in grid:
        e = sgd_at_budget(args, name, problem, model, lr, batch, steps)
        e["pred"] = predicted_risk(args, problem, model, lr, batch, steps) if with_pred else None
        entries.append(e)
        pred = "" if e["pred"] is None else f", pred {e['pred']:.5g}"
        print(f"   [{name} d={d}] lr {lr:.4g}: SGD {fmt(e['mean'], '.5g')} +- {fmt(e['se'], '.2g')}{pred} "
              f"({e['sgd_s']:.0f} s)", flush=True)
    means = [e["mean"] for e in entries]
    i_best = min(range(len(means)), key=means.__getitem__)
    best = entries[i_best]
    interior = 0 < i_best < len(grid) - 1
    summary = {"setting": name, "d": d, "batch": batch, "t_budget": t_budget, "steps": steps, "critical_lr": crit,
               "critical_s": t_crit, "grid": entries, "grid_best_lr": best["lr"], "grid_best_risk": best["mean"],
               "grid_best_se": best["se"], "grid_best_index": i_best, "interior": interior}

    def row(label: str, e: dict, pred: float | None) -> list:
        rel = e["se"] / e["mean"] if math.isfinite(e["mean"]) else None
        return [name, d, label, f"{e['lr'] / crit:.3f}", fmt(e["mean"], ".5g"), fmt(e["se"], ".2g"), fmt(rel, ".2%"),
                f"{e['diverged']}/{args.seeds}", fmt(pred, ".5g"), f"{e['sgd_s']:.0f}"]

    rows.extend(row(f"{e['lr']:.4g}", e, e["pred"]) for e in entries)
    line = (f"{name} (d = {d}, t = {t_budget:g}): grid minimum SGD {best['mean']:.5g} +- {fmt(best['se'], '.2g')} "
            f"at lr {best['lr']:.4g} (index {i_best} of 0..{len(grid) - 1}: "
            f"{'interior' if interior else 'AT A GRID END -- widen the grid'})")
    if best_lr is None:
        line += "; best_lr comparison skipped (sde_optim.theory has no best_lr yet)"
    else:
        t0 = time.perf_counter()
        res = best_lr(problem, model, steps=steps, batch_size=batch)
        t_best = time.perf_counter() - t0
        lr_b, risk_b, crit_b = float(res.lr), float(res.risk), float(res.critical)
        at = sgd_at_budget(args, name, problem, model, lr_b, batch, steps)
        print(f"   [{name} d={d}] best_lr {lr_b:.4g} ({t_best:.0f} s, predicted {risk_b:.5g}): SGD "
              f"{fmt(at['mean'], '.5g')} +- {fmt(at['se'], '.2g')} ({at['sgd_s']:.0f} s)", flush=True)
        excess = at["mean"] / best["mean"] - 1.0
        ok = excess <= TOLERANCE
        summary.update(best_lr=lr_b, best_lr_predicted_risk=risk_b, best_lr_critical=crit_b, best_lr_s=t_best,
                       sgd_at_best_lr=at, excess=excess, within=ok)
        rows.append(row(f"{lr_b:.4g} *", at, risk_b))
        line += (f"; best_lr {lr_b:.4g} (critical {crit_b:.4g}, predicted risk {risk_b:.5g}, {t_best:.1f} s): "
                 f"SGD there {fmt(at['mean'], '.5g')} +- {fmt(at['se'], '.2g')}, {excess:+.2%} vs the grid's best -> "
                 f"{'within' if ok else 'NOT within'} {TOLERANCE:.0%}")
    summary["line"] = line
    out.append(summary)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[16384], help="dimensions (default 16384)")
    ap.add_argument("--seeds", type=int, default=4, help="SGD seeds per lr (>= 4)")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS), help="settings to run")
    ap.add_argument("--points", type=int, default=21, help="recorded points per SGD run and PDE curve (last = budget)")
    ap.add_argument("--tol", type=float, default=1e-3, help="PDE tolerance of the 'pred' column")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the machine may be shared)")
    ap.add_argument("--sgd-cache", type=str, default=None,
                    help="file memoizing the SGD runs (keyed by setting and its hash, d, lr, B, steps, points, seeds)")
    ap.add_argument("--pred", action="store_true", help="print the PDE-predicted risk even without best_lr")
    ap.add_argument("--json", type=str, default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    if best_lr is None:
        print("sde_optim.theory has no best_lr: the best_lr comparison is skipped (SGD grid only)", flush=True)
    rows: list = []
    out: list = []
    for d in args.dims:
        for name in args.settings:
            run_setting(args, name, d, rows, out)
    table(f"SGD risk at the budget (mean of {args.seeds} seeds, common random numbers across lrs; se = standard error; "
          "'*' = the lr from best_lr, its 'pred' = best_lr's predicted risk)",
          ["setting", "d", "lr", "lr/lr_c", "SGD risk", "se", "se rel", "diverged", "pred", "SGD s"], rows)
    print()
    for s in out:
        print(s["line"])
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s (torch threads = {torch.get_num_threads()})")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "settings": out}, indent=1, default=str))


if __name__ == "__main__":
    main()
