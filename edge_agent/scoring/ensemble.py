"""Model kind `ensemble`: several kinds' models side by side in one graph, each score divided by its own threshold.

The bundle's graph holds the members' models on the same input window, their outputs flattened and
concatenated. The scorer hands each member its slice of the output and scores it with the member kind's
own scorer (the plugin's, unchanged), divides each member's score by that member's calibrated threshold
and combines the ratios: `max` (the default: a window is anomalous when any member alone would say so;
a fault that one member sees is not averaged away by a member that does not) or `mean`. A ratio of 1 is
each member's own alarm level, so the bundle's threshold comes out near 1.

Calibration sets the member thresholds first (`calibrate` below, called by scoring/calibrate.py), from
each member's scores of the calibration windows, then the bundle's threshold from the combined score.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_agent.errors import ModelError
from edge_agent.scoring.base import F32, F64, Scorer, ScorerPlugin, Trained, plugin_for
from edge_agent.scoring.bundle import (
    Bundle,
    BundleMetadata,
    Normalisation,
    ScoreSpec,
    ThresholdSpec,
    bundle_from_bytes,
    embed_metadata,
    one_line,
)
from edge_agent.scoring.calibrate import threshold_of

if TYPE_CHECKING:
    from collections.abc import Callable

    from edge_agent.scoring.runtime import ModelRuntime
    from edge_agent.scoring.train import TrainOptions

KEY = "ensemble"
MEMBERS = ("reconstruction_mse", "pca_t2q")  # what `train --kind ensemble` fits


class Member(BaseModel):
    """One member in the bundle's `score.params.members`: its kind, its own score params and threshold."""

    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)

    kind: str
    params: dict[str, Any] = Field(default_factory=dict)
    # bounded so that no ratio overflows (threshold_of floors a threshold at 1e-9)
    threshold: float = Field(ge=1e-9, le=1e30, description="the member's own calibrated threshold")


class EnsembleParams(BaseModel):
    """The kind's part of the bundle's `score.params`."""

    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)

    members: list[Member] = Field(min_length=1)
    combine: Literal["max", "mean"] = "max"
    # score with this member alone, not divided by its threshold: how calibration sets member thresholds
    only: int | None = None


def params_of(meta: BundleMetadata) -> EnsembleParams:
    """The bundle's ensemble parameters, validated; a ModelError names the field that is wrong."""
    try:
        p = EnsembleParams.model_validate(meta.score.params)
    except ValidationError as exc:
        raise ModelError(f"invalid score.params for {KEY}: {one_line(exc)}") from None
    for m in p.members:
        if m.kind == KEY:
            raise ModelError(f"an {KEY} cannot be a member of an {KEY}")
        plugin_for(m.kind)  # a ModelError naming the kinds this agent knows
    if p.only is not None and not 0 <= p.only < len(p.members):
        raise ModelError(f"score.params.only is {p.only}, the ensemble has {len(p.members)} members")
    return p


def member_meta(meta: BundleMetadata, member: Member) -> BundleMetadata:
    """The bundle's metadata as the member kind would have it alone."""
    score = meta.score.model_copy(update={"kind": member.kind, "params": member.params})
    return meta.model_copy(update={"score": score})


def member_shapes(meta: BundleMetadata) -> list[tuple[int, ...]]:
    """Each member model's output per window."""
    return [plugin_for(m.kind).output_shape(member_meta(meta, m)) for m in params_of(meta).members]


def output_shape(meta: BundleMetadata) -> tuple[int, ...]:
    """The members' outputs, flattened and concatenated."""
    return (sum(int(np.prod(s)) for s in member_shapes(meta)),)


class _Slice:
    """What a member's scorer sees as its runtime: its part of the ensemble's one model output."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape
        self.out: F32 = np.empty((0, *shape), np.float32)

    def run(self, x: F32) -> F32:
        """The member's slice of the output set for this batch (its own cells: a member may write into them)."""
        return self.out


