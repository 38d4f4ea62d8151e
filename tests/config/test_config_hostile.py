"""Hostile config files (issue 11, items 6 to 8): each ends in `FILE:LINE: path: message` and exit 2, never in a
traceback, a hang or a value silently read as something else.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edge_agent.cli import main
from edge_agent.config import loader, parse_config
from edge_agent.errors import ConfigError

MODBUS = """\
devices:
  - name: plc
    type: modbus
    host: 127.0.0.1
    tags:
      - {name: a, address: "40001"}
"""


def check(tmp_path: Path, text: str | bytes, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """`edge-agent check c.yaml` in-process: (exit code, the lines it printed, without the c.yaml folder)."""
    path = tmp_path / "c.yaml"
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    code = main(["check", str(path)])
    out = capsys.readouterr()
    return code, [line.replace(f"{tmp_path}/", "") for line in (out.out + out.err).splitlines()]


def errors(text: str, environ: dict[str, str] | None = None) -> list[str]:
    """The issues parse_config raises for `text` as c.yaml, as printed."""
    with pytest.raises(ConfigError) as err:
        parse_config(text, source="c.yaml", environ=environ or {})
    return [str(i) for i in err.value.issues]


# ---------------------------------------------------------------- item 6: alias bombs


def bomb(levels: int, *, mapping: bool = False) -> str:
    """The billion laughs: each level an alias of the one before, five times (5**levels values from a few lines)."""
    lines = [MODBUS.rstrip("\n").replace('{name: a, address: "40001"}', '&l0 {name: a, address: "40001"}')]
    for n in range(1, levels + 1):
        five = ", ".join(f"x{i}: *l{n - 1}" if mapping else f"*l{n - 1}" for i in range(5))
        lines.append(f"    l{n}: &l{n} {{{five}}}" if mapping else f"    l{n}: &l{n} [{five}]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("mapping", "where"),
    [(False, "c.yaml:12: devices[0].l6[4]: alias *l5"), (True, "c.yaml:12: devices[0].l6.x3: alias *l5")],
    ids=["lists", "mappings"],
)
def test_an_alias_bomb_is_refused_at_the_alias(tmp_path: Path, mapping: bool, where: str) -> None:
    """12 levels (5**12 = 244 million values from 600 bytes): one error, at the alias that takes the values the
    aliases repeat past the bound (level 6 of lists: 20,495 + 5 × 16,406; of mappings: 25,345 + 4 × 20,311).

    A subprocess with a timeout ends the test when the loader hangs (before the fix: hours in ${ENV} substitution).
    """
    text = bomb(12, mapping=mapping)
    assert len(text) < 1000
    (tmp_path / "c.yaml").write_text(text)
    r = subprocess.run(
        [sys.executable, "-m", "edge_agent", "check", "c.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.splitlines() == [
        f"{where} repeats more than {loader.MAX_ALIAS_VALUES} values; refused as an alias bomb",
        "c.yaml: 1 error, nothing started",
    ]


def test_env_substitution_visits_each_shared_node_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """6 levels (15,625 values, under the bound): ${ENV} substitution walks the written nodes, not the expansion."""
    calls = 0
    substitute = loader._substitute

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return substitute(*args, **kwargs)

    monkeypatch.setattr(loader, "_substitute", counted)
    text = bomb(6)
    with pytest.raises(ConfigError):  # l1..l6 are no Modbus device fields
        parse_config(text, source="c.yaml", environ={})
    assert calls <= text.count(",") + text.count(":"), calls  # a call per written value, not per expanded one


def test_aliases_of_a_normal_size_still_load() -> None:
    text = """\
devices:
  - name: plc-1
    type: modbus
    host: 127.0.0.1
    poll_interval: &fast 100ms
    planner: &planner {max_gap: 4, max_registers: 60}
    tags:
      - {name: a, address: "40001", poll_interval: *fast}
  - name: plc-2
    type: modbus
    host: 127.0.0.2
    planner: *planner
    tags:
      - {name: b, address: "40001", poll_interval: *fast}
"""
    cfg = parse_config(text, environ={})
    assert [d.name for d in cfg.devices] == ["plc-1", "plc-2"]
    assert cfg.devices[1].planner.max_registers == 60  # type: ignore[attr-defined]
    assert cfg.devices[1].tags[0].poll_interval == 0.1
