"""`edge-agent outbox drain`: publish everything an outbox holds, with no agent running."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from edge_agent.config import MqttSection, OutboxSection
from edge_agent.outbox.writer import OutboxWriter
from edge_agent.publish import deliver
from edge_agent.publish.mqtt import MqttPublisher


@dataclass(frozen=True)
class DrainResult:
    """What `edge-agent outbox drain` did."""

    sent: int
    left: int
    seconds: float

    @property
    def complete(self) -> bool:
        """Nothing is left in the outbox."""
        return self.left == 0


async def drain(
    mqtt: MqttSection,
    outbox: OutboxSection,
    *,
    agent_id: str,
    site: str = "default",
    version: str = "",
    max_seconds: float | None = None,
) -> DrainResult:
    """Publish everything in an outbox to the broker; return once it is empty (or after max_seconds).

    Every row goes out as JSON, also rows stored for a Sparkplug sink. Refuses (OutboxError) while an agent
    holds the outbox. Uses the client id `<client id>-drain`, so a
    running agent with the same id is not disconnected.
    """
    # drain speaks JSON: every stored row goes out on its JSON topic, whichever payloads the config names (a
    # Sparkplug node's data only means something after its births, which need the running agent's state)
    mqtt = mqtt.model_copy(update={"payloads": ["json"], "sparkplug": None})
    writer = OutboxWriter(outbox, mqtt, agent_id=agent_id, site=site)
    pub = MqttPublisher(
        mqtt, writer, agent_id=agent_id, site=site, version=version, client_id=f"{mqtt.client_id or agent_id}-drain"
    )
    started = time.monotonic()
    await writer.open(strict=True)  # nothing to drain from a file that cannot be opened
    before = writer.depth
    task = asyncio.create_task(deliver(writer, pub), name="outbox:drain")
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max_seconds):
                await pub.wait_drained()
    finally:
        left = writer.depth
        pub.stop()
        await task
    return DrainResult(sent=before - left, left=left, seconds=time.monotonic() - started)
