"""``sde-optim``: predict, compare, find the stability edge and the best learning rate from the command line.

    sde-optim predict --dim 4096 --lr 0.5 --horizon 8 --csv pred.csv --png pred.png
    sde-optim compare --dim 2048 --lr 0.5 --horizon 6 --seeds 4 --logdir runs/compare
    sde-optim critical-lr --dim 4096 --batch-size 1 --horizon 10
    sde-optim best-lr --dim 2048 --noise-std 0.3 --horizon 2
    sde-optim compare --dim 4096 --lr 0.05 --momentum 0.9 --schedule cosine --weight-decay 1e-4

All sizes are in THEORY's conventions: features x ~ N(0, lambda / d) with mean(lambda) = 1,
SGD time t = k / d (E2); --horizon is in units of t. Figures are written as PNG and, with the
same stem, PDF. `compare` writes TensorBoard runs LOGDIR/version_N/{sgd,homogenized} (a new
N per invocation) with the tags of the TheoryMonitor callback: {observable}/measured,
{observable}/predicted, {observable}/rel_error. Progress goes to stderr on a terminal only.
Errors name the flag and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import inspect
import math
import os
import re
import sys
import threading
import warnings
from typing import Callable, Iterator, Sequence

import torch
from tqdm import tqdm

from . import __version__
from .models import DiagonalLinearNetwork
from .observables import OBSERVABLES, relative_error
from .plotting import comparison_figure, mask_divergence, prediction_series, save_figure, sweep_figure
from .simulation import train_homogenized, train_sgd
from .teacher import TeacherProblem, TeacherSpec
from .optim.schedules import SCHEDULES, check_schedule
from .theory import SGDConfig, best_lr, critical_lr, predict, predict_sweep, solve_fokker_planck
from .theory.describe import named_sgd

__all__ = [
    "main", "build_parser", "HelpFormatter", "positive_int", "int_in", "float_in", "progress",
    "check_output_file", "check_output_dir", "check_teacher_support", "next_version_dir",
    "add_sgd_arguments", "sgd_config", "example_parser", "ExampleHelpFormatter",
    "MAX_DIM", "MAX_HORIZON", "MAX_COMPARE_STEPS", "MAX_BATCH_NUMBERS",
]

#: Largest ``--dim`` accepted (a few vectors of this size are ~100 MB in float64).
MAX_DIM = 10**7
#: Largest ``--horizon`` (SGD time t) accepted.
MAX_HORIZON = 10**4
#: Largest number of SGD steps per run for ``compare`` (real SGD, about 1-3 ms per step on one CPU core).
MAX_COMPARE_STEPS = 10**6
#: Largest minibatch ``--batch-size * --dim`` (numbers drawn per step) for ``compare``: 0.8 GB in float64.
MAX_BATCH_NUMBERS = 10**8
#: Divergence threshold of the measured risk in ``compare``'s figure (``predict``'s default ``blowup_factor``).
BLOWUP_FACTOR = 1e4

_RUNS = {"sgd": ("SGD", train_sgd), "homogenized": ("HomogenizedSGD", train_homogenized)}
_COMPARE_OBSERVABLES = ("risk", "curvature")


# ----------------------------------------------------------------------------- argument types, help, checks
class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and appends ``(default: X)`` to every option whose help does not
    already say what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not action.option_strings or action.default in (None, argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer in ``[lo, hi]`` (``hi=None``: no upper bound)."""
    rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer {rng}, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"expected an integer {rng}, got {value}")
        return value

    return parse


positive_int = int_in(1)


def float_in(lo: float, hi: float = math.inf, *, strict: bool = False) -> Callable[[str], float]:
    """argparse type: a finite number ``>= lo`` (``> lo`` if ``strict``) and ``<= hi``."""
    rng = f"{'>' if strict else '>='} {lo:g}" + ("" if hi == math.inf else f" and <= {hi:g}")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {rng}, got {text!r}") from None
        if not (math.isfinite(value) and (value > lo if strict else value >= lo) and value <= hi):
            raise argparse.ArgumentTypeError(f"expected a number {rng}, got {text!r}")
        return value

    return parse