class EnsembleScorer:
    """Each member's score over its own threshold, combined; shares from the members, weighted alike."""

    def __init__(self, bundle: Bundle, runtime: ModelRuntime) -> None:
        meta = bundle.metadata
        p = params_of(meta)
        self.runtime = runtime
        self.combine, self.only = p.combine, p.only
        self.inv_threshold = np.asarray([1.0 / m.threshold for m in p.members])
        self.slices: list[_Slice] = []
        self.members: list[Scorer] = []
        self.bounds: list[tuple[int, int]] = []
        start = 0
        for m, shape in zip(p.members, member_shapes(meta), strict=True):
            view = _Slice(shape)
            own = Bundle(bundle.data, bundle.sha256, member_meta(meta, m), bundle.path)
            self.members.append(plugin_for(m.kind).scorer(own, view))  # type: ignore[arg-type]
            self.slices.append(view)
            size = int(np.prod(shape))
            self.bounds.append((start, start + size))
            start += size

    def member_scores(self, x: F32, good: npt.NDArray[np.bool_] | None) -> tuple[F64, F64]:
        """Each member's raw score [batch × members] and shares [batch × members × inputs]."""
        out = self.runtime.run(x)  # a fresh array: each member's slice of it is that member's to write into
        batch, last = x.shape[0], len(self.members) - 1
        scores = np.empty((batch, last + 1))
        shares = np.empty((batch, last + 1, x.shape[2]))
        for i, (scorer, view, (a, b)) in enumerate(zip(self.members, self.slices, self.bounds, strict=True)):
            view.out = out[:, a:b].reshape(batch, *view.shape)
            # a copy for all but the last: a kind's scorer may overwrite its input
            scores[:, i], shares[:, i] = scorer.score(x if i == last else x.copy(), good)
        return scores, shares

    def score(self, x: F32, good: npt.NDArray[np.bool_] | None) -> tuple[F64, F64]:
        """See base.Scorer."""
        raw, shares = self.member_scores(x, good)
        if self.only is not None:
            return raw[:, self.only], shares[:, self.only]
        raw *= self.inv_threshold
        if self.combine == "max":
            if len(raw) == 1:  # the live agent's batch: plain indexing is cheaper than fancy indexing
                i = int(raw[0].argmax())
                return raw[:, i], shares[:, i]
            pick = raw.argmax(axis=1)
            rows = np.arange(len(pick))
            return raw[rows, pick], shares[rows, pick]
        weight = np.add.reduce(raw, axis=1)
        combined = np.einsum("bm,bmi->bi", raw, shares)
        combined /= np.maximum(weight, 1e-30)[:, None]
        return weight / raw.shape[1], combined


def with_params(bundle: Bundle, params: EnsembleParams) -> Bundle:
    """The bundle with other ensemble parameters."""
    meta = bundle.metadata
    score = meta.score.model_copy(update={"params": params.model_dump(mode="json")})
    return bundle_from_bytes(embed_metadata(bundle.data, meta.model_copy(update={"score": score})))


def calibrate(bundle: Bundle, scores_of: Callable[[Bundle], F64], quantile: float, margin: float) -> Bundle:
    """Each member's threshold from its own scores of the calibration data (quantile × margin, as the bundle's)."""
    p = params_of(bundle.metadata)
    members = []
    for i, m in enumerate(p.members):
        alone = with_params(bundle, p.model_copy(update={"only": i}))
        members.append(m.model_copy(update={"threshold": threshold_of(scores_of(alone), quantile, margin)}))
    return with_params(bundle, p.model_copy(update={"members": members, "only": None}))


def fit_ensemble(tf: Any, windows: F32, options: TrainOptions) -> Trained:
    """Fit each member kind on the same windows and put their models side by side in one graph."""
    trained = []
    for kind in MEMBERS:
        fit = plugin_for(kind).fit
        if fit is None:
            raise ModelError(f"ensemble member {kind} has no training recipe")
        trained.append(fit(tf, windows, options))
    inp = tf.keras.layers.Input(shape=windows.shape[1:])
    outs = [tf.keras.layers.Flatten()(t.model(inp)) for t in trained]
    model = tf.keras.Model(inp, tf.keras.layers.Concatenate()(outs))
    # first member thresholds from the training windows; calibration (or train's hold-out) replaces them
    predicted = model.predict(windows, batch_size=1024, verbose=0)
    members, start = [], 0
    for kind, t in zip(MEMBERS, trained, strict=True):
        view = _Slice(tuple(int(d) for d in t.model.output.shape[1:]))
        size = int(np.prod(view.shape))
        view.out = predicted[:, start : start + size].reshape(len(windows), *view.shape)
        start += size
        scorer = plugin_for(kind).scorer(_Stub(options, kind, t.score_params), view)  # type: ignore[arg-type]
        s, _ = scorer.score(windows.copy(), None)
        threshold = threshold_of(s, options.quantile, options.margin)
        members.append({"kind": kind, "params": t.score_params, "threshold": threshold})
    return Trained(
        model=model,
        final_loss=float(sum(t.final_loss for t in trained)),
        architecture=" + ".join(f"[{t.architecture}]" for t in trained) + ", score = max of member score/threshold",
        score_params={"members": members, "combine": "max"},
    )


class _Stub:
    """The little of a Bundle a member's scorer reads at fit time: metadata with the member's score params."""

    def __init__(self, options: TrainOptions, kind: str, params: dict[str, Any]) -> None:
        n = len(options.inputs)
        self.metadata = BundleMetadata(
            name=options.name,
            inputs=list(options.inputs),
            window=options.window,
            sample_interval=options.sample_interval,
            normalisation=Normalisation(mean=[0.0] * n, scale=[1.0] * n),
            score=ScoreSpec(kind=kind, params=params),
            threshold=ThresholdSpec(value=1.0),
        )


PLUGIN = ScorerPlugin(
    key=KEY,  # shipped bundles carry this key: never rename it
    scorer=EnsembleScorer,
    summary="members side by side, score = max over members of score / member threshold",
    output_shape=output_shape,
    fit=fit_ensemble,
    calibrate=calibrate,
)
