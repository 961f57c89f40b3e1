"""The command line with Hugging Face model folders: sharded inputs, folder outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ema_cli.formats.sharded import INDEX_NAME, SINGLE_NAME
from tests.conftest import assert_fails, load, snapshot
from tests.conftest import run_average as average
from tests.test_sharded import load_folder, make_folder, shard_name


@pytest.fixture
def run(tmp_path: Path) -> list[Path]:
    """Three sharded checkpoints ``checkpoint-{100,300,200}/`` with a config.json each."""
    rng = np.random.default_rng(5)
    folders = []
    for step in (100, 300, 200):
        shards = [
            {"w": rng.standard_normal((8, 4)).astype(np.float32)},
            {"b": rng.standard_normal(4).astype(np.float32), "step": np.array(step)},
        ]
        side = {"config.json": json.dumps({"step": step})}
        folders.append(make_folder(tmp_path / "run" / f"checkpoint-{step}", shards, side=side))
    return folders


def test_sharded_folders_into_a_folder(run: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "ema"
    result = average(*run, "-o", out, "--decay", "0.9", "--max-shard-size", "100B")
    assert result.exit_code == 0, result.output
    assert f"wrote {out} (" in result.stderr
    loaded, weight_map = load_folder(out)
    assert weight_map == {"w": shard_name(1, 2), "b": shard_name(2, 2), "step": shard_name(2, 2)}
    assert loaded["step"] == 300  # copied from the last checkpoint by step
    assert json.loads((out / "config.json").read_text()) == {"step": 300}
    xs = [load_folder(p)[0]["w"] for p in sorted(run, key=lambda p: int(p.name.split("-")[1]))]
    c = np.float32(1) - np.float32(0.9)
    s = xs[0].copy()
    for x in xs:
        s = s - (s - x) * c
    assert np.array_equal(loaded["w"], s)
    mapping = json.loads((tmp_path / "ema.mapping.json").read_text())
    assert [c["step"] for c in mapping["checkpoints"]] == [100, 200, 300]

    # Rerunning replaces the earlier output folder, byte for byte the same.
    before = snapshot(out)
    assert average(*run, "-o", out, "--decay", "0.9", "--max-shard-size", "100B").exit_code == 0
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema", "ema.mapping.json", "run"]


def test_default_shard_size_gives_one_model_file(run: list[Path], tmp_path: Path) -> None:
    assert average(*run, "-o", tmp_path / "ema", "--decay", "0.9", "-q").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "ema").iterdir()) == ["config.json", SINGLE_NAME]


def test_a_sharded_folder_into_a_file(run: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "ema.safetensors"
    assert average(*run, "-o", out, "--decay", "0.9", "-q").exit_code == 0
    assert sorted(load(out)) == ["b", "step", "w"]


def test_max_shard_size_errors(run: list[Path], tmp_path: Path) -> None:
    assert_fails(
        average(
            *run, "-o", tmp_path / "e.safetensors", "--decay", "0.9", "--max-shard-size", "1GB"
        ),
        "--max-shard-size applies to folder outputs",
    )
    assert_fails(
        average(*run, "-o", tmp_path / "ema", "--decay", "0.9", "--max-shard-size", "5gb"),
        "invalid size '5gb'",
    )
    assert not (tmp_path / "ema").exists()


def test_refuses_an_output_folder_holding_an_input(run: list[Path], tmp_path: Path) -> None:
    before = snapshot(tmp_path / "run")
    assert_fails(
        average(*run, "-o", tmp_path / "run", "--decay", "0.9"), "holds the input checkpoint"
    )
    assert_fails(average(*run, "-o", run[0], "--decay", "0.9"), "is one of the input checkpoints")
    assert snapshot(tmp_path / "run") == before


def test_refuses_to_replace_a_folder_that_is_not_an_output(run: list[Path], tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "scores.csv").write_text("1,2\n")
    assert_fails(
        average(*run, "-o", tmp_path / "results", "--decay", "0.9"), "refusing to replace it"
    )
    assert (tmp_path / "results" / "scores.csv").read_text() == "1,2\n"


def test_a_broken_shard_names_shard_and_tensor(run: list[Path], tmp_path: Path) -> None:
    (run[1] / shard_name(2, 2)).unlink()
    assert_fails(
        average(*run, "-o", tmp_path / "ema", "--decay", "0.9"),
        f"{run[1] / shard_name(2, 2)}: tensor 'b': shard listed in {INDEX_NAME} is missing",
    )
    assert not (tmp_path / "ema").exists()