def _observable_names(text: str) -> list[str]:
    """argparse type of ``--observables``: comma-separated registry names or ``all``."""
    if text == "all":
        return list(OBSERVABLES)
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or any(n not in OBSERVABLES for n in names):
        raise argparse.ArgumentTypeError(f"expected comma-separated names from {', '.join(OBSERVABLES)} or 'all', "
                                         f"got {text!r}")
    return names


def check_teacher_support(dim: int, density: float) -> None:
    """Refuse a teacher without support: ``TeacherProblem.sparse`` makes ``round(density * dim)`` entries nonzero."""
    if int(round(density * dim)) < 1:
        raise ValueError(f"--density {density:g} with --dim {dim} gives a teacher with no nonzero coordinate "
                         f"(round(density * dim) = 0, nothing to learn); use --density > {0.5 / dim:.3g} or a "
                         "larger --dim")


def check_output_file(flag: str, path: str, suffix: str | None = None) -> None:
    """``path`` must be a file name (ending in ``suffix`` if given) in an existing, writable directory."""
    if suffix is not None and not path.lower().endswith(suffix):
        raise ValueError(f"{flag} must be a file name ending in {suffix}, got {path!r}")
    directory = os.path.dirname(path) or "."
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a directory; give a file name")
    if not os.path.isdir(directory):
        raise ValueError(f"{flag} {path!r}: the directory {directory!r} does not exist")
    if not os.access(directory, os.W_OK):
        raise ValueError(f"{flag} {path!r}: the directory {directory!r} is not writable")


def check_output_dir(flag: str, path: str) -> None:
    """``path`` must be a directory or creatable as one: its deepest existing ancestor a writable directory."""
    ancestor = os.path.abspath(path)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ValueError(f"{flag} {path!r} cannot be a directory: {ancestor!r} is a file")
    if not os.access(ancestor, os.W_OK):
        raise ValueError(f"{flag} {path!r}: {ancestor!r} is not writable")


def next_version_dir(root: str) -> str:
    """Create and return ``root/version_N``, ``N`` one more than the largest existing (0 for the first)."""
    os.makedirs(root, exist_ok=True)
    taken = [int(m.group(1)) for name in os.listdir(root) if (m := re.fullmatch(r"version_(\d+)", name))]
    number = max(taken, default=-1) + 1
    while True:
        path = os.path.join(root, f"version_{number}")
        try:
            os.makedirs(path)
            return path
        except FileExistsError:  # another invocation took it meanwhile
            number += 1


@contextlib.contextmanager
def progress(total: int | None = None, desc: str = "", *, unit: str = "it", file=None,
             interval: float = 1.0) -> Iterator[tqdm]:
    """A tqdm bar on ``file`` (stderr) that also ticks every ``interval`` seconds while one long call runs.

    Disabled (silent, no thread) unless ``file`` is a terminal. ``total=None``: one task of unknown length,
    shown as the elapsed time.
    """
    stream = sys.stderr if file is None else file
    fmt = "{desc}: {elapsed} elapsed" if total is None else None
    bar = tqdm(total=total, desc=desc, unit=unit, file=stream, disable=None, dynamic_ncols=True, bar_format=fmt)
    stop = threading.Event()
    ticker = None if bar.disable else threading.Thread(target=_tick, args=(bar, stop, interval), daemon=True)
    if ticker is not None:
        ticker.start()
    try:
        yield bar
    finally:
        stop.set()
        if ticker is not None:
            ticker.join()
        bar.close()


