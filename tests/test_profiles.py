"""Averaging profiles: hand-derived weights, exactness against fractions, properties (hypothesis),
and the same bits with numpy's AVX-512 paths switched off."""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ema_cli import engine
from ema_cli import profiles as P
from ema_cli.errors import OptionError

ROOT = Path(__file__).resolve().parent.parent
BF16 = np.dtype(ml_dtypes.bfloat16)
C09 = float(np.float32(1) - np.float32(0.9))  # 0.100000024, TF's float32 coefficient


def average(
    profile: P.LinearProfile,
    steps: list[int | None],
    xs: list[np.ndarray],
    dtype: np.dtype | None = None,
    block: int | None = None,
) -> np.ndarray:
    """Stream ``xs`` (one array per checkpoint) through the accumulator, ``block`` elements at a
    time, the way a replay does."""
    dtype = dtype or xs[0].dtype
    acc = P.accumulator(profile, steps)
    flat = [x.reshape(-1) for x in xs]
    size = flat[0].size
    block = block or size
    out = []
    for start in range(0, size, block):
        part = [x[start : start + block] for x in flat]
        state = acc.new_state(part[0].size, dtype)
        scratch = acc.new_scratch(part[0].size)
        acc.init(state)
        for k, x in enumerate(part):
            acc.update(state, x, k, scratch)
        out.append(acc.finish(state, dtype))
    return np.concatenate(out).reshape(xs[0].shape)


def within_ulp(result: np.generic | float, exact: Fraction, dtype: np.dtype) -> bool:
    nearest = np.asarray(float(exact)).astype(dtype)
    ulp = Fraction(float(np.spacing(np.abs(nearest))))
    return abs(Fraction(float(result)) - exact) <= ulp


# --- Decay -------------------------------------------------------------------------------------


def test_decay_weights_are_the_engines_contribution_weights() -> None:
    # Three applies with c = 0.100000024: x3 gets c, x2 c(1-c), x1 the rest (1-c)^2 (it also
    # starts the shadow).
    w = P.weights(P.Decay(0.9), [None, None, None])
    assert w == pytest.approx([(1 - C09) ** 2, C09 * (1 - C09), C09], rel=1e-15)
    assert math.fsum(w) == pytest.approx(1.0, abs=1e-15)
    assert P.decay_coefficients(P.Decay(0.999, "index"), [None] * 2) == [
        float(np.float32(1) - engine.effective_decay(0.999, 0)),
        float(np.float32(1) - engine.effective_decay(0.999, 1)),
    ]
    assert P.decay_coefficients(P.Decay(0.999, "step"), [5, 90])[1] == pytest.approx(0.09, 1e-6)
    # zero debias with a varying c: TF's bias factor uses the last c, so the sum is not 1
    zd = P.weights(P.Decay(0.999, "index", zero_debias=True), [None] * 3)
    assert abs(math.fsum(zd) - 1) > 1e-3
    assert math.fsum(P.weights(P.Decay(0.9, zero_debias=True), [None] * 3)) == pytest.approx(1)


def test_decay_weights_are_what_a_float64_engine_replay_of_one_hot_inputs_gives() -> None:
    profile = P.Decay(0.8, "step")
    steps: list[int | None] = [3, 7, 20, 21]
    w = P.weights(profile, steps)
    cs = [np.float64(c) for c in P.decay_coefficients(profile, steps)]
    for k in range(len(steps)):
        xs = [np.array([1.0 if i == k else 0.0]) for i in range(len(steps))]
        state = engine.init_state(xs[0], zero_debias=False, dtype=np.dtype(np.float64))
        for x, c in zip(xs, cs, strict=True):
            engine.apply(state, x, c)
        assert float(engine.average(state)[0]) == pytest.approx(w[k], rel=1e-13, abs=1e-300)


def test_decay_needs_steps_only_for_num_updates_step() -> None:
    with pytest.raises(OptionError, match="checkpoint 2 has none"):
        P.weights(P.Decay(0.9, "step"), [1, None])
    with pytest.raises(OptionError, match="between 0 and 1"):
        P.Decay(1.5)
    with pytest.raises(OptionError, match="count >= 0"):
        P.Decay(0.9, -1)


# --- Mean --------------------------------------------------------------------------------------


