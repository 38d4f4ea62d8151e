"""The scoring commands as a user runs them: model inspect, calibrate, replay."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.scoring.bundle import load_bundle

ROOT = Path(__file__).parents[2]
MODEL = ROOT / "models" / "pump-skid-ae.tflite"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def plant_csv(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("plant")
    normal, faulty = d / "normal.csv", d / "faulty.csv"
    assert (
        cli(
            "simulate", "--record", str(normal), "--duration", "240", "--seed", "21", "--record-every", "0.2"
        ).returncode
        == 0
    )
    r = cli(
        "simulate",
        "--record",
        str(faulty),
        "--duration",
        "240",
        "--seed",
        "21",
        "--record-every",
        "0.2",
        "--fault",
        "inlet_valve_closing@120+60",
    )
    assert r.returncode == 0, r.stderr
    return normal, faulty


def test_inspect_prints_metadata_tensors_and_sha() -> None:
    r = cli("model", "inspect", str(MODEL), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["sha256"] == load_bundle(MODEL).sha256
    assert info["input"]["dtype"] == "int8" and info["input"]["shape"] == [1, 16, 8]
    assert info["metadata"]["inputs"][0] == "pump.suction_pressure"
    text = cli("model", "inspect", str(MODEL))
    assert "threshold" in text.stdout and "zero point" in text.stdout


def test_inspect_refuses_a_non_model(tmp_path: Path) -> None:
    bad = tmp_path / "x.tflite"
    bad.write_text("hello")
    r = cli("model", "inspect", str(bad))
    assert r.returncode == 2 and "not a TFLite model" in r.stderr


def test_replay_flags_the_fault_and_writes_one_row_per_input(plant_csv: tuple[Path, Path], tmp_path: Path) -> None:
    _, faulty = plant_csv
    out, png = tmp_path / "out.csv", tmp_path / "out.png"
    r = cli(
        "replay", str(faulty), "--model", str(MODEL), "--calibrate-rows", "500", "--out", str(out), "--plot", str(png)
    )
    assert r.returncode == 0, r.stderr
    rows = out.read_text().splitlines()
    src = faulty.read_text().splitlines()
    assert len(rows) == len(src) and rows[0] == "datetime,score,threshold,anomaly"
    flags = [int(x.split(",")[3]) for x in rows[1:]]
    truth = [int(x.split(",")[-1]) for x in src[1:]]
    assert flags[:15] == [0] * 15  # before the first full window
    hit = sum(f and t for f, t in zip(flags, truth, strict=True))
    assert hit > 0.5 * sum(truth)
    assert sum(flags[:590]) == 0  # nothing before the fault starts (row 600 at 0.2 s)
    assert png.stat().st_size > 10_000


def test_calibrate_from_csv_writes_a_new_bundle(plant_csv: tuple[Path, Path], tmp_path: Path) -> None:
    normal, _ = plant_csv
    out = tmp_path / "mine.tflite"
    r = cli("calibrate", "--model", str(MODEL), "--csv", str(normal), "--rows", "600", "--out", str(out))
    assert r.returncode == 0, r.stderr
    new = load_bundle(out)
    assert new.sha256 != load_bundle(MODEL).sha256
    assert new.metadata.threshold.rows == 600 and "normal.csv" in new.metadata.threshold.calibrated_on
    assert new.metadata.inputs == load_bundle(MODEL).metadata.inputs
