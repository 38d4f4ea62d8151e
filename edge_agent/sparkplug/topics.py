"""Sparkplug B 3.0 topics (`spBv1.0/{group}/{type}/{node}[/{device}]`, `spBv1.0/STATE/{host}`) and the STATE payload."""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum

NAMESPACE = "spBv1.0"


class MessageType(StrEnum):
    """The message types of a Sparkplug topic."""

    NBIRTH = "NBIRTH"
    NDEATH = "NDEATH"
    NDATA = "NDATA"
    NCMD = "NCMD"
    DBIRTH = "DBIRTH"
    DDEATH = "DDEATH"
    DDATA = "DDATA"
    DCMD = "DCMD"
    STATE = "STATE"

    @property
    def device(self) -> bool:
        """The message is about a device (its topic ends with the device id)."""
        return self.value.startswith("D")


@dataclass(frozen=True, slots=True)
class Topic:
    """A parsed Sparkplug topic; for STATE, `group` is empty and `node` holds the host id."""

    type: MessageType
    group: str
    node: str
    device: str | None = None

    def __str__(self) -> str:
        if self.type is MessageType.STATE:
            return state_topic(self.node)
        tail = f"/{self.device}" if self.device is not None else ""
        return f"{NAMESPACE}/{self.group}/{self.type}/{self.node}{tail}"


def _check_id(kind: str, value: str) -> None:
    # the specification forbids the MQTT separators and wildcards in every id
    if not value or any(c in value for c in "/+#"):
        raise ValueError(f"{value!r} is not a valid Sparkplug {kind}: non-empty, without / + #")


def node_topic(group: str, type_: MessageType | str, node: str) -> str:
    """`spBv1.0/{group}/{NBIRTH|NDATA|NDEATH|NCMD}/{node}`."""
    _check_id("group id", group)
    _check_id("edge node id", node)
    return f"{NAMESPACE}/{group}/{MessageType(type_)}/{node}"


def device_topic(group: str, type_: MessageType | str, node: str, device: str) -> str:
    """`spBv1.0/{group}/{DBIRTH|DDATA|DDEATH|DCMD}/{node}/{device}`."""
    _check_id("device id", device)
    return f"{node_topic(group, type_, node)}/{device}"


def state_topic(host: str) -> str:
    """`spBv1.0/STATE/{host}`: where a primary host application says whether it is online (3.0)."""
    _check_id("host id", host)
    return f"{NAMESPACE}/STATE/{host}"


def parse_topic(topic: str) -> Topic | None:
    """The parts of a Sparkplug B topic, or None when it is not one."""
    parts = topic.split("/")
    if len(parts) < 3 or parts[0] != NAMESPACE:
        return None
    if parts[1] == "STATE":
        return Topic(MessageType.STATE, "", parts[2]) if len(parts) == 3 and parts[2] else None
    if len(parts) not in (4, 5) or not all(parts[1:]):
        return None
    try:
        mtype = MessageType(parts[2])
    except ValueError:
        return None
    if mtype is MessageType.STATE or mtype.device != (len(parts) == 5):
        return None
    return Topic(mtype, parts[1], parts[3], parts[4] if len(parts) == 5 else None)


def state_payload(online: bool, timestamp_ms: int) -> bytes:
    """The 3.0 STATE payload: `{"online": true, "timestamp": 1700000000000}` (UTF-8 JSON)."""
    return json.dumps({"online": bool(online), "timestamp": int(timestamp_ms)}, separators=(",", ":")).encode()


def parse_state(payload: bytes) -> tuple[bool, int] | None:
    """(online, timestamp ms) of a STATE payload, or None when it is not a 3.0 STATE message."""
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("online"), bool):
        return None
    ts = data.get("timestamp")
    return data["online"], int(ts) if isinstance(ts, int) and not isinstance(ts, bool) else 0
