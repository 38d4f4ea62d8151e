"""`edge-agent browse` against a real asyncua server: its output passes `check` and `read` untouched.

The server is the test peer (every builtin type, each node id form, an array, a LocalizedText, bad and
uncertain values) with a plant folder added: two objects whose names sanitise alike, a unit from
EUInformation, a variable under a variable, a `$` in a node id, and a chain deeper than the default depth.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from asyncua import ua
from opcua_peer import GUID, NS, OPAQUE, Pki, UaPeer, edge_agent

from edge_agent.config import load_config, parse_config
from edge_agent.drivers.base import TAG_NAME
from edge_agent.drivers.opcua.browse import OpcUaBrowser, device_for_browse
from edge_agent.drivers.opcua.driver import OpcUaDriver
from edge_agent.errors import DeviceError
from edge_agent.simulate.opcua_server import engineering_units
from edge_agent.types import Quality

pytestmark = pytest.mark.asyncio(loop_scope="session")

GOOD_TEST = [  # the peer's Test folder, as tags
    *["Bool", "SByte", "Byte", "Int16", "UInt16", "Int32", "UInt32", "Int64", "UInt64", "Float", "Double"],
    *["String", "DateTime", "Level", "Counter", "Numeric", "Guid", "Opaque"],
]
# "Line 1" and "Line/1" both sanitise to Line_1, "Temp (°C)" to Temp_C: the second gets _2
PLANT = ["Plant.Line_1.Temp_C", "Plant.Line_1.Temp_C.Setpoint", "Plant.Line_1.Temp_C_2", "Plant.Price", "_2nd"]
NOT_TAGS = {  # tag name -> what its comment says
    "Test.Array": "Double[5]: an array of 5: a tag with index: N reads one element (0 … 4)",
    "Test.Text": "LocalizedText: not a number, boolean, string or DateTime",
    "Test.Broken": "Double: reads BadSensorFailure now (bad)",
    "Test.Doubtful": "Double: reads UncertainLastUsableValue now (uncertain)",
}


async def add_plant(peer: UaPeer) -> None:
    """Nodes that exercise names, units, nesting and depth, beside the peer's Test folder."""
    assert peer.server is not None
    idx = peer.idx
    objects = peer.server.nodes.objects
    plant = await objects.add_folder(ua.NodeId("Plant", idx), ua.QualifiedName("Plant", idx))
    for i, line in enumerate(("Line 1", "Line/1")):  # both sanitise to Line_1
        obj = await plant.add_object(ua.NodeId(f"Plant.L{i}", idx), ua.QualifiedName(line, idx))
        temp = await obj.add_variable(
            ua.NodeId(f"Plant.L{i}.Temp", idx), ua.QualifiedName("Temp (°C)", idx), ua.Variant(20.5 + i)
        )
        await temp.add_property(
            ua.NodeId(f"Plant.L{i}.Temp.EU", idx),
            ua.QualifiedName("EngineeringUnits", 0),
            ua.Variant(engineering_units("°C"), ua.VariantType.ExtensionObject),
            datatype=ua.NodeId(ua.ObjectIds.EUInformation),
        )
        if i == 0:  # a variable under a variable (HasComponent)
            await temp.add_variable(
                ua.NodeId("Plant.L0.Temp.SP", idx), ua.QualifiedName("Setpoint", idx), ua.Variant(25.0)
            )
    await plant.add_variable(
        ua.NodeId("Price${EUR}", idx), ua.QualifiedName("Price", idx), ua.Variant(3, ua.VariantType.Int32)
    )
    await objects.add_variable(ua.NodeId("Second", idx), ua.QualifiedName("2nd", idx), ua.Variant(2.0))
    node = await plant.add_object(ua.NodeId("Deep", idx), ua.QualifiedName("Deep", idx))
    for level in range(1, 7):  # Objects/Plant/Deep/D1/…/D6/Value: the value is 9 levels down
        node = await node.add_object(ua.NodeId(f"Deep.D{level}", idx), ua.QualifiedName(f"D{level}", idx))
    await node.add_variable(ua.NodeId("Deep.Value", idx), ua.QualifiedName("Value", idx), ua.Variant(1.0))


