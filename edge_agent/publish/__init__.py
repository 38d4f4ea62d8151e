"""The publish stage: sinks that take rows from the outbox, hand them to a broker and acknowledge them back.

A sink is one module with a class that follows `Sink` and an entry in SINKS (its key is the name used
in config); its client library is imported only when a sink of that kind is built. The JSON MQTT sink
(`mqtt`) publishes the agent's records as they are; the Sparkplug B sink (`sparkplug/`) is an edge node.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from edge_agent.config import MqttSection
    from edge_agent.outbox.writer import OutboxWriter


class Sink(Protocol):
    """What the agent needs of a sink: run until stopped, say whether it is connected, report stats."""

    @property
    def connected(self) -> bool:
        """The broker accepted the connection and it has not been lost since."""

    async def run(self) -> None:
        """Take rows from the outbox and publish them until stop(); acknowledged rows are deleted."""

    def stop(self, reason: str = "shutdown") -> None:
        """Ask run() to finish (`reason`: shutdown, or reconfigured when another sink takes over)."""

    async def wait_drained(self) -> None:
        """Wait until everything written so far is acknowledged (bound it with asyncio.timeout)."""

    def stats(self) -> Any:
        """A frozen snapshot of the sink's state and counters."""

    def refresh_status(self) -> None:
        """Say again what the agent runs (after a reload), where the sink has such a message."""


SINKS: dict[str, str] = {
    "json": "edge_agent.publish.mqtt:MqttPublisher",
    "sparkplug": "edge_agent.publish.sparkplug:SparkplugNode",
}


# operator commands and errors the CLI uses, imported only when asked for (paho is not needed for --help)
_LAZY = {
    "MqttSetupError": "edge_agent.publish.client",
    "tls_problems": "edge_agent.publish.client",
    "drain": "edge_agent.publish.tools",
    "DrainResult": "edge_agent.publish.tools",
    "OutboxError": "edge_agent.outbox",
    "export": "edge_agent.outbox",
    "outbox_stats": "edge_agent.outbox",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


async def deliver(outbox: OutboxWriter, sink: Sink) -> None:
    """Run the outbox's writer beside a sink until the sink stops (or this is cancelled); then close the outbox.

    The outbox must be open. Closing it writes what producers queued meanwhile, so nothing submitted is lost.
    """
    writer = asyncio.create_task(outbox.run(), name="outbox")
    try:
        await sink.run()
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        await outbox.close()


def build_sink(mqtt: MqttSection, outbox: OutboxWriter, **kwargs: Any) -> Sink:
    """The sink `mqtt.payloads` asks for, built now (each sink takes the keywords it knows: agent_id, site,
    version, describe for the JSON one; devices (validated device sections) and models for Sparkplug)."""
    keys = sorted(mqtt.payloads, key=lambda k: k != "json")  # the JSON sink first: its stats are the agent's
    if len(keys) == 1:
        return _build(keys[0], mqtt, outbox, kwargs)
    from edge_agent.publish.both import Sinks

    return Sinks([_build(k, mqtt, outbox, kwargs) for k in keys])


def _build(key: str, mqtt: MqttSection, outbox: OutboxWriter, kwargs: dict[str, Any]) -> Sink:
    cls = sink_class(key)
    if key == "sparkplug":
        from edge_agent.publish.sparkplug import devices_from_config

        args = {k: kwargs[k] for k in ("agent_id", "models") if k in kwargs}
        sink: Sink = cls(mqtt, outbox, devices=devices_from_config(kwargs.get("devices", ())), **args)
        return sink
    known = ("agent_id", "site", "version", "describe")
    json_sink: Sink = cls(mqtt, outbox, **{k: kwargs[k] for k in known if k in kwargs})
    return json_sink


def sink_stats(sink: Sink) -> list[Any]:
    """The stats snapshot of every sink `sink` runs (two under mqtt.payloads: [json, sparkplug])."""
    from edge_agent.publish.both import Sinks

    return sink.every_stats() if isinstance(sink, Sinks) else [sink.stats()]


def sink_class(key: str) -> type[Any]:
    """The sink class registered under `key`, imported now."""
    module, _, attr = SINKS[key].partition(":")
    cls: type[Any] = getattr(importlib.import_module(module), attr)
    return cls


__all__ = ["SINKS", "Sink", "build_sink", "deliver", "sink_class", "sink_stats"]
