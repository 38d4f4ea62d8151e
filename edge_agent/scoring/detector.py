"""From windows to scores (normalise → model → error → contributions) and from scores to anomaly events."""

from __future__ import annotations

import itertools
import math
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from edge_agent.scoring.base import Scorer, plugin_for
from edge_agent.scoring.bundle import Bundle
from edge_agent.scoring.runtime import ModelRuntime
from edge_agent.types import AnomalyEvent, EventType, severity_of

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
MIN_GOOD_FRACTION = 0.9  # windows with fewer good cells are not scored


class WindowScorer:
    """Scores batches of windows with one bundle: normalises them and hands them to the bundle's kind (base.Scorer)."""

    def __init__(self, bundle: Bundle, *, min_good: float = MIN_GOOD_FRACTION, runtime: ModelRuntime | None = None):
        meta = bundle.metadata
        self.bundle = bundle
        self.runtime = runtime or ModelRuntime(bundle)
        self.min_good = min_good
        self.plugin = plugin_for(meta.score.kind)
        self.kind: Scorer = self.plugin.scorer(bundle, self.runtime)
        self._mean = np.asarray(meta.normalisation.mean, dtype=np.float32)
        self._inv_scale = (1.0 / np.asarray(meta.normalisation.scale, dtype=np.float64)).astype(np.float32)

    def recentre(self, mean: F64) -> None:
        """Normalise from now on around `mean` (drift adaptation; the scale stays)."""
        self._mean = np.asarray(mean, dtype=np.float32)

    def score(self, values: F32, good: npt.NDArray[np.bool_]) -> tuple[F64, F64]:
        """Scores (NaN where data was insufficient) and per-tag contributions for batch × window × inputs."""
        # few, in-place numpy steps: at batch 1 the Python around the invoke is the real cost
        all_good = bool(np.logical_and.reduce(good, axis=None))
        x = values - self._mean
        x *= self._inv_scale
        if all_good:
            return self.kind.score(x, None)
        x[~good] = 0.0  # missing cells sit at the normal mean
        scores, per_tag = self.kind.score(x, good)
        scores[good.sum(axis=(1, 2)) < self.min_good * good[0].size] = np.nan
        return scores, per_tag


def new_event_id(t: float, seq: int) -> str:
    """Unique and sortable: milliseconds, sequence, randomness (ULID-like, hex)."""
    return f"{int(t * 1000):012x}{seq & 0xFFFFFFFF:08x}{secrets.token_hex(4)}"


@dataclass
class _Active:
    anomaly_id: str
    started_at: float
    window_start: float
    peak: float
    contributions: Mapping[str, float]


@dataclass
class Detector:
    """Threshold with hysteresis and a minimum duration, on optionally smoothed scores.

    Enter when the smoothed score exceeds the threshold; leave when it has been at least
    `min_duration` since the start and the smoothed score is below `exit_ratio × threshold`.
    Windows that were not scored (insufficient data) neither start nor end an anomaly.
    """

    model: str
    model_version: str
    model_sha256: str
    inputs: tuple[str, ...]
    threshold: float
    exit_ratio: float = 0.8
    min_duration: float = 5.0
    smoothing: int = 1
    agent: str = "edge-agent"
    site: str = "default"
    top_k: int = 3
    counter: Iterator[int] = field(default_factory=lambda: itertools.count(1))  # shared per agent
    _recent: deque[float] = field(default_factory=deque)
    _active: _Active | None = None
    insufficient: bool = False
    last_score: float = math.nan  # the smoothed score last compared with the threshold (NaN: not scored)
    adaptation: Callable[[], Mapping[str, float | int | bool | str]] | None = None  # drift adaptation's state

    @property
    def active(self) -> bool:
        """An anomaly is open."""
        return self._active is not None

    def smoothed(self, score: float) -> float:
        """Rolling mean of the last `smoothing` scores, this one included."""
        self._recent.append(score)
        while len(self._recent) > self.smoothing:
            self._recent.popleft()
        return float(sum(self._recent) / len(self._recent))

    def update(
        self,
        *,
        t_end: float,
        window_start: float,
        score: float,
        contributions: F64 | Mapping[str, float],
        values: Mapping[str, float | None],
    ) -> list[AnomalyEvent]:
        """Feed one window's score; returns the events it causes (none, a start, or an end)."""
        if math.isnan(score):
            self.insufficient = True
            self.last_score = math.nan
            return []
        self.insufficient = False
        s = self.last_score = self.smoothed(score)
        shares = (
            contributions
            if isinstance(contributions, Mapping)
            else dict(zip(self.inputs, map(float, contributions), strict=True))
        )
        top = dict(sorted(shares.items(), key=lambda kv: -kv[1])[: self.top_k])
        if self._active is None:
            if s > self.threshold:
                self._active = _Active(secrets.token_hex(8), t_end, window_start, s, top)
                return [self._event(EventType.START, t_end, window_start, s, top, values)]
            return []
        a = self._active
        if s > a.peak:
            a.peak, a.contributions = s, top
        if t_end - a.started_at >= self.min_duration and s < self.exit_ratio * self.threshold:
            event = self._event(EventType.END, t_end, window_start, s, a.contributions, values, "recovered")
            self._active = None
            return [event]
        return []

    def close(self, t: float, values: Mapping[str, float | None], reason: str = "shutdown") -> list[AnomalyEvent]:
        """End an open anomaly (shutdown, or `reconfigured`: the model was replaced or removed), so every start
        gets its end."""
        if self._active is None:
            return []
        a = self._active
        event = self._event(EventType.END, t, a.window_start, a.peak, a.contributions, values, reason)
        self._active = None
        return [event]

    def _event(
        self,
        kind: EventType,
        t_end: float,
        window_start: float,
        score: float,
        top: Mapping[str, float],
        values: Mapping[str, float | None],
        reason: str = "",
    ) -> AnomalyEvent:
        a = self._active
        assert a is not None
        seq = next(self.counter)
        return AnomalyEvent(
            type=kind,
            event_id=new_event_id(time.time(), seq),
            anomaly_id=a.anomaly_id,
            seq=seq,
            agent=self.agent,
            site=self.site,
            model=self.model,
            model_version=self.model_version,
            model_sha256=self.model_sha256,
            window_start=window_start,
            window_end=t_end,
            score=score,
            threshold=self.threshold,
            severity=severity_of(a.peak / self.threshold),
            contributions=dict(top),
            values=dict(values),
            started_at=a.started_at,
            peak_score=a.peak,
            reason=reason,
            adaptation=None if self.adaptation is None else self.adaptation(),
        )


def series_flags(
    scores: F64, threshold: float, *, exit_ratio: float, min_duration_windows: int, smoothing: int
) -> npt.NDArray[np.int8]:
    """The detector's anomaly state (0/1) after each score of a series: replay and benchmarks use this."""
    det = Detector(
        model="replay",
        model_version="",
        model_sha256="",
        inputs=("x",),
        threshold=threshold,
        exit_ratio=exit_ratio,
        min_duration=float(min_duration_windows),
        smoothing=smoothing,
    )
    out = np.zeros(len(scores), dtype=np.int8)
    for i, s in enumerate(scores):
        det.update(t_end=float(i), window_start=float(i), score=float(s), contributions={"x": 1.0}, values={})
        out[i] = det.active
    return out
