"""`edge-agent demo`: the whole job on one machine, with nothing to set up.

Four real pieces, wired the way a site wires them: the simulated pump skid (`edge-agent simulate`, a
subprocess) with a fault on a schedule; the agent (`edge-agent run`, a subprocess) polling it over Modbus,
OPC UA and S7 and scoring it with the shipped pump model; an MQTT broker (mosquitto when it is installed,
else amqtt inside this process); and a subscriber here that shows what a SCADA system would receive:
tag values (telemetry), score against threshold (scores) and the anomaly events, live.
Everything listens on 127.0.0.1 on free ports, so a demo never clashes with a running plant or broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from asyncio.subprocess import Process
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

import edge_agent
from edge_agent.errors import EdgeAgentError

log = logging.getLogger(__name__)

PREFIX = "demo/lab/pump-skid"
MODEL = "pump-skid"
STARTUP_TIMEOUT = 30.0  # seconds for the simulator, the broker or the agent to come up
STOP_TIMEOUT = 10.0  # seconds a child gets to stop after SIGTERM before it is killed
EVENTS_SHOWN = 8
DETECT_WITHIN = 20.0  # seconds after a fault starts within which the shipped model raises its anomaly
MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")

# Which plant signals the demo reads over which protocol (a site mixes them like this), and how often. Each
# device section is written by the simulator of its driver (device_fields, tag_fields): the demo knows no
# protocol's addresses. A subscriber gets telemetry twice a second and every score, which a real site would
# rate-limit further.
DEVICES: tuple[tuple[str, str, dict[str, Any], tuple[str, ...]], ...] = (
    ("transmitters", "modbus", {"poll_interval": "100ms", "timeout": "500ms"},
     ("suction_pressure", "discharge_pressure", "flow", "motor_current")),
    ("condition-monitor", "opcua", {"mode": "subscribe", "poll_interval": "100ms", "timeout": "2s"},
     ("vibration_rms", "bearing_temp", "fluid_temp")),
    ("plc", "s7", {"poll_interval": "100ms", "timeout": "500ms"}, ("valve_position", "motor_running")),
)  # fmt: skip


def device_section(name: str, key: str, port: int, extra: dict[str, Any], signals: tuple[str, ...]) -> str:
    """One device of the demo's config, addressed the way the protocol's simulator serves each signal."""
    from edge_agent.drivers import REGISTRY
    from edge_agent.simulate.plant import UNITS

    server = REGISTRY[key].simulator_class()
    if server is None:
        raise DemoError(f"the {key} driver has no simulator")
    head = {**server.device_fields("127.0.0.1", port), **extra}
    lines = [f"  - name: {name}", *(f"    {k}: {json.dumps(v)}" for k, v in head.items()), "    tags:"]
    for sig in signals:
        tag = {"name": f"pump.{sig}", **server.tag_fields(sig)}
        if sig in UNITS:
            tag["unit"] = UNITS[sig]
        lines.append(f"      - {json.dumps(tag, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


CONFIG = """\
# written by `edge-agent demo`; run it again by hand with: edge-agent run {path}
agent: {{id: demo-skid-1, site: lab}}
devices:
{devices}models:
  - name: {model}
    file: {model_file}
    hysteresis: {{exit_ratio: 0.8, min_duration: 5s}}
mqtt:
  url: mqtt://127.0.0.1:{broker}
  topic_prefix: {prefix}
  scores_interval: 200ms
  telemetry_interval: 500ms
  status_interval: 5s
outbox:
  path: {outbox}
