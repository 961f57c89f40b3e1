"""ema-cli's benchmark harness: the cat floor, the naive numpy peer, ema-cli (and TF) in one go.

    python benchmarks/run.py                      # 10 x ~96M-parameter float32 checkpoints
    python benchmarks/run.py --dtype bfloat16
    python benchmarks/run.py --sharded            # HF-style sharded checkpoint folders
    python benchmarks/run.py --tf                 # add the TensorFlow column
    python benchmarks/run.py --check-flat         # ema-cli's peak RSS at 1x/2x model and count
    python benchmarks/run.py --input-format safetensors,tensorflow,torch   # per byte, side by side

Synthetic checkpoints (a small transformer's mix of shapes, seeded, cached under
benchmarks/data/) are built once, the page cache is warmed, then every tool runs ``--repeats``
times as its own subprocess, interleaved, and the medians of wall time and peak RSS (rusage
ru_maxrss from ``os.wait4``) are printed as a markdown table. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import ml_dtypes
import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_DATA = HERE / "data"
DEFAULT_TF_PYTHON = "/tmp/tfvenv/bin/python"

#: The synthetic model: a GPT/BERT-like stack of width D_MODEL. Layers and vocabulary are sized
#: so about three quarters of the parameters are in the layers and the rest in the embedding.
D_MODEL = 768
FFN = 4 * D_MODEL
MAX_POSITIONS = 1024
SEED = 20240611
#: Consecutive checkpoints read the value pool shifted by this many elements, so every
#: checkpoint holds different (but realistic, normal(0, 0.02)) values.
SHIFT = 4099
FORMAT_VERSION = 1

ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
NP_DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}


# ---------------------------------------------------------------------------------------------
# The synthetic model and its checkpoints


def parse_count(text: str) -> int:
    """``96M`` -> 96_000_000, ``1.5G`` -> 1_500_000_000, ``250000`` -> 250000."""
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9}.get(text[-1:], 1)
    number = text[:-1] if scale != 1 else text
    return int(float(number) * scale)


def layer_shapes(i: int) -> list[tuple[str, tuple[int, ...]]]:
    p = f"model.layers.{i}"
    d, f = D_MODEL, FFN
    return [
        (f"{p}.attn.qkv.weight", (3 * d, d)),
        (f"{p}.attn.qkv.bias", (3 * d,)),
        (f"{p}.attn.out.weight", (d, d)),
        (f"{p}.attn.out.bias", (d,)),
        (f"{p}.ln_1.weight", (d,)),
        (f"{p}.ln_1.bias", (d,)),
        (f"{p}.mlp.up.weight", (f, d)),
        (f"{p}.mlp.up.bias", (f,)),
        (f"{p}.mlp.down.weight", (d, f)),
        (f"{p}.mlp.down.bias", (d,)),
        (f"{p}.ln_2.weight", (d,)),
        (f"{p}.ln_2.bias", (d,)),
    ]


def model_spec(params: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, kind, shape) of every tensor, kind ``float`` or ``int64``, for about ``params``."""
    per_layer = sum(math.prod(s) for _, s in layer_shapes(0))
    layers = max(1, round(0.74 * params / per_layer))
    rest = params - layers * per_layer - MAX_POSITIONS * D_MODEL - 2 * D_MODEL
    vocab = max(1024, round(rest / D_MODEL / 64) * 64)
    spec: list[tuple[str, str, tuple[int, ...]]] = [
        ("model.embed_tokens.weight", "float", (vocab, D_MODEL)),
        ("model.embed_positions.weight", "float", (MAX_POSITIONS, D_MODEL)),
        ("model.position_ids", "int64", (1, MAX_POSITIONS)),  # a buffer: copied, not averaged
    ]
    for i in range(layers):
        spec += [(name, "float", shape) for name, shape in layer_shapes(i)]
    spec += [("model.norm.weight", "float", (D_MODEL,)), ("model.norm.bias", "float", (D_MODEL,))]
    return spec


def spec_params(spec: Sequence[tuple[str, str, tuple[int, ...]]]) -> int:
    return sum(math.prod(shape) for _, kind, shape in spec if kind == "float")


