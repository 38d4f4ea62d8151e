"""The MQTT input driver's pieces without a broker: the JSON path syntax, value types, the Sparkplug host rules,
staleness on a given clock, and config validation."""

from __future__ import annotations

from typing import Any

import pytest
from mqttin_peer import Collected, device_yaml
from sparkplug_wire import DataType, Metric, Payload, encode

from edge_agent.config import parse_config
from edge_agent.drivers import REGISTRY
from edge_agent.drivers.mqtt import jsonpath
from edge_agent.drivers.mqtt.config import SparkplugSource, ValueType
from edge_agent.drivers.mqtt.driver import MqttDriver, _typed
from edge_agent.drivers.mqtt.sparkplug import Malformed, NodeWatch
from edge_agent.errors import ConfigError
from edge_agent.sparkplug import parse_topic
from edge_agent.types import Quality

DOC = {"value": 1.5, "a": {"b": [10, 20, 30]}, "tags": [{"name": "x", "v": 1}, {"id": 7, "v": 2}], "k.e y": 3}


@pytest.mark.parametrize(
    ("path", "want"),
    [
        ("$", DOC),
        ("$.value", 1.5),
        ("$.a.b[2]", 30),
        ("$.tags[name=x].v", 1),
        ("$.tags[id=7].v", 2),
        ('$.tags[name="x"].v', 1),
        ('$["k.e y"]', 3),
    ],
)
def test_paths_find_values(path: str, want: Any) -> None:
    """Each step kind of the documented syntax."""
    assert jsonpath.extract(DOC, jsonpath.parse(path)) == want


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("$.a.b[3]", "step 3"),
        ("$.tags[name=z].v", "no element matches"),
        ("$.value.x", "no such key"),
        ("$.value[0]", "no list"),
    ],
)
def test_paths_that_lead_nowhere_say_which_step(path: str, why: str) -> None:
    with pytest.raises(LookupError, match=why):
        jsonpath.extract(DOC, jsonpath.parse(path))


@pytest.mark.parametrize("path", ["value", "$.", "$[x", "$..a", "$.a[", "$[1.5]"])
def test_bad_paths_are_refused(path: str) -> None:
    with pytest.raises(ValueError, match=r"path starts with|cannot read it"):
        jsonpath.parse(path)


@pytest.mark.parametrize(
    ("value", "kind", "want"),
    [
        (1, ValueType.FLOAT, 1.0),
        (1.5, ValueType.FLOAT, 1.5),
        (True, ValueType.FLOAT, None),  # a bool is not a number
        ("1.5", ValueType.FLOAT, None),
        (3.0, ValueType.INT, 3),
        (3.5, ValueType.INT, None),
        (False, ValueType.BOOL, False),
        (0, ValueType.BOOL, None),
        ("on", ValueType.STR, "on"),
        (1, ValueType.STR, None),
    ],
)
def test_value_types_are_checked(value: Any, kind: ValueType, want: Any) -> None:
    got = _typed(value, kind)
    assert got == want and type(got) is type(want)


SRC = SparkplugSource(group_id="g", edge_node_id="n", device_id="d")


def _msg(watch: NodeWatch, topic: str, payload: Payload) -> Any:
    parsed = parse_topic(topic)
    assert parsed is not None
    return watch.on_message(parsed, encode(payload))


def _births(watch: NodeWatch, bdseq: int = 1) -> None:
    _msg(
        watch,
        "spBv1.0/g/NBIRTH/n",
        Payload(seq=0, metrics=[Metric(name="bdSeq", datatype=DataType.UINT64, value=bdseq)]),
    )
    _msg(
        watch,
        "spBv1.0/g/DBIRTH/n/d",
        Payload(
            seq=1,
            metrics=[
                Metric(name="a", alias=1, datatype=DataType.INT8, value=-1),
                Metric(name="b", alias=2, datatype=DataType.DOUBLE, value=2.0),
            ],
        ),
    )


def test_aliases_from_the_birth_and_narrow_signed_values() -> None:
    """DDATA by alias takes the birth's name and type: an Int8 written as 255 (8-bit two's complement) is -1."""
    w = NodeWatch(SRC, ["a", "b"])
    _births(w)
    out = _msg(w, "spBv1.0/g/DDATA/n/d", Payload(seq=2, metrics=[Metric(alias=1, datatype=DataType.UINT8, value=255)]))
    assert out.values == {"a": 255}  # the metric's own datatype wins when it carries one
    out = _msg(w, "spBv1.0/g/DDATA/n/d", Payload(seq=3, metrics=[Metric(alias=1, value=-1, datatype=DataType.INT8)]))
    assert out.values == {"a": -1} and out.rebirth is None


def test_seq_wraps_and_gaps_are_reported() -> None:
    w = NodeWatch(SRC, ["b"])
    _births(w)
    for seq in [*range(2, 256), 0, 1]:
        out = _msg(w, "spBv1.0/g/DDATA/n/d", Payload(seq=seq, metrics=[Metric(alias=2, value=1.0)]))
        assert out.rebirth is None, seq
    out = _msg(w, "spBv1.0/g/DDATA/n/d", Payload(seq=5, metrics=[Metric(alias=2, value=1.0)]))
    assert out.rebirth is not None and "seq 5 where 2" in out.rebirth
    assert out.values == {"b": 1.0}  # the value itself is still the node's newest


