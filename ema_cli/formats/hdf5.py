"""HDF5 checkpoints: Keras 3 ``.weights.h5``, legacy Keras ``.h5``, and any other HDF5 file.

Every numeric dataset is a tensor named by its path without the leading ``/``. The layouts Keras
writes (checked against Keras 3.15 and its legacy saver):

* Keras 3 ``.weights.h5``: ``layers/<layer>/vars/<i>`` (``<layer>`` is the snake-cased class
  name, deduplicated ``dense_1``; each ``vars`` group has a ``name`` attribute, the layer's
  name), the model's own ``vars``, and the optimizer's ``optimizer/vars/<i>``. No root attributes.
* legacy ``.h5`` full model: root attributes ``model_config``, ``training_config``,
  ``keras_version``, ``backend`` (str); ``model_weights/`` with ``layer_names`` (an array of byte
  strings, split into ``layer_names0``, ``layer_names1``, ... when larger than 64 kB), and one
  group per layer whose ``weight_names`` attribute lists its datasets in load order (by path,
  ``model_weights/dense/sequential/dense/kernel``); optimizer state in ``optimizer_weights/``.
  A legacy weights-only file has ``layer_names`` and the layer groups at the root.
* bfloat16 has no HDF5 type: h5py stores it as a 2-byte opaque type (empty tag). Keras 3 marks
  those datasets with a ``dtype="bfloat16"`` attribute; the legacy saver does not. We read every
  2-byte opaque dataset as bfloat16 (and an opaque dataset whose ``dtype`` attribute names
  another ml_dtypes type as that type), and write them back opaque, unchanged in kind.

The writer rebuilds the template (the replay's last checkpoint) exactly: every group, attribute,
link and non-tensor dataset in the template's order and with its creation properties, so Keras
loads the output; tensor datasets keep their type, shape, chunking and filters and are filled
block by block. Tensors the template does not hold (another format's names, ``--names shadow``)
are created under their paths, contiguous, with the intermediate groups. h5py serialises its
calls behind one global lock; we take our own per file too, so a block's selection and its I/O
are one step.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

import h5py
import ml_dtypes
import numpy as np
import numpy.typing as npt
from h5py import h5, h5a, h5d, h5f, h5g, h5l, h5o, h5p, h5s, h5t

from ema_cli.atomic import check_regular
from ema_cli.checkpoint import TensorInfo
from ema_cli.errors import CheckpointError, OptionError, OutputError, TruncatedCheckpointError
from ema_cli.formats.base import (
    NUMERIC_DTYPES,
    CheckpointReader,
    CheckpointWriter,
    SharedScans,
    file_identity,
    read_exact,
)

#: The attribute Keras 3 puts on datasets whose numpy dtype HDF5 cannot name.
DTYPE_ATTRIBUTE = "dtype"

#: What every HDF5 file starts with (after an optional user block).
_SIGNATURE = b"\x89HDF\r\n\x1a\n"


#: Dtypes stored as opaque bytes, by the name Keras writes in the ``dtype`` attribute.
_OPAQUE_DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(getattr(ml_dtypes, name))
    for name in (
        "bfloat16",
        "float8_e4m3fn",
        "float8_e4m3fnuz",
        "float8_e4m3b11fnuz",
        "float8_e5m2",
        "float8_e5m2fnuz",
    )
    if hasattr(ml_dtypes, name)
}
_BFLOAT16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)

#: Per-dataset chunk cache of written files: compressed chunks written by several blocks are
#: compressed once when they stay cached between those writes.
_WRITE_CHUNK_CACHE_BYTES = 8 << 20
#: Datasets kept open per file. An open chunked dataset holds a cache of its chunks, so keeping
#: a model's every dataset open would keep the model; the replay works tensor by tensor.
_OPEN_DATASETS = 4


class _OpenDatasets:
    """The few datasets in use, opened by path on demand, least recently used closed first.

    Callers hold the file's lock.
    """

    def __init__(self, file: h5py.File, size: int = _OPEN_DATASETS) -> None:
        self._file = file
        self._size = size
        self._open: OrderedDict[str, h5d.DatasetID] = OrderedDict()

    def get(self, name: str) -> h5d.DatasetID:
        dataset = self._open.pop(name, None)
        if dataset is None:
            dataset = h5d.open(self._file.id, ("/" + name).encode("utf-8"))
            while len(self._open) >= self._size:
                self._open.popitem(last=False)  # dropping the last reference closes it
        self._open[name] = dataset
        return dataset

    def clear(self) -> None:
        self._open.clear()


def _flat_boxes(
    shape: tuple[int, ...], start: int, stop: int
) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Hyperslabs ``(offset, count)`` that together are flat C-order elements ``[start, stop)``.

    A partial leading row, a block of whole rows, a partial trailing row, recursively: at most
    ``2 * ndim - 1`` boxes, whose union HDF5 visits in C order, matching a 1-D memory buffer.
    """
    if len(shape) == 1:
        yield (start,), (stop - start,)
        return
    inner = int(np.prod(shape[1:], dtype=np.int64))
    first_row, first_offset = divmod(start, inner)
    last_row, last_offset = divmod(stop, inner)
    rest = len(shape) - 1
    if first_row == last_row:
        for offset, count in _flat_boxes(shape[1:], first_offset, last_offset):
            yield (first_row, *offset), (1, *count)
        return
    if first_offset:
        for offset, count in _flat_boxes(shape[1:], first_offset, inner):
            yield (first_row, *offset), (1, *count)
        first_row += 1
    if last_row > first_row:
        yield (first_row, *(0,) * rest), (last_row - first_row, *shape[1:])
    if last_offset:
        for offset, count in _flat_boxes(shape[1:], 0, last_offset):
            yield (last_row, *offset), (1, *count)


def _select_flat_range(
    dataset: h5d.DatasetID, shape: tuple[int, ...], start: int, stop: int
) -> tuple[h5s.SpaceID, h5s.SpaceID]:
    """File and memory dataspaces for elements ``[start, stop)`` of ``dataset``."""
    file_space = dataset.get_space()
    if shape:
        file_space.select_none()
        for offset, count in _flat_boxes(shape, start, stop):
            file_space.select_hyperslab(offset, count, op=h5s.SELECT_OR)
    else:
        file_space.select_all()
    return file_space, h5s.create_simple((stop - start,))


def _tensor_dtype(dataset: h5d.DatasetID, file_type: h5t.TypeID) -> np.dtype[Any] | None:
    """The numpy dtype of a tensor dataset (of type ``file_type``), or None when the dataset is
    not a tensor."""
    if file_type.get_class() == h5t.OPAQUE:
        size = file_type.get_size()
        marker = _dtype_marker(dataset)
        if marker in _OPAQUE_DTYPES:
            marked = _OPAQUE_DTYPES[marker]
            return marked if marked.itemsize == size else None
        return _BFLOAT16 if size == 2 else None
    try:
        dtype = file_type.dtype
    except (TypeError, ValueError):  # a type numpy cannot express
        return None
    native = dtype.newbyteorder("=")
    return native if native in NUMERIC_DTYPES else None


