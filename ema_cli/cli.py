"""The ``ema-cli`` command line: a thin shell over ``job`` (the run) and ``report`` (the output).

Exit status is decided in one place (``EmaCliGroup.main``): 0 success, 2 bad input or usage
(one line on stderr, no traceback), 75 another run holds the lock, 1 anything unexpected
(traceback only with ``--debug`` or ``EMA_CLI_DEBUG=1``), 130/143 when interrupted/terminated. Progress and messages go to stderr; stdout carries
only what was asked for (``--json``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from ema_cli import __version__
from ema_cli.defaults import DEFAULT_EMA_NAME, DEFAULT_SETTLE_SECONDS
from ema_cli.errors import EmaCliError, OptionError
from ema_cli.formats import registry

# Only what --help and --version need is imported here; numpy, the engine and the formats load
# inside the commands that use them, so the command line answers at once.
if TYPE_CHECKING:
    from ema_cli.plan import NumUpdates


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
        failure = None  # the one line that explains a non-zero status
        previous_handlers = _catch_signals()
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
                failure, status = e.format_message() + hint, 2
        except click.ClickException as e:
            failure, status = e.format_message(), e.exit_code
        except EmaCliError as e:
            failure, status = str(e), e.exit_code
        except _Terminated:
            failure, status = "terminated; nothing was written", 128 + signal.SIGTERM
        except (_Interrupted, KeyboardInterrupt, click.Abort):
            failure, status = "interrupted; nothing was written", 128 + signal.SIGINT
        except BrokenPipeError:
            # The reader of our stdout went away (`ema-cli ... --json | head`): not an error.
            with contextlib.suppress(OSError):
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences the final flush
            status = 141
        except Exception as e:
            if debug:
                import traceback

                traceback.print_exc()
            failure = (
                f"internal error: {type(e).__name__}: {e}. This is a bug in ema-cli; "
                + ("" if debug else "rerun with EMA_CLI_DEBUG=1 for the traceback and ")
                + "please report it"
            )
            status = 1
        finally:
            # From here a signal ends the process at once, quietly: what it interrupted has
            # been unwound (temporaries removed), and only the last message is left to print.
            _restore_signals(previous_handlers)
        signalled = status in (128 + signal.SIGINT, 128 + signal.SIGTERM)
        if failure is not None:
            if signalled:
                click.echo(f"ema-cli: {failure}", err=True)
            else:
                _error(_printable(failure))
            if "--json" in argv:  # scripts reading stdout get an answer on failure too
                record = {"error": _printable(failure), "exit_status": status, "status": "error"}
                import json

                with contextlib.suppress(OSError):
                    click.echo(json.dumps(record, sort_keys=True))
        if _console_script and _is_main_thread():
            # The run's outcome is decided and reported, every file closed, renamed or removed:
            # end the process without the interpreter's teardown (freeing every module's
            # objects, about 30 ms here), and without waiting for worker threads, one of which
            # may be stuck in a read or a library call when a signal ended the run.
            with contextlib.suppress(OSError, ValueError):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(status)
        sys.exit(status)


#: Set by ``main`` (the console script and ``python -m ema_cli``): the process is ours to end.
_console_script = False


class _Terminated(BaseException):
    """SIGTERM arrived: unwind like Ctrl-C so temporary files are removed. A BaseException,
    so no ``except Exception`` on the way swallows it."""


class _Interrupted(BaseException):
    """SIGINT (Ctrl-C) arrived. Not a KeyboardInterrupt: click would print a blank line for
    one before its own handling."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def _raise_interrupted(signum: int, frame: object) -> None:
    raise _Interrupted


def _is_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _quit_quietly(signum: int, frame: object) -> None:
    """A signal outside the run (start-up, the last message): one line, no unwinding."""
    what = "terminated" if signum == signal.SIGTERM else "interrupted"
    with contextlib.suppress(OSError):
        os.write(2, f"ema-cli: {what}; nothing was written\n".encode())
    os._exit(128 + signum)


def _catch_signals() -> dict[int, Any] | None:
    """Turn SIGTERM (what cron wrappers and CI runners send) and SIGINT into exceptions the
    run unwinds from, removing its temporaries. Returns the previous handlers."""
    if not _is_main_thread():
        return None
    return {
        signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_terminated),
        signal.SIGINT: signal.signal(signal.SIGINT, _raise_interrupted),
    }


def _catch_sigterm() -> Any:
    """SIGTERM alone, as ``_catch_signals`` handles it (kept for callers of the old name)."""
    if not _is_main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


