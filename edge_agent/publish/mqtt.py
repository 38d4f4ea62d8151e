"""MQTT publisher: outbox rows out to the broker through paho-mqtt, deleted on the broker's acknowledgement.

Threads and who owns what:
- the event loop: producers call `publish_event` / `publish_score` / `publish_telemetry` (cheap, non-blocking);
  the writer, feeder, acker and housekeeping tasks run here and call paho's `publish()` (which only queues);
- one worker thread: every SQLite call of the outbox (nothing blocking runs on the loop);
- paho's network thread (`loop_start`): socket I/O, keepalive, reconnects; its callbacks only hand
  results back with `loop.call_soon_threadsafe`.

The three threads share one GIL, and every handoff between them (a syscall, a wake-up of the loop) can
cost far more than the work handed over, so the hot path is built to hand off rarely: PUBACKs gather in
a list and wake the loop once per ACK_GATHER (or at once when the feeder has room to refill), acked rows
are deleted every ACK_BATCH in one transaction, rows are read a quarter window at a time, and paho's
socket is buffered both ways (_BufferedSocket) so its thread reads and writes whole bursts per syscall.

paho's in-memory queue is not the buffer: at most `mqtt.window` outbox rows are handed to paho at a time
(it puts WIRE_INFLIGHT of them on the wire and queues the rest in its own thread), and more are taken
only as acknowledgements come back. When a connection is (re)established, whatever paho still holds is
dropped and its rows are given back to the outbox, to be sent again in order with fresh payloads
(`historical` recomputed): paho never re-sends stale copies of its own, and an outage costs at most
WIRE_INFLIGHT duplicates (messages the broker got but whose PUBACK was lost), dropped by subscribers
through their event_id.

`historical: true` is set on a message when it is handed to the broker more than `mqtt.historical_after`
seconds after it was written, or when an earlier run of the agent wrote it (it waited across a restart).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import datetime as dt
import itertools
import json
import logging
import math
import random
import socket
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sized
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.config import MqttSection, OutboxSection, TlsVerify
from edge_agent.errors import EdgeAgentError
from edge_agent.outbox import Entry, Kind, Outbox, OutboxError, Row
from edge_agent.poller import backoff_delay
from edge_agent.publish.payloads import (
    encode,
    event_payload,
    mark_historical,
    score_payload,
    status_payload,
    telemetry_payload,
)
from edge_agent.scoring.detector import new_event_id
from edge_agent.types import AnomalyEvent, EventType, SampleBatch, Score, Severity

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_PENDING = 20_000  # messages waiting in memory for the outbox writer; beyond, new ones are dropped and counted
STATUS_SLACK = 4  # paho in-flight slots kept for status messages beyond the window
WIRE_INFLIGHT = 32  # of the window, how many paho puts on the wire before PUBACKs return (it queues the rest)
SHUTDOWN_WAIT = 2.0  # seconds to let in-flight acks and the offline status arrive when stopping
EXPIRE_EVERY = 60.0  # seconds between max_age sweeps
RETRY_DB = 1.0  # seconds before retrying a failed outbox write
# MQTT 5 PUBACK codes that no retry can fix: not authorized, topic name invalid, packet too large, bad payload
PERMANENT_REJECTIONS = frozenset({0x87, 0x90, 0x95, 0x99})
ACK_GATHER = 0.002  # seconds PUBACKs gather in paho's thread before one wake-up of the loop takes them all
ACK_BATCH = 0.01  # seconds acknowledged rows wait to be deleted together (a crash then costs a few duplicates)
SOCKET_BUFFER = 65536  # bytes paho's thread reads at once, or gathers for one send()
# handed to paho → acknowledged: the wire, paho's own queue (up to `window`), the broker
PUBLISH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# written to the outbox → acknowledged: adds the time waiting in the outbox, outages included
DELIVERY_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 21600.0, 86400.0)


def topic_level(name: str) -> str:
    """A name made safe as one topic level (wildcards and separators replaced by _)."""
    cleaned = "".join("_" if c in "+#/\0" else c for c in name)
    return cleaned or "_"


class MqttSetupError(EdgeAgentError):
    """The publisher cannot start as configured (a TLS file that cannot be read or used)."""


def tls_problems(mqtt: MqttSection) -> list[tuple[str, str]]:
    """(field, message) for each TLS file that cannot be read or used; reads the files, no network (for `check`)."""
    try:
        _tls_context(mqtt)
    except MqttSetupError as exc:
        field, _, message = str(exc).partition(": ")
        return [(field, message)]
    return []


def _tls_context(mqtt: MqttSection) -> ssl.SSLContext:
    tls = mqtt.tls
    try:
        ctx = ssl.create_default_context(cafile=str(tls.ca) if tls is not None and tls.ca else None)
    except (OSError, ssl.SSLError) as exc:
        raise MqttSetupError(f"mqtt.tls.ca: cannot use {tls.ca if tls else 'the system CAs'}: {exc}") from None
    if tls is not None and tls.cert is not None:
        try:
            ctx.load_cert_chain(str(tls.cert), str(tls.key) if tls.key else None)
        except (OSError, ssl.SSLError) as exc:
            raise MqttSetupError(f"mqtt.tls.cert: cannot use {tls.cert} (key {tls.key}): {exc}") from None
    if tls is not None and tls.verify is TlsVerify.NONE:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


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

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, durations at or below it) per bucket, ending with (inf, count), as Prometheus has them."""
        return list(zip((*self.bounds, math.inf), itertools.accumulate(self.counts), strict=True))


