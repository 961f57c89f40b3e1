"""Sharded safetensors folders: reading the Hugging Face layout, writing it, and failing clearly.

Inputs are made with the reference writer (``safetensors.numpy.save_file``); outputs are checked
with the reference reader, so both directions are tested against the library, not ourselves.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from ema_cli import engine
from ema_cli.checkpoint import TensorInfo
from ema_cli.errors import CheckpointError, OptionError, OutputError, TruncatedCheckpointError
from ema_cli.formats import find_checkpoint, format_of, open_checkpoint, registry
from ema_cli.formats.base import CheckpointReader, iter_blocks
from ema_cli.formats.safetensors import SafetensorsReader
from ema_cli.formats.sharded import (
    DEFAULT_MAX_SHARD_SIZE,
    DEFAULT_OPEN_SHARDS,
    INDEX_NAME,
    SINGLE_NAME,
    TORCH_LAYOUT,
    ShardedReader,
    ShardedWriter,
    parse_size,
    shard_file_names,
    split_into_shards,
)
from ema_cli.formats.torch_zip import TorchShardedReader, TorchShardedWriter, TorchZipReader
from ema_cli.plan import Settings, build_plan, order_checkpoints
from ema_cli.replay import replay
from tests.conftest import infos, snapshot

META = {"format": "pt"}


def shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def make_folder(
    folder: Path,
    shards: Sequence[Mapping[str, np.ndarray]],
    metadata: Mapping[str, str] | None = None,
    side: Mapping[str, str] | None = None,
) -> Path:
    """A Hugging Face sharded folder made with the reference writer, plus side files."""
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, tensors in enumerate(shards, 1):
        name = shard_name(i, len(shards))
        safetensors.numpy.save_file(
            {k: np.asarray(v, order="C") for k, v in tensors.items()},
            str(folder / name),
            metadata=dict(metadata or META),
        )
        weight_map.update(dict.fromkeys(tensors, name))
    total = sum(v.nbytes for tensors in shards for v in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
    for name, text in (side or {}).items():
        (folder / name).write_text(text)
    return folder


def write_all(writer: ShardedWriter, arrays: Mapping[str, np.ndarray], block: int = 3) -> None:
    """Store every tensor in blocks of ``block`` elements from two threads, the replay's way."""
    jobs = [
        (name, start, np.ascontiguousarray(value).reshape(-1)[start:stop])
        for name, value in arrays.items()
        for start, stop in iter_blocks(value.size, block)
    ]
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda job: writer.write(*job), reversed(jobs)))


