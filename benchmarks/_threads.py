"""Pin torch's thread pools from ``--threads N`` on the command line; import before torch.

``torch.set_num_threads`` comes too late for the OpenMP/MKL pools, which are sized when torch
loads: a pool created at the default size keeps spinning between kernels and takes the second
core of a 2-core machine (measured here: step times off by up to 50 %). So the benchmarks set the
environment first, then import torch.
"""

from __future__ import annotations

import os
import sys


def pin_threads(default: str | None = None) -> str | None:
    """Set OMP_NUM_THREADS and MKL_NUM_THREADS (unless already set) to ``--threads`` or ``default``."""
    argv = sys.argv[:-1]
    threads = sys.argv[argv.index("--threads") + 1] if "--threads" in argv else default
    if threads is not None:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, threads)
    return threads
