"""Wall time and peak memory of the main Lightning example from d = 1e4 to 1e6 (issue 15).

Each configuration runs ``lightning_examples/sparse_regression.py --dim d --max-steps N
--optimizer o`` (its defaults otherwise: TheoryMonitor, CurvatureMonitor, streamed validation
once at the end) in a fresh subprocess of this checkout; its peak resident set size is read from
the rusage that ``os.wait4`` returns for that child alone. The number of TheoryMonitor
measurements and the largest relative risk error come from the example's summary. Separately,
the prediction TheoryMonitor computes at fit start (``sde_optim.predict`` at the same d, lr and
horizon) is timed in a subprocess of its own, with its peak memory.

    python benchmarks/lightning_scale.py [--dims 1e4 1e5 1e6] [--max-steps 2000]
                                         [--optimizers sgd homogenized] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREDICT = """
import sys, time, torch
from sde_optim import DiagonalLinearNetwork, TeacherSpec, predict
d, steps = int(sys.argv[1]), int(sys.argv[2])
problem, model = TeacherSpec(d, 0.1).build(), DiagonalLinearNetwork(d, alpha=0.1)
t0 = time.perf_counter()
predict(problem, model, lr=0.5, batch_size=1, steps=steps, observables=("risk", "curvature"))
print(time.perf_counter() - t0)
"""


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MiB of that process, stdout); raises on a non-zero exit."""
    with tempfile.TemporaryFile("w+") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{text[-3000:]}")
    return wall, usage.ru_maxrss / 1024, text  # ru_maxrss is in KiB on Linux


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=float, nargs="+", default=[1e4, 1e5, 1e6], help="dimensions d")
    ap.add_argument("--max-steps", type=int, default=2000, help="optimizer steps per run")
    ap.add_argument("--optimizers", nargs="+", default=["sgd", "homogenized"], help="sgd, homogenized, svag")
    ap.add_argument("--threads", default="1", help="OMP/MKL threads of each run (torch's pools)")
    args = ap.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": args.threads, "MKL_NUM_THREADS": args.threads, "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    import torch  # only for the version line

    print(f"# lightning_examples/sparse_regression.py --max-steps {args.max_steps}, threads={args.threads}, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    print(f"{'d':>9} {'optimizer':>12} {'wall s':>8} {'peak MiB':>9} {'points':>7} {'max risk err':>13}")
    with tempfile.TemporaryDirectory(prefix="sde_optim_scale_") as logdir:
        for d in (int(x) for x in args.dims):
            for optimizer in args.optimizers:
                cmd = [sys.executable, "lightning_examples/sparse_regression.py", "--dim", str(d), "--max-steps",
                       str(args.max_steps), "--optimizer", optimizer, "--accelerator", "cpu", "--logdir", logdir]
                wall, rss, text = _run(cmd, env)
                points = re.search(r"(\d+) measurement\(s\)", text).group(1)
                err = re.search(r"^risk\s+\S+\s+\S+\s+(\S+)", text, re.M).group(1)
                print(f"{d:>9} {optimizer:>12} {wall:8.1f} {rss:9.0f} {points:>7} {err:>13}", flush=True)
        print("# TheoryMonitor's prediction alone (sde_optim.predict, PDE, same horizon), fresh process each")
        print(f"{'d':>9} {'predict s':>10} {'peak MiB':>9}")
        for d in (int(x) for x in args.dims):
            _, rss, text = _run([sys.executable, "-c", PREDICT, str(d), str(args.max_steps)], env)
            print(f"{d:>9} {float(text.strip().splitlines()[-1]):10.2f} {rss:9.0f}", flush=True)


if __name__ == "__main__":
    main()
