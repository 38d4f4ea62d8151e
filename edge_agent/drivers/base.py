"""What every driver provides: a config model, a runtime class and a `type` key, registered together."""

from __future__ import annotations

import importlib
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Protocol, Self, TypeVar

import numpy as np
from pydantic import BeforeValidator, Field, field_validator, model_validator

from edge_agent.drivers.codecs import shortest_float32
from edge_agent.errors import EdgeAgentError, FieldError
from edge_agent.fields import Duration, StrictModel
from edge_agent.types import Quality, SampleBatch, TelemetryTag

T = TypeVar("T", bound="TagBase")

DEFAULT_INTEGRITY = 60.0  # seconds: by exception without an integrity_interval, every tag is re-sent this often
TAG_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-/]*$")


class OnStartupError(StrEnum):
    """What to do when a device cannot be reached at startup."""

    RETRY = "retry"  # keep trying in the background; the other devices run meanwhile
    ERROR = "error"  # stop the agent with an error
    IGNORE = "ignore"  # log it and leave the device out until the agent restarts


class Backoff(StrictModel):
    """Reconnect delays: doubled after each failure up to `max`, with random jitter."""

    initial: Duration = Field(0.5, gt=0, le=3600, description="first delay after a failure")
    max: Duration = Field(30.0, gt=0, le=86400, description="longest delay between attempts")


class DeadbandType(StrEnum):
    """How far a value must move before it is reported."""

    ABSOLUTE = "absolute"  # in the value's own unit
    PERCENT = "percent"  # of the tag's span (its range; on OPC UA subscriptions, the server's EURange)


_DEADBAND_HELP = "write a number in the tag's unit (0.5) or a percent of its span ('0.5%')"


