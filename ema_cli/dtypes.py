"""numpy dtypes by name, with ml_dtypes' (bfloat16, float8) loaded only when one is needed.

Importing ml_dtypes costs 0.6-0.9 s on some machines, more than the rest of a small run: a
float32 checkpoint, ``--help`` and ``inspect`` of a float32 file never pay it.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import Any

import numpy as np

#: The dtypes numpy itself lacks, by ml_dtypes' (and numpy's ``dtype.name``) spelling.
ML_DTYPE_NAMES = frozenset(
    {
        "bfloat16",
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e4m3b11fnuz",
        "float8_e4m3",
        "float8_e3m4",
        "float8_e8m0fnu",
        "float6_e2m3fn",
        "float6_e3m2fn",
        "float4_e2m1fn",
        "int2",
        "int4",
        "uint2",
        "uint4",
    }
)


@cache
def by_name(name: str) -> np.dtype[Any]:
    """The dtype called ``name`` (``float32``, ``bfloat16``, ...), in native byte order;
    ``TypeError`` for a name neither numpy nor the installed ml_dtypes knows."""
    if name in ML_DTYPE_NAMES:
        module = importlib.import_module("ml_dtypes")
        if not hasattr(module, name):
            raise TypeError(f"this ml_dtypes has no {name}")
        dtype: np.dtype[Any] = np.dtype(getattr(module, name))
        return dtype
    return np.dtype(name)


def is_native_order(dtype: np.dtype[Any]) -> bool:
    """Little-endian, native, or byte order not applicable (one-byte and void types)."""
    return dtype.byteorder in ("=", "|") or (dtype.byteorder == "<" and np.little_endian)