def _tick(bar: tqdm, stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        bar.refresh()


@contextlib.contextmanager
def _warnings_as_messages(prog: str) -> Iterator[None]:
    """Show library warnings as ``prog: warning: ...`` lines on stderr (above any progress bar)."""
    def show(message, category, filename, lineno, file=None, line=None):
        hint = " (flags: --tol, --max-cells, --max-evaluations, --max-types)" if "relax tol" in str(message) else ""
        tqdm.write(f"{prog}: warning: {message}{hint}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


# ----------------------------------------------------------------------------- parser
def _default(fn: Callable, name: str):
    """The default of keyword ``name`` of ``fn`` (``None`` if it has none)."""
    param = inspect.signature(fn).parameters.get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def _add_problem_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("problem and network")
    g.add_argument("--dim", type=int_in(1, MAX_DIM), default=2048, help="dimension d")
    g.add_argument("--density", type=float_in(0, 1), default=0.1,
                   help="teacher support fraction: round(density * dim) coordinates are +-1, at least one")
    g.add_argument("--spectrum", choices=["isotropic", "two-level", "power-law"], default="isotropic",
                   help="feature spectrum lambda (mean 1)")
    g.add_argument("--noise-std", type=float_in(0), default=0.0, help="label noise sigma")
    g.add_argument("--alpha", type=float_in(0), default=0.1, help="initialization scale")
    g.add_argument("--init", choices=["unbalanced", "balanced"], default="unbalanced", help="initialization shape")
    g.add_argument("--seed", type=int, default=0, help="teacher seed")
    g.add_argument("--batch-size", type=positive_int, default=1, help="SGD batch size B")
    g.add_argument("--horizon", type=float_in(0, MAX_HORIZON, strict=True), default=6.0,
                   help="SGD time t = steps / d")


def _add_solver_args(p: argparse.ArgumentParser, fn: Callable) -> None:
    """--tol, --max-types, --max-cells, --max-evaluations of the PDE solves of ``fn`` (predict or critical_lr)."""
    g = p.add_argument_group("PDE accuracy and work bound")
    g.add_argument("--tol", type=float_in(0, 1, strict=True), default=_default(fn, "tol"),
                   help="target relative error of the predicted risk and curvature")
    g.add_argument("--max-types", type=positive_int, default=_default(predict, "max_types"),
                   help="cap on the coordinate types of the quadrature")
    g.add_argument("--max-cells", type=int_in(8), default=None, help="cap on the cells per type of the "
                   f"Fokker-Planck grid (default: the solver's, {_default(solve_fokker_planck, 'max_cells')})")
    unused = " (critical-lr solves on the a priori grid of --tol, without refinement: no effect there)"
    g.add_argument("--max-evaluations", type=positive_int, default=None,
                   help="cap on the operator evaluations of the grid refinement (default: the solver's, "
                        f"{_default(solve_fokker_planck, 'max_evaluations')})" + (unused if fn is critical_lr else ""))
    g.add_argument("--max-work", type=float_in(0, math.inf, strict=True), default=None,
                   help="cap on the cell updates (types x cells x evaluations) of the grid refinement (default: the "
                        f"solver's, {_default(solve_fokker_planck, 'max_work'):g})"
                        + (unused if fn is critical_lr else ""))


def _add_lr_search_args(p: argparse.ArgumentParser, fn: Callable) -> None:
    """What a search over the learning rate (critical-lr, best-lr) shares: ``--lr`` (the schedule's peak whose shape
    is scaled), the SGD flags and the PDE accuracy flags of ``fn``."""
    p.add_argument("--lr", type=float_in(0, strict=True), default=1.0,
                   help="with --schedule: the schedule's peak lr that the result scales (its shape is kept)")
    add_sgd_arguments(p)
    _add_solver_args(p, fn)


class ExampleHelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The examples' help: the module docstring as written, and every flag's default after its help."""


def example_parser(description: str, *, dim: int = 1024, batch_help: str = "SGD batch size B") -> argparse.ArgumentParser:
    """The flags every example shares: the teacher's (:meth:`TeacherSpec.add_arguments`), ``--lr``,
    ``--batch-size`` and ``--version``."""
    ap = argparse.ArgumentParser(description=description, formatter_class=ExampleHelpFormatter)
    TeacherSpec.add_arguments(ap, dim=dim)  # --dim --density --spectrum --values --noise-std --exponent --ratio
    ap.add_argument("--lr", type=float, default=0.5, help="SGD step size")
    ap.add_argument("--batch-size", type=int, default=1, help=batch_help)
    ap.add_argument("--version", action="version", version=f"%(prog)s (sde-optim {__version__})")
    return ap


def add_sgd_arguments(p: argparse.ArgumentParser, schedule_flag: str = "--schedule") -> None:
    """``--momentum --dampening --nesterov --weight-decay`` (torch.optim.SGD's meanings) and a learning-rate
    schedule flag (:mod:`sde_optim.optim.schedules`); read back with :func:`sgd_config`."""
    g = p.add_argument_group("SGD hyper-parameters (torch.optim.SGD's, THEORY §7)")
    g.add_argument("--momentum", type=float_in(0, 1), default=0.0, help="momentum mu, in [0, 1)")
    g.add_argument("--dampening", type=float_in(0, 1), default=0.0, help="dampening tau of the momentum buffer")
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum (needs --momentum > 0, no dampening)")
    g.add_argument("--weight-decay", type=float_in(0), default=0.0, help="coupled (L2) weight decay")
    g.add_argument(schedule_flag, dest="schedule", type=_schedule_spec, default="constant",
                   help=f"learning-rate schedule over the run, stepped every SGD step: {', '.join(SCHEDULES)}")


def _schedule_spec(text: str) -> str:
    try:
        return check_schedule(text)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def sgd_config(args: argparse.Namespace, steps: int) -> SGDConfig:
    """The SGD the flags describe over ``steps`` steps: a ``torch.optim.SGD`` with the flags' hyper-parameters and
    the named scheduler, read by :func:`~sde_optim.theory.describe_sgd` (the path TheoryMonitor takes), so the
    predicted schedule is the one torch runs. ``ValueError`` naming the flag for a bad combination."""
    lr = max(args.lr) if isinstance(args.lr, list) else args.lr  # predict --lr a,b,...: the template at the largest
    try:
        return named_sgd(steps, lr=lr, batch_size=args.batch_size, momentum=args.momentum,
                         dampening=args.dampening, nesterov=args.nesterov, weight_decay=args.weight_decay,
                         schedule=args.schedule)
    except ValueError as exc:
        raise ValueError(f"--momentum/--dampening/--nesterov/--schedule: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    """The ``sde-optim`` parser with its three subcommands."""
    ap = argparse.ArgumentParser(prog="sde-optim", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="{predict,compare,critical-lr,best-lr}")

    p = sub.add_parser("predict", help="predict risk/curvature curves; print a table, write CSV/figure",
                       formatter_class=HelpFormatter)
    _add_problem_args(p)
    p.add_argument("--lr", type=_lr_list, default=[0.5],
                   help="SGD step size; several, comma-separated, are predicted in one batched solve (predict_sweep)")
    p.add_argument("--method", choices=["pde", "particles", "ode", "gradient_flow"], default="pde",
                   help="prediction method (sde_optim.predict)")
    p.add_argument("--observables", type=_observable_names, default=["risk", "curvature"],
                   help=f"comma-separated, from {', '.join(OBSERVABLES)} or 'all' (default: risk,curvature)")
    p.add_argument("--rows", type=int_in(1, 10_000), default=13, help="table rows")
    p.add_argument("--csv", help="write the curves to this CSV file (default: none)")
    p.add_argument("--png", help="write a figure to this .png file and a .pdf next to it (default: none)")
    add_sgd_arguments(p)
    _add_solver_args(p, predict)
    p.set_defaults(run=_cmd_predict, parser=p)

    c = sub.add_parser("compare", help="run SGD and HomogenizedSGD against the PDE; TensorBoard logs and a figure",
                       formatter_class=HelpFormatter)
    _add_problem_args(c)
    c.add_argument("--lr", type=float_in(0, strict=True), default=0.5, help="SGD step size")
    c.add_argument("--seeds", type=int_in(1, 256), default=2, help="runs per optimizer")
    c.add_argument("--points", type=int_in(1, 10_000), default=48, help="measurements per run")
    c.add_argument("--logdir", default="runs/compare",
                   help="TensorBoard root; each invocation writes LOGDIR/version_N/{sgd,homogenized}")
    c.add_argument("--png", help="figure path, .png (a .pdf is written next to it) (default: LOGDIR/version_N/compare.png)")
    add_sgd_arguments(c)
    _add_solver_args(c, predict)
    c.set_defaults(run=_cmd_compare, parser=c)

    k = sub.add_parser("critical-lr", help="predicted largest stable learning rate", formatter_class=HelpFormatter)
    _add_problem_args(k)
    k.add_argument("--rel-tol", type=float_in(0, 1, strict=True), default=_default(critical_lr, "rel_tol"),
                   help="relative width of the final bisection bracket")
    k.add_argument("--max-solves", type=positive_int, default=_default(critical_lr, "max_evaluations"),
                   help="cap on the PDE solves of the search")
    _add_lr_search_args(k, critical_lr)
    k.set_defaults(run=_cmd_critical_lr, parser=k)

    b = sub.add_parser("best-lr", help="learning rate with the least predicted risk at the end of the horizon",
                       formatter_class=HelpFormatter)
    _add_problem_args(b)
    b.add_argument("--critical", type=float_in(0, strict=True), default=None,
                   help="critical lr bounding the search (default: computed, as critical-lr)")
    b.add_argument("--lower", type=float_in(0, 1, strict=True), default=_default(best_lr, "lower"),
                   help="smallest lr searched, as a fraction of the critical lr")
    b.add_argument("--upper", type=float_in(0, 1, strict=True), default=_default(best_lr, "upper"),
                   help="largest lr searched, as a fraction of the critical lr (at most 1)")
    b.add_argument("--sweep-size", type=int_in(3), default=_default(best_lr, "sweep_size"),
                   help="learning rates per batched sweep (two sweeps)")
    _add_lr_search_args(b, best_lr)
    b.set_defaults(run=_cmd_best_lr, parser=b)
    return ap


# ----------------------------------------------------------------------------- commands
def _validate(args: argparse.Namespace) -> None:
    """Checks across flags and of output paths, before any work starts (ValueError naming the flag)."""
    check_teacher_support(args.dim, args.density)
    if args.momentum >= 1.0:
        raise ValueError(f"--momentum must be in [0, 1) (the SDE limit needs a stationary buffer); got {args.momentum}")
    if args.nesterov and (args.momentum <= 0 or args.dampening != 0):
        raise ValueError("--nesterov needs --momentum > 0 and --dampening 0 (as torch.optim.SGD)")
    if args.schedule.startswith("warmup-cosine:") and int(args.schedule.split(":")[1]) >= _steps(args):
        raise ValueError(f"--schedule {args.schedule}: the warmup must be shorter than the run's {_steps(args)} steps")
    for flag in ("csv", "png"):
        path = getattr(args, flag, None)
        if path:
            check_output_file(f"--{flag}", path, ".png" if flag == "png" else None)
    if args.command == "compare":
        check_output_dir("--logdir", args.logdir)
        steps = _steps(args)
        if steps > MAX_COMPARE_STEPS:
            raise ValueError(f"--horizon {args.horizon:g} at --dim {args.dim} is {steps} SGD steps per run; compare "
                             f"runs real SGD and accepts at most {MAX_COMPARE_STEPS} (lower --horizon or --dim)")
        if args.batch_size * args.dim > MAX_BATCH_NUMBERS:
            raise ValueError(f"--batch-size {args.batch_size} at --dim {args.dim} draws {args.batch_size * args.dim} "
                             f"numbers per SGD step; compare accepts at most {MAX_BATCH_NUMBERS}")


def _steps(args: argparse.Namespace) -> int:
    return max(1, int(round(args.horizon * args.dim)))


def _setup(args: argparse.Namespace) -> tuple[TeacherProblem, DiagonalLinearNetwork, int, SGDConfig]:
    problem = TeacherProblem.sparse(args.dim, args.density, spectrum=args.spectrum, noise_std=args.noise_std,
                                    seed=args.seed)
    model = DiagonalLinearNetwork(args.dim, alpha=args.alpha, init=args.init, dtype=torch.float64)
    steps = _steps(args)
    return problem, model, steps, sgd_config(args, steps)


def _solver_kwargs(args: argparse.Namespace) -> dict:
    """``tol``, ``max_types`` and ``solver_options`` for predict/critical_lr from the flags."""
    options = {key: getattr(args, key) for key in ("max_cells", "max_evaluations", "max_work")
               if getattr(args, key) is not None}
    return {"tol": args.tol, "max_types": args.max_types, **({"options": options} if options else {})}


def _title(args: argparse.Namespace, sgd: SGDConfig, lr_text: str | None = None) -> str:
    extras = sgd.options() + ([f"{args.schedule} schedule"] if args.schedule != "constant" else [])
    return (f"d={args.dim}, lr={lr_text or format(args.lr, 'g')}, B={args.batch_size}, " + "".join(e + ", " for e in extras)
            + f"density={args.density:g}, {args.spectrum} spectrum, sigma={args.noise_std:g}, "
            f"{args.init} init alpha={args.alpha:g}")


def _cmd_predict(args: argparse.Namespace) -> None:
    if len(args.lr) > 1:
        return _cmd_predict_sweep(args)
    args.lr = args.lr[0]
    problem, model, steps, sgd = _setup(args)
    names = args.observables
    with progress(None, f"predict ({args.method})"):
        pred = predict(problem, model, sgd=sgd, steps=steps, method=args.method, observables=names,
                       **_solver_kwargs(args))
    _print_table(pred, names, args.rows)
    if args.csv:
        _write_csv(args.csv, [pred], names)
        print(f"wrote {args.csv}")
    if args.png:
        label = ("PDE" if args.method == "pde" else args.method.replace("_", " ")) + " prediction"
        predicted, scatter = prediction_series(pred, names)
        fig = comparison_figure(predicted, {}, title=f"{label}: {_title(args, sgd)}", dim=args.dim,
                                divergence_step=pred.divergence_step, prediction_label=label, scatter=scatter)
        print("wrote " + ", ".join(save_figure(fig, args.png)))


def _cmd_predict_sweep(args: argparse.Namespace) -> None:
    """``predict --lr a,b,...``: every lr in one batched solve; a table per lr, one CSV, one figure."""
    lrs, args.lr = args.lr, max(args.lr)
    problem, model, steps, sgd = _setup(args)  # the schedule's shape at the largest lr; each lr scales its peak
    names = args.observables
    with progress(None, f"predict ({args.method}) at {len(lrs)} learning rates"):
        preds = predict_sweep(problem, model, sgd=sgd, lr=lrs, steps=steps, method=args.method, observables=names,
                              **_solver_kwargs(args))
    for lr, pred in zip(lrs, preds):
        print(f"lr = {lr:g}")
        _print_table(pred, names, args.rows)
    if args.csv:
        _write_csv(args.csv, preds, names, lrs)
        print(f"wrote {args.csv}")
    if args.png:
        curves = {f"lr = {lr:g}": {n: (p.steps.tolist(), p.curves[n].tolist()) for n in names} for lr, p in zip(lrs, preds)}
        label = "PDE" if args.method == "pde" else args.method.replace("_", " ")
        title = f"{label} predictions: " + _title(args, sgd, lr_text=",".join(f"{x:g}" for x in lrs))
        print("wrote " + ", ".join(save_figure(sweep_figure(curves, title=title, dim=args.dim), args.png)))


def _lr_list(text: str) -> list[float]:
    """``--lr 0.5`` or ``--lr 0.1,0.2,0.5``: positive, finite, distinct step sizes."""
    check = float_in(0, strict=True)
    values = [check(x.strip()) for x in text.split(",")]
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"learning rates must be distinct; got {text!r}")
    return values


def _print_table(pred, names: Sequence[str], rows: int) -> None:
    idx = torch.linspace(0, len(pred.steps) - 1, min(rows, len(pred.steps))).round().long().unique()
    print(f"{'step':>9} {'t':>7} " + " ".join(f"{n:>14}" for n in names) + f" {'rate -dlogR/dt':>15}")
    for i in idx.tolist():
        vals = " ".join(f"{float(pred.curves[n][i]):14.6g}" for n in names)
        print(f"{int(pred.steps[i]):9d} {float(pred.t[i]):7.3f} {vals} {float(pred.local_rate[i]):15.4g}")
    if pred.divergence_step is not None:
        print(f"the risk is predicted to diverge at SGD step {pred.divergence_step}")
    estimate = pred.info.get("error_estimate")
    if estimate is not None:
        print(f"estimated relative error of the prediction: {estimate:.2g}")
    stiff = pred.info.get("stiff")
    if stiff is not None:  # PDESolver's scheme "auto" switched (a stiff type set the steps of MPRK22)
        print(f"time step: the midpoint rule (a type with k h = {stiff['kh']:.3g} at t = {stiff['t']:.3g}, "
              f"{100 * stiff['rejected']:.0f} % of the attempts rejected, set MPRK22's steps)")


def _write_csv(path: str, preds: Sequence, names: Sequence[str], lrs: Sequence[float] | None = None) -> None:
    """One row per output step of each prediction; with several (a sweep, learning rates ``lrs``) a first column
    ``lr`` tells them apart."""
    sweep = lrs is not None
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["lr"] * sweep + ["step", "t", *names, "local_rate"])
        for k, pred in enumerate(preds):
            for i in range(len(pred.steps)):
                w.writerow(([lrs[k]] if sweep else []) + [int(pred.steps[i]), float(pred.t[i]),
                           *(float(pred.curves[n][i]) for n in names), float(pred.local_rate[i])])


def _cmd_compare(args: argparse.Namespace) -> None:
    problem, model, steps, sgd = _setup(args)
    every = max(1, steps // args.points)
    with progress(None, "PDE prediction"):
        pred = predict(problem, model, sgd=sgd, steps=steps, observables=_COMPARE_OBSERVABLES, **_solver_kwargs(args))
    runs = _train_runs(problem, args, steps, every, sgd)
    xs = list(range(0, steps + 1, every))
    version = next_version_dir(args.logdir)
    for folder, curves in runs.items():
        _log_run(os.path.join(version, folder), xs, curves, pred)
    predicted, scatter = prediction_series(pred, _COMPARE_OBSERVABLES)
    measured = {_RUNS[f][0]: {n: (xs, v.tolist()) for n, v in curves.items()} for f, curves in runs.items()}
    fig = comparison_figure(predicted, measured, title=_title(args, sgd), dim=args.dim,
                            divergence_step=pred.divergence_step, prediction_label="PDE prediction", scatter=scatter)
    written = save_figure(fig, args.png or os.path.join(version, "compare.png"))
    _print_summary(runs, xs, pred)
    print(f"TensorBoard runs: {os.path.join(version, '{' + ','.join(runs) + '}')} "
          f"(view with: tensorboard --logdir {args.logdir})\nfigure: {', '.join(written)}")


def _print_summary(runs: dict[str, dict], xs: Sequence[int], pred) -> None:
    """Largest relative deviation of each optimizer's seed-mean risk from the PDE, and diverged runs."""
    if pred.divergence_step is not None:
        print(f"the PDE predicts that the risk diverges at SGD step {pred.divergence_step}")
    for folder, curves in runs.items():
        risk = curves["risk"]
        pairs = [(float(m), pred.at_step(x)["risk"]) for x, m in zip(xs, risk.mean(0))]
        rels = [relative_error(m, p) for m, p in pairs if math.isfinite(m) and math.isfinite(p)]
        diverged = int((~risk.isfinite()).any(1).sum())
        print(f"{_RUNS[folder][0]:<16} max relative risk deviation from the PDE: {max(rels):.2%} at the {len(rels)} "
              f"step(s) where both are finite (mean of {risk.shape[0]} runs; {diverged} diverged: risk above "
              f"{BLOWUP_FACTOR:g} R(0))")


def _train_runs(problem: TeacherProblem, args: argparse.Namespace, steps: int, every: int,
                sgd: SGDConfig) -> dict[str, dict]:
    """``{folder: {observable: (seeds, points) tensor}}``; values from a diverged risk on are ``inf``."""
    common = dict(sgd=sgd, steps=steps, record_every=every, alpha=args.alpha, init=args.init,
                  observables=_COMPARE_OBSERVABLES)
    out = {}
    with progress(len(_RUNS) * args.seeds * steps, "SGD runs", unit="step") as bar:
        for folder, (label, train) in _RUNS.items():
            seeds = []
            for s in range(args.seeds):
                bar.set_postfix_str(f"{label} seed {s}")
                seeds.append(train(problem, seed=1000 + s, **common))
                bar.update(steps)
            curves = {n: torch.stack([c[n] for c in seeds]) for n in _COMPARE_OBSERVABLES}
            finite = torch.from_numpy(mask_divergence(curves["risk"].numpy(), BLOWUP_FACTOR)).isfinite()
            out[folder] = {n: torch.where(finite, v, math.inf) for n, v in curves.items()}
    return out


def _log_run(directory: str, xs: Sequence[int], curves: dict, pred) -> None:
    """One TensorBoard run: the seed mean as ``{obs}/measured``, the prediction, their relative error, one run's
    expected scatter."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(directory) as w:
        w.add_custom_scalars({"sde_optim": {n: ["Multiline", [f"{n}/measured", f"{n}/predicted"]] for n in curves}})
        for i, x in enumerate(xs):
            predicted = pred.at_step(x)
            for n, values in curves.items():
                m, p = float(values[:, i].mean()), float(predicted[n])
                w.add_scalar(f"{n}/measured", m, global_step=x)
                w.add_scalar(f"{n}/predicted", p, global_step=x)
                w.add_scalar(f"{n}/rel_error", relative_error(m, p), global_step=x)
                if f"{n}_scatter" in predicted:  # one run's; the seed mean's is this / sqrt(seeds)
                    w.add_scalar(f"{n}/scatter", float(predicted[f"{n}_scatter"]), global_step=x)


def _cmd_critical_lr(args: argparse.Namespace) -> None:
    problem, model, steps, sgd = _setup(args)
    with progress(None, "critical-lr (bisection on PDE solves)"):
        try:
            res = critical_lr(problem, model, sgd=sgd, steps=steps, rel_tol=args.rel_tol,
                              max_evaluations=args.max_solves, **_solver_kwargs(args))
        except RuntimeError as exc:
            if "max_evaluations" not in str(exc):
                raise
            raise ValueError(f"the search needed more than --max-solves {args.max_solves} PDE solves; raise "
                             "--max-solves or --rel-tol, or lengthen --horizon") from None
    print(f"predicted critical lr (risk bounded over t <= {args.horizon:g}): {res.bounded:.6g}")
    if res.decay is not None:
        print(f"largest lr for which the risk decays to zero: {res.decay:.6g}")
    checked = ("grid fixed: not checked" if res.grid_estimate is None else
               f"grid checked up to {res.num_cells} cells, grid estimate {res.grid_estimate:.2g}: the edges' relative "
               "change between the last grids, space + time, at most the bracket where it held")
    print(f"({res.evaluations} PDE solves, bracket width {res.rel_tol:g}; {checked})")


def _cmd_best_lr(args: argparse.Namespace) -> None:
    if args.lower >= args.upper:
        raise ValueError(f"--lower ({args.lower:g}) must be below --upper ({args.upper:g})")
    problem, model, steps, sgd = _setup(args)
    with progress(None, "best-lr (critical lr, then two batched PDE sweeps)"):
        res = best_lr(problem, model, sgd=sgd, steps=steps, critical=args.critical, lower=args.lower, upper=args.upper,
                      sweep_size=args.sweep_size, **_solver_kwargs(args))
    print(f"best lr for {steps} steps (t = {args.horizon:g}): {res.lr:.6g}, predicted risk {res.risk:.6g} "
          f"(located to {100 * res.tolerance:.2g} %)")
    print(f"critical lr (risk bounded over the horizon): {res.critical:.6g}; best / critical = {res.lr / res.critical:.3g}")
    print(f"{'lr':>12} {'predicted R(end)':>17}")
    for lr, r in zip(res.candidates.tolist(), res.final_risk.tolist()):
        print(f"{lr:12.5g} {r:17.6g}" + ("  <- best" if lr == res.lr else ""))


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sde-optim``; returns 0, or exits with status 2 and an ``error:`` line naming the flag."""
    args = build_parser().parse_args(argv)
    prog = f"sde-optim {args.command}"
    try:
        _validate(args)
    except ValueError as exc:
        args.parser.error(str(exc))
    try:
        with _warnings_as_messages(prog):
            args.run(args)
    except (ValueError, TypeError, OSError) as exc:
        args.parser.exit(2, f"{prog}: error: {exc}\n")
    except KeyboardInterrupt:
        args.parser.exit(130, f"{prog}: interrupted\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
