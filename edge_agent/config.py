"""The config file: pydantic models, YAML loading with line numbers, ${ENV}, *_file secrets, env overrides.

Loading never touches the network. Errors come back all at once, each as `FILE:LINE: path: message`.
"""

from __future__ import annotations

import difflib
import functools
import operator
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from enum import StrEnum
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    Field,
    PrivateAttr,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from edge_agent.drivers import REGISTRY, DeviceBase
from edge_agent.errors import ConfigError, ConfigIssue, FieldError
from edge_agent.fields import Duration, Size, StrictModel

ENV_PREFIX = "EDGE_AGENT__"
_ENV_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


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

    @field_validator("threshold")
    @classmethod
    def _positive(cls, v: float | str) -> float | str:
        if isinstance(v, float | int) and v <= 0:
            raise ValueError("a threshold must be positive (or auto)")
        return v


class TlsVerify(StrEnum):
    """Whether the broker's certificate and hostname are checked."""

    FULL = "full"
    NONE = "none"  # test benches only


class TlsSection(StrictModel):
    """TLS to the broker: the CA that signed its certificate, an optional client certificate, verification."""

    ca: Path | None = Field(None, description="CA certificates (PEM) that signed the broker's; default: the system's")
    cert: Path | None = Field(None, description="client certificate (PEM), for brokers that require one")
    key: Path | None = Field(None, description="the client certificate's private key (PEM); may be inside cert")
    verify: TlsVerify = Field(TlsVerify.FULL, description="full: certificate chain and hostname; none: test benches")

    @model_validator(mode="after")
    def _key_needs_cert(self) -> TlsSection:
        if self.key is not None and self.cert is None:
            raise ValueError("key is set without cert: give the client certificate too")
        return self


