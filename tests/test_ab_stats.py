"""A/B statistics (tasks/ab_stats.py): oracles, simulations, recommendation logic, bad inputs.

Oracles (docs/architecture.md, "Statistics"): statsmodels ``proportions_ztest``, ``NormalIndPower``,
``proportion_effectsize``, ``confint_proportions_2indep``; scipy ``ttest_ind(equal_var=False)``,
``chisquare``; GrowthBook's published sequential-interval formula.

Simulations are seeded and vectorised: every run of every simulated test is one row of a numpy
array, read every 100 samples, and fed to the same public functions the flows use.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import optimize, special, stats
from statsmodels.stats.power import NormalIndPower
from statsmodels.stats.proportion import (
    confint_proportions_2indep,
    proportion_effectsize,
    proportions_ztest,
)

from tasks import ab_stats
from tasks.ab_stats import (
    DEFAULT_MIN_SAMPLES_PER_ARM,
    DEFAULT_TUNING,
    ContinuousStats,
    ConversionStats,
    cohens_h,
    compare,
    mixture_rho_squared,
    probability_challenger_better,
    recommend,
    samples_needed,
    samples_needed_continuous,
    samples_needed_conversion,
    sequential_critical_z,
    sequential_halfwidth,
    sequential_p_value,
    sequential_test,
    srm_check,
    two_proportion_ztest,
    welch_ttest,
)

ALPHA = 0.05
RUNS = 2_000
STEP = 100  # results are read after every 100 new samples
FPR_LIMIT = ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / RUNS)  # 5% + 3 standard errors


def rel(x: float) -> float:
    return pytest.approx(x, rel=1e-9, abs=1e-12)


# --------------------------------------------------------------------------------------------
# fixed-horizon oracles


def test_ztest_reference_value_and_sign_convention():
    champion, challenger = ConversionStats(8000, 812), ConversionStats(2000, 231)
    res = two_proportion_ztest(champion, challenger)
    z_ref, p_ref = proportions_ztest([231, 812], [2000, 8000])
    assert res.statistic == pytest.approx(1.832165013350599, abs=1e-12)
    assert res.statistic == rel(z_ref)
    assert res.p_value == rel(p_ref)
    # Swapping the arms flips the sign (difference = challenger - champion).
    assert two_proportion_ztest(challenger, champion).statistic == rel(-z_ref)


def test_ztest_matches_statsmodels_on_random_counts():
    rng = np.random.default_rng(1)
    for _ in range(200):
        na, nb = rng.integers(5, 50_000, size=2)
        xa, xb = rng.integers(0, na + 1), rng.integers(0, nb + 1)
        if xa + xb in (0, na + nb):
            continue
        res = two_proportion_ztest(ConversionStats(na, xa), ConversionStats(nb, xb))
        z_ref, p_ref = proportions_ztest([xb, xa], [nb, na])
        assert res.statistic == rel(z_ref)
        assert res.p_value == rel(p_ref)


def test_welch_from_sums_matches_scipy_on_raw_values():
    rng = np.random.default_rng(2)
    for size_a, size_b, scale_b in [(500, 300, 3.0), (40, 4_000, 0.5), (2, 3, 1.0), (10_000, 77, 10.0)]:
        a = rng.normal(1.0, 2.0, size_a)
        b = rng.normal(1.3, 2.0 * scale_b, size_b)
        res = welch_ttest(ContinuousStats.from_values(a), ContinuousStats.from_values(b))
        ref = stats.ttest_ind(b, a, equal_var=False)
        assert res.statistic == rel(ref.statistic)
        assert res.p_value == rel(ref.pvalue)
        assert res.df == rel(ref.df)


def test_compare_conversion_difference_lift_and_interval():
    champion, challenger = ConversionStats(8000, 812), ConversionStats(2000, 231)
    res = compare(champion, challenger, alpha=0.05)
    assert res.metric == "conversion"
    assert res.difference == rel(231 / 2000 - 812 / 8000)
    assert res.relative_lift == rel((231 / 2000) / (812 / 8000) - 1)
    lo, hi = confint_proportions_2indep(231, 2000, 812, 8000, method="wald", compare="diff", alpha=0.05)
    assert (res.ci_low, res.ci_high) == (rel(lo), rel(hi))
    assert res.statistic == rel(1.832165013350599)
    assert res.relative_ci_low < res.relative_lift < res.relative_ci_high
    # 90% interval is narrower.
    narrow = compare(champion, challenger, alpha=0.10)
    assert res.ci_low < narrow.ci_low < narrow.ci_high < res.ci_high


def test_compare_continuous_interval_matches_scipy():
    rng = np.random.default_rng(3)
    a, b = rng.exponential(2.0, 700), rng.exponential(2.4, 250)
    res = compare(ContinuousStats.from_values(a), ContinuousStats.from_values(b), alpha=0.1)
    ref = stats.ttest_ind(b, a, equal_var=False)
    ci = ref.confidence_interval(0.9)
    assert (res.ci_low, res.ci_high) == (rel(ci.low), rel(ci.high))
    assert res.difference == rel(b.mean() - a.mean())
    assert res.relative_lift == rel(b.mean() / a.mean() - 1)
    assert res.p_value == rel(ref.pvalue)


def test_relative_lift_delta_method_covers_by_simulation():
    # The delta-method relative interval should cover the true lift about 95% of the time.
    rng = np.random.default_rng(4)
    covered = 0
    for _ in range(400):
        xa, xb = rng.binomial(5000, 0.10), rng.binomial(5000, 0.12)
        r = compare(ConversionStats(5000, xa), ConversionStats(5000, xb))
        covered += r.relative_ci_low <= 0.2 <= r.relative_ci_high
    assert 0.92 <= covered / 400 <= 0.98


def test_continuous_stats_moments():
    v = np.array([1.0, 2.0, 4.0, 7.0])
    s = ContinuousStats.from_values(v)
    assert s.mean == rel(v.mean())
    assert s.variance == rel(v.var(ddof=1))
    assert math.isnan(ContinuousStats(1, 3.0, 9.0).variance)
    c = ConversionStats(10, 3)
    assert (c.mean, c.variance) == (rel(0.3), rel(0.21))


def test_zero_variance_edge_cases():
    same = compare(ContinuousStats(10, 10.0, 10.0), ContinuousStats(10, 10.0, 10.0))
    assert same.difference == 0 and same.p_value == 1.0
    apart = compare(ContinuousStats(10, 10.0, 10.0), ContinuousStats(10, 20.0, 40.0))
    assert apart.p_value == 0.0
    none = sequential_test(ConversionStats(500, 0), ConversionStats(500, 0))
    assert none.p_value == 1.0 and none.ci_low < 0 < none.ci_high
    empty = sequential_test(ConversionStats(0, 0), ConversionStats(100, 10))
    assert empty.p_value == 1.0 and empty.ci_low == -math.inf and empty.ci_high == math.inf


# --------------------------------------------------------------------------------------------
# SRM


def test_srm_matches_scipy_chisquare():
    for a, b, split in [(8100, 1900, 0.2), (5000, 5000, 0.5), (9400, 600, 0.05), (51_000, 49_000, 0.5)]:
        res = srm_check(a, b, split)
        ref = stats.chisquare([a, b], [(a + b) * (1 - split), (a + b) * split])
        assert res.chi2 == rel(ref.statistic)
        assert res.p_value == rel(ref.pvalue)
        assert res.mismatch == (ref.pvalue < 0.001)
    assert srm_check(8100, 1900, 0.2).mismatch is False  # p = 0.012
    assert srm_check(8400, 1600, 0.2).mismatch is True
    assert srm_check(8100, 1900, 0.2, threshold=0.05).mismatch is True
    zero = srm_check(0, 0, 0.3)
    assert zero.p_value == 1.0 and not zero.mismatch


# --------------------------------------------------------------------------------------------
# sample size


def test_samples_needed_reference_9215():
    res = samples_needed_conversion(0.10, 0.11, traffic_split=0.2, alpha=0.05, power=0.8)
    assert res.challenger_n == 9215
    h = proportion_effectsize(0.11, 0.10)
    assert res.effect_size == rel(h)
    # Convention: nobs1 = challenger, ratio = nobs2 / nobs1 = champion / challenger = 0.8 / 0.2.
    ref_chal = NormalIndPower().solve_power(effect_size=h, alpha=0.05, power=0.8, ratio=0.8 / 0.2)
    assert res.challenger_n_exact == rel(ref_chal)
    assert res.champion_n_exact == rel(ref_chal * 4)
    # ... which is the same as nobs1 = champion with ratio 0.2 / 0.8.
    ref_champ = NormalIndPower().solve_power(effect_size=h, alpha=0.05, power=0.8, ratio=0.2 / 0.8)
    assert res.champion_n_exact == rel(ref_champ)
    assert res.champion_n == 36860 and res.total_n == 9215 + 36860


@pytest.mark.parametrize(
    "p0,p1,split,alpha,power",
    [(0.10, 0.12, 0.5, 0.05, 0.8), (0.30, 0.27, 0.1, 0.01, 0.9), (0.02, 0.025, 0.05, 0.1, 0.7)],
)
def test_samples_needed_matches_normal_ind_power(p0, p1, split, alpha, power):
    res = samples_needed_conversion(p0, p1, split, alpha=alpha, power=power)
    h = proportion_effectsize(p1, p0)
    assert cohens_h(p1, p0) == rel(h)
    ref = NormalIndPower().solve_power(
        effect_size=abs(h), alpha=alpha, power=power, ratio=(1 - split) / split
    )
    assert res.challenger_n_exact == rel(ref)
    assert NormalIndPower().power(abs(h), res.challenger_n_exact, alpha, ratio=(1 - split) / split) == rel(power)


def test_samples_needed_continuous_and_observed():
    res = samples_needed_continuous(0.5, 4.0, 0.25)
    ref = NormalIndPower().solve_power(effect_size=0.125, alpha=0.05, power=0.8, ratio=3.0)
    assert res.challenger_n_exact == rel(ref)
    observed = samples_needed(ConversionStats(8000, 800), ConversionStats(2000, 220), 0.2)
    assert observed.challenger_n_exact == rel(samples_needed_conversion(0.10, 0.11, 0.2).challenger_n_exact)
    a = ContinuousStats.from_values(np.array([1.0, 2.0, 3.0, 4.0]))
    b = ContinuousStats.from_values(np.array([2.0, 3.0, 4.0, 5.0]))
    obs = samples_needed(a, b, 0.5)
    assert obs.effect_size == rel(1.0 / np.std([1, 2, 3, 4], ddof=1))
    nothing = samples_needed_conversion(0.1, 0.1, 0.5)
    assert nothing.challenger_n is None and nothing.total_n is None


# --------------------------------------------------------------------------------------------
# Bayesian


def _beta_greater_closed_form(a_b: int, b_b: int, a_a: int, b_a: int) -> float:
    """Evan Miller's closed form for P(X_b > X_a), integer a_b."""
    i = np.arange(a_b)
    log_terms = (
        special.betaln(a_a + i, b_a + b_b)
        - np.log(b_b + i)
        - special.betaln(1 + i, b_b)
        - special.betaln(a_a, b_a)
    )
    return float(np.exp(special.logsumexp(log_terms)))


