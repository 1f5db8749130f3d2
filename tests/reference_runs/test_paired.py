"""reference_runs/paired.py: the paired statistics of the method comparisons, against exact oracles.

Oracles: the sign test's p-value by brute-force enumeration of every win/loss sequence (exact fractions); the
bootstrap interval's invariances (a constant difference, translation, positive scaling) and its containment of the
sample mean, which every percentile interval of a mean must satisfy. The Wilcoxon signed-rank p by enumerating all
2^n sign assignments with a separately written ranking, and two published examples; Holm against a worked example
and against the step-down procedure run at each level; the t distribution against closed forms (df 1-4), printed
table values and the binomial identity of the incomplete beta (test_paired_power.py, with the minimum detectable
effect against the exact noncentral-t power and G*Power's sample size); the learning-rate pick against grid.pick_lr
itself; the selection-aware bootstrap against cases whose answer is known.
"""
import itertools
import math
import types
import random
import statistics
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "reference_runs"))
import grid  # noqa: E402
import paired  # noqa: E402

# score differences in points ×100, as the tables report them; bounded so that sums stay exact enough in float
differences = st.lists(st.floats(-20, 20, allow_nan=False).map(lambda x: round(x, 2)), min_size=1, max_size=15)


def enumerated_sign_p(wins: int, losses: int) -> Fraction:
    """Two-sided p by enumerating all 2^n sign sequences: P[min(#+, #-) <= min(wins, losses)] under fair coins."""
    n, m = wins + losses, min(wins, losses)
    hits = sum(1 for s in itertools.product((0, 1), repeat=n) if min(sum(s), n - sum(s)) <= m)
    return Fraction(hits, 2 ** n)


@given(st.integers(0, 9), st.integers(0, 9), st.integers(0, 3))
@example(9, 1, 0).via("anchor: 9 wins of 10, p = 22/1024")
@example(0, 0, 4).via("anchor: all ties, no evidence")
def test_sign_test_matches_enumeration(wins, losses, ties):
    diffs = [1.0] * wins + [-0.5] * losses + [0.0] * ties
    w, l, p = paired.sign_test(diffs)
    assert (w, l) == (wins, losses)
    expected = 1.0 if wins + losses == 0 else float(enumerated_sign_p(wins, losses))
    assert p == pytest.approx(expected, rel=1e-12)


def test_sign_test_anchor():
    # 9 wins, 1 loss: 2·(C(10,0)+C(10,1))/2^10 = 22/1024
    assert paired.sign_test([1] * 9 + [-1])[2] == pytest.approx(22 / 1024, rel=1e-15)


@given(differences)
def test_bootstrap_interval_contains_the_mean_and_is_deterministic(diffs):
    lo, hi = paired.bootstrap_ci(diffs)
    mean = sum(diffs) / len(diffs)
    assert lo <= hi
    # the resampled means straddle the sample mean: with 10,000 resamples the 2.5 % and 97.5 % quantiles cannot both
    # lie on one side unless every resample equals it (then lo == hi == mean up to rounding)
    assert lo <= mean + 1e-9 and hi >= mean - 1e-9
    assert paired.bootstrap_ci(diffs) == (lo, hi)


@given(differences, st.floats(-5, 5).map(lambda x: round(x, 1)), st.sampled_from([0.5, 2.0, 4.0]))
def test_bootstrap_interval_is_translation_and_scale_equivariant(diffs, shift, scale):
    lo, hi = paired.bootstrap_ci(diffs)
    lo2, hi2 = paired.bootstrap_ci([scale * d + shift for d in diffs])
    # same seed -> the same resampled indices; only float rounding of the sums differs (40 points × 15 terms)
    assert lo2 == pytest.approx(scale * lo + shift, abs=1e-9)
    assert hi2 == pytest.approx(scale * hi + shift, abs=1e-9)


def test_constant_difference_gives_a_degenerate_interval():
    assert paired.bootstrap_ci([0.7] * 9) == (pytest.approx(0.7), pytest.approx(0.7))


def test_paired_differences_align_keys_and_drop_undefined_scores():
    method = {("a", 0): 0.9, ("a", 1): float("nan"), ("b", 0): 0.5, ("c", 0): 0.1}
    base = {("a", 0): 0.8, ("a", 1): 0.7, ("b", 0): 0.6}
    assert paired.paired_differences(method, base) == pytest.approx([0.1, -0.1])


