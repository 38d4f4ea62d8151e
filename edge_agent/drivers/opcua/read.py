"""Polled reads: each group's Read requests, sent encoded once and decoded from the wire bytes."""

from __future__ import annotations

import logging
import struct
import time
from typing import Any

import numpy as np
from asyncua import Client, ua

from edge_agent.drivers.base import ScanGroup
from edge_agent.drivers.opcua.codecs import (
    _READ_REQUEST,
    _convert,
    _from_datavalue,
    _not_array,
    _pick,
    _status_name,
    _Unusable,
    decode_read_response,
)
from edge_agent.drivers.opcua.session import OpcUaSession, _Chunk, _describe, _send_encoded
from edge_agent.errors import DeviceError
from edge_agent.types import Quality, SampleBatch, Value

log = logging.getLogger("edge_agent.drivers.opcua")


_TOO_BIG = {
    ua.StatusCodes.BadTooManyOperations,
    ua.StatusCodes.BadResponseTooLarge,
    ua.StatusCodes.BadEncodingLimitsExceeded,
}


class OpcUaReads(OpcUaSession):
    """Batched Reads of a group, as few requests as the server allows."""

    async def read(self, group: ScanGroup) -> SampleBatch:
        """Read a group (polled or subscribed) with as few Read requests as the server allows."""
        client = self._live()
        ts = time.time()
        n = len(group.tags)
        values = np.full(n, np.nan, dtype=np.float64)
        quality = np.full(n, Quality.BAD, dtype=np.uint8)
        exact: dict[int, Value] = {}
        kinds = ["float"] * n
        problems: list[tuple[int, str | _Unusable]] = []
        tags = self._tags[group]
        plan = self._plans[group]
        for chunk in plan.chunks:
            results = await self._read_chunk(client, group, chunk)
            for col, rv, (status, vt, v, is_array) in zip(chunk.cols, chunk.params.NodesToRead, results, strict=True):
                if status >> 30:  # severity bits: 01 uncertain, 10 and 11 bad
                    quality[col] = Quality.UNCERTAIN if status >> 30 == 1 else Quality.BAD
                    if status >> 31:
                        problems.append((col, f"reads {_status_name(status)}"))
                    continue
                try:
                    if is_array or tags[col].index is not None:
                        v = _pick(v, tags[col].index, bool(rv.IndexRange)) if is_array else _not_array(tags[col].index)
                    values[col], x, kinds[col] = _convert(vt, v)
                except _Unusable as exc:
                    problems.append((col, exc))
                    continue
                quality[col] = Quality.GOOD
                if x is not None:
                    exact[col] = x
        for col in plan.missing:
            problems.append((col, f"is in namespace {tags[col].node.uri}, which the server does not have"))
        if problems or self._bad:
            self._report(tags, problems, np.flatnonzero(quality == Quality.GOOD).tolist())
        return SampleBatch(self.name, ts, group.tags, values, quality, exact, tuple(kinds))

    async def _read_chunk(self, client: Client, group: ScanGroup, chunk: _Chunk) -> list[tuple[int, int, Any, bool]]:
        timeout = self.config.timeout
        try:
            if self._fast:
                body = await _send_encoded(client, _READ_REQUEST, chunk.header, chunk.encoded, timeout)
                service, results = decode_read_response(body)
                if service >> 31:
                    raise ua.UaStatusCodeError(service)
            else:
                results = [_from_datavalue(dv) for dv in await client.uaclient.read(chunk.params)]
        except ua.UaStatusCodeError as exc:
            if exc.code in _TOO_BIG and len(chunk.cols) > 1:
                return await self._split(client, group, chunk, exc)
            raise DeviceError(self.name, f"Read of {len(chunk.cols)} nodes failed: {_describe(exc, timeout)}") from exc
        except (OSError, TimeoutError, ua.UaError, ValueError, IndexError, struct.error) as exc:
            raise DeviceError(self.name, f"Read failed: {_describe(exc, timeout)}") from exc
        if len(results) != len(chunk.cols):
            raise DeviceError(self.name, f"Read of {len(chunk.cols)} nodes answered {len(results)} values")
        return results

    async def _split(
        self, client: Client, group: ScanGroup, chunk: _Chunk, exc: ua.UaStatusCodeError
    ) -> list[tuple[int, int, Any, bool]]:
        """A server that rejects a request as too large without stating its limit: halve the requests from now on."""
        self.request_errors += 1
        half = max(1, len(chunk.cols) // 2)
        self._max_per_read = self._learned_cap = half
        log.warning(
            "device %s: Read of %d nodes refused (%s); reading %d nodes per request from now on",
            self.name,
            len(chunk.cols),
            _status_name(exc.code),
            half,
        )
        nodes = chunk.params.NodesToRead
        out: list[tuple[int, int, Any, bool]] = []
        for start in range(0, len(nodes), half):
            part = _Chunk.of(nodes[start : start + half], chunk.cols[start : start + half])
            out.extend(await self._read_chunk(client, group, part))
        self._plans[group] = self._plan(group)
        return out
