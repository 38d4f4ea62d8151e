"""Serve the pump skid over Modbus TCP (pymodbus 3.16 SimDevice API).

The register map below is a contract (examples/simulator.yaml is written against it). Addresses
in the comments are 1-based Modicon numbers; on the wire they are 0-based (40001 -> 0).
The server only reads the plant's latest snapshot and passes coil writes back as commands.
"""

from __future__ import annotations

import logging
import math
import struct
from pathlib import Path
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice
from pymodbus.simulator.simcore import SimCore

from .plant import SIGNALS, PlantPort, PlantState

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PORT",
    "MODEL_STRING",
    "UNIT_ID",
    "ModbusPlantServer",
    "PlantPort",
    "encode_holding",
    "encode_input",
]

DEFAULT_PORT = 5020
UNIT_ID = 1
MODEL_STRING = "EA-PUMP-SKID-01\0"

# Holding 40001..40016: the eight signals as float32 ABCD, two registers each (SIGNALS order).
HOLDING_FLOATS = 0
# Holding 40101..40108: model string, 2 ASCII chars per register, high byte first.
HOLDING_MODEL = 100
# Input 30001..30008: int16 = round(value * scale), clipped (SIGNALS order).
INPUT_SCALED = 0
INPUT_SCALES: tuple[int, ...] = (100, 100, 10, 10, 100, 10, 10, 10)
# Input 30101..30102: run_seconds uint32, word order CDAB (low word first).
INPUT_RUN_SECONDS = 100
# Coils 00001 pump_run (rw), 00002 fault_reset (write True; reads False).
COIL_PUMP_RUN, COIL_FAULT_RESET, N_COILS = 0, 1, 2
# Discrete inputs 10001 motor_running, 10002 fault_active, 10003 high_vibration.
_DISCRETES = ("motor_running", "fault_active", "high_vibration")
N_DISCRETE = len(_DISCRETES)

_MODEL_REGS = [int.from_bytes(MODEL_STRING.encode("ascii")[i : i + 2], "big") for i in range(0, len(MODEL_STRING), 2)]
_FC_READ_COILS, _FC_READ_DISCRETE, _FC_READ_HOLDING, _FC_READ_INPUT = 1, 2, 3, 4
_FC_WRITE_COIL, _FC_WRITE_COILS, _FC_READ_WRITE = 5, 15, 23
_BIT_LIMITS = {1: N_COILS, 5: N_COILS, 15: N_COILS, 2: N_DISCRETE}


def encode_holding(state: PlantState) -> list[int]:
    """Registers 40001..40016: the signals as big-endian float32 (ABCD)."""
    return list(struct.unpack(">16H", struct.pack(">8f", *state.values)))


def _int16(value: float, scale: int) -> int:
    x = value * scale
    n = 0 if math.isnan(x) else round(max(-32768.0, min(32767.0, x)))
    return n & 0xFFFF


def encode_input(state: PlantState) -> tuple[list[int], list[int]]:
    """Registers 30001..30008 (scaled int16) and 30101..30102 (run_seconds, CDAB)."""
    scaled = [_int16(v, s) for v, s in zip(state.values, INPUT_SCALES, strict=True)]
    rs = state.run_seconds & 0xFFFFFFFF
    return scaled, [rs & 0xFFFF, rs >> 16]


class _UnitGate:
    """Wraps pymodbus' SimCore: answers only UNIT_ID, and only the mapped coils/discretes.

    SimCore would fall back to device 0, or fail with a KeyError (DEVICE_FAILURE and a logged
    traceback), for other unit ids; a gateway answers GATEWAY_NO_RESPONSE (0x0B), so do that.
    pymodbus pads bit blocks to 16 bits, so their bounds are checked here too.
    """

    def __init__(self, core: SimCore) -> None:
        self._core = core
        self._warned: set[int] = set()

    def device_ids(self) -> list[int]:
        return [UNIT_ID]

    def _check(self, device_id: int, func_code: int, address: int, count: int) -> ExcCodes | None:
        if device_id != UNIT_ID:
            if device_id not in self._warned:
                self._warned.add(device_id)
                log.warning(
                    "modbus: request for unit %d answered 0x0B (gateway target no response); this device is unit %d",
                    device_id,
                    UNIT_ID,
                )
            return ExcCodes.GATEWAY_NO_RESPONSE
        limit = _BIT_LIMITS.get(func_code)
        if limit is not None and (address < 0 or address + count > limit):
            return ExcCodes.ILLEGAL_ADDRESS
        return None

    async def async_getValues(
        self, device_id: int, func_code: int, address: int, count: int = 1
    ) -> list[int] | list[bool] | ExcCodes:
        if exc := self._check(device_id, func_code, address, count):
            return exc
        return await self._core.async_getValues(device_id, func_code, address, count)

    async def async_setValues(
        self, device_id: int, func_code: int, address: int, values: list[int] | list[bool]
    ) -> ExcCodes | None:
        if exc := self._check(device_id, func_code, address, len(values)):
            return exc
        return await self._core.async_setValues(device_id, func_code, address, values)


