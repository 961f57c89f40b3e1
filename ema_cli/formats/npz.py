"""numpy ``.npz`` archives: a zip of ``.npy`` files, one tensor per member ``<name>.npy``.

Reading streams: ``np.load`` cannot memory-map inside a zip, so we parse each member's ``.npy``
header ourselves and read element ranges in place with positioned reads when the member is
stored (``np.savez``), or decompress it forward with a look-back window when it is deflated
(``np.savez_compressed``), so blocks arriving slightly out of order do not restart it. A
Fortran-ordered member has no contiguous C-order ranges: it is loaded whole, two at a time.

bfloat16: numpy saves an ml_dtypes bfloat16 array with the descr ``<V2`` (raw 2-byte void), and
that is how we write it; reading, every 2-byte void member is taken as bfloat16 (as 2-byte
opaque HDF5 data is). Members that are not numeric tensors (Python objects, strings, other void
or structured dtypes, files that are not ``.npy``) are copied unchanged into an ``.npz`` output
and refuse conversion to other formats.

Writing is deterministic: members in the template's (else the given) order, fixed timestamps,
the template's compression, so identical runs give identical bytes. Blocks arriving in any order
land at their offsets in a staging file beside the output; ``commit()`` streams it into the zip
(which needs each member's CRC, known only once the member is complete).
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import tokenize
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from ema_cli import dtypes
from ema_cli.checkpoint import TensorInfo
from ema_cli.errors import CheckpointError, OptionError, OutputError, TruncatedCheckpointError
from ema_cli.formats.base import (
    NUMERIC_DTYPES,
    CheckpointReader,
    CheckpointWriter,
    read_exact,
    write_exact,
)
from ema_cli.formats.zipfiles import (
    ZIP_ERRORS,
    copy_member,
    copy_zip_info,
    open_zip,
    stored_data_offset,
    stream_member,
    verify_member,
)

#: Zip timestamps of written members that have no template member: the earliest zip date.
FIXED_DATE_TIME = (1980, 1, 1, 0, 0, 0)


#: How far back a deflated member can be re-read without decompressing it again from the start.
INFLATE_WINDOW_BYTES = 16 << 20
_COPY_BYTES = 1 << 20


class _Member:
    """Where one tensor's bytes are and how to get at them."""

    def __init__(
        self, info: zipfile.ZipInfo, header_size: int, dtype: np.dtype[Any], fortran: bool
    ) -> None:
        self.info = info
        self.header_size = header_size
        self.file_dtype = dtype  # as stored (byte order included)
        self.fortran = fortran
        self.offset: int | None = None  # absolute data offset, for stored C-order members
        self.inflater: _Inflater | None = None


class _Inflater:
    """Forward decompression of one member's data with a look-back window of recent bytes."""

    def __init__(self, archive: zipfile.ZipFile, member: _Member) -> None:
        self._archive = archive
        self._member = member
        self._restart()

    def _restart(self) -> None:
        self._stream = self._archive.open(self._member.info)
        self._stream.read(self._member.header_size)
        self._window = bytearray()
        self._window_start = 0  # data offset of self._window[0]

    def read_into(self, view: memoryview, offset: int) -> int:
        """Fill ``view`` from data offset ``offset``; returns the bytes available."""
        if offset < self._window_start:
            self._restart()
        end = offset + len(view)
        while self._window_start + len(self._window) < end:
            chunk = self._stream.read(
                max(_COPY_BYTES, end - self._window_start - len(self._window))
            )
            if not chunk:
                break
            self._window += chunk
            excess = min(len(self._window) - INFLATE_WINDOW_BYTES, offset - self._window_start)
            if excess > 0:
                del self._window[:excess]
                self._window_start += excess
        lo = offset - self._window_start
        got = max(0, min(len(view), len(self._window) - lo))
        view[:got] = self._window[lo : lo + got]
        excess = len(self._window) - INFLATE_WINDOW_BYTES
        if excess > 0:
            del self._window[:excess]
            self._window_start += excess
        return got

    def close(self) -> None:
        self._stream.close()


