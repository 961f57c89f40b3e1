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

from ema_cli import __version__, engine
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
    """Each checkpoint's share of the final average, for float32 tensors (see
    ``engine.contribution_weights``)."""
    f32 = np.dtype(np.float32)
    cs = [float(engine.coefficient(c.decay, f32)) for c in checkpoints]
    return engine.contribution_weights(cs, zero_debias=settings.zero_debias)


def checkpoint_record(
    checkpoint: Checkpoint, weight: float, size: int | None, digest: str | dict[str, str] | None
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "decay": float(checkpoint.decay),
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
            "ema.decay": repr(s.decay),
            "ema.name": s.ema_name,
            "ema.names": s.names,
            "ema.num_updates": "none" if s.num_updates is None else str(s.num_updates),
            "ema.precision": s.precision,
            "ema.tool": TOOL,
            "ema.zero_debias": "true" if s.zero_debias else "false",
        }
    )
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


def print_plan(record: Mapping[str, Any], folded: int = 0) -> None:
    """``--dry-run``: the replay order, each checkpoint's decay and weight (with bars), and what
    is averaged and copied."""
    checkpoints = record["checkpoints"]
    top = max((c["weight"] for c in checkpoints), default=0.0) or 1.0
    rows = []
    for i, c in enumerate(checkpoints):
        bar = "█" * max(0, round(24 * c["weight"] / top)) if c["weight"] == c["weight"] else "?"
        name = c["path"] + ("  (folded in)" if i < folded else "")
        rows.append(
            [
                str(i),
                name,
                "-" if c["step"] is None else str(c["step"]),
                "-" if c["num_updates"] is None else str(c["num_updates"]),
                f"{c['decay']:.6g}",
                f"{c['weight']:.6f}",
                bar,
            ]
        )
    columns = [
        ("#", "right"),
        ("checkpoint", "left"),
        ("step", "right"),
        ("num_updates", "right"),
        ("decay", "right"),
        ("weight", "right"),
        ("", "left"),
    ]
    _print_table(f"replay plan: {len(checkpoints)} checkpoints", columns, rows)
    averaged = sorted(record["mapping"])
    copied = record["passthrough"]
    click.echo(f"averaged ({len(averaged)}): {_name_list(averaged)}")
    click.echo(f"copied from the last checkpoint ({len(copied)}): {_name_list(copied)}")
    click.echo(
        f"would write {record['output']}"
        + "".join(f", {o['path']}" for o in record["outputs"] if o["path"] != record["output"])
    )


def _name_list(names: Sequence[str], limit: int = 12) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
