"""The LevelDB-style sorted table that is a TensorBundle's ``.index`` file.

Layout (tensorflow ``core/lib/io/{format,block_builder,table_builder}.cc``)::

    data block 0, trailer | data block 1, trailer | ... | metaindex block, trailer |
    index block, trailer | footer (48 bytes)

- A block is a run of entries ``varint32 shared, varint32 unshared, varint32 value_length,
  key[shared:] (unshared bytes), value``: each key drops the prefix it shares with the previous
  one, except at a restart point (every 16 entries; every entry in the index block) where
  ``shared`` is 0. Then the restart offsets (uint32 LE each) and their count (uint32 LE).
- A trailer is 5 bytes: the compression type (0 none, 1 snappy) and the masked CRC-32C of the
  block's stored bytes followed by that type byte.
- The index block maps, for each data block, a key >= its last key and < the next block's first
  key (TF shortens it: ``FindShortestSeparator``, ``FindShortSuccessor`` for the last block) to
  its handle ``varint64 offset, varint64 size`` (size without the trailer). The metaindex block
  is empty.
- The footer: the metaindex handle and the index handle, zero-padded to 40 bytes, then the magic
  0xdb4775248b80fb57 as two uint32 LE (low half first). Nonzero padding is refused: with the
  block checksums, that makes every single changed byte of an index an error.

TF's writer flushes a data block once its size estimate (entries + 4 bytes per restart + 4)
reaches ``block_size`` = 262144, and first flushes before an entry whose key and value together
reach twice that. It never compresses (since TF 1.2); older files may hold snappy blocks, which
``decompress_snappy`` reads.

Reading is bounded: every handle is checked against the file size before anything is read, each
varint is limited to its type's length, and nothing recurses.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

from ema_cli.formats.tensorbundle_crc import crc32c, mask, unmask
from ema_cli.formats.tensorbundle_proto import ProtoError, encode_varint, read_varint

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
TRAILER_SIZE = 5
BLOCK_SIZE = 262144
RESTART_INTERVAL = 16
NO_COMPRESSION = 0
SNAPPY_COMPRESSION = 1


class TableError(ValueError):
    """Bytes that are not a valid table; the reader turns it into a ``CheckpointError``."""


# --- reading ------------------------------------------------------------------------------


def parse_footer(footer: bytes) -> tuple[tuple[int, int], tuple[int, int]]:
    """The metaindex and index block handles ``(offset, size)`` from the 48-byte footer."""
    if len(footer) != FOOTER_SIZE:
        raise TableError("too short for a table footer")
    low, high = struct.unpack_from("<II", footer, 40)
    if high << 32 | low != TABLE_MAGIC:
        raise TableError("no table magic number at the end (truncated, or not a bundle index)")
    try:
        meta_offset, pos = read_varint(footer, 0)
        meta_size, pos = read_varint(footer, pos)
        index_offset, pos = read_varint(footer, pos)
        index_size, pos = read_varint(footer, pos)
    except ProtoError as e:
        raise TableError(f"corrupt footer: {e}") from None
    if pos > 40:
        raise TableError("corrupt footer: block handles overrun the padding")
    # No checksum covers the footer; writers pad it with zeros (LevelDB's and TF's do), so any
    # other byte there is damage, not a harmless change.
    if any(footer[pos:40]):
        raise TableError("corrupt footer: nonzero padding after the block handles")
    return (meta_offset, meta_size), (index_offset, index_size)


def parse_handle(value: bytes) -> tuple[int, int]:
    """An index entry's value: ``varint64 offset, varint64 size``."""
    try:
        offset, pos = read_varint(value, 0)
        size, pos = read_varint(value, pos)
    except ProtoError as e:
        raise TableError(f"corrupt block handle: {e}") from None
    if pos != len(value):
        raise TableError("corrupt block handle: trailing bytes")
    return offset, size


def check_block(raw: bytes, what: str) -> bytes:
    """A block's contents from its stored bytes plus 5-byte trailer: CRC verified, snappy
    blocks decompressed."""
    contents, kind = raw[:-TRAILER_SIZE], raw[-TRAILER_SIZE]
    (stored,) = struct.unpack_from("<I", raw, len(raw) - 4)
    actual = crc32c(raw[: len(raw) - 4])  # the contents and the type byte
    if unmask(stored) != actual:
        raise TableError(
            f"{what}: block checksum mismatch (stored {unmask(stored):08x}, computed "
            f"{actual:08x}): the index is corrupt"
        )
    if kind == NO_COMPRESSION:
        return contents
    if kind == SNAPPY_COMPRESSION:
        try:
            return decompress_snappy(contents)
        except ValueError as e:
            raise TableError(f"{what}: corrupt snappy block: {e}") from None
    raise TableError(f"{what}: unknown block compression type {kind}")


