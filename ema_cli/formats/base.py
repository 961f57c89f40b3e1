"""The small interface every checkpoint format implements.

A reader answers "which tensors, of what dtype and shape" from the header alone, and reads any
flat element range of one tensor on demand, so a replay never holds more than a block in memory.
A writer is given the complete list of tensors up front (so it can lay out the file), accepts
blocks at any element offset in any order, and only makes the output appear on ``commit()``.
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import numpy as np
import numpy.typing as npt

# The atomic-file tools live in ``ema_cli.atomic``; re-exported for existing imports.
from ema_cli.atomic import StagedFile as StagedFile
from ema_cli.atomic import fsync_folder as fsync_folder
from ema_cli.atomic import fsync_path as fsync_path
from ema_cli.atomic import glob_escape as glob_escape
from ema_cli.atomic import publish as publish
from ema_cli.atomic import remove_stale_temporaries as remove_stale_temporaries
from ema_cli.atomic import temporary_sibling as temporary_sibling
from ema_cli.atomic import write_file_atomically as write_file_atomically
from ema_cli.checkpoint import TensorInfo

#: The plain numeric dtypes every format here stores natively (bfloat16 and float8 come from
#: ml_dtypes and each format marks them its own way).
NUMERIC_DTYPES = frozenset(
    np.dtype(t)
    for t in (
        np.bool_,
        np.int8,
        np.int16,
        np.int32,
        np.int64,
        np.uint8,
        np.uint16,
        np.uint32,
        np.uint64,
        np.float16,
        np.float32,
        np.float64,
    )
)


def check_range(info: TensorInfo, start: int, stop: int) -> None:
    """Refuse a block outside the tensor: a caller's bug, never bad input."""
    if not 0 <= start <= stop <= info.size:
        raise ValueError(f"{info.name}: elements [{start}, {stop}) outside its {info.size}")


