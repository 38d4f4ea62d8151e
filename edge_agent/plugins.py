"""Finding plugins: the modules of a package that define `PLUGIN`, and an entry point group for other distributions."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from importlib.metadata import entry_points
from typing import TypeVar

T = TypeVar("T")


def discover(package: str, path: Iterable[str], kind: type[T], *, skip: frozenset[str], group: str) -> list[T]:
    """Every `PLUGIN` of type `kind` in `package`'s modules (but `skip` and _private ones), then the entry points'."""
    found: list[T] = []
    for info in pkgutil.iter_modules(path):
        if info.name in skip or info.name.startswith("_"):
            continue
        plugin = getattr(importlib.import_module(f"{package}.{info.name}"), "PLUGIN", None)
        if isinstance(plugin, kind):
            found.append(plugin)
    for ep in entry_points(group=group):
        plugin = ep.load()
        if isinstance(plugin, kind):
            found.append(plugin)
    return found