def test_mean_weights_and_result() -> None:
    assert P.weights(P.Mean(), [None] * 4) == [0.25] * 4
    assert P.weights(P.Mean(), [7]) == [1.0]
    xs = [np.array([1.0, 2.0], dtype=np.float32), np.array([2.0, 4.0], dtype=np.float32)]
    xs.append(np.array([4.0, 4.0], dtype=np.float32))
    assert average(P.Mean(), [None] * 3, xs).tolist() == [
        float(np.float32(7 / 3)),
        float(np.float32(10 / 3)),
    ]
    assert average(P.Mean(), [None] * 3, xs).dtype == np.float32


# --- DecayPerStep ------------------------------------------------------------------------------


def test_decay_per_step_with_the_step_ramp_by_hand() -> None:
    # D = 0.5 (exact in float32), per-step decay min(0.5, (1+m)/(10+m)); the ramp reaches 0.5 at
    # m = 8 ((1+m) >= (10+m)/2 <=> m >= 8). Checkpoints at steps 0, 2, 10:
    #   gap (0, 2]:  steps 1, 2 on the ramp: 2/11 * 3/12 = 1/22                          = P1
    #   gap (2, 10]: steps 3..7 on the ramp: (4*5*6*7*8)/(13*14*15*16*17) = 2/221,
    #                steps 8, 9, 10 at 0.5:  1/8;                       P2 = 2/221/8 = 1/884
    # Weights: x0 P1 P2 = 1/19448, x1 (1 - P1) P2 = 21/19448, x2 1 - P2 = 883/884; sum 1.
    profile = P.DecayPerStep(0.5, "step")
    assert P.gap_decays(profile, [0, 2, 10]) == [0.0, 1 / 22, 1 / 884]
    w = P.weights(profile, [0, 2, 10])
    assert w == pytest.approx([1 / 19448, 21 / 19448, 883 / 884], rel=1e-15)
    assert math.fsum(w) == pytest.approx(1.0, abs=1e-15)


def test_decay_per_step_fixed_count_and_off() -> None:
    # num_updates off: P = D^gap. Fixed N = 2: min(0.9, 3/12) = 1/4 every step.
    d = float(np.float32(0.9))
    assert P.gap_decays(P.DecayPerStep(0.9), [5, 8]) == [0.0, float(Fraction(d) ** 3)]
    assert P.gap_decays(P.DecayPerStep(0.9, 2), [5, 8]) == [0.0, 1 / 64]
    assert P.weights(P.DecayPerStep(0.9, 2), [5, 8]) == [1 / 64, 63 / 64]
    assert P.weights(P.DecayPerStep(0.9), [100]) == [1.0]
    with pytest.raises(OptionError, match="'index' counts checkpoints"):
        P.DecayPerStep(0.9, "index")  # type: ignore[arg-type]


@pytest.mark.parametrize("decay", [0.5, 0.9, 0.999, 0.0, 1.0])
def test_decay_per_step_gap_decay_is_the_correctly_rounded_product(decay: float) -> None:
    d = Fraction(float(np.float32(decay)))
    rng = np.random.default_rng(13)
    steps = sorted({int(s) for s in rng.integers(0, 3000, size=12)})
    got = P.gap_decays(P.DecayPerStep(decay, "step"), steps)
    for k, (a, b) in enumerate(itertools.pairwise(steps), start=1):
        exact = Fraction(1)
        for m in range(a + 1, b + 1):
            exact *= min(d, Fraction(1 + m, 10 + m))
        assert got[k] == float(exact)


def test_decay_per_step_long_gap_is_fast_and_accurate() -> None:
    # 10^6 steps on the ramp and past it (D = 0.9999 takes over at step 89,991): no loop.
    profile = P.DecayPerStep(0.9999, "step")
    (_, p), d = P.gap_decays(profile, [0, 10**6]), float(np.float32(0.9999))
    start = P._ramp_start(Fraction(d))
    assert start is not None
    assert Fraction(start, start + 9) < Fraction(d) <= Fraction(start + 1, start + 10)
    assert start == 89976  # float32(0.9999) = 0.99989998...
    log_p = math.fsum(math.log((1 + m) / (10 + m)) for m in range(1, start)) + (
        10**6 - start + 1
    ) * math.log(d)
    assert p == pytest.approx(math.exp(log_p), rel=1e-9)
    assert P.gap_decays(profile, [0, 10**12])[1] == 0.0  # underflows, no error


