"""What the polling benchmarks share: a server in another process, and measuring an agent's CPU per value."""

from __future__ import annotations

import asyncio
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from edge_agent.agent import Agent
from edge_agent.config import Config
from edge_agent.types import SampleBatch


def free_port() -> int:
    """A TCP port nobody listens on right now, on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(cmd: list[str], port: int, *, timeout: float = 30.0) -> subprocess.Popen[bytes]:
    """Start a benchmark server process and wait until it listens on `port`."""
    server = subprocess.Popen(cmd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return server
        except OSError:
            if server.poll() is not None:
                raise SystemExit("the benchmark server did not start") from None
            time.sleep(0.1)
    server.terminate()
    raise SystemExit(f"the benchmark server did not listen within {timeout:g} s")


def stop_server(server: subprocess.Popen[bytes]) -> None:
    """Stop a benchmark server process."""
    server.terminate()
    server.wait(10)


@dataclass(frozen=True)
class Measurement:
    """Good tag values delivered to the buffers in the measured time, and what they cost."""

    values: int
    values_per_s: float
    overruns: int
    cpu_us_per_value: float


async def measure_agent(
    cfg: Config, *, duration: float, settle: float, after_settle: Callable[[Agent], None] | None = None
) -> Measurement:
    """Run an agent on `cfg`; after `settle` s, measure `duration` s of good values, overruns and process CPU."""
    good = 0

    def count(batch: SampleBatch) -> None:
        nonlocal good
        good += int((batch.quality == 0).sum())

    agent = Agent(cfg, on_batch=count)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    await asyncio.sleep(settle)
    if after_settle is not None:
        after_settle(agent)
    good0, cpu0, wall0 = good, time.process_time(), time.perf_counter()
    over0 = sum(d.overruns for d in agent.stats().devices)
    await asyncio.sleep(duration)
    good1, cpu1, wall1 = good, time.process_time(), time.perf_counter()
    overruns = sum(d.overruns for d in agent.stats().devices) - over0
    stop.set()
    await task
    values = good1 - good0
    return Measurement(values, values / (wall1 - wall0), overruns, 1e6 * (cpu1 - cpu0) / max(values, 1))


def machine_line(server: str, duration: float) -> str:
    """The line every benchmark table starts with."""
    return (
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{platform.platform()}; server: {server} in another process; {duration:g} s per case"
    )


# --- MQTT benchmarks: a mosquitto broker subprocess, and the CPU model for the machine line ---


def mosquitto_path() -> str:
    """The mosquitto binary (on PATH, else Debian's /usr/sbin/mosquitto)."""
    import shutil

    return shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def start_mosquitto(
    directory: str | os.PathLike[str], *, timeout: float = 10.0, extra_conf: str = ""
) -> tuple[subprocess.Popen[bytes], int]:
    """A mosquitto on a free 127.0.0.1 port (config written to `directory`), listening when this returns."""
    port = free_port()
    conf = os.path.join(directory, "mosquitto.conf")
    with open(conf, "w") as f:
        f.write(
            f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\nset_tcp_nodelay true\n"
            + ("user root\n" if os.geteuid() == 0 else "")
            + extra_conf
        )
    cmd = [mosquitto_path(), "-c", conf]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.1).close()
            return proc, port
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.02)
    stop_process(proc)
    raise RuntimeError(f"mosquitto did not listen on 127.0.0.1:{port} within {timeout:g} s")


def stop_process(proc: subprocess.Popen[bytes] | subprocess.Popen[str], timeout: float = 5.0) -> None:
    """Terminate a process this benchmark started; kill it if it has not exited within `timeout`."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ('?' where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        return "?"


# --- fleet benchmarks: many processes, each in its own session, and what each costs (from /proc) ---


def spawn(cmd: list[str], *, log: str | os.PathLike[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a process in its own session (so its whole group can be signalled), stdout and stderr to `log`."""
    with open(log, "wb") as out:
        # its own session also keeps the terminal's Ctrl-C away from it: the benchmark stops it in order
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_listening(proc: subprocess.Popen[bytes], port: int, *, timeout: float = 30.0) -> None:
    """Return once `proc` accepts connections on 127.0.0.1:`port`; raise if it exits or `timeout` s pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening") from None
            time.sleep(0.1)
    raise RuntimeError(f"{proc.args!r} did not listen on 127.0.0.1:{port} within {timeout:g} s")


def stop_all(procs: list[subprocess.Popen[bytes]], *, timeout: float = 15.0) -> None:
    """SIGTERM every process group at once, SIGKILL the groups still running after `timeout` s, reap them all."""
    import contextlib
    import signal

    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        running = [p for p in procs if p.poll() is None]
        for p in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)  # pid == pgid: spawn() made each one a session leader
        deadline = time.monotonic() + wait
        for p in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.0, deadline - time.monotonic()))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (utime + stime of /proc/PID/stat), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    # the command name (field 2) may hold spaces and parentheses: count fields from its closing one
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident set size of a process now (VmRSS of /proc/PID/status), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0  # a zombie has no VmRSS line


def edge_agent_command() -> list[str]:
    """The `edge-agent` console script next to this Python, or `python -m edge_agent` where there is none."""
    script = os.path.join(os.path.dirname(sys.executable), "edge-agent")
    return [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "edge_agent"]
