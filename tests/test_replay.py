"""The streaming replay: block size and thread count must never change a single bit."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from ema_cli.formats import create_writer, open_checkpoint
from ema_cli.plan import Settings, build_plan, order_checkpoints
from ema_cli.replay import replay, total_bytes
from tests.conftest import write_checkpoint

SETTINGS = [
    Settings(decay=0.9),
    Settings(decay=0.999, num_updates="step", precision="native"),
    Settings(decay=0.99, zero_debias=True, num_updates="index"),
    Settings(decay=0.9, zero_debias=True, precision="native", exclude=("b*",)),
]


@pytest.fixture
def checkpoints(tmp_path: Path) -> list[str]:
    rng = np.random.default_rng(7)
    paths = []
    for step in (3, 17, 40, 41):
        values = {
            "a": rng.standard_normal((37, 11)).astype(np.float32),  # 407 elements: ragged blocks
            "b16": rng.standard_normal(129).astype(ml_dtypes.bfloat16),
            "h": (rng.standard_normal((5, 5, 3)) * 1e3).astype(np.float16),
            "d": rng.standard_normal(33),
            "scalar": np.array(rng.standard_normal(), dtype=np.float32),
            "empty": np.zeros((0, 4), np.float32),
            "ids": np.arange(10, dtype=np.int32) * step,
        }
        values["a"][0, :3] = [np.inf, -np.inf, np.nan]
        paths.append(str(write_checkpoint(tmp_path / f"ckpt-{step}.safetensors", values)))
    return paths


def run(paths: list[str], settings: Settings, out: Path, block_bytes: int, workers: int) -> bytes:
    ordered = order_checkpoints(paths, settings)
    readers = [open_checkpoint(Path(c.path)) for c in ordered]
    try:
        plan = build_plan(ordered, [r.tensors for r in readers], settings)
        with create_writer(out, plan.output_tensors, {"format": "pt"}) as writer:
            done = sum(replay(plan, readers, writer, block_bytes=block_bytes, workers=workers))
            writer.commit()
        assert done == total_bytes(plan)
    finally:
        for r in readers:
            r.close()
    return out.read_bytes()


@pytest.mark.parametrize("settings", SETTINGS, ids=range(len(SETTINGS)))
def test_block_size_and_threads_do_not_change_the_bytes(
    checkpoints: list[str], settings: Settings, tmp_path: Path
) -> None:
    reference = run(checkpoints, settings, tmp_path / "ref.safetensors", 1 << 20, 1)
    for block_bytes in (2, 8, 100, 4096):
        for workers in (1, 2, 3):
            got = run(checkpoints, settings, tmp_path / "x.safetensors", block_bytes, workers)
            assert got == reference, (block_bytes, workers)


@pytest.mark.parametrize("settings", SETTINGS, ids=range(len(SETTINGS)))
def test_sharded_folders_give_the_same_tensors_as_single_files(
    checkpoints: list[str], settings: Settings, tmp_path: Path
) -> None:
    """The same checkpoints as 2-shard folders, through a sharded output with a shard boundary
    inside the tensor list and blocks that straddle nothing in particular: bit for bit."""
    from ema_cli.formats.sharded import ShardedWriter
    from tests.conftest import load
    from tests.test_sharded import load_folder, make_folder

    folders = []
    for path in checkpoints:
        tensors = load(Path(path))
        names = sorted(tensors)
        step = Path(path).stem.split("-")[1]
        shards = [{n: tensors[n] for n in names[:3]}, {n: tensors[n] for n in names[3:]}]
        folders.append(str(make_folder(tmp_path / "sharded" / f"checkpoint-{step}", shards)))

    single = load(_write(checkpoints, settings, tmp_path / "single.safetensors", 100))
    ordered = order_checkpoints(folders, settings)
    readers = [open_checkpoint(Path(c.path)) for c in ordered]
    try:
        plan = build_plan(ordered, [r.tensors for r in readers], settings)
        writer = ShardedWriter(tmp_path / "out", plan.output_tensors, {"format": "pt"}, None, 2000)
        with writer:
            for _ in replay(plan, readers, writer, block_bytes=100, workers=2):
                pass
            writer.commit()
    finally:
        for r in readers:
            r.close()
    sharded, weight_map = load_folder(tmp_path / "out")
    assert len(set(weight_map.values())) > 1  # really sharded
    assert sharded.keys() == single.keys()
    for name in single:
        assert sharded[name].dtype == single[name].dtype
        assert sharded[name].tobytes() == single[name].tobytes(), name


def _write(paths: list[str], settings: Settings, out: Path, block_bytes: int) -> Path:
    run(paths, settings, out, block_bytes, 2)
    return out


def test_read_buffers_sit_at_the_data_offset_within_a_page(checkpoints: list[str]) -> None:
    """x86 kernels copy up to 6x slower into a buffer 1-31 bytes past the source's page offset;
    the replay places each read buffer at the file data's own offset within a 4 KiB page."""
    from ema_cli.replay import Average, Outputs, Source, _Replayer

    settings = Settings(decay=0.9)
    ordered = order_checkpoints(checkpoints, settings)
    readers = [open_checkpoint(Path(c.path)) for c in ordered]
    try:
        plan = build_plan(ordered, [r.tensors for r in readers], settings)
        sources = [Source.of(r) for r in readers]
        replayer = _Replayer([Average.of(plan, Outputs({}))], sources, [r.tensors for r in readers])
        for job in plan.tensors:
            for start in (0, 1, 5):
                if start >= job.info.size:
                    continue
                buffer = replayer.read_buffer(readers[0], job, start, job.info.size - start)
                offset = readers[0].file_offset(job.name, start)
                assert offset is not None
                if offset % job.info.dtype.itemsize == 0:
                    assert (buffer.ctypes.data - offset) % 4096 == 0, job.name
                assert buffer.dtype == job.info.dtype and buffer.size == job.info.size - start
    finally:
        for r in readers:
            r.close()
