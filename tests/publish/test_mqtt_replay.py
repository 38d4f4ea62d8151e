"""A large outbox backlog replayed at full speed to a real mosquitto that restarts midway: nothing lost, order kept."""

from __future__ import annotations

import asyncio
from pathlib import Path

from helpers import Broker, Subscriber, block_until
from mqttpeer import PREFIX, check_delivery, make_event, mqtt_config, publisher, running

from edge_agent.outbox import Entry, Outbox
from edge_agent.publish.mqtt import STATUS_SLACK, WIRE_INFLIGHT
from edge_agent.records import encode, event_payload
from edge_agent.types import EventType

BACKLOG = 9000
BROKER_INFLIGHT = 100  # mosquitto's max_inflight_messages towards the subscriber (mqttpeer's config)


def write_backlog(path: Path, n: int) -> list[str]:
    """An outbox holding n events over three topics, as a long outage leaves it; returns their event_ids."""
    models = ("pump", "fan", "valve")
    events = [make_event(EventType.START, seq=i + 1, model=models[i % 3]) for i in range(n)]
    with Outbox(path) as box:
        for i in range(0, n, 1000):
            box.put(
                [Entry(f"{PREFIX}/events/{e.model}", encode(event_payload(e)), seq=e.seq) for e in events[i : i + 1000]]
            )
    return [e.event_id for e in events]


async def test_backlog_replayed_through_a_broker_restart(broker: Broker, tmp_path: Path) -> None:
    """The broker stops a quarter of the way through a 9,000-event replay: every event arrives, in order per topic."""
    sub = Subscriber(broker.port, f"{PREFIX}/events/#", client_id="historian")
    expected = write_backlog(tmp_path / "outbox.db", BACKLOG)
    pub = publisher(mqtt_config(broker.url), tmp_path / "outbox.db")
    async with running(pub):
        async with asyncio.timeout(30):
            while pub.sink.stats().acked < BACKLOG // 4:
                await asyncio.sleep(0.005)
        await asyncio.to_thread(broker.stop)  # SIGTERM: mosquitto saves the historian's queue on the way out
        assert 0 < pub.outbox.depth < BACKLOG
        await asyncio.sleep(0.3)
        await asyncio.to_thread(broker.start)
        await asyncio.wait_for(pub.sink.wait_drained(), 60)
        assert pub.sink.stats().connects == 2
    await asyncio.to_thread(block_until, lambda: set(sub.event_ids()) >= set(expected), 30, "every event")
    sub.close()
    # duplicates: what the publisher had on the wire when the link dropped, and what the broker had in flight
    # towards the subscriber (redelivered after its restart)
    check_delivery(sub.on("/events/"), expected, max_duplicates=WIRE_INFLIGHT + STATUS_SLACK + BROKER_INFLIGHT)
    # each row's acknowledgement was counted once: the first copy's, or the resent one's when that was lost
    assert pub.sink.stats().acked == pub.sink.publish_latency.count == pub.sink.delivery_latency.count == BACKLOG