@pytest.mark.parametrize(
    "champ,chal", [((1000, 100), (1000, 120)), ((8000, 812), (2000, 231)), ((50, 3), (40, 0)), ((200, 190), (200, 195))]
)
def test_probability_challenger_better_beta_exact(champ, chal):
    res = probability_challenger_better(ConversionStats(*champ), ConversionStats(*chal))
    ref = _beta_greater_closed_form(chal[1] + 1, chal[0] - chal[1] + 1, champ[1] + 1, champ[0] - champ[1] + 1)
    assert res.probability_challenger_better == pytest.approx(ref, abs=1e-9)
    swapped = probability_challenger_better(ConversionStats(*chal), ConversionStats(*champ))
    assert res.probability_challenger_better + swapped.probability_challenger_better == pytest.approx(1, abs=1e-9)


def test_probability_challenger_better_continuous_and_large_counts():
    a = ContinuousStats.from_values(np.arange(100.0))
    b = ContinuousStats.from_values(np.arange(100.0) + 5)
    res = probability_challenger_better(a, b)
    se = math.sqrt(a.variance / 100 + b.variance / 100)
    assert res.probability_challenger_better == rel(stats.norm.cdf(5 / se))
    big = probability_challenger_better(ConversionStats(2_000_000, 200_000), ConversionStats(2_000_000, 201_000))
    d, se = 0.0005, math.sqrt(2 * 0.1 * 0.9 / 2_000_000)
    assert big.probability_challenger_better == pytest.approx(stats.norm.cdf(d / se), abs=2e-3)