def _dtype_marker(dataset: h5d.DatasetID) -> str | None:
    """The dataset's ``dtype`` attribute when it is one string (Keras 3's marker of the
    ml_dtypes type behind opaque bytes), read as ``dataset.attrs.get("dtype")`` reads it."""
    if not h5a.exists(dataset, DTYPE_ATTRIBUTE.encode()):
        return None
    try:
        value = _attribute_value(dataset, DTYPE_ATTRIBUTE.encode())
    except (TypeError, ValueError):  # a type numpy cannot express: no marker
        return None
    if value is None or value.ndim:
        return None
    marker: object = value[()]
    if isinstance(marker, bytes):  # fixed-length (numpy.bytes_) and variable-length strings
        return marker.decode("utf-8", "replace")
    return marker if isinstance(marker, str) else None


def _attribute_value(obj: h5o.ObjectID, name: bytes) -> npt.NDArray[Any] | None:
    """An attribute's stored values (None for an empty dataspace), read with the libhdf5 calls
    h5py's ``obj.attrs[name]`` makes, variable-length strings left as bytes. ``KeyError`` when
    there is no such attribute."""
    attr = h5a.open(obj, name)
    shape = attr.shape
    if shape is None:
        return None
    dtype = attr.dtype
    memory_type = h5t.py_create(dtype)
    if dtype.subdtype is not None:  # an array type: numpy has no top-level array dtype
        dtype, inner = dtype.subdtype
        shape = shape + inner
    values = np.zeros(shape, dtype=dtype)
    attr.read(values, mtype=memory_type)
    return values


def _stored_opaque(dtype: np.dtype[Any]) -> bool:
    """Whether a tensor of ``dtype`` is written as opaque bytes: ml_dtypes' types, which HDF5
    has no type for (by name: ml_dtypes gives ``float8_e5m2`` the kind ``f``, not ``V``)."""
    return dtype.kind == "V" or dtype.name in _OPAQUE_DTYPES


def _memory_type(file_type: h5t.TypeID, dtype: np.dtype[Any]) -> h5t.TypeID:
    """How a tensor's elements sit in our buffers: opaque data as its own bytes (no conversion
    exists between opaque types), numbers in native order (HDF5 converts)."""
    return file_type if file_type.get_class() == h5t.OPAQUE else h5t.py_create(dtype)


def _describe_type(file_type: h5t.TypeID) -> str:
    try:
        dtype = file_type.dtype
    except (TypeError, ValueError):
        return "a dataset of a type numpy cannot express"
    if h5py.check_string_dtype(dtype) is not None:
        return "a string dataset"
    return f"a dataset of type {dtype}"


def _open_error(path: Path, prefix: str, error: OSError | ValueError) -> CheckpointError:
    """One line naming the file for an h5py open failure."""
    text = str(error)
    if isinstance(error, FileNotFoundError):
        return CheckpointError(path, "no such file")
    if isinstance(error, IsADirectoryError):
        return CheckpointError(path, "is a directory, not an HDF5 file")
    if isinstance(error, PermissionError):
        return CheckpointError(path, "cannot open: permission denied")
    if "truncated file" in text:
        sizes = re.search(r"\beof = (\d+).*stored_eof = (\d+)", text)
        detail = (
            f"the file has {sizes[1]} bytes but its HDF5 superblock says {sizes[2]}"
            if sizes
            else text.splitlines()[0]
        )
        return TruncatedCheckpointError(path, f"{prefix}truncated HDF5 file: {detail}")
    if "signature not found" in text:
        return CheckpointError(path, f"{prefix}not an HDF5 file (no HDF5 signature)")
    return CheckpointError(path, f"{prefix}cannot open as HDF5: {text.splitlines()[0]}")


def _first_line(error: BaseException) -> str:
    text = error.args[0] if isinstance(error, KeyError) and error.args else error  # unquoted
    lines = str(text).strip().splitlines()
    return lines[0] if lines else type(error).__name__


@dataclass(frozen=True)
class _Scan:
    """What ``HDF5Reader._scan`` found in a file (shared by its readers, never changed)."""

    tensors: dict[str, TensorInfo]
    non_tensors: list[str]
    metadata: dict[str, str]
    optimizer_prefixes: tuple[str, ...]
    format_name: str
    raw: dict[str, int]


#: The scans of the HDF5 files open now (``SharedScans``).
_SCANS: SharedScans[_Scan] = SharedScans()