@dataclass
class PublisherStats:
    """Counters of one publisher run (the outbox keeps the persistent ones)."""

    connected: bool = False
    connects: int = 0
    disconnects: int = 0
    connect_failures: int = 0
    submitted: int = 0
    published: int = 0
    acked: int = 0
    rejected: int = 0  # MQTT 5 PUBACK with a failure reason code: the row stays and is retried later
    historical: int = 0
    in_flight: int = 0
    pending: int = 0
    last_error: str | None = None


# shared by every fast-path PUBACK: the callback only reads them
_PUBACK_OK = ReasonCode(PacketTypes.PUBACK)
_NO_PROPERTIES = Properties(PacketTypes.PUBACK)


class _BufferedSocket:
    """The broker socket with buffers both ways, so paho's network thread makes one syscall per burst.

    paho reads a PUBACK as three recv() calls (1, 1 and 2 bytes) and writes every packet with its own
    send(); each syscall releases and retakes the GIL, which the event loop and the outbox thread want too.
    Reads: one recv() takes all that arrived, `pending()` tells paho's loop to read again before it waits.
    Writes: while paho's write loop has more packets queued behind this one, the bytes are kept and go out
    with the last one; bytes kept always go out before any later ones, so the stream keeps its order.
    """

    def __init__(self, sock: Any, queue: Sized) -> None:
        self._sock = sock
        self._queue = queue  # paho's queue of packets to write
        self._in = b""
        self._pos = 0
        self._out = bytearray()

    def recv(self, size: int) -> bytes:
        """Up to `size` bytes: from the buffer, or from one recv() of everything that arrived."""
        if self._pos >= len(self._in):
            data: bytes = self._sock.recv(max(size, SOCKET_BUFFER))
            if len(data) <= size:
                return data
            self._in, self._pos = data, 0
        start = self._pos
        self._pos = min(start + size, len(self._in))
        return self._in[start : self._pos]

    def pending(self) -> int:
        """Bytes readable now without waiting (paho's loop skips its select wait while there are any)."""
        inner = self._sock.pending() if hasattr(self._sock, "pending") else 0  # TLS keeps decrypted bytes too
        return len(self._in) - self._pos + int(inner)

    def send(self, data: bytes | bytearray) -> int:
        """Take `data` (kept while paho has more to write), or send what was kept and then it."""
        if len(self._queue) and len(self._out) + len(data) <= SOCKET_BUFFER:
            self._out += data
            return len(data)
        if self._out:
            # kept bytes first; while they cannot all go, `data` waits too (paho retries it once writable)
            sent = self._sock.send(self._out)
            del self._out[:sent]
            if self._out:
                raise BlockingIOError
        return int(self._sock.send(data))

    def close(self) -> None:
        """Send what was kept (a DISCONNECT is often among it), then close."""
        if self._out:
            with contextlib.suppress(OSError):
                self._sock.send(self._out)
            self._out.clear()
        self._sock.close()

    def fileno(self) -> int:
        """The socket's descriptor (paho selects on it)."""
        return int(self._sock.fileno())

    def setblocking(self, flag: bool) -> None:
        """Set the socket's blocking mode."""
        self._sock.setblocking(flag)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)  # setsockopt, getpeercert, …


class _Client(paho.Client):
    """paho's client, remembering why the last connection attempt failed, with a cheaper path per PUBACK.

    Two paho internals are overridden, alike in paho-mqtt 2.1 and 2.2 (a unit test checks them and the
    attributes they use): `_create_socket`, to wrap the socket in _BufferedSocket, and `_handle_pubackcomp`,
    because paho builds a ReasonCode and a Properties object for every PUBACK (~18 µs, a third of its
    time per message).
    """

    last_error: BaseException | None = None

    def _create_socket(self) -> Any:
        return _BufferedSocket(super()._create_socket(), self._out_packet)

    def _handle_pubackcomp(self, cmd: Any) -> MQTTErrorCode:
        packet = self._in_packet["packet"]
        if cmd != "PUBACK" or len(packet) != 2:
            return super()._handle_pubackcomp(cmd)  # PUBCOMP, or an MQTT 5 PUBACK with a reason code
        mid = (packet[0] << 8) | packet[1]  # 2 bytes: MQTT 3.1.1, or MQTT 5 "Success" without properties
        self._easy_log(paho.MQTT_LOG_DEBUG, "Received PUBACK (Mid: %d)", mid)
        with self._out_message_mutex:
            if mid not in self._out_messages:
                return MQTTErrorCode.MQTT_ERR_SUCCESS
            # paho now sends the next queued message from this thread and would write a byte to its socket
            # pair to wake this very thread: skip that syscall (its loop checks for packets to write before
            # it waits again, so a publish() from another thread meanwhile is not missed either)
            wake, self._sockpairW = self._sockpairW, None
            try:
                return self._do_on_publish(mid, _PUBACK_OK, _NO_PROPERTIES)
            finally:
                self._sockpairW = wake

    def reconnect(self) -> MQTTErrorCode:
        """Connect again, keeping the exception of a failed attempt for the error log."""
        try:
            return super().reconnect()
        except OSError as exc:
            self.last_error = exc
            raise


