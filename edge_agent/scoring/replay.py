"""Offline replay of a CSV through the agent's own path: buffers → windows → scoring → detector."""

from __future__ import annotations

import csv
import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edge_agent.buffers import Buffers
from edge_agent.scoring.bundle import Bundle
from edge_agent.scoring.calibrate import calibrate
from edge_agent.scoring.detector import Detector, WindowScorer
from edge_agent.types import SampleBatch

F64 = npt.NDArray[np.float64]
TIME_COLUMNS = ("datetime", "timestamp", "time", "ts", "date")
BATCH = 512


@dataclass(frozen=True)
class Table:
    """A CSV: timestamps (epoch seconds), column names and values (rows × columns, NaN where empty)."""

    times: F64
    columns: tuple[str, ...]
    values: F64
    time_column: str

    def select(self, names: list[str]) -> F64:
        """Columns by name, in the given order; a clear error names what is missing."""
        index = {c: i for i, c in enumerate(self.columns)}
        lower = {c.lower(): i for i, c in enumerate(self.columns)}
        cols = []
        for name in names:
            i = index.get(name, lower.get(name.lower()))
            if i is None:
                raise ValueError(f"no column {name!r} in the CSV; it has {', '.join(self.columns)}")
            cols.append(i)
        return self.values[:, cols]


def _parse_time(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    t = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)  # naive timestamps are read as UTC, consistently
    return t.timestamp()


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


def read_table(path: str | Path) -> Table:
    """Read a `,` or `;` separated CSV with a datetime column (named datetime/timestamp/time, or the first)."""
    with open(path, newline="", encoding="utf-8") as f:
        head = f.readline()
        delimiter = ";" if head.count(";") > head.count(",") else ","
        f.seek(0)
        reader = csv.reader(f, delimiter=delimiter)
        header = [h.strip() for h in next(reader)]
        rows = [r for r in reader if r]
    lower = [h.lower() for h in header]
    tcol = next((lower.index(n) for n in TIME_COLUMNS if n in lower), 0)
    try:
        times = np.asarray([_parse_time(r[tcol]) for r in rows], dtype=np.float64)
    except (ValueError, IndexError) as exc:
        raise ValueError(f"{path}: column {header[tcol]!r} is not a datetime column: {exc}") from None
    keep = [i for i in range(len(header)) if i != tcol]
    values = np.asarray([[_number(r[i]) if i < len(r) else np.nan for i in keep] for r in rows], dtype=np.float64)
    return Table(times, tuple(header[i] for i in keep), values.reshape(len(rows), len(keep)), header[tcol])


@dataclass(frozen=True)
class ReplayResult:
    """One entry per input row: score (NaN before the first full window), threshold, anomaly flag."""

    times: F64
    score: F64
    threshold: float
    anomaly: npt.NDArray[np.int8]
    bundle: Bundle


def replay(
    bundle: Bundle,
    times: F64,
    data: F64,
    *,
    calibrate_rows: int = 0,
    quantile: float = 0.99,
    margin: float = 1.5,
    exit_ratio: float | None = None,
    min_duration: float | None = None,
    source: str = "",
) -> ReplayResult:
    """Replay rows (times, rows × inputs) through buffers, windows, scoring and the detector."""
    if calibrate_rows:
        bundle = calibrate(
            bundle, data[:calibrate_rows], quantile=quantile, margin=margin, source=f"{source} rows 1-{calibrate_rows}"
        )
    meta = bundle.metadata
    tags = tuple(meta.inputs)
    spacing = float(np.median(np.diff(times))) if len(times) > 1 else meta.sample_interval
    buffers = Buffers(retention=float(times[-1] - times[0]) + 10 * spacing, max_samples=max(len(times) + 16, 16))
    buffers.register(tags, max(spacing, 1e-3))
    quality = np.zeros(len(tags), dtype=np.uint8)
    scorer = WindowScorer(bundle)
    n = len(times)
    scores = np.full(n, np.nan)
    first = meta.window - 1
    pending: list[int] = []
    values_b: list[npt.NDArray[np.float32]] = []
    good_b: list[npt.NDArray[np.bool_]] = []

    def flush() -> None:
        if pending:
            s, _ = scorer.score(np.stack(values_b), np.stack(good_b))
            scores[pending] = s
            pending.clear()
            values_b.clear()
            good_b.clear()

    for i in range(n):
        row = data[i]
        q = np.where(np.isfinite(row), quality, np.uint8(2))
        buffers.write(SampleBatch("replay", float(times[i]), tags, row, q))
        if i < first:
            continue
        w = buffers.window(tags, t_end=float(times[i]), interval=meta.sample_interval, n_samples=meta.window)
        pending.append(i)
        values_b.append(np.nan_to_num(w.values))
        good_b.append(w.good)
        if len(pending) >= BATCH:
            flush()
    flush()
    det = Detector(
        model=meta.name,
        model_version=meta.version,
        model_sha256=bundle.sha256,
        inputs=tags,
        threshold=meta.threshold.value,
        exit_ratio=exit_ratio if exit_ratio is not None else meta.detector.exit_ratio,
        min_duration=min_duration if min_duration is not None else meta.detector.min_duration,
        smoothing=meta.score.smoothing,
    )
    anomaly = np.zeros(n, dtype=np.int8)
    for i in range(first, n):
        det.update(
            t_end=float(times[i]),
            window_start=float(times[i]) - meta.sample_interval * (meta.window - 1),
            score=float(scores[i]),
            contributions={t: 0.0 for t in tags},
            values={},
        )
        anomaly[i] = det.active
    return ReplayResult(times, scores, meta.threshold.value, anomaly, bundle)


def write_result(result: ReplayResult, path: str | Path, time_column: str = "datetime") -> None:
    """OUT.csv: one row per input row with the timestamp, score, threshold and anomaly (0/1)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow([time_column, "score", "threshold", "anomaly"])
        for t, s, a in zip(result.times, result.score, result.anomaly, strict=True):
            stamp = (
                dt.datetime.fromtimestamp(float(t), dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            )
            w.writerow([stamp, "" if np.isnan(s) else f"{s:.6g}", f"{result.threshold:.6g}", int(a)])
