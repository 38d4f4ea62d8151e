"""The scoring commands as a user runs them: model inspect, calibrate, replay."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.scoring.base import SCORERS
from edge_agent.scoring.bundle import ScoreSpec, embed_metadata, load_bundle

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


def test_inspect_and_replay_refuse_an_unknown_model_kind_in_one_line(tmp_path: Path) -> None:
    shipped = load_bundle(MODEL)
    meta = shipped.metadata.model_copy(update={"score": ScoreSpec(kind="lstm_ae")})
    bad = tmp_path / "lstm.tflite"
    bad.write_bytes(embed_metadata(shipped.data, meta))
    for args in (("model", "inspect", str(bad)), ("replay", str(tmp_path / "any.csv"), "--model", str(bad))):
        r = cli(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)
        (line,) = r.stderr.strip().splitlines()
        known = ", ".join(sorted(SCORERS))
        assert line.endswith(f"{bad}: unknown model kind 'lstm_ae' (score.kind); this agent knows {known}")


def test_replay_flags_the_fault_and_writes_one_row_per_input(plant_csv: tuple[Path, Path], tmp_path: Path) -> None:
    _, faulty = plant_csv
    out, png = tmp_path / "out.csv", tmp_path / "out.png"
    r = cli(
        "replay", str(faulty), "--model", str(MODEL), "--calibrate-rows", "500", "--out", str(out), "--plot", str(png)
    )
    assert r.returncode == 0, r.stderr
    rows = out.read_text().splitlines()
    src = faulty.read_text().splitlines()
    assert len(rows) == len(src) and rows[0] == "datetime,score,threshold,anomaly,raw_score,status"
    assert [x.split(",")[0] for x in rows] == [x.split(",")[0] for x in src]  # joins back on the timestamp text
    assert {x.split(",")[5] for x in rows[1:16]} == {"warmup"} and rows[16].endswith(",scored")
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


def test_calibrated_bundle_records_its_base(tmp_path: Path, plant_csv: tuple[Path, Path]) -> None:
    normal, _ = plant_csv
    out = tmp_path / "mine.tflite"
    assert cli("calibrate", "--model", str(MODEL), "--csv", str(normal), "--out", str(out)).returncode == 0
    assert load_bundle(out).metadata.threshold.base_sha256 == load_bundle(MODEL).sha256
    text = cli("model", "inspect", str(out)).stdout
    assert f"calibrated from sha256 {load_bundle(MODEL).sha256[:12]}" in text


def test_check_says_which_file_will_score(tmp_path: Path, plant_csv: tuple[Path, Path]) -> None:
    normal, _ = plant_csv
    saved = tmp_path / "calibrated.tflite"
    config = tmp_path / "sim.yaml"
    example = (ROOT / "examples" / "simulator.yaml").read_text()
    config.write_text(
        example.replace("../models/", f"{ROOT}/models/").replace(
            "    hysteresis: {exit_ratio: 0.8, min_duration: 5s}",
            f"    calibrate: {{mode: startup, samples: 100, save_to: {saved}}}",
        )
    )
    r = cli("check", str(config))
    assert r.returncode == 0, r.stderr
    assert f"model pump-skid: {MODEL}, calibrated at startup and saved to {saved}" in r.stdout
    assert cli("calibrate", "--model", str(MODEL), "--csv", str(normal), "--out", str(saved)).returncode == 0
    r = cli("check", str(config))
    assert f"model pump-skid: {saved} (the startup calibration of {MODEL} saved earlier)" in r.stdout
    # a save_to written from another bundle (here: the SKAB model's own file) is not used in its place
    saved.write_bytes((ROOT / "models" / "skab" / "skab-pump-ae.tflite").read_bytes())
    r = cli("check", str(config))
    assert r.returncode == 0, r.stderr
    assert f"model pump-skid: {MODEL}, calibrated at startup" in r.stdout
    assert "not reusing the saved file" in r.stdout and "does not record which bundle" in r.stdout


def test_replay_takes_a_configs_overrides(plant_csv: tuple[Path, Path], tmp_path: Path) -> None:
    _, faulty = plant_csv
    out = tmp_path / "out.csv"

    def anomaly_rows(*extra: str) -> tuple[int, set[str]]:
        r = cli("replay", str(faulty), "--model", str(MODEL), "--calibrate-rows", "500", "--out", str(out), *extra)
        assert r.returncode == 0, r.stderr
        rows = [x.split(",") for x in out.read_text().splitlines()[1:]]
        return sum(int(x[3]) for x in rows), {x[2] for x in rows}

    base, _ = anomaly_rows()
    held, _ = anomaly_rows("--min-duration", "2m", "--exit-ratio", "0.5")
    never, thresholds = anomaly_rows("--threshold", "1e6")
    assert 0 < base < held and never == 0 and thresholds == {"1e+06"}
    r = cli("replay", str(faulty), "--model", str(MODEL), "--exit-ratio", "1.5")
    assert r.returncode == 2 and "an exit ratio is a number above 0 and at most 1" in r.stderr


def test_missing_files_are_one_line_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.csv"
    for args in (
        ("calibrate", "--model", str(MODEL), "--csv", str(missing), "--out", str(tmp_path / "x.tflite")),
        ("train", str(missing), "--out", str(tmp_path / "x.tflite"), "--name", "x"),
        ("replay", str(missing), "--model", str(MODEL)),
    ):
        r = cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.strip().splitlines() == [f"{args[0]}: {missing}: cannot read it: No such file or directory"]


HEADER = "datetime,pump.suction_pressure,pump.discharge_pressure,pump.flow,pump.motor_current,pump.vibration_rms,"
HEADER += "pump.bearing_temp,pump.fluid_temp,pump.valve_position"
ROW = ",1.5,6.0,40.3,30.1,2.5,55.0,24.9,100.0"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty file (a CSV needs a header row and data rows)"),
        (HEADER + "\n", "only a header row, no data"),
        ("time_of_day" + HEADER[8:] + "\n10:14" + ROW + "\n", ":2: '10:14' in column 'time_of_day' is not a timestamp"),
        (HEADER + "\n2020-03-09 10:14:33" + ROW.replace("40.3", "n/a") + "\n", ":2: column 'pump.flow': 'n/a' is not"),
        (HEADER.replace(",pump.flow", ",flow") + "\n2020-03-09 10:14:33" + ROW + "\n", ": no column 'pump.flow'"),
        (
            HEADER + "\n2020-03-09 10:14:33" + ROW + "\n2020-03-09 10:14:32" + ROW + "\n",
            ": timestamps must increase, but data row 2 is not later than data row 1",
        ),
        (HEADER + "\n2020-03-09 10:14:33" + ROW + "\n", ": cannot calibrate on the first 400 rows of 1"),
    ],
)
def test_replay_of_a_bad_csv_is_a_one_line_error(tmp_path: Path, text: str, message: str) -> None:
    data = tmp_path / "bad.csv"
    data.write_text(text)
    r = cli("replay", str(data), "--model", str(MODEL), "--calibrate-rows", "400")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"replay: {data}") and message in line, line


def test_replay_output_that_cannot_be_written_is_an_error(plant_csv: tuple[Path, Path], tmp_path: Path) -> None:
    _, faulty = plant_csv
    out = tmp_path / "no" / "such" / "dir" / "out.csv"
    r = cli("replay", str(faulty), "--model", str(MODEL), "--out", str(out))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"replay: {out}: cannot write it: No such file or directory"


def test_replay_out_csv_shows_the_score_the_detector_compares(plant_csv: tuple[Path, Path], tmp_path: Path) -> None:
    _, faulty = plant_csv
    shipped = load_bundle(MODEL)
    smooth = tmp_path / "smooth.tflite"
    meta = shipped.metadata.model_copy(update={"score": ScoreSpec(smoothing=8)})
    smooth.write_bytes(embed_metadata(shipped.data, meta))
    out = tmp_path / "out.csv"
    r = cli("replay", str(faulty), "--model", str(smooth), "--calibrate-rows", "500", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = [x.split(",") for x in out.read_text().splitlines()[1:]]
    scored = [(float(x[1]), float(x[2]), int(x[3]), float(x[4])) for x in rows if x[5] == "scored"]
    assert any(a for _, _, a, _ in scored)
    # with smoothing 8 a row's raw score can be above the threshold while the flag says normal, its score cannot
    assert not [x for x in scored if x[0] > x[1] and x[2] == 0]
    assert any(abs(s - raw) > 1e-3 * s for s, _, _, raw in scored)


def test_a_model_the_runtime_refuses_is_a_one_line_error(plant_csv: tuple[Path, Path], tmp_path: Path) -> None:
    """Metadata that disagrees with the tensors is found when the runtime loads the model: still no traceback."""
    from edge_agent.scoring.bundle import embed_metadata, load_bundle

    base = load_bundle(MODEL)
    meta = base.metadata
    three = meta.model_copy(
        update={
            "inputs": meta.inputs[:3],
            "normalisation": meta.normalisation.model_copy(
                update={"mean": meta.normalisation.mean[:3], "scale": meta.normalisation.scale[:3]}
            ),
        }
    )
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(embed_metadata(base.data, three))
    normal, _ = plant_csv
    for args in (
        ("replay", str(normal), "--model", str(bad)),
        ("calibrate", "--model", str(bad), "--csv", str(normal), "--out", str(tmp_path / "x.tflite")),
    ):
        r = cli(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)
        assert "do not match the metadata's window × inputs" in r.stderr.strip().splitlines()[-1]


def test_calibration_save_to_is_next_to_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_agent.config import load_config

    config = tmp_path / "sim.yaml"
    example = (ROOT / "examples" / "simulator.yaml").read_text()
    config.write_text(
        example.replace("../models/", f"{ROOT}/models/").replace(
            "    hysteresis: {exit_ratio: 0.8, min_duration: 5s}",
            "    calibrate: {mode: startup, samples: 100, save_to: calibrated.tflite}",
        )
    )
    monkeypatch.chdir("/")
    assert load_config(config).models[0].calibrate.save_to == tmp_path / "calibrated.tflite"


def test_a_wide_text_column_costs_no_more_than_its_text(tmp_path: Path) -> None:
    """A free-text column must not widen every cell of the table (one numpy text array did: ~20 kB a cell)."""
    import tracemalloc

    from edge_agent.scoring.replay import read_table

    data = tmp_path / "notes.csv"
    rows = [f"2020-03-09 10:{i // 60:02d}:{i % 60:02d}{ROW},{'x' * 2000 if i == 7 else ''}" for i in range(2000)]
    data.write_text(HEADER + ",note\n" + "\n".join(rows) + "\n")
    tracemalloc.start()
    table = read_table(data)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert table.select(["pump.flow"])[:, 0].tolist() == [40.3] * 2000
    assert peak < 16 * 2**20, peak  # the old path held 2000 rows × 10 cells × 8 kB = 160 MB


CONV = ROOT / "models" / "pump-skid-conv.tflite"
# every kind shipped for the simulator, with what `model inspect` says of its score
KINDS = {
    "pump-skid-conv.tflite": "conv_reconstruction_mse (temporal convolutional autoencoder",
    "pump-skid-pca.tflite": "pca_t2q (PCA, score = max(T²/T²_limit, Q/Q_limit))",
    "pump-skid-ensemble.tflite": "ensemble (members side by side, score = max over members of score / member",
}


@pytest.mark.parametrize("name", sorted(KINDS))
def test_every_command_works_with_each_kind(name: str, plant_csv: tuple[Path, Path], tmp_path: Path) -> None:
    normal, faulty = plant_csv
    model = ROOT / "models" / name
    kind = load_bundle(model).metadata.score.kind
    r = cli("model", "inspect", str(model))
    assert r.returncode == 0, r.stderr
    assert f"score      {KINDS[name]}" in r.stdout
    assert "input      [1, 16, 8] int8" in r.stdout and "held-out" in r.stdout
    mine = tmp_path / "mine.tflite"
    r = cli("calibrate", "--model", str(model), "--csv", str(normal), "--rows", "600", "--out", str(mine))
    assert r.returncode == 0, r.stderr
    assert load_bundle(mine).metadata.score.kind == kind
    assert load_bundle(mine).metadata.threshold.base_sha256 == load_bundle(model).sha256
    out = tmp_path / "out.csv"
    for bundle in (model, mine):  # as shipped, and calibrated on this plant
        r = cli("replay", str(faulty), "--model", str(bundle), "--out", str(out))
        assert r.returncode == 0, r.stderr
        flags = [int(x.split(",")[3]) for x in out.read_text().splitlines()[1:]]
        truth = [int(x.split(",")[-1]) for x in faulty.read_text().splitlines()[1:]]
        assert sum(flags[:590]) == 0  # nothing before the fault starts (row 600 at 0.2 s)
        assert sum(f and t for f, t in zip(flags, truth, strict=True)) > 0.5 * sum(truth)


def test_train_help_gives_units_and_defaults_and_bad_options_are_one_line_errors(tmp_path: Path) -> None:
    r = cli("train", "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())  # argparse wraps lines
    for fragment in (
        "--kind KIND the model kind: conv_reconstruction_mse, ensemble, pca_t2q, reconstruction_mse",
        "default reconstruction_mse",
        "--holdout FRACTION",
        "(default 0.2;",
        "--sample-interval SECONDS",
        "samples per window (default 16)",
        "(default 0.99)",
        "--min-duration SECONDS",
    ):
        assert fragment in text, fragment
    assert "{default}" not in text  # every placeholder filled from TrainOptions
    normal = tmp_path / "n.csv"
    normal.write_text(HEADER + "\n2020-03-09 10:14:33" + ROW + "\n")
    for args, message in (
        (("--holdout", "1"), "argument --holdout: '1': a hold-out fraction is at least 0 and below 1"),
        (("--kind", "nope"), "argument --kind: invalid choice: 'nope'"),
    ):
        r = cli("train", str(normal), "--out", str(tmp_path / "x.tflite"), "--name", "x", *args)
        assert r.returncode == 2 and message in r.stderr, r.stderr


def test_inspect_shows_a_kinds_score_params_and_calibrate_keeps_them(tmp_path: Path) -> None:
    shipped = load_bundle(CONV)
    params = {"member_thresholds": [0.25, 1.5], "note": "x" * 200}
    meta = shipped.metadata.model_copy(update={"score": ScoreSpec(kind=shipped.metadata.score.kind, params=params)})
    path = tmp_path / "p.tflite"
    path.write_bytes(embed_metadata(shipped.data, meta))
    r = cli("model", "inspect", str(path))
    assert r.returncode == 0, r.stderr
    assert "    member_thresholds [0.25,1.5]\n" in r.stdout
    (note,) = [line for line in r.stdout.splitlines() if line.startswith("    note ")]
    assert note.endswith("…") and len(note) < 120  # one readable line, however long the value
    assert json.loads(cli("model", "inspect", str(path), "--json").stdout)["metadata"]["score"]["params"] == params
