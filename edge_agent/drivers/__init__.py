"""Protocol drivers, found by scanning this package: each driver module or package defines `PLUGIN`.

A driver's `__init__` (or module) holds only its registration and config model; its runtime, and the
protocol library with it, is imported when a device of that type is built (DriverPlugin.build).
Drivers from other distributions register through the `edge_agent.drivers` entry point group.
"""

from __future__ import annotations

from edge_agent.drivers.base import (
    REGISTRY,
    DeviceBase,
    Driver,
    DriverBase,
    DriverPlugin,
    DriverUnavailable,
    Request,
    ScanGroup,
    TagBase,
    register,
)
from edge_agent.plugins import discover

_NOT_DRIVERS = frozenset({"base", "codecs", "planner"})


def _discover() -> None:
    for plugin in discover(__name__, __path__, DriverPlugin, skip=_NOT_DRIVERS, group="edge_agent.drivers"):
        register(plugin)


_discover()


__all__ = [
    "REGISTRY",
    "DeviceBase",
    "Driver",
    "DriverBase",
    "DriverPlugin",
    "DriverUnavailable",
    "Request",
    "ScanGroup",
    "TagBase",
]
