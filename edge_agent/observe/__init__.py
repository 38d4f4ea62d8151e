"""Observing the agent from outside: Prometheus metrics from the stages' stats(), health endpoints, JSON logs."""

from edge_agent.observe.health import Check, HealthServer
from edge_agent.observe.logs import JsonFormatter
from edge_agent.observe.metrics import (
    Metrics,
    device_metrics,
    model_metrics,
    outbox_metrics,
    publisher_metrics,
    reload_metrics,
)

__all__ = [
    "Check",
    "HealthServer",
    "JsonFormatter",
    "Metrics",
    "device_metrics",
    "model_metrics",
    "outbox_metrics",
    "publisher_metrics",
    "reload_metrics",
]
