"""MQTT input driver (paho): tags another gateway publishes, as Sparkplug B metrics or values in JSON payloads.

paho's network thread only queues each message (a bounded deque: a flood drops the oldest, counted); the
event loop drains the queue in slices, decodes, and pushes one batch per scan group with the newest value of
each tag the slice touched. Sparkplug births, aliases, seq and deaths are followed by `sparkplug.NodeWatch`;
JSON values are found by each tag's path (`jsonpath`) and checked against its type. A tag that is not updated
within its `stale_after` goes stale; a Sparkplug death makes its tags comms-lost; a lost broker connection is
found by `check()`, and the poller then marks every tag comms-lost and reconnects with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import secrets
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from edge_agent.drivers.base import DriverBase, Request, ScanGroup, group_by_interval
from edge_agent.drivers.mqtt import jsonpath
from edge_agent.drivers.mqtt.config import MqttDevice, ValueType
from edge_agent.drivers.mqtt.sparkplug import Malformed, NodeWatch, Unsupported
from edge_agent.errors import DeviceError
from edge_agent.sparkplug import NAMESPACE, REBIRTH, DataType, MessageType, node_topic, parse_topic
from edge_agent.sparkplug.proto import Payload
from edge_agent.tls import TlsSetupError, TlsVerify, client_context
from edge_agent.types import Quality, SampleBatch, Value

log = logging.getLogger("edge_agent.drivers.mqtt")

SLICE = 1000  # messages decoded per turn of the event loop: a flood never holds the loop for long
EXACT_LIMIT = 2**53  # integers beyond this lose precision as float64: kept exact beside the value
Sink = Callable[[SampleBatch], None]


@dataclass
class MqttCounters:
    """What the driver received and what it could not use (read through stats(); no I/O)."""

    received: int = 0  # messages taken from the queue
    malformed: int = 0  # payloads (or values in them) that could not be used
    dropped: int = 0  # messages dropped because max_queued were waiting (the oldest go)
    stale: int = 0  # times a tag went stale
    rebirths: int = 0  # NCMD Node Control/Rebirth requests sent
    untrusted: int = 0  # Sparkplug messages that showed a gap (seq, unknown alias, data before birth)
    historical: int = 0  # Sparkplug metrics skipped as is_historical
    deaths: int = 0  # Sparkplug NDEATH/DDEATH taken (their tags went comms-lost)


class MqttDriver(DriverBase):
    """One broker connection; every tag of the device is pushed (subscriptions), none polled."""

    def __init__(self, config: MqttDevice) -> None:
        super().__init__(config.name)
        self.config = config
        tags = config.tags
        self.names = tuple(t.name for t in tags)
        col = {name: i for i, name in enumerate(self.names)}
        self.subscriptions = [
            ScanGroup(interval, tuple(t.name for t in members)) for interval, members in group_by_interval(config, tags)
        ]
        self._group_cols = [np.asarray([col[t] for t in g.tags], dtype=np.intp) for g in self.subscriptions]
        n = len(tags)
        self._stale_after = np.asarray([config.stale_limit(t) for t in tags], dtype=np.float64)
        self._last = np.zeros(n)  # monotonic time of each tag's last update (or of the subscription)
        self._state = np.full(n, Quality.GOOD, dtype=np.uint8)  # the quality last pushed (GOOD before any)
        self._value = np.full(n, np.nan)
        self._seen = np.zeros(n, dtype=np.bool_)  # a message has set the tag since subscribing (for read)
        self._kinds = ["bool" if t.type is ValueType.BOOL else t.type.value for t in tags]
        self._exact: dict[int, Value] = {}
        self._touched: set[int] = set()  # tags changed since their group's last push
        self._due = [0.0] * len(self.subscriptions)  # monotonic time each group may be pushed again
        self._push_later: asyncio.TimerHandle | None = None
        # JSON: topic → (column, path steps, type); Sparkplug: metric name → columns
        self._json: dict[str, list[tuple[int, tuple[jsonpath.Step, ...], ValueType]]] = {}
        self._metrics: dict[str, list[int]] = {}
        for i, t in enumerate(tags):
            if t.topic is not None:
                self._json.setdefault(t.topic, []).append((i, t.steps(), t.type))
            elif t.metric is not None:
                self._metrics.setdefault(t.metric, []).append(i)
        src = config.sparkplug
        self._watch = NodeWatch(src, self._metrics) if src is not None and self._metrics else None
        self._sparkplug_cols = np.asarray(sorted(c for cs in self._metrics.values() for c in cs), dtype=np.intp)
        self.filters = list(self._json)
        if self._watch is not None and src is not None:
            # the node's messages and its devices' (a seq runs across both): spBv1.0/{group}/+/{node}/#
            self.filters.append(f"{NAMESPACE}/{src.group_id}/+/{src.edge_node_id}/#")
        self.counters = MqttCounters()
        self._queue: deque[tuple[str, bytes]] = deque()
        self._wake = False  # a drain is scheduled (set by paho's thread, cleared by the loop)
        self._client: paho.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sink: Sink | None = None
        self._connack: asyncio.Future[Any] | None = None
        self._suback: asyncio.Future[Any] | None = None
        self._arrived = asyncio.Event()
        self._stale_task: asyncio.Task[None] | None = None
        self._warned: set[str] = set()
        self._last_rebirth = -math.inf

    def stats(self) -> dict[str, int]:
        """The counters, copied (the poller's stats carry them to /metrics with the device label)."""
        return dataclasses.asdict(self.counters)

    # ------------------------------------------------------------------------------------------- connection

    async def connect(self) -> None:
        """Connect to the broker and wait for its CONNACK; DeviceError when it cannot be reached or refuses."""
        cfg = self.config
        self._loop = asyncio.get_running_loop()
        url = urlsplit(cfg.url)
        host, port = url.hostname or "", url.port or (8883 if url.scheme == "mqtts" else 1883)
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id or f"edge-agent-{cfg.name}-{secrets.token_hex(3)}",
            clean_session=True,
            protocol=MQTTProtocolVersion.MQTTv311,
            reconnect_on_failure=False,  # the poller reconnects, with backoff, and marks the tags meanwhile
        )
        client.connect_timeout = cfg.timeout
        try:
            password = cfg.password_text()
        except OSError as exc:
            raise DeviceError(self.name, f"cannot read password_file {cfg.password_file}: {exc.strerror}") from None
        if cfg.username is not None or password is not None:
            client.username_pw_set(cfg.username or "", password)
        if url.scheme == "mqtts":
            try:
                client.tls_set_context(await asyncio.to_thread(client_context, cfg.tls, "tls"))
            except TlsSetupError as exc:
                raise DeviceError(self.name, str(exc)) from None
            if cfg.tls is not None and cfg.tls.verify is TlsVerify.NONE:
                client.tls_insecure_set(True)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._connack = self._loop.create_future()
        self._client = client
        where = f"MQTT broker {host}:{port}"
        try:
            async with asyncio.timeout(cfg.timeout + 1.0):
                await asyncio.to_thread(client.connect, host, port, int(cfg.keepalive))
                client.loop_start()
                reason = await self._connack
        except TimeoutError:
            raise DeviceError(self.name, f"{where} did not answer within {cfg.timeout:g}s") from None
        except ssl.SSLCertVerificationError as exc:
            why = exc.verify_message or str(exc)
            raise DeviceError(
                self.name, f"{where}: its TLS certificate does not verify ({why}); check tls.ca and the name it holds"
            ) from None
        except OSError as exc:  # refused, unreachable, and other TLS failures (ssl.SSLError is an OSError)
            raise DeviceError(self.name, f"{where} is unreachable ({getattr(exc, 'reason', None) or exc})") from None
        if reason.is_failure:
            raise DeviceError(self.name, f"{where} refused the connection: {reason} (check username and password)")

    async def subscribe(self, sink: Sink) -> None:
        """Subscribe to every tag's topic and wait for the SUBACK; messages then reach `sink` as batches."""
        client, loop = self._live()
        self._sink = sink
        self._suback = loop.create_future()
        topics: list[tuple[str, int]] = [(f, self.config.qos) for f in self.filters]
        result, _ = client.subscribe(topics)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise DeviceError(self.name, f"cannot subscribe: {paho.error_string(result)}")
        try:
            async with asyncio.timeout(self.config.timeout):
                codes = await self._suback
        except TimeoutError:
            why = f"the broker did not acknowledge the subscription in {self.config.timeout:g}s"
            raise DeviceError(self.name, why) from None
        refused = [f for f, code in zip(self.filters, codes, strict=False) if code.is_failure]
        if refused:
            raise DeviceError(self.name, f"the broker refused the subscription to {', '.join(refused)} (its ACL?)")
        self._last[:] = time.monotonic()  # staleness counts from now
        if self._stale_task is None:
            self._stale_task = asyncio.create_task(self._watch_staleness(), name=f"mqtt-stale-{self.name}")

    async def check(self) -> None:
        """DeviceError when the broker connection is gone (paho noticed: a socket error or missed keep-alives)."""
        if self._client is None or not self._client.is_connected():
            raise DeviceError(self.name, "the connection to the MQTT broker was lost")

    async def read(self, group: ScanGroup) -> SampleBatch:
        """For `edge-agent read`: subscribe, wait up to `timeout` for every tag of the group, return the latest."""
        if self._sink is None:
            await self.subscribe(lambda batch: None)
        cols = self._group_cols[self.subscriptions.index(group)]
        deadline = time.monotonic() + self.config.timeout
        while not self._seen[cols].all() and (left := deadline - time.monotonic()) > 0:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._arrived.wait()
        quality = np.where(self._seen[cols], self._state[cols], Quality.STALE).astype(np.uint8)
        values = np.where(quality == Quality.GOOD, self._value[cols], np.nan)
        exact = {j: self._exact[int(c)] for j, c in enumerate(cols) if int(c) in self._exact and quality[j] == 0}
        return SampleBatch(
            self.name, time.time(), group.tags, values, quality, exact, tuple(self._kinds[int(c)] for c in cols)
        )

    async def close(self) -> None:
        """Stop the staleness watch, disconnect and stop paho's thread; safe to call twice."""
        if self._stale_task is not None:
            self._stale_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stale_task
            self._stale_task = None
        if self._push_later is not None:
            self._push_later.cancel()
            self._push_later = None
        client, self._client = self._client, None
        self._sink = None
        if client is not None:
            client.disconnect()
            await asyncio.to_thread(client.loop_stop)  # joins paho's thread

    def _live(self) -> tuple[paho.Client, asyncio.AbstractEventLoop]:
        if self._client is None or self._loop is None:
            raise DeviceError(self.name, "not connected")
        return self._client, self._loop

    # ----------------------------------------------------------------------- paho's thread: hand over only

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._resolve(self._connack, reason)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, properties: Any) -> None:
        self._resolve(self._suback, codes)

    def _resolve(self, future: asyncio.Future[Any] | None, value: Any) -> None:
        if future is None or self._loop is None:
            return

        def done() -> None:
            if not future.done():
                future.set_result(value)

        self._loop.call_soon_threadsafe(done)

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        queue = self._queue
        if len(queue) >= self.config.max_queued:
            queue.popleft()  # the oldest: a tag's newest value matters most
            self.counters.dropped += 1
        queue.append((msg.topic, bytes(msg.payload)))
        if not self._wake and self._loop is not None:
            self._wake = True
            with contextlib.suppress(RuntimeError):  # the loop closed while paho's thread still ran
                self._loop.call_soon_threadsafe(self._drain)

    # ------------------------------------------------------------------------ the event loop: decode, push

    def _drain(self) -> None:
        """Decode up to SLICE queued messages, push what they changed, and come back for the rest."""
        self._wake = False
        queue = self._queue
        for _ in range(min(len(queue), SLICE)):
            topic, payload = queue.popleft()
            self.counters.received += 1
            if topic.startswith(f"{NAMESPACE}/"):
                self._on_sparkplug(topic, payload)
            else:
                self._on_json(topic, payload)
        if self.counters.dropped and "dropped" not in self._warned:
            self._warned.add("dropped")
            log.warning(
                "device %s: messages arrive faster than they are decoded: more than max_queued (%d) waited, the "
                "oldest are dropped (counted)",
                self.name,
                self.config.max_queued,
            )
        if self._touched:
            self._arrived.set()  # for read()
            if self._push_later is None:  # else a push is due at the end of a group's interval
                self._push()
        if queue and self._loop is not None and not self._wake:
            self._wake = True
            self._loop.call_soon(self._drain)

    def _on_json(self, topic: str, payload: bytes) -> None:
        routes = self._json.get(topic)
        if routes is None:
            return  # a topic the broker sent without our asking (an overlapping subscription of this client)
        try:
            doc = json.loads(payload)
        except (UnicodeDecodeError, ValueError) as exc:
            self._malformed(topic, f"not JSON ({exc})", [c for c, _, _ in routes])
            return
        for col, steps, kind in routes:
            tag = self.config.tags[col]
            try:
                value = jsonpath.extract(doc, steps)
            except LookupError as exc:
                self._malformed(f"{topic} {tag.path}", f"path {tag.path}: {exc}", [col])
                continue
            if value is None:
                self._set(col, None)  # the publisher says it has no value
                continue
            typed = _typed(value, kind)
            if typed is None:
                what = type(value).__name__ if not isinstance(value, dict | list) else "an object or list"
                self._malformed(f"{topic} {tag.path}", f"path {tag.path} holds {what} {value!r:.40}, not {kind}", [col])
                continue
            self._set(col, typed)

    def _on_sparkplug(self, topic: str, payload: bytes) -> None:
        src, watch = self.config.sparkplug, self._watch
        if src is None or watch is None:
            return
        parsed = parse_topic(topic)
        if parsed is None or parsed.group != src.group_id or parsed.node != src.edge_node_id:
            self._malformed(topic, "not a Sparkplug B topic of the configured node", [])
            return
        try:
            out = watch.on_message(parsed, payload)
        except Malformed as exc:
            self._malformed(topic, str(exc), [])
            return
        if out.note is not None:
            log.info("device %s: %s", self.name, out.note)
        self.counters.historical += out.historical
        if out.rebirth is not None:
            self._untrusted(out.rebirth)
        for name, value in out.values.items():
            for col in self._metrics[name]:
                if isinstance(value, Unsupported):
                    self._malformed(f"{topic} {name}", f"metric {name} holds a {value.field}, not a scalar", [col])
                else:
                    self._set(col, value)
        if out.dead:
            self.counters.deaths += 1
            what = f"{parsed.type} ({src.group_id}/{src.edge_node_id}{'/' + parsed.device if parsed.device else ''})"
            log.warning("device %s: %s: %d tags comms-lost until the next birth", self.name, what, len(self._metrics))
            for col in self._sparkplug_cols:
                self._set(int(col), None, Quality.COMMS_LOST)

    def _untrusted(self, why: str) -> None:
        """What this host holds of the node cannot be trusted: ask for a rebirth (at most once per interval)."""
        src, client = self.config.sparkplug, self._client
        self.counters.untrusted += 1
        if src is None or client is None or not src.request_rebirth:
            if "untrusted" not in self._warned:
                self._warned.add("untrusted")
                log.warning(
                    "device %s: Sparkplug %s; request_rebirth is off: waiting for the node's next birth", self.name, why
                )
            return
        now = time.monotonic()
        if now - self._last_rebirth < src.rebirth_interval:
            return
        self._last_rebirth = now
        cmd = Payload()
        cmd.timestamp = int(time.time() * 1000)
        metric = cmd.metrics.add()
        metric.name = REBIRTH
        metric.datatype = DataType.BOOLEAN
        metric.boolean_value = True
        client.publish(node_topic(src.group_id, MessageType.NCMD, src.edge_node_id), cmd.SerializeToString(), qos=0)
        self.counters.rebirths += 1
        log.info(
            "device %s: Sparkplug %s: asked node %s/%s for a rebirth", self.name, why, src.group_id, src.edge_node_id
        )

    def _malformed(self, key: str, why: str, cols: list[int]) -> None:
        """Count a payload or value that cannot be used; its tags go bad. WARNING once per topic (and path)."""
        self.counters.malformed += 1
        if key in self._warned:
            log.debug("device %s: %s: %s", self.name, key, why)
        else:
            self._warned.add(key)
            log.warning("device %s: %s: %s; counted, and logged once", self.name, key, why)
        for col in cols:
            self._set(col, None)

    def _set(self, col: int, value: Any, quality: Quality = Quality.GOOD) -> None:
        """A tag's new value (None: bad, or `quality`), kept until the slice is pushed."""
        self._exact.pop(col, None)
        if value is None:
            number, quality = math.nan, (quality if quality != Quality.GOOD else Quality.BAD)
        elif isinstance(value, bool):
            number, self._kinds[col] = float(value), "bool"
        elif isinstance(value, int):
            number, self._kinds[col] = float(value), "int"
            if abs(value) > EXACT_LIMIT:
                self._exact[col] = value
        elif isinstance(value, float):
            number, self._kinds[col] = value, "float"
        else:
            number, self._kinds[col] = math.nan, "str"
            self._exact[col] = str(value)
        self._value[col] = number
        self._state[col] = quality
        self._seen[col] = True
        self._last[col] = time.monotonic()
        self._touched.add(col)

    def _push(self, now: float | None = None) -> None:
        """One batch per scan group with the tags changed since its last push, at most one per group interval.

        A publisher may send faster than the interval the buffers were sized for (a subscription's ring holds
        one sample per interval): changes within an interval are merged, the newest value wins, and the group
        is pushed when its interval is up.
        """
        if self._push_later is not None:
            self._push_later.cancel()  # (a no-op when it is this call)
            self._push_later = None
        if not self._touched:
            return
        if self._sink is None:
            self._touched.clear()
            return
        now = time.monotonic() if now is None else now
        touched = np.zeros(len(self.names), dtype=np.bool_)
        touched[list(self._touched)] = True
        self._touched.clear()
        wait = math.inf
        stamp = time.time()
        for i, (group, cols) in enumerate(zip(self.subscriptions, self._group_cols, strict=True)):
            mine = cols[touched[cols]]
            if not len(mine):
                continue
            if now < self._due[i]:
                wait = min(wait, self._due[i] - now)
                self._touched.update(int(c) for c in mine)
                continue
            self._due[i] = now + group.interval
            tags = group.tags if len(mine) == len(cols) else tuple(self.names[int(c)] for c in mine)
            exact = {j: self._exact[int(c)] for j, c in enumerate(mine) if int(c) in self._exact}
            kinds = tuple(self._kinds[int(c)] for c in mine)
            values, quality = self._value[mine].copy(), self._state[mine].copy()
            self._sink(SampleBatch(self.name, stamp, tags, values, quality, exact, kinds))
        if self._touched and self._loop is not None:
            self._push_later = self._loop.call_later(wait, self._push)

    async def _watch_staleness(self) -> None:
        """Mark tags stale that were not updated within their stale_after, checking a few times per limit."""
        step = float(np.clip(self._stale_after.min() / 4.0, 0.05, 5.0))
        while True:
            await asyncio.sleep(step)
            self.mark_stale(time.monotonic())

    def mark_stale(self, now: float) -> None:
        """Tags (good or bad) not updated within their stale_after go stale; one log line per sweep that finds any."""
        fresh = (self._state == Quality.GOOD) | (self._state == Quality.BAD)
        cols = np.flatnonzero(fresh & (now - self._last > self._stale_after))
        if not len(cols):
            return
        self.counters.stale += len(cols)
        names = [self.names[int(c)] for c in cols]
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        log.info("device %s: %s%s stale (no update within stale_after)", self.name, ", ".join(names[:5]), more)
        for col in cols:
            last = self._last[col]
            self._set(int(col), None, Quality.STALE)
            self._last[col] = last  # staleness does not refresh the tag
        self._push(now)

    # ------------------------------------------------------------------------------------------ the plan

    def plan(self) -> list[str]:
        """Where the tags come from (broker, Sparkplug scope, JSON topics), then per group when they go stale."""
        src, tags = self.config.sparkplug, self.config.tags
        n_metrics = sum(1 for t in tags if t.metric is not None)
        sources = []
        if n_metrics and src is not None:
            scope = f"{src.group_id}/{src.edge_node_id}" + (f"/{src.device_id}" if src.device_id else "")
            sources.append(f"{_count(n_metrics, 'Sparkplug B metric')} of {scope}")
        if self._json:
            sources.append(f"{_count(len(tags) - n_metrics, 'JSON value')} on {_count(len(self._json), 'topic')}")
        lines = [f"{self.config.url}: {', '.join(sources)}"]
        for group, cols in zip(self.subscriptions, self._group_cols, strict=True):
            stale = self._stale_after[cols]
            limit = f"{stale.min():g}s" if stale.min() == stale.max() else f"{stale.min():g}–{stale.max():g}s"
            lines.append(f"{_count(len(cols), 'tag')} expected every {group.interval:g}s (stale after {limit})")
        return lines

    def requests(self) -> dict[ScanGroup, list[Request]]:
        """Each group's topic filters, with the tags each brings."""
        out: dict[ScanGroup, list[Request]] = {}
        spb = self.filters[-1] if self._watch is not None else None
        for group in self.subscriptions:
            by_filter: dict[str, list[str]] = {}
            for name in group.tags:
                tag = self.config.tags[self.names.index(name)]
                key = f"{tag.topic} (JSON)" if tag.topic is not None else f"{spb} (Sparkplug B)"
                by_filter.setdefault(key, []).append(name)
            out[group] = [Request(label, tuple(tags)) for label, tags in by_filter.items()]
        return out


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


def _typed(value: Any, kind: ValueType) -> float | int | bool | str | None:
    """A JSON value as the tag's type, or None when it is not one (a bool is no number, "1" no int)."""
    if kind is ValueType.BOOL:
        return value if isinstance(value, bool) else None
    if kind is ValueType.STR:
        return value if isinstance(value, str) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if kind is ValueType.INT:
        if isinstance(value, float) and not value.is_integer():
            return None
        return int(value)
    return float(value)
