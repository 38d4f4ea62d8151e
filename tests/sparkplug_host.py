"""An independent Sparkplug B host application for tests, consuming as Ignition's MQTT Engine does.

It decodes with `sparkplug_wire` (hand-written, no google.protobuf), never with the agent's own schema, and
keeps what a SCADA host keeps: per edge node its bdSeq and seq, per device its tags (name, type, unit,
description, value, stale) created from births, updated through aliases, marked stale by deaths. Every
inconsistency a host would flag (a seq gap, data before a birth, an unknown alias, an NDEATH whose bdSeq is
not the NBIRTH's) is recorded in `problems`.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from sparkplug_wire import DataType, Metric, Payload, _signed, decode, encode


@dataclass
class HostTag:
    """A tag as the host created it from a birth."""

    name: str
    datatype: int
    unit: str | None
    description: str | None
    value: Any = None
    stale: bool = False
    historical: bool = False


@dataclass
class Seen:
    """One message as received: its type, device and decoded payload."""

    type: str
    device: str | None
    payload: Payload
    at: float


@dataclass
class HostNode:
    """What the host knows of one edge node."""

    bdseq: int | None = None
    seq: int | None = None
    online: bool = False
    devices: dict[str, dict[str, HostTag]] = field(default_factory=dict)
    aliases: dict[tuple[str | None, int], str] = field(default_factory=dict)
    node_metrics: dict[str, HostTag] = field(default_factory=dict)


class SparkplugHost:
    """Subscribes to `spBv1.0/{group}/#`, decodes every message independently and keeps a host's view."""

    def __init__(self, port: int, group: str, host_id: str | None = None) -> None:
        self.group = group
        self.host_id = host_id
        self.nodes: dict[str, HostNode] = {}
        self.seen: list[Seen] = []
        self.problems: list[str] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.connects = 0  # accepted CONNECTs, each followed by the subscription (a broker restart adds one)
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"host-{secrets.token_hex(3)}"
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=5)
        self.client.loop_start()
        if not self._subscribed.wait(5):
            raise RuntimeError("the host did not subscribe")

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe(f"spBv1.0/{self.group}/#", qos=1)
        self.connects += 1
        self._subscribed.set()

    # ------------------------------------------------------------ what a test asks

    def of(self, type_: str, device: str | None = None) -> list[Seen]:
        """Messages of a type (and device), in arrival order."""
        with self._lock:
            return [s for s in self.seen if s.type == type_ and (device is None or s.device == device)]

    def node(self, name: str) -> HostNode:
        """The host's view of a node (empty before its first message)."""
        with self._lock:
            return self.nodes.setdefault(name, HostNode())

    def rebirth(self, node: str) -> None:
        """Send NCMD Node Control/Rebirth = true, as a host does for a node it lost track of."""
        payload = Payload(
            timestamp=int(time.time() * 1000),
            metrics=[Metric(name="Node Control/Rebirth", datatype=DataType.BOOLEAN, value=True)],
        )
        self.client.publish(f"spBv1.0/{self.group}/NCMD/{node}", encode(payload), qos=0)

    def state(self, online: bool, ts_ms: int) -> None:
        """Publish this host's retained 3.0 STATE (`spBv1.0/STATE/{host_id}`)."""
        assert self.host_id is not None
        body = f'{{"online":{"true" if online else "false"},"timestamp":{ts_ms}}}'.encode()
        self.client.publish(f"spBv1.0/STATE/{self.host_id}", body, qos=1, retain=True).wait_for_publish(5)

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()

    # ------------------------------------------------------------ consuming

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        if len(parts) < 4 or parts[1] != self.group:
            return
        type_, node_id = parts[2], parts[3]
        device = parts[4] if len(parts) > 4 else None
        try:
            payload = decode(bytes(msg.payload))
        except Exception as exc:  # a host logs what it cannot decode
            self.problems.append(f"{msg.topic}: cannot decode: {exc}")
            return
        with self._lock:
            self.seen.append(Seen(type_, device, payload, time.monotonic()))
            node = self.nodes.setdefault(node_id, HostNode())
            handler = getattr(self, f"_{type_.lower()}", None)
            if handler is not None:
                handler(node, device, payload)

    def _check_seq(self, node: HostNode, payload: Payload, what: str) -> None:
        if payload.seq is None:
            self.problems.append(f"{what} without seq")
            return
        if node.seq is not None and payload.seq != (node.seq + 1) % 256:
            self.problems.append(f"{what}: seq {payload.seq} after {node.seq}")
        node.seq = payload.seq

    def _tag(self, m: Metric) -> HostTag:
        props = m.properties or {}
        unit = props.get("engUnit")
        desc = props.get("description")
        return HostTag(
            m.name or "",
            m.datatype or 0,
            unit.value if unit else None,
            desc.value if desc else None,
            None if m.is_null else m.value,
            historical=m.is_historical,
        )

    def _nbirth(self, node: HostNode, device: str | None, payload: Payload) -> None:
        if payload.seq != 0:
            self.problems.append(f"NBIRTH seq {payload.seq}, not 0")
        node.seq = payload.seq
        node.bdseq = payload.metric("bdSeq").value
        node.online = True
        node.aliases = {k: v for k, v in node.aliases.items() if k[0] is not None}
        node.node_metrics = {}
        for m in payload.metrics:
            if m.name != "bdSeq":
                node.node_metrics[m.name or ""] = self._tag(m)
                if m.alias is not None:
                    node.aliases[(None, m.alias)] = m.name or ""

    def _ndeath(self, node: HostNode, device: str | None, payload: Payload) -> None:
        bdseq = payload.metric("bdSeq").value
        if bdseq != node.bdseq:
            self.problems.append(f"NDEATH bdSeq {bdseq} does not match the NBIRTH's {node.bdseq}: ignored")
            return
        node.online = False
        for tags in node.devices.values():
            for tag in tags.values():
                tag.stale = True

    def _ndata(self, node: HostNode, device: str | None, payload: Payload) -> None:
        self._check_seq(node, payload, "NDATA")
        for m in payload.metrics:
            name = m.name or node.aliases.get((None, m.alias or -1))
            if name is None or name not in node.node_metrics:
                self.problems.append(f"NDATA: unknown metric alias {m.alias}")
                continue
            tag = node.node_metrics[name]
            tag.value, tag.historical = (None if m.is_null else m.value), m.is_historical

    def _dbirth(self, node: HostNode, device: str | None, payload: Payload) -> None:
        self._check_seq(node, payload, f"DBIRTH {device}")
        if not node.online:
            self.problems.append(f"DBIRTH {device} before an NBIRTH")
        tags = {}
        for m in payload.metrics:
            tags[m.name or ""] = self._tag(m)
            if m.alias is not None:
                node.aliases[(device, m.alias)] = m.name or ""
        assert device is not None
        node.devices[device] = tags

    def _ddeath(self, node: HostNode, device: str | None, payload: Payload) -> None:
        self._check_seq(node, payload, f"DDEATH {device}")
        for tag in node.devices.get(device or "", {}).values():
            tag.stale = True

    def _ddata(self, node: HostNode, device: str | None, payload: Payload) -> None:
        self._check_seq(node, payload, f"DDATA {device}")
        tags = node.devices.get(device or "")
        if tags is None:
            self.problems.append(f"DDATA {device} before its DBIRTH")
            return
        for m in payload.metrics:
            name = node.aliases.get((device, m.alias or -1)) if m.name is None else m.name
            if name is None or name not in tags:
                self.problems.append(f"DDATA {device}: unknown alias {m.alias}")
                continue
            tag = tags[name]
            # data by alias carries no datatype: integers are read with the one the birth gave
            value = _signed(tag.datatype, m.value) if isinstance(m.value, int) and m.datatype is None else m.value
            tag.value, tag.historical, tag.stale = (None if m.is_null else value), m.is_historical, False