class HDF5Reader(CheckpointReader):
    """An HDF5 file, from a path or (inside a ``.keras`` archive) an open binary file.

    ``member`` names the file inside ``path`` for messages when reading from ``file``.
    """

    format_name = "HDF5"
    thread_safe_reads = True  # contiguous data by positioned reads, the rest under self._lock

    _tensors: dict[str, TensorInfo]
    _memory_types: dict[str, h5t.TypeID]
    _non_tensors: list[str]
    _metadata: dict[str, str]
    _optimizer_prefixes: tuple[str, ...]

    def __init__(
        self, path: Path, file: IO[bytes] | None = None, member: str | None = None
    ) -> None:
        super().__init__(path)
        self._prefix = f"{member}: " if member else ""
        self._lock = threading.Lock()
        self._fileobj = file
        try:
            if file is None:
                check_regular(path, "an HDF5 file")  # HDF5 would block on a fifo
                self.file = h5py.File(path, "r", locking=False)
            else:
                self.file = h5py.File(file, "r")
        except (OSError, ValueError) as e:  # ValueError: a wild address, through a file object
            raise self._classify_open_error(e, file) from None
        try:
            # The file (a .keras archive for a member) as it is now: rehearsed once, by the
            # first open, which the plan makes in the main thread. The replay's workers reopen
            # it; a fork from a worker thread could deadlock on a lock another thread holds.
            st = os.fstat(self.file.id.get_vfd_handle()) if file is None else os.stat(path)
            identity = file_identity(st) + ((0,) if file is None else (1, hash(member)))
            self._identity: tuple[int, ...] | None = None
            self._share_scan(identity, file is None)
        except (KeyError, OSError, RuntimeError, ValueError) as e:
            self.close()
            raise CheckpointError(
                path, f"{self._prefix}corrupt HDF5 file ({_first_line(e)})"
            ) from None
        except BaseException:
            self.close()
            raise

    def _share_scan(self, identity: tuple[int, ...], by_path: bool) -> None:
        """What the file holds, found by the first reader of this file (as it is now) and
        shared by every reader of it opened while one is open: the replay's workers each open
        every checkpoint again, and the walk of a file's objects (``_Walk``) costs about 6 ms
        per 125 datasets under h5py's global lock, which every other libhdf5 call waits for.
        A file the children ahead rehearsed comes with their scan (``_Ahead``), not walked
        again here."""

        def scan() -> _Scan:
            ahead = rehearse_reading(self.file, self.path, identity)
            if ahead is not None and by_path:
                return ahead
            return _scan_file(self.file, self.path, self._prefix, by_path)

        shared = _SCANS.acquire(identity, scan)
        self._identity = identity
        self._memory_types = {}  # found on each tensor's first read through libhdf5
        self._tensors = shared.tensors
        self._non_tensors = shared.non_tensors
        self._metadata = shared.metadata
        self._optimizer_prefixes = shared.optimizer_prefixes
        self.format_name = shared.format_name
        self._raw = shared.raw
        self._datasets = _OpenDatasets(self.file)
        if self._raw:
            self._fd = self.file.id.get_vfd_handle()  # the file libhdf5 reads: same bytes

    def _classify_open_error(
        self, error: OSError | ValueError, file: IO[bytes] | None
    ) -> CheckpointError:
        # A file cut inside its 8-byte signature has none to find, but is still a truncation.
        try:
            if file is None:
                with open(self.path, "rb") as f:
                    head = f.read(len(_SIGNATURE))
            else:
                file.seek(0)
                head = file.read(len(_SIGNATURE))
        except OSError:
            head = b"-"
        if len(head) < len(_SIGNATURE) and _SIGNATURE.startswith(head):
            what = "empty" if not head else f"only {len(head)} bytes"
            return TruncatedCheckpointError(
                self.path, f"{self._prefix}truncated HDF5 file ({what})"
            )
        return _open_error(self.path, self._prefix, error)

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._tensors

    @property
    def metadata(self) -> Mapping[str, str]:
        """The root group's string attributes (a legacy model's ``model_config``, ...)."""
        return self._metadata

    def is_optimizer_state(self, name: str) -> bool:
        return bool(self._optimizer_prefixes) and name.startswith(self._optimizer_prefixes)

    @property
    def optimizer_prefixes(self) -> tuple[str, ...]:
        """Keras optimizer state: ``optimizer/`` (Keras 3), ``optimizer_weights/`` (legacy)."""
        return self._optimizer_prefixes

    @property
    def non_tensors(self) -> Sequence[str]:
        """Datasets that are not tensors and links, which only an HDF5 output can carry."""
        return self._non_tensors

    @property
    def hdf5_source(self) -> HDF5Reader:
        """The HDF5 file a writer copies structure from (a ``.keras`` reader returns its own)."""
        return self

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
        extent = self._raw.get(name)
        if extent is not None:  # the hot path: no libhdf5, no lock
            itemsize = info.dtype.itemsize
            data = out.reshape(-1).view(np.uint8).data
            try:
                got = read_exact(self._fd, data, extent + start * itemsize)
            except OSError as e:
                raise CheckpointError(
                    self.path, f"{self._prefix}read error: {e.strerror}", tensor=name
                ) from None
            if got != len(data):
                raise TruncatedCheckpointError(
                    self.path,
                    f"{self._prefix}truncated: the file ended while reading this tensor",
                    tensor=name,
                )
            return out
        with self._lock:
            try:
                dataset = self._datasets.get(name)
                memory_type = self._memory_types.get(name)
                if memory_type is None:
                    memory_type = _memory_type(dataset.get_type(), info.dtype)
                    self._memory_types[name] = memory_type
                file_space, memory_space = _select_flat_range(dataset, info.shape, start, stop)
                dataset.read(memory_space, file_space, out, memory_type)
            except (OSError, RuntimeError, ValueError) as e:
                raise TruncatedCheckpointError(
                    self.path,
                    f"{self._prefix}cannot read its data, the file is truncated or corrupt "
                    f"({_first_line(e)})",
                    tensor=name,
                ) from None
        return out

    def file_offset(self, name: str, start: int) -> int | None:
        extent = self._raw.get(name)
        return None if extent is None else extent + start * self._tensors[name].dtype.itemsize

    def userblock(self) -> bytes:
        """The bytes before the HDF5 superblock (usually none)."""
        size = self.file.id.get_create_plist().get_userblock()
        if not size:
            return b""
        with self._lock:
            if self._fileobj is not None:
                self._fileobj.seek(0)
                return self._fileobj.read(size)
            with open(self.path, "rb") as f:
                return f.read(size)

    def close(self) -> None:
        identity, self._identity = getattr(self, "_identity", None), None
        if identity is not None:
            _SCANS.release(identity)
        with contextlib.suppress(Exception):
            self._datasets.clear()
        with contextlib.suppress(Exception):
            self.file.close()


def _output_error(path: Path, error: OSError) -> OutputError:
    """An HDF5 write failure as one short line: HDF5's own message carries the time, the file
    descriptor and a buffer address; its ``errno = N`` is what the user needs."""
    found = re.search(r"errno = (\d+)", str(error))
    if found:
        code = int(found[1])
        error = OSError(code, os.strerror(code))
    return OutputError(path, error)


def _scan_file(
    file: h5py.File, path: Path, prefix: str, by_path: bool, report: int | None = None
) -> _Scan:
    """What ``HDF5Reader`` needs to know of ``file``: the walk of its objects (``_Walk``; with
    ``report``, the rehearsal's walk, which also reads every attribute), its root's string
    attributes, its optimizer groups and what kind of HDF5 file it is, and (``by_path``: a
    file of its own, not a member read through a file object) where its raw tensors are."""
    walk = _Walk(path, prefix, report)
    walk.group(h5o.open(file.id, b"/"), "")  # as h5py.File iterates the root
    metadata = {
        key: value
        for key, value in ((k, _string_attribute(file, k)) for k in file.attrs)
        if value is not None
    }
    prefixes = []
    if isinstance(file.get("optimizer/vars"), h5py.Group):
        prefixes.append("optimizer/")  # Keras 3: the model's optimizer attribute
    if isinstance(file.get("optimizer_weights"), h5py.Group):
        prefixes.append("optimizer_weights/")  # legacy Keras full model
    format_name = HDF5Reader.format_name
    if "model_weights" in file and "layer_names" in file["model_weights"].attrs:
        format_name = "HDF5 (legacy Keras model)"
    elif "layer_names" in file.attrs:
        format_name = "HDF5 (legacy Keras weights)"
    elif "optimizer/" in prefixes or isinstance(file.get("layers"), h5py.Group):
        format_name = "HDF5 (Keras weights)"
    raw = _raw_extents(file, walk.contiguous, walk.tensors) if by_path else {}
    return _Scan(walk.tensors, walk.non_tensors, metadata, tuple(prefixes), format_name, raw)


def _raw_extents(
    file: h5py.File, contiguous: Mapping[str, int], tensors: Mapping[str, TensorInfo]
) -> dict[str, int]:
    """Tensors whose elements HDF5 keeps as they are in one contiguous piece of the file
    (contiguous layout, nothing external, stored in our buffers' own type and byte order,
    entirely inside the file), by the file offset of their first byte. ``read`` fetches
    these with one positioned read of the file's own descriptor, as the safetensors reader
    does, instead of through libhdf5 (which serialises every call behind h5py's lock and
    copied 4x slower per byte, benchmarks/RESULTS.md); every other tensor goes through
    libhdf5, which also reports a truncated one."""
    if file.id.get_create_plist().get_userblock():
        return {}  # keep offsets simple: HDF5 addresses then start after the user block
    file_size = os.fstat(file.id.get_vfd_handle()).st_size
    return {
        name: offset
        for name, offset in contiguous.items()
        if 0 < offset <= file_size - tensors[name].nbytes
    }


