"""Offline replay of a CSV through the agent's scoring path: windows on the model's grid → scoring → detector.

The windows are the ones `Buffers.window` builds live (the last sample at or before each grid point, good while
it is no older than 1.5 × the longer of the grid interval and the row spacing), computed for a block of window
ends at once rather than one ring write and one window per row.
"""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from edge_agent.scoring.adapt import adapter_for
from edge_agent.scoring.bundle import Bundle
from edge_agent.scoring.calibrate import calibrate
from edge_agent.scoring.detector import Detector, WindowScorer
from edge_agent.scoring.table import TIME_COLUMNS, Table, check_increasing, read_table

if TYPE_CHECKING:  # the config (and with it the driver registry) is not imported to score a CSV
    from edge_agent.config import ModelAdaptation

__all__ = [
    "COLUMNS",
    "TIME_COLUMNS",
    "ReplayResult",
    "Table",
    "check_rows",
    "read_table",
    "replay",
    "windows",
    "write_result",
]

F64 = npt.NDArray[np.float64]
BATCH = 512  # window ends per block: bounds the memory of a long file (512 × window × inputs float32)


def windows(
    times: F64, data: F64, ends: npt.NDArray[np.intp], *, interval: float, n_samples: int, age_limit: float
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """Windows (ends × n_samples × inputs, 0 where not good) and their good cells, resampled as Buffers.window does.

    Row `ends[b]` is window b's last grid point; each grid point takes the latest row at or before it, good when
    that row is at most `age_limit` seconds older and its value is finite. (A ring also stops looking back after
    the rows a window can reach at the tag's median interval: the same for evenly spaced rows, which
    tests/scoring/test_replay_batch.py checks against Buffers.window with gaps and empty cells.)
    """
    grid = times[ends][:, None] - interval * np.arange(n_samples - 1, -1, -1, dtype=np.float64)
    idx = np.searchsorted(times, grid, side="right") - 1
    have = idx >= 0
    idx = np.where(have, idx, 0)
    fresh = have & (grid - times[idx] <= age_limit)
    cells = data[idx]  # ends × n_samples × inputs
    good = fresh[..., None] & np.isfinite(cells)
    return np.where(good, cells, 0.0).astype(np.float32), good


@dataclass(frozen=True)
class ReplayResult:
    """One entry per input row: what the detector saw and decided (scores NaN where nothing was scored)."""

    times: F64
    score: F64  # what the detector compared with the threshold: the window score smoothed over score.smoothing
    threshold: float
    anomaly: npt.NDArray[np.int8]
    bundle: Bundle
    raw_score: F64  # the window's own score, before smoothing
    status: npt.NDArray[np.str_]  # warmup (before the first full window), insufficient (too little good data), scored
    contributions: npt.NDArray[np.float32] | None = None  # rows × inputs: each tag's share of the score (if asked)
    adaptation: Mapping[str, float | int | bool | str] | None = None  # drift adaptation's state at the end


def check_rows(times: F64, calibrate_rows: int = 0) -> None:
    """A ValueError when the rows cannot be replayed: none, times that do not increase, too few to calibrate on."""
    if len(times) == 0:
        raise ValueError("no rows to replay")
    check_increasing(times)
    if not 0 <= calibrate_rows <= len(times):
        raise ValueError(f"cannot calibrate on the first {calibrate_rows} rows of {len(times)}")


def replay(
    bundle: Bundle,
    times: F64,
    data: F64,
    *,
    calibrate_rows: int = 0,
    quantile: float = 0.99,
    margin: float = 1.5,
    threshold: float | None = None,
    exit_ratio: float | None = None,
    min_duration: float | None = None,
    source: str = "",
    scorer: WindowScorer | None = None,
    contributions: bool = False,
    calibrate_what: str = "all",
    scaling: str | None = None,
    threshold_floor: float = 0.0,
    adapt: ModelAdaptation | None = None,
) -> ReplayResult:
    """Replay rows (times, rows × inputs) through windows, scoring and the detector.

    `threshold`, `exit_ratio`, `min_duration` and `adapt` override the bundle's, as a config's models[] entry
    does; `calibrate_what`, `scaling` and `threshold_floor` are its calibrate section's (see calibrate()).
    `scorer`: one already built for `bundle` (its interpreter is reused: replaying many files loads it once).
    `contributions`: keep each row's per-tag shares of the score (rows × inputs float32), for the plot.
    """
    check_rows(times, calibrate_rows)
    n = len(times)
    runtime = scorer.runtime if scorer is not None else None
    if calibrate_rows:
        bundle = calibrate(
            bundle,
            data[:calibrate_rows],
            quantile=quantile,
            margin=margin,
            source=f"{source} rows 1-{calibrate_rows}",
            what=calibrate_what,
            scaling=scaling,
            floor=threshold_floor,
        )
    if scorer is None or scorer.bundle.sha256 != bundle.sha256:
        scorer = WindowScorer(bundle, runtime=runtime)  # the same model tensors: only the metadata changed
    meta = bundle.metadata
    tags = tuple(meta.inputs)
    spacing = float(np.median(np.diff(times))) if n > 1 else meta.sample_interval
    # as Buffers.window: a sample stays good for 1.5 × the longer of the grid interval and the tag's interval
    age_limit = 1.5 * max(meta.sample_interval, max(spacing, 1e-3))
    scores = np.full(n, np.nan)
    shares = np.full((n, len(tags)), np.nan, dtype=np.float32) if contributions else None
    first = meta.window - 1
    limit = meta.threshold.value if threshold is None else threshold
    det = Detector(
        model=meta.name,
        model_version=meta.version,
        model_sha256=bundle.sha256,
        inputs=tags,
        threshold=limit,
        exit_ratio=exit_ratio if exit_ratio is not None else meta.detector.exit_ratio,
        min_duration=min_duration if min_duration is not None else meta.detector.min_duration,
        smoothing=meta.score.smoothing,
    )
    compared = np.full(n, np.nan)
    anomaly = np.zeros(n, dtype=np.int8)
    none: dict[str, float] = {}  # the events' contributions are not kept: the flags and scores are the output
    span = meta.sample_interval * (meta.window - 1)
    adapter = adapter_for(bundle, adapt, meta.name)
    if adapter is not None:
        # each window is normalised around the centre the windows before it left: scored one at a time, by a
        # scorer of its own (recentring a caller's shared scorer would carry one file's drift into the next)
        scorer = WindowScorer(bundle, runtime=scorer.runtime)
    # adapting, a block is one window; otherwise BATCH window ends are scored together, then the detector runs
    block = BATCH if adapter is None else 1
    for lo in range(first, n, block):
        ends = np.arange(lo, min(lo + block, n))
        x, good = windows(times, data, ends, interval=meta.sample_interval, n_samples=meta.window, age_limit=age_limit)
        s, per_tag = scorer.score(x.copy() if adapter is not None else x, good)
        scores[ends] = s
        if shares is not None:
            shares[ends] = per_tag
        if adapter is None:
            continue
        t = float(times[lo])
        det.update(t_end=t, window_start=t - span, score=float(s[0]), contributions=none, values=none)
        compared[lo] = det.last_score
        anomaly[lo] = det.active
        centre = adapter.update(x[0], good[0], max(float(s[0]), det.last_score), limit, det.active)
        if centre is not None:
            scorer.recentre(centre)
    if adapter is None:
        for i in range(first, n):
            t = float(times[i])
            det.update(t_end=t, window_start=t - span, score=float(scores[i]), contributions=none, values=none)
            compared[i] = det.last_score
            anomaly[i] = det.active
    # warm-up: the window reaches back before the first row (not a lack of good data within the file)
    warmup = (np.arange(n) < first) | (times - span < times[0] - 1e-6 * meta.sample_interval)
    status = np.where(warmup, "warmup", np.where(np.isnan(scores), "insufficient", "scored"))
    return ReplayResult(
        times, compared, limit, anomaly, bundle, scores, status, shares, adapter.state() if adapter else None
    )


COLUMNS = ("score", "threshold", "anomaly", "raw_score", "status")


def write_result(
    result: ReplayResult, path: str | Path, time_column: str = "datetime", stamps: Sequence[str] | None = None
) -> None:
    """OUT.csv: per input row its timestamp (the input's text when `stamps` is given), then COLUMNS.

    score is what the detector compared with the threshold (smoothed); raw_score is the window's own score.
    """
    if stamps is None:
        # times given as epoch seconds (no text to copy): ISO 8601 in UTC, which epoch seconds are
        stamps = [
            dt.datetime.fromtimestamp(float(t), dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            for t in result.times
        ]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow([time_column, *COLUMNS])
        limit = f"{result.threshold:.6g}"
        for stamp, s, a, raw, status in zip(
            stamps, result.score, result.anomaly, result.raw_score, result.status, strict=True
        ):
            w.writerow(
                [stamp, "" if np.isnan(s) else f"{s:.6g}", limit, int(a), "" if np.isnan(raw) else f"{raw:.6g}", status]
            )
