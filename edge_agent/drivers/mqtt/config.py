"""`type: mqtt` device and tag config: the broker, and per tag a Sparkplug metric or a JSON topic and path.

Pydantic only: loading a config imports neither paho nor protobuf (the runtime does, in driver.py).
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from edge_agent.drivers.base import DeviceBase, TagBase
from edge_agent.drivers.mqtt import jsonpath
from edge_agent.errors import FieldError
from edge_agent.fields import Duration, StrictModel
from edge_agent.tls import TlsSection, TlsSetupError, client_context

URL_RE = re.compile(r"mqtts?://([^/\s:@]+|\[[0-9A-Fa-f:.]+\])(:\d{1,5})?")
SPARKPLUG_NAMESPACE = "spBv1.0"


class ValueType(StrEnum):
    """What a JSON tag's value must be; anything else is counted as malformed and the tag goes bad."""

    FLOAT = "float"  # a JSON number (an integer too)
    INT = "int"  # a JSON integer (or a float with no fraction)
    BOOL = "bool"  # true or false
    STR = "str"  # a JSON string


class SparkplugSource(StrictModel):
    """The Sparkplug B edge node (and optionally one of its devices) whose metrics the tags name."""

    group_id: str = Field(min_length=1, description="the node's group id (topic spBv1.0/{group_id}/…)")
    edge_node_id: str = Field(min_length=1, description="the edge node id")
    device_id: str | None = Field(
        None, min_length=1, description="a device of the node (DBIRTH/DDATA); unset: the node's own metrics"
    )
    request_rebirth: bool = Field(
        True,
        description="publish NCMD Node Control/Rebirth when data comes without a birth this agent saw (an unknown "
        "alias, a seq gap, data before any birth); false for a read-only client",
    )
    rebirth_interval: Duration = Field(30.0, ge=1, le=86400, description="at most one rebirth request per this")

    @field_validator("group_id", "edge_node_id", "device_id")
    @classmethod
    def _id_ok(cls, v: str | None) -> str | None:
        if v is not None and any(c in v for c in "/+#"):
            raise ValueError(f"{v!r}: Sparkplug ids cannot hold / + or #")
        return v


