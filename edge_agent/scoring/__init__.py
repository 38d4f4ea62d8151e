"""On-device scoring: model bundles, the TFLite runtime, detector, calibration, replay.

Model kinds are found by scanning this package: each kind's module defines `PLUGIN` (a
base.ScorerPlugin), registered under its key in base.SCORERS. Kinds from other distributions register
through the `edge_agent.scorers` entry point group.
"""

from __future__ import annotations

from edge_agent.plugins import discover
from edge_agent.scoring.base import SCORERS, ScorerPlugin, register

# the scoring machinery, not kinds: never imported by the scan (a new kind needs no entry here)
_NOT_SCORERS = frozenset(
    {
        "base",
        "bundle",
        "calibrate",
        "detector",
        "lifecycle",
        "monitor",
        "plot",
        "replay",
        "runtime",
        "spacing",
        "table",
        "tflite_metadata",
        "train",
    }
)


def _discover() -> None:
    for plugin in discover(__name__, __path__, ScorerPlugin, skip=_NOT_SCORERS, group="edge_agent.scorers"):
        register(plugin)


_discover()


__all__ = ["SCORERS", "ScorerPlugin"]
