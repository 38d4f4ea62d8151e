"""The outbox stage: every message is written here before it is published, and deleted on the broker's ack.

`store` is the SQLite queue, `writer` the stage around it (the producers' API, the one worker thread,
and the calls a sink makes to take and acknowledge rows), `tools` the read-only operator commands.
"""

from edge_agent.outbox.rows import DROP_REASONS, Entry, Kind, OutboxBusy, OutboxError, OutboxStats, Row
from edge_agent.outbox.store import Outbox
from edge_agent.outbox.tools import export, outbox_stats

__all__ = [
    "DROP_REASONS",
    "Entry",
    "Kind",
    "Outbox",
    "OutboxBusy",
    "OutboxError",
    "OutboxStats",
    "Row",
    "export",
    "outbox_stats",
]
