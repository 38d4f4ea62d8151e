"""`edge-agent demo`: the whole job on one machine, with nothing to set up.

Four real pieces, wired the way a site wires them: the simulated pump skid (`edge-agent simulate`, a
subprocess) with a fault on a schedule; the agent (`edge-agent run`, a subprocess) polling it over Modbus,
OPC UA and S7 and scoring it with the shipped pump model; an MQTT broker (mosquitto when it is installed,
else amqtt inside this process); and a subscriber here that shows what a SCADA system would receive:
tag values (telemetry), score against threshold (scores) and the anomaly events, live.
Everything listens on 127.0.0.1 on free ports, so a demo never clashes with a running plant or broker.

The package, one module a job: config (what the demo was asked for and the config it writes), processes (the
broker, child processes, ports), subscriber (MQTT), view (the terminal screen) and run (run_demo).
"""

from __future__ import annotations

import logging

from edge_agent.demo.config import (
    CONFIG,
    DEVICES,
    MODEL,
    PREFIX,
    DemoError,
    DemoOptions,
    device_section,
    fault_window,
    shipped_model,
    tag_units,
)
from edge_agent.demo.processes import (
    MOSQUITTO_PATHS,
    STARTUP_TIMEOUT,
    STOP_TIMEOUT,
    broker,
    child,
    choose_broker,
    find_mosquitto,
    free_port,
    have_amqtt,
    stop_child,
    wait_port,
)
from edge_agent.demo.run import DETECT_WITHIN, run_demo
from edge_agent.demo.subscriber import Subscriber
from edge_agent.demo.view import EVENTS_SHOWN, Tag, View, event_line, plain_line, render_rich, score_bar, summary

log = logging.getLogger(__name__)

__all__ = [
    "CONFIG",
    "DETECT_WITHIN",
    "DEVICES",
    "EVENTS_SHOWN",
    "MODEL",
    "MOSQUITTO_PATHS",
    "PREFIX",
    "STARTUP_TIMEOUT",
    "STOP_TIMEOUT",
    "DemoError",
    "DemoOptions",
    "Subscriber",
    "Tag",
    "View",
    "broker",
    "child",
    "choose_broker",
    "device_section",
    "event_line",
    "fault_window",
    "find_mosquitto",
    "free_port",
    "have_amqtt",
    "plain_line",
    "render_rich",
    "run_demo",
    "score_bar",
    "shipped_model",
    "stop_child",
    "summary",
    "tag_units",
    "wait_port",
]
