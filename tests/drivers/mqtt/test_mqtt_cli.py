"""`edge-agent read` on an mqtt device: the latest values after a short subscribe (retained JSON, and a Sparkplug
node already running, whose births the read asks for)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from helpers import Broker
from mqttin_peer import device_yaml
from spnode import SparkplugNode
from test_mqtt_json import Publisher

from edge_agent.cli import main

TAGS = """\
    timeout: 3s
    sparkplug: {group_id: plant-a, edge_node_id: line-3, device_id: plc-1}
    tags:
      - {name: flow, topic: plant/line-3/flow, path: $.value, unit: m3/h}
      - {name: temp, metric: Temperature, unit: degC}
      - {name: mode, metric: Mode}
"""


def test_read_prints_the_latest_values(broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pub = Publisher(broker.port)
    node = SparkplugNode(broker.port, "plant-a", "line-3", "plc-1")
    try:
        pub.send("plant/line-3/flow", {"value": 12.5}, retain=True)
        node.birth()  # before the read subscribes: it sees no birth and asks for one when data comes
        node.publish("spBv1.0/plant-a/STATE/x", b"")  # nothing the read subscribed to: ignored
        cfg = tmp_path / "config.yaml"
        cfg.write_text(device_yaml(broker.url, TAGS))
        # the node keeps sending DDATA while the read waits, so the read sees data by an alias it does not know
        stop = threading.Event()

        def ddata() -> None:
            for _ in range(200):  # at most 10 s
                if stop.wait(0.05):
                    return
                node.data({"Temperature": 21.0})

        t = threading.Thread(target=ddata, daemon=True)
        t.start()
        try:
            code = main(["read", "--json", str(cfg)])
        finally:
            stop.set()
            t.join(5)
        rows = {r["tag"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
        assert code == 0
        assert rows["flow"]["value"] == 12.5 and rows["flow"]["unit"] == "m3/h"
        assert rows["flow"]["address"] == "plant/line-3/flow $.value"
        assert rows["temp"]["value"] == 21.0 and rows["temp"]["quality"] == "good"
        assert rows["mode"]["value"] == "auto" and rows["temp"]["address"] == "Temperature"
        assert node.rebirths >= 1
    finally:
        node.close()
        pub.close()


def test_read_says_what_never_came(broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A tag nobody publishes is stale after `timeout`, and the exit code says not every tag is good."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        device_yaml(broker.url, "    timeout: 300ms\n    tags:\n      - {name: silent, topic: nobody/here}\n")
    )
    assert main(["read", "--json", str(cfg)]) == 1
    row = json.loads(capsys.readouterr().out)
    assert row["tag"] == "silent" and row["quality"] == "stale" and row["value"] is None
