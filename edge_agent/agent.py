"""Wires the stages from a config and runs them under one TaskGroup until asked to stop.

Read top to bottom, this file is where a tag value goes:
drivers → pollers → buffers → scoring (monitors) → outbox → publish (the MQTT sink) → broker.
Each stage owns its state; the agent hands data forward through callbacks, and reads each stage's
frozen `stats()` for metrics and health. It never reaches into a stage's attributes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edge_agent import __version__
from edge_agent.buffers import Buffers, BuffersStats
from edge_agent.config import Config
from edge_agent.drivers import REGISTRY
from edge_agent.errors import DeviceStartupError
from edge_agent.poller import DevicePoller, PollerStats
from edge_agent.scoring.lifecycle import EventSequence, close_left_open
from edge_agent.scoring.monitor import LoadedModel, ModelMonitor, MonitorStats, load_models, retention_needed
from edge_agent.types import AnomalyEvent, Quality, SampleBatch, Score, Window

if TYPE_CHECKING:  # imported when used: an agent without MQTT or metrics loads neither paho nor prometheus
    from edge_agent.observe import Check, Metrics
    from edge_agent.outbox.writer import OutboxWriter, WriterStats
    from edge_agent.publish.mqtt import MqttPublisher
    from edge_agent.publish.stats import PublisherStats

log = logging.getLogger(__name__)

RESTART_DELAY = 5.0  # after a poller crashed on a bug, not on a device fault
DRAIN_ON_STOP = 5.0  # seconds a clean shutdown waits for the broker to acknowledge what is queued


class _Stop(Exception):
    """Raised inside the TaskGroup to cancel every task on shutdown."""


@dataclass(frozen=True, slots=True)
class AgentStats:
    """A snapshot of every stage: what observe, health and the CLI read."""

    devices: tuple[PollerStats, ...]
    buffers: BuffersStats
    models: tuple[MonitorStats, ...]
    outbox: WriterStats | None  # None without MQTT
    publisher: PublisherStats | None


class Agent:
    """Devices → pollers → buffers → scoring → outbox → publish, under one TaskGroup."""

    def __init__(
        self,
        config: Config,
        *,
        on_batch: Callable[[SampleBatch], None] | None = None,
        on_event: Callable[[AnomalyEvent], None] | None = None,
        on_score: Callable[[Score], None] | None = None,
        models: list[LoadedModel] | None = None,
    ) -> None:
        self.config = config
        # Prometheus metrics only when they are served (observe.listen): latencies are observed live,
        # everything else is read from the stages' stats() at scrape time
        self.metrics: Metrics | None = None
        if config.observe.listen:
            from edge_agent.observe import Metrics

            self.metrics = Metrics()
        self._extra_batch, self._extra_event, self._extra_score = on_batch, on_event, on_score
        models = load_models(config) if models is None else models

        # drivers and pollers: one poller per device, each handing its batches to _on_batch
        self.pollers: list[DevicePoller] = []
        drivers = [REGISTRY[dev.type].build(dev) for dev in config.devices]
        for dev, driver in zip(config.devices, drivers, strict=True):
            read_seconds = self.metrics.poll_seconds.labels(dev.name).observe if self.metrics else None
            self.pollers.append(DevicePoller(dev, driver, self._on_batch, on_read_seconds=read_seconds))

        # buffers: one ring per tag, long enough for every model's window (pushed tags hold their last value)
        retention = max(config.buffers.retention, retention_needed(models))
        self.buffers = Buffers(retention=retention, max_samples=max(config.buffers.max_samples_per_tag, 16))
        for driver in drivers:
            for group in driver.groups:
                self.buffers.register(group.tags, group.interval)
            for group in driver.subscriptions:
                self.buffers.register(group.tags, group.interval, hold=True)

        # scoring: one monitor per model reads windows from the buffers; its events go to _on_event
        self.sequence = EventSequence()  # continued after the outbox's last number at startup (run)
        self.monitors = [
            ModelMonitor(
                m,
                self.buffers,
                self._on_event,
                agent=config.agent.id,
                site=config.agent.site,
                counter=self.sequence,
                on_score=self._score_sink(m),
                on_score_seconds=self.metrics.score_seconds.labels(m.section.name).observe if self.metrics else None,
            )
            for m in models
        ]

        # outbox and publish (with MQTT configured): every event, score and telemetry message is made
        # durable in the outbox first; the MQTT sink takes it from there and deletes it on the broker's ack
        self.outbox: OutboxWriter | None = None
        self.sink: MqttPublisher | None = None
        if config.mqtt is not None:
            from edge_agent.outbox.writer import OutboxWriter
            from edge_agent.publish.mqtt import MqttPublisher

            self.outbox = OutboxWriter(config.outbox, config.mqtt, agent_id=config.agent.id, site=config.agent.site)
            self.sink = MqttPublisher(
                config.mqtt, self.outbox, agent_id=config.agent.id, site=config.agent.site, version=__version__
            )

        # observe: ready = a device answers (and, with MQTT, the broker or at least the outbox takes our
        # messages); metrics read every stage's stats() at scrape time
        self.ready_checks: list[Check] = [self._a_device_is_up]
        if self.outbox is not None and self.sink is not None:
            outbox, sink = self.outbox, self.sink
            self.ready_checks.append(lambda: (sink.connected or outbox.is_open, "no broker and no outbox"))
        if self.metrics is not None:
            self._collect_metrics(self.metrics)

    def _collect_metrics(self, metrics: Metrics) -> None:
        from edge_agent.observe import device_metrics, model_metrics, outbox_metrics, publisher_metrics

        metrics.add(lambda: device_metrics(p.stats() for p in self.pollers))
        metrics.add(lambda: model_metrics(m.stats() for m in self.monitors))
        if self.outbox is not None and self.sink is not None:
            outbox, sink = self.outbox, self.sink
            metrics.add(lambda: publisher_metrics(sink.stats()))
            metrics.add(lambda: outbox_metrics(outbox.stats()))

    # ------------------------------------------------------------ where data goes between stages

    def _on_batch(self, batch: SampleBatch) -> None:
        """A poller's batch: into the buffers, then telemetry (when configured) and any extra consumer."""
        self.buffers.write(batch)
        if self.outbox is not None:
            self.outbox.put_telemetry(batch)
        if self._extra_batch is not None:
            self._extra_batch(batch)

    def _on_event(self, event: AnomalyEvent) -> None:
        """An anomaly event: into the outbox (when MQTT is configured) and to any extra consumer."""
        if self.outbox is not None:
            self.outbox.put_event(event)
        if self._extra_event is not None:
            self._extra_event(event)

    def _score_sink(self, model: LoadedModel) -> Callable[[Score], None] | None:
        """Where a model's scores go: the scores topic (when scores_interval is set) and any extra consumer."""
        mqtt, extra = self.config.mqtt, self._extra_score
        to_outbox = mqtt is not None and mqtt.scores_interval is not None
        if not to_outbox and extra is None:
            return None
        version, sha256 = model.bundle.metadata.version, model.bundle.sha256

        def put(score: Score) -> None:
            if to_outbox and self.outbox is not None:
                self.outbox.put_score(score, version=version, sha256=sha256)
            if extra is not None:
                extra(score)

        return put

    # ------------------------------------------------------------ what others read

    def stats(self) -> AgentStats:
        """Every stage's snapshot (no I/O)."""
        return AgentStats(
            devices=tuple(p.stats() for p in self.pollers),
            buffers=self.buffers.stats(),
            models=tuple(m.stats() for m in self.monitors),
            outbox=self.outbox.stats() if self.outbox is not None else None,
            publisher=self.sink.stats() if self.sink is not None else None,
        )

    def latest(self, tag: str) -> tuple[float, float, Quality] | None:
        """A tag's latest (time, value, quality) in the buffers, or None before its first sample."""
        return self.buffers.latest(tag)

    def window(self, tags: Sequence[str], *, t_end: float, interval: float, n_samples: int) -> Window:
        """Tags resampled from the buffers onto a grid ending at `t_end` (live calibration reads this)."""
        return self.buffers.window(tags, t_end=t_end, interval=interval, n_samples=n_samples)

    def _a_device_is_up(self) -> tuple[bool, str]:
        up = [p.device for p in (p.stats() for p in self.pollers) if p.connected]
        return bool(up), "no device answers" if not up else ""

    # ------------------------------------------------------------ running

    async def run(self, stop: asyncio.Event) -> None:
        """Poll every device until `stop` is set; raises DeviceStartupError for `on_startup_error: error`."""
        health = None
        if self.config.observe.listen and self.metrics is not None:
            from edge_agent.observe import HealthServer

            health = HealthServer(self.metrics, self.ready_checks)
            await health.start(self.config.observe.listen)
        try:
            if self.outbox is None or self.sink is None:
                await self._run_stages(stop)
                return
            await self._run_with_outbox(self.outbox, self.sink, stop)
        finally:
            if health is not None:
                await health.stop()

    async def _run_with_outbox(self, outbox: OutboxWriter, sink: MqttPublisher, stop: asyncio.Event) -> None:
        # what earlier runs left (OutboxBusy: locked by another agent; a file that cannot be opened or
        # written, e.g. on a full disk, is one warning: the outbox runs on its memory queue and retries):
        # the event sequence continues after the last number written, and anomalies left open get their end
        start = await outbox.open()
        try:
            self.sequence.start_after(start.last_seq)
            for end in close_left_open(start.open_anomalies, self.sequence, t=time.time()):
                outbox.put_event(end)
            await outbox.flush()
        except BaseException:
            await outbox.close()
            raise
        from edge_agent.publish import deliver

        async with asyncio.TaskGroup() as outer:
            outer.create_task(deliver(outbox, sink), name="mqtt")
            try:
                # stages first: on stop the monitors close open anomalies, then the outbox and sink flush
                await self._run_stages(stop)
            finally:
                # give the broker a moment to take what is left (the shutdown ends above all); whatever
                # it does not acknowledge in time stays in the outbox for the next start
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(DRAIN_ON_STOP if sink.connected else 0.5):
                        await sink.wait_drained()
                sink.stop()

    async def _run_stages(self, stop: asyncio.Event) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                for poller in self.pollers:
                    tg.create_task(self._supervise(poller), name=f"poll:{poller.config.name}")
                for monitor in self.monitors:
                    tg.create_task(monitor.run(), name=f"score:{monitor.name}")
                tg.create_task(self._wait(stop), name="stop")
        except* _Stop:
            log.info("stopped")

    async def _wait(self, stop: asyncio.Event) -> None:
        await stop.wait()
        raise _Stop

    async def _supervise(self, poller: DevicePoller) -> None:
        """Keep one device's poller alive: a bug in one device's path must not stop the others."""
        while True:
            try:
                await poller.run()
                return  # left out by on_startup_error: ignore
            except (asyncio.CancelledError, DeviceStartupError):
                raise
            except Exception:
                log.exception("device %s: poller crashed; restarting in %.0fs", poller.config.name, RESTART_DELAY)
                await asyncio.sleep(RESTART_DELAY)