def _restore_signals(previous: dict[int, Any] | None) -> None:
    if previous is None:
        return
    for signum, handler in previous.items():
        # The console script's handlers quit quietly; a library caller gets its own back.
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def _printable(text: str) -> str:
    """One line, printable as UTF-8 whatever the names in it: bytes a file name smuggled in
    (``surrogateescape``) shown as ``\\xff``, lone surrogates from a JSON header as
    ``\\ud800``."""
    line = _one_line(text)
    try:
        data = line.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        data = line.encode("utf-8", "backslashreplace")
    return data.decode("utf-8", "backslashreplace")


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from ema_cli import kernels

    click.echo(f"ema-cli {__version__}\nhot loops: {kernels.describe()}")
    ctx.exit()


@click.group(
    cls=EmaCliGroup,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the version and what runs the hot loops, and exit.",
)
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
        text = str(value).strip()
        shown = repr(text) if len(text) <= 40 else f"'{text[:20]}...' ({len(text)} characters)"
        if len(text.lstrip("+-")) > 19:  # int() would refuse over 4300 digits; floats overflow
            self.fail(f"{shown} is too large (num_updates is a 64-bit count)", param, ctx)
        try:
            n = int(text)
        except ValueError:
            self.fail(f"{shown} is not a whole number, 'step' or 'index'", param, ctx)
        if n >= 2**63:
            self.fail(f"{shown} is too large (num_updates is a 64-bit count)", param, ctx)
        return n  # a negative count is refused with the other settings (plan.Settings)


#: Standard input lists paths: a longer line (Linux's PATH_MAX is 4096) or more lines than this
#: is something else (``- < /dev/zero``, a binary file) and is refused before memory runs out.
MAX_STDIN_LINE = 4096
MAX_STDIN_PATHS = 1_000_000


def _read_stdin_paths() -> list[str]:
    stream = getattr(sys.stdin, "buffer", None)
    paths: list[str] = []
    for number in range(1, MAX_STDIN_PATHS + 2):
        raw = stream.readline(MAX_STDIN_LINE + 1) if stream is not None else None
        line = raw.decode("utf-8", "surrogateescape") if raw is not None else sys.stdin.readline()
        if not line:
            return paths
        if len(line) > MAX_STDIN_LINE or "\0" in line:
            raise OptionError(
                f"standard input line {number} is "
                + (
                    "longer than any path"
                    if len(line) > MAX_STDIN_LINE
                    else "not a path (it holds NUL bytes)"
                )
                + ": '-' reads checkpoint paths, one per line"
            )
        if number > MAX_STDIN_PATHS:
            raise OptionError(f"standard input lists more than {MAX_STDIN_PATHS} paths")
        if line.strip():
            paths.append(line.strip())
    return paths


def _expand_stdin(arguments: Sequence[str]) -> list[str]:
    paths: list[str] = []
    if arguments.count("-") > 1:
        raise OptionError("'-' (read checkpoint paths from standard input) can be given once")
    for arg in arguments:
        if arg == "-":
            paths.extend(_read_stdin_paths())
        else:
            paths.append(arg)
    if not paths:
        raise OptionError("no checkpoints given (standard input was empty)")
    return paths


def _parse_size_option(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    from ema_cli.formats.sharded import parse_size

    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx, param) from None


def _warn(quiet: bool) -> Callable[[str], None]:
    def warn(message: str) -> None:
        if not quiet:
            click.echo(f"ema-cli: warning: {message}", err=True)

    return warn


def _print_json(record: Any) -> None:
    from ema_cli import report

    click.echo(report.to_json(record), nl=False)


def _listing(suffixes: Sequence[str]) -> str:
    return ", ".join(suffixes[:-1]) + f" or {suffixes[-1]}" if len(suffixes) > 1 else suffixes[0]


