"""TensorFlow TensorBundle checkpoints (``tf.train.Checkpoint``, ``CheckpointManager``,
``tf.compat.v1.train.Saver``), read and written without TensorFlow.

A bundle ``PREFIX`` is ``PREFIX.index`` (a sorted table of protobuf entries; see
``tensorbundle_table`` and ``tensorbundle_proto``) and ``PREFIX.data-0000i-of-0000N``, the
tensors' raw bytes. The index's first entry, under the empty key, is a ``BundleHeaderProto``
(``num_shards``, endianness, version); every other key is a tensor's ``BundleEntryProto``:
dtype, shape, ``shard_id``, ``offset`` and ``size`` of its bytes in that data file, and the
masked CRC-32C of those bytes.

- Numeric tensors are stored as their little-endian row-major bytes, one after the other in
  the order TF added them (``offset`` order, not key order), with no padding (TF's default
  ``data_alignment`` of 1).
- A string tensor of ``n`` elements is stored as ``n`` varint64 lengths, the masked CRC-32C of
  those lengths (each fed as a uint32 LE, or uint64 LE when above 2^32 - 1), then the
  elements' bytes. Its entry's CRC covers the lengths as fed to the length checksum, the 4
  stored checksum bytes, then the element bytes. TF2 checkpoints hold one:
  ``_CHECKPOINTABLE_OBJECT_GRAPH``, the serialized object graph (``tensorbundle_graph``).

String, variant and other tensors that are not plain numbers are not ``tensors`` of the reader:
they are ``raw_entries``, whose stored bytes ``read_raw`` returns (checksum verified) for a
writer to carry verbatim. Partitioned variables (entries with ``slices``) are refused, naming
the variable; big-endian bundles are refused.

Checksums: a reader verifies each tensor's CRC as the replay reads it, without a second pass,
when a tensor's blocks are read in order from its first element to its last (each tensor by one
thread at a time; tensors may interleave); a mismatch raises ``CheckpointError`` naming the
tensor at the read that completes it. Reads in other patterns are not verified: ``verify()``
checks any tensors in a separate pass. The writer checksums each block as it arrives and
combines the block CRCs at ``finish()`` (``crc32c_combine``), so blocks may come in any order.
"""

from __future__ import annotations

import math
import os
import re
import struct
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ema_cli.checkpoint import TensorInfo
from ema_cli.errors import CheckpointError, OptionError, TruncatedCheckpointError
from ema_cli.formats.base import (
    CheckpointReader,
    CheckpointWriter,
    open_for_reading,
    read_exact,
    write_exact,
)
from ema_cli.formats.tensorbundle_crc import crc32c, crc32c_combine, mask, unmask
from ema_cli.formats.tensorbundle_graph import KeyInfo, ObjectGraph, classify
from ema_cli.formats.tensorbundle_proto import (
    BundleEntry,
    BundleHeader,
    ProtoError,
    encode_entry,
    encode_header,
    encode_varint,
    parse_entry,
    parse_header,
    parse_object_graph,
    read_varint,
)
from ema_cli.formats.tensorbundle_table import TableBuilder, TableError, read_table

#: The version our writer records, and the newest format our reader reads (TF's
#: ``kTensorBundleVersion``).
BUNDLE_VERSION = 1

#: ``_CHECKPOINTABLE_OBJECT_GRAPH``: where a TF2 checkpoint keeps its object graph.
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"

#: tensorflow ``core/framework/types.proto`` DataType codes.
DT_STRING = 7
DT_VARIANT = 21
DT_BFLOAT16 = 14

#: DataType code -> numpy dtype string, for the tensors stored as plain bytes that we read as
#: numbers (bfloat16 comes from ml_dtypes, imported only when a bundle holds one).
_NUMPY_DTYPES: dict[int, str] = {
    1: "<f4",  # DT_FLOAT
    2: "<f8",  # DT_DOUBLE
    3: "<i4",  # DT_INT32
    4: "|u1",  # DT_UINT8
    5: "<i2",  # DT_INT16
    6: "|i1",  # DT_INT8
    8: "<c8",  # DT_COMPLEX64
    9: "<i8",  # DT_INT64
    10: "|b1",  # DT_BOOL
    17: "<u2",  # DT_UINT16
    18: "<c16",  # DT_COMPLEX128
    19: "<f2",  # DT_HALF
    22: "<u4",  # DT_UINT32
    23: "<u8",  # DT_UINT64
}

#: Names of the DataTypes we do not read as numbers, for messages.
_OTHER_DTYPE_NAMES = {
    7: "string",
    11: "qint8",
    12: "quint8",
    13: "qint32",
    15: "qint16",
    16: "quint16",
    20: "resource",
    21: "variant",
}

