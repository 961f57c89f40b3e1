"""The averaging profiles from the command line (issue 13): --mean, --decay-per-step,
--sigma-rel/--gamma, --weights, several in one pass, --dry-run's weights and windows, --state.

The pure maths (hand-derived weights, labels, windows, the accumulator) is tested in
``test_profiles.py``; here every profile goes through the real replay and is checked against
an independent computation of its formula, against single runs, and against a one-hot replay.
"""

from __future__ import annotations

import itertools
import json
import math
from decimal import Decimal, getcontext
from fractions import Fraction
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import assert_fails, average_ok, load, run_average, write_checkpoint

DTYPES = [
    np.dtype(np.float16),
    np.dtype(ml_dtypes.bfloat16),
    np.dtype(np.float32),
    np.dtype(np.float64),
]
STEPS = (7, 20, 21, 50, 120)  # uneven gaps, not starting at 0


def make_run(folder: Path, steps: tuple[int, ...] = STEPS, seed: int = 0) -> list[Path]:
    """Checkpoints at ``steps`` with a tensor of every float dtype (values in [1, 2), so a
    relative error is a count of ulps) and an int64 counter."""
    rng = np.random.default_rng(seed)
    paths = []
    for step in steps:
        tensors: dict[str, np.ndarray] = {
            f"w/{dt.name}": (1 + rng.random(64)).astype(dt) for dt in DTYPES
        }
        tensors["counter"] = np.array(step, dtype=np.int64)
        paths.append(write_checkpoint(folder / f"ckpt-{step}.safetensors", tensors))
    return paths


def ulps(a: np.ndarray, b: np.ndarray) -> int:
    """The largest distance in ulps between two arrays of positive finite values."""
    bits = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
    ia, ib = a.view(bits).astype(np.int64), b.view(bits).astype(np.int64)
    return int(np.max(np.abs(ia - ib)))


def exact_to(values: list[Fraction], dtype: np.dtype) -> np.ndarray:
    """Exact rationals rounded once to ``dtype``: to float64, then (nearest even, exact ties
    being measure-zero here) to the dtype; one ulp of slack covers the double rounding."""
    return np.array([float(v) for v in values], dtype=np.float64).astype(dtype)


def reference(
    weights: list[Fraction | Decimal], xs: list[np.ndarray], dtype: np.dtype
) -> np.ndarray:
    """sum_k w_k x_k in exact arithmetic, rounded once."""
    exact = [
        sum(
            (Fraction(w) * Fraction(float(x[i])) for w, x in zip(weights, xs, strict=True)),
            Fraction(0),
        )
        for i in range(xs[0].size)
    ]
    return exact_to(exact, dtype)


def inputs_of(paths: list[Path], name: str) -> list[np.ndarray]:
    return [load(p)[name] for p in paths]


# --- independent formulas ------------------------------------------------------------------


def per_step_weights(decay: float, steps: tuple[int, ...], ramp: bool) -> list[Fraction]:
    """The per-step EMA's weights, by brute force: one decay per training step, the shadow
    starting at the first checkpoint and each checkpoint standing for the steps since the one
    before (``(1+m)/(10+m)`` capped at the float32 decay with ``ramp``)."""
    d32 = Fraction(float(np.float32(decay)))
    products = [Fraction(0)]
    for a, b in itertools.pairwise(steps):
        p = Fraction(1)
        for m in range(a + 1, b + 1):
            p *= min(d32, Fraction(1 + m, 10 + m)) if ramp else d32
        products.append(p)
    # s_1 = x_1; s_k = P_k s_(k-1) + (1 - P_k) x_k
    weights = [Fraction(1)]
    for p in products[1:]:
        weights = [w * p for w in weights] + [1 - p]
    return weights


