"""Wires the stages from a config and runs them under one TaskGroup until asked to stop."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable

from edge_agent.buffers import Buffers
from edge_agent.config import Config
from edge_agent.drivers import REGISTRY
from edge_agent.errors import DeviceStartupError
from edge_agent.observe import Check, HealthServer, Metrics, agent_metrics
from edge_agent.poller import DevicePoller
from edge_agent.scoring.monitor import LoadedModel, ModelMonitor, load_models, retention_needed
from edge_agent.types import AnomalyEvent, SampleBatch

log = logging.getLogger(__name__)

RESTART_DELAY = 5.0  # after a poller crashed on a bug, not on a device fault


class _Stop(Exception):
    """Raised inside the TaskGroup to cancel every task on shutdown."""


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
        counter = itertools.count(1)  # one event sequence per agent
        self.monitors = [
            ModelMonitor(
                m,
                self.buffers,
                on_event or (lambda e: None),
                agent=config.agent.id,
                site=config.agent.site,
                counter=counter,
                on_score_seconds=self.metrics.score_seconds.labels(m.section.name).observe,
            )
            for m in models
        ]
        self.pollers: list[DevicePoller] = []
        for dev in config.devices:
            driver = REGISTRY[dev.type].factory(dev)
            for group in driver.groups:
                self.buffers.register(group.tags, group.interval)
            for group in getattr(driver, "subscriptions", []):
                self.buffers.register(group.tags, group.interval, hold=True)
            self.pollers.append(
                DevicePoller(
                    dev, driver, self._sink, on_read_seconds=self.metrics.poll_seconds.labels(dev.name).observe
                )
            )
        self.metrics.add(lambda: agent_metrics(self))
        # readiness: the config loaded (we exist) and at least one device answers; publishing adds its own
        self.ready_checks: list[Check] = [self._a_device_is_up]

    def _sink(self, batch: SampleBatch) -> None:
        self.buffers.write(batch)
        if self._on_batch is not None:
            self._on_batch(batch)

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
            async with asyncio.TaskGroup() as tg:
                for poller in self.pollers:
                    tg.create_task(self._supervise(poller), name=f"poll:{poller.config.name}")
                for monitor in self.monitors:
                    tg.create_task(monitor.run(), name=f"score:{monitor.name}")
                tg.create_task(self._wait(stop), name="stop")
        except* _Stop:
            log.info("stopped")
        finally:
            if health is not None:
                await health.stop()

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
