"""Reading a real asyncua server: every decoded type, every node id form, arrays, status codes → quality."""

from __future__ import annotations

import base64
import math

import pytest
from asyncua import ua
from asyncua.common.utils import ServiceError
from opcua_peer import BIG, GUID, NS, OPAQUE, WHEN, UaPeer, device_yaml

from edge_agent.config import parse_config
from edge_agent.drivers.opcua.driver import OpcUaDriver
from edge_agent.types import Quality, SampleBatch

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def read_once(text: str) -> tuple[OpcUaDriver, SampleBatch]:
    cfg = parse_config(text)
    driver = OpcUaDriver(cfg.devices[0])  # type: ignore[arg-type]
    await driver.connect()
    try:
        group = [*driver.groups, *driver.subscriptions][0]
        return driver, await driver.read(group)
    finally:
        await driver.close()


def by_tag(batch: SampleBatch) -> dict[str, tuple[object, Quality]]:
    return {s.tag: (s.value, s.quality) for s in batch.samples()}


@pytest.mark.parametrize("mode", ["read", "subscribe"])
async def test_every_builtin_type_decodes(ua_peer: UaPeer, mode: str) -> None:
    names = ["Bool", "SByte", "Byte", "Int16", "UInt16", "Int32", "UInt32", "Int64", "UInt64", "Float", "Double"]
    names += ["String", "DateTime"]
    tags = [(f"t.{n.lower()}", f"nsu={NS};s={n}") for n in names]
    _, batch = await read_once(device_yaml(ua_peer.url, tags, mode=mode))
    got = by_tag(batch)
    assert all(q is Quality.GOOD for _, q in got.values()), got
    assert got["t.bool"][0] is True
    assert got["t.sbyte"][0] == -12 and got["t.byte"][0] == 250
    assert got["t.int16"][0] == -32000 and got["t.uint16"][0] == 65000
    assert got["t.int32"][0] == -2_000_000_000 and got["t.uint32"][0] == 4_000_000_000
    assert got["t.int64"][0] == -BIG and got["t.uint64"][0] == BIG  # exact, beyond float64
    assert got["t.float"][0] == 1.5 and got["t.double"][0] == -273.15
    assert got["t.string"][0] == "Pumpe 3 – Saugseite"
    assert got["t.datetime"][0] == "2024-05-17T08:30:15.250Z"
    col = batch.tags.index("t.datetime")
    assert batch.values[col] == WHEN.timestamp()  # the buffers get epoch seconds
    assert math.isnan(batch.values[batch.tags.index("t.string")])
    assert batch.kinds[batch.tags.index("t.bool")] == "bool" and batch.kinds[batch.tags.index("t.int32")] == "int"


async def test_every_node_id_form(ua_peer: UaPeer) -> None:
    idx = ua_peer.idx
    b64 = base64.b64encode(OPAQUE).decode()
    tags = [
        ("by.string", f"ns={idx};s=Double"),
        ("by.numeric", f"ns={idx};i=1001"),
        ("by.guid", f"ns={idx};g={{{str(GUID).upper()}}}"),  # braces and upper case, as some tools write it
        ("by.opaque", f"ns={idx};b={b64}"),
        ("by.uri", f"nsu={NS};i=1001"),
        ("by.uri_opaque", f"nsu={NS};b={b64}"),
        ("by.ns0", "i=2255"),  # the namespace array: an array, so not usable without index
        ("by.ns0_index", "i=2255"),
        ("server.state", "ns=0;i=2259"),
    ]
    text = device_yaml(ua_peer.url, tags).replace(
        '{name: by.ns0_index, node: "i=2255"}', '{name: by.ns0_index, node: "i=2255", index: 0}'
    )
    _, batch = await read_once(text)
    got = by_tag(batch)
    assert got["by.string"] == (-273.15, Quality.GOOD)
    for name in ("by.numeric", "by.guid", "by.uri"):
        assert got[name] == (42.5, Quality.GOOD), name
    assert got["by.opaque"] == (7, Quality.GOOD) and got["by.uri_opaque"] == (7, Quality.GOOD)
    assert got["by.ns0"][1] is Quality.BAD
    assert got["by.ns0_index"] == ("http://opcfoundation.org/UA/", Quality.GOOD)
    assert got["server.state"] == (0, Quality.GOOD)  # ServerState.Running


async def test_arrays_need_an_index(ua_peer: UaPeer, caplog_opcua: pytest.LogCaptureFixture) -> None:
    tags = [
        "{name: a.whole, node: 'nsu=urn:edge-agent:test;s=Array'}",
        "{name: a.third, node: 'nsu=urn:edge-agent:test;s=Array', index: 2}",
        "{name: a.past, node: 'nsu=urn:edge-agent:test;s=Array', index: 9}",
        "{name: a.scalar, node: 'nsu=urn:edge-agent:test;s=Double', index: 0}",
    ]
    _, batch = await read_once(device_yaml(ua_peer.url, tags))
    got = by_tag(batch)
    assert got["a.third"] == (3.0, Quality.GOOD)
    assert got["a.whole"][1] is Quality.BAD and got["a.past"][1] is Quality.BAD and got["a.scalar"][1] is Quality.BAD
    text = caplog_opcua.text
    assert "a.whole (nsu=urn:edge-agent:test;s=Array) is an array of 5 values; set index: N on the tag" in text
    assert "has no element 9: the array has 5" in text
    assert "is not an array, but the tag asks for index 0" in text