def power_weights(sigma_rel: float, steps: tuple[int, ...]) -> list[Decimal]:
    """EDM2's weights (t_i^(g+1) - t_(i-1)^(g+1)) / t_n^(g+1), gamma by Newton's method on
    sigma^2 (g+2)^2 (g+3) = g+1, in 60-digit decimals."""
    getcontext().prec = 60
    s2 = Decimal(sigma_rel) ** 2
    g = Decimal(1) / Decimal(sigma_rel)  # above the root; the residual is convex there
    for _ in range(200):
        f = s2 * (g + 2) ** 2 * (g + 3) - (g + 1)
        df = s2 * (2 * (g + 2) * (g + 3) + (g + 2) ** 2) - 1
        g -= f / df
    e = g + 1
    tn = Decimal(steps[-1])
    cumulative = [Decimal(0)] + [(Decimal(t) / tn) ** e for t in steps]
    return [cumulative[i + 1] - cumulative[i] for i in range(len(steps))]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_each_profile_matches_its_formula_within_one_ulp(tmp_path: Path, dtype: np.dtype) -> None:
    paths = make_run(tmp_path / "run")
    name = f"w/{dtype.name}"
    xs = inputs_of(paths, name)
    cases: dict[str, tuple[list[str], list[Fraction | Decimal]]] = {
        "mean": (["--mean"], [Fraction(1, len(paths))] * len(paths)),
        "mean-last-3": (
            ["--mean", "--last", "3"],
            [Fraction(0)] * (len(paths) - 3) + [Fraction(1, 3)] * 3,
        ),
        "per-step": (["--decay-per-step", "0.95"], per_step_weights(0.95, STEPS, ramp=False)),
        "per-step-ramp": (
            ["--decay-per-step", "0.99", "--num-updates", "step"],
            per_step_weights(0.99, STEPS, ramp=True),
        ),
        "sigma-rel": (["--sigma-rel", "0.15"], power_weights(0.15, STEPS)),
    }
    for case, (options, weights) in cases.items():
        out = tmp_path / f"{case}.safetensors"
        average_ok(*paths, "-o", out, *options, "-q")
        got = load(out)
        assert got[name].dtype == dtype
        assert ulps(got[name], reference(weights, xs, dtype)) <= 1, case
        assert got["counter"] == STEPS[-1]  # not averaged: the last checkpoint's


def test_steps_from_zero_and_a_single_checkpoint(tmp_path: Path) -> None:
    """gamma's weights start at step 0 without dividing by zero; one checkpoint is itself."""
    paths = make_run(tmp_path / "run", steps=(0, 5, 9))
    name = "w/float32"
    out = tmp_path / "g.safetensors"
    average_ok(*paths, "-o", out, "--sigma-rel", "0.2", "-q")
    assert (
        ulps(
            load(out)[name],
            reference(power_weights(0.2, (0, 5, 9)), inputs_of(paths, name), np.dtype(np.float32)),
        )
        <= 1
    )
    for options in (
        ["--mean"],
        ["--sigma-rel", "0.1"],
        ["--decay-per-step", "0.9"],
        ["--gamma", "0"],
    ):
        one = tmp_path / "one.safetensors"
        average_ok(paths[1], "-o", one, *options, "-q")
        assert load(one)[name].tobytes() == load(paths[1])[name].tobytes(), options


def sweep_options(tmp_path: Path, paths: list[Path]) -> dict[str, list[str]]:
    (tmp_path / "w.json").write_text(
        json.dumps({p.name: w for p, w in zip(paths, [0.5, 0, -0.25, 0.25, 0.5], strict=True)})
    )
    return {
        "decay-0.9": ["--decay", "0.9"],
        "decay-0.99-nu-step": ["--decay", "0.99", "--num-updates", "step"],
        "mean": ["--mean"],
        "decay-per-step-0.98-nu-step": ["--decay-per-step", "0.98", "--num-updates", "step"],
        "sigma-rel-0.1": ["--sigma-rel", "0.1"],
        "gamma-2.5": ["--gamma", "2.5"],
        "weights-w": ["--weights", str(tmp_path / "w.json")],
    }


