"""`edge-agent replay` of many CSVs as a user runs it (a subprocess): outputs, totals, exit codes, what it imports."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_agent.scoring.bundle import load_bundle

ROOT = Path(__file__).parents[2]
MODEL = ROOT / "models" / "pump-skid-ae.tflite"
PROTOCOLS = ("asyncua", "pymodbus", "snap7", "paho", "serial", "edge_agent.drivers", "edge_agent.poller")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent", *args], capture_output=True, text=True, timeout=120)


def write_run(path: Path, rows: int, seed: int, *, push: slice | None = None, every: float | None = None) -> Path:
    """A CSV of the shipped model's inputs around its normal levels, `every` seconds apart (default: its interval)."""
    meta = load_bundle(MODEL).metadata
    rng = np.random.default_rng(seed)
    mean, scale = np.asarray(meta.normalisation.mean), np.asarray(meta.normalisation.scale)
    data = mean + 0.3 * scale * rng.standard_normal((rows, len(meta.inputs)))
    if push is not None:
        data[push, 2] += 15 * scale[2]
    step = every or meta.sample_interval
    start = dt.datetime(2026, 2, 1, tzinfo=dt.UTC)
    stamps = [(start + dt.timedelta(seconds=i * step)).isoformat() for i in range(rows)]
    path.write_text(
        "datetime,"
        + ",".join(meta.inputs)
        + "\n"
        + "".join(s + "," + ",".join(f"{v:.6g}" for v in r) + "\n" for s, r in zip(stamps, data, strict=True))
    )
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("runs")
    return [
        write_run(d / "quiet.csv", 500, 1),
        write_run(d / "fault.csv", 500, 2, push=slice(300, 380)),
        write_run(d / "other.csv", 300, 3),
    ]


def test_many_files_one_output_each_and_totals(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "scores"
    r = cli("replay", *map(str, runs), "--model", str(MODEL), "--calibrate-rows", "200", "--out-dir", str(out))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == len(runs) + 1
    for path, line in zip(runs, lines[:-1], strict=True):
        written = out / f"{path.stem}.replay.csv"
        assert line.startswith(f"{path}: ") and line.endswith(f" → {written}")
        rows = written.read_text().splitlines()
        assert rows[0] == "datetime,score,threshold,anomaly,raw_score,status"
        assert len(rows) == len(path.read_text().splitlines())
    flagged = {
        p.stem: sum(int(x.split(",")[3]) for x in (out / f"{p.stem}.replay.csv").read_text().splitlines()[1:])
        for p in runs
    }
    assert flagged["quiet"] == 0 and flagged["other"] == 0 and flagged["fault"] >= 70
    assert lines[-1] == f"3 files: 3 scored, 0 refused; 1300 rows, 1 anomalies covering {flagged['fault']} rows → {out}"


def test_a_refused_file_is_named_the_others_are_scored_and_the_exit_code_is_2(runs: list[Path], tmp_path: Path) -> None:
    slow = write_run(tmp_path / "slow.csv", 200, 4, every=1.0)  # 1 s rows for a 0.2 s model
    out = tmp_path / "scores"
    r = cli("replay", str(runs[0]), str(slow), "--model", str(MODEL), "--out-dir", str(out))
    assert r.returncode == 2
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("replay:")]
    assert line == (
        f"replay: {slow}: rows are 1 s apart (median of column 'datetime'), but the bundle samples every 0.2 s; "
        "resample the data, or --allow-spacing to score it anyway"
    )
    assert (out / "quiet.replay.csv").exists() and not (out / "slow.replay.csv").exists()
    assert r.stdout.strip().splitlines()[-1].startswith("2 files: 1 scored, 1 refused; 500 rows")
    r = cli("replay", str(slow), "--model", str(MODEL), "--allow-spacing", "--out", str(tmp_path / "slow.csv.out"))
    assert r.returncode == 0 and "replay: warning: " in r.stderr and "but the bundle samples every 0.2 s" in r.stderr


def test_one_output_file_or_plot_is_for_one_csv(runs: list[Path], tmp_path: Path) -> None:
    for option in ("--out", "--plot"):
        r = cli("replay", *map(str, runs[:2]), "--model", str(MODEL), option, str(tmp_path / "x"))
        assert r.returncode == 2
        assert r.stderr.strip() == f"replay: {option} names one file, for one CSV; with 2 use --out-dir DIR"


def test_a_csv_without_a_time_column_is_refused_and_can_be_spaced_by_hand(tmp_path: Path) -> None:
    meta = load_bundle(MODEL).metadata
    with_time = write_run(tmp_path / "t.csv", 100, 5).read_text().splitlines()
    bare = tmp_path / "bare.csv"
    bare.write_text("\n".join(x.split(",", 1)[1] for x in with_time) + "\n")
    r = cli("replay", str(bare), "--model", str(MODEL))
    assert r.returncode == 2 and r.stderr.startswith(f"replay: {bare}: no time column")
    out = tmp_path / "bare.out.csv"
    r = cli("replay", str(bare), "--model", str(MODEL), "--row-interval", str(meta.sample_interval), "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = out.read_text().splitlines()
    assert rows[0].startswith("row,score") and rows[1].startswith("1,") and rows[-1].startswith("100,")


def test_plot_without_matplotlib_is_refused_before_scoring(runs: list[Path], tmp_path: Path) -> None:
    out, png = tmp_path / "out.csv", tmp_path / "out.png"
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"  # as if it were not installed
        "from edge_agent.cli import main\n"
        f"sys.exit(main(['replay', {str(runs[0])!r}, '--model', {str(MODEL)!r}, '--out', {str(out)!r}, "
        f"'--plot', {str(png)!r}]))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == "replay: --plot needs matplotlib, not installed: pip install 'edge-agent[plot]'"
    assert not out.exists() and not png.exists()  # nothing was scored


@pytest.mark.parametrize("command", ["replay", "calibrate", "inspect"])
def test_offline_model_commands_import_no_protocol_library(runs: list[Path], tmp_path: Path, command: str) -> None:
    argv = {
        "replay": ["replay", str(runs[0]), "--model", str(MODEL), "--out-dir", str(tmp_path / "o")],
        "calibrate": ["calibrate", "--model", str(MODEL), "--csv", str(runs[0]), "--out", str(tmp_path / "c.tflite")],
        "inspect": ["model", "inspect", str(MODEL)],
    }[command]
    code = (
        "import json, sys\n"
        "from edge_agent.cli import main\n"
        f"rc = main({argv!r})\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('asyncua', 'pymodbus', 'snap7', 'paho', "
        "'serial') or m.startswith(('edge_agent.drivers', 'edge_agent.poller')))\n"
        "print(json.dumps([rc, loaded, 'edge_agent.scoring.runtime' in sys.modules]))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    rc, loaded, scored = json.loads(r.stdout.strip().splitlines()[-1])
    assert rc == 0 and scored, r.stderr  # the command did its work (it loaded the model into the runtime)
    assert loaded == [], f"{command} imported {loaded} (of {', '.join(PROTOCOLS)})"
