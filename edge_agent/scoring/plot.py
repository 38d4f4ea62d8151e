"""The picture an engineer checks before trusting a threshold (matplotlib, the `plot` extra)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from edge_agent.scoring.replay import ReplayResult


def plot_replay(
    result: ReplayResult,
    times: npt.NDArray[np.float64],
    data: npt.NDArray[np.float64],
    inputs: Sequence[str],
    path: str,
    *,
    title: str = "",
) -> None:
    """Tags (normalised), the score against its threshold, and shaded anomaly spans, into a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ValueError("--plot needs matplotlib: pip install 'edge-agent[plot]'") from exc
    x = [dt.datetime.fromtimestamp(float(t), dt.UTC) for t in times]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 6), sharex=True, height_ratios=(3, 2))
    norm = result.bundle.metadata.normalisation
    for j, name in enumerate(inputs):
        top.plot(x, (data[:, j] - norm.mean[j]) / norm.scale[j], lw=0.8, label=name)
    top.set_ylabel("normalised value")
    top.legend(fontsize=7, ncol=4, loc="upper left")
    smoothing = result.bundle.metadata.score.smoothing
    if smoothing > 1:
        bottom.plot(x, result.raw_score, lw=0.6, color="0.6", label="window score")
    # the line against the threshold is what the detector compares: the smoothed score
    label = f"score (mean of {smoothing} windows)" if smoothing > 1 else "score"
    bottom.plot(x, result.score, lw=0.9, color="black", label=label)
    bottom.axhline(result.threshold, color="red", ls="--", lw=1, label="threshold")
    bottom.set_yscale("log")
    bottom.set_ylabel("score")
    bottom.legend(fontsize=7, loc="upper left")
    flags = np.concatenate([[0], result.anomaly, [0]])
    starts, ends = np.flatnonzero(np.diff(flags) == 1), np.flatnonzero(np.diff(flags) == -1)
    for s, e in zip(starts, ends, strict=True):
        for ax in (top, bottom):
            ax.axvspan(x[int(s)], x[min(int(e), len(x) - 1)], color="orange", alpha=0.25, lw=0)
    fig.suptitle(title or result.bundle.metadata.name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
