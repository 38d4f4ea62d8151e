"""YAML as a config needs it: values with their line numbers, plain values only, and bounded work.

PyYAML's safe loader, with constructors that remember where each mapping and list came from (for
FILE:LINE errors), refuse what a config never means (!!binary, !!timestamp, …, keys that are not
names, 10,000-digit integers, control characters) and limit nesting; a pass over the parser's events
counts what aliases repeat and refuses an alias bomb at its alias, before anything is built.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import yaml

from edge_agent.config.report import _LineDict, _LineList
from edge_agent.config.schema import format_path
from edge_agent.errors import ConfigIssue

_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~10× faster

MAX_ALIAS_VALUES = 100_000  # values aliases may repeat in one file: a config repeats little; a bomb repeats billions
MAX_DEPTH = 64  # lists and mappings inside each other (a config needs 6 or so)
MAX_INT_BITS = 64  # no setting takes a larger number, and larger ones cannot always be printed or made floats
_YAML = "tag:yaml.org,2002:"


class _Refused(yaml.constructor.ConstructorError):
    """A value the loader will not build: its line, the path of the value in the tree, and why."""

    def __init__(self, node: yaml.Node, problem: str, path: Sequence[str | int]) -> None:
        super().__init__(None, None, problem, node.start_mark)
        self.line, self.message, self.path = node.start_mark.line + 1, problem, list(path)


class _Loader(_SafeLoader):  # type: ignore[misc,valid-type]
    """SafeLoader that remembers lines, rejects duplicate keys and builds plain values only.

    Plain values: text, numbers of at most 64 bits, booleans, null, lists and mappings. A date written plainly
    stays text; the tags that build other things (!!binary, !!timestamp, !!set, !!omap, !!pairs) are refused.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[int, list[str | int]]] = []  # (line, path) of keys given twice
        self.path: list[str | int] = []  # where the value being built goes, for errors


# YAML 1.1 reads 2024-01-01 as a date, which no setting takes: keep it as the text it is
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _YAML + "timestamp"]
    for first, resolvers in _SafeLoader.yaml_implicit_resolvers.items()
}


def _short(tag: str) -> str:
    return "!!" + tag[len(_YAML) :] if tag.startswith(_YAML) else tag


def _nested(loader: _Loader, node: yaml.Node, kind: type[yaml.Node], what: str) -> None:
    if not isinstance(node, kind):
        raise _Refused(node, f"{_short(node.tag)} needs {what}", loader.path)
    if len(loader.path) >= MAX_DEPTH:
        raise _Refused(node, f"lists and mappings are nested more than {MAX_DEPTH} deep", [])


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _LineDict:
    _nested(loader, node, yaml.MappingNode, "a mapping")
    loader.flatten_mapping(node)
    out = _LineDict()
    out.line, out.lines = node.start_mark.line + 1, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, list | dict):
            kind = "list" if isinstance(key, list) else "mapping"
            raise _Refused(key_node, f"a key must be a plain value such as a name, not a {kind}", loader.path)
        if not isinstance(key, str):  # every key of a config is a name; `1:`, `on:`, `~:` are not read as one
            kind = {bool: "a boolean", int: "an integer", float: "a number"}.get(type(key), "null")
            text = str(key_node.value)
            raise _Refused(key_node, f"a key must be a name; YAML reads {text} as {kind}: write '{text}'", loader.path)
        if key in out:
            loader.duplicates.append((key_node.start_mark.line + 1, [*loader.path, key]))
        loader.path.append(key)
        out[key] = loader.construct_object(value_node, deep=True)
        loader.path.pop()
        out.lines[key] = key_node.start_mark.line + 1
    return out


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> _LineList:
    _nested(loader, node, yaml.SequenceNode, "a list")
    out = _LineList()
    for i, child in enumerate(node.value):
        loader.path.append(i)
        out.append(loader.construct_object(child, deep=True))
        loader.path.pop()
    out.line, out.lines = node.start_mark.line + 1, [c.start_mark.line + 1 for c in node.value]
    return out


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> int | str:
    # YAML 1.1 reads 00001 as octal 1; a Modicon coil address is meant, so keep the text
    text = str(loader.construct_scalar(node))
    if re.fullmatch(r"0\d+", text):
        return text
    digits = text.replace("_", "")
    shown = f"{digits[:20]}… ({len(digits)} digits)" if len(digits) > 24 else digits
    too_large = _Refused(node, f"{shown} is too large a number for any setting", loader.path)
    if len(digits) > MAX_INT_BITS + 3:  # not even 0b and 64 binary digits: do not convert (base 60 is quadratic)
        raise too_large
    try:
        value = int(loader.construct_yaml_int(node))
    except ValueError:
        raise _Refused(node, f"{text!r} is not a !!int", loader.path) from None
    if abs(value).bit_length() > MAX_INT_BITS:
        raise too_large
    return value


