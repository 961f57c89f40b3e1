"""The C kernels: every result bit for bit what numpy (and so TF) gives.

Conversion: the f32 -> f16 and f32 -> bf16 directions were also checked by hand over all 2**32
float32 patterns, under the replay's flush-to-zero mode, with the SIMD path and the portable loop
(0 differences); the tests cover every float16 and bfloat16 pattern, every float32 exponent with
the significands that decide rounding, and random patterns. The fused update is checked against
engine's three numpy operations for every float16 and bfloat16 input pattern and random float32
patterns.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ema_cli import engine, fpmode, kernels
from tests.conftest import load, run_cli, write_checkpoint

kernel = kernels._kernels
needs_kernel = pytest.mark.skipif(kernel is None, reason="ema_cli._kernels was not built")
ALL_HALVES = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
ALL_BFLOAT16 = ALL_HALVES.view(np.uint16).view(BFLOAT16)


def test_the_kernel_is_built_where_ci_runs() -> None:
    """Linux x86-64 has a compiler wherever the README's install runs: a silently failed build
    would only show as slow float16 runs, so fail here instead."""
    if not (sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64")):
        pytest.skip("the check is for Linux x86-64")
    assert kernel is not None, "ema_cli._kernels did not build: is a C compiler installed?"
    assert kernel.set_hardware(True), "this CPU has no AVX2 and F16C"


@contextlib.contextmanager
def kernels_on(simd: bool) -> Iterator[bool]:
    """The C kernels in use, with their AVX2/F16C loops (``simd``) or their portable ones,
    whatever EMA_CLI_NO_KERNELS or the CPU say; yields whether the SIMD loops run."""
    assert kernel is not None
    enabled = kernels._enabled
    kernels._enabled = True
    try:
        yield bool(kernel.set_hardware(simd))
    finally:
        kernels._enabled = enabled
        kernel.set_hardware(True)


@pytest.fixture(params=["simd", "portable"])
def path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a test with the AVX2/F16C code and again with the kernel's portable loop."""
    if kernel is None:
        pytest.skip("ema_cli._kernels was not built")
    with kernels_on(request.param == "simd") as simd:
        if request.param == "simd" and not simd:
            pytest.skip("this CPU has no AVX2 and F16C")
        yield request.param


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


def numpy_cast(src: np.ndarray, dtype: type) -> np.ndarray:
    with np.errstate(all="ignore"):
        return src.astype(dtype)


@pytest.mark.parametrize("flushing", [False, True], ids=["plain", "tf-mode"])
def test_every_float16_widens_as_numpy_does(path: str, flushing: bool) -> None:
    out = np.empty(ALL_HALVES.size, np.float32)
    if flushing:  # float16 subnormals are normal float32s: TF's DAZ must not touch them
        with fpmode.tf_arithmetic():
            kernels.convert(ALL_HALVES, out)
    else:
        kernels.convert(ALL_HALVES, out)
    np.testing.assert_array_equal(bits(out), bits(numpy_cast(ALL_HALVES, np.float32)))


def deciding_floats() -> np.ndarray:
    """Every sign and exponent with the low bits that decide rounding to float16: ties,
    neighbours of ties and carries at each place a float16 (normal or subnormal) can end."""
    high = np.arange(1 << 9, dtype=np.uint32) << 23  # sign and exponent
    lows = {0, 1, 0x7FFFFF, 0x400000, 0x3FFFFF, 0x400001}
    for place in range(13, 24):  # the first dropped bit, normal (13) to deepest subnormal
        tie = 1 << (place - 1)
        for kept in (0, 1 << place, (1 << 23) - (1 << place)):  # last kept bit even / odd
            lows |= {kept | tie, kept | (tie - 1), kept | (tie + 1)}
    low = np.array(sorted(lows), dtype=np.uint32)
    return (high[:, None] | low[None, :]).ravel().view(np.float32)


@pytest.mark.parametrize("flushing", [False, True], ids=["plain", "tf-mode"])
def test_float32_rounds_to_float16_as_numpy_does(path: str, flushing: bool) -> None:
    src = deciding_floats()
    out = np.empty(src.size, np.float16)
    if flushing:
        with fpmode.tf_arithmetic():
            kernels.convert(src, out)
    else:
        kernels.convert(src, out)
    np.testing.assert_array_equal(bits(out), bits(numpy_cast(src, np.float16)))


