"""The ``ema-cli`` command line: options -> plan -> replay -> report.

Exit status is decided in one place (``EmaCliGroup.main``): 0 success, 2 bad input or usage
(one line on stderr, no traceback), 1 anything unexpected (traceback only with ``--debug`` or
``EMA_CLI_DEBUG=1``), 130 when interrupted. Progress and messages go to stderr; stdout carries
only what was asked for (``--json``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import click

from ema_cli import __version__, engine
from ema_cli.errors import EmaCliError, OptionError
from ema_cli.formats import (
    check_output_path,
    create_writer,
    find_checkpoint,
    is_folder_output,
    open_checkpoint,
    strip_format_suffix,
)
from ema_cli.formats.base import write_file_atomically
from ema_cli.formats.sharded import parse_size
from ema_cli.plan import NumUpdates, ReplayPlan, Settings, build_plan, order_checkpoints
from ema_cli.replay import replay, total_bytes

TOOL = f"ema-cli {__version__}"


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _error(message: str) -> None:
    click.echo(f"ema-cli: error: {_one_line(message)}", err=True)


class EmaCliGroup(click.Group):
    """A click group whose ``main`` turns every failure into an exit status and one line."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> NoReturn:
        argv = list(sys.argv[1:] if args is None else args)
        debug = os.environ.get("EMA_CLI_DEBUG", "") not in ("", "0") or "--debug" in argv
        status = 0
        previous_handler = _catch_sigterm()
        try:
            rv = super().main(
                argv, prog_name or "ema-cli", complete_var, standalone_mode=False, **extra
            )
            status = rv if isinstance(rv, int) else 0
        except click.UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError" and e.ctx is not None:  # bare `ema-cli`
                click.echo(e.ctx.get_help())
                status = 0
            else:
                hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
                _error(e.format_message() + hint)
                status = 2
        except click.ClickException as e:
            _error(e.format_message())
            status = e.exit_code
        except EmaCliError as e:
            _error(str(e))
            status = e.exit_code
        except _Terminated:
            click.echo("ema-cli: terminated; nothing was written", err=True)
            status = 128 + signal.SIGTERM
        except (KeyboardInterrupt, click.Abort):
            click.echo("ema-cli: interrupted; nothing was written", err=True)
            status = 130
        except BrokenPipeError:
            # The reader of our stdout went away (`ema-cli ... --json | head`): not an error.
            with contextlib.suppress(OSError):
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences the final flush
            status = 141
        except Exception as e:
            if debug:
                traceback.print_exc()
            _error(
                f"internal error: {type(e).__name__}: {e}. This is a bug in ema-cli; "
                + ("" if debug else "rerun with EMA_CLI_DEBUG=1 for the traceback and ")
                + "please report it"
            )
            status = 1
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
        sys.exit(status)


class _Terminated(Exception):
    """SIGTERM arrived: unwind like Ctrl-C so temporary files are removed."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def _catch_sigterm() -> Any:
    """Turn SIGTERM (what cron wrappers and CI runners send) into an exception we clean up after."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


@click.group(
    cls=EmaCliGroup,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, "--version", prog_name="ema-cli", message="%(prog)s %(version)s")
@click.option(
    "--debug",
    is_flag=True,
    help="Show the traceback of unexpected errors (or set EMA_CLI_DEBUG=1).",
)
def cli(debug: bool) -> None:
    """Average a run's checkpoints exactly as tf.train.ExponentialMovingAverage would have.

    \b
    Quick start:
      ema-cli average ckpts/ckpt-*.safetensors -o ema.safetensors --decay 0.999
    writes ema.safetensors (a drop-in checkpoint holding the averages) and
    ema.mapping.json (TF's original -> shadow names, the settings and the inputs).
    """


class NumUpdatesType(click.ParamType):  # type: ignore[type-arg]
    name = "N|step|index"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> NumUpdates:
        if value in ("step", "index") or value is None:
            return value  # type: ignore[no-any-return]
        try:
            n = int(str(value))
        except ValueError:
            self.fail(f"{value!r} is not a whole number, 'step' or 'index'", param, ctx)
        if n < 0:
            self.fail(f"{n} is negative", param, ctx)
        return n


def default_mapping_path(output: Path) -> Path:
    """``out/avg.safetensors`` -> ``out/avg.mapping.json``."""
    return output.with_name(strip_format_suffix(output.name) + ".mapping.json")


def _expand_stdin(arguments: Sequence[str]) -> list[str]:
    paths: list[str] = []
    if arguments.count("-") > 1:
        raise OptionError("'-' (read checkpoint paths from standard input) can be given once")
    for arg in arguments:
        if arg == "-":
            paths.extend(line.strip() for line in sys.stdin if line.strip())
        else:
            paths.append(arg)
    if not paths:
        raise OptionError("no checkpoints given (standard input was empty)")
    return paths


