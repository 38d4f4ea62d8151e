"""Every S7 type and address form, decoded by the agent from bytes placed by hand in a real snap7 server.

python-snap7's server is written by its client's authors, so the expected values here come from
`struct` and hand-written bytes, never from snap7's own codecs: the decoding is checked independently.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import threading

import pytest
from helpers import wait_for
from s7peer import S7Peer

from edge_agent.config import parse_config
from edge_agent.drivers.s7.driver import S7Driver
from edge_agent.errors import DeviceError
from edge_agent.types import Quality


def config_for(port: int, tags: list[str], extra: str = "") -> str:
    return (
        f"devices:\n  - name: plc\n    type: s7\n    host: 127.0.0.1\n    port: {port}\n    timeout: 1s\n{extra}"
        "    tags:\n" + "".join(f"      - {t}\n" for t in tags)
    )


async def read_all(driver: S7Driver) -> dict[str, tuple[object, Quality]]:
    out = {}
    for group in driver.groups:
        batch = await driver.read(group)
        out.update({s.tag: (s.value, s.quality) for s in batch.samples()})
    return out


async def read_once(text: str) -> dict[str, tuple[object, Quality]]:
    driver = S7Driver(parse_config(text).devices[0])
    await driver.connect()
    try:
        return await read_all(driver)
    finally:
        await driver.close()


def f32(x: float) -> float:
    return float(struct.unpack(">f", struct.pack(">f", x))[0])


async def test_every_type_and_address_form(s7_peer: S7Peer) -> None:
    db, m, i, q = s7_peer.db[1], s7_peer.m, s7_peer.i, s7_peer.q
    db[0] = 0b1000_0001
    db[1] = 200
    db[2] = ord("Z")
    db[3:4] = struct.pack(">b", -100)
    db[4] = 250
    db[6:8] = struct.pack(">h", -12345)
    db[8:10] = struct.pack(">H", 54321)
    db[10:12] = b"\xbe\xef"
    db[12:16] = struct.pack(">i", -123456789)
    db[16:20] = struct.pack(">I", 3_000_000_000)
    db[20:24] = b"\xde\xad\xbe\xef"
    db[24:28] = struct.pack(">f", -1234.5)
    db[28:36] = struct.pack(">q", -(2**62) - 12345)
    db[36:44] = struct.pack(">Q", 2**64 - 2)
    db[44:52] = struct.pack(">Q", 2**63 + 5)
    db[52:60] = struct.pack(">d", 6.02214076e23)
    db[60:72] = bytes([10, 6]) + b"PUMP-7" + b"XXXX"  # STRING[10]: max 10, actual 6, then stale bytes
    db[72:79] = bytes([254, 5]) + b"hello"  # STRING (= STRING[254])
    db[328:330] = struct.pack(">h", -250)
    db[332:336] = struct.pack(">f", 0.5)
    db[336:338] = struct.pack(">h", 7)
    m[3] = 0x80
    m[5] = 17
    m[8:12] = struct.pack(">f", 3.25)
    m[20:22] = b"\x12\x34"
    m[30:32] = struct.pack(">h", -2)
    i[0] = 0b010
    i[2:4] = struct.pack(">h", 300)
    i[4:8] = struct.pack(">i", -7)
    i[8] = 9
    q[0] = 0b11
    q[4:6] = b"\xff\xff"
    q[8:12] = struct.pack(">f", 1.5)
    q[12] = 1
    expected: dict[str, object] = {
        "bit0": True,
        "bit3": False,
        "bit7": True,
        "byte": 200,
        "char": "Z",
        "sint": -100,
        "usint": 250,
        "int": -12345,
        "uint": 54321,
        "word": 0xBEEF,
        "dint": -123456789,
        "udint": 3_000_000_000,
        "dword": 0xDEADBEEF,
        "real": -1234.5,
        "lint": -(2**62) - 12345,
        "ulint": 2**64 - 2,
        "lword": 2**63 + 5,
        "lreal": 6.02214076e23,
        "text": "PUMP-7",
        "text254": "hello",
        "scaled": pytest.approx(-25.0),
        "percent": 0.5,
        "lower": 7,
        "m_bit": True,
        "m_byte": 17,
        "m_real": 3.25,
        "m_word": 0x1234,
        "m_int": -2,
        "in_bit": True,
        "e_bit": False,
        "in_word": 300,
        "e_dword": -7,
        "e_byte": 9,
        "out_bit": True,
        "a_bit": True,
        "a_word": 65535,
        "out_real": 1.5,
        "out_byte": 1,
    }
    tags = [
        "{name: bit0, address: DB1.DBX0.0}",
        "{name: bit3, address: DB1.DBX0.3, type: bool}",
        "{name: bit7, address: DB1.DBX0.7}",
        "{name: byte, address: DB1.DBB1, type: byte}",
        "{name: char, address: DB1.DBB2, type: char}",
        "{name: sint, address: DB1.DBB3, type: sint}",
        "{name: usint, address: DB1.DBB4, type: USINT}",
        "{name: int, address: DB1.DBW6, type: int}",
        "{name: uint, address: DB1.DBW8, type: uint}",
        "{name: word, address: DB1.DBW10, type: word}",
        "{name: dint, address: DB1.DBD12, type: dint}",
        "{name: udint, address: DB1.DBD16, type: udint}",
        "{name: dword, address: DB1.DBD20, type: dword}",
        "{name: real, address: DB1.DBD24, type: Real}",
        "{name: lint, address: DB1.DBB28, type: lint}",
        "{name: ulint, address: DB1.DBB36, type: ulint}",
        "{name: lword, address: DB1.DBB44, type: lword}",
        "{name: lreal, address: DB1.DBB52, type: LReal}",
        '{name: text, address: DB1.DBB60, type: "String[10]"}',
        "{name: text254, address: DB1.DBB72, type: String}",
        "{name: scaled, address: DB1.DBW328, type: int, scale: 0.1}",
        "{name: percent, address: '%DB1.DBD332', type: real}",
        "{name: lower, address: db1.dbw336, type: int}",
        "{name: m_bit, address: M3.7}",
        "{name: m_byte, address: MB5, type: byte}",
        "{name: m_real, address: MD8, type: real}",
        "{name: m_word, address: MW20, type: word}",
        "{name: m_int, address: '%MW30', type: int}",
        "{name: in_bit, address: I0.1}",
        "{name: e_bit, address: E0.2}",
        "{name: in_word, address: IW2, type: int}",
        "{name: e_dword, address: ED4, type: dint}",
        "{name: e_byte, address: EB8, type: usint}",
        "{name: out_bit, address: Q0.0}",
        "{name: a_bit, address: A0.1}",
        "{name: a_word, address: AW4, type: uint}",
        "{name: out_real, address: QD8, type: real}",
        "{name: out_byte, address: QB12, type: usint}",
    ]
    driver = S7Driver(parse_config(config_for(s7_peer.port, tags)).devices[0])
    # DB1 0..337, M 3..31, I 0..8 and Q 0..12 are four ranges, and they fit one request
    assert driver.requests_per_cycle == {1.0: 1} and driver.items_per_cycle == {1.0: 4}
    await driver.connect()
    try:
        s7_peer.read_items()
        before = s7_peer.requests
        values = await read_all(driver)
        assert s7_peer.requests - before == 1
        assert s7_peer.read_items() == 4
    finally:
        await driver.close()
    got = {k: v for k, (v, quality) in values.items() if quality is Quality.GOOD}
    assert got == expected
    for name in ("int", "dint", "lint", "ulint", "byte"):
        assert type(got[name]) is int, name  # exact, including 64-bit values beyond 2**53
    assert type(got["real"]) is float and type(got["scaled"]) is float and type(got["bit0"]) is bool


async def test_nan_real_is_bad(s7_peer: S7Peer) -> None:
    s7_peer.db[1][0:4] = struct.pack(">f", float("nan"))
    s7_peer.db[1][4:8] = struct.pack(">f", 2.5)
    values = await read_once(
        config_for(
            s7_peer.port, ["{name: nan, address: DB1.DBD0, type: real}", "{name: fine, address: DB1.DBD4, type: real}"]
        )
    )
    assert values == {"nan": (None, Quality.BAD), "fine": (2.5, Quality.GOOD)}


async def test_missing_db_and_bad_offset_mark_only_their_items_bad(s7_peer: S7Peer) -> None:
    s7_peer.db[1][0:2] = struct.pack(">h", 42)
    s7_peer.m[0] = 1
    text = config_for(
        s7_peer.port,
        [
            "{name: ok, address: DB1.DBW0, type: int}",
            "{name: no_db, address: DB7.DBW0, type: int}",
            "{name: no_db_bit, address: DB7.DBX4.0}",
            "{name: past_end, address: DB1.DBD2000, type: real}",
            "{name: marker, address: M0.0}",
        ],
    )
    driver = S7Driver(parse_config(text).devices[0])
    assert driver.requests_per_cycle == {1.0: 1}  # all four ranges in one request
    await driver.connect()
    try:
        for _ in range(2):  # the failure is per cycle, the connection stays up
            values = await read_all(driver)
            assert values == {
                "ok": (42, Quality.GOOD),
                "no_db": (None, Quality.BAD),
                "no_db_bit": (None, Quality.BAD),
                "past_end": (None, Quality.BAD),
                "marker": (True, Quality.GOOD),
            }
        assert driver.request_errors == 4
    finally:
        await driver.close()


async def test_more_than_20_items_go_into_several_requests() -> None:
    peer = S7Peer(dbs={n: 8 for n in range(1, 46)})
    for n in range(1, 46):
        peer.db[n][0:4] = struct.pack(">f", n + 0.25)
    await peer.start()
    try:
        text = config_for(peer.port, [f"{{name: t{n}, address: DB{n}.DBD0, type: real}}" for n in range(1, 46)])
        driver = S7Driver(parse_config(text).devices[0])
        assert driver.items_per_cycle == {1.0: 45} and driver.requests_per_cycle == {1.0: 3}  # 20 + 20 + 5
        await driver.connect()
        try:
            before = peer.requests
            values = await read_all(driver)
            assert peer.requests - before == 3
        finally:
            await driver.close()
    finally:
        await peer.stop()
    assert values == {f"t{n}": (n + 0.25, Quality.GOOD) for n in range(1, 46)}


@pytest.mark.parametrize(
    ("planner", "items", "requests"),
    [
        ("{mode: merge, max_gap: 32}", 3, 1),  # 0..43 | 200..203 | 600..601: gaps of 156 and 396 bytes
        ("{mode: merge, max_gap: 400}", 2, 1),  # 0..203 | 600..601 (0..601 would pass the 462-byte payload)
        ("{mode: none}", 7, 1),
        ("{mode: none, max_items: 1}", 7, 7),
    ],
)
async def test_planner_merging_and_packing(s7_peer: S7Peer, planner: str, items: int, requests: int) -> None:
    db = s7_peer.db[1]
    offsets = [0, 4, 8, 12, 40, 200, 600]
    for k, off in enumerate(offsets[:-1]):
        db[off : off + 4] = struct.pack(">f", k + 0.5)
    db[600:602] = struct.pack(">h", -1)
    tags = [f"{{name: r{k}, address: DB1.DBD{off}, type: real}}" for k, off in enumerate(offsets[:-1])]
    tags.append("{name: last, address: DB1.DBW600, type: int}")
    driver = S7Driver(parse_config(config_for(s7_peer.port, tags, f"    planner: {planner}\n")).devices[0])
    assert driver.items_per_cycle == {1.0: items}
    await driver.connect()
    try:
        s7_peer.read_items()
        before = s7_peer.requests
        values = await read_all(driver)
        assert s7_peer.read_items() == items  # ranges the server answered
        assert s7_peer.requests - before == driver.requests_per_cycle[1.0]
    finally:
        await driver.close()
    assert driver.requests_per_cycle == {1.0: requests}
    assert values == {**{f"r{k}": (k + 0.5, Quality.GOOD) for k in range(6)}, "last": (-1, Quality.GOOD)}


async def test_smaller_pdu_than_planned_replans(s7_peer: S7Peer) -> None:
    # 230 REALs over DB1 0..919: one range for a 960-byte PDU; the server grants 480, so two ranges
    for k in range(230):
        s7_peer.db[1][4 * k : 4 * k + 4] = struct.pack(">f", k)
    tags = [f"{{name: r{k}, address: DB1.DBD{4 * k}, type: real}}" for k in range(230)]
    driver = S7Driver(parse_config(config_for(s7_peer.port, tags, "    pdu_size: 960\n")).devices[0])
    assert driver.requests_per_cycle == {1.0: 1} and driver.pdu == 960
    await driver.connect()
    try:
        assert driver.pdu == 480
        assert driver.items_per_cycle == {1.0: 2} and driver.requests_per_cycle == {1.0: 2}
        values = await read_all(driver)
    finally:
        await driver.close()
    assert values == {f"r{k}": (float(k), Quality.GOOD) for k in range(230)}


async def test_string_longer_than_a_small_pdu_is_read_in_parts(s7_peer: S7Peer) -> None:
    text = "".join(chr(65 + k % 26) for k in range(254))
    s7_peer.db[1][0:256] = bytes([254, 254]) + text.encode()
    s7_peer.db[1][300] = 0b100
    tags = ["{name: long, address: DB1.DBB0, type: string}", "{name: flag, address: DB1.DBX300.2}"]
    driver = S7Driver(parse_config(config_for(s7_peer.port, tags, "    pdu_size: 240\n")).devices[0])
    # 256 bytes on a 240-byte PDU (222 data bytes per item): 222 + 34, then the flag's byte
    assert driver.items_per_cycle == {1.0: 3}
    await driver.connect()
    try:
        values = await read_all(driver)
    finally:
        await driver.close()
    assert values == {"long": (text, Quality.GOOD), "flag": (True, Quality.GOOD)}


async def test_event_loop_keeps_running_during_a_read(s7_peer: S7Peer) -> None:
    s7_peer.db[1][0:4] = struct.pack(">f", 1.0)
    text = config_for(s7_peer.port, ["{name: v, address: DB1.DBD0, type: real}"]).replace("timeout: 1s", "timeout: 30s")
    driver = S7Driver(parse_config(text).devices[0])
    await driver.connect()
    during = 0  # turns of the event loop while the PLC holds its answer and the read waits for it

    async def ticker() -> None:
        nonlocal during
        while True:
            if s7_peer.holding and not read.done():
                during += 1
            await asyncio.sleep(0.01)

    s7_peer.hold = threading.Event()  # the PLC answers when the test lets it, however long that takes
    read = asyncio.create_task(read_all(driver))
    task = asyncio.create_task(ticker())
    try:
        await wait_for(lambda: during >= 10, timeout=20, what="the loop to turn 10 times during the read")
        assert not read.done()  # the read still waits for the PLC: the loop ran beside it, not after it
        s7_peer.hold.set()
        values = await asyncio.wait_for(read, 10)
    finally:
        task.cancel()
        s7_peer.hold.set()
        s7_peer.hold = None
        await driver.close()
    assert values == {"v": (1.0, Quality.GOOD)}
    assert during >= 10


async def test_slow_answer_is_a_device_error_and_reconnect_recovers(s7_peer: S7Peer) -> None:
    s7_peer.db[1][0:2] = struct.pack(">h", 5)
    text = config_for(s7_peer.port, ["{name: v, address: DB1.DBW0, type: int}"])
    text = text.replace("timeout: 1s", "timeout: 200ms")
    driver = S7Driver(parse_config(text).devices[0])
    await driver.connect()
    try:
        s7_peer.delay = 0.6
        with pytest.raises(DeviceError, match="timeout"):
            await read_all(driver)
        s7_peer.delay = 0.0
        await driver.connect()  # what the poller does next: the late answer goes with the old connection
        assert await read_all(driver) == {"v": (5, Quality.GOOD)}
    finally:
        s7_peer.delay = 0.0
        await driver.close()


async def test_explicit_tsaps(s7_peer: S7Peer) -> None:
    s7_peer.db[1][0] = 0x01
    text = config_for(
        s7_peer.port, ["{name: v, address: DB1.DBX0.0}"], "    local_tsap: '10.00'\n    remote_tsap: 0x0302\n"
    )
    driver = S7Driver(parse_config(text).devices[0])
    assert driver.config.tsaps == (0x1000, 0x0302)
    await driver.connect()
    try:
        assert await read_all(driver) == {"v": (True, Quality.GOOD)}
    finally:
        await driver.close()


async def test_a_failing_range_is_named_as_the_tags_write_it(s7_peer: S7Peer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="edge_agent.drivers.s7")
    text = config_for(
        s7_peer.port, ["{name: ok, address: DB1.DBW0, type: int}", "{name: gone, address: DB9.DBD4, type: real}"]
    )
    got = await read_once(text)
    assert got["ok"][1] is Quality.GOOD and got["gone"][1] is Quality.BAD
    warnings = [r.getMessage() for r in caplog.records if r.name == "edge_agent.drivers.s7"]
    assert warnings == ["device plc: DB9.DBB4–DBB7: object does not exist (no such DB) (0x0A); tags gone marked bad"]
