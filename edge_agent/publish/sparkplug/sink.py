"""The Sparkplug B sink: the agent as a Sparkplug edge node on its own MQTT connection, fed by the outbox.

Life cycle (Sparkplug B 3.0):
- the will is NDEATH (QoS 1, not retained) with `bdSeq`; bdSeq goes up by one per accepted CONNECT (0–255)
  and is kept in a file beside the outbox (`<outbox>.bdseq`), so a restarted node's NBIRTH follows the
  NDEATH the broker published for its previous run;
- after CONNECT: subscribe to NCMD (and STATE of the primary host when configured), then NBIRTH (seq 0,
  the same bdSeq, `Node Control/Rebirth` false, the model metrics) and a DBIRTH per device seen so far (a
  device's first telemetry row is its DBIRTH, so no birth carries null values for want of a reading);
- outbox rows then go out in order as DDATA (telemetry, by exception, by alias), DDEATH/DBIRTH (a device
  comms-lost and back) and NDATA (anomaly state per model); rows that waited (written before these births,
  by an earlier run, or older than mqtt.historical_after) carry is_historical;
- NCMD `Node Control/Rebirth` true: births again with the same bdSeq;
- primary host: nothing is published until `spBv1.0/STATE/{host}` says online; when it says offline the node
  stops publishing (rows wait in the outbox) and sends births again when it is back;
- stop: NDEATH published, then DISCONNECT (a clean disconnect makes the broker drop the will).

Data, births and deaths go at QoS 0 as the specification has them; a row is acknowledged to the outbox once
paho wrote its last message to the socket. A row whose messages were lost with a connection is given back
and taken again; the node's last values were updated when it was first turned into messages, so the births
after the reconnect carry them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
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
from edge_agent.publish.sparkplug.node import BirthDevice, EdgeNode, Message
from edge_agent.publish.stats import (
    PUBLISH_BUCKETS,
    LatencyHistogram,
    PublisherCounters,
    PublisherStats,
    SparkplugStats,
)
from edge_agent.sparkplug import MessageType, node_topic, parse_state, state_topic

log = logging.getLogger("edge_agent.publish.sparkplug")

SHUTDOWN_WAIT = 2.0  # seconds for the NDEATH to be written when stopping
ACK_BATCH = 0.01  # seconds written rows wait to be deleted together
_ERRORS = (OSError, OutboxError)


def bdseq_path(outbox: Path) -> Path:
    """Where the last accepted CONNECT's bdSeq is kept: beside the outbox file."""
    return outbox.with_name(outbox.name + ".bdseq")


def read_bdseq(path: Path) -> int | None:
    """The bdSeq kept in `path`, or None (no file yet, or unreadable: the node starts at 0)."""
    try:
        value = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return value if 0 <= value <= 255 else None


