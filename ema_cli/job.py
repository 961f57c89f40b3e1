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
import functools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ema_cli import lock, report, state
from ema_cli.atomic import StagedFile, remove_stale_temporaries
from ema_cli.defaults import DEFAULT_SETTLE_SECONDS
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
    is_folder_output,
    lost_in_conversion,
    open_checkpoint,
    output_format,
    strip_suffix,
)
from ema_cli.plan import Checkpoint, ReplayPlan, Selection, Settings, build_plan, order_checkpoints
from ema_cli.replay import Outputs, replay, total_bytes
from ema_cli.targets import Target, check_targets

Status = Literal["written", "up to date", "dry run"]
Progress = Callable[[int], AbstractContextManager[Callable[[int], None]]]


@dataclass(frozen=True)
class Request:
    """Everything one run was asked to do (the command line, parsed)."""

    checkpoints: Sequence[str]
    output: Path
    settings: Settings
    mapping: Path | None = None
    selection: Selection = field(default_factory=Selection)
    max_shard_size: int | None = None
    #: A folder output's weights format (``--folder-format``); None: the default, safetensors.
    folder_format: str | None = None
    every: int | None = None
    state: Path | None = None
    restart: bool = False
    settle: float = DEFAULT_SETTLE_SECONDS
    hash: bool = False
    dry_run: bool = False
    #: Convert even when the last checkpoint holds data the output format cannot (left out).
    drop_non_tensors: bool = False
    #: Flush outputs (and state) to disk before renaming them into place. None: only with
    #: ``state``, where later runs build on what this one wrote.
    fsync: bool | None = None

    @functools.cached_property
    def folder_output(self) -> bool:
        """Whether ``output`` names a model folder (``formats.is_folder_output``), worked out
        once per run."""
        return is_folder_output(self.output)

    @property
    def durable(self) -> bool:
        return self.fsync if self.fsync is not None else self.state is not None

    @classmethod
    def from_options(cls, checkpoints: Sequence[str], options: Mapping[str, Any]) -> Request:
        """The request of ``ema-cli average``'s parsed options (click's parameter names)."""
        o = dict(options)
        settings = Settings(
            **{k: o.pop(k) for k in ("decay", "num_updates", "zero_debias", "ema_name", "names")},
            **{k: o.pop(k) for k in ("order", "include", "exclude", "precision", "strict")},
            average_optimizer=o.pop("average_optimizer"),
        )
        selection = Selection(**{k: o.pop(k) for k in ("last", "min_step", "max_step")})
        request = cls(checkpoints, settings=settings, selection=selection, hash=o.pop("hash_"), **o)
        return request


@dataclass
class Result:
    """What a run did, for people (``lines``) and machines (``as_json``)."""

    status: Status
    record: dict[str, Any]
    mapping_path: Path
    plan: ReplayPlan | None = None
    folded: int = 0

    def as_json(self) -> dict[str, Any]:
        """The mapping file's content plus ``status`` and ``mapping_file`` (``--json``)."""
        return {**self.record, "status": self.status, "mapping_file": str(self.mapping_path)}

    def lines(self) -> list[str]:
        """The summary on standard error: what was averaged, from what, and what was written."""
        if self.status == "up to date":
            return [f"up to date: all {self.folded} checkpoints are folded in; nothing written"]
        assert self.plan is not None
        done = self.record["checkpoints"]
        first, final = done[0]["path"], done[-1]["path"]
        span = first if len(done) == 1 else f"{first} ... {final}"
        folded = f", {self.folded} of them from the saved state" if self.folded else ""
        lines = [
            f"averaged {len(self.plan.averaged)} tensors over {len(done)} checkpoints "
            f"({span}{folded}); copied {len(self.plan.passthrough)} from the last"
        ]
        if self.status == "written":
            lines += [
                f"wrote {e['path']} ({report.human_size(e['size'])})"
                for e in self.record["outputs"]
            ]
            lines.append(f"wrote mapping {self.mapping_path}")
        return lines


def default_mapping_path(output: Path) -> Path:
    """``out/avg.safetensors`` -> ``out/avg.mapping.json``; ``out/run-ema`` (a folder) ->
    ``out/run-ema.mapping.json``."""
    return output.with_name(strip_suffix(output.name) + ".mapping.json")


def trajectory_path(output: Path, checkpoint: str, folder: bool) -> Path:
    """Where the average as it stood after ``checkpoint`` goes: the output's name, a dot, and the
    checkpoint's name (``ema.safetensors`` after ``run/ckpt-200.safetensors`` ->
    ``ema.ckpt-200.safetensors``), so trajectory files sort by step like their checkpoints."""
    name = strip_suffix(Path(checkpoint.rstrip("/")).name)
    if folder:
        return output.with_name(f"{output.name}.{name}")
    stem = strip_suffix(output.name)
    return output.with_name(f"{stem}.{name}{output.name[len(stem) :]}")


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
    if request.state is None and request.restart:
        raise OptionError("--restart goes with --state")
    if request.state is not None and request.selection.last is not None:
        raise OptionError(
            "--last cannot be combined with --state: a sliding window is not an incremental "
            "average (use --min-step to start later)"
        )
    if not request.settle >= 0:  # NaN too
        raise OptionError(f"--settle must be >= 0, got {request.settle}")


