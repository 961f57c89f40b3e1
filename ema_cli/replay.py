"""Where checkpoint formats meet the engine: a tensor-major, block-wise replay.

Each block of each tensor is run through every checkpoint before the next block is read, so
memory holds a few blocks, not a model; blocks are independent, so worker threads (``--workers``; numpy and
positioned file I/O release the GIL) process them side by side and every writer stores each block
at its own offset. One pass can feed several outputs: the final average, snapshots of the
average after chosen checkpoints (a trajectory), and the engine state for a later incremental
run. The replay reports progress by yielding byte counts; it never prints.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from ema_cli import engine, fpmode, kernels, profiles
from ema_cli.checkpoint import TensorInfo
from ema_cli.errors import CheckpointError, OutputError
from ema_cli.formats.base import CheckpointReader, CheckpointWriter, iter_blocks
from ema_cli.plan import ReplayPlan, TensorJob
from ema_cli.state import accumulator_names as state_accumulator_names
from ema_cli.state import tensor_names as state_tensor_names

Array = npt.NDArray[np.generic]

_PAGE = 4096

#: Bytes of one tensor block (per buffer). Small enough to stay in cache, large enough that
#: per-block Python overhead is negligible.
DEFAULT_BLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class Outputs:
    """Where a replay's results go.

    ``snapshots`` maps a checkpoint's index in the replay to the writer that receives the
    average as it stood right after that checkpoint (the last index is the final output);
    copied tensors come from that same checkpoint. ``state`` receives the engine state after
    the last checkpoint (see ``state.tensors``).
    """

    snapshots: Mapping[int, CheckpointWriter]
    state: CheckpointWriter | None = None


@dataclass(frozen=True)
class Average:
    """One average a replay computes, beside any others over the same checkpoints (a sweep of
    profiles reads every input byte once).

    ``plan`` is the average's own (its settings and checkpoints; every average of one replay
    has the same tensors). ``accumulator`` streams the linear profiles (``profiles.accumulator``
    over every step of the history, folded-in checkpoints included); None is TF's recurrence
    (``engine``). ``offset`` counts the checkpoints folded in before (``resume`` holds their
    state), so checkpoint ``i`` of the plan is ``offset + i`` of the accumulator's.
    """

    plan: ReplayPlan
    outputs: Outputs
    resume: CheckpointReader | Source | None = None
    accumulator: profiles.Accumulator | None = None
    offset: int = 0

    @classmethod
    def of(
        cls,
        plan: ReplayPlan,
        outputs: Outputs | CheckpointWriter,
        resume: CheckpointReader | Source | None = None,
        history: Sequence[int | None] | None = None,
    ) -> Average:
        """The average of ``plan`` (a bare writer receives the final result). ``history``: the
        steps of every checkpoint of the average, folded-in ones first (default: the plan's)."""
        if isinstance(outputs, CheckpointWriter):
            outputs = Outputs({len(plan.checkpoints) - 1: outputs})
        steps = list(history) if history is not None else [c.step for c in plan.checkpoints]
        settings = plan.settings
        accumulator = None
        if not settings.replays_engine:
            profile = settings.average
            assert not isinstance(profile, profiles.Decay)
            accumulator = profiles.accumulator(profile, steps)
        return cls(plan, outputs, resume, accumulator, len(steps) - len(plan.checkpoints))


@dataclass(frozen=True)
class Source:
    """A checkpoint as a small, picklable description. Each worker opens its own reader from
    it, so the work items below carry no open files and a process pool or another machine
    could run them the same way; only the writers are shared (positioned writes)."""

    path: str

    @classmethod
    def of(cls, reader: CheckpointReader | Source) -> Source:
        return reader if isinstance(reader, Source) else cls(os.fspath(reader.path))

    def open(self) -> CheckpointReader:
        from ema_cli.formats import open_checkpoint  # formats import this module's callers

        return open_checkpoint(Path(self.path))


@dataclass(frozen=True)
class Block:
    """One independent piece of work: elements ``[start, stop)`` of one tensor, replayed
    through every checkpoint and written to every output."""

    job: TensorJob
    start: int
    stop: int


class Executor(Protocol):
    """Runs independent work items; yields each one's result as it completes."""

    def run(self, task: Callable[[Block], int], work: Iterable[Block]) -> Iterator[int]: ...


@dataclass(frozen=True)
class ThreadExecutor:
    """Today's executor: ``workers`` threads in TF's floating-point mode, at most two items in
    flight per worker (memory stays at a few blocks), or the caller's thread for one worker."""

    workers: int = 2

    def run(self, task: Callable[[Block], int], work: Iterable[Block]) -> Iterator[int]:
        if self.workers <= 1:
            for item in work:
                with fpmode.tf_arithmetic():  # not across the yield: the caller's code runs there
                    result = task(item)
                yield result
            return
        with ThreadPoolExecutor(
            max_workers=self.workers,
            thread_name_prefix="ema-replay",
            initializer=fpmode.enter_tf_arithmetic_for_this_thread,  # they do nothing else
        ) as pool:
            pending: set[Future[int]] = set()
            try:
                for item in work:
                    pending.add(pool.submit(task, item))
                    if len(pending) >= 2 * self.workers:
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for future in done:
                            yield future.result()
                for future in pending:
                    yield future.result()
                pending = set()
            finally:
                for future in pending:
                    future.cancel()


@dataclass(frozen=True)
class _Arithmetic:
    """How tensors of one dtype are averaged: the dtype the shadow is kept in, each checkpoint's
    ``c`` in it, and the C kernel's one-pass update (None: numpy's three passes, on blocks
    widened to ``work`` first)."""

    work: np.dtype[np.generic]
    coefficients: list[np.generic]
    update: engine.Update | None


@dataclass
class _Replayer:
    averages: Sequence[Average]
    sources: Sequence[Source]
    #: What the plans were built from, per source (None: the plans' own tensor infos).
    headers: Sequence[Mapping[str, TensorInfo]] | None
    #: Per source, the caller's open reader when every thread may read through it
    #: (``CheckpointReader.thread_safe_reads``), else None: each thread opens its own.
    shared: Sequence[CheckpointReader | None] = ()
    _resumes: list[Source | None] = field(default_factory=list)
    _arithmetic: dict[tuple[int, np.dtype[np.generic]], _Arithmetic] = field(default_factory=dict)
    _local: threading.local = field(default_factory=threading.local)
    _opened: list[CheckpointReader] = field(default_factory=list)
    _opened_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._resumes = [None if a.resume is None else Source.of(a.resume) for a in self.averages]
        #: Checkpoint index -> the writers of every average that receive a snapshot after it.
        snapshot_writers: dict[int, list[CheckpointWriter]] = {}
        for average in self.averages:
            for index, writer in average.outputs.snapshots.items():
                snapshot_writers.setdefault(index, []).append(writer)
        self._snapshot_writers = dict(sorted(snapshot_writers.items()))
        #: The averages TF's recurrence computes (``engine``), and the linear profiles'.
        linear = [average.accumulator is not None for average in self.averages]
        self._engines = [a for a, is_linear in enumerate(linear) if not is_linear]
        self._linear = [a for a, is_linear in enumerate(linear) if is_linear]

    @property
    def plan(self) -> ReplayPlan:
        """The first average's plan: its tensors (and checkpoints' paths) are every average's."""
        return self.averages[0].plan

    def reader(self, index: int) -> CheckpointReader:
        """This worker's reader of source ``index`` (``-1 - a``: average ``a``'s resumed state),
        opened on first use and checked then to hold the tensors the plan was built from: a
        checkpoint replaced since is refused, not mixed in."""
        if 0 <= index < len(self.shared):
            shared = self.shared[index]
            if shared is not None:
                return shared  # the reader the plan was built from: nothing to check
        readers: dict[int, CheckpointReader] = self._local.__dict__.setdefault("readers", {})
        reader = readers.get(index)
        if reader is None:
            source = self._resumes[-1 - index] if index < 0 else self.sources[index]
            assert source is not None
            reader = readers[index] = source.open()
            with self._opened_lock:
                self._opened.append(reader)
            if index >= 0:
                self._check_unchanged(index, reader)
        return reader

    def _check_unchanged(self, index: int, reader: CheckpointReader) -> None:
        if self.headers is not None:
            expected: Mapping[str, TensorInfo] = self.headers[index]
            names: Iterable[str] = expected
        else:  # only the plan's view: every averaged tensor, and copied ones where copied from
            expected = {job.name: job.info for job in self.plan.tensors}
            copies = index in self._snapshot_writers
            names = [j.name for j in self.plan.tensors if j.averaged or copies]
        for name in names:
            if reader.tensors.get(name) != expected[name]:
                raise CheckpointError(
                    reader.path, "changed while it was being read; run again", tensor=name
                )

    def close(self) -> None:
        """Close every reader the workers opened."""
        with self._opened_lock:
            opened, self._opened = self._opened, []
        for reader in opened:
            reader.close()

    def arithmetic(self, a: int, dtype: np.dtype[np.generic]) -> _Arithmetic:
        """How average ``a`` (an engine replay) averages tensors of ``dtype``; worked out once
        per average and dtype (two threads may both do it first: same result)."""
        cached = self._arithmetic.get((a, dtype))
        if cached is None:
            plan = self.averages[a].plan
            work = engine.compute_dtype(dtype, plan.settings.precision)
            coefficients = []
            for c in plan.checkpoints:
                assert c.decay is not None
                coefficients.append(engine.coefficient(c.decay, work))
            cached = self._arithmetic[(a, dtype)] = _Arithmetic(
                work, coefficients, kernels.updater(work, dtype)
            )
        return cached

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

    def lanes(self, role: str, lanes: int, size: int) -> npt.NDArray[np.float64]:
        """A per-thread float64 array of ``lanes`` rows of ``size`` (accumulator states)."""
        flat = self.buffer(role, np.dtype(np.float64), lanes * size)
        return flat.reshape(lanes, size)  # type: ignore[return-value]

    def switch(self) -> fpmode.Switch:
        """This thread's switch to IEEE arithmetic and back (the linear profiles')."""
        local = self._local.__dict__
        found: fpmode.Switch | None = local.get("switch")
        if found is None:
            found = local["switch"] = fpmode.switch()
        return found

    def read_buffer(self, reader: CheckpointReader, job: TensorJob, start: int, size: int) -> Array:
        """A per-thread buffer for reading ``size`` elements of ``job`` from ``reader``, placed
        at the same offset within a 4 KiB page as the data in the file: x86 kernels copy much
        more slowly (up to 6x, measured here) into a destination 1-31 bytes past the source's
        page offset, which numpy's own buffers (16 bytes into a page) hit for page-aligned data.
        """
        dtype = job.info.dtype
        nbytes = size * dtype.itemsize
        local = self._local.__dict__
        backing: npt.NDArray[np.uint8] | None = local.get("read_backing")
        if backing is None or backing.size < nbytes + _PAGE:
            backing = local["read_backing"] = np.empty(nbytes + _PAGE, dtype=np.uint8)
            local["read_address"] = backing.ctypes.data  # .ctypes is slow: once per buffer
        address: int = local["read_address"]
        offset = reader.file_offset(job.name, start)
        shift = 0 if offset is None else (offset - address) % _PAGE
        if (address + shift) % dtype.itemsize:
            shift = (-address) % _PAGE  # keep numpy's alignment over the page trick
        return backing[shift : shift + nbytes].view(dtype)

    def run(self, block: Block) -> int:
        """Replay one block through all checkpoints and write it to every output; returns the
        bytes read. The calling thread must be in ``fpmode.tf_arithmetic()``."""
        if block.job.averaged:
            return self._average(block)
        return self._copy(block)

    def _copy(self, block: Block) -> int:
        job, start, stop = block.job, block.start, block.stop
        for index, writers in self._snapshot_writers.items():
            reader = self.reader(index)
            raw = self.read_buffer(reader, job, start, stop - start)
            reader.read(job.name, start, stop, out=raw)
            for writer in writers:
                _store(writer, job.output_name, start, raw)
        return job.info.dtype.itemsize * (stop - start) * len(self._snapshot_writers)

    def _average(self, block: Block) -> int:
        job, start, stop = block.job, block.start, block.stop
        info, size = job.info, stop - start
        engines, linear = self._engines, self._linear
        states: dict[int, engine.ShadowState | None] = {
            a: self._initial_state(a, job, start, stop) for a in engines
        }
        sums = {a: self._initial_sum(a, job, start, stop) for a in linear}
        scratch64 = None
        if linear:
            two_lanes = profiles.lanes(info.dtype) == 2
            scratch64 = self.lanes("sum-scratch", profiles.SCRATCH_LANES if two_lanes else 2, size)
        switch = self.switch() if linear else None
        for i in range(len(self.sources)):
            reader = self.reader(i)
            raw = reader.read(job.name, start, stop, out=self.read_buffer(reader, job, start, size))
            widened: dict[np.dtype[np.generic], Array] = {}
            for a in engines:
                states[a] = self._apply(a, i, job, start, raw, states[a], widened)
            if switch is not None:
                switch.to_ieee()
                try:
                    for a in linear:
                        self._accumulate(a, i, job, start, raw, sums[a], scratch64)
                finally:
                    switch.to_tf()
        for a in engines:
            state = states[a]
            outputs = self.averages[a].outputs
            if outputs.state is not None and state is not None:
                shadow_name, step_name = state_tensor_names(job.name)
                _store(outputs.state, shadow_name, start, state.value)
                if state.local_step is not None and start == 0:
                    _store(outputs.state, step_name, 0, state.local_step.reshape(1))
        for a in linear:
            outputs = self.averages[a].outputs
            if outputs.state is not None:
                for name, lane in zip(state_accumulator_names(job.name), sums[a], strict=False):
                    _store(outputs.state, name, start, lane)
        return info.dtype.itemsize * size * len(self.sources)

    def _apply(
        self,
        a: int,
        i: int,
        job: TensorJob,
        start: int,
        raw: Array,
        state: engine.ShadowState | None,
        widened: dict[np.dtype[np.generic], Array],
    ) -> engine.ShadowState:
        """One ``apply`` of checkpoint ``i`` to average ``a``'s shadow of the block (TF's
        arithmetic); writes the average if ``a`` takes a snapshot after ``i``."""
        info, size = job.info, raw.size
        arithmetic = self.arithmetic(a, info.dtype)
        work_dtype, update = arithmetic.work, arithmetic.update
        x = raw  # the C update reads float16/bfloat16 blocks as they are; numpy's needs them wide
        if work_dtype != info.dtype and update is None:
            found = widened.get(work_dtype)
            if found is None:
                found = widened[work_dtype] = self.buffer("x", work_dtype, size)
                kernels.convert(raw, found)  # widening: exact
            x = found
        if state is None:  # the block's first checkpoint
            zero_debias = self.averages[a].plan.settings.zero_debias
            shadow = self.buffer(f"shadow-{a}", work_dtype, size)
            first = x
            if first.dtype != work_dtype and not zero_debias:
                kernels.convert(raw, shadow)  # the first checkpoint, widened into the shadow
                first = shadow
            state = engine.init_state(first, zero_debias=zero_debias, dtype=work_dtype, out=shadow)
        scratch = None if update is not None else self.buffer("scratch", work_dtype, size)
        engine.apply(state, x, arithmetic.coefficients[i], scratch, update)
        writer = self.averages[a].outputs.snapshots.get(i)
        if writer is not None:
            result = engine.average(state)
            if result.dtype != info.dtype:
                rounded = self.buffer("out", info.dtype, size)
                kernels.convert(result, rounded)  # round once, to nearest even
                result = rounded
            _store(writer, job.output_name, start, result)
        return state

    def _accumulate(
        self,
        a: int,
        i: int,
        job: TensorJob,
        start: int,
        raw: Array,
        state: npt.NDArray[np.float64],
        scratch: npt.NDArray[np.float64] | None,
    ) -> None:
        """Fold checkpoint ``i`` into average ``a``'s sum (a linear profile, IEEE float64);
        writes the result if ``a`` takes a snapshot after ``i``."""
        average = self.averages[a]
        accumulator = average.accumulator
        assert accumulator is not None
        accumulator.update(state, raw, average.offset + i, scratch)
        writer = average.outputs.snapshots.get(i)
        if writer is not None:
            size = state.shape[1]
            out = self.buffer("out", job.info.dtype, size)
            spare = scratch[0] if scratch is not None else None
            _store(
                writer,
                job.output_name,
                start,
                accumulator.finish(state, job.info.dtype, out, spare),
            )

    def _initial_state(
        self, a: int, job: TensorJob, start: int, stop: int
    ) -> engine.ShadowState | None:
        """The state average ``a`` continues from (None: start from the first checkpoint)."""
        if self._resumes[a] is None:
            return None
        dtype = engine.compute_dtype(job.info.dtype, self.averages[a].plan.settings.precision)
        shadow_name, step_name = state_tensor_names(job.name)
        resume = self.reader(-1 - a)
        value = resume.read(
            shadow_name, start, stop, out=self.buffer(f"shadow-{a}", dtype, stop - start)
        )
        local_step = None
        if self.averages[a].plan.settings.zero_debias:
            local_step = resume.read(step_name).reshape(())
        return engine.ShadowState(value=value, local_step=local_step)

    def _initial_sum(
        self, a: int, job: TensorJob, start: int, stop: int
    ) -> npt.NDArray[np.float64]:
        """Average ``a``'s accumulator state for the block: zeros, or the resumed sum."""
        lanes = profiles.lanes(job.info.dtype)
        state = self.lanes(f"sum-{a}", lanes, stop - start)
        if self._resumes[a] is None:
            state.fill(0.0)
            return state
        resume = self.reader(-1 - a)
        for name, lane in zip(state_accumulator_names(job.name), state, strict=False):
            resume.read(name, start, stop, out=lane)
        return state


def _store(writer: CheckpointWriter, name: str, start: int, values: Array) -> None:
    """``writer.write``, a failing disk (full, a quota, an I/O error) being one line naming
    the output, whatever the format's writer raises it as."""
    try:
        writer.write(name, start, values)
    except OSError as e:
        raise OutputError(writer.path, e) from None


def total_bytes(plan: ReplayPlan, snapshots: int = 1) -> int:
    """Input bytes a replay reads: averaged tensors from every checkpoint, copied tensors once
    per snapshot written."""
    n = len(plan.checkpoints)
    return sum(t.info.nbytes * (n if t.averaged else snapshots) for t in plan.tensors)


def replay(
    plan: ReplayPlan,
    readers: Sequence[CheckpointReader | Source],
    outputs: Outputs | CheckpointWriter,
    *,
    resume: CheckpointReader | Source | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    workers: int = 2,
    executor: Executor | None = None,
) -> Iterator[int]:
    """Run the plan, writing every output tensor; yields input bytes done after each block.

    ``readers`` are the checkpoints in replay order (``plan.checkpoints``), as the readers the
    plan was built from or as ``Source`` descriptions. The workers read through a given reader
    whose format allows reads from several threads (``thread_safe_reads``); otherwise each
    worker opens its own, checked against the plan's headers. A bare writer receives the final
    average.
    ``resume`` (a state checkpoint written by an earlier replay with the same settings) makes
    the replay continue from that state instead of starting at the first checkpoint. The work
    is a list of independent ``Block`` items run by ``executor`` (default: ``ThreadExecutor``
    of ``workers`` threads). The caller commits the writers once the iterator is exhausted.
    """
    return replay_averages(
        [Average.of(plan, outputs, resume)],
        readers,
        block_bytes=block_bytes,
        workers=workers,
        executor=executor,
    )


def replay_averages(
    averages: Sequence[Average],
    readers: Sequence[CheckpointReader | Source],
    *,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    workers: int = 2,
    executor: Executor | None = None,
) -> Iterator[int]:
    """``replay`` for several averages of the same checkpoints in one pass: each block is
    read once from each checkpoint and folded into every average, each exactly as its own
    replay would (the same bytes). Memory grows by a block per average."""
    if not averages:
        raise ValueError("no averages to replay")
    first = averages[0].plan
    paths = [c.path for c in first.checkpoints]
    for average in averages[1:]:
        same = [c.path for c in average.plan.checkpoints] == paths
        if not same or average.plan.tensors != first.tensors:
            raise ValueError("the averages of one replay need the same checkpoints and tensors")
    sources = [Source.of(r) for r in readers]
    opened = all(isinstance(r, CheckpointReader) for r in readers)
    headers = [r.tensors for r in readers if isinstance(r, CheckpointReader)] if opened else None
    shared = [
        r if isinstance(r, CheckpointReader) and r.thread_safe_reads else None for r in readers
    ]
    replayer = _Replayer(averages, sources, headers, shared)
    work = (  # generated as the executor takes them: a model's blocks are never all listed
        Block(job, start, stop)
        for job in first.tensors
        for start, stop in iter_blocks(job.info.size, _block_elements(job, block_bytes))
    )
    return _run(replayer, work, executor or ThreadExecutor(workers))


def _block_elements(job: TensorJob, block_bytes: int) -> int:
    """Elements per block: ``block_bytes`` of the wider of the tensor and its float32 shadow,
    so a float16 or bfloat16 block's shadow takes no more cache than a float32 one's
    (measured on 3.8 GB: bfloat16 replays took 0.18 s less CPU with 512 KiB blocks than with
    1 MiB ones, float16 the same, benchmarks/RESULTS.md)."""
    return max(1, block_bytes // max(job.info.dtype.itemsize, 4))


def _run(replayer: _Replayer, work: Iterable[Block], executor: Executor) -> Iterator[int]:
    try:
        yield from executor.run(replayer.run, work)
    finally:
        replayer.close()
