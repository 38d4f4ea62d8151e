"""The deploy files through the programs that run them, each a subprocess: the systemd unit through
systemd-analyze, the image's health check against a real HTTP server, the arm64 smoke script through bash.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from shipped import DEPLOY, UNIT, instructions

# ---------------------------------------------------------------- systemd


def _verify(unit_text: str, tmp_path: Path) -> str:
    """systemd-analyze verify on the unit, with the venv's edge-agent standing in for /opt/edge-agent/venv's."""
    exe = Path(sys.executable).with_name("edge-agent")
    if not exe.exists():
        exe = Path(shutil.which("edge-agent") or "/bin/true")
    unit = tmp_path / "edge-agent.service"
    unit.write_text(unit_text.replace("/opt/edge-agent/venv/bin/edge-agent", str(exe)), encoding="utf-8")
    proc = subprocess.run(
        [_systemd_analyze(), "verify", str(unit)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    # it reports unknown keys and bad values as warnings with exit code 0: any output about the unit fails
    return (proc.stdout + proc.stderr).strip() + (f"\n(exit {proc.returncode})" if proc.returncode else "")


def _systemd_analyze() -> str:
    # tests/run.sh installs it (Debian 12: systemd 252, which has --offline): missing is a failure, not a skip
    path = shutil.which("systemd-analyze")
    assert path is not None, "systemd-analyze is not installed (apt-get install systemd)"
    return path


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    assert _verify(UNIT.read_text(encoding="utf-8"), tmp_path) == ""


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("ProtectSystem=strict", "ProtectSytem=strict", "Unknown key"),
        ("Restart=on-failure", "Restart=sometimes", "restart specifier"),
    ],
    ids=["typo", "bad-value"],
)
def test_systemd_analyze_catches_a_broken_unit(tmp_path: Path, old: str, new: str, expected: str) -> None:
    text = UNIT.read_text(encoding="utf-8")
    assert old in text
    assert expected in _verify(text.replace(old, new), tmp_path)


def test_systemd_unit_exposure_is_low(tmp_path: Path) -> None:
    unit = tmp_path / "edge-agent.service"
    unit.write_text(UNIT.read_text(encoding="utf-8"), encoding="utf-8")
    proc = subprocess.run(
        [_systemd_analyze(), "security", "--offline=yes", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert not ("--offline" in proc.stderr and proc.returncode != 0), "systemd-analyze has no --offline: needs >= 250"
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", proc.stdout)
    assert m, proc.stdout[-500:] + proc.stderr
    assert float(m.group(1)) <= 2.0, proc.stdout[-2000:]


# ---------------------------------------------------------------- Dockerfile.arm64's health check


def _healthcheck_code() -> str:
    (rest,) = [r for w, r in instructions() if w == "HEALTHCHECK"]
    argv = json.loads(rest[rest.index("CMD") + 3 :].strip())
    assert argv[:2] == ["python", "-c"]
    return str(argv[2])


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _run_healthcheck(listen: str) -> int:
    env = {**os.environ, "EDGE_AGENT__OBSERVE__LISTEN": listen}
    proc = subprocess.run([sys.executable, "-c", _healthcheck_code()], env=env, capture_output=True, timeout=30)
    return proc.returncode


@pytest.mark.skipif(Path("/etc/edge-agent/config.yaml").exists(), reason="this machine has a real agent config")
def test_healthcheck_passes_on_200_and_fails_otherwise(health_server: http.server.HTTPServer) -> None:
    port = health_server.server_address[1]
    _Health.status = 200
    assert _run_healthcheck(f"0.0.0.0:{port}") == 0
    _Health.status = 503
    try:
        assert _run_healthcheck(f"0.0.0.0:{port}") == 1
    finally:
        _Health.status = 200
    health_server.shutdown()
    health_server.server_close()
    assert _run_healthcheck(f"127.0.0.1:{port}") == 1  # observe configured but nothing answers


# ---------------------------------------------------------------- arm64 smoke script


def test_smoke_script_is_valid_bash() -> None:
    script = DEPLOY / "arm64" / "build-and-smoke.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert os.access(script, os.X_OK)
