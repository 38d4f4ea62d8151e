"""Model kind pca_t2q: T² and Q against a hand computation, contributions, faults only one statistic sees, bundles."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from fixtures.make_kinds import TAGS, normal_rows

from edge_agent.scoring import pca as pca_kind
from edge_agent.scoring.base import SCORERS
from edge_agent.scoring.bundle import (
    Bundle,
    BundleMetadata,
    ModelError,
    Normalisation,
    ScoreSpec,
    ThresholdSpec,
    bundle_from_bytes,
    embed_metadata,
    load_bundle,
)
from edge_agent.scoring.calibrate import sliding_windows
from edge_agent.scoring.detector import WindowScorer
from edge_agent.scoring.runtime import ModelRuntime

FIXTURES = Path(__file__).parents[1] / "fixtures"
PCA_I8, PCA_F32 = FIXTURES / "kind-pca-i8.tflite", FIXTURES / "kind-pca-f32.tflite"
HAS_TF = importlib.util.find_spec("tensorflow") is not None


class ExactGraph:
    """The PCA graph in float64 numpy: what a perfect runtime would return ([t/(2√λ), PPᵀx] over the last lags)."""

    def __init__(self, p: np.ndarray, lam: np.ndarray, lags: int) -> None:
        self.w_t, self.w_p, self.lags = p / np.sqrt(lam) / 2.0, p @ p.T, lags

    def run(self, x: np.ndarray) -> np.ndarray:
        flat = x[:, -self.lags :, :].reshape(len(x), -1).astype(np.float64)
        return np.concatenate([flat @ self.w_t, flat @ self.w_p], axis=1).astype(np.float32)


def fitted(window: int = 4, lags: int = 4, rows: int = 3000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised training windows of the fixture data, and their numpy PCA (P, λ)."""
    data = normal_rows(rows, 0)
    x = (data - data.mean(axis=0)) / data.std(axis=0)
    windows = sliding_windows(x, window)
    p, lam, _ = pca_kind.pca(windows[:, -lags:, :].reshape(len(windows), -1).astype(np.float64))
    return windows, p, lam


def meta_with(params: dict[str, object], window: int = 4) -> BundleMetadata:
    """Metadata of a pca_t2q bundle over the fixture tags (normalisation: identity)."""
    n = len(TAGS)
    return BundleMetadata(
        name="t",
        inputs=list(TAGS),
        window=window,
        sample_interval=1.0,
        normalisation=Normalisation(mean=[0.0] * n, scale=[1.0] * n),
        score=ScoreSpec(kind=pca_kind.KEY, params=params),
        threshold=ThresholdSpec(value=1.0),
    )