# --------------------------------------------------------------------------------------------
# sequential: formulas


def test_sequential_matches_growthbook_interval_formula():
    rho = math.sqrt((-2 * math.log(ALPHA) + math.log(-2 * math.log(ALPHA) + 1)) / 5000)
    assert mixture_rho_squared(ALPHA, 5000) == rel(rho**2)
    for n, se in [(1000, 0.01), (10_000, 0.003), (123_456, 0.0007)]:
        s2 = se**2 * n
        growthbook = math.sqrt(s2) * math.sqrt(
            2 * (n * rho**2 + 1) / (n**2 * rho**2) * math.log(math.sqrt(n * rho**2 + 1) / ALPHA)
        )
        assert sequential_halfwidth(se, n, alpha=ALPHA, tuning=5000) == rel(growthbook)


def test_sequential_p_value_is_the_mixture_likelihood_ratio_and_matches_boundary():
    rng = np.random.default_rng(5)
    z = rng.normal(0, 3, 1_000)
    n = rng.integers(10, 100_000, 1_000)
    p = sequential_p_value(z, n)
    a = n * mixture_rho_squared(ALPHA, DEFAULT_TUNING)
    mixture = np.exp(a * z**2 / (2 * (1 + a))) / np.sqrt(1 + a)
    assert np.allclose(p, np.minimum(1, 1 / mixture), rtol=1e-12, atol=0)
    crit = sequential_critical_z(n)
    assert np.array_equal(p < ALPHA, np.abs(z) > crit)
    # Sequential is always stricter than a single fixed-horizon look.
    assert np.all(crit > 1.96)


