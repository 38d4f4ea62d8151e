"""The outbox stage: takes events, scores and telemetry from the stages before it and makes them durable.

Threads and who owns what:
- the event loop: producers call `put_event` / `put_score` / `put_telemetry` (cheap, non-blocking: the
  record is encoded and queued in memory); the writer task commits the queue in batches;
- one worker thread, owned here: every SQLite call (nothing blocking runs on the loop). Sinks take,
  acknowledge and give back rows through this class, so that thread stays the only one touching the file.

The memory queue (`memory.MemoryQueue`) is bounded (`max_pending`, MAX_PENDING by default): when the disk
cannot keep up, messages are dropped by the `when_full` policy and counted (reason `memory`), never held
without bound. When the file cannot be written (disk full) or opened, messages stay there and every sink
takes them from there while the file has nothing to give, so a connected broker still gets them (what a sink
acked is not owed to it again when the file takes the rest); the writer
retries every RETRY_DB and writes to the file again by itself once it can (one log line each way).
Rates are on a grid (slot k = floor(t / interval)): one scores or telemetry message per interval, not one
per interval plus a poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from edge_agent.config import MqttSection, OutboxSection
from edge_agent.outbox.disk import describe
from edge_agent.outbox.memory import MemoryQueue
from edge_agent.outbox.rows import (
    SINK_BITS,
    Entry,
    Kind,
    OutboxBusy,
    OutboxError,
    Row,
    StartState,
    WriterStats,
    counter_names,
    sink_mask,
)
from edge_agent.outbox.store import Outbox
from edge_agent.outbox.telemetry import DeviceTelemetry
from edge_agent.outbox.tools import read_start
from edge_agent.records import encode, event_payload, score_payload
from edge_agent.types import AnomalyEvent, EventType, SampleBatch, Score, TelemetryTag

log = logging.getLogger("edge_agent.outbox")

T = TypeVar("T")

MAX_PENDING = 20_000  # messages waiting in memory for the writer; beyond, the when_full policy drops and counts
RETRY_DB = 1.0  # seconds before retrying a failed write (or open)
RECOVERY_BATCH = 256  # messages per transaction while the file is failing: some get in even when not all fit
_ERRORS = (OSError, OutboxError, sqlite3.Error)
EXPIRE_EVERY = 60.0  # seconds between max_age sweeps


def topic_level(name: str) -> str:
    """A name made safe as one topic level (wildcards and separators replaced by _)."""
    cleaned = "".join("_" if c in "+#/\0" else c for c in name)
    return cleaned or "_"


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
        # the sinks every row waits for (mqtt.payloads): each takes and acknowledges on its own
        self.outbox.targets = sink_mask(mqtt.payloads)
        self.batched = sync == "batched"
        self.commit_interval = commit_interval
        self.agent_id, self.site = agent_id, site
        self._prefix = mqtt.prefix
        self._clock = clock
        self.submitted = 0
        self.memory = MemoryQueue(MAX_PENDING, self.outbox.when_full, self.outbox.targets)
        self._done = 0  # entries written, dropped, or delivered from memory so far
        self._store_error: str | None = None  # set while the file cannot be written (or opened)
        self._writing = False  # a batch taken from memory is being written: sinks leave memory alone meanwhile
        self._unacked: dict[tuple[bool, int], list[int]] = {}  # (rejected?, sink bit) → acks the file did not take yet
        self._ack_failing = False
        self._commit_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.oldest: float | None = None
        self._score_slot: dict[str, int] = {}
        self._telemetry_slot: dict[str, int] = {}
        self._telemetry: dict[str, DeviceTelemetry] = {}  # device → its tags' latest and last reported samples
        self._exec: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = False
        self._wake_writer = asyncio.Event()
        self._on_commit: list[Callable[[], None]] = []  # sinks' wake-ups: new rows are there to take

    def __repr__(self) -> str:
        return f"OutboxWriter({self.outbox!r})"

    # ------------------------------------------------------------ lifecycle

    async def open(self, *, strict: bool = False) -> StartState:
        """Open the file in the worker thread.

        OutboxBusy: another agent holds it. Any other failure (disk full, not writable) is one WARNING: the
        stage runs on its memory queue and keeps trying to open the file (strict=True raises OutboxError).
        """
        if self._exec is None:
            self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox")
        self._loop = asyncio.get_running_loop()
        if not self.outbox.is_open:
            try:
                await self.db(self.outbox.open)
            except BaseException as exc:
                if strict or not isinstance(exc, _ERRORS) or isinstance(exc, OutboxBusy):
                    self._exec.shutdown(wait=False)
                    self._exec = None
                    raise
                self._failed(exc, "open")
                # what earlier runs left, read without writing (best effort): the sequence goes on from there
                last_seq, left_open = await self.db(read_start, self.outbox.path)
                return StartState(last_seq, left_open)
        if len(self.memory):
            self._wake_writer.set()
        # rows stored for sinks no longer configured (payloads changed since) go to the configured ones
        moved = await self.db(self.outbox.set_targets, self.outbox.targets)
        if moved:
            log.info("outbox %s: %d stored messages now go to %s", self.outbox.path, moved, self.mqtt.payloads)
        return StartState(self.outbox.last_seq, await self.db(self.outbox.open_anomalies))

    @property
    def max_pending(self) -> int:
        """The memory queue's bound (messages)."""
        return self.memory.limit

    @max_pending.setter
    def max_pending(self, value: int) -> None:
        self.memory.limit = value

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
        """Topics, QoS and rates of messages submitted from now on; what is stored keeps its topic.

        A change of mqtt.payloads is applied by `set_sinks` (it writes to the file)."""
        self.mqtt, self._prefix = mqtt, mqtt.prefix

    async def set_sinks(self, payloads: list[str]) -> None:
        """The sinks new rows wait for; stored rows only for sinks no longer configured go to these."""
        mask = sink_mask(payloads)
        self.memory.targets = mask
        if mask == self.outbox.targets:
            return
        if self._exec is not None and self.outbox.is_open:
            moved = await self.db(self.outbox.set_targets, mask)
            if moved:
                log.info("outbox %s: %d stored messages now go to %s", self.outbox.path, moved, ", ".join(payloads))
        else:
            self.outbox.targets = mask

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

    def set_device(self, device: str, tags: Sequence[TelemetryTag], integrity: float | None) -> None:
        """Telemetry of a device from now on as its config says: units, deadbands, and by exception with an
        integrity interval (None: every tag in every message)."""
        self._telemetry[device] = DeviceTelemetry(device, tags, integrity=integrity)
        self._telemetry_slot.pop(device, None)

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
        self.memory.release_all()  # rows a sink took from memory and did not get acknowledged go back
        if self._exec is not None:
            await self._write_now()
        if len(self.memory):
            log.warning(
                "outbox %s: stopping with %d messages in memory that could not be written (%s); they are lost",
                self.outbox.path,
                len(self.memory),
                self._store_error or "not written",
            )
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
        self._submit(Entry(topic, payload, Kind.EVENT, self.mqtt.qos, self._clock(), event.seq, opens, closes))

    def put_score(self, score: Score, *, version: str | None = None, sha256: str | None = None) -> None:
        """Queue a model's score for `{prefix}/scores/{model}`, once per scores_interval (off when unset)."""
        interval = self.mqtt.scores_interval
        if interval is None or not self._new_slot(self._score_slot, score.model, interval):
            return
        payload = score_payload(score, agent=self.agent_id, site=self.site, version=version, sha256=sha256)
        topic = f"{self._prefix}/scores/{topic_level(score.model)}"
        self._submit(Entry(topic, encode(payload), Kind.SCORE, self.mqtt.scores_qos, self._clock()))

    def put_telemetry(self, batch: SampleBatch) -> None:
        """Queue a device's telemetry for `{prefix}/telemetry/{device}`, at most once per telemetry_interval (off
        when unset): every tag's latest value, or by exception only the tags that changed or are due (see
        outbox/telemetry.py); every scan group and subscription of the device is merged."""
        interval = self.mqtt.telemetry_interval
        if interval is None:
            return
        state = self._telemetry.get(batch.device)
        if state is None:
            state = self._telemetry[batch.device] = DeviceTelemetry(batch.device)
        state.add(batch)
        now = self._clock()
        slot = math.floor(now / interval)
        if self._telemetry_slot.get(batch.device) == slot:
            return
        # the slot is used by a message, not by a batch with nothing to report: a change later in it still goes
        payload = state.message(agent=self.agent_id, site=self.site, ts=batch.ts, now=now)
        if payload is None:
            return
        self._telemetry_slot[batch.device] = slot
        topic = f"{self._prefix}/telemetry/{topic_level(batch.device)}"
        self._submit(Entry(topic, payload, Kind.TELEMETRY, self.mqtt.telemetry_qos, now))

    def _new_slot(self, slots: dict[str, int], key: str, interval: float) -> bool:
        slot = math.floor(self._clock() / interval)
        if slots.get(key) == slot:
            return False
        slots[key] = slot
        return True

    def _submit(self, entry: Entry) -> None:
        self.submitted += 1
        # beyond the bound (the disk is not keeping up, or is full) the policy drops and counts, never grows
        self._done += self.memory.add(entry)
        self._wake_writer.set()
        if self._store_error is not None:
            self._committed()  # the file takes nothing: sinks take it from memory

    async def flush(self) -> None:
        """Wait until every message submitted so far is in the file (committed, or counted as dropped)."""
        target = self.submitted
        if self._done >= target:
            return
        if not self._running:  # before run(): write it now (the restart bookkeeping does this), or keep it in memory
            await self._write_now()
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._commit_waiters.append((target, fut))
        self._wake_writer.set()
        await fut

    @property
    def pending(self) -> int:
        """Messages waiting in memory (for the next commit, or for a sink while the file cannot be written)."""
        return len(self.memory)

    # ------------------------------------------------------------ what sinks call

    def _bit(self, sink: str | None) -> int:
        targets = self.outbox.targets
        return SINK_BITS[sink] if sink is not None else targets & -targets

    async def take(self, n: int, sink: str | None = None) -> list[Row]:
        """Up to `n` rows the sink (mqtt.payloads name; None: the first configured) has still to publish,
        events first; they stay stored until every sink acknowledged them.

        While the file cannot be written, rows from the memory queue follow the file's (negative ids): those
        this sink still owes.
        """
        rows: list[Row] = []
        bit = self._bit(sink)
        if self.outbox.is_open:
            try:
                rows = await self.db(self.outbox.take, n, bit)
            except _ERRORS as exc:
                log.error("outbox %s: cannot read rows to publish (%s)", self.outbox.path, exc)
        if len(rows) < n and self._store_error is not None and not self._writing and len(self.memory):
            rows.extend(self.memory.take(n - len(rows), bit, run=self.outbox.run, now=self._clock()))
        return rows

    async def ack(self, ids: list[int], *, rejected: bool = False, sink: str | None = None) -> None:
        """The sink published these rows: deleted once no sink still needs them (or, `rejected`, refused for
        good: counted as dropped).

        Deletes the file refuses (it should not: see disk.py) are kept and retried; the rows stay in flight.
        """
        bit = self._bit(sink)
        delivered = self.memory.ack([i for i in ids if i < 0], bit, rejected=rejected)
        if delivered:
            self._done += delivered
            self._resolve_waiters()
        stored = [i for i in ids if i > 0]
        if stored or self._unacked.get((rejected, bit)):
            await self._ack_file(stored, rejected=rejected, bit=bit)

    async def _ack_file(self, ids: list[int], *, rejected: bool, bit: int | None = None) -> None:
        keys = list(self._unacked)
        if bit is not None and (rejected, bit) not in keys:
            keys.insert(0, (rejected, bit))
        for key in keys:
            backlog = self._unacked.pop(key, [])
            todo = backlog + ids if key == (rejected, bit) else backlog
            if not todo or not self.outbox.is_open:
                if todo:
                    self._unacked[key] = todo
                continue
            try:
                await self.db(self.outbox.ack, todo, rejected=key[0], sink=key[1])
            except _ERRORS as exc:
                self._unacked[key] = todo
                if not self._ack_failing:
                    log.error("outbox %s: cannot delete acknowledged rows (%s); retrying", self.outbox.path, exc)
                self._ack_failing = True
                return
        if self._ack_failing and not any(self._unacked.values()):
            log.info("outbox %s: acknowledged rows are deleted again", self.outbox.path)
            self._ack_failing = False

    async def release(self, ids: list[int] | None, sink: str | None = None) -> None:
        """Give the sink's rows back unacknowledged (None: every row it took): its next take() starts from the
        oldest again."""
        bit = self._bit(sink)
        if ids is None:
            self.memory.release(None, bit)
            if self.outbox.is_open:
                await self.db(self.outbox.release, None, bit)
            return
        self.memory.release([i for i in ids if i < 0], bit)
        stored = [i for i in ids if i > 0]
        if stored and self.outbox.is_open:
            await self.db(self.outbox.release, stored, bit)

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
        dropped = dict.fromkeys(counter_names(), 0)
        if self.outbox.is_open:
            dropped.update(self.outbox.counters)
        for key, n in self.memory.dropped.items():
            dropped[key] = dropped.get(key, 0) + n
        return WriterStats(
            submitted=self.submitted,
            pending=len(self.memory),
            dropped_memory=sum(n for k, n in self.memory.dropped.items() if k.startswith("memory.")),
            dropped=dropped,
            store_error=self._store_error,
            oldest=self.oldest,
            outbox=self.outbox.quick_stats() if self.outbox.is_open else None,
        )

    def status_summary(self) -> dict[str, Any]:
        """The outbox part of the status payload: depth, bytes, drops (from memory; no I/O)."""
        s = self.outbox.quick_stats().as_dict()
        for key, n in self.memory.dropped.items():
            reason, _, kind = key.partition(".")
            s["dropped_by_reason"][reason] += n
            s["dropped"][kind] += n
        s.pop("path", None)
        s["oldest"] = None
        s["pending"] = len(self.memory)
        s["store_error"] = self._store_error
        return s

    # ------------------------------------------------------------ tasks

    async def _writer(self) -> None:
        wake = self._wake_writer
        while True:
            if self._store_error is None:
                await wake.wait()
                if self.batched:
                    await asyncio.sleep(self.commit_interval)
            else:
                await asyncio.sleep(RETRY_DB)  # the file is failing: retry on a clock, not on every message
            wake.clear()
            await self._write_now()

    async def _write_now(self) -> bool:
        """Open the file if needed and write what waits in memory; on failure keep it there (logged once)."""
        try:
            if not self.outbox.is_open:
                await self.db(self.outbox.open)
            await self._write_pending()
            if any(self._unacked.values()):
                await self._ack_file([], rejected=False)
        except _ERRORS as exc:
            self._failed(exc, "write")
            return False
        if self._store_error is not None and not len(self.memory):
            log.info(
                "outbox %s: writing again (the messages kept in memory are in the file or were delivered)",
                self.outbox.path,
            )
            self._store_error = None
        return True

    def _failed(self, exc: BaseException, what: str) -> None:
        cause = describe(exc)
        if self._store_error is None:
            log.warning(
                "outbox %s: cannot %s it (%s); keeping up to %d messages in memory and publishing them from there; "
                "retrying every %gs",
                self.outbox.path,
                what,
                cause,
                self.memory.limit,
                RETRY_DB,
            )
        else:
            log.debug("outbox %s: still cannot %s it (%s)", self.outbox.path, what, cause)
        self._store_error = cause
        self._committed()  # sinks: rows are to be taken from memory now

    async def _write_pending(self) -> None:
        # while the file is failing, small transactions: part of the queue gets in even when not all of it fits
        limit = None if self._store_error is None else RECOVERY_BATCH
        for _ in range(1 if limit is None else len(self.memory) // limit + 2):
            if not len(self.memory) and not self.memory.has_accounting:
                self._resolve_waiters()
                return
            batch = self.memory.drain(limit)
            accounting = self.memory.accounting()
            dropped, booked, seq = accounting
            self._writing = True
            try:
                await self.db(self.outbox.put, batch, dropped=dropped, booked=list(booked.values()), seq=seq)
            except BaseException:
                self.memory.unshift(batch)
                self.memory.restore(accounting)
                raise
            finally:
                self._writing = False
            self._done += len(batch)
            self._resolve_waiters()
            self._committed()
            if limit is None:
                return

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
                except _ERRORS as exc:
                    if self.outbox.is_open:
                        log.error("outbox %s: expiry failed (%s)", self.outbox.path, exc)
            try:
                # the oldest stored message needs a query: refreshed here, read by the metrics at scrape time
                self.oldest = (await self.db(self.outbox.stats)).oldest
            except _ERRORS as exc:
                log.debug("outbox %s: stats failed (%s)", self.outbox.path, exc)
            await asyncio.sleep(self.mqtt.status_interval)

    async def db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run an outbox call in the worker thread."""
        if self._exec is None:
            raise OutboxError("the outbox is not open")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._exec, lambda: fn(*args, **kwargs))
