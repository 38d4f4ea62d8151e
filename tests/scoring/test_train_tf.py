"""The training recipe end to end with TensorFlow (the `train` extra): each trainable kind to an int8 bundle.

TensorFlow is not in the CI venv: these tests are skipped there (and not counted as coverage); run them with a
venv that has it, e.g. `PYTHONPATH=$PWD /work/tfvenv/bin/python -m pytest tests/scoring/test_train_tf.py`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_agent.cli.simulate import record_plant
from edge_agent.scoring.base import SCORERS
from edge_agent.scoring.bundle import load_bundle
from edge_agent.scoring.detector import WindowScorer
from edge_agent.scoring.replay import read_table
from edge_agent.scoring.runtime import ModelRuntime
from edge_agent.scoring.train import TrainOptions, train

pytest.importorskip("tensorflow", reason="the train extra (tensorflow-cpu) is not installed")

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two short fault-free simulator runs as CSV (seeds 1 and 2, 0.2 s rows)."""
    d = tmp_path_factory.mktemp("train")
    paths = [d / "a.csv", d / "b.csv"]
    for seed, path in enumerate(paths, 1):
        record_plant(str(path), seed=seed, faults=(), seconds=120 + 40 * seed, every=0.2)
    return paths


@pytest.mark.parametrize("kind", sorted(k for k, p in SCORERS.items() if p.fit is not None))
def test_each_kind_trains_to_a_full_int8_bundle_with_a_held_out_threshold(kind: str, runs: list[Path]) -> None:
    tables = [read_table(p) for p in runs]
    inputs = tuple(c for c in tables[0].columns if c != "fault_active")
    series = [t.select(list(inputs)) for t in tables]
    # window 6: not a multiple of the conv kind's two halvings, so its padding and cropping are exercised
    options = TrainOptions(name="t", inputs=inputs, kind=kind, window=6, sample_interval=0.2, hidden=8, epochs=2)
    bundle = train(series, options, source="a.csv, b.csv")
    meta = bundle.metadata
    assert meta.score.kind == kind and meta.window == 6
    tensors = ModelRuntime(bundle).describe()
    assert tensors["input"]["dtype"] == "int8" and tensors["input"]["shape"] == [1, 6, len(inputs)]
    # the model never saw the last 20 % of each run; the threshold comes from those windows only
    tails = [len(s) - (len(s) - round(0.2 * len(s))) for s in series]
    assert meta.training["holdout"] == 0.2 and meta.training["holdout_rows"] == sum(tails) == meta.threshold.rows
    assert meta.training["holdout_windows"] == sum(t - 6 + 1 for t in tails)
    assert meta.training["windows"] == sum(len(s) - t - 6 + 1 for s, t in zip(series, tails, strict=True))
    assert meta.threshold.method == "quantile×margin, held-out"
    fitted = np.concatenate([s[: len(s) - t] for s, t in zip(series, tails, strict=True)])
    np.testing.assert_allclose(meta.normalisation.mean, np.nanmean(fitted, axis=0), rtol=1e-9)
    window = series[0][:6][None].astype(np.float32)
    scores, _ = WindowScorer(bundle).score(window, np.ones(window.shape, bool))
    assert np.isfinite(scores).all()


def test_per_run_training_scores_each_held_out_tail_under_its_own_runs_normalisation(runs: list[Path]) -> None:
    series = [read_table(p).select(["pump.flow", "pump.motor_current"]) for p in runs]
    series[1] = series[1] * 1.5  # another operating point: per-run normalisation takes it out
    options = TrainOptions(
        name="t", inputs=("pump.flow", "pump.motor_current"), window=8, normalise="per-run", segment_rows=300, epochs=1
    )
    meta = train(series, options).metadata
    assert meta.threshold.method == "quantile×margin, held-out, per run"
    assert meta.training["normalise"] == "per-run" and meta.training["holdout"] == 0.2
    slices = [len(r) for s in series for r in np.array_split(s, range(300, len(s) - 300 + 1, 300))]
    assert meta.threshold.rows == sum(round(0.2 * n) for n in slices)


def test_train_prints_only_its_result_on_stdout(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "m.tflite"
    options = ["--out", str(out), "--name", "m", "--window", "8", "--sample-interval", "0.2", "--epochs", "1"]
    r = subprocess.run(
        [sys.executable, "-m", "edge_agent", "train", *map(str, runs), *options, "--holdout", "0"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    bundle = load_bundle(out)
    t = bundle.metadata.threshold
    architecture = bundle.metadata.training["architecture"]
    assert lines[0] == f"{out}: reconstruction_mse, int8 {architecture}, sha256 {bundle.sha256}"
    assert lines[1].startswith(f"threshold {t.value:.6g} = q0.99 × 1.5 of ") and "(no hold-out)" in lines[1]
    assert lines[2].startswith("trained on ") and lines[2].endswith(" s") and len(lines) == 3
    assert "--holdout 0: the threshold comes from the windows the model was fitted on" in r.stderr
    assert "holdout" not in bundle.metadata.training  # trained as before hold-outs existed: the same metadata