def _string_attribute(obj: h5py.HLObject, key: str) -> str | None:
    try:
        value = obj.attrs[key]
    except (OSError, TypeError, ValueError):
        return None
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


class _Walk:
    """What a walk of a file's objects finds: its tensors (with the file offsets of those stored
    contiguously), and the rest as lines for ``non_tensors``.

    Every group's links in h5py's order (creation order where the group tracks it, else by
    name), depth first; each object once (a second hard link is noted, not followed). Made of
    h5py's low-level calls (h5l, h5o, h5d, h5a), making the libhdf5 calls h5py's high-level
    walk made, in the same order, so a damaged file fails the same way: h5py's ``Group``,
    ``Dataset`` and ``AttributeManager`` objects around them cost about 0.2 ms per object (the
    walk of a 125-dataset file took 26 ms, now 6). With ``report`` (a pipe) it is the
    rehearsal of that walk in a child (``_rehearse_reading``): each object's path is written
    to the pipe before libhdf5 touches it, and every attribute's value is read too.
    """

    def __init__(self, path: Path, prefix: str, report: int | None = None) -> None:
        self.path = path
        self.prefix = prefix
        self.report = report
        self.tensors: dict[str, TensorInfo] = {}
        self.non_tensors: list[str] = []
        self.contiguous: dict[str, int] = {}
        self.seen: dict[tuple[int, int], str] = {}  # (file, address) -> the first path to it

    def group(self, group: h5g.GroupID, prefix: str) -> None:
        for raw, kind in _links(group):
            try:
                name = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise CheckpointError(
                    self.path,
                    f"{self.prefix}corrupt HDF5 file: the name "
                    f"'{raw.decode('utf-8', 'backslashreplace')}' in group '/{prefix}' is not "
                    "UTF-8",
                ) from None
            path = prefix + name
            if kind in (h5l.TYPE_SOFT, h5l.TYPE_EXTERNAL):
                self.non_tensors.append(f"link '{path}'")
                continue
            if kind != h5l.TYPE_HARD:
                raise CheckpointError(
                    self.path,
                    f"{self.prefix}corrupt HDF5 file: the link '{path}' is of an unknown type "
                    f"({kind})",
                )
            if self.report is not None:
                _report(self.report, path)
            try:
                obj = h5o.open(group, raw)
            except (KeyError, OSError, RuntimeError, ValueError) as e:
                # HDF5 checks an object's header against the file's end when opening it.
                raise TruncatedCheckpointError(
                    self.path,
                    f"{self.prefix}cannot open object '{path}', the file is truncated or "
                    f"corrupt ({_first_line(e)})",
                ) from None
            info = h5o.get_info(obj)  # reads the whole header: damage shows here, not later
            key = (info.fileno, info.addr)
            first = self.seen.get(key)
            if first is not None:
                self.non_tensors.append(f"hard link '{path}' to '{first}'")
                continue
            self.seen[key] = path
            if self.report is not None:
                _read_attributes(obj)
            if isinstance(obj, h5g.GroupID):
                self.group(obj, path + "/")
            elif isinstance(obj, h5d.DatasetID):
                self.dataset(path, obj)
            else:
                self.non_tensors.append(f"named datatype '{path}'")

    def dataset(self, name: str, dataset: h5d.DatasetID) -> None:
        file_type = dataset.get_type()
        dtype = _tensor_dtype(dataset, file_type)
        shape = dataset.shape
        if dtype is None or shape is None:
            self.non_tensors.append(f"dataset '{name}' ({_describe_type(file_type)})")
            return
        # An address only for data stored in one allocated piece of this file (contiguous
        # layout, not in external files); then nothing else about its storage matters.
        offset = dataset.get_offset()
        if offset is None and all(shape):
            plist = dataset.get_create_plist()
            if (
                plist.get_layout() != h5d.VIRTUAL  # virtual and external data live elsewhere
                and not plist.get_external_count()
                and dataset.get_storage_size() == 0
            ):
                # No data is stored, only a fill value: replaying it would read and write
                # its whole size (2^60 bytes for a (2^40, 2^20) dataset) block by block. An
                # HDF5 output copies it as it is, unwritten; other formats refuse it.
                self.non_tensors.append(f"dataset '{name}' (never written: no data stored)")
                return
        self.tensors[name] = TensorInfo(name, dtype, tuple(int(d) for d in shape))
        if offset is None:
            return
        if file_type.get_class() == h5t.OPAQUE:
            same = file_type.get_size() == dtype.itemsize  # raw bytes either way
        else:
            same = file_type.dtype == dtype  # native order (dtype's), same kind
        if same:
            self.contiguous[name] = int(offset)  # checked against the file's size later


def _links(group: h5g.GroupID) -> list[tuple[bytes, int]]:
    """``(name, link type)`` of each of ``group``'s links, in the order h5py's ``Group``
    iterates them."""
    if not group.get_num_objs():
        return []
    tracked = group.get_create_plist().get_link_creation_order() & h5p.CRT_ORDER_TRACKED
    found: list[tuple[bytes, int]] = []

    def add(name: bytes, info: h5l.LinkInfo) -> None:
        found.append((name, info.type))  # ``info`` is reused: copy what we need

    index = h5.INDEX_CRT_ORDER if tracked else h5.INDEX_NAME
    group.links.iterate(add, idx_type=index, info=True)
    return found


def _report(report: int, path: str) -> None:
    """Tell the parent which object a rehearsal is about to touch (``_in_child``)."""
    line = path.encode("utf-8", "backslashreplace").replace(b"\n", b"\\n")
    os.write(report, line + b"\n")


def _read_attributes(obj: h5o.ObjectID) -> None:
    """Read every attribute's value as h5py's ``obj.attrs`` would (in its order, each by
    name): libhdf5 loops for ever on some damaged global heaps behind variable-length strings.
    An attribute that fails to read is left for the real reading to meet; the rest still are
    read."""
    if not h5a.get_num_attrs(obj):
        return
    tracked = 0
    with contextlib.suppress(AttributeError):  # a named datatype has no creation properties
        tracked = obj.get_create_plist().get_attr_creation_order() & h5p.CRT_ORDER_TRACKED
    names: list[bytes] = []
    index = h5.INDEX_CRT_ORDER if tracked else h5.INDEX_NAME
    with contextlib.suppress(KeyError, OSError, RuntimeError, TypeError, ValueError):
        h5a.iterate(obj, lambda name, *_: names.append(name), index_type=index)
    for name in names:
        with contextlib.suppress(KeyError, OSError, RuntimeError, TypeError, ValueError):
            _attribute_value(obj, name)