def _check_targets(
    request: Request,
    mapping: Path,
    ordered: Sequence[Checkpoint],
    resolved: Mapping[str, Path],
) -> None:
    """Refuse any output that is, or would destroy, an input: every checkpoint given (selected
    or not) and every file of a checkpoint folder, against the output, its trajectory files,
    the mapping and the state folder (``targets.check_targets``)."""
    output, folder_output = request.output, request.folder_output
    written = [Target(output, "output", folder=folder_output), Target(mapping, "mapping file")]
    if request.every is not None:
        # After any checkpoint but the last: which ones get a file depends on the replay's
        # positions, which a --state run counts from the checkpoints folded in earlier.
        written += [
            Target(trajectory_path(output, c.path, folder_output), "trajectory file", folder_output)
            for c in ordered[:-1]
        ]
    if request.state is not None:
        written.append(Target(request.state, "state folder", folder=True))
    inputs = [(given, Path(given)) for given in request.checkpoints]
    inputs += [(given, path) for given, path in resolved.items()]
    check_targets(inputs, written)
    for target in (output, mapping):
        if not target.parent.is_dir():
            raise OptionError(f"{target}: folder {target.parent} does not exist")
    if mapping.is_dir():
        raise OptionError(
            f"{mapping}: is a folder; the mapping file needs another name (--mapping)"
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
    """Everything a run will write, decided before any of it is: a pure function of the
    request and the facts (``decide``)."""

    request: Request
    mapping_path: Path
    history: tuple[Checkpoint, ...]  # every checkpoint in the average: folded, then fresh
    folded: int
    replay: ReplayPlan
    snapshots: dict[int, Path]  # index among the fresh checkpoints -> the output written after it
    folder_output: bool
    record: dict[str, Any]  # the mapping file's content, less what only writing tells
    outputs: list[dict[str, Any]]


def _gather(
    stack: contextlib.ExitStack, request: Request, ordered: list[Checkpoint], files: list[Path]
) -> Facts:
    # Size and mtime of every input, taken once and before anything is read: a checkpoint
    # rewritten during this run is then recorded as it was, and the next run notices.
    fingerprints = [state.Fingerprint.of(c.path, f) for c, f in zip(ordered, files, strict=True)]
    warnings: list[str] = []
    saved = None
    if request.state is not None and not request.restart:
        saved = state.load(request.state)
        if saved is not None and not (request.output.exists() or request.dry_run):
            warnings.append(
                f"{request.output} is missing; rebuilding it and the state from all checkpoints"
            )
            saved = None
    if saved is not None:
        saved.check_settings(request.settings)
    folded, gone = 0, frozenset[int]()
    if saved is not None:
        resumed = state.resume(saved, ordered, files, fingerprints, request.settings)
        ordered, files, fingerprints = resumed.checkpoints, resumed.files, resumed.fingerprints
        folded, gone = resumed.folded, resumed.gone
    readers: list[CheckpointReader] = []
    now = time.time()
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


def decide(request: Request, mapping_path: Path, facts: Facts) -> RunPlan:
    """The plan of a run that has new checkpoints to fold in (pure: no file is touched)."""
    settings, output, folded = request.settings, request.output, facts.folded
    fresh = facts.ordered[folded : folded + len(facts.readers)]
    history = (*facts.ordered[:folded], *fresh)
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
        },
    )
    return RunPlan(
        request,
        mapping_path,
        tuple(history),
        folded,
        plan,
        snapshots,
        folder_output,
        record,
        outputs,
    )


