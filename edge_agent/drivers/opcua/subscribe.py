"""Subscriptions: one per sampling interval, monitored items with data-change filters, publishes into batches."""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from asyncua import Client, ua
from asyncua.common.utils import Buffer
from asyncua.ua.ua_binary import struct_from_binary, struct_to_binary

from edge_agent.drivers.base import ScanGroup
from edge_agent.drivers.opcua import logs
from edge_agent.drivers.opcua.codecs import (
    _PUBLISH_REQUEST,
    Change,
    DataChanges,
    _change,
    _convert,
    _not_array,
    _pick,
    _status_name,
    _Unusable,
    decode_publish_response,
)
from edge_agent.drivers.opcua.config import DeadbandType, OpcUaTag, Timestamps
from edge_agent.drivers.opcua.session import OpcUaSession, Sink, _describe, _send_encoded
from edge_agent.errors import DeviceError
from edge_agent.types import Quality, SampleBatch, Value

log = logging.getLogger("edge_agent.drivers.opcua")


_FILTER_REFUSED = {
    ua.StatusCodes.BadFilterNotAllowed,
    ua.StatusCodes.BadMonitoredItemFilterInvalid,
    ua.StatusCodes.BadMonitoredItemFilterUnsupported,
    ua.StatusCodes.BadDeadbandFilterInvalid,
}
KEEPALIVE_TARGET = 5.0  # seconds between keep-alives of a quiet subscription


@dataclass
class _Sub:
    group: ScanGroup
    subscription_id: int = 0
    silence_limit: float = 0.0  # seconds without any publish (data or keep-alive) that mean it is dead
    last_seen: float = field(default_factory=time.monotonic)
    ranged: set[int] = field(default_factory=set)  # columns monitored with an IndexRange


@dataclass
class _Round:
    """The k-th change of each tag in one publish: one batch for the buffers."""

    cols: list[int] = field(default_factory=list)
    vals: list[float] = field(default_factory=list)
    quals: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    exact: dict[int, Value] = field(default_factory=dict)