def write_safetensors(
    path: Path, entries: list[tuple[str, str, tuple[int, ...], np.ndarray]], align: int = 8
) -> None:
    """Write a safetensors file from (name, dtype name, shape, flat data) in the given order.

    The header is space-padded so the data starts at a multiple of ``align`` bytes (8 is what
    the reference writer does; 4096 puts the data on a page boundary).
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape, data in entries:
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + data.nbytes],
        }
        offset += data.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % align)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for *_, data in entries:
            f.write(np.ascontiguousarray(data).view(np.uint8).data)
    tmp.replace(path)


def cached_count(folder: Path, stamp: object) -> int:
    """How many checkpoints ``folder``'s cache holds for ``stamp`` (its ``spec.json``; 0 when
    there is none or it was made from something else)."""
    try:
        meta = json.loads((folder / "spec.json").read_text())
    except (OSError, ValueError):
        return 0
    return int(meta["count"]) if meta.get("stamp") == stamp else 0


@dataclass
class Dataset:
    """One cached set of synthetic checkpoints (a prefix of it is used for smaller counts)."""

    root: Path
    params_target: int
    dtype: str
    sharded: bool
    shards: int
    align: int = 8
    spec: list[tuple[str, str, tuple[int, ...]]] = field(init=False)

    def __post_init__(self) -> None:
        self.spec = model_spec(self.params_target)

    @property
    def name(self) -> str:
        label = f"{self.params_target / 1e6:g}M"
        name = f"{self.dtype}-{label}" + (f"-sharded{self.shards}" if self.sharded else "")
        return name + (f"-align{self.align}" if self.align != 8 else "")

    @property
    def folder(self) -> Path:
        return self.root / self.name

    @property
    def params(self) -> int:
        return spec_params(self.spec)

    def stamp(self) -> dict[str, object]:
        return {
            "format_version": FORMAT_VERSION,
            "seed": SEED,
            "dtype": self.dtype,
            "sharded": self.sharded,
            "shards": self.shards,
            **({"align": self.align} if self.align != 8 else {}),
            "spec": [[n, k, list(s)] for n, k, s in self.spec],
        }

    def checkpoint(self, k: int) -> Path:
        step = 1000 * (k + 1)
        if self.sharded:
            return self.folder / f"checkpoint-{step}"
        return self.folder / f"ckpt-{step}.safetensors"

    def files(self, count: int) -> list[Path]:
        """Every file the first ``count`` checkpoints consist of (what cat reads)."""
        out: list[Path] = []
        for k in range(count):
            path = self.checkpoint(k)
            out += sorted(path.glob("*.safetensors")) if self.sharded else [path]
        return out

    def cached_count(self) -> int:
        return cached_count(self.folder, self.stamp())

    def ensure(self, count: int) -> None:
        have = self.cached_count()
        if have >= count:
            return
        if have == 0 and self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        floats = [(n, s) for n, kind, s in self.spec if kind == "float"]
        total = sum(math.prod(s) for _, s in floats)
        rng = np.random.default_rng(SEED)
        pool = rng.standard_normal(total + SHIFT * count, dtype=np.float32)
        pool *= np.float32(0.02)
        pool = pool.astype(NP_DTYPES[self.dtype], copy=False)
        positions = np.arange(MAX_POSITIONS, dtype=np.int64)
        for k in range(have, count):
            entries: list[tuple[str, str, tuple[int, ...], np.ndarray]] = []
            offset = SHIFT * k
            for name, kind, shape in self.spec:
                if kind == "int64":
                    entries.append((name, "I64", shape, positions))
                    continue
                size = math.prod(shape)
                entries.append((name, ST_DTYPES[self.dtype], shape, pool[offset : offset + size]))
                offset += size
            self._write_checkpoint(k, entries)
            print(f"  generated {self.checkpoint(k).relative_to(self.root)}", file=sys.stderr)
        (self.folder / "spec.json").write_text(
            json.dumps({"count": count, "params": self.params, "stamp": self.stamp()}) + "\n"
        )
        os.sync()  # flush the new files now, not while a tool is being timed
        print(
            f"  generated {count - have} checkpoints in {time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
        )

    def _write_checkpoint(
        self, k: int, entries: list[tuple[str, str, tuple[int, ...], np.ndarray]]
    ) -> None:
        path = self.checkpoint(k)
        if not self.sharded:
            write_safetensors(path, entries, self.align)
            return
        # Hugging Face's convention: greedy shards of about total/N bytes, in model order.
        if path.exists():
            shutil.rmtree(path)
        tmp = path.with_name(path.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        # Cut at every total/N bytes, in model order: at most N shards.
        total = sum(e[3].nbytes for e in entries)
        by_shard: dict[int, list[tuple[str, str, tuple[int, ...], np.ndarray]]] = {}
        position = 0
        for entry in entries:
            by_shard.setdefault(position * self.shards // total, []).append(entry)
            position += entry[3].nbytes
        groups = [by_shard[k] for k in sorted(by_shard)]
        weight_map: dict[str, str] = {}
        for i, group in enumerate(groups):
            shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            write_safetensors(tmp / shard, group, self.align)
            weight_map.update({e[0]: shard for e in group})
        index = {
            "metadata": {"total_size": sum(e[3].nbytes for e in entries)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        tmp.rename(path)


#: ``--input-format`` choices: the suffix ema-cli reads them by and the label of their rows.
INPUT_FORMATS = {
    "safetensors": (".safetensors", "safetensors"),
    "tensorflow": (".index", "TensorBundle"),
    "torch": (".pt", "torch .pt"),
    "hdf5": (".h5", "HDF5 .h5"),
    "keras": (".weights.h5", "Keras .weights.h5"),
}


@dataclass
class Converted:
    """A dataset's checkpoints in another input format, holding the same tensors: made by
    ema-cli itself (a one-checkpoint replay writes that checkpoint's values, bit for bit, in the
    output's format) and cached beside the dataset as ``<dataset>-<format>/``."""

    data: Dataset
    fmt: str

    @property
    def folder(self) -> Path:
        return self.data.root / f"{self.data.name}-{self.fmt}"

    def checkpoint(self, k: int) -> Path:
        return self.folder / f"{self.data.checkpoint(k).stem}{INPUT_FORMATS[self.fmt][0]}"

    def files(self, count: int) -> list[Path]:
        out: list[Path] = []
        for k in range(count):
            path = self.checkpoint(k)
            if self.fmt == "tensorflow":
                out += [path, path.with_name(path.stem + ".data-00000-of-00001")]
            else:
                out.append(path)
        return out

    def ensure(self, count: int) -> None:
        if self.data.sharded:
            raise SystemExit("--input-format other than safetensors needs unsharded checkpoints")
        self.data.ensure(count)
        stamp = {"source": self.data.stamp(), "format": self.fmt}
        meta_path = self.folder / "spec.json"
        have = cached_count(self.folder, stamp)
        if have >= count:
            return
        if have == 0 and self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as scratch:
            for k in range(have, count):
                command = [
                    *ema_cli_command(),
                    "average",
                    str(self.data.checkpoint(k)),
                    "-o",
                    str(self.checkpoint(k)),
                    "--decay",
                    "0.5",
                    "--mapping",
                    str(Path(scratch) / "mapping.json"),
                    "-q",
                ]
                subprocess.run(command, check=True)
                print(
                    f"  converted {self.checkpoint(k).relative_to(self.data.root)}", file=sys.stderr
                )
        meta_path.write_text(json.dumps({"count": count, "stamp": stamp}) + "\n")
        os.sync()
        print(
            f"  converted {count - have} checkpoints in {time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
        )


# ---------------------------------------------------------------------------------------------
# Running and measuring


@dataclass
class Measure:
    wall: float
    maxrss_kb: int
    cpu: float  # user + system seconds


@dataclass
class Tool:
    name: str
    argv: list[str] | None  # None: skipped
    output: Path | None = None
    note: str = ""
    env: dict[str, str] = field(default_factory=dict)  # added to the environment
    runs: list[Measure] = field(default_factory=list)
    fmt: str = "safetensors"  # the input format it reads (--input-format)
    input_bytes: int = 0  # what it reads (0: the table's default)

    def min_wall(self) -> float:
        return min(m.wall for m in self.runs)

    def median_wall(self) -> float:
        return statistics.median(m.wall for m in self.runs)

    def median_cpu(self) -> float:
        return statistics.median(m.cpu for m in self.runs)

    def median_rss_mb(self) -> float:
        return statistics.median(m.maxrss_kb for m in self.runs) / 1024


#: Spawns the tool and reports its wall time and peak RSS. A tiny launcher rather than the harness
#: itself, because a child's ru_maxrss starts at its parent's RSS at fork time (Linux keeps the
#: pre-exec high-water mark), and the harness holds numpy: this way the floor is the launcher's
#: ~10 MB, not the harness's ~80 MB.
LAUNCHER = """
import os, sys, time
argv = sys.argv[1:]
devnull = [(os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0)]
t0 = time.perf_counter()
pid = os.posix_spawnp(argv[0], argv, os.environ, file_actions=devnull)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - t0
cpu = usage.ru_utime + usage.ru_stime
print(wall, usage.ru_maxrss, os.waitstatus_to_exitcode(status), cpu)
"""


def run_measured(
    argv: Sequence[str], env: dict[str, str] | None = None
) -> tuple[Measure, int, str]:
    """Run ``argv`` (stdout to /dev/null), returning wall time, peak RSS, status and stderr."""
    with tempfile.TemporaryFile() as err:
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", LAUNCHER, *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
            check=True,
            text=True,
        )
        wall, maxrss_kb, status, cpu = done.stdout.split()
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    return Measure(float(wall), int(maxrss_kb), float(cpu)), int(status), stderr


