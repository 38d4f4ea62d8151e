"""deploy/grafana/edge-agent.json against a real agent's /metrics.

One agent runs in-process for the module: the simulator's pump skid over Modbus (examples/simulator-modbus.yaml,
the shipped model), a mosquitto and an outbox, so every family the agent exports exists, and `observe.listen:
127.0.0.1:0` (the port it logs is the one scraped). Every PromQL expression in the dashboard (panel targets, the
anomaly annotation, the template variables) may name only series that scrape shows: a counter family as
`_total`, a histogram as `_bucket`/`_sum`/`_count`, a gauge as itself. The labels an expression groups by,
matches on or puts in a legend must be on those series (or be `job`/`instance`, which Prometheus adds). And the
dashboard uses every family the agent exports, so a new metric shows up here until it has a panel. A second
agent adds what the first cannot show: both payloads (`mqtt.payloads: [json, sparkplug]`, a primary host online)
and an `mqtt` input device fed a malformed payload; the scrapes are taken together.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from helpers import Broker, free_port, http_get, wait_for
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families
from shipped import DEPLOY, ROOT
from sparkplug_host import SparkplugHost

from edge_agent.agent import Agent
from edge_agent.config import load_config, parse_config
from edge_agent.simulate import SimulatorOptions, run_simulator

DASHBOARD = DEPLOY / "grafana" / "edge-agent.json"
EXAMPLE = ROOT / "examples" / "simulator-modbus.yaml"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}

METRIC = re.compile(r"\bedge_agent_[a-z_]+")
SELECTOR = re.compile(r"\b(edge_agent_[a-z_]+)(\{[^}]*\})?")
MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)\s*\"")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")
# what a family of each type is stored as in Prometheus (the classic text format, which the agent serves)
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
ADDED_BY_PROMETHEUS = {"job", "instance"}
# what issue 14 asks the dashboard to show, as the series it must query
REQUIRED = {
    "edge_agent_device_up",
    "edge_agent_poll_seconds_bucket",
    "edge_agent_reads_total",
    "edge_agent_read_failures_total",
    "edge_agent_overruns_total",
    "edge_agent_score",
    "edge_agent_threshold",
    "edge_agent_anomaly_active",
    "edge_agent_windows_insufficient_total",
    "edge_agent_outbox_depth",
    "edge_agent_outbox_bytes",
    "edge_agent_outbox_max_bytes",
    "edge_agent_outbox_oldest_age_seconds",
    "edge_agent_outbox_dropped_total",
    "edge_agent_mqtt_connected",
    "edge_agent_mqtt_publish_seconds_bucket",
    "edge_agent_mqtt_delivery_seconds_bucket",
    "edge_agent_mqtt_in_flight",
}


@dataclass
class Exported:
    """What one scrape of /metrics shows: family name → type, and series name → its family and label names."""

    families: dict[str, str] = field(default_factory=dict)
    series: dict[str, str] = field(default_factory=dict)
    labels: dict[str, set[str]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Exported:
        return cls().add(text)

    def add(self, text: str) -> Exported:
        """What another scrape shows, added to this one."""
        out = self
        for family in text_string_to_metric_families(text):
            out.families[family.name] = family.type
            for suffix in SUFFIXES.get(family.type, ("",)):
                out.series[family.name + suffix] = family.name
            for sample in family.samples:
                out.series.setdefault(sample.name, family.name)
                out.labels.setdefault(sample.name, set()).update(sample.labels)
        return out


@dataclass
class Query:
    """One PromQL expression of the dashboard, where it is, and the legend it is drawn with."""

    where: str
    expr: str
    legend: str = ""


def queries(dashboard: dict[str, Any]) -> list[Query]:
    """Every PromQL expression: panel targets, annotations, and the template variables' label_values()."""
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append(
                Query(
                    f"panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"], target["legendFormat"]
                )
            )
    for ann in dashboard["annotations"]["list"]:
        if "expr" in ann:
            found.append(Query(f"annotation {ann['name']!r}", ann["expr"], ann.get("textFormat", "")))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            found.append(Query(f"variable ${var['name']}", query))
    return found


def label_values_target(expr: str) -> set[str]:
    """label_values(metric, LABEL): the label a template variable lists."""
    m = re.fullmatch(r"label_values\((.*),\s*(\w+)\s*\)", expr.strip())
    return {m[2]} if m else set()


