"""The demo's terminal view: what the subscriber has received, as a live screen or plain lines, and a summary."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from asyncio.subprocess import Process
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from edge_agent.demo.config import MODEL, PREFIX, SPARKPLUG_GROUP, DemoOptions
from edge_agent.demo.subscriber import Subscriber

EVENTS_SHOWN = 8


@dataclass
class Tag:
    """One tag as the last telemetry message showed it."""

    value: float | bool | str | None = None
    quality: str = "-"
    ts: str = ""


@dataclass
class View:
    """Everything the subscriber has received, boiled down for the screen."""

    units: dict[str, str]
    fault: str
    fault_start: float | None
    fault_end: float | None
    started: float = field(default_factory=time.monotonic)
    tags: dict[str, Tag] = field(default_factory=dict)
    score: float | None = None
    threshold: float | None = None
    good_fraction: float | None = None
    status: str = "-"
    outbox_depth: int | None = None
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=EVENTS_SHOWN))
    starts: int = 0
    ends: int = 0
    messages: int = 0
    event_ids: set[str] = field(default_factory=set)
    sparkplug: dict[str, int] = field(default_factory=dict)  # with --sparkplug: messages per Sparkplug type

    def take(self, topic: str, payload: bytes) -> dict[str, Any] | None:
        """Fold one message in; returns it when it is a new anomaly event (to print in plain mode)."""
        self.messages += 1
        if topic.startswith("spBv1.0/"):
            parts = topic.split("/")
            kind = parts[2] if len(parts) > 3 else parts[1]
            self.sparkplug[kind] = self.sparkplug.get(kind, 0) + 1
            return None
        try:
            doc = json.loads(payload)
        except ValueError:
            return None
        kind = topic[len(PREFIX) + 1 :].split("/", 1)[0]
        if kind == "telemetry":
            for t in doc.get("tags", []):
                self.tags[t["name"]] = Tag(t.get("value"), t.get("quality", "-"), t.get("ts", ""))
        elif kind == "scores":
            self.score, self.threshold = doc.get("score"), doc.get("threshold")
            self.good_fraction = doc.get("good_fraction")
        elif kind == "status":
            self.status = doc.get("state", "-")
            outbox = doc.get("outbox") or {}
            self.outbox_depth = outbox.get("depth", self.outbox_depth)
        elif kind == "events":
            # delivery is at least once: a SCADA system drops repeats by event_id, and so does this view
            if doc.get("event_id") in self.event_ids:
                return None
            self.event_ids.add(doc.get("event_id", ""))
            self.events.append(doc)
            self.starts += doc.get("type") == "anomaly.start"
            self.ends += doc.get("type") == "anomaly.end"
            return dict(doc)
        return None

    def elapsed(self) -> float:
        """Seconds since the simulator started (the fault schedule counts from there)."""
        return time.monotonic() - self.started

    def plant_state(self) -> str:
        """What the simulator is doing now, in words."""
        t = self.elapsed()
        if self.fault_start is None:
            return "normal operation (no fault scheduled)"
        if t < self.fault_start:
            return f"normal operation; {self.fault} in {self.fault_start - t:.0f} s"
        if self.fault_end is None or t < self.fault_end:
            left = f", {self.fault_end - t:.0f} s left" if self.fault_end is not None else ""
            return f"FAULT: {self.fault} active{left}"
        return f"{self.fault} over {t - self.fault_end:.0f} s ago; recovering"


def event_line(doc: dict[str, Any]) -> str:
    """One anomaly event as a line of text."""
    kind = doc.get("type", "?")
    top = ", ".join(
        f"{c['tag']} {c['share']:.0%}" for c in (doc.get("contributions") or [])[:3] if c.get("share") is not None
    )
    score, threshold = doc.get("score"), doc.get("threshold")
    s = f"score {score:.3g} / threshold {threshold:.3g}" if score is not None and threshold is not None else ""
    reason = f" ({doc['reason']})" if doc.get("reason") else ""
    hist = " historical" if doc.get("historical") else ""
    end = doc.get("window", {}).get("end", "")[11:23]
    return f"{end} {kind}{reason} {doc.get('severity', '')}{hist}  {s}  top: {top}"


def score_bar(score: float | None, threshold: float | None, width: int = 30) -> str:
    """A text bar of score against threshold; the threshold sits at two thirds of its width."""
    if score is None or threshold is None or threshold <= 0:
        return "-" * width
    mark = width * 2 // 3
    n = max(0, min(width, round(score / threshold * mark)))
    cells = ["#" if i < n else "." for i in range(width)]
    cells[mark] = "|"
    return "".join(cells)


def _fmt(v: float | bool | str | None) -> str:
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return str(v) if v is not None else "-"
    return f"{v:.3f}"


def render_rich(view: View, broker_name: str, workdir: Path) -> Any:
    """The live screen (rich renderables)."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    head = Text()
    head.append(f"plant: {view.plant_state()}\n", style="bold red" if "FAULT" in view.plant_state() else "bold")
    head.append(f"agent: {view.status}   broker: {broker_name}   messages: {view.messages}")
    if view.outbox_depth is not None:
        head.append(f"   outbox: {view.outbox_depth}")
    head.append(f"\nfiles: {workdir}")
    tags = Table(title="tags (telemetry)", expand=True)
    for col in ("tag", "value", "unit", "quality"):
        tags.add_column(col, justify="right" if col == "value" else "left")
    for name, unit in view.units.items():
        tag = view.tags.get(name, Tag())
        tags.add_row(name, _fmt(tag.value), unit, tag.quality, style=None if tag.quality in ("good", "-") else "yellow")
    over = view.score is not None and view.threshold is not None and view.score > view.threshold
    score = Text(
        f"{MODEL}: score {_fmt(view.score)}  threshold {_fmt(view.threshold)}  ", style="bold red" if over else ""
    )
    score.append(score_bar(view.score, view.threshold))
    events = Table(title=f"anomaly events ({view.starts} start, {view.ends} end)", expand=True, show_header=False)
    events.add_column("event")
    for doc in view.events:
        events.add_row(event_line(doc), style="red" if doc.get("type") == "anomaly.start" else "green")
    if not view.events:
        events.add_row("none yet")
    return Panel(Group(head, tags, score, events), title="edge-agent demo (Ctrl-C stops)")


