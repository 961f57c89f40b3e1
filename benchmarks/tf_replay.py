"""The TensorFlow column of docs/performance.md: the replay through tf.train.ExponentialMovingAverage.

Each checkpoint is loaded whole (safetensors.numpy), assigned to tf.Variables and folded in with
one ``ema.apply()``; the averages are saved at the end. Non-float tensors are copied from the
last checkpoint. Needs a Python with TensorFlow (run.py uses /tmp/tfvenv/bin/python by default);
TensorFlow is never a dependency of ema-cli.

    python tf_replay.py -o OUT.safetensors --decay D CKPT...
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ml_dtypes
import numpy as np
import safetensors.numpy
import tensorflow as tf
from naive_peer import FLOATS, checkpoint_files
from safetensors.numpy import load_file, save_file

safetensors.numpy._TYPES.setdefault("BF16", ml_dtypes.bfloat16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("-o", "--output", required=True, type=Path)
    parser.add_argument("--decay", required=True, type=float)
    args = parser.parse_args()

    ema = tf.train.ExponentialMovingAverage(args.decay)
    variables: dict[str, tf.Variable] = {}
    last: dict[str, np.ndarray] = {}
    for checkpoint in args.checkpoints:
        tensors: dict[str, np.ndarray] = {}
        for file in checkpoint_files(checkpoint):
            tensors.update(load_file(file))
        floats = {name: x for name, x in tensors.items() if x.dtype.name in FLOATS}
        if not variables:
            variables = {
                name: tf.Variable(x, name=name.replace(".", "_")) for name, x in floats.items()
            }
        else:
            for name, x in floats.items():
                variables[name].assign(x)
        ema.apply(list(variables.values()))
        last = tensors
    out = {
        name: ema.average(variables[name]).numpy() if name in variables else x
        for name, x in last.items()
    }
    save_file(out, args.output, metadata={"format": "pt"})


if __name__ == "__main__":
    main()
