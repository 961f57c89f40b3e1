"""The TensorFlow golden cases through ``ema_cli.engine`` directly: no files, no CLI.

The same cases as ``test_golden.py``, so an engine regression shows up here and a CLI-only one
(file handling, option parsing, names) only there. See ``golden/golden_cases.py`` for the data and
the comparison rules, ``golden/make_golden.py`` for how TensorFlow produced it.
"""

from __future__ import annotations

import numpy as np
import pytest

from ema_cli import engine, fpmode
from tests.golden import golden_cases as golden

CASES = golden.load_cases()


def replay(case, tensor):
    """Replay one tensor's checkpoints the way the CLI does, returning the written value."""
    dtype = engine.compute_dtype(tensor.dtype, case.precision)
    inputs = tensor.inputs.astype(dtype)  # float16/bfloat16 -> float32 is exact
    state = engine.init_state(inputs[0], zero_debias=case.zero_debias, dtype=dtype)
    for k in range(inputs.shape[0]):
        decay = engine.effective_decay(case.decay, case.num_updates_for(k))
        engine.apply(state, inputs[k], engine.coefficient(decay, dtype))
    # auto precision rounds the float32 result to the tensor's dtype once, at the end
    return np.asarray(engine.average(state)).astype(tensor.dtype)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_engine_matches_tensorflow(case) -> None:
    failures = []
    for tensor in case.tensors:
        # TF's floating-point mode (subnormals flushed), as the CLI's replay sets it. No errstate:
        # inf - inf must not warn (pytest turns warnings into errors).
        with fpmode.tf_arithmetic() as flushing:
            if case.subnormals and not flushing:
                pytest.skip("this platform cannot flush subnormals to zero as TF does")
            actual = replay(case, tensor)
        problems = golden.compare(
            actual, tensor.expected, max_ulps=case.max_ulps, inputs=tensor.inputs
        )
        failures += [f"{tensor.name} ({tensor.dtype}): {p}" for p in problems]
    assert not failures, f"{case.name}: {case.description}\n" + "\n".join(failures)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_shadow_names_match_tensorflow(case) -> None:
    ema_name = case.ema_name or engine.DEFAULT_EMA_NAME
    for tensor in case.tensors:
        assert engine.shadow_name(tensor.name, ema_name) == tensor.shadow_name
        assert engine.shadow_name(f"{tensor.name}:0", ema_name) == tensor.shadow_name


def test_golden_data_covers_the_brief() -> None:
    """Guard against the golden files losing coverage when they are regenerated."""
    dtypes = {(str(t.dtype), c.precision) for c in CASES for t in c.tensors}
    for dt in ("float16", "bfloat16", "float32", "float64"):
        assert {(dt, "auto"), (dt, "native")} <= dtypes
    assert {0.0, 0.9, 0.999, 1.0} <= {c.decay for c in CASES}
    modes = {type(c.num_updates).__name__ if c.num_updates else None for c in CASES}
    assert {"int", "str", None} <= modes
    assert {"step", "index"} <= {c.num_updates for c in CASES}
    assert {(True, None), (True, "step")} <= {(c.zero_debias, c.num_updates) for c in CASES}
    assert any(c.ema_name for c in CASES)
    assert any(len(c.steps) == 1 for c in CASES)
    assert any(() in {t.shape for t in c.tensors} for c in CASES)
    assert any(len(c.steps) > 2048 and c.zero_debias for c in CASES)
    assert {"float32", "float64", "bfloat16"} <= {
        str(t.dtype) for c in CASES if c.subnormals for t in c.tensors
    }
    specials = np.concatenate(
        [t.inputs.astype(np.float64).ravel() for c in CASES for t in c.tensors]
    )
    assert np.isnan(specials).any() and np.isposinf(specials).any() and np.isneginf(specials).any()
