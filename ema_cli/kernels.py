"""The replay's hot loops, in C where available: float16 conversion, the fused EMA update, the
float64 sums of the linear profiles and the CRC-32C of TensorBundle inputs.

``ema_cli._kernels`` is a small optional C extension built at install time (``setup.py``). It
runs on x86-64 CPUs with AVX2 and F16C (2013 onwards) and gives bit for bit what numpy gives:

* ``convert`` casts float16 <-> float32 with F16C instead of numpy's element-at-a-time software
  cast (about 3 ns per element each way), and bfloat16 <-> float32 8 elements at a time instead
  of ml_dtypes' one (0.4 ns per element);
* ``updater`` gives TF's ``s = s - (s - x) * c`` in one pass instead of numpy's three, reading
  a float16 or bfloat16 ``x`` directly; under ``--precision native`` it also replaces numpy's
  and ml_dtypes' element-at-a-time float16/bfloat16 arithmetic;
* ``crc32c_kernel`` is the CRC-32C that ``formats.tensorbundle_crc`` checks every TensorBundle
  byte with: AVX-512 VPCLMULQDQ folding where the CPU has it, else SSE4.2's crc32 instruction
  over three interleaved streams, with the GIL released (speeds in that module).

Without the extension (no compiler at install time, another CPU, or ``EMA_CLI_NO_KERNELS=1``)
everything here falls back to numpy and ``engine``: same results, slower.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from ema_cli.engine import Update

Array = npt.NDArray[np.generic]
#: What the CRC kernel reads: any C-contiguous buffer.
Buffer = Union[bytes, bytearray, memoryview, "npt.NDArray[Any]"]

#: Every function of the C module this file calls. A build from an older ``_kernels.c`` (an
#: in-place upgrade whose compile failed keeps the old module: ``setup.py`` makes the build
#: optional) lacks some, and is then not used at all rather than failing mid-replay.
REQUIRED = (
    "half_to_float",
    "float_to_half",
    "bfloat16_to_float",
    "float_to_bfloat16",
    "ema_update",
    "ema_update_native",
    "sum_update",
    "sum_finish",
    "crc32c",
    "crc32c_combine",
    "crc32c_level",
    "set_hardware",
)

_kernels: ModuleType | None
_stale = False
try:
    _kernels = importlib.import_module("ema_cli._kernels")
except ImportError:  # built without a C compiler
    _kernels = None
else:
    if not all(hasattr(_kernels, name) for name in REQUIRED):
        _kernels, _stale = None, True

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


_CRC_LOOPS = {0: "portable", 1: "SSE4.2 crc32", 2: "AVX2 VPCLMULQDQ", 3: "AVX-512 VPCLMULQDQ"}


def describe() -> str:
    """What runs the hot loops here, with the reason when it is numpy (shown by ``--version``)."""
    if _enabled and _kernels is not None:
        crc = _CRC_LOOPS.get(_kernels.crc32c_level(), "?")
        return f"C kernels (AVX2, F16C; crc32c: {crc})"
    if _stale:
        return "numpy (the C kernels are from an older ema-cli: reinstall to rebuild them)"
    if _kernels is None:
        return "numpy (the C kernels were not built: install with a C compiler present)"
    if os.environ.get(DISABLE_ENV):
        return f"numpy ({DISABLE_ENV} is set)"
    return "numpy (this CPU lacks AVX2 or F16C)"


#: ml_dtypes' bfloat16, once a bfloat16 array has been seen (an import of ml_dtypes here would
#: cost every command its start-up; any bfloat16 array means it is imported already).
_bfloat16: np.dtype[np.generic] | None = None


def _is_bfloat16(dtype: np.dtype[np.generic]) -> bool:
    global _bfloat16
    if _bfloat16 is None:
        ml_dtypes = sys.modules.get("ml_dtypes")
        if ml_dtypes is None:
            return False
        _bfloat16 = np.dtype(ml_dtypes.bfloat16)
    return dtype == _bfloat16


def convert(src: Array, out: Array) -> None:
    """``out[...] = src`` with numpy's (or ml_dtypes') rounding (nearest, ties to even), for
    same-size arrays.

    float16 and bfloat16 to and from float32, between C-contiguous arrays, go through the C
    kernel when it is enabled; every other pair is numpy's ``copyto``.
    """
    kernel = _converter(src, out)
    if kernel is not None:
        kernel(src, out)
        return
    np.copyto(out, src, casting="unsafe")


def _converter(src: Array, out: Array) -> Callable[[Array, Array], None] | None:
    """The C function ``convert`` uses for this pair of arrays, if any."""
    if not (
        _enabled
        and _kernels is not None
        and src.size == out.size
        and src.flags.c_contiguous
        and out.flags.c_contiguous
    ):
        return None
    widening = out.dtype == _F32
    half = src.dtype if widening else out.dtype if src.dtype == _F32 else None
    if half == _F16:
        name = "half_to_float" if widening else "float_to_half"
    elif half is not None and _is_bfloat16(half):
        name = "bfloat16_to_float" if widening else "float_to_bfloat16"
    else:
        return None
    kernel: Callable[[Array, Array], None] = getattr(_kernels, name)
    return kernel


def updater(shadow: np.dtype[np.generic], source: np.dtype[np.generic]) -> Update | None:
    """The one-pass C update for a ``shadow``-dtype average of ``source``-dtype blocks, or None
    where it does not apply (no kernels, or a dtype pair other than the two below).

    * float32 shadow, float32/float16/bfloat16 source (``auto`` precision, float32 tensors);
    * float16 or bfloat16 shadow of its own dtype (``--precision native``): every operation
      rounded to that dtype, as numpy's float16 and ml_dtypes' bfloat16 arithmetic does.

    The returned ``update(s, x, c)`` is TF's ``s = s - (s - x) * c`` in place, for C-contiguous
    blocks of one size, ``x`` raw from the checkpoint; pass it to ``engine.apply`` inside
    ``fpmode.tf_arithmetic()`` like the numpy update it replaces.
    """
    if not _enabled or _kernels is None:
        return None
    kind = _SOURCE_KINDS.get(source.name)
    if kind is None:
        return None
    if shadow == _F32:
        kernel = _kernels.ema_update
    elif shadow == source and kind != _SOURCE_KINDS["float32"]:
        kernel = _kernels.ema_update_native
    else:
        return None

    def update(s: Array, x: Array, c: np.generic) -> None:
        kernel(s, x, kind, float(c))

    return update


#: ``sum_update``'s modes (``profiles.Accumulator``'s one-lane updates).
SUM_ADD, SUM_MUL_ADD, SUM_RECURRENCE = 0, 1, 2


#: ``summer``'s closures, one per source dtype (``dtype.name`` costs microseconds a call).
_summers: dict[np.dtype[np.generic], Callable[[Array, Array, float, int], None] | None] = {}


def summer(source: np.dtype[np.generic]) -> Callable[[Array, Array, float, int], None] | None:
    """The one-pass C accumulation of ``source``-dtype blocks (float32, float16 or bfloat16)
    into a float64 array, or None without kernels. ``add(a, x, w, mode)`` does in place, each
    operation rounded as numpy's passes round them: ``a + x`` (``SUM_ADD``), ``a + x * w``
    (``SUM_MUL_ADD``) or ``x + (a - x) * w`` (``SUM_RECURRENCE``), under the thread's
    floating-point mode."""
    if not _enabled or _kernels is None:
        return None
    try:
        return _summers[source]
    except KeyError:
        pass
    kind = _SOURCE_KINDS.get(source.name)
    add = None
    if kind is not None:
        kernel = _kernels.sum_update

        def add(a: Array, x: Array, w: float, mode: int) -> None:
            kernel(a, x, kind, w, mode)

    _summers[source] = add
    return add


def finish_float32(value: npt.NDArray[np.float64], out: Array, divisor: float) -> bool:
    """``out[...] = value / divisor`` rounded once to float32, as numpy's divide and cast give
    it, in one pass; False (nothing done) where the C kernel does not apply: no kernels, an
    ``out`` of another dtype, or arrays that are not C-contiguous."""
    if (
        not _enabled
        or _kernels is None
        or out.dtype != _F32
        or not (value.flags.c_contiguous and out.flags.c_contiguous)
    ):
        return False
    _kernels.sum_finish(value, out, divisor)
    return True


def crc32c_kernel() -> Callable[[Buffer, int], int] | None:
    """The C CRC-32C, or None without kernels: ``crc32c(data, crc)`` extends ``crc`` (the
    CRC-32C of what came before, 0 to start) over the bytes of ``data``, any C-contiguous
    buffer (``ValueError``/``BufferError`` for others), as ``formats.tensorbundle_crc.crc32c``
    does. Where the kernels are enabled the CPU has SSE4.2 (it has AVX2), so this runs the
    crc32 instruction, or VPCLMULQDQ where the CPU has it (with AVX2 alongside crc32, or
    AVX-512);
    ``_kernels.crc32c_level`` and ``set_hardware(False)`` (tests) select a slower loop."""
    if not _enabled or _kernels is None:
        return None
    kernel: Callable[[Buffer, int], int] = _kernels.crc32c
    return kernel


def crc32c_combine_kernel() -> Callable[[int, int, int], int] | None:
    """The C ``crc32c_combine(crc_a, crc_b, len_b)`` (the CRC-32C of two pieces joined, as
    ``formats.tensorbundle_crc.crc32c_combine`` computes it in Python), or None without
    kernels."""
    if not _enabled or _kernels is None:
        return None
    kernel: Callable[[int, int, int], int] = _kernels.crc32c_combine
    return kernel
