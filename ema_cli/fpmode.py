"""TensorFlow's floating-point mode for the calling thread: subnormals flushed to zero.

TF sets "flush denormals to zero" on every thread that runs kernels (tensorflow/core/platform/
denormal.h): x86 MXCSR FTZ (bit 15) and DAZ (bit 6), Arm FPCR FZ (bit 24). Numbers below
float32's (or float64's) smallest normal therefore act as zero, in inputs and in results.
numpy has no such switch, but its kernels obey the thread's control register, so the register
is set through the C library's fegetenv/fesetenv for the duration of a replay. Kept apart from
``engine``, which is pure arithmetic: this is the process's state, reached through ctypes.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import platform
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

_FENV_BYTES = 64  # larger than fenv_t on every platform below
# (machine, os) -> (byte offset of the control register in fenv_t, its width, the bits to set)
_FLUSH_BITS = {
    ("x86_64", "linux"): (28, 4, 0x8040),  # glibc: x87 state (28 bytes), then __mxcsr
    ("amd64", "linux"): (28, 4, 0x8040),
    ("aarch64", "linux"): (0, 4, 1 << 24),  # glibc: __fpcr, __fpsr
    ("x86_64", "darwin"): (4, 4, 0x8040),  # __control, __status, __mxcsr
    ("arm64", "darwin"): (8, 8, 1 << 24),  # __fpsr, __fpcr (64-bit each)
}


@functools.cache
def _libm() -> ctypes.CDLL | None:
    """The C library's fegetenv/fesetenv, loaded on first use: ``ctypes.util.find_library``
    runs ``ldconfig``, a fifth of ``--help``'s time, so the usual names are tried first."""
    for name in ("libm.so.6", "libm.dylib"):
        with contextlib.suppress(OSError):
            return ctypes.CDLL(name)
    from ctypes import util

    found = util.find_library("m") or util.find_library("c")
    try:
        return ctypes.CDLL(found) if found else None
    except OSError:
        return None


_FLUSH = _FLUSH_BITS.get((platform.machine().lower(), sys.platform))


def _flush_register(
    flush: bool = True,
) -> tuple[ctypes.Array[ctypes.c_uint8], ctypes.Array[ctypes.c_uint8]] | None:
    """This thread's floating-point environment, and a copy with flushing switched on (or,
    ``flush=False``, off)."""
    libm = _libm()
    if libm is None or _FLUSH is None:
        return None
    offset, width, bits = _FLUSH
    saved = (ctypes.c_uint8 * _FENV_BYTES)()
    if libm.fegetenv(saved) != 0:
        return None
    raw = bytearray(bytes(saved))
    register = int.from_bytes(raw[offset : offset + width], "little")
    register = register | bits if flush else register & ~bits
    raw[offset : offset + width] = register.to_bytes(width, "little")
    return saved, (ctypes.c_uint8 * _FENV_BYTES).from_buffer(raw)


def _flushes_now() -> bool:
    tiny = np.full(1, np.finfo(np.float32).smallest_subnormal, dtype=np.float32)
    return bool(np.multiply(tiny, np.float32(1.0))[0] == 0.0)


_FLUSH_WORKS: bool | None = None  # checked once, the first time the mode is set


@contextlib.contextmanager
def tf_arithmetic() -> Iterator[bool]:
    """Run the enclosed arithmetic (in this thread) as TensorFlow's CPU kernels do.

    Subnormals are flushed to zero, in inputs and results, and floating-point warnings are
    silenced (``inf - inf`` and ``0 / 0`` give NaN in TF without a word). Yields True when the
    flushing is in effect; False on platforms where the mode cannot be set, where results
    differ from TF only for values below 1.2e-38 (float32, bfloat16) or 2.2e-308 (float64).
    float16 is unaffected either way: its values are all normal in float32.
    """
    global _FLUSH_WORKS
    with np.errstate(all="ignore"):
        environments = _flush_register()
        if environments is None:
            yield False
            return
        saved, flushed = environments
        try:
            _libm().fesetenv(flushed)  # type: ignore[union-attr]
            if _FLUSH_WORKS is None:
                _FLUSH_WORKS = _flushes_now()
            yield _FLUSH_WORKS
        finally:
            _libm().fesetenv(saved)  # type: ignore[union-attr]


def enter_tf_arithmetic_for_this_thread() -> None:
    """``tf_arithmetic()`` for the rest of this thread's life: for worker threads that do
    nothing else, so the mode is not set and reset around every block."""
    np.seterr(all="ignore")
    environments = _flush_register()
    if environments is not None:
        _libm().fesetenv(environments[1])  # type: ignore[union-attr]


@dataclass(frozen=True)
class Switch:
    """Prepared switches between TF's mode and IEEE arithmetic for one thread (each one C
    call): for replay workers, which run in ``tf_arithmetic`` mode and average the profiles that
    promise IEEE float64 arithmetic (``profiles``) in between. Make one per thread with
    ``switch()``; ``to_ieee`` then ``to_tf``, as a pair."""

    _tf: ctypes.Array[ctypes.c_uint8] | None
    _ieee: ctypes.Array[ctypes.c_uint8] | None

    def to_ieee(self) -> None:
        if self._ieee is not None:
            _libm().fesetenv(self._ieee)  # type: ignore[union-attr]

    def to_tf(self) -> None:
        if self._tf is not None:
            _libm().fesetenv(self._tf)  # type: ignore[union-attr]


def switch() -> Switch:
    """This thread's ``Switch`` (a no-op where the mode cannot be set)."""
    flushed = _flush_register(flush=True)
    cleared = _flush_register(flush=False)
    if flushed is None or cleared is None:
        return Switch(None, None)
    return Switch(flushed[1], cleared[1])