def test_unknown_alias_and_data_before_birth_want_a_rebirth() -> None:
    w = NodeWatch(SRC, ["a"])
    out = _msg(w, "spBv1.0/g/DDATA/n/d", Payload(seq=9, metrics=[Metric(alias=1, value=1.0)]))
    assert out.values == {} and out.rebirth is not None and "NBIRTH" in out.rebirth
    _births(w)
    out = _msg(w, "spBv1.0/g/DDATA/n/d", Payload(seq=2, metrics=[Metric(alias=99, value=1.0)]))
    assert out.rebirth == "alias 99 that no birth this agent saw defined"


def test_deaths_and_their_bdseq() -> None:
    """NDEATH with another session's bdSeq is ignored; with the current one every tag dies; DDEATH likewise."""
    w = NodeWatch(SRC, ["a"])
    _births(w, bdseq=4)
    death = Payload(metrics=[Metric(name="bdSeq", datatype=DataType.UINT64, value=3)])
    out = _msg(w, "spBv1.0/g/NDEATH/n", death)
    assert not out.dead and out.note is not None and "bdSeq 3" in out.note
    death.metrics[0].value = 4
    assert _msg(w, "spBv1.0/g/NDEATH/n", death).dead
    _births(w, bdseq=5)
    assert _msg(w, "spBv1.0/g/DDEATH/n/d", Payload(seq=2)).dead
    # another device's death is not ours, but its seq counts
    assert not _msg(w, "spBv1.0/g/DDEATH/n/other", Payload(seq=3)).dead


def test_node_metrics_historical_and_commands() -> None:
    """Without device_id the tags are node metrics; historical metrics are skipped; NCMD changes nothing."""
    w = NodeWatch(SparkplugSource(group_id="g", edge_node_id="n"), ["t"])
    out = _msg(
        w, "spBv1.0/g/NBIRTH/n", Payload(seq=0, metrics=[Metric(name="t", alias=1, datatype=DataType.FLOAT, value=1.0)])
    )
    assert out.values == {"t": 1.0}
    out = _msg(
        w,
        "spBv1.0/g/NDATA/n",
        Payload(seq=1, metrics=[Metric(alias=1, value=0.5, datatype=DataType.FLOAT, is_historical=True)]),
    )
    assert out.values == {} and out.historical == 1
    assert _msg(w, "spBv1.0/g/NCMD/n", Payload(metrics=[Metric(name="t", value=9.0)])).values == {}
    with pytest.raises(Malformed):
        w.on_message(parse_topic("spBv1.0/g/NDATA/n"), b"\x0a\xff")  # type: ignore[arg-type]


def test_staleness_on_a_given_clock() -> None:
    """A tag not updated within its stale_after goes stale once; a death's comms-lost is not overwritten."""
    cfg = parse_config(
        device_yaml(
            "mqtt://127.0.0.1:1",
            "    stale_after: 2s\n    sparkplug: {group_id: g, edge_node_id: n}\n    tags:\n"
            "      - {name: a, topic: t/a}\n      - {name: b, topic: t/b, stale_after: 10s}\n"
            "      - {name: c, metric: C}\n",
        )
    )
    driver = REGISTRY["mqtt"].build(cfg.devices[0])
    assert isinstance(driver, MqttDriver)
    got = Collected()
    driver._sink = got  # as subscribe() sets it, without a broker
    driver._last[:] = 100.0
    driver._set(2, None, Quality.COMMS_LOST)
    driver._last[2] = 100.0
    driver._push(100.0)
    driver.mark_stale(101.0)
    assert got.quality("a") is None
    driver.mark_stale(102.5)
    assert got.quality("a") == Quality.STALE and got.quality("b") is None and got.quality("c") == Quality.COMMS_LOST
    n = len(got.batches)
    driver.mark_stale(103.0)
    assert len(got.batches) == n  # already stale: nothing new
    driver.mark_stale(111.0)
    assert got.quality("b") == Quality.STALE and driver.counters.stale == 2


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("    tags:\n      - {name: a}\n", "give either metric (Sparkplug) or topic (JSON)"),
        ("    tags:\n      - {name: a, topic: t, metric: m}\n", "give either metric"),
        ("    tags:\n      - {name: a, topic: 'plant/+/x'}\n", "without the wildcards"),
        ("    tags:\n      - {name: a, topic: t, path: value}\n", "a path starts with $"),
        ("    tags:\n      - {name: a, metric: m, type: int}\n", "applies to JSON tags"),
        ("    tags:\n      - {name: a, metric: m}\n", "set the device's sparkplug"),
        ("    tags:\n      - {name: a, topic: t}\n      - {name: b, topic: t}\n", "is already tags[0]"),
        ("    sparkplug: {group_id: 'a/b', edge_node_id: n}\n    tags:\n      - {name: a, metric: m}\n", "cannot hold"),
        ("    tls: {verify: none}\n    tags:\n      - {name: a, topic: t}\n", "the URL is mqtt://"),
        ("    stale_after: 1s\n    tags:\n      - {name: a, topic: t}\n", "would go stale between two updates"),
    ],
)
def test_config_errors_name_the_field(body: str, message: str) -> None:
    with pytest.raises(ConfigError, match="devices") as exc:
        parse_config(device_yaml("mqtt://127.0.0.1:1883", body))
    assert message in str(exc.value)
