"""The naive numpy peer of docs/performance.md: what a user writes by hand.

Each checkpoint is loaded whole with ``safetensors.numpy.load_file`` (every shard of a sharded
checkpoint), a dict of float32 shadows is updated in place with TF's arithmetic
(``s -= (s - x) * c``, ``c = float32(1) - float32(decay)``) and the shadows are saved at the end in
each tensor's own dtype. Non-float tensors are copied from the last checkpoint, as ema-cli does.

    python naive_peer.py -o OUT.safetensors --decay D CKPT...

A CKPT is a .safetensors file or a sharded folder (model.safetensors.index.json). Run as a
subprocess by run.py, which measures its wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import ml_dtypes
import numpy as np
import safetensors.numpy
from safetensors.numpy import load_file, save_file

# safetensors' numpy loader knows no bfloat16; this one line is the usual fix.
safetensors.numpy._TYPES.setdefault("BF16", ml_dtypes.bfloat16)

FLOATS = ("float16", "bfloat16", "float32", "float64")


def checkpoint_files(path: Path) -> list[Path]:
    if not path.is_dir():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    return sorted(path.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("-o", "--output", required=True, type=Path)
    parser.add_argument("--decay", required=True, type=float)
    args = parser.parse_args()

    c = np.float32(1) - np.float32(args.decay)
    shadows: dict[str, np.ndarray] = {}
    last: dict[str, np.ndarray] = {}
    for checkpoint in args.checkpoints:
        tensors: dict[str, np.ndarray] = {}
        for file in checkpoint_files(checkpoint):
            tensors.update(load_file(file))
        for name, x in tensors.items():
            if x.dtype.name not in FLOATS:
                continue
            s = shadows.get(name)
            if s is None:
                work = np.float64 if x.dtype == np.float64 else np.float32
                shadows[name] = s = x.astype(work)  # a copy: TF's shadow starts at the value
            s -= (s - x.astype(s.dtype, copy=False)) * s.dtype.type(c)
        last = tensors
    out = {
        name: shadows[name].astype(x.dtype, copy=False) if name in shadows else x
        for name, x in last.items()
    }
    save_file(out, args.output, metadata={"format": "pt"})


if __name__ == "__main__":
    main()
