"""Random cases through TensorFlow and the real ``ema-cli average``; report every mismatch.

For maintainers, not CI: it needs TensorFlow, which the project never depends on. Run it with the
Python of a scratch environment that has ``tensorflow-cpu``, ``safetensors`` and ``ml-dtypes``,
pointing it at an installed ``ema-cli`` (any environment)::

    /tmp/tfvenv/bin/python tests/golden/check_against_tf.py -n 300 --cli /tmp/dev/bin/ema-cli
    /tmp/tfvenv/bin/python tests/golden/check_against_tf.py --cli "/tmp/dev/bin/python -m ema_cli"
    /tmp/tfvenv/bin/python tests/golden/check_against_tf.py --seed 7 --only 41 --keep /tmp/case41

Each case draws tensors (shapes, names with '/' and '.', dtypes), checkpoint steps, a decay, a
``num_updates`` mode, zero debias, the precision, an EMA name and the output names; computes TF's
shadows (``make_golden.tf_ema``, graph mode); writes ``ckpt-<step>.safetensors`` files; runs
``ema-cli average`` as a subprocess; and compares: bitwise (zero debias too, unless
``--zero-debias-ulps`` allows more), bfloat16 NaNs by position (see ``golden_cases.py``). The mapping file must hold TF's ``average_name`` for every
tensor. Case ``i`` of seed ``s`` is the same on every run, so ``--only i`` reproduces one.

Subnormals: TF's kernels flush them to zero (FTZ+DAZ, see ``golden_cases.py``), and so must the
CLI. One tensor in ten is drawn around the smallest normal number (``--no-subnormals``: none).
Every mismatch is also checked against a small numpy model of TF's arithmetic, with and without
flush-to-zero; the report says when only the flushing model reproduces TF (the CLI failed to
flush) and when neither does (TF did something the model does not know). Exit status 1 when any
case mismatches.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import safetensors.numpy

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from golden_cases import DTYPES, compare  # noqa: E402
from make_golden import WIDE_RANGE, tf_ema  # noqa: E402

HALF = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))
NAME_PARTS = [
    "dense",
    "kernel",
    "bias",
    "model",
    "layers",
    "0",
    "1",
    "12",
    "weight",
    "attn",
    "q_proj",
    "norm",
    "embed",
    "conv2d",
    "BatchNorm",
    "gamma",
    "beta",
    "lm_head",
    "x",
]
EMA_NAMES = ["EMA", "swa", "ema.0", "Averages_v2", "ExponentialMovingAverage"]


# --------------------------------------------------------------------------------------------
# Drawing cases
# --------------------------------------------------------------------------------------------


#: How many ulps a zero-debias result may differ from TF's (``--zero-debias-ulps``).
ZERO_DEBIAS_ULPS = 0


def draw_name(rng: np.random.Generator) -> str:
    parts = rng.choice(NAME_PARTS, size=int(rng.integers(1, 5)))
    name = str(parts[0])
    for part in parts[1:]:
        name += str(rng.choice(["/", ".", "_"])) + str(part)
    return name


def draw_shape(rng: np.random.Generator) -> tuple[int, ...]:
    if rng.random() < 0.03:
        return (0, int(rng.integers(1, 4)))
    ndim = int(rng.choice([0, 1, 1, 2, 2, 3, 4]))
    return tuple(int(d) for d in rng.integers(1, 10 if ndim < 3 else 5, size=ndim))


def draw_decay(rng: np.random.Generator) -> float:
    kind = int(rng.integers(8))
    if kind < 5:
        return [0.0, 1.0, 0.9, 0.99, 0.999][kind] if rng.random() < 0.7 else 0.9999
    if kind == 5:
        return float(rng.uniform(0.0, 1.0))
    return float(1.0 - 10.0 ** -rng.uniform(0.5, 7.0))


def draw_steps(rng: np.random.Generator) -> list[int]:
    count = int(rng.choice([1, 2, 3, 4, 5, 6, 6, 10, 25]))
    high = int(rng.choice([20, 1000, 10**6, 2**31]))
    steps: set[int] = set()
    while len(steps) < count:
        steps.add(int(rng.integers(0, max(high, count + 1))))
    return sorted(steps)


def draw_values(
    rng: np.random.Generator,
    dtype_name: str,
    shape: tuple[int, ...],
    count: int,
    subnormals: bool,
) -> np.ndarray:
    full = (count, *shape)
    kind = rng.choice(["normal", "wide", "specials", "subnormal"], p=[0.45, 0.3, 0.15, 0.1])
    if kind == "subnormal" and not subnormals:
        kind = "normal"
    if kind == "wide":
        lo, hi = WIDE_RANGE[dtype_name]
        values = rng.choice([-1.0, 1.0], full) * 10.0 ** rng.uniform(lo, hi, full)
        values[rng.random(full) < 0.05] = 0.0
    elif kind == "subnormal":
        tiny = float(np.finfo(np.float64 if dtype_name == "float64" else np.float32).tiny)
        values = tiny * rng.uniform(-3.0, 3.0, full)
    else:
        scale = 10.0 ** rng.uniform(-3, 3)
        values = scale * (rng.normal(0.0, 1.0, shape) + np.cumsum(rng.normal(0, 0.1, full), 0))
        if kind == "specials":
            specials = np.array([np.inf, -np.inf, np.nan, -np.nan])
            mask = rng.random(full) < 0.15
            values[mask] = specials[rng.integers(4, size=int(mask.sum()))]
    with np.errstate(over="ignore"):
        out = values.astype(DTYPES[dtype_name])
    neg_nan = np.isnan(values) & np.signbit(values)
    out[neg_nan] = -np.abs(out[neg_nan])
    return out


def draw_case(seed: int, index: int, subnormals: bool) -> dict[str, Any]:
    rng = np.random.default_rng([seed, index])
    steps = draw_steps(rng)
    one_dtype = str(rng.choice(list(DTYPES))) if rng.random() < 0.6 else None
    names: list[str] = []
    while len(names) < int(rng.integers(1, 6)):
        name = draw_name(rng)
        if all(name.lower() != n.lower() for n in names):
            names.append(name)
    tensors = []
    for name in names:
        dtype_name = one_dtype or str(rng.choice(list(DTYPES)))
        shape = draw_shape(rng)
        tensors.append((name, draw_values(rng, dtype_name, shape, len(steps), subnormals)))
    nu_kind = int(rng.integers(4))
    num_updates: int | str | None = [None, "step", "index", int(rng.integers(0, 10**6))][nu_kind]
    return {
        "index": index,
        "steps": steps,
        "tensors": tensors,
        "decay": draw_decay(rng),
        "num_updates": num_updates,
        "zero_debias": bool(rng.random() < 0.35),
        "precision": str(rng.choice(["auto", "native"])),
        "ema_name": str(rng.choice(EMA_NAMES)) if rng.random() < 0.3 else None,
        "names": "shadow" if rng.random() < 0.2 else "original",
        "order": "step" if rng.random() < 0.5 else "given",
    }


def num_updates_list(case: dict[str, Any]) -> list[int] | None:
    nu, count = case["num_updates"], len(case["steps"])
    if nu is None:
        return None
    if nu == "step":
        return list(case["steps"])
    if nu == "index":
        return list(range(count))
    return [nu] * count


def describe(case: dict[str, Any]) -> str:
    tensors = ", ".join(f"{n}:{v.dtype}{list(v.shape[1:])}" for n, v in case["tensors"])
    return (
        f"case {case['index']}: decay={case['decay']!r} num_updates={case['num_updates']} "
        f"zero_debias={case['zero_debias']} precision={case['precision']} "
        f"name={case['ema_name']} names={case['names']} order={case['order']} "
        f"steps={case['steps'][:8]}{'...' if len(case['steps']) > 8 else ''} [{tensors}]"
    )


# --------------------------------------------------------------------------------------------
# A numpy model of TF's arithmetic, with and without flush-to-zero, to diagnose mismatches
# --------------------------------------------------------------------------------------------


def _flush(a: np.ndarray, tiny: float) -> np.ndarray:
    small = np.abs(a.astype(np.float64)) < tiny
    return np.where(small, np.copysign(np.zeros((), a.dtype), a), a).astype(a.dtype)


def _op(f: Any, x: Any, y: Any, dtype: np.dtype[Any], flush: bool) -> np.ndarray:
    """One TF CPU op: DAZ on the operands, FTZ on the result (float16 never meets either)."""
    work = np.dtype(np.float32) if dtype in HALF else dtype
    tiny = float(np.finfo(work).tiny)
    xs, ys = np.asarray(x).astype(work), np.asarray(y).astype(work)
    flush = flush and dtype != np.float16
    if flush:
        xs, ys = _flush(xs, tiny), _flush(ys, tiny)
    with np.errstate(all="ignore"):
        r = np.asarray(f(xs, ys))
    if flush:
        r = _flush(r, tiny)
    return r.astype(dtype)


def model(case: dict[str, Any], inputs: np.ndarray, flush: bool) -> np.ndarray:
    """TF's EMA in numpy, with or without TF's flush-to-zero, to diagnose a mismatch."""
    dtype = inputs.dtype
    work = np.dtype(np.float32) if case["precision"] == "auto" and dtype in HALF else dtype
    xs = inputs.astype(work)
    s = np.zeros(xs.shape[1:], work) if case["zero_debias"] else xs[0].copy()
    step = np.zeros((), work)
    nus = num_updates_list(case)
    c: Any = None
    for k in range(xs.shape[0]):
        d = np.float32(case["decay"])
        if nus is not None:
            n = np.float32(nus[k])
            d = np.minimum(d, (np.float32(1) + n) / (np.float32(10) + n))
        c = np.asarray(np.float32(1) - d, np.float32).astype(work)
        diff = _op(np.subtract, s, xs[k], work, flush)
        s = _op(np.subtract, s, _op(np.multiply, diff, c, work, flush), work, flush)
        step = _op(np.add, step, np.ones((), work), work, flush)
    if case["zero_debias"]:
        one = np.ones((), work)
        power = _op(np.power, _op(np.subtract, one, c, work, flush), step, work, flush)
        s = _op(np.divide, s, _op(np.subtract, one, power, work, flush), work, flush)
    return np.asarray(s).astype(dtype)


# --------------------------------------------------------------------------------------------
# Running one case
# --------------------------------------------------------------------------------------------


class Skip(Exception):
    """TF renamed a tensor (a name clash in its graph): not a usable case."""


def run_case(case: dict[str, Any], cli: list[str], folder: Path) -> list[str]:
    """Everything the CLI got wrong in one case (an empty list: it matched TF)."""
    try:
        expected = tf_ema(
            case["tensors"],
            decay=case["decay"],
            num_updates=num_updates_list(case),
            zero_debias=case["zero_debias"],
            ema_name=case["ema_name"],
            precision=case["precision"],
        )
    except ValueError as e:
        raise Skip(str(e)) from e
    paths = []
    for k, step in enumerate(case["steps"]):
        path = folder / f"ckpt-{step}.safetensors"
        tensors = {name: np.array(v[k], order="C") for name, v in case["tensors"]}
        safetensors.numpy.save_file(tensors, str(path), metadata={"format": "pt"})
        paths.append(str(path))
    if case["order"] == "step":
        paths = paths[::-1]  # the CLI must sort them back by step
    out = folder / "avg.safetensors"
    args = [
        *cli,
        "average",
        *paths,
        "-o",
        str(out),
        "--decay",
        repr(case["decay"]),
        "--precision",
        case["precision"],
        "--names",
        case["names"],
        "--order",
        case["order"],
        "-q",
    ]
    if case["num_updates"] is not None:
        args += ["--num-updates", str(case["num_updates"])]
    if case["zero_debias"]:
        args.append("--zero-debias")
    if case["ema_name"] is not None:
        args += ["--name", case["ema_name"]]
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return [f"ema-cli exited {proc.returncode}: {proc.stderr.strip()}"]
    got = safetensors.numpy.load_file(str(out))
    mapping = json.loads((folder / "avg.mapping.json").read_text(encoding="utf-8"))["mapping"]
    problems = []
    for (name, inputs), (want, shadow) in zip(case["tensors"], expected, strict=True):
        if mapping.get(name) != shadow:
            problems.append(f"{name}: mapping says {mapping.get(name)!r}, TF {shadow!r}")
        key = shadow if case["names"] == "shadow" else name
        if key not in got:
            problems.append(f"{key}: missing from the output")
            continue
        ulps = ZERO_DEBIAS_ULPS if case["zero_debias"] else 0
        diffs = compare(got[key], want, max_ulps=ulps, inputs=inputs)
        if not diffs:
            continue
        ftz_matches = not compare(model(case, inputs, flush=True), want, max_ulps=1)
        ieee_matches = not compare(model(case, inputs, flush=False), want, max_ulps=1)
        tag = ""
        if ftz_matches and not ieee_matches:
            tag = " [subnormals: TF flushed them to zero, the CLI did not]"
        elif not ftz_matches:
            tag = " [the numpy model of TF does not match TF either]"
        problems += [f"{name} ({inputs.dtype}{list(inputs.shape[1:])}){tag}: {d}" for d in diffs]
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", "--cases", type=int, default=200, help="how many cases (200)")
    parser.add_argument("--seed", type=int, default=0, help="case i of a seed never changes (0)")
    parser.add_argument("--only", type=int, help="run only case ONLY of the seed")
    parser.add_argument(
        "--cli",
        default="ema-cli",
        help="the command to run, e.g. 'ema-cli' or '/venv/bin/python -m ema_cli'",
    )
    parser.add_argument(
        "--no-subnormals",
        dest="subnormals",
        action="store_false",
        help="draw no values around the subnormal range",
    )
    parser.add_argument(
        "--zero-debias-ulps",
        type=int,
        default=0,
        help="ulps zero-debias results may differ by (0: bitwise; TF's C library pow is "
        "correctly rounded for all but a vanishing fraction of inputs, and so is ema-cli's)",
    )
    parser.add_argument("--keep", type=Path, help="keep the files of failing cases here")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every case")
    args = parser.parse_args()
    global ZERO_DEBIAS_ULPS
    ZERO_DEBIAS_ULPS = args.zero_debias_ulps
    cli = shlex.split(args.cli)
    if shutil.which(cli[0]) is None:
        parser.error(f"{cli[0]!r} not found; pass --cli PATH_TO_EMA_CLI")
    indices = [args.only] if args.only is not None else list(range(args.cases))
    failed, skipped = 0, 0
    started = time.monotonic()
    for i in indices:
        case = draw_case(args.seed, i, args.subnormals)
        with tempfile.TemporaryDirectory(prefix=f"ema-check-{i}-") as tmp:
            try:
                problems = run_case(case, cli, Path(tmp))
            except Skip as e:
                skipped += 1
                if args.verbose:
                    print(f"skipped {describe(case)}: {e}")
                continue
            if problems and args.keep is not None:
                shutil.copytree(tmp, args.keep / f"case-{i}", dirs_exist_ok=True)
        if problems:
            failed += 1
            print(f"MISMATCH {describe(case)}")
            for line in problems[:12]:
                print(f"    {line}")
        elif args.verbose:
            print(f"ok       {describe(case)}")
    print(
        f"{len(indices)} cases (seed {args.seed}) in {time.monotonic() - started:.0f}s: "
        f"{failed} mismatched, {skipped} skipped (TF renamed a tensor)"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
