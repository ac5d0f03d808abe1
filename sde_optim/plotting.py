"""Figures of measured observables against the prediction (one panel per observable)."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg", force=False)  # headless-safe; a user's interactive backend is kept if already chosen
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .observables import OBSERVABLES  # noqa: E402

__all__ = ["comparison_figure"]

Series = tuple[Sequence[float], Sequence[float]]


def comparison_figure(
    predicted: Mapping[str, Series],
    measured: Mapping[str, Mapping[str, Series]],
    *,
    title: str = "",
    xlabel: str = "SGD step",
) -> Figure:
    """Panels ``observable -> prediction (line) and measured series (markers)``.

    Args:
        predicted: ``{observable: (steps, values)}``; the observables drawn, in order.
        measured: ``{label: {observable: (steps, values)}}``, e.g. ``{"SGD": {...}, "HomogenizedSGD": {...}}``.
        title: figure title.

    Observables marked ``log_scale`` in :data:`~sde_optim.observables.OBSERVABLES` get a log axis.
    """
    names = list(predicted)
    cols = min(len(names), 3)
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        steps, values = predicted[name]
        ax.plot(list(steps), list(values), "-", color="black", lw=2, label="prediction")
        for label, series in measured.items():
            if name in series:
                s, v = series[name]
                ax.plot(list(s), list(v), "o-", ms=3, lw=0.8, alpha=0.8, label=label)
        obs = OBSERVABLES.get(name)
        if obs is not None and obs.log_scale and all(float(x) > 0 for x in values):
            ax.set_yscale("log")
        ax.set_title(name if obs is None else f"{name}", fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig
