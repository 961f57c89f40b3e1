"""The replay's hot loops, in C where available: float16 conversion and the fused EMA update.

``ema_cli._kernels`` is a small optional C extension built at install time (``setup.py``). It
runs on x86-64 CPUs with AVX2 and F16C (2013 onwards) and gives bit for bit what numpy gives:

* ``convert`` casts float16 <-> float32 with F16C instead of numpy's element-at-a-time software
  cast (about 3 ns per element each way);
* ``update`` is TF's ``s = s - (s - x) * c`` in one pass instead of numpy's three, reading a
  float16 or bfloat16 ``x`` directly.

Without the extension (no compiler at install time, another CPU, or ``EMA_CLI_NO_KERNELS=1``)
everything here falls back to numpy and ``engine``: same results, slower.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.generic]

_kernels: ModuleType | None
try:
    _kernels = importlib.import_module("ema_cli._kernels")
except ImportError:  # built without a C compiler
    _kernels = None

#: Set to 1 to run on numpy even where the kernels are available (benchmarks, debugging).
DISABLE_ENV = "EMA_CLI_NO_KERNELS"

_F16 = np.dtype(np.float16)
_F32 = np.dtype(np.float32)
#: Source dtypes the fused update reads, by name (bfloat16 comes from ml_dtypes), and their code
#: in the C module.
_SOURCE_KINDS = {"float32": 0, "float16": 1, "bfloat16": 2}


def _hardware() -> bool:
    return (
        _kernels is not None
        and not os.environ.get(DISABLE_ENV)
        and bool(_kernels.set_hardware(True))
    )


_enabled = _hardware()


def backend() -> str:
    """What runs the hot loops here: ``avx2`` (the C kernels) or ``numpy``."""
    return "avx2" if _enabled else "numpy"


def convert(src: Array, out: Array) -> None:
    """``out[...] = src`` with numpy's rounding (nearest, ties to even), for same-size arrays.

    float16 -> float32 and float32 -> float16 between C-contiguous arrays go through the C
    kernel when it is enabled; every other pair is numpy's ``copyto``.
    """
    pair = (src.dtype, out.dtype)
    if (
        _enabled
        and _kernels is not None
        and (pair == (_F16, _F32) or pair == (_F32, _F16))
        and src.flags.c_contiguous
        and out.flags.c_contiguous
        and src.size == out.size
    ):
        if pair[0] == _F16:
            _kernels.half_to_float(src, out)
        else:
            _kernels.float_to_half(src, out)
        return
    np.copyto(out, src, casting="unsafe")


def fused_update(shadow: np.dtype[np.generic], source: np.dtype[np.generic]) -> bool:
    """Whether ``update`` runs in C for a ``shadow``-dtype average of ``source``-dtype tensors."""
    return _enabled and shadow == _F32 and np.dtype(source).name in _SOURCE_KINDS


def update(s: Array, x: Array, c: np.generic) -> None:
    """TF's ``s = s - (s - x) * c`` in place, in one pass, for a float32 ``s``; ``x`` is the
    raw checkpoint block (float32, float16 or bfloat16), both C-contiguous and of one size.

    Only call it where ``fused_update(s.dtype, x.dtype)`` is true, inside
    ``engine.tf_arithmetic()`` like the numpy update it replaces.
    """
    assert _kernels is not None
    _kernels.ema_update(s, x, _SOURCE_KINDS[x.dtype.name], float(c))
