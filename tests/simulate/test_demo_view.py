"""The demo's subscriber view: what it makes of the agent's MQTT messages."""

from __future__ import annotations

import json

import pytest

from edge_agent import demo
from edge_agent.demo import PREFIX, View, event_line, processes, score_bar


def event(event_id: str, kind: str = "anomaly.start") -> bytes:
    return json.dumps(
        {
            "event_id": event_id,
            "type": kind,
            "severity": "major",
            "score": 0.9,
            "threshold": 0.45,
            "window": {"start": "2026-01-01T00:00:00.000Z", "end": "2026-01-01T00:00:03.200Z"},
            "contributions": [{"tag": "pump.flow", "share": 0.6}, {"tag": "pump.vibration_rms", "share": 0.3}],
            "historical": False,
        }
    ).encode()


def test_repeated_event_ids_are_counted_once() -> None:
    view = View({"pump.flow": "m3/h"}, "cavitation", 10.0, 20.0)
    assert view.take(f"{PREFIX}/events/pump-skid", event("a")) is not None
    assert view.take(f"{PREFIX}/events/pump-skid", event("a")) is None  # at-least-once delivery: a repeat
    assert view.take(f"{PREFIX}/events/pump-skid", event("b", "anomaly.end")) is not None
    assert (view.starts, view.ends, len(view.events), view.messages) == (1, 1, 2, 3)


def test_telemetry_scores_and_status_update_the_view() -> None:
    view = View({"pump.flow": "m3/h"}, "", None, None)
    tags = [{"name": "pump.flow", "value": 40.5, "quality": "good", "ts": "x"}]
    view.take(f"{PREFIX}/telemetry/transmitters", json.dumps({"tags": tags}).encode())
    view.take(f"{PREFIX}/scores/pump-skid", json.dumps({"score": 0.2, "threshold": 0.45}).encode())
    view.take(f"{PREFIX}/status", json.dumps({"state": "online", "outbox": {"depth": 3}}).encode())
    view.take(f"{PREFIX}/status", b"not json")
    assert view.tags["pump.flow"].value == 40.5 and view.tags["pump.flow"].quality == "good"
    assert (view.score, view.threshold, view.status, view.outbox_depth) == (0.2, 0.45, "online", 3)
    assert view.plant_state() == "normal operation (no fault scheduled)"


def test_event_line_names_type_score_and_top_tags() -> None:
    line = event_line(json.loads(event("a")))
    assert line.startswith("00:00:03.200 anomaly.start major")
    assert "score 0.9 / threshold 0.45" in line and "pump.flow 60%, pump.vibration_rms 30%" in line


@pytest.mark.parametrize(("score", "filled"), [(0.0, 0), (0.45, 20), (0.9, 30), (None, 0)])
def test_score_bar_puts_the_threshold_at_two_thirds(score: float | None, filled: int) -> None:
    bar = score_bar(score, 0.45)
    assert len(bar) == 30
    assert bar.count("#") == (filled - (1 if filled > 20 else 0) if score is not None else 0)
    if score is not None:
        assert bar[20] == "|"


def test_no_broker_at_all_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(processes, "find_mosquitto", lambda: None)
    monkeypatch.setattr(processes, "have_amqtt", lambda: False)
    with pytest.raises(demo.DemoError, match=r"apt install mosquitto.*edge-agent\[demo\]"):
        demo.choose_broker("auto")
    with pytest.raises(demo.DemoError, match="--broker mosquitto"):
        demo.choose_broker("mosquitto")


def test_auto_prefers_mosquitto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(processes, "find_mosquitto", lambda: "/usr/sbin/mosquitto")
    monkeypatch.setattr(processes, "have_amqtt", lambda: True)
    assert demo.choose_broker("auto") == "mosquitto"
    monkeypatch.setattr(processes, "find_mosquitto", lambda: None)
    assert demo.choose_broker("auto") == "builtin"
