"""What a run tells people and machines: the mapping/summary record, output metadata, tables and
the progress bar. Nothing here decides anything; it only describes what ``job`` did.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np

from ema_cli import __version__, engine, profiles
from ema_cli.formats import checkpoint_stats
from ema_cli.formats.base import CheckpointReader
from ema_cli.plan import Checkpoint, ReplayPlan, Settings

TOOL = f"ema-cli {__version__}"


def to_json(value: Any) -> str:
    """How every JSON ema-cli writes is laid out: sorted keys (the same run, the same bytes),
    indented, ending in a newline."""
    return json.dumps(value, indent=2, sort_keys=True) + "\n"


def human_size(n: float) -> str:
    """``1234567`` -> ``1.2 MB`` (decimal units, as disk tools and Hugging Face count)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def sha256(path: Path) -> str | dict[str, str]:
    """A file's sha256; for a folder checkpoint, each file's."""
    if path.is_dir():
        return {p.name: _sha256_file(p) for p in sorted(path.iterdir()) if p.is_file()}
    return _sha256_file(path)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights(checkpoints: Sequence[Checkpoint], settings: Settings) -> list[float]:
    """Each checkpoint's share of the final average: for TF's replay, of float32 tensors, from
    the decays each ``apply`` used (``engine.contribution_weights``); for the other profiles,
    ``profiles.weights`` (each checkpoint's exact contribution)."""
    if not settings.replays_engine:
        return profiles.weights(settings.average, [c.step for c in checkpoints])
    f32 = np.dtype(np.float32)
    cs = []
    for c in checkpoints:
        assert c.decay is not None
        cs.append(float(engine.coefficient(c.decay, f32)))
    return engine.contribution_weights(cs, zero_debias=settings.zero_debias)


def describe_profile(settings: Settings) -> dict[str, Any]:
    """The profile's record in the mapping file: its label (which names its output in a
    sweep), its kind and its parameters."""
    profile = settings.average
    record: dict[str, Any] = {"label": settings.label}
    if isinstance(profile, profiles.Decay):
        record.update(kind="decay", decay=profile.decay, num_updates=profile.num_updates)
        record["zero_debias"] = profile.zero_debias
    elif isinstance(profile, profiles.DecayPerStep):
        record.update(kind="decay-per-step", decay=profile.decay, num_updates=profile.num_updates)
    elif isinstance(profile, profiles.Mean):
        record.update(kind="mean")
    elif isinstance(profile, profiles.PowerEMA):
        record.update(kind="power", gamma=profile.gamma, sigma_rel=profile.sigma_rel)
    else:
        record.update(kind="weights", normalize=profile.normalize, source=profile.source)
    return record


def checkpoint_record(
    checkpoint: Checkpoint, weight: float, size: int | None, digest: str | dict[str, str] | None
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "decay": None if checkpoint.decay is None else float(checkpoint.decay),
        "num_updates": checkpoint.num_updates,
        "path": checkpoint.path,
        "step": checkpoint.step,
        "weight": weight,
    }
    if size is not None:
        record["size"] = size
    if digest is not None:
        record["sha256"] = digest
    return record


def summary(
    plan: ReplayPlan,
    checkpoints: Sequence[dict[str, Any]],
    output: Path,
    *,
    outputs: Sequence[dict[str, Any]] = (),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The mapping file's content: names, settings and provenance. Deterministic: the same run
    writes the same bytes (keys are sorted when written)."""
    s = plan.settings
    return {
        "average_optimizer": s.average_optimizer,
        "checkpoints": list(checkpoints),
        "decay": s.decay,
        "ema_name": s.ema_name,
        "exclude": list(s.exclude),
        "include": list(s.include),
        "mapping": plan.mapping,
        "names": s.names,
        "num_updates": s.num_updates,
        "order": s.order,
        "output": str(output),
        "outputs": list(outputs),
        "passthrough": sorted(t.name for t in plan.passthrough),
        "precision": s.precision,
        "profile": describe_profile(s),
        "tool": TOOL,
        "zero_debias": s.zero_debias,
        **(extra or {}),
    }


def output_metadata(
    plan: ReplayPlan, template: Mapping[str, str], count: int, defaults: Mapping[str, str]
) -> dict[str, str]:
    """The template's metadata, the output format's ``defaults`` where the template has none
    (safetensors: ``format: pt``, which several loaders insist on), and the EMA settings.
    ``count`` is how many checkpoints it covers."""
    s = plan.settings
    meta = dict(template)
    for key, value in defaults.items():
        meta.setdefault(key, value)
    meta.update(
        {
            "ema.checkpoints": str(count),
            "ema.decay": "none" if s.decay is None else repr(s.decay),
            "ema.name": s.ema_name,
            "ema.names": s.names,
            "ema.num_updates": "none" if s.num_updates is None else str(s.num_updates),
            "ema.precision": s.precision,
            "ema.tool": TOOL,
            "ema.zero_debias": "true" if s.zero_debias else "false",
        }
    )
    if not s.replays_engine:  # TF's replay's outputs keep the bytes they had before profiles
        meta["ema.profile"] = s.label
    return meta


@contextlib.contextmanager
def progress_bar(
    enabled: bool, total: int, label: str = "averaging"
) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr (bytes, speed, time left), or a no-op sink."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn(label),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def describe_checkpoint(given: str, reader: CheckpointReader, step: int | None) -> dict[str, Any]:
    """``inspect``'s record of one checkpoint."""
    tensors = [
        {
            "dtype": t.dtype.name,
            "name": t.name,
            "nbytes": t.nbytes,
            "shape": list(t.shape),
            **reader.tensor_notes(t.name),
        }
        for t in reader.tensors.values()
    ]
    return {
        "bytes": sum(t["nbytes"] for t in tensors),
        "format": reader.format_name,
        "metadata": dict(reader.metadata),
        "path": given,
        "size": checkpoint_stats(reader.path)[0],
        "step": step,
        "tensor_count": len(tensors),
        "tensors": tensors,
    }


Column = tuple[str, str]  # (header, "left" or "right")


def _print_table(
    title: str | None, columns: Sequence[Column], rows: Sequence[Sequence[str]]
) -> None:
    """A table on stdout: drawn by rich on a terminal; plain aligned text otherwise (pipes,
    files, scripts), which is what a script would parse and costs no rich import."""
    import sys

    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, title_justify="left")
        for header, justify in columns:
            table.add_column(header, justify=justify)  # type: ignore[arg-type]
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        return
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, (h, _) in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.rjust(width) if justify == "right" else cell.ljust(width)
            for cell, width, (_, justify) in zip(cells, widths, columns, strict=True)
        ]
        return "  ".join(parts).rstrip()

    text = [title] if title else []
    text += [line([h for h, _ in columns]), line(["-" * w for w in widths])]
    text += [line(row) for row in rows]
    click.echo("\n".join(text))


