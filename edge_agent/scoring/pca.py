"""Model kind `pca_t2q`: principal component analysis with Hotelling's T² and Q (the squared prediction error).

The model is a TFLite graph over the normalised window's last `lags` samples (flattened, lags × inputs
values): two fixed-weight dense layers side by side, concatenated. The first gives the k scaled scores
t/√λ (t = Pᵀx, P the k principal directions, λ their variances); the second the projection PPᵀx, from
which the scorer takes the residual x − PPᵀx in float32. The residual is not a graph output because an
int8 graph clips its input at the range of the training windows: a tag drifting beyond it would stop
growing the residual (int8, bearing wear on the simulator: found after 68.6 s, against 16.2 s this way
and 9.2 s in float32), while x − PPᵀ(clipped x), with x itself unclipped, keeps growing, as the
autoencoder's error does.
The scorer computes T² = Σ(t/√λ)² (how far the window is inside the normal plane, in units of the normal
spread) and Q = ‖x − PPᵀx‖² (how far it is off the plane: a correlation broken), each divided by its limit
from the training windows, and combines the two ratios (`max` by default, or their sum). A tag's share is
its part of Q (its residual cells) and of T² (x_j·(PΛ⁻¹Pᵀx)_j, negative parts left out), weighted by the
two ratios.

`fit` computes the PCA with numpy (no gradient training) and builds the graph in TensorFlow for the
recipe to convert. Its limits are the empirical quantile of the training windows' T² and Q rather than the
F and χ² formulas: overlapping windows are strongly autocorrelated, which those formulas assume away.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_agent.errors import ModelError
from edge_agent.scoring.base import F32, F64, ScorerPlugin, Trained
from edge_agent.scoring.bundle import Bundle, BundleMetadata, one_line

if TYPE_CHECKING:
    from edge_agent.scoring.runtime import ModelRuntime
    from edge_agent.scoring.train import TrainOptions

KEY = "pca_t2q"
EXPLAINED = 0.95  # components kept: the fewest that explain this share of the normal variance
LIMIT_QUANTILE = 0.99  # T² and Q limits: this quantile of the training windows' values
# the window's samples the PCA sees, counted from its end; 0: the whole window. The whole window (a
# dynamic PCA over lags) detects best on the dev data: models/README.md, "Choices, measured on the development data"
LAGS = 0
# the graph outputs t/(T_SCALE·√λ): an int8 output shares one range with the projection, about the normal
# windows' ±3; unscaled, a scaled score could never pass ~3 and T² of one component never its limit
T_SCALE = 4.0
# what a bundle may say: fit floors λ at 1e-6, so a scaled loading is at most 1e3 and a limit at least 1e-9
MAX_WEIGHT, LIMIT_RANGE = 1e6, (1e-9, 1e30)


class PcaParams(BaseModel):
    """The kind's part of the bundle's `score.params`."""

    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)

    components: int = Field(ge=1, description="k: principal components kept")
    lags: int = Field(ge=1, description="the window's last samples the PCA sees")
    # bounded so that no window's arithmetic overflows (float32 for the parts, float64 for the ratios)
    t2_limit: float = Field(
        ge=LIMIT_RANGE[0], le=LIMIT_RANGE[1], description="T² of normal windows (training quantile)"
    )
    q_limit: float = Field(ge=LIMIT_RANGE[0], le=LIMIT_RANGE[1], description="Q of normal windows (a quantile)")
    combine: Literal["max", "sum"] = "max"
    explained: float = Field(0.0, ge=0, le=1, description="share of the training variance the k components hold")
    t_scale: float = Field(1.0, ge=1e-3, le=1e3, description="the graph outputs t/(t_scale·√λ)")
    # P Λ^-1/2 (lags·inputs × k): maps the scaled scores back onto the inputs for the T² contributions
    weights: list[list[Annotated[float, Field(ge=-MAX_WEIGHT, le=MAX_WEIGHT)]]]


def params_of(meta: BundleMetadata) -> PcaParams:
    """The bundle's PCA parameters, validated; a ModelError names the field that is wrong."""
    try:
        p = PcaParams.model_validate(meta.score.params)
    except ValidationError as exc:
        raise ModelError(f"invalid score.params for {KEY}: {one_line(exc)}") from None
    n = p.lags * len(meta.inputs)
    if p.lags > meta.window or len(p.weights) != n or any(len(row) != p.components for row in p.weights):
        raise ModelError(
            f"score.params for {KEY}: weights must be {n} × {p.components} for {p.lags} lags of "
            f"{len(meta.inputs)} inputs (window {meta.window})"
        )
    return p