class MqttTag(TagBase):
    """One value another gateway publishes: a Sparkplug metric, or a JSON topic and a path into its payload."""

    metric: str | None = Field(None, min_length=1, description="Sparkplug: the metric name (as in the birth)")
    topic: str | None = Field(None, min_length=1, max_length=65535, description="JSON: the topic (no wildcards)")
    path: str = Field("$", description="JSON: where the value is in the payload ($, $.value, $.tags[name=x].value)")
    type: ValueType = Field(ValueType.FLOAT, description="JSON: the value's type; other values are malformed")
    stale_after: Duration | None = Field(
        None, gt=0, le=7 * 86400, description="stale when not updated for this long (overrides the device's)"
    )

    @field_validator("topic")
    @classmethod
    def _topic_ok(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if any(c in v for c in "+#\0"):
            raise ValueError(f"{v!r}: one topic per tag, without the wildcards + or #")
        if v.startswith(f"{SPARKPLUG_NAMESPACE}/"):
            raise ValueError(f"{v!r} is a Sparkplug topic: name the metric (metric: …) and set the device's sparkplug")
        return v

    @field_validator("path")
    @classmethod
    def _path_ok(cls, v: str) -> str:
        jsonpath.parse(v)
        return v

    @model_validator(mode="after")
    def _one_source(self) -> MqttTag:
        if (self.metric is None) == (self.topic is None):
            raise FieldError("metric", "give either metric (Sparkplug) or topic (JSON)")
        if self.metric is not None:
            for name in ("path", "type"):
                if name in self.model_fields_set:
                    raise FieldError(name, "applies to JSON tags (topic: …); a Sparkplug metric carries its type")
        return self

    def steps(self) -> tuple[jsonpath.Step, ...]:
        """The JSON path, parsed."""
        return jsonpath.parse(self.path)

    def where(self) -> str:
        """The metric name, or the topic and path."""
        return self.metric if self.metric is not None else f"{self.topic} {self.path}"


class MqttDevice(DeviceBase):
    """A broker whose messages (Sparkplug B or JSON) carry tags another gateway publishes."""

    type: Literal["mqtt"]
    url: str = Field(description="mqtt://host:1883 or mqtts://host:8883")
    client_id: str | None = Field(None, min_length=1, max_length=128, description="default: edge-agent-{name}-{random}")
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = Field(None, description="file holding the password (container secrets)")
    tls: TlsSection | None = Field(None, description="mqtts:// only; without it the system's CAs verify the broker")
    qos: Literal[0, 1, 2] = Field(1, description="QoS of the subscriptions")
    keepalive: Duration = Field(30.0, ge=1, le=3600, description="a dead connection is noticed within 2 × this")
    timeout: Duration = Field(
        5.0, gt=0, le=600, description="how long connecting and subscribing may take; `read` waits this long for values"
    )
    poll_interval: Duration = Field(
        1.0, gt=0, le=86400, description="how often the publisher is expected to send each tag (the buffers' grid)"
    )
    stale_after: Duration | None = Field(
        None, gt=0, le=7 * 86400, description="a tag not updated for this long goes stale; default 3 × its interval"
    )
    max_queued: int = Field(10000, ge=10, le=1_000_000, description="messages waiting for the agent; more are dropped")
    sparkplug: SparkplugSource | None = None
    tags: list[MqttTag] = Field(min_length=1)

    @field_validator("url")
    @classmethod
    def _url_ok(cls, v: str) -> str:
        if "@" in v:
            raise ValueError("credentials do not go into the URL: use username and password_file")
        m = URL_RE.fullmatch(v)
        if not m:
            raise ValueError(f"{v!r} is not a broker URL: write mqtt://HOST:1883 or mqtts://HOST:8883")
        if m.group(2) is not None and not 1 <= int(m.group(2)[1:]) <= 65535:
            raise ValueError(f"{v!r}: port {m.group(2)[1:]} is out of range 1..65535")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> MqttDevice:
        if self.password is not None and self.password_file is not None:
            raise FieldError("password_file", "give password or password_file, not both")
        if self.tls is not None and self.url.startswith("mqtt://"):
            raise FieldError("tls", "tls is set but the URL is mqtt://; write mqtts://HOST:8883 for TLS")
        return self

    def check(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Sparkplug tags without a sparkplug section, and the same metric or topic and path twice."""
        problems: list[tuple[tuple[str | int, ...], str]] = []
        seen: dict[str, int] = {}
        for i, tag in enumerate(self.tags):
            if tag.metric is not None and self.sparkplug is None:
                problems.append(
                    (("tags", i, "metric"), "names a Sparkplug metric: set the device's sparkplug (group_id, …)")
                )
            if self.stale_limit(tag) <= self.interval_of(tag):
                where_ = ("tags", i, "stale_after") if tag.stale_after is not None else ("stale_after",)
                problems.append(
                    (
                        where_,
                        f"{self.stale_limit(tag):g}s is not longer than the interval of {tag.name} "
                        f"({self.interval_of(tag):g}s): it would go stale between two updates",
                    )
                )
            key = tag.where()
            if key in seen:
                where = ("tags", i, "metric" if tag.metric else "path")
                problems.append((where, f"{key} is already tags[{seen[key]}]"))
            seen.setdefault(key, i)
        return problems

    def stale_limit(self, tag: MqttTag) -> float:
        """How long a tag may go without an update before it is stale."""
        if tag.stale_after is not None:
            return tag.stale_after
        return self.stale_after if self.stale_after is not None else 3.0 * self.interval_of(tag)

    def relative_to(self, base: Path) -> MqttDevice:
        """This device with relative file paths (password file, TLS files) taken under `base`."""
        fixed: dict[str, object] = {}
        if self.password_file is not None and not self.password_file.is_absolute():
            fixed["password_file"] = base / self.password_file
        if self.tls is not None:
            files = {n: base / p for n in ("ca", "cert", "key") if (p := getattr(self.tls, n)) and not p.is_absolute()}
            if files:
                fixed["tls"] = self.tls.model_copy(update=files)
        return self.model_copy(update=fixed) if fixed else self

    def check_files(self) -> list[tuple[tuple[str | int, ...], str]]:
        """The password file and TLS files that cannot be used, read now rather than at connect."""
        problems: list[tuple[tuple[str | int, ...], str]] = []
        if self.password_file is not None:
            try:
                self.password_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                problems.append((("password_file",), f"cannot read the secret {self.password_file}: {why}"))
        if self.url.startswith("mqtts://"):
            try:
                client_context(self.tls, "tls")
            except TlsSetupError as exc:
                field, _, message = str(exc).partition(": ")
                problems.append((tuple(field.split(".")), message))
        return problems

    def password_text(self) -> str | None:
        """The password, read from password_file when given there (at connect, not logged)."""
        if self.password_file is not None:
            return self.password_file.read_text(encoding="utf-8").strip()
        return self.password.get_secret_value() if self.password is not None else None
