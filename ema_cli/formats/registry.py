"""Every checkpoint format, as data: one ``Format`` descriptor each, in one list.

Everything that needs to know the formats reads this list: finding a checkpoint on disk, the
suffix stripped before a step number is parsed, which outputs can be written, the files that
make one checkpoint (for sizes, mtimes and digests), ``--help`` and the README's table (a test
keeps it equal to ``markdown_table()``). Adding a format is one module with its reader (and
writer) and one ``Format`` line below; ``register`` adds one at run time (tests do).

This module imports only the standard library: ``--help`` and step parsing read it without
loading numpy or any format's module, which are imported on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Layout = Literal["file", "folder", "prefix"]


@dataclass(frozen=True)
class Format:
    """What ema-cli knows about one checkpoint format.

    ``layout``: ``file`` (one file, chosen by its suffix), ``folder`` (a folder recognised by
    one of its ``markers``, such as a sharded model's index; a folder opened as a checkpoint may
    instead hold one of its ``single_files``, as an unsharded model folder does), or ``prefix`` (a name whose
    suffixed siblings make one checkpoint, as TensorFlow's ``ckpt-7.index`` and
    ``ckpt-7.data-*``). ``reader`` and ``writer`` are ``"module:Class"`` names inside
    ``ema_cli.formats`` (or full dotted module names), imported when first used; ``writer`` is None for a read-only format.
    ``files`` (``"module:function"``, taking the checkpoint's path) lists the files that make
    one checkpoint, when that is more than the path itself (or, for a folder, its files).
    """

    name: str
    suffixes: tuple[str, ...]
    layout: Layout
    reader: str
    writer: str | None
    help: str
    markers: tuple[str, ...] = ()
    single_files: tuple[str, ...] = ()
    files: str | None = None
    #: ``"module:function"``: given a file that is part of such a checkpoint but does not name
    #: it (a TensorFlow data shard), the file that does (its ``.index``), else None.
    companion: str | None = None
    #: File names that hold a model's weights in this format (Hugging Face's): a folder holding
    #: one (beside optimizer.pt, rng_state.pth, ...) is read through it.
    model_files: tuple[str, ...] = ()
    #: Metadata an output of this format gets unless the last input names it otherwise
    #: (safetensors loaders insist on ``format``).
    metadata_defaults: tuple[tuple[str, str], ...] = ()
    #: For a writable folder format: the ``--folder-format`` value that picks it.
    folder_option: str | None = None

    def reader_class(self) -> Any:
        return _load(self.reader)

    def writer_class(self) -> Any:
        return None if self.writer is None else _load(self.writer)

    def checkpoint_files(self, path: Path) -> list[Path]:
        """The files that make the checkpoint at ``path``, sorted."""
        if self.files is not None:
            listed: list[Path] = _load(self.files)(path)
            return sorted(listed)
        if self.layout == "folder" or path.is_dir():
            return sorted(p for p in path.iterdir() if p.is_file())
        return [path]


def _load(name: str) -> Any:
    """``"module:attribute"``: a module of ``ema_cli.formats``, or any module by its full
    dotted name (a format kept elsewhere, as the tests' toy format)."""
    module, _, attribute = name.partition(":")
    full = module if "." in module else f"ema_cli.formats.{module}"
    return getattr(importlib.import_module(full), attribute)


_FORMATS: list[Format] = [
    Format(
        "safetensors",
        (".safetensors",),
        "file",
        "safetensors:SafetensorsReader",
        "safetensors:SafetensorsWriter",
        "a safetensors file",
        model_files=("model.safetensors",),
        metadata_defaults=(("format", "pt"),),
    ),
    Format(
        "safetensors folder",
        (),
        "folder",
        "sharded:ShardedReader",
        "sharded:ShardedWriter",
        "a Hugging Face model folder: model.safetensors, or shards with "
        "model.safetensors.index.json; an output named without a suffix is written as one",
        markers=("model.safetensors.index.json",),
        single_files=("model.safetensors",),
        metadata_defaults=(("format", "pt"),),
        folder_option="safetensors",
    ),
    Format(
        "keras weights",
        (".weights.h5",),
        "file",
        "hdf5:HDF5Reader",
        "hdf5:HDF5Writer",
        "Keras 3 model.save_weights() (layers/<name>/vars/<i>, optimizer/vars/<i>)",
    ),
    Format(
        "hdf5",
        (".h5", ".hdf5"),
        "file",
        "hdf5:HDF5Reader",
        "hdf5:HDF5Writer",
        "legacy Keras full models and weight files (model_weights/..., optimizer_weights/...), "
        "or any other HDF5 file: every numeric dataset is a tensor named by its path",
    ),
    Format(
        "keras",
        (".keras",),
        "file",
        "keras_archive:KerasArchiveReader",
        "keras_archive:KerasArchiveWriter",
        "a Keras 3 archive: the model.weights.h5 inside is averaged, every other member copied",
    ),
    Format(
        "torch",
        (".pt", ".pth", ".bin", ".ckpt"),
        "file",
        "torch_zip:TorchZipReader",
        "torch_zip:TorchZipWriter",
        "torch.save() zip checkpoints (state_dicts, Lightning .ckpt, pytorch_model.bin), read "
        "without torch and without running pickled code; the last one's structure is kept",
        model_files=("pytorch_model.bin",),
    ),
    Format(
        "torch folder",
        (),
        "folder",
        "torch_zip:TorchShardedReader",
        "torch_zip:TorchShardedWriter",
        "a Hugging Face model folder of torch weights: pytorch_model.bin, or shards with "
        "pytorch_model.bin.index.json; an output folder is written as one with --folder-format "
        "torch",
        markers=("pytorch_model.bin.index.json",),
        single_files=("pytorch_model.bin",),
        folder_option="torch",
    ),
    Format(
        "tensorflow",
        (".index",),
        "prefix",
        "tensorbundle:TensorBundleReader",
        "tensorbundle:TensorBundleWriter",
        "a TensorFlow checkpoint (tf.train.Checkpoint, CheckpointManager, Saver): give its "
        "PREFIX.index or its PREFIX; -o PREFIX.index writes both files; no TensorFlow needed, "
        "every tensor's crc32c checked",
        files="tensorbundle:checkpoint_files",
        companion="tensorbundle:companion_of",
    ),
    Format(
        "npz",
        (".npz",),
        "file",
        "npz:NpzReader",
        "npz:NpzWriter",
        "a numpy archive, one tensor per member",
    ),
]

#: Suffixes that name checkpoints of formats ema-cli does not read: stripped before a step
#: number is parsed, and refused as inputs by name.
_STEP_ONLY_SUFFIXES: tuple[str, ...] = ()


#: The format ``--state`` keeps its shadows in (any format with a writer would do; this one
#: stores every compute dtype and is fast to read back).
STATE_FORMAT = "safetensors"


def by_name(name: str) -> Format:
    return next(f for f in _FORMATS if f.name == name)


def formats() -> tuple[Format, ...]:
    return tuple(_FORMATS)


@contextmanager
def register(fmt: Format) -> Iterator[Format]:
    """Add ``fmt`` for the duration of the block (for tests, and plugins that scope it)."""
    _FORMATS.append(fmt)
    try:
        yield fmt
    finally:
        _FORMATS.remove(fmt)


def suffixes() -> tuple[str, ...]:
    """Every suffix that names a checkpoint, longest first (``.weights.h5`` before ``.h5``)."""
    known = {s for f in _FORMATS for s in f.suffixes} | set(_STEP_ONLY_SUFFIXES)
    return tuple(sorted(known, key=lambda s: (-len(s), s)))


def suffix_of(name: str) -> str | None:
    """The checkpoint suffix ``name`` ends with (case-insensitive), longest match first."""
    lower = name.lower()
    for suffix in suffixes():
        if lower.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return None


def strip_suffix(name: str) -> str:
    """``ckpt-8.weights.h5`` -> ``ckpt-8``; names without a checkpoint suffix are returned as is."""
    suffix = suffix_of(name)
    return name[: -len(suffix)] if suffix else name


def by_suffix(name: str) -> Format | None:
    """The file format a name's suffix picks, if ema-cli reads it."""
    suffix = suffix_of(name)
    return next((f for f in _FORMATS if suffix in f.suffixes), None) if suffix else None


def folder_checkpoint(path: Path) -> Path | None:
    """The checkpoint a folder holds by Hugging Face's names, in ``from_pretrained``'s order of
    formats (registry order: safetensors before torch weights): the folder itself when it holds
    a folder format's index (``markers``), else the format's single model file; None when it
    holds neither."""
    for fmt in _FORMATS:
        if fmt.layout != "folder":
            continue
        if any((path / m).is_file() for m in fmt.markers):
            return path
        for name in fmt.single_files:
            if (path / name).is_file():
                return path / name
    return None


def folder_format(path: Path, opening: bool = False) -> Format | None:
    """The folder format whose marker ``path`` holds (None: not a folder checkpoint).
    ``opening``: a folder given to be opened as one, which may hold a single model file."""
    for fmt in _FORMATS:
        names = fmt.markers + (fmt.single_files if opening else ())
        if fmt.layout == "folder" and any((path / m).is_file() for m in names):
            return fmt
    return None


def prefix_format(path: Path) -> tuple[Format, Path] | None:
    """For a path that names no file: the prefix format whose file ``path`` + suffix exists."""
    for fmt in _FORMATS:
        if fmt.layout == "prefix":
            for suffix in fmt.suffixes:
                candidate = path.with_name(path.name + suffix)
                if candidate.is_file():
                    return fmt, candidate
    return None


def companion_of(path: Path) -> Path | None:
    """The file that names the checkpoint ``path`` is only a part of (None: none)."""
    for fmt in _FORMATS:
        if fmt.companion is not None:
            found: Path | None = _load(fmt.companion)(path)
            if found is not None:
                return found
    return None


def model_file_names() -> tuple[str, ...]:
    return tuple(name for fmt in _FORMATS for name in fmt.model_files)


def model_file(folder: Path) -> Path | None:
    """The model weights file a folder holds by its Hugging Face name, formats in registry order
    (so ``model.safetensors`` before ``pytorch_model.bin``, as Hugging Face prefers)."""
    for fmt in _FORMATS:
        for name in fmt.model_files:
            if (folder / name).is_file():
                return folder / name
    return None


def folder_output_formats() -> dict[str, Format]:
    """The writable folder formats by their ``--folder-format`` value, the default first."""
    return {f.folder_option or f.name: f for f in _FORMATS if f.layout == "folder" and f.writer}


def folder_output_format(option: str | None = None) -> Format:
    """The format of an output named without a suffix: the one ``--folder-format option``
    names, by default the first folder format that writes (``ValueError`` for an unknown one)."""
    choices = folder_output_formats()
    if option is None:
        return next(iter(choices.values()))
    if option not in choices:
        raise ValueError(f"unknown folder format {option!r} (choose from {', '.join(choices)})")
    return choices[option]


def readable(kind: Callable[[Format], bool] = lambda f: True) -> list[str]:
    """The file suffixes ema-cli reads (of formats ``kind`` accepts), for messages."""
    return [s for f in _FORMATS if f.layout != "folder" and kind(f) for s in f.suffixes]


def writable() -> list[str]:
    """The file suffixes ema-cli writes, for messages and ``--help``."""
    return readable(lambda f: f.writer is not None)


def markdown_table() -> str:
    """The README's format table, rendered from the registry."""
    rows = ["| suffix | reads | writes | what |", "|---|---|---|---|"]
    for fmt in _FORMATS:
        names = ", ".join(f"`{s}`" for s in fmt.suffixes) or "a folder"
        writes = "yes" if fmt.writer is not None else "no"
        text = fmt.help.replace("<", "\\<").replace(">", "\\>")  # not HTML tags in Markdown
        rows.append(f"| {names} | yes | {writes} | {text} |")
    return "\n".join(rows)
