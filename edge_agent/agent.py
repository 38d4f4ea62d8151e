"""Wires the stages from a config and runs them under one TaskGroup until asked to stop.

Read top to bottom, this file is where a tag value goes:
drivers → pollers → buffers → scoring (monitors) → outbox → publish (the MQTT sink) → broker.
Each stage owns its state; the agent hands data forward through callbacks, and reads each stage's
frozen `stats()` for metrics and health. It never reaches into a stage's attributes.

Last, live reconfiguration: on SIGHUP (`request_reload`) or a changed file, `reload()` applies the
difference `reload.plan` finds, device by device and model by model, while everything else runs on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent import __version__
from edge_agent.buffers import Buffers, BuffersStats, Series
from edge_agent.config import Config, ConfigError, MqttSection
from edge_agent.drivers import REGISTRY, DeviceBase, Driver, DriverUnavailable
from edge_agent.errors import DeviceStartupError
from edge_agent.poller import DevicePoller, PollerStats
from edge_agent.reload import RESULTS, WATCH_INTERVAL, ConfigWatch, Plan, ReloadStats, plan
from edge_agent.reload import load as load_reloaded
from edge_agent.scoring.lifecycle import EventSequence, close_left_open
from edge_agent.scoring.monitor import LoadedModel, ModelMonitor, MonitorStats, load_models, retention_needed
from edge_agent.scoring.spacing import CHECK_EVERY, SpacingStats, SpacingWatch
from edge_agent.types import AnomalyEvent, Quality, SampleBatch, Score, Window

if TYPE_CHECKING:  # imported when used: an agent without MQTT or metrics loads neither paho nor prometheus
    from edge_agent.observe import Check, Metrics
    from edge_agent.outbox.writer import OutboxWriter, WriterStats
    from edge_agent.publish import Sink
    from edge_agent.publish.mqtt import Describe
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
    reloads: ReloadStats
    spacing: tuple[SpacingStats, ...] = ()  # per model: its tags' arrival against the bundle's sample_interval


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
        source: str | Path | None = None,
        watch_interval: float = WATCH_INTERVAL,
    ) -> None:
        self.config = config
        self.source = Path(source) if source is not None else None  # the file `reload()` reads again
        # Prometheus metrics only when they are served (observe.listen): latencies are observed live,
        # everything else is read from the stages' stats() at scrape time
        self.metrics: Metrics | None = None
        if config.observe.listen:
            from edge_agent.observe import Metrics

            self.metrics = Metrics()
        self._extra_batch, self._extra_event, self._extra_score = on_batch, on_event, on_score
        self._models = load_models(config) if models is None else models
        self._tasks: dict[str, asyncio.Task[None]] = {}  # poll:DEVICE, score:MODEL, mqtt → its task, while running
        self._tg: asyncio.TaskGroup | None = None  # the stages' group while running (a reload adds tasks to it)
        self._outer: asyncio.TaskGroup | None = None  # the outbox's and the sink's group, with MQTT

        # drivers and pollers: one poller per device, each handing its batches to _on_batch
        drivers = [REGISTRY[dev.type].build(dev) for dev in config.devices]
        self.pollers = [self._new_poller(dev, driver) for dev, driver in zip(config.devices, drivers, strict=True)]

        # buffers: one ring per tag, long enough for every model's window (pushed tags hold their last value)
        retention = max(config.buffers.retention, retention_needed(self._models))
        self.buffers = Buffers(retention=retention, max_samples=max(config.buffers.max_samples_per_tag, 16))
        for driver in drivers:
            self._register(driver)

        # scoring: one monitor per model reads windows from the buffers; its events go to _on_event
        self.sequence = EventSequence()  # continued after the outbox's last number at startup (run)
        self.monitors = [self._new_monitor(m) for m in self._models]
        self._spacing: dict[str, SpacingWatch] = {}  # by model name: tags far slower than sample_interval, said once
        self._spacing_due = -float("inf")

        # outbox and publish (with MQTT configured): every event, score and telemetry message is made
        # durable in the outbox first; the MQTT sink takes it from there and deletes it on the broker's ack
        self.outbox: OutboxWriter | None = None
        self.sink: Sink | None = None
        if config.mqtt is not None:
            from edge_agent.outbox.writer import OutboxWriter

            self.outbox = OutboxWriter(config.outbox, config.mqtt, agent_id=config.agent.id, site=config.agent.site)
            for dev in config.devices:
                self.outbox.set_device(dev.name, dev.telemetry_tags(), dev.report_integrity())
            self.sink = self._new_sink(config.mqtt)

        # observe: ready = a device answers (and, with MQTT, the broker or at least the outbox takes our
        # messages); metrics read every stage's stats() at scrape time
        self.ready_checks: list[Check] = [self._a_device_is_up]
        if self.outbox is not None:
            self.ready_checks.append(self._broker_or_outbox)
        if self.metrics is not None:
            self._collect_metrics(self.metrics)

        # live reconfiguration: reloads counted by result; the file watched for changes while running
        self._reloads = dict.fromkeys(RESULTS, 0)
        self._last_reload: str | None = None
        self._reload_lock = asyncio.Lock()
        self._hup = asyncio.Event()
        self.watch_interval = watch_interval  # 0: only SIGHUP (request_reload) reloads
        self._watch = ConfigWatch(self.source) if self.source is not None else None

    def _new_poller(self, dev: DeviceBase, driver: Driver) -> DevicePoller:
        read_seconds = self.metrics.poll_seconds.labels(dev.name).observe if self.metrics else None
        return DevicePoller(dev, driver, self._on_batch, on_read_seconds=read_seconds)

    def _register(self, driver: Driver, history: dict[str, Series] | None = None) -> None:
        for group in driver.groups:
            self.buffers.register(group.tags, group.interval, history=history)
        for group in driver.subscriptions:
            self.buffers.register(group.tags, group.interval, hold=True, history=history)

    def _new_monitor(self, m: LoadedModel) -> ModelMonitor:
        return ModelMonitor(
            m,
            self.buffers,
            self._on_event,
            agent=self.config.agent.id,
            site=self.config.agent.site,
            counter=self.sequence,
            on_score=self._score_sink(m),
            on_score_seconds=self.metrics.score_seconds.labels(m.section.name).observe if self.metrics else None,
        )

    def _new_sink(
        self, mqtt: MqttSection, config: Config | None = None, models: list[LoadedModel] | None = None
    ) -> Sink:
        """The sink for `mqtt.payloads`: the JSON publisher, the Sparkplug B edge node, or both (for `config` and
        `models`: a reload's, before they are the agent's)."""
        from edge_agent.publish import build_sink

        assert self.outbox is not None
        config = config or self.config
        models = self._models if models is None else models
        agent = config.agent
        return build_sink(
            mqtt,
            self.outbox,
            agent_id=agent.id,
            site=agent.site,
            version=__version__,
            describe=self._describe,
            devices=config.devices,  # Sparkplug births: every tag with its type, unit and description
            models=[m.section.name for m in models],
        )

    def _collect_metrics(self, metrics: Metrics) -> None:
        from edge_agent.observe import device_metrics, model_metrics, outbox_metrics, publisher_metrics, reload_metrics
        from edge_agent.publish import sink_stats

        metrics.add(lambda: device_metrics(p.stats() for p in self.pollers))
        metrics.add(lambda: model_metrics(m.stats() for m in self.monitors))
        metrics.add(lambda: reload_metrics(self._reloads))
        if self.outbox is not None:
            outbox = self.outbox
            metrics.add(lambda: publisher_metrics(sink_stats(self.sink)) if self.sink is not None else ())
            metrics.add(lambda: outbox_metrics(outbox.stats()))

    # ------------------------------------------------------------ where data goes between stages

    def _on_batch(self, batch: SampleBatch) -> None:
        """A poller's batch: into the buffers, then telemetry (when configured) and any extra consumer."""
        self.buffers.write(batch)
        if batch.ts >= self._spacing_due:
            # until every model's tags could be measured (three samples each), again a second later
            self._spacing_due = batch.ts + (CHECK_EVERY if self._check_spacing() else 1.0)
        if self.outbox is not None:
            self.outbox.put_telemetry(batch)
        if self._extra_batch is not None:
            self._extra_batch(batch)

    def _check_spacing(self) -> bool:
        """Each model's polled tags against its bundle's sample_interval (a reload may have replaced models); False
        while some model's tags have too few samples to tell."""
        watches, measured = {}, True
        for m in self.monitors:
            w = self._spacing.get(m.name)
            if w is None or (w.inputs, w.expected) != (m.inputs, m.interval):
                w = SpacingWatch(m.name, m.inputs, m.interval)
            spacings = self.buffers.spacing(m.inputs)
            measured = measured and bool(spacings)
            w.update(spacings)
            watches[m.name] = w
        self._spacing = watches
        return measured

    def _on_event(self, event: AnomalyEvent) -> None:
        """An anomaly event: into the outbox (when MQTT is configured) and to any extra consumer."""
        if self.outbox is not None:
            self.outbox.put_event(event)
        if self._extra_event is not None:
            self._extra_event(event)

    def _score_sink(self, model: LoadedModel) -> Callable[[Score], None] | None:
        """Where a model's scores go: the scores topic (the outbox sends them when scores_interval is set, which
        a reload may change) and any extra consumer."""
        extra = self._extra_score
        if self.config.mqtt is None and extra is None:
            return None
        version, sha256 = model.bundle.metadata.version, model.bundle.sha256

        def put(score: Score) -> None:
            if self.outbox is not None:
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
            reloads=ReloadStats(**self._reloads, last=self._last_reload, config_sha256=self.config.sha256),
            spacing=tuple(w.stats() for w in self._spacing.values()),
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

    def _broker_or_outbox(self) -> tuple[bool, str]:
        ok = (self.sink is not None and self.sink.connected) or (self.outbox is not None and self.outbox.is_open)
        return ok, "no broker and no outbox"

    def _describe(self) -> Describe:
        """What the status topic says the agent runs: the config file's sha256, each model's bundle sha256."""
        return {"config_sha256": self.config.sha256, "models": {m.name: m.stats().bundle_sha256 for m in self.monitors}}

    # ------------------------------------------------------------ running

    async def run(self, stop: asyncio.Event) -> None:
        """Poll every device until `stop` is set; raises DeviceStartupError for `on_startup_error: error`."""
        health = None
        if self.config.observe.listen and self.metrics is not None:
            from edge_agent.observe import HealthServer

            health = HealthServer(self.metrics, self.ready_checks)
            await health.start(self.config.observe.listen)
        try:
            if self.outbox is None:
                await self._run_stages(stop)
                return
            await self._run_with_outbox(self.outbox, stop)
        finally:
            if health is not None:
                await health.stop()

    async def _run_with_outbox(self, outbox: OutboxWriter, stop: asyncio.Event) -> None:
        # what earlier runs left (OutboxBusy: locked by another agent; a file that cannot be opened or
        # written, e.g. on a full disk, is one warning: the outbox runs on its memory queue and retries):
        # the event sequence continues after the last number written, and anomalies left open get their end
        start = await outbox.open()
        try:
            self.sequence.start_after(start.last_seq)
            for end in close_left_open(start.open_anomalies, self.sequence, t=time.time()):
                outbox.put_event(end)
            await outbox.flush()
            # the outbox's writer runs for the whole run; the sink beside it may be replaced (an mqtt reload)
            async with asyncio.TaskGroup() as outer:
                self._outer = outer
                writer = outer.create_task(outbox.run(), name="outbox")
                self._start("mqtt", outer, self._run_sink())
                try:
                    # stages first: on stop the monitors close open anomalies, then the outbox and sink flush
                    await self._run_stages(stop)
                finally:
                    # give the broker a moment to take what is left (the shutdown ends above all); whatever
                    # it does not acknowledge in time stays in the outbox for the next start
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(DRAIN_ON_STOP if self._sink.connected else 0.5):
                            await self._sink.wait_drained()
                    await self._stop_sink("shutdown")
                    writer.cancel()
        finally:
            self._outer = None
            await outbox.close()  # writes what producers queued meanwhile, so nothing submitted is lost

    @property
    def _sink(self) -> Sink:
        assert self.sink is not None
        return self.sink

    async def _run_sink(self) -> None:
        await self._sink.run()

    async def _stop_sink(self, reason: str) -> None:
        self._sink.stop(reason)  # it ends by itself: acks awaited (bounded), offline status, rows given back
        await self._wait_ended(["mqtt"], cancel=False)

    async def _run_stages(self, stop: asyncio.Event) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for poller in self.pollers:
                    self._start(f"poll:{poller.config.name}", tg, self._supervise(poller, at_startup=True))
                for monitor in self.monitors:
                    self._start(f"score:{monitor.name}", tg, monitor.run())
                if self._watch is not None:
                    tg.create_task(self._watch_file(self._watch), name="watch")
                tg.create_task(self._wait(stop), name="stop")
        except* _Stop:
            log.info("stopped")
        finally:
            self._tg = None

    def _start(self, key: str, group: asyncio.TaskGroup, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks[key] = group.create_task(coro, name=key)

    async def _wait_ended(self, keys: Iterable[str], *, cancel: bool = True) -> None:
        """Cancel these tasks (unless they were asked to stop otherwise) and wait until they are over."""
        tasks = [t for t in (self._tasks.pop(k, None) for k in keys) if t is not None]
        for task in tasks if cancel else ():
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)  # their outcome is theirs: a cancelled poller is no error of ours

    async def _wait(self, stop: asyncio.Event) -> None:
        await stop.wait()
        raise _Stop

    async def _supervise(self, poller: DevicePoller, *, at_startup: bool) -> None:
        """Keep one device's poller alive: a bug in one device's path must not stop the others."""
        while True:
            try:
                await poller.run()
                return  # left out by on_startup_error: ignore
            except DeviceStartupError as exc:
                if at_startup:
                    raise
                # a device a reload added: the agent is running, so `error` cannot mean "do not start"
                log.error("%s; left out until the next reload or restart (on_startup_error: error)", exc)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("device %s: poller crashed; restarting in %.0fs", poller.config.name, RESTART_DELAY)
                await asyncio.sleep(RESTART_DELAY)

    # ------------------------------------------------------------ live reconfiguration

    def request_reload(self) -> None:
        """Reload as soon as possible (SIGHUP: `edge-agent run` installs this as the handler)."""
        self._hup.set()

    async def reload(self) -> str:
        """Read the config file again and apply what changed; returns the result: ok, invalid or failed.

        invalid: the file does not validate (each FILE:LINE problem logged); failed: it is valid but cannot be
        applied live (why, logged). Either way the agent runs on with what it ran before.
        """
        async with self._reload_lock:
            try:
                result = await self._reload()
            except Exception:  # a bug: the agent runs on, loudly (the watch task must not take it down)
                log.exception("%s: the reload failed; restart the agent to run the file as a whole", self.source)
                result = "failed"
        self._reloads[result] += 1
        self._last_reload = result
        return result

    async def _watch_file(self, watch: ConfigWatch) -> None:
        """Reload on request at once, and when the file (or a bundle it names) changed, looked at every interval."""
        await asyncio.to_thread(watch.look, self._bundle_files())
        if self.watch_interval and watch.sha256 != self.config.sha256:
            self.request_reload()  # the file changed between loading it and starting
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._hup.wait(), self.watch_interval or None)
            asked = self._hup.is_set()
            self._hup.clear()
            changed = False
            if not asked and self.watch_interval:
                async with self._reload_lock:  # one look at a time: reload() looks too
                    changed = await asyncio.to_thread(watch.look, self._bundle_files())
            if asked or changed:
                await self.reload()

    def _bundle_files(self) -> list[Path]:
        return [m.section.file for m in self._models]

    async def _reload(self) -> str:
        path, old = self.source, self.config
        if path is None:
            log.error("reload: this agent was not started from a config file; nothing to read again")
            return "failed"
        if self._watch is not None:  # what this reload reads is what the watch has seen
            await asyncio.to_thread(self._watch.look, self._bundle_files())
        try:
            new, models, bundles = await asyncio.to_thread(load_reloaded, path)
        except ConfigError as exc:
            for issue in exc.issues:
                log.error("%s", issue)
            n = len(exc.issues)
            log.error(
                "%s: %d error%s; still running the previous config (sha256 %.12s…)",
                path,
                n,
                "s" if n != 1 else "",
                old.sha256,
            )
            return "invalid"
        change = plan(old, self._models, new, models)
        problems = [str(issue) for issue in change.refused]
        try:
            drivers = {d.name: REGISTRY[d.type].build(d) for d in new.devices if d.name in change.devices_started}
        except DriverUnavailable as exc:
            problems.append(f"{path}: {exc}")
        if change.mqtt and new.mqtt is not None:
            problems += await asyncio.to_thread(_tls_problems, new, new.mqtt)
        if problems:
            for problem in problems:
                log.error("%s", problem)
            log.error("%s: not applied; still running the previous config (sha256 %.12s…)", path, old.sha256)
            return "failed"
        await self._apply(new, models, change, drivers)  # raises only on a bug (reload() logs it)
        self.config, self._models = new, models
        if self._watch is not None:
            self._watch.loaded(bundles)
        if self.sink is not None:
            self.sink.refresh_status()
        log.info("%s: reloaded (sha256 %.12s…): %s", path, new.sha256, change.describe())
        return "ok"

    async def _apply(self, new: Config, models: list[LoadedModel], change: Plan, drivers: dict[str, Driver]) -> None:
        """Stop what goes, then swap buffers and tasks in one step between two windows, then the sink."""
        # devices that restart or go: their pollers end and close their connections; the others poll on
        stopping = [p for p in self.pollers if p.config.name in change.devices_stopped]
        await self._wait_ended(f"poll:{p.config.name}" for p in stopping)
        # models replaced or removed: an open anomaly ends now (reason reconfigured), then the monitor
        retiring = [m for m in self.monitors if m.name in change.models_stopped]
        for monitor in retiring:
            monitor.close("reconfigured")
        await self._wait_ended(f"score:{m.name}" for m in retiring)

        # from here to the sink, no await: the running monitors never see a tag missing from the buffers
        history: dict[str, Series] = {}
        for poller in stopping:
            name = poller.config.name
            dropped = self.buffers.unregister([t.name for t in poller.config.tags])
            history.update((t, s) for t, s in dropped.items() if t in change.carry.get(name, ()))
            if self.outbox is not None:
                self.outbox.forget_device(name)
            if self.metrics is not None:
                with contextlib.suppress(KeyError):
                    self.metrics.poll_seconds.remove(name)
        if self.metrics is not None:
            for name in change.models_stopped:
                with contextlib.suppress(KeyError):
                    self.metrics.score_seconds.remove(name)
        self.buffers.grow(max(new.buffers.retention, retention_needed(models)), new.buffers.max_samples_per_tag)
        pollers = {p.config.name: p for p in self.pollers if p not in stopping}
        for dev in new.devices:
            if dev.name in drivers:
                self._register(drivers[dev.name], history)
                pollers[dev.name] = poller = self._new_poller(dev, drivers[dev.name])
                if self.outbox is not None:
                    self.outbox.set_device(dev.name, dev.telemetry_tags(), dev.report_integrity())
                if self._tg is not None:
                    self._start(f"poll:{dev.name}", self._tg, self._supervise(poller, at_startup=False))
        self.pollers = [pollers[d.name] for d in new.devices]
        monitors = {m.name: m for m in self.monitors if m not in retiring}
        for m in models:
            if m.section.name in change.models_started:
                monitors[m.section.name] = monitor = self._new_monitor(m)
                if self._tg is not None:
                    self._start(f"score:{monitor.name}", self._tg, monitor.run())
        self.monitors = [monitors[m.section.name] for m in models]

        # the sink: the outbox stays open and keeps taking messages; rows in flight go back to it
        if self.outbox is not None and change.outbox:
            await self.outbox.set_bounds(new.outbox)
        # a Sparkplug node announces devices and models in its births: it is born again with the new ones
        births = new.mqtt is not None and "sparkplug" in new.mqtt.payloads
        reborn = births and bool(
            change.devices_started or change.devices_removed or change.models_stopped or change.models_added
        )
        if self.outbox is not None and (change.mqtt or reborn) and new.mqtt is not None:
            self.outbox.set_mqtt(new.mqtt)
            if "mqtt" in self._tasks:
                await self._stop_sink("reconfigured")
            # after the old sinks gave their rows back: rows only for a sink that goes now wait for the new ones
            await self.outbox.set_sinks(list(new.mqtt.payloads))
            self.sink = self._new_sink(new.mqtt, new, models)
            if self._outer is not None:
                self._start("mqtt", self._outer, self._run_sink())


def _tls_problems(cfg: Config, mqtt: MqttSection) -> list[str]:
    """The new broker settings' TLS files, read now: a sink that cannot start is not swapped in."""
    from edge_agent.publish import tls_problems

    return [f"{cfg.where('mqtt', 'tls', field).source}: mqtt.tls.{field}: {msg}" for field, msg in tls_problems(mqtt)]
