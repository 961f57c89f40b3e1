"""TensorBundle codec: TF-made fixtures parse, values and bytes match TF's, corruption is a
``CheckpointError``. TensorFlow is needed only by the last test (skipped without it)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from ema_cli import kernels
from ema_cli.errors import CheckpointError, TruncatedCheckpointError
from ema_cli.formats import tensorbundle_crc as crc_module
from ema_cli.formats.tensorbundle import (
    DT_STRING,
    BundleDataWriter,
    EntrySpec,
    TensorBundleReader,
    build_index,
    bundle_files,
    bundle_prefix,
    decode_string_tensor,
    dtype_code,
    encode_string_tensor,
    write_bundle,
)
from ema_cli.formats.tensorbundle_crc import crc32c, crc32c_combine, crc32c_python, mask, unmask
from ema_cli.formats.tensorbundle_graph import classify_name
from ema_cli.formats.tensorbundle_proto import BundleHeader, encode_header
from ema_cli.formats.tensorbundle_table import (
    TableBuilder,
    TableError,
    check_block,
    decompress_snappy,
    read_table,
)

TF = Path(__file__).parent / "fixtures" / "tf"
KERAS = [TF / "keras" / f"ckpt-{k}" for k in (1, 2, 3)]
TF1 = [TF / "tf1" / f"model.ckpt-{k}" for k in range(4)]
ALLTYPES = TF / "dtypes" / "alltypes"
SHARDED = TF / "dtypes" / "sharded"
BUNDLES = [*KERAS, *TF1, ALLTYPES, SHARDED]


def ids(paths: list[Path]) -> list[str]:
    return [f"{p.parent.name}/{p.name}" for p in paths]


def copy_bundle(prefix: Path, folder: Path) -> Path:
    """A bundle's files copied into ``folder``; returns the new prefix."""
    index, shards = bundle_files(prefix)
    for path in (index, *shards):
        shutil.copy(path, folder / path.name)
    return folder / prefix.name


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def read_all(reader: TensorBundleReader, block: int = 7) -> dict[str, np.ndarray]:
    """Every tensor read in blocks of ``block`` elements, in order (the replay's pattern)."""
    out = {}
    for name, info in reader.tensors.items():
        parts = [
            reader.read(name, s, min(s + block, info.size)) for s in range(0, info.size, block)
        ]
        flat = np.concatenate(parts) if parts else reader.read(name)
        out[name] = flat.reshape(info.shape)
    return out


# --- crc32c -------------------------------------------------------------------------------


def test_crc32c_known_value_mask_and_combine() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c_python(b"123456789") == 0xE3069283
    assert unmask(mask(0xE3069283)) == 0xE3069283
    assert mask(0) == 0xA282EAD8  # what TF stores for an empty tensor
    rng = np.random.default_rng(0)
    for la, lb in [(0, 0), (0, 9), (5, 0), (1, 1), (100, 4096), (3, 1 << 20)]:
        a = rng.integers(0, 256, la, dtype=np.uint8).tobytes()
        b = rng.integers(0, 256, lb, dtype=np.uint8).tobytes()
        assert crc32c_combine(crc32c(a), crc32c(b), lb) == crc32c(a + b)
        assert crc32c(b, crc32c(a)) == crc32c(a + b)


def test_crc32c_fallback_gives_the_same_values(monkeypatch: pytest.MonkeyPatch) -> None:
    data = np.arange(1000, dtype=np.float32)
    fast = crc32c(data, 12345)
    monkeypatch.setattr(kernels, "_enabled", False)  # neither ema-cli's C kernel
    monkeypatch.setattr(crc_module, "_crc32c_hw", None)  # nor google-crc32c's
    assert crc_module.crc32c(data, 12345) == fast


# --- parsing TF's files -------------------------------------------------------------------