class ModbusPlantServer:
    """A Modbus TCP server for one plant, unit 1; `start()` listens, `stop()` closes."""

    def __init__(
        self, plant: PlantPort, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, state_dir: Path | None = None
    ) -> None:
        self._plant = plant
        self.host = host
        self.port = port
        self._server: ModbusTcpServer | None = None
        self._image_tick = -1
        self._holding: list[int] = []
        self._input: tuple[list[int], list[int]] = ([], [])

    def _device(self) -> SimDevice:
        regs = DataType.REGISTERS
        return SimDevice(
            UNIT_ID,
            simdata=(
                [SimData(0, values=[True, False], datatype=DataType.BITS)],
                [SimData(0, values=[False] * N_DISCRETE, datatype=DataType.BITS)],
                [
                    SimData(HOLDING_FLOATS, values=[0] * 16, datatype=regs, readonly=True),
                    SimData(HOLDING_MODEL, values=list(_MODEL_REGS), datatype=regs, readonly=True),
                ],
                [
                    SimData(INPUT_SCALED, values=[0] * 8, datatype=regs, readonly=True),
                    SimData(INPUT_RUN_SECONDS, values=[0, 0], datatype=regs, readonly=True),
                ],
            ),
            action=self._action,
        )

    async def start(self) -> None:
        """Bind and listen; OSError if the address cannot be used."""
        logging.getLogger("pymodbus").setLevel(logging.WARNING)
        server = ModbusTcpServer(self._device(), address=(self.host, self.port))
        if not isinstance(server.context, SimCore):  # pragma: no cover - pymodbus changed
            raise TypeError("pymodbus did not build a SimCore from the SimDevice")
        server.context = _UnitGate(server.context)  # type: ignore[assignment]
        try:
            await server.serve_forever(background=True)
        except RuntimeError as exc:
            raise OSError(f"modbus tcp: cannot listen on {self.host}:{self.port}: {exc}") from exc
        self._server = server
        sockets = getattr(server.transport, "sockets", None)
        if self.port == 0 and sockets:
            self.port = int(sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Close the listener and every client connection."""
        if self._server is not None:
            server, self._server = self._server, None
            await server.shutdown()

    @staticmethod
    def device_fields(host: str, port: int) -> dict[str, Any]:
        """The fields of a `type: modbus` device section that reads this server."""
        return {"type": "modbus", "host": host, "port": port, "unit": UNIT_ID}

    @staticmethod
    def tag_fields(signal: str) -> dict[str, Any]:
        """Where a plant signal lives here, as a tag's fields (the module's register map)."""
        if signal in SIGNALS:
            return {"address": f"4{HOLDING_FLOATS + 2 * SIGNALS.index(signal) + 1:04d}", "type": "float32"}
        return {"address": f"1{_DISCRETES.index(signal) + 1:04d}"}

    @property
    def endpoint(self) -> str:
        """One line for humans: protocol, address, unit."""
        return f"modbus tcp {self.host}:{self.port} unit {UNIT_ID}"

    def _refresh(self) -> PlantState:
        state = self._plant.state
        if state.tick != self._image_tick:
            self._holding = encode_holding(state)
            self._input = encode_input(state)
            self._image_tick = state.tick
        return state

    async def _action(
        self,
        func_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """Copy the latest snapshot into the requested range; pass coil writes to the plant."""
        if func_code in (_FC_WRITE_COIL, _FC_WRITE_COILS):
            # Bit blocks: address is the bit address, registers hold 16 bits each.
            for i, value in enumerate(set_values or ()):
                if address + i == COIL_PUMP_RUN:
                    self._plant.pump_run = bool(value)
                elif address + i == COIL_FAULT_RESET and value:
                    self._plant.reset_faults()
            return None
        state = self._refresh()
        if func_code == _FC_READ_COILS:
            registers[0] = int(self._plant.pump_run)  # fault_reset always reads False
        elif func_code == _FC_READ_DISCRETE:
            registers[0] = int(state.motor_running) | int(state.fault_active) << 1 | int(state.high_vibration) << 2
        elif func_code in (_FC_READ_HOLDING, _FC_READ_WRITE):
            for a in range(address, address + count):
                if HOLDING_FLOATS <= a < HOLDING_FLOATS + 16:
                    registers[a - start_address] = self._holding[a - HOLDING_FLOATS]
        elif func_code == _FC_READ_INPUT:
            scaled, run_seconds = self._input
            for a in range(address, address + count):
                if INPUT_SCALED <= a < INPUT_SCALED + 8:
                    registers[a - start_address] = scaled[a - INPUT_SCALED]
                elif INPUT_RUN_SECONDS <= a < INPUT_RUN_SECONDS + 2:
                    registers[a - start_address] = run_seconds[a - INPUT_RUN_SECONDS]
        return None
