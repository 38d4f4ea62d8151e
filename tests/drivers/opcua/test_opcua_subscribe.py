"""Subscriptions against a real asyncua server: data changes, timestamps, deadband, queues, liveness."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import time
from typing import Any

import pytest
from asyncua import ua
from asyncua.common.callback import CallbackType
from helpers import wait_for
from opcua_peer import NS, UaPeer, device_yaml

from edge_agent.config import parse_config
from edge_agent.drivers.opcua.driver import OpcUaDriver
from edge_agent.errors import DeviceError
from edge_agent.types import Quality, Sample, SampleBatch

pytestmark = pytest.mark.asyncio(loop_scope="session")


class Collector:
    """A sink that keeps every batch and every sample."""

    def __init__(self) -> None:
        self.batches: list[SampleBatch] = []

    def __call__(self, batch: SampleBatch) -> None:
        self.batches.append(batch)

    def samples(self, tag: str) -> list[Sample]:
        return [s for b in self.batches for s in b.samples() if s.tag == tag]

    def values(self, tag: str) -> list[object]:
        return [s.value for s in self.samples(tag)]


async def subscribed(text: str) -> tuple[OpcUaDriver, Collector]:
    driver = OpcUaDriver(parse_config(text).devices[0])  # type: ignore[arg-type]
    sink = Collector()
    await driver.connect()
    await driver.subscribe(sink)
    return driver, sink


async def test_changes_arrive_with_source_timestamps(ua_peer: UaPeer) -> None:
    await ua_peer.write("Level", 10.0)
    driver, sink = await subscribed(
        device_yaml(ua_peer.url, [("l.level", f"nsu={NS};s=Level")], mode="subscribe", interval="50ms")
    )
    try:
        await wait_for(lambda: sink.values("l.level") == [10.0])  # the initial value
        source = dt.datetime(2025, 1, 2, 3, 4, 5, 600000, tzinfo=dt.UTC)
        await ua_peer.write("Level", 12.5, source=source)
        await wait_for(lambda: len(sink.values("l.level")) == 2)
        last = sink.samples("l.level")[-1]
        assert (last.value, last.quality, last.ts) == (12.5, Quality.GOOD, source.timestamp())
        assert sink.batches[-1].times is not None
        await driver.check()
    finally:
        await driver.close()
        await ua_peer.write("Level", 10.0)


async def test_agent_timestamps_on_request(ua_peer: UaPeer) -> None:
    text = device_yaml(
        ua_peer.url, [("l.level", f"nsu={NS};s=Level")], mode="subscribe", interval="50ms", extra="timestamps: agent"
    )
    driver, sink = await subscribed(text)
    try:
        await wait_for(lambda: len(sink.values("l.level")) == 1)
        before = time.time()
        await ua_peer.write("Level", 13.0, source=dt.datetime(2001, 1, 1, tzinfo=dt.UTC))
        await wait_for(lambda: len(sink.values("l.level")) == 2)
        assert before <= sink.samples("l.level")[-1].ts <= time.time()  # the agent's clock on arrival, not 2001
    finally:
        await driver.close()
        await ua_peer.write("Level", 10.0)


async def test_deadband_holds_back_small_changes(ua_peer: UaPeer) -> None:
    await ua_peer.write("Level", 10.0)
    tags = [f"{{name: d.level, node: 'nsu={NS};s=Level', deadband: {{type: absolute, value: 0.5}}}}"]
    driver, sink = await subscribed(device_yaml(ua_peer.url, tags, mode="subscribe", interval="50ms"))
    try:
        await wait_for(lambda: sink.values("d.level") == [10.0])
        await ua_peer.write("Level", 10.2)  # within the deadband
        await asyncio.sleep(0.3)  # several publishing intervals
        assert sink.values("d.level") == [10.0]
        await ua_peer.write("Level", 11.0)
        await wait_for(lambda: sink.values("d.level") == [10.0, 11.0])
    finally:
        await driver.close()
        await ua_peer.write("Level", 10.0)


async def test_queued_changes_of_one_tag_arrive_in_order(ua_peer: UaPeer) -> None:
    await ua_peer.write("Counter", 0)
    tags = [
        f"{{name: q.counter, node: 'nsu={NS};s=Counter', queue_size: 10}}",
        f"{{name: q.level, node: 'nsu={NS};s=Level'}}",
    ]
    driver, sink = await subscribed(device_yaml(ua_peer.url, tags, mode="subscribe", interval="500ms"))
    try:
        await wait_for(lambda: sink.values("q.counter") == [0])
        for i in range(1, 4):
            await ua_peer.write("Counter", i)  # three changes within one publishing interval
        await wait_for(lambda: sink.values("q.counter") == [0, 1, 2, 3], timeout=3)
        for batch in sink.batches:
            assert len(set(batch.tags)) == len(batch.tags)  # a tag at most once per batch
    finally:
        await driver.close()
        await ua_peer.write("Counter", 0)


async def test_full_group_batches_use_the_group_tuple(ua_peer: UaPeer) -> None:
    tags = [("g.level", f"nsu={NS};s=Level"), ("g.double", f"nsu={NS};s=Double")]
    driver, sink = await subscribed(device_yaml(ua_peer.url, tags, mode="subscribe", interval="50ms"))
    try:
        await wait_for(lambda: len(sink.batches) >= 1)
        first = sink.batches[0]
        assert first.tags is driver.subscriptions[0].tags  # the buffers' fast path
        assert first.values.tolist() == [10.0, -273.15]
    finally:
        await driver.close()


async def test_bad_nodes_are_reported_bad_at_once(ua_peer: UaPeer) -> None:
    tags = [("b.level", f"nsu={NS};s=Level"), ("b.gone", f"nsu={NS};s=Gone"), ("b.broken", f"nsu={NS};s=Broken")]
    driver, sink = await subscribed(device_yaml(ua_peer.url, tags, mode="subscribe", interval="50ms"))
    try:
        await wait_for(
            lambda: bool(sink.samples("b.gone")) and bool(sink.samples("b.broken")) and bool(sink.samples("b.level"))
        )
        assert sink.samples("b.gone")[0].quality is Quality.BAD
        assert sink.samples("b.broken")[0].quality is Quality.BAD
        await driver.check()  # bad nodes do not make the device dead
    finally:
        await driver.close()


async def test_check_fails_once_the_connection_drops(ua_peer: UaPeer) -> None:
    driver, _ = await subscribed(
        device_yaml(ua_peer.url, [("c.level", f"nsu={NS};s=Level")], mode="subscribe", interval="50ms")
    )
    try:
        await driver.check()
        assert ua_peer.drop_connections() >= 1
        with pytest.raises(DeviceError, match=r"connection to \S+ lost|connection is closed"):
            async with asyncio.timeout(3):
                while True:
                    await driver.check()
                    await asyncio.sleep(0.05)
    finally:
        await driver.close()


async def test_monitored_item_settings_reach_the_server(ua_peer: UaPeer) -> None:
    """The sampling interval, queue and deadband the server is asked for, as it received them.

    asyncua's server does not implement percent deadbands (it logs "not implemented" and sends every
    change), so this checks the request, not the filtering.
    """
    assert ua_peer.server is not None
    requests: list[ua.CreateMonitoredItemsParameters] = []

    def created(event: Any, _: Any) -> None:
        requests.append(event.request_params)

    ua_peer.server.subscribe_server_callback(CallbackType.ItemSubscriptionCreated, created)
    tags = [
        f"{{name: m.abs, node: 'nsu={NS};s=Level', deadband: {{type: absolute, value: 0.25}}, queue_size: 5}}",
        f"{{name: m.pct, node: 'nsu={NS};s=Double', deadband: {{type: percent, value: 2.5}}}}",
        f"{{name: m.plain, node: 'nsu={NS};s=Counter', poll_interval: 1s}}",
    ]
    try:
        driver, sink = await subscribed(device_yaml(ua_peer.url, tags, mode="subscribe", interval="250ms"))
        try:
            await wait_for(lambda: all(sink.samples(t) for t in ("m.abs", "m.pct", "m.plain")))
        finally:
            await driver.close()
    finally:
        ua_peer.server.unsubscribe_server_callback(CallbackType.ItemSubscriptionCreated, created)
    assert {r.TimestampsToReturn for r in requests} == {ua.TimestampsToReturn.Both}
    items = {i.ItemToMonitor.NodeId.Identifier: i.RequestedParameters for r in requests for i in r.ItemsToCreate}
    absolute, percent, plain = items["Level"], items["Double"], items["Counter"]
    assert (absolute.SamplingInterval, absolute.QueueSize, absolute.DiscardOldest) == (250.0, 5, True)
    # the server decodes filters into asyncua's generated DataChangeFilter, not the class the client sends
    assert type(absolute.Filter).__name__ == type(percent.Filter).__name__ == "DataChangeFilter"
    assert (absolute.Filter.Trigger, absolute.Filter.DeadbandType, absolute.Filter.DeadbandValue) == (
        ua.DataChangeTrigger.StatusValue,
        ua.DeadbandType.Absolute,
        0.25,
    )
    assert (percent.SamplingInterval, percent.QueueSize) == (250.0, 1)
    assert (percent.Filter.DeadbandType, percent.Filter.DeadbandValue) == (ua.DeadbandType.Percent, 2.5)
    assert (plain.SamplingInterval, plain.QueueSize) == (1000.0, 1)
    assert plain.Filter is None or plain.Filter.Body is None  # no filter: an empty extension object on the wire


async def test_refused_deadband_makes_the_tag_bad_not_the_device(
    ua_peer: UaPeer, caplog_opcua: pytest.LogCaptureFixture
) -> None:
    assert ua_peer.server is not None
    service = ua_peer.server.iserver.subscription_service
    create = service.create_monitored_items

    def is_percent(item: ua.MonitoredItemCreateRequest) -> bool:
        return getattr(item.RequestedParameters.Filter, "DeadbandType", None) == ua.DeadbandType.Percent

    async def refuse_percent(params: ua.CreateMonitoredItemsParameters) -> list[ua.MonitoredItemCreateResult]:
        # what a server does for nodes without an EURange: percent deadbands refused, the other items created
        made = iter(
            await create(
                dataclasses.replace(params, ItemsToCreate=[i for i in params.ItemsToCreate if not is_percent(i)])
            )
        )
        refused = ua.MonitoredItemCreateResult(
            StatusCode=ua.StatusCode(ua.UInt32(ua.StatusCodes.BadMonitoredItemFilterUnsupported))
        )
        return [refused if is_percent(i) else next(made) for i in params.ItemsToCreate]

    service.create_monitored_items = refuse_percent  # type: ignore[method-assign]
    tags = [
        f"{{name: r.pct, node: 'nsu={NS};s=Double', deadband: {{type: percent, value: 2}}}}",
        f"{{name: r.level, node: 'nsu={NS};s=Level'}}",
    ]
    try:
        driver, sink = await subscribed(device_yaml(ua_peer.url, tags, mode="subscribe", interval="50ms"))
    finally:
        del service.create_monitored_items  # the class's own method again
    try:
        await wait_for(lambda: bool(sink.samples("r.pct")) and bool(sink.samples("r.level")))
        assert [s.quality for s in sink.samples("r.pct")] == [Quality.BAD]
        assert sink.samples("r.level")[0].quality is Quality.GOOD
        await driver.check()  # the device is up
        await ua_peer.write("Level", 11.5)
        await wait_for(lambda: sink.values("r.level")[-1] == 11.5)
    finally:
        await driver.close()
        await ua_peer.write("Level", 10.0)
    assert any(
        "r.pct" in r.getMessage()
        and "cannot be monitored: BadMonitoredItemFilterUnsupported (the server refuses its percent deadband, "
        "which needs an EURange on the node): use type: absolute"
        in r.getMessage()
        for r in caplog_opcua.records
    )
