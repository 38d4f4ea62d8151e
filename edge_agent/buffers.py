"""Rolling per-tag history in fixed-size numpy rings, and windows resampled onto a regular grid."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edge_agent.types import FloatArray, Quality, QualityArray, SampleBatch, Window

MIN_CAPACITY = 16
Series = tuple[FloatArray, FloatArray, QualityArray]  # one tag's (times, values, quality), oldest first


class RingStore:
    """Rings for a set of tags that share a poll interval: one column per tag, one head per tag.

    Writing a whole batch is one fancy-indexed assignment per array; writing a subset of the
    columns (subscriptions deliver single tags) advances only those columns' heads.
    """

    def __init__(self, tags: Sequence[str], capacity: int, interval: float, *, hold: bool = False) -> None:
        n = len(tags)
        self.hold = hold  # pushed on change: a value holds until the next sample, however old
        self.tags = tuple(tags)
        self.capacity = capacity
        self.interval = interval
        self.ts = np.full((capacity, n), -np.inf, dtype=np.float64)
        self.values = np.full((capacity, n), np.nan, dtype=np.float64)
        self.quality = np.full((capacity, n), Quality.COMMS_LOST, dtype=np.uint8)
        self.head = np.zeros(n, dtype=np.intp)  # next row to write, per column
        self.count = np.zeros(n, dtype=np.intp)

    @property
    def nbytes(self) -> int:
        """Memory held by the rings."""
        return self.ts.nbytes + self.values.nbytes + self.quality.nbytes

    def write(
        self, cols: npt.NDArray[np.intp], ts: float | FloatArray, values: FloatArray, quality: QualityArray
    ) -> None:
        """Append one sample to each of `cols`."""
        rows = self.head[cols]
        self.ts[rows, cols] = ts
        self.values[rows, cols] = values
        self.quality[rows, cols] = quality
        self.head[cols] = (rows + 1) % self.capacity
        self.count[cols] = np.minimum(self.count[cols] + 1, self.capacity)

    def fill(self, col: int, ts: FloatArray, values: FloatArray, quality: QualityArray) -> None:
        """Put earlier samples (oldest first) into an empty column, ending just before row 0, where writing goes on.

        Every column's head stays at 0, so the columns of a group still move together once the ring wraps.
        """
        n = min(len(ts), self.capacity)
        if n == 0:
            return
        rows = np.arange(self.capacity - n, self.capacity)
        self.ts[rows, col] = ts[-n:]
        self.values[rows, col] = values[-n:]
        self.quality[rows, col] = quality[-n:]
        self.count[col] = n

    def series(self, col: int) -> tuple[FloatArray, FloatArray, QualityArray]:
        """One tag's stored samples, oldest first."""
        n = int(self.count[col])
        rows = (int(self.head[col]) - n + np.arange(n)) % self.capacity
        return self.ts[rows, col], self.values[rows, col], self.quality[rows, col]


@dataclass(frozen=True, slots=True)
class _Slot:
    store: RingStore
    col: int


@dataclass(frozen=True, slots=True)
class BuffersStats:
    """A snapshot of the buffers: how many tags, how many samples they hold, and their fixed memory."""

    tags: int
    samples: int  # held now, over every tag
    capacity: int  # the most they can hold (rings are allocated at registration and never grow)
    nbytes: int
    retention: float


