"""Model kind ensemble: members' scores over their own thresholds, combined; calibration sets member thresholds."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from fixtures.make_kinds import TAGS, normal_rows

from edge_agent.scoring import ensemble
from edge_agent.scoring.base import SCORERS
from edge_agent.scoring.bundle import (
    Bundle,
    ModelError,
    ScoreSpec,
    bundle_from_bytes,
    embed_metadata,
    load_bundle,
)
from edge_agent.scoring.calibrate import calibrate, fit_normalisation, score_series, threshold_of
from edge_agent.scoring.detector import WindowScorer
from edge_agent.scoring.replay import replay
from edge_agent.scoring.runtime import ModelRuntime

FIXTURES = Path(__file__).parents[1] / "fixtures"
ENSEMBLE = FIXTURES / "kind-ensemble-i8.tflite"
HAS_TF = importlib.util.find_spec("tensorflow") is not None
W, N = 4, len(TAGS)


def with_params(bundle: Bundle, **change: object) -> Bundle:
    """The bundle with some of its ensemble parameters changed."""
    params = {**bundle.metadata.score.params, **change}
    meta = bundle.metadata.model_copy(update={"score": ScoreSpec(kind=ensemble.KEY, params=params)})
    return bundle_from_bytes(embed_metadata(bundle.data, meta))


def by_hand(bundle: Bundle, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each member's raw score from the one model output, computed here: the AE's MSE and PCA's max ratio."""
    norm = bundle.metadata.normalisation
    x = ((raw - np.asarray(norm.mean, np.float32)) * (1 / np.asarray(norm.scale)).astype(np.float32)).astype(np.float32)
    out = ModelRuntime(bundle).run(x).astype(np.float64)
    ae = ((x - out[:, : W * N].reshape(-1, W, N)) ** 2).mean(axis=(1, 2))
    pca = bundle.metadata.score.params["members"][1]["params"]
    k = pca["components"]
    s = out[:, W * N : W * N + k] * pca["t_scale"]
    proj = out[:, W * N + k :]
    t2 = (s**2).sum(axis=1)
    q = ((x.reshape(len(x), -1) - proj) ** 2).sum(axis=1)
    return ae, np.maximum(t2 / pca["t2_limit"], q / pca["q_limit"])


def raw_windows(bundle: Bundle, batch: int, seed: int, spread: float = 1.0) -> np.ndarray:
    """Raw windows around the bundle's normal levels."""
    norm = bundle.metadata.normalisation
    rng = np.random.default_rng(seed)
    x = spread * rng.standard_normal((batch, W, N))
    return (np.asarray(norm.mean) + x * np.asarray(norm.scale)).astype(np.float32)


def test_the_kind_is_registered_with_its_calibration_hook() -> None:
    assert SCORERS["ensemble"] is ensemble.PLUGIN
    assert ensemble.PLUGIN.calibrate is ensemble.calibrate and ensemble.PLUGIN.fit is not None


@pytest.mark.parametrize("ae_factor", [1.0, 0.01], ids=["pca-decides", "ae-decides"])
def test_each_member_is_divided_by_its_own_threshold_and_the_max_taken(ae_factor: float) -> None:
    original = load_bundle(ENSEMBLE)
    members = [dict(m) for m in original.metadata.score.params["members"]]
    assert [m["kind"] for m in members] == ["reconstruction_mse", "pca_t2q"]
    members[0]["threshold"] *= ae_factor  # a lower AE threshold makes the AE's ratio the larger one
    bundle = with_params(original, members=members)
    raw = raw_windows(bundle, 64, 1, spread=1.5)
    good = np.ones(raw.shape, bool)
    ae, pca = by_hand(bundle, raw)
    ratios = np.stack([ae / members[0]["threshold"], pca / members[1]["threshold"]], axis=1)
    scores, shares = WindowScorer(bundle).score(raw, good)
    np.testing.assert_allclose(scores, ratios.max(axis=1), rtol=1e-4)
    np.testing.assert_allclose(shares.sum(axis=1), 1.0, rtol=1e-9)
    pick = ratios.argmax(axis=1)
    assert (pick == (0 if ae_factor < 1 else 1)).mean() > 0.9
    # the shares are the deciding member's own; `only` gives a member's raw score and shares
    alone = [WindowScorer(with_params(bundle, only=i)).score(raw, good) for i in (0, 1)]
    np.testing.assert_allclose(shares, np.where(pick[:, None] == 0, alone[0][1], alone[1][1]), rtol=1e-6)
    np.testing.assert_allclose(alone[0][0], ae, rtol=1e-4)
    np.testing.assert_allclose(alone[1][0], pca, rtol=1e-4)


