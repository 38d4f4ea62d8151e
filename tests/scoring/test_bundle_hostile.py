"""Bundles whose metadata lies: every command that loads a bundle refuses it the same way, in one line, exit 2."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edge_agent.cli import main
from edge_agent.errors import ModelError
from edge_agent.scoring.bundle import METADATA_NAME, BundleMetadata, load_bundle
from edge_agent.scoring.tflite_metadata import read_metadata_bytes, replace_metadata_bytes

FIXTURES = Path(__file__).parents[1] / "fixtures"
INT8 = FIXTURES / "pump-i8.tflite"
NAN, INF = math.nan, math.inf


def raw_metadata(path: Path = INT8) -> dict[str, Any]:
    """The bundle's metadata as plain JSON, to be edited into what a validator would never write."""
    raw = read_metadata_bytes(path.read_bytes(), METADATA_NAME)
    assert raw is not None
    parsed: dict[str, Any] = json.loads(raw)
    return parsed


def write_bundle(path: Path, meta: Any, base: Path = INT8) -> Path:
    """`base` with `meta` as its metadata, written as JSON (NaN and Infinity as Python's json writes them)."""
    data = replace_metadata_bytes(base.read_bytes(), METADATA_NAME, json.dumps(meta).encode())
    assert data is not None
    path.write_bytes(data)
    return path


def setter(*keys: str | int, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(meta: dict[str, Any]) -> None:
        node: Any = meta
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value

    return edit


def same_tag_everywhere(meta: dict[str, Any]) -> None:
    meta["inputs"] = [meta["inputs"][0]] * len(meta["inputs"])


# (id, edit, what the one line says)
LIES: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("nan-mean", setter("normalisation", "mean", 2, value=NAN), "normalisation.mean[2]: must be a finite number"),
    ("inf-mean", setter("normalisation", "mean", 0, value=-INF), "normalisation.mean[0]: must be a finite number"),
    ("nan-scale", setter("normalisation", "scale", 1, value=NAN), "normalisation.scale[1]: must be a finite number"),
    ("inf-scale", setter("normalisation", "scale", 1, value=INF), "normalisation.scale[1]: must be a finite number"),
    ("zero-scale", setter("normalisation", "scale", 3, value=0.0), "normalisation.scale[3]: must be above 0"),
    ("negative-scale", setter("normalisation", "scale", 3, value=-2.0), "normalisation.scale[3]: must be above 0"),
    ("huge-mean", setter("normalisation", "mean", 5, value=1e300), "normalisation.mean[5]: must be at most 1e+38"),
    ("tiny-scale", setter("normalisation", "scale", 6, value=1e-300), "normalisation.scale[6]: 1e-300 is below 1e-30"),
    ("inf-threshold", setter("threshold", "value", value=INF), "threshold.value: must be a finite number"),
    ("nan-threshold", setter("threshold", "value", value=NAN), "threshold.value: must be a finite number"),
    ("zero-threshold", setter("threshold", "value", value=0.0), "threshold.value: must be above 0"),
    ("tiny-interval", setter("sample_interval", value=1e-9), "sample_interval: 1e-09 s is outside 0.001 s … 86400 s"),
    ("huge-interval", setter("sample_interval", value=1e12), "sample_interval: 1e+12 s is outside 0.001 s … 86400 s"),
    ("nan-interval", setter("sample_interval", value=NAN), "sample_interval: must be a finite number"),
    ("same-tag", same_tag_everywhere, "inputs: pump.suction_pressure is listed 8 times"),
    ("empty-tag", setter("inputs", 4, value=""), "inputs[4]: cannot be empty"),
    (
        "line-break-tag",
        setter("inputs", 1, value="pump.\nflow"),
        "inputs[1]: holds a control character (got 'pump.\\nflow')",
    ),
    ("zero-window", setter("window", value=0), "window: must be at least 1"),
    ("inf-min-duration", setter("detector", "min_duration", value=INF), "detector.min_duration: must be a finite"),
    ("nan-exit-ratio", setter("detector", "exit_ratio", value=NAN), "detector.exit_ratio: must be a finite number"),
]


@pytest.fixture(params=LIES, ids=[lie[0] for lie in LIES])
def lie(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, str]:
    _, edit, message = request.param
    meta = raw_metadata()
    edit(meta)
    return write_bundle(tmp_path / "lying.tflite", meta), message


