"""The config file's schema: one pydantic model per section, and the root `Config`.

The devices section is a union of the config models of the drivers in `edge_agent.drivers.REGISTRY`,
told apart by their `type`.
"""

from __future__ import annotations

import re
import typing
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import Field, PrivateAttr, SecretStr, TypeAdapter, field_validator, model_validator

from edge_agent.drivers import REGISTRY, DeviceBase
from edge_agent.errors import ConfigIssue
from edge_agent.fields import Duration, Size, StrictModel
from edge_agent.tls import TlsSection

# ---------------------------------------------------------------- sections


class AgentSection(StrictModel):
    """Who this agent is: ids that go into topics, events and logs."""

    id: str = Field("edge-agent", min_length=1, max_length=128, description="letters, digits, . _ -")
    site: str = Field("default", min_length=1, max_length=128)

    @field_validator("id")
    @classmethod
    def _id_ok(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", v):
            raise ValueError(f"{v!r}: an agent id may hold letters, digits, . _ - only (it goes into MQTT client ids)")
        return v


class BuffersSection(StrictModel):
    """How much history each tag keeps in memory."""

    retention: Duration = Field(120.0, gt=0, le=7 * 86400, description="history kept per tag (covers model windows)")
    max_samples_per_tag: int = Field(8192, ge=16, le=1_000_000, description="hard cap per tag, whatever the retention")


class Hysteresis(StrictModel):
    """Leave an anomaly only below exit_ratio × threshold, after min_duration."""

    exit_ratio: float = Field(0.8, gt=0, le=1)
    min_duration: Duration = Field(5.0, ge=0)


class CalibrateMode(StrEnum):
    """Whether the agent adapts a model to this machine when it starts."""

    OFF = "off"  # use the bundle's normalisation and threshold
    STARTUP = "startup"  # learn them from the first `samples` of (assumed normal) operation


class ModelCalibration(StrictModel):
    """On-device calibration at startup."""

    mode: CalibrateMode = CalibrateMode.OFF
    samples: int = Field(600, ge=32, le=1_000_000, description="grid samples of normal operation to learn from")
    quantile: float = Field(0.99, gt=0.5, lt=1)
    margin: float = Field(1.5, ge=1, le=100, description="threshold = quantile of normal scores × margin")
    save_to: Path | None = Field(None, description="write the calibrated bundle here (reused after restarts)")
    threshold_only: bool = Field(False, description="keep the bundle's normalisation, set only the threshold")
    scaling: Literal["standard", "robust"] | None = Field(
        None,
        description="standard: mean/std; robust: median/IQR (one noisy sensor cannot set it); default: the bundle's",
    )
    threshold_floor: float = Field(
        0.0, ge=0, le=100, description="threshold at least this × the bundle's own threshold (0: no floor)"
    )


class ModelAdaptation(StrictModel):
    """Opt-in drift adaptation: on windows judged normal, the normalisation's centre follows slow drift."""

    # defaults from bench/calib.py: slower rates fall behind SKAB's temperature drift (and then stay in alarm),
    # faster ones and a higher `below` learn more of the valve faults
    rate: float = Field(0.05, gt=0, le=0.5, description="EWMA weight of each adapted window's mean (per window)")
    below: float = Field(0.5, gt=0, lt=1, description="adapt only on windows scoring below below × threshold")
    max_shift: float = Field(
        10.0, gt=0, le=1000, description="stop adapting once a tag's centre moved this many calibrated scales"
    )


class ModelSection(StrictModel):
    """A model bundle that scores windows of tags as the agent polls."""

    name: str = Field(min_length=1, max_length=128, description="model name, used in topics and events")
    file: Path = Field(description="the .tflite bundle; relative paths are relative to this config file")
    inputs: list[str] | None = Field(
        None, min_length=1, description="optional: the bundle's input tags, checked against the bundle"
    )
    sample_interval: Duration | None = Field(None, gt=0, description="optional: checked against the bundle")
    hop: Duration | None = Field(None, gt=0, description="how often to score (default: the bundle's sample interval)")
    threshold: float | Literal["auto"] = Field("auto", description="auto: the bundle's calibrated threshold")
    hysteresis: Hysteresis | None = Field(None, description="default: the bundle's detector settings")
    min_good: float = Field(0.9, ge=0.1, le=1, description="share of good cells a window needs to be scored")
    calibrate: ModelCalibration = ModelCalibration()
    adapt: ModelAdaptation | None = Field(None, description="drift adaptation of the normalisation (default off)")

    @field_validator("threshold")
    @classmethod
    def _positive(cls, v: float | str) -> float | str:
        if isinstance(v, float | int) and v <= 0:
            raise ValueError("a threshold must be positive (or auto)")
        return v


class SparkplugSection(StrictModel):
    """The Sparkplug B edge node the agent is (mqtt.payloads: [sparkplug]): its ids, and the host it waits for."""

    group_id: str = Field(max_length=128, description="Sparkplug group id")
    edge_node_id: str | None = Field(None, max_length=128, description="default: the agent id")
    primary_host_id: str | None = Field(
        None, max_length=128, description="publish only while spBv1.0/STATE/{primary_host_id} says online"
    )

    @field_validator("group_id", "edge_node_id", "primary_host_id")
    @classmethod
    def _id_ok(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[^/+#\s]+", v):
            raise ValueError(f"{v!r} is not a Sparkplug id: one topic level, without / + # or spaces")
        return v

    @property
    def node(self) -> str:
        """The edge node id in use (a section validated outside a Config falls back to edge-agent)."""
        return self.edge_node_id or "edge-agent"


class MqttSection(StrictModel):
    """The broker the agent publishes to, and how."""

    url: str = Field("mqtt://127.0.0.1:1883", description="mqtt://host:1883 or mqtts://host:8883")
    topic_prefix: str | None = Field(
        None,
        min_length=1,
        max_length=512,
        description="topic levels, e.g. enterprise/site/area/line; default {agent.site}/{agent.id}, so two agents "
        "on defaults never share a retained status or a last will",
    )
    qos: Literal[0, 1, 2] = Field(1, description="QoS of events/{model}; a row leaves the outbox on its ack")
    protocol: Literal["3.1.1", "5"] = Field("3.1.1", description="MQTT protocol version")
    client_id: str | None = Field(None, min_length=1, max_length=128, description="default: the agent id")
    session: Literal["clean", "persistent"] = Field(
        "clean", description="clean: the broker forgets the session when the agent disconnects"
    )
    session_expiry: Duration = Field(
        3600.0, ge=0, le=7 * 86400, description="MQTT 5, session: persistent: how long the broker keeps it"
    )
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = Field(None, description="file holding the password (container secrets)")
    keepalive: Duration = Field(30.0, ge=1, le=3600, description="a dead connection is noticed within 2 × this")
    tls: TlsSection | None = Field(None, description="mqtts:// only; without it the system's CAs verify the broker")
    window: int = Field(
        256, ge=1, le=4096, description="messages handed to paho and not yet acknowledged; its queue never holds more"
    )
    reconnect_initial: Duration = Field(0.5, gt=0, le=3600, description="first reconnect delay (doubles, jittered)")
    reconnect_max: Duration = Field(30.0, gt=0, le=86400, description="longest delay between connection attempts")
    historical_after: Duration = Field(
        10.0, ge=0, le=86400, description="a message older than this when sent is marked historical: true"
    )
    status_interval: Duration = Field(
        30.0, ge=1, le=86400, description="how often the retained status (outbox depth, drops) is refreshed"
    )
    scores_interval: Duration | None = Field(
        None, gt=0, description="publish {prefix}/scores/{model} at most this often; off when unset"
    )
    scores_qos: Literal[0, 1, 2] = 0
    telemetry_interval: Duration | None = Field(
        None, gt=0, description="publish {prefix}/telemetry/{device} (latest tag values) this often; off when unset"
    )
    telemetry_qos: Literal[0, 1, 2] = 0
    payloads: list[Literal["json", "sparkplug"]] = Field(
        ["json"], min_length=1, max_length=2, description="json (the agent's versioned JSON), sparkplug, or both"
    )
    sparkplug: SparkplugSection | None = Field(None, description="with payloads: [sparkplug]: the edge node's ids")

    @field_validator("url")
    @classmethod
    def _url_ok(cls, v: str) -> str:
        if not re.fullmatch(r"mqtts?://[^/\s:]+(:\d{1,5})?", v):
            raise ValueError(f"{v!r} is not a broker URL: write mqtt://HOST:1883 or mqtts://HOST:8883")
        return v

    @property
    def prefix(self) -> str:
        """The topic prefix in use (a section validated on its own, outside a Config, falls back to edge-agent)."""
        return self.topic_prefix or "edge-agent"

    @field_validator("topic_prefix")
    @classmethod
    def _prefix_ok(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if any(c in v for c in "+#\0"):
            raise ValueError(f"{v!r}: a topic prefix cannot hold the wildcards + or #")
        if v.startswith("/") or v.endswith("/") or "//" in v:
            raise ValueError(f"{v!r}: write topic levels without empty ones, e.g. plant-a/area-1/line-3")
        if v.startswith("$"):
            raise ValueError(f"{v!r}: topics starting with $ are reserved for the broker")
        return v

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_text(cls, v: object) -> object:
        # YAML reads `protocol: 5` as a number
        return str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v

    @model_validator(mode="after")
    def _consistent(self) -> MqttSection:
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        if self.tls is not None and self.url.startswith("mqtt://"):
            raise ValueError("tls is set but the URL is mqtt://; write mqtts://HOST:8883 for TLS")
        if self.reconnect_initial > self.reconnect_max:
            raise ValueError("reconnect_initial is longer than reconnect_max")
        if len(set(self.payloads)) != len(self.payloads):
            raise ValueError(f"payloads {self.payloads} names one twice")
        if "sparkplug" in self.payloads:
            if self.sparkplug is None:
                raise ValueError(
                    "payloads has sparkplug: add sparkplug: {group_id: …} (edge_node_id defaults to agent.id)"
                )
            if self.telemetry_interval is None:
                # DDATA is built from telemetry records: without them the node would announce tags it never updates
                raise ValueError(
                    "payloads has sparkplug, whose DDATA comes from telemetry: set telemetry_interval "
                    "(e.g. the devices' poll_interval)"
                )
        elif self.sparkplug is not None:
            raise ValueError("sparkplug is set but payloads does not name it: add sparkplug to payloads, or remove it")
        return self


class WhenFull(StrEnum):
    """What the outbox drops when it reaches its bounds."""

    DROP_OLDEST = "drop_oldest"
    DROP_NEWEST = "drop_newest"


class OutboxSection(StrictModel):
    """Durable queue of messages not yet acknowledged by the broker."""

    path: Path = Path("/var/lib/edge-agent/outbox.db")
    max_bytes: Size = Field(512 * 1024**2, ge=1024**2, description="stored messages (payload + topic + ~48 B each)")
    max_age: Duration = Field(30 * 86400.0, gt=0, description="older messages are dropped (and counted)")
    when_full: WhenFull = Field(
        WhenFull.DROP_OLDEST, description="which messages of the same kind give way; telemetry always goes first"
    )
    sync: Literal["full", "batched"] = Field(
        "full",
        description="full: fsync as soon as a message is written (a power loss loses nothing committed); "
        "batched: commit every commit_interval (fewer flash writes; a power loss can lose that much)",
    )
    commit_interval: Duration = Field(0.2, gt=0, le=60, description="sync: batched: time between commits")


class LogFormat(StrEnum):
    """How log lines are written to stderr."""

    TEXT = "text"
    JSON = "json"  # one JSON object per line, for log shippers


class ObserveSection(StrictModel):
    """Prometheus metrics and the health endpoints, and the log format."""

    listen: str | None = Field(
        None, pattern=r"^[^\s]+:\d+$", description="host:port for /metrics, /healthz, /readyz; off when unset"
    )
    log_format: LogFormat = LogFormat.TEXT


def _device_union() -> Any:
    members = tuple(p.config for p in REGISTRY.values())
    union = Union[members] if len(members) > 1 else members[0]  # noqa: UP007 (built at runtime)
    return Annotated[union, Field(discriminator="type")]


if TYPE_CHECKING:
    DeviceConfig = DeviceBase
else:
    DeviceConfig = _device_union()


_DEVICE: TypeAdapter[DeviceBase] = TypeAdapter(DeviceConfig)


class Config(StrictModel):
    """A whole config file."""

    agent: AgentSection = AgentSection()
    devices: list[DeviceConfig] = Field(min_length=1)
    models: list[ModelSection] = Field(default_factory=list)
    buffers: BuffersSection = BuffersSection()
    mqtt: MqttSection | None = None
    outbox: OutboxSection = OutboxSection()
    observe: ObserveSection = ObserveSection()

    _where: Any = PrivateAttr(default=None)
    _sha256: str = PrivateAttr(default="")

    @model_validator(mode="after")
    def _default_prefix(self) -> Config:
        if self.mqtt is not None and self.mqtt.topic_prefix is None:
            # site and id as topic levels: a / in the site stays a level separator, wildcards cannot stay
            site = "".join("_" if c in "+#\0$" else c for c in self.agent.site).strip("/") or "default"
            prefix = f"{'/'.join(p for p in site.split('/') if p)}/{self.agent.id}"
            # sections are frozen once validated: the default is filled in here, where agent is known
            object.__setattr__(self, "mqtt", self.mqtt.model_copy(update={"topic_prefix": prefix}))
        sp = self.mqtt.sparkplug if self.mqtt is not None else None
        if self.mqtt is not None and sp is not None and sp.edge_node_id is None:
            node = sp.model_copy(update={"edge_node_id": self.agent.id})
            object.__setattr__(self, "mqtt", self.mqtt.model_copy(update={"sparkplug": node}))
        return self

    def all_tags(self) -> list[tuple[DeviceBase, Any]]:
        """(device, tag) pairs in file order."""
        return [(d, t) for d in self.devices for t in d.tags]

    @property
    def sha256(self) -> str:
        """sha256 of the text this config was parsed from (of the file's bytes, as `sha256sum` prints it)."""
        return self._sha256

    def where(self, *loc: str | int) -> ConfigIssue:
        """An issue template located at a path of the file this config came from (for checks done later)."""
        if self._where is None:
            return ConfigIssue("config", format_path(list(loc)), "")
        return typing.cast(ConfigIssue, self._where(loc))


def format_path(parts: list[str | int]) -> str:
    """`devices[0].tags[3].address` from its parts."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out