@pytest.mark.parametrize("flushing", [False, True], ids=["plain", "tf-mode"])
def test_every_bfloat16_widens_as_ml_dtypes_does(path: str, flushing: bool) -> None:
    """Subnormals stay (no DAZ on a bit shift, as in ml_dtypes), NaNs keep their payload."""
    out = np.empty(ALL_BFLOAT16.size, np.float32)
    with fpmode.tf_arithmetic() if flushing else contextlib.nullcontext():
        kernels.convert(ALL_BFLOAT16, out)
    np.testing.assert_array_equal(bits(out), bits(numpy_cast(ALL_BFLOAT16, np.float32)))


@needs_kernel
def test_bfloat16_conversions_run_in_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests above would pass on numpy's cast too: here the C functions must be called."""
    calls = []
    for name in ("bfloat16_to_float", "float_to_bfloat16"):
        real = getattr(kernel, name)

        def spy(src: np.ndarray, dst: np.ndarray, real: object = real, name: str = name) -> None:
            calls.append(name)
            real(src, dst)  # type: ignore[operator]

        monkeypatch.setattr(kernel, name, spy)
    with kernels_on(True):
        wide = np.empty(ALL_BFLOAT16.size, np.float32)
        kernels.convert(ALL_BFLOAT16, wide)
        kernels.convert(wide, np.empty(wide.size, BFLOAT16))
    assert calls == ["bfloat16_to_float", "float_to_bfloat16"]


def deciding_floats_for_bfloat16() -> np.ndarray:
    """Every sign and exponent with the low 16 bits that decide rounding to bfloat16 (ties,
    their neighbours, carries into the exponent), and every NaN and infinity pattern kind."""
    high = np.arange(1 << 9, dtype=np.uint32) << 23
    lows = {0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x10000, 0x17FFF, 0x18000, 0x18001}
    lows |= {0x7F0000 | low for low in (0x7FFF, 0x8000, 0x8001, 0xFFFF)}  # carries
    lows |= {0x7FFFFF, 0x400000, 0x3FFFFF, 0x400001, 0x7F8000}  # NaN payloads, quiet or not
    low = np.array(sorted(lows), dtype=np.uint32)
    return (high[:, None] | low[None, :]).ravel().view(np.float32)


@pytest.mark.parametrize("flushing", [False, True], ids=["plain", "tf-mode"])
def test_float32_rounds_to_bfloat16_as_ml_dtypes_does(path: str, flushing: bool) -> None:
    src = deciding_floats_for_bfloat16()
    out = np.empty(src.size, BFLOAT16)
    with fpmode.tf_arithmetic() if flushing else contextlib.nullcontext():
        kernels.convert(src, out)
    np.testing.assert_array_equal(bits(out), bits(numpy_cast(src, BFLOAT16)))


@needs_kernel
@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, (1 << 32) - 1), min_size=0, max_size=70),
    st.booleans(),
    st.sampled_from([np.dtype(np.float16), BFLOAT16]),
)
def test_random_float32_patterns_round_as_numpy_does(
    patterns: list[int], simd: bool, half: np.dtype
) -> None:
    """Any length (groups of 8 plus a tail), NaNs of any payload mixed with ordinary values;
    float16 as numpy rounds, bfloat16 as ml_dtypes does."""
    src = np.array(patterns, dtype=np.uint32).view(np.float32)
    out = np.empty(src.size, half)
    back = np.empty(src.size, np.float32)
    with kernels_on(simd):
        kernels.convert(src, out)
        kernels.convert(out, back)
    np.testing.assert_array_equal(bits(out), bits(numpy_cast(src, half)))
    np.testing.assert_array_equal(bits(back), bits(numpy_cast(out, np.float32)))


def test_signalling_nans_keep_numpy_bits_in_a_group_of_ordinary_values(path: str) -> None:
    """The hardware quiets signalling NaNs; numpy does not. Groups with a NaN are redone."""
    halves = np.array([1.5, 0x7C01, -2.0, 0xFC05, 0.0, 3.0, 0x7E00, 7.0, 0x7D00], dtype=np.float64)
    h = np.array(
        [np.float16(v).view(np.uint16) if v < 16 else int(v) for v in halves], dtype=np.uint16
    ).view(np.float16)
    wide = np.empty(h.size, np.float32)
    kernels.convert(h, wide)
    np.testing.assert_array_equal(bits(wide), bits(numpy_cast(h, np.float32)))
    f = np.array(
        [0x7F800001, 0x3F800000, 0xFF800123, 0x7FC00000, 1, 2, 3, 4, 0x7F802000], np.uint32
    )
    narrow = np.empty(f.size, np.float16)
    kernels.convert(f.view(np.float32), narrow)
    np.testing.assert_array_equal(bits(narrow), bits(numpy_cast(f.view(np.float32), np.float16)))


