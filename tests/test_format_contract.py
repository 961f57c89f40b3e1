"""The contract every format keeps, run over ``registry.formats()``: a format added by its
registry line inherits this whole suite.

Writers (every format with a writer): blocks in any order from two threads give the bytes of
in-order writes; an abort (or an exception in the ``with``) leaves nothing at the path and no
temporary beside it, and an existing output survives it byte for byte; every dtype the writer
accepts round-trips, 0-d and empty tensors included; conversions carry or refuse exactly what
the table below says. Readers (every format, read-only ones too, through the files the writers
made): a truncated file, or bytes replaced anywhere, give ``CheckpointError`` or a clean read,
never another exception; bytes replaced inside a tensor's data give ``CheckpointError`` for a
format that checksums its data (``CHECKSUMMED``) and otherwise exactly that element changed.
"""

from __future__ import annotations

import contextlib
import random
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import ml_dtypes
import numpy as np
import pytest

from ema_cli.errors import CheckpointError, OptionError
from ema_cli.formats import (
    CheckpointReader,
    Format,
    check_writer,
    checkpoint_files,
    create_writer,
    open_checkpoint,
    registry,
)
from ema_cli.formats.base import iter_blocks
from tests.conftest import infos, snapshot

WRITABLE = [f for f in registry.formats() if f.writer is not None]

#: Formats whose reader verifies a checksum of the tensor data (none of the writable ones do:
#: safetensors, HDF5 contiguous datasets and stored zip members are read in place, unverified).
CHECKSUMMED: set[str] = {"tensorflow"}  # every tensor's crc32c is checked as it is read
#: Formats that verify small tensors only: an npz member smaller than zipfile's read-ahead
#: (4 KiB) is read to its end, so its CRC-32 checked, when the reader parses its ``.npy``
#: header; a larger member's data is read in place, unverified.
CHECKSUMMED_WHEN_SMALL = {"npz"}

#: Every dtype a checkpoint may hold. The plain ones and bfloat16 every writer must store.
CORE_DTYPES = [
    np.dtype(t)
    for t in (
        np.float16,
        ml_dtypes.bfloat16,
        np.float32,
        np.float64,
        np.int8,
        np.int16,
        np.int32,
        np.int64,
        np.uint8,
        np.uint16,
        np.uint32,
        np.uint64,
        np.bool_,
    )
]
FLOAT8 = {
    name: np.dtype(getattr(ml_dtypes, name))
    for name in (
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e4m3b11fnuz",
    )
}
#: Which float8 kinds each format stores (the rest ``check_writer`` refuses). A format not
#: listed is held to what its ``check_writer`` accepts: those round-trip.
FLOAT8_STORED = {
    "safetensors": {"float8_e4m3fn", "float8_e5m2"},
    "safetensors folder": {"float8_e4m3fn", "float8_e5m2"},
    "keras weights": set(FLOAT8),
    "hdf5": set(FLOAT8),
    "keras": set(FLOAT8),
    "npz": set(),
}


def output_path(fmt: Format, folder: Path) -> Path:
    """Where a test writes this format: its first suffix (a prefix format's main file, as
    ``-o ema.index``), or a bare name for a folder format."""
    return folder / ("out" + (fmt.suffixes[0] if fmt.layout != "folder" else ""))


def keras_template(folder: Path) -> Path:
    """The smallest ``.keras`` archive: a config, metadata and an empty weights file."""
    weights = folder / "empty.weights.h5"
    with h5py.File(weights, "w", track_order=True):
        pass
    archive = folder / "template.keras"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("metadata.json", "{}")
        z.writestr("config.json", "{}")
        z.write(weights, "model.weights.h5")
    weights.unlink()
    return archive


#: Formats whose writer needs a template of its own kind (path maker per format name).
TEMPLATES: dict[str, Callable[[Path], Path]] = {"keras": keras_template}


@pytest.fixture
def opened() -> Iterator[list[CheckpointReader]]:
    readers: list[CheckpointReader] = []
    yield readers
    for reader in readers:
        reader.close()


def template_for(
    fmt: Format, folder: Path, opened: list[CheckpointReader]
) -> CheckpointReader | None:
    maker = TEMPLATES.get(fmt.name)
    if maker is None:
        return None
    folder.mkdir(exist_ok=True)
    reader = open_checkpoint(maker(folder))
    opened.append(reader)
    return reader


