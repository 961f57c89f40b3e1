"""Write the TensorFlow golden files ``cases.json`` and ``cases.npz`` in this folder.

TensorFlow is *not* a dependency of ema-cli or of its tests: this script is run by hand, in a
scratch virtual environment, and only its output is committed. To rerun it::

    python -m venv /tmp/tfvenv
    /tmp/tfvenv/bin/pip install tensorflow-cpu safetensors ml-dtypes
    /tmp/tfvenv/bin/python tests/golden/make_golden.py          # rewrites cases.json/.npz
    /tmp/tfvenv/bin/python tests/golden/make_golden.py --check  # compare with the committed files

The output is deterministic (every case draws its values from a generator seeded with the CRC-32 of
the case and tensor names), so rerunning with the same TensorFlow on the same kind of CPU (x86-64)
rewrites identical files; ``--check`` says whether it did. The last run used TensorFlow 2.21 on
an x86-64 CPU with AVX2. Two things TF does there are baked into the data: its CPU kernels flush
subnormals to zero (cases flagged ``subnormals`` depend on it), and its bfloat16 NaN signs depend
on Eigen's vectorisation (the tests compare bfloat16 NaNs by position only).

How TensorFlow is driven (as docs/ema-semantics.md, "How to check yourself against TensorFlow"):
``tf.compat.v1`` graph mode; for the default semantics one ``tf.Variable`` per tensor, created with
the first checkpoint as its initial value and ``assign``-ed each checkpoint in turn; for
``zero_debias`` one placeholder per tensor, fed each checkpoint (the shadow starts at zero);
``num_updates`` is an int64 ``tf.Variable`` assigned before each apply. The ``ema.apply()`` op is
run once per checkpoint, oldest first, and the shadows (``ema.average(var)``) are read after the
last one. Each tensor's shadow name is TF's own ``ema.average_name(var)``.

Precision: ``native`` runs TF in the tensor's own dtype. ``auto`` feeds float16/bfloat16 tensors
to TF up-cast to float32 and rounds TF's float32 shadow to the tensor dtype at the end with a TF
cast; for float32/float64 ``auto`` and ``native`` are the same computation.

``check_against_tf.py`` imports ``tf_ema`` from here for its random cases.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zlib
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import ml_dtypes
import numpy as np
import tensorflow as tf

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from golden_cases import DTYPES, bits_dtype  # noqa: E402

HALF = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))
DEFAULT_EMA_NAME = "ExponentialMovingAverage"
# Graph names for the helper ops; tensor names must not start with this.
RESERVED_PREFIX = "golden_"


# --------------------------------------------------------------------------------------------
# TensorFlow
# --------------------------------------------------------------------------------------------


def tf_ema(tensors, *, decay, num_updates, zero_debias, ema_name, precision):
    """Replay checkpoints through TF's ExponentialMovingAverage.

    ``tensors``: list of ``(name, inputs)``, ``inputs`` an array of shape ``(checkpoints, *shape)``
    in the tensor's dtype (oldest checkpoint first). ``num_updates``: ``None`` (off) or a list with
    the value TF sees at each apply. Returns a list of ``(shadow, average_name)``: the shadow after
    the last apply, in the tensor's dtype, and TF's ``ema.average_name`` for the tensor.
    """
    count = {inputs.shape[0] for _, inputs in tensors}
    assert len(count) == 1, "all tensors need the same number of checkpoints"
    (count,) = count
    assert num_updates is None or len(num_updates) == count
    graph = tf.Graph()
    with graph.as_default():
        sources, feeds, assigns, values, casts = [], [], [], [], []
        for i, (name, inputs) in enumerate(tensors):
            assert not name.startswith(RESERVED_PREFIX), name
            dtype = inputs.dtype
            tf_dtype = np.dtype(np.float32) if precision == "auto" and dtype in HALF else dtype
            feed_values = inputs.astype(tf_dtype)  # exact: float16/bfloat16 fit in float32
            values.append(feed_values)
            shape = inputs.shape[1:]
            if zero_debias:
                source = tf.compat.v1.placeholder(tf.as_dtype(tf_dtype), shape=shape, name=name)
                feeds.append(source)
            else:
                source = tf.compat.v1.Variable(feed_values[0], name=name)
                feed = tf.compat.v1.placeholder(
                    tf.as_dtype(tf_dtype), shape=shape, name=f"{RESERVED_PREFIX}feed_{i}"
                )
                feeds.append(feed)
                assigns.append(source.assign(feed))
            if source.name != f"{name}:0":
                raise ValueError(f"TF renamed {name!r} to {source.name!r}")
            sources.append(source)
            casts.append(dtype if tf_dtype != dtype else None)
        if num_updates is not None:
            step_var = tf.compat.v1.Variable(0, dtype=tf.int64, name=f"{RESERVED_PREFIX}step")
            step_feed = tf.compat.v1.placeholder(tf.int64, shape=(), name=f"{RESERVED_PREFIX}n")
            step_assign = step_var.assign(step_feed)
        else:
            step_var = None
        ema = tf.compat.v1.train.ExponentialMovingAverage(
            decay,
            num_updates=step_var,
            zero_debias=zero_debias,
            name=ema_name or DEFAULT_EMA_NAME,
        )
        update = ema.apply(sources)
        reads, names = [], []
        for source, cast in zip(sources, casts, strict=True):
            average = ema.average(source)
            names.append(ema.average_name(source))
            if average.name != f"{names[-1]}:0":
                raise ValueError(f"TF named the shadow {average.name!r}, not {names[-1]!r}")
            reads.append(tf.identity(average) if cast is None else tf.cast(average, cast))
        init = tf.compat.v1.global_variables_initializer()
    with tf.compat.v1.Session(graph=graph) as sess:
        sess.run(init)
        for k in range(count):
            fed = {feed: v[k] for feed, v in zip(feeds, values, strict=True)}
            if not zero_debias:
                sess.run(assigns, fed)
            if num_updates is not None:
                sess.run(step_assign, {step_feed: num_updates[k]})
            sess.run(update, fed if zero_debias else None)
        results = sess.run(reads)
    out = []
    for (_, inputs), result, name in zip(tensors, results, names, strict=True):
        result = np.asarray(result)
        assert result.dtype == inputs.dtype and result.shape == inputs.shape[1:]
        out.append((result, name))
    return out


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------

# Decimal exponent ranges for "wide" values: as wide as the dtype allows while (s - x) * c stays
# clear of the subnormal range (TF flushes subnormals to zero; the "subnormal" cases test that).
WIDE_RANGE = {
    "float16": (-6.5, 4.5),
    "bfloat16": (-30, 30),
    "float32": (-30, 30),
    "float64": (-200, 200),
}


def rng_for(*parts):
    return np.random.default_rng(zlib.crc32("/".join(parts).encode()))


def make_values(case, name, dtype_name, shape, kind, count):
    """``count`` checkpoints of one tensor: an array (count, *shape) in the tensor's dtype."""
    dtype = DTYPES[dtype_name]
    rng = rng_for(case, name)
    full = (count, *shape)
    if kind == "normal":  # weights that drift a little from one checkpoint to the next
        base = rng.normal(0.0, 0.5, shape)
        drift = np.cumsum(rng.normal(0.0, 0.05, full), axis=0)
        values = base + drift
    elif kind == "wide":  # independent values over many orders of magnitude, some zeros
        lo, hi = WIDE_RANGE[dtype_name]
        sign = rng.choice([-1.0, 1.0], full)
        values = sign * 10.0 ** rng.uniform(lo, hi, full)
        values[rng.random(full) < 0.05] = 0.0
    elif kind == "specials":  # drifting weights with inf, -inf, nan and -nan sprinkled in
        values = rng.normal(0.0, 0.5, shape) + np.cumsum(rng.normal(0.0, 0.05, full), axis=0)
        flat = values.reshape(count, -1)
        n = flat.shape[1]
        specials = [np.inf, -np.inf, np.nan, -np.nan]
        for k in range(count):
            for j in range(n):
                if rng.random() < 0.12:
                    flat[k, j] = specials[rng.integers(4)]
        # Deterministic ones too: inf first / only last / everywhere, at the start and the end.
        flat[0, 0] = np.inf
        flat[-1, n - 1] = -np.inf
        if n > 2:
            flat[:, 1] = np.inf
            flat[-1, n // 2] = np.nan
        values = flat.reshape(full)
    elif kind == "subnormal":  # around the smallest normal number: TF flushes subnormals
        tiny = float(np.finfo(np.float64 if dtype_name == "float64" else np.float32).tiny)
        values = tiny * rng.uniform(-3.0, 3.0, full)
        flat = values.reshape(count, -1)
        flat[:, 0] = tiny * 0.5  # a subnormal in every checkpoint
        if flat.shape[1] > 1:
            flat[:, 1] = -tiny * 2.0**-10
        values = flat.reshape(full)
    elif kind == "walk":  # long runs: a scalar random walk
        values = 1.0 + np.cumsum(rng.normal(0.0, 0.1, full), axis=0)
    else:
        raise ValueError(kind)
    # float64 -> dtype in one rounding (ml_dtypes rounds to nearest even, like TF's cast)
    with np.errstate(over="ignore"):
        out = values.astype(dtype)
    if kind == "specials":  # keep the sign of -nan (a cast may drop it)
        neg_nan = np.isnan(values) & np.signbit(values)
        out[neg_nan] = -np.abs(out[neg_nan])
    return out


def standard_tensors(dtype, kinds=("normal", "normal", "normal", "normal", "wide")):
    """Five tensors: names with '/' and '.', a scalar, a 35-element one (Eigen packets + tail)."""
    names = ["dense/kernel", "dense/bias", "model.layers.0.weight", "global_scale", "embed.weight"]
    shapes = [(5, 7), (4,), (2, 3, 2), (), (3, 5)]
    return [(n, dtype, s, k) for n, s, k in zip(names, shapes, kinds, strict=True)]


def case(
    name,
    description,
    tensors,
    *,
    steps=(100, 250, 1000, 1010),
    decay=0.9,
    num_updates=None,
    zero_debias=False,
    ema_name=None,
    precision="native",
    names="original",
):
    return dict(
        name=name,
        description=description,
        tensors=tensors,
        steps=list(steps),
        decay=decay,
        num_updates=num_updates,
        zero_debias=zero_debias,
        ema_name=ema_name,
        precision=precision,
        names=names,
    )


def all_cases():
    cases = []
    add = cases.append
    dtypes = ("float16", "bfloat16", "float32", "float64")
    specials = ("specials", "normal", "specials", "specials", "normal")

    # Every dtype in both precision modes.
    for dt in dtypes:
        for prec in ("auto", "native"):
            add(
                case(
                    f"{dt}_{prec}",
                    f"{dt}, precision {prec}, decay 0.9",
                    standard_tensors(dt),
                    precision=prec,
                )
            )
    # Every dtype in one checkpoint.
    for prec in ("auto", "native"):
        mixed = [
            ("w16", "float16", (3, 4), "normal"),
            ("wbf16", "bfloat16", (3, 4), "normal"),
            ("w32", "float32", (3, 4), "wide"),
            ("w64", "float64", (3, 4), "wide"),
            ("scalars/bf16", "bfloat16", (), "normal"),
        ]
        add(
            case(
                f"mixed_dtypes_{prec}",
                "all four dtypes in one checkpoint, num_updates step",
                mixed,
                precision=prec,
                decay=0.99,
                num_updates="step",
                steps=(0, 20, 300, 4000, 50000),
            )
        )

    # Decays 0 and 1 and the bfloat16 decay-0.999 stall.
    add(
        case(
            "float32_decay0",
            "decay 0: c = 1, s - (s - x) is not always x",
            standard_tensors("float32", ("wide",) * 5),
            decay=0.0,
            steps=(0, 3, 9, 27),
        )
    )
    add(
        case(
            "float64_decay0_zero_debias",
            "decay 0 with zero debias",
            standard_tensors("float64", ("wide",) * 5),
            decay=0.0,
            zero_debias=True,
            steps=(0, 3, 9, 27),
        )
    )
    add(
        case(
            "float32_decay1",
            "decay 1: the shadow keeps the first checkpoint",
            standard_tensors("float32", specials),
            decay=1.0,
        )
    )
    add(
        case(
            "float16_native_decay1",
            "decay 1 in float16",
            standard_tensors("float16", specials),
            decay=1.0,
        )
    )
    add(
        case(
            "float32_decay1_zero_debias",
            "decay 1 with zero debias: 0/0 everywhere",
            standard_tensors("float32"),
            decay=1.0,
            zero_debias=True,
        )
    )
    add(
        case(
            "float64_decay0.999",
            "decay 0.999: float64 uses c = f64(f32(1) - f32(0.999))",
            standard_tensors("float64"),
            decay=0.999,
            steps=(5, 10, 20, 40, 80),
        )
    )
    for prec in ("auto", "native"):
        add(
            case(
                f"bfloat16_{prec}_decay0.999",
                "decay 0.999 in bfloat16: native never moves, auto does",
                standard_tensors("bfloat16"),
                decay=0.999,
                precision=prec,
                steps=(1000, 2000, 3000, 4000, 5000, 6000),
            )
        )
    add(
        case(
            "float16_native_decay0.999",
            "decay 0.999 in float16",
            standard_tensors("float16"),
            decay=0.999,
            steps=(1, 2, 3, 5, 8, 13),
        )
    )

    # num_updates.
    add(
        case(
            "float32_num_updates_fixed5",
            "num_updates 5: d = min(0.999, 6/15)",
            standard_tensors("float32"),
            decay=0.999,
            num_updates=5,
        )
    )
    add(
        case(
            "float64_num_updates_fixed100000",
            "num_updates 100000: the decay wins",
            standard_tensors("float64"),
            decay=0.9,
            num_updates=100000,
        )
    )
    add(
        case(
            "float32_num_updates_step",
            "num_updates = each checkpoint's step",
            standard_tensors("float32"),
            decay=0.999,
            num_updates="step",
            steps=(0, 7, 100, 250, 1000, 5000),
        )
    )
    add(
        case(
            "float16_native_num_updates_step",
            "num_updates step in float16",
            standard_tensors("float16"),
            decay=0.99,
            num_updates="step",
            steps=(1, 2, 50, 3000),
        )
    )
    add(
        case(
            "bfloat16_native_num_updates_step",
            "num_updates step in bfloat16",
            standard_tensors("bfloat16"),
            decay=0.99,
            num_updates="step",
            steps=(10, 20, 40, 16777217),
        )
    )
    add(
        case(
            "float64_num_updates_index",
            "num_updates = 0-based position",
            standard_tensors("float64"),
            decay=0.999,
            num_updates="index",
            steps=(100, 250, 1000, 1010, 2000),
        )
    )
    add(
        case(
            "bfloat16_auto_num_updates_index",
            "num_updates index, bfloat16 in float32",
            standard_tensors("bfloat16"),
            decay=0.999,
            num_updates="index",
            precision="auto",
        )
    )
    add(
        case(
            "float32_num_updates_step_large",
            "steps beyond 2**24 round when cast to float32",
            standard_tensors("float32"),
            decay=0.99999999,
            num_updates="step",
            steps=(16777216, 16777217, 16777219, 2**31 + 1),
        )
    )

    # Zero debias.
    add(
        case(
            "float32_zero_debias",
            "zero debias, decay 0.9",
            standard_tensors("float32"),
            zero_debias=True,
        )
    )
    add(
        case(
            "float32_zero_debias_num_updates_step",
            "zero debias with num_updates step: bias factor uses the latest c",
            standard_tensors("float32"),
            decay=0.999,
            zero_debias=True,
            num_updates="step",
            steps=(0, 7, 100, 250, 1000, 5000),
        )
    )
    add(
        case(
            "float64_zero_debias_num_updates_index",
            "zero debias, num_updates index",
            standard_tensors("float64"),
            decay=0.99,
            zero_debias=True,
            num_updates="index",
        )
    )
    add(
        case(
            "float64_zero_debias",
            "zero debias, float64, wide values",
            standard_tensors("float64", ("wide",) * 5),
            decay=0.95,
            zero_debias=True,
        )
    )
    for prec in ("auto", "native"):
        add(
            case(
                f"float16_{prec}_zero_debias",
                "zero debias in float16",
                standard_tensors("float16"),
                zero_debias=True,
                precision=prec,
            )
        )
        add(
            case(
                f"bfloat16_{prec}_zero_debias",
                "zero debias in bfloat16",
                standard_tensors("bfloat16"),
                zero_debias=True,
                precision=prec,
            )
        )
    add(
        case(
            "float16_auto_zero_debias_num_updates_fixed10",
            "zero debias, num_updates 10",
            standard_tensors("float16"),
            decay=0.999,
            zero_debias=True,
            num_updates=10,
            precision="auto",
        )
    )
    add(
        case(
            "bfloat16_native_zero_debias_num_updates_step",
            "zero debias, num_updates step",
            standard_tensors("bfloat16"),
            decay=0.999,
            zero_debias=True,
            num_updates="step",
            steps=(3, 30, 300, 3000),
        )
    )

    # EMA names and output names.
    add(
        case(
            "float32_custom_name",
            "a custom EMA name",
            standard_tensors("float32"),
            ema_name="EMA.slow_v2",
            decay=0.95,
        )
    )
    add(
        case(
            "float16_auto_custom_name_shadow_names",
            "a custom EMA name, outputs stored under the shadow names",
            standard_tensors("float16"),
            ema_name="swa",
            precision="auto",
            names="shadow",
            num_updates="index",
            decay=0.999,
        )
    )
    add(
        case(
            "float64_custom_name_zero_debias",
            "a custom EMA name with zero debias",
            standard_tensors("float64"),
            ema_name="Averages",
            zero_debias=True,
            decay=0.9,
        )
    )

    # A single checkpoint.
    add(
        case(
            "float32_single_checkpoint",
            "one checkpoint: unchanged, except inf -> NaN",
            standard_tensors("float32", specials),
            steps=(500,),
        )
    )
    add(
        case(
            "float16_native_single_checkpoint_zero_debias",
            "one checkpoint, zero debias",
            standard_tensors("float16", specials),
            steps=(500,),
            zero_debias=True,
        )
    )
    add(
        case(
            "bfloat16_auto_single_checkpoint",
            "one checkpoint, bfloat16 via float32",
            standard_tensors("bfloat16", specials),
            steps=(7,),
            precision="auto",
        )
    )

    # inf and NaN.
    add(
        case(
            "float32_inf_nan",
            "inf/nan inputs; inf - inf = NaN",
            standard_tensors("float32", specials),
        )
    )
    add(
        case(
            "float64_inf_nan_num_updates_step",
            "inf/nan inputs in float64",
            standard_tensors("float64", specials),
            decay=0.99,
            num_updates="step",
            steps=(1, 10, 100, 1000, 10000),
        )
    )
    for dt in ("float16", "bfloat16"):
        for prec in ("auto", "native"):
            add(
                case(
                    f"{dt}_{prec}_inf_nan",
                    f"inf/nan inputs in {dt}",
                    standard_tensors(dt, specials),
                    precision=prec,
                )
            )
    add(
        case(
            "float32_inf_nan_zero_debias",
            "inf/nan inputs with zero debias",
            standard_tensors("float32", specials),
            zero_debias=True,
            decay=0.99,
        )
    )
    add(
        case(
            "bfloat16_native_inf_nan_zero_debias",
            "inf/nan, zero debias, bfloat16",
            standard_tensors("bfloat16", specials),
            zero_debias=True,
            decay=0.99,
        )
    )

    # Subnormals: TF's CPU kernels run with flush-to-zero and denormals-are-zero.
    sub = ("subnormal", "subnormal", "normal", "subnormal", "subnormal")
    add(
        case(
            "float32_subnormal",
            "subnormal inputs and results are flushed to zero by TF",
            standard_tensors("float32", sub),
        )
    )
    add(
        case(
            "float64_subnormal",
            "float64 subnormals are flushed too",
            standard_tensors("float64", sub),
        )
    )
    for prec in ("auto", "native"):
        add(
            case(
                f"bfloat16_{prec}_subnormal",
                "bfloat16 subnormals",
                standard_tensors("bfloat16", sub),
                precision=prec,
            )
        )
    add(
        case(
            "float32_subnormal_single_checkpoint",
            "one checkpoint: the first apply already flushes subnormals",
            standard_tensors("float32", sub),
            steps=(42,),
        )
    )
    add(
        case(
            "float32_subnormal_zero_debias",
            "subnormals with zero debias",
            standard_tensors("float32", sub),
            zero_debias=True,
        )
    )

    # Long zero-debias runs where the dtype's local_step stops counting.
    add(
        case(
            "float16_native_zero_debias_2100_steps",
            "float16 local_step stops at 2048 (2048 + 1 rounds to 2048)",
            [("loss_scale", "float16", (), "walk")],
            decay=0.999,
            zero_debias=True,
            steps=range(1, 2101),
        )
    )
    for prec in ("auto", "native"):
        add(
            case(
                f"bfloat16_{prec}_zero_debias_300_steps",
                "bfloat16 local_step stops at 256 natively, not in float32",
                [("temperature", "bfloat16", (), "walk")],
                decay=0.99,
                zero_debias=True,
                steps=range(10, 3010, 10),
                precision=prec,
            )
        )
    return cases


def num_updates_list(spec):
    nu = spec["num_updates"]
    if nu is None:
        return None
    if nu == "step":
        return list(spec["steps"])
    if nu == "index":
        return list(range(len(spec["steps"])))
    return [nu] * len(spec["steps"])


def build():
    """Run every case through TF: (JSON metadata, {npz key: flat uint array})."""
    meta_cases = []
    chunks = {16: [], 32: [], 64: []}  # bit width -> flat uint arrays, concatenated at the end
    sizes = dict.fromkeys(chunks, 0)

    def store(array):
        width = array.dtype.itemsize * 8
        flat = array.reshape(-1).view(bits_dtype(array.dtype))
        offset = sizes[width]
        chunks[width].append(flat)
        sizes[width] += flat.size
        return offset

    names_seen = set()
    for spec in all_cases():
        assert spec["name"] not in names_seen, spec["name"]
        names_seen.add(spec["name"])
        steps = spec["steps"]
        assert list(steps) == sorted(set(steps)), "steps must increase"
        tensors = [
            (tname, make_values(spec["name"], tname, dt, shape, kind, len(steps)))
            for tname, dt, shape, kind in spec["tensors"]
        ]
        results = tf_ema(
            tensors,
            decay=spec["decay"],
            num_updates=num_updates_list(spec),
            zero_debias=spec["zero_debias"],
            ema_name=spec["ema_name"],
            precision=spec["precision"],
        )
        tmeta = []
        for i, ((tname, inputs), (expected, shadow)) in enumerate(
            zip(tensors, results, strict=True)
        ):
            tmeta.append(
                dict(
                    name=tname,
                    dtype=spec["tensors"][i][1],
                    shape=list(inputs.shape[1:]),
                    shadow_name=shadow,
                    inputs_offset=store(inputs),
                    expected_offset=store(expected),
                )
            )
        meta_cases.append(
            dict(
                name=spec["name"],
                description=spec["description"],
                decay=spec["decay"],
                num_updates=spec["num_updates"],
                zero_debias=spec["zero_debias"],
                ema_name=spec["ema_name"],
                precision=spec["precision"],
                names=spec["names"],
                steps=list(steps),
                subnormals=any(kind == "subnormal" for *_, kind in spec["tensors"]),
                tensors=tmeta,
            )
        )
    arrays = {f"bits{w}": np.concatenate(c) for w, c in chunks.items() if c}
    meta = dict(
        generator="tests/golden/make_golden.py",
        tensorflow=tf.__version__,
        numpy=np.__version__,
        ml_dtypes=ml_dtypes.__version__,
        note=(
            "cases.npz holds three flat arrays, bits16, bits32 and bits64: the bit patterns of "
            "every tensor of that width. A tensor's inputs (one row per checkpoint, oldest "
            "first) start at inputs_offset, TF's shadow after the last apply at "
            "expected_offset, in the array of the dtype's width. A case with subnormals: true "
            "depends on TF's CPU kernels flushing subnormals to zero (FTZ+DAZ)."
        ),
        cases=meta_cases,
    )
    return meta, arrays


def to_json(obj, indent=0):
    """JSON with lists of numbers (steps, shapes) kept on one line; keys sorted."""
    pad = "  " * (indent + 1)
    if isinstance(obj, dict) and "shadow_name" in obj:  # a tensor: one line
        return json.dumps(obj, sort_keys=True)
    if isinstance(obj, dict):
        items = [f"{pad}{json.dumps(k)}: {to_json(obj[k], indent + 1)}" for k in sorted(obj)]
        return "{\n" + ",\n".join(items) + "\n" + "  " * indent + "}"
    if isinstance(obj, list) and not all(isinstance(v, (int, float)) for v in obj):
        items = [f"{pad}{to_json(v, indent + 1)}" for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + "  " * indent + "]"
    return json.dumps(obj)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="compare with the committed files instead of writing them",
    )
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write to")
    args = parser.parse_args()
    meta, arrays = build()
    text = to_json(meta) + "\n"
    if args.check:
        old_meta = json.loads((HERE / "cases.json").read_text(encoding="utf-8"))
        same = old_meta["cases"] == meta["cases"]
        with np.load(HERE / "cases.npz") as old:
            same = same and sorted(old.files) == sorted(arrays)
            same = same and all(np.array_equal(old[k], v) for k, v in arrays.items())
        print("identical" if same else "DIFFERENT from the committed golden files")
        return 0 if same else 1
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cases.json").write_text(text, encoding="utf-8")
    np.savez_compressed(args.out / "cases.npz", **arrays)
    total = sum(v.nbytes for v in arrays.values())
    print(f"{len(meta['cases'])} cases, {total} bytes of arrays -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
