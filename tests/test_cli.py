"""The command line as users see it: exit status, messages, files written (or not)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from ema_cli import __version__
from tests.conftest import assert_fails, load, run_cli, write_checkpoint
from tests.conftest import run_average as average


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# ---------------------------------------------------------------- success paths


def test_average_writes_output_and_mapping(sequence: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "ema.safetensors"
    result = average(*sequence, "-o", out, "--decay", "0.9")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert f"wrote {out}" in result.stderr
    tensors = load(out)
    inputs = [load(p) for p in sorted(sequence, key=lambda p: int(p.stem.split("-")[1]))]
    assert set(tensors) == set(inputs[-1])
    for name, value in tensors.items():
        assert value.dtype == inputs[-1][name].dtype and value.shape == inputs[-1][name].shape
    assert tensors["global_step"] == 10  # copied from the last checkpoint by step, not by name
    mapping = json.loads((tmp_path / "ema.mapping.json").read_text())
    assert mapping["mapping"] == {
        "dense/bias": "dense/bias/ExponentialMovingAverage",
        "dense/kernel": "dense/kernel/ExponentialMovingAverage",
        "emb.weight": "emb.weight/ExponentialMovingAverage",
    }
    assert mapping["passthrough"] == ["global_step"]
    assert [c["step"] for c in mapping["checkpoints"]] == [2, 5, 10]
    assert mapping["tool"] == f"ema-cli {__version__}"
    assert mapping["decay"] == 0.9 and mapping["zero_debias"] is False
    assert mapping["precision"] == "auto" and mapping["names"] == "original"


def test_float32_values_follow_tf_arithmetic(sequence: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "ema.safetensors"
    assert average(*sequence, "-o", out, "--decay", "0.9", "-q").exit_code == 0
    xs = [load(p)["dense/kernel"] for p in sorted(sequence, key=lambda p: int(p.stem[5:]))]
    c = np.float32(1) - np.float32(0.9)
    s = xs[0].copy()
    for x in xs:
        s = s - (s - x) * c
    assert np.array_equal(load(out)["dense/kernel"], s)


def test_identical_runs_write_identical_bytes(sequence: list[Path], tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert (
        average(
            *sequence, "-o", a, "--decay", "0.99", "-q", "--mapping", tmp_path / "m.json"
        ).exit_code
        == 0
    )
    first_mapping = (tmp_path / "m.json").read_bytes()
    assert (
        average(
            *reversed(sequence), "-o", b, "--decay", "0.99", "-q", "--mapping", tmp_path / "m.json"
        ).exit_code
        == 0
    )
    assert a.read_bytes() == b.read_bytes()
    # The mapping records the output path, which differs; everything else is identical.
    m1, m2 = json.loads(first_mapping), json.loads((tmp_path / "m.json").read_bytes())
    assert {**m1, "output": "", "outputs": []} == {**m2, "output": "", "outputs": []}


def test_output_metadata(sequence: list[Path], tmp_path: Path) -> None:
    from safetensors import safe_open

    out = tmp_path / "ema.safetensors"
    assert (
        average(*sequence, "-o", out, "--decay", "0.999", "--num-updates", "step", "-q").exit_code
        == 0
    )
    with safe_open(str(out), "np") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    assert meta["ema.decay"] == "0.999" and meta["ema.num_updates"] == "step"
    assert meta["ema.checkpoints"] == "3"


def test_names_shadow_and_custom_name(sequence: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "ema.safetensors"
    result = average(
        *sequence, "-o", out, "--decay", "0.9", "--names", "shadow", "--name", "Avg", "-q"
    )
    assert result.exit_code == 0, result.output
    assert set(load(out)) == {"dense/kernel/Avg", "dense/bias/Avg", "emb.weight/Avg", "global_step"}
    mapping = json.loads((tmp_path / "ema.mapping.json").read_text())
    assert mapping["mapping"]["dense/kernel"] == "dense/kernel/Avg"
    assert mapping["ema_name"] == "Avg" and mapping["names"] == "shadow"


def test_include_exclude(sequence: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "ema.safetensors"
    result = average(
        *sequence, "-o", out, "--decay", "0.9", "--include", "dense/*", "--exclude", "*/bias", "-q"
    )
    assert result.exit_code == 0, result.output
    mapping = json.loads((tmp_path / "ema.mapping.json").read_text())
    assert list(mapping["mapping"]) == ["dense/kernel"]
    assert mapping["passthrough"] == ["dense/bias", "emb.weight", "global_step"]
    last = load(sequence[1])  # ckpt-10
    got = load(out)
    assert np.array_equal(got["dense/bias"], last["dense/bias"])
    assert np.array_equal(got["emb.weight"].view(np.uint16), last["emb.weight"].view(np.uint16))
    assert not np.array_equal(got["dense/kernel"], last["dense/kernel"])


def test_unmatched_exclude_warns(sequence: list[Path], tmp_path: Path) -> None:
    result = average(
        *sequence, "-o", tmp_path / "e.safetensors", "--decay", "0.9", "--exclude", "nope*"
    )
    assert result.exit_code == 0
    assert "warning: --exclude 'nope*' matches no tensor" in result.stderr


def test_order_given_and_num_updates_index(sequence: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "ema.safetensors"
    result = average(
        *sequence, "-o", out, "--decay", "0.999", "--order", "given", "--num-updates", "index", "-q"
    )
    assert result.exit_code == 0, result.output
    mapping = json.loads((tmp_path / "ema.mapping.json").read_text())
    assert [Path(c["path"]).name for c in mapping["checkpoints"]] == [p.name for p in sequence]
    assert [c["num_updates"] for c in mapping["checkpoints"]] == [0, 1, 2]
    assert mapping["checkpoints"][1]["decay"] == float(np.float32(2) / np.float32(11))
    assert load(out)["global_step"] == 5  # the last given, not the highest step


def test_json_summary_on_stdout(sequence: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "ema.safetensors"
    result = average(*sequence, "-o", out, "--decay", "0.9", "--json", "-q")
    assert result.exit_code == 0
    summary = json.loads(result.stdout)
    assert summary["mapping_file"] == str(tmp_path / "ema.mapping.json")
    assert summary["output"] == str(out)
    assert summary["mapping"] == json.loads((tmp_path / "ema.mapping.json").read_text())["mapping"]
    assert result.stderr == ""


def test_paths_from_stdin(sequence: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "ema.safetensors"
    result = average(
        "-", "-o", out, "--decay", "0.9", "-q", stdin="\n".join(map(str, sequence)) + "\n\n"
    )
    assert result.exit_code == 0, result.output
    assert len(json.loads((tmp_path / "ema.mapping.json").read_text())["checkpoints"]) == 3


def test_folder_holding_one_checkpoint(tmp_path: Path) -> None:
    for step in (100, 20):
        write_checkpoint(
            tmp_path / f"checkpoint-{step}" / "model.safetensors",
            {"w": np.full(3, step, np.float32)},
        )
    out = tmp_path / "ema.safetensors"
    result = average(
        tmp_path / "checkpoint-100", tmp_path / "checkpoint-20/", "-o", out, "--decay", "0.5", "-q"
    )
    assert result.exit_code == 0, result.output
    assert load(out)["w"].tolist() == [60.0] * 3  # 20 first, then 100: 20 - (20 - 100) * 0.5


def test_single_checkpoint_is_returned_unchanged(sequence: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "ema.safetensors"
    assert average(sequence[0], "-o", out, "--decay", "0.9", "-q").exit_code == 0
    got, want = load(out), load(sequence[0])
    for name in want:
        assert got[name].tobytes() == want[name].tobytes() and got[name].dtype == want[name].dtype


def test_scalars_and_empty_tensors(tmp_path: Path) -> None:
    paths = [
        write_checkpoint(
            tmp_path / f"c-{i}.safetensors",
            {"s": np.array(float(i), np.float32), "e": np.zeros((0, 3), np.float16)},
        )
        for i in (1, 2)
    ]
    out = tmp_path / "ema.safetensors"
    assert average(*paths, "-o", out, "--decay", "0.5", "-q").exit_code == 0
    got = load(out)
    assert got["s"].shape == () and got["s"] == 1.5
    assert got["e"].shape == (0, 3) and got["e"].dtype == np.float16


def test_bfloat16_auto_moves_native_does_not(tmp_path: Path) -> None:
    bf16 = ml_dtypes.bfloat16
    # A shadow of 1.0 fed 3.0 nine times: in float32 it reaches 1 + 2 * (1 - 0.999**9) = 1.018,
    # which rounds to bfloat16 1.015625; in bfloat16 itself every update is below half an ulp.
    paths = [
        write_checkpoint(
            tmp_path / f"c-{i}.safetensors", {"w": np.full(4, 1.0 if i == 0 else 3.0, bf16)}
        )
        for i in range(10)
    ]
    auto, native = tmp_path / "auto.safetensors", tmp_path / "native.safetensors"
    assert average(*paths, "-o", auto, "--decay", "0.999", "-q").exit_code == 0
    assert (
        average(*paths, "-o", native, "--decay", "0.999", "--precision", "native", "-q").exit_code
        == 0
    )
    assert load(native)["w"].astype(np.float32).tolist() == [1.0] * 4
    assert load(auto)["w"].dtype == bf16
    assert load(auto)["w"].astype(np.float32).tolist() == [1.015625] * 4


def test_python_dash_m_and_console_script(sequence: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "ema.safetensors"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ema_cli",
            "average",
            *map(str, sequence),
            "-o",
            str(out),
            "--decay",
            "0.9",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.exists()
    assert "\x1b[" not in proc.stderr  # no progress bar when stderr is not a terminal


def test_version_and_help() -> None:
    result = run_cli(["--version"])
    assert result.exit_code == 0
    assert result.stdout.splitlines()[0] == f"ema-cli {__version__}"
    assert result.stdout.splitlines()[1].startswith("hot loops: ")
    result = run_cli(["average", "--help"])
    assert result.exit_code == 0
    for option in (
        "--output",
        "--decay",
        "--num-updates",
        "--zero-debias",
        "--name",
        "--names",
        "--mapping",
        "--order",
        "--include",
        "--exclude",
        "--precision",
        "--strict",
        "--json",
        "--quiet",
    ):
        assert option in result.stdout
    assert run_cli([]).exit_code == 0  # bare `ema-cli` shows the help


# ---------------------------------------------------------------- errors: exit 2, one line, nothing written


@pytest.fixture
def existing_output(tmp_path: Path) -> Path:
    """An output from an earlier run, which a failing run must leave byte-identical."""
    out = tmp_path / "out" / "ema.safetensors"
    write_checkpoint(out, {"old": np.ones(2, np.float32)})
    (tmp_path / "out" / "ema.mapping.json").write_text("{}")
    return out


def assert_untouched(existing_output: Path) -> None:
    assert load(existing_output)["old"].tolist() == [1.0, 1.0]
    assert (existing_output.parent / "ema.mapping.json").read_text() == "{}"
    assert listing(existing_output.parent) == {"ema.safetensors", "ema.mapping.json"}


def corrupt(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def safetensors_bytes(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


BAD_FILES = {
    "missing": (None, "no such file"),
    "empty": (b"", "not a safetensors file"),
    "garbage header": (struct.pack("<Q", 12) + b"not json!!!!", "header is not JSON"),
    "oversized header": (
        struct.pack("<Q", 2**40) + b"{}",
        "more than the 100000000 safetensors allows",
    ),
    "not a safetensors file": (b"PK\x03\x04 this is a zip file really", "not a safetensors file"),
    "header not an object": (safetensors_bytes(b"[1, 2]"), "not a JSON object"),
    "bad utf-8": (safetensors_bytes(b'{"\xff":1}'), "header is not JSON"),
    "unknown dtype": (
        safetensors_bytes(b'{"w":{"dtype":"X9","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4),
        "tensor 'w': unsupported dtype 'X9'",
    ),
    "offsets disagree with shape": (
        safetensors_bytes(b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', b"\0" * 4),
        "tensor 'w': corrupt header: shape [2] of F32 needs 8 bytes",
    ),
    "negative shape": (
        safetensors_bytes(b'{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}', b"\0" * 4),
        "tensor 'w': corrupt header: bad shape",
    ),
    "overlapping tensors": (
        safetensors_bytes(
            b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}',
            b"\0" * 12,
        ),
        "data overlaps",
    ),
    "bad metadata": (
        safetensors_bytes(b'{"__metadata__":{"a":1}}'),
        "__metadata__ must map strings to strings",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_checkpoint_files(case: str, sequence: list[Path], existing_output: Path) -> None:
    data, message = BAD_FILES[case]
    bad = sequence[0].with_name("ckpt-7.safetensors")
    if data is not None:
        corrupt(bad, data)
    result = average(*sequence, bad, "-o", existing_output, "--decay", "0.9")
    assert_fails(result, str(bad), message)
    assert_untouched(existing_output)


def test_truncated_checkpoint(sequence: list[Path], existing_output: Path) -> None:
    data = sequence[0].read_bytes()
    bad = corrupt(sequence[0].with_name("ckpt-7.safetensors"), data[:-10])
    assert_fails(
        average(*sequence, bad, "-o", existing_output, "--decay", "0.9"), str(bad), "truncated"
    )
    assert_untouched(existing_output)
    cut = corrupt(sequence[0].with_name("ckpt-7.safetensors"), data[:20])
    assert_fails(
        average(*sequence, cut, "-o", existing_output, "--decay", "0.9"), str(cut), "truncated"
    )


def test_tensor_missing_from_one_checkpoint(
    sequence: list[Path], tmp_path: Path, existing_output: Path
) -> None:
    bad = write_checkpoint(
        tmp_path / "run" / "ckpt-7.safetensors",
        {k: v for k, v in load(sequence[0]).items() if k != "dense/bias"},
    )
    assert_fails(
        average(*sequence, bad, "-o", existing_output, "--decay", "0.9"),
        str(bad),
        "'dense/bias'",
        "missing",
    )
    assert_untouched(existing_output)


def test_extra_float_tensor_in_an_older_checkpoint(
    sequence: list[Path], tmp_path: Path, existing_output: Path
) -> None:
    bad = write_checkpoint(
        tmp_path / "run" / "ckpt-7.safetensors",
        {**load(sequence[0]), "extra": np.ones(1, np.float32)},
    )
    assert_fails(
        average(*sequence, bad, "-o", existing_output, "--decay", "0.9"),
        str(bad),
        "'extra'",
        "not in the last checkpoint",
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda v: v.astype(np.float64), "dtype float64 differs from float32"),
        (lambda v: v.reshape(4, 3), "shape [4, 3] differs from [3, 4]"),
    ],
)
def test_shape_or_dtype_change(
    change, message: str, sequence: list[Path], tmp_path: Path, existing_output: Path
) -> None:  # type: ignore[no-untyped-def]
    tensors = load(sequence[0])
    tensors["dense/kernel"] = change(tensors["dense/kernel"])
    bad = write_checkpoint(tmp_path / "run" / "ckpt-7.safetensors", tensors)
    assert_fails(
        average(*sequence, bad, "-o", existing_output, "--decay", "0.9"),
        str(bad),
        "'dense/kernel'",
        message,
    )
    assert_untouched(existing_output)


def test_no_step_number(sequence: list[Path], tmp_path: Path, existing_output: Path) -> None:
    bad = write_checkpoint(tmp_path / "run" / "final.safetensors", load(sequence[0]))
    assert_fails(
        average(*sequence, bad, "-o", existing_output, "--decay", "0.9"),
        str(bad),
        "no step number",
        "--order given",
    )
    # with --order given, steps are only needed for --num-updates step
    assert_fails(
        average(
            bad,
            *sequence,
            "-o",
            existing_output,
            "--decay",
            "0.9",
            "--order",
            "given",
            "--num-updates",
            "step",
        ),
        "no step number",
        "--num-updates step",
    )
    assert (
        average(
            bad, *sequence, "-o", existing_output, "--decay", "0.9", "--order", "given", "-q"
        ).exit_code
        == 0
    )


def test_duplicate_steps(sequence: list[Path], tmp_path: Path, existing_output: Path) -> None:
    dup = write_checkpoint(tmp_path / "other" / "model_step10.safetensors", load(sequence[0]))
    assert_fails(
        average(*sequence, dup, "-o", existing_output, "--decay", "0.9"), "same step number (10)"
    )
    assert_fails(
        average(sequence[0], sequence[0], "-o", existing_output, "--decay", "0.9"), "given twice"
    )
    assert_untouched(existing_output)


def test_json_failures_answer_on_stdout(sequence: list[Path], tmp_path: Path) -> None:
    result = average(*sequence, "-o", tmp_path / "o.safetensors", "--decay", "2", "--json")
    assert_fails(result, "--decay")
    assert json.loads(result.stdout) == {
        "error": result.stderr.strip().removeprefix("ema-cli: error: "),
        "exit_status": 2,
        "status": "error",
    }
    without = average(*sequence, "-o", tmp_path / "o.safetensors", "--decay", "2")
    assert without.stdout == ""


def test_one_file_under_two_spellings_is_given_twice(
    sequence: list[Path], tmp_path: Path, existing_output: Path
) -> None:
    """--order given keeps names as typed: './', a symlink or a folder holding the file must
    still not replay one checkpoint twice."""
    link = tmp_path / "ckpt-77.safetensors"
    link.symlink_to(sequence[0])
    dotted = sequence[0].parent / "." / sequence[0].name
    for second in (dotted, link, sequence[0].parent / ".." / "run" / sequence[0].name):
        assert_fails(
            average(
                sequence[0], second, "-o", existing_output, "--decay", "0.9", "--order", "given"
            ),
            str(second),
            "given twice",
        )
    assert_untouched(existing_output)


def test_a_mapping_that_cannot_be_written_fails_before_the_output_appears(
    sequence: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "x.safetensors"
    (tmp_path / "x.mapping.json").mkdir()  # the default mapping name, taken by a folder
    assert_fails(average(*sequence, "-o", out, "--decay", "0.9"), "x.mapping.json", "is a folder")
    assert not out.exists()
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        assert_fails(
            average(*sequence, "-o", out, "--decay", "0.9", "--mapping", ro / "m.json"),
            str(ro / "m.json"),
        )
        assert not out.exists()


@pytest.mark.parametrize("decay", ["1.5", "-0.1", "nan", "abc"])
def test_bad_decay(decay: str, sequence: list[Path], existing_output: Path) -> None:
    assert_fails(average(*sequence, "-o", existing_output, "--decay", decay), "decay")
    assert_untouched(existing_output)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num-updates", "-3"], "--num-updates"),
        (["--num-updates", "often"], "not a whole number"),
        (["--names", "all"], "--names"),
        (["--precision", "double"], "--precision"),
        (["--order", "mtime"], "--order"),
        (["--include", "nothing*"], "--include 'nothing*' matches no tensor"),
        (["--exclude", "*"], "no tensor to average"),
        (["--name", ""], "--name"),
        (["--strict"], "'global_step'"),
        (["--frobnicate"], "No such option"),
    ],
)
def test_bad_options(
    args: list[str], message: str, sequence: list[Path], existing_output: Path
) -> None:
    assert_fails(average(*sequence, "-o", existing_output, "--decay", "0.9", *args), message)
    assert_untouched(existing_output)


def test_missing_required_options(sequence: list[Path]) -> None:
    assert_fails(average(*sequence, "--decay", "0.9"), "'-o' / '--output'")
    assert_fails(average(*sequence, "-o", "x.safetensors"), "--decay")
    assert_fails(
        average("-", "-o", "x.safetensors", "--decay", "0.9", stdin=""), "standard input was empty"
    )


def test_shadow_name_collision(tmp_path: Path, existing_output: Path) -> None:
    tensors = {"w": np.ones(2, np.float32), "w/ExponentialMovingAverage": np.ones(2, np.float32)}
    paths = [write_checkpoint(tmp_path / f"c-{i}.safetensors", tensors) for i in (1, 2)]
    assert_fails(
        average(*paths, "-o", existing_output, "--decay", "0.9"),
        "'w'",
        "shadow name 'w/ExponentialMovingAverage' is already a tensor",
        "--name",
    )
    assert_untouched(existing_output)
    # the suggested fix works
    assert (
        average(*paths, "-o", existing_output, "--decay", "0.9", "--name", "EMA2", "-q").exit_code
        == 0
    )


def test_output_is_an_input(sequence: list[Path], tmp_path: Path) -> None:
    before = sequence[0].read_bytes()
    assert_fails(
        average(*sequence, "-o", sequence[0], "--decay", "0.9"), "is one of the input checkpoints"
    )
    link = tmp_path / "link.safetensors"
    os.symlink(sequence[1], link)
    assert_fails(
        average(*sequence, "-o", link, "--decay", "0.9"), "is one of the input checkpoints"
    )
    assert_fails(
        average(
            *sequence, "-o", tmp_path / "x.safetensors", "--mapping", sequence[2], "--decay", "0.9"
        ),
        "mapping file is one of the input",
    )
    assert sequence[0].read_bytes() == before


def test_unsupported_formats(sequence: list[Path], tmp_path: Path) -> None:
    assert_fails(
        average(*sequence, "-o", tmp_path / "out.onnx", "--decay", "0.9"),
        "out.onnx",
        "unsupported output format",
    )
    other = tmp_path / "run" / "ckpt-11.onnx"
    other.write_bytes(b"x")
    assert_fails(
        average(*sequence, other, "-o", tmp_path / "o.safetensors", "--decay", "0.9"),
        "ckpt-11.onnx",
        "unsupported checkpoint format",
    )
    broken = tmp_path / "run" / "ckpt-12.ckpt"  # a registered format, but not a torch file
    broken.write_bytes(b"x")
    assert_fails(
        average(*sequence, broken, "-o", tmp_path / "o.safetensors", "--decay", "0.9"),
        "ckpt-12.ckpt",
    )


def test_output_folder_missing(sequence: list[Path], tmp_path: Path) -> None:
    assert_fails(
        average(*sequence, "-o", tmp_path / "nope" / "o.safetensors", "--decay", "0.9"),
        "does not exist",
    )
    assert not (tmp_path / "nope").exists()


def test_folder_with_no_or_many_checkpoints(sequence: list[Path], tmp_path: Path) -> None:
    (tmp_path / "empty-3").mkdir()
    assert_fails(
        average(tmp_path / "empty-3", "-o", tmp_path / "o.safetensors", "--decay", "0.9"),
        "holds no checkpoint",
    )
    assert_fails(
        average(
            tmp_path / "run", "-o", tmp_path / "o.safetensors", "--decay", "0.9", "--order", "given"
        ),
        "holds 3 checkpoint files",
    )


def test_no_temporary_files_left_after_failure(sequence: list[Path], tmp_path: Path) -> None:
    tensors = load(sequence[0])
    tensors["dense/kernel"] = tensors["dense/kernel"][:2]
    bad = write_checkpoint(tmp_path / "run" / "ckpt-7.safetensors", tensors)
    before = listing(tmp_path)
    assert (
        average(*sequence, bad, "-o", tmp_path / "o.safetensors", "--decay", "0.9").exit_code == 2
    )
    assert listing(tmp_path) == before


def test_read_failure_midway_removes_the_temporary_output(
    sequence: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint that shrinks after its header was read: caught at read time, nothing left."""
    from ema_cli.formats import safetensors as st

    real_read = st.SafetensorsReader.read

    def failing_read(self, name, start=0, stop=None, out=None):  # type: ignore[no-untyped-def]
        if self.path.name == "ckpt-5.safetensors" and name == "emb.weight":
            raise st.TruncatedCheckpointError(
                self.path, "truncated: the file ended while reading this tensor", tensor=name
            )
        return real_read(self, name, start, stop, out)

    monkeypatch.setattr(st.SafetensorsReader, "read", failing_read)
    result = average(*sequence, "-o", tmp_path / "o.safetensors", "--decay", "0.9")
    assert_fails(result, "ckpt-5.safetensors", "'emb.weight'", "truncated")
    assert not any(
        p.name.startswith(".o.safetensors") or p.name.startswith("o.") for p in tmp_path.iterdir()
    )


