"""``torch.save`` zip checkpoints (``.pt``, ``.pth``, ``.bin``, Lightning ``.ckpt``), read and
written without torch and without running pickled code (see ``torch_pickle``).

Layout (torch >= 1.6): a zip, every member stored and 64-byte aligned, under one top folder
(``archive/``, or the file's stem when torch saved to a path): ``data.pkl`` (the pickled
structure), ``data/<key>`` (one storage each, raw little-endian elements), ``byteorder``,
``version``, ``.format_version``, ``.storage_alignment`` and ``.data/serialization_id``.

**Reading.** A tensor is a view of a storage: offset, size and stride in elements. Contiguous
views (offset slices included) are read with one positioned read into the caller's buffer.
Other views (a saved ``.t()``, an expanded or strided tensor) are gathered: their storage span
is read once and kept (one tensor at a time) when it is at most ``STRIDED_CACHE_BYTES``;
larger spans are scanned in ``WINDOW_BYTES`` windows for every block read, bounded memory at
a cost of O(span) bytes read per block. Tensors sharing one storage (tied weights) are each a
tensor of their own, and ``shared_storages`` says which share which. Storages must be stored
(torch never compresses them) and little-endian.

**Writing** (``TorchZipFileWriter``, on a path or a file descriptor; ``TorchZipWriter`` is the
``CheckpointWriter`` adapter that adds the temporary file and the rename). The output keeps the
template's structure: the same nested values, pickled again by ``TorchPickler`` with only what
``torch.load(weights_only=True)`` accepts, and every storage with the template's size, every
tensor with its offset and strides, so views and ties load as they were saved. Storages are
renumbered ``0, 1, ...`` in pickle order as torch numbers them. A tensor that is the only,
contiguous user of its storage is written in place as blocks arrive. The others — strided
views and every tensor of a shared storage — are staged after the end of the zip and placed at
``finish()``: their storage is filled in windows of ``WINDOW_BYTES`` (storage bytes no tensor
covers keep the template's values), then every tensor of the storage is read back and compared
with what it was given: tied tensors given different values (tied weights averaged differently,
say, one included and one excluded) are refused, since one storage cannot hold both. Staged
tensors cost one more write and two more reads of their bytes; the staging area is cut off at
the end. Bytes are deterministic: fixed member order (``data.pkl``, ``.format_version``,
``.storage_alignment``, ``byteorder``, ``data/0..``, ``version``), fixed timestamps (1980-01-01),
64-byte alignment by a padding extra field as torch writes it, ZIP64 records when sizes need
them. ``.data/serialization_id`` (a random id that ``torch.load`` does not need) is omitted.

**Hugging Face folders of torch weights** (``TorchShardedReader``, ``TorchShardedWriter``):
``pytorch_model.bin``, or shards ``pytorch_model-00001-of-0000N.bin`` with
``pytorch_model.bin.index.json``, through the folder machinery of ``sharded`` (one
``TorchZipReader`` / ``TorchZipFileWriter`` per shard). Each output shard is a plain state_dict
of its tensors, each tensor contiguous on a storage of its own, except tensors that share a
storage in the template (tied weights, ``shared_tensors``): they are kept in one shard and share
one storage there, with the template's offsets and strides, as ``save_pretrained`` wrote them.

Legacy (pre-1.6) ``torch.save`` files are refused with the command that converts them.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ema_cli.checkpoint import TensorInfo
from ema_cli.errors import CheckpointError, OptionError, OutputError, TruncatedCheckpointError
from ema_cli.formats.base import (
    CheckpointReader,
    CheckpointWriter,
    SharedScans,
    check_range,
    file_identity,
    open_for_reading,
    read_exact,
    write_exact,
)
from ema_cli.formats.sharded import (
    DEFAULT_OPEN_SHARDS,
    TORCH_LAYOUT,
    ShardedReader,
    ShardedWriter,
    ShardFile,
)
from ema_cli.formats.torch_pickle import (
    MAX_PICKLE_BYTES,
    NamedTensors,
    ParameterRecord,
    PickleWriteError,
    StorageRecord,
    TensorRecord,
    TorchPickler,
    check_savable,
    is_optimizer_name,
    name_tensors,
    numpy_dtype,
    tensor_of,
    torch_dtype_name,
    unpickle,
)
from ema_cli.formats.zipfiles import ZIP_ERRORS, open_zip, stored_data_offset

#: A strided view whose storage span is at most this is read once and kept while it is read.
STRIDED_CACHE_BYTES = 32 << 20
#: Window over a storage when gathering or placing strided and shared tensors (a multiple of
#: every itemsize, so no element straddles two windows).
WINDOW_BYTES = 32 << 20
#: View elements handled at once when computing storage positions (bounds index memory).
GATHER_CHUNK = 1 << 15
#: Sizes and offsets from here on need ZIP64 fields (a module constant so tests can lower it).
ZIP64_LIMIT = 0xFFFFFFFF
#: The top folder of written files, as torch writes when saving to a buffer.
ARCHIVE_NAME = "archive"

#: A pre-1.6 ``torch.save`` file starts with this pickle: PROTO 2, LONG1 of torch's magic.
_LEGACY_PREFIX = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_DOS_DATE = (1 << 5) | 1  # 1980-01-01
_COPY_BYTES = 1 << 20


@dataclass
class TorchStructure:
    """What a torch output is built from: the pickled value, its tensors by name, and the
    checkpoint its storages come from (for bytes no tensor covers), if any."""

    root: Any
    tensors: dict[str, TensorRecord | ParameterRecord]
    source: TorchZipReader | None = None


def element_positions(record: TensorRecord, start: int, stop: int) -> npt.NDArray[np.int64]:
    """Storage element index of view elements ``[start, stop)`` (flat C order)."""
    flat = np.arange(start, stop, dtype=np.int64)
    index = np.full(stop - start, record.storage_offset, dtype=np.int64)
    for size, stride in zip(reversed(record.size), reversed(record.stride), strict=True):
        flat, rest = np.divmod(flat, size)
        if stride:
            index += rest * stride
    return index


def _extent(record: TensorRecord) -> tuple[int, int]:
    """The storage elements ``[lo, hi)`` a non-empty view touches."""
    lo = record.storage_offset
    return lo, lo + sum((d - 1) * s for d, s in zip(record.size, record.stride, strict=True)) + 1


@dataclass(frozen=True)
class _Scan:
    """What ``TorchZipReader._scan`` learns from a file's zip directory and pickle: read-only
    once made, so the replay's workers, which each open every checkpoint again, reuse the
    first reader's instead of unpickling it again (18 ms for a 200-tensor model here, per
    open)."""

    top: str
    members: dict[str, zipfile.ZipInfo]
    offsets: dict[str, int]
    root: Any
    named: NamedTensors
    records: dict[str, TensorRecord]
    tensors: dict[str, TensorInfo]
    shared_storages: dict[str, tuple[str, ...]]


#: The scans of the torch files open now (``SharedScans``).
_SCANS: SharedScans[_Scan] = SharedScans()


class TorchZipReader(CheckpointReader):
    """A ``torch.save`` zip checkpoint. Tensor names are described in ``torch_pickle``."""

    format_name = "torch"
    #: Positioned reads; the strided gathers' cache is behind the reader's lock.
    thread_safe_reads = True

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        _refuse_legacy(path)
        self._raw, self.archive = open_zip(path, "torch checkpoint", "a torch checkpoint")
        self._fd = self._raw.fileno()
        self._lock = threading.Lock()
        self._cache: tuple[str, npt.NDArray[Any]] | None = None
        try:
            self._scan()
        except BaseException:
            self.close()
            raise

    def _scan(self) -> None:
        self.file_size = os.fstat(self._fd).st_size
        identity = file_identity(os.fstat(self._fd))
        scan = _SCANS.acquire(identity, self._scan_file)
        self._identity: tuple[int, ...] | None = identity
        self.top, self._members, self._offsets = scan.top, scan.members, scan.offsets
        named = scan.named
        self.structure = TorchStructure(scan.root, named.tensors, self)
        self.aliases: Mapping[str, str] = named.aliases
        self._non_tensors = named.non_tensors
        self._optimizer_prefixes = tuple(named.optimizer_prefixes)
        self._tensors: dict[str, TensorInfo] = scan.tensors
        self._records: dict[str, TensorRecord] = scan.records
        #: storage key -> the tensors viewing it, for storages shared by several (tied weights).
        self.shared_storages: Mapping[str, tuple[str, ...]] = scan.shared_storages

    def _scan_file(self) -> _Scan:
        path = self.path
        infos = self.archive.infolist()
        pickles = sorted(
            {
                i.filename[: -len("/data.pkl")]
                for i in infos
                if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1
            }
        )
        if not pickles:
            raise CheckpointError(path, "not a torch checkpoint (no <folder>/data.pkl in the zip)")
        if len(pickles) > 1:
            raise CheckpointError(
                path, f"not a torch checkpoint (several top folders hold data.pkl: {pickles[:3]})"
            )
        self.top = pickles[0]
        self._members = {i.filename: i for i in infos}
        order = self._member(f"{self.top}/byteorder")
        if order is not None:
            mark = self._small(order)
            if mark == b"big":
                raise CheckpointError(
                    path,
                    "big-endian checkpoint (byteorder 'big'); ema-cli reads little-endian ones "
                    "only: re-save it on a little-endian machine",
                )
            if mark != b"little":
                raise CheckpointError(path, f"corrupt: byteorder record says {mark[:16]!r}")
        pkl = self._member(f"{self.top}/data.pkl")
        assert pkl is not None
        if pkl.file_size > MAX_PICKLE_BYTES:
            raise CheckpointError(path, f"data.pkl is over {MAX_PICKLE_BYTES} bytes")
        pickled = self._small(pkl, limit=MAX_PICKLE_BYTES)
        self._offsets = {}
        root = unpickle(str(path), pickled, self._check_storage)
        named = name_tensors(str(path), root)
        tensors: dict[str, TensorInfo] = {}
        records: dict[str, TensorRecord] = {}
        users: dict[str, list[str]] = {}
        for name, value in named.tensors.items():
            record = tensor_of(value)
            records[name] = record
            tensors[name] = TensorInfo(name, numpy_dtype(record.dtype), tuple(record.size))
            users.setdefault(record.storage.key, []).append(name)
        shared = {key: tuple(names) for key, names in users.items() if len(names) > 1}
        return _Scan(self.top, self._members, self._offsets, root, named, records, tensors, shared)

    def _member(self, name: str) -> zipfile.ZipInfo | None:
        return self._members.get(name)

    def _small(self, info: zipfile.ZipInfo, limit: int = 4096) -> bytes:
        if info.file_size > limit:
            raise CheckpointError(self.path, f"corrupt: zip member {info.filename} is too large")
        if info.flag_bits & 0x1:
            raise CheckpointError(self.path, f"zip member {info.filename} is encrypted")
        try:
            return self.archive.read(info)
        except ZIP_ERRORS as e:
            raise CheckpointError(self.path, f"corrupt zip member {info.filename} ({e})") from None

    def _check_storage(self, key: str, nbytes: int) -> None:
        name = f"{self.top}/data/{key}"
        info = self._member(name)
        if info is None:
            raise CheckpointError(self.path, f"corrupt: storage '{key}' has no zip member {name}")
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            raise CheckpointError(
                self.path,
                f"zip member {name} is compressed or encrypted; torch stores storages "
                "uncompressed: re-save the checkpoint with torch.save",
            )
        if info.file_size != nbytes:
            raise CheckpointError(
                self.path,
                f"corrupt: storage '{key}' should hold {nbytes} bytes but its zip member holds "
                f"{info.file_size}",
            )
        try:
            offset = stored_data_offset(self._raw, info)
        except (zipfile.BadZipFile, EOFError, OSError) as e:
            raise CheckpointError(self.path, f"corrupt zip ({e})") from None
        if offset + nbytes > self.file_size:
            raise TruncatedCheckpointError(
                self.path,
                f"truncated: storage '{key}' ends at byte {offset + nbytes} but the file has "
                f"{self.file_size}",
            )
        self._offsets[key] = offset

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._tensors

    @property
    def non_tensors(self) -> Sequence[str]:
        return self._non_tensors

    @property
    def optimizer_prefixes(self) -> tuple[str, ...]:
        """Name prefixes of optimizer state (``optimizer_states/0/``, ``optimizer/``; ``""``
        for a whole ``optimizer.pt``)."""
        return self._optimizer_prefixes

    def is_optimizer_state(self, name: str) -> bool:
        return is_optimizer_name(name, self._optimizer_prefixes)

    @property
    def shared_tensors(self) -> Sequence[tuple[str, ...]]:
        return tuple(self.shared_storages.values())

    def tensor_record(self, name: str) -> TensorRecord:
        """Tensor ``name``'s view: its storage, offset, size and strides."""
        return self._records[name]

    def storage_offset(self, key: str) -> int:
        """Where storage ``key``'s bytes start in the file."""
        return self._offsets[key]

    def read(
        self,
        name: str,
        start: int = 0,
        stop: int | None = None,
        out: npt.NDArray[np.generic] | None = None,
    ) -> npt.NDArray[np.generic]:
        info, stop, out = self._block(name, start, stop, out)
        if stop == start:
            return out
        record = self._records[name]
        try:
            if record.contiguous:
                position = (
                    self._offsets[record.storage.key]
                    + (record.storage_offset + start) * info.dtype.itemsize
                )
                view = out.view(np.uint8).data
                if read_exact(self._fd, view, position) != len(view):
                    raise TruncatedCheckpointError(
                        self.path, "truncated: the file ended while reading this tensor", name
                    )
            else:
                self._gather(name, record, info.dtype, start, stop, out)
        except OSError as e:
            raise CheckpointError(self.path, f"read error: {e.strerror}", tensor=name) from None
        return out

    def _elements(self, record: TensorRecord, dtype: np.dtype[Any], lo: int, n: int) -> Any:
        """Storage elements ``[lo, lo + n)`` as an array of ``dtype``."""
        buf = np.empty(n, dtype=dtype)
        view = buf.view(np.uint8).data
        position = self._offsets[record.storage.key] + lo * dtype.itemsize
        if read_exact(self._fd, view, position) != len(view):
            raise TruncatedCheckpointError(
                self.path, "truncated: the file ended inside a storage", tensor=None
            )
        return buf

    def _gather(
        self,
        name: str,
        record: TensorRecord,
        dtype: np.dtype[Any],
        start: int,
        stop: int,
        out: npt.NDArray[Any],
    ) -> None:
        lo, hi = _extent(record)
        if (hi - lo) * dtype.itemsize <= STRIDED_CACHE_BYTES:
            with self._lock:
                if self._cache is None or self._cache[0] != name:
                    self._cache = None  # drop the previous span before reading the next
                    self._cache = (name, self._elements(record, dtype, lo, hi - lo))
                span = self._cache[1]
            for c0 in range(start, stop, GATHER_CHUNK):
                c1 = min(stop, c0 + GATHER_CHUNK)
                out[c0 - start : c1 - start] = span[element_positions(record, c0, c1) - lo]
            return
        window = WINDOW_BYTES // dtype.itemsize
        for c0 in range(start, stop, GATHER_CHUNK):
            c1 = min(stop, c0 + GATHER_CHUNK)
            index = element_positions(record, c0, c1)
            target = out[c0 - start : c1 - start]
            first, last = int(index.min()), int(index.max()) + 1
            for w0 in range(first, last, window):
                w1 = min(last, w0 + window)
                piece = self._elements(record, dtype, w0, w1 - w0)
                inside = (index >= w0) & (index < w1)
                target[inside] = piece[index[inside] - w0]

    def file_offset(self, name: str, start: int) -> int | None:
        record = self._records[name]
        if not record.contiguous:
            return None
        itemsize = self._tensors[name].dtype.itemsize
        return self._offsets[record.storage.key] + (record.storage_offset + start) * itemsize

    def close(self) -> None:
        self._cache = None
        identity = self.__dict__.pop("_identity", None)
        if identity is not None:
            _SCANS.release(identity)
        with contextlib.suppress(AttributeError):
            self.archive.close()
        with contextlib.suppress(AttributeError):
            self._raw.close()