def output_shape(meta: BundleMetadata) -> tuple[int, ...]:
    """k scaled scores, then the projection of the last `lags` samples × inputs."""
    p = params_of(meta)
    return (p.components + p.lags * len(meta.inputs),)


class PcaScorer:
    """T² and Q per window, combined as ratios to their limits, and each tag's share."""

    def __init__(self, bundle: Bundle, runtime: ModelRuntime) -> None:
        p = params_of(bundle.metadata)
        self.runtime = runtime
        self.k, self.lags = p.components, p.lags
        self.combine = p.combine
        self.t_scale2 = p.t_scale * p.t_scale
        self.inv_limits = np.asarray([1.0 / p.t2_limit, 1.0 / p.q_limit])
        # PΛ^-1/2, times t_scale: the graph's scaled-score outputs → PΛ⁻¹Pᵀx for the T² parts
        self.weights = np.asarray(p.weights, dtype=np.float32).T * np.float32(p.t_scale)  # k × lags·inputs

    def parts(self, x: F32, out: F32, good: npt.NDArray[np.bool_] | None) -> tuple[F64, F64]:
        """T² [batch], and each tag's part of T² and Q [batch × 2 × inputs] from the model output `out`."""
        # few numpy calls, no Python per window: at batch 1 each call costs about a microsecond
        batch, n = x.shape[0], x.shape[2]
        d = self.lags * n
        xl = x[:, -self.lags :, :].reshape(batch, d)
        s = out[:, : self.k]
        m = np.empty((batch, 2, d), np.float32)
        # T² = xᵀPΛ⁻¹Pᵀx = Σ_j x_j (PΛ⁻¹Pᵀx)_j: each cell's part; negative parts are left out of the shares
        np.multiply(s @ self.weights, xl, out=m[:, 0])
        np.maximum(m[:, 0], 0.0, out=m[:, 0])
        r = np.subtract(xl, out[:, self.k :], out=m[:, 1])  # the residual x − PPᵀx: Q's parts
        if good is not None:
            r *= good[:, -self.lags :, :].reshape(batch, d)  # a missing cell's residual is not evidence
        np.multiply(r, r, out=r)
        per_tag = np.add.reduce(m.reshape(batch, 2, self.lags, n), axis=2, dtype=np.float64)
        t2 = np.add.reduce(s * s, axis=1, dtype=np.float64)
        t2 *= self.t_scale2
        return t2, per_tag

    def combined(self, t2: F64, per_tag: F64) -> tuple[F64, F64]:
        """The combined score and shares from T² and the per-tag parts of T² and Q."""
        sums = np.add.reduce(per_tag, axis=2)  # batch × [T² parts left in, Q]
        ratios = sums * self.inv_limits
        ratios[:, 0] = t2 * self.inv_limits[0]
        scores = ratios.max(axis=1) if self.combine == "max" else ratios.sum(axis=1)
        # each statistic's shares, weighted by its ratio to its limit
        w = ratios / np.maximum(sums, 1e-30)
        shares = per_tag[:, 0] * w[:, :1]
        shares += per_tag[:, 1] * w[:, 1:]
        total = np.add.reduce(shares, axis=1, keepdims=True)
        shares /= np.maximum(total, 1e-30)
        return scores, shares

    def score(self, x: F32, good: npt.NDArray[np.bool_] | None) -> tuple[F64, F64]:
        """See base.Scorer."""
        return self.combined(*self.parts(x, self.runtime.run(x), good))