"""


class DemoError(EdgeAgentError):
    """The demo could not start one of its pieces."""


@dataclass
class DemoOptions:
    """What `edge-agent demo` was asked for."""

    fault: str = "cavitation@30+40"
    duration: float = 120.0  # seconds; 0 runs until Ctrl-C
    broker: Literal["auto", "mosquitto", "builtin"] = "auto"
    model: Path | None = None
    view: Literal["auto", "live", "plain"] = "auto"
    seed: int = 0
    keep: bool = False


def shipped_model() -> Path | None:
    """The pump model of a checkout (models/pump-skid-ae.tflite beside the package), when it is there."""
    path = Path(edge_agent.__file__).resolve().parents[1] / "models" / "pump-skid-ae.tflite"
    return path if path.is_file() else None


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


# ---------------------------------------------------------------- the pieces


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


# ---------------------------------------------------------------- what the subscriber sees


@dataclass
class Tag:
    """One tag as the last telemetry message showed it."""

    value: float | bool | str | None = None
    quality: str = "-"
    ts: str = ""


@dataclass
class View:
    """Everything the subscriber has received, boiled down for the screen."""

    units: dict[str, str]
    fault: str
    fault_start: float | None
    fault_end: float | None
    started: float = field(default_factory=time.monotonic)
    tags: dict[str, Tag] = field(default_factory=dict)
    score: float | None = None
    threshold: float | None = None
    good_fraction: float | None = None
    status: str = "-"
    outbox_depth: int | None = None
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=EVENTS_SHOWN))
    starts: int = 0
    ends: int = 0
    messages: int = 0
    event_ids: set[str] = field(default_factory=set)

    def take(self, topic: str, payload: bytes) -> dict[str, Any] | None:
        """Fold one message in; returns it when it is a new anomaly event (to print in plain mode)."""
        self.messages += 1
        try:
            doc = json.loads(payload)
        except ValueError:
            return None
        kind = topic[len(PREFIX) + 1 :].split("/", 1)[0]
        if kind == "telemetry":
            for t in doc.get("tags", []):
                self.tags[t["name"]] = Tag(t.get("value"), t.get("quality", "-"), t.get("ts", ""))
        elif kind == "scores":
            self.score, self.threshold = doc.get("score"), doc.get("threshold")
            self.good_fraction = doc.get("good_fraction")
        elif kind == "status":
            self.status = doc.get("state", "-")
            outbox = doc.get("outbox") or {}
            self.outbox_depth = outbox.get("depth", self.outbox_depth)
        elif kind == "events":
            # delivery is at least once: a SCADA system drops repeats by event_id, and so does this view
            if doc.get("event_id") in self.event_ids:
                return None
            self.event_ids.add(doc.get("event_id", ""))
            self.events.append(doc)
            self.starts += doc.get("type") == "anomaly.start"
            self.ends += doc.get("type") == "anomaly.end"
            return dict(doc)
        return None

    def elapsed(self) -> float:
        """Seconds since the simulator started (the fault schedule counts from there)."""
        return time.monotonic() - self.started

    def plant_state(self) -> str:
        """What the simulator is doing now, in words."""
        t = self.elapsed()
        if self.fault_start is None:
            return "normal operation (no fault scheduled)"
        if t < self.fault_start:
            return f"normal operation; {self.fault} in {self.fault_start - t:.0f} s"
        if self.fault_end is None or t < self.fault_end:
            left = f", {self.fault_end - t:.0f} s left" if self.fault_end is not None else ""
            return f"FAULT: {self.fault} active{left}"
        return f"{self.fault} over {t - self.fault_end:.0f} s ago; recovering"


def event_line(doc: dict[str, Any]) -> str:
    """One anomaly event as a line of text."""
    kind = doc.get("type", "?")
    top = ", ".join(
        f"{c['tag']} {c['share']:.0%}" for c in (doc.get("contributions") or [])[:3] if c.get("share") is not None
    )
    score, threshold = doc.get("score"), doc.get("threshold")
    s = f"score {score:.3g} / threshold {threshold:.3g}" if score is not None and threshold is not None else ""
    reason = f" ({doc['reason']})" if doc.get("reason") else ""
    hist = " historical" if doc.get("historical") else ""
    end = doc.get("window", {}).get("end", "")[11:23]
    return f"{end} {kind}{reason} {doc.get('severity', '')}{hist}  {s}  top: {top}"


def score_bar(score: float | None, threshold: float | None, width: int = 30) -> str:
    """A text bar of score against threshold; the threshold sits at two thirds of its width."""
    if score is None or threshold is None or threshold <= 0:
        return "-" * width
    mark = width * 2 // 3
    n = max(0, min(width, round(score / threshold * mark)))
    cells = ["#" if i < n else "." for i in range(width)]
    cells[mark] = "|"
    return "".join(cells)


def _fmt(v: float | bool | str | None) -> str:
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return str(v) if v is not None else "-"
    return f"{v:.3f}"


def render_rich(view: View, broker_name: str, workdir: Path) -> Any:
    """The live screen (rich renderables)."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    head = Text()
    head.append(f"plant: {view.plant_state()}\n", style="bold red" if "FAULT" in view.plant_state() else "bold")
    head.append(f"agent: {view.status}   broker: {broker_name}   messages: {view.messages}")
    if view.outbox_depth is not None:
        head.append(f"   outbox: {view.outbox_depth}")
    head.append(f"\nfiles: {workdir}")
    tags = Table(title="tags (telemetry)", expand=True)
    for col in ("tag", "value", "unit", "quality"):
        tags.add_column(col, justify="right" if col == "value" else "left")
    for name, unit in view.units.items():
        tag = view.tags.get(name, Tag())
        tags.add_row(name, _fmt(tag.value), unit, tag.quality, style=None if tag.quality in ("good", "-") else "yellow")
    over = view.score is not None and view.threshold is not None and view.score > view.threshold
    score = Text(
        f"{MODEL}: score {_fmt(view.score)}  threshold {_fmt(view.threshold)}  ", style="bold red" if over else ""
    )
    score.append(score_bar(view.score, view.threshold))
    events = Table(title=f"anomaly events ({view.starts} start, {view.ends} end)", expand=True, show_header=False)
    events.add_column("event")
    for doc in view.events:
        events.add_row(event_line(doc), style="red" if doc.get("type") == "anomaly.start" else "green")
    if not view.events:
        events.add_row("none yet")
    return Panel(Group(head, tags, score, events), title="edge-agent demo (Ctrl-C stops)")