def test_decay_per_step_at_every_step_is_the_decay_replay() -> None:
    steps: list[int | None] = list(range(10, 20))
    assert P.weights(P.DecayPerStep(0.9), steps) == pytest.approx(
        P.weights(P.Decay(0.9), steps), rel=1e-14
    )
    # the ramp: TF's float32 quotient against the exact one, equal to float32 precision
    assert P.weights(P.DecayPerStep(0.999, "step"), steps) == pytest.approx(
        P.weights(P.Decay(0.999, "step"), steps), rel=1e-6
    )


# --- PowerEMA ----------------------------------------------------------------------------------


def test_power_weights_by_hand() -> None:
    # gamma 1: F(t) = (t/40)^2 at 0, 10, 20, 40 is 0, 1/16, 1/4, 1: weights 0, 1/16, 3/16, 3/4.
    assert P.weights(P.PowerEMA(1.0), [0, 10, 20, 40]) == [0.0, 0.0625, 0.1875, 0.75]
    # gamma 0 is the uniform average over training time: weight proportional to the gap.
    assert P.weights(P.PowerEMA(0.0), [10, 30, 40]) == [0.25, 0.5, 0.25]
    assert P.weights(P.PowerEMA(2.0), [0]) == [1.0]  # t_n = 0: all on the last
    assert P.weights(P.PowerEMA(2.0), [500]) == [1.0]


@pytest.mark.parametrize("steps", [[3, 3], [5, 4], [1, None], [-1, 2]])
def test_power_refuses_steps_that_are_not_strictly_increasing(steps: list[int | None]) -> None:
    with pytest.raises(OptionError, match=r"gamma-2\.0"):
        P.weights(P.PowerEMA(2.0), steps)


@pytest.mark.parametrize("gamma", [0, 1, 2, 7])
def test_power_weights_against_exact_fractions(gamma: int) -> None:
    rng = np.random.default_rng(gamma)
    steps = sorted({int(s) for s in rng.integers(0, 10**6, size=20)})
    w = P.weights(P.PowerEMA(float(gamma)), steps)
    tn = steps[-1]
    previous = Fraction(0)
    for k, t in enumerate(steps):
        now = Fraction(t, tn) ** (gamma + 1)
        assert abs(Fraction(w[k]) - (now - previous)) <= 2 * Fraction(math.ulp(w[k]) or 1e-300)
        previous = now


def test_sigma_rel_and_gamma() -> None:
    assert P.sigma_rel_to_gamma(0.1) == pytest.approx(6.937203937601807, rel=1e-15)
    for s in (0.01, 0.05, 0.1, 0.15, 0.2, 0.28):
        g = P.sigma_rel_to_gamma(s)
        t = s**-2  # EDM2's std_to_exp: the largest real root of the cubic
        assert g == pytest.approx(np.roots([1, 7, 16 - t, 12 - t]).real.max(), rel=1e-12)
        assert P.gamma_to_sigma_rel(g) == pytest.approx(s, rel=4e-16)  # round trip
        # correctly rounded: the exact residual changes sign within half an ulp of g
        s2 = Fraction(s) ** 2

        def residual(x: Fraction, s2: Fraction = s2) -> Fraction:
            return (x + 1) - s2 * (x + 2) ** 2 * (x + 3)

        half = Fraction(math.ulp(g)) / 2
        assert residual(Fraction(g) - half) >= 0 >= residual(Fraction(g) + half)
    assert P.sigma_rel_to_gamma(P.SIGMA_REL_MAX) == pytest.approx(0.0, abs=1e-15)
    top = Fraction(P.SIGMA_REL_MAX)
    assert 12 * top**2 <= 1 < 12 * Fraction(math.nextafter(P.SIGMA_REL_MAX, 1)) ** 2
    pe = P.PowerEMA.from_sigma_rel(0.05)
    assert pe.sigma_rel == 0.05 and pe.gamma == P.sigma_rel_to_gamma(0.05)


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.29, math.nan, math.inf])
def test_sigma_rel_out_of_range_is_refused(bad: float) -> None:
    with pytest.raises(OptionError, match=r"sigma_rel must be above 0 and at most 0\.2886"):
        P.PowerEMA.from_sigma_rel(bad)


