"""A real S7 peer for tests: python-snap7's server on a free loopback port, with areas the test fills by hand."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from helpers import free_port
from snap7.server import EVC_DATA_READ
from snap7.type import SrvArea

from edge_agent.simulate.s7_server import ClosingServer


class _CountingServer(ClosingServer):
    """Counts request PDUs and can answer slowly (a busy CPU) or when the test says so, all for the tests."""

    def __init__(self, peer: S7Peer) -> None:
        super().__init__()
        self._peer = peer

    def _process_request(self, request_data: bytes, client_address: tuple[str, int]) -> Any:
        self._peer.requests += 1
        if self._peer.delay:
            time.sleep(self._peer.delay)
        hold = self._peer.hold
        if hold is not None:
            self._peer.holding += 1
            try:
                hold.wait(30)  # bounded: a test that never releases still ends
            finally:
                self._peer.holding -= 1
        return super()._process_request(request_data, client_address)


class S7Peer:
    """python-snap7's server whose areas the test owns: change `db[1][0:4]` and the next read sees it.

    Only the DBs named in `dbs` exist (others answer "object does not exist"); M, I and Q have the
    given sizes. `requests` counts request PDUs (setup included); `read_items()` counts the items
    the server answered since the last call, from its event log. `delay` makes every answer take that
    long; with `hold` set to an Event, requests wait until it is set (`holding` of them right now).
    """

    def __init__(self, *, dbs: dict[int, int] | None = None, m: int = 256, i: int = 64, q: int = 64) -> None:
        self.db = {n: bytearray(size) for n, size in (dbs or {1: 1024}).items()}
        self.m, self.i, self.q = bytearray(m), bytearray(i), bytearray(q)
        self.requests = 0
        self.delay = 0.0
        self.hold: threading.Event | None = None
        self.holding = 0
        self.port = 0
        self._server: _CountingServer | None = None

    async def start(self, port: int | None = None) -> int:
        """Listen on 127.0.0.1 (same port as before after a stop, unless given)."""
        self.port = port or self.port or free_port()
        server = _CountingServer(self)
        for n, data in self.db.items():
            server.register_area(SrvArea.DB, n, data)
        server.register_area(SrvArea.MK, 0, self.m)
        server.register_area(SrvArea.PE, 0, self.i)
        server.register_area(SrvArea.PA, 0, self.q)
        server.start_to("127.0.0.1", self.port)
        self._server = server
        return self.port

    async def stop(self) -> None:
        """Close the listener and every client connection."""
        if self._server is not None:
            server, self._server = self._server, None
            await asyncio.to_thread(server.stop)

    def read_items(self) -> int:
        """Items answered (successfully) since the last call, from the server's event log."""
        n = 0
        while self._server is not None and (event := self._server.pick_event()):
            n += event.EvtCode == EVC_DATA_READ
        return n