def save(
    folder: Path,
    arrays: Mapping[str, np.ndarray],
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    template: CheckpointReader | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    with ShardedWriter(
        folder, infos(arrays), metadata or META, template, max_shard_size=max_shard_size
    ) as writer:
        write_all(writer, arrays)
        writer.commit()
    return folder


def load_folder(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """What a Hugging Face loader sees: every indexed tensor, and the weight map."""
    if not (folder / INDEX_NAME).exists():
        return safetensors.numpy.load_file(str(folder / SINGLE_NAME)), {}
    weight_map = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
    loaded: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        for name, value in safetensors.numpy.load_file(str(folder / shard)).items():
            assert weight_map[name] == shard
            loaded[name] = value
    return loaded, weight_map


def assert_same(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> None:
    assert list(a) == list(b) or sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


@pytest.fixture
def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "embed.weight": rng.standard_normal((5, 4)).astype(ml_dtypes.bfloat16),
        "layer.0.weight": rng.standard_normal((4, 4)).astype(np.float32),
        "layer.0.bias": rng.standard_normal(4).astype(np.float32),
        "layer.1.weight": rng.standard_normal((4, 4)).astype(np.float16),
        "step": np.array(7, dtype=np.int64),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }


# --- reading ---------------------------------------------------------------------------------


def test_reads_a_sharded_folder_as_one_checkpoint(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    first = {"b": rng.standard_normal(6).astype(np.float32), "a": np.arange(3, dtype=np.int32)}
    second = {"c": rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16)}
    folder = make_folder(tmp_path / "ckpt-100", [first, second], {"format": "pt", "who": "1"})

    with ShardedReader(folder) as reader:
        assert reader.path == folder
        # Shard by shard; within a shard the file order (the reference writer sorts by dtype).
        names_in_file = list(SafetensorsReader(folder / shard_name(1, 2)).tensors)
        assert list(reader.tensors) == [*names_in_file, "c"]
        assert reader.tensors["c"] == TensorInfo("c", np.dtype(ml_dtypes.bfloat16), (2, 3))
        assert reader.metadata == {"format": "pt", "who": "1"}
        assert reader.shard_files["c"] == shard_name(2, 2)
        for name, value in {**first, **second}.items():
            assert reader.read(name).tobytes() == value.tobytes()
        out = np.empty(3, dtype=np.float32)
        assert reader.read("b", 2, 5, out=out) is out
        np.testing.assert_array_equal(out, first["b"][2:5])


def test_find_checkpoint_still_takes_a_folder_with_one_model_file(tmp_path: Path) -> None:
    value = np.arange(4, dtype=np.float32)
    safetensors.numpy.save_file({"w": value}, str(tmp_path / SINGLE_NAME), metadata=META)
    assert find_checkpoint(tmp_path) == tmp_path / SINGLE_NAME
    with ShardedReader(tmp_path) as reader:  # and the sharded reader reads it as one shard
        assert list(reader.tensors) == ["w"]
        np.testing.assert_array_equal(reader.read("w"), value)


def test_tensors_a_shard_holds_but_the_index_does_not_list_are_ignored(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "m", [{"a": np.ones(2, np.float32)}, {"b": np.ones(1)}])
    index = json.loads((folder / INDEX_NAME).read_text())
    del index["weight_map"]["b"]
    index["weight_map"]["a2"] = shard_name(1, 2)
    (folder / INDEX_NAME).write_text(json.dumps(index))
    safetensors.numpy.save_file(
        {"a": np.ones(2, np.float32), "a2": np.zeros(1, np.float32), "stray": np.ones(1)},
        str(folder / shard_name(1, 2)),
    )
    with ShardedReader(folder) as reader:
        assert sorted(reader.tensors) == ["a", "a2"]
        # The second shard is no longer in the index at all, so it is never opened.
        assert reader.unindexed == {"stray": shard_name(1, 2)}


@pytest.mark.parametrize("max_open", [1, 2])
def test_shards_are_opened_lazily_and_few_at_a_time(tmp_path: Path, max_open: int) -> None:
    shards = [{f"t{i}": np.full(50, i, dtype=np.float32)} for i in range(12)]
    folder = make_folder(tmp_path / "m", shards)
    fds_before = len(os.listdir("/proc/self/fd")) if Path("/proc/self/fd").is_dir() else None
    with ShardedReader(folder, max_open_shards=max_open) as reader:
        assert reader.open_shards == 0
        errors: list[BaseException] = []

        def work(offset: int) -> None:
            try:
                for _ in range(20):
                    for i in range(offset, 12, 2):
                        np.testing.assert_array_equal(reader.read(f"t{i}", 10, 20), i)
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert reader.open_shards <= max_open
        if fds_before is not None:
            assert len(os.listdir("/proc/self/fd")) <= fds_before + max_open
    assert reader.open_shards == 0
    with pytest.raises(ValueError, match="closed"):
        reader.read("t0")


# --- reading: errors ------------------------------------------------------------------------


def broken(tmp_path: Path) -> Path:
    return make_folder(
        tmp_path / "ckpt-5",
        [{"a": np.ones(4, np.float32), "b": np.ones(2, np.float32)}, {"c": np.ones(8, np.float32)}],
    )


def test_index_that_is_not_json(tmp_path: Path) -> None:
    folder = broken(tmp_path)
    (folder / INDEX_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="not a safetensors index \\(index is not JSON") as e:
        ShardedReader(folder)
    assert e.value.path == str(folder / INDEX_NAME)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (
            '{"weight_map": {"a": "model-00001-of-00002.safetensors", '
            '"a": "model-00002-of-00002.safetensors", "c": "model-00002-of-00002.safetensors"}}',
            "corrupt index: 'a' is listed twice",
        ),
        ('{"metadata": {"total_size": ' + "9" * 5000 + "}}", "an integer of 5000 digits"),
        ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),
        ('{"weight_map": {"\\ud800": "x.safetensors"}}', "weight_map"),
    ],
    ids=["duplicate-tensor", "huge-integer", "deep", "lone-surrogate"],
)
def test_hostile_index_json_is_one_checkpoint_error(tmp_path: Path, text: str, says: str) -> None:
    """A tensor listed twice (json would keep the last silently), an integer longer than
    Python's digit limit, nesting 100,000 deep: each a CheckpointError naming the index."""
    folder = broken(tmp_path)
    (folder / INDEX_NAME).write_text(text)
    with pytest.raises(CheckpointError, match=says) as e:
        ShardedReader(folder)
    assert e.value.path == str(folder / INDEX_NAME)


def test_the_index_total_size_is_not_trusted(tmp_path: Path) -> None:
    """``metadata.total_size`` is informational (from_pretrained does not check it): a wrong
    one is read like a right one, and the sizes come from the shards' headers."""
    folder = broken(tmp_path)
    index = json.loads((folder / INDEX_NAME).read_text())
    index["metadata"] = {"total_size": 1}
    (folder / INDEX_NAME).write_text(json.dumps(index))
    with ShardedReader(folder) as reader:
        assert sum(t.nbytes for t in reader.tensors.values()) == 56


@pytest.mark.parametrize(
    "index", [{"metadata": {}}, {"weight_map": []}, [1, 2], {"weight_map": {}}]
)
def test_index_without_a_weight_map(tmp_path: Path, index: object) -> None:
    folder = broken(tmp_path)
    (folder / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="weight_map") as e:
        ShardedReader(folder)
    assert str(e.value).startswith(f"{folder / INDEX_NAME}: ")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/x.safetensors", "x.bin", 3])
