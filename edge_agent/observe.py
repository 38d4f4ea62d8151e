"""Prometheus metrics, /healthz and /readyz on `observe.listen`, and JSON log lines.

Counters are read from the stages' own stats at scrape time (a custom collector), so the hot
paths pay nothing for them; poll and scoring latencies are observed as they happen, once per read or
window; MQTT latencies are counted by the publisher into fixed buckets and read at scrape time too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from edge_agent.agent import Agent
    from edge_agent.publish.mqtt import LatencyHistogram, MqttPublisher

log = logging.getLogger(__name__)

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


def agent_metrics(agent: Agent) -> Iterable[Metric]:
    """Per-device and per-model metrics read from the agent's stats."""
    reads = CounterMetricFamily("edge_agent_reads", "Scan-group reads completed", labels=["device"])
    pushed = CounterMetricFamily("edge_agent_pushed_batches", "Batches a device sent by itself", labels=["device"])
    failures = CounterMetricFamily("edge_agent_read_failures", "Connection-level failures", labels=["device"])
    overruns = CounterMetricFamily(
        "edge_agent_overruns", "Poll cycles skipped because a read ran late", labels=["device"]
    )
    up = GaugeMetricFamily("edge_agent_device_up", "1 when the device answers", labels=["device"])
    for p in agent.pollers:
        name = p.config.name
        reads.add_metric([name], p.stats.reads)
        pushed.add_metric([name], p.stats.pushed)
        failures.add_metric([name], p.stats.failures)
        overruns.add_metric([name], p.stats.overruns)
        up.add_metric([name], 1.0 if p.stats.connected else 0.0)
    yield from (reads, pushed, failures, overruns, up)
    scored = CounterMetricFamily("edge_agent_windows_scored", "Windows scored", labels=["model"])
    skipped = CounterMetricFamily(
        "edge_agent_windows_insufficient", "Windows not scored for lack of good data", labels=["model"]
    )
    score = GaugeMetricFamily("edge_agent_score", "Latest window score", labels=["model"])
    threshold = GaugeMetricFamily("edge_agent_threshold", "Anomaly threshold in use", labels=["model"])
    active = GaugeMetricFamily("edge_agent_anomaly_active", "1 while an anomaly is open", labels=["model"])
    for m in agent.monitors:
        scored.add_metric([m.name], m.windows_scored)
        skipped.add_metric([m.name], m.windows_insufficient)
        if m.last_score is not None:
            score.add_metric([m.name], m.last_score)
        threshold.add_metric([m.name], m.threshold)
        active.add_metric([m.name], 1.0 if m.detector.active else 0.0)
    yield from (scored, skipped, score, threshold, active)


def _histogram(name: str, doc: str, hist: LatencyHistogram) -> HistogramMetricFamily:
    """A Prometheus histogram from a publisher's running bucket counts."""
    buckets = [(floatToGoString(le), n) for le, n in hist.cumulative()]
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=hist.sum)


def publisher_metrics(publisher: MqttPublisher) -> Iterable[Metric]:
    """MQTT connection state, counters and latencies, and the outbox's depth, bytes and drops (from memory)."""
    st = publisher.stats
    yield GaugeMetricFamily("edge_agent_mqtt_connected", "1 while connected to the broker", value=float(st.connected))
    yield GaugeMetricFamily(
        "edge_agent_mqtt_in_flight", "Messages handed to the MQTT client and not yet acknowledged", value=st.in_flight
    )
    for name, doc, value in (
        ("published", "Messages handed to the broker", st.published),
        ("acked", "Messages acknowledged by the broker", st.acked),
        ("rejected", "Messages the broker refused with an MQTT 5 reason code", st.rejected),
        ("connects", "Successful connections", st.connects),
        ("connect_failures", "Failed connection attempts", st.connect_failures),
        ("disconnects", "Connections lost", st.disconnects),
    ):
        yield CounterMetricFamily(f"edge_agent_mqtt_{name}", doc, value=value)
    yield _histogram(
        "edge_agent_mqtt_publish_seconds",
        "Time from handing a QoS 1/2 message to the MQTT client to the broker's acknowledgement",
        publisher.publish_latency,
    )
    yield _histogram(
        "edge_agent_mqtt_delivery_seconds",
        "Time from writing a QoS 1/2 message to the outbox to the broker's acknowledgement (outages included)",
        publisher.delivery_latency,
    )
    if not publisher.outbox.is_open:
        return
    ob = publisher.outbox.quick_stats()
    depth = GaugeMetricFamily("edge_agent_outbox_depth", "Messages waiting in the outbox", labels=["kind"])
    for kind, n in ob.depth.items():
        depth.add_metric([kind], n)
    yield depth
    yield GaugeMetricFamily("edge_agent_outbox_bytes", "Bytes stored in the outbox", value=ob.bytes)
    yield GaugeMetricFamily("edge_agent_outbox_max_bytes", "The outbox's bound", value=ob.max_bytes)
    oldest = publisher.outbox_oldest
    age = max(0.0, time.time() - oldest) if oldest is not None and ob.total else 0.0
    yield GaugeMetricFamily(
        "edge_agent_outbox_oldest_age_seconds",
        "Age of the oldest message waiting in the outbox (refreshed every mqtt.status_interval)",
        value=age,
    )
    drops = CounterMetricFamily("edge_agent_outbox_dropped", "Messages dropped", labels=["reason", "kind"])
    for key, n in ob.dropped.items():
        reason, _, kind = key.partition(".")
        drops.add_metric([reason, kind], n)
    yield drops


Check = Callable[[], tuple[bool, str]]


class HealthServer:
    """A tiny HTTP server: GET /metrics, /healthz (alive), /readyz (ready to do its job)."""

    def __init__(self, metrics: Metrics, ready_checks: list[Check]) -> None:
        self.metrics = metrics
        self.ready_checks = ready_checks
        self._server: asyncio.Server | None = None

    async def start(self, listen: str) -> None:
        """Listen on `host:port`."""
        host, _, port = listen.rpartition(":")
        self._server = await asyncio.start_server(self._handle, host.strip("[]") or "0.0.0.0", int(port))
        log.info("metrics and health on http://%s/metrics, /healthz, /readyz", listen)

    async def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def readiness(self) -> tuple[bool, list[str]]:
        """All readiness checks, with the reason of each that fails."""
        failing = [why for ok, why in (check() for check in self.ready_checks) if not ok]
        return not failing, failing

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # headers are not needed
            parts = request.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else ""
            if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
                status, body, ctype = 405, b"method not allowed\n", "text/plain"
            elif path == "/metrics":
                status, body, ctype = 200, self.metrics.render(), "text/plain; version=0.0.4"
            elif path == "/healthz":
                status, body, ctype = 200, b"ok\n", "text/plain"
            elif path == "/readyz":
                ok, failing = self.readiness()
                status = 200 if ok else 503
                body, ctype = (json.dumps({"ready": ok, "failing": failing}) + "\n").encode(), "application/json"
            else:
                status, body, ctype = 404, b"not found\n", "text/plain"
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}[status]
            head = (
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            writer.write(head + (body if parts[:1] != ["HEAD"] else b""))
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


class JsonFormatter(logging.Formatter):
    """One JSON object per log line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        """Render a record as JSON with time, level, logger and message."""
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)