def test_summary_of_no_pairs_is_an_error():
    with pytest.raises(ValueError, match="no paired differences"):
        paired.summary([])


@given(differences)
def test_sign_test_is_symmetric(diffs):
    w, l, p = paired.sign_test(diffs)
    assert paired.sign_test([-d for d in diffs]) == (l, w, p)
    assert 0 < p <= 1


def test_sign_test_many_pairs():
    # 1,100 pairs: 2^1100 does not fit a float, so the tail is summed in integers (exact, then one rounding)
    tail = sum(math.comb(1100, k) for k in range(501))
    assert paired.sign_test([1.0] * 600 + [-1.0] * 500)[2] == float(Fraction(2 * tail, 2 ** 1100))


def test_sign_test_darwin():
    # Darwin's Zea mays, 15 pairs (Fisher 1935, The Design of Experiments, §17): 13 positive, 2 negative differences;
    # p = 2·(C(15,0) + C(15,1) + C(15,2)) / 2^15 = 242/32768
    assert paired.sign_test(DARWIN)[2] == 242 / 32768


# ---- Wilcoxon signed-rank

# Fisher (1935), Darwin's cross- minus self-fertilised Zea mays heights in eighths of an inch; the example of
# scipy.stats.wilcoxon's documentation, whose exact two-sided p is 0.04126 (T- = 24 = ranks 10 + 14)
DARWIN = [6, 8, 14, 16, 23, 24, 28, 29, 41, -48, 49, 56, 60, -67, 75]


def naive_ranks(values):
    """Average ranks written out from their definition: #smaller + (#equal + 1) / 2."""
    return [Fraction(sum(w < v for w in values)) + Fraction(sum(w == v for w in values) + 1, 2) for v in values]


def enumerated_wilcoxon_p(diffs, zero_method):
    """Two-sided p by enumerating all 2^n sign assignments to the nonzero differences' ranks: the share with
    |T+ - S/2| >= |t - S/2| (S the rank sum), the definition the symmetric null distribution gives."""
    if zero_method == "wilcox":
        used = [d for d in diffs if d != 0]
        ranks = naive_ranks([abs(d) for d in used])
    else:
        ranks = [r for r, d in zip(naive_ranks([abs(d) for d in diffs]), diffs) if d != 0]
        used = [d for d in diffs if d != 0]
    if not used:
        return Fraction(1)
    s = sum(ranks)
    t = sum(r for r, d in zip(ranks, used) if d > 0)
    hits = sum(1 for signs in itertools.product((0, 1), repeat=len(used))
               if abs(sum(r for r, g in zip(ranks, signs) if g) - s / 2) >= abs(t - s / 2))
    return Fraction(hits, 2 ** len(used))


def test_wilcoxon_hollander_wolfe():
    # Hollander & Wolfe (1999), Nonparametric Statistical Methods, 2nd ed., Example 3.1 (Hamilton depression scale,
    # first and second visit; the example of R's wilcox.test): V = T+ = 40, one-sided p = 0.01953 = 10/512
    x = [1.83, 0.50, 1.62, 2.48, 1.68, 1.88, 1.55, 3.06, 1.30]
    y = [0.878, 0.647, 0.598, 2.05, 1.06, 1.29, 1.06, 3.14, 1.29]
    w = paired.wilcoxon_signed_rank([a - b for a, b in zip(x, y)])
    assert (w["n"], w["t_plus"], w["t_minus"], w["exact"]) == (9, 40, 5, True)
    assert w["p"] == 20 / 512


def test_wilcoxon_darwin():
    w = paired.wilcoxon_signed_rank(DARWIN)
    assert (w["t_plus"], w["t_minus"]) == (96, 24)
    assert w["p"] == pytest.approx(0.04126, abs=5e-6)
    assert w["p"] == enumerated_wilcoxon_p(DARWIN, "wilcox")


# small integers: many ties among |d| and many zeros
tied = st.lists(st.integers(-4, 4), min_size=0, max_size=10)


@given(tied, st.sampled_from(["wilcox", "pratt"]))
@example([0, 1, 2, -3], "pratt").via("Pratt: the zero takes rank 1, so the others rank 2, 3, 4")
@example([1, 1, -1, 2, -2, 0], "wilcox").via("tie blocks of 3 and 2 and a zero")
def test_wilcoxon_matches_enumeration(diffs, zero_method):
    w = paired.wilcoxon_signed_rank([float(d) for d in diffs], zero_method)
    assert w["p"] == pytest.approx(float(enumerated_wilcoxon_p(diffs, zero_method)), rel=1e-12)
    assert w["zeros"] == diffs.count(0) and w["n"] == len(diffs) - diffs.count(0)


