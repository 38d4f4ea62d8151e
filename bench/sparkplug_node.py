"""CPU per value of the Sparkplug edge node turning telemetry rows into DDATA (publish/sparkplug/node.py).

In-process and single-threaded (no broker): what the sink adds per value on top of the JSON telemetry path,
for a device of N tags with every tag or a fraction of them changing per message. The same-run reference is
the stdlib alone: `json.loads` of the same records (the part of the work every JSON consumer pays), with the
ratio. The broker side (paho, mosquitto) is measured by the publish benchmark (bench/publish.py, branch rbe).

    .venv/bin/python bench/sparkplug_node.py [--tags 10000] [--messages 20]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from edge_agent.outbox import Kind, Row
from edge_agent.publish.sparkplug import BirthDevice, BirthTag, EdgeNode
from edge_agent.sparkplug import DataType


def rows(tags: int, messages: int, changing: float, rng: random.Random) -> list[Row]:
    """Telemetry records as the outbox holds them: every tag (changing ones get a new float32-like value)."""
    values = [round(rng.uniform(0, 100), 3) for _ in range(tags)]
    out = []
    for i in range(messages):
        for j in rng.sample(range(tags), int(tags * changing)):
            values[j] = round(rng.uniform(0, 100), 3)
        ts = f"2026-12-04T23:00:{i % 60:02d}.000Z"
        record = {
            "schema": "edge-agent/telemetry/v1",
            "agent": "a",
            "site": "s",
            "device": "plc",
            "ts": ts,
            "tags": [{"name": f"t{k}", "value": v, "quality": "good", "ts": ts} for k, v in enumerate(values)],
            "historical": False,
        }
        out.append(Row(i + 1, "x/telemetry/plc", json.dumps(record).encode(), Kind.TELEMETRY, 0, 0.0, 1))
    return out


def cpu(fn: object, items: list[Row]) -> float:
    """Process CPU seconds for fn over items."""
    start = time.process_time()
    for r in items:
        fn(r)  # type: ignore[operator]
    return time.process_time() - start


def main() -> None:
    """Print one table row per mode."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tags", type=int, default=10_000)
    ap.add_argument("--messages", type=int, default=20)
    args = ap.parse_args()
    rng = random.Random(1)
    device = BirthDevice("plc", tuple(BirthTag(f"t{k}", DataType.FLOAT, "bar") for k in range(args.tags)))
    print(f"{args.tags} tags per message, {args.messages} messages; CPU µs per value (process time)")
    print("| mode | sparkplug node | json.loads alone (reference) | ratio | DDATA bytes per changed value |")
    print("|---|---|---|---|---|")
    for label, changing in (("every tag changes", 1.0), ("10 % change (by exception)", 0.1)):
        data = rows(args.tags, args.messages, changing, rng)
        node = EdgeNode("g", "n", [device], [])
        node.births(0, 0.0)
        node.from_row(data[0], False)  # the first message fills every value
        sizes: list[int] = []
        spent = cpu(lambda r: sizes.extend(len(m.payload) for m in node.from_row(r, False)), data[1:])  # noqa: B023
        ref = cpu(lambda r: json.loads(r.payload), data[1:])
        n = args.tags * (len(data) - 1)
        per_changed = sum(sizes) / max(1, int(args.tags * changing) * (len(data) - 1))
        print(f"| {label} | {spent / n * 1e6:.2f} | {ref / n * 1e6:.2f} | {spent / ref:.1f}× | {per_changed:.1f} |")


if __name__ == "__main__":
    main()
