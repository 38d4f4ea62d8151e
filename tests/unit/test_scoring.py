"""Scoring: bundles on real .tflite files (int8 and float32), runtime, detector, calibration, replay."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_agent.scoring.bundle import ModelError, bundle_from_bytes, embed_metadata, load_bundle, read_metadata
from edge_agent.scoring.calibrate import calibrate, score_series, sliding_windows
from edge_agent.scoring.detector import Detector, WindowScorer, series_flags
from edge_agent.scoring.replay import read_table, replay, write_result
from edge_agent.scoring.runtime import ModelRuntime
from edge_agent.types import EventType, Severity

FIXTURES = Path(__file__).parents[1] / "fixtures"
INT8, F32 = FIXTURES / "pump-i8.tflite", FIXTURES / "pump-f32.tflite"
SHIPPED = Path(__file__).parents[2] / "models" / "pump-skid-ae.tflite"


def normal_data(bundle_path: Path, rows: int = 400, seed: int = 0) -> np.ndarray:
    meta = load_bundle(bundle_path).metadata
    rng = np.random.default_rng(seed)
    mean, scale = np.asarray(meta.normalisation.mean), np.asarray(meta.normalisation.scale)
    return mean + scale * rng.standard_normal((rows, len(meta.inputs))) * 0.5


@pytest.mark.parametrize(("path", "dtype"), [(INT8, "int8"), (F32, "float32"), (SHIPPED, "int8")])
def test_runtime_reads_quantization_from_the_model(path: Path, dtype: str) -> None:
    bundle = load_bundle(path)
    rt = ModelRuntime(bundle)
    assert rt.input.dtype.name == dtype and rt.output.dtype.name == dtype
    assert rt.input.quantized == (dtype == "int8") and (rt.input.scale > 0) == (dtype == "int8")
    meta = bundle.metadata
    x = np.zeros((3, meta.window, len(meta.inputs)), dtype=np.float32)
    out = rt.reconstruct(x)
    assert out.shape == x.shape and out.dtype == np.float32
    assert np.abs(out).max() < 3  # an autoencoder maps the normal mean near itself


def test_int8_and_float32_agree_roughly() -> None:
    # both fixtures come from the same recipe on the same data: scores of normal and shifted data separate
    for path in (INT8, F32):
        bundle = load_bundle(path)
        scorer = WindowScorer(bundle)
        normal = normal_data(path)
        shifted = normal.copy()
        shifted[:, 2] += 8 * np.asarray(bundle.metadata.normalisation.scale)[2]
        s_norm = np.nanmean(score_series(scorer, normal))
        s_shift = np.nanmean(score_series(scorer, shifted))
        assert s_shift > 5 * s_norm


def test_batch_scores_equal_single_scores() -> None:
    scorer = WindowScorer(load_bundle(INT8))
    windows = sliding_windows(normal_data(INT8, 60), scorer.bundle.metadata.window)
    good = np.ones_like(windows, dtype=bool)
    batch, _ = scorer.score(windows, good)
    single = [scorer.score(windows[i : i + 1], good[i : i + 1])[0][0] for i in range(len(windows))]
    np.testing.assert_allclose(batch, single, rtol=1e-6)


def test_metadata_round_trip_and_identity(tmp_path: Path) -> None:
    bundle = load_bundle(INT8)
    meta = bundle.metadata.model_copy(update={"description": "round trip", "version": "7"})
    data = embed_metadata(bundle.data, meta)
    again = read_metadata(data)
    assert again == meta
    assert read_metadata(embed_metadata(data, meta)) == meta  # replacing keeps one copy
    new = bundle_from_bytes(data)
    assert new.sha256 != bundle.sha256 and len(new.sha256) == 64
    ModelRuntime(new)  # still loads


def test_clear_errors_for_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot read"):
        load_bundle(tmp_path / "missing.tflite")
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(ModelError, match="not a TFLite model"):
        load_bundle(junk)
    truncated = tmp_path / "cut.tflite"
    truncated.write_bytes(INT8.read_bytes()[:2000])
    with pytest.raises(ModelError):
        load_bundle(truncated)


def test_detector_hysteresis_and_min_duration() -> None:
    det = Detector(
        model="m",
        model_version="1",
        model_sha256="x",
        inputs=("a", "b"),
        threshold=1.0,
        exit_ratio=0.8,
        min_duration=3.0,
    )
    seq = [0.5, 1.2, 0.9, 0.85, 0.7, 0.5, 0.5, 1.1, 0.79]  # t = 0, 1, 2, ...
    events = []
    for t, s in enumerate(seq):
        events += det.update(
            t_end=float(t),
            window_start=t - 1.0,
            score=s,
            contributions=np.array([0.75, 0.25]),
            values={"a": 1.0, "b": None},
        )
    kinds = [(e.type, e.window_end) for e in events]
    # enters at t=1; 0.9 and 0.85 are above the exit level; 0.7 at t=4 exits (3 s after the start)
    assert kinds == [(EventType.START, 1.0), (EventType.END, 4.0), (EventType.START, 7.0)]
    assert events[0].anomaly_id == events[1].anomaly_id != events[2].anomaly_id
    assert [e.seq for e in events] == [1, 2, 3] and len({e.event_id for e in events}) == 3
    assert events[0].contributions == {"a": 0.75, "b": 0.25}
    assert events[1].reason == "recovered" and events[1].peak_score == 1.2


def test_min_duration_holds_an_anomaly_open() -> None:
    flags = series_flags(
        np.array([2.0, 0.1, 0.1, 0.1, 0.1, 0.1]), 1.0, exit_ratio=0.8, min_duration_windows=3, smoothing=1
    )
    assert list(flags) == [1, 1, 1, 0, 0, 0]


def test_smoothing_ignores_a_single_spike() -> None:
    flags = series_flags(np.array([0.2, 0.2, 2.0, 0.2, 0.2]), 1.0, exit_ratio=0.8, min_duration_windows=0, smoothing=4)
    assert flags.sum() == 0


def test_insufficient_data_neither_starts_nor_ends() -> None:
    det = Detector(model="m", model_version="1", model_sha256="x", inputs=("a",), threshold=1.0, min_duration=0)
    assert det.update(t_end=0, window_start=0, score=float("nan"), contributions={"a": 1}, values={}) == []
    assert det.insufficient
    assert (
        det.update(t_end=1, window_start=0, score=5.0, contributions={"a": 1}, values={})[0].severity
        is Severity.CRITICAL
    )
    assert det.update(t_end=2, window_start=0, score=float("nan"), contributions={"a": 1}, values={}) == []
    assert det.active
    assert det.close(3.0, {})[0].reason == "shutdown"


def test_scorer_refuses_windows_with_too_little_good_data() -> None:
    scorer = WindowScorer(load_bundle(INT8), min_good=0.9)
    meta = scorer.bundle.metadata
    x = np.zeros((2, meta.window, len(meta.inputs)), dtype=np.float32)
    good = np.ones_like(x, dtype=bool)
    good[1, :, :2] = False  # a quarter of the cells missing
    scores, contrib = scorer.score(x, good)
    assert np.isfinite(scores[0]) and np.isnan(scores[1])
    assert contrib.shape == (2, len(meta.inputs)) and contrib[0].sum() == pytest.approx(1.0)


def test_calibration_is_reproducible_and_recorded() -> None:
    bundle = load_bundle(INT8)
    data = normal_data(INT8, 500, seed=3) * 1.1 + 0.5  # another machine: other levels
    a = calibrate(bundle, data, quantile=0.99, margin=1.5, source="test")
    b = calibrate(bundle, data, quantile=0.99, margin=1.5, source="test")
    assert a.metadata.threshold.value == b.metadata.threshold.value
    assert a.metadata.normalisation == b.metadata.normalisation
    assert a.metadata.normalisation.mean == pytest.approx(list(data.mean(axis=0)))
    assert a.metadata.threshold.rows == 500 and a.metadata.threshold.calibrated_on == "test"
    scores = score_series(WindowScorer(a), data)
    assert np.mean(scores > a.metadata.threshold.value) < 0.01  # the normal data stays below the threshold


def test_replay_output_shape_and_csv(tmp_path: Path) -> None:
    bundle = load_bundle(INT8)
    meta = bundle.metadata
    rows = 300
    data = normal_data(INT8, rows)
    data[200:260, 1] += 10 * meta.normalisation.scale[1]
    csv_path = tmp_path / "in.csv"
    with open(csv_path, "w") as f:
        f.write("datetime;" + ";".join(meta.inputs) + "\n")
        for i in range(rows):
            f.write(
                f"2026-01-01 00:{i // 300:02d}:{(i * 0.2) % 60:06.3f};" + ";".join(f"{v:.6g}" for v in data[i]) + "\n"
            )
    table = read_table(csv_path)
    assert table.time_column == "datetime" and table.values.shape == (rows, len(meta.inputs))
    result = replay(bundle, table.times, table.select(meta.inputs), calibrate_rows=150)
    assert len(result.score) == rows and np.isnan(result.score[: meta.window - 1]).all()
    assert result.anomaly[: meta.window - 1].sum() == 0
    assert result.anomaly[205:255].all() and not result.anomaly[:200].any()
    out = tmp_path / "out.csv"
    write_result(result, out)
    lines = out.read_text().splitlines()
    assert lines[0] == "datetime,score,threshold,anomaly" and len(lines) == rows + 1
    assert json.dumps(result.bundle.metadata.threshold.model_dump())  # calibrated threshold is recorded
