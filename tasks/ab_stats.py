"""Statistics for A/B tests of model versions (pure: no Prefect, MLflow or SQL).

Everything works from *sufficient statistics*, because the A/B store keeps running sums only:

* conversion (binary) metrics: :class:`ConversionStats` ``(n, successes)``;
* continuous metrics: :class:`ContinuousStats` ``(n, sum, sum_sq)``.

Sign convention everywhere: ``difference = challenger - champion`` and
``relative_lift = difference / champion_mean``. Positive means the challenger has the larger
metric; whether larger is *better* is a choice of :func:`recommend` (``higher_is_better``).

What is here (docs/architecture.md, "Statistics", names the oracles the tests compare against):

* fixed-horizon tests: pooled two-proportion z-test (== statsmodels ``proportions_ztest``) and
  Welch's t-test from summary statistics (== ``scipy.stats.ttest_ind(equal_var=False)``), with
  the difference, relative lift and confidence intervals -- :func:`compare`;
* an always-valid sequential test -- :func:`sequential_test`: the two-sided normal-mixture
  confidence sequence of Howard, Ramdas, McAuliffe & Sekhon (2021, "Time-uniform, nonparametric,
  nonasymptotic confidence sequences", eq. 14 / the asymptotic CS of Waudby-Smith et al.), in the
  parametrisation GrowthBook publishes for its sequential intervals (tuning parameter ``N*``,
  the total sample size at which the boundary is tightest). Its p-value stays valid however often
  results are read;
* Bayesian probability that the challenger is larger -- :func:`probability_challenger_better`;
* sample-ratio-mismatch check -- :func:`srm_check` (== ``scipy.stats.chisquare``);
* samples needed for an effect at a power -- :func:`samples_needed_conversion`,
  :func:`samples_needed_continuous`, :func:`samples_needed` (== statsmodels ``NormalIndPower``);
* the verdict -- :func:`recommend`: continue / promote_challenger / keep_champion / invalid.

The stats classes and :func:`sequential_test` also accept numpy arrays (element-wise), so
simulations can run thousands of A/A tests in one call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Union

import numpy as np
from scipy import integrate, optimize, special, stats

__all__ = [
    "ConversionStats",
    "ContinuousStats",
    "ArmStats",
    "TestResult",
    "FixedHorizonResult",
    "SequentialResult",
    "BayesianResult",
    "SRMResult",
    "SampleSizeResult",
    "Recommendation",
    "Decision",
    "DEFAULT_ALPHA",
    "DEFAULT_TUNING",
    "DEFAULT_MIN_SAMPLES_PER_ARM",
    "DEFAULT_SRM_THRESHOLD",
    "two_proportion_ztest",
    "welch_ttest",
    "compare",
    "mixture_rho_squared",
    "sequential_p_value",
    "sequential_critical_z",
    "sequential_halfwidth",
    "sequential_test",
    "probability_challenger_better",
    "srm_check",
    "cohens_h",
    "samples_needed_conversion",
    "samples_needed_continuous",
    "samples_needed",
    "recommend",
]

DEFAULT_ALPHA = 0.05
#: Total (both arms) sample size at which the sequential boundary is tightest. The boundary is
#: flat around it (within ~3% in z between N*/2 and 4 N*), so the exact value matters little;
#: 10,000 was chosen by simulation (tests/test_ab_stats.py, 2,000 runs read every 100 samples):
#: 10% -> 12% at 50/50 is found within 20,000 samples in 96% of runs (N* = 2,500: 94.5%,
#: 5,000: 95%, 20,000: 96%, 40,000: 95%); A/A false-positive rate 1.2% at 50/50 and 1.7% at
#: 95/5. Set it to the planned total sample size of a test when that is known.
DEFAULT_TUNING = 10_000
#: No verdict before each arm has this many outcomes (the normal approximation behind the
#: sequential boundary needs it, and it protects against verdicts on a handful of samples).
DEFAULT_MIN_SAMPLES_PER_ARM = 100
DEFAULT_SRM_THRESHOLD = 0.001

Decision = Literal["continue", "promote_challenger", "keep_champion", "invalid"]


# --------------------------------------------------------------------------------------------
# helpers


def _out(x: Any) -> Any:
    """0-d arrays / numpy scalars -> Python float; arrays stay arrays."""
    arr = np.asarray(x)
    if arr.ndim == 0:
        return float(arr)
    return arr


def _check_probability(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number strictly between 0 and 1, got {value!r}") from None
    if not (0.0 < v < 1.0):
        raise ValueError(f"{name} must be strictly between 0 and 1, got {value!r}")
    return v


def _check_split(traffic_split: float) -> float:
    try:
        v = float(traffic_split)
    except (TypeError, ValueError):
        v = math.nan
    if not (0.0 < v < 1.0):
        raise ValueError(
            f"traffic_split must be strictly between 0 and 1 (the challenger's share of "
            f"traffic, e.g. 0.1 for 10%), got {traffic_split!r}"
        )
    return v


def _as_count(name: str, value: Any) -> Any:
    arr = np.asarray(value)
    if arr.dtype == bool or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise ValueError(f"{name} must be a non-negative whole number, got {value!r}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise ValueError(f"{name} must be a non-negative whole number, got {value!r}")
        arr = arr.astype(np.int64)
    if np.any(arr < 0):
        raise ValueError(f"{name} must not be negative, got {value!r}")
    return int(arr) if arr.ndim == 0 else arr


# --------------------------------------------------------------------------------------------
# arm statistics


@dataclass(frozen=True)
class ConversionStats:
    """Sufficient statistics of a binary outcome in one arm: ``n`` outcomes, ``successes`` of them 1.

    Fields may be numpy arrays (element-wise) for simulations.
    """

    n: Any
    successes: Any

    def __post_init__(self) -> None:
        n = _as_count("n", self.n)
        x = _as_count("successes", self.successes)
        if np.any(np.asarray(x) > np.asarray(n)):
            raise ValueError(
                f"successes must not exceed n (successes={self.successes!r}, n={self.n!r})"
            )
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "successes", x)

    @property
    def mean(self) -> Any:
        """Conversion rate ``successes / n`` (NaN when n == 0)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return _out(np.asarray(self.successes, float) / np.asarray(self.n, float))

    @property
    def variance(self) -> Any:
        """Bernoulli variance ``p (1 - p)`` of one outcome (the plug-in the z-test uses)."""
        p = np.asarray(self.mean)
        return _out(p * (1.0 - p))