def test_sequential_conversion_z_is_the_ztest_and_interval_inverts_it():
    champion, challenger = ConversionStats(8000, 812), ConversionStats(2000, 231)
    seq = sequential_test(champion, challenger)
    assert seq.z == rel(two_proportion_ztest(champion, challenger).statistic)
    assert seq.difference == rel(231 / 2000 - 812 / 8000)
    assert seq.ci_low < seq.difference < seq.ci_high
    # Oracle for the score-type interval: restricted MLE by numerical optimisation, endpoints
    # by root finding on |d - delta| = crit * se(delta).
    crit = sequential_critical_z(10_000)

    def restricted_se(delta: float) -> float:
        def nll(q: float) -> float:
            return -(
                231 * math.log(q) + 1769 * math.log(1 - q)
                + 812 * math.log(q - delta) + 7188 * math.log(1 - q + delta)
            )

        lo, hi = max(0.0, delta) + 1e-15, min(1.0, 1 + delta) - 1e-15
        q = optimize.minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-14}).x
        return math.sqrt(q * (1 - q) / 2000 + (q - delta) * (1 - q + delta) / 8000)

    d = seq.difference
    low = optimize.brentq(lambda x: (d - x) - crit * restricted_se(x), d - 0.2, d, xtol=1e-13)
    high = optimize.brentq(lambda x: (x - d) - crit * restricted_se(x), d, d + 0.2, xtol=1e-13)
    assert seq.ci_low == pytest.approx(low, abs=1e-8)
    assert seq.ci_high == pytest.approx(high, abs=1e-8)


def test_sequential_vectorised_equals_scalar_calls():
    rng = np.random.default_rng(6)
    na, nb = rng.integers(1, 5000, 50), rng.integers(1, 5000, 50)
    xa, xb = rng.binomial(na, 0.1), rng.binomial(nb, 0.13)
    vec = sequential_test(ConversionStats(na, xa), ConversionStats(nb, xb))
    for i in range(50):
        one = sequential_test(ConversionStats(int(na[i]), int(xa[i])), ConversionStats(int(nb[i]), int(xb[i])))
        assert one.p_value == rel(vec.p_value[i])
        assert one.ci_low == pytest.approx(vec.ci_low[i], abs=1e-9)
        assert one.ci_high == pytest.approx(vec.ci_high[i], abs=1e-9)


# --------------------------------------------------------------------------------------------
# sequential: simulations


def simulate_conversion(runs, split, rate_champion, rate_challenger, total, seed):
    """Cumulative (champion, challenger) ConversionStats after every STEP routed samples."""
    rng = np.random.default_rng(seed)
    looks = total // STEP
    n_chal = rng.binomial(STEP, split, size=(runs, looks))
    n_champ = STEP - n_chal
    x_champ = rng.binomial(n_champ, rate_champion)
    x_chal = rng.binomial(n_chal, rate_challenger)
    champion = ConversionStats(n_champ.cumsum(axis=1), x_champ.cumsum(axis=1))
    challenger = ConversionStats(n_chal.cumsum(axis=1), x_chal.cumsum(axis=1))
    return champion, challenger


