"""What the commands share: exit codes, the logger, a config loaded with every problem printed, time and value text."""

from __future__ import annotations

import datetime as dt
import logging
import sys
from typing import TYPE_CHECKING, Any

from edge_agent.errors import ConfigError

if TYPE_CHECKING:
    from edge_agent.config import Config
    from edge_agent.scoring.monitor import LoadedModel

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2
log = logging.getLogger("edge_agent")


def _load(path: str) -> Config | None:
    """The config, or None after printing every problem in it."""
    return _load_with_models(path, models=False)[0]


def _load_with_models(path: str, *, models: bool = True) -> tuple[Config | None, list[LoadedModel]]:
    """The config and its model bundles loaded once (each builds an interpreter), or None after printing why."""
    from edge_agent.config import load_config  # pydantic and the drivers' config models: when a command reads a config

    try:
        cfg = load_config(path)
        if not models:
            return cfg, []
        from edge_agent.scoring.monitor import load_models  # numpy and the TFLite runtime: when models are loaded

        return cfg, load_models(cfg)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        n = len(exc.issues)
        print(f"{path}: {n} error{'s' if n != 1 else ''}, nothing started", file=sys.stderr)
        return None, []


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        # counters and the like arrive as whole floats from the buffers: print them whole
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.6g}"
    return str(value)
