"""Soak: does the agent's memory level off during a long broker outage?

The pieces, each its own process: the simulator's Modbus server (`edge-agent simulate`), `edge-agent run`
on examples/simulator-modbus.yaml (8 float32 tags every 100 ms, the rest every 1 s or 10 s, the shipped
model pump-skid-ae.tflite scoring unless --no-model) with `mqtt.telemetry_interval: 100ms`,
`outbox.max_bytes: 1MiB`, and `mqtt.url` on a free 127.0.0.1 port where nothing listens (the outage: the
outbox fills up within minutes, then drops the oldest telemetry for every new message). With
--drain-minutes N a mosquitto is started on that port N minutes before the end, to show the backlog drains.

Every --every seconds the bench reads the agent's VmRSS (/proc/PID/status), the outbox file's size (db +
-wal) and, as a same-run reference, the RSS of an idle `python -c "import time; time.sleep(...)"`. At the
end it stops the agent (SIGTERM), runs `edge-agent outbox stats --json`, and prints a markdown table
(minute, RSS MiB, Δ since minute 1, outbox file) and the RSS slope over the last half of the outage
(least squares, KiB/min). The absolute RSS depends on the machine and the libraries; the slope is the point.

    python bench/soak.py [--minutes 30] [--every 60] [--drain-minutes 0] [--no-model]
                         [--env MALLOC_ARENA_MAX=2] [--dir /tmp]

One run (issue 11, item 12; 2 cores, Python 3.11, --minutes 33 --drain-minutes 3): RSS 74.29 MiB at minute 1,
74.73 at minute 5, 74.75 from minute 12 to 30; slope over minutes 15-29 +0.5 KiB/min. It levels off: the
outbox is full after ~1 min (547 rows), SQLite's page cache stops at 1.35 MiB (cache_size caps it at 2 MiB),
and the last ~0.5 MiB until minute 5 is heap pages touched for the first time (malloc's in-use bytes and
every queue, dict and counter stay flat by count). The broker started at minute 30 drained the 548 rows;
connected (a 12-minute run, broker from minute 1) RSS rises ~2 MiB once and stays at 76.75 MiB from minute 5.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from harness import (
    edge_agent_command,
    free_port,
    machine_line,
    mosquitto_path,
    rss_bytes,
    spawn,
    stop_process,
    wait_listening,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "simulator-modbus.yaml"
MODEL = ROOT / "models" / "pump-skid-ae.tflite"


def write_config(directory: Path, *, modbus_port: int, broker_port: int, model: bool) -> Path:
    """examples/simulator-modbus.yaml with the outage's broker, telemetry every 100 ms and a 1 MiB outbox."""
    cfg = yaml.safe_load(EXAMPLE.read_text())
    cfg["devices"][0]["host"] = "127.0.0.1"
    cfg["devices"][0]["port"] = modbus_port
    if model:
        cfg["models"][0]["file"] = str(MODEL)
    else:
        cfg.pop("models", None)
    cfg["mqtt"] = {
        "url": f"mqtt://127.0.0.1:{broker_port}",
        "telemetry_interval": "100ms",
        "reconnect_max": "5s",  # so a broker started for the drain is found soon
    }
    cfg["outbox"] = {"path": str(directory / "outbox.db"), "max_bytes": "1MiB"}
    path = directory / "soak.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def outbox_file_bytes(db: Path) -> int:
    """The outbox's size on disk: the database and its WAL."""
    return sum(p.stat().st_size for p in (db, db.with_name(db.name + "-wal")) if p.exists())


def start_mosquitto_on(directory: Path, port: int) -> subprocess.Popen[bytes]:
    """A mosquitto on 127.0.0.1:`port` (the agent's broker URL), listening when this returns."""
    conf = directory / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n" + ("user root\n" if os.geteuid() == 0 else ""))
    proc = spawn([mosquitto_path(), "-c", str(conf)], log=directory / "mosquitto.log")
    wait_listening(proc, port, timeout=10)
    return proc


