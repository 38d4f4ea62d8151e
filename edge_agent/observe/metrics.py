"""Prometheus metrics: latency histograms observed live, everything else read from the stages' stats() at scrape time.

The hot paths pay nothing for counters: a custom collector turns each stage's frozen stats snapshot into
metric families when /metrics is scraped. Poll and scoring latencies are observed as they happen, once per
read or window; MQTT latencies are counted by the publisher into fixed buckets and read at scrape time too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from edge_agent.outbox.writer import WriterStats
    from edge_agent.poller import PollerStats
    from edge_agent.publish.stats import PublisherStats, SparkplugStats
    from edge_agent.scoring.monitor import MonitorStats

POLL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
INFER_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2)


class Metrics:
    """The agent's metrics registry: latency histograms observed live, everything else collected on scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.poll_seconds = Histogram(
            "edge_agent_poll_seconds",
            "Duration of one scan-group read",
            ["device"],
            buckets=POLL_BUCKETS,
            registry=self.registry,
        )
        self.score_seconds = Histogram(
            "edge_agent_score_seconds",
            "Duration of one scoring step (window to score)",
            ["model"],
            buckets=INFER_BUCKETS,
            registry=self.registry,
        )
        self._collectors: list[Callable[[], Iterable[Metric]]] = []
        self.registry.register(_Callback(self._collect))

    def add(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Add a scrape-time source of metrics (a later stage registers its own)."""
        self._collectors.append(collect)

    def _collect(self) -> Iterable[Metric]:
        for collect in self._collectors:
            yield from collect()

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)


class _Callback(Collector):
    def __init__(self, fn: Callable[[], Iterable[Metric]]) -> None:
        self._fn = fn

    def collect(self) -> Iterable[Metric]:
        return self._fn()


def device_metrics(devices: Iterable[PollerStats]) -> Iterable[Metric]:
    """Per-device reads, failures, overruns and up state."""
    reads = CounterMetricFamily("edge_agent_reads", "Scan-group reads completed", labels=["device"])
    pushed = CounterMetricFamily("edge_agent_pushed_batches", "Batches a device sent by itself", labels=["device"])
    failures = CounterMetricFamily("edge_agent_read_failures", "Connection-level failures", labels=["device"])
    overruns = CounterMetricFamily(
        "edge_agent_overruns", "Poll cycles skipped because a read ran late", labels=["device"]
    )
    up = GaugeMetricFamily("edge_agent_device_up", "1 when the device answers", labels=["device"])
    events = CounterMetricFamily(
        "edge_agent_driver_events",
        "A driver's own counters by event (the MQTT input: received, malformed, dropped, stale, rebirths, "
        "untrusted, historical, deaths)",
        labels=["device", "event"],
    )
    for d in devices:
        for event, n in d.driver:
            events.add_metric([d.device, event], n)
        reads.add_metric([d.device], d.reads)
        pushed.add_metric([d.device], d.pushed)
        failures.add_metric([d.device], d.failures)
        overruns.add_metric([d.device], d.overruns)
        up.add_metric([d.device], 1.0 if d.connected else 0.0)
    yield from (reads, pushed, failures, overruns, up)
    if events.samples:  # polling drivers count nothing of their own: no empty family
        yield events


def model_metrics(models: Iterable[MonitorStats]) -> Iterable[Metric]:
    """Per-model windows scored and skipped, latest score, threshold and anomaly state."""
    scored = CounterMetricFamily("edge_agent_windows_scored", "Windows scored", labels=["model"])
    skipped = CounterMetricFamily(
        "edge_agent_windows_insufficient", "Windows not scored for lack of good data", labels=["model"]
    )
    score = GaugeMetricFamily("edge_agent_score", "Latest window score", labels=["model"])
    threshold = GaugeMetricFamily("edge_agent_threshold", "Anomaly threshold in use", labels=["model"])
    active = GaugeMetricFamily("edge_agent_anomaly_active", "1 while an anomaly is open", labels=["model"])
    adapted = CounterMetricFamily(
        "edge_agent_windows_adapted", "Windows drift adaptation learnt from (models[].adapt)", labels=["model"]
    )
    shift = GaugeMetricFamily(
        "edge_agent_adapt_shift", "Largest move of a tag's normalisation centre, in calibrated scales", labels=["model"]
    )
    for m in models:
        scored.add_metric([m.model], m.windows_scored)
        skipped.add_metric([m.model], m.windows_insufficient)
        if m.last_score is not None:
            score.add_metric([m.model], m.last_score)
        threshold.add_metric([m.model], m.threshold)
        active.add_metric([m.model], 1.0 if m.active else 0.0)
        adapted.add_metric([m.model], m.windows_adapted)
        shift.add_metric([m.model], m.adapt_shift)
    yield from (scored, skipped, score, threshold, active, adapted, shift)


def reload_metrics(reloads: Mapping[str, int]) -> Iterable[Metric]:
    """Config reloads by result: ok (applied), invalid (the file did not validate), failed (valid, not applied)."""
    family = CounterMetricFamily(
        "edge_agent_config_reloads", "Config reloads (SIGHUP or a changed file) by result", labels=["result"]
    )
    for result, n in reloads.items():
        family.add_metric([result], n)
    yield family


def publisher_metrics(sinks: Iterable[PublisherStats]) -> Iterable[Metric]:
    """Each sink's MQTT connection state, counters and latencies (label `sink`: json, sparkplug), and the
    Sparkplug node's own state when it runs."""
    sinks = list(sinks)
    labels = ["sink"]
    connected = GaugeMetricFamily("edge_agent_mqtt_connected", "1 while connected to the broker", labels=labels)
    in_flight = GaugeMetricFamily(
        "edge_agent_mqtt_in_flight", "Messages handed to the MQTT client and not yet acknowledged", labels=labels
    )
    counters = {
        name: CounterMetricFamily(f"edge_agent_mqtt_{name}", doc, labels=labels)
        for name, doc in (
            ("published", "Messages handed to the broker"),
            ("acked", "Messages acknowledged by the broker (a QoS 0 sink: written to the socket)"),
            ("rejected", "Messages the broker refused with an MQTT 5 reason code"),
            ("connects", "Successful connections"),
            ("connect_failures", "Failed connection attempts"),
            ("disconnects", "Connections lost"),
        )
    }
    publish = HistogramMetricFamily(
        "edge_agent_mqtt_publish_seconds",
        "Time from handing a QoS 1/2 message to the MQTT client to the broker's acknowledgement",
        labels=labels,
    )
    delivery = HistogramMetricFamily(
        "edge_agent_mqtt_delivery_seconds",
        "Time from writing a QoS 1/2 message to the outbox to the broker's acknowledgement (outages included)",
        labels=labels,
    )
    for st in sinks:
        key = [st.sink]
        connected.add_metric(key, float(st.connected))
        in_flight.add_metric(key, st.in_flight)
        for name, family in counters.items():
            family.add_metric(key, getattr(st, name))
        if st.sparkplug is None:  # the Sparkplug node publishes at QoS 0: no latencies to show
            for histogram, hist in ((publish, st.publish_latency), (delivery, st.delivery_latency)):
                histogram.add_metric(key, [(floatToGoString(le), n) for le, n in hist.buckets], hist.sum)
    yield from (connected, in_flight, *counters.values())
    if publish.samples:
        yield from (publish, delivery)
    nodes = [st.sparkplug for st in sinks if st.sparkplug is not None]
    if nodes:
        yield from sparkplug_metrics(nodes)


def sparkplug_metrics(nodes: Iterable[SparkplugStats]) -> Iterable[Metric]:
    """The Sparkplug edge node: bdSeq, births, rebirth commands, DDEATHs, skipped rows, primary host state."""
    bdseq = GaugeMetricFamily("edge_agent_sparkplug_bdseq", "bdSeq of the current NBIRTH and NDEATH will")
    births = CounterMetricFamily("edge_agent_sparkplug_births", "NBIRTHs sent (connects, rebirths, host back)")
    rebirths = CounterMetricFamily(
        "edge_agent_sparkplug_rebirth_requests", "NCMD Node Control/Rebirth commands received"
    )
    deaths = CounterMetricFamily("edge_agent_sparkplug_device_deaths", "DDEATHs sent (a device comms-lost)")
    skipped = CounterMetricFamily(
        "edge_agent_sparkplug_skipped", "Rows about devices or models the births did not announce, not published"
    )
    host = GaugeMetricFamily(
        "edge_agent_sparkplug_primary_host_online",
        "1 while the primary host's STATE says online (data waits in the outbox otherwise)",
        labels=["host"],
    )
    for n in nodes:
        bdseq.add_metric([], n.bdseq)
        births.add_metric([], n.births)
        rebirths.add_metric([], n.rebirth_requests)
        deaths.add_metric([], n.device_deaths)
        skipped.add_metric([], n.skipped)
        if n.primary_host is not None:
            host.add_metric([n.primary_host], float(n.host_online))
    yield from (bdseq, births, rebirths, deaths, skipped)
    if host.samples:
        yield host


def outbox_metrics(st: WriterStats) -> Iterable[Metric]:
    """The outbox's depth, bytes, oldest age, memory queue, drops and damage (from memory)."""
    ob = st.outbox
    depth = GaugeMetricFamily("edge_agent_outbox_depth", "Messages waiting in the outbox file", labels=["kind"])
    for kind, n in (ob.depth if ob is not None else {"event": 0, "score": 0, "telemetry": 0}).items():
        depth.add_metric([kind], n)
    yield depth
    yield GaugeMetricFamily(
        "edge_agent_outbox_pending",
        "Messages in the outbox's memory queue (waiting for the file, or sent from there while it cannot be written)",
        value=st.pending,
    )
    yield GaugeMetricFamily(
        "edge_agent_outbox_writable",
        "1 while the outbox file is open and written, 0 while messages are kept in memory (disk full, not openable)",
        value=1 if st.store_error is None and ob is not None else 0,
    )
    if ob is not None:
        yield GaugeMetricFamily("edge_agent_outbox_bytes", "Bytes stored in the outbox", value=ob.bytes)
        yield GaugeMetricFamily("edge_agent_outbox_max_bytes", "The outbox's bound", value=ob.max_bytes)
        yield CounterMetricFamily(
            "edge_agent_outbox_corrupt_files",
            "Damaged outbox files moved aside (their readable rows were recovered)",
            value=ob.corrupt_files,
        )
        yield CounterMetricFamily(
            "edge_agent_outbox_lost_transactions",
            "Committed transactions lost with damaged outbox files",
            value=ob.lost_transactions,
        )
    age = max(0.0, time.time() - st.oldest) if st.oldest is not None and ob is not None and ob.total else 0.0
    yield GaugeMetricFamily(
        "edge_agent_outbox_oldest_age_seconds",
        "Age of the oldest message waiting in the outbox (refreshed every mqtt.status_interval)",
        value=age,
    )
    drops = CounterMetricFamily("edge_agent_outbox_dropped", "Messages dropped", labels=["reason", "kind"])
    for key, n in st.dropped.items():
        reason, _, kind = key.partition(".")
        drops.add_metric([reason, kind], n)
    yield drops
