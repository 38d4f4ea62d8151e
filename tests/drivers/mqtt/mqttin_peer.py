"""MQTT input driver test helpers: a driver from a config text, connected and subscribed, collecting its batches."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from edge_agent.config import parse_config
from edge_agent.drivers import REGISTRY
from edge_agent.drivers.mqtt.driver import MqttDriver
from edge_agent.types import Quality, SampleBatch


class Collected:
    """Every batch the driver pushed, and each tag's newest (value, quality)."""

    def __init__(self) -> None:
        self.batches: list[SampleBatch] = []
        self.latest: dict[str, tuple[Any, Quality]] = {}

    def __call__(self, batch: SampleBatch) -> None:
        self.batches.append(batch)
        for s in batch.samples():
            self.latest[s.tag] = (s.value, s.quality)

    def quality(self, tag: str) -> Quality | None:
        """The tag's newest quality, None before any."""
        got = self.latest.get(tag)
        return None if got is None else got[1]

    def value(self, tag: str) -> Any:
        """The tag's newest value (None before any, or when not good)."""
        got = self.latest.get(tag)
        return None if got is None else got[0]

    def has(self, tag: str, value: Any) -> Callable[[], bool]:
        """A predicate for wait_for: the tag's newest value is `value`, with good quality."""
        return lambda: self.latest.get(tag) == (value, Quality.GOOD)


def device_yaml(url: str, body: str) -> str:
    """A config with one mqtt device named uns on `url`; `body` holds its other keys (indented 4)."""
    return f"devices:\n  - name: uns\n    type: mqtt\n    url: {url}\n{body}"


@asynccontextmanager
async def running(config_text: str) -> AsyncIterator[tuple[MqttDriver, Collected]]:
    """The config's first device as a connected, subscribed MqttDriver, closed afterwards."""
    device = parse_config(config_text).devices[0]
    driver = REGISTRY["mqtt"].build(device)
    assert isinstance(driver, MqttDriver)
    got = Collected()
    await driver.connect()
    try:
        await driver.subscribe(got)
        yield driver, got
    finally:
        await driver.close()
