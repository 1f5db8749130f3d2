"""reference_runs/paired.py, its Student t distribution and power (the rest of paired.py: test_paired.py).

Oracles: the t distribution against closed forms (df 1-4), printed table values and the binomial identity of the
incomplete beta; the minimum detectable effect against the exact noncentral-t power (numerical integration) and
G*Power's sample size.
"""
import math
import statistics
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "reference_runs"))
import paired  # noqa: E402


# ---- Student t


@pytest.mark.parametrize("df, q975, q80", [
    # t_{0.975}: Abramowitz & Stegun (1964) Table 26.10 / NIST e-Handbook §1.3.6.7.2, to 6 decimals;
    # t_{0.80}: the one-sided 80 % column of the t table of Wikipedia "Student's t-distribution", to 3 decimals
    (1, 12.706205, 1.376), (2, 4.302653, 1.061), (3, 3.182446, 0.978), (4, 2.776445, 0.941),
    (5, 2.570582, 0.920), (10, 2.228139, 0.879), (30, 2.042272, 0.854)])
def test_t_quantiles_against_tables(df, q975, q80):
    assert paired.student_t_quantile(0.975, df) == pytest.approx(q975, abs=6e-7)
    assert paired.student_t_quantile(0.80, df) == pytest.approx(q80, abs=6e-4)
    assert paired.student_t_quantile(0.025, df) == -paired.student_t_quantile(0.975, df)


def test_t_quantile_tends_to_the_normal():
    assert paired.student_t_quantile(0.975, 1e6) == pytest.approx(1.959964, abs=1e-5)


# closed-form CDFs (Wikipedia, "Student's t-distribution", special cases ν = 1, 2, 3, 4)
CLOSED_CDF = {
    1: lambda t: 0.5 + math.atan(t) / math.pi,
    2: lambda t: 0.5 + t / (2 * math.sqrt(2 + t * t)),
    3: lambda t: 0.5 + (t / (math.sqrt(3) * (1 + t * t / 3)) + math.atan(t / math.sqrt(3))) / math.pi,
    4: lambda t: 0.5 + 3 / 8 * t / math.sqrt(1 + t * t / 4) * (1 - t * t / (12 * (1 + t * t / 4))),
}


@given(st.sampled_from([1, 2, 3, 4]), st.floats(-60, 60))
def test_t_cdf_matches_closed_forms(df, t):
    assert paired.student_t_cdf(t, df) == pytest.approx(CLOSED_CDF[df](t), abs=1e-13)


@given(st.floats(0.001, 0.999))
def test_t_quantile_closed_forms_df1_df2(p):
    assert paired.student_t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9, abs=1e-12)
    assert paired.student_t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9,
                                                            abs=1e-12)


@given(st.floats(0.001, 0.999), st.floats(0.5, 200))
def test_t_quantile_inverts_the_cdf(p, df):
    assert paired.student_t_cdf(paired.student_t_quantile(p, df), df) == pytest.approx(p, abs=1e-12)


@given(st.integers(1, 30), st.data(), st.floats(0.0, 1.0))
def test_incomplete_beta_is_a_binomial_tail(n, data, x):
    # I_x(k, n - k + 1) = P[Binomial(n, x) >= k], summed term by term
    k = data.draw(st.integers(1, n))
    tail = math.fsum(math.comb(n, j) * x ** j * (1 - x) ** (n - j) for j in range(k, n + 1))
    assert paired.regularized_incomplete_beta(k, n - k + 1, x) == pytest.approx(tail, abs=1e-13)


def test_t_interval():
    diffs = [0.1, -0.2, 0.5]  # mean 2/15, sd 0.351188; t_{0.975, 2} = 4.302653
    lo, hi = paired.t_interval(diffs)
    half = 4.302653 * statistics.stdev(diffs) / math.sqrt(3)
    assert (lo, hi) == (pytest.approx(2 / 15 - half, abs=1e-6), pytest.approx(2 / 15 + half, abs=1e-6))
    with pytest.raises(ValueError):
        paired.t_interval([1.0])


# ---- power


def exact_paired_t_power(effect, sd, n, alpha=0.05):
    """Power of the two-sided one-sample (paired) t-test: E over V ~ chi2(n-1) of P[|Z + δ√n/sd| > c·sqrt(V/ν)],
    integrated on u = sqrt(V) (density ∝ u^(ν-1) e^(-u²/2), no singularity at 0) by the trapezoid rule."""
    import numpy as np
    nu = n - 1
    c = paired.student_t_quantile(1 - alpha / 2, nu)
    ncp = effect * math.sqrt(n) / sd
    u = np.linspace(0, math.sqrt(nu) + 14, 40001)[1:]
    log_f = (nu - 1) * np.log(u) - u * u / 2 - ((nu / 2 - 1) * math.log(2) + math.lgamma(nu / 2))
    s = c * u / math.sqrt(nu)
    phi = np.vectorize(lambda z: 0.5 * math.erfc(-z / math.sqrt(2)))
    g = np.exp(log_f) * (phi(ncp - s) + phi(-ncp - s))
    return float(np.sum((g[1:] + g[:-1]) / 2 * np.diff(u)) + g[0] / 2 * u[0])


def test_power_integrator_against_gpower():
    # G*Power 3 (Faul et al. 2007), t tests, matched pairs, dz = 0.5, two-sided α = 0.05, power 0.80:
    # total sample size 34, actual power 0.8077775
    assert exact_paired_t_power(0.5, 1.0, 34) == pytest.approx(0.8077775, abs=2e-6)
    assert paired.pairs_needed(0.5, 1.0) == 34


@pytest.mark.parametrize("n, floor", [(2, 0.72), (3, 0.76), (4, 0.78), (5, 0.79), (6, 0.794), (9, 0.794),
                                      (15, 0.794), (30, 0.794)])
def test_minimum_detectable_effect_has_the_power_it_claims(n, floor):
    # the t approximation: the exact power at the MDE is a little below 0.80 at small n (the docstring's numbers)
    power = exact_paired_t_power(paired.minimum_detectable_effect(1.3, n), 1.3, n)
    assert floor <= power <= 0.8005


def test_minimum_detectable_effect_normal():
    # z_{0.975} + z_{0.80} = 1.959964 + 0.841621 (standard normal table)
    assert paired.minimum_detectable_effect(2.0, 16, approx="normal") == pytest.approx(2.801585 * 2 / 4, abs=1e-6)
    assert paired.pairs_needed(0.5, 1.0, approx="normal") == 32  # ceil(2.801585² / 0.25) = ceil(31.4)
    # the t version asks for more pairs, and is at least as large at every n
    for n in range(2, 40):
        assert paired.minimum_detectable_effect(1, n) > paired.minimum_detectable_effect(1, n, approx="normal")


@given(st.floats(0.05, 5), st.floats(0.1, 5))
def test_pairs_needed_is_the_smallest(effect, sd):
    n = paired.pairs_needed(effect, sd)
    assert paired.minimum_detectable_effect(sd, n) <= effect
    assert n == 2 or paired.minimum_detectable_effect(sd, n - 1) > effect
