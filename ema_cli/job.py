"""One ``ema-cli average`` run: check, lock, gather, decide, then do.

``run`` keeps deciding apart from doing:

1. the options, the replay order and selection, and every target against every input are
   checked with nothing locked or opened (``_check_options``, ``order_checkpoints``,
   ``_check_targets``);
2. under the locks (``--dry-run`` takes none), the facts are gathered: each input's size and
   mtime, the saved ``--state``, and readers of the checkpoints not folded in yet (``_gather``);
   the state is read under its lock, so no other run can change it between here and the commit;
3. ``decide`` (pure) turns the facts into a ``RunPlan``: what is folded in and what is new,
   which checkpoint waits for the next run, the tensors' fates, every output's path, the record;
4. ``_execute`` writes it: outputs, then the mapping, then the state.

The order of commits is what makes a killed run harmless: every output is built in a hidden
temporary file and renamed into place only when complete; the mapping follows the outputs; the
incremental state (``--state``) is committed last, so a run killed after its outputs but before
its state simply redoes the same work next time and writes the same bytes.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ema_cli import lock, profiles, report, state
from ema_cli.atomic import StagedFile, remove_stale_temporaries
from ema_cli.errors import CheckpointError, OptionError, TruncatedCheckpointError
from ema_cli.formats import (
    CheckpointReader,
    CheckpointWriter,
    check_output_path,
    check_writer,
    checkpoint_stats,
    conversion_warnings,
    create_writer,
    find_checkpoint,
    lost_in_conversion,
    open_checkpoint,
    output_format,
    rehearsing_ahead,
    strip_suffix,
)
from ema_cli.plan import Checkpoint, ReplayPlan, Settings, build_plan, order_checkpoints
from ema_cli.replay import Average, Outputs, replay_averages, total_bytes
from ema_cli.request import Request, labelled
from ema_cli.targets import Target, check_targets

Status = Literal["written", "up to date", "dry run"]
Progress = Callable[[int], AbstractContextManager[Callable[[int], None]]]


@dataclass
class Result:
    """What a run did, for people (``lines``) and machines (``as_json``): one record and
    mapping file per average (several in a sweep of profiles)."""

    status: Status
    records: list[dict[str, Any]]
    mapping_paths: list[Path]
    plans: list[ReplayPlan] = field(default_factory=list)
    folded: int = 0

    @property
    def record(self) -> dict[str, Any]:
        return self.records[0]

    @property
    def mapping_path(self) -> Path:
        return self.mapping_paths[0]

    @property
    def plan(self) -> ReplayPlan | None:
        return self.plans[0] if self.plans else None

    def as_json(self) -> dict[str, Any]:
        """The mapping file's content plus ``status`` and ``mapping_file`` (``--json``); for a
        sweep, ``{"status": ..., "profiles": [that, for each average]}``."""
        entries = [
            {**record, "status": self.status, "mapping_file": str(path)}
            for record, path in zip(self.records, self.mapping_paths, strict=True)
        ]
        if len(entries) == 1:
            return entries[0]
        return {"profiles": entries, "status": self.status}

    def lines(self) -> list[str]:
        """The summary on standard error: what was averaged, from what, and what was written."""
        if self.status == "up to date":
            return [f"up to date: all {self.folded} checkpoints are folded in; nothing written"]
        plan = self.plan
        assert plan is not None
        done = self.record["checkpoints"]
        first, final = done[0]["path"], done[-1]["path"]
        span = first if len(done) == 1 else f"{first} ... {final}"
        folded = f", {self.folded} of them from the saved state" if self.folded else ""
        kinds = ""
        if len(self.plans) > 1 or not plan.settings.replays_engine:
            kinds = "; " + ", ".join(p.settings.label for p in self.plans)
        lines = [
            f"averaged {len(plan.averaged)} tensors over {len(done)} checkpoints "
            f"({span}{folded}{kinds}); copied {len(plan.passthrough)} from the last"
        ]
        if self.status == "written":
            for record, path in zip(self.records, self.mapping_paths, strict=True):
                lines += [
                    f"wrote {e['path']} ({report.human_size(e['size'])})" for e in record["outputs"]
                ]
                lines.append(f"wrote mapping {path}")
        return lines


def trajectory_path(output: Path, checkpoint: str, folder: bool) -> Path:
    """Where the average as it stood after ``checkpoint`` goes: the output's name, a dot, and the
    checkpoint's name (``ema.safetensors`` after ``run/ckpt-200.safetensors`` ->
    ``ema.ckpt-200.safetensors``), so trajectory files sort by step like their checkpoints."""
    return labelled(output, strip_suffix(Path(checkpoint.rstrip("/")).name), folder)


@dataclass(frozen=True)
class Destination:
    """One average of the run: its settings, where it goes and where its mapping goes."""

    settings: Settings
    output: Path
    mapping: Path


def _destinations(request: Request, ordered: Sequence[Checkpoint]) -> list[Destination]:
    return [
        Destination(s, request.output_of(s.label), request.mapping_of(s.label))
        for s in request.resolve(ordered)
    ]


def _check_options(request: Request) -> None:
    if request.output.name in ("", ".", ".."):
        raise OptionError(f"-o {str(request.output)!r}: name the output file or folder")
    check_output_path(request.output)
    if request.max_shard_size is not None and not request.folder_output:
        raise OptionError(
            f"--max-shard-size applies to folder outputs, and {request.output} is a file "
            "(name the output without a suffix to write a model folder)"
        )
    if request.folder_format is not None and not request.folder_output:
        raise OptionError(
            f"--folder-format applies to folder outputs, and {request.output} is a file, whose "
            "suffix picks its format (name the output without a suffix to write a model folder)"
        )
    if request.every is not None and request.every < 1:
        raise OptionError(f"--every must be at least 1, got {request.every}")
    if request.workers is not None and request.workers < 1:
        raise OptionError(f"--workers must be at least 1, got {request.workers}")
    if request.state is None and request.restart:
        raise OptionError("--restart goes with --state")
    if request.state is not None and request.selection.last is not None:
        raise OptionError(
            "--last cannot be combined with --state: a sliding window is not an incremental "
            "average (use --min-step to start later)"
        )
    if not request.settle >= 0:  # NaN too
        raise OptionError(f"--settle must be >= 0, got {request.settle}")
    if request.state is not None:
        if request.sweep:
            raise OptionError(
                f"--state keeps one average, and this run asks for {len(request.labels)} "
                f"({', '.join(request.labels)}): give each its own run and --state folder"
            )
        if request.weights:
            raise OptionError(
                f"--state cannot fold new checkpoints into --weights {request.weights[0].source}: "
                "the weights are given for the whole list of checkpoints, so a new checkpoint "
                "needs new weights"
            )
        reason = profiles.why_not_incremental(request.profiles[0].average)
        if reason is not None:
            raise OptionError(f"--state cannot fold new checkpoints into {reason}")
    if request.every is not None:
        linear = [s.label for s in request.profiles if not s.replays_engine]
        linear += [w.label for w in request.weights]
        if linear:
            raise OptionError(
                f"--every writes TF's running average after each K-th checkpoint; {linear[0]} "
                "weights every checkpoint by the whole list, so it has no running value "
                "(run it on fewer checkpoints, e.g. with --max-step, instead)"
            )


def _check_targets(
    request: Request,
    destinations: Sequence[Destination],
    ordered: Sequence[Checkpoint],
    resolved: Mapping[str, Path],
) -> None:
    """Refuse any output that is, or would destroy, an input: every checkpoint given (selected
    or not) and every file of a checkpoint folder, against every output, its trajectory files,
    the mappings and the state folder (``targets.check_targets``)."""
    folder_output = request.folder_output
    written: list[Target] = []
    for d in destinations:
        written += [
            Target(d.output, "output", folder=folder_output),
            Target(d.mapping, "mapping file"),
        ]
        if request.every is not None:
            # After any checkpoint but the last: which ones get a file depends on the replay's
            # positions, which a --state run counts from the checkpoints folded in earlier.
            written += [
                Target(
                    trajectory_path(d.output, c.path, folder_output),
                    "trajectory file",
                    folder_output,
                )
                for c in ordered[:-1]
            ]
    if request.state is not None:
        written.append(Target(request.state, "state folder", folder=True))
    inputs = [(given, Path(given)) for given in request.checkpoints]
    inputs += [(given, path) for given, path in resolved.items()]
    check_targets(inputs, written)
    for d in destinations:
        for target in (d.output, d.mapping):
            if not target.parent.is_dir():
                raise OptionError(f"{target}: folder {target.parent} does not exist")
        if d.mapping.is_dir():
            raise OptionError(
                f"{d.mapping}: is a folder; the mapping file needs another name (--mapping)"
            )
    if request.state is not None and not request.state.parent.is_dir():
        raise OptionError(f"{request.state}: folder {request.state.parent} does not exist")


def _still_settling(fingerprint: state.Fingerprint, settle: float, now: float) -> bool:
    return settle > 0 and now - fingerprint.mtime_ns / 1e9 < settle


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()


@dataclass
class Facts:
    """What the disk says, gathered under the locks before anything is decided."""

    ordered: list[Checkpoint]
    files: list[Path]
    fingerprints: list[state.Fingerprint]
    saved: state.SavedState | None
    folded: int
    readers: list[CheckpointReader]  # of the new checkpoints that are ready, in order
    warnings: list[str]
    #: Positions (in ``ordered``, which then starts with the state's folded checkpoints) of
    #: folded-in checkpoints deleted since: their records are kept, marked gone.
    gone: frozenset[int] = frozenset()


@dataclass(frozen=True)
class RunPlan:
    """Everything one average of a run will write, decided before any of it is: a pure
    function of the request and the facts (``decide``)."""

    request: Request
    destination: Destination
    history: tuple[Checkpoint, ...]  # every checkpoint in the average: folded, then fresh
    folded: int
    replay: ReplayPlan
    snapshots: dict[int, Path]  # index among the fresh checkpoints -> the output written after it
    folder_output: bool
    record: dict[str, Any]  # the mapping file's content, less what only writing tells
    outputs: list[dict[str, Any]]
    weights: tuple[float, ...]  # each checkpoint's share of the average (report.weights)
    warnings: tuple[str, ...] = ()

    @property
    def mapping_path(self) -> Path:
        return self.destination.mapping


def _gather(
    stack: contextlib.ExitStack,
    request: Request,
    settings: Settings,
    ordered: list[Checkpoint],
    files: list[Path],
) -> Facts:
    """The facts of a run; ``settings`` and ``ordered`` are its (first) average's (a ``--state``
    run has one)."""
    # Size and mtime of every input, taken once and before anything is read: a checkpoint
    # rewritten during this run is then recorded as it was, and the next run notices.
    fingerprints = [state.Fingerprint.of(c.path, f) for c, f in zip(ordered, files, strict=True)]
    warnings: list[str] = []
    saved = None
    if request.state is not None and not request.restart:
        saved = state.load(request.state)
        if saved is not None:
            saved.check_output(request.output)  # before a missing output is rebuilt over it
        if saved is not None and not (request.output.exists() or request.dry_run):
            warnings.append(
                f"{request.output} is missing; rebuilding it and the state from all checkpoints"
            )
            saved = None
    if saved is not None:
        saved.check_settings(settings)
    folded, gone = 0, frozenset[int]()
    if saved is not None:
        resumed = state.resume(saved, ordered, files, fingerprints, settings)
        ordered, files, fingerprints = resumed.checkpoints, resumed.files, resumed.fingerprints
        folded, gone = resumed.folded, resumed.gone
    readers: list[CheckpointReader] = []
    now = time.time()
    with rehearsing_ahead(files[folded:]):  # HDF5 inputs: libhdf5 rehearsed ahead of the opens
        for i in range(folded, len(ordered)):
            newest = i == len(ordered) - 1
            if (
                request.state is not None
                and newest
                and _still_settling(fingerprints[i], request.settle, now)
            ):
                warnings.append(
                    f"skipping {ordered[i].path}: modified less than {request.settle:g}s ago, it "
                    "may still be being written (next run picks it up; --settle 0 turns this off)"
                )
                break
            try:
                readers.append(stack.enter_context(open_checkpoint(files[i])))
            except TruncatedCheckpointError as e:
                if request.state is None or not newest:
                    raise
                warnings.append(f"skipping {e}; the next run picks it up once it is complete")
    return Facts(ordered, files, fingerprints, saved, folded, readers, warnings, gone)


def decide(
    request: Request, destination: Destination, ordered: Sequence[Checkpoint], facts: Facts
) -> RunPlan:
    """The plan of one average of a run that has new checkpoints to fold in (pure: no file is
    touched). ``ordered`` is the average's history (``facts.ordered`` for the first average;
    a sweep has no saved state, so every average's history is its own ordering)."""
    settings, output, folded = destination.settings, destination.output, facts.folded
    fresh = list(ordered[folded : folded + len(facts.readers)])
    history = (*ordered[:folded], *fresh)
    plan = build_plan(
        fresh,
        [r.tensors for r in facts.readers],
        settings,
        optimizer_state=facts.readers[-1].is_optimizer_state,
    )
    if facts.saved is not None:
        facts.saved.check_plan(plan)
    folder_output = request.folder_output
    snapshots: dict[int, Path] = {len(fresh) - 1: output}
    if request.every is not None:
        for position in range(folded, len(history) - 1):
            if (position + 1) % request.every == 0:
                snapshots[position - folded] = trajectory_path(
                    output, history[position].path, folder_output
                )
    outputs: list[dict[str, Any]] = [
        {
            "after": {"path": history[folded + i].path, "step": history[folded + i].step},
            "path": str(p),
        }
        for i, p in sorted(snapshots.items())
    ]
    steps = [c.step for c in history]
    weights = report.weights(history, settings)
    try:
        window: dict[str, Any] | None = dict(profiles.window(weights, steps))
    except ValueError:  # weights that are not numbers (zero debias with decay 1)
        window = None
    warning = profiles.warning(settings.average, steps)
    record = report.summary(
        plan,
        [],
        output,
        outputs=outputs,
        extra={
            "selection": {
                "last": request.selection.last,
                "max_step": request.selection.max_step,
                "min_step": request.selection.min_step,
            },
            "state": None if request.state is None else str(request.state),
            "window": window,
        },
    )
    return RunPlan(
        request,
        destination,
        tuple(history),
        folded,
        plan,
        snapshots,
        folder_output,
        record,
        outputs,
        tuple(weights),
        () if warning is None else (warning,),
    )


