"""S7 runtime (python-snap7): one connection per PLC on its own worker thread, planned multi-variable reads.

python-snap7's client is blocking, so every call runs on one worker thread per connection; the event
loop only awaits it. Reads are planned once (planner.py) and re-planned when the PLC grants another PDU.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import snap7
from snap7.connection import ISOTCPConnection
from snap7.error import S7Error, S7ProtocolError, S7TimeoutError
from snap7.s7protocol import get_return_code_description
from snap7.type import Parameter

from edge_agent.drivers.base import DriverBase, PartFailures, Request, ScanGroup, group_by_interval, mark_bad
from edge_agent.drivers.s7.config import S7Device, S7Tag
from edge_agent.drivers.s7.planner import PlannedItem, ReadPlan, plan_group
from edge_agent.errors import DeviceError
from edge_agent.types import FloatArray, QualityArray, SampleBatch, Value

log = logging.getLogger("edge_agent.drivers.s7")

T = TypeVar("T")

# ---------------------------------------------------------------- protocol


# item return codes worth explaining (the rest come from python-snap7's table)
_ITEM_ERRORS = {
    0x03: "access denied (S7-1200/1500: allow PUT/GET access and use a DB without optimised block access)",
    0x05: "invalid address (past the end of the DB or area)",
    0x0A: "object does not exist (no such DB)",
}


def _item_error(code: int) -> str:
    return f"{_ITEM_ERRORS.get(code) or get_return_code_description(code).lower()} (0x{code:02X})"


def _split_items(raw: bytes, count: int) -> list[bytes | int]:
    """Each item of a read answer's data section: its bytes, or its return code when it failed."""
    out: list[bytes | int] = []
    pos = 0
    for i in range(count):
        if pos + 4 > len(raw):
            raise S7ProtocolError(f"read answer truncated at item {i + 1} of {count}")
        code, transport, length = raw[pos], raw[pos + 1], raw[pos + 2] << 8 | raw[pos + 3]
        pos += 4
        if code != 0xFF:
            out.append(code)
            continue
        # BIT, BYTE/WORD/DWORD and INTEGER transport sizes count bits; the others bytes
        n = (length + 7) // 8 if transport in (0x03, 0x04, 0x05) else length
        if pos + n > len(raw):
            raise S7ProtocolError(f"read answer truncated in item {i + 1} of {count}")
        out.append(raw[pos : pos + n])
        pos += n + (n & 1 if i < count - 1 else 0)  # fill byte after odd data, except after the last item
    return out


def _exchange(client: snap7.Client, spec: Sequence[tuple[int, int, int, int]]) -> list[bytes | int]:
    """One read request with per-item results.

    python-snap7's read_multi_vars raises on the first failed item and re-plans the request by
    itself; we need each item's own return code, so we send the request its protocol object builds
    and split the answer here.
    """
    request = client.protocol.build_multi_read_request(list(spec))
    response = client.protocol.parse_response(bytes(client.iso_exchange_buffer(bytearray(request))))
    if response["sequence"] != client.protocol.sequence:
        raise S7ProtocolError(f"answer {response['sequence']} to request {client.protocol.sequence}: out of step")
    params = response.get("parameters") or {}
    if params.get("function_code") != 0x04 or params.get("item_count") != len(spec):
        raise S7ProtocolError(f"unexpected answer to a read of {len(spec)} items: {params}")
    return _split_items(response.get("raw_data", b""), len(spec))


@dataclass
class _Result:
    values: FloatArray
    quality: QualityArray
    exact: dict[int, Value]
    failed: list[tuple[PlannedItem, str]]
    answered: list[PlannedItem]


# ---------------------------------------------------------------- runtime