class OpcUaSubscriptions(OpcUaSession):
    """Monitored items whose data changes the server publishes; a dead session or subscription is found by check()."""

    async def subscribe(self, sink: Sink) -> None:
        """One subscription per sampling interval; each publish reaches `sink` as batches of changes."""
        client = self._live()
        self._sink = sink
        generation = self._generation
        if self._fast:
            _install_fast_publish(client, self.name)
        device = logs.DEVICE.set(self.name)  # the publish loop asyncua starts here names this device in its log lines
        try:
            for group in self.subscriptions:
                await self._subscribe_group(client, group, generation)
        except (OSError, TimeoutError, ua.UaError) as exc:
            raise DeviceError(
                self.name, f"cannot create the subscriptions: {_describe(exc, self.config.timeout)}"
            ) from exc
        finally:
            logs.DEVICE.reset(device)

    async def _subscribe_group(self, client: Client, group: ScanGroup, generation: int) -> None:
        cfg = self.config
        ms = group.interval * 1000.0
        keepalive = max(3, math.ceil(KEEPALIVE_TARGET / group.interval))
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=ms,
            RequestedLifetimeCount=keepalive * 10,  # the spec wants at least 3 keep-alive periods
            RequestedMaxKeepAliveCount=keepalive,
            MaxNotificationsPerPublish=0,
            PublishingEnabled=True,
            Priority=0,
        )
        sub = _Sub(group)
        result = await client.uaclient.create_subscription(params, self._on_publish(sub, generation))
        sub.subscription_id = result.SubscriptionId
        revised = max(result.RevisedPublishingInterval, 1.0) / 1000.0
        sub.silence_limit = 2.0 * revised * max(result.RevisedMaxKeepAliveCount, 1) + cfg.timeout + 1.0
        sub.last_seen = time.monotonic()
        self._subs[sub.subscription_id] = sub
        tags = self._tags[group]
        plan = self._plans[group]
        requests: list[tuple[int, ua.MonitoredItemCreateRequest]] = []
        ts_return = {
            Timestamps.SOURCE: ua.TimestampsToReturn.Both,
            Timestamps.SERVER: ua.TimestampsToReturn.Server,
            Timestamps.AGENT: ua.TimestampsToReturn.Neither,
        }[cfg.timestamps]
        for chunk in plan.chunks:
            for col, rv in zip(chunk.cols, chunk.params.NodesToRead, strict=True):
                tag = tags[col]
                mp = ua.MonitoringParameters()
                mp.ClientHandle = col
                mp.SamplingInterval = ms
                mp.QueueSize = tag.queue_size
                mp.DiscardOldest = True
                if tag.deadband is not None:
                    mp.Filter = ua.DataChangeFilter(
                        Trigger=ua.DataChangeTrigger.StatusValue,
                        DeadbandType=(
                            ua.DeadbandType.Absolute
                            if tag.deadband.type is DeadbandType.ABSOLUTE
                            else ua.DeadbandType.Percent
                        ).value,
                        DeadbandValue=tag.deadband.value,
                    )
                if rv.IndexRange:
                    sub.ranged.add(col)
                req = ua.MonitoredItemCreateRequest()
                req.ItemToMonitor = rv
                req.MonitoringMode = ua.MonitoringMode.Reporting
                req.RequestedParameters = mp
                requests.append((col, req))
        problems: list[tuple[int, str]] = [
            (c, f"is in namespace {tags[c].node.uri}, which the server does not have") for c in plan.missing
        ]
        step = self._max_items_per_call
        for start in range(0, len(requests), step):
            part = requests[start : start + step]
            create = ua.CreateMonitoredItemsParameters()
            create.SubscriptionId = sub.subscription_id
            create.TimestampsToReturn = ts_return
            create.ItemsToCreate = [r for _, r in part]
            results = await client.uaclient.create_monitored_items(create)
            for (col, _), res in zip(part, results, strict=True):
                if not res.StatusCode.is_good():
                    problems.append((col, f"cannot be monitored: {res.StatusCode.name}{_filter_hint(tags[col], res)}"))
        if problems:
            cols = [c for c, _ in problems]
            n = len(cols)
            q = np.full(n, Quality.BAD, dtype=np.uint8)
            self._report(tags, problems, ())
            if self._sink is not None:
                self._sink(
                    SampleBatch(self.name, time.time(), tuple(group.tags[c] for c in cols), np.full(n, np.nan), q)
                )

    def _on_publish(self, sub: _Sub, generation: int) -> Callable[[Any], None]:
        def callback(result: Any) -> None:  # a ua.PublishResult, or _PublishResult from decode_publish_response
            if generation != self._generation:
                return  # a late answer for a session already closed
            sub.last_seen = time.monotonic()
            data = result.NotificationMessage.NotificationData
            if not data:
                return  # keep-alive
            try:
                for notification in data:
                    if isinstance(notification, DataChanges):
                        self._deliver(sub, notification.items)
                    elif isinstance(notification, ua.DataChangeNotification):
                        self._deliver(sub, [_change(i) for i in notification.MonitoredItems])
                    elif isinstance(notification, ua.StatusChangeNotification):
                        status = notification.Status
                        if status is not None and not status.is_good():
                            self._sub_failure = f"subscription {sub.subscription_id} ended: {status.name}"
            except Exception:  # the publish loop would swallow it: say once what went wrong
                if self._sub_failure is None:
                    log.exception("device %s: cannot handle a data change", self.name)
                self._sub_failure = "a data change could not be handled (see the log)"

        return callback

    def _deliver(self, sub: _Sub, items: Iterable[Change]) -> None:
        """Turn one publish's data changes into batches: round k holds the k-th change of each tag."""
        group = sub.group
        tags = self._tags[group]
        now = time.time()
        stamp = self.config.timestamps
        # servers list a tag's queued changes together (queue_size > 1); one batch per change would
        # cost a buffer write each, so changes are dealt into rounds, and each tag's order is kept
        rounds: list[_Round] = []
        depth: dict[int, int] = {}
        problems: list[tuple[int, str | _Unusable]] = []
        good: list[int] = []
        for col, status, vt, v, is_array, src, srv in items:
            if col >= len(tags):
                continue
            k = depth.get(col, 0)
            depth[col] = k + 1
            if k == len(rounds):
                rounds.append(_Round())
            r = rounds[k]
            t = now
            if stamp is Timestamps.SOURCE:
                t = src or srv or now
            elif stamp is Timestamps.SERVER:
                t = srv or now
            r.cols.append(col)
            r.times.append(t)
            value, q, kind = math.nan, Quality.BAD, "float"
            if status >> 30:
                q = Quality.UNCERTAIN if status >> 30 == 1 else Quality.BAD
                if status >> 31:
                    problems.append((col, f"reads {_status_name(status)}"))
            else:
                try:
                    if is_array or tags[col].index is not None:
                        v = _pick(v, tags[col].index, col in sub.ranged) if is_array else _not_array(tags[col].index)
                    value, x, kind = _convert(vt, v)
                    q = Quality.GOOD
                    if x is not None:
                        r.exact[len(r.cols) - 1] = x
                except _Unusable as exc:
                    problems.append((col, exc))
            r.vals.append(value)
            r.quals.append(q)
            r.kinds.append(kind)
            if q == Quality.GOOD:
                good.append(col)
        for r in rounds:
            self._emit(group, r.cols, r.vals, r.quals, r.times, r.kinds, r.exact, now)
        if problems or self._bad:
            self._report(tags, problems, good)

    def _emit(
        self,
        group: ScanGroup,
        cols: list[int],
        vals: list[float],
        quals: list[int],
        times: list[float],
        kinds: list[str],
        exact: dict[int, Value],
        now: float,
    ) -> None:
        sink = self._sink
        if sink is None:
            return
        n = len(cols)
        if n == len(group.tags):
            # every tag of the group changed: hand over the group's own tuple, in its order (buffers' fast path)
            order = np.argsort(np.asarray(cols, dtype=np.intp), kind="stable")
            remap = {int(old): new for new, old in enumerate(order)}
            batch = SampleBatch(
                self.name,
                now,
                group.tags,
                np.asarray(vals, dtype=np.float64)[order],
                np.asarray(quals, dtype=np.uint8)[order],
                {remap[i]: x for i, x in exact.items()},
                tuple(kinds[i] for i in order),
                np.asarray(times, dtype=np.float64)[order],
            )
        else:
            names = group.tags
            batch = SampleBatch(
                self.name,
                now,
                tuple(names[c] for c in cols),
                np.asarray(vals, dtype=np.float64),
                np.asarray(quals, dtype=np.uint8),
                dict(exact),
                tuple(kinds),
                np.asarray(times, dtype=np.float64),
            )
        sink(batch)

    async def check(self) -> None:
        """Raise DeviceError when the session, or a subscription, is dead: state, keep-alives, then a cheap read."""
        client = self._live()
        if self._sub_failure is not None:
            raise DeviceError(self.name, self._sub_failure)
        now = time.monotonic()
        for sub in self._subs.values():
            silent = now - sub.last_seen
            if silent > sub.silence_limit:
                raise DeviceError(
                    self.name,
                    f"subscription {sub.subscription_id} ({len(sub.group.tags)} tags at {sub.group.interval:g}s) "
                    f"sent nothing, not even a keep-alive, for {silent:.0f}s",
                )
        params = ua.ReadParameters()
        params.NodesToRead = [
            ua.ReadValueId(
                NodeId=ua.NodeId(ua.Int32(ua.ObjectIds.Server_ServerStatus_CurrentTime)),
                AttributeId=ua.AttributeIds.Value,
            )
        ]
        try:
            async with asyncio.timeout(self.config.timeout + 0.5):
                await client.uaclient.read(params)
        except (OSError, TimeoutError, ua.UaError) as exc:
            raise DeviceError(self.name, f"no answer to a status read: {_describe(exc, self.config.timeout)}") from exc