def _refuse_legacy(path: Path) -> None:
    fd = open_for_reading(path, "a torch checkpoint")  # not a fifo: it would block
    try:
        with os.fdopen(fd, "rb") as f:
            head = f.read(len(_LEGACY_PREFIX))
    except OSError:
        return  # open_zip reports it
    if head == _LEGACY_PREFIX:
        raise CheckpointError(
            path,
            "a legacy (pre-1.6) torch.save file, which ema-cli does not read; re-save it with "
            "a current torch: torch.save(torch.load(f), f2)",
        )
    if head[:1] == b"\x80":
        raise CheckpointError(
            path,
            "a bare pickle, not a torch zip checkpoint; if torch.load reads it, re-save it "
            "with a current torch: torch.save(torch.load(f), f2)",
        )


# ---------------------------------------------------------------- writing


def flat_structure(
    tensors: Sequence[TensorInfo], ties: Mapping[str, TensorRecord] | None = None
) -> TorchStructure:
    """A plain state_dict (``OrderedDict`` of name -> tensor, each on its own contiguous
    storage), for outputs whose template is not a single torch checkpoint.

    ``ties`` (``tied_records``): tensors that share a storage in the template, by name -> the
    template's view. Tensors viewing one template storage share one storage here too, of the
    template storage's size, at the template's offsets and strides (storage bytes no tensor
    covers are zeros)."""
    from collections import OrderedDict

    root: OrderedDict[str, Any] = OrderedDict()
    shared: dict[int, StorageRecord] = {}  # template storage -> ours
    for i, info in enumerate(tensors):
        name = torch_dtype_name(info.dtype)
        if name is None:
            raise OptionError(f"tensor '{info.name}' is {info.dtype}, which torch cannot store")
        tied = ties.get(info.name) if ties else None
        if tied is not None:
            theirs = tied.storage
            if id(theirs) not in shared:
                shared[id(theirs)] = StorageRecord(str(i), theirs.dtype, "cpu", theirs.numel)
            root[info.name] = TensorRecord(
                shared[id(theirs)], tied.storage_offset, tuple(tied.size), tuple(tied.stride), name
            )
            continue
        legacy = name not in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz")
        legacy = legacy and name not in ("float8_e5m2fnuz", "float8_e8m0fnu", "uint16")
        legacy = legacy and name not in ("uint32", "uint64")
        storage = StorageRecord(
            str(i), name if legacy else None, "cpu", info.size if legacy else info.nbytes
        )
        stride = tuple(
            int(np.prod(info.shape[d + 1 :], dtype=np.int64)) for d in range(len(info.shape))
        )
        root[info.name] = TensorRecord(storage, 0, tuple(info.shape), stride, name)
    return TorchStructure(root, dict(root.items()))


