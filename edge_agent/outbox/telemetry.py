"""Telemetry per device: the latest value of every tag, what was last reported, and which tags go in a message.

Column-wise state, numpy arrays per device indexed by tag: each batch is scattered in with one fancy-index
assignment per array, and the tags a message carries are picked with one vectorised mask. Two modes:

- every tag (the default): each message carries the latest value of every tag the device has delivered;
- by exception (a tag has a `deadband`, or the device an `integrity_interval`): a message carries only tags
  whose value moved past their deadband since they were last reported, whose quality changed, that were
  never reported, or that were last reported `integrity_interval` ago or more (a quiet tag is not a dead one).

The JSON text is put together from per-tag pieces (records.tag_prefix, records.value_texts): a tag's value
text is formatted again only when its value changed, so a message costs string joins, not per-tag dicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from edge_agent.records import KIND_CODES, STR, tag_prefix, telemetry_record, time_tails, value_texts
from edge_agent.types import Quality, SampleBatch, TelemetryTag

MAX_LAYOUTS = 64  # batch layouts (tag tuples) remembered per device; beyond, the cache starts again

G = TypeVar("G", bound=np.generic)
BoolArray = npt.NDArray[np.bool_]
IndexArray = npt.NDArray[np.intp]


class DeviceTelemetry:
    """One device's telemetry: the latest sample of each tag and the last reported one, as numpy columns."""

    def __init__(self, device: str, tags: Sequence[TelemetryTag] = (), *, integrity: float | None = None) -> None:
        """`integrity` None: every tag in every message; else by exception, each tag re-sent at least this often."""
        self.device = device
        self.by_exception = integrity is not None
        self.integrity = integrity if integrity is not None else np.inf
        self.names: list[str] = []
        self._index: dict[str, int] = {}
        self._layouts: dict[tuple[tuple[str, ...], tuple[str, ...]], tuple[IndexArray, npt.NDArray[np.uint8]]] = {}
        self.prefix = np.empty(0, dtype=object)  # `{"name":"x","unit":"bar","value":` per tag
        self.deadband = np.zeros(0)
        self.float32 = np.zeros(0, dtype=bool)
        # the latest sample of each tag
        self.seen = np.zeros(0, dtype=bool)
        self.value = np.zeros(0)
        self.quality = np.zeros(0, dtype=np.uint8)
        self.time = np.zeros(0)
        self.kind = np.zeros(0, dtype=np.uint8)
        self.exact = np.empty(0, dtype=object)  # values float64 cannot carry (strings, big integers), else None
        # its value as JSON text, valid while `fresh`
        self.text = np.empty(0, dtype=object)
        self.fresh = np.zeros(0, dtype=bool)
        # what was last reported (by exception)
        self.sent = np.zeros(0, dtype=bool)
        self.sent_value = np.zeros(0)
        self.sent_quality = np.zeros(0, dtype=np.uint8)
        self.sent_exact = np.empty(0, dtype=object)
        self.sent_at = np.zeros(0)
        self._grow([t.name for t in tags], tags)

    def _grow(self, names: Sequence[str], infos: Sequence[TelemetryTag] = ()) -> None:
        """Add columns for tags not seen before (a batch may carry tags the config did not name: tests, merges)."""
        new = [n for n in dict.fromkeys(names) if n not in self._index]
        if not new:
            return
        by_name = {t.name: t for t in infos}
        info = [by_name.get(n, TelemetryTag(n)) for n in new]
        base = len(self.names)
        self.names.extend(new)
        self._index.update((n, base + i) for i, n in enumerate(new))
        k = len(new)

        def more(a: npt.NDArray[G], fill: object) -> npt.NDArray[G]:
            extra = np.empty(k, dtype=a.dtype)
            extra[...] = fill
            return np.concatenate([a, extra])

        prefixes = np.empty(k, dtype=object)
        prefixes[:] = [tag_prefix(t.name, t.unit) for t in info]
        self.prefix = np.concatenate([self.prefix, prefixes])
        self.deadband = np.concatenate([self.deadband, np.array([t.deadband for t in info], dtype=float)])
        self.float32 = np.concatenate([self.float32, np.array([t.float32 for t in info], dtype=bool)])
        self.seen, self.fresh, self.sent = (more(a, False) for a in (self.seen, self.fresh, self.sent))
        self.value, self.sent_value = more(self.value, np.nan), more(self.sent_value, np.nan)
        self.time, self.sent_at = more(self.time, 0.0), more(self.sent_at, -np.inf)
        self.quality, self.sent_quality = more(self.quality, 0), more(self.sent_quality, 0)
        self.kind = more(self.kind, 0)
        self.exact, self.sent_exact, self.text = (more(a, None) for a in (self.exact, self.sent_exact, self.text))

    def _layout(self, batch: SampleBatch) -> tuple[IndexArray, npt.NDArray[np.uint8]]:
        """The columns of a batch's tags and their kind codes (cached: a scan group sends the same tags each time)."""
        key = (batch.tags, batch.kinds)
        hit = self._layouts.get(key)
        if hit is None:
            self._grow(batch.tags)
            idx = np.fromiter((self._index[t] for t in batch.tags), dtype=np.intp, count=len(batch.tags))
            kinds = np.array([KIND_CODES[k] for k in batch.kinds] if batch.kinds else np.zeros(len(idx)), np.uint8)
            if len(self._layouts) >= MAX_LAYOUTS:
                self._layouts.clear()
            hit = self._layouts[key] = (idx, kinds)
        return hit

    def add(self, batch: SampleBatch) -> None:
        """Take a batch's samples as the latest of its tags."""
        idx, kinds = self._layout(batch)
        old_value, old_quality = self.value[idx], self.quality[idx]
        same = (old_quality == batch.quality) & (
            (old_value == batch.values) | (np.isnan(old_value) & np.isnan(batch.values))
        )
        self.fresh[idx] &= same & (self.kind[idx] == kinds)  # a value that moved is formatted again
        self.seen[idx] = True
        self.value[idx] = batch.values
        self.quality[idx] = batch.quality
        self.time[idx] = batch.ts if batch.times is None else batch.times
        self.kind[idx] = kinds
        if batch.exact or (kinds == STR).any():
            exact = np.empty(len(idx), dtype=object)
            for i, v in batch.exact.items():
                exact[i] = v
            self.fresh[idx[exact != self.exact[idx]]] = False
            self.exact[idx] = exact
        elif (self.exact != None).any():  # noqa: E711 (elementwise) a column that carried an exact value: a float now
            self.fresh[idx[self.exact[idx] != None]] = False  # noqa: E711 (elementwise on an object array)
            self.exact[idx] = None

    def due(self, now: float) -> BoolArray:
        """The tags the next message carries: every tag seen, or (by exception) those that changed or are due."""
        if not self.by_exception:
            return self.seen.copy()
        with np.errstate(invalid="ignore"):  # inf - inf: NaN, and inf to inf is no move (below)
            diff = np.abs(self.value - self.sent_value)
        both_nan = np.isnan(self.value) & np.isnan(self.sent_value)
        moved = ~((diff <= self.deadband) | (self.value == self.sent_value) | both_nan)  # inf to inf: no move
        has_exact = self.exact != None  # noqa: E711 (elementwise on an object array)
        if has_exact.any() or (self.sent_exact != None).any():  # noqa: E711
            moved |= self.exact != self.sent_exact
        changed = moved | (self.quality != self.sent_quality) | ~self.sent
        return self.seen & (changed | (now - self.sent_at >= self.integrity))

    def message(self, *, agent: str, site: str, ts: float, now: float) -> bytes | None:
        """The JSON record of the tags due now (None: nothing to report), remembered as reported."""
        picked = np.flatnonzero(self.due(now))
        if not len(picked):
            return None
        stale = picked[~self.fresh[picked]]
        if len(stale):
            good = self.quality[stale] == Quality.GOOD
            self.text[stale] = value_texts(
                self.value[stale], good, self.kind[stale], self.float32[stale], self.exact[stale]
            )
            self.fresh[stale] = True
        record = telemetry_record(
            self.device,
            agent=agent,
            site=site,
            ts=ts,
            prefixes=self.prefix[picked],
            values=self.text[picked],
            qualities=self.quality[picked],
            tails=time_tails(self.time[picked]),
        )
        if self.by_exception:
            self.sent[picked] = True
            self.sent_value[picked] = self.value[picked]
            self.sent_quality[picked] = self.quality[picked]
            self.sent_exact[picked] = self.exact[picked]
            self.sent_at[picked] = now
        return record
