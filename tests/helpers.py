"""What tests of several components share: free ports, bounded waits and the shared real peers.

- `free_port()`: a loopback TCP port nobody listens on.
- `wait_for(pred)` (async, `await` it) and `block_until(pred, timeout)` (blocks the calling thread): poll until a
  condition holds, and fail the test after a bounded time. Tests wait for things; they never assert durations.
- `in_virtual_time`: runs an async test on an event loop whose clock jumps to the next timer, so a test of timing
  logic (the poller's schedule, backoff) sees the same thing on a busy machine as on an idle one.
- `latest_value(agent, tag)`: a tag's newest value and quality in a running agent.
- `ModbusPeer`: a pymodbus TCP server with hand-placed registers (the `modbus_peer` fixture in tests/conftest.py).
- `Broker`, `Subscriber`: a mosquitto subprocess and a paho subscriber (the `broker` fixture in tests/conftest.py).

Protocol peers used by one component only live beside its tests (drivers/opcua/opcua_peer.py,
drivers/s7/s7peer.py, publish/mqttpeer.py).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import os
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from edge_agent.agent import Agent
from edge_agent.types import Quality

logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"

_TABLE_OF_FC = {
    1: "coils",
    5: "coils",
    15: "coils",
    2: "discrete",
    3: "holding",
    6: "holding",
    16: "holding",
    4: "input",
}


def free_port() -> int:
    """A TCP port nobody listens on right now, on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for(
    pred: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0, step: float = 0.02, what: str = "condition"
) -> None:
    """Poll `pred` (plain or async) until it holds; fail the test after `timeout` seconds (bounded, like every test
    loop). Async: the event loop, and whatever the test runs on it, keeps going in between."""
    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            while True:
                held = pred()
                if inspect.isawaitable(held):
                    held = await held
                if held:
                    return
                await asyncio.sleep(step)
    except TimeoutError:
        if not deadline.expired():
            raise  # a timeout of the predicate's own
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


async def http_get(port: int, path: str) -> tuple[int, str]:
    """GET http://127.0.0.1:PORT/PATH (the agent's health server): the status code and the body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


def block_until(predicate: Callable[[], bool], timeout: float, what: str = "condition", step: float = 0.02) -> None:
    """Poll until predicate() is true, blocking the calling thread (bounded); AssertionError naming `what` otherwise.

    For sync tests and threads; an async test calls it through asyncio.to_thread, or uses wait_for."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class _JumpingSelector:
    """The loop's selector: answers I/O at once, and when nothing is ready moves the loop's clock to its next timer."""

    def __init__(self) -> None:
        self._real = selectors.DefaultSelector()
        self.loop: VirtualTimeLoop | None = None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = self._real.select(None if timeout is None else 0)
        if not events and timeout and self.loop is not None:
            self.loop.jump()
        return events

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on a clock of its own: sleeps take no real time, and the next timer is always on time.

    Code under test takes the clock from the loop (e.g. DevicePoller(clock=loop.time)).
    """

    def __init__(self, start: float = 1000.0) -> None:
        selector = _JumpingSelector()
        super().__init__(selector)  # type: ignore[arg-type]
        selector.loop = self
        self._now = start

    def time(self) -> float:
        return self._now

    def jump(self) -> None:
        """To the earliest timer's time exactly (no I/O is pending, or it would have been answered)."""
        scheduled = self._scheduled  # type: ignore[attr-defined]
        if scheduled:
            self._now = max(self._now, scheduled[0].when())


