"""The figures of sde_optim.plotting."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.collections import PolyCollection

from sde_optim.plotting import comparison_figure, grid_shape, mask_divergence, save_figure


def _check_figure_files(png):
    """The PNG is a real plot (large, not blank) and a PDF with the same stem exists."""
    png = Path(png)
    image = mpimg.imread(png)
    assert image.shape[0] > 300 and image.shape[1] > 400
    assert float(image[..., :3].std()) > 0.05  # lines and text, not a blank canvas
    assert png.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"


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
