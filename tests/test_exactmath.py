"""``exactmath.power`` against exact rational arithmetic: correctly rounded, ties to even."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ema_cli import engine, exactmath
from ema_cli.exactmath import FLOAT32, FLOAT64, BinaryFormat


def exact_round(value: Fraction, fmt: BinaryFormat) -> float:
    """The reference: ``value > 0`` rounded to nearest, ties to even, flushed below the normal
    range (as ``power`` documents), by exact rational arithmetic."""
    top = value.numerator.bit_length() - value.denominator.bit_length()  # corrected below
    while Fraction(2) ** top > value:
        top -= 1
    while Fraction(2) ** (top + 1) <= value:
        top += 1
    if top < fmt.min_exponent:
        return 0.0
    ulp = Fraction(2) ** (top - fmt.precision + 1)
    scaled = value / ulp
    below = math.floor(scaled)
    rest = scaled - below
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and below % 2):
        below += 1
    result = below * ulp
    if result >= Fraction(2) ** (fmt.max_exponent + 1):
        return math.inf
    return float(result)


def float32s(low: float, high: float) -> st.SearchStrategy[float]:
    return st.floats(low, high, width=32).map(float)


@settings(max_examples=400, deadline=None)
@given(base=float32s(0.0, 1.0), n=st.integers(0, 400))
def test_float32_powers_are_correctly_rounded(base: float, n: int) -> None:
    expected = 1.0 if n == 0 else exact_round(Fraction(base) ** n, FLOAT32) if base else 0.0
    assert exactmath.power(base, n, FLOAT32) == expected


@settings(max_examples=300, deadline=None)
@given(base=st.floats(0.0, 1.0), n=st.integers(1, 200))
def test_float64_powers_are_correctly_rounded(base: float, n: int) -> None:
    expected = exact_round(Fraction(base) ** n, FLOAT64) if base else 0.0
    assert exactmath.power(base, n, FLOAT64) == expected


def test_decays_next_to_one_with_long_runs() -> None:
    """The case that matters: 1 - c close to 1 and a large local_step, where an ulp of the power
    is thousands of ulps of the bias factor. Exact references for large n come from the
    bracket itself being exact rational arithmetic: compare with a short Fraction power
    computed by squaring at full precision."""
    for c in (1e-4, 1e-6, 2.0**-24, 0.001, 0.01):
        base = float(np.float32(1) - np.float32(c))
        for n in (2, 3, 17, 1000, 4099):
            assert exactmath.power(base, n, FLOAT32) == exact_round(Fraction(base) ** n, FLOAT32)


def test_exact_results_and_midpoints() -> None:
    # (11/16)**7 = 11**7 / 2**28 and 11**7 has 25 bits: exactly halfway between two float32s,
    # so it rounds to the even one; no bracket could settle it.
    midpoint = Fraction(11, 16) ** 7
    assert exactmath.power(11 / 16, 7, FLOAT32) == exact_round(midpoint, FLOAT32)
    assert exactmath.power(11 / 16, 7, FLOAT64) == float(midpoint)  # exact in float64
    assert exactmath.power(0.5, 3) == 0.125
    assert exactmath.power(0.75, 2, FLOAT32) == 0.5625
    assert exactmath.power(1.0, 10**9, FLOAT32) == 1.0


def test_edges() -> None:
    assert exactmath.power(0.3, 0) == 1.0
    assert exactmath.power(0.0, 0) == 1.0
    assert exactmath.power(0.0, 5) == 0.0
    assert exactmath.power(0.5, 200, FLOAT32) == 0.0  # below float32's normal range: flushed
    assert exactmath.power(0.5, 126, FLOAT32) == 2.0**-126
    assert exactmath.power(0.5, 1022, FLOAT64) == 2.0**-1022
    assert exactmath.power(0.5, 1023, FLOAT64) == 0.0
    assert exactmath.power(2.0, 128, FLOAT32) == math.inf
    assert exactmath.power(float(np.float32(0.9)), 4, FLOAT32) == float(np.float32(0.6560999))
    for bad in ((-0.5, 2), (math.nan, 2), (math.inf, 2), (0.5, -1)):
        with pytest.raises(ValueError):
            exactmath.power(*bad)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_bias_factor_in_each_dtype(dtype: str) -> None:
    """``1 - (1 - c) ** t`` with ``1 - c`` and the subtraction in the dtype and the power
    rounded to float32 first for half dtypes (TF's Eigen widens half and bfloat16 to float32
    for ``pow``), then to the dtype."""
    import ml_dtypes

    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    c = engine.coefficient(np.float32(0.999), dt)
    one = dt.type(1)
    a = float(np.subtract(one, c))
    for t in (1, 2, 7, 100, 255):
        fmt = FLOAT64 if dtype == "float64" else FLOAT32
        power = exact_round(Fraction(a) ** t, fmt)
        expected = np.subtract(one, np.asarray(power).astype(dt)[()])
        got = engine.zero_debias_factor(c, t)
        assert np.dtype(type(got)) == dt
        assert np.asarray(got).tobytes() == np.asarray(expected).astype(dt).tobytes()