def _tensor_dtype(dtype: np.dtype[Any]) -> np.dtype[Any] | None:
    """The in-memory dtype of a member that is a tensor, else None."""
    if dtype.kind == "V" and dtype.itemsize == 2 and dtype.fields is None and not dtype.subdtype:
        return dtypes.by_name("bfloat16")
    native: np.dtype[Any] = dtype.newbyteorder("=")
    return native if native in NUMERIC_DTYPES else None


#: What numpy's ``.npy`` header parser raises on a damaged header (it evaluates a Python
#: literal: unbalanced brackets are a SyntaxError, zeroed bytes a ValueError, ...).
_NPY_HEADER_ERRORS = (
    ValueError,
    tokenize.TokenError,  # numpy tokenizes the header to upgrade old ones
    SyntaxError,
    TypeError,
    KeyError,
    IndexError,
    RecursionError,
    MemoryError,
    OverflowError,
)


def _first_line(error: BaseException) -> str:
    return str(error).strip().split("\n", 1)[0]


class NpzReader(CheckpointReader):
    format_name = "npz"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._raw, self.archive = open_zip(path, "npz file", "an npz file")
        self._lock = threading.Lock()
        try:
            self._scan()
        except BaseException:
            self.close()
            raise

    def _scan(self) -> None:
        size = os.fstat(self._raw.fileno()).st_size
        self._tensors: dict[str, TensorInfo] = {}
        self._members: dict[str, _Member] = {}
        self._non_tensors: list[str] = []
        #: Every member in archive order, with its tensor name (None: copied as is).
        self.members: list[tuple[zipfile.ZipInfo, str | None]] = []
        self._cache: dict[str, npt.NDArray[np.generic]] = {}
        for info in self.archive.infolist():
            self.members.append((info, self._scan_member(info, size)))

    def _scan_member(self, info: zipfile.ZipInfo, size: int) -> str | None:
        filename = info.filename
        if info.is_dir() or not filename.endswith(".npy"):
            # copied as it is into an npz output: checked (CRC included) before the replay
            verify_member(self.path, self.archive, info, "npz file")
            self._non_tensors.append(f"zip member '{filename}' (not a .npy array)")
            return None
        name = filename[: -len(".npy")]
        if name in self._tensors:
            raise CheckpointError(self.path, "corrupt: two zip members hold it", tensor=name)
        if info.flag_bits & 0x1:
            raise CheckpointError(self.path, "encrypted zip member; ema-cli cannot read it", name)
        try:
            with self.archive.open(info) as stream:
                version = np.lib.format.read_magic(stream)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
                else:  # 3.0 only adds UTF-8 field names of structured dtypes: not a tensor
                    shape, fortran, dtype = (), False, None
                header_size = stream.tell()
        except _NPY_HEADER_ERRORS as e:
            # numpy evaluates the header's Python literal: a damaged one fails in many ways
            reason = _first_line(e) or type(e).__name__
            raise CheckpointError(
                self.path, f"corrupt .npy header ({reason})", tensor=name
            ) from None
        except ZIP_ERRORS as e:
            raise CheckpointError(self.path, f"corrupt zip member ({e})", tensor=name) from None
        if dtype is None:
            verify_member(self.path, self.archive, info, "npz file")  # copied as it is
            self._non_tensors.append(f"zip member '{filename}' (.npy format {version})")
            return None
        tensor_dtype = None if dtype.hasobject else _tensor_dtype(dtype)
        if tensor_dtype is None:
            verify_member(self.path, self.archive, info, "npz file")  # copied as it is
            what = "Python objects" if dtype.hasobject else f"dtype {dtype}"
            self._non_tensors.append(f"array '{name}' ({what}, not a tensor)")
            return None
        tensor = TensorInfo(name, tensor_dtype, tuple(int(d) for d in shape))
        if info.file_size != header_size + tensor.nbytes:
            raise CheckpointError(
                self.path,
                f"corrupt: shape {list(tensor.shape)} of {dtype} needs {tensor.nbytes} bytes but "
                f"the zip member holds {info.file_size - header_size}",
                tensor=name,
            )
        member = _Member(info, header_size, dtype, fortran and len(shape) > 1)
        if info.compress_type == zipfile.ZIP_STORED and not member.fortran:
            try:
                member.offset = stored_data_offset(self._raw, info) + header_size
            except (zipfile.BadZipFile, EOFError) as e:
                raise CheckpointError(self.path, f"corrupt zip ({e})", tensor=name) from None
            if member.offset + tensor.nbytes > size:
                raise TruncatedCheckpointError(
                    self.path,
                    f"truncated: its data ends at byte {member.offset + tensor.nbytes} but the "
                    f"file has {size}",
                    tensor=name,
                )
        self._tensors[name] = tensor
        self._members[name] = member
        return name

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._tensors

    @property
    def non_tensors(self) -> Sequence[str]:
        """Members that are not tensors, which only an npz output can carry over."""
        return self._non_tensors

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
        member = self._members[name]
        if member.fortran:
            np.copyto(out, self._whole(name)[start:stop])
            return out
        itemsize = info.dtype.itemsize
        view = out.view(np.uint8).data
        try:
            if member.offset is not None:
                got = read_exact(self._raw.fileno(), view, member.offset + start * itemsize)
            else:
                with self._lock:
                    if member.inflater is None:
                        member.inflater = _Inflater(self.archive, member)
                    got = member.inflater.read_into(view, start * itemsize)
                    if stop == info.size:  # the tensor's last block: free its window
                        member.inflater.close()
                        member.inflater = None
        except ZIP_ERRORS as e:
            raise CheckpointError(self.path, f"corrupt zip member ({e})", tensor=name) from None
        if got != len(view):
            raise TruncatedCheckpointError(
                self.path, "truncated: the file ended while reading this tensor", tensor=name
            )
        if not member.file_dtype.isnative and member.file_dtype.kind != "V":
            out.byteswap(inplace=True)
        return out

    def _whole(self, name: str) -> npt.NDArray[np.generic]:
        """A Fortran-ordered member, loaded once and kept (the two most recent) in C order."""
        with self._lock:
            if name not in self._cache:
                member = self._members[name]
                try:
                    with self.archive.open(member.info) as f:
                        array = np.lib.format.read_array(f, allow_pickle=False)
                except (ValueError, *ZIP_ERRORS) as e:
                    raise CheckpointError(self.path, f"cannot read ({e})", tensor=name) from None
                if len(self._cache) >= 2:
                    del self._cache[next(iter(self._cache))]
                flat = np.ascontiguousarray(array).reshape(-1)
                want = self._tensors[name].dtype
                # bfloat16 is stored as raw 2-byte voids: reinterpreted, not converted
                flat = flat.view(want) if flat.dtype.kind == "V" else flat.astype(want, copy=False)
                self._cache[name] = flat
            return self._cache[name]

    def file_offset(self, name: str, start: int) -> int | None:
        member = self._members[name]
        if member.offset is None:
            return None
        return member.offset + start * self._tensors[name].dtype.itemsize

    def close(self) -> None:
        for member in getattr(self, "_members", {}).values():
            if member.inflater is not None:
                member.inflater.close()
        self.archive.close()
        self._raw.close()


