"""Files that appear complete or not at all: a temporary sibling, renamed into place.

Everything ema-cli writes goes through here: a hidden temporary file beside its destination
(same folder, so the final ``os.replace`` is a rename on one disk), flushed to disk first when
asked (``durable``), then renamed; what a killed run left behind is recognised by its name and
removed by the next run, under the destination's lock.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

from ema_cli.errors import OutputError


def temporary_sibling(path: Path) -> tuple[BinaryIO, Path]:
    """A new hidden file in ``path``'s folder, so the final ``os.replace`` is a same-disk rename."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(path, e) from None
    return os.fdopen(fd, "w+b"), Path(tmp)


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete what killed runs left while writing ``path``: hidden ``.<name>.*.tmp`` files and
    ``.<name>.tmp-*`` folders beside it. Only call this while holding ``path``'s lock, when no
    live run can be writing them. Returns what was removed."""
    removed: list[Path] = []
    if not path.parent.is_dir():
        return removed
    for entry in path.parent.glob(f".{glob_escape(path.name)}.*"):
        name = entry.name[len(path.name) + 2 :]
        try:
            if entry.is_dir() and not entry.is_symlink() and name.startswith("tmp-"):
                shutil.rmtree(entry)
            elif name.endswith(".tmp") and (entry.is_file() or entry.is_symlink()):
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


def publish(tmp: Path, path: Path, durable: bool = True) -> None:
    """Atomically move a finished temporary file into place (flushed to disk first if
    ``durable``). Without the flush the rename still never exposes a partial file to other
    processes; only a power loss right after it could."""
    try:
        if durable:
            fsync_path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp made it 0600; give it a normal file's mode
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(path, e) from None
    if durable:
        fsync_folder(path.parent)


class StagedFile:
    """A small file (a mapping, an index) whose temporary sibling is created now and published
    later: a run opens it before the work it describes, so a place it cannot write fails before
    anything else is written. Use as a context manager; leaving without ``publish`` removes the
    temporary file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file, self._tmp = temporary_sibling(path)
        self._done = False

    def publish(self, data: bytes, durable: bool = True) -> None:
        """Write ``data`` and rename the file into place (flushed first if ``durable``)."""
        try:
            with self._file:
                self._file.write(data)
        except OSError as e:
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
