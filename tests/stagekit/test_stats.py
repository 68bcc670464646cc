"""stagekit/stats.py: textbook t quantiles and the numbers of the hand-written code it replaced, Welch's
test on data with and without an effect, the bootstrap interval, power-law fits that recover known
exponents, and the noise-based regression check."""
from __future__ import annotations

import math

import numpy as np
import pytest

from stagekit.stats import (isoflop_optimum, linear_fit, mean_spread, pareto_frontier, power_law_fit, regression_check,
                          stouffer, verdict, welch)


def test_t_quantiles_match_tables():
    # a line through n points has n - 2 degrees of freedom: its 95% slope CI is slope ± t(0.975, n-2) · SE
    for n, want in ((3, 12.706), (4, 4.303), (12, 2.228)):
        x = np.arange(n, dtype=float)
        fit = linear_fit(x, 2 * x + np.sin(x))
        lo, hi = fit.slope_ci()
        assert (hi - lo) / 2 / fit.slope_se == pytest.approx(want, abs=1e-3)
    # the regression limit is mean + t(1 - alpha, n-1) · s · sqrt(1 + 1/n); t(0.99, 30) = 2.457, t(0.95, 5) = 2.015
    for n, alpha, want in ((31, 0.01, 2.457), (6, 0.05, 2.015)):
        hist = list(np.linspace(1.0, 2.0, n))
        r = regression_check(hist, 9.0, lower_is_better=True, alpha=alpha)
        assert (r["limit"] - r["mean"]) / (r["sd"] * math.sqrt(1 + 1 / n)) == pytest.approx(want, abs=1e-3)


def test_results_match_the_hand_written_statistics_they_replace():
    # values printed by the previous implementation (own incomplete beta, bisected t quantiles)
    a, b = [1.012, 0.998, 1.004], [0.981, 0.990, 0.979, 0.986]
    r = welch(a, b)
    assert (r.df, r.t, r.p, r.ci_low, r.ci_high) == pytest.approx(
        (3.457142857142857, -4.34619775084323, 0.016721461130454973, -0.034728167240851676, -0.006605166092481548),
        rel=1e-6)
    pooled = stouffer([r, welch([2.0, 2.1, 2.05], [2.02, 2.12, 2.09]), welch([3, 3.2], [3.1, 3.0])])
    assert (pooled.z, pooled.p) == pytest.approx((-1.2534046921942774, 0.21005846471681933), rel=1e-6)
    limit = regression_check([1.0, 1.01, 0.99, 1.02, 0.995], 1.03, lower_is_better=True)["limit"]
    assert limit == pytest.approx(1.0524256306251896, rel=1e-6)
    fit = power_law_fit([1e18, 3e18, 1e19, 3e19, 1e20], [2.1e8, 3.3e8, 6.5e8, 1.02e9, 2.05e9]).to_dict()
    assert (fit["slope"], fit["slope_se"], fit["intercept_se"], fit["r2"], *fit["slope_ci95"]) == pytest.approx(
        (0.49427872727119776, 0.01638616110828982, 0.31140279386445935, 0.9967137371279291, 0.442130649394698,
         0.5464268051476975), rel=1e-6)


def test_bootstrap_interval_is_seeded_and_brackets_the_difference():
    a, b = [1.012, 0.998, 1.004], [0.981, 0.990, 0.979, 0.986]
    r = welch(a, b)
    assert r.boot_low < r.diff < r.boot_high < 0          # a clear effect: the interval excludes 0
    assert (r.boot_low, r.boot_high) == (welch(a, b).boot_low, welch(a, b).boot_high)  # same data, same interval
    # percentile bootstrap: the interval ends at attainable differences of resampled means
    assert min(b) - max(a) <= r.boot_low and r.boot_high <= max(b) - min(a)
    assert welch([1.0], [0.9, 0.91]).boot_low is None
    assert (welch([1.0, 1.0], [0.5, 0.5]).boot_low, welch([1.0, 1.0], [0.5, 0.5]).boot_high) == (-0.5, -0.5)


def test_welch_finds_a_known_effect_and_its_sign():
    rng = np.random.default_rng(0)
    a = 1.00 + 0.01 * rng.standard_normal(5)
    b = 0.97 + 0.01 * rng.standard_normal(5)     # B lowers bpb by 0.03, noise 0.01
    r = welch(a, b)
    assert r.p < 0.01 and r.ci_low < -0.03 < r.ci_high < 0
    assert verdict(r, lower_is_better=True) == "better"
    assert verdict(welch(b, a), lower_is_better=True) == "worse"
    assert verdict(r, lower_is_better=False) == "worse"  # the same change on a higher-is-better metric


