"""The CLI against TensorFlow: every golden case through ``ema-cli average`` on real files.

Each case's checkpoints are written as ``ckpt-<step>.safetensors`` in ``tmp_path``, replayed by the
CLI in-process, and the output must match what ``tf.train.ExponentialMovingAverage`` computed
(``golden/make_golden.py``): bit for bit, except that zero-debias cases may differ by one ulp
(TF's ``pow``) and bfloat16 NaNs are compared by position (TF's bfloat16 NaN sign depends on
Eigen's vectorisation); subnormals must be flushed to zero as TF's kernels flush them (see
``golden/golden_cases.py``). The mapping file must name every tensor's shadow exactly as TF's
``average_name`` did. ``test_engine_golden.py`` runs the same cases through the engine alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy for safetensors
import numpy as np
import pytest
import safetensors.numpy
from click.testing import CliRunner

from ema_cli import fpmode
from ema_cli.cli import cli
from tests.golden import golden_cases as golden

CASES = golden.load_cases()

with fpmode.tf_arithmetic() as _flushing:
    #: Whether this platform can flush subnormals to zero as TF does (needed by some cases).
    FLUSHES_SUBNORMALS = _flushing


def write_checkpoints(case, folder: Path) -> list[Path]:
    """One ``ckpt-<step>.safetensors`` per checkpoint, in replay (= step) order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, step in enumerate(case.steps):
        path = folder / f"ckpt-{step}.safetensors"
        tensors = {t.name: np.array(t.inputs[k], order="C") for t in case.tensors}
        safetensors.numpy.save_file(tensors, str(path), metadata={"format": "pt"})
        paths.append(path)
    return paths


def cli_options(case) -> list[str]:
    options = ["--decay", repr(case.decay), "--precision", case.precision, "--names", case.names]
    if case.num_updates is not None:
        options += ["--num-updates", str(case.num_updates)]
    if case.zero_debias:
        options.append("--zero-debias")
    if case.ema_name is not None:
        options += ["--name", case.ema_name]
    return options


def run_average(paths: list[Path], out: Path, options: list[str]):
    result = CliRunner().invoke(
        cli, ["average", *map(str, paths), "-o", str(out), *options, "-q"], catch_exceptions=False
    )
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}"
    return result


def check_output(case, out: Path) -> None:
    tensors = safetensors.numpy.load_file(str(out))
    failures = []
    for t in case.tensors:
        key = t.shadow_name if case.names == "shadow" else t.name
        if key not in tensors:
            failures.append(f"{key}: missing from the output (it has {sorted(tensors)})")
            continue
        problems = golden.compare(tensors[key], t.expected, max_ulps=case.max_ulps, inputs=t.inputs)
        failures += [f"{t.name} ({t.dtype}): {p}" for p in problems]
    assert not failures, f"{case.name}: {case.description}\n" + "\n".join(failures)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cli_matches_tensorflow(case, tmp_path: Path) -> None:
    if case.subnormals and not FLUSHES_SUBNORMALS:
        pytest.skip("this platform cannot flush subnormals to zero as TF does")
    paths = write_checkpoints(case, tmp_path / "run")
    out = tmp_path / "avg.safetensors"
    run_average(paths, out, ["--order", "given", *cli_options(case)])
    check_output(case, out)
    mapping = json.loads((tmp_path / "avg.mapping.json").read_text(encoding="utf-8"))
    assert mapping["mapping"] == {t.name: t.shadow_name for t in case.tensors}


@pytest.mark.parametrize(
    "name", ["float32_num_updates_step", "float64_zero_debias_num_updates_index"]
)
def test_cli_sorts_by_step_like_tensorflow(name: str, tmp_path: Path) -> None:
    """The default ``--order step`` replays shuffled arguments oldest first (100 < 250 < 1000)."""
    case = next(c for c in CASES if c.name == name)
    paths = write_checkpoints(case, tmp_path / "run")
    shuffled = [paths[i] for i in np.random.default_rng(0).permutation(len(paths))]
    assert shuffled != paths
    out = tmp_path / "avg.safetensors"
    run_average(shuffled, out, cli_options(case))
    check_output(case, out)
