"""What a checkpoint is made of, independent of its format: tensor headers and file names."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Every suffix a checkpoint may carry, longest first so ``.weights.h5`` wins over ``.h5``.
#: Used for step numbers too, so it lists formats we may not read yet.
CHECKPOINT_SUFFIXES = (
    ".weights.h5",
    ".safetensors",
    ".keras",
    ".hdf5",
    ".h5",
    ".npz",
    ".ckpt",
    ".bin",
    ".pt",
    ".pth",
)


def strip_format_suffix(name: str) -> str:
    """``ckpt-8.weights.h5`` -> ``ckpt-8``; names without a known suffix are returned as is."""
    lower = name.lower()
    for suffix in CHECKPOINT_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


@dataclass(frozen=True)
class TensorInfo:
    """What a header says about one tensor."""

    name: str
    dtype: np.dtype[np.generic]
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize


def file_stats(path: Path) -> tuple[int, int]:
    """A checkpoint's size in bytes and modification time (ns); for a folder checkpoint, the
    total of its files and the newest of them."""
    if not path.is_dir():
        st = path.stat()
        return st.st_size, st.st_mtime_ns
    stats = [p.stat() for p in path.iterdir() if p.is_file()]
    mtime = max((s.st_mtime_ns for s in stats), default=os.stat(path).st_mtime_ns)
    return sum(s.st_size for s in stats), mtime
