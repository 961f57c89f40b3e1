"""numpy .npz archives: streaming reads of stored, deflated and Fortran-ordered members; writes
that np.load reads and that are byte-identical run to run; errors."""

from __future__ import annotations

import random
import re
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from ema_cli.checkpoint import TensorInfo
from ema_cli.errors import CheckpointError, OptionError, TruncatedCheckpointError
from ema_cli.formats import create_writer, npz
from ema_cli.formats.npz import NpzReader, NpzWriter
from tests.conftest import assert_fails, infos, load, load_npz, run_cli, write_checkpoint

BF16 = np.dtype(ml_dtypes.bfloat16)


def sample(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "dense/kernel": rng.standard_normal((7, 5)).astype(np.float32),
        "dense/bias": rng.standard_normal(5).astype(np.float64),
        "emb": rng.standard_normal((3, 4)).astype(BF16),
        "half": rng.standard_normal((2, 3, 4)).astype(np.float16),
        "big_endian": rng.standard_normal(6).astype(">f4"),
        "fortran": np.asfortranarray(rng.standard_normal((4, 6)).astype(np.float32)),
        "fortran_bf16": np.asfortranarray(rng.standard_normal((3, 5)).astype(BF16)),
        "step": np.array(12, dtype=np.int64),
        "mask": np.array([True, False]),
        "empty": np.zeros((0, 2), np.float32),
    }


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_reads_what_numpy_writes_block_by_block(tmp_path: Path, save) -> None:  # type: ignore[no-untyped-def]
    arrays = sample()
    path = tmp_path / "a.npz"
    save(path, **arrays)
    with NpzReader(path) as reader:
        assert list(reader.tensors) == list(arrays)
        assert reader.non_tensors == []
        for name, value in arrays.items():
            info = reader.tensors[name]
            assert info.dtype == value.dtype.newbyteorder("=") and info.shape == value.shape
            flat = np.ascontiguousarray(value).reshape(-1)
            got = [reader.read(name, s, min(s + 3, flat.size)) for s in range(0, flat.size, 3)]
            joined = np.concatenate(got) if got else reader.read(name)
            assert joined.tobytes() == flat.astype(info.dtype).tobytes(), name