@runtime_checkable
class HDF5Backed(Protocol):
    """A reader whose tensors live in an HDF5 file (an HDF5 file itself, a ``.keras``
    archive's weights): an HDF5 writer rebuilds that file's groups, attributes and order."""

    @property
    def hdf5_source(self) -> HDF5Reader: ...


def _hdf5_source(template: CheckpointReader | None) -> HDF5Reader | None:
    return template.hdf5_source if isinstance(template, HDF5Backed) else None


def check_names(path: Path, names: Sequence[str]) -> None:
    """Refuse tensor names an HDF5 file cannot hold, naming the first problem.

    A dataset cannot have children, so ``a`` and ``a/b`` cannot both be tensors; empty path
    components and ``.`` or ``..`` have no dataset of their own.
    """
    parents: dict[str, str] = {}
    for name in names:
        parts = name.split("/")
        if not name or any(p in ("", ".", "..") for p in parts):
            raise OptionError(
                f"{path}: tensor name {name!r} is not an HDF5 dataset path (empty, '.' or '..' "
                "components); write a .safetensors output instead"
            )
        for i in range(1, len(parts)):
            parents.setdefault("/".join(parts[:i]), name)
    for name in names:
        if name in parents:
            raise OptionError(
                f"{path}: tensors '{name}' and '{parents[name]}' cannot both be stored in HDF5 "
                "(a dataset cannot contain another); write a .safetensors or .npz output instead"
            )


def _copy_attributes(source: h5py.HLObject, target: h5o.ObjectID) -> None:
    """Copy every attribute with its exact file type and dataspace, in the source's order."""
    for name in source.attrs:
        attr = source.attrs.get_id(name)
        file_type = attr.get_type()
        new = h5a.create(target, name.encode("utf-8"), file_type, attr.get_space())
        if attr.shape is None or 0 in attr.shape:
            continue
        klass = file_type.get_class()
        pointers = klass in (h5t.VLEN, h5t.REFERENCE) or (
            klass == h5t.STRING and file_type.is_variable_str()
        )
        if klass in (h5t.COMPOUND, h5t.ARRAY):
            pointers = bool(file_type.detect_class(h5t.VLEN) or file_type.detect_class(h5t.STRING))
        if pointers:
            # Variable-length data lives behind pointers: let h5py's memory type hold it, and
            # HDF5 converts it back to the very same file type.
            dtype = attr.dtype
            memory_type = h5t.py_create(dtype)
            shape = attr.shape
            if dtype.subdtype is not None:
                dtype, subshape = dtype.subdtype
                shape = shape + subshape
            values = np.zeros(shape, dtype=dtype)
            attr.read(values, mtype=memory_type)
            new.write(values, mtype=memory_type)
        else:  # fixed-size: the stored bytes, untouched
            raw = np.zeros(attr.shape, dtype=np.dtype(f"V{file_type.get_size()}"))
            attr.read(raw, mtype=file_type)
            new.write(raw, mtype=file_type)


def _link_properties(group: h5py.Group, name: str) -> h5p.PropLCID:
    lcpl = h5p.create(h5p.LINK_CREATE)
    lcpl.set_char_encoding(group.id.links.get_info(name.encode("utf-8")).cset)
    return lcpl


def _utf8_links() -> h5p.PropLCID:
    lcpl = h5p.create(h5p.LINK_CREATE)
    lcpl.set_char_encoding(h5t.CSET_UTF8)
    return lcpl


def _untimed(kind: Any) -> Any:
    """A creation property list whose objects record no creation or modification time: HDF5
    stamps new groups (and a template's timed datasets) with the clock by default, and then the
    same run writes different bytes every second. Nothing that loads checkpoints reads them."""
    plist = h5p.create(kind)
    plist.set_obj_track_times(False)
    return plist


def _allocate_now(dcpl: Any) -> None:
    """Give the dataset its file space when it is created, in the template's order: left to
    the first write, the space goes to whichever worker thread writes first, and the file's
    layout (so its bytes) would change from run to run. No fill value is written: every byte
    is written by the replay. Compressed chunks are placed when written, so datasets with
    filters keep HDF5's own allocation."""
    if dcpl.get_nfilters() == 0:
        dcpl.set_alloc_time(h5d.ALLOC_TIME_EARLY)
        dcpl.set_fill_time(h5d.FILL_TIME_NEVER)


#: How long the rehearsal of a template's copy may take (``rehearse_copy``); a sound file's
#: takes milliseconds.
REHEARSAL_SECONDS = 10.0
#: Objects copied whole above this size are not rehearsed (they would be copied into memory).
REHEARSAL_MAX_BYTES = 64 << 20


def _walk(
    file: h5py.File,
    report: int,
    touch: Callable[[h5py.Group, str, h5py.HLObject, str], None],
) -> None:
    """Every hard-linked object of ``file``, groups first, each path written to the pipe
    ``report`` before ``touch(parent, name, object, path)`` (the root: ``(file, "", file, "")``)."""

    def visit(group: h5py.Group, prefix: str) -> None:
        for name in group:
            if not isinstance(group.get(name, getlink=True), h5py.HardLink):
                continue
            obj, path = group[name], prefix + name
            _report(report, path)
            touch(group, name, obj, path)
            if isinstance(obj, h5py.Group):
                visit(obj, path + "/")

    _report(report, "/")
    touch(file, "", file, "")
    visit(file, "")


def _rehearse(source: HDF5Reader, report: int) -> None:
    """What ``HDF5Writer`` does with libhdf5 to a template, minus the tensors' data: copy
    every attribute and every non-tensor object into a file in memory."""
    scratch = h5py.File("rehearsal", "w", driver="core", backing_store=False)
    counter = 0

    def touch(parent: h5py.Group, name: str, obj: h5py.HLObject, path: str) -> None:
        nonlocal counter
        counter += 1
        copied_whole = isinstance(obj, h5py.Datatype) or (
            isinstance(obj, h5py.Dataset)
            and path not in source.tensors
            and obj.id.get_storage_size() <= REHEARSAL_MAX_BYTES
        )
        if copied_whole:
            h5o.copy(parent.id, name.encode("utf-8"), scratch.id, f"o{counter}".encode())
        else:  # a group or a tensor: only its attributes are copied as they are
            _copy_attributes(obj, scratch.create_group(f"g{counter}").id)

    _walk(source.file, report, touch)


def rehearse_copy(source: HDF5Reader, what: Path | str) -> None:
    """Rehearse the HDF5 writer's copy of ``source`` (``_rehearse``) in a forked child first
    (``_in_child``): the real copy starts only if libhdf5 survived it."""
    _in_child(what, lambda report: _rehearse(source, report))


def _rehearse_reading(file: h5py.File, report: int) -> _Scan:
    """What ``HDF5Reader`` does with libhdf5 to open ``file`` by its path (its scan: the walk
    of its objects, the root's attributes), with every other attribute value read too; returns
    that scan."""
    _report(report, "/")
    _read_attributes(file.id)
    return _scan_file(file, Path(file.filename), "", True, report)