def slope_kib_per_min(points: list[tuple[float, int]]) -> float:
    """Least-squares slope of (minute, bytes) points, in KiB per minute."""
    n = len(points)
    if n < 2:
        return float("nan")
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    return sxy / sxx / 1024 if sxx else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0, help="how long the agent runs")
    ap.add_argument("--every", type=float, default=60.0, help="seconds between RSS samples")
    ap.add_argument("--drain-minutes", type=float, default=0.0, help="start a broker this long before the end")
    ap.add_argument("--no-model", action="store_true", help="no scoring: polling, telemetry and the outbox only")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment of the agent")
    ap.add_argument("--dir", default=None, help="where the config, outbox and logs go (default: a temp dir)")
    args = ap.parse_args()

    directory = Path(args.dir or tempfile.mkdtemp(prefix="soak-"))
    directory.mkdir(parents=True, exist_ok=True)
    modbus_port, broker_port = free_port(), free_port()
    config = write_config(directory, modbus_port=modbus_port, broker_port=broker_port, model=not args.no_model)
    env = dict(os.environ)
    env.update(kv.split("=", 1) for kv in args.env)
    cli = edge_agent_command()
    total = args.minutes * 60.0
    drain_at = total - args.drain_minutes * 60.0 if args.drain_minutes > 0 else None

    sim = spawn(
        [*cli, "simulate", "--port", f"modbus={modbus_port}", "--without", "opcua", "--without", "s7",
         "--duration", str(int(total + 120))],
        log=directory / "simulate.log",
    )  # fmt: skip
    procs = [sim]
    broker: subprocess.Popen[bytes] | None = None
    samples: list[tuple[float, int, int, int]] = []  # (minute, agent RSS, idle RSS, outbox file bytes)
    try:
        wait_listening(sim, modbus_port)
        idle = spawn([sys.executable, "-c", f"import time; time.sleep({total + 60:.0f})"], log=os.devnull)
        procs.append(idle)
        agent = spawn(
            [*cli, "run", str(config), "--output", "none", "--duration", str(int(total + 30))],
            log=directory / "agent.log",
            env=env,
        )
        procs.append(agent)
        t0 = time.monotonic()
        print(f"soak: {args.minutes:g} min in {directory}, agent pid {agent.pid}, RSS every {args.every:g} s",
              file=sys.stderr, flush=True)  # fmt: skip
        k = 1
        while k * args.every <= total + 1e-9:
            time.sleep(max(0.0, t0 + k * args.every - time.monotonic()))
            if agent.poll() is not None:
                raise SystemExit(f"the agent exited with {agent.returncode}; see {directory / 'agent.log'}")
            if drain_at is not None and broker is None and k * args.every >= drain_at:
                broker = start_mosquitto_on(directory, broker_port)
                procs.append(broker)
                print(f"soak: broker started at minute {k * args.every / 60:g}", file=sys.stderr, flush=True)
            row = (k * args.every / 60, rss_bytes(agent.pid), rss_bytes(idle.pid),
                   outbox_file_bytes(directory / "outbox.db"))  # fmt: skip
            samples.append(row)
            print(f"soak: minute {row[0]:5.2f}  RSS {row[1] / 2**20:7.2f} MiB  outbox file {row[3] / 2**10:7.0f} KiB",
                  file=sys.stderr, flush=True)  # fmt: skip
            k += 1
        stop_process(agent, timeout=15)
    finally:
        for p in reversed(procs):
            stop_process(p)

    stats = subprocess.run([*cli, "outbox", "stats", "--json", str(directory / "outbox.db")],
                           capture_output=True, text=True, check=False)  # fmt: skip
    try:
        st = json.loads(stats.stdout)
    except json.JSONDecodeError:
        st = {"error": (stats.stdout + stats.stderr).strip()}

    print(machine_line("edge-agent simulate (Modbus)", total))
    broker_note = "absent" if drain_at is None else f"absent until minute {drain_at / 60:g}"
    print(f"agent: examples/simulator-modbus.yaml, telemetry every 100 ms, outbox.max_bytes 1MiB, "
          f"model {'off' if args.no_model else MODEL.name}, broker {broker_note}"
          + (f", env {' '.join(args.env)}" if args.env else ""))  # fmt: skip
    print()
    print("| minute | RSS MiB | Δ since first sample KiB | idle python RSS MiB | outbox file KiB |")
    print("|---:|---:|---:|---:|---:|")
    base = samples[0][1] if samples else 0
    for minute, rss, idle_rss, fbytes in samples:
        cells = (f"{minute:g}", f"{rss / 2**20:.2f}", f"{(rss - base) / 1024:+.0f}", f"{idle_rss / 2**20:.2f}",
                 f"{fbytes / 1024:.0f}")  # fmt: skip
        print(f"| {' | '.join(cells)} |")
    outage = [(m, r) for m, r, _, _ in samples if drain_at is None or m * 60 < drain_at]
    half = outage[len(outage) // 2 :]
    print()
    print(f"RSS slope over the last half of the outage (minutes {half[0][0]:g}–{half[-1][0]:g}, least squares): "
          f"{slope_kib_per_min(half):+.1f} KiB/min" if len(half) >= 2 else "too few samples for a slope")  # fmt: skip
    if "depth" in st:
        print(f"outbox at the end: depth {st['depth']}, bytes {st.get('bytes')}, dropped {st.get('dropped')}")
    else:
        print(f"outbox stats: {st}")


if __name__ == "__main__":
    main()
