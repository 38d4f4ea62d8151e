"""Benchmark: what starting `edge-agent` costs: wall time and peak RSS of short commands, RSS of a running agent.

Each short command runs --runs times as a child process; the table gives the median wall time, that time as a
multiple of `python -c pass` measured in the same run (the machine's own start-up cost, so tables from busy and
idle machines compare), and the command's peak RSS (getrusage of the children of a small launcher process):
- `python -c pass`, the reference;
- `edge-agent --help`;
- `edge-agent check examples/simulator-modbus.yaml` (a Modbus-only config with one model; no network).

Then `edge-agent simulate` (Modbus only) on a free 127.0.0.1 port and `edge-agent run` of the same config against
it for --seconds: the agent's RSS then (VmRSS) and its peak so far (VmHWM).

    python bench/startup.py [--runs 7] [--seconds 10]

Speed is noisy on a shared machine: read the ratios and the orders of magnitude, not the last digit.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import edge_agent_command, free_port, rss_bytes, stop_process, wait_listening

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "simulator-modbus.yaml"  # Modbus only, one model
MiB = 1024 * 1024


# Runs one command and reports on it from a fresh small process: ru_maxrss of a child counts the RSS of the process
# that forked it (Linux keeps the larger of the two across fork and exec), so this benchmark, which imports the
# agent, must not be the one that forks the measured commands.
MEASURE = """
import resource, subprocess, sys, time
t0 = time.perf_counter()
code = subprocess.run(sys.argv[2:], stdout=subprocess.DEVNULL, timeout=float(sys.argv[1])).returncode
seconds = time.perf_counter() - t0
print(seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)
"""


def run_measured(cmd: list[str], *, timeout: float = 120.0) -> tuple[float, int]:
    """Run `cmd` to its end: (wall seconds, peak RSS in bytes of that command alone); raise if it fails."""
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(timeout), *cmd], capture_output=True, text=True, timeout=timeout + 30
    )
    if out.returncode != 0:
        raise SystemExit(f"measuring {' '.join(cmd)} failed:\n{out.stderr}")
    seconds, kib, code = out.stdout.split()
    if code != "0":
        raise SystemExit(f"{' '.join(cmd)}: exit {code}\n{out.stderr}")
    return float(seconds), int(kib) * 1024  # ru_maxrss is in KiB on Linux


def short_commands(runs: int) -> list[tuple[str, float, int]]:
    """(label, median wall seconds, peak RSS bytes) of each short command."""
    agent = edge_agent_command()
    cases = [
        ("`python -c pass`", [sys.executable, "-c", "pass"]),
        ("`edge-agent --help`", [*agent, "--help"]),
        ("`edge-agent check` (Modbus, 1 model)", [*agent, "check", str(CONFIG)]),
    ]
    results: dict[str, list[tuple[float, int]]] = {label: [] for label, _ in cases}
    for _label, cmd in cases:  # one warm-up run each: the first run pays for a cold page cache
        run_measured(cmd)
    for _ in range(runs):  # interleaved, so a burst of load elsewhere hits every case alike
        for label, cmd in cases:
            results[label].append(run_measured(cmd))
    return [(label, statistics.median(t for t, _ in rows), max(r for _, r in rows)) for label, rows in results.items()]


def running_agent(seconds: float) -> tuple[int, int, str]:
    """(VmRSS after `seconds`, peak RSS, its last summary line) of `edge-agent run` against a Modbus simulator."""
    agent = edge_agent_command()
    port = free_port()
    env = {**os.environ, "SIM_HOST": "127.0.0.1", "SIM_MODBUS_PORT": str(port)}
    sim = subprocess.Popen(
        [*agent, "simulate", "--host", "127.0.0.1", "--modbus-port", str(port), "--no-opcua", "--no-s7"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(sim, port)
        with tempfile.TemporaryFile() as out:
            run = subprocess.Popen(
                [*agent, "run", str(CONFIG), "--report-interval", "2", "--duration", str(seconds + 30)],
                stdout=out,
                stderr=subprocess.DEVNULL,
                env=env,
            )
            try:
                time.sleep(seconds)
                if run.poll() is not None:
                    raise SystemExit(f"edge-agent run exited early with {run.returncode}")
                rss_now, rss_peak = rss_bytes(run.pid), _vm_hwm(run.pid)
                run.send_signal(signal.SIGTERM)
                run.wait(15.0)
            finally:
                if run.returncode is None:
                    stop_process(run)
            out.seek(0)
            lines = [ln for ln in out.read().decode(errors="replace").splitlines() if ln.startswith("pump-skid ")]
        if not lines or " up " not in lines[-1]:
            raise SystemExit(f"the agent did not read the simulator: {lines[-1:] or 'no summary line'}")
        return rss_now, rss_peak, lines[-1]
    finally:
        stop_process(sim)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7, help="runs of each short command (the median is shown)")
    ap.add_argument("--seconds", type=float, default=10.0, help="how long the agent runs before its RSS is read")
    args = ap.parse_args()
    rows = short_commands(max(1, args.runs))
    rss_now, rss_peak, last = running_agent(args.seconds)
    ref = rows[0][1]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"median of {args.runs} runs; commit {_commit()}\n"
    )
    print("| command | wall (median) | × `python -c pass` | max RSS |")
    print("|---|---:|---:|---:|")
    for label, seconds, rss in rows:
        print(f"| {label} | {seconds * 1000:.0f} ms | {seconds / ref:.1f} | {rss / MiB:.1f} MiB |")
    print(
        f"| `edge-agent run` (Modbus, 1 model) after {args.seconds:g} s | – | – | "
        f"{rss_now / MiB:.1f} MiB now, {rss_peak / MiB:.1f} MiB peak |"
    )
    print(f"\nlast summary line of the agent: {last}")


def _vm_hwm(pid: int) -> int:
    """Peak resident set size of a process so far (VmHWM of /proc/PID/status), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", "edge_agent"], timeout=10)
        return out.stdout.decode().strip() + ("+changes" if dirty.returncode else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


if __name__ == "__main__":
    main()
