"""Selection (--last/--min-step/--max-step), trajectories (--every), --dry-run, --hash, inspect."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import average_status as average
from tests.conftest import load, run_cli, write_checkpoint

STEPS = (100, 200, 300, 400, 500)


@pytest.fixture
def run_dir(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(3)
    return [
        write_checkpoint(
            tmp_path / "run" / f"ckpt-{s}.safetensors",
            {
                "w": rng.standard_normal((4, 3)),
                "b": rng.standard_normal(3).astype(np.float32),
                "step": np.array(s),
            },
        )
        for s in STEPS
    ]


def steps_of(mapping: Path) -> list[int]:
    return [c["step"] for c in json.loads(mapping.read_text())["checkpoints"]]


@pytest.mark.parametrize(
    ("args", "steps"),
    [
        (["--last", "2"], [400, 500]),
        (["--min-step", "300"], [300, 400, 500]),
        (["--max-step", "300"], [100, 200, 300]),
        (["--min-step", "150", "--max-step", "450", "--last", "2"], [300, 400]),
        (["--last", "9"], list(STEPS)),
    ],
)
def test_selection(run_dir: list[Path], tmp_path: Path, args: list[str], steps: list[int]) -> None:
    out = tmp_path / "o.safetensors"
    code, _, err = average(*run_dir, "-o", out, "--decay", "0.9", "-q", *args)
    assert code == 0, err
    assert steps_of(tmp_path / "o.mapping.json") == steps
    # Same bytes as naming exactly those checkpoints.
    chosen = [p for p in run_dir if int(p.stem.split("-")[1]) in steps]
    ref = tmp_path / "ref.safetensors"
    assert average(*chosen, "-o", ref, "--decay", "0.9", "-q")[0] == 0
    assert out.read_bytes() == ref.read_bytes()


def test_index_counts_positions_after_selection(run_dir: list[Path], tmp_path: Path) -> None:
    code, _, _ = average(
        *run_dir,
        "-o",
        tmp_path / "o.safetensors",
        "--decay",
        "0.9",
        "--num-updates",
        "index",
        "--last",
        "2",
        "-q",
    )
    assert code == 0
    record = json.loads((tmp_path / "o.mapping.json").read_text())
    assert [c["num_updates"] for c in record["checkpoints"]] == [0, 1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--last", "0"], "--last must be at least 1"),
        (["--min-step", "600"], "no checkpoint is left"),
        (["--min-step", "400", "--max-step", "300"], "--min-step 400 is above --max-step 300"),
        (["--every", "0"], "--every must be at least 1"),
        (["--settle", "-1"], "--settle must be >= 0"),
        (["--settle", "nan"], "--settle must be >= 0"),
        (["--max-shard-size", "1GB"], "--max-shard-size applies to folder outputs"),
        (["--num-updates", "1" + "0" * 400], "too large (num_updates is a 64-bit count)"),
        (["--num-updates", str(2**63)], "too large (num_updates is a 64-bit count)"),
    ],
)
def test_selection_errors(
    run_dir: list[Path], tmp_path: Path, args: list[str], message: str
) -> None:
    code, _, err = average(*run_dir, "-o", tmp_path / "o.safetensors", "--decay", "0.9", *args)
    assert code == 2 and message in err, err
    assert list(tmp_path.iterdir()) == [tmp_path / "run"]


def test_min_step_needs_step_numbers(tmp_path: Path) -> None:
    paths = [
        write_checkpoint(tmp_path / f"{name}.safetensors", {"w": np.ones(2, np.float32)})
        for name in ("a", "b")
    ]
    code, _, err = average(
        *paths,
        "-o",
        tmp_path / "o.safetensors",
        "--decay",
        "0.9",
        "--order",
        "given",
        "--min-step",
        "3",
    )
    assert code == 2 and "needed by --min-step/--max-step" in err


def test_every_writes_the_trajectory_in_one_pass(run_dir: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "ema.safetensors"
    code, _, err = average(*run_dir, "-o", out, "--decay", "0.9", "--every", "2", "--json")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.glob("ema*")) == [
        "ema.ckpt-200.safetensors",
        "ema.ckpt-400.safetensors",
        "ema.mapping.json",
        "ema.safetensors",
    ]
    record = json.loads((tmp_path / "ema.mapping.json").read_text())
    assert [(o["after"]["step"], Path(o["path"]).name) for o in record["outputs"]] == [
        (200, "ema.ckpt-200.safetensors"),
        (400, "ema.ckpt-400.safetensors"),
        (500, "ema.safetensors"),
    ]
    for step, name in ((200, "ema.ckpt-200.safetensors"), (400, "ema.ckpt-400.safetensors")):
        prefix = [p for p in run_dir if int(p.stem.split("-")[1]) <= step]
        ref = tmp_path / "ref.safetensors"
        assert average(*prefix, "-o", ref, "--decay", "0.9", "-q")[0] == 0
        got, want = load(tmp_path / name), load(ref)
        assert got.keys() == want.keys()
        for key in want:  # values equal; metadata (checkpoint count) equal too
            assert np.array_equal(got[key], want[key]), key
        assert (tmp_path / name).read_bytes() == ref.read_bytes()
    assert load(tmp_path / "ema.ckpt-200.safetensors")["step"] == 200  # copied from ckpt-200


def test_dry_run_writes_nothing_and_weights_match_a_one_hot_replay(tmp_path: Path) -> None:
    """Checkpoint k holds the k-th unit vector, so the average *is* the weight vector."""
    n = 6
    paths = [
        write_checkpoint(tmp_path / "run" / f"step-{10 * (k + 1)}.safetensors", {"w": np.eye(n)[k]})
        for k in range(n)
    ]
    for options in (
        ["--decay", "0.8"],
        ["--decay", "0.95", "--num-updates", "index"],
        ["--decay", "0.7", "--zero-debias"],
    ):
        code, out, err = average(
            *paths, "-o", tmp_path / "o.safetensors", "--dry-run", "--json", *options
        )
        assert code == 0, err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
        plan = json.loads(out)
        assert plan["status"] == "dry run"
        weights = [c["weight"] for c in plan["checkpoints"]]
        assert average(*paths, "-o", tmp_path / "o.safetensors", "-q", *options)[0] == 0
        np.testing.assert_allclose(
            load(tmp_path / "o.safetensors")["w"], weights, rtol=1e-6, atol=1e-9
        )
        if "--zero-debias" not in options:
            assert sum(weights) == pytest.approx(1.0)
        for p in tmp_path.iterdir():
            if p.is_file():
                p.unlink()


def test_dry_run_table(run_dir: list[Path], tmp_path: Path) -> None:
    code, out, _ = average(
        *run_dir, "-o", tmp_path / "o.safetensors", "--decay", "0.5", "--dry-run"
    )
    assert code == 0
    assert "replay plan: 5 checkpoints" in out
    for p in run_dir:
        assert str(p) in out
    assert "0.500000" in out and "█" in out
    assert "averaged (2): b, w" in out
    assert "copied from the last checkpoint (1): step" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_hash_and_sizes_are_recorded(run_dir: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    code, stdout, _ = average(*run_dir[:2], "-o", out, "--decay", "0.9", "--hash", "--json", "-q")
    assert code == 0
    record = json.loads(stdout)
    for entry, path in zip(record["checkpoints"], run_dir[:2], strict=True):
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["size"] == path.stat().st_size
    (written,) = record["outputs"]
    assert written["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert written["size"] == out.stat().st_size
    assert record["status"] == "written" and record["tool"].startswith("ema-cli ")
    assert json.loads((tmp_path / "o.mapping.json").read_text())["checkpoints"][0]["sha256"]


def test_inspect(run_dir: list[Path]) -> None:
    result = run_cli(["inspect", str(run_dir[0]), "--json"])
    assert result.exit_code == 0
    (record,) = json.loads(result.stdout)
    assert record["step"] == 100 and record["format"] == "safetensors"
    assert record["tensor_count"] == 3 and record["bytes"] == 4 * 3 * 8 + 3 * 4 + 8
    assert {t["name"]: (t["dtype"], t["shape"]) for t in record["tensors"]} == {
        "w": ("float64", [4, 3]),
        "b": ("float32", [3]),
        "step": ("int64", []),
    }
    table = run_cli(["inspect", *map(str, run_dir[:2])])
    assert table.exit_code == 0
    assert f"{run_dir[0]}: safetensors, step 100, 3 tensors, 116 B" in table.stdout
    assert "float64" in table.stdout and "(4, 3)" in table.stdout


def test_inspect_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"nope")
    result = run_cli(["inspect", str(bad)])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"ema-cli: error: {bad}: ")


def test_an_empty_output_name_is_a_usage_error(run_dir: list[Path]) -> None:
    from tests.conftest import assert_fails

    for name in ("", "."):
        assert_fails(run_cli(["average", *map(str, run_dir), "-o", name, "--decay", "0.9"]), "-o")


def test_a_step_too_big_for_tf_is_one_line(tmp_path: Path) -> None:
    from tests.conftest import assert_fails, write_checkpoint

    huge = "9" * 30
    paths = [
        write_checkpoint(tmp_path / f"ckpt-{s}.safetensors", {"w": np.zeros(2, np.float32)})
        for s in ("1", huge)
    ]
    result = run_cli(
        ["average", *map(str, paths), "-o", str(tmp_path / "o.safetensors"), "--decay", "0.9",
         "--num-updates", "step"]
    )  # fmt: skip
    assert_fails(result, f"ckpt-{huge}.safetensors", "above 9223372036854775807")


def test_any_number_of_workers_writes_the_same_bytes(run_dir: list[Path], tmp_path: Path) -> None:
    outputs = []
    for workers in ("1", "2", "5"):
        out = tmp_path / f"w{workers}.safetensors"
        code, _, err = average(
            *run_dir, "-o", out, "--decay", "0.9", "--mean", "--workers", workers
        )
        assert code == 0, err
        outputs.append(
            [
                out.with_name(f"w{workers}.{p}.safetensors").read_bytes()
                for p in ("decay-0.9", "mean")
            ]
        )
    assert outputs[0] == outputs[1] == outputs[2]
    code, _, err = average(
        *run_dir, "-o", tmp_path / "x.safetensors", "--decay", "0.9", "--workers", "0"
    )
    assert code == 2 and "--workers must be at least 1" in err
