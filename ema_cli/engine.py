"""TensorFlow-exact exponential moving average over numpy arrays.

Pure arithmetic: no files, no printing. Everything here reproduces
``tf.train.ExponentialMovingAverage`` (see ``docs``/README "Semantics"):

* ``d = float32(decay)``; with ``num_updates`` ``n``: ``d = min(d, (1 + n) / (10 + n))`` in float32;
* ``c = float32(1) - d``, computed in float32, then cast to the shadow's dtype;
* one update is TF's ``assign_sub``: ``s = s - (s - x) * c``, each operation rounded in the dtype;
* TensorFlow's CPU kernels run with subnormals flushed to zero (x86 FTZ+DAZ, Arm FZ), so a
  subnormal input or result is zero, and with no floating-point warnings (``inf - inf`` is a
  silent NaN): run ``apply`` and ``average`` inside ``fpmode.tf_arithmetic()``, which sets both
  for the calling thread (this module only computes; the thread's mode lives in ``fpmode``);
* zero debias keeps a biased accumulator ``b`` (updated like ``s``) and a ``local_step`` counter of
  the same dtype; the shadow is ``b / (1 - (1 - c) ** local_step)`` with the *latest* ``c``.

State is updated in place so a replay can stream blocks of a tensor through it without allocating.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, cast

import numpy as np
import numpy.typing as npt

from ema_cli import exactmath
from ema_cli.defaults import DEFAULT_EMA_NAME as DEFAULT_EMA_NAME

Precision = Literal["auto", "native"]

#: The dtypes TensorFlow's EMA accepts ("half, float, or double", plus bfloat16), by numpy name.
#: bfloat16 arrays come from ml_dtypes; matching by name keeps this module numpy-only.
AVERAGEABLE_DTYPES = ("float16", "bfloat16", "float32", "float64")
_HALF_DTYPES = ("float16", "bfloat16")

Array = npt.NDArray[np.generic]


def is_averageable(dtype: np.dtype[np.generic]) -> bool:
    """True for the float dtypes TF's EMA accepts; other tensors are copied, not averaged."""
    return np.dtype(dtype).name in AVERAGEABLE_DTYPES


def compute_dtype(dtype: np.dtype[np.generic], precision: Precision) -> np.dtype[np.generic]:
    """The dtype the arithmetic runs in.

    ``native`` is TF's choice (the tensor's own dtype). ``auto`` runs float16/bfloat16 in float32,
    because in bfloat16 an update of ``c * (s - x)`` with decay 0.999 is usually below half an ulp
    of ``s`` and the average never moves. float32/float64 are the same in both modes.
    """
    dtype = np.dtype(dtype)
    if precision == "auto" and dtype.name in _HALF_DTYPES:
        return np.dtype(np.float32)
    return dtype


def shadow_name(tensor_name: str, ema_name: str = DEFAULT_EMA_NAME) -> str:
    """TF's ``average_name``: ``dense/kernel:0`` -> ``dense/kernel/ExponentialMovingAverage``."""
    base = tensor_name[: -len(":0")] if tensor_name.endswith(":0") else tensor_name
    return f"{base}/{ema_name}"


def effective_decay(decay: float, num_updates: int | None = None) -> np.float32:
    """``min(decay, (1 + n) / (10 + n))`` with every operation in float32, as TF computes it."""
    d = np.float32(decay)
    if num_updates is not None:
        n = np.float32(num_updates)
        ramp = (np.float32(1.0) + n) / (np.float32(10.0) + n)
        d = np.minimum(d, ramp)
    return np.float32(d)


def coefficient(decay: np.float32, dtype: np.dtype[np.generic]) -> np.generic:
    """``c = float32(1) - d`` in float32, then cast to ``dtype`` (TF casts after subtracting).

    So float64 with decay 0.999 uses c = 0.0009999871253967285, not 0.001.
    """
    c32 = np.float32(1.0) - np.float32(decay)
    return cast(np.generic, np.asarray(c32, dtype=np.float32).astype(dtype)[()])


@dataclass
class ShadowState:
    """The moving average of one tensor (or one block of it).

    ``value`` is the shadow itself under the default semantics, and TF's ``biased`` variable
    under zero debias; ``local_step`` is set only under zero debias.
    """

    value: Array
    local_step: Array | None = None
    last_coefficient: np.generic | None = None