def write_bdseq(path: Path, value: int) -> None:
    """Keep `value` (atomically: a crash leaves the old or the new number)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{value}\n")
    os.replace(tmp, path)


class SparkplugNode:
    """Publishes the outbox's rows as a Sparkplug B edge node (NBIRTH/DBIRTH, NDATA/DDATA, deaths) to one broker."""

    def __init__(
        self,
        mqtt: MqttSection,
        outbox: OutboxWriter,
        *,
        agent_id: str,
        devices: Sequence[BirthDevice],
        models: Sequence[str] = (),
        client_id: str | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        **_: Any,
    ) -> None:
        assert mqtt.sparkplug is not None, "mqtt.sparkplug is required (the config schema checks it)"
        self.mqtt = mqtt
        self.outbox = outbox
        sp = mqtt.sparkplug
        self.group, self.node_id, self.host_id = sp.group_id, sp.edge_node_id or agent_id, sp.primary_host_id
        self.node = EdgeNode(self.group, self.node_id, devices, models)
        # its own connection beside the JSON sink's (each has its own will): its own client id
        base = client_id or mqtt.client_id or agent_id
        self.client_id = f"{base}-sparkplug" if "json" in mqtt.payloads else base
        url = urlsplit(mqtt.url)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or (8883 if url.scheme == "mqtts" else 1883)
        self._rng = rng or random.Random()
        self._clock = clock
        self._bdseq_file = bdseq_path(outbox.path)
        last = read_bdseq(self._bdseq_file)
        self._next_bdseq = 0 if last is None else (last + 1) % 256
        self.bdseq = self._next_bdseq  # of the current (or next) connection
        self._counts = PublisherCounters()
        self._births_sent = self._rebirth_requests = self._device_deaths = 0
        self._no_latency = LatencyHistogram(PUBLISH_BUCKETS)
        self._inflight: dict[int, int | None] = {}  # paho mid → the row it finishes (None: a birth, a death)
        self._rows: set[int] = set()  # rows taken and not acknowledged
        self._acked: list[int] = []
        self._connected = False
        self._born = False  # births sent on this connection (and the primary host online)
        self._born_at = 0.0
        self._host_online = self.host_id is None
        self._host_ts = 0  # timestamp of the last STATE message taken into account
        self._attempt = 0
        self._fail_kind: str | None = None
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Client | None = None
        self._stop = asyncio.Event()
        self._wake_feeder = asyncio.Event()
        self._wake_acker = asyncio.Event()
        self._progress = asyncio.Event()
        self._release_all = False

    def __repr__(self) -> str:
        return f"SparkplugNode({self.host}:{self.port}, {self.group}/{self.node_id}, outbox={self.outbox!r})"

    # ------------------------------------------------------------ the Sink protocol

    @property
    def connected(self) -> bool:
        """The broker accepted the connection and it has not been lost since."""
        return self._connected

    def stop(self, reason: str = "shutdown") -> None:
        """Ask run() to finish: NDEATH published, then a clean disconnect."""
        self._stop.set()

    async def run(self) -> None:
        """Connect and publish until stop(); a broker that is down is retried forever."""
        self._loop = asyncio.get_running_loop()
        self.outbox.on_commit(self._committed)
        try:
            client = await asyncio.to_thread(self._make_client)
            self._client = client
            client.connect_async(
                self.host, self.port, keepalive=max(1, round(self.mqtt.keepalive)), **connect_args(self.mqtt)
            )
            client.loop_start()
            async with asyncio.TaskGroup() as tg:
                feeder = tg.create_task(self._feeder(), name="sparkplug:feed")
                acker = tg.create_task(self._acker(), name="sparkplug:ack")
                await self._stop.wait()
                feeder.cancel()
                acker.cancel()
        finally:
            await self._shutdown()
            self.outbox.off_commit(self._committed)

    async def wait_drained(self) -> None:
        """Wait until every submitted message is written and acknowledged (bound it with asyncio.timeout)."""
        await self.outbox.flush()
        while self.outbox.pending or self._rows or self.outbox.depth:
            self._progress.clear()
            await self._progress.wait()

    def stats(self) -> PublisherStats:
        """A snapshot of connection state and counters (no I/O); this sink measures no latencies (QoS 0)."""
        node = SparkplugStats(
            bdseq=self.bdseq,
            births=self._births_sent,
            rebirth_requests=self._rebirth_requests,
            device_deaths=self._device_deaths,
            skipped=self.node.skipped,
            primary_host=self.host_id,
            host_online=self._host_online,
        )
        return self._counts.snapshot(
            len(self._rows), self._no_latency, self._no_latency, sink="sparkplug", sparkplug=node
        )

    def refresh_status(self) -> None:
        """Nothing to refresh: a Sparkplug node's state is in its births."""

    @property
    def skipped(self) -> int:
        """Rows about devices or models the births did not announce (a reload added them), not published."""
        return self.node.skipped

    # ------------------------------------------------------------ tasks (event loop)

    def _committed(self) -> None:
        self._wake_feeder.set()
        self._progress.set()

    async def _feeder(self) -> None:
        """Births when due, then rows from the outbox, never more than `window` rows unacknowledged."""
        wake = self._wake_feeder
        while True:
            await wake.wait()
            wake.clear()
            if self._release_all:
                self._release_all = False
                back = self._rows.difference(self._acked)  # rows written already are acknowledged, not sent again
                with contextlib.suppress(*_ERRORS):
                    await self.outbox.release(sorted(back), sink="sparkplug")
                self._rows.difference_update(back)
            while self._born and self._connected:
                room = self.mqtt.window - len(self._rows)
                if room <= 0:
                    break
                rows = await self.outbox.take(room, sink="sparkplug")
                if not rows:
                    break
                if not (self._born and self._connected) or self._release_all:
                    await self.outbox.release([r.id for r in rows], sink="sparkplug")
                    wake.set()
                    break
                self._send(rows)

    def _send(self, rows: list[Row]) -> None:
        client = self._client
        assert client is not None
        now = self._clock()
        run, late = self.outbox.run_id, self.mqtt.historical_after
        self._rows.update(r.id for r in rows)  # all taken: given back together if the connection goes midway
        for row in rows:
            historical = row.run != run or row.created < self._born_at or now - row.created > late
            messages = self.node.from_row(row, historical)
            if historical and messages:
                self._counts.historical += 1
            if not messages:
                self._acked.append(row.id)
                self._wake_acker.set()
                continue
            for i, message in enumerate(messages):
                if not self._publish(message, row.id if i == len(messages) - 1 else None):
                    return  # the connection is going: what was taken goes back (_lost)

    def _publish(self, message: Message, row: int | None) -> bool:
        client = self._client
        if client is None:
            return False
        info = client.publish(message.topic, message.payload, qos=0, retain=False)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._lost()
            return False
        self._inflight[info.mid] = row
        self._counts.published += 1
        if message.type is MessageType.NBIRTH:
            self._births_sent += 1
        elif message.type is MessageType.DDEATH:
            self._device_deaths += 1
        return True

    async def _acker(self) -> None:
        wake = self._wake_acker
        while True:
            await wake.wait()
            await asyncio.sleep(ACK_BATCH)  # gather: one transaction per batch
            wake.clear()
            await self._ack_now()

    async def _ack_now(self) -> None:
        if self._acked:
            ids, self._acked = self._acked, []
            self._rows.difference_update(ids)
            try:
                await self.outbox.ack(ids, sink="sparkplug")
            except _ERRORS as exc:
                log.error("outbox %s: cannot delete published rows (%s); they may be sent again", self.outbox.path, exc)
            self._counts.acked += len(ids)
        self._progress.set()
        if len(self._rows) < self.mqtt.window:
            self._wake_feeder.set()

    def _births(self, *, resumed: bool = True) -> None:
        """NBIRTH and every DBIRTH (seq from 0), then the outbox's rows; `resumed`: after a time of not
        publishing (a connect, the primary host back), so rows written until now are historical."""
        if not self._connected or not self._host_online:
            return
        now = self._clock()
        if resumed:
            self._born_at = now
        for message in self.node.births(self.bdseq, now):
            if not self._publish(message, None):
                return
        self._born = True
        log.info(
            "Sparkplug: %s/%s born (bdSeq %d, %d devices) on %s:%d",
            self.group,
            self.node_id,
            self.bdseq,
            len(self.node.devices),
            self.host,
            self.port,
        )
        self._wake_feeder.set()

    async def _shutdown(self) -> None:
        client = self._client
        try:
            with contextlib.suppress(*_ERRORS):
                await self._ack_now()
            if client is not None:
                if self._connected:
                    # a clean DISCONNECT makes the broker drop the will: say it ourselves
                    topic = node_topic(self.group, MessageType.NDEATH, self.node_id)
                    info = client.publish(topic, self.node.death(self.bdseq, self._clock()), qos=1, retain=False)
                    with contextlib.suppress(RuntimeError, ValueError):
                        await asyncio.to_thread(info.wait_for_publish, SHUTDOWN_WAIT)
                self._stopping = True
                client.disconnect()
                await asyncio.to_thread(client.loop_stop)
            if self._rows and self.outbox.is_open:
                with contextlib.suppress(*_ERRORS):
                    await self.outbox.release(sorted(self._rows), sink="sparkplug")
        finally:
            self._rows.clear()
            self._connected = self._counts.connected = self._born = False
            self._client = None

    # ------------------------------------------------------------ paho (its thread); results go to the loop

    def _make_client(self) -> Client:
        will = (node_topic(self.group, MessageType.NDEATH, self.node_id), self.node.death(self.bdseq, self._clock()))
        client, _ = make_client(
            self.mqtt,
            client_id=self.client_id,
            max_inflight=self.mqtt.window + 4,
            max_queued=0,  # the window bounds rows; births add one message per device
            will=will,
            will_retain=False,
            json=False,
        )
        delay = self.mqtt.reconnect_initial
        client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]
        client.on_socket_open = self._on_socket_open
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed while paho was still running
                loop.call_soon_threadsafe(fn, *args)

    def _next_delay(self, client: paho.Client) -> float:
        delay = backoff_delay(self._attempt, self.mqtt.reconnect_initial, self.mqtt.reconnect_max, self._rng)
        self._attempt += 1
        client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]
        return delay

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Properties | None
    ) -> None:
        if reason.is_failure:
            self._next_delay(client)
            self._call(self._failed, f"refused the connection: {reason}")
            return
        self._attempt = 0
        client.drop_out_messages()  # data of the lost connection: its rows go back and out again after births
        bdseq = self._next_bdseq
        # this CONNECT carried the will with `bdseq`: keep it, and arm the next CONNECT's will with the next one
        try:
            write_bdseq(self._bdseq_file, bdseq)
        except OSError as exc:
            log.warning("Sparkplug: cannot keep bdSeq in %s (%s); a restart starts again at 0", self._bdseq_file, exc)
        self._next_bdseq = (bdseq + 1) % 256
        death = self.node.death(self._next_bdseq, self._clock())
        client.will_set(node_topic(self.group, MessageType.NDEATH, self.node_id), death, qos=1, retain=False)
        client.subscribe(node_topic(self.group, MessageType.NCMD, self.node_id), qos=1)
        if self.host_id is not None:
            client.subscribe(state_topic(self.host_id), qos=1)
        self._call(self._connected_now, bdseq)

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        self._next_delay(client)
        kind, message = describe_failure(getattr(client, "last_error", None), self.host, self.port)
        self._call(self._failed, message, kind)

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Properties | None
    ) -> None:
        self._next_delay(client)
        self._call(self._disconnected, str(reason))

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Properties | None
    ) -> None:
        self._call(self._written, mid)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self._call(self._command, message.topic, bytes(message.payload))

    # ------------------------------------------------------------ back on the event loop

    def _connected_now(self, bdseq: int) -> None:
        self.bdseq = bdseq
        self._inflight.clear()
        self._release_all = True
        self._connected = self._counts.connected = True
        self._counts.connects += 1
        self._fail_kind = None
        log.info("Sparkplug: connected to %s:%d as %s (bdSeq %d)", self.host, self.port, self.client_id, bdseq)
        if self.host_id is None:
            self._births()
        else:
            # births only once this connection saw the host's (retained) STATE say online, as 3.0 asks
            self._host_online = False
            log.info(
                "Sparkplug: waiting for primary host %s to be online (%s)", self.host_id, state_topic(self.host_id)
            )
        self._wake_feeder.set()

    def _command(self, topic: str, payload: bytes) -> None:
        if self.host_id is not None and topic == state_topic(self.host_id):
            state = parse_state(payload)
            if state is None:
                log.warning("Sparkplug: %s is not a 3.0 STATE payload; ignored", topic)
                return
            online, ts = state
            if ts < self._host_ts:
                return  # an older STATE than one already seen (3.0: compare timestamps)
            self._host_ts = ts
            was, self._host_online = self._host_online, online
            if online and not self._born:
                log.info("Sparkplug: primary host %s is online", self.host_id)
                self._births()
            elif not online and was:
                log.warning("Sparkplug: primary host %s is offline; holding data in the outbox", self.host_id)
                self._born = False
                self._release_all = True
                self._wake_feeder.set()
            return
        if self.node.rebirth_requested(payload):
            self._rebirth_requests += 1
            log.info("Sparkplug: rebirth requested by %s", topic)
            if self._born:
                self._born = False
                self._births(resumed=False)

    def _written(self, mid: int) -> None:
        if mid not in self._inflight:
            return
        row = self._inflight.pop(mid)
        if row is not None and row in self._rows:
            self._acked.append(row)
            self._wake_acker.set()

    def _lost(self) -> None:
        if self._connected:
            self._counts.disconnects += 1
        self._connected = self._counts.connected = self._born = False
        self._inflight.clear()
        self._release_all = True
        self._wake_feeder.set()

    def _failed(self, message: str, kind: str = "refused") -> None:
        self._lost()
        self._counts.connect_failures += 1
        self._counts.last_error = message
        if kind != self._fail_kind:
            log.warning("Sparkplug: %s; retrying with backoff; messages wait in the outbox", message)
            self._fail_kind = kind

    def _disconnected(self, reason: str) -> None:
        was = self._connected
        self._lost()
        if was and not self._stopping:
            log.warning(
                "Sparkplug: connection to %s:%d lost (%s); buffering in the outbox", self.host, self.port, reason
            )
            self._fail_kind = "lost"