@pytest.mark.parametrize("output", ["ema.safetensors", "ema.npz", "ema"])
def test_a_sweep_writes_what_single_runs_write_bit_for_bit(tmp_path: Path, output: str) -> None:
    paths = make_run(tmp_path / "run")
    singles = sweep_options(tmp_path, paths)
    (tmp_path / "one").mkdir()
    (tmp_path / "all").mkdir()
    everything = ["--decay", "0.9", "--decay", "0.99", "--mean", "--decay-per-step", "0.98"]
    everything += ["--sigma-rel", "0.1", "--gamma", "2.5", "--weights", str(tmp_path / "w.json")]
    # --num-updates is shared: runs with and without it are two sweeps
    average_ok(*paths, "-o", tmp_path / "all" / output, *everything[:2], *everything[4:], "-q")
    ramp = ["--decay", "0.99", "--decay-per-step", "0.98", "--num-updates", "step"]
    average_ok(*paths, "-o", tmp_path / "all" / f"r-{output}", *ramp, "-q")
    stem, dot, suffix = output.partition(".")
    for label, options in singles.items():
        single = tmp_path / "one" / f"{label}-{output}"
        average_ok(*paths, "-o", single, *options, "-q")
        prefix = "r-" if "nu-step" in label else ""
        swept = tmp_path / "all" / f"{prefix}{stem}.{label}{dot}{suffix}"
        assert swept.exists(), sorted(p.name for p in (tmp_path / "all").iterdir())
        files = sorted(swept.rglob("*")) if swept.is_dir() else [swept]
        for file in files:
            twin = single / file.relative_to(swept) if swept.is_dir() else single
            assert file.read_bytes() == twin.read_bytes(), (label, file.name)
        mapping = json.loads(swept.with_name(f"{prefix}{stem}.{label}.mapping.json").read_text())
        assert mapping["profile"]["label"] == label
        assert mapping["outputs"][0]["path"] == str(swept)


def test_dry_run_weights_are_each_checkpoints_real_contribution(tmp_path: Path) -> None:
    """One-hot checkpoints (checkpoint k holds 1 at element k and 0 elsewhere, in float64):
    the average's element k is checkpoint k's weight, which --dry-run must report."""
    steps = (3, 10, 11, 30, 64)
    paths = []
    for k, step in enumerate(steps):
        onehot = np.zeros(len(steps), dtype=np.float64)
        onehot[k] = 1.0
        paths.append(write_checkpoint(tmp_path / "run" / f"ckpt-{step}.safetensors", {"e": onehot}))
    (tmp_path / "w.json").write_text("[3, -1, 0, 1, 2]")
    options = ["--decay", "0.7", "--decay", "0.9", "--num-updates", "20", "--mean"]
    options += ["--decay-per-step", "0.9", "--sigma-rel", "0.2", "--gamma", "1"]
    options += ["--weights", str(tmp_path / "w.json"), "--normalize"]
    out = tmp_path / "o.safetensors"
    plan = json.loads(average_ok(*paths, "-o", out, *options, "--dry-run", "--json").stdout)
    assert plan["status"] == "dry run" and not list(tmp_path.glob("o.*"))
    average_ok(*paths, "-o", out, *options, "-q")
    assert len(plan["profiles"]) == 7
    for record in plan["profiles"]:
        label = record["profile"]["label"]
        weights = [c["weight"] for c in record["checkpoints"]]
        got = load(tmp_path / f"o.{label}.safetensors")["e"]
        if record["profile"]["kind"] == "decay":  # the engine's float64 products, another order
            np.testing.assert_allclose(got, weights, rtol=1e-15, atol=0, err_msg=label)
        else:  # the accumulator's exact coefficients, rounded once: to the bit
            assert got.tolist() == weights, label
        window = record["window"]
        assert window["50%"]["checkpoints"] <= window["90%"]["checkpoints"] <= len(steps)
        assert window["90%"]["last_step"] == steps[-1]
    weights_record = next(r for r in plan["profiles"] if r["profile"]["kind"] == "weights")
    assert [c["weight"] for c in weights_record["checkpoints"]] == [0.6, -0.2, 0.0, 0.2, 0.4]


