"""The Sparkplug B sink (`mqtt.payloads: [sparkplug]`): `node` turns outbox rows into Sparkplug messages
(plain data, no I/O), `sink` is the edge node's MQTT connection and life cycle."""

from edge_agent.publish.sparkplug.node import BirthDevice, BirthTag, EdgeNode, devices_from_config
from edge_agent.publish.sparkplug.sink import SparkplugNode

__all__ = ["BirthDevice", "BirthTag", "EdgeNode", "SparkplugNode", "devices_from_config"]
