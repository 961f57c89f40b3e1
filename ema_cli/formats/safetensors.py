"""safetensors files, read and written without loading whole tensors.

Layout (https://github.com/huggingface/safetensors): an unsigned little-endian 64-bit header
length ``N``, ``N`` bytes of UTF-8 JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {str: str}}``, then the data; offsets are relative to the end of the header.
We parse the header ourselves (so we can say exactly what is wrong with a broken file) and read
element ranges with positioned reads into caller buffers: no memory map, so a replay's resident
memory stays at its block buffers however large the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ema_cli import dtypes
from ema_cli.atomic import open_regular
from ema_cli.checkpoint import TensorInfo
from ema_cli.errors import CheckpointError, OptionError, OutputError, TruncatedCheckpointError
from ema_cli.formats.base import (
    CheckpointReader,
    CheckpointWriter,
    read_exact,
    write_exact,
)

#: safetensors' own refusal limit for a header, so we refuse what it refuses.
MAX_HEADER_BYTES = 100_000_000

#: safetensors dtype names -> numpy dtype names, in the order of the format's dtype enum (which
#: the reference writer uses, largest first, to lay tensors out aligned). Names, not dtypes, so
#: ml_dtypes is imported only when a checkpoint holds bfloat16 or float8 (``dtypes.by_name``).
_DTYPES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "F64": "float64",
    "I64": "int64",
    "U64": "uint64",
}
#: The most digits a header integer may have: offsets and dimensions are 64-bit (20 digits).
#: A longer one is corrupt, and Python would refuse to convert one over 4300 digits anyway.
MAX_INTEGER_DIGITS = 20

_DTYPE_NAMES = {numpy_name: name for name, numpy_name in _DTYPES.items()}
_DTYPE_RANK = {name: rank for rank, name in enumerate(_DTYPES)}


def _safetensors_name(dtype: np.dtype[Any]) -> str | None:
    dtype = np.dtype(dtype)
    if not dtypes.is_native_order(dtype) or dtype.fields is not None:
        return None
    return _DTYPE_NAMES.get(dtype.name)


def check_dtypes(path: Path, tensors: Sequence[TensorInfo]) -> None:
    """Refuse tensors whose dtype safetensors has no name for (float8 ``fnuz`` kinds, ...)."""
    for info in tensors:
        if _safetensors_name(info.dtype) is None:
            raise OptionError(
                f"{path}: tensor '{info.name}' is {info.dtype}, which safetensors cannot store; "
                "write a .h5 output instead"
            )


def check_names(path: Path, names: Sequence[str]) -> None:
    """Refuse tensor names UTF-8 cannot encode (a ``--name`` holding a byte that is not UTF-8,
    ``--name $'\\xff'``): the header is UTF-8 JSON."""
    for name in names:
        if not is_unicode(name):
            raise OptionError(
                f"{path}: tensor name '{escape_text(name)}' is not valid UTF-8, which a "
                "safetensors header needs (check --name)"
            )


def dtype_name(dtype: np.dtype[Any]) -> str:
    """The safetensors name of a numpy dtype (``F32``, ``BF16``, ...)."""
    name = _safetensors_name(dtype)
    if name is None:
        raise ValueError(f"safetensors cannot store dtype {dtype}")
    return name


class SafetensorsReader(CheckpointReader):
    format_name = "safetensors"
    thread_safe_reads = True  # preadv of one descriptor; the header is parsed once, at the open

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._fd = open_regular(path, "a safetensors file")
        try:
            self._parse_header()
        except BaseException:
            os.close(self._fd)
            raise

    def _parse_header(self) -> None:
        path = self.path
        self.file_size = os.fstat(self._fd).st_size
        prefix = os.pread(self._fd, 8, 0)
        if len(prefix) < 8:
            raise TruncatedCheckpointError(
                path,
                f"not a safetensors file (only {self.file_size} bytes, too short for a header)",
            )
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES:
            raise CheckpointError(
                path,
                f"not a safetensors file (header length field says {header_len} bytes, "
                f"more than the {MAX_HEADER_BYTES} safetensors allows)",
            )
        raw = os.pread(self._fd, header_len, 8)
        if len(raw) < header_len:
            raise TruncatedCheckpointError(
                path,
                f"truncated: the header should be {header_len} bytes but the file ends after "
                f"{len(raw)}",
            )
        header = parse_json_header(path, raw, "header")
        if not isinstance(header, dict):
            raise CheckpointError(path, "not a safetensors file (header is not a JSON object)")
        self.data_start = 8 + header_len
        data_size = self.file_size - self.data_start

        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
        ):
            raise CheckpointError(path, "corrupt header: __metadata__ must map strings to strings")
        for key, value in meta.items():
            if not is_unicode(key) or not is_unicode(value):
                raise CheckpointError(
                    path,
                    f"corrupt header: __metadata__ entry '{escape_text(key)}' is not valid "
                    "Unicode (a lone surrogate escape such as \\ud800)",
                )
        self._metadata: dict[str, str] = meta

        tensors: dict[str, TensorInfo] = {}
        spans: dict[str, tuple[int, int]] = {}
        for name, entry in header.items():
            if not is_unicode(name):
                raise CheckpointError(
                    path,
                    f"corrupt header: tensor name '{escape_text(name)}' is not valid Unicode "
                    "(a lone surrogate escape such as \\ud800)",
                )
            info, span = _parse_entry(path, name, entry)
            tensors[name] = info
            spans[name] = span
        # File order (by data offset) is the order users see in other tools.
        order = sorted(tensors, key=lambda n: (spans[n], n))
        self._tensors = {n: tensors[n] for n in order}
        self._layout = {
            n: (self.data_start + spans[n][0], t.dtype.itemsize, t.size, t.dtype)
            for n, t in self._tensors.items()
        }

        needed = max((end for _, end in spans.values()), default=0)
        if needed > data_size:
            last = max(spans, key=lambda n: spans[n][1])
            raise TruncatedCheckpointError(
                path,
                f"truncated: the header needs {needed} bytes of tensor data (through tensor "
                f"'{last}') but the file has {max(data_size, 0)}",
            )
        previous_end, previous = 0, None
        for name in order:
            begin, end = spans[name]
            if begin < previous_end:
                raise CheckpointError(
                    path, f"corrupt header: data overlaps tensor '{previous}'", tensor=name
                )
            previous_end, previous = end, name
        # The reference library rejects gaps and trailing bytes; a file with extra bytes at the
        # end is harmless to us but means something odd happened, so we accept it quietly.

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._tensors

    @property
    def metadata(self) -> Mapping[str, str]:
        return self._metadata

    def read(
        self,
        name: str,
        start: int = 0,
        stop: int | None = None,
        out: npt.NDArray[np.generic] | None = None,
    ) -> npt.NDArray[np.generic]:
        # The replay's hot path: one positioned read straight into the caller's buffer.
        offset, itemsize, size, dtype = self._layout[name]
        stop = size if stop is None else stop
        if not 0 <= start <= stop <= size:
            raise ValueError(f"{name}: elements [{start}, {stop}) outside its {size}")
        if out is None:
            out = np.empty(stop - start, dtype=dtype)
        want = (stop - start) * itemsize
        position = offset + start * itemsize
        try:
            got = os.preadv(self._fd, [out], position)  # type: ignore[list-item]  # ndarray is a buffer
            if got != want:  # a short read: only at the end of the file, or interrupted
                got = read_exact(self._fd, out.view(np.uint8).data, position)
        except OSError as e:
            raise CheckpointError(self.path, f"read error: {e.strerror}", tensor=name) from None
        if got != want:
            raise TruncatedCheckpointError(
                self.path, "truncated: the file ended while reading this tensor", tensor=name
            )
        return out

    def file_offset(self, name: str, start: int) -> int:
        offset, itemsize, _, _ = self._layout[name]
        return int(offset + start * itemsize)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _HeaderProblem(ValueError):
    """Raised from inside ``json.loads`` hooks: what makes a header unacceptable."""


def _refuse_constant(text: str) -> None:
    raise _HeaderProblem(f"{text} is not JSON")


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INTEGER_DIGITS:
        raise _HeaderProblem(
            f"an integer of {digits} digits (at most {MAX_INTEGER_DIGITS} fit 64 bits)"
        )
    return int(text)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise _HeaderProblem(f"'{escape_text(key)}' is listed twice")
        found[key] = value
    return found


def parse_json_header(path: Path, raw: bytes, what: str, kind: str = "safetensors file") -> Any:
    """A JSON header parsed with bounds, before anything is allocated from it: UTF-8, no
    duplicate keys (the reference parser keeps the last one silently; which one a writer meant
    is unknowable, so the file is refused, naming the key), integers of at most 20 digits, no
    NaN or Infinity, and nesting no deeper than the interpreter's recursion limit. Every
    failure is a ``CheckpointError`` naming ``path`` (``kind``: what it should have been; the
    sharded folders' index files are parsed so too)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(path, f"not a {kind} ({what} is not JSON: {e})") from None
    try:
        return json.loads(
            text,
            object_pairs_hook=_unique_keys,
            parse_int=_bounded_int,
            parse_constant=_refuse_constant,
        )
    except _HeaderProblem as e:
        raise CheckpointError(path, f"corrupt {what}: {e}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(path, f"not a {kind} ({what} is not JSON: {e})") from None
    except RecursionError:
        raise CheckpointError(path, f"corrupt {what}: JSON nested too deeply") from None


def is_unicode(text: str) -> bool:
    """False for strings holding lone surrogates (a JSON ``\\ud800`` escape, or a command-line
    byte that is not UTF-8), which no UTF-8 file can store."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def escape_text(text: str) -> str:
    """``text`` printable as UTF-8: bytes smuggled in by ``surrogateescape`` shown as ``\\xff``,
    other lone surrogates as ``\\ud800``."""
    try:
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        data = text.encode("utf-8", "backslashreplace")
    return data.decode("utf-8", "backslashreplace")


def _parse_entry(path: Path, name: str, entry: object) -> tuple[TensorInfo, tuple[int, int]]:
    if not isinstance(entry, dict):
        raise CheckpointError(path, "corrupt header: entry is not an object", tensor=name)
    dtype_str = entry.get("dtype")
    if dtype_str not in _DTYPES:
        raise CheckpointError(path, f"unsupported dtype {dtype_str!r}", tensor=name)
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise CheckpointError(path, f"corrupt header: bad shape {shape!r}", tensor=name)
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(path, f"corrupt header: bad data_offsets {offsets!r}", tensor=name)
    info = TensorInfo(name, dtypes.by_name(_DTYPES[dtype_str]), tuple(shape))
    if offsets[1] - offsets[0] != info.nbytes:
        raise CheckpointError(
            path,
            f"corrupt header: shape {shape} of {dtype_str} needs {info.nbytes} bytes but "
            f"data_offsets span {offsets[1] - offsets[0]}",
            tensor=name,
        )
    return info, (offsets[0], offsets[1])


def build_header(
    tensors: Sequence[TensorInfo], metadata: Mapping[str, str]
) -> tuple[bytes, dict[str, int]]:
    """The header bytes (length prefix included) and each tensor's absolute byte offset.

    Tensors are laid out as the reference writer does (largest dtype first, then by name), the
    JSON is compact with ``__metadata__`` first, and the header is space-padded to 8 bytes so
    every tensor's data is aligned.
    """
    order = sorted(tensors, key=lambda t: (-_DTYPE_RANK[dtype_name(t.dtype)], t.name))
    entries: dict[str, Any] = {}
    if metadata:
        entries["__metadata__"] = dict(sorted(metadata.items()))
    relative: dict[str, int] = {}
    position = 0
    for t in order:
        relative[t.name] = position
        entries[t.name] = {
            "dtype": dtype_name(t.dtype),
            "shape": list(t.shape),
            "data_offsets": [position, position + t.nbytes],
        }
        position += t.nbytes
    try:
        text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        bad = next(
            (n for n in (*relative, *metadata, *metadata.values()) if not is_unicode(n)), "?"
        )
        raise OptionError(
            f"a safetensors header cannot store the name '{escape_text(bad)}' (a tensor name or "
            "metadata, --name included): it is not valid UTF-8"
        ) from None
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    return struct.pack("<Q", len(text)) + text, {n: start + o for n, o in relative.items()}


class SafetensorsWriter(CheckpointWriter):
    """Writes into a hidden temporary file beside ``path`` at precomputed offsets."""

    def begin(self) -> None:
        header, self._offsets = build_header(self.tensors, self.metadata)
        self._file, self._tmp = self.stage_file()
        try:
            self._file.write(header)
            self._file.flush()
            self._file.truncate(len(header) + self._expected)
        except OSError as e:  # a full disk, a quota
            raise OutputError(self.path, e) from None

    @classmethod
    def check(
        cls, path: Path, tensors: Sequence[TensorInfo], template: CheckpointReader | None
    ) -> None:
        check_dtypes(path, tensors)
        check_names(path, [t.name for t in tensors])

    def write(self, name: str, start: int, values: npt.NDArray[np.generic]) -> None:
        data = self._block_bytes(name, start, values)
        offset = self._offsets[name] + start * values.dtype.itemsize
        try:
            write_exact(self._file.fileno(), data, offset)
        except OSError as e:
            raise OutputError(self.path, e) from None
        self._wrote(len(data))

    def finish(self) -> list[tuple[Path, Path]]:
        self._file.close()
        return [(self._tmp, self.path)]

    def _discard(self) -> None:
        file = getattr(self, "_file", None)
        if file is not None:
            # Closing flushes what is buffered, which fails again on a full disk: the file is
            # being thrown away, and the error that led here is the one to report.
            with contextlib.suppress(OSError):
                file.close()
