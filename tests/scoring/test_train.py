"""The training recipe's parts that need no TensorFlow: runs, training windows, hold-out, the per-run threshold."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from edge_agent.scoring.bundle import ModelError, bundle_from_bytes, embed_metadata, load_bundle
from edge_agent.scoring.calibrate import calibrate, normal_scores, score_series
from edge_agent.scoring.detector import WindowScorer
from edge_agent.scoring.train import (
    TrainOptions,
    _held_blocks,
    _held_out_threshold,
    _per_run_threshold,
    runs_of,
    split_holdout,
    train,
    training_windows,
)

INT8 = Path(__file__).parents[1] / "fixtures" / "pump-i8.tflite"


def options(**kw: object) -> TrainOptions:
    return TrainOptions(name="t", inputs=("a", "b"), window=4, **kw)  # type: ignore[arg-type]


def run(rows: int, level: float, seed: int = 0, tags: int = 2) -> np.ndarray:
    """Normal operation around `level`: noise of scale 1 on every tag."""
    return level + np.random.default_rng(seed).standard_normal((rows, tags))


def test_options_refuse_what_the_recipe_cannot_do() -> None:
    with pytest.raises(ValueError, match="normalise must be 'global' or 'per-run'"):
        options(normalise="per-tag")
    with pytest.raises(ValueError, match="segment_rows must be 0"):
        options(normalise="per-run", segment_rows=-1)


def test_runs_are_whole_files_unless_cut_into_segments() -> None:
    series = [run(250, 0.0), run(300, 5.0, 1), run(50, 9.0, 2)]
    assert all(a is b for a, b in zip(runs_of(series, options()), series, strict=True))
    assert all(a is b for a, b in zip(runs_of(series, options(normalise="per-run")), series, strict=True))
    # segments do not apply to global normalisation: one mean and scale over everything anyway
    assert len(runs_of(series, options(segment_rows=100))) == 3
    cut = runs_of(series, options(normalise="per-run", segment_rows=100))
    # 250 → 100 + 150 (a short tail joins the slice before it), 300 → 3 × 100, 50 (shorter than a slice) → 50
    assert [len(r) for r in cut] == [100, 150, 100, 100, 100, 50]
    np.testing.assert_array_equal(np.concatenate(cut), np.concatenate(series))  # nothing lost, nothing repeated


def test_global_windows_share_one_normalisation_and_never_span_two_runs() -> None:
    series = [run(60, 0.0), run(40, 100.0, 1)]
    w = training_windows(series, options())
    assert w.shape == (57 + 37, 4, 2) and w.dtype == np.float32
    assert abs(float(w.mean())) < 0.1  # standardised over all the data together
    low, high = w[:57], w[57:]
    assert float(low.max()) < 0 < float(high.min())  # the two levels stay apart: a run's level is kept
    assert float(np.ptp(w, axis=1).max()) < 1  # no window holds rows of both runs (the gap is ~2 scales)


def test_per_run_windows_standardise_each_run_and_skip_short_ones() -> None:
    series = [run(60, 0.0), run(40, 100.0, 1), run(13, 50.0, 2)]  # the last is shorter than window + 10
    w = training_windows(series, options(normalise="per-run"))
    assert w.shape == (57 + 37, 4, 2)
    for part in (w[:57], w[57:]):
        assert abs(float(part.mean())) < 0.2 and 0.7 < float(part.std()) < 1.3  # each run on its own statistics
    gappy = run(60, 0.0)
    gappy[10, 1] = np.nan
    assert np.isfinite(training_windows([gappy], options(normalise="per-run"))).all()
    with pytest.raises(ValueError, match="no run has the 14 rows a window of 4 needs"):
        training_windows([run(13, 0.0)], options(normalise="per-run"))


def test_per_run_threshold_scores_each_run_under_its_own_calibration() -> None:
    bundle = load_bundle(INT8)
    n = len(bundle.metadata.inputs)
    opts = TrainOptions(name="t", inputs=tuple(bundle.metadata.inputs), window=bundle.metadata.window, quantile=0.95)
    mean = np.asarray(bundle.metadata.normalisation.mean)
    series = [mean + run(200, 0.0, 1, n), 1.3 * mean + 2 * run(150, 0.0, 2, n)]  # two machines, other levels
    out = _per_run_threshold(bundle, series, opts, "two runs")
    t = out.metadata.threshold
    expected = np.quantile(np.concatenate([normal_scores(bundle, s)[1] for s in series]), 0.95) * opts.margin
    assert t.value == pytest.approx(expected, rel=1e-5) and t.method == "quantile×margin, per run"  # 6 digits
    assert (t.rows, t.calibrated_on, t.quantile) == (350, "two runs", 0.95)
    assert out.metadata.normalisation == bundle.metadata.normalisation  # only the threshold changes
    # one run: exactly what calibrating the model on that run gives
    one = _per_run_threshold(bundle, series[:1], opts, "")
    assert one.metadata.threshold.value == pytest.approx(
        calibrate(bundle, series[0], quantile=0.95).metadata.threshold.value
    )
    assert one.metadata.threshold.calibrated_on == "training data"


def test_train_without_tensorflow_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # import fails, whether or not it is installed
    with pytest.raises(ModelError, match=r"pip install 'edge-agent\[train\]'"):
        train([run(60, 0.0)], options())


def test_holdout_is_a_tail_block_of_each_run_and_of_each_per_run_slice() -> None:
    series = [run(100, 0.0), run(51, 5.0, 1)]
    fit, held = split_holdout(series, options())  # default 0.2
    assert [len(f) for f in fit] == [80, 41] and [len(h) for h in held] == [20, 10]
    for s, f, h in zip(series, fit, held, strict=True):
        np.testing.assert_array_equal(np.concatenate([f, h]), s)  # the first rows are fitted on, the last held out
    fit, held = split_holdout(series, options(normalise="per-run", segment_rows=50, holdout=0.1))
    assert [len(f) for f in fit] == [45, 45, 46] and [len(h) for h in held] == [5, 5, 5]
    fit, held = split_holdout(series, options(holdout=0))
    assert held == [] and all(a is b for a, b in zip(fit, series, strict=True))
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="holdout must be at least 0 and below 1"):
            options(holdout=bad)


def test_the_held_out_threshold_comes_from_the_held_out_windows_only() -> None:
    bundle = load_bundle(INT8)
    meta = bundle.metadata
    n = len(meta.inputs)
    mean, scale = np.asarray(meta.normalisation.mean), np.asarray(meta.normalisation.scale)
    opts = TrainOptions(name="t", inputs=tuple(meta.inputs), window=meta.window, quantile=0.9, holdout=0.25)
    # the fitted part is quiet, the held-out tail noisier: a threshold from the tail is the larger one
    quiet, noisy = mean + 0.5 * scale * run(300, 0.0, 1, n), mean + 2 * scale * run(100, 0.0, 2, n)
    fit, held = split_holdout([np.concatenate([quiet, noisy])], opts)
    np.testing.assert_array_equal(held[0], noisy)
    staged = bundle.metadata.model_copy(update={"training": {"holdout": 0.25}})
    out = _held_out_threshold(
        bundle_from_bytes(embed_metadata(bundle.data, staged)), [(meta.normalisation, noisy)], opts, "a.csv"
    )
    t = out.metadata.threshold
    expected = np.quantile(score_series(WindowScorer(bundle), noisy), 0.9) * opts.margin
    assert t.value == pytest.approx(expected, rel=1e-5) and t.method == "quantile×margin, held-out"
    assert t.value > 2 * np.quantile(score_series(WindowScorer(bundle), quiet), 0.9) * opts.margin
    assert (t.rows, t.quantile, t.calibrated_on) == (100, 0.9, "held-out last 0.25 of each run of a.csv")
    assert out.metadata.training == {"holdout": 0.25, "holdout_rows": 100, "holdout_windows": 100 - meta.window + 1}
    assert out.metadata.normalisation == meta.normalisation  # only the threshold (and its record) change
    # per run: each held-out block is scored under the normalisation of its own run's fitted part
    pairs = _held_blocks(fit, held, TrainOptions(**{**opts.__dict__, "normalise": "per-run"}), meta.normalisation)
    ((norm, block),) = pairs
    assert block is held[0] and norm.mean == pytest.approx(np.mean(fit[0], axis=0).tolist())
    with pytest.raises(ValueError, match=r"held-out tails \(holdout 0.25\) hold no scorable window of 8 rows"):
        _held_out_threshold(bundle_from_bytes(embed_metadata(bundle.data, staged)), [(norm, noisy[:7])], opts, "")
