"""Coalesce many small address spans into the fewest reads a protocol allows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Span(Generic[T]):
    """An item occupying addresses [start, start + size) of one address space."""

    start: int
    size: int
    item: T

    @property
    def end(self) -> int:
        """One past the last address."""
        return self.start + self.size


@dataclass(frozen=True, slots=True)
class Read(Generic[T]):
    """One request covering [start, start + count) and the items inside it."""

    start: int
    count: int
    items: tuple[Span[T], ...]


def plan_reads(spans: Sequence[Span[T]], *, max_count: int, max_gap: int, merge: bool = True) -> list[Read[T]]:
    """Merge spans, sorted by address, into reads of at most `max_count` units.

    A new read starts when adding the next span would exceed `max_count` or skip more than
    `max_gap` unread units. Extending the current read as far as it goes is optimal for the
    number of reads when spans must not be split. Spans larger than `max_count` must have been
    rejected by config validation.
    """
    ordered = sorted(spans, key=lambda s: (s.start, s.size))
    reads: list[Read[T]] = []
    cur: list[Span[T]] = []
    cur_start = cur_end = 0
    for span in ordered:
        if span.size > max_count:
            raise ValueError(f"span of {span.size} exceeds the maximum of {max_count} per read")
        if cur and merge and span.start - cur_end <= max_gap and max(cur_end, span.end) - cur_start <= max_count:
            cur.append(span)
            cur_end = max(cur_end, span.end)
            continue
        if cur:
            reads.append(Read(cur_start, cur_end - cur_start, tuple(cur)))
        cur, cur_start, cur_end = [span], span.start, span.end
    if cur:
        reads.append(Read(cur_start, cur_end - cur_start, tuple(cur)))
    return reads


def minimum_reads(spans: Sequence[Span[T]], *, max_count: int) -> int:
    """Fewest reads possible with an unlimited gap: a lower bound for the planner (benchmarks)."""
    return len(plan_reads(spans, max_count=max_count, max_gap=1 << 30))
