"""What every driver provides: a config model, a runtime class and a `type` key, registered together."""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, Self, runtime_checkable

import numpy as np
from pydantic import Field, field_validator

from edge_agent.fields import Duration, StrictModel
from edge_agent.types import Quality, SampleBatch

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


class TagBase(StrictModel):
    """Fields every tag has, whatever the protocol."""

    name: str = Field(description="unique tag name, referenced by models (letters, digits, . _ - /)")
    unit: str | None = Field(None, description="engineering unit, for display")
    description: str | None = None
    poll_interval: Duration | None = Field(
        None, gt=0, le=86400, description="overrides the device's poll_interval for this tag"
    )

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not TAG_NAME.match(v):
            raise ValueError(f"{v!r} is not a valid tag name: start with a letter or _, then letters, digits, . _ - /")
        return v


class DeviceBase(StrictModel):
    """Fields every device has, whatever the protocol."""

    type: str = Field(description="driver type key: modbus, …")
    name: str = Field(description="unique device name, used in logs, metrics and topics")
    poll_interval: Duration = Field(1.0, gt=0, le=86400, description="default interval between reads")
    timeout: Duration = Field(1.0, gt=0, le=600, description="how long one request may take")
    on_startup_error: OnStartupError = OnStartupError.RETRY
    backoff: Backoff = Backoff()
    tags: Sequence[TagBase] = Field(min_length=1)

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


class Driver(Protocol):
    """The runtime side of a device: connect, read a scan group, close. No I/O in the constructor.

    Drivers whose device pushes changes (OPC UA subscriptions) also list `subscriptions` and
    implement `subscribe` and `check` (see SubscribingDriver); the poller detects them.
    """

    name: str
    groups: list[ScanGroup]  # polled: the poller calls read() on each group's schedule

    async def connect(self) -> None:
        """Open the connection; raise DeviceError when the device cannot be reached."""

    async def read(self, group: ScanGroup) -> SampleBatch:
        """Read one scan group; raise DeviceError when the connection fails (not for bad tags)."""

    async def close(self) -> None:
        """Close the connection; safe to call twice."""


@runtime_checkable
class SubscribingDriver(Protocol):
    """A driver whose device sends changes by itself."""

    subscriptions: list[ScanGroup]  # tags delivered on change; `interval` is the sampling interval

    async def subscribe(self, sink: Callable[[SampleBatch], None]) -> None:
        """After connect: set up monitored items that call `sink` with each batch of changes."""

    async def check(self) -> None:
        """Raise DeviceError when the connection or its subscriptions are dead (called every timeout)."""


@dataclass(frozen=True)
class DriverPlugin:
    """A driver's registration: its config model and how to build its runtime from it."""

    key: str
    config: type[DeviceBase]
    factory: Callable[[Any], Driver]


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
            detail = "; ".join(f"{n} request{'s' if n > 1 else ''} {why}" for why, n in whys.most_common(3))
            ntags = len({t for f in failed for t in f.tags})
            self.log.warning(
                "device %s: no request of %s answered with data (%s); %d tag%s marked bad until it does",
                self.device,
                scope,
                detail,
                ntags,
                "s" if ntags > 1 else "",
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
