"""The sde-optim console script, the figures of sde_optim.plotting and the examples lr_sweep and compare_optimizers."""

from __future__ import annotations

import argparse
import importlib.util
import csv
import io
import math
import os
from pathlib import Path

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import sde_optim
from sde_optim.cli import build_parser, main as cli_main, progress
from sde_optim.plotting import SCATTER_LABEL, comparison_figure, grid_shape, mask_divergence, save_figure

ROOT = Path(__file__).resolve().parents[1]


def _example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "lightning_examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_scalars(run_dir):
    """``{tag: [(step, value), ...]}`` of one TensorBoard run folder, which must hold exactly one event file."""
    events = [p for p in os.listdir(run_dir) if p.startswith("events.out.tfevents")]
    assert len(events) == 1, (run_dir, events)
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _check_figure_files(png):
    """The PNG is a real plot (large, not blank) and a PDF with the same stem exists."""
    png = Path(png)
    image = mpimg.imread(png)
    assert image.shape[0] > 300 and image.shape[1] > 400
    assert float(image[..., :3].std()) > 0.05  # lines and text, not a blank canvas
    assert png.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"


# ----------------------------------------------------------------------------- sde-optim predict / compare / critical-lr
def test_cli_predict_writes_table_csv_and_figure(tmp_path, capsys):
    csv_path, png_path = tmp_path / "p.csv", tmp_path / "p.png"
    assert cli_main(["predict", "--dim", "512", "--horizon", "4", "--csv", str(csv_path), "--png", str(png_path)]) == 0
    out = capsys.readouterr().out
    assert "risk" in out and "curvature" in out and "estimated relative error" in out
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "step,t,risk,curvature,local_rate" and len(lines) > 10
    _check_figure_files(png_path)


def test_cli_predict_says_when_a_stiff_type_switched_the_time_step(monkeypatch, capsys):
    """The scheme "auto" switching to the midpoint rule is printed under the table with what switched it (forced here:
    every step counts as stiff, whatever the rejections); a prediction that stays on MPRK22 prints no such line."""
    from sde_optim.theory.solvers import PDESolver

    argv = ["predict", "--dim", "256", "--horizon", "2"]
    assert cli_main(argv) == 0
    assert "time step" not in capsys.readouterr().out
    for name, value in (("STIFF_KH", -math.inf), ("STIFF_STEPS", 1), ("STIFF_REJECTED", 0.0)):
        monkeypatch.setattr(PDESolver, name, value)
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "time step: the midpoint rule (a type with k h = " in out and "estimated relative error" in out


def test_cli_compare_writes_the_callback_tags_in_a_fresh_version_per_invocation(tmp_path, capsys):
    """Same tags as TheoryMonitor, one run folder per optimizer, one event file per run; a second
    invocation into the same logdir goes to version_1 instead of appending to version_0."""
    base = ["compare", "--dim", "128", "--seeds", "2", "--logdir", str(tmp_path)]
    cli_main(base + ["--horizon", "2", "--points", "8"])
    cli_main(base + ["--horizon", "0.5", "--points", "2"])
    assert sorted(os.listdir(tmp_path)) == ["version_0", "version_1"]
    predicted = {}
    for run in ("sgd", "homogenized"):
        scalars = _run_scalars(tmp_path / "version_0" / run)
        assert set(scalars) == {f"{n}/{k}" for n in ("risk", "curvature")
                                for k in ("measured", "predicted", "rel_error", "scatter")}
        for name in ("risk", "curvature"):
            steps = [s for s, _ in scalars[f"{name}/measured"]]
            assert steps == list(range(0, 257, 32))
            for (_, m), (_, p), (_, r) in zip(*(scalars[f"{name}/{k}"] for k in ("measured", "predicted", "rel_error"))):
                assert r == pytest.approx(abs(m - p) / abs(p), rel=1e-5, abs=1e-7)
        predicted[run] = scalars["risk/predicted"]
        _run_scalars(tmp_path / "version_1" / run)
    assert predicted["sgd"] == predicted["homogenized"]  # one prediction, overlaid in both runs
    _check_figure_files(tmp_path / "version_0" / "compare.png")
    assert "max relative risk deviation" in capsys.readouterr().out


