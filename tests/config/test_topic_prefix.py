"""mqtt.topic_prefix defaults to {agent.site}/{agent.id}: two agents on defaults never share a status or a will."""

from __future__ import annotations

from edge_agent.config import MqttSection, parse_config

DEVICE = "devices: [{name: d, type: modbus, host: 127.0.0.1, tags: [{name: t, address: '40001'}]}]\n"


def test_default_prefix_is_site_and_agent() -> None:
    one = parse_config("agent: {id: press-3, site: plant-a}\n" + DEVICE + "mqtt: {}\n")
    two = parse_config("agent: {id: press-4, site: plant-a}\n" + DEVICE + "mqtt: {}\n")
    assert (one.mqtt and one.mqtt.prefix, two.mqtt and two.mqtt.prefix) == ("plant-a/press-3", "plant-a/press-4")


def test_a_site_with_levels_or_wildcards_still_makes_a_valid_prefix() -> None:
    cfg = parse_config("agent: {site: 'acme/plant a+b/'}\n" + DEVICE + "mqtt: {}\n")
    assert cfg.mqtt is not None and cfg.mqtt.prefix == "acme/plant a_b/edge-agent"


def test_a_written_prefix_wins_and_a_bare_section_keeps_the_old_default() -> None:
    cfg = parse_config(DEVICE + "mqtt: {topic_prefix: x/y}\n")
    assert cfg.mqtt is not None and cfg.mqtt.prefix == "x/y"
    assert MqttSection().prefix == "edge-agent"