def test_wilcoxon_zero_methods_differ():
    # wilcox: ranks of 1, 2, 3 are 1, 2, 3, T+ = 3 of 6, p = 1; pratt: 2, 3, 4, T+ = 5 of 9
    assert paired.wilcoxon_signed_rank([0, 1, 2, -3])["t_plus"] == 3
    assert paired.wilcoxon_signed_rank([0, 1, 2, -3], "pratt")["t_plus"] == 5


@given(differences, st.sampled_from([0.5, 2.0, 10.0]))
def test_wilcoxon_p_is_a_probability_symmetric_and_scale_free(diffs, scale):
    p = paired.wilcoxon_signed_rank(diffs)["p"]
    assert 0 < p <= 1
    assert paired.wilcoxon_signed_rank([-d for d in diffs])["p"] == p
    assert paired.wilcoxon_signed_rank([scale * d for d in diffs])["p"] == p
    assert paired.wilcoxon_signed_rank(list(reversed(diffs)))["p"] == p


def test_wilcoxon_float_noise_is_a_tie():
    # 0.3 - 0.1 and 0.5 - 0.3 are both 0.2 in the recorded scores but differ in the last bit of a double
    assert 0.3 - 0.1 != 0.5 - 0.3
    w = paired.wilcoxon_signed_rank([0.3 - 0.1, -(0.5 - 0.3), 0.7 - 0.7 + 1e-17, 1.0])
    assert w["zeros"] == 1 and (w["t_plus"], w["t_minus"]) == (4.5, 1.5)


def test_wilcoxon_normal_approximation_above_the_exact_limit(monkeypatch):
    rng = random.Random(3)
    diffs = [round(rng.gauss(0.2, 1), 1) for _ in range(paired.WILCOXON_EXACT_MAX + 30)]
    approx = paired.wilcoxon_signed_rank(diffs)
    monkeypatch.setattr(paired, "WILCOXON_EXACT_MAX", 10 ** 6)
    exact = paired.wilcoxon_signed_rank(diffs)
    assert not approx["exact"] and exact["exact"]
    assert approx["p"] == pytest.approx(exact["p"], abs=0.005)


def test_signed_rank_null_counts_without_ties():
    # n = 4, ranks 1-4: the number of subsets of {1, 2, 3, 4} with each sum 0..10
    assert paired.signed_rank_null_counts([2, 4, 6, 8])[::2] == [1, 1, 1, 2, 2, 2, 2, 2, 1, 1, 1]


# ---- Holm


def test_holm_worked_example():
    # Wikipedia, "Holm–Bonferroni method", Example: p = 0.01, 0.04, 0.03, 0.005 at α = 0.05 rejects H1 and H4.
    # Sorted 0.005, 0.01, 0.03, 0.04 -> 4·0.005, 3·0.01, max(2·0.03, ...), max(1·0.04, 0.06)
    adj = paired.holm([0.01, 0.04, 0.03, 0.005])
    assert adj == pytest.approx([0.03, 0.06, 0.06, 0.02], rel=1e-12)
    assert [a <= 0.05 for a in adj] == [True, False, False, True]


def holm_procedure_rejects(p, alpha):
    """Holm (1979) as a procedure: walk the sorted p, reject while p_(j) <= alpha / (m - j + 1), stop at the first
    that is not."""
    m, rejected = len(p), set()
    for j, i in enumerate(sorted(range(m), key=lambda i: p[i])):
        if p[i] > alpha / (m - j):
            break
        rejected.add(i)
    return rejected


pvalues = st.lists(st.floats(0, 1), min_size=1, max_size=8)


@given(pvalues)
def test_holm_agrees_with_the_procedure(p):
    adj = paired.holm(p)
    for a in set(adj):
        for alpha in (a * (1 - 1e-9), a * (1 + 1e-9)):
            if 0 < alpha < 1:
                assert holm_procedure_rejects(p, alpha) == {i for i in range(len(p)) if adj[i] <= alpha}


@given(pvalues)
def test_holm_is_monotone_and_between_raw_and_bonferroni(p):
    adj = paired.holm(p)
    m = len(p)
    for i in range(m):
        assert p[i] <= adj[i] <= min(1.0, m * p[i]) * (1 + 1e-15)
        for j in range(m):
            if p[i] <= p[j]:
                assert adj[i] <= adj[j]


