"""The JSON MQTT sink: outbox rows out to the broker through paho-mqtt, deleted on the broker's acknowledgement.

It only publishes: the outbox stage (OutboxWriter) makes messages durable and owns the SQLite thread;
this sink takes rows from it, hands them to paho and acknowledges them back.

Threads and who owns what:
- the event loop: the feeder, acker and status tasks run here and call paho's `publish()` (which only queues);
- the outbox's worker thread: every SQLite call, reached through the OutboxWriter;
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
import contextlib
import logging
import random
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypedDict
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.backoff import backoff_delay
from edge_agent.config import MqttSection
from edge_agent.outbox import OutboxError, Row
from edge_agent.outbox.writer import OutboxWriter
from edge_agent.publish.client import Client, connect_args, describe_failure, make_client
from edge_agent.publish.stats import (
    DELIVERY_BUCKETS,
    PUBLISH_BUCKETS,
    LatencyHistogram,
    PublisherCounters,
    PublisherStats,
)
from edge_agent.records import encode, mark_historical, status_payload

log = logging.getLogger("edge_agent.publish.mqtt")

STATUS_SLACK = 4  # paho in-flight slots kept for status messages beyond the window
WIRE_INFLIGHT = 32  # of the window, how many paho puts on the wire before PUBACKs return (it queues the rest)
SHUTDOWN_WAIT = 2.0  # seconds to let in-flight acks and the offline status arrive when stopping
# MQTT 5 PUBACK codes that no retry can fix: not authorized, topic name invalid, packet too large, bad payload
PERMANENT_REJECTIONS = frozenset({0x87, 0x90, 0x95, 0x99})
ACK_GATHER = 0.002  # seconds PUBACKs gather in paho's thread before one wake-up of the loop takes them all
ACK_BATCH = 0.01  # seconds acknowledged rows wait to be deleted together (a crash then costs a few duplicates)


class Describe(TypedDict, total=False):
    """What the status says the agent runs (records.status_payload's keywords)."""

    config_sha256: str
    models: Mapping[str, str]


class MqttPublisher:
    """Publishes events (and optional scores and telemetry) through a durable outbox to one MQTT broker."""

    def __init__(
        self,
        mqtt: MqttSection,
        outbox: OutboxWriter,
        *,
        agent_id: str,
        site: str = "default",
        version: str = "",
        client_id: str | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        describe: Callable[[], Describe] | None = None,
    ) -> None:
        self.mqtt = mqtt
        self._describe = describe  # what the online status says the agent runs: config and model sha256s
        self.outbox = outbox
        self.agent_id, self.site, self.version = agent_id, site, version
        self.client_id = client_id or mqtt.client_id or agent_id
        url = urlsplit(mqtt.url)
        self.tls = url.scheme == "mqtts"
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or (8883 if self.tls else 1883)
        self.status_topic = f"{mqtt.prefix}/status"
        self._rng = rng or random.Random()
        self._clock = clock
        self._window = mqtt.window
        self._cap = mqtt.reconnect_max
        # take more once a quarter of the window is acknowledged: the rest covers the time the outbox
        # thread takes to read them (it waits for the GIL at every row), so paho's queue never runs dry
        self._refill_at = mqtt.window - max(1, mqtt.window // 4)
        self._counts = PublisherCounters()
        self._started = clock()
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
        self._pause_until = 0.0
        self._generation = 0  # bumped on every (re)connect; rows read before it are not sent
        self._attempt = 0  # paho thread only
        self._fail_kind: str | None = None
        self._down_since: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Client | None = None
        self._stop = asyncio.Event()
        self._stop_reason = "shutdown"
        self._wake_feeder = asyncio.Event()
        self._wake_acker = asyncio.Event()
        self._progress = asyncio.Event()  # set after every commit and every ack batch
        self._props: Properties | None = None
        outbox.on_commit(self._committed)

    def __repr__(self) -> str:
        # never the config: it holds the password
        return f"MqttPublisher({self.host}:{self.port}, client_id={self.client_id!r}, outbox={self.outbox!r})"

    # ------------------------------------------------------------ lifecycle

    def stop(self, reason: str = "shutdown") -> None:
        """Ask run() to finish: in-flight acks are awaited (bounded), the offline status sent (with `reason`:
        shutdown, or reconfigured when a sink with new settings takes over), the link closed."""
        self._stop_reason = reason
        self._stop.set()

    async def run(self) -> None:
        """Connect and publish until stop() or cancellation; a broker that is down is retried forever.

        When it ends, rows handed to the broker and not acknowledged go back to the outbox: the next sink
        on this outbox (a reload's, with new settings) sends them again.
        """
        self._loop = asyncio.get_running_loop()
        self.outbox.on_commit(self._committed)
        try:
            await self._start_client()
        except BaseException:
            await self._shutdown()
            self.outbox.off_commit(self._committed)
            raise
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._feeder(), name="mqtt:feed")
                tg.create_task(self._acker(), name="mqtt:ack")
                tg.create_task(self._housekeeping(), name="mqtt:status")
                tg.create_task(self._until_stopped(), name="mqtt:stop")
        except* _Stopped:
            pass
        finally:
            await self._shutdown()
            self.outbox.off_commit(self._committed)

    async def _start_client(self) -> None:
        client = await asyncio.to_thread(self._make_client)
        client.connect_async(
            self.host, self.port, keepalive=max(1, round(self.mqtt.keepalive)), **connect_args(self.mqtt)
        )
        self._client = client
        client.loop_start()

    async def wait_drained(self) -> None:
        """Wait until every submitted message is written and acknowledged (bound it with asyncio.timeout)."""
        await self.outbox.flush()
        progress = self._progress
        while not self.drained:
            progress.clear()
            await progress.wait()

    @property
    def drained(self) -> bool:
        """Nothing pending, nothing in the outbox, nothing in flight."""
        return not self.outbox.pending and not self._inflight and self.outbox.depth == 0

    @property
    def connected(self) -> bool:
        """The broker accepted the connection and it has not been lost since."""
        return self._connected

    def stats(self) -> PublisherStats:
        """A snapshot of connection state, counters and latencies (no I/O)."""
        return self._counts.snapshot(len(self._inflight), self.publish_latency, self.delivery_latency)

    def _committed(self) -> None:
        self._wake_feeder.set()
        self._progress.set()

    # ------------------------------------------------------------ tasks

    async def _until_stopped(self) -> None:
        await self._stop.wait()
        raise _Stopped

    async def _feeder(self) -> None:
        """Hand outbox rows to paho while connected, never more than `window` unacknowledged."""
        wake = self._wake_feeder
        while True:
            await wake.wait()
            wake.clear()
            while True:
                if self._released:  # given back first, so the next take starts from the oldest row again
                    ids, self._released = self._released, []
                    await self.outbox.release(ids)
                room = self._window - len(self._inflight)
                if not self._connected or self._clock() < self._pause_until or room <= 0:
                    break
                generation = self._generation
                rows = await self.outbox.take(room)
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
        run = self.outbox.run_id
        late = self.mqtt.historical_after
        inflight = self._inflight
        refused: list[int] = []
        for row in rows:
            payload = row.payload
            if row.run != run or now - row.created > late:
                payload = mark_historical(payload)
                self._counts.historical += 1
            info = client.publish(row.topic, payload, qos=row.qos, retain=False, properties=self._props)
            # NO_CONN: paho keeps it until the reconnect, where it is dropped and its row given back (_on_connect)
            if info.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                inflight[info.mid] = (row, handed)
                self._counts.published += 1
            else:
                refused.append(row.id)
                log.error("paho refused a message for %s (%s); it stays in the outbox", row.topic, info.rc)
        self._counts.in_flight = len(self._inflight)
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
                await self.outbox.ack(ids, rejected=True)
        if self._acked:
            ids, self._acked = self._acked, []
            try:
                await self.outbox.ack(ids)
            except (OSError, OutboxError, sqlite3.Error) as exc:
                log.error(
                    "outbox %s: cannot delete acknowledged rows (%s); they may be sent again", self.outbox.path, exc
                )
        self._progress.set()

    async def _housekeeping(self) -> None:
        """Refresh the retained status."""
        while True:
            if self._connected:
                self._publish_status("online")
            await asyncio.sleep(self.mqtt.status_interval)

    async def _shutdown(self) -> None:
        """Let acks and the offline status arrive (bounded), disconnect; the outbox stays open for its owner."""
        client = self._client
        try:
            progress = self._progress
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SHUTDOWN_WAIT):
                    while self._inflight and self._connected:
                        progress.clear()
                        await progress.wait()
            self._take_acks()
            await self._ack_now()
            await self._give_back()
            if client is not None:
                if self._connected:
                    info = self._publish_status("offline", reason=self._stop_reason)
                    if info is not None:
                        with contextlib.suppress(RuntimeError, ValueError):
                            await asyncio.to_thread(info.wait_for_publish, SHUTDOWN_WAIT)
                self._stopping = True
                client.disconnect()
                await asyncio.to_thread(client.loop_stop)
        finally:
            self._connected = self._counts.connected = False
            self._client = None
            self._inflight.clear()

    async def _give_back(self) -> None:
        """Every row taken and not acknowledged back to the outbox, so the next take() (a later sink's) starts
        from the oldest again. All of them, not only those in `_inflight`: a take cancelled on its way back
        from the outbox's thread still marked its rows (a release without ids gives back this sink's rows only)."""
        self._released = []
        if self.outbox.is_open:
            with contextlib.suppress(OSError, OutboxError, sqlite3.Error):
                await self.outbox.release(None)

    # ------------------------------------------------------------ paho: client and callbacks (paho's thread)

    def _make_client(self) -> Client:
        """Build the paho client (reads TLS files: run in a thread)."""
        will = status_payload(
            "offline",
            agent=self.agent_id,
            site=self.site,
            version=self.version,
            since=self._started,
            reason="connection_lost",
        )
        # paho's queue holds at most the window (+ status messages): the outbox is the buffer
        client, self._props = make_client(
            self.mqtt,
            client_id=self.client_id,
            max_inflight=min(self._window, WIRE_INFLIGHT) + STATUS_SLACK,
            max_queued=self._window + 4 * STATUS_SLACK,
            will=(self.status_topic, encode(will)),
        )
        if log.isEnabledFor(logging.DEBUG):  # paho's own log is per packet, and its errors repeat ours: debug only
            client.on_log = self._on_log
        self._set_delay(client, self.mqtt.reconnect_initial)
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
        self._counts.in_flight = 0
        was_down = self._down_since
        self._connected = self._counts.connected = True
        self._counts.connects += 1
        self._fail_kind = None
        self._down_since = None
        waiting = self.outbox.depth
        if was_down is None and self._counts.connects == 1:
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
            self._counts.disconnects += 1
        self._connected = self._counts.connected = False
        if self._down_since is None:
            self._down_since = self._clock()

    def _report(self, kind: str, message: str, delay: float, level: int = logging.ERROR) -> None:
        self._counts.last_error = message
        if kind != self._fail_kind:
            log.log(level, "%s; retrying with backoff up to %gs; messages wait in the outbox", message, self._cap)
            self._fail_kind = kind
        else:
            log.debug("%s; next attempt in %.2fs", message, delay)

    def _refused(self, reason: str, code: int, delay: float) -> None:
        self._lost()
        self._counts.connect_failures += 1
        hint = ""
        if code in (0x86, 0x87, 4, 5):  # bad user name or password / not authorized
            hint = " (check mqtt.username and the password; the password itself is never logged)"
        message = f"MQTT broker {self.host}:{self.port} refused the connection: {reason}{hint}"
        self._report(f"refused:{code}", message, delay)

    def _failed(self, exc: BaseException | None, delay: float) -> None:
        self._lost()
        self._counts.connect_failures += 1
        kind, message = describe_failure(exc, self.host, self.port)
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
        self._counts.acked += len(acked) - before
        self._counts.in_flight = len(inflight)
        self._wake_acker.set()
        self._progress.set()
        if len(inflight) <= self._refill_at:
            self._wake_feeder.set()

    def _refused_ack(self, row: Row, code: int, reason: str) -> None:
        self._counts.rejected += 1
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
            **(self._describe() if self._describe is not None else {}),
        )
        info = client.publish(self.status_topic, encode(payload), qos=1, retain=True, properties=self._props)
        return info if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS else None

    def refresh_status(self) -> None:
        """Publish the online status now (after a reload: what the agent runs has changed)."""
        if self._connected and self._loop is not None:
            self._publish_status("online")

    def status_outbox(self) -> dict[str, Any]:
        """The outbox part of the status payload: depth, bytes, drops, in flight (from memory; no I/O)."""
        s = self.outbox.status_summary()
        s["in_flight"] = len(self._inflight)
        return s

    # ------------------------------------------------------------ helpers

    def _loop_call_later(self, delay: float, fn: Callable[[], None]) -> None:
        if self._loop is not None:
            self._loop.call_later(max(0.0, delay), fn)


class _Stopped(Exception):
    """Raised inside run()'s TaskGroup when stop() was called."""
