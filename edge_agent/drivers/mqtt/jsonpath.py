"""The small JSON path syntax of `type: mqtt` tags: where in a JSON payload a tag's value is.

Hand-written rather than a JSONPath library: tags need three steps only, checked when the config loads,
and a full JSONPath engine (filters, recursion, slices) would accept paths whose meaning an engineer must
then look up. The syntax:

    $                      the whole payload (a bare number, true/false, or a string)
    $.value                a key of an object (letters, digits, _ - : and spaces; or quoted: $["a.b"])
    $.values[2]            an element of a list, from 0
    $.tags[name=x].value   the first object of a list whose key `name` is the text x (or the number, if x is one)

Steps chain: `$.data.tags[id=7].v`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_KEY = r"[A-Za-z0-9_\-: ]+"
_STEP = re.compile(
    rf"""\.(?P<key>{_KEY})
      | \[(?P<index>\d+)\]
      | \[(?P<quoted>"(?:[^"\\]|\\.)*")\]
      | \[(?P<mkey>{_KEY})=(?P<mval>"(?:[^"\\]|\\.)*"|[^\]"]*)\]""",
    re.VERBOSE,
)


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a path: a key, a list index, or the first list element whose `key` equals `match`."""

    key: str | None = None
    index: int | None = None
    match: str | int | None = None

    def __str__(self) -> str:
        if self.index is not None:
            return f"[{self.index}]"
        if self.match is not None:
            return f"[{self.key}={self.match}]"
        return f".{self.key}"


def parse(path: str) -> tuple[Step, ...]:
    """The steps of a path; ValueError says where it stops making sense."""
    if not path.startswith("$"):
        raise ValueError(f"{path!r}: a path starts with $ (the whole payload), e.g. $.value")
    steps: list[Step] = []
    pos = 1
    while pos < len(path):
        m = _STEP.match(path, pos)
        if m is None:
            raise ValueError(
                f'{path!r}: cannot read it from {path[pos:]!r}; write .key, [index], ["quoted key"] or [key=value]'
            )
        if m["key"] is not None:
            steps.append(Step(key=m["key"].strip()))
        elif m["index"] is not None:
            steps.append(Step(index=int(m["index"])))
        elif m["quoted"] is not None:
            steps.append(Step(key=json.loads(m["quoted"])))
        else:
            raw = m["mval"]
            value: str | int = json.loads(raw) if raw.startswith('"') else raw
            if isinstance(value, str) and re.fullmatch(r"-?\d+", value) and not raw.startswith('"'):
                value = int(value)
            steps.append(Step(key=m["mkey"].strip(), match=value))
        pos = m.end()
    return tuple(steps)


def extract(doc: Any, steps: tuple[Step, ...]) -> Any:
    """The value the steps lead to in a decoded JSON document; LookupError says which step found nothing."""
    here = doc
    for i, step in enumerate(steps):
        if step.index is not None:
            if not isinstance(here, list) or step.index >= len(here):
                raise LookupError(f"step {i + 1} ({step}): no list with that many elements")
            here = here[step.index]
        elif step.match is not None:
            if not isinstance(here, list):
                raise LookupError(f"step {i + 1} ({step}): not a list")
            here = next((e for e in here if isinstance(e, dict) and _equal(e.get(step.key), step.match)), _MISSING)
            if here is _MISSING:
                raise LookupError(f"step {i + 1} ({step}): no element matches")
        else:
            if not isinstance(here, dict) or step.key not in here:
                raise LookupError(f"step {i + 1} ({step}): no such key")
            here = here[step.key]
    return here


_MISSING = object()


def _equal(found: Any, wanted: str | int) -> bool:
    # a number matches the number or its text; booleans are never numbers here
    if isinstance(found, bool):
        return False
    if isinstance(wanted, int):
        return (isinstance(found, int) and found == wanted) or found == str(wanted)
    return found == wanted
