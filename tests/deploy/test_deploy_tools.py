"""The deploy files through the programs that run them, each a subprocess: the systemd unit through
systemd-analyze, the image's health check against a real HTTP server, the Dockerfile's platform check
through python, the smoke scripts (both platforms, the old arm64 path) through bash.
"""

from __future__ import annotations

import http.server
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from shipped import DOCKERFILES, SMOKE, SMOKE_ARM64, UNIT, instructions

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


# ---------------------------------------------------------------- the Dockerfile's health check


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


# ---------------------------------------------------------------- the Dockerfiles' platform check

_HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
_OTHER_ARCH = "arm64" if _HOST_ARCH == "amd64" else "amd64"


def _platform_check(dockerfile: Path, build_args: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The file's platform-check RUN, run by this machine's python as the build runs it: the file's ARG
    defaults and the build's arguments (TARGETARCH from --platform) in the environment."""
    ins = instructions(dockerfile)
    (run,) = [r for w, r in ins if w == "RUN" and "TARGETARCH" in r]
    code = run.removeprefix('python3 -c "').removesuffix('"').replace('\\"', '"')
    args = dict(r.split("=", 1) for w, r in ins if w == "ARG" and "=" in r and not r.startswith("BASE_IMAGE"))
    env = {k: v for k, v in os.environ.items() if k not in ("TARGETARCH", "EDGE_AGENT_ARCH")}
    env.update(args, **build_args)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_platform_check_passes_for_the_base_images_own_platform(dockerfile: Path) -> None:
    # this machine's python stands in for the base image's interpreter
    fixed = dockerfile.name == "Dockerfile.arm64" and _HOST_ARCH != "arm64"
    proc = _platform_check(dockerfile, {"TARGETARCH": _HOST_ARCH})
    assert (proc.returncode != 0) is fixed, proc.stderr
    assert _platform_check(dockerfile, {}).returncode == (1 if fixed else 0)  # no --platform (a classic builder)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_platform_check_stops_a_build_for_another_platform(dockerfile: Path) -> None:
    proc = _platform_check(dockerfile, {"TARGETARCH": _OTHER_ARCH})
    assert proc.returncode == 1
    assert f"the base image runs {platform.machine()} binaries" in proc.stderr
    assert "--platform linux/" in proc.stderr


# ---------------------------------------------------------------- smoke scripts


@pytest.mark.parametrize("script", [SMOKE, SMOKE_ARM64], ids=["deploy", "deploy-arm64"])
def test_smoke_script_is_valid_bash(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert os.access(script, os.X_OK)


def _dry_run(script: Path, *args: str, **env: str) -> dict[str, str]:
    """The settings the script would use (--dry-run: KEY=value lines), with only `env` of its variables set."""
    ours = ("IMAGE", "DOCKERFILE")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_") and k not in ours}
    proc = subprocess.run(
        ["bash", str(script), *args, "--dry-run"], env={**clean, **env}, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    return dict(line.split("=", 1) for line in proc.stdout.splitlines())


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the script emulates arm64 on x86_64 only")
def test_smoke_script_takes_the_platform() -> None:
    amd64 = _dry_run(SMOKE, "--platform", "linux/amd64")
    arm64 = _dry_run(SMOKE, "--platform=linux/arm64")
    assert (amd64["PLATFORM"], amd64["MODE"]) == ("linux/amd64", "native")
    assert (arm64["PLATFORM"], arm64["MODE"]) == ("linux/arm64", "emulated")
    assert Path(amd64["DOCKERFILE"]).name == "Dockerfile"
    assert Path(arm64["DOCKERFILE"]).name == "Dockerfile.arm64"
    # separate caches, podman storage and run dirs per platform; arm64's stays where it was
    assert amd64["CACHE"] == "/var/cache/edge-agent-amd64"
    assert arm64["CACHE"] == "/var/cache/edge-agent-arm64"
    for key in ("RUNDIR", "BASE", "IMAGE"):
        assert amd64[key] != arm64[key], key
    assert _dry_run(SMOKE) == amd64  # no --platform: this machine's own
    assert _dry_run(SMOKE, "--platform", "linux/arm64", EDGE_AGENT_ARM64_CACHE="/tmp/c")["CACHE"] == "/tmp/c"
    assert _dry_run(SMOKE, "--platform", "linux/arm64", DOCKERFILE="Dockerfile")["DOCKERFILE"] == amd64["DOCKERFILE"]


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the script emulates arm64 on x86_64 only")
def test_old_smoke_path_is_the_arm64_smoke() -> None:
    assert _dry_run(SMOKE_ARM64) == _dry_run(SMOKE, "--platform", "linux/arm64")


@pytest.mark.parametrize("args", [["--platform", "linux/s390x"], ["--platform"], ["--frobnicate"]])
def test_smoke_script_refuses_bad_arguments_before_doing_anything(args: list[str]) -> None:
    proc = subprocess.run(["bash", str(SMOKE), *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip() and not proc.stdout
