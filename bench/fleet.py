"""Benchmark: N agents (real `edge-agent run` processes) publishing to one local mosquitto, as a site would.

For each N it starts, all on 127.0.0.1:
- one mosquitto subprocess on a free port (its own config in a temp dir, `$SYS` every second);
- ceil(N / --per-simulator) `edge-agent simulate` processes (Modbus only), one per site, each with its own seed and
  a fault every --fault-every s so anomaly events flow (sites take turns: their schedules are staggered);
- N `edge-agent run` processes sharing one tag map, each with its own agent id, MQTT client id, topic prefix
  (`plant-NN/area-1/skid-K`, one branch per site as deploy/FLEET.md recommends), outbox and metrics port, set
  through EDGE_AGENT__… variables the way the Kubernetes DaemonSet sets them;
- a paho subscriber in this process, on `#` with QoS 1, counting what the broker hands out by kind.

Once every agent's retained status says online, and after --warmup s, it measures --seconds: messages/s by kind at
the broker (and mosquitto's own count of PUBLISH packets received), CPU % (of one core; utime + stime from
/proc/PID/stat over the window) and RSS (VmRSS, sampled every 2 s) of each agent, of mosquitto and of the
simulators, and from each agent's /metrics its reads, overruns and outbox depth, to show it kept up.

    python bench/fleet.py [--agents 1,10,50] [--seconds 60] [--warmup 20] [--per-simulator 5]

Several agents share a simulator (5 by default): a simulator process costs about what an agent costs, so one per
agent would double the processes on the machine and measure the plant as much as the agents; the agents of one
simulator are identical skids of one site and see the same faults at the same moments (bursts of events).
Everything it starts runs in its own process group and is stopped on the way out, Ctrl-C included.
Speed is noisy on a shared machine: read the orders of magnitude, not the last digit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import paho.mqtt
from harness import (
    cpu_model,
    cpu_seconds,
    edge_agent_command,
    free_port,
    mosquitto_path,
    rss_bytes,
    spawn,
    start_mosquitto,
    stop_all,
    stop_process,
    wait_listening,
)
from paho.mqtt.client import Client, MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "pump-skid-ae.tflite"
# faults the shipped model detects within seconds (models/README.md); each one gives an anomaly.start and .end
FAULTS = ("cavitation", "motor_overload", "sensor_spike", "inlet_valve_closing")
KINDS = ("events", "telemetry", "scores", "status")
SYS_RECEIVED = "$SYS/broker/publish/messages/received"
MiB = 1024 * 1024

# One tag map for every agent, as on identical skids; what differs per agent comes from the environment.
CONFIG = """\
# written by bench/fleet.py; per agent: EDGE_AGENT__AGENT__ID/SITE, EDGE_AGENT__MQTT__TOPIC_PREFIX/CLIENT_ID,
# EDGE_AGENT__OUTBOX__PATH, EDGE_AGENT__OBSERVE__LISTEN, and SIM_MODBUS_PORT (the site's simulator)
agent: {{id: skid-1, site: plant-01}}
devices:
  - name: pump-skid
    type: modbus
    host: 127.0.0.1
    port: ${{SIM_MODBUS_PORT}}
    unit: 1
    poll_interval: {poll}s
    timeout: 500ms
    tags:
      - {{name: pump.suction_pressure,   address: "40001", type: float32, unit: bar}}
      - {{name: pump.discharge_pressure, address: "40003", type: float32, unit: bar}}
      - {{name: pump.flow,               address: "40005", type: float32, unit: m3/h}}
      - {{name: pump.motor_current,      address: "40007", type: float32, unit: A}}
      - {{name: pump.vibration_rms,      address: "40009", type: float32, unit: mm/s}}
      - {{name: pump.bearing_temp,       address: "40011", type: float32, unit: degC}}
      - {{name: pump.fluid_temp,         address: "40013", type: float32, unit: degC}}
      - {{name: pump.valve_position,     address: "40015", type: float32, unit: "%"}}
models:
  - name: pump-skid
    file: {model}
    hop: {poll}s        # score once per new sample, not on every 0.2 s step of the model's grid
