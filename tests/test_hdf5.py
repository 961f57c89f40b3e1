"""HDF5 checkpoints: reading element ranges of any layout, rebuilding a template exactly, errors."""

from __future__ import annotations

import contextlib
import random
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ema_cli.errors import OptionError, TruncatedCheckpointError
from ema_cli.formats.hdf5 import HDF5Reader, HDF5Writer, _flat_boxes, check_names
from tests.conftest import assert_fails, infos, run_cli

BF16 = np.dtype(ml_dtypes.bfloat16)
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)


# ---------------------------------------------------------------- structure comparison


def assert_same_structure(expected: Path, actual: Path) -> None:
    """Every group, link, attribute (type, shape, value, order), dataset type, shape and storage
    of ``expected`` is in ``actual``, in the same order. ``actual``'s root may add string
    attributes: the run's metadata (``ema.decay``, ...)."""
    with h5py.File(expected, "r") as e, h5py.File(actual, "r") as a:
        assert [k for k in a.attrs if k in e.attrs] == list(e.attrs)
        added = [k for k in a.attrs if k not in e.attrs]
        assert all(isinstance(a.attrs[k], str) for k in added), added
        _compare(e, a, "/")


def _compare_attrs(e: h5py.HLObject, a: h5py.HLObject, where: str, root: bool = False) -> None:
    if not root:
        assert list(e.attrs) == list(a.attrs), where
    for name in e.attrs:
        ea, aa = e.attrs.get_id(name), a.attrs.get_id(name)
        assert ea.get_type() == aa.get_type(), (where, name)  # H5Tequal: exact file type
        assert ea.shape == aa.shape, (where, name)
        np.testing.assert_equal(e.attrs[name], a.attrs[name], err_msg=f"{where}@{name}")


def _compare(e: h5py.HLObject, a: h5py.HLObject, where: str) -> None:
    _compare_attrs(e, a, where, root=where == "/")
    if isinstance(e, h5py.Group):
        assert isinstance(a, h5py.Group), where
        assert list(e) == list(a), where
        ecpl, acpl = e.id.get_create_plist(), a.id.get_create_plist()
        assert ecpl.get_link_creation_order() == acpl.get_link_creation_order(), where
        for name in e:
            el, al = e.get(name, getlink=True), a.get(name, getlink=True)
            assert type(el) is type(al), where + name
            if isinstance(el, h5py.SoftLink):
                assert el.path == al.path
                continue
            _compare(e[name], a[name], where + name + "/")
        return
    assert isinstance(a, h5py.Dataset), where
    assert e.id.get_type() == a.id.get_type(), where
    assert e.shape == a.shape and e.chunks == a.chunks, where
    assert (e.compression, e.compression_opts) == (a.compression, a.compression_opts), where
    if h5py.check_string_dtype(e.dtype) is not None:
        assert e[()].tolist() == a[()].tolist(), where


