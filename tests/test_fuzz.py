"""The mutation fuzzer (tests/fuzz.py): a short fixed-seed campaign, and checks that its
checker does catch what it is there to catch."""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import fuzz

#: A fixed seed: the same cases every run. Long runs use other seeds (README, Development).
SEED = 20261202
CASES = 300


def test_a_short_campaign_keeps_the_contract(tmp_path: Path) -> None:
    campaign = fuzz.run_campaign(SEED, CASES, tmp_path)
    assert campaign.cases == CASES
    assert not campaign.findings, (
        "\n\n".join(map(str, campaign.findings)) + "\n" + campaign.summary()
    )
    # The campaign exercised every format, and mutants both passed and failed: a fuzzer
    # whose every case fails at the first byte would test nothing past it.
    assert set(campaign.statuses) == set(fuzz.FAMILIES), campaign.summary()
    totals: dict[int, int] = {}
    for counts in campaign.statuses.values():
        for status, n in counts.items():
            totals[status] = totals.get(status, 0) + n
    assert totals.get(0, 0) >= CASES // 20 and totals.get(2, 0) >= CASES // 4, totals


def test_cases_are_a_function_of_seed_and_index(tmp_path: Path) -> None:
    seeds = fuzz.Seeds(tmp_path / "seeds")
    made = []
    for attempt in ("a", "b"):
        folder = tmp_path / attempt
        folder.mkdir()
        case = fuzz.make_case(7, 41, seeds, folder, tuple(fuzz.FAMILIES))
        made.append(
            (
                case.family,
                case.mutations,
                [a.replace(str(folder), "") for a in case.args],
                fuzz._tree_digest(case.run),
            )
        )
    assert made[0] == made[1]


def _case(tmp_path: Path) -> tuple[fuzz.Case, dict[str, str], dict[str, str]]:
    seeds = fuzz.Seeds(tmp_path / "seeds")
    folder = tmp_path / "case"
    folder.mkdir()
    case = fuzz.make_case(3, 0, seeds, folder, ("safetensors",))
    (case.out / "ema.mapping.json").write_text("{}")
    return case, fuzz._tree_digest(case.run), fuzz._tree_digest(case.out)


@pytest.mark.parametrize(
    ("status", "stderr", "damage", "problem"),
    [
        (1, "ema-cli: error: internal error: boom\n", None, "exit 1"),
        (None, "", None, "hang"),
        (2, "ema-cli: error: a\nema-cli: error: b\n", None, "2 lines on stderr"),
        (2, "Traceback (most recent call last):\nX\n", None, "a traceback"),
        (0, "Exception ignored in: <x>\n", None, "a traceback"),
        (2, "ema-cli: error: x\n", "output", "changed the output folder"),
        (0, "", "leftover", "left behind"),
        (0, "", "input", "inputs changed"),
    ],
)
def test_the_checker_flags_each_broken_promise(
    tmp_path: Path, status: int | None, stderr: str, damage: str | None, problem: str
) -> None:
    case, before_in, before_out = _case(tmp_path)
    assert fuzz.check(case, fuzz.Outcome(0, "", "", 0.1), before_in, before_out) == []
    if damage == "output":
        (case.out / "ema.mapping.json").write_text('{"changed": 1}')
    elif damage == "leftover":
        (case.out / ".ema.safetensors.abcd1234.tmp").write_bytes(b"")
    elif damage == "input":
        victim = next(p for p in case.run.rglob("*") if p.is_file())
        victim.write_bytes(victim.read_bytes() + b"!")
    outcome = fuzz.Outcome(status, "", stderr, 0.1)
    problems = fuzz.check(case, outcome, before_in, before_out)
    assert any(problem in p for p in problems), problems