@needs_kernel
def test_mismatched_sizes_are_refused() -> None:
    assert kernel is not None
    with pytest.raises(ValueError, match="do not match"):
        kernel.half_to_float(np.zeros(4, np.float16), np.zeros(3, np.float32))
    with pytest.raises((BufferError, ValueError), match="contiguous"):
        kernel.float_to_half(np.zeros(8, np.float32)[::2], np.zeros(4, np.float16))


def test_other_pairs_and_strided_arrays_fall_back_to_numpy() -> None:
    src = np.arange(12, dtype=np.float16)[::2]  # not contiguous
    out = np.empty(6, np.float32)
    kernels.convert(src, out)
    np.testing.assert_array_equal(out, np.arange(0, 12, 2, dtype=np.float32))
    wide = np.empty(3, np.float64)
    kernels.convert(np.array([1, 2, 3], np.float16), wide)
    np.testing.assert_array_equal(wide, [1.0, 2.0, 3.0])


def numpy_update(s: np.ndarray, x: np.ndarray, c: np.generic) -> np.ndarray:
    """engine's own update, on a copy: x widened to s's dtype, then the three numpy operations."""
    state = engine.ShadowState(value=s.copy())
    engine.apply(state, x.astype(s.dtype), c)
    return state.value


def kernel_update(s: np.ndarray, x: np.ndarray, c: np.generic) -> np.ndarray:
    state = engine.ShadowState(value=s.copy())
    update = kernels.updater(state.value.dtype, x.dtype)
    assert update is not None
    engine.apply(state, x, c, update=update)
    return state.value


SHADOWS = np.array(
    [0.0, -0.0, 1.0, -3.5e-3, 6.1e4, 1e30, 3e-38, 1e-40, np.inf, -np.inf, np.nan], np.float32
)
COEFFICIENTS = [np.float32(c) for c in (0.0, 1.0, 0.1, 1 - np.float32(0.999), 2**-24, 0.5)]


@pytest.mark.parametrize("source", ["float16", "bfloat16"])
def test_fused_update_of_every_half_input_matches_numpy(path: str, source: str) -> None:
    """Every 16-bit input pattern (NaNs, subnormals, infinities included) against shadows from
    subnormal to infinite, in TF's flush-to-zero mode."""
    x = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.dtype(source))
    with fpmode.tf_arithmetic():
        for shadow in SHADOWS:
            s = np.full(x.size, shadow, np.float32)
            for c in COEFFICIENTS:
                np.testing.assert_array_equal(
                    bits(kernel_update(s, x, c)),
                    bits(numpy_update(s, x, c)),
                    err_msg=f"{shadow} {c}",
                )


@needs_kernel
@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, (1 << 32) - 1), st.integers(0, (1 << 32) - 1)), max_size=40),
    st.floats(0, 1, width=32),
    st.booleans(),
    st.booleans(),
)
def test_fused_update_of_float32_matches_numpy(
    pairs: list[tuple[int, int]], c: float, flushing: bool, simd: bool
) -> None:
    s = np.array([p[0] for p in pairs], np.uint32).view(np.float32)
    x = np.array([p[1] for p in pairs], np.uint32).view(np.float32)
    with fpmode.tf_arithmetic() if flushing else np.errstate(all="ignore"), kernels_on(simd):
        np.testing.assert_array_equal(
            bits(kernel_update(s, x, np.float32(c))), bits(numpy_update(s, x, np.float32(c)))
        )


