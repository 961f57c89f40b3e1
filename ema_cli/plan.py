"""From checkpoint names and headers to a validated, ordered replay plan. Pure: no file access.

The plan decides everything before a byte of tensor data is read: replay order, each
checkpoint's ``num_updates`` and effective decay, which tensors are averaged and under which
names, which are copied from the last checkpoint, and every way the checkpoints disagree.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ema_cli import engine, profiles
from ema_cli.checkpoint import TensorInfo
from ema_cli.errors import CheckpointError, OptionError
from ema_cli.formats.registry import strip_suffix

NumUpdates = int | Literal["step", "index"] | None
Order = Literal["step", "given"]
NamesMode = Literal["original", "shadow", "both"]

_DIGITS = re.compile(r"\d+")
#: The largest num_updates TF takes: its step counters are int64.
MAX_NUM_UPDATES = 2**63 - 1


def step_from_name(name: str) -> int | None:
    """The last run of digits in a checkpoint's file or folder name, after its format suffix.

    ``ckpt-1200.safetensors`` -> 1200, ``ckpt-8.weights.h5`` -> 8, ``checkpoint-500/`` -> 500,
    ``run3_step0042.npz`` -> 42, ``model.safetensors`` -> None.
    """
    base = strip_suffix(name.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1])
    runs = _DIGITS.findall(base)
    return int(runs[-1]) if runs else None


@dataclass(frozen=True)
class Settings:
    """The averaging and selection settings of one average (everything but the checkpoint list).

    ``profile`` None is TF's replay with ``decay``, ``num_updates`` and ``zero_debias`` (the
    default, and what ``--decay`` asks for); any other ``profiles.Profile`` (``--mean``,
    ``--decay-per-step``, ``--sigma-rel``, ``--weights``) leaves ``decay`` None and carries its
    own parameters (``num_updates`` mirrors a ``DecayPerStep``'s). ``average`` is the profile
    either way.
    """

    decay: float | None
    num_updates: NumUpdates = None
    zero_debias: bool = False
    ema_name: str = engine.DEFAULT_EMA_NAME
    names: NamesMode = "original"
    order: Order = "step"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    precision: engine.Precision = "auto"
    strict: bool = False
    average_optimizer: bool = False
    profile: profiles.Profile | None = None

    def __post_init__(self) -> None:
        if self.profile is None or isinstance(self.profile, profiles.Decay):
            if self.decay is None or not (0.0 <= self.decay <= 1.0):  # also refuses NaN
                raise OptionError(f"--decay must be between 0 and 1, got {self.decay}")
            if self.profile is not None:
                raise ValueError("a Decay profile is given as decay, num_updates, zero_debias")
        elif self.decay is not None or self.zero_debias:
            raise ValueError(f"{profiles.label(self.profile)}: decay and zero_debias are its own")
        if isinstance(self.num_updates, int) and self.num_updates < 0:
            raise OptionError(f"--num-updates must be >= 0, got {self.num_updates}")
        if isinstance(self.num_updates, int) and self.num_updates > MAX_NUM_UPDATES:
            raise OptionError(
                f"--num-updates must be at most {MAX_NUM_UPDATES} (TF counts updates in int64), "
                f"got a {len(str(self.num_updates))}-digit number"
            )
        if not self.ema_name or self.ema_name.startswith("/") or self.ema_name.endswith("/"):
            raise OptionError(
                f"--name must be a non-empty name without a leading or trailing '/', got {self.ema_name!r}"
            )

    @property
    def average(self) -> profiles.Profile:
        """The profile this average computes."""
        if self.profile is not None:
            return self.profile
        assert self.decay is not None
        return profiles.Decay(self.decay, self.num_updates, self.zero_debias)

    @property
    def replays_engine(self) -> bool:
        """Whether the average is TF's recurrence (``engine``), not a linear profile's sum."""
        return self.profile is None

    @property
    def label(self) -> str:
        """The profile's name in output names and messages (``profiles.label``)."""
        return profiles.label(self.average)


@dataclass(frozen=True)
class Checkpoint:
    """One replayed checkpoint: where it is, its step, and the decay its ``apply`` uses (None
    for the linear profiles, whose weights ``profiles.weights`` gives)."""

    path: str
    step: int | None
    num_updates: int | None
    decay: np.float32 | None


@dataclass(frozen=True)
class TensorJob:
    """One tensor of the output: averaged across the replay, or copied from the last checkpoint."""

    name: str
    output_name: str
    info: TensorInfo
    shadow_name: str | None

    @property
    def averaged(self) -> bool:
        return self.shadow_name is not None


@dataclass(frozen=True)
class ReplayPlan:
    settings: Settings
    checkpoints: tuple[Checkpoint, ...]
    tensors: tuple[TensorJob, ...]
    unmatched_excludes: tuple[str, ...] = field(default=())

    @property
    def averaged(self) -> tuple[TensorJob, ...]:
        return tuple(t for t in self.tensors if t.averaged)

    @property
    def passthrough(self) -> tuple[TensorJob, ...]:
        return tuple(t for t in self.tensors if not t.averaged)

    @property
    def mapping(self) -> dict[str, str]:
        """TF's naming: original tensor name -> shadow name, for every averaged tensor."""
        return {t.name: t.shadow_name for t in self.tensors if t.shadow_name is not None}

    @property
    def output_tensors(self) -> list[TensorInfo]:
        return [TensorInfo(t.output_name, t.info.dtype, t.info.shape) for t in self.tensors]


@dataclass(frozen=True)
class Selection:
    """Which of the given checkpoints to replay (fairseq's and WeNet's habits)."""

    last: int | None = None
    min_step: int | None = None
    max_step: int | None = None

    def __post_init__(self) -> None:
        if self.last is not None and self.last < 1:
            raise OptionError(f"--last must be at least 1, got {self.last}")
        low, high = self.min_step, self.max_step
        if low is not None and high is not None and low > high:
            raise OptionError(f"--min-step {self.min_step} is above --max-step {self.max_step}")

    @property
    def by_step(self) -> bool:
        return self.min_step is not None or self.max_step is not None


def order_checkpoints(
    paths: Sequence[str], settings: Settings, selection: Selection | None = None
) -> list[Checkpoint]:
    """Put the checkpoints in replay order, apply the selection, and give each its
    ``num_updates`` and decay (``index`` counts positions in the selected replay).

    Steps are needed (and must be unique) under ``--order step``, ``--num-updates step`` and
    ``--min-step``/``--max-step``. A checkpoint given twice (under any spelling) is the caller's
    to refuse first: that needs the file system (``job.run`` does it).
    """
    if not paths:
        raise OptionError("no checkpoints given")
    selection = selection or Selection()
    steps = [step_from_name(p) for p in paths]
    needed_by = [
        why
        for why, needed in (
            ("--order step", settings.order == "step"),
            ("--num-updates step", settings.num_updates == "step"),
            ("--min-step/--max-step", selection.by_step),
            ("--decay-per-step", isinstance(settings.profile, profiles.DecayPerStep)),
            ("--sigma-rel/--gamma", isinstance(settings.profile, profiles.PowerEMA)),
        )
        if needed
    ]
    if needed_by:
        for p, s in zip(paths, steps, strict=True):
            if s is None:
                hint = "; pass its folder if the folder is numbered" if "/" in p.rstrip("/") else ""
                raise CheckpointError(
                    p,
                    f"no step number in the name (needed by {needed_by[0]}; use --order given "
                    f"to keep the command-line order{hint})",
                )
        by_step: dict[int, str] = {}
        for p, s in zip(paths, steps, strict=True):
            assert s is not None
            if s in by_step:
                raise CheckpointError(p, f"has the same step number ({s}) as {by_step[s]}")
            by_step[s] = p
    pairs = list(zip(paths, steps, strict=True))
    if settings.order == "step":
        pairs.sort(key=lambda ps: ps[1] if ps[1] is not None else -1)
    if selection.min_step is not None:
        pairs = [(p, s) for p, s in pairs if s is not None and s >= selection.min_step]
    if selection.max_step is not None:
        pairs = [(p, s) for p, s in pairs if s is not None and s <= selection.max_step]
    if selection.last is not None:
        pairs = pairs[-selection.last :]
    if not pairs:
        raise OptionError("no checkpoint is left after --min-step/--max-step")
    checkpoints = []
    for index, (p, s) in enumerate(pairs):
        if settings.num_updates == "step":
            n: int | None = s
        elif settings.num_updates == "index":
            n = index
        else:
            n = settings.num_updates
        if n is not None and n > MAX_NUM_UPDATES:
            raise CheckpointError(
                p,
                f"its step number is above {MAX_NUM_UPDATES}, the most TF's int64 num_updates "
                "holds (--num-updates step)",
            )
        decay = None if settings.decay is None else engine.effective_decay(settings.decay, n)
        checkpoints.append(Checkpoint(p, s, n, decay))
    return checkpoints


def _no_optimizer_state(name: str) -> bool:
    return False


def _selected(
    name: str, settings: Settings, optimizer_state: Callable[[str], bool] = _no_optimizer_state
) -> bool:
    if not settings.average_optimizer and optimizer_state(name):
        return False  # optimizer state: copied from the last checkpoint
    if settings.include and not any(fnmatch.fnmatchcase(name, g) for g in settings.include):
        return False
    return not any(fnmatch.fnmatchcase(name, g) for g in settings.exclude)


def build_plan(
    checkpoints: Sequence[Checkpoint],
    headers: Sequence[Mapping[str, TensorInfo]],
    settings: Settings,
    optimizer_state: Callable[[str], bool] = _no_optimizer_state,
) -> ReplayPlan:
    """Validate the headers against each other and decide each tensor's fate.

    The last checkpoint is the template: the output has its tensors, dtypes and shapes. Every
    averaged tensor must be in every checkpoint with the same dtype and shape; copied tensors
    come from the last checkpoint alone. Tensors ``optimizer_state`` says are optimizer state
    (the template reader's ``is_optimizer_state``) are copied unless ``settings.average_optimizer``.
    """
    last_path = checkpoints[-1].path
    template = headers[-1]
    names = list(template)

    for pattern in settings.include:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise OptionError(f"--include {pattern!r} matches no tensor in {last_path}")
    unmatched_excludes = tuple(
        g for g in settings.exclude if not any(fnmatch.fnmatchcase(n, g) for n in names)
    )

    jobs: list[TensorJob] = []
    for name, info in template.items():
        selected = _selected(name, settings, optimizer_state)
        averaged = selected and engine.is_averageable(info.dtype)
        if settings.strict and selected and not averaged:
            raise CheckpointError(
                last_path,
                f"dtype {info.dtype} cannot be averaged (TF's EMA takes half, bfloat16, float "
                f"or double); --strict refuses it, drop --strict to copy it or --exclude it",
                tensor=name,
            )
        shadow = engine.shadow_name(name, settings.ema_name) if averaged else None
        if shadow is not None and settings.names == "both":
            # What a TF1 training checkpoint with an EMA holds: the raw tensor (the last
            # checkpoint's, copied) and its average under the shadow name.
            jobs.append(TensorJob(name, name, info, None))
            jobs.append(TensorJob(name, shadow, info, shadow))
            continue
        output_name = shadow if (shadow is not None and settings.names == "shadow") else name
        jobs.append(TensorJob(name, output_name, info, shadow))

    averaged_names = {j.name for j in jobs if j.averaged}
    if not averaged_names:
        raise CheckpointError(
            last_path,
            "no tensor to average (none is float16/bfloat16/float32/float64 and selected by "
            "--include/--exclude)",
        )

    for ckpt, header in zip(checkpoints[:-1], headers[:-1], strict=True):
        for name in averaged_names:
            found = header.get(name)
            want = template[name]
            if found is None:
                raise CheckpointError(
                    ckpt.path,
                    f"missing (it is in {last_path}); --exclude it to copy it from the last "
                    "checkpoint instead",
                    tensor=name,
                )
            if found.dtype != want.dtype:
                raise CheckpointError(
                    ckpt.path,
                    f"dtype {found.dtype} differs from {want.dtype} in {last_path}",
                    tensor=name,
                )
            if found.shape != want.shape:
                raise CheckpointError(
                    ckpt.path,
                    f"shape {list(found.shape)} differs from {list(want.shape)} in {last_path}",
                    tensor=name,
                )
        for name, info in header.items():
            if (
                name not in template
                and _selected(name, settings, optimizer_state)
                and engine.is_averageable(info.dtype)
            ):
                raise CheckpointError(
                    ckpt.path,
                    f"not in the last checkpoint {last_path}; --exclude it if that is expected",
                    tensor=name,
                )

    all_names = set(names)
    owners: dict[str, str] = {}
    for job in jobs:
        if job.shadow_name is None:
            continue
        if job.shadow_name in all_names:
            raise CheckpointError(
                last_path,
                f"its shadow name '{job.shadow_name}' is already a tensor of the checkpoint "
                f"(an averaged checkpoint?); choose another --name, or --exclude '{job.name}'",
                tensor=job.name,
            )
        if job.shadow_name in owners:
            raise CheckpointError(
                last_path,
                f"its shadow name '{job.shadow_name}' is also that of tensor "
                f"'{owners[job.shadow_name]}'",
                tensor=job.name,
            )
        owners[job.shadow_name] = job.name

    return ReplayPlan(settings, tuple(checkpoints), tuple(jobs), unmatched_excludes)