class S7Driver(DriverBase):
    """Reads an S7 PLC: one connection, one request at a time on its own worker thread, planned reads."""

    def __init__(self, config: S7Device) -> None:
        super().__init__(config.name)
        self.config = config
        self.pdu = config.pdu_size  # the PDU the current plans are made for
        self._client: snap7.Client | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._lock = asyncio.Lock()  # one request at a time on the connection
        self._parts = PartFailures(self.name, log)
        self._tags: dict[ScanGroup, list[S7Tag]] = {}
        self._plans: dict[ScanGroup, ReadPlan] = {}
        for interval, tags in group_by_interval(config, config.tags):
            group = ScanGroup(interval, tuple(t.name for t in tags))
            self.groups.append(group)
            self._tags[group] = tags
        self._plans = self._plan_all(self.pdu)

    @property
    def requests_per_cycle(self) -> dict[float, int]:
        """Requests each scan group sends per cycle."""
        return {g.interval: len(self._plans[g].requests) for g in self.groups}

    def plan(self) -> list[str]:
        """Tags and requests per scan group."""
        per = self.requests_per_cycle
        return [f"{len(g.tags)} tags every {g.interval:g}s in {per[g.interval]} requests" for g in self.groups]

    def requests(self) -> dict[ScanGroup, list[Request]]:
        """Each group's requests, as the byte ranges they read (DB10.DBB0–DBB479, MB0–MB7) and the tags they bring."""
        out: dict[ScanGroup, list[Request]] = {}
        for g in self.groups:
            out[g] = []
            for req in self._plans[g].requests:
                cols = sorted({int(c) for it in req.items for c in it.cols})
                out[g].append(Request(", ".join(it.label for it in req.items), tuple(g.tags[c] for c in cols)))
        return out

    @property
    def items_per_cycle(self) -> dict[float, int]:
        """Byte ranges (request items) each scan group reads per cycle."""
        return {g.interval: sum(len(r.items) for r in self._plans[g].requests) for g in self.groups}

    def _plan_all(self, pdu: int) -> dict[ScanGroup, ReadPlan]:
        letters = self.config.area_letters()
        return {
            g: plan_group(self._tags[g], pdu=pdu, planner=self.config.planner, letters=letters) for g in self.groups
        }

    def _endpoint(self) -> str:
        cfg = self.config
        if cfg.remote_tsap is not None:
            local, remote = cfg.tsaps
            return f"{cfg.host}:{cfg.port} TSAP {local:04X}/{remote:04X}"
        return f"{cfg.host}:{cfg.port} rack {cfg.rack} slot {cfg.slot}"

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking client call on this connection's thread (the thread also orders calls)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"s7-{self.name}")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def connect(self) -> None:
        """Open the ISO-on-TCP connection, negotiate the PDU, re-plan the reads if the PLC granted another size."""
        await self.close()
        async with self._lock:
            try:
                pdu, plans = await self._call(self._connect_blocking)
            except S7TimeoutError as exc:
                raise DeviceError(
                    self.name, f"cannot connect to {self._endpoint()}: no answer within {self.config.timeout:g}s"
                ) from exc
            except (S7Error, OSError) as exc:
                raise DeviceError(self.name, f"cannot connect to {self._endpoint()}: {exc}") from exc
        if plans is not None:
            before = sum(self.requests_per_cycle.values())
            self._plans, self.pdu = plans, pdu
            log.info(
                "device %s: the PLC granted a %d-byte PDU (asked %d): %d requests per cycle instead of %d",
                self.name,
                pdu,
                self.config.pdu_size,
                sum(self.requests_per_cycle.values()),
                before,
            )

    def _connect_blocking(self) -> tuple[int, dict[ScanGroup, ReadPlan] | None]:
        cfg = self.config
        self._disconnect_blocking()
        client = snap7.Client()
        local, remote = cfg.tsaps
        client.set_param(Parameter.PDURequest, cfg.pdu_size)
        client.set_connection_params(cfg.host, local, remote)
        client.port = cfg.port
        # Client.connect opens the connection with python-snap7's own 5 s for the TCP connect, the COTP
        # handshake and the PDU negotiation; the same steps here take the device's timeout, which then
        # holds for every receive too (python-snap7 3.3 internals: see the pin in pyproject.toml)
        conn = ISOTCPConnection(cfg.host, cfg.port, local_tsap=local, remote_tsap=remote)
        client.connection = conn
        # stored before anything can block, so close() finds it even if the caller gave up waiting
        self._client = client
        try:
            conn.connect(timeout=cfg.timeout)
            client._setup_communication()
        except BaseException:
            with contextlib.suppress(S7Error, OSError):
                client.disconnect()
            if self._client is client:  # not a newer connection's, should this one have been given up on
                self._client = None
            raise
        client.connected = True
        pdu = client.get_pdu_length()
        # planned here, off the event loop: ten thousand tags take a few tens of milliseconds
        return pdu, (None if pdu == self.pdu else self._plan_all(pdu))

    async def close(self) -> None:
        """Close the connection and its thread; safe to call twice."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        self._abort_connect()
        try:
            # queued behind a request still running, so the connection is never closed under it
            await asyncio.get_running_loop().run_in_executor(executor, self._disconnect_blocking)
        finally:
            executor.shutdown(wait=False)

    def _abort_connect(self) -> None:
        """Shut the socket of a connect still in progress, so its thread gives up now and not after the timeout."""
        client = self._client
        conn = client.connection if client is not None else None
        sock = conn.socket if conn is not None else None
        if client is not None and not client.connected and sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in connect() or recv()

    def _disconnect_blocking(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.disconnect()
            except (S7Error, OSError) as exc:
                log.debug("device %s: disconnect: %s", self.name, exc)

    async def read(self, group: ScanGroup) -> SampleBatch:
        """Send the group's planned requests on the worker thread, decode every tag in one pass per type."""
        plan = self._plans[group]
        async with self._lock:
            if self._client is None:
                raise DeviceError(self.name, "not connected")
            try:
                ts, result = await self._call(self._read_blocking, plan)
            except (S7Error, OSError) as exc:
                raise DeviceError(self.name, f"read failed: {exc or type(exc).__name__}") from exc
        for item, why in result.failed:
            self._parts.failed(item.label, [group.tags[c] for c in item.cols], why)
        for item in result.answered:
            self._parts.answered(item.label)
        return SampleBatch(self.name, ts, group.tags, result.values, result.quality, result.exact, plan.kinds)

    def _read_blocking(self, plan: ReadPlan) -> tuple[float, _Result]:
        client = self._client
        if client is None or client.connection is None or not client.connection.connected:
            raise S7ProtocolError("not connected")
        ts = time.time()
        n = len(plan.kinds)
        block = np.zeros(plan.nbytes, dtype=np.uint8)
        failed: list[tuple[PlannedItem, str]] = []
        answered: list[PlannedItem] = []
        for req in plan.requests:
            try:
                answers = _exchange(client, req.spec)
            except S7ProtocolError as exc:
                if not exc.error_code:
                    raise  # a malformed answer: the connection is out of step
                failed += [(it, f"refused the request: {exc}") for it in req.items]
                continue
            for it, answer in zip(req.items, answers, strict=True):
                if isinstance(answer, int):
                    failed.append((it, _item_error(answer)))
                elif len(answer) < it.size:
                    failed.append((it, f"short answer: {len(answer)} of {it.size} bytes"))
                else:
                    block[it.buf_offset : it.buf_offset + it.size] = np.frombuffer(answer, np.uint8, it.size)
                    answered.append(it)
        values = np.full(n, np.nan, dtype=np.float64)
        quality = np.zeros(n, dtype=np.uint8)
        exact: dict[int, Value] = {}
        plan.word_decoder.decode(block, values, quality, exact)
        plan.byte_decoder.decode(block, values)
        for col, off, length in plan.texts:
            if length == 0:
                exact[col] = bytes(block[off : off + 1]).decode("latin-1")
            else:
                # STRING[n]: max length, actual length, then n characters of which `actual` count
                actual = min(int(block[off + 1]), length)
                exact[col] = bytes(block[off + 2 : off + 2 + actual]).decode("latin-1")
        for it, _ in failed:
            mark_bad(values, quality, exact, it.cols)
        return ts, _Result(values, quality, exact, failed, answered)

    @property
    def request_errors(self) -> int:
        """Items that failed on their own (bad address, wrong area) while the connection was fine."""
        return self._parts.count
