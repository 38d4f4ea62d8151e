"""The demo's config: what it was asked for, which devices it reads, the config file it writes for the agent."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import edge_agent
from edge_agent.errors import EdgeAgentError

PREFIX = "demo/lab/pump-skid"
SPARKPLUG_GROUP = "demo"  # with --sparkplug: the agent is also edge node spBv1.0/demo/…/demo-skid-1
MODEL = "pump-skid"

# Which plant signals the demo reads over which protocol (a site mixes them like this), and how often. Each
# device section is written by the simulator of its driver (device_fields, tag_fields): the demo knows no
# protocol's addresses. A subscriber gets telemetry twice a second and every score, which a real site would
# rate-limit further.
DEVICES: tuple[tuple[str, str, dict[str, Any], tuple[str, ...]], ...] = (
    ("transmitters", "modbus", {"poll_interval": "100ms", "timeout": "500ms"},
     ("suction_pressure", "discharge_pressure", "flow", "motor_current")),
    ("condition-monitor", "opcua", {"mode": "subscribe", "poll_interval": "100ms", "timeout": "2s"},
     ("vibration_rms", "bearing_temp", "fluid_temp")),
    ("plc", "s7", {"poll_interval": "100ms", "timeout": "500ms"}, ("valve_position", "motor_running")),
)  # fmt: skip


def device_section(name: str, key: str, port: int, extra: dict[str, Any], signals: tuple[str, ...]) -> str:
    """One device of the demo's config, addressed the way the protocol's simulator serves each signal."""
    from edge_agent.drivers import REGISTRY
    from edge_agent.simulate.plant import UNITS

    server = REGISTRY[key].simulator_class()
    if server is None:
        raise DemoError(f"the {key} driver has no simulator")
    head = {**server.device_fields("127.0.0.1", port), **extra}
    lines = [f"  - name: {name}", *(f"    {k}: {json.dumps(v)}" for k, v in head.items()), "    tags:"]
    for sig in signals:
        tag = {"name": f"pump.{sig}", **server.tag_fields(sig)}
        if sig in UNITS:
            tag["unit"] = UNITS[sig]
        lines.append(f"      - {json.dumps(tag, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


CONFIG = """\
# written by `edge-agent demo`; run it again by hand with: edge-agent run {path}
agent: {{id: demo-skid-1, site: lab}}
devices:
{devices}models:
  - name: {model}
    file: {model_file}
    hysteresis: {{exit_ratio: 0.8, min_duration: 5s}}
mqtt:
  url: mqtt://127.0.0.1:{broker}
  topic_prefix: {prefix}
  scores_interval: 200ms
  telemetry_interval: 500ms
  status_interval: 5s
{sparkplug}outbox:
  path: {outbox}
"""


class DemoError(EdgeAgentError):
    """The demo could not start one of its pieces."""


@dataclass
class DemoOptions:
    """What `edge-agent demo` was asked for."""

    fault: str = "cavitation@30+40"
    duration: float = 120.0  # seconds; 0 runs until Ctrl-C
    broker: Literal["auto", "mosquitto", "builtin"] = "auto"
    model: Path | None = None
    view: Literal["auto", "live", "plain"] = "auto"
    seed: int = 0
    keep: bool = False
    sparkplug: bool = False  # publish Sparkplug B too (mqtt.payloads: [json, sparkplug])


def sparkplug_section(on: bool) -> str:
    """The mqtt keys that make the demo's agent a Sparkplug B edge node too (nothing when off)."""
    if not on:
        return ""
    return f"  payloads: [json, sparkplug]\n  sparkplug: {{group_id: {SPARKPLUG_GROUP}}}\n"


def shipped_model() -> Path | None:
    """The pump model of a checkout (models/pump-skid-ae.tflite beside the package), when it is there."""
    path = Path(edge_agent.__file__).resolve().parents[1] / "models" / "pump-skid-ae.tflite"
    return path if path.is_file() else None


def fault_window(spec: str) -> tuple[str, float | None, float | None]:
    """Name, start and end (seconds from the simulator's start) of a `NAME@SECONDS[+DURATION]` spec."""
    from edge_agent.simulate import parse_fault_spec

    if not spec:
        return "", None, None
    fault = parse_fault_spec(spec)
    end = None if fault.duration is None else fault.start + fault.duration
    return fault.name, fault.start, end


def tag_units(config_path: Path) -> dict[str, str]:
    """Tag name → unit, from the config the demo wrote (the screen shows tags in this order)."""
    from edge_agent.config import load_config

    cfg = load_config(config_path)
    return {t.name: (t.unit or "") for d in cfg.devices for t in d.tags}
