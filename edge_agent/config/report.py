"""Where a problem is: a pydantic error or a check followed through the YAML tree to `FILE:LINE dotted.path: message`.

The YAML tree's mappings and lists remember the line of each key and item (the loader builds them).
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, Union

from pydantic import BaseModel

from edge_agent.config.schema import Config
from edge_agent.drivers import REGISTRY
from edge_agent.errors import ConfigIssue
from edge_agent.fields import NotANumber

# ---------------------------------------------------------------- the YAML tree, as the loader builds it


class _LineDict(dict[Any, Any]):
    line: int = 1
    lines: dict[Any, int]


class _LineList(list[Any]):
    line: int = 1
    lines: list[int]


# ---------------------------------------------------------------- locations


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
        elif isinstance(part, str) and (not last or part in REGISTRY or not isinstance(node, dict | list)):
            continue  # a union tag such as 'modbus', 'float' (of float | 'auto') or a validator name: not in the file
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


_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _message(err: Mapping[str, Any], parent_loc: tuple[str | int, ...], node: Any) -> str:
    kind, msg = err["type"], str(err["msg"])
    if isinstance(err.get("input"), NotANumber):
        return "a boolean (true/false, yes/no, on/off) is not a number"
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
    if kind == "finite_number":
        return f"{err['input']!r} is not a finite number"
    if kind in _BOUNDS:
        return f"{err['input']!r} is out of range: must be {_BOUNDS[kind]} {next(iter(err['ctx'].values()))}"
    if kind == "union_tag_invalid":
        return f"{err['ctx']['tag']!r} is not a device type; known types: {', '.join(sorted(REGISTRY))}"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if kind in ("enum", "literal_error") and "input" in err:
        return f"{err['input']!r} is not allowed: {msg[0].lower()}{msg[1:]}"
    return msg


def _in_file_order(issues: list[ConfigIssue]) -> list[ConfigIssue]:
    def key(i: ConfigIssue) -> tuple[int, int]:
        tail = i.source.rpartition(":")[2]
        return (1, 0) if not tail.isdigit() else (0, int(tail))

    return sorted(issues, key=key)
