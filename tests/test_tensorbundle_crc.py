"""CRC-32C: every implementation ``tensorbundle_crc.crc32c`` may use gives the same values.

The implementations, in the order ``crc32c`` prefers them: the C kernel's AVX-512 VPCLMULQDQ
loop (256-byte folds from 1 KiB, then the crc32 loop for the rest), its AVX2 VPCLMULQDQ loop
(the same folds on ymm, with the crc32 instruction over three streams of the rest alongside,
from 1792 bytes; shorter buffers go to the SSE4.2 loop), its SSE4.2 loop (three
interleaved streams of 8 KiB, then of 256 bytes, then one), its portable loop (slicing-by-8,
what a CPU without SSE4.2 runs), google-crc32c, and the pure-Python table loop.
Each is checked against the pure-Python reference and google-crc32c: random bytes, split
points, start addresses off 8-byte alignment, lengths on and around the stream-chunk
boundaries, multi-MB buffers and every kind of buffer the readers and writers pass.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ema_cli import kernels
from ema_cli.formats import tensorbundle_crc as crc_module
from ema_cli.formats.tensorbundle_crc import crc32c, crc32c_combine, crc32c_python

try:
    import google_crc32c

    GOOGLE: Callable[[int, object], int] | None = (
        google_crc32c.extend if google_crc32c.implementation == "c" else None
    )
except ImportError:
    GOOGLE = None

kernel = kernels._kernels
#: The C kernel's loops by the level ``_kernels.crc32c_level`` gives them.
KERNEL_LEVELS = {"vpclmul512": 3, "vpclmul256": 2, "sse42": 1, "portable": 0}
IMPLEMENTATIONS = [*KERNEL_LEVELS, "google", "python"]
# The SSE4.2 loop's chunks: 3 streams of 8 KiB, then 3 of 256 bytes, then one stream of 8-byte
# words, then bytes; it first steps bytes up to an 8-byte boundary. The VPCLMULQDQ loop folds
# 256 bytes at a time from 1 KiB and leaves the rest (< 256 bytes) to the SSE4.2 loop.
# The AVX2 loop's passes each fold 256 bytes and take 64 bytes of each of three streams, from 4
# passes (1792 bytes) on; the rest after the streams goes to the SSE4.2 loop.
LONG, SHORT, FOLD, PASS = 3 * 8192, 3 * 256, 256, 256 + 3 * 64
BASES = (0, 8, SHORT, 2 * SHORT, LONG, LONG + SHORT, 2 * LONG, 2 * LONG + 3 * SHORT)
BASES_FOLD = (4 * FOLD, 5 * FOLD, 6 * FOLD - SHORT // 2, 64 * FOLD + SHORT)
BASES_PASS = (4 * PASS, 5 * PASS, 5 * PASS - 1, 4 * PASS + FOLD, 100 * PASS + SHORT)
BOUNDARIES = sorted(
    {
        base + delta
        for base in (*BASES, *BASES_FOLD, *BASES_PASS)
        for delta in (-9, -8, -7, -1, 0, 1, 7, 8, 9)
        if base + delta >= 0
    }
)


@contextlib.contextmanager
def implementation(name: str) -> Iterator[None]:
    """``crc32c`` running through one implementation (skips the test where it is missing)."""
    enabled, hardware = kernels._enabled, crc_module._crc32c_hw
    try:
        if name in KERNEL_LEVELS:
            if kernel is None:
                pytest.skip("ema_cli._kernels was not built")
            kernels._enabled = True
            if kernel.crc32c_level(KERNEL_LEVELS[name]) != KERNEL_LEVELS[name]:
                pytest.skip(f"this CPU cannot run the {name} loop")
        else:
            kernels._enabled = False
            if name == "python":
                crc_module._crc32c_hw = None
            elif crc_module._crc32c_hw is None:
                pytest.skip("google-crc32c has no C extension here")
        yield
    finally:
        kernels._enabled, crc_module._crc32c_hw = enabled, hardware
        if kernel is not None:
            kernel.set_hardware(True)


def reference(data: bytes, crc: int = 0) -> int:
    """google-crc32c's value where it has its C extension, else the pure-Python one."""
    return int(GOOGLE(crc, data)) if GOOGLE is not None else crc32c_python(data, crc)


