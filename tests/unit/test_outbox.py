"""The outbox: order, bounds, drop policies, persistence, corruption, kill -9; properties with hypothesis."""

from __future__ import annotations

import io
import json
import logging
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from diskfaults import fill, small_fs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from edge_agent.config import WhenFull
from edge_agent.outbox import Entry, Kind, Outbox, OutboxError, export, outbox_stats
from edge_agent.outbox.rows import ROW_OVERHEAD
from edge_agent.records import encode, mark_historical


def entry(i: int, kind: Kind = Kind.EVENT, size: int = 100, topic: str | None = None) -> Entry:
    """A message whose payload names its number (and pads to `size` counted bytes)."""
    topic = topic or f"p/{kind.label}"
    body = json.dumps({"n": i, "pad": ""}).encode()
    pad = max(0, size - ROW_OVERHEAD - len(topic) - len(body))
    return Entry(topic, json.dumps({"n": i, "pad": "x" * pad}).encode(), kind, seq=i)


def numbers(rows: list) -> list[int]:
    return [json.loads(r.payload)["n"] for r in rows]


@pytest.fixture
def box(tmp_path: Path) -> Outbox:
    b = Outbox(tmp_path / "outbox.db", max_bytes=100_000)
    b.open()
    yield b
    b.close()


def test_put_take_ack_and_restart(tmp_path: Path) -> None:
    """Rows survive a reopen until acknowledged; acknowledged rows are gone."""
    b = Outbox(tmp_path / "o.db")
    b.open()
    assert b.put([entry(i) for i in range(5)]) == 5
    rows = b.take(3)
    assert numbers(rows) == [0, 1, 2]
    b.ack([r.id for r in rows[:2]])
    b.close()
    b.open()
    assert b.depth[Kind.EVENT] == 3
    rows = b.take(10)
    assert numbers(rows) == [2, 3, 4]
    assert all(r.run == 1 for r in rows) and b.run == 2  # written by an earlier run: historical on delivery
    b.close()


def test_events_first_order_per_kind_and_release(box: Outbox) -> None:
    """Events come before scores and telemetry whatever the insertion order; a release re-takes in order."""
    box.put([entry(i, Kind.TELEMETRY) for i in range(3)])
    box.put([entry(10 + i, Kind.EVENT) for i in range(2)] + [entry(20, Kind.SCORE)])
    first = box.take(3)
    assert [r.kind for r in first] == [Kind.EVENT, Kind.EVENT, Kind.SCORE]
    second = box.take(2)
    assert numbers(second) == [0, 1]
    box.release([second[0].id])
    again = box.take(5)
    assert numbers(again) == [0, 2]  # 1 is still in flight: never handed out twice
    assert box.take(5) == []
    box.release()
    assert numbers(box.take(10)) == [10, 11, 20, 0, 1, 2]


def test_drop_oldest_evicts_telemetry_first_and_counts(tmp_path: Path) -> None:
    """Full: telemetry gives way to events; then the oldest events; every drop is counted and persisted."""
    b = Outbox(tmp_path / "o.db", max_bytes=500, when_full="drop_oldest")
    b.open()
    b.put([entry(i, Kind.TELEMETRY) for i in range(5)])
    b.put([entry(10 + i, Kind.EVENT) for i in range(5)])
    assert b.bytes <= 500 and b.depth[Kind.TELEMETRY] == 0 and b.depth[Kind.EVENT] == 5
    assert b.counters["full.telemetry"] == 5
    b.put([entry(20 + i, Kind.EVENT) for i in range(3)])
    assert numbers(b.take(100)) == [13, 14, 20, 21, 22]
    assert b.counters["full.event"] == 3
    b.put([entry(30, Kind.TELEMETRY)])  # telemetry never evicts events (which are in flight here anyway)
    assert b.depth[Kind.TELEMETRY] == 0 and b.counters["full.telemetry"] == 6
    b.close()
    b.open()
    assert b.counters["full.telemetry"] == 6 and b.counters["full.event"] == 3
    assert outbox_stats(tmp_path / "o.db").dropped_by_kind() == {"event": 3, "score": 0, "telemetry": 6}
    b.close()


