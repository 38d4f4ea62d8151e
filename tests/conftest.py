"""Markers by folder, and the shared fixtures: real peers on free loopback ports (the peers are in helpers.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from helpers import MOSQUITTO, Broker, ModbusPeer
from hypothesis import HealthCheck, settings

# No wall clock in property tests either: hypothesis' default 200 ms deadline per example, and its too_slow
# health check, fail a correct test on a busy machine.
settings.register_profile("edge-agent", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("edge-agent")

TESTS = Path(__file__).resolve().parent

# Which tests start something real: a server, a broker, a subprocess or a serial line. Keys are folders (ending
# in /) or files under tests/; the longest key that holds a test's file decides, and a file no key holds is
# `unit`. `pytest -m "not integration"` is then the quick run that needs nothing but the venv.
MARKS: dict[str, str] = {
    "agent/": "integration",  # an agent against real peers, mosquitto
    "cli/": "integration",  # the edge-agent command in a subprocess
    "deploy/test_deploy_tools.py": "integration",  # systemd-analyze, the health check against an HTTP server, bash
    "deploy/test_grafana.py": "integration",  # an agent with the simulator and mosquitto, scraped over HTTP
    "deploy/test_helm.py": "integration",  # helm lint and helm template in subprocesses
    "drivers/modbus/": "integration",  # pymodbus servers, pseudo-terminals, mbpoll
    "drivers/opcua/": "integration",  # asyncua servers; the lazy-import checks run a subprocess
    "drivers/opcua/test_opcua_browse_names.py": "unit",
    "drivers/opcua/test_opcua_certs.py": "unit",
    "drivers/opcua/test_opcua_nodeids.py": "unit",
    "drivers/mqtt/": "integration",  # mosquitto, Sparkplug nodes in-process and as killed subprocesses
    "drivers/mqtt/test_mqtt_units.py": "unit",
    "drivers/s7/": "integration",  # snap7 servers; the lazy-import checks run a subprocess
    "drivers/s7/test_s7_addresses.py": "unit",
    "observe/": "integration",  # the health server on a loopback port
    "outbox/test_outbox_kill.py": "integration",  # SIGKILLs a writing subprocess
    "outbox/test_outbox_limits.py": "integration",  # a tmpfs mounted for a full disk; outbox stats in a subprocess
    "outbox/test_outbox_damage.py": "integration",  # damaged files written by a subprocess
    "poller/test_poller_modbus.py": "integration",  # pymodbus servers
    "publish/": "integration",  # mosquitto, and driver.py in a subprocess
    "publish/test_mqtt_fastpath.py": "unit",  # a socket pair, no server
    "scoring/test_scoring_cli.py": "integration",  # the edge-agent command in a subprocess
    "scoring/test_scoring_e2e.py": "integration",  # the simulator's servers and an agent
    "simulate/test_demo.py": "integration",  # edge-agent demo: simulator, agent and broker subprocesses
    "simulate/test_simulator_modbus.py": "integration",  # the simulator's Modbus server
}


def marker_for(path: Path) -> str:
    """`integration` or `unit` for a test file, from MARKS."""
    rel = path.resolve().relative_to(TESTS).as_posix()
    keys = [k for k in MARKS if rel == k or (k.endswith("/") and rel.startswith(k))]
    return MARKS[max(keys, key=len)] if keys else "unit"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test `integration` or `unit` by where its file is (MARKS), not by what the file says."""
    stale = [k for k in MARKS if not (TESTS / k).exists()]
    if stale:
        raise pytest.UsageError(f"tests/conftest.py MARKS names what does not exist: {', '.join(stale)}")
    for item in items:
        if item.path.resolve().is_relative_to(TESTS):
            item.add_marker(marker_for(item.path))


@pytest.fixture
async def modbus_peer() -> AsyncIterator[ModbusPeer]:
    """A pymodbus server on a free 127.0.0.1 port, stopped after the test."""
    peer = ModbusPeer(holes=[(900, 1000)])
    await peer.start()
    try:
        yield peer
    finally:
        await peer.stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """mosquitto on a free 127.0.0.1 port (anonymous, persistence on), stopped after the test."""
    assert Path(MOSQUITTO).exists(), "mosquitto is not installed: tests/run.sh installs it with apt"
    b = Broker(tmp_path / "broker")
    b.start()
    try:
        yield b
    finally:
        b.kill()
