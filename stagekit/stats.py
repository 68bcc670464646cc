"""Statistics for sweeps, A/B comparisons and the nightly check: scipy.stats and numpy, no Prefect.

    from stagekit.stats import welch, verdict, power_law_fit, isoflop_optimum, regression_check
    r = welch(bpb_a, bpb_b)                   # B - A: diff, CI, p-value over seeds (Welch's t-test)
    one_sided_p(r, lower_is_better=True)      # P(B is not better) under "no difference"; holm([...]) adjusts
    stouffer([r_d1, r_d2, r_d3])              # B - A over depths: Stouffer's Z of the per-depth tests
    verdict(r, lower_is_better=True)          # "better" | "worse" | "no detectable difference"
    fit = power_law_fit(flops, n_opt)         # N_opt = k * C^a: a, its standard error and CI
    n, d, bpb, how = isoflop_optimum(params, bpb, tokens)   # the valley of one isoFLOP curve

The distributions, tests and fits are scipy's (scipy.stats.ttest_ind, t, linregress,
combine_pvalues, bootstrap: docs/reports.md lists which number comes from where); this module only
picks the method, handles the edge cases (one seed, no spread) and shapes the results for reports.
It lives outside core/ because core/ must import with torch, numpy, pyarrow and tokenizers alone
(the GPU image has no scipy) and nothing in core/ uses it. Power laws are fitted as straight lines
in log-log space (ordinary least squares) and their uncertainty is the regression standard error —
the method of nanochat's dev/scaling_analysis.ipynb (a parabola in log N per FLOP budget, then N_opt(C), D_opt(C)).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np


def _scipy_stats():
    """scipy.stats, imported on first use: it costs ~2.7 s of CPU, which commands that compute no
    statistic (a cached `nanorun compare` answered from the store, `nanorun ls`) should not pay."""
    from scipy import stats

    return stats


# ---- two samples: Welch's t-test -------------------------------------------------------------------
@dataclass(frozen=True)
class Welch:
    """B - A for one metric: the mean difference, its confidence interval and two-sided p-value
    (Welch's t-test), and a percentile bootstrap interval of the same difference that assumes no
    normality (boot_low/boot_high). The intervals and p are None when an arm has fewer than 2
    values (no spread to judge with)."""
    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    sd_a: float | None
    sd_b: float | None
    diff: float
    se: float | None
    df: float | None
    t: float | None
    p: float | None
    ci_low: float | None
    ci_high: float | None
    confidence: float
    boot_low: float | None = None
    boot_high: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


BOOTSTRAP_SEED = 0  # one fixed seed: the same runs give the same report, cached or not


def _mean_diff(a, b, axis):
    return b.mean(axis=axis) - a.mean(axis=axis)


def bootstrap_diff_ci(a, b, confidence: float) -> tuple[float, float]:
    """Percentile bootstrap CI of mean(b) - mean(a), arms resampled independently. Percentile, not
    scipy's default BCa: BCa's jackknife acceleration is undefined or wild with 2-3 seeds per arm."""
    res = _scipy_stats().bootstrap((a, b), _mean_diff, vectorized=True, paired=False, confidence_level=confidence,
                                   method="percentile", rng=np.random.default_rng(BOOTSTRAP_SEED))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def welch(a, b, confidence: float = 0.95) -> Welch:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) == 0 or len(b) == 0:
        raise ValueError("welch: both samples need at least one value")
    ma, mb = float(a.mean()), float(b.mean())
    diff = mb - ma
    if len(a) < 2 or len(b) < 2:
        return Welch(len(a), len(b), ma, mb, None, None, diff, None, None, None, None, None, None, confidence)
    sd_a, sd_b = float(a.std(ddof=1)), float(b.std(ddof=1))
    if sd_a == 0.0 and sd_b == 0.0:  # every seed gave the same value in both arms: the difference is exact
        p = 1.0 if diff == 0 else 0.0
        return Welch(len(a), len(b), ma, mb, 0.0, 0.0, diff, 0.0, None, None, p, diff, diff, confidence, diff, diff)
    with warnings.catch_warnings():  # one flat arm (a deterministic recipe) is exact, not "precision loss"
        warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
        res = _scipy_stats().ttest_ind(b, a, equal_var=False)  # Welch-Satterthwaite degrees of freedom
    ci = res.confidence_interval(confidence)
    boot = bootstrap_diff_ci(a, b, confidence)
    se = math.sqrt(sd_a ** 2 / len(a) + sd_b ** 2 / len(b))
    return Welch(len(a), len(b), ma, mb, sd_a, sd_b, diff, se, float(res.df),
                 float(res.statistic), float(res.pvalue), float(ci.low), float(ci.high), confidence, *boot)


def verdict(r: "Welch | Pooled", *, lower_is_better: bool, alpha: float | None = None) -> str:
    """B vs A: "better" / "worse" when the confidence interval excludes 0, else "no detectable difference"
    ("not enough seeds" when an arm has a single value)."""
    alpha = 1.0 - r.confidence if alpha is None else alpha
    if r.p is None:
        return "not enough seeds"
    if r.p >= alpha or r.diff == 0:
        return "no detectable difference"
    improved = r.diff < 0 if lower_is_better else r.diff > 0
    return "better" if improved else "worse"


def one_sided_p(r: Welch, *, lower_is_better: bool) -> float:
    """One-sided p that B is better than A (B - A below 0 when lower is better, above when higher),
    from the Welch t of welch(a, b): P(T <= t) or P(T >= t). When neither arm has any spread the
    difference is exact: 0 if it points the better way, else 1. An arm with a single value: 1 (no
    evidence)."""
    if r.t is None:
        if r.p is None:
            return 1.0
        better = r.diff < 0 if lower_is_better else r.diff > 0
        return 0.0 if better else 1.0
    t = _scipy_stats().t
    return float(t.cdf(r.t, r.df) if lower_is_better else t.sf(r.t, r.df))


def holm(pvalues) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979), in the given order: sorted ascending, the i-th
    smallest (from 0) becomes max over j <= i of min(1, (m - j) p_(j)). Rejecting where the adjusted p
    is below alpha controls the family-wise error rate at alpha under any dependence. scipy has no
    Holm (its false_discovery_control is Benjamini-Hochberg / -Yekutieli, a weaker guarantee)."""
    p = [float(x) for x in pvalues]
    order = sorted(range(len(p)), key=lambda i: p[i])
    out, running = [0.0] * len(p), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        out[i] = running
    return out


@dataclass(frozen=True)
class Pooled:
    """B - A over several strata (the depths of a comparison), by Stouffer's method: each stratum's
    Welch t gives a one-sided p_i = P(T > t_i) and z_i = Phi^-1(1 - p_i); Z = sum(z_i) / sqrt(k) is
    standard normal under "no difference anywhere", p = 2 (1 - Phi(|Z|)). diff is the plain mean of
    the per-stratum differences (the effect's size, equal weights). Chosen over an inverse-variance
    weighted mean difference: with 2-3 seeds per arm the per-stratum variances are too noisy to
    weight by (that test rejected a true null ~12% of the time at alpha 0.05; this one stays under 5%)."""
    k: int
    z: float
    p: float
    diff: float
    confidence: float

    def to_dict(self) -> dict:
        return asdict(self)


def stouffer(results: list[Welch]) -> Pooled | None:
    """The pooled B - A of per-stratum Welch results (those with a t statistic); None without any."""
    used = [r for r in results if r.t is not None]
    if not used:
        return None
    st = _scipy_stats()
    eps = 1e-15  # keeps Phi^-1 finite for a stratum with an overwhelming t
    one_sided = [min(1 - eps, max(eps, float(st.t.sf(r.t, r.df)))) for r in used]
    z = float(st.combine_pvalues(one_sided, method="stouffer").statistic)
    return Pooled(len(used), z, float(2.0 * st.norm.sf(abs(z))), sum(r.diff for r in used) / len(used),
                  used[0].confidence)


# ---- spread of repeated runs, and a change judged against it --------------------------------------
def mean_spread(values) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation, n) of the non-missing values; sd is None below 2 values."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return None, None, 0
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None), len(v)


