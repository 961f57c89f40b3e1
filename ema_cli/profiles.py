"""Averaging profiles: which weight each checkpoint gets in the average (issue 13).

Pure maths: no files, no printing, nothing from the project but ``engine``, ``kernels`` (the
one-pass C sums, same bits as the numpy code) and ``errors``. A
profile is a small frozen dataclass; ``weights(profile, steps)`` gives every checkpoint's share of
the final average (float64, replay order), ``label(profile)`` names its output, and
``accumulator(profile, steps)`` streams tensor blocks through the linear profiles.

=================  ====================================================================
profile            checkpoint ``k`` of ``n`` (steps ``t_1 < ... < t_n``, ``t_0 = 0``)
=================  ====================================================================
``Decay``          TF's replay, one ``apply`` per checkpoint: ``c_k * prod_{i>k} (1 - c_i)``
                   (``engine.contribution_weights``); the replay stays the engine's
``Mean``           ``1 / n``
``DecayPerStep``   decay applied at every training *step*: ``(1 - P_k) prod_{i>k} P_i``,
                   ``P_k`` the product of the per-step decays over the gap before checkpoint k
``PowerEMA``       Karras et al. 2024 (EDM2): weight ``tau^gamma`` on training time ``tau``:
                   ``(t_k^(g+1) - t_(k-1)^(g+1)) / t_n^(g+1)``
``Weights``        given by the user, one per checkpoint
=================  ====================================================================

Determinism. Everything that reaches output bytes is computed with IEEE ``+ - * /`` (Python
floats, numpy's ``add``/``subtract``/``multiply``/``divide``, which are correctly rounded in
every SIMD variant), exact ``fractions.Fraction``/``int`` arithmetic, and the standard library's
``decimal`` module for the few transcendental functions (``ln``, ``exp``, integer powers).
``decimal`` (libmpdec, or ``_pydecimal``) works in integer arithmetic, so it gives the same digits
on every CPU and OS; its ``exp`` and ``ln`` are correctly rounded to the context's 50 digits, and
rounding those to float64 gives the correctly rounded float64 except within 1e-50 of a tie. No
libm call and no numpy transcendental ufunc (whose bits differ between AVX2 and AVX-512 builds)
is used for anything but warning texts.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypedDict, cast

import numpy as np
import numpy.typing as npt

from ema_cli import engine, kernels
from ema_cli.errors import OptionError

if TYPE_CHECKING:  # imported lazily at run time: start-up time matters
    from decimal import Context, Decimal
    from fractions import Fraction

Float64Array = npt.NDArray[np.float64]

#: ``Weights`` must sum to 1 within this (absolute, on the exact sum) unless ``normalize``.
WEIGHTS_TOLERANCE = 1e-6
#: The largest float ``s`` with ``12 s^2 <= 1``: ``sigma_rel`` of ``gamma = 0`` (a uniform average).
SIGMA_REL_MAX = 0.28867513459481287
#: Scratch lanes ``Accumulator.update`` needs (float64, the block's shape each).
SCRATCH_LANES = 6
#: Significant digits of the ``decimal`` computations (ln, exp, powers, products of decays).
_DIGITS = 50
_SPLIT = 134217729.0  # 2^27 + 1: Dekker's splitter for float64
_UNSAFE_LABEL = re.compile(r"[^A-Za-z0-9._+-]")


# --- the profiles -------------------------------------------------------------------------------


def _check_decay(decay: float) -> None:
    if not (0.0 <= decay <= 1.0):  # also refuses NaN
        raise OptionError(f"decay must be between 0 and 1, got {decay!r}")


def _check_fixed_count(num_updates: object) -> None:
    if isinstance(num_updates, bool) or (isinstance(num_updates, int) and num_updates < 0):
        raise OptionError(f"num_updates must be a count >= 0, got {num_updates!r}")


@dataclass(frozen=True)
class Decay:
    """Today's TF-exact replay: one ``apply`` per checkpoint (see ``engine``).

    ``c_k = float32(1) - effective_decay(decay, n_k)`` with ``n_k`` the fixed count, the
    checkpoint's step (``"step"``) or its 0-based position (``"index"``). The weights are for
    display; the average itself is the engine's recurrence, rounded in the tensor's dtype.
    """

    decay: float
    num_updates: int | Literal["step", "index"] | None = None
    zero_debias: bool = False

    def __post_init__(self) -> None:
        _check_decay(self.decay)
        _check_fixed_count(self.num_updates)
        if isinstance(self.num_updates, str) and self.num_updates not in ("step", "index"):
            raise OptionError(
                f"num_updates must be a count, 'step' or 'index', got {self.num_updates!r}"
            )


@dataclass(frozen=True)
class Mean:
    """The uniform average: ``sum(x_k) / n``, the sum accumulated in float64 in replay order."""


@dataclass(frozen=True)
class DecayPerStep:
    """The EMA a training loop would have held had it applied the decay at every step.

    The per-step decay at step ``m`` is ``d_m = D`` (``num_updates`` off), ``min(D, (1+N)/(10+N))``
    for a fixed ``N`` (the same at every step, as TF reads a fixed ``num_updates``), or
    ``min(D, (1+m)/(10+m))`` with ``"step"`` (the step number itself is TF's usual
    ``num_updates``). ``D = float32(decay)``, the value TF stores, so checkpoints saved at every
    step give ``Decay``'s weights; the ramp is the exact rational, which is what makes its product
    over a gap a closed form (TF's float32 ramp differs by at most half a float32 ulp per step).

    The checkpoints stand for the weights between them: over a gap ``a < b`` the training weights
    are taken to be the later checkpoint's, so the shadow goes from ``s`` to
    ``P s + (1 - P) x_b`` with ``P = prod_{m=a+1..b} d_m``. The shadow starts at the first
    checkpoint (``s = x_1``), as TF's does. ``"index"`` counts checkpoints, not steps: refused.
    """

    decay: float
    num_updates: int | Literal["step"] | None = None

    def __post_init__(self) -> None:
        _check_decay(self.decay)
        _check_fixed_count(self.num_updates)
        if isinstance(self.num_updates, str) and self.num_updates != "step":
            raise OptionError(
                f"decay-per-step num_updates must be a count or 'step', got {self.num_updates!r}"
                + (
                    " ('index' counts checkpoints, and this profile decays at every step)"
                    if self.num_updates == "index"
                    else ""
                )
            )


@dataclass(frozen=True)
class PowerEMA:
    """EDM2's power-function EMA: weight proportional to ``tau^gamma`` on training time ``tau``.

    ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))`` is the profile's standard
    deviation relative to its length. Build it with ``PowerEMA(gamma)`` or
    ``PowerEMA.from_sigma_rel(s)``; ``given_sigma_rel`` remembers the latter (it names the output).
    """

    gamma: float
    given_sigma_rel: float | None = None

    def __post_init__(self) -> None:
        if not (0.0 <= self.gamma < math.inf):
            raise OptionError(
                f"gamma must be a finite number >= 0, got {self.gamma!r} (gamma 0 is the "
                "uniform average; larger gammas weight recent checkpoints more)"
            )
        if self.given_sigma_rel is not None and sigma_rel_to_gamma(self.given_sigma_rel) != (
            self.gamma
        ):
            raise OptionError(
                f"gamma {self.gamma!r} is not the gamma of sigma_rel {self.given_sigma_rel!r}: "
                "use PowerEMA.from_sigma_rel"
            )

    @classmethod
    def from_sigma_rel(cls, sigma_rel: float) -> PowerEMA:
        return cls(sigma_rel_to_gamma(sigma_rel), given_sigma_rel=sigma_rel)

    @property
    def sigma_rel(self) -> float:
        if self.given_sigma_rel is not None:
            return self.given_sigma_rel
        return gamma_to_sigma_rel(self.gamma)


@dataclass(frozen=True)
class Weights:
    """Any linear combination: one weight per checkpoint, in replay order.

    Refused unless the exact sum is within ``WEIGHTS_TOLERANCE`` of 1, or ``normalize`` (any
    nonzero sum). Either way the weights are applied divided by their exact sum, so they sum to
    exactly 1 and a constant tensor stays that constant. Negative weights (extrapolation) are
    allowed. ``source`` is the weights file as given: its stem names the output.
    """

    values: tuple[float, ...]
    normalize: bool = False
    source: str = ""

    def __post_init__(self) -> None:
        from fractions import Fraction

        where = f" in {self.source}" if self.source else ""
        if not self.values:
            raise OptionError(f"no weights{where}")
        for i, v in enumerate(self.values):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise OptionError(f"weight {i + 1}{where} is not a finite number: {v!r}")
        total = sum((Fraction(v) for v in self.values), Fraction(0))
        if total == 0:
            raise OptionError(f"the weights{where} sum to 0: they cannot be normalised")
        if not self.normalize and abs(total - 1) > Fraction(WEIGHTS_TOLERANCE):
            raise OptionError(
                f"the weights{where} sum to {float(total)!r}, not 1 (within "
                f"{WEIGHTS_TOLERANCE:g}): correct them, or normalise them (divide by their sum)"
            )


Profile = Decay | Mean | DecayPerStep | PowerEMA | Weights
#: The profiles ``accumulator`` streams (``Decay`` replays through the engine's recurrence).
LinearProfile = Mean | DecayPerStep | PowerEMA | Weights


# --- sigma_rel <-> gamma ------------------------------------------------------------------------


def gamma_to_sigma_rel(gamma: float) -> float:
    """``sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))`` in float64 (IEEE ops and the
    correctly rounded ``math.sqrt``: the same bits everywhere, within 3 ulp of the exact value)."""
    if not (0.0 <= gamma < math.inf):
        raise OptionError(f"gamma must be a finite number >= 0, got {gamma!r}")
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) * (gamma + 2.0) * (gamma + 3.0)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The ``gamma >= 0`` with ``sigma_rel^2 (gamma + 2)^2 (gamma + 3) = gamma + 1``.

    ``sigma_rel`` falls strictly from ``1/sqrt(12)`` (``gamma = 0``) to 0 as ``gamma`` grows, so
    the root is unique; ``sigma_rel`` must be in ``(0, SIGMA_REL_MAX]``. Solved by bisection over
    float64 with the residual's sign evaluated exactly (``Fraction``), then the exact midpoint of
    the last two floats decides: the result is the correctly rounded root for the given float
    ``sigma_rel``, identical on every machine. (EDM2's ``std_to_exp`` takes the largest real root
    of the same cubic, ``gamma^3 + 7 gamma^2 + (16 - t) gamma + 12 - t`` with ``t = sigma_rel^-2``,
    from ``np.roots``: companion-matrix eigenvalues, equal to about 1e-14 relative, with last bits
    that depend on the LAPACK build.) The root lies in ``[0, 1/sigma_rel)``: at ``gamma =
    1/sigma_rel`` the residual is ``-6 - 16 s - 12 s^2 < 0``.
    """
    from fractions import Fraction

    s = sigma_rel
    if not (s > 0.0 and s <= SIGMA_REL_MAX):  # also refuses NaN
        raise OptionError(
            f"sigma_rel must be above 0 and at most {SIGMA_REL_MAX!r} (= 1/sqrt(12), gamma 0: "
            f"the uniform average); got {s!r}. Typical values are 0.05 to 0.2"
        )
    s2 = Fraction(s) ** 2

    def residual(g: float | Fraction) -> Fraction:  # > 0 below the root, < 0 above it
        G = Fraction(g)
        return (G + 1) - s2 * (G + 2) ** 2 * (G + 3)

    if residual(0.0) == 0:
        return 0.0
    lo, hi = 0.0, 1.0 / s
    for _ in range(4096):  # ~60 halvings; up to ~1100 when the root is near 0
        mid = lo + (hi - lo) * 0.5
        if not lo < mid < hi:
            break
        if residual(mid) >= 0:
            lo = mid
        else:
            hi = mid
    middle = residual((Fraction(lo) + Fraction(hi)) / 2)
    if residual(lo) == 0 or middle < 0:
        return lo
    if middle > 0:
        return hi
    return lo if float.hex(lo)[-1] in "02468ace" else hi  # a tie: the even one