@pytest.mark.parametrize("prefix", BUNDLES, ids=ids(BUNDLES))
def test_every_fixture_parses_reads_and_verifies(prefix: Path) -> None:
    with TensorBundleReader(Path(f"{prefix}.index")) as reader:
        assert isinstance(reader, TensorBundleReader)
        assert reader.header.num_shards == len(reader.data_paths)
        values = read_all(reader)
        assert set(values) == set(reader.tensors)
        reader.verify()
        for key in reader.raw_entries:
            assert reader.raw_entries[key].dtype == DT_STRING
            reader.read_raw(key)


def test_prefix_index_and_data_paths_name_the_same_bundle() -> None:
    index, shards = bundle_files(SHARDED)
    assert index == Path(f"{SHARDED}.index")
    assert [p.name for p in shards] == [
        "sharded.data-00000-of-00002",
        "sharded.data-00001-of-00002",
    ]
    assert bundle_prefix(shards[1]) == SHARDED
    assert bundle_files(shards[0]) == (index, shards)
    for path in (SHARDED, index, shards[1]):
        with TensorBundleReader(path) as reader:
            assert len(reader.tensors) == 4


def test_alltypes_values_and_dtypes_match_what_tf_reads() -> None:
    expected = np.load(TF / "dtypes" / "alltypes_values.npz")
    strings = json.loads((TF / "dtypes" / "alltypes_strings.json").read_text())
    with TensorBundleReader(ALLTYPES) as reader:
        values = read_all(reader, block=4)
        assert set(values) | set(strings) == {
            n.removesuffix(".bits") for n in expected.files
        } | set(strings)
        for name in expected.files:
            if name.endswith(".bits"):
                got = values[name.removesuffix(".bits")]
                assert got.dtype == np.dtype(ml_dtypes.bfloat16)
                np.testing.assert_array_equal(got.view(np.uint16), expected[name])
            else:
                assert values[name].dtype == expected[name].dtype, name
                assert values[name].shape == expected[name].shape, name
                np.testing.assert_array_equal(values[name], expected[name])
        for name, hexes in strings.items():
            assert reader.read_strings(name) == [bytes.fromhex(h) for h in hexes]
        assert "string tensor 'string' [3]" in reader.non_tensors
        assert reader.tensors["scalar"].shape == ()
        assert reader.tensors["empty"].shape == (0, 3)


def test_sharded_bundle_reads_both_shards() -> None:
    expected = np.load(TF / "dtypes" / "sharded_values.npz")
    with TensorBundleReader(SHARDED) as reader:
        assert reader.header.num_shards == 2
        assert {e.shard_id for e in reader.entries.values()} == {0, 1}
        values = read_all(reader, block=100)
        for name in expected.files:
            np.testing.assert_array_equal(
                values[f"{name}/.ATTRIBUTES/VARIABLE_VALUE"], expected[name]
            )


def test_partitioned_variable_is_refused_by_name() -> None:
    with pytest.raises(CheckpointError, match=r"tensor 'part': partitioned variable") as info:
        TensorBundleReader(TF / "dtypes" / "sliced")
    assert type(info.value) is CheckpointError


def test_big_endian_bundle_is_refused(tmp_path: Path) -> None:
    prefix = copy_bundle(TF1[0], tmp_path)
    rows = read_table(lambda o, n: Path(f"{prefix}.index").read_bytes()[o : o + n], 374)
    table = TableBuilder()
    table.add(b"", encode_header(BundleHeader(num_shards=1, big_endian=True, producer=1)))
    for key, value in rows[1:]:
        table.add(key, value)
    Path(f"{prefix}.index").write_bytes(table.finish())
    with pytest.raises(CheckpointError, match="big-endian"):
        TensorBundleReader(prefix)