def regression_check(history, value: float, *, lower_is_better: bool, alpha: float = 0.01) -> dict:
    """Is `value` worse than the previous runs by more than their run-to-run noise?

    The noise is measured, not assumed: a one-sided (1 - alpha) prediction interval for one new run
    from n earlier ones, mean ± t(1-alpha, n-1) · s · sqrt(1 + 1/n) (the t prediction interval for a
    normal sample). Needs n >= 2; returns {"judged": False, ...} otherwise. A regression is a value
    beyond the interval's worse end; after identical earlier runs (a deterministic recipe) that is
    any worse value at all."""
    mean, sd, n = mean_spread(history)
    if n < 2 or value is None:
        return {"judged": False, "n": n, "mean": mean, "sd": sd, "limit": None, "regressed": False}
    margin = float(_scipy_stats().t.ppf(1.0 - alpha, n - 1)) * sd * math.sqrt(1.0 + 1.0 / n)
    limit = mean + margin if lower_is_better else mean - margin
    regressed = value > limit if lower_is_better else value < limit
    return {"judged": True, "n": n, "mean": mean, "sd": sd, "limit": limit, "regressed": bool(regressed)}


# ---- straight lines and power laws -----------------------------------------------------------------
@dataclass(frozen=True)
class LineFit:
    """y = intercept + slope * x by least squares; standard errors need n >= 3 (else None)."""
    slope: float
    intercept: float
    slope_se: float | None
    intercept_se: float | None
    r2: float | None
    n: int

    def slope_ci(self, confidence: float = 0.95) -> tuple[float, float] | None:
        if self.slope_se is None:
            return None
        half = float(_scipy_stats().t.ppf(0.5 + confidence / 2.0, self.n - 2)) * self.slope_se
        return self.slope - half, self.slope + half

    def to_dict(self) -> dict:
        ci = self.slope_ci()
        return {**asdict(self), "slope_ci95": list(ci) if ci else None}