def test_drop_newest_refuses_new_rows_but_still_evicts_telemetry(tmp_path: Path) -> None:
    """drop_newest keeps what is stored; an event still pushes telemetry out."""
    b = Outbox(tmp_path / "o.db", max_bytes=1000, when_full="drop_newest")
    b.open()
    b.put([entry(i) for i in range(10)])
    assert b.put([entry(99)]) == 0
    assert b.counters["full.event"] == 1
    b.ack([r.id for r in b.take(2)])
    b.put([entry(100 + i, Kind.TELEMETRY) for i in range(2)])
    assert b.put([entry(200)]) == 1  # evicts one telemetry row
    assert b.counters["full.telemetry"] == 1
    assert numbers(b.take(100)) == [2, 3, 4, 5, 6, 7, 8, 9, 200, 101]
    b.close()


def test_in_flight_rows_are_never_evicted(tmp_path: Path) -> None:
    """A row handed to the broker cannot be dropped under it (its ack would delete nothing)."""
    b = Outbox(tmp_path / "o.db", max_bytes=500)
    b.open()
    b.put([entry(i) for i in range(5)])
    taken = b.take(5)
    assert b.put([entry(9)]) == 0  # nothing evictable: the new row is the one dropped
    assert b.ack([r.id for r in taken]) == 5 and b.bytes == 0
    b.close()


def test_max_age(tmp_path: Path) -> None:
    """Rows older than max_age are dropped and counted as age drops."""
    now = [1000.0]
    b = Outbox(tmp_path / "o.db", max_age=60, clock=lambda: now[0])
    b.open()
    b.put([entry(1), entry(2, Kind.TELEMETRY)])
    now[0] += 30
    b.put([entry(3)])
    now[0] += 40
    assert b.expire() == 2
    assert numbers(b.take(10)) == [3]
    assert b.counters["age.event"] == 1 and b.counters["age.telemetry"] == 1
    b.close()


def test_open_anomalies_and_last_seq(tmp_path: Path) -> None:
    """A start opens an anomaly, its end closes it; the highest sequence number is remembered."""
    b = Outbox(tmp_path / "o.db")
    b.open()
    b.put([Entry("t", b"{}", seq=7, opens=("m1", "a1", b"r1")), Entry("t", b"{}", seq=8, opens=("m2", "a2", b"r2"))])
    b.put([Entry("t", b"{}", seq=9, closes=("m1", "a1")), Entry("t", b"{}", seq=10, closes=("m2", "old"))])
    b.close()
    b.open()
    assert [(o.model, o.anomaly_id, o.record) for o in b.open_anomalies()] == [("m2", "a2", b"r2")]
    assert b.last_seq == 10 and b.open_count == 1
    b.put([Entry("t", b"{}", seq=11, opens=("m2", "a3", b"r3"))])  # one open anomaly per model: the newest
    assert [o.anomaly_id for o in b.open_anomalies()] == ["a3"] and b.open_count == 1
    b.close()


def test_second_process_is_refused(tmp_path: Path) -> None:
    """Two agents on one outbox would publish every row twice."""
    a = Outbox(tmp_path / "o.db")
    a.open()
    with pytest.raises(OutboxError, match="in use"):
        Outbox(tmp_path / "o.db").open()
    a.close()
    b = Outbox(tmp_path / "o.db")
    b.open()
    b.close()


