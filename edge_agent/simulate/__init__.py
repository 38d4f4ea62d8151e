"""A simulated pump skid (pump, motor, inlet valve) with injectable faults, served over Modbus TCP.

`Plant` is the offline, deterministic model (fast data generation without a server);
`run_simulator` serves it on wall-clock ticks until cancelled.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass(frozen=True)
class SimulatorOptions:
    """How to run the simulator: where to listen, the seed, the fault schedule, the tick."""

    host: str = "127.0.0.1"
    modbus_port: int = DEFAULT_PORT
    seed: int = 0
    faults: tuple[FaultSpec, ...] = ()
    tick: float = 0.1  # seconds of plant time per tick

    def __post_init__(self) -> None:
        if not (math.isfinite(self.tick) and self.tick > 0):
            raise ValueError(f"tick must be a positive number of seconds, got {self.tick}")
        if not 0 <= self.modbus_port <= 65535:
            raise ValueError(f"modbus_port must be 0..65535, got {self.modbus_port}")


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
    modbus = ModbusPlantServer(plant, host=options.host, port=options.modbus_port)
    await modbus.start()
    try:
        if on_ready is not None:
            on_ready([modbus.endpoint])
        await _tick_forever(plant, options.tick)
    finally:
        await modbus.stop()
