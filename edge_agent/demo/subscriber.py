"""The demo's MQTT subscriber: what a SCADA system would receive from the agent."""

from __future__ import annotations

import asyncio
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edge_agent.demo.config import PREFIX, SPARKPLUG_GROUP


class Subscriber:
    """A paho subscriber to `{prefix}/#`; messages reach the event loop through a queue."""

    def __init__(self, port: int, loop: asyncio.AbstractEventLoop, *, sparkplug: bool = False) -> None:
        self.sparkplug = sparkplug  # also spBv1.0/{group}/# (the agent as a Sparkplug edge node)
        self.queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._loop = loop
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id="edge-agent-demo-view", protocol=MQTTProtocolVersion.MQTTv311
        )
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._port = port

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        client.subscribe(f"{PREFIX}/#", qos=1)  # again after every reconnect
        if self.sparkplug:
            client.subscribe(f"spBv1.0/{SPARKPLUG_GROUP}/#", qos=0)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        self._loop.call_soon_threadsafe(self.queue.put_nowait, (msg.topic, bytes(msg.payload)))

    def start(self) -> None:
        """Connect (retrying in paho's thread) and start receiving."""
        self._client.connect_async("127.0.0.1", self._port, keepalive=10)
        self._client.loop_start()

    def stop(self) -> None:
        """Disconnect and stop paho's thread."""
        self._client.disconnect()
        self._client.loop_stop()
