"""A small error hierarchy whose messages carry the device, tag or config location."""

from __future__ import annotations

from dataclasses import dataclass


class EdgeAgentError(Exception):
    """Base of every error edge-agent raises on purpose."""


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config file, located as precisely as we can."""

    source: str  # "config.yaml:12" or "env EDGE_AGENT__MQTT__URL"
    path: str  # dotted path, e.g. devices[0].tags[3].address
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.path}: {self.message}" if self.path else f"{self.source}: {self.message}"


class FieldError(ValueError):
    """Raised by a model-level validator to blame one field, so the error points at its line."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


class ConfigError(EdgeAgentError):
    """A config file that cannot be used; carries every issue found, not just the first."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


class DeviceError(EdgeAgentError):
    """A device could not be reached or answered unusably."""

    def __init__(self, device: str, message: str) -> None:
        self.device = device
        super().__init__(f"device {device}: {message}")


class DeviceStartupError(DeviceError):
    """A device with `on_startup_error: error` could not be reached at startup."""


class ModelError(EdgeAgentError):
    """A model bundle that cannot be used, or a runtime that is missing."""
