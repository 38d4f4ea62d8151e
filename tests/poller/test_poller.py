"""Poller scheduling and reconnect logic, against a fake driver (the protocol is covered by integration tests).

The async tests run in virtual time (helpers.in_virtual_time, the poller on the loop's clock): a 50 ms schedule
is exact however busy the machine is, so the counts and the grid below are not bets on a fast machine.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

import numpy as np
import pytest
from helpers import in_virtual_time

from edge_agent.config import parse_config
from edge_agent.drivers.base import ScanGroup
from edge_agent.errors import DeviceError
from edge_agent.poller import DevicePoller, backoff_delay, next_tick
from edge_agent.types import Quality, SampleBatch

CONFIG = """
devices:
  - name: fake
    type: modbus
    host: 127.0.0.1
    poll_interval: 50ms
    backoff: {initial: 10ms, max: 40ms}
    tags: [{name: a, address: "40001"}]
"""


class FakeDriver:
    """Reads take `delay` seconds; connect fails while `down` is set."""

    def __init__(self, delay: float = 0.0) -> None:
        self.name = "fake"
        self.groups = [ScanGroup(0.05, ("a",))]
        self.subscriptions: list[ScanGroup] = []
        self.delay = delay
        self.down = False
        self.connects = 0
        self.read_times: list[float] = []

    def stats(self) -> dict[str, int]:
        return {}

    async def connect(self) -> None:
        self.connects += 1
        if self.down:
            raise DeviceError(self.name, "refused")

    async def read(self, group: ScanGroup) -> SampleBatch:
        if self.down:
            raise DeviceError(self.name, "connection reset")
        self.read_times.append(asyncio.get_running_loop().time())
        await asyncio.sleep(self.delay)
        return SampleBatch(
            self.name, asyncio.get_running_loop().time(), group.tags, np.zeros(1), np.zeros(1, dtype=np.uint8)
        )

    async def close(self) -> None:
        pass


def test_deadlines_are_tick_numbers() -> None:
    assert next_tick(10.05, 0.1) == 101
    assert next_tick(10.0, 1.0) == 11
    # a year of 100 ms ticks: the deadline is computed, not accumulated, so it is still on the grid
    year = 3600 * 24 * 365.0
    k = next_tick(year + 0.03, 0.1)
    assert abs(k * 0.1 - (year + 0.1)) < 1e-6


def test_backoff_is_capped_and_jittered() -> None:
    rng = random.Random(1)
    delays = [backoff_delay(a, 0.5, 30.0, rng) for a in range(40)]
    assert all(0.25 <= d <= 30.0 for d in delays)
    assert max(delays[-10:]) <= 30.0 and min(delays[-10:]) >= 15.0
    assert len({round(d, 6) for d in delays[-10:]}) > 1  # jitter spreads reconnect storms


def loop_clock() -> Callable[[], float]:
    """The running loop's clock, which the poller then schedules on (virtual time under in_virtual_time)."""
    return asyncio.get_running_loop().time


async def poll_for(driver: FakeDriver, seconds: float) -> tuple[DevicePoller, list[SampleBatch]]:
    """Run a poller over `driver` for `seconds`; the poller and the batches it delivered."""
    batches: list[SampleBatch] = []
    poller = DevicePoller(parse_config(CONFIG).devices[0], driver, batches.append, clock=loop_clock())
    task = asyncio.create_task(poller.run())
    await asyncio.sleep(seconds)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return poller, batches


@in_virtual_time
async def test_reads_land_on_the_grid() -> None:
    driver = FakeDriver()
    await poll_for(driver, 0.6)
    # how far each read started from the nearest aligned deadline k × 50 ms, in intervals
    off_grid = [abs(t / 0.05 - round(t / 0.05)) for t in driver.read_times]
    assert len(off_grid) >= 8
    # started on each aligned deadline: all of them, since in virtual time nothing can delay one
    assert max(off_grid) < 1e-6, off_grid


@pytest.mark.parametrize(("delay", "on_grid"), [(0.0, True), (0.03, False)])
@in_virtual_time
async def test_a_scan_is_stamped_with_its_deadline_when_it_read_on_time(delay: float, on_grid: bool) -> None:
    _, batches = await poll_for(FakeDriver(delay=delay), 0.5)  # FakeDriver stamps a batch when its read ends
    assert len(batches) >= 4
    # on time: the scan's deadline exactly (the window ending there holds it); late: the read's own time
    exact = [abs(b.ts / 0.05 - round(b.ts / 0.05)) < 1e-6 for b in batches]
    assert (sum(exact) >= 0.8 * len(batches)) if on_grid else not any(exact)


