"""Config fuzzing: mutations of the example configs and the golden cases through `edge-agent check`, in-process.

Every input ends in exit 0, or in exit 2 with `FILE:LINE: …` on every error line (one line for a file that cannot
be read or is too large), never in a traceback. The work of each run is bounded, not timed: the tree the YAML loader
hands on, aliases expanded, and the ${ENV} substitution's visits stay within the written size plus the loader's
alias bound; past it, the wrappers below raise, so a hostile input ends its example instead of hanging it.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edge_agent.cli import main
from edge_agent.config import loader, yamlfile

ROOT = Path(__file__).resolve().parents[2]
SEEDS = sorted(
    p.relative_to(ROOT) for p in [*ROOT.glob("examples/*.yaml"), *ROOT.glob("tests/**/testcases/*/config.yaml")]
)
SHARED = ("tests/fixtures", "models")  # what the seeds name by relative paths outside their own folder

# twelve levels of five aliases each on one line: 5**12 values where it stands
BOMB = "[&b0 [x, x, x, x, x], " + ", ".join(f"&b{n} [{', '.join([f'*b{n - 1}'] * 5)}]" for n in range(1, 13)) + "]"
# what a hostile or careless edit puts into a config file
TOKENS = [
    BOMB,
    "\x01", "\x00", "\x7f", "\x1b", "\ufeff", "\u2028", "\t", "\r",
    "&a ", "*a", "<<: *a", "&b [*a, *a, *a, *a, *a]", "{x: *a, y: *a}", "&a", "*undefined",
    "!!binary aGVsbG8=", "!!set {a}", "!!timestamp 2024-01-01", "!!omap [a: 1]", "!!pairs [a: 1]",
    "!!python/object:os.system", "!custom x", "!!int abc", "!!float x", "!!bool maybe", "!!map x",
    "!!seq {a: 1}", "!!str", "!!null [a]", "? [a, b]\n: 1", "? {a: 1}\n: 1", "[[[[[[[[[[]]]]]]]]]]",
    ".nan", ".inf", "-.inf", "1e999", "1.0e+999", "true", "no", "on", "~", "null", "2024-01-01",
    "9" * 5000, "0x" + "f" * 200, "-" + "1" * 30, "1:2:3:4:5:6", "0b" + "1" * 80, "00012", "1_000",
    "${X}", "${HOSTILE}", "${HOSTILE:-.nan}", "$${X}", "${", "$",
    "[", "]", "{", "}", ":", "- ", "-", "#", "'", '"', "|", ">", ",", "?", "%", "@", "`",
    "%YAML 1.1\n---\n", "---\n", "...\n", "'\\x00'", '"\\0"', '"\\x01"', '"\\u0000"', '"a\\nb"',
    "name: x", "type: modbus", "type: s7", "type: opcua", "address: 40001", "tags: []", "devices: []",
]  # fmt: skip

positions = st.integers(0, 999_999).map(lambda n: n / 1_000_000)  # where in the file, as a fraction of it
edits = st.one_of(
    st.tuples(st.just("flip"), positions, st.integers(0, 127) | st.sampled_from([0x80, 0xC3, 0xE2, 0xFF])),
    st.tuples(st.just("delete line"), positions),
    st.tuples(st.just("duplicate line"), positions),
    st.tuples(st.just("swap lines"), positions, positions),
    st.tuples(st.just("insert"), positions, st.sampled_from(TOKENS)),
    st.tuples(st.just("value"), positions, st.sampled_from(TOKENS)),
    st.tuples(st.just("alias"), positions, positions),
)


def mutate(data: bytes, edit: tuple[Any, ...]) -> bytes:
    """One edit of the file's bytes."""
    kind, where = edit[0], edit[1]
    lines = data.splitlines(keepends=True) or [b""]
    i = int(where * len(lines))
    if kind == "flip":
        at = int(where * len(data)) if data else 0
        return data[:at] + bytes([edit[2]]) + data[at + 1 :]
    if kind == "delete line":
        return b"".join(lines[:i] + lines[i + 1 :])
    if kind == "duplicate line":
        return b"".join(lines[: i + 1] + lines[i:])
    if kind == "swap lines":
        j = int(edit[2] * len(lines))
        lines[i], lines[j] = lines[j], lines[i]
        return b"".join(lines)
    if kind == "insert":
        at = int(where * len(data))
        return data[:at] + edit[2].encode() + data[at:]
    if kind == "value":  # the value after the first `key:` of a line
        lines[i] = re.sub(rb"(:\s+)[^\s,}\]#][^,}\]#\n]*", lambda m: m.group(1) + edit[2].encode(), lines[i], count=1)
        return b"".join(lines)
    # an anchor on one line's value and an alias of it as another's
    j = int(edit[2] * len(lines))
    lines[i] = re.sub(rb"(:\s+)(?=\S)", rb"\1&fz ", lines[i], count=1)
    lines[j] = re.sub(rb"(:\s+)[^\s,}\]#][^,}\]#\n]*", rb"\1*fz", lines[j], count=1)
    return b"".join(lines)


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder laid out like the repository, where each seed's folder holds links to its neighbours (certificates,
    `pki/`) and the shared folders the seeds name (`../../fixtures/pump-i8.tflite`, `../models/…`) are links too.
    """
    root = tmp_path_factory.mktemp("fuzz")
    for shared in SHARED:
        (root / shared).parent.mkdir(parents=True, exist_ok=True)
        (root / shared).symlink_to(ROOT / shared)
    for seed in SEEDS:
        folder = root / seed.parent
        if folder.exists():
            continue
        folder.mkdir(parents=True)
        for item in (ROOT / seed.parent).iterdir():
            if item.suffix not in (".yaml", ".txt"):
                (folder / item.name).symlink_to(item)
    return root


def expanded_size(tree: Any, cap: int) -> int:
    """Values in the tree, each alias repetition counted again (what a walk of it visits); stops past `cap`."""
    count, todo = 0, [tree]
    while todo and count <= cap:
        node = todo.pop()
        count += 1
        if isinstance(node, dict):
            todo.extend(node.keys())
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)
    return count


@contextlib.contextmanager
def bounded_work(monkeypatch: pytest.MonkeyPatch, size: int) -> Iterator[None]:
    """Raise as soon as the loader's tree or the ${ENV} substitution's visits pass what `size` bytes may hold."""
    bound = 2 * size + yamlfile.MAX_ALIAS_VALUES
    parse, substitute = loader._parse_yaml, loader._substitute
    visits = 0

    def parse_bounded(text: str, source: str) -> Any:
        tree, issues = parse(text, source)
        n = expanded_size(tree, bound)
        assert n <= bound, f"the loader handed on a tree of more than {bound} values"
        return tree, issues

    def substitute_bounded(*args: Any, **kwargs: Any) -> Any:
        nonlocal visits
        visits += 1
        assert visits <= bound, f"${{ENV}} substitution visited more than {bound} values"
        return substitute(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(loader, "_parse_yaml", parse_bounded)
        m.setattr(loader, "_substitute", substitute_bounded)
        yield


def check(path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    """`edge-agent check PATH` in-process: (exit code, stdout, stderr); any exception fails the example."""
    out, err = io.StringIO(), io.StringIO()
    with (
        bounded_work(monkeypatch, path.stat().st_size),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        try:
            code = main(["check", str(path)])
        except Exception as exc:  # any exception is the failure this test looks for
            pytest.fail(f"{type(exc).__name__}: {exc}"[:2000])
    return code, out.getvalue(), err.getvalue()


def assert_located(path: Path, code: int, out: str, err: str) -> None:
    assert code in (0, 2), (code, out, err)
    assert "Traceback" not in out + err
    if code == 0:
        return
    source = re.escape(str(path))
    lines = err.splitlines()
    assert lines and re.fullmatch(rf"{source}: \d+ errors?, nothing started", lines[-1]), err
    issues = lines[:-1]
    assert issues, err
    unreadable = re.compile(rf"{source}: (cannot read the config file: |the file is larger than ).+")
    if len(issues) == 1 and unreadable.fullmatch(issues[0]):
        return
    for line in issues:
        assert re.match(rf"({source}:\d+|env EDGE_AGENT__\w+): \S", line), f"no FILE:LINE in {line!r}\n{err}"


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in [n for n in os.environ if n.startswith("EDGE_AGENT__")]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("X", raising=False)
    monkeypatch.setenv("HOSTILE", "!!binary aGVsbG8=")
    return monkeypatch


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.sampled_from(SEEDS), mutations=st.lists(edits, min_size=1, max_size=4))
@example(seed=Path("tests/config/testcases/valid_minimal/config.yaml"), mutations=[("value", 0.9, "9" * 5000)])
@example(seed=Path("tests/config/testcases/valid_minimal/config.yaml"), mutations=[("alias", 0.3, 0.9)])
@example(seed=Path("examples/simulator.yaml"), mutations=[("value", 0.5, BOMB)])
@example(seed=Path("tests/config/testcases/valid_with_model/config.yaml"), mutations=[("value", 0.95, '"\\0"')])
def test_mutated_configs_end_in_located_errors(
    stage: Path, environ: pytest.MonkeyPatch, seed: Path, mutations: list[tuple[Any, ...]]
) -> None:
    data = (ROOT / seed).read_bytes()
    for edit in mutations:
        data = mutate(data, edit)
    path = stage / seed
    path.write_bytes(data)
    assert_located(path, *check(path, environ))


@pytest.mark.parametrize("seed", SEEDS, ids=[s.as_posix() for s in SEEDS])
def test_the_seeds_themselves(stage: Path, environ: pytest.MonkeyPatch, seed: Path) -> None:
    """Unmutated, each seed checks as it does in the repository: the stage resolves what it names."""
    path = stage / seed
    path.write_bytes((ROOT / seed).read_bytes())
    code, out, err = check(path, environ)
    assert_located(path, code, out, err)
    if seed.parts[0] == "examples":
        assert code == 0, err
