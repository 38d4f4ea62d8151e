"""What starting a command imports: each runs in a fresh interpreter, which then lists sys.modules.

No timings: a module set is the same on any machine, however busy. `--help` needs no third-party library at all;
the commands that read no PLC import no protocol library; a Modbus-only config imports no other protocol's.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
PROTOCOLS = ("pymodbus", "asyncua", "snap7")
# what `--help` must not import: every protocol library, MQTT, the TFLite runtime, numpy, the config's pydantic and YAML
HEAVY = (*PROTOCOLS, "paho", "ai_edge_litert", "tflite_runtime", "numpy", "pydantic", "yaml", "prometheus_client")

PROBE = """
import json, sys
from edge_agent.cli import main
try:
    code = main(json.loads(sys.argv[1]))
except SystemExit as exc:  # --help exits from argparse
    code = exc.code
sys.stdout.flush()
print("\\nMODULES " + json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def imported(*args: str, cwd: Path | None = None) -> tuple[int, str, set[str]]:
    """Run `edge-agent ARGS` in a fresh interpreter: (exit code, its output, the top-level packages it imported)."""
    r = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(list(args))],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )
    out, _, tail = r.stdout.rpartition("\nMODULES ")
    assert r.returncode == 0 and tail, f"the probe failed: {r.stdout}\n{r.stderr}"
    result = json.loads(tail)
    return result["code"], out + r.stderr, {m.partition(".")[0] for m in result["modules"]} | set(result["modules"])


def assert_none_of(libraries: tuple[str, ...], modules: set[str]) -> None:
    """None of `libraries` was imported."""
    found = sorted(set(libraries) & modules)
    assert not found, f"imported {', '.join(found)}"


def test_import_edge_agent_loads_no_config_and_no_driver() -> None:
    code = "import json, sys, edge_agent; print(edge_agent.__version__); print(json.dumps(sorted(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    modules = set(json.loads(r.stdout.splitlines()[-1]))
    assert not modules & {"edge_agent.config", "edge_agent.drivers", "pydantic", "numpy"}, sorted(modules)


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["model", "inspect", "--help"], ["--version"]])
def test_help_imports_no_third_party_library(args: list[str]) -> None:
    code, out, modules = imported(*args)
    assert code == 0 and "edge-agent" in out
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))
    assert not modules & {"edge_agent.config", "edge_agent.drivers", "edge_agent.agent"}


def test_outbox_stats_imports_no_protocol_library(tmp_path: Path) -> None:
    from edge_agent.outbox import Outbox

    box = Outbox(tmp_path / "outbox.db")
    box.open()
    box.close()
    code, out, modules = imported("outbox", "stats", str(tmp_path / "outbox.db"))
    assert code == 0 and "0 messages" in out, out
    assert_none_of((*PROTOCOLS, "paho"), modules)


def test_model_inspect_imports_no_protocol_library() -> None:
    code, out, modules = imported("model", "inspect", str(TESTS / "fixtures" / "pump-i8.tflite"))
    assert code == 0 and "sha256" in out, out
    assert_none_of((*PROTOCOLS, "paho"), modules)


def test_replay_imports_no_protocol_library(tmp_path: Path) -> None:
    from edge_agent.scoring.bundle import load_bundle

    model = TESTS / "fixtures" / "pump-i8.tflite"
    inputs = load_bundle(model).metadata.inputs
    rows = ["datetime," + ",".join(inputs)]
    for i in range(120):  # 24 s at 0.2 s: a few windows of the 8-sample model
        values = (10 + (k + 1) * math.sin(i / 7 + k) for k in range(len(inputs)))
        rows.append(f"2026-01-01T00:{i // 300:02d}:{i % 300 / 5:06.3f}Z," + ",".join(f"{v:.4f}" for v in values))
    data = tmp_path / "plant.csv"
    data.write_text("\n".join(rows) + "\n")
    code, out, modules = imported("replay", str(data), "--model", str(model))
    assert code == 0 and "120 rows" in out, out
    assert_none_of((*PROTOCOLS, "paho"), modules)


def test_check_of_a_modbus_only_config_imports_no_other_protocol(tmp_path: Path) -> None:
    (tmp_path / "plant.yaml").write_text(
        "devices:\n  - name: plc\n    type: modbus\n    host: 127.0.0.1\n    port: 1502\n    tags:\n"
        '      - {name: temp, address: "40001", type: float32}\n'
    )
    code, out, modules = imported("check", "plant.yaml", cwd=tmp_path)
    assert code == 0 and "plant.yaml: OK" in out, out
    assert "pymodbus" in modules  # check plans the reads with the Modbus driver itself
    assert_none_of(("asyncua", "snap7"), modules)


def test_a_missing_protocol_library_is_one_line_naming_the_device_and_the_extra(tmp_path: Path) -> None:
    """check and run refuse (exit 2) with the device and `pip install 'edge-agent[s7]'`; no traceback."""
    config = tmp_path / "c.yaml"
    config.write_text(
        "devices:\n"
        "  - {name: line-plc, type: s7, host: 127.0.0.1, port: 1, tags: [{name: v, address: DB1.DBD0, type: real}]}\n"
        "  - {name: pump, type: modbus, host: 127.0.0.1, port: 1, tags: [{name: w, address: '40001'}]}\n"
    )
    for command in (["check", str(config)], ["run", str(config), "--duration", "1"]):
        code = (
            f"import sys; sys.modules['snap7'] = None\nfrom edge_agent.cli import main\nsys.exit(main({command!r}))\n"
        )
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        out = r.stdout + r.stderr
        assert r.returncode == 2, out
        assert "device line-plc: type s7 needs the Python package 'snap7'" in out
        assert "pip install 'edge-agent[s7]'" in out and "Traceback" not in out