def test_cli_critical_lr_answers_and_names_its_work_bound(capsys):
    argv = ["critical-lr", "--dim", "64", "--horizon", "1", "--tol", "0.01", "--max-cells", "256", "--max-types", "64",
            "--rel-tol", "0.25"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    lr = float(out.split("predicted critical lr")[1].split(":")[1].split()[0])
    assert 0 < lr < math.inf and "PDE solves" in out and "grid checked up to" in out
    with pytest.raises(SystemExit) as exc:
        cli_main(argv + ["--max-solves", "2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--max-solves" in err and "Traceback" not in err


def test_cli_predict_several_learning_rates_in_one_solve(tmp_path, capsys):
    path, png = tmp_path / "sweep.csv", tmp_path / "sweep.png"
    argv = ["predict", "--dim", "128", "--horizon", "2", "--lr", "0.5,2", "--tol", "3e-3", "--csv", str(path),
            "--png", str(png)]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "lr = 0.5" in out and "lr = 2" in out
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert {r["lr"] for r in rows} == {"0.5", "2.0"}
    last = {r["lr"]: float(r["risk"]) for r in rows}  # the last row of each lr: the end of the horizon
    assert cli_main(["predict", "--dim", "128", "--horizon", "2", "--lr", "2", "--tol", "3e-3", "--rows", "2"]) == 0
    alone = float(capsys.readouterr().out.splitlines()[-2].split()[2])  # the last table row's risk
    assert last["2.0"] == pytest.approx(alone, rel=6e-3)  # each within tol (3e-3) of the exact curve
    _check_figure_files(png)
    with pytest.raises(SystemExit):
        cli_main(["predict", "--lr", "0.5,0.5"])
    assert "--lr" in capsys.readouterr().err


def test_cli_best_lr_prints_the_least_predicted_risk(capsys):
    argv = ["best-lr", "--dim", "128", "--noise-std", "0.3", "--horizon", "2", "--critical", "20", "--upper", "0.3",
            "--sweep-size", "4", "--tol", "0.01"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    best = float(out.split("best lr for")[1].split(":")[1].split(",")[0])
    table = [line.split() for line in out.splitlines() if line.strip() and line.split()[0][0].isdigit()]
    risks = {float(row[0]): float(row[1]) for row in table}
    assert len(risks) == 4 and min(risks, key=risks.get) == pytest.approx(best, rel=1e-4)
    assert "<- best" in out and "critical lr" in out


def test_cli_turns_solver_warnings_into_messages(capsys):
    """A grid capped below the tolerance warns as a one-line message naming the flags (no source path)."""
    cli_main(["predict", "--dim", "64", "--horizon", "1", "--tol", "1e-5", "--max-cells", "16"])
    err = capsys.readouterr().err
    assert "sde-optim predict: warning:" in err and "--max-cells" in err
    assert ".py:" not in err


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"sde-optim {sde_optim.__version__}"


@pytest.mark.parametrize(
    "argv, flags",
    [
        (["predict", "--dim", "0"], ["--dim"]),
        (["predict", "--dim", "100000000"], ["--dim"]),
        (["predict", "--lr", "-1"], ["--lr"]),
        (["predict", "--density", "2"], ["--density"]),
        (["predict", "--dim", "3"], ["--density", "--dim"]),  # round(0.1 * 3) = 0: a teacher without support
        (["critical-lr", "--density", "0"], ["--density", "--dim"]),
        (["predict", "--observables", "risk,entropy"], ["--observables"]),
        (["predict", "--horizon", "1e5"], ["--horizon"]),
        (["critical-lr", "--horizon", "nan"], ["--horizon"]),
        (["predict", "--tol", "0"], ["--tol"]),
        (["compare", "--tol", "2"], ["--tol"]),
        (["predict", "--max-types", "0"], ["--max-types"]),
        (["predict", "--max-cells", "4"], ["--max-cells"]),
        (["critical-lr", "--max-evaluations", "0"], ["--max-evaluations"]),
        (["critical-lr", "--max-solves", "0"], ["--max-solves"]),
        (["critical-lr", "--rel-tol", "0"], ["--rel-tol"]),
        (["best-lr", "--upper", "1.5"], ["--upper"]),
        (["best-lr", "--lower", "0.5", "--upper", "0.2"], ["--lower", "--upper"]),
        (["best-lr", "--sweep-size", "2"], ["--sweep-size"]),
        (["best-lr", "--critical", "-1"], ["--critical"]),
        (["compare", "--seeds", "0"], ["--seeds"]),
        (["compare", "--seeds", "1000"], ["--seeds"]),
        (["compare", "--dim", "4096", "--horizon", "1000"], ["--horizon", "--dim"]),  # 4e6 real SGD steps per run
        (["compare", "--dim", "10000", "--batch-size", "100000"], ["--batch-size", "--dim"]),
        (["predict", "--png", "p.jpg"], ["--png"]),
        (["predict", "--png", "{missing}/p.png"], ["--png"]),
        (["compare", "--png", "{missing}/p.png"], ["--png"]),
        (["predict", "--csv", "{missing}/p.csv"], ["--csv"]),
        (["predict", "--csv", "{tmp}"], ["--csv"]),  # a directory
        (["compare", "--logdir", "{file}/runs"], ["--logdir"]),
        (["predict", "--momentum", "1"], ["--momentum"]),
        (["compare", "--momentum", "-0.1"], ["--momentum"]),
        (["predict", "--nesterov"], ["--nesterov", "--momentum"]),
        (["predict", "--nesterov", "--momentum", "0.9", "--dampening", "0.5"], ["--nesterov", "--dampening"]),
        (["predict", "--weight-decay", "-1"], ["--weight-decay"]),
        (["predict", "--schedule", "linear"], ["--schedule", "cosine", "step:N:G", "warmup-cosine:W"]),
        (["predict", "--schedule", "step:0:0.5"], ["--schedule", "N"]),
        (["critical-lr", "--schedule", "step:10:2"], ["--schedule", "G"]),
        (["predict", "--dim", "64", "--horizon", "1", "--schedule", "warmup-cosine:64"], ["--schedule", "warmup"]),
        (["frobnicate"], ["invalid choice"]),
    ],
)
def test_cli_rejects_bad_arguments(argv, flags, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    paths = {"missing": str(tmp_path / "missing"), "file": str(tmp_path / "file"), "tmp": str(tmp_path)}
    with pytest.raises(SystemExit) as exc:
        cli_main([a.format(**paths) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    for flag in flags:
        assert flag in err
    assert not (tmp_path / "missing").exists()


def test_cli_sgd_flags_describe_torch_sgd_and_its_scheduler():
    """--momentum --dampening --weight-decay --schedule reach predict as the SGD torch would run: a StepLR replayed
    (jumps at 64 and 128), momentum factor (1 - tau) / (1 - mu) = 5 (E11), weight decay kappa = d lr_eff wd (E12)."""
    from sde_optim.cli import sgd_config

    args = build_parser().parse_args(["predict", "--dim", "64", "--horizon", "3", "--lr", "0.1", "--momentum", "0.9",
                                      "--dampening", "0.5", "--weight-decay", "1e-3", "--schedule", "step:64:0.5"])
    sgd = sgd_config(args, 192)
    assert [sgd.lr_at(k) for k in (0, 63, 64, 127, 128, 191)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    assert sgd.momentum_factor == pytest.approx(5.0) and sgd.weight_decay == 1e-3
    c = sgd.coefficients(64, 1.0, 192)
    assert c.kappa(0.5) == pytest.approx(64 * 0.5 * 1e-3) and c.breakpoints == pytest.approx([1.0, 2.0])


def test_cli_predict_with_momentum_is_plain_sgd_at_the_effective_step(capsys):
    """E11: --lr 0.05 --momentum 0.9 predicts what --lr 0.5 predicts (same table, printed to 6 digits)."""
    table = []
    for argv in (["--lr", "0.5"], ["--lr", "0.05", "--momentum", "0.9"]):
        cli_main(["predict", "--dim", "256", "--horizon", "2", "--rows", "5", *argv])
        table.append([line for line in capsys.readouterr().out.splitlines() if line.strip()[:1].isdigit()])
    assert table[0] == table[1] and len(table[0]) == 5


def _optional_actions(parser):
    """Every option of ``parser`` and its subparsers, but -h/--version."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _optional_actions(sub)
        elif action.option_strings and action.dest not in ("help", "version"):
            yield parser, action


@pytest.mark.parametrize("source", ["cli", "lr_sweep", "compare_optimizers"])
def test_every_flag_has_help_and_a_default(source):
    parser = build_parser() if source == "cli" else _example(source).build_parser()
    actions = list(_optional_actions(parser))
    assert len(actions) >= 10
    for owner, action in actions:
        text = owner._get_formatter()._expand_help(action)
        assert len(action.help or "") > 5 and "default" in text, (source, action.option_strings, text)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_shown_on_a_terminal_only():
    shown, hidden = _Terminal(), io.StringIO()
    for stream in (shown, hidden):
        with progress(3, "runs", file=stream, interval=0.01) as bar:
            bar.update(3)
        with progress(None, "critical lr", file=stream, interval=0.01):
            pass
    assert "runs" in shown.getvalue() and "3/3" in shown.getvalue() and "critical lr" in shown.getvalue()
    assert hidden.getvalue() == ""


# ----------------------------------------------------------------------------- figures
def _series(rng, runs, steps):
    return [[0.05 * math.exp(-k / 300) * (1 + 0.02 * rng.standard_normal()) for k in steps] for _ in range(runs)]


def test_comparison_figure_is_labelled_banded_and_has_no_empty_panel(tmp_path):
    rng = np.random.default_rng(0)
    steps = list(range(0, 513, 32))
    names = ("risk", "curvature", "l1", "imbalance")
    predicted = {n: (steps, [0.05 * math.exp(-k / 300) for k in steps]) for n in names}
    measured = {"SGD": {n: (steps, _series(rng, 4, steps)) for n in names}, "one run": {"risk": (steps, _series(rng, 1, steps)[0])}}
    fig = comparison_figure(predicted, measured, title="t", dim=256)
    assert len(fig.axes) == 4  # 2 x 2, no empty panel
    for i, ax in enumerate(fig.axes):
        assert ax.get_ylabel() and ax.get_title()
        assert bool(ax.get_xlabel()) == (i >= 2)  # steps on the bottom row
        prediction = next(line for line in ax.get_lines() if line.get_label() == "prediction")
        assert all(prediction.get_zorder() > line.get_zorder() for line in ax.get_lines() if line is not prediction)
        assert any(isinstance(c, PolyCollection) for c in ax.collections)  # the seed band
        assert ax.child_axes and ax.child_axes[0].get_xlabel() == ("SGD time t = k / d" if i < 2 else "")
    assert fig.axes[0].get_yscale() == "log" and fig.axes[1].get_yscale() == "linear"
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "SGD: mean of 4 runs \u00b1 2 SE" in legend and "one run" in legend
    assert save_figure(fig, tmp_path / "f.png") == [str(tmp_path / "f.png"), str(tmp_path / "f.pdf")]
    _check_figure_files(tmp_path / "f.png")


def test_a_diverging_run_is_drawn_up_to_its_divergence():
    steps = list(range(10))
    values = np.array([[1.0, 1.1, 1.3, 2.0, 5.0, np.inf, np.inf, np.nan, np.inf, np.inf],
                       [1.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]])
    fig = comparison_figure({"risk": (steps, [1.0] * 10)}, {"SGD": {"risk": (steps, values)}}, divergence_step=6)
    ax = fig.axes[0]
    crosses = [line for line in ax.get_lines() if line.get_marker() == "x"]
    assert len(crosses) == 1 and list(crosses[0].get_xdata()) == [4] and list(crosses[0].get_ydata()) == [5.0]
    mean = next(line for line in ax.get_lines() if line.get_label().startswith("SGD"))
    assert list(mean.get_xdata()) == [0, 1, 2, 3, 4]  # the mean stops where the first run diverges
    assert any(line.get_linestyle() == ":" and list(line.get_xdata()) == [6, 6] for line in ax.get_lines())
    assert "x: run diverged (next value not finite)" in [t.get_text() for t in fig.legends[0].get_texts()]
    plt.close(fig)


def test_the_prediction_scatter_is_a_band_around_the_prediction():
    """``scatter``: one run's relative spread, drawn as ``curve x (1 +- scatter)`` behind the prediction (a wide one
    keeps its lower edge above 0 for the log axis), in the legend once; an observable without one has no band."""
    steps = [0, 1, 2, 3]
    predicted = {"risk": (steps, [1.0, 0.5, 0.25, 0.125]), "curvature": (steps, [2.0, 1.0, 1.0, 1.0])}
    fig = comparison_figure(predicted, {}, scatter={"risk": [0.0, 0.1, 0.2, 1.5]})
    risk, curvature = fig.axes
    (band,) = [c for c in risk.collections if c.get_label() == SCATTER_LABEL]
    xs, ys = band.get_paths()[0].vertices.T
    for k, (y, s) in enumerate(zip(predicted["risk"][1], [0.0, 0.1, 0.2, 1.5])):
        edge = ys[xs == k]
        assert np.isclose(edge.max(), y * (1 + s)) and np.isclose(edge.min(), y * max(1 - s, 1e-2))
    assert risk.get_yscale() == "log" and not curvature.collections
    assert [t.get_text() for t in fig.legends[0].get_texts()].count(SCATTER_LABEL) == 1
    with pytest.raises(ValueError, match="scatter: 2 values for a prediction of 4 points"):
        comparison_figure(predicted, {}, scatter={"risk": [0.1, 0.1]})
    plt.close("all")


def test_comparison_figure_keeps_the_callback_call():
    """TheoryMonitor calls comparison_figure(predicted, measured, title=...): still one panel per observable."""
    fig = comparison_figure({"risk": ([0, 1], [1.0, 0.5])}, {"training": {"risk": ([0, 1], [1.0, 0.6])}}, title="x")
    assert len(fig.axes) == 1 and fig.axes[0].get_xlabel() == "SGD steps k"
    plt.close(fig)


def test_grid_shape_mask_divergence_and_save_figure_checks(tmp_path):
    assert [grid_shape(n) for n in (1, 2, 3, 4, 5, 6, 8)] == [(1, 1), (1, 2), (1, 3), (2, 2), (2, 3), (2, 3), (2, 4)]
    masked = mask_divergence([[1.0, 2.0, 2000.0, 3.0], [1.0, np.nan, 1.0, 1.0]], 1e3)
    assert masked.tolist() == [[1.0, 2.0, math.inf, math.inf], [1.0, math.inf, math.inf, math.inf]]
    fig = comparison_figure({"risk": ([0, 1], [1.0, 0.5])}, {})
    with pytest.raises(ValueError, match=r"\.png"):
        save_figure(fig, tmp_path / "f.svg")


# ----------------------------------------------------------------------------- examples
def test_lr_sweep_sees_the_predicted_edge(tmp_path, capsys):
    """Below the predicted critical lr (0.5x) the PDE stays bounded, above it (2x) the PDE diverges, by the
    definition of the bisection bracket (rel_tol 25 %); plain SGD at d = 64 diverges at 2x in every run.
    Coarse PDE rows (tol 0.05, 128 cells) keep the test short; the verdicts do not depend on them."""
    png = tmp_path / "sweep.png"
    results = _example("lr_sweep").main(["--dim", "64", "--horizon", "1", "--factors", "0.5,2", "--seeds", "2",
                                         "--rel-tol", "0.25", "--tol", "0.05", "--max-cells", "128", "--png", str(png)])
    assert [said for _, _, said in results] == [False, True]
    assert results[1][1] is True
    _check_figure_files(png)
    assert "PDE err" in capsys.readouterr().out


def test_compare_optimizers_example_writes_versioned_runs(tmp_path):
    example = _example("compare_optimizers")
    argv = ["--dim", "64", "--horizon", "1", "--seeds", "2", "--logdir", str(tmp_path), "--accelerator", "cpu"]
    png = example.main(argv)
    example.main(argv[:4] + ["--seeds", "1"] + argv[6:])
    root = tmp_path / "compare_optimizers"
    assert sorted(os.listdir(root)) == ["version_0", "version_1"]
    for run in ("sgd", "homogenized"):
        for seed in (0, 1):
            scalars = _run_scalars(root / "version_0" / run / f"seed_{seed}")
            assert {"risk/measured", "risk/predicted", "imbalance/rel_error"} <= set(scalars)
    _check_figure_files(png)


@pytest.mark.parametrize(
    "name, argv, flags",
    [
        ("lr_sweep", ["--factors", "0.5,x"], ["--factors"]),
        ("lr_sweep", ["--factors", "-1"], ["--factors"]),
        ("lr_sweep", ["--dim", "3"], ["--density", "--dim"]),
        ("lr_sweep", ["--png", "{missing}/s.png"], ["--png"]),
        ("lr_sweep", ["--dim", "4096", "--horizon", "1000"], ["--horizon"]),
        ("lr_sweep", ["--blowup", "1"], ["--blowup"]),
        ("lr_sweep", ["--rel-tol", "0"], ["--rel-tol"]),
        ("compare_optimizers", ["--seeds", "0"], ["--seeds"]),
        ("compare_optimizers", ["--png", "c.svg"], ["--png"]),
        ("compare_optimizers", ["--logdir", "{file}/x"], ["--logdir"]),
        ("compare_optimizers", ["--dim", "2"], ["--density", "--dim"]),
    ],
)
def test_examples_reject_bad_arguments(name, argv, flags, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    paths = {"missing": str(tmp_path / "missing"), "file": str(tmp_path / "file")}
    with pytest.raises(SystemExit) as exc:
        _example(name).main([a.format(**paths) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and all(flag in err for flag in flags)