def plain_line(view: View) -> str:
    """A periodic one-line summary for logs and pipes."""
    flow = view.tags.get("pump.flow", Tag()).value
    vib = view.tags.get("pump.vibration_rms", Tag()).value
    return (
        f"[{view.elapsed():5.0f}s] {view.plant_state()}; agent {view.status}; flow {_fmt(flow)} m3/h, "
        f"vibration {_fmt(vib)} mm/s; score {_fmt(view.score)} / threshold {_fmt(view.threshold)}"
    )


def _have_rich() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


async def _show(
    view: View,
    subscriber: Subscriber,
    stop: asyncio.Event,
    opts: DemoOptions,
    live: bool,
    out: TextIO,
    agent: Process,
    broker_name: str,
    workdir: Path,
) -> None:
    """Receive and show until the duration ends, SIGINT/SIGTERM, or the agent exits."""
    deadline = time.monotonic() + opts.duration if opts.duration > 0 else None
    render: Callable[[], Any] = lambda: render_rich(view, broker_name, workdir)  # noqa: E731
    next_line = time.monotonic()
    live_ctx: Any = contextlib.nullcontext()
    if live:
        from rich.console import Console
        from rich.live import Live

        live_ctx = Live(render(), console=Console(file=out), refresh_per_second=4, transient=False)
    with live_ctx as screen:
        while not stop.is_set() and agent.returncode is None and (deadline is None or time.monotonic() < deadline):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.25):
                    topic, payload = await subscriber.queue.get()
                    _take(view, topic, payload, live, out)
            while not subscriber.queue.empty():
                _take(view, *subscriber.queue.get_nowait(), live, out)
            if live:
                screen.update(render())
            elif time.monotonic() >= next_line:
                print(plain_line(view), file=out, flush=True)
                next_line += 5.0


def _take(view: View, topic: str, payload: bytes, live: bool, out: TextIO) -> None:
    event = view.take(topic, payload)
    if event is not None and not live:
        print(f"EVENT {topic}: {event_line(event)}", file=out, flush=True)


async def _drain(view: View, subscriber: Subscriber, seconds: float, live: bool, out: TextIO) -> None:
    """Take what is still arriving for a moment after the agent stopped."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.01, end - time.monotonic())):
                _take(view, *await subscriber.queue.get(), live, out)


def summary(view: View, ok: bool) -> str:
    """What happened, in a few lines, for the end of the demo."""
    lines = [
        "",
        f"demo over after {view.elapsed():.0f} s: {view.messages} MQTT messages, "
        f"{view.starts} anomaly.start and {view.ends} anomaly.end events received",
    ]
    lines += [f"  {event_line(e)}" for e in view.events]
    if not ok:
        lines.append(f"no anomaly event arrived although {view.fault} was scheduled; see agent.log in the files")
    topics = f"{PREFIX}/{{status,events/{MODEL},scores/{MODEL},telemetry/<device>}}"
    lines.append(f"agent's last status: {view.status}; topics: {topics}")
    if view.sparkplug:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(view.sparkplug.items()))
        lines.append(f"Sparkplug B (spBv1.0/{SPARKPLUG_GROUP}/#): {counts}")
    return "\n".join(lines)
