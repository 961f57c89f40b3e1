"""Where checkpoint formats meet the engine: a tensor-major, block-wise replay.

Each block of each tensor is run through every checkpoint before the next block is read, so
memory holds a few blocks, not a model; blocks are independent, so two worker threads (numpy and
positioned file I/O release the GIL) process them side by side and the writer stores each at its
own offset. The replay reports progress by yielding byte counts; it never prints.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ema_cli import engine
from ema_cli.formats.base import CheckpointReader, CheckpointWriter, iter_blocks
from ema_cli.plan import ReplayPlan, TensorJob

Array = npt.NDArray[np.generic]

#: Bytes of one tensor block (per buffer). Small enough to stay in cache, large enough that
#: per-block Python overhead is negligible.
DEFAULT_BLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class Block:
    job: TensorJob
    start: int
    stop: int


def total_bytes(plan: ReplayPlan) -> int:
    """Input bytes a replay reads: averaged tensors from every checkpoint, copies from one."""
    n = len(plan.checkpoints)
    return sum(t.info.nbytes * (n if t.averaged else 1) for t in plan.tensors)


class _Replayer:
    def __init__(
        self, plan: ReplayPlan, readers: Sequence[CheckpointReader], writer: CheckpointWriter
    ) -> None:
        self.plan = plan
        self.readers = readers
        self.writer = writer
        self._coefficients: dict[np.dtype[np.generic], list[np.generic]] = {}
        self._local = threading.local()

    def coefficients(self, dtype: np.dtype[np.generic]) -> list[np.generic]:
        """Each checkpoint's ``c`` in ``dtype``, computed once per dtype."""
        if dtype not in self._coefficients:
            self._coefficients[dtype] = [
                engine.coefficient(c.decay, dtype) for c in self.plan.checkpoints
            ]
        return self._coefficients[dtype]

    def buffer(self, role: str, dtype: np.dtype[np.generic], size: int) -> Array:
        """A per-thread scratch array, reused across blocks: fresh megabyte allocations would
        cost a page fault per 4 KiB on every block."""
        buffers: dict[tuple[str, np.dtype[np.generic]], Array] = self._local.__dict__.setdefault(
            "buffers", {}
        )
        key = (role, dtype)
        array = buffers.get(key)
        if array is None or array.size < size:
            array = buffers[key] = np.empty(size, dtype=dtype)
        return array[:size]

    def run(self, block: Block) -> int:
        """Replay one block through all checkpoints and write the result; returns bytes read."""
        with engine.tf_float_mode():
            return self._run(block)

    def _run(self, block: Block) -> int:
        job, start, stop = block.job, block.start, block.stop
        info, size = job.info, block.stop - block.start
        raw = self.buffer("raw", info.dtype, size)
        if not job.averaged:
            self.readers[-1].read(job.name, start, stop, out=raw)
            self.writer.write(job.output_name, start, raw)
            return raw.nbytes
        settings = self.plan.settings
        work_dtype = engine.compute_dtype(info.dtype, settings.precision)
        x = raw if work_dtype == info.dtype else self.buffer("x", work_dtype, size)
        state = engine.ShadowState(self.buffer("shadow", work_dtype, size))
        scratch = self.buffer("scratch", work_dtype, size)
        for i, (reader, c) in enumerate(
            zip(self.readers, self.coefficients(work_dtype), strict=True)
        ):
            reader.read(job.name, start, stop, out=raw)
            if x is not raw:
                np.copyto(x, raw, casting="safe")
            if i == 0:
                state = engine.init_state(
                    x, zero_debias=settings.zero_debias, dtype=work_dtype, out=state.value
                )
            engine.apply(state, x, c, scratch)
        result = engine.average(state)
        if result.dtype != info.dtype:
            np.copyto(raw, result, casting="unsafe")  # round once, to nearest even
            result = raw
        self.writer.write(job.output_name, start, result)
        return raw.nbytes * len(self.readers)


def replay(
    plan: ReplayPlan,
    readers: Sequence[CheckpointReader],
    writer: CheckpointWriter,
    *,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    workers: int = 2,
) -> Iterator[int]:
    """Run the plan, writing every output tensor; yields input bytes done after each block.

    ``readers`` are in replay order (``plan.checkpoints``). The caller commits the writer once
    the iterator is exhausted.
    """
    replayer = _Replayer(plan, readers, writer)
    blocks = (
        Block(job, start, stop)
        for job in plan.tensors
        for start, stop in iter_blocks(
            job.info.size, max(1, block_bytes // job.info.dtype.itemsize)
        )
    )
    if workers <= 1:
        for block in blocks:
            yield replayer.run(block)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ema-replay") as pool:
        pending: set[Future[int]] = set()
        try:
            for block in blocks:
                pending.add(pool.submit(replayer.run, block))
                if len(pending) >= 2 * workers:  # bounded: memory stays at a few blocks
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        yield future.result()
            for future in pending:
                yield future.result()
            pending = set()
        finally:
            for future in pending:
                future.cancel()
