"""Keras 3 ``.keras`` archives: a zip of ``metadata.json``, ``config.json`` and
``model.weights.h5`` (Keras writes all three stored, uncompressed), sometimes ``assets/``.

The tensors are those of ``model.weights.h5`` (see ``hdf5``), read in place: a stored member is
a contiguous byte range of the archive, which HDF5 reads through a file window without copying;
a compressed one is first inflated into an anonymous temporary file. The output archive is the
last checkpoint's, member for member and in the same order, with only ``model.weights.h5``
replaced by the averaged weights (same zip date, compression and permissions).
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from ema_cli.checkpoint import TensorInfo
from ema_cli.errors import CheckpointError, OptionError
from ema_cli.formats.base import (
    CheckpointReader,
    CheckpointWriter,
    read_exact,
)
from ema_cli.formats.hdf5 import HDF5Reader, HDF5Writer
from ema_cli.formats.zipfiles import (
    ZIP_ERRORS,
    copy_member,
    copy_zip_info,
    open_zip,
    stored_data_offset,
    stream_member,
    verify_member,
)

WEIGHTS_MEMBER = "model.weights.h5"
CONFIG_MEMBER = "config.json"
#: Members describing the model rather than holding its state: a conversion may leave them.
DESCRIPTION_MEMBERS = ("config.json", "metadata.json")


class _Window(io.RawIOBase):
    """Read-only bytes ``[start, start + size)`` of an open file, as a file of their own."""

    def __init__(self, fd: int, start: int, size: int) -> None:
        super().__init__()
        self._fd = fd
        self._start = start
        self._size = size
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._size}[whence]
        # A damaged file can ask for any address: past the end is simply nothing to read.
        self._position = min(max(0, base + offset), self._size)
        return self._position

    def tell(self) -> int:
        return self._position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        count = max(0, min(len(view), self._size - self._position))
        done = read_exact(self._fd, view[:count], self._start + self._position)
        self._position += done
        return done


class KerasArchiveReader(CheckpointReader):
    format_name = "Keras archive"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._raw, self.archive = open_zip(path, ".keras archive", "a .keras archive")
        self._weights_file: IO[bytes] | None = None
        self._inflated: IO[bytes] | None = None  # a deflated weights member, inflated
        try:
            # The members a .keras output copies are checked now, CRC included, so a damaged
            # config.json fails before the replay rather than when the output is committed.
            # (The weights are read in place when stored; HDF5 checks their structure.)
            for info in self.archive.infolist():
                if info.filename != WEIGHTS_MEMBER and not info.is_dir():
                    verify_member(path, self.archive, info, ".keras archive")
            self.weights = self._open_weights()
        except BaseException:
            self.close()
            raise
        #: Every member in archive order (the writer copies them).
        self.members = self.archive.infolist()
        self._non_tensors = [
            *self.weights.non_tensors,
            *(
                f"archive member '{m.filename}'"
                for m in self.members
                if m.filename not in (WEIGHTS_MEMBER, *DESCRIPTION_MEMBERS) and not m.is_dir()
            ),
        ]

    def _open_weights(self) -> HDF5Reader:
        names = set(self.archive.namelist())
        if WEIGHTS_MEMBER not in names:
            if "model.weights.npz" in names:
                raise CheckpointError(
                    self.path,
                    "its weights are model.weights.npz (saved with weights_format='npz'), "
                    "which ema-cli does not read; save the model with the default h5 weights",
                )
            raise CheckpointError(self.path, f"not a Keras archive: no {WEIGHTS_MEMBER} inside")
        if CONFIG_MEMBER not in names:
            raise CheckpointError(self.path, f"not a Keras archive: no {CONFIG_MEMBER} inside")
        info = self.archive.getinfo(WEIGHTS_MEMBER)
        try:
            if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
                start = stored_data_offset(self._raw, info)
                self._weights_file = io.BufferedReader(
                    _Window(self._raw.fileno(), start, info.file_size)
                )
            else:
                self._inflated = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
                with self.archive.open(info) as member:
                    shutil.copyfileobj(member, self._inflated, 1 << 20)
                self._inflated.flush()
                # Read by position too, never through the file's shared offset: a forked
                # child (hdf5.rehearse_copy) reads the same open file.
                self._weights_file = io.BufferedReader(
                    _Window(self._inflated.fileno(), 0, info.file_size)
                )
        except (*ZIP_ERRORS, RuntimeError) as e:
            raise CheckpointError(self.path, f"corrupt {WEIGHTS_MEMBER} member ({e})") from None
        return HDF5Reader(self.path, file=self._weights_file, member=WEIGHTS_MEMBER)

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        return self.weights.tensors

    @property
    def metadata(self) -> Mapping[str, str]:
        return self.weights.metadata

    def is_optimizer_state(self, name: str) -> bool:
        return self.weights.is_optimizer_state(name)

    @property
    def optimizer_prefixes(self) -> tuple[str, ...]:
        return self.weights.optimizer_prefixes

    @property
    def non_tensors(self) -> Sequence[str]:
        """Non-tensor weights content and archive members beyond the model's description
        (``assets/...``): only a ``.keras`` output carries them over."""
        return self._non_tensors

    @property
    def hdf5_source(self) -> HDF5Reader:
        return self.weights

    def read(
        self,
        name: str,
        start: int = 0,
        stop: int | None = None,
        out: npt.NDArray[np.generic] | None = None,
    ) -> npt.NDArray[np.generic]:
        return self.weights.read(name, start, stop, out)

    def close(self) -> None:
        weights = getattr(self, "weights", None)
        if weights is not None:
            weights.close()
        if self._weights_file is not None:
            self._weights_file.close()
        if self._inflated is not None:
            self._inflated.close()
        self.archive.close()
        self._raw.close()


class KerasArchiveWriter(CheckpointWriter):
    """The template archive with its ``model.weights.h5`` rebuilt by an ``HDF5Writer``."""

    def begin(self) -> None:
        assert isinstance(self.template, KerasArchiveReader)  # check() refused other templates
        self._template = self.template
        self._weights = HDF5Writer(self.path, self.tensors, self.metadata, self.template)

    @classmethod
    def check(
        cls, path: Path, tensors: Sequence[TensorInfo], template: CheckpointReader | None
    ) -> None:
        if not isinstance(template, KerasArchiveReader):
            raise OptionError(
                f"{path}: a .keras output needs .keras inputs (it takes config.json and the "
                "other archive members from the last checkpoint); write a .weights.h5 output "
                "for the weights alone"
            )
        HDF5Writer.check(path, tensors, template)

    @classmethod
    def carries_non_tensors(cls, template: CheckpointReader) -> bool:
        """A ``.keras`` template's members and weights file are rebuilt whole."""
        return isinstance(template, KerasArchiveReader)

    def write(self, name: str, start: int, values: npt.NDArray[np.generic]) -> None:
        self._weights.write(name, start, values)
        self._wrote(values.nbytes)

    def finish(self) -> list[tuple[Path, Path]]:
        weights = self._weights.complete()
        handle, tmp = self.stage_file()
        with handle, zipfile.ZipFile(handle, "w", allowZip64=True) as out:
            out.comment = self._template.archive.comment
            for info in self._template.members:
                if info.filename != WEIGHTS_MEMBER:
                    copy_member(self._template.archive, info, out)
                    continue
                new = copy_zip_info(info)
                new.file_size = weights.stat().st_size
                with open(weights, "rb") as data:
                    stream_member(out, new, data)
        return [(tmp, self.path)]

    def _discard(self) -> None:
        weights = getattr(self, "_weights", None)
        if weights is not None:
            weights.abort()  # removes the temporary weights file