def plain_line(view: View) -> str:
    """A periodic one-line summary for logs and pipes."""
    flow = view.tags.get("pump.flow", Tag()).value
    vib = view.tags.get("pump.vibration_rms", Tag()).value
    return (
        f"[{view.elapsed():5.0f}s] {view.plant_state()}; agent {view.status}; flow {_fmt(flow)} m3/h, "
        f"vibration {_fmt(vib)} mm/s; score {_fmt(view.score)} / threshold {_fmt(view.threshold)}"
    )


class Subscriber:
    """A paho subscriber to `{prefix}/#`; messages reach the event loop through a queue."""

    def __init__(self, port: int, loop: asyncio.AbstractEventLoop) -> None:
        self.queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._loop = loop
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id="edge-agent-demo-view", protocol=MQTTProtocolVersion.MQTTv311
        )
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._port = port

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        client.subscribe(f"{PREFIX}/#", qos=1)  # again after every reconnect

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        self._loop.call_soon_threadsafe(self.queue.put_nowait, (msg.topic, bytes(msg.payload)))

    def start(self) -> None:
        """Connect (retrying in paho's thread) and start receiving."""
        self._client.connect_async("127.0.0.1", self._port, keepalive=10)
        self._client.loop_start()

    def stop(self) -> None:
        """Disconnect and stop paho's thread."""
        self._client.disconnect()
        self._client.loop_stop()


# ---------------------------------------------------------------- the run


def fault_window(spec: str) -> tuple[str, float | None, float | None]:
    """Name, start and end (seconds from the simulator's start) of a `NAME@SECONDS[+DURATION]` spec."""
    from edge_agent.simulate import parse_fault_spec

    if not spec:
        return "", None, None
    fault = parse_fault_spec(spec)
    end = None if fault.duration is None else fault.start + fault.duration
    return fault.name, fault.start, end


def tag_units(config_path: Path) -> dict[str, str]:
    """Tag name → unit, from the config the demo wrote (the screen shows tags in this order)."""
    from edge_agent.config import load_config

    cfg = load_config(config_path)
    return {t.name: (t.unit or "") for d in cfg.devices for t in d.tags}