def test_index_naming_a_file_outside_the_folder_or_not_a_shard(
    tmp_path: Path, shard: object
) -> None:
    folder = broken(tmp_path)
    index = json.loads((folder / INDEX_NAME).read_text())
    index["weight_map"]["c"] = shard
    (folder / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        ShardedReader(folder)
    assert str(e.value).startswith(f"{folder / INDEX_NAME}: tensor 'c': weight_map names ")


def test_missing_shard_names_the_shard_and_a_tensor(tmp_path: Path) -> None:
    folder = broken(tmp_path)
    (folder / shard_name(2, 2)).unlink()
    with pytest.raises(CheckpointError) as e:
        ShardedReader(folder)
    assert str(e.value) == (
        f"{folder / shard_name(2, 2)}: tensor 'c': shard listed in {INDEX_NAME} is missing"
    )


def test_index_tensor_missing_from_its_shard(tmp_path: Path) -> None:
    folder = broken(tmp_path)
    safetensors.numpy.save_file({"a": np.ones(4, np.float32)}, str(folder / shard_name(1, 2)))
    with pytest.raises(CheckpointError) as e:
        ShardedReader(folder)
    assert str(e.value) == (
        f"{folder / shard_name(1, 2)}: tensor 'b': missing from this shard "
        f"({INDEX_NAME} maps it here)"
    )
    assert e.value.tensor == "b"


def test_truncated_shard_reports_the_shard(tmp_path: Path) -> None:
    folder = broken(tmp_path)
    shard = folder / shard_name(2, 2)
    shard.write_bytes(shard.read_bytes()[:-5])
    with pytest.raises(TruncatedCheckpointError) as e:
        ShardedReader(folder)
    assert e.value.path == str(shard)
    assert "truncated" in str(e.value) and "'c'" in str(e.value)


def test_a_folder_without_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=f"holds neither {INDEX_NAME} nor {SINGLE_NAME}"):
        ShardedReader(tmp_path)


def test_a_shard_that_changes_after_opening_is_caught(tmp_path: Path) -> None:
    folder = broken(tmp_path)
    with ShardedReader(folder) as reader:
        safetensors.numpy.save_file({"c": np.ones(9, np.float32)}, str(folder / shard_name(2, 2)))
        with pytest.raises(CheckpointError, match="changed since the checkpoint was opened"):
            reader.read("c")


# --- shard splitting -------------------------------------------------------------------------


def sized(*sizes: int) -> list[TensorInfo]:
    return [TensorInfo(f"t{i}", np.dtype(np.uint8), (n,)) for i, n in enumerate(sizes)]


def split_sizes(sizes: Sequence[int], limit: int) -> list[list[int]]:
    return [[t.nbytes for t in shard] for shard in split_into_shards(sized(*sizes), limit)]


def test_split_follows_hugging_face_order_not_best_fit() -> None:
    """Same rule as huggingface_hub.split_state_dict_into_shards (not imported: not a dependency)."""
    # The example of transformers' documentation (GB -> bytes): [6], [6+2], [6+2+2].
    assert split_sizes([6, 6, 2, 6, 2, 2], 10) == [[6], [6, 2], [6, 2, 2]]


def test_split_at_the_limit_and_past_it() -> None:
    assert split_sizes([4, 6, 1], 10) == [[4, 6], [1]]  # exactly at the limit stays together
    # Too big: a shard of its own at once, and the open shard stays open (huggingface_hub's rule).
    assert split_sizes([3, 25, 3], 10) == [[25], [3, 3]]
    assert split_sizes([3, 25, 30, 8], 10) == [[25], [30], [3], [8]]
    assert split_sizes([25, 0, 3], 10) == [[25], [0, 3]]
    assert split_sizes([11], 10) == [[11]]
    assert split_sizes([0, 0, 10, 0], 10) == [[0, 0, 10, 0]]
    assert split_sizes([], 10) == [[]]
    with pytest.raises(ValueError):
        split_into_shards(sized(1), 0)


def test_shard_names() -> None:
    assert shard_file_names(1) == ["model.safetensors"]
    assert shard_file_names(3) == [shard_name(i, 3) for i in (1, 2, 3)]
    assert shard_file_names(3)[0] == "model-00001-of-00003.safetensors"


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("5GB", 5_000_000_000),
        ("10", 10),
        ("10B", 10),
        ("1kB", 1000),
        ("1KB", 1000),
        ("2MB", 2_000_000),
        ("1TB", 10**12),
        ("1KiB", 1024),
        ("500MiB", 500 * 2**20),
        ("2GiB", 2 * 2**30),
        ("1.5GB", 1_500_000_000),
        (" 3 GB ", 3_000_000_000),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "5 gigs", "5gb", "5Gb", "-1GB", "0", "0.1B", "1e9"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=f"invalid size {text!r}"):
        parse_size(text)


# --- writing ---------------------------------------------------------------------------------


def test_written_folder_loads_with_the_reference_reader(
    tmp_path: Path, arrays: dict[str, np.ndarray]
) -> None:
    out = save(tmp_path / "ema", arrays, max_shard_size=70)
    loaded, weight_map = load_folder(out)
    assert_same(loaded, arrays)
    assert sorted(weight_map) == sorted(arrays)
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["metadata"] == {"total_size": sum(v.nbytes for v in arrays.values())}
    assert (out / INDEX_NAME).read_text() == json.dumps(index, indent=2, sort_keys=True) + "\n"
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards == sorted(set(weight_map.values()))
    n = len(shards)
    assert n > 1 and shards == [shard_name(i, n) for i in range(1, n + 1)]
    for shard in shards:
        with safe_open(str(out / shard), framework="numpy") as f:
            assert f.metadata() == META
    with ShardedReader(out) as reader:  # and we read it back
        assert sorted(reader.tensors) == sorted(arrays)
        for name, value in arrays.items():
            assert reader.read(name).tobytes() == value.tobytes()


