"""Figures of measured observables against the prediction, ready for a paper.

Conventions of every figure drawn here:

* x: SGD steps ``k`` at the bottom and, when the dimension ``d`` is given, SGD time
  ``t = k / d`` (THEORY E2) on a secondary axis at the top;
* y: the observable, labelled with its name, its definition (from
  :data:`~sde_optim.observables.OBSERVABLES`) as the panel title, and a log axis where the
  registry marks it ``log_scale``;
* the prediction is a black line drawn above the measurements (``zorder``), so markers never
  hide it; a predicted divergence is a dotted vertical line; where the prediction carries one run's
  expected spread at this ``d`` (:attr:`~sde_optim.theory.Prediction.scatter`), a grey band of
  ``curve x (1 +- scatter)`` (one standard deviation of a single run) is drawn behind it;
* several runs (seeds) of one measured series are drawn as their mean (hollow markers) with a
  band of ``mean +- 2 SE`` (standard error of the mean over runs), and the legend says so;
* a run whose values stop being finite (diverged; see :func:`mask_divergence`) is drawn up to
  its last finite value and marked there with an ``x``;
* constrained layout, one legend below the panels, no empty panels; :func:`save_figure`
  writes a PNG and a PDF with the same stem.
"""

from __future__ import annotations

import math
import os
import textwrap
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg", force=False)  # headless-safe; a user's interactive backend is kept if already chosen
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .observables import OBSERVABLES  # noqa: E402

__all__ = ["comparison_figure", "draw_panel", "finish_figure", "grid_shape", "mask_divergence", "prediction_series",
           "save_figure", "BAND_SE", "SCATTER_LABEL"]

#: Half-width of the Monte Carlo band, in standard errors of the mean over runs.
BAND_SE = 2.0
#: Legend entry of the prediction's band (:attr:`~sde_optim.theory.Prediction.scatter`).
SCATTER_LABEL = "prediction \u00b1 one run's scatter at this d (1 sd)"
_MAX_MARKERS = 40
_PANEL_SIZE = (3.5, 2.9)  # inches per panel
_PREDICTION_STYLE = dict(color="black", lw=1.5, zorder=5)

Series = tuple[Sequence[float], Sequence[float] | Sequence[Sequence[float]]]


def comparison_figure(
    predicted: Mapping[str, Series],
    measured: Mapping[str, Mapping[str, Series]],
    *,
    title: str = "",
    xlabel: str = "SGD steps k",
    dim: int | None = None,
    divergence_step: int | None = None,
    prediction_label: str = "prediction",
    ncols: int | None = None,
    scatter: Mapping[str, Sequence[float]] | None = None,
) -> Figure:
    """One panel per observable: the prediction (line) and the measured series (markers, band).

    Args:
        predicted: ``{observable: (steps, values)}``; the observables drawn, in order.
        measured: ``{label: {observable: (steps, values)}}``, e.g. ``{"SGD": {...}, "HomogenizedSGD": {...}}``;
            ``values`` is one run ``(n,)`` or several runs ``(runs, n)`` at the same steps.
        title: figure title.
        xlabel: label of the step axis.
        dim: the dimension ``d``; if given, a top axis shows SGD time ``t = k / d``.
        divergence_step: the prediction's divergence step (a dotted vertical line), if any.
        prediction_label: legend entry of the prediction line.
        ncols: panels per row (default: filled rows, at most 3 columns).
        scatter: ``{observable: values}``, one run's relative standard deviation around the prediction at its
            steps (:attr:`~sde_optim.theory.Prediction.scatter`): drawn as a band; observables without one have none.
    """
    names = list(predicted)
    rows, cols = grid_shape(len(names), ncols)
    fig, axes = plt.subplots(rows, cols, figsize=(_PANEL_SIZE[0] * cols, _PANEL_SIZE[1] * rows + 0.6),
                             squeeze=False, layout="constrained")
    for ax, name in zip(axes.flat, names):
        series = {label: obs[name] for label, obs in measured.items() if name in obs}
        draw_panel(ax, name, predicted[name], series, dim=dim, divergence_step=divergence_step, xlabel=xlabel,
                   prediction_label=prediction_label, scatter=(scatter or {}).get(name))
    for ax in list(axes.flat)[len(names):]:
        fig.delaxes(ax)
    finish_figure(fig, title)
    return fig


def prediction_series(prediction, names: Sequence[str]) -> tuple[dict[str, Series], dict[str, list[float]]]:
    """``(predicted, scatter)`` of :func:`comparison_figure` from a :class:`~sde_optim.theory.Prediction`: each observable
    of ``names`` as ``(steps, curve)``, and one run's scatter for those that have one."""
    steps = prediction.steps.tolist()
    predicted = {n: (steps, prediction.curves[n].tolist()) for n in names}
    return predicted, {n: prediction.scatter[n].tolist() for n in names if n in prediction.scatter}