class _RegistryHelp(click.Command):
    """A command whose help names the formats registered when the help is shown."""

    def format_help_text(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        folders = "; ".join(f.help for f in registry.formats() if f.layout == "folder")
        self.help = _AVERAGE_HELP.format(readable=_listing(registry.readable()), folders=folders)
        super().format_help_text(ctx, formatter)


_AVERAGE_HELP = """Replay CHECKPOINT... (oldest first) through the EMA and write the averaged checkpoint.

    A CHECKPOINT is a {readable} file, a folder holding one, or {folders}.
    '-' reads more paths from standard input, one per line. Float tensors are averaged; all
    others (and excluded ones, and Keras optimizer state unless --average-optimizer) are copied
    from the last checkpoint, so the output loads wherever the inputs load.

    Averages: --decay (TF's EMA, the usual choice), --mean, --decay-per-step, --sigma-rel or
    --gamma (EDM2), --weights. Several in one run read every input once and write one output
    each, named by inserting the average's label before the suffix: -o ema.safetensors
    --decay 0.99 --mean writes ema.decay-0.99.safetensors and ema.mean.safetensors (each with
    its mapping). Labels: decay-D, decay-D-nu-N|step|index, decay-D-zero-debias, mean,
    decay-per-step-D[-nu-...], sigma-rel-S, gamma-G, weights-<file stem>. --dry-run shows
    each checkpoint's weight in every average and how many checkpoints hold 50%/90% of it.

    \b
    Examples:
      ema-cli average run/ckpt-*.safetensors -o ema.safetensors --decay 0.999
      ema-cli average run/ckpt-*.safetensors -o ema.safetensors --decay 0.9999 --num-updates step
      ls run/*.safetensors | ema-cli average - -o ema.safetensors --decay 0.99 --json
      ema-cli average run/checkpoint-* -o run-ema --decay 0.999 --max-shard-size 2GB
      ema-cli average run/checkpoint-* -o run-ema --decay 0.999 --folder-format torch
      ema-cli average run/ckpt-*.safetensors -o ema.safetensors --decay 0.999 --state .ema-state
      ema-cli average run/ckpt-*.pt -o avg.pt --mean --last 5
      ema-cli average run/ckpt-*.safetensors -o ema.safetensors --decay-per-step 0.9999 \\
          --sigma-rel 0.05 --sigma-rel 0.1 --dry-run

    Exit status: 0 done (or up to date), 2 bad input or options (one line on stderr, nothing
    written), 75 another run holds the lock (retry later), 1 a bug.
    """


@cli.command(
    context_settings={"max_content_width": 100},
    short_help="Average checkpoints with TensorFlow's EMA arithmetic.",
    cls=_RegistryHelp,
)
@click.argument("checkpoints", nargs=-1, required=True, metavar="CHECKPOINT...")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="The averaged checkpoint to write, in the format its suffix names (the formats above; 'ema-cli formats' lists which are written), or a name without a suffix for a Hugging Face model folder (shards, index, and the last checkpoint's config and tokenizer files; safetensors weights unless --folder-format torch). Written to a temporary name and renamed into place when complete.",
)
@click.option(
    "--decay",
    type=float,
    multiple=True,
    metavar="D",
    help="TF's ExponentialMovingAverage: one apply per checkpoint with decay D, 0 <= D <= 1 (typically 0.99-0.9999), used as a float32 as TF does. Repeat it (or add other averages below) to compute several averages in one pass.",
)
@click.option(
    "--mean",
    is_flag=True,
    help="The plain average of the selected checkpoints (with --last N: of the last N, as fairseq's and timm's averagers do), summed in float64 and rounded once.",
)
@click.option(
    "--decay-per-step",
    type=float,
    multiple=True,
    metavar="D",
    help="The EMA a training loop would have held applying decay D at every step, from checkpoints saved every so often (each checkpoint stands for the steps since the one before; needs step numbers). Computed in float64, rounded once. Repeatable.",
)
@click.option(
    "--sigma-rel",
    type=float,
    multiple=True,
    metavar="S",
    help="EDM2's power-function EMA (Karras et al. 2024) of relative width S, 0 < S < 0.289 (typically 0.05-0.2): weight on training time t grows as t^gamma. Needs step numbers. Repeatable.",
)
@click.option(
    "--gamma",
    type=float,
    multiple=True,
    metavar="G",
    help="The same power-function EMA given by its exponent G >= 0 (0 is the plain mean over training time). Repeatable.",
)
@click.option(
    "--weights",
    type=click.Path(dir_okay=False),
    multiple=True,
    metavar="FILE",
    help="Any other linear combination: a JSON list of one weight per checkpoint (in replay order) or an object {checkpoint: weight} (path as given, or file name). They must sum to 1 unless --normalize. Repeatable.",
)
@click.option(
    "--normalize",
    is_flag=True,
    help="With --weights: divide the weights by their sum instead of refusing weights that do not sum to 1.",
)
@click.option(
    "--num-updates",
    type=NumUpdatesType(),
    metavar="N|step|index",
    default=None,
    help="TF's num_updates, for --decay and --decay-per-step: a fixed count N, each checkpoint's 'step' number, or (--decay only) its 0-based 'index' in the replay. The decay used is min(decay, (1+n)/(10+n)).  [default: off]",
)
@click.option(
    "--zero-debias",
    is_flag=True,
    help="--decay's shadows start at zero and are debiased (TF's zero_debias=True for tensors). Default: shadows start at the first checkpoint.",
)
@click.option(
    "--name",
    "ema_name",
    default=DEFAULT_EMA_NAME,
    show_default=True,
    help="The EMA name: shadow names are '<tensor>/<name>'.",
)
@click.option(
    "--names",
    type=click.Choice(["original", "shadow", "both"]),
    default="original",
    show_default=True,
    help="Names of the averaged tensors in the output: 'original' makes a drop-in checkpoint; 'shadow' stores them under TF's shadow names (what Saver(ema.variables_to_restore()) restores); 'both' keeps the last checkpoint's raw tensors under their names and adds the averages under shadow names, as a TF1 training checkpoint with an EMA holds, so training resumes with its average.",
)
@click.option(
    "--mapping",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write the name mapping and provenance (JSON).  [default: OUTPUT with its suffix replaced by .mapping.json]",
)
@click.option(
    "--order",
    type=click.Choice(["step", "given"]),
    default="step",
    show_default=True,
    help="'step' sorts checkpoints by the step number in their names, the last run of digits (ckpt-2 before ckpt-10); 'given' keeps the command-line order.",
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
    help="--decay's arithmetic: 'auto' averages float16/bfloat16 in float32 and rounds once when writing; 'native' is TF's arithmetic in each tensor's own dtype. (The other averages are always float64, rounded once.)",
)
@click.option(
    "--strict",
    is_flag=True,
    help="Refuse tensors TF's EMA cannot average (integers, bools, float8) instead of copying them from the last checkpoint.",
)
@click.option(
    "--average-optimizer",
    is_flag=True,
    help="Also average Keras optimizer state (optimizer/ in .weights.h5 and .keras, "
    "optimizer_weights/ in legacy .h5). By default it is copied from the last checkpoint: it is "
    "not model weights, and averaged Adam moments would corrupt a resumed run.",
)
@click.option(
    "--last",
    type=int,
    default=None,
    metavar="N",
    help="Replay only the last N checkpoints (after ordering and --min-step/--max-step).",
)
@click.option(
    "--min-step",
    type=int,
    default=None,
    metavar="STEP",
    help="Skip checkpoints whose step is below STEP.",
)
@click.option(
    "--max-step",
    type=int,
    default=None,
    metavar="STEP",
    help="Skip checkpoints whose step is above STEP.",
)
@click.option(
    "--every",
    type=int,
    default=None,
    metavar="K",
    help="Also write the average as it stood after every K-th checkpoint of the replay, in the same pass: -o ema.safetensors after ckpt-200.safetensors is ema.ckpt-200.safetensors.",
)
@click.option(
    "--max-shard-size",
    callback=_parse_size_option,
    metavar="SIZE",
    help="Folder outputs: the most tensor data per shard file, e.g. 5GB, 500MB, 2GiB (GB = 10^9 bytes as Hugging Face counts, GiB = 2^30). A bigger tensor gets a shard of its own; a model that fits in one shard is written as one file (model.safetensors, pytorch_model.bin) without an index.  [default: 5GB]",
)
@click.option(
    "--folder-format",
    type=click.Choice(list(registry.folder_output_formats())),
    default=None,
    help="Folder outputs: the weights' format. 'safetensors': model.safetensors, or shards model-00001-of-0000N.safetensors with model.safetensors.index.json, as save_pretrained writes. 'torch': pytorch_model.bin, or shards pytorch_model-00001-of-0000N.bin with pytorch_model.bin.index.json, as save_pretrained(safe_serialization=False) wrote (transformers 4), tied weights still sharing storage. A file output's format is its suffix's.  [default: safetensors]",
)
@click.option(
    "--state",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    metavar="DIR",
    help="Keep the EMA state in DIR and, on later runs, fold in only checkpoints newer than the last one folded in (for cron jobs). The output is byte-identical to a full replay.",
)
@click.option(
    "--restart",
    is_flag=True,
    help="With --state: ignore the saved state and replay every checkpoint.",
)
@click.option(
    "--settle",
    type=float,
    default=DEFAULT_SETTLE_SECONDS,
    show_default=True,
    metavar="SECONDS",
    help="With --state: leave the newest checkpoint for the next run if it was modified less than SECONDS ago (it may still be being written); 0 turns the check off. A newest checkpoint shorter than its header says is always left for later.",
)
@click.option(
    "--workers",
    type=int,
    default=None,
    metavar="N",
    help="Threads that read and average blocks side by side (each holds a few MB of blocks). Outputs are the same bytes for any N.  [default: the CPUs this process may use]",
)
@click.option(
    "--fsync/--no-fsync",
    default=None,
    help="Flush outputs (and state) to disk before renaming them into place, so they survive a power loss, not just a killed run. Costs a full write to disk before the run ends.  [default: on with --state, off otherwise]",
)
@click.option(
    "--hash",
    "hash_",
    is_flag=True,
    help="Record the sha256 of every input and output in the mapping file and --json summary (reads every input once more).",
)
@click.option(
    "--drop-non-tensors",
    is_flag=True,
    help="Convert even when the last checkpoint holds data that the output format cannot (a TensorFlow object graph, HDF5 strings, .keras assets): it is left out, with a warning naming it. Without this such a conversion is refused.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Check everything and print the plan (order, steps, decay and weight of each checkpoint, tensors averaged and copied) without writing anything.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print a machine-readable summary on stdout: the mapping file's content plus 'status' and 'mapping_file'.",
)
@click.option(
    "-q",
    "--quiet",
    is_flag=True,
    help="No progress bar, summary or warnings on stderr (errors are still shown).",
)
def average(checkpoints: tuple[str, ...], as_json: bool, quiet: bool, **options: Any) -> None:
    """``ema-cli average`` (help: ``_AVERAGE_HELP``): the request, the run, its report."""
    from ema_cli import job, report
    from ema_cli.request import Request

    request = Request.from_options(_expand_stdin(checkpoints), options)
    show_progress = not quiet and sys.stderr.isatty()
    result = job.run(
        request,
        progress=lambda total: report.progress_bar(show_progress, total),
        warn=_warn(quiet),
    )
    if as_json:
        _print_json(result.as_json())
    elif result.status == "dry run":
        report.print_plan(result.records, result.folded)
    if not quiet and result.status != "dry run":
        for line in result.lines():
            click.echo(line, err=True)


