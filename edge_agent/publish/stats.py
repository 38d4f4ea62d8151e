"""What the publisher counts: connection state, messages, and latency histograms (read by observe at scrape time)."""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass

# handed to paho → acknowledged: the wire, paho's own queue (up to `window`), the broker
PUBLISH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# written to the outbox → acknowledged: adds the time waiting in the outbox, outages included
DELIVERY_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 21600.0, 86400.0)


class LatencyHistogram:
    """Durations counted into fixed buckets, plus their sum: constant memory, read at scrape time.

    Observed and read on the event loop only (no lock).
    """

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds  # upper bounds (le), ascending
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last one is above every bound
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        """Count one duration (negative ones, from a clock step, count as 0)."""
        seconds = max(seconds, 0.0)
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        """Durations observed."""
        return sum(self.counts)

    def snapshot(self) -> HistogramSnapshot:
        """A frozen copy for readers (observe)."""
        return HistogramSnapshot(tuple(self.cumulative()), self.sum)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, durations at or below it) per bucket, ending with (inf, count), as Prometheus has them."""
        return list(zip((*self.bounds, math.inf), itertools.accumulate(self.counts), strict=True))


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """Cumulative bucket counts (upper bound, count at or below it; the last bound is inf) and their sum."""

    buckets: tuple[tuple[float, int], ...]
    sum: float


@dataclass
class PublisherCounters:
    """Counters of one publisher run, updated in place on the event loop (the outbox keeps the persistent ones)."""

    connected: bool = False
    connects: int = 0
    disconnects: int = 0
    connect_failures: int = 0
    published: int = 0
    acked: int = 0
    rejected: int = 0  # MQTT 5 PUBACK with a failure reason code: the row stays and is retried later
    historical: int = 0
    in_flight: int = 0
    last_error: str | None = None

    def snapshot(
        self,
        in_flight: int,
        publish: LatencyHistogram,
        delivery: LatencyHistogram,
        *,
        sink: str = "json",
        sparkplug: SparkplugStats | None = None,
    ) -> PublisherStats:
        """These counters frozen, with the messages in flight now and the latencies (`sparkplug`: that sink's own
        state, which also says the latencies are not measured)."""
        return PublisherStats(
            connected=self.connected,
            connects=self.connects,
            disconnects=self.disconnects,
            connect_failures=self.connect_failures,
            published=self.published,
            acked=self.acked,
            rejected=self.rejected,
            historical=self.historical,
            in_flight=in_flight,
            last_error=self.last_error,
            publish_latency=publish.snapshot(),
            delivery_latency=delivery.snapshot(),
            sink=sink,
            sparkplug=sparkplug,
        )


@dataclass(frozen=True, slots=True)
class PublisherStats:
    """A snapshot of the publisher: connection state, counters and latencies."""

    connected: bool
    connects: int
    disconnects: int
    connect_failures: int
    published: int
    acked: int
    rejected: int
    historical: int
    in_flight: int
    last_error: str | None
    publish_latency: HistogramSnapshot
    delivery_latency: HistogramSnapshot
    sink: str = "json"  # the mqtt.payloads key of the sink these are from (the `sink` label of the metrics)
    sparkplug: SparkplugStats | None = None  # the Sparkplug node's own state (it measures no latencies: QoS 0)


@dataclass(frozen=True, slots=True)
class SparkplugStats:
    """What an operator needs of the Sparkplug edge node beside the publisher counters."""

    bdseq: int  # of the current (or next) connection: the NBIRTH's and the NDEATH will's
    births: int  # NBIRTHs sent (a connect, a rebirth command, the primary host back online)
    rebirth_requests: int  # NCMD Node Control/Rebirth commands received
    device_deaths: int  # DDEATHs sent (a device comms-lost, including the DDEATH after its DBIRTH)
    skipped: int  # rows about devices or models the births did not announce (a reload added them)
    primary_host: str | None  # mqtt.sparkplug.primary_host_id, None when not configured
    host_online: bool  # the primary host's last STATE said online (True when none is configured)