# --- object graph -------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", KERAS, ids=ids(KERAS))
def test_keras_keys_are_classified_from_the_object_graph(prefix: Path) -> None:
    truth = json.loads((TF / "keras" / "keras_keys.json").read_text())
    with TensorBundleReader(prefix) as reader:
        info = reader.key_info
    assert set(info) == set(truth["model"].values()) | set(truth["optimizer"].values()) | {
        truth["save_counter"]
    }
    for path, key in truth["model"].items():
        assert info[key].role == "model", (path, key)
        assert any(p.startswith("model/") for p in info[key].paths), info[key].paths
    # The trap: trainable weights are keyed under the optimizer, by the shortest path.
    assert info["optimizer/_trainable_variables/0/.ATTRIBUTES/VARIABLE_VALUE"].role == "model"
    roles = {path.split("/")[-1]: info[key].role for path, key in truth["optimizer"].items()}
    assert roles.pop("iteration") == "counter"
    assert roles.pop("learning_rate") == "optimizer"
    assert roles and all(r == "slot" for r in roles.values()), roles  # Adam m and v
    assert info[truth["save_counter"]].role == "counter"
    assert info["optimizer/_trainable_variables/0/.ATTRIBUTES/VARIABLE_VALUE"].paths == (
        "optimizer/_trainable_variables/0",
        "model/_functional/_operations/1/_kernel",
    )


def test_tf1_keys_are_classified_by_name() -> None:
    with TensorBundleReader(TF1[-1]) as reader:
        assert reader.object_graph is None
        roles = {k: i.role for k, i in reader.key_info.items()}
    assert roles.pop("global_step") == "counter"
    assert set(roles.values()) == {"model"}  # variables and their EMA shadows
    assert classify_name("dense/kernel/Adam_1") == "slot"
    assert classify_name("beta1_power") == "optimizer"


# --- the fixtures' EMA values agree with TF's formula -------------------------------------


def ema_replay(values: list[np.ndarray], steps: list[int], decay: float = 0.9) -> np.ndarray:
    """TF's update in the values' dtype: s = s - (s - x) * c, c = 1 - min(d, (1+n)/(10+n))."""
    shadow = values[0].copy()
    for x, n in zip(values, steps, strict=True):
        d = min(np.float32(decay), np.float32((1 + n) / (10 + n)))
        c = (np.float32(1) - d).astype(x.dtype)
        shadow = shadow - (shadow - x) * c
    return shadow


def test_keras_ema_fixture_is_the_replay_of_its_checkpoints() -> None:
    expected = np.load(TF / "keras" / "keras_ema.npz")
    steps = [1, 2, 3]
    checkpoints = []
    for prefix in KERAS:
        with TensorBundleReader(prefix) as reader:
            checkpoints.append(read_all(reader))
    model_keys = {n.split("/", 1)[1] for n in expected.files}
    assert len(model_keys) == 8
    for key in model_keys:
        for k in steps:
            got = ema_replay([c[key] for c in checkpoints[:k]], steps[:k])
            np.testing.assert_array_equal(got, expected[f"step{k}/{key}"], err_msg=key)


def test_tf1_shadows_are_the_replay_of_its_checkpoints() -> None:
    checkpoints = []
    for prefix in TF1:
        with TensorBundleReader(prefix) as reader:
            checkpoints.append(read_all(reader))
    steps = [int(c["global_step"]) for c in checkpoints]
    assert steps == [0, 1, 2, 3]
    for name in ("dense/kernel", "half/bias", "bf16/weights"):
        got = ema_replay([c[name] for c in checkpoints], steps)
        want = checkpoints[-1][f"{name}/ExponentialMovingAverage"]
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want, err_msg=name)


# --- writing ------------------------------------------------------------------------------


