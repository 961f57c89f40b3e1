"""Correctly rounded ``base ** n`` for an integer ``n``, in integer arithmetic.

Why it exists: zero debias divides by TF's bias factor ``1 - (1 - c) ** t``, and next to 1
every ulp of ``(1 - c) ** t`` is thousands of ulps of ``1 - (1 - c) ** t``. numpy's
``np.power`` runs its own AVX-512 code on some CPUs and the C library's elsewhere, and the two
round differently (``np.power(np.float32(0.9), 4)`` is 0.6561 on one, 0.6560999 on the other),
so results depended on the machine. TensorFlow calls the C library's ``powf``/``pow``, which are
correctly rounded for all but a vanishing fraction of inputs; so the one answer that matches
TensorFlow on every machine is the correctly rounded one, computed here from the exact value.

Only Python integers are used: the same bits on every CPU, whatever numpy or the C library do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class BinaryFormat:
    """An IEEE binary floating-point format: significand bits (with the implicit one) and the
    exponent range of its normal numbers."""

    name: str
    precision: int
    min_exponent: int  # the smallest normal number is 2 ** min_exponent
    max_exponent: int  # the largest finite number is below 2 ** (max_exponent + 1)


FLOAT32 = BinaryFormat("float32", 24, -126, 127)
FLOAT64 = BinaryFormat("float64", 53, -1022, 1023)

_START_BITS = 128  # working precision of the first try; each retry doubles it


def _round(mantissa: int, exponent: int, fmt: BinaryFormat) -> float:
    """``mantissa * 2 ** exponent`` (``mantissa > 0``) rounded to nearest, ties to even.

    Results below the smallest normal number are flushed to zero, as TensorFlow's CPU kernels
    flush them (FTZ); results beyond the largest finite number are infinite.
    """
    shift = mantissa.bit_length() - fmt.precision
    if shift > 0:
        kept, dropped = mantissa >> shift, mantissa & ((1 << shift) - 1)
        half = 1 << (shift - 1)
        if dropped > half or (dropped == half and kept & 1):
            kept += 1
        mantissa, exponent = kept, exponent + shift
    top = exponent + mantissa.bit_length() - 1  # the result lies in [2 ** top, 2 ** (top + 1))
    if top < fmt.min_exponent:
        return 0.0
    if top > fmt.max_exponent:
        return math.inf
    return math.ldexp(mantissa, exponent)  # exact: at most 53 significant bits


def _multiply(a: tuple[int, int], b: tuple[int, int], bits: int, up: bool) -> tuple[int, int]:
    """``a * b`` for ``(mantissa, exponent)`` pairs, cut to ``bits`` bits: rounded down, or up
    with ``up`` (so a chain of them bounds the exact product from below, or from above)."""
    mantissa, exponent = a[0] * b[0], a[1] + b[1]
    extra = mantissa.bit_length() - bits
    if extra > 0:
        mantissa = -((-mantissa) >> extra) if up else mantissa >> extra
        exponent += extra
    return mantissa, exponent


def _bounded_power(base: tuple[int, int], n: int, bits: int, up: bool) -> tuple[int, int]:
    """``base ** n`` by binary exponentiation, every product rounded the same way."""
    result, square = (1, 0), base
    while n:
        if n & 1:
            result = _multiply(result, square, bits, up)
        n >>= 1
        if n:
            square = _multiply(square, square, bits, up)
    return result


@lru_cache(maxsize=256)
def power(base: float, n: int, fmt: BinaryFormat = FLOAT64) -> float:
    """``base ** n`` correctly rounded to ``fmt`` (nearest, ties to even), for a finite
    ``base >= 0`` and an integer ``n >= 0``; ``0 ** 0`` is 1, as in C.

    The exact value is bracketed by two products rounded down and up; when both ends round to
    the same number, that is the answer, otherwise the precision doubles (Ziv's strategy). An
    exact result, or an exact midpoint between two numbers, which no bracket can settle, is
    computed exactly instead: that needs ``m ** n`` (``m`` the base's odd significand) to be
    short, so it is cheap whenever it happens.
    """
    if not (math.isfinite(base) and base >= 0) or n < 0:
        raise ValueError(f"power() takes a finite base >= 0 and an integer n >= 0, got {base}, {n}")
    if n == 0:
        return 1.0
    if base == 0:
        return 0.0
    numerator, denominator = base.as_integer_ratio()  # denominator: a power of two
    exponent = 1 - denominator.bit_length()
    if numerator == 1 or (numerator.bit_length() - 1) * n <= 2 * fmt.precision:
        # A power of two, or m ** n short enough that it might be exact or a midpoint.
        return _round(numerator**n, exponent * n, fmt)
    bits = _START_BITS
    while True:
        low = _round(*_bounded_power((numerator, exponent), n, bits, up=False), fmt)
        high = _round(*_bounded_power((numerator, exponent), n, bits, up=True), fmt)
        if low == high:
            return low
        bits *= 2