def relative(path: Path, base: Path) -> str:
    return os.path.relpath(path, base)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def peer(pki: Pki) -> AsyncIterator[UaPeer]:
    """A peer of this module's own, with the plant folder added."""
    server = UaPeer(pki)
    await server.start()
    await add_plant(server)
    try:
        yield server
    finally:
        await server.stop()


async def test_browse_output_passes_check_and_read_untouched(peer: UaPeer, tmp_path: Path) -> None:
    out = tmp_path / "tags.yaml"
    code, _, err = await edge_agent("browse", peer.url, "--name", "test-server", "--out", str(out))
    assert code == 0, err
    assert f"{len(GOOD_TEST) + len(PLANT)} tags, 4 variables listed as comments in {out}" in err
    text = out.read_text()
    dev = load_config(out).devices[0]
    tags = {t.name: t for t in dev.tags}  # type: ignore[attr-defined]
    # one tag per variable that reads good, named by its browse path; unique and valid by construction
    assert sorted(tags) == sorted([f"Test.{n}" for n in GOOD_TEST] + PLANT)
    assert all(TAG_NAME.match(n) for n in tags)
    # node ids name the namespace by URI, whatever their form
    assert str(tags["Test.Double"].node) == f"nsu={NS};s=Double"
    assert str(tags["Test.Numeric"].node) == f"nsu={NS};i=1001"
    assert str(tags["Test.Guid"].node) == f"nsu={NS};g={GUID}"
    assert str(tags["Test.Opaque"].node) == f"nsu={NS};b={base64.b64encode(OPAQUE).decode()}"
    assert str(tags["Plant.Price"].node) == f"nsu={NS};s=Price${{EUR}}"  # written $$, read back as it is
    # the unit from EUInformation, the type in a comment
    assert tags["Plant.Line_1.Temp_C"].unit == tags["Plant.Line_1.Temp_C_2"].unit == "°C"
    assert tags["Test.Double"].unit is None
    assert "Test.Double, " in text and f'node: "nsu={NS};s=Double"}}  # Double\n' in text
    # arrays, other types and values not good now: comments, each saying why
    for name, why in NOT_TAGS.items():
        line = next(x for x in text.splitlines() if f"{{name: {name}, " in x)
        assert line.startswith("      # - {") and line.endswith(f"  # {why}"), line
    assert "# 36 nodes under Objects (i=85) to depth 6: 27 variables, 23 tags, 4 listed as comments\n" in text
    assert "the standard's own nodes under objects" in text.lower()
    assert "1 node lies below depth 6" in text  # Plant/Deep/D1/…: the chain goes deeper than the walk
    assert "Deep" not in " ".join(tags)

    code, out_text, err = await edge_agent("check", str(out))
    assert code == 0, err
    assert f"{len(tags)} tags" in out_text
    code, out_text, err = await edge_agent("read", str(out), "--json")
    assert code == 0, out_text + err
    rows = {r["tag"]: r for r in map(json.loads, out_text.splitlines())}
    assert sorted(rows) == sorted(tags)
    assert all(r["quality"] == "good" for r in rows.values())
    assert rows["Plant.Price"]["value"] == 3 and rows["Test.String"]["value"] == "Pumpe 3 – Saugseite"
    assert rows["Plant.Line_1.Temp_C"]["value"] == 20.5 and rows["Plant.Line_1.Temp_C_2"]["value"] == 21.5

    # the array's comment is a tag line: uncommented, it reads the first element
    array = text.replace("      # - {name: Test.Array,", "      - {name: Test.Array,")
    driver = OpcUaDriver(parse_config(array).devices[0])  # type: ignore[arg-type]
    await driver.connect()
    try:
        samples = {s.tag: s for s in (await driver.read(driver.groups[0])).samples()}
    finally:
        await driver.close()
    assert (samples["Test.Array"].value, samples["Test.Array"].quality) == (1.0, Quality.GOOD)


