"""Damaged outbox files: real SQLite files, damaged as disks and people damage them.

A process writes events one committed transaction at a time and dies without closing (as kill -9 leaves it:
a WAL beside the main file); then the main file is truncated, or the WAL gets random bytes in its middle.
The next open must notice, move the files aside, recover what still reads, and say and count what was lost.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edge_agent.observe import outbox_metrics
from edge_agent.outbox import Entry, Kind, Outbox, outbox_stats
from edge_agent.outbox.writer import WriterStats

_WRITE_AND_DIE = textwrap.dedent(
    """
    import json, os, sys
    from edge_agent.outbox import Entry, Outbox
    b = Outbox(sys.argv[1])
    b.open()
    for i in range(int(sys.argv[2])):
        payload = json.dumps({"n": i, "pad": "x" * 600}).encode()
        b.put([Entry("acme/line-3/events/pump", payload, seq=i + 1)])
    os._exit(0)  # no close, no checkpoint: the WAL stays, as after kill -9
    """
)


def write_and_die(path: Path, n: int) -> None:
    """n events in n transactions by a process that then dies; the WAL is left beside the main file."""
    subprocess.run([sys.executable, "-c", _WRITE_AND_DIE, str(path), str(n)], check=True, timeout=120)
    assert path.with_name(path.name + "-wal").stat().st_size > 0


def damage_log(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.name == "edge_agent.outbox"]


def numbers_left(box: Outbox) -> list[int]:
    return [json.loads(r.payload)["n"] for r in box.take(1_000_000)]


def metric_drops(box: Outbox, reason: str) -> int:
    st = WriterStats(0, 0, 0, box.quick_stats().dropped, None, None, box.quick_stats())
    families = {f.name: f for f in outbox_metrics(st)}
    return int(sum(s.value for s in families["edge_agent_outbox_dropped"].samples if s.labels["reason"] == reason))


def test_main_file_truncated_to_zero_beside_its_wal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """400 committed events, main file truncated to 0 bytes with a 4 MB WAL beside it: moved aside, the rows the
    WAL still holds recovered, the rest counted as lost (log, stats, metrics)."""
    path = tmp_path / "outbox.db"
    write_and_die(path, 400)
    assert path.with_name("outbox.db-wal").stat().st_size > 3_000_000
    os.truncate(path, 0)
    caplog.set_level(logging.ERROR)
    box = Outbox(path)
    box.open()
    (line,) = damage_log(caplog)
    recovered = numbers_left(box)
    assert recovered == sorted(recovered) and len(set(recovered)) == len(recovered)
    lost = 400 - len(recovered)
    assert f"recovered {len(recovered)} rows" in line and f"{lost} rows" in line, line
    assert "main file empty" in line, line
    moved = [p for p in tmp_path.glob("outbox.db.corrupt-*") if not p.name.endswith("-wal")]
    assert len(moved) == 1 and moved[0].with_name(moved[0].name + "-wal").stat().st_size > 3_000_000
    assert os.path.getsize(moved[0]) == 0  # left as it was found
    stats = box.quick_stats()
    assert stats.corrupt_files == 1 and stats.dropped["corrupt.event"] == lost
    assert metric_drops(box, "corrupt") == lost
    assert stats.last_seq == 400  # the sequence goes on after the last committed event
    box.close()
    assert outbox_stats(path).dropped_by_reason()["corrupt"] == lost  # persisted


def test_random_bytes_in_the_middle_of_the_wal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """411 committed events, 4 KiB of random bytes in the middle of the WAL: SQLite alone would drop every
    transaction after the damage without a word; the loss is logged and counted, rows before it recovered."""
    path = tmp_path / "outbox.db"
    write_and_die(path, 411)
    wal = path.with_name("outbox.db-wal")
    data = bytearray(wal.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = random.Random(7).randbytes(4096)
    wal.write_bytes(bytes(data))
    caplog.set_level(logging.ERROR)
    box = Outbox(path)
    box.open()
    (line,) = damage_log(caplog)
    recovered = numbers_left(box)
    lost = 411 - len(recovered)
    assert recovered == list(range(len(recovered))) and lost > 0  # everything before the damage, in order
    assert "committed transactions" in line and f"recovered {len(recovered)} rows" in line, line
    assert f"at least {lost} rows" in line, line  # no acks among the lost transactions: the count is exact
    stats = box.quick_stats()
    assert stats.corrupt_files == 1 and stats.lost_transactions > 0 and stats.dropped["corrupt.event"] == lost
    assert stats.last_seq == 411
    assert len([p for p in tmp_path.glob("outbox.db.corrupt-*-wal")]) == 1
    box.close()


def test_a_torn_last_transaction_is_not_damage(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Random bytes at the very end of the WAL (a write torn by a power cut): no committed transaction follows,
    so nothing is moved aside and nothing is reported."""
    path = tmp_path / "outbox.db"
    write_and_die(path, 50)
    wal = path.with_name("outbox.db-wal")
    data = bytearray(wal.read_bytes())
    data[-1000:] = random.Random(3).randbytes(1000)
    wal.write_bytes(bytes(data))
    caplog.set_level(logging.ERROR)
    box = Outbox(path)
    box.open()
    assert damage_log(caplog) == [] and not list(tmp_path.glob("*.corrupt-*"))
    assert len(numbers_left(box)) == 49  # the torn one was never committed
    box.close()


