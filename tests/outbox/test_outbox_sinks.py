"""Per-sink delivery: with two payloads (json and sparkplug) every row reaches both sinks, each at its own pace,
and is deleted once the last one acknowledged it; files of schema version 2 are migrated."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from edge_agent.outbox import Entry, Kind, Outbox
from edge_agent.outbox.rows import SINK_BITS, sink_mask

JSON, SPB = SINK_BITS["json"], SINK_BITS["sparkplug"]


def _box(tmp_path: Path, targets: int) -> Outbox:
    box = Outbox(tmp_path / "outbox.db")
    box.targets = targets
    box.open()
    return box


def _put(box: Outbox, n: int, kind: Kind = Kind.TELEMETRY) -> None:
    box.put([Entry(f"t/{i}", f'{{"n":{i}}}'.encode(), kind) for i in range(n)])


def test_each_sink_gets_every_row_and_the_last_ack_deletes_it(tmp_path: Path) -> None:
    box = _box(tmp_path, sink_mask(["json", "sparkplug"]))
    _put(box, 3)
    by_json = box.take(10, JSON)
    assert [r.topic for r in by_json] == ["t/0", "t/1", "t/2"]
    assert box.ack([r.id for r in by_json[:2]], sink=JSON) == 2
    assert sum(box.depth.values()) == 3  # the Sparkplug sink has not delivered them yet
    assert box.take(10, JSON) == []  # nothing new for json
    by_spb = box.take(10, SPB)
    assert [r.topic for r in by_spb] == ["t/0", "t/1", "t/2"]
    assert box.ack([r.id for r in by_spb], sink=SPB) == 3
    assert sum(box.depth.values()) == 1  # t/2: json holds it, not acknowledged
    assert box.ack([by_json[2].id], sink=JSON) == 1
    assert sum(box.depth.values()) == 0 and box.in_flight == 0
    box.close()
    with sqlite3.connect(tmp_path / "outbox.db") as conn:
        assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 0


def test_a_release_gives_back_only_that_sinks_rows(tmp_path: Path) -> None:
    box = _box(tmp_path, JSON | SPB)
    _put(box, 2)
    first_json = box.take(10, JSON)
    first_spb = box.take(10, SPB)
    box.release(None, JSON)
    assert box.take(10, SPB) == []  # still held by the Sparkplug sink
    again = box.take(10, JSON)
    assert [r.id for r in again] == [r.id for r in first_json]
    box.ack([r.id for r in again], sink=JSON)
    box.ack([first_spb[0].id], sink=SPB)
    assert sum(box.depth.values()) == 1
    # a restart forgets what was in flight: the row the Sparkplug sink did not acknowledge comes back to it only
    box.close()
    box = _box(tmp_path, JSON | SPB)
    assert box.take(10, JSON) == []
    assert [r.topic for r in box.take(10, SPB)] == ["t/1"]
    box.close()


def test_acks_of_a_sink_that_never_took_the_row_change_nothing(tmp_path: Path) -> None:
    box = _box(tmp_path, JSON | SPB)
    _put(box, 1)
    row = box.take(1, JSON)[0]
    assert box.ack([row.id], sink=SPB) == 0
    assert sum(box.depth.values()) == 1
    box.close()


def test_one_sink_alone_deletes_on_its_ack(tmp_path: Path) -> None:
    box = _box(tmp_path, SPB)
    _put(box, 2)
    rows = box.take(10)  # None: the first configured sink, here the only one
    assert len(rows) == 2
    box.ack([r.id for r in rows])
    assert sum(box.depth.values()) == 0
    box.close()


def test_a_version_2_file_is_migrated_and_its_rows_go_to_the_configured_sink(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    box.open()
    _put(box, 2)
    box.close()
    # back to what an agent before per-sink delivery wrote: no pending column, schema 2
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE messages DROP COLUMN pending")
        conn.execute("PRAGMA user_version=2")
    box = Outbox(path)
    box.open()  # migrated: the rows wait for the JSON sink, the only one there was
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
        assert [r[0] for r in conn.execute("SELECT pending FROM messages ORDER BY id")] == [JSON, JSON]
    # now configured for Sparkplug alone: the stored rows are not left waiting for a sink that will not come
    assert box.set_targets(SPB) == 2
    assert [r.topic for r in box.take(10, SPB)] == ["t/0", "t/1"]
    # and with both, the rows stored for one sink stay that sink's
    _put(box, 1)
    assert box.set_targets(JSON | SPB) == 0
    assert [r.topic for r in box.take(10, JSON)] == []
    box.close()
