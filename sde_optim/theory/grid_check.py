"""The a posteriori grid check of the Fokker-Planck solve (:func:`~.fokker_planck.solve_fokker_planck`).

A solve on ``N`` cells with step tolerance ``s`` is compared with solves on other grids, and the differences estimate
its error (Richardson): :func:`refine_grid_batch` (one batch of members: the first pair, the error split by source,
then refinements of the larger source until the estimate meets ``tol``; the extrapolation in the cells where it is the
better answer) and :func:`refine_grid_on_subset` (the same check on a few types, combined with the many types' coarse
solve).  Every estimate either drives a refinement or, where a cap stops the check, is reported in a warning.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterable, NamedTuple

import torch
from torch import Tensor

from ..observables import OBSERVABLES
from .dynamics import MeanFieldDynamics
from .fokker_planck import (
    MAX_WORK,
    FokkerPlanckSolution,
    _observed_curves,
    cells_for_tolerance,
    grid_level,
    solve_batch_on_grid,
    solve_on_grid,
)
from .statistics import tiny

_RISK = OBSERVABLES["risk"]

__all__ = ["refine_grid", "refine_grid_batch", "refine_grid_on_subset", "SubsetCheck", "check_level"]


def check_level(tol: float, half_width: float, step_tol: float | None, max_cells: int,
                base: tuple[int, float] | None, level: int) -> tuple[int, float]:
    """``(cells, step tolerance)`` of level ``level`` of a grid check that starts on ``base`` (``(cells, step
    tolerance)``; None: :func:`grid_level`'s levels): each level doubles the cells and divides the step tolerance by 4."""
    if base is None:
        return grid_level(tol, half_width, step_tol, level, max_cells)
    return base[0] * 2**level, base[1] / 4.0**level


def refine_grid(dynamics: MeanFieldDynamics, t_out: Tensor, coarse: FokkerPlanckSolution, *, tol: float,
                step_tol: float | None, max_cells: int, max_evaluations: int, estimate_floor: float, tol_used: float = 0.0,
                base: tuple[int, float] | None = None, max_work: float = MAX_WORK, **opts) -> FokkerPlanckSolution:
    """The a posteriori grid check of :func:`~.fokker_planck.solve_fokker_planck`, starting from a solve ``coarse`` on the grid
    ``base`` (``(cells, step tolerance)``; default level 0 of :func:`~.fokker_planck.grid_level`).

    Solves the next levels of :func:`grid_level` until the Richardson estimate of ``R`` and ``C`` is below
    ``tol - tol_used`` (``tol_used``: the part of ``tol`` already taken by another error source); returns
    the finest solve with ``error_estimate`` and ``levels`` set, warning if a cap stops it first.
    """
    (fine,) = refine_grid_batch(dynamics, t_out, [coarse], tol=tol, step_tol=step_tol, max_cells=max_cells,
                                max_evaluations=max_evaluations, estimate_floor=estimate_floor, tol_used=tol_used,
                                base=base, max_work=max_work, **opts)
    return fine


def refine_grid_batch(dynamics: MeanFieldDynamics, t_out: Tensor, coarse: list[FokkerPlanckSolution], *, tol: float,
                      step_tol: float | None, max_cells: int, max_evaluations: int, estimate_floor: float,
                      tol_used: float = 0.0, base: tuple[int, float] | None = None, max_work: float = MAX_WORK,
                      **opts) -> list[FokkerPlanckSolution]:
    """:func:`refine_grid` for every member of a batch (``coarse``: their solves on the grid ``base``, one per
    member; "level 0" below is ``base``, default :func:`grid_level`'s level 0, and level 1 has twice its cells
    and a quarter of its step tolerance).

    **Level 1** (cells x 2, step tolerance / 4) is solved for every member, as one batch; the Richardson estimate
    of the pair (its difference over the order it shows, and the time error where the steps are capped: (a) and (b)
    below) is its error.  A member whose estimate is above ``tol - tol_used``
    then has its error **split by source**: one more solve with level 1's cells on level 0's time steps (replayed,
    :func:`solve_on_grid`'s ``schedule``) differs from level 0 only in space and from level 1 only in time, so
    ``X`` (space) and ``Tm`` (time) are estimated separately: ``Tm`` as a difference / 3 (second order in time),
    ``X`` as the difference itself (first order: near the critical lr the cells converge at order 1.1-1.4 only,
    measured on THEORY §6, where / 3 understated the error 2-4x).
    From there each refinement halves the cells (replaying the current time steps: a change in space only,
    whose pair estimate replaces ``X``) or divides the step tolerance by 4 (a change in time only, replacing
    ``Tm``), whichever source is larger, until ``X + Tm`` meets the tolerance.  From the second pair of a source
    on, its difference is divided by the observed reduction ``r - 1`` (:func:`_reduction`), so the order the
    pairs show is used, between one and two.  Near the critical learning rate
    the error is in space (the law's steep walls) and the time steps stay coarse; at small ``lr`` it is in time
    and the cells stay few (measured: docs/benchmarks.md).  The estimate reported is ``X + Tm``.

    ``Tm`` measured on other cells than the current solve's is measured again before the solve is accepted (a twin
    on the same cells with 4x the step tolerance, difference / 3): a ``Tm`` taken on level 1's cells, before the
    space refinement resolved the law, understated the time error 4x (THEORY §6, ``lr = 2``, ``tol = 2e-2``, on the
    stretched cells: estimate 1.6 % at 512 cells for a true 6.1 %, the steps of level 0 replayed throughout).  With
    the extrapolation below in view a second twin (16x) gives the order the pairs show (:func:`_time_divisor`): the
    single twin's / 3 understated the time error 1.7x at ``lr = 8``, ``tol = 1e-2``, where the steps converge at
    order ~1.4 only.
    ``X`` measured on other time steps than the current solve's is measured again before the solve is accepted
    (twins with 1/2 and 1/4 of the cells on the same steps: the difference to the first at the order the three
    show): the two errors interact, and carrying ``X`` across a 16x
    change of the steps understated the error 4x near the critical lr (THEORY §6, ``lr = 2``, ``tol = 2e-2``).

    A refinement that does not halve its source's difference (the pairs are not yet in their asymptotic range, e.g.
    a time step refined on too few cells to resolve the law) hands the next refinement to the other source.

    **Where the assumptions fail.**  (a) The first pair is divided by the order it shows against a level below level
    0 (:func:`_first_divisor`, 1/16 of level 1's work), and where that level diverged and level 0 did not, level 0
    is too coarse for any pair of it to answer (its ``X`` is unknown until a space pair of its own).  (b) Where a
    smaller step tolerance does not shorten the steps (other limits set them: :func:`_steps_moved`), a pair of step
    tolerances holds no time refinement: the member is *capped*, its ``Tm`` is measured by halving its steps
    (:func:`_halving_estimate`: the first pair's on level 0, later ones on the current cells), and its time
    refinements halve the steps (a replay) instead of dividing the step tolerance.  A ``Tm`` from a halving assumes
    first order until, where it would take a second halving of the same cells, level 0's steps quartered give the
    halvings' order (:func:`_halving_divisor`; one solve on level 0's cells, carried to the finer cells until two
    halvings on the same cells show their own): on the continuous-type settings at their own lr the halvings
    converge at second order, and first order cost a second halving of all their types.  (c) Where the split's replay
    blows up and neither adaptive solve did, the other corner of the square splits the error: level 0's cells on
    level 1's steps and level 1's cells at level 0's step tolerance.  Measured before these (THEORY §6, d = 1000,
    t <= 5): at ``tol`` 0.02-0.1 estimates 3-15x below the error, some errors past ``tol`` (silent), and an
    estimate of inf after the work cap (power-law-B2-bal at 0.8x its critical lr); docs/benchmarks.md.

    **Richardson in the cells.**  On the same time steps the cells converge at second order once the law is
    resolved (differences ~4x smaller per doubling), so three solves on the current steps with cells ``N/4, N/2, N``
    (a recheck's twins, or space refinements replaying the same steps) also give the extrapolation
    ``(4 S_N - S_N/2) / 3`` and its space estimate ``x_ex`` (:func:`_extrapolation_estimate`).  Where ``x_ex`` plus
    the extrapolation's own ``Tm`` (the same pair one level up in time, extrapolated too: the twin with 4x the step
    tolerance, kept from the last time refinement or the recheck of ``Tm``, and its half-cells partner on its steps)
    is below the current solve's ``X + Tm``, the answer is the extrapolation (the solve's :attr:`~FokkerPlanckSolution.
    coarser` is set) and the estimate is its own.  What to refine next follows the better answer in view
    (:meth:`_CheckState.planned`).  Measured on THEORY §6 at 0.8x the critical lr (``d = 16384``,
    default tol): 1110 cells instead of 4660, 12.7 s instead of 16.9 s, error 2.4e-4 against 3.0e-4
    (docs/benchmarks.md).

    Members are solved together whenever they need the same next solve; a member leaves as soon as its own
    estimate meets the tolerance.  The caps (``max_cells``, ``max_evaluations``, ``max_work``) apply to each member's
    own solves; a member stopped by one keeps its last solve, with a warning giving its estimate.
    """
    check = _BatchCheck(dynamics, t_out, coarse, allowed=tol - tol_used, tol=tol, max_cells=max_cells,
                        max_evaluations=max_evaluations, max_work=max_work, floor=estimate_floor, opts=opts)
    first = check.level_one(*(check_level(tol, opts["half_width"], step_tol, max_cells, base, k) for k in (0, 1)))
    if first.split:
        check.split(first)
    while check.state:
        plans: dict[tuple, list[int]] = {}  # the next solve -> the members that need it (solved together)
        for g in list(check.state):
            key = check.plan(g)
            if key is not None:
                plans.setdefault(key, []).append(g)
        for key, members in plans.items():
            check.run(key, members)
    for message in check.warnings:
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    return check.result  # type: ignore[return-value]


@dataclass
class _FirstPair:
    """Level 1 of :func:`refine_grid_batch` against level 0 (``coarse``, ``fine``: one solve per member, grids
    ``(n0, st0)`` and ``(n1, st1)``): each member's divisor of the pair (:func:`_first_divisor`), the members whose
    level below level 0 diverged (``rough``), the time estimates of capped members from level 0's halving
    (``t_cap``, first order) and those halved solves (``halves``), and the members whose estimate missed
    (``split``)."""

    coarse: list[FokkerPlanckSolution]
    fine: dict[int, FokkerPlanckSolution]
    grids: tuple[tuple[int, float], tuple[int, float]]
    div: dict[int, float]
    rough: set[int]
    t_cap: dict[int, float]
    halves: dict[int, FokkerPlanckSolution]
    split: list[int]


class _BatchCheck:
    """One run of :func:`refine_grid_batch`: the batch's solves and what each member has spent on them (operator
    evaluations, cell updates, solves), its answers (``result``), and the split check of the members still refining
    (``state``: member -> :class:`_CheckState`).  The steps of the check are its methods: :meth:`level_one`,
    :meth:`split`, then rounds of :meth:`plan` (each member's next solve) and :meth:`run` (one solve for every member
    that needs it, by kind)."""

    def __init__(self, dynamics: MeanFieldDynamics, t_out: Tensor, coarse: list[FokkerPlanckSolution], *, allowed: float,
                 tol: float, max_cells: int, max_evaluations: int, max_work: float, floor: float, opts: dict) -> None:
        self.dynamics, self.t_out, self.opts, self.coarse = dynamics, t_out, opts, list(coarse)
        self.allowed, self.tol, self.floor = allowed, tol, floor
        self.max_cells, self.max_evaluations, self.max_work = max_cells, max_evaluations, max_work
        self.n_prior = min(cells_for_tolerance(tol, opts["half_width"]), max_cells)
        self.groups = len(self.coarse)
        self.result: list[FokkerPlanckSolution | None] = [None] * self.groups
        self.spent = [c.nfe for c in self.coarse]
        self.work = [_work(c) for c in self.coarse]
        self.solves = [1] * self.groups
        self.state: dict[int, _CheckState] = {}  # member -> where its split check stands
        self.warnings: list[str] = []  # one per member whose answer misses the tolerance (a cap stopped it)

    def solve(self, members: list[int], n_cells: int, st: float, schedule: list[float] | None) -> list[FokkerPlanckSolution]:
        """One batch solve of ``members`` on ``n_cells`` cells (step tolerance ``st``, or ``schedule`` replayed),
        counted against each member's caps."""
        dyn = self.dynamics
        sub = dyn if len(members) == self.groups else dyn.with_coefficients(dyn.coef.select(members))
        sols = solve_batch_on_grid(sub, self.t_out, n_cells, st, schedule=schedule, **self.opts)
        for g, sol in zip(members, sols):
            self.spent[g] += sol.nfe
            self.work[g] += _work(sol)
            self.solves[g] += 1
        return sols

    def over_budget(self, g: int, sol: FokkerPlanckSolution, evaluations: float | None = None,
                    work: float | None = None) -> bool:
        """Whether member ``g``'s next solve(s), costing ``evaluations`` operator evaluations and ``work`` cell updates
        (default about twice ``sol``: cells x 2 on its steps, or about twice its steps), would pass a cap."""
        evaluations = 2 * sol.nfe if evaluations is None else evaluations
        work = 2 * _work(sol) if work is None else work
        return _next_exceeds(self.spent[g], evaluations, self.max_evaluations, self.work[g], work, self.max_work)

    def finish(self, g: int, sol: FokkerPlanckSolution, estimate: float, coarser: FokkerPlanckSolution | None = None) -> None:
        """Member ``g``'s answer: ``sol`` (extrapolated with ``coarser`` if given) with its estimate, and a warning with
        the number where the estimate is above the tolerance (a cap stopped the check; issued at the end)."""
        sol.error_estimate, sol.levels, sol.coarser = estimate, self.solves[g] - 1, coarser
        self.result[g] = sol
        if estimate > self.allowed:
            who = f" (member {g} of a batch of {self.groups})" if self.groups > 1 else ""
            self.warnings.append(
                f"Fokker-Planck solve{who}: estimated relative error {estimate:.2g} of the grid exceeds "
                f"{self.allowed:.2g} (tol={self.tol:g}) with {sol.xi.numel()} cells and {self.spent[g]} operator "
                f"evaluations (max_cells={self.max_cells}, max_evaluations={self.max_evaluations}, "
                f"max_work={self.max_work:.3g} cell updates, {self.work[g]:.3g} spent); raise them or relax tol")

    def unconfirmed(self, sol: FokkerPlanckSolution) -> bool:
        """A predicted divergence is believed only from the a priori resolution on (a grid far too coarse can blow up
        spuriously, and two such grids may agree)."""
        return sol.diverged_at is not None and sol.xi.numel() < self.n_prior

    def level_one(self, level0: tuple[int, float], level1: tuple[int, float]) -> _FirstPair:
        """Level 1 for every member, and the first pair's estimate (its difference over the order it shows, plus the
        time error of capped steps): members within the tolerance (or at a cap) finish here."""
        (n0, st0), (n1, st1) = level0, level1
        coarse, floor, everyone = self.coarse, self.floor, list(range(self.groups))
        fine = dict(zip(everyone, self.solve(everyone, n1, st1, None)))
        # the order the first pair is at, from a level below level 0 (1/16 of level 1's work): see _first_divisor;
        # where that level diverged and level 0 did not, level 0 is a level from a spurious blow-up, far from the
        # asymptotic range: the first pair cannot answer, and its X is unknown until a space pair of its own
        lows = dict(zip(everyone, self.solve(everyone, max(8, n0 // 2), 4.0 * st0, None)))
        div = {g: _first_divisor(fine[g], coarse[g], low, floor) for g, low in lows.items()}
        rough = {g for g, low in lows.items() if low.diverged_at != coarse[g].diverged_at}
        # where level 1's step tolerance did not shorten level 0's steps (other limits set them) the first pair holds
        # no time refinement: the time error is measured on level 0 by halving its steps (see _steps_moved)
        capped = [g for g in everyone if _replayable(coarse[g]) is not None and not _steps_moved(fine[g], coarse[g])]
        halves = dict(zip(capped, self.solve(capped, n0, st0, _halved(coarse[capped[0]].schedule)))) if capped else {}
        t_cap = {g: _halving_estimate(coarse[g], halved, floor) for g, halved in halves.items()}
        split: list[int] = []
        for g, sol in fine.items():
            estimate = _pair_difference(sol, coarse[g], floor) / div[g] + t_cap.get(g, 0.0)
            if (estimate <= self.allowed and not self.unconfirmed(sol) and g not in rough) or self.over_budget(g, sol):
                self.finish(g, sol, estimate)
            else:
                split.append(g)
        return _FirstPair(coarse, fine, (level0, level1), div, rough, t_cap, halves, split)

    def split(self, first: _FirstPair) -> None:
        """The error of ``first.split``'s members split by source: level 1's cells on level 0's steps (a replay)
        differs from level 0 in space only and from level 1 in time only."""
        (n0, st0), (n1, st1) = first.grids
        floor, fine, failed = self.floor, first.fine, []
        members, pairs = first.split, {}
        for g, mid in zip(members, self.solve(members, n1, st0, _replayable(first.coarse[members[0]]))):
            if mid.diverged_at != fine[g].diverged_at and fine[g].diverged_at == first.coarse[g].diverged_at:
                failed.append(g)  # the replay blew up where neither adaptive solve did: it splits nothing (below)
                continue
            # space at the order the first pair showed (second at most: the first pair's difference is mostly the
            # cells' near the critical lr) until a pair of its own shows it; time at second order (MPRK22 with the
            # local error kept near the step tolerance; its own pairs show better or worse next)
            space = math.inf if g in first.rough else _pair_difference(mid, first.coarse[g], floor)
            pairs[g] = (space, _pair_difference(fine[g], mid, floor))
        # capped: the pair (fine, mid) differs in steps that hardly differ; the time error is level 0's halving's (first
        # order until its order is measured: _order)
        for g, (space, time) in pairs.items():
            capped = g in first.t_cap
            t_err, raw_t, t_cells = (first.t_cap[g], math.inf, n0) if capped else (time / 3.0, time, n1)
            level0 = _Halving(first.coarse[g], first.halves[g], n0, st0) if capped else None
            self.state[g] = _CheckState(fine[g], n1, st1, space / first.div[g], t_err, space, raw_t, True, None,
                                        t_cells, [fine[g]], capped=capped, level0=level0,
                                        assumed="coarser" if capped else None)
        if failed:
            self.other_corner(failed, first)

    def other_corner(self, members: list[int], first: _FirstPair) -> None:
        """The split of members whose replay (:meth:`split`) blew up: level 0's steps carry no error control on level
        1's cells, and near the critical lr they can blow up there (power-law-B2-bal at 0.8x its critical lr,
        d = 16384: diverged at t = 4.56; both estimates were inf, and the work cap then stopped the check with an
        estimate of inf).  The other corner of the same square splits the error as well: level 0's cells on level
        1's steps (space) and level 1's cells with adaptive steps at level 0's step tolerance (time)."""
        (n0, st0), (n1, st1) = first.grids
        floor, fine, t_cap = self.floor, first.fine, first.t_cap
        halves = self.solve(members, n0, st1, _replayable(fine[members[0]]))
        for g, half, twin in zip(members, halves, self.solve(members, n1, st0, None)):
            space = math.inf if g in first.rough else _pair_difference(fine[g], half, floor)
            time = _pair_difference(fine[g], twin, floor)
            chain = [half, fine[g]] if _replayable(fine[g]) is not None else [fine[g]]
            capped = g in t_cap or not _steps_moved(fine[g], twin)  # the twin took the fine solve's steps: no pair
            t_err, raw_t, t_cells = ((t_cap.get(g, math.inf), math.inf, n0 if g in t_cap else 0) if capped
                                     else (time / 3.0, time, n1))
            self.state[g] = _CheckState(fine[g], n1, st1, space / first.div[g], t_err, space, raw_t, True, None,
                                        t_cells, chain, prev=None if capped else twin, capped=capped)

    def done(self, g: int) -> None:
        """Member ``g`` leaves the split check with its answer (:meth:`_CheckState.answer`)."""
        c = self.state.pop(g)
        self.finish(g, c.sol, *c.answer())

    def plan(self, g: int) -> tuple | None:
        """Member ``g``'s next solve (:meth:`next_solve`), or None where it finished: its estimate met the tolerance,
        or that solve would pass a cap (:meth:`cost`)."""
        c = self.state[g]
        key = self.next_solve(c)
        if key is None or self.over_budget(g, c.sol, *self.cost(c, key)):
            return self.done(g)
        return key

    @staticmethod
    def cost(c: "_CheckState", key: tuple) -> tuple[float, float]:
        """``(operator evaluations, cell updates)`` of the solve(s) ``key`` for the member ``c``, from its current
        solve's: the number of steps doubles with a quarter of the step tolerance (second order) and with halved
        steps, halves with 4x the step tolerance; a recheck's two solves have 1/2 and 1/4 of the cells, and the
        extrapolation's time check solves half the cells on the kept twin's steps (or a twin and that partner); the
        order of level 0's halvings, level 0's steps in four."""
        kind, tag = key[0], key[3]  # tag: whether the extrapolation is in view (retime), the kept twin (retime_ex)
        nfe, work = float(c.sol.nfe), _work(c.sol)
        if kind == "space":
            return nfe, 2.0 * work
        if kind == "recheck":
            return 2.0 * nfe, 0.75 * work
        if kind == "retime":
            return (0.75 * nfe, 0.75 * work) if tag else (0.5 * nfe, 0.5 * work)
        if kind == "retime_ex":
            return (float(c.prev.nfe), 0.5 * _work(c.prev)) if c.prev is not None and tag is not None else (
                nfe, 0.75 * work)
        if kind == "order":
            return 4.0 * c.level0.sol.nfe, 4.0 * _work(c.level0.sol)
        return 2.0 * nfe, 2.0 * work  # time, halve, rehalve

    def next_solve(self, c: "_CheckState") -> tuple | None:
        """The next solve of the member ``c``, as a key ``(kind, cells, step tolerance, tag)`` that members needing the
        same solve share (the tag: the steps to replay, or whether the extrapolation is in view); None where its
        estimate meets the tolerance (or more cells than ``max_cells`` would be needed).  Kinds: ``space`` (twice the
        cells on the current steps), ``time`` (a quarter of the step tolerance) or ``halve`` (capped steps halved),
        and the checks of an estimate measured elsewhere: ``recheck`` (``X`` on the current steps), ``retime`` /
        ``rehalve`` (``Tm`` on the current cells), ``retime_ex`` (the extrapolation's ``Tm``), ``order`` (the order of
        the halvings, on level 0's cells)."""
        sol, n_cells, st = c.sol, c.cells, c.step_tol
        x_err, t_err = c.planned()
        halving = c.capped and _replayable(sol) is not None  # (a diverged solve's steps cannot be halved)
        timing = (("retime", n_cells, 4.0 * st, c.extrapolates()) if not halving else
                  ("rehalve", n_cells, st, id(sol.schedule)))  # Tm measured again on the current cells
        if math.isinf(c.t_err) and c.t_cells != n_cells:  # Tm unknown (no time pair yet): measure it first
            return timing
        if x_err + t_err <= self.allowed and not self.unconfirmed(sol):
            if not c.x_fresh:  # X was measured on other time steps: measure it again on these (fewer cells, same steps)
                return ("recheck", n_cells, st, id(_replayable(sol)))
            if c.t_cells != n_cells:  # Tm was measured on other cells: again on these (step tolerance x 4)
                return timing
            if c.extrapolates() and c.t_ex is None and not c.capped:  # its own Tm (a pair a level up in time)
                return ("retime_ex", n_cells, st, None if c.prev is None else id(c.prev.schedule))
            if c.capped and c.extrapolates() and c.t_ex is None:
                # steps no tolerance sets: the extrapolation's two solves share them, and a time error that does not
                # depend on the cells is the plain solve's (THEORY §6, 120 / 240 cells: 6.15e-4 / 6.05e-4 at lr 0.5,
                # 4.06e-3 / 4.20e-3 at lr 2, 1.51e-2 / 1.52e-2 at lr 8)
                c.t_ex = c.t_err
            return None
        space = x_err >= t_err or self.unconfirmed(sol)
        if c.stalled is not None:  # the last refinement did not halve its source's difference: refine the other
            space = c.stalled == "time"
        if space and 2 * n_cells > self.max_cells:
            if t_err <= self.allowed / 2:
                return None  # the space error needs more cells than max_cells
            space = False
        if space:
            return ("space", 2 * n_cells, st, id(_replayable(sol)))
        if halving and c.assumed is not None and c.h_div is None and c.level0 is not None and c.t_cells == n_cells:
            # Tm of these cells at an assumed first order: the order of level 0's halvings first (4x level 0's solve,
            # where halving these steps costs 2x this one's), which may spare the halving
            return ("order", c.level0.cells, c.level0.step_tol, id(c.level0.sol.schedule))
        return ("time", n_cells, st / 4.0, None) if not halving else ("halve", n_cells, st, id(sol.schedule))

    def run(self, key: tuple, members: list[int]) -> None:
        """The solve ``key`` (:meth:`plan`) for ``members``, and what it tells each of them."""
        kind, n_cells, st, tag = key
        step = {"rehalve": self._rehalve, "recheck": self._recheck, "retime": self._retime,
                "retime_ex": self._retime_ex, "order": self._order}.get(kind)
        if step is not None:
            step(members, n_cells, st, tag)
        else:
            self._refine(kind, members, n_cells, st)

    def _rehalve(self, members: list[int], n_cells: int, st: float, tag) -> None:
        """``Tm`` of the current solve from its steps halved (it stays the answer): steps no tolerance sets."""
        schedule = _halved(self.state[members[0]].sol.schedule)
        for g, halved in zip(members, self.solve(members, n_cells, st, schedule)):
            c = self.state[g]
            c.t_err, c.raw_t, c.t_cells = _halving_estimate(c.sol, halved, self.floor, c.h_div or 1.0), math.inf, n_cells
            c.assumed = "coarser" if c.h_div is None else None

    def _order(self, members: list[int], n_cells: int, st: float, tag) -> None:
        """The order of the halvings (:func:`_halving_divisor`) from level 0's solve, its steps halved (both kept) and
        its steps in four (solved here), and ``Tm`` again at that order instead of the first order it assumed."""
        quarters = self.solve(members, n_cells, st, _halved(_halved(self.state[members[0]].level0.sol.schedule)))
        for g, quarter in zip(members, quarters):
            c = self.state[g]
            c.h_div = _halving_divisor(c.level0.sol, c.level0.halved, quarter, self.floor)
            if c.assumed == "finer":  # the halved solve's estimate: its difference / 1
                c.t_div = c.h_div
                c.t_err = c.raw_t / c.h_div
            else:  # the solve's own from its steps halved: its difference x 2
                c.t_err = 0.5 * c.t_err * (1.0 + 1.0 / c.h_div)
            c.assumed = None

    def _recheck(self, members: list[int], n_cells: int, st: float, tag) -> None:
        """``X`` again on the current steps: twins with 1/2 and 1/4 of the cells, at the order the three show."""
        schedule, floor = _replayable(self.state[members[0]].sol), self.floor
        halves = self.solve(members, n_cells // 2, st, schedule)
        for g, half, quarter in zip(members, halves, self.solve(members, n_cells // 4, st, schedule)):
            c = self.state[g]
            raw = _pair_difference(c.sol, half, floor)
            c.x_err = raw / _reduction(_pair_difference(half, quarter, floor), raw)
            c.raw_x, c.x_fresh = raw, True
            c.same_steps([quarter, half, c.sol] if schedule is not None else [c.sol], floor)

    def _retime(self, members: list[int], n_cells: int, st: float, extrapolates: bool) -> None:
        """``Tm`` again on the current cells: a twin with 4x the step tolerance (second order); with the extrapolation
        in view (its ``Tm`` then decides) a second twin, 16x, for the order the pairs show."""
        floor = self.floor
        twins = self.solve(members, n_cells, st, None)
        seconds = self.solve(members, n_cells, 4.0 * st, None) if extrapolates else [None] * len(members)
        for g, twin, twin2 in zip(members, twins, seconds):
            c = self.state[g]
            if not _steps_moved(c.sol, twin):  # the same steps: no time pair; halve them instead (next round)
                c.capped, c.t_err, c.raw_t, c.t_cells, c.prev = True, math.inf, math.inf, 0, None
                continue
            raw = _pair_difference(c.sol, twin, floor)
            # the order the last time pairs showed, if on cells at most a doubling away (second order if none did: a
            # single twin's / 3 understated lr 8's time error at tol 0.02, order ~1.4 there)
            c.t_div = ((c.t_div if 2 * c.t_cells >= n_cells else 3.0) if twin2 is None
                       else _time_divisor(twin, twin2, raw, floor))
            c.t_err, c.raw_t, c.t_cells, c.prev = raw / c.t_div, raw, n_cells, twin

    def _retime_ex(self, members: list[int], n_cells: int, st: float, kept_steps) -> None:
        """The extrapolation's own ``Tm``: the twin one level up in time (kept from the last time refinement, or
        solved) and its half-cells partner on its steps, extrapolated as the current pair is."""
        kept = kept_steps is not None
        twins = [self.state[g].prev for g in members] if kept else self.solve(members, n_cells, 4.0 * st, None)
        steps = _replayable(twins[0])
        halves = self.solve(members, n_cells // 2, 4.0 * st, steps) if steps is not None else [None] * len(members)
        for g, twin, half in zip(members, twins, halves):
            c = self.state[g]
            c.t_ex = math.inf if half is None else _pair_difference(
                c.sol, twin, self.floor, curves=(_extrapolated(c.sol, c.chain[-2]), _extrapolated(twin, half))) / (
                c.t_div if kept else 1.0)  # the order the plain pair showed, else first

    def _refine(self, kind: str, members: list[int], n_cells: int, st: float) -> None:
        """A refinement of one source: ``space`` (cells x 2, the current steps replayed), ``time`` (step tolerance / 4)
        or ``halve`` (the steps halved, replayed); the pair with the current solve replaces that source's estimate."""
        first = self.state[members[0]].sol
        schedule = None if kind == "time" else _halved(first.schedule) if kind == "halve" else _replayable(first)
        source = "space" if kind == "space" else "time"
        for g, new in zip(members, self.solve(members, n_cells, st, schedule)):
            c = self.state[g]
            raw = _pair_difference(new, c.sol, self.floor)
            if kind == "time" and not _steps_moved(new, c.sol):  # a quarter of the step tolerance, the same steps
                c.capped, c.t_err, c.raw_t, c.t_cells = True, math.inf, math.inf, 0  # halved from now on
                continue
            c.stalled = source if not raw * 2.0 <= (c.raw_x if source == "space" else c.raw_t) else None
            chain = c.chain + [new] if source == "space" and schedule is not None else [new]
            c.prev = c.sol if kind == "time" else None  # a level up in time on the same cells
            c.sol, c.cells, c.step_tol = new, n_cells, st
            if source == "space":
                c.x_err, c.raw_x, c.x_fresh = raw / _reduction(c.raw_x, raw), raw, True
                c.same_steps(chain, self.floor)
            else:
                # the order of two time pairs on cells at most a doubling apart; one on far coarser cells can be
                # inflated by an unresolved law (THEORY §6, lr 8, tol 1e-2: 0.0985 on 152 cells, then 0.0179 on 608
                # read as second order; the answer's error 9.8e-3 against an estimate of 7.9e-3): first order
                c.t_div = _reduction(c.raw_t, raw) if 2 * c.t_cells >= n_cells else 1.0
                first_halving = kind == "halve" and not math.isfinite(c.raw_t)  # no halving pair on these cells yet
                if first_halving:
                    c.t_div = c.h_div or 1.0  # level 0's halving order (first order where not measured)
                c.assumed = "finer" if first_halving and c.h_div is None else None
                c.t_err, c.raw_t, c.x_fresh, c.t_cells = raw / c.t_div, raw, False, n_cells
                c.chain, c.t_ex = chain, None  # x_ex is carried, as X is, until measured again on these steps


class _Halving(NamedTuple):
    """Level 0's solve and its steps halved (``cells``, step tolerance ``step_tol``), kept for the order of the
    halvings (:meth:`_BatchCheck._order`)."""

    sol: FokkerPlanckSolution
    halved: FokkerPlanckSolution
    cells: int
    step_tol: float


@dataclass
class _CheckState:
    """Where one member's split grid check stands (:func:`refine_grid_batch`): its current solve, cells and step
    tolerance; the space and time estimates ``X``, ``Tm`` and the raw pair differences they came from; whether ``X``
    was measured on the current steps; the source whose last refinement stalled; the cells ``Tm`` was measured on;
    the solves on the current time steps (``chain``), the space estimate ``x_ex`` of the extrapolation of its last
    pair (``inf`` when there is none; carried across a time refinement, as ``X`` is) and its time estimate ``t_ex``
    (None until measured on the current cells and steps); the divisor ``t_div`` of the last ``Tm``; ``prev``, the solve
    on the current cells with 4x the step tolerance when there is one; ``h_div``, the divisor of a halving pair where
    the steps are capped (:func:`_halving_divisor`; None until measured, first order meanwhile), ``level0`` the
    level-0 halving it is measured from, and ``assumed`` whether ``Tm`` assumed first order (``"finer"``: a halved
    solve's, its difference; ``"coarser"``: its difference to its halved steps x 2); ``ex_div``, the divisor of the
    extrapolations' difference (:func:`_extrapolation_divisor`; 3 where not measured)."""

    sol: FokkerPlanckSolution
    cells: int
    step_tol: float
    x_err: float
    t_err: float
    raw_x: float
    raw_t: float
    x_fresh: bool
    stalled: str | None
    t_cells: int
    chain: list[FokkerPlanckSolution]
    x_ex: float = math.inf
    t_ex: float | None = None
    t_div: float = 3.0
    prev: FokkerPlanckSolution | None = None
    capped: bool = False
    h_div: float | None = None
    ex_div: float = 3.0
    level0: "_Halving | None" = None
    assumed: str | None = None

    def same_steps(self, chain: list[FokkerPlanckSolution], floor: float) -> None:
        """``chain``: the solves on the current solve's time steps (cells doubling, the current one last); the
        estimate of the Richardson extrapolation of its last pair (:func:`_extrapolation_estimate`) on them, at the
        order the last chain of four showed (:func:`_extrapolation_divisor`, carried across time refinements)."""
        self.ex_div = _extrapolation_divisor(chain, floor) or self.ex_div
        self.chain, self.x_ex, self.t_ex = chain, _extrapolation_estimate(chain, floor, self.ex_div), None

    def extrapolates(self) -> bool:
        """Whether the extrapolation of the chain's last pair is in view: its space estimate, measured on the current
        steps, below the current solve's ``X``."""
        return self.x_fresh and self.x_ex < self.x_err and len(self.chain) >= 2 and self.chain[-1] is self.sol

    def planned(self) -> tuple[float, float]:
        """``(X, Tm)`` of the better answer in view: the current solve, or the extrapolation (its ``Tm`` once
        measured, the current solve's until then); they decide what to refine next."""
        t_ex = self.t_err if self.t_ex is None else self.t_ex
        return (self.x_ex, t_ex) if self.x_ex + t_ex < self.x_err + self.t_err else (self.x_err, self.t_err)

    def answer(self) -> tuple[float, FokkerPlanckSolution | None]:
        """``(estimate, coarser)`` of the answer: the extrapolation of the chain's last pair (its partner) when both
        its estimates were measured on the current solve's cells and steps and their sum is the smaller one, else the
        current solve alone."""
        if self.extrapolates() and self.t_ex is not None and self.x_ex + self.t_ex < self.x_err + self.t_err:
            return self.x_ex + self.t_ex, self.chain[-2]
        return self.x_err + self.t_err, None


def _replayable(sol: FokkerPlanckSolution) -> list[float] | None:
    """``sol``'s time steps to replay on another grid, or None (adaptive steps) when it diverged: its steps end at the
    divergence, and a replay past them would cover the rest of the horizon in single steps."""
    return sol.schedule if sol.diverged_at is None else None


def _reduction(previous: float, latest: float) -> float:
    """``r - 1`` for the Richardson estimate ``latest / (r - 1)`` of the finer solve of a pair, where ``r`` is how much
    the differences of consecutive pairs shrank (``previous / latest``, the observed order: ``r = 2^p``), kept in
    ``[2, 4]``: at most second order (``/ 3``, the assumption of a single pair), and a slower convergence, or an
    unresolved pair (a divergence in one solve only), counted as first order (``/ 1``) rather than trusted further.  Measured near the critical lr on THEORY §6: the space
    differences shrink about 2.6x per halving of the cells (order ~1.4), so ``/ 3`` would understate the error
    about 1.8x."""
    if not math.isfinite(previous) or not math.isfinite(latest) or latest <= 0:
        return 1.0  # no order to see (an unresolved pair, or no difference left): first order
    return min(4.0, max(2.0, previous / latest)) - 1.0


def refine_grid_on_subset(dyn_s: MeanFieldDynamics, dyn_c: MeanFieldDynamics, t_out: Tensor, base_s: FokkerPlanckSolution,
                          base_c: FokkerPlanckSolution, *, tol: float, step_tol: float | None, max_cells: int,
                          max_evaluations: int, estimate_floor: float, tol_used: float = 0.0,
                          base: tuple[int, float] | None = None, max_work: float = MAX_WORK,
                          closer: Iterable[tuple[MeanFieldDynamics, FokkerPlanckSolution]] = (),
                          final: FokkerPlanckSolution | None = None, **opts) -> SubsetCheck | None:
    """The grid check of :func:`refine_grid` on a small type set ``S``, for a combination with many types ``F``.

    The many-type answer is then ``L_0(F) + [L_l(S) - L_0(S)]`` (level-0 solve of ``F`` plus the grid
    correction measured on ``S``, the combination technique of sparse grids): its grid error is that of
    ``L_l(S)`` (the Richardson estimate, as in :func:`refine_grid`) plus how much the correction depends on
    the types, estimated by the same correction on a coarser set ``C``: ``|G_l(S) - G_l(C)|`` with
    ``G_l = L_l - L_0``, relative to ``R`` and ``C`` (the correction varies less between ``S`` and ``F``,
    which are closer).  Both ``S`` and ``C`` at each level use the same time steps.  A level has twice the cells
    and a quarter of the step tolerance of the one before, unless that one missed the tolerance by less than 2x:
    then the next has ``r`` times the cells and ``1/r^2`` of the step tolerance with ``r^2`` twice the reduction
    needed (:func:`_next_ratio`), and its Richardson estimate is the pair's difference / ``(r^2 - 1)`` (a power
    law with a sparse Gaussian teacher at ``d = 16384``: level 1 missed by 12 %, and a whole level 2 was 13 s of a
    23 s prediction; its partial level, 185 cells instead of 240, about 60 % of that).  ``base_s``/``base_c``:
    their solves on the grid ``base`` (``(cells, step tolerance)``, default :func:`grid_level`'s level 0).

    ``closer``: further type sets between ``S`` and ``F`` (``(dynamics, solve on base)``, in the order of the type
    ladder, each with more types; taken one at a time, so an iterator may solve each only when it is needed).  The
    cross term does not fall with the grid (it tends to the type dependence of level 0's own grid error), and
    between the ladder's first two sets it can be most of it: on that power law
    ``|G(S) - G(C)|`` was 2.8e-4 (a third of the tolerance left, and the reason for level 2) where
    ``|G(F) - G(S)|`` was 1.6e-5 and the next pair's 1.4e-5.  So when level 1 misses because of the cross term
    (its estimate alone fits, or the cross term is over half the tolerance) the pair moves one set along:
    ``C <- S``, ``S <-`` the next of ``closer``, solved on level 1 with the same time steps (one solve, against a
    level at ``r^3`` the cost of both); its Richardson estimate uses its own base solve.  Past level 1 the move also
    solves the new set on the previous level (on the subset's steps there) for its Richardson estimate: a
    power law with a Gaussian teacher, sigma 1 and a random-scale init at ``d = 2048`` (silent_scan case 2301) missed
    on level 2 by its cross term (4.2e-4 + 3.7e-4 against 6.8e-4), and the fallback, the grid check on the final
    1055 types, took 40 of the prediction's 50 s.

    ``final``: the many types' solve on the base grid, ``L_0(F)``.  With it the cross term is scaled up by how much
    further ``F`` is from ``S`` than ``S`` from ``C`` on level 0 (:func:`_reach_cross`): two ladder sets a few types
    apart bound little about the types beyond them (silent_scan case 2300: the pair moved to sets of 124 and 120 types,
    cross 1.5e-6, while the true ``|G(F) - G(S)|`` on F = 194 types was 6.8e-6; scaled, 2.0e-5).

    Where a level took its predecessor's steps (other limits than the step tolerance set them: :func:`_steps_moved`)
    the pair's difference is the cells' alone, and the subset's time error is measured by halving its steps
    (:func:`_halving_estimate`) and added to the estimate; past half the tolerance the steps in four give the
    halvings' order, and the halved solve answers for the subset with its own space, time and cross estimates
    (:func:`_capped_subset`), the next levels (if its space error needs them) replaying its steps; where even the
    halved steps' time error is past half the tolerance the check returns None (the check on the final types then
    refines by halving their steps).  lu-dense-gauss (own lr, d = 4096, 1461 final types, 256 in the subset): the
    halved steps' own time error (4.3e-4) was past half the tolerance left (7.4e-4), and the check on the 1461 types
    took 77 s of the prediction's 96 s.

    Returns a :class:`SubsetCheck` (``L_l(S)``, its base solve, grid and cross estimates), or None if a solve
    diverges (a divergence is decided on the many types: the caller refines them instead) or if the cross estimate
    stays above half the tolerance without halving from one level to the next: it tends to the type dependence of
    level 0's own grid error, which no level removes (a steep power law at ``d = 4096``: 3.2e-3 at every level
    while the subset's grid estimate fell to 1.5e-5, and the levels went on to step tolerance 1.6e-5 for
    minutes).
    """
    half_width = opts["half_width"]
    allowed = tol - tol_used

    def cross_of(fine, other, base_s, base_c):  # the cross term of S's and C's solves, scaled to F
        cross = _cross_estimate(fine, base_s, other, base_c, estimate_floor)
        return _reach_cross(cross, base_s, base_c, final, estimate_floor)

    def judge(fine, coarse, other, base_s, base_c, ratio):  # a pair's (Richardson estimate, scaled cross term)
        return _richardson_estimate(fine, coarse, estimate_floor, ratio), cross_of(fine, other, base_s, base_c)

    closer = iter(closer)
    level, spent, cross_before = 0, base_s.nfe + base_c.nfe, math.inf
    work = _work(base_s) + _work(base_c)
    coarse = base_s
    n_cells, st = check_level(tol, half_width, step_tol, max_cells, base, 0)
    ratio = 2.0  # the next level: cells x ratio, step tolerance / ratio^2 (both errors fall ~ratio^2)
    replay, h_div = None, None  # the halved steps the subset answers on (replayed by the next level), their order
    while True:
        level += 1
        before = (n_cells, st)  # the previous level's grid
        n_cells, st = max(n_cells + 1, round(n_cells * ratio)), st / ratio**2
        fine = solve_on_grid(dyn_s, t_out, n_cells, st, schedule=replay, **opts)
        other = solve_on_grid(dyn_c, t_out, n_cells, st, schedule=fine.schedule, **opts)
        spent += fine.nfe + other.nfe
        work += _work(fine) + _work(other)
        if any(x.diverged_at is not None for x in (fine, other, base_s, base_c)):
            return None
        estimate, cross = judge(fine, coarse, other, base_s, base_c, ratio)
        while estimate + cross > allowed and (estimate <= allowed or cross > 0.5 * allowed):
            following = next(closer, None)  # the pair moves one set along the ladder (see above)
            if following is None:
                break
            dyn_n, base_n = following
            nxt = solve_on_grid(dyn_n, t_out, n_cells, st, schedule=fine.schedule, **opts)
            # its previous level (past level 1) on the subset's steps there, for its own Richardson estimate
            below = base_n if level == 1 else solve_on_grid(dyn_n, t_out, *before, schedule=coarse.schedule, **opts)
            spent += nxt.nfe + (below.nfe if level > 1 else 0)
            work += _work(nxt) + (_work(below) if level > 1 else 0.0)
            if any(x.diverged_at is not None for x in (nxt, base_n, below)):
                return None
            dyn_s, dyn_c, fine, other, base_s, base_c, coarse = dyn_n, dyn_s, nxt, fine, base_n, base_s, below
            estimate, cross = judge(fine, coarse, other, base_s, base_c, ratio)
        if not _steps_moved(fine, coarse):  # the level's steps are its predecessor's: the pair saw space only
            timed = _capped_subset(dyn_s, dyn_c, t_out, (n_cells, st, before[0], ratio), fine, other, estimate, cross,
                                   allowed, lambda f, o: cross_of(f, o, base_s, base_c), estimate_floor, opts, h_div)
            spent += sum(x.nfe for x in timed.solves)
            work += sum(_work(x) for x in timed.solves)
            if timed.fine is None:
                return None  # its time error, halved, still too large: the check on the final types halves their steps
            fine, other, estimate, cross, h_div = timed.fine, timed.other, timed.estimate, timed.cross, timed.div
            replay = fine.schedule if timed.finer_steps else replay
        ratio = _next_ratio(estimate, allowed - cross)
        # a level's cost: cells and steps x ratio, priced ratio^2 in both; one that replays the steps: cells x ratio
        evaluations, cells_steps = (1.0, ratio) if replay is not None else (ratio**2, ratio**2)
        if (estimate + cross <= allowed or ratio * n_cells > max_cells
                or _next_exceeds(spent, evaluations * fine.nfe, max_evaluations, work,
                                 cells_steps * (_work(fine) + _work(other)), max_work)):
            break
        if cross > 0.5 * allowed and cross > 0.5 * cross_before:
            return None  # the correction's type dependence does not fall with the grid: check the final types instead
        coarse, cross_before = fine, cross
    if estimate + cross > allowed:
        warnings.warn(f"Fokker-Planck solve: estimated relative error {estimate + cross:.2g} of the grid "
                      f"({estimate:.2g} on the subset, {cross:.2g} from its types) exceeds {allowed:.2g} (tol={tol:g}) "
                      f"with {n_cells} cells and {spent} operator evaluations (max_cells={max_cells}, "
                      f"max_evaluations={max_evaluations}, max_work={max_work:.3g} cell updates, {work:.3g} spent); "
                      "raise them or relax tol", RuntimeWarning, stacklevel=3)
    fine.error_estimate = estimate + cross
    fine.levels = level
    return SubsetCheck(fine, base_s, estimate, cross)


class _SubsetTime(NamedTuple):
    """What :func:`_capped_subset` found: the subset's answer on the level (``fine``, None when it cannot answer),
    the coarser set on its steps (``other``), their estimates (grid, time included; cross), every solve it made, the
    divisor of the halvings' order (None until measured) and whether the answer is on finer steps than the level's
    (``finer_steps``: the halved solve, or the one on the steps in four)."""

    fine: "FokkerPlanckSolution | None"
    other: "FokkerPlanckSolution | None"
    estimate: float
    cross: float
    solves: list
    div: float | None = None
    finer_steps: bool = False


def _capped_subset(dyn_s: MeanFieldDynamics, dyn_c: MeanFieldDynamics, t_out: Tensor, grid: tuple[int, float, int, float],
                   fine: "FokkerPlanckSolution", other: "FokkerPlanckSolution", estimate: float, cross: float,
                   allowed: float, cross_of, floor: float, opts: dict, div: float | None = None) -> _SubsetTime:
    """The time error of a level of :func:`refine_grid_on_subset` whose steps are its predecessor's (other limits
    than the step tolerance set them, :func:`_steps_moved`, or the halved steps of a level before, replayed): the
    pair ``(fine, coarser level)`` saw space only.  ``grid``: the level's cells and step tolerance, the cells of the
    level before and the ratio between them.

    The subset's steps halved give the time error, at first order (:func:`_halving_estimate`) or at the halvings'
    order ``div`` where a level before measured it; past half of ``allowed`` at first order, the steps in four give
    that order (:func:`_halving_divisor`), and where the error of ``fine`` at that order is still past half of
    ``allowed``, the halved solve (or, if its own time error, the pair's difference over that order, is past it too,
    the solve on the steps in four) becomes the subset's answer: its space error measured again on its own steps
    (``before_cells`` on them, ``/ (ratio^2 - 1)`` as the level's pair), its cross term from the coarser set on those
    steps (``cross_of(fine, other)``); the caller's next level, if its space error needs one, replays those steps.  No
    such solve, or a divergence in any of these solves, returns ``fine=None``: the caller hands over to the check on
    the final types.

    Measured on exp-laplace-randinit (own lr, d = 4096, 4096 exact types, 324 and 176 in the subset pair): level 1's
    halving said 2 x 4.87e-4 against half of 1e-3, and the check on the 4096 types that followed ran into its work
    cap (estimate 4.6e-3, warned, ~60 s of the prediction; docs/benchmarks.md)."""
    n_cells, st, before_cells, ratio = grid
    schedule = _halved(fine.schedule)
    halved = solve_on_grid(dyn_s, t_out, n_cells, st, schedule=schedule, **opts)
    solves = [halved]
    failed = _SubsetTime(None, None, math.inf, math.inf, solves)
    if halved.diverged_at is not None:
        return failed
    chain = [fine, halved]  # the same cells, each with the steps of the one before halved
    time_err = _halving_estimate(fine, halved, floor, div or 1.0)
    if div is None and time_err > 0.5 * allowed:
        chain.append(solve_on_grid(dyn_s, t_out, n_cells, st, schedule=_halved(schedule), **opts))
        solves.append(chain[-1])
        if chain[-1].diverged_at is not None:
            return failed
        div = _halving_divisor(fine, halved, chain[-1], floor)
        time_err = _halving_estimate(fine, halved, floor, div)
    if time_err <= 0.5 * allowed:
        return _SubsetTime(fine, other, estimate + time_err, cross, solves, div)
    # the first solve of the chain whose own time error (its pair's difference over the order) fits
    answer = next(((b, t) for a, b in zip(chain, chain[1:])
                   if (t := _pair_difference(a, b, floor) / (div or 1.0)) <= 0.5 * allowed), None)
    if answer is None:
        return failed
    sol, t_err = answer
    other_h = solve_on_grid(dyn_c, t_out, n_cells, st, schedule=sol.schedule, **opts)
    space_h = solve_on_grid(dyn_s, t_out, before_cells, st, schedule=sol.schedule, **opts)
    solves += [other_h, space_h]
    if other_h.diverged_at is not None or space_h.diverged_at is not None:
        return failed
    x_err = _pair_difference(sol, space_h, floor) / (ratio**2 - 1.0)
    return _SubsetTime(sol, other_h, x_err + t_err, cross_of(sol, other_h), solves, div, True)


class SubsetCheck(NamedTuple):
    """What :func:`refine_grid_on_subset` found: the subset's finest solve ``L_l(S)``, its solve on the base grid
    ``L_0(S)`` (the combination is ``L_0(F) + L_l(S) - L_0(S)``), the Richardson estimate and the cross estimate."""

    fine: "FokkerPlanckSolution"
    base: "FokkerPlanckSolution"
    estimate: float
    cross: float


def _cross_estimate(fine_s: "FokkerPlanckSolution", base_s: "FokkerPlanckSolution", fine_c: "FokkerPlanckSolution",
                    base_c: "FokkerPlanckSolution", floor: float) -> float:
    """How much the grid correction depends on the types: ``max |G(S) - G(C)| / |L(S)|`` over R and C (E7) and the
    output times with ``R >= floor R(0)``, ``G = L_fine - L_base`` (:func:`refine_grid_on_subset`)."""
    a = _observed_curves(fine_s)
    cross_abs = ((a - _observed_curves(base_s)) - (_observed_curves(fine_c) - _observed_curves(base_c))).abs()
    ok = torch.isfinite(a).all(0) & (fine_s.risk >= floor * fine_s.risk[0])
    return float((cross_abs / a.abs().clamp_min(tiny(a)))[:, ok].max()) if bool(ok.any()) else 0.0


def _reach_cross(cross: float, base_s: "FokkerPlanckSolution", base_c: "FokkerPlanckSolution",
                 final: "FokkerPlanckSolution | None", floor: float) -> float:
    """The cross term of :func:`refine_grid_on_subset` scaled to the distance from ``S`` to the final types ``F``:
    ``cross * max(1, d(F, S) / d(S, C))`` with ``d`` the level-0 difference of R and C (:func:`_pair_difference`);
    ``cross`` itself without ``final``.  Measured against the true ``|G(F) - G(S)|`` (docs/benchmarks.md, sixteenth
    session) on nine settings: the cross term alone was 0.23-18.7x the truth, scaled alone 0.64-4.2x, the larger of
    the two 1.5-18.7x."""
    if final is None:
        return cross
    near, far = _pair_difference(base_s, base_c, floor), _pair_difference(final, base_s, floor)
    if not far > near:  # F no further from S than C is (or nothing measured): the cross term as it is
        return cross
    return math.inf if near == 0.0 or math.isinf(far) else cross * far / near


def _next_ratio(estimate: float, room: float) -> float:
    """The refinement of the next level of :func:`refine_grid_on_subset`: cells x ``ratio``, step tolerance /
    ``ratio^2``, so that a second-order ``estimate`` falls ``ratio^2`` times.  A full level (2) unless the estimate
    needs less than half of that to fit in ``room`` (the tolerance left by the cross estimate): then ``ratio^2`` is
    twice the reduction needed (at least 1.25), and a level that just missed is not paid for at 4x its cost."""
    need = estimate / room if room > 0 else math.inf
    return 2.0 if not need < 2.0 else max(1.25, math.sqrt(2.0 * need))


def _next_exceeds(spent: int, next_evaluations: float, max_evaluations: int, work: float, next_work: float,
                  max_work: float) -> bool:
    """Whether the grid check's next solve(s), costing about ``next_evaluations`` operator evaluations and
    ``next_work`` cell updates, would take it past either soft cap (the caller then stops and warns)."""
    return spent + next_evaluations > max_evaluations or work + next_work > max_work


def _work(sol: "FokkerPlanckSolution") -> float:
    """A solve's cost in cell updates: ``types x cells x operator evaluations`` (one member of a batch)."""
    return float(sol.nfe) * sol.dynamics.types.num_types * sol.xi.numel()


def _richardson_estimate(fine: "FokkerPlanckSolution", coarse: "FokkerPlanckSolution", floor: float,
                         ratio: float = 2.0) -> float:
    """Estimated relative error of ``fine``: :func:`_pair_difference` / ``(ratio^2 - 1)`` (second order, cells x
    ``ratio`` and step tolerance / ``ratio^2``; / 3 for a whole level)."""
    return _pair_difference(fine, coarse, floor) / (ratio**2 - 1.0)


def _steps_moved(finer: "FokkerPlanckSolution", coarser: "FokkerPlanckSolution") -> bool:
    """Whether ``finer`` (a smaller step tolerance) took clearly more steps than ``coarser`` (at most
    :data:`_FEWER_STEPS` of them), so that their difference holds a time refinement.

    Where other limits set the steps (the output times, the per-type step in total variation) a step tolerance does
    not move them, and a pair of step tolerances shows no time error however large it is: THEORY §6 (d = 1000,
    t <= 5, 480 cells) at step tolerance 0.32 takes 32-35 steps at lr 0.5, 2 and 8, as does 4x that, for time errors
    of 2.7e-3, 0.11 and 0.80 (against 5 000-19 000 steps at 1e-6); at ``tol = 0.02``, lr 8, the grid check answered
    957 cells with an estimate of 3.3e-3 for an error of 4.8 %.  The time error of such steps is measured by halving
    them (:func:`_halving_estimate`)."""
    if finer.diverged_at is not None or coarser.diverged_at is not None:
        return True  # steps that end at a divergence are not counts of the same horizon: no claim
    return len(coarser.schedule) <= _FEWER_STEPS * len(finer.schedule)


def _halved(schedule: list[float]) -> list[float]:
    """Every step of ``schedule`` in two halves (a replay: the time refinement of steps no tolerance sets)."""
    return [x for h in schedule for x in (0.5 * h, 0.5 * h)]


def _halving_estimate(sol: "FokkerPlanckSolution", halved: "FokkerPlanckSolution", floor: float,
                      div: float = 1.0) -> float:
    """The time error of ``sol`` from ``halved`` (its steps halved, same cells): ``|S - S_h| (1 + 1 / div)`` with
    ``div = 2^p - 1`` for order ``p`` (:func:`_halving_divisor`); ``div = 1``, first order, twice the difference, where
    no order was measured.  Measured on THEORY §6 (d = 1000, t <= 5, 120-480 cells, step tolerances 0.001-0.32,
    against 1e-6): halving shrank the differences 2.4-4.3x (order 1.25-2.1), and twice the difference was 1.2-1.55x
    the true time error at lr 0.5, 2 and 8 (1.5x of it would have been 0.9x at lr 8)."""
    return _pair_difference(sol, halved, floor) * (1.0 + 1.0 / div)


def _halving_divisor(sol: "FokkerPlanckSolution", halved: "FokkerPlanckSolution", quartered: "FokkerPlanckSolution",
                     floor: float) -> float:
    """The divisor of a halving pair's time estimate (:func:`_halving_estimate`): ``(r - 1) / 1.25``, at least 1, where
    ``r - 1`` (:func:`_reduction`, in ``[1, 3]``) is how much the difference of ``sol`` and ``halved`` is larger than
    that of ``halved`` and ``quartered`` (the same cells, its steps in four), and 1.25 is Roache's factor of safety
    for an order observed on three grids (the grid convergence index).

    Measured on the level-0 grid of the grid check and carried to its finer cells, where the steps are capped (other
    limits than the step tolerance set them).  THEORY §6 (d = 1000, t <= 5) at lr 0.5, step tolerance 0.32 (capped):
    ``r - 1`` = 2.54 on 60 cells; on 120, 240 and 480 cells the halved steps' difference over 2.54 was 1.05x their true
    error (against step tolerance 1e-6), the first order's 2.7x.  Off the capped case it is not used: at lr 8 (0.8x
    the critical lr), where a step tolerance moves the steps, 60 cells showed 2.53 and 1.48 at step tolerances 0.32 and
    0.08 and the finer cells' halvings were 1.7x those estimates.  On ``theory_accuracy.py``'s settings at d = 4096
    the ratios of consecutive halving differences grow with the cells (THEORY §6 at its own lr 3.6 / 3.9 / 3.9 / 3.9
    on 30 / 60 / 120 / 240 cells; student-t, pl-sparse-gauss, spiked-random-init at their own lr 3.5-3.6 on 60 cells,
    3.6-4.3 on 120, 3.8-3.9 on 240), so level 0's order is at most the finer cells' there (docs/benchmarks.md)."""
    r = _reduction(_pair_difference(sol, halved, floor), _pair_difference(halved, quartered, floor))
    return max(1.0, r / _GCI_SAFETY)


# Roache's factor of safety on a Richardson estimate at an order observed from three grids (grid convergence index)
_GCI_SAFETY = 1.25


def _first_divisor(fine: "FokkerPlanckSolution", coarse: "FokkerPlanckSolution", low: "FokkerPlanckSolution",
                   floor: float) -> float:
    """The divisor of the grid check's first pair (levels 1 and 0): ``r - 1`` (:func:`_reduction`) from how much the
    pair's difference is smaller than that of level 0 and ``low``, a level below it (half its cells, 4x its step
    tolerance): 3 (Richardson's second order) only where the pairs show it, down to 1 (the difference itself) where
    they do not or where ``low`` diverged.

    The ``/ 3`` alone holds in the asymptotic range only, and a loose ``tol`` starts the check on grids far from it:
    THEORY §6 (d = 1000, t <= 5) at lr 4 with ``tol = 0.05`` accepted 64 cells (its level 0, 32 cells, the first
    of 8, 16, 32 that did not diverge) at an estimate of 3.2e-2 for a true error of 16.5 %; at lr 2, ``tol = 0.02``,
    1.5e-2 for 4.8 % (both silent)."""
    return _reduction(_pair_difference(coarse, low, floor), _pair_difference(fine, coarse, floor))


# A twin with 4x the step tolerance shows the order of the time error only if it took at most this share of the
# steps (second order: about half of them); THEORY §6 at lr 0.5 takes 449 and 425 steps at step tolerances 0.016 and
# 0.064 (the output times and the largest change per step set them), and the pair's ratio ~1 said nothing.
_FEWER_STEPS = 0.75


def _time_divisor(twin: "FokkerPlanckSolution", twin2: "FokkerPlanckSolution", raw: float, floor: float) -> float:
    """``r - 1`` for the time estimate ``raw / (r - 1)`` of a solve from its twins with 4x and 16x the step tolerance
    (:func:`_reduction` of the two pairs' differences), where the second twin took clearly fewer steps than the first
    (:data:`_FEWER_STEPS`); else 3 (second order, a single pair's assumption).  Measured on THEORY §6 at lr 8 on 608
    cells: time errors 2.6e-2, 1.0e-2, 2.8e-3 at step tolerances 1e-2, 2.5e-3, 6.25e-4 (order ~1.4, not 2)."""
    if len(twin2.schedule) > _FEWER_STEPS * len(twin.schedule):
        return 3.0
    return _reduction(_pair_difference(twin, twin2, floor), raw)


# Past this ratio of consecutive space differences (order ~1.6) a chain of solves is taken to be in the asymptotic
# range of the cells' second order, where the Richardson extrapolation of its last pair is tried.
_ASYMPTOTIC = 3.0


def _extrapolated(fine: "FokkerPlanckSolution", half: "FokkerPlanckSolution") -> Tensor:
    """``(2, n)``: the Richardson extrapolation ``(4 fine - half) / 3`` of R and C of two solves on the same time steps,
    ``half`` with half the cells (the second-order term of the cells cancels)."""
    a = _observed_curves(fine)
    return a + (a - _observed_curves(half)) / 3.0


def _extrapolation_estimate(chain: list["FokkerPlanckSolution"], floor: float, div: float = 3.0) -> float:
    """Estimated relative error of the Richardson extrapolation of the last two solves of ``chain`` (solves on the
    same time steps, each with twice the cells of the one before; at least three), or ``inf``.

    ``E2 = (4 S - S_h) / 3`` and ``E1 = (4 S_h - S_q) / 3`` from the last three solves ``S_q, S_h, S``: where the
    plain differences shrink at least :data:`_ASYMPTOTIC`-fold (the second-order term dominates), the extrapolations
    converge at least at second order too, so ``E2``'s error is at most ``|E2 - E1| / 3``, or ``/ div`` at the order
    a chain of four showed (:func:`_extrapolation_divisor`); else ``inf`` (no extrapolation).  Measured on THEORY §6 at 0.8x the critical lr (d = 16384, replayed steps, against the
    extrapolation of 3840 and 7680 cells): the plain solves' errors 1.8e-2, 4.6e-3, 1.1e-3 at 480, 960, 1920 cells
    fall 4x per doubling, the extrapolations' 1.3e-3, 6.0e-5, 4.1e-6 about 20x (order ~4, the scheme being
    symmetric); this estimate is then 5-7x above the error there, 2-4x on two-level-noisy (docs/benchmarks.md)."""
    if len(chain) < 3:
        return math.inf
    quarter, half, sol = chain[-3:]
    near, far = _pair_difference(sol, half, floor), _pair_difference(half, quarter, floor)
    if not (math.isfinite(far) and 0.0 < near and far >= _ASYMPTOTIC * near):
        return math.inf
    return _pair_difference(sol, quarter, floor, curves=(_extrapolated(sol, half), _extrapolated(half, quarter))) / div


def _extrapolation_divisor(chain: list["FokkerPlanckSolution"], floor: float) -> float | None:
    """``r - 1`` for the extrapolation estimate (:func:`_extrapolation_estimate`) from the last four solves of ``chain``
    (same time steps, cells doubling), or None (fewer; the last pair's differences shrinking less than
    :data:`_ASYMPTOTIC`-fold, or the one before less than 2-fold): ``r`` is how much the extrapolations' difference
    shrank, ``|E1 - E0| / |E2 - E1|``, kept in ``[4, 6]`` (``/ 3`` to ``/ 5``).

    The extrapolations converge faster than second order (the scheme is symmetric): THEORY §6 (d = 1000, t <= 5, on
    fixed steps, against the extrapolation of 1920 and 3840 cells) at lr 8 showed ``r`` = 7.5, 13.5, 22.7 on chains
    ending at 480, 960, 1920 cells, at lr 4 4.6, 8.6, 14.8, and the estimate at ``/ 5`` was 1.6-4.2x the true error
    there (``/ 3``: 2.7-7x); at lr 2, 960 cells (``r`` 3.6, kept at 4: ``/ 3``) 1.7x, 1920 cells (5.7) 1.9x.  Clipped at
    6: the seventeenth session's tables (docs/benchmarks.md) had 8 understate two-level-noisy's error at 3840 cells by
    10 %."""
    if len(chain) < 4:
        return None
    eighth, quarter, half, sol = chain[-4:]
    plain = [_pair_difference(b, a, floor) for a, b in ((eighth, quarter), (quarter, half), (half, sol))]
    if not (all(math.isfinite(x) for x in plain) and plain[2] > 0.0 and plain[0] >= 2.0 * plain[1]
            and plain[1] >= _ASYMPTOTIC * plain[2]):
        return None  # the last pair short of the asymptotic range (no extrapolation), or the one before not converging
    far = _pair_difference(half, eighth, floor, curves=(_extrapolated(half, quarter), _extrapolated(quarter, eighth)))
    near = _pair_difference(sol, quarter, floor, curves=(_extrapolated(sol, half), _extrapolated(half, quarter)))
    if not (math.isfinite(far) and near > 0.0):
        return None
    return min(6.0, max(4.0, far / near)) - 1.0


def _pair_difference(fine: "FokkerPlanckSolution", coarse: "FokkerPlanckSolution", floor: float,
                     curves: tuple[Tensor, Tensor] | None = None) -> float:
    """The largest relative difference ``max |fine - coarse| / |fine|`` of R and C between two solves.

    Taken over output times before the divergence, with ``R >= floor * R(0)``.  If only one of the two
    diverged, or they diverged at different output times, the divergence itself is unresolved: ``inf``; so is a risk
    below ``sigma^2 / 2`` in either (a negative excess risk: the fourth-order weights of a law collapsed into a few
    cells, seen in a best_lr sweep before the stall rule of :func:`refine_grid_batch`).  ``curves``: compare these
    ``(2, n)`` R and C instead of the two solves' own (their extrapolations, :func:`_extrapolation_estimate`).
    """
    if fine.diverged_at != coarse.diverged_at:  # one diverged, or both at different output times
        return math.inf
    floor_risk = _RISK.offset(fine.dynamics.noise_std)
    for sol in (fine, coarse):  # R below sigma^2/2 (a negative excess risk) is impossible: an unresolved law
        risk = sol.risk[torch.isfinite(sol.risk)]
        if risk.numel() and bool((risk < floor_risk - 1e-9 * max(floor_risk, float(risk.abs().max()))).any()):
            return math.inf
    a, b = curves if curves is not None else (_observed_curves(fine), _observed_curves(coarse))
    if curves is not None and bool((a[0] < floor_risk).any() | (b[0] < floor_risk).any()):
        return math.inf  # an extrapolation below sigma^2 / 2: the pairs are far from their asymptotic range
    ok = torch.isfinite(a).all(0) & torch.isfinite(b).all(0) & (fine.risk >= floor * fine.risk[0])
    for div in (fine.diverged_at, coarse.diverged_at):
        if div is not None:
            ok &= fine.t < div
    if not bool(ok.any()):
        return 0.0
    rel = ((a - b).abs() / a.abs().clamp_min(tiny(a)))[:, ok]
    return float(rel.max())