def test_shards_follow_the_tensor_order_and_the_limit(tmp_path: Path) -> None:
    arrays = {
        "a": np.zeros(2, np.float32),  # 8 bytes
        "b": np.zeros(3, np.float32),  # 12: 8 + 12 = 20, exactly the limit
        "c": np.zeros(1, np.float32),  # 4: closes the first shard, opens the next
        "huge": np.zeros(30, np.float32),  # 120: bigger than the limit, a shard of its own
        "d": np.zeros(0, np.float32),  # back in the shard "c" opened
        "e": np.array(1.0, np.float64),
    }
    out = save(tmp_path / "ema", arrays, max_shard_size=20)
    _, weight_map = load_folder(out)
    assert weight_map == {
        "a": shard_name(1, 3),
        "b": shard_name(1, 3),
        "huge": shard_name(2, 3),
        "c": shard_name(3, 3),
        "d": shard_name(3, 3),
        "e": shard_name(3, 3),
    }


def test_one_shard_is_model_safetensors_without_index(
    tmp_path: Path, arrays: dict[str, np.ndarray]
) -> None:
    out = save(tmp_path / "ema", arrays)
    assert sorted(p.name for p in out.iterdir()) == [SINGLE_NAME]
    assert_same(safetensors.numpy.load_file(str(out / SINGLE_NAME)), arrays)
    assert find_checkpoint(out) == out / SINGLE_NAME


def test_scalars_and_empty_tensors(tmp_path: Path) -> None:
    arrays = {
        "scalar": np.array(3.5, np.float32),
        "bf16_scalar": np.array(-2, ml_dtypes.bfloat16),
        "empty": np.zeros((0,), np.float16),
        "empty_2d": np.zeros((4, 0), np.float32),
        "bool": np.array([True, False]),
    }
    out = save(tmp_path / "ema", arrays, max_shard_size=4)
    loaded, _ = load_folder(out)
    assert_same(loaded, arrays)
    with ShardedReader(out) as reader:
        assert reader.tensors["scalar"].shape == ()
        assert reader.read("empty_2d").shape == (0,)


