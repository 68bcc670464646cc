"""Statistics for sweeps, A/B comparisons and the nightly check: plain numpy, no Prefect, no scipy.

    from core.stats import welch, verdict, power_law_fit, isoflop_optimum, regression_check
    r = welch(bpb_a, bpb_b)                   # B - A: diff, CI, p-value over seeds (Welch's t-test)
    stouffer([r_d1, r_d2, r_d3])              # B - A over depths: Stouffer's Z of the per-depth tests
    verdict(r, lower_is_better=True)          # "better" | "worse" | "no detectable difference"
    fit = power_law_fit(flops, n_opt)         # N_opt = k * C^a: a, its standard error and CI
    n, d, bpb, how = isoflop_optimum(params, bpb, tokens)   # the valley of one isoFLOP curve

The Student t distribution is computed here (regularized incomplete beta by Lentz's continued
fraction, Numerical Recipes 6.4) so the project needs no scipy; tests check it against tabulated
quantiles. Power laws are fitted as straight lines in log-log space (ordinary least squares) and
their uncertainty is the regression standard error — the method of nanochat's
dev/scaling_analysis.ipynb (a parabola in log N per FLOP budget, then N_opt(C), D_opt(C)).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

# ---- the t distribution ----------------------------------------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):  # the continued fraction converges fast on this side
        return math.exp(ln_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(ln_front) * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom (df may be fractional: Welch)."""
    if math.isinf(df):
        return 0.5 * math.erfc(t / math.sqrt(2.0))
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def t_ppf(q: float, df: float) -> float:
    """The q-quantile of Student's t (bisection on t_sf; 1e-10 absolute)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile {q} must be in (0, 1)")
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_sf(hi, df) > 1.0 - q:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_sf(mid, df) > 1.0 - q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-10:
            break
    return 0.5 * (lo + hi)


# ---- two samples: Welch's t-test -------------------------------------------------------------------
@dataclass(frozen=True)
class Welch:
    """B - A for one metric: the mean difference, its confidence interval and two-sided p-value.
    ci_low/ci_high/p are None when an arm has fewer than 2 values (no spread to judge with)."""
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

    def to_dict(self) -> dict:
        return asdict(self)


def welch(a, b, confidence: float = 0.95) -> Welch:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) == 0 or len(b) == 0:
        raise ValueError("welch: both samples need at least one value")
    ma, mb = float(a.mean()), float(b.mean())
    diff = mb - ma
    if len(a) < 2 or len(b) < 2:
        return Welch(len(a), len(b), ma, mb, None, None, diff, None, None, None, None, None, None, confidence)
    va, vb = float(a.var(ddof=1)), float(b.var(ddof=1))
    qa, qb = va / len(a), vb / len(b)
    se = math.sqrt(qa + qb)
    if se == 0.0:  # every seed gave the same value in both arms: the difference is exact
        p = 1.0 if diff == 0 else 0.0
        return Welch(len(a), len(b), ma, mb, 0.0, 0.0, diff, 0.0, None, None, p, diff, diff, confidence)
    # Welch-Satterthwaite degrees of freedom
    df = (qa + qb) ** 2 / ((qa * qa / (len(a) - 1) if qa else 0.0) + (qb * qb / (len(b) - 1) if qb else 0.0))
    t = diff / se
    p = min(1.0, 2.0 * t_sf(abs(t), df))
    half = t_ppf(0.5 + confidence / 2.0, df) * se
    return Welch(len(a), len(b), ma, mb, math.sqrt(va), math.sqrt(vb), diff, se, df, t, p, diff - half, diff + half,
                 confidence)


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
    from statistics import NormalDist

    used = [r for r in results if r.t is not None]
    if not used:
        return None
    normal = NormalDist()
    eps = 1e-15  # keeps Phi^-1 finite for a stratum with an overwhelming t
    z = sum(normal.inv_cdf(min(1 - eps, max(eps, 1.0 - t_sf(r.t, r.df)))) for r in used) / math.sqrt(len(used))
    return Pooled(len(used), z, 2.0 * (1.0 - normal.cdf(abs(z))), sum(r.diff for r in used) / len(used),
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
    margin = t_ppf(1.0 - alpha, n - 1) * sd * math.sqrt(1.0 + 1.0 / n)
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
        half = t_ppf(0.5 + confidence / 2.0, self.n - 2) * self.slope_se
        return self.slope - half, self.slope + half

    def to_dict(self) -> dict:
        ci = self.slope_ci()
        return {**asdict(self), "slope_ci95": list(ci) if ci else None}


def linear_fit(x, y) -> LineFit:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n = len(x)
    if n < 2 or np.ptp(x) == 0:
        raise ValueError(f"a line needs at least 2 distinct x values (got {n} point(s))")
    xm, ym = x.mean(), y.mean()
    sxx = float(((x - xm) ** 2).sum())
    slope = float(((x - xm) * (y - ym)).sum() / sxx)
    intercept = float(ym - slope * xm)
    resid = y - (intercept + slope * x)
    sst = float(((y - ym) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / sst if sst > 0 else None
    if n < 3:
        return LineFit(slope, intercept, None, None, r2, n)
    s2 = float((resid ** 2).sum()) / (n - 2)
    return LineFit(slope, intercept, math.sqrt(s2 / sxx), math.sqrt(s2 * (1.0 / n + xm * xm / sxx)), r2, n)


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