def test_dry_run_table_shows_a_column_and_a_window_per_profile(tmp_path: Path) -> None:
    paths = make_run(tmp_path / "run")
    result = average_ok(
        *paths, "-o", tmp_path / "o.safetensors", "--decay", "0.9", "--mean", "--dry-run"
    )
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("#"))
    assert "decay-0.9" in header and "mean" in header
    assert any(
        line.startswith("mean: the weight's 50% in the last 3 checkpoints (steps 21-120, 99 steps)")
        for line in lines
    ), result.stdout
    assert "would write " + str(tmp_path / "o.decay-0.9.safetensors") in result.stdout


def test_sparse_checkpoints_are_warned_about(tmp_path: Path) -> None:
    paths = make_run(tmp_path / "run", steps=(1000, 2000, 3000))
    result = run_average(
        *paths, "-o", tmp_path / "o.safetensors", "--sigma-rel", "0.05", "--dry-run"
    )
    assert result.exit_code == 0
    assert (
        "sigma-rel-0.05: the profile is 150 steps wide but the last checkpoints are 1000 steps apart"
        in result.stderr
    )
    denser = make_run(tmp_path / "denser", steps=(1000, 1500, 2000, 2500, 3000))
    result = run_average(
        *denser, "-o", tmp_path / "o.safetensors", "--sigma-rel", "0.2", "--dry-run"
    )
    assert result.exit_code == 0 and "warning" not in result.stderr


@pytest.mark.parametrize(
    "options, says",
    [
        ([], "say which average to compute"),
        (["--decay", "0.9", "--decay", "0.9"], "decay-0.9 is asked for twice"),
        (["--mean", "--zero-debias"], "--zero-debias applies to --decay"),
        (
            ["--mean", "--num-updates", "step"],
            "--num-updates applies to --decay and --decay-per-step",
        ),
        (["--decay-per-step", "0.9", "--num-updates", "index"], "--decay-per-step 0.9:"),
        (["--decay-per-step", "1.5"], "--decay-per-step 1.5: decay must be between 0 and 1"),
        (["--sigma-rel", "0.3"], "--sigma-rel 0.3: sigma_rel must be above 0 and at most"),
        (["--gamma", "-1"], "--gamma -1.0: gamma must be a finite number >= 0"),
        (["--mean", "--normalize"], "--normalize goes with --weights"),
        (["--mean", "--every", "2"], "--every writes TF's running average"),
        (["--decay", "0.9", "--mean", "--state", "STATE"], "--state keeps one average"),
        (
            ["--sigma-rel", "0.1", "--state", "STATE"],
            "--state cannot fold new checkpoints into sigma-rel-0.1",
        ),
        (
            ["--weights", "W", "--state", "STATE"],
            "--state cannot fold new checkpoints into --weights",
        ),
        (["--weights", "MISSING"], "--weights"),
        (["--weights", "BAD"], "not a JSON list or object of weights"),
        (["--weights", "W2"], "sum to 0.9"),
        (["--weights", "W3"], "3 weights"),
    ],
)
def test_bad_profile_options_are_one_line_and_write_nothing(
    tmp_path: Path, options: list[str], says: str
) -> None:
    paths = make_run(tmp_path / "run", steps=(1, 2, 3, 4, 5))
    (tmp_path / "w.json").write_text("[0.2, 0.2, 0.2, 0.2, 0.2]")
    (tmp_path / "w2.json").write_text("[0.1, 0.2, 0.2, 0.2, 0.2]")
    (tmp_path / "w3.json").write_text("[0.5, 0.25, 0.25]")
    (tmp_path / "bad.json").write_text("[0.5, ")
    names = {
        "STATE": "state",
        "W": "w.json",
        "W2": "w2.json",
        "W3": "w3.json",
        "BAD": "bad.json",
        "MISSING": "nope.json",
    }
    options = [str(tmp_path / names[o]) if o in names else o for o in options]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_fails(run_average(*paths, "-o", tmp_path / "o.safetensors", *options), says)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize(
    "options", [["--mean"], ["--decay-per-step", "0.97", "--num-updates", "step"]]
)
def test_incremental_profiles_fold_like_one_replay(tmp_path: Path, options: list[str]) -> None:
    paths = make_run(tmp_path / "run")
    out, state = tmp_path / "o.safetensors", tmp_path / "state"
    for upto in (2, 3, 5):
        average_ok(*paths[:upto], "-o", out, *options, "--state", state, "--settle", "0", "-q")
    full = tmp_path / "full.safetensors"
    average_ok(*paths, "-o", full, *options, "-q")
    assert out.read_bytes() == full.read_bytes()
    saved = json.loads((state / "state.json").read_text())
    assert (
        saved["settings"]["profile"]
        == json.loads((tmp_path / "o.mapping.json").read_text())["profile"]["label"]
    )
    # The state is bound to its average: another one is refused, naming both.
    other = ["--decay", "0.9"] if options[0] == "--mean" else ["--mean"]
    assert_fails(
        run_average(*paths, "-o", out, *other, "--state", state, "--settle", "0"),
        "the state was made for the average",
    )