def _digests(run: RunPlan, facts: Facts, hashed: bool) -> list[Any]:
    """Each replayed checkpoint's digest (``--hash``: a checkpoint folded in earlier, its size
    and mtime checked, keeps the digest recorded then)."""
    history, saved = run.history, facts.saved
    digests: list[str | dict[str, str] | None] = [None] * len(history)
    if hashed:
        for i in range(len(history)):
            known = saved.checkpoints[i].get("sha256") if saved and i < run.folded else None
            gone = i in facts.gone  # deleted since it was folded in: nothing left to hash
            digests[i] = known or (None if gone else report.sha256(facts.files[i]))
    return digests


def _checkpoint_records(run: RunPlan, facts: Facts, digests: Sequence[Any]) -> list[dict[str, Any]]:
    """Each replayed checkpoint's record: path, step, decay, weight in this average, size."""
    records = [
        report.checkpoint_record(c, w, facts.fingerprints[i].size, digests[i])
        for i, (c, w) in enumerate(zip(run.history, run.weights, strict=True))
    ]
    for i in facts.gone:
        records[i]["gone"] = True
    return records


def run(request: Request, progress: Progress, warn: Callable[[str], None]) -> Result:
    """Do the run; raise ``EmaCliError`` for anything the user can fix, before writing anything."""
    _check_options(request)
    # Existence first: "no such file" says more than "no step number" about a mistyped path.
    resolved: dict[str, Path] = {}
    first_given: dict[str, str] = {}
    spelled: set[str] = set()
    for given in request.checkpoints:  # one file under two spellings (./, .., a symlink) too
        if given.rstrip("/") in spelled:
            raise CheckpointError(given, "given twice")
        spelled.add(given.rstrip("/"))
        file = resolved[given] = find_checkpoint(Path(given))
        earlier = first_given.setdefault(os.path.realpath(file), given)
        if earlier != given:
            raise CheckpointError(given, f"given twice (also as {earlier})")
    listed = order_checkpoints(request.checkpoints, request.settings, request.selection)
    destinations = _destinations(request, listed)
    # Each average's own ordering: the same checkpoints, with its decays (and step checks).
    orderings = [
        order_checkpoints(request.checkpoints, d.settings, request.selection) for d in destinations
    ]
    files = [resolved[c.path] for c in listed]
    _check_targets(request, destinations, listed, resolved)

    with contextlib.ExitStack() as stack:
        if not request.dry_run:
            _lock(stack, request, destinations)
        facts = _gather(stack, request, destinations[0].settings, orderings[0], files)
        for message in facts.warnings:
            warn(message)
        if not facts.readers:
            history = facts.ordered[: facts.folded]
            record: dict[str, Any] = {
                "status": "up to date",
                "checkpoints": [c.path for c in history],
            }
            return Result("up to date", [record], [destinations[0].mapping], [], facts.folded)
        plans = [
            decide(request, d, facts.ordered if i == 0 else orderings[i], facts)
            for i, d in enumerate(destinations)
        ]
        for plan in plans:
            for message in plan.warnings:
                warn(message)
        if request.drop_non_tensors:
            lost = lost_in_conversion(
                request.output, facts.readers[-1], request.folder_output, request.folder_format
            )
            if lost:
                more = f" and {len(lost) - 1} more" if len(lost) > 1 else ""
                warn(f"leaving out {lost[0]}{more} (--drop-non-tensors)")
        for message in conversion_warnings(
            request.output,
            plans[0].replay.output_tensors,
            facts.readers[-1],
            request.folder_output,
            request.drop_non_tensors,
            request.folder_format,
        ):
            warn(message)
        for pattern in plans[0].replay.unmatched_excludes:
            warn(f"--exclude {pattern!r} matches no tensor")
        if request.dry_run:
            records = []
            digests = _digests(plans[0], facts, hashed=False)
            for plan in plans:
                for i, path in plan.snapshots.items():  # what the writers would refuse, unwritten
                    check_writer(
                        path,
                        plan.replay.output_tensors,
                        facts.readers[i],
                        plan.folder_output,
                        request.drop_non_tensors,
                        request.folder_format,
                    )
                # the same record, unwritten
                records.append(
                    {**plan.record, "checkpoints": _checkpoint_records(plan, facts, digests)}
                )
            return Result(
                "dry run",
                records,
                [p.mapping_path for p in plans],
                [p.replay for p in plans],
                facts.folded,
            )
        return _execute(stack, plans, facts, progress)