def test_fused_update_only_where_it_applies() -> None:
    f32, f64 = np.dtype(np.float32), np.dtype(np.float64)
    assert kernels.updater(f64, f64) is None
    assert kernels.updater(np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)) is None
    assert kernels.updater(f32, np.dtype(np.int32)) is None
    assert (kernels.updater(f32, np.dtype(np.float16)) is not None) == kernels._enabled


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16], ids=["float16", "bfloat16"])
def test_native_update_of_every_half_input_matches_numpy(path: str, dtype: type) -> None:
    """--precision native: every operation rounded to the tensor's dtype. Every 16-bit input
    pattern against shadows of every kind, each coefficient as TF casts it, in TF's mode."""
    x = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(dtype)
    shadows = np.concatenate([numpy_cast(SHADOWS, dtype), x[[1, 0x8001, 0x0400, 0x7C01, 0x7FC1]]])
    with fpmode.tf_arithmetic():
        for shadow in shadows:
            s = np.full(x.size, shadow, dtype)
            for decay in (0.0, 0.9, 0.999, 0.5, 1.0, 0.99999):
                c = engine.coefficient(np.float32(decay), np.dtype(dtype))
                np.testing.assert_array_equal(
                    bits(kernel_update(s, x, c)),
                    bits(numpy_update(s, x, c)),
                    err_msg=f"{shadow!r} {decay}",
                )


@needs_kernel
def test_fused_update_refuses_mismatched_blocks() -> None:
    assert kernel is not None
    with pytest.raises(ValueError, match="do not match"):
        kernel.ema_update(np.zeros(4, np.float32), np.zeros(4, np.float32)[:3], 0, 0.5)
    with pytest.raises(ValueError, match="kind"):
        kernel.ema_update(np.zeros(4, np.float32), np.zeros(4, np.float32), 7, 0.5)
    with pytest.raises(ValueError, match="do not match"):
        kernel.ema_update_native(np.zeros(4, np.float16), np.zeros(3, np.float16), 1, 0.5)
    with pytest.raises(ValueError, match="kind"):
        kernel.ema_update_native(np.zeros(4, np.float16), np.zeros(4, np.float16), 0, 0.5)


def test_runs_give_the_same_bytes_with_and_without_the_kernels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(3)
    paths = []
    for step in range(1, 5):
        wide = rng.standard_normal(1003) * 10.0 ** rng.integers(-7, 5, 1003)
        tensors = {
            "h": wide.astype(np.float16),
            "b": wide.astype(ml_dtypes.bfloat16),
            "f": wide.astype(np.float32),
        }
        for t in tensors.values():
            t[:4] = [np.inf, -np.inf, np.nan, 6e-8]
        paths.append(write_checkpoint(tmp_path / f"ckpt-{step}.safetensors", tensors))
    options = [[], ["--zero-debias", "--num-updates", "step"], ["--precision", "native"]]
    outputs = {}
    for enabled in (True, False):
        monkeypatch.setattr(kernels, "_enabled", enabled)
        for k, extra in enumerate(options):
            out = tmp_path / f"ema-{enabled}-{k}.safetensors"
            result = run_cli(["average", *paths, "-o", out, "--decay", "0.9", "-q", *extra])
            assert result.exit_code == 0, result.output
            outputs[enabled, k] = out.read_bytes()
            assert load(out)["h"].dtype == np.float16
    for k in range(len(options)):
        assert outputs[True, k] == outputs[False, k], options[k]


def numpy_sum(a: np.ndarray, x: np.ndarray, w: float, mode: int) -> np.ndarray:
    """``profiles.Accumulator``'s numpy passes for one lane: widen, then add / multiply-add /
    the recurrence, each rounded."""
    a_before, a = a, a.copy()
    x64 = np.empty_like(a)
    with np.errstate(all="ignore"):
        np.copyto(x64, x, casting="unsafe")
        if mode == kernels.SUM_ADD:
            np.add(a, x64, out=a)
        elif mode == kernels.SUM_MUL_ADD:
            np.add(a, np.multiply(x64, w), out=a)
        else:
            t = np.subtract(a, x64)
            np.multiply(t, w, out=t)
            np.add(x64, t, out=a)
    # Where both operands are NaNs, numpy's loops may return either one's (its SSE loops swap
    # an addition's operands): the kernel keeps x86's operand order, as numpy's AVX2 loops do,
    # so the sum's NaN wins and the recurrence's checkpoint NaN, quieted.
    both = np.isnan(x64) & np.isnan(a_before)
    first = x64 if mode == kernels.SUM_RECURRENCE else a_before
    a[both] = (first[both].view(np.uint64) | np.uint64(1 << 51)).view(np.float64)
    return a


