"""A seeded mutation fuzzer for ema-cli's readers and its run contract.

Each case copies a small valid run of one format (three checkpoints), damages one of them with
one to three mutations (truncation, byte flips in header and data, structural edits of JSON
headers and shard indexes, of zip directories and local headers, of ``.npy`` headers, of HDF5
superblocks, object headers and link names), runs ``ema-cli average`` over the run into an
output folder that already holds an earlier output, and checks the contract:

- exit status 0 or 2, within a time limit (no hang, no crash, never 1);
- exit 2 prints exactly one line, ``ema-cli: error: ...``, on standard error; no traceback or
  "Exception ignored" ever;
- a failed run leaves the output folder byte-identical (the earlier output and mapping intact);
  no run leaves hidden temporaries, journals or lock files;
- no input changes.

Every case is a function of ``(seed, index)`` alone, so ``--case K`` rebuilds case K exactly.
Cases run in a worker process that runs ema-cli in-process (fast), with its standard output and
error redirected at the file-descriptor level (so C libraries' messages are seen too); a case
that outlives the time limit kills the worker, which is restarted. ``--isolated`` runs each case
as its own ``python -m ema_cli`` process instead.

Long run::

    python -m tests.fuzz --seed 12345 --cases 5000
    python -m tests.fuzz --seed 12345 --case 417 --keep /tmp/case417   # rebuild one case

It exits 1 when a case broke the contract, printing each finding with its reproducer.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"
#: Generous: a healthy case takes well under a second; this only catches hangs.
CASE_TIMEOUT_SECONDS = 30.0
#: A worker's address-space limit, so a runaway allocation fails instead of taking the machine.
WORKER_MEMORY_BYTES = 6 << 30

# ---------------------------------------------------------------- valid runs ("families")


@dataclass(frozen=True)
class Family:
    """One input format: how to build a valid run of three checkpoints, the arguments that name
    them, the files a mutation may damage, and the output suffixes to try."""

    name: str
    build: Callable[[Path], None]
    #: checkpoint arguments relative to the run folder
    checkpoints: tuple[str, ...]
    #: per checkpoint, the files (relative) that belong to it
    files: Callable[[Path, str], list[Path]]
    outputs: tuple[str, ...]
    mutators: tuple[str, ...]


def _tensors(step: int) -> dict[str, object]:
    import ml_dtypes
    import numpy as np

    rng = np.random.default_rng(step)
    return {
        "dense/kernel": rng.standard_normal((4, 3)).astype(np.float32),
        "dense/bias": rng.standard_normal(3).astype(np.float32),
        "emb/table": rng.standard_normal((5, 2)).astype(ml_dtypes.bfloat16),
        "norm/scale": rng.standard_normal(6).astype(np.float16),
        "global_step": np.array(step, dtype=np.int64),
    }


def _build_safetensors(folder: Path) -> None:
    import safetensors.numpy

    for step in (1, 2, 3):
        safetensors.numpy.save_file(
            _tensors(step),  # type: ignore[arg-type]
            str(folder / f"ckpt-{step}.safetensors"),
            metadata={"format": "pt", "note": "fuzz seed"},
        )


def _build_sharded(folder: Path) -> None:
    import safetensors.numpy

    for step in (1, 2, 3):
        model = folder / f"checkpoint-{step}"
        model.mkdir()
        tensors = _tensors(step)
        names = sorted(tensors)
        shards = {
            "model-00001-of-00002.safetensors": names[:2],
            "model-00002-of-00002.safetensors": names[2:],
        }
        weight_map: dict[str, str] = {}
        total = 0
        for shard, members in shards.items():
            part = {n: tensors[n] for n in members}
            safetensors.numpy.save_file(part, str(model / shard), metadata={"format": "pt"})  # type: ignore[arg-type]
            weight_map.update(dict.fromkeys(members, shard))
            total += sum(t.nbytes for t in part.values())  # type: ignore[attr-defined]
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (model / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (model / "config.json").write_text('{"model_type": "fuzz"}\n')


def _build_npz(compressed: bool) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        import numpy as np

        save = np.savez_compressed if compressed else np.savez
        for step in (1, 2, 3):
            tensors = {k.replace("/", "."): v for k, v in _tensors(step).items()}
            del tensors["emb.table"]  # bfloat16 round-trips as raw void; kept simple here
            save(folder / f"ckpt-{step}.npz", **tensors)  # type: ignore[arg-type]

    return build


def _copy_fixtures(source: Path, pattern: str) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        for file in sorted(source.glob(pattern)):
            shutil.copy2(file, folder / file.name)

    return build


def _one_file(folder: Path, checkpoint: str) -> list[Path]:
    return [folder / checkpoint]


def _model_folder(folder: Path, checkpoint: str) -> list[Path]:
    return sorted(p for p in (folder / checkpoint).iterdir() if p.is_file())


def _bundle(folder: Path, checkpoint: str) -> list[Path]:
    prefix = checkpoint.removesuffix(".index")
    return sorted(folder.glob(f"{prefix}.*"))


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "safetensors",
            _build_safetensors,
            tuple(f"ckpt-{s}.safetensors" for s in (1, 2, 3)),
            _one_file,
            (".safetensors", ".npz", ""),
            ("generic", "header", "safetensors"),
        ),
        Family(
            "sharded",
            _build_sharded,
            tuple(f"checkpoint-{s}" for s in (1, 2, 3)),
            _model_folder,
            ("", ".safetensors"),
            ("generic", "header", "safetensors", "index"),
        ),
        Family(
            "npz",
            _build_npz(False),
            tuple(f"ckpt-{s}.npz" for s in (1, 2, 3)),
            _one_file,
            (".npz", ".safetensors"),
            ("generic", "header", "zip", "npy"),
        ),
        Family(
            "npz-deflated",
            _build_npz(True),
            tuple(f"ckpt-{s}.npz" for s in (1, 2, 3)),
            _one_file,
            (".npz", ".safetensors"),
            ("generic", "header", "zip", "npy"),
        ),
        Family(
            "weights.h5",
            _copy_fixtures(FIXTURES / "keras" / "f32" / "weights_h5", "*.weights.h5"),
            tuple(f"ckpt-{s}.weights.h5" for s in (3, 6, 9)),
            _one_file,
            (".weights.h5", ".safetensors", ".npz"),
            ("generic", "header", "hdf5", "hdf5-names"),
        ),
        Family(
            "h5",
            _copy_fixtures(FIXTURES / "keras" / "f32" / "legacy_h5", "*.h5"),
            tuple(f"ckpt-{s}.h5" for s in (3, 6, 9)),
            _one_file,
            (".h5", ".safetensors"),
            ("generic", "header", "hdf5", "hdf5-names"),
        ),
        Family(
            "keras",
            _copy_fixtures(FIXTURES / "keras" / "f32" / "keras", "*.keras"),
            tuple(f"ckpt-{s}.keras" for s in (3, 6, 9)),
            _one_file,
            (".keras", ".weights.h5", ".safetensors"),
            ("generic", "zip", "member", "hdf5-names", "inner-hdf5", "inner-hdf5"),
        ),
        Family(
            "tensorflow",
            _copy_fixtures(FIXTURES / "tf" / "keras", "ckpt-*"),
            tuple(f"ckpt-{s}.index" for s in (1, 2, 3)),
            _bundle,
            (".index", ".safetensors"),
            ("generic", "header"),
        ),
        Family(
            "torch",
            _copy_fixtures(FIXTURES / "torch", "ckpt-*.pt"),
            tuple(f"ckpt-{s}.pt" for s in (1, 2, 3)),
            _one_file,
            (".pt", ".safetensors"),
            ("generic", "zip", "member"),
        ),
    )
}


# ---------------------------------------------------------------- mutations


def _pick_position(rng: random.Random, size: int, header: int) -> int:
    """A byte position, biased towards the first ``header`` bytes where parsers live."""
    if size <= 0:
        return 0
    if rng.random() < 0.6:
        return rng.randrange(min(size, max(header, 1)))
    return rng.randrange(size)


def _interesting_int(rng: random.Random) -> int | str:
    choices: list[int | str] = [
        0,
        -1,
        1,
        2**31 - 1,
        2**31,
        2**32,
        2**63 - 1,
        2**63,
        2**64,
        2**64 + 1,
        10**20,
        "9" * 400,  # a JSON integer longer than Python's int-string limit
        "9" * 5000,
    ]
    return rng.choice(choices)


def mutate_generic(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    size = len(data)
    kind = rng.choice(["truncate", "flip", "flip", "overwrite", "zero", "insert", "append"])
    if kind == "truncate" or size == 0:
        cut = _pick_position(rng, size, 512) if rng.random() < 0.7 else rng.randrange(size + 1)
        return data[:cut], f"truncate to {cut} bytes"
    buf = bytearray(data)
    if kind == "flip":
        flips = []
        for _ in range(rng.randint(1, 8)):
            at = _pick_position(rng, size, 512)
            bit = 1 << rng.randrange(8)
            buf[at] ^= bit
            flips.append(f"{at}^{bit:#x}")
        return bytes(buf), "flip bits " + ",".join(flips)
    if kind == "overwrite":
        at = _pick_position(rng, size, 512)
        n = rng.randint(1, 16)
        chunk = bytes(rng.choice([0x00, 0xFF, rng.randrange(256)]) for _ in range(n))
        buf[at : at + n] = chunk[: max(0, size - at)]
        return bytes(buf), f"overwrite {n} bytes at {at} with {chunk.hex()}"
    if kind == "zero":
        at = _pick_position(rng, size, 4096)
        n = rng.randint(1, 512)
        buf[at : at + n] = bytes(min(n, size - at))
        return bytes(buf), f"zero {n} bytes at {at}"
    if kind == "insert":
        at = _pick_position(rng, size, 512)
        chunk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        return data[:at] + chunk + data[at:], f"insert {chunk.hex()} at {at}"
    chunk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    return data + chunk, f"append {len(chunk)} bytes"


# safetensors: the 8-byte length and the JSON header


def _split_safetensors(data: bytes) -> tuple[dict[str, object], bytes] | None:
    if len(data) < 8:
        return None
    (n,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, RecursionError):
        return None
    return (header, data[8 + n :]) if isinstance(header, dict) else None


def _join_safetensors(text: bytes, rest: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text + rest


def mutate_safetensors(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    split = _split_safetensors(data)
    if split is None:
        return mutate_generic(rng, data)
    header, rest = split
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names) if names else "x"
    entry = header.get(name)
    kind = rng.choice(
        [
            "length",
            "dtype",
            "shape",
            "offsets",
            "offsets-digits",
            "duplicate",
            "deep",
            "surrogate-name",
            "surrogate-meta",
            "metadata",
            "entry",
            "drop",
            "rename",
            "swap-offsets",
        ]
    )
    text: bytes
    if kind == "length":
        (n,) = struct.unpack("<Q", data[:8])
        new = rng.choice([0, 1, n - 1, n + 1, n + 8, 2**32, 2**63, 2**64 - 1, 99_999_999])
        return struct.pack("<Q", new) + data[8:], f"header length {n} -> {new}"
    if kind == "deep":
        depth = rng.choice([100, 1000, 100_000])
        text = ("[" * depth + "]" * depth).encode()
        header[name] = "@@DEEP@@"
        text = json.dumps(header).encode().replace(b'"@@DEEP@@"', text)
        return _join_safetensors(text, rest), f"tensor {name!r} nested {depth} deep"
    if kind == "duplicate":
        body = json.dumps(header)
        dup = json.dumps({name: header.get(name)})[1:-1]
        text = (body[:-1] + ", " + dup + "}").encode()
        return _join_safetensors(text, rest), f"tensor {name!r} listed twice"
    if kind == "surrogate-name":
        text = json.dumps(header).replace(json.dumps(name), '"bad\\ud800name"', 1).encode()
        return _join_safetensors(text, rest), f"tensor {name!r} renamed with a lone surrogate"
    if kind == "surrogate-meta":
        header["__metadata__"] = {"format": "@@S@@"}
        text = json.dumps(header).replace('"@@S@@"', '"x\\udfffy"').encode()
        return _join_safetensors(text, rest), "metadata value with a lone surrogate"
    if kind == "offsets-digits" and isinstance(entry, dict):
        big = "9" * rng.choice([400, 5000])
        entry["data_offsets"] = ["@@BIG@@", "@@BIG@@"] if rng.random() < 0.5 else [0, "@@BIG@@"]
        text = json.dumps(header).replace('"@@BIG@@"', big).encode()
        return _join_safetensors(text, rest), f"tensor {name!r} data_offsets of {len(big)} digits"
    description = kind
    if kind == "dtype" and isinstance(entry, dict):
        entry["dtype"] = rng.choice(["F32", "F64", "I64", "BOOL", "F8_E4M3", "Q4", "", 7, None])
        description = f"tensor {name!r} dtype -> {entry['dtype']!r}"
    elif kind == "shape" and isinstance(entry, dict):
        choices: list[object] = [
            [],
            [0],
            [-1],
            [2**40, 2**40],
            [1.5],
            "3",
            [True],
            [3, 4, 5, 6],
            [_interesting_int(rng)],
        ]
        entry["shape"] = rng.choice(choices)
        description = f"tensor {name!r} shape -> {str(entry['shape'])[:40]}"
    elif kind == "offsets" and isinstance(entry, dict):
        entry["data_offsets"] = [_interesting_int(rng), _interesting_int(rng)]
        description = f"tensor {name!r} data_offsets -> {str(entry['data_offsets'])[:60]}"
    elif kind == "swap-offsets" and isinstance(entry, dict):
        entry["data_offsets"] = list(reversed(entry.get("data_offsets", [0, 0])))  # type: ignore[call-overload]
        description = f"tensor {name!r} data_offsets reversed"
    elif kind == "metadata":
        header["__metadata__"] = rng.choice([[], {"a": 1}, "x", {"a": None}, {"": ""}, None])
        description = f"__metadata__ -> {header['__metadata__']!r}"
    elif kind == "entry":
        header[name] = rng.choice([[], "x", 1, None, {}, {"dtype": "F32"}])
        description = f"tensor {name!r} entry -> {header[name]!r}"
    elif kind == "drop":
        header.pop(name, None)
        description = f"tensor {name!r} removed from the header"
    elif kind == "rename":
        header[rng.choice(["", "a" * 300, "x/../y", "\x00", "é/ü", name + "/"])] = header.pop(
            name, None
        )
        description = f"tensor {name!r} renamed"
    # surrogatepass: a name left with a lone surrogate is written as the bytes UTF-8 forbids
    text = json.dumps(header, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
    text += b" " * (-len(text) % 8)
    return _join_safetensors(text, rest), description


def mutate_index(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    try:
        index = json.loads(data)
    except (ValueError, RecursionError):
        return mutate_generic(rng, data)
    if not isinstance(index, dict):
        return mutate_generic(rng, data)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        return mutate_generic(rng, data)
    names = sorted(weight_map)
    name = rng.choice(names)
    kind = rng.choice(
        [
            "total-digits",
            "total-wrong",
            "total-type",
            "missing-shard",
            "escape-shard",
            "move-tensor",
            "extra-tensor",
            "drop-tensor",
            "weight-map-type",
            "deep",
            "duplicate-key",
            "surrogate",
        ]
    )
    if kind == "total-digits":
        text = json.dumps(index).replace(
            json.dumps(index.get("metadata", {}).get("total_size", 0)), "9" * 5000, 1
        )
        return text.encode(), "total_size of 5000 digits"
    if kind == "deep":
        depth = rng.choice([1000, 100_000])
        index["metadata"] = "@@DEEP@@"
        text = json.dumps(index).replace('"@@DEEP@@"', "[" * depth + "]" * depth)
        return text.encode(), f"index metadata nested {depth} deep"
    if kind == "duplicate-key":
        body = json.dumps(index)
        return (body[:-1] + ', "weight_map": {}}').encode(), "weight_map given twice"
    if kind == "surrogate":
        text = json.dumps(index).replace(json.dumps(name), '"w\\udc00"', 1)
        return text.encode(), f"tensor {name!r} renamed with a lone surrogate"
    if kind == "total-wrong":
        index.setdefault("metadata", {})["total_size"] = rng.choice([0, 1, -5, 10**12])
    elif kind == "total-type":
        index.setdefault("metadata", {})["total_size"] = rng.choice(["12", None, 1.5, [1]])
    elif kind == "missing-shard":
        weight_map[name] = "model-00009-of-00009.safetensors"
    elif kind == "escape-shard":
        weight_map[name] = rng.choice(["../x.safetensors", "/etc/passwd", "", "config.json", "."])
    elif kind == "move-tensor":
        shards = sorted(set(weight_map.values()))
        weight_map[name] = rng.choice(shards)
    elif kind == "extra-tensor":
        weight_map["not/there"] = rng.choice(sorted(set(weight_map.values())))
    elif kind == "drop-tensor":
        del weight_map[name]
    elif kind == "weight-map-type":
        index["weight_map"] = rng.choice([[], "x", None, {name: 3}])
    return json.dumps(index).encode("utf-8", "surrogatepass"), f"index: {kind} ({name})"


# zip archives: local headers, central directory, end record


def _zip_records(data: bytes) -> tuple[list[int], list[int], int]:
    """Offsets of local headers, central directory headers, and the end record (-1: none)."""
    local = [m.start() for m in re.finditer(b"PK\x03\x04", data)]
    central = [m.start() for m in re.finditer(b"PK\x01\x02", data)]
    end = data.rfind(b"PK\x05\x06")
    return local, central, end


def mutate_zip(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    local, central, end = _zip_records(data)
    if not local or not central or end < 0:
        return mutate_generic(rng, data)
    buf = bytearray(data)
    kind = rng.choice(
        [
            "version-needed",
            "method",
            "flags",
            "crc",
            "sizes",
            "name-length",
            "extra-length",
            "local-offset",
            "end-record",
            "central-name",
        ]
    )
    c = rng.choice(central)
    lo = rng.choice(local)

    def put(at: int, fmt: str, value: int) -> None:
        if at + struct.calcsize(fmt) <= len(buf):
            buf[at : at + struct.calcsize(fmt)] = struct.pack(
                fmt, value & (256 ** struct.calcsize(fmt) - 1)
            )

    value: int
    if kind == "version-needed":
        value = rng.choice([63, 99, 0xFF, 0x3FF, 0xFFFF, 46])
        if rng.random() < 0.5:
            put(c + 6, "<H", value)
        else:
            put(lo + 4, "<H", value)
    elif kind == "method":
        value = rng.choice([1, 6, 9, 12, 14, 93, 95, 98, 99, 0xFFFF])
        put(c + 10, "<H", value)
        if rng.random() < 0.5:
            put(lo + 8, "<H", value)
    elif kind == "flags":
        value = rng.choice([0x1, 0x8, 0x40, 0x800, 0x2000, 0xFFFF])
        put(c + 8, "<H", value)
    elif kind == "crc":
        value = rng.randrange(2**32)
        put(c + 16, "<I", value)
        if rng.random() < 0.5:
            put(lo + 14, "<I", value)
    elif kind == "sizes":
        value = rng.choice([0, 1, 2**31, 0xFFFFFFFF, rng.randrange(2**20)])
        put(c + rng.choice([20, 24]), "<I", value)
    elif kind == "name-length":
        value = rng.choice([0, 1, 0xFFFF, rng.randrange(64)])
        put(lo + 26 if rng.random() < 0.5 else c + 28, "<H", value)
    elif kind == "extra-length":
        value = rng.choice([4, 0xFFFF, rng.randrange(64)])
        put(lo + 28 if rng.random() < 0.5 else c + 30, "<H", value)
    elif kind == "local-offset":
        value = rng.choice([0, 1, len(data), 0xFFFFFFFF, rng.randrange(len(data))])
        put(c + 42, "<I", value)
    elif kind == "end-record":
        field_at, fmt = rng.choice([(8, "<H"), (10, "<H"), (12, "<I"), (16, "<I"), (20, "<H")])
        value = rng.choice([0, 1, 0xFFFF, 0xFFFFFFFF, rng.randrange(len(data))])
        put(end + field_at, fmt, value)
    else:  # a member's name in the central directory (name bytes follow the 46-byte record)
        (n,) = struct.unpack("<H", bytes(buf[c + 28 : c + 30]))
        if n:
            at = c + 46 + rng.randrange(n)
            value = rng.choice([0x00, 0x2F, 0xFF, 0x80, 0x2E])
            buf[at] = value
        else:
            value = 0
    return bytes(buf), f"zip {kind} -> {value:#x}"


def fix_crcs(data: bytes) -> bytes:
    """Recompute every stored member's CRC-32 in its local and central headers, so a mutation
    inside a member reaches the parser of what the member holds instead of the zip's check."""
    import io
    import zlib

    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, NotImplementedError, EOFError):
        return data
    buf = bytearray(data)
    central = [m.start() for m in re.finditer(b"PK\x01\x02", data)]
    for info in infos:
        at = info.header_offset
        head = data[at : at + 30]
        if info.compress_type != zipfile.ZIP_STORED or len(head) < 30 or head[:4] != b"PK\x03\x04":
            continue
        name_length, extra_length = struct.unpack("<HH", head[26:30])
        start = at + 30 + name_length + extra_length
        crc = zlib.crc32(data[start : start + info.compress_size])
        buf[at + 14 : at + 18] = struct.pack("<I", crc)
        for c in central:
            if struct.unpack("<I", data[c + 42 : c + 46])[0] == at:
                buf[c + 16 : c + 20] = struct.pack("<I", crc)
    return bytes(buf)


