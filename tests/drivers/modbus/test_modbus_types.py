"""Every type × byte order, decoded by the agent from registers placed by hand in a real pymodbus server."""

from __future__ import annotations

import logging
import struct

import pytest
from helpers import ModbusPeer
from pymodbus.client import AsyncModbusTcpClient

from edge_agent.config import parse_config
from edge_agent.drivers.modbus.config import Table, range_text
from edge_agent.drivers.modbus.driver import ModbusDriver
from edge_agent.types import Quality

# Wire order of a value's big-endian bytes, written out by hand (independent of the agent's codec).
WIRE = {
    2: {"ABCD": "AB", "CDAB": "AB", "BADC": "BA", "DCBA": "BA"},
    4: {"ABCD": "ABCD", "BADC": "BADC", "CDAB": "CDAB", "DCBA": "DCBA"},
    8: {"ABCD": "ABCDEFGH", "BADC": "BADCFEHG", "CDAB": "GHEFCDAB", "DCBA": "HGFEDCBA"},
}
CASES = [
    ("int16", ">h", -12345),
    ("uint16", ">H", 54321),
    ("int32", ">i", -123456789),
    ("uint32", ">I", 3_000_000_000),
    ("int64", ">q", -(2**62) - 12345),
    ("uint64", ">Q", 2**64 - 2),
    ("float32", ">f", -1234.5),
    ("float64", ">d", 6.02214076e23),
]
ORDERS = ["ABCD", "BADC", "CDAB", "DCBA"]


def wire_registers(fmt: str, value: float | int, order: str) -> list[int]:
    big = struct.pack(fmt, value)
    wire = bytes(big["ABCDEFGH".index(c)] for c in WIRE[len(big)][order])
    return [int.from_bytes(wire[i : i + 2], "big") for i in range(0, len(wire), 2)]


def config_for(port: int, tags: list[str]) -> str:
    return (
        "devices:\n  - name: plc\n    type: modbus\n    host: 127.0.0.1\n"
        f"    port: {port}\n    timeout: 1s\n    tags:\n" + "".join(f"      - {t}\n" for t in tags)
    )


async def read_all(text: str, requests: int | None = None) -> dict[str, tuple[object, Quality]]:
    cfg = parse_config(text)
    driver = ModbusDriver(cfg.devices[0])
    if requests is not None:
        assert sum(driver.requests_per_cycle.values()) == requests
    await driver.connect()
    try:
        out = {}
        for group in driver.groups:
            batch = await driver.read(group)
            out.update({s.tag: (s.value, s.quality) for s in batch.samples()})
        return out
    finally:
        await driver.close()


async def test_every_type_in_every_byte_order(modbus_peer: ModbusPeer) -> None:
    tags, expected, addr = [], {}, 0
    for table in ("holding", "input"):
        for name, fmt, value in CASES:
            for order in ORDERS:
                regs = wire_registers(fmt, value, order)
                modbus_peer.place(table, addr, regs)
                tag = f"{table}.{name}.{order}"
                tags.append(f'{{name: {tag}, address: "{table}:{addr}", type: {name}, byte_order: {order}}}')
                expected[tag] = value
                addr += len(regs)
    before = modbus_peer.requests
    # 64 tags in 80 holding + 80 input registers: the planner needs one request per table
    values = await read_all(config_for(modbus_peer.port, tags), requests=2)
    assert modbus_peer.requests - before == 2
    assert len(values) == len(expected) == 2 * len(CASES) * len(ORDERS)
    for tag, want in expected.items():
        got, quality = values[tag]
        assert quality is Quality.GOOD, tag
        if isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-6), tag
        else:
            assert got == want, tag  # exact, including 64-bit values beyond 2**53


