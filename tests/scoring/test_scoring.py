"""Scoring: bundles on real .tflite files (int8 and float32), runtime, detector, calibration, replay."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from edge_agent.buffers import Buffers
from edge_agent.config import Config, ModelSection, load_config
from edge_agent.records import load_schema, score_payload
from edge_agent.scoring.bundle import (
    Bundle,
    ModelError,
    ScoreSpec,
    bundle_from_bytes,
    embed_metadata,
    load_bundle,
    read_metadata,
    save_bundle,
)
from edge_agent.scoring.calibrate import calibrate, rolling_mean, score_series, sliding_windows
from edge_agent.scoring.detector import Detector, WindowScorer, series_flags
from edge_agent.scoring.monitor import LoadedModel, ModelMonitor, load_models
from edge_agent.scoring.replay import read_table, replay, write_result
from edge_agent.scoring.runtime import ModelRuntime
from edge_agent.types import AnomalyEvent, EventType, Score, Severity

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
    out = rt.run(x)
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


def write_csv(path: Path, names: list[str], data: np.ndarray, stamp: str = "2026-01-01 00:{m:02d}:{s:06.3f}") -> None:
    """A `;` CSV with naive local-looking timestamps every 0.2 s, as a historian export writes them."""
    with open(path, "w") as f:
        f.write("datetime;" + ";".join(names) + "\n")
        for i, row in enumerate(data):
            t = i * 0.2
            f.write(stamp.format(m=int(t // 60), s=t % 60) + ";" + ";".join(f"{v:.6g}" for v in row) + "\n")


def test_replay_output_shape_and_csv(tmp_path: Path) -> None:
    bundle = load_bundle(INT8)
    meta = bundle.metadata
    rows = 300
    data = normal_data(INT8, rows)
    data[200:260, 1] += 10 * meta.normalisation.scale[1]
    csv_path = tmp_path / "in.csv"
    write_csv(csv_path, meta.inputs, data)
    table = read_table(csv_path)
    assert table.time_column == "datetime" and table.values.shape == (rows, len(meta.inputs))
    result = replay(bundle, table.times, table.select(meta.inputs), calibrate_rows=150)
    assert len(result.score) == rows and np.isnan(result.score[: meta.window - 1]).all()
    assert result.anomaly[: meta.window - 1].sum() == 0
    assert result.anomaly[205:255].all() and not result.anomaly[:200].any()
    out = tmp_path / "out.csv"
    write_result(result, out, table.time_column, table.stamps)
    lines = out.read_text().splitlines()
    assert lines[0] == "datetime,score,threshold,anomaly,raw_score,status" and len(lines) == rows + 1
    # each row's timestamp is the input's text, unchanged (no time zone invented), so OUT.csv joins back
    inputs = csv_path.read_text().splitlines()
    assert [x.split(",")[0] for x in lines[1:]] == [x.split(";")[0] for x in inputs[1:]]
    assert lines[1].startswith("2026-01-01 00:00:00.000,,")
    assert json.dumps(result.bundle.metadata.threshold.model_dump())  # calibrated threshold is recorded


def test_replay_status_tells_warmup_from_insufficient_data(tmp_path: Path) -> None:
    bundle = load_bundle(INT8)
    window = bundle.metadata.window
    data = normal_data(INT8, 120)
    data[60:80] = np.nan  # a gap in the recording: windows over it have too little good data
    times = 1.0e9 + 0.2 * np.arange(len(data))
    result = replay(bundle, times, data)
    assert set(result.status[: window - 1]) == {"warmup"} and np.isnan(result.score[: window - 1]).all()
    gap = result.status == "insufficient"
    assert gap[60:80].all() and gap.sum() < 20 + window and np.isnan(result.score[gap]).all()
    assert np.isfinite(result.score[result.status == "scored"]).all()
    out = tmp_path / "out.csv"
    write_result(result, out)  # no input text: epoch seconds are written as ISO 8601 UTC
    row = out.read_text().splitlines()[70].split(",")
    assert row[0] == "2001-09-09T01:46:53.800Z" and row[1] == "" and row[-1] == "insufficient"


def smoothed_copy(path: Path, smoothing: int) -> Bundle:
    bundle = load_bundle(path)
    meta = bundle.metadata.model_copy(update={"score": ScoreSpec(smoothing=smoothing)})
    return bundle_from_bytes(embed_metadata(bundle.data, meta))


def test_replay_reports_the_smoothed_score_the_detector_compares() -> None:
    bundle = smoothed_copy(INT8, 40)
    meta = bundle.metadata
    data = normal_data(INT8, 300)
    data[150, 2] += 10 * meta.normalisation.scale[2]  # one bad sample: a short burst of high window scores
    times = 0.2 * np.arange(len(data))
    result = replay(bundle, times, data)
    scored = result.status == "scored"
    np.testing.assert_allclose(result.score[scored], rolling_mean(result.raw_score[scored], 40))
    # the burst is above the threshold window by window, but not on average over 40 windows: no anomaly, and
    # no row whose reported score is above the threshold while the flag says normal
    assert (result.raw_score[scored] > result.threshold).any() and not result.anomaly.any()
    assert not ((result.score > result.threshold) & (result.anomaly == 0)).any()


def test_replay_applies_a_configs_overrides() -> None:
    bundle = load_bundle(INT8)
    data = normal_data(INT8, 200)
    data[100:110, 1] += 10 * bundle.metadata.normalisation.scale[1]
    times = 0.2 * np.arange(len(data))
    default = replay(bundle, times, data, min_duration=0)
    held = replay(bundle, times, data, min_duration=10)
    assert default.anomaly.any() and held.anomaly.sum() >= 10 / 0.2 > default.anomaly.sum()
    high = replay(bundle, times, data, threshold=1e6)
    assert high.threshold == 1e6 and not high.anomaly.any()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty file"),
        ("datetime,a\n", "only a header row"),
        ("datetime,a\n2026-01-01 00:00:00,1\nyesterday,2\n", ":3: 'yesterday' in column 'datetime' is not a timestamp"),
        ("a,b\nx,2\n", "'x' in column 'a' is not a timestamp"),  # no time column: the first one is not one either
    ],
)
def test_read_table_errors_name_the_file_and_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "in.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"^{path}.*{re.escape(message)}") as err:
        read_table(path)
    assert "\n" not in str(err.value)


def test_read_table_refuses_text_only_in_columns_a_model_reads(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("\ufeffts;a;state\n1;1,5;RUNNING\n2;;RUNNING\n3;2.5;STOPPED\n")  # BOM, decimal commas
    table = read_table(path)
    assert table.time_column == "ts" and table.columns == ("a", "state")
    with pytest.raises(ValueError, match=f"^{path}:2: column 'a': '1,5' is not a number"):
        table.select(["a"])
    with pytest.raises(ValueError, match="no column 'b'; it has a, state"):
        table.select(["b"])
    path.write_text("ts;a;state\n1;1.5;RUNNING\n2;;RUNNING\n")
    assert np.isnan(read_table(path).select(["a"])[1, 0])  # an empty cell is missing data, not an error


def test_replay_refuses_timestamps_that_go_back() -> None:
    bundle = load_bundle(INT8)
    with pytest.raises(ValueError, match="data row 3 is not later than data row 2"):
        replay(bundle, np.array([0.0, 1.0, 1.0, 2.0]), normal_data(INT8, 4))
    with pytest.raises(ValueError, match="cannot calibrate on the first 50 rows of 4"):
        replay(bundle, np.arange(4.0), normal_data(INT8, 4), calibrate_rows=50)


class _Raw:
    """A scorer stand-in whose window scores are given: the monitor's wiring is under test, not the model."""

    def __init__(self, scores: list[float], n_inputs: int) -> None:
        self.scores, self.n = iter(scores), n_inputs

    def score(self, values: np.ndarray, good: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.array([next(self.scores)]), np.full((1, self.n), 1.0 / self.n)


def test_monitor_publishes_the_smoothed_score_with_its_severity(tmp_path: Path) -> None:
    bundle = smoothed_copy(INT8, 3)
    path = tmp_path / "smooth.tflite"
    save_bundle(bundle, path)
    section = ModelSection(name="pump", file=path)
    buffers = Buffers(retention=60.0, max_samples=1000)
    buffers.register(tuple(bundle.metadata.inputs), 0.2)
    published: list[Score] = []
    events: list[AnomalyEvent] = []
    monitor = ModelMonitor(
        LoadedModel(section, bundle), buffers, events.append, agent="a", site="s", on_score=published.append
    )
    thr = monitor.threshold
    raw = [0.5 * thr, 0.5 * thr, 3.5 * thr, float("nan"), 0.5 * thr]
    monitor.scorer = _Raw(raw, len(monitor.inputs))  # type: ignore[assignment]
    for k in range(len(raw)):
        monitor.step(100.0 + 0.2 * k)
    got = [p.score for p in published]
    # the mean of the last 3 scored windows (an unscored one is skipped, as the detector skips it)
    assert got[:3] == pytest.approx([0.5 * thr, 0.5 * thr, 1.5 * thr]) and got[3] is None
    assert got[4] == pytest.approx(1.5 * thr) and monitor.last_score == pytest.approx(1.5 * thr)
    assert [e.type for e in events] == [EventType.START] and events[0].score == pytest.approx(1.5 * thr)
    doc = score_payload(published[2], agent="a", site="s")
    jsonschema.validate(doc, load_schema("score"))
    assert doc["ratio"] == pytest.approx(1.5) and doc["severity"] == "major"
    low = score_payload(published[0], agent="a", site="s")
    assert low["severity"] is None and low["ratio"] == pytest.approx(0.5)
    missing = score_payload(published[3], agent="a", site="s")
    jsonschema.validate(missing, load_schema("score"))
    assert missing["ratio"] is None and missing["severity"] is None
    assert list(doc)[-1] == "historical"  # mark_historical swaps the tail bytes


# ---------------------------------------------------------------- startup calibration and save_to

TAGS = "\n".join(
    f"      - {{name: {t}, address: '{40001 + 2 * i}', type: float32}}"
    for i, t in enumerate(load_bundle(INT8).metadata.inputs)
)


def startup_config(tmp_path: Path, saved: Path) -> Config:
    path = tmp_path / "agent.yaml"
    path.write_text(
        "devices:\n  - name: plc\n    type: modbus\n    host: 127.0.0.1\n    tags:\n"
        + TAGS
        + f"\nmodels:\n  - name: pump\n    file: {INT8}\n"
        + f"    calibrate: {{mode: startup, samples: 100, save_to: {saved}}}\n"
    )
    return load_config(path)


def test_save_to_is_reused_only_when_calibrated_from_the_configured_bundle(tmp_path: Path) -> None:
    saved = tmp_path / "calibrated.tflite"
    cfg = startup_config(tmp_path, saved)
    (first,) = load_models(cfg)
    assert first.calibrate and first.bundle.sha256 == load_bundle(INT8).sha256 and not first.stale
    assert first.describe() == f"{INT8}, calibrated at startup and saved to {saved}"

    mine = calibrate(load_bundle(INT8), normal_data(INT8, 200), source="test")
    assert mine.metadata.threshold.base_sha256 == load_bundle(INT8).sha256
    save_bundle(mine, saved)
    (again,) = load_models(cfg)
    assert not again.calibrate and again.bundle.sha256 == mine.sha256
    assert again.describe() == f"{saved} (the startup calibration of {INT8} saved earlier)"


@pytest.mark.parametrize(
    ("left_behind", "why"),
    [
        ("other", "was calibrated from sha256 "),  # another model's (or an older version's) calibration
        ("old", "does not record which bundle it was calibrated from"),  # written before base_sha256 existed
        ("junk", "not a TFLite model"),
    ],
)
def test_a_stale_save_to_is_recalibrated_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, left_behind: str, why: str
) -> None:
    saved = tmp_path / "calibrated.tflite"
    if left_behind == "other":
        save_bundle(calibrate(load_bundle(F32), normal_data(F32, 200), source="test"), saved)
    elif left_behind == "old":
        saved.write_bytes(INT8.read_bytes())  # loads (base_sha256 defaults to ''), but says nothing of its origin
        assert load_bundle(saved).metadata.threshold.base_sha256 == ""
    else:
        saved.write_bytes(b"garbage")
    (model,) = load_models(startup_config(tmp_path, saved))
    assert model.calibrate and model.bundle.sha256 == load_bundle(INT8).sha256
    assert why in model.stale and why in model.describe() and "calibrated at startup" in model.describe()
    buffers = Buffers(retention=60.0, max_samples=1000)
    with caplog.at_level(logging.WARNING, logger="edge_agent.scoring.monitor"):
        monitor = ModelMonitor(model, buffers, lambda e: None, agent="a", site="s")
    assert monitor.calibrating and monitor.bundle.sha256 == load_bundle(INT8).sha256
    assert any("recalibrating" in r.getMessage() and why in r.getMessage() for r in caplog.records)