def sample(seed: int = 0) -> dict[str, np.ndarray]:
    """A few tensors of several shapes and dtypes, random and distinct bytes."""
    rng = np.random.default_rng(seed)
    return {
        "dense/kernel": rng.standard_normal((7, 5)).astype(np.float32),
        "dense/bias": rng.standard_normal(5).astype(np.float64),
        "emb": rng.standard_normal((3, 4)).astype(ml_dtypes.bfloat16),
        "step": np.array(seed + 7, dtype=np.int64),
        "empty": np.zeros((0, 3), dtype=np.float16),
    }


def blocks(arrays: dict[str, np.ndarray], size: int = 4) -> list[tuple[str, int, np.ndarray]]:
    return [
        (name, start, np.ascontiguousarray(value).reshape(-1)[start:stop])
        for name, value in arrays.items()
        for start, stop in iter_blocks(value.size, size)
    ]


def write(
    fmt: Format,
    path: Path,
    arrays: dict[str, np.ndarray],
    template: CheckpointReader | None,
    order: str = "given",
) -> None:
    """Write ``arrays`` and commit: blocks in order, or shuffled and from two threads."""
    jobs = blocks(arrays)
    with create_writer(
        path, infos(arrays), {"k": "v"}, template, folder_format=fmt.folder_option
    ) as writer:
        if order == "given":
            for job in jobs:
                writer.write(*job)
        else:
            random.Random(1).shuffle(jobs)
            threads = [
                threading.Thread(target=lambda part=part: [writer.write(*j) for j in part])
                for part in (jobs[0::2], jobs[1::2])
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        writer.commit(durable=False)


def read_all(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint at ``path``, by its format's reader, in its shape."""
    with open_checkpoint(path) as reader:
        return {n: reader.read(n).reshape(t.shape) for n, t in reader.tensors.items()}


def files_of(path: Path) -> dict[str, bytes]:
    if path.is_dir():
        return {p.name: p.read_bytes() for p in sorted(path.iterdir())}
    return {path.name: path.read_bytes()}


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want) or set(got) == set(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype, name
        assert got[name].shape == value.shape, name
        assert got[name].tobytes() == value.tobytes(), name


writers = pytest.mark.parametrize("fmt", WRITABLE, ids=[f.name for f in WRITABLE])


# ---------------------------------------------------------------- writers


@writers
def test_blocks_in_any_order_from_two_threads_give_the_same_bytes(
    fmt: Format, tmp_path: Path, opened: list[CheckpointReader]
) -> None:
    template = template_for(fmt, tmp_path / "t", opened)
    arrays = sample()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write(fmt, output_path(fmt, tmp_path / "a"), arrays, template)
    write(fmt, output_path(fmt, tmp_path / "b"), arrays, template, order="shuffled")
    assert files_of(output_path(fmt, tmp_path / "b")) == files_of(output_path(fmt, tmp_path / "a"))
    assert_same(read_all(output_path(fmt, tmp_path / "b")), arrays)


@writers
@pytest.mark.parametrize("how", ["abort", "exception", "no commit"])
def test_an_abort_leaves_nothing_and_an_existing_output_intact(
    fmt: Format, how: str, tmp_path: Path, opened: list[CheckpointReader]
) -> None:
    template = template_for(fmt, tmp_path / "t", opened)
    folder = tmp_path / "out"
    folder.mkdir()
    path = output_path(fmt, folder)
    arrays = sample()
    for existing in (False, True):
        if existing:
            write(fmt, path, sample(1), template)
        before = snapshot(folder)
        jobs = blocks(arrays)
        expected = (
            pytest.raises(ZeroDivisionError) if how == "exception" else contextlib.nullcontext()
        )
        with (
            expected,
            create_writer(
                path, infos(arrays), {}, template, folder_format=fmt.folder_option
            ) as writer,
        ):
            for job in jobs[: len(jobs) // 2]:
                writer.write(*job)
            if how == "abort":
                writer.abort()
                writer.abort()  # idempotent
            elif how == "exception":
                _ = 1 / 0
        assert snapshot(folder) == before, (existing, sorted(snapshot(folder)))


def float8_stored(fmt: Format, path: Path, template: CheckpointReader | None) -> set[str]:
    if fmt.name in FLOAT8_STORED:
        return FLOAT8_STORED[fmt.name]
    accepted = set()
    for name, dtype in FLOAT8.items():
        try:
            check_writer(
                path,
                infos({"scale": np.zeros(2, dtype)}),
                template,
                folder_format=fmt.folder_option,
            )
        except OptionError:
            continue
        accepted.add(name)
    return accepted


@writers
def test_every_dtype_it_stores_round_trips_with_0d_and_empty_tensors(
    fmt: Format, tmp_path: Path, opened: list[CheckpointReader]
) -> None:
    template = template_for(fmt, tmp_path / "t", opened)
    path = output_path(fmt, tmp_path)
    stored = [*CORE_DTYPES, *(FLOAT8[n] for n in sorted(float8_stored(fmt, path, template)))]
    rng = np.random.default_rng(3)
    arrays: dict[str, np.ndarray] = {}
    for dtype in stored:
        bits = rng.integers(0, 256, size=6 * dtype.itemsize, dtype=np.uint8)
        values = bits.view(dtype) if dtype.kind != "b" else bits.astype(bool)
        if dtype.kind == "f" and dtype.itemsize > 1:
            values = rng.standard_normal(6).astype(dtype)  # no NaN payloads to compare
        arrays[f"{dtype.name}_2d"] = values.reshape(2, 3)
        arrays[f"{dtype.name}_0d"] = values[:1].reshape(())
        arrays[f"{dtype.name}_empty"] = values[:0].reshape(0, 2)
    write(fmt, path, arrays, template)
    assert_same(read_all(path), arrays)


@writers
def test_check_writer_refuses_exactly_the_dtypes_it_cannot_store(
    fmt: Format, tmp_path: Path, opened: list[CheckpointReader]
) -> None:
    template = template_for(fmt, tmp_path / "t", opened)
    path = output_path(fmt, tmp_path)
    for name, dtype in FLOAT8.items():
        tensors = infos({"scale": np.zeros(2, dtype)})
        if name in float8_stored(fmt, path, template):
            check_writer(path, tensors, template, folder_format=fmt.folder_option)
        else:
            with pytest.raises(OptionError, match=f"'scale'.*{name}|{name}.*'scale'"):
                check_writer(path, tensors, template, folder_format=fmt.folder_option)
    assert not path.exists()


def conversion_templates(folder: Path) -> dict[str, Path]:
    """One input per kind of content, beside plain tensors: what a conversion must carry."""
    folder.mkdir()
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    plain = folder / "plain.safetensors"
    import safetensors.numpy

    safetensors.numpy.save_file({"x": x}, str(plain))
    npz = folder / "strings.npz"
    np.savez(npz, x=x, labels=np.array(["a", "b"]))
    h5 = folder / "strings.h5"
    with h5py.File(h5, "w") as f:
        f["x"] = x
        f["labels"] = np.array([b"a", b"b"])
    keras = keras_template(folder)
    with zipfile.ZipFile(keras, "a") as z:
        z.writestr("assets/vocab.txt", "a\nb\n")
    return {"plain": plain, "npz strings": npz, "h5 strings": h5, "keras assets": keras}


#: Which templates each output format accepts in a conversion (the rest refused, naming what
#: would be lost or what it needs instead). A format not listed is only held to the rule that
#: a refusal is an ``OptionError`` naming the output, and that nothing is written.
CARRIES = {
    "safetensors": {"plain"},
    "safetensors folder": {"plain"},
    "torch folder": {"plain"},
    "keras weights": {"plain", "h5 strings"},
    "hdf5": {"plain", "h5 strings"},
    "keras": {"keras assets"},
    "npz": {"plain", "npz strings"},
}


@writers
def test_a_conversion_carries_or_refuses_what_the_template_holds(
    fmt: Format, tmp_path: Path
) -> None:
    templates = conversion_templates(tmp_path / "in")
    path = output_path(fmt, tmp_path)
    for kind, source in templates.items():
        with open_checkpoint(source) as reader:
            tensors = infos({"x": np.zeros((2, 3), np.float32)})
            if fmt.name not in CARRIES:
                with contextlib.suppress(OptionError):
                    check_writer(
                        path,
                        tensors,
                        reader,
                        folder=fmt.layout != "file",
                        folder_format=fmt.folder_option,
                    )
            elif kind in CARRIES[fmt.name]:
                check_writer(
                    path,
                    tensors,
                    reader,
                    folder=fmt.layout != "file",
                    folder_format=fmt.folder_option,
                )
            else:
                with pytest.raises(OptionError, match=f"^{path}: "):
                    check_writer(
                        path,
                        tensors,
                        reader,
                        folder=fmt.layout != "file",
                        folder_format=fmt.folder_option,
                    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


# ---------------------------------------------------------------- readers


#: How the reader tests get a checkpoint of a read-only format (name -> a function writing
#: ``arrays`` into the folder and returning the checkpoint's path). A writable format's own
#: writer makes its files.
def _tensorflow_sample(folder: Path, arrays: dict[str, np.ndarray]) -> Path:
    from ema_cli.formats.tensorbundle import write_bundle

    folder.mkdir(parents=True, exist_ok=True)
    index, _ = write_bundle(folder / "ckpt-1", list(arrays.items()))
    return index


SAMPLE_MAKERS: dict[str, Callable[[Path, dict[str, np.ndarray]], Path]] = {
    "tensorflow": _tensorflow_sample,
}

readers = pytest.mark.parametrize(
    "fmt", registry.formats(), ids=[f.name for f in registry.formats()]
)


def written(
    fmt: Format, folder: Path, opened: list[CheckpointReader], probe: int = 64
) -> tuple[Path, dict[str, np.ndarray]]:
    arrays = sample()
    arrays["probe"] = np.random.default_rng(9).standard_normal(probe)  # float64, distinct bytes
    if fmt.writer is None:
        assert fmt.name in SAMPLE_MAKERS, f"read-only format {fmt.name}: add a SAMPLE_MAKERS line"
        return SAMPLE_MAKERS[fmt.name](folder, arrays), arrays
    template = template_for(fmt, folder / "t", opened)
    path = output_path(fmt, folder)
    write(fmt, path, arrays, template)
    return path, arrays


def data_file(path: Path) -> Path:
    """The file a corruption test damages: the largest of the checkpoint's files (itself, a
    folder's shard, a TensorFlow bundle's data file)."""
    return max(checkpoint_files(path), key=lambda p: p.stat().st_size)


def read_or_checkpoint_error(path: Path) -> dict[str, np.ndarray] | None:
    """A clean read, or None for ``CheckpointError``; any other exception fails the test."""
    try:
        return read_all(path)
    except CheckpointError:
        return None


@readers
def test_truncation_anywhere_is_a_checkpoint_error(
    fmt: Format, tmp_path: Path, opened: list[CheckpointReader]
) -> None:
    path, _ = written(fmt, tmp_path, opened)
    target = data_file(path)
    whole = target.read_bytes()
    for cut in sorted({0, 1, 7, 8, 100, len(whole) // 3, len(whole) // 2, len(whole) - 1}):
        target.write_bytes(whole[:cut])
        with pytest.raises(CheckpointError):
            read_all(path)
    target.write_bytes(whole)
    read_all(path)


@readers
def test_replaced_bytes_give_a_checkpoint_error_or_a_clean_read(
    fmt: Format, tmp_path: Path, opened: list[CheckpointReader]
) -> None:
    path, _ = written(fmt, tmp_path, opened)
    target = data_file(path)
    whole = target.read_bytes()
    rng = random.Random(fmt.name)
    for _ in range(60):
        damaged = bytearray(whole)
        for _ in range(rng.choice((1, 1, 3))):
            damaged[rng.randrange(len(damaged))] ^= rng.randrange(1, 256)
        target.write_bytes(damaged)
        read_or_checkpoint_error(path)


@readers
@pytest.mark.parametrize("probe", [64, 8192])
def test_replaced_bytes_in_tensor_data_are_caught_or_change_exactly_that_element(
    fmt: Format, probe: int, tmp_path: Path, opened: list[CheckpointReader]
) -> None:
    path, arrays = written(fmt, tmp_path, opened, probe)
    values = arrays["probe"]
    target = data_file(path)
    whole = target.read_bytes()
    at = whole.find(values.tobytes())
    assert at >= 0, "every writable format stores a float64 tensor's bytes as they are"
    damaged = bytearray(whole)
    damaged[at + 8 * 10 + 3] ^= 0x40
    target.write_bytes(damaged)
    got = read_or_checkpoint_error(path)
    if fmt.name in CHECKSUMMED or (fmt.name in CHECKSUMMED_WHEN_SMALL and probe * 8 < 4096):
        assert got is None
        return
    assert got is not None
    changed = np.flatnonzero(got["probe"].view(np.uint64) != values.view(np.uint64))
    assert changed.tolist() == [10]
    for name in arrays:
        if name != "probe":
            assert got[name].tobytes() == arrays[name].tobytes()