def test_holm_rejects_non_probabilities():
    with pytest.raises(ValueError):
        paired.holm([0.2, float("nan")])


# ---- what to report for n pairs


def test_report_with_few_pairs_has_no_bootstrap_interval():
    r = paired.report([0.1, -0.2, 0.5])
    assert "bootstrap_ci95" not in r and not any("bootstrap" in k for k in r)
    assert (r["n_pairs"], r["min_diff"], r["max_diff"]) == (3, -0.2, 0.5)
    assert r["t_interval95"] == paired.t_interval([0.1, -0.2, 0.5])
    assert r["p_floor"] == 0.25 and r["sign_p"] == 1.0
    one = paired.report([0.4])
    assert one["sd_diff"] is None and one["t_interval95"] is None and one["mde80_t"] is None
    assert paired.report([1, 2, 3, 4, 5])["p_floor"] == 1 / 16  # 5 pairs: no outcome reaches 0.05


def test_report_with_enough_pairs():
    diffs = [0.1, -0.2, 0.5, 0.3, 0.3, 0.0, 1.0]
    r = paired.report(diffs)
    assert r["bootstrap_ci95"] == paired.bootstrap_ci(diffs)
    assert (r["wins"], r["losses"], r["ties"]) == (5, 1, 1)
    assert r["sign_p"] == paired.sign_test(diffs)[2] and r["wilcoxon_p"] == paired.wilcoxon_signed_rank(diffs)["p"]
    assert r["mde80_t"] == paired.minimum_detectable_effect(statistics.stdev(diffs), 7)
    with pytest.raises(ValueError, match="no paired differences"):
        paired.report([])


# ---- learning-rate picks and the selection-aware bootstrap


class FakeRun:
    """What grid.pick_lr reads of a run: done(), its args (--lr) and the recorded metrics' dev score."""

    def __init__(self, lr, dev):
        self.args = f"--lr {lr!r}"
        self.record = types.SimpleNamespace(metrics={"main_metric": "m", "final": {"dev": {"m": dev}}})

    def done(self):
        return True


LRS = (5e-4, 1e-3, 2e-3)
# dev scores from a few values, so that equal means (ties between rates) and NaN happen
dev_value = st.sampled_from([0.5, 0.6, 0.7, 0.8, float("nan")])


def grid_strategy(tasks=("a", "b"), seeds=(0, 1, 2)):
    keys = [(t, s) for t in tasks for s in seeds]
    return st.fixed_dictionaries({lr: st.fixed_dictionaries({k: st.tuples(dev_value, st.floats(0, 1))
                                                             for k in keys}) for lr in LRS})


@given(grid_strategy(), grid_strategy(), st.lists(st.sampled_from([(t, s) for t in "ab" for s in range(3)]),
                                                  min_size=1, max_size=8), st.booleans())
def test_pick_is_grid_pick_lr(method, other, keys, pooled):
    # the same rule as the tables: grid.pick_lr over the runs of each task's keys (a key drawn twice, twice),
    # pooled with a second method's runs where the pick is shared
    picks = paired.pick_lrs(method, keys, pooled_with=other if pooled else None)
    for task in {k[0] for k in keys}:
        runs = [FakeRun(lr, g[lr][k][0]) for g in ([method, other] if pooled else [method]) for lr in LRS
                for k in keys if k[0] == task]
        assert picks[task] == grid.pick_lr(runs)


def test_pick_ties_go_to_the_smaller_rate_and_nan_is_worst():
    g = {lr: {("a", 0): (0.7, 0.0), ("a", 1): (0.7, 0.0)} for lr in LRS}
    assert paired.pick_lrs(g) == {"a": 5e-4}
    g[5e-4][("a", 0)] = (float("nan"), 0.0)
    assert paired.pick_lrs(g) == {"a": 1e-3}


def test_dev_test_differences_at_the_picks():
    method = {lr: {("a", s): (0.5 + (lr == 1e-3) * 0.1 + s / 100, 0.4 + lr * 100 + s / 10) for s in range(3)}
              for lr in LRS}
    base = {lr: {("a", s): (0.5 + (lr == 2e-3) * 0.1, 0.3 + s / 10) for s in range(3)} for lr in LRS}
    d = paired.dev_test_differences(method, base)
    assert d["lr_method"] == {"a": 1e-3} and d["lr_baseline"] == {"a": 2e-3}
    assert d["dev"] == pytest.approx([0.0, 0.01, 0.02])
    assert d["test"] == pytest.approx([0.2, 0.2, 0.2])
    shared = paired.dev_test_differences(method, base, shared_pick=True)
    assert shared["lr_method"] == shared["lr_baseline"] == {"a": 1e-3}  # method 0.61 + base 0.5 beats 0.5 + 0.6