def rewrite(prefix: Path, out: Path, reverse_blocks: bool = False) -> Path:
    """Write ``prefix``'s bundle again with our writer (same data order, raw entries copied
    verbatim), blocks of 5 elements, optionally last block first. Returns the new prefix."""
    target = out / prefix.name
    with TensorBundleReader(prefix) as reader:
        num_shards = reader.header.num_shards
        by_shard: list[list[str]] = [[] for _ in range(num_shards)]
        for key in sorted(reader.entries, key=reader.data_order):
            by_shard[reader.entries[key].shard_id].append(key)
        entries = []
        _, shard_paths = bundle_files(target, num_shards)
        for shard_id, keys in enumerate(by_shard):
            specs = []
            for key in keys:
                entry = reader.entries[key]
                if key in reader.raw_entries:
                    specs.append(
                        EntrySpec.verbatim(key, entry.dtype, entry.shape, reader.read_raw(key))
                    )
                else:
                    info = reader.tensors[key]
                    specs.append(EntrySpec.numeric(key, info.dtype, info.shape))
            start = reader.entries[keys[0]].offset if keys else 0
            fd = os.open(shard_paths[shard_id], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                writer = BundleDataWriter(fd, specs, shard_id=shard_id, start=0)
                assert start == 0
                for spec in specs:
                    if spec.raw is not None:
                        continue
                    size = reader.tensors[spec.key].size
                    blocks = [(s, min(s + 5, size)) for s in range(0, size, 5)] or [(0, 0)]
                    for s, e in reversed(blocks) if reverse_blocks else blocks:
                        writer.write(spec.key, s, reader.read(spec.key, s, e))
                entries += writer.finish()
            finally:
                os.close(fd)
    Path(f"{target}.index").write_bytes(build_index(entries, num_shards))
    return target


@pytest.mark.parametrize("prefix", BUNDLES, ids=ids(BUNDLES))
@pytest.mark.parametrize("reverse", [False, True], ids=["in-order", "reversed"])
def test_writer_reproduces_tf_bytes_exactly(prefix: Path, reverse: bool, tmp_path: Path) -> None:
    ours = rewrite(prefix, tmp_path, reverse_blocks=reverse)
    index, shards = bundle_files(prefix)
    our_index, our_shards = bundle_files(ours)
    assert our_index.read_bytes() == index.read_bytes()
    for theirs, mine in zip(shards, our_shards, strict=True):
        assert mine.read_bytes() == theirs.read_bytes()


def every_dtype() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    floats = rng.standard_normal((3, 4))
    out: dict[str, np.ndarray] = {
        "f16": floats.astype(np.float16),
        "bf16": floats.astype(ml_dtypes.bfloat16),
        "f32": floats.astype(np.float32),
        "f64": floats,
        "bool": floats > 0,
        "c64": (floats + 1j * floats[::-1]).astype(np.complex64),
        "c128": floats + 2j,
        "scalar": np.array(np.float32(-0.0)),
        "empty": np.zeros((2, 0), np.int32),
        "big": rng.standard_normal(70_000).astype(np.float32),  # several blocks
    }
    for t in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64):
        info = np.iinfo(t)
        out[np.dtype(t).name] = np.array([info.min, 0, 1, info.max], t)
    return out


def test_every_dtype_round_trips(tmp_path: Path) -> None:
    arrays = every_dtype()
    strings = [b"x", b"", bytes(range(256)) * 3]
    data, crc = encode_string_tensor(strings)
    items: list[tuple[str, np.ndarray | EntrySpec]] = list(arrays.items())
    items.insert(3, ("names", EntrySpec.verbatim("names", DT_STRING, (3,), data)))
    write_bundle(tmp_path / "b", items, block_elements=1000)
    with TensorBundleReader(tmp_path / "b.index") as reader:
        assert list(reader.tensors) == list(arrays)  # file order is the order written
        assert reader.entries["names"].crc32c == crc
        values = read_all(reader, block=999)
        reader.verify()
        assert reader.read_strings("names") == strings
    for name, want in arrays.items():
        assert values[name].dtype == want.dtype and values[name].shape == want.shape, name
        np.testing.assert_array_equal(values[name], want, err_msg=name)
        assert dtype_code(want.dtype) > 0
    assert decode_string_tensor(data, 3)[0] == strings