def random_bytes(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_check_value_and_empty_input(name: str) -> None:
    with implementation(name):
        assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
        assert crc32c(b"") == 0
        assert crc32c(b"", 0xDEADBEEF) == 0xDEADBEEF
        assert crc32c(b"\x00" * 32) == 0x8A9136AA  # RFC 3720 B.4 test vectors
        assert crc32c(b"\xff" * 32) == 0x62A8AB43
        assert crc32c(bytes(range(32))) == 0x46DD794E


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_the_kernel_is_used_first_only_where_enabled(name: str) -> None:
    with implementation(name):
        assert (kernels.crc32c_kernel() is not None) == (name in KERNEL_LEVELS)


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(IMPLEMENTATIONS[:4]),
    data=st.binary(max_size=2100),
    crc=st.integers(0, 0xFFFFFFFF),
    split=st.integers(0, 2100),
    offset=st.integers(0, 7),
)
def test_short_inputs_match_the_python_reference(
    name: str, data: bytes, crc: int, split: int, offset: int
) -> None:
    """Any bytes, any starting CRC, any split point, any start address modulo 8."""
    expected = crc32c_python(data, crc)
    if GOOGLE is not None:
        assert GOOGLE(crc, data) == expected
    storage = np.empty(len(data) + 8, np.uint8)  # numpy aligns its data to at least 16
    view = storage[offset : offset + len(data)]
    view[:] = np.frombuffer(data, np.uint8)
    with implementation(name):
        assert crc32c(data, crc) == expected
        assert crc32c(view, crc) == expected
        assert crc32c(memoryview(bytearray(data)), crc) == expected
        split = min(split, len(data))
        head, tail = view[:split], view[split:]
        assert crc32c(tail, crc32c(head, crc)) == expected
        assert crc32c_combine(crc32c(head, crc), crc32c(tail), len(data) - split) == expected


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(list(KERNEL_LEVELS)),
    seed=st.integers(0, 2**32 - 1),
    length=st.one_of(st.sampled_from(BOUNDARIES), st.integers(0, 4 * LONG)),
    offset=st.integers(0, 15),
    split=st.integers(0, 4 * LONG),
    crc=st.integers(0, 0xFFFFFFFF),
)
def test_the_kernel_matches_google_crc32c_around_its_chunks(
    name: str, seed: int, length: int, offset: int, split: int, crc: int
) -> None:
    """Lengths on and around the 3-stream chunk boundaries, from misaligned starts."""
    if GOOGLE is None:
        pytest.skip("google-crc32c has no C extension here")
    storage = random_bytes(seed, length + 16)
    view = storage[offset : offset + length]
    expected = int(GOOGLE(crc, view.tobytes()))
    with implementation(name):
        assert crc32c(view, crc) == expected
        split = min(split, length)
        assert crc32c(view[split:], crc32c(view[:split], crc)) == expected


@pytest.mark.parametrize("name", list(KERNEL_LEVELS))
def test_every_boundary_length_and_alignment(name: str) -> None:
    storage = random_bytes(7, BOUNDARIES[-1] + 8)
    with implementation(name):
        for length in BOUNDARIES:
            for offset in range(8):
                view = storage[offset : offset + length]
                assert crc32c(view, 0x12345678) == reference(view.tobytes(), 0x12345678), (
                    length,
                    offset,
                )


@pytest.mark.parametrize("name", IMPLEMENTATIONS[:4])
def test_multi_megabyte_buffers(name: str) -> None:
    storage = random_bytes(11, (5 << 20) + 40)
    whole = storage[3 : 3 + (5 << 20) + 13]
    expected = reference(whole.tobytes())
    with implementation(name):
        assert crc32c(whole) == expected
        blocks = [whole[s : s + (1 << 20)] for s in range(0, whole.size, 1 << 20)]
        combined = 0
        for block in blocks:
            combined = crc32c_combine(combined, crc32c(block), block.nbytes)
        assert combined == expected