@cli.command(
    context_settings={"max_content_width": 100},
    short_help="Show checkpoints' tensors, dtypes, shapes and sizes.",
)
@click.argument("checkpoints", nargs=-1, required=True, metavar="CHECKPOINT...")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print a JSON list (one object per checkpoint) instead of tables.",
)
def inspect(checkpoints: tuple[str, ...], as_json: bool) -> None:
    """Show what CHECKPOINT... hold: format, step, tensor count and bytes, and each tensor's
    name, dtype and shape. Reads headers only, so it is instant on any size.

    \b
    Examples:
      ema-cli inspect run/ckpt-1000.safetensors
      ema-cli inspect run/checkpoint-500/ --json | jq '.[0].tensor_count'
    """
    from ema_cli import report
    from ema_cli.formats import find_checkpoint, open_checkpoint
    from ema_cli.plan import step_from_name

    records = []
    for given in _expand_stdin(checkpoints):
        file = find_checkpoint(Path(given))
        with open_checkpoint(file) as reader:
            records.append(report.describe_checkpoint(given, reader, step_from_name(given)))
    if as_json:
        _print_json(records)
    else:
        report.print_inspection(records)


@cli.command(
    "formats",
    context_settings={"max_content_width": 100},
    short_help="List the checkpoint formats ema-cli reads and writes.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def formats_command(as_json: bool) -> None:
    """List the checkpoint formats: their suffixes, whether ema-cli reads and writes them, and
    what they hold. A name without a suffix is a model folder."""
    rows: list[dict[str, Any]] = [
        {
            "name": f.name,
            "suffixes": list(f.suffixes),
            "layout": f.layout,
            "reads": True,
            "writes": f.writer is not None,
            "description": f.help,
        }
        for f in registry.formats()
    ]
    if as_json:
        import json

        click.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    for row in rows:
        names = ", ".join(row["suffixes"]) or "(a folder)"
        mode = "read, write" if row["writes"] else "read only"
        click.echo(f"{row['name']}: {names} [{mode}]\n    {row['description']}")


def main() -> NoReturn:
    """Console-script entry point. Signals quit quietly (``_quit_quietly``) until the run
    installs its own handlers, and again once it has unwound."""
    global _console_script
    _console_script = True
    if _is_main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _quit_quietly)
    cli.main(prog_name="ema-cli")