async def test_an_untrusted_server_is_refused_as_run_refuses_it(peer: UaPeer, pki: Pki, tmp_path: Path) -> None:
    out = tmp_path / "site" / "tags.yaml"
    out.parent.mkdir()
    secure = [
        "--policy", "Basic256Sha256", "--security-mode", "SignAndEncrypt",
        "--certificate", str(pki.client_cert), "--private-key", str(pki.client_key),
        "--rejected-dir", str(tmp_path / "rejected"),
    ]  # fmt: skip
    code, _, err = await edge_agent("browse", peer.url, *secure, "--trust-dir", str(pki.empty_trust), "--out", str(out))
    assert code == 1
    assert "is not trusted" in err and str(tmp_path / "rejected") in err, err
    assert len(list((tmp_path / "rejected").iterdir())) == 1  # saved for the engineer to trust, as `run` does
    assert not out.exists()

    code, _, err = await edge_agent("browse", peer.url, *secure, "--trust-dir", str(pki.trusted), "--out", str(out))
    assert code == 0, err
    # the files are named relative to the config's folder, where the loader looks for them
    assert f"      certificate: {relative(pki.client_cert, out.parent)}\n" in out.read_text()
    sec = load_config(out).devices[0].security  # type: ignore[attr-defined]
    assert sec.policy == "Basic256Sha256" and sec.certificate.resolve() == pki.client_cert.resolve()
    assert sec.trust_dir.resolve() == pki.trusted.resolve()
    code, _, err = await edge_agent("check", str(out))
    assert code == 0, err


async def test_option_problems_are_named_by_option(peer: UaPeer, pki: Pki, tmp_path: Path) -> None:
    code, _, err = await edge_agent(
        "browse", peer.url, "--policy", "Basic256Sha256", "--certificate", str(pki.client_cert),
        "--private-key", str(pki.client_key),
    )  # fmt: skip
    assert code == 2
    assert err.startswith("browse: --trust-dir: policy Basic256Sha256 needs a folder of trusted server certificates")
    code, _, err = await edge_agent("browse", peer.url, "--root", "Objects", "--out", str(tmp_path / "x.yaml"))
    assert code == 2 and err.startswith("browse: --root: 'Objects' is not a node id"), err
    assert not (tmp_path / "x.yaml").exists()


async def test_the_walk_is_bounded_by_depth_nodes_and_root(peer: UaPeer) -> None:
    browser = OpcUaBrowser(device_for_browse({"endpoint": peer.url, "timeout": "2s"}))
    await browser.connect()
    try:
        shallow = await browser.walk(depth=1)
        assert {v.path for v in shallow.variables} == {("2nd",)}
        assert shallow.below > 0 and not shallow.limit_hit  # Plant's and Test's children: not visited

        deep = await browser.walk(depth=9)
        assert ("Plant", "Deep", "D1", "D2", "D3", "D4", "D5", "D6", "Value") in {v.path for v in deep.variables}
        assert deep.below == 0

        few = await browser.walk(max_nodes=5)
        assert few.limit_hit and few.nodes == 5

        test = await browser.walk(root=f"nsu={NS};s=Test")  # names start below the root
        assert {v.path for v in test.tags} == {(n,) for n in GOOD_TEST}
        assert not test.skipped_standard

        one = await browser.walk(root=f"nsu={NS};s=Plant.L0.Temp")  # a variable as the root: it and its children
        assert [(v.path, v.unit) for v in one.tags] == [(("Temp (°C)",), "°C"), (("Temp (°C)", "Setpoint"), None)]

        with pytest.raises(DeviceError, match="the server has no namespace urn:nowhere"):
            await browser.walk(root="nsu=urn:nowhere;s=X")
        with pytest.raises(DeviceError, match=f"--root nsu={NS};s=Nothing: the server has no such node"):
            await browser.walk(root=f"nsu={NS};s=Nothing")
    finally:
        await browser.close()