_DATA_FILE = re.compile(r"\.data-(\d{5})-of-(\d{5})$")


def numpy_dtype(code: int) -> np.dtype[Any] | None:
    """The numpy dtype of a TF DataType code, or None when it is not a plain number type."""
    if code == DT_BFLOAT16:
        import ml_dtypes  # only bundles holding bfloat16 pay for the import

        bfloat16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
        return bfloat16
    spec = _NUMPY_DTYPES.get(code)
    return np.dtype(spec) if spec else None


def dtype_code(dtype: npt.DTypeLike) -> int:
    """The TF DataType code of a numpy dtype (``ValueError`` if TF has none for it)."""
    dtype = np.dtype(dtype)
    if dtype.name == "bfloat16":
        return DT_BFLOAT16
    for code, spec in _NUMPY_DTYPES.items():
        if np.dtype(spec) == dtype:
            return code
    raise ValueError(f"TensorBundle cannot store dtype {dtype}")


def dtype_name(code: int) -> str:
    """A readable name of a TF DataType code (``float32``, ``string``, ``DataType 99``)."""
    dtype = numpy_dtype(code) if code in _NUMPY_DTYPES or code == DT_BFLOAT16 else None
    if dtype is not None:
        return str(dtype)
    return _OTHER_DTYPE_NAMES.get(code, f"DataType {code}")


# --- file names ---------------------------------------------------------------------------


def bundle_prefix(path: str | os.PathLike[str]) -> Path:
    """The bundle prefix of ``PREFIX``, ``PREFIX.index`` or ``PREFIX.data-0000i-of-0000N``."""
    text = os.fspath(path)
    if text.endswith(".index"):
        return Path(text[: -len(".index")])
    match = _DATA_FILE.search(text)
    return Path(text[: match.start()] if match else text)


def data_filename(prefix: str | os.PathLike[str], shard: int, num_shards: int) -> Path:
    """``PREFIX.data-{shard:05d}-of-{num_shards:05d}``, as TF names data shards."""
    return Path(f"{os.fspath(prefix)}.data-{shard:05d}-of-{num_shards:05d}")


def bundle_files(
    prefix: str | os.PathLike[str], num_shards: int | None = None
) -> tuple[Path, list[Path]]:
    """The index and data shard paths of a bundle (``prefix`` may name any of its files).

    With ``num_shards`` the names follow from it. Without, the index's header says how many
    shards there are when the index can be read; else the data files present are counted
    (one shard when there are none).
    """
    base = bundle_prefix(prefix)
    index = Path(f"{base}.index")
    if num_shards is None:
        try:
            num_shards = TensorBundleReader(index, _header_only=True).header.num_shards
        except CheckpointError:
            found = sorted(base.parent.glob(f"{glob_escape(base.name)}.data-?????-of-?????"))
            counts = {int(m.group(2)) for p in found if (m := _DATA_FILE.search(p.name))}
            num_shards = max(counts) if counts else 1
    return index, [data_filename(base, i, num_shards) for i in range(num_shards)]


