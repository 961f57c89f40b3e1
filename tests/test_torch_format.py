"""torch zip checkpoints: the restricted unpickler, the reader and the writer.

Fixtures are made by torch itself (``tests/fixtures/torch/make_torch_fixtures.py``); the tests
that call ``torch.load`` on our output run only where torch is installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from ema_cli.checkpoint import TensorInfo
from ema_cli.errors import CheckpointError
from ema_cli.formats import torch_zip
from ema_cli.formats.torch_pickle import TorchSize, numpy_dtype, tensor_of
from ema_cli.formats.torch_zip import (
    TorchZipReader,
    TorchZipWriter,
    flat_structure,
)

FIXTURES = Path(__file__).parent / "fixtures" / "torch"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
TORCH_FILES = sorted(EXPECTED)
MARKER = Path("/tmp/ema-cli-torch-fixture-pwned")
HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")


def expected_tensors(name: str) -> dict[str, tuple[str, list[int], bytes]]:
    with np.load(FIXTURES / "expected" / f"{name}.npz") as z:
        return {
            str(n): (str(d), json.loads(str(s)), z[f"data_{i}"].tobytes())
            for i, (n, d, s) in enumerate(zip(z["names"], z["dtypes"], z["shapes"], strict=True))
        }


def read_all(reader: TorchZipReader) -> dict[str, np.ndarray[Any, Any]]:
    return {name: reader.read(name) for name in reader.tensors}


def blocks(reader: TorchZipReader, seed: int, size: int = 5) -> Iterator[tuple[str, int, int]]:
    """Every tensor in blocks of ``size`` elements, shuffled."""
    work = [
        (name, start, min(start + size, info.size))
        for name, info in reader.tensors.items()
        for start in range(0, max(info.size, 1), size)
    ]
    random.Random(seed).shuffle(work)
    yield from work


def write_from(reader: TorchZipReader, out: Path, values: dict[str, Any] | None = None) -> None:
    """Write ``out`` with ``reader`` as template, blocks shuffled and from two threads."""
    values = values if values is not None else read_all(reader)
    writer = TorchZipWriter(out, list(reader.tensors.values()), {}, template=reader)
    with writer, ThreadPoolExecutor(2) as pool:
        list(
            pool.map(
                lambda b: writer.write(b[0], b[1], values[b[0]][b[1] : b[2]]), blocks(reader, 1)
            )
        )
        writer.commit(durable=False)


def plain(value: Any) -> Any:
    """A structure with tensors replaced by their name-free description, for comparison."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not isinstance(value, TorchSize):
        return [plain(v) for v in value]
    if hasattr(value, "storage") or hasattr(value, "data"):
        record = tensor_of(value)
        return ("tensor", record.dtype, tuple(record.size), tuple(record.stride))
    return value


# ---------------------------------------------------------------- reading


@pytest.mark.parametrize("name", TORCH_FILES)
def test_fixture_values_names_and_ties(name: str) -> None:
    want = expected_tensors(name)
    with TorchZipReader(FIXTURES / name) as reader:
        assert list(reader.tensors) == EXPECTED[name]["names"] == list(want)
        for tensor, (dtype, shape, raw) in want.items():
            info = reader.tensors[tensor]
            assert info.dtype == numpy_dtype(dtype)
            assert list(info.shape) == shape
            assert reader.read(tensor).tobytes() == raw, tensor
        shared = sorted(list(names) for names in reader.shared_storages.values())
        assert shared == EXPECTED[name]["shared"]


def test_plain_state_dict_names_and_views() -> None:
    with TorchZipReader(FIXTURES / "ckpt-2.pt") as reader:
        assert reader.optimizer_prefixes == ()
        assert reader.non_tensors == []
        assert reader.tensors["norm.num_batches_tracked"].dtype == np.int64
        assert reader.tensors["bf16.weight"].dtype == ml_dtypes.bfloat16
        assert reader.tensors["f16.weight"].dtype == np.float16
        transposed = reader.read("extra.transposed").reshape(8, 8)
        assert np.array_equal(transposed, reader.read("proj.weight").reshape(8, 8).T)
        assert list(reader.read("extra.slice")) == [6.0, 8.0, 10.0, 12.0]
        assert reader.file_offset("extra.transposed", 0) is None
        offset = reader.file_offset("extra.slice", 1)
        assert offset is not None
        with open(FIXTURES / "ckpt-2.pt", "rb") as f:
            f.seek(offset)
            assert np.frombuffer(f.read(4), "<f4")[0] == 8.0


