"""OPC UA driver (asyncua client): one session, batched reads or subscriptions, security and trust.

`mode: read` polls with the Read service, one request per chunk of the server's MaxNodesPerRead.
`mode: subscribe` creates one subscription per sampling interval; its data changes reach the
buffers under the server's timestamps. asyncua runs the connection (secure channel, session,
publish loop), but Read requests are encoded once and Read and Publish answers are decoded here
from the wire bytes, straight into the batch's columns: asyncua's generic codec builds a DataValue,
a Variant and two datetimes per value, ~15 µs a value, three times the rest of the agent's work.
That path uses a few asyncua internals (see _send_encoded); without them the driver falls back to
asyncua's public read() and decoder.
"""

from __future__ import annotations

import math

from edge_agent.drivers.base import Request, ScanGroup
from edge_agent.drivers.opcua.read import OpcUaReads
from edge_agent.drivers.opcua.session import MONITORED_ITEMS_PER_CALL
from edge_agent.drivers.opcua.subscribe import OpcUaSubscriptions


class OpcUaDriver(OpcUaReads, OpcUaSubscriptions):
    """Reads one OPC UA server over one session: batched Reads, or subscriptions with data-change filters."""

    @property
    def requests_per_cycle(self) -> dict[float, int]:
        """Read requests each polled group sends per cycle (by the server's limit once connected)."""
        out = {}
        for g in self.groups:
            plan = self._plans.get(g)
            if plan is not None:
                out[g.interval] = len(plan.chunks)
            else:
                cap = self._max_per_read or len(g.tags)
                out[g.interval] = math.ceil(len(g.tags) / cap)
        return out

    def plan(self) -> list[str]:
        """Subscribed tags per sampling interval, or Read requests per polled group."""
        lines = [f"{len(g.tags)} tags subscribed (sampling {g.interval:g}s)" for g in self.subscriptions]
        per = self.requests_per_cycle
        lines += [f"{len(g.tags)} tags every {g.interval:g}s in {per[g.interval]} requests" for g in self.groups]
        return lines

    def requests(self) -> dict[ScanGroup, list[Request]]:
        """Each polled group's Read requests (node counts), and each subscription's CreateMonitoredItems calls.

        Before a connection, the server's MaxNodesPerRead is not known: max_nodes_per_read, if set, splits them.
        """
        out: dict[ScanGroup, list[Request]] = {}
        for g in self.groups:
            plan = self._plans.get(g)
            if plan is not None:
                parts = [tuple(g.tags[c] for c in chunk.cols) for chunk in plan.chunks]
            else:
                parts = _split(g.tags, self._max_per_read or len(g.tags))
            out[g] = [Request(f"Read of {len(p)} node{'s' if len(p) != 1 else ''}", p) for p in parts]
        for g in self.subscriptions:
            parts = _split(g.tags, self._max_items_per_call or MONITORED_ITEMS_PER_CALL)
            out[g] = [Request(f"{len(p)} monitored item{'s' if len(p) != 1 else ''}", p) for p in parts]
        return out


def _split(tags: tuple[str, ...], size: int) -> list[tuple[str, ...]]:
    return [tags[i : i + size] for i in range(0, len(tags), size)]