def tied_records(
    template: CheckpointReader | None, tensors: Sequence[TensorInfo]
) -> dict[str, TensorRecord]:
    """For ``flat_structure``: the template's views of the tensors that share a storage in a
    torch template and are written under their name, dtype and shape (at least two of a
    storage; any others of it are written apart)."""
    if not isinstance(template, (TorchZipReader, TorchShardedReader)):
        return {}
    given = {info.name: info for info in tensors}
    found: dict[str, TensorRecord] = {}
    for group in template.shared_tensors:
        kept = [n for n in group if n in given and given[n] == template.tensors.get(n)]
        if len(kept) > 1:
            found.update((n, template.tensor_record(n)) for n in kept)
    return found


def check_torch_dtypes(path: Path, tensors: Sequence[TensorInfo]) -> None:
    """Refuse (``OptionError``) a tensor of a dtype torch has no name for."""
    for info in tensors:
        if torch_dtype_name(info.dtype) is None:
            raise OptionError(
                f"{path}: tensor '{info.name}' is {info.dtype}, which torch cannot store"
            )


def _field(value: int) -> int:
    """A 32-bit zip field: the value, or 0xFFFFFFFF when ZIP64 records hold it."""
    return 0xFFFFFFFF if value >= ZIP64_LIMIT else value