def readable(champion, challenger, min_n=DEFAULT_MIN_SAMPLES_PER_ARM):
    """Looks at which recommend() would give a verdict (minimum per-arm sample reached)."""
    return (np.asarray(champion.n) >= min_n) & (np.asarray(challenger.n) >= min_n)


@pytest.mark.parametrize(
    "split,rate",
    [(0.5, 0.10), (0.05, 0.10), (0.05, 0.02)],
    ids=["50/50 at 10%", "95/5 at 10%", "95/5 at 2%"],
)
def test_aa_sequential_false_positive_rate_when_read_every_100_samples(split, rate):
    champion, challenger = simulate_conversion(RUNS, split, rate, rate, 10_000, seed=11)
    seq = sequential_test(champion, challenger, alpha=ALPHA)
    ok = readable(champion, challenger)
    false_positive = ((seq.p_value < ALPHA) & ok).any(axis=1).mean()
    assert false_positive <= FPR_LIMIT, f"sequential FPR {false_positive:.4f} at split {split}"
    # The confidence sequence covers the true difference (0) at every look just as often.
    missed = (((seq.ci_low > 0) | (seq.ci_high < 0)) & ok).any(axis=1).mean()
    assert abs(missed - false_positive) <= 1 / RUNS  # identical up to root-finding ties


def test_aa_naive_peeking_is_what_the_sequential_test_prevents():
    # Same simulated data, fixed-horizon z-test read every 100 samples: badly inflated (§4).
    champion, challenger = simulate_conversion(RUNS, 0.5, 0.10, 0.10, 10_000, seed=11)
    p_naive = 2 * stats.norm.sf(np.abs(two_proportion_ztest(champion, challenger).statistic))
    naive = ((p_naive < ALPHA) & readable(champion, challenger)).any(axis=1).mean()
    assert naive > 0.25


def test_power_10_to_12_percent_at_50_50_within_20000_samples():
    champion, challenger = simulate_conversion(RUNS, 0.5, 0.10, 0.12, 20_000, seed=12)
    seq = sequential_test(champion, challenger, alpha=ALPHA)
    promote = (seq.p_value < ALPHA) & (seq.difference > 0) & readable(champion, challenger)
    found = promote.any(axis=1)
    assert found.mean() >= 0.80, f"power {found.mean():.3f}"
    wrong_way = ((seq.p_value < ALPHA) & (seq.difference < 0) & readable(champion, challenger)).any(axis=1)
    assert wrong_way.mean() < 0.005


def test_confidence_sequence_covers_a_real_difference_at_an_unequal_split():
    champion, challenger = simulate_conversion(RUNS, 0.05, 0.02, 0.04, 20_000, seed=13)
    seq = sequential_test(champion, challenger, alpha=ALPHA)
    missed = (((seq.ci_low > 0.02) | (seq.ci_high < 0.02)) & readable(champion, challenger)).any(axis=1)
    assert missed.mean() <= FPR_LIMIT


def simulate_continuous(runs, split, draw, total, seed, effect=1.0):
    rng = np.random.default_rng(seed)
    looks = total // STEP
    sums = {arm: np.zeros((3, runs, looks)) for arm in ("champion", "challenger")}
    for look in range(looks):
        to_chal = rng.random((runs, STEP)) < split
        y = draw(rng, (runs, STEP)) * np.where(to_chal, effect, 1.0)
        for arm, mask in (("champion", ~to_chal), ("challenger", to_chal)):
            v = np.where(mask, y, 0.0)
            sums[arm][:, :, look] = mask.sum(axis=1), v.sum(axis=1), (v * v).sum(axis=1)
    stats_ = {}
    for arm, (n, s, ss) in sums.items():
        stats_[arm] = ContinuousStats(n.cumsum(axis=1).astype(np.int64), s.cumsum(axis=1), ss.cumsum(axis=1))
    return stats_["champion"], stats_["challenger"]