def init_state(
    first: Array, *, zero_debias: bool, dtype: np.dtype[np.generic], out: Array | None = None
) -> ShadowState:
    """Where the shadow starts.

    Default (TF's behaviour for variables): a copy of the first tensor, which the first ``apply``
    then updates with that same tensor. Zero debias (TF's behaviour for plain tensors): zeros, with
    a zero ``local_step`` scalar of the same dtype. ``out`` (``first``'s shape, ``dtype``) holds
    the shadow instead of a new array; it may be ``first`` itself, which then is not copied.
    """
    value = np.empty(first.shape, dtype=dtype) if out is None else out
    if zero_debias:
        value.fill(0)
        return ShadowState(value=value, local_step=np.zeros((), dtype=dtype))
    if value is not first:
        np.copyto(value, first, casting="safe")
    return ShadowState(value=value)


#: ``update(s, x, c)``: ``s = s - (s - x) * c`` in place, each operation rounded in ``s``'s dtype.
Update = Callable[[Array, Array, np.generic], None]


def apply(
    state: ShadowState,
    x: Array,
    c: np.generic,
    scratch: Array | None = None,
    update: Update | None = None,
) -> None:
    """One ``apply()``: ``s = s - (s - x) * c`` in ``s``'s dtype, in place.

    ``x`` must already be in the state's dtype and shape. ``scratch`` (same shape and dtype) saves
    an allocation per call on the hot path. ``update`` replaces the three numpy operations below
    with an equivalent that gives the same bits (``kernels.updater``'s, which also accepts ``x`` in
    a narrower dtype). Call it inside ``tf_arithmetic()``.
    """
    s = state.value
    if update is not None:
        update(s, x, c)
    else:
        tmp = np.subtract(s, x, out=np.empty_like(s) if scratch is None else scratch)
        np.multiply(tmp, c, out=tmp)
        np.subtract(s, tmp, out=s)
    if state.local_step is not None:
        np.add(state.local_step, state.local_step.dtype.type(1), out=state.local_step)
    state.last_coefficient = c


def average(state: ShadowState) -> Array:
    """The shadow value TF would hold after the last ``apply``.

    Under zero debias: ``biased / (1 - (1 - c) ** local_step)``, using the latest ``c`` even when
    ``num_updates`` made it vary (TF's own behaviour), every step in the state's dtype.
    """
    if state.local_step is None:
        return state.value
    if state.last_coefficient is None:
        raise ValueError("average() of a zero-debias state that was never updated")
    bias_factor = zero_debias_factor(state.last_coefficient, int(state.local_step))
    return np.asarray(np.divide(state.value, bias_factor))  # decay 1: 0/0 = NaN


def zero_debias_factor(c: np.generic, local_step: int) -> np.generic:
    """TF's bias factor ``1 - (1 - c) ** local_step`` in ``c``'s dtype.

    ``1 - c`` and the final subtraction are rounded in the dtype, as TF does. The power is the
    correctly rounded one (``exactmath.power``): TF calls the C library's ``powf`` (float32,
    and float16/bfloat16, which Eigen widens to float32 and rounds back) or ``pow`` (float64),
    both correctly rounded for all but a vanishing fraction of inputs; numpy's ``np.power``
    is not, and rounds differently on different CPUs.
    """
    dtype = np.dtype(type(c))
    one = dtype.type(1)
    base = float(np.subtract(one, c))
    fmt = exactmath.FLOAT64 if dtype == np.float64 else exactmath.FLOAT32
    factor = np.asarray(exactmath.power(base, local_step, fmt), dtype=np.float64)
    return cast(np.generic, np.subtract(one, factor.astype(dtype)[()]))


def contribution_weights(coefficients: list[float], *, zero_debias: bool) -> list[float]:
    """How much each checkpoint contributes to the final average (exact arithmetic, float64).

    With ``c_k`` the coefficient of apply ``k`` (of ``n``), checkpoint ``k`` enters with weight
    ``c_k * prod_{i>k} (1 - c_i)``. Under the default semantics the shadow also starts as the
    first checkpoint, adding ``prod_i (1 - c_i)`` to its weight, and the weights sum to 1. Under
    zero debias every weight is divided by TF's bias factor ``1 - (1 - c_last) ** n``, so they
    sum to 1 only when ``c`` is constant. Rounding in the tensor's dtype is not modelled.
    """
    n = len(coefficients)
    weights = [0.0] * n
    keep = 1.0  # prod_{i>k} (1 - c_i), built from the last apply backwards
    for k in range(n - 1, -1, -1):
        weights[k] = coefficients[k] * keep
        keep *= 1.0 - coefficients[k]
    if n and zero_debias:
        bias_factor = 1.0 - exactmath.power(1.0 - coefficients[-1], n)  # not libm's pow
        return [w / bias_factor if bias_factor else float("nan") for w in weights]
    if n:
        weights[0] += keep
    return weights
