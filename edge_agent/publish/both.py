"""Several sinks on one outbox (mqtt.payloads: [json, sparkplug]): each takes and acknowledges its own rows.

The outbox keeps a row until every configured sink delivered it (its `pending` bits), so each sink runs at
its own pace on its own connection: a primary host that is offline holds the Sparkplug node back, not the
JSON publisher. This only runs them side by side and answers for them together.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_agent.publish import Sink


class Sinks:
    """Sinks run together: stopped together, drained together; stats and status are the first one's."""

    def __init__(self, sinks: Sequence[Sink]) -> None:
        self.sinks = list(sinks)

    def __repr__(self) -> str:
        return f"Sinks({', '.join(map(repr, self.sinks))})"

    @property
    def connected(self) -> bool:
        """Every sink's broker connection is up."""
        return all(s.connected for s in self.sinks)

    async def run(self) -> None:
        """Run every sink until each is stopped (one failing stops the others)."""
        async with asyncio.TaskGroup() as tg:
            for sink in self.sinks:
                tg.create_task(sink.run())

    def stop(self, reason: str = "shutdown") -> None:
        """Ask every sink to finish."""
        for sink in self.sinks:
            sink.stop(reason)

    async def wait_drained(self) -> None:
        """Until every sink delivered everything (bound it with asyncio.timeout)."""
        for sink in self.sinks:
            await sink.wait_drained()

    def stats(self) -> Any:
        """The first sink's stats (the JSON publisher's: its metrics and status are the agent's)."""
        return self.sinks[0].stats()

    def every_stats(self) -> list[Any]:
        """Every sink's stats, in order (each labelled with its sink in /metrics)."""
        return [s.stats() for s in self.sinks]

    def refresh_status(self) -> None:
        """Every sink says again what the agent runs."""
        for sink in self.sinks:
            sink.refresh_status()