def h5_values(path: Path) -> dict[str, np.ndarray]:
    """Every dataset's raw values by path (opaque data as its bytes)."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None
        )
    return out


# ---------------------------------------------------------------- a template with everything


def make_rich_file(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A legacy-Keras-like file with every kind of content; returns the tensors written."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}

    def tensor(group: h5py.Group, name: str, value: np.ndarray, **kwargs: object) -> h5py.Dataset:
        ds = group.create_dataset(name, data=value, **kwargs)
        tensors[ds.name[1:]] = value.astype(value.dtype.newbyteorder("="))  # as read back
        return ds

    with h5py.File(path, "w", track_order=True) as f:
        f.attrs["model_config"] = '{"class_name": "Sequential"}'
        f.attrs["keras_version"] = "2.15.0"
        f.attrs["scale"] = np.float32(0.5)
        weights = f.create_group("model_weights")
        weights.attrs["backend"] = b"tensorflow"
        # save_attributes_to_hdf5_group splits large lists into numbered attributes
        weights.attrs["layer_names0"] = np.array([b"conv", b"bn"])
        weights.attrs["layer_names1"] = np.array([b"dense"])
        conv = weights.create_group("conv")
        conv.attrs["weight_names"] = np.array([b"conv/kernel:0", b"conv/bias:0"], dtype=object)
        tensor(
            conv,
            "kernel",
            rng.standard_normal((5, 3, 2, 4)).astype(np.float32),
            chunks=(2, 3, 1, 4),
            compression="gzip",
            compression_opts=4,
        )
        tensor(conv, "bias", rng.standard_normal(4).astype(">f8"))  # big-endian on disk
        bn = weights.create_group("bn")
        bn.attrs["weight_names"] = np.array([b"bn/gamma:0"])
        tensor(bn, "gamma", rng.standard_normal(4).astype(BF16))  # unmarked opaque (legacy)
        dense = weights.create_group("dense", track_order=True)
        dense.attrs["weight_names"] = np.array([b"dense/kernel:0"])
        kernel = tensor(dense, "kernel", rng.standard_normal((4, 3)).astype(BF16))
        kernel.attrs["dtype"] = "bfloat16"  # Keras 3's marker
        fp8 = tensor(dense, "scale", rng.standard_normal(3).astype(FP8))
        fp8.attrs["dtype"] = "float8_e4m3fn"
        tensor(dense, "b16", rng.standard_normal((2, 2)).astype(np.float16), chunks=(1, 2))
        f.create_group("empty_group").attrs["weight_names"] = np.array([])
        opt = f.create_group("optimizer_weights")
        tensor(opt, "iteration", np.array(7, dtype=np.int64))
        tensor(opt, "m", rng.standard_normal((4, 3)).astype(np.float32))
        tensor(f, "mask", np.array([True, False, True]))
        tensor(f, "counts", np.arange(6, dtype=np.uint16).reshape(2, 3))
        tensor(f, "nothing", np.zeros((0, 3), dtype=np.float32))
        f.create_dataset("labels", data=np.array(["cat", "dog"], dtype=h5py.string_dtype()))
        f.create_dataset("pairs", data=np.zeros(2, dtype=[("a", "i4"), ("b", "f4")]))
        f.create_dataset("null", data=h5py.Empty("f4"))
        f["alias"] = h5py.SoftLink("/model_weights/conv/kernel")
    return tensors


NON_TENSORS = [
    "dataset 'labels' (a string dataset)",
    "dataset 'pairs' (a dataset of type [('a', '<i4'), ('b', '<f4')])",
    "dataset 'null' (a dataset of type float32)",
    "link 'alias'",
]


@pytest.fixture
def rich(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path / "rich.h5"
    return path, make_rich_file(path)


def test_reader_lists_tensors_with_numpy_dtypes(rich: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, tensors = rich
    with HDF5Reader(path) as reader:
        assert set(reader.tensors) == set(tensors)
        for name, value in tensors.items():
            info = reader.tensors[name]
            assert info.dtype == value.dtype, name
            assert info.shape == value.shape, name
            assert np.array_equal(reader.read(name).reshape(value.shape), value), name
        assert list(reader.non_tensors) == NON_TENSORS
        assert reader.optimizer_prefixes == ("optimizer_weights/",)
        assert reader.metadata == {
            "model_config": '{"class_name": "Sequential"}',
            "keras_version": "2.15.0",
        }


def test_bfloat16_marked_and_unmarked_and_float8(rich: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, _ = rich
    with HDF5Reader(path) as reader:
        assert reader.tensors["model_weights/bn/gamma"].dtype == BF16  # no marker: 2 bytes
        assert reader.tensors["model_weights/dense/kernel"].dtype == BF16
        assert reader.tensors["model_weights/dense/scale"].dtype == FP8  # marker names it


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=4), st.data())
def test_flat_boxes_cover_exactly_the_range_in_order(shape: list[int], data: st.DataObject) -> None:
    size = int(np.prod(shape))
    start = data.draw(st.integers(0, size - 1))
    stop = data.draw(st.integers(start + 1, size))
    boxes = list(_flat_boxes(tuple(shape), start, stop))
    assert len(boxes) <= 2 * len(shape) - 1
    covered = []
    for offset, count in boxes:
        grid = np.indices(count).reshape(len(shape), -1).T + np.array(offset)
        covered.extend(np.ravel_multi_index(grid.T, shape).tolist())
    assert covered == list(range(start, stop))


@pytest.mark.parametrize("layout", ["contiguous", "chunked-gzip"])
def test_every_flat_range_of_a_4d_dataset(tmp_path: Path, layout: str) -> None:
    value = np.arange(2 * 3 * 2 * 4, dtype=np.float32).reshape(2, 3, 2, 4)
    path = tmp_path / "x.h5"
    options: dict[str, object] = {}
    if layout != "contiguous":
        options = {"chunks": (1, 2, 2, 3), "compression": "gzip"}
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=value, **options)
    flat = value.reshape(-1)
    with HDF5Reader(path) as reader:
        for start in range(flat.size):
            for stop in range(start, flat.size + 1):
                out = np.full(stop - start, -1, np.float32)
                reader.read("x", start, stop, out=out)
                assert np.array_equal(out, flat[start:stop]), (start, stop)
        with pytest.raises(ValueError, match="outside"):
            reader.read("x", 5, flat.size + 1)


def write_in_random_order(
    writer: HDF5Writer, tensors: dict[str, np.ndarray], block: int = 5, seed: int = 0
) -> None:
    """Blocks of every tensor, shuffled, from two threads: the replay's worst case."""
    jobs = []
    for name, value in tensors.items():
        flat = value.reshape(-1)
        jobs += [(name, s, flat[s : s + block]) for s in range(0, flat.size, block)]
        if flat.size == 0:
            jobs.append((name, 0, flat))
    random.Random(seed).shuffle(jobs)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda job: writer.write(*job), jobs))


