"""A full disk under the outbox (a real 2 MiB tmpfs) with a real mosquitto: delivery goes on from memory, acked
rows are still deleted, what cannot be kept is dropped and counted, and writing resumes when space returns."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

import pytest
from diskfaults import fill, free_bytes, small_fs
from helpers import Broker, ModbusPeer, Subscriber
from helpers import block_until as wait_until
from mqttpeer import PREFIX, Publishing, make_event, mqtt_config, publisher, running

from edge_agent.observe import outbox_metrics
from edge_agent.outbox import outbox_stats
from edge_agent.types import AnomalyEvent, EventType


def distinct_in_order(sub: Subscriber) -> list[str]:
    """Event ids as first received, duplicates left out; asserts per-topic order by seq."""
    seen: dict[str, int] = {}
    for m in sub.on("/events/"):
        doc = m.json()
        seen.setdefault(doc["event_id"], doc["seq"])
    seqs = list(seen.values())
    assert seqs == sorted(seqs), "events out of order"
    return list(seen)


async def produce(pub: Publishing, out: list[AnomalyEvent], n: int, *, burst: int = 50) -> None:
    """n events, `burst` at a time, yielding to the loop in between (never flush: the disk may be full)."""
    for i in range(n):
        e = make_event(EventType.START, seq=len(out) + 1)
        pub.outbox.put_event(e)
        out.append(e)
        if i % burst == burst - 1:
            await asyncio.sleep(0.005)


async def connected(pub: Publishing) -> None:
    async with asyncio.timeout(10):
        while not pub.sink.connected:
            await asyncio.sleep(0.01)


def dropped(pub: Publishing, reason: str) -> int:
    """Drops of `reason` as the metrics report them (the file's counters plus what waits in memory)."""
    families = {f.name: f for f in outbox_metrics(pub.outbox.stats())}
    return int(sum(s.value for s in families["edge_agent_outbox_dropped"].samples if s.labels["reason"] == reason))


async def test_broker_up_on_a_2mib_disk_delivers_everything(broker: Broker, tmp_path: Path) -> None:
    """2000 events through an outbox on a 2 MiB tmpfs, broker up all the time: every one arrives, in order."""
    sub = Subscriber(broker.port, f"{PREFIX}/#", client_id="historian")
    with small_fs(tmp_path / "disk", "2m") as disk:
        pub = publisher(mqtt_config(broker.url), disk / "outbox.db")
        sent: list[AnomalyEvent] = []
        async with running(pub):
            await connected(pub)
            await produce(pub, sent, 2000)
            got: list[str] = []

            def arrived() -> bool:
                got[:] = distinct_in_order(sub)
                return len(got) >= len(sent)

            try:
                await asyncio.to_thread(wait_until, arrived, 30, "all 2000 events")
            finally:
                print(f"{len(got)} of {len(sent)} arrived; {pub.outbox.stats()}", file=sys.stderr)
            assert got == [e.event_id for e in sent]
            await asyncio.wait_for(pub.sink.wait_drained(), 10)
            assert pub.outbox.depth == 0 and dropped(pub, "memory") == dropped(pub, "full") == 0
    sub.close()


async def test_disk_filled_during_an_outage(broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Disk filled while the broker is down: the stored rows and the memory queue are delivered when it is back,
    acknowledged rows are deleted with the disk still full, the memory overflow is dropped by policy and counted
    (stats, status topic, metrics), and once space returns the outbox writes to disk again with its reserve back."""
    caplog.set_level(logging.INFO, logger="edge_agent")
    sub = Subscriber(broker.port, f"{PREFIX}/#", client_id="historian")
    await asyncio.to_thread(broker.save)
    with small_fs(tmp_path / "disk", "2m") as disk:
        path = disk / "outbox.db"
        pub = publisher(mqtt_config(broker.url), path)
        pub.outbox.max_pending = 300  # the memory queue's bound (20,000 by default)
        sent: list[AnomalyEvent] = []
        async with running(pub):
            await connected(pub)
            broker.kill()
            await produce(pub, sent, 100)
            await asyncio.wait_for(pub.outbox.flush(), 10)
            assert pub.outbox.depth == 100
            filler = fill(disk)
            await produce(pub, sent, 1500)

            def overflowed() -> bool:
                st = pub.outbox.stats()
                return st.pending == 300 and dropped(pub, "memory") > 0

            await asyncio.to_thread(wait_until, overflowed, 20, "the memory queue to fill and drop")
            lost = dropped(pub, "memory")
            stored = pub.outbox.depth
            assert stored + 300 + lost == len(sent), (stored, lost)
            await asyncio.to_thread(broker.start)
            await connected(pub)

            def all_kept_arrived() -> bool:
                return len(distinct_in_order(sub)) >= len(sent) - lost

            await asyncio.to_thread(wait_until, all_kept_arrived, 30, "the stored and the in-memory events")
            got = distinct_in_order(sub)
            ids = [e.event_id for e in sent]
            assert got[:100] == ids[:100]  # written before the disk filled
            assert got[-300:] == ids[-300:]  # drop_oldest: the newest 300 waited in memory
            assert len(got) == len(sent) - lost and set(got) <= set(ids)
            # the file is emptied although the disk is still full: acknowledged rows were deleted
            await asyncio.to_thread(wait_until, lambda: pub.outbox.depth == 0, 10, "acked rows deleted")
            assert free_bytes(disk) < 512 * 1024  # the filler is still there
            await asyncio.sleep(1.3)  # one status refresh
            status = [m.json() for m in sub.on("/status") if m.json()["state"] == "online"][-1]["outbox"]
            assert status["dropped_by_reason"]["memory"] == lost
            assert status["dropped"]["event"] == lost
            # space returns: new events go to disk again (they wait in the file during an outage)
            filler.unlink()
            broker.kill()
            before = len(sent)
            await produce(pub, sent, 20)
            await asyncio.wait_for(pub.outbox.flush(), 10)
            assert pub.outbox.depth == 20 and pub.outbox.stats().pending == 0
            await asyncio.to_thread(wait_until, lambda: path.with_name("outbox.db.reserve").exists(), 10, "the reserve")
            await asyncio.to_thread(broker.start)
            await asyncio.wait_for(pub.sink.wait_drained(), 20)
        assert outbox_stats(path).dropped_by_reason()["memory"] == lost  # persisted in the file
    await asyncio.to_thread(wait_until, lambda: len(distinct_in_order(sub)) >= before + 20 - lost, 10, "the last 20")
    sub.close()
    assert [r.getMessage() for r in caplog.records if "cannot delete acknowledged rows" in r.getMessage()] == []
    messages = [r.getMessage() for r in caplog.records if r.name == "edge_agent.outbox"]
    full = [m for m in messages if "full" in m and "memory" in m]
    assert len(full) == 1, messages  # one line when it starts...
    assert any("writing again" in m for m in messages), messages  # ...and one when it ends


async def test_run_with_the_outbox_on_a_full_disk(broker: Broker, modbus_peer: ModbusPeer, tmp_path: Path) -> None:
    """`edge-agent run` with its outbox on a full disk: one WARNING, polling starts, telemetry still reaches the
    broker (from memory), SIGTERM ends it with 0 and no traceback."""
    sub = Subscriber(broker.port, f"{PREFIX}/#", client_id="scada")
    with small_fs(tmp_path / "disk", "1m") as disk:
        fill(disk)
        cfg = tmp_path / "plant.yaml"
        cfg.write_text(
            "devices:\n  - name: plc\n    type: modbus\n    host: 127.0.0.1\n"
            f"    port: {modbus_peer.port}\n    poll_interval: 100ms\n    timeout: 500ms\n    tags:\n"
            '      - {name: temp, address: "40001", type: float32}\n'
            f"mqtt: {{url: '{broker.url}', topic_prefix: '{PREFIX}', telemetry_interval: 200ms}}\n"
            f"outbox: {{path: '{disk / 'outbox.db'}'}}\n"
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "edge_agent",
            "run",
            str(cfg),
            "--output",
            "samples",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        samples = []
        try:
            async with asyncio.timeout(20):
                while len(samples) < 10:
                    line = await proc.stdout.readline()
                    if not line:
                        break
                    samples.append(json.loads(line))
            await asyncio.to_thread(wait_until, lambda: len(sub.on("/telemetry/plc")) >= 3, 10, "telemetry")
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(proc.communicate(), 20)
    sub.close()
    text = err.decode()
    assert len(samples) == 10, text
    assert proc.returncode == 0, text
    assert "Traceback" not in text, text
    warnings = [ln for ln in text.splitlines() if " WARNING " in ln and "outbox" in ln and "full" in ln]
    assert len(warnings) == 1, text
    assert " ERROR " not in text, text
