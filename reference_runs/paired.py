"""Paired statistics for method comparisons: is a method's gain over uniform LoRA larger than the noise?

Every method of one (task, seed) pair sees the same data split, calibration sample, head init and batch order
(grid.py), so methods are compared pairwise: d_i = score(method) - score(uniform) over the pairs i. The summaries of
`summary` (what the tables print today):

- the mean paired difference with a 95 % percentile bootstrap interval (resampling the pairs with replacement,
  B = 10,000 resamples from a fixed seed, so a table regenerates identically);
- a two-sided exact sign test over the pairs: wins against losses under Binomial(n, 1/2), ties dropped
  (the classical convention; with every pair tied there is no evidence either way and p = 1).

Neither assumes normal differences, which matters at 9-15 pairs. Pure functions on lists of floats.

What the data can support, beyond that (`report`, `compare_to_baseline`):

- dev Δ next to test Δ (`dev_test_differences`): the same paired comparison on the dev scores at the picked rates.
  The rates were picked on dev, so the dev Δ is optimistic for the method that gained most from the pick; a test Δ
  much smaller than the dev Δ is the selection showing.
- a selection-aware bootstrap (`selection_aware_bootstrap`): each resample of the pairs redoes every method's
  learning-rate pick on dev before it takes the test Δ, so the interval carries the noise of the pick as well as
  that of the test scores.
- the Wilcoxon signed-rank test (`wilcoxon_signed_rank`), exact for up to 100 nonzero differences, beside the sign
  test; Holm's step-down adjustment (`holm`) over the methods compared with one baseline.
- with fewer than SMALL_N = 6 pairs, no bootstrap interval: resampling 3-5 values gives an interval that is little
  more than their range (with 3 pairs, 1/27 of the resamples repeat the smallest difference three times, so the
  2.5 % quantile is the minimum) and that covers the mean far less often than 95 %. `report` gives the range and a
  Student t-interval (exact if the differences are normal; the t quantile from a continued fraction, no scipy).
- the minimum detectable effect at 80 % power (`minimum_detectable_effect`, `pairs_needed`), from the observed SD
  of the paired differences, for a pre-registered comparison.

Data shape of the selection-aware functions: a method's grid is {lr: {(task, seed): (dev score, test score)}}.
The learning rate is picked per selection group (by default the task, key[0]; grid.py's MPNet and nlg-full rule)
as the rate with the best mean dev score over the group's pairs, a NaN dev score counting as the worst (-1e9), ties
going to the smaller rate: grid.pick_lr, mean by math.fsum as statistics.fmean does.
"""
from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Hashable, Sequence
from fractions import Fraction

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
SMALL_N = 6  # below this many pairs: range and t-interval, no bootstrap interval
WILCOXON_EXACT_MAX = 100  # exact signed-rank null distribution up to this many nonzero differences
TIE_DIGITS = 10  # differences compared after rounding to this many decimals (see wilcoxon_signed_rank)
NAN_DEV = -1e9  # a NaN dev score in a learning-rate pick: the worst (grid.pick_lr)

Grid = dict  # {lr: {(task, seed): (dev score, test score)}}


def paired_differences(method: dict, baseline: dict) -> list[float]:
    """d = method[k] - baseline[k] over the keys (e.g. (task, seed)) both have, in sorted key order.

    A pair where either score is NaN (undefined, e.g. the correlation of a constant prediction) is dropped."""
    keys = sorted(set(method) & set(baseline))
    return [method[k] - baseline[k] for k in keys if method[k] == method[k] and baseline[k] == baseline[k]]


