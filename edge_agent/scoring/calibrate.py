"""Adapt a model to one machine without TensorFlow: normalisation and threshold from normal data."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from pydantic import ValidationError

from edge_agent.scoring.base import plugin_for
from edge_agent.scoring.bundle import (
    Bundle,
    Normalisation,
    ThresholdSpec,
    bundle_from_bytes,
    embed_metadata,
    now_iso,
    one_line,
)
from edge_agent.scoring.detector import WindowScorer
from edge_agent.scoring.runtime import ModelRuntime

F64 = npt.NDArray[np.float64]
BATCH = 1024
MIN_SCALE_RATIO = 0.01  # a tag that never moved in the normal data still gets a scale of 1 % of its level
SCALINGS = ("standard", "robust")
IQR_TO_SIGMA = 0.7413  # 1 / 1.349: the interquartile range of a normal distribution is 1.349 σ
WINSOR_TO_SIGMA = 1.2145  # a normal distribution winsorised at its 10th/90th percentiles has a σ of 0.8234
WHAT = ("all", "threshold")  # what a calibration sets: normalisation and threshold, or the threshold only


def fit_normalisation(
    data: F64, *, min_scale_ratio: float = MIN_SCALE_RATIO, scaling: str = "standard"
) -> tuple[list[float], list[float]]:
    """Per-column centre and scale, floored so flat signals do not divide by ~0.

    standard: mean and standard deviation. robust: median and IQR × 0.7413 (σ for normal data), so a
    sensor's spikes or a short excursion (up to a tenth of the rows) cannot set its scale. A quantised tag
    (a pressure that takes two values) has an IQR of 0 however much it moves, so the robust scale is at
    least the standard deviation of the data winsorised at its 10th and 90th percentiles (also σ for normal
    data once corrected, and as insensitive to a tenth of spikes).
    """
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {', '.join(SCALINGS)}, not {scaling!r}")
    if scaling == "robust":
        q10, q25, centre, q75, q90 = np.nanpercentile(data, [10, 25, 50, 75, 90], axis=0)
        winsorised = WINSOR_TO_SIGMA * np.nanstd(np.clip(data, q10, q90), axis=0)
        spread = np.maximum(IQR_TO_SIGMA * (q75 - q25), winsorised)
    else:
        centre, spread = np.nanmean(data, axis=0), np.nanstd(data, axis=0)
    floor = np.maximum(min_scale_ratio * np.abs(centre), 1e-6)
    return centre.tolist(), np.maximum(spread, floor).tolist()


def sliding_windows(data: F64, window: int) -> npt.NDArray[np.float32]:
    """Every window of consecutive rows (rows − window + 1 of them), as float32."""
    if len(data) < window:
        return np.empty((0, window, data.shape[1]), dtype=np.float32)
    view = np.lib.stride_tricks.sliding_window_view(data, window, axis=0)  # rows × tags × window
    return np.ascontiguousarray(view.transpose(0, 2, 1), dtype=np.float32)


def score_series(scorer: WindowScorer, data: F64) -> F64:
    """Score every full window of a series; entry i is the window ending at row i + window − 1."""
    windows = sliding_windows(data, scorer.bundle.metadata.window)
    good = np.isfinite(windows)
    out = []
    for i in range(0, len(windows), BATCH):
        scores, _ = scorer.score(np.nan_to_num(windows[i : i + BATCH]), good[i : i + BATCH])
        out.append(scores)
    return np.concatenate(out) if out else np.empty(0)


def rolling_mean(scores: F64, smoothing: int) -> F64:
    """What the detector compares with the threshold: the mean of the last `smoothing` scores (fewer at the start)."""
    if smoothing <= 1 or scores.size == 0:
        return scores
    c = np.concatenate([[0.0], np.cumsum(scores)])
    i = np.arange(1, scores.size + 1)
    lo = np.maximum(i - smoothing, 0)
    return (c[i] - c[lo]) / (i - lo)


def normal_scores(
    bundle: Bundle,
    data: F64,
    *,
    min_scale_ratio: float = MIN_SCALE_RATIO,
    scaling: str | None = None,
    keep_normalisation: bool = False,
) -> tuple[Normalisation, F64]:
    """Normalisation fitted on `data` (rows × inputs of normal operation) and the detector's scores of it under that.

    `scaling` defaults to the bundle's own (how it was trained); with `keep_normalisation` the bundle's
    normalisation is used as it is and only the scores are computed. The scores are smoothed as the
    detector will smooth them (the bundle's `score.smoothing`), so that a quantile of them is a quantile
    of what the threshold is compared with.
    """
    meta = bundle.metadata
    if data.shape[1] != len(meta.inputs):
        raise ValueError(f"calibration data has {data.shape[1]} columns for {len(meta.inputs)} inputs")
    if len(data) < meta.window + 10:
        raise ValueError(f"calibration needs at least {meta.window + 10} rows (window {meta.window}), got {len(data)}")
    empty = [tag for tag, n in zip(meta.inputs, np.isfinite(data).sum(axis=0), strict=True) if n == 0]
    if empty:
        raise ValueError(f"the calibration data has no value of {', '.join(empty)}")
    if keep_normalisation:
        norm, scorer = meta.normalisation, WindowScorer(bundle)
    else:
        how = scaling or meta.normalisation.scaling
        mean, scale = fit_normalisation(data, min_scale_ratio=min_scale_ratio, scaling=how)
        try:
            norm = Normalisation(mean=mean, scale=scale, scaling=how)
        except ValidationError as exc:
            raise ValueError(f"cannot normalise the calibration data: {one_line(exc)}") from None
        staged = meta.model_copy(update={"normalisation": norm})
        scorer = WindowScorer(bundle_from_bytes(embed_metadata(bundle.data, staged)), runtime=ModelRuntime(bundle))
    scores = score_series(scorer, data)
    scores = scores[np.isfinite(scores)]
    if scores.size == 0:
        raise ValueError("no window of the calibration data had enough good values")
    return norm, rolling_mean(scores, meta.score.smoothing)


def threshold_of(scores: F64, quantile: float, margin: float) -> float:
    """quantile × margin of normal scores, to 6 significant digits.

    The last digits of a score follow the order of numpy's sums, which a faster scoring step may
    change; six digits are more than a threshold means, and keep a rebuilt bundle byte-identical.
    """
    return max(float(f"{float(np.quantile(scores, quantile)) * margin:.6g}"), 1e-9)


def calibrate(
    bundle: Bundle,
    data: F64,
    *,
    quantile: float = 0.99,
    margin: float = 1.5,
    source: str = "",
    min_scale_ratio: float = MIN_SCALE_RATIO,
    what: str = "all",
    scaling: str | None = None,
    floor: float = 0.0,
) -> Bundle:
    """A new bundle whose normalisation and threshold come from `data` (rows × inputs of normal operation).

    what="threshold" keeps the bundle's normalisation and sets only the threshold. `scaling` (standard |
    robust) defaults to the bundle's. The threshold is quantile × margin of the data's scores, never below the
    bundle's `threshold.floor` (train --threshold-floor) nor below `floor` × the bundle's own threshold, so a
    calibration on a quiet stretch cannot set it far below what the model was made with; the new bundle keeps
    the higher of the two as its floor, for the calibrations after it. A kind's own calibrated parts (an
    ensemble's member thresholds) are set first, from the same data.
    """
    if what not in WHAT:
        raise ValueError(f"a calibration sets {' or '.join(WHAT)}, not {what!r}")
    if not (math.isfinite(floor) and floor >= 0):
        raise ValueError(f"the threshold floor is a multiple of the bundle's threshold (≥ 0), not {floor}")
    original = bundle

    def scores_of(b: Bundle) -> F64:
        return normal_scores(
            b, data, min_scale_ratio=min_scale_ratio, scaling=scaling, keep_normalisation=what == "threshold"
        )[1]

    own = plugin_for(bundle.metadata.score.kind).calibrate
    if own is not None:
        bundle = own(bundle, scores_of, quantile, margin)
    norm, scores = normal_scores(
        bundle, data, min_scale_ratio=min_scale_ratio, scaling=scaling, keep_normalisation=what == "threshold"
    )
    base = original.metadata.threshold
    lowest = max(base.floor, float(f"{floor * base.value:.6g}")) if floor else base.floor
    value = max(threshold_of(scores, quantile, margin), lowest)
    try:
        threshold = ThresholdSpec(
            value=value,
            quantile=quantile,
            margin=margin,
            calibrated_on=source,
            rows=len(data),
            calibrated_at=now_iso(),
            base_sha256=original.sha256,  # lets startup calibration tell a saved copy of this bundle from a stale one
            calibrated=what,
            floor=lowest,
        )
    except ValidationError as exc:  # a margin of nan or inf: the bundle would never alarm
        raise ValueError(f"no usable threshold (quantile {quantile:g} × margin {margin:g}): {one_line(exc)}") from None
    final = bundle.metadata.model_copy(update={"normalisation": norm, "threshold": threshold})
    return bundle_from_bytes(embed_metadata(bundle.data, final))