def _seconds(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def anomaly_from_record(record: bytes) -> AnomalyEvent:
    """The start event of an open anomaly, from its stored payload (timestamps to the millisecond)."""
    d = json.loads(record)
    return AnomalyEvent(
        type=EventType(d["type"]),
        event_id=d["event_id"],
        anomaly_id=d["anomaly_id"],
        seq=int(d["seq"]),
        agent=d["agent"],
        site=d["site"],
        model=d["model"]["name"],
        model_version=d["model"]["version"],
        model_sha256=d["model"]["sha256"],
        window_start=_seconds(d["window"]["start"]),
        window_end=_seconds(d["window"]["end"]),
        score=float(d["score"] if d["score"] is not None else math.nan),
        threshold=float(d["threshold"] if d["threshold"] is not None else math.nan),
        severity=Severity(d["severity"]),
        contributions={c["tag"]: c["share"] for c in d["contributions"]},
        values=dict(d["values"]),
        started_at=_seconds(d["started_at"]),
        peak_score=float(d["peak_score"] if d["peak_score"] is not None else math.nan),
        reason=d["reason"] or "",
    )


def restart_end(start: AnomalyEvent, *, t: float, seq: int, reason: str = "agent_restart") -> AnomalyEvent:
    """The anomaly.end that closes an anomaly left open by an agent that died (window ends at restart)."""
    return dataclasses.replace(
        start,
        type=EventType.END,
        event_id=new_event_id(t, seq),
        seq=seq,
        window_end=max(t, start.window_end),
        score=start.peak_score,
        values={},
        reason=reason,
        historical=False,
    )


def _describe_failure(exc: BaseException | None, host: str, port: int) -> tuple[str, str]:
    """(kind, sentence) for a failed connection attempt; the kind decides whether it is logged again."""
    where = f"MQTT broker {host}:{port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or str(exc)
        return "tls-verify", (
            f"{where}: its TLS certificate does not verify ({detail}); check mqtt.tls.ca and that the "
            f"certificate names {host}"
        )
    if isinstance(exc, ssl.SSLError):
        return "tls", f"{where}: TLS handshake failed ({exc.reason or exc}); check mqtt.tls and the broker's listener"
    if isinstance(exc, OSError):
        return "unreachable", f"{where} is unreachable ({exc.strerror or exc})"
    return "unreachable", f"{where} is unreachable"


class MqttPublisher:
    """Publishes events (and optional scores and telemetry) through a durable outbox to one MQTT broker."""

    def __init__(
        self,
        mqtt: MqttSection,
        outbox: OutboxSection | Outbox,
        *,
        agent_id: str,
        site: str = "default",
        version: str = "",
        client_id: str | None = None,
        sync: str | None = None,
        commit_interval: float | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.mqtt = mqtt
        if isinstance(outbox, Outbox):
            self.outbox = outbox
            sync = sync or "full"
            commit_interval = commit_interval if commit_interval is not None else 0.2
        else:
            self.outbox = Outbox.from_section(outbox)
            sync = sync or outbox.sync
            commit_interval = commit_interval if commit_interval is not None else outbox.commit_interval
        self.batched = sync == "batched"
        self.commit_interval = commit_interval
        self.agent_id, self.site, self.version = agent_id, site, version
        self.client_id = client_id or mqtt.client_id or agent_id
        url = urlsplit(mqtt.url)
        self.tls = url.scheme == "mqtts"
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or (8883 if self.tls else 1883)
        prefix = mqtt.topic_prefix
        self.status_topic = f"{prefix}/status"
        self._prefix = prefix
        self._rng = rng or random.Random()
        self._clock = clock
        self._window = mqtt.window
        self._cap = mqtt.reconnect_max
        # take more once a quarter of the window is acknowledged: the rest covers the time the outbox
        # thread takes to read them (it waits for the GIL at every row), so paho's queue never runs dry
        self._refill_at = mqtt.window - max(1, mqtt.window // 4)
        self.stats = PublisherStats()
        self._started = clock()
        self._pending: list[Entry] = []
        self._dropped_mem: dict[Kind, int] = {}
        self._done = 0  # entries written (or dropped) so far
        self._commit_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._inflight: dict[int, tuple[Row, float]] = {}  # paho mid → (row, monotonic time handed to paho)
        self._acked: list[int] = []
        # (mid, reason code, reason, monotonic time of the PUBACK) from paho's thread, under _ack_lock
        self._acks: list[tuple[int, int, str, float]] = []
        self._acks_due = max(1, self._window - self._refill_at)  # acks after which the feeder has room to refill
        self._rejected: list[int] = []
        self._ack_lock = threading.Lock()
        self.publish_latency = LatencyHistogram(PUBLISH_BUCKETS)
        self.delivery_latency = LatencyHistogram(DELIVERY_BUCKETS)
        self._released: list[int] = []
        self._connected = False
        self._stopping = False
        self._running = False
        self._pause_until = 0.0
        self._generation = 0  # bumped on every (re)connect; rows read before it are not sent
        self._attempt = 0  # paho thread only
        self._fail_kind: str | None = None
        self._down_since: float | None = None
        # rates on a grid (slot k = floor(t / interval)): one message per interval, not one per interval + a poll
        self.outbox_oldest: float | None = None  # creation time of the oldest stored message (housekeeping)
        self._score_slot: dict[str, int] = {}
        self._telemetry_slot: dict[str, int] = {}
        self._telemetry: dict[str, dict[str, tuple[SampleBatch, int]]] = {}  # device → tag → (batch, column)
        self._exec: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: _Client | None = None
        self._stop = asyncio.Event()
        self._wake_writer = asyncio.Event()
        self._wake_feeder = asyncio.Event()
        self._wake_acker = asyncio.Event()
        self._progress = asyncio.Event()  # set after every write and every ack batch
        self._props: Properties | None = None

    def __repr__(self) -> str:
        # never the config: it holds the password
        return f"MqttPublisher({self.host}:{self.port}, client_id={self.client_id!r}, outbox={self.outbox!r})"

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Open the outbox in the worker thread (no network); run() does it too when not done before."""
        if self._exec is None:
            self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox")
        self._loop = asyncio.get_running_loop()
        if not self.outbox.is_open:
            try:
                await self._db(self.outbox.open)
            except BaseException:
                self._exec.shutdown(wait=False)
                self._exec = None
                raise
        if self._pending:
            self._wake_writer.set()

    @property
    def last_seq(self) -> int:
        """The highest event sequence number ever written to the outbox (seed the agent's counter above it)."""
        return self.outbox.last_seq

    async def close_open_anomalies(self, counter: Iterator[int]) -> list[AnomalyEvent]:
        """Write an anomaly.end (reason agent_restart) for each anomaly a previous run left open; call after open()."""
        now = self._clock()
        ends = []
        for item in await self._db(self.outbox.open_anomalies):
            try:
                start = anomaly_from_record(item.record)
            except (ValueError, TypeError, KeyError) as exc:
                log.error("outbox: cannot read open anomaly %s (%s); it stays open", item.anomaly_id, exc)
                continue
            end = restart_end(start, t=now, seq=next(counter))
            log.warning(
                "model %s: anomaly %s was open when the agent stopped; closing it (reason agent_restart)",
                start.model,
                start.anomaly_id,
            )
            self.publish_event(end)
            ends.append(end)
        await self.flush()
        return ends

    def stop(self) -> None:
        """Ask run() to finish: pending messages are written, the offline status sent, the outbox closed."""
        self._stop.set()

    async def run(self) -> None:
        """Connect and publish until stop() or cancellation; a broker that is down is retried forever."""
        await self.open()
        try:
            await self._start_client()
        except BaseException:
            await self._shutdown()
            raise
        self._running = True
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._writer(), name="outbox:write")
                tg.create_task(self._feeder(), name="mqtt:feed")
                tg.create_task(self._acker(), name="outbox:ack")
                tg.create_task(self._housekeeping(), name="mqtt:status")
                tg.create_task(self._until_stopped(), name="mqtt:stop")
        except* _Stopped:
            pass
        finally:
            await self._shutdown()

    async def _start_client(self) -> None:
        client = await asyncio.to_thread(self._make_client)
        client.connect_async(self.host, self.port, keepalive=self._keepalive(), **self._connect_args())
        self._client = client
        client.loop_start()

    async def flush(self) -> None:
        """Wait until every message submitted so far is in the outbox (committed, or counted as dropped)."""
        target = self.stats.submitted
        if self._done >= target:
            return
        if not self._running:  # before run(): write it now (the agent's restart bookkeeping does this)
            await self._write_pending()
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._commit_waiters.append((target, fut))
        self._wake_writer.set()
        await fut

    async def wait_drained(self) -> None:
        """Wait until every submitted message is written and acknowledged (bound it with asyncio.timeout)."""
        await self.flush()
        progress = self._progress
        while not self.drained:
            progress.clear()
            await progress.wait()

    @property
    def drained(self) -> bool:
        """Nothing pending, nothing in the outbox, nothing in flight."""
        return not self._pending and not self._inflight and sum(self.outbox.depth.values()) == 0

    @property
    def connected(self) -> bool:
        """The broker accepted the connection and it has not been lost since."""
        return self._connected

    # ------------------------------------------------------------ producers (event loop, non-blocking)

    def publish_event(self, event: AnomalyEvent) -> None:
        """Queue an anomaly event for `{prefix}/events/{model}` (written to the outbox before it is sent)."""
        topic = f"{self._prefix}/events/{topic_level(event.model)}"
        payload = encode(event_payload(event))
        # the payload itself is the record of an open anomaly: enough to write its end after a crash
        opens = (event.model, event.anomaly_id, payload) if event.type is EventType.START else None
        closes = (event.model, event.anomaly_id) if event.type is EventType.END else None
        self._submit(Entry(topic, payload, Kind.EVENT, self.mqtt.qos, None, event.seq, opens, closes))

    def publish_score(self, score: Score, *, version: str | None = None, sha256: str | None = None) -> None:
        """Queue a model's score for `{prefix}/scores/{model}`, once per scores_interval (off when unset)."""
        interval = self.mqtt.scores_interval
        if interval is None or not self._new_slot(self._score_slot, score.model, interval):
            return
        payload = score_payload(score, agent=self.agent_id, site=self.site, version=version, sha256=sha256)
        topic = f"{self._prefix}/scores/{topic_level(score.model)}"
        self._submit(Entry(topic, encode(payload), Kind.SCORE, self.mqtt.scores_qos))

    def publish_telemetry(self, batch: SampleBatch) -> None:
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
        self.stats.submitted += 1
        if len(self._pending) >= MAX_PENDING:
            # the disk is not keeping up: count the drop rather than grow without bound
            self._dropped_mem[entry.kind] = self._dropped_mem.get(entry.kind, 0) + 1
            self._done += 1
            return
        self._pending.append(entry)
        self.stats.pending = len(self._pending)
        self._wake_writer.set()

    # ------------------------------------------------------------ tasks

    async def _until_stopped(self) -> None:
        await self._stop.wait()
        raise _Stopped

    async def _writer(self) -> None:
        """Write queued messages to the outbox in batches: one fsynced transaction per batch."""
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
            await self._db(self.outbox.put, batch, dropped_in_memory=dropped)
        except BaseException:
            self._pending[:0] = batch
            for k, n in dropped.items():
                self._dropped_mem[k] = self._dropped_mem.get(k, 0) + n
            raise
        self._done += len(batch)
        self.stats.pending = len(self._pending)
        self._resolve_waiters()
        self._wake_feeder.set()
        self._progress.set()

    def _resolve_waiters(self) -> None:
        keep = []
        for target, fut in self._commit_waiters:
            if self._done >= target:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((target, fut))
        self._commit_waiters = keep

    async def _feeder(self) -> None:
        """Hand outbox rows to paho while connected, never more than `window` unacknowledged."""
        wake = self._wake_feeder
        while True:
            await wake.wait()
            wake.clear()
            while True:
                if self._released:  # given back first, so the next take starts from the oldest row again
                    ids, self._released = self._released, []
                    await self._db(self.outbox.release, ids)
                room = self._window - len(self._inflight)
                if not self._connected or self._clock() < self._pause_until or room <= 0:
                    break
                generation = self._generation
                rows = await self._db(self.outbox.take, room)
                if not rows:
                    if not self._released:
                        break
                    continue
                if generation != self._generation or not self._connected or self._client is None:
                    # the connection changed while we read: rows older than these were just given back
                    self._released.extend(r.id for r in rows)
                    continue
                self._send(rows)
            if self._pause_until > self._clock():
                self._loop_call_later(self._pause_until - self._clock(), wake.set)

    def _send(self, rows: list[Row]) -> None:
        client = self._client
        assert client is not None
        now = self._clock()
        handed = time.monotonic()  # publish() only queues: the whole batch is handed over at once
        run = self.outbox.run
        late = self.mqtt.historical_after
        inflight = self._inflight
        refused: list[int] = []
        for row in rows:
            payload = row.payload
            if row.run != run or now - row.created > late:
                payload = mark_historical(payload)
                self.stats.historical += 1
            info = client.publish(row.topic, payload, qos=row.qos, retain=False, properties=self._props)
            # NO_CONN: paho keeps it until the reconnect, where it is dropped and its row given back (_on_connect)
            if info.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                inflight[info.mid] = (row, handed)
                self.stats.published += 1
            else:
                refused.append(row.id)
                log.error("paho refused a message for %s (%s); it stays in the outbox", row.topic, info.rc)
        self.stats.in_flight = len(self._inflight)
        if refused:
            self._released.extend(refused)
            self._pause(self.mqtt.reconnect_initial)
            self._wake_feeder.set()

    async def _acker(self) -> None:
        """Delete acknowledged rows in batches."""
        wake = self._wake_acker
        while True:
            await wake.wait()
            await asyncio.sleep(ACK_BATCH)  # gather acks: one transaction per batch, not per PUBACK
            wake.clear()
            await self._ack_now()

    async def _ack_now(self) -> None:
        if self._rejected:
            ids, self._rejected = self._rejected, []
            with contextlib.suppress(OSError, OutboxError, sqlite3.Error):
                await self._db(self.outbox.ack, ids, rejected=True)
        if self._acked:
            ids, self._acked = self._acked, []
            try:
                await self._db(self.outbox.ack, ids)
            except (OSError, OutboxError, sqlite3.Error) as exc:
                log.error(
                    "outbox %s: cannot delete acknowledged rows (%s); they may be sent again", self.outbox.path, exc
                )
        self._progress.set()

    async def _housekeeping(self) -> None:
        """Refresh the retained status; drop rows past max_age."""
        last_expire = 0.0
        while True:
            if time.monotonic() - last_expire >= min(EXPIRE_EVERY, self.outbox.max_age / 10):
                last_expire = time.monotonic()
                try:
                    if await self._db(self.outbox.expire):
                        log.warning("outbox: dropped messages older than %gs", self.outbox.max_age)
                except (OSError, OutboxError, sqlite3.Error) as exc:
                    log.error("outbox %s: expiry failed (%s)", self.outbox.path, exc)
            try:
                # the oldest stored message needs a query: refreshed here, read by the metrics at scrape time
                self.outbox_oldest = (await self._db(self.outbox.stats)).oldest
            except (OSError, OutboxError, sqlite3.Error) as exc:
                log.debug("outbox %s: stats failed (%s)", self.outbox.path, exc)
            if self._connected:
                self._publish_status("online")
            await asyncio.sleep(self.mqtt.status_interval)

    async def _shutdown(self) -> None:
        """Write what is pending, let acks and the offline status arrive (bounded), disconnect, close."""
        client = self._client
        try:
            with contextlib.suppress(OSError, OutboxError, sqlite3.Error):
                await self._write_pending()
            progress = self._progress
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SHUTDOWN_WAIT):
                    while self._inflight and self._connected:
                        progress.clear()
                        await progress.wait()
            self._take_acks()
            await self._ack_now()
            if client is not None:
                if self._connected:
                    info = self._publish_status("offline", reason="shutdown")
                    if info is not None:
                        with contextlib.suppress(RuntimeError, ValueError):
                            await asyncio.to_thread(info.wait_for_publish, SHUTDOWN_WAIT)
                self._stopping = True
                client.disconnect()
                await asyncio.to_thread(client.loop_stop)
        finally:
            self._running = False
            self._connected = self.stats.connected = False
            for _, fut in self._commit_waiters:
                if not fut.done():
                    fut.cancel()
            self._commit_waiters = []
            if self._exec is not None:
                with contextlib.suppress(OSError, sqlite3.Error):
                    await self._db(self.outbox.close)
                self._exec.shutdown(wait=False)
                self._exec = None
            self._client = None
            self._inflight.clear()

    # ------------------------------------------------------------ paho: client and callbacks (paho's thread)

    def _keepalive(self) -> int:
        return max(1, round(self.mqtt.keepalive))

    def _protocol(self) -> MQTTProtocolVersion:
        return MQTTProtocolVersion.MQTTv5 if self.mqtt.protocol == "5" else MQTTProtocolVersion.MQTTv311

    def _connect_args(self) -> dict[str, Any]:
        if self._protocol() is not MQTTProtocolVersion.MQTTv5:
            return {}
        persistent = self.mqtt.session == "persistent"
        props = Properties(PacketTypes.CONNECT)
        if persistent:
            props.SessionExpiryInterval = int(self.mqtt.session_expiry)
        return {"clean_start": not persistent, "properties": props}

    def _make_client(self) -> _Client:
        """Build the paho client (reads TLS files: run in a thread)."""
        v5 = self._protocol() is MQTTProtocolVersion.MQTTv5
        client = _Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=None if v5 else self.mqtt.session == "clean",
            protocol=self._protocol(),
            reconnect_on_failure=True,
        )
        if log.isEnabledFor(logging.DEBUG):  # paho's own log is per packet, and its errors repeat ours: debug only
            client.on_log = self._on_log
        # paho's queue holds at most the window (+ status messages): the outbox is the buffer
        client.max_inflight_messages_set(min(self._window, WIRE_INFLIGHT) + STATUS_SLACK)
        client.max_queued_messages_set(self._window + 4 * STATUS_SLACK)
        self._set_delay(client, self.mqtt.reconnect_initial)
        if self.mqtt.username is not None or self.mqtt.password is not None:
            password = self.mqtt.password.get_secret_value() if self.mqtt.password is not None else None
            client.username_pw_set(self.mqtt.username or "", password)
        if self.tls:
            client.tls_set_context(_tls_context(self.mqtt))
            if self.mqtt.tls is not None and self.mqtt.tls.verify is TlsVerify.NONE:
                client.tls_insecure_set(True)
        will = status_payload(
            "offline",
            agent=self.agent_id,
            site=self.site,
            version=self.version,
            since=self._started,
            reason="connection_lost",
        )
        client.will_set(self.status_topic, encode(will), qos=1, retain=True)
        if v5:
            self._props = Properties(PacketTypes.PUBLISH)
            self._props.PayloadFormatIndicator = 1
            self._props.ContentType = "application/json"
        client.on_socket_open = self._on_socket_open
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        return client

    def _set_delay(self, client: paho.Client, delay: float) -> None:
        # paho doubles from min to max; equal bounds make it wait exactly our jittered delay (float seconds work)
        client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]

    def _next_delay(self, client: paho.Client) -> float:
        delay = backoff_delay(self._attempt, self.mqtt.reconnect_initial, self.mqtt.reconnect_max, self._rng)
        self._attempt += 1
        self._set_delay(client, delay)
        return delay

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed while paho was still running
            loop.call_soon_threadsafe(fn, *args)

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Properties | None
    ) -> None:
        if reason.is_failure:
            delay = self._next_delay(client)
            self._call(self._refused, str(reason), reason.value, delay)
        else:
            self._attempt = 0
            # paho would now re-send what it held when the link dropped, with the payloads of then; drop
            # them instead: their rows go back to the outbox and are sent again in order, flags refreshed
            client.drop_out_messages()
            self._call(self._connected_now, bool(getattr(flags, "session_present", False)))

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # paho leaves Nagle on: small PUBLISH/PUBACK packets then wait for delayed TCP acks (~1k msgs/s)
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_log(self, client: paho.Client, userdata: Any, level: int, buf: str) -> None:
        log.debug("paho: %s", buf)

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        delay = self._next_delay(client)
        exc = getattr(client, "last_error", None)
        self._call(self._failed, exc, delay)

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Properties | None
    ) -> None:
        delay = self._next_delay(client)
        self._call(self._disconnected, str(reason), delay)

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Properties | None
    ) -> None:
        # acks arrive by the thousand and every wake-up of the loop costs a GIL handoff: the first ack of a
        # batch schedules one drain ACK_GATHER later, the one that makes a refill due drains at once, the
        # others only append
        ack = (mid, reason.value, str(reason) if reason.is_failure else "", time.monotonic())
        with self._ack_lock:
            self._acks.append(ack)
            n = len(self._acks)
        if n == self._acks_due:
            self._call(self._take_acks)
        elif n == 1:
            self._call(self._gather_acks)

    # ------------------------------------------------------------ callbacks, back on the event loop

    def _connected_now(self, session_present: bool) -> None:
        self._take_acks()  # acks that came before the link dropped: those rows are done, not given back
        self._generation += 1
        self._released.extend(row.id for row, _ in self._inflight.values())  # paho dropped them (_on_connect)
        self._inflight.clear()
        self.stats.in_flight = 0
        was_down = self._down_since
        self._connected = self.stats.connected = True
        self.stats.connects += 1
        self._fail_kind = None
        self._down_since = None
        waiting = sum(self.outbox.depth.values())
        if was_down is None and self.stats.connects == 1:
            log.info("MQTT: connected to %s:%d as %s", self.host, self.port, self.client_id)
        else:
            outage = self._clock() - was_down if was_down is not None else 0.0
            log.info(
                "MQTT: reconnected to %s:%d after %.1fs; %d messages waiting in the outbox",
                self.host,
                self.port,
                outage,
                waiting,
            )
        self._publish_status("online")
        self._wake_feeder.set()

    def _lost(self) -> None:
        if self._connected:
            self.stats.disconnects += 1
        self._connected = self.stats.connected = False
        if self._down_since is None:
            self._down_since = self._clock()

    def _report(self, kind: str, message: str, delay: float, level: int = logging.ERROR) -> None:
        self.stats.last_error = message
        if kind != self._fail_kind:
            log.log(level, "%s; retrying with backoff up to %gs; messages wait in the outbox", message, self._cap)
            self._fail_kind = kind
        else:
            log.debug("%s; next attempt in %.2fs", message, delay)

    def _refused(self, reason: str, code: int, delay: float) -> None:
        self._lost()
        self.stats.connect_failures += 1
        hint = ""
        if code in (0x86, 0x87, 4, 5):  # bad user name or password / not authorized
            hint = " (check mqtt.username and the password; the password itself is never logged)"
        message = f"MQTT broker {self.host}:{self.port} refused the connection: {reason}{hint}"
        self._report(f"refused:{code}", message, delay)

    def _failed(self, exc: BaseException | None, delay: float) -> None:
        self._lost()
        self.stats.connect_failures += 1
        kind, message = _describe_failure(exc, self.host, self.port)
        level = logging.ERROR if kind.startswith("tls") else logging.WARNING
        self._report(kind, message, delay, level)

    def _disconnected(self, reason: str, delay: float) -> None:
        was_connected = self._connected
        self._lost()
        if was_connected and self._stopping:
            log.info("MQTT: disconnected from %s:%d", self.host, self.port)
        elif was_connected:
            waiting = len(self._inflight)
            log.warning(
                "MQTT: connection to %s:%d lost (%s); buffering in the outbox (%d in flight, sent again later)",
                self.host,
                self.port,
                reason,
                waiting,
            )
            self._fail_kind = "lost"

    def _gather_acks(self) -> None:
        self._loop_call_later(ACK_GATHER, self._take_acks)

    def _take_acks(self) -> None:
        """Account for the acks paho's thread collected: rows to delete, latencies, refills (one pass per batch)."""
        with self._ack_lock:
            acks, self._acks = self._acks, []
        if not acks:
            return  # drained already by an earlier wake-up
        inflight, acked = self._inflight, self._acked
        publish, delivery = self.publish_latency, self.delivery_latency
        # PUBACK times are monotonic (paho's thread); row.created is the wall clock of the outbox write
        wall = self._clock() - time.monotonic()
        before = len(acked)
        for mid, code, reason, at in acks:
            sent = inflight.pop(mid, None)
            if sent is None:
                continue  # a status message
            row, handed = sent
            if code >= 0x80:
                self._refused_ack(row, code, reason)
                continue
            acked.append(row.id)
            if row.qos:  # QoS 0 has no acknowledgement: paho reports it once written to the socket
                publish.observe(at - handed)
                delivery.observe(at + wall - row.created)
        self.stats.acked += len(acked) - before
        self.stats.in_flight = len(inflight)
        self._wake_acker.set()
        self._progress.set()
        if len(inflight) <= self._refill_at:
            self._wake_feeder.set()

    def _refused_ack(self, row: Row, code: int, reason: str) -> None:
        self.stats.rejected += 1
        if code in PERMANENT_REJECTIONS:
            # the broker will never take it (ACL, topic, size): keep it and nothing else moves; drop and count it
            log.error("MQTT broker rejected a message for %s for good: %s; dropped and counted", row.topic, reason)
            self._rejected.append(row.id)
        else:
            # refused for now (quota, server busy): give it back and slow down; it goes again, in order
            log.warning("MQTT broker rejected a message for %s: %s; retrying", row.topic, reason)
            self._released.append(row.id)
            self._pause(self.mqtt.reconnect_initial * 4)
            self._wake_feeder.set()

    def _pause(self, seconds: float) -> None:
        self._pause_until = max(self._pause_until, self._clock() + seconds)

    def _publish_status(self, state: str, reason: str | None = None) -> paho.MQTTMessageInfo | None:
        client = self._client
        if client is None:
            return None
        payload = status_payload(
            state,
            agent=self.agent_id,
            site=self.site,
            version=self.version,
            since=self._started,
            ts=self._clock(),
            outbox=self.status_outbox() if state == "online" else None,
            reason=reason,
        )
        info = client.publish(self.status_topic, encode(payload), qos=1, retain=True, properties=self._props)
        return info if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS else None

    def status_outbox(self) -> dict[str, Any]:
        """The outbox part of the status payload: depth, bytes, oldest, drops (from memory; no I/O)."""
        s = self.outbox.quick_stats().as_dict()
        mem = sum(self._dropped_mem.values())
        s["dropped_by_reason"]["memory"] += mem
        s.pop("path", None)
        s["oldest"] = None
        s["in_flight"] = len(self._inflight)
        return s

    # ------------------------------------------------------------ helpers

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run an outbox call in the worker thread."""
        if self._exec is None:
            raise OutboxError("the publisher is not open")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._exec, lambda: fn(*args, **kwargs))

    def _loop_call_later(self, delay: float, fn: Callable[[], None]) -> None:
        if self._loop is not None:
            self._loop.call_later(max(0.0, delay), fn)


class _Stopped(Exception):
    """Raised inside run()'s TaskGroup when stop() was called."""


