"""An independent client (mbpoll, from Debian) and the agent read the same simulator registers.

The plant is frozen (served without ticking) so both see identical registers; mbpoll's raw words
are decoded here by hand with struct and must equal what `edge-agent read --json` reports for
examples/simulator-modbus.yaml.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
from helpers import free_port

from edge_agent.simulate.modbus_server import ModbusPlantServer
from edge_agent.simulate.plant import Plant

EXAMPLE = Path(__file__).parents[3] / "examples" / "simulator-modbus.yaml"


async def mbpoll(port: int, table: str, ref: int, count: int) -> list[int]:
    """Raw 16-bit words (or bits) as mbpoll prints them; `ref` is 1-based as mbpoll counts."""
    exe = shutil.which("mbpoll")
    assert exe, "mbpoll is not installed: tests/run.sh installs it with apt"
    proc = await asyncio.create_subprocess_exec(
        exe, "-m", "tcp", "-p", str(port), "-a", "1", "-r", str(ref), "-c", str(count), "-t", table, "-1",
        "127.0.0.1", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0, err.decode()
    words = [int(v, 0) for v in re.findall(r"^\[\d+\]:\s+(\S+)", out.decode(), re.MULTILINE)]
    assert len(words) == count, out.decode()
    return words


def f32(hi: int, lo: int) -> float:
    """A float32 as `read --json` prints it: the shortest text that is the same float32."""
    return float(str(np.float32(struct.unpack(">f", struct.pack(">HH", hi, lo))[0])))


def i16(word: int) -> int:
    return int(struct.unpack(">h", struct.pack(">H", word))[0])


async def test_mbpoll_and_agent_agree_on_the_simulator() -> None:
    plant = Plant(seed=3)
    plant.advance(600)  # one minute in: temperatures and drifts have moved off their start values
    port = free_port()
    server = ModbusPlantServer(plant, host="127.0.0.1", port=port)
    await server.start()
    try:
        hr = await mbpoll(port, "4:hex", 1, 16)
        ir = await mbpoll(port, "3:hex", 1, 8)
        counter = await mbpoll(port, "3:hex", 101, 2)
        model = await mbpoll(port, "4:hex", 101, 8)
        coils = await mbpoll(port, "0", 1, 1)
        discrete = await mbpoll(port, "1", 1, 3)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edge_agent", "read", str(EXAMPLE), "--json",
            env={**os.environ, "SIM_MODBUS_PORT": str(port)},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        await server.stop()
    assert proc.returncode == 0, err.decode()
    agent = {row["tag"]: row["value"] for row in map(json.loads, out.decode().splitlines())}

    names = ["suction_pressure", "discharge_pressure", "flow", "motor_current", "vibration_rms",
             "bearing_temp", "fluid_temp", "valve_position"]  # fmt: skip
    expected = {f"pump.{n}": f32(hr[2 * i], hr[2 * i + 1]) for i, n in enumerate(names)}
    expected["pump.suction_pressure_raw"] = i16(ir[0]) * 0.01
    expected["pump.flow_raw"] = i16(ir[2]) * 0.1
    expected["pump.vibration_rms_raw"] = i16(ir[4]) * 0.01
    expected["pump.run_seconds"] = counter[1] << 16 | counter[0]  # CDAB: low word first
    expected["pump.model"] = b"".join(struct.pack(">H", w) for w in model).split(b"\0")[0].decode()
    expected["pump.run_command"] = bool(coils[0])
    expected["pump.motor_running"] = bool(discrete[0])
    expected["pump.fault_active"] = bool(discrete[1])
    expected["pump.high_vibration"] = bool(discrete[2])
    assert agent == expected
    assert 30 < agent["pump.flow"] < 50 and agent["pump.model"] == "EA-PUMP-SKID-01"