#: Files whose reading was rehearsed without harm in this process, by identity (device, inode,
#: size, mtime, ctime): the replay's workers open every checkpoint again.
_REHEARSED: set[tuple[int, ...]] = set()


def rehearse_reading(
    file: h5py.File, what: Path | str, identity: tuple[int, ...] | None
) -> _Scan | None:
    """Rehearse reading ``file``'s objects and attributes in a forked child (``_in_child``)
    once per file: libhdf5 loops for ever on some damaged global heaps. A file that
    ``rehearsing_ahead`` is rehearsing takes that child's verdict instead, and its scan of the
    file, returned (None: scan it here)."""
    if identity is not None and identity in _REHEARSED:
        return None
    scan = None
    if identity is not None and _AHEAD.verdict(Path(what), identity):
        scan = _AHEAD.scan(Path(what))
    else:
        _in_child(what, lambda report: _rehearse_reading(file, report))
    if identity is not None:
        _REHEARSED.add(identity)
    return scan


_CONTROL = b"\x00"  # starts the ahead children's control lines; no HDF5 name holds a NUL
#: Children rehearsing ahead, at most: each takes every n-th file (a run's parent then mostly
#: waits for their verdicts and scans, which arrive about n times as fast).
AHEAD_CHILDREN = 2
#: Fewest files per child: forking costs a few milliseconds.
_FILES_PER_CHILD = 3