async def test_modicon_addresses_bits_strings_scale(modbus_peer: ModbusPeer) -> None:
    p = modbus_peer
    p.holding[0] = 1234  # 40001
    p.holding[1] = 1234  # 40002
    p.holding[9] = 0b1010_0000_0000_0101  # 40010: bits 0, 2, 13, 15
    p.input[4] = (-250) & 0xFFFF  # 30005
    p.coils[6] = True  # 00007
    p.discrete[2] = True  # 10003
    text = b"PUMP-7\0\0"
    p.place("holding", 100, [int.from_bytes(text[i : i + 2], "big") for i in range(0, 8, 2)])
    swapped = b"UPPM7-\0\0"  # BADC: bytes swapped inside each register
    p.place("holding", 110, [int.from_bytes(swapped[i : i + 2], "big") for i in range(0, 8, 2)])
    values = await read_all(
        config_for(
            p.port,
            [
                '{name: hr1, address: "40001"}',
                '{name: hr1_scaled, address: "400002", scale: 0.5, offset: -1, poll_interval: 2s}',
                '{name: bit0, address: "40010.0"}',
                '{name: bit1, address: "40010.1"}',
                '{name: bit13, address: "40010.13"}',
                '{name: bit15, address: "40010.15"}',
                '{name: ir5, address: "30005", type: int16, scale: 0.1}',
                '{name: coil7, address: "00007"}',
                '{name: coil6, address: "coil:5"}',
                '{name: di3, address: "10003"}',
                '{name: di1, address: "discrete:0"}',
                '{name: model, address: "40101", type: string, length: 8}',
                '{name: model_swapped, address: "holding:110", type: string, length: 6, byte_order: BADC}',
            ],
        )
    )
    got = {k: v for k, (v, q) in values.items() if q is Quality.GOOD}
    assert isinstance(got["ir5"], float) and isinstance(got["hr1"], int)  # scaled integers are measurements
    assert got == {
        "hr1": 1234,
        "hr1_scaled": 616.0,
        "bit0": True,
        "bit1": False,
        "bit13": True,
        "bit15": True,
        "ir5": pytest.approx(-25.0),
        "coil7": True,
        "coil6": False,
        "di3": True,
        "di1": False,
        "model": "PUMP-7",
        "model_swapped": "PUMP-7",
    }


async def test_exception_marks_only_its_request_bad(modbus_peer: ModbusPeer) -> None:
    # registers 900..999 are a hole in the peer: reads there answer ILLEGAL ADDRESS
    modbus_peer.holding[10] = 42
    values = await read_all(
        config_for(
            modbus_peer.port,
            [
                '{name: ok, address: "holding:10"}',
                '{name: in_hole, address: "holding:950"}',
                '{name: coil, address: "00001"}',
            ],
        )
    )
    assert values["ok"] == (42, Quality.GOOD)
    assert values["in_hole"] == (None, Quality.BAD)
    assert values["coil"][1] is Quality.GOOD


async def test_nan_float_is_bad_quality(modbus_peer: ModbusPeer) -> None:
    modbus_peer.place("holding", 0, wire_registers(">f", float("nan"), "ABCD"))
    modbus_peer.place("holding", 2, wire_registers(">f", 1.5, "ABCD"))
    values = await read_all(
        config_for(
            modbus_peer.port,
            [
                '{name: nan, address: "40001", type: float32}',
                '{name: fine, address: "40003", type: float32}',
            ],
        )
    )
    assert values["nan"] == (None, Quality.BAD)
    assert values["fine"] == (1.5, Quality.GOOD)


async def test_rtu_framing_over_tcp() -> None:
    peer = ModbusPeer(framer="rtu")
    peer.place("holding", 0, wire_registers(">f", 12.25, "CDAB"))
    await peer.start()
    try:
        text = config_for(peer.port, ['{name: v, address: "40001", type: float32, byte_order: CDAB}'])
        values = await read_all(text.replace("    timeout: 1s", "    transport: rtu_over_tcp\n    timeout: 1s"))
    finally:
        await peer.stop()
    assert values["v"] == (12.25, Quality.GOOD)


async def test_device_byte_order_applies_unless_a_tag_overrides_it(modbus_peer: ModbusPeer) -> None:
    p = modbus_peer
    p.place("holding", 0, wire_registers(">f", 12.25, "CDAB"))
    p.place("holding", 2, wire_registers(">i", -123456789, "CDAB"))
    p.place("holding", 4, wire_registers(">d", -6.5e-3, "CDAB"))
    p.place("holding", 8, wire_registers(">H", 54321, "CDAB"))
    p.place("holding", 9, wire_registers(">f", 12.25, "ABCD"))
    p.place("holding", 11, wire_registers(">i", -123456789, "DCBA"))
    p.place("holding", 13, wire_registers(">d", -6.5e-3, "BADC"))
    text = config_for(
        p.port,
        [
            '{name: f32, address: "40001", type: float32}',
            '{name: i32, address: "40003", type: int32}',
            '{name: f64, address: "40005", type: float64}',
            '{name: u16, address: "40009", type: uint16}',
            '{name: f32_abcd, address: "40010", type: float32, byte_order: ABCD}',
            '{name: i32_dcba, address: "40012", type: int32, byte_order: DCBA}',
            '{name: f64_badc, address: "40014", type: float64, byte_order: BADC}',
        ],
    ).replace("    timeout: 1s", "    byte_order: CDAB\n    timeout: 1s")
    values = await read_all(text, requests=1)
    assert values == {
        "f32": (12.25, Quality.GOOD),
        "i32": (-123456789, Quality.GOOD),
        "f64": (-6.5e-3, Quality.GOOD),
        "u16": (54321, Quality.GOOD),
        "f32_abcd": (12.25, Quality.GOOD),
        "i32_dcba": (-123456789, Quality.GOOD),
        "f64_badc": (-6.5e-3, Quality.GOOD),
    }


