"""Model kinds as plugins: the registry, unknown kinds, a kind added as one file, and the autoencoder's arithmetic."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import edge_agent.scoring as scoring
from edge_agent.scoring import autoencoder
from edge_agent.scoring.base import SCORERS, plugin_for
from edge_agent.scoring.bundle import (
    Bundle,
    ModelError,
    ScoreSpec,
    bundle_from_bytes,
    embed_metadata,
    load_bundle,
    read_metadata,
)
from edge_agent.scoring.detector import WindowScorer
from edge_agent.scoring.runtime import ModelRuntime
from edge_agent.scoring.train import TrainOptions

FIXTURES = Path(__file__).parents[1] / "fixtures"
INT8, F32 = FIXTURES / "pump-i8.tflite", FIXTURES / "pump-f32.tflite"
SHIPPED = Path(__file__).parents[2] / "models" / "pump-skid-ae.tflite"
BUNDLES = [INT8, F32, SHIPPED]
KNOWN = ", ".join(sorted(SCORERS))  # what an unknown-kind error lists: every registered kind, sorted


def of_kind(path: Path, kind: str) -> bytes:
    """The bundle's bytes with its metadata saying `kind` (the model itself unchanged)."""
    bundle = load_bundle(path)
    meta = bundle.metadata.model_copy(update={"score": ScoreSpec(kind=kind)})
    return embed_metadata(bundle.data, meta)