def test_a_payload_changed_on_disk_is_never_handed_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Bytes changed inside a stored payload: the row fails its checksum when taken, is dropped and counted."""
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    box.open()
    box.put([Entry("t/events/m", json.dumps({"n": i, "id": f"event-{i:04d}"}).encode(), seq=i) for i in range(20)])
    box.close()
    data = path.read_bytes()
    at = data.index(b"event-0007")
    path.write_bytes(data[:at] + b"EVENT" + data[at + 5 :])
    caplog.set_level(logging.ERROR)
    box.open()
    assert [n for n in numbers_left(box)] == [i for i in range(20) if i != 7]
    (line,) = damage_log(caplog)
    assert "failed their checksum" in line
    assert box.quick_stats().dropped["corrupt.event"] == 1 and box.depth[Kind.EVENT] == 19
    box.close()


def test_an_outbox_written_before_checksums_is_migrated(tmp_path: Path) -> None:
    """A schema 1 file (no checksum column): its rows are still handed out; new rows get a checksum."""
    path = tmp_path / "outbox.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(
            """
            CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, kind INTEGER NOT NULL, qos INTEGER NOT NULL,
                created REAL NOT NULL, run INTEGER NOT NULL, size INTEGER NOT NULL, topic TEXT NOT NULL,
                payload BLOB NOT NULL);
            CREATE INDEX messages_by_kind ON messages(kind, id, size, created);
            CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
            CREATE TABLE open_anomalies (model TEXT PRIMARY KEY, anomaly_id TEXT NOT NULL, record BLOB NOT NULL)
                WITHOUT ROWID;
            PRAGMA user_version=1;
            """
        )
        conn.execute(
            "INSERT INTO messages(kind, qos, created, run, size, topic, payload) VALUES (0, 1, 1.0, 1, 60, 't', ?)",
            (b'{"n": 0}',),
        )
        conn.execute("INSERT INTO counters VALUES ('seq', 5)")
    box = Outbox(path)
    box.open()
    box.put([Entry("t", b'{"n": 1}', seq=6)])
    assert numbers_left(box) == [0, 1] and box.last_seq == 6
    box.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
        assert [r[0] is None for r in conn.execute("SELECT crc FROM messages ORDER BY id")] == [True, False]
        # and through version 3: every row waits for the JSON sink, the only one there was
        assert [r[0] for r in conn.execute("SELECT pending FROM messages ORDER BY id")] == [1, 1]
