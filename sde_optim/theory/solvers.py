"""The methods behind :func:`~sde_optim.theory.predict`, one class each over one interface.

In the spirit of torchdiffeq's ``SOLVERS``: :data:`SOLVERS` maps a method name to a :class:`Solver`
subclass; each takes its own options (unknown ones are a ``TypeError`` naming the accepted ones),
solves a :class:`Problem` (the coordinates, the mean-field coefficients, the output times) and
returns a :class:`Solution` (curves, E8 local rate, divergence time, standard errors, diagnostics).

* ``"pde"`` -- the Fokker-Planck system E6 (:mod:`.fokker_planck`) with both error sources
  controlled: the type quadrature (:mod:`.quadrature`) at grid level 0, then the grid;
* ``"particles"`` -- Euler-Maruyama of E4-E5 (:mod:`.particles`) on the exact coordinates;
* ``"gradient_flow"`` -- noise 0 (:func:`.odes.gradient_flow`);
* ``"ode"`` -- E9 for the *linear* model ``f(x) = <x, w>`` from ``w0 = beta(theta0)`` (THEORY §5).

A new method is a subclass with ``name``, ``defaults`` and :meth:`Solver.solve`, added to :data:`SOLVERS`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._validation import check_choice, check_float, check_int
from ..divergence import first_divergence
from ..observables import OBSERVABLES, Observable
from .dynamics import CoefficientBatch, Coefficients, MeanFieldDynamics
from .fokker_planck import (
    MAX_WORK,
    Budget,
    SCHEMES,
    FokkerPlanckSolution,
    StiffSolve,
    WorkLimitError,
    cells_for_tolerance,
    grid_level,
    solve_batch_on_grid,
)
from . import fokker_planck  # (its COMPILED_STEP read at call time: a numba error turns it off, see PDESolver._alone)
from .grid_check import refine_grid, refine_grid_batch, refine_grid_on_subset
from .odes import gradient_flow, linear_least_squares
from .particles import simulate_particles
from .quadrature import EXACT_LIMIT, TypeCheck, TypeSolve, solve_with_type_control
from .sg_operator import _compiled
from .statistics import e8_local_rate, finite_d_indicators, observable_values, tiny
from .types import CoordinateTypes, exact_types

__all__ = ["Problem", "Solution", "Solver", "SOLVERS", "LINEAR_OBSERVABLES"]

LINEAR_OBSERVABLES = ("risk", "excess_risk", "distance")


@dataclass
class Problem:
    """What every solver needs (built once by :func:`~sde_optim.theory.predict`).

    Attributes:
        columns: ``(d, 4)`` float64 rows ``(lambda_i, beta*_i, u0_i, v0_i)``.
        coef: the mean-field coefficients (:class:`~sde_optim.theory.dynamics.Coefficients`), or a
            :class:`~sde_optim.theory.dynamics.CoefficientBatch` of several (a sweep, :meth:`Solver.solve_batch`).
        noise_std: label noise; param_scale: ``J^T J`` of the parametrization; dim: ``d``.
        t: output times ``(n,)`` in ``dtype``; observables: what to return.
        tol: accuracy target of ``R`` and ``C``; max_types: cap on quadrature types.
        blowup_factor: divergence threshold on ``R / R(0)``; dtype: computation dtype.
        budget: the prediction's work bound (:class:`~sde_optim.theory.fokker_planck.Budget`).
        on_step: progress callback ``t -> None`` (or None).
    """

    columns: Tensor
    coef: Coefficients | CoefficientBatch
    noise_std: float
    param_scale: float
    dim: int
    t: Tensor
    observables: tuple[Observable, ...]
    tol: float
    max_types: int
    blowup_factor: float
    dtype: torch.dtype
    budget: Budget = field(default_factory=Budget)
    on_step: Any = None

    @property
    def members(self) -> int:
        """How many SGD configurations this problem holds (1 unless ``coef`` is a batch)."""
        return len(self.coef) if isinstance(self.coef, CoefficientBatch) else 1

    def member(self, g: int) -> "Problem":
        """The problem of member ``g`` of a batch (itself when there is no batch)."""
        return replace(self, coef=self.coef.members[g]) if isinstance(self.coef, CoefficientBatch) else self

    def dynamics(self, types: CoordinateTypes) -> MeanFieldDynamics:
        """The mean-field dynamics of ``types`` (in ``dtype``) under these coefficients."""
        return MeanFieldDynamics(types.to(dtype=self.dtype), self.coef, noise_std=self.noise_std,
                                 param_scale=self.param_scale)

    def controlled(self, solve) -> TypeCheck:
        """:func:`solve_with_type_control` at ``tol / 2`` (the other half is the solver's own), warning with the
        estimate when a cap stops the type refinement above it."""
        check = solve_with_type_control(self.columns, solve, self.t, tol=0.5 * self.tol, max_types=self.max_types,
                                        noise_std=self.noise_std)
        if check.estimate > 0.5 * self.tol:
            warnings.warn(f"predict: estimated relative error {check.estimate:.2g} of the type quadrature exceeds "
                          f"tol/2 = {0.5 * self.tol:g} with {check.types.num_types} types ({check.solves} solves, "
                          f"max_types={self.max_types}); raise max_types or relax tol", RuntimeWarning, stacklevel=4)
        return check

    def _at_outputs(self, coefficient) -> Tensor:
        """A coefficient ``(t, side) -> float`` at the output times, the value before a jump: ``(n,)``."""
        return torch.tensor([coefficient(x, -1) for x in self.t.tolist()], dtype=self.dtype)

    def rates(self) -> tuple[Tensor, Tensor]:
        """``gamma(t)`` and ``nu(t)`` at the output times (for the E8 rate)."""
        return self._at_outputs(self.coef.gamma), self._at_outputs(self.coef.noise)

    def decay_rates(self) -> Tensor:
        """``kappa(t)`` (E12) at the output times: the finite-d step's weight-decay part."""
        return self._at_outputs(self.coef.kappa)


@dataclass
class Solution:
    """One solver's answer: ``curves`` (observable -> ``(n,)``), ``local_rate`` ``(n,)`` (E8), ``diverged_at``
    (time or None), ``stderr`` (Monte Carlo methods), ``info`` (diagnostics, error estimates, types), ``scatter``
    (observable -> ``(n,)``: one SGD run's relative spread around the curves at this ``d``)."""

    curves: dict[str, Tensor]
    local_rate: Tensor
    diverged_at: float | None
    stderr: dict[str, Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    types: CoordinateTypes | None = None  # the (final) types solved with, for a caller that reuses them
    scatter: dict[str, Tensor] = field(default_factory=dict)  # one run's relative spread (finite_d_indicators)


class Solver:
    """Base class: ``defaults`` are the accepted options and their default values."""

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise TypeError(f"method {self.name!r} does not take the option(s) {unknown}; "
                            f"its options are {sorted(self.defaults)}")
        self.options = {**self.defaults, **options}

    def solve(self, problem: Problem) -> Solution:
        raise NotImplementedError

    def solve_batch(self, problem: Problem) -> list[Solution]:
        """One solution per member of ``problem.coef`` (a sweep); solved one after the other unless the method
        batches them (the PDE does)."""
        return [self.solve(problem.member(g)) for g in range(problem.members)]


def _outputs(c, w, problem: Problem, risk: Tensor, noise: bool = True,
             rates: tuple[Tensor, Tensor] | None = None) -> tuple[dict[str, Tensor], Tensor]:
    """The requested E7 curves and the E8 local rate of a set of weighted points (``rates``: ``problem.rates()`` at
    the points' output times, default all of them)."""
    gamma, nu = problem.rates() if rates is None else rates
    curves = observable_values(c, w, problem.observables, problem.noise_std)
    return curves, e8_local_rate(c, w, risk, gamma, nu if noise else torch.zeros_like(nu))


def _grid_outputs(sol: FokkerPlanckSolution, problem: Problem,
                  finite_d: bool = False) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor] | None]:
    """:func:`_outputs` of a grid solve, the output times in chunks (:meth:`FokkerPlanckSolution.chunks`), and with
    ``finite_d`` its :func:`~.statistics.finite_d_indicators` (else None)."""
    gamma, nu = problem.rates()
    kappa = problem.decay_rates() if finite_d else None
    curves, rates, extra = [], [], []
    with torch.inference_mode():  # the chunks' full-size passes without autograd bookkeeping
        for sl in sol.chunks():
            c, w = sol.points(sl)
            out = _outputs(c, w, problem, sol.risk[sl], rates=(gamma[sl], nu[sl]))
            curves.append(out[0])
            rates.append(out[1])
            if finite_d:
                extra.append(finite_d_indicators(c, w, problem.dim, gamma[sl], problem.noise_std, problem.observables,
                                                 problem.coef.step_error, kappa[sl]))
    return _cat(curves), torch.cat(rates), _cat(extra) if finite_d else None  # joined outside: ordinary tensors


