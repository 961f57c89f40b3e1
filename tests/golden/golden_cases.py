"""Loading and comparing the TensorFlow golden cases (numpy only; no TensorFlow needed).

``cases.json`` describes every case (settings, steps, tensors and the shadow names TF chose);
``cases.npz`` holds the arrays as unsigned-integer bit views so every bit survives, bfloat16
included: three flat arrays ``bits16``, ``bits32`` and ``bits64``, and for each tensor the offsets
in the one of its width where its inputs (one row per checkpoint, oldest first) and TF's shadow
after the last ``apply`` start. Both files are written by ``make_golden.py``;
``check_against_tf.py`` reuses the comparison below.

Comparison rules (see ``compare``):

* bitwise equality, NaN sign and payload included;
* zero-debias cases too: the bias factor's power is computed correctly rounded
  (``ema_cli.exactmath``), which is what TF's C library ``powf``/``pow`` give, on every CPU.
  (Before, numpy's ``np.power`` ran its own AVX-512 code on some machines and missed by an ulp,
  which the bias factor turned into several; ``compare`` still takes ``max_ulps`` for tools);
* bfloat16 NaNs are compared by position only: TF's sign for a bfloat16 NaN is an artefact of
  Eigen's vectorisation (its packet float->bfloat16 conversion turns every NaN into +NaN 0x7fc0,
  its scalar conversion for the tail of a tensor keeps the sign), so the same arithmetic gives
  0x7fc0 or 0xffc0 depending on where the element sits in the tensor.

Subnormals: TF's CPU kernels run with flush-to-zero and denormals-are-zero (x86 MXCSR FTZ+DAZ).
Every subnormal operand of -, * and / counts as a zero of the same sign and every subnormal result
becomes one, in float32, float64 and bfloat16 (whose arithmetic runs in float32); float16 is
immune (its subnormals are normal float32 values) and casts never flush. So even a single
checkpoint comes out with its subnormals zeroed (the first apply computes s - (s - x) * c). Cases
marked ``subnormals`` depend on this; the rest stay clear of the subnormal range.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

GOLDEN_DIR = Path(__file__).resolve().parent
CASES_JSON = GOLDEN_DIR / "cases.json"
CASES_NPZ = GOLDEN_DIR / "cases.npz"

DTYPES: dict[str, np.dtype[Any]] = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
}
UINTS: dict[int, np.dtype[Any]] = {
    2: np.dtype(np.uint16),
    4: np.dtype(np.uint32),
    8: np.dtype(np.uint64),
}


def bits_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The unsigned integer dtype of the same width, for bit views."""
    return UINTS[np.dtype(dtype).itemsize]


@dataclass(frozen=True)
class GoldenTensor:
    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    shadow_name: str
    inputs: np.ndarray  # (num_checkpoints, *shape), in ``dtype``
    expected: np.ndarray  # shape, in ``dtype``


@dataclass(frozen=True)
class GoldenCase:
    name: str
    description: str
    decay: float
    num_updates: int | str | None  # a fixed N, "step", "index", or None (off)
    zero_debias: bool
    ema_name: str | None  # None: TF's default name
    precision: str  # "auto" or "native"
    names: str  # "original" or "shadow": how the CLI test asks for output names
    steps: tuple[int, ...]
    subnormals: bool  # depends on TF flushing subnormals to zero (see the module docstring)
    tensors: tuple[GoldenTensor, ...]

    @property
    def max_ulps(self) -> int:
        """0: every case, zero debias included, is bit-identical to TF on every CPU."""
        return 0

    def num_updates_for(self, index: int) -> int | None:
        """The ``num_updates`` TF saw at the ``index``-th apply."""
        if self.num_updates is None:
            return None
        if self.num_updates == "step":
            return self.steps[index]
        if self.num_updates == "index":
            return index
        assert isinstance(self.num_updates, int)
        return self.num_updates


