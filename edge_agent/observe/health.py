"""/healthz and /readyz (and /metrics) on `observe.listen`: a tiny HTTP server on the event loop."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from edge_agent.observe.metrics import Metrics

log = logging.getLogger("edge_agent.observe")


Check = Callable[[], tuple[bool, str]]


class HealthServer:
    """A tiny HTTP server: GET /metrics, /healthz (alive), /readyz (ready to do its job)."""

    def __init__(self, metrics: Metrics, ready_checks: list[Check]) -> None:
        self.metrics = metrics
        self.ready_checks = ready_checks
        self._server: asyncio.Server | None = None
        self.address = ""  # host:port once listening

    async def start(self, listen: str) -> None:
        """Listen on `host:port`."""
        host, _, port = listen.rpartition(":")
        self._server = await asyncio.start_server(self._handle, host.strip("[]") or "0.0.0.0", int(port))
        bound = self._server.sockets[0].getsockname()  # port 0 in the config: the one the system chose
        self.address = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"
        log.info("metrics and health on http://%s/metrics, /healthz, /readyz", self.address)

    async def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def readiness(self) -> tuple[bool, list[str]]:
        """All readiness checks, with the reason of each that fails."""
        failing = [why for ok, why in (check() for check in self.ready_checks) if not ok]
        return not failing, failing

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # headers are not needed
            parts = request.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else ""
            if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
                status, body, ctype = 405, b"method not allowed\n", "text/plain"
            elif path == "/metrics":
                status, body, ctype = 200, self.metrics.render(), "text/plain; version=0.0.4"
            elif path == "/healthz":
                status, body, ctype = 200, b"ok\n", "text/plain"
            elif path == "/readyz":
                ok, failing = self.readiness()
                status = 200 if ok else 503
                body, ctype = (json.dumps({"ready": ok, "failing": failing}) + "\n").encode(), "application/json"
            else:
                status, body, ctype = 404, b"not found\n", "text/plain"
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}[status]
            head = (
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            writer.write(head + (body if parts[:1] != ["HEAD"] else b""))
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
