"""Fault tests against a real mosquitto: broker killed, agent killed (SIGKILL), network cut, bad credentials,
a certificate that does not verify, the outbox full during a long outage. Each asserts nothing was lost."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import Broker, Subscriber, block_until, wait_for
from mqttpeer import (
    PREFIX,
    BlackholeProxy,
    Publishing,
    check_delivery,
    make_event,
    mqtt_config,
    publisher,
    running,
    write_password_file,
)

from edge_agent.publish.mqtt import WIRE_INFLIGHT
from edge_agent.types import AnomalyEvent, EventType

DRIVER = Path(__file__).parent / "driver.py"
TESTS = Path(__file__).resolve().parents[1]


async def produce(pub: Publishing, out: list[AnomalyEvent], n: int, every: float, models: tuple[str, ...]) -> None:
    """n rounds of one anomaly.start per model, `every` seconds apart."""
    for _ in range(n):
        for model in models:
            e = make_event(EventType.START, seq=len(out) + 1, model=model)
            pub.outbox.put_event(e)
            out.append(e)
        await asyncio.sleep(every)


async def test_broker_killed_while_events_flow(broker: Broker, tmp_path: Path) -> None:
    """Broker SIGKILLed mid-stream, down for a while, back: all events, once each after dedup, in order per topic."""
    sub = Subscriber(broker.port, f"{PREFIX}/events/#", client_id="historian")
    await asyncio.to_thread(broker.save)  # the historian's session survives the SIGKILL
    pub = publisher(mqtt_config(broker.url, historical_after=0.5), tmp_path / "outbox.db")
    events: list[AnomalyEvent] = []
    models = ("pump", "fan", "valve")
    async with running(pub):
        await produce(pub, events, 40, 0.005, models)
        broker.kill()
        await produce(pub, events, 100, 0.005, models)
        await asyncio.sleep(0.5)  # down a while
        assert not pub.sink.connected and pub.outbox.depth > 0
        await asyncio.to_thread(broker.start)
        await produce(pub, events, 40, 0.005, models)
        await asyncio.wait_for(pub.sink.wait_drained(), 20)
    expected = [e.event_id for e in events]
    await asyncio.to_thread(block_until, lambda: set(sub.event_ids()) >= set(expected), 10, "every event")
    sub.close()
    got = check_delivery(sub.on("/events/"), expected, max_duplicates=WIRE_INFLIGHT)
    assert any(d["historical"] for d in got.values()), "events that waited out the outage are historical"
    assert not got[expected[0]]["historical"] and not got[expected[-1]]["historical"]


def _spawn(url: str, outbox: Path, *args: str) -> subprocess.Popen[str]:
    # driver.py imports mqttpeer beside it (the script's folder) and helpers from tests/
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.Popen(
        [sys.executable, str(DRIVER), url, str(outbox), PREFIX, *args],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
    )


def _read_until(proc: subprocess.Popen[str], key: str, lines: list[dict[str, Any]], timeout: float = 20) -> None:
    """Collect the driver's JSON lines until one has `key` (bounded by the driver's own pace and a deadline)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"driver exited with {proc.wait(5)} before {key}")
        doc = json.loads(line)
        lines.append(doc)
        if key in doc:
            return
    raise AssertionError(f"driver did not report {key}")