def read_exact(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from file offset ``offset``; returns the bytes read (fewer only at the end
    of the file)."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def write_exact(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at file offset ``offset`` (positioned writes may be partial)."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


class CheckpointReader(ABC):
    """One checkpoint, opened for reading. Use as a context manager."""

    #: Short format name shown to users ("safetensors", ...).
    format_name: str = ""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    @abstractmethod
    def tensors(self) -> Mapping[str, TensorInfo]:
        """Every tensor in the checkpoint, in file order."""

    @property
    def metadata(self) -> Mapping[str, str]:
        """Free-form string metadata stored with the checkpoint (may be empty)."""
        return {}

    @property
    def optimizer_prefixes(self) -> tuple[str, ...]:
        """Name prefixes of optimizer state (Keras ``optimizer/``, ``optimizer_weights/``),
        copied from the last checkpoint unless asked to average it: not model weights."""
        return ()

    @property
    def non_tensors(self) -> Sequence[str]:
        """What the checkpoint holds besides tensors and metadata, one description each (an
        HDF5 string dataset, a zip member): only a writer of the same format carries it over."""
        return ()

    @abstractmethod
    def read(
        self,
        name: str,
        start: int = 0,
        stop: int | None = None,
        out: npt.NDArray[np.generic] | None = None,
    ) -> npt.NDArray[np.generic]:
        """Elements ``[start, stop)`` of tensor ``name`` in flat (C) order, as a 1-D array.

        With ``out`` (1-D, the tensor's dtype, ``stop - start`` elements) the data lands there.
        """

    def _block(
        self, name: str, start: int, stop: int | None, out: npt.NDArray[np.generic] | None
    ) -> tuple[TensorInfo, int, npt.NDArray[np.generic]]:
        """A ``read``'s prologue: the tensor, ``stop`` (default: its end) checked against its
        size, and ``out`` (allocated when not given)."""
        info = self.tensors[name]
        stop = info.size if stop is None else stop
        check_range(info, start, stop)
        if out is None:
            out = np.empty(stop - start, dtype=info.dtype)
        return info, stop, out

    def file_offset(self, name: str, start: int) -> int | None:
        """Where element ``start`` of ``name`` lies in its file, for formats that store it
        contiguously there (None otherwise). The replay uses it to place read buffers at the
        same offset within a 4 KiB page, which keeps the kernel's copy on its fast path."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles."""

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class CheckpointWriter(ABC):
    """A checkpoint being written. Nothing appears at ``path`` until ``commit()``.

    Used as a context manager, leaving the block without ``commit()`` (or with an exception)
    discards everything written.
    """

    #: Whether the constructor takes ``max_shard_size`` (formats that split into shards).
    takes_max_shard_size = False

    def __init__(
        self,
        path: Path,
        tensors: Sequence[TensorInfo],
        metadata: Mapping[str, str],
        template: CheckpointReader | None = None,
    ) -> None:
        """``template`` is the replay's last checkpoint: formats that carry more than tensors
        (folder side files, HDF5 groups and attributes) copy the rest from it."""
        self.path = path
        self.tensors = list(tensors)
        self.metadata = dict(metadata)
        self.template = template
        self.infos = {t.name: t for t in self.tensors}
        self._expected = sum(t.nbytes for t in self.tensors)
        self._written = 0
        self._count_lock = threading.Lock()

    def _check_block(self, name: str, start: int, values: npt.NDArray[np.generic]) -> TensorInfo:
        """``write``'s prologue: ``values`` fit tensor ``name`` (dtype, range) at ``start``."""
        info = self.infos[name]
        if values.dtype != info.dtype:
            raise TypeError(f"{name}: got {values.dtype}, expected {info.dtype}")
        check_range(info, start, start + values.size)
        return info

    def _block_bytes(self, name: str, start: int, values: npt.NDArray[np.generic]) -> memoryview:
        """``_check_block``, then ``values`` as the bytes to store."""
        self._check_block(name, start, values)
        return np.ascontiguousarray(values).reshape(-1).view(np.uint8).data

    def _wrote(self, nbytes: int) -> None:
        """Count bytes stored by a ``write`` (from any thread)."""
        with self._count_lock:
            self._written += nbytes

    def _check_complete(self) -> None:
        """``commit``'s guard: every byte of every tensor was written (a replay bug otherwise)."""
        if self._written != self._expected:
            raise RuntimeError(
                f"internal error: wrote {self._written} of {self._expected} bytes of {self.path}"
            )

    @classmethod
    def carries_non_tensors(cls, template: CheckpointReader) -> bool:
        """Whether this format copies ``template.non_tensors`` into its output."""
        return False

    @classmethod  # noqa: B027 - a format without limits keeps this no-op
    def check(
        cls, path: Path, tensors: Sequence[TensorInfo], template: CheckpointReader | None
    ) -> None:
        """Raise ``OptionError`` if this format cannot store ``tensors`` (a dtype it has no name
        for, names it cannot hold) or needs another kind of ``template``. Called before any
        work, including by ``--dry-run``; writing nothing."""

    @abstractmethod
    def write(self, name: str, start: int, values: npt.NDArray[np.generic]) -> None:
        """Store ``values`` (1-D, the tensor's dtype) at flat element offset ``start`` of ``name``.

        Safe to call from several threads at once for different ranges.
        """

    @abstractmethod
    def commit(self, durable: bool = True) -> None:
        """Make the complete output appear at ``path`` atomically.

        ``durable`` flushes it to disk first (fsync), so it survives a power loss and not just
        a killed process; that costs a full write to the disk before the rename.
        """

    @abstractmethod
    def abort(self) -> None:
        """Discard everything written; an existing file at ``path`` is untouched."""

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()  # a no-op after commit(); a forgotten commit must not publish half a file


def iter_blocks(size: int, block: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` ranges covering ``[0, size)`` in steps of ``block`` (one empty range for
    an empty tensor, so empty tensors still flow through a replay)."""
    if size == 0:
        yield 0, 0
        return
    for start in range(0, size, block):
        yield start, min(start + block, size)