def changed(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """New values of the same dtypes, so a test sees what was written, not the template's."""
    out = {}
    for name, value in tensors.items():
        if value.dtype.kind == "f" or value.dtype in (BF16, FP8):
            out[name] = (value.astype(np.float32) * 2 + 1).astype(value.dtype)
        else:
            out[name] = value
    return out


def test_writer_rebuilds_the_template_exactly(
    rich: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    path, tensors = rich
    new = changed(tensors)
    out = tmp_path / "out.h5"
    with (
        HDF5Reader(path) as template,
        HDF5Writer(out, infos(new), {"ema.decay": "0.9"}, template) as writer,
    ):
        write_in_random_order(writer, new)
        writer.commit()
    assert_same_structure(path, out)
    with h5py.File(out, "r") as f:
        assert f.attrs["ema.decay"] == "0.9"
        assert f["model_weights/dense/kernel"].attrs["dtype"] == "bfloat16"
    with HDF5Reader(out) as reader:
        for name, value in new.items():
            assert (
                reader.read(name).tobytes() == value.astype(value.dtype.newbyteorder("=")).tobytes()
            )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5", "rich.h5"]  # no temporaries


def test_metadata_replaces_only_the_root_attributes_it_changes(
    rich: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    path, tensors = rich
    out = tmp_path / "out.h5"
    with HDF5Reader(path) as template:
        metadata = {**template.metadata, "keras_version": "3.0"}
        with HDF5Writer(out, infos(tensors), metadata, template) as writer:
            write_in_random_order(writer, tensors)
            writer.commit()
    with h5py.File(out, "r") as f:
        assert list(f.attrs) == ["model_config", "scale", "keras_version"]  # replaced: last
        assert f.attrs["keras_version"] == "3.0"


def test_without_a_template_tensors_become_datasets_at_their_paths(tmp_path: Path) -> None:
    tensors = {
        "model.layers.0.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
        "enc/emb": np.ones((3, 2), BF16),
        "enc/scale": np.ones(2, FP8),
        "step": np.array(3, np.int64),
    }
    out = tmp_path / "plain.hdf5"
    with HDF5Writer(out, infos(tensors), {"format": "pt"}) as writer:
        write_in_random_order(writer, tensors, block=1)
        writer.commit()
    with h5py.File(out, "r") as f:
        assert f["enc/emb"].attrs["dtype"] == "bfloat16"
        assert f["enc/emb"].id.get_type().get_class() == h5py.h5t.OPAQUE
        assert f.attrs["format"] == "pt"
    with HDF5Reader(out) as reader:
        assert list(reader.tensors) == ["enc/emb", "enc/scale", "model.layers.0.weight", "step"]
        for name, value in tensors.items():
            assert reader.tensors[name].dtype == value.dtype
            assert reader.read(name).tobytes() == value.tobytes()


def test_shadow_names_become_groups_under_the_renamed_datasets(
    rich: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    path, tensors = rich
    renamed = {
        (f"{n}/ExponentialMovingAverage" if n.startswith("model_weights/conv") else n): v
        for n, v in tensors.items()
    }
    out = tmp_path / "shadow.h5"
    with HDF5Reader(path) as template, HDF5Writer(out, infos(renamed), {}, template) as writer:
        write_in_random_order(writer, renamed)
        writer.commit()
    with HDF5Reader(out) as reader:
        assert set(reader.tensors) == set(renamed)
        name = "model_weights/conv/kernel/ExponentialMovingAverage"
        assert np.array_equal(reader.read(name), tensors["model_weights/conv/kernel"].reshape(-1))


def test_names_hdf5_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="tensors 'a/b' and 'a/b/c' cannot both be stored"):
        check_names(tmp_path / "x.h5", ["a/b/c", "a/b"])
    for bad in ("", "a//b", "/a", "a/./b", "a/"):
        with pytest.raises(OptionError, match="is not an HDF5 dataset path"):
            check_names(tmp_path / "x.h5", [bad])


def test_abort_leaves_nothing(rich: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    path, tensors = rich
    with HDF5Reader(path) as template, HDF5Writer(tmp_path / "o.h5", infos(tensors), {}, template):
        pass  # no commit
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rich.h5"]


# ---------------------------------------------------------------- the walk of a file's objects


def make_every_kind(folder: Path) -> Path:
    """A file with every kind of object and storage the reader's walk tells apart."""
    from h5py import h5d, h5p

    path = folder / "kinds.h5"
    rng = np.random.default_rng(1)
    (folder / "outside.bin").write_bytes(np.arange(6, dtype="<f4").tobytes())
    compact = h5p.create(h5p.DATASET_CREATE)
    compact.set_layout(h5d.COMPACT)
    with h5py.File(path, "w") as f:  # the root lists its links by name
        f.attrs["keras_version"] = "3.15.0"
        late = f.create_group("late", track_order=True)  # by creation order
        late.attrs["name"] = "late"
        late["z"] = np.ones(2, np.float32)
        late["a"] = np.ones(3, np.float64)
        inner = late.create_group("inner")
        inner.attrs["note"] = np.array([b"x", b"y"], dtype=object)
        inner["deep"] = np.arange(4, dtype=np.int32).reshape(2, 2)
        late["twice"] = inner  # a second hard link to a group: walked once
        inner["loop"] = late  # a cycle
        f["plain"] = np.arange(12, dtype=np.float32).reshape(3, 4)
        f.create_dataset(
            "gzip",
            data=rng.standard_normal((6, 5)).astype(np.float32),
            chunks=(2, 5),
            compression="gzip",
        )
        f["big"] = np.arange(5, dtype=">f4")
        f["half"] = np.arange(4, dtype=np.float16)
        f["bf16"] = np.ones(3, BF16)  # opaque, unmarked: bfloat16
        f["bf16_marked"] = np.ones(3, BF16)
        f["bf16_marked"].attrs["dtype"] = "bfloat16"
        f["bf16_fixed"] = np.ones(3, BF16)
        f["bf16_fixed"].attrs["dtype"] = np.bytes_(b"bfloat16")  # a fixed-length string
        f["fp8"] = np.ones(3, FP8).view(np.void(1))
        f["fp8"].attrs["dtype"] = "float8_e4m3fn"
        f["fp8_list"] = np.ones(3, FP8).view(np.void(1))
        f["fp8_list"].attrs["dtype"] = np.array(["float8_e4m3fn"], dtype=h5py.string_dtype())
        f["wrong_size"] = np.ones(3, BF16)
        f["wrong_size"].attrs["dtype"] = "float8_e5m2"  # 1 byte, but 2 are stored
        f["opaque4"] = np.zeros(3, np.dtype("V4"))
        f["empty"] = np.zeros((0, 3), np.float32)
        f["scalar"] = np.float64(2.5)
        f["null"] = h5py.Empty("f4")
        f["text"] = np.array([b"a"], dtype=h5py.string_dtype("ascii"))
        f.create_dataset("compact", data=np.arange(3, dtype=np.int16), dcpl=compact)
        f.create_dataset(
            "external", shape=(6,), dtype="<f4", external=[(str(folder / "outside.bin"), 0, 24)]
        )
        layout = h5py.VirtualLayout(shape=(5,), dtype=">f4")
        layout[:] = h5py.VirtualSource(".", "big", shape=(5,))
        f.create_virtual_dataset("virtual", layout)
        f.create_dataset("unwritten", shape=(4, 4), dtype=np.float32)
        f.create_dataset("unwritten_chunked", shape=(4, 4), dtype=np.float32, chunks=(2, 2))
        f["plain_again"] = f["plain"]  # a second hard link to a dataset
        f["named"] = np.dtype("<i8")  # a named datatype
        f["soft"] = h5py.SoftLink("/half")
        f["dangling"] = h5py.SoftLink("/nowhere")
        f["elsewhere"] = h5py.ExternalLink("other.h5", "/x")
    return path


#: What the reader found in ``make_every_kind``'s file before its walk was rewritten on h5py's
#: low-level calls (the high-level walk's result, which the new one must keep).
EVERY_KIND_TENSORS = [
    ("bf16", BF16, (3,)),
    ("bf16_fixed", BF16, (3,)),
    ("bf16_marked", BF16, (3,)),
    ("big", np.dtype(np.float32), (5,)),
    ("compact", np.dtype(np.int16), (3,)),
    ("empty", np.dtype(np.float32), (0, 3)),
    ("external", np.dtype(np.float32), (6,)),
    ("fp8", FP8, (3,)),
    ("gzip", np.dtype(np.float32), (6, 5)),
    ("half", np.dtype(np.float16), (4,)),
    ("late/z", np.dtype(np.float32), (2,)),  # creation order in 'late'
    ("late/a", np.dtype(np.float64), (3,)),
    ("late/inner/deep", np.dtype(np.int32), (2, 2)),
    ("plain", np.dtype(np.float32), (3, 4)),
    ("scalar", np.dtype(np.float64), ()),
    ("virtual", np.dtype(np.float32), (5,)),
]
EVERY_KIND_NON_TENSORS = [
    "link 'dangling'",
    "link 'elsewhere'",
    "dataset 'fp8_list' (a dataset of type |V1)",
    "hard link 'late/inner/loop' to 'late'",
    "hard link 'late/twice' to 'late/inner'",
    "named datatype 'named'",
    "dataset 'null' (a dataset of type float32)",
    "dataset 'opaque4' (a dataset of type |V4)",
    "hard link 'plain_again' to 'plain'",
    "link 'soft'",
    "dataset 'text' (a string dataset)",
    "dataset 'unwritten' (never written: no data stored)",
    "dataset 'unwritten_chunked' (never written: no data stored)",
    "dataset 'wrong_size' (a dataset of type |V2)",
]
#: Read with one positioned read at their offset: contiguous, in this file, in our own order.
EVERY_KIND_RAW = {
    "bf16", "bf16_fixed", "bf16_marked", "fp8", "half", "late/z", "late/a", "late/inner/deep",
    "plain", "scalar",
}  # fmt: skip


def test_the_walk_tells_every_kind_of_object_apart(tmp_path: Path) -> None:
    path = make_every_kind(tmp_path)
    with HDF5Reader(path) as reader, h5py.File(path, "r", locking=False) as f:
        assert [(n, t.dtype, t.shape) for n, t in reader.tensors.items()] == EVERY_KIND_TENSORS
        assert list(reader.non_tensors) == EVERY_KIND_NON_TENSORS
        assert reader.metadata == {"keras_version": "3.15.0"}
        for name, dtype, _ in EVERY_KIND_TENSORS:
            offset = reader.file_offset(name, 0)
            if name in EVERY_KIND_RAW:
                assert offset == f[name].id.get_offset(), name
            else:
                assert offset is None, name
            stored = f[name][()]
            expected = stored.view(dtype) if stored.dtype.kind == "V" else stored.astype(dtype)
            assert reader.read(name).tobytes() == expected.tobytes(), name


def test_the_rehearsal_touches_each_object_once_and_reads_every_attribute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child's walk is the reader's own (so libhdf5 meets there first whatever the open
    will meet), naming each object before touching it, plus every attribute's value."""
    import os

    from ema_cli.formats import hdf5

    path = make_every_kind(tmp_path)
    read: list[bytes] = []
    real = hdf5._attribute_value

    def spy(obj: h5py.h5o.ObjectID, name: bytes) -> object:
        read.append(name)
        return real(obj, name)

    monkeypatch.setattr(hdf5, "_attribute_value", spy)
    read_end, write_end = os.pipe()
    try:
        with h5py.File(path, "r", locking=False) as f:
            hdf5._rehearse_reading(f, write_end)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            lines = pipe.read().decode().splitlines()
    finally:
        with contextlib.suppress(OSError):
            os.close(write_end)
    # Every object by name (the root's links by name, 'late''s by creation order), soft and
    # external links not followed; a second hard link is opened (to tell it is one), not
    # walked again.
    assert lines == [
        "/", "bf16", "bf16_fixed", "bf16_marked", "big", "compact", "empty", "external", "fp8",
        "fp8_list", "gzip", "half", "late", "late/z", "late/a", "late/inner", "late/inner/deep",
        "late/inner/loop", "late/twice", "named", "null", "opaque4", "plain", "plain_again",
        "scalar", "text", "unwritten", "unwritten_chunked", "virtual", "wrong_size",
    ]  # fmt: skip
    # Each object's attributes once; the five opaque datasets' dtype markers once more, as
    # the reader's walk reads them.
    assert sorted(read) == [b"dtype"] * 10 + [b"keras_version", b"name", b"note"]


# ---------------------------------------------------------------- broken files


def truncated_after_header(tmp_path: Path, chunked: bool) -> Path:
    """A file cut inside its last dataset's data whose superblock says the cut is its end (so
    HDF5 opens it): superblock version 0 keeps the end-of-file address at byte 40."""
    path = tmp_path / "ckpt-7.h5"
    with h5py.File(path, "w", libver="earliest") as f:
        f.create_dataset("a", data=np.arange(10, dtype="f4"))
        f.create_dataset("z", data=np.arange(5000, dtype="f4"), chunks=(1000,) if chunked else None)
    data = bytearray(path.read_bytes())
    assert data[8] == 0  # superblock version 0
    cut = len(data) - 3000
    data = data[:cut]
    data[40:48] = struct.pack("<Q", cut)
    path.write_bytes(data)
    return path


def test_contiguous_native_tensors_are_read_without_libhdf5(
    rich: tuple[Path, dict[str, np.ndarray]],
) -> None:
    """The fast path (one positioned read at the dataset's file offset) is taken exactly for
    contiguous data stored in the buffer's own type and byte order, and reads the same values
    as libhdf5 (test_reader_lists_tensors_with_numpy_dtypes reads them all)."""
    path, tensors = rich
    with HDF5Reader(path) as reader, h5py.File(path, "r", locking=False) as f:
        raw = {name for name in tensors if reader.file_offset(name, 0) is not None}
        assert raw == {
            "model_weights/bn/gamma",  # opaque bytes (bfloat16) are their own bytes
            "model_weights/dense/kernel",
            "model_weights/dense/scale",
            "optimizer_weights/iteration",
            "optimizer_weights/m",
            "mask",
            "counts",
        }  # not: chunked (gzip or plain), big-endian, or empty
        for name in raw:
            offset = reader.file_offset(name, 1)
            assert offset == f[name].id.get_offset() + tensors[name].dtype.itemsize
            flat = tensors[name].reshape(-1)
            if flat.size > 1:
                assert np.array_equal(reader.read(name, 1, flat.size), flat[1:]), name


def test_a_file_cut_after_it_was_opened_is_one_line_on_the_fast_path(tmp_path: Path) -> None:
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.arange(1000, dtype=np.float32))
        offset = f["x"].id.get_offset()
    with HDF5Reader(path) as reader:
        assert reader.file_offset("x", 0) == offset
        with open(path, "r+b") as f:
            f.truncate(offset + 400)
        assert np.array_equal(reader.read("x", 0, 100), np.arange(100, dtype=np.float32))
        with pytest.raises(TruncatedCheckpointError, match="tensor 'x': truncated"):
            reader.read("x")


def test_a_file_is_rehearsed_once_not_in_every_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libhdf5's reading is rehearsed in a forked child at the first open (the plan's, in the
    main thread); the replay's workers reopen the file and must not fork again: a fork from a
    worker thread deadlocked when another thread's garbage collection needed h5py's lock."""
    import os

    from ema_cli.formats import open_checkpoint

    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.arange(10, dtype=np.float32))
    archive = next((Path(__file__).parent / "fixtures" / "keras").glob("*/keras/*.keras"))
    for first in (path, archive):  # an HDF5 file, and one inside a .keras archive
        open_checkpoint(first).close()

    def no_fork() -> int:
        raise AssertionError("forked again")

    monkeypatch.setattr(os, "fork", no_fork)
    with HDF5Reader(path) as reader:
        assert reader.read("x")[-1] == 9
    with open_checkpoint(archive) as again:
        assert again.tensors


@pytest.fixture
def forks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts this process's forks (the libhdf5 rehearsals' children)."""
    import os

    counted: list[int] = []
    real_fork = os.fork

    def fork() -> int:
        pid = real_fork()
        if pid:
            counted.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", fork)
    return counted


def test_hdf5_inputs_are_rehearsed_by_one_child_ahead_of_the_opens(
    tmp_path: Path, forks: list[int]
) -> None:
    files = [keras_like(tmp_path / f"ckpt-{s}.weights.h5", s) for s in (1, 2, 3)]
    result = run_cli(
        ["average", *map(str, files), "-o", str(tmp_path / "o.npz"), "--decay", "0.9", "-q"]
    )
    assert result.exit_code == 0, result.output
    assert len(forks) == 1  # not one per file


def test_many_hdf5_inputs_are_rehearsed_by_a_child_per_core_sending_their_scans(
    tmp_path: Path, forks: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Six inputs on a machine of two cores or more: two children ahead, each rehearsing every
    other file and sending its scan, which this process takes instead of walking the file
    again; the scans are the ones this process makes itself (a legacy Keras model among the
    files: its kind, metadata and optimizer prefix too)."""
    import os

    from ema_cli.formats import hdf5

    files = [keras_like(tmp_path / f"ckpt-{s}.weights.h5", s) for s in range(1, 6)]
    legacy = tmp_path / "legacy.h5"
    with h5py.File(legacy, "w") as f:
        f.attrs["model_config"] = '{"class_name": "Sequential"}'
        f.attrs["backend"] = b"tensorflow"
        group = f.create_group("model_weights")
        group.attrs["layer_names"] = [b"dense"]
        group["dense/kernel"] = np.ones((2, 2), ml_dtypes.bfloat16)
        f["optimizer_weights/iter"] = np.int64(3)
    files.insert(2, legacy)
    own = []
    for path in files:
        with HDF5Reader(path) as reader:
            own.append(reader)
    forks.clear()
    hdf5._REHEARSED.clear()
    walked = []
    real = hdf5._scan_file

    def counted(file: h5py.File, *args: object, **kwargs: object) -> hdf5._Scan:
        walked.append(os.getpid())
        return real(file, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(hdf5, "_scan_file", counted)
    with hdf5.rehearsing_ahead(files):
        ahead = []
        for path in files:
            with HDF5Reader(path) as reader:
                ahead.append(reader)
    assert len(forks) == hdf5._ahead_children(6)
    if len(os.sched_getaffinity(0)) >= 2:
        assert len(forks) == 2
    assert os.getpid() not in walked  # every scan came from a child
    for mine, theirs in zip(own, ahead, strict=True):
        assert theirs.tensors == mine.tensors
        assert theirs.non_tensors == mine.non_tensors
        assert theirs.metadata == mine.metadata
        assert theirs.optimizer_prefixes == mine.optimizer_prefixes
        assert theirs.format_name == mine.format_name
        assert theirs._raw == mine._raw
    assert ahead[2].format_name == "HDF5 (legacy Keras model)"
    assert ahead[2].metadata == {
        "model_config": '{"class_name": "Sequential"}',
        "backend": "tensorflow",
    }
    assert ahead[2].tensors["model_weights/dense/kernel"].dtype == ml_dtypes.bfloat16
    assert ahead[0]._raw  # contiguous float32 data: read without libhdf5


def test_an_input_changed_after_its_rehearsal_ahead_is_rehearsed_again(
    tmp_path: Path, forks: list[int]
) -> None:
    import os

    from ema_cli.formats import hdf5
    from ema_cli.formats.base import file_identity

    files = [keras_like(tmp_path / f"ckpt-{s}.weights.h5", s) for s in (1, 2)]
    with hdf5.rehearsing_ahead(files):
        HDF5Reader(files[0]).close()
        # Wait for the child's verdict on the file as it is: a fast open of the first file
        # could otherwise rewrite the second before the child opened it (then the child
        # rightly rehearses the new one and no second fork is needed).
        before = os.stat(files[1])
        assert hdf5._AHEAD.verdict(files[1], (*file_identity(before), 0))
        keras_like(files[1], 7.0)  # rewritten: another identity than the child saw
        # The same size; a later modification time even if the rewrite fell in the same
        # tick of the file system's clock as the first write.
        os.utime(files[1], ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
        with HDF5Reader(files[1]) as reader:
            assert reader.read("layers/dense/vars/1")[0] == 7.0
    assert len(forks) == 2  # the child ahead, then the changed file's own rehearsal


@pytest.mark.parametrize("count", [3, 6])
@pytest.mark.parametrize("failure", ["hang", "crash"])
def test_a_damaged_input_rehearsed_ahead_is_its_own_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, forks: list[int], failure: str, count: int
) -> None:
    """libhdf5 looping or crashing in the second input, as it does on some damaged files
    (tests/test_fuzz.py has real ones): the error names that file, and nothing is written;
    with one child ahead and (6 files) with one per core, where another child is sound."""
    import os
    import signal
    import time

    from ema_cli.formats import hdf5

    files = [keras_like(tmp_path / f"ckpt-{s}.weights.h5", s) for s in range(1, count + 1)]
    real = hdf5._rehearse_reading

    def damaged(file: h5py.File, report: int) -> None:
        if file.filename.endswith("ckpt-2.weights.h5"):
            os.write(report, b"layers/dense/vars\n")
            if failure == "hang":
                time.sleep(60)
            os.kill(os.getpid(), signal.SIGSEGV)
        real(file, report)

    monkeypatch.setattr(hdf5, "_rehearse_reading", damaged)
    monkeypatch.setattr(hdf5, "REHEARSAL_SECONDS", 1.0)
    out = tmp_path / "o.npz"
    says = "did not finish reading" if failure == "hang" else "libhdf5 crashed (SIGSEGV)"
    result = run_cli(["average", *map(str, files), "-o", str(out), "--decay", "0.9", "-q"])
    assert_fails(result, says, str(files[1]), "layers/dense/vars")
    assert not out.exists()
    assert len(forks) == hdf5._ahead_children(count)  # the verdict is the child ahead's


HANGING_RUN = """
import os, sys, time
from ema_cli.formats import hdf5
real = hdf5._rehearse_reading
marker = sys.argv[1]
def hang(file, report):
    if file.filename.endswith("ckpt-2.weights.h5"):
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(600)
    real(file, report)
hdf5._rehearse_reading = hang
hdf5.REHEARSAL_SECONDS = 600.0
sys.argv = ["ema-cli", "average", *sys.argv[2:]]
from ema_cli._entry import main
main()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_rehearsal_child_ends_with_a_killed_run(tmp_path: Path) -> None:
    """A child stuck in libhdf5 must not outlive a run killed with SIGKILL: it holds the run's
    inherited output locks, and the next run would find them taken."""
    import os
    import signal
    import subprocess
    import time

    files = [keras_like(tmp_path / f"ckpt-{s}.weights.h5", s) for s in (1, 2, 3)]
    marker = tmp_path / "child.pid"
    args = [*map(str, files), "-o", str(tmp_path / "o.npz"), "--decay", "0.9", "-q"]
    run = subprocess.Popen([sys.executable, "-c", HANGING_RUN, str(marker), *args])
    try:
        deadline = time.monotonic() + 60
        while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int(marker.read_text())
        run.send_signal(signal.SIGKILL)
        run.wait()

        def alive() -> bool:
            try:
                state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:
                return False
            return state != "Z"

        deadline = time.monotonic() + 10
        while alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(), "the rehearsal child outlived the killed run"
    finally:
        run.kill()
        if marker.exists() and marker.read_text():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(marker.read_text()), signal.SIGKILL)


def test_readers_sharing_a_scan_outlive_each_other(tmp_path: Path) -> None:
    """Readers of one file share its scan; each still reads through its own file's handles and
    types (a chunked bfloat16 dataset goes through libhdf5 with its file's opaque type)."""
    from ema_cli.formats import hdf5

    path = tmp_path / "x.h5"
    value = np.arange(20, dtype=np.float32).astype(BF16)
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=value, chunks=(5,)).attrs["dtype"] = "bfloat16"
    held = len(hdf5._SCANS)  # other tests' readers may still be open
    first, second = HDF5Reader(path), HDF5Reader(path)
    assert second.tensors is first.tensors  # shared
    first.close()
    assert second.file_offset("x", 0) is None  # chunked: through libhdf5
    assert np.array_equal(second.read("x"), value)
    second.close()
    assert len(hdf5._SCANS) == held  # released with the last reader


def test_truncated_data_behind_a_valid_header(tmp_path: Path) -> None:
    path = truncated_after_header(tmp_path, chunked=True)
    with HDF5Reader(path) as reader:
        assert reader.read("z", 0, 100)[-1] == 99  # the chunks still there read fine
        with pytest.raises(TruncatedCheckpointError, match="tensor 'z': cannot read its data"):
            reader.read("z")
    contiguous = truncated_after_header(tmp_path, chunked=False)
    with pytest.raises(
        TruncatedCheckpointError, match="cannot open object 'z', the file is truncated"
    ):
        HDF5Reader(contiguous)


def keras_like(path: Path, scale: float = 1.0, **extra: np.ndarray) -> Path:
    """A small Keras 3 ``.weights.h5``-shaped file."""
    with h5py.File(path, "w") as f:
        vars_ = f.create_group("layers/dense/vars")
        vars_.attrs["name"] = "dense"
        vars_["0"] = np.arange(6, dtype=np.float32).reshape(2, 3) * scale
        vars_["1"] = np.ones(3, np.float32) * scale
        opt = f.create_group("optimizer/vars")
        opt.attrs["name"] = "adam"
        opt["0"] = np.int64(int(scale))
        opt["1"] = np.ones((2, 3), np.float32) * scale
        for name, value in extra.items():
            f[name] = value
    return path


@pytest.fixture
def h5_sequence(tmp_path: Path) -> list[Path]:
    return [keras_like(tmp_path / f"ckpt-{s}.weights.h5", s) for s in (1, 2, 3)]


BAD_FILES = {
    "missing": (None, "no such file"),
    "empty": (b"", "truncated HDF5 file (empty)"),
    "cut in the signature": (b"\x89HD", "truncated HDF5 file (only 3 bytes)"),
    "not hdf5": (b"PK\x03\x04 a zip really" * 10, "not an HDF5 file (no HDF5 signature)"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_exit_2_with_one_line(case: str, h5_sequence: list[Path], tmp_path: Path) -> None:
    data, message = BAD_FILES[case]
    bad = tmp_path / "ckpt-7.weights.h5"
    if data is not None:
        bad.write_bytes(data)
    out = tmp_path / "out.weights.h5"
    assert_fails(
        run_cli(["average", *h5_sequence, bad, "-o", out, "--decay", "0.9"]), str(bad), message
    )
    assert not out.exists()


def test_truncated_file_exits_2(h5_sequence: list[Path], tmp_path: Path) -> None:
    data = h5_sequence[0].read_bytes()
    bad = tmp_path / "ckpt-7.weights.h5"
    bad.write_bytes(data[: len(data) // 2])
    result = run_cli(
        ["average", *h5_sequence, bad, "-o", tmp_path / "o.weights.h5", "--decay", "0.9"]
    )
    assert_fails(result, str(bad), "truncated HDF5 file: the file has ")
    folder = tmp_path / "cut"
    folder.mkdir()
    good = folder / "ckpt-1.h5"
    with h5py.File(good, "w") as f:
        f["a"] = np.zeros(10, "f4")
        f.create_dataset("z", data=np.zeros(5000, "f4"), chunks=(1000,))
    cut = truncated_after_header(folder, chunked=True)
    result = run_cli(["average", good, cut, "-o", tmp_path / "o.h5", "--decay", "0.9"])
    assert_fails(result, str(cut), "tensor 'z': cannot read its data, the file is truncated")
    assert not (tmp_path / "o.h5").exists()


def test_checkpoints_that_disagree(h5_sequence: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "o.weights.h5"
    missing = tmp_path / "ckpt-0.weights.h5"
    with h5py.File(missing, "w") as f:
        f["layers/dense/vars/0"] = np.zeros((2, 3), np.float32)
    result = run_cli(["average", missing, *h5_sequence, "-o", out, "--decay", "0.9"])
    assert_fails(result, str(missing), "tensor 'layers/dense/vars/1': missing")
    shaped = keras_like(tmp_path / "ckpt-0.weights.h5")
    with h5py.File(shaped, "a") as f:
        del f["layers/dense/vars/0"]
        f["layers/dense/vars/0"] = np.zeros((3, 2), np.float32)
    result = run_cli(["average", shaped, *h5_sequence, "-o", out, "--decay", "0.9"])
    assert_fails(result, str(shaped), "'layers/dense/vars/0'", "shape [3, 2] differs from [2, 3]")
    typed = keras_like(tmp_path / "ckpt-0.weights.h5")
    with h5py.File(typed, "a") as f:
        del f["layers/dense/vars/1"]
        f["layers/dense/vars/1"] = np.zeros(3, np.float64)
    result = run_cli(["average", typed, *h5_sequence, "-o", out, "--decay", "0.9"])
    assert_fails(result, str(typed), "'layers/dense/vars/1'", "dtype float64 differs from float32")
    assert not out.exists()


# ---------------------------------------------------------------- through the CLI


def test_average_copies_optimizer_state_by_default(h5_sequence: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "ema.weights.h5"
    result = run_cli(["average", *h5_sequence, "-o", out, "--decay", "0.5", "-q"])
    assert result.exit_code == 0, result.output
    values = h5_values(out)
    c = np.float32(1) - np.float32(0.5)
    s = np.ones(3, np.float32)
    for x in (1.0, 2.0, 3.0):
        s = s - (s - np.float32(x)) * c
    assert np.array_equal(values["layers/dense/vars/1"], s)
    assert np.array_equal(values["optimizer/vars/1"], np.full((2, 3), 3, np.float32))
    assert values["optimizer/vars/0"] == 3
    assert_same_structure(h5_sequence[-1], out)
    with h5py.File(out, "r") as f:
        assert f.attrs["ema.decay"] == "0.5"
    result = run_cli(
        ["average", *h5_sequence, "-o", out, "--decay", "0.5", "-q", "--average-optimizer"]
    )
    assert result.exit_code == 0, result.output
    assert np.array_equal(h5_values(out)["optimizer/vars/1"], np.broadcast_to(s[0], (2, 3)))
    assert h5_values(out)["optimizer/vars/0"] == 3  # integers are still copied


def test_non_tensor_datasets_refuse_conversion(tmp_path: Path) -> None:
    paths = [
        keras_like(tmp_path / f"ckpt-{s}.h5", s, labels=np.array([b"a"], dtype=object))
        for s in (1, 2)
    ]
    result = run_cli(["average", *paths, "-o", tmp_path / "o.safetensors", "--decay", "0.9"])
    assert_fails(
        result, "ckpt-2.h5 holds dataset 'labels' (a string dataset)", "write a .h5 output"
    )
    result = run_cli(["average", *paths, "-o", tmp_path / "o.h5", "--decay", "0.9", "-q"])
    assert result.exit_code == 0, result.output
    assert h5_values(tmp_path / "o.h5")["labels"].tolist() == [b"a"]


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("suffix", ["out.safetensors", "out-folder", "out.npz"])
def test_a_dtype_the_output_format_cannot_store_is_refused_before_any_work(
    tmp_path: Path, suffix: str, dry_run: bool
) -> None:
    """float8_e4m3fnuz is stored opaque in HDF5 (Keras 3's convention) but has no safetensors
    or npz name: one line, exit 2, nothing written, and --dry-run says so too."""
    fnuz = np.dtype(ml_dtypes.float8_e4m3fnuz)
    paths = []
    for step in (1, 2):
        path = tmp_path / f"ckpt-{step}.weights.h5"
        with h5py.File(path, "w") as f:
            f["w"] = np.full(4, step, np.float32)
            q = f.create_dataset("q", data=np.zeros(3, fnuz).view(np.void(1)))
            q.attrs["dtype"] = "float8_e4m3fnuz"
        paths.append(path)
    out = tmp_path / suffix
    result = run_cli(
        ["average", *paths, "-o", out, "--decay", "0.9", *(["--dry-run"] if dry_run else [])]
    )
    assert_fails(result, str(out), "'q'", "float8_e4m3fnuz", "cannot")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-1.weights.h5", "ckpt-2.weights.h5"]