@dataclass
class _Member:
    name: bytes
    size: int
    data: bytes | None  # small records; None for a storage
    header: int = 0  # local header offset
    start: int = 0  # data offset
    crc: int = 0


class TorchZipFileWriter:
    """Writes a torch zip checkpoint of ``structure`` at ``target`` (a path, created or
    truncated, or a file descriptor open for reading and writing, used from offset 0 and
    truncated to the output's size). Blocks arrive through ``write`` in any order from any
    thread; ``finish()`` completes the file. No temporary file, no rename: the caller's job."""

    def __init__(
        self,
        target: Path | int,
        structure: TorchStructure,
        error_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.error_path = os.fspath(error_path if error_path is not None else str(target))
        self.structure = structure
        self._target = target
        self._owns_fd = not isinstance(target, int)
        if isinstance(target, int):
            self._fd = target
        else:
            self._fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            self._lay_out()
        except BaseException:
            self.close()
            raise
        self._lock = threading.Lock()
        self._written = 0

    # ---- layout

    def _lay_out(self) -> None:
        keys: dict[int, str] = {}
        self.storages: list[StorageRecord] = []

        def storage_key(storage: StorageRecord) -> str:
            if id(storage) not in keys:
                keys[id(storage)] = str(len(self.storages))
                self.storages.append(storage)
            return keys[id(storage)]

        try:
            pkl = TorchPickler(storage_key).dumps(self.structure.root)
        except PickleWriteError as e:
            raise OptionError(f"{self.error_path}: {e}") from None
        self._keys = keys
        top = ARCHIVE_NAME.encode()
        members = [
            _Member(top + b"/data.pkl", len(pkl), pkl),
            _Member(top + b"/.format_version", 1, b"1"),
            _Member(top + b"/.storage_alignment", 2, b"64"),
            _Member(top + b"/byteorder", 6, b"little"),
        ]
        self._storage_members: dict[int, _Member] = {}
        for storage in self.storages:
            member = _Member(top + b"/data/" + keys[id(storage)].encode(), storage.nbytes, None)
            members.append(member)
            self._storage_members[id(storage)] = member
        members.append(_Member(top + b"/version", 2, b"3\n"))
        self.members = members
        position = 0
        headers: list[bytes] = []
        for member in members:
            member.header = position
            zip64 = b""
            if member.size >= ZIP64_LIMIT:
                zip64 = struct.pack("<HHQQ", 1, 16, member.size, member.size)
            base = position + 30 + len(member.name) + len(zip64) + 4
            pad = -base % 64
            extra = zip64 + struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # torch's "FB" padding
            member.start = base + pad
            if member.data is not None:
                member.crc = zlib.crc32(member.data)
            headers.append(self._local_header(member, extra))
            position = member.start + member.size
        self.directory_offset = position
        self.total_size = position + len(self._directory())
        # Tensors: written in place, or staged after the end of the zip.
        users: dict[int, int] = {}
        for value in self.structure.tensors.values():
            record = tensor_of(value)
            users[id(record.storage)] = users.get(id(record.storage), 0) + 1
        self._places: dict[str, tuple[int, int]] = {}  # name -> (file offset, itemsize)
        self._staged: dict[str, int] = {}
        staging = -self.total_size % 64 + self.total_size
        needs_source: list[StorageRecord] = []
        for name, value in self.structure.tensors.items():
            record = tensor_of(value)
            itemsize = numpy_dtype(record.dtype).itemsize
            member = self._storage_members[id(record.storage)]
            sole = users[id(record.storage)] == 1
            if sole and record.contiguous:
                self._places[name] = (member.start + record.storage_offset * itemsize, itemsize)
                covers = record.storage_offset == 0 and record.numel * itemsize == member.size
            else:
                self._places[name] = (staging, itemsize)
                self._staged[name] = staging
                staging += -(record.numel * itemsize) % 64 + record.numel * itemsize
                covers = False
            if not covers and record.storage not in needs_source:
                needs_source.append(record.storage)
        self._staging_end = staging
        self._expected = sum(
            tensor_of(v).numel * numpy_dtype(tensor_of(v).dtype).itemsize
            for v in self.structure.tensors.values()
        )
        os.ftruncate(self._fd, 0)
        os.ftruncate(self._fd, self._staging_end)
        for member, header in zip(members, headers, strict=True):
            write_exact(self._fd, memoryview(header), member.header)
            if member.data is not None:
                write_exact(self._fd, memoryview(member.data), member.start)
        source = self.structure.source
        if source is not None:
            for storage in needs_source:
                self._copy_from(source, storage)

    def _copy_from(self, source: TorchZipReader, storage: StorageRecord) -> None:
        """Start a storage from the template's bytes (what no tensor covers stays so)."""
        member = self._storage_members[id(storage)]
        origin = source.storage_offset(storage.key)
        for done in range(0, member.size, _COPY_BYTES):
            n = min(_COPY_BYTES, member.size - done)
            chunk = bytearray(n)
            if read_exact(source._fd, memoryview(chunk), origin + done) != n:
                raise TruncatedCheckpointError(source.path, "truncated while copying a storage")
            write_exact(self._fd, memoryview(chunk), member.start + done)

    @staticmethod
    def _zip64(member: _Member) -> bool:
        return member.size >= ZIP64_LIMIT or member.header >= ZIP64_LIMIT

    def _local_header(self, member: _Member, extra: bytes) -> bytes:
        size = _field(member.size)
        needed = 45 if member.size >= ZIP64_LIMIT else 20
        return (
            struct.pack(
                "<4sHHHHHIIIHH",
                b"PK\x03\x04",
                needed,
                0,
                0,
                0,
                _DOS_DATE,
                member.crc,
                size,
                size,
                len(member.name),
                len(extra),
            )
            + member.name
            + extra
        )

    def _directory(self) -> bytes:
        out = bytearray()
        for member in self.members:
            fields = []
            if member.size >= ZIP64_LIMIT:
                fields += [member.size, member.size]
            if member.header >= ZIP64_LIMIT:
                fields.append(member.header)
            extra = (
                struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""
            )
            size = _field(member.size)
            version = 45 if fields else 20
            out += struct.pack(
                "<4sHHHHHHIIIHHHHHII",
                b"PK\x01\x02",
                45,
                version,
                0,
                0,
                0,
                _DOS_DATE,
                member.crc,
                size,
                size,
                len(member.name),
                len(extra),
                0,
                0,
                0,
                0,
                _field(member.header),
            )
            out += member.name + extra
        count = len(self.members)
        offset = self.directory_offset
        size = len(out)
        end64 = offset + size
        out += struct.pack(
            "<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, size, offset
        )
        out += struct.pack("<4sIQI", b"PK\x06\x07", 0, end64, 1)
        out += struct.pack(
            "<4sHHHHIIH",
            b"PK\x05\x06",
            0,
            0,
            min(count, 0xFFFF),
            min(count, 0xFFFF),
            _field(size),
            _field(offset),
            0,
        )
        return bytes(out)

    # ---- writing

    def write(self, name: str, start: int, data: memoryview) -> None:
        """Store ``data`` (the raw bytes of elements from ``start``) of tensor ``name``."""
        offset, itemsize = self._places[name]
        write_exact(self._fd, data, offset + start * itemsize)
        with self._lock:
            self._written += len(data)

    def finish(self) -> None:
        """Place staged tensors, checksum the storages, write the zip directory and cut the
        file to its size."""
        if self._written != self._expected:
            raise RuntimeError(
                f"internal error: wrote {self._written} of {self._expected} bytes of "
                f"{self.error_path}"
            )
        groups: dict[int, list[str]] = {}
        for name in self._staged:
            storage = tensor_of(self.structure.tensors[name]).storage
            groups.setdefault(id(storage), []).append(name)
        for storage in self.storages:
            if id(storage) in groups:
                self._place(storage, groups[id(storage)])
        for storage in self.storages:
            member = self._storage_members[id(storage)]
            crc = 0
            for done in range(0, member.size, _COPY_BYTES):
                n = min(_COPY_BYTES, member.size - done)
                chunk = bytearray(n)
                read_exact(self._fd, memoryview(chunk), member.start + done)
                crc = zlib.crc32(chunk, crc)
            member.crc = crc
            write_exact(self._fd, memoryview(struct.pack("<I", crc)), member.header + 14)
        write_exact(self._fd, memoryview(self._directory()), self.directory_offset)
        os.ftruncate(self._fd, self.total_size)

    def _place(self, storage: StorageRecord, names: list[str]) -> None:
        """Scatter the staged tensors of one storage into it, window by window, then check
        that each reads back as given (tied tensors given different values are refused)."""
        member = self._storage_members[id(storage)]
        for w0 in range(0, max(member.size, 1), WINDOW_BYTES):
            w1 = min(member.size, w0 + WINDOW_BYTES)
            window = np.zeros(w1 - w0, dtype=np.uint8)
            read_exact(self._fd, window.data, member.start + w0)
            for verify in (False, True):
                for name in names:
                    if not self._scatter(name, window, w0, w1, verify):
                        others = [n for n in names if n != name]
                        raise CheckpointError(
                            self.error_path,
                            f"shares storage with {', '.join(repr(n) for n in others)} in the "
                            "template but was given different values where they overlap; tied "
                            "tensors must be averaged alike (select all of them or none)",
                            tensor=name,
                        )
            write_exact(self._fd, window.data, member.start + w0)

    def _scatter(
        self, name: str, window: npt.NDArray[np.uint8], w0: int, w1: int, verify: bool
    ) -> bool:
        record = tensor_of(self.structure.tensors[name])
        itemsize = numpy_dtype(record.dtype).itemsize
        staged = self._staged[name]
        lanes = np.arange(itemsize, dtype=np.int64)
        for c0 in range(0, record.numel, GATHER_CHUNK):
            c1 = min(record.numel, c0 + GATHER_CHUNK)
            at = element_positions(record, c0, c1) * itemsize
            inside = (at >= w0) & (at < w1)
            if not inside.any():
                continue
            values = np.empty((c1 - c0) * itemsize, dtype=np.uint8)
            read_exact(self._fd, values.data, staged + c0 * itemsize)
            rows = values.reshape(c1 - c0, itemsize)[inside]
            where = (at[inside] - w0)[:, None] + lanes
            if verify:
                if not np.array_equal(window[where], rows):
                    return False
            else:
                window[where] = rows
        return True

    @property
    def data_bytes(self) -> int:
        """The bytes of storage data the file holds."""
        return sum(storage.nbytes for storage in self.storages)

    def close(self) -> None:
        """Close the file (a writer made on a path may ``reopen`` it)."""
        if self._owns_fd and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1

    def reopen(self) -> None:
        """Open the file again after ``close``, to go on writing (a writer made on a path)."""
        if not self._owns_fd or isinstance(self._target, int):
            raise ValueError("only a writer made on a path reopens its file")
        if self._fd < 0:
            self._fd = os.open(self._target, os.O_RDWR)


class TorchZipWriter(CheckpointWriter):
    """The ``CheckpointWriter`` for torch outputs: a ``TorchZipFileWriter`` on a temporary
    sibling (``stage_file``), published by the base class's ``commit()``. With a torch template the output keeps its
    structure (``metadata`` is not stored: torch files have no place for it); with another
    template it is a plain state_dict of the given tensors (tensors sharing a storage in a
    sharded torch template still share one)."""

    keeps_shared_storage = True

    def begin(self) -> None:
        if isinstance(self.template, TorchZipReader):
            structure = self.template.structure
        else:
            structure = flat_structure(self.tensors, tied_records(self.template, self.tensors))
        self._file, self._tmp = self.stage_file()
        self._inner = TorchZipFileWriter(self._file.fileno(), structure, error_path=self.path)

    @classmethod
    def check(
        cls, path: Path, tensors: Sequence[TensorInfo], template: CheckpointReader | None
    ) -> None:
        check_torch_dtypes(path, tensors)
        if isinstance(template, TorchZipReader):
            given = {t.name: t for t in tensors}
            theirs = template.tensors
            if set(given) != set(theirs):
                extra = sorted(set(given) - set(theirs))[:3]
                missing = sorted(set(theirs) - set(given))[:3]
                raise OptionError(
                    f"{path}: a torch output keeps the tensors of its template "
                    f"{template.path} (not in it: {extra}; missing: {missing})"
                )
            for name, info in given.items():
                if info.dtype != theirs[name].dtype or info.shape != theirs[name].shape:
                    raise OptionError(
                        f"{path}: tensor '{name}' differs in dtype or shape from the template"
                    )
            try:
                check_savable(template.structure.root)
            except PickleWriteError as e:
                raise OptionError(f"{path}: {e}") from None

    @classmethod
    def carries_non_tensors(cls, template: CheckpointReader) -> bool:
        return isinstance(template, TorchZipReader)

    def write(self, name: str, start: int, values: npt.NDArray[np.generic]) -> None:
        data = self._block_bytes(name, start, values)
        try:
            self._inner.write(name, start, data)
        except OSError as e:
            raise OutputError(self.path, e) from None
        self._wrote(len(data))

    def finish(self) -> list[tuple[Path, Path]]:
        self._inner.finish()
        self._file.close()
        return [(self._tmp, self.path)]

    def _discard(self) -> None:
        file = getattr(self, "_file", None)
        if file is not None:
            file.close()


# ---------------------------------------------------------------- Hugging Face folders


class TorchShardedReader(ShardedReader):
    """A folder holding ``pytorch_model.bin.index.json`` and its ``.bin`` shards (or one
    ``pytorch_model.bin``), as one checkpoint; every rule of ``ShardedReader`` holds. Tensors
    sharing a storage within a shard are ``shared_tensors``; what a shard holds besides tensors
    is ``non_tensors`` (``<shard>: ...``)."""

    format_name = "torch (sharded)"
    layout = TORCH_LAYOUT
    shard_reader = TorchZipReader

    def __init__(self, path: Path, max_open_shards: int = DEFAULT_OPEN_SHARDS) -> None:
        self._groups: list[tuple[str, ...]] = []
        self._records: dict[str, TensorRecord] = {}
        self._non_tensors: list[str] = []
        super().__init__(path, max_open_shards)

    def _scanned(self, shard: str, reader: CheckpointReader, wanted: set[str]) -> None:
        assert isinstance(reader, TorchZipReader)
        for group in reader.shared_tensors:
            kept = tuple(name for name in group if name in wanted)
            if len(kept) > 1:
                self._groups.append(kept)
        for name in reader.tensors:
            if name in wanted:
                self._records[name] = reader.tensor_record(name)
        self._non_tensors.extend(f"{shard}: {what}" for what in reader.non_tensors)

    @property
    def shared_tensors(self) -> Sequence[tuple[str, ...]]:
        return tuple(self._groups)

    @property
    def non_tensors(self) -> Sequence[str]:
        return tuple(self._non_tensors)

    def tensor_record(self, name: str) -> TensorRecord:
        """Tensor ``name``'s view in its shard: its storage, offset, size and strides."""
        return self._records[name]


class TorchShard(ShardFile):
    """One ``.bin`` shard being written: a ``TorchZipFileWriter`` whose file is closed between
    uses (the folder writer's handle cache reopens it)."""

    def __init__(self, path: Path, structure: TorchStructure, error_path: Path) -> None:
        self._writer = TorchZipFileWriter(path, structure, error_path=error_path)
        self._writer.close()
        self.data_bytes = self._writer.data_bytes

    def open(self) -> None:
        self._writer.reopen()

    def close(self) -> None:
        self._writer.close()

    def write(self, name: str, start: int, data: memoryview) -> None:
        self._writer.write(name, start, data)

    def finish(self) -> None:
        self._writer.finish()


class TorchShardedWriter(ShardedWriter):
    """Writes a Hugging Face model folder of torch weights, as ``save_pretrained(...,
    safe_serialization=False)`` did (transformers 4.x): ``pytorch_model.bin``, or shards
    ``pytorch_model-00001-of-0000N.bin`` with ``pytorch_model.bin.index.json``, and the
    template's side files. Each shard is a plain state_dict that ``torch.load(weights_only=True)``
    loads; tied tensors of a torch template stay in one shard, sharing one storage
    (``flat_structure``). The index's ``total_size`` counts each storage once. Metadata is not
    stored: torch files have no place for it."""

    layout = TORCH_LAYOUT
    keeps_shared_storage = True

    def begin(self) -> None:
        self._ties = tied_records(self.template, self.tensors)
        super().begin()

    def _together(self) -> Sequence[Sequence[str]]:
        groups: dict[int, list[str]] = {}
        for name, record in self._ties.items():
            groups.setdefault(id(record.storage), []).append(name)
        return list(groups.values())

    def _shard_file(self, path: Path, tensors: Sequence[TensorInfo]) -> ShardFile:
        return TorchShard(path, flat_structure(tensors, self._ties), error_path=self.path)

    @classmethod
    def check(
        cls, path: Path, tensors: Sequence[TensorInfo], template: CheckpointReader | None
    ) -> None:
        check_torch_dtypes(path, tensors)


def write_torch_checkpoint(
    target: Path | int,
    structure: TorchStructure,
    arrays: Mapping[str, npt.NDArray[Any]],
) -> None:
    """Write every tensor of ``structure`` from whole arrays (tests and small tools)."""
    writer = TorchZipFileWriter(target, structure)
    try:
        for name, value in structure.tensors.items():
            record = tensor_of(value)
            array = np.ascontiguousarray(arrays[name]).reshape(-1)
            if array.dtype != numpy_dtype(record.dtype) or array.size != record.numel:
                raise ValueError(f"{name}: expected {record.numel} of {record.dtype}")
            check_range(TensorInfo(name, array.dtype, (array.size,)), 0, array.size)
            writer.write(name, 0, array.view(np.uint8).data)
        writer.finish()
    finally:
        writer.close()
