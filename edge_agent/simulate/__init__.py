"""A simulated pump skid (pump, motor, inlet valve) with injectable faults, served over every protocol
whose driver names a simulator (DriverPlugin.simulator: Modbus TCP, OPC UA and S7 today).

`Plant` is the offline, deterministic model (fast data generation without a server);
`run_simulator` serves it on wall-clock ticks until cancelled. A server class takes
`(plant, host=, port=, state_dir=)`, has `start()`, `stop()` and `endpoint`, and says how a device
section reads it (`device_fields(host, port)`, `tag_fields(signal)`) so configs are written from it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from edge_agent.drivers import REGISTRY

from .faults import FAULTS, FaultSpec, parse_fault_spec
from .plant import SIGNALS, Plant, PlantState

__all__ = [
    "FAULTS",
    "SIGNALS",
    "FaultSpec",
    "Plant",
    "PlantState",
    "SimulatorOptions",
    "list_faults",
    "parse_fault_spec",
    "run_simulator",
    "simulated_protocols",
]

# After a long stall (suspended VM), catch up at most this many ticks before yielding to the loop.
_MAX_CATCH_UP = 2000


class _Server(Protocol):
    @property
    def endpoint(self) -> str: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def simulated_protocols() -> dict[str, int]:
    """Driver type → the simulator's default port, for every driver that ships a simulator."""
    return {k: p.simulator_port for k, p in sorted(REGISTRY.items()) if p.simulator and p.simulator_port is not None}


@dataclass(frozen=True)
class SimulatorOptions:
    """How to run the simulator: where to listen (one port per protocol), the seed, the faults, the tick."""

    host: str = "127.0.0.1"
    ports: Mapping[str, int] = field(default_factory=lambda: {"modbus": 5020})  # driver type → port
    seed: int = 0
    faults: tuple[FaultSpec, ...] = ()
    tick: float = 0.1  # seconds of plant time per tick
    state_dir: Path | None = None  # files a server keeps (the OPC UA server's certificate); a temp dir if None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.tick) and self.tick > 0):
            raise ValueError(f"tick must be a positive number of seconds, got {self.tick}")
        known = simulated_protocols()
        for key, port in self.ports.items():
            if key not in known:
                raise ValueError(f"no simulator for {key!r}; simulated protocols: {', '.join(known)}")
            if not 0 <= port <= 65535:
                raise ValueError(f"{key} port must be 0..65535, got {port}")


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
    servers: list[_Server] = []
    for key, port in options.ports.items():
        server_class = REGISTRY[key].simulator_class()
        assert server_class is not None  # SimulatorOptions accepts only simulated protocols
        servers.append(server_class(plant, host=options.host, port=port, state_dir=options.state_dir))
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
