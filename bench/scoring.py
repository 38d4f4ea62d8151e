"""Benchmark: µs per window through the whole scoring step, and resident memory with three models loaded.

The scoring step is WindowScorer.score: normalise → quantize → invoke → dequantize → score →
per-tag contributions. Window assembly from the ring buffers is timed separately.

One row per model kind: every `models/pump-skid-*.tflite` (one simulator bundle per kind, the same 8
tags and 16-sample windows), at batch 1 (the live agent) and batched (replay, calibration), each next to
the dense autoencoder's (`reconstruction_mse`) figure of the same run and batch as the reference.

    python bench/scoring.py [--model models/pump-skid-ae.tflite] [--seconds 2]
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from edge_agent.buffers import Buffers
from edge_agent.scoring.bundle import load_bundle
from edge_agent.scoring.detector import WindowScorer
from edge_agent.types import SampleBatch


def per_call(fn: object, seconds: float) -> float:
    """Mean seconds per call of fn(), measured for about `seconds`."""
    assert callable(fn)
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(50):
            fn()
        n += 50
    return (time.perf_counter() - start) / n


MODELS = os.path.join(os.path.dirname(__file__), "..", "models")


def measure(path: str, seconds: float, batches: tuple[int, ...] = (1, 16, 256)) -> list[tuple[str, int, float, float]]:
    """Per batch size: window shape, batch, µs per window through the whole scoring step and for the invoke alone."""
    scorer = WindowScorer(load_bundle(path))
    meta = scorer.bundle.metadata
    shape = (meta.window, len(meta.inputs))
    rng = np.random.default_rng(0)
    rows = []
    for batch in batches:
        x = (
            np.asarray(meta.normalisation.mean)
            + rng.standard_normal((batch, *shape)) * np.asarray(meta.normalisation.scale)
        ).astype(np.float32)
        good = np.ones_like(x, dtype=bool)
        total = per_call(lambda x=x, good=good, s=scorer: s.score(x, good), seconds)
        xn = np.zeros_like(x)
        invoke = per_call(lambda xn=xn, s=scorer: s.runtime.run(xn), seconds)
        rows.append((f"{shape[0]}×{shape[1]}", batch, 1e6 * total / batch, 1e6 * invoke / batch))
    return rows


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory_child(paths: list[str]) -> None:
    """Child mode: import the agent, load three models, print RSS before and after."""
    import edge_agent.agent  # noqa: F401  (everything the agent imports)

    base = rss_mib()
    scorers = [WindowScorer(load_bundle(p)) for p in paths]
    for s in scorers:
        meta = s.bundle.metadata
        s.score(
            np.zeros((1, meta.window, len(meta.inputs)), np.float32), np.ones((1, meta.window, len(meta.inputs)), bool)
        )
    print(f"{base:.1f} {rss_mib():.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(os.path.dirname(__file__), "..", "models", "pump-skid-ae.tflite"))
    p.add_argument(
        "--float-model", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "pump-f32.tflite")
    )
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--memory-child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    rows = []
    for label, path in (("int8", args.model), ("float32", args.float_model)):
        rows += [(label, *r) for r in measure(path, args.seconds)]
    kinds = [
        (load_bundle(p).metadata.score.kind, p) for p in sorted(glob.glob(os.path.join(MODELS, "pump-skid-*.tflite")))
    ]
    kind_rows = {(kind, path): measure(path, args.seconds) for kind, path in kinds}
    # three models scored one window each per step, as the agent does on each hop
    scorers = [WindowScorer(load_bundle(args.model)) for _ in range(3)]
    meta = scorers[0].bundle.metadata
    x1 = np.zeros((1, meta.window, len(meta.inputs)), np.float32)
    g1 = np.ones_like(x1, dtype=bool)
    three = per_call(lambda: [s.score(x1, g1) for s in scorers], args.seconds)
    # window assembly from the ring buffers for one model
    buffers = Buffers(retention=120, max_samples=8192)
    tags = tuple(meta.inputs)
    buffers.register(tags, 0.1)
    for i in range(1200):
        buffers.write(SampleBatch("b", 1000.0 + i * 0.1, tags, np.ones(len(tags)), np.zeros(len(tags), np.uint8)))
    assemble = per_call(
        lambda: buffers.window(tags, t_end=1110.0, interval=meta.sample_interval, n_samples=meta.window), args.seconds
    )
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", args.model, args.model, args.float_model],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"numpy {np.__version__}, runtime {scorers[0].runtime.runtime_name}"
    )
    print("| model | window | batch | µs/window, whole step | µs/window, invoke only |")
    print("|---|---|---|---|---|")
    for label, shape_s, batch, total_us, invoke_us in rows:
        print(f"| {label} | {shape_s} | {batch} | {total_us:.1f} | {invoke_us:.1f} |")
    print(f"| 3 × int8, one window each | {meta.window}×{len(meta.inputs)} | 1 | {1e6 * three / 3:.1f} per model | |")
    reference = {
        batch: total
        for (kind, _), found in kind_rows.items()
        if kind == "reconstruction_mse"
        for _, batch, total, _ in found
    }
    print("\n| kind | model | batch | µs/window, whole step | invoke only | × dense AE, same run |")
    print("|---|---|---|---|---|---|")
    for (kind, path), found in kind_rows.items():
        for _, batch, total_us, invoke_us in found:
            ratio = f"{total_us / reference[batch]:.2f}" if batch in reference else "–"
            print(f"| {kind} | {os.path.basename(path)} | {batch} | {total_us:.1f} | {invoke_us:.1f} | {ratio} |")
    print(f"\nwindow assembly from ring buffers ({len(tags)} tags × {meta.window} samples): {1e6 * assemble:.1f} µs")
    print(f"resident memory: {out[0]} MiB after importing the agent, {out[1]} MiB with three models loaded")


if __name__ == "__main__":
    main()
