"""S7 read planning: PDU limits, nearby tags merged into byte ranges, ranges packed into multi-variable requests."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edge_agent.drivers.codecs import BlockDecoder, ByteDecoder, ByteField, ByteOrder, DataType
from edge_agent.drivers.codecs import Field as CodecField
from edge_agent.drivers.planner import Span, plan_reads
from edge_agent.drivers.s7.config import MAX_ITEMS, Area, PlannerMode, S7Planner, S7Tag, S7Type, range_text

READ_OVERHEAD = 18  # response bytes around one item's data: S7 header 12, parameters 2, item header 4

# types decoded as big-endian words by the shared BlockDecoder
_CODEC = {
    S7Type.INT: DataType.INT16,
    S7Type.UINT: DataType.UINT16,
    S7Type.WORD: DataType.UINT16,
    S7Type.DINT: DataType.INT32,
    S7Type.UDINT: DataType.UINT32,
    S7Type.DWORD: DataType.UINT32,
    S7Type.REAL: DataType.FLOAT32,
    S7Type.LINT: DataType.INT64,
    S7Type.ULINT: DataType.UINT64,
    S7Type.LWORD: DataType.UINT64,
    S7Type.LREAL: DataType.FLOAT64,
}


def payload_limit(pdu: int) -> int:
    """Data bytes one read item can carry in a PDU of this size."""
    return pdu - READ_OVERHEAD


def items_limit(pdu: int, max_items: int = MAX_ITEMS) -> int:
    """Items one request may hold: the protocol cap, and 12 request bytes per item in the PDU."""
    return max(1, min(max_items, MAX_ITEMS, (pdu - 12) // 12))


def item_cost(size: int) -> int:
    """Response bytes one item takes: 4-byte item header, data, and a fill byte after odd data."""
    return 4 + size + (size & 1)


def pack_items(sizes: Sequence[int], *, pdu: int, max_items: int = MAX_ITEMS) -> list[list[int]]:
    """Group item indices into requests whose answers fit the PDU (first fit, largest first).

    Each request holds at most `items_limit(pdu, max_items)` items, and the sum of their
    `item_cost` fits the response's data section (PDU minus 14 header and parameter bytes).
    Every size must be at most `payload_limit(pdu)`. Indices within a request are ascending.
    """
    cap = pdu - 14
    k = items_limit(pdu, max_items)
    bins: list[list[int]] = []
    room: list[int] = []
    open_bins: list[int] = []  # bins that may still take an item
    for i in sorted(range(len(sizes)), key=lambda j: -sizes[j]):
        if sizes[i] > payload_limit(pdu):
            raise ValueError(f"item of {sizes[i]} bytes exceeds the {payload_limit(pdu)} a PDU of {pdu} carries")
        cost = item_cost(sizes[i])
        for b in open_bins:
            if room[b] >= cost:
                break
        else:
            b = len(bins)
            bins.append([])
            room.append(cap)
            open_bins.append(b)
        bins[b].append(i)
        room[b] -= cost
        if len(bins[b]) >= k or room[b] < item_cost(1):
            open_bins.remove(b)
    return [sorted(b) for b in bins]


@dataclass(frozen=True)
class PlannedItem:
    """One byte range read as one item of a request, and where its bytes go in the group buffer."""

    area: Area
    db: int
    start: int
    size: int
    buf_offset: int
    cols: npt.NDArray[np.intp]  # tags whose bytes lie (partly) in this item
    label: str


@dataclass(frozen=True)
class PlannedRequest:
    """One read request: up to 20 items whose answer fits the PDU."""

    items: tuple[PlannedItem, ...]
    spec: tuple[tuple[int, int, int, int], ...]  # (area code, db, start, size) per item


@dataclass(frozen=True)
class ReadPlan:
    """A scan group's requests for one PDU size, and the decoders for the bytes they bring back."""

    pdu: int
    requests: tuple[PlannedRequest, ...]
    kinds: tuple[str, ...]
    nbytes: int  # every range of one cycle, back to back
    word_decoder: BlockDecoder  # 16/32/64-bit numbers (big-endian)
    byte_decoder: ByteDecoder  # 8-bit numbers and bits
    texts: tuple[tuple[int, int, int], ...]  # (col, buffer offset, max length; 0 = CHAR)


def plan_group(
    tags: Sequence[S7Tag], *, pdu: int, planner: S7Planner, letters: Mapping[Area, str] | None = None
) -> ReadPlan:
    """Merge a scan group's tags into byte ranges, split ranges larger than a PDU, pack them into requests.

    Each item is labelled as the tags write its area (DB10.DBB0–DBB479, MB0–MB7; `letters`: EB0–EB3 for
    a device whose inputs are written E0.1, see S7Device.area_letters).
    """
    letters = letters or {}
    payload = payload_limit(pdu)
    by_block: dict[tuple[Area, int], list[Span[int]]] = defaultdict(list)
    for col, tag in enumerate(tags):
        by_block[(tag.address.area, tag.address.db)].append(Span(tag.address.byte, tag.size, col))
    ranges: list[tuple[Area, int, int, int, tuple[int, ...]]] = []  # area, db, start, size, cols
    for (area, db), spans in sorted(by_block.items()):
        big = [s for s in spans if s.size > payload]  # long strings on a small PDU: read in chunks
        reads = plan_reads(
            [s for s in spans if s.size <= payload],
            max_count=payload,
            max_gap=planner.max_gap,
            merge=planner.mode is PlannerMode.MERGE,
        )
        found = [(r.start, r.count, tuple(s.item for s in r.items)) for r in reads]
        found += [(s.start, s.size, (s.item,)) for s in big]
        ranges += [(area, db, start, size, cols) for start, size, cols in sorted(found)]
    items: list[PlannedItem] = []
    fields: list[CodecField] = []
    byte_fields: list[ByteField] = []
    texts: list[tuple[int, int, int]] = []
    nbytes = 0
    for area, db, start, size, cols in ranges:
        for col in cols:
            tag = tags[col]
            off = nbytes + tag.address.byte - start
            t = tag.dtype
            if t.type in _CODEC:
                fields.append(CodecField(col, off, _CODEC[t.type], ByteOrder.ABCD, tag.scale, tag.offset))
            elif t.type in (S7Type.CHAR, S7Type.STRING):
                texts.append((col, off, t.length))
            else:
                signed = t.type is S7Type.SINT
                byte_fields.append(ByteField(col, off, signed, tag.address.bit, tag.scale, tag.offset))
        for part in range(0, size, payload):
            n = min(payload, size - part)
            part_cols = [c for c in cols if _overlaps(tags[c], start + part, n)]
            items.append(
                PlannedItem(
                    area,
                    db,
                    start + part,
                    n,
                    nbytes + part,
                    np.asarray(part_cols, dtype=np.intp),
                    range_text(area, db, start + part, n, letters.get(area, "")),
                )
            )
        nbytes += size
    requests = []
    for idx in pack_items([it.size for it in items], pdu=pdu, max_items=planner.max_items):
        chosen = tuple(items[i] for i in idx)
        requests.append(PlannedRequest(chosen, tuple((it.area.wire, it.db, it.start, it.size) for it in chosen)))
    # a scaled integer is a measurement: render it as a float
    kinds = tuple("float" if t.scale != 1.0 or t.offset != 0.0 else t.dtype.kind for t in tags)
    return ReadPlan(pdu, tuple(requests), kinds, nbytes, BlockDecoder(fields), ByteDecoder(byte_fields), tuple(texts))


def _overlaps(tag: S7Tag, start: int, size: int) -> bool:
    return tag.address.byte < start + size and start < tag.address.byte + tag.size