def test_gamma_out_of_range_is_refused() -> None:
    for bad in (-0.5, math.inf, math.nan):
        with pytest.raises(OptionError, match="gamma must be a finite number >= 0"):
            P.PowerEMA(bad)
    with pytest.raises(OptionError, match="from_sigma_rel"):
        P.PowerEMA(6.94, given_sigma_rel=0.1)


# --- Weights -----------------------------------------------------------------------------------


def test_weights_validation() -> None:
    assert P.weights(P.Weights((0.25, 0.75)), [None, None]) == [0.25, 0.75]
    assert P.weights(P.Weights((1.0, 3.0), normalize=True), [None, None]) == [0.25, 0.75]
    assert P.weights(P.Weights((-0.5, 1.5)), [None, None]) == [-0.5, 1.5]
    assert P.weights(P.Weights((0.1,) * 10), [None] * 10) == [0.1] * 10  # sums to 1 - 1e-16
    P.Weights((0.333333, 0.333333, 0.333334))
    with pytest.raises(OptionError, match=r"w\.json sum to 0\.9, not 1 \(within 1e-06\)"):
        P.Weights((0.4, 0.5), source="w.json")
    with pytest.raises(OptionError, match="sum to 0: they cannot be normalised"):
        P.Weights((1.0, -1.0), normalize=True)
    with pytest.raises(OptionError, match="weight 2 is not a finite number"):
        P.Weights((1.0, math.nan))
    with pytest.raises(OptionError, match="no weights"):
        P.Weights(())
    with pytest.raises(OptionError, match="2 weights for 3 checkpoints"):
        P.weights(P.Weights((0.5, 0.5)), [None] * 3)


def test_weights_from_json() -> None:
    paths = ["run/ckpt-1.safetensors", "run/ckpt-2.safetensors", "other/checkpoint-3/"]
    assert P.weights_from_json([0.2, 0.3, 0.5], paths).values == (0.2, 0.3, 0.5)
    by_name = {"checkpoint-3": 0.5, "ckpt-1.safetensors": 0.25, "run/ckpt-2.safetensors": 0.25}
    w = P.weights_from_json(by_name, paths, source="mix.json")
    assert w.values == (0.25, 0.25, 0.5) and P.label(w) == "weights-mix"
    cases: list[tuple[object, str]] = [
        ([0.5, 0.5], "mix.json: 2 weights for 3 checkpoints"),
        ({**by_name, "ckpt-9": 0.0}, "'ckpt-9' is none of the checkpoints"),
        ({"ckpt-1.safetensors": 1.0}, "no weight for run/ckpt-2.safetensors"),
        ({**by_name, "run/ckpt-1.safetensors": 0.0}, "name the same checkpoint"),
        ([0.5, "0.25", 0.25], "the weight of run/ckpt-2.safetensors is not a number"),
        ([0.5, True, 0.5], "is not a number: True"),
        ("0.5", "expected a list of weights or an object"),
    ]
    for obj, message in cases:
        with pytest.raises(OptionError, match=re.escape(message)):
            P.weights_from_json(obj, paths, source="mix.json")
    with pytest.raises(OptionError, match="names 2 checkpoints"):
        P.weights_from_json({"m.npz": 1.0}, ["a/m.npz", "b/m.npz"])


# --- labels, windows, warnings, incremental ------------------------------------------------------


def test_labels() -> None:
    assert P.label(P.Decay(0.99)) == "decay-0.99"
    assert P.label(P.Decay(0.999)) == "decay-0.999"
    assert P.label(P.Mean()) == "mean"
    assert P.label(P.DecayPerStep(0.9999)) == "decay-per-step-0.9999"
    assert P.label(P.PowerEMA.from_sigma_rel(0.05)) == "sigma-rel-0.05"
    assert P.label(P.PowerEMA(6.94)) == "gamma-6.94"
    assert P.label(P.Weights((1.0,), source="runs/my mix.json")) == "weights-my_mix"
    profiles: list[P.Profile] = [
        P.Decay(0.99),
        P.Decay(0.999),
        P.Decay(1e-05),
        P.Decay(1),
        P.Decay(0.999, "step"),
        P.Decay(0.999, "index"),
        P.Decay(0.999, 100),
        P.Decay(0.999, zero_debias=True),
        P.Decay(0.999, 100, zero_debias=True),
        P.Mean(),
        P.DecayPerStep(0.999),
        P.DecayPerStep(0.999, "step"),
        P.DecayPerStep(0.999, 100),
        P.PowerEMA.from_sigma_rel(0.1),
        P.PowerEMA(P.sigma_rel_to_gamma(0.1)),
        P.PowerEMA(1e20),
        P.Weights((1.0,)),
        P.Weights((1.0,), source="a.json"),
    ]
    labels = [P.label(p) for p in profiles]
    assert len(set(labels)) == len(labels)
    assert all(re.fullmatch(r"[A-Za-z0-9._+-]+", s) for s in labels), labels


