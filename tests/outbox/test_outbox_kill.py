"""The outbox after SIGKILL of the process writing to it (a subprocess)."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from edge_agent.outbox import Outbox


def numbers(rows: list) -> list[int]:
    return [json.loads(r.payload)["n"] for r in rows]


_KILL_WRITER = textwrap.dedent(
    """
    import sys
    from edge_agent.outbox import Entry, Outbox
    b = Outbox(sys.argv[1])
    b.open()
    i = 0
    while True:
        b.put([Entry("t", b'{"n": %d}' % (i + k), seq=i + k) for k in range(10)])
        i += 10
        print(i, flush=True)
    """
)


def test_survives_kill_9(tmp_path: Path) -> None:
    """Everything a put returned from is still there after SIGKILL of the writing process."""
    path = tmp_path / "o.db"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    committed = 0
    deadline = time.monotonic() + 20
    while committed < 500 and time.monotonic() < deadline:
        committed = int(proc.stdout.readline())
    proc.send_signal(signal.SIGKILL)
    proc.wait(5)
    b = Outbox(path)
    b.open()  # the lock died with the process
    rows = b.take(1_000_000)
    assert len(rows) >= committed
    assert numbers(rows) == list(range(len(rows)))
    b.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