def test_mean_combines_the_ratios_and_weights_the_shares() -> None:
    bundle = with_params(load_bundle(ENSEMBLE), combine="mean")
    members = bundle.metadata.score.params["members"]
    raw = raw_windows(bundle, 16, 2, spread=1.5)
    good = np.ones(raw.shape, bool)
    ae, pca = by_hand(bundle, raw)
    scores, shares = WindowScorer(bundle).score(raw, good)
    r0, r1 = ae / members[0]["threshold"], pca / members[1]["threshold"]
    np.testing.assert_allclose(scores, (r0 + r1) / 2, rtol=1e-4)
    alone = [WindowScorer(with_params(bundle, only=i)).score(raw, good)[1] for i in (0, 1)]
    want = (alone[0] * r0[:, None] + alone[1] * r1[:, None]) / (r0 + r1)[:, None]
    np.testing.assert_allclose(shares, want, rtol=1e-4)


def test_calibration_sets_each_member_threshold_and_the_bundle_threshold_near_one() -> None:
    bundle = load_bundle(ENSEMBLE)
    data = normal_rows(1500, 5)  # another stretch of the normal process than the fixture was made from
    new = calibrate(bundle, data, quantile=0.95, margin=1.2, source="test")
    assert new.metadata.threshold.base_sha256 == bundle.sha256
    assert new.metadata.score.params["only"] is None
    mean, _ = fit_normalisation(data)
    assert new.metadata.normalisation.mean == mean
    for i, member in enumerate(new.metadata.score.params["members"]):
        # the member's own scores of the calibration windows, under the calibrated normalisation
        alone = with_params(new, only=i)
        scores = score_series(WindowScorer(alone), data)
        assert member["threshold"] == threshold_of(scores, 0.95, 1.2)
        assert member["threshold"] != bundle.metadata.score.params["members"][i]["threshold"]
    # each ratio is below 1 / margin on 95 % of the windows: the combined quantile × margin is close to 1
    assert 0.9 < new.metadata.threshold.value < 1.6


def test_replay_with_calibration_rows_calibrates_the_members() -> None:
    bundle = load_bundle(ENSEMBLE)
    data = normal_rows(800, 6)
    data[600:, 3] += 2.0  # tag d leaves the others: a broken correlation
    times = np.arange(len(data), dtype=np.float64)
    result = replay(bundle, times, data, calibrate_rows=400, source="t")
    thresholds = [m["threshold"] for m in result.bundle.metadata.score.params["members"]]
    assert thresholds != [m["threshold"] for m in bundle.metadata.score.params["members"]]
    assert not result.anomaly[:590].any() or result.anomaly[:590].mean() < 0.05
    assert result.anomaly[620:].mean() > 0.9


def test_bundle_round_trip_and_output_shape() -> None:
    bundle = load_bundle(ENSEMBLE)
    again = bundle_from_bytes(embed_metadata(bundle.data, bundle.metadata))
    assert again.metadata.score.params == bundle.metadata.score.params and again.sha256 == bundle.sha256
    k = bundle.metadata.score.params["members"][1]["params"]["components"]
    assert ensemble.output_shape(bundle.metadata) == (W * N + k + W * N,)
    assert ModelRuntime(bundle).output.shape == (1, W * N + k + W * N)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"members": []}, "members: List should have at least 1 item"),
        ({"only": 2}, "only is 2, the ensemble has 2 members"),
        ({"combine": "median"}, "combine"),
    ],
)
def test_bad_params_are_refused_when_read(change: dict[str, object], message: str) -> None:
    bundle = load_bundle(ENSEMBLE)
    with pytest.raises(ModelError, match=message):
        with_params(bundle, **change)


def test_unknown_or_nested_members_are_refused() -> None:
    bundle = load_bundle(ENSEMBLE)
    members = bundle.metadata.score.params["members"]
    with pytest.raises(ModelError, match=r"unknown model kind 'lstm'.*knows"):
        with_params(bundle, members=[{**members[0], "kind": "lstm"}, members[1]])
    with pytest.raises(ModelError, match="cannot be a member"):
        with_params(bundle, members=[{**members[0], "kind": "ensemble"}, members[1]])
    with pytest.raises(ModelError, match="threshold"):
        with_params(bundle, members=[{**members[0], "threshold": 0}, members[1]])


@pytest.mark.skipif(not HAS_TF, reason="the builder needs TensorFlow (run with /work/tfvenv)")
def test_the_builder_puts_the_members_side_by_side() -> None:
    import tensorflow as tf

    from edge_agent.scoring.calibrate import sliding_windows
    from edge_agent.scoring.train import TrainOptions

    tf.keras.utils.set_random_seed(0)
    data = normal_rows(1000, 0)
    x = (data - data.mean(axis=0)) / data.std(axis=0)
    windows = sliding_windows(x, W)
    options = TrainOptions(name="t", inputs=TAGS, window=W, hidden=8, bottleneck=2, epochs=1)
    trained = ensemble.fit_ensemble(tf, windows, options)
    out = trained.model(windows[:50]).numpy()
    ae = trained.model.layers[1](windows[:50]).numpy().reshape(50, -1)
    np.testing.assert_allclose(out[:, : W * N], ae, atol=1e-5)
    members = trained.score_params["members"]
    assert [m["kind"] for m in members] == list(ensemble.MEMBERS) and all(m["threshold"] > 0 for m in members)
    assert out.shape[1] == W * N + members[1]["params"]["components"] + W * N