def parse_deadband(value: Any) -> Any:
    """`0.5` (absolute) or `"0.5%"` (of the span) as a Deadband; the mapping form passes through to the model."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a deadband: {_DEADBAND_HELP}")
    if isinstance(value, int | float):
        return {"type": DeadbandType.ABSOLUTE, "value": value}
    if isinstance(value, str):
        text = value.strip()
        percent = text.endswith("%")
        try:
            number = float(text.rstrip("%").strip())
        except ValueError:
            raise ValueError(f"{value!r} is not a deadband: {_DEADBAND_HELP}") from None
        return {"type": DeadbandType.PERCENT if percent else DeadbandType.ABSOLUTE, "value": number}
    return value


class Deadband(StrictModel):
    """Smaller changes than this are not reported (telemetry by exception; OPC UA subscriptions: by the server)."""

    type: DeadbandType
    value: float = Field(ge=0, description="threshold: in the value's unit, or percent of its span")

    @model_validator(mode="after")
    def _percent_range(self) -> Deadband:
        if self.type is DeadbandType.PERCENT and self.value > 100:
            raise FieldError("value", f"a percent deadband is 0 to 100, not {self.value:g}")
        return self


DeadbandField = Annotated[Deadband, BeforeValidator(parse_deadband)]


class TagBase(StrictModel):
    """Fields every tag has, whatever the protocol."""

    name: str = Field(description="unique tag name, referenced by models (letters, digits, . _ - /)")
    unit: str | None = Field(None, description="engineering unit, for display and in telemetry")
    description: str | None = None
    poll_interval: Duration | None = Field(
        None, gt=0, le=86400, description="overrides the device's poll_interval for this tag"
    )
    deadband: DeadbandField | None = Field(
        None, description="telemetry by exception: changes smaller than this are not sent (0.5, or '0.5%' of the span)"
    )
    range: tuple[float, float] | None = Field(
        None, description="engineering range [low, high]: the span a percent deadband is of"
    )

    @model_validator(mode="after")
    def _deadband_has_span(self) -> Self:
        if self.range is not None and not self.range[0] < self.range[1]:
            raise FieldError("range", f"range is [low, high] with low < high, not {list(self.range)}")
        db = self.deadband
        if db is not None and db.type is DeadbandType.PERCENT and self.span() is None and not self.server_span:
            raise FieldError(
                "deadband",
                f"a percent deadband needs the tag's span: give range: [low, high] (or write {db.value:g} "
                "in the tag's unit)",
            )
        return self

    @property
    def server_span(self) -> bool:
        """A percent deadband may rest on a span the device knows (OPC UA's EURange) instead of `range`."""
        return False

    @property
    def float32(self) -> bool:
        """Values are float32 as read (printed as written); a tag type with such values overrides this."""
        return False

    def span(self) -> float | None:
        """The span a percent deadband is of: `range`, else what the tag's type and scaling give (None: unknown)."""
        return self.range[1] - self.range[0] if self.range is not None else None

    def deadband_value(self) -> float:
        """The deadband in the tag's unit (0: every change is sent; a percent without a known span counts as 0)."""
        db = self.deadband
        if db is None:
            return 0.0
        if db.type is DeadbandType.ABSOLUTE:
            return db.value
        span = self.span()
        return 0.0 if span is None else db.value / 100.0 * span

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not TAG_NAME.match(v):
            raise ValueError(f"{v!r} is not a valid tag name: start with a letter or _, then letters, digits, . _ - /")
        return v

    def where(self) -> str:
        """Where the tag lives on its device, in the notation the engineer wrote (40001, DB10.DBD4, a node id)."""
        return ""

    def json_value(self, value: Any) -> Any:
        """A read value as JSON should show it (float32 values printed as written: 3.14159, not 3.141590118408203)."""
        return shortest_float32(value) if isinstance(value, float) and self.float32 else value


class DeviceBase(StrictModel):
    """Fields every device has, whatever the protocol."""

    type: str = Field(description="driver type key: modbus, …")
    name: str = Field(description="unique device name, used in logs, metrics and topics")
    poll_interval: Duration = Field(1.0, gt=0, le=86400, description="default interval between reads")
    timeout: Duration = Field(1.0, gt=0, le=600, description="how long one request may take")
    on_startup_error: OnStartupError = OnStartupError.RETRY
    backoff: Backoff = Backoff()
    tags: Sequence[TagBase] = Field(min_length=1)
    integrity_interval: Duration | None = Field(
        None,
        gt=0,
        le=86400,
        description="telemetry by exception: every tag is sent at least this often (default 60s once a tag has a "
        "deadband)",
    )

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not TAG_NAME.match(v):
            raise ValueError(f"{v!r} is not a valid device name: letters, digits, . _ - / only")
        return v

    def check(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Cross-tag checks (overlaps and the like): (location under this device, message) pairs."""
        return []

    def relative_to(self, base: Path) -> Self:
        """This device with the files it names (certificates, keys, secrets) resolved under `base`."""
        return self

    def check_files(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Problems with the files this device names, found at load time rather than on first connect."""
        return []

    def telemetry_tags(self) -> list[TelemetryTag]:
        """What telemetry needs of each tag: unit, deadband in its unit, float32 printing."""
        return [TelemetryTag(t.name, t.unit, t.deadband_value(), t.float32) for t in self.tags]

    def report_integrity(self) -> float | None:
        """By exception, every tag re-sent at least this often (seconds); None: every tag in every message.
        By exception once the device has an integrity_interval or a tag has a deadband."""
        if self.integrity_interval is None and all(t.deadband is None for t in self.tags):
            return None
        return self.integrity_interval or DEFAULT_INTEGRITY

    def interval_of(self, tag: TagBase) -> float:
        """The poll interval that applies to a tag."""
        return tag.poll_interval if tag.poll_interval is not None else self.poll_interval


def overlaps(extents: Iterable[tuple[int, int, int | None, int]]) -> list[tuple[int, int]]:
    """(tag, earlier tag it overlaps) for (tag, first unit, bit or None, units) extents of one address space.

    Whole-unit tags sort before the bits of their first unit, so each bit meets them; the whole-unit
    tag reaching furthest so far is kept, so a long tag (float64, string) is found over every tag it
    covers, not only its neighbour. Two bits of one unit overlap only when they are the same bit.
    """
    found: list[tuple[int, int]] = []
    cover: tuple[int, int] | None = None  # (tag, one past its last unit)
    bits: dict[tuple[int, int], int] = {}
    for tag, start, bit, size in sorted(extents, key=lambda e: (e[1], -1 if e[2] is None else e[2])):
        if bit is not None and (start, bit) in bits:
            found.append((tag, bits[(start, bit)]))
        elif cover is not None and start < cover[1]:
            found.append((tag, cover[0]))
        if bit is not None:
            bits.setdefault((start, bit), tag)
        elif cover is None or start + size > cover[1]:
            cover = (tag, start + size)
    return found


@dataclass(frozen=True, eq=False)  # identity hash: groups key per-group state cheaply
class ScanGroup:
    """Tags of one device read together on one interval."""

    interval: float
    tags: tuple[str, ...]


@dataclass(frozen=True)
class Request:
    """One request a scan group sends each cycle (or sets up once, when subscribed), for `check --plan`.

    `label` says what it asks for in the notation the engineer wrote the tags in (40001–40125,
    holding:0–124, DB10.DBB0–DBB479, Read of 120 nodes): the same text the driver's warnings name it by.
    """

    label: str
    tags: tuple[str, ...]  # the tags whose values it brings


def group_by_interval(device: DeviceBase, tags: Iterable[T]) -> list[tuple[float, list[T]]]:
    """Tags grouped by the poll interval that applies to each, shortest interval first, file order kept."""
    by_interval: dict[float, list[T]] = {}
    for tag in tags:
        by_interval.setdefault(device.interval_of(tag), []).append(tag)
    return sorted(by_interval.items())


class Driver(Protocol):
    """The runtime side of a device: connect, read a scan group, close. No I/O in the constructor.

    Every driver lists `groups` (polled on their interval) and `subscriptions` (tags the device sends by
    itself on change; empty for polling drivers). A driver with subscriptions implements `subscribe`
    and `check`; `plan()` says in the engineer's notation what each cycle asks of the device.
    """

    name: str
    groups: list[ScanGroup]  # polled: the poller calls read() on each group's schedule
    subscriptions: list[ScanGroup]  # pushed by the device; `interval` is the sampling interval

    async def connect(self) -> None:
        """Open the connection; raise DeviceError when the device cannot be reached."""

    async def read(self, group: ScanGroup) -> SampleBatch:
        """Read one scan group; raise DeviceError when the connection fails (not for bad tags)."""

    async def close(self) -> None:
        """Close the connection; safe to call twice."""

    async def subscribe(self, sink: Callable[[SampleBatch], None]) -> None:
        """After connect: set up monitored items that call `sink` with each batch of changes."""

    async def check(self) -> None:
        """Raise DeviceError when the connection or its subscriptions are dead (called every timeout)."""

    def stats(self) -> Mapping[str, int]:
        """A frozen snapshot of the driver's own counters by name (no I/O); reaches /metrics with the device."""

    def plan(self) -> list[str]:
        """One line per scan group or subscription: what a cycle reads, in the engineer's notation."""

    def requests(self) -> dict[ScanGroup, list[Request]]:
        """Every request of each scan group or subscription, in the engineer's notation (`check --plan`)."""


class DriverBase:
    """Defaults for a polling driver: no subscriptions, and a plan of tag counts per interval."""

    name: str
    groups: list[ScanGroup]
    subscriptions: list[ScanGroup]

    def __init__(self, name: str) -> None:
        self.name = name
        self.groups = []
        self.subscriptions = []

    async def subscribe(self, sink: Callable[[SampleBatch], None]) -> None:
        """Polling drivers have nothing to subscribe to."""
        raise RuntimeError(f"{type(self).__name__} polls; it has no subscriptions")

    async def check(self) -> None:
        """Polling drivers find a dead connection when they read."""

    def stats(self) -> Mapping[str, int]:
        """Polling drivers count nothing beyond what the poller counts."""
        return {}

    def plan(self) -> list[str]:
        """Tag counts per interval (drivers with a read planner say more)."""
        return [f"{len(g.tags)} tags every {g.interval:g}s" for g in self.groups]

    def requests(self) -> dict[ScanGroup, list[Request]]:
        """Every request per group; a driver without a read planner knows none ({})."""
        return {}


class DriverUnavailable(EdgeAgentError):
    """A device's driver cannot be loaded: its protocol library is not installed."""


@dataclass(frozen=True)
class DriverPlugin:
    """A driver's registration: its type key, its config model, and where its runtime lives.

    The config model imports no protocol library, so loading and checking a config costs nothing
    for protocols it does not use; `runtime` ("module:Class") is imported when a device is built.
    """

    key: str
    config: type[DeviceBase]
    runtime: str  # "package.module:Class", imported on the first build()
    extra: str  # the pip extra that installs the protocol library: edge-agent[<extra>]
    library: str  # the protocol library's import name, named in the error when it is missing
    simulator: str | None = None  # "package.module:Class" serving the simulated plant over this protocol
    simulator_port: int | None = None  # the simulator's default port (no well-known port: no root needed)

    def runtime_class(self) -> Callable[[Any], Driver]:
        """The driver class, imported now; DriverUnavailable when its protocol library is missing."""
        return _import(self.runtime, self)

    def build(self, device: DeviceBase) -> Driver:
        """A driver for one configured device (no I/O); DriverUnavailable names the device and the extra."""
        try:
            cls = self.runtime_class()
        except DriverUnavailable as exc:
            raise DriverUnavailable(f"device {device.name}: {exc}") from exc.__cause__
        return cls(device)

    def simulator_class(self) -> Any | None:
        """The simulator server class for this protocol, if the driver ships one."""
        return None if self.simulator is None else _import(self.simulator, self)


def _import(target: str, plugin: DriverPlugin) -> Any:
    module, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] == "edge_agent":
            raise
        raise DriverUnavailable(
            f"type {plugin.key} needs the Python package {exc.name!r}, which is not installed: "
            f"pip install 'edge-agent[{plugin.extra}]'"
        ) from exc


REGISTRY: dict[str, DriverPlugin] = {}


def register(plugin: DriverPlugin) -> DriverPlugin:
    """Add a driver to the registry under its `type` key."""
    REGISTRY[plugin.key] = plugin
    return plugin


@dataclass(frozen=True)
class PartFailure:
    """One request of a scan that failed on its own: what it asked for, its tags, why, and a hint."""

    label: str
    tags: Sequence[str]
    why: str
    hint: str = ""


class PartFailures:
    """Requests of a device that fail on their own (an exception answer, a bad item): logged once, counted."""

    def __init__(self, device: str, log: logging.Logger) -> None:
        self.device = device
        self.log = log
        self.count = 0
        self._failing: set[str] = set()
        self._silent: set[str] = set()  # scans whose every request failed last time

    def scan(self, scope: str, failed: Sequence[PartFailure], answered: Sequence[str]) -> None:
        """One scan's outcome: per request as failed()/answered() do, or one device-level line when none answered.

        A device that answers every request with an exception (a gateway whose serial device is dead)
        is up but serves no data: one line for the device says so, instead of one per request.
        """
        if failed and not answered:
            self.count += len(failed)
            for f in failed:
                self.log.debug("device %s: %s: %s", self.device, f.label, f.why)
            if scope in self._silent:
                return
            self._silent.add(scope)
            whys = Counter(f.why for f in failed)
            first = {f.why: f.label for f in reversed(failed)}
            # a reason only one request has names it (40001–40002 answered …); shared ones count them
            detail = "; ".join(f"{first[why] if n == 1 else f'{n} requests'} {why}" for why, n in whys.most_common(3))
            ntags = len({t for f in failed for t in f.tags})
            hints = {f.hint for f in failed}
            self.log.warning(
                "device %s: no request of %s answered with data (%s); %d tag%s marked bad until it does%s",
                self.device,
                scope,
                detail,
                ntags,
                "s" if ntags > 1 else "",
                hints.pop() if len(hints) == 1 else "",  # one cause, one hint (a wrong unit id, say)
            )
            return
        if scope in self._silent:
            self._silent.discard(scope)
            self.log.info("device %s: %s answers with data again", self.device, scope)
        for f in failed:
            self.failed(f.label, f.tags, f.why, f.hint)
        for label in answered:
            self.answered(label)

    def failed(self, label: str, tags: Sequence[str], why: str, hint: str = "") -> None:
        """Count a failure; WARNING with its tags the first time, DEBUG while it keeps failing."""
        self.count += 1
        if label in self._failing:
            self.log.debug("device %s: %s failed again: %s", self.device, label, why)
            return
        self._failing.add(label)
        more = f" and {len(tags) - 5} more" if len(tags) > 5 else ""
        self.log.warning(
            "device %s: %s: %s; tags %s%s marked bad%s", self.device, label, why, ", ".join(tags[:5]), more, hint
        )

    def answered(self, label: str) -> None:
        """A request answered: log its recovery once."""
        if label in self._failing:
            self._failing.discard(label)
            self.log.info("device %s: %s answers again", self.device, label)


def mark_bad(values: np.ndarray, quality: np.ndarray, exact: dict[int, Any], cols: np.ndarray) -> None:
    """Columns of a failed request: NaN, quality bad, no exact value."""
    values[cols] = np.nan
    quality[cols] = Quality.BAD
    for col in cols:
        exact.pop(int(col), None)
