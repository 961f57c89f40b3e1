"""The same command writes the same bytes on every CPU.

One machine shows it for many: numpy picks its SIMD code at import from what the CPU offers,
and ``NPY_DISABLE_CPU_FEATURES`` takes the higher levels away, so a subprocess per level runs
the code paths an AVX2-only or baseline x86-64 machine would run. Each level runs again with
the C kernels' SIMD loops, their portable loops and no kernels at all; every golden result and
every CLI output and mapping (``dispatch_probe.py``) must be byte-identical across all of them.
(``np.power`` once made zero-debias results depend on AVX-512.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from ema_cli import kernels
from tests.conftest import write_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def dispatch_levels() -> list[str]:
    """The SIMD targets numpy could dispatch to on this CPU, lowest first (beyond its baseline,
    which cannot be disabled)."""
    try:
        from numpy._core import _multiarray_umath as umath
    except ImportError:  # numpy 1.x
        from numpy.core import _multiarray_umath as umath  # type: ignore[no-redef]
    features = umath.__cpu_features__
    return [t for t in umath.__cpu_dispatch__ if features.get(t)]


def special_values(dtype: np.dtype, rng: np.random.Generator, size: int) -> np.ndarray:
    """Random values across the range, with NaN, +-inf, -0.0, and values at and below the
    smallest normal number (which TF's flush-to-zero mode turns into zeros)."""
    info = ml_dtypes.finfo(dtype) if dtype.name == "bfloat16" else np.finfo(dtype)
    tiny = float(info.smallest_normal)
    values = rng.standard_normal(size) * np.exp(rng.uniform(-6, 6, size))
    specials = [np.nan, -np.nan, np.inf, -np.inf, -0.0, 0.0, tiny, -tiny / 3, tiny * 1.5]
    values[: len(specials)] = specials
    rng.shuffle(values)
    with np.errstate(all="ignore"):
        return values.astype(dtype)


#: Quiet-NaN bits by dtype (a payload goes in the low bits); with the sign bit, the CPU's default
#: NaN, the one ``inf - inf`` makes.
QUIET_NAN = {"float16": 0x7E00, "bfloat16": 0x7FC0, "float32": 0x7FC00000, "float64": 0x7FF8 << 48}


def colliding_nans(values: np.ndarray, k: int) -> None:
    """Make the first 4 elements NaNs whose sign and payload differ from one checkpoint ``k``
    to the next: NaN + NaN is where CPUs' and numpy's loops may pick either operand's, so a
    replay of these must say which, the same everywhere."""
    bits = values.view(f"u{values.dtype.itemsize}")
    sign = 1 << (8 * values.dtype.itemsize - 1)
    for lane in range(4):
        payload = 1 + (k + lane) % 5  # a different payload in each checkpoint
        bits[lane] = QUIET_NAN[values.dtype.name] | payload | (sign if (k + lane) % 2 else 0)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(20261201)
    dtypes = [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)]
    dtypes += [np.dtype(np.float32), np.dtype(np.float64)]
    for k, step in enumerate((3, 10, 40, 41, 200)):
        tensors = {f"w/{dt.name}": special_values(dt, rng, 700) for dt in dtypes}
        for values in tensors.values():
            colliding_nans(values, k)
        tensors["global_step"] = np.array(step, dtype=np.int64)
        write_checkpoint(folder / f"ckpt-{step}.safetensors", tensors)
    return folder


def probe(inputs: Path, out: Path, disabled: list[str], kernel_mode: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("EMA_CLI_NO_KERNELS",)}
    env["NPY_DISABLE_CPU_FEATURES"] = " ".join(disabled)
    if kernel_mode == "none":
        env["EMA_CLI_NO_KERNELS"] = "1"
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.dispatch_probe",
            str(inputs),
            str(out),
            "--kernels",
            kernel_mode,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_every_dispatch_level_and_kernel_mode_writes_the_same_bytes(
    inputs: Path, tmp_path: Path
) -> None:
    levels = dispatch_levels()
    # Take the levels away from the top: all of them, all but the highest, ..., none.
    configs = [levels[len(levels) - k :] if k else [] for k in range(len(levels) + 1)]
    modes = ["simd", "portable", "none"] if kernels._enabled else ["none"]
    runs = {
        (" ".join(disabled) or "-", mode): tmp_path / f"run{i}-{mode}"
        for i, disabled in enumerate(configs)
        for mode in modes
    }
    pending = list(runs.items())
    while pending:  # two at a time: the machines this runs on have two cores
        batch, pending = pending[:2], pending[2:]
        procs = [
            (key, probe(inputs, out, key[0].split() if key[0] != "-" else [], key[1]))
            for key, out in batch
        ]
        for key, proc in procs:
            _, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 0, (key, stderr[-2000:])

    reference_key, reference = next(iter(runs.items()))
    names = sorted(p.name for p in reference.iterdir())
    # 8 TF replays and a sweep of 5 other averages, each an output and a mapping; w.json
    assert "golden.bin" in names and len(names) == 2 + 2 * (8 + 5), names
    for key, out in runs.items():
        assert sorted(p.name for p in out.iterdir()) == names, key
        for name in names:
            assert (out / name).read_bytes() == (reference / name).read_bytes(), (
                f"{name} differs between NPY_DISABLE_CPU_FEATURES={reference_key} and {key}"
            )