mqtt:
  url: mqtt://127.0.0.1:{port}
  topic_prefix: plant-01/area-1/skid-1
  status_interval: {status}s
{optional}"""


@dataclass(frozen=True)
class Settings:
    """What every agent and simulator of a run is configured with."""

    poll: float
    telemetry: float
    scores: float
    status: float
    per_simulator: int
    fault_every: float
    fault_for: float
    warmup: float
    seconds: float

    def config(self, broker_port: int) -> str:
        """The agents' shared config file."""
        optional = ""
        if self.telemetry > 0:
            optional += f"  telemetry_interval: {self.telemetry:g}s\n"
        if self.scores > 0:
            optional += f"  scores_interval: {self.scores:g}s\n"
        return CONFIG.format(
            poll=f"{self.poll:g}", model=MODEL, port=broker_port, status=f"{self.status:g}", optional=optional
        )

    def describe(self) -> str:
        """One line for the output: the settings the figures depend on."""
        telemetry = f"every {self.telemetry:g} s" if self.telemetry > 0 else "off"
        scores = f"every {self.scores:g} s" if self.scores > 0 else "off"
        return (
            f"settings: poll {self.poll:g} s (8 float32 tags, one Modbus request), model {MODEL.name} "
            f"(16 x 0.2 s window) scored every {self.poll:g} s; telemetry {telemetry}, scores {scores} (QoS 0); "
            f"status every {self.status:g} s (retained); events QoS 1; outbox sync full; /metrics on; "
            f"{self.per_simulator} agents per simulator (Modbus only, one site each); one fault per site every "
            f"{self.fault_every:g} s for {self.fault_for:g} s; warm-up {self.warmup:g} s after every agent is "
            f"online, then {self.seconds:g} s measured"
        )


@dataclass
class Tally:
    """Counters the subscriber thread keeps; read only through `snapshot()`."""

    by_kind: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    events_by_agent: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    historical: int = 0
    sys_received: tuple[float, float] | None = None  # (arrival time, mosquitto's PUBLISH-received counter)


class Subscriber:
    """A paho client on `#` (QoS 1) and mosquitto's $SYS counter: what the broker hands out, by kind and agent."""

    def __init__(self, port: int) -> None:
        self._lock = threading.Lock()
        self._tally = Tally()
        self._event_ids: set[str] = set()
        self._online: set[str] = set()
        self._subscribed = threading.Event()
        self.client = Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="fleet-bench-sub")
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise RuntimeError("the subscriber was not subscribed within 10 s")

    def close(self) -> None:
        """Disconnect and stop paho's network thread."""
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: Client, *_: Any) -> None:
        client.subscribe([("#", 1), (SYS_RECEIVED, 0)])

    def _on_message(self, client: Client, userdata: Any, msg: MQTTMessage) -> None:
        try:
            self._count(msg)
        except (ValueError, KeyError, AttributeError) as exc:  # an exception here would end paho's thread
            log(f"subscriber: cannot read {msg.topic}: {exc!r}")

    def _count(self, msg: MQTTMessage) -> None:
        """Count one message by kind; track online agents and event ids."""
        now = time.monotonic()
        if msg.topic == SYS_RECEIVED:
            with self._lock:
                self._tally.sys_received = (now, float(msg.payload))
            return
        parts = msg.topic.split("/")
        prefix, kind = "/".join(parts[:3]), parts[3] if len(parts) > 3 else ""
        with self._lock:
            if kind in self._tally.by_kind:
                self._tally.by_kind[kind] += 1
            if kind == "status" and msg.payload:
                state = json.loads(msg.payload).get("state")
                (self._online.add if state == "online" else self._online.discard)(prefix)
            elif kind == "events":
                event = json.loads(msg.payload)
                if event["event_id"] in self._event_ids:
                    self._tally.duplicates += 1
                self._event_ids.add(event["event_id"])
                self._tally.historical += bool(event.get("historical"))
                self._tally.events_by_agent[prefix] = self._tally.events_by_agent.get(prefix, 0) + 1

    def online(self) -> set[str]:
        """Topic prefixes whose last status said online."""
        with self._lock:
            return set(self._online)

    def snapshot(self) -> Tally:
        """A copy of the counters now."""
        with self._lock:
            t = self._tally
            return Tally(dict(t.by_kind), dict(t.events_by_agent), t.duplicates, t.historical, t.sys_received)


@dataclass(frozen=True)
class Agent:
    """One `edge-agent run` process and the names it was given."""

    prefix: str
    metrics_port: int
    proc: subprocess.Popen[bytes]
    log: Path


