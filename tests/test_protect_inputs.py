"""No option combination writes to a path that was given as an input.

Every checkpoint given (selected by ``--last``/``--min-step``/``--max-step`` or not), every
file of a checkpoint folder, and the state folder are protected from the output, its
trajectory files, the mapping and the temporaries made beside them, under every spelling.
Each refusal is exit 2 with one line, and every input keeps its bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import assert_fails, run_cli, write_checkpoint


@pytest.fixture
def run(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(1)
    return [
        write_checkpoint(
            tmp_path / "run" / f"ckpt-{step}.safetensors",
            {"w": rng.standard_normal(4).astype(np.float32)},
        )
        for step in (100, 200, 300, 400)
    ]


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def refused(root: Path, args: list[object], *fragments: str) -> None:
    before = snapshot(root)
    assert_fails(run_cli(["average", *args, "--decay", "0.9", "-q"]), *fragments)
    assert snapshot(root) == before  # nothing written, nothing changed


def test_an_input_dropped_by_max_step_is_still_protected(run: list[Path], tmp_path: Path) -> None:
    refused(tmp_path, [*run, "-o", run[3], "--max-step", "300"], "one of the input checkpoints")


def test_an_input_dropped_by_last_is_still_protected(run: list[Path], tmp_path: Path) -> None:
    refused(tmp_path, [*run, "-o", run[0], "--last", "2"], "one of the input checkpoints")


def test_the_mapping_never_replaces_a_dropped_input(run: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "ema.safetensors"
    refused(
        tmp_path,
        [*run, "-o", out, "--mapping", run[0], "--min-step", "200"],
        "mapping file is one of the input checkpoints",
    )


def test_inputs_from_stdin_are_protected(run: list[Path], tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    stdin = "".join(f"{p}\n" for p in run)
    result = run_cli(["average", "-", "-o", run[0], "--decay", "0.9", "--last", "1"], stdin=stdin)
    assert_fails(result, "one of the input checkpoints")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("spelling", ["dotdot", "symlink", "hardlink", "symlinked-folder"])
def test_every_spelling_of_an_input(run: list[Path], tmp_path: Path, spelling: str) -> None:
    target = run[0]
    if spelling == "dotdot":
        (tmp_path / "other").mkdir()
        out = tmp_path / "other" / ".." / "run" / target.name
    elif spelling == "symlink":
        out = tmp_path / "link.safetensors"
        out.symlink_to(target)
    elif spelling == "hardlink":
        out = tmp_path / "hard.safetensors"
        os.link(target, out)
    else:
        (tmp_path / "alias").symlink_to(tmp_path / "run")
        out = tmp_path / "alias" / target.name
    refused(tmp_path, [*run, "-o", out, "--min-step", "200"], "one of the input checkpoints")


def test_a_trajectory_file_never_replaces_an_input(tmp_path: Path) -> None:
    """``-o run/x.safetensors --every 1`` writes ``run/x.ckpt-1.safetensors`` after
    ``ckpt-1``: refused when that is a checkpoint given (even one not selected)."""
    run = tmp_path / "run"
    given = [
        write_checkpoint(run / name, {"w": np.full(2, i, np.float32)})
        for i, name in enumerate(
            ["ckpt-1.safetensors", "ckpt-2.safetensors", "x.ckpt-1.safetensors"]
        )
    ]
    refused(
        tmp_path,
        [*given, "-o", run / "x.safetensors", "--every", "1", "--order", "given"],
        "trajectory file is one of the input checkpoints",
    )


def test_the_output_is_never_written_inside_an_input_folder(tmp_path: Path) -> None:
    folders = []
    for step in (1, 2):
        folder = tmp_path / f"checkpoint-{step}"
        write_checkpoint(folder / "model.safetensors", {"w": np.full(2, step, np.float32)})
        (folder / "config.json").write_text("{}")
        folders.append(folder)
    refused(
        tmp_path,
        [*folders, "-o", folders[0] / "ema.safetensors", "--min-step", "2"],
        "inside the input checkpoint folder",
    )
    refused(
        tmp_path,
        [*folders, "-o", tmp_path / "ema.safetensors", "--mapping", folders[0] / "config.json"],
        "one of the input checkpoints",
    )


def test_an_input_named_like_a_temporary_is_never_cleaned_away(tmp_path: Path) -> None:
    """A later run deletes ``.<output>.tmp-*`` folders beside the output as leftovers of a
    killed run: an input folder with such a name is refused, not deleted."""
    odd = tmp_path / ".ema.tmp-1"
    write_checkpoint(odd / "model.safetensors", {"w": np.ones(2, np.float32)})
    normal = write_checkpoint(tmp_path / "ckpt-2.safetensors", {"w": np.zeros(2, np.float32)})
    refused(
        tmp_path,
        [odd, normal, "-o", tmp_path / "ema", "--order", "given"],
        "named like a temporary file of the output",
    )
    assert (odd / "model.safetensors").is_file()


def test_state_folder_and_outputs_stay_apart(run: list[Path], tmp_path: Path) -> None:
    state = tmp_path / "state"
    refused(
        tmp_path,
        [*run, "-o", state / "ema.safetensors", "--state", state],
        "cannot be inside",
    )
    refused(
        tmp_path,
        [*run, "-o", tmp_path / "ema.safetensors", "--state", tmp_path / "run"],
        "state folder holds the input checkpoint",
    )
    refused(tmp_path, [*run, "-o", tmp_path / "ema.safetensors", "--state", run[0]], "is a file")


def test_output_and_mapping_are_not_each_other(run: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "ema.safetensors"
    refused(tmp_path, [*run, "-o", out, "--mapping", out], "cannot also be the output")
    folder = tmp_path / "ema"
    refused(tmp_path, [*run, "-o", folder, "--mapping", folder / "m.json"], "cannot be inside")


def test_a_normal_run_beside_its_inputs_still_works(run: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "run" / "ema.safetensors"
    before = {p: p.read_bytes() for p in run}
    result = run_cli(["average", *run, "-o", out, "--decay", "0.9", "--every", "2", "-q"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and (tmp_path / "run" / "ema.ckpt-200.safetensors").is_file()
    assert {p: p.read_bytes() for p in run} == before
