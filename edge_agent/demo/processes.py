"""The demo's pieces as processes: the broker (mosquitto or in-process amqtt), child processes, free ports."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import time
from asyncio.subprocess import Process
from collections.abc import AsyncIterator
from pathlib import Path

from edge_agent.demo.config import DemoError

STARTUP_TIMEOUT = 30.0  # seconds for the simulator, the broker or the agent to come up
STOP_TIMEOUT = 10.0  # seconds a child gets to stop after SIGTERM before it is killed
MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")


def find_mosquitto() -> str | None:
    """The mosquitto binary: on PATH, or where Debian and Homebrew put it (sbin is not on a user's PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in MOSQUITTO_PATHS if os.access(p, os.X_OK)), None)


def have_amqtt() -> bool:
    """Whether the in-process broker (the `demo` extra) is installed."""
    try:
        import amqtt.broker  # noqa: F401
    except ImportError:
        return False
    return True


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_port(port: int, what: str, proc: Process | None = None, log_file: Path | None = None) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:port; a child that exits first is an error."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc is not None and proc.returncode is not None:
            raise DemoError(f"{what} exited with code {proc.returncode} at startup{_tail(log_file)}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return
    raise DemoError(f"{what} did not listen on 127.0.0.1:{port} within {STARTUP_TIMEOUT:g}s{_tail(log_file)}")


def _tail(path: Path | None, lines: int = 15) -> str:
    if path is None or not path.exists():
        return ""
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"; last lines of {path}:\n  " + "\n  ".join(text) if text else ""


@contextlib.asynccontextmanager
async def child(argv: list[str], what: str, log_file: Path, port: int | None = None) -> AsyncIterator[Process]:
    """A child process with its output in `log_file`, stopped with SIGTERM (then SIGKILL) on the way out."""
    with log_file.open("wb") as out:
        # its own session: a Ctrl-C in the terminal reaches only the demo, which stops the pieces in order
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        if port is not None:
            await wait_port(port, what, proc, log_file)
        yield proc
    finally:
        await stop_child(proc)


async def stop_child(proc: Process) -> int | None:
    """SIGTERM, wait up to STOP_TIMEOUT, then SIGKILL; the exit code."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    return proc.returncode


@contextlib.asynccontextmanager
async def broker(kind: str, port: int, workdir: Path) -> AsyncIterator[str]:
    """An MQTT broker on 127.0.0.1:port for the demo; yields what it is, for the screen."""
    if kind == "mosquitto":
        binary = find_mosquitto()
        assert binary is not None
        conf = workdir / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_type error\n")
        async with child([binary, "-c", str(conf)], "mosquitto", workdir / "mosquitto.log", port):
            yield f"mosquitto ({binary})"
        return
    from amqtt.broker import Broker

    # amqtt logs every connection at INFO and warns when a message has no subscriber yet;
    for name in ("amqtt", "transitions"):  # its state machine library logs every transition at INFO
        logging.getLogger(name).setLevel(logging.ERROR)
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    server = Broker(config)
    await server.start()
    try:
        yield "amqtt (in-process; install mosquitto for a real broker)"
    finally:
        with contextlib.suppress(Exception):
            await server.shutdown()


def choose_broker(asked: str) -> str:
    """mosquitto when installed, else the in-process broker; a clear error when neither is there."""
    mosquitto, builtin = find_mosquitto() is not None, have_amqtt()
    if asked == "mosquitto" and not mosquitto:
        raise DemoError("--broker mosquitto: mosquitto is not installed (apt install mosquitto)")
    if asked == "builtin" and not builtin:
        raise DemoError("--broker builtin: amqtt is not installed (pip install 'edge-agent[demo]')")
    if asked != "auto":
        return asked
    if mosquitto:
        return "mosquitto"
    if builtin:
        return "builtin"
    raise DemoError(
        "the demo needs an MQTT broker: apt install mosquitto, or pip install 'edge-agent[demo]' for one in-process"
    )
