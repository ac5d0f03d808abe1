"""HomogenizedSGD's structured step time per coordinate from d = 1e4 to 1e7 (issue 15).

For each dimension ``d`` the DLN (2d parameters, float32), its exact drift and a structured
HomogenizedSGD are built once; ``optimizer.step()`` alone is timed (gradients stay in place),
interleaved with torch.optim.SGD's step and with ``randn(d)`` (the Gaussian draw the step
cannot avoid) on the same machine, median over repetitions. Reported: microseconds per step,
nanoseconds per coordinate ``d``, and the per-coordinate cost relative to the smallest one
over ``d`` (flat = the step has no d-dependent overhead such as fresh temporaries, whose page
faults grow with ``d``). Memory: bytes allocated inside one step (torch profiler, CPU).

    python benchmarks/optimizer_scaling.py [--dims 1e4 1e5 1e6 1e7] [--threads 1] [--momentum 0]
"""

from __future__ import annotations

import argparse
import statistics
import time

from _threads import pin_threads

pin_threads("1")

import torch  # noqa: E402 - after the thread environment

from sde_optim import DiagonalLinearNetwork, HomogenizedSGD, StructuredNoise, TeacherProblem  # noqa: E402


def _allocated_in_step(opt) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages())


def measure(d: int, reps: int, momentum: float) -> dict[str, float]:
    """Median step times (seconds) of SGD, HomogenizedSGD (skip/raise) and randn(d) at dimension d."""
    problem = TeacherProblem.sparse(d, 0.1, seed=0, dtype=torch.float32)
    models, opts = {}, {}
    for kind in ("SGD", "skip", "raise"):
        torch.manual_seed(0)
        m = models[kind] = DiagonalLinearNetwork(d, dtype=torch.float32)
        if kind == "SGD":
            opts[kind] = torch.optim.SGD(m.parameters(), lr=0.5, momentum=momentum)
        else:
            opts[kind] = HomogenizedSGD(m.parameters(), lr=0.5, batch_size=1, noise=StructuredNoise(problem, m),
                                        momentum=momentum, nonfinite=kind)
        problem.population_risk(m.beta).backward()
    z, gen = torch.empty(d), torch.Generator().manual_seed(0)
    inner = max(1, int(2e6 // d))  # about 2e6 coordinates per timing
    fns = {**{k: opts[k].step for k in opts}, "randn": lambda: z.normal_(generator=gen)}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(reps + 1):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            if rep:  # the first round warms up (buffers sized, pages touched)
                times[k].append((time.perf_counter() - t0) / inner)
    out = {k: statistics.median(v) for k, v in times.items()}
    out["alloc skip"] = _allocated_in_step(opts["skip"])
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=float, nargs="+", default=[1e4, 1e5, 1e6, 1e7])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--momentum", type=float, default=0.0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# HomogenizedSGD structured step (float32, momentum={args.momentum}), torch {torch.__version__}, "
          f"threads={torch.get_num_threads()}, median of {args.reps} interleaved repetitions")
    print(f"{'d':>10} {'SGD us':>10} {'randn us':>10} {'skip us':>10} {'raise us':>10} {'skip ns/d':>10} "
          f"{'raise ns/d':>10} {'randn ns/d':>10} {'alloc KiB':>10}")
    rows = []
    for d in (int(x) for x in args.dims):
        r = measure(d, args.reps, args.momentum)
        rows.append((d, r))
        print(f"{d:>10.0e} {r['SGD'] * 1e6:>10.1f} {r['randn'] * 1e6:>10.1f} {r['skip'] * 1e6:>10.1f} "
              f"{r['raise'] * 1e6:>10.1f} {r['skip'] / d * 1e9:>10.2f} {r['raise'] / d * 1e9:>10.2f} "
              f"{r['randn'] / d * 1e9:>10.2f} {r['alloc skip'] / 1024:>10.1f}", flush=True)
    for kind in ("skip", "raise"):
        per = [r[kind] / d for d, r in rows]
        print(f"# {kind}: largest / smallest cost per coordinate over d = {max(per) / min(per):.2f}x")


if __name__ == "__main__":
    main()
