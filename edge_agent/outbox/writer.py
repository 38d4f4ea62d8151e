"""The outbox stage: takes events, scores and telemetry from the stages before it and makes them durable.

Threads and who owns what:
- the event loop: producers call `put_event` / `put_score` / `put_telemetry` (cheap, non-blocking: the
  record is encoded and queued in memory); the writer task commits the queue in batches;
- one worker thread, owned here: every SQLite call (nothing blocking runs on the loop). Sinks take,
  acknowledge and give back rows through this class, so that thread stays the only one touching the file.

The memory queue is bounded (MAX_PENDING): when the disk cannot keep up, new messages are dropped and
counted (reason `memory`), never held without bound. Rates are on a grid (slot k = floor(t / interval)):
one scores or telemetry message per interval, not one per interval plus a poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from edge_agent.config import MqttSection, OutboxSection
from edge_agent.outbox.rows import Entry, Kind, OutboxError, OutboxStats, Row
from edge_agent.outbox.store import Outbox
from edge_agent.records import encode, event_payload, score_payload, telemetry_payload
from edge_agent.types import AnomalyEvent, EventType, OpenAnomaly, SampleBatch, Score

log = logging.getLogger("edge_agent.outbox")

T = TypeVar("T")

MAX_PENDING = 20_000  # messages waiting in memory for the writer; beyond, new ones are dropped and counted
RETRY_DB = 1.0  # seconds before retrying a failed write
EXPIRE_EVERY = 60.0  # seconds between max_age sweeps


def topic_level(name: str) -> str:
    """A name made safe as one topic level (wildcards and separators replaced by _)."""
    cleaned = "".join("_" if c in "+#/\0" else c for c in name)
    return cleaned or "_"


@dataclass(frozen=True, slots=True)
class StartState:
    """What the outbox remembers from earlier runs, handed to scoring at startup as plain data."""

    last_seq: int  # the highest event sequence number ever written
    open_anomalies: list[OpenAnomaly]  # starts whose end was never written (the agent died in between)


@dataclass(frozen=True, slots=True)
class WriterStats:
    """A snapshot of the outbox stage: what producers submitted, what waits in memory, and the file's stats."""

    submitted: int
    pending: int
    dropped_memory: int  # not yet written into the file's counters
    oldest: float | None  # creation time of the oldest stored message (refreshed by housekeeping)
    outbox: OutboxStats | None  # None while the file is not open