def _state_record(
    run: RunPlan, facts: Facts, shadows: str, digests: Sequence[Any]
) -> dict[str, Any]:
    history = list(run.history)
    return state.record(
        run.request.output,
        run.destination.settings,
        list(zip(history, facts.fingerprints[: len(history)], digests, strict=True)),
        run.replay,
        shadows,
    )


def _mapping_bound(run: RunPlan, facts: Facts, unhashed: Sequence[Any]) -> int:
    """The most bytes ``run``'s mapping file can take: its record now, plus each output's size
    and digests and each checkpoint's digests, which only writing tells."""
    content = {**run.record, "checkpoints": _checkpoint_records(run, facts, unhashed)}
    per_file = 64  # an output's size
    if run.request.hash:
        per_file += len(', "sha256": ""') + 64 + 2 * 4096  # a folder: one digest per file
    extra = per_file * (len(run.history) + len(run.outputs)) + 4096
    return len(report.to_json(content).encode()) + extra


def _workers(request: Request) -> int:
    """``--workers``, or the CPUs this process may run on (its affinity: taskset, cpusets)."""
    if request.workers is not None:
        return request.workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def _lock(
    stack: contextlib.ExitStack, request: Request, destinations: Sequence[Destination]
) -> None:
    """Lock every file the run will write before its temporaries are cleaned: a run cleans
    away only what it holds the lock of, so two runs that share any target (one's mapping is
    the other's, one's trajectory file the other's output) exclude each other instead of
    deleting each other's live temporaries. The trajectory files are locked by ``_execute``,
    once the plan says which there are. Locks never wait (exit 75), so their order is free."""
    if request.state is not None:
        stack.enter_context(lock.exclusive(request.state, "state"))
        state.remove_leftovers(request.state)
    targets = {d.output: "output" for d in destinations}
    targets.update({d.mapping: "mapping file" for d in destinations})
    for path in sorted(targets):
        stack.enter_context(lock.exclusive(path, targets[path]))
        remove_stale_temporaries(path)


