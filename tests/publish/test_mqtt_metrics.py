"""Publish latency metrics after real publishes to a real mosquitto: scraped over HTTP, buckets checked."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from pathlib import Path

from helpers import Broker, free_port, http_get, wait_for
from mqttpeer import make_event, mqtt_config, publisher, running
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.observe import HealthServer, Metrics, outbox_metrics, publisher_metrics
from edge_agent.types import EventType, Score

LATENCIES = ("edge_agent_mqtt_publish_seconds", "edge_agent_mqtt_delivery_seconds")


async def scrape(port: int) -> dict[str, float]:
    """GET /metrics from a HealthServer; every sample as `name{label="…"}` → value (the one sink's label left out)."""
    status, body = await http_get(port, "/metrics")
    assert status == 200, body
    samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            assert s.labels.get("sink", "json") == "json", s
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()) if k != "sink")
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def buckets(samples: dict[str, float], name: str) -> list[tuple[float, float]]:
    """(le, cumulative count) of a histogram, in bound order."""
    prefix = f'{name}_bucket{{le="'
    found = [(float(k[len(prefix) : -2]), v) for k, v in samples.items() if k.startswith(prefix)]
    return sorted(found)


def check_histogram(samples: dict[str, float], name: str, count: int) -> list[tuple[float, float]]:
    """The histogram has `count` observations, cumulative buckets that never fall and end at +Inf == count."""
    got = buckets(samples, name)
    assert len(got) > 5, got
    assert got[-1] == (math.inf, count), got
    assert samples[f"{name}_count"] == count
    assert all(a[1] <= b[1] for a, b in itertools.pairwise(got)), got
    assert samples[f"{name}_sum"] >= 0
    return got


async def test_publish_latency_is_scraped_after_real_publishes(broker: Broker, tmp_path: Path) -> None:
    """/metrics shows publish and delivery histograms that count each acknowledged QoS 1 event once, QoS 0 never."""
    pub = publisher(mqtt_config(broker.url, scores_interval=60), tmp_path / "outbox.db")  # scores: QoS 0
    metrics = Metrics()
    metrics.add(lambda: publisher_metrics([pub.sink.stats()]))
    metrics.add(lambda: outbox_metrics(pub.outbox.stats()))
    server = HealthServer(metrics, [])
    port = free_port()
    await server.start(f"127.0.0.1:{port}")
    try:
        before = await scrape(port)
        for name in LATENCIES:
            check_histogram(before, name, 0)
        started = time.monotonic()
        async with running(pub):
            for seq in range(1, 41):
                pub.outbox.put_event(make_event(EventType.START, seq=seq, model=f"m{seq % 3}"))
            pub.outbox.put_score(Score("m0", time.time(), 0.4, 1.5, {"pump1.pressure": 1.0}, 0.9))
            await asyncio.wait_for(pub.sink.wait_drained(), 10)
            after = await scrape(port)
        elapsed = time.monotonic() - started
    finally:
        await server.stop()
    assert after["edge_agent_mqtt_connected"] == 1
    assert after["edge_agent_mqtt_acked_total"] == 41  # the score too: its row left the outbox
    assert after["edge_agent_mqtt_in_flight"] == 0
    for name in LATENCIES:
        check_histogram(after, name, 40)  # the QoS 0 score has no acknowledgement to time
        # every latency lies inside the test's own run time
        assert after[f"{name}_sum"] <= 40 * elapsed
    publish, delivery = buckets(after, LATENCIES[0]), buckets(after, LATENCIES[1])
    assert publish[-2][0] >= 5.0 and delivery[-2][0] >= 3600.0  # the bounds reach an outage's length


async def test_delivery_latency_includes_the_time_in_the_outbox(broker: Broker, tmp_path: Path) -> None:
    """Events written while the broker is down: their delivery latency covers the outage, the publish latency not."""
    broker.kill()
    pub = publisher(mqtt_config(broker.url, reconnect_max=0.2), tmp_path / "outbox.db")
    async with running(pub):
        started = time.monotonic()
        for seq in range(1, 11):
            pub.outbox.put_event(make_event(EventType.START, seq=seq))
        await pub.outbox.flush()
        await asyncio.sleep(0.6)
        broker.start()
        await asyncio.wait_for(pub.sink.wait_drained(), 10)
        elapsed = time.monotonic() - started
        families = [*publisher_metrics([pub.sink.stats()]), *outbox_metrics(pub.outbox.stats())]
    samples = {s.name: s.value for family in families for s in family.samples if set(s.labels) <= {"sink"}}
    cumulative: dict[str, dict[float, float]] = {name: {} for name in LATENCIES}
    for bucket in (s for family in families for s in family.samples if "le" in s.labels):
        cumulative[bucket.name.removesuffix("_bucket")][float(bucket.labels["le"])] = bucket.value
    publish, delivery = cumulative[LATENCIES[0]], cumulative[LATENCIES[1]]
    assert publish[math.inf] == delivery[math.inf] == 10
    # each event waited in the outbox at least 0.6 s: none delivered within 0.5 s, and none after the test's end
    assert delivery[0.5] == 0
    assert 10 * 0.6 <= samples["edge_agent_mqtt_delivery_seconds_sum"] <= 10 * elapsed
    # a message is handed to paho only once connected: each publish latency is within its delivery latency
    shared = sorted(publish.keys() & delivery.keys())
    assert len(shared) > 3
    assert all(publish[le] >= delivery[le] for le in shared), (publish, delivery)
    assert samples["edge_agent_mqtt_publish_seconds_sum"] < samples["edge_agent_mqtt_delivery_seconds_sum"]


async def test_outbox_oldest_age_grows_during_an_outage_and_clears_after(broker: Broker, tmp_path: Path) -> None:
    """The age of the oldest waiting message: refreshed on the status interval, 0 once the outbox is empty."""

    def age() -> float:
        (family,) = [f for f in outbox_metrics(pub.outbox.stats()) if f.name == "edge_agent_outbox_oldest_age_seconds"]
        return float(family.samples[0].value)

    broker.kill()
    pub = publisher(mqtt_config(broker.url, reconnect_max=0.2, status_interval=1), tmp_path / "outbox.db")
    async with running(pub):
        written = time.time()  # before the row exists: its age can only be less than the time since
        pub.outbox.put_event(make_event(EventType.START, seq=1))
        await pub.outbox.flush()
        await wait_for(lambda: age() >= 1.0, timeout=20, what="a housekeeping pass to see the row 1 s old")
        assert 1.0 <= age() <= time.time() - written + 0.5
        broker.start()
        await asyncio.wait_for(pub.sink.wait_drained(), 10)
        assert age() == 0.0