class Buffers:
    """Every tag's rolling history, bounded: capacity = retention / interval, capped per tag."""

    def __init__(self, *, retention: float, max_samples: int) -> None:
        self.retention = retention
        self.max_samples = max_samples
        self._slots: dict[str, _Slot] = {}
        self._stores: list[RingStore] = []
        # the tag tuples drivers send for whole scan groups, by identity: the hot path skips name lookups
        self._groups: dict[int, tuple[tuple[str, ...], RingStore, npt.NDArray[np.intp]]] = {}

    def register(
        self, tags: Sequence[str], interval: float, *, hold: bool = False, history: Mapping[str, Series] | None = None
    ) -> RingStore:
        """Create the rings for tags read together on one interval (`hold`: delivered on change only).

        `history`: samples some of these tags had before (what `unregister` returned), kept as their oldest.
        """
        dup = [t for t in tags if t in self._slots]
        if dup:
            raise ValueError(f"tags registered twice: {', '.join(dup)}")
        store = RingStore(tags, self._capacity(interval), interval, hold=hold)
        for col, tag in enumerate(tags):
            if history is not None and tag in history:
                store.fill(col, *history[tag])
        self._add(store, tags)
        return store

    def unregister(self, tags: Sequence[str]) -> dict[str, Series]:
        """Drop the rings holding `tags` (a device stopped or restarts); returns each dropped tag's samples.

        Rings go whole: every tag read together with one of `tags` must be among them.
        """
        stores = list({id(self._slots[t].store): self._slots[t].store for t in tags if t in self._slots}.values())
        gone = {t for s in stores for t in s.tags}
        if not gone <= set(tags):
            raise ValueError(f"read together with these and not dropped: {', '.join(sorted(gone - set(tags)))}")
        kept = {t: self.series(t) for t in gone}  # fancy indexing: copies, not views of the dropped rings
        for tag in gone:
            del self._slots[tag]
        self._stores = [s for s in self._stores if s not in stores]
        self._groups = {k: g for k, g in self._groups.items() if g[1] not in stores}
        return kept

    def grow(self, retention: float, max_samples: int) -> None:
        """Hold at least `retention` seconds (capped at `max_samples` per tag) from now on; samples are kept.

        Rings that are long enough stay as they are (nothing shrinks while running).
        """
        self.retention, self.max_samples = max(self.retention, retention), max(self.max_samples, max_samples)
        for old in list(self._stores):
            capacity = self._capacity(old.interval)
            if capacity <= old.capacity:
                continue
            store = RingStore(old.tags, capacity, old.interval, hold=old.hold)
            for col in range(len(old.tags)):
                store.fill(col, *old.series(col))
            self._stores.remove(old)
            self._groups = {k: g for k, g in self._groups.items() if g[1] is not old}
            self._add(store, old.tags)  # the very tuple the driver sends (tuple() of a tuple is itself)

    def _capacity(self, interval: float) -> int:
        return min(self.max_samples, max(MIN_CAPACITY, math.ceil(self.retention / interval) + 1))

    def _add(self, store: RingStore, tags: Sequence[str]) -> None:
        self._stores.append(store)
        for col, tag in enumerate(store.tags):
            self._slots[tag] = _Slot(store, col)
        if isinstance(tags, tuple):
            self._groups[id(tags)] = (tags, store, np.arange(len(tags), dtype=np.intp))

    @property
    def nbytes(self) -> int:
        """Memory held by all rings (fixed at registration: nothing grows)."""
        return sum(s.nbytes for s in self._stores)

    def stats(self) -> BuffersStats:
        """A snapshot (a sum over the rings' counters; no copy of any data)."""
        return BuffersStats(
            tags=len(self._slots),
            samples=int(sum(int(s.count.sum()) for s in self._stores)),
            capacity=sum(s.capacity * len(s.tags) for s in self._stores),
            nbytes=self.nbytes,
            retention=self.retention,
        )

    def __contains__(self, tag: str) -> bool:
        return tag in self._slots

    def write(self, batch: SampleBatch) -> None:
        """Append a batch: a whole registered group, or any subset of one group's tags (subscriptions)."""
        group = self._groups.get(id(batch.tags))
        if group is not None and group[0] is batch.tags:
            _, store, cols = group
        else:
            slots = [self._slots[t] for t in batch.tags]
            store = slots[0].store
            if any(s.store is not store for s in slots):
                raise ValueError("a batch must hold tags of one scan group")
            cols = np.asarray([s.col for s in slots], dtype=np.intp)
        store.write(cols, batch.ts if batch.times is None else batch.times, batch.values, batch.quality)

    def latest(self, tag: str) -> tuple[float, float, Quality] | None:
        """The newest (ts, value, quality) of a tag, or None before its first sample."""
        slot = self._slots[tag]
        if slot.store.count[slot.col] == 0:
            return None
        row = (int(slot.store.head[slot.col]) - 1) % slot.store.capacity
        return (
            float(slot.store.ts[row, slot.col]),
            float(slot.store.values[row, slot.col]),
            Quality(int(slot.store.quality[row, slot.col])),
        )

    def series(self, tag: str) -> tuple[FloatArray, FloatArray, QualityArray]:
        """A tag's stored samples, oldest first."""
        slot = self._slots[tag]
        return slot.store.series(slot.col)

    def spacing(self, tags: Sequence[str], last: int = 32) -> dict[str, float]:
        """Median seconds between each polled tag's last `last` samples (tags pushed on change, or with fewer than
        three samples, are left out)."""
        out = {}
        for tag in tags:
            slot = self._slots.get(tag)
            if slot is None or slot.store.hold or slot.store.count[slot.col] < 3:
                continue
            ts = slot.store.series(slot.col)[0][-last:]
            out[tag] = float(np.median(np.diff(ts)))
        return out

    def window(
        self, tags: Sequence[str], *, t_end: float, interval: float, n_samples: int, max_age: float | None = None
    ) -> Window:
        """Resample tags onto the grid t_end − k·interval (k = n−1 … 0), holding the last sample.

        A cell is good when the tag had a good sample no older than `max_age` at that grid point
        (default 1.5 × the longer of the grid interval and the tag's poll interval).
        """
        grid = t_end - interval * np.arange(n_samples - 1, -1, -1, dtype=np.float64)
        out = np.full((n_samples, len(tags)), np.nan, dtype=np.float32)
        good = np.zeros((n_samples, len(tags)), dtype=np.bool_)
        by_store: dict[int, tuple[RingStore, list[int], list[int]]] = {}
        for j, tag in enumerate(tags):
            slot = self._slots[tag]
            entry = by_store.setdefault(id(slot.store), (slot.store, [], []))
            entry[1].append(j)
            entry[2].append(slot.col)
        for store, js, cols in by_store.values():
            if store.hold and max_age is None:
                # a subscription sends nothing while a value stands still: the last sample holds until a
                # newer one (bad or comms-lost samples end it), so only the newest rows are needed
                age_limit, need = math.inf, math.ceil((grid[-1] - grid[0]) / store.interval) + 2
            else:
                age_limit = max_age if max_age is not None else 1.5 * max(interval, store.interval)
                # only the rows that can reach into the window
                need = math.ceil((grid[-1] - grid[0] + age_limit) / store.interval) + 2
            self._resample(store, np.asarray(js), np.asarray(cols), grid, age_limit, need, out, good)
        return Window(tuple(tags), float(t_end), float(interval), out, good)

    @staticmethod
    def _resample(
        store: RingStore,
        js: npt.NDArray[np.intp],
        cols: npt.NDArray[np.intp],
        grid: FloatArray,
        age_limit: float,
        need: int,
        out: npt.NDArray[np.float32],
        good: npt.NDArray[np.bool_],
    ) -> None:
        heads, counts = store.head[cols], store.count[cols]
        n = int(min(need, counts.min()))
        if n > 0 and (heads == heads[0]).all() and (counts == counts[0]).all():
            # polled tags are written together: one set of rows, and usually one timestamp per row
            rows = (int(heads[0]) - n + np.arange(n)) % store.capacity
            ts = store.ts[rows[:, None], cols]
            if (ts == ts[:, :1]).all():
                idx = np.searchsorted(ts[:, 0], grid, side="right") - 1
                have = idx >= 0
                idx_c = np.where(have, idx, 0)
                fresh = have & (grid - ts[idx_c, 0] <= age_limit)
                vals = store.values[rows[idx_c][:, None], cols]
                ok = fresh[:, None] & (store.quality[rows[idx_c][:, None], cols] == Quality.GOOD)
                out[:, js] = np.where(ok, vals, np.nan)
                good[:, js] = ok
                return
        for j, col in zip(js, cols, strict=True):
            ts_c, values, quality = store.series(int(col))
            if ts_c.size == 0:
                continue
            ts_c, values, quality = ts_c[-need:], values[-need:], quality[-need:]
            idx = np.searchsorted(ts_c, grid, side="right") - 1
            have = idx >= 0
            idx_c = np.where(have, idx, 0)
            ok = have & (grid - ts_c[idx_c] <= age_limit) & (quality[idx_c] == Quality.GOOD)
            out[:, j] = np.where(ok, values[idx_c], np.nan)
            good[:, j] = ok