def test_mapping_names_in_a_sweep(tmp_path: Path) -> None:
    paths = make_run(tmp_path / "run")
    result = average_ok(
        *paths, "-o", tmp_path / "o.safetensors", "--mean", "--decay", "0.99",
        "--mapping", tmp_path / "m.json", "--json",
    )  # fmt: skip
    summary = json.loads(result.stdout)
    assert summary["status"] == "written"
    assert [p["mapping_file"] for p in summary["profiles"]] == [
        str(tmp_path / "m.decay-0.99.json"),
        str(tmp_path / "m.mean.json"),
    ]
    for entry in summary["profiles"]:
        assert json.loads(Path(entry["mapping_file"]).read_text())["profile"] == entry["profile"]


finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    values=st.lists(st.lists(finite, min_size=3, max_size=3), min_size=1, max_size=5),
    dtype=st.sampled_from(DTYPES),
)
def test_every_profile_lies_between_the_inputs(
    tmp_path_factory: pytest.TempPathFactory, values: list[list[float]], dtype: np.dtype
) -> None:
    folder = tmp_path_factory.mktemp("between")
    steps = [5 * (k + 1) + k * k for k in range(len(values))]
    paths = [
        write_checkpoint(
            folder / f"ckpt-{s}.safetensors", {"x": np.array(v, dtype=np.float64).astype(dtype)}
        )
        for s, v in zip(steps, values, strict=True)
    ]
    xs = np.stack([load(p)["x"].astype(np.float64) for p in paths])
    low, high = xs.min(axis=0), xs.max(axis=0)
    # TF's replay flushes subnormals to zero (its CPU kernels' mode); the other averages do not.
    tiny = float(np.finfo(np.float32 if dtype.itemsize < 8 else np.float64).tiny)
    flushed = np.where(np.abs(xs) < tiny, 0.0, xs)
    tf_low = np.minimum(low, flushed.min(axis=0))
    tf_high = np.maximum(high, flushed.max(axis=0))
    options = ["--decay", "0.9", "--decay", "0.5", "--num-updates", "step", "--mean"]
    options += ["--decay-per-step", "0.9", "--sigma-rel", "0.1", "--gamma", "0.5"]
    out = folder / "o.safetensors"
    average_ok(*paths, "-o", out, *options, "-q")
    for got in folder.glob("o.*.safetensors"):
        x = load(got)["x"].astype(np.float64)
        lo, hi = (tf_low, tf_high) if got.name.startswith("o.decay-0.") else (low, high)
        assert np.all((lo <= x) & (x <= hi)), (got.name, x, lo, hi)
    assert len(list(folder.glob("o.*.safetensors"))) == 6
    assert not math.isnan(float(xs.sum()))
