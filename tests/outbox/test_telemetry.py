"""Telemetry records: report by exception (deadbands, integrity interval, quality changes), units, float32
printing, and the fast text builder against a plain dict-per-tag reference (schema-valid, same JSON)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.config import MqttSection, OutboxSection, parse_config
from edge_agent.drivers.codecs import shortest_float32
from edge_agent.outbox.rows import Kind
from edge_agent.outbox.telemetry import DeviceTelemetry
from edge_agent.outbox.writer import OutboxWriter
from edge_agent.records import iso, load_schema
from edge_agent.types import Quality, SampleBatch, TelemetryTag

T0 = 1_790_000_000.0
G, U, B, C = Quality.GOOD, Quality.UNCERTAIN, Quality.BAD, Quality.COMMS_LOST


def validate(doc: Any) -> None:
    """Raise unless `doc` matches the shipped telemetry schema (formats checked too)."""
    cls = jsonschema.Draft202012Validator
    cls(load_schema("telemetry"), format_checker=cls.FORMAT_CHECKER).validate(doc)


def floats(
    tags: Sequence[str], values: Sequence[float], ts: float, quality: Sequence[int] | None = None
) -> SampleBatch:
    q = np.array(quality if quality is not None else [G] * len(tags), dtype=np.uint8)
    return SampleBatch("plc", ts, tuple(tags), np.array(values, dtype=float), q, kinds=("float",) * len(tags))


def sent(state: DeviceTelemetry, now: float) -> dict[str, Any]:
    """name → value of the tags the next message carries ({} when there is none)."""
    record = state.message(agent="a", site="s", ts=now, now=now)
    if record is None:
        return {}
    doc = json.loads(record)
    validate(doc)
    return {t["name"]: t["value"] for t in doc["tags"]}


def test_absolute_deadband_measures_from_the_last_reported_value() -> None:
    """Changes within the deadband wait; drift that adds up past it since the last report is sent."""
    state = DeviceTelemetry("plc", [TelemetryTag("p", deadband=0.5), TelemetryTag("q")], integrity=3600)
    state.add(floats(["p", "q"], [10.0, 1.0], T0))
    assert sent(state, T0) == {"p": 10.0, "q": 1.0}  # the first value is always reported
    state.add(floats(["p", "q"], [10.3, 1.0], T0 + 1))
    assert sent(state, T0 + 1) == {}  # p moved 0.3 (within 0.5), q did not move
    state.add(floats(["p", "q"], [10.5, 1.0], T0 + 2))
    assert sent(state, T0 + 2) == {}  # 0.5 is not past the deadband
    state.add(floats(["p", "q"], [10.6, 1.000001], T0 + 3))
    assert sent(state, T0 + 3) == {"p": 10.6, "q": 1.000001}  # p 0.6 from 10.0; q has no deadband: any change
    state.add(floats(["p", "q"], [10.2, 1.000001], T0 + 4))
    assert sent(state, T0 + 4) == {}  # 0.4 below the new reference 10.6


def test_percent_deadband_comes_from_the_range_or_the_scaling() -> None:
    """`2%` of range [0, 50] is 1.0; `1%` of a uint16 scaled by 0.1 is 65.535; units and float32 go along."""
    text = """
devices:
  - name: plc
    type: modbus
    host: 127.0.0.1
    tags:
      - {name: level, address: "40001", type: float32, unit: m, range: [0, 50], deadband: "2%"}
      - {name: raw, address: "40003", type: uint16, scale: 0.1, deadband: "1%"}
      - {name: temp, address: "40004", type: int16, unit: degC}