@pytest.mark.parametrize("mode", [0, 1, 2], ids=["add", "mul-add", "recurrence"])
@pytest.mark.parametrize("source", ["float32", "float16", "bfloat16"])
def test_sums_are_numpys_bit_for_bit(path: str, mode: int, source: str) -> None:
    """The linear profiles' one-pass float64 sums give numpy's passes' bits, NaN payloads,
    infinities, signed zeros and subnormals included (in IEEE mode, where the replay runs
    them: ``fpmode.Switch``)."""
    dtype = np.dtype(ml_dtypes.bfloat16) if source == "bfloat16" else np.dtype(source)
    rng = np.random.default_rng(13)
    n = 1003  # not a multiple of 8: the scalar tail runs too
    raw = rng.integers(0, 1 << (8 * dtype.itemsize), n, dtype=np.uint64)
    x = raw.astype(np.uint16 if dtype.itemsize == 2 else np.uint32).view(dtype)
    a = rng.standard_normal(n) * np.exp2(rng.integers(-1070, 1020, n))
    a[::17] = np.nan
    a[::19] = -np.inf
    a[::23] = -0.0
    a[::29] = 5e-324
    summer = kernels.summer(dtype)
    assert summer is not None
    for w in (1.0, 0.3, 1e-300, -2.5):
        got = a.copy()
        summer(got, x, w, mode)
        want = numpy_sum(a, x, w, mode)
        np.testing.assert_array_equal(got.view(np.uint64), want.view(np.uint64), err_msg=str(w))


def test_sum_finish_rounds_as_numpys_divide_and_cast(path: str) -> None:
    """A linear profile's last step, ``value / total`` rounded to float32 in one pass, gives
    numpy's two passes' bits: NaN payloads, infinities, overflow to inf, float32 subnormals and
    their underflow to zero, signed zeros and ties included."""
    rng = np.random.default_rng(29)
    n = 2005  # not a multiple of 8: the scalar tail runs too
    value = rng.standard_normal(n) * np.exp2(rng.integers(-160, 140, n))
    value[::13] = np.nan
    value[1::13] = -np.inf
    value[2::13] = -0.0
    value[3::13] = 3.4028235677973366e38  # float32's largest, rounded up by a hair: overflows
    value[4::13] = 1.401298464324817e-45 * 1.5  # between float32 subnormals: a tie
    nan_payloads = rng.integers(1, 1 << 51, 40, dtype=np.uint64) | np.uint64(0x7FF0000000000000)
    value[5::50] = nan_payloads[: len(value[5::50])].view(np.float64)  # signalling ones too
    for divisor in (1.0, 3.0, 0.1, 7.000000000000001e-5, 1e300):
        out = np.empty(n, np.float32)
        assert kernels.finish_float32(value, out, divisor)
        with np.errstate(all="ignore"):
            want = np.divide(value, divisor).astype(np.float32)
        np.testing.assert_array_equal(out.view(np.uint32), want.view(np.uint32), str(divisor))


def test_sum_finish_only_where_it_applies() -> None:
    value = np.arange(16, dtype=np.float64)
    assert not kernels.finish_float32(value, np.empty(16, np.float16), 2.0)
    assert not kernels.finish_float32(value[::2], np.empty(8, np.float32), 2.0)
    if kernel is not None:
        with pytest.raises(ValueError, match="do not match"):
            kernel.sum_finish(value, np.empty(15, np.float32), 2.0)


def test_a_stale_build_is_not_used() -> None:
    """A C module built from an older ``_kernels.c`` (a failed compile leaves it in place)
    lacks functions of today's: numpy runs instead, and ``--version`` says why."""
    code = (
        "import sys, types\n"
        "stale = types.ModuleType('ema_cli._kernels')\n"
        "stale.set_hardware = lambda flag: True\n"
        "stale.half_to_float = stale.float_to_half = stale.ema_update = lambda *a: None\n"
        "sys.modules['ema_cli._kernels'] = stale\n"
        "from ema_cli import kernels\n"
        "print(kernels._enabled, kernels.updater(kernels._F32, kernels._F16), kernels.describe())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != kernels.DISABLE_ENV}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert done.stdout.strip() == (
        "False None numpy (the C kernels are from an older ema-cli: reinstall to rebuild them)"
    )
