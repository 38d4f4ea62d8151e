"""`edge-agent demo`'s run: write the config, start the broker, simulator and agent, show until done."""

from __future__ import annotations

import asyncio
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

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
    sparkplug_section,
    tag_units,
)
from edge_agent.demo.processes import _tail, broker, child, choose_broker, free_port, stop_child, wait_port
from edge_agent.demo.subscriber import Subscriber
from edge_agent.demo.view import View, _drain, _have_rich, _show, summary

DETECT_WITHIN = 20.0  # seconds after a fault starts within which the shipped model raises its anomaly


async def run_demo(opts: DemoOptions, out: TextIO = sys.stdout) -> int:
    """Run the demo until its duration ends or SIGINT/SIGTERM; 0 when the scheduled fault raised an anomaly."""
    from edge_agent.simulate import simulated_protocols

    model = opts.model or shipped_model()
    if model is None or not model.is_file():
        raise DemoError(
            f"the demo's model is not there ({model or 'models/pump-skid-ae.tflite'}): run it from a checkout of "
            "the repository, or pass --model FILE"
        )
    name, fault_start, fault_end = fault_window(opts.fault)
    kind = choose_broker(opts.broker)
    workdir = Path(tempfile.mkdtemp(prefix="edge-agent-demo-"))
    ports = {key: free_port() for _, key, _, _ in DEVICES}
    broker_port = free_port()
    config_path = workdir / "demo.yaml"
    devices = "".join(device_section(n, key, ports[key], extra, signals) for n, key, extra, signals in DEVICES)
    config_path.write_text(
        CONFIG.format(
            path=config_path,
            devices=devices,
            model=MODEL,
            model_file=model.resolve(),
            prefix=PREFIX,
            outbox=workdir / "outbox.db",
            broker=broker_port,
            sparkplug=sparkplug_section(opts.sparkplug),
        )
    )
    live = opts.view == "live" or (opts.view == "auto" and out.isatty() and _have_rich())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    view = View(tag_units(config_path), name, fault_start, fault_end)
    python = [sys.executable, "-m", "edge_agent", "--log-level", "warning"]
    print(f"edge-agent demo: files in {workdir}", file=out, flush=True)
    ok = False
    try:
        async with broker(kind, broker_port, workdir) as broker_name:
            print(f"broker: {broker_name} on 127.0.0.1:{broker_port}", file=out, flush=True)
            subscriber = Subscriber(broker_port, loop, sparkplug=opts.sparkplug)
            subscriber.start()
            try:
                sim_argv = [
                    *python,
                    "simulate",
                    "--seed",
                    str(opts.seed),
                    "--state-dir",
                    str(workdir / "simulator-pki"),
                ]
                for key, port in ports.items():
                    sim_argv += ["--port", f"{key}={port}"]
                for key in simulated_protocols().keys() - ports.keys():
                    sim_argv += ["--without", key]
                if opts.fault:
                    sim_argv += ["--fault", opts.fault]
                *first, last = ports.items()
                async with child(sim_argv, "the simulator", workdir / "simulator.log", last[1]):
                    for key, port in first:
                        await wait_port(port, f"the simulator's {key} server", None, workdir / "simulator.log")
                    view.started = time.monotonic()
                    print(f"simulator: pump skid, {view.plant_state()}", file=out, flush=True)
                    agent_argv = [*python, "run", str(config_path), "--output", "none"]
                    async with child(agent_argv, "the agent", workdir / "agent.log") as agent:
                        print(f"agent: edge-agent run {config_path}", file=out, flush=True)
                        await _show(view, subscriber, stop, opts, live, out, agent, broker_name, workdir)
                        # the agent stops first, so its anomaly.end (reason shutdown) and offline status go out
                        code = await stop_child(agent)
                        await _drain(view, subscriber, 1.0, live, out)
                        if code not in (0, None, -signal.SIGTERM):
                            print(f"the agent exited with code {code}{_tail(workdir / 'agent.log')}", file=out)
            finally:
                subscriber.stop()
        # a fault that had time to show must have raised an anomaly (a Ctrl-C before it is no failure)
        expected = fault_start is not None and view.elapsed() > fault_start + DETECT_WITHIN
        ok = not expected or view.starts > 0
        print(summary(view, ok), file=out, flush=True)
        return 0 if ok else 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if opts.keep or not ok:
            print(f"logs and config kept in {workdir}", file=out)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
