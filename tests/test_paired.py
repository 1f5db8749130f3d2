"""reference_runs/paired.py: the paired statistics of the method comparisons, against exact oracles.

Oracles: the sign test's p-value by brute-force enumeration of every win/loss sequence (exact fractions); the
bootstrap interval's invariances (a constant difference, translation, positive scaling) and its containment of the
sample mean, which every percentile interval of a mean must satisfy.
"""
import itertools
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reference_runs"))
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
