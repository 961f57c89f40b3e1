"""The incremental state of ``--state DIR``: what has been folded in, and the engine state after it.

Layout of ``DIR``:

* ``state.json`` -- the commit point: settings, the checkpoints folded in (path, step, size,
  modification time, the decay used), and the name of the shadows file;
* ``shadows-<token>`` plus the suffix of ``registry.STATE_FORMAT`` -- every averaged tensor's
  shadow in its compute dtype (``shadow/<name>``) and, under zero debias, its ``local_step``
  (``local_step/<name>``); for ``--mean`` and ``--decay-per-step``, the float64 accumulator
  instead (``sum/<name>``, and ``sum-low/<name>``, its compensation, for float64 tensors).

A run writes a new shadows file under a fresh name, then replaces ``state.json`` atomically, then
deletes the old shadows file: killed at any moment, the folder holds a complete, consistent state
(the old one or the new one) and at worst an orphaned shadows file that the next commit removes.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ema_cli import __version__, engine, profiles, report
from ema_cli.atomic import StagedFile, write_file_atomically
from ema_cli.checkpoint import TensorInfo
from ema_cli.errors import CheckpointError, EmaCliError
from ema_cli.formats import CheckpointReader, CheckpointWriter, checkpoint_stats, registry
from ema_cli.formats import create_writer as _create_writer
from ema_cli.formats import open_checkpoint as _open_checkpoint
from ema_cli.plan import Checkpoint, ReplayPlan, Settings

STATE_FILE = "state.json"
STATE_FORMAT = "ema-cli-state/1"
#: The shadows file's name before its format's suffix (the format: ``registry.STATE_FORMAT``).
_SHADOWS_STEM = "shadows-"

#: Settings that change the numbers: a state made with other values cannot be continued.
_BINDING = ("decay", "num_updates", "zero_debias", "precision", "order", "include", "exclude")


class StateError(EmaCliError):
    """The saved state cannot be continued with this run's inputs or settings."""

    def __init__(self, folder: Path, message: str):
        super().__init__(
            f"{folder}: {message}; run with --restart to rebuild the state from scratch"
        )


@dataclass(frozen=True)
class Fingerprint:
    """What identifies a checkpoint's bytes cheaply: where it is, its size and its mtime."""

    path: str
    realpath: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, given: str, file: Path) -> Fingerprint:
        size, mtime = checkpoint_stats(file)
        return cls(given, os.path.realpath(file), size, mtime)


def binding_settings(settings: Settings) -> dict[str, Any]:
    bound = {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in ((k, getattr(settings, k)) for k in _BINDING)
    }
    return {"profile": settings.label, **bound}


def _kind(label: str) -> str:
    """The kind of average a label names (``decay-0.99-nu-step`` -> ``decay``)."""
    kinds = ("decay-per-step", "decay", "mean", "sigma-rel", "gamma", "weights")
    return next((k for k in kinds if label.startswith(k)), label)


def _saved_profile(saved: dict[str, Any]) -> str:
    """The profile a saved state was made for (states of ema-cli before profiles: TF's replay)."""
    if "profile" in saved:
        return str(saved["profile"])
    return profiles.label(
        profiles.Decay(
            saved.get("decay", 0.0), saved.get("num_updates"), saved.get("zero_debias", False)
        )
    )


@dataclass(frozen=True)
class SavedState:
    folder: Path
    settings: dict[str, Any]
    checkpoints: list[dict[str, Any]]
    shadows: str
    tensors: dict[str, dict[str, Any]]
    #: The real path of the output the state was made for (None: a state of ema-cli before
    #: 2026-12-02, which did not record it).
    output: str | None = None

    @property
    def shadows_path(self) -> Path:
        return self.folder / self.shadows

    def check_output(self, output: Path) -> None:
        """One state folder keeps one output's average: another output would resume it and
        then find itself missing, rebuilding (and rewriting the state) on every run."""
        if self.output is not None and self.output != os.path.realpath(output):
            raise StateError(
                self.folder,
                f"the state keeps the average written to {self.output}, not {output}: give "
                "each output its own --state folder",
            )

    def check_settings(self, settings: Settings) -> None:
        wanted = binding_settings(settings)
        made_for, asked = _saved_profile(self.settings), wanted.pop("profile")
        other_profile = StateError(
            self.folder,
            f"the state was made for the average {made_for}, this run asks for {asked}",
        )
        if _kind(made_for) != _kind(asked):
            raise other_profile
        for key, value in wanted.items():
            if self.settings.get(key) != value:
                option = "--" + key.replace("_", "-")
                raise StateError(
                    self.folder,
                    f"the state was made with {option} {_show(self.settings.get(key))}, this run "
                    f"asks for {_show(value)}",
                )
        if made_for != asked:
            raise other_profile

    def check_plan(self, plan: ReplayPlan) -> None:
        """The averaged tensors must be those the state holds, with the same dtypes and shapes."""
        now = {
            j.name: {"dtype": j.info.dtype.name, "shape": list(j.info.shape)} for j in plan.averaged
        }
        for name in sorted(set(now) | set(self.tensors)):
            if now.get(name) != self.tensors.get(name):
                was = self.tensors.get(name)
                raise StateError(
                    self.folder,
                    f"tensor '{name}' was {_describe(was)} in the folded-in checkpoints and is "
                    f"{_describe(now.get(name))} now",
                )


