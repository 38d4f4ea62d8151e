"""Replay at batch speed and the CSV checks: windows computed for many ends at once, time columns, sample spacing."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from edge_agent.buffers import Buffers
from edge_agent.cli.replay import out_paths
from edge_agent.scoring.bundle import load_bundle
from edge_agent.scoring.detector import WindowScorer
from edge_agent.scoring.replay import replay, windows
from edge_agent.scoring.table import check_spacing, read_table
from edge_agent.types import SampleBatch

FIXTURES = Path(__file__).parents[1] / "fixtures"
INT8 = FIXTURES / "pump-i8.tflite"


def ring_windows(times: np.ndarray, data: np.ndarray, interval: float, n_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """The live path, one row and one window at a time: a ring write per row, Buffers.window per window end."""
    tags = tuple(f"t{j}" for j in range(data.shape[1]))
    spacing = float(np.median(np.diff(times)))
    buffers = Buffers(retention=float(times[-1] - times[0]) + 10 * spacing, max_samples=len(times) + 16)
    buffers.register(tags, spacing)
    out, good = [], []
    for i, row in enumerate(data):
        quality = np.where(np.isfinite(row), 0, 2).astype(np.uint8)
        buffers.write(SampleBatch("csv", float(times[i]), tags, row, quality))
        if i >= n_samples - 1:
            w = buffers.window(tags, t_end=float(times[i]), interval=interval, n_samples=n_samples)
            out.append(np.nan_to_num(w.values))
            good.append(w.good)
    return np.stack(out), np.stack(good)


@pytest.mark.parametrize(("spacing", "interval"), [(0.2, 0.2), (0.1, 0.2), (0.2, 0.5), (1.0, 0.4)])
def test_batch_windows_are_the_ring_buffers_windows(spacing: float, interval: float) -> None:
    rng = np.random.default_rng(3)
    rows = 400
    times = 1.7e9 + spacing * np.arange(rows)
    keep = np.ones(rows, dtype=bool)
    keep[120:150] = False  # a gap in the recording: grid points there hold nothing fresh
    keep[rng.choice(rows, 20, replace=False)] = False  # single missing rows
    times = times[keep]
    data = rng.normal(size=(len(times), 5))
    data[rng.random(data.shape) < 0.03] = np.nan  # empty cells
    n_samples = 16
    expected_values, expected_good = ring_windows(times, data, interval, n_samples)
    ends = np.arange(n_samples - 1, len(times))
    values, good = windows(
        times, data, ends, interval=interval, n_samples=n_samples, age_limit=1.5 * max(interval, spacing)
    )
    assert values.dtype == np.float32 and values.shape == expected_values.shape
    np.testing.assert_array_equal(good, expected_good)
    np.testing.assert_array_equal(values, expected_values)
    assert not good.all() and good.any()  # the data had holes for the comparison to mean something


def test_one_scorer_for_many_files_gives_each_file_its_own_result() -> None:
    bundle = load_bundle(INT8)
    meta = bundle.metadata
    rng = np.random.default_rng(0)
    mean, scale = np.asarray(meta.normalisation.mean), np.asarray(meta.normalisation.scale)
    runs = [mean + 0.5 * scale * rng.standard_normal((300, len(meta.inputs))) for _ in range(2)]
    runs[1][150:200, 2] += 10 * scale[2]
    times = 1.7e9 + meta.sample_interval * np.arange(300)
    scorer = WindowScorer(bundle)
    shared = [replay(bundle, times, d, scorer=scorer, contributions=True) for d in runs]
    alone = [replay(bundle, times, d) for d in runs]
    for a, b in zip(shared, alone, strict=True):
        np.testing.assert_array_equal(a.anomaly, b.anomaly)
        np.testing.assert_array_equal(a.raw_score, b.raw_score)
    assert not shared[0].anomaly.any() and shared[1].anomaly[160:200].all()
    shares = shared[1].contributions
    assert shares is not None and shares.shape == (300, len(meta.inputs))
    assert int(np.nanargmax(shares[180])) == 2  # the tag that was pushed drives the alarm
    calibrated = replay(bundle, times, runs[1], scorer=scorer, calibrate_rows=120)
    assert calibrated.bundle.sha256 != bundle.sha256 and scorer.bundle is bundle  # the shared scorer is unchanged


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


ROWS = "".join(f"{i},{1 + 0.1 * i:g},{2 - 0.1 * i:g}\n" for i in range(40))


def test_a_csv_whose_first_column_holds_numbers_has_no_time_column(tmp_path: Path) -> None:
    path = write(tmp_path / "in.csv", "pressure,flow,level\n" + ROWS)
    with pytest.raises(ValueError) as err:
        read_table(path)
    message = str(err.value)
    assert message.startswith(f"{path}: no time column: none is named datetime/timestamp/time/ts/date")
    assert "first column 'pressure' holds numbers ('0' on line 2)" in message
    assert "--time-column NAME" in message and "--row-interval SECONDS" in message
    # told how the rows are spaced, every column is data
    table = read_table(path, row_interval=0.5)
    assert table.columns == ("pressure", "flow", "level") and table.time_column == "row"
    assert table.times[:3].tolist() == [0.0, 0.5, 1.0] and table.stamps[:2] == ("1", "2")
    assert table.time_from == "rows"


def test_time_column_by_name(tmp_path: Path) -> None:
    path = write(tmp_path / "in.csv", "Zeitstempel;a\n2026-01-01 00:00:00;1\n2026-01-01 00:00:01;2\n")
    assert read_table(path).time_column == "Zeitstempel"  # text in the first column: meant as times
    path = write(tmp_path / "in2.csv", "a,stamp\n1,1767225600\n2,1767225601\n")
    table = read_table(path, time_column="STAMP")
    assert table.time_column == "stamp" and table.columns == ("a",) and table.time_from == "numbers"
    with pytest.raises(ValueError, match=re.escape(f"{path}: no column 'when' (--time-column); it has a, stamp")):
        read_table(path, time_column="when")


def test_a_row_index_far_from_the_bundles_interval_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "in.csv", "time,a,b\n" + ROWS)
    table = read_table(path)
    assert table.counts_rows
    with pytest.raises(ValueError) as err:
        check_spacing(table, 0.2)
    message = str(err.value)
    assert message.startswith(f"{path}: column 'time' counts rows (0, 1, 2, …) and holds no dates, but the bundle")
    assert "samples every 0.2 s; pass --row-interval SECONDS" in message and "--allow-spacing" in message
    # at the bundle's own interval a row index reads as seconds from the start: said, not refused
    (warning,) = check_spacing(table, 1.0)
    assert "counts rows" in warning and "read as seconds from the start" in warning
    assert "but the bundle" in check_spacing(table, 0.2, allow=True)[0]
    assert check_spacing(read_table(path, row_interval=0.2), 0.2) == []


@pytest.mark.parametrize(("spacing", "refused"), [(1.0, False), (0.5, False), (2.0, False), (0.4, True), (2.5, True)])
def test_spacing_far_from_the_sample_interval_is_refused(tmp_path: Path, spacing: float, refused: bool) -> None:
    stamps = 1767225600 + spacing * np.arange(30)
    path = write(tmp_path / "in.csv", "ts,a\n" + "".join(f"{t:.3f},{i}\n" for i, t in enumerate(stamps)))
    table = read_table(path)
    assert not table.counts_rows
    if not refused:
        assert check_spacing(table, 1.0) == []
        return
    with pytest.raises(ValueError, match=rf"rows are {spacing:g} s apart \(median of column 'ts'\), but the bundle"):
        check_spacing(table, 1.0)


def test_label_columns_are_never_inputs(tmp_path: Path) -> None:
    path = write(
        tmp_path / "in.csv",
        "datetime,a,Anomaly,changepoint,label\n2026-01-01T00:00:00,1,0,0,0\n2026-01-01T00:00:01,2,1,1,1\n",
    )
    table = read_table(path)
    assert table.inputs == ["a"]
    with pytest.raises(ValueError, match="column 'Anomaly' is a label \\(ground truth\\), not an input"):
        table.select(["a", "anomaly"])
    truth = table.truth()
    assert truth is not None and truth[0] == "Anomaly" and truth[1].tolist() == [0, 1]


def test_out_dir_names_one_output_after_each_input(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert out_paths(["a/1.csv", "a/2.csv"], out) == [out / "1.replay.csv", out / "2.replay.csv"]
    # SKAB's valve1/1.csv and valve2/1.csv: the folder tells them apart
    assert out_paths(["valve1/1.csv", "valve2/1.csv"], out) == [
        out / "valve1-1.replay.csv",
        out / "valve2-1.replay.csv",
    ]
    with pytest.raises(ValueError, match="the same CSV is named twice"):
        out_paths(["a/1.csv", "a/1.csv"], out)
    with pytest.raises(ValueError, match="would overwrite an input"):
        out_paths([str(tmp_path / "x.csv"), str(tmp_path / "x.replay.csv")], tmp_path)


def test_train_warns_when_rows_are_far_from_its_sample_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import edge_agent.scoring.train as recipe
    from edge_agent.cli import main

    def no_training(*args: object, **kw: object) -> None:
        raise ValueError("not trained here")

    monkeypatch.setattr(recipe, "train", no_training)
    stamps = 1767225600 + 0.2 * np.arange(30)
    path = write(tmp_path / "in.csv", "ts,a,anomaly\n" + "".join(f"{t:.3f},{i},0\n" for i, t in enumerate(stamps)))
    assert main(["train", str(path), "--out", str(tmp_path / "m.tflite"), "--name", "m"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (
        f"train: warning: {path}: rows are 0.2 s apart (median of column 'ts'), but the bundle samples every 1 s "
        "(--sample-interval)"
    )
    assert err[-1] == "train: not trained here"
    assert (
        main(["train", str(path), "--out", str(tmp_path / "m.tflite"), "--name", "m", "--sample-interval", "0.2"]) == 1
    )
    assert "warning" not in capsys.readouterr().err
