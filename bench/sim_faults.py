"""Benchmark: how each model finds the simulator's faults, replayed offline (the fault tables of models/README.md).

For every fault of the simulator, 15 minutes of plant time (seed 7) with the fault injected at 300 s for
200 s, and the same run without a fault, are recorded as `edge-agent simulate --record … --record-every 0.2`
would, then replayed through each model as `edge-agent replay FILE --model MODEL` does (no recalibration,
the bundle's threshold and detector defaults). Per fault: the time from the first faulted sample to the
first anomalous row, and the anomalous rows before the fault (false alarms); for the fault-free run, the
anomalous rows anywhere. No TensorFlow needed; about 10 s per model.

    python bench/sim_faults.py                                       # models/pump-skid-*.tflite
    python bench/sim_faults.py --model models/pump-skid-conv.tflite --model other.tflite
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from edge_agent.cli.simulate import record_plant
from edge_agent.scoring.bundle import load_bundle
from edge_agent.scoring.replay import read_table, replay
from edge_agent.simulate.faults import FAULTS, parse_fault_spec

MODELS = os.path.join(os.path.dirname(__file__), "..", "models")


def detection(path: str, model: str) -> tuple[float | None, int, int]:
    """Seconds from the fault's start to the first anomalous row (None: never), false-alarm rows before it, rows."""
    bundle = load_bundle(model)
    table = read_table(path)
    result = replay(bundle, table.times, table.select(bundle.metadata.inputs), source=path)
    fault = table.select(["fault_active"])[:, 0] > 0
    start = int(np.argmax(fault)) if fault.any() else len(fault)
    flagged = result.anomaly.astype(bool)
    before = int(flagged[:start].sum())
    after = np.flatnonzero(flagged[start:])
    delay = float(table.times[start + after[0]] - table.times[start]) if fault.any() and after.size else None
    return delay, before, len(fault)


def main() -> None:
    """Record the faulted runs once, replay each model over them and print one markdown table per model."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="a bundle (repeatable; default models/pump-skid-*.tflite)")
    p.add_argument("--seed", type=int, default=7, help="the simulator's seed (default 7)")
    p.add_argument("--duration", type=float, default=900.0, help="seconds of plant time per run (default 900)")
    p.add_argument("--at", type=float, default=300.0, help="fault start, seconds (default 300)")
    p.add_argument("--for", dest="length", type=float, default=200.0, help="fault duration, seconds (default 200)")
    args = p.parse_args()
    models = args.model or sorted(glob.glob(os.path.join(MODELS, "pump-skid-*.tflite")))
    with tempfile.TemporaryDirectory() as tmp:
        runs: dict[str, str] = {}
        for name in [*FAULTS, ""]:
            path = os.path.join(tmp, f"{name or 'none'}.csv")
            faults = (parse_fault_spec(f"{name}@{args.at:g}+{args.length:g}"),) if name else ()
            record_plant(path, seed=args.seed, faults=faults, seconds=args.duration, every=0.2)
            runs[name] = path
        for model in models:
            print(f"\n{os.path.basename(model)} (seed {args.seed}, fault at {args.at:g} s for {args.length:g} s)\n")
            print("| fault | detected after | false alarms before the fault |\n|---|---|---|")
            for name, path in runs.items():
                delay, before, rows = detection(path, model)
                alarms = f"{before} rows" if before else "none"
                if name:
                    print(f"| {name} | {'not detected' if delay is None else f'{delay:.1f} s'} | {alarms} |")
                else:
                    print(f"| (no fault, {args.duration / 60:g} min) | – | {alarms} (of {rows}) |")


if __name__ == "__main__":
    main()
