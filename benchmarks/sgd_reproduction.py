"""Does HomogenizedSGD (and SVAG) reproduce streaming torch.optim.SGD? (issue: optimizers)

Setting of THEORY §6: isotropic spectrum, 10 % +-1 teacher, unbalanced init alpha = 0.1,
lr = 0.5, batch 1. For noise_std in {0, 0.2} the mean risk curve over S seeds of
HomogenizedSGD (exact drift + structured noise, E3) is compared with that of streaming SGD,
and with noise_scale = 0 (gradient descent on the drift) to show that the noise matters.
SVAG with l in {1, 4, 16} is compared with SGD against SGD time.

Columns: max relative difference of the seed-mean risk curves, and the largest
|z| = |difference of means| / (its Monte Carlo standard error) over the grid points (for
curves that agree, |z| looks like the max of ~N(0,1) over the grid, < ~3.5). Two windows:
"descent", the grid points where SGD's mean excess risk is still >= 10 % of its initial
value (the phase in which the risk falls), and "all", the whole horizon (the tail, where the
excess risk is small and its relative Monte Carlo error with 8 seeds is large).

    python benchmarks/sgd_reproduction.py            # the issue's sizes (~10-20 min on 2 cores)
    python benchmarks/sgd_reproduction.py --quick    # smaller, ~2 min
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from sde_optim import TeacherProblem
from sde_optim.simulation import train_homogenized, train_sgd, train_svag


def _one(job):
    torch.set_num_threads(1)
    kind, dim, noise_std, seed, steps, every, extra = job
    problem = TeacherProblem.sparse(dim, 0.1, noise_std=noise_std, seed=0)
    common = dict(lr=0.5, batch_size=1, steps=steps, seed=1000 + seed, record_every=every)
    if kind == "sgd":
        return train_sgd(problem, **common)["risk"]
    if kind == "homogenized":
        return train_homogenized(problem, noise_scale=extra, **common)["risk"]
    return train_svag(problem, l=extra, **common)["risk"]


def _curves(pool, kind, dim, noise_std, seeds, horizon, extra=None):
    every = max(dim // 8, 1)
    steps = int(horizon * dim)
    jobs = [(kind, dim, noise_std, s, steps, every, extra) for s in range(seeds)]
    runs = torch.stack(list(pool.map(_one, jobs)))
    t = torch.arange(runs.shape[1]) * every / dim
    return t, runs


def compare(a: torch.Tensor, b: torch.Tensor, window: torch.Tensor) -> tuple[float, float]:
    """(max relative difference of seed means, max |z|) over the grid points in ``window``."""
    ma, mb = a.mean(0), b.mean(0)
    se = torch.sqrt(a.var(0) / a.shape[0] + b.var(0) / b.shape[0]).clamp_min(1e-300)
    rel = ((ma - mb).abs() / mb)[window]
    z = ((ma - mb).abs() / se)[window]
    return float(rel.max()), float(z.max())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="d = 512, 4 seeds")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    dim, seeds, horizon = (512, 4, 6.0) if args.quick else (2048, 8, 8.0)
    svag_dim, svag_seeds, svag_horizon = (256, 4, 5.0) if args.quick else (512, 8, 6.0)
    t0 = time.time()
    print(f"# HomogenizedSGD (H) and noise_scale=0 (G) vs streaming SGD (S): d={dim}, {seeds} seeds each, t in [0, {horizon}]")
    print(f"{'noise_std':>9} {'window':>8} {'t_end':>6} | {'H vs S max rel':>14} {'max|z|':>7} | {'G vs S max rel':>14} {'max|z|':>7} | "
          f"{'R(t_end) S':>11} {'H':>10} {'G':>10}")
    with ProcessPoolExecutor(args.workers) as pool:
        for noise_std in (0.0, 0.2):
            t, sgd = _curves(pool, "sgd", dim, noise_std, seeds, horizon)
            _, hom = _curves(pool, "homogenized", dim, noise_std, seeds, horizon, 1.0)
            _, gd = _curves(pool, "homogenized", dim, noise_std, seeds, horizon, 0.0)
            excess = sgd.mean(0) - 0.5 * noise_std**2
            below = (excess < 0.1 * excess[0]).nonzero()
            end = int(below[0]) if len(below) else len(t)  # first grid point past the descent
            descent = torch.arange(len(t)) < end
            for label, window in (("descent", descent), ("all", torch.ones_like(descent))):
                r1, z1 = compare(hom, sgd, window)
                r0, z0 = compare(gd, sgd, window)
                i = int(window.nonzero().max())
                print(f"{noise_std:9.2f} {label:>8} {float(t[i]):6.2f} | {r1:14.2%} {z1:7.2f} | {r0:14.2%} {z0:7.2f} | "
                      f"{float(sgd.mean(0)[i]):11.4g} {float(hom.mean(0)[i]):10.4g} {float(gd.mean(0)[i]):10.4g}")
        print()
        print(f"# SVAG vs SGD against SGD time: d={svag_dim}, {svag_seeds} seeds each, t in [0, {svag_horizon}], noise_std=0")
        print(f"{'l':>4} | {'max rel diff':>12} {'max|z|':>7}")
        t, sgd = _curves(pool, "sgd", svag_dim, 0.0, svag_seeds, svag_horizon)
        window = torch.ones_like(t, dtype=torch.bool)
        for l in (1, 4, 16):
            _, sv = _curves(pool, "svag", svag_dim, 0.0, svag_seeds, svag_horizon, l)
            r, z = compare(sv, sgd, window)
            print(f"{l:4d} | {r:12.2%} {z:7.2f}")
    print(f"\n(wall time {time.time() - t0:.0f} s, {args.workers} worker processes, torch {torch.__version__})")


if __name__ == "__main__":
    main()
