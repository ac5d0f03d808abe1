"""The stability edge: the predicted critical learning rate against observed divergence of SGD.

The PDE (THEORY E6, E8) predicts the largest learning rate for which the risk stays bounded
over the horizon (``sde_optim.critical_lr``). This script runs plain streaming SGD
(``torch.optim.SGD``, --seeds runs) at multiples of it and reports, for each, how many runs
diverged (risk above --blowup times its start, or non-finite) and whether the prediction said so.
The figure (PNG and PDF) has one panel per learning rate: the PDE risk curve, the SGD runs
(mean +- 2 standard errors over seeds), each run drawn up to where it diverges (an x), and
the predicted divergence step (dotted); panels where every SGD run diverges early are zoomed in.

Cost: near the critical lr the PDE needs fine grids (d = 512, t = 2, 0.8x critical, tol 1e-3:
~1900 cells per type and ~20,000 operator evaluations, 75-105 s on one loaded core). The sweep
asks bounded-or-not and draws risk curves, so each row is solved at --tol 1e-2 with at most
--max-cells cells and --max-evaluations operator evaluations; the table prints each row's
estimated PDE error. The critical-lr search itself keeps sde_optim.critical_lr's accuracy.

    python lightning_examples/lr_sweep.py --dim 1024 --horizon 4
    python lightning_examples/lr_sweep.py --dim 512 --horizon 2 --seeds 4 --png runs/sweep.png
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import NamedTuple

import numpy as np
import torch

from sde_optim import DiagonalLinearNetwork, TeacherProblem
from sde_optim.cli import (MAX_DIM, HelpFormatter, check_output_file, check_teacher_support, float_in, int_in,
                           positive_int, progress)
from sde_optim.plotting import draw_panel, finish_figure, grid_shape, mask_divergence, save_figure
from sde_optim.simulation import train_sgd
from sde_optim.theory import Prediction, critical_lr, predict_sweep

MAX_SGD_STEPS = 10**6  # per run: plain SGD, about 1-3 ms per step on one CPU core
_MAX_RECORDS = 4000  # SGD measurements per run (every step for short runs: divergence is resolved)


class Row(NamedTuple):
    """One learning rate of the sweep: the prediction and the SGD risks (``(seeds, n)``, ``inf`` once diverged)."""

    factor: float
    lr: float
    prediction: Prediction
    steps: list[int]
    risk: np.ndarray
    capped: bool
    sgd_seconds: float

    @property
    def diverged_runs(self) -> int:
        return int((~np.isfinite(self.risk)).any(axis=1).sum())

    @property
    def predicted_divergence(self) -> bool:
        return self.prediction.divergence_step is not None

    def divergence_steps(self) -> list[int]:
        """Predicted divergence step and each diverged run's last finite step."""
        out = [] if self.prediction.divergence_step is None else [self.prediction.divergence_step]
        for run in self.risk:
            if not np.isfinite(run).all():
                out.append(self.steps[max(0, int(np.argmin(np.isfinite(run))) - 1)])
        return out


