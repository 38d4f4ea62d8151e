"""Ring buffers and window assembly."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.buffers import MIN_CAPACITY, Buffers
from edge_agent.types import Quality, SampleBatch

TAGS = ("a", "b", "c")


def batch(
    ts: float, values: list[float], quality: list[int] | None = None, tags: tuple[str, ...] = TAGS
) -> SampleBatch:
    q = np.asarray(quality or [0] * len(values), dtype=np.uint8)
    return SampleBatch("dev", ts, tags, np.asarray(values, dtype=np.float64), q)


def test_ring_wraps_and_stays_bounded() -> None:
    buf = Buffers(retention=10.0, max_samples=64)
    store = buf.register(TAGS, 1.0)
    size = buf.nbytes
    for i in range(1000):
        buf.write(batch(float(i), [i, -i, 2 * i]))
    assert buf.nbytes == size  # nothing grew
    ts, values, _ = buf.series("b")
    assert store.capacity == 16 and len(ts) == 16
    assert list(ts) == [float(i) for i in range(984, 1000)]
    assert list(values) == [-float(i) for i in range(984, 1000)]
    assert buf.latest("c") == (999.0, 1998.0, Quality.GOOD)


def test_capacity_follows_retention_and_cap() -> None:
    buf = Buffers(retention=60.0, max_samples=100)
    assert buf.register(("x",), 1.0).capacity == 61
    assert buf.register(("y",), 0.1).capacity == 100


def test_window_on_grid_with_hold_and_mask() -> None:
    buf = Buffers(retention=100.0, max_samples=1000)
    buf.register(TAGS, 1.0)
    for i in range(10):
        q = [0, 2 if i == 5 else 0, 0]  # b is bad at t=5
        buf.write(batch(100.0 + i + 0.2, [i, 10 + i, 20 + i], q))
    w = buf.window(TAGS, t_end=109.0, interval=1.0, n_samples=5)
    assert w.values.shape == (5, 3) and w.values.dtype == np.float32
    assert list(w.times) == [105.0, 106.0, 107.0, 108.0, 109.0]
    # at grid 105.0 the last sample is from 104.2 (value 4)
    assert list(w.values[:, 0]) == [4, 5, 6, 7, 8]
    assert list(w.good[:, 1]) == [True, False, True, True, True]
    assert np.isnan(w.values[1, 1])
    assert w.good_fraction == pytest.approx(14 / 15)


def test_window_marks_gaps_older_than_max_age() -> None:
    buf = Buffers(retention=100.0, max_samples=1000)
    buf.register(("a",), 1.0)
    buf.write(batch(0.0, [1.0], tags=("a",)))
    buf.write(batch(10.0, [2.0], tags=("a",)))
    w = buf.window(("a",), t_end=10.0, interval=1.0, n_samples=11)
    assert list(w.good[:, 0]) == [True, True] + [False] * 8 + [True]


def test_partial_writes_advance_only_their_columns() -> None:
    buf = Buffers(retention=100.0, max_samples=1000)
    store = buf.register(TAGS, 1.0)
    store.write(np.asarray([1]), 5.0, np.asarray([7.0]), np.asarray([Quality.GOOD], dtype=np.uint8))
    assert buf.latest("a") is None
    assert buf.latest("b") == (5.0, 7.0, Quality.GOOD)


def test_tags_register_once() -> None:
    buf = Buffers(retention=10.0, max_samples=100)
    buf.register(("a",), 1.0)
    with pytest.raises(ValueError, match="twice"):
        buf.register(("a",), 2.0)


def test_subscribed_values_hold_until_the_next_sample() -> None:
    buf = Buffers(retention=100.0, max_samples=1000)
    buf.register(("a",), 1.0, hold=True)
    buf.write(batch(0.0, [1.0], tags=("a",)))
    w = buf.window(("a",), t_end=50.0, interval=1.0, n_samples=5)
    assert w.good.all() and (w.values == 1.0).all()  # no change for 50 s is still a good value
    buf.write(batch(48.5, [np.nan], quality=[Quality.COMMS_LOST], tags=("a",)))
    w = buf.window(("a",), t_end=50.0, interval=1.0, n_samples=5)
    assert list(w.good[:, 0]) == [True, True, True, False, False]  # grid 46..50; lost at 48.5


def test_stats_count_what_the_rings_hold() -> None:
    b = Buffers(retention=10.0, max_samples=100)
    group = ("a", "b")
    b.register(group, 1.0)
    before = b.stats()
    assert (before.tags, before.samples, before.capacity) == (2, 0, 2 * max(MIN_CAPACITY, 11))
    b.write(batch(1.0, [1.0, 2.0], tags=group))
    b.write(batch(2.0, [3.0], tags=("a",)))
    after = b.stats()
    assert after.samples == 3 and after.nbytes == before.nbytes == b.nbytes


# ---------------------------------------------------------------- live reconfiguration: drop, carry over, grow


def test_unregister_drops_whole_rings_and_returns_their_samples() -> None:
    buf = Buffers(retention=10.0, max_samples=64)
    buf.register(TAGS, 1.0)
    buf.register(("x",), 1.0)
    for i in range(5):
        buf.write(batch(float(i), [i, 10 + i, 20 + i]))
    with pytest.raises(ValueError, match="read together with these and not dropped: b, c"):
        buf.unregister(["a"])  # a ring goes whole or not at all
    kept = buf.unregister(list(TAGS))
    assert set(kept) == set(TAGS) and list(kept["b"][1]) == [10.0, 11.0, 12.0, 13.0, 14.0]
    assert "a" not in buf and "x" in buf and buf.stats().tags == 1
    buf.register(TAGS, 1.0)  # registered again: no "registered twice"
    assert buf.latest("a") is None


def test_history_carries_over_and_writing_goes_on_after_it() -> None:
    buf = Buffers(retention=10.0, max_samples=64)
    buf.register(("a", "b"), 1.0)
    for i in range(30):  # more than the 16-sample ring: it wrapped
        buf.write(batch(float(i), [i, -i], tags=("a", "b")))
    kept = buf.unregister(["a", "b"])
    group = ("a", "b", "new")  # a tag added to the device; "b" changed its definition, so not carried
    buf.register(group, 1.0, history={"a": kept["a"]})
    assert list(buf.series("a")[0]) == [float(i) for i in range(14, 30)]
    assert buf.latest("b") is None and buf.latest("new") is None
    for i in range(30, 33):
        buf.write(batch(float(i), [i, 100 + i, 200 + i], tags=group))
    ts, values, _ = buf.series("a")
    assert list(ts) == [float(i) for i in range(17, 33)] and values[-1] == 32.0  # oldest overwritten first
    assert list(buf.series("new")[1]) == [230.0, 231.0, 232.0]
    w = buf.window(group, t_end=32.0, interval=1.0, n_samples=4)
    assert w.good[:, 0].all() and w.good[-3:, 1:].all() and not w.good[0, 1:].any()


def test_grow_keeps_samples_and_the_drivers_tuple() -> None:
    buf = Buffers(retention=10.0, max_samples=1000)
    store = buf.register(TAGS, 1.0)
    for i in range(20):
        buf.write(batch(float(i), [i, i, i]))
    buf.grow(60.0, 1000)
    assert buf.retention == 60.0 and buf.stats().capacity == 3 * 61
    assert list(buf.series("a")[0]) == [float(i) for i in range(4, 20)]  # 16 = capacity before growing
    for i in range(20, 80):
        buf.write(batch(float(i), [i, i, i]))  # the same tuple: the group's fast path finds the new ring
    assert len(buf.series("c")[0]) == 61 and buf.latest("b") == (79.0, 79.0, Quality.GOOD)
    buf.grow(30.0, 1000)  # never shrinks
    assert buf.retention == 60.0 and store.capacity == MIN_CAPACITY and buf.stats().capacity == 3 * 61