def test_window() -> None:
    steps: list[int | None] = [100, 200, 300, 400]
    win = P.window(P.weights(P.Mean(), steps), steps)
    # the last two hold exactly 50%; 90% needs all four
    assert win["50%"] == {"checkpoints": 2, "first_step": 300, "last_step": 400, "steps": 100}
    assert win["90%"] == {"checkpoints": 4, "first_step": 100, "last_step": 400, "steps": 300}
    # negative weights count by their size: |-1| + |2| = 3, the last holds 2/3
    neg = P.window([-1.0, 2.0], [None, None])
    assert neg["50%"]["checkpoints"] == 1 and neg["90%"]["checkpoints"] == 2
    assert neg["90%"]["steps"] is None
    with pytest.raises(ValueError, match="not all finite"):
        P.window([math.nan], [1])


def test_warning_when_the_profile_is_narrower_than_the_checkpoint_spacing() -> None:
    sparse: list[int | None] = [1000, 2000, 3000]
    text = P.warning(P.PowerEMA.from_sigma_rel(0.05), sparse)
    assert text is not None
    assert text.startswith("sigma-rel-0.05: the profile is 150 steps wide but the last")
    assert "1000 steps apart" in text and "99.9% of the weight" in text
    dense: list[int | None] = list(range(100, 3001, 100))
    assert P.warning(P.PowerEMA.from_sigma_rel(0.05), dense) is None
    assert P.warning(P.DecayPerStep(0.99), sparse) is not None  # width 100 steps
    assert P.warning(P.DecayPerStep(0.9999), sparse) is None  # width 10^4 steps
    assert P.warning(P.Mean(), sparse) is None


def test_incremental() -> None:
    for p in (P.Decay(0.9), P.Mean(), P.DecayPerStep(0.9, "step")):
        assert P.incremental(p) and P.why_not_incremental(p) is None
    for p2 in (P.PowerEMA(1.0), P.Weights((1.0,))):
        assert not P.incremental(p2)
    assert "depends on the last step" in str(P.why_not_incremental(P.PowerEMA(1.0)))
    # a coefficient depends only on its own gap: a saved state continues with the new ones
    for p3 in (P.Mean(), P.DecayPerStep(0.99, "step")):
        steps: list[int | None] = [0, 5, 50, 51, 400]
        full = P.accumulator(p3, steps)
        assert P.accumulator(p3, steps[:3]).coefficients == full.coefficients[:3]
        rng = np.random.default_rng(3)
        xs = [rng.standard_normal(64) for _ in steps]
        state = full.new_state(64, "float64")
        for k in range(3):
            full.update(state, xs[k], k)
        saved = state.copy()
        for k in range(3, 5):
            full.update(saved, xs[k], k)
        assert full.finish(saved, "float64").tobytes() == average(p3, steps, xs).tobytes()


def test_decay_has_no_accumulator() -> None:
    with pytest.raises(TypeError, match="replays through the engine"):
        P.accumulator(P.Decay(0.9), [None])  # type: ignore[arg-type]


# --- the accumulator ----------------------------------------------------------------------------

LINEAR: list[tuple[P.LinearProfile, list[int | None]]] = [
    (P.Mean(), [None] * 5),
    (P.DecayPerStep(0.9, "step"), [0, 3, 4, 20, 21]),
    (P.DecayPerStep(0.99), [10, 20, 25, 60, 100]),
    (P.PowerEMA.from_sigma_rel(0.1), [0, 3, 4, 20, 21]),
    (P.PowerEMA(3.0), [7, 30, 31, 90, 1000]),
    (P.Weights((0.1, 0.2, 0.3, 0.15, 0.25)), [None] * 5),
    (P.Weights((3.0, -1.0, 0.5, 2.0, 1.0), normalize=True), [None] * 5),
]