def load_cases() -> list[GoldenCase]:
    meta = json.loads(CASES_JSON.read_text(encoding="utf-8"))
    cases = []
    with np.load(CASES_NPZ) as npz:
        arrays = {key: npz[key] for key in npz.files}
    for spec in meta["cases"]:
        tensors = []
        for t in spec["tensors"]:
            dtype = DTYPES[t["dtype"]]
            shape = tuple(t["shape"])
            bits = arrays[f"bits{dtype.itemsize * 8}"]
            size = int(np.prod(shape, dtype=np.int64))
            count = len(spec["steps"])
            start = t["inputs_offset"]
            inputs = bits[start : start + count * size].view(dtype).reshape(count, *shape)
            start = t["expected_offset"]
            expected = bits[start : start + size].view(dtype).reshape(shape)
            tensors.append(
                GoldenTensor(t["name"], dtype, shape, t["shadow_name"], inputs, expected)
            )
        cases.append(
            GoldenCase(
                name=spec["name"],
                description=spec["description"],
                decay=spec["decay"],
                num_updates=spec["num_updates"],
                zero_debias=spec["zero_debias"],
                ema_name=spec["ema_name"],
                precision=spec["precision"],
                names=spec["names"],
                steps=tuple(spec["steps"]),
                subnormals=spec["subnormals"],
                tensors=tuple(tensors),
            )
        )
    return cases


def _ordinal(a: np.ndarray) -> np.ndarray:
    """Map float bit patterns to integers that are consecutive in ulps (-0.0 is one below +0.0)."""
    nbits = a.dtype.itemsize * 8
    u = a.view(bits_dtype(a.dtype)).astype(np.int64) if nbits < 64 else a.view(np.int64)
    if nbits < 64:
        sign = (u >> (nbits - 1)) & 1
        mag = u & ((1 << (nbits - 1)) - 1)
    else:
        sign = (u < 0).astype(np.int64)
        mag = u & np.int64(0x7FFF_FFFF_FFFF_FFFF)
    return np.where(sign == 1, -mag - 1, mag)


def _hex(a: np.ndarray, flat_index: int) -> str:
    v = a.reshape(-1)[flat_index : flat_index + 1]
    width = a.dtype.itemsize * 2
    return f"0x{int(v.view(bits_dtype(a.dtype))[0]):0{width}x} ({v[0]})"


def compare(
    actual: np.ndarray,
    expected: np.ndarray,
    *,
    max_ulps: int = 0,
    inputs: np.ndarray | None = None,
) -> list[str]:
    """Differences between ``actual`` and TF's ``expected``; an empty list means they match.

    Bitwise (NaN sign and payload included) with ``max_ulps == 0``; otherwise NaN and infinity
    positions must agree exactly and the rest may differ by ``max_ulps``. bfloat16 NaNs are
    compared by position only (see the module docstring). ``inputs`` (one row per checkpoint)
    only makes the messages self-contained: each difference lists the inputs at its position.
    """
    problems = []
    if actual.dtype != expected.dtype:
        return [f"dtype {actual.dtype} != TF's {expected.dtype}"]
    if actual.shape != expected.shape:
        return [f"shape {actual.shape} != TF's {expected.shape}"]
    a = np.ascontiguousarray(actual).reshape(-1)
    e = np.ascontiguousarray(expected).reshape(-1)
    ub = bits_dtype(a.dtype)
    a_nan = np.isnan(a.astype(np.float64))
    e_nan = np.isnan(e.astype(np.float64))
    bad = a_nan != e_nan
    both_nan = a_nan & e_nan
    if a.dtype != DTYPES["bfloat16"]:
        bad |= both_nan & (a.view(ub) != e.view(ub))
    rest = ~a_nan & ~e_nan
    if max_ulps == 0:
        bad |= rest & (a.view(ub) != e.view(ub))
    else:
        a_inf = np.isinf(a.astype(np.float64))
        e_inf = np.isinf(e.astype(np.float64))
        bad |= rest & ((a_inf | e_inf) & (a.view(ub) != e.view(ub)))
        bad |= rest & (np.abs(_ordinal(a) - _ordinal(e)) > max_ulps)
    for i in np.flatnonzero(bad)[:10]:
        index = tuple(int(j) for j in np.unravel_index(i, actual.shape)) if actual.shape else ()
        message = f"at {index}: got {_hex(a, i)}, TF {_hex(e, i)}"
        if inputs is not None:
            column = inputs.reshape(inputs.shape[0], -1)[:, i]
            shown = ", ".join(_hex(column, k) for k in range(min(column.shape[0], 6)))
            more = ", ..." if column.shape[0] > 6 else ""
            message += f"; inputs {shown}{more}"
        problems.append(message)
    if int(bad.sum()) > 10:
        problems.append(f"... {int(bad.sum())} elements differ in all")
    return problems