def test_welch_on_null_data_keeps_its_false_positive_rate():
    rng = np.random.default_rng(1)
    trials, hits, covered = 600, 0, 0
    for _ in range(trials):
        a, b = rng.normal(1.0, 0.02, 3), rng.normal(1.0, 0.05, 4)  # unequal variances: Welch's case
        r = welch(a, b)
        hits += verdict(r, lower_is_better=True) != "no detectable difference"
        covered += r.ci_low <= 0 <= r.ci_high
    assert 0.02 < hits / trials < 0.08           # alpha = 5%
    assert covered == trials - hits               # CI excludes 0 exactly when the test rejects


def test_stouffer_pools_depths_with_a_known_effect():
    rng = np.random.default_rng(2)
    # B lowers bpb by 0.015 at each of 3 depths, noise 0.01, 3 seeds: no single depth is sure of it
    cells = [welch(1.0 + 0.01 * rng.standard_normal(3), 0.985 + 0.01 * rng.standard_normal(3)) for _ in range(3)]
    pooled = stouffer(cells)
    assert pooled.k == 3 and pooled.z < 0 and pooled.p < 0.05 and -0.03 < pooled.diff < 0
    assert verdict(pooled, lower_is_better=True) == "better"
    assert max(c.p for c in cells) > pooled.p
    assert stouffer([welch([1.0], [0.9, 0.91])]) is None  # one seed: nothing to pool


def test_stouffer_on_null_data_keeps_its_false_positive_rate():
    rng = np.random.default_rng(3)
    trials, hits = 600, 0
    for _ in range(trials):
        cells = [welch(rng.normal(0, s, 3), rng.normal(0, s, 3)) for s in (0.01, 0.02, 0.05)]
        hits += verdict(stouffer(cells), lower_is_better=True) != "no detectable difference"
    assert 0.01 < hits / trials < 0.07  # alpha = 5%


def test_welch_edge_cases():
    one = welch([1.0], [0.9, 0.91])
    assert one.p is None and verdict(one, lower_is_better=True) == "not enough seeds"
    same = welch([1.0, 1.0], [1.0, 1.0])
    assert welch([1.0, 1.0], [0.9, 0.92]).ci_low < -0.09 < welch([1.0, 1.0], [0.9, 0.92]).ci_high  # one flat arm
    assert same.p == 1.0 and verdict(same, lower_is_better=True) == "no detectable difference"
    with pytest.raises(ValueError):
        welch([], [1.0])


def test_power_law_fit_recovers_a_known_exponent_with_an_honest_error():
    rng = np.random.default_rng(2)
    c = np.logspace(18, 21, 8)
    y = 3e-2 * c ** 0.5 * np.exp(0.05 * rng.standard_normal(len(c)))
    fit = power_law_fit(c, y)
    assert abs(fit.slope - 0.5) < 3 * fit.slope_se and fit.slope_se < 0.03
    lo, hi = fit.slope_ci()
    assert lo < 0.5 < hi
    two = linear_fit([1, 2], [1, 3])
    assert two.slope == pytest.approx(2) and two.slope_se is None  # 2 points: no residual to estimate from
    with pytest.raises(ValueError):
        linear_fit([1, 1, 1], [1, 2, 3])


def chinchilla_rows(budgets, offsets, noise: float = 0.0, seed: int = 0):
    """Synthetic isoFLOP sweep on L = E + A/N^alpha + B/D^beta with C = 6ND (Hoffmann et al. 2022):
    N_opt ∝ C^(beta/(alpha+beta)), D_opt ∝ C^(alpha/(alpha+beta))."""
    rng = np.random.default_rng(seed)
    E, A, B, al, be = 1.69, 406.4, 410.7, 0.34, 0.28
    rows = []
    for c in budgets:
        n_opt = ((al * A) / (be * B)) ** (1 / (al + be)) * (c / 6) ** (be / (al + be))
        for k, f in enumerate(offsets):
            n = n_opt * 10 ** f
            d = c / (6 * n)
            loss = E + A / n ** al + B / d ** be + noise * rng.standard_normal()
            rows.append(dict(point=f"{c:g}-{k}", arm="", cell=f"{c:g}-{k}", depth=k + 1, seed=1, target_flops=c,
                             scaling_params=n, tokens=d, flops=c, val_bpb=loss, core=None, status="ok"))
    return rows, be / (al + be), al / (al + be)