def test_unexpected_errors_exit_1_with_a_short_message(
    sequence: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ema_cli import replay

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("kaboom")

    monkeypatch.setattr(replay._Replayer, "run", boom)
    monkeypatch.delenv("EMA_CLI_DEBUG", raising=False)
    result = average(*sequence, "-o", tmp_path / "o.safetensors", "--decay", "0.9")
    assert result.exit_code == 1
    assert "internal error: RuntimeError: kaboom" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o.safetensors").exists()
    monkeypatch.setenv("EMA_CLI_DEBUG", "1")
    result = average(*sequence, "-o", tmp_path / "o.safetensors", "--decay", "0.9")
    assert result.exit_code == 1 and "Traceback" in result.stderr


def test_errors_from_a_real_process_have_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ema_cli",
            "average",
            str(tmp_path / "ckpt-1.safetensors"),
            "-o",
            str(tmp_path / "o.safetensors"),
            "--decay",
            "0.9",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr
        == f"ema-cli: error: {tmp_path / 'ckpt-1.safetensors'}: no such file or directory\n"
    )
    assert proc.stdout == ""


def test_a_full_disk_is_one_line_and_leaves_nothing(
    sequence: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from ema_cli.formats import safetensors as st

    def full(*args: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(st.os, "pwrite", full)
    out = tmp_path / "o.safetensors"
    assert_fails(
        average(*sequence, "-o", out, "--decay", "0.9"),
        str(out),
        "cannot write: No space left on device",
    )
    assert not any(p.name.startswith(".o.") for p in tmp_path.iterdir())


def test_sigterm_removes_the_temporary_output(sequence: list[Path], tmp_path: Path) -> None:
    """A terminated run (cron timeouts, CI cancels) cleans up and exits 143."""
    script = (
        "import os, signal, sys\n"
        "from ema_cli import replay\n"
        "real = replay._Replayer.run\n"
        "def slow(self, block):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(self, block)\n"
        "replay._Replayer.run = slow\n"
        "from ema_cli.cli import cli\n"
        "cli.main(sys.argv[1:])\n"
    )
    out = tmp_path / "o.safetensors"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            "average",
            *map(str, sequence),
            "-o",
            str(out),
            "--decay",
            "0.9",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr == "ema-cli: terminated; nothing was written\n"
    assert not any(p.name.startswith((".o.", "o.")) for p in tmp_path.iterdir())


def test_fsync_only_when_asked_or_with_state(
    sequence: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    runs = [
        ([], False),
        (["--fsync"], True),
        (["--state", tmp_path / "s1", "--settle", "0"], True),
        (["--state", tmp_path / "s2", "--settle", "0", "--no-fsync"], False),
    ]
    for i, (options, flushed) in enumerate(runs):
        calls.clear()
        out = tmp_path / f"o{i}.safetensors"
        assert average(*sequence, "-o", out, "--decay", "0.9", "-q", *options).exit_code == 0
        assert bool(calls) is flushed, options


def test_a_missing_file_is_reported_before_its_missing_step(tmp_path: Path) -> None:
    missing = tmp_path / "final.safetensors"
    assert_fails(
        average(missing, "-o", tmp_path / "o.safetensors", "--decay", "0.9"),
        f"{missing}: no such file",
    )
    folder = tmp_path / "run"
    for step in (1, 2):
        write_checkpoint(folder / f"ckpt-{step}.safetensors", {"w": np.ones(1, np.float32)})
    assert_fails(
        average(folder, "-o", tmp_path / "o.safetensors", "--decay", "0.9"),
        "holds 2 checkpoint files",
        f"all of them with {folder}/*.safetensors",
    )


def test_names_both_keeps_raw_tensors_beside_their_shadows(
    sequence: list[Path], tmp_path: Path
) -> None:
    both, original = tmp_path / "both.safetensors", tmp_path / "original.safetensors"
    assert (
        run_cli(["average", *sequence, "-o", both, "--decay", "0.9", "--names", "both"]).exit_code
        == 0
    )
    assert run_cli(["average", *sequence, "-o", original, "--decay", "0.9"]).exit_code == 0
    got, averaged, last = load(both), load(original), load(sequence[1])  # step 10 is the last
    assert set(got) == set(last) | {
        f"{n}/ExponentialMovingAverage" for n in ("dense/kernel", "dense/bias", "emb.weight")
    }
    for name in ("dense/kernel", "dense/bias", "emb.weight"):
        assert got[name].tobytes() == last[name].tobytes()
        assert got[f"{name}/ExponentialMovingAverage"].tobytes() == averaged[name].tobytes()
    assert got["global_step"].tobytes() == last["global_step"].tobytes()
