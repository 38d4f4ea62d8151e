"""Per-device polling: aligned deadlines, overrun counting, timeouts, reconnect with backoff."""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edge_agent.backoff import backoff_delay
from edge_agent.drivers.base import DeviceBase, Driver, OnStartupError, ScanGroup
from edge_agent.errors import DeviceError, DeviceStartupError
from edge_agent.types import Quality, SampleBatch

log = logging.getLogger(__name__)
# a read that starts within this long after its deadline is stamped with the deadline (the scan time)
STAMP_SLACK = 0.05

Sink = Callable[[SampleBatch], None]


@dataclass(frozen=True, slots=True)
class PollerStats:
    """A snapshot of one device's poller: its counters and whether it is up."""

    device: str
    reads: int
    pushed: int
    failures: int
    overruns: int
    connected: bool
    down_since: float | None
    attempts: int
    last_read_s: float
    read_seconds: float
    driver: tuple[tuple[str, int], ...] = ()  # the driver's own counters (the MQTT input's malformed, dropped…)


@dataclass
class DeviceCounters:
    """Counters for one device, updated in place by its poller; others read `DevicePoller.stats()`."""

    reads: int = 0  # scan-group reads completed
    pushed: int = 0  # batches the device sent by itself (subscriptions)
    failures: int = 0  # reads or connects that failed at the connection level
    overruns: int = 0  # cycles skipped because the previous read ran late
    connected: bool = False  # up: answered since the last (re)connect, not merely accepted a connection
    down_since: float | None = None
    attempts: int = 0  # reconnect attempts in the current outage (drives the backoff)
    last_read_s: float = 0.0  # duration of the last scan-group read
    read_seconds: float = 0.0  # total time spent in reads

    def record_read(self, seconds: float) -> None:
        """Count one successful read."""
        self.reads += 1
        self.last_read_s = seconds
        self.read_seconds += seconds


def next_tick(now: float, interval: float) -> int:
    """The number k of the first deadline k × interval (on the epoch clock) strictly after `now`."""
    return math.floor(now / interval) + 1