def test_deflated_members_read_in_any_block_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out-of-order blocks are served from the look-back window, or restart the stream."""
    monkeypatch.setattr(npz, "INFLATE_WINDOW_BYTES", 64)
    value = np.arange(1000, dtype=np.float64)
    path = tmp_path / "c.npz"
    np.savez_compressed(path, x=value)
    blocks = [(s, min(s + 7, 1000)) for s in range(0, 1000, 7)]
    random.Random(1).shuffle(blocks)
    with NpzReader(path) as reader:
        for start, stop in blocks:
            assert np.array_equal(reader.read("x", start, stop), value[start:stop])


def test_a_deflated_member_frees_its_window_after_its_last_block(tmp_path: Path) -> None:
    """Memory stays at a block, not a model: a finished member keeps no decompressor."""
    path = tmp_path / "c.npz"
    np.savez_compressed(path, a=np.arange(100.0), b=np.arange(50.0))
    with NpzReader(path) as reader:
        reader.read("a", 0, 60)
        assert reader._members["a"].inflater is not None  # mid-tensor: kept for the next block
        reader.read("a", 60, 100)
        reader.read("b")
        assert all(m.inflater is None for m in reader._members.values())
        assert np.array_equal(reader.read("a", 10, 20), np.arange(10.0, 20.0))  # reopened


def test_members_that_are_not_tensors(tmp_path: Path) -> None:
    path = tmp_path / "mixed.npz"
    np.savez(
        path,
        w=np.ones(3, np.float32),
        labels=np.array(["a", "bc"]),
        config=np.array({"lr": 0.1}, dtype=object),
        raw=np.zeros(2, dtype="V3"),
    )
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("README.txt", "notes")
    with NpzReader(path) as reader:
        assert list(reader.tensors) == ["w"]
        assert reader.non_tensors == [
            "array 'labels' (dtype <U2, not a tensor)",
            "array 'config' (Python objects, not a tensor)",
            "array 'raw' (dtype |V3, not a tensor)",
            "zip member 'README.txt' (not a .npy array)",
        ]


def write(path: Path, arrays: dict[str, np.ndarray], template: NpzReader | None = None) -> None:
    blocks = [
        (name, s, np.ascontiguousarray(v).astype(v.dtype.newbyteorder("=")).reshape(-1)[s : s + 4])
        for name, v in arrays.items()
        for s in range(0, max(v.size, 1), 4)
    ]
    random.Random(0).shuffle(blocks)
    with NpzWriter(path, infos(arrays), {"ignored": "yes"}, template) as writer:
        for name, start, values in blocks:
            writer.write(name, start, values)
        writer.commit()


def test_written_archives_load_in_numpy_and_are_deterministic(tmp_path: Path) -> None:
    arrays = sample()
    write(tmp_path / "a.npz", arrays)
    write(tmp_path / "b.npz", arrays)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    loaded = load_npz(tmp_path / "a.npz")
    assert list(loaded) == list(arrays)
    for name, value in arrays.items():
        got = loaded[name]
        if value.dtype == BF16:
            assert got.dtype == np.dtype("V2")  # what np.save itself writes for bfloat16
            got = got.view(BF16)
        assert np.array_equal(got, value), name
    with zipfile.ZipFile(tmp_path / "a.npz") as z:
        assert {i.date_time for i in z.infolist()} == {npz.FIXED_DATE_TIME}
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_STORED}
    with NpzReader(tmp_path / "a.npz") as reader:
        assert reader.tensors["emb"].dtype == BF16  # round trip keeps the kind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.npz"]


def test_template_order_compression_and_other_members_are_kept(tmp_path: Path) -> None:
    template = tmp_path / "t.npz"
    np.savez_compressed(template, b=np.ones(3, np.float32), labels=np.array(["x"]), a=np.zeros(2))
    with zipfile.ZipFile(template, "a") as z:
        z.writestr("notes.txt", "hello")
    new = {"a": np.full(2, 5.0), "b": np.full(3, 7, np.float32)}
    with NpzReader(template) as reader:
        write(tmp_path / "o.npz", new, reader)
    with zipfile.ZipFile(tmp_path / "o.npz") as out, zipfile.ZipFile(template) as tpl:
        assert out.namelist() == tpl.namelist()
        assert [i.compress_type for i in out.infolist()] == [
            i.compress_type for i in tpl.infolist()
        ]
        assert out.read("notes.txt") == b"hello"
        assert out.read("labels.npy") == tpl.read("labels.npy")
    loaded = load_npz(tmp_path / "o.npz")
    assert loaded["a"].tolist() == [5.0, 5.0] and loaded["b"].tolist() == [7.0] * 3


def test_dtypes_npz_cannot_mark_are_refused(tmp_path: Path) -> None:
    fp8 = TensorInfo("scale", np.dtype(ml_dtypes.float8_e4m3fn), (2,))
    with pytest.raises(
        OptionError, match=re.escape("tensor 'scale' is float8_e4m3fn, which .npz cannot mark")
    ):
        create_writer(tmp_path / "o.npz", [fp8], {})  # check_writer refuses it, before any file
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- errors


def test_reader_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.npz"
    np.savez(good, w=np.arange(100, dtype=np.float32))
    data = good.read_bytes()
    cases = {
        "missing.npz": (None, CheckpointError, "no such file"),
        "empty.npz": (b"", TruncatedCheckpointError, "truncated: empty"),
        "cut.npz": (data[:-30], TruncatedCheckpointError, "zip directory at its end is missing"),
        "text.npz": (b"hello world" * 20, CheckpointError, "not an npz file (not a zip archive"),
    }
    for name, (content, error, message) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(error, match=re.escape(message)):
            NpzReader(path)
    bad_header = tmp_path / "header.npz"
    with zipfile.ZipFile(bad_header, "w") as z:
        z.writestr("w.npy", b"\x93NUMPY\x01\x00" + b"\x10\x00" + b"{'descr': nope}\n")
    with pytest.raises(CheckpointError, match=re.escape("tensor 'w': corrupt .npy header")):
        NpzReader(bad_header)
    short = tmp_path / "short.npz"
    header = npz.npy_header(TensorInfo("w", np.dtype(np.float32), (10,)))
    with zipfile.ZipFile(short, "w") as z:
        z.writestr("w.npy", header + b"\0" * 8)
    with pytest.raises(
        CheckpointError, match=r"tensor 'w': corrupt: shape \[10\] of float32 needs 40"
    ):
        NpzReader(short)


def npz_sequence(tmp_path: Path) -> list[Path]:
    paths = []
    for step in (1, 2, 3):
        path = tmp_path / f"ckpt-{step}.npz"
        np.savez(path, w=np.full(4, step, np.float32), step=np.array(step))
        paths.append(path)
    return paths


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "truncated: empty, not an npz file"),
        (b"PK\x03\x04" + b"\0" * 40, "truncated npz file"),
        (b"\x89HDF\r\n\x1a\n", "not an npz file"),
    ],
)
def test_bad_npz_in_a_replay_exits_2(tmp_path: Path, content: bytes, message: str) -> None:
    bad = tmp_path / "ckpt-7.npz"
    bad.write_bytes(content)
    out = tmp_path / "o.npz"
    assert_fails(
        run_cli(["average", *npz_sequence(tmp_path), bad, "-o", out, "--decay", "0.9"]),
        str(bad),
        message,
    )
    assert not out.exists()


def test_a_compression_zipfile_cannot_read_exits_2(tmp_path: Path) -> None:
    """Deflate64 (method 9), as some Windows zip tools write: one line, not a traceback."""
    bad = tmp_path / "ckpt-7.npz"
    np.savez_compressed(bad, w=np.full(4, 7, np.float32), step=np.array(7))
    data = bytearray(bad.read_bytes())
    for signature, at in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        i = data.find(signature)
        while i >= 0:
            data[i + at : i + at + 2] = (9).to_bytes(2, "little")
            i = data.find(signature, i + 4)
    bad.write_bytes(bytes(data))
    out = tmp_path / "o.npz"
    assert_fails(
        run_cli(["average", *npz_sequence(tmp_path), bad, "-o", out, "--decay", "0.9"]),
        str(bad),
        "not supported",
    )
    assert not out.exists()


def test_npz_in_npz_out_and_conversions(tmp_path: Path) -> None:
    paths = npz_sequence(tmp_path)
    out = tmp_path / "ema.npz"
    result = run_cli(["average", *paths, "-o", out, "--decay", "0.5", "-q"])
    assert result.exit_code == 0, result.output
    c = np.float32(0.5)
    s = np.float32(1)
    for x in (1, 2, 3):
        s = s - (s - np.float32(x)) * c
    loaded = load_npz(out)
    assert loaded["w"].tolist() == [s] * 4 and loaded["step"] == 3
    result = run_cli(
        ["average", *paths, "-o", tmp_path / "ema.safetensors", "--decay", "0.5", "-q"]
    )
    assert result.exit_code == 0, result.output
    assert load(tmp_path / "ema.safetensors")["w"].tolist() == [s] * 4
    # safetensors in, npz out: bfloat16 lands as numpy's <V2
    st = [
        write_checkpoint(tmp_path / "st" / f"ckpt-{k}.safetensors", {"e": np.full(2, k, BF16)})
        for k in (1, 2)
    ]
    result = run_cli(["average", *st, "-o", tmp_path / "st.npz", "--decay", "0.5", "-q"])
    assert result.exit_code == 0, result.output
    assert load_npz(tmp_path / "st.npz")["e"].view(BF16).tolist() == [1.5, 1.5]


def test_npz_with_objects_refuses_conversion_but_averages_to_npz(tmp_path: Path) -> None:
    paths = []
    for step in (1, 2):
        path = tmp_path / f"ckpt-{step}.npz"
        np.savez(path, w=np.full(2, step, np.float32), meta=np.array({"a": 1}, dtype=object))
        paths.append(path)
    result = run_cli(["average", *paths, "-o", tmp_path / "o.safetensors", "--decay", "0.9"])
    assert_fails(result, "holds array 'meta' (Python objects, not a tensor)", "write a .npz output")
    result = run_cli(["average", *paths, "-o", tmp_path / "o.npz", "--decay", "0.9", "-q"])
    assert result.exit_code == 0, result.output
    with zipfile.ZipFile(tmp_path / "o.npz") as out, zipfile.ZipFile(paths[-1]) as last:
        assert out.read("meta.npy") == last.read("meta.npy")