@pytest.mark.parametrize(("profile", "steps"), LINEAR, ids=[P.label(p) for p, _ in LINEAR])
def test_one_hot_inputs_give_back_each_checkpoints_weight(
    profile: P.LinearProfile, steps: list[int | None]
) -> None:
    w = P.weights(profile, steps)
    for k in range(len(steps)):
        xs = [np.array([1.0 if i == k else 0.0]) for i in range(len(steps))]
        assert float(average(profile, steps, xs)[0]) == w[k]
        x32 = [x.astype(np.float32) for x in xs]
        assert average(profile, steps, x32)[0] == np.float32(w[k])


@pytest.mark.parametrize(("profile", "steps"), LINEAR, ids=[P.label(p) for p, _ in LINEAR])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_within_one_ulp_of_the_exact_formula(
    profile: P.LinearProfile, steps: list[int | None], dtype: str
) -> None:
    """Exact arithmetic (fractions) on the float64 coefficients against the accumulator."""
    rng = np.random.default_rng(len(dtype) + len(P.label(profile)))
    acc = P.accumulator(profile, steps)
    for scale in (1e-3, 1.0, 1e5):
        xs = [(rng.standard_normal(200) * scale).astype(dtype) for _ in steps]
        got = average(profile, steps, xs, block=64)
        for j in range(200):
            col = [Fraction(float(x[j])) for x in xs]
            if acc.kind == "recurrence":
                exact = col[0]
                for k in range(1, len(col)):
                    exact = col[k] + Fraction(acc.coefficients[k]) * (exact - col[k])
            else:
                r = [Fraction(c) for c in acc.coefficients]
                exact = sum((a * b for a, b in zip(r, col, strict=True)), Fraction(0)) / sum(r)
            assert within_ulp(got[j], exact, np.dtype(dtype)), (j, float(got[j]), float(exact))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_power_within_one_ulp_of_the_exact_weights(dtype: str) -> None:
    """gamma 2: the exact weights ((t_k/t_n)^3 - (t_(k-1)/t_n)^3), not their float64 roundings.

    Not for float64 tensors: there the weights' own rounding (half a float64 ulp each) can
    move a result that cancels to well below its inputs by more than an ulp; float64 results
    are within 1 ulp of exact arithmetic on the float64 coefficients (test above)."""
    steps: list[int | None] = [0, 9, 10, 200, 333, 1000]
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal(300).astype(dtype) for _ in steps]
    got = average(P.PowerEMA(2.0), steps, xs)
    ws = [Fraction(int(t or 0), 1000) ** 3 for t in steps]
    exact_w = [b - a for a, b in zip([Fraction(0), *ws], ws, strict=False)]
    for j in range(300):
        exact = sum(
            (w * Fraction(float(x[j])) for w, x in zip(exact_w, xs, strict=True)), Fraction(0)
        )
        assert within_ulp(got[j], exact, np.dtype(dtype))


def test_mean_of_float64_is_compensated() -> None:
    # plain float64 summation of 1, 1e-16 x 10 loses every small term; the compensated sum not
    xs = [np.array([1.0])] + [np.array([1e-16])] * 10
    exact = (1 + Fraction(1e-16) * 10) / 11
    assert float(average(P.Mean(), [None] * 11, xs)[0]) == float(exact)


def test_half_types_are_rounded_once() -> None:
    # float64 -> float32 -> float16 would land on the tie 1 + 2^-11 and round down to 1
    x = np.array([1 + 2**-11 + 2**-40, 1 + 2**-8 + 2**-40, -(1 + 2**-11 + 2**-40)])
    acc = P.accumulator(P.Mean(), [None])
    state = acc.new_state(3, "float32")
    acc.update(state, x, 0)
    assert acc.finish(state, "float16").tolist()[::2] == [1 + 2**-10, -(1 + 2**-10)]
    bf = acc.finish(state, "bfloat16")
    assert bf.dtype.name == "bfloat16" and float(bf[1]) == 1 + 2**-7
    assert acc.finish(state, BF16).dtype == BF16
    halves = np.array([np.inf, -np.inf, np.nan, 1e-30, 70000.0, 0.0])
    state = acc.new_state(6, "float32")
    acc.update(state, halves, 0)
    with np.errstate(over="ignore"):
        assert np.array_equal(
            acc.finish(state, "float16"), halves.astype(np.float16), equal_nan=True
        )
        assert np.array_equal(acc.finish(state, "bfloat16"), halves.astype(BF16), equal_nan=True)