@pytest.mark.parametrize("damage", ["garbage", "torn_pages", "directory"])
def test_corrupt_or_unreadable_file_is_moved_aside(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The agent goes on with a new outbox; the old file is kept for forensics and the error logged."""
    path = tmp_path / "outbox.db"
    if damage == "garbage":
        path.write_bytes(b"this is not a database" * 100)
    elif damage == "directory":
        path.mkdir()
    else:
        b = Outbox(path)
        b.open()
        b.put([entry(i, size=3000) for i in range(200)])
        b.close()
        data = bytearray(path.read_bytes())
        for off in range(8192, len(data) - 4096, 4096):  # keep the header, wreck every page after the second
            data[off + 100 : off + 400] = b"\xff" * 300
        path.write_bytes(bytes(data))
    caplog.set_level(logging.ERROR)
    b = Outbox(path)
    b.open()
    assert b.put([entry(1)]) == 1 and b.corrupt_files == 1
    moved = list(tmp_path.glob("outbox.db.corrupt-*"))
    assert len([m for m in moved if not m.name.endswith(("-wal", "-shm"))]) == 1
    assert any("moved it to" in r.getMessage() for r in caplog.records)
    b.close()


def test_stats_and_export_while_open(box: Outbox) -> None:
    """Operators can look at a live outbox: stats and a JSON-lines export in publishing order."""
    box.put([entry(1, Kind.TELEMETRY), entry(2), entry(3, Kind.SCORE)])
    stats = outbox_stats(box.path)
    assert stats.total == 3 and stats.depth == {"event": 1, "score": 1, "telemetry": 1}
    assert stats.oldest is not None
    out = io.StringIO()
    assert export(box.path, out) == 3
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(x["kind"], x["payload"]["n"]) for x in lines] == [("event", 2), ("score", 3), ("telemetry", 1)]
    with pytest.raises(OutboxError):
        outbox_stats(box.path.with_name("missing.db"))


def test_mark_historical() -> None:
    """The flag flips on the tail of our own payloads, through JSON for anything else."""
    p = encode({"a": 1, "historical": False})
    assert json.loads(mark_historical(p)) == {"a": 1, "historical": True}
    assert json.loads(mark_historical(b'{"historical": false, "b": 2}')) == {"historical": True, "b": 2}
    assert mark_historical(b"not json") == b"not json"


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


def test_stats_show_the_files_own_limits(tmp_path: Path) -> None:
    """`outbox stats PATH` shows the limits the file was written under, not the defaults."""
    path = tmp_path / "outbox.db"
    box = Outbox(path, max_bytes=2 * 1024**2, max_age=3600, when_full=WhenFull.DROP_NEWEST)
    box.open()
    box.put([Entry("t", b"{}")])
    box.close()
    st = outbox_stats(path)
    assert (st.max_bytes, st.max_age, st.when_full) == (2 * 1024**2, 3600, "drop_newest")
    out = subprocess.run(
        [sys.executable, "-m", "edge_agent", "outbox", "stats", str(path)], capture_output=True, text=True, check=True
    ).stdout
    assert "of 2097152 bytes" in out and "max_age 3600s" in out and "when_full drop_newest" in out


def test_an_outbox_on_a_full_disk_opens_and_still_deletes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A healthy outbox on a disk that filled up while the agent was stopped: it is not taken for a corrupt one;
    it opens (its reserve makes room for SQLite's -shm), rows are handed out and deleted, new writes fail."""
    with small_fs(tmp_path / "disk", "2m") as disk:
        path = disk / "outbox.db"
        b = Outbox(path)
        b.open()
        b.put([entry(i) for i in range(100)])
        b.close()
        filler = fill(disk)
        caplog.set_level(logging.WARNING)
        b.open()
        assert not list(disk.glob("outbox.db.corrupt-*")) and b.corrupt_files == 0
        rows = b.take(40)
        assert numbers(rows) == list(range(40))
        assert b.ack([r.id for r in rows]) == 40 and b.depth[Kind.EVENT] == 60
        with pytest.raises(sqlite3.OperationalError, match="full"):
            b.put([entry(1000 + i, size=3000) for i in range(300)])
        b.close()
        filler.unlink()
        b.open()
        assert numbers(b.take(100)) == list(range(40, 100))
        b.close()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


# ---------------------------------------------------------------- properties


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batches=st.lists(st.lists(st.integers(60, 400), min_size=1, max_size=20), min_size=1, max_size=15),
    max_bytes=st.integers(500, 5000),
)
def test_drop_oldest_keeps_the_newest_suffix(batches: list[list[int]], max_bytes: int) -> None:
    """One kind, nothing in flight: what stays is exactly the newest messages that fit, in order."""
    with tempfile.TemporaryDirectory() as d:
        b = Outbox(Path(d) / "o.db", max_bytes=max_bytes)
        b.open()
        sizes: list[int] = []
        for batch in batches:
            first = len(sizes)
            b.put([entry(first + k, size=s) for k, s in enumerate(batch)])
            sizes.extend(entry(first + k, size=s).size for k, s in enumerate(batch))
        kept, total = [], 0
        for i in range(len(sizes) - 1, -1, -1):
            if total + sizes[i] > max_bytes:
                break
            kept.append(i)
            total += sizes[i]
        assert numbers(b.take(10_000)) == sorted(kept)
        assert b.counters["full.event"] == len(sizes) - len(kept)
        b.close()