def windows(path: Path, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw windows around the bundle's normal levels, and a good mask with some cells missing."""
    meta = load_bundle(path).metadata
    rng = np.random.default_rng(seed)
    mean, scale = np.asarray(meta.normalisation.mean), np.asarray(meta.normalisation.scale)
    values = (mean + scale * rng.standard_normal((batch, meta.window, len(meta.inputs)))).astype(np.float32)
    good = rng.random(values.shape) > 0.03  # a few cells missing here and there
    good[:3] = True
    good[1, :, 0] = False  # one tag of 8 missing for the whole window: still scored with min_good 0.8
    good[2, :, :2] = False  # a quarter of the window missing: below min_good, not scored
    return values, good


def normalised(path: Path, values: np.ndarray) -> np.ndarray:
    """x = (value − mean) / scale in float32, as the agent normalises (the int8 input must round alike)."""
    norm = load_bundle(path).metadata.normalisation
    mean = np.asarray(norm.mean, dtype=np.float32)
    inv_scale = (1.0 / np.asarray(norm.scale, dtype=np.float64)).astype(np.float32)
    return (values - mean) * inv_scale


def expected_mse(rt: ModelRuntime, x: np.ndarray, good: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean squared reconstruction error over the good cells and each tag's share, in float64 from the model output."""
    x = np.where(good, x, 0.0).astype(np.float32)
    err = (x.astype(np.float64) - rt.run(x).astype(np.float64)) ** 2 * good
    per_tag = err.sum(axis=1) / np.maximum(good.sum(axis=1), 1)
    score = err.sum(axis=(1, 2)) / np.maximum(good.sum(axis=(1, 2)), 1)
    return score, per_tag / per_tag.sum(axis=1, keepdims=True)


def test_the_registry_finds_the_autoencoder_kind() -> None:
    assert SCORERS["reconstruction_mse"] is autoencoder.PLUGIN is plugin_for("reconstruction_mse")
    assert autoencoder.PLUGIN.fit is not None and autoencoder.PLUGIN.summary
    for path in BUNDLES:
        bundle = load_bundle(path)
        assert bundle.metadata.score.kind == "reconstruction_mse"
        scorer = WindowScorer(bundle)
        assert scorer.plugin is autoencoder.PLUGIN and isinstance(scorer.kind, autoencoder.ReconstructionScorer)


@pytest.mark.parametrize("path", BUNDLES, ids=lambda p: p.name)
def test_autoencoder_scores_and_contributions_equal_the_reconstruction_error(path: Path) -> None:
    bundle = load_bundle(path)
    rt = ModelRuntime(bundle)
    values, good = windows(path, 6, seed=4)
    x = normalised(path, values)
    want_all, shares_all = expected_mse(rt, x, np.ones_like(good))
    want, shares = expected_mse(rt, x, good)
    # the kind's own scorer: normalised windows, missing cells at 0
    kind = autoencoder.PLUGIN.scorer(bundle, ModelRuntime(bundle))
    s, c = kind.score(x.copy(), None)
    np.testing.assert_allclose(s, want_all, rtol=1e-5)
    np.testing.assert_allclose(c, shares_all, rtol=1e-5, atol=1e-7)
    s, c = kind.score(np.where(good, x, 0.0).astype(np.float32), good)
    np.testing.assert_allclose(s, want, rtol=1e-5)
    np.testing.assert_allclose(c, shares, rtol=1e-5, atol=1e-7)
    # the agent's path: raw values, the good mask, min_good
    scorer = WindowScorer(bundle, min_good=0.8)
    s, c = scorer.score(values, np.ones_like(good))
    np.testing.assert_allclose(s, want_all, rtol=1e-5)
    np.testing.assert_allclose(c, shares_all, rtol=1e-5, atol=1e-7)
    s, c = scorer.score(np.where(good, values, np.float32(1e6)), good)  # what a missing cell holds does not matter
    assert np.isnan(s[2]) and np.isfinite(np.delete(s, 2)).all()
    np.testing.assert_allclose(np.delete(s, 2), np.delete(want, 2), rtol=1e-5)
    np.testing.assert_allclose(c, shares, rtol=1e-5, atol=1e-7)
    assert c.shape == (6, len(bundle.metadata.inputs)) and s.dtype == c.dtype == np.float64
    np.testing.assert_allclose(c.sum(axis=1), 1.0)
    assert c[1, 0] == 0.0  # a tag missing for the whole window contributes nothing


def test_an_unknown_kind_is_a_one_line_error_naming_the_known_kinds(tmp_path: Path) -> None:
    data = of_kind(INT8, "lstm_ae")
    path = tmp_path / "lstm.tflite"
    path.write_bytes(data)
    for call in (lambda: load_bundle(path), lambda: read_metadata(data, str(path))):
        with pytest.raises(ModelError) as err:
            call()
        assert str(err.value) == f"{path}: unknown model kind 'lstm_ae' (score.kind); this agent knows {KNOWN}"
    # a bundle that skipped the reader (built in memory) is refused when it would score
    meta = load_bundle(INT8).metadata.model_copy(update={"score": ScoreSpec(kind="lstm_ae")})
    with pytest.raises(ModelError, match=r"^unknown model kind 'lstm_ae'"):
        WindowScorer(Bundle(data, "x" * 64, meta))
    with pytest.raises(ValueError, match=rf"unknown model kind 'lstm'.*knows {KNOWN}$"):
        TrainOptions(name="t", inputs=("a",), kind="lstm")


MEAN_ABS = '''
"""Test kind: mean absolute reconstruction error (a whole kind in one file)."""

import numpy as np

from edge_agent.scoring.base import ScorerPlugin


class MeanAbs:
    def __init__(self, bundle, runtime):
        self.runtime = runtime

    def score(self, x, good):
        d = np.abs(x - self.runtime.run(x)).astype(np.float64)
        per_tag = d.mean(axis=1)
        return d.mean(axis=(1, 2)), per_tag / per_tag.sum(axis=1, keepdims=True)


PLUGIN = ScorerPlugin(key="test_mean_abs", scorer=MeanAbs, summary="test: mean absolute error")
SHAPED = ScorerPlugin(key="test_one_output", scorer=MeanAbs, summary="test", output_shape=lambda meta: (1,))
'''


def test_a_kind_is_one_module_with_a_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "zz_mean_abs.py").write_text(MEAN_ABS)
    monkeypatch.setattr(scoring, "__path__", [*scoring.__path__, str(tmp_path)])
    try:
        scoring._discover()
        module = sys.modules["edge_agent.scoring.zz_mean_abs"]
        assert SCORERS["test_mean_abs"] is module.PLUGIN
        bundle = bundle_from_bytes(of_kind(F32, "test_mean_abs"))
        scorer = WindowScorer(bundle)
        assert scorer.plugin is module.PLUGIN
        values, _ = windows(F32, 4, seed=1)
        x = normalised(F32, values)
        want = np.abs(x.astype(np.float64) - ModelRuntime(bundle).run(x)).mean(axis=(1, 2))
        np.testing.assert_allclose(scorer.score(values, np.ones(values.shape, bool))[0], want, rtol=1e-5)
        # a kind whose model has another output shape: the runtime checks the shape the kind asks for
        SCORERS["test_one_output"] = module.SHAPED
        with pytest.raises(ModelError, match=r"do not match the metadata's window × inputs \(8, 8\) → \(1,\)"):
            ModelRuntime(bundle_from_bytes(of_kind(F32, "test_one_output")))
    finally:
        SCORERS.pop("test_mean_abs", None)
        SCORERS.pop("test_one_output", None)
        sys.modules.pop("edge_agent.scoring.zz_mean_abs", None)
    with pytest.raises(ModelError, match="unknown model kind 'test_mean_abs'"):
        bundle_from_bytes(of_kind(F32, "test_mean_abs"))
