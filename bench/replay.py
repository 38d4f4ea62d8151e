"""Benchmark: `edge-agent replay` of many CSVs in one process, end to end, next to `python -c pass`.

Writes N synthetic CSVs (a random-walk process: ROWS rows × TAGS tags, 1 s apart), trains a bundle for those
tags once (with a Python that has TensorFlow, default /work/tfvenv/bin/python; cached in the work folder), then
times, in the same run:

- `python -c pass` (the reference: a bare interpreter start),
- `edge-agent replay A.csv B.csv … --model M --out-dir D` (every file in one process),
- the same with `--calibrate-rows 400` (each file calibrated on its first rows, as SKAB runs are),
- `edge-agent replay A.csv --model M --out X.csv` (one file, one process: what a loop over files costs per file),
  and, with `--baseline-src DIR`, the same with another checkout's code (say, before this change).

    python bench/replay.py [--files 22] [--rows 960] [--tags 52] [--work /tmp/edge-agent-bench-replay]
        [--baseline-src /work/main]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_csvs(folder: Path, files: int, rows: int, tags: int, seed: int = 0) -> list[Path]:
    """`files` CSVs of a random walk (with a little noise) on `tags` columns, one row per second."""
    rng = np.random.default_rng(seed)
    names = [f"unit.tag_{j:02d}" for j in range(tags)]
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    paths = []
    for k in range(files):
        level = rng.normal(50, 10, tags)
        walk = level + np.cumsum(rng.normal(0, 0.05, (rows, tags)), axis=0) + rng.normal(0, 0.2, (rows, tags))
        stamps = [(start + dt.timedelta(seconds=k * 10 * rows + i)).isoformat() for i in range(rows)]
        path = folder / f"run_{k:02d}.csv"
        with open(path, "w", encoding="utf-8") as f:
            f.write("datetime," + ",".join(names) + "\n")
            for stamp, row in zip(stamps, walk, strict=True):
                f.write(stamp + "," + ",".join(f"{v:.5g}" for v in row) + "\n")
        paths.append(path)
    return paths


def bundle_for(work: Path, csvs: list[Path], train_python: str) -> Path:
    """A bundle for the CSVs' tags: trained once with `train_python` (TensorFlow), then reused from `work`."""
    out = work / f"bench-{csvs[0].stat().st_size}.tflite"
    if out.exists():
        return out
    cmd = [train_python, "-m", "edge_agent", "train", *map(str, csvs[:4]), "--out", str(out), "--name", "bench"]
    cmd += ["--epochs", "3", "--window", "16", "--sample-interval", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, cwd=work)
    if r.returncode != 0:
        raise SystemExit(f"training the bench bundle failed ({' '.join(cmd)}):\n{r.stderr[-2000:]}")
    return out


def timed(cmd: list[str], repeat: int, cwd: Path, env: dict[str, str] | None = None) -> tuple[float, float]:
    """Median wall seconds and median CPU seconds (user + system) of running `cmd` to completion (it must succeed).

    CPU seconds are what a quiet machine's wall time would be near: on a loaded one, wall time waits for a core.
    `cwd`: not a checkout, whose edge_agent `python -m` would import ahead of PYTHONPATH.
    """
    walls, cpus = [], []
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, cwd=cwd)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    """Write the data, get a bundle, time the commands, print a table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=22)
    p.add_argument("--rows", type=int, default=960)
    p.add_argument("--tags", type=int, default=52)
    p.add_argument("--repeat", type=int, default=3, help="runs of each command (the median is shown)")
    p.add_argument("--work", type=Path, default=Path("/tmp/edge-agent-bench-replay"))
    p.add_argument("--train-python", default="/work/tfvenv/bin/python", help="a Python with TensorFlow installed")
    p.add_argument("--baseline-src", type=Path, help="also time one file with the edge_agent of this checkout")
    args = p.parse_args()
    data = args.work / f"{args.files}x{args.rows}x{args.tags}"
    data.mkdir(parents=True, exist_ok=True)
    csvs = write_csvs(data, args.files, args.rows, args.tags)
    model = bundle_for(args.work, csvs, args.train_python)
    out = args.work / "out"
    agent = [sys.executable, "-m", "edge_agent"]
    replay = [*agent, "replay", "--model", str(model)]
    rows: list[tuple[str, tuple[float, float]]] = [
        ("`python -c pass`", timed([sys.executable, "-c", "pass"], args.repeat, args.work)),
        (
            f"`replay` {args.files} files `--out-dir` (one process)",
            timed([*replay, *map(str, csvs), "--out-dir", str(out)], args.repeat, args.work),
        ),
        (
            f"`replay` {args.files} files `--out-dir --calibrate-rows 400`",
            timed([*replay, *map(str, csvs), "--out-dir", str(out), "--calibrate-rows", "400"], args.repeat, args.work),
        ),
        (
            "`replay` 1 file `--out` (one process)",
            timed([*replay, str(csvs[0]), "--out", str(out / "1.csv")], args.repeat, args.work),
        ),
    ]
    if args.baseline_src:
        # the same one-file command with another checkout's code (e.g. before this change): PYTHONPATH goes first
        env = {**os.environ, "PYTHONPATH": str(args.baseline_src)}
        cmd = [*replay, str(csvs[0]), "--out", str(out / "1.csv")]
        rows.append((f"`replay` 1 file `--out`, code of {args.baseline_src}", timed(cmd, args.repeat, args.work, env)))
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, "
        f"Python {platform.python_version()}, numpy {np.__version__}"
    )
    print(f"data: {args.files} CSVs × {args.rows} rows × {args.tags} tags; median of {args.repeat} runs each\n")
    print("| command | wall s | CPU s | wall × `python -c pass` | CPU × `python -c pass` |")
    print("|---|---|---|---|---|")
    bare_wall, bare_cpu = rows[0][1]
    for label, (w, c) in rows:
        print(f"| {label} | {w:.2f} | {c:.2f} | {w / bare_wall:.1f} | {c / max(bare_cpu, 1e-3):.1f} |")


if __name__ == "__main__":
    main()