@in_virtual_time
async def test_slow_reads_count_overruns_and_skip_cycles() -> None:
    driver = FakeDriver(delay=0.12)  # each read spans more than two intervals
    poller, _ = await poll_for(driver, 0.65)
    assert poller.stats().reads >= 3
    assert poller.stats().overruns >= 2 * (poller.stats().reads - 1)


@in_virtual_time
async def test_outage_then_recovery_reconnects_with_backoff() -> None:
    cfg = parse_config(CONFIG)
    driver = FakeDriver()
    batches: list[SampleBatch] = []
    poller = DevicePoller(cfg.devices[0], driver, batches.append, clock=loop_clock())
    task = asyncio.create_task(poller.run())
    await asyncio.sleep(0.2)
    driver.down = True
    await asyncio.sleep(0.3)
    assert not poller.stats().connected
    assert driver.connects >= 3  # kept retrying
    lost = [b for b in batches if b.quality[0] == 4]
    assert len(lost) == 1  # consumers are told once, not on every retry
    driver.down = False
    await asyncio.sleep(0.2)
    assert poller.stats().connected
    reads_before = poller.stats().reads
    await asyncio.sleep(0.2)
    assert poller.stats().reads > reads_before
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@in_virtual_time
async def test_groups_with_different_intervals_each_keep_their_rate() -> None:
    cfg = parse_config(CONFIG)
    driver = FakeDriver()
    driver.groups = [ScanGroup(0.05, ("a",)), ScanGroup(0.5, ("a",)), ScanGroup(10.0, ("a",))]
    seen: list[SampleBatch] = []
    poller = DevicePoller(cfg.devices[0], driver, seen.append, clock=loop_clock())
    task = asyncio.create_task(poller.run())
    await asyncio.sleep(1.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    # the 50 ms group is not held up behind the 10 s one
    assert 17 <= len(driver.read_times) <= 26


class SilentDriver(FakeDriver):
    """Accepts every connection, then never answers a read (a gateway whose serial device is dead)."""

    async def read(self, group: ScanGroup) -> SampleBatch:
        raise DeviceError(self.name, "no answer")


@in_virtual_time
async def test_connects_without_answers_are_one_outage_with_growing_backoff(caplog: pytest.LogCaptureFixture) -> None:
    driver = SilentDriver()
    batches: list[SampleBatch] = []
    poller = DevicePoller(
        parse_config(CONFIG).devices[0], driver, batches.append, rng=random.Random(3), clock=loop_clock()
    )
    task = asyncio.create_task(poller.run())
    attempts = []
    for _ in range(30):  # 0.6 s; the backoff (10 ms doubling, capped at 40 ms) reaches its cap
        await asyncio.sleep(0.02)
        attempts.append(poller.stats().attempts)
        assert not poller.stats().connected  # accepting a connection is not being up
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert attempts == sorted(attempts) and attempts[-1] >= 4 and driver.connects >= 4
    records = [r for r in caplog.records if r.name == "edge_agent.poller" and r.levelno >= logging.INFO]
    assert [r.levelno for r in records] == [logging.WARNING], [r.getMessage() for r in records]
    assert sum(b.quality[0] == Quality.COMMS_LOST for b in batches) == 1  # consumers told once


@pytest.mark.parametrize("policy", ["retry", "ignore"])
@in_virtual_time
async def test_down_at_startup_emits_comms_lost(policy: str) -> None:
    driver = FakeDriver()
    driver.down = True
    batches: list[SampleBatch] = []
    cfg = parse_config(CONFIG.replace("    tags:", f"    on_startup_error: {policy}\n    tags:")).devices[0]
    poller = DevicePoller(cfg, driver, batches.append, clock=loop_clock())
    task = asyncio.create_task(poller.run())
    await asyncio.sleep(0.15)
    assert [(b.tags, int(b.quality[0])) for b in batches] == [(("a",), Quality.COMMS_LOST)]
    assert task.done() is (policy == "ignore")
    driver.down = False
    await asyncio.sleep(0.2)
    assert bool(poller.stats().connected and batches[-1].quality[0] == Quality.GOOD) is (policy == "retry")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
