"""The outbox file under real limits: the limits it was written under, and a real full disk (a tmpfs)."""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from diskfaults import fill, small_fs
from test_outbox import entry, numbers

from edge_agent.config import WhenFull
from edge_agent.outbox import Entry, Kind, Outbox, outbox_stats


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