def compile_bytecode() -> str:
    """Compile ema-cli's modules to bytecode, as ``pip install`` does for a user's install.

    An editable (development) install under ``PYTHONDONTWRITEBYTECODE=1`` (set on this machine
    kind) never caches bytecode, so every run would compile its ~40 modules from source again:
    about 70 ms of CPU per run here, which no installed copy pays. Returns what was done."""
    import importlib.util

    spec = importlib.util.find_spec("ema_cli")
    if spec is None or not spec.submodule_search_locations:
        return "ema_cli not importable here: bytecode not compiled"
    folder = next(iter(spec.submodule_search_locations))
    subprocess.run([sys.executable, "-m", "compileall", "-q", folder], check=True)
    return f"compiled ema_cli's bytecode in {folder} (as an install does)"


#: ``--sweep``'s averages after its first (which is the "ema-cli" row's), as single runs: output
#: label (ema-cli's naming rule) -> options.
SWEEP_SINGLES = {
    "decay-0.9999": ["--decay", "0.9999"],
    "mean": ["--mean"],
    "sigma-rel-0.1": ["--sigma-rel", "0.1"],
}


def single_row(options: Sequence[str]) -> str:
    """The table row of one of ``SWEEP_SINGLES``' single runs."""
    return "ema-cli " + " ".join(options)


def sweep_summary(tools: Sequence[Tool]) -> str:
    """The sweep's median wall against one run's and against the four single runs it replaces
    (their medians added up), or nothing without ``--sweep``."""
    by_name = {t.name: t for t in tools}
    sweep = next((t for t in tools if t.name.startswith("ema-cli sweep")), None)
    names = ["ema-cli"] + [single_row(o) for o in SWEEP_SINGLES.values()]
    singles = [by_name[n] for n in names if n in by_name and by_name[n].runs]
    if sweep is None or not sweep.runs or len(singles) != len(names):
        return ""
    one = singles[0].median_wall()
    total = sum(t.median_wall() for t in singles)
    wall = sweep.median_wall()
    return (
        f"\nsweep of 4: {wall:.2f} s = {wall / one:.2f}x one run ({one:.2f} s), "
        f"{wall / total:.2f}x the four single runs it replaces ({total:.2f} s in all)\n"
    )


def ema_cli_command() -> list[str]:
    script = Path(sys.executable).parent / "ema-cli"
    if script.exists():
        return [str(script)]
    found = shutil.which("ema-cli")
    return [found] if found else [sys.executable, "-m", "ema_cli"]


def warm(files: Sequence[Path]) -> None:
    """Put every input in the page cache the same way, so all tools (and the floor) see a warm
    cache of one kind: out of it first (``evict``), then read once by ``cat``, so that all of
    it comes from read-ahead. How a file was written shapes its cached pages (its folios)
    until they are dropped, and that alone made the same replay of files written by ema-cli's
    torch and TensorBundle writers spend 0.1-0.25 s more kernel time than of files written by
    this harness (0.21-0.22 s against 0.29-0.42 s of system time for reading them all)."""
    evict(files)
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)


def clean_outputs(tool: Tool) -> None:
    if tool.output is None:
        return
    stem = tool.output.name.removesuffix(".safetensors")
    paths = [tool.output, tool.output.with_name(stem + ".mapping.json")]
    if tool.name.startswith("ema-cli sweep"):  # one output and mapping per average
        paths += sorted(tool.output.parent.glob(f"{stem}.*"))
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def evict(files: Sequence[Path]) -> None:
    """Take ``files`` out of the page cache (flushed first, then ``POSIX_FADV_DONTNEED``), so
    the next run reads them from the disk while the tools' own code stays cached: dropping the
    whole cache would time Python and numpy loading from disk too. Needs no root."""
    os.sync()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_tools(
    tools: list[Tool],
    repeats: int,
    env: dict[str, str],
    cold: Sequence[Path] = (),
    warmup: int = 0,
) -> None:
    """Run every tool ``repeats`` times, interleaved, recording each successful run, after
    ``warmup`` rounds that are not recorded; the ``cold`` files are taken out of the page cache
    before each run (``evict``).

    The warm-up rounds: on the AMD EPYC VMs, right after the page cache was warmed (19 GB
    dropped and read back for five input formats) every tool's first run took 2-3x its later
    ones, and the second often 1.5x, in every row alike, cat's excepted (2026-12-03).

    Each round runs the tools in its own shuffled order (seeded by the round's number: the same
    orders every time), so that no row always runs after the same neighbour: on the VMs this
    was measured on, a run right after one that freed a lot of memory (the sweep's four
    outputs) was up to 1.6x slower, which a fixed order charged to the same row every round."""
    for r in range(-warmup, repeats):
        order = list(tools)
        random.Random(r).shuffle(order)
        for tool in order:
            if tool.argv is None:
                continue
            clean_outputs(tool)
            os.sync()  # the previous run's output is flushed before this one is timed
            if cold:
                evict(cold)
            measure, status, stderr = run_measured(tool.argv, {**env, **tool.env})
            if r < 0 and status == 0:
                print(f"  warm-up {tool.name}: {measure.wall:.2f} s (not counted)", file=sys.stderr)
                continue
            if status != 0:
                line = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit {status}"
                if tool.name.startswith("ema-cli") and status == 2 and not tool.runs:
                    tool.note = f"skipped: ema-cli rejected the input ({line})"
                else:
                    tool.note = f"FAILED (exit {status}): {line}"
                    print(stderr, file=sys.stderr)
                tool.argv = None
                continue
            tool.runs.append(measure)
            print(
                f"  run {r + 1}/{repeats} {tool.name}: {measure.wall:.2f} s, "
                f"{measure.maxrss_kb / 1024:.0f} MB, {measure.cpu:.2f} s CPU",
                file=sys.stderr,
            )