def pca(samples: F64, explained: float = EXPLAINED) -> tuple[F64, F64, float]:
    """Principal directions P (dims × k), their variances λ, and the share of the variance they hold.

    samples: rows × dims, already centred by the normalisation (so the graph needs no bias).
    """
    cov = samples.T @ samples / max(len(samples), 1)
    lam, vec = np.linalg.eigh(cov)  # ascending
    lam, vec = np.maximum(lam[::-1], 0.0), vec[:, ::-1]
    # a sign per direction so that a rebuild gives the same bytes: the largest loading is positive
    vec *= np.where(vec[np.abs(vec).argmax(axis=0), np.arange(vec.shape[1])] < 0, -1.0, 1.0)
    share = np.cumsum(lam) / max(lam.sum(), 1e-12)
    # at least one component, and at least one direction left for Q
    k = min(int(np.searchsorted(share, explained)) + 1, max(len(lam) - 1, 1))
    return vec[:, :k], np.maximum(lam[:k], 1e-6), float(share[k - 1])


def _6(a: F64) -> F64:
    """Six significant digits: the bundle's JSON stays short, and the same data gives the same bytes."""
    return np.asarray([float(f"{v:.6g}") for v in np.ravel(a)]).reshape(np.shape(a))


def fit_pca(tf: Any, windows: F32, options: TrainOptions, *, lags: int = LAGS, explained: float = EXPLAINED) -> Trained:
    """PCA of the training windows (numpy) as a fixed-weight TensorFlow graph window → [t/√λ, PPᵀx]."""
    n_win, window, n_in = windows.shape
    lags = lags or window
    x = windows[:, -lags:, :].reshape(n_win, lags * n_in).astype(np.float64)
    p, lam, share = pca(x, explained)
    k = p.shape[1]
    w_t = _6(p / np.sqrt(lam))  # dims × k: x → t/√λ
    w_p = p @ p.T  # dims × dims: x → its projection onto the normal plane
    t2 = np.sum((x @ w_t) ** 2, axis=1)
    q = np.sum((x - x @ w_p) ** 2, axis=1)
    limits = _6(np.maximum([np.quantile(t2, LIMIT_QUANTILE), np.quantile(q, LIMIT_QUANTILE)], 1e-9))
    # the graph reads the whole window: rows of zeros for the samples before the last `lags`
    lead = np.zeros(((window - lags) * n_in, 1))
    inp = tf.keras.layers.Input(shape=(window, n_in))
    flat = tf.keras.layers.Flatten()(inp)
    scaled = tf.keras.layers.Dense(k, use_bias=False, trainable=False, name="scaled_scores")
    project = tf.keras.layers.Dense(lags * n_in, use_bias=False, trainable=False, name="projection")
    out = tf.keras.layers.Concatenate()([scaled(flat), project(flat)])
    scaled.set_weights([np.vstack([np.repeat(lead, k, axis=1), w_t / T_SCALE]).astype(np.float32)])
    project.set_weights([np.vstack([np.repeat(lead, lags * n_in, axis=1), w_p]).astype(np.float32)])
    model = tf.keras.Model(inp, out)
    return Trained(
        model=model,
        final_loss=float(np.mean(q)),  # the mean Q of the training windows: what the k components leave out
        architecture=f"PCA over {lags}×{n_in} values → {k} components ({share:.1%} of the variance), T² and Q",
        score_params={
            "components": k,
            "lags": lags,
            "t2_limit": float(limits[0]),
            "q_limit": float(limits[1]),
            "combine": "max",
            "explained": round(share, 6),
            "t_scale": T_SCALE,
            "weights": w_t.tolist(),
        },
    )


PLUGIN = ScorerPlugin(
    key=KEY,  # shipped bundles carry this key: never rename it
    scorer=PcaScorer,
    summary="PCA, score = max(T²/T²_limit, Q/Q_limit)",
    output_shape=output_shape,
    fit=fit_pca,
)