def _factors(text: str) -> list[float]:
    """argparse type of --factors: comma-separated numbers > 0."""
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        values = []
    if not values or not all(np.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers > 0, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The example's arguments (every one with help and default)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--dim", type=int_in(1, MAX_DIM), default=1024, help="dimension d")
    ap.add_argument("--density", type=float_in(0, 1), default=0.1, help="teacher support fraction")
    ap.add_argument("--batch-size", type=positive_int, default=1, help="SGD batch size B")
    ap.add_argument("--noise-std", type=float_in(0), default=0.0, help="label noise sigma")
    ap.add_argument("--horizon", type=float_in(0, strict=True), default=4.0, help="SGD time t = steps / d")
    ap.add_argument("--factors", type=_factors, default="0.5,0.8,1.25,1.6",
                    help="multiples of the predicted critical lr, comma-separated")
    ap.add_argument("--seeds", type=int_in(1, 64), default=1, help="SGD runs per learning rate")
    ap.add_argument("--blowup", type=float_in(1, strict=True), default=1e3,
                    help="divergence threshold on R / R(0), for SGD and the PDE")
    ap.add_argument("--seed", type=int, default=0, help="teacher seed; SGD run s uses seed + s")
    ap.add_argument("--rel-tol", type=float_in(0, 1, strict=True), default=0.02,
                    help="relative width of the critical-lr bisection bracket")
    ap.add_argument("--tol", type=float_in(0, 1, strict=True), default=1e-2,
                    help="target relative error of each row's PDE risk curve")
    ap.add_argument("--max-cells", type=int_in(8), default=640, help="cap on the PDE grid cells per type of each row")
    ap.add_argument("--max-evaluations", type=positive_int, default=10_000,
                    help="cap on the PDE operator evaluations of each row's grid refinement")
    ap.add_argument("--png", default="runs/lr_sweep.png", help="figure path (.png; a .pdf is written next to it)")
    return ap


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse and cross-check the arguments; a bad combination is an argparse error naming the flags."""
    ap = build_parser()
    args = ap.parse_args(argv)
    steps = int(args.horizon * args.dim)
    try:
        check_teacher_support(args.dim, args.density)
        check_output_file("--png", args.png, ".png")
        if not 1 <= steps <= MAX_SGD_STEPS:
            raise ValueError(f"--horizon {args.horizon:g} at --dim {args.dim} is {steps} SGD steps per run; "
                             f"the sweep accepts 1 to {MAX_SGD_STEPS}")
    except ValueError as exc:
        ap.error(str(exc))
    return args


def predict_rows(problem: TeacherProblem, model: DiagonalLinearNetwork, args: argparse.Namespace, lrs: list[float],
                 steps: int) -> list[Prediction]:
    """The PDE at every learning rate of the sweep, in one batched solve (``predict_sweep``)."""
    options = {"max_cells": args.max_cells, "max_evaluations": args.max_evaluations}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a capped row is marked in the table from its estimate
        return predict_sweep(problem, model, lr=lrs, batch_size=args.batch_size, steps=steps, tol=args.tol,
                             blowup_factor=args.blowup, num_points=min(steps + 1, 401), options=options)


def run_row(problem: TeacherProblem, args: argparse.Namespace, factor: float, lr: float, steps: int,
            pred: Prediction) -> Row:
    """Run SGD at one learning rate next to its prediction ``pred``."""
    start = time.perf_counter()
    every = max(1, steps // _MAX_RECORDS)
    runs = [train_sgd(problem, lr=lr, batch_size=args.batch_size, steps=steps, seed=args.seed + s,
                      record_every=every)["risk"].numpy() for s in range(args.seeds)]
    est = pred.info.get("error_estimate")
    capped = est is not None and est > args.tol
    return Row(factor, lr, pred, list(range(0, steps + 1, every)), mask_divergence(np.stack(runs), args.blowup),
               capped, time.perf_counter() - start)


def sweep_figure(rows: list[Row], crit: float, args: argparse.Namespace, steps: int):
    """One risk panel per learning rate (see :func:`_draw_row`)."""
    import matplotlib.pyplot as plt

    nrows, ncols = grid_shape(len(rows))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.5 * ncols, 2.9 * nrows + 0.6), squeeze=False,
                             layout="constrained")
    for ax, row in zip(axes.flat, rows):
        _draw_row(ax, row, args, steps)
    for ax in list(axes.flat)[len(rows):]:
        fig.delaxes(ax)
    finish_figure(fig, f"SGD around the predicted critical lr {crit:.3g} (d={args.dim}, B={args.batch_size}, "
                       f"sigma={args.noise_std:g}, t <= {args.horizon:g})")
    return fig


def _draw_row(ax, row: Row, args: argparse.Namespace, steps: int) -> None:
    """PDE curve, SGD runs and thresholds of one learning rate.

    When every SGD run diverges within the first quarter of the horizon the panel is zoomed to the
    divergences; without any divergence the runs are thinned to at most 200 recorded steps (every
    step is recorded so that a divergence is resolved, but 4000 noisy points hide the band).
    """
    events = row.divergence_steps()
    zoom = row.diverged_runs == args.seeds and max(events) < steps / 4
    title = f"lr = {row.lr:.3g} = {row.factor:g} x predicted critical"
    if zoom:
        title += " (zoomed" + ("" if row.predicted_divergence else f"; PDE bounded to t = {args.horizon:g}") + ")"
    stride = 1 if events else -(-len(row.steps) // 200)
    draw_panel(ax, "risk", (row.prediction.steps.tolist(), row.prediction.curves["risk"].tolist()),
               {"SGD": (row.steps[::stride], row.risk[:, ::stride])}, dim=args.dim,
               divergence_step=row.prediction.divergence_step, prediction_label="PDE prediction", description=title)
    if events:
        ax.axhline(args.blowup * float(row.risk[0, 0]), color="gray", ls="--", lw=0.8,
                   label=f"divergence threshold {args.blowup:g} R(0)")
    if zoom:
        ax.set_xlim(0, 1.5 * max(events) + 1)


def _print_row(row: Row, seeds: int) -> None:
    pred_end = float(row.prediction.curves["risk"][-1])
    sgd_end = float(np.mean(row.risk[:, -1]))
    said = "no" if row.prediction.divergence_step is None else f"step {row.prediction.divergence_step}"
    est = row.prediction.info.get("error_estimate")
    print(f"{row.factor:7.2f} {row.lr:9.4g} {f'{row.diverged_runs}/{seeds}':>13} {said:>12} {sgd_end:12.4g} "
          f"{pred_end:12.4g} {('-' if est is None else f'{est:.2g}') + ('*' if row.capped else ''):>10} "
          f"{row.sgd_seconds:7.1f}")


def main(argv: list[str] | None = None) -> list[tuple[float, bool, bool]]:
    """Run the sweep; returns ``(lr, SGD diverged in most runs, PDE predicted divergence)`` per factor."""
    args = _parse(argv)
    torch.set_num_threads(1)
    problem = TeacherProblem.sparse(args.dim, args.density, noise_std=args.noise_std, seed=args.seed)
    model = DiagonalLinearNetwork(args.dim, dtype=torch.float64)
    steps = int(args.horizon * args.dim)
    start = time.perf_counter()
    with progress(None, "critical lr (PDE bisection)"):
        crit = critical_lr(problem, model, batch_size=args.batch_size, steps=steps, blowup_factor=args.blowup,
                           rel_tol=args.rel_tol)
    print(f"predicted critical lr over t <= {args.horizon:g}: {crit.bounded:.4g}"
          + ("" if crit.decay is None else f" (risk decays to zero below {crit.decay:.4g})")
          + f"; {crit.evaluations} PDE solves, {time.perf_counter() - start:.1f} s")
    lrs = [factor * crit.bounded for factor in args.factors]
    middle = time.perf_counter()
    with progress(None, f"PDE at {len(lrs)} learning rates (one batched solve)"):
        preds = predict_rows(problem, model, args, lrs, steps)
    print(f"PDE at all {len(lrs)} learning rates in one solve: {time.perf_counter() - middle:.1f} s")
    print(f"{'factor':>7} {'lr':>9} {'SGD diverged':>13} {'PDE diverges':>12} {'R(end) SGD':>12} {'R(end) PDE':>12} "
          f"{'PDE err':>10} {'SGD s':>7}")
    rows = []
    with progress(len(args.factors), "learning rates", unit="lr") as bar:
        for factor, lr, pred in zip(args.factors, lrs, preds):
            rows.append(run_row(problem, args, factor, lr, steps, pred))
            bar.clear()
            _print_row(rows[-1], args.seeds)
            bar.update()
    if any(row.capped for row in rows):
        print("* the grid refinement stopped at --max-cells/--max-evaluations above --tol (a RuntimeWarning of the "
              "solve, silenced here); the estimate is shown")
    written = save_figure(sweep_figure(rows, crit.bounded, args, steps), args.png)
    print(f"total {time.perf_counter() - start:.1f} s; figure: {', '.join(written)}")
    return [(row.lr, 2 * row.diverged_runs > args.seeds, row.predicted_divergence) for row in rows]


if __name__ == "__main__":
    main()