def _install_fast_publish(client: Client, device: str) -> bool:
    """Have asyncua's publish loop send through `_send_encoded` and decode with decode_publish_response.

    asyncua's generic decoder costs ~10 µs per data change; the loop itself (acknowledgements,
    BadTimeout and BadNoSubscription handling) stays asyncua's. Replaces `publish` on this client's
    session object only.
    """
    session = client.uaclient.session
    if not hasattr(session, "_publish_loop") or not callable(getattr(session, "publish", None)):
        return False
    failed = False

    async def publish(acks: list[ua.SubscriptionAcknowledgement] | None) -> Any:
        nonlocal failed
        params = ua.PublishParameters()
        params.SubscriptionAcknowledgements = list(acks or [])
        body = await _send_encoded(
            client, _PUBLISH_REQUEST, ua.RequestHeader(), struct_to_binary(params), 0, "PublishRequest"
        )
        if not failed:
            try:
                return decode_publish_response(body)
            except (ValueError, IndexError, struct.error, ua.UaError) as exc:
                if isinstance(exc, ua.UaStatusCodeError):
                    raise
                failed = True  # something this decoder does not know: asyncua's own from now on
                log.warning("device %s: cannot decode a Publish answer (%s); using asyncua's decoder", device, exc)
        return struct_from_binary(ua.PublishResponse, Buffer(body))

    session.publish = publish  # type: ignore[method-assign]
    return True


def _filter_hint(tag: OpcUaTag, result: ua.MonitoredItemCreateResult) -> str:
    """What to do when a server refuses a tag's deadband (the tag goes bad, the device stays up)."""
    if tag.deadband is None or result.StatusCode.value not in _FILTER_REFUSED:
        return ""
    if tag.deadband.type is DeadbandType.PERCENT:
        return " (the server refuses its percent deadband, which needs an EURange on the node): use type: absolute"
    return " (the server refuses its deadband): remove it, or ask the server's vendor which filters it supports"
