"""The picture an engineer checks before trusting a threshold (matplotlib, the `plot` extra).

One panel per tag in its own units, the score against the threshold, and a strip of each tag's share of the
score while an alarm is on; shaded: the detector's anomalies, the ground truth (a label column), the rows a
threshold was calibrated on. The time axis shows dates when the CSV has them.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from edge_agent.scoring.replay import ReplayResult
from edge_agent.scoring.table import Table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DETECTED, TRUTH, CALIBRATION = "tab:orange", "tab:purple", "0.5"
TAG_PANEL_INCHES = 0.9
TOP_TAGS = 3  # tags named beside each alarm


def spans(flags: npt.NDArray[Any]) -> list[tuple[int, int]]:
    """(first, last) row of each run of nonzero flags."""
    edges = np.diff(np.concatenate([[0], (np.asarray(flags) != 0).astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), (np.flatnonzero(edges == -1) - 1).tolist(), strict=True))


def figure(
    result: ReplayResult, table: Table, data: npt.NDArray[np.float64], *, calibrate_rows: int = 0, title: str = ""
) -> Figure:
    """The replay's figure (matplotlib.figure.Figure, no pyplot state): tag panels, score, contributions strip."""
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    meta = result.bundle.metadata
    inputs = list(meta.inputs)
    dates = table.time_from != "rows"
    x: Any = (
        np.array([dt.datetime.fromtimestamp(float(t), dt.UTC).replace(tzinfo=None) for t in table.times])
        if dates
        else table.times - table.times[0]
    )
    n = len(inputs)
    fig = Figure(figsize=(13, TAG_PANEL_INCHES * n + 4.5), layout="constrained")
    axes = fig.subplots(n + 2, 1, sharex=True, height_ratios=[1.0] * n + [2.0, max(1.0, 0.12 * n)])
    tag_axes, score_ax, strip_ax = axes[:n], axes[n], axes[n + 1]
    truth = table.truth()
    shaded = [(s, e, DETECTED, 0.25) for s, e in spans(result.anomaly)]
    if truth is not None:
        shaded += [(s, e, TRUTH, 0.15) for s, e in spans(truth[1])]
    for j, (ax, name) in enumerate(zip(tag_axes, inputs, strict=True)):
        ax.plot(x, data[:, j], lw=0.7, color="tab:blue")
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes[: n + 1]:
        for s, e, color, alpha in shaded:
            ax.axvspan(x[s], x[e], color=color, alpha=alpha, lw=0)
        if calibrate_rows:
            ax.axvspan(x[0], x[calibrate_rows - 1], color=CALIBRATION, alpha=0.12, lw=0, hatch="//")
    if meta.score.smoothing > 1:
        score_ax.plot(x, result.raw_score, lw=0.5, color="0.6", label="window score")
    # the line against the threshold is what the detector compares: the smoothed score
    label = f"score (mean of {meta.score.smoothing} windows)" if meta.score.smoothing > 1 else "score"
    score_ax.plot(x, result.score, lw=0.9, color="black", label=label)
    score_ax.axhline(result.threshold, color="red", ls="--", lw=1, label=f"threshold {result.threshold:.4g}")
    if np.nanmin(result.score, initial=np.inf) > 0:
        score_ax.set_yscale("log")
    score_ax.set_ylabel("score", rotation=0, ha="right", va="center")
    _strip(strip_ax, result, x, inputs, score_ax)
    handles = [
        *score_ax.get_legend_handles_labels()[0],
        Patch(color=DETECTED, alpha=0.4, label="anomaly (detected)"),
    ]
    if truth is not None:
        handles.append(Patch(color=TRUTH, alpha=0.3, label=f"ground truth ({truth[0]})"))
    if calibrate_rows:
        handles.append(
            Patch(facecolor=CALIBRATION, alpha=0.3, hatch="//", label=f"calibration rows 1–{calibrate_rows}")
        )
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize=8)
    if dates:
        locator = AutoDateLocator()
        strip_ax.xaxis.set_major_locator(locator)
        strip_ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
        strip_ax.set_xlabel("time (UTC)" if table.time_from == "dates" else "time (UTC, from epoch seconds)")
    else:
        strip_ax.set_xlabel(f"seconds from the first row (rows {table.times[1] - table.times[0]:g} s apart)")
    fig.suptitle(title or f"{meta.name}: {table.source}")
    return fig


def _strip(ax: Any, result: ReplayResult, x: Any, inputs: list[str], score_ax: Any) -> None:
    """Each tag's share of the score while an alarm is on (blank elsewhere); the top tags named at each alarm."""
    shares = result.contributions
    if shares is None:
        shares = np.full((len(result.times), len(inputs)), np.nan, dtype=np.float32)
    on = np.where(result.anomaly[:, None] == 1, shares, np.nan)
    if isinstance(x[0], dt.datetime):
        from matplotlib.dates import date2num

        left, right = float(date2num(x[0])), float(date2num(x[-1]))
    else:
        left, right = float(x[0]), float(x[-1])
    ax.imshow(
        on.T,
        aspect="auto",
        interpolation="nearest",
        cmap="Reds",
        vmin=0.0,
        # the largest share in any alarm is full colour: with many tags every share is small
        vmax=float(np.nanmax(on)) if np.isfinite(on).any() else 1.0,
        extent=(left, right, len(inputs) - 0.5, -0.5),
    )
    ax.set_yticks(range(len(inputs)), inputs, fontsize=6 if len(inputs) <= 20 else 4)
    ax.set_ylabel("share of\nthe score\nin alarms", rotation=0, ha="right", va="center", fontsize=7)
    for s, e in spans(result.anomaly):
        mean = np.nanmean(shares[s : e + 1], axis=0) if np.isfinite(shares[s : e + 1]).any() else None
        if mean is None:
            continue
        top = [inputs[k] for k in np.argsort(-mean)[:TOP_TAGS]]
        score_ax.annotate(
            ", ".join(top), (x[s], result.threshold), xytext=(2, 4), textcoords="offset points", fontsize=6, color="0.2"
        )


def plot_replay(
    result: ReplayResult,
    table: Table,
    data: npt.NDArray[np.float64],
    path: str,
    *,
    calibrate_rows: int = 0,
    title: str = "",
) -> None:
    """The replay's figure, into a PNG (matplotlib missing: a ValueError that says how to install it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ValueError("--plot needs matplotlib: pip install 'edge-agent[plot]'") from exc
    figure(result, table, data, calibrate_rows=calibrate_rows, title=title).savefig(path, dpi=100)