def table(tools: Sequence[Tool], input_bytes: int) -> str:
    """The markdown table. With several input formats each row is measured against the cat
    floor of its own files, and the last column compares its time per input byte with the
    same kind of row (cat, ema-cli) reading safetensors."""
    formats = {t.fmt for t in tools}
    floors: dict[str, Tool] = {}  # per format, the fastest cat (one, or four in parallel)
    for t in tools:
        if not (t.name.startswith("cat floor") and t.runs):
            continue
        if t.fmt not in floors or t.median_wall() < floors[t.fmt].median_wall():
            floors[t.fmt] = t
    head = "| tool | wall s | peak RSS MB | x cat floor | GB/s | CPU s | min wall s |"
    rule = "|---|---:|---:|---:|---:|---:|---:|"
    if len(formats) > 1:
        head += " per byte x safetensors |"  # half types: x the float32 safetensors row
        rule += "---:|"
    lines = [head, rule]

    def per_byte(tool: Tool) -> float:
        return tool.median_wall() / (tool.input_bytes or input_bytes)

    def kind(tool: Tool) -> str:
        return tool.name.split(",")[0]

    for tool in tools:
        if not tool.runs:
            lines.append(f"| {tool.name} | {tool.note or 'not run'} | | | | | |")
            continue
        wall = tool.median_wall()
        floor = floors.get(tool.fmt)
        ratio = f"{wall / floor.median_wall():.2f}" if floor else "-"
        row = (
            f"| {tool.name} | {wall:.2f} | {tool.median_rss_mb():.0f} | {ratio} | "
            f"{(tool.input_bytes or input_bytes) / wall / 1e9:.2f} | {tool.median_cpu():.2f} | "
            f"{tool.min_wall():.2f} |"
        )
        if len(formats) > 1:
            base = next(
                (t for t in tools if t.fmt == "safetensors" and kind(t) == kind(tool) and t.runs),
                None,
            )
            row += f" {per_byte(tool) / per_byte(base):.2f} |" if base else " |"
        lines.append(row)
    return "\n".join(lines)


def compare(a: Path, b: Path) -> str:
    """Bitwise comparison of two safetensors files, tensor by tensor (layouts may differ)."""

    def load(path: Path) -> dict[str, np.ndarray]:
        if path.is_dir():  # a sharded folder: every shard's tensors
            tensors: dict[str, np.ndarray] = {}
            for shard in sorted(path.glob("*.safetensors")):
                tensors.update(load(shard))
            return tensors
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        n = int.from_bytes(raw[:8].tobytes(), "little")
        header = json.loads(raw[8 : 8 + n].tobytes())
        header.pop("__metadata__", None)
        return {
            k: raw[8 + n + v["data_offsets"][0] : 8 + n + v["data_offsets"][1]]
            for k, v in header.items()
        }

    ta, tb = load(a), load(b)
    if ta.keys() != tb.keys():
        return f"different tensors ({len(ta)} vs {len(tb)})"
    differ = [k for k in ta if not np.array_equal(ta[k], tb[k])]
    return "bitwise identical" if not differ else f"{len(differ)} of {len(ta)} tensors differ"


def make_tools(
    args: argparse.Namespace,
    inputs: list[Path],
    files: list[Path],
    out_dir: Path,
    with_peers: bool,
    shard_bytes: int,
) -> list[Tool]:
    decay = str(args.decay)
    ins = list(map(str, inputs))
    # Sharded inputs get a sharded output folder (a name without a suffix) cut like the inputs.
    ema_out = out_dir / (args.output_name or ("ema" if args.sharded else "ema.safetensors"))
    ema_options = ["--decay", decay, "-q"]
    if args.sharded and ema_out.suffix != ".safetensors":
        ema_options += ["--max-shard-size", f"{math.ceil(shard_bytes / 1e6)}MB"]
    tools = [Tool("cat floor", ["cat", *map(str, files)])]
    if args.cold:  # a disk may read faster with several requests in flight
        parallel = 'printf "%s\\n" "$@" | xargs -d "\\n" -P4 -n1 cat'
        tools.append(Tool("cat floor, 4 parallel", ["sh", "-c", parallel, "sh", *map(str, files)]))
    if with_peers and not args.no_peer:
        peer_out = out_dir / "naive.safetensors"
        argv = [
            sys.executable,
            str(HERE / "naive_peer.py"),
            "-o",
            str(peer_out),
            "--decay",
            decay,
            *ins,
        ]
        tools.append(Tool("naive numpy peer", argv, peer_out))
    tools.append(
        Tool(
            "ema-cli",
            [*ema_cli_command(), "average", *ins, "-o", str(ema_out), *ema_options],
            ema_out,
        )
    )
    if with_peers and args.tf:
        tf_out = out_dir / "tf.safetensors"
        if Path(args.tf_python).exists():
            argv = [
                args.tf_python,
                str(HERE / "tf_replay.py"),
                "-o",
                str(tf_out),
                "--decay",
                decay,
                *ins,
            ]
            tools.append(Tool("TensorFlow replay", argv, tf_out))
        else:
            tools.append(Tool("TensorFlow replay", None, note=f"skipped: no {args.tf_python}"))
    for workers in args.workers:
        out = out_dir / f"ema-w{workers}{ema_out.suffix}"
        argv = [*ema_cli_command(), "average", *ins, "-o", str(out), *ema_options]
        tools.append(Tool(f"ema-cli --workers {workers}", [*argv, "--workers", str(workers)], out))
    if args.sweep and not args.sharded:
        # Four averages in one pass, the first the single run's: each output must equal the
        # single run of its average, and the first is compared with the row above.
        sweep_out = out_dir / "sweep.safetensors"
        profiles = ["--decay", decay, "--decay", "0.9999", "--mean", "--sigma-rel", "0.1"]
        argv = [*ema_cli_command(), "average", *ins, "-o", str(sweep_out), *profiles, "-q"]
        tools.append(Tool("ema-cli sweep of 4 (2 decays, mean, sigma-rel)", argv, sweep_out))
        # The sweep's other three averages as single runs (the first is the row "ema-cli"):
        # what the sweep replaces, and the outputs each of its own must equal.
        for label, options in SWEEP_SINGLES.items():
            out = out_dir / f"single.{label}.safetensors"
            argv = [*ema_cli_command(), "average", *ins, "-o", str(out), *options, "-q"]
            tools.append(Tool(single_row(options), argv, out))
    for i, (name, variant_env) in enumerate(args.variant):
        out = out_dir / f"variant{i}{ema_out.suffix}"
        argv = [sys.executable, str(HERE / "variants.py"), "average", *ins, "-o", str(out)]
        tools.append(Tool(f"ema-cli {name}", [*argv, *ema_options], out, env=variant_env))
    return tools