def sweep_figure(curves: Mapping[str, Mapping[str, Series]], *, title: str = "", xlabel: str = "SGD steps k",
                 dim: int | None = None, ncols: int | None = None) -> Figure:
    """One panel per observable, one predicted line per member of a sweep (``predict_sweep``).

    ``curves`` is ``{label: {observable: (steps, values)}}``, e.g. ``{"lr = 0.5": {"risk": ...}, ...}``; the
    observables of the first label are drawn, in order.
    """
    names = list(next(iter(curves.values())))
    rows, cols = grid_shape(len(names), ncols)
    fig, axes = plt.subplots(rows, cols, figsize=(_PANEL_SIZE[0] * cols, _PANEL_SIZE[1] * rows + 0.6),
                             squeeze=False, layout="constrained")
    for ax, name in zip(axes.flat, names):
        positive = True
        for label, obs in curves.items():
            steps, values = obs[name]
            y = np.asarray(values, dtype=float)
            positive &= bool(np.all(y[np.isfinite(y)] > 0))
            ax.plot(np.asarray(steps, dtype=float), y, lw=1.4, label=label)
        _label_axes(ax, name, dim, xlabel, None, log=positive)
    for ax in list(axes.flat)[len(names):]:
        fig.delaxes(ax)
    finish_figure(fig, title)
    return fig


def grid_shape(count: int, ncols: int | None = None) -> tuple[int, int]:
    """``(rows, cols)`` for ``count`` panels: ``ncols`` if given, else 2 x 2 for 4 panels and otherwise the
    first of 3, 4, 2 columns that fills every row (8 panels: 2 x 4), falling back to ``min(count, 3)``."""
    if count < 1:
        raise ValueError(f"a figure needs at least one panel, got {count}")
    if ncols is None:
        ncols = 2 if count == 4 else next((c for c in (3, 4, 2) if count % c == 0 and count >= c), min(count, 3))
    ncols = max(1, min(ncols, count))
    return math.ceil(count / ncols), ncols


def draw_panel(
    ax: Axes,
    name: str,
    predicted: Series | None,
    measured: Mapping[str, Series],
    *,
    dim: int | None = None,
    divergence_step: int | None = None,
    xlabel: str = "SGD steps k",
    prediction_label: str = "prediction",
    description: str | None = None,
    scatter: Sequence[float] | None = None,
) -> None:
    """Draw observable ``name`` on ``ax``: prediction on top, each measured series with its band.

    ``measured`` is ``{label: (steps, values)}`` with ``values`` of shape ``(n,)`` or ``(runs, n)``.
    ``description`` replaces the registry's definition as the panel title.  ``scatter``: one run's relative
    standard deviation at the prediction's steps, drawn as the band ``values x (1 +- scatter)``.
    """
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    positive = True
    for i, (label, (steps, values)) in enumerate(measured.items()):
        positive &= _draw_measured(ax, label, steps, values, colors[i % len(colors)])
    if predicted is not None:
        steps, values = predicted
        y = np.asarray(values, dtype=float)
        positive &= bool(np.all(y[np.isfinite(y)] > 0))
        ax.plot(np.asarray(steps, dtype=float), y, label=prediction_label, **_PREDICTION_STYLE)
        if scatter is not None:
            _draw_scatter(ax, np.asarray(steps, dtype=float), y, np.asarray(scatter, dtype=float))
    if divergence_step is not None:
        ax.axvline(divergence_step, color="black", ls=":", lw=1.2, zorder=5, label="predicted divergence")
    _label_axes(ax, name, dim, xlabel, description, log=positive)


def _draw_scatter(ax: Axes, x: np.ndarray, y: np.ndarray, scatter: np.ndarray) -> None:
    """The band ``y (1 +- scatter)`` behind the prediction, where both are finite (a scatter of 99 % or more draws
    its lower edge at ``y / 100``, which a log axis can show)."""
    if scatter.shape != y.shape:
        raise ValueError(f"scatter: {scatter.shape[0]} values for a prediction of {y.shape[0]} points")
    ok = np.isfinite(y) & np.isfinite(scatter)
    if not ok.any():
        return
    lower = y * np.clip(1 - scatter, 1e-2, None)
    ax.fill_between(x, np.where(ok, lower, np.nan), np.where(ok, y * (1 + scatter), np.nan), color="0.55",
                    alpha=0.22, lw=0, zorder=1, label=SCATTER_LABEL)


