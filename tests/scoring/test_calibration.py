"""Calibration options (threshold only, robust scaling, threshold floor) and opt-in drift adaptation."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from edge_agent.buffers import Buffers
from edge_agent.config import CalibrateMode, ModelAdaptation, ModelCalibration, ModelSection, parse_config
from edge_agent.errors import ConfigError
from edge_agent.records import decode_event, encode, event_payload, load_schema
from edge_agent.scoring.adapt import Adapter
from edge_agent.scoring.bundle import Bundle, Normalisation, load_bundle
from edge_agent.scoring.calibrate import calibrate, fit_normalisation
from edge_agent.scoring.monitor import LoadedModel, ModelMonitor
from edge_agent.scoring.replay import replay
from edge_agent.scoring.tflite_metadata import read_metadata_bytes
from edge_agent.types import AnomalyEvent, EventType, SampleBatch

INT8 = Path(__file__).parents[1] / "fixtures" / "pump-i8.tflite"


def bundle() -> Bundle:
    return load_bundle(INT8)


def normal(rows: int, seed: int = 0, spread: float = 0.5) -> np.ndarray:
    """Rows around the bundle's own normalisation (what it was trained on), `spread` of its scale."""
    norm = bundle().metadata.normalisation
    rng = np.random.default_rng(seed)
    return np.asarray(norm.mean) + np.asarray(norm.scale) * spread * rng.standard_normal((rows, len(norm.mean)))


def stored_json(b: Bundle) -> dict[str, object]:
    raw = read_metadata_bytes(b.data, "edge_agent")
    assert raw is not None
    return json.loads(raw)


# ---------------------------------------------------------------- threshold only, scaling, floor


def test_threshold_only_keeps_the_bundles_normalisation() -> None:
    base = bundle()
    data = normal(300) * 1.3 + 0.2  # another machine: its own levels and spread
    full = calibrate(base, data, source="full")
    kept = calibrate(base, data, source="kept", what="threshold")
    assert kept.metadata.normalisation == base.metadata.normalisation
    assert full.metadata.normalisation != base.metadata.normalisation
    t = kept.metadata.threshold
    assert t.calibrated == "threshold" and t.base_sha256 == base.sha256 and t.rows == 300
    assert t.value != full.metadata.threshold.value  # scored in the bundle's coordinates, not the data's
    assert stored_json(kept)["threshold"]["calibrated"] == "threshold"  # type: ignore[index]
    # the same through replay, as `replay --calibrate-rows N --threshold-only`
    times = np.arange(400, dtype=np.float64) * base.metadata.sample_interval
    result = replay(base, times, normal(400, seed=1), calibrate_rows=300, calibrate_what="threshold")
    assert result.bundle.metadata.normalisation == base.metadata.normalisation
    with pytest.raises(ValueError, match="threshold"):
        calibrate(base, data, what="normalisation")


def test_bundles_made_as_before_do_not_carry_the_new_fields() -> None:
    """A default calibration writes the metadata it wrote before these options: a rebuild keeps its sha256."""
    b = calibrate(bundle(), normal(300), source="x")
    meta = stored_json(b)
    assert "scaling" not in meta["normalisation"]  # type: ignore[operator]
    assert "calibrated" not in meta["threshold"] and "floor" not in meta["threshold"]  # type: ignore[operator]
    assert b.metadata.normalisation.scaling == "standard" and b.metadata.threshold.calibrated == "all"


