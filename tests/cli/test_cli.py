"""The `edge-agent` command as a user runs it: a subprocess against a real pymodbus server."""

from __future__ import annotations

import asyncio
import json
import signal
import struct
import sys
from pathlib import Path

from helpers import ModbusPeer, free_port

CLI = [sys.executable, "-m", "edge_agent"]


def write_config(tmp_path: Path, port: int, extra_tags: str = "") -> Path:
    path = tmp_path / "plant.yaml"
    path.write_text(
        "devices:\n  - name: plc\n    type: modbus\n    host: 127.0.0.1\n"
        f"    port: {port}\n    poll_interval: 100ms\n    timeout: 500ms\n    tags:\n"
        '      - {name: temp, address: "40001", type: float32, unit: degC}\n'
        '      - {name: count, address: "30001", type: uint32, byte_order: CDAB}\n'
        '      - {name: run, address: "00001"}\n' + extra_tags
    )
    return path


async def run_cli(*args: str, timeout: float = 20.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *CLI, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def place(peer: ModbusPeer) -> None:
    hi, lo = struct.unpack(">HH", struct.pack(">f", 21.5))
    peer.holding[0:2] = [hi, lo]
    peer.input[0:2] = [0x5678, 0x1234]  # CDAB: low word first → 0x12345678
    peer.coils[0] = True


async def test_read_json_decodes_every_tag(modbus_peer: ModbusPeer, tmp_path: Path) -> None:
    place(modbus_peer)
    code, out, err = await run_cli("read", str(write_config(tmp_path, modbus_peer.port)), "--json")
    assert code == 0, err
    rows = {r["tag"]: r for r in map(json.loads, out.splitlines())}
    assert rows["temp"]["value"] == 21.5 and rows["temp"]["unit"] == "degC"
    assert rows["count"]["value"] == 0x12345678
    assert rows["run"]["value"] is True
    assert all(r["quality"] == "good" and r["device"] == "plc" and r["ts"].endswith("Z") for r in rows.values())


async def test_read_json_prints_float32_as_written(modbus_peer: ModbusPeer, tmp_path: Path) -> None:
    place(modbus_peer)
    modbus_peer.holding[0:2] = struct.unpack(">HH", struct.pack(">f", 3.14159))
    modbus_peer.holding[2:6] = struct.unpack(">HHHH", struct.pack(">d", 0.1))
    cfg = write_config(tmp_path, modbus_peer.port, '      - {name: wide, address: "40003", type: float64}\n')
    code, out, err = await run_cli("read", str(cfg), "--json")
    assert code == 0, err
    assert '"value": 3.14159,' in out  # not its float64 widening, 3.141590118408203
    rows = {r["tag"]: r for r in map(json.loads, out.splitlines())}
    assert rows["temp"]["value"] == 3.14159 and rows["wide"]["value"] == 0.1


async def test_read_table_and_exit_1_on_bad_tag(modbus_peer: ModbusPeer, tmp_path: Path) -> None:
    place(modbus_peer)
    cfg = write_config(tmp_path, modbus_peer.port, '      - {name: missing, address: "40951"}\n')
    code, out, _ = await run_cli("read", str(cfg))
    assert code == 1
    lines = out.splitlines()
    assert lines[0].split() == ["DEVICE", "TAG", "VALUE", "UNIT", "QUALITY", "ADDRESS"]
    assert any(ln.split()[:3] == ["plc", "temp", "21.5"] for ln in lines)
    assert any(ln.split()[1] == "missing" and "bad" in ln.split() for ln in lines)


async def test_read_device_down_is_comms_lost(tmp_path: Path) -> None:
    code, out, err = await run_cli("read", str(write_config(tmp_path, free_port())), "--json")
    assert code == 1
    assert "cannot connect to 127.0.0.1" in err
    assert {json.loads(r)["quality"] for r in out.splitlines()} == {"comms-lost"}


async def test_read_unknown_device_and_bad_config(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, 1)
    code, _, err = await run_cli("read", str(cfg), "--device", "nope")
    assert code == 2 and "no device named 'nope'" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text(cfg.read_text().replace('"40001"', '"40001x"'))
    code, _, err = await run_cli("check", str(bad))
    assert code == 2 and f"{bad}:9: devices[0].tags[0].address:" in err


PLAN = """\
devices:
  - name: plc
    type: modbus
    host: 127.0.0.1
    tags:
      - {name: temp, address: "40001", type: float32}
      - {name: speed, address: "40003"}
      - {name: alarm, address: "40100"}
      - {name: run, address: "00001"}
      - {name: count, address: "30001", type: uint32, poll_interval: 5s}
  - name: gateway
    type: modbus
    host: 127.0.0.1
    planner: {max_registers: 100}
    tags:
      - {name: g0, address: "holding:0", type: float64}
      - {name: g1, address: "holding:96", type: float64}
  - name: s7plc
    type: s7
    host: 127.0.0.1
    tags:
      - {name: level, address: DB10.DBD0, type: real}
      - {name: pressure, address: DB10.DBD28, type: real}
      - {name: motor, address: M0.0}
      - {name: estop, address: E0.1}
  - name: ua
    type: opcua
    endpoint: opc.tcp://127.0.0.1:4840
    max_nodes_per_read: 2
    tags:
      - {name: u1, node: "ns=2;s=A"}
      - {name: u2, node: "ns=2;s=B"}
      - {name: u3, node: "ns=2;s=C"}
  - name: uasub
    type: opcua
    endpoint: opc.tcp://127.0.0.1:4840
    mode: subscribe
    tags:
      - {name: s1, node: "ns=2;s=A"}
"""


async def test_check_plan_lists_every_request_in_the_tags_notation(tmp_path: Path) -> None:
    cfg = tmp_path / "plan.yaml"
    cfg.write_text(PLAN)
    code, out, err = await run_cli("check", "--plan", str(cfg))
    assert code == 0, err
    assert out.splitlines()[1:] == [
        "  plc (modbus): 4 tags every 1s in 3 requests, 1 tags every 5s in 1 requests",
        "    every 1s: 40001–40003: 2 tags (temp, speed)",
        "    every 1s: 40100: 1 tag (alarm)",
        "    every 1s: 00001: 1 tag (run)",
        "    every 5s: 30001–30002: 1 tag (count)",
        "  gateway (modbus): 2 tags every 1s in 2 requests",
        "    every 1s: holding:0–3: 1 tag (g0)",
        "    every 1s: holding:96–99: 1 tag (g1)",
        "  s7plc (s7): 4 tags every 1s in 1 requests",
        "    every 1s: DB10.DBB0–DBB31, EB0, MB0: 4 tags (level … estop)",
        "  ua (opcua): 3 tags every 1s in 2 requests",
        "    every 1s: Read of 2 nodes: 2 tags (u1, u2)",
        "    every 1s: Read of 1 node: 1 tag (u3)",
        "  uasub (opcua): 1 tags subscribed (sampling 1s)",
        "    subscribed, sampling 1s: 1 monitored item: 1 tag (s1)",
    ]
    code, plain, err = await run_cli("check", str(cfg))  # without --plan: one line per device, as before
    assert code == 0, err
    assert plain.splitlines() == [line for line in out.splitlines() if not line.startswith("    ")]


async def test_run_polls_until_sigterm(modbus_peer: ModbusPeer, tmp_path: Path) -> None:
    place(modbus_peer)
    cfg = write_config(tmp_path, modbus_peer.port)
    proc = await asyncio.create_subprocess_exec(
        *CLI, "run", str(cfg), "--output", "samples", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    rows = []
    async with asyncio.timeout(10):
        while len(rows) < 15:
            rows.append(json.loads(await proc.stdout.readline()))
    proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0, err
    assert {r["tag"] for r in rows} == {"temp", "count", "run"}
    assert b"Traceback" not in err and b"stopped" in err


async def test_run_summary_and_duration(modbus_peer: ModbusPeer, tmp_path: Path) -> None:
    place(modbus_peer)
    code, out, err = await run_cli(
        "run", str(write_config(tmp_path, modbus_peer.port)), "--report-interval", "0.5", "--duration", "1.6"
    )
    assert code == 0, err
    lines = [ln for ln in out.splitlines() if ln.startswith("plc up")]
    assert len(lines) >= 2 and "temp=21.5" in lines[-1]


async def test_run_exits_1_when_strict_device_is_down(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, free_port())
    cfg.write_text(cfg.read_text().replace("    tags:", "    on_startup_error: error\n    tags:"))
    code, _, err = await run_cli("run", str(cfg))
    assert code == 1 and "on_startup_error: error" in err
