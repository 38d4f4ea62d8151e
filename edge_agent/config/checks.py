"""Checks across items, once each item is valid on its own: unique names, overlaps, a device's files, model inputs."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edge_agent.config.report import _locate
from edge_agent.config.schema import _DEVICE, format_path
from edge_agent.drivers import DeviceBase
from edge_agent.errors import ConfigIssue


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
        issues.append(ConfigIssue(where, format_path(parts), message))

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