@pytest.mark.parametrize("split", [0.5, 0.05], ids=["50/50", "95/5"])
def test_aa_continuous_skewed_outcomes_false_positive_rate(split):
    # Lognormal revenue-like outcomes: Welch's unpooled error alone fails at 95/5 (~13%).
    champion, challenger = simulate_continuous(
        RUNS, split, lambda rng, size: rng.lognormal(0.0, 1.5, size), 10_000, seed=14
    )
    seq = sequential_test(champion, challenger, alpha=ALPHA)
    fp = ((seq.p_value < ALPHA) & readable(champion, challenger)).any(axis=1).mean()
    assert fp <= FPR_LIMIT


def test_aa_continuous_unequal_variances_false_positive_rate():
    # Equal means, challenger 3x the spread, small challenger arm: pooling alone would fail.
    rng = np.random.default_rng(15)
    looks = 100
    n_chal = rng.binomial(STEP, 0.05, size=(RUNS, looks))
    n_champ = STEP - n_chal
    # Exact sufficient statistics of normal samples: sum ~ N(n mu, n s^2), centred SS ~ s^2 chi2(n-1).
    def arm(n, sd):
        s = rng.normal(0.0, sd * np.sqrt(n))
        centred = sd**2 * rng.chisquare(np.maximum(n - 1, 1)) * (n > 1)
        ss = centred + np.where(n > 0, s**2 / np.maximum(n, 1), 0.0)
        return n.cumsum(axis=1), s.cumsum(axis=1), ss.cumsum(axis=1)

    champion = ContinuousStats(*arm(n_champ, 1.0))
    challenger = ContinuousStats(*arm(n_chal, 3.0))
    seq = sequential_test(champion, challenger, alpha=ALPHA)
    fp = ((seq.p_value < ALPHA) & readable(champion, challenger)).any(axis=1).mean()
    assert fp <= FPR_LIMIT


# --------------------------------------------------------------------------------------------
# recommendation


def test_continue_before_min_samples_even_if_wildly_different():
    rec = recommend(ConversionStats(50, 0), ConversionStats(50, 50), traffic_split=0.5, min_samples_per_arm=100)
    assert rec.decision == "continue"
    assert "at least 100 per arm" in rec.reason


def test_invalid_on_srm_even_when_significant():
    rec = recommend(
        ConversionStats(10_000, 1_000), ConversionStats(10_000, 1_500), traffic_split=0.2
    )
    assert rec.decision == "invalid"
    assert rec.srm.mismatch and "sample ratio mismatch" in rec.reason
    # Routed (assignment) counts, not outcome counts, decide the SRM when given.
    ok = recommend(
        ConversionStats(10_000, 1_000), ConversionStats(10_000, 1_500),
        traffic_split=0.2, routed_counts=(40_000, 10_000),
    )
    assert ok.decision == "promote_challenger"


def test_promote_when_sequentially_significant_and_challenger_leads():
    champion, challenger = ConversionStats(10_000, 1_000), ConversionStats(10_000, 1_200)
    rec = recommend(champion, challenger, traffic_split=0.5)
    assert rec.decision == "promote_challenger"
    assert rec.sequential.p_value < ALPHA
    assert rec.probability_challenger_better > 0.99
    assert "significantly better" in rec.reason


def test_keep_champion_when_significantly_worse():
    rec = recommend(ConversionStats(10_000, 1_200), ConversionStats(10_000, 1_000), traffic_split=0.5)
    assert rec.decision == "keep_champion"
    assert "significantly worse" in rec.reason


def test_fixed_horizon_significance_is_not_enough():
    # p = 0.012 at a single look, but not sequentially: keep reading.
    champion, challenger = ConversionStats(5_000, 500), ConversionStats(5_000, 570)
    assert compare(champion, challenger).p_value < ALPHA
    rec = recommend(champion, challenger, traffic_split=0.5)
    assert rec.sequential.p_value > ALPHA
    assert rec.decision == "continue"
    assert "no significant difference yet" in rec.reason


def test_lower_is_better_flips_the_verdict():
    champion = ContinuousStats.from_values(np.linspace(9.0, 11.0, 2_000))
    challenger = ContinuousStats.from_values(np.linspace(8.0, 10.0, 2_000))
    assert recommend(champion, challenger, traffic_split=0.5).decision == "keep_champion"
    rec = recommend(champion, challenger, traffic_split=0.5, higher_is_better=False)
    assert rec.decision == "promote_challenger"
    assert rec.probability_challenger_better > 0.99


