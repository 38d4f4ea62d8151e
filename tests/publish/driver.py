"""A publishing agent in its own process, for tests that SIGKILL it: prints what it has durably written.

    python driver.py URL OUTBOX PREFIX --pairs N [--leave-open] [--every S]

Prints one JSON line per event once it is committed to the outbox ({"committed": …}), the anomaly.end
events it wrote for anomalies a previous run left open ({"restart_end": …}), {"idle": true} when it has
produced everything and {"drained": true} once the broker acknowledged it all; then it keeps running
until killed, or stops cleanly with --exit-when-drained.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from mqttpeer import make_event, publisher

from edge_agent.config import MqttSection
from edge_agent.scoring.lifecycle import EventSequence, close_left_open
from edge_agent.types import AnomalyEvent, EventType


def say(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


def describe(e: AnomalyEvent) -> dict[str, object]:
    return {"event_id": e.event_id, "type": e.type.value, "anomaly_id": e.anomaly_id, "seq": e.seq, "model": e.model}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("outbox")
    ap.add_argument("prefix")
    ap.add_argument("--pairs", type=int, default=0)
    ap.add_argument("--every", type=float, default=0.01)
    ap.add_argument("--leave-open", action="store_true")
    ap.add_argument("--exit-when-drained", action="store_true")
    args = ap.parse_args()
    mqtt = MqttSection(url=args.url, topic_prefix=args.prefix, reconnect_initial=0.05, reconnect_max=0.3, keepalive=5)
    pub = publisher(mqtt, Path(args.outbox))
    start = await pub.outbox.open()
    counter = EventSequence(start.last_seq)
    for end in close_left_open(start.open_anomalies, counter, t=time.time()):
        pub.outbox.put_event(end)
        await pub.outbox.flush()
        say(restart_end=describe(end))
    task = asyncio.create_task(pub.run(), name="publisher")
    for i in range(args.pairs):
        model = ("pump", "fan")[i % 2]
        start = make_event(EventType.START, seq=next(counter), model=model)
        pub.outbox.put_event(start)
        await pub.outbox.flush()
        say(committed=describe(start))
        if args.leave_open and i == args.pairs - 1:
            break
        end = make_event(EventType.END, seq=next(counter), model=model, anomaly_id=start.anomaly_id)
        pub.outbox.put_event(end)
        await pub.outbox.flush()
        say(committed=describe(end))
        await asyncio.sleep(args.every)
    say(idle=True)
    await pub.sink.wait_drained()
    say(drained=True)
    if args.exit_when_drained:
        pub.sink.stop()
    await task


if __name__ == "__main__":
    asyncio.run(main())