class OutboxMachine(RuleBasedStateMachine):
    """Random puts, takes, acks, releases and restarts against a small bounded outbox."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.box = Outbox(Path(self.dir.name) / "o.db", max_bytes=3000)
        self.box.open()
        self.n = 0
        self.put_total = 0
        self.acked = 0
        self.in_flight: dict[int, tuple[Kind, int]] = {}

    def teardown(self) -> None:
        self.box.close()
        self.dir.cleanup()

    @rule(kinds=st.lists(st.sampled_from(list(Kind)), min_size=1, max_size=12), size=st.integers(60, 500))
    def put(self, kinds: list[Kind], size: int) -> None:
        entries = [entry(self.n + k, kind, size) for k, kind in enumerate(kinds)]
        self.n += len(entries)
        self.put_total += len(entries)
        self.box.put(entries)

    @rule(n=st.integers(1, 15))
    def take(self, n: int) -> None:
        rows = self.box.take(n)
        for r in rows:
            assert r.id not in self.in_flight, "a row was handed out twice"
            self.in_flight[r.id] = (r.kind, json.loads(r.payload)["n"])
        kinds = [r.kind for r in rows]
        assert kinds == sorted(kinds), "events first, then scores, then telemetry"
        for kind in Kind:
            ns = [json.loads(r.payload)["n"] for r in rows if r.kind == kind]
            assert ns == sorted(ns), "insertion order within a kind"

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        ids = data.draw(st.lists(st.sampled_from(sorted(self.in_flight)), unique=True, min_size=1))
        self.acked += self.box.ack(ids)
        for i in ids:
            del self.in_flight[i]

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        ids = data.draw(st.lists(st.sampled_from(sorted(self.in_flight)), unique=True, min_size=1))
        self.box.release(ids)
        for i in ids:
            del self.in_flight[i]

    @rule()
    def restart(self) -> None:
        counters = dict(self.box.counters)
        self.box.close()
        self.box.open()
        self.in_flight.clear()
        assert self.box.counters == counters

    @invariant()
    def mirrors_match_the_file(self) -> None:
        conn = self.box._conn
        assert conn is not None
        count, size = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM messages").fetchone()
        assert count == sum(self.box.depth.values()) and size == self.box.bytes

    @invariant()
    def bounded(self) -> None:
        assert self.box.bytes <= self.box.max_bytes

    @invariant()
    def nothing_unaccounted(self) -> None:
        dropped = sum(self.box.counters.values())
        assert self.put_total == sum(self.box.depth.values()) + self.acked + dropped

    @invariant()
    def stored_in_put_order(self) -> None:
        for kind in Kind:
            ns = [json.loads(r.payload)["n"] for r in self.box.rows() if r.kind == kind]
            assert ns == sorted(ns)


OutboxMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=25, deadline=None)
test_outbox_state_machine = OutboxMachine.TestCase
