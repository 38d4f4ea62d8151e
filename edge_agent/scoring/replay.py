"""Offline replay of a CSV through the agent's own path: buffers → windows → scoring → detector."""

from __future__ import annotations

import csv
import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from edge_agent.buffers import Buffers
from edge_agent.scoring.adapt import adapter_for
from edge_agent.scoring.bundle import Bundle
from edge_agent.scoring.calibrate import calibrate
from edge_agent.scoring.detector import Detector, WindowScorer
from edge_agent.types import SampleBatch

if TYPE_CHECKING:  # the config (and with it the driver registry) is not imported to score a CSV
    from edge_agent.config import ModelAdaptation

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
    stamps: tuple[str, ...] = ()  # each row's timestamp exactly as written, so output rows join back to the input
    source: str = "the CSV"
    # column → (line, text) of its first cell that is neither a number nor empty; an error only if a model reads it
    not_numbers: Mapping[str, tuple[int, str]] = field(default_factory=dict)

    def select(self, names: list[str]) -> F64:
        """Columns by name, in the given order; a clear error names what is missing or not numeric."""
        index = {c: i for i, c in enumerate(self.columns)}
        lower = {c.lower(): i for i, c in enumerate(self.columns)}
        cols = []
        for name in names:
            i = index.get(name, lower.get(name.lower()))
            if i is None:
                raise ValueError(f"{self.source}: no column {name!r}; it has {', '.join(self.columns)}")
            bad = self.not_numbers.get(self.columns[i])
            if bad is not None:
                raise ValueError(f"{self.source}:{bad[0]}: column {self.columns[i]!r}: {bad[1]!r} is not a number")
            cols.append(i)
        return self.values[:, cols]


