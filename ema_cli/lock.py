"""Advisory locks so two runs never write the same output or state at once.

``flock`` locks belong to an open file: the kernel drops them when the process dies, however it
dies, so a lock left by a killed run never blocks the next one. The lock file (hidden, beside
what it guards) is removed on release; a run that locked a file just unlinked by the previous
holder notices (the path no longer names its file) and locks the new one instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from ema_cli.errors import EmaCliError, OutputError


class LockedError(EmaCliError):
    """Another run holds the lock: try again later (EX_TEMPFAIL, which cron wrappers retry)."""

    exit_code = 75


def lock_path(target: Path) -> Path:
    """The lock file guarding ``target`` (a file or a state folder): ``.<name>.lock`` beside it."""
    return target.with_name(f".{target.name}.lock")


@contextlib.contextmanager
def exclusive(target: Path, what: str) -> Iterator[None]:
    """Hold the lock on ``target`` for the block, or raise ``LockedError`` at once."""
    path = lock_path(target)
    fd = _acquire(path, target, what)
    try:
        with contextlib.suppress(OSError):  # the pid is only a courtesy for the error message
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # while still holding the lock, so nobody can be between open and flock
        os.close(fd)  # releases the lock


def _acquire(path: Path, target: Path, what: str) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # named by what the user gave, not the hidden lock file
            raise OutputError(target, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            by = f" (pid {holder})" if holder.isdigit() else ""
            raise LockedError(
                f"{target}: the {what} is locked by another ema-cli run{by}; try again later"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # we locked a file the previous holder had just removed: try again