"""
    (dev,) = parse_config(text).devices
    tags = dev.telemetry_tags()
    assert [(t.name, t.unit, t.float32) for t in tags] == [
        ("level", "m", True),
        ("raw", None, False),
        ("temp", "degC", False),
    ]
    assert [t.deadband for t in tags] == pytest.approx([1.0, 65.535, 0.0])
    assert dev.report_integrity() == 60.0  # by exception (a tag has a deadband), re-sent every 60 s by default


def test_a_device_without_deadbands_or_integrity_sends_every_tag_every_time() -> None:
    """No deadband, no integrity_interval: telemetry as before, every tag in every message."""
    text = (
        "devices:\n  - {name: plc, type: modbus, host: 127.0.0.1, tags: [{name: a, address: '40001'}]}\n"
        "  - {name: plc2, type: modbus, host: 127.0.0.1, integrity_interval: 5m, tags: [{name: b, address: '40001'}]}\n"
    )
    first, second = parse_config(text).devices
    assert first.report_integrity() is None and second.report_integrity() == 300.0
    state = DeviceTelemetry("plc", first.telemetry_tags(), integrity=first.report_integrity())
    state.add(floats(["a"], [7.0], T0))
    assert sent(state, T0) == {"a": 7.0}
    assert sent(state, T0 + 1) == {"a": 7.0}


def test_integrity_interval_resends_quiet_tags() -> None:
    """A tag that never changes is reported again once integrity_interval has passed since its last report."""
    state = DeviceTelemetry("plc", [TelemetryTag("quiet"), TelemetryTag("busy")], integrity=10)
    seen: list[tuple[float, set[str]]] = []
    for k in range(25):  # virtual time: one sample a second, the clock handed in
        now = T0 + k
        state.add(floats(["quiet", "busy"], [5.0, float(k)], now))
        seen.append((now - T0, set(sent(state, now))))
    quiet_at = [t for t, names in seen if "quiet" in names]
    assert quiet_at == [0, 10, 20]
    assert all("busy" in names for _, names in seen)


@pytest.mark.parametrize("new_quality", [U, B, C])
def test_quality_changes_are_always_reported(new_quality: Quality) -> None:
    """Same value, other quality: sent (with null when not good), and sent again when it comes back good."""
    state = DeviceTelemetry("plc", [TelemetryTag("p", deadband=100.0)], integrity=3600)
    state.add(floats(["p"], [1.0], T0))
    assert sent(state, T0) == {"p": 1.0}
    value = 1.0 if new_quality is U else math.nan
    state.add(floats(["p"], [value], T0 + 1, [new_quality]))
    record = state.message(agent="a", site="s", ts=T0 + 1, now=T0 + 1)
    assert record is not None
    (tag,) = json.loads(record)["tags"]
    assert tag["quality"] == new_quality.label and tag["value"] is None
    assert sent(state, T0 + 2) == {}
    state.add(floats(["p"], [1.0], T0 + 3))
    assert sent(state, T0 + 3) == {"p": 1.0}


def test_unit_and_float32_printed_as_written() -> None:
    """A float32 tag prints 123.456, not its float64 widening 123.45600128173828; units are in the record."""
    state = DeviceTelemetry(
        "plc", [TelemetryTag("a", unit="bar", float32=True), TelemetryTag("b", unit="°C")], integrity=None
    )
    widened = float(np.float32(123.456))
    assert widened != 123.456
    state.add(floats(["a", "b"], [widened, widened], T0))
    record = state.message(agent="a", site="s", ts=T0, now=T0)
    assert record is not None
    text = record.decode()
    assert '{"name":"a","unit":"bar","value":123.456,"quality":"good"' in text
    assert f'"value":{widened!r}' in text and '"unit":"°C"' in text
    validate(json.loads(record))


def test_non_finite_strings_bools_and_ints() -> None:
    """NaN and inf print null; strings, bools, 64-bit integers and ints as their JSON."""
    big = 2**63 - 1
    batch = SampleBatch(
        "plc",
        T0,
        ("nan", "inf", "s", "flag", "n", "big"),
        np.array([math.nan, math.inf, math.nan, 1.0, -42.0, float(big)]),
        np.zeros(6, dtype=np.uint8),
        exact={2: 'say "hi" ✓', 5: big},
        kinds=("float", "float", "str", "bool", "int", "int"),
    )
    state = DeviceTelemetry("plc")
    state.add(batch)
    assert sent(state, T0) == {"nan": None, "inf": None, "s": 'say "hi" ✓', "flag": True, "n": -42, "big": big}


def test_a_batch_with_nothing_to_report_does_not_use_the_interval(tmp_path: Path) -> None:
    """By exception: a batch without changes sends nothing and leaves the slot free for a change later in it."""
    clock = [T0]
    mqtt = MqttSection.model_validate({"url": "mqtt://127.0.0.1:1883", "telemetry_interval": 10})
    writer = OutboxWriter(OutboxSection(path=tmp_path / "o.db"), mqtt, agent_id="a", clock=lambda: clock[0])
    writer.set_device("plc", [TelemetryTag("p", deadband=1.0)], integrity=3600)

    def tags_sent() -> list[list[str]]:
        return [
            [t["name"] for t in json.loads(e.payload)["tags"]]
            for e in writer.memory.drain()
            if e.kind is Kind.TELEMETRY
        ]

    writer.put_telemetry(floats(["p"], [0.0], T0))
    assert tags_sent() == [["p"]]
    clock[0] = T0 + 10
    writer.put_telemetry(floats(["p"], [0.5], clock[0]))  # within the deadband: nothing, the slot stays free
    clock[0] = T0 + 12
    writer.put_telemetry(floats(["p"], [1.5], clock[0]))  # same slot, a change: sent now
    writer.put_telemetry(floats(["p"], [9.0], clock[0]))  # same slot, already used: waits for the next one
    assert tags_sent() == [["p"]]
    clock[0] = T0 + 20
    writer.put_telemetry(floats(["p"], [9.0], clock[0]))
    assert tags_sent() == [["p"]]


# ---------------------------------------------------------------- the fast builder against a plain reference


def reference(
    latest: Mapping[str, tuple[SampleBatch, int]], units: Mapping[str, str], f32: set[str], ts: float
) -> dict[str, Any]:
    """The record the simple way: one dict per tag from SampleBatch.value_at (what telemetry was before)."""
    tags = []
    for name, (batch, i) in latest.items():
        v = batch.value_at(i)
        if isinstance(v, float):
            with np.errstate(over="ignore"):  # float32 beyond its range: printed as float64
                short = name in f32 and math.isfinite(shortest_float32(v))
            v = None if not math.isfinite(v) else shortest_float32(v) if short else v
        entry: dict[str, Any] = {"name": name}
        if name in units:
            entry["unit"] = units[name]
        t = batch.ts if batch.times is None else float(batch.times[i])
        entry.update(value=v, quality=Quality(int(batch.quality[i])).label, ts=iso(t))
        tags.append(entry)
    return {
        "schema": "edge-agent/telemetry/v1",
        "agent": "a",
        "site": "s",
        "device": "plc",
        "ts": iso(ts),
        "tags": tags,
        "historical": False,
    }


NAMES = [f"t{i}" for i in range(8)]
finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False).map(float)
cell = st.one_of(
    st.tuples(st.just("float"), st.one_of(finite32, st.sampled_from([math.nan, math.inf, -math.inf, -0.0]))),
    st.tuples(st.just("float"), st.floats(allow_nan=False, allow_infinity=False)),
    st.tuples(st.just("int"), st.integers(-(2**53), 2**53).map(float)),
    st.tuples(st.just("bool"), st.sampled_from([0.0, 1.0])),
    st.tuples(st.just("str"), st.text(max_size=6)),
    st.tuples(st.just("bigint"), st.integers(2**53 + 1, 2**64 - 1)),
)


@st.composite
def batches(draw: st.DrawFn) -> SampleBatch:
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=len(NAMES), unique=True))
    cells = [draw(cell) for _ in names]
    quality = [draw(st.sampled_from(list(Quality))) for _ in names]
    ts = draw(st.floats(1e9, 4e9))
    times = draw(st.one_of(st.none(), st.lists(st.floats(1e9, 4e9), min_size=len(names), max_size=len(names))))
    values, exact, kinds = [], {}, []
    for i, (kind, v) in enumerate(cells):
        if kind in ("str", "bigint"):
            exact[i] = v
            values.append(math.nan if kind == "str" else float(v))
            kinds.append("str" if kind == "str" else "int")
        else:
            values.append(v)
            kinds.append(kind)
    return SampleBatch(
        "plc",
        ts,
        tuple(names),
        np.array(values, dtype=float),
        np.array(quality, dtype=np.uint8),
        exact=exact,
        kinds=tuple(kinds),
        times=None if times is None else np.array(times),
    )


@settings(max_examples=60)
@given(
    st.lists(batches(), min_size=1, max_size=4),
    st.dictionaries(st.sampled_from(NAMES), st.text(min_size=1, max_size=4), max_size=4),
    st.sets(st.sampled_from(NAMES)),
)
def test_fast_record_equals_the_reference(seq: list[SampleBatch], units: dict[str, str], f32: set[str]) -> None:
    """Batches merged into the device's state: the joined text parses to the reference record, schema-valid."""
    infos = [TelemetryTag(n, units.get(n), 0.0, n in f32) for n in NAMES]
    state = DeviceTelemetry("plc", infos)
    latest: dict[str, tuple[SampleBatch, int]] = {}
    for batch in seq:
        state.add(batch)
        latest.update((t, (batch, i)) for i, t in enumerate(batch.tags))
        record = state.message(agent="a", site="s", ts=batch.ts, now=batch.ts)
        assert record is not None
        doc = json.loads(record)
        want = reference(latest, units, f32, batch.ts)
        assert sorted(doc["tags"], key=lambda t: t["name"]) == sorted(want["tags"], key=lambda t: t["name"])
        assert {**doc, "tags": None} == {**want, "tags": None}
        validate(doc)