def test_non_finite_inputs_follow_the_plain_arithmetic() -> None:
    steps: list[int | None] = [1, 2, 3]
    for profile in (P.Mean(), P.DecayPerStep(0.9), P.PowerEMA(1.0)):
        xs = [np.array([np.inf, 1.0, np.nan, 1e300]), np.array([1.0, -np.inf, 0.0, 1e300])]
        xs.append(np.array([1.0, 2.0, 0.0, 1e300]))
        f64 = average(profile, steps, xs)
        f32 = average(profile, steps, [x[:3].astype(np.float32) for x in xs])
        assert np.array_equal(f64[:3], f32, equal_nan=True)
        assert f64[3] == 1e300


# --- properties ---------------------------------------------------------------------------------


@st.composite
def cases(draw: st.DrawFn) -> tuple[P.LinearProfile, list[int | None], list[np.ndarray]]:
    n = draw(st.integers(1, 5))
    steps: list[int | None] = []
    steps.extend(sorted(draw(st.sets(st.integers(0, 10**6), min_size=n, max_size=n))))
    dtype = draw(st.sampled_from(["float32", "float64", "bfloat16"]))
    options: list[P.LinearProfile] = [
        P.Mean(),
        P.DecayPerStep(draw(st.sampled_from([0.0, 0.5, 0.9, 0.999, 1.0])), "step"),
        P.DecayPerStep(0.99),
        P.PowerEMA(draw(st.floats(0, 50))),
        P.PowerEMA.from_sigma_rel(draw(st.floats(0.01, 0.28))),
        P.Weights(
            tuple(draw(st.lists(st.floats(0.01, 1), min_size=n, max_size=n))),
            normalize=True,
        ),
    ]
    profile = draw(st.sampled_from(options))
    element = st.floats(-1e6, 1e6, width=32, allow_subnormal=False)
    rows = draw(st.lists(st.lists(element, min_size=4, max_size=4), min_size=n, max_size=n))
    xs = [np.array(r, dtype=np.float64).astype(P._dtype(dtype)) for r in rows]
    return profile, steps, xs


@settings(max_examples=150, deadline=None)
@given(cases())
def test_the_average_lies_between_the_inputs(
    case: tuple[P.LinearProfile, list[int | None], list[np.ndarray]],
) -> None:
    profile, steps, xs = case
    got = average(profile, steps, xs).astype(np.float64)
    stack = np.stack([x.astype(np.float64) for x in xs])
    assert np.all(stack.min(axis=0) <= got) and np.all(got <= stack.max(axis=0))


@settings(max_examples=100, deadline=None)
@given(cases())
def test_a_constant_sequence_stays_exactly_constant(
    case: tuple[P.LinearProfile, list[int | None], list[np.ndarray]],
) -> None:
    # Exact for every linear profile and dtype: the sum profiles divide by the exact sum of
    # their coefficients, and the recurrence's x + P (s - x) adds exactly 0. Only the sign of
    # a zero is not kept: 0 + (-0) is +0.
    profile, steps, xs = case
    same = [xs[0]] * len(xs)
    got = average(profile, steps, same)
    assert got.dtype == xs[0].dtype and np.array_equal(got, xs[0])


# --- the same bits on every CPU ---------------------------------------------------------------


def digest() -> str:
    """sha256 of every linear profile's result on every dtype, large enough for SIMD loops."""
    rng = np.random.default_rng(2024)
    h = hashlib.sha256()
    for profile, steps in LINEAR:
        for dtype in ("float16", "bfloat16", "float32", "float64"):
            xs = [
                (rng.standard_normal(5000) * 10.0 ** rng.integers(-3, 4)).astype(P._dtype(dtype))
                for _ in steps
            ]
            h.update(average(profile, steps, xs, block=4096).tobytes())
        h.update(repr(P.weights(profile, steps)).encode())
    return h.hexdigest()