def _parse_max_shard_size(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx, param) from None


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` lies in ``folder`` (at any depth, symlinks resolved)."""
    return Path(os.path.realpath(folder)) in Path(os.path.realpath(path)).parents


def _disk_size(path: Path) -> int:
    """Bytes of a file, or of the files of a folder output."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return path.stat().st_size


def _same_file(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def summary(plan: ReplayPlan, output: Path) -> dict[str, Any]:
    """The mapping file's content: names, settings and provenance. Deterministic."""
    s = plan.settings
    return {
        "checkpoints": [
            {"path": c.path, "step": c.step, "num_updates": c.num_updates, "decay": float(c.decay)}
            for c in plan.checkpoints
        ],
        "decay": s.decay,
        "ema_name": s.ema_name,
        "exclude": list(s.exclude),
        "include": list(s.include),
        "mapping": plan.mapping,
        "names": s.names,
        "num_updates": s.num_updates,
        "order": s.order,
        "output": str(output),
        "passthrough": sorted(t.name for t in plan.passthrough),
        "precision": s.precision,
        "tool": TOOL,
        "zero_debias": s.zero_debias,
    }


def output_metadata(plan: ReplayPlan, template: dict[str, str]) -> dict[str, str]:
    """The last checkpoint's metadata plus the EMA settings (``format`` defaults to ``pt``)."""
    s = plan.settings
    meta = dict(template)
    meta.setdefault("format", "pt")
    meta.update(
        {
            "ema.checkpoints": str(len(plan.checkpoints)),
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
def _progress(enabled: bool, total: int) -> Iterator[Any]:
    """A rich progress bar on stderr, or a no-op sink."""
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
        TextColumn("averaging"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task("averaging", total=total)
        yield lambda n: bar.advance(task, n)


def _human_size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    raise AssertionError


@cli.command(context_settings={"max_content_width": 100})
@click.argument("checkpoints", nargs=-1, required=True, metavar="CHECKPOINT...")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="The averaged checkpoint to write: a .safetensors file, or a name without a suffix for "
    "a Hugging Face model folder (shards, index, and the last checkpoint's config and tokenizer "
    "files). An earlier output there is replaced once the new one is complete.",
)
@click.option(
    "--decay",
    required=True,
    type=float,
    help="TF's decay, 0 <= D <= 1 (typically 0.99-0.9999). Used as a float32, as TF does.",
)
@click.option(
    "--num-updates",
    type=NumUpdatesType(),
    default=None,
    help="TF's num_updates: a fixed count N, each checkpoint's 'step' number, or its 0-based 'index' in the replay. The decay used is min(decay, (1+n)/(10+n)). [default: off]",
)
@click.option(
    "--zero-debias",
    is_flag=True,
    help="Shadows start at zero and are debiased (TF's zero_debias=True for tensors). Default: shadows start at the first checkpoint.",
)
@click.option(
    "--name",
    "ema_name",
    default=engine.DEFAULT_EMA_NAME,
    show_default=True,
    help="The EMA name: shadow names are '<tensor>/<name>'.",
)
@click.option(
    "--names",
    type=click.Choice(["original", "shadow"]),
    default="original",
    show_default=True,
    help="Names of the averaged tensors in the output: 'original' makes a drop-in checkpoint, 'shadow' uses TF's shadow names.",
)
@click.option(
    "--mapping",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write the name mapping (JSON).  [default: OUTPUT with its suffix replaced by .mapping.json]",
)
@click.option(
    "--order",
    type=click.Choice(["step", "given"]),
    default="step",
    show_default=True,
    help="'step' sorts checkpoints by the step number in their names (ckpt-2 before ckpt-10); 'given' keeps the command-line order.",
)
@click.option(
    "--include",
    multiple=True,
    metavar="GLOB",
    help="Average only tensors whose names match (shell-style; repeatable). Others are copied from the last checkpoint.",
)
@click.option(
    "--exclude",
    multiple=True,
    metavar="GLOB",
    help="Do not average tensors whose names match (repeatable); they are copied from the last checkpoint.",
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "native"]),
    default="auto",
    show_default=True,
    help="'auto' averages float16/bfloat16 in float32 and rounds once when writing; 'native' is TF's arithmetic in each tensor's own dtype.",
)
@click.option(
    "--strict",
    is_flag=True,
    help="Refuse tensors TF's EMA cannot average (integers, bools, float8) instead of copying them from the last checkpoint.",
)
@click.option(
    "--max-shard-size",
    callback=_parse_max_shard_size,
    metavar="SIZE",
    help="Folder outputs: the most tensor data per shard file, e.g. 5GB, 500MB, 2GiB (GB = 10^9 "
    "bytes as Hugging Face counts, GiB = 2^30). A bigger tensor gets a shard of its own; a model "
    "that fits in one shard is written as model.safetensors without an index.  [default: 5GB]",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print a machine-readable summary (the mapping file's content plus 'mapping_file') on stdout.",
)
@click.option(
    "-q",
    "--quiet",
    is_flag=True,
    help="No progress bar and no summary on stderr (errors are still shown).",
)
def average(
    checkpoints: tuple[str, ...],
    output: Path,
    decay: float,
    num_updates: NumUpdates,
    zero_debias: bool,
    ema_name: str,
    names: str,
    mapping: Path | None,
    order: str,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    precision: str,
    strict: bool,
    max_shard_size: int | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Replay CHECKPOINT... (oldest first) through the EMA and write the averaged checkpoint.

    A CHECKPOINT is a .safetensors file, a folder holding one, or a sharded Hugging Face model
    folder (model.safetensors.index.json and its shards); '-' reads more paths from standard
    input, one per line. Float tensors are averaged; all others (and excluded ones)
    are copied from the last checkpoint, so the output loads wherever the inputs load.

    \b
    Examples:
      ema-cli average run/ckpt-*.safetensors -o ema.safetensors --decay 0.999
      ema-cli average run/ckpt-*.safetensors -o ema.safetensors --decay 0.9999 --num-updates step
      ls run/*.safetensors | ema-cli average - -o ema.safetensors --decay 0.99 --json
      ema-cli average run/checkpoint-* -o run-ema --decay 0.999 --max-shard-size 2GB

    Exit status: 0 done, 2 bad input or options (one line on stderr, nothing written), 1 bug.
    """
    settings = Settings(
        decay=decay,
        num_updates=num_updates,
        zero_debias=zero_debias,
        ema_name=ema_name,
        names=names,  # type: ignore[arg-type]
        order=order,  # type: ignore[arg-type]
        include=include,
        exclude=exclude,
        precision=precision,  # type: ignore[arg-type]
        strict=strict,
    )
    check_output_path(output)
    folder_output = is_folder_output(output)
    if max_shard_size is not None and not folder_output:
        raise OptionError(
            f"--max-shard-size applies to folder outputs, and {output} is a file "
            "(name the output without a suffix to write a model folder)"
        )
    mapping_path = mapping if mapping is not None else default_mapping_path(output)
    if _same_file(mapping_path, output):
        raise OptionError(f"{mapping_path}: the mapping file cannot be the output checkpoint")

    ordered = order_checkpoints(_expand_stdin(checkpoints), settings)
    files = [find_checkpoint(Path(c.path)) for c in ordered]
    for given, file in zip(ordered, files, strict=True):
        for target, what in ((output, "output"), (mapping_path, "mapping file")):
            if _same_file(file, target):
                raise OptionError(
                    f"{target}: the {what} is one of the input checkpoints ({given.path})"
                )
        if folder_output and _inside(file, output):
            # Committing replaces the whole folder, which would delete this input.
            raise OptionError(
                f"{output}: the output folder holds the input checkpoint {given.path}; "
                "name another output folder"
            )

    with contextlib.ExitStack() as stack:
        readers = [stack.enter_context(open_checkpoint(f)) for f in files]
        plan = build_plan(ordered, [r.tensors for r in readers], settings)
        if not quiet:
            for pattern in plan.unmatched_excludes:
                click.echo(f"ema-cli: warning: --exclude {pattern!r} matches no tensor", err=True)
        report = summary(plan, output)
        mapping_bytes = (json.dumps(report, indent=2, sort_keys=True) + "\n").encode()
        for target in (output, mapping_path):
            if not target.parent.is_dir():
                raise OptionError(f"{target}: folder {target.parent} does not exist")

        writer = stack.enter_context(
            create_writer(
                output,
                plan.output_tensors,
                output_metadata(plan, dict(readers[-1].metadata)),
                template=readers[-1],
                max_shard_size=max_shard_size,
            )
        )
        show = not quiet and sys.stderr.isatty()
        with _progress(show, total_bytes(plan)) as advance:
            for done in replay(plan, readers, writer):
                advance(done)
        writer.commit()
    write_file_atomically(mapping_path, mapping_bytes)

    if as_json:
        click.echo(
            json.dumps({**report, "mapping_file": str(mapping_path)}, indent=2, sort_keys=True)
        )
    if not quiet:
        first, last = plan.checkpoints[0].path, plan.checkpoints[-1].path
        span = first if len(plan.checkpoints) == 1 else f"{first} ... {last}"
        click.echo(
            f"averaged {len(plan.averaged)} tensors over {len(plan.checkpoints)} checkpoints "
            f"({span}); copied {len(plan.passthrough)} from the last",
            err=True,
        )
        click.echo(
            f"wrote {output} ({_human_size(_disk_size(output))}) and mapping {mapping_path}",
            err=True,
        )


def main() -> NoReturn:
    """Console-script entry point."""
    cli.main(prog_name="ema-cli")
