"""Serve the pump skid over S7 (ISO-on-TCP) with python-snap7's server.

The map below is a contract (examples/simulator-s7.yaml is written against it). Values are
big-endian, as on a real S7 CPU. The snap7 server answers from its own threads out of registered
byte buffers; a task on the event loop copies the plant's latest tick into them under the server's
per-area lock, so a read never sees half a tick.

DB1 (58 bytes)
    DBD0..DBD28   REAL   the eight signals in SIGNALS order (suction_pressure at DBD0 … valve_position at DBD28)
    DBX32.0       BOOL   motor_running
    DBX32.1       BOOL   fault_active
    DBX32.2       BOOL   high_vibration
    DBX32.3       BOOL   pump_run (the run command)
    DBD34         DINT   run_seconds
    DBW38         INT    vibration_rms × 100 (rounded, clipped)
    DBB40         STRING[16]  model "EA-PUMP-SKID-01" (max length 16, actual length 15)
M (8 bytes)
    MW0           WORD   heartbeat: the plant's tick number modulo 65536
    MD2           REAL   flow
    M6.0, M6.1    BOOL   motor_running, fault_active
I (1 byte)       I0.0 (E0.0) motor_running: the contactor's feedback contact
Q (1 byte)       Q0.0 (A0.0) pump_run: the run command output
Anything else answers "object does not exist" (other DBs) or "invalid address" (past an area's end).
Writes are accepted by the server but overwritten at the next tick: command the pump over Modbus.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import struct
import threading
from pathlib import Path
from typing import Any

from snap7.error import S7Error
from snap7.server import Server
from snap7.type import SrvArea

from .plant import SIGNALS, PlantPort, PlantState

log = logging.getLogger(__name__)

__all__ = ["DB_NUMBER", "DEFAULT_PORT", "MODEL", "RACK", "SLOT", "ClosingServer", "S7PlantServer", "encode_areas"]

DEFAULT_PORT = 1102
DB_NUMBER = 1
RACK, SLOT = 0, 1  # the server accepts any; these are what the example config uses
MODEL = "EA-PUMP-SKID-01"
MODEL_MAX = 16
_STATUS_BITS = ("motor_running", "fault_active", "high_vibration", "pump_run")  # DBX32.0 … DBX32.3
DB_SIZE = 40 + 2 + MODEL_MAX
M_SIZE = 8


def _int16(value: float) -> int:
    return 0 if math.isnan(value) else round(max(-32768.0, min(32767.0, value)))


def encode_areas(state: PlantState, tick: int) -> dict[SrvArea, bytes]:
    """The bytes of DB1, M, I and Q for one plant snapshot (see the module's map)."""
    running, fault = int(state.motor_running), int(state.fault_active)
    status = running | fault << 1 | int(state.high_vibration) << 2 | int(state.pump_run) << 3
    model = MODEL.encode("latin-1")
    db = (
        struct.pack(">8f", *state.values)
        + struct.pack(">BxI", status, state.run_seconds & 0xFFFFFFFF)
        + struct.pack(">h", _int16(state.vibration_rms * 100))
        + struct.pack(">BB", MODEL_MAX, len(model))
        + model.ljust(MODEL_MAX, b"\0")
    )
    marker = struct.pack(">HfBx", tick & 0xFFFF, state.flow, running | fault << 1)
    return {
        SrvArea.DB: db,
        SrvArea.MK: marker,
        SrvArea.PE: bytes([int(state.motor_running)]),
        SrvArea.PA: bytes([int(state.pump_run)]),
    }


class ClosingServer(Server):
    """python-snap7's server, whose `stop()` also closes every client connection, as a power cycle does.

    The stock server leaves connected clients to its 5 s receive timeout (and may answer one more
    request after stopping); a PLC that goes away drops its connections at once.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(log=False, **kwargs)  # log=True logs every read at INFO
        self._sockets: set[socket.socket] = set()
        self._sockets_lock = threading.Lock()

    def _handle_client(self, client_socket: socket.socket, address: tuple[str, int]) -> None:
        with self._sockets_lock:
            self._sockets.add(client_socket)
        try:
            super()._handle_client(client_socket, address)
        finally:
            with self._sockets_lock:
                self._sockets.discard(client_socket)

    def drop_clients(self) -> None:
        """Close every client connection now (the handler threads then end on their own)."""
        with self._sockets_lock:
            sockets = list(self._sockets)
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> int:
        """Stop listening and drop every client."""
        self.drop_clients()
        result = super().stop()
        self.drop_clients()  # any client accepted while stopping
        return result


class S7PlantServer:
    """An S7 server for one plant (DB1, M, I, Q); `start()` listens, `stop()` closes."""

    def __init__(
        self,
        plant: PlantPort,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        refresh: float | None = None,
        state_dir: Path | None = None,
    ) -> None:
        self._plant = plant
        self.host = host
        self.port = port
        # look for a new tick twice per plant tick: a read lags the plant by at most half a tick
        self._refresh = refresh if refresh is not None else float(getattr(plant, "dt", 0.1)) / 2
        self._server: ClosingServer | None = None
        self._buffers: dict[SrvArea, bytearray] = {}
        self._task: asyncio.Task[None] | None = None
        self._image_tick = -1

    @staticmethod
    def device_fields(host: str, port: int) -> dict[str, Any]:
        """The fields of a `type: s7` device section that reads this server."""
        return {"type": "s7", "host": host, "port": port, "rack": RACK, "slot": SLOT, "connection_type": "basic"}

    @staticmethod
    def tag_fields(signal: str) -> dict[str, Any]:
        """Where a plant signal lives here, as a tag's fields (DB1, the module's map)."""
        if signal in SIGNALS:
            return {"address": f"DB{DB_NUMBER}.DBD{4 * SIGNALS.index(signal)}", "type": "real"}
        return {"address": f"DB{DB_NUMBER}.DBX32.{_STATUS_BITS.index(signal)}"}

    async def start(self) -> None:
        """Bind and listen; OSError if the address cannot be used."""
        server_log = logging.getLogger("snap7.server")
        if server_log.level == logging.NOTSET:
            # it logs every read of a missing DB at WARNING; the agent reading it says so once already
            server_log.setLevel(logging.ERROR)
        server = ClosingServer()
        first = self._plant.state
        for area, data in encode_areas(first, first.tick).items():
            self._buffers[area] = bytearray(data)
            server.register_area(area, DB_NUMBER if area is SrvArea.DB else 0, self._buffers[area])
        self._image_tick = first.tick
        try:
            server.start_to(self.host, self.port)
        except (S7Error, ValueError) as exc:
            raise OSError(f"s7: cannot listen on {self.host}:{self.port}: {exc}") from exc
        if self.port == 0 and server.server_socket is not None:
            self.port = int(server.server_socket.getsockname()[1])
        self._server = server
        self._task = asyncio.create_task(self._refresh_forever(), name="s7-refresh")

    async def stop(self) -> None:
        """Stop refreshing, close the listener and every client connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._server is not None:
            server, self._server = self._server, None
            await asyncio.to_thread(server.stop)  # joins the server's threads

    @property
    def endpoint(self) -> str:
        """One line for humans: protocol, address, rack/slot, data block."""
        return f"s7 {self.host}:{self.port} rack {RACK} slot {SLOT} DB{DB_NUMBER}"

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._refresh)
            self.refresh()

    def refresh(self) -> None:
        """Copy the plant's latest tick into the served areas (a few dozen bytes, under the server's locks)."""
        server = self._server
        state = self._plant.state
        if server is None or state.tick == self._image_tick:
            return
        for area, data in encode_areas(state, state.tick).items():
            index = DB_NUMBER if area is SrvArea.DB else 0
            server.lock_area(area, index)
            try:
                self._buffers[area][:] = data  # same length: the server keeps reading the same buffer
            finally:
                server.unlock_area(area, index)
        self._image_tick = state.tick