def statistics(scorer: pca_kind.PcaScorer, x: np.ndarray, good: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """T², Q and each tag's part of T² and of Q, from the scorer's own run of the model."""
    t2, per_tag = scorer.parts(x, scorer.runtime.run(x), good)
    return t2, per_tag[:, 1].sum(axis=1), per_tag[:, 0], per_tag[:, 1]


def exact_scorer(combine: str = "max", lags: int = 4) -> tuple[pca_kind.PcaScorer, np.ndarray, np.ndarray]:
    """A PcaScorer on the exact graph, limits 10 (T²) and 2 (Q)."""
    _, p, lam = fitted(lags=lags)
    params = {
        "components": p.shape[1],
        "lags": lags,
        "t2_limit": 10.0,
        "q_limit": 2.0,
        "combine": combine,
        "t_scale": 2.0,
        "weights": (p / np.sqrt(lam)).tolist(),
    }
    bundle = Bundle(b"", "", meta_with(params))
    return pca_kind.PcaScorer(bundle, ExactGraph(p, lam, lags)), p, lam  # type: ignore[arg-type]


def by_hand(x: np.ndarray, p: np.ndarray, lam: np.ndarray, lags: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """T² = Σ (pᵢᵀx)²/λᵢ and Q = ‖x − PPᵀx‖² of each window's last `lags` samples, in float64."""
    flat = x[:, -lags:, :].reshape(len(x), -1).astype(np.float64)
    t = flat @ p
    return (t**2 / lam).sum(axis=1), ((flat - t @ p.T) ** 2).sum(axis=1)


def test_both_kinds_are_registered() -> None:
    assert SCORERS["pca_t2q"] is pca_kind.PLUGIN and pca_kind.PLUGIN.fit is not None


def test_pca_keeps_the_fewest_components_that_explain_the_share() -> None:
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((5000, 2)) @ np.array([[3.0, 1, 0, 0, 2], [0, 1, 2, 0, -1]])
    rows += 0.05 * rng.standard_normal(rows.shape)
    p, lam, share = pca_kind.pca(rows, 0.95)
    assert p.shape == (5, 2) and share >= 0.95 and lam[0] >= lam[1]
    np.testing.assert_allclose(p.T @ p, np.eye(2), atol=1e-9)
    np.testing.assert_allclose(lam, np.linalg.eigvalsh(rows.T @ rows / len(rows))[::-1][:2], rtol=1e-9)
    assert (p[np.abs(p).argmax(axis=0), [0, 1]] > 0).all()  # the sign convention that makes rebuilds identical
    assert pca_kind.pca(rows, 0.5)[0].shape[1] == 1
    # never all directions: Q needs one left
    assert pca_kind.pca(rows, 1.0)[0].shape[1] == 4


@pytest.mark.parametrize("combine", ["max", "sum"])
def test_t2_and_q_match_a_hand_computation(combine: str) -> None:
    scorer, p, lam = exact_scorer(combine)
    x = np.random.default_rng(2).standard_normal((50, 4, len(TAGS))).astype(np.float32)
    t2, q, _, q_tag = statistics(scorer, x)
    want_t2, want_q = by_hand(x, p, lam)
    np.testing.assert_allclose(t2, want_t2, rtol=1e-4)
    np.testing.assert_allclose(q, want_q, rtol=1e-4)
    np.testing.assert_allclose(q_tag.sum(axis=1), want_q, rtol=1e-4)
    scores, shares = scorer.score(x, None)
    a, b = want_t2 / 10.0, want_q / 2.0
    np.testing.assert_allclose(scores, np.maximum(a, b) if combine == "max" else a + b, rtol=1e-4)
    np.testing.assert_allclose(shares.sum(axis=1), 1.0, rtol=1e-9)


def test_contributions_by_hand() -> None:
    scorer, p, lam = exact_scorer()
    x = np.random.default_rng(3).standard_normal((20, 4, len(TAGS))).astype(np.float32)
    _, _, t_tag, q_tag = statistics(scorer, x)
    flat = x.reshape(len(x), -1).astype(np.float64)
    g = flat @ p @ np.diag(1 / lam) @ p.T  # PΛ⁻¹Pᵀx: Σ_j x_j g_j = T²
    want_t = np.maximum(flat * g, 0).reshape(len(x), 4, len(TAGS)).sum(axis=1)
    want_q = ((flat - flat @ p @ p.T) ** 2).reshape(len(x), 4, len(TAGS)).sum(axis=1)
    np.testing.assert_allclose(t_tag, want_t, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(q_tag, want_q, rtol=1e-3, atol=1e-5)
    # the shares: each statistic's own shares, weighted by its ratio to its limit
    _, shares = scorer.score(x, None)
    a, b = (flat * g).sum(axis=1) / 10.0, want_q.sum(axis=1) / 2.0
    mix = (
        want_t / want_t.sum(axis=1, keepdims=True) * a[:, None]
        + want_q / want_q.sum(axis=1, keepdims=True) * b[:, None]
    )
    np.testing.assert_allclose(shares, mix / mix.sum(axis=1, keepdims=True), rtol=1e-3)


def test_missing_cells_are_left_out_of_q() -> None:
    scorer, _, _ = exact_scorer()
    x = np.zeros((1, 4, len(TAGS)), np.float32)
    x[0, :, 2] = 3.0  # a break in one tag
    good = np.ones_like(x, dtype=bool)
    _, q_all, _, q_tag = statistics(scorer, x, good)
    good[0, :, 2] = False
    _, q_some, _, q_tag_some = statistics(scorer, x, good)
    assert q_some[0] < q_all[0] and q_tag_some[0, 2] == 0.0 and q_tag[0, 2] > 0


def windows_for(bundle: Bundle, x_norm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw windows whose normalised values are `x_norm`, all cells good."""
    norm = bundle.metadata.normalisation
    raw = np.asarray(norm.mean) + x_norm * np.asarray(norm.scale)
    return raw.astype(np.float32), np.ones(raw.shape, bool)


def normalised(bundle: Bundle, raw: np.ndarray) -> np.ndarray:
    """The windows as the agent normalises them."""
    norm = bundle.metadata.normalisation
    return ((raw - np.asarray(norm.mean)) / np.asarray(norm.scale)).astype(np.float32)


def faults(bundle: Bundle, size: float) -> tuple[np.ndarray, np.ndarray]:
    """Two normalised windows: off the normal plane (only Q grows) and along its last kept direction (only T²;
    the direction of least normal variance, so the window's values stay small), each at `size` × the limit."""
    _, p, lam = fitted()
    params = pca_kind.params_of(bundle.metadata)
    unit = np.eye(p.shape[0])[:, 0]
    off = unit - p @ (p.T @ unit)
    off *= np.sqrt(size * params.q_limit) / np.linalg.norm(off)
    on = p[:, -1] * np.sqrt(lam[-1] * size * params.t2_limit)
    return off.reshape(1, 4, len(TAGS)), on.reshape(1, 4, len(TAGS))


@pytest.mark.parametrize("path", [PCA_F32, PCA_I8], ids=lambda p: p.name)
def test_a_fault_only_q_sees_and_one_only_t2_sees(path: Path) -> None:
    bundle = load_bundle(path)
    params = pca_kind.params_of(bundle.metadata)
    assert params.components == fitted()[1].shape[1]
    scorer = WindowScorer(bundle)
    kind = scorer.kind
    assert isinstance(kind, pca_kind.PcaScorer)
    off, on = faults(bundle, 4.0)
    for vec, sees in ((off, "q"), (on, "t2")):
        raw, good = windows_for(bundle, vec)
        x = normalised(bundle, raw)
        t2, q, _, _ = statistics(kind, x)
        t2_ratio, q_ratio = t2[0] / params.t2_limit, q[0] / params.q_limit
        if sees == "q":
            assert q_ratio > 1.2 and t2_ratio < 0.5, (t2_ratio, q_ratio)
        else:
            assert t2_ratio > 1.2 and q_ratio < 0.5, (t2_ratio, q_ratio)
        score, shares = scorer.score(raw, good)
        assert score[0] > 1.2 and np.isclose(shares.sum(), 1.0)
    # and normal windows stay below the threshold
    windows, _, _ = fitted()
    raw, good = windows_for(bundle, windows[::50])
    scores, _ = scorer.score(raw, good)
    assert np.mean(scores < bundle.metadata.threshold.value) > 0.97


def test_int8_a_t2_fault_beyond_the_input_range_is_still_flagged_by_q() -> None:
    """The int8 graph clips its input; the residual is taken against the unclipped window, so Q grows instead."""
    bundle = load_bundle(PCA_I8)
    params = pca_kind.params_of(bundle.metadata)
    _, p, lam = fitted()
    on = (p[:, 0] * np.sqrt(lam[0] * 10 * params.t2_limit)).reshape(1, 4, len(TAGS))  # far beyond the input range
    raw, good = windows_for(bundle, on)
    kind = WindowScorer(bundle).kind
    assert isinstance(kind, pca_kind.PcaScorer)
    x = normalised(bundle, raw)
    _, q, _, _ = statistics(kind, x)
    assert q[0] / params.q_limit > 2.0
    assert WindowScorer(bundle).score(raw, good)[0][0] > bundle.metadata.threshold.value


def test_the_tflite_graph_computes_the_hand_statistics() -> None:
    """The float32 fixture's graph against numpy PCA of its training data; the int8 one within its rounding."""
    windows, p, lam = fitted()
    x = windows[::10]
    want_t2, want_q = by_hand(x, p, lam)
    for path, rtol in ((PCA_F32, 1e-3), (PCA_I8, 0.25)):
        kind = WindowScorer(load_bundle(path)).kind
        assert isinstance(kind, pca_kind.PcaScorer)
        t2, q, _, _ = statistics(kind, x)
        # the bundle's normalisation is the training data's, so its windows are the same as `windows`
        assert np.median(np.abs(t2 - want_t2) / want_t2) < rtol
        assert np.median(np.abs(q - want_q) / want_q) < rtol


def test_a_tag_that_breaks_the_correlation_gets_the_largest_share() -> None:
    bundle = load_bundle(PCA_I8)
    scorer = WindowScorer(bundle)
    x = np.zeros((1, 4, len(TAGS)))
    x[0, :, 3] = 2.5  # tag d alone moves: the others say it should not
    raw, good = windows_for(bundle, x)
    scores, shares = scorer.score(raw, good)
    assert scores[0] > bundle.metadata.threshold.value
    assert shares[0].argmax() == 3 and shares[0, 3] > 0.5


def test_bundle_round_trip_keeps_the_params() -> None:
    bundle = load_bundle(PCA_I8)
    again = bundle_from_bytes(embed_metadata(bundle.data, bundle.metadata))
    assert again.metadata.score.params == bundle.metadata.score.params
    assert again.sha256 == bundle.sha256
    params = pca_kind.params_of(bundle.metadata)
    assert ModelRuntime(bundle).output.shape == (1, params.components + 4 * len(TAGS))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"q_limit": 0.0}, "q_limit: must be at least 1e-09"),
        ({"weights": [[1e30] * 6] * 24}, r"weights\[0\]\[0\]: must be at most 1000000.0 \(got 1e\+30\)"),
        ({"t_scale": 1e9}, "t_scale: must be at most 1000"),
        ({"components": None}, "components"),
        ({"weights": [[1.0]]}, "weights must be 24 × "),
        ({"lags": 9}, "weights must be"),
    ],
)
def test_bad_params_are_refused_with_the_field(change: dict[str, object], message: str) -> None:
    bundle = load_bundle(PCA_I8)
    params = {**bundle.metadata.score.params, **change}
    if change.get("components", 0) is None:
        del params["components"]
    meta = bundle.metadata.model_copy(update={"score": ScoreSpec(kind=pca_kind.KEY, params=params)})
    with pytest.raises(ModelError, match=message):
        ModelRuntime(bundle_from_bytes(embed_metadata(bundle.data, meta)))


def test_a_bundle_whose_components_disagree_with_its_graph_is_refused() -> None:
    bundle = load_bundle(PCA_I8)
    params = dict(bundle.metadata.score.params)
    params["components"] -= 1
    params["weights"] = [row[:-1] for row in params["weights"]]
    meta = bundle.metadata.model_copy(update={"score": ScoreSpec(kind=pca_kind.KEY, params=params)})
    with pytest.raises(ModelError, match="do not match"):
        ModelRuntime(bundle_from_bytes(embed_metadata(bundle.data, meta)))


@pytest.mark.skipif(not HAS_TF, reason="the builder needs TensorFlow (run with /work/tfvenv)")
def test_the_builder_graph_is_the_numpy_pca() -> None:
    import tensorflow as tf

    from edge_agent.scoring.train import TrainOptions

    windows, p, lam = fitted(window=6, lags=4)
    trained = pca_kind.fit_pca(tf, windows, TrainOptions(name="t", inputs=TAGS, window=6), lags=4)
    out = trained.model(windows[:100]).numpy()
    k = trained.score_params["components"]
    assert k == p.shape[1] and out.shape == (100, k + 4 * len(TAGS))
    flat = windows[:100, -4:, :].reshape(100, -1).astype(np.float64)
    np.testing.assert_allclose(out[:, :k] * pca_kind.T_SCALE, flat @ (p / np.sqrt(lam)), atol=1e-4)
    np.testing.assert_allclose(out[:, k:], flat @ p @ p.T, atol=1e-4)
    t2, q = by_hand(windows, p, lam)
    assert trained.score_params["t2_limit"] == pytest.approx(np.quantile(t2, 0.99), rel=1e-5)
    assert trained.score_params["q_limit"] == pytest.approx(np.quantile(q, 0.99), rel=1e-5)
