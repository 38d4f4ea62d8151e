"""replay --plot: the figure object (panels, units, shaded spans, legend, date axis), not its pixels."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgba
from matplotlib.dates import ConciseDateFormatter

from edge_agent.scoring.bundle import load_bundle
from edge_agent.scoring.plot import CALIBRATION, DETECTED, TRUTH, figure, plot_replay, spans
from edge_agent.scoring.replay import replay
from edge_agent.scoring.table import read_table

INT8 = Path(__file__).parents[1] / "fixtures" / "pump-i8.tflite"
ROWS, PUSHED = 400, 3


@pytest.fixture
def labelled_csv(tmp_path: Path) -> Path:
    """A CSV with a datetime column, the model's inputs in their units, and an anomaly column over a pushed tag."""
    meta = load_bundle(INT8).metadata
    rng = np.random.default_rng(1)
    mean, scale = np.asarray(meta.normalisation.mean), np.asarray(meta.normalisation.scale)
    data = mean + 0.5 * scale * rng.standard_normal((ROWS, len(meta.inputs)))
    data[250:300, PUSHED] += 12 * scale[PUSHED]
    truth = np.zeros(ROWS, dtype=int)
    truth[250:300] = 1
    start = dt.datetime(2026, 3, 1, 8, 0)
    path = tmp_path / "run.csv"
    with open(path, "w") as f:
        f.write("datetime," + ",".join(meta.inputs) + ",anomaly\n")
        for i in range(ROWS):
            stamp = (start + dt.timedelta(seconds=i * meta.sample_interval)).isoformat()
            f.write(stamp + "," + ",".join(f"{v:.6g}" for v in data[i]) + f",{truth[i]}\n")
    return path


def shaded(ax: object, color: str) -> int:
    """How many spans of `color` an axis has (axvspan patches)."""
    rgb = to_rgba(color)[:3]
    return sum(1 for p in ax.patches if np.allclose(p.get_facecolor()[:3], rgb))  # type: ignore[attr-defined]


def test_the_figure_has_a_panel_per_tag_in_its_units_and_says_what_is_shaded(labelled_csv: Path) -> None:
    bundle = load_bundle(INT8)
    inputs = list(bundle.metadata.inputs)
    table = read_table(labelled_csv)
    data = table.select(inputs)
    result = replay(bundle, table.times, data, calibrate_rows=150, contributions=True)
    assert result.anomaly[255:300].all()  # the picture below has an alarm to show
    fig = figure(result, table, data, calibrate_rows=150)

    axes = fig.axes
    assert len(axes) == len(inputs) + 2  # a panel per tag, the score, the contributions strip
    tag_axes, score_ax, strip_ax = axes[: len(inputs)], axes[-2], axes[-1]
    assert [ax.get_ylabel() for ax in tag_axes] == inputs
    for j, ax in enumerate(tag_axes):  # engineering units: the CSV's own values, not normalised ones
        np.testing.assert_allclose(ax.lines[0].get_ydata(), data[:, j])
    (truth_spans,) = [spans(table.truth()[1])]  # type: ignore[index]
    for ax in [*tag_axes, score_ax]:
        assert shaded(ax, TRUTH) == len(truth_spans) == 1
        assert shaded(ax, DETECTED) == len(spans(result.anomaly)) >= 1
        assert shaded(ax, CALIBRATION) == 1
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels[:2] == ["score", f"threshold {result.threshold:.4g}"]
    assert labels[2:] == ["anomaly (detected)", "ground truth (anomaly)", "calibration rows 1–150"]
    assert [t.get_text() for t in strip_ax.get_yticklabels()] == inputs
    assert isinstance(strip_ax.xaxis.get_major_formatter(), ConciseDateFormatter)
    assert strip_ax.get_xlabel() == "time (UTC)"
    # the alarm is labelled with the tags that drove it, the pushed one first
    (note,) = score_ax.texts
    assert note.get_text().split(", ")[0] == inputs[PUSHED]


def test_without_dates_or_labels_the_axis_is_seconds_and_the_legend_shorter(tmp_path: Path) -> None:
    bundle = load_bundle(INT8)
    inputs = list(bundle.metadata.inputs)
    path = tmp_path / "plain.csv"
    rng = np.random.default_rng(2)
    meta = bundle.metadata
    rows = np.asarray(meta.normalisation.mean) + rng.standard_normal((60, len(inputs))) * meta.normalisation.scale
    path.write_text(",".join(inputs) + "\n" + "".join(",".join(f"{v:.5g}" for v in r) + "\n" for r in rows))
    table = read_table(path, row_interval=meta.sample_interval)
    data = table.select(inputs)
    result = replay(bundle, table.times, data)
    fig = figure(result, table, data)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "ground truth" not in " ".join(labels) and "calibration" not in " ".join(labels)
    assert fig.axes[-1].get_xlabel().startswith("seconds from the first row")
    png = tmp_path / "plain.png"
    plot_replay(result, table, data, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