class DevicePoller:
    """Polls one device's scan groups on their own intervals over one connection."""

    def __init__(
        self,
        config: DeviceBase,
        driver: Driver,
        sink: Sink,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        on_read_seconds: Callable[[float], None] | None = None,
    ) -> None:
        self.config = config
        self.driver = driver
        self.sink = sink
        self._counts = DeviceCounters()
        self._on_read_seconds = on_read_seconds
        self._clock = clock
        self._rng = rng or random.Random()

    def stats(self) -> PollerStats:
        """A snapshot of the counters (no I/O)."""
        c = self._counts
        return PollerStats(
            device=self.config.name,
            reads=c.reads,
            pushed=c.pushed,
            failures=c.failures,
            overruns=c.overruns,
            connected=c.connected,
            down_since=c.down_since,
            attempts=c.attempts,
            last_read_s=c.last_read_s,
            read_seconds=c.read_seconds,
            driver=tuple(self.driver.stats().items()),
        )

    async def run(self) -> None:
        """Connect, then poll until cancelled. Raises DeviceStartupError under `on_startup_error: error`."""
        try:
            if not await self._first_connect():
                return
            await self._poll_forever()
        finally:
            await self.driver.close()

    async def _first_connect(self) -> bool:
        policy = self.config.on_startup_error
        try:
            await self._connect()
        except DeviceError as exc:
            if policy is OnStartupError.ERROR:
                reason = str(exc).removeprefix(f"device {self.config.name}: ")
                raise DeviceStartupError(self.config.name, reason) from exc
            if policy is OnStartupError.IGNORE:
                log.error("%s; left out until restart (on_startup_error: ignore)", exc)
                self._counts.failures += 1
                self._emit_lost()  # consumers see the tags as unreachable, not merely absent
                return False
            self._went_down(exc)
            await self._reconnect()
        return True

    @property
    def _subscriptions(self) -> list[ScanGroup]:
        return self.driver.subscriptions

    async def _connect(self) -> None:
        await self.driver.connect()
        if self._subscriptions:
            await self.driver.subscribe(self._pushed)
            # creating the subscription took answers from the device, not just an accepted connection
            self._came_up()
        else:
            log.debug("device %s: connected; up once it answers a read", self.config.name)

    def _pushed(self, batch: SampleBatch) -> None:
        self._counts.pushed += 1
        self.sink(batch)

    async def _poll_forever(self) -> None:
        # deadlines are tick numbers k (deadline = k × interval): no float error accumulates over months
        groups = list(self.driver.groups)
        if self._subscriptions:
            # pushed data has no read to fail: probe the connection on its own schedule
            groups.append(ScanGroup(max(self.config.timeout, 1.0), ()))
        heap = self._schedule(groups)
        task = asyncio.current_task()
        while True:
            if task is not None and task.cancelling():
                raise asyncio.CancelledError  # a cancellation a library swallowed (see ModbusDriver.read)
            deadline, k, i = heap[0]
            group = groups[i]
            delay = deadline - self._clock()
            if delay > 0:
                await asyncio.sleep(delay)
            if not await (self._probe() if not group.tags else self._read(group, deadline)):
                await self._reconnect()
                heap = self._schedule(groups)
                continue
            now = self._clock()
            nxt = k + 1
            if nxt * group.interval <= now:
                missed = math.floor(now / group.interval) - k
                self._counts.overruns += missed
                nxt = k + missed + 1
            heapq.heapreplace(heap, (nxt * group.interval, nxt, i))

    def _schedule(self, groups: list[ScanGroup]) -> list[tuple[float, int, int]]:
        # ordered by deadline time; the tick number k is what the next deadline is computed from
        now = self._clock()
        ticks = [(next_tick(now, g.interval), i) for i, g in enumerate(groups)]
        heap = [(k * groups[i].interval, k, i) for k, i in ticks]
        heapq.heapify(heap)
        return heap

    async def _read(self, group: ScanGroup, deadline: float) -> bool:
        started = time.perf_counter()
        try:
            # the client's own timeout bounds each request; this bounds a stuck group as a whole
            async with asyncio.timeout(self.config.timeout * (1 + len(group.tags) // 50) + 1.0):
                batch = await self.driver.read(group)
        except (DeviceError, TimeoutError) as exc:
            self._went_down(exc if isinstance(exc, DeviceError) else DeviceError(self.config.name, "read timed out"))
            return False
        seconds = time.perf_counter() - started
        if not self._counts.connected:
            self._came_up()
        self._counts.record_read(seconds)
        if self._on_read_seconds is not None:
            self._on_read_seconds(seconds)
        if batch.times is None and 0.0 <= batch.ts - deadline <= min(STAMP_SLACK, group.interval / 4):
            # a scan's samples carry the scan's deadline: they land on the sample grid, so the window
            # ending at that deadline holds them (stamped a few ms after it, they would wait a whole hop)
            batch = dataclasses.replace(batch, ts=deadline)
        self.sink(batch)
        return True

    async def _probe(self) -> bool:
        try:
            async with asyncio.timeout(self.config.timeout + 1.0):
                await self.driver.check()
        except (DeviceError, TimeoutError) as exc:
            self._went_down(exc if isinstance(exc, DeviceError) else DeviceError(self.config.name, "no answer"))
            return False
        if not self._counts.connected:
            self._came_up()
        return True

    def _emit_lost(self) -> None:
        """Tell consumers every tag of the device is unreachable now."""
        ts = self._clock()
        for g in [*self.driver.groups, *self._subscriptions]:
            n = len(g.tags)
            self.sink(
                SampleBatch(
                    self.config.name, ts, g.tags, np.full(n, np.nan), np.full(n, Quality.COMMS_LOST, dtype=np.uint8)
                )
            )

    async def _reconnect(self) -> None:
        # the outage lasts until a read succeeds (see _came_up): a device that accepts connections but
        # never answers keeps the backoff growing instead of counting as back after every connect
        await self.driver.close()
        while True:
            s = self._counts
            delay = backoff_delay(s.attempts, self.config.backoff.initial, self.config.backoff.max, self._rng)
            s.attempts += 1
            await asyncio.sleep(delay)
            try:
                await self._connect()
            except DeviceError as exc:
                self._went_down(exc)
                await self.driver.close()
                continue
            return

    def _went_down(self, exc: DeviceError) -> None:
        self._counts.failures += 1
        if self._counts.connected or self._counts.down_since is None:
            # first failure of an outage: one line at WARNING, the rest at DEBUG; consumers told once
            log.warning("%s; retrying with backoff up to %gs", exc, self.config.backoff.max)
            self._counts.down_since = self._clock()
            self._counts.connected = False
            self._emit_lost()
        else:
            log.debug("%s (still down, attempt %d)", exc, self._counts.attempts)

    def _came_up(self) -> None:
        """The device answered after a (re)connect: the outage, if any, is over."""
        if self._counts.down_since is not None:
            down = self._clock() - self._counts.down_since
            log.info(
                "device %s: back after %.1fs and %d failed attempts", self.config.name, down, self._counts.attempts
            )
        else:
            log.info("device %s: connected", self.config.name)
        self._counts.connected = True
        self._counts.down_since = None
        self._counts.attempts = 0