async def test_status_codes_become_quality(ua_peer: UaPeer, caplog_opcua: pytest.LogCaptureFixture) -> None:
    tags = [
        ("q.good", f"nsu={NS};s=Double"),
        ("q.bad", f"nsu={NS};s=Broken"),
        ("q.uncertain", f"nsu={NS};s=Doubtful"),
        ("q.unknown", f"nsu={NS};s=NoSuchNode"),
        ("q.text", f"nsu={NS};s=Text"),
        ("q.no_namespace", "nsu=urn:not-here;s=X"),
    ]
    _, batch = await read_once(device_yaml(ua_peer.url, tags))
    got = by_tag(batch)
    assert got["q.good"] == (-273.15, Quality.GOOD)
    assert got["q.bad"] == (None, Quality.BAD)
    assert got["q.uncertain"] == (None, Quality.UNCERTAIN)
    assert got["q.unknown"][1] is Quality.BAD and got["q.text"][1] is Quality.BAD
    assert got["q.no_namespace"][1] is Quality.BAD
    text = caplog_opcua.text
    assert "BadSensorFailure" in text and "BadNodeIdUnknown" in text
    assert "has type LocalizedText, not a number, boolean, string or DateTime" in text
    assert "the server has no namespace urn:not-here" in text
    assert "Doubtful" not in text  # uncertain is a quality, not a fault worth a warning


async def test_bad_tags_are_logged_once_and_recovery_once(
    ua_peer: UaPeer, caplog_opcua: pytest.LogCaptureFixture
) -> None:
    cfg = parse_config(device_yaml(ua_peer.url, [("r.counter", f"nsu={NS};s=Counter"), ("r.gone", f"nsu={NS};s=Nope")]))
    driver = OpcUaDriver(cfg.devices[0])  # type: ignore[arg-type]
    await driver.connect()
    try:
        for _ in range(5):
            await driver.read(driver.groups[0])
        assert caplog_opcua.text.count("BadNodeIdUnknown") == 1
    finally:
        await driver.close()


async def test_chunks_follow_max_nodes_per_read(ua_peer: UaPeer) -> None:
    names = ["Bool", "Int32", "Double", "Float", "String"]
    tags = [(f"c.{n.lower()}", f"nsu={NS};s={n}") for n in names]
    text = device_yaml(ua_peer.url, tags, extra="max_nodes_per_read: 2")
    driver, batch = await read_once(text)
    assert all(q == Quality.GOOD for q in batch.quality)
    assert driver.requests_per_cycle == {0.1: 3}


async def test_chunks_follow_the_servers_max_nodes_per_read(ua_peer: UaPeer) -> None:
    assert ua_peer.server is not None
    limit = ua.NodeId(ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead)
    await ua_peer.server.write_attribute_value(limit, ua.DataValue(ua.Variant(2, ua.VariantType.UInt32)))
    try:
        tags = [(f"m.{n.lower()}", f"nsu={NS};s={n}") for n in ("Bool", "Int32", "Double", "Float", "String")]
        driver, batch = await read_once(device_yaml(ua_peer.url, tags))
    finally:
        await ua_peer.server.write_attribute_value(limit, ua.DataValue(ua.Variant(10000, ua.VariantType.UInt32)))
    assert all(q == Quality.GOOD for q in batch.quality)
    assert driver.requests_per_cycle == {0.1: 3}


async def test_a_server_that_refuses_large_reads_without_saying(
    ua_peer: UaPeer, caplog_opcua: pytest.LogCaptureFixture
) -> None:
    assert ua_peer.server is not None
    service = ua_peer.server.iserver.attribute_service
    plain = service.read

    def picky(params: ua.ReadParameters) -> list[ua.DataValue]:
        if len(params.NodesToRead) > 3:  # the 3 reads at connect pass
            raise ServiceError(ua.StatusCodes.BadTooManyOperations)
        return plain(params)

    service.read = picky  # type: ignore[method-assign]
    try:
        tags = [(f"p.{n.lower()}", f"nsu={NS};s={n}") for n in ("Bool", "Int32", "Double", "Float", "String")]
        driver, batch = await read_once(device_yaml(ua_peer.url, tags))
    finally:
        service.read = plain  # type: ignore[method-assign]
    assert all(q == Quality.GOOD for q in batch.quality)
    assert (
        "Read of 5 nodes refused (BadTooManyOperations); reading 2 nodes per request from now on" in caplog_opcua.text
    )
    assert driver.requests_per_cycle == {0.1: 3}


async def test_fast_path_is_used_and_the_fallback_agrees(ua_peer: UaPeer) -> None:
    names = ["Bool", "SByte", "UInt64", "Float", "String", "DateTime", "Array", "Text", "Broken", "Doubtful"]
    tags = [(f"f.{n.lower()}", f"nsu={NS};s={n}") for n in names]
    tags.append(("f.third", f"nsu={NS};s=Array"))
    text = device_yaml(ua_peer.url, tags).replace(
        f'{{name: f.third, node: "nsu={NS};s=Array"}}', f'{{name: f.third, node: "nsu={NS};s=Array", index: 2}}'
    )
    driver = OpcUaDriver(parse_config(text).devices[0])  # type: ignore[arg-type]
    await driver.connect()
    try:
        assert driver._fast  # this asyncua still has what the fast path needs: an upgrade that breaks it fails here
        fast = await driver.read(driver.groups[0])
        driver._fast = False
        slow = await driver.read(driver.groups[0])
    finally:
        await driver.close()
    assert [(s.tag, s.value, s.quality) for s in fast.samples()] == [
        (s.tag, s.value, s.quality) for s in slow.samples()
    ]
    assert fast.kinds == slow.kinds
