"""Hugging Face model folders (sharded or not), read and written as one checkpoint.

Layout (what ``transformers``' ``save_pretrained`` writes): a folder holding an index --
``{"metadata": {"total_size": N}, "weight_map": {tensor: shard file}}`` -- and shard files, each
an ordinary checkpoint file of its format; a model small enough for one shard is one file with
no index. Two weights formats share the layout (``FolderLayout``): safetensors
(``model.safetensors.index.json``, ``model-00001-of-0000N.safetensors``, ``model.safetensors``)
and torch (``pytorch_model.bin.index.json``, ``pytorch_model-00001-of-0000N.bin``,
``pytorch_model.bin``; its classes are in ``torch_zip``). Beside the weights live the files that
make the folder loadable (``config.json``, tokenizer files, ...), which the writer copies from
the template checkpoint.

Reading delegates every shard to the format's single-file reader. Shards are opened lazily
through a small least-recently-used cache: a replay opens tens of checkpoints of up to hundreds
of shards each, so keeping every shard open would exhaust file descriptors, while the replay's
tensor-major order (the template's order: shard by shard) means only a couple of shards per
checkpoint are in use at any time.

Writing lays every shard out up front (a ``ShardFile`` each: the safetensors header, or the
torch zip's records), stores blocks with positioned writes into a hidden temporary folder beside
the destination (shard files reopened through the same kind of cache), and moves the finished
folder into place on ``commit()``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path, PurePosixPath
from typing import ClassVar, Generic, TypeVar

import numpy as np
import numpy.typing as npt

from ema_cli.atomic import fsync_folder, fsync_path
from ema_cli.checkpoint import TensorInfo
from ema_cli.errors import CheckpointError, OptionError, OutputError
from ema_cli.formats import registry
from ema_cli.formats.base import (
    CheckpointReader,
    CheckpointWriter,
    write_exact,
)
from ema_cli.formats.safetensors import (
    SafetensorsReader,
    build_header,
    check_dtypes,
    is_unicode,
    parse_json_header,
)


@dataclass(frozen=True)
class FolderLayout:
    """How one weights format lays out a Hugging Face model folder (``transformers``' names)."""

    #: What the weights are, for messages ("safetensors", "torch").
    kind: str
    #: The index that makes a folder one sharded checkpoint.
    index_name: str
    #: The single file Hugging Face writes when everything fits in one shard.
    single_name: str
    #: Shard file names: ``<stem>-00001-of-00003<suffix>``.
    shard_stem: str
    shard_suffix: str

    def shard_file_names(self, count: int) -> list[str]:
        """``model-00001-of-00003.safetensors``..., or the single ``model.safetensors`` when
        there is one shard (``from_pretrained`` then finds no index)."""
        if count == 1:
            return [self.single_name]
        return [
            f"{self.shard_stem}-{i:05d}-of-{count:05d}{self.shard_suffix}"
            for i in range(1, count + 1)
        ]


SAFETENSORS_LAYOUT = FolderLayout(
    "safetensors", "model.safetensors.index.json", "model.safetensors", "model", ".safetensors"
)
#: ``save_pretrained(safe_serialization=False)``'s names (transformers 4.x).
TORCH_LAYOUT = FolderLayout(
    "torch", "pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model", ".bin"
)
LAYOUTS = (SAFETENSORS_LAYOUT, TORCH_LAYOUT)

#: The index that makes a folder one sharded safetensors checkpoint.
INDEX_NAME = SAFETENSORS_LAYOUT.index_name
#: The single-file name Hugging Face uses when everything fits in one shard.
SINGLE_NAME = SAFETENSORS_LAYOUT.single_name
#: ``save_pretrained``'s default shard limit ("5GB", decimal).
DEFAULT_MAX_SHARD_SIZE = 5_000_000_000
#: Shards a reader keeps open: two replay threads plus one shard boundary each.
DEFAULT_OPEN_SHARDS = 4

#: Weight files in other formats (and their indexes) are not copied into an output folder: they
#: would hold the template's un-averaged weights next to the averaged ones, and a loader that
#: prefers them (``use_safetensors=False``, other frameworks) would silently load stale values.
_OTHER_WEIGHT_SUFFIXES = (*registry.suffixes(), ".msgpack", ".gguf", ".onnx")

_UNITS = {
    "B": 1,
    "kB": 1000,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000: a byte count, as ``--max-shard-size`` takes it.

    Decimal units (B, kB/KB, MB, GB, TB: powers of 1000, as Hugging Face reads "5GB"), binary
    ones (KiB, MiB, GiB, TiB: powers of 1024), or a plain integer of bytes. Units are
    case-sensitive on purpose: Hugging Face reads a lower-case trailing ``b`` ("5Gb") as bits,
    so we refuse such spellings rather than guess.
    """
    units = ", ".join(_UNITS)
    match = _SIZE.fullmatch(text)
    if match is None or (match.group(2) and match.group(2) not in _UNITS):
        raise ValueError(
            f"invalid size {text!r}: expected bytes or a number with a unit ({units}), "
            "e.g. 5GB or 500MiB"
        )
    number, unit = match.groups()
    try:
        size = int(Decimal(number) * _UNITS[unit or "B"])
    except InvalidOperation:  # pragma: no cover - the pattern only lets decimals through
        raise ValueError(f"invalid size {text!r}") from None
    if size < 1:
        raise ValueError(f"invalid size {text!r}: must be at least 1 byte")
    return size


def shard_file_names(count: int) -> list[str]:
    """Hugging Face's safetensors shard names (``FolderLayout.shard_file_names``)."""
    return SAFETENSORS_LAYOUT.shard_file_names(count)


def split_into_shards(
    tensors: Sequence[TensorInfo],
    max_shard_size: int,
    together: Sequence[Sequence[str]] = (),
) -> list[list[TensorInfo]]:
    """Group tensors into shards of at most ``max_shard_size`` data bytes, as Hugging Face does.

    The rule of ``huggingface_hub``'s ``split_state_dict_into_shards`` (which ``save_pretrained``
    uses), so our folders shard like theirs: tensors are taken in the order given; one that
    would push the open shard past the limit closes it and opens the next; one larger than the
    limit is put in a shard of its own at once, while the open shard stays open for the tensors
    after it. Nothing is rearranged to fill shards better: sizes 6, 6, 2, 6, 2, 2 under a limit
    of 10 give [6], [6, 2], [6, 2, 2]; sizes 3, 25, 3 give [25], [3, 3]. There is always at least
    one shard, so a checkpoint without tensors is still a loadable ``model.safetensors``.

    ``together``: groups of tensor names that must share a shard (tensors sharing one torch
    storage, which only one file can hold once). As ``huggingface_hub`` does for them, a group's
    first tensor is placed by the rule above and counted; the others are left out of the count
    (their bytes are the same storage) and put in the first one's shard, in the order given.
    """
    if max_shard_size < 1:
        raise ValueError(f"max_shard_size must be at least 1 byte, got {max_shard_size}")
    position = {info.name: i for i, info in enumerate(tensors)}
    follows: dict[str, str] = {}  # a group's later tensor -> the group's first
    for group in together:
        members = sorted((name for name in group if name in position), key=position.__getitem__)
        for name in members[1:]:
            follows[name] = members[0]
    followers: dict[str, list[TensorInfo]] = {}
    shards: list[list[TensorInfo]] = []
    current: list[TensorInfo] = []
    used = 0
    for info in tensors:
        if info.name in follows:
            followers.setdefault(follows[info.name], []).append(info)
            continue
        if info.nbytes > max_shard_size:
            shards.append([info])
            continue
        if used + info.nbytes > max_shard_size:
            shards.append(current)
            current, used = [], 0
        current.append(info)
        used += info.nbytes
    if current or not shards:
        shards.append(current)
    for shard in shards if followers else ():
        for info in list(shard):
            shard.extend(followers.pop(info.name, ()))
        shard.sort(key=lambda info: position[info.name])
    return shards


K = TypeVar("K")
V = TypeVar("V")
R = TypeVar("R")


class _OpenHandles(Generic[K, V]):
    """At most ``capacity`` open handles, the least recently used closed first; thread-safe.

    A handle is pinned while a thread uses it, so it is never closed under a positioned read or
    write; when every handle is pinned the cache briefly holds more than ``capacity``.
    """

    def __init__(self, opener: Callable[[K], V], closer: Callable[[V], None], capacity: int):
        self._opener = opener
        self._closer = closer
        self._capacity = max(1, capacity)
        self._lock = threading.Lock()
        self._handles: OrderedDict[K, V] = OrderedDict()
        self._pins: dict[K, int] = {}

    def call(self, key: K, work: Callable[[V], R]) -> R:
        """``work(handle)`` with ``key``'s handle, opened if needed and pinned meanwhile.

        A plain call rather than a context manager: it runs for every block read or written.
        """
        with self._lock:
            handle = self._handles.get(key)
            if handle is None:
                # Opened under the lock so two threads never open the same shard twice.
                handle = self._opener(key)
                self._handles[key] = handle
            self._handles.move_to_end(key)
            self._pins[key] = self._pins.get(key, 0) + 1
            if len(self._handles) > self._capacity:
                self._evict()
        try:
            return work(handle)
        finally:
            with self._lock:
                pins = self._pins[key] - 1
                if pins:
                    self._pins[key] = pins
                else:
                    del self._pins[key]
                if len(self._handles) > self._capacity:
                    self._evict()

    def _evict(self) -> None:
        for key in list(self._handles):
            if len(self._handles) <= self._capacity:
                return
            if key not in self._pins:
                self._closer(self._handles.pop(key))

    def close_all(self) -> None:
        with self._lock:
            while self._handles:
                _, handle = self._handles.popitem(last=False)
                self._closer(handle)

    def __len__(self) -> int:
        return len(self._handles)


class ShardedReader(CheckpointReader):
    """A folder holding ``model.safetensors.index.json`` and its shards, as one checkpoint.

    A folder with a single ``model.safetensors`` and no index is read as a one-shard checkpoint.
    ``tensors`` lists every tensor of the index, shard by shard (shard files in name order), in
    file order within a shard; ``metadata`` is the first shard's ``__metadata__``.

    Tensors a shard holds but the index does not list are ignored (and listed in
    ``unindexed``): the index is what defines the checkpoint, and ``from_pretrained`` treats such
    tensors as unexpected keys rather than weights. Index tensors missing from their shard are
    errors.

    Another weights format reuses all of it by naming its ``layout`` and ``shard_reader`` (a
    single-file reader class) and, if it knows more per shard, overriding ``_scanned``.
    """

    format_name = "safetensors (sharded)"
    layout: ClassVar[FolderLayout] = SAFETENSORS_LAYOUT
    shard_reader: ClassVar[type[CheckpointReader]] = SafetensorsReader

    def __init__(self, path: Path, max_open_shards: int = DEFAULT_OPEN_SHARDS) -> None:
        super().__init__(path)
        layout = self.layout
        if not path.is_dir():
            raise CheckpointError(path, "not a folder (a sharded checkpoint is a folder)")
        index_path = path / layout.index_name
        if index_path.is_file():
            weight_map = _read_index(index_path, layout)
        elif (path / layout.single_name).is_file():
            weight_map = None
        else:
            raise CheckpointError(
                path, f"folder holds neither {layout.index_name} nor {layout.single_name}"
            )

        by_shard: dict[str, list[str]] = {}
        if weight_map is None:
            by_shard[layout.single_name] = []  # filled from the shard's own header below
        else:
            for name, shard in weight_map.items():
                by_shard.setdefault(shard, []).append(name)

        indexed = set(weight_map) if weight_map is not None else set()
        tensors: dict[str, TensorInfo] = {}
        self._shard_of: dict[str, str] = {}
        self._unindexed: dict[str, str] = {}
        self._offsets: dict[str, int | None] = {}
        self._metadata: dict[str, str] = {}
        for position, shard in enumerate(sorted(by_shard)):
            shard_path = path / shard
            listed = by_shard[shard]
            if not shard_path.is_file():
                raise CheckpointError(
                    shard_path,
                    f"shard listed in {layout.index_name} is missing"
                    + (f" ({len(listed) - 1} more tensors are mapped to it)" if listed[1:] else ""),
                    tensor=listed[0] if listed else None,
                )
            with self.shard_reader(shard_path) as shard_reader:
                header = dict(shard_reader.tensors)
                offsets = {n: shard_reader.file_offset(n, 0) for n in header}
                if position == 0:
                    self._metadata = dict(shard_reader.metadata)
                wanted = set(listed) if weight_map is not None else set(header)
                for name in listed:
                    if name not in header:
                        raise CheckpointError(
                            shard_path,
                            f"missing from this shard ({layout.index_name} maps it here)",
                            name,
                        )
                self._scanned(shard, shard_reader, wanted)
            for name, info in header.items():  # file order
                if name in wanted:
                    tensors[name] = info
                    self._shard_of[name] = shard
                    self._offsets[name] = offsets[name]
                elif name not in indexed:  # indexed elsewhere: a stale copy, not an extra
                    self._unindexed[name] = shard
        self._tensors = tensors
        self._by_shard: dict[str, list[str]] = {}
        for name, shard in self._shard_of.items():
            self._by_shard.setdefault(shard, []).append(name)
        self._shards = _OpenHandles[str, CheckpointReader](
            self._open_shard, _close, max_open_shards
        )
        self._closed = False

    def _scanned(self, shard: str, reader: CheckpointReader, wanted: set[str]) -> None:
        """A hook: what a format learns from each shard while it is open at start-up
        (``wanted``: the tensors of the checkpoint it holds)."""

    def _open_shard(self, shard: str) -> CheckpointReader:
        """Reopen a shard scanned at start-up; a header that no longer matches is an error
        (the file was replaced, say by a training job still writing checkpoints)."""
        reader = self.shard_reader(self.path / shard)
        try:
            for name in self._by_shard[shard]:
                if reader.tensors.get(name) != self._tensors[name]:
                    raise CheckpointError(
                        reader.path, "changed since the checkpoint was opened", tensor=name
                    )
        except BaseException:
            reader.close()
            raise
        return reader

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._tensors

    @property
    def metadata(self) -> Mapping[str, str]:
        return self._metadata

    @property
    def shard_files(self) -> dict[str, str]:
        """Tensor name -> the shard file (relative to the folder) holding it."""
        return dict(self._shard_of)

    @property
    def unindexed(self) -> dict[str, str]:
        """Tensors found in a shard but not listed in the index (ignored) -> their shard."""
        return dict(self._unindexed)

    def read(
        self,
        name: str,
        start: int = 0,
        stop: int | None = None,
        out: npt.NDArray[np.generic] | None = None,
    ) -> npt.NDArray[np.generic]:
        if self._closed:
            raise ValueError(f"{self.path}: read from a closed checkpoint")
        return self._shards.call(
            self._shard_of[name], lambda reader: reader.read(name, start, stop, out)
        )

    def file_offset(self, name: str, start: int) -> int | None:
        offset = self._offsets[name]
        if offset is None:
            return None
        return offset + start * self._tensors[name].dtype.itemsize

    def close(self) -> None:
        self._closed = True
        self._shards.close_all()

    @property
    def open_shards(self) -> int:
        """How many shard files are open now (for tests and diagnostics)."""
        return len(self._shards)


#: An index bigger than this is not an index (Hugging Face's are KBs to a few MB).
MAX_INDEX_BYTES = 64 << 20


def _read_index(index_path: Path, layout: FolderLayout = SAFETENSORS_LAYOUT) -> dict[str, str]:
    """The index's ``weight_map``, checked: a JSON object of tensor -> shard path inside the
    folder (an index naming ``../elsewhere`` must not make us read files outside it), each
    tensor once. ``metadata.total_size`` is not checked: like ``from_pretrained``, ema-cli
    takes the shards' own headers for the sizes (and writes a correct one)."""
    kind, suffix = layout.kind, layout.shard_suffix
    try:
        if index_path.stat().st_size > MAX_INDEX_BYTES:
            raise CheckpointError(index_path, f"not a {kind} index (over {MAX_INDEX_BYTES} bytes)")
        raw = index_path.read_bytes()
    except OSError as e:
        raise CheckpointError(index_path, f"cannot read: {e.strerror}") from None
    index = parse_json_header(index_path, raw, "index", f"{kind} index")
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise CheckpointError(
            index_path, f'not a {kind} index (no "weight_map" object mapping tensors to shards)'
        )
    weight_map: dict[str, str] = {}
    for name, shard in index["weight_map"].items():
        for text in (name, shard):
            if isinstance(text, str) and not is_unicode(text):
                raise CheckpointError(
                    index_path,
                    f"weight_map holds {text!a}, which is not valid Unicode (a lone "
                    "surrogate escape)",
                )
        if not isinstance(shard, str) or not shard.endswith(suffix):
            raise CheckpointError(
                index_path, f"weight_map names {shard!r}, not a {suffix} file", tensor=name
            )
        pure = PurePosixPath(shard)
        if pure.is_absolute() or ".." in pure.parts or "\\" in shard:
            raise CheckpointError(
                index_path, f"weight_map names {shard!r}, outside the checkpoint folder", name
            )
        weight_map[name] = shard
    if not weight_map:
        raise CheckpointError(index_path, "weight_map lists no tensors")
    return weight_map


def template_folder(template: CheckpointReader | None) -> Path | None:
    """The model folder whose side files an output folder should carry, if the template has one.

    A sharded template is a folder; a template file named as Hugging Face names a model's
    weights (``model.safetensors``, ``pytorch_model.bin``: ``registry.model_file_names``) sits
    in a model folder too. Any other file (say
    ``run/ckpt-500.safetensors``) sits in a folder of checkpoints, whose other files are not
    part of the model and are not copied.
    """
    if template is None:
        return None
    if template.path.is_dir():
        return template.path
    if template.path.name in registry.model_file_names():
        return template.path.parent
    return None


def side_files(folder: Path) -> list[Path]:
    """The files of a model folder that are not weights: config, tokenizer, generation config...

    Skipped: weight files in any format and their indexes (see ``_OTHER_WEIGHT_SUFFIXES``),
    hidden files (``.gitattributes``, editor and OS droppings, our own temporaries) and
    subfolders (a ``.git`` or an ``original/`` folder of full-precision weights is not part of
    the loadable model). Symlinks are followed, so a Hugging Face cache snapshot -- a folder of
    links into ``blobs/`` -- is copied as real files.
    """
    files = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if name.startswith(".") or not entry.is_file():
            continue
        bare = name.lower().removesuffix(".index.json")
        if bare.endswith(_OTHER_WEIGHT_SUFFIXES):
            continue
        files.append(entry)
    return files


def check_output_folder(path: Path, template: CheckpointReader | None = None) -> None:
    """Refuse a destination whose replacement would destroy what is not an earlier output.

    ``commit()`` replaces a whole existing folder, so that folder must look like a checkpoint
    a folder writer could have made (it holds a weights file or index of a ``FolderLayout``,
    ``model.safetensors`` or ``pytorch_model.bin`` say, and no subfolders) or be empty; and it
    must not hold the template, which is still being read.
    """
    if not path.parent.is_dir():
        raise OptionError(f"{path}: folder {path.parent} does not exist")
    if template is not None:
        real = Path(os.path.realpath(path))
        source = Path(os.path.realpath(template.path))
        if source == real or real in source.parents:
            raise OptionError(
                f"{path}: the output folder would replace the input checkpoint {template.path}"
            )
    if not (path.exists() or path.is_symlink()):
        return
    if not path.is_dir():
        raise OptionError(f"{path}: exists and is not a folder; refusing to replace it")
    entries = list(path.iterdir())
    if not entries:
        return
    weights = [n for layout in LAYOUTS for n in (layout.index_name, layout.single_name)]
    if not any((path / name).is_file() for name in weights):
        raise OptionError(
            f"{path}: folder exists and holds no model weights ({', '.join(weights)}); refusing "
            "to replace it (name a new output folder)"
        )
    subfolders = [e.name for e in entries if e.is_dir()]
    if subfolders:
        raise OptionError(
            f"{path}: folder holds subfolders ({', '.join(sorted(subfolders)[:3])}); refusing to "
            "replace it (name a new output folder)"
        )


class ShardFile(ABC):
    """One shard file of a folder being written: laid out when made (then closed), reopened
    (``open``/``close``, by the writer's handle cache) for positioned writes and ``finish``."""

    #: The bytes of tensor data the shard holds (the index's ``total_size`` adds them up).
    data_bytes: int

    @abstractmethod
    def open(self) -> None:
        """Reopen the file for writing."""

    @abstractmethod
    def close(self) -> None:
        """Close the file (it is reopened for the next write)."""

    @abstractmethod
    def write(self, name: str, start: int, data: memoryview) -> None:
        """Store the raw bytes of tensor ``name``'s elements from ``start`` (file open)."""

    def finish(self) -> None:  # noqa: B027 - a format with nothing to complete keeps this
        """Complete the file once every block is in (file open)."""


class SafetensorsShard(ShardFile):
    """A safetensors shard: its header written up front, the file extended to its size."""

    def __init__(self, path: Path, tensors: Sequence[TensorInfo], metadata: Mapping[str, str]):
        self.path = path
        header, self._offsets = build_header(tensors, metadata)
        self._itemsize = {t.name: t.dtype.itemsize for t in tensors}
        self.data_bytes = sum(t.nbytes for t in tensors)
        _create_file(path, header, len(header) + self.data_bytes)
        self._fd = -1

    def open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = -1

    def write(self, name: str, start: int, data: memoryview) -> None:
        write_exact(self._fd, data, self._offsets[name] + start * self._itemsize[name])


class ShardedWriter(CheckpointWriter):
    """Writes a Hugging Face model folder: shards, index and the template's side files.

    Everything is built in a hidden sibling ``.<name>.tmp-XXXXXXXX`` and appears at ``path`` on
    ``commit()``. An existing folder at ``path`` (an earlier output) is swapped out: renamed
    aside to ``.<name>.old-XXXXXXXX``, the new folder renamed in, then the old one deleted. POSIX
    has no atomic exchange of two non-empty folders, so a crash between the two renames leaves no
    folder at ``path`` but the complete earlier output at ``.<name>.old-XXXXXXXX``: rename it
    back to recover. Nothing outside the temporary folder is touched before ``commit()``.

    Another weights format reuses it by naming its ``layout`` and overriding ``_shard_file``
    (and ``_together``, for tensors that must share a shard).
    """

    takes_max_shard_size = True
    layout: ClassVar[FolderLayout] = SAFETENSORS_LAYOUT

    def __init__(
        self,
        path: Path,
        tensors: Sequence[TensorInfo],
        metadata: Mapping[str, str],
        template: CheckpointReader | None = None,
        max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    ) -> None:
        self._max_shard_size = max_shard_size
        super().__init__(path, tensors, metadata, template)

    def begin(self) -> None:
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names")
        check_output_folder(self.path, self.template)
        self._shards = split_into_shards(self.tensors, self._max_shard_size, self._together())
        self._files = self.layout.shard_file_names(len(self._shards))
        self._tmp = self.stage_folder()
        self._parts: list[ShardFile] = []
        self._handles = _OpenHandles[int, ShardFile](self._open_part, _close, DEFAULT_OPEN_SHARDS)
        self._where: dict[str, int] = {}
        for number, shard in enumerate(self._shards):
            for info in shard:
                self._where[info.name] = number
            self._parts.append(self._shard_file(self._tmp / self._files[number], shard))
        # Copied now, not at commit, so an unreadable config fails before the long replay.
        source = template_folder(self.template)
        for side in side_files(source) if source is not None else []:
            try:
                shutil.copyfile(side, self._tmp / side.name)
            except OSError as e:
                if e.filename == os.fspath(side):  # reading the template failed
                    raise CheckpointError(side, f"cannot read: {e.strerror}") from None
                raise

    def _shard_file(self, path: Path, tensors: Sequence[TensorInfo]) -> ShardFile:
        """Lay out one shard at ``path`` holding ``tensors`` (closed when it returns)."""
        return SafetensorsShard(path, tensors, self.metadata)

    def _together(self) -> Sequence[Sequence[str]]:
        """Groups of tensors that must be in one shard (``split_into_shards``); none here."""
        return ()

    @classmethod
    def check(
        cls, path: Path, tensors: Sequence[TensorInfo], template: CheckpointReader | None
    ) -> None:
        check_dtypes(path, tensors)

    def _open_part(self, number: int) -> ShardFile:
        part = self._parts[number]
        part.open()
        return part

    def write(self, name: str, start: int, values: npt.NDArray[np.generic]) -> None:
        if self._done:
            raise RuntimeError(f"{self.path}: write after commit() or abort()")
        data = self._block_bytes(name, start, values)
        try:
            self._handles.call(self._where[name], lambda part: part.write(name, start, data))
        except OSError as e:  # typically a full disk
            raise OutputError(self.path, e) from None
        self._wrote(len(data))

    def finish(self) -> list[tuple[Path, Path]]:
        """Complete every shard and write the index (when there are several shards) in the
        temporary folder, which is then published whole."""
        for number in range(len(self._parts)):
            self._handles.call(number, lambda part: part.finish())
        self._handles.close_all()
        if len(self._files) > 1:
            index = {
                "metadata": {"total_size": sum(part.data_bytes for part in self._parts)},
                "weight_map": {
                    info.name: self._files[number]
                    for number, shard in enumerate(self._shards)
                    for info in shard
                },
            }
            text = json.dumps(index, indent=2, sort_keys=True) + "\n"  # as transformers writes it
            _create_file(self._tmp / self.layout.index_name, text.encode("utf-8"), None)
        return [(self._tmp, self.path)]

    def _publish(self, files: Sequence[tuple[Path, Path]], durable: bool) -> None:
        """Flush the folder to disk if ``durable`` and swap it into place whole."""
        ((tmp, path),) = files
        if durable:
            for entry in tmp.iterdir():
                fsync_path(entry)
            fsync_folder(tmp)
        check_output_folder(path, self.template)  # anything may have appeared meanwhile
        _swap_into_place(tmp, path)

    def _discard(self) -> None:
        handles = getattr(self, "_handles", None)
        if handles is not None:
            handles.close_all()
        for part in getattr(self, "_parts", ()):
            part.close()


def _unique_sibling(path: Path, tag: str) -> Path:
    """An unused hidden name ``.<name>.<tag>-XXXXXXXX`` beside ``path`` (same disk: renames)."""
    while True:
        candidate = path.with_name(f".{path.name}.{tag}-{secrets.token_hex(4)}")
        if not (candidate.exists() or candidate.is_symlink()):
            return candidate


def _create_file(path: Path, head: bytes, size: int | None) -> None:
    """A new file holding ``head``, extended (sparsely) to ``size`` bytes when given."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        write_exact(fd, memoryview(head), 0)
        if size is not None:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _swap_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished folder to ``path``, moving an existing one aside first."""
    old: Path | None = None
    if path.exists() or path.is_symlink():
        old = _unique_sibling(path, "old")
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        if old is not None:
            os.rename(old, path)
        raise
    fsync_folder(path.parent)
    if old is not None:
        if old.is_symlink() or not old.is_dir():
            old.unlink()  # a link to a folder: the link is replaced, never its target's files
        else:
            shutil.rmtree(old, ignore_errors=True)


def _close(handle: CheckpointReader | ShardFile) -> None:
    """The handle caches' closer (a subclass's own ``close``, not the base class's)."""
    handle.close()
