"""CSVs of tag values for replay, calibrate and train: the time column, the label columns, and whether the rows
fit a bundle (their spacing against its `sample_interval`)."""

from __future__ import annotations

import csv
import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
TIME_COLUMNS = ("datetime", "timestamp", "time", "ts", "date")
# ground truth, never a model input: SKAB's anomaly/changepoint, a generic label, the simulator's fault_active
LABEL_COLUMNS = ("anomaly", "label", "changepoint", "fault_active")
SPACING_LIMITS = (0.5, 2.0)  # the rows' median spacing over the bundle's sample_interval, outside which replay refuses
ALLOW_SPACING = "--allow-spacing"  # the override's name, in the messages that suggest it
ROW_INTERVAL = "--row-interval"


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
    time_from: str = "dates"  # dates (ISO 8601 text), numbers (epoch seconds) or rows (--row-interval)

    def select(self, names: Sequence[str]) -> F64:
        """Columns by name, in the given order; a clear error names what is missing, not numeric or a label."""
        cols = []
        for name in names:
            i = self._index(name)
            if i is None:
                raise ValueError(f"{self.source}: no column {name!r}; it has {', '.join(self.columns)}")
            if self.columns[i].lower() in LABEL_COLUMNS:
                raise ValueError(f"{self.source}: column {self.columns[i]!r} is a label (ground truth), not an input")
            bad = self.not_numbers.get(self.columns[i])
            if bad is not None:
                raise ValueError(f"{self.source}:{bad[0]}: column {self.columns[i]!r}: {bad[1]!r} is not a number")
            cols.append(i)
        return self.values[:, cols]

    def _index(self, name: str) -> int | None:
        lower = [c.lower() for c in self.columns]
        if name in self.columns:
            return self.columns.index(name)
        return lower.index(name.lower()) if name.lower() in lower else None

    @property
    def inputs(self) -> list[str]:
        """Every column but the labels: what a model trained on this file reads by default."""
        return [c for c in self.columns if c.lower() not in LABEL_COLUMNS]

    def truth(self) -> tuple[str, npt.NDArray[np.int8]] | None:
        """The ground-truth column (anomaly, label or fault_active; not changepoint) as 0/1 per row, if there is one."""
        for name in ("anomaly", "label", "fault_active"):
            i = self._index(name)
            if i is not None and self.columns[i] not in self.not_numbers:
                return self.columns[i], (np.nan_to_num(self.values[:, i]) > 0).astype(np.int8)
        return None

    @property
    def counts_rows(self) -> bool:
        """The time column is a row index (0, 1, 2, … or 1, 2, 3, …), not times."""
        t = self.times
        return self.time_from == "numbers" and t.size > 1 and t[0] in (0.0, 1.0) and bool((np.diff(t) == 1).all())


def _time_or_nan(text: str) -> float:
    """Epoch seconds of an ISO 8601 timestamp or a number of seconds; NaN when it is neither."""
    try:
        t = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return math.nan
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)  # naive timestamps are read as UTC, consistently
    return t.timestamp()


def _times(stamps: Sequence[str]) -> F64:
    """Epoch seconds of a time column: numbers in one numpy call, else each cell as ISO 8601 (NaN where unreadable)."""
    try:
        return np.array(stamps, dtype=np.float64)
    except ValueError:
        return np.asarray([_time_or_nan(text) for text in stamps], dtype=np.float64)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _numbers(cells: Sequence[str], lines: list[int]) -> tuple[F64, tuple[int, str] | None]:
    """A column of text as floats (empty cells NaN) and the first cell that is not a number, if any."""
    try:
        return np.array(cells, dtype=np.float64), None  # the common case: every cell a number, none empty
    except ValueError:
        pass
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


def _time_index(path: str | Path, header: list[str], first_row: Sequence[str], time_column: str | None) -> int | None:
    """The time column: the one named (--time-column), else one named like a time, else the first if it holds text.

    None when there is none and the rows are to be spaced by --row-interval; a first column of numbers is not taken
    for times silently (it used to be: a data column became the time and its first values vanished from the inputs).
    """
    lower = [h.lower() for h in header]
    if time_column is not None:
        if time_column.lower() not in lower:
            raise ValueError(f"{path}: no column {time_column!r} (--time-column); it has {', '.join(header)}")
        return lower.index(time_column.lower())
    named = next((lower.index(n) for n in TIME_COLUMNS if n in lower), None)
    if named is not None:
        return named
    cell = first_row[0].strip() if first_row else ""
    if cell and not _is_number(cell):
        return 0  # text in the first column: meant as timestamps (an unreadable one is then named with its line)
    return None