def _ahead_children(files: int) -> int:
    """How many children rehearse ``files`` files ahead: one per usable CPU up to
    ``AHEAD_CHILDREN``, with at least ``_FILES_PER_CHILD`` files each."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(AHEAD_CHILDREN, cpus, files // _FILES_PER_CHILD))


@dataclass
class _Child:
    """One child rehearsing ahead: its pipe, the file it is at (``current``, since
    ``started``), the object paths it reported last (``seen``) and a partial line."""

    pid: int
    read_end: int
    started: float
    current: int = -1
    seen: bytes = b""
    pending: bytes = b""


class _Ahead:
    """Forked children rehearsing the reading of a run's HDF5 inputs, each every n-th file in
    order, while this process opens the files already rehearsed (so rehearsals and opens
    overlap on the machine's cores instead of following each other). Each child also sends
    its scan of each file (``_scan_file``: the rehearsal's walk finds what the reader needs),
    so this process does not walk the file again. A child reports each file's start
    (``NUL B k``), the path of every object it touches, its scan (``NUL P k`` and a base64
    pickle: the bytes come from our own fork, through a pipe only it holds) and each file's end
    with the identity it saw (``NUL D k dev ino size mtime ctime``) or that it could not open
    it (``NUL S k``). Anything unexpected (a file a child skipped, one changed since, a child
    gone) leaves that file to its own rehearsal and scan; only a crash or an overrun in the
    file being asked about is that file's error, as ``_in_child`` reports it."""

    def __init__(self) -> None:
        self.children: list[_Child] = []
        self.paths: dict[str, tuple[int, int]] = {}  # real path -> (child, file number)
        self.done: dict[int, tuple[int, ...] | None] = {}
        self.scans: dict[int, _Scan] = {}

    def start(self, paths: Sequence[Path]) -> None:
        import time

        self.stop()
        if not hasattr(os, "fork") or len(paths) < 2:
            return
        count = _ahead_children(len(paths))
        parent = os.getpid()
        for c in range(count):
            jobs = [(k, paths[k]) for k in range(c, len(paths), count)]
            read_end, write_end = os.pipe()
            with contextlib.suppress(OSError, AttributeError):  # fewer stalls: 1 MiB (Linux)
                import fcntl

                fcntl.fcntl(write_end, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
            pid = os.fork()
            if pid == 0:  # the child: rehearse its files, then leave without the parent's cleanup
                status = 0
                try:
                    _child_dies_with(parent)
                    os.close(read_end)
                    for child in self.children:
                        os.close(child.read_end)
                    _rehearse_all(jobs, write_end)
                except BaseException:
                    status = 1
                os._exit(status)
            os.close(write_end)
            os.set_blocking(read_end, False)
            self.children.append(_Child(pid, read_end, time.monotonic()))
            self.paths.update({os.path.realpath(p): (c, k) for k, p in jobs})

    def verdict(self, path: Path, identity: tuple[int, ...]) -> bool:
        """True once a child rehearsed ``path`` as it is now, without harm; False for a file
        left to its own rehearsal. A crash or an overrun in ``path`` is its error."""
        import select
        import time

        c, k = self.paths.get(os.path.realpath(path), (-1, -1))
        if k < 0:
            return False
        child = self.children[c]
        while k not in self.done:
            if child.pid == 0:
                return False
            poller = select.poll()  # every child's pipe: none waits on a full one meanwhile
            for other in self.children:
                if other.read_end >= 0:
                    poller.register(other.read_end, select.POLLIN)
            poller.poll(5)
            for other in self.children:
                self._read(other)
            if k in self.done:
                break
            done, status = os.waitpid(child.pid, os.WNOHANG)
            if done:
                self._read(child)
                child.pid = 0
                if os.WIFSIGNALED(status) and child.current == k and k not in self.done:
                    self.stop()
                    raise _crashed(path, status, child.seen)
                continue
            if time.monotonic() - child.started > REHEARSAL_SECONDS:
                current, seen = child.current, child.seen
                self._end(child)
                if current == k:
                    self.stop()
                    raise _overran(path, seen)
                return False
        return self.done.get(k) == identity

    def scan(self, path: Path) -> _Scan | None:
        """The scan a child sent of ``path`` (once, after a true ``verdict``), or None."""
        _, k = self.paths.get(os.path.realpath(path), (-1, -1))
        return self.scans.pop(k, None)

    def _read(self, child: _Child) -> None:
        import base64
        import pickle
        import time

        if child.read_end < 0:
            return
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(child.read_end, 1 << 16):
                child.pending += chunk
            # The end of the pipe: the child has exited. Closed now, or every poll of the
            # children's pipes would return at once and the wait for another child would spin.
            os.close(child.read_end)
            child.read_end = -1
        *lines, child.pending = child.pending.split(b"\n")
        for line in lines:
            if not line.startswith(_CONTROL):
                child.seen = (child.seen + line + b"\n")[-4096:]
                continue
            kind, *fields = line[1:].split(b" ")
            k = int(fields[0])
            if kind == b"B":
                child.current, child.started, child.seen = k, time.monotonic(), b""
            elif kind == b"P":
                self.scans[k] = pickle.loads(base64.b64decode(fields[1]))
            elif kind == b"D":
                self.done[k] = tuple(int(f) for f in fields[1:])
            else:
                self.done[k] = None

    def _end(self, child: _Child) -> None:
        import signal

        if child.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(child.pid, 0)
            child.pid = 0
        if child.read_end >= 0:
            os.close(child.read_end)
            child.read_end = -1

    def stop(self) -> None:
        """End the children (those that still run) and forget the files not reported."""
        for child in self.children:
            self._end(child)
        self.children, self.paths, self.done, self.scans = [], {}, {}, {}


_AHEAD = _Ahead()


@contextlib.contextmanager
def rehearsing_ahead(paths: Sequence[Path]) -> Iterator[None]:
    """While open: ``paths`` (HDF5 files a run is about to open, in that order) are rehearsed
    by children running ahead of the opens (``_Ahead``); they are ended on exit."""
    _AHEAD.start(paths)
    try:
        yield
    finally:
        _AHEAD.stop()


def _rehearse_all(jobs: Sequence[tuple[int, Path]], report: int) -> None:
    """An ahead child's work: each file (numbered) opened as ``HDF5Reader`` opens it, then
    rehearsed, and its scan sent."""
    import base64
    import pickle

    for k, path in jobs:
        try:
            file = h5py.File(path, "r", locking=False)
        except Exception:
            os.write(report, _CONTROL + b"S %d\n" % k)
            continue
        st = os.fstat(file.id.get_vfd_handle())
        identity = (*file_identity(st), 0)  # as HDF5Reader names a file it opens by path
        os.write(report, _CONTROL + b"B %d\n" % k)
        try:
            scan = _rehearse_reading(file, report)
        except Exception:
            os.write(report, _CONTROL + b"S %d\n" % k)  # the real open meets the error
            continue
        finally:
            file.close()
        if isinstance(scan, _Scan):
            payload = base64.b64encode(pickle.dumps(scan, pickle.HIGHEST_PROTOCOL))
            _write_all(report, _CONTROL + b"P %d %s\n" % (k, payload))
        os.write(report, _CONTROL + b"D %d %s\n" % (k, " ".join(map(str, identity)).encode()))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _child_dies_with(parent: int) -> None:
    """In a rehearsal child: be killed when the process that forked it ends (Linux), and end
    now if it already has. A child stuck in libhdf5 would otherwise outlive a killed run,
    holding the run's inherited output locks, so the next run found them taken."""
    import signal

    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def _overran(what: Path | str, seen: bytes) -> CheckpointError:
    return CheckpointError(
        what,
        f"libhdf5 did not finish reading '{_last(seen)}' in {REHEARSAL_SECONDS:g} s: "
        "the file is damaged",
    )


def _crashed(what: Path | str, status: int, seen: bytes) -> CheckpointError:
    import signal

    name = signal.Signals(os.WTERMSIG(status)).name
    return CheckpointError(
        what, f"libhdf5 crashed ({name}) reading '{_last(seen)}': the file is damaged"
    )


def _in_child(what: Path | str, work: Callable[[int], object]) -> None:
    """Run ``work`` (given a pipe to write the path of each object it touches) in a forked
    child first: libhdf5 can crash (SIGSEGV) or loop for ever on some damaged files while
    copying an object or reading a variable-length attribute, and neither can be caught in
    this process. A child that dies or overruns ``REHEARSAL_SECONDS`` is a ``CheckpointError``
    naming the object it was at; a Python exception in the child is left for the real work to
    meet. Where there is no ``fork`` (Windows) nothing is rehearsed."""
    if not hasattr(os, "fork"):
        return
    import signal
    import time

    read_end, write_end = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child: rehearse, then leave without running any cleanup of the parent's
        status = 0
        try:
            _child_dies_with(parent)
            os.close(read_end)
            with contextlib.suppress(Exception):
                work(write_end)
        except BaseException:
            status = 1
        os._exit(status)
    os.close(write_end)
    os.set_blocking(read_end, False)
    seen = b""
    deadline = time.monotonic() + REHEARSAL_SECONDS
    try:
        while True:
            with contextlib.suppress(BlockingIOError):
                while chunk := os.read(read_end, 1 << 16):
                    seen = (seen + chunk)[-4096:]
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise _overran(what, seen)
            time.sleep(0.002)
    finally:
        os.close(read_end)
    if os.WIFSIGNALED(status):
        raise _crashed(what, status, seen)


def _last(seen: bytes) -> str:
    lines = seen.decode("utf-8", "replace").splitlines()
    return lines[-1] if lines else "/"


class HDF5Writer(CheckpointWriter):
    """Builds the output in a hidden temporary HDF5 file beside ``path``.

    With an HDF5 template (or a ``.keras`` one) the template is rebuilt object by object first;
    tensors are then filled by ``write()``.
    """

    def begin(self) -> None:
        self._source = _hdf5_source(self.template)
        if self._source is not None and self.template is not None:
            rehearse_copy(self._source, self.template.path)
        self._lock = threading.Lock()
        self._memory_types: dict[str, h5t.TypeID] = {}
        handle, self._tmp = self.stage_file()
        handle.close()  # HDF5 opens the file itself
        try:
            self._file = self._create_file()
            self._datasets = _OpenDatasets(self._file)
            if self._source is not None:
                self._copy_group(self._source.file, self._file, "", {})
            for info in self.tensors:
                if info.name not in self._memory_types:
                    self._create_fresh_tensor(info)
            self._write_metadata()
        except OSError as e:  # a full disk while the structure is laid out
            raise _output_error(self.path, e) from None

    @classmethod
    def check(
        cls, path: Path, tensors: Sequence[TensorInfo], template: CheckpointReader | None
    ) -> None:
        check_names(path, [t.name for t in tensors])
        for info in tensors:
            dtype = np.dtype(info.dtype)
            if not _stored_opaque(dtype) and dtype not in NUMERIC_DTYPES:
                raise OptionError(f"{path}: tensor '{info.name}': HDF5 cannot store dtype {dtype}")

    @classmethod
    def carries_non_tensors(cls, template: CheckpointReader) -> bool:
        """True when all the template holds besides tensors is in its HDF5 file, rebuilt here
        (a ``.keras`` archive's ``assets/`` are not)."""
        source = _hdf5_source(template)
        return source is not None and list(template.non_tensors) == list(source.non_tensors)

    def _create_file(self) -> h5py.File:
        fapl = h5p.create(h5p.FILE_ACCESS)
        fapl.set_fclose_degree(h5f.CLOSE_STRONG)
        fapl.set_libver_bounds(h5f.LIBVER_EARLIEST, h5f.LIBVER_LATEST)
        fapl.set_cache(0, 521, _WRITE_CHUNK_CACHE_BYTES, 1.0)
        with contextlib.suppress(AttributeError, ValueError):  # HDF5 < 1.12.1 has no setting
            fapl.set_file_locking(False, True)
        fcpl = _untimed(h5p.FILE_CREATE)
        if self._source is not None:
            # The template's sizes and layout, and its root group's creation-order tracking
            # (which HDF5 reports on the root group, not in the file's properties).
            fcpl = self._source.file.id.get_create_plist()
            root = self._source.file["/"].id.get_create_plist()
            fcpl.set_link_creation_order(root.get_link_creation_order())
            fcpl.set_attr_creation_order(root.get_attr_creation_order())
            fcpl.set_obj_track_times(False)
        fid = h5f.create(os.fsencode(self._tmp), h5f.ACC_TRUNC, fcpl=fcpl, fapl=fapl)
        return h5py.File(fid)

    def _copy_group(
        self,
        source: h5py.Group,
        target: h5py.Group,
        prefix: str,
        copied: dict[tuple[int, int], tuple[h5g.GroupID, bytes]],
    ) -> None:
        """Rebuild ``source``'s attributes and members in ``target``, in the source's order."""
        assert self._source is not None
        _copy_attributes(source, target.id)
        for name in source:
            path = prefix + name
            encoded = name.encode("utf-8")
            link = source.get(name, getlink=True)
            lcpl = _link_properties(source, name)
            if isinstance(link, h5py.SoftLink):
                target.id.links.create_soft(encoded, link.path.encode("utf-8"), lcpl=lcpl)
                continue
            if isinstance(link, h5py.ExternalLink):
                target.id.links.create_external(
                    encoded, link.filename.encode("utf-8"), link.path.encode("utf-8"), lcpl=lcpl
                )
                continue
            obj = source[name]
            info = h5o.get_info(obj.id)
            key = (info.fileno, info.addr)
            if key in copied:  # a second hard link to an object already rebuilt
                where, first = copied[key]
                target.id.links.create_hard(encoded, where, first, lcpl=lcpl)
                continue
            copied[key] = (target.id, encoded)
            if isinstance(obj, h5py.Group):
                gcpl = obj.id.get_create_plist()
                gcpl.set_obj_track_times(False)  # see _untimed
                gid = h5g.create(target.id, encoded, lcpl=lcpl, gcpl=gcpl)
                self._copy_group(obj, h5py.Group(gid), path + "/", copied)
            elif isinstance(obj, h5py.Dataset) and path in self._source.tensors:
                wanted = self.infos.get(path)
                if wanted is None:
                    continue  # written under another name (--names shadow), created later
                self._create_tensor_like(target, encoded, lcpl, obj, wanted)
            else:  # not a tensor: copied whole, exactly
                h5o.copy(source.id, encoded, target.id, encoded, lcpl=lcpl)

    def _create_tensor_like(
        self,
        group: h5py.Group,
        name: bytes,
        lcpl: h5p.PropLCID,
        source: h5py.Dataset,
        info: TensorInfo,
    ) -> None:
        assert self._source is not None
        known = self._source.tensors[info.name]
        if (known.dtype, known.shape) != (info.dtype, info.shape):
            self._create_fresh_tensor(info, group, name)
            return
        file_type = source.id.get_type().copy()  # a transient copy of a committed type
        dcpl = source.id.get_create_plist()
        if dcpl.get_layout() == h5d.VIRTUAL or dcpl.get_external_count():
            dcpl = _untimed(h5p.DATASET_CREATE)  # writing through would write into other files
        dcpl.set_obj_track_times(False)
        _allocate_now(dcpl)
        dataset = h5d.create(group.id, name, file_type, source.id.get_space(), dcpl=dcpl, lcpl=lcpl)
        _copy_attributes(source, dataset)
        self._memory_types[info.name] = _memory_type(file_type, info.dtype)

    def _create_fresh_tensor(
        self, info: TensorInfo, group: h5py.Group | None = None, name: bytes | None = None
    ) -> None:
        """A contiguous dataset at the tensor's path; opaque plus a ``dtype`` attribute for
        ml_dtypes types (Keras 3's convention), so it reads back as the same dtype."""
        if group is None or name is None:
            group, name = self._parent_group(info.name)
        dtype = np.dtype(info.dtype)
        opaque = _stored_opaque(dtype)
        # check() refused every other kind of dtype
        file_type = h5t.create(h5t.OPAQUE, dtype.itemsize) if opaque else h5t.py_create(dtype)
        space = h5s.create_simple(info.shape) if info.shape else h5s.create(h5s.SCALAR)
        dcpl = _untimed(h5p.DATASET_CREATE)
        _allocate_now(dcpl)
        dataset = h5d.create(group.id, name, file_type, space, dcpl=dcpl, lcpl=_utf8_links())
        if opaque:
            h5py.AttributeManager(h5py.Dataset(dataset))[DTYPE_ATTRIBUTE] = dtype.name
        self._memory_types[info.name] = _memory_type(file_type, dtype)

    def _parent_group(self, name: str) -> tuple[h5py.Group, bytes]:
        group: h5py.Group = self._file
        *parents, leaf = name.split("/")
        for i, part in enumerate(parents):
            member = group.get(part, getclass=True)
            if member is None:
                gcpl = _untimed(h5p.GROUP_CREATE)
                gid = h5g.create(group.id, part.encode("utf-8"), lcpl=_utf8_links(), gcpl=gcpl)
                group = h5py.Group(gid)
            elif member is h5py.Group:
                group = group[part]
            else:
                where = "/".join(parents[: i + 1])
                raise OptionError(
                    f"{self.path}: tensor '{name}' cannot be stored in HDF5: '{where}' is a "
                    "dataset of the template, not a group; write a .safetensors output instead"
                )
        if leaf in group:
            raise OptionError(
                f"{self.path}: tensor '{name}' cannot be stored in HDF5: the template already "
                "has an object at that path; write a .safetensors output instead"
            )
        return group, leaf.encode("utf-8")

    def _write_metadata(self) -> None:
        """Metadata as root string attributes, leaving the template's own ones as they are."""
        kept = self._source.metadata if self._source is not None else {}
        for key, value in self.metadata.items():
            if kept.get(key) != value:
                self._file.attrs[key] = value

    def write(self, name: str, start: int, values: npt.NDArray[np.generic]) -> None:
        info, count = self._check_block(name, start, values), values.size
        if count == 0:
            return
        data = np.ascontiguousarray(values)
        with self._lock:
            try:
                dataset = self._datasets.get(name)
                file_space, memory_space = _select_flat_range(
                    dataset, info.shape, start, start + count
                )
                dataset.write(memory_space, file_space, data, self._memory_types[name])
            except OSError as e:
                raise _output_error(self.path, e) from None
        self._wrote(data.nbytes)

    def complete(self) -> Path:
        """Close the complete file and return its temporary path (``finish`` publishes it; a
        ``.keras`` writer zips it)."""
        self._check_complete()
        try:
            self._datasets.clear()
            self._file.close()
            userblock = self._source.userblock() if self._source is not None else b""
            if userblock:
                with open(self._tmp, "r+b") as f:
                    f.write(userblock)
        except OSError as e:
            raise _output_error(self.path, e) from None
        return self._tmp

    def finish(self) -> list[tuple[Path, Path]]:
        return [(self.complete(), self.path)]

    def _discard(self) -> None:
        file = getattr(self, "_file", None)
        if file is not None:
            with contextlib.suppress(Exception):
                file.close()
