"""Protocol drivers, found by scanning this package: each driver module or package defines `PLUGIN`.

A driver's `__init__` (or module) holds only its registration and config model; its runtime, and the
protocol library with it, is imported when a device of that type is built (DriverPlugin.build).
Drivers from other distributions register through the `edge_agent.drivers` entry point group.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

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

_NOT_DRIVERS = frozenset({"base", "codecs", "planner"})


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name in _NOT_DRIVERS or info.name.startswith("_"):
            continue
        plugin = getattr(importlib.import_module(f"{__name__}.{info.name}"), "PLUGIN", None)
        if isinstance(plugin, DriverPlugin):
            register(plugin)
    for ep in entry_points(group="edge_agent.drivers"):
        plugin = ep.load()
        if isinstance(plugin, DriverPlugin):
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