class OutboxWriter:
    """The outbox stage: the producers' API, the one SQLite thread, batched commits, expiry; sinks take rows here."""

    def __init__(
        self,
        outbox: OutboxSection | Outbox,
        mqtt: MqttSection,
        *,
        agent_id: str,
        site: str = "default",
        sync: str | None = None,
        commit_interval: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(outbox, Outbox):
            self.outbox = outbox
            sync = sync or "full"
            commit_interval = commit_interval if commit_interval is not None else 0.2
        else:
            self.outbox = Outbox.from_section(outbox)
            sync = sync or outbox.sync
            commit_interval = commit_interval if commit_interval is not None else outbox.commit_interval
        self.mqtt = mqtt
        self.batched = sync == "batched"
        self.commit_interval = commit_interval
        self.agent_id, self.site = agent_id, site
        self._prefix = mqtt.prefix
        self._clock = clock
        self.submitted = 0
        self._pending: list[Entry] = []
        self._dropped_mem: dict[Kind, int] = {}
        self._done = 0  # entries written (or dropped) so far
        self._commit_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.oldest: float | None = None
        self._score_slot: dict[str, int] = {}
        self._telemetry_slot: dict[str, int] = {}
        self._telemetry: dict[str, dict[str, tuple[SampleBatch, int]]] = {}  # device → tag → (batch, column)
        self._exec: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = False
        self._wake_writer = asyncio.Event()
        self._on_commit: list[Callable[[], None]] = []  # sinks' wake-ups: new rows are there to take

    def __repr__(self) -> str:
        return f"OutboxWriter({self.outbox!r})"

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> StartState:
        """Open the file in the worker thread (OutboxError: locked by another agent, or not writable)."""
        if self._exec is None:
            self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox")
        self._loop = asyncio.get_running_loop()
        if not self.outbox.is_open:
            try:
                await self.db(self.outbox.open)
            except BaseException:
                self._exec.shutdown(wait=False)
                self._exec = None
                raise
        if self._pending:
            self._wake_writer.set()
        return StartState(self.outbox.last_seq, await self.db(self.outbox.open_anomalies))

    @property
    def path(self) -> Path:
        """The outbox file."""
        return self.outbox.path

    @property
    def is_open(self) -> bool:
        """The file is open."""
        return self.outbox.is_open

    def on_commit(self, wake: Callable[[], None]) -> None:
        """Call `wake` (on the event loop) after every commit: new rows are there to take (asked twice: once)."""
        if wake not in self._on_commit:
            self._on_commit.append(wake)

    def off_commit(self, wake: Callable[[], None]) -> None:
        """Stop calling `wake` (a sink that stopped for good)."""
        if wake in self._on_commit:
            self._on_commit.remove(wake)

    # ------------------------------------------------------------ live reconfiguration (the file stays)

    def set_mqtt(self, mqtt: MqttSection) -> None:
        """Topics, QoS and rates of messages submitted from now on; what is stored keeps its topic."""
        self.mqtt, self._prefix = mqtt, mqtt.prefix

    async def set_bounds(self, section: OutboxSection) -> None:
        """Bounds, policy and commit rhythm of `section` from now on (its path is not this method's to change)."""

        def apply() -> None:
            self.outbox.max_bytes, self.outbox.max_age = int(section.max_bytes), float(section.max_age)
            self.outbox.when_full = section.when_full

        if self._exec is not None:
            await self.db(apply)  # the store reads them on its thread
        else:
            apply()
        self.batched, self.commit_interval = section.sync == "batched", section.commit_interval

    def forget_device(self, device: str) -> None:
        """Drop what telemetry remembers of a device (it stopped or restarts with other tags)."""
        self._telemetry.pop(device, None)
        self._telemetry_slot.pop(device, None)

    async def run(self) -> None:
        """Write queued messages in batches (one fsynced transaction each) and sweep expired rows, until cancelled."""
        self._running = True
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._writer(), name="outbox:write")
                tg.create_task(self._housekeeping(), name="outbox:expire")
        finally:
            self._running = False

    async def close(self) -> None:
        """Write what is pending (if the disk lets us), close the file and the worker thread."""
        with contextlib.suppress(OSError, OutboxError, sqlite3.Error):
            await self._write_pending()
        for _, fut in self._commit_waiters:
            if not fut.done():
                fut.cancel()
        self._commit_waiters = []
        if self._exec is not None:
            with contextlib.suppress(OSError, sqlite3.Error):
                await self.db(self.outbox.close)
            self._exec.shutdown(wait=False)
            self._exec = None

    # ------------------------------------------------------------ producers (event loop, non-blocking)

    def put_event(self, event: AnomalyEvent) -> None:
        """Queue an anomaly event for `{prefix}/events/{model}`."""
        topic = f"{self._prefix}/events/{topic_level(event.model)}"
        payload = encode(event_payload(event))
        # the record itself is what scoring needs to write the end of an open anomaly after a crash
        opens = (event.model, event.anomaly_id, payload) if event.type is EventType.START else None
        closes = (event.model, event.anomaly_id) if event.type is EventType.END else None
        self._submit(Entry(topic, payload, Kind.EVENT, self.mqtt.qos, None, event.seq, opens, closes))

    def put_score(self, score: Score, *, version: str | None = None, sha256: str | None = None) -> None:
        """Queue a model's score for `{prefix}/scores/{model}`, once per scores_interval (off when unset)."""
        interval = self.mqtt.scores_interval
        if interval is None or not self._new_slot(self._score_slot, score.model, interval):
            return
        payload = score_payload(score, agent=self.agent_id, site=self.site, version=version, sha256=sha256)
        topic = f"{self._prefix}/scores/{topic_level(score.model)}"
        self._submit(Entry(topic, encode(payload), Kind.SCORE, self.mqtt.scores_qos))

    def put_telemetry(self, batch: SampleBatch) -> None:
        """Queue a device's latest values of all its tags for `{prefix}/telemetry/{device}`, once per
        telemetry_interval (off when unset); every scan group and subscription of the device is merged."""
        interval = self.mqtt.telemetry_interval
        if interval is None:
            return
        latest = self._telemetry.setdefault(batch.device, {})
        # remember which batch carried each tag last: one C-level dict update, no Python loop per tag
        latest.update(zip(batch.tags, zip(itertools.repeat(batch), range(len(batch.tags)), strict=False), strict=True))
        if not self._new_slot(self._telemetry_slot, batch.device, interval):
            return
        payload = telemetry_payload(batch.device, latest, agent=self.agent_id, site=self.site, ts=batch.ts)
        topic = f"{self._prefix}/telemetry/{topic_level(batch.device)}"
        self._submit(Entry(topic, encode(payload), Kind.TELEMETRY, self.mqtt.telemetry_qos))

    def _new_slot(self, slots: dict[str, int], key: str, interval: float) -> bool:
        slot = math.floor(self._clock() / interval)
        if slots.get(key) == slot:
            return False
        slots[key] = slot
        return True

    def _submit(self, entry: Entry) -> None:
        self.submitted += 1
        if len(self._pending) >= MAX_PENDING:
            # the disk is not keeping up: count the drop rather than grow without bound
            self._dropped_mem[entry.kind] = self._dropped_mem.get(entry.kind, 0) + 1
            self._done += 1
            return
        self._pending.append(entry)
        self._wake_writer.set()

    async def flush(self) -> None:
        """Wait until every message submitted so far is in the file (committed, or counted as dropped)."""
        target = self.submitted
        if self._done >= target:
            return
        if not self._running:  # before run(): write it now (the restart bookkeeping does this)
            await self._write_pending()
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._commit_waiters.append((target, fut))
        self._wake_writer.set()
        await fut

    @property
    def pending(self) -> int:
        """Messages waiting in memory for the next commit."""
        return len(self._pending)

    # ------------------------------------------------------------ what sinks call

    async def take(self, n: int) -> list[Row]:
        """Up to `n` rows to publish, events first; they stay stored until ack()."""
        return await self.db(self.outbox.take, n)

    async def ack(self, ids: list[int], *, rejected: bool = False) -> None:
        """Delete rows the broker acknowledged (or, `rejected`, refused for good: counted as dropped)."""
        await self.db(self.outbox.ack, ids, rejected=rejected)

    async def release(self, ids: list[int] | None) -> None:
        """Give rows back unacknowledged (None: every row taken): the next take() starts from the oldest again."""
        await self.db(self.outbox.release, ids)

    @property
    def run_id(self) -> int:
        """This run's number: rows of earlier runs are delivered after a restart."""
        return self.outbox.run

    @property
    def depth(self) -> int:
        """Messages stored (from memory; no I/O)."""
        return sum(self.outbox.depth.values())

    # ------------------------------------------------------------ stats

    def stats(self) -> WriterStats:
        """A snapshot from memory (no I/O): safe on the event loop."""
        return WriterStats(
            submitted=self.submitted,
            pending=len(self._pending),
            dropped_memory=sum(self._dropped_mem.values()),
            oldest=self.oldest,
            outbox=self.outbox.quick_stats() if self.outbox.is_open else None,
        )

    def status_summary(self) -> dict[str, Any]:
        """The outbox part of the status payload: depth, bytes, drops (from memory; no I/O)."""
        s = self.outbox.quick_stats().as_dict()
        s["dropped_by_reason"]["memory"] += sum(self._dropped_mem.values())
        s.pop("path", None)
        s["oldest"] = None
        return s

    # ------------------------------------------------------------ tasks

    async def _writer(self) -> None:
        wake = self._wake_writer
        failing = False
        while True:
            await wake.wait()
            if self.batched:
                await asyncio.sleep(self.commit_interval)
            wake.clear()
            try:
                await self._write_pending()
            except (OSError, OutboxError, sqlite3.Error) as exc:
                if not failing:
                    log.error(
                        "outbox %s: cannot write (%s); keeping messages in memory, retrying", self.outbox.path, exc
                    )
                failing = True
                await asyncio.sleep(RETRY_DB)
                wake.set()
                continue
            if failing:
                log.info("outbox %s: writing again", self.outbox.path)
                failing = False

    async def _write_pending(self) -> None:
        if not self._pending and not self._dropped_mem:
            self._resolve_waiters()
            return
        batch, self._pending = self._pending, []
        dropped, self._dropped_mem = self._dropped_mem, {}
        try:
            await self.db(self.outbox.put, batch, dropped_in_memory=dropped)
        except BaseException:
            self._pending[:0] = batch
            for k, n in dropped.items():
                self._dropped_mem[k] = self._dropped_mem.get(k, 0) + n
            raise
        self._done += len(batch)
        self._resolve_waiters()
        self._committed()

    def _committed(self) -> None:
        for wake in self._on_commit:
            wake()

    def _resolve_waiters(self) -> None:
        keep = []
        for target, fut in self._commit_waiters:
            if self._done >= target:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((target, fut))
        self._commit_waiters = keep

    async def _housekeeping(self) -> None:
        """Drop rows past max_age; refresh the oldest message's time for the metrics."""
        last_expire = 0.0
        while True:
            if time.monotonic() - last_expire >= min(EXPIRE_EVERY, self.outbox.max_age / 10):
                last_expire = time.monotonic()
                try:
                    if await self.db(self.outbox.expire):
                        log.warning("outbox: dropped messages older than %gs", self.outbox.max_age)
                except (OSError, OutboxError, sqlite3.Error) as exc:
                    log.error("outbox %s: expiry failed (%s)", self.outbox.path, exc)
            try:
                # the oldest stored message needs a query: refreshed here, read by the metrics at scrape time
                self.oldest = (await self.db(self.outbox.stats)).oldest
            except (OSError, OutboxError, sqlite3.Error) as exc:
                log.debug("outbox %s: stats failed (%s)", self.outbox.path, exc)
            await asyncio.sleep(self.mqtt.status_interval)

    async def db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run an outbox call in the worker thread."""
        if self._exec is None:
            raise OutboxError("the outbox is not open")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._exec, lambda: fn(*args, **kwargs))
