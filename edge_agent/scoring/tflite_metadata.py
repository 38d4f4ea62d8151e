"""Read and replace a named metadata buffer of a .tflite flatbuffer, with no schema module needed.

The schema module ships with ai-edge-litert and TensorFlow but not with tflite-runtime, and a
device running tflite-runtime must still load bundles and calibrate them. Only the few tables on
the way to the metadata are walked (field numbers from TFLite's schema.fbs):

    Model:    4 buffers: [Buffer], 6 metadata: [Metadata]
    Buffer:   0 data: [ubyte], 1 offset: ulong, 2 size: ulong   (offset/size: data outside the flatbuffer)
    Metadata: 0 name: string, 1 buffer: uint (index into buffers)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MODEL_BUFFERS, MODEL_METADATA = 4, 6
BUFFER_DATA, BUFFER_OFFSET, BUFFER_SIZE = 0, 1, 2
METADATA_NAME, METADATA_BUFFER = 0, 1


class FlatbufferError(ValueError):
    """The file is not a well-formed flatbuffer where the metadata should be."""


def _u32(data: bytes, pos: int) -> int:
    if pos < 0 or pos + 4 > len(data):
        raise FlatbufferError(f"offset {pos} outside the file ({len(data)} bytes)")
    return int(struct.unpack_from("<I", data, pos)[0])


def _field(data: bytes, table: int, index: int) -> int:
    """Absolute position of field `index` of the table at `table`, or 0 when the field is absent."""
    vtable = table - struct.unpack_from("<i", data, table)[0]
    if vtable < 0 or vtable + 4 > len(data):
        raise FlatbufferError(f"vtable at {vtable} outside the file")
    vsize = struct.unpack_from("<H", data, vtable)[0]
    slot = 4 + 2 * index
    if slot + 2 > vsize:
        return 0
    rel = struct.unpack_from("<H", data, vtable + slot)[0]
    return table + rel if rel else 0


def _deref(data: bytes, pos: int) -> int:
    """Follow the forward offset stored at `pos` (tables, vectors and strings are all referenced so)."""
    return pos + _u32(data, pos)


def _vector(data: bytes, table: int, index: int, size: int = 1) -> tuple[int, int]:
    """(position of the first element, length) of a vector field of `size`-byte elements; (0, 0) when absent."""
    pos = _field(data, table, index)
    if not pos:
        return 0, 0
    vec = _deref(data, pos)
    n = _u32(data, vec)
    if vec + 4 + n * size > len(data):
        raise FlatbufferError(f"vector of {n} at {vec} runs past the end of the file")
    return vec + 4, n


@dataclass(frozen=True)
class MetadataBuffer:
    """Where a named metadata buffer lives: its Buffer table, and its bytes' position and length."""

    buffer_table: int
    start: int
    length: int
    external: bool  # stored after the flatbuffer (Buffer.offset/size), as large models do


def find_metadata(data: bytes, name: str) -> MetadataBuffer | None:
    """The buffer holding metadata `name`, or None when the model has no such entry."""
    try:
        root = _u32(data, 0)
        entries, n_entries = _vector(data, root, MODEL_METADATA, 4)  # vectors of offsets to tables
        buffers, n_buffers = _vector(data, root, MODEL_BUFFERS, 4)
        wanted = name.encode()
        for i in range(n_entries):
            entry = _deref(data, entries + 4 * i)
            name_pos = _field(data, entry, METADATA_NAME)
            if not name_pos:
                continue
            s = _deref(data, name_pos)
            if data[s + 4 : s + 4 + _u32(data, s)] != wanted:
                continue
            index_pos = _field(data, entry, METADATA_BUFFER)
            index = _u32(data, index_pos) if index_pos else 0
            if index >= n_buffers:
                raise FlatbufferError(f"metadata '{name}' names buffer {index} of {n_buffers}")
            buf = _deref(data, buffers + 4 * index)
            offset_pos, size_pos = _field(data, buf, BUFFER_OFFSET), _field(data, buf, BUFFER_SIZE)
            offset = struct.unpack_from("<Q", data, offset_pos)[0] if offset_pos else 0
            if offset > 1:
                size = struct.unpack_from("<Q", data, size_pos)[0] if size_pos else 0
                if offset + size > len(data):
                    raise FlatbufferError(f"metadata '{name}' runs past the end of the file")
                return MetadataBuffer(buf, offset, size, True)
            start, length = _vector(data, buf, BUFFER_DATA)
            return MetadataBuffer(buf, start, length, False)
    except struct.error as exc:
        raise FlatbufferError(str(exc)) from exc
    return None


def read_metadata_bytes(data: bytes, name: str) -> bytes | None:
    """The bytes of metadata `name`, or None when the model has no such entry."""
    found = find_metadata(data, name)
    return None if found is None else data[found.start : found.start + found.length]


def replace_metadata_bytes(data: bytes, name: str, blob: bytes) -> bytes | None:
    """The model with metadata `name` holding `blob`; None when it has no such entry to replace.

    The data vector is rewritten in place when the new bytes fit (its length shrinks), and
    otherwise appended at the end of the file with the Buffer's offset pointing there: flatbuffer
    offsets only point forward, so the old bytes become unused and everything else stays valid.
    """
    found = find_metadata(data, name)
    if found is None or found.external:
        return None
    data_field = _field(data, found.buffer_table, BUFFER_DATA)
    if not data_field:
        return None  # an empty buffer has no data field to point elsewhere
    out = bytearray(data)
    if len(blob) <= found.length:
        struct.pack_into("<I", out, found.start - 4, len(blob))
        out[found.start : found.start + found.length] = blob.ljust(found.length, b"\0")
        return bytes(out)
    # the data vector's bytes 16-aligned, as TFLite's schema asks (force_align: 16)
    start = -(-(len(out) + 4) // 16) * 16
    out += bytes(start - 4 - len(out))
    out += struct.pack("<I", len(blob)) + blob
    struct.pack_into("<I", out, data_field, (start - 4) - data_field)
    return bytes(out)