@settings(max_examples=60)
@given(st.lists(st.tuples(batches(), st.floats(0, 30)), min_size=1, max_size=6), st.floats(0, 2))
def test_by_exception_sends_exactly_what_changed_or_is_due(steps: list[tuple[SampleBatch, float]], db: float) -> None:
    """Each message holds the tags never sent, whose quality changed, that moved past the deadband or whose
    integrity interval passed: checked against the rule written tag by tag."""
    state = DeviceTelemetry("plc", [TelemetryTag(n, deadband=db) for n in NAMES], integrity=20)
    last: dict[str, tuple[Any, int, float]] = {}  # name → (value sent, quality sent, when)
    current: dict[str, tuple[Any, int]] = {}
    now = T0
    for batch, dt in steps:
        now += dt
        state.add(batch)
        for i, t in enumerate(batch.tags):
            v: Any = batch.exact.get(i, float(batch.values[i]))
            current[t] = (v, int(batch.quality[i]))
        want = set()
        for t, (v, q) in current.items():
            if t not in last:
                want.add(t)
                continue
            v0, q0, at = last[t]
            if isinstance(v, float) and isinstance(v0, float):
                moved = not (abs(v - v0) <= db or v == v0 or (math.isnan(v) and math.isnan(v0)))
            else:
                moved = v != v0
            if moved or q != q0 or now - at >= 20:
                want.add(t)
        record = state.message(agent="a", site="s", ts=now, now=now)
        got = set() if record is None else {t["name"] for t in json.loads(record)["tags"]}
        assert got == want
        last.update((t, (*current[t], now)) for t in got)


