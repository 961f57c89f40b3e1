"""Checkpoint formats behind one interface, chosen by file suffix (or folder contents)."""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from ema_cli.checkpoint import CHECKPOINT_SUFFIXES, TensorInfo, strip_format_suffix
from ema_cli.errors import CheckpointError, OptionError
from ema_cli.formats.base import CheckpointReader, CheckpointWriter
from ema_cli.formats.sharded import DEFAULT_MAX_SHARD_SIZE, INDEX_NAME, ShardedReader, ShardedWriter

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "CheckpointReader",
    "CheckpointWriter",
    "TensorInfo",
    "check_output_path",
    "check_writer",
    "create_writer",
    "find_checkpoint",
    "is_folder_output",
    "open_checkpoint",
    "strip_format_suffix",
]

#: suffix -> (module, reader class, writer class). Modules are imported on first use: h5py
#: alone costs a tenth of a second at start-up, which a safetensors run should not pay.
_FORMATS: dict[str, tuple[str, str, str]] = {
    ".safetensors": ("safetensors", "SafetensorsReader", "SafetensorsWriter"),
    ".weights.h5": ("hdf5", "HDF5Reader", "HDF5Writer"),
    ".h5": ("hdf5", "HDF5Reader", "HDF5Writer"),
    ".hdf5": ("hdf5", "HDF5Reader", "HDF5Writer"),
    ".keras": ("keras_archive", "KerasArchiveReader", "KerasArchiveWriter"),
    ".npz": ("npz", "NpzReader", "NpzWriter"),
}


def _format_class(suffix: str, role: int) -> type:
    module, *classes = _FORMATS[suffix]
    cls: type = getattr(importlib.import_module(f"ema_cli.formats.{module}"), classes[role])
    return cls


def _reader_class(suffix: str) -> type[CheckpointReader] | None:
    return _format_class(suffix, 0) if suffix in _FORMATS else None


def _writer_class(suffix: str) -> type[CheckpointWriter] | None:
    return _format_class(suffix, 1) if suffix in _FORMATS else None


def _suffix(path: Path) -> str:
    lower = path.name.lower()
    for suffix in CHECKPOINT_SUFFIXES:
        if lower.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _readable(path: Path) -> bool:
    return _suffix(path) in _FORMATS


#: A last name part that looks like a file extension (``.safetensor``, ``.v2``), unlike the dots
#: in a folder name such as ``llama-3.1-ema``.
_FILE_EXTENSION = re.compile(r"\.[A-Za-z][A-Za-z0-9]*")


def is_folder_output(path: Path) -> bool:
    """Whether ``-o PATH`` names a Hugging Face model folder rather than a checkpoint file.

    An existing folder, or a name without a file extension (``ema``, ``checkpoint-ema``,
    ``llama-3.1-ema``), is a folder; a mistyped extension (``ema.safetensor``) stays a file name
    and is refused as an unknown format instead of quietly becoming a folder.
    """
    if path.is_dir():
        return True
    return _suffix(path) not in CHECKPOINT_SUFFIXES and not _FILE_EXTENSION.fullmatch(path.suffix)


def find_checkpoint(path: Path) -> Path:
    """The checkpoint file a command-line argument names.

    A file is taken as is. A folder holding ``model.safetensors.index.json`` is one sharded
    checkpoint and is returned itself; any other folder must hold exactly one checkpoint file of
    a format we read.
    """
    if path.is_dir():
        if (path / INDEX_NAME).is_file():
            return path
        found = sorted(p for p in path.iterdir() if p.is_file() and _readable(p))
        if len(found) == 1:
            return found[0]
        if not found:
            patterns = ", ".join(f"*{s}" for s in _FORMATS)
            raise CheckpointError(path, f"folder holds no checkpoint file ({patterns})")
        names = ", ".join(p.name for p in found[:3]) + (", ..." if len(found) > 3 else "")
        every = os.path.join(path, "*" + _suffix(found[0]))
        raise CheckpointError(
            path,
            f"folder holds {len(found)} checkpoint files ({names}); name one, or all of them "
            f"with {every}",
        )
    if not path.exists():
        raise CheckpointError(path, "no such file or directory")
    return path


def open_checkpoint(path: Path) -> CheckpointReader:
    """Open a checkpoint for reading: a folder as a sharded one, a file by its suffix."""
    if path.is_dir():
        return ShardedReader(path)
    reader = _reader_class(_suffix(path))
    if reader is None:
        known = ", ".join(sorted(_FORMATS))
        raise CheckpointError(path, f"unsupported checkpoint format (ema-cli reads {known})")
    return reader(path)


def check_output_path(path: Path) -> None:
    """Refuse an output whose format we cannot write, before any work is done."""
    if is_folder_output(path):
        return
    if _suffix(path) not in _FORMATS:
        known = ", ".join(sorted(_FORMATS))
        raise OptionError(f"{path}: unsupported output format (ema-cli writes {known})")


def check_writer(
    path: Path,
    tensors: Sequence[TensorInfo],
    template: CheckpointReader | None = None,
    folder: bool | None = None,
) -> type[CheckpointWriter]:
    """Refuse an output that could not be written (``OptionError``), before any work: an
    unknown suffix, a dtype or name the format cannot store, or a conversion that would drop
    what the template holds besides tensors. Returns the writer class; writes nothing, so
    ``--dry-run`` runs it too. ``folder``: as in ``create_writer``."""
    if folder is None:
        folder = is_folder_output(path)
    if not folder:
        check_output_path(path)
    writer = ShardedWriter if folder else _writer_class(_suffix(path))
    assert writer is not None  # check_output_path refused unknown suffixes
    if template is not None and template.non_tensors and not writer.carries_non_tensors(template):
        # A conversion keeps every tensor; refuse it when the input holds data that is not one.
        lost = template.non_tensors
        more = f" and {len(lost) - 1} more" if len(lost) > 1 else ""
        kind = "a model folder" if folder else f"a {_suffix(path)} file"
        raise OptionError(
            f"{path}: {template.path} holds {lost[0]}{more}, which {kind} cannot hold; write "
            f"a {_suffix(Path(template.path))} output to keep it"
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
) -> CheckpointWriter:
    """Start writing a checkpoint at ``path`` in the format its suffix names (``check_writer``
    first).

    ``template`` (the last input checkpoint) lets a format copy what is not a tensor. A folder
    output (``folder``, or by default a name without a file suffix) is sharded at
    ``max_shard_size`` bytes (default 5 GB, as Hugging Face does).
    """
    writer = check_writer(path, tensors, template, folder)
    if writer is ShardedWriter:
        limit = DEFAULT_MAX_SHARD_SIZE if max_shard_size is None else max_shard_size
        return ShardedWriter(path, tensors, metadata, template, max_shard_size=limit)
    return writer(path, tensors, metadata, template)