def print_inspection(records: Sequence[dict[str, Any]]) -> None:
    """Tables on stdout: one per checkpoint, one row per tensor."""
    for record in records:
        step = "no step" if record["step"] is None else f"step {record['step']}"
        click.echo(
            f"{record['path']}: {record['format']}, {step}, {record['tensor_count']} tensors, "
            f"{human_size(record['bytes'])}"
        )
        rows = [
            [t["name"], t["dtype"], str(tuple(t["shape"])), human_size(t["nbytes"])]
            for t in record["tensors"]
        ]
        columns = [("tensor", "left"), ("dtype", "left"), ("shape", "left"), ("bytes", "right")]
        if any("object_path" in t for t in record["tensors"]):  # TensorFlow's object graph
            columns += [("object path", "left"), ("role", "left")]
            for row, t in zip(rows, record["tensors"], strict=True):
                row += [t.get("object_path", ""), t.get("role", "")]
        _print_table(None, columns, rows)


def _bar(weight: float, top: float, width: int = 24) -> str:
    """A bar of up to ``width`` blocks for ``weight`` (of ``top``); a negative weight ends in
    '-'."""
    if weight != weight:  # NaN: zero debias with decay 1
        return "?"
    return "█" * max(0, round(width * abs(weight) / top)) + ("-" if weight < 0 else "")


def _window_text(window: Mapping[str, Any] | None) -> str:
    if not window:
        return "no window (the weights are not numbers)"
    parts = []
    for share in ("50%", "90%"):
        w = window[share]
        if w["first_step"] is None:
            steps = ""
        elif w["first_step"] == w["last_step"]:
            steps = f" (step {w['last_step']})"
        else:
            steps = f" (steps {w['first_step']}-{w['last_step']}, {w['steps']} steps)"
        noun = "checkpoint" if w["checkpoints"] == 1 else f"{w['checkpoints']} checkpoints"
        parts.append(f"{share} in the last {noun}{steps}")
    return "the weight's " + ", ".join(parts)


def print_plan(records: Sequence[Mapping[str, Any]], folded: int = 0) -> None:
    """``--dry-run``: the replay order, each checkpoint's weight in every average (with bars; for
    a single TF replay also its num_updates and decay), each average's effective window, and
    what is averaged and copied."""
    first = records[0]
    checkpoints = first["checkpoints"]
    single_decay = len(records) == 1 and first["profile"]["kind"] == "decay"
    columns: list[Column] = [("#", "right"), ("checkpoint", "left"), ("step", "right")]
    if single_decay:
        columns += [("num_updates", "right"), ("decay", "right")]
    for record in records:
        header = "weight" if len(records) == 1 else record["profile"]["label"]
        columns += [(header, "right"), ("", "left")]
    tops = [
        max((abs(c["weight"]) for c in r["checkpoints"] if c["weight"] == c["weight"]), default=0.0)
        or 1.0
        for r in records
    ]
    rows = []
    for i, c in enumerate(checkpoints):
        name = (
            c["path"]
            + ("  (folded in)" if i < folded else "")
            + ("  (gone)" if c.get("gone") else "")
        )
        row = [str(i), name, "-" if c["step"] is None else str(c["step"])]
        if single_decay:
            row += [
                "-" if c["num_updates"] is None else str(c["num_updates"]),
                f"{c['decay']:.6g}",
            ]
        for record, top in zip(records, tops, strict=True):
            weight = record["checkpoints"][i]["weight"]
            row += [f"{weight:.6f}", _bar(weight, top, max(6, 24 // len(records)))]
        rows.append(row)
    _print_table(f"replay plan: {len(checkpoints)} checkpoints", columns, rows)
    for record in records:
        click.echo(f"{record['profile']['label']}: {_window_text(record.get('window'))}")
    averaged = sorted(first["mapping"])
    copied = first["passthrough"]
    click.echo(f"averaged ({len(averaged)}): {_name_list(averaged)}")
    click.echo(f"copied from the last checkpoint ({len(copied)}): {_name_list(copied)}")
    paths = [o["path"] for r in records for o in r["outputs"]]
    click.echo("would write " + ", ".join(paths))


def _name_list(names: Sequence[str], limit: int = 12) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
