"""What every model kind provides: a Scorer built from a loaded bundle, registered under the metadata's `score.kind`.

A kind is one module in edge_agent/scoring/ that defines `PLUGIN = ScorerPlugin(...)` (found by
edge_agent/scoring/__init__.py) or an `edge_agent.scorers` entry point. The kind-agnostic steps stay
outside it: WindowScorer (detector.py) normalises the windows, zeroes missing cells and refuses windows
with too little good data; ModelRuntime runs the TFLite model; the detector smooths and thresholds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from edge_agent.errors import ModelError

if TYPE_CHECKING:
    from edge_agent.scoring.bundle import Bundle, BundleMetadata
    from edge_agent.scoring.runtime import ModelRuntime
    from edge_agent.scoring.train import TrainOptions

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


class Scorer(Protocol):
    """One model kind's arithmetic for one loaded bundle, vectorised over the batch."""

    def score(self, x: F32, good: npt.NDArray[np.bool_] | None) -> tuple[F64, F64]:
        """Scores [batch] and each tag's share of its score [batch × inputs] for normalised windows.

        x: batch × window × inputs float32, normalised, missing cells set to 0 (the normal mean); the
        scorer may overwrite it. good: None when every cell is good (the hot path), else the mask of
        good cells, which the kind leaves out as it sees fit. Shares sum to 1 per window (all 0 when the
        score is 0). Windows with too little good data are set to NaN by the caller, not here.
        """
        ...


@dataclass(frozen=True)
class Trained:
    """What a kind's training hook hands back to the recipe (train.py), which converts and calibrates it."""

    model: Any  # a tf.keras.Model over normalised windows, converted to TFLite by the recipe
    final_loss: float  # NaN for a kind fitted without a loss (e.g. computed in closed form)
    architecture: str  # one line for the bundle's training metadata
    # kind-specific numbers the scorer needs besides the model (JSON values), stored as the bundle's
    # `score.params` and read back by the kind's scorer from `bundle.metadata.score.params`
    score_params: dict[str, Any] = field(default_factory=dict)


def window_shape(meta: BundleMetadata) -> tuple[int, ...]:
    """The model output per batch row that a reconstruction kind expects: window × inputs."""
    return (meta.window, len(meta.inputs))


@dataclass(frozen=True)
class ScorerPlugin:
    """A model kind's registration: its `score.kind` key and how to build its scorer.

    `key` is stored in every bundle of the kind: once bundles have shipped with it, it never changes.
    """

    key: str
    scorer: Callable[[Bundle, ModelRuntime], Scorer]  # built once per loaded bundle, not per window
    summary: str  # one line for `model inspect`
    output_shape: Callable[[BundleMetadata], tuple[int, ...]] = window_shape  # the model's output per batch row
    # the training recipe's model builder: fit(tf, normalised windows, options); None: `train` cannot make this kind
    fit: Callable[[Any, F32, TrainOptions], Trained] | None = None
    # a kind whose score has calibrated parts of its own (the ensemble's member thresholds) sets them here,
    # before the bundle's threshold: calibrate(bundle, scores_of, quantile, margin) → the bundle with them set,
    # where scores_of(variant) scores the calibration data with a variant of the bundle as the threshold will be
    calibrate: Callable[[Bundle, Callable[[Bundle], F64], float, float], Bundle] | None = None


SCORERS: dict[str, ScorerPlugin] = {}


def register(plugin: ScorerPlugin) -> ScorerPlugin:
    """Add a model kind to the registry under its key."""
    SCORERS[plugin.key] = plugin
    return plugin


def plugin_for(kind: str) -> ScorerPlugin:
    """The registered kind, or a one-line ModelError naming the kinds this agent knows."""
    try:
        return SCORERS[kind]
    except KeyError:
        known = ", ".join(sorted(SCORERS)) or "none"
        raise ModelError(f"unknown model kind {kind!r} (score.kind); this agent knows {known}") from None
