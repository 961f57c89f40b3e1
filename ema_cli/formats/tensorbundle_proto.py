"""The protobuf messages of a TensorBundle, decoded and encoded by hand (no protobuf package).

Wire format (https://protobuf.dev/programming-guides/encoding/): each field is a varint key
``field_number << 3 | wire_type`` followed by its value: wire type 0 a varint (7 bits a byte,
least significant first, at most 10 bytes), 1 eight little-endian bytes, 2 a varint length and
that many bytes (strings, bytes, sub-messages, packed repeated fields), 5 four little-endian
bytes. Groups (3, 4) are long deprecated and refused. Unknown fields are skipped; for a scalar
field seen twice the last value wins, as protobuf's own parsers do. Negative int32/int64 values
are ten-byte varints of their two's complement.

Messages (tensorflow ``core/protobuf/tensor_bundle.proto``, ``core/framework/tensor_shape.proto``,
``tensor_slice.proto``, ``versions.proto``, ``core/protobuf/trackable_object_graph.proto``)::

    BundleHeaderProto   num_shards=1 int32, endianness=2 enum (0 LITTLE, 1 BIG),
                        version=3 VersionDef {producer=1, min_consumer=2, bad_consumers=3}
    BundleEntryProto    dtype=1 enum, shape=2 TensorShapeProto, shard_id=3 int32,
                        offset=4 int64, size=5 int64, crc32c=6 fixed32 (masked),
                        slices=7 repeated TensorSliceProto
    TensorShapeProto    dim=2 repeated {size=1 int64, name=2 string}, unknown_rank=3 bool
    TensorSliceProto    extent=1 repeated {start=1 int64, length=2 int64 (absent: to the end)}
    TrackableObjectGraph nodes=1 repeated TrackableObject {
                        children=1 repeated {node_id=1, local_name=2},
                        attributes=2 repeated {name=1, full_name=2, checkpoint_key=3},
                        slot_variables=3 repeated {original_variable_node_id=1, slot_name=2,
                        slot_variable_node_id=3}}

The encoders write what TF's C++ serializer writes for these messages: fields in number order,
proto3 defaults (0, empty) left out, a present sub-message written even when empty (a scalar's
``shape`` is ``12 00``).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

_U64 = (1 << 64) - 1


class ProtoError(ValueError):
    """Bytes that are not a valid message; callers turn it into a ``CheckpointError``."""


def read_varint(data: bytes | memoryview, pos: int, limit_bytes: int = 10) -> tuple[int, int]:
    """The varint at ``data[pos:]`` and the position after it (at most ``limit_bytes`` bytes)."""
    value = 0
    shift = 0
    end = min(len(data), pos + limit_bytes)
    while pos < end:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if value > _U64:
                raise ProtoError("varint larger than 64 bits")
            return value, pos
        shift += 7
    if pos >= len(data):
        raise ProtoError("varint runs past the end")
    raise ProtoError(f"varint longer than {limit_bytes} bytes")


def encode_varint(value: int) -> bytes:
    """``value`` (0 <= value < 2^64; negatives as their 64-bit two's complement) as a varint."""
    value &= _U64
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def iter_fields(data: bytes | memoryview) -> Iterator[tuple[int, int, int | bytes]]:
    """``(field number, wire type, value)`` for each field: an int for wire types 0, 1 and 5,
    the raw bytes for wire type 2."""
    pos = 0
    size = len(data)
    while pos < size:
        key, pos = read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ProtoError("field number 0")
        if wire == 0:
            value, pos = read_varint(data, pos)
            yield number, wire, value
        elif wire == 1:
            if pos + 8 > size:
                raise ProtoError("fixed64 runs past the end")
            yield number, wire, struct.unpack_from("<Q", data, pos)[0]
            pos += 8
        elif wire == 5:
            if pos + 4 > size:
                raise ProtoError("fixed32 runs past the end")
            yield number, wire, struct.unpack_from("<I", data, pos)[0]
            pos += 4
        elif wire == 2:
            length, pos = read_varint(data, pos)
            if length > size - pos:
                raise ProtoError(f"field {number}: {length} bytes run past the end")
            yield number, wire, bytes(data[pos : pos + length])
            pos += length
        else:
            raise ProtoError(f"field {number}: unsupported wire type {wire}")


def _int(wire: int, value: int | bytes, what: str) -> int:
    if wire != 0 or not isinstance(value, int):
        raise ProtoError(f"{what}: expected a varint")
    return value


def _bytes(wire: int, value: int | bytes, what: str) -> bytes:
    if wire != 2 or not isinstance(value, bytes):
        raise ProtoError(f"{what}: expected a length-delimited field")
    return value


def _text(wire: int, value: int | bytes, what: str) -> str:
    raw = _bytes(wire, value, what)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtoError(f"{what}: not UTF-8") from None


def _field(number: int, wire: int) -> bytes:
    return encode_varint(number << 3 | wire)


def _len_field(number: int, payload: bytes) -> bytes:
    return _field(number, 2) + encode_varint(len(payload)) + payload


# --- BundleHeaderProto --------------------------------------------------------------------


@dataclass(frozen=True)
class BundleHeader:
    num_shards: int = 1
    big_endian: bool = False
    producer: int = 0
    min_consumer: int = 0
    bad_consumers: tuple[int, ...] = ()


def parse_header(data: bytes) -> BundleHeader:
    num_shards, endianness, producer, min_consumer = 0, 0, 0, 0
    bad: list[int] = []
    for number, wire, value in iter_fields(data):
        if number == 1:
            num_shards = _signed(_int(wire, value, "num_shards"))
        elif number == 2:
            endianness = _int(wire, value, "endianness")
        elif number == 3:
            for n, w, v in iter_fields(_bytes(wire, value, "version")):
                if n == 1:
                    producer = _signed(_int(w, v, "version.producer"))
                elif n == 2:
                    min_consumer = _signed(_int(w, v, "version.min_consumer"))
                elif n == 3 and w == 0:
                    bad.append(_signed(_int(w, v, "version.bad_consumers")))
                elif n == 3:  # packed
                    packed = _bytes(w, v, "version.bad_consumers")
                    pos = 0
                    while pos < len(packed):
                        item, pos = read_varint(packed, pos)
                        bad.append(_signed(item))
    if endianness not in (0, 1):
        raise ProtoError(f"unknown endianness {endianness}")
    return BundleHeader(num_shards, endianness == 1, producer, min_consumer, tuple(bad))


def encode_header(header: BundleHeader) -> bytes:
    """What TF's ``BundleWriter::Finish`` stores under the empty key."""
    version = b""
    if header.producer:
        version += _field(1, 0) + encode_varint(header.producer)
    if header.min_consumer:
        version += _field(2, 0) + encode_varint(header.min_consumer)
    if header.bad_consumers:  # repeated int32 is packed in proto3
        version += _len_field(3, b"".join(encode_varint(b) for b in header.bad_consumers))
    out = b""
    if header.num_shards:
        out += _field(1, 0) + encode_varint(header.num_shards)
    if header.big_endian:
        out += _field(2, 0) + encode_varint(1)
    return out + _len_field(3, version)


# --- BundleEntryProto ---------------------------------------------------------------------


@dataclass(frozen=True)
class BundleEntry:
    """One tensor's index entry. ``crc32c`` is the masked CRC of its stored bytes."""

    dtype: int
    shape: tuple[int, ...]
    shard_id: int = 0
    offset: int = 0
    size: int = 0
    crc32c: int = 0
    #: One ``((start, length), ...)`` per dimension for each slice (length -1: to the end).
    slices: tuple[tuple[tuple[int, int], ...], ...] = ()
    unknown_rank: bool = False


def _parse_shape(data: bytes) -> tuple[tuple[int, ...], bool]:
    dims: list[int] = []
    unknown_rank = False
    for number, wire, value in iter_fields(data):
        if number == 2:
            size = 0
            for n, w, v in iter_fields(_bytes(wire, value, "shape.dim")):
                if n == 1:
                    size = _signed(_int(w, v, "shape.dim.size"))
            dims.append(size)
        elif number == 3:
            unknown_rank = bool(_int(wire, value, "shape.unknown_rank"))
    return tuple(dims), unknown_rank


def _parse_slice(data: bytes) -> tuple[tuple[int, int], ...]:
    extents: list[tuple[int, int]] = []
    for number, wire, value in iter_fields(data):
        if number == 1:
            start, length = 0, -1
            for n, w, v in iter_fields(_bytes(wire, value, "slice.extent")):
                if n == 1:
                    start = _signed(_int(w, v, "slice.extent.start"))
                elif n == 2:
                    length = _signed(_int(w, v, "slice.extent.length"))
            extents.append((start, length))
    return tuple(extents)


def parse_entry(data: bytes) -> BundleEntry:
    dtype, shard_id, offset, size, crc = 0, 0, 0, 0, 0
    shape: tuple[int, ...] = ()
    unknown_rank = False
    slices: list[tuple[tuple[int, int], ...]] = []
    for number, wire, value in iter_fields(data):
        if number == 1:
            dtype = _int(wire, value, "dtype")
        elif number == 2:
            shape, unknown_rank = _parse_shape(_bytes(wire, value, "shape"))
        elif number == 3:
            shard_id = _signed(_int(wire, value, "shard_id"))
        elif number == 4:
            offset = _signed(_int(wire, value, "offset"))
        elif number == 5:
            size = _signed(_int(wire, value, "size"))
        elif number == 6:
            if wire != 5 or not isinstance(value, int):
                raise ProtoError("crc32c: expected a fixed32")
            crc = value
        elif number == 7:
            slices.append(_parse_slice(_bytes(wire, value, "slices")))
    return BundleEntry(dtype, shape, shard_id, offset, size, crc, tuple(slices), unknown_rank)


def encode_entry(entry: BundleEntry) -> bytes:
    """An unsliced entry as TF's ``BundleWriter::Add`` serializes it."""
    if entry.slices or entry.unknown_rank:
        raise ValueError("only plain (unsliced, known-shape) entries are written")
    shape = b"".join(
        _len_field(2, _field(1, 0) + encode_varint(d) if d else b"") for d in entry.shape
    )
    out = b""
    if entry.dtype:
        out += _field(1, 0) + encode_varint(entry.dtype)
    out += _len_field(2, shape)  # always present: TF sets it, even for a scalar
    if entry.shard_id:
        out += _field(3, 0) + encode_varint(entry.shard_id)
    if entry.offset:
        out += _field(4, 0) + encode_varint(entry.offset)
    if entry.size:
        out += _field(5, 0) + encode_varint(entry.size)
    if entry.crc32c:
        out += _field(6, 5) + struct.pack("<I", entry.crc32c)
    return out


# --- TrackableObjectGraph -----------------------------------------------------------------


@dataclass(frozen=True)
class SlotVariable:
    original_variable_node_id: int
    slot_name: str
    slot_variable_node_id: int


@dataclass(frozen=True)
class TrackableNode:
    """One object of the graph: its named children (node ids), the checkpoint keys of its own
    values (``attributes``: name -> checkpoint key) and the slot variables it owns."""

    children: tuple[tuple[str, int], ...] = ()
    attributes: tuple[tuple[str, str], ...] = ()
    slot_variables: tuple[SlotVariable, ...] = field(default=())


def parse_object_graph(data: bytes) -> list[TrackableNode]:
    """The nodes of a serialized ``TrackableObjectGraph``, node 0 being the root."""
    nodes: list[TrackableNode] = []
    for number, wire, value in iter_fields(data):
        if number != 1:
            continue
        children: list[tuple[str, int]] = []
        attributes: list[tuple[str, str]] = []
        slots: list[SlotVariable] = []
        for n, w, v in iter_fields(_bytes(wire, value, "nodes")):
            if n == 1:
                node_id, name = 0, ""
                for n2, w2, v2 in iter_fields(_bytes(w, v, "children")):
                    if n2 == 1:
                        node_id = _int(w2, v2, "children.node_id")
                    elif n2 == 2:
                        name = _text(w2, v2, "children.local_name")
                children.append((name, node_id))
            elif n == 2:
                attr_name, key = "", ""
                for n2, w2, v2 in iter_fields(_bytes(w, v, "attributes")):
                    if n2 == 1:
                        attr_name = _text(w2, v2, "attributes.name")
                    elif n2 == 3:
                        key = _text(w2, v2, "attributes.checkpoint_key")
                attributes.append((attr_name, key))
            elif n == 3:
                original, slot_name, slot = 0, "", 0
                for n2, w2, v2 in iter_fields(_bytes(w, v, "slot_variables")):
                    if n2 == 1:
                        original = _int(w2, v2, "slot_variables.original_variable_node_id")
                    elif n2 == 2:
                        slot_name = _text(w2, v2, "slot_variables.slot_name")
                    elif n2 == 3:
                        slot = _int(w2, v2, "slot_variables.slot_variable_node_id")
                slots.append(SlotVariable(original, slot_name, slot))
        nodes.append(TrackableNode(tuple(children), tuple(attributes), tuple(slots)))
    count = len(nodes)
    for node in nodes:
        ids = [i for _, i in node.children]
        ids += [s.original_variable_node_id for s in node.slot_variables]
        ids += [s.slot_variable_node_id for s in node.slot_variables]
        if any(i >= count for i in ids):
            raise ProtoError(f"a node refers to node {max(ids)} of {count}")
    return nodes