def _construct_checked(tag: str) -> Any:
    """The SafeLoader's constructor of !!float or !!bool, refusing text that is not one (`!!bool maybe`)."""
    construct = _SafeLoader.yaml_constructors[tag]

    def checked(loader: _Loader, node: yaml.Node) -> Any:
        try:
            return construct(loader, node)
        except (ValueError, KeyError):
            raise _Refused(node, f"{node.value!r} is not a {_short(tag)}", loader.path) from None

    return checked


def _construct_str(loader: _Loader, node: yaml.Node) -> str:
    text = str(loader.construct_yaml_str(node))
    if "\0" in text:  # only an escape (\0, \x00) writes one; no name, host or path holds it
        raise _Refused(node, "a NUL character (\\0) has no place in a config", loader.path)
    return text


def _refuse_tag(loader: _Loader, node: yaml.Node) -> Any:
    raise _Refused(
        node,
        f"the tag {_short(node.tag)} is not allowed in a config: write text, numbers, true/false, lists and mappings",
        loader.path,
    )


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)
_Loader.add_constructor(_YAML + "int", _construct_int)
_Loader.add_constructor(_YAML + "str", _construct_str)
for _tag in ("float", "bool"):
    _Loader.add_constructor(_YAML + _tag, _construct_checked(_YAML + _tag))
for _tag in ("binary", "timestamp", "set", "omap", "pairs"):
    _Loader.add_constructor(_YAML + _tag, _refuse_tag)


@dataclasses.dataclass
class _Open:
    """A list or mapping the parser is inside of, while _alias_bomb counts."""

    anchor: str | None
    mapping: bool
    size: int = 1  # values in it so far, aliases expanded (itself included)
    children: int = 0  # in a mapping: keys and values
    key: Any = None  # in a mapping: the last key, for the path

    def at(self) -> str | int:
        """Where the next child goes, in a path."""
        if not self.mapping:
            return self.children
        return self.key if self.children % 2 else "?"

    def add(self, event: yaml.Event, size: int) -> None:
        if self.mapping and self.children % 2 == 0:  # a key
            self.key = event.value if isinstance(event, yaml.ScalarEvent) else "?"
        self.size += size
        self.children += 1


def _alias_bomb(text: str, source: str) -> ConfigIssue | None:
    """The alias at which the values aliases repeat pass MAX_ALIAS_VALUES, counted over the parser's events.

    Building the values costs nothing (an alias shares what it names), but every walk of the tree afterwards
    (${ENV}, validation) visits each repetition: 5 aliases of 5 aliases of … are billions of values.
    """
    if "*" not in text:  # no alias
        return None
    sizes: dict[str, int] = {}  # values under each anchor, aliases expanded
    stack: list[_Open] = []
    repeated = 0
    try:
        for event in yaml.parse(text, Loader=_SafeLoader):
            if isinstance(event, yaml.CollectionStartEvent):
                stack.append(_Open(event.anchor, isinstance(event, yaml.MappingStartEvent)))
                continue
            if isinstance(event, yaml.CollectionEndEvent):
                done = stack.pop()
                anchor, size = done.anchor, done.size
            elif isinstance(event, yaml.AliasEvent):
                anchor, size = None, sizes.get(event.anchor or "", 1)  # an anchor still open: the loader refuses it
                repeated += size
                if repeated > MAX_ALIAS_VALUES:
                    line = event.start_mark.line + 1 if event.start_mark else 1
                    return ConfigIssue(
                        f"{source}:{line}",
                        format_path([o.at() for o in stack]),
                        f"alias *{event.anchor} repeats more than {MAX_ALIAS_VALUES} values; refused as an alias bomb",
                    )
            elif isinstance(event, yaml.ScalarEvent):
                anchor, size = event.anchor, 1
            else:
                continue
            if anchor is not None:
                sizes[anchor] = size
            if stack:
                stack[-1].add(event, size)
    except yaml.YAMLError:
        return None  # loading the file reports it
    return None


def _parse_yaml(text: str, source: str) -> tuple[Any, list[ConfigIssue]]:
    bomb = _alias_bomb(text, source)
    if bomb is not None:
        return None, [bomb]
    loader = _Loader(text)
    try:
        data = loader.get_single_data()
    except _Refused as exc:
        return None, [ConfigIssue(f"{source}:{exc.line}", format_path(exc.path), exc.message)]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark else 1
        return None, [ConfigIssue(f"{source}:{line}", "", f"invalid YAML: {exc.problem}")]
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow (control characters): no mark
        line = text.count("\n", 0, exc.position) + 1
        return None, [ConfigIssue(f"{source}:{line}", "", f"invalid YAML: {str(exc).splitlines()[0]}")]
    except yaml.YAMLError as exc:
        return None, [ConfigIssue(f"{source}:1", "", f"invalid YAML: {str(exc).splitlines()[0]}")]
    finally:
        loader.dispose()
    issues = [
        ConfigIssue(f"{source}:{line}", format_path(path), "key given twice; the later one would silently win")
        for line, path in loader.duplicates
    ]
    return data, issues
