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
from edge_agent.config import loader, parse_config, yamlfile
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
        f"{where} repeats more than {yamlfile.MAX_ALIAS_VALUES} values; refused as an alias bomb",
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


# ---------------------------------------------------------------- item 7: tracebacks


HOSTILE_YAML = {
    "control character": (b"devices: []\n\x01\n", "c.yaml:2: invalid YAML: unacceptable character #x0001: "),
    "integer of 5000 digits": (
        "devices: []\nagent: {id: " + "9" * 5000 + "}\n",
        "c.yaml:2: agent.id: 99999999999999999999… (5000 digits) is too large a number for any setting",
    ),
    "hex integer of 4000 digits": (
        "devices: []\nagent: {id: 0x" + "f" * 4000 + "}\n",
        "c.yaml:2: agent.id: 0xffffffffffffffffff… (4002 digits) is too large a number for any setting",
    ),
    "integer past 64 bits": (
        "devices: []\nagent: {id: 18446744073709551616}\n",
        "c.yaml:2: agent.id: 18446744073709551616 is too large a number for any setting",
    ),
    "sequence as a mapping key": (
        "? [a, b]\n: 1\n",
        "c.yaml:1: a key must be a plain value such as a name, not a list",
    ),
    "mapping as a key, nested": (
        "devices:\n  - name: x\n    ? {a: 1}\n    : 1\n",
        "c.yaml:3: devices[0]: a key must be a plain value such as a name, not a mapping",
    ),
    "integer as a key": (
        "devices:\n  - {name: x, 1: 2}\n",
        "c.yaml:2: devices[0]: a key must be a name; YAML reads 1 as an integer: write '1'",
    ),
    "boolean as a key": (
        "on: 1\ndevices: []\n",
        "c.yaml:1: a key must be a name; YAML reads on as a boolean: write 'on'",
    ),
    "nested 300 deep": (
        "devices: " + "[" * 300 + "]" * 300 + "\n",
        "c.yaml:1: lists and mappings are nested more than 64 deep",
    ),
    "!!int that is no integer": ("devices: []\nagent: {id: !!int abc}\n", "c.yaml:2: agent.id: 'abc' is not a !!int"),
    "!!float that is no number": ("devices: []\nagent: {id: !!float x}\n", "c.yaml:2: agent.id: 'x' is not a !!float"),
    "!!bool that is no boolean": (
        "devices: []\nagent: {id: !!bool maybe}\n",
        "c.yaml:2: agent.id: 'maybe' is not a !!bool",
    ),
    "!!map on a scalar": ("devices: []\nagent: !!map x\n", "c.yaml:2: agent: !!map needs a mapping"),
    "!!seq on a mapping": ("devices: !!seq {a: 1}\n", "c.yaml:1: devices: !!seq needs a list"),
    "NUL in a path": (
        MODBUS + 'models: [{name: m, file: "m\\0.tflite"}]\n',
        "c.yaml:7: models[0].file: a NUL character",
    ),
    "NUL in a key": ('devices: []\n"a\\x00": 1\n', "c.yaml:2: a NUL character (\\0) has no place in a config"),
    "a byte that is no UTF-8": (
        b"devices:\n  - name: \xff\n",
        "c.yaml:2: the file is not UTF-8 text: invalid start byte",
    ),
    "a secret that is a program": (
        MODBUS + "mqtt: {password_file: " + sys.executable + "}\n",
        "c.yaml:7: mqtt.password_file: the secret is ",  # larger than 64 KiB, or no UTF-8
    ),
    "size of 400 digits": (
        MODBUS + "outbox: {max_bytes: " + "9" * 400 + "MiB}\n",
        "c.yaml:7: outbox.max_bytes: '99999999999999999999'… (403 characters) is not a size: write e.g. 4096, 64KiB, "
        "512MiB, 1GB",
    ),
}


@pytest.mark.parametrize(("text", "first"), list(HOSTILE_YAML.values()), ids=list(HOSTILE_YAML))
def test_hostile_yaml_is_a_located_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str | bytes, first: str
) -> None:
    code, lines = check(tmp_path, text, capsys)
    assert code == 2, lines
    assert lines[0].startswith(first), lines
    assert lines[-1] == f"c.yaml: {len(lines) - 1} error{'s' if len(lines) > 2 else ''}, nothing started"


def test_an_endless_config_file_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """/dev/zero never ends: the loader reads no more than MAX_CONFIG_BYTES."""
    assert main(["check", "/dev/zero"]) == 2
    assert capsys.readouterr().err.splitlines()[0] == "/dev/zero: the file is larger than 16384 KiB"


# ---------------------------------------------------------------- item 8: values silently accepted