def bootstrap_ci(diffs: list[float], level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `diffs` (Efron & Tibshirani, ch. 13).

    Each resample draws len(diffs) pairs with replacement; the interval is the (1-level)/2 and (1+level)/2
    empirical quantiles of the resampled means (lower/upper order statistics, no interpolation)."""
    if not diffs:
        raise ValueError("bootstrap_ci: no paired differences")
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(math.fsum(rng.choices(diffs, k=n)) / n for _ in range(resamples))
    return _percentile_interval(means, level)


def _percentile_interval(means: list[float], level: float) -> tuple[float, float]:
    """The (1-level)/2 and (1+level)/2 order statistics of sorted resampled means, as bootstrap_ci takes them."""
    r = len(means)
    return means[math.floor((1 - level) / 2 * (r - 1))], means[math.ceil((1 + level) / 2 * (r - 1))]


def sign_test(diffs: list[float]) -> tuple[int, int, float]:
    """(wins, losses, two-sided p) of the exact sign test; ties (d == 0) are dropped.

    p = min(1, 2 · P[X <= min(wins, losses)]) with X ~ Binomial(wins + losses, 1/2)."""
    wins = sum(d > 0 for d in diffs)
    losses = sum(d < 0 for d in diffs)
    n = wins + losses
    if n == 0:
        return 0, 0, 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n  # exact integers, one rounding
    return wins, losses, min(1.0, 2 * tail)


def summary(diffs: list[float]) -> dict:
    """Everything one table row reports about a method's paired differences against the baseline."""
    wins, losses, p = sign_test(diffs)
    lo, hi = bootstrap_ci(diffs)
    return {"n": len(diffs), "mean": statistics.fmean(diffs), "ci95": (lo, hi), "wins": wins, "losses": losses,
            "ties": len(diffs) - wins - losses, "sign_p": p}


# ---------------------------------------------------------------------------------------------------------------
# Learning-rate picks on dev, and the paired dev and test differences at the picked rates


def task_of(key: tuple) -> Hashable:
    """The selection group of a (task, seed) pair: its task (grid.py picks each method's rate per task)."""
    return key[0]


def _complete_keys(*grids: Grid) -> list:
    """The pair keys that every rate of every grid has, sorted: a pair missing anywhere is compared nowhere."""
    sets = [set(by_key) for g in grids for by_key in g.values()]
    if not sets:
        raise ValueError("empty learning-rate grid")
    return sorted(set.intersection(*sets))


def _dev(score: float) -> float:
    return NAN_DEV if score != score else score


class _Picker:
    """Dev-score picks of one method over index lists of `keys` (a key listed twice counts twice)."""

    def __init__(self, grid: Grid, keys: list, pooled_with: Grid | None = None):
        self.lrs = sorted(grid)
        if pooled_with is not None and sorted(pooled_with) != self.lrs:
            raise ValueError("a shared pick needs the same learning rates in both grids")
        self.dev = {lr: [_dev(grid[lr][k][0]) for k in keys]
                    + ([_dev(pooled_with[lr][k][0]) for k in keys] if pooled_with is not None else [])
                    for lr in self.lrs}
        self.shift = len(keys) if pooled_with is not None else 0

    def pick(self, idx: list[int]) -> float:
        """grid.pick_lr: the best mean dev score (math.fsum / count, as statistics.fmean), ties to the smaller rate;
        a shared pick means over the method's and the other grid's runs together."""
        if self.shift:
            idx = idx + [j + self.shift for j in idx]
        return max(self.lrs, key=lambda lr: (math.fsum([self.dev[lr][j] for j in idx]) / len(idx), -lr))


def pick_lrs(grid: Grid, keys: Sequence | None = None, group: Callable = task_of,
             pooled_with: Grid | None = None) -> dict:
    """{selection group: the dev-picked learning rate} of one method's grid over `keys` (default: the pairs every
    rate has), by grid.pick_lr's rule. `pooled_with`: pick one rate for two methods on their dev scores together
    (the MiniLM rule, uniform and Sensitivity-LoRA jointly)."""
    complete = _complete_keys(grid, *([pooled_with] if pooled_with is not None else []))
    pos = {k: j for j, k in enumerate(complete)}
    picker = _Picker(grid, complete, pooled_with)
    by_g: dict = {}
    for k in (complete if keys is None else keys):
        if k not in pos:
            raise KeyError(f"pick_lrs: {k!r} is not in every rate of the grid(s)")
        by_g.setdefault(group(k), []).append(pos[k])
    return {g: picker.pick(idx) for g, idx in by_g.items()}


def dev_test_differences(method: Grid, baseline: Grid, group: Callable = task_of, shared_pick: bool = False) -> dict:
    """The paired comparison at the dev-picked rates, on dev and on test.

    Each grid's rate is picked on its own dev scores per selection group (shared_pick: one rate for both, on their
    dev scores together). Returns {"keys": the pairs compared (every rate of both grids has them, sorted),
    "lr_method", "lr_baseline": {group: rate}, "dev", "test": paired_differences of the dev and of the test scores
    at those rates (a pair with a NaN score on that split is dropped from that list)}."""
    keys = _complete_keys(method, baseline)
    if not keys:
        raise ValueError("dev_test_differences: no pair is in every rate of both grids")
    lm = pick_lrs(method, keys, group, baseline if shared_pick else None)
    lb = lm if shared_pick else pick_lrs(baseline, keys, group)
    at = {split: ({k: method[lm[group(k)]][k][i] for k in keys}, {k: baseline[lb[group(k)]][k][i] for k in keys})
          for i, split in enumerate(("dev", "test"))}
    return {"keys": keys, "lr_method": lm, "lr_baseline": lb,
            "dev": paired_differences(*at["dev"]), "test": paired_differences(*at["test"])}


def selection_aware_bootstrap(method: Grid, baseline: Grid, level: float = 0.95,
                              resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                              group: Callable = task_of, shared_pick: bool = False) -> dict:
    """Percentile bootstrap interval of the mean paired test Δ that redoes the learning-rate picks in every resample.

    The rule. The pairs are those every rate of both grids has (sorted keys). Each resample draws as many pairs with
    replacement (the same random.Random(seed) draws as bootstrap_ci, so with no NaN score and a pick that never
    moves the two intervals are identical). Inside the resample each method's rate is picked again per selection
    group, exactly as pick_lrs does on the full data: the best mean dev score over the resampled pairs of that group
    (a pair drawn twice counts twice), NaN dev as the worst, ties to the smaller rate; shared_pick picks one rate for
    both on their dev scores together. The resample's statistic is the mean over its pairs of method test minus
    baseline test at the re-picked rates (pairs with a NaN test score there left out; a resample with none left is
    counted in "undefined_resamples" and not used). The interval: the (1-level)/2 and (1+level)/2 order statistics
    of the resampled means, as in bootstrap_ci.

    Returns {"n_pairs", "mean": the paired test Δ at the full-data picks, "interval", "level", "resamples",
    "undefined_resamples", "lr_method", "lr_baseline": the full-data picks, "pick_frequency": {"method" |
    "baseline": {group: {rate: share of the resamples containing the group that picked it}}}}."""
    keys = _complete_keys(method, baseline)
    n = len(keys)
    if n == 0:
        raise ValueError("selection_aware_bootstrap: no pair is in every rate of both grids")
    groups = [group(k) for k in keys]
    pm = _Picker(method, keys, baseline if shared_pick else None)
    pb = pm if shared_pick else _Picker(baseline, keys)
    tm = {lr: [method[lr][k][1] for k in keys] for lr in method}
    tb = {lr: [baseline[lr][k][1] for k in keys] for lr in baseline}

    def statistic(idx):
        by_g: dict = {}
        for j in idx:
            by_g.setdefault(groups[j], []).append(j)
        picks = {g: (pm.pick(ix), pb.pick(ix)) for g, ix in by_g.items()}
        ds = [tm[picks[groups[j]][0]][j] - tb[picks[groups[j]][1]][j] for j in idx]
        ds = [d for d in ds if d == d]
        return (math.fsum(ds) / len(ds) if ds else math.nan), picks

    full, full_picks = statistic(list(range(n)))
    rng = random.Random(seed)
    means, seen = [], {"method": {}, "baseline": {}}
    for _ in range(resamples):
        m, picks = statistic(rng.choices(range(n), k=n))
        if m == m:
            means.append(m)
        for g, lrs in picks.items():
            for who, lr in zip(("method", "baseline"), lrs):
                freq = seen[who].setdefault(g, {})
                freq[lr] = freq.get(lr, 0) + 1
    if not means:
        raise ValueError("selection_aware_bootstrap: no resample has a defined test difference")
    means.sort()
    share = {who: {g: {lr: c / sum(f.values()) for lr, c in sorted(f.items())} for g, f in sorted(by.items())}
             for who, by in seen.items()}
    return {"n_pairs": n, "mean": full, "interval": _percentile_interval(means, level), "level": level,
            "resamples": resamples, "undefined_resamples": resamples - len(means),
            "lr_method": {g: p[0] for g, p in full_picks.items()},
            "lr_baseline": {g: p[1] for g, p in full_picks.items()}, "pick_frequency": share}


# ---------------------------------------------------------------------------------------------------------------
# Rank tests and multiplicity


def _doubled_average_ranks(values: list[float]) -> list[int]:
    """Twice the average ranks (1-based) of `values`: a tie block over positions i..j gets (i + j), an integer."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for q in range(i, j + 1):
            out[order[q]] = (i + 1) + (j + 1)
        i = j + 1
    return out


def signed_rank_null_counts(doubled_ranks: list[int]) -> list[int]:
    """counts[s] = how many of the 2^n sign assignments give 2·T+ = s, where T+ is the sum of the ranks given a +.

    The standard recursion (one rank at a time: a rank either joins T+ or not), exact in integers; with tied ranks
    (half-integers, hence doubled) it is the exact conditional null distribution given the observed ranks."""
    counts = [1]
    for r in doubled_ranks:
        counts = [a + b for a, b in zip(counts + [0] * r, [0] * r + counts)]
    return counts


def wilcoxon_signed_rank(diffs: list[float], zero_method: str = "wilcox", ndigits: int | None = TIE_DIGITS) -> dict:
    """Two-sided Wilcoxon signed-rank test of the paired differences (H0: symmetric about 0).

    Ranks of |d|, tied |d| sharing their average rank; T+ = the sum of the ranks of the positive differences.
    zero_method "wilcox" (Wilcoxon's own, the default): d = 0 is dropped before ranking, as the sign test drops
    ties. "pratt" (Pratt 1959): d = 0 is ranked with the rest and then dropped, so the zeros push the other ranks up.
    Differences are compared after round(d, ndigits): two differences equal in the recorded scores but apart by the
    float rounding of a subtraction (1e-14 on a ×100 score) are tied, and such a difference near 0 is a zero
    (ndigits None: exact comparison).

    p = min(1, 2 · min(P[T+ <= t], P[T+ >= t])) under the null (each nonzero difference's sign a fair coin; the
    distribution is symmetric), exact (signed_rank_null_counts) up to WILCOXON_EXACT_MAX nonzero differences,
    above it the normal approximation with the tie-corrected variance Σr²/4 and no continuity correction.
    With no nonzero difference p = 1. Returns {"n" (nonzero differences used), "zeros", "t_plus", "t_minus", "p",
    "exact", "zero_method"}."""
    if any(x != x for x in diffs):
        raise ValueError("wilcoxon_signed_rank: NaN difference")
    if zero_method not in ("wilcox", "pratt"):
        raise ValueError(f"zero_method must be 'wilcox' or 'pratt', not {zero_method!r}")
    d = [round(x, ndigits) if ndigits is not None else x for x in diffs]
    if zero_method == "wilcox":
        used = [x for x in d if x != 0]
        r2 = _doubled_average_ranks([abs(x) for x in used])
    else:
        all_r2 = _doubled_average_ranks([abs(x) for x in d])
        used, r2 = [x for x in d if x != 0], [r for r, x in zip(all_r2, d) if x != 0]
    n, zeros = len(used), len(d) - len(used)
    t2 = sum(r for r, x in zip(r2, used) if x > 0)
    out = {"n": n, "zeros": zeros, "t_plus": t2 / 2, "t_minus": (sum(r2) - t2) / 2, "p": 1.0,
           "exact": n <= WILCOXON_EXACT_MAX, "zero_method": zero_method}
    if n == 0:
        return out
    if out["exact"]:
        counts = signed_rank_null_counts(r2)
        tail = min(sum(counts[:t2 + 1]), sum(counts[t2:]))
        out["p"] = float(min(Fraction(1), Fraction(2 * tail, 2 ** n)))
    else:
        z = (t2 - sum(r2) / 2) / math.sqrt(sum(r * r for r in r2) / 4)
        out["p"] = min(1.0, 2 * statistics.NormalDist().cdf(-abs(z)))
    return out


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's (1979) step-down adjusted p-values, in the input order.

    Sorted ascending p_(1) <= ... <= p_(m): adj_(j) = max over i <= j of min(1, (m - i + 1) · p_(i)). Rejecting
    where adj <= α is Holm's procedure at family-wise error α (the methods compared with one baseline form a
    family); each adj >= its raw p and <= the Bonferroni min(1, m·p)."""
    p = list(pvalues)
    if any(not (0 <= x <= 1) for x in p):
        raise ValueError("holm: p-values must lie in [0, 1]")
    m, adj, running = len(p), [0.0] * len(p), 0.0
    for i, j in enumerate(sorted(range(m), key=lambda j: p[j])):
        running = max(running, min(1.0, (m - i) * p[j]))
        adj[j] = running
    return adj


# ---------------------------------------------------------------------------------------------------------------
# Student t without scipy: the regularized incomplete beta function by its continued fraction


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), by the continued fraction of Numerical Recipes (3rd ed., §6.4, modified Lentz), evaluated on the
    side where it converges fast (x < (a+1)/(a+b+2)), the other side through I_x(a, b) = 1 - I_{1-x}(b, a)."""
    if not (a > 0 and b > 0):
        raise ValueError("regularized_incomplete_beta: a and b must be positive")
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-16
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 100_000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError("incomplete beta continued fraction did not converge")


def student_t_cdf(t: float, df: float) -> float:
    """P[T <= t] for Student's t with df degrees of freedom (df > 0, not necessarily an integer).

    P[|T| > |t|] = I_{df/(df+t²)}(df/2, 1/2) in the tails; near 0 (t² < df) P[|T| < |t|] = I_{t²/(df+t²)}(1/2, df/2)
    instead, which keeps its relative precision where the first is close to 1."""
    if t != t:
        return math.nan
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    if t * t < df:
        inner = regularized_incomplete_beta(0.5, df / 2, t * t / (df + t * t))
        return 0.5 + math.copysign(inner / 2, t)
    tail = regularized_incomplete_beta(df / 2, 0.5, df / (df + t * t)) / 2
    return 1.0 - tail if t > 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """The t with student_t_cdf(t, df) = p, by bisection (to the last bits of a double), odd about p = 1/2."""
    if not (0 < p < 1):
        raise ValueError("student_t_quantile: p must lie in (0, 1)")
    if p < 0.5:
        return -student_t_quantile(1 - p, df)
    if p == 0.5:
        return 0.0
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, df) < p:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if student_t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def t_interval(diffs: list[float], level: float = 0.95) -> tuple[float, float]:
    """mean ± t_{(1+level)/2, n-1} · sd / √n: the Student t confidence interval of the mean paired difference.

    Exact coverage if the differences are independent and normal; needs n >= 2."""
    n = len(diffs)
    if n < 2:
        raise ValueError("t_interval: needs at least 2 paired differences")
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = student_t_quantile((1 + level) / 2, n - 1) * sd / math.sqrt(n)
    return mean - half, mean + half


# ---------------------------------------------------------------------------------------------------------------
# Power: the smallest paired effect a comparison of n pairs detects


def minimum_detectable_effect(sd: float, n: int, alpha: float = 0.05, power: float = 0.80,
                              approx: str = "t") -> float:
    """The smallest true mean paired difference that a two-sided paired test at level alpha detects with
    probability `power`, given the SD of the paired differences: (q_{1-alpha/2} + q_{power}) · sd / √n.

    approx "t" (default): q are Student t quantiles with n - 1 degrees of freedom, the usual approximation to the
    paired t-test's exact (noncentral t) power. At 80 % and alpha 0.05 the exact power at this effect is 0.73 with
    2 pairs, 0.77 with 3, 0.78 with 4, 0.79 with 5 and within 0.006 of 0.80 from 6 pairs on (the approximation is
    slightly optimistic at small n). "normal": q are standard normal quantiles (z_{0.975} + z_{0.80} = 2.8016),
    the large-n version, far too optimistic at small n (exact power 0.35 with 3 pairs, 0.74 with 15)."""
    if approx == "t":
        if n < 2:
            raise ValueError("minimum_detectable_effect: the t approximation needs n >= 2")
        q = student_t_quantile(1 - alpha / 2, n - 1) + student_t_quantile(power, n - 1)
    elif approx == "normal":
        z = statistics.NormalDist()
        q = z.inv_cdf(1 - alpha / 2) + z.inv_cdf(power)
    else:
        raise ValueError(f"approx must be 't' or 'normal', not {approx!r}")
    return q * sd / math.sqrt(n)


def pairs_needed(effect: float, sd: float, alpha: float = 0.05, power: float = 0.80, approx: str = "t",
                 max_n: int = 1_000_000) -> int:
    """The fewest pairs whose minimum_detectable_effect (same approximation) is at most `effect`."""
    if effect <= 0 or sd < 0:
        raise ValueError("pairs_needed: effect must be positive and sd non-negative")
    z = statistics.NormalDist()
    n = max(2, math.floor(((z.inv_cdf(1 - alpha / 2) + z.inv_cdf(power)) * sd / effect) ** 2) - 1)
    while minimum_detectable_effect(sd, n, alpha, power, approx) > effect:
        n += 1
        if n > max_n:
            raise ValueError(f"pairs_needed: more than {max_n:,} pairs")
    return n


# ---------------------------------------------------------------------------------------------------------------
# What to report for n pairs


def report(diffs: list[float], seed: int = BOOTSTRAP_SEED) -> dict:
    """The summary of paired differences that their number supports; every key says what its number is.

    Always: "n_pairs", "mean_diff", "min_diff", "max_diff" (the range), "wins", "losses", "ties" (d rounded to
    TIE_DIGITS decimals), "sign_p" (exact sign test), "wilcoxon_p" (exact signed-rank test, zeros dropped),
    "wilcoxon_t_plus", "p_floor" (the smallest two-sided p either test can give with these untied pairs, 2^(1-m):
    with m <= 5 no outcome reaches 0.05). With n >= 2: "sd_diff" (sample SD), "t_interval95" (Student t, assumes
    normal differences), "mde80_t" (the minimum detectable effect at 80 % power, two-sided 0.05, t approximation);
    None below 2. Only with n >= SMALL_N: "bootstrap_ci95" (the percentile bootstrap of bootstrap_ci); with fewer
    pairs the key is absent, and the range and the t-interval are what there is."""
    if not diffs:
        raise ValueError("report: no paired differences")
    n = len(diffs)
    wins, losses, sign_p = sign_test([round(d, TIE_DIGITS) for d in diffs])
    w = wilcoxon_signed_rank(diffs)
    sd = statistics.stdev(diffs) if n >= 2 else None
    out = {"n_pairs": n, "mean_diff": statistics.fmean(diffs), "sd_diff": sd, "min_diff": min(diffs),
           "max_diff": max(diffs), "wins": wins, "losses": losses, "ties": n - wins - losses, "sign_p": sign_p,
           "wilcoxon_p": w["p"], "wilcoxon_t_plus": w["t_plus"],
           "p_floor": min(1.0, 2.0 ** (1 - (wins + losses))),
           "t_interval95": t_interval(diffs) if n >= 2 else None,
           "mde80_t": minimum_detectable_effect(sd, n) if n >= 2 else None}
    if n >= SMALL_N:
        out["bootstrap_ci95"] = bootstrap_ci(diffs, seed=seed)
    return out


def compare_to_baseline(methods: dict, baseline: Grid, group: Callable = task_of, shared_pick: bool = False,
                        resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    """Every method against one baseline: {name: {"lr", "baseline_lr": {group: rate}, "dev": report of the dev
    differences at the picked rates, "test": report of the test differences, "sign_p_holm", "wilcoxon_p_holm": the
    test p-values Holm-adjusted over the methods given (one family), and with at least SMALL_N pairs
    "selection_aware_ci95" and "pick_frequency" (selection_aware_bootstrap)}}. `methods` holds each method's grid
    ({lr: {(task, seed): (dev, test)}}), not the baseline's."""
    out = {}
    for name, grid in methods.items():
        d = dev_test_differences(grid, baseline, group, shared_pick)
        if not d["test"]:
            raise ValueError(f"compare_to_baseline: {name} has no defined test difference")
        entry = {"lr": d["lr_method"], "baseline_lr": d["lr_baseline"],
                 "dev": report(d["dev"], seed) if d["dev"] else None, "test": report(d["test"], seed)}
        if entry["test"]["n_pairs"] >= SMALL_N:
            sel = selection_aware_bootstrap(grid, baseline, 0.95, resamples, seed, group, shared_pick)
            entry["selection_aware_ci95"], entry["pick_frequency"] = sel["interval"], sel["pick_frequency"]
        out[name] = entry
    for key in ("sign_p", "wilcoxon_p"):
        for name, adj in zip(out, holm([e["test"][key] for e in out.values()])):
            out[name][key + "_holm"] = adj
    return out
