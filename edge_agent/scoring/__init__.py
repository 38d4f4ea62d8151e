"""On-device scoring: model bundles, the TFLite runtime, detector, calibration, replay.

Model kinds are found by scanning this package: each kind's module defines `PLUGIN` (a
base.ScorerPlugin), registered under its key in base.SCORERS. Kinds from other distributions register
through the `edge_agent.scorers` entry point group.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

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
        "tflite_metadata",
        "train",
    }
)


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name in _NOT_SCORERS or info.name.startswith("_"):
            continue
        plugin = getattr(importlib.import_module(f"{__name__}.{info.name}"), "PLUGIN", None)
        if isinstance(plugin, ScorerPlugin):
            register(plugin)
    for ep in entry_points(group="edge_agent.scorers"):
        plugin = ep.load()
        if isinstance(plugin, ScorerPlugin):
            register(plugin)


_discover()

__all__ = ["SCORERS", "ScorerPlugin"]