def _execute(
    stack: contextlib.ExitStack, plans: Sequence[RunPlan], facts: Facts, progress: Progress
) -> Result:
    """Write the plans: every output, then the mappings, then the state."""
    first = plans[0]
    request, folded = first.request, first.folded
    writers: list[dict[int, CheckpointWriter]] = []
    for plan in plans:
        replay_plan = plan.replay
        own: dict[int, CheckpointWriter] = {}
        for i, path in sorted(plan.snapshots.items()):
            if path != plan.destination.output:  # a trajectory file: locked like the output
                stack.enter_context(lock.exclusive(path, "trajectory file"))
            remove_stale_temporaries(path)
            fmt = output_format(path, plan.folder_output, request.folder_format)
            defaults = dict(fmt.metadata_defaults)
            metadata = report.output_metadata(
                replay_plan, facts.readers[i].metadata, folded + i + 1, defaults
            )
            own[i] = stack.enter_context(
                create_writer(
                    path,
                    replay_plan.output_tensors,
                    metadata,
                    template=facts.readers[i],
                    max_shard_size=request.max_shard_size,
                    folder=plan.folder_output,
                    drop_non_tensors=request.drop_non_tensors,
                    folder_format=request.folder_format,
                )
            )
        writers.append(own)
    state_writer = None
    shadows_name = state.new_shadows_name()
    if request.state is not None:
        if not request.state.exists():
            request.state.mkdir()
            # A run that fails leaves nothing behind, not even the folder it made.
            stack.callback(_remove_if_empty, request.state)
        state_writer = stack.enter_context(
            state.create_shadows_writer(request.state, shadows_name, first.replay)
        )
    resume = stack.enter_context(state.open_shadows(facts.saved)) if facts.saved else None

    # Opened before the replay, written last: a mapping that cannot be written fails the
    # run before any output appears. (After the writers: they clean their output's stale
    # temporaries, and a folder output "ema" shares the ".ema." prefix with the mapping's.)
    # Space for every small file is taken before the replay too (a full disk fails the run
    # here, before any output is replaced), sized for what each will hold.
    unhashed = [None] * len(first.history)
    mapping_files = [
        stack.enter_context(StagedFile(p.mapping_path, reserve=_mapping_bound(p, facts, unhashed)))
        for p in plans
    ]
    state_file = None
    if request.state is not None:
        bound = state.size_bound(_state_record(first, facts, shadows_name, unhashed), request.hash)
        state_file = stack.enter_context(StagedFile(request.state / state.STATE_FILE, bound))
    averages = [
        Average.of(
            plan.replay,
            Outputs(own, state_writer if plan is first else None),
            resume if plan is first else None,
            history=[c.step for c in plan.history],
        )
        for plan, own in zip(plans, writers, strict=True)
    ]
    snapshot_points = len({i for own in writers for i in own})
    with progress(total_bytes(first.replay, snapshot_points)) as advance:
        for done in replay_averages(averages, facts.readers, workers=_workers(request)):
            advance(done)

    for own in writers:
        for i in sorted(own):  # the final output last: trajectory files are never newer
            own[i].commit(request.durable)
    digests = _digests(first, facts, request.hash)
    records = []
    for plan, mapping_file in zip(plans, mapping_files, strict=True):
        outputs = [dict(entry) for entry in plan.outputs]
        for entry in outputs:
            path = Path(entry["path"])
            entry["size"] = checkpoint_stats(path)[0]
            if request.hash:
                entry["sha256"] = report.sha256(path)
        record = {
            **plan.record,
            "checkpoints": _checkpoint_records(plan, facts, digests),
            "outputs": outputs,
        }
        mapping_file.publish(report.to_json(record).encode(), request.durable)
        records.append(record)
    if state_writer is not None and request.state is not None:
        state_writer.commit(request.durable)
        state.commit(
            request.state,
            _state_record(first, facts, shadows_name, digests),
            request.durable,
            state_file,
        )
    return Result(
        "written", records, [p.mapping_path for p in plans], [p.replay for p in plans], folded
    )