# ---------------------------------------------------------------- writing


def npy_header(info: TensorInfo) -> bytes:
    """The ``.npy`` header numpy itself would write for this tensor (version 1.0 when it fits)."""
    fields = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(info.dtype)),
        "fortran_order": False,
        "shape": info.shape,
    }
    buffer = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buffer, fields)
    except ValueError:  # a header over 64 kB (a huge shape) needs version 2.0
        buffer = io.BytesIO()
        np.lib.format.write_array_header_2_0(buffer, fields)
    return buffer.getvalue()


def _check_dtype(path: Path, info: TensorInfo) -> None:
    dtype = np.dtype(info.dtype)
    if dtype in NUMERIC_DTYPES or dtype.name == "bfloat16":
        return
    raise OptionError(
        f"{path}: tensor '{info.name}' is {dtype}, which .npz cannot mark (numpy would store "
        "raw bytes of an unnamed dtype); write a .h5 output instead"
    )


class NpzWriter(CheckpointWriter):
    """Blocks land in a staging file at each tensor's offset; ``finish`` zips it."""

    def begin(self) -> None:
        self._source = self.template if isinstance(self.template, NpzReader) else None
        self._layout = self._plan_members()
        self._offsets: dict[str, int] = {}
        position = 0
        for info in self.tensors:
            self._offsets[info.name] = position
            position += info.nbytes
        self._staging, _ = self.stage_file()
        try:
            self._staging.truncate(self._expected)
        except OSError as e:
            raise OutputError(self.path, e) from None

    @classmethod
    def check(
        cls, path: Path, tensors: Sequence[TensorInfo], template: CheckpointReader | None
    ) -> None:
        for info in tensors:
            _check_dtype(path, info)
            if not info.name or info.name.endswith("/"):
                raise OptionError(f"{path}: tensor name {info.name!r} cannot be an npz member")

    @classmethod
    def carries_non_tensors(cls, template: CheckpointReader) -> bool:
        """An npz template's other members are copied as they are."""
        return isinstance(template, NpzReader)

    def _plan_members(self) -> list[tuple[zipfile.ZipInfo, str | None]]:
        """Output members in order: the template's (tensors keep their zip settings, other
        members are copied), then tensors it does not have, with fixed settings."""
        layout: list[tuple[zipfile.ZipInfo, str | None]] = []
        placed: set[str] = set()
        if self._source is not None:
            for info, name in self._source.members:
                if name is None:
                    layout.append((info, None))
                elif name in self.infos:
                    layout.append((copy_zip_info(info), name))
                    placed.add(name)
        for tensor in self.tensors:
            if tensor.name not in placed:
                info = zipfile.ZipInfo(tensor.name + ".npy", FIXED_DATE_TIME)
                info.compress_type = zipfile.ZIP_STORED  # as np.savez
                info.external_attr = 0o644 << 16
                info.create_system = 3
                layout.append((info, tensor.name))
        return layout

    def write(self, name: str, start: int, values: npt.NDArray[np.generic]) -> None:
        data = self._block_bytes(name, start, values)
        offset = self._offsets[name] + start * values.dtype.itemsize
        try:
            write_exact(self._staging.fileno(), data, offset)
        except OSError as e:
            raise OutputError(self.path, e) from None
        self._wrote(len(data))

    def finish(self) -> list[tuple[Path, Path]]:
        handle, tmp = self.stage_file()
        with handle, zipfile.ZipFile(handle, "w", allowZip64=True) as out:
            for info, name in self._layout:
                if name is None:
                    assert self._source is not None
                    copy_member(self._source.archive, info, out)
                    continue
                tensor = self.infos[name]
                header = npy_header(tensor)
                info.file_size = len(header) + tensor.nbytes
                self._staging.seek(self._offsets[name])
                data = _Slice(self._staging, tensor.nbytes)
                stream_member(out, info, io.BytesIO(header), data)
        return [(tmp, self.path)]

    def _discard(self) -> None:
        staging = getattr(self, "_staging", None)
        if staging is not None:
            with contextlib.suppress(OSError):  # thrown away; the first error is reported
                staging.close()


class _Slice:
    """The next ``size`` bytes of ``file``, read as a stream that ends there."""

    def __init__(self, file: IO[bytes], size: int) -> None:
        self._file = file
        self._left = size

    def read(self, size: int = -1) -> bytes:
        n = self._left if size < 0 else min(size, self._left)
        data = self._file.read(n)
        self._left -= len(data)
        return data
