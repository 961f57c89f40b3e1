"""Checkpoint formats behind one interface, chosen by file suffix (or folder contents)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from ema_cli.checkpoint import CHECKPOINT_SUFFIXES, TensorInfo, strip_format_suffix
from ema_cli.errors import CheckpointError, OptionError
from ema_cli.formats.base import CheckpointReader, CheckpointWriter
from ema_cli.formats.safetensors import SafetensorsReader, SafetensorsWriter

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "CheckpointReader",
    "CheckpointWriter",
    "TensorInfo",
    "check_output_path",
    "create_writer",
    "find_checkpoint",
    "open_checkpoint",
    "strip_format_suffix",
]

_READERS: dict[str, type[CheckpointReader]] = {".safetensors": SafetensorsReader}
_WRITERS: dict[str, type[CheckpointWriter]] = {".safetensors": SafetensorsWriter}


def _suffix(path: Path) -> str:
    lower = path.name.lower()
    for suffix in CHECKPOINT_SUFFIXES:
        if lower.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _readable(path: Path) -> bool:
    return _suffix(path) in _READERS


def find_checkpoint(path: Path) -> Path:
    """The checkpoint file a command-line argument names.

    A file is taken as is; a folder must hold exactly one checkpoint file of a format we read.
    """
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and _readable(p))
        if len(found) == 1:
            return found[0]
        if not found:
            raise CheckpointError(path, "folder holds no checkpoint file (*.safetensors)")
        names = ", ".join(p.name for p in found[:4])
        raise CheckpointError(
            path, f"folder holds {len(found)} checkpoint files ({names}); name the file to use"
        )
    if not path.exists():
        raise CheckpointError(path, "no such file or directory")
    return path


def open_checkpoint(path: Path) -> CheckpointReader:
    """Open a checkpoint file for reading, by its suffix."""
    reader = _READERS.get(_suffix(path))
    if reader is None:
        known = ", ".join(sorted(_READERS))
        raise CheckpointError(path, f"unsupported checkpoint format (ema-cli reads {known})")
    return reader(path)


def check_output_path(path: Path) -> None:
    """Refuse an output whose format we cannot write, before any work is done."""
    if _suffix(path) not in _WRITERS:
        known = ", ".join(sorted(_WRITERS))
        raise OptionError(f"{path}: unsupported output format (ema-cli writes {known})")


def create_writer(
    path: Path,
    tensors: Sequence[TensorInfo],
    metadata: Mapping[str, str],
    template: CheckpointReader | None = None,
) -> CheckpointWriter:
    """Start writing a checkpoint at ``path`` in the format its suffix names.

    ``template`` (the last input checkpoint) lets a format copy what is not a tensor.
    """
    check_output_path(path)
    return _WRITERS[_suffix(path)](path, tensors, metadata, template)