def scrape(port: int) -> dict[str, float]:
    """An agent's /metrics: every sample of the edge_agent_* families, summed over labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("edge_agent_"):
            name, value = line.split("{", 1)[0].split(" ", 1)[0], line.rsplit(" ", 1)[1]
            out[name] = out.get(name, 0.0) + float(value)
    return out


def fault_args(site: int, sites: int, s: Settings, horizon: float) -> list[str]:
    """--fault options for one simulator: one fault every fault_every s until `horizon`, staggered across sites."""
    first = 10.0 + site * s.fault_every / sites
    count = math.ceil((horizon - first) / s.fault_every) + 1
    args = []
    for k in range(count):
        name = FAULTS[(site + k) % len(FAULTS)]
        args += ["--fault", f"{name}@{first + k * s.fault_every:g}+{s.fault_for:g}"]
    return args


def online_timeout(n: int) -> float:
    """How long n agents may take to start: Python and TFLite imports cost ~2 s of CPU each, on 2 cores."""
    return 60.0 + 3.0 * n


def check_alive(procs: list[tuple[subprocess.Popen[bytes], Path | None]]) -> None:
    """Raise, with the end of its log, if any of the processes has exited."""
    for proc, log in procs:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").splitlines()[-10:] if log is not None else []
            args = " ".join(map(str, proc.args)) if isinstance(proc.args, list) else str(proc.args)
            raise RuntimeError(f"{args} exited with {proc.returncode}:\n" + "\n".join(tail))


def sleep_checking(seconds: float, check: Callable[[], None], *, every: float = 1.0) -> None:
    """Sleep `seconds`, calling `check` at least every `every` s."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(every, left))
        check()


@dataclass(frozen=True)
class Result:
    """What one run of N agents measured."""

    agents: int
    simulators: int
    seconds: float
    rates: dict[str, float]  # messages/s at the subscriber, by kind
    sys_rate: float | None  # PUBLISH packets/s mosquitto received, from $SYS
    agents_with_events: int
    duplicates: int
    historical: int
    agent_cpu: list[float]  # % of one core, per agent
    agent_rss_mean: list[float]  # bytes, per agent
    agent_rss_max: float
    broker_cpu: float
    broker_rss_max: float
    sim_cpu: float  # % of one core, all simulators together
    reads_per_s_min: float
    overruns: float
    outbox_depth_max: float


