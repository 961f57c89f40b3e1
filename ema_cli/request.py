"""What one ``ema-cli average`` run is asked to do: the command line, parsed and checked on
its own (``Request.from_options``), before any file is looked at; ``job`` does the run.

The averages to compute are ``plan.Settings``, one per profile (``--decay``, ``--mean``,
``--decay-per-step``, ``--sigma-rel``/``--gamma``, ``--weights``); several make a sweep, whose
outputs and mappings are named by each profile's label (``labelled``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ema_cli import profiles
from ema_cli.defaults import DEFAULT_SETTLE_SECONDS
from ema_cli.errors import OptionError
from ema_cli.formats import is_folder_output, strip_suffix
from ema_cli.plan import Checkpoint, Selection, Settings


@dataclass(frozen=True)
class WeightsFile:
    """A ``--weights FILE``, parsed: its weights are matched to the checkpoints once they are
    in replay order (``profiles.weights_from_json``)."""

    source: str
    data: object

    @property
    def label(self) -> str:
        return profiles.label(profiles.Weights((1.0,), source=self.source))


@dataclass(frozen=True)
class Request:
    """Everything one run was asked to do (the command line, parsed)."""

    checkpoints: Sequence[str]
    output: Path
    #: The settings of every average to compute, one per profile (``--weights`` ones are
    #: resolved by ``run`` once the checkpoints are ordered); a sweep when there are several.
    profiles: tuple[Settings, ...]
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
    weights: tuple[WeightsFile, ...] = ()
    normalize: bool = False
    #: Replay threads (``--workers``); None: the CPUs this process may use.
    workers: int | None = None
    #: The settings every average shares (order, names, tensors, precision); its profile is
    #: not used. Default: the first profile's.
    common: Settings | None = None

    @functools.cached_property
    def folder_output(self) -> bool:
        """Whether ``output`` names a model folder (``formats.is_folder_output``), worked out
        once per run."""
        return is_folder_output(self.output)

    @property
    def durable(self) -> bool:
        return self.fsync if self.fsync is not None else self.state is not None

    @property
    def settings(self) -> Settings:
        """The settings every average shares (and, for one profile, its own)."""
        if self.common is not None:
            return self.common
        return self.profiles[0]

    @property
    def labels(self) -> list[str]:
        """Every average's label, in the order the outputs are listed."""
        return [s.label for s in self.profiles] + [w.label for w in self.weights]

    @property
    def sweep(self) -> bool:
        """Several averages in one pass: each output is named by its profile's label."""
        return len(self.profiles) + len(self.weights) > 1

    def output_of(self, label: str) -> Path:
        """Where the average ``label`` goes: ``-o`` itself for a single profile; in a sweep the
        output's name with the label before its suffix (``ema.safetensors`` ->
        ``ema.decay-0.99.safetensors``; a folder ``ema`` -> ``ema.decay-0.99``)."""
        return labelled(self.output, label, self.folder_output) if self.sweep else self.output

    def mapping_of(self, label: str) -> Path:
        """The mapping file of the average ``label``: ``--mapping`` or the output's default,
        with the label inserted before ``.mapping.json`` (or the last suffix) in a sweep."""
        if not self.sweep:
            return self.mapping or default_mapping_path(self.output)
        if self.mapping is None:
            return default_mapping_path(self.output_of(label))
        name = self.mapping.name
        tail = ".mapping.json" if name.endswith(".mapping.json") else self.mapping.suffix
        stem = name[: len(name) - len(tail)] if tail else name
        return self.mapping.with_name(f"{stem}.{label}{tail}")

    @classmethod
    def from_options(cls, checkpoints: Sequence[str], options: Mapping[str, Any]) -> Request:
        """The request of ``ema-cli average``'s parsed options (click's parameter names)."""
        o = dict(options)
        common: dict[str, Any] = {
            k: o.pop(k)
            for k in ("ema_name", "names", "order", "include", "exclude", "precision", "strict")
        }
        common["average_optimizer"] = o.pop("average_optimizer")
        num_updates, zero_debias = o.pop("num_updates"), o.pop("zero_debias")
        decays, per_step = o.pop("decay"), o.pop("decay_per_step")
        mean, sigmas, gammas = o.pop("mean"), o.pop("sigma_rel"), o.pop("gamma")
        weights = tuple(_read_weights(path) for path in o.pop("weights"))
        normalize = o.pop("normalize")
        if not (decays or per_step or mean or sigmas or gammas or weights):
            raise OptionError(
                "say which average to compute: --decay D (TF's ExponentialMovingAverage), "
                "--mean, --decay-per-step D, --sigma-rel S, --gamma G or --weights FILE"
            )
        if zero_debias and not decays:
            raise OptionError("--zero-debias applies to --decay (TF's replay) only")
        if num_updates is not None and not (decays or per_step):
            raise OptionError("--num-updates applies to --decay and --decay-per-step only")
        if normalize and not weights:
            raise OptionError("--normalize goes with --weights")
        settings = [Settings(d, num_updates, zero_debias, **common) for d in decays]
        built: list[tuple[str, Callable[[], profiles.Profile]]] = [
            *(
                (f"--decay-per-step {d}", functools.partial(profiles.DecayPerStep, d, num_updates))
                for d in per_step
            ),
            *(("--mean", profiles.Mean) for _ in range(1 if mean else 0)),
            *(
                (f"--sigma-rel {x}", functools.partial(profiles.PowerEMA.from_sigma_rel, x))
                for x in sigmas
            ),
            *((f"--gamma {g}", functools.partial(profiles.PowerEMA, g)) for g in gammas),
        ]
        for option, make in built:
            try:
                profile = make()
            except OptionError as e:
                raise OptionError(f"{option}: {e}") from None
            nu = profile.num_updates if isinstance(profile, profiles.DecayPerStep) else None
            settings.append(Settings(None, nu, profile=profile, **common))
        request = cls(
            checkpoints,
            profiles=tuple(settings),
            selection=Selection(**{k: o.pop(k) for k in ("last", "min_step", "max_step")}),
            hash=o.pop("hash_"),
            weights=weights,
            normalize=normalize,
            common=Settings(None, profile=profiles.Mean(), **common),
            **o,
        )
        labels = request.labels
        for label in labels:
            if labels.count(label) > 1:
                raise OptionError(f"the average {label} is asked for twice")
        return request

    def resolve(self, ordered: Sequence[Checkpoint]) -> list[Settings]:
        """Every average's settings, the ``--weights`` files matched to the checkpoints in
        replay order."""
        settings = list(self.profiles)
        paths = [c.path for c in ordered]
        for w in self.weights:
            profile = profiles.weights_from_json(
                w.data, paths, source=w.source, normalize=self.normalize
            )
            settings.append(dataclasses.replace(self.settings, decay=None, profile=profile))
        return settings


def _read_weights(path: str) -> WeightsFile:
    import json

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise OptionError(f"--weights {path}: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:  # JSON and UTF-8 errors are ValueErrors
        raise OptionError(f"--weights {path}: not a JSON list or object of weights ({e})") from None
    return WeightsFile(path, data)


def labelled(output: Path, label: str, folder: bool) -> Path:
    """``output``'s name with ``.label`` inserted before its format suffix (for a folder, at
    its end): ``ema.safetensors`` + ``decay-0.99`` -> ``ema.decay-0.99.safetensors``."""
    if folder:
        return output.with_name(f"{output.name}.{label}")
    stem = strip_suffix(output.name)
    return output.with_name(f"{stem}.{label}{output.name[len(stem) :]}")


def default_mapping_path(output: Path) -> Path:
    """``out/avg.safetensors`` -> ``out/avg.mapping.json``; ``out/run-ema`` (a folder) ->
    ``out/run-ema.mapping.json``."""
    return output.with_name(strip_suffix(output.name) + ".mapping.json")
