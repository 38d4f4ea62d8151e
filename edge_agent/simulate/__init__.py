"""A simulated pump skid (pump, motor, inlet valve) with injectable faults, served over Modbus TCP.

`Plant` is the offline, deterministic model (fast data generation without a server);
`run_simulator` serves it on wall-clock ticks until cancelled.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .faults import FAULTS, FaultSpec, parse_fault_spec
from .modbus_server import DEFAULT_PORT, ModbusPlantServer
from .plant import SIGNALS, Plant, PlantState

__all__ = [
    "DEFAULT_PORT",
    "FAULTS",
    "SIGNALS",
    "FaultSpec",
    "Plant",
    "PlantState",
    "SimulatorOptions",
    "list_faults",
    "parse_fault_spec",
    "run_simulator",
]

# After a long stall (suspended VM), catch up at most this many ticks before yielding to the loop.
_MAX_CATCH_UP = 2000


class _Server(Protocol):
    @property
    def endpoint(self) -> str: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True)
class SimulatorOptions:
    """How to run the simulator: where to listen, the seed, the fault schedule, the tick."""

    host: str = "127.0.0.1"
    modbus_port: int = DEFAULT_PORT
    seed: int = 0
    faults: tuple[FaultSpec, ...] = ()
    tick: float = 0.1  # seconds of plant time per tick
    opcua_port: int | None = None  # None: no OPC UA server
    s7_port: int | None = None  # None: no S7 server
    opcua_cert_dir: Path | None = None  # where the OPC UA server keeps its certificate (a temp dir if None)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.tick) and self.tick > 0):
            raise ValueError(f"tick must be a positive number of seconds, got {self.tick}")
        for name in ("modbus_port", "opcua_port", "s7_port"):
            port = getattr(self, name)
            if port is not None and not 0 <= port <= 65535:
                raise ValueError(f"{name} must be 0..65535, got {port}")


def list_faults() -> list[tuple[str, str]]:
    """(name, one-line description) of every injectable fault."""
    return [(name, kind.description) for name, kind in FAULTS.items()]


async def _tick_forever(plant: Plant, dt: float) -> None:
    """Step the plant on deadlines k·dt from now; late ticks are caught up by stepping."""
    loop = asyncio.get_running_loop()
    t0 = loop.time() - plant.tick * dt
    while True:
        due = math.floor((loop.time() - t0) / dt + 1e-9)
        behind = min(due - plant.tick, _MAX_CATCH_UP)
        if behind > 0:
            plant.advance(behind)
        await asyncio.sleep(max(0.0, t0 + (plant.tick + 1) * dt - loop.time()))


async def run_simulator(options: SimulatorOptions, *, on_ready: Callable[[list[str]], None] | None = None) -> None:
    """Serve the plant until cancelled; on_ready gets one line per listening endpoint."""
    plant = Plant(seed=options.seed, faults=options.faults, dt=options.tick)
    servers: list[_Server] = [ModbusPlantServer(plant, host=options.host, port=options.modbus_port)]
    if options.opcua_port is not None:
        from .opcua_server import OpcUaPlantServer

        servers.append(
            OpcUaPlantServer(plant, host=options.host, port=options.opcua_port, cert_dir=options.opcua_cert_dir)
        )
    if options.s7_port is not None:
        from .s7_server import S7PlantServer

        servers.append(S7PlantServer(plant, host=options.host, port=options.s7_port))
    started: list[_Server] = []
    try:
        for server in servers:
            await server.start()
            started.append(server)
        if on_ready is not None:
            on_ready([s.endpoint for s in servers])
        await _tick_forever(plant, options.tick)
    finally:
        for server in reversed(started):
            await server.stop()