@pytest.mark.parametrize(
    ("tag", "message"),
    [
        ("scale: .nan", "devices[0].tags[0].scale: nan is not a finite number"),
        ("scale: .inf", "devices[0].tags[0].scale: inf is not a finite number"),
        ("offset: -.inf", "devices[0].tags[0].offset: -inf is not a finite number"),
        ("scale: 1.0e+999", "devices[0].tags[0].scale: inf is not a finite number"),
        ("scale: 1e999", "devices[0].tags[0].scale: '1e999' is not a finite number"),
        ("scale: true", "devices[0].tags[0].scale: a boolean (true/false, yes/no, on/off) is not a number"),
        ("name: !!binary aGVsbG8=", "devices[0].tags[0].name: the tag !!binary is not allowed in a config"),
        ("name: !!timestamp 2024-01-01", "devices[0].tags[0].name: the tag !!timestamp is not allowed in a config"),
        ("name: !!set {a}", "devices[0].tags[0].name: the tag !!set is not allowed in a config"),
        ("name: !!omap [a: 1]", "devices[0].tags[0].name: the tag !!omap is not allowed in a config"),
    ],
)
def test_modbus_tag_values_are_numbers_text_or_refused(tag: str, message: str) -> None:
    fields = {"name": "a", "address": '"40001"'} | dict([tag.split(": ", 1)])
    text = MODBUS.replace('{name: a, address: "40001"}', "{" + ", ".join(f"{k}: {v}" for k, v in fields.items()) + "}")
    assert errors(text)[0].startswith(f"c.yaml:6: {message}")


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("rack: true", "devices[0].rack: a boolean (true/false, yes/no, on/off) is not a number"),
        ("slot: false", "devices[0].slot: a boolean (true/false, yes/no, on/off) is not a number"),
        ("port: yes", "devices[0].port: a boolean (true/false, yes/no, on/off) is not a number"),
        ("pdu_size: on", "devices[0].pdu_size: a boolean (true/false, yes/no, on/off) is not a number"),
    ],
)
def test_s7_rack_and_slot_are_no_booleans(section: str, message: str) -> None:
    text = f"devices:\n  - {{name: s7, type: s7, host: h, {section}, tags: [{{name: a, address: MW0, type: int}}]}}\n"
    assert errors(text) == [f"c.yaml:2: {message}"]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("mqtt: {qos: true}", "mqtt.qos: a boolean (true/false, yes/no, on/off) is not a number"),
        ("models: [{name: m, file: m.tflite, threshold: .nan}]", "models[0].threshold: nan is not a finite number"),
        ("models: [{name: m, file: m.tflite, threshold: on}]", "models[0].threshold: a boolean"),
        ("models: [{name: m, file: m.tflite, hop: .inf}]", "models[0].hop: inf is not a finite number"),
        ("outbox: {max_age: .inf}", "outbox.max_age: inf is not a finite number"),
        ("outbox: {max_age: " + "9" * 400 + "s}", "outbox.max_age: inf is not a finite number"),
        ("buffers: {max_samples_per_tag: true}", "buffers.max_samples_per_tag: a boolean"),
    ],
)
def test_sections_take_finite_numbers_not_booleans(section: str, message: str) -> None:
    assert errors(MODBUS + section + "\n")[0].startswith(f"c.yaml:7: {message}")


def test_a_plain_date_is_text_as_written() -> None:
    """YAML 1.1 reads 2024-01-01 as a date, which no setting takes: the loader keeps it as the text it is."""
    cfg = parse_config(MODBUS + "agent: {site: 2024-01-01}\n", environ={})
    assert cfg.agent.site == "2024-01-01"


def test_env_values_and_overrides_are_checked_like_the_file() -> None:
    """${ENV} and EDGE_AGENT__ overrides still become numbers, and the same rules apply to them."""
    text = MODBUS.replace('address: "40001"}', 'address: "40001", scale: "${S}"}')
    cfg = parse_config(text, environ={"S": "2.5", "EDGE_AGENT__MQTT__QOS": "2"})
    assert cfg.devices[0].tags[0].scale == 2.5  # type: ignore[attr-defined]
    assert cfg.mqtt is not None and cfg.mqtt.qos == 2
    assert errors(text, {"S": ".nan"}) == ["c.yaml:6: devices[0].tags[0].scale: nan is not a finite number"]
    assert errors(text, {"S": "true"}) == [
        "c.yaml:6: devices[0].tags[0].scale: a boolean (true/false, yes/no, on/off) is not a number"
    ]
    assert errors(text, {"S": "!!binary aGVsbG8="}) == [
        "c.yaml:6: devices[0].tags[0].scale: Input should be a valid number, unable to parse string as a number"
    ]
    assert errors(MODBUS, {"EDGE_AGENT__MQTT__QOS": "true"}) == [
        "env EDGE_AGENT__MQTT__QOS: mqtt.qos: a boolean (true/false, yes/no, on/off) is not a number"
    ]
    assert errors(MODBUS, {"EDGE_AGENT__OUTBOX__MAX_AGE": ".inf"}) == [
        "env EDGE_AGENT__OUTBOX__MAX_AGE: outbox.max_age: inf is not a finite number"
    ]