def test_isoflop_fits_recover_chinchilla_exponents():
    from stages.sweep_report import analyze_sweep

    # sizes off-centre around each optimum, a little noise: the parabola still finds the valley
    rows, a_true, b_true = chinchilla_rows([1e18, 3e18, 1e19, 3e19, 1e20], np.linspace(-0.5, 0.8, 7), noise=2e-4)
    a = analyze_sweep(rows)
    assert all(o["method"] == "parabola" for o in a["optima"])
    for key, want in (("n_opt_fit", a_true), ("d_opt_fit", b_true)):
        fit = a[key]
        assert abs(fit["slope"] - want) < 0.03, (key, fit)
        assert fit["slope_se"] is not None and fit["slope_ci95"][0] < fit["slope_ci95"][1]
    assert a["bpb_fit"]["slope"] < 0  # the frontier's loss falls with compute


def test_isoflop_optimum_falls_back_to_the_best_point_at_the_edge():
    n, d, bpb, how = isoflop_optimum([1, 10, 100], [3.0, 2.0, 1.0], [100, 10, 1])
    assert (n, bpb, how) == (100, 1.0, "best point")


def test_pareto_frontier_and_spread():
    assert pareto_frontier([1, 2, 3, 4], [3.0, 3.5, 2.0, 2.5]) == [0, 2]
    mean, sd, n = mean_spread([1.0, 2.0, None, 3.0])
    assert (mean, n) == (2.0, 3) and sd == pytest.approx(1.0)
    assert mean_spread([5.0])[1] is None and mean_spread([]) == (None, None, 0)


def test_regression_is_judged_against_measured_noise():
    rng = np.random.default_rng(3)
    nights = list(1.0 + 0.01 * rng.standard_normal(10))
    assert not regression_check(nights, 1.01, lower_is_better=True)["regressed"]    # within the noise
    r = regression_check(nights, 1.06, lower_is_better=True)                        # far outside it
    assert r["judged"] and r["regressed"] and r["limit"] < 1.06
    assert not regression_check(nights, 0.9, lower_is_better=True)["regressed"]     # better is never one
    assert regression_check(nights, 0.9, lower_is_better=False)["regressed"]        # ... unless higher is better
    # the same change is a regression for a quiet recipe and noise for a noisy one
    quiet, noisy = [1.0, 1.001, 0.999, 1.0], [1.0, 1.05, 0.95, 1.02]
    assert regression_check(quiet, 1.02, lower_is_better=True)["regressed"]
    assert not regression_check(noisy, 1.02, lower_is_better=True)["regressed"]
    assert regression_check([1.0], 5.0, lower_is_better=True) == {
        "judged": False, "n": 1, "mean": 1.0, "sd": None, "limit": None, "regressed": False}
    assert math.isfinite(regression_check([2.0, 2.0], 2.0, lower_is_better=True)["limit"])


def test_leaderboard_mean_and_spread_per_recipe():
    from pipeline.board import format_stats, recipe_stats

    runs = [{"preset": "tiny", "val_bpb": b, "core": c, "total_seconds": t, "time_to_gpt2_s": None, "cost": 0.0}
            for b, c, t in ((2.0, 0.1, 60), (2.2, 0.3, 80), (2.1, None, 70))] + \
           [{"preset": "d20", "val_bpb": 0.8, "core": 0.22, "total_seconds": 3600, "time_to_gpt2_s": None, "cost": 72.0}]
    stats = {e["preset"]: e for e in recipe_stats(runs)}
    tiny = stats["tiny"]
    assert tiny["runs"] == 3 and tiny["val_bpb"] == pytest.approx(2.1) and tiny["val_bpb_sd"] == pytest.approx(0.1)
    assert tiny["core_n"] == 2 and tiny["core"] == pytest.approx(0.2) and stats["d20"]["val_bpb_sd"] is None
    md = format_stats(recipe_stats(runs))
    assert "| tiny | 3 | 2.1000 ± 0.1000 | 0.2000 ± 0.1414 | 0:01:10 ± 10s |" in md
    assert "| d20 | 1 | 0.8000 | 0.2200 | 1:00:00 |" in md