def pump_csv(path: Path, rows: int = 40) -> Path:
    tags = raw_metadata()["inputs"]
    lines = ["datetime," + ",".join(tags)]
    lines += [
        f"2024-01-01 00:00:{i * 0.2:06.3f}," + ",".join(f"{1.0 + 0.01 * (i % 7)}" for _ in tags) for i in range(rows)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def pump_config(path: Path, model: Path) -> Path:
    """A config whose device provides the model's inputs; nothing here is contacted by check."""
    tags = "\n".join(
        f'      - {{name: {t}, address: "{40001 + 2 * i}", type: float32}}'
        for i, t in enumerate(raw_metadata()["inputs"])
    )
    path.write_text(
        "devices:\n  - name: panel\n    type: modbus\n    host: 127.0.0.1\n    port: 1\n    tags:\n"
        f"{tags}\nmodels:\n  - name: pump\n    file: {model}\n"
    )
    return path


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_model_inspect_refuses_it(lie: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    path, message = lie
    assert main(["model", "inspect", str(path)]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"{path}: invalid {METADATA_NAME} metadata: ") and message in line, line


def test_replay_refuses_it(lie: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, message = lie
    data = pump_csv(tmp_path / "data.csv")
    with warnings.catch_warnings(record=True) as warned:  # a NaN normalisation showed up as numpy's RuntimeWarning
        warnings.simplefilter("always")
        rc = main(["replay", str(data), "--model", str(path)])
    assert not [w for w in warned if issubclass(w.category, RuntimeWarning)]
    assert rc == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"replay: {path}: invalid {METADATA_NAME} metadata: ") and message in line, line


@pytest.mark.parametrize("command", ["check", "run"])
def test_a_config_naming_it_is_refused(
    lie: tuple[Path, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
) -> None:
    path, message = lie
    config = pump_config(tmp_path / "agent.yaml", path)
    started: list[object] = []

    async def no_run(*args: object) -> None:  # run must not get this far; if it does, it stops at once
        started.append(args)

    monkeypatch.setattr("edge_agent.cli.run._run_agent", no_run)
    assert main([command, str(config)]) == 2
    assert not started
    err = capsys.readouterr().err
    assert "Traceback" not in err
    issue, summary = err.strip().splitlines()
    assert issue.startswith(f"{config}:") and "models[0].file" in issue and message in issue, issue
    assert summary == f"{config}: 1 error, nothing started"


def test_every_lie_is_named_in_the_one_line(tmp_path: Path) -> None:
    meta = raw_metadata()
    for interval in (0.001, 0.2, 86400.0):  # the bounds themselves are fine
        BundleMetadata.model_validate({**meta, "sample_interval": interval})
    meta["threshold"]["value"] = INF
    meta["normalisation"]["mean"][0] = NAN
    path = write_bundle(tmp_path / "two.tflite", meta)
    with pytest.raises(ModelError) as caught:
        load_bundle(path)
    assert str(caught.value) == (
        f"{path}: invalid {METADATA_NAME} metadata: normalisation.mean[0]: must be a finite number (got nan); "
        "threshold.value: must be a finite number (got inf)"
    )


def test_the_shipped_bundles_still_load() -> None:
    root = Path(__file__).parents[2]
    for path in [*FIXTURES.glob("*.tflite"), *(root / "models").rglob("*.tflite")]:
        assert main(["model", "inspect", str(path)]) == 0, path


def test_calibrate_does_not_write_a_lying_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A margin of nan, or a column with no value, used to give a NaN threshold or normalisation."""
    data = pump_csv(tmp_path / "data.csv")
    out = tmp_path / "out.tflite"
    base = ["calibrate", "--model", str(INT8), "--csv", str(data), "--out", str(out)]
    assert main([*base, "--margin", "nan"]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"calibrate: {data}: no usable threshold (quantile 0.99 × margin nan)"), line
    blank = tmp_path / "blank.csv"
    rows = data.read_text().splitlines()
    blank.write_text("\n".join([rows[0], *(",".join([*r.split(",")[:3], "", *r.split(",")[4:]]) for r in rows[1:])]))
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        assert main([*base[:4], str(blank), *base[5:]]) == 1
    assert not warned
    assert one_line(capsys.readouterr().err) == f"calibrate: {blank}: the calibration data has no value of pump.flow"
    assert not out.exists()