@pytest.mark.parametrize("name", ["sse42", "python"])
def test_combining_pieces_of_any_length(name: str) -> None:
    """``crc32c_combine`` (C where the kernels are, else Python) against the checksum of the
    joined bytes: pieces of 1 GiB and more too (zero pages: no memory is used), where the
    Python one was wrong until 2026-12-02 (it took x^(2^k) to repeat every 32 k)."""
    head = random_bytes(3, 1000)
    cases = []
    with implementation("sse42"):  # the checksums themselves, fast
        for length in (0, 1, 9, 1 << 20, (1 << 30) + 5):
            tail = np.zeros(length, np.uint8)
            tail[-1:] = 7
            cases.append((length, crc32c(tail), crc32c(tail, crc32c(head))))
        head_crc = crc32c(head)
    with implementation(name):
        for length, tail_crc, joined in cases:
            assert crc32c_combine(head_crc, tail_crc, length) == joined, length


def test_the_c_combine_agrees_with_python_at_any_length() -> None:
    """The C ``crc32c_combine`` against the Python one over random CRCs and lengths up to
    2^59 bytes (both are checked against real checksums above), and its refusals."""
    with implementation("sse42"):
        combine = kernels.crc32c_combine_kernel()
        assert combine is not None
        rng = np.random.default_rng(4)
        for _ in range(300):
            a, b = (int(v) for v in rng.integers(0, 1 << 32, 2))
            length = int(rng.integers(0, 1 << 59))
            assert combine(a, b, length) == crc_module.crc32c_combine_python(a, b, length)
        with pytest.raises((ValueError, OverflowError)):
            combine(1 << 32, 0, 1)
        with pytest.raises((ValueError, OverflowError)):
            combine(0, 0, 1 << 61)


def test_the_python_reference_over_a_long_chunk() -> None:
    """The pure-Python loop against google-crc32c once past the kernel's long chunk, the
    reference of the short-input tests."""
    if GOOGLE is None:
        pytest.skip("google-crc32c has no C extension here")
    data = random_bytes(5, LONG + SHORT + 11).tobytes()
    assert crc32c_python(data, 99) == GOOGLE(99, data)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_any_dtype_is_its_bytes(name: str) -> None:
    """The readers pass blocks of the tensor's dtype, bfloat16 included (no buffer format)."""
    values = np.random.default_rng(2).standard_normal(3001)
    with implementation(name):
        for dtype in (np.float32, np.float16, ml_dtypes.bfloat16, np.float64, np.int8, np.bool_):
            array = values.astype(dtype).reshape(-1, 1)
            assert crc32c(array) == reference(array.tobytes()), dtype
        scalar = np.array(2.5, ml_dtypes.bfloat16)  # 0-d
        assert crc32c(scalar) == reference(scalar.tobytes())


@pytest.mark.skipif(kernel is None, reason="ema_cli._kernels was not built")
@pytest.mark.parametrize("name", list(KERNEL_LEVELS))
def test_the_kernel_refuses_what_is_not_a_contiguous_buffer_or_a_32_bit_crc(name: str) -> None:
    with implementation(name):
        with pytest.raises((ValueError, BufferError)):
            crc32c(np.zeros((4, 4), np.float32)[:, ::2])
        with pytest.raises(TypeError):
            crc32c("text")  # type: ignore[arg-type]
        with pytest.raises(OverflowError):
            crc32c(b"x", -1)
        with pytest.raises(OverflowError):
            crc32c(b"x", 1 << 32)
        assert crc32c(b"x", 0xFFFFFFFF) == reference(b"x", 0xFFFFFFFF)


@pytest.mark.parametrize("name", list(KERNEL_LEVELS))
def test_threads_checksumming_at_once_get_their_own_values(name: str) -> None:
    """The kernel runs without the GIL for large buffers: threads must not disturb each other."""
    buffers = [random_bytes(seed, (1 << 20) + seed) for seed in range(4)]
    expected = [reference(b.tobytes()) for b in buffers]
    got: dict[int, list[int]] = {}

    def work(k: int) -> None:
        got[k] = [crc32c(buffers[k]) for _ in range(8)]

    with implementation(name):
        workers = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert got == {k: [expected[k]] * 8 for k in range(4)}
