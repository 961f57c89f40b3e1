"""Checkpoint formats behind one interface, chosen by file suffix (or folder contents)."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ema_cli.errors import CheckpointError, OptionError
from ema_cli.formats import registry
from ema_cli.formats.registry import Format, strip_suffix

# numpy and the reader/writer base classes load on first use, so that the registry (``--help``,
# step numbers) can be read without them.
if TYPE_CHECKING:
    from ema_cli.checkpoint import TensorInfo
    from ema_cli.formats.base import CheckpointReader, CheckpointWriter


def __getattr__(name: str) -> Any:
    if name in ("CheckpointReader", "CheckpointWriter"):
        from ema_cli.formats import base

        return getattr(base, name)
    if name == "TensorInfo":
        from ema_cli.checkpoint import TensorInfo

        return TensorInfo
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CheckpointReader",
    "CheckpointWriter",
    "Format",
    "TensorInfo",
    "check_output_path",
    "check_writer",
    "checkpoint_files",
    "checkpoint_stats",
    "conversion_warnings",
    "create_writer",
    "find_checkpoint",
    "format_of",
    "is_folder_output",
    "lost_in_conversion",
    "open_checkpoint",
    "output_format",
    "strip_suffix",
]

#: A last name part that looks like a file extension (``.safetensor``, ``.v2``), unlike the dots
#: in a folder name such as ``llama-3.1-ema``.
_FILE_EXTENSION = re.compile(r"\.[A-Za-z][A-Za-z0-9]*")


def is_folder_output(path: Path) -> bool:
    """Whether ``-o PATH`` names a model folder rather than a checkpoint file.

    An existing folder, or a name without a file extension (``ema``, ``checkpoint-ema``,
    ``llama-3.1-ema``), is a folder; a mistyped extension (``ema.safetensor``) stays a file name
    and is refused as an unknown format instead of quietly becoming a folder.
    """
    if path.is_dir():
        return True
    return registry.suffix_of(path.name) is None and not _FILE_EXTENSION.fullmatch(path.suffix)


def format_of(path: Path) -> Format | None:
    """The format of an input checkpoint: a folder by its markers, a file by its suffix."""
    if path.is_dir():
        return registry.folder_format(path, opening=True)
    return registry.by_suffix(path.name)


def find_checkpoint(path: Path) -> Path:
    """The checkpoint a command-line argument names.

    A file is taken as is. A folder holding a folder format's marker (a sharded model's index:
    ``model.safetensors.index.json``, ``pytorch_model.bin.index.json``) is one checkpoint and
    is returned itself; a folder holding a model file by its Hugging Face name
    (``model.safetensors``, ``pytorch_model.bin``: a Trainer ``checkpoint-N/`` with its
    ``optimizer.pt`` and ``rng_state.pth``) is read through that file; safetensors weights are
    preferred to torch ones, as ``from_pretrained`` prefers them. Any other folder must hold
    exactly one checkpoint file of a format we read.
    """
    if path.is_dir():
        weights = registry.folder_checkpoint(path)
        if weights is not None:
            return weights
        model = registry.model_file(path)  # a Trainer checkpoint-N/: weights beside optimizer.pt
        if model is not None:
            return model
        found = sorted(
            p for p in path.iterdir() if p.is_file() and registry.by_suffix(p.name) is not None
        )
        if len(found) == 1:
            return found[0]
        if not found:
            patterns = ", ".join(f"*{s}" for s in registry.readable())
            raise CheckpointError(path, f"folder holds no checkpoint file ({patterns})")
        names = ", ".join(p.name for p in found[:3]) + (", ..." if len(found) > 3 else "")
        suffix = registry.suffix_of(found[0].name) or found[0].suffix
        every = os.path.join(path, "*" + suffix)
        raise CheckpointError(
            path,
            f"folder holds {len(found)} checkpoint files ({names}); name one, or all of them "
            f"with {every}",
        )
    if not path.exists():
        prefixed = registry.prefix_format(path)  # TensorFlow's run/ckpt-1200 for .index & co
        if prefixed is not None:
            return prefixed[1]
        raise CheckpointError(path, "no such file or directory")
    if registry.by_suffix(path.name) is None:
        main = registry.companion_of(path)
        if main is not None:
            pattern = os.path.join(path.parent, re.sub(r"\d+", "*", main.name))
            raise CheckpointError(
                path,
                f"is a data file of the checkpoint {main}; name checkpoints by that file (for "
                f"all of them: {pattern})",
            )
    return path


def open_checkpoint(path: Path) -> CheckpointReader:
    """Open a checkpoint for reading, in the format ``format_of`` finds."""
    fmt = format_of(path)
    if fmt is None:
        if path.is_dir():
            markers = [
                m
                for f in registry.formats()
                if f.layout == "folder"
                for m in f.markers + f.single_files
            ]
            raise CheckpointError(path, f"folder holds neither {' nor '.join(markers)}")
        known = ", ".join(sorted(registry.readable()))
        raise CheckpointError(path, f"unsupported checkpoint format (ema-cli reads {known})")
    reader: CheckpointReader = fmt.reader_class()(path)
    return reader


def rehearsing_ahead(paths: Sequence[Path]) -> AbstractContextManager[None]:
    """Around opening ``paths`` one by one (a run's inputs, in that order): the HDF5 files
    among them have their libhdf5 rehearsal done ahead, by one child beside this process
    (``hdf5.rehearsing_ahead``), instead of each open waiting for its own."""
    found = []
    for path in paths:
        try:
            fmt = format_of(path)
        except (CheckpointError, OSError):
            continue  # the open itself reports it
        if fmt is not None and fmt.reader == "hdf5:HDF5Reader":
            found.append(path)
    if len(found) < 2:
        return contextlib.nullcontext()
    from ema_cli.formats import hdf5

    return hdf5.rehearsing_ahead(found)


def checkpoint_files(path: Path) -> list[Path]:
    """The files that make the checkpoint at ``path`` (for sizes, mtimes and digests)."""
    fmt = format_of(path)
    if fmt is not None:
        return fmt.checkpoint_files(path)
    return sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]


def checkpoint_stats(path: Path) -> tuple[int, int]:
    """A checkpoint's size in bytes and modification time (ns): the total of its files and the
    newest of them."""
    files = checkpoint_files(path)
    stats = []
    for file in files:
        try:
            stats.append(file.stat())
        except FileNotFoundError:  # a TensorFlow data shard, say, deleted or never copied
            raise CheckpointError(file, f"missing: it is part of the checkpoint {path}") from None
        except OSError as e:
            raise CheckpointError(file, f"cannot read: {e.strerror}") from None
    default = os.stat(path).st_mtime_ns if path.exists() else 0
    mtime = max((s.st_mtime_ns for s in stats), default=default)
    return sum(s.st_size for s in stats), mtime


def output_format(path: Path, folder: bool, folder_format: str | None = None) -> Format:
    """The format ``-o path`` writes (for folder outputs the folder format ``folder_format``
    names, ``--folder-format``'s value, by default the first); ``OptionError`` when no
    registered format writes it."""
    if folder:
        try:
            return registry.folder_output_format(folder_format)
        except ValueError as e:
            raise OptionError(f"{path}: {e}") from None
    fmt = registry.by_suffix(path.name)
    if fmt is None or fmt.writer is None:
        known = ", ".join(sorted(registry.writable()))
        raise OptionError(f"{path}: unsupported output format (ema-cli writes {known})")
    return fmt


def check_output_path(path: Path) -> None:
    """Refuse an output whose format we cannot write, before any work is done."""
    output_format(path, is_folder_output(path))


def lost_in_conversion(
    path: Path,
    template: CheckpointReader | None,
    folder: bool | None = None,
    folder_format: str | None = None,
) -> list[str]:
    """What ``template`` holds besides tensors that an output at ``path`` cannot carry."""
    if template is None or not template.non_tensors:
        return []
    folder = is_folder_output(path) if folder is None else folder
    writer: type[CheckpointWriter] = output_format(path, folder, folder_format).writer_class()
    return [] if writer.carries_non_tensors(template) else list(template.non_tensors)


def conversion_warnings(
    path: Path,
    tensors: Sequence[TensorInfo],
    template: CheckpointReader | None = None,
    folder: bool | None = None,
    drop_non_tensors: bool = False,
    folder_format: str | None = None,
) -> list[str]:
    """What a conversion changes without losing a value, for a warning (not a refusal):
    tensors that share storage in ``template`` (torch's tied weights) and that the output
    format writes as separate copies, since it has no shared storage (safetensors, npz, ...).
    Every loader reads such copies; ``from_pretrained`` ties them again from the config.

    ``check_writer`` runs first (its ``OptionError`` propagates), so no warning is given for an
    output that is then refused."""
    writer = check_writer(path, tensors, template, folder, drop_non_tensors, folder_format)
    if template is None or not template.shared_tensors or writer.keeps_shared_storage:
        return []
    folder = is_folder_output(path) if folder is None else folder
    groups = [" = ".join(group) for group in template.shared_tensors]
    listed = "; ".join(groups[:3]) + (f"; and {len(groups) - 3} more" if len(groups) > 3 else "")
    if folder:
        kind = f"a {output_format(path, folder, folder_format).name}"
        keep = "--folder-format torch keeps them shared"
    else:
        kind, keep = f"a {registry.suffix_of(path.name)} file", "a .pt output keeps them shared"
    return [
        f"{template.path}: tied tensors ({listed}) are written as separate copies: {kind} "
        f"cannot share storage ({keep})"
    ]


def check_writer(
    path: Path,
    tensors: Sequence[TensorInfo],
    template: CheckpointReader | None = None,
    folder: bool | None = None,
    drop_non_tensors: bool = False,
    folder_format: str | None = None,
) -> type[CheckpointWriter]:
    """Refuse an output that could not be written (``OptionError``), before any work: an
    unknown suffix, a dtype or name the format cannot store, or a conversion that would drop
    what the template holds besides tensors. Returns the writer class; writes nothing, so
    ``--dry-run`` runs it too. ``folder``, ``folder_format``: as in ``create_writer``."""
    if folder is None:
        folder = is_folder_output(path)
    fmt = output_format(path, folder, folder_format)
    writer: type[CheckpointWriter] = fmt.writer_class()
    lost = lost_in_conversion(path, template, folder, folder_format)
    if lost and not drop_non_tensors:
        # A conversion keeps every tensor; refuse it when the input holds data that is not one.
        assert template is not None
        more = f" and {len(lost) - 1} more" if len(lost) > 1 else ""
        kind = "a model folder" if folder else f"a {registry.suffix_of(path.name)} file"
        source = format_of(Path(template.path))
        if source is not None and source.writer is not None:
            keep = registry.suffix_of(Path(template.path).name) or "same-format"
            how = f"write a {keep} output to keep it, or pass --drop-non-tensors to leave it out"
        else:
            how = "pass --drop-non-tensors to leave it out (ema-cli does not write that format)"
        raise OptionError(
            f"{path}: {template.path} holds {lost[0]}{more}, which {kind} cannot hold; {how}"
        )
    writer.check(path, tensors, template)
    return writer


def create_writer(
    path: Path,
    tensors: Sequence[TensorInfo],
    metadata: Mapping[str, str],
    template: CheckpointReader | None = None,
    max_shard_size: int | None = None,
    folder: bool | None = None,
    drop_non_tensors: bool = False,
    folder_format: str | None = None,
) -> CheckpointWriter:
    """Start writing a checkpoint at ``path`` in the format its suffix names (``check_writer``
    first).

    ``template`` (the last input checkpoint) lets a format copy what is not a tensor. A folder
    output (``folder``, or by default a name without a file suffix) is written by the folder
    format ``folder_format`` names (``--folder-format``: ``safetensors``, ``torch``), by
    default the first folder format that writes, sharded at ``max_shard_size`` bytes.
    """
    writer = check_writer(path, tensors, template, folder, drop_non_tensors, folder_format)
    if max_shard_size is not None and writer.takes_max_shard_size:
        sharding: Any = writer  # a writer class that declares the extra argument
        made: CheckpointWriter = sharding(
            path, tensors, metadata, template, max_shard_size=max_shard_size
        )
        return made
    return writer(path, tensors, metadata, template)
