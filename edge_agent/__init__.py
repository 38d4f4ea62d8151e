"""edge-agent: PLC tags in, on-device anomaly scoring, MQTT events out."""

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