@pytest.mark.parametrize("cache", [True, False])
def test_partial_reads_of_views(cache: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not cache:  # the windowed gather, for views too large to keep
        monkeypatch.setattr(torch_zip, "STRIDED_CACHE_BYTES", 0)
        monkeypatch.setattr(torch_zip, "WINDOW_BYTES", 64)
    with TorchZipReader(FIXTURES / "ckpt-3.pt") as reader:
        for name, info in reader.tensors.items():
            whole = reader.read(name)
            for start in range(0, info.size, 7):
                stop = min(info.size, start + 11)
                out = np.empty(stop - start, dtype=info.dtype)
                assert reader.read(name, start, stop, out) is out
                assert out.tobytes() == whole[start:stop].tobytes(), name


def test_lightning_names_and_optimizer_state() -> None:
    with TorchZipReader(FIXTURES / "epoch=0-step=4.ckpt") as reader:
        names = list(reader.tensors)
        assert "state_dict/model.embed.weight" in names
        assert "optimizer_states/0/state/0/exp_avg" in names
        assert "optimizer_states/0/state/0/step" in names
        assert reader.optimizer_prefixes == ("optimizer_states/",)
        optimizer = [n for n in names if reader.is_optimizer_state(n)]
        assert optimizer and all(n.startswith("optimizer_states/0/state/") for n in optimizer)
        assert all(n.startswith("state_dict/") for n in names if n not in optimizer)
        root = reader.structure.root
        assert root["global_step"] == 4 and root["epoch"] == 0
        values = EXPECTED["epoch=0-step=4.ckpt"]["values"]
        assert root["hyper_parameters"]["betas"] == (0.9, 0.999)
        assert json.loads(json.dumps(root["hyper_parameters"])) == values["hyper_parameters"]
        assert root["lr_schedulers"] == values["lr_schedulers"]
        assert "value 'hyper_parameters' (dict of 6)" in reader.non_tensors


def test_names_escape_the_separator(tmp_path: Path) -> None:
    structure = flat_structure([TensorInfo("w", np.dtype("<f4"), (2,))])
    record = structure.tensors["w"]
    root = {"a/b": {"c~d": [record]}, "n": 3}
    out = tmp_path / "nested.pt"
    torch_zip.write_torch_checkpoint(
        out,
        torch_zip.TorchStructure(root, {"x": record}),
        {"x": np.array([1, 2], "<f4")},
    )
    with TorchZipReader(out) as reader:
        assert list(reader.tensors) == ["a~1b/c~0d/0"]
        assert list(reader.read("a~1b/c~0d/0")) == [1.0, 2.0]


# ---------------------------------------------------------------- hostile and broken input


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("os_system.pt", "refusing to load 'posix.system': not tensor data"),
        ("eval.pt", "refusing to load 'builtins.eval': not tensor data"),
        ("exec.pt", "refusing to load 'builtins.exec': not tensor data"),
        ("getattr.pt", "refusing to load 'builtins.getattr': not tensor data"),
        ("nested_pickle.pt", "refusing to load 'pickle.loads': not tensor data"),
        ("memo_bomb.pt", "a pickle bomb"),
        ("nesting_tuples.pt", "nested deeper than 100 levels"),
        ("nesting_marks.pt", "nested MARKs"),
        ("oversized_storage.pt", "should hold 4000000000000 bytes but its zip member holds 16"),
    ],
)
def test_hostile_pickles_are_refused(name: str, says: str) -> None:
    MARKER.unlink(missing_ok=True)
    path = FIXTURES / "hostile" / name
    with pytest.raises(CheckpointError) as caught:
        TorchZipReader(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert says in message
    assert not MARKER.exists()


def test_valid_handmade_zip_reads() -> None:
    with TorchZipReader(FIXTURES / "hostile" / "valid_small.pt") as reader:
        assert list(reader.read("w")) == [1.0, 2.0, 3.0, 4.0]


def test_legacy_file_says_how_to_resave() -> None:
    with pytest.raises(
        CheckpointError, match=r"legacy \(pre-1.6\).*torch.save\(torch.load\(f\), f2\)"
    ):
        TorchZipReader(FIXTURES / "legacy.pt")


def rewrite(source: Path, target: Path, change: Any) -> None:
    with zipfile.ZipFile(source) as z, zipfile.ZipFile(target, "w") as out:
        for info in z.infolist():
            data = z.read(info)
            info, data = change(info, data)
            out.writestr(info, data)


def test_compressed_storage_and_big_endian_are_refused(tmp_path: Path) -> None:
    def deflate(info: zipfile.ZipInfo, data: bytes) -> tuple[zipfile.ZipInfo, bytes]:
        if "/data/" in info.filename:
            info.compress_type = zipfile.ZIP_DEFLATED
        return info, data

    def big(info: zipfile.ZipInfo, data: bytes) -> tuple[zipfile.ZipInfo, bytes]:
        return info, b"big" if info.filename.endswith("/byteorder") else data

    rewrite(FIXTURES / "ckpt-1.pt", tmp_path / "deflated.pt", deflate)
    with pytest.raises(CheckpointError, match="compressed"):
        TorchZipReader(tmp_path / "deflated.pt")
    rewrite(FIXTURES / "ckpt-1.pt", tmp_path / "big.pt", big)
    with pytest.raises(CheckpointError, match="big-endian"):
        TorchZipReader(tmp_path / "big.pt")


def _open_and_read(path: Path) -> None:
    with TorchZipReader(path) as reader:
        for name in reader.tensors:
            reader.read(name)


@pytest.mark.parametrize("name", ["ckpt-1.pt", "epoch=0-step=2.ckpt"])
def test_truncations_and_byte_flips_give_checkpoint_errors_only(name: str, tmp_path: Path) -> None:
    original = (FIXTURES / name).read_bytes()
    rng = random.Random(12)
    broken = tmp_path / name
    cases = [original[:n] for n in (0, 1, 30, len(original) // 2, len(original) - 1)]
    cases += [original[: rng.randrange(len(original))] for _ in range(20)]
    pickle_start = original.index(b"\x80\x02")
    for _ in range(150):
        data = bytearray(original)
        where = rng.randrange(pickle_start, pickle_start + 800) if rng.random() < 0.6 else None
        for _ in range(rng.randint(1, 3)):
            at = where if where is not None else rng.randrange(len(data))
            data[at] = rng.randrange(256)
        cases.append(bytes(data))
    errors = 0
    for case in cases:
        broken.write_bytes(case)
        try:
            _open_and_read(broken)
        except CheckpointError as e:
            assert "\n" not in str(e)
            errors += 1
    assert errors >= 25


# ---------------------------------------------------------------- writing

ALL_DTYPES = [
    "float16",
    "float32",
    "float64",
    "bfloat16",
    "float8_e4m3fn",
    "float8_e5m2",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
    "complex64",
    "complex128",
]


def sample(dtype: np.dtype[Any], shape: tuple[int, ...], seed: int) -> np.ndarray[Any, Any]:
    raw = np.random.default_rng(seed).integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize)
    values = raw.astype(np.uint8).view(dtype)
    if dtype == np.bool_:
        values = raw.astype(np.uint8)[: int(np.prod(shape))].astype(bool)
    return values.reshape(-1)


def write_flat(path: Path, tensors: list[TensorInfo], arrays: dict[str, Any]) -> None:
    writer = TorchZipWriter(path, tensors, {})
    with writer:
        for info in tensors:
            for start in reversed(range(0, max(info.size, 1), 3)):
                writer.write(info.name, start, arrays[info.name][start : start + 3])
        writer.commit(durable=False)


def flat_case() -> tuple[list[TensorInfo], dict[str, Any]]:
    tensors = [
        TensorInfo(f"t.{d}", numpy_dtype(d), (3, 4) if i % 2 else (5,))
        for i, d in enumerate(ALL_DTYPES)
    ]
    tensors.append(TensorInfo("empty", np.dtype("<f4"), (0, 3)))
    tensors.append(TensorInfo("scalar", np.dtype("<f8"), ()))
    arrays = {t.name: sample(t.dtype, t.shape, i) for i, t in enumerate(tensors)}
    return tensors, arrays


def test_every_dtype_round_trips(tmp_path: Path) -> None:
    tensors, arrays = flat_case()
    write_flat(tmp_path / "all.pt", tensors, arrays)
    with TorchZipReader(tmp_path / "all.pt") as reader:
        assert list(reader.tensors.values()) == tensors
        for info in tensors:
            assert reader.read(info.name).tobytes() == arrays[info.name].tobytes(), info.name


@pytest.mark.parametrize("name", TORCH_FILES)
def test_template_round_trip_is_exact_and_deterministic(name: str, tmp_path: Path) -> None:
    with TorchZipReader(FIXTURES / name) as reader:
        write_from(reader, tmp_path / "a.pt")
        write_from(reader, tmp_path / "b.pt")
        original = read_all(reader)
        with TorchZipReader(tmp_path / "a.pt") as copy:
            assert list(copy.tensors.values()) == list(reader.tensors.values())
            for tensor, values in original.items():
                assert copy.read(tensor).tobytes() == values.tobytes(), tensor
            assert plain(copy.structure.root) == plain(reader.structure.root)
            assert dict(copy.shared_storages).values().__len__() == len(reader.shared_storages)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    with zipfile.ZipFile(tmp_path / "a.pt") as z:
        assert z.testzip() is None  # every CRC right
        names = z.namelist()
        assert names[:4] == [
            "archive/data.pkl",
            "archive/.format_version",
            "archive/.storage_alignment",
            "archive/byteorder",
        ]
        assert names[-1] == "archive/version"
        with open(tmp_path / "a.pt", "rb") as raw:
            for info in z.infolist():
                assert info.compress_type == zipfile.ZIP_STORED
                assert torch_zip.stored_data_offset(raw, info) % 64 == 0


def test_tied_tensors_given_different_values_are_refused(tmp_path: Path) -> None:
    with TorchZipReader(FIXTURES / "ckpt-1.pt") as reader:
        values = read_all(reader)
        values["head.weight"] = values["head.weight"] + np.float32(1)
        with pytest.raises(
            CheckpointError,
            match=r"tensor '(embed|head)\.weight': shares storage with '(head|embed)\.weight'",
        ):
            write_from(reader, tmp_path / "tied.pt", values)
    assert not list(tmp_path.iterdir())


def test_storage_bytes_no_tensor_covers_are_kept(tmp_path: Path) -> None:
    with TorchZipReader(FIXTURES / "ckpt-3.pt") as reader:
        values = read_all(reader)
        values["extra.slice"] = values["extra.slice"] + np.float32(100)
        write_from(reader, tmp_path / "out.pt", values)
    with zipfile.ZipFile(tmp_path / "out.pt") as z:
        storage = np.frombuffer(z.read(z.namelist()[-2]), "<f4")  # the last storage
    assert list(storage) == [0, 3, 6, 109, 112, 115, 118, 21, 24, 27]


def test_zip64_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_zip, "ZIP64_LIMIT", 40)
    tensors, arrays = flat_case()
    write_flat(tmp_path / "zip64.pt", tensors, arrays)
    with TorchZipReader(tmp_path / "zip64.pt") as reader:
        for info in tensors:
            assert reader.read(info.name).tobytes() == arrays[info.name].tobytes()
    with zipfile.ZipFile(tmp_path / "zip64.pt") as z:
        assert z.testzip() is None


def test_low_level_writer_on_a_file_descriptor(tmp_path: Path) -> None:
    tensors, arrays = flat_case()
    structure = flat_structure(tensors)
    fd = os.open(tmp_path / "fd.pt", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        torch_zip.write_torch_checkpoint(fd, structure, arrays)
    finally:
        os.close(fd)
    write_flat(tmp_path / "path.pt", tensors, arrays)
    assert (tmp_path / "fd.pt").read_bytes() == (tmp_path / "path.pt").read_bytes()


# ---------------------------------------------------------------- torch.load of our output


@needs_torch
@pytest.mark.parametrize("name", TORCH_FILES)
def test_torch_loads_our_output(name: str, tmp_path: Path) -> None:
    import torch

    with TorchZipReader(FIXTURES / name) as reader:
        write_from(reader, tmp_path / "out.pt")
    theirs = torch.load(FIXTURES / name, weights_only=True)
    ours = torch.load(tmp_path / "out.pt", weights_only=True)

    def same(a: Any, b: Any) -> None:
        assert type(a) is type(b)
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        elif isinstance(a, dict):
            assert list(a) == list(b)
            for k in a:
                same(a[k], b[k])
            assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None)
        elif isinstance(a, (list, tuple)):
            assert len(a) == len(b)
            for x, y in zip(a, b, strict=True):
                same(x, y)
        else:
            assert a == b

    same(theirs, ours)
    sd = ours.get("state_dict", ours)
    prefix = "model." if "state_dict" in ours else ""
    if f"{prefix}head.weight" in sd:
        assert sd[f"{prefix}head.weight"].data_ptr() == sd[f"{prefix}embed.weight"].data_ptr()
    if "extra.transposed" in sd:
        assert sd["extra.transposed"].untyped_storage().data_ptr() == (
            sd["proj.weight"].untyped_storage().data_ptr()
        )


@needs_torch
@pytest.mark.parametrize("zip64", [False, True])
def test_torch_loads_every_dtype(
    zip64: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    if zip64:
        monkeypatch.setattr(torch_zip, "ZIP64_LIMIT", 40)
    tensors, arrays = flat_case()
    write_flat(tmp_path / "all.pt", tensors, arrays)
    loaded = torch.load(tmp_path / "all.pt", weights_only=True)
    assert list(loaded) == [t.name for t in tensors]
    for info in tensors:
        tensor = loaded[info.name]
        torch_name = str(tensor.dtype).removeprefix("torch.")
        assert numpy_dtype(torch_name) == info.dtype
        assert tuple(tensor.shape) == info.shape
        raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert raw == arrays[info.name].tobytes(), info.name
    shutil.rmtree(tmp_path)


def test_readers_of_an_open_file_share_its_scan_and_a_rewritten_file_is_scanned_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replay's workers open every checkpoint again: while a reader of the file is open
    they reuse its unpickled structure; once all are closed, nothing is remembered, so a file
    written again (even under a reused inode) is read afresh."""
    calls: list[str] = []
    real = torch_zip.unpickle

    def counting(path: str, *args: Any) -> Any:
        calls.append(path)
        return real(path, *args)

    monkeypatch.setattr(torch_zip, "unpickle", counting)
    path = tmp_path / "ckpt-1.pt"
    shutil.copyfile(FIXTURES / "ckpt-1.pt", path)
    first = torch_zip.TorchZipReader(path)
    second = torch_zip.TorchZipReader(path)
    assert len(calls) == 1 and second.tensors == first.tensors
    assert second.read("embed.weight").tobytes() == first.read("embed.weight").tobytes()
    first.close()
    second.close()
    assert not torch_zip._SCANS
    shutil.copyfile(FIXTURES / "ckpt-2.pt", path)  # same layout, other values
    with torch_zip.TorchZipReader(path) as again:
        assert len(calls) == 2
        want = torch_zip.TorchZipReader(FIXTURES / "ckpt-2.pt")
        assert again.read("embed.weight").tobytes() == want.read("embed.weight").tobytes()
        want.close()
