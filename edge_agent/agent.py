"""Wires the stages from a config and runs them under one TaskGroup until asked to stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TypeVar

from edge_agent import __version__
from edge_agent.buffers import Buffers
from edge_agent.config import Config
from edge_agent.drivers import REGISTRY
from edge_agent.errors import DeviceStartupError
from edge_agent.observe import Check, HealthServer, Metrics, agent_metrics, publisher_metrics
from edge_agent.poller import DevicePoller
from edge_agent.publish.mqtt import MqttPublisher
from edge_agent.scoring.monitor import LoadedModel, ModelMonitor, load_models, retention_needed
from edge_agent.types import AnomalyEvent, SampleBatch, Score

T = TypeVar("T")


def _both(first: Callable[[T], None], second: Callable[[T], None]) -> Callable[[T], None]:
    def call(item: T) -> None:
        first(item)
        second(item)

    return call


log = logging.getLogger(__name__)

RESTART_DELAY = 5.0  # after a poller crashed on a bug, not on a device fault
DRAIN_ON_STOP = 5.0  # seconds a clean shutdown waits for the broker to acknowledge what is queued


class _Stop(Exception):
    """Raised inside the TaskGroup to cancel every task on shutdown."""


class EventSequence:
    """The per-agent event sequence; restarts continue after the outbox's highest number."""

    def __init__(self) -> None:
        self._next = 1

    def __iter__(self) -> EventSequence:
        return self

    def __next__(self) -> int:
        n = self._next
        self._next += 1
        return n

    def start_after(self, last: int) -> None:
        """Continue after `last` (set before the first event of this run)."""
        self._next = max(self._next, last + 1)


class Agent:
    """Devices → pollers → buffers (scoring and publishing join in later stages)."""

    def __init__(
        self,
        config: Config,
        *,
        on_batch: Callable[[SampleBatch], None] | None = None,
        on_event: Callable[[AnomalyEvent], None] | None = None,
        models: list[LoadedModel] | None = None,
    ) -> None:
        self.config = config
        self.metrics = Metrics()
        models = load_models(config) if models is None else models
        retention = max(config.buffers.retention, retention_needed(models))
        self.buffers = Buffers(retention=retention, max_samples=max(config.buffers.max_samples_per_tag, 16))
        self._on_batch = on_batch
        self.sequence = EventSequence()
        # with MQTT configured, events and telemetry go through the durable outbox to the broker
        self.publisher: MqttPublisher | None = None
        if config.mqtt is not None:
            self.publisher = MqttPublisher(
                config.mqtt, config.outbox, agent_id=config.agent.id, site=config.agent.site, version=__version__
            )
            events = self.publisher.publish_event
            on_event = _both(events, on_event) if on_event is not None else events
            on_batch = (
                _both(self.publisher.publish_telemetry, on_batch)
                if on_batch is not None
                else (self.publisher.publish_telemetry)
            )
            self._on_batch = on_batch
        self.monitors = [
            ModelMonitor(
                m,
                self.buffers,
                on_event or (lambda e: None),
                agent=config.agent.id,
                site=config.agent.site,
                counter=self.sequence,
                on_score=self._score_sink(m),
                on_score_seconds=self.metrics.score_seconds.labels(m.section.name).observe,
            )
            for m in models
        ]
        self.pollers: list[DevicePoller] = []
        for dev in config.devices:
            driver = REGISTRY[dev.type].build(dev)
            for group in driver.groups:
                self.buffers.register(group.tags, group.interval)
            for group in driver.subscriptions:
                self.buffers.register(group.tags, group.interval, hold=True)
            self.pollers.append(
                DevicePoller(
                    dev, driver, self._sink, on_read_seconds=self.metrics.poll_seconds.labels(dev.name).observe
                )
            )
        self.metrics.add(lambda: agent_metrics(self))
        # readiness: the config loaded (we exist) and at least one device answers; publishing adds its own
        self.ready_checks: list[Check] = [self._a_device_is_up]
        if self.publisher is not None:
            publisher = self.publisher
            self.ready_checks.append(
                lambda: (publisher.connected or publisher.outbox.is_open, "no broker and no outbox")
            )
            self.metrics.add(lambda: publisher_metrics(publisher))

    def _sink(self, batch: SampleBatch) -> None:
        self.buffers.write(batch)
        if self._on_batch is not None:
            self._on_batch(batch)

    def _score_sink(self, model: LoadedModel) -> Callable[[Score], None] | None:
        if self.publisher is None or self.config.mqtt is None or self.config.mqtt.scores_interval is None:
            return None
        publish, meta = self.publisher.publish_score, model.bundle.metadata
        return lambda score: publish(score, version=meta.version, sha256=model.bundle.sha256)

    def _a_device_is_up(self) -> tuple[bool, str]:
        up = [p.config.name for p in self.pollers if p.stats.connected]
        return bool(up), "no device answers" if not up else ""

    async def run(self, stop: asyncio.Event) -> None:
        """Poll every device until `stop` is set; raises DeviceStartupError for `on_startup_error: error`."""
        health = None
        if self.config.observe.listen:
            health = HealthServer(self.metrics, self.ready_checks)
            await health.start(self.config.observe.listen)
        try:
            if self.publisher is None:
                await self._run_stages(stop)
                return
            publisher = self.publisher
            await publisher.open()  # OutboxError: locked by another agent, or not writable
            self.sequence.start_after(publisher.last_seq)
            await publisher.close_open_anomalies(self.sequence)  # a previous run's open anomalies get their end
            async with asyncio.TaskGroup() as outer:
                outer.create_task(publisher.run(), name="mqtt")
                try:
                    # stages first: on stop the monitors close open anomalies, then the publisher flushes
                    await self._run_stages(stop)
                finally:
                    # give the broker a moment to take what is left (the shutdown ends above all); whatever
                    # it does not acknowledge in time stays in the outbox for the next start
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(DRAIN_ON_STOP if publisher.connected else 0.5):
                            await publisher.wait_drained()
                    publisher.stop()
        finally:
            if health is not None:
                await health.stop()

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
