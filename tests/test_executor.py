"""The replay's executor seam: independent work items, readers opened by the workers.

A replay is a list of ``Block`` items that any executor may run in any order; each worker
opens its own readers from picklable ``Source`` descriptions and checks them against the
plan's headers. So a process pool or a cluster can run the same items later. Given open
readers of a format whose reads are thread-safe, the worker threads read through those
instead of opening their own.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest

from ema_cli import fpmode
from ema_cli.errors import CheckpointError
from ema_cli.formats import CheckpointReader, create_writer, open_checkpoint
from ema_cli.plan import Settings, build_plan, order_checkpoints
from ema_cli.replay import Block, Source, replay
from tests.conftest import write_checkpoint


class Reversed:
    """An executor that runs every item in the calling thread, last item first."""

    def __init__(self) -> None:
        self.items: list[Block] = []

    def run(self, task: Callable[[Block], int], work: Iterable[Block]) -> Iterator[int]:
        self.items = list(work)
        for item in reversed(self.items):
            with fpmode.tf_arithmetic():
                yield task(item)


@pytest.fixture
def run(tmp_path: Path) -> list[str]:
    rng = np.random.default_rng(5)
    return [
        str(
            write_checkpoint(
                tmp_path / f"ckpt-{step}.safetensors",
                {
                    "a": rng.standard_normal((40, 7)).astype(np.float32),
                    "b": rng.standard_normal(33).astype(np.float16),
                    "n": np.array(step, np.int64),
                },
            )
        )
        for step in (1, 2, 3)
    ]


def average(run: list[str], out: Path, **kwargs: object) -> bytes:
    settings = Settings(decay=0.9)
    ordered = order_checkpoints(run, settings)
    readers = [open_checkpoint(Path(c.path)) for c in ordered]
    try:
        plan = build_plan(ordered, [r.tensors for r in readers], settings)
        with create_writer(out, plan.output_tensors, {}, template=readers[-1]) as writer:
            for _ in replay(plan, readers, writer, block_bytes=64, **kwargs):  # type: ignore[arg-type]
                pass
            writer.commit(durable=False)
    finally:
        for r in readers:
            r.close()
    return out.read_bytes()


def test_any_executor_in_any_order_writes_the_same_bytes(run: list[str], tmp_path: Path) -> None:
    threads = average(run, tmp_path / "threads.safetensors")
    executor = Reversed()
    backwards = average(run, tmp_path / "reversed.safetensors", executor=executor)
    assert backwards == threads
    assert len(executor.items) > 3  # the work really was split into independent items


def test_work_items_and_sources_are_picklable(run: list[str]) -> None:
    settings = Settings(decay=0.9)
    ordered = order_checkpoints(run, settings)
    with open_checkpoint(Path(run[0])) as reader:
        plan = build_plan(ordered, [reader.tensors] * len(ordered), settings)
        source = Source.of(reader)
    assert pickle.loads(pickle.dumps(source)) == source
    block = Block(plan.tensors[0], 0, 10)
    assert pickle.loads(pickle.dumps(block)) == block
    with pickle.loads(pickle.dumps(source)).open() as reopened:
        assert dict(reopened.tensors) == dict(plan_header(run[0]))


def plan_header(path: str) -> dict[str, object]:
    with open_checkpoint(Path(path)) as reader:
        return dict(reader.tensors)


def test_a_checkpoint_replaced_before_the_workers_open_it_is_refused(
    run: list[str], tmp_path: Path
) -> None:
    settings = Settings(decay=0.9)
    ordered = order_checkpoints(run, settings)
    readers = [open_checkpoint(Path(c.path)) for c in ordered]
    plan = build_plan(ordered, [r.tensors for r in readers], settings)
    for r in readers:
        r.close()
    write_checkpoint(Path(run[1]), {"a": np.zeros((7, 40), np.float32), "n": np.array(2)})
    sources = [Source(c.path) for c in ordered]
    out = tmp_path / "o.safetensors"
    with (
        create_writer(out, plan.output_tensors, {}) as writer,
        pytest.raises(CheckpointError, match="changed while it was being read"),
    ):
        for _ in replay(plan, sources, writer, block_bytes=64):
            pass
    assert not out.exists()


@pytest.fixture
def worker_opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths the replay's workers open readers of (``Source.open``), in order."""
    opened: list[str] = []
    real_open = Source.open

    def counting_open(self: Source) -> CheckpointReader:
        opened.append(self.path)
        return real_open(self)

    monkeypatch.setattr(Source, "open", counting_open)
    return opened


def test_worker_threads_read_through_thread_safe_readers_instead_of_reopening(
    run: list[str], tmp_path: Path, worker_opens: list[str]
) -> None:
    """safetensors reads are thread-safe: the workers open nothing, and the bytes are those of
    a replay whose workers each open their own readers from ``Source``s."""
    settings = Settings(decay=0.9)
    ordered = order_checkpoints(run, settings)
    readers = [open_checkpoint(Path(c.path)) for c in ordered]
    assert all(r.thread_safe_reads for r in readers)
    plan = build_plan(ordered, [r.tensors for r in readers], settings)
    outputs = {}
    for kind, given in (("readers", readers), ("sources", [Source(c.path) for c in ordered])):
        out = tmp_path / f"{kind}.safetensors"
        with create_writer(out, plan.output_tensors, {}, template=readers[-1]) as writer:
            for _ in replay(plan, given, writer, block_bytes=64, workers=2):  # type: ignore[arg-type]
                pass
            writer.commit(durable=False)
        outputs[kind] = out.read_bytes()
        if kind == "readers":
            assert worker_opens == []  # no worker opened a checkpoint of its own
    for r in readers:
        r.close()
    assert outputs["readers"] == outputs["sources"]
    assert sorted(set(worker_opens)) == sorted(c.path for c in ordered)  # Sources: each opened


def test_readers_without_thread_safe_reads_are_opened_by_each_worker(
    tmp_path: Path, worker_opens: list[str]
) -> None:
    """npz members may be compressed, read through a stateful inflater: each worker opens its
    own reader, as before."""
    paths = []
    for step in (1, 2):
        path = tmp_path / f"ckpt-{step}.npz"
        np.savez_compressed(path, a=np.full((40, 7), float(step), np.float32))
        paths.append(str(path))
    settings = Settings(decay=0.9)
    ordered = order_checkpoints(paths, settings)
    readers = [open_checkpoint(Path(c.path)) for c in ordered]
    assert not any(r.thread_safe_reads for r in readers)
    plan = build_plan(ordered, [r.tensors for r in readers], settings)
    out = tmp_path / "o.safetensors"
    with create_writer(out, plan.output_tensors, {}) as writer:
        for _ in replay(plan, readers, writer, block_bytes=64, workers=1):
            pass
        writer.commit(durable=False)
    for r in readers:
        r.close()
    assert sorted(worker_opens) == sorted(c.path for c in ordered)