def _show(value: Any) -> str:
    if value is None:
        return "off"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return " ".join(map(str, value)) or "none"
    return str(value)


def _describe(info: dict[str, Any] | None) -> str:
    if info is None:
        return "not averaged"
    return f"{info['dtype']} {info['shape']}"


def load(folder: Path) -> SavedState | None:
    """The state saved in ``folder``, or None when there is none yet."""
    path = folder / STATE_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown format {data.get('format')!r}")
        state = SavedState(
            folder=folder,
            settings=dict(data["settings"]),
            checkpoints=list(data["checkpoints"]),
            shadows=str(data["shadows"]),
            tensors=dict(data["tensors"]),
            output=None if data.get("output") is None else str(data["output"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            path, f"corrupt state ({e}); run with --restart to rebuild it"
        ) from None
    if not state.shadows_path.is_file():
        raise CheckpointError(
            state.shadows_path, "the state's shadows file is missing; run with --restart"
        )
    return state


def _shadows_suffix() -> str:
    return registry.by_name(registry.STATE_FORMAT).suffixes[0]


def new_shadows_name() -> str:
    return f"{_SHADOWS_STEM}{secrets.token_hex(8)}{_shadows_suffix()}"


def tensor_names(name: str) -> tuple[str, str]:
    """Names of a tensor's engine state in the shadows file: the shadow (TF's ``biased`` under
    zero debias) in its compute dtype, and the zero-debias ``local_step``."""
    return f"shadow/{name}", f"local_step/{name}"


def accumulator_names(name: str) -> tuple[str, str]:
    """Names of a tensor's accumulator state (the linear profiles) in the shadows file: its
    float64 value and, for float64 tensors, the value's compensation (``profiles.Accumulator``)."""
    return f"sum/{name}", f"sum-low/{name}"


def tensors(plan: ReplayPlan) -> list[TensorInfo]:
    """What the shadows file holds for ``plan``: every averaged tensor's shadow in its compute
    dtype, plus its ``local_step`` scalar under zero debias; or, for a linear profile, its
    float64 accumulator lanes."""
    settings = plan.settings
    infos = []
    if not settings.replays_engine:
        for job in plan.averaged:
            names = accumulator_names(job.name)[: profiles.lanes(job.info.dtype)]
            infos += [TensorInfo(n, np.dtype(np.float64), job.info.shape) for n in names]
        return infos
    for job in plan.averaged:
        dtype = engine.compute_dtype(job.info.dtype, settings.precision)
        shadow, step = tensor_names(job.name)
        infos.append(TensorInfo(shadow, dtype, job.info.shape))
        if settings.zero_debias:
            infos.append(TensorInfo(step, dtype, ()))
    return infos


def create_shadows_writer(folder: Path, name: str, plan: ReplayPlan) -> CheckpointWriter:
    """Start writing the shadows file ``name`` of ``plan`` in ``folder`` (published by the
    writer's commit, made current by ``commit``)."""
    return _create_writer(folder / name, tensors(plan), {"format": "ema-cli-state"})


def open_shadows(saved: SavedState) -> CheckpointReader:
    return _open_checkpoint(saved.shadows_path)


@dataclass(frozen=True)
class Resumed:
    """The replay history a saved state continues: the checkpoints it folded in (from its
    records, so ones deleted since still count), then the new inputs, each with its file and
    fingerprint; ``gone`` holds the positions of folded checkpoints no longer on disk."""

    checkpoints: list[Checkpoint]
    files: list[Path]
    fingerprints: list[Fingerprint]
    folded: int
    gone: frozenset[int]


def resume(
    saved: SavedState,
    ordered: Sequence[Checkpoint],
    files: Sequence[Path],
    fingerprints: Sequence[Fingerprint],
    settings: Settings,
) -> Resumed:
    """What the saved state has folded in, and the inputs that continue it.

    A folded-in checkpoint that no longer exists is fine (``CheckpointManager(max_to_keep=N)``
    and Trainer's ``save_total_limit`` delete old ones): the state holds what it contributed.
    One that exists but is not given, or changed, or a new checkpoint that sorts before the
    last one folded in, raises ``StateError``."""
    by_real = {f.realpath: i for i, f in enumerate(fingerprints)}
    history: list[Checkpoint] = []
    history_files: list[Path] = []
    prints: list[Fingerprint] = []
    gone: set[int] = set()
    present: list[int] = []
    for position, folded in enumerate(saved.checkpoints):
        index = by_real.get(folded["realpath"])
        if index is None:
            if os.path.lexists(folded["realpath"]) or os.path.lexists(folded["path"]):
                raise StateError(
                    saved.folder,
                    f"checkpoint {folded['path']} was folded in but is no longer among the inputs",
                )
            gone.add(position)
            history.append(_recorded(folded))
            history_files.append(Path(folded["path"]))
            prints.append(
                Fingerprint(folded["path"], folded["realpath"], folded["size"], folded["mtime_ns"])
            )
            continue
        now = fingerprints[index]
        if (now.size, now.mtime_ns) != (folded["size"], folded["mtime_ns"]):
            raise StateError(
                saved.folder, f"checkpoint {folded['path']} changed since it was folded in"
            )
        present.append(index)
        history.append(ordered[index])
        history_files.append(files[index])
        prints.append(now)
    if present != list(range(len(present))):
        newer = next(c.path for i, c in enumerate(ordered) if i not in present)
        raise StateError(
            saved.folder,
            f"new checkpoint {newer} comes before {saved.checkpoints[-1]['path']}, the last "
            "one folded in",
        )
    fresh = list(ordered[len(present) :])
    last_step = saved.checkpoints[-1].get("step") if saved.checkpoints else None
    if fresh and settings.order == "step" and last_step is not None:
        first = fresh[0]
        if first.step is not None and first.step <= last_step:
            raise StateError(
                saved.folder,
                f"new checkpoint {first.path} comes before {saved.checkpoints[-1]['path']}, "
                "the last one folded in",
            )
    if settings.num_updates == "index" and settings.decay is not None:
        # positions count the folded checkpoints, gone or not
        fresh = [
            Checkpoint(c.path, c.step, n, engine.effective_decay(settings.decay, n))
            for n, c in enumerate(fresh, start=len(history))
        ]
    return Resumed(
        [*history, *fresh],
        [*history_files, *files[len(present) :]],
        [*prints, *fingerprints[len(present) :]],
        len(history),
        frozenset(gone),
    )


def _recorded(record: dict[str, Any]) -> Checkpoint:
    decay = record.get("decay")
    return Checkpoint(
        record["path"],
        record["step"],
        record["num_updates"],
        None if decay is None else np.float32(decay),
    )


def record(
    output: Path,
    settings: Settings,
    checkpoints: list[tuple[Checkpoint, Fingerprint, str | dict[str, str] | None]],
    plan: ReplayPlan,
    shadows: str,
) -> dict[str, Any]:
    """``state.json``'s content: the checkpoints folded in (each with its fingerprint and, when
    ``--hash`` computed it, its sha256, which later runs reuse while the fingerprint still
    matches), the output, the binding settings, the shadows file and the tensors it holds."""
    return {
        "checkpoints": [
            {
                "decay": None if c.decay is None else float(c.decay),
                "mtime_ns": f.mtime_ns,
                "num_updates": c.num_updates,
                "path": c.path,
                "realpath": f.realpath,
                "size": f.size,
                "step": c.step,
                **({} if digest is None else {"sha256": digest}),
            }
            for c, f, digest in checkpoints
        ],
        "format": STATE_FORMAT,
        "output": os.path.realpath(output),
        "settings": binding_settings(settings),
        "shadows": shadows,
        "tensors": {
            j.name: {"dtype": j.info.dtype.name, "shape": list(j.info.shape)} for j in plan.averaged
        },
        "tool": f"ema-cli {__version__}",
    }


def size_bound(content: dict[str, Any], hashed: bool) -> int:
    """Bytes ``content`` (a ``record`` made without digests) can take once the digests
    (``--hash``; a folder has one per file) are added: what a run reserves for ``state.json``
    before it replaces any output."""
    digest = len(', "sha256": ""') + 64 + 2 * 4096 if hashed else 0
    return len(report.to_json(content).encode()) + digest * len(content["checkpoints"]) + 4096


def commit(
    folder: Path,
    content: dict[str, Any],
    durable: bool = True,
    staged: StagedFile | None = None,
) -> None:
    """Make ``content`` (``record``; its shadows file already in place) the current state,
    then drop older shadows files. ``staged``: the ``state.json`` temporary the run made (and
    reserved space for) before it replaced any output."""
    data = report.to_json(content).encode()
    if staged is not None:
        staged.publish(data, durable)
    else:
        write_file_atomically(folder / STATE_FILE, data, durable)
    remove_leftovers(folder, keep=content["shadows"])


def remove_leftovers(folder: Path, keep: str | None = None) -> None:
    """Delete what killed runs left in a state folder (hidden ``.*.tmp`` files: half-written
    shadows or ``state.json``) and, given the current shadows file ``keep``, the shadows of
    earlier states. Only call it while holding the state's lock."""
    leftovers = list(folder.glob(".*.tmp")) if folder.is_dir() else []
    if keep is not None:
        pattern = f"{_SHADOWS_STEM}*{_shadows_suffix()}"
        leftovers += [p for p in folder.glob(pattern) if p.name != keep]
    for entry in leftovers:
        with contextlib.suppress(OSError):
            entry.unlink()
