"""Damaged outbox files in front of a real mosquitto: what was recovered is delivered, nothing damaged is
published, and the loss is counted on the status topic and in the metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import Broker, Subscriber
from helpers import block_until as wait_until
from mqttpeer import PREFIX, make_event, mqtt_config, publisher, running

from edge_agent.observe import outbox_metrics
from edge_agent.outbox import Entry, Outbox
from edge_agent.records import encode, event_payload
from edge_agent.types import EventType

_WRITE_AND_DIE = textwrap.dedent(
    """
    import os, sys
    sys.path[:0] = [sys.argv[3], os.path.dirname(sys.argv[3])]  # mqttpeer, and the helpers it imports
    from mqttpeer import PREFIX, make_event
    from edge_agent.outbox import Entry, Outbox
    from edge_agent.records import encode, event_payload
    from edge_agent.types import EventType
    b = Outbox(sys.argv[1])
    b.open()
    for seq in range(1, int(sys.argv[2]) + 1):
        e = make_event(EventType.START, seq=seq)
        b.put([Entry(f"{PREFIX}/events/pump", encode(event_payload(e)), seq=seq)])
    os._exit(0)  # as after kill -9: no checkpoint, the WAL stays
    """
)


def corrupt_drops(families: list) -> int:
    (drops,) = [f for f in families if f.name == "edge_agent_outbox_dropped"]
    return int(sum(s.value for s in drops.samples if s.labels["reason"] == "corrupt"))


async def test_changed_payload_is_never_published(
    broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Bytes changed inside one stored event: every other event arrives, that one never does, every message on
    events/… is JSON, and the drop is counted (status topic, metrics, the file)."""
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    box.open()
    events = [make_event(EventType.START, seq=i + 1) for i in range(30)]
    box.put([Entry(f"{PREFIX}/events/pump", encode(event_payload(e)), seq=e.seq) for e in events])
    box.close()
    damaged = events[11].event_id.encode()
    data = path.read_bytes()
    at = data.index(damaged)
    path.write_bytes(data[: at - 1] + b"\x01" + data[at:])  # the quote before the id: no longer JSON
    caplog.set_level(logging.ERROR)
    sub = Subscriber(broker.port, f"{PREFIX}/#", client_id="historian")
    pub = publisher(mqtt_config(broker.url), path)
    async with running(pub):
        await asyncio.wait_for(pub.sink.wait_drained(), 15)
        await asyncio.sleep(1.3)  # a status refresh
        families = list(outbox_metrics(pub.outbox.stats()))
    await asyncio.to_thread(wait_until, lambda: len(sub.on("/events/")) >= 29, 10, "29 events")
    sub.close()
    for m in sub.on("/events/"):
        json.loads(m.payload)  # nothing that is not JSON went out
    assert set(sub.event_ids()) == {e.event_id for i, e in enumerate(events) if i != 11}
    online = [m.json() for m in sub.on("/status") if m.json()["state"] == "online"]
    assert online[-1]["outbox"]["dropped_by_reason"]["corrupt"] == 1
    assert corrupt_drops(families) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "failed their checksum" in errors[0], errors


async def test_truncated_main_file_recovered_delivered_and_counted(
    broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Main file truncated to 0 with its WAL beside it: the events the WAL still holds are delivered, the lost
    ones are counted on the status topic and in the metrics."""
    path = tmp_path / "outbox.db"
    here = str(Path(__file__).parent)
    args = [sys.executable, "-c", _WRITE_AND_DIE, str(path), "400", here]
    await asyncio.to_thread(subprocess.run, args, check=True, timeout=120)
    os.truncate(path, 0)
    caplog.set_level(logging.ERROR)
    sub = Subscriber(broker.port, f"{PREFIX}/#", client_id="historian")
    pub = publisher(mqtt_config(broker.url), path)
    async with running(pub):
        depth = pub.outbox.depth
        await asyncio.wait_for(pub.sink.wait_drained(), 15)
        await asyncio.sleep(1.3)
        families = list(outbox_metrics(pub.outbox.stats()))
    await asyncio.to_thread(wait_until, lambda: len(set(sub.event_ids())) >= depth, 10, "the recovered events")
    sub.close()
    lost = 400 - depth
    assert 0 < depth < 400
    seqs = [m.json()["seq"] for m in sub.on("/events/")]
    assert seqs == sorted(seqs) and len(set(seqs)) == depth
    online = [m.json() for m in sub.on("/status") if m.json()["state"] == "online"][-1]["outbox"]
    assert online["dropped_by_reason"]["corrupt"] == lost and online["corrupt_files"] == 1
    assert corrupt_drops(families) == lost
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert f"recovered {depth} rows" in line and f"{lost} rows" in line