# --- weights ------------------------------------------------------------------------------------


def _context() -> Context:
    import decimal

    return decimal.Context(
        prec=_DIGITS,
        rounding=decimal.ROUND_HALF_EVEN,
        Emin=decimal.MIN_EMIN,
        Emax=decimal.MAX_EMAX,
        traps=[decimal.InvalidOperation, decimal.DivisionByZero, decimal.Overflow],
    )


def _strict_steps(profile: Profile, steps: Sequence[int | None]) -> list[int]:
    out: list[int] = []
    for k, t in enumerate(steps):
        if t is None:
            raise OptionError(
                f"{label(profile)} needs every checkpoint's step number; checkpoint {k + 1} has none"
            )
        if t < 0:
            raise OptionError(f"{label(profile)}: step {t} (checkpoint {k + 1}) is negative")
        if out and t <= out[-1]:
            raise OptionError(
                f"{label(profile)} needs strictly increasing steps: step {t} (checkpoint "
                f"{k + 1}) follows step {out[-1]}"
            )
        out.append(t)
    if not out:
        raise OptionError(f"{label(profile)}: no checkpoints")
    return out


def _ramp_start(d: Fraction) -> int | None:
    """The first step ``m >= 0`` whose ramp ``(1+m)/(10+m)`` is at least ``d`` (None: never)."""
    if d >= 1:
        return None
    # (1 + m) >= d (10 + m)  <=>  m >= (10 d - 1) / (1 - d)
    bound = (10 * d - 1) / (1 - d)
    return max(0, -((-bound.numerator) // bound.denominator))


def _gap_decay(profile: DecayPerStep, a: int, b: int, ctx: Context) -> float:
    """``P = prod_{m=a+1..b} d_m`` (see ``DecayPerStep``), correctly rounded to float64.

    Over the ramp the product telescopes: ``prod_{m=a+1..e} (1+m)/(10+m) = prod_{j=2..10}
    (a+j)/(e+j)``, exact in integers. A constant ``d`` over ``g`` steps is ``d^g``, a ``decimal``
    integer power (binary powering, 50 digits, deterministic). A gap of 10^6 steps costs ~20
    multiplications, not 10^6.
    """
    from decimal import Decimal
    from fractions import Fraction

    big_d = Fraction(float(np.float32(profile.decay)))
    ramp = Fraction(1)
    constant_steps = b - a
    d = big_d
    if isinstance(profile.num_updates, int):
        d = min(big_d, Fraction(1 + profile.num_updates, 10 + profile.num_updates))
    elif profile.num_updates == "step":
        start = _ramp_start(big_d)
        last_ramp = b if start is None else min(b, start - 1)
        if last_ramp > a:
            num = math.prod(a + j for j in range(2, 11))
            den = math.prod(last_ramp + j for j in range(2, 11))
            ramp = Fraction(num, den)
        constant_steps = b - max(a, last_ramp)
    power = ctx.power(ctx.divide(Decimal(d.numerator), Decimal(d.denominator)), constant_steps)
    exact_ramp = ctx.divide(Decimal(ramp.numerator), Decimal(ramp.denominator))
    return float(ctx.multiply(exact_ramp, power))


def gap_decays(profile: DecayPerStep, steps: Sequence[int | None]) -> list[float]:
    """``P_k`` for every checkpoint ``k >= 1`` (``P_0 = 0.0``: the shadow starts at ``x_1``)."""
    ts = _strict_steps(profile, steps)
    ctx = _context()
    return [0.0] + [_gap_decay(profile, a, b, ctx) for a, b in itertools.pairwise(ts)]


def _power_raw(profile: PowerEMA, steps: Sequence[int | None]) -> list[float]:
    """``F(t_k) - F(t_(k-1))`` with ``F(t) = (t / t_n)^(gamma + 1)``, in ``decimal`` (50 digits),
    each rounded once to float64. ``F(0) = 0``, ``F(t_n) = 1``; normalising by ``t_n`` first keeps
    everything in [0, 1]. A single checkpoint (even at step 0) gets all the weight."""
    from decimal import Decimal

    ts = _strict_steps(profile, steps)
    tn = ts[-1]
    if len(ts) == 1:
        return [1.0]
    ctx = _context()
    exponent = ctx.add(Decimal(profile.gamma), 1)

    def cumulative(t: int) -> Decimal:
        if t == 0:
            return Decimal(0)
        if t == tn:
            return Decimal(1)
        return ctx.exp(ctx.multiply(exponent, ctx.ln(ctx.divide(Decimal(t), Decimal(tn)))))

    out: list[float] = []
    previous = Decimal(0)
    for t in ts:
        now = cumulative(t)
        out.append(float(ctx.subtract(now, previous)))
        previous = now
    return out


def _raw_weights(profile: Mean | PowerEMA | Weights, steps: Sequence[int | None]) -> list[float]:
    """The float64 weights the sum profiles multiply by, before dividing by their exact sum."""
    if isinstance(profile, Mean):
        if not steps:
            raise OptionError("mean: no checkpoints")
        return [1.0] * len(steps)
    if isinstance(profile, PowerEMA):
        return _power_raw(profile, steps)
    if len(profile.values) != len(steps):
        where = f" in {profile.source}" if profile.source else ""
        raise OptionError(
            f"{len(profile.values)} weights{where} for {len(steps)} checkpoints: give one per "
            "checkpoint, in replay order"
        )
    return [float(v) for v in profile.values]


def _num_updates_at(profile: Decay, k: int, step: int | None) -> int | None:
    if profile.num_updates == "index":
        return k
    if profile.num_updates == "step":
        if step is None:
            raise OptionError(
                f"{label(profile)}: num_updates 'step' needs every checkpoint's step number; "
                f"checkpoint {k + 1} has none"
            )
        return step
    return profile.num_updates


def decay_coefficients(profile: Decay, steps: Sequence[int | None]) -> list[float]:
    """Each apply's ``c_k = float32(1) - effective_decay(decay, n_k)`` (float32, as a float)."""
    return [
        float(
            np.float32(1.0) - engine.effective_decay(profile.decay, _num_updates_at(profile, k, t))
        )
        for k, t in enumerate(steps)
    ]


def weights(profile: Profile, steps: Sequence[int | None]) -> list[float]:
    """Every checkpoint's share of the final average, in replay order (float64).

    ``steps`` are the checkpoints' step numbers in replay order (None where unknown; only
    ``DecayPerStep``, ``PowerEMA`` and ``Decay`` with ``num_updates="step"`` need them, strictly
    increasing). These are each checkpoint's real contribution: feeding the accumulator a
    one-hot sequence returns them (for float64 tensors, to the last bit).

    * ``Decay``: ``engine.contribution_weights`` of the float32 coefficients; they sum to 1
      except under zero debias with a varying ``c`` (TF's bias factor uses the last ``c``).
    * ``DecayPerStep``: ``w_1 = prod_{i>1} P_i``, ``w_k = (1 - P_k) prod_{i>k} P_i`` (real
      arithmetic on the float64 ``P_i``, 50 digits, rounded once): they sum to 1.
    * ``Mean``, ``PowerEMA``, ``Weights``: ``r_k / sum(r)`` with ``r`` the float64 raw weights
      (``1``; ``F(t_k) - F(t_(k-1))``; the given values) and the sum exact, rounded once.
    """
    from decimal import Decimal
    from fractions import Fraction

    if isinstance(profile, Decay):
        return engine.contribution_weights(
            decay_coefficients(profile, steps), zero_debias=profile.zero_debias
        )
    if isinstance(profile, DecayPerStep):
        p = gap_decays(profile, steps)
        ctx = _context()
        out = [0.0] * len(p)
        keep = Decimal(1)
        for k in range(len(p) - 1, 0, -1):
            out[k] = float(ctx.multiply(ctx.subtract(1, Decimal(p[k])), keep))
            keep = ctx.multiply(keep, Decimal(p[k]))
        out[0] = float(keep)
        return out
    raw = _raw_weights(profile, steps)
    total = sum((Fraction(r) for r in raw), Fraction(0))
    return [float(Fraction(r) / total) for r in raw]


# --- naming, windows, warnings, incremental runs ------------------------------------------------


def _number(value: float) -> str:
    return repr(float(value))  # shortest round-trip form: 0.99, 1e-05, 6.94


def label(profile: Profile) -> str:
    """A stable, filesystem-safe name for the profile's output.

    Rule: the profile's kind, then its defining number in Python's shortest round-trip form
    (``repr``), then the settings that differ from the defaults:

    ``decay-0.99``, ``decay-0.999-nu-step``, ``decay-0.999-nu-100``, ``decay-0.999-nu-index``,
    ``decay-0.999-zero-debias``; ``mean``; ``decay-per-step-0.9999`` (``-nu-step``,
    ``-nu-N``); ``sigma-rel-0.05`` (built from sigma_rel) or ``gamma-6.94`` (from gamma);
    ``weights-<stem of the weights file>`` (``weights`` without a file). Characters outside
    ``A-Za-z0-9._+-`` in a file stem become ``_``. The CLI inserts it before the output's
    format suffix: ``-o ema.safetensors --decay 0.99`` -> ``ema.decay-0.99.safetensors``.
    Distinct profiles get distinct labels, except ``Weights`` from files with the same stem.
    """
    if isinstance(profile, Decay | DecayPerStep):
        kind = "decay" if isinstance(profile, Decay) else "decay-per-step"
        text = f"{kind}-{_number(profile.decay)}"
        if profile.num_updates is not None:
            text += f"-nu-{profile.num_updates}"
        if isinstance(profile, Decay) and profile.zero_debias:
            text += "-zero-debias"
        return text
    if isinstance(profile, Mean):
        return "mean"
    if isinstance(profile, PowerEMA):
        if profile.given_sigma_rel is not None:
            return f"sigma-rel-{_number(profile.given_sigma_rel)}"
        return f"gamma-{_number(profile.gamma)}"
    if not profile.source:
        return "weights"
    stem = os.path.splitext(os.path.basename(profile.source.rstrip("/\\")))[0]
    return "weights-" + _UNSAFE_LABEL.sub("_", stem)


class WindowPart(TypedDict):
    """The last ``checkpoints`` checkpoints, from ``first_step`` to ``last_step`` (``steps``
    apart; None when a step is unknown)."""

    checkpoints: int
    first_step: int | None
    last_step: int | None
    steps: int | None


def window(weights: Sequence[float], steps: Sequence[int | None]) -> dict[str, WindowPart]:
    """The effective window: the fewest last checkpoints holding 50% and 90% of the weight.

    Shares are ``|w_k| / sum |w|`` (absolute values, so the negative weights ``Weights`` allows
    count by their size), summed exactly from the last checkpoint back; a share of exactly 50%
    counts as holding it. Keys ``"50%"`` and ``"90%"``.
    """
    from fractions import Fraction

    if len(weights) != len(steps) or not weights:
        raise ValueError(f"{len(weights)} weights for {len(steps)} steps")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError("the weights are not all finite numbers")
    sizes = [abs(Fraction(w)) for w in weights]
    total = sum(sizes, Fraction(0))
    if total == 0:
        raise ValueError("the weights are all zero")
    out: dict[str, WindowPart] = {}
    for key, share in (("50%", Fraction(1, 2)), ("90%", Fraction(9, 10))):
        held, count = Fraction(0), 0
        while held < share * total:
            count += 1
            held += sizes[-count]
        first, last = steps[-count], steps[-1]
        span = last - first if first is not None and last is not None else None
        out[key] = WindowPart(checkpoints=count, first_step=first, last_step=last, steps=span)
    return out


def warning(profile: Profile, steps: Sequence[int | None]) -> str | None:
    """A warning text when the checkpoints are too sparse to represent the profile, else None.

    The profile's *width*, in steps: ``sigma_rel * t_n`` for ``PowerEMA`` (its standard
    deviation: ``sigma_rel`` is relative to the profile's length ``t_n``) and ``1 / (1 - d)`` for
    ``DecayPerStep`` (the EMA's time constant, ``d`` the decay at the last step). It is compared
    with the *spacing* where the profile is densest, the last gap ``t_n - t_(n-1)`` (with
    ``t_0 = 0`` for ``PowerEMA``, whose weight starts at step 0): a width below the spacing means
    the last checkpoint alone carries most of the profile. Display only (libm and ``%g``).
    """
    if isinstance(profile, PowerEMA):
        ts = _strict_steps(profile, steps)
        gap = ts[-1] - (ts[-2] if len(ts) > 1 else 0)
        width = profile.sigma_rel * ts[-1]
        advice = "save checkpoints more often, or choose a larger sigma_rel"
    elif isinstance(profile, DecayPerStep):
        ts = _strict_steps(profile, steps)
        if len(ts) < 2:
            return None
        gap = ts[-1] - ts[-2]
        d = float(np.float32(profile.decay))
        n = profile.num_updates
        if n is not None:
            m = ts[-1] if n == "step" else n
            d = min(d, (1 + m) / (10 + m))
        if d >= 1.0:
            return None
        width = 1.0 / (1.0 - d)
        advice = "save checkpoints more often, or choose a decay closer to 1"
    else:
        return None
    if width >= gap:
        return None
    share = weights(profile, steps)[-1]
    return (
        f"{label(profile)}: the profile is {width:.4g} steps wide but the last checkpoints are "
        f"{gap} steps apart: too few checkpoints to represent it (the last one alone gets "
        f"{share:.1%} of the weight); {advice}"
    )


def why_not_incremental(profile: Profile) -> str | None:
    """None when ``--state`` can fold new checkpoints into a saved state, else the reason.

    ``Decay``: the engine state. ``Mean``: the float64 sum (the count is the number folded in).
    ``DecayPerStep``: the shadow and the last step folded in (``P`` needs only the two steps).
    """
    if isinstance(profile, PowerEMA):
        return (
            f"{label(profile)}: every checkpoint's weight depends on the last step t_n, so a new "
            "checkpoint changes all of them"
        )
    if isinstance(profile, Weights):
        return (
            f"{label(profile)}: the weights are given for the whole list of checkpoints, so a new "
            "checkpoint needs new weights"
        )
    return None


def incremental(profile: Profile) -> bool:
    """Whether ``--state`` runs can fold new checkpoints in (see ``why_not_incremental``)."""
    return why_not_incremental(profile) is None


def weights_from_json(
    obj: object, paths: Sequence[str], *, source: str = "", normalize: bool = False
) -> Weights:
    """A ``Weights`` profile from a parsed weights file.

    ``obj`` is a list (one number per checkpoint, in replay order) or an object ``{checkpoint:
    weight}`` keyed by each checkpoint's path as given or its file/folder name (a trailing ``/``
    is ignored). Every checkpoint needs a weight (0 is fine) and every key must name exactly one.
    """
    where = f"{source}: " if source else ""
    if isinstance(obj, list):
        values: list[object] = list(obj)
        if len(values) != len(paths):
            raise OptionError(
                f"{where}{len(values)} weights for {len(paths)} checkpoints: give one per "
                "checkpoint, in replay order"
            )
    elif isinstance(obj, dict):
        names = [{p.rstrip("/\\"), os.path.basename(p.rstrip("/\\"))} for p in paths]
        slots: list[object] = [None] * len(paths)
        keys: list[str | None] = [None] * len(paths)
        for key, value in obj.items():
            wanted = str(key).rstrip("/\\")
            hits = [i for i, n in enumerate(names) if wanted in n]
            if not hits:
                raise OptionError(f"{where}{key!r} is none of the checkpoints")
            if len(hits) > 1:
                raise OptionError(
                    f"{where}{key!r} names {len(hits)} checkpoints ({paths[hits[0]]}, "
                    f"{paths[hits[1]]}): use the path"
                )
            if keys[hits[0]] is not None:
                raise OptionError(f"{where}{key!r} and {keys[hits[0]]!r} name the same checkpoint")
            keys[hits[0]] = str(key)
            slots[hits[0]] = value
        missing = [paths[i] for i, k in enumerate(keys) if k is None]
        if missing:
            raise OptionError(f"{where}no weight for {missing[0]} (give it 0 to leave it out)")
        values = slots
    else:
        raise OptionError(
            f"{where}expected a list of weights or an object {{checkpoint: weight}}, "
            f"got {type(obj).__name__}"
        )
    numbers: list[float] = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise OptionError(f"{where}the weight of {paths[i]} is not a number: {v!r}")
        numbers.append(float(v))
    return Weights(tuple(numbers), normalize=normalize, source=source)


# --- streaming accumulation ---------------------------------------------------------------------


def lanes(dtype: npt.DTypeLike) -> int:
    """float64 lanes of state per element: 2 (value and compensation) for float64 tensors, 1
    otherwise."""
    return 2 if _dtype(dtype).name == "float64" else 1


def _dtype(dtype: npt.DTypeLike) -> np.dtype[np.generic]:
    if isinstance(dtype, str) and dtype == "bfloat16":
        import ml_dtypes

        return cast(np.dtype[np.generic], np.dtype(ml_dtypes.bfloat16))
    return np.dtype(dtype)


def _split(value: float) -> tuple[float, float]:
    """Dekker's split: ``value = high + low`` exactly, each half of at most 26 bits."""
    c = _SPLIT * value
    high = c - (c - value)
    return high, value - high


def _two_product(
    w: float,
    x: Float64Array,
    p: Float64Array,
    e: Float64Array,
    t: tuple[Float64Array, Float64Array, Float64Array],
) -> None:
    """Dekker's TwoProduct with IEEE ops only (no FMA): ``p = fl(w x)`` and ``p + e = w x``
    exactly, ``e = ((wh xh - p) + wh xl + wl xh) + wl xl``. ``t``: three scratch lanes.

    Exact unless ``|x|`` or ``|w x|`` is above ~2^995 (the split overflows: ``e`` is NaN) or the
    error term is subnormal (it loses bits, or is flushed: a tiny loss of compensation).
    """
    wh, wl = _split(w)
    xh, xl, tmp = t
    np.multiply(x, w, out=p)
    np.multiply(x, _SPLIT, out=xh)
    np.subtract(xh, x, out=xl)
    np.subtract(xh, xl, out=xh)  # xh = c - (c - x)
    np.subtract(x, xh, out=xl)
    np.multiply(xh, wh, out=e)
    np.subtract(e, p, out=e)
    np.add(e, np.multiply(xl, wh, out=tmp), out=e)
    np.add(e, np.multiply(xh, wl, out=tmp), out=e)
    np.add(e, np.multiply(xl, wl, out=tmp), out=e)


def _two_sum(
    a: Float64Array, b: Float64Array, s: Float64Array, e: Float64Array, t: Float64Array
) -> None:
    """Knuth's TwoSum: ``s = fl(a + b)``, ``s + e = a + b`` exactly,
    ``e = (a - (s - bb)) + (b - bb)`` with ``bb = s - a``. ``s``, ``e``, ``t`` (scratch) are
    distinct from ``a`` and ``b``."""
    np.add(a, b, out=s)
    np.subtract(s, a, out=t)  # bb
    np.subtract(s, t, out=e)
    np.subtract(a, e, out=e)
    np.subtract(b, t, out=t)
    np.add(e, t, out=e)


def _two_diff(
    a: Float64Array, b: Float64Array, s: Float64Array, e: Float64Array, t: Float64Array
) -> None:
    """``s = fl(a - b)``, ``s + e = a - b`` exactly: ``e = (a - (s - bb)) - (b + bb)``."""
    np.subtract(a, b, out=s)
    np.subtract(s, a, out=t)  # bb
    np.subtract(s, t, out=e)
    np.subtract(a, e, out=e)
    np.add(b, t, out=t)
    np.subtract(e, t, out=e)


def _round_to(values: Float64Array, dtype: np.dtype[np.generic]) -> npt.NDArray[np.generic]:
    """Round float64 values once to ``dtype`` (round to nearest even).

    float16 and bfloat16 go through float32 rounded *to odd* (an inexact result gets the odd
    one of its two float32 neighbours): float32 has at least 2 more bits than either, so the
    second rounding is then the correctly rounded one (Boldo and Melquiond), whatever numpy's
    or ml_dtypes' own float64 casts do.
    """
    name = dtype.name
    if name == "float64":
        return values.copy()
    single = values.astype(np.float32)
    if name == "float32":
        return single
    if name not in ("float16", "bfloat16"):
        raise ValueError(f"cannot average dtype {name}")
    back = single.astype(np.float64)
    bits = single.view(np.uint32)
    inexact = (back != values) & (values == values)  # NaN stays as cast
    even = (bits & np.uint32(1)) == 0
    away = np.abs(back) < np.abs(values)  # the odd neighbour is further from zero
    np.add(bits, np.uint32(1), out=bits, where=inexact & even & away)
    np.subtract(bits, np.uint32(1), out=bits, where=inexact & even & ~away)
    return single.astype(dtype)


@dataclass(frozen=True)
class Accumulator:
    """Streams blocks of a tensor through a linear profile, in place, in float64.

    One accumulator serves every tensor of a replay; each block has its own *state*, a float64
    array ``(lanes(dtype), *block_shape)`` (``new_state``): lane 0 holds the value, lane 1 (float64
    tensors only) its compensation. Call ``init``, then ``update(state, x, k)`` for each checkpoint
    ``k`` (0-based, replay order), then ``finish(state, dtype)``.

    * ``kind == "sum"`` (``Mean``, ``PowerEMA``, ``Weights``): ``state += r_k x_k`` (``Mean``
      adds ``x_k``); ``finish`` divides by ``total``, the exact sum of the ``r_k``.
    * ``kind == "recurrence"`` (``DecayPerStep``): ``s = x_1``, then ``s = x_k + P_k (s - x_k)``,
      which is ``P s + (1 - P) x`` written so that a constant stays exactly constant.

    float16, bfloat16 and float32 tensors accumulate in plain float64 (the float64 rounding
    errors, ~n 2^-53 relative, are far below half a float32 ulp), rounded once by ``finish``:
    within 1 ulp of the exact formula, and exactly constant on a constant sequence. float64
    tensors would lose that margin, so they accumulate a double-double (value + compensation):
    Dekker's TwoProduct and Knuth's TwoSum with IEEE ops only, as in Ogita, Rump and Oishi's
    Dot2, errors of order n 2^-106: within 1 ulp of the exact formula (except under cancellation
    of ~2^-50 between the terms). Where the compensation stops being finite (infinite inputs,
    values above ~1e299) the value falls back to the plain float64 arithmetic.

    The formula the result approximates is exact arithmetic on the float64 coefficients
    (``coefficients``, ``total``), which are exactly the contributions ``weights`` reports.
    A constant sequence gives that constant back exactly, in every dtype (the sums are divided
    by the exact sum of their coefficients; ``x + P (s - x)`` adds an exact 0), except that a
    zero comes back as +0. Cost per 1 MiB block and checkpoint, on one core: ~0.15 ms in plain
    float64, ~0.75 ms (sum) and ~1.2 ms (recurrence) compensated.
    """

    kind: Literal["sum", "recurrence"]
    #: ``r_k`` (sum) or ``P_k`` (recurrence; ``P_0`` unused).
    coefficients: tuple[float, ...]
    #: The exact sum of the ``r_k`` as a float64 pair ``(high, low)`` (sum kind).
    total: tuple[float, float] = (1.0, 0.0)

    def new_state(self, shape: int | tuple[int, ...], dtype: npt.DTypeLike) -> Float64Array:
        block = (shape,) if isinstance(shape, int) else tuple(shape)
        return np.zeros((lanes(dtype), *block), dtype=np.float64)

    @staticmethod
    def new_scratch(shape: int | tuple[int, ...]) -> Float64Array:
        block = (shape,) if isinstance(shape, int) else tuple(shape)
        return np.empty((SCRATCH_LANES, *block), dtype=np.float64)

    def init(self, state: Float64Array) -> None:
        state.fill(0.0)

    def update(
        self,
        state: Float64Array,
        x: npt.NDArray[np.generic],
        k: int,
        scratch: Float64Array | None = None,
    ) -> None:
        """Fold in checkpoint ``k``'s block ``x`` (any averageable dtype; float64 for a
        two-lane state). ``scratch`` (``new_scratch``) saves allocations on the hot path."""
        if state.shape[0] == 1 and self._fused(state[0], x, k):
            return
        if scratch is None:
            scratch = self.new_scratch(x.shape)
        with np.errstate(all="ignore"):  # inf - inf is a silent NaN, as in TF
            copies = self.kind == "recurrence" and k == 0  # no arithmetic: NaNs kept as read
            nans = None if copies else _NaNs.of(state[0], x)
            self._update(state, x, k, scratch)
            if nans is not None:
                nans.settle(state, first_is_state=self.kind == "sum")

    def _fused(self, value: Float64Array, x: npt.NDArray[np.generic], k: int) -> bool:
        """``_update`` of a one-lane state through the C kernel, if it applies (it raises no
        floating-point warnings, so it needs no ``np.errstate``)."""
        fused = kernels.summer(x.dtype)
        if fused is None or not (value.flags.c_contiguous and x.flags.c_contiguous):
            return False
        if self.kind == "recurrence":
            if k == 0:
                with np.errstate(invalid="ignore"):  # a signalling NaN is kept, silently
                    np.copyto(value, x, casting="unsafe")  # widening: exact
            else:
                fused(value, x, self.coefficients[k], kernels.SUM_RECURRENCE)
        elif self.coefficients[k] == 1.0:
            fused(value, x, 1.0, kernels.SUM_ADD)
        else:
            fused(value, x, self.coefficients[k], kernels.SUM_MUL_ADD)
        return True

    def _update(
        self, state: Float64Array, x: npt.NDArray[np.generic], k: int, scratch: Float64Array
    ) -> None:
        value = state[0]
        if state.shape[0] == 1:  # numpy's passes, where ``update`` found no C kernel
            if x.dtype.name == "float64":
                x64 = x.view(np.float64)
            else:
                x64 = scratch[0]
                np.copyto(x64, x, casting="unsafe")  # exact: every averageable dtype fits
            if self.kind == "recurrence":
                if k == 0:
                    np.copyto(value, x64)
                    return
                tmp = np.subtract(value, x64, out=scratch[1])
                np.multiply(tmp, self.coefficients[k], out=tmp)
                np.add(x64, tmp, out=value)
            elif self.coefficients[k] == 1.0:
                np.add(value, x64, out=value)
            else:
                np.add(value, np.multiply(x64, self.coefficients[k], out=scratch[1]), out=value)
            return
        if x.dtype.name != "float64":
            raise ValueError(f"a two-lane (float64) state takes float64 blocks, not {x.dtype}")
        xs = x.view(np.float64)
        low = state[1]
        s0, s1, s2, s3, s4, s5 = scratch
        if self.kind == "sum":
            w = self.coefficients[k]
            if w == 1.0:
                _two_sum(value, xs, s0, s1, s2)
            else:
                _two_product(w, xs, s3, s4, (s0, s1, s2))
                np.add(low, s4, out=low)
                _two_sum(value, s3, s0, s1, s2)
            np.copyto(value, s0)
            np.add(low, s1, out=low)
            return
        if k == 0:
            np.copyto(value, xs)
            low.fill(0.0)
            return
        p = self.coefficients[k]
        _two_diff(value, xs, s0, s1, s2)  # d = s - x = s0 + s1 (+ low)
        np.add(s1, low, out=s1)
        _two_product(p, s0, s2, s3, (s4, s5, low))  # P d_high = s2 + s3; low is free now
        np.add(s3, np.multiply(s1, p, out=s1), out=s3)
        _two_sum(xs, s2, s0, s1, s4)  # x + P d = s0 + s1 (+ s3)
        np.add(s1, s3, out=s1)
        _two_sum(s0, s1, value, low, s4)  # renormalise into the state
        bad = ~np.isfinite(low)
        if bad.any():  # infinities, overflowing splits: the plain recurrence's value
            np.copyto(value, s0, where=bad)
            np.copyto(low, 0.0, where=bad)

    def finish(
        self,
        state: Float64Array,
        dtype: npt.DTypeLike,
        out: npt.NDArray[np.generic] | None = None,
        scratch: Float64Array | None = None,
    ) -> npt.NDArray[np.generic]:
        """The average, rounded once to ``dtype`` (float16, bfloat16, float32 or float64).

        ``out`` (of ``dtype``, the block's shape) receives it and ``scratch`` (float64, the
        block's shape) is used for one-lane states, saving allocations on the hot path."""
        if out is not None and state.shape[0] == 1:
            divisor = self.total[0] if self.kind == "sum" else 1.0  # x / 1.0 is x, bit for bit
            if kernels.finish_float32(state[0], out, divisor):
                return out
        with np.errstate(all="ignore"):  # overflowing casts give inf, as in TF
            target = _dtype(dtype)
            if out is not None and state.shape[0] == 1:
                value = state[0]
                if self.kind == "sum":
                    value = np.divide(value, self.total[0], out=scratch)
                if target.name in ("float32", "float64"):
                    np.copyto(out, value, casting="unsafe")  # round to nearest even
                else:
                    np.copyto(out, _round_to(value, target))
                return out
            result = self._finish(state, target)
            if out is not None:
                np.copyto(out, result)
                return out
            return result

    def _finish(self, state: Float64Array, target: np.dtype[np.generic]) -> npt.NDArray[np.generic]:
        value = state[0]
        high, low_total = self.total
        if self.kind == "recurrence":
            result = value.copy() if state.shape[0] == 1 else np.add(value, state[1])
        elif state.shape[0] == 1:
            result = np.divide(value, high)
        else:
            # (value + low) / (high + low_total) in double-double: q, then the exact remainder.
            q = np.divide(value, high)
            p, e = np.empty_like(q), np.empty_like(q)
            _two_product(high, q, p, e, (np.empty_like(q), np.empty_like(q), np.empty_like(q)))
            r = np.subtract(value, p)
            np.subtract(r, e, out=r)
            np.add(r, state[1], out=r)
            np.subtract(r, np.multiply(q, low_total), out=r)
            result = np.add(q, np.divide(r, high, out=r), out=r)
            bad = ~np.isfinite(result)
            if bad.any():
                np.divide(value, high, out=result, where=bad)
        return _round_to(result, target)


_QUIET = np.uint64(0x0008000000000000)
#: The bits above which a float16 or bfloat16 value (sign cleared) is a NaN: infinity's.
_HALF_INFINITY = {"float16": np.uint16(0x7C00), "bfloat16": np.uint16(0x7F80)}


def _isnan(x: npt.NDArray[np.generic]) -> npt.NDArray[np.bool_]:
    """``np.isnan(x)``; for float16 and bfloat16 from the bits, which is 2-3x faster than
    numpy's and ml_dtypes' ``isnan`` on those dtypes."""
    found: npt.NDArray[np.bool_]
    if x.dtype.itemsize == 2:
        found = (x.view(np.uint16) & np.uint16(0x7FFF)) > _HALF_INFINITY[x.dtype.name]
    else:
        found = np.isnan(x)
    return found


@dataclass(frozen=True)
class _NaNs:
    """Where a block's state and checkpoint held NaNs before an update of numpy's passes, and
    which NaNs (widened to float64, quieted): ``settle`` gives those lanes the NaN the C
    kernel gives them.

    When both operands of an addition are NaNs, x86 returns the first one's, but numpy's loops
    do not all keep the operands in order (its SSE loops return the second's, its AVX2 ones the
    first's), so the bits of a NaN result would depend on the CPU. The rule, the kernel's: a
    NaN in the state wins in a sum (``s + x w``), a NaN in the checkpoint wins in the
    recurrence (``x + P (s - x)``), quieted; a NaN that arithmetic makes from numbers
    (``inf - inf``) is the CPU's one default NaN wherever it arises.
    """

    state: npt.NDArray[np.bool_]
    state_nans: npt.NDArray[np.uint64]
    x: npt.NDArray[np.bool_]
    x_nans: npt.NDArray[np.uint64]

    @classmethod
    def of(cls, value: Float64Array, x: npt.NDArray[np.generic]) -> _NaNs | None:
        """The NaNs of ``value`` (the state's value lane) and ``x``; None where neither holds
        one (the common case: two passes of ``isnan``)."""
        in_state, in_x = np.isnan(value), _isnan(x)
        if not (in_state.any() or in_x.any()):
            return None
        widened = x[in_x].astype(np.float64)  # exact; a NaN keeps its payload's top bits
        return cls(
            in_state,
            value[in_state].view(np.uint64) | _QUIET,
            in_x,
            widened.view(np.uint64) | _QUIET,
        )

    def settle(self, state: Float64Array, *, first_is_state: bool) -> None:
        """Give each lane that held a NaN before the update the rule's NaN (a two-lane state's
        compensation there becomes 0, so ``finish`` returns that NaN)."""
        value = state[0].view(np.uint64)
        winners = [(self.x, self.x_nans), (self.state, self.state_nans)]
        if not first_is_state:
            winners.reverse()
        for lanes, nans in winners:  # the first operand's last: it wins where both were NaN
            value[lanes] = nans
        if state.shape[0] == 2:
            state[1][self.state | self.x] = 0.0


def accumulator(profile: LinearProfile, steps: Sequence[int | None]) -> Accumulator:
    """The streaming accumulator of a linear profile over checkpoints at ``steps``.

    For ``--state`` runs build it with every step (those folded in before and the new ones):
    ``Mean``'s and ``DecayPerStep``'s coefficient ``k`` depends only on ``k``'s own gap, so
    updating a saved state with the new checkpoints gives the same bytes as a full replay.
    """
    from fractions import Fraction

    if isinstance(profile, DecayPerStep):
        return Accumulator("recurrence", tuple(gap_decays(profile, steps)))
    if not isinstance(profile, Mean | PowerEMA | Weights):
        raise TypeError(f"{label(profile)} replays through the engine, not an accumulator")
    raw = _raw_weights(profile, steps)
    exact = sum((Fraction(r) for r in raw), Fraction(0))
    high = float(exact)
    return Accumulator("sum", tuple(raw), (high, float(exact - Fraction(high))))
