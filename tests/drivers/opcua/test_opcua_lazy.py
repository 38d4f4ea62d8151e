"""Loading an OPC UA config imports no asyncua; building the device's driver does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[3]

# runs in a fresh interpreter: this test process has long imported asyncua through the other tests
PROBE = """
import json, sys, edge_agent.config
cfg = edge_agent.config.load_config(sys.argv[1])
loaded = {m: m in sys.modules for m in ("asyncua", "cryptography")}
from edge_agent.drivers import REGISTRY
device = next(d for d in cfg.devices if d.type == "opcua")
driver = REGISTRY["opcua"].build(device)
print(json.dumps({"at_load": loaded, "after_build": "asyncua" in sys.modules, "driver": type(driver).__module__}))
"""


@pytest.mark.parametrize(
    ("config", "certificates"),
    [
        (ROOT / "examples" / "simulator-opcua.yaml", False),
        (Path(__file__).parent / "testcases" / "opcua_valid" / "config.yaml", True),
    ],
    ids=["simulator-opcua", "opcua_valid"],
)
def test_config_loads_without_asyncua_and_build_imports_it(config: Path, certificates: bool) -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["at_load"]["asyncua"] is False
    # cryptography comes with the certificate checks only, for devices that name certificates
    assert seen["at_load"]["cryptography"] is certificates
    assert seen["after_build"] is True
    assert seen["driver"] == "edge_agent.drivers.opcua.driver"