# ------------------------------------------------------------ operator commands


@dataclass(frozen=True)
class DrainResult:
    """What `edge-agent outbox drain` did."""

    sent: int
    left: int
    seconds: float

    @property
    def complete(self) -> bool:
        """Nothing is left in the outbox."""
        return self.left == 0


async def drain(
    mqtt: MqttSection,
    outbox: OutboxSection,
    *,
    agent_id: str,
    site: str = "default",
    version: str = "",
    max_seconds: float | None = None,
) -> DrainResult:
    """Publish everything in an outbox to the broker; return once it is empty (or after max_seconds).

    Refuses (OutboxError) while an agent holds the outbox. Uses the client id `<client id>-drain`, so a
    running agent with the same id is not disconnected.
    """
    pub = MqttPublisher(
        mqtt,
        outbox,
        agent_id=agent_id,
        site=site,
        version=version,
        client_id=f"{mqtt.client_id or agent_id}-drain",
    )
    started = time.monotonic()
    await pub.open()
    before = sum(pub.outbox.depth.values())
    task = asyncio.create_task(pub.run(), name="outbox:drain")
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max_seconds):
                await pub.wait_drained()
    finally:
        left = sum(pub.outbox.depth.values())
        pub.stop()
        await task
    return DrainResult(sent=before - left, left=left, seconds=time.monotonic() - started)


def new_counter(start_after: int) -> Iterator[int]:
    """A per-agent event sequence continuing after `start_after` (the outbox's last_seq)."""
    return itertools.count(start_after + 1)