def _draw_measured(ax: Axes, label: str, steps, values, color) -> bool:
    """One measured series (one run or the mean and band of several); returns whether all of it is > 0."""
    x = np.asarray(steps, dtype=float)
    y = np.atleast_2d(np.asarray(values, dtype=float))
    if y.shape[1] != x.shape[0]:
        raise ValueError(f"measured series {label!r}: {y.shape[1]} values for {x.shape[0]} steps")
    runs = y.shape[0]
    finite_prefix = [int(np.argmin(np.isfinite(r))) if not np.isfinite(r).all() else r.size for r in y]
    common = min(finite_prefix)  # points where every run is still finite
    mean = y[:, :common].mean(axis=0)
    every = max(1, common // _MAX_MARKERS)
    style = dict(color=color, marker="o", ms=3.5, mfc="none", mew=0.9, lw=0.8, markevery=every, zorder=3)
    if runs > 1:
        se = y[:, :common].std(axis=0, ddof=1) / math.sqrt(runs)
        ax.fill_between(x[:common], mean - BAND_SE * se, mean + BAND_SE * se, color=color, alpha=0.25, lw=0, zorder=2)
        label = f"{label}: mean of {runs} runs \u00b1 {BAND_SE:g} SE"
    ax.plot(x[:common], mean, label=label, **style)
    for run, end in zip(y, finite_prefix):
        if end > common:  # this run outlived the first divergence among the runs: draw it alone
            ax.plot(x[common - 1:end], run[common - 1:end], color=color, lw=0.7, alpha=0.7, zorder=3)
        if 0 < end < x.size:
            ax.plot(x[end - 1], run[end - 1], "x", color=color, ms=7, mew=1.6, zorder=4)
    shown = np.concatenate([run[:end] for run, end in zip(y, finite_prefix)])
    return bool(np.all(shown > 0))


def _label_axes(ax: Axes, name: str, dim: int | None, xlabel: str, description: str | None, *, log: bool) -> None:
    """Axis labels, the definition as title, log scale where the registry asks for it, the t = k/d axis.

    The step label goes on the bottom row of a grid and the time label on its top row only.
    """
    obs = OBSERVABLES.get(name)
    if obs is not None and obs.log_scale and log:
        ax.set_yscale("log")
    text = description if description is not None else (obs.description if obs is not None else "")
    if text:
        ax.set_title(textwrap.fill(text, 46), fontsize=7.5)
    ax.set_ylabel(name.replace("_", " "), fontsize=9)
    spec = ax.get_subplotspec()
    if spec is None or spec.is_last_row():
        ax.set_xlabel(xlabel, fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))  # step labels are wide: at most ~6 ticks
    ax.tick_params(which="both", labelsize=8)
    ax.grid(alpha=0.3)
    if dim:
        top = ax.secondary_xaxis("top", functions=(lambda k: np.asarray(k) / dim, lambda t: np.asarray(t) * dim))
        if spec is None or spec.is_first_row():
            top.set_xlabel("SGD time t = k / d", fontsize=8)
        top.xaxis.set_major_locator(MaxNLocator(nbins=5))
        top.tick_params(labelsize=7)


def finish_figure(fig: Figure, title: str) -> None:
    """Title on top and one legend below the panels (every distinct entry once; ``x`` explained if drawn)."""
    handles: dict[str, object] = {}
    diverged = False
    for ax in fig.axes:
        h, labels = ax.get_legend_handles_labels()
        handles.update({lab: hd for lab, hd in zip(labels, h) if not lab.startswith("_")})
        diverged |= any(line.get_marker() == "x" for line in ax.get_lines())
    if diverged:
        handles["x: run diverged (next value not finite)"] = Line2D([], [], color="gray", marker="x", ls="none", mew=1.6)
    if handles:
        ncols = max(1, min(len(handles), int(fig.get_figwidth() // 2.4)))
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=ncols, fontsize=8,
                   frameon=False)
    if title:
        fig.suptitle(textwrap.fill(title, int(13 * fig.get_figwidth())), fontsize=10)


def mask_divergence(values, blowup_factor: float) -> np.ndarray:
    """``values`` (``(n,)`` or ``(runs, n)``, e.g. risks) with everything from the first value that is not
    finite or above ``blowup_factor`` times the run's first value replaced by ``inf`` (diverged).

    Returns a float array of the same shape; use the same mask for a run's other observables via
    :func:`numpy.isfinite` of the result.
    """
    y = np.array(values, dtype=float, copy=True)
    runs = np.atleast_2d(y)
    for run in runs:
        bad = ~np.isfinite(run) | (run > blowup_factor * abs(run[0]))
        if bad.any():
            run[int(np.argmax(bad)):] = np.inf
    return runs.reshape(y.shape)


def save_figure(fig: Figure, path: str | os.PathLike, *, dpi: int = 150, close: bool = True) -> list[str]:
    """Save ``fig`` to ``path`` (must end in ``.png``) and, with the same stem, as a vector PDF.

    Returns the two paths written. ``close`` releases the figure afterwards.
    """
    path = os.fspath(path)
    stem, ext = os.path.splitext(path)
    if ext.lower() != ".png":
        raise ValueError(f"figure path must end in .png (a .pdf with the same stem is written next to it); got {path!r}")
    written = [path, stem + ".pdf"]
    for out in written:
        fig.savefig(out, dpi=dpi, bbox_inches="tight", pad_inches=0.05)
    if close:
        plt.close(fig)
    return written
