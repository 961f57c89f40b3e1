"""CRC-32C (Castagnoli) as TensorFlow's TensorBundle and LevelDB tables use it.

- ``crc32c(data, crc)`` extends ``crc`` (0 to start) over ``data``: the standard CRC-32C
  (reflected polynomial 0x82F63B78, initial and final xor 0xFFFFFFFF), so
  ``crc32c(b, crc32c(a)) == crc32c(a + b)``.
- Stored checksums are *masked*: ``mask(c) = ((c >> 15) | (c << 17)) + 0xA282EAD8`` (mod 2^32).
- ``crc32c_combine(crc_a, crc_b, len_b) == crc32c(a + b)``: the checksum of two pieces computed
  apart, so blocks that arrive in any order, from any thread, still give the whole tensor's CRC
  without reading it twice. It multiplies ``crc_a`` by ``x^(8 * len_b)`` modulo the polynomial
  in GF(2) (the method of zlib's ``crc32_combine``): in C where the kernels are (0.3 us a
  call, against 5 us in Python, where the power is cached per length).

What computes it, first that is available:

1. ema-cli's own C kernel (``kernels.crc32c_kernel``, in ``_kernels.c``), wherever the C
   kernels are built and enabled (x86-64 with AVX2, so SSE4.2 too), with the GIL released from
   8 KiB: where the CPU has AVX-512 VPCLMULQDQ (Ice Lake, Zen 4 and later), buffers of 1 KiB
   and more are folded 256 bytes at a time by carry-less multiplication; where it has
   VPCLMULQDQ with AVX2 only (Zen 3, Alder Lake), the same folds run on 256-bit registers
   while the ``crc32`` instruction takes three streams of the rest alongside (from 1792 bytes;
   the vector and integer units work at once); otherwise the ``crc32`` instruction runs over
   three interleaved streams (its latency is 3 cycles, its throughput 1 per cycle, 8 bytes),
   joined by precomputed shift tables. The loops by ``_kernels.crc32c_level``, GB/s (random
   numpy buffers re-read from cache, best of 5; 2-vCPU KVM guests, idle):

   ============================================  =======  =====  =====  =====
   machine, buffer                               AVX-512  AVX2   crc32  table
   ============================================  =======  =====  =====  =====
   AMD EPYC Zen 3 (no AVX-512), 64 KiB           --       26.4   19.9   --
   AMD EPYC Zen 3 (no AVX-512), 1 MiB            --       35.2   23.7   --
   AMD EPYC Zen 3 (no AVX-512), 64 MiB           --       23.4   16.9   --
   AMD EPYC Zen 4 (family 25 model 17), 4 KiB    19.0     15.7   13.8   2.1
   AMD EPYC Zen 4, 64 KiB                        49.1     36.7   24.4   2.2
   AMD EPYC Zen 4, 1 MiB                         54.6     40.7   27.7   2.2
   AMD EPYC Zen 4, 64 MiB                        33.7     23.6   14.8   2.2
   ============================================  =======  =====  =====  =====

   (Zen 3 measured 2026-12-02, before the join of the AVX2 loop's four registers took
   carry-less multiplications, which lifted its 4 KiB figure on Zen 4 from 10.1 to 15.7; Zen 4
   2026-12-03.) The AVX2 folds alone, without the crc32 streams, were no faster than crc32 x 3
   on Zen 3 (24.5 against 23.6 GB/s at 1 MiB). Earlier (2026-12-02), on a 2-vCPU KVM guest
   reporting "Intel(R) Xeon(R) Processor" (AVX-512, AMX; not the AMD EPYC Zen 4 of the
   RESULTS.md entries), load 1-2.8 from another benchmark, numpy uint8
   buffers, ``time.perf_counter``, best / median of 9-15 alternated timings, in GB/s:

   ================================  ==========  ===========  =============
   case                              VPCLMULQDQ  crc32 x 3    google-crc32c
   ================================  ==========  ===========  =============
   1 MiB, re-read from cache         110 / 93    27-30 / 26   9-30 / 8-28
   1 MiB right after its ``preadv``  63 / 60     24-26 / 23   24-27 / 22-25
   64 MiB (from memory)              13 / 12     13-21 / 13   5-7 / 5-7
   ================================  ==========  ===========  =============

   The reader's pattern is the second row: a 1 MiB block checksummed right after its read.
   ``TensorBundleReader.verify`` of a 384 MB bundle (read and check every byte, 1 MiB at a
   time) took 58-62 ms with VPCLMULQDQ, 71-74 ms with the crc32 loop or google-crc32c, 54-56 ms
   with no checksum at all: the checksum's CPU cut from about 17 ms to 5 ms. The crc32 loop
   alone only matches google-crc32c there (both at the instruction's limit); google-crc32c is
   slower from memory and, in some runs, on cached buffers read again (its loop issues
   ``prefetchnta``, the likely reason), and holds the GIL for numpy arrays (it releases it
   only for ``bytes`` of 1 MB or more).
2. Google's ``google-crc32c`` (its C library; Apache-2.0 like ema-cli, where the slightly faster
   ``crc32c`` package is LGPL), without the C kernels (no compiler at install time,
   ``EMA_CLI_NO_KERNELS=1``, a CPU without AVX2, or not x86-64, where it has its own hardware
   paths). It takes ``bytes`` and numpy arrays, so other buffers are viewed as a uint8 array
   (no copy).
3. A table-driven pure-Python loop, without either: the same values at a few MB/s, correct,
   only too slow for real checkpoints.

Overlapping two replay workers' checksums alone did not speed the replay up (google-crc32c's C
library through ctypes, GIL released: 21 GB/s on two threads against 10, the replay no faster
within noise, ``benchmarks/run.py --crc``; RESULTS.md, 2026-12-02): while one worker
checksums, the other reads or runs the C update, which release the GIL.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Union

import numpy as np
import numpy.typing as npt

from ema_cli import kernels

_crc32c_hw: Callable[[int, Any], int] | None  # (crc, data) -> crc
try:
    import google_crc32c

    _crc32c_hw = google_crc32c.extend if google_crc32c.implementation == "c" else None
except ImportError:  # without it the pure-Python fallback below serves (slowly)
    _crc32c_hw = None

#: What the CRC functions accept: any C-contiguous buffer.
Buffer = Union[bytes, bytearray, memoryview, "npt.NDArray[Any]"]

_POLY = 0x82F63B78  # CRC-32C, bit-reflected
_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF


def _make_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _POLY if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE = _make_table()


def crc32c_python(data: Buffer, crc: int = 0) -> int:
    """The pure-Python CRC-32C: ``crc`` extended over ``data`` (the fallback; slow)."""
    table = _TABLE
    crc ^= _U32
    for byte in np.frombuffer(data, np.uint8).tolist():
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ _U32


def crc32c(data: Buffer, crc: int = 0) -> int:
    """``crc`` (the CRC-32C of what came before, 0 at the start) extended over ``data``."""
    kernel = kernels.crc32c_kernel()
    if kernel is not None:
        return kernel(data, crc)
    if _crc32c_hw is not None:
        if not isinstance(data, (bytes, np.ndarray)):
            data = np.frombuffer(data, np.uint8)  # a view: google-crc32c takes no memoryview
        return int(_crc32c_hw(crc, data))
    return crc32c_python(data, crc)


#: Whether a fast implementation (ema-cli's C kernel or google-crc32c's) is in use.
ACCELERATED = kernels.crc32c_kernel() is not None or _crc32c_hw is not None


def mask(crc: int) -> int:
    """The masked form TF stores: ``((c >> 15) | (c << 17)) + 0xA282EAD8`` mod 2^32."""
    return ((((crc >> 15) | (crc << 17)) & _U32) + _MASK_DELTA) & _U32


def unmask(masked: int) -> int:
    """The inverse of ``mask``."""
    rotated = (masked - _MASK_DELTA) & _U32
    return ((rotated >> 17) | (rotated << 15)) & _U32


def _multiply(a: int, b: int) -> int:
    """``a * b`` modulo the CRC polynomial, both bit-reflected (bit 31 is x^0)."""
    product = 0
    bit = 1 << 31
    while True:
        if a & bit:
            product ^= b
            if not a & (bit - 1):
                return product
        bit >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
        if not bit:
            return product


def _square_powers() -> tuple[int, ...]:
    """``x^(2^k)`` modulo the polynomial for k = 0..63, each the square of the one before.
    (They do not repeat with period 32: until 2026-12-02 this assumed so, which gave wrong
    combined CRCs for pieces of 2^30 bytes and more.)"""
    powers = [1 << 30]  # x^1
    for _ in range(63):
        powers.append(_multiply(powers[-1], powers[-1]))
    return tuple(powers)


_X2N = _square_powers()


@functools.lru_cache(maxsize=64)
def _shift_operator(nbytes: int) -> int:
    """``x^(8 * nbytes)`` modulo the polynomial: multiplying a CRC by it appends ``nbytes``
    zero bytes to its message (without the pre/post conditioning, which cancels out)."""
    if nbytes >= 1 << 60:
        raise ValueError(f"crc32c_combine: a piece of {nbytes} bytes")
    power = 1 << 31  # x^0
    k = 3  # 8 = 2^3 bits per byte
    while nbytes:
        if nbytes & 1:
            power = _multiply(_X2N[k], power)
        nbytes >>= 1
        k += 1
    return power


def crc32c_combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """``crc32c(a + b)`` from ``crc32c(a)``, ``crc32c(b)`` and ``len(b)``."""
    kernel = kernels.crc32c_combine_kernel()
    if kernel is not None:  # about 15 times faster: the replay combines once per block read
        return kernel(crc_a, crc_b, len_b)
    return crc32c_combine_python(crc_a, crc_b, len_b)


def crc32c_combine_python(crc_a: int, crc_b: int, len_b: int) -> int:
    """``crc32c_combine`` in Python (without the C kernels)."""
    if len_b == 0:
        return crc_a
    return _multiply(_shift_operator(len_b), crc_a) ^ crc_b