def problems(dashboard: dict[str, Any], exported: Exported) -> list[str]:
    """Everything in the dashboard's PromQL that the scraped agent does not back; [] when all is well."""
    out = []
    for q in queries(dashboard):
        if q.expr.count("(") != q.expr.count(")") or q.expr.count("{") != q.expr.count("}"):
            out.append(f"{q.where}: unbalanced brackets in {q.expr}")
        names = METRIC.findall(q.expr)
        if not names:
            out.append(f"{q.where}: names no edge_agent_ metric: {q.expr}")
        missing = [n for n in names if n not in exported.series]
        for name in missing:
            out.append(f"{q.where}: {name} is not exported by the agent")
        if missing:
            continue
        for fn, name in re.findall(r"\b(rate|increase|irate)\(\s*(edge_agent_[a-z_]+)", q.expr):
            if exported.families[exported.series[name]] not in ("counter", "histogram"):
                out.append(f"{q.where}: {fn}() of {name}, which is a gauge")
        if "histogram_quantile" in q.expr and not all(
            "le" in [x.strip() for x in group.split(",")] for group in GROUPING.findall(q.expr)
        ):
            out.append(f"{q.where}: histogram_quantile needs `le` kept in every aggregation: {q.expr}")
        # labels: those the expression matches, groups or joins on, and those its legend shows
        have = set(ADDED_BY_PROMETHEUS)
        for n in names:
            have |= exported.labels.get(n, set())
        used = {m for _, sel in SELECTOR.findall(q.expr) for m in MATCHER.findall(sel)}
        used |= {x.strip() for g in GROUPING.findall(q.expr) for x in g.split(",") if x.strip()}
        used |= set(LEGEND.findall(q.legend)) | label_values_target(q.expr)
        for label in sorted(used - have):
            out.append(f"{q.where}: label {label!r} is not on {', '.join(sorted(set(names)))}")
    return out


# ---------------------------------------------------------------- the agent, scraped once for the module