@dataclass(frozen=True)
class ContinuousStats:
    """Sufficient statistics of a continuous outcome in one arm: ``n``, ``sum`` and ``sum_sq``
    (sum of squared outcomes). Fields may be numpy arrays (element-wise) for simulations.

    Running raw sums lose precision when the mean is huge relative to the spread (e.g. values
    around 1e9 varying by 1); store centred values (outcome minus a fixed constant) if so --
    differences and tests are unaffected by a shift applied to both arms.
    """

    n: Any
    sum: Any
    sum_sq: Any

    def __post_init__(self) -> None:
        n = _as_count("n", self.n)
        s = np.asarray(self.sum, dtype=float)
        ss = np.asarray(self.sum_sq, dtype=float)
        if not (np.all(np.isfinite(s)) and np.all(np.isfinite(ss))):
            raise ValueError(f"sum and sum_sq must be finite (sum={self.sum!r}, sum_sq={self.sum_sq!r})")
        if np.any(ss < 0):
            raise ValueError(f"sum_sq must not be negative, got {self.sum_sq!r}")
        nn = np.asarray(n, dtype=float)
        # Cauchy-Schwarz: sum^2 <= n * sum_sq (with a little room for rounding).
        if np.any(s * s > nn * ss * (1 + 1e-9) + 1e-12):
            raise ValueError(
                "inconsistent sums: sum**2 must not exceed n * sum_sq "
                f"(n={self.n!r}, sum={self.sum!r}, sum_sq={self.sum_sq!r})"
            )
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "sum", _out(s))
        object.__setattr__(self, "sum_sq", _out(ss))

    @classmethod
    def from_values(cls, values: Any) -> "ContinuousStats":
        v = np.asarray(values, dtype=float)
        return cls(n=int(v.size), sum=float(v.sum()), sum_sq=float((v * v).sum()))

    @property
    def mean(self) -> Any:
        with np.errstate(divide="ignore", invalid="ignore"):
            return _out(np.asarray(self.sum, float) / np.asarray(self.n, float))

    @property
    def variance(self) -> Any:
        """Sample variance (ddof=1); NaN when n < 2. Tiny negative rounding is clipped to 0."""
        n = np.asarray(self.n, float)
        s = np.asarray(self.sum, float)
        with np.errstate(divide="ignore", invalid="ignore"):
            centred = np.maximum(np.asarray(self.sum_sq, float) - s * s / n, 0.0)
            return _out(np.where(n >= 2, centred / (n - 1), np.nan))


ArmStats = Union[ConversionStats, ContinuousStats]


def _check_pair(champion: Any, challenger: Any) -> str:
    if isinstance(champion, ConversionStats) and isinstance(challenger, ConversionStats):
        return "conversion"
    if isinstance(champion, ContinuousStats) and isinstance(challenger, ContinuousStats):
        return "continuous"
    raise ValueError(
        "champion and challenger must both be ConversionStats or both be ContinuousStats, got "
        f"{type(champion).__name__} and {type(challenger).__name__}"
    )


