"""The small interface every checkpoint format implements.

A reader answers "which tensors, of what dtype and shape" from the header alone, and reads any
flat element range of one tensor on demand, so a replay never holds more than a block in memory.
A writer is given the complete list of tensors up front (so it can lay out the file), accepts
blocks at any element offset in any order, and only makes the output appear on ``commit()``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Generic, TypeVar

import numpy as np
import numpy.typing as npt

# The atomic-file tools live in ``ema_cli.atomic``; re-exported for existing imports.
from ema_cli.atomic import StagedFile as StagedFile
from ema_cli.atomic import fsync_folder as fsync_folder
from ema_cli.atomic import fsync_path as fsync_path
from ema_cli.atomic import glob_escape as glob_escape
from ema_cli.atomic import publish as publish
from ema_cli.atomic import publish_all
from ema_cli.atomic import remove_stale_temporaries as remove_stale_temporaries
from ema_cli.atomic import temporary_sibling as temporary_sibling
from ema_cli.atomic import write_file_atomically as write_file_atomically
from ema_cli.checkpoint import TensorInfo
from ema_cli.errors import OutputError

ScanT = TypeVar("ScanT")

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


def open_for_reading(path: Path, kind: str, missing: str = "no such file") -> int:
    """Open a checkpoint file, failing with one line naming it: missing, a directory, or not a
    regular file at all (a fifo would block the open; ``kind``: what it should have been).
    See ``atomic.open_regular``."""
    from ema_cli.atomic import open_regular

    return open_regular(path, kind, missing)


def file_identity(st: os.stat_result) -> tuple[int, ...]:
    """A file as it is now: device, inode, size, mtime and ctime (a file written in place
    changes its mtime and ctime; one replaced gets another inode)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class SharedScans(Generic[ScanT]):
    """What readers found in files, by file identity, shared by every reader of a file while
    one is open (the replay's workers each reopen every checkpoint). A scan is kept only while
    a reader holding it is open, so its file cannot have been replaced by another with the
    same identity meanwhile. Shared by all threads."""

    def __init__(self) -> None:
        self._held: dict[tuple[int, ...], list[Any]] = {}
        self._lock = threading.Lock()

    def acquire(self, identity: tuple[int, ...], scan: Callable[[], ScanT]) -> ScanT:
        """The scan of the file ``identity`` names, made by ``scan()`` if no reader of it is
        open; the caller ``release``s it when it closes."""
        with self._lock:
            held = self._held.get(identity)
            if held is not None:
                held[1] += 1
                return held[0]  # type: ignore[no-any-return]
        made = scan()
        with self._lock:
            held = self._held.setdefault(identity, [made, 0])  # another thread's, if first
            held[1] += 1
            return held[0]  # type: ignore[no-any-return]

    def __len__(self) -> int:
        """The files whose scans are held now."""
        return len(self._held)

    def release(self, identity: tuple[int, ...]) -> None:
        with self._lock:
            held = self._held.get(identity)
            if held is not None:
                held[1] -= 1
                if held[1] <= 0:
                    del self._held[identity]


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
    #: Whether ``read`` may run in several threads at once on one reader: positioned reads of
    #: its open files, and nothing else that changes without a lock. The replay's worker
    #: threads then read through the reader the run opened, instead of each opening its own
    #: (which parses every header again: for a checkpoint of many small tensors that took
    #: longer than reading them).
    thread_safe_reads: bool = False

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

    def tensor_notes(self, name: str) -> Mapping[str, str]:
        """What else the format knows about tensor ``name``, for ``inspect`` (a TensorFlow
        checkpoint's object path and role); empty by default."""
        return {}

    def is_optimizer_state(self, name: str) -> bool:
        """Whether tensor ``name`` is optimizer state (Adam moments, iteration counters): it is
        copied from the last checkpoint unless asked to average it, as it is not model weights.
        Each format decides from what it knows: Keras' ``optimizer/`` groups, a torch
        checkpoint's optimizer dicts, a TensorFlow object graph."""
        return False

    @property
    def non_tensors(self) -> Sequence[str]:
        """What the checkpoint holds besides tensors and metadata, one description each (an
        HDF5 string dataset, a zip member): only a writer of the same format carries it over."""
        return ()

    @property
    def shared_tensors(self) -> Sequence[tuple[str, ...]]:
        """Groups of tensors stored in one piece of memory (torch's tied weights: views of one
        storage), each in file order; none for formats that store every tensor apart. A writer
        that does not ``keeps_shared_storage`` writes each of them as its own copy."""
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

    The lifecycle is written once, here; a format implements only what is its own:

    - ``begin()``: lay the output out in temporary files (``stage_file()``, ``stage_folder()``;
      the base class removes them whatever happens) and write what is known up front. Called
      by the constructor: if it fails, everything staged is removed and the error re-raised
      (``OSError`` as ``OutputError``). A format with more constructor arguments stores them
      before calling ``super().__init__``.
    - ``write(name, start, values)``: a positioned write of one block, from any thread, in any
      order; count it with ``_wrote`` (``_block_bytes`` checks the block and gives its bytes).
    - ``finish()``: complete the temporaries (zip them, write an index, close files) and return
      ``(temporary, final)`` pairs in publication order: data files first, the file that names
      or indexes them (a bundle's ``.index``, a manifest) last.
    - ``_discard()`` (optional): release what the format holds (open files, an inner writer)
      before its temporaries are removed; called once, after commit or on abort.
    - ``check()`` (classmethod, optional): refuse what the format cannot store. It is run once,
      by ``formats.check_writer`` (which ``create_writer`` and ``--dry-run`` go through, and
      which also refuses lossy conversions): a writer constructed directly trusts its caller.
    - ``orphans(path)`` (classmethod, optional): files an earlier output at ``path`` used and
      the current one no longer does, removed by ``clean_up(path)``.
    - ``_publish(files, durable)`` (optional): how the finished files are moved into place;
      by default ``atomic.publish_all``. The folder writer swaps a whole folder instead.

    ``commit(durable)`` checks every byte was written, calls ``finish()``, publishes the
    files in order and marks the writer done; any failure aborts. ``abort()`` is idempotent
    and removes every temporary; leaving the ``with`` block without ``commit()`` aborts.

    **Outputs of several files.** One file is one atomic rename. Several are renamed one by
    one, data first and index last, after a journal listing the renames is in place
    (``atomic.publish_all``). A kill between two renames leaves the journal, the temporaries
    not yet renamed, and at ``path`` a mix: the new data files beside the *old* index. If the
    data files keep their names from one output to the next (a TensorFlow bundle's
    ``X.data-00000-of-00001`` beside ``X.index``), the old checkpoint is then inconsistent: its
    index describes bytes that were replaced (a bundle's checksums then fail as
    ``CheckpointError`` on reading; a format without checksums could read wrong values). The
    next run's ``clean_up(path)`` (``remove_stale_temporaries``, called under the output's lock
    before anything is written) finishes the renames from the journal, so the output is the
    complete new one, then removes ``orphans``. A format that can name its data files freely
    avoids the window altogether: it publishes them under new names (a generation number or
    their digest), which never replace a file the old index names, and lists the previous
    generation's files in ``orphans``: a kill then leaves the old checkpoint intact beside
    unreferenced new files, which the next run either publishes (journal) or removes.
    """

    #: Whether the constructor takes ``max_shard_size`` (formats that split into shards).
    takes_max_shard_size = False
    #: Whether tensors a template stores in one piece of memory (``shared_tensors``) share one
    #: in the output too; a writer that cannot writes each as its own copy (and
    #: ``formats.conversion_warnings`` says so).
    keeps_shared_storage = False

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
        self._done = False
        self._staged: list[Path] = []
        try:
            self.begin()
        except OSError as e:
            self.abort()
            raise OutputError(path, e) from None
        except BaseException:
            self.abort()
            raise

    # ------------------------------------------------------------ what a format implements

    def begin(self) -> None:  # noqa: B027 - a format that overrides __init__ keeps this no-op
        """Create the temporary files (``stage_file``) and write what is known up front."""

    @abstractmethod
    def write(self, name: str, start: int, values: npt.NDArray[np.generic]) -> None:
        """Store ``values`` (1-D, the tensor's dtype) at flat element offset ``start`` of ``name``.

        Safe to call from several threads at once for different ranges.
        """

    def finish(self) -> list[tuple[Path, Path]]:
        """Complete the temporaries; ``(temporary, final)`` pairs in publication order."""
        raise NotImplementedError(f"{type(self).__name__} implements neither finish nor commit")

    def _discard(self) -> None:  # noqa: B027 - optional hook
        """Release open files and inner writers (after commit, or on abort)."""

    def _publish(self, files: Sequence[tuple[Path, Path]], durable: bool) -> None:
        """Move the finished files into place, in order (``atomic.publish_all``)."""
        handed = {tmp for tmp, _ in files}
        self._staged = [p for p in self._staged if p not in handed]  # publish_all's now
        publish_all(files, self.path, durable)

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
        work, by ``formats.check_writer`` (so by ``--dry-run`` too); writing nothing."""

    @classmethod
    def orphans(cls, path: Path) -> list[Path]:
        """Files beside ``path`` an earlier output used and the one there now does not (a
        previous generation's data files); none by default."""
        return []

    @classmethod
    def clean_up(cls, path: Path) -> list[Path]:
        """Repair and tidy what killed runs left at ``path``: finish an interrupted
        publication, remove stale temporaries and ``orphans``. Call it holding ``path``'s
        lock, before writing. Returns what was removed."""
        removed = remove_stale_temporaries(path)
        for orphan in cls.orphans(path):
            with contextlib.suppress(FileNotFoundError):
                orphan.unlink()
            removed.append(orphan)
        return removed

    # ------------------------------------------------------------ helpers for formats

    def stage_file(self) -> tuple[BinaryIO, Path]:
        """A new temporary file beside ``path`` (``.<name>.XXXXXXXX.tmp``, which the next run's
        clean-up recognises), removed on abort unless published."""
        handle, tmp = temporary_sibling(self.path)
        self._staged.append(tmp)
        return handle, tmp

    def stage_folder(self) -> Path:
        """A new hidden temporary folder beside ``path`` (``.<name>.tmp-XXXXXXXX``), removed
        with its contents on abort unless published."""
        while True:
            candidate = self.path.with_name(f".{self.path.name}.tmp-{secrets.token_hex(4)}")
            try:
                os.mkdir(candidate, 0o777)  # the umask applies: the output gets usual modes
            except FileExistsError:
                continue
            self._staged.append(candidate)
            return candidate

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

    # ------------------------------------------------------------ the lifecycle

    def commit(self, durable: bool = True) -> None:
        """Make the complete output appear at ``path``: ``finish()``, then publish its files in
        order. Any failure aborts (an interrupted multi-file publication is finished by the
        next run's ``clean_up``, see the class docstring).

        ``durable`` flushes it to disk first (fsync), so it survives a power loss and not just
        a killed process; that costs a full write to the disk before the rename.
        """
        if self._done:
            raise RuntimeError(f"{self.path}: commit() after commit() or abort()")
        try:
            self._check_complete()
            self._publish(self.finish(), durable)
        except OSError as e:
            self.abort()
            raise OutputError(self.path, e) from None
        except BaseException:
            self.abort()
            raise
        self._done = True
        self._release()

    def abort(self) -> None:
        """Discard everything written; an existing output at ``path`` is untouched. Idempotent."""
        if self._done:
            return
        self._done = True
        self._release()

    def _release(self) -> None:
        try:
            self._discard()
        finally:
            staged, self._staged = self._staged, []
            for tmp in staged:
                if tmp.is_dir() and not tmp.is_symlink():
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        tmp.unlink()

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