def run_fleet(n: int, s: Settings, directory: Path) -> Result:
    """Start a broker, simulators and n agents, measure, and stop everything (whatever happens)."""
    sites = math.ceil(n / s.per_simulator)
    timeout = online_timeout(n)
    horizon = timeout + s.warmup + s.seconds + 60.0
    started: list[subprocess.Popen[bytes]] = []
    broker: subprocess.Popen[bytes] | None = None
    sub: Subscriber | None = None
    agents: list[Agent] = []
    sims: list[subprocess.Popen[bytes]] = []
    try:
        broker, port = start_mosquitto(directory, extra_conf="sys_interval 1\n")
        sub = Subscriber(port)
        sim_ports = []
        for site in range(sites):
            sim_port = free_port()
            cmd = [*edge_agent_command(), "simulate", "--modbus-port", str(sim_port), "--no-opcua", "--no-s7"]
            cmd += ["--seed", str(site + 1), *fault_args(site, sites, s, horizon)]
            proc = spawn(cmd, log=directory / f"sim-{site + 1:02d}.log")
            sims.append(proc)
            started.append(proc)
            wait_listening(proc, sim_port)
            sim_ports.append(sim_port)
        config = directory / "fleet.yaml"
        config.write_text(s.config(port), encoding="utf-8")
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT__")}
        log(f"N={n}: mosquitto on :{port}, {sites} simulator(s) up; starting {n} agent(s)")
        for i in range(n):
            site, skid = i // s.per_simulator + 1, i % s.per_simulator + 1
            name, site_name = f"skid-{skid}", f"plant-{site:02d}"
            prefix, metrics_port = f"{site_name}/area-1/{name}", free_port()
            env = {
                **base_env,
                "SIM_MODBUS_PORT": str(sim_ports[site - 1]),
                "EDGE_AGENT__AGENT__ID": name,
                "EDGE_AGENT__AGENT__SITE": site_name,
                "EDGE_AGENT__MQTT__TOPIC_PREFIX": prefix,
                # agent ids repeat across sites: the client id must not (FLEET.md)
                "EDGE_AGENT__MQTT__CLIENT_ID": f"{site_name}.{name}",
                "EDGE_AGENT__OUTBOX__PATH": str(directory / f"{site_name}.{name}.outbox.db"),
                "EDGE_AGENT__OBSERVE__LISTEN": f"127.0.0.1:{metrics_port}",
            }
            agent_log = directory / f"{site_name}.{name}.log"
            proc = spawn([*edge_agent_command(), "run", "--output", "none", str(config)], log=agent_log, env=env)
            started.append(proc)
            agents.append(Agent(prefix, metrics_port, proc, agent_log))
            time.sleep(0.2)  # a short stagger: 50 interpreters importing at once only thrash 2 cores

        watched: list[tuple[subprocess.Popen[bytes], Path | None]] = [(a.proc, a.log) for a in agents]
        watched += [(p, directory / f"sim-{k + 1:02d}.log") for k, p in enumerate(sims)] + [(broker, None)]

        def check() -> None:
            check_alive(watched)

        deadline = time.monotonic() + timeout
        wanted = {a.prefix for a in agents}
        while not wanted <= sub.online():
            if time.monotonic() > deadline:
                missing = sorted(wanted - sub.online())
                raise RuntimeError(f"{len(missing)} agent(s) not online within {timeout:g} s: {missing[:5]}")
            sleep_checking(0.5, check)
        log(f"N={n}: all {n} agents online; warm-up {s.warmup:g} s")
        sleep_checking(s.warmup, check)

        pids = {"agents": [a.proc.pid for a in agents], "sims": [p.pid for p in sims], "broker": [broker.pid]}
        cpu0 = {k: [cpu_seconds(p) for p in v] for k, v in pids.items()}
        metrics0 = [scrape(a.metrics_port) for a in agents]
        tally0, wall0 = sub.snapshot(), time.monotonic()
        rss: dict[int, list[int]] = {p: [] for v in pids.values() for p in v}
        log(f"N={n}: measuring {s.seconds:g} s")
        end = wall0 + s.seconds
        while (left := end - time.monotonic()) > 0:
            for pid, samples in rss.items():
                samples.append(rss_bytes(pid))
            check()
            time.sleep(min(2.0, left))
        cpu1 = {k: [cpu_seconds(p) for p in v] for k, v in pids.items()}
        tally1, wall1 = sub.snapshot(), time.monotonic()
        metrics1 = [scrape(a.metrics_port) for a in agents]
        check()
    finally:
        # a second Ctrl-C must not cut the clean-up short and leave agents behind; every step is bounded
        handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            # agents first (they say goodbye to the broker), then the plant and the broker
            stop_all([a.proc for a in agents], timeout=20.0)
            stop_all(sims)
            if sub is not None:
                sub.close()
            if broker is not None:
                stop_process(broker)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        leftover = [p for p in started if p.poll() is None]
        if leftover:
            log(f"warning: {len(leftover)} process(es) did not exit")

    dt = wall1 - wall0

    def pct(key: str) -> list[float]:
        return [100.0 * (b - a) / dt for a, b in zip(cpu0[key], cpu1[key], strict=True)]

    sys_rate = None
    if tally0.sys_received and tally1.sys_received and tally1.sys_received[0] > tally0.sys_received[0]:
        (t0, c0), (t1, c1) = tally0.sys_received, tally1.sys_received
        sys_rate = (c1 - c0) / (t1 - t0)
    events = {k: v - tally0.events_by_agent.get(k, 0) for k, v in tally1.events_by_agent.items()}

    def delta(name: str) -> list[float]:
        return [m1.get(name, 0.0) - m0.get(name, 0.0) for m0, m1 in zip(metrics0, metrics1, strict=True)]

    return Result(
        agents=n,
        simulators=sites,
        seconds=dt,
        rates={k: (tally1.by_kind[k] - tally0.by_kind[k]) / dt for k in KINDS},
        sys_rate=sys_rate,
        agents_with_events=sum(1 for v in events.values() if v > 0),
        duplicates=tally1.duplicates - tally0.duplicates,
        historical=tally1.historical - tally0.historical,
        agent_cpu=pct("agents"),
        agent_rss_mean=[sum(rss[p]) / len(rss[p]) for p in pids["agents"]],
        agent_rss_max=max(max(rss[p]) for p in pids["agents"]),
        broker_cpu=pct("broker")[0],
        broker_rss_max=max(rss[pids["broker"][0]]),
        sim_cpu=sum(pct("sims")),
        reads_per_s_min=min(delta("edge_agent_reads_total")) / dt,
        overruns=sum(delta("edge_agent_overruns_total")),
        outbox_depth_max=max(m.get("edge_agent_outbox_depth", 0) for m in metrics1),
    )


def log(text: str) -> None:
    """Progress on stderr; the tables go to stdout."""
    print(text, file=sys.stderr, flush=True)


def machine() -> str:
    """The machine line: CPU, cores, memory, load, Python, mosquitto and paho versions."""
    with open("/proc/meminfo") as f:
        mem_kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    mosq = subprocess.run([mosquitto_path(), "-h"], capture_output=True, text=True).stdout.splitlines()[0]
    load = os.getloadavg()
    return (
        f"machine: {platform.machine()} {cpu_model()}, {os.cpu_count()} cores, {mem_kib / 1024**2:.0f} GiB RAM, "
        f"load {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at start (shared), Python {platform.python_version()}, "
        f"{mosq}, paho-mqtt {paho.mqtt.__version__}"
    )