def format_tools(
    args: argparse.Namespace, converted: Converted, count: int, out_dir: Path
) -> list[Tool]:
    """The cat floor and ema-cli (and any --variant) over the same checkpoints in another
    input format, writing the same safetensors output, so only the reading differs."""
    label = INPUT_FORMATS[converted.fmt][1]
    files = converted.files(count)
    size = sum(f.stat().st_size for f in files)
    ins = [str(converted.checkpoint(k)) for k in range(count)]
    ema_options = ["--decay", str(args.decay), "-q"]
    out = out_dir / f"ema-{converted.fmt}.safetensors"
    tools = [
        Tool(f"cat floor, {label}", ["cat", *map(str, files)], fmt=converted.fmt, input_bytes=size),
        Tool(
            f"ema-cli, {label}",
            [*ema_cli_command(), "average", *ins, "-o", str(out), *ema_options],
            out,
            fmt=converted.fmt,
            input_bytes=size,
        ),
    ]
    for i, (name, variant_env) in enumerate(args.variant):
        variant_out = out_dir / f"variant{i}-{converted.fmt}.safetensors"
        argv = [sys.executable, str(HERE / "variants.py"), "average", *ins, "-o", str(variant_out)]
        tools.append(
            Tool(
                f"ema-cli {name}, {label}",
                [*argv, *ema_options],
                variant_out,
                env=variant_env,
                fmt=converted.fmt,
                input_bytes=size,
            )
        )
    return tools


#: ``--half-types``: the dtypes compared with float32, each at the float32 model's parameter
#: count and at twice it (the float32 model's bytes).
HALF_TYPES = ("bfloat16", "float16")


def half_type_tools(
    args: argparse.Namespace, data: Dataset, count: int, out_dir: Path
) -> tuple[list[Tool], list[Path]]:
    """The cat floor and ema-cli on bfloat16 and float16 checkpoints of the same model (equal
    parameters, half the bytes) and of a model twice its size (equal bytes), so that their
    bytes per second are measured beside float32's in one run. Their ``fmt`` names the set;
    also returns every file they read."""
    tools: list[Tool] = []
    all_files: list[Path] = []
    for dtype in HALF_TYPES:
        for scale, label in ((1, "equal params"), (2, "equal bytes")):
            params = scale * data.params_target
            half = Dataset(args.data, params, dtype, False, args.shards, args.align)
            half.ensure(count)
            files = half.files(count)
            all_files += files
            size = sum(f.stat().st_size for f in files)
            group = f"{dtype} {half.params / 1e6:.0f}M ({label})"
            out = out_dir / f"ema-{half.name}.safetensors"
            ins = [str(half.checkpoint(k)) for k in range(count)]
            argv = [*ema_cli_command(), "average", *ins, "-o", str(out)]
            argv += ["--decay", str(args.decay), "-q"]
            tools += [
                Tool(f"cat floor, {group}", ["cat", *map(str, files)], fmt=group, input_bytes=size),
                Tool(f"ema-cli, {group}", argv, out, fmt=group, input_bytes=size),
            ]
    return tools, all_files


def half_type_summary(tools: Sequence[Tool], input_bytes: int) -> str:
    """Each half type's ema-cli bytes per second as a fraction of float32's (the target is 0.8
    or more), or nothing without ``--half-types``."""
    base = next((t for t in tools if t.name == "ema-cli" and t.runs), None)
    rows = [t for t in tools if t.name.startswith("ema-cli, ") and t.fmt.split()[0] in HALF_TYPES]
    if not rows:
        return ""
    if base is None:
        return "\nno float32 ema-cli row ran (safetensors): no fractions of its bytes/s\n"
    speed = input_bytes / base.median_wall()
    parts = [f"{t.fmt}: {t.input_bytes / t.median_wall() / speed:.2f}" for t in rows if t.runs]
    return "\nema-cli's bytes/s as a fraction of float32's: " + ", ".join(parts) + "\n"


def benchmark(
    args: argparse.Namespace, data: Dataset, count: int, with_peers: bool, verify: bool
) -> dict[str, object]:
    data.ensure(count)
    inputs = [data.checkpoint(k) for k in range(count)]
    files = data.files(count)
    input_bytes = sum(f.stat().st_size for f in files)
    title = (
        f"{count} checkpoints x {data.params / 1e6:.1f}M params {data.dtype}"
        + (f", sharded ({len(files) // count} shards each)" if data.sharded else "")
        + f": {input_bytes / 1e9:.2f} GB in, median of {args.repeats}"
        + (f" after {args.warmup} uncounted" if args.warmup else "")
    )
    print(f"\n## {title}", file=sys.stderr)
    out_dir = data.root / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    shard_bytes = max(f.stat().st_size for f in files)
    formats = getattr(args, "input_format", None) or ["safetensors"]
    tools = []
    if "safetensors" in formats:
        tools = make_tools(args, inputs, files, out_dir, with_peers, shard_bytes)
    all_files = list(files)
    for fmt in formats:
        if fmt != "safetensors":
            converted = Converted(data, fmt)
            converted.ensure(count)
            tools += format_tools(args, converted, count, out_dir)
            all_files += converted.files(count)
    if getattr(args, "half_types", False):
        half, half_files = half_type_tools(args, data, count, out_dir)
        tools += half
        all_files += half_files
        title += "; bfloat16 and float16 beside it"
    if len(formats) > 1:
        title += f"; input formats {', '.join(formats)}"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    load_before = os.getloadavg()[0]
    if not args.cold:
        warm(all_files)
    try:
        run_tools(tools, args.repeats, env, cold=all_files if args.cold else (), warmup=args.warmup)
        checks: dict[str, str] = {}
        sweep_checks: list[str] = []
        by_name = {t.name: t for t in tools}
        ema = by_name.get("ema-cli") or next(t for t in tools if t.name.startswith("ema-cli"))
        if verify and ema.runs and ema.output is not None and ema.output.exists():
            others = ["naive numpy peer", "TensorFlow replay"]
            singles = {single_row(o) for o in SWEEP_SINGLES.values()}
            others += [
                t.name
                for t in tools
                if t.name.startswith("ema-cli")
                and t is not ema
                and t.name not in singles
                and t.fmt in INPUT_FORMATS  # the half types' averages are other numbers
            ]
            for other in others:
                peer = by_name.get(other)
                if peer and peer.runs and peer.output is not None and peer.output.exists():
                    checks[other] = compare(ema.output, peer.output)
            sweep = next((t for t in tools if t.name.startswith("ema-cli sweep")), None)
            if sweep and sweep.runs and sweep.output is not None:
                first = sweep.output.with_name(f"sweep.decay-{float(args.decay)!r}.safetensors")
                if first.exists():
                    checks[f"{sweep.name}, its decay-{float(args.decay)!r} output"] = compare(
                        ema.output, first
                    )
                for label, options in SWEEP_SINGLES.items():
                    single = by_name.get(single_row(options))
                    own = sweep.output.with_name(f"sweep.{label}.safetensors")
                    if single and single.output and single.output.exists() and own.exists():
                        sweep_checks.append(
                            f"the sweep's {label} output vs {single.name}: "
                            + compare(single.output, own)
                        )
    finally:
        for tool in tools:
            clean_outputs(tool)
    load = f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
    if max(load_before, os.getloadavg()[0]) > 0.5:
        load += " (other work competed for the CPUs: wall times are pessimistic)"
    text = f"### {title}\n\n{table(tools, input_bytes)}\n\n{load}\n"
    text += sweep_summary(tools)
    text += half_type_summary(tools, input_bytes)
    for other, verdict in checks.items():
        text += f"\n{ema.name} output vs {other}: {verdict}"
    for line in sweep_checks:
        text += f"\n{line}"
    print(text + "\n")
    sys.stdout.flush()
    return {
        "title": title,
        "dataset": data.name,
        "count": count,
        "params": data.params,
        "input_bytes": input_bytes,
        "tools": {
            t.name: {
                "walls": [m.wall for m in t.runs],
                "maxrss_kb": [m.maxrss_kb for m in t.runs],
                "cpu": [m.cpu for m in t.runs],
                "note": t.note,
            }
            for t in tools
        },
        "checks": checks,
    }


