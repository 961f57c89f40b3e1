"""Train a tiny classifier with plain numpy and save a checkpoint every few steps.

The problem: points drawn uniformly from the square [-1, 1]^2 in three classes split by two
parabolas (class 0 below ``x2 = x1**2 - 0.5``, class 2 above ``x2 = 0.6 - x1**2 / 2``, class 1 in
between), with 10% of the labels replaced by a random class. The model: a 2-layer ReLU MLP
(``dense`` -> ReLU -> ``output``, 2 -> 32 -> 3), Glorot-uniform initialised, trained with plain SGD
(batches of 8, constant learning rate 0.2) on the squared error against one-hot targets. Small
batches and a large step size keep the weights jittering around a good solution instead of
settling, which is exactly the situation a moving average of the weights is for.

Every 250 of the 3000 steps the weights are saved as ``ckpt-<step>.safetensors``. Step numbers are
not zero-padded, so as text ``ckpt-250`` sorts after ``ckpt-1000``; ``ema-cli`` orders by number.
Each checkpoint holds float32 tensors ``dense/kernel``, ``dense/bias``, ``output/kernel`` and
``output/bias`` plus an int64 scalar ``global_step``.

Rerunning writes byte-identical files. To keep that true across machines the script avoids
everything whose last bit may depend on the CPU or the BLAS build: random numbers come only from
uniform draws, matrix products are explicit elementwise products summed in a fixed order (not
``@``, whose summation order depends on the BLAS kernel), and the loss needs no ``exp``/``tanh``.

    python examples/make_checkpoints.py                 # writes examples/checkpoints/
    python examples/make_checkpoints.py --out /tmp/ckpts
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

SEED = 0
N_CLASSES = 3
N_INPUTS = 2
N_HIDDEN = 32
LABEL_NOISE = 0.1  # fraction of labels replaced by a random class
N_TRAIN = 1000
N_TEST = 5000
STEPS = 3000
EVERY = 250
BATCH = 8
LEARNING_RATE = 0.2

DEFAULT_OUT = Path(__file__).resolve().parent / "checkpoints"
PARAM_NAMES = ("dense/kernel", "dense/bias", "output/kernel", "output/bias")


def make_data(split: str, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Points and integer labels for ``split`` ("train" or "test"), each from its own seed."""
    seed = {"train": SEED, "test": SEED + 1}[split]
    if n is None:
        n = N_TRAIN if split == "train" else N_TEST
    rng = np.random.Generator(np.random.PCG64(seed))
    x = rng.random((n, N_INPUTS)) * 2.0 - 1.0
    x1, x2 = x[:, 0], x[:, 1]
    y = np.where(x2 < x1 * x1 - 0.5, 0, np.where(x2 > 0.6 - x1 * x1 / 2, 2, 1))
    flip = rng.random(n) < LABEL_NOISE
    y = np.where(flip, rng.integers(0, N_CLASSES, n), y)
    return x, y.astype(np.int64)


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` summed in a fixed order, so the result does not depend on the BLAS build."""
    return (a[:, :, None] * b[None, :, :]).sum(axis=1)


def init_params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Glorot-uniform kernels and zero biases, in float64 (saved as float32)."""

    def glorot(fan_in: int, fan_out: int) -> np.ndarray:
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        return (rng.random((fan_in, fan_out)) * 2.0 - 1.0) * limit

    return {
        "dense/kernel": glorot(N_INPUTS, N_HIDDEN),
        "dense/bias": np.zeros(N_HIDDEN),
        "output/kernel": glorot(N_HIDDEN, N_CLASSES),
        "output/bias": np.zeros(N_CLASSES),
    }


def forward(params: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hidden activations and output scores of the MLP."""
    h = np.maximum(matmul(x, params["dense/kernel"]) + params["dense/bias"], 0.0)
    return h, matmul(h, params["output/kernel"]) + params["output/bias"]


def loss_and_accuracy(
    params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray
) -> tuple[float, float]:
    """Mean squared error against one-hot targets (the training loss) and accuracy."""
    params = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    _, scores = forward(params, x)
    target = np.eye(N_CLASSES)[y]
    loss = float(((scores - target) ** 2).sum(axis=1).mean())
    accuracy = float((scores.argmax(axis=1) == y).mean())
    return loss, accuracy


def sgd_step(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, lr: float) -> None:
    """One SGD step on the mean squared error of a batch, in place."""
    h, scores = forward(params, x)
    d_scores = 2.0 * (scores - np.eye(N_CLASSES)[y]) / len(x)
    d_h = matmul(d_scores, params["output/kernel"].T) * (h > 0)
    grads = {
        "output/kernel": matmul(h.T, d_scores),
        "output/bias": d_scores.sum(axis=0),
        "dense/kernel": matmul(x.T, d_h),
        "dense/bias": d_h.sum(axis=0),
    }
    for name, grad in grads.items():
        params[name] -= lr * grad


def checkpoint(params: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
    tensors = {name: params[name].astype(np.float32) for name in PARAM_NAMES}
    tensors["global_step"] = np.array(step, dtype=np.int64)
    return tensors


def train(
    steps: int = STEPS, every: int = EVERY, lr: float = LEARNING_RATE, batch: int = BATCH
) -> dict[int, dict[str, np.ndarray]]:
    """Train and return ``{step: checkpoint tensors}`` for every saved step."""
    x, y = make_data("train")
    rng = np.random.Generator(np.random.PCG64(SEED + 100))
    params = init_params(rng)
    saved = {}
    for step in range(1, steps + 1):
        idx = rng.integers(0, len(x), batch)
        sgd_step(params, x[idx], y[idx], lr)
        if step % every == 0:
            saved[step] = checkpoint(params, step)
    return saved


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for step, tensors in train().items():
        path = args.out / f"ckpt-{step}.safetensors"
        save_file(tensors, str(path), metadata={"format": "pt"})
        print(path)


if __name__ == "__main__":
    main()