async def test_merged_read_refused_across_a_hole_is_split(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    peer = ModbusPeer(holes=[(10, 20)])  # holding 10..19 unmapped, as between two blocks of a real PLC
    peer.place("holding", 5, wire_registers(">f", 1.5, "ABCD"))
    peer.holding[7] = 707
    peer.holding[22] = 2222
    peer.place("holding", 23, wire_registers(">f", -2.5, "ABCD"))
    await peer.start()
    try:
        # the peer really refuses a read across its hole, and serves both sides of it
        client = AsyncModbusTcpClient("127.0.0.1", port=peer.port, timeout=1, retries=0)
        await client.connect()
        try:
            across = await client.read_holding_registers(5, count=20, device_id=1)
            assert across.isError() and across.exception_code == 2
            assert not (await client.read_holding_registers(5, count=3, device_id=1)).isError()
            assert not (await client.read_holding_registers(22, count=3, device_id=1)).isError()
        finally:
            client.close()
        cfg = parse_config(
            config_for(
                peer.port,
                [
                    '{name: a, address: "holding:5", type: float32}',
                    '{name: b, address: "holding:7"}',
                    '{name: c, address: "holding:22", type: int16}',
                    '{name: d, address: "holding:23", type: float32}',
                ],
            )
        )
        assert cfg.devices[0].planner.max_gap == 16  # the default bridges the 14 registers between b and c
        driver = ModbusDriver(cfg.devices[0])
        assert driver.requests_per_cycle == {1.0: 1}
        await driver.connect()
        want = {
            "a": (1.5, Quality.GOOD),
            "b": (707, Quality.GOOD),
            "c": (2222, Quality.GOOD),
            "d": (-2.5, Quality.GOOD),
        }
        try:
            for _ in range(2):  # the first read already gets every tag; later ones send the runs only
                before = peer.requests
                batch = await driver.read(driver.groups[0])
                assert {s.tag: (s.value, s.quality) for s in batch.samples()} == want
                assert peer.requests - before == 2  # (the refused request never reaches the peer's data)
                assert driver.requests_per_cycle == {1.0: 2}
        finally:
            await driver.close()
    finally:
        await peer.stop()
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "edge_agent.drivers.modbus"]
    assert len(lines) == 1 and lines[0][0] == logging.WARNING, lines
    assert "split holding:5–24 into holding:5–7, holding:22–24 (2 requests per cycle now" in lines[0][1]
    assert driver.request_errors == 0  # nothing was marked bad


@pytest.mark.parametrize(
    ("near", "far", "labels"),
    [
        ("40001", "40950", ("40001", "40950")),
        ("400001", "400950", ("400001", "400950")),
        ("holding:0", "hr:949", ("holding:0", "holding:949")),
        ("40001", "holding:949", ("holding:0", "holding:949")),  # both notations in one table: table:offset
    ],
)
async def test_requests_are_named_as_the_tags_were_written(
    modbus_peer: ModbusPeer, caplog: pytest.LogCaptureFixture, near: str, far: str, labels: tuple[str, str]
) -> None:
    """check --plan and the warnings name a request as the engineer wrote its tags (the peer has a hole at 900..999)."""
    caplog.set_level(logging.WARNING, logger="edge_agent.drivers.modbus")
    modbus_peer.holding[0] = 7
    text = config_for(modbus_peer.port, [f'{{name: near, address: "{near}"}}', f'{{name: far, address: "{far}"}}'])
    driver = ModbusDriver(parse_config(text).devices[0])
    group = driver.groups[0]
    assert [(r.label, r.tags) for r in driver.requests()[group]] == [(labels[0], ("near",)), (labels[1], ("far",))]
    await driver.connect()
    try:
        got = {s.tag: (s.value, s.quality) for s in (await driver.read(group)).samples()}
    finally:
        await driver.close()
    assert got["near"] == (7, Quality.GOOD) and got["far"][1] is Quality.BAD
    warnings = [r.getMessage() for r in caplog.records if r.name == "edge_agent.drivers.modbus"]
    assert warnings == [
        f"device plc: {labels[1]}: answered exception code 2 (illegal data address); tags far marked bad"
    ]


def test_range_text_in_each_table_and_notation() -> None:
    assert [range_text(t, 0, n, 5) for t, n in zip(Table, (16, 3, 125, 1), strict=True)] == [
        "00001–00016",
        "10001–10003",
        "30001–30125",
        "40001",
    ]
    assert range_text(Table.HOLDING, 9990, 20, 5) == "409991–410010"  # past 5 digits' reach: written with 6
    assert range_text(Table.INPUT, 99, 1, 6) == "300100"
    assert range_text(Table.COIL, 0, 16) == "coil:0–15"
    assert range_text(Table.HOLDING, 99, 1) == "holding:99"
