"""What a run writes, checked against what it must never touch: the inputs.

Every path given as a checkpoint (whether or not ``--last``/``--min-step``/``--max-step`` select
it), the file a folder resolves to, and every file inside a checkpoint folder are protected.
Nothing a run writes may be one of them, under any spelling (symlinks, ``..``, hard links: files
are compared by device and inode as well as by real path): not the output, a trajectory file,
the mapping, the state folder, nor the hidden temporaries and lock files made beside them, which
an interrupted run's successor deletes by name. Pure checks: nothing is created or changed.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ema_cli.errors import OptionError


@dataclass(frozen=True)
class Target:
    """Something a run writes: a file, or a folder it replaces whole (``folder``)."""

    path: Path
    what: str  # "output", "mapping file", "trajectory file", "state folder"
    folder: bool = False


@dataclass(frozen=True)
class _Input:
    given: str  # as the user spelled the checkpoint
    real: str  # os.path.realpath of this file or folder
    identity: tuple[int, int] | None  # (st_dev, st_ino); None if it cannot be stat'ed
    is_dir: bool


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _walk(given: str, path: Path) -> Iterator[_Input]:
    real = os.path.realpath(path)
    yield _Input(given, real, _identity(real), os.path.isdir(real))
    if os.path.isdir(real):
        for folder, _dirs, files in os.walk(real):
            for name in files:
                file = os.path.join(folder, name)
                yield _Input(given, os.path.realpath(file), _identity(file), False)


def _inside(real: str, folder_real: str) -> bool:
    return real != folder_real and real.startswith(folder_real.rstrip(os.sep) + os.sep)


def _leftover_patterns(name: str) -> tuple[str, ...]:
    """Names a run creates beside ``name`` and a later run deletes (``formats.base`` and
    ``lock``): temporary files, temporary folders, the lock file."""
    escaped = "".join(f"[{c}]" if c in "*?[" else c for c in name)
    return (f".{escaped}.*.tmp", f".{escaped}.tmp-*", f".{escaped}.lock")


def check_targets(inputs: Sequence[tuple[str, Path]], targets: Sequence[Target]) -> None:
    """Refuse (``OptionError``) any target that is, holds, lies inside, or would clean away an
    input, and targets that are each other. ``inputs`` are ``(as given, path)`` pairs: every
    checkpoint argument and the file it resolves to."""
    protected = [entry for given, path in inputs for entry in _walk(given, path)]
    by_identity = {e.identity: e for e in protected if e.identity is not None}
    by_real = {e.real: e for e in protected}
    folders = [e for e in protected if e.is_dir]

    seen: dict[str, Target] = {}
    for target in targets:
        real = os.path.realpath(target.path)
        parent = os.path.dirname(real)
        hit = by_real.get(real) or by_identity.get(_identity(str(target.path)) or (-1, -1))
        if hit is not None:
            raise OptionError(
                f"{target.path}: the {target.what} is one of the input checkpoints ({hit.given})"
            )
        for entry in folders:
            if _inside(real, entry.real):
                raise OptionError(
                    f"{target.path}: the {target.what} would be written inside the input "
                    f"checkpoint folder {entry.given}"
                )
        if target.folder:
            for entry in protected:
                if _inside(entry.real, real):
                    noun = (
                        target.what if target.what.endswith("folder") else f"{target.what} folder"
                    )
                    raise OptionError(
                        f"{target.path}: the {noun} holds the input checkpoint {entry.given}; "
                        "name another folder"
                    )
        patterns = _leftover_patterns(os.path.basename(real))
        for entry in protected:
            if os.path.dirname(entry.real) == parent and any(
                fnmatch.fnmatchcase(os.path.basename(entry.real), p) for p in patterns
            ):
                raise OptionError(
                    f"{target.path}: the input checkpoint {entry.given} is named like a temporary "
                    f"file of the {target.what}, which ema-cli removes; rename one of them"
                )
        other = seen.get(real)
        if other is not None:
            raise OptionError(f"{target.path}: the {target.what} cannot also be the {other.what}")
        for earlier in seen.values():
            if earlier.folder and _inside(real, os.path.realpath(earlier.path)):
                raise OptionError(
                    f"{target.path}: the {target.what} cannot be inside {earlier.path}, the "
                    f"{earlier.what}"
                )
            if target.folder and _inside(os.path.realpath(earlier.path), real):
                raise OptionError(
                    f"{earlier.path}: the {earlier.what} cannot be inside {target.path}, the "
                    f"{target.what}"
                )
        seen[real] = target
