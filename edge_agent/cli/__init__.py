"""Command line: check | read | run | demo | simulate | opcua | browse | outbox | model | calibrate | replay | train."""

# One module per group of commands, each adding its parsers here. A command imports what it needs (pydantic, numpy,
# the drivers, the agent, scoring, paho) when it runs: building the parser imports none of them, so `edge-agent --help`
# and the commands that need no protocol library start quickly.

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from edge_agent import __version__
from edge_agent.cli import devices, model, opcua, outbox, run, simulate
from edge_agent.cli.common import EXIT_CONFIG, EXIT_FAIL, EXIT_OK
from edge_agent.cli.devices import cmd_check, cmd_read
from edge_agent.cli.logs import RedactSecrets, _setup_logging
from edge_agent.cli.model import cmd_calibrate, cmd_model_inspect, cmd_train
from edge_agent.cli.opcua import cmd_browse, cmd_opcua_gen_cert
from edge_agent.cli.outbox import cmd_outbox
from edge_agent.cli.replay import cmd_replay
from edge_agent.cli.run import cmd_run
from edge_agent.cli.simulate import cmd_demo, cmd_simulate, record_plant

__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAIL",
    "EXIT_OK",
    "RedactSecrets",
    "_setup_logging",
    "build_parser",
    "cmd_browse",
    "cmd_calibrate",
    "cmd_check",
    "cmd_demo",
    "cmd_model_inspect",
    "cmd_opcua_gen_cert",
    "cmd_outbox",
    "cmd_read",
    "cmd_replay",
    "cmd_run",
    "cmd_simulate",
    "cmd_train",
    "main",
    "record_plant",
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every command."""
    p = argparse.ArgumentParser(prog="edge-agent", description=__doc__)
    p.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True)

    # help order: check, read, run, demo, simulate, opcua, browse, outbox, model, calibrate, replay, train
    for group in (devices, run, simulate, opcua, outbox, model):
        group.add_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `edge-agent` command."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `edge-agent read CONFIG | head`: the reader left; say nothing more (and not at exit either)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