def test_agent_killed_during_outage_and_restarted(broker: Broker, tmp_path: Path) -> None:
    """SIGKILL of the publishing process mid-outage: after restart nothing is lost and the open anomaly is closed."""
    sub = Subscriber(broker.port, f"{PREFIX}/#", client_id="historian")
    broker.save()
    outbox = tmp_path / "outbox.db"
    first: list[dict[str, Any]] = []
    agent = _spawn(broker.url, outbox, "--pairs", "30", "--every", "0.01", "--leave-open")
    try:
        for _ in range(10):  # a few pairs while the broker is up
            _read_until(agent, "committed", first)
        broker.kill()
        _read_until(agent, "idle", first)  # the rest, during the outage, ending with an anomaly left open
        agent.send_signal(signal.SIGKILL)
        agent.wait(5)
    finally:
        agent.kill()
    committed = [d["committed"] for d in first if "committed" in d]
    assert committed[-1]["type"] == "anomaly.start"

    second: list[dict[str, Any]] = []
    agent = _spawn(broker.url, outbox)  # restarted while the broker is still down
    try:
        _read_until(agent, "idle", second)
        broker.start()
        _read_until(agent, "drained", second)
        ends = [d["restart_end"] for d in second if "restart_end" in d]
        assert [e["anomaly_id"] for e in ends] == [committed[-1]["anomaly_id"]]
        assert ends[0]["seq"] > committed[-1]["seq"]  # the sequence continues across the restart
        expected = [c["event_id"] for c in committed] + [ends[0]["event_id"]]
        block_until(lambda: set(sub.event_ids()) >= set(expected), 10, "every committed event")
        got = check_delivery(sub.on("/events/"), expected, max_duplicates=WIRE_INFLIGHT)
        assert got[ends[0]["event_id"]]["reason"] == "agent_restart"
        starts = {d["anomaly_id"] for d in got.values() if d["type"] == "anomaly.start"}
        finished = {d["anomaly_id"] for d in got.values() if d["type"] == "anomaly.end"}
        assert starts == finished, "every anomaly.start has its anomaly.end"
        assert all(got[c["event_id"]]["historical"] for c in committed[10:]), "written by the run that died"

        agent.send_signal(signal.SIGKILL)  # killed while connected: the broker publishes the last will
        agent.wait(5)
        block_until(lambda: sub.on("/status") and sub.on("/status")[-1].json()["state"] == "offline", 5, "the LWT")
        assert sub.on("/status")[-1].json()["reason"] == "connection_lost"
    finally:
        agent.kill()
        sub.close()