def test_bits_are_identical_with_numpys_avx512_paths_switched_off() -> None:
    env = {**os.environ, "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SKX"}
    code = (
        "from numpy._core._multiarray_umath import __cpu_features__ as f; "
        "import tests.test_profiles as t; print(f.get('AVX512_SKX'), t.digest())"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0 and "NPY_DISABLE_CPU_FEATURES" in proc.stderr:
        pytest.skip(f"this numpy cannot switch those paths off: {proc.stderr.strip()[-200:]}")
    assert proc.returncode == 0, proc.stderr
    avx512, other = proc.stdout.split()
    assert avx512 in ("False", "None")
    assert other == digest()


def test_importing_profiles_stays_light() -> None:
    code = (
        "import sys, ema_cli.profiles; print(sorted(m for m in sys.modules if m.split('.')[0] "
        "in ('ml_dtypes', 'fractions', 'decimal', 'safetensors', 'h5py', 'click', 'rich')))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("kernels_on", [True, False], ids=["kernels", "numpy"])
@pytest.mark.parametrize("kind", ["sum", "recurrence"])
@pytest.mark.parametrize("name", ["float16", "bfloat16", "float32", "float64"])
def test_colliding_nans_give_the_same_nan_on_every_path(
    name: str, kind: str, kernels_on: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NaN + NaN: which NaN comes out is fixed (the sum's NaN wins in a sum, the checkpoint's
    in the recurrence), whether the C kernel or numpy's passes compute it, at any of numpy's
    dispatch levels (``test_determinism`` runs those); worked out here by hand."""
    from ema_cli import kernels
    from tests.test_determinism import QUIET_NAN

    if not kernels_on:
        monkeypatch.setattr(kernels, "_enabled", False)
    elif not kernels._enabled:
        pytest.skip("no C kernels here")
    dtype = P._dtype(name)
    uint = np.dtype(f"u{dtype.itemsize}")
    sign = 1 << (8 * dtype.itemsize - 1)
    nan, default = QUIET_NAN[name], QUIET_NAN[name] | sign

    def bits(*values: int) -> np.ndarray:  # 8 times over: numpy's SIMD loops (and their NaN
        return np.tile(np.array(values, dtype=uint), 8).view(dtype)  # rules) need 8 or more

    one = int(np.array(1.0, dtype=dtype).view(uint))
    inf = int(np.array(np.inf, dtype=dtype).view(uint))
    signalling = inf | 1  # a NaN without the quiet bit: arithmetic quiets it
    # lane 0: a NaN of another payload in each checkpoint, the last one negative; lane 1: one
    # NaN, in the second; lane 2: +inf, -inf (their sum is the default NaN, negative), a NaN;
    # lane 3: a signalling NaN first, numbers after it
    checkpoints = [
        bits(nan | 1, one, inf, signalling),
        bits(nan | 2, nan | 2, inf | sign, one),
        bits(nan | 3 | sign, one, nan | 3, one),
    ]
    if kind == "sum":
        accumulator = P.Accumulator("sum", (1.0, 0.5, 0.25), (1.75, 0.0))
        want = [nan | 1, nan | 2, default, nan | 1]  # the first NaN each lane saw stays
    else:
        accumulator = P.Accumulator("recurrence", (0.0, 0.5, 0.5))
        # a checkpoint's NaN replaces the state's
        want = [nan | 3 | sign, nan | 2, nan | 3, nan | 1]
    if name == "bfloat16":  # ml_dtypes' rounding to bfloat16 keeps a NaN's sign, not its payload
        want = [w & ~0x3F for w in want]
    state = accumulator.new_state(32, dtype)
    for k, x in enumerate(checkpoints):  # no warnings either (the tests make them errors)
        accumulator.update(state, x, k)
    with np.errstate(all="ignore"):
        got = accumulator.finish(state, dtype, np.empty(32, dtype), np.empty(32))
    assert [hex(b) for b in got.view(uint)] == [hex(w) for w in want * 8]


def test_colliding_nans_at_numpys_lowest_dispatch_level() -> None:
    """The test above again with numpy's SSE loops, which return the other NaN of an
    addition: there the rule is what makes numpy's path agree with the kernel's."""
    from tests.test_determinism import dispatch_levels

    env = dict(os.environ, NPY_DISABLE_CPU_FEATURES=" ".join(dispatch_levels()))
    test = "tests/test_profiles.py::test_colliding_nans_give_the_same_nan_on_every_path"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:]