class MqttSection(StrictModel):
    """The broker the agent publishes to, and how."""

    url: str = Field("mqtt://127.0.0.1:1883", description="mqtt://host:1883 or mqtts://host:8883")
    topic_prefix: str = Field(
        "edge-agent", min_length=1, max_length=512, description="topic levels, e.g. enterprise/site/area/line"
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

    @field_validator("url")
    @classmethod
    def _url_ok(cls, v: str) -> str:
        if not re.fullmatch(r"mqtts?://[^/\s:]+(:\d{1,5})?", v):
            raise ValueError(f"{v!r} is not a broker URL: write mqtt://HOST:1883 or mqtts://HOST:8883")
        return v

    @field_validator("topic_prefix")
    @classmethod
    def _prefix_ok(cls, v: str) -> str:
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

    def all_tags(self) -> list[tuple[DeviceBase, Any]]:
        """(device, tag) pairs in file order."""
        return [(d, t) for d in self.devices for t in d.tags]

    def where(self, *loc: str | int) -> ConfigIssue:
        """An issue template located at a path of the file this config came from (for checks done later)."""
        if self._where is None:
            return ConfigIssue("config", _format_path(list(loc)), "")
        return typing.cast(ConfigIssue, self._where(loc))


# ---------------------------------------------------------------- YAML with line numbers


class _LineDict(dict[Any, Any]):
    line: int = 1
    lines: dict[Any, int]


class _LineList(list[Any]):
    line: int = 1
    lines: list[int]


_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~10× faster


class _Loader(_SafeLoader):  # type: ignore[misc,valid-type]
    """SafeLoader that remembers lines and rejects duplicate keys."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[int, str, _LineDict]] = []


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _LineDict:
    loader.flatten_mapping(node)
    out = _LineDict()
    out.line, out.lines = node.start_mark.line + 1, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in out:
            loader.duplicates.append((key_node.start_mark.line + 1, str(key), out))
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = key_node.start_mark.line + 1
    return out


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> _LineList:
    out = _LineList(loader.construct_object(child, deep=True) for child in node.value)
    out.line, out.lines = node.start_mark.line + 1, [c.start_mark.line + 1 for c in node.value]
    return out


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> int | str:
    # YAML 1.1 reads 00001 as octal 1; a Modicon coil address is meant, so keep the text
    text = str(node.value)
    if re.fullmatch(r"0\d+", text):
        return text
    return typing.cast(int, loader.construct_yaml_int(node))


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)
_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _parse_yaml(text: str, source: str) -> tuple[Any, list[ConfigIssue]]:
    loader = _Loader(text)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark else 1
        return None, [ConfigIssue(f"{source}:{line}", "", f"invalid YAML: {exc.problem}")]
    finally:
        loader.dispose()
    issues = [
        ConfigIssue(
            f"{source}:{line}",
            _format_path([*_path_of(data, mapping), key]),
            "key given twice; the later one would silently win",
        )
        for line, key, mapping in loader.duplicates
    ]
    return data, issues


def _path_of(tree: Any, target: Any, path: list[str | int] | None = None) -> list[str | int]:
    """The path from the root to the node `target` (by identity), or [] when not found."""
    path = path or []
    if tree is target:
        return path
    children = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for k, child in children:
        found = _path_of(child, target, [*path, k])
        if found or child is target:
            return found
    return []


# ---------------------------------------------------------------- locations


def _format_path(parts: list[str | int]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _locate(
    tree: Any, loc: tuple[str | int, ...], source: str, overrides: Mapping[tuple[str, ...], str]
) -> tuple[str, list[str | int], Any]:
    """Follow a pydantic error location through the YAML tree: (source:line, clean path, node)."""
    node, line, parts = tree, getattr(tree, "line", 1), []
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, dict) and part in node:
            line = node.lines.get(part, line) if isinstance(node, _LineDict) else line
            parts.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            line = node.lines[part] if isinstance(node, _LineList) else line
            parts.append(part)
            node = node[part]
        elif isinstance(part, str) and (not last or part in REGISTRY):
            continue  # a union tag such as 'modbus' or a validator name: not in the file
        else:
            parts.append(part)
            break
    key = tuple(str(p) for p in parts if isinstance(p, str))
    for path, env in overrides.items():
        if key[: len(path)] == path:
            return f"env {env}", parts, node
    return f"{source}:{line}", parts, node


def _known_fields(model: type[BaseModel], loc: tuple[str | int, ...]) -> list[str]:
    """Field names of the model found at `loc` (for 'did you mean' on unknown keys)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if part in REGISTRY:  # a union tag: the driver's own config model
            current = REGISTRY[part].config
            continue
        if isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            current = _unwrap(current.model_fields[part].annotation)
            continue
        return []
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _unwrap(annotation: Any) -> Any:
    """list[X] → X, X | None → X, Annotated[X, …] → X, a one-member union → its member."""
    while True:
        origin = typing.get_origin(annotation)
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if origin in (list, tuple, typing.Annotated) or (origin in (Union, types.UnionType) and len(args) == 1):
            annotation = args[0]
            continue
        return annotation


def _annotation_at(tree: Any, path: Sequence[str | int]) -> Any:
    """The type annotation of the field at `path` in the raw tree (a device's by its type), or None if unknown."""
    current: Any = Config
    node: Any = tree
    for depth, part in enumerate(path):
        if isinstance(part, int):
            node = node[part] if isinstance(node, list) and part < len(node) else None
            if depth == 1 and path[0] == "devices":  # one device of the union: its type says which model
                kind = node.get("type") if isinstance(node, dict) else None
                if not isinstance(kind, str) or kind not in REGISTRY:
                    return None
                current = REGISTRY[kind].config
            continue
        node = node.get(part) if isinstance(node, dict) else None
        if isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            current = current.model_fields[part].annotation
            if typing.get_origin(_unwrap(current)) not in (Union, types.UnionType, Literal):
                current = _unwrap(current)
            continue
        return None
    return current


def _wants_text(annotation: Any) -> bool:
    """Whether a field takes text as it is: str, secrets, paths, string choices (not numbers or booleans)."""
    annotation = _unwrap(annotation)
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return any(_wants_text(a) for a in typing.get_args(annotation) if a is not type(None))
    if origin is Literal:
        return any(isinstance(a, str) for a in typing.get_args(annotation))
    return isinstance(annotation, type) and issubclass(annotation, str | SecretStr | PurePath)


def _scalar(raw: str, source: str) -> Any:
    """Environment text read as YAML would read it in the file (1 → int, true → bool), scalars only."""
    value, issues = _parse_yaml(raw, source)
    return raw if issues or value is None or isinstance(value, dict | list) else value


_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _message(err: Mapping[str, Any], parent_loc: tuple[str | int, ...], node: Any) -> str:
    kind, msg = err["type"], str(err["msg"])
    if kind == "extra_forbidden":
        key = err["loc"][-1]
        known = _known_fields(Config, parent_loc)
        near = difflib.get_close_matches(str(key), known, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else (f"; known keys: {', '.join(known)}" if known else "")
        return f"unknown key {key!r}{hint}"
    if kind == "missing":
        return "required, but missing"
    if kind == "union_tag_not_found":
        return f"required: the device type, one of {', '.join(sorted(REGISTRY))}"
    if kind == "too_short":
        n = err["ctx"]["min_length"]
        return f"needs at least {n} item{'s' if n != 1 else ''}"
    if kind in _BOUNDS:
        return f"{err['input']!r} is out of range: must be {_BOUNDS[kind]} {next(iter(err['ctx'].values()))}"
    if kind == "union_tag_invalid":
        return f"{err['ctx']['tag']!r} is not a device type; known types: {', '.join(sorted(REGISTRY))}"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if kind in ("enum", "literal_error") and "input" in err:
        return f"{err['input']!r} is not allowed: {msg[0].lower()}{msg[1:]}"
    return msg


# ---------------------------------------------------------------- ${ENV}, overrides, secrets


def _substitute(
    node: Any,
    source: str,
    environ: Mapping[str, str],
    issues: list[ConfigIssue],
    path: list[str | int],
    line: int,
    whole: list[list[str | int]] | None = None,
) -> Any:
    """${VAR} and ${VAR:-default} replaced in every string; `whole` collects values that were one reference."""
    if isinstance(node, dict):
        for k in list(node):
            node[k] = _substitute(
                node[k],
                source,
                environ,
                issues,
                [*path, k],
                node.lines.get(k, line) if isinstance(node, _LineDict) else line,
                whole,
            )
        return node
    if isinstance(node, list):
        for i in range(len(node)):
            node[i] = _substitute(
                node[i],
                source,
                environ,
                issues,
                [*path, i],
                node.lines[i] if isinstance(node, _LineList) else line,
                whole,
            )
        return node
    if not isinstance(node, str) or "$" not in node:
        return node

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        issues.append(
            ConfigIssue(
                f"{source}:{line}",
                _format_path(path),
                f"environment variable {name} is not set (write ${{{name}:-default}} for a default)",
            )
        )
        return ""

    text = _ENV_REF.sub(repl, node)
    if whole is not None and _ENV_REF.fullmatch(node) and node != "$$":
        whole.append(path)  # `qos: ${QOS}` must read as `qos: 1` would, once the field's type is known
    return text


def _apply_overrides(
    tree: dict[str, Any], environ: Mapping[str, str], issues: list[ConfigIssue]
) -> dict[tuple[str, ...], str]:
    """EDGE_AGENT__MQTT__URL=… sets mqtt.url; lists (devices, models) are not reachable this way."""
    applied: dict[tuple[str, ...], str] = {}
    for env, raw in sorted(environ.items()):
        if not env.startswith(ENV_PREFIX):
            continue
        path = tuple(p.lower() for p in env[len(ENV_PREFIX) :].split("__"))
        if not all(path):
            issues.append(ConfigIssue(f"env {env}", "", "empty part in the name; separate keys with __"))
            continue
        node: Any = tree
        for part in path[:-1]:
            if isinstance(node, dict) and node.get(part) is None:
                node[part] = _LineDict()
                node[part].lines = {}
            node = node.get(part) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                break
        if not isinstance(node, dict):
            issues.append(
                ConfigIssue(
                    f"env {env}", ".".join(path), "overrides reach mappings only, not lists such as devices or models"
                )
            )
            continue
        # a password of digits or 'yes' stays text; a QoS of 1 becomes a number, as in the file
        node[path[-1]] = raw if _wants_text(_annotation_at(tree, path)) else _scalar(raw, f"env {env}")
        applied[path] = env
    return applied


def _resolve_secrets(cfg: Config, tree: Any, source: str, issues: list[ConfigIssue]) -> Config:
    """Read *_file secrets now, so a missing secret fails at load time and not on first connect."""
    mqtt = cfg.mqtt
    if mqtt is None or mqtt.password_file is None:
        return cfg
    try:
        secret = mqtt.password_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        where, _, _ = _locate(tree, ("mqtt", "password_file"), source, {})
        issues.append(ConfigIssue(where, "mqtt.password_file", f"cannot read the secret: {exc.strerror}"))
        return cfg
    return cfg.model_copy(update={"mqtt": mqtt.model_copy(update={"password": SecretStr(secret)})})


# ---------------------------------------------------------------- entry points


def parse_config(
    text: str, *, source: str = "config.yaml", environ: Mapping[str, str] | None = None, base_dir: Path | None = None
) -> Config:
    """Validate config text; raise ConfigError listing every problem found."""
    environ = os.environ if environ is None else environ
    tree, issues = _parse_yaml(text, source)
    if tree is None and not issues:
        issues.append(ConfigIssue(f"{source}:1", "", "the file is empty; it needs at least devices:"))
    if issues:
        raise ConfigError(issues)
    if not isinstance(tree, dict):
        raise ConfigError([ConfigIssue(f"{source}:1", "", "the top level must be a mapping (agent:, devices:, …)")])
    whole: list[list[str | int]] = []
    tree = _substitute(tree, source, environ, issues, [], 1, whole)
    for ref in whole:
        if not _wants_text(_annotation_at(tree, ref)):
            parent = functools.reduce(operator.getitem, ref[:-1], tree)
            parent[ref[-1]] = _scalar(parent[ref[-1]], source)
    overrides = _apply_overrides(tree, environ, issues)
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as exc:
        reported = {i.path for i in issues}  # an unset ${VAR} already explains its own value
        for err in exc.errors():
            loc = tuple(err["loc"])
            error = (err.get("ctx") or {}).get("error")
            if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
                loc = (*loc, "type")
            elif isinstance(error, FieldError):
                loc = (*loc, error.field)
            where, parts, node = _locate(tree, loc, source, overrides)
            parent = loc[:-1] if err["type"] == "extra_forbidden" else loc
            path = _format_path(parts)
            if path not in reported:
                issues.append(ConfigIssue(where, path, _message(err, parent, node)))
                reported.add(path)
        # the checks across items still run over what is valid, so one run reports every problem
        more = _semantic_issues(tree, _validated_devices(tree, base_dir), source, overrides)
        issues.extend(i for i in more if i.path not in reported)
        raise ConfigError(_in_file_order(issues)) from None
    if base_dir is not None:
        cfg = _relative_to(cfg, base_dir)  # before the checks, which read a device's files
    issues.extend(_semantic_issues(tree, list(enumerate(cfg.devices)), source, overrides))
    cfg = _resolve_secrets(cfg, tree, source, issues)
    if issues:
        raise ConfigError(_in_file_order(issues))

    def locate(loc: tuple[str | int, ...]) -> ConfigIssue:
        place, parts, _ = _locate(tree, loc, source, overrides)
        return ConfigIssue(place, _format_path(parts), "")

    cfg._where = locate
    return cfg


def _in_file_order(issues: list[ConfigIssue]) -> list[ConfigIssue]:
    def key(i: ConfigIssue) -> tuple[int, int]:
        tail = i.source.rpartition(":")[2]
        return (1, 0) if not tail.isdigit() else (0, int(tail))

    return sorted(issues, key=key)


def _relative_to(cfg: Config, base: Path) -> Config:
    """Files named relative to the config file are found next to it, wherever the agent runs from."""
    models = [
        m.model_copy(
            update={
                "file": _under(base, m.file),
                "calibrate": m.calibrate.model_copy(update={"save_to": _under(base, m.calibrate.save_to)}),
            }
        )
        for m in cfg.models
    ]
    # a driver whose devices name files (OPC UA certificates, keys, password files) resolves them itself
    devices = [d.relative_to(base) for d in cfg.devices]
    mqtt = cfg.mqtt
    if mqtt is not None:
        tls = mqtt.tls
        if tls is not None:
            tls = tls.model_copy(update={k: _under(base, getattr(tls, k)) for k in ("ca", "cert", "key")})
        mqtt = mqtt.model_copy(update={"password_file": _under(base, mqtt.password_file), "tls": tls})
    return cfg.model_copy(update={"models": models, "devices": devices, "mqtt": mqtt})


def _under(base: Path, path: Path | None) -> Path | None:
    """A path named in the config, relative to the config file's folder unless absolute."""
    return path if path is None or path.is_absolute() else base / path


def _validated_devices(tree: Any, base: Path | None) -> list[tuple[int, DeviceBase]]:
    """The devices that are valid on their own, when the file as a whole is not (for the checks across items)."""
    out: list[tuple[int, DeviceBase]] = []
    raw = tree.get("devices")
    for d, item in enumerate(raw if isinstance(raw, list) else []):
        try:
            dev = _DEVICE.validate_python(item)
        except ValidationError:
            continue
        out.append((d, dev.relative_to(base) if base is not None else dev))
    return out


def _names(items: Any, key: str = "name") -> list[tuple[int, str]]:
    """(index, name) of the raw items that have a text name: names are checked even where other fields are not valid."""
    if not isinstance(items, list):
        return []
    return [(i, x[key]) for i, x in enumerate(items) if isinstance(x, dict) and isinstance(x.get(key), str)]


def _semantic_issues(
    tree: Any, devices: Sequence[tuple[int, DeviceBase]], source: str, overrides: Mapping[tuple[str, ...], str]
) -> list[ConfigIssue]:
    """Checks across items: unique names, device-specific overlaps, a device's files, model inputs that exist."""
    issues: list[ConfigIssue] = []

    def add(loc: tuple[str | int, ...], message: str) -> None:
        where, parts, _ = _locate(tree, loc, source, overrides)
        issues.append(ConfigIssue(where, _format_path(parts), message))

    raw_devices = tree.get("devices")
    devices_seen: dict[str, int] = {}
    tags_seen: dict[str, tuple[int, int]] = {}
    for d, name in _names(raw_devices):
        if name in devices_seen:
            add(("devices", d, "name"), f"device name {name!r} is already used by devices[{devices_seen[name]}]")
        devices_seen.setdefault(name, d)
        for t, tag in _names(raw_devices[d].get("tags")):
            if tag in tags_seen:
                d0, t0 = tags_seen[tag]
                add(
                    ("devices", d, "tags", t, "name"),
                    f"tag name {tag!r} is already used by devices[{d0}].tags[{t0}]; tag names are unique",
                )
            tags_seen.setdefault(tag, (d, t))
    for d, dev in devices:
        for loc, message in dev.check():
            add(("devices", d, *loc), message)
        # files a device names (certificates, keys, password files) are read now: a missing one fails here
        for loc, message in dev.check_files():
            add(("devices", d, *loc), message)
    raw_models = tree.get("models")
    models_seen: set[str] = set()
    for m, name in _names(raw_models):
        if name in models_seen:
            add(("models", m, "name"), f"model name {name!r} is used twice")
        models_seen.add(name)
    for m, model in enumerate(raw_models if isinstance(raw_models, list) else []):
        inputs = model.get("inputs") if isinstance(model, dict) else None
        for i, name in enumerate(inputs if isinstance(inputs, list) else []):
            if isinstance(name, str) and name not in tags_seen:
                near = difflib.get_close_matches(name, list(tags_seen), n=1)
                add(
                    ("models", m, "inputs", i),
                    f"no tag named {name!r}" + (f"; did you mean {near[0]!r}?" if near else ""),
                )
    return issues


def load_config(path: str | Path, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file; raise ConfigError with every problem found."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigIssue(str(p), "", f"cannot read the config file: {exc.strerror}")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigIssue(str(p), "", f"not UTF-8 text: {exc.reason}")]) from None
    return parse_config(text, source=str(p), environ=environ, base_dir=p.parent)
