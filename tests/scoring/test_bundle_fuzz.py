"""Fuzzed bundles: whatever a model file holds, `model inspect` and `check` end in exit 0, or exit 2 with one line.

Two kinds of damage: bytes of the flatbuffer flipped or cut off (a bad copy, a truncated download), and
metadata JSON that a careless tool or a hostile hand wrote (wrong types, NaN and infinities, huge or
negative numbers, missing keys, the same input twice). Each runs through the CLI in-process; an
exception escaping `main` fails the test, and so does a second line.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.cli import main
from edge_agent.scoring.bundle import METADATA_NAME
from edge_agent.scoring.tflite_metadata import find_metadata, read_metadata_bytes, replace_metadata_bytes

FIXTURES = Path(__file__).parents[1] / "fixtures"
BASES = {p.name: p.read_bytes() for p in sorted(FIXTURES.glob("*.tflite"))}
EXAMPLES = 200  # per test: 600 bundles in all, about 15 s on a busy 2-core machine
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


def _metadata(data: bytes) -> dict[str, Any]:
    raw = read_metadata_bytes(data, METADATA_NAME)
    assert raw is not None
    parsed: dict[str, Any] = json.loads(raw)
    return parsed


METAS = {name: _metadata(data) for name, data in BASES.items()}
TAGS = METAS["pump-i8.tflite"]["inputs"]


@pytest.fixture(scope="module", autouse=True)
def quiet_cli() -> Iterator[None]:
    """main() sets the protocol libraries' log levels for a process of its own: not for this test session."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("edge_agent.cli._setup_logging", lambda level: None)
        yield


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="bundle-fuzz-") as d:
        yield Path(d)


def run_cli(*args: str) -> tuple[int, list[str]]:
    """Exit code and stderr lines of the CLI, run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        rc = main(list(args))
    # numpy's RuntimeWarning (overflow, invalid value) is how a lying bundle used to show itself, if at all
    assert not [w for w in seen if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in seen]
    return rc, err.getvalue().splitlines()


def config_for(workdir: Path, model: Path) -> Path:
    """A config whose one device provides the fixtures' inputs (check contacts nothing)."""
    tags = "\n".join(f'      - {{name: {t}, address: "{40001 + 2 * i}", type: float32}}' for i, t in enumerate(TAGS))
    path = workdir / "agent.yaml"
    path.write_text(
        "devices:\n  - name: panel\n    type: modbus\n    host: 127.0.0.1\n    port: 1\n    tags:\n"
        f"{tags}\nmodels:\n  - name: pump\n    file: {model}\n"
    )
    return path


def assert_refused_in_one_line_or_accepted(workdir: Path, data: bytes) -> None:
    model = workdir / "fuzzed.tflite"
    model.write_bytes(data)
    rc, err = run_cli("model", "inspect", str(model))
    assert rc in (0, 2), (rc, err)
    if rc == 0:
        assert err == []
    else:
        assert len(err) == 1 and err[0].startswith(str(model)), err
    config = config_for(workdir, model)
    rc, err = run_cli("check", str(config))
    assert rc in (0, 2), (rc, err)
    if rc == 0:
        assert err == []
        return
    issues, summary = err[:-1], err[-1]
    n = len(issues)
    assert n >= 1 and summary == f"{config}: {n} error{'s' if n != 1 else ''}, nothing started", err
    assert all(line.startswith(f"{config}:") for line in issues), err


# ---------------------------------------------------------------- the flatbuffer's bytes


def _hot_spots(data: bytes) -> list[int]:
    """Where a flip does most harm: the header and root table, and the metadata buffer and its length."""
    found = find_metadata(data, METADATA_NAME)
    spots = list(range(64))
    if found is not None:
        spots += list(range(found.start - 8, found.start + min(found.length, 64)))
    return spots


@st.composite
def damage(draw: st.DrawFn) -> tuple[str, list[tuple[int, int]], int | None]:
    """(fixture, [(position, new byte)], length cut to or None): small to print when a case fails."""
    name = draw(st.sampled_from(sorted(BASES)))
    size = len(BASES[name])
    spots = _hot_spots(BASES[name])
    flips = draw(
        st.lists(
            st.tuples(
                st.one_of(st.sampled_from(spots), st.integers(0, size - 1)),
                st.one_of(st.integers(0, 255), st.sampled_from([0x00, 0xFF, 0x7F, 0x80])),
            ),
            max_size=6,
        )
    )
    cut = draw(st.one_of(st.none(), st.integers(0, size))) if flips else draw(st.integers(0, size))
    return name, flips, cut