def check_flat(args: argparse.Namespace) -> list[dict[str, object]]:
    """ema-cli alone at (model, count), (2 x model, count) and (model, 2 x count)."""
    base = Dataset(args.data, args.params, args.dtype, args.sharded, args.shards, args.align)
    double = Dataset(args.data, 2 * args.params, args.dtype, args.sharded, args.shards, args.align)
    results = [
        benchmark(args, base, args.count, with_peers=False, verify=False),
        benchmark(args, double, args.count, with_peers=False, verify=False),
        benchmark(args, base, 2 * args.count, with_peers=False, verify=False),
    ]
    lines = [
        "### ema-cli peak RSS vs model size and checkpoint count",
        "",
        "| run | input GB | ema-cli wall s | x cat floor | ema-cli peak RSS MB |",
        "|---|---:|---:|---:|---:|",
    ]
    rss = []
    for r in results:
        tools = r["tools"]
        ema, cat = tools["ema-cli"], tools["cat floor"]  # type: ignore[index]
        if not ema["maxrss_kb"]:
            lines.append(f"| {r['title']} | | {ema['note']} | | |")
            continue
        wall = float(statistics.median(ema["walls"]))
        ratio = wall / statistics.median(cat["walls"])
        mb = statistics.median(ema["maxrss_kb"]) / 1024
        rss.append(mb)
        lines.append(
            f"| {r['count']} x {cast(int, r['params']) / 1e6:.1f}M | "
            f"{cast(int, r['input_bytes']) / 1e9:.2f} | "
            f"{wall:.2f} | {ratio:.2f} | {mb:.0f} |"
        )
    if len(rss) == 3:
        lines.append("")
        lines.append(
            f"RSS spread: {max(rss) - min(rss):.0f} MB ({max(rss) / min(rss):.2f}x max/min)"
        )
    print("\n".join(lines) + "\n")
    return results


#: What a command-line tool should answer within (issue "Do first": measured on this machine
#: kind, 2 cores): --help, --version and inspect of a small file; a small float32 average.
STARTUP_TARGETS_MS = {"--help": 150, "--version": 150, "inspect": 150, "average (12 tiny)": 300}


def startup(repeats: int) -> list[dict[str, object]]:
    """Wall time of the commands people run from shells and loops, with Python's own start and
    numpy's import as floors, medians of ``repeats`` runs after one warm-up each."""
    examples = sorted(
        (ROOT / "examples" / "checkpoints").glob("ckpt-*.safetensors"),
        key=lambda p: int(p.stem.split("-")[1]),
    )
    out = Path(tempfile.mkdtemp(prefix="ema-startup-")) / "avg.safetensors"
    cli = ema_cli_command()
    commands = {
        "python -c pass (floor)": [sys.executable, "-c", "pass"],
        "python -c 'import numpy' (floor)": [sys.executable, "-c", "import numpy"],
        "--help": [*cli, "--help"],
        "--version": [*cli, "--version"],
        "inspect": [*cli, "inspect", str(examples[0])],
        "average (12 tiny)": [
            *cli,
            "average",
            *map(str, examples),
            "-o",
            str(out),
            "--decay",
            "0.9",
        ],
    }
    rows = []
    print("| command | median ms | min ms | target ms |\n|---|---:|---:|---:|")
    for name, command in commands.items():
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            # ema-cli's entry point sets OPENBLAS_NUM_THREADS=1 before numpy loads; so does the
            # numpy floor, or it would time OpenBLAS starting a thread per core.
            env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
            subprocess.run(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=True
            )
            times.append((time.perf_counter() - start) * 1000)
        times = sorted(times[1:])
        median = times[len(times) // 2]
        target = STARTUP_TARGETS_MS.get(name)
        print(f"| `{name}` | {median:.0f} | {times[0]:.0f} | {target or ''} |")
        rows.append({"command": name, "median_ms": median, "min_ms": times[0], "target_ms": target})
    shutil.rmtree(out.parent, ignore_errors=True)
    return rows


def parse_formats(text: str) -> list[str]:
    formats = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in formats if f not in INPUT_FORMATS]
    if unknown or not formats:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a comma-separated list of {', '.join(INPUT_FORMATS)}"
        )
    return list(dict.fromkeys(formats))


def gil_free_crc32c() -> object | None:
    """google-crc32c's own C library's ``crc32c_extend`` through ctypes, which releases the
    GIL during the call (``google_crc32c.extend`` releases it only for ``bytes`` of 1 MB or
    more, never for numpy arrays): a measuring aid, None when the wheel's library is not there."""
    import ctypes
    import glob

    import google_crc32c

    here = Path(google_crc32c.__file__).resolve().parent
    for name in sorted(glob.glob(str(here.parent / "google_crc32c.libs" / "libcrc32c*"))):
        try:
            function = ctypes.CDLL(name).crc32c_extend
        except (OSError, AttributeError):
            continue
        function.restype = ctypes.c_uint32
        function.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
        return function
    return None