def test_deadband_forms_for_s7_and_opcua() -> None:
    """S7: an INT's percent is of its scaled full scale; OPC UA: the shorthand is the same deadband the server gets,
    and a subscription may keep a percent without range (the server's EURange)."""
    text = """
devices:
  - name: plc
    type: s7
    host: 127.0.0.1
    tags:
      - {name: t, address: DB1.DBW0, type: int, scale: 0.01, deadband: "10%"}
      - {name: r, address: DB1.DBD2, type: real, unit: bar}
  - name: ua
    type: opcua
    endpoint: opc.tcp://127.0.0.1:4840
    mode: subscribe
    tags:
      - {name: a, node: "ns=2;s=A", deadband: 0.25}
      - {name: b, node: "ns=2;s=B", deadband: {type: percent, value: 2}}
"""
    s7, ua = parse_config(text).devices
    assert [(t.deadband, t.float32, t.unit) for t in s7.telemetry_tags()] == [
        (pytest.approx(65.535), False, None),
        (0.0, True, "bar"),
    ]
    a, b = ua.tags
    assert a.deadband is not None and b.deadband is not None
    assert (a.deadband.type.value, a.deadband.value) == ("absolute", 0.25)
    assert b.deadband.type.value == "percent" and b.deadband_value() == 0.0  # the server filters; the agent: any change
    assert ua.report_integrity() == 60.0
