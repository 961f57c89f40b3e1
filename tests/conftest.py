"""Shared helpers: write small checkpoints in tmp_path and run the CLI in-process."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from click.testing import CliRunner, Result

from ema_cli.checkpoint import TensorInfo
from ema_cli.cli import cli


def write_checkpoint(
    path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> Path:
    """Save ``tensors`` with the reference safetensors writer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(
        {k: np.asarray(v, order="C") for k, v in tensors.items()},  # keeps 0-d arrays 0-d
        str(path),
        metadata=dict(metadata or {"format": "pt"}),
    )
    return path


def load(path: Path) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(str(path))


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz, with the archive closed again."""
    with np.load(path) as archive:
        return dict(archive)


def infos(arrays: Mapping[str, np.ndarray]) -> list[TensorInfo]:
    """The ``TensorInfo`` of each array, in native byte order (as readers report them)."""
    return [TensorInfo(n, v.dtype.newbyteorder("="), v.shape) for n, v in arrays.items()]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (by relative path) with its bytes; folders as ``<dir>``."""
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(folder.rglob("*"))
    }


def run_cli(args: Sequence[str | os.PathLike[str]], stdin: str | None = None) -> Result:
    """Invoke ``ema-cli`` in-process; stdout and stderr are kept apart."""
    return CliRunner().invoke(cli, [os.fspath(a) for a in args], input=stdin)


def run_average(*args: object, stdin: str | None = None) -> Result:
    """``ema-cli average ARGS...`` in-process (arguments converted with ``str``)."""
    return run_cli(["average", *map(str, args)], stdin=stdin)


def average_status(*args: object) -> tuple[int, str, str]:
    """``run_average``'s exit code, standard output and standard error."""
    result = run_average(*args)
    return result.exit_code, result.stdout, result.stderr


def average_ok(*args: object, stdin: str | None = None) -> Result:
    """``run_average``, which must succeed (exit 0)."""
    result = run_average(*args, stdin=stdin)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def assert_fails(result: Result, *fragments: str) -> None:
    """A failed run as users must see it: exit 2, one ``ema-cli: error:`` line on stderr
    holding every fragment (file, tensor, reason), no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ema-cli: error: ")
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def sequence(tmp_path: Path) -> list[Path]:
    """Three float32/bfloat16/int64 checkpoints, steps 2, 10, 5 (so name order != step order)."""
    rng = np.random.default_rng(0)
    paths = []
    for step in (2, 10, 5):
        paths.append(
            write_checkpoint(
                tmp_path / "run" / f"ckpt-{step}.safetensors",
                {
                    "dense/kernel": rng.standard_normal((3, 4)).astype(np.float32),
                    "dense/bias": rng.standard_normal(4).astype(np.float32),
                    "emb.weight": rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16),
                    "global_step": np.array(step, dtype=np.int64),
                },
            )
        )
    return paths
