"""`edge-agent … | head`: the reader leaving early is no error worth a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from edge_agent.outbox import Entry, Outbox


def test_export_into_a_closed_pipe_prints_no_traceback(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        box.put([Entry("t/events/pump", b'{"n": %d, "pad": "%s"}' % (i, b"x" * 200), seq=i) for i in range(5000)])
    cmd = f"{sys.executable} -m edge_agent outbox export {path} | head -n 1"
    r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert r.stdout.count("\n") == 1 and '"n":0' in r.stdout.replace(" ", "")
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr
    assert r.returncode == 141  # the shell's code for a writer stopped by a closed pipe