def iter_block(block: bytes, what: str) -> Iterator[tuple[bytes, bytes]]:
    """The ``(key, value)`` entries of a block's contents, in order."""
    if len(block) < 4:
        raise TableError(f"{what}: block too short ({len(block)} bytes)")
    (restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    if restarts == 0 or restarts > (len(block) - 4) // 4:
        raise TableError(f"{what}: corrupt block ({restarts} restart points)")
    end = len(block) - 4 * (restarts + 1)
    restart_offsets = set(struct.unpack_from(f"<{restarts}I", block, end))
    key = b""
    pos = 0
    try:
        while pos < end:
            at = pos
            shared, pos = read_varint(block, pos, 5)
            unshared, pos = read_varint(block, pos, 5)
            length, pos = read_varint(block, pos, 5)
            if shared > len(key) or unshared + length > end - pos:
                raise TableError(f"{what}: corrupt block entry at byte {at}")
            if at in restart_offsets and shared:
                raise TableError(f"{what}: corrupt block: restart point at byte {at} shares a key")
            key = key[:shared] + block[pos : pos + unshared]
            pos += unshared
            yield key, block[pos : pos + length]
            pos += length
    except ProtoError as e:
        raise TableError(f"{what}: corrupt block entry: {e}") from None


def read_table(read: Callable[[int, int], bytes], file_size: int) -> list[tuple[bytes, bytes]]:
    """Every ``(key, value)`` of the table in a file of ``file_size`` bytes, in key order;
    ``read(offset, size)`` returns the file's bytes there (fewer only at its end). Checks that
    handles stay inside the file and between the blocks before them, that block checksums
    match (the metaindex block's too), and that keys ascend strictly."""
    if file_size < FOOTER_SIZE:
        raise TableError(
            f"only {file_size} bytes, too short for a table footer (truncated, or not an index)"
        )
    limit = file_size - FOOTER_SIZE
    (meta_offset, meta_size), (index_offset, index_size) = parse_footer(read(limit, FOOTER_SIZE))

    def block(offset: int, size: int, what: str, floor: int) -> bytes:
        if offset < floor or size > limit or offset > limit - size - TRAILER_SIZE:
            raise TableError(
                f"{what}: handle (offset {offset}, size {size}) outside the file's "
                f"{limit} bytes of blocks (truncated or corrupt)"
            )
        raw = read(offset, size + TRAILER_SIZE)
        if len(raw) != size + TRAILER_SIZE:
            raise TableError(f"{what}: the file ended inside the block")
        return check_block(raw, what)

    index = block(index_offset, index_size, "index block", 0)
    # Nothing lives in the metaindex block, but its checksum still tells a damaged file.
    block(meta_offset, meta_size, "metaindex block", 0)
    entries: list[tuple[bytes, bytes]] = []
    floor = 0
    for separator, handle in iter_block(index, "index block"):
        offset, size = parse_handle(handle)
        what = f"data block at byte {offset}"
        for key, value in iter_block(block(offset, size, what, floor), what):
            if entries and key <= entries[-1][0]:
                raise TableError(f"{what}: keys out of order ({key!r} after {entries[-1][0]!r})")
            if key > separator:
                raise TableError(f"{what}: key {key!r} beyond its index entry {separator!r}")
            entries.append((key, value))
        floor = offset + size + TRAILER_SIZE
    return entries


def decompress_snappy(data: bytes, limit: int = 1 << 28) -> bytes:
    """Raw (unframed) snappy: a varint uncompressed length, then literals and back-references
    (https://github.com/google/snappy/blob/main/format_description.txt). ``limit`` caps the
    output, which is checked before anything is allocated."""
    try:
        size, pos = read_varint(data, 0, 5)
    except ProtoError as e:
        raise ValueError(str(e)) from None
    if size > limit or size > 256 * max(len(data), 1):
        raise ValueError(f"implausible uncompressed size {size}")
    out = bytearray()
    n = len(data)
    while pos < n:
        tag = data[pos]
        pos += 1
        kind = tag & 3
        if kind == 0:  # literal; lengths above 60 follow in 1-4 bytes
            length = tag >> 2
            if length >= 60:
                extra = length - 59
                if pos + extra > n:
                    raise ValueError("literal length runs past the end")
                length = int.from_bytes(data[pos : pos + extra], "little")
                pos += extra
            length += 1
            if pos + length > n:
                raise ValueError("literal runs past the end")
            out += data[pos : pos + length]
            pos += length
        else:
            if kind == 1:
                if pos + 1 > n:
                    raise ValueError("copy runs past the end")
                length = 4 + ((tag >> 2) & 7)
                offset = (tag >> 5) << 8 | data[pos]
                pos += 1
            else:
                width = 2 if kind == 2 else 4
                if pos + width > n:
                    raise ValueError("copy runs past the end")
                length = (tag >> 2) + 1
                offset = int.from_bytes(data[pos : pos + width], "little")
                pos += width
            if offset == 0 or offset > len(out):
                raise ValueError(f"copy offset {offset} outside the {len(out)} bytes so far")
            start = len(out) - offset
            for i in range(length):  # byte by byte: a copy may overlap what it writes
                out.append(out[start + i])
        if len(out) > size:
            raise ValueError("more output than the stated length")
    if len(out) != size:
        raise ValueError(f"{len(out)} bytes decoded, {size} stated")
    return bytes(out)


# --- writing ------------------------------------------------------------------------------


class _BlockBuilder:
    def __init__(self, restart_interval: int) -> None:
        self.interval = restart_interval
        self.buffer = bytearray()
        self.restarts = [0]
        self.counter = 0
        self.last_key = b""

    def empty(self) -> bool:
        return not self.buffer

    def size_estimate(self) -> int:
        return len(self.buffer) + 4 * len(self.restarts) + 4

    def add(self, key: bytes, value: bytes) -> None:
        shared = 0
        if self.counter < self.interval:
            limit = min(len(key), len(self.last_key))
            while shared < limit and key[shared] == self.last_key[shared]:
                shared += 1
        else:
            self.restarts.append(len(self.buffer))
            self.counter = 0
        self.buffer += encode_varint(shared) + encode_varint(len(key) - shared)
        self.buffer += encode_varint(len(value)) + key[shared:] + value
        self.last_key = key
        self.counter += 1

    def finish(self) -> bytes:
        out = bytes(self.buffer) + struct.pack(f"<{len(self.restarts)}I", *self.restarts)
        out += struct.pack("<I", len(self.restarts))
        self.buffer = bytearray()
        self.restarts = [0]
        self.counter = 0
        self.last_key = b""
        return out


def _shortest_separator(start: bytes, limit: bytes) -> bytes:
    """A short key in ``[start, limit)``: TF's ``FindShortestSeparator``."""
    common = 0
    while common < min(len(start), len(limit)) and start[common] == limit[common]:
        common += 1
    if common >= min(len(start), len(limit)):
        return start  # one is a prefix of the other
    byte = start[common]
    if byte < 0xFF and byte + 1 < limit[common]:
        return start[:common] + bytes([byte + 1])
    return start


def _short_successor(key: bytes) -> bytes:
    """A short key >= ``key``: TF's ``FindShortSuccessor``."""
    for i, byte in enumerate(key):
        if byte != 0xFF:
            return key[:i] + bytes([byte + 1])
    return key


class TableBuilder:
    """Builds a table in memory, byte for byte as TF's ``table::TableBuilder`` does with no
    compression. Keys must be added in strictly ascending byte order."""

    def __init__(self, block_size: int = BLOCK_SIZE) -> None:
        self.block_size = block_size
        self.out = bytearray()
        self.data = _BlockBuilder(RESTART_INTERVAL)
        self.index = _BlockBuilder(1)
        self.last_key = b""
        self.entries = 0
        self.pending: tuple[int, int] | None = None

    def add(self, key: bytes, value: bytes) -> None:
        if self.entries:
            if key <= self.last_key:
                raise ValueError(f"table keys out of order: {key!r} after {self.last_key!r}")
            if len(key) + len(value) >= 2 * self.block_size:
                self._flush()
        if self.pending is not None:
            self._add_index(_shortest_separator(self.last_key, key))
        self.last_key = key
        self.entries += 1
        self.data.add(key, value)
        if self.data.size_estimate() >= self.block_size:
            self._flush()

    def _add_index(self, key: bytes) -> None:
        assert self.pending is not None
        offset, size = self.pending
        self.index.add(key, encode_varint(offset) + encode_varint(size))
        self.pending = None

    def _write_block(self, block: _BlockBuilder) -> tuple[int, int]:
        contents = block.finish()
        handle = (len(self.out), len(contents))
        trailer_type = bytes([NO_COMPRESSION])
        self.out += contents + trailer_type
        self.out += struct.pack("<I", mask(crc32c(contents + trailer_type)))
        return handle

    def _flush(self) -> None:
        if self.data.empty():
            return
        self.pending = self._write_block(self.data)

    def finish(self) -> bytes:
        """The complete table."""
        self._flush()
        meta = self._write_block(_BlockBuilder(RESTART_INTERVAL))
        if self.pending is not None:
            self._add_index(_short_successor(self.last_key))
        index = self._write_block(self.index)
        footer = b"".join(encode_varint(v) for v in (*meta, *index))
        footer = footer.ljust(40, b"\0")
        footer += struct.pack("<II", TABLE_MAGIC & 0xFFFFFFFF, TABLE_MAGIC >> 32)
        self.out += footer
        return bytes(self.out)
