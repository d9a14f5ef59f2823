"""Drift statistics for tabular features (pure: numpy, scipy and pandas only -- no Prefect, no MLflow).

Two steps, so a drift check never needs the training data (docs/architecture.md, "stored with every
version"):

1. :func:`build_profile` summarises a *reference* DataFrame (the training data) into a compact,
   JSON-serialisable PROFILE (plain dicts, lists, ints, floats and strings);
2. :func:`compare_to_profile` compares a *current* DataFrame with that profile and returns one
   :class:`FeatureStats` per feature: statistics, a p-value, effect sizes and a verdict.
   :func:`model_drift_score` folds the verdicts into one number in [0, 1].

The per-statistic functions (:func:`psi`, :func:`ks_2samp_raw`, :func:`ks_from_sketch`,
:func:`chi2_test`, :func:`js_distance`, :func:`wasserstein_raw`, ...) are public too; the tests
compare them with their oracles (docs/architecture.md, "Statistics").

Numeric features
----------------
The profile keeps, per numeric feature (missing values -- NaN/None/pd.NA -- are counted and then
left out of every distributional statistic):

* ``n``, ``n_missing``, ``missing_rate``, ``mean``, ``std`` (ddof=1), ``min``, ``max``;
* ``bins``: the interior edges of ``n_bins`` equal-count (quantile) bins of the reference,
  de-duplicated (ties can merge bins; an edge equal to the maximum is dropped so that no bin is
  empty in the reference) and the reference count of every bin. Bin ``i`` is ``(e[i-1], e[i]]``,
  the first is ``(-inf, e[0]]`` and the last ``(e[-1], +inf)``;
* ``sketch``: an exact *sub-sample of the reference ECDF*. The knots are the distinct values among
  the order statistics at ranks ``round(k (n-1) / n_quantiles)``, ``k = 0..n_quantiles`` (so the
  minimum and the maximum are knots), and for every knot ``u`` the exact counts ``le = #{x <= u}``
  and ``at = #{x == u}``. Between two adjacent knots the reference ECDF is therefore known to lie in
  ``[le_j / n, lt_{j+1} / n]`` (``lt = le - at``), an interval of width ``gap_j / n`` where
  ``gap_j`` counts the reference values strictly between the knots; ``gap_j <= ceil((n-1) /
  n_quantiles) - 1``, so ``eps = max_j gap_j / n < 1 / n_quantiles``. ``eps`` is stored as
  ``ks_error_bound`` and is exactly 0 when ``n <= n_quantiles + 1`` (every value is a knot).

Profile KS -- the documented error bound
    :func:`ks_from_sketch` evaluates ``D = sup_x |F_ref(x) - F_cur(x)|`` with ``F_ref`` replaced by
    the sketch ECDF ``F_hat`` (exact at the knots and their left limits, linear in between) and
    ``F_cur`` exact. Because ``|F_hat - F_ref| <= eps`` everywhere,
    ``|D_profile - D_exact| <= eps < 1 / n_quantiles`` (plus float rounding, ~1e-15), for any data:
    continuous, discrete or with ties. The p-value is the asymptotic formula of scipy's
    ``ks_2samp(method="asymp")``, ``kstwo.sf(D, N)`` with ``N = round(n m / (n + m))``, for
    ``N <= 1,000`` and Stephens' corrected Kolmogorov limit above (see :func:`ks_p_value`).

PSI
    ``PSI = sum_i (q_i - p_i) ln(q_i / p_i)`` over the reference quantile bins, with ``p`` and ``q``
    the reference and current proportions floored at ``PSI_EPSILON = 1e-4`` (no renormalisation),
    so empty bins give a finite value and identical data give exactly 0. Without drift
    ``PSI ~ (1/n + 1/m) chi2(B - 1)`` approximately (B = number of bins), which gives
    ``psi_p_value`` and the noise threshold ``psi_threshold`` at ``alpha`` (docs/architecture.md:
    a fixed cut-off such as 0.1 is noise at 1k rows and a tiny effect at 1M rows).

Wasserstein
    ``W1 / scale`` with ``scale`` the reference standard deviation (ddof=1; 1.0 when the reference
    is constant), i.e. "how far the distribution moved, in reference standard deviations": a mean
    shift of 0.25 sd gives 0.25. From the profile it is computed against the sketch distribution
    with the midpoint rule on the current quantile function; the error against the exact
    ``scipy.stats.wasserstein_distance(ref, cur) / scale`` is at most
    ``(eps + 1/m) (max_ref - min_ref) / scale`` (about 0.005 sd for a normal 1M-row reference).

Categorical features
--------------------
The profile keeps the category counts (keys are strings: ``str(value)``, with integral floats
written as integers so ``1`` and ``1.0`` meet), ``n``, ``n_missing`` and ``missing_rate``. At most
``max_categories`` categories are stored (the most frequent); the rest are pooled into
``other_count`` and current values outside the stored categories then join that pool.

* chi-squared test of the 2 x k contingency table (reference counts, current counts) over the
  categories seen in either sample -- identical to ``scipy.stats.chi2_contingency`` with its
  defaults (Yates' correction when the table is 2 x 2);
* Jensen-Shannon *distance* with base-2 logarithms (in [0, 1]) -- identical to
  ``scipy.spatial.distance.jensenshannon(p, q, base=2)``;
* ``unseen_share``: the share of current non-missing values whose category the profile does not
  hold (with a truncated profile this includes the pooled rare categories); PSI over the
  categories with the same epsilon.

Verdict (per feature)
---------------------
``drifted = p_value < alpha and effect >= min_effect`` (``min_effect`` defaults to 0, so the test
alone decides). The test is KS for numeric features (``numeric_method="psi"`` uses the PSI
chi-squared approximation instead) and chi-squared for categorical ones: both have a null
distribution that accounts for *both* sample sizes, so the false-positive rate stays at ``alpha``
whether 1k or 1M rows are compared (verified by simulation in the tests). Only one test decides
per feature -- OR-ing KS and PSI would roughly double the false-positive rate. With very large
samples every tiny shift is significant; ``min_effect`` (for example 0.1 sd for numeric, 0.05 for
categorical JS) keeps those out of the verdict while the statistics still report them.

``effect`` is the normalised Wasserstein distance for numeric features and the JS distance for
categorical ones. ``missing_delta`` (current minus reference missing rate) is reported; it only
enters the verdict when ``max_missing_delta`` is given.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as _stats
from scipy.special import chdtrc, chdtri, kolmogorov, rel_entr

from tasks.errors import DataError

__all__ = [
    "PROFILE_FORMAT",
    "PROFILE_VERSION",
    "PSI_EPSILON",
    "DEFAULT_N_BINS",
    "DEFAULT_N_QUANTILES",
    "DEFAULT_MAX_CATEGORIES",
    "DriftInputError",
    "FeatureStats",
    "build_profile",
    "compare_to_profile",
    "model_drift_score",
    "psi",
    "psi_noise_threshold",
    "psi_p_value",
    "ks_2samp_raw",
    "ks_p_value",
    "ks_from_sketch",
    "chi2_test",
    "js_distance",
    "wasserstein_raw",
    "wasserstein_from_sketch",
    "numeric_sketch",
    "numeric_feature_profile",
    "numeric_feature_stats",
    "categorical_feature_profile",
    "categorical_feature_stats",
]

PROFILE_FORMAT = "mlops-flows/drift-profile"
PROFILE_VERSION = 1
PSI_EPSILON = 1e-4
DEFAULT_N_BINS = 10
DEFAULT_N_QUANTILES = 2000
DEFAULT_MAX_CATEGORIES = 1000

Kind = Literal["numeric", "categorical"]


class DriftInputError(DataError):
    """The reference or current data (or the profile) cannot be used for a drift check.

    The message names the columns concerned and what to do about them.
    """


@dataclass
class FeatureStats:
    """Drift statistics and verdict for one feature.

    * ``kind``: "numeric" | "categorical"; ``method``: the test behind ``statistic`` and
      ``p_value`` -- "ks" (KS statistic D from the profile sketch), "psi" (PSI with its
      chi-squared approximation) or "chi2" (chi-squared contingency test);
    * ``drifted``: ``p_value < alpha and effect >= min_effect`` (or the missing-rate rule when
      ``max_missing_delta`` was given);
    * ``effect``: ``wasserstein`` for numeric features (W1 / reference sd: "moved by this many
      sds"), ``js`` for categorical ones (Jensen-Shannon distance, base 2, in [0, 1]);
    * ``psi`` with ``psi_threshold`` (what noise alone exceeds with probability ``alpha`` at these
      sample sizes), ``psi_p_value`` and ``psi_exceeds_noise``;
    * ``unseen_share`` / ``unseen_categories`` (categorical): share of current values in
      categories the profile does not hold, and the 10 most frequent of them;
    * ``missing_delta`` = ``missing_rate_current - missing_rate_reference``;
    * ``n_reference`` / ``n_current``: non-missing values the statistics used;
    * ``ks_error_bound`` (numeric): ``|statistic - exact KS| <= ks_error_bound`` for "ks";
    * ``current_counts``: the current data over the profile's cells -- numeric: non-missing
      values per reference quantile bin (the bins' order); categorical: values per profiled
      category (the profile's order) and, last, the values outside them. With the profile's own
      counts this is everything needed to redraw both distributions without the data.

    Fields that do not apply to a kind are ``None``.
    """

    name: str
    kind: str
    method: str
    statistic: float
    p_value: float
    psi: float
    effect: float
    drifted: bool
    wasserstein: float | None = None
    js: float | None = None
    unseen_share: float | None = None
    missing_delta: float = 0.0
    n_reference: int = 0
    n_current: int = 0
    # extras
    alpha: float = 0.05
    psi_threshold: float = 0.0
    psi_p_value: float = 1.0
    psi_exceeds_noise: bool = False
    ks_error_bound: float | None = None
    missing_rate_reference: float = 0.0
    missing_rate_current: float = 0.0
    mean_reference: float | None = None
    mean_current: float | None = None
    unseen_categories: list[str] = field(default_factory=list)
    current_counts: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict."""
        return asdict(self)


# --------------------------------------------------------------------------------------------
# elementary statistics (arrays in, floats out)
# --------------------------------------------------------------------------------------------


def psi(reference_counts, current_counts, eps: float = PSI_EPSILON) -> float | np.ndarray:
    """Population stability index of two count (or proportion) vectors over the same bins.

    ``sum (q - p) ln(q / p)`` with ``p``/``q`` the proportions floored at ``eps`` (no
    renormalisation). Finite with empty bins, exactly 0 on identical proportions, never negative.
    Works on the last axis, so a batch of count rows gives a batch of PSIs.
    """
    r = np.asarray(reference_counts, dtype=np.float64)
    c = np.asarray(current_counts, dtype=np.float64)
    p = np.maximum(r / r.sum(axis=-1, keepdims=True), eps)
    q = np.maximum(c / c.sum(axis=-1, keepdims=True), eps)
    out = np.sum((q - p) * np.log(q / p), axis=-1)
    return float(out) if np.ndim(out) == 0 else out


def psi_noise_threshold(n_reference: int, n_current: int, n_bins: int, alpha: float = 0.05) -> float:
    """PSI that pure sampling noise exceeds with probability ``alpha``.

    ``(1/n + 1/m) * chi2.ppf(1 - alpha, n_bins - 1)`` (0 with a single bin).
    """
    if n_bins <= 1:
        return 0.0
    return float((1.0 / n_reference + 1.0 / n_current) * chdtri(n_bins - 1, alpha))


def psi_p_value(value, n_reference: int, n_current: int, n_bins: int):
    """Approximate p-value of a PSI under no drift: ``chi2.sf(PSI / (1/n + 1/m), n_bins - 1)``."""
    if n_bins <= 1:
        return 1.0 if np.ndim(value) == 0 else np.ones_like(np.asarray(value, dtype=float))
    out = chdtrc(n_bins - 1,
                 np.asarray(value, dtype=float) / (1.0 / n_reference + 1.0 / n_current))
    return float(out) if np.ndim(out) == 0 else out


KS_KSTWO_MAX_N = 1_000


def ks_p_value(d: float, n_reference: int, n_current: int, fast: bool = False) -> float:
    """Asymptotic two-sided two-sample KS p-value.

    ``fast=False``: the formula of ``scipy.stats.ks_2samp(method="asymp")``,
    ``kstwo.sf(d, N)`` with ``N = round(n m / (n + m))`` (floored at 1).

    ``fast=True`` (used by :func:`compare_to_profile`): the same while ``N <= 1,000``; above,
    Stephens' corrected Kolmogorov limit ``kstwobign.sf(d (sqrt(N) + 0.12 + 0.11 / sqrt(N)))``.
    scipy's ``kstwo.sf`` takes 5-15 ms per call at N = 5,000-10,000 and up to ~0.7 s at
    N = 500,000 for small p-values (it sums an O(N) series); the corrected limit is
    constant-time and within 5e-3 of it for N > 1,000, within 3e-4 where 0.01 <= p <= 0.1
    -- a test checks this.
    """
    big, small = sorted([float(n_reference), float(n_current)], reverse=True)
    en = max(1.0, float(np.round(big * small / (big + small))))
    if fast and en > KS_KSTWO_MAX_N:
        sq = math.sqrt(en)
        p = kolmogorov(d * (sq + 0.12 + 0.11 / sq))  # == kstwobign.sf
    else:
        p = _stats.kstwo.sf(d, en)
    return float(np.clip(p, 0.0, 1.0))


def _ks_statistic_sorted(a: np.ndarray, b: np.ndarray) -> float:
    """Exact two-sided KS statistic of two sorted samples (scipy's formula, ties handled)."""
    data_all = np.concatenate([a, b])
    cdf1 = np.searchsorted(a, data_all, side="right") / a.size
    cdf2 = np.searchsorted(b, data_all, side="right") / b.size
    diff = cdf1 - cdf2
    return float(max(np.clip(-diff.min(), 0, 1), diff.max()))


def _finite_1d(values, what: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[~np.isnan(x)]
    if x.size == 0:
        raise DriftInputError(f"{what} has no non-missing values; pass at least one number")
    return x


def ks_2samp_raw(reference, current, method: Literal["auto", "exact", "asymp"] = "auto"
                 ) -> tuple[float, float]:
    """Two-sample two-sided KS test from raw arrays: ``(statistic, p_value)``.

    Same result as ``scipy.stats.ks_2samp(reference, current, method=method)`` (NaNs are dropped
    first). The statistic is computed here; the asymptotic p-value too (:func:`ks_p_value`); the
    exact small-sample p-value ("auto" picks it when both samples have <= 10,000 values) is
    scipy's lattice-path computation, taken from ``ks_2samp(method="exact")``.
    """
    a = np.sort(_finite_1d(reference, "reference sample"))
    b = np.sort(_finite_1d(current, "current sample"))
    d = _ks_statistic_sorted(a, b)
    mode = method
    if mode == "auto":
        mode = "exact" if max(a.size, b.size) <= 10_000 else "asymp"
    if mode == "exact":
        return d, float(_stats.ks_2samp(a, b, method="exact").pvalue)
    if mode != "asymp":
        raise ValueError(f"method must be 'auto', 'exact' or 'asymp', got {method!r}")
    return d, ks_p_value(d, a.size, b.size)


def numeric_sketch(sorted_values: np.ndarray, n_quantiles: int = DEFAULT_N_QUANTILES) -> dict:
    """The reference ECDF sketch of a sorted, NaN-free sample (see the module docstring).

    Returns ``{"values": knots, "le": #{x <= knot}, "at": #{x == knot}, "n": n,
    "ks_error_bound": eps}`` as plain lists / numbers.
    """
    s = np.asarray(sorted_values, dtype=np.float64)
    n = s.size
    idx = np.unique(np.rint(np.linspace(0, n - 1, int(n_quantiles) + 1)).astype(np.int64))
    knots = np.unique(s[idx])
    le = np.searchsorted(s, knots, side="right")
    lt = np.searchsorted(s, knots, side="left")
    gaps = lt[1:] - le[:-1]
    eps = float(gaps.max() / n) if gaps.size else 0.0
    return {
        "values": knots.tolist(),
        "le": le.tolist(),
        "at": (le - lt).tolist(),
        "n": int(n),
        "ks_error_bound": eps,
    }


def _sketch_arrays(sketch: Mapping) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    u = np.asarray(sketch["values"], dtype=np.float64)
    le = np.asarray(sketch["le"], dtype=np.float64)
    lt = le - np.asarray(sketch["at"], dtype=np.float64)
    return u, le, lt, int(sketch["n"])


def ks_from_sketch(sketch: Mapping, current_sorted: np.ndarray) -> tuple[float, float]:
    """KS statistic and asymptotic p-value of a sorted, NaN-free current sample against a sketch.

    ``|statistic - exact KS statistic| <= sketch["ks_error_bound"] < 1 / n_quantiles``.

    The sketch ECDF ``F_hat`` equals the reference ECDF at every knot (value and left limit) and
    is linear between knots; the current ECDF ``F_cur`` is exact. Between consecutive "events"
    (knots and current values) ``F_cur`` is constant and ``F_hat`` increasing, so the supremum of
    ``|F_hat - F_cur|`` is attained at a one-sided limit at an event; every such limit is
    evaluated, vectorised (a few passes over the current sample plus per-knot reductions).
    ``current_sorted`` must be non-empty. No reference data is needed.
    """
    u, le, lt, n = _sketch_arrays(sketch)
    d = _ks_sketch_statistic(u, le, lt, n, current_sorted)
    return d, ks_p_value(d, n, current_sorted.size, fast=True)


def _ks_sketch_statistic(u, le, lt, n, y) -> float:
    """sup |F_hat - F_cur| for sorted ``y`` (see :func:`ks_from_sketch`)."""
    m = y.size
    J = u.size
    # Block k (k = 0..J) holds the current values with exactly k knots <= y: y < u[0] for k = 0,
    # u[k-1] <= y < u[k] inside, y >= u[-1] for k = J. On block k
    #     F_hat(y) = lo[k] + slope[k] * (y - base[k])
    # (0 below the minimum, 1 from the maximum on, linear from F_ref(u[k-1]) = le[k-1]/n to
    # F_ref(u[k]-) = lt[k]/n inside; exactly lo[k] at y == base[k], a knot's right limit).
    lo = np.empty(J + 1)
    lo[0] = 0.0
    lo[1:] = le / n
    slope = np.zeros(J + 1)
    if J > 1:
        slope[1:J] = (lt[1:] - le[:-1]) / n / np.diff(u)
    base = np.empty(J + 1)
    base[0] = u[0]
    base[1:] = u
    # y is sorted, so blocks are contiguous: block k starts at c_left[k-1] (#y < u[k-1]).
    c_left = np.searchsorted(y, u, side="left")
    c_right = np.searchsorted(y, u, side="right")
    counts = np.diff(c_left, prepend=0, append=m)
    start = np.concatenate([[0], c_left])
    end = start + counts
    # g_i = F_cur(y_i) - (F_hat(y_i) - lo[k]) = (i+1)/m - slope[k] (y_i - base[k])
    g = np.arange(1, m + 1, dtype=np.float64)
    g /= m
    g -= np.repeat(slope, counts) * (y - np.repeat(base, counts))
    # D+ at current values: F_cur(y) - F_hat(y) = g - lo[k] (max at the last of tied values)
    nonempty = counts > 0
    d1 = float(np.max(np.maximum.reduceat(g, start[nonempty]) - lo[nonempty]))
    # D- at current values that are not knots: F_hat(y-) - F_cur(y-) = lo[k] + 1/m - g;
    # values equal to the block's knot (its first ones) are left to the knot terms below.
    start2 = start.copy()
    start2[1:] = c_right
    keep = start2 < end
    d2 = float(np.max(lo[keep] + 1.0 / m - np.minimum.reduceat(g, start2[keep]))) if keep.any() else 0.0
    # one-sided limits at the knots (exact reference values le/n and lt/n there)
    d3 = float(np.max(c_left / m - lt / n))
    d4 = float(np.max(le / n - c_right / m))
    d5 = float(np.max(lt / n - c_left / m))
    return max(0.0, d1, d2, d3, d4, d5)


def wasserstein_raw(reference, current, scale: float | None = None) -> float:
    """Normalised 1-Wasserstein distance from raw arrays.

    ``scipy.stats.wasserstein_distance(reference, current) / scale`` with ``scale`` the reference
    standard deviation (ddof=1) unless given; 1.0 when that is 0 or undefined. NaNs are dropped.
    """
    a = _finite_1d(reference, "reference sample")
    b = _finite_1d(current, "current sample")
    if scale is None:
        scale = _scale(float(a.std(ddof=1)) if a.size > 1 else 0.0)
    return float(_stats.wasserstein_distance(a, b) / scale)


def _scale(std: float) -> float:
    return std if (std > 0 and math.isfinite(std)) else 1.0


def wasserstein_from_sketch(sketch: Mapping, current_sorted: np.ndarray, scale: float = 1.0) -> float:
    """``W1(sketch distribution, current) / scale`` via the current quantile function.

    ``mean_i |y_(i) - Q_hat((i + 1/2) / m)|`` where ``Q_hat`` is the quantile function of the
    sketch ECDF (flat over each knot's mass, linear between knots). Error against the exact
    ``W1(reference, current) / scale``: at most ``(eps + 1/m) (max_ref - min_ref) / scale``.
    """
    u, le, lt, n = _sketch_arrays(sketch)
    return _w1_sketch(u, le, lt, n, current_sorted) / scale


def _w1_sketch(u, le, lt, n, y) -> float:
    m = y.size
    xp = np.empty(2 * u.size)
    xp[0::2] = lt / n
    xp[1::2] = le / n
    fp = np.repeat(u, 2)
    p = (np.arange(m, dtype=np.float64) + 0.5) / m
    q = np.interp(p, xp, fp)
    return float(np.mean(np.abs(y - q)))


def chi2_test(reference_counts, current_counts, correction: bool = True) -> tuple[float, float, int]:
    """Chi-squared test of homogeneity of two count vectors: ``(statistic, p_value, dof)``.

    The 2 x k table ``[reference; current]`` minus the columns empty in both, then exactly what
    ``scipy.stats.chi2_contingency(table, correction=correction)`` computes: Pearson's statistic
    against ``row_total * col_total / total``, ``dof = k - 1``, Yates' continuity correction when
    ``dof == 1``; ``(0.0, 1.0, 0)`` when only one category is left.
    """
    obs = np.vstack([np.asarray(reference_counts, dtype=np.float64),
                     np.asarray(current_counts, dtype=np.float64)])
    obs = obs[:, obs.sum(axis=0) > 0]
    k = obs.shape[1]
    dof = k - 1
    if dof <= 0:
        return 0.0, 1.0, 0
    expected = np.outer(obs.sum(axis=1), obs.sum(axis=0)) / obs.sum()
    if dof == 1 and correction:
        diff = expected - obs
        obs = obs + np.minimum(0.5, np.abs(diff)) * np.sign(diff)
    stat = float(np.sum((obs - expected) ** 2 / expected))
    return stat, float(chdtrc(dof, stat)), dof  # == chi2.sf(stat, dof)


def js_distance(p, q) -> float:
    """Jensen-Shannon distance with base-2 logarithms, in [0, 1].

    Same as ``scipy.spatial.distance.jensenshannon(p, q, base=2)``: the inputs are normalised to
    sum to 1; ``sqrt((KL(p||m) + KL(q||m)) / 2)`` with ``m = (p + q) / 2``.
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    p = p / p.sum()
    q = q / q.sum()
    m = (p + q) / 2.0
    js = (np.sum(rel_entr(p, m)) + np.sum(rel_entr(q, m))) / np.log(2.0)
    return float(np.sqrt(max(js, 0.0) / 2.0))


# --------------------------------------------------------------------------------------------
# the profile
# --------------------------------------------------------------------------------------------


def _infer_kind(series: pd.Series) -> Kind | None:
    dt = series.dtype
    if pd.api.types.is_bool_dtype(dt):
        return "categorical"
    if pd.api.types.is_numeric_dtype(dt) and not pd.api.types.is_complex_dtype(dt):
        return "numeric"
    if (pd.api.types.is_object_dtype(dt) or pd.api.types.is_string_dtype(dt)
            or isinstance(dt, pd.CategoricalDtype)):
        return "categorical"
    return None


def _is_numeric_ok(series: pd.Series) -> bool:
    dt = series.dtype
    return (pd.api.types.is_numeric_dtype(dt) and not pd.api.types.is_complex_dtype(dt)
            and not isinstance(dt, pd.CategoricalDtype))


def _as_float(series: pd.Series) -> np.ndarray:
    return series.to_numpy(dtype=np.float64, na_value=np.nan)


def _cat_key(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, (np.integer,)):
        return str(int(value))
    return str(value)


def _category_counts(series: pd.Series) -> tuple[dict[str, int], int]:
    """Counts per category key (non-missing, zero counts dropped) and the number of missing."""
    n_missing = int(series.isna().sum())
    vc = series.value_counts(dropna=True, sort=False)
    vc = vc[vc > 0]
    counts: dict[str, int] = {}
    for value, count in zip(vc.index.tolist(), vc.to_numpy().tolist()):
        key = _cat_key(value)
        counts[key] = counts.get(key, 0) + int(count)
    return counts, n_missing


def build_profile(
    df: pd.DataFrame,
    feature_types: Mapping[str, str] | None = None,
    n_bins: int = DEFAULT_N_BINS,
    n_quantiles: int = DEFAULT_N_QUANTILES,
    max_categories: int = DEFAULT_MAX_CATEGORIES,
) -> dict:
    """Reference profile of ``df`` for later drift checks (JSON-serialisable dict).

    ``feature_types`` maps column -> "numeric" | "categorical" and then names exactly the
    features to profile; without it every column is profiled with its kind inferred from the
    dtype (bool, object, string and category -> categorical; other numbers -> numeric).
    ``n_bins``: quantile bins for PSI. ``n_quantiles``: sketch resolution; the profile KS is
    within ``1 / n_quantiles`` of the exact one. ``max_categories``: categories kept per
    categorical feature (the rest pooled). About 10-30 ms per 1M-row numeric column here
    (a sort dominates). Each feature also records the column's ``dtype``.

    Raises :class:`DriftInputError` for an empty frame, unknown/unsupported columns or kinds, an
    all-missing column, infinite values, or a declared-numeric column that is not numeric.
    """
    if not isinstance(df, pd.DataFrame):
        raise DriftInputError(f"build_profile needs a pandas DataFrame, got {type(df).__name__}")
    if len(df) == 0:
        raise DriftInputError("the reference data has no rows; profile the training data the "
                              "model was fitted on")
    if int(n_bins) < 2:
        raise DriftInputError(f"n_bins must be >= 2, got {n_bins}")
    if int(n_quantiles) < 10:
        raise DriftInputError(f"n_quantiles must be >= 10, got {n_quantiles}")
    if int(max_categories) < 1:
        raise DriftInputError(f"max_categories must be >= 1, got {max_categories}")
    if df.columns.duplicated().any():
        dups = sorted({str(c) for c in df.columns[df.columns.duplicated()]})
        raise DriftInputError(f"the reference data has duplicated column names {dups}; "
                              "rename them so every feature has one column")

    if feature_types is None:
        kinds: dict[str, Kind] = {}
        bad = []
        for col in df.columns:
            kind = _infer_kind(df[col])
            if kind is None:
                bad.append(f"{col!r} ({df[col].dtype})")
            else:
                kinds[col] = kind
        if bad:
            raise DriftInputError(
                f"cannot profile columns with unsupported dtypes: {', '.join(bad)}; convert them "
                "(e.g. datetimes to numbers) or pass feature_types naming the features to profile")
    else:
        unknown = [c for c in feature_types if c not in df.columns]
        if unknown:
            raise DriftInputError(f"feature_types names columns the reference data lacks: "
                                  f"{unknown}; available: {list(map(str, df.columns))}")
        wrong = {c: k for c, k in feature_types.items() if k not in ("numeric", "categorical")}
        if wrong:
            raise DriftInputError(f"feature kinds must be 'numeric' or 'categorical', got {wrong}")
        kinds = dict(feature_types)  # type: ignore[arg-type]
        not_num = [f"{c!r} ({df[c].dtype})" for c, k in kinds.items()
                   if k == "numeric" and not _is_numeric_ok(df[c])]
        if not_num:
            raise DriftInputError(
                f"columns declared numeric have non-numeric dtypes: {', '.join(not_num)}; convert "
                "them with pd.to_numeric(..., errors='coerce') or declare them 'categorical'")

    features: dict[str, dict] = {}
    all_missing = []
    for col, kind in kinds.items():
        series = df[col]
        n_missing = int(series.isna().sum())
        if n_missing == len(series):
            all_missing.append(str(col))
            continue
        if kind == "numeric":
            fp = numeric_feature_profile(_as_float(series), n_bins, n_quantiles, name=str(col))
        else:
            counts, n_miss = _category_counts(series)
            fp = categorical_feature_profile(counts, n_miss, max_categories, name=str(col))
        fp["dtype"] = str(series.dtype)
        features[str(col)] = fp
    if all_missing:
        raise DriftInputError(f"reference columns are entirely missing: {all_missing}; drop "
                              "them from the features or fix the training data")
    return {
        "format": PROFILE_FORMAT,
        "version": PROFILE_VERSION,
        "n_rows": int(len(df)),
        "params": {"n_bins": int(n_bins), "n_quantiles": int(n_quantiles),
                   "max_categories": int(max_categories), "psi_epsilon": PSI_EPSILON},
        "features": features,
    }


def numeric_feature_profile(values, n_bins: int = DEFAULT_N_BINS,
                            n_quantiles: int = DEFAULT_N_QUANTILES, name: str = "values") -> dict:
    """Profile of one numeric feature from an array (NaN = missing); see the module docstring.

    What :func:`build_profile` stores per numeric column (it adds nothing else).
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    missing = np.isnan(values)
    n_missing = int(missing.sum())
    x = values[~missing] if n_missing else values
    if x.size == 0:
        raise DriftInputError(f"reference column {name!r} is entirely missing; drop it from the "
                              "features or fix the training data")
    if not np.isfinite(x).all():
        raise DriftInputError(f"reference column {name!r} contains infinite values; replace them "
                              "with NaN (missing) or finite bounds before profiling")
    s = np.sort(x)
    n = s.size
    k = np.ceil(np.arange(1, n_bins) * n / n_bins).astype(np.int64) - 1
    edges = np.unique(s[np.clip(k, 0, n - 1)])
    edges = edges[edges < s[-1]]
    cum = np.searchsorted(s, edges, side="right")
    counts = np.diff(np.concatenate([[0], cum, [n]]))
    return {
        "kind": "numeric",
        "n": int(n),
        "n_missing": n_missing,
        "missing_rate": n_missing / values.size,
        "mean": float(s.mean()),
        "std": float(s.std(ddof=1)) if n > 1 else 0.0,
        "min": float(s[0]),
        "max": float(s[-1]),
        "bins": {"edges": edges.tolist(), "counts": counts.tolist()},
        "sketch": numeric_sketch(s, n_quantiles),
    }


def categorical_feature_profile(counts: Mapping[str, int], n_missing: int = 0,
                                max_categories: int = DEFAULT_MAX_CATEGORIES,
                                name: str = "values") -> dict:
    """Profile of one categorical feature from its category counts (keys: strings).

    What :func:`build_profile` stores per categorical column: the ``max_categories`` most
    frequent categories (ties by name) and the pooled count of the rest.
    """
    counts = {str(k): int(c) for k, c in counts.items() if int(c) > 0}
    n = sum(counts.values())
    if n == 0:
        raise DriftInputError(f"reference column {name!r} is entirely missing; drop it from the "
                              "features or fix the training data")
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    kept = dict(items[:max_categories])
    other = int(sum(c for _, c in items[max_categories:]))
    return {
        "kind": "categorical",
        "n": int(n),
        "n_missing": n_missing,
        "missing_rate": n_missing / (n + n_missing),
        "categories": kept,
        "other_count": other,
        "truncated": other > 0,
    }


# --------------------------------------------------------------------------------------------
# the check
# --------------------------------------------------------------------------------------------


def _check_profile(profile: Any) -> dict:
    if not isinstance(profile, Mapping) or profile.get("format") != PROFILE_FORMAT:
        raise DriftInputError("not a drift profile (missing format "
                              f"{PROFILE_FORMAT!r}); build one with build_profile(training_df)")
    if profile.get("version") != PROFILE_VERSION:
        raise DriftInputError(f"drift profile version {profile.get('version')!r} is not supported "
                              f"(this code reads version {PROFILE_VERSION}); rebuild the profile "
                              "from the training data with build_profile")
    feats = profile.get("features")
    if not isinstance(feats, Mapping) or not feats:
        raise DriftInputError("the drift profile has no features; rebuild it with build_profile")
    return dict(feats)


def _min_effect_for(min_effect, kind: str) -> float:
    if min_effect is None:
        return 0.0
    if isinstance(min_effect, Mapping):
        return float(min_effect.get(kind, 0.0))
    return float(min_effect)


def compare_to_profile(
    profile: Mapping,
    current: pd.DataFrame,
    alpha: float = 0.05,
    *,
    min_effect: float | Mapping[str, float] | None = None,
    numeric_method: Literal["ks", "psi"] = "ks",
    max_missing_delta: float | None = None,
    features: Iterable[str] | None = None,
) -> list[FeatureStats]:
    """Compare ``current`` with a reference ``profile``: one :class:`FeatureStats` per feature.

    ``alpha``: significance level of the per-feature test (KS or PSI-chi2 for numeric features,
    chi-squared for categorical ones). ``min_effect``: minimum effect for a drift verdict -- a
    number for both kinds or ``{"numeric": sd, "categorical": js}``. ``max_missing_delta``: also
    flag a feature whose missing rate moved by more than this (absolute). ``features``: check
    only these profiled features (default: all). Extra columns in ``current`` are ignored.

    The reference data is never needed -- only the profile. Raises :class:`DriftInputError`
    (listing every offending column at once) when ``current`` is empty, lacks profiled columns,
    has an entirely missing feature column or a non-numeric column for a numeric feature.
    """
    if not isinstance(current, pd.DataFrame):
        raise DriftInputError(f"compare_to_profile needs a pandas DataFrame, got "
                              f"{type(current).__name__}")
    if not 0.0 < float(alpha) < 1.0:
        raise DriftInputError(f"alpha must be in (0, 1), got {alpha}")
    if numeric_method not in ("ks", "psi"):
        raise DriftInputError(f"numeric_method must be 'ks' or 'psi', got {numeric_method!r}")
    feats = _check_profile(profile)
    if features is not None:
        wanted = list(features)
        unknown = [f for f in wanted if f not in feats]
        if unknown:
            raise DriftInputError(f"features {unknown} are not in the profile; profiled features: "
                                  f"{list(feats)}")
        feats = {f: feats[f] for f in wanted}

    if len(current) == 0:
        raise DriftInputError("current data has no rows; a drift check needs at least one row "
                              "of recent data")
    columns = {str(c): c for c in current.columns}
    absent = [f for f in feats if f not in columns]
    if absent:
        raise DriftInputError(
            f"current data lacks {len(absent)} profiled column(s): {absent}; pass a DataFrame "
            "with every feature the model was trained on (extra columns are ignored)")

    problems = []
    for name, fp in feats.items():
        series = current[columns[name]]
        if isinstance(series, pd.DataFrame):
            problems.append(f"{name!r} appears in several columns")
            continue
        if int(series.isna().sum()) == len(series):
            problems.append(f"{name!r} is entirely missing ({len(series)} rows)")
        elif fp.get("kind") == "numeric" and not _is_numeric_ok(series):
            problems.append(f"{name!r} is numeric in the profile but arrived as dtype "
                            f"{series.dtype} (convert with pd.to_numeric(..., errors='coerce') "
                            "or fix the upstream schema)")
        elif fp.get("kind") not in ("numeric", "categorical"):
            problems.append(f"{name!r} has unknown kind {fp.get('kind')!r} in the profile")
    if problems:
        raise DriftInputError("current data cannot be compared with the profile: "
                              + "; ".join(problems))

    out = []
    for name, fp in feats.items():
        series = current[columns[name]]
        if fp["kind"] == "numeric":
            fs = numeric_feature_stats(fp, _as_float(series), alpha, method=numeric_method,
                                       min_effect=_min_effect_for(min_effect, "numeric"),
                                       max_missing_delta=max_missing_delta, name=name)
        else:
            counts, n_missing = _category_counts(series)
            fs = categorical_feature_stats(fp, counts, n_missing, alpha,
                                           min_effect=_min_effect_for(min_effect, "categorical"),
                                           max_missing_delta=max_missing_delta, name=name)
        out.append(fs)
    return out


def _verdict(fs: FeatureStats, alpha: float, min_effect: float,
             max_missing_delta: float | None) -> FeatureStats:
    fs.drifted = bool(fs.p_value < alpha and fs.effect >= min_effect)
    if max_missing_delta is not None and abs(fs.missing_delta) > max_missing_delta:
        fs.drifted = True
    return fs


def numeric_feature_stats(feature_profile: Mapping, values, alpha: float = 0.05,
                          method: Literal["ks", "psi"] = "ks", min_effect: float = 0.0,
                          max_missing_delta: float | None = None,
                          name: str = "values") -> FeatureStats:
    """Drift statistics and verdict of one numeric feature: current ``values`` (NaN = missing)
    against its profile (``profile["features"][name]``). What :func:`compare_to_profile` runs per
    numeric column after its input checks."""
    fp = feature_profile
    values = np.asarray(values, dtype=np.float64).ravel()
    missing = np.isnan(values)
    n_missing = int(missing.sum())
    y = values[~missing] if n_missing else values
    if not np.isfinite(y).all():
        n_inf = int(np.isinf(y).sum())
        raise DriftInputError(f"current column {name!r} contains {n_inf} infinite value(s); "
                              "replace them with NaN (missing) or finite bounds")
    if y.size == 0:
        raise DriftInputError(f"current column {name!r} is entirely missing ({values.size} rows)")
    y = np.sort(y)
    m = y.size
    n = int(fp["n"])
    sketch = fp["sketch"]
    u, le, lt, _ = _sketch_arrays(sketch)

    edges = np.asarray(fp["bins"]["edges"], dtype=np.float64)
    ref_counts = np.asarray(fp["bins"]["counts"], dtype=np.float64)
    cum = np.searchsorted(y, edges, side="right")
    cur_counts = np.diff(np.concatenate([[0], cum, [m]]))
    n_bins = ref_counts.size
    psi_value = psi(ref_counts, cur_counts)
    psi_p = psi_p_value(psi_value, n, m, n_bins)

    d = _ks_sketch_statistic(u, le, lt, n, y)
    ks_p = ks_p_value(d, n, m, fast=True)
    w = _w1_sketch(u, le, lt, n, y) / _scale(float(fp["std"]))

    if method == "ks":
        statistic, p_value = d, ks_p
    else:
        statistic, p_value = psi_value, psi_p
    miss_cur = n_missing / values.size
    fs = FeatureStats(
        name=name, kind="numeric", method=method, statistic=float(statistic),
        p_value=float(p_value), psi=float(psi_value), effect=float(w), drifted=False,
        wasserstein=float(w), missing_delta=miss_cur - float(fp["missing_rate"]),
        n_reference=n, n_current=m, alpha=float(alpha),
        psi_threshold=psi_noise_threshold(n, m, n_bins, alpha), psi_p_value=float(psi_p),
        psi_exceeds_noise=bool(psi_p < alpha), ks_error_bound=float(sketch["ks_error_bound"]),
        missing_rate_reference=float(fp["missing_rate"]), missing_rate_current=miss_cur,
        mean_reference=float(fp["mean"]), mean_current=float(y.mean()),
        current_counts=cur_counts.tolist(),
    )
    return _verdict(fs, alpha, min_effect, max_missing_delta)


def categorical_feature_stats(feature_profile: Mapping, counts: Mapping[str, int],
                              n_missing: int = 0, alpha: float = 0.05, min_effect: float = 0.0,
                              max_missing_delta: float | None = None,
                              name: str = "values") -> FeatureStats:
    """Drift statistics and verdict of one categorical feature from its current category
    ``counts`` (string keys, see :func:`_cat_key`) and number of missing values. What
    :func:`compare_to_profile` runs per categorical column after its input checks."""
    fp = feature_profile
    counts = {str(k): int(c) for k, c in counts.items() if int(c) > 0}
    if not counts:
        raise DriftInputError(f"current column {name!r} is entirely missing ({n_missing} rows)")
    ref_cats: Mapping[str, int] = fp["categories"]
    truncated = bool(fp.get("truncated", False))
    keys = list(ref_cats)
    ref = [int(ref_cats[k]) for k in keys]
    cur = [counts.get(k, 0) for k in keys]
    unseen = {k: c for k, c in counts.items() if k not in ref_cats}
    n_unseen = int(sum(unseen.values()))
    if truncated:
        ref.append(int(fp["other_count"]))
        cur.append(n_unseen)
    else:
        for k, c in unseen.items():
            ref.append(0)
            cur.append(c)
    ref_a = np.asarray(ref, dtype=np.float64)
    cur_a = np.asarray(cur, dtype=np.float64)
    n = int(fp["n"])
    m = int(cur_a.sum())
    stat, p_value, _ = chi2_test(ref_a, cur_a)
    js = js_distance(ref_a, cur_a)
    n_cells = int(np.count_nonzero((ref_a + cur_a) > 0))
    psi_value = psi(ref_a, cur_a)
    psi_p = psi_p_value(psi_value, n, m, n_cells)
    miss_cur = n_missing / (m + n_missing)
    top_unseen = [k for k, _ in sorted(unseen.items(), key=lambda kv: (-kv[1], kv[0]))[:10]]
    fs = FeatureStats(
        name=name, kind="categorical", method="chi2", statistic=stat, p_value=p_value,
        psi=float(psi_value), effect=js, drifted=False, js=js, unseen_share=n_unseen / m,
        missing_delta=miss_cur - float(fp["missing_rate"]), n_reference=n, n_current=m,
        alpha=float(alpha), psi_threshold=psi_noise_threshold(n, m, n_cells, alpha),
        psi_p_value=float(psi_p), psi_exceeds_noise=bool(psi_p < alpha),
        missing_rate_reference=float(fp["missing_rate"]), missing_rate_current=miss_cur,
        unseen_categories=top_unseen, current_counts=cur[:len(keys)] + [n_unseen],
    )
    return _verdict(fs, alpha, min_effect, max_missing_delta)


# --------------------------------------------------------------------------------------------
# one number per model
# --------------------------------------------------------------------------------------------


def _get(item: Any, key: str):
    return item[key] if isinstance(item, Mapping) else getattr(item, key)


def model_drift_score(features: Sequence[Any], importances: Mapping[str, float] | None = None
                      ) -> float:
    """Importance-weighted share of drifted features, in [0, 1].

    ``sum_i w_i [drifted_i] / sum_i w_i`` over ``features`` (:class:`FeatureStats`, or anything
    with ``name`` and ``drifted`` attributes or keys). ``w_i`` is the feature's importance,
    negative or NaN importances counted as 0 and features absent from ``importances`` as 0 (the
    model does not use them). With no importances, or when they sum to 0, every feature weighs
    the same (plain share of drifted features). An empty list scores 0.0. Without any drift
    about ``alpha`` of the features are flagged by chance, so the expected no-drift score is
    about ``alpha``: compare the score with a threshold well above it.
    """
    items = list(features)
    if not items:
        return 0.0
    flags = np.array([bool(_get(f, "drifted")) for f in items], dtype=np.float64)
    weights = np.ones(len(items))
    if importances:
        w = np.array([float(importances.get(str(_get(f, "name")), 0.0) or 0.0) for f in items])
        w = np.where(np.isfinite(w) & (w > 0), w, 0.0)
        if w.sum() > 0:
            weights = w
    return float(np.clip(np.dot(weights, flags) / weights.sum(), 0.0, 1.0))