def _diff_se(champion: ArmStats, challenger: ArmStats) -> tuple[np.ndarray, np.ndarray]:
    """Difference (challenger - champion) and its unpooled standard error."""
    na = np.asarray(champion.n, float)
    nb = np.asarray(challenger.n, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        diff = np.asarray(challenger.mean) - np.asarray(champion.mean)
        se = np.sqrt(np.asarray(champion.variance) / na + np.asarray(challenger.variance) / nb)
    return diff, se


def _pooled_se(champion: ArmStats, challenger: ArmStats) -> np.ndarray:
    """Standard error of the difference under "both arms share one variance".

    Conversion: pooled rate, exactly as statsmodels ``proportions_ztest`` (this *is* the null
    variance when the rates are equal). Continuous: pooled sample variance (ddof=1 per arm).
    """
    na = np.asarray(champion.n, float)
    nb = np.asarray(challenger.n, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        if isinstance(champion, ConversionStats):
            p = (np.asarray(champion.successes) + np.asarray(challenger.successes)) / (na + nb)
            var = p * (1.0 - p)
        else:
            var = ((na - 1) * np.asarray(champion.variance) + (nb - 1) * np.asarray(challenger.variance)) / (
                na + nb - 2
            )
        return np.sqrt(var * (1.0 / nb + 1.0 / na))


def _z(diff: np.ndarray, se: np.ndarray) -> np.ndarray:
    """diff / se with the degenerate cases made explicit: 0/0 -> 0, x/0 -> +-inf."""
    with np.errstate(divide="ignore", invalid="ignore"):
        z = diff / se
        z = np.where((se == 0) & (diff == 0), 0.0, z)
        return np.where((se == 0) & (diff != 0), np.sign(diff) * np.inf, z)


# --------------------------------------------------------------------------------------------
# fixed-horizon tests


@dataclass(frozen=True)
class TestResult:
    """A test statistic for challenger - champion and its two-sided p-value (df for Welch)."""

    __test__ = False  # not a pytest class

    statistic: float
    p_value: float
    df: float | None = None


def two_proportion_ztest(champion: ConversionStats, challenger: ConversionStats) -> TestResult:
    """Pooled two-proportion z-test, two-sided.

    Equal to ``statsmodels.stats.proportion.proportions_ztest(
    [challenger.successes, champion.successes], [challenger.n, champion.n])`` -- challenger
    first, so ``z > 0`` means the challenger converts more (e.g. challenger 231/2000 vs champion
    812/8000 gives z = 1.832165013350599, p = 0.066926839657378).
    """
    if _check_pair(champion, challenger) != "conversion":
        raise ValueError(
            "the two-proportion z-test takes ConversionStats; use welch_ttest for continuous metrics"
        )
    if np.any(np.asarray(champion.n) == 0) or np.any(np.asarray(challenger.n) == 0):
        raise ValueError("the z-test needs at least one outcome in each arm")
    diff = np.asarray(challenger.mean) - np.asarray(champion.mean)
    z = _z(diff, _pooled_se(champion, challenger))
    return TestResult(statistic=_out(z), p_value=_out(2.0 * stats.norm.sf(np.abs(z))))


def _welch_df(champion: ContinuousStats, challenger: ContinuousStats) -> np.ndarray:
    va = np.asarray(champion.variance) / np.asarray(champion.n, float)
    vb = np.asarray(challenger.variance) / np.asarray(challenger.n, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (va + vb) ** 2 / (
            va**2 / (np.asarray(champion.n, float) - 1) + vb**2 / (np.asarray(challenger.n, float) - 1)
        )


def welch_ttest(champion: ContinuousStats, challenger: ContinuousStats) -> TestResult:
    """Welch's unequal-variance t-test from summary statistics, two-sided.

    Equal to ``scipy.stats.ttest_ind(challenger_values, champion_values, equal_var=False)``
    (challenger first: ``t > 0`` means the challenger's mean is larger).
    """
    if _check_pair(champion, challenger) != "continuous":
        raise ValueError(
            "Welch's t-test takes ContinuousStats; use two_proportion_ztest for conversion metrics"
        )
    if np.any(np.asarray(champion.n) < 2) or np.any(np.asarray(challenger.n) < 2):
        raise ValueError("Welch's t-test needs at least two outcomes in each arm")
    diff, se = _diff_se(champion, challenger)
    t = _z(diff, se)
    df = _welch_df(champion, challenger)
    # Both arms constant: no noise at all, so any difference is certain (df is undefined).
    p = np.where(se == 0, np.where(diff == 0, 1.0, 0.0), 2.0 * stats.t.sf(np.abs(t), df))
    return TestResult(statistic=_out(t), p_value=_out(p), df=_out(df))


@dataclass(frozen=True)
class FixedHorizonResult:
    """A classical (read-once) comparison of challenger vs champion.

    ``ci_low``/``ci_high`` bound ``difference`` at confidence ``1 - alpha`` (unpooled Wald for
    conversion, Welch t for continuous); ``relative_ci_*`` bound ``relative_lift`` by the delta
    method. ``relative_*`` are NaN when the champion's mean is 0. The p-value is only valid for
    a single, pre-planned look: use :func:`sequential_test` when results are read repeatedly.
    """

    metric: Literal["conversion", "continuous"]
    champion_n: int
    challenger_n: int
    champion_mean: float
    challenger_mean: float
    difference: float
    relative_lift: float
    ci_low: float
    ci_high: float
    relative_ci_low: float
    relative_ci_high: float
    statistic: float
    p_value: float
    alpha: float
    df: float | None = None


def _relative(champion: ArmStats, challenger: ArmStats) -> tuple[float, float]:
    """Relative lift and its delta-method standard error."""
    ma, mb = float(champion.mean), float(challenger.mean)
    va = float(champion.variance) / float(champion.n)
    vb = float(challenger.variance) / float(challenger.n)
    if ma == 0 or not math.isfinite(ma):
        return math.nan, math.nan
    lift = mb / ma - 1.0
    se = math.sqrt(vb / ma**2 + mb**2 * va / ma**4)
    return lift, se


def compare(
    champion: ArmStats, challenger: ArmStats, *, alpha: float = DEFAULT_ALPHA
) -> FixedHorizonResult:
    """Fixed-horizon comparison: difference, relative lift, (1 - alpha) intervals, test.

    Conversion metrics use the pooled z-test (:func:`two_proportion_ztest`) and an unpooled Wald
    interval; continuous metrics use Welch's t-test and a Welch t interval.
    """
    metric = _check_pair(champion, challenger)
    alpha = _check_probability("alpha", alpha)
    if np.ndim(champion.n) or np.ndim(challenger.n):
        raise ValueError("compare() takes scalar arm statistics")
    if metric == "conversion":
        test = two_proportion_ztest(champion, challenger)
        crit = float(stats.norm.isf(alpha / 2))
    else:
        test = welch_ttest(champion, challenger)
        df = test.df if math.isfinite(test.df) else math.inf
        crit = float(stats.t.isf(alpha / 2, df))
    diff, se = (float(v) for v in _diff_se(champion, challenger))
    lift, lift_se = _relative(champion, challenger)
    return FixedHorizonResult(
        metric=metric,
        champion_n=int(champion.n),
        challenger_n=int(challenger.n),
        champion_mean=float(champion.mean),
        challenger_mean=float(challenger.mean),
        difference=diff,
        relative_lift=lift,
        ci_low=diff - crit * se,
        ci_high=diff + crit * se,
        relative_ci_low=lift - crit * lift_se,
        relative_ci_high=lift + crit * lift_se,
        statistic=float(test.statistic),
        p_value=float(test.p_value),
        alpha=alpha,
        df=test.df,
    )


# --------------------------------------------------------------------------------------------
# sequential (always-valid) test


def mixture_rho_squared(alpha: float = DEFAULT_ALPHA, tuning: float = DEFAULT_TUNING) -> float:
    """Mixing variance rho^2 of the normal mixture, tuned to be tightest at ``tuning`` samples.

    rho^2 = (-2 ln alpha + ln(1 - 2 ln alpha)) / N*   (Howard et al. 2021, eq. 161 of
    arXiv:2103.06476v7; GrowthBook's ``sequentialTuningParameter`` is N*).
    """
    alpha = _check_probability("alpha", alpha)
    try:
        n_star = float(tuning)
    except (TypeError, ValueError):
        n_star = math.nan
    if not (n_star > 0 and math.isfinite(n_star)):
        raise ValueError(f"tuning (N*) must be a positive number of samples, got {tuning!r}")
    return (-2.0 * math.log(alpha) + math.log(1.0 - 2.0 * math.log(alpha))) / n_star


def sequential_p_value(
    z: Any, n_total: Any, *, alpha: float = DEFAULT_ALPHA, tuning: float = DEFAULT_TUNING
) -> Any:
    """Always-valid p-value of the normal-mixture test from a z statistic after ``n_total`` samples.

    With ``a = n_total * rho^2``, the mixture likelihood ratio is
    ``M = (1 + a)^(-1/2) * exp(a z^2 / (2 (1 + a)))`` and ``p = min(1, 1/M)``. Under H0,
    ``P(p_t <= alpha for some t) <= alpha`` (asymptotically), however many times it is read;
    a caller that keeps history may report the running minimum, which is equally valid.
    ``p < alpha`` exactly when ``|z| > sequential_critical_z(n_total)`` (same ``alpha`` and
    ``tuning``). ``alpha`` also sets the mixture's tuning (rho), so compare the p-value with
    the same ``alpha`` it was computed for. Element-wise on arrays.
    """
    rho2 = mixture_rho_squared(alpha, tuning)
    a = np.asarray(n_total, float) * rho2
    z = np.asarray(z, float)
    with np.errstate(over="ignore", invalid="ignore"):
        log_p = 0.5 * np.log1p(a) - a * z * z / (2.0 * (1.0 + a))
    return _out(np.where(np.asarray(n_total) > 0, np.exp(np.minimum(log_p, 0.0)), 1.0))


def sequential_critical_z(
    n_total: Any, *, alpha: float = DEFAULT_ALPHA, tuning: float = DEFAULT_TUNING
) -> Any:
    """The |z| the normal-mixture boundary requires after ``n_total`` samples:
    ``sqrt((1 + a) / a * 2 ln(sqrt(1 + a) / alpha))`` with ``a = n_total * rho^2`` (infinite at 0).

    ``sequential_p_value(z, n) < alpha`` exactly when ``|z| > sequential_critical_z(n)``. With the
    defaults it is about 3.86 at 1,000 samples, 3.04 at 10,000 and 3.13 at 40,000 (a single
    fixed-horizon look needs 1.96).
    """
    rho2 = mixture_rho_squared(alpha, tuning)
    a = np.asarray(n_total, float) * rho2
    with np.errstate(divide="ignore", invalid="ignore"):
        crit = np.sqrt((1.0 + a) / a * 2.0 * np.log(np.sqrt(1.0 + a) / alpha))
    return _out(np.where(a > 0, crit, np.inf))


def sequential_halfwidth(
    se: Any, n_total: Any, *, alpha: float = DEFAULT_ALPHA, tuning: float = DEFAULT_TUNING
) -> Any:
    """Half-width ``se * sequential_critical_z(n_total)`` of a Wald-type confidence sequence:
    GrowthBook's sequential interval ``sqrt(s2) * sqrt(2 (N rho^2 + 1) / (N^2 rho^2) *
    ln(sqrt(N rho^2 + 1) / alpha))`` with ``s2 = N * se^2``."""
    return _out(np.asarray(se, float) * sequential_critical_z(n_total, alpha=alpha, tuning=tuning))


class _RestrictedRates:
    """Farrington-Manning restricted maximum-likelihood rates under ``p_chal - p_champ = delta``
    (closed-form cubic root; Farrington & Manning 1990, Miettinen & Nurminen 1985).

    ``variance(delta)`` is the variance of the difference of rates evaluated at those rates; at
    ``delta = 0`` it is the pooled variance of the z-test.
    """

    def __init__(self, n_a: np.ndarray, x_a: np.ndarray, n_b: np.ndarray, x_b: np.ndarray):
        self.n1, self.n2 = n_b, n_a  # 1 = challenger, 2 = champion
        p1, p2 = x_b / n_b, x_a / n_a
        theta = n_a / n_b
        self.a = 1.0 + theta
        self.b0, self.b1 = -(1.0 + theta + p1 + theta * p2), -(theta + 2.0)
        self.c0, self.c1 = p1 + theta * p2, 2.0 * p1 + theta + 1.0
        self.p1 = p1

    def variance(self, delta: np.ndarray) -> np.ndarray:
        a = self.a
        b = self.b0 + self.b1 * delta
        c = delta * delta + self.c1 * delta + self.c0
        d = -self.p1 * delta * (1.0 + delta)
        b3a = b / (3.0 * a)
        v = b3a**3 - b3a * c / (2.0 * a) + d / (2.0 * a)
        u2 = np.maximum(b3a * b3a - c / (3.0 * a), 0.0)
        u = np.copysign(np.sqrt(u2), v)
        with np.errstate(divide="ignore", invalid="ignore"):
            cos_arg = np.where(u2 > 0, np.clip(v / (u * u2), -1.0, 1.0), 0.0)
        q1 = 2.0 * u * np.cos((np.pi + np.arccos(cos_arg)) / 3.0) - b3a
        q1 = np.clip(q1, np.maximum(0.0, delta), np.minimum(1.0, 1.0 + delta))
        q2 = q1 - delta
        return q1 * (1.0 - q1) / self.n1 + q2 * (1.0 - q2) / self.n2


def _score_interval(
    champion: ConversionStats, challenger: ConversionStats, crit: Any, *, tol: float = 1e-10
) -> tuple[np.ndarray, np.ndarray]:
    """Confidence set ``{delta : |d - delta| <= crit * se(delta)}`` with the restricted-MLE
    standard error (score / Miettinen-Nurminen-type interval without the n/(n-1) factor).

    Each endpoint is a root of ``g(x) = |x - d| - crit * sqrt(var(x))`` on its side of ``d``,
    bracketed by ``d`` (``g <= 0``) and ``+-1`` (``g >= 0``): safeguarded secant (bisection
    whenever the secant step leaves the bracket), vectorised over the elements not yet converged.
    About 3 microseconds per element.
    """
    shape = np.broadcast(
        np.asarray(champion.n), np.asarray(challenger.n), np.asarray(crit, float)
    ).shape
    n_a, x_a, n_b, x_b, crit = (
        np.broadcast_to(np.asarray(v, float), shape).ravel()
        for v in (champion.n, champion.successes, challenger.n, challenger.successes, crit)
    )
    d = x_b / n_b - x_a / n_a
    q_a, q_b = (x_a + 1.0) / (n_a + 2.0), (x_b + 1.0) / (n_b + 2.0)
    start_se = (
        np.sqrt(q_a * (1 - q_a) / n_a + q_b * (1 - q_b) / n_b),
        np.sqrt(_RestrictedRates(n_a, x_a, n_b, x_b).variance(np.zeros_like(d))),
    )
    ends = []
    for side in (-1.0, 1.0):
        out = np.full_like(d, side)
        idx = np.flatnonzero(np.isfinite(crit))
        rates = _RestrictedRates(n_a[idx], x_a[idx], n_b[idx], x_b[idx])
        dd, cc = d[idx], crit[idx]
        inside, outside = dd.copy(), np.full_like(dd, side)

        def g(x: np.ndarray) -> np.ndarray:  # nearly linear in x: secant converges fast
            return side * (x - dd) - cc * np.sqrt(rates.variance(x))

        def bracket(x: np.ndarray, gx: np.ndarray) -> None:
            nonlocal inside, outside
            inside = np.where(gx <= 0, x, inside)
            outside = np.where(gx > 0, x, outside)

        lo_b, hi_b = np.minimum(dd, side), np.maximum(dd, side)
        x0 = np.clip(dd + side * cc * start_se[0][idx], lo_b, hi_b)
        g0 = g(x0)
        bracket(x0, g0)
        x1 = np.clip(dd + side * cc * start_se[1][idx], lo_b, hi_b)
        x1 = np.where(x1 == x0, 0.5 * (inside + outside), x1)
        g1 = g(x1)
        bracket(x1, g1)
        for _ in range(200):
            with np.errstate(divide="ignore", invalid="ignore"):
                x2 = x1 - g1 * (x1 - x0) / (g1 - g0)
            lo_i, hi_i = np.minimum(inside, outside), np.maximum(inside, outside)
            x2 = np.where(np.isfinite(x2) & (x2 > lo_i) & (x2 < hi_i), x2, 0.5 * (inside + outside))
            g2 = g(x2)
            bracket(x2, g2)
            converged = (np.abs(x2 - x1) < tol) | (g2 == 0)
            done = converged | (np.abs(outside - inside) < tol)
            out[idx[done]] = np.where(converged, x2, outside)[done]
            keep = ~done
            if not keep.any():
                break
            idx = idx[keep]
            rates = _RestrictedRates(n_a[idx], x_a[idx], n_b[idx], x_b[idx])
            dd, cc, inside, outside = dd[keep], cc[keep], inside[keep], outside[keep]
            x0, g0, x1, g1 = x1[keep], g1[keep], x2[keep], g2[keep]
        else:  # pragma: no cover - never seen; fall back to the (conservative) outer bracket
            out[idx] = outside
        ends.append(out.reshape(shape))
    return ends[0], ends[1]


@dataclass(frozen=True)
class SequentialResult:
    """Always-valid comparison (fields are arrays when the inputs were arrays).

    ``p_value``: always-valid p-value of H0 "no difference"; ``z`` the statistic it used.
    ``ci_low``/``ci_high``: the (1 - alpha) confidence sequence for ``difference`` (for
    conversion metrics a score-type interval, so not symmetric around ``difference``; it is
    ``(-inf, inf)`` before both arms have data). ``se_test``: the standard error behind ``z``
    (see :func:`sequential_test`). ``p_value < alpha`` exactly when the interval excludes 0.
    """

    metric: Literal["conversion", "continuous"]
    n_total: Any
    difference: Any
    ci_low: Any
    ci_high: Any
    z: Any
    p_value: Any
    se_test: Any
    alpha: float
    tuning: float


def sequential_test(
    champion: ArmStats,
    challenger: ArmStats,
    *,
    alpha: float = DEFAULT_ALPHA,
    tuning: float = DEFAULT_TUNING,
) -> SequentialResult:
    """Always-valid test and confidence sequence for challenger - champion.

    Normal-mixture boundary (Howard et al. 2021) on the difference of means with ``N`` = total
    outcomes in both arms and per-sample variance ``N * se^2`` (as GrowthBook). Valid at every
    look for a roughly constant traffic split; apply a minimum per-arm sample before reading it
    (see :func:`recommend`), since the boundary relies on the normal approximation.

    Standard errors (chosen by A/A simulation at 50/50 and 95/5 splits, see the tests):

    * conversion: the test uses the pooled standard error (so ``z`` equals
      :func:`two_proportion_ztest`'s statistic); the confidence sequence inverts that same test
      at every candidate difference (restricted-MLE "score" standard error, Farrington-Manning),
      so ``p < alpha`` exactly when the sequence excludes 0. The unpooled (Wald) standard error
      would give a 16% false-positive rate at a 95/5 split and a 2% base rate, because a small
      arm with few conversions looks nearly certain.
    * continuous: ``max(pooled, unpooled)`` for both test and interval. Unpooled (Welch) alone
      gives 13% false positives on lognormal outcomes at 95/5 (the small arm's mean and variance
      move together); pooled alone is badly wrong when the arms' variances differ; the larger
      of the two is valid in both cases at almost no cost in power.
    """
    metric = _check_pair(champion, challenger)
    alpha = _check_probability("alpha", alpha)
    n_total = np.asarray(champion.n) + np.asarray(challenger.n)
    # No information yet: an empty arm (or, for continuous metrics, fewer than 2 outcomes).
    least = 1 if metric == "conversion" else 2
    empty = (np.asarray(champion.n) < least) | (np.asarray(challenger.n) < least)
    diff, unpooled = _diff_se(champion, challenger)
    pooled = _pooled_se(champion, challenger)
    se_test = pooled if metric == "conversion" else np.fmax(pooled, unpooled)
    z = np.where(empty, 0.0, _z(np.where(empty, 0.0, diff), se_test))
    p = np.where(empty, 1.0, sequential_p_value(z, n_total, alpha=alpha, tuning=tuning))
    crit = np.where(empty, np.inf, sequential_critical_z(n_total, alpha=alpha, tuning=tuning))
    if metric == "conversion":
        safe = [np.where(empty, 1, v) for v in (champion.n, challenger.n)]
        lo, hi = _score_interval(
            ConversionStats(safe[0], np.where(empty, 0, champion.successes)),
            ConversionStats(safe[1], np.where(empty, 0, challenger.successes)),
            crit,
        )
    else:
        with np.errstate(invalid="ignore"):
            half = se_test * crit
            lo, hi = diff - half, diff + half
    lo = np.where(empty | np.isnan(lo), -np.inf, lo)
    hi = np.where(empty | np.isnan(hi), np.inf, hi)
    return SequentialResult(
        metric=metric,
        n_total=n_total if np.ndim(n_total) else int(n_total),
        difference=_out(diff),
        ci_low=_out(lo),
        ci_high=_out(hi),
        z=_out(z),
        p_value=_out(p),
        se_test=_out(se_test),
        alpha=alpha,
        tuning=float(tuning),
    )


# --------------------------------------------------------------------------------------------
# Bayesian


@dataclass(frozen=True)
class BayesianResult:
    """Posterior probability that the challenger's mean is larger than the champion's.

    Conversion: Beta(prior_a + successes, prior_b + failures) posteriors, computed exactly by
    one-dimensional integration. Continuous: normal posteriors with flat priors
    (``Phi(difference / se)``).
    """

    probability_challenger_better: float
    champion_posterior_mean: float
    challenger_posterior_mean: float
    method: str


def _beta_prob_greater(a_b: float, b_b: float, a_a: float, b_a: float) -> float:
    """P(X_b > X_a) for independent X_b ~ Beta(a_b, b_b), X_a ~ Beta(a_a, b_a):
    the integral of pdf_a(x) * sf_b(x) over the region where pdf_a has mass."""
    log_norm = special.betaln(a_a, b_a)

    def integrand(x: float) -> float:
        log_pdf = (a_a - 1.0) * math.log(x) + (b_a - 1.0) * math.log1p(-x) - log_norm
        return math.exp(log_pdf) * special.betaincc(a_b, b_b, x)

    lo = float(special.betaincinv(a_a, b_a, 1e-15))
    hi = float(special.betainccinv(a_a, b_a, 1e-15))
    lo, hi = max(lo, 1e-300), min(hi, 1.0 - 1e-16)
    inner = sorted(
        {x for x in (a_a / (a_a + b_a), a_b / (a_b + b_b)) if lo < x < hi}
    )
    val, _ = integrate.quad(
        integrand, lo, hi, points=inner or None, limit=200, epsabs=1e-13, epsrel=1e-11
    )
    return float(min(max(val, 0.0), 1.0))


def probability_challenger_better(
    champion: ArmStats,
    challenger: ArmStats,
    *,
    prior: tuple[float, float] = (1.0, 1.0),
) -> BayesianResult:
    """Posterior probability that the challenger's metric is larger (``prior`` = Beta prior for
    conversion metrics; ignored for continuous ones)."""
    metric = _check_pair(champion, challenger)
    if np.ndim(champion.n) or np.ndim(challenger.n):
        raise ValueError("probability_challenger_better() takes scalar arm statistics")
    if metric == "conversion":
        pa, pb = (float(v) for v in prior)
        if not (pa > 0 and pb > 0):
            raise ValueError(f"Beta prior parameters must be positive, got {prior!r}")
        a_a, b_a = pa + champion.successes, pb + champion.n - champion.successes
        a_b, b_b = pa + challenger.successes, pb + challenger.n - challenger.successes
        return BayesianResult(
            probability_challenger_better=_beta_prob_greater(a_b, b_b, a_a, b_a),
            champion_posterior_mean=a_a / (a_a + b_a),
            challenger_posterior_mean=a_b / (a_b + b_b),
            method="beta-binomial (exact integral)",
        )
    if champion.n < 2 or challenger.n < 2:
        prob = 0.5
    else:
        diff, se = (float(v) for v in _diff_se(champion, challenger))
        prob = float(stats.norm.cdf(_z(np.asarray(diff), np.asarray(se))))
    return BayesianResult(
        probability_challenger_better=prob,
        champion_posterior_mean=float(champion.mean) if champion.n else math.nan,
        challenger_posterior_mean=float(challenger.mean) if challenger.n else math.nan,
        method="normal (flat prior)",
    )


# --------------------------------------------------------------------------------------------
# sample ratio mismatch


@dataclass(frozen=True)
class SRMResult:
    """Chi-square goodness of fit of routed counts against the configured split."""

    champion_count: int
    challenger_count: int
    expected_champion: float
    expected_challenger: float
    traffic_split: float
    chi2: float
    p_value: float
    threshold: float
    mismatch: bool


def srm_check(
    champion_count: int,
    challenger_count: int,
    traffic_split: float,
    *,
    threshold: float = DEFAULT_SRM_THRESHOLD,
) -> SRMResult:
    """Sample-ratio-mismatch check: ``mismatch = p < threshold``.

    ``chi2``/``p_value`` equal ``scipy.stats.chisquare([champion_count, challenger_count],
    [N (1 - split), N split])``. Pass the counts of *routed* entities (assignments), not of
    outcomes. With no traffic yet, p = 1 and there is no mismatch.
    """
    split = _check_split(traffic_split)
    threshold = _check_probability("threshold", threshold)
    ca = _as_count("champion_count", champion_count)
    cb = _as_count("challenger_count", challenger_count)
    if np.ndim(ca) or np.ndim(cb):
        raise ValueError("srm_check() takes scalar counts")
    total = ca + cb
    ea, eb = total * (1.0 - split), total * split
    if total == 0:
        chi2, p = 0.0, 1.0
    else:
        chi2 = (ca - ea) ** 2 / ea + (cb - eb) ** 2 / eb
        p = float(stats.chi2.sf(chi2, 1))
    return SRMResult(
        champion_count=ca,
        challenger_count=cb,
        expected_champion=ea,
        expected_challenger=eb,
        traffic_split=split,
        chi2=float(chi2),
        p_value=p,
        threshold=threshold,
        mismatch=bool(p < threshold),
    )


# --------------------------------------------------------------------------------------------
# sample size


@dataclass(frozen=True)
class SampleSizeResult:
    """Outcomes needed per arm for a two-sided fixed-horizon test to detect ``effect_size``.

    ``*_exact`` are the real-valued solutions (statsmodels ``NormalIndPower``); the integers are
    those rounded to the nearest whole sample (the convention that gives 9,215 for 10% -> 11% at a
    20% split; rounding up would give 9,216 -- the power differs in the 7th decimal).
    ``total_n = champion_n + challenger_n``. All ``None`` when the effect is zero.
    This is the *fixed-horizon* size: the sequential test read every 100 samples needs about
    1.6x as many for the same power (10% -> 12% at 50/50: 7,670 fixed vs ~12,500 sequential).
    """

    effect_size: float
    traffic_split: float
    alpha: float
    power: float
    challenger_n: int | None
    champion_n: int | None
    total_n: int | None
    challenger_n_exact: float | None
    champion_n_exact: float | None


def _normal_ind_power(d: float, n_eff: float, alpha: float) -> float:
    crit = stats.norm.isf(alpha / 2.0)
    shift = d * math.sqrt(n_eff)
    return float(stats.norm.sf(crit - shift) + stats.norm.cdf(-crit - shift))


def _solve_sample_size(
    effect_size: float, traffic_split: float, alpha: float, power: float
) -> SampleSizeResult:
    split = _check_split(traffic_split)
    alpha = _check_probability("alpha", alpha)
    power = _check_probability("power", power)
    d = abs(float(effect_size))
    if not math.isfinite(d):
        raise ValueError(f"effect size must be finite, got {effect_size!r}")
    if d == 0.0:
        return SampleSizeResult(float(effect_size), split, alpha, power, None, None, None, None, None)
    if power <= alpha:
        raise ValueError(f"power ({power}) must exceed alpha ({alpha})")
    # Effective n = 1 / (1/n_challenger + 1/n_champion) = n_challenger * (1 - split): the
    # statsmodels convention is nobs1 = challenger, ratio = nobs2/nobs1 = (1 - split)/split
    # (equivalently nobs1 = champion with ratio = split/(1 - split)).
    guess = ((stats.norm.isf(alpha / 2) + stats.norm.isf(1 - power)) / d) ** 2
    n_eff = optimize.brentq(
        lambda n: _normal_ind_power(d, n, alpha) - power, guess * 0.5, guess * 1.5 + 1.0,
        xtol=1e-12, rtol=4 * np.finfo(float).eps, maxiter=500,
    )
    n_chal = n_eff / (1.0 - split)
    n_champ = n_chal * (1.0 - split) / split
    chal_i, champ_i = int(round(n_chal)), int(round(n_champ))
    return SampleSizeResult(
        effect_size=float(effect_size),
        traffic_split=split,
        alpha=alpha,
        power=power,
        challenger_n=chal_i,
        champion_n=champ_i,
        total_n=chal_i + champ_i,
        challenger_n_exact=n_chal,
        champion_n_exact=n_champ,
    )


def cohens_h(challenger_rate: float, champion_rate: float) -> float:
    """Cohen's h = 2 asin(sqrt(p_challenger)) - 2 asin(sqrt(p_champion))
    (== statsmodels ``proportion_effectsize(challenger_rate, champion_rate)``)."""
    for name, v in (("challenger_rate", challenger_rate), ("champion_rate", champion_rate)):
        if not (0.0 <= float(v) <= 1.0):
            raise ValueError(f"{name} must be a rate in [0, 1], got {v!r}")
    return 2.0 * math.asin(math.sqrt(challenger_rate)) - 2.0 * math.asin(math.sqrt(champion_rate))


def samples_needed_conversion(
    champion_rate: float,
    challenger_rate: float,
    traffic_split: float,
    *,
    alpha: float = DEFAULT_ALPHA,
    power: float = 0.8,
) -> SampleSizeResult:
    """Samples to detect ``champion_rate -> challenger_rate`` with a two-sided test.

    Effect size is Cohen's h; the result equals ``NormalIndPower().solve_power(effect_size=h,
    alpha=alpha, power=power, ratio=(1 - split) / split)`` for the challenger (``nobs1``) and
    ``ratio`` times that for the champion. 10% -> 11% at split 0.2: 9,215 challenger samples.
    """
    return _solve_sample_size(cohens_h(challenger_rate, champion_rate), traffic_split, alpha, power)


def samples_needed_continuous(
    difference: float,
    standard_deviation: float,
    traffic_split: float,
    *,
    alpha: float = DEFAULT_ALPHA,
    power: float = 0.8,
) -> SampleSizeResult:
    """Samples to detect a mean difference with the given (common) standard deviation.

    Effect size is Cohen's d = difference / standard_deviation, same convention as
    :func:`samples_needed_conversion`.
    """
    sd = float(standard_deviation)
    if not (sd > 0 and math.isfinite(sd)):
        raise ValueError(f"standard_deviation must be positive, got {standard_deviation!r}")
    return _solve_sample_size(float(difference) / sd, traffic_split, alpha, power)


def samples_needed(
    champion: ArmStats,
    challenger: ArmStats,
    traffic_split: float,
    *,
    alpha: float = DEFAULT_ALPHA,
    power: float = 0.8,
) -> SampleSizeResult:
    """Samples needed to detect the *observed* effect (Cohen's h for conversion; Cohen's d with
    the pooled standard deviation for continuous metrics)."""
    metric = _check_pair(champion, challenger)
    if metric == "conversion":
        if champion.n == 0 or challenger.n == 0:
            raise ValueError("the observed effect needs at least one outcome in each arm")
        return samples_needed_conversion(
            float(champion.mean), float(challenger.mean), traffic_split, alpha=alpha, power=power
        )
    if champion.n < 2 or challenger.n < 2:
        raise ValueError("the observed effect needs at least two outcomes in each arm")
    pooled = (
        (champion.n - 1) * float(champion.variance) + (challenger.n - 1) * float(challenger.variance)
    ) / (champion.n + challenger.n - 2)
    diff = float(challenger.mean) - float(champion.mean)
    if pooled <= 0:
        raise ValueError("the observed outcomes have no spread: the effect size is undefined")
    return samples_needed_continuous(diff, math.sqrt(pooled), traffic_split, alpha=alpha, power=power)


# --------------------------------------------------------------------------------------------
# recommendation


@dataclass(frozen=True)
class Recommendation:
    """The verdict and the numbers behind it.

    ``decision``: ``continue`` (not enough evidence or guardrails not met yet),
    ``promote_challenger`` (sequentially significant and better), ``keep_champion``
    (sequentially significant and worse, or no difference by the end of the test),
    ``invalid`` (sample ratio mismatch: the routing or logging is broken, results can't be
    trusted). ``reason`` is one human sentence.
    """

    decision: Decision
    reason: str
    sequential: SequentialResult
    srm: SRMResult
    probability_challenger_better: float
    champion_n: int
    challenger_n: int


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def recommend(
    champion: ArmStats,
    challenger: ArmStats,
    *,
    traffic_split: float,
    alpha: float = DEFAULT_ALPHA,
    min_samples_per_arm: int = DEFAULT_MIN_SAMPLES_PER_ARM,
    min_duration_met: bool = True,
    routed_counts: tuple[int, int] | None = None,
    srm_threshold: float = DEFAULT_SRM_THRESHOLD,
    higher_is_better: bool = True,
    horizon_reached: bool = False,
    tuning: float = DEFAULT_TUNING,
) -> Recommendation:
    """Decide what to do with a running test, using the always-valid sequential p-value (so
    reading it every hour stays honest).

    Order of checks: SRM (on ``routed_counts`` = (champion, challenger) assignment counts,
    defaulting to the arms' outcome counts) -> ``invalid``; fewer than ``min_samples_per_arm``
    outcomes in an arm -> ``continue``; sequential p < alpha -> ``promote_challenger`` if the
    challenger is better (``higher_is_better`` says which direction is better) else
    ``keep_champion``, but only once ``min_duration_met`` (otherwise ``continue``); not
    significant -> ``continue``, or ``keep_champion`` when ``horizon_reached`` (the test ran its
    planned course without showing a difference).
    """
    _check_pair(champion, challenger)
    split = _check_split(traffic_split)
    alpha = _check_probability("alpha", alpha)
    if np.ndim(champion.n) or np.ndim(challenger.n):
        raise ValueError("recommend() takes scalar arm statistics")
    if int(min_samples_per_arm) < 1:
        raise ValueError(f"min_samples_per_arm must be at least 1, got {min_samples_per_arm!r}")
    counts = routed_counts if routed_counts is not None else (champion.n, challenger.n)
    if len(counts) != 2:
        raise ValueError(f"routed_counts must be (champion_count, challenger_count), got {routed_counts!r}")
    srm = srm_check(counts[0], counts[1], split, threshold=srm_threshold)
    seq = sequential_test(champion, challenger, alpha=alpha, tuning=tuning)
    bayes = probability_challenger_better(champion, challenger).probability_challenger_better
    prob_better = bayes if higher_is_better else 1.0 - bayes
    na, nb = int(champion.n), int(challenger.n)

    def done(decision: Decision, reason: str) -> Recommendation:
        return Recommendation(decision, reason, seq, srm, prob_better, na, nb)

    if srm.mismatch:
        return done(
            "invalid",
            f"sample ratio mismatch: {srm.champion_count} champion vs {srm.challenger_count} "
            f"challenger assignments for a {split * 100:g}% challenger split (expected about "
            f"{srm.expected_challenger:.0f} challenger; chi-square p = {srm.p_value:.2g} < "
            f"{srm.threshold:g}); routing or outcome logging is broken, so results can't be trusted",
        )
    if min(na, nb) < min_samples_per_arm:
        return done(
            "continue",
            f"not enough data yet: {na} champion and {nb} challenger outcomes, need at least "
            f"{min_samples_per_arm} per arm before any verdict",
        )
    diff = float(seq.difference)
    better = diff > 0 if higher_is_better else diff < 0
    base = float(champion.mean)
    lift = f", {diff / base:+.1%} relative" if base != 0 and math.isfinite(base) else ""
    summary = (
        f"challenger - champion = {_fmt(diff)}{lift} (always-valid {1 - alpha:.0%} interval "
        f"[{_fmt(float(seq.ci_low))}, {_fmt(float(seq.ci_high))}], sequential p = "
        f"{float(seq.p_value):.3g})"
    )
    if float(seq.p_value) < alpha:
        if not min_duration_met:
            return done(
                "continue",
                f"challenger is significantly {'better' if better else 'worse'} so far, but the "
                f"minimum test duration has not passed yet: {summary}",
            )
        if better:
            return done("promote_challenger", f"challenger is significantly better: {summary}")
        return done("keep_champion", f"challenger is significantly worse: {summary}")
    if horizon_reached and min_duration_met:
        return done(
            "keep_champion",
            f"no significant difference by the end of the test, keeping the champion: {summary}",
        )
    return done("continue", f"no significant difference yet: {summary}")
