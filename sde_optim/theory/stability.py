"""Where SGD stops being stable: the predicted critical learning rate (THEORY §5, with E10-E12).

:func:`critical_lr` bisects the PDE prediction (:func:`~sde_optim.theory.predict`) in the learning rate,
starting from the cheap E8 estimate :func:`e8_estimate`.  The SGD may carry momentum, weight decay
and schedules (:class:`~sde_optim.theory.dynamics.SGDConfig`): the search scales the whole
learning-rate schedule and reports its peak, and momentum enters through the effective step (E11).
The coordinate types are built once (with the type check of :mod:`.quadrature`, at the E8
estimate) and reused by every solve of the search; where they are many, each edge is found on a coarse a priori set
first and then carried to them.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .._validation import check_float, check_int
from ..divergence import check_blowup_factor
from ..models import DiagonalLinearNetwork
from ..teacher import TeacherProblem
from .dynamics import SGDConfig
from .fokker_planck import grid_level
from .predict import (FiniteDimensionWarning, Prediction, _at_global_minimum, _check_model, _finish, _prepare,
                      _warn_finite_d, predict)
from .quadrature import coordinate_columns, coordinate_types
from .solvers import PDESolver

__all__ = ["CriticalLR", "critical_lr", "e8_estimate"]


@dataclass
class CriticalLR:
    """Predicted critical learning rates (in the network's own ``lr`` units; the peak of a schedule).

    Attributes:
        bounded: largest ``lr`` whose predicted risk stays below ``blowup_factor R(0)`` up to ``steps``.
        decay: (``noise_std = 0`` only) largest ``lr`` for which the predicted risk decays:
            ``R(T) <= decay_fraction R(0)`` and still decreasing at the horizon; else ``None``.
        e8_estimate: the cheap E8 bracket centre (see :func:`critical_lr`).
        rel_tol: relative width of the final bisection brackets.
        evaluations: number of PDE solves.
        finite_d: the finite-``d`` indicators of the solve at ``bounded`` (:func:`~.statistics.finite_d_indicators`,
            largest over its descent window, as a prediction's ``info["finite_d"]``): how far SGD at this ``d`` and
            at the answer is from the limit the answer is computed in (``{}`` when the solve reports none).
        grid_estimate: the relative change of the edges between the last two grids of the grid check (space and
            time added, the larger of the two edges; at most about ``rel_tol`` per source when the check held, see
            :func:`critical_lr`); None on a grid fixed by ``options={"num_cells": ...}`` (no check).
        num_cells: the cells of the grid ``bounded`` was found on.
    """

    bounded: float
    decay: float | None
    e8_estimate: float
    rel_tol: float
    evaluations: int
    finite_d: dict[str, float] = field(default_factory=dict)
    grid_estimate: float | None = None
    num_cells: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _EdgeGrids:
    """The grids ``(cells, step tolerance)`` of :func:`critical_lr`'s edge check.

    The first is the a priori grid of ``tol`` (:func:`~.fokker_planck.grid_level`'s level 2: ``predict`` with
    ``refine=False``); a refinement in space doubles the cells, up to ``max_cells`` in ``options`` (default
    :attr:`SPACE_LEVELS` doublings of the first grid: an edge that needs more is warned, not chased for minutes), one
    in time divides the step tolerance by 4 (at most :attr:`TIME_LEVELS` times).  ``options={"num_cells": N}`` fixes
    the grid: no check.
    """

    SPACE_LEVELS, TIME_LEVELS = 2, 2

    def __init__(self, tol: float, options: dict[str, Any]) -> None:
        o = {**PDESolver.defaults, **options}
        self.base, self.fixed = options, o["num_cells"]
        if self.fixed is not None:
            self.first = (self.fixed, o["step_tol"] if o["step_tol"] is not None else tol)
        else:
            self.first = grid_level(tol, o["half_width"], o["step_tol"], 2, o["max_cells"])
        self.max_cells = o["max_cells"] if "max_cells" in options else min(o["max_cells"],
                                                                            self.first[0] * 2**self.SPACE_LEVELS)

    def options(self, grid: tuple[int, float]) -> dict[str, Any]:
        """The solver options of one solve on ``grid``."""
        return {**self.base, "num_cells": grid[0], "step_tol": grid[1]}

    def refined(self, grid: tuple[int, float], source: str) -> tuple[int, float] | None:
        """``grid`` refined in ``source`` ("space" or "time"), or None past the cap."""
        cells, st = grid
        if source == "space":
            return (2 * cells, st) if 2 * cells <= self.max_cells else None
        floor = self.first[1] / 4.0**self.TIME_LEVELS
        return (cells, st / 4.0) if st / 4.0 >= floor * (1.0 - 1e-9) else None

    def cap(self, source: str) -> str:
        if source == "space":
            return f"max_cells={self.max_cells}" + ("" if "max_cells" in self.base else " (the check's default: "
                                                     f"{2**self.SPACE_LEVELS}x the first grid; options max_cells)")
        return f"{self.TIME_LEVELS} step-tolerance refinements"

    @staticmethod
    def describe(grid: tuple[int, float]) -> str:
        return f"{grid[0]} cells, step tolerance {grid[1]:.2g}"


def e8_estimate(problem: TeacherProblem, model: DiagonalLinearNetwork, batch_size: float) -> float:
    """Cheap E8 estimate of the critical ``gamma`` (in ``(u, v)`` units, the momentum-effective step of E11).

    Near the teacher each coordinate is a linear regression with feature scale
    ``lam * rho*`` (``rho* = 2|beta*|`` once ``q`` is small), whose critical step is
    ``2B / mean(lam rho*)`` (E9 with the curvature in place of ``mean(lam)``); at the start E8's
    bracket ``-gamma S1 + gamma^2 R/B (S2 + 2 S3)`` changes sign at ``B S1 / (R (S2 + 2 S3))``.
    The smaller of the two (when defined) is the estimate.
    """
    types = coordinate_types(problem.to(dtype=torch.float64), model)
    c_star = float((types.weight * types.lam * torch.sqrt(types.q0**2 + 4 * types.beta_star**2)).sum())
    cands = []
    if c_star > 0:
        cands.append(2.0 * batch_size / c_star)
    c0 = types.initial_state()
    w = types.weight
    lam2 = c0.lam**2
    r = c0.residual
    s1 = float((w * lam2 * r * r * c0.rho).sum())
    s23 = float((w * lam2 * (c0.rho**2 + 2 * r * c0.beta)).sum())
    risk = float((w * 0.5 * c0.lam * r * r).sum()) + 0.5 * problem.noise_std**2
    if s23 > 0 and risk > 0 and s1 > 0:
        cands.append(batch_size * s1 / (risk * s23))
    return min(cands) if cands else 2.0 * batch_size / float(problem.spectrum.mean())


def critical_lr(
    problem: TeacherProblem,
    model: DiagonalLinearNetwork,
    *,
    batch_size: int = 1,
    steps: int,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    sgd: SGDConfig | None = None,
    rel_tol: float = 0.02,
    blowup_factor: float = 1e3,
    decay_fraction: float = 0.1,
    tol: float = 3e-3,
    num_points: int = 41,
    max_evaluations: int = 100,
    decay: bool = True,
    **predict_kwargs: Any,
) -> CriticalLR:
    """Largest ``lr`` whose PDE-predicted risk stays bounded over ``steps`` SGD steps (THEORY §5).

    The SGD is given by the keywords (as :func:`~sde_optim.theory.predict`) or by ``sgd`` (its ``lr``, a
    number or a schedule, sets the shape that is scaled; the result is in units of its peak).  The E8
    estimate (:func:`e8_estimate`, divided by the momentum factor of E11) centres a bracket that is widened
    by factors of 2 until it contains the transition, then bisected (geometrically) until
    ``hi / lo <= 1 + rel_tol``.  With ``noise_std = 0`` a second bisection finds the largest
    ``lr`` whose risk decays (``R(T) <= decay_fraction R(0)`` and ``dR/dt < 0`` at ``T``), bracketed by the
    first search's solves when one of them decays (THEORY §6 at ``d = 16384``: 15 solves instead of 17).

    **Grid check of each edge.**  The searches run on the a priori grid of ``tol`` (``predict`` with
    ``refine=False``), and an edge depends on it: THEORY §6 at ``d = 16384`` has its bounded edge at 24.9 on those
    143 cells, 23.8 / 23.6 / 23.5 on 298 / 615 / 1264 (two-level-noisy 22.3, then 26.8 / 26.6 / 26.5), 6 and 16 %
    from the converged value at a bracket of 2 %.  So each edge's bracket is carried to a grid with twice the
    cells (re-bisected there if the edge left it) until the edge moves by at most ``rel_tol`` between two grids,
    then to a quarter of the step tolerance until it does so in time too (:class:`_EdgeGrids`); the answer is the
    finest grid's, ``grid_estimate`` the last changes, and a cap (``max_cells`` in ``options``, by default four times
    the first grid's cells; two step refinements) that stops an edge still moving by more than ``rel_tol`` is warned
    with that change.  Where the divergence is carried by the law's far tail (label noise, ``B > 1``: the noise
    keeps the law wide), the bounded edge may not settle on any affordable grid (iso-noisy-B4-bal at ``d = 16384``:
    66, 65, 74 and above 87 on 136 to 1088 cells): that is the warning's case.

    **Many types.**  Every solve uses the checked types of the first one; where they are more than twice
    :data:`COARSE_TYPES`, each edge is first searched and grid-checked on a priori types of at most that many (a solve
    costs about the ratio of the type counts less), and the checked types' search and grid check then start each
    grid's search from that pass's bracket on it (:func:`_hinted`).  The answer and ``grid_estimate`` are the checked
    types' own, from the same check (pm-two-level-B3 at ``d = 16384``: 633 checked types, 12-30 s a solve on the first
    grid and 50-390 s on finer ones, where the edge moved 50 % from each grid to the next: walks and bisections on
    every grid).

    Boundedness is assumed monotone in ``lr``; decay holds on a window of ``lr`` (too small makes
    no progress within the horizon), so its upper edge is searched below the stability limit and
    ``decay`` is ``None`` when no ``lr`` in ``[bounded / 256, bounded]`` decays within the horizon.
    A horizon so short that nothing diverges up to ``2^20`` times the E8 estimate is a
    ``ValueError``; ``max_evaluations`` bounds the number of PDE solves (``RuntimeError`` past it).
    ``decay=False`` skips the decay edge (``decay`` is then None): a caller that needs only ``bounded`` saves that
    search and its grid check (TheoryMonitor, best_lr).

    The answer is the ``d -> infinity`` limit's.  Its finite-``d`` indicators (``finite_d``) are those of the solve at
    ``bounded``, where the steps are largest, and a :class:`~sde_optim.theory.FiniteDimensionWarning` says when they
    are past the thresholds of :func:`~sde_optim.theory.predict`'s: there SGD at this ``d`` can diverge well below
    the answer (a power law with a Gaussian teacher, ``B = 2``, momentum 0.9, ``d = 512``: answer 2.78, where one
    effective step is ``gamma lam rho / d = 1.16`` of the curvature scale (22 with momentum's lag,
    :attr:`~sde_optim.theory.SGDConfig.step_error_factor`), real SGD diverging at 1.0-1.4 for ``d`` = 512 to 8192,
    docs/benchmarks.md).

    Between the two thresholds the PDE predicts a bounded plateau (the noise keeps the
    support coordinates from converging; with balanced initialization it drives every
    ``beta`` to 0), not a divergence.  Divergence is ``R > blowup_factor R(0)``, an unresolved
    heavy tail of the law, or a coordinate past the discrete-step limit (:func:`~sde_optim.theory.predict`).
    """
    _check_model(problem, model)
    steps = check_int("steps", steps, minimum=1)
    rel_tol = check_float("rel_tol", rel_tol, minimum=0.0, strict=True)
    blowup_factor = check_blowup_factor(blowup_factor)
    max_evaluations = check_int("max_evaluations", max_evaluations, minimum=1)
    if sgd is None:
        sgd = SGDConfig(lr=1.0, batch_size=batch_size, momentum=momentum, dampening=dampening, nesterov=nesterov,
                        weight_decay=weight_decay)
    shape = sgd.with_lr_scaled(1.0 / float(sgd.lr_schedule(steps).max()))  # peak 1: the search variable is the peak
    if _at_global_minimum(coordinate_columns(problem.to(dtype=torch.float64), model), problem.noise_std):
        raise ValueError("the model starts at a global minimizer (R(0) = 0, noise_std = 0): SGD never moves, so every "
                         "lr is stable and there is no critical lr")
    options = {"refine": False, **(predict_kwargs.pop("options", None) or predict_kwargs.pop("solver_options", None) or {})}
    grids = _EdgeGrids(tol, options)
    # a bracket bisected to rel_tol, and an edge change measured as its width, may exceed rel_tol by rounding
    # (brackets halve in log from the walk's (1 + rel_tol)^4): that must not cost another refinement
    within = rel_tol * (1.0 + 1e-9)
    batch0 = float(shape.batch_schedule(1)[0])
    est = e8_estimate(problem, model, batch0) / (float(model.lr_scale) * shape.momentum_factor)
    count = [0]
    seen: dict[tuple[int, tuple[int, float], float], Prediction] = {}  # every solve so far, by types, grid and lr

    def run(lr: float, grid: tuple[int, float]) -> Prediction:
        key = (id(options["types"]), grid, lr)
        if key in seen:
            return seen[key]
        count[0] += 1
        if count[0] > max_evaluations:
            raise RuntimeError(f"critical_lr needed more than max_evaluations={max_evaluations} PDE solves; raise "
                               "max_evaluations or rel_tol")
        with warnings.catch_warnings():  # said once, at the answer (below)
            warnings.simplefilter("ignore", FiniteDimensionWarning)
            seen[key] = predict(problem, model, sgd=shape.with_lr_scaled(lr), steps=steps, method="pde",
                                observables=("risk",), num_points=num_points, tol=tol, blowup_factor=blowup_factor,
                                options=grids.options(grid), **predict_kwargs)
        return seen[key]

    def on(grid: tuple[int, float]) -> dict[float, Prediction]:
        """The solves so far on ``grid`` with the current types, by lr."""
        return {x: p for (k, g, x), p in seen.items() if k == id(options["types"]) and g == grid}

    opts0 = grids.options(grids.first)
    first = _first_solve(problem, model, shape.with_lr_scaled(est), steps, num_points, tol, blowup_factor, opts0,
                         predict_kwargs)
    options["types"] = full = opts0["types"]  # the checked types of the first solve, for every later one
    seen[id(full), grids.first, est] = first
    count[0] += 1
    coarse = _coarse_types(problem, model, full) if grids.fixed is None else None

    def bounded(p: Prediction) -> bool:
        return p.divergence_step is None

    def decays(p: Prediction) -> bool:
        r = p.curves["risk"]
        return p.divergence_step is None and float(r[-1]) <= decay_fraction * float(r[0]) and float(p.local_rate[-1]) > 0

    def bisect(pred, lo: float, hi: float, grid) -> tuple[float, float]:
        while hi / lo - 1.0 > within:
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if pred(run(mid, grid)) else (lo, mid)
        return lo, hi

    def search_bounded(grid) -> tuple[float, float]:
        lo = hi = est
        if bounded(run(est, grid)):  # (the first solve, on the checked types)
            while True:
                hi = 2.0 * lo
                if not bounded(run(hi, grid)):
                    return bisect(bounded, lo, hi, grid)
                lo = hi
                if lo > 2.0**20 * est:
                    raise ValueError(
                        f"steps={steps} is too short a horizon: the predicted risk stays bounded for every lr up to "
                        f"{lo:.3g} (2^20 times the E8 estimate); use a longer horizon"
                    )
        while True:
            lo = hi / 2.0
            if bounded(run(lo, grid)):
                return bisect(bounded, lo, hi, grid)
            hi = lo
            if lo < 1e-12 * est:
                raise RuntimeError("critical_lr found no stable learning rate")

    def search_decay(limit: float, grid) -> tuple[float, float] | None:
        # decay holds on a window of lr (too small: no progress within the horizon; too large: noise
        # floor), so look below the stability limit for a decaying lr, then bisect its upper edge.  The
        # stability search's solves already say where R decays: start from the largest that does, if any.
        solved = on(grid)
        decaying = [x for x, p in solved.items() if x <= limit and decays(p)]
        if decaying:
            lo = max(decaying)
            return bisect(decays, lo, min(x for x in solved if x > lo), grid)  # none above lo decays
        hi = limit
        for _ in range(8):
            lo = hi / 2.0
            if decays(run(lo, grid)):
                return bisect(decays, lo, hi, grid)
            hi = lo
        return None  # no lr in [limit / 256, limit] brings R below decay_fraction R(0) within the horizon

    def relocate(pred, lo: float, hi: float, grid, floor: float) -> tuple[float, float] | None:
        """The edge of ``pred`` on ``grid`` from its bracket ``[lo, hi]`` on another grid (None: nothing above
        ``floor`` satisfies ``pred`` on this grid).

        Where the bracket does not hold, the walk away from it starts with steps of ``(1 + rel_tol)^4`` (or the
        bracket's width, if wider) and squares them: an edge that moved by a few ``rel_tol`` costs the same solves
        as from the bracket's width, and one that moved far (two-level-noisy at d = 16384: 20 % from 136 to 272
        cells) about three fewer, most of them bounded, the expensive ones."""
        first_step = max(hi / lo, (1.0 + rel_tol) ** 4)
        if pred(run(lo, grid)):
            if not pred(run(hi, grid)):
                return lo, hi  # the bracket holds: the edge moved by less than its width
            step = first_step
            while True:  # the edge moved up: widen geometrically above hi
                lo, hi = hi, hi * step
                if not pred(run(hi, grid)):
                    return bisect(pred, lo, hi, grid)
                step *= step
        step = first_step
        while True:  # the edge moved down
            hi, lo = lo, lo / step
            if lo < floor:
                return None
            if pred(run(lo, grid)):
                return bisect(pred, lo, hi, grid)
            step *= step

    def check(name: str, pred, bracket: tuple[float, float], floor: float, trail: dict | None = None,
              hints: dict | None = None):
        """The grid check of one edge (see :class:`_EdgeGrids`) from its ``bracket`` on the first grid:
        ``(bracket, grid, estimate)`` on the finest grid, or None when the edge vanished on a finer grid.
        ``trail``: filled with the bracket found on each grid.  ``hints``: another pass's trail (the coarse types'):
        where it says the edge leaves the bracket on the next grid, the search there starts from its bracket, moved by
        the ratio of the two passes' edges on the current grid (:func:`_hinted`).

        Space is refined until resolved, then time.  A source is resolved when refining it moved the edge by at most
        ``rel_tol``; a move of the bracket unresolves the other source (its change was measured on a grid that no
        longer holds the edge: at ``tol = 1e-2`` on THEORY §6 a time refinement moved the bounded edge by 1 %, after
        which twice the cells moved it by 4 %).  Done when both are resolved, or capped (warned when a capped source
        still moved by more).
        """
        grid, estimate = grids.first, {"space": math.inf, "time": math.inf}
        resolved = {"space": grids.fixed is not None, "time": grids.fixed is not None}
        trail = {} if trail is None else trail
        trail[grid] = bracket
        while not all(resolved.values()):
            # space first: its refinements keep the step tolerance, so they are the cheaper solves (a power law at
            # d = 16384: 12 s at 544 cells on the first grid's step tolerance, 25 s on a quarter of it)
            source = "space" if not resolved["space"] else "time"
            finer = grids.refined(grid, source)
            if finer is None:  # a cap stops this source
                resolved[source] = True
                if estimate[source] > within:
                    moved_by = (f"moved by {estimate[source]:.2g} (relative) between the last two grids in {source}, "
                                f"above rel_tol={rel_tol:g}") if math.isfinite(estimate[source]) else (
                                f"was not checked in {source} (no finer grid allowed)")
                    warnings.warn(f"critical_lr: the {name} edge {moved_by}, and {grids.cap(source)} stops the check "
                                  f"at {grids.describe(grid)}: the answer {bracket[0]:.4g} carries that error; raise "
                                  "the cap or relax tol", RuntimeWarning, stacklevel=3)
                continue
            moved = relocate(pred, *_hinted(bracket, hints, grid, finer), finer, floor)
            if moved is None:
                return None
            moved = bisect(pred, *moved, finer)  # (a hint's bracket is wider than rel_tol)
            trail[finer] = moved
            # the edge's change: at most the bracket's width when the bracket held, else the move of its centre
            estimate[source] = (bracket[1] / bracket[0] - 1.0) if moved == bracket else abs(
                math.log(math.sqrt(moved[0] * moved[1] / (bracket[0] * bracket[1]))))
            resolved[source] = estimate[source] <= within
            if moved != bracket:
                other = "time" if source == "space" else "space"
                resolved[other] = resolved[other] and grids.refined(finer, other) is None
            bracket, grid = moved, finer
        return bracket, grid, sum(e for e in estimate.values() if not math.isinf(e))

    def edge(name: str, pred, search, floor: float):
        """:func:`check` of one edge on the checked types, ``search()`` its bracket on the first grid (or None).

        Where the checked types are many, the edge is first searched and checked on :func:`_coarse_types` (a solve
        costs about the ratio of the type counts less), and then on the checked types: their search on the first grid
        starts from the coarse bracket there, and on each finer grid from the coarse one there moved by the ratio of
        the two passes' edges (:func:`_hinted`).  The answer, its grid and its estimate are the checked types' own,
        from the same grid check as before; the coarse pass only says where to look.  It is left (the search runs on
        the checked types, as without it) where it fails or finds no edge."""
        if coarse is not None:
            options["types"] = coarse
            trail: dict = {}  # the coarse pass's bracket on each of its grids
            try:
                with warnings.catch_warnings():  # said, if still so, by the pass on the checked types
                    warnings.simplefilter("ignore", RuntimeWarning)
                    found = search()
                    rough = check(name, pred, found, floor, trail=trail) if found is not None else None
            except (RuntimeError, ValueError):
                if count[0] > max_evaluations:
                    raise
                rough = None
            options["types"] = full
            if rough is not None:
                moved = relocate(pred, *trail[grids.first], grids.first, floor)
                if moved is not None:
                    return check(name, pred, moved, floor, hints=trail)
        found = search()
        return check(name, pred, found, floor) if found is not None else None

    checked = edge("bounded", bounded, lambda: search_bounded(grids.first), 1e-12 * est)
    if checked is None:
        raise RuntimeError("critical_lr found no stable learning rate on a finer grid")
    (lo, hi), grid_b, estimate = checked
    lr_bounded, lr_decay = lo, None
    if problem.noise_std == 0 and decay:
        checked = edge("decay", decays, lambda: search_decay(lr_bounded, grids.first), lr_bounded / 256.0)
        if checked is not None:
            lr_decay, estimate = checked[0][0], max(estimate, checked[2])
    finite_d = dict(seen[id(full), grid_b, lr_bounded].info.get("finite_d") or {})
    _warn_finite_d(finite_d, problem.dim, where=f"critical_lr: at its answer lr = {lr_bounded:.4g} and", stacklevel=3,
                   source="CriticalLR.finite_d")
    return CriticalLR(lr_bounded, lr_decay, est, rel_tol, count[0], finite_d,
                      None if grids.fixed is not None else estimate, grid_b[0])


def _hinted(bracket: tuple[float, float], hints: dict | None, grid: tuple[int, float],
            finer: tuple[int, float]) -> tuple[float, float]:
    """Where :func:`critical_lr`'s check starts the search for an edge on ``finer`` from its ``bracket`` on ``grid``:
    the bracket itself, unless the coarse pass's brackets ``hints`` on both grids say the edge moves out of it: then
    the coarse bracket on ``finer`` times the ratio of ``bracket`` to the coarse one on ``grid``, widened by half a
    bracket on each side (pm-two-level-B3 at ``d = 16384``: its edge moved 10.1 -> 15.4 -> 21 from 136 to 544 cells,
    each move a walk and a bisection of solves of 60-390 s on the checked types)."""
    if not hints or grid not in hints or finer not in hints:
        return bracket
    ratio = math.sqrt(bracket[0] * bracket[1] / (hints[grid][0] * hints[grid][1]))
    # widened by half the bracket's width on each side: the two passes' brackets each place their edge to a width
    spread = math.sqrt(bracket[1] / bracket[0])
    guess = (hints[finer][0] * ratio / spread, hints[finer][1] * ratio * spread)
    if abs(math.log(guess[0] * guess[1] / (bracket[0] * bracket[1]))) <= 2.0 * math.log(bracket[1] / bracket[0]):
        return bracket  # within about a width of it: the bracket itself, as without a hint
    return guess


# The edge search runs first on at most this many types where the checked types are more (critical_lr's ``edge``)
COARSE_TYPES = 64


def _coarse_types(problem: TeacherProblem, model: DiagonalLinearNetwork, checked) -> Any:
    """The a priori types of at most :data:`COARSE_TYPES` (:func:`~.quadrature.coordinate_types`) on which
    :func:`critical_lr` first searches its edges, or None where they are more than half as many as the ``checked``
    types (a coarse pass would then save less than it costs)."""
    types = coordinate_types(problem.to(dtype=torch.float64), model, max_types=COARSE_TYPES)
    return types if 2 * types.num_types <= checked.num_types else None


def _first_solve(problem, model, sgd: SGDConfig, steps: int, num_points: int, tol: float, blowup_factor: float,
                 options: dict, predict_kwargs: dict) -> Prediction:
    """The solve at the E8 estimate; its (checked) types are put in ``options`` for every later solve."""
    if set(predict_kwargs) - {"dtype", "max_types", "max_evaluations", "max_seconds"}:
        raise TypeError(f"critical_lr() got unexpected keyword argument(s) {sorted(predict_kwargs)}")
    setup, k, info, fixed = _prepare(problem, model, lr=None, batch_size=1, steps=steps, momentum=0.0, dampening=0.0,
                                     nesterov=False, weight_decay=0.0, noise_scale=1.0, sgd=sgd, method="pde",
                                     observables=("risk",), num_points=num_points, tol=tol,
                                     max_types=predict_kwargs.get("max_types", 4096), blowup_factor=blowup_factor,
                                     dtype=predict_kwargs.get("dtype", torch.float64),
                                     max_evaluations=predict_kwargs.get("max_evaluations", 200_000),
                                     max_seconds=predict_kwargs.get("max_seconds"))
    sol = PDESolver(**{key: v for key, v in options.items() if key != "types"}).solve(setup)
    options["types"] = sol.types
    return _finish(sol, setup, k, info, warn=False)  # critical_lr warns at its answer