def tables(results: list[Result]) -> str:
    """The two markdown tables: what reached the broker, and what it cost."""
    lines = [
        "At the broker (the subscriber's counts over the measured window; PUBLISH in/s = mosquitto's own $SYS",
        "count, which leaves out retained PUBLISHes, i.e. the status messages, in mosquitto 2.0):",
        "",
        "| agents | simulators | events/s | telemetry msg/s | scores msg/s | status msg/s | all msg/s "
        "| PUBLISH in/s ($SYS) | agents with events | duplicate / historical events |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        sys_rate = f"{r.sys_rate:.2f}" if r.sys_rate is not None else "-"
        lines.append(
            f"| {r.agents} | {r.simulators} | {r.rates['events']:.2f} | {r.rates['telemetry']:.2f} "
            f"| {r.rates['scores']:.2f} | {r.rates['status']:.2f} | {sum(r.rates.values()):.2f} | {sys_rate} "
            f"| {r.agents_with_events}/{r.agents} | {r.duplicates} / {r.historical} |"
        )
    lines += [
        "",
        "Cost (CPU % of one core over the window; RSS sampled every 2 s; reads, overruns, outbox from /metrics):",
        "",
        "| agents | agent CPU % mean | agent CPU % max | all agents CPU % | agent RSS MiB mean | agent RSS MiB max "
        "| mosquitto CPU % | mosquitto RSS MiB max | simulators CPU % (all) | reads/s per agent (min) | overruns "
        "| outbox depth max |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.agents} | {sum(r.agent_cpu) / len(r.agent_cpu):.2f} | {max(r.agent_cpu):.2f} "
            f"| {sum(r.agent_cpu):.1f} | {sum(r.agent_rss_mean) / len(r.agent_rss_mean) / MiB:.0f} "
            f"| {r.agent_rss_max / MiB:.0f} | {r.broker_cpu:.2f} | {r.broker_rss_max / MiB:.1f} | {r.sim_cpu:.1f} "
            f"| {r.reads_per_s_min:.2f} | {r.overruns:.0f} | {r.outbox_depth_max:.0f} |"
        )
    return "\n".join(lines)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C, through every finally


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", default="1,10,50", help="comma-separated fleet sizes (default 1,10,50)")
    ap.add_argument("--seconds", type=float, default=60.0, help="measured window per fleet size (default 60)")
    ap.add_argument("--warmup", type=float, default=20.0, help="after every agent is online (default 20)")
    ap.add_argument("--per-simulator", type=int, default=5, help="agents per simulator process (default 5)")
    ap.add_argument("--poll", type=float, default=1.0, help="poll interval, s (default 1)")
    ap.add_argument("--telemetry", type=float, default=10.0, help="telemetry interval, s; 0: off (default 10)")
    ap.add_argument("--scores", type=float, default=10.0, help="scores interval, s; 0: off (default 10)")
    ap.add_argument("--status", type=float, default=30.0, help="retained status interval, s (default 30)")
    ap.add_argument("--fault-every", type=float, default=60.0, help="one fault per site this often, s (default 60)")
    ap.add_argument("--fault-for", type=float, default=15.0, help="how long each fault lasts, s (default 15)")
    ap.add_argument("--dir", default=None, help="where configs, outboxes and logs go (a temp dir under it)")
    args = ap.parse_args()
    sizes = [int(x) for x in args.agents.split(",")]
    if min(sizes) < 1 or args.per_simulator < 1 or args.seconds <= 0 or args.poll <= 0:
        ap.error("fleet sizes, --per-simulator, --seconds and --poll must be positive")
    settings = Settings(
        poll=args.poll,
        telemetry=args.telemetry,
        scores=args.scores,
        status=args.status,
        per_simulator=args.per_simulator,
        fault_every=args.fault_every,
        fault_for=args.fault_for,
        warmup=args.warmup,
        seconds=args.seconds,
    )
    signal.signal(signal.SIGTERM, _interrupt)
    header = machine()
    results: list[Result] = []
    try:
        with tempfile.TemporaryDirectory(prefix="fleet-", dir=args.dir) as d:
            for n in sizes:
                directory = Path(d) / f"n{n}"
                directory.mkdir()
                results.append(run_fleet(n, settings, directory))
    except KeyboardInterrupt:
        log("interrupted: everything started was stopped")
        return 130
    finally:
        if results:
            print(header)
            print(settings.describe())
            print()
            print(tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