async def test_network_cut_without_closing_the_socket(
    broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A blackholed link is noticed by the keepalive (TCP alone would take minutes); events wait in the outbox and
    all arrive once it is back."""
    keepalive = 1.0
    proxy = BlackholeProxy(broker.port)
    sub = Subscriber(broker.port, f"{PREFIX}/events/#")
    pub = publisher(mqtt_config(f"mqtt://127.0.0.1:{proxy.port}", keepalive=keepalive), tmp_path / "outbox.db")
    events: list[AnomalyEvent] = []
    try:
        async with running(pub):
            await produce(pub, events, 20, 0.005, ("pump",))
            await asyncio.wait_for(pub.sink.wait_drained(), 10)
            proxy.blackhole()
            await produce(pub, events, 100, 0.005, ("pump",))
            await wait_for(lambda: not pub.sink.connected, timeout=30, what="the cut to be noticed")
            lost = [r.getMessage() for r in caplog.records if "lost (" in r.getMessage()]
            assert lost and "lost (Keep alive timeout)" in lost[0], lost  # noticed by the keepalive, not by TCP
            assert pub.outbox.depth >= 100  # every row stays in the outbox until its PUBACK
            proxy.restore()
            await asyncio.wait_for(pub.sink.wait_drained(), 15)
        expected = [e.event_id for e in events]
        await asyncio.to_thread(block_until, lambda: set(sub.event_ids()) >= set(expected), 10, "every event")
        check_delivery(sub.on("/events/"), expected, max_duplicates=WIRE_INFLIGHT)
    finally:
        sub.close()
        proxy.close()


async def refused_while_producing(pub: Publishing, events: list[AnomalyEvent], caplog: pytest.LogCaptureFixture) -> str:
    """Produce 20 events while the broker refuses the agent; after 4 failed attempts, the one ERROR logged."""
    await produce(pub, events, 20, 0, ("pump",))
    async with asyncio.timeout(10):
        while pub.sink.stats().connect_failures < 4:
            await asyncio.sleep(0.02)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors  # retries log at a lower level: one clear error per outage
    return errors[0]


async def test_refused_credentials_then_fixed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Bad password: one clear error, retries with backoff, nothing lost once the broker accepts it."""
    pwfile = tmp_path / "passwords"
    write_password_file(pwfile, {"edge": "the-right-one", "historian": "h"})
    broker = Broker(tmp_path / "broker", password_file=pwfile)
    broker.start()
    caplog.set_level(logging.INFO, logger="edge_agent")
    try:
        sub = Subscriber(broker.port, f"{PREFIX}/events/#", username="historian", password="h")
        pub = publisher(mqtt_config(broker.url, username="edge", password="what-the-agent-has"), tmp_path / "o.db")
        events: list[AnomalyEvent] = []
        async with running(pub):
            error = await refused_while_producing(pub, events, caplog)
            assert "refused the connection" in error and "check mqtt.username" in error
            assert sub.event_ids() == []
            write_password_file(pwfile, {"edge": "what-the-agent-has", "historian": "h"})
            broker.reload()
            await asyncio.wait_for(pub.sink.wait_drained(), 10)
        expected = [e.event_id for e in events]
        await asyncio.to_thread(block_until, lambda: set(sub.event_ids()) >= set(expected), 5, "every event")
        check_delivery(sub.on("/events/"), expected, max_duplicates=0)
        assert "what-the-agent-has" not in caplog.text
        sub.close()
    finally:
        broker.kill()


@pytest.mark.parametrize("bad", ["wrongname", "rogue"])
async def test_certificate_that_does_not_verify_then_fixed(
    tmp_path: Path, certs: dict[str, Path], bad: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker certificate for another name, or from an unknown CA: one clear error, retries, nothing lost."""
    broker = Broker(tmp_path / "broker", tls=(certs["ca"], certs[bad], certs[f"{bad}.key"]))
    broker.start()
    caplog.set_level(logging.INFO, logger="edge_agent")
    lenient = ssl.create_default_context()
    lenient.check_hostname, lenient.verify_mode = False, ssl.CERT_NONE
    sub = Subscriber(broker.port, f"{PREFIX}/events/#", client_id="historian", tls=lenient)
    broker.save()
    try:
        pub = publisher(mqtt_config(broker.url, tls={"ca": str(certs["ca"])}), tmp_path / "o.db")
        events: list[AnomalyEvent] = []
        async with running(pub):
            error = await refused_while_producing(pub, events, caplog)
            assert "TLS certificate does not verify" in error
            assert ("mismatch" if bad == "wrongname" else "unable to get local issuer") in error
            broker.stop()  # the operator installs the right certificate
            broker.tls = (certs["ca"], certs["server"], certs["server.key"])
            await asyncio.to_thread(broker.start)
            await asyncio.wait_for(pub.sink.wait_drained(), 10)
        expected = [e.event_id for e in events]
        await asyncio.to_thread(block_until, lambda: set(sub.event_ids()) >= set(expected), 5, "every event")
        check_delivery(sub.on("/events/"), expected, max_duplicates=0)
    finally:
        sub.close()
        broker.kill()


@pytest.fixture
def rss() -> Iterator[psutil.Process]:
    yield psutil.Process()


async def test_outbox_full_during_long_outage(broker: Broker, tmp_path: Path, rss: psutil.Process) -> None:
    """100k events into a 1 MiB outbox, broker down: oldest dropped and counted, RSS flat, the rest delivered."""
    sub = Subscriber(broker.port, f"{PREFIX}/#", client_id="historian")
    await asyncio.to_thread(broker.save)
    pub = publisher(mqtt_config(broker.url), tmp_path / "outbox.db", outbox={"max_bytes": "1MiB"})
    total, chunk = 100_000, 1000
    tail: list[str] = []
    async with running(pub):
        async with asyncio.timeout(5):
            while not pub.sink.connected:
                await asyncio.sleep(0.01)
        broker.kill()
        start_rss = 0
        for i in range(total // chunk):
            for k in range(chunk):
                seq = i * chunk + k + 1
                e = make_event(EventType.START, seq=seq)
                pub.outbox.put_event(e)
                tail.append(e.event_id)
            del tail[:-3000]  # keep the newest ids only: the test itself must not grow either
            await pub.outbox.flush()
            if i == 4:
                start_rss = rss.memory_info().rss
        end_rss = rss.memory_info().rss
        depth = pub.outbox.depth
        assert pub.outbox.stats().outbox.bytes <= 1024**2 and 0 < depth < 3000
        assert pub.outbox.stats().outbox.dropped["full.event"] == total - depth
        grown = (end_rss - start_rss) / 1024**2
        assert grown < 10, f"RSS grew {grown:.1f} MiB during the outage"
        await asyncio.to_thread(broker.start)
        await asyncio.wait_for(pub.sink.wait_drained(), 20)
        await asyncio.sleep(1.2)  # one status refresh
    expected = tail[-depth:]
    await asyncio.to_thread(block_until, lambda: len(set(sub.event_ids())) >= depth, 10, "the kept events")
    got = check_delivery(sub.on("/events/"), expected, max_duplicates=0)
    assert list(got) == expected  # the newest ones, in order
    online = [m.json() for m in sub.on("/status") if m.json()["state"] == "online"]
    assert online[-1]["outbox"]["dropped"]["event"] == total - depth
    assert online[-1]["outbox"]["dropped_by_reason"]["full"] == total - depth
    sub.close()
