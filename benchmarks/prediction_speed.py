"""How long a prediction takes, alone and as a batched sweep of learning rates (issue 12).

For each setting of ``benchmarks/theory_accuracy.py`` (``make_setting``) at dimension ``--dim``:

* ``critical_lr`` over the setting's horizon (its time, and the answer ``crit``: the largest lr whose risk
  decays when there is no label noise, as in THEORY §6's "decay-critical" lr, else the largest bounded one);
* ``predict`` at the setting's own lr and at ``--fractions`` of ``crit`` (default 0.4, 0.8), default tol;
* ``predict_sweep`` at ``--sweep`` learning rates geometric in ``[0.05, 0.8] x crit`` in one call, its time and
  the ratio to the slowest single prediction of the row (the sweep contains that lr's neighbourhood) and to the
  prediction at 0.8 crit.

One thread (``--threads``, pinned before torch loads); every time in the same process, so the ratios compare.

``--own-only K``: only ``predict`` at each setting's own lr (issue 10's cost), ``K`` times in one process: the
first call (it also loads the compiled kernels: numba's import and on-disk cache, ~0.6 s once per process, more
when they compile on a fresh environment) and the minimum and median of the repeats (the machine is shared).

    python benchmarks/prediction_speed.py --dim 16384 --settings iso-s6 iso-noisy-B4-bal two-level-noisy
    python benchmarks/prediction_speed.py --dim 16384 --own-only 3 --settings pl-sparse-gauss lu-dense-gauss
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

from _threads import pin_threads

pin_threads("1")

import torch  # noqa: E402 - after the thread environment

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from theory_accuracy import CONTINUOUS_SETTINGS, GENERALITY_SETTINGS, make_setting  # noqa: E402

from sde_optim.theory import critical_lr, predict, predict_sweep  # noqa: E402

DISCRETE = ["iso-s6", "iso-noisy-B4-bal", "two-level-noisy", "power-law-B2-bal", "pm-two-level-B3"]


def timed(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
    return out, seconds, len(caught)


def row(name: str, args) -> dict:
    problem, model, lr0, batch, horizon = make_setting(name, args.dim)
    steps = int(horizon * args.dim)
    found, t_crit, _ = timed(lambda: critical_lr(problem, model, batch_size=batch, steps=steps))
    crit = found.decay if found.decay is not None else found.bounded  # noiseless: the lr up to which R decays
    singles = {}
    for label, lr in [("own", lr0)] + [(f"{f:g}c", f * crit) for f in args.fractions]:
        pred, seconds, warned = timed(lambda lr=lr: predict(problem, model, lr=lr, batch_size=batch, steps=steps))
        singles[label] = dict(lr=lr, seconds=seconds, cells=pred.info.get("num_cells"), warnings=warned,
                              error_estimate=pred.info.get("error_estimate"))
    lrs = [crit * 0.05 * (0.8 / 0.05) ** (i / (args.sweep - 1)) for i in range(args.sweep)]
    _, t_sweep, warned = timed(lambda: predict_sweep(problem, model, lr=lrs, batch_size=batch, steps=steps))
    slowest = max(s["seconds"] for s in singles.values())
    return dict(setting=name, dim=args.dim, crit=crit, crit_seconds=t_crit, singles=singles, sweep=args.sweep,
                sweep_seconds=t_sweep, sweep_warnings=warned, sweep_over_slowest=t_sweep / slowest,
                sweep_over_top=t_sweep / singles[f"{args.fractions[-1]:g}c"]["seconds"])


def own_only(args) -> list[dict]:
    """``predict`` at each setting's own lr, ``args.own_only`` times: first, min and median seconds."""
    print(f"{'setting':<22} {'lr':>7} {'first s':>8} {'min s':>6} {'median s':>8} {'cells':>5} {'types':>5} {'warned':>6}")
    rows = []
    for name in args.settings:
        problem, model, lr, batch, horizon = make_setting(name, args.dim)
        runs = [timed(lambda: predict(problem, model, lr=lr, batch_size=batch, steps=int(horizon * args.dim)))
                for _ in range(args.own_only)]
        pred, seconds = runs[0][0], [r[1] for r in runs]
        r = dict(setting=name, dim=args.dim, lr=lr, seconds=seconds, cells=pred.info.get("num_cells"),
                 types=pred.info.get("num_types"), warnings=runs[0][2])
        rows.append(r)
        print(f"{name:<22} {lr:7.3g} {seconds[0]:8.1f} {min(seconds):6.1f} {statistics.median(seconds):8.1f} "
              f"{r['cells']:>5} {r['types']:>5} {r['warnings']:>6}", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=16384)
    ap.add_argument("--settings", nargs="+", default=DISCRETE, choices=DISCRETE + CONTINUOUS_SETTINGS + GENERALITY_SETTINGS)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.4, 0.8], help="lr as fractions of the critical lr")
    ap.add_argument("--sweep", type=int, default=16, help="learning rates in the batched sweep")
    ap.add_argument("--threads", default="1")
    ap.add_argument("--own-only", type=int, default=0, metavar="K",
                    help="only predict at each setting's own lr, K times in one process (first, min, median)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(int(args.threads))
    print(f"# torch {torch.__version__}, threads={torch.get_num_threads()}, d={args.dim}, default tol")
    if args.own_only:
        rows = own_only(args)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return
    labels = ["own"] + [f"{f:g}c" for f in args.fractions]
    print(f"{'setting':<22} {'crit':>7} {'crit s':>7} " + " ".join(f"{'lr ' + x:>9} {'s':>6} {'cells':>5}" for x in labels)
          + f" {'sweep':>5} {'sweep s':>8} {'/slowest':>8} {'/top':>6}")
    rows = []
    for name in args.settings:
        r = row(name, args)
        rows.append(r)
        cols = " ".join(f"{r['singles'][x]['lr']:9.3g} {r['singles'][x]['seconds']:6.1f} {r['singles'][x]['cells']:>5}"
                        for x in labels)
        print(f"{name:<22} {r['crit']:7.3g} {r['crit_seconds']:7.1f} {cols} {r['sweep']:>5} {r['sweep_seconds']:8.1f} "
              f"{r['sweep_over_slowest']:8.2f} {r['sweep_over_top']:6.2f}", flush=True)
    times = [s["seconds"] for r in rows for s in r["singles"].values()]
    print(f"# single predictions: median {statistics.median(times):.1f} s, max {max(times):.1f} s; "
          f"critical_lr: median {statistics.median(r['crit_seconds'] for r in rows):.1f} s, "
          f"max {max(r['crit_seconds'] for r in rows):.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
