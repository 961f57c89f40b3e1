"""The engine's arithmetic: hand-derived values, dtypes, and properties (hypothesis)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ema_cli import engine, fpmode

F32 = np.dtype(np.float32)


def run(
    values: list[np.ndarray],
    decay: float,
    *,
    zero_debias: bool = False,
    num_updates: list[int | None] | None = None,
    precision: engine.Precision = "native",
) -> np.ndarray:
    """Replay ``values`` through the engine the way the CLI does, returning the stored result."""
    dtype = values[0].dtype
    work = engine.compute_dtype(dtype, precision)
    with fpmode.tf_arithmetic():
        state = engine.init_state(values[0].astype(work), zero_debias=zero_debias, dtype=work)
        for i, x in enumerate(values):
            n = None if num_updates is None else num_updates[i]
            engine.apply(
                state, x.astype(work), engine.coefficient(engine.effective_decay(decay, n), work)
            )
        return np.asarray(engine.average(state)).astype(dtype)


def test_worked_example_from_the_semantics_doc() -> None:
    xs = [np.array(v, dtype=np.float32) for v in (1.0, 3.0, 5.0)]
    assert [float(run(xs[: i + 1], 0.9)) for i in range(3)] == [
        1.0,
        float(np.float32(1.2)),
        float(np.float32(1.5800002)),
    ]
    zd = [float(run(xs[: i + 1], 0.9, zero_debias=True)) for i in range(3)]
    assert zd == [1.0, float(np.float32(2.0526316)), float(np.float32(3.140221))]


def test_coefficient_is_computed_in_float32_then_cast() -> None:
    c = engine.coefficient(engine.effective_decay(0.999), np.dtype(np.float64))
    assert c == np.float64(0.0009999871253967285)
    assert c.dtype == np.float64
    assert engine.coefficient(np.float32(0.9), F32) == np.float32(0.100000024)


def test_num_updates_ramp_in_float32() -> None:
    # (1 + n) / (10 + n) for n = 0 is 0.1; for n = 90 it is 0.91 (below 0.999, so it wins).
    assert engine.effective_decay(0.999, 0) == np.float32(1) / np.float32(10)
    assert engine.effective_decay(0.999, 90) == np.float32(91) / np.float32(100)
    assert engine.effective_decay(0.5, 90) == np.float32(0.5)
    assert engine.effective_decay(0.999, None) == np.float32(0.999)


def test_update_order_is_tf_assign_sub_not_the_textbook_formula() -> None:
    # s - (s - x) * c and d*s + (1-d)*x round differently; we must be the former.
    s, x = np.float32(0.1), np.float32(0.7)
    c = engine.coefficient(np.float32(0.999), F32)
    expected = np.float32(s - np.float32(np.float32(s - x) * c))
    state = engine.ShadowState(np.array([s], dtype=np.float32))
    engine.apply(state, np.array([x], dtype=np.float32), c)
    assert state.value[0] == expected


def test_inf_becomes_nan_on_the_first_apply() -> None:
    out = run([np.array([np.inf, -np.inf, 1.0], dtype=np.float32)], 0.9)
    assert np.isnan(out[0]) and np.isnan(out[1]) and out[2] == 1.0


def test_bfloat16_native_never_moves_but_auto_does() -> None:
    bf16 = np.dtype(ml_dtypes.bfloat16)
    xs = [np.array([1.0], dtype=bf16), np.array([3.0], dtype=bf16)]
    assert run(xs, 0.999, precision="native")[0] == 1.0
    moved = run(xs, 0.999, precision="auto")
    assert moved.dtype == bf16
    assert moved[0] == np.float32(1.0 + 2 * 0.0009999871253967285).astype(bf16)


def test_float16_local_step_saturates_in_native_precision() -> None:
    # float16 cannot count past 2048: TF's local_step sticks there, and so must ours.
    state = engine.init_state(np.zeros(1, np.float16), zero_debias=True, dtype=np.dtype(np.float16))
    c = engine.coefficient(np.float32(0.5), np.dtype(np.float16))
    for _ in range(2100):
        engine.apply(state, np.ones(1, np.float16), c)
    assert state.local_step is not None and float(state.local_step) == 2048.0


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64])
@pytest.mark.parametrize("precision", ["auto", "native"])
@pytest.mark.parametrize("zero_debias", [False, True])
def test_dtype_and_shape_are_kept(
    dtype: type, precision: engine.Precision, zero_debias: bool
) -> None:
    xs = [np.full((2, 3), v, dtype=dtype) for v in (1.0, 2.0)]
    out = run(xs, 0.9, zero_debias=zero_debias, precision=precision)
    assert out.dtype == np.dtype(dtype) and out.shape == (2, 3)


def test_compute_dtype() -> None:
    assert engine.compute_dtype(np.dtype(np.float16), "auto") == F32
    assert engine.compute_dtype(np.dtype(ml_dtypes.bfloat16), "auto") == F32
    assert engine.compute_dtype(np.dtype(np.float16), "native") == np.float16
    assert engine.compute_dtype(np.dtype(np.float64), "auto") == np.float64


def test_names() -> None:
    assert engine.shadow_name("dense/kernel:0") == "dense/kernel/ExponentialMovingAverage"
    assert engine.shadow_name("layers.0.weight", "EMA") == "layers.0.weight/EMA"
    assert engine.shadow_name("w:1") == "w:1/ExponentialMovingAverage"
    assert not engine.is_averageable(np.dtype(np.int64))
    assert engine.is_averageable(np.dtype(ml_dtypes.bfloat16))


# TF flushes subnormals (and so do we, in tf_arithmetic), which the IEEE properties below do not
# describe: keep values and their differences clear of the subnormal range.
finite = st.floats(-1e6, 1e6, allow_nan=False, width=32).map(lambda v: 0.0 if abs(v) < 1e-30 else v)
sequences = st.lists(hnp.arrays(np.float32, 5, elements=finite), min_size=1, max_size=8)
decays = st.floats(0.0, 1.0, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(x=hnp.arrays(np.float32, 5, elements=finite), n=st.integers(1, 8), decay=decays)
def test_constant_sequence_stays_constant(x: np.ndarray, n: int, decay: float) -> None:
    assert np.array_equal(run([x] * n, decay), x)


@settings(max_examples=200, deadline=None)
@given(xs=sequences, decay=decays, zero_debias=st.booleans())
def test_result_lies_between_min_and_max(
    xs: list[np.ndarray], decay: float, zero_debias: bool
) -> None:
    if zero_debias and np.float32(decay) == 1.0:
        return  # c = 0 makes the bias factor 0: TF (and we) return 0 / 0 = NaN
    out = run(xs, decay, zero_debias=zero_debias)
    lo, hi = np.min(xs, axis=0), np.max(xs, axis=0)
    # Rounding can step a hair outside: allow a few ulps of the bound.
    slack = 4 * np.spacing(np.maximum(np.abs(lo), np.abs(hi)))
    if zero_debias:  # the debias division can amplify rounding when the bias factor is tiny
        slack = slack * 1e3
    assert np.all(out >= lo - slack) and np.all(out <= hi + slack)


integers = st.lists(
    hnp.arrays(np.float32, 5, elements=st.integers(-(2**20), 2**20).map(float)),
    min_size=1,
    max_size=8,
)


@settings(max_examples=100, deadline=None)
@given(xs=integers)
def test_decay_zero_returns_the_last_and_decay_one_the_first(xs: list[np.ndarray]) -> None:
    # With c = 1, s - (s - x) is x only when s - x is exact, as it is for these integers.
    assert np.array_equal(run(xs, 0.0), xs[-1])
    assert np.array_equal(run(xs, 1.0), xs[0])


@settings(max_examples=100, deadline=None)
@given(xs=sequences, decay=decays)
def test_zero_debias_after_one_checkpoint_is_that_checkpoint(
    xs: list[np.ndarray], decay: float
) -> None:
    out = run(xs[:1], decay, zero_debias=True)
    if np.float32(decay) < 1.0:  # at float32 1.0, c = 0 and TF divides 0 by 0
        np.testing.assert_allclose(out, xs[0], rtol=1e-6, atol=1e-30)  # x * c may underflow


@settings(max_examples=100, deadline=None)
@given(xs=sequences, decay=decays, zero_debias=st.booleans(), split=st.integers(1, 4))
def test_blockwise_equals_whole_tensor(
    xs: list[np.ndarray], decay: float, zero_debias: bool, split: int
) -> None:
    whole = run(xs, decay, zero_debias=zero_debias)
    parts = [
        run([x[i : i + split] for x in xs], decay, zero_debias=zero_debias)
        for i in range(0, 5, split)
    ]
    assert np.array_equal(np.concatenate(parts), whole, equal_nan=True)


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(1, 12),
    decay=st.floats(0.0, 1.0),
    zero_debias=st.booleans(),
    ramp=st.booleans(),
)
def test_contribution_weights_match_a_one_hot_replay(
    n: int, decay: float, zero_debias: bool, ramp: bool
) -> None:
    """Checkpoint k holds 1 at element k and 0 elsewhere: the average is the weight vector."""
    if zero_debias and np.float32(decay) == 1.0:
        return
    updates = list(range(n)) if ramp else [None] * n
    xs = [np.eye(n, dtype=np.float64)[k] for k in range(n)]
    replayed = run(xs, decay, zero_debias=zero_debias, num_updates=updates)
    cs = [
        float(engine.coefficient(engine.effective_decay(decay, u), np.dtype(np.float64)))
        for u in updates
    ]
    weights = engine.contribution_weights(cs, zero_debias=zero_debias)
    np.testing.assert_allclose(replayed, weights, rtol=1e-9, atol=1e-12)
    if not zero_debias or not ramp:
        assert abs(sum(weights) - 1.0) < 1e-9