def _time_or_nan(text: str) -> float:
    """Epoch seconds of an ISO 8601 timestamp or a number of seconds; NaN when it is neither."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        t = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return math.nan
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)  # naive timestamps are read as UTC, consistently
    return t.timestamp()


def _numbers(cells: Sequence[str], lines: list[int]) -> tuple[F64, tuple[int, str] | None]:
    """A column of text as floats (empty cells NaN) and the first cell that is not a number, if any."""
    texts = [c if c.strip() else "nan" for c in cells]
    try:
        return np.array(texts, dtype=np.float64), None
    except ValueError:
        pass
    out = np.full(len(texts), np.nan)
    first: tuple[int, str] | None = None
    for k, text in enumerate(texts):  # the slow path only for a column that has text in it
        try:
            out[k] = float(text)
        except ValueError:
            first = first or (lines[k], text)
    return out, first


def read_table(path: str | Path) -> Table:
    """Read a `,` or `;` separated CSV with a datetime column (named datetime/timestamp/time, or the first).

    Every problem is a ValueError of one line that names the file (and the line of the file, where there is one).
    """
    try:
        # utf-8-sig: spreadsheet exports start with a byte-order mark that would otherwise join the first column name
        with open(path, newline="", encoding="utf-8-sig") as f:
            head = f.readline()
            delimiter = ";" if head.count(";") > head.count(",") else ","
            f.seek(0)
            reader = csv.reader(f, delimiter=delimiter)
            records = [(reader.line_num, r) for r in reader if any(c.strip() for c in r)]
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path}: not a CSV text file ({exc})") from None
    if not records:
        raise ValueError(f"{path}: empty file (a CSV needs a header row and data rows)")
    header = [h.strip() for h in records[0][1]]
    if len(records) == 1:
        raise ValueError(f"{path}: only a header row, no data")
    lines = [n for n, _ in records[1:]]
    width = len(header)
    # columns of Python strings: one numpy text array would make every cell as wide as the widest
    # (a free-text note column of 5k characters would cost 20 kB per cell)
    columns = list(zip(*(r[:width] + [""] * (width - len(r)) for _, r in records[1:]), strict=True))
    lower = [h.lower() for h in header]
    tcol = next((lower.index(n) for n in TIME_COLUMNS if n in lower), 0)
    stamps = list(columns[tcol])
    times = np.asarray([_time_or_nan(text) for text in stamps], dtype=np.float64)
    unreadable = np.flatnonzero(~np.isfinite(times))
    if unreadable.size:
        k = int(unreadable[0])
        text = stamps[k]
        raise ValueError(
            f"{path}:{lines[k]}: {text!r} in column {header[tcol]!r} is not a timestamp (ISO 8601 or epoch "
            f"seconds; the time column is the one named {'/'.join(TIME_COLUMNS)}, else the first)"
        )
    keep = [i for i in range(width) if i != tcol]
    values = np.empty((len(stamps), len(keep)))
    not_numbers = {}
    for j, i in enumerate(keep):
        values[:, j], bad = _numbers(columns[i], lines)
        if bad is not None:
            not_numbers[header[i]] = bad
    return Table(times, tuple(header[i] for i in keep), values, header[tcol], tuple(stamps), str(path), not_numbers)


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
    adaptation: Mapping[str, float | int | bool | str] | None = None  # drift adaptation's state at the end


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
    calibrate_what: str = "all",
    scaling: str | None = None,
    threshold_floor: float = 0.0,
    adapt: ModelAdaptation | None = None,
) -> ReplayResult:
    """Replay rows (times, rows × inputs) through buffers, windows, scoring and the detector.

    `threshold`, `exit_ratio`, `min_duration` and `adapt` override the bundle's, as a config's models[] entry
    does; `calibrate_what`, `scaling` and `threshold_floor` are its calibrate section's (see calibrate()).
    """
    n = len(times)
    if n == 0:
        raise ValueError("no rows to replay")
    back = np.flatnonzero(np.diff(times) <= 0)
    if back.size:
        k = int(back[0])
        raise ValueError(f"timestamps must increase, but data row {k + 2} is not later than data row {k + 1}")
    if not 0 <= calibrate_rows <= n:
        raise ValueError(f"cannot calibrate on the first {calibrate_rows} rows of {n}")
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
    meta = bundle.metadata
    tags = tuple(meta.inputs)
    spacing = float(np.median(np.diff(times))) if len(times) > 1 else meta.sample_interval
    buffers = Buffers(retention=float(times[-1] - times[0]) + 10 * spacing, max_samples=max(len(times) + 16, 16))
    buffers.register(tags, max(spacing, 1e-3))
    quality = np.zeros(len(tags), dtype=np.uint8)
    scorer = WindowScorer(bundle)
    scores = np.full(n, np.nan)
    compared = np.full(n, np.nan)
    anomaly = np.zeros(n, dtype=np.int8)
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
    adapter = adapter_for(bundle, adapt, meta.name)
    # adapting, each window is normalised around the centre the windows before it left: scored one at a time
    batch = BATCH if adapter is None else 1
    pending: list[int] = []
    values_b: list[npt.NDArray[np.float32]] = []
    good_b: list[npt.NDArray[np.bool_]] = []
    no_shares = dict.fromkeys(tags, 0.0)

    def flush() -> None:
        if not pending:
            return
        s, _ = scorer.score(np.stack(values_b), np.stack(good_b))
        scores[pending] = s
        for i in pending:
            det.update(
                t_end=float(times[i]),
                window_start=float(times[i]) - meta.sample_interval * (meta.window - 1),
                score=float(scores[i]),
                contributions=no_shares,
                values={},
            )
            compared[i] = det.last_score
            anomaly[i] = det.active
        if adapter is not None:
            centre = adapter.update(values_b[0], good_b[0], max(float(s[0]), det.last_score), limit, det.active)
            if centre is not None:
                scorer.recentre(centre)
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
        if len(pending) >= batch:
            flush()
    flush()
    # warm-up: the window reaches back before the first row (not a lack of good data within the file)
    span = meta.sample_interval * (meta.window - 1)
    warmup = (np.arange(n) < first) | (times - span < times[0] - 1e-6 * meta.sample_interval)
    status = np.where(warmup, "warmup", np.where(np.isnan(scores), "insufficient", "scored"))
    return ReplayResult(times, compared, limit, anomaly, bundle, scores, status, adapter.state() if adapter else None)


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
