"""threshold.floor: set by train --threshold-floor, kept by every recalibration, absent from bundles without one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_agent.cli import main
from edge_agent.scoring.bundle import _dump, load_bundle, read_metadata, save_bundle
from edge_agent.scoring.calibrate import calibrate
from edge_agent.scoring.train import TrainOptions, with_floor

INT8 = Path(__file__).parents[1] / "fixtures" / "pump-i8.tflite"


def normal(rows: int, seed: int = 0) -> np.ndarray:
    """Rows of normal operation around the fixture model's training means."""
    mean = np.asarray(load_bundle(INT8).metadata.normalisation.mean)
    return mean * (1 + 0.01 * np.random.default_rng(seed).standard_normal((rows, len(mean))))


def test_a_bundle_without_a_floor_keeps_its_metadata_bytes() -> None:
    bundle = load_bundle(INT8)
    assert bundle.metadata.threshold.floor == 0.0
    assert "floor" not in json.dumps(_dump(bundle.metadata))  # what embed_metadata writes
    floored = with_floor(bundle, 1.25)
    assert floored.metadata.threshold.floor == pytest.approx(1.25 * bundle.metadata.threshold.value, rel=1e-5)
    assert floored.metadata.threshold.value == bundle.metadata.threshold.value  # only the floor is new
    assert '"floor":' in json.dumps(_dump(floored.metadata))


def test_calibration_never_goes_below_the_floor_and_keeps_it() -> None:
    bundle = load_bundle(INT8)
    data = normal(300)
    free = calibrate(bundle, data).metadata.threshold
    assert free.floor == 0.0
    high = with_floor(bundle, 10 * free.value / bundle.metadata.threshold.value)
    held = calibrate(high, data).metadata.threshold
    assert held.value == pytest.approx(10 * free.value, rel=1e-5) and held.floor == high.metadata.threshold.floor
    # a floor under what the data gives changes nothing, and survives a second calibration
    low = with_floor(bundle, 0.1 * free.value / bundle.metadata.threshold.value)
    again = calibrate(calibrate(low, data), normal(300, 1)).metadata.threshold
    assert calibrate(low, data).metadata.threshold.value == free.value
    assert again.floor == low.metadata.threshold.floor > 0


def test_replay_with_calibrate_rows_honours_the_floor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = load_bundle(INT8)
    data = normal(200)
    lines = ["datetime," + ",".join(bundle.metadata.inputs)]
    for i, row in enumerate(data):
        lines.append(f"2024-01-01T00:00:{i * 0.2:06.3f}Z," + ",".join(f"{v:.5f}" for v in row))
    csv = tmp_path / "run.csv"
    csv.write_text("\n".join(lines) + "\n")
    floor = 1000 * bundle.metadata.threshold.value
    model = tmp_path / "floored.tflite"
    save_bundle(with_floor(bundle, 1000), model)
    assert read_metadata(model.read_bytes()).threshold.floor == pytest.approx(floor, rel=1e-5)
    out = tmp_path / "out.csv"
    assert main(["replay", str(csv), "--model", str(model), "--calibrate-rows", "100", "--out", str(out)]) == 0
    thresholds = {float(r.split(",")[2]) for r in out.read_text().splitlines()[1:]}
    assert len(thresholds) == 1 and thresholds.pop() == pytest.approx(floor, rel=1e-5)
    assert main(["replay", str(csv), "--model", str(INT8), "--calibrate-rows", "100", "--out", str(out)]) == 0
    assert max(float(r.split(",")[2]) for r in out.read_text().splitlines()[1:]) < floor / 10
    capsys.readouterr()


def test_train_options_refuse_a_negative_floor() -> None:
    with pytest.raises(ValueError, match="threshold_floor must be 0"):
        TrainOptions(name="t", inputs=("a",), threshold_floor=-1.0)
