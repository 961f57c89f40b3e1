"""What a checkpoint is made of, independent of its format: tensor headers and file names."""

from __future__ import annotations

import math
from dataclasses import dataclass

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
