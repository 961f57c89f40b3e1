"""Issue 11's done-when, on TensorFlow runs made afresh (not the committed fixtures).

Run in a scratch venv with ``tensorflow-cpu`` and ema-cli installed (never a dependency)::

    /tmp/tfvenv/bin/python tests/golden/check_tf_runs.py [--seed N] [--steps K]

1. A Keras 3 model (Conv2D, BatchNormalization, Dense) trained with Adam in a custom loop and
   saved by ``tf.train.CheckpointManager`` after every step, beside TF's own
   ``ExponentialMovingAverage(0.9, num_updates=step)``: ``ema-cli average ... --decay 0.9
   --num-updates step -o ema.index`` must restore with ``tf.train.Checkpoint(model=...,
   optimizer=...)`` with every model variable bit-equal to TF's shadow and the optimizer's
   variables equal to the last checkpoint's; prefixes and ``.index`` names give the same bytes.
2. A TF1 graph with float32, float16 and bfloat16 variables saved by a ``Saver`` of the
   variables only: ``--names shadow --precision native`` restores with
   ``Saver(ema.variables_to_restore())`` holding exactly TF's shadows.
3. ``--mean``: the output's variables equal an independent float64 mean, rounded once.

Prints one line per check and exits 1 on the first failure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import keras
import numpy as np
import tensorflow as tf


def ema_cli(*args: object) -> None:
    command = [sys.executable, "-m", "ema_cli", "average", *map(str, args), "-q"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"FAILED: {' '.join(command)}\n{done.stderr}")


def check(ok: bool, what: str) -> None:
    print(("ok    " if ok else "FAIL  ") + what)
    if not ok:
        sys.exit(1)


def build(seed: int) -> tuple[keras.Model, keras.optimizers.Optimizer]:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((7, 7, 2)),
            keras.layers.Conv2D(3, 3, name="conv"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.Flatten(),
            keras.layers.Dense(4, name="dense"),
        ]
    )
    return model, keras.optimizers.Adam(learning_rate=0.02)


def keras_run(folder: Path, seed: int, steps: int) -> None:
    model, opt = build(seed)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((16, 7, 7, 2)).astype(np.float32)
    y = rng.standard_normal((16, 4)).astype(np.float32)
    ckpt = tf.train.Checkpoint(model=model, optimizer=opt)
    manager = tf.train.CheckpointManager(ckpt, str(folder / "run"), max_to_keep=None)
    step = tf.Variable(0, dtype=tf.int64, trainable=False)
    ema = tf.train.ExponentialMovingAverage(decay=0.9, num_updates=step)
    variables = [v.value for v in model.variables]
    for k in range(1, steps + 1):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x, training=True) - y) ** 2)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        manager.save(checkpoint_number=k)
        step.assign(k)
        ema.apply(variables)
    shadows = [ema.average(v).numpy() for v in variables]
    last_optimizer = [v.numpy() for v in opt.variables]

    indexes = [folder / "run" / f"ckpt-{k}.index" for k in range(1, steps + 1)]
    out = folder / "ema.index"
    ema_cli(*indexes, "-o", out, "--decay", "0.9", "--num-updates", "step")
    ema_cli(*[i.with_suffix("") for i in indexes], "-o", folder / "p.index", "--decay", "0.9",
            "--num-updates", "step")  # fmt: skip
    same = all(
        (folder / f"ema{s}").read_bytes() == (folder / f"p{s}").read_bytes()
        for s in (".index", ".data-00000-of-00001")
    )
    check(same, "CheckpointManager run: prefixes and .index names give the same bytes")

    fresh_model, fresh_opt = build(seed + 1)  # other initial values
    fresh_opt.build(fresh_model.trainable_variables)
    restore = tf.train.Checkpoint(model=fresh_model, optimizer=fresh_opt)
    restore.restore(str(out.with_suffix(""))).assert_existing_objects_matched()
    check(
        all(
            v.numpy().tobytes() == s.tobytes()
            for v, s in zip(fresh_model.variables, shadows, strict=True)
        ),
        f"CheckpointManager run ({steps} steps): every model variable is TF's shadow, bitwise",
    )
    check(
        all(
            v.numpy().tobytes() == w.tobytes()
            for v, w in zip(fresh_opt.variables, last_optimizer, strict=True)
        ),
        "CheckpointManager run: the optimizer's variables are the last checkpoint's",
    )

    mean_out = folder / "mean.index"
    ema_cli(*indexes, "-o", mean_out, "--mean")
    reader = tf.train.load_checkpoint(str(mean_out.with_suffix("")))
    inputs = [tf.train.load_checkpoint(str(i.with_suffix(""))) for i in indexes]
    model_keys = sorted(json.loads((folder / "mean.mapping.json").read_text())["mapping"])
    ok = len(model_keys) == len(variables)  # the model's variables, wherever the graph puts them
    for key in model_keys:
        exact = np.mean(np.stack([r.get_tensor(key).astype(np.float64) for r in inputs]), axis=0)
        ok &= np.array_equal(reader.get_tensor(key), exact.astype(np.float32))
    check(ok, f"--mean: {len(model_keys)} model variables are the float64 mean, rounded once")


def tf1_run(folder: Path, seed: int, steps: int) -> None:
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.set_random_seed(seed)
        rng = np.random.default_rng(seed)
        v32 = tf.compat.v1.get_variable(
            "layer/kernel", initializer=tf.constant(rng.standard_normal((4, 5)).astype(np.float32))
        )
        v16 = tf.compat.v1.get_variable(
            "layer/bias", initializer=tf.constant(rng.standard_normal(5).astype(np.float16))
        )
        vbf = tf.compat.v1.get_variable(
            "embed/table",
            initializer=tf.cast(
                tf.constant(rng.standard_normal((3, 2)).astype(np.float32)), tf.bfloat16
            ),
        )
        step = tf.compat.v1.train.get_or_create_global_step()
        variables = (v32, v16, vbf)
        noise = [
            tf.cast(tf.random.normal(v.shape, seed=i), v.dtype) for i, v in enumerate(variables)
        ]
        update = tf.group(*(v.assign_add(n) for v, n in zip(variables, noise, strict=True)))
        increment = step.assign_add(1)
        ema = tf.compat.v1.train.ExponentialMovingAverage(0.9, num_updates=step)
        ema_op = ema.apply(list(variables))
        saver = tf.compat.v1.train.Saver(var_list=[*variables, step], max_to_keep=None)
        prefixes = []
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            prefixes.append(saver.save(sess, str(folder / "tf1" / "model.ckpt"), global_step=0))
            for _ in range(steps):
                sess.run(update)
                sess.run(increment)
                sess.run(ema_op)
                k = int(sess.run(step))
                prefixes.append(saver.save(sess, str(folder / "tf1" / "model.ckpt"), global_step=k))
            shadows = {v.op.name: sess.run(ema.average(v)) for v in variables}
        names = ema.variables_to_restore()
    out = folder / "tf1-ema.index"
    ema_cli(*prefixes, "-o", out, "--decay", "0.9", "--num-updates", "step", "--names", "shadow",
            "--precision", "native")  # fmt: skip
    keys = set(tf.train.load_checkpoint(str(out.with_suffix(""))).get_variable_to_shape_map())
    check(
        keys == set(names),
        f"TF1 Saver run: the output's keys are variables_to_restore()'s ({sorted(keys)})",
    )
    restore_graph = tf.Graph()
    with restore_graph.as_default():
        fresh = {
            "layer/kernel": tf.compat.v1.get_variable("layer/kernel", (4, 5), tf.float32),
            "layer/bias": tf.compat.v1.get_variable("layer/bias", (5,), tf.float16),
            "embed/table": tf.compat.v1.get_variable("embed/table", (3, 2), tf.bfloat16),
        }
        tf.compat.v1.train.get_or_create_global_step()
        restorer = tf.compat.v1.train.Saver(
            tf.compat.v1.train.ExponentialMovingAverage(0.9).variables_to_restore()
        )
        with tf.compat.v1.Session(graph=restore_graph) as sess:
            restorer.restore(sess, str(out.with_suffix("")))
            got = {name: sess.run(v) for name, v in fresh.items()}
    for name, value in got.items():
        check(
            value.dtype == shadows[name].dtype and value.tobytes() == shadows[name].tobytes(),
            f"TF1 Saver run: Saver(variables_to_restore()) restores TF's {value.dtype} shadow of {name}",
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=20261202)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, seed {args.seed}")
    with tempfile.TemporaryDirectory() as tmp:
        keras_run(Path(tmp), args.seed, args.steps)
        tf1_run(Path(tmp), args.seed, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
