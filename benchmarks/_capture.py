"""The Fokker-Planck dynamics ``predict`` builds for a setting of ``theory_accuracy.py``, for probes that solve it
again on grids of their own (``step_speed.py``, ``grid_convergence.py``)."""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager

import sde_optim.theory.fokker_planck as fp
import sde_optim.theory.solvers as solvers
from sde_optim.theory import predict
from theory_accuracy import make_setting


def captured_dynamics(name: str, lr: float | None, d: int, tol: float = 1e-3):
    """``(dynamics, t_out, opts)`` of the solve with the most types that ``predict`` runs on setting ``name`` at ``lr``
    (None: the setting's own) and dimension ``d`` (the type quadrature's finest set; ``opts``: the grid options of
    :func:`~sde_optim.theory.fokker_planck.solve_on_grid` it used, without schedule, budget and progress)."""
    problem, model, own, batch, horizon = make_setting(name, d)
    seen: dict = {}
    original = fp.solve_batch_on_grid

    def capture(dynamics, t_out, n_cells, st, **opts):
        if dynamics.types.num_types > seen.get("types", 0):
            seen.update(types=dynamics.types.num_types, args=(dynamics, t_out, opts))
        return original(dynamics, t_out, n_cells, st, **opts)

    fp.solve_batch_on_grid = solvers.solve_batch_on_grid = capture
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            predict(problem, model, lr=own if lr is None else lr, batch_size=batch, steps=int(horizon * d), tol=tol)
    finally:
        fp.solve_batch_on_grid = solvers.solve_batch_on_grid = original
    dynamics, t_out, opts = seen["args"]
    return dynamics, t_out, {k: v for k, v in opts.items() if k not in ("schedule", "budget", "on_step")}


@contextmanager
def switched(module, name: str, value):
    """``module.name`` set to ``value`` for the block (a path switch such as ``COMPILED_STEP``)."""
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def timed_solve(dynamics, t_out, cells: int, step_tol: float, opts: dict):
    """``(seconds, solution)`` of one :func:`~sde_optim.theory.fokker_planck.solve_on_grid`."""
    t0 = time.perf_counter()
    sol = fp.solve_on_grid(dynamics, t_out, cells, step_tol, **opts)
    return time.perf_counter() - t0, sol