def read_table(path: str | Path, *, time_column: str | None = None, row_interval: float | None = None) -> Table:
    """Read a `,` or `;` separated CSV with a time column (named datetime/timestamp/time/ts/date, or `time_column`).

    `row_interval`: rows are that many seconds apart (a CSV without times, or with a row index for a time column).
    Every problem is a ValueError of one line that names the file (and the line of the file, where there is one).
    """
    try:
        # utf-8-sig: spreadsheet exports start with a byte-order mark that would otherwise join the first column name
        with open(path, newline="", encoding="utf-8-sig") as f:
            head = f.readline()
            delimiter = ";" if head.count(";") > head.count(",") else ","
            f.seek(0)
            reader = csv.reader(f, delimiter=delimiter)
            # a blank line, or one of empty cells, is no row ("".join: one call per row, not one per cell)
            records = [(reader.line_num, r) for r in reader if "".join(r).strip()]
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
    tcol = _time_index(path, header, records[1][1], time_column)
    if tcol is None and row_interval is None:
        raise ValueError(
            f"{path}: no time column: none is named {'/'.join(TIME_COLUMNS)} and the first column {header[0]!r} "
            f"holds numbers ({records[1][1][0].strip()!r} on line {lines[0]}); name the time column one of those, "
            f"or pass --time-column NAME, or {ROW_INTERVAL} SECONDS when the rows are evenly spaced"
        )
    n = len(lines)
    if row_interval is not None:
        if not (row_interval > 0 and math.isfinite(row_interval)):
            raise ValueError(f"{ROW_INTERVAL} {row_interval:g}: rows are a positive number of seconds apart")
        times, time_from = row_interval * np.arange(n, dtype=np.float64), "rows"
        # the time column's text (a row index, say) still joins output rows back; without one, the row number does
        stamps = list(columns[tcol]) if tcol is not None else [str(k + 1) for k in range(n)]
        tname = header[tcol] if tcol is not None else "row"
    else:
        assert tcol is not None
        stamps, tname = list(columns[tcol]), header[tcol]
        times = _times(stamps)
        unreadable = np.flatnonzero(~np.isfinite(times))
        if unreadable.size:
            k = int(unreadable[0])
            raise ValueError(
                f"{path}:{lines[k]}: {stamps[k]!r} in column {tname!r} is not a timestamp (ISO 8601 or epoch "
                f"seconds; the time column is the one named {'/'.join(TIME_COLUMNS)}, or --time-column NAME)"
            )
        time_from = "numbers" if all(_is_number(s) for s in stamps[:3]) else "dates"
    keep = [i for i in range(width) if i != tcol]
    values = np.empty((n, len(keep)))
    not_numbers = {}
    for j, i in enumerate(keep):
        values[:, j], bad = _numbers(columns[i], lines)
        if bad is not None:
            not_numbers[header[i]] = bad
    return Table(times, tuple(header[i] for i in keep), values, tname, tuple(stamps), str(path), not_numbers, time_from)


def check_increasing(times: F64) -> None:
    """A ValueError naming the first data row whose time is not later than the one before."""
    back = np.flatnonzero(np.diff(times) <= 0)
    if back.size:
        k = int(back[0])
        raise ValueError(f"timestamps must increase, but data row {k + 2} is not later than data row {k + 1}")


def check_spacing(table: Table, sample_interval: float, *, allow: bool = False) -> list[str]:
    """Warnings about the rows' spacing against a bundle's sample_interval; a ValueError when it is far off.

    Far off: the median spacing is under SPACING_LIMITS[0] or over SPACING_LIMITS[1] times the interval (a
    window would then span a different stretch of the process than the model learnt). `allow` turns the
    refusal into a warning.
    """
    try:
        check_increasing(table.times)
    except ValueError as exc:
        raise ValueError(f"{table.source}: {exc}") from None
    if table.times.size < 2:
        return []
    spacing = float(np.median(np.diff(table.times)))
    low, high = SPACING_LIMITS
    col = table.time_column
    if table.counts_rows:
        seen = f"column {col!r} counts rows ({', '.join(f'{t:g}' for t in table.times[:3])}, …) and holds no dates"
    else:
        seen = f"rows are {spacing:g} s apart (median of column {col!r})"
    if low * sample_interval <= spacing <= high * sample_interval:
        return [f"{table.source}: {seen}: read as seconds from the start"] if table.counts_rows else []
    text = f"{table.source}: {seen}, but the bundle samples every {sample_interval:g} s"
    if allow:
        return [text]
    fix = f"pass {ROW_INTERVAL} SECONDS to space the rows evenly" if table.counts_rows else "resample the data"
    raise ValueError(f"{text}; {fix}, or {ALLOW_SPACING} to score it anyway")