def test_the_worker_reports_a_crash_and_carries_on(tmp_path: Path) -> None:
    """A case that kills the in-process worker is a finding, and the next case still runs."""
    worker = fuzz.Worker()
    try:
        # `--version` runs the CLI; the crash is provoked by a request the worker cannot run.
        folder = tmp_path / "c"
        folder.mkdir()
        outcome = worker.run(["--version"], folder)
        assert outcome.status == 0 and "ema-cli" in outcome.stdout
        process = worker._process
        assert process is not None
        process.kill()
        process.wait()
        outcome = worker.run(["--version"], folder)
        assert outcome.crashed or outcome.status == 0
        outcome = worker.run(["--version"], folder)
        assert outcome.status == 0 and not outcome.crashed
    finally:
        worker.close()


def test_mutators_change_their_input_deterministically() -> None:
    data = struct.pack("<Q", 2) + b"{}" + bytes(64)
    for name, mutate in fuzz.MUTATORS.items():
        first = mutate(fuzz._case_rng(5, 1), data)
        again = mutate(fuzz._case_rng(5, 1), data)
        assert first == again, name
    header = json.dumps({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    safetensors_file = struct.pack("<Q", len(header)) + header + bytes(4)
    changed = {
        fuzz.mutate_safetensors(fuzz._case_rng(9, i), safetensors_file)[0] for i in range(40)
    }
    assert safetensors_file not in changed or len(changed) > 30


@pytest.mark.skipif(sys.platform != "linux", reason="the campaign's worker limits use Linux")
def test_the_command_line_runs_one_case(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keep = tmp_path / "keep"
    status = fuzz.main(["--seed", str(SEED), "--case", "3", "--keep", str(keep)])
    out = capsys.readouterr().out
    assert "1 cases in" in out
    assert (keep / "case-3" / "run").is_dir()
    assert status in (0, 1)
    assert os.listdir(keep / "case-3" / "out") is not None


def test_a_sharded_index_with_a_huge_integer_is_one_line(tmp_path: Path) -> None:
    from tests.conftest import assert_fails, average_status

    seeds = fuzz.Seeds(tmp_path / "seeds")
    run = seeds.run(fuzz.FAMILIES["sharded"])
    index = run / "checkpoint-2" / "model.safetensors.index.json"
    text = index.read_text()
    broken = tmp_path / "run"
    import shutil

    shutil.copytree(run, broken)
    (broken / "checkpoint-2" / index.name).write_text(
        text.replace('"total_size": ', '"total_size": ' + "9" * 5000 + ', "x": ', 1)
    )
    status, _, err = average_status(
        broken / "checkpoint-1",
        broken / "checkpoint-2",
        "-o",
        tmp_path / "o.safetensors",
        "--decay",
        "0.9",
    )
    assert status == 2, err
    assert_fails  # noqa: B018 - imported for symmetry with the other tests


# ---------------------------------------------------------------- the findings, fixed


def _st(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def _bad_safetensors(tmp_path: Path, content: bytes) -> tuple[int, str, str]:
    from tests.conftest import average_status, write_checkpoint

    good = write_checkpoint(tmp_path / "ckpt-1.safetensors", {"w": np.zeros(1, np.float32)})
    bad = tmp_path / "ckpt-2.safetensors"
    bad.write_bytes(content)
    return average_status(good, bad, "-o", tmp_path / "out.safetensors", "--decay", "0.9")


W = b'"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'


@pytest.mark.parametrize(
    ("header", "fragments"),
    [
        (
            b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,' + b"9" * 5000 + b"]}}",
            ("corrupt header: an integer of 5000 digits",),
        ),
        (
            b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,' + b"9" * 400 + b"]}}",
            ("an integer of 400 digits",),
        ),
        (b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"," + W + b"}", ("nested too deeply",)),
        (b'{"w\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', ("\\ud800",)),
        (b'{"__metadata__":{"a":"\\udfff"},' + W + b"}", ("__metadata__ entry 'a'",)),
        (b"{" + W + b"," + W + b"}", ("'w' is listed twice",)),
        (b'{"w":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}', ("NaN is not JSON",)),
    ],
    ids=["offsets-5000-digits", "offsets-400-digits", "deep", "surrogate", "meta", "dup", "nan"],
)
def test_safetensors_headers_are_parsed_with_bounds(
    tmp_path: Path, header: bytes, fragments: tuple[str, ...]
) -> None:
    status, _, err = _bad_safetensors(tmp_path, _st(header, bytes(4)))
    assert status == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ema-cli: error: "), err
    assert "ckpt-2.safetensors" in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not (tmp_path / "out.safetensors").exists()


def test_a_name_that_is_not_utf8_is_refused_for_a_safetensors_output(tmp_path: Path) -> None:
    """``--name $'\\xff'`` arrives as a lone surrogate (surrogateescape)."""
    from tests.conftest import assert_fails, run_average, write_checkpoint

    paths = [
        write_checkpoint(tmp_path / f"ckpt-{s}.safetensors", {"w": np.ones(2, np.float32) * s})
        for s in (1, 2)
    ]
    out = tmp_path / "o.safetensors"
    result = run_average(
        *paths, "-o", out, "--decay", "0.9", "--names", "shadow", "--name", "\udcff"
    )
    assert_fails(result, "not valid UTF-8", "\\xff")
    assert not out.exists()


def test_a_400_digit_num_updates_is_a_usage_error(tmp_path: Path) -> None:
    from tests.conftest import assert_fails, run_average, write_checkpoint

    paths = [
        write_checkpoint(tmp_path / f"ckpt-{s}.safetensors", {"w": np.ones(2, np.float32)})
        for s in (1, 2)
    ]
    for digits in (400, 5000, 20):
        result = run_average(
            *paths,
            "-o",
            tmp_path / "o.safetensors",
            "--decay",
            "0.9",
            "--num-updates",
            "9" * digits,
        )
        assert_fails(result, "--num-updates", "too large")


def _npz_with_header(path: Path, edit: bytes) -> None:
    """An npz whose member ``w.npy`` has its header dictionary replaced by ``edit`` (CRCs
    right, so only the header is wrong)."""
    import io
    import zipfile

    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.zeros(3, np.float32))
    data = bytearray(buffer.getvalue())
    at = data.index(b"{'descr'")
    data[at : at + len(edit)] = edit
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("w.npy", bytes(data))
        archive.writestr("b.npy", buffer.getvalue())


@pytest.mark.parametrize(
    "edit",
    [b"{'descr': '<f4', 'fortran_order': False, 'shape': 3,), }", b"\0" * 40],
    ids=["unbalanced", "zeroed"],
)
def test_an_npz_member_with_a_malformed_npy_header_is_one_line(tmp_path: Path, edit: bytes) -> None:
    from tests.conftest import assert_fails, run_average

    bad = tmp_path / "ckpt-1.npz"
    _npz_with_header(bad, edit)
    assert_fails(
        run_average(bad, "-o", tmp_path / "o.npz", "--decay", "0.9"),
        str(bad),
        "corrupt .npy header",
    )


def _set_version_needed(path: Path, version: int) -> None:
    data = bytearray(path.read_bytes())
    for signature, at in ((b"PK\x01\x02", 6), (b"PK\x03\x04", 4)):
        start = 0
        while (i := data.find(signature, start)) >= 0:
            data[i + at : i + at + 2] = struct.pack("<H", version)
            start = i + 4
    path.write_bytes(bytes(data))


def test_a_zip_needing_an_unsupported_version_is_one_line(tmp_path: Path) -> None:
    from tests.conftest import assert_fails, run_average

    bad = tmp_path / "ckpt-1.npz"
    np.savez(bad, w=np.zeros(3, np.float32))
    _set_version_needed(bad, 99)
    assert_fails(run_average(bad, "-o", tmp_path / "o.npz", "--decay", "0.9"), str(bad), "9.9")


def test_a_keras_member_failing_its_crc_is_found_before_the_replay(tmp_path: Path) -> None:
    import shutil

    from tests.conftest import assert_fails, run_average

    source = fuzz.FIXTURES / "keras" / "f32" / "keras"
    paths = []
    for file in sorted(source.glob("*.keras")):
        shutil.copy(file, tmp_path / file.name)
        paths.append(tmp_path / file.name)
    last = paths[-1]
    data = bytearray(last.read_bytes())
    at = data.index(b'"class_name"')  # inside config.json's stored bytes
    data[at + 1] ^= 0x20
    last.write_bytes(bytes(data))
    out = tmp_path / "o.keras"
    started = []
    from ema_cli import replay

    real = replay._Replayer.run

    def spy(self: object, block: object) -> object:
        started.append(1)
        return real(self, block)  # type: ignore[arg-type]

    replay._Replayer.run = spy  # type: ignore[method-assign]
    try:
        assert_fails(
            run_average(*paths, "-o", out, "--decay", "0.9"), str(last), "config.json", "CRC"
        )
    finally:
        replay._Replayer.run = real  # type: ignore[method-assign]
    assert not started and not out.exists()


def test_an_hdf5_link_name_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    import h5py

    from tests.conftest import assert_fails, run_average

    bad = tmp_path / "ckpt-1.weights.h5"
    with h5py.File(bad, "w") as f:
        f.create_dataset("layers/dense/vars/0", data=np.zeros(3, np.float32))
        f["layers"].create_dataset(b"\xff\xfe", data=np.zeros(2, np.float32))
    assert_fails(
        run_average(bad, "-o", tmp_path / "o.weights.h5", "--decay", "0.9"),
        str(bad),
        "\\xff\\xfe",
        "not UTF-8",
    )


def test_a_never_written_huge_optimizer_dataset_is_copied_unwritten(tmp_path: Path) -> None:
    """A (2^40, 2^20) float32 dataset nobody wrote: 4 EiB of fill value, which a block-by-block
    copy would take for ever. It is carried over unwritten to an HDF5 output, and refused with
    one line by other outputs. In a subprocess, so a regression is a timeout, not a hang."""
    import subprocess

    import h5py

    paths = []
    for step in (1, 2):
        path = tmp_path / f"ckpt-{step}.weights.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("layers/dense/vars/0", data=np.full(3, step, np.float32))
            f.create_dataset("optimizer/vars/0", shape=(2**40, 2**20), dtype="f4", chunks=(1, 1024))
        paths.append(path)

    def run(out: Path) -> subprocess.CompletedProcess[str]:
        args = [*map(str, paths), "-o", str(out), "--decay", "0.5", "-q"]
        return subprocess.run(
            [sys.executable, "-m", "ema_cli", "average", *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    out = tmp_path / "o.weights.h5"
    proc = run(out)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size < 1 << 20
    with h5py.File(out) as f:
        assert f["optimizer/vars/0"].shape == (2**40, 2**20)
        assert f["optimizer/vars/0"].id.get_storage_size() == 0
        np.testing.assert_array_equal(f["layers/dense/vars/0"][()], np.full(3, 1.5, np.float32))
    proc = run(tmp_path / "o.safetensors")
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "never written" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("seed", "index", "says"),
    [
        (4242, 517, "libhdf5 crashed (SIGSEGV)"),
        (777, 57, "libhdf5 did not finish reading"),
        (9090, 560, "libhdf5 did not finish reading '/'"),
    ],
    ids=["copy-segfault", "copy-hang", "read-hang"],
)
def test_libhdf5_crashing_or_looping_on_a_template_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int, index: int, says: str
) -> None:
    """Mutants from fresh campaigns on which libhdf5 itself crashes (H5Ocopy of a damaged
    object) or loops for ever (a damaged global heap under a string attribute) while the
    HDF5 writer copies the template or the reader reads an input's attributes: none can be
    caught in-process, so both are rehearsed in a forked child first (formats.hdf5)."""
    from ema_cli.formats import hdf5
    from tests.conftest import assert_fails, run_cli

    monkeypatch.setattr(hdf5, "REHEARSAL_SECONDS", 2.0)
    case = fuzz.make_case(
        seed, index, fuzz.Seeds(tmp_path / "seeds"), tmp_path / "case", tuple(fuzz.FAMILIES)
    )
    before = sorted(p.name for p in case.out.iterdir())
    assert_fails(run_cli(case.args), says)
    assert sorted(p.name for p in case.out.iterdir()) == before
