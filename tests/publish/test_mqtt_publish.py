"""Publishing to a real mosquitto: topics, payloads validated against the shipped schemas, status and LWT, TLS, auth."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from helpers import Broker, Subscriber, block_until
from mqttpeer import (
    PREFIX,
    SHA,
    make_event,
    mqtt_config,
    publisher,
    running,
    write_password_file,
)

from edge_agent.config import OutboxSection, parse_config
from edge_agent.errors import ConfigError
from edge_agent.outbox import OutboxError, outbox_stats
from edge_agent.publish.client import tls_problems
from edge_agent.publish.tools import drain
from edge_agent.records import load_schema
from edge_agent.types import EventType, Quality, SampleBatch, Score, TelemetryTag


def validate(kind: str, doc: Any) -> None:
    """Raise if `doc` does not match the shipped schema `kind` (formats checked too)."""
    cls = jsonschema.Draft202012Validator
    cls(load_schema(kind), format_checker=cls.FORMAT_CHECKER).validate(doc)


def batch() -> SampleBatch:
    return SampleBatch(
        device="pump-1",
        ts=time.time(),
        tags=("pump1.pressure", "pump1.run", "pump1.model", "pump1.flow"),
        values=np.array([4.25, 1.0, np.nan, np.nan]),
        quality=np.array([Quality.GOOD, Quality.GOOD, Quality.GOOD, Quality.COMMS_LOST], dtype=np.uint8),
        exact={2: "P-200"},
        kinds=("float", "bool", "str", "float"),
    )


async def test_telemetry_merges_every_scan_group_and_subscription_of_a_device(broker: Broker, tmp_path: Path) -> None:
    """A device read in two groups (and changes pushed by subscription): each message holds all its tags."""
    sub = Subscriber(broker.port, f"{PREFIX}/telemetry/#")
    pub = publisher(mqtt_config(broker.url, telemetry_interval=0.2), tmp_path / "outbox.db")

    def group(tags: tuple[str, ...], values: list[float]) -> SampleBatch:
        q = np.zeros(len(tags), dtype=np.uint8)
        return SampleBatch("pump-1", time.time(), tags, np.array(values), q, kinds=("float",) * len(tags))

    async with running(pub):
        pub.outbox.put_telemetry(group(("fast.a", "fast.b"), [1.0, 2.0]))
        pub.outbox.put_telemetry(group(("slow.c",), [3.0]))  # same interval slot: merged, not sent on its own
        await asyncio.sleep(0.25)
        pub.outbox.put_telemetry(group(("fast.b",), [20.0]))  # a pushed change of one tag
        await asyncio.wait_for(pub.sink.wait_drained(), 10)
        await asyncio.to_thread(block_until, lambda: len(sub.on("/telemetry/")) == 2, 5)
    sub.close()
    first, second = ({t["name"]: t["value"] for t in m.json()["tags"]} for m in sub.on("/telemetry/"))
    assert first == {"fast.a": 1.0, "fast.b": 2.0}
    assert second == {"fast.a": 1.0, "fast.b": 20.0, "slow.c": 3.0}
    validate("telemetry", sub.on("/telemetry/")[1].json())


async def test_telemetry_by_exception_through_the_broker(broker: Broker, tmp_path: Path) -> None:
    """A device with deadbands: the first message has every tag with its unit, later ones only what moved past its
    deadband or changed quality; every message as a subscriber receives it matches the schema."""
    sub = Subscriber(broker.port, f"{PREFIX}/telemetry/#")
    pub = publisher(mqtt_config(broker.url, telemetry_interval=0.2), tmp_path / "outbox.db")
    tags = ("p", "t", "run")
    pub.outbox.set_device(
        "pump-1",
        [TelemetryTag("p", "bar", 0.5, True), TelemetryTag("t", "degC", 1.0), TelemetryTag("run")],
        integrity=3600,
    )

    def poll(values: list[float], quality: list[int]) -> SampleBatch:
        q = np.array(quality, dtype=np.uint8)
        return SampleBatch("pump-1", time.time(), tags, np.array(values), q, kinds=("float", "float", "bool"))

    polls = [
        ([float(np.float32(123.456)), 20.0, 1.0], [0, 0, 0]),  # first: everything
        ([123.6, 20.5, 1.0], [0, 0, 0]),  # within both deadbands: nothing
        ([124.0, 20.5, 1.0], [0, 0, 0]),  # p moved 0.544 from 123.456: p
        ([124.0, 20.5, 1.0], [0, 0, 4]),  # run lost: run
    ]
    async with running(pub):
        for values, quality in polls:
            pub.outbox.put_telemetry(poll(values, quality))
            await asyncio.sleep(0.25)  # the next telemetry_interval slot
        await asyncio.wait_for(pub.sink.wait_drained(), 10)
        await asyncio.to_thread(block_until, lambda: len(sub.on("/telemetry/")) == 3, 5)
    sub.close()
    docs = [m.json() for m in sub.on("/telemetry/")]
    for doc in docs:
        validate("telemetry", doc)
    assert [[t["name"] for t in d["tags"]] for d in docs] == [["p", "t", "run"], ["p"], ["run"]]
    assert docs[0]["tags"][0] == {**docs[0]["tags"][0], "unit": "bar", "value": 123.456}
    assert "unit" not in docs[0]["tags"][2] and docs[0]["tags"][2]["value"] is True
    assert docs[2]["tags"] == [{**docs[2]["tags"][0], "value": None, "quality": "comms-lost"}]


@pytest.mark.parametrize(("protocol", "session"), [("3.1.1", "clean"), ("5", "persistent")])
async def test_payloads_from_the_broker_match_the_schemas(
    broker: Broker, tmp_path: Path, protocol: str, session: str
) -> None:
    """Events, scores, telemetry and status as a subscriber receives them; retained offline after a clean stop."""
    sub = Subscriber(broker.port, f"{PREFIX}/#")
    mqtt = mqtt_config(
        broker.url, protocol=protocol, session=session, scores_interval=60, telemetry_interval=60, scores_qos=1
    )
    pub = publisher(mqtt, tmp_path / "outbox.db")
    start = make_event(EventType.START, seq=1, model="pump/skid+1")
    end = make_event(EventType.END, seq=2, model="pump/skid+1", anomaly_id=start.anomaly_id)
    async with running(pub):
        pub.outbox.put_event(start)
        pub.outbox.put_event(end)
        score = Score("pump/skid+1", time.time(), 0.42, 1.5, {"pump1.pressure": 0.8, "pump1.flow": 0.2}, 0.97)
        pub.outbox.put_score(score, version="1.0.0", sha256=SHA)
        pub.outbox.put_score(score)  # within scores_interval: not published
        pub.outbox.put_telemetry(batch())
        pub.outbox.put_telemetry(batch())  # within telemetry_interval: not published
        await asyncio.wait_for(pub.sink.wait_drained(), 10)
        await asyncio.to_thread(block_until, lambda: len(sub.on("/events/")) == 2 and sub.on("/telemetry/"), 5)
        assert pub.outbox.stats().outbox.open_anomalies == 0  # the end closed the start
    await asyncio.to_thread(block_until, lambda: any(b'"offline"' in m.payload for m in sub.on("/status")), 5)
    sub.close()

    events = sub.on("/events/")
    assert {m.topic for m in events} == {f"{PREFIX}/events/pump_skid_1"}  # one topic level, no wildcards
    docs = [m.json() for m in events]
    assert [d["event_id"] for d in docs] == [start.event_id, end.event_id]
    assert [d["type"] for d in docs] == ["anomaly.start", "anomaly.end"]
    assert not any(d["historical"] for d in docs)
    for d in docs:
        validate("event", d)
    (score_msg,) = sub.on("/scores/")
    assert score_msg.topic == f"{PREFIX}/scores/pump_skid_1"
    validate("score", score_msg.json())
    (tele,) = sub.on("/telemetry/")
    assert tele.topic == f"{PREFIX}/telemetry/pump-1"
    doc = tele.json()
    validate("telemetry", doc)
    assert [t["value"] for t in doc["tags"]] == [4.25, True, "P-200", None]
    statuses = [m.json() for m in sub.on("/status")]
    for s in statuses:
        validate("status", s)
    assert statuses[0]["state"] == "online" and statuses[-1] == {
        **statuses[-1],
        "state": "offline",
        "reason": "shutdown",
    }

    late = Subscriber(broker.port, f"{PREFIX}/status")  # retained: a subscriber arriving later still sees it
    await asyncio.to_thread(block_until, lambda: bool(late.messages), 5)
    late.close()
    assert late.messages[-1].retain and late.messages[-1].json()["state"] == "offline"


async def test_tls_client_certificate_and_password(
    tmp_path: Path, certs: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """mqtts with a CA file, a client certificate and a password; the password appears in no log and no repr."""
    secret = "s3cret-Pw-do-not-log"
    pwfile = tmp_path / "passwords"
    write_password_file(pwfile, {"edge": secret, "historian": "h1st"})
    broker = Broker(
        tmp_path / "broker",
        password_file=pwfile,
        tls=(certs["ca"], certs["server"], certs["server.key"]),
        require_certificate=True,
    )
    broker.start()
    try:
        ctx = ssl.create_default_context(cafile=str(certs["ca"]))
        ctx.load_cert_chain(str(certs["client"]), str(certs["client.key"]))
        sub = Subscriber(broker.port, f"{PREFIX}/events/#", tls=ctx, username="historian", password="h1st")
        caplog.set_level(logging.DEBUG)
        tls = {"ca": str(certs["ca"]), "cert": str(certs["client"]), "key": str(certs["client.key"])}
        mqtt = mqtt_config(broker.url, username="edge", password=secret, tls=tls, protocol="5")
        pub = publisher(mqtt, tmp_path / "outbox.db")
        async with running(pub):
            for i in range(1, 21):
                pub.outbox.put_event(make_event(EventType.START, seq=i))
            await asyncio.wait_for(pub.sink.wait_drained(), 10)
        await asyncio.to_thread(block_until, lambda: len(sub.event_ids()) == 20, 5)
        sub.close()
        assert secret not in caplog.text and secret not in repr(pub.sink) and secret not in repr(mqtt)
        assert secret not in str(mqtt.model_dump())
    finally:
        broker.kill()


async def test_historical_rule_by_age_and_by_restart(broker: Broker, tmp_path: Path) -> None:
    """Late by more than historical_after, or written by an earlier run: historical: true; otherwise false."""
    sub = Subscriber(broker.port, f"{PREFIX}/events/#")
    path = tmp_path / "outbox.db"
    first = publisher(mqtt_config("mqtt://127.0.0.1:1", historical_after=0.3), path)  # nothing listens: offline
    old = make_event(EventType.START, seq=1)
    async with running(first):
        first.outbox.put_event(old)
        await first.outbox.flush()
    again = publisher(mqtt_config(broker.url, historical_after=0.3), path)
    async with running(again):
        fresh = make_event(EventType.START, seq=2)
        again.outbox.put_event(fresh)
        await asyncio.wait_for(again.sink.wait_drained(), 10)
    await asyncio.to_thread(block_until, lambda: len(sub.event_ids()) == 2, 5)
    sub.close()
    got = {m.json()["event_id"]: m.json()["historical"] for m in sub.on("/events/")}
    assert got == {old.event_id: True, fresh.event_id: False}


async def test_cancelled_run_still_writes_and_says_offline(broker: Broker, tmp_path: Path) -> None:
    """Cancellation is shutdown: queued events reach the outbox and the retained status goes offline."""
    sub = Subscriber(broker.port, f"{PREFIX}/status")
    pub = publisher(mqtt_config(broker.url), tmp_path / "outbox.db")
    await pub.outbox.open()
    task = asyncio.create_task(pub.run())
    async with asyncio.timeout(5):
        while not pub.sink.connected:
            await asyncio.sleep(0.01)
    for i in range(1, 6):
        pub.outbox.put_event(make_event(EventType.START, seq=i))
    task.cancel()  # before the writer ran
    with pytest.raises(asyncio.CancelledError):
        await task
    assert outbox_stats(tmp_path / "outbox.db").last_seq == 5
    await asyncio.to_thread(block_until, lambda: sub.messages and sub.messages[-1].json()["state"] == "offline", 5)
    sub.close()


async def test_drain_sends_a_backlog_and_refuses_a_held_outbox(broker: Broker, tmp_path: Path) -> None:
    """`outbox drain`: everything in the file goes out; not while an agent holds the file."""
    path = tmp_path / "outbox.db"
    offline = publisher(mqtt_config("mqtt://127.0.0.1:1"), path)
    async with running(offline):
        for i in range(1, 51):
            offline.outbox.put_event(make_event(EventType.START, seq=i))
        await offline.outbox.flush()
        with pytest.raises(OutboxError, match="in use"):
            await drain(mqtt_config(broker.url), OutboxSection(path=path), agent_id="agent-1")
    sub = Subscriber(broker.port, f"{PREFIX}/events/#")
    result = await drain(mqtt_config(broker.url), OutboxSection(path=path), agent_id="agent-1", max_seconds=10)
    assert (result.sent, result.left, result.complete) == (50, 0, True)
    await asyncio.to_thread(block_until, lambda: len(sub.event_ids()) == 50, 5)
    sub.close()
    assert outbox_stats(path).total == 0


async def test_tls_verify_none_accepts_any_certificate(tmp_path: Path, certs: dict[str, Path]) -> None:
    """tls.verify: none (test benches) connects to a broker whose certificate would not verify."""
    broker = Broker(tmp_path / "broker", tls=(certs["ca"], certs["rogue"], certs["rogue.key"]))
    broker.start()
    try:
        pub = publisher(mqtt_config(broker.url, tls={"verify": "none"}), tmp_path / "o.db")
        async with running(pub):
            pub.outbox.put_event(make_event(EventType.START, seq=1))
            await asyncio.wait_for(pub.sink.wait_drained(), 5)
    finally:
        broker.kill()


async def test_mqtt5_rejection_is_dropped_and_counted_without_blocking_events(tmp_path: Path) -> None:
    """An ACL that refuses telemetry (PUBACK 0x87): those rows are dropped and counted; events keep flowing.

    (mosquitto 2.0 also closes the connection after a refused QoS 1 publish; the publisher reconnects.)
    """
    acl = f"topic readwrite {PREFIX}/events/#\ntopic readwrite {PREFIX}/status\n"
    broker = Broker(tmp_path / "broker", acl=acl)
    broker.start()
    try:
        sub = Subscriber(broker.port, f"{PREFIX}/events/#")  # what the ACL lets anonymous clients read
        mqtt = mqtt_config(broker.url, protocol="5", telemetry_interval=0.001, telemetry_qos=1)
        pub = publisher(mqtt, tmp_path / "o.db")
        async with running(pub):
            for i in range(1, 4):
                pub.outbox.put_telemetry(batch())
                pub.outbox.put_event(make_event(EventType.START, seq=i))
                await asyncio.sleep(0.005)
            await asyncio.wait_for(pub.sink.wait_drained(), 10)
            assert pub.outbox.stats().outbox.dropped["rejected.telemetry"] == 3 and pub.sink.stats().rejected == 3
        await asyncio.to_thread(block_until, lambda: len(set(sub.event_ids())) == 3, 5)
        sub.close()
    finally:
        broker.kill()


def test_schemas_are_valid_json_schema() -> None:
    """The shipped schemas are themselves valid draft 2020-12 documents."""
    for kind in ("event", "status", "score", "telemetry"):
        jsonschema.Draft202012Validator.check_schema(load_schema(kind))
        assert json.dumps(load_schema(kind))


BASE = "devices: [{name: plc, type: modbus, host: 127.0.0.1, tags: [{name: t, address: '40001'}]}]\n"


@pytest.mark.parametrize(
    ("mqtt", "message"),
    [
        ("{topic_prefix: 'plant/+/x'}", "wildcards"),
        ("{topic_prefix: '/plant'}", "without empty ones"),
        ("{topic_prefix: '$SYS/x'}", "reserved"),
        ("{url: 'mqtt://h:1883', tls: {ca: /x}}", "write mqtts://"),
        ("{url: 'mqtts://h:8883', tls: {key: /k}}", "key is set without cert"),
        ("{reconnect_initial: 10s, reconnect_max: 1s}", "reconnect_initial is longer"),
        ("{protocol: 4}", "is not allowed"),
    ],
)
def test_mqtt_config_errors(mqtt: str, message: str) -> None:
    """Bad MQTT settings fail at load time with a message that says what would be right."""
    with pytest.raises(ConfigError) as err:
        parse_config(BASE + f"mqtt: {mqtt}\n", environ={})
    assert message in str(err.value)


def test_mqtt_config_defaults_and_yaml_numbers(tmp_path: Path, certs: dict[str, Path]) -> None:
    """`protocol: 5` as YAML writes it; defaults as documented; TLS files checked without the network."""
    cfg = parse_config(BASE + "mqtt: {protocol: 5, url: 'mqtts://h:8883'}\noutbox: {sync: batched}\n", environ={})
    assert cfg.mqtt is not None and cfg.mqtt.protocol == "5" and cfg.mqtt.window == 256
    assert cfg.outbox.sync == "batched" and cfg.outbox.commit_interval == 0.2
    assert tls_problems(cfg.mqtt) == []
    bad = mqtt_config("mqtts://h:8883", tls={"ca": str(tmp_path / "missing.pem")})
    assert [field for field, _ in tls_problems(bad)] == ["mqtt.tls.ca"]
    wrong_key = mqtt_config(
        "mqtts://h:8883", tls={"ca": str(certs["ca"]), "cert": str(certs["client"]), "key": str(certs["server.key"])}
    )
    assert [field for field, _ in tls_problems(wrong_key)] == ["mqtt.tls.cert"]