def in_virtual_time(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on a fresh VirtualTimeLoop (a plain test to pytest: fixtures and parameters still apply)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        loop = VirtualTimeLoop()
        try:
            loop.run_until_complete(test(*args, **kwargs))
        finally:
            loop.close()

    return run


def _blocks(size: int, holes: Iterable[tuple[int, int]], bits: bool) -> list[SimData]:
    """Valid cells 0..size-1 except the [start, end) holes, which answer ILLEGAL ADDRESS."""
    holes = sorted(holes)
    out, pos = [], 0
    for start, end in [*holes, (size, size)]:
        if start > pos:
            if bits:
                out.append(SimData(pos, values=[False] * (start - pos), datatype=DataType.BITS))
            else:
                out.append(SimData(pos, count=start - pos, values=0, datatype=DataType.REGISTERS))
        if end > start and start < size:
            out.append(SimData(start, count=end - start, datatype=DataType.INVALID))
        pos = max(pos, end)
    return out


class ModbusPeer:
    """A pymodbus TCP server whose tables the test owns: change `holding[i]` and the next read sees it.

    `holes` are [start, end) register ranges that answer ILLEGAL ADDRESS, as unmapped areas do.
    """

    def __init__(
        self, *, size: int = 1024, unit: int = 1, holes: Iterable[tuple[int, int]] = (), framer: str = "socket"
    ) -> None:
        self.framer = FramerType(framer)
        self.size = size
        self.unit = unit
        self.holes = list(holes)
        self.holding = [0] * size
        self.input = [0] * size
        self.coils = [False] * size
        self.discrete = [False] * size
        self.requests = 0
        self.refuse: ExcCodes | None = None  # answer every request with this exception (a gateway's dead device)
        self.port = 0
        self._server: ModbusTcpServer | None = None

    def place(self, table: str, address: int, registers: Iterable[int]) -> None:
        """Put register values at a 0-based address of `holding` or `input`."""
        target = getattr(self, table)
        for i, r in enumerate(registers):
            target[address + i] = r

    async def _action(
        self,
        fc: int,
        start: int,
        address: int,
        count: int,
        current: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        self.requests += 1
        if self.refuse is not None:
            return self.refuse
        table = _TABLE_OF_FC.get(fc)
        if table in ("holding", "input"):
            src = getattr(self, table)
            if set_values:
                for i, v in enumerate(set_values):
                    src[address + i] = int(v)
            off = address - start
            current[off : off + count] = src[address : address + count]
        elif table in ("coils", "discrete"):
            src = getattr(self, table)
            if set_values:
                for i, v in enumerate(set_values):
                    src[address + i] = bool(v)
            # bit blocks hold 16 coils per register, least significant bit first
            for reg in range(len(current)):
                word = 0
                for b in range(16):
                    idx = reg * 16 + b
                    if idx < self.size and src[idx]:
                        word |= 1 << b
                current[reg] = word
        return None

    async def start(self, port: int | None = None) -> int:
        """Listen on 127.0.0.1 (same port as before after a stop, unless given)."""
        self.port = port or self.port or free_port()
        device = SimDevice(
            self.unit,
            simdata=(
                _blocks(self.size, (), True),
                _blocks(self.size, (), True),
                _blocks(self.size, self.holes, False),
                _blocks(self.size, self.holes, False),
            ),
            action=self._action,
        )
        self._server = ModbusTcpServer(device, address=("127.0.0.1", self.port), framer=self.framer)
        await self._server.serve_forever(background=True)
        await asyncio.sleep(0.05)
        return self.port

    async def stop(self) -> None:
        """Close the listener and every client connection."""
        if self._server is not None:
            await self._server.shutdown()
            self._server = None


def latest_value(agent: Agent, tag: str) -> tuple[float, Quality] | None:
    """A tag's newest (value, quality) in the agent's buffers, or None before its first sample."""
    latest = agent.latest(tag)
    return None if latest is None else (latest[1], latest[2])


@dataclass
class Broker:
    """A mosquitto subprocess on a free loopback port, with persistence so a subscriber's session survives kills."""

    workdir: Path
    port: int = 0
    password_file: Path | None = None
    tls: tuple[Path, Path, Path] | None = None  # ca, cert, key
    require_certificate: bool = False
    acl: str | None = None  # mosquitto acl_file text
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log = self.workdir / "mosquitto.log"

    @property
    def url(self) -> str:
        """The agent's mqtt.url for this broker."""
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def _config(self) -> Path:
        lines = [
            f"listener {self.port} 127.0.0.1",
            "persistence true",
            f"persistence_location {self.workdir}/",
            "autosave_interval 3600",
            "max_queued_messages 0",
            "max_inflight_messages 100",
            "log_type error",
            "log_type warning",
            "log_type notice",
            f"log_dest file {self.log}",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # as root mosquitto would switch to 'mosquitto', who cannot read the test's files
        if self.password_file is not None:
            lines += ["allow_anonymous false", f"password_file {self.password_file}"]
        else:
            lines.append("allow_anonymous true")
        if self.acl is not None:
            acl = self.workdir / "acl"
            acl.write_text(self.acl)
            lines.append(f"acl_file {acl}")
        if self.tls is not None:
            ca, cert, key = self.tls
            lines += [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}"]
            if self.require_certificate:
                lines.append("require_certificate true")
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self) -> None:
        """Start (or restart) on the same port; returns once it accepts connections."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        conf = self._config()
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("mosquitto did not start listening")

    def kill(self) -> None:
        """SIGKILL: no goodbye to anyone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)

    def stop(self) -> None:
        """SIGTERM and wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def save(self) -> None:
        """Write the persistence file now (SIGUSR1), so sessions made so far survive a SIGKILL."""
        assert self.proc is not None
        db = self.workdir / "mosquitto.db"
        before = db.stat().st_mtime_ns if db.exists() else 0
        self.proc.send_signal(signal.SIGUSR1)
        block_until(lambda: db.exists() and db.stat().st_mtime_ns != before, 5, "mosquitto to save its database")

    def reload(self) -> None:
        """SIGHUP: re-read the config (and the password file)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)


@dataclass
class Received:
    """A message as a subscriber saw it."""

    topic: str
    payload: bytes
    retain: bool
    at: float

    def json(self) -> Any:
        """The payload parsed."""
        return json.loads(self.payload)


class Subscriber:
    """A paho subscriber with a persistent session (QoS 1), collecting everything it receives."""

    def __init__(self, port: int, topic: str, *, client_id: str | None = None, tls: Any = None, **auth: str) -> None:
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-sub-{secrets.token_hex(3)}",
            clean_session=False,
        )
        self.client.reconnect_delay_set(0.05, 0.2)  # type: ignore[arg-type]
        if auth:
            self.client.username_pw_set(auth["username"], auth["password"])
        if tls is not None:
            self.client.tls_set_context(tls)
        self.topic = topic
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=5)
        self.client.loop_start()
        if not self.subscribed.wait(5):
            raise RuntimeError("subscriber did not subscribe")

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            client.subscribe(self.topic, qos=1)
            self.subscribed.set()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain), time.time()))

    def on(self, topic_part: str) -> list[Received]:
        """Messages whose topic contains `topic_part`."""
        with self._lock:
            return [m for m in self.messages if topic_part in m.topic]

    def event_ids(self) -> list[str]:
        """event_ids of every event received, duplicates included, in arrival order."""
        return [m.json()["event_id"] for m in self.on("/events/")]

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()
