"""The cron wrapper and the CI release step in examples/, run for real."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from ema_cli import lock
from ema_cli.plan import step_from_name
from tests.conftest import write_checkpoint

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SHIPPED = sorted(
    (EXAMPLES / "checkpoints").glob("*.safetensors"), key=lambda p: step_from_name(p.name) or 0
)


def env(**extra: str) -> dict[str, str]:
    """PATH with this interpreter's scripts first, so the scripts find this ema-cli."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {**os.environ, "PATH": path, **extra}


def run(script: str, *args: object) -> subprocess.CompletedProcess[str]:
    # EMA_SETTLE=0: the copies made here are brand new, and the wrapper would otherwise leave
    # the newest for a later run as possibly still being written.
    return subprocess.run(
        ["bash", str(EXAMPLES / script), *map(str, args)],
        capture_output=True,
        text=True,
        env=env(EMA_SETTLE="0"),
        check=False,
    )


def test_cron_wrapper_folds_new_checkpoints_incrementally(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = run("cron/ema-cron.sh", run_dir)
    assert first.returncode == 0 and "no checkpoints yet" in first.stdout

    for src in SHIPPED[:5]:
        shutil.copy(src, run_dir)
    result = run("cron/ema-cron.sh", run_dir, 0.9)
    assert result.returncode == 0, result.stderr
    assert "written, 5 checkpoints" in result.stdout
    for src in SHIPPED[5:]:
        shutil.copy(src, run_dir)
    result = run("cron/ema-cron.sh", run_dir, 0.9)
    assert result.returncode == 0, result.stderr
    assert f"written, {len(SHIPPED)} checkpoints" in result.stdout
    again = run("cron/ema-cron.sh", run_dir, 0.9)
    assert again.returncode == 0 and "up to date" in again.stdout

    out = run_dir / "ema" / "ema.safetensors"
    full = tmp_path / "full.safetensors"
    subprocess.run(
        [
            "ema-cli",
            "average",
            *map(str, SHIPPED),
            "-o",
            str(full),
            "--decay",
            "0.9",
            "--num-updates",
            "step",
            "-q",
        ],
        env=env(),
        check=True,
    )
    assert out.read_bytes() == full.read_bytes()

    with lock.exclusive(out, "output"):
        busy = run("cron/ema-cron.sh", run_dir, 0.9)
    assert busy.returncode == 0 and "another ema-cli run is busy" in busy.stdout

    (run_dir / "ckpt-99999.safetensors").write_bytes(b"garbage that is not a checkpoint")
    os.utime(run_dir / "ckpt-99999.safetensors", (1, 1))  # old, so it is not "settling"
    broken = run("cron/ema-cron.sh", run_dir, 0.9)
    assert broken.returncode == 2
    assert "ckpt-99999.safetensors" in broken.stderr and "failed with status 2" in broken.stderr


def test_ci_release_step(tmp_path: Path) -> None:
    release = tmp_path / "release"
    result = run("ci/release-ema.sh", EXAMPLES / "checkpoints", release, 0.9)
    assert result.returncode == 0, result.stderr
    assert "replay plan: 12 checkpoints" in result.stdout
    out = release / "model-ema.safetensors"
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert f"sha256 {digest}" in result.stdout
    summary = json.loads((release / "release.json").read_text())
    assert summary["status"] == "written"
    assert [c["step"] for c in summary["checkpoints"]] == sorted(
        c["step"] for c in summary["checkpoints"]
    )
    assert all(len(c["sha256"]) == 64 for c in summary["checkpoints"])
    mapping = json.loads((release / "model-ema.mapping.json").read_text())
    assert mapping["checkpoints"] == summary["checkpoints"]

    # Deterministic: a second release is byte-identical.
    again = run("ci/release-ema.sh", EXAMPLES / "checkpoints", tmp_path / "again", 0.9)
    assert again.returncode == 0
    assert (tmp_path / "again" / "model-ema.safetensors").read_bytes() == out.read_bytes()


def test_ci_release_step_fails_on_bad_input(tmp_path: Path) -> None:
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for src in SHIPPED[:3]:
        shutil.copy(src, ckpts)
    write_checkpoint(
        ckpts / "ckpt-9000.safetensors", {"dense/kernel": np.zeros((3, 3), np.float32)}
    )
    result = run("ci/release-ema.sh", ckpts, tmp_path / "release")
    assert result.returncode == 2
    assert "ckpt-9000.safetensors" in result.stderr
    assert not (tmp_path / "release" / "model-ema.safetensors").exists()