def test_min_duration_and_horizon():
    champion, challenger = ConversionStats(10_000, 1_000), ConversionStats(10_000, 1_200)
    early = recommend(champion, challenger, traffic_split=0.5, min_duration_met=False)
    assert early.decision == "continue" and "minimum test duration" in early.reason
    flat = ConversionStats(10_000, 1_010)
    assert recommend(champion, flat, traffic_split=0.5).decision == "continue"
    done = recommend(champion, flat, traffic_split=0.5, horizon_reached=True)
    assert done.decision == "keep_champion" and "end of the test" in done.reason


def test_recommendation_uses_the_tuning_and_alpha():
    champion, challenger = ConversionStats(10_000, 1_000), ConversionStats(10_000, 1_100)
    rec = recommend(champion, challenger, traffic_split=0.5, alpha=0.2, tuning=20_000)
    assert rec.sequential.alpha == 0.2 and rec.sequential.tuning == 20_000
    assert rec.sequential.p_value == rel(
        sequential_test(champion, challenger, alpha=0.2, tuning=20_000).p_value
    )


# --------------------------------------------------------------------------------------------
# bad inputs


@pytest.mark.parametrize("split", [0, 1, -0.2, 1.2, float("nan"), None, "x"])
def test_bad_split_raises(split):
    with pytest.raises(ValueError, match="traffic_split"):
        srm_check(10, 10, split)
    with pytest.raises(ValueError, match="traffic_split"):
        samples_needed_conversion(0.1, 0.11, split)
    with pytest.raises(ValueError, match="traffic_split"):
        recommend(ConversionStats(10, 1), ConversionStats(10, 1), traffic_split=split)


def test_bad_counts_raise():
    with pytest.raises(ValueError, match="must not be negative"):
        ConversionStats(-1, 0)
    with pytest.raises(ValueError, match="must not be negative"):
        ConversionStats(10, -2)
    with pytest.raises(ValueError, match="successes must not exceed n"):
        ConversionStats(10, 11)
    with pytest.raises(ValueError, match="successes must not exceed n"):
        ConversionStats(np.array([10, 10]), np.array([3, 12]))
    with pytest.raises(ValueError, match="whole number"):
        ConversionStats(10.5, 1)
    with pytest.raises(ValueError, match="whole number"):
        ConversionStats(True, 1)
    with pytest.raises(ValueError, match="must not be negative"):
        ContinuousStats(-3, 1.0, 1.0)
    with pytest.raises(ValueError, match="sum_sq must not be negative"):
        ContinuousStats(3, 1.0, -1.0)
    with pytest.raises(ValueError, match="inconsistent sums"):
        ContinuousStats(2, 10.0, 1.0)
    with pytest.raises(ValueError, match="finite"):
        ContinuousStats(2, float("inf"), 1.0)
    with pytest.raises(ValueError, match="must not be negative"):
        srm_check(-1, 10, 0.5)


def test_other_bad_inputs_raise():
    conv, cont = ConversionStats(100, 10), ContinuousStats(100, 10.0, 10.0)
    with pytest.raises(ValueError, match="both be ConversionStats or both be ContinuousStats"):
        sequential_test(conv, cont)
    with pytest.raises(ValueError, match="alpha"):
        compare(conv, conv, alpha=1.5)
    with pytest.raises(ValueError, match="alpha"):
        sequential_test(conv, conv, alpha=0)
    with pytest.raises(ValueError, match="power"):
        samples_needed_conversion(0.1, 0.11, 0.5, power=1.0)
    with pytest.raises(ValueError, match="rate"):
        samples_needed_conversion(0.1, 1.2, 0.5)
    with pytest.raises(ValueError, match="tuning"):
        sequential_test(conv, conv, tuning=0)
    with pytest.raises(ValueError, match="at least one outcome"):
        two_proportion_ztest(ConversionStats(0, 0), conv)
    with pytest.raises(ValueError, match="min_samples_per_arm"):
        recommend(conv, conv, traffic_split=0.5, min_samples_per_arm=0)
    with pytest.raises(ValueError, match="takes ConversionStats"):
        two_proportion_ztest(cont, cont)
    with pytest.raises(ValueError, match="takes ContinuousStats"):
        welch_ttest(conv, conv)
    with pytest.raises(ValueError, match="tuning"):
        sequential_p_value(2.0, 100, tuning=None)


def test_module_is_pure():
    source = Path(ab_stats.__file__).read_text()
    for banned in ("prefect", "mlflow", "sqlalchemy", "sqlite3"):
        assert f"import {banned}" not in source and f"from {banned}" not in source
