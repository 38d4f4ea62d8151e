"""MQTT as an input (paho): the `mqtt` device type, tags another gateway publishes as Sparkplug B or JSON."""

from edge_agent.drivers.base import DriverPlugin
from edge_agent.drivers.mqtt.config import MqttDevice

PLUGIN = DriverPlugin(
    key="mqtt",
    config=MqttDevice,
    runtime="edge_agent.drivers.mqtt.driver:MqttDriver",
    extra="mqtt",
    library="paho",
)