def test_same_input_gives_the_same_bytes(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    template = make_folder(tmp_path / "in", [arrays], side={"config.json": "{}"})
    with ShardedReader(template) as reader:
        one = save(tmp_path / "one", arrays, max_shard_size=50, template=reader)
        two = save(tmp_path / "two", dict(reversed(arrays.items())), 50, reader)
        three = save(tmp_path / "three", arrays, max_shard_size=50, template=reader)
    assert snapshot(one) == snapshot(three)
    assert snapshot(one).keys() == snapshot(two).keys()  # the order given decides the shards


def test_side_files_are_copied_and_other_weights_are_not(
    tmp_path: Path, arrays: dict[str, np.ndarray]
) -> None:
    side = {
        "config.json": '{"model_type": "x"}',
        "generation_config.json": "{}",
        "tokenizer.json": '{"v": 1}',
        "tokenizer_config.json": "{}",
        "special_tokens_map.json": "{}",
        "README.md": "# model",
        "pytorch_model.bin": "stale weights",
        "pytorch_model.bin.index.json": "{}",
        "tf_model.h5": "stale",
        "flax_model.msgpack": "stale",
        "consolidated.safetensors": "stale",
        ".gitattributes": "*.safetensors filter=lfs",
    }
    template = make_folder(tmp_path / "checkpoint-9", [arrays], side=side)
    (template / "original").mkdir()
    (template / "original" / "params.json").write_text("{}")
    (tmp_path / "real-vocab.txt").write_text("a\nb\n")
    (template / "vocab.txt").symlink_to(tmp_path / "real-vocab.txt")  # a hub cache snapshot

    with ShardedReader(template) as reader:
        out = save(tmp_path / "ema", arrays, max_shard_size=60, template=reader)
    copied = {p.name for p in out.iterdir() if not p.name.endswith(".safetensors")} - {INDEX_NAME}
    expected = {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "README.md",
        "vocab.txt",
    }
    assert copied == expected
    for name in expected - {"vocab.txt"}:
        assert (out / name).read_text() == side[name]
    assert not (out / "vocab.txt").is_symlink()
    assert (out / "vocab.txt").read_text() == "a\nb\n"


def test_side_files_come_from_a_model_safetensors_folder_only(
    tmp_path: Path, arrays: dict[str, np.ndarray]
) -> None:
    model = tmp_path / "model-dir"
    model.mkdir()
    safetensors.numpy.save_file(arrays, str(model / SINGLE_NAME), metadata=META)
    (model / "config.json").write_text("{}")
    with SafetensorsReader(model / SINGLE_NAME) as reader:
        out = save(tmp_path / "ema1", arrays, template=reader)
    assert (out / "config.json").is_file()

    run = tmp_path / "run"
    run.mkdir()
    safetensors.numpy.save_file(arrays, str(run / "ckpt-5.safetensors"), metadata=META)
    (run / "train.log").write_text("not part of a model")
    with SafetensorsReader(run / "ckpt-5.safetensors") as reader:
        out = save(tmp_path / "ema2", arrays, template=reader)
    assert sorted(p.name for p in out.iterdir()) == [SINGLE_NAME]


# --- atomicity -------------------------------------------------------------------------------


def test_nothing_appears_before_commit_and_abort_leaves_nothing(
    tmp_path: Path, arrays: dict[str, np.ndarray]
) -> None:
    template = make_folder(tmp_path / "in", [arrays], side={"config.json": "{}"})
    before = sorted(tmp_path.iterdir())
    with ShardedReader(template) as reader:
        writer = ShardedWriter(tmp_path / "ema", infos(arrays), META, reader, max_shard_size=40)
        write_all(writer, arrays)
        assert not (tmp_path / "ema").exists()
        hidden = [p.name for p in tmp_path.iterdir() if p.name.startswith(".ema.tmp-")]
        assert len(hidden) == 1
        writer.abort()
        writer.abort()  # idempotent
    assert sorted(tmp_path.iterdir()) == before
    with pytest.raises(RuntimeError):
        writer.write("step", 0, arrays["step"].reshape(-1))


def test_leaving_the_block_without_commit_or_with_an_error_discards(
    tmp_path: Path, arrays: dict[str, np.ndarray]
) -> None:
    before = sorted(tmp_path.iterdir())
    with ShardedWriter(tmp_path / "ema", infos(arrays), META) as writer:
        write_all(writer, arrays)
    assert sorted(tmp_path.iterdir()) == before
    with pytest.raises(KeyError), ShardedWriter(tmp_path / "ema", infos(arrays), META) as writer:
        writer.write("nope", 0, np.zeros(1, np.float32))
    assert sorted(tmp_path.iterdir()) == before


def test_commit_refuses_an_incomplete_output(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    with ShardedWriter(tmp_path / "ema", infos(arrays), META) as writer:
        writer.write("layer.0.bias", 0, arrays["layer.0.bias"])
        with pytest.raises(RuntimeError, match="internal error: wrote 16 of"):
            writer.commit()
    assert list(tmp_path.iterdir()) == []


def test_commit_replaces_an_earlier_output(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    out = save(tmp_path / "ema", {"old": np.ones(100, np.float32)}, max_shard_size=100)
    (out / "old-notes.txt").write_text("from the earlier run")
    save(out, arrays)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema"]  # no temporaries left
    assert sorted(p.name for p in out.iterdir()) == [SINGLE_NAME]
    assert_same(safetensors.numpy.load_file(str(out / SINGLE_NAME)), arrays)
    save(out, arrays, max_shard_size=40)  # single file -> shards
    assert_same(load_folder(out)[0], arrays)
    (tmp_path / "empty").mkdir()
    save(tmp_path / "empty", arrays)


def test_an_output_symlink_is_replaced_not_its_target(
    tmp_path: Path, arrays: dict[str, np.ndarray]
) -> None:
    target = save(tmp_path / "ema-v1", {"v1": np.ones(1, np.float32)})
    (tmp_path / "latest").symlink_to(target)
    save(tmp_path / "latest", arrays)
    assert not (tmp_path / "latest").is_symlink()
    assert list(load_folder(target)[0]) == ["v1"]


@pytest.mark.parametrize("what", ["file", "not a checkpoint", "subfolder"])
def test_refuses_to_replace_what_is_not_an_earlier_output(
    tmp_path: Path, arrays: dict[str, np.ndarray], what: str
) -> None:
    dest = tmp_path / "dest"
    if what == "file":
        dest.write_text("precious")
    else:
        dest.mkdir()
        (dest / "notes.txt").write_text("precious")
        if what == "subfolder":
            (dest / SINGLE_NAME).write_text("x")
            (dest / ".git").mkdir()
    before = snapshot(tmp_path)
    with pytest.raises(OptionError, match=f"^{dest}: .*refusing to replace it"):
        ShardedWriter(dest, infos(arrays), META)
    assert snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]


def test_refuses_an_output_folder_holding_the_template(
    tmp_path: Path, arrays: dict[str, np.ndarray]
) -> None:
    folder = make_folder(tmp_path / "ckpt-3", [arrays])
    with ShardedReader(folder) as reader, pytest.raises(OptionError, match="would replace"):
        ShardedWriter(folder, infos(arrays), META, reader)
    (tmp_path / "run").mkdir()
    safetensors.numpy.save_file(arrays, str(tmp_path / "run" / SINGLE_NAME))
    with (
        SafetensorsReader(tmp_path / "run" / SINGLE_NAME) as reader,
        pytest.raises(OptionError, match="would replace the input checkpoint"),
    ):
        ShardedWriter(tmp_path / "run", infos(arrays), META, reader)


def test_commit_rechecks_the_destination(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    with ShardedWriter(tmp_path / "ema", infos(arrays), META) as writer:
        write_all(writer, arrays)
        (tmp_path / "ema").mkdir()
        (tmp_path / "ema" / "data.csv").write_text("appeared during the replay")
        with pytest.raises(OptionError, match="refusing to replace it"):
            writer.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema"]
    assert (tmp_path / "ema" / "data.csv").read_text() == "appeared during the replay"


def test_a_full_disk_is_an_output_error_and_leaves_nothing(
    tmp_path: Path, arrays: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with ShardedWriter(tmp_path / "ema", infos(arrays), META) as writer:
        monkeypatch.setattr(os, "pwrite", full)
        with pytest.raises(OutputError) as e:
            writer.write("layer.0.bias", 0, arrays["layer.0.bias"])
        monkeypatch.undo()
    assert str(e.value) == f"{tmp_path / 'ema'}: cannot write: {os.strerror(errno.ENOSPC)}"
    assert list(tmp_path.iterdir()) == []


def test_write_checks_dtype_and_range(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    with ShardedWriter(tmp_path / "ema", infos(arrays), META) as writer:
        with pytest.raises(TypeError):
            writer.write("layer.0.bias", 0, np.zeros(4, np.float64))
        with pytest.raises(ValueError, match="outside"):
            writer.write("layer.0.bias", 2, np.zeros(4, np.float32))


# --- properties and the replay ----------------------------------------------------------------

dtypes = st.sampled_from(
    [np.float32, np.float16, ml_dtypes.bfloat16, np.float64, np.int64, np.uint8, np.bool_]
)
shapes = st.lists(st.integers(0, 4), max_size=3).map(tuple)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    specs=st.lists(st.tuples(dtypes, shapes), min_size=1, max_size=8),
    limit=st.integers(1, 200),
    seed=st.integers(0, 2**16),
)
def test_write_read_round_trip(
    tmp_path_factory: pytest.TempPathFactory,
    specs: list[tuple[type, tuple[int, ...]]],
    limit: int,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    arrays = {
        f"t{i}": rng.integers(0, 255, size=shape, dtype=np.uint8).astype(dtype)
        for i, (dtype, shape) in enumerate(specs)
    }
    out = save(tmp_path_factory.mktemp("rt") / "ema", arrays, max_shard_size=limit)
    loaded, weight_map = load_folder(out)
    assert_same(loaded, arrays)
    expected = split_into_shards(infos(arrays), limit)
    assert len(set(weight_map.values())) == (len(expected) if len(expected) > 1 else 0)
    assert sorted(t.name for shard in expected for t in shard) == sorted(arrays)
    for shard in expected:
        if any(t.nbytes > limit for t in shard):
            assert len(shard) == 1
        else:
            assert sum(t.nbytes for t in shard) <= limit
    with ShardedReader(out) as reader:
        assert {n: reader.read(n).tobytes() for n in arrays} == {
            n: v.tobytes() for n, v in arrays.items()
        }


def test_replay_from_sharded_folders_into_a_sharded_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    paths = []
    for step in (1, 2, 3):
        w = rng.standard_normal((40, 3)).astype(np.float32)
        b = rng.standard_normal(3).astype(ml_dtypes.bfloat16)
        shards = [{"w": w}, {"b": b, "step": np.array(step, np.int64)}]
        paths.append(
            make_folder(tmp_path / f"checkpoint-{step}", shards, side={"config.json": "{}"})
        )
    plan_settings = Settings(decay=0.5)
    ordered = order_checkpoints([str(p) for p in paths], plan_settings)
    readers = [ShardedReader(p, max_open_shards=1) for p in paths]
    plan = build_plan(ordered, [r.tensors for r in readers], plan_settings)
    with ShardedWriter(
        tmp_path / "ema", plan.output_tensors, META, readers[-1], max_shard_size=200
    ) as writer:
        for _ in replay(plan, readers, writer, block_bytes=64):
            pass
        writer.commit()
    for reader in readers:
        reader.close()

    loaded, weight_map = load_folder(tmp_path / "ema")
    assert len(set(weight_map.values())) == 2
    assert (tmp_path / "ema" / "config.json").read_text() == "{}"
    inputs = [load_folder(p)[0] for p in paths]
    c = engine.coefficient(np.float32(0.5), np.dtype(np.float32))
    shadow = inputs[0]["w"].copy()
    for x in inputs[1:]:
        shadow -= (shadow - x["w"]) * c
    np.testing.assert_array_equal(loaded["w"], shadow)
    assert loaded["step"] == 3


# --- Hugging Face folders of torch weights ---------------------------------------------------
# The fixtures are folders torch made (tests/fixtures/torch/make_torch_fixtures.py); each shard
# is a torch file whose reading is checked against torch in test_torch_format.py, so here the
# folder is checked against its own shards, read one by one.

TORCH_SHARDED = Path(__file__).resolve().parent / "fixtures" / "torch" / "sharded"
TORCH_INDEX = TORCH_LAYOUT.index_name
TIED = ("embed.weight", "head.weight")


def torch_shard(i: int, n: int) -> str:
    return f"pytorch_model-{i:05d}-of-{n:05d}.bin"


def torch_folder(tmp_path: Path, step: int = 100) -> Path:
    """A copy of a fixture folder that a test may break."""
    folder = tmp_path / f"checkpoint-{step}"
    shutil.copytree(TORCH_SHARDED / f"checkpoint-{step}", folder)
    return folder


def shard_by_shard(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of the folder's index, read from its shard with the single-file reader."""
    weight_map = json.loads((folder / TORCH_INDEX).read_text())["weight_map"]
    found: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        with TorchZipReader(folder / shard) as reader:
            for name, info in reader.tensors.items():
                assert weight_map[name] == shard
                found[name] = reader.read(name).reshape(info.shape)
    return found


def test_split_keeps_tensors_that_share_storage_in_one_shard() -> None:
    tensors = sized(4, 4, 4, 4)  # t0..t3
    assert split_sizes([4, 4, 4, 4], 8) == [[4, 4], [4, 4]]
    grouped = split_into_shards(tensors, 8, together=[("t3", "t0")])
    # t3 follows t0 (the first of the group in tensor order), uncounted.
    assert [[t.name for t in shard] for shard in grouped] == [["t0", "t1", "t3"], ["t2"]]
    grouped = split_into_shards(tensors, 8, together=[("t1", "t0")])
    assert [[t.name for t in shard] for shard in grouped] == [["t0", "t1", "t2"], ["t3"]]
    # A group whose other members are not written is no group.
    assert split_into_shards(tensors, 8, together=[("t0", "gone")]) == split_into_shards(tensors, 8)


def test_a_sharded_torch_folder_reads_as_one_checkpoint() -> None:
    folder = TORCH_SHARDED / "checkpoint-200"
    assert find_checkpoint(folder) == folder
    assert format_of(folder) == registry.by_name("torch folder")
    want = shard_by_shard(folder)
    with open_checkpoint(folder) as reader:
        assert isinstance(reader, TorchShardedReader)
        assert list(reader.tensors)[:2] == list(TIED)  # shard by shard, file order within
        assert sorted(reader.tensors) == sorted(want)
        for name, info in reader.tensors.items():
            assert reader.read(name).reshape(info.shape).tobytes() == want[name].tobytes()
        assert reader.shared_tensors == (TIED,)
        assert reader.shard_files["head.weight"] == torch_shard(1, 2)
        assert reader.non_tensors == ()


def test_a_folder_holding_both_formats_is_read_through_its_safetensors(tmp_path: Path) -> None:
    folder = torch_folder(tmp_path)
    assert find_checkpoint(folder) == folder
    safetensors.numpy.save_file({"w": np.ones(2, np.float32)}, str(folder / SINGLE_NAME))
    assert find_checkpoint(folder) == folder / SINGLE_NAME  # as from_pretrained prefers it


def test_torch_index_errors_name_the_file_and_tensor(tmp_path: Path) -> None:
    folder = torch_folder(tmp_path)
    index = json.loads((folder / TORCH_INDEX).read_text())

    def fails(weight_map: dict[str, str]) -> str:
        (folder / TORCH_INDEX).write_text(json.dumps({**index, "weight_map": weight_map}))
        with pytest.raises(CheckpointError) as e:
            TorchShardedReader(folder)
        return str(e.value)

    assert fails({**index["weight_map"], "proj.weight": "model-00002-of-00002.safetensors"}) == (
        f"{folder / TORCH_INDEX}: tensor 'proj.weight': weight_map names "
        "'model-00002-of-00002.safetensors', not a .bin file"
    )
    assert fails({**index["weight_map"], "proj.weight": "../x.bin"}).endswith(
        "outside the checkpoint folder"
    )
    assert fails({**index["weight_map"], "extra.weight": torch_shard(1, 2)}) == (
        f"{folder / torch_shard(1, 2)}: tensor 'extra.weight': missing from this shard "
        f"({TORCH_INDEX} maps it here)"
    )
    (folder / TORCH_INDEX).write_text("{")
    with pytest.raises(CheckpointError, match="not a torch index \\(index is not JSON"):
        TorchShardedReader(folder)


def test_a_missing_torch_shard_names_the_shard_and_a_tensor(tmp_path: Path) -> None:
    folder = torch_folder(tmp_path)
    mapped = json.loads((folder / TORCH_INDEX).read_text())["weight_map"]
    second = [n for n, shard in mapped.items() if shard == torch_shard(2, 2)]
    (folder / torch_shard(2, 2)).unlink()
    with pytest.raises(CheckpointError) as e:
        TorchShardedReader(folder)
    assert str(e.value) == (
        f"{folder / torch_shard(2, 2)}: tensor '{second[0]}': shard listed in {TORCH_INDEX} is "
        f"missing ({len(second) - 1} more tensors are mapped to it)"
    )


def test_tensors_a_torch_shard_holds_but_the_index_does_not_list_are_ignored(
    tmp_path: Path,
) -> None:
    folder = torch_folder(tmp_path)
    index = json.loads((folder / TORCH_INDEX).read_text())
    del index["weight_map"]["head.weight"]
    (folder / TORCH_INDEX).write_text(json.dumps(index))
    with TorchShardedReader(folder) as reader:
        assert "head.weight" not in reader.tensors
        assert reader.unindexed == {"head.weight": torch_shard(1, 2)}
        assert reader.shared_tensors == ()  # its tie is gone with it


def write_torch_folder(
    path: Path,
    arrays: Mapping[str, np.ndarray],
    template: CheckpointReader | None,
    max_shard_size: int,
) -> Path:
    with TorchShardedWriter(
        path, infos(arrays), {}, template, max_shard_size=max_shard_size
    ) as writer:
        write_all(writer, arrays)
        writer.commit(durable=False)
    return path


def test_torch_folder_output_keeps_ties_in_one_shard_and_its_side_files(tmp_path: Path) -> None:
    source = TORCH_SHARDED / "checkpoint-300"
    arrays = shard_by_shard(source)
    order = {
        n: i for i, n in enumerate(json.loads((source / TORCH_INDEX).read_text())["weight_map"])
    }
    with TorchShardedReader(source) as template:
        arrays = {n: arrays[n] for n in template.tensors}
        # Shards smaller than embed.weight: it gets one of its own, its tied head.weight with it.
        out = write_torch_folder(tmp_path / "ema", arrays, template, max_shard_size=300)
        again = write_torch_folder(tmp_path / "again", arrays, template, max_shard_size=300)
    assert snapshot(out) == snapshot(again)  # the same bytes every time
    names = sorted(p.name for p in out.iterdir())
    shards = [n for n in names if n.endswith(".bin")]
    assert len(shards) > 2
    assert names == sorted(
        [*shards, TORCH_INDEX, "config.json", "generation_config.json", "tokenizer.json"]
    )
    index = json.loads((out / TORCH_INDEX).read_text())
    assert index["weight_map"]["head.weight"] == index["weight_map"]["embed.weight"]
    assert sorted(index["weight_map"]) == sorted(order)
    shared_once = sum(v.nbytes for n, v in arrays.items() if n != "head.weight")
    assert index["metadata"]["total_size"] == shared_once
    assert_same(shard_by_shard(out), arrays)
    with TorchShardedReader(out) as reader:
        assert reader.shared_tensors == (TIED,)
        assert_same({n: reader.read(n).reshape(t.shape) for n, t in reader.tensors.items()}, arrays)


def test_one_torch_shard_is_pytorch_model_bin_and_keeps_ties(tmp_path: Path) -> None:
    source = TORCH_SHARDED / "checkpoint-100"
    arrays = shard_by_shard(source)
    with TorchShardedReader(source) as template:
        arrays = {n: arrays[n] for n in template.tensors}
        out = write_torch_folder(tmp_path / "ema", arrays, template, DEFAULT_MAX_SHARD_SIZE)
    assert not (out / TORCH_INDEX).exists()
    with TorchZipReader(out / TORCH_LAYOUT.single_name) as reader:
        assert [set(g) for g in reader.shared_storages.values()] == [set(TIED)]
        assert list(reader.tensors) == list(arrays)
    with TorchShardedReader(out) as reader:  # and read back as a one-shard folder
        assert_same({n: reader.read(n).reshape(t.shape) for n, t in reader.tensors.items()}, arrays)


def test_tied_tensors_given_different_values_are_refused(tmp_path: Path) -> None:
    source = TORCH_SHARDED / "checkpoint-100"
    arrays = shard_by_shard(source)
    arrays["head.weight"] = arrays["head.weight"] + 1
    with TorchShardedReader(source) as template, pytest.raises(CheckpointError) as e:
        write_torch_folder(tmp_path / "ema", arrays, template, DEFAULT_MAX_SHARD_SIZE)
    assert "tied tensors must be averaged alike" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_torch_folder_output_replaces_an_earlier_one_only(tmp_path: Path) -> None:
    arrays = {"w": np.arange(6, dtype=np.float32)}
    out = write_torch_folder(tmp_path / "ema", arrays, None, DEFAULT_MAX_SHARD_SIZE)
    arrays["w"] += 1
    write_torch_folder(out, arrays, None, DEFAULT_MAX_SHARD_SIZE)  # an earlier output: replaced
    with TorchShardedReader(out) as reader:
        np.testing.assert_array_equal(reader.read("w"), arrays["w"])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(OptionError, match="holds no model weights"):
        write_torch_folder(tmp_path / "notes", arrays, None, DEFAULT_MAX_SHARD_SIZE)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_torch_shards_are_reopened_few_at_a_time(tmp_path: Path) -> None:
    arrays = {f"t{i}": np.full(40, i, dtype=np.float32) for i in range(12)}
    fds_before = len(os.listdir("/proc/self/fd")) if Path("/proc/self/fd").is_dir() else None
    with TorchShardedWriter(tmp_path / "ema", infos(arrays), {}, None, max_shard_size=160) as w:
        assert len(w._parts) == 12
        for name, value in arrays.items():
            w.write(name, 0, value)
            if fds_before is not None:
                assert len(os.listdir("/proc/self/fd")) <= fds_before + DEFAULT_OPEN_SHARDS
        w.commit(durable=False)
    if fds_before is not None:
        assert len(os.listdir("/proc/self/fd")) <= fds_before
    assert_same(shard_by_shard(tmp_path / "ema"), arrays)