async def run_demo(opts: DemoOptions, out: TextIO = sys.stdout) -> int:
    """Run the demo until its duration ends or SIGINT/SIGTERM; 0 when the scheduled fault raised an anomaly."""
    from edge_agent.simulate import simulated_protocols

    model = opts.model or shipped_model()
    if model is None or not model.is_file():
        raise DemoError(
            f"the demo's model is not there ({model or 'models/pump-skid-ae.tflite'}): run it from a checkout of "
            "the repository, or pass --model FILE"
        )
    name, fault_start, fault_end = fault_window(opts.fault)
    kind = choose_broker(opts.broker)
    workdir = Path(tempfile.mkdtemp(prefix="edge-agent-demo-"))
    ports = {key: free_port() for _, key, _, _ in DEVICES}
    broker_port = free_port()
    config_path = workdir / "demo.yaml"
    devices = "".join(device_section(n, key, ports[key], extra, signals) for n, key, extra, signals in DEVICES)
    config_path.write_text(
        CONFIG.format(
            path=config_path,
            devices=devices,
            model=MODEL,
            model_file=model.resolve(),
            prefix=PREFIX,
            outbox=workdir / "outbox.db",
            broker=broker_port,
        )
    )
    live = opts.view == "live" or (opts.view == "auto" and out.isatty() and _have_rich())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    view = View(tag_units(config_path), name, fault_start, fault_end)
    python = [sys.executable, "-m", "edge_agent", "--log-level", "warning"]
    print(f"edge-agent demo: files in {workdir}", file=out, flush=True)
    ok = False
    try:
        async with broker(kind, broker_port, workdir) as broker_name:
            print(f"broker: {broker_name} on 127.0.0.1:{broker_port}", file=out, flush=True)
            subscriber = Subscriber(broker_port, loop)
            subscriber.start()
            try:
                sim_argv = [
                    *python,
                    "simulate",
                    "--seed",
                    str(opts.seed),
                    "--state-dir",
                    str(workdir / "simulator-pki"),
                ]
                for key, port in ports.items():
                    sim_argv += ["--port", f"{key}={port}"]
                for key in simulated_protocols().keys() - ports.keys():
                    sim_argv += ["--without", key]
                if opts.fault:
                    sim_argv += ["--fault", opts.fault]
                *first, last = ports.items()
                async with child(sim_argv, "the simulator", workdir / "simulator.log", last[1]):
                    for key, port in first:
                        await wait_port(port, f"the simulator's {key} server", None, workdir / "simulator.log")
                    view.started = time.monotonic()
                    print(f"simulator: pump skid, {view.plant_state()}", file=out, flush=True)
                    agent_argv = [*python, "run", str(config_path), "--output", "none"]
                    async with child(agent_argv, "the agent", workdir / "agent.log") as agent:
                        print(f"agent: edge-agent run {config_path}", file=out, flush=True)
                        await _show(view, subscriber, stop, opts, live, out, agent, broker_name, workdir)
                        # the agent stops first, so its anomaly.end (reason shutdown) and offline status go out
                        code = await stop_child(agent)
                        await _drain(view, subscriber, 1.0, live, out)
                        if code not in (0, None, -signal.SIGTERM):
                            print(f"the agent exited with code {code}{_tail(workdir / 'agent.log')}", file=out)
            finally:
                subscriber.stop()
        # a fault that had time to show must have raised an anomaly (a Ctrl-C before it is no failure)
        expected = fault_start is not None and view.elapsed() > fault_start + DETECT_WITHIN
        ok = not expected or view.starts > 0
        print(summary(view, ok), file=out, flush=True)
        return 0 if ok else 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if opts.keep or not ok:
            print(f"logs and config kept in {workdir}", file=out)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _have_rich() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


async def _show(
    view: View,
    subscriber: Subscriber,
    stop: asyncio.Event,
    opts: DemoOptions,
    live: bool,
    out: TextIO,
    agent: Process,
    broker_name: str,
    workdir: Path,
) -> None:
    """Receive and show until the duration ends, SIGINT/SIGTERM, or the agent exits."""
    deadline = time.monotonic() + opts.duration if opts.duration > 0 else None
    render: Callable[[], Any] = lambda: render_rich(view, broker_name, workdir)  # noqa: E731
    next_line = time.monotonic()
    live_ctx: Any = contextlib.nullcontext()
    if live:
        from rich.console import Console
        from rich.live import Live

        live_ctx = Live(render(), console=Console(file=out), refresh_per_second=4, transient=False)
    with live_ctx as screen:
        while not stop.is_set() and agent.returncode is None and (deadline is None or time.monotonic() < deadline):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.25):
                    topic, payload = await subscriber.queue.get()
                    _take(view, topic, payload, live, out)
            while not subscriber.queue.empty():
                _take(view, *subscriber.queue.get_nowait(), live, out)
            if live:
                screen.update(render())
            elif time.monotonic() >= next_line:
                print(plain_line(view), file=out, flush=True)
                next_line += 5.0


def _take(view: View, topic: str, payload: bytes, live: bool, out: TextIO) -> None:
    event = view.take(topic, payload)
    if event is not None and not live:
        print(f"EVENT {topic}: {event_line(event)}", file=out, flush=True)


async def _drain(view: View, subscriber: Subscriber, seconds: float, live: bool, out: TextIO) -> None:
    """Take what is still arriving for a moment after the agent stopped."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.01, end - time.monotonic())):
                _take(view, *await subscriber.queue.get(), live, out)


def summary(view: View, ok: bool) -> str:
    """What happened, in a few lines, for the end of the demo."""
    lines = [
        "",
        f"demo over after {view.elapsed():.0f} s: {view.messages} MQTT messages, "
        f"{view.starts} anomaly.start and {view.ends} anomaly.end events received",
    ]
    lines += [f"  {event_line(e)}" for e in view.events]
    if not ok:
        lines.append(f"no anomaly event arrived although {view.fault} was scheduled; see agent.log in the files")
    topics = f"{PREFIX}/{{status,events/{MODEL},scores/{MODEL},telemetry/<device>}}"
    lines.append(f"agent's last status: {view.status}; topics: {topics}")
    return "\n".join(lines)