def _checkpoint_records(
    run: RunPlan, facts: Facts, hashed: bool
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Each replayed checkpoint's record, and its digest (``--hash``: a checkpoint folded in
    earlier, its size and mtime checked, keeps the digest recorded then)."""
    history, saved = run.history, facts.saved
    digests: list[str | dict[str, str] | None] = [None] * len(history)
    if hashed:
        for i in range(len(history)):
            known = saved.checkpoints[i].get("sha256") if saved and i < run.folded else None
            gone = i in facts.gone  # deleted since it was folded in: nothing left to hash
            digests[i] = known or (None if gone else report.sha256(facts.files[i]))
    weights = report.weights(history, run.request.settings)
    records = [
        report.checkpoint_record(c, w, facts.fingerprints[i].size, digests[i])
        for i, (c, w) in enumerate(zip(history, weights, strict=True))
    ]
    for i in facts.gone:
        records[i]["gone"] = True
    return records, digests


def run(request: Request, progress: Progress, warn: Callable[[str], None]) -> Result:
    """Do the run; raise ``EmaCliError`` for anything the user can fix, before writing anything."""
    _check_options(request)
    mapping_path = request.mapping or default_mapping_path(request.output)
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
    ordered = order_checkpoints(request.checkpoints, request.settings, request.selection)
    files = [resolved[c.path] for c in ordered]
    _check_targets(request, mapping_path, ordered, resolved)

    with contextlib.ExitStack() as stack:
        if not request.dry_run:
            _lock(stack, request, mapping_path)
        facts = _gather(stack, request, ordered, files)
        for message in facts.warnings:
            warn(message)
        if not facts.readers:
            history = facts.ordered[: facts.folded]
            record: dict[str, Any] = {
                "status": "up to date",
                "checkpoints": [c.path for c in history],
            }
            return Result("up to date", record, mapping_path, None, facts.folded)
        plan = decide(request, mapping_path, facts)
        if request.drop_non_tensors:
            lost = lost_in_conversion(
                request.output, facts.readers[-1], plan.folder_output, request.folder_format
            )
            if lost:
                more = f" and {len(lost) - 1} more" if len(lost) > 1 else ""
                warn(f"leaving out {lost[0]}{more} (--drop-non-tensors)")
        for message in conversion_warnings(
            request.output,
            plan.replay.output_tensors,
            facts.readers[-1],
            plan.folder_output,
            request.drop_non_tensors,
            request.folder_format,
        ):
            warn(message)
        for pattern in plan.replay.unmatched_excludes:
            warn(f"--exclude {pattern!r} matches no tensor")
        if request.dry_run:
            for i, path in plan.snapshots.items():  # what the writers would refuse, unwritten
                check_writer(
                    path,
                    plan.replay.output_tensors,
                    facts.readers[i],
                    plan.folder_output,
                    request.drop_non_tensors,
                    request.folder_format,
                )
            records, _ = _checkpoint_records(plan, facts, hashed=False)
            record = {**plan.record, "checkpoints": records}  # the same record, unwritten
            return Result("dry run", record, mapping_path, plan.replay, facts.folded)
        return _execute(stack, plan, facts, progress)


def _lock(stack: contextlib.ExitStack, request: Request, mapping_path: Path) -> None:
    if request.state is not None:
        stack.enter_context(lock.exclusive(request.state, "state"))
        state.remove_leftovers(request.state)
    stack.enter_context(lock.exclusive(request.output, "output"))
    remove_stale_temporaries(request.output)
    remove_stale_temporaries(mapping_path)


def _execute(
    stack: contextlib.ExitStack, plan: RunPlan, facts: Facts, progress: Progress
) -> Result:
    """Write the plan: every output, then the mapping, then the state."""
    request, replay_plan, folded = plan.request, plan.replay, plan.folded
    writers: dict[int, CheckpointWriter] = {}
    for i, path in sorted(plan.snapshots.items()):
        remove_stale_temporaries(path)  # under the output's lock, which covers its trajectory
        fmt = output_format(path, plan.folder_output, request.folder_format)
        defaults = dict(fmt.metadata_defaults)
        metadata = report.output_metadata(
            replay_plan, facts.readers[i].metadata, folded + i + 1, defaults
        )
        writers[i] = stack.enter_context(
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
    state_writer = None
    shadows_name = state.new_shadows_name()
    if request.state is not None:
        if not request.state.exists():
            request.state.mkdir()
            # A run that fails leaves nothing behind, not even the folder it made.
            stack.callback(_remove_if_empty, request.state)
        state_writer = stack.enter_context(
            state.create_shadows_writer(request.state, shadows_name, replay_plan)
        )
    resume = stack.enter_context(state.open_shadows(facts.saved)) if facts.saved else None

    # Opened before the replay, written last: a mapping that cannot be written fails the
    # run before any output appears. (After the writers: they clean their output's stale
    # temporaries, and a folder output "ema" shares the ".ema." prefix with the mapping's.)
    mapping_file = stack.enter_context(StagedFile(plan.mapping_path))
    with progress(total_bytes(replay_plan, len(writers))) as advance:
        for done in replay(
            replay_plan, facts.readers, Outputs(writers, state_writer), resume=resume
        ):
            advance(done)

    for i in sorted(writers):  # the final output last: trajectory files are never newer
        writers[i].commit(request.durable)
    records, digests = _checkpoint_records(plan, facts, request.hash)
    outputs = [dict(entry) for entry in plan.outputs]
    for entry in outputs:
        path = Path(entry["path"])
        entry["size"] = checkpoint_stats(path)[0]
        if request.hash:
            entry["sha256"] = report.sha256(path)
    record = {**plan.record, "checkpoints": records, "outputs": outputs}
    mapping_file.publish(report.to_json(record).encode(), request.durable)
    if state_writer is not None and request.state is not None:
        state_writer.commit(request.durable)
        history = list(plan.history)
        state.commit(
            request.state,
            request.settings,
            list(zip(history, facts.fingerprints[: len(history)], digests, strict=True)),
            replay_plan,
            shadows_name,
            request.durable,
        )
    return Result("written", record, plan.mapping_path, replay_plan, folded)
