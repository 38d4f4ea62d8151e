"""edge-agent: PLC tags in, on-device anomaly scoring, MQTT events out."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_agent.config import Config, load_config, parse_config
    from edge_agent.errors import ConfigError, DeviceError, EdgeAgentError
    from edge_agent.types import Quality, Sample, SampleBatch, Window

__version__ = "0.1.0"
__all__ = [
    "Config",
    "ConfigError",
    "DeviceError",
    "EdgeAgentError",
    "Quality",
    "Sample",
    "SampleBatch",
    "Window",
    "__version__",
    "load_config",
    "parse_config",
]

# imported on first use: `import edge_agent` (the CLI's --help, a look at __version__) loads neither pydantic,
# numpy nor any driver
_LAZY = {
    "Config": "edge_agent.config",
    "load_config": "edge_agent.config",
    "parse_config": "edge_agent.config",
    "ConfigError": "edge_agent.errors",
    "DeviceError": "edge_agent.errors",
    "EdgeAgentError": "edge_agent.errors",
    "Quality": "edge_agent.types",
    "Sample": "edge_agent.types",
    "SampleBatch": "edge_agent.types",
    "Window": "edge_agent.types",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once found, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