def test_robust_scaling_is_not_set_by_one_noisy_sensor() -> None:
    rng = np.random.default_rng(3)
    n = 2000
    data = rng.standard_normal((n, 4)) * [1.0, 2.0, 1.0, 1.0] + [10.0, -5.0, 3.0, 50.0]
    spikes = rng.choice(n, size=n // 50, replace=False)
    data[spikes, 0] += 200.0  # 2 % of the rows: a sensor with dropouts/spikes
    data[:, 2] = np.where(rng.random(n) < 0.8, 3.0, 3.5)  # quantised: two values, IQR 0
    data[:, 3] = 50.0  # flat
    _, std = fit_normalisation(data)
    centre, robust = fit_normalisation(data, scaling="robust")
    assert std[0] > 10  # the spikes set the standard deviation…
    assert robust[0] == pytest.approx(1.0, rel=0.15) and centre[0] == pytest.approx(10.0, abs=0.1)  # …not the IQR
    assert robust[1] == pytest.approx(2.0, rel=0.1)  # a clean sensor: the same as σ
    assert std[2] <= robust[2] <= 1.25 * std[2]  # quantised: the winsorised σ, not IQR × 0.7413 = 0
    assert robust[3] == pytest.approx(0.5)  # flat: the floor, 1 % of its level
    with pytest.raises(ValueError, match="scaling"):
        fit_normalisation(data, scaling="minmax")


def test_robust_scaling_is_recorded_and_followed_by_recalibration() -> None:
    b = calibrate(bundle(), normal(300), scaling="robust", source="x")
    assert b.metadata.normalisation.scaling == "robust"
    assert stored_json(b)["normalisation"]["scaling"] == "robust"  # type: ignore[index]
    again = calibrate(b, normal(300, seed=5), source="y")  # no scaling given: the bundle's
    assert again.metadata.normalisation.scaling == "robust"
    assert calibrate(b, normal(300), scaling="standard").metadata.normalisation.scaling == "standard"
    # a bundle of a newer agent with a method this one does not know still loads and scores
    assert Normalisation(mean=[0.0], scale=[1.0], scaling="future").scaling == "future"


def test_threshold_floor_is_a_multiple_of_the_bundles_threshold() -> None:
    base = bundle()
    quiet = normal(300, spread=0.05)  # a calm stretch: far lower scores than the model was made with
    low = calibrate(base, quiet).metadata.threshold
    floored = calibrate(base, quiet, floor=1.0).metadata.threshold
    assert low.value < base.metadata.threshold.value
    assert floored.value == pytest.approx(base.metadata.threshold.value, rel=1e-5)
    assert floored.floor == pytest.approx(base.metadata.threshold.value, rel=1e-5)  # kept for later calibrations
    loud = calibrate(base, normal(300, spread=3.0), floor=0.1).metadata.threshold
    assert loud.value > 0.1 * base.metadata.threshold.value  # the floor only ever raises it
    with pytest.raises(ValueError, match="floor"):
        calibrate(base, quiet, floor=float("nan"))


# ---------------------------------------------------------------- drift adaptation


def test_adapter_follows_a_ramp_and_ignores_high_scores() -> None:
    spec = ModelAdaptation(rate=0.1, below=0.5, max_shift=100)
    a = Adapter(("x", "y"), [0.0, 0.0], [1.0, 2.0], spec, "m")
    good = np.ones((4, 2), dtype=bool)
    for k in range(200):  # x ramps to 2 scales; y stays
        level = np.array([2.0 * k / 199, 0.0], dtype=np.float32)
        a.update(np.tile(level, (4, 1)), good, score=0.1, threshold=1.0, open_=False)
    assert a.centre[0] == pytest.approx(2.0, abs=0.2) and a.centre[1] == 0.0
    assert a.windows == 200 and a.shift == pytest.approx(a.centre[0]) and a.tag == "x"
    before = a.centre.copy()
    step = np.tile(np.array([9.0, 9.0], dtype=np.float32), (4, 1))
    assert a.update(step, good, score=0.6, threshold=1.0, open_=False) is None  # not well below the threshold
    assert a.update(step, good, score=0.1, threshold=1.0, open_=True) is None  # an anomaly is open
    assert a.update(step, good, score=float("nan"), threshold=1.0, open_=False) is None  # not scored
    partial = good.copy()
    partial[:, 1] = False  # no good value of y: y keeps its centre
    a.update(step, partial, score=0.1, threshold=1.0, open_=False)
    assert a.centre[1] == before[1] and a.centre[0] > before[0]


def test_adapter_stops_at_its_bound_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    a = Adapter(("x",), [0.0], [0.5], ModelAdaptation(rate=0.1, max_shift=2.0), "pump")
    good = np.ones((2, 1), dtype=bool)
    with caplog.at_level(logging.WARNING, logger="edge_agent.scoring.adapt"):
        for _ in range(20):  # towards 10 scales: 1.0, 1.9, then 2.71 > 2 (clipped to 2, and stop)
            a.update(np.full((2, 1), 5.0, dtype=np.float32), good, 0.0, 1.0, False)
    assert a.stopped and a.centre[0] == pytest.approx(1.0)  # 2 scales of 0.5
    assert a.state() == {"windows": a.windows, "shift": 2.0, "tag": "x", "max_shift": 2.0, "stopped": True}
    assert a.windows == 3  # nothing learnt after it stopped
    assert [r.getMessage() for r in caplog.records if "stopped" in r.getMessage()] == [
        "model pump: drift adaptation stopped after 3 windows: x moved 2.71 scales from its calibration "
        "(max_shift 2); recalibrate the model on recent normal operation"
    ]


def drifting(rows: int, ramp_scales: float, step_at: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Normal rows with tag 5 (bearing temperature) ramping slowly, optionally a step fault on tag 2 (flow)."""
    b = bundle()
    norm = b.metadata.normalisation
    data = normal(rows, seed=7, spread=0.3)
    data[:, 5] += np.linspace(0.0, ramp_scales, rows) * norm.scale[5]
    if step_at is not None:
        data[step_at:, 2] -= 8.0 * norm.scale[2]
    return np.arange(rows, dtype=np.float64) * b.metadata.sample_interval, data


def test_replay_adaptation_follows_slow_drift_but_not_a_step_fault() -> None:
    b = bundle()
    times, data = drifting(3000, ramp_scales=6.0)
    still = replay(b, times, data)
    adapted = replay(b, times, data, adapt=ModelAdaptation(rate=0.05, max_shift=20))
    tail = slice(2000, None)
    assert still.anomaly[tail].mean() > 0.9  # the drift alone is an alarm without adaptation
    assert adapted.anomaly[tail].mean() < 0.05
    assert adapted.adaptation is not None and adapted.adaptation["tag"] == "pump.bearing_temp"
    assert 4.0 < float(adapted.adaptation["shift"]) < 6.5 and not adapted.adaptation["stopped"]
    assert still.adaptation is None

    times, data = drifting(3000, ramp_scales=6.0, step_at=2500)
    faulty = replay(b, times, data, adapt=ModelAdaptation(rate=0.05, max_shift=20))
    assert faulty.anomaly[2520:].mean() > 0.95  # the step is an alarm, and stays one: it is never learnt
    assert faulty.adaptation is not None and int(faulty.adaptation["windows"]) < 2500


def test_replay_adaptation_stops_at_max_shift_and_the_drift_alarms_again() -> None:
    b = bundle()
    times, data = drifting(3000, ramp_scales=8.0)
    r = replay(b, times, data, adapt=ModelAdaptation(rate=0.05, max_shift=2.0))
    assert r.adaptation is not None and r.adaptation["stopped"] and r.adaptation["shift"] == pytest.approx(2.0)
    assert r.anomaly[2500:].mean() > 0.9


def test_monitor_events_carry_the_adaptation_state_and_stats_count_it() -> None:
    b = bundle()
    meta = b.metadata
    section = ModelSection(name="pump", file=INT8, adapt=ModelAdaptation(rate=0.05, max_shift=20))
    buffers = Buffers(retention=600.0, max_samples=5000)
    tags = tuple(meta.inputs)
    buffers.register(tags, meta.sample_interval)
    events: list[AnomalyEvent] = []
    monitor = ModelMonitor(LoadedModel(section, b), buffers, events.append, agent="a", site="s")
    times, data = drifting(1200, ramp_scales=3.0, step_at=1000)
    quality = np.zeros(len(tags), dtype=np.uint8)
    for i, (t, row) in enumerate(zip(times, data, strict=True)):
        buffers.write(SampleBatch("plc", float(t), tags, row, quality))
        if i >= meta.window:
            monitor.step(float(t))
    stats = monitor.stats()
    assert stats.windows_adapted > 900 and 1.0 < stats.adapt_shift < 3.5 and not stats.adapt_stopped
    starts = [e for e in events if e.type is EventType.START]
    assert starts and starts[0].window_end >= times[1000]  # the drift before the step raised no alarm
    state = starts[0].adaptation
    assert state is not None and state["windows"] == stats.windows_adapted  # nothing learnt after the start
    payload = event_payload(starts[0])
    jsonschema.validate(payload, load_schema("event"))
    assert list(payload)[-1] == "historical" and payload["adaptation"]["tag"] == "pump.bearing_temp"
    assert decode_event(encode(payload)).adaptation == payload["adaptation"]
    # a model without adaptation: no field (older consumers see the payload they know)
    plain = event_payload(dataclasses.replace(starts[0], adaptation=None))
    assert "adaptation" not in plain
    jsonschema.validate(plain, load_schema("event"))


CONFIG = """devices:
  - name: plc
    type: modbus
    host: 127.0.0.1
    tags:
      - {name: a, address: "40001"}
models:
  - name: m
    file: x.tflite
    adapt:
      rate: RATE
      below: 0.5
"""


@pytest.mark.parametrize(
    ("rate", "line", "message"),
    [
        ("2", 11, "models[0].adapt.rate"),
        ("0", 11, "models[0].adapt.rate"),
        ("fast", 11, "models[0].adapt.rate"),
    ],
)
def test_bad_adapt_options_name_file_line_and_field(rate: str, line: int, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(CONFIG.replace("RATE", rate), source="c.yaml")
    lines = [str(i) for i in err.value.issues]
    assert any(ln.startswith(f"c.yaml:{line}: {message}") for ln in lines), lines


def test_unknown_adapt_key_and_good_adapt_section() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(CONFIG.replace("RATE", "0.02").replace("below: 0.5", "speed: 3"), source="c.yaml")
    assert any(str(i).startswith("c.yaml:12: models[0].adapt.speed") for i in err.value.issues), err.value.issues
    cfg = parse_config(CONFIG.replace("RATE", "0.02"), source="c.yaml")
    assert cfg.models[0].adapt == ModelAdaptation(rate=0.02, below=0.5)
    assert parse_config(CONFIG.split("    adapt:")[0], source="c.yaml").models[0].adapt is None


def write_csv(path: Path, times: np.ndarray, data: np.ndarray) -> None:
    names = bundle().metadata.inputs
    rows = [",".join(["time", *names])] + [
        ",".join([f"{t:.3f}", *(f"{v:.6g}" for v in row)]) for t, row in zip(times, data, strict=True)
    ]
    path.write_text("\n".join(rows) + "\n")


def test_cli_threshold_only_scaling_and_adapt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edge_agent.cli import main

    times, data = drifting(1500, ramp_scales=6.0)
    csv = tmp_path / "run.csv"
    write_csv(csv, times, data)
    out = tmp_path / "kept.tflite"
    assert (
        main(
            [
                "calibrate",
                "--model",
                str(INT8),
                "--csv",
                str(csv),
                "--rows",
                "300",
                "--threshold-only",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "the bundle's normalisation kept" in capsys.readouterr().out
    assert load_bundle(out).metadata.normalisation == bundle().metadata.normalisation
    robust = tmp_path / "robust.tflite"
    args = ["calibrate", "--model", str(INT8), "--csv", str(csv), "--rows", "300", "--scaling", "robust"]
    assert main([*args, "--threshold-floor", "2", "--out", str(robust)]) == 0
    made = load_bundle(robust).metadata
    assert made.normalisation.scaling == "robust"
    assert made.threshold.floor == pytest.approx(2 * bundle().metadata.threshold.value, rel=1e-5)  # kept
    assert made.threshold.value >= 2 * bundle().metadata.threshold.value * (1 - 1e-5)
    capsys.readouterr()
    assert main(["model", "inspect", str(robust)]) == 0
    shown = capsys.readouterr().out
    assert f"never below {made.threshold.floor:.6g} (floor)" in shown and "inputs (scaling robust)" in shown
    assert main(["model", "inspect", str(out)]) == 0
    assert "threshold only (normalisation kept)" in capsys.readouterr().out

    assert main(["replay", str(csv), "--model", str(INT8), "--adapt", "--adapt-max-shift", "20"]) == 0
    text = capsys.readouterr().out
    assert "windows adapted, largest shift" in text and "(pump.bearing_temp)" in text and "stopped" not in text
    with pytest.raises(SystemExit) as exc:
        main(["replay", str(csv), "--model", str(INT8), "--adapt", "--adapt-rate", "2"])
    assert exc.value.code == 2 and "at most 0.5" in capsys.readouterr().err


async def test_startup_calibration_takes_the_calibrate_sections_options(monkeypatch: pytest.MonkeyPatch) -> None:
    b = bundle()
    meta = b.metadata
    section = ModelSection(
        name="pump",
        file=INT8,
        calibrate=ModelCalibration(mode=CalibrateMode.STARTUP, samples=200, threshold_only=True, threshold_floor=1.5),
    )
    buffers = Buffers(retention=600.0, max_samples=5000)
    tags = tuple(meta.inputs)
    buffers.register(tags, meta.sample_interval)
    now = time.time()
    data = normal(400, seed=11) * 1.2
    quality = np.zeros(len(tags), dtype=np.uint8)
    for k, row in enumerate(data):  # the last 80 s of operation, already in the buffers
        buffers.write(SampleBatch("plc", now - (len(data) - k) * meta.sample_interval, tags, row, quality))

    async def no_wait(_: float) -> None:  # the samples are there: calibration need not wait for them
        return None

    monitor = ModelMonitor(LoadedModel(section, b, calibrate=True), buffers, lambda e: None, agent="a", site="s")
    monkeypatch.setattr("edge_agent.scoring.monitor.asyncio.sleep", no_wait)  # asyncio's own, restored after
    await monitor._calibrate()
    made = monitor.bundle.metadata
    assert not monitor.calibrating and monitor.bundle.sha256 != b.sha256
    assert made.normalisation == meta.normalisation and made.threshold.calibrated == "threshold"
    assert made.threshold.floor == pytest.approx(1.5 * meta.threshold.value, rel=1e-5)
    assert monitor.threshold >= 1.5 * meta.threshold.value * (1 - 1e-5)
