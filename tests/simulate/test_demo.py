"""`edge-agent demo` end to end: real simulator, agent and broker subprocesses, and its subscriber's output."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

# a short schedule: the model needs its 3.2 s window and the detector its 5 s min duration before a start
ARGS = ["--fault", "cavitation@6+10", "--duration", "30", "--view", "plain"]


def run_demo(*extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", "--log-level", "warning", "demo", *ARGS, *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )


# tests/run.sh installs mosquitto and the dev extra brings amqtt: neither case is skipped
@pytest.mark.parametrize("broker", ["mosquitto", "builtin"])
def test_demo_shows_the_faults_anomaly_start_and_end(broker: str) -> None:
    done = run_demo("--broker", broker)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert ("mosquitto" if broker == "mosquitto" else "amqtt") in out
    # the subscriber printed each event as it arrived, from the events topic of the shipped model
    events = re.findall(r"^EVENT demo/lab/pump-skid/events/pump-skid: \S+ (anomaly\.\w+)", out, re.M)
    assert events[0] == "anomaly.start", out
    assert events.count("anomaly.start") == events.count("anomaly.end") >= 1, out
    m = re.search(r"(\d+) MQTT messages, (\d+) anomaly.start and (\d+) anomaly.end", out)
    assert m is not None, out
    messages, starts, ends = map(int, m.groups())
    assert starts == ends == events.count("anomaly.start")
    assert messages > 50  # telemetry and scores flowed too, not only the events
    # the periodic lines show telemetry and scores decoded from the broker's messages
    assert re.search(r"agent online; flow \d+\.\d+ m3/h, vibration \d+\.\d+ mm/s; score \d", out), out
    assert "agent's last status: offline" in out  # the agent's clean shutdown status arrived
    assert "kept in" not in out  # a good run leaves no temp files behind


def test_demo_bad_fault_is_a_clear_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "edge_agent", "demo", "--fault", "flood@10"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert "unknown fault 'flood'" in done.stderr


def test_demo_missing_model_names_the_file_and_the_fix(tmp_path: object) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "edge_agent", "demo", "--model", "/nonexistent/pump.tflite"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert "/nonexistent/pump.tflite" in done.stderr and "--model FILE" in done.stderr


def test_demo_sparkplug_publishes_births_data_and_death() -> None:
    done = run_demo("--broker", "mosquitto", "--sparkplug")
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    m = re.search(r"^Sparkplug B \(spBv1\.0/demo/#\): (.*)$", out, re.M)
    assert m is not None, out
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) ([A-Z]+)", m.group(1))}
    assert counts["NBIRTH"] >= 1 and counts["DBIRTH"] >= 3, counts  # the node and its three devices
    assert counts["DDATA"] > 10, counts  # telemetry by exception
    assert counts["NDATA"] >= 2, counts  # the model's anomaly state: the start and the end
    assert counts["NDEATH"] == 1, counts  # the clean stop says it itself
    assert "anomaly.start" in out