def crc_speed(repeats: int) -> list[dict[str, object]]:
    """crc32c throughput over 1 MB numpy blocks (the replay's), one thread and two at once:
    whether checksumming in two worker threads overlaps (only when the GIL is released)."""
    import threading

    import google_crc32c

    from ema_cli import kernels

    size, block = 256 << 20, 1 << 20
    buffers = [np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8) for i in range(2)]
    extend = google_crc32c.extend
    nogil = gil_free_crc32c()

    def with_gil(buffer: np.ndarray) -> int:
        value = 0
        for start in range(0, size, block):
            value = extend(value, buffer[start : start + block])
        return value

    def without_gil(buffer: np.ndarray) -> int:
        value, address = 0, buffer.__array_interface__["data"][0]
        for start in range(0, size, block):
            value = nogil(value, address + start, block)  # type: ignore[operator]
        return value

    ours = kernels.crc32c_kernel()  # ema-cli's own, when its C kernels are built and enabled

    def with_kernel(buffer: np.ndarray) -> int:
        value = 0
        for start in range(0, size, block):
            value = ours(buffer[start : start + block], value)  # type: ignore[misc]
        return value

    def speed(function: object, threads: int) -> float:
        best = math.inf
        for _ in range(repeats):
            workers = [
                threading.Thread(target=function, args=(buffers[i],))  # type: ignore[arg-type]
                for i in range(threads)
            ]
            start = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            best = min(best, time.perf_counter() - start)
        return threads * size / best / 1e9

    rows = []
    print("| crc32c over 1 MB numpy blocks | 1 thread GB/s | 2 threads GB/s | 2 / 1 |")
    print("|---|---:|---:|---:|")
    paths = [("google_crc32c.extend (holds the GIL)", with_gil)]
    if ours is not None:
        assert with_kernel(buffers[0]) == with_gil(buffers[0])
        paths.insert(0, ("ema-cli's C kernel (what ema-cli uses; GIL released)", with_kernel))
    if nogil is not None:
        assert without_gil(buffers[0]) == with_gil(buffers[0])
        paths.append(("the same C library through ctypes (GIL released)", without_gil))
    for name, function in paths:
        one, two = speed(function, 1), speed(function, 2)
        print(f"| {name} | {one:.1f} | {two:.1f} | {two / one:.2f} |")
        rows.append({"path": name, "one_thread_gbs": one, "two_threads_gbs": two})
    return rows


#: ``--arithmetic``'s rows: what one checkpoint's block costs each kind of average, as the
#: replay calls the C kernels (source kind, and the update of a float32 shadow ``s`` or a float64
#: sum ``a``; 0.001 and 0.1 stand for any coefficient and weight).
ARITHMETIC = {
    "--decay (TF's update), float32 checkpoint": ("float32", "ema"),
    "--decay (TF's update), bfloat16 checkpoint": ("bfloat16", "ema"),
    "--mean (a + x), float32 checkpoint": ("float32", "add"),
    "--sigma-rel, --weights (a + x w), float32 checkpoint": ("float32", "mul-add"),
    "--decay-per-step (x + (a - x) P), float32 checkpoint": ("float32", "recurrence"),
}


def arithmetic_speed(repeats: int, elements: int) -> list[dict[str, object]]:
    """The replay's arithmetic alone: each average's C update over the replay's blocks (1 MiB
    of float32 shadow, or its elements in float64 sums), already in memory, for ``elements``
    element-updates (the benchmark's model times its checkpoint count), on 1 thread and on 2.
    No reading, writing or per-block Python: what a sweep's extra averages cost at the least
    with these kernels."""
    import threading
    from collections.abc import Callable

    from ema_cli import kernels, replay

    kernel = kernels._kernels
    if kernel is None or not kernels._enabled:
        print("the C kernels are not in use here: nothing to measure")
        return []
    block = replay.DEFAULT_BLOCK_BYTES // 4  # the replay's elements per block (float32)
    passes = max(1, elements // block)
    modes = {
        "add": kernels.SUM_ADD,
        "mul-add": kernels.SUM_MUL_ADD,
        "recurrence": kernels.SUM_RECURRENCE,
    }

    def task(source: str, update: str) -> Callable[[], object]:
        rng = np.random.default_rng(0)
        x = rng.standard_normal(block).astype(np.float32)
        kind = 0
        if source == "bfloat16":
            x, kind = x.astype(ml_dtypes.bfloat16).view(np.uint16), 2
        if update == "ema":
            shadow = np.zeros(block, np.float32)
            return lambda: [kernel.ema_update(shadow, x, kind, 0.001) for _ in range(passes)]
        total, mode = np.zeros(block, np.float64), modes[update]
        return lambda: [kernel.sum_update(total, x, kind, 0.1, mode) for _ in range(passes)]

    def seconds(source: str, update: str, threads: int) -> float:
        best = math.inf
        for _ in range(repeats):
            work = [task(source, update) for _ in range(threads)]  # each thread its own block
            workers = [threading.Thread(target=w) for w in work]
            start = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            best = min(best, time.perf_counter() - start)
        return best

    print(f"{passes * block / 1e6:.0f}M element-updates (the model x its checkpoint count), blocks")
    print(f"of {block} elements already in memory, best of {repeats}\n")
    print("| average | s, 1 thread | s, 2 threads doing it twice | 2-thread speed-up |")
    print("|---|---:|---:|---:|")
    # Normal values, no subnormals: the threads' floating-point mode does not matter.
    rows = []
    for name, (source, update) in ARITHMETIC.items():
        one, two = seconds(source, update, 1), seconds(source, update, 2)
        print(f"| {name} | {one:.3f} | {two:.3f} | {2 * one / two:.2f} |")
        rows.append({"average": name, "one_thread_s": one, "two_threads_s": two})
    return rows


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, settings = text.partition(":")
    env = dict(item.split("=", 1) for item in settings.split(",") if item)
    if not name or not env:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME:VAR=VALUE[,VAR=VALUE]")
    return name, env


def machine() -> dict[str, str]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpus": str(os.cpu_count()),
        "cpu": model,
        "memory": f"{mem / 2**30:.1f} GiB",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numpy SIMD": simd_level(),
        "ml_dtypes": f"{ml_dtypes.__version__} (import {ml_dtypes_import_seconds():.2f} s)",
    }


