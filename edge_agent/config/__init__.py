"""The config file: pydantic models, YAML loading with line numbers, ${ENV}, *_file secrets, env overrides.

Loading never touches the network. Errors come back all at once, each as `FILE:LINE: path: message`.

- `schema`: the sections and the root `Config` (devices: the union of the registered drivers' models);
- `loader`: YAML with line numbers, ${ENV}, *_file secrets, EDGE_AGENT__… overrides, `load_config`/`parse_config`;
- `report`: where a problem is, as `FILE:LINE dotted.path: message`;
- `checks`: checks across items (unique names, overlaps, a device's files, model inputs).
"""

from edge_agent.config.loader import ENV_PREFIX, load_config, parse_config
from edge_agent.config.schema import (
    AgentSection,
    BuffersSection,
    CalibrateMode,
    Config,
    DeviceConfig,
    Hysteresis,
    LogFormat,
    ModelAdaptation,
    ModelCalibration,
    ModelSection,
    MqttSection,
    ObserveSection,
    OutboxSection,
    SparkplugSection,
    WhenFull,
)
from edge_agent.errors import ConfigError, ConfigIssue
from edge_agent.tls import TlsSection, TlsVerify

__all__ = [
    "ENV_PREFIX",
    "AgentSection",
    "BuffersSection",
    "CalibrateMode",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "DeviceConfig",
    "Hysteresis",
    "LogFormat",
    "ModelAdaptation",
    "ModelCalibration",
    "ModelSection",
    "MqttSection",
    "ObserveSection",
    "OutboxSection",
    "SparkplugSection",
    "TlsSection",
    "TlsVerify",
    "WhenFull",
    "load_config",
    "parse_config",
]
