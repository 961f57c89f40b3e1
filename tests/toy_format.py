"""A toy checkpoint format, for tests only: what adding a format to ema-cli takes.

A ``.toy`` file is an 8-byte little-endian header length, a JSON header ``{name: {"dtype",
"shape", "offset"}}`` in file order, then each tensor's raw bytes at its offset. This module
and one ``registry.Format`` line (``TOY`` below, registered by the tests) are the whole format.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ema_cli import dtypes
from ema_cli.checkpoint import TensorInfo
from ema_cli.errors import CheckpointError
from ema_cli.formats.base import (
    CheckpointReader,
    CheckpointWriter,
    read_exact,
    write_exact,
)
from ema_cli.formats.registry import Format

TOY = Format(
    "toy",
    (".toy",),
    "file",
    "tests.toy_format:ToyReader",
    "tests.toy_format:ToyWriter",
    "a toy format, registered by the tests",
)
TOY_READ_ONLY = Format(
    "toy (read only)",
    (".rtoy",),
    "file",
    "tests.toy_format:ToyReader",
    None,
    "the toy format, readable only",
)


def _layout(tensors: Sequence[TensorInfo]) -> tuple[bytes, dict[str, int]]:
    header: dict[str, Any] = {}
    offsets: dict[str, int] = {}
    position = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype.name, "shape": list(t.shape), "offset": position}
        offsets[t.name] = position
        position += t.nbytes
    raw = json.dumps(header).encode()
    start = 8 + len(raw)
    return struct.pack("<Q", len(raw)) + raw, {k: v + start for k, v in offsets.items()}


class ToyReader(CheckpointReader):
    format_name = "toy"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._fd = os.open(path, os.O_RDONLY)
        try:
            (length,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            header = json.loads(os.pread(self._fd, length, 8))
            self._tensors = {
                name: TensorInfo(name, dtypes.by_name(e["dtype"]), tuple(e["shape"]))
                for name, e in header.items()
            }
            self._offsets = {name: 8 + length + e["offset"] for name, e in header.items()}
        except (struct.error, ValueError, KeyError, TypeError) as e:
            os.close(self._fd)
            raise CheckpointError(path, f"not a toy checkpoint ({e})") from None

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._tensors

    def read(
        self,
        name: str,
        start: int = 0,
        stop: int | None = None,
        out: npt.NDArray[np.generic] | None = None,
    ) -> npt.NDArray[np.generic]:
        info, stop, out = self._block(name, start, stop, out)
        view = out.view(np.uint8).data
        offset = self._offsets[name] + start * info.dtype.itemsize
        if read_exact(self._fd, view, offset) != len(view):
            raise CheckpointError(self.path, "truncated", tensor=name)
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class ToyWriter(CheckpointWriter):
    """What a writer implements: ``begin`` (stage the file, write the header), positioned
    ``write``s, ``finish`` (the files to publish); the base class checks, publishes, aborts."""

    def begin(self) -> None:
        header, self._offsets = _layout(self.tensors)
        self._file, self._tmp = self.stage_file()
        write_exact(self._file.fileno(), memoryview(header), 0)

    def write(self, name: str, start: int, values: npt.NDArray[np.generic]) -> None:
        data = self._block_bytes(name, start, values)
        offset = self._offsets[name] + start * self.infos[name].dtype.itemsize
        write_exact(self._file.fileno(), data, offset)
        self._wrote(len(data))

    def finish(self) -> list[tuple[Path, Path]]:
        self._file.close()
        return [(self._tmp, self.path)]

    def _discard(self) -> None:
        file = getattr(self, "_file", None)
        if file is not None:
            file.close()
