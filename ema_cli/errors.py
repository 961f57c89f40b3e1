"""One exception family. Every message names the file (and tensor) at fault.

The CLI maps ``EmaCliError`` to its ``exit_code`` and prints ``str(error)`` as one line; anything
else is a bug (exit 1).
"""

from __future__ import annotations

import os


class EmaCliError(Exception):
    """A problem the user can fix: bad input or bad options. Exit status 2."""

    exit_code = 2


class CheckpointError(EmaCliError):
    """A checkpoint that is missing, unreadable, corrupt, or disagrees with the others."""

    def __init__(self, path: str | os.PathLike[str], message: str, tensor: str | None = None):
        self.path = os.fspath(path)
        self.tensor = tensor
        where = f"{self.path}: tensor '{tensor}'" if tensor is not None else self.path
        super().__init__(f"{where}: {message}")


class TruncatedCheckpointError(CheckpointError):
    """A checkpoint shorter than its header says: typically still being written."""


class OptionError(EmaCliError):
    """An option value or a combination of options that cannot work."""


class OutputError(EmaCliError):
    """The output (or mapping) cannot be written: permissions, a full disk, a missing folder."""

    def __init__(self, path: str | os.PathLike[str], error: OSError):
        self.path = os.fspath(path)
        super().__init__(f"{self.path}: cannot write: {error.strerror or error}")