class _BoundPort(logging.Handler):
    """Reads the port the agent's health server bound (observe.listen with port 0) from its log line."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.port: int | None = None

    def emit(self, record: logging.LogRecord) -> None:
        m = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", record.getMessage())
        if m:
            self.port = int(m[1])


@contextlib.asynccontextmanager
async def serving(agent: Agent) -> AsyncIterator[_BoundPort]:
    """The agent running, with the port its health server bound read from its log; stopped on leaving."""
    bound = _BoundPort()
    logger = logging.getLogger("edge_agent.observe")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(bound)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        yield bound
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        logger.removeHandler(bound)
        logger.setLevel(level)


async def run_and_scrape(broker: Broker, workdir: Path) -> str:
    """The simulator and an agent (Modbus, shipped model, MQTT, outbox, metrics on port 0) until each stage has
    done its work once; /metrics then, over HTTP."""
    sim_port = free_port()
    sim = asyncio.create_task(run_simulator(SimulatorOptions(ports={"modbus": sim_port}, seed=5)))
    environ = {
        **os.environ,
        "SIM_MODBUS_PORT": str(sim_port),
        "EDGE_AGENT__MQTT__URL": broker.url,
        "EDGE_AGENT__MQTT__TOPIC_PREFIX": "plant-a/area-1/skid-1",
        "EDGE_AGENT__MQTT__SCORES_INTERVAL": "1s",
        "EDGE_AGENT__MQTT__TELEMETRY_INTERVAL": "1s",
        "EDGE_AGENT__OUTBOX__PATH": str(workdir / "outbox.db"),
        "EDGE_AGENT__OBSERVE__LISTEN": "127.0.0.1:0",
    }
    agent = Agent(load_config(EXAMPLE, environ=environ))

    def worked(bound: _BoundPort) -> bool:
        st = agent.stats()
        return (
            bound.port is not None
            and st.publisher is not None
            and st.publisher.connected
            and st.publisher.acked >= 1
            and all(d.connected and d.reads >= 1 for d in st.devices)
            and all(m.last_score is not None for m in st.models)
        )

    try:
        async with serving(agent) as bound:
            await wait_for(lambda: worked(bound), timeout=60, step=0.1, what="the agent to poll, score and publish")
            assert bound.port is not None
            return (await http_get(bound.port, "/metrics"))[1]
    finally:
        sim.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sim


def _both_payloads_config(broker: Broker, workdir: Path) -> str:
    return (
        "agent: {id: spb-1, site: lab}\n"
        "devices:\n"
        f"  - name: uns\n    type: mqtt\n    url: {broker.url}\n    poll_interval: 100ms\n"
        "    tags:\n      - {name: flow, topic: plant/flow, path: $.v}\n"
        f"mqtt:\n  url: {broker.url}\n  payloads: [json, sparkplug]\n  topic_prefix: lab/spb-1\n"
        "  telemetry_interval: 100ms\n  sparkplug: {group_id: lab, primary_host_id: scada-1}\n"
        f"outbox: {{path: {workdir / 'outbox-spb.db'}}}\n"
        "observe: {listen: '127.0.0.1:0'}\n"
    )


async def run_both_payloads_and_scrape(broker: Broker, workdir: Path) -> str:
    """An agent publishing JSON and Sparkplug B (the primary host online) with an MQTT input device that got a
    good and a malformed payload; /metrics once the node is born and the payload counted."""
    host = SparkplugHost(broker.port, "lab", host_id="scada-1")
    host.state(True, int(time.time() * 1000))
    feed = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    feed.connect("127.0.0.1", broker.port)
    feed.loop_start()
    agent = Agent(parse_config(_both_payloads_config(broker, workdir)))
    try:
        async with serving(agent) as bound:
            await wait_for(lambda: all(d.connected for d in agent.stats().devices), timeout=30, what="the input up")
            for body in (b'{"v": 1.5}', b"{not json"):
                feed.publish("plant/flow", body, qos=1).wait_for_publish(5)
            await wait_for(
                lambda: (
                    bound.port is not None
                    and host.of("DBIRTH", "uns")
                    and dict(agent.stats().devices[0].driver).get("malformed") == 1
                    and (p := agent.stats().publisher) is not None
                    and p.acked >= 1
                ),
                timeout=60,
                step=0.1,
                what="births, a JSON publish and the malformed payload counted",
            )
            assert bound.port is not None
            return (await http_get(bound.port, "/metrics"))[1]
    finally:
        feed.disconnect()
        feed.loop_stop()
        host.close()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exported]:
    workdir = tmp_path_factory.mktemp("grafana")
    broker = Broker(workdir / "broker")
    broker.start()
    try:
        found = Exported.parse(asyncio.run(run_and_scrape(broker, workdir)))
        yield found.add(asyncio.run(run_both_payloads_and_scrape(broker, workdir)))
    finally:
        broker.kill()


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- the checks


def test_every_query_names_exported_series_and_labels(exported: Exported) -> None:
    assert exported.families, "the scrape found no metric families"
    # every family has samples (zeros included), so the labels of every series are known to the check
    quiet = {f for f in exported.families if not any(exported.series[s] == f for s in exported.labels)}
    assert not quiet, f"families without samples in the run: {quiet}"
    assert problems(dashboard(), exported) == []


def test_the_check_catches_what_the_agent_does_not_export(exported: Exported) -> None:
    """Without this, a checker that found nothing would pass anything."""
    broken = dashboard()
    panel = next(p for p in broken["panels"] if p["title"] == "In flight")
    panel["targets"][0]["expr"] = panel["targets"][0]["expr"].replace("mqtt_in_flight", "mqtt_inflight")
    depth = next(p for p in broken["panels"] if p["title"] == "Outbox depth by kind")
    depth["targets"][0]["expr"] = depth["targets"][0]["expr"].replace("outbox_depth", "outbox_depth_total")
    latency = next(p for p in broken["panels"] if p["title"] == "Poll latency")
    latency["targets"][0]["legendFormat"] = "{{instance}} {{model}}"
    reads = next(p for p in broken["panels"] if p["title"] == "Reads")
    reads["targets"][0]["expr"] = reads["targets"][0]["expr"].replace("reads_total", "reads")
    found = problems(broken, exported)
    assert any("edge_agent_mqtt_inflight is not exported" in p for p in found), found
    assert any("edge_agent_outbox_depth_total is not exported" in p for p in found), found
    assert any("'Poll latency' A: label 'model'" in p for p in found), found
    assert any("edge_agent_reads is not exported" in p for p in found), found  # a counter is stored as _total
    assert len(found) == 4, found


def test_the_dashboard_uses_every_exported_family_and_what_the_issue_asks(exported: Exported) -> None:
    used = {n for q in queries(dashboard()) for n in METRIC.findall(q.expr)}
    assert not REQUIRED - used, f"not on the dashboard: {sorted(REQUIRED - used)}"
    # a live Histogram's `_created` (prometheus_client's creation timestamp) is no dashboard material
    families = {
        f for f in exported.families if not (f.endswith("_created") and f.removesuffix("_created") in exported.families)
    }
    unused = families - {exported.series[n] for n in used if n in exported.series}
    assert not unused, f"exported but on no panel of {DASHBOARD.name} (add one): {sorted(unused)}"


def test_dashboard_is_valid_and_works_for_many_agents() -> None:
    board = dashboard()
    assert board["uid"] == "edge-agent" and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for name in ("job", "instance"):
        assert variables[name]["type"] == "query" and variables[name]["multi"] and variables[name]["includeAll"]
    ids = [p["id"] for p in board["panels"]]
    assert all(isinstance(i, int) for i in ids) and len(ids) == len(set(ids)), ids
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        assert len(panel["title"]) <= 32, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{panel['title']}: no unit"
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
    # every series a panel or annotation reads is narrowed to the selected agents
    for q in queries(board):
        if q.where.startswith("variable"):
            continue
        for name, selector in SELECTOR.findall(q.expr):
            assert 'job=~"$job"' in selector and 'instance=~"$instance"' in selector, f"{q.where}: {name}"
