"""Publishing: versioned payloads and their JSON Schemas, the MQTT publisher, operator commands on the outbox."""

from edge_agent.outbox import Outbox, OutboxError, OutboxStats, export, outbox_stats
from edge_agent.publish.mqtt import (
    DrainResult,
    MqttPublisher,
    MqttSetupError,
    PublisherStats,
    drain,
    new_counter,
    restart_end,
    tls_problems,
)
from edge_agent.publish.payloads import event_payload, load_schema, score_payload, status_payload, telemetry_payload

__all__ = [
    "DrainResult",
    "MqttPublisher",
    "MqttSetupError",
    "Outbox",
    "OutboxError",
    "OutboxStats",
    "PublisherStats",
    "drain",
    "event_payload",
    "export",
    "load_schema",
    "new_counter",
    "outbox_stats",
    "restart_end",
    "score_payload",
    "status_payload",
    "telemetry_payload",
    "tls_problems",
]