def linear_fit(x, y) -> LineFit:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n = len(x)
    if n < 2 or np.ptp(x) == 0:
        raise ValueError(f"a line needs at least 2 distinct x values (got {n} point(s))")
    res = _scipy_stats().linregress(x, y)
    r2 = float(res.rvalue) ** 2 if np.ptp(y) > 0 else None  # a flat y explains nothing and leaves nothing
    if n < 3:  # two points: the line passes through both, no residual to estimate an error from
        return LineFit(float(res.slope), float(res.intercept), None, None, r2, n)
    return LineFit(float(res.slope), float(res.intercept), float(res.stderr), float(res.intercept_stderr), r2, n)


def power_law_fit(x, y) -> LineFit:
    """y = 10^intercept * x^slope, fitted as a line in log10-log10 space."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if (x <= 0).any() or (y <= 0).any():
        raise ValueError("a power law needs positive x and y")
    return linear_fit(np.log10(x), np.log10(y))


def isoflop_optimum(params, bpb, tokens) -> tuple[float, float, float, str]:
    """(N_opt, D_opt, bpb at the optimum, how) for one FLOP budget.

    A parabola in log10 N through the points (nanochat's scaling notebook; Chinchilla approach 2);
    its vertex is the optimum when it opens upward and lies within the sampled sizes, tokens at
    the optimum interpolated in log-log. Otherwise the best sampled point ("best point")."""
    n, l, d = (np.asarray(v, dtype=float) for v in (params, bpb, tokens))
    order = np.argsort(n)
    n, l, d = n[order], l[order], d[order]
    ln, ld = np.log10(n), np.log10(d)
    if len(np.unique(ln)) >= 3:
        a, b, c = np.polyfit(ln, l, 2)
        if a > 0 and ln[0] <= -b / (2 * a) <= ln[-1]:
            x = -b / (2 * a)
            return float(10 ** x), float(10 ** np.interp(x, ln, ld)), float(a * x * x + b * x + c), "parabola"
    i = int(np.argmin(l))
    return float(n[i]), float(d[i]), float(l[i]), "best point"


def pareto_frontier(flops, bpb) -> list[int]:
    """Indices of the compute-optimal frontier: points no cheaper point beats, by increasing FLOPs."""
    order = sorted(range(len(flops)), key=lambda i: (flops[i], bpb[i]))
    out, best = [], math.inf
    for i in order:
        if bpb[i] < best:
            out.append(i)
            best = bpb[i]
    return out
