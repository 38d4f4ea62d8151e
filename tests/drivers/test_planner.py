"""The read planner: caps, gaps, optimality."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from edge_agent.config import parse_config
from edge_agent.drivers.modbus.driver import ModbusDriver
from edge_agent.drivers.planner import Span, minimum_reads, plan_reads


def spans_of(pairs: list[tuple[int, int]]) -> list[Span[int]]:
    return [Span(s, n, i) for i, (s, n) in enumerate(pairs)]


def test_merges_neighbours_within_gap() -> None:
    reads = plan_reads(spans_of([(0, 2), (2, 2), (10, 1), (40, 2)]), max_count=125, max_gap=8)
    assert [(r.start, r.count) for r in reads] == [(0, 11), (40, 2)]


def test_respects_the_cap() -> None:
    reads = plan_reads(spans_of([(i * 2, 2) for i in range(100)]), max_count=125, max_gap=0)
    assert [(r.start, r.count) for r in reads] == [(0, 124), (124, 76)]


def test_merge_off_is_one_read_per_tag() -> None:
    assert len(plan_reads(spans_of([(0, 1), (1, 1), (2, 1)]), max_count=125, max_gap=10, merge=False)) == 3


@st.composite
def layouts(draw: st.DrawFn) -> list[tuple[int, int]]:
    n = draw(st.integers(1, 60))
    pos, out = 0, []
    for _ in range(n):
        pos += draw(st.integers(0, 30))
        size = draw(st.sampled_from([1, 2, 4]))
        out.append((pos, size))
        pos += size
    return out


@given(layouts(), st.integers(0, 40), st.integers(4, 125))
def test_every_span_is_read_once_within_bounds(layout: list[tuple[int, int]], gap: int, cap: int) -> None:
    reads = plan_reads(spans_of(layout), max_count=cap, max_gap=gap)
    seen = sorted(s.item for r in reads for s in r.items)
    assert seen == list(range(len(layout)))
    for r in reads:
        assert r.count <= cap
        for s in r.items:
            assert r.start <= s.start and s.end <= r.start + r.count
        # no hole inside a read is wider than the allowed gap
        covered = sorted((s.start, s.end) for s in r.items)
        end = covered[0][1]
        for start, stop in covered[1:]:
            assert start - end <= gap
            end = max(end, stop)


@given(layouts(), st.integers(4, 125))
def test_unlimited_gap_gives_the_minimum(layout: list[tuple[int, int]], cap: int) -> None:
    # greedy is optimal: no read could be saved by a smarter split (check against a DP)
    spans = sorted(layout)
    best = [0] + [10**9] * len(spans)
    for i in range(1, len(spans) + 1):
        for j in range(i):
            start, end = spans[j][0], max(s + n for s, n in spans[j:i])
            if end - start <= cap:
                best[i] = min(best[i], best[j] + 1)
    assert minimum_reads(spans_of(layout), max_count=cap) == best[-1]


def test_a_merged_modbus_request_splits_into_its_contiguous_runs() -> None:
    # what the driver does when a device refuses a merged read across unmapped addresses (exception 2)
    text = (
        "devices:\n  - {name: plc, type: modbus, host: 127.0.0.1, tags: [\n"
        '      {name: a, address: "40006", type: float32}, {name: b, address: "40008"},\n'
        '      {name: c, address: "40023", type: int16}, {name: d, address: "40024", type: float32},\n'
        '      {name: k1, address: "00003"}, {name: k2, address: "00004"}, {name: k3, address: "00100"}]}\n'
    )
    driver = ModbusDriver(parse_config(text).devices[0])
    holding, coils = driver._plans[driver.groups[0]].requests
    assert (holding.start, holding.count, holding.buf_offset) == (5, 20, 0)
    runs = holding.runs()
    assert [(r.start, r.count, r.buf_offset, r.cols.tolist()) for r in runs] == [(5, 3, 0, [0, 1]), (22, 3, 34, [2, 3])]
    assert [r.runs() for r in runs] == [(), ()]  # a run of contiguous tags does not split again
    assert coils.bit_offsets is not None and coils.bit_offsets.tolist() == [0, 1, 97]
    bit_runs = coils.runs()
    assert [(r.start, r.count, r.cols.tolist()) for r in bit_runs] == [(2, 2, [4, 5]), (99, 1, [6])]
    assert [r.bit_offsets.tolist() for r in bit_runs if r.bit_offsets is not None] == [[0, 1], [0]]