def simd_level() -> str:
    """The best of numpy's dispatch targets this CPU runs (what its vectorised loops use)."""
    try:
        from numpy._core._multiarray_umath import (  # type: ignore[import-not-found]
            __cpu_dispatch__,
            __cpu_features__,
        )
    except ImportError:
        return "unknown"
    found = [name for name in __cpu_dispatch__ if __cpu_features__.get(name)]
    return found[-1] if found else "baseline"


def ml_dtypes_import_seconds() -> float:
    """Wall time of ``import ml_dtypes`` after numpy, in a fresh Python: every run that meets a
    bfloat16 tensor pays it (0.7-0.9 s for ml_dtypes 0.7.0 here, about 0.01 s for 0.6.0)."""
    code = "import time, numpy; t = time.perf_counter(); import ml_dtypes; print(time.perf_counter() - t)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Benchmark ema-cli against the cat floor, a naive numpy peer and (--tf) TensorFlow.",
    )
    parser.add_argument(
        "--params",
        type=parse_count,
        default=parse_count("96M"),
        help="model size, e.g. 96M (default), 25M, 1.5G",
    )
    parser.add_argument("--count", type=int, default=10, help="checkpoints (default 10)")
    parser.add_argument("--dtype", choices=sorted(ST_DTYPES), default="float32")
    parser.add_argument(
        "--sharded", action="store_true", help="HF-style sharded checkpoint folders"
    )
    parser.add_argument(
        "--shards", type=int, default=4, help="shards per checkpoint with --sharded"
    )
    parser.add_argument(
        "--align",
        type=int,
        default=8,
        help="start tensor data at a multiple of this many bytes (default 8, as safetensors "
        "does; 4096 gives page-aligned data)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per tool; medians are shown")
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="rounds of every tool run first and not counted (default 1; 0 for none)",
    )
    parser.add_argument("--decay", type=float, default=0.999)
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="cache of synthetic checkpoints"
    )
    parser.add_argument("--no-peer", action="store_true", help="skip the naive numpy peer")
    parser.add_argument("--tf", action="store_true", help="add the TensorFlow replay")
    parser.add_argument("--tf-python", default=DEFAULT_TF_PYTHON, help="a Python with TensorFlow")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="take the inputs out of the page cache before every timed run (fadvise DONTNEED, "
        "after sync: the tools' own code stays cached) and add a 4-parallel-cat floor; the cold "
        "floor is the faster of the two cats",
    )
    parser.add_argument(
        "--workers",
        type=int,
        action="append",
        default=[],
        metavar="N",
        help="also run ema-cli with --workers N (repeatable; ema-cli's own row uses its default, "
        "every CPU)",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="add ema-cli computing four averages in one pass (--decay DECAY --decay 0.9999 "
        "--mean --sigma-rel 0.1) and the three others as single runs: each sweep output is "
        "checked against its single run, and the sweep's time against one run and all four",
    )
    parser.add_argument(
        "--output-name",
        help="ema-cli's -o, relative to DATA/out (default ema.safetensors; with --sharded a "
        "sharded folder 'ema' cut like the inputs)",
    )
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="skip comparing ema-cli's output with the peers' (bitwise)",
    )
    parser.add_argument(
        "--check-flat",
        action="store_true",
        help="ema-cli only, at 1x/2x --params and 1x/2x --count: is peak RSS flat?",
    )
    parser.add_argument(
        "--variant",
        type=parse_variant,
        action="append",
        default=[],
        metavar="NAME:VAR=VALUE[,VAR=VALUE]",
        help="also run benchmarks/variants.py with these EMA_BENCH_* settings (repeatable), "
        "e.g. 1-worker:EMA_BENCH_WORKERS=1",
    )
    parser.add_argument(
        "--startup",
        action="store_true",
        help="time --help, --version, inspect and a tiny average (with Python's own start as "
        "the floor) instead of the replay",
    )
    parser.add_argument(
        "--input-format",
        type=parse_formats,
        default=["safetensors"],
        metavar="FORMAT[,FORMAT]",
        help="what ema-cli reads: safetensors (default), tensorflow (TensorBundle .index) and/or "
        "torch (.pt), comma-separated; the others are converted from the safetensors "
        "checkpoints once by ema-cli itself and cached beside them, and each gets its own cat "
        "floor and ema-cli rows (and --variant rows) in one table",
    )
    parser.add_argument(
        "--crc",
        action="store_true",
        help="measure crc32c alone (ema-cli's C kernel, google_crc32c.extend, and its C "
        "library with the GIL released, 1 and 2 threads) instead of the replay",
    )
    parser.add_argument(
        "--half-types",
        action="store_true",
        help="add bfloat16 and float16 checkpoints of the same model and of twice its "
        "parameters (float32's bytes), each with its cat floor, interleaved with the float32 "
        "rows: their bytes/s as a fraction of float32's",
    )
    parser.add_argument(
        "--arithmetic",
        action="store_true",
        help="measure each average's C update alone (blocks in memory; the model times "
        "--count element-updates) instead of the replay",
    )
    parser.add_argument("--json", type=Path, help="also write the raw measurements here")
    args = parser.parse_args(argv)
    if args.half_types and (args.dtype != "float32" or args.sharded):
        parser.error("--half-types compares with float32 single files: drop --dtype/--sharded")
    args.data = args.data.resolve()

    info = machine()
    print(
        f"# ema-cli benchmark, {info['date']}\n\n{info['cpus']} CPUs ({info['cpu']}), "
        f"{info['memory']} RAM, Python {info['python']}, numpy {info['numpy']} "
        f"({info['numpy SIMD']}), ml_dtypes {info['ml_dtypes']}\n"
        f"command: {' '.join([Path(sys.executable).name, *sys.argv])}\n"
    )
    info["bytecode"] = compile_bytecode()
    print(info["bytecode"] + "\n")
    if args.startup:
        results = startup(max(args.repeats, 15))
    elif args.crc:
        results = crc_speed(max(args.repeats, 3))
    elif args.arithmetic:
        results = arithmetic_speed(max(args.repeats, 3), args.params * args.count)
    elif args.check_flat:
        results = check_flat(args)
    else:
        data = Dataset(args.data, args.params, args.dtype, args.sharded, args.shards, args.align)
        results = [benchmark(args, data, args.count, with_peers=True, verify=not args.no_verify)]
    if args.json:
        args.json.write_text(
            json.dumps({"machine": info, "argv": sys.argv, "results": results}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
