"""The stability edge: the predicted critical learning rate against observed divergence of SGD.

The PDE (THEORY E6, E8) predicts the largest learning rate for which the risk stays bounded
over the horizon (``sde_optim.critical_lr``). This script runs plain streaming SGD
(``torch.optim.SGD``) at multiples of it and reports, for each, whether SGD diverged (risk
above ``--blowup`` times its start, or non-finite) and whether the prediction said so.

    python lightning_examples/lr_sweep.py --dim 1024 --horizon 4
"""

from __future__ import annotations

import argparse
import math
import os

import torch

from sde_optim import DiagonalLinearNetwork, TeacherProblem
from sde_optim.plotting import comparison_figure
from sde_optim.simulation import train_sgd
from sde_optim.theory import critical_lr, predict


def main(argv: list[str] | None = None) -> list[tuple[float, bool, bool]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--noise-std", type=float, default=0.0)
    ap.add_argument("--horizon", type=float, default=4.0, help="SGD time t = steps / dim (default 4)")
    ap.add_argument("--factors", default="0.5,0.8,1.25,1.6", help="multiples of the predicted critical lr")
    ap.add_argument("--blowup", type=float, default=1e3, help="divergence threshold on R / R(0) (default 1e3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--png", default=os.path.join("runs", "lr_sweep.png"))
    args = ap.parse_args(argv)
    problem = TeacherProblem.sparse(args.dim, 0.1, noise_std=args.noise_std, seed=args.seed)
    model = DiagonalLinearNetwork(args.dim, dtype=torch.float64)
    steps = int(args.horizon * args.dim)
    crit = critical_lr(problem, model, batch_size=args.batch_size, steps=steps)
    print(f"predicted critical lr over t <= {args.horizon}: {crit.bounded:.4g}"
          + ("" if crit.decay is None else f" (risk decays to zero below {crit.decay:.4g})"))
    print(f"{'factor':>7} {'lr':>9} {'SGD diverged':>13} {'predicted':>10} {'R(end) SGD':>12} {'R(end) PDE':>12}")
    results, predicted_curves, measured = [], {}, {}
    every = max(1, steps // 40)
    for f in (float(s) for s in args.factors.split(",")):
        lr = f * crit.bounded
        pred = predict(problem, model, lr=lr, batch_size=args.batch_size, steps=steps)
        risk = train_sgd(problem, lr=lr, batch_size=args.batch_size, steps=steps, seed=args.seed, record_every=every)["risk"]
        r0 = float(risk[0])
        diverged = not bool(torch.isfinite(risk).all()) or float(risk.nan_to_num(math.inf).max()) > args.blowup * r0
        said = pred.divergence_step is not None
        results.append((lr, diverged, said))
        print(f"{f:7.2f} {lr:9.4g} {str(diverged):>13} {str(said):>10} {float(risk[-1]):12.4g} {float(pred.curves['risk'][-1]):12.4g}")
        label = f"lr={lr:.3g} ({f:g}x)"
        predicted_curves[label] = (pred.steps.tolist(), pred.curves["risk"].clamp(max=args.blowup * r0).tolist())
        measured[label] = {label: (list(range(0, steps + 1, every)), risk.clamp(max=args.blowup * r0).tolist())}
    os.makedirs(os.path.dirname(args.png) or ".", exist_ok=True)
    fig = comparison_figure(predicted_curves, {"SGD": {k: v[k] for k, v in measured.items()}},
                            title=f"risk around the predicted critical lr {crit.bounded:.3g} (d={args.dim}, B={args.batch_size})")
    for ax in fig.axes:
        if ax.has_data():
            ax.set_yscale("log")
    fig.savefig(args.png, dpi=110)
    print(f"figure: {args.png}")
    return results


if __name__ == "__main__":
    main()
