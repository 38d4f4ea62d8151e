"""The s7 registration is light: loading an S7 config imports no python-snap7, building a device does.

Each check runs in a fresh interpreter, so nothing imported by other tests hides an eager import.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CASE = Path(__file__).parent / "testcases" / "s7_valid" / "config.yaml"

LAZY = """
import sys
from edge_agent.config import load_config
from edge_agent.drivers import REGISTRY

cfg = load_config(sys.argv[1])
assert "snap7" not in sys.modules, "loading an S7 config imported snap7"
assert "edge_agent.drivers.s7.driver" not in sys.modules, "loading an S7 config imported the S7 runtime"
driver = REGISTRY["s7"].build(cfg.devices[0])
assert "snap7" in sys.modules, "building an S7 device did not import snap7"
print(type(driver).__module__, type(driver).__name__)
print(driver.plan())
"""

MISSING = """
import sys
sys.modules["snap7"] = None  # `import snap7` now raises ModuleNotFoundError, as when it is not installed
from edge_agent.config import load_config
from edge_agent.drivers import REGISTRY, DriverUnavailable

cfg = load_config(sys.argv[1])  # the config still loads: it needs no snap7
try:
    REGISTRY["s7"].build(cfg.devices[0])
except DriverUnavailable as exc:
    print(exc)
else:
    raise SystemExit("built an S7 driver without snap7")
"""


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, str(CASE)], capture_output=True, text=True, timeout=120, check=False
    )


def test_loading_an_s7_config_leaves_snap7_unimported_until_a_device_is_built() -> None:
    done = run(LAZY)
    assert done.returncode == 0, done.stderr
    kind, plan = done.stdout.splitlines()
    assert kind == "edge_agent.drivers.s7.driver S7Driver"
    assert plan == "['10 tags every 0.1s in 1 requests', '1 tags every 10s in 1 requests']"


def test_missing_snap7_is_a_clear_error_naming_the_device_and_the_extra() -> None:
    done = run(MISSING)
    assert done.returncode == 0, done.stderr
    message = done.stdout.strip()
    assert message.startswith("device line-plc: "), message
    assert "'snap7'" in message
    assert "pip install 'edge-agent[s7]'" in message