def test_writer_refuses_gaps_and_overlaps(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "d", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        spec = EntrySpec.numeric("t", np.float32, (10,))
        writer = BundleDataWriter(fd, [spec])
        writer.write("t", 0, np.zeros(4, np.float32))
        with pytest.raises(RuntimeError, match="wrote 16 of 40 bytes"):
            writer.finish()
        writer.write("t", 6, np.zeros(4, np.float32))
        with pytest.raises(RuntimeError, match=r"bytes \[16, 24\) never written"):
            writer.finish()
        writer.write("t", 3, np.zeros(3, np.float32))
        with pytest.raises(RuntimeError, match=r"bytes \[12, 16\) written twice"):
            writer.finish()
        with pytest.raises(TypeError):
            writer.write("t", 0, np.zeros(1, np.float64))
        with pytest.raises(ValueError):
            writer.write("t", 8, np.zeros(3, np.float32))
    finally:
        os.close(fd)


def test_alignment_pads_after_each_tensor_with_zeros(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "d", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        specs = [EntrySpec.numeric("a", np.uint8, (3,)), EntrySpec.numeric("b", np.uint8, (2,))]
        writer = BundleDataWriter(fd, specs, alignment=8)
        writer.write("b", 0, np.array([5, 6], np.uint8))
        writer.write("a", 0, np.array([1, 2, 3], np.uint8))
        entries = dict(writer.finish())
    finally:
        os.close(fd)
    assert (entries["a"].offset, entries["b"].offset, writer.size) == (0, 8, 16)
    assert (tmp_path / "d").read_bytes() == bytes([1, 2, 3, 0, 0, 0, 0, 0, 5, 6, 0, 0, 0, 0, 0, 0])


# --- checksums while reading --------------------------------------------------------------


def corrupt_tensor(tmp_path: Path) -> tuple[Path, str]:
    """A copy of a TF1 fixture with one byte of ``dense/kernel`` flipped."""
    prefix = copy_bundle(TF1[-1], tmp_path)
    with TensorBundleReader(prefix) as reader:
        entry = reader.entries["dense/kernel"]
        shard = reader.data_paths[0]
    flip(shard, entry.offset + entry.size - 3)
    return prefix, "dense/kernel"


def test_flipped_data_byte_fails_the_in_order_read_naming_the_tensor(tmp_path: Path) -> None:
    prefix, name = corrupt_tensor(tmp_path)
    with TensorBundleReader(prefix) as reader:
        reader.read(name, 0, 5)
        reader.read("half/bias")  # another tensor interleaved: still followed separately
        with pytest.raises(CheckpointError, match=r"tensor 'dense/kernel': checksum mismatch"):
            reader.read(name, 5, 12)
        with pytest.raises(CheckpointError, match="tensor 'dense/kernel'"):
            reader.verify()
        reader.verify(["half/bias", "global_step"])


def test_blocks_in_any_order_are_checked_once_they_cover_the_tensor(tmp_path: Path) -> None:
    """Each block's CRC is kept (shared by every reader of the file: replay workers open
    their own); the read that completes the tensor checks the combined CRC, in any order."""
    prefix, name = corrupt_tensor(tmp_path)
    with TensorBundleReader(prefix) as reader:
        reader.read(name, 6, 12)
        other = TensorBundleReader(prefix)  # a second reader of the same file
        with other, pytest.raises(CheckpointError, match="checksum mismatch"):
            other.read(name, 0, 6)
    with TensorBundleReader(prefix, verify_checksums=False) as reader:
        reader.read(name)


def test_intact_tensors_read_in_any_order_never_raise(tmp_path: Path) -> None:
    prefix = copy_bundle(KERAS[0], tmp_path)
    with TensorBundleReader(prefix) as reader, TensorBundleReader(prefix) as other:
        for name, info in reader.tensors.items():
            n = info.size
            cuts = sorted({0, n // 3, n // 2, n})
            blocks = list(itertools.pairwise(cuts))
            for i, (start, stop) in enumerate(reversed(blocks)):
                (reader if i % 2 else other).read(name, start, stop)
            reader.read(name, 0, n)  # read again, whole: counted once, no false alarm
        reader.verify()


def test_flipped_object_graph_byte_is_a_checkpoint_error(tmp_path: Path) -> None:
    prefix = copy_bundle(KERAS[0], tmp_path)
    with TensorBundleReader(prefix) as reader:
        entry = reader.entries["_CHECKPOINTABLE_OBJECT_GRAPH"]
    flip(Path(f"{prefix}.data-00000-of-00001"), entry.offset + entry.size - 10)
    with TensorBundleReader(prefix) as reader:
        with pytest.raises(CheckpointError, match="_CHECKPOINTABLE_OBJECT_GRAPH"):
            reader.read_raw("_CHECKPOINTABLE_OBJECT_GRAPH")
        with pytest.raises(CheckpointError, match="_CHECKPOINTABLE_OBJECT_GRAPH"):
            _ = reader.key_info


# --- a broken index or data file is always a CheckpointError ------------------------------


def open_all(prefix: Path) -> None:
    with TensorBundleReader(prefix) as reader:
        read_all(reader)
        reader.verify()
        _ = reader.key_info


def test_flipped_index_byte_is_a_block_checksum_error(tmp_path: Path) -> None:
    prefix = copy_bundle(KERAS[0], tmp_path)
    flip(Path(f"{prefix}.index"), 100)  # inside the first data block
    with pytest.raises(CheckpointError, match="block checksum mismatch"):
        TensorBundleReader(prefix)


def test_every_single_byte_flip_in_an_index_is_caught(tmp_path: Path) -> None:
    original = Path(f"{KERAS[0]}.index").read_bytes()
    prefix = copy_bundle(KERAS[0], tmp_path)
    index = Path(f"{prefix}.index")
    for offset in range(len(original)):
        data = bytearray(original)
        data[offset] ^= 0x40
        index.write_bytes(bytes(data))
        with pytest.raises(CheckpointError):  # the footer's padding too: it must be zeros
            open_all(prefix)


@pytest.mark.parametrize("prefix", [KERAS[0], TF1[0], SHARDED], ids=["keras", "tf1", "sharded"])
def test_truncated_index_is_a_checkpoint_error(prefix: Path, tmp_path: Path) -> None:
    original = Path(f"{prefix}.index").read_bytes()
    copy = copy_bundle(prefix, tmp_path)
    for size in sorted({0, 1, 8, 47, 48, 49, len(original) // 2, len(original) - 1}):
        Path(f"{copy}.index").write_bytes(original[:size])
        with pytest.raises(CheckpointError, match="index"):
            open_all(copy)


def test_garbage_footer_and_garbage_files_are_checkpoint_errors(tmp_path: Path) -> None:
    prefix = copy_bundle(TF1[0], tmp_path)
    index = Path(f"{prefix}.index")
    original = index.read_bytes()
    rng = np.random.default_rng(7)
    for _ in range(50):
        index.write_bytes(original[:-48] + rng.integers(0, 256, 48, dtype=np.uint8).tobytes())
        with pytest.raises(CheckpointError):
            open_all(prefix)
    # A footer with the magic but handles pointing anywhere.
    magic = struct.pack("<II", 0x8B80FB57, 0xDB477524)
    for handles in (b"\xff" * 40, b"\x00" * 40, b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01"):
        index.write_bytes(original[:-48] + handles.ljust(40, b"\0")[:40] + magic)
        with pytest.raises(CheckpointError):
            open_all(prefix)
    index.write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError):
        open_all(prefix)
    index.unlink()
    with pytest.raises(CheckpointError, match="no such file"):
        TensorBundleReader(prefix)
    index.mkdir()
    with pytest.raises(CheckpointError, match="directory"):
        TensorBundleReader(prefix)


def test_random_index_corruption_never_escapes_as_another_exception(tmp_path: Path) -> None:
    original = Path(f"{KERAS[0]}.index").read_bytes()
    prefix = copy_bundle(KERAS[0], tmp_path)
    index = Path(f"{prefix}.index")
    rng = np.random.default_rng(11)
    for _ in range(300):
        data = bytearray(original)
        for offset in rng.integers(0, len(data), rng.integers(1, 6)):
            data[offset] = int(rng.integers(0, 256))
        index.write_bytes(bytes(data))
        with contextlib.suppress(CheckpointError):  # any other exception fails the test
            open_all(prefix)


def test_truncated_and_missing_data_shards(tmp_path: Path) -> None:
    prefix = copy_bundle(SHARDED, tmp_path)
    shard = Path(f"{prefix}.data-00001-of-00002")
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(TruncatedCheckpointError, match="tensor '_CHECKPOINTABLE_OBJECT_GRAPH'"):
        TensorBundleReader(prefix)
    shard.write_bytes(shard.read_bytes()[:1500])
    with pytest.raises(TruncatedCheckpointError, match=r"data-00001-of-00002: tensor 'v3/"):
        TensorBundleReader(prefix)
    shard.unlink()
    with pytest.raises(CheckpointError, match=r"data-00001-of-00002: missing data shard"):
        TensorBundleReader(prefix)


def test_data_file_shrinking_after_open_is_a_truncation_error(tmp_path: Path) -> None:
    prefix = copy_bundle(TF1[0], tmp_path)
    with TensorBundleReader(prefix) as reader:
        entry = reader.entries["half/bias"]
        os.truncate(reader.data_paths[0], entry.offset + 2)
        with pytest.raises(TruncatedCheckpointError, match="tensor 'half/bias'"):
            reader.read("half/bias")


# --- snappy -------------------------------------------------------------------------------


def test_snappy_blocks_decompress() -> None:
    # "abc" as a literal, then a copy of 8 bytes from 3 back: "abcabcabcab".
    compressed = b"\x0b" + b"\x08abc" + bytes([((8 - 4) << 2) | 1, 3])
    assert decompress_snappy(compressed) == b"abcabcabcab"
    raw = compressed + b"\x01"
    block = check_block(raw + struct.pack("<I", mask(crc32c(raw))), "test")
    assert block == b"abcabcabcab"
    for bad in (b"\x05\x08abc", b"\x0b" + bytes([((8 - 4) << 2) | 1, 3]), b"\xff\xff\xff\xff\x7f"):
        with pytest.raises(ValueError):
            decompress_snappy(bad)
    with pytest.raises(TableError, match="checksum"):
        check_block(raw + b"\0\0\0\0", "test")


# --- TensorFlow reads what we write (only where TensorFlow is installed) ------------------


def test_tensorflow_reads_our_bundle(tmp_path: Path) -> None:
    tf = pytest.importorskip("tensorflow")
    arrays = every_dtype()
    strings = [b"hello", b"", b"\x00\xff"]
    data, _ = encode_string_tensor(strings)
    items: list[tuple[str, np.ndarray | EntrySpec]] = list(arrays.items())
    items.append(("names", EntrySpec.verbatim("names", DT_STRING, (3,), data)))
    write_bundle(tmp_path / "ours", items, block_elements=333)
    reader = tf.train.load_checkpoint(str(tmp_path / "ours"))
    assert reader.get_variable_to_shape_map().keys() == {*arrays, "names"}
    for name, want in arrays.items():
        got = reader.get_tensor(name)
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)
    assert list(reader.get_tensor("names")) == strings
    # A TF2 checkpoint rewritten by us restores through TF's object-graph machinery too.
    ours = rewrite(KERAS[-1], tmp_path, reverse_blocks=True)
    theirs = tf.train.load_checkpoint(str(KERAS[-1]))
    mine = tf.train.load_checkpoint(str(ours))
    for name in theirs.get_variable_to_shape_map():
        np.testing.assert_array_equal(mine.get_tensor(name), theirs.get_tensor(name))