def dominated_grids(seed=5, tasks="abc", seeds=range(5)):
    """Random test scores; on dev one rate per method and task wins by 10 points on every pair."""
    rng = random.Random(seed)
    best_m, best_b = {t: rng.choice(LRS) for t in tasks}, {t: rng.choice(LRS) for t in tasks}

    def make(best):
        return {lr: {(t, s): (rng.uniform(0, 1) + 10 * (lr == best[t]), rng.gauss(80, 1)) for t in tasks
                     for s in seeds} for lr in LRS}
    return make(best_m), make(best_b), best_m, best_b


def test_selection_aware_bootstrap_equals_the_plain_one_when_the_pick_never_moves():
    method, base, best_m, best_b = dominated_grids()
    sel = paired.selection_aware_bootstrap(method, base, resamples=3000, seed=7)
    at = paired.dev_test_differences(method, base)
    assert at["lr_method"] == best_m and at["lr_baseline"] == best_b
    assert sel["interval"] == paired.bootstrap_ci(at["test"], resamples=3000, seed=7)
    assert sel["mean"] == statistics.fmean(at["test"]) and sel["undefined_resamples"] == 0
    assert all(f == {best_m[t]: 1.0} for t, f in sel["pick_frequency"]["method"].items())


def test_selection_aware_bootstrap_repicks_in_every_resample():
    # one task; the method's dev score equals its test score at each of three rates, the baseline scores 0 at its
    # one rate: in each resample the pick is the rate with the best resampled mean, so the statistic is the largest
    # of the three resampled means. Rebuilt here from the same random.Random(seed) draws.
    rng = random.Random(11)
    n = 9
    scores = {lr: [rng.gauss(0, 1) for _ in range(n)] for lr in LRS}
    method = {lr: {("a", s): (scores[lr][s], scores[lr][s]) for s in range(n)} for lr in LRS}
    base = {1e-3: {("a", s): (0.0, 0.0) for s in range(n)}}
    draws = random.Random(3)
    stats = []
    for _ in range(2000):
        idx = draws.choices(range(n), k=n)
        stats.append(max(math.fsum(scores[lr][j] for j in idx) / n for lr in LRS))
    stats.sort()
    sel = paired.selection_aware_bootstrap(method, base, resamples=2000, seed=3)
    assert sel["interval"] == (stats[math.floor(0.025 * 1999)], stats[math.ceil(0.975 * 1999)])
    assert sel["mean"] == max(statistics.fmean(v) for v in scores.values())
    assert sum(sel["pick_frequency"]["method"]["a"].values()) == pytest.approx(1.0)


def test_selection_aware_bootstrap_is_deterministic_and_contains_nothing_unpaired():
    method, base, _, _ = dominated_grids(seed=9)
    del base[LRS[0]][("c", 4)]  # a pair missing at one rate of the baseline is compared nowhere
    a = paired.selection_aware_bootstrap(method, base, resamples=500)
    assert a == paired.selection_aware_bootstrap(method, base, resamples=500)
    assert a["n_pairs"] == 14


def test_compare_to_baseline():
    method, base, _, _ = dominated_grids(seed=1)
    other, _, _, _ = dominated_grids(seed=2)
    out = paired.compare_to_baseline({"m": method, "o": other}, base, resamples=500)
    for name, g in (("m", method), ("o", other)):
        d = paired.dev_test_differences(g, base)
        assert out[name]["test"] == paired.report(d["test"]) and out[name]["dev"] == paired.report(d["dev"])
        sel = paired.selection_aware_bootstrap(g, base, resamples=500)
        assert out[name]["selection_aware_ci95"] == sel["interval"]
    for key in ("sign_p", "wilcoxon_p"):
        assert [out[m][key + "_holm"] for m in "mo"] == paired.holm([out[m]["test"][key] for m in "mo"])
    few = {lr: {k: v for k, v in by.items() if k[1] < 1} for lr, by in method.items()}  # 3 pairs
    small = paired.compare_to_baseline({"m": few}, base, resamples=500)["m"]
    assert "selection_aware_ci95" not in small and "bootstrap_ci95" not in small["test"]