def _cat(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Chunks of curves (name -> ``(n_chunk,)``) joined along the output times."""
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


# A sweep's grid check batches members up to this estimate of their retained solves (PDESolver._checked_members):
# _RETAINED solves of T x N x n doubles per member on the a priori cells
BATCH_BYTES, _RETAINED = 2 * 2**30, 4


class PDESolver(Solver):
    """E6 on quadrature types (:mod:`.quadrature`) and an error-checked grid (:func:`refine_grid`).

    Options: ``step_stability`` (also diverge at the discrete-step limit of a single coordinate, see
    :func:`~sde_optim.theory.predict`), ``num_cells`` (one fixed grid, no check), ``refine`` (False: the a
    priori grid, no check), ``max_cells``, ``max_evaluations`` and ``max_work`` (the grid refinement's soft
    caps, in operator evaluations and in cell updates: it stops, with a warning), ``estimate_floor``,
    ``half_width``, ``t0``, ``step_tol``, ``tail_limit``, ``max_steps`` (see
    :func:`~sde_optim.theory.fokker_planck.solve_fokker_planck`); ``types``: solve on these types as they are
    (no type check: :func:`~sde_optim.theory.critical_lr` builds them once for all its solves); ``member_batch``: a
    sweep's members per batch of its grid check (default None: as many as fit :data:`BATCH_BYTES`, see
    :meth:`_checked_members`; and a sweep of many type-cells is solved member by member, :meth:`_alone`; an
    integer keeps every sweep one batch); ``scheme``: the time step of every solve, ``"mprk22"``, ``"midpoint"`` or
    ``"auto"`` (default: MPRK22, and the midpoint rule for every solve of a prediction in which some solve meets a
    type with ``k h`` above :attr:`STIFF_KH` in :attr:`STIFF_STEPS` steps while rejecting :attr:`STIFF_REJECTED` of its
    attempts, see :func:`~sde_optim.theory.fokker_planck._integrate_mprk22`; the one used is ``info["scheme"]``, and
    what switched ``info["stiff"]``).
    """

    name = "pde"
    # a sweep is solved member by member where its first type set holds this many type-cells on level 0 (and the step
    # is the compiled one): a batch shares less per operator evaluation than its members then spend (_alone)
    ALONE_CELLS: ClassVar[int] = 1000
    # "auto" switches to the midpoint rule at an accepted MPRK22 step with some type's k h above STIFF_KH once there were
    # STIFF_STEPS such steps and the solve rejected at least STIFF_REJECTED of its attempts.  On a two-state generator
    # MPRK22's amplification of a deviation from equilibrium is -0.031 at k h = 3, -0.18 at 5, -0.22 at 6 and -0.32 at
    # 10 (the exact one e^-kh).  Measured (docs/benchmarks.md, 2026-12-03), per solve: the power law at 0.4x the
    # critical lr, where the midpoint rule pays (estimate 6.75e-3 -> 6.0e-4), has 19-109 steps with k h > 6 (max
    # 8.4-10.5) and rejects 16-34 % of its attempts; the coarse power law of tests/test_quadrature.py, where MPRK22 is
    # twice as fast, peaks at k h 3.7-5.3; student-t-B4-bal at 3x its lr has 46 steps with k h up to 12.8 and rejects
    # 2-5 % (its stiff type sits at its equilibrium): the midpoint rule cost it 14 % and changed nothing.
    STIFF_KH: ClassVar[float] = 6.0
    STIFF_STEPS: ClassVar[int] = 10
    STIFF_REJECTED: ClassVar[float] = 0.1
    defaults = dict(step_stability=True, num_cells=None, refine=True, max_cells=4096, max_evaluations=40_000,
                    max_work=MAX_WORK, estimate_floor=1e-3, half_width=20.0, t0=1e-4, step_tol=None, tail_limit=0.05,
                    max_steps=200_000, types=None, member_batch=None, scheme="auto")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.options["member_batch"] is not None:
            check_int("member_batch", self.options["member_batch"], minimum=1)  # before any solve
        check_choice("scheme", self.options["scheme"], ("auto",) + SCHEMES)

    def solve(self, problem: Problem) -> Solution:
        return self.solve_batch(problem)[0] if problem.members == 1 else _batch_error(self.name)

    def solve_batch(self, problem: Problem) -> list[Solution]:
        """:meth:`_solve_batch` with the ``scheme`` option: ``"auto"`` solves with MPRK22 until some solve meets a stiff
        type (:class:`~sde_optim.theory.fokker_planck.StiffSolve`), and then the whole prediction again with the
        midpoint rule, so that every solve its checks compare is of one scheme (the work of the first attempt stays
        charged to ``problem.budget``)."""
        scheme = self.options["scheme"]
        if scheme != "auto":
            return self._solve_batch(problem, scheme, None)
        try:
            return self._solve_batch(problem, "mprk22", (self.STIFF_KH, self.STIFF_STEPS, self.STIFF_REJECTED))
        except StiffSolve as stiff:
            solutions = self._solve_batch(problem, "midpoint", None)
            for sol in solutions:
                sol.info["stiff"] = {"kh": stiff.kh, "t": stiff.t, "rejected": stiff.rejected}
            return solutions

    def _solve_batch(self, problem: Problem, scheme: str, stiff_limit: tuple[float, int, float] | None) -> list[Solution]:
        """Every member of a sweep in one batched system (:func:`solve_batch_on_grid`): the type check on the
        largest estimate over members, the grid check per member (:func:`refine_grid_batch`).  A batch refines
        the grid on the final types (no subset combination, :func:`refine_grid_on_subset`).  Where the members'
        own work dwarfs what a batch shares (:meth:`_alone`), each member is solved as its own prediction instead.

        The type check runs on level 0 of the grid check, or on twice its cells (a few times at most, up to the a
        priori cells) where level 0 blows up spuriously (:meth:`_resolved_base`) or holds the first type sets' laws
        so coarsely that their difference is the cells' more than the types' (:meth:`_type_check_grid`)."""
        o = self.options
        tol = problem.tol
        batched = isinstance(problem.coef, CoefficientBatch)
        grid_opts = dict(half_width=o["half_width"], t0=o["t0"], blowup_factor=problem.blowup_factor,
                         tail_limit=o["tail_limit"], dim=problem.dim if o["step_stability"] else None,
                         max_steps=o["max_steps"], budget=problem.budget, on_step=problem.on_step, scheme=scheme,
                         stiff_limit=stiff_limit)
        if o["num_cells"] is not None:
            n, st = check_int("num_cells", o["num_cells"], minimum=8), (o["step_tol"] if o["step_tol"] is not None else tol)
        else:
            n, st = grid_level(tol, o["half_width"], o["step_tol"], 0 if o["refine"] else 2, o["max_cells"])
        schedule: list[float] | None = None
        base: tuple[int, float] | None = None  # the type check's grid (the grid check's level 0), when not level 0
        checked = o["num_cells"] is None and o["refine"] and o["types"] is None  # the type and grid checks run
        single = not batched and checked
        ladder = _LadderTimes.of(problem) if single else None
        pair: list[tuple[CoordinateTypes, list]] = []  # the ladder's first two sets and their solves on this grid
        made: list[list] = []  # the first solves of a restart, made on its grid by the check that chose it

        def solve(types: CoordinateTypes) -> TypeSolve:
            # every type solve replays the first one's time steps: their differences are then the types' alone
            nonlocal schedule, n, st, base, ladder
            if batched and checked and schedule is None and not made and self._alone(problem, types, n):
                raise _Alone
            dyn = problem.dynamics(types)
            k = ladder.count() if ladder is not None else 0  # the solve's place in the ladder
            if ladder is not None and ladder.schedule is not None:  # the ladder on its own times and steps
                return ladder.solve(k, dyn, n, st, grid_opts)
            if made and made[0][0].dynamics.types.num_types != types.num_types:  # not the sets they were made for
                made.clear()
            sols = made.pop(0) if made else solve_batch_on_grid(dyn, problem.t, n, st, schedule=schedule, **grid_opts)
            first = schedule is None
            if first and checked:
                sols, finer = self._resolved_base(problem, types, sols, (n, st), grid_opts)
                if finer is not None:  # a restart's second solve was made on the grid that has blown up here
                    base = finer
                    made.clear()
                n, st = base or (n, st)
            schedule = sols[0].schedule if first else schedule
            if checked and len(pair) < 2:
                pair.append((types, sols))
                finer = self._type_check_grid(problem, pair, (n, st), grid_opts) if len(pair) == 2 else None
                if finer is not None:  # the type check starts again on twice the cells, with the pair made there
                    (n, st), made[:] = finer
                    base, schedule, ladder = (n, st), None, _LadderTimes.of(problem) if single else None
                    pair.clear()
                    raise _Restart
            if ladder is not None:
                ladder.keep(k, dyn, sols[0])
                if k == 1 and ladder.long(problem.tol) and ladder.probe(n, st, grid_opts):
                    raise _Restart  # the type check starts again on the ladder's times
            if not batched:
                return _typesolve(sols[0])
            return TypeSolve(sols, torch.stack([x.type_curves() for x in sols]), [x.diverged_at for x in sols])

        if o["types"] is not None:
            check = TypeCheck(solve(o["types"]), o["types"], 0.0, 1, 0)
        else:
            while True:  # a restart: on a finer grid (a few times at most, up to the a priori cells) or the ladder's times
                try:
                    check = problem.controlled(solve)
                    break
                except _Restart:
                    pass
                except _Alone:  # each member as its own prediction, its own budget of evaluations, the sweep's clock
                    return [self.solve_batch(replace(problem.member(g), budget=problem.budget.again()))[0]
                            for g in range(problem.members)]
        if ladder is not None and ladder.schedule is not None:  # the answer's solves on every output time
            check = replace(check, solve=_typesolve(ladder.full(check.solve.result, n, st, schedule, grid_opts)))
        level0 = check.solve.result if batched else [check.solve.result]
        if o["num_cells"] is None and o["refine"]:
            if batched:
                solutions = self._checked_members(problem, check, level0, n, grid_opts, base)
            else:
                full = (lambda sol: sol) if ladder is None else (
                    lambda sol: ladder.full(sol, n, st, schedule, grid_opts))
                solutions = [self._solution(problem, self._refine(problem, check, grid_opts, base, full), check, n)]
        else:
            solutions = [self._solution(problem.member(g), [(1.0, sol)], check, n) for g, sol in enumerate(level0)]
        for sol in solutions:
            sol.info["scheme"] = scheme
            sol.info["type_check_points"] = int(problem.t.numel() if ladder is None or ladder.schedule is None
                                                else ladder.t.numel())
        return solutions

    def _alone(self, problem: Problem, types: CoordinateTypes, cells: int) -> bool:
        """Whether a sweep is solved member by member, each member bit for bit its :func:`~sde_optim.theory.predict`
        (its own type check, ladder, subset combination and grid check), instead of as one batch: where its first type
        set ``types`` on ``cells`` (level 0) holds :attr:`ALONE_CELLS` type-cells or more and the step is the compiled
        CPU step, unless ``member_batch`` asks for batches.

        A batch shares the work around each operator evaluation (the integrator's Python, about 40 us an attempt on
        this project's CPU) and costs in other ways: every member takes the batch's time steps (its hardest member's)
        and its type check's cells (its largest member's), and it has no subset combination.  A member's own
        evaluation costs about 35-50 ns a type-cell on the compiled step, so from about 1000 type-cells (40 us) on
        level 0, and 2-40x that on the finer grids of the check, the shared part is small and the costs stay.
        Measured (d = 16384, 16 lrs geometric in [0.05, 0.8] x the critical lr, a batch against its 16 predictions in a
        loop, docs/benchmarks.md, twenty-sixth session): 3-6 types on 60 cells (180-360 type-cells) the batch took
        0.77-0.93 of the loop; power-law-B2-bal, 61 types on 60 cells (3660), 1.79x.  On the torch path (other
        devices) every evaluation is tens of operations whose overhead the batch shares: it stays one batch."""
        return (self.options["member_batch"] is None and types.num_types * cells >= self.ALONE_CELLS
                and fokker_planck.COMPILED_STEP and _compiled(problem.t))

    def _checked_members(self, problem: Problem, check: TypeCheck, level0: list, base_cells: int,
                         grid_opts: dict, base: tuple[int, float] | None = None) -> list[Solution]:
        """The grid check of a batch's members (:func:`refine_grid_batch`) in groups of ``member_batch`` members, and
        their solutions; each group's solves are released before the next group's check.

        A grid check keeps several solves of each member, each ``T x N x n`` doubles (types, cells, output times), so a
        batch's memory is the sum of its members': a 16-member sweep of a power law at ``d = 16384`` (216 types, up to
        1110 cells, 201 times) held 13.5 GB and swapped the host, while each of its single predictions stayed under 1.1
        GB (docs/benchmarks.md, twenty-third session).  By default (``member_batch`` None) a group holds as many members
        as fit :data:`BATCH_BYTES` at :data:`_RETAINED` solves each on the a priori cells (4x level 0's); the few-type
        sweeps of the accuracy tables fit in one group (the batch as it was), many-type ones are split.  A group of
        ``G`` members counts one operator evaluation per batched step against ``max_evaluations``, so smaller
        groups spend more of it; members share no other work."""
        size = self.options["member_batch"]
        if size is None:
            cells = 4 * max(sol.xi.numel() for sol in level0)
            item = torch.empty((), dtype=problem.dtype).element_size()
            per_member = _RETAINED * check.types.num_types * cells * problem.t.numel() * item
            size = max(1, int(BATCH_BYTES // per_member))
        dyn, grid = problem.dynamics(check.types), self._grid_check(problem, check, grid_opts, base)
        solutions: list[Solution] = []
        for start in range(0, len(level0), size):
            group = list(range(start, min(start + size, len(level0))))
            sub = dyn if len(group) == len(level0) else dyn.with_coefficients(dyn.coef.select(group))
            fines = refine_grid_batch(sub, problem.t, [level0[g] for g in group], **grid)
            solutions += [self._solution(problem.member(g), sol.terms(), check, base_cells)
                          for g, sol in zip(group, fines)]
            for g in group:
                level0[g] = None  # released with the group's check (the answer keeps its own solves' outputs only)
        return solutions

    def _solution(self, problem: Problem, terms: list, check: TypeCheck, base_cells: int) -> Solution:
        """The curves, E8 rate and diagnostics of one member from its solve(s) ``terms`` (``[(coefficient, solve)]``)."""
        most = max((sol for _, sol in terms), key=lambda sol: sol.dynamics.types.num_types)  # the final types
        outs = [(a, _grid_outputs(sol, problem, finite_d=sol is most)) for a, sol in terms]
        curves = {k: sum(a * out[0][k] for a, out in outs) for k in outs[0][1][0]}
        rate = sum(a * out[1] for a, out in outs)
        finite_d = next(out[2] for _, out in outs if out[2] is not None)
        head: FokkerPlanckSolution = terms[0][1]
        grid = head.error_estimate
        info = dict(num_cells=int(head.xi.numel()), type_check_cells=base_cells,
                    operator_evaluations=problem.budget.used, tail_mass=head.tail_mass,
                    grid_combination=len(terms) > len(head.terms()), grid_extrapolated=head.coarser is not None,
                    error_estimates={"grid": grid, "types": check.estimate},
                    error_estimate=None if grid is None else grid + check.estimate, **_type_info(check))
        info["finite_d"], scatter = _finite_d_parts(finite_d, head.t, head.risk, head.diverged_at,
                                                    self.options["estimate_floor"], curves)
        if self.options["types"] is not None:
            info["types_fixed"] = True
        info["imbalance_lost_at"] = lost = most.imbalance_lost()
        if lost is not None:
            warnings.warn(f"predict: from t = {lost:.3g} on the imbalance |q| of some unbalanced coordinates is below "
                          f"twice the smallest normal {most.xi.dtype} (E4: the noise shrinks it at a rate "
                          "2 gamma^2 lam R / B): "
                          "their phi coordinate cannot follow it, and the curves past that time are not reliable "
                          "(info['imbalance_lost_at']; a shorter horizon, or a balanced initialization, avoids it)",
                          RuntimeWarning, stacklevel=4)
        return Solution(curves, rate, head.diverged_at, {}, info, check.types, scatter)

    def _resolved_base(self, problem: Problem, types: CoordinateTypes, sols: list, grid: tuple[int, float],
                       grid_opts: dict) -> tuple[list, tuple[int, float] | None]:
        """The first (coarsest-types) solve on cells where its divergence is resolved: ``(sols, grid)``, ``grid``
        ``(cells, step tolerance)`` or None for level 0 itself; ``sols``, ``grid``: the solve on level 0 and its grid.

        A level-0 grid can blow up where finer ones do not (a law whose walls its cells cannot hold); the type
        check would then measure the types on a spurious divergence, where its estimate means nothing (a power
        law with a Gaussian teacher, pm, momentum 0.9, ``d = 1024``: 60-cell solves diverged at ``t = 1.7``, as did
        60 cells at 1/16 of the step tolerance, while 120 cells at the same step tolerance did not; the quadrature
        went to 1020 of 1024 types).  While the solve diverges and its cells are fewer than the a priori count
        (:func:`cells_for_tolerance`, where the grid check believes a divergence), the cells are doubled on the
        same step tolerance; the finer solve becomes the base when the divergence vanished or moved by more than
        10 % of its time, else it stands on the coarser grid (the grid check confirms it on finer cells later).
        A sweep's members can diverge by design (:func:`~sde_optim.theory.best_lr`): the batch's cells are doubled
        while some member's divergence vanished or moved by more than 10 % on the finer grid (a spurious one), and a
        divergence that stays is believed.  A 2-lr power-law sweep at ``d = 16384`` (lr 9.5 and 11.4, neither
        diverging) had its 60-cell base diverge at ``t = 0.56`` and ``0.36``: its type check ran on those blow-ups,
        its grid check could not use a subset of the types, and a 16-lr sweep stopped at the work cap with an error
        of ``inf`` (docs/benchmarks.md, twenty-fourth session).
        """
        n_prior = self._prior_cells(problem)
        base = None
        while any(sol.diverged_at is not None for sol in sols) and grid[0] < n_prior:
            finer_grid = (2 * grid[0], grid[1])
            finer = solve_batch_on_grid(problem.dynamics(types), problem.t, *finer_grid, **grid_opts)
            spurious = [a.diverged_at is not None and (b.diverged_at is None or abs(b.diverged_at - a.diverged_at)
                                                       > 0.1 * a.diverged_at) for a, b in zip(sols, finer)]
            if not any(spurious):
                break
            sols, grid, base = finer, finer_grid, finer_grid
        return sols, base

    def _prior_cells(self, problem: Problem) -> int:
        """The a priori cells of ``problem.tol`` (:func:`cells_for_tolerance`, at most ``max_cells``): the finest grid
        the type check's grid is doubled to, where the grid check believes a divergence."""
        return min(cells_for_tolerance(problem.tol, self.options["half_width"]), self.options["max_cells"])

    def _type_check_grid(self, problem: Problem, pair: list[tuple[CoordinateTypes, list]], grid: tuple[int, float],
                         grid_opts: dict) -> tuple[tuple[int, float], list[list]] | None:
        """A grid on which the type check measures the types, not the cells: ``(grid, solves)``, twice the cells of
        ``grid`` (``(cells, step tolerance)``) and the ladder's first two sets solved there, or None to stay on ``grid``.

        The type check compares type sets solved on one grid; where the grid does not resolve their laws, each set
        carries its own discretization error and their difference is mostly that, which no further type refinement
        removes: the quadrature then splits nodes until its difference falls under the grid's.  A power law with a
        sparse sign teacher (power-law-B2-bal, ``d = 16384``, lr 3.75, default tol): its first two sets (61 and 117
        types) were 198 % apart on 60 cells and 0.009 % on 120, and the check refined to 704 types on 60 cells
        (48 s) where 117 types on 120 cells met the same estimate (6.6 s, the same risk to 6 digits); at lr 7.86,
        2.6 % on 120 cells and 0.003 % on 240, and the grid check of the combination stopped at its work cap with an
        estimate of 0.03 (warned) where 240 cells needed 117 types, no combination and 12.6 s.  And silently: a power
        law with a sparse Gaussian teacher (pl-sparse-gauss, ``d = 4096``, 3x its lr) answered 1.06 % from the exact
        coordinates (4096 types on 609 cells) with an estimate of 8.1e-4, its first pair 82 % apart on 60 cells and
        0.45 % on 120; on 120 cells it is 2.0e-5 from them (docs/benchmarks.md, twenty-fifth session).  So where the first pair is further apart than the type tolerance (the check would
        refine), the pair is solved on twice the cells, up to the a priori cells (:func:`cells_for_tolerance`); if it
        is less than half as far apart there, most of the difference was the grid's, and the check starts again on
        those cells (and asks the same of them).  The set with more types is solved there first, on at most
        :attr:`_LadderTimes.POINTS` of the output times, and the pair on every output time only where that set changed
        by more than half the difference.  A sweep judges the largest difference over its members."""
        n_prior = self._prior_cells(problem)
        offset = 0.5 * problem.noise_std**2

        def apart(coarse: list, fine: list, index: Tensor | None = None) -> float:
            return max(_sets_apart(a, b, problem.t, offset, index) for a, b in zip(coarse, fine))

        (types_c, coarse), (types_f, fine) = pair
        before = apart(coarse, fine)
        if not before > 0.5 * problem.tol or grid[0] >= n_prior:
            return None
        finer, dyn_f = (2 * grid[0], grid[1]), problem.dynamics(types_f)
        # the set with more types first (its extreme types are the ones the cells resolve last), on fewer output times
        # (:func:`_fewer_times`): where its own change is under half the pair's difference, the difference is taken as
        # the types' and nothing more is solved (measured at d = 4096 on five continuous settings where the check
        # stays: the two sets changed by the same amount to 2-3 digits, 0.004-0.6 of their difference; where it moved,
        # the larger set changed 1-8x the difference, the coarser one 0.2-6x)
        index = _fewer_times(problem.t, _LadderTimes.POINTS)
        probe = solve_batch_on_grid(dyn_f, problem.t if index is None else problem.t[index], *finer, **grid_opts)
        # its change against the pair's difference on the same times (a difference peaked between them, as on a power
        # law at lr 7.9: 3.3 % on every output time, 0.7 % on the 51, is compared as 0.7 %), relative to either grid
        if not max(apart(fine, probe, index), apart(probe, fine, index)) > 0.5 * apart(coarse, fine, index):
            return None
        fine_2 = probe if index is None else solve_batch_on_grid(dyn_f, problem.t, *finer, **grid_opts)
        coarse_2 = solve_batch_on_grid(problem.dynamics(types_c), problem.t, *finer, schedule=fine_2[0].schedule,
                                       **grid_opts)
        return (finer, [coarse_2, fine_2]) if apart(coarse_2, fine_2) < 0.5 * before else None

    def _grid_check(self, problem: Problem, check: TypeCheck, grid_opts: dict,
                    base: tuple[int, float] | None = None) -> dict:
        """Keywords of the grid check (:func:`refine_grid`) after the type check ``check`` (run on the grid ``base``,
        default level 0)."""
        o = self.options
        return dict(tol=problem.tol, step_tol=o["step_tol"], tol_used=min(check.estimate, 0.5 * problem.tol),
                    max_cells=o["max_cells"], max_evaluations=o["max_evaluations"],
                    max_work=check_float("max_work", o["max_work"], minimum=0.0, strict=True),
                    estimate_floor=o["estimate_floor"],
                    base=base, **grid_opts)

    def _refine(self, problem: Problem, check: TypeCheck, grid_opts: dict, base: tuple[int, float] | None, full):
        """The grid check on the final types, or on a subset combined with them (:func:`refine_grid_on_subset`).
        ``full(solve)``: a ladder solve on every output time (itself, or solved again when the ladder ran on fewer
        times, :class:`_LadderTimes`), called when the check needs it."""
        grid = self._grid_check(problem, check, grid_opts, base)
        level0 = check.solve.result
        fewer = [(problem.dynamics(types), sol.result) for sol, types in check.ladder
                 if types.num_types < check.types.num_types]  # the ladder's sets before the final one
        if len(fewer) >= 2:
            sets = ((dyn, full(sol)) for dyn, sol in fewer)  # lazily: the check may not move its pair
            (dyn_c, base_c), (dyn_s, base_s) = next(sets), next(sets)
            found = refine_grid_on_subset(dyn_s, dyn_c, problem.t, base_s, base_c, closer=sets, final=level0,
                                          **grid)
            if found is not None:
                return [(1.0, found.fine), (1.0, level0), (-1.0, found.base)]
        return refine_grid(problem.dynamics(check.types), problem.t, level0, **grid).terms()


def _typesolve(sol: FokkerPlanckSolution, t: Tensor | None = None) -> TypeSolve:
    """A single solve as the type check takes it (its curves at the times ``t``; None: the output times)."""
    return TypeSolve(sol, sol.type_curves(), sol.diverged_at, t)


class _Alone(Exception):
    """Raised by a sweep's first type solve to solve its members one by one (:meth:`PDESolver._alone`)."""


class _Restart(Exception):
    """Raised by a type solve to start the type check again: on the ladder's own times (:class:`_LadderTimes`), or on
    a grid that resolves the first sets' difference (:meth:`PDESolver._type_check_grid`)."""


def _fewer_times(t: Tensor, points: int) -> Tensor | None:
    """Indices of at most ``points`` of the output times ``t`` (every k-th and the last), or None when there are no
    more than that: a solve that only compares or probes need not stop at every output (:class:`_LadderTimes`)."""
    n = t.numel()
    if n <= points:
        return None
    k = -(-(n - 1) // (points - 1))
    return torch.tensor([*range(0, n - 1, k), n - 1], device=t.device)


class _LadderTimes:
    """The type ladder on fewer output times, when the ladder is long and that is cheaper (issue 10).

    A solve ends a step at every output time, and with the default 201 outputs most of a level-0 solve's steps
    are cut short by them: free of them, 2-3x fewer steps cover the horizon on a log-uniform spectrum, a Student-t
    teacher or a Marchenko-Pastur spectrum (d = 16384), while on a power law the steps are set by the error and not
    by the outputs (and free steps were rejected more: 623 evaluations against 530).  The ladder's solves measure
    only differences between type sets, on shared time steps, and those barely depend on the steps (on 60 and 120
    cells they agreed to 3 digits).  So when the ladder's first round leaves its sets :attr:`LONG` times further
    apart than the type tolerance (several rounds to go: the estimate falls 2-3x a round), the first set is solved
    on at most :attr:`POINTS` of the output times (every k-th and the last) with its own time steps -- a probe, stopped
    once it needs more than :attr:`GAIN` of the evaluations of that set on every output time -- and if it stays
    under, the type check starts again with every ladder solve on those times and steps.  The answer's solves (the
    final set, and the sets the grid check pairs) are then solved on every output time on the first set's steps, as
    without the ladder (the first two sets' solves are kept from the first start).  A short ladder, a probe that
    does not gain, or few output times: the ladder runs as before.
    """

    POINTS = 51
    GAIN = 0.6
    LONG = 16.0

    def __init__(self, t: Tensor, index: Tensor) -> None:
        self.t_full, self.t = t, t[index]
        self.schedule: list[float] | None = None  # the ladder's time steps, once the probe found them cheaper
        self._calls = 0
        self._first: list[tuple[MeanFieldDynamics, FokkerPlanckSolution]] = []  # the first two sets, every time
        self._probe: FokkerPlanckSolution | None = None
        self._full: list[tuple[FokkerPlanckSolution, FokkerPlanckSolution]] = []  # (on the ladder's times, on all)

    @classmethod
    def of(cls, problem: Problem) -> "_LadderTimes | None":
        """None when there are at most :attr:`POINTS` output times or the types are exact (no ladder: one solve)."""
        index = _fewer_times(problem.t, cls.POINTS)
        if index is None or exact_types(problem.columns, max_types=EXACT_LIMIT) is not None:
            return None
        return cls(problem.t, index)

    def count(self) -> int:
        """The place of the next type solve in the ladder (from 0, again after a restart)."""
        self._calls += 1
        return self._calls - 1

    def keep(self, k: int, dyn: MeanFieldDynamics, sol: FokkerPlanckSolution) -> None:
        """Remember the first two sets' solves on every output time (the probe's set and the grid check's pair)."""
        if k < 2 and len(self._first) == k:
            self._first.append((dyn, sol))

    def long(self, tol: float) -> bool:
        """Whether the first round's sets differ by more than :attr:`LONG` x the type tolerance ``tol / 2`` in ``R``
        or ``C`` (relative, largest over the output times with ``R >= 1e-3 R(0)`` before a divergence)."""
        (_, c), (_, s) = self._first
        return _sets_apart(c, s, self.t_full) > self.LONG * 0.5 * tol

    def probe(self, n: int, st: float, grid_opts: dict) -> bool:
        """Solve the first set on the ladder's times with its own steps; keep them as the ladder's (True) if that
        took at most :attr:`GAIN` of the evaluations on every output time and diverged where that did.  The probe stops
        once past that (the prediction's budget is charged with what it spent)."""
        dyn, first = self._first[0]
        cap = Budget(max_evaluations=int(self.GAIN * first.nfe))
        try:
            (sol,) = solve_batch_on_grid(dyn, self.t, n, st, **{**grid_opts, "budget": cap})
        except WorkLimitError:
            sol = None
        if grid_opts.get("budget") is not None:
            grid_opts["budget"].spend(cap.used)
        if sol is None or (sol.diverged_at is None) != (first.diverged_at is None):
            return False
        self.schedule, self._probe, self._calls = sol.schedule, sol, 0
        return True

    def solve(self, k: int, dyn: MeanFieldDynamics, n: int, st: float, grid_opts: dict) -> TypeSolve:
        """The ``k``-th ladder solve on the ladder's times and steps (the first is the probe itself)."""
        if k == 0:
            sol = self._probe
        else:
            (sol,) = solve_batch_on_grid(dyn, self.t, n, st, schedule=self.schedule, **grid_opts)
        if k < len(self._first):
            self._full.append((sol, self._first[k][1]))
        return _typesolve(sol, self.t)

    def full(self, sol: FokkerPlanckSolution, n: int, st: float, schedule: list[float],
             grid_opts: dict) -> FokkerPlanckSolution:
        """``sol`` (a ladder solve) on every output time: itself when the ladder ran on them, else the solve kept
        from the first start or its set solved on ``schedule`` (the first set's steps on every output time)."""
        if self.schedule is None:
            return sol
        found = next((every for short, every in self._full if short is sol), None)
        if found is None:
            (found,) = solve_batch_on_grid(sol.dynamics, self.t_full, n, st, schedule=schedule, **grid_opts)
            self._full.append((sol, found))
        return found


def _sets_apart(coarse: FokkerPlanckSolution, fine: FokkerPlanckSolution, t: Tensor, offset: float = 0.0,
                index: Tensor | None = None) -> float:
    """How far two type sets' solves are apart: the largest relative difference (to ``coarse``) of their excess risk
    and curvature (E7, summed over the types; ``offset`` added to the excess risk, e.g. the noise's ``sigma^2 / 2`` for
    the risk) over the output times ``t`` with ``R >= 1e-3 R(0)`` before either diverges (0 where there is none).
    ``index``: compare on the times ``t[index]`` only (a solve on every time ``t`` is taken there, one on those times
    as it is)."""
    every = t.numel()

    def on(x: FokkerPlanckSolution) -> tuple[Tensor, Tensor]:  # (2, n) curves and (n,) risk on the compared times
        c, r = x.type_curves().sum(-1), x.risk
        return (c[:, index], r[index]) if index is not None and c.shape[-1] == every else (c, r)

    (a, risk), (b, _) = on(coarse), on(fine)
    shift = torch.tensor([offset, 0.0], dtype=a.dtype, device=a.device)[:, None]
    a, b = a + shift, b + shift
    ok = _descent_window(t if index is None else t[index], risk, (coarse.diverged_at, fine.diverged_at))
    ok &= torch.isfinite(a).all(0) & torch.isfinite(b).all(0)
    if not bool(ok.any()):
        return 0.0
    return float(((b - a).abs() / a.abs().clamp_min(tiny(a)))[:, ok].max())


def _descent_window(t: Tensor, risk: Tensor, ends: tuple[float | None, ...], floor: float = 1e-3) -> Tensor:
    """``(n,)`` mask of the output times ``t`` where curves are judged: ``R`` finite and ``>= floor R(0)``, before every
    divergence time in ``ends`` (None: none)."""
    ok = torch.isfinite(risk) & (risk >= floor * risk[0])
    for end in ends:
        if end is not None:
            ok &= t < end
    return ok


def _finite_d_parts(values: dict[str, Tensor], t: Tensor, risk: Tensor, diverged_at: float | None,
                    floor: float = 1e-3, curves: dict[str, Tensor] | None = None
                    ) -> tuple[dict[str, float], dict[str, Tensor]]:
    """:func:`~.statistics.finite_d_indicators` as a solution carries them: each one's largest value over the descent
    window (``R >= floor R(0)``, before a divergence, as the error estimates) for ``info["finite_d"]``, and the scatter
    curves (observable -> ``(n,)``).

    Also ``"<name>_compound"`` for R and C: the step index integrated against the observable's own e-folds over the
    window, ``sum step |d ln g|`` (trapezoid over the output times).  The step index is a relative error of the drift;
    where an observable decays by many e-folds that error compounds in its exponent (weight decay taking every weight to
    0: the curvature fell by 332 e-folds at step index 0.042, and SGD's was 146x below a silent prediction,
    ``benchmarks/silent_scan.py`` case 2204); on a descent to ``1e-3 R(0)`` it stays a fraction of the step index times 7.
    ``curves``: the solution's curves (observable -> ``(n,)``; the curvature from there, when asked for)."""
    ok = _descent_window(t, risk, (diverged_at,), floor)
    largest = {k: float(v[ok].max()) if bool(ok.any()) else 0.0 for k, v in values.items()}
    for name in ("risk", "curvature"):
        step, g = values.get(f"{name}_step"), risk if name == "risk" else (curves or {}).get(name)
        if step is not None and g is not None:
            both = ok[1:] & ok[:-1] & (g[1:] > 0) & (g[:-1] > 0)
            folds = (torch.log(g[1:].clamp_min(tiny(g))) - torch.log(g[:-1].clamp_min(tiny(g)))).abs()
            pieces = 0.5 * (step[1:] + step[:-1]) * folds
            largest[f"{name}_compound"] = float(pieces[both].sum()) if bool(both.any()) else 0.0
    return largest, {key[:-len("_scatter")]: v for key, v in values.items() if key.endswith("_scatter")}


def _batch_error(name: str):
    raise TypeError(f"method {name!r}: a problem with a batch of coefficients is solved by solve_batch, not solve")


def _type_info(check: TypeCheck) -> dict[str, Any]:
    return dict(num_types=check.types.num_types, types_exact=check.types.exact, type_solves=check.solves)


class ParticleSolver(Solver):
    """Euler-Maruyama of E4-E5 on the exact coordinates (no quadrature: only Monte Carlo error).

    Options: ``num_particles`` (per replica in total, the same number for every distinct coordinate row,
    weighted by its frequency: at least the number of distinct rows), ``num_replicas`` (independent
    systems; their spread is the standard error), ``dt``, ``extrapolate`` (Richardson in ``dt``),
    ``generator`` (on the problem's device).
    """

    name = "particles"
    defaults = dict(num_particles=32_768, num_replicas=1, dt=2e-3, extrapolate=True, generator=None)

    def solve(self, problem: Problem) -> Solution:
        o = self.options
        types = exact_types(problem.columns, max_types=problem.columns.shape[0])
        total = check_int("num_particles", o["num_particles"], minimum=types.num_types)  # one per distinct row at least
        ps = simulate_particles(problem.dynamics(types), problem.t, problem.observables,
                                num_particles=total // types.num_types, num_replicas=o["num_replicas"], dt=o["dt"],
                                extrapolate=o["extrapolate"], generator=o["generator"],
                                blowup_factor=problem.blowup_factor)
        info = dict(num_particles=total, num_replicas=o["num_replicas"], dt=o["dt"], extrapolate=o["extrapolate"],
                    num_types=types.num_types, types_exact=True, type_solves=1, error_estimates={"types": 0.0})
        return Solution(ps.values, ps.local_rate, ps.diverged_at, ps.stderr, info)


class GradientFlowSolver(Solver):
    """The noiseless limit (noise scale 0): one ODE per type (:func:`~sde_optim.theory.odes.gradient_flow`),
    types from the controlled quadrature.  Options: ``rtol``, ``atol`` of the ODE solver."""

    name = "gradient_flow"
    defaults = dict(rtol=1e-10, atol=1e-12)

    def solve(self, problem: Problem) -> Solution:
        o = self.options

        def solve(types: CoordinateTypes) -> TypeSolve:
            c, w = gradient_flow(problem.dynamics(types), problem.t, rtol=o["rtol"], atol=o["atol"])
            per_type = torch.stack([(OBSERVABLES[n].density(c) * w).sum(-1) for n in ("risk", "curvature")])
            return TypeSolve((c, w), per_type, None)

        check = problem.controlled(solve)
        c, w = check.solve.result
        risk = observable_values(c, w, (OBSERVABLES["risk"],), problem.noise_std)["risk"]
        curves, rate = _outputs(c, w, problem, risk, noise=False)
        largest, scatter = _finite_d_parts(finite_d_indicators(c, w, problem.dim, problem.rates()[0], problem.noise_std,
                                                               problem.observables, problem.coef.step_error,
                                                               problem.decay_rates()),
                                           problem.t, risk, None, curves=curves)  # 0: no noise
        info = dict(error_estimates={"types": check.estimate}, error_estimate=check.estimate, finite_d=largest,
                    **_type_info(check))
        return Solution(curves, rate, None, {}, info, None, scatter)


class LinearSolver(Solver):
    """E9 for the linear model ``f(x) = <x, w>`` started at ``w0 = beta0`` on the same data (THEORY §5 sanity
    case); only ``risk``, ``excess_risk`` and ``distance`` exist.  No options."""

    name = "ode"
    defaults: ClassVar[dict[str, Any]] = {}

    def solve(self, problem: Problem) -> Solution:
        bad = [o.name for o in problem.observables if o.name not in LINEAR_OBSERVABLES]
        if bad:
            raise ValueError(f"observables for method 'ode' (linear model, E9) must be among {LINEAR_OBSERVABLES}; got {bad}")
        if problem.coef.decays:
            raise ValueError("method 'ode' (the linear model of E9) does not model weight decay; use method 'pde'")
        coef = problem.coef

        def solve(types: CoordinateTypes) -> TypeSolve:
            types = types.to(dtype=problem.dtype)
            risk, m = linear_least_squares(types.lam, types.beta_star, types.beta0, types.weight, gamma=coef,
                                           noise_std=problem.noise_std, t_out=problem.t)
            per_type = torch.stack([0.5 * types.weight * types.lam * m, types.weight * m])
            return TypeSolve((types, risk, m), per_type, first_divergence(risk, problem.t, problem.blowup_factor))

        check = problem.controlled(solve)
        types, risk, m = check.solve.result
        gamma, nu = problem.rates()
        dmdt = -2.0 * gamma[:, None] * types.lam * m + 2.0 * nu[:, None] * types.lam * risk[:, None]
        rate = -(0.5 * (types.weight * types.lam * dmdt).sum(-1)) / risk
        values = {"risk": risk, "excess_risk": risk - 0.5 * problem.noise_std**2, "distance": (types.weight * m).sum(-1)}
        info = dict(error_estimates={"types": check.estimate}, error_estimate=check.estimate, **_type_info(check))
        return Solution({o.name: values[o.name] for o in problem.observables}, rate, check.solve.diverged_at, {}, info)


SOLVERS: dict[str, type[Solver]] = {cls.name: cls for cls in (PDESolver, ParticleSolver, GradientFlowSolver, LinearSolver)}

