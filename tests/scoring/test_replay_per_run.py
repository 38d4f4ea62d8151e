"""replay of a bundle trained to be calibrated on each run, without --calibrate-rows: a warning, not silence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.cli import main
from edge_agent.scoring.bundle import load_bundle

SKAB = Path(__file__).parents[2] / "models" / "skab" / "skab-pump.tflite"


def _csv(path: Path, rows: int) -> Path:
    inputs = load_bundle(SKAB).metadata.inputs
    rng = np.random.default_rng(0)
    lines = ["datetime," + ",".join(inputs)]
    for i in range(rows):
        values = ",".join(f"{v:.4f}" for v in rng.normal(1.0, 0.1, len(inputs)))
        lines.append(f"2024-01-01 00:{i // 60:02d}:{i % 60:02d},{values}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("rows_flag", [[], ["--calibrate-rows", "60"]])
def test_per_run_bundle_warns_without_calibration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], rows_flag: list[str]
) -> None:
    assert load_bundle(SKAB).metadata.training.get("normalise") == "per-run"
    code = main(["replay", str(_csv(tmp_path / "run.csv", 120)), "--model", str(SKAB), *rows_flag])
    err = capsys.readouterr().err
    assert code == 0
    warned = "trained to be calibrated on each run" in err and "--calibrate-rows N" in err
    assert warned is (not rows_flag)