@FUZZ
@given(case=damage())
def test_damaged_flatbuffers(workdir: Path, case: tuple[str, list[tuple[int, int]], int | None]) -> None:
    name, flips, cut = case
    data = bytearray(BASES[name])
    for pos, byte in flips:
        data[pos] = byte
    assert_refused_in_one_line_or_accepted(workdir, bytes(data[:cut]))


# ---------------------------------------------------------------- the metadata's JSON

HOSTILE_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 10**30, -(10**30), 2**63, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e-9, 1e12, -0.0, 5e-324, 1.7976931348623157e308]),
    st.text(max_size=12),
    st.sampled_from(["", "nan", "1e9", "reconstruction_mse", "pump.flow", "\n", "\x00", "é" * 3]),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=10),
    st.lists(st.text(max_size=6), max_size=10),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=3),
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every key and list position of the metadata (the root excluded)."""
    if isinstance(node, dict):
        items: Any = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return
    for key, child in items:
        yield (*prefix, key)
        yield from _paths(child, (*prefix, key))


def _at(meta: Any, path: tuple[Any, ...]) -> tuple[Any, Any]:
    parent = meta
    for key in path[:-1]:
        parent = parent[key]
    return parent, path[-1]


@st.composite
def lying_metadata(draw: st.DrawFn) -> tuple[str, bytes]:
    """(fixture, the metadata bytes to put in it)."""
    name = draw(st.sampled_from(sorted(BASES)))
    meta: Any = copy.deepcopy(METAS[name])
    for _ in range(draw(st.integers(1, 4))):
        paths = sorted(_paths(meta), key=repr)
        if not isinstance(meta, dict) or not paths:
            break
        path = draw(st.sampled_from(paths))
        parent, key = _at(meta, path)
        action = draw(st.sampled_from(["replace", "replace", "delete", "duplicate_inputs", "wrap", "scale_list"]))
        if action == "replace":
            parent[key] = draw(HOSTILE_VALUES)
        elif action == "delete":
            del parent[key]
        elif action == "duplicate_inputs" and isinstance(meta.get("inputs"), list) and meta["inputs"]:
            i = draw(st.integers(0, len(meta["inputs"]) - 1))
            meta["inputs"][draw(st.integers(0, len(meta["inputs"]) - 1))] = meta["inputs"][i]
        elif action == "wrap":
            parent[key] = [parent[key]] if draw(st.booleans()) else {"value": parent[key]}
        elif action == "scale_list" and isinstance(parent[key], list):
            parent[key] = parent[key] * draw(st.integers(0, 3))
    if draw(st.integers(0, 19)) == 0:
        meta = draw(st.sampled_from([[], "text", 42, None, [[[[[[]]]]]] * 3]))
    text = json.dumps(meta, allow_nan=True).encode()
    if draw(st.integers(0, 9)) == 0:  # not JSON at all, or not UTF-8, or nested past any parser's patience
        text = draw(st.sampled_from([text[: len(text) // 2], b"\xff\xfe" + text, b"[" * 100_000, b"", b"{}"]))
    return name, text


@FUZZ
@given(case=lying_metadata())
def test_lying_metadata(workdir: Path, case: tuple[str, bytes]) -> None:
    name, text = case
    data = replace_metadata_bytes(BASES[name], METADATA_NAME, text)
    assert data is not None
    assert_refused_in_one_line_or_accepted(workdir, data)


@FUZZ
@given(
    edits=st.lists(
        st.tuples(
            st.sampled_from(["window", "sample_interval", "threshold.value", "normalisation.scale", "inputs"]),
            HOSTILE_VALUES,
        ),
        min_size=1,
        max_size=3,
    )
)
def test_the_fields_the_agent_computes_with(workdir: Path, edits: list[tuple[str, Any]]) -> None:
    """The numbers that reach the buffers, the interpreter and the detector, hit directly."""
    meta = copy.deepcopy(METAS["pump-i8.tflite"])
    for where, value in edits:
        parent, key = _at(meta, tuple(where.split(".")))
        parent[key] = value
    data = replace_metadata_bytes(BASES["pump-i8.tflite"], METADATA_NAME, json.dumps(meta).encode())
    assert data is not None
    assert_refused_in_one_line_or_accepted(workdir, data)
