"""Files that appear complete or not at all: a temporary sibling, renamed into place.

Everything ema-cli writes goes through here: a hidden temporary file beside its destination
(same folder, so the final ``os.replace`` is a rename on one disk), flushed to disk first when
asked (``durable``), then renamed; what a killed run left behind is recognised by its name and
removed by the next run, under the destination's lock.

An existing file is replaced by swapping it with the temporary (``put_in_place``), not by
renaming over it: ext4 (its default ``auto_da_alloc``) allocates and starts writing out every
dirty block of a file renamed over another *inside* that rename, which held a run for 0.23 s
per 386 MB output on the machine of benchmarks/RESULTS.md (2026-12-02, 07:00 UTC); a swap
and an unlink of the old file took 0.08 s.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO, cast

from ema_cli.errors import CheckpointError, OutputError


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISFIFO, "a fifo (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def open_regular(path: Path, kind: str, missing: str = "no such file") -> int:
    """Open a checkpoint file for reading; refuse, with one line naming it, anything that is
    not a regular file (``kind``: what it should have been).

    A fifo would block ``open`` until a writer comes, and a device (``/dev/zero``) or a pipe
    has no size and no end: a checkpoint must be a file whose size its header can be checked
    against. The type is checked before opening, and again on the open file (opened
    non-blocking, so a fifo swapped in between cannot block either)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(path, missing) from None
    except OSError as e:
        raise CheckpointError(path, f"cannot open: {e.strerror or e}") from None
    if stat.S_ISDIR(info.st_mode):
        raise CheckpointError(path, f"is a directory, not {kind}")
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(path, f"is {_file_kind(info.st_mode)}, not {kind}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CheckpointError(path, missing) from None
    except IsADirectoryError:
        raise CheckpointError(path, f"is a directory, not {kind}") from None
    except OSError as e:
        raise CheckpointError(path, f"cannot open: {e.strerror or e}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise CheckpointError(path, f"is {_file_kind(mode)}, not {kind}")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_regular(path: Path, kind: str, missing: str = "no such file") -> None:
    """``open_regular``'s checks, for a file a library opens by its name (HDF5)."""
    os.close(open_regular(path, kind, missing))


def temporary_sibling(path: Path) -> tuple[BinaryIO, Path]:
    """A new hidden file in ``path``'s folder, so the final ``os.replace`` is a same-disk rename."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(path, e) from None
    return os.fdopen(fd, "w+b"), Path(tmp)


#: What ``temporary_sibling`` and a folder writer's temporary folder add to a destination's name
#: (``.<name>.<8 of mkstemp's characters>.tmp``, ``.<name>.tmp-<8 hex digits>``), exactly: a
#: looser pattern would take another output's temporaries (``.ema.safetensors.x1y2z3w4.tmp``
#: is not a temporary of ``ema``).
_TEMPORARY_FILE = re.compile(r"[a-z0-9_]{8}\.tmp")
_TEMPORARY_FOLDER = re.compile(r"tmp-[0-9a-f]{8}")


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Repair and tidy what killed runs left while writing ``path``: first finish a publication
    its journal says was under way (``recover_publication``), then delete the hidden
    ``.<name>.XXXXXXXX.tmp`` files and ``.<name>.tmp-XXXXXXXX`` folders beside it. Only call
    this while holding ``path``'s lock, when no live run can be writing them. Returns what was
    removed."""
    removed: list[Path] = []
    if not path.parent.is_dir():
        return removed
    recover_publication(path)
    for entry in path.parent.glob(f".{glob_escape(path.name)}.*"):
        name = entry.name[len(path.name) + 2 :]
        try:
            if _TEMPORARY_FOLDER.fullmatch(name) and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif _TEMPORARY_FILE.fullmatch(name) and (entry.is_file() or entry.is_symlink()):
                entry.unlink()
            else:
                continue
        except OSError:
            continue
        removed.append(entry)
    return removed


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters made literal."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


@functools.cache
def _renameat2() -> Callable[[int, bytes, int, bytes, int], int] | None:
    """The C library's ``renameat2`` (Linux, glibc 2.28+), or None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = (
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    )
    function.restype = ctypes.c_int
    return cast(Callable[[int, bytes, int, bytes, int], int], function)


def _exchange(tmp: Path, final: Path) -> bool:
    """Swap ``tmp`` and ``final`` in one atomic step (``renameat2(RENAME_EXCHANGE)``); False,
    with nothing changed, where that fails (no such call, a file system without it, ``final``
    gone): the caller then renames, and meets any real error there."""
    function = _renameat2()
    if function is None:
        return False
    result = function(_AT_FDCWD, os.fsencode(tmp), _AT_FDCWD, os.fsencode(final), _RENAME_EXCHANGE)
    return result == 0


def put_in_place(tmp: Path, final: Path) -> None:
    """``os.replace(tmp, final)``, to every other process alike: ``final`` is the old file or
    the new one, never neither. Where ``final`` is a regular file the two are swapped
    (``_exchange``) and the old one is then removed from ``tmp``'s name: ext4 writes out a
    file renamed over another during the rename (``auto_da_alloc``), a swap it leaves to the
    usual writeback. A kill between the two steps leaves the old file at ``tmp``'s name, a
    temporary the next run removes (``remove_stale_temporaries``; ``recover_publication``
    knows it from the new one by its inode). Anything else (no such file, a symlink, a
    folder, a file system without the swap) is ``os.replace``, errors included."""
    try:
        replacing = stat.S_ISREG(os.lstat(final).st_mode)
    except OSError:
        replacing = False
    if replacing and _exchange(tmp, final):
        with contextlib.suppress(OSError):  # left for the next run's tidying
            os.unlink(tmp)
        return
    os.replace(tmp, final)


def publish(tmp: Path, path: Path, durable: bool = True) -> None:
    """Atomically move a finished temporary file into place (flushed to disk first if
    ``durable``). Without the flush the rename still never exposes a partial file to other
    processes; only a power loss right after it could."""
    try:
        if durable:
            fsync_path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp made it 0600; give it a normal file's mode
        put_in_place(tmp, path)
    except OSError as e:
        raise OutputError(path, e) from None
    if durable:
        fsync_folder(path.parent)


def journal_path(path: Path) -> Path:
    """Where ``publish_all`` records a publication of several files for the output ``path``."""
    return path.with_name(f".{path.name}.publishing")


def publish_all(files: Sequence[tuple[Path, Path]], owner: Path, durable: bool = True) -> None:
    """Move finished temporaries ``(temporary, final)`` into place, in the order given, as the
    output ``owner``: its data files first, the file that names or indexes them last.

    Takes charge of the temporaries: each is published, or removed when this fails before any
    rename. One file is one atomic rename (``publish``). Several renames cannot be one atomic
    step, so a journal (``journal_path(owner)``, listing the renames) is put in place first,
    when every temporary is complete (and flushed, if ``durable``), and removed after the last
    rename. A run killed between two renames leaves the journal and the temporaries not yet
    renamed; the next run's ``remove_stale_temporaries(owner)`` finishes the renames from the
    journal (``recover_publication``), so the output then is the complete new one. Until then
    the output mixes the two generations: files already renamed are new, the rest old (see
    ``CheckpointWriter`` for what that means for a reader and how a format avoids it).
    All files must be siblings of ``owner``, so the renames stay on one disk.
    """
    if len(files) == 1:
        ((tmp, final),) = files
        try:
            publish(tmp, final, durable)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        return
    folder = Path(os.path.abspath(owner.parent))  # spelled alike: mkstemp may return absolute
    if any(Path(os.path.abspath(p.parent)) != folder for pair in files for p in pair):
        raise ValueError(f"{owner}: a publication's files must all be beside it")
    journal = journal_path(owner)
    temporaries = [tmp for tmp, _ in files]
    try:
        recover_publication(owner)  # an earlier run's, never overwritten unfinished
        for tmp in temporaries:
            if durable:
                fsync_path(tmp)
            os.chmod(tmp, 0o666 & ~_UMASK)
        # The inode tells the new file from the old one that a swap leaves at a temporary's
        # name until it is removed (``put_in_place``).
        record = [[tmp.name, final.name, os.lstat(tmp).st_ino] for tmp, final in files]
        handle, staged = temporary_sibling(owner)
        temporaries.append(staged)
        with handle:
            handle.write(json.dumps({"renames": record}).encode("utf-8"))
        publish(staged, journal, durable)
    except OSError as e:
        _remove_files(temporaries)
        raise OutputError(owner, e) from None
    except BaseException:
        _remove_files(temporaries)
        raise
    # From here the journal owns the temporaries: a failure leaves them for the next run.
    for tmp, final in files:
        try:
            put_in_place(tmp, final)
        except OSError as e:
            raise OutputError(final, e) from None
    if durable:
        fsync_folder(folder)
    with contextlib.suppress(FileNotFoundError):
        journal.unlink()


def recover_publication(owner: Path) -> list[Path]:
    """Finish a publication of several files that a killed run left under way (its journal is
    in place): rename every temporary it lists that is still there, then remove the journal.
    Returns the files renamed into place. Call it holding ``owner``'s lock."""
    journal = journal_path(owner)
    try:
        text = journal.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise OutputError(journal, e) from None
    try:
        # [temporary, final, inode of the new file]; journals of earlier versions lack the inode
        renames = [
            (str(entry[0]), str(entry[1]), int(entry[2]) if len(entry) > 2 else None)
            for entry in json.loads(text)["renames"]
        ]
    except (ValueError, KeyError, TypeError, IndexError):
        renames = []  # put in place by a rename, so never partial: not one of ours
    done: list[Path] = []
    for tmp_name, final_name, inode in renames:
        if "/" in tmp_name or "/" in final_name or os.sep in tmp_name + final_name:
            continue
        tmp, final = owner.parent / tmp_name, owner.parent / final_name
        try:
            found = os.lstat(tmp)
        except OSError:
            continue  # renamed into place before the kill
        if not stat.S_ISREG(found.st_mode):
            continue
        if inode is not None and found.st_ino != inode:
            # the old file a swap left there (``put_in_place``): the new one is in place
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            continue
        try:
            put_in_place(tmp, final)
        except OSError as e:
            raise OutputError(final, e) from None
        done.append(final)
    fsync_folder(owner.parent)
    with contextlib.suppress(FileNotFoundError):
        journal.unlink()
    return done


def _remove_files(paths: Sequence[Path]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class StagedFile:
    """A small file (a mapping, an index) whose temporary sibling is created now and published
    later: a run opens it before the work it describes, so a place it cannot write fails before
    anything else is written. Use as a context manager; leaving without ``publish`` removes the
    temporary file."""

    #: Disk space reserved when the file is staged: a mapping or index written after the
    #: outputs were renamed into place cannot then fail for want of space (a full disk is
    #: found before any work, and the outputs are not replaced by a run that then fails).
    RESERVE_BYTES = 256 << 10

    def __init__(self, path: Path, reserve: int = 0) -> None:
        """``reserve``: the most bytes the file will hold, if more than ``RESERVE_BYTES``."""
        self.path = path
        self._file, self._tmp = temporary_sibling(path)
        self._done = False
        try:
            os.posix_fallocate(self._file.fileno(), 0, max(reserve, self.RESERVE_BYTES))
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                self._file.close()
                with contextlib.suppress(FileNotFoundError):
                    self._tmp.unlink()
                raise OutputError(path, e) from None
            # a file system without preallocation: write at publish time, as before
        except AttributeError:  # no posix_fallocate on this platform
            pass

    def publish(self, data: bytes, durable: bool = True) -> None:
        """Write ``data`` and rename the file into place (flushed first if ``durable``)."""
        try:
            with self._file:
                self._file.write(data)
                self._file.truncate(len(data))  # the reserve's end
        except OSError as e:
            self._file.close()
            with contextlib.suppress(FileNotFoundError):
                self._tmp.unlink()
            self._done = True  # nothing left to remove
            raise OutputError(self.path, e) from None
        publish(self._tmp, self.path, durable)
        self._done = True

    def __enter__(self) -> StagedFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._done:
            self._file.close()
            with contextlib.suppress(FileNotFoundError):
                self._tmp.unlink()


def write_file_atomically(path: Path, data: bytes, durable: bool = True) -> None:
    """Write a small file through a temporary file and a rename."""
    with StagedFile(path) as staged:
        staged.publish(data, durable)


def _read_umask() -> int:
    # os.umask can only be read by setting it: done once, at import, before any threads start.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def fsync_path(path: Path) -> None:
    """Flush a file's data to disk; a failure here means lost data, so it is not ignored."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: Path) -> None:
    """Make a folder's entries (renames, new files) durable, where the system allows it."""
    with contextlib.suppress(OSError):
        fsync_path(folder)
