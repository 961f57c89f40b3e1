"""Score checkpoints of the example model on held-out data.

Loads each checkpoint (one written by ``make_checkpoints.py``, or the output of ``ema-cli average``)
and prints its loss (mean squared error against one-hot targets, the training loss) and accuracy
on 5000 held-out points drawn from the same seeded problem as the training data.

    python examples/evaluate.py examples/checkpoints/ckpt-3000.safetensors averaged.safetensors
    python examples/evaluate.py examples/checkpoints/*.safetensors averaged.safetensors

A checkpoint written with ``--names shadow`` works too: a weight missing under its own name is
looked up under its shadow name (``dense/kernel/ExponentialMovingAverage``).
"""

from __future__ import annotations

import argparse
import importlib.util
from functools import cache
from pathlib import Path
from types import ModuleType

import numpy as np
from safetensors.numpy import load_file

HERE = Path(__file__).resolve().parent
EMA_NAME = "ExponentialMovingAverage"


def _load_problem() -> ModuleType:
    """``make_checkpoints.py`` beside this file (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("make_checkpoints", HERE / "make_checkpoints.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


problem = _load_problem()


@cache
def _test_set() -> tuple[np.ndarray, np.ndarray]:
    return problem.make_data("test")


def load_params(path: str | Path) -> dict[str, np.ndarray]:
    """The model's weights from a checkpoint, under their own or their shadow names."""
    tensors = load_file(str(path))
    params = {}
    for name in problem.PARAM_NAMES:
        for key in (name, f"{name}/{EMA_NAME}"):
            if key in tensors:
                params[name] = tensors[key]
                break
        else:
            raise KeyError(f"{path}: no tensor {name!r} (nor {name}/{EMA_NAME})")
    return params


def evaluate(path: str | Path) -> tuple[float, float]:
    """``(loss, accuracy)`` of the checkpoint at ``path`` on the held-out set."""
    x, y = _test_set()
    return problem.loss_and_accuracy(load_params(path), x, y)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path, metavar="CHECKPOINT")
    args = parser.parse_args(argv)
    width = max(len(str(p)) for p in args.checkpoints)
    print(f"{'checkpoint':<{width}}  {'loss':>7}  {'accuracy':>8}")
    for path in args.checkpoints:
        loss, accuracy = evaluate(path)
        print(f"{path!s:<{width}}  {loss:7.4f}  {accuracy:8.2%}")


if __name__ == "__main__":
    main()