def mutate_member(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """Bytes inside one zip member's data (a .keras config or weights, a torch pickle), zip
    records left as they are: a CRC mismatch, or a damaged inner file if the CRC is also off."""
    try:
        import io

        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = [i for i in archive.infolist() if i.file_size]
    except (zipfile.BadZipFile, ValueError, OSError):
        return mutate_generic(rng, data)
    if not infos:
        return mutate_generic(rng, data)
    info = rng.choice(infos)
    start = info.header_offset + 30
    head = data[info.header_offset + 26 : info.header_offset + 30]
    if len(head) < 4:
        return mutate_generic(rng, data)
    name_length, extra_length = struct.unpack("<HH", head)
    start += name_length + extra_length
    size = info.compress_size
    if size <= 0 or start + size > len(data):
        return mutate_generic(rng, data)
    buf = bytearray(data)
    flips = []
    for _ in range(rng.randint(1, 4)):
        at = start + _pick_position(rng, size, 256)
        buf[at] ^= 1 << rng.randrange(8)
        flips.append(at - start)
    if rng.random() < 0.5:
        return fix_crcs(bytes(buf)), f"member {info.filename!r}: flip bytes at {flips}, CRC fixed"
    return bytes(buf), f"member {info.filename!r}: flip bytes at {flips}"


def mutate_npy(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """Edit one stored member's ``.npy`` header in place (same length, so the zip stays valid
    apart from its CRC, which readers check only when they read the member to its end)."""
    spans = [
        m.span(1) for m in re.finditer(rb"\x93NUMPY..(?:..)?(\{[^\n]*\})", data, flags=re.DOTALL)
    ]
    if not spans:
        return mutate_generic(rng, data)
    begin, end = rng.choice(spans)
    text = bytearray(data[begin:end])
    kind = rng.choice(["bracket", "zero", "descr", "shape", "fortran", "magic", "garbage"])
    if kind == "bracket":
        at = text.find(b"(")
        if at >= 0:
            text[at] = ord(" ")
    elif kind == "zero":
        at = rng.randrange(len(text))
        n = rng.randint(1, len(text) - at)
        text[at : at + n] = bytes(n)
    elif kind in ("descr", "shape", "fortran"):
        replacement = {
            "descr": rng.choice([b"'|O'", b"'<U9'", b"'>f4'", b"'<c8'", b"'V2'", b"'<f9'"]),
            "shape": rng.choice([b"(-1,)", b"(99999999999,)", b"(1.5,)", b"('a',)", b"()"]),
            "fortran": rng.choice([b"True", b"1", b"None"]),
        }[kind]
        key = {"descr": b"'descr': ", "shape": b"'shape': ", "fortran": b"'fortran_order': "}[kind]
        at = text.find(key)
        if at >= 0:
            at += len(key)
            stop = text.find(b", '", at)
            stop = text.find(b"}", at) if stop < 0 else stop
            stop = len(text) if stop < 0 else stop
            new = replacement[: stop - at].ljust(stop - at)
            text[at:stop] = new
    elif kind == "magic":
        prefix_at = begin - 10
        buf = bytearray(data)
        buf[prefix_at + 6] = rng.choice([0, 3, 9, 0xFF])
        return fix_crcs(bytes(buf)), f"npy version byte -> {buf[prefix_at + 6]}"
    else:
        at = rng.randrange(len(text))
        text[at] = rng.choice(b"{}()[]',:\\\x00\xff")
    buf = bytearray(data)
    buf[begin:end] = text
    return fix_crcs(bytes(buf)), f"npy header {kind}: {bytes(text)[:80]!r}"


# HDF5: superblock, object headers, link names


def mutate_hdf5(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    buf = bytearray(data)
    kind = rng.choice(["superblock", "object-header", "heap", "address"])
    if kind == "superblock":
        at = rng.randrange(min(96, len(buf)))
        buf[at] = rng.randrange(256)
        return bytes(buf), f"superblock byte {at} -> {buf[at]:#x}"
    if kind == "object-header":
        marks = [m.start() for m in re.finditer(b"OHDR|TREE|HEAP|SNOD|FRHP|FHDB|BTHD|GCOL", data)]
        if not marks:
            return mutate_generic(rng, data)
        at = rng.choice(marks) + rng.randrange(4, 40)
        if at < len(buf):
            buf[at] = rng.randrange(256)
        return bytes(buf), f"object header byte {at} -> {buf[min(at, len(buf) - 1)]:#x}"
    if kind == "heap":
        marks = [m.start() for m in re.finditer(b"HEAP", data)]
        if not marks:
            return mutate_generic(rng, data)
        at = rng.choice(marks) + rng.randrange(8, 64)
        if at < len(buf):
            buf[at] ^= 1 << rng.randrange(8)
        return bytes(buf), f"local heap bit flip at {at}"
    # an 8-byte address somewhere in the metadata pointed elsewhere
    at = rng.randrange(min(4096, max(8, len(buf) - 8)))
    value = rng.choice([0, 2**63, 2**64 - 1, len(data) * 4, rng.randrange(len(data))])
    buf[at : at + 8] = struct.pack("<Q", value)
    return bytes(buf), f"8-byte field at {at} -> {value:#x}"


def mutate_hdf5_names(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """A link name (HDF5 stores them as raw bytes) replaced by invalid UTF-8 of the same
    length, so the file stays structurally valid."""
    names = [b"kernel", b"bias", b"vars", b"layers", b"dense", b"optimizer", b"model_weights"]
    present = [n for n in names if n in data]
    if not present:
        return mutate_generic(rng, data)
    name = rng.choice(present)
    spots = [m.start() for m in re.finditer(re.escape(name), data)]
    at = rng.choice(spots)
    junk = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"])
    new = (junk * len(name))[: len(name)]
    buf = bytearray(data)
    buf[at : at + len(name)] = new
    return bytes(buf), f"name {name.decode()!r} at {at} -> {new!r}"


def mutate_inner_hdf5(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """HDF5 mutations of the weights file stored inside a .keras archive, CRCs fixed."""
    start = data.find(b"\x89HDF\r\n\x1a\n")
    if start < 0:
        return mutate_generic(rng, data)
    end = data.find(b"PK\x03\x04", start)
    end = len(data) if end < 0 else end
    inner = data[start:end]
    mutate = rng.choice([mutate_hdf5, mutate_hdf5_names])
    changed, what = mutate(rng, inner)
    changed = changed[: len(inner)].ljust(len(inner), b"\0")  # same length: the zip stays valid
    return fix_crcs(data[:start] + changed + data[end:]), f"weights member: {what}, CRC fixed"


MUTATORS: dict[str, Callable[[random.Random, bytes], tuple[bytes, str]]] = {
    "generic": mutate_generic,
    "header": mutate_generic,  # a generic mutation, applied to a header file (see below)
    "safetensors": mutate_safetensors,
    "index": mutate_index,
    "zip": mutate_zip,
    "member": mutate_member,
    "npy": mutate_npy,
    "hdf5": mutate_hdf5,
    "hdf5-names": mutate_hdf5_names,
    "inner-hdf5": mutate_inner_hdf5,
}

_OPTION_SETS: tuple[tuple[str, ...], ...] = (
    ("--decay", "0.9"),
    ("--decay", "0.99", "--num-updates", "step"),
    ("--decay", "0.5", "--zero-debias"),
    ("--decay", "0.9", "--names", "shadow"),
    ("--mean",),
    ("--decay", "0.9", "--json"),
    ("--decay", "0.9", "--precision", "native"),
    ("--decay", "0.9", "--mean"),
    ("--decay", "0.9", "--hash"),
)

# ---------------------------------------------------------------- cases


@dataclass
class Case:
    seed: int
    index: int
    family: str
    folder: Path
    args: list[str]
    mutations: list[str] = field(default_factory=list)
    mutant: str = ""

    @property
    def out(self) -> Path:
        return self.folder / "out"

    @property
    def run(self) -> Path:
        return self.folder / "run"

    def describe(self) -> str:
        return f"case {self.index} ({self.family}, {self.mutant}: {'; '.join(self.mutations)})"

    def reproducer(self) -> str:
        return f"python -m tests.fuzz --seed {self.seed} --case {self.index} --keep DIR"


class Seeds:
    """Valid runs of every family, built once per campaign, plus an earlier output of each
    (family, output suffix), which cases put in place before they run."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def run(self, family: Family) -> Path:
        folder = self.folder / family.name / "run"
        if not folder.is_dir():
            staging = folder.with_name("run.building")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            family.build(staging)
            staging.rename(folder)
        return folder


def _case_rng(seed: int, index: int) -> random.Random:
    return random.Random(f"ema-cli fuzz {seed} {index}")


def make_case(seed: int, index: int, seeds: Seeds, folder: Path, families: Sequence[str]) -> Case:
    """Case ``index`` of campaign ``seed``: a function of those two numbers alone."""
    rng = _case_rng(seed, index)
    family = FAMILIES[rng.choice(list(families))]
    case = Case(seed, index, family.name, folder, [])
    shutil.copytree(seeds.run(family), case.run, symlinks=True)
    case.out.mkdir()
    checkpoint = rng.choice(family.checkpoints)
    files = family.files(case.run, checkpoint)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        mutator = rng.choice(family.mutators)
        if mutator == "header":  # the file holding the header: index, json, first shard
            target = min(files, key=lambda p: (p.suffix not in (".index", ".json"), p.name))
        elif mutator == "index":
            target = next((p for p in files if p.name.endswith(".index.json")), files[0])
        elif mutator == "safetensors":
            shards = [p for p in files if p.suffix == ".safetensors"]
            target = rng.choice(shards) if shards else files[0]
        else:
            target = rng.choice(files)
        original = target.read_bytes()
        try:
            data, what = MUTATORS[mutator](rng, original)
        except Exception as e:  # a mutator meeting what an earlier one made: fall back
            data, what = mutate_generic(rng, original)
            what += f" ({mutator} failed: {type(e).__name__})"
        target.write_bytes(data)
        case.mutant = str(target.relative_to(case.run))
        case.mutations.append(f"{mutator}: {what}")
    suffix = rng.choice(family.outputs)
    output = case.out / f"ema{suffix}"
    options = list(rng.choice(_OPTION_SETS))
    order = list(family.checkpoints)
    if rng.random() < 0.2:
        order = [checkpoint]  # the mutant alone
    case.args = [
        "average",
        *(str(case.run / c) for c in order),
        "-o",
        str(output),
        "-q",
        *options,
    ]
    # An earlier output in place (any bytes: a failed run must leave them as they are).
    earlier = rng.random() < 0.7
    if earlier:
        if suffix == "":
            output.mkdir()
            (output / "model.safetensors").write_bytes(b"earlier output")
        else:
            output.write_bytes(b"earlier output " + suffix.encode())
        mapping = output.with_name("ema.mapping.json")
        mapping.write_text('{"earlier": true}\n')
    return case


def _tree_digest(folder: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            found[key] = "link:" + os.readlink(path)
        elif path.is_file():
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[key] = "<dir>"
    return found


_LEFTOVER = re.compile(r"^\..*(\.tmp|\.lock|\.publishing|\.tmp-[0-9a-f]{8})$")


@dataclass
class Outcome:
    status: int | None  # None: killed after the time limit
    stdout: str
    stderr: str
    seconds: float
    crashed: str = ""


def check(
    case: Case, outcome: Outcome, before_in: dict[str, str], before_out: dict[str, str]
) -> list[str]:
    """What this outcome broke of the contract (empty: nothing)."""
    problems: list[str] = []
    err = outcome.stderr
    if outcome.crashed:
        problems.append(outcome.crashed)
    elif outcome.status is None:
        problems.append(f"hang: still running after {CASE_TIMEOUT_SECONDS:.0f} s")
    elif outcome.status not in (0, 2):
        problems.append(f"exit {outcome.status}")
    if "Traceback" in err or "Exception ignored" in err:
        problems.append("a traceback on stderr")
    lines = err.splitlines()
    if outcome.status == 2 and (len(lines) != 1 or not lines[0].startswith("ema-cli: error: ")):
        problems.append(f"exit 2 with {len(lines)} lines on stderr, not one 'ema-cli: error:'")
    after_in = _tree_digest(case.run)
    if after_in != before_in:
        changed = sorted(
            k for k in set(after_in) | set(before_in) if after_in.get(k) != before_in.get(k)
        )
        problems.append(f"inputs changed: {changed[:5]}")
    after_out = _tree_digest(case.out)
    if outcome.status != 0 and after_out != before_out:
        changed = sorted(
            k for k in set(after_out) | set(before_out) if after_out.get(k) != before_out.get(k)
        )
        problems.append(f"a failed run changed the output folder: {changed[:5]}")
    leftovers = [k for k in after_out if _LEFTOVER.match(Path(k).name)]
    if leftovers and outcome.status is not None and not outcome.crashed:
        problems.append(f"left behind: {leftovers[:5]}")
    if problems:
        detail = err.strip().replace("\n", " | ")[:600]
        problems = [f"{p} [stderr: {detail}]" for p in problems]
    return problems


# ---------------------------------------------------------------- running


class Worker:
    """A process running ema-cli cases in-process, one at a time, restarted when it hangs or
    crashes. Requests and replies are JSON lines on its standard input and a saved copy of its
    standard output; fds 1 and 2 are pointed at each case's files."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None

    def _start(self) -> subprocess.Popen[bytes]:
        if self._process is not None and self._process.poll() is not None:
            self.close()  # died since the last case: its pipes go with it
        if self._process is None:
            env = dict(os.environ, EMA_CLI_DEBUG="", PYTHONFAULTHANDLER="")
            env.pop("EMA_CLI_DEBUG")
            self._process = subprocess.Popen(
                [sys.executable, "-c", _WORKER_SOURCE, str(WORKER_MEMORY_BYTES)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
                cwd=str(Path(__file__).resolve().parents[1]),
            )
        return self._process

    def run(self, args: list[str], folder: Path) -> Outcome:
        process = self._start()
        out, err = folder / "stdout.txt", folder / "stderr.txt"
        request = {"args": args, "stdout": str(out), "stderr": str(err)}
        assert process.stdin is not None and process.stdout is not None
        began = time.monotonic()
        process.stdin.write(json.dumps(request).encode() + b"\n")
        process.stdin.flush()
        ready, _, _ = select.select([process.stdout], [], [], CASE_TIMEOUT_SECONDS)
        seconds = time.monotonic() - began
        status: int | None
        crashed = ""
        if not ready:
            process.kill()
            process.wait()
            self.close()
            status = None
        else:
            line = process.stdout.readline()
            if line:
                status = int(json.loads(line)["status"])
            else:
                code = process.wait()
                self.close()
                status = code
                crashed = f"the process died ({_signal_name(code)})"
        return Outcome(status, _read(out), _read(err), seconds, crashed)

    def close(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            assert process.stdin is not None
            process.stdin.close()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()


def _signal_name(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit {code}"


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def run_isolated(args: list[str], folder: Path) -> Outcome:
    """One case as its own ``python -m ema_cli`` process."""
    began = time.monotonic()
    env = {k: v for k, v in os.environ.items() if k != "EMA_CLI_DEBUG"}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "ema_cli", *args],
            capture_output=True,
            timeout=CASE_TIMEOUT_SECONDS,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as e:
        return Outcome(None, "", (e.stderr or b"").decode("utf-8", "replace"), CASE_TIMEOUT_SECONDS)
    code = done.returncode
    crashed = f"the process died ({_signal_name(code)})" if code < 0 else ""
    return Outcome(
        code,
        done.stdout.decode("utf-8", "replace"),
        done.stderr.decode("utf-8", "replace"),
        time.monotonic() - began,
        crashed,
    )


_WORKER_SOURCE = r"""
import ctypes, json, os, resource, signal, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:  # die with the campaign: a worker stuck in a case must not outlive a killed run (Linux)
    ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
replies = os.fdopen(os.dup(1), "w")
requests = os.fdopen(os.dup(0), "r")
saved = [os.dup(1), os.dup(2)]
devnull = os.open(os.devnull, os.O_RDONLY)
os.dup2(devnull, 0)
from ema_cli.cli import cli
for line in requests:
    request = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1); os.dup2(err, 2); os.close(out); os.close(err)
    try:
        cli.main(args=request["args"], prog_name="ema-cli")
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback
        traceback.print_exc()
        status = 1
    sys.stdout.flush(); sys.stderr.flush()
    os.dup2(saved[0], 1); os.dup2(saved[1], 2)
    replies.write(json.dumps({"status": status}) + "\n"); replies.flush()
"""


@dataclass
class Finding:
    case: Case
    problems: list[str]
    outcome: Outcome

    def __str__(self) -> str:
        lines = [self.case.describe(), *("  " + p for p in self.problems)]
        lines.append("  args: " + " ".join(self.case.args))
        lines.append("  rebuild: " + self.case.reproducer())
        return "\n".join(lines)


@dataclass
class Campaign:
    findings: list[Finding] = field(default_factory=list)
    statuses: dict[str, dict[int, int]] = field(default_factory=dict)
    cases: int = 0
    seconds: float = 0.0
    #: the slowest cases, (seconds, description), slowest first
    slowest: list[tuple[float, str]] = field(default_factory=list)

    def summary(self) -> str:
        parts = [
            f"{name}: " + ", ".join(f"exit {s} x{n}" for s, n in sorted(counts.items(), key=str))
            for name, counts in sorted(self.statuses.items())
        ]
        slow = [f"{t:.1f} s: {what}" for t, what in self.slowest]
        return (
            f"{self.cases} cases in {self.seconds:.1f} s, {len(self.findings)} findings\n  "
            + "\n  ".join(parts)
            + ("\n  slowest: " + "\n           ".join(slow) if slow else "")
        )


def run_campaign(
    seed: int,
    cases: int | Sequence[int],
    workdir: Path,
    families: Sequence[str] = tuple(FAMILIES),
    isolated: bool = False,
    keep: bool = False,
    log: Callable[[str], None] | None = None,
) -> Campaign:
    """Run cases ``range(cases)`` (or the given indexes) of campaign ``seed`` in ``workdir``."""
    seeds = Seeds(workdir / "seeds")
    campaign = Campaign()
    began = time.monotonic()
    indexes: Iterator[int] = iter(range(cases)) if isinstance(cases, int) else iter(cases)
    worker = None if isolated else Worker()
    try:
        for index in indexes:
            folder = workdir / f"case-{index}"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            case = make_case(seed, index, seeds, folder, families)
            before_in, before_out = _tree_digest(case.run), _tree_digest(case.out)
            if worker is None:
                outcome = run_isolated(case.args, folder)
            else:
                outcome = worker.run(case.args, folder)
            problems = check(case, outcome, before_in, before_out)
            counts = campaign.statuses.setdefault(case.family, {})
            key = -1 if outcome.status is None else outcome.status
            counts[key] = counts.get(key, 0) + 1
            campaign.cases += 1
            campaign.slowest.append((outcome.seconds, case.describe()[:160]))
            campaign.slowest = sorted(campaign.slowest, reverse=True)[:3]
            if problems:
                finding = Finding(case, problems, outcome)
                campaign.findings.append(finding)
                if log is not None:
                    log(str(finding))
            elif not keep:
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        if worker is not None:
            worker.close()
    campaign.seconds = time.monotonic() - began
    return campaign


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fuzz", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seed", type=int, required=True, help="the campaign's seed")
    parser.add_argument("--cases", type=int, default=500, help="how many cases (default 500)")
    parser.add_argument("--case", type=int, action="append", help="run only case K (repeatable)")
    parser.add_argument(
        "--format",
        action="append",
        choices=sorted(FAMILIES),
        help="only these input formats (repeatable)",
    )
    parser.add_argument("--isolated", action="store_true", help="one ema-cli process per case")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep every case in it")
    args = parser.parse_args(argv)
    families = tuple(args.format or FAMILIES)
    cases: int | list[int] = args.case if args.case else args.cases
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        workdir = args.keep
        campaign = run_campaign(args.seed, cases, workdir, families, args.isolated, True, print)
    else:
        with tempfile.TemporaryDirectory(prefix="ema-cli-fuzz-") as tmp:
            campaign = run_campaign(
                args.seed, cases, Path(tmp), families, args.isolated, False, print
            )
    print(campaign.summary())
    return 1 if campaign.findings else 0


if __name__ == "__main__":
    sys.exit(main())
