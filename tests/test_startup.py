"""Start-up: each command imports only what its path needs (inspected, never timed).

ml_dtypes costs 0.6-0.9 s to import on some machines and h5py about 0.5 s: ``--help``,
``--version``, ``inspect`` of a float32 file and a float32 average must not load them, and
``--help`` loads not even numpy. The timings themselves are in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import write_checkpoint

HEAVY = ("ml_dtypes", "h5py", "rich", "numpy", "safetensors")

# The console script ends with os._exit (no interpreter teardown), so the probe reports from
# there as well as from atexit (a path that exits normally).
PROBE = """
import atexit, json, os, sys
heavy = {heavy!r}
def report():
    print("LOADED " + json.dumps(sorted(
        {{m.split(".")[0] for m in sys.modules if m.split(".")[0] in heavy}})), file=sys.stderr)
    sys.stderr.flush()
atexit.register(report)
real_exit = os._exit
def exit_reporting(status):
    report()
    real_exit(status)
os._exit = exit_reporting
sys.argv = ["ema-cli", *{args!r}]
from ema_cli._entry import main
main()
"""


def loaded(args: list[str], cwd: Path) -> set[str]:
    code = PROBE.format(heavy=HEAVY, args=args)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("LOADED ")][-1]
    return set(json.loads(line[len("LOADED ") :]))


@pytest.fixture
def float32_run(tmp_path: Path) -> list[str]:
    return [
        str(write_checkpoint(tmp_path / f"ckpt-{s}.safetensors", {"w": np.ones(3, np.float32) * s}))
        for s in (1, 2)
    ]


def test_help_and_version_load_nothing_heavy(tmp_path: Path) -> None:
    assert loaded(["--help"], tmp_path) == set()
    assert loaded(["average", "--help"], tmp_path) == set()
    assert loaded(["--version"], tmp_path) <= {"numpy"}  # the C kernels are a numpy extension


def test_float32_work_loads_neither_ml_dtypes_nor_h5py_nor_rich(
    float32_run: list[str], tmp_path: Path
) -> None:
    assert not loaded(["inspect", float32_run[0]], tmp_path) & {"ml_dtypes", "h5py", "rich"}
    out = str(tmp_path / "ema.safetensors")
    run = loaded(["average", *float32_run, "-o", out, "--decay", "0.9", "-q"], tmp_path)
    assert not run & {"ml_dtypes", "h5py", "rich"}
    assert Path(out).is_file()