def _identity(fd: int) -> tuple[int, int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, st.st_mtime_ns


def checkpoint_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files of the bundle ``path`` names: its index and every data shard."""
    index, shards = bundle_files(path)
    return [index, *shards]


def companion_of(path: str | os.PathLike[str]) -> Path | None:
    """The index of the bundle whose data shard ``path`` is (None: not a data shard)."""
    text = os.fspath(path)
    if not _DATA_FILE.search(text):
        return None
    index = Path(f"{bundle_prefix(text)}.index")
    return index if index.is_file() else None


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters made literal."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


# --- string tensors -----------------------------------------------------------------------


def encode_string_tensor(values: Sequence[bytes]) -> tuple[bytes, int]:
    """A string tensor's stored bytes and its entry's masked CRC, as TF's
    ``WriteStringTensor`` makes them."""
    lengths = b"".join(encode_varint(len(v)) for v in values)
    crc = 0
    for v in values:
        crc = crc32c(struct.pack("<I" if len(v) <= 0xFFFFFFFF else "<Q", len(v)), crc)
    length_checksum = struct.pack("<I", mask(crc))
    crc = crc32c(length_checksum, crc)
    for v in values:
        crc = crc32c(v, crc)
    return lengths + length_checksum + b"".join(values), mask(crc)


def decode_string_tensor(data: bytes, count: int) -> tuple[list[bytes], int]:
    """The ``count`` elements of a stored string tensor and the (unmasked) CRC TF computes over
    it. ``ValueError`` when the bytes are malformed or the length checksum does not match."""
    if count > len(data):  # every element needs at least its one-byte length
        raise ValueError(f"{count} elements cannot fit in {len(data)} bytes")
    lengths = []
    pos = 0
    crc = 0
    try:
        for _ in range(count):
            length, pos = read_varint(data, pos)
            lengths.append(length)
            crc = crc32c(struct.pack("<I" if length <= 0xFFFFFFFF else "<Q", length), crc)
    except ProtoError as e:
        raise ValueError(f"corrupt string lengths: {e}") from None
    if pos + 4 > len(data):
        raise ValueError("the string lengths run past the stored bytes")
    (stored,) = struct.unpack_from("<I", data, pos)
    if unmask(stored) != crc:
        raise ValueError("string length checksum mismatch")
    crc = crc32c(data[pos : pos + 4], crc)
    pos += 4
    if sum(lengths) != len(data) - pos:
        raise ValueError(f"string lengths add up to {sum(lengths)}, {len(data) - pos} stored")
    values = []
    for length in lengths:
        values.append(data[pos : pos + length])
        pos += length
    crc = crc32c(data[pos - sum(lengths) : pos], crc)
    return values, crc


# --- reading ------------------------------------------------------------------------------


class _Progress:
    """A tensor's checksum as its blocks are read: each block's CRC by its byte offset, so that
    blocks read in any order, by any thread and through any reader of the same file (each
    replay worker opens its own) add up to the whole tensor's CRC (``crc32c_combine``)."""

    __slots__ = ("covered", "lock", "pieces")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pieces: dict[int, tuple[int, int]] = {}  # byte offset -> (length, crc)
        self.covered = 0


#: Progress of every tensor being read, shared by the readers of one file: keyed by the data
#: file's (device, inode, mtime) and the tensor's key. An entry lives until its tensor has been
#: read whole (then it is checked and dropped).
_SHARED: dict[tuple[int, int, int, str], _Progress] = {}
_SHARED_LOCK = threading.Lock()


#: Open readers per data file: when the last one closes, the file's progress entries go, so a
#: later file that reuses the inode (and the same coarse mtime) starts clean.
_READERS: dict[tuple[int, int, int], int] = {}


def _progress_of(identity: tuple[int, int, int], key: str) -> _Progress:
    with _SHARED_LOCK:
        return _SHARED.setdefault((*identity, key), _Progress())


def _opened(identity: tuple[int, int, int]) -> None:
    with _SHARED_LOCK:
        _READERS[identity] = _READERS.get(identity, 0) + 1


def _closed(identity: tuple[int, int, int]) -> None:
    with _SHARED_LOCK:
        left = _READERS.get(identity, 1) - 1
        if left > 0:
            _READERS[identity] = left
            return
        _READERS.pop(identity, None)
        for key in [k for k in _SHARED if k[:3] == identity]:
            del _SHARED[key]


class TensorBundleReader(CheckpointReader):
    """A bundle opened from its ``.index`` path (or its prefix, or a data file's path)."""

    format_name = "tensorbundle"
    thread_safe_reads = True  # preadv; the CRC progress of a file is shared, behind locks

    def __init__(
        self,
        path: str | os.PathLike[str],
        verify_checksums: bool = True,
        *,
        _header_only: bool = False,
    ) -> None:
        self.prefix = bundle_prefix(path)
        self.index_path = Path(f"{self.prefix}.index")
        super().__init__(self.index_path)
        self.verify_checksums = verify_checksums
        self._fds: list[int] = []
        self._graph: ObjectGraph | None = None
        self._graph_loaded = False
        try:
            self._open(_header_only)
        except BaseException:
            self.close()
            raise

    def _open(self, header_only: bool) -> None:
        index = self.index_path
        fd = open_for_reading(
            index, "a TensorBundle index", "no such file (a TensorBundle needs its .index)"
        )
        try:
            size = os.fstat(fd).st_size
            rows = read_table(lambda offset, n: os.pread(fd, n, offset), size)
        except TableError as e:
            raise CheckpointError(index, f"not a valid TensorBundle index: {e}") from None
        except OSError as e:
            raise CheckpointError(index, f"read error: {e.strerror}") from None
        finally:
            os.close(fd)
        if not rows or rows[0][0] != b"":
            raise CheckpointError(index, "not a TensorBundle index: no header entry")
        try:
            self.header: BundleHeader = parse_header(rows[0][1])
        except ProtoError as e:
            raise CheckpointError(index, f"corrupt bundle header: {e}") from None
        self._check_header()
        if header_only:
            self.entries: dict[str, BundleEntry] = {}
            self._tensors: dict[str, TensorInfo] = {}
            return
        self.entries = self._parse_entries(rows[1:])
        self.data_paths = [
            data_filename(self.prefix, i, self.header.num_shards)
            for i in range(self.header.num_shards)
        ]
        sizes = self._open_shards()

        tensors: dict[str, TensorInfo] = {}
        raw: dict[str, BundleEntry] = {}
        # In data order, so a cut-off file names the tensor it ends in.
        for key in sorted(self.entries, key=self.data_order):
            entry = self.entries[key]
            shard = self.data_paths[entry.shard_id]
            if entry.offset + entry.size > sizes[entry.shard_id]:
                raise TruncatedCheckpointError(
                    shard,
                    f"truncated: bytes [{entry.offset}, {entry.offset + entry.size}) are past "
                    f"the end of the file ({sizes[entry.shard_id]} bytes)",
                    tensor=key,
                )
            dtype = numpy_dtype(entry.dtype)
            if dtype is None:
                raw[key] = entry
                continue
            info = TensorInfo(key, dtype, entry.shape)
            if info.nbytes != entry.size:
                raise CheckpointError(
                    index,
                    f"corrupt entry: shape {list(entry.shape)} of {dtype} needs {info.nbytes} "
                    f"bytes but the entry says {entry.size}",
                    tensor=key,
                )
            tensors[key] = info
        # File order (TF's order of adding them): shard, then offset; an empty tensor shares
        # its offset with the next one and came before it.
        order = sorted(tensors, key=self.data_order)
        self._tensors = {k: tensors[k] for k in order}
        self.raw_entries: dict[str, BundleEntry] = raw
        self._identities = [_identity(fd) for fd in self._fds]
        for identity in self._identities:
            _opened(identity)

    def _check_header(self) -> None:
        header, index = self.header, self.index_path
        if header.big_endian:
            raise CheckpointError(
                index, "big-endian TensorBundle: not supported (written on a big-endian machine)"
            )
        if not 1 <= header.num_shards <= 99999:
            raise CheckpointError(index, f"corrupt bundle header: {header.num_shards} shards")
        if header.min_consumer > BUNDLE_VERSION or BUNDLE_VERSION in header.bad_consumers:
            raise CheckpointError(
                index,
                f"bundle format version {header.producer} needs a reader of version "
                f"{header.min_consumer} or later; this one reads version {BUNDLE_VERSION}",
            )

    def _parse_entries(self, rows: Iterable[tuple[bytes, bytes]]) -> dict[str, BundleEntry]:
        index = self.index_path
        entries: dict[str, BundleEntry] = {}
        for raw_key, value in rows:
            if raw_key.startswith(b"\0"):
                continue  # a slice of a partitioned variable; its full entry is refused below
            try:
                key = raw_key.decode("utf-8")
            except UnicodeDecodeError:
                raise CheckpointError(
                    index, f"corrupt index: key {raw_key!r} is not UTF-8"
                ) from None
            try:
                entry = parse_entry(value)
            except ProtoError as e:
                raise CheckpointError(index, f"corrupt entry: {e}", tensor=key) from None
            if entry.slices:
                raise CheckpointError(
                    index,
                    f"partitioned variable (saved in {len(entry.slices)} slices): not supported; "
                    "save it unpartitioned",
                    tensor=key,
                )
            if entry.unknown_rank or any(d < 0 for d in entry.shape):
                raise CheckpointError(
                    index, f"corrupt entry: invalid shape {list(entry.shape)}", tensor=key
                )
            if not 0 <= entry.shard_id < self.header.num_shards:
                raise CheckpointError(
                    index,
                    f"corrupt entry: shard {entry.shard_id} of {self.header.num_shards}",
                    tensor=key,
                )
            if entry.offset < 0 or entry.size < 0:
                raise CheckpointError(
                    index,
                    f"corrupt entry: offset {entry.offset}, size {entry.size}",
                    tensor=key,
                )
            entries[key] = entry
        return entries

    def _open_shards(self) -> list[int]:
        sizes = []
        for shard in self.data_paths:
            try:
                fd = os.open(shard, os.O_RDONLY)
            except FileNotFoundError:
                raise CheckpointError(
                    shard, f"missing data shard of {self.index_path.name}"
                ) from None
            except OSError as e:
                raise CheckpointError(shard, f"cannot open: {e.strerror}") from None
            self._fds.append(fd)
            sizes.append(os.fstat(fd).st_size)
        return sizes

    def data_order(self, key: str) -> tuple[int, int, bool]:
        """A sort key putting entries in the order TF wrote them: ``sorted(reader.entries,
        key=reader.data_order)`` lists a shard's entries as a writer must lay them out to
        reproduce its bytes."""
        entry = self.entries[key]
        return entry.shard_id, entry.offset, entry.size > 0

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._tensors

    @property
    def non_tensors(self) -> Sequence[str]:
        return [
            f"{dtype_name(e.dtype)} tensor '{k}' {list(e.shape)}"
            for k, e in self.raw_entries.items()
        ]

    def read(
        self,
        name: str,
        start: int = 0,
        stop: int | None = None,
        out: npt.NDArray[np.generic] | None = None,
    ) -> npt.NDArray[np.generic]:
        info, stop, out = self._block(name, start, stop, out)
        entry = self.entries[name]
        itemsize = info.dtype.itemsize
        want = (stop - start) * itemsize
        position = entry.offset + start * itemsize
        fd = self._fds[entry.shard_id]
        try:
            got = os.preadv(fd, [out], position)  # type: ignore[list-item]  # ndarray is a buffer
            if got != want:  # short: only at the end of the file, or interrupted
                got = read_exact(fd, out.view(np.uint8).data, position)
        except OSError as e:
            raise CheckpointError(
                self.data_paths[entry.shard_id], f"read error: {e.strerror}", tensor=name
            ) from None
        if got != want:
            raise TruncatedCheckpointError(
                self.data_paths[entry.shard_id],
                "truncated: the file ended while reading this tensor",
                tensor=name,
            )
        if self.verify_checksums:
            self._follow(name, entry, start * itemsize, out)
        return out

    def _follow(
        self, name: str, entry: BundleEntry, begin: int, block: npt.NDArray[np.generic]
    ) -> None:
        """Add ``block``'s CRC to ``name``'s; when the blocks read (through any reader of this
        file) cover the whole tensor, check their combined CRC against the entry's."""
        crc = crc32c(block)
        key = (*self._identities[entry.shard_id], name)
        progress = _progress_of(self._identities[entry.shard_id], name)
        with progress.lock:
            if begin in progress.pieces:
                return  # read again (another output reads the same block): counted once
            progress.pieces[begin] = (block.nbytes, crc)
            progress.covered += block.nbytes
            if progress.covered < entry.size:
                return
            pieces = sorted(progress.pieces.items())
            with _SHARED_LOCK:
                _SHARED.pop(key, None)
        whole, position = 0, 0
        for offset, (length, piece) in pieces:
            if offset != position:
                return  # overlapping blocks of different sizes: verify() checks such reads
            whole = crc32c_combine(whole, piece, length)
            position += length
        if position == entry.size and whole != unmask(entry.crc32c):
            raise self._mismatch(name, entry, whole)

    def _mismatch(self, name: str, entry: BundleEntry, crc: int) -> CheckpointError:
        return CheckpointError(
            self.data_paths[entry.shard_id],
            f"checksum mismatch (stored {unmask(entry.crc32c):08x}, computed {crc:08x}): "
            "the data file is corrupt",
            tensor=name,
        )

    def verify(self, names: Iterable[str] | None = None, block_bytes: int = 1 << 20) -> None:
        """Check the CRC of ``names`` (default: every tensor and raw entry) in one pass over
        their bytes, ``block_bytes`` at a time; ``CheckpointError`` naming the first bad one."""
        buffer = np.empty(block_bytes, np.uint8)
        for name in self.entries if names is None else names:
            if name in self.raw_entries:
                self.read_raw(name)
                continue
            entry = self.entries[name]
            fd = self._fds[entry.shard_id]
            crc = 0
            for begin in range(0, entry.size, block_bytes):
                view = buffer[: min(block_bytes, entry.size - begin)]
                try:
                    got = read_exact(fd, view.data, entry.offset + begin)
                except OSError as e:
                    raise CheckpointError(
                        self.data_paths[entry.shard_id], f"read error: {e.strerror}", tensor=name
                    ) from None
                if got != view.nbytes:
                    raise TruncatedCheckpointError(
                        self.data_paths[entry.shard_id],
                        "truncated: the file ended while reading this tensor",
                        tensor=name,
                    )
                crc = crc32c(view, crc)
            if crc != unmask(entry.crc32c):
                raise self._mismatch(name, entry, crc)

    def read_raw(self, key: str) -> bytes:
        """The stored bytes of entry ``key`` (any dtype), checksum verified: for a string
        tensor, its lengths, length checksum and element bytes, as a writer copies them."""
        entry = self.entries[key]
        shard = self.data_paths[entry.shard_id]
        buffer = bytearray(entry.size)
        try:
            got = read_exact(self._fds[entry.shard_id], memoryview(buffer), entry.offset)
        except OSError as e:
            raise CheckpointError(shard, f"read error: {e.strerror}", tensor=key) from None
        if got != entry.size:
            raise TruncatedCheckpointError(
                shard, "truncated: the file ended while reading this tensor", tensor=key
            )
        data = bytes(buffer)
        if entry.dtype == DT_STRING:
            try:
                _, crc = decode_string_tensor(data, math.prod(entry.shape))
            except ValueError as e:
                raise CheckpointError(shard, f"corrupt string tensor: {e}", tensor=key) from None
        else:
            crc = crc32c(data)
        if crc != unmask(entry.crc32c):
            raise self._mismatch(key, entry, crc)
        return data

    def read_strings(self, key: str) -> list[bytes]:
        """The elements of string tensor ``key`` in flat order, checksum verified."""
        entry = self.entries[key]
        if entry.dtype != DT_STRING:
            raise ValueError(f"{key}: {dtype_name(entry.dtype)}, not a string tensor")
        values, _ = decode_string_tensor(self.read_raw(key), math.prod(entry.shape))
        return values

    @property
    def object_graph(self) -> ObjectGraph | None:
        """The TF2 object graph, or None for a TF1 name-based checkpoint."""
        if not self._graph_loaded:
            self._graph_loaded = True
            entry = self.entries.get(OBJECT_GRAPH_KEY)
            if entry is not None:
                if entry.dtype != DT_STRING or entry.shape != ():
                    raise CheckpointError(
                        self.index_path, "not a scalar string tensor", tensor=OBJECT_GRAPH_KEY
                    )
                (data,) = self.read_strings(OBJECT_GRAPH_KEY)
                try:
                    self._graph = ObjectGraph(parse_object_graph(data))
                except ProtoError as e:
                    raise CheckpointError(
                        self.data_paths[entry.shard_id],
                        f"corrupt object graph: {e}",
                        tensor=OBJECT_GRAPH_KEY,
                    ) from None
        return self._graph

    def tensor_notes(self, name: str) -> Mapping[str, str]:
        info = self.key_info.get(name)
        if info is None or not info.paths:
            return {}
        # A model variable is best shown where the model holds it, not by the shortest path
        # (a Keras 3 kernel's goes through optimizer/_trainable_variables/N).
        through_model = [p for p in info.paths if p.startswith("model/")]
        path = through_model[0] if info.role == "model" and through_model else info.paths[0]
        return {"object_path": path, "role": info.role}

    def is_optimizer_state(self, name: str) -> bool:
        """Optimizer slots and variables, iteration counters and ``save_counter``, as the
        object graph (or, in TF1 checkpoints, the names) says: not by key prefix, since a
        Keras 3 model's own kernels live under ``optimizer/_trainable_variables/...``."""
        info = self.key_info.get(name)
        return info is not None and info.role in ("slot", "optimizer", "counter")

    @property
    def key_info(self) -> Mapping[str, KeyInfo]:
        """Every tensor's role (``model``, ``slot``, ``optimizer``, ``counter``, ``other``)
        and object paths, from the object graph (or, for TF1 checkpoints, from names)."""
        cached: Mapping[str, KeyInfo] | None = self.__dict__.get("_key_info")
        if cached is None:  # classified once: the plan asks about every tensor
            cached = self.__dict__["_key_info"] = classify(list(self._tensors), self.object_graph)
        return cached

    def file_offset(self, name: str, start: int) -> int:
        entry = self.entries[name]
        return entry.offset + start * self._tensors[name].dtype.itemsize

    def close(self) -> None:
        for identity in getattr(self, "_identities", []):
            _closed(identity)
        self._identities = []
        while self._fds:
            os.close(self._fds.pop())


# --- writing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EntrySpec:
    """One entry to write: a numeric tensor (``dtype``, ``shape``; data arrives in blocks), or
    a raw one (``raw`` holds its stored bytes, ``raw_dtype`` its TF DataType code and
    ``raw_crc32c`` its masked CRC; for a string tensor the CRC is computed when None)."""

    key: str
    dtype: np.dtype[Any] | None
    shape: tuple[int, ...]
    raw: bytes | None = None
    raw_dtype: int = 0
    raw_crc32c: int | None = None

    @classmethod
    def numeric(cls, key: str, dtype: npt.DTypeLike, shape: Sequence[int]) -> EntrySpec:
        return cls(key, np.dtype(dtype), tuple(shape))

    @classmethod
    def verbatim(
        cls, key: str, dtype: int, shape: Sequence[int], data: bytes, crc: int | None = None
    ) -> EntrySpec:
        """A raw entry (a string tensor's stored bytes, as ``read_raw`` returns them)."""
        return cls(key, None, tuple(shape), bytes(data), dtype, crc)

    @property
    def nbytes(self) -> int:
        if self.raw is not None:
            return len(self.raw)
        assert self.dtype is not None
        return math.prod(self.shape) * self.dtype.itemsize


class BundleDataWriter:
    """One data shard being written through ``fd`` (opened for writing by the caller).

    Entries are laid out in the given order from ``start`` (TF's order of ``Add``), each
    followed by zeros up to a multiple of ``alignment`` (TF's ``data_alignment``; 1, no
    padding, is TF's default). The file is sized at once and raw entries written; numeric
    blocks then arrive through ``write`` at any element offset, in any order, from any thread.
    ``finish`` checks every byte arrived exactly once and returns the index entries.
    """

    def __init__(
        self,
        fd: int,
        entries: Sequence[EntrySpec],
        *,
        shard_id: int = 0,
        alignment: int = 1,
        start: int = 0,
    ) -> None:
        self.fd = fd
        self.shard_id = shard_id
        self.specs = {e.key: e for e in entries}
        if len(self.specs) != len(entries) or "" in self.specs:
            raise ValueError("entry keys must be unique and not empty")
        self.offsets: dict[str, int] = {}
        position = start
        for spec in entries:
            self.offsets[spec.key] = position
            position += spec.nbytes
            position += -position % alignment
        self.size = position
        # (start byte, length, crc) of each block, per tensor; combined at finish().
        self._pieces: dict[str, list[tuple[int, int, int]]] = {
            e.key: [] for e in entries if e.raw is None
        }
        self._lock = threading.Lock()
        os.ftruncate(fd, self.size)  # the padding, and any gap, reads as zeros
        for spec in entries:
            if spec.raw is not None:
                write_exact(fd, memoryview(spec.raw), self.offsets[spec.key])

    def write(self, key: str, start: int, values: npt.NDArray[np.generic]) -> None:
        """Store ``values`` (1-D, the tensor's dtype) at flat element offset ``start``."""
        spec = self.specs[key]
        if spec.dtype is None or values.dtype != spec.dtype:
            raise TypeError(f"{key}: got {values.dtype}, expected {spec.dtype}")
        size = math.prod(spec.shape)
        if not 0 <= start <= start + values.size <= size:
            raise ValueError(f"{key}: elements [{start}, {start + values.size}) outside its {size}")
        data = np.ascontiguousarray(values).reshape(-1).view(np.uint8)
        begin = start * spec.dtype.itemsize
        write_exact(self.fd, data.data, self.offsets[key] + begin)
        crc = crc32c(data)  # outside the lock: the C kernel releases the GIL
        with self._lock:
            self._pieces[key].append((begin, data.nbytes, crc))

    def finish(self) -> list[tuple[str, BundleEntry]]:
        """Every entry's ``(key, BundleEntry)``, CRCs combined from the blocks' CRCs.
        ``RuntimeError`` when a tensor's blocks do not cover it exactly (a caller's bug)."""
        out = []
        for key, spec in self.specs.items():
            if spec.raw is not None:
                crc = spec.raw_crc32c
                if crc is None:
                    if spec.raw_dtype != DT_STRING:
                        raise ValueError(f"{key}: a raw entry other than strings needs its crc")
                    _, unmasked = decode_string_tensor(spec.raw, math.prod(spec.shape))
                    crc = mask(unmasked)
                dtype = spec.raw_dtype
            else:
                assert spec.dtype is not None
                crc = mask(self._combined(key, spec.nbytes))
                dtype = dtype_code(spec.dtype)
            entry = BundleEntry(
                dtype, spec.shape, self.shard_id, self.offsets[key], spec.nbytes, crc
            )
            out.append((key, entry))
        return out

    def _combined(self, key: str, nbytes: int) -> int:
        crc, end = 0, 0
        for begin, length, piece in sorted(self._pieces[key]):
            if begin != end:
                raise RuntimeError(
                    f"internal error: {key}: bytes [{min(begin, end)}, {max(begin, end)}) "
                    f"{'written twice' if begin < end else 'never written'}"
                )
            crc = crc32c_combine(crc, piece, length)
            end = begin + length
        if end != nbytes:
            raise RuntimeError(f"internal error: {key}: wrote {end} of {nbytes} bytes")
        return crc


def build_index(entries: Iterable[tuple[str, BundleEntry]], num_shards: int = 1) -> bytes:
    """The ``.index`` file of a bundle holding ``entries`` (any order; sorted here by key
    bytes, as TF's ``std::map`` orders them), byte for byte as TF's ``BundleWriter`` writes
    it: header ``{num_shards, little-endian, version {producer: 1}}``, then each entry."""
    table = TableBuilder()
    table.add(b"", encode_header(BundleHeader(num_shards=num_shards, producer=BUNDLE_VERSION)))
    rows = sorted((key.encode("utf-8"), encode_entry(entry)) for key, entry in entries)
    for key, value in rows:
        table.add(key, value)
    return table.finish()


def write_bundle(
    prefix: str | os.PathLike[str],
    items: Sequence[tuple[str, npt.NDArray[np.generic] | EntrySpec]],
    block_elements: int = 1 << 18,
) -> tuple[Path, Path]:
    """Write a one-shard bundle of ``items`` (arrays, or ``EntrySpec.verbatim`` raw entries)
    in the given data order straight to ``PREFIX.data-00000-of-00001`` and ``PREFIX.index``
    (no temporary files: for tests and tools; the CLI's writer adds its own lifecycle).
    Returns the index and data paths."""
    index, (data_path,) = bundle_files(prefix, 1)
    specs = [
        v if isinstance(v, EntrySpec) else EntrySpec.numeric(k, v.dtype, v.shape) for k, v in items
    ]
    fd = os.open(data_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        writer = BundleDataWriter(fd, specs)
        for key, value in items:
            if isinstance(value, EntrySpec):
                continue
            flat = np.ascontiguousarray(value).reshape(-1)
            for begin in range(0, flat.size, block_elements):
                writer.write(key, begin, flat[begin : begin + block_elements])
            if flat.size == 0:
                writer.write(key, 0, flat)
        entries = writer.finish()
    finally:
        os.close(fd)
    index.write_bytes(build_index(entries))
    return index, data_path


class TensorBundleWriter(CheckpointWriter):
    """Writes ``PREFIX.index`` and ``PREFIX.data-00000-of-00001`` for ``-o PREFIX.index``.

    With a TensorBundle template (the last input) the output holds every entry of it, in
    TF's own data order, with the output tensors in place: the object graph and other string
    tensors are copied verbatim, so ``tf.train.Checkpoint.restore`` finds everything it saved.
    The data file is published first and the index last (``CheckpointWriter``'s journal); a
    run killed between the two is completed by the next run.
    """

    @classmethod
    def check(
        cls, path: Path, tensors: Sequence[TensorInfo], template: CheckpointReader | None
    ) -> None:
        for info in tensors:
            if not info.name:
                raise OptionError(f"{path}: a TensorFlow checkpoint cannot hold an empty key")
            try:
                dtype_code(info.dtype)
            except (KeyError, ValueError, TypeError):
                raise OptionError(
                    f"{path}: tensor '{info.name}' is {info.dtype}, which TensorFlow checkpoints "
                    "cannot store; write a .safetensors output instead"
                ) from None
        if isinstance(template, TensorBundleReader) and template.object_graph is not None:
            names = {t.name for t in tensors}
            missing = [k for k in template.tensors if k not in names]
            extra = [n for n in names if n not in template.tensors]
            if missing or extra:
                what = (
                    f"names '{missing[0]}', which this output would not hold"
                    if missing
                    else f"has no place for '{extra[0]}'"
                )
                raise OptionError(
                    f"{path}: the object graph of {template.path} {what} (TF2 restores by the "
                    "object graph's keys, and --names shadow/both add keys it does not name); "
                    "use --names original, or write a .safetensors output"
                )

    @classmethod
    def carries_non_tensors(cls, template: CheckpointReader) -> bool:
        return isinstance(template, TensorBundleReader)

    @classmethod
    def orphans(cls, path: Path) -> list[Path]:
        """Data files of an earlier output with another shard count."""
        base = bundle_prefix(path)
        keep = data_filename(base, 0, 1).name
        found = base.parent.glob(f"{glob_escape(base.name)}.data-?????-of-?????")
        return [p for p in found if p.name != keep]

    def begin(self) -> None:
        template = self.template if isinstance(self.template, TensorBundleReader) else None
        specs: list[EntrySpec] = []
        placed: set[str] = set()
        if template is not None:
            for key in sorted(template.entries, key=template.data_order):
                entry = template.entries[key]
                if key in template.raw_entries:
                    data = template.read_raw(key)
                    specs.append(
                        EntrySpec.verbatim(key, entry.dtype, entry.shape, data, entry.crc32c)
                    )
                    placed.add(key)
                elif key in self.infos:
                    info = self.infos[key]
                    specs.append(EntrySpec.numeric(key, info.dtype, info.shape))
                    placed.add(key)
        for info in self.tensors:  # new names (--names shadow), or no bundle template
            if info.name not in placed:
                specs.append(EntrySpec.numeric(info.name, info.dtype, info.shape))
        self._data_file, self._data_tmp = self.stage_file()
        self._data = BundleDataWriter(self._data_file.fileno(), specs)

    def write(self, name: str, start: int, values: npt.NDArray[np.generic]) -> None:
        self._check_block(name, start, values)
        self._data.write(name, start, values)
        self._wrote(values.nbytes)

    def finish(self) -> list[tuple[Path, Path]]:
        entries = self._data.finish()
        self._data_file.close()
        index_file, index_tmp = self.stage_file()
        with index_file:
            index_file.write(build_index(entries))
        base = bundle_prefix(self.path)
        return [(self._data_tmp, data_filename(base, 0, 1)), (index_tmp, Path(f"{base}.index"))]

    def _discard(self) -> None:
        file = getattr(self, "_data_file", None)
        if file is not None:
            file.close()
