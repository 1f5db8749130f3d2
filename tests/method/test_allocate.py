"""slora.method.allocate: exact budgets, bounds, monotonicity, equivariance, PRA's example, paper rounding, errors."""
import math
import random
from fractions import Fraction

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from tests.support.strategies import MODULE_NAMES, positive_theta, rank_bounds, shapes_for, theta_dicts
from slora.method import allocate as alloc

EPS64 = torch.finfo(torch.float64).eps
PRA_EXAMPLE = {f"w{i}": float(6 - i) for i in range(6)}  # §4.4: six matrices sorted by sensitivity


def check_monotone(theta, ranks):
    for a in theta:
        for b in theta:
            if theta[a] > theta[b]:
                assert ranks[a] >= ranks[b], (a, b)


def check_bounds(ranks, r_min, r_max):
    assert all(r_min <= r <= (math.inf if r_max is None else r_max) for r in ranks.values())


# -----------------------------------------------------------------------------
# SRA (Eq. 15) with exact rounding

@given(theta_dicts(), st.data())
@example(PRA_EXAMPLE, None)
def test_sra_hits_the_rank_budget_exactly_within_bounds_and_monotone(theta, data):
    r_min, r_max, budget = data.draw(rank_bounds(len(theta))) if data else (1, None, 30)
    a = alloc.sra(theta, budget, r_min=r_min, r_max=r_max)
    assert sum(a.ranks.values()) == budget == a.target == a.achieved
    check_bounds(a.ranks, r_min, r_max)
    check_monotone(theta, a.ranks)


@given(theta_dicts(), st.data())
def test_param_units_never_exceed_the_budget_and_miss_by_less_than_one_rank_of_the_largest_module(theta, data):
    """The guarantee: P - max_w (d_in + d_out)_w < Σ_w r_w·(d_in + d_out)_w <= P."""
    shapes = data.draw(shapes_for(list(theta)))
    r_avg = data.draw(st.integers(1, 16))
    r_min = data.draw(st.sampled_from([0, 1]))
    a = alloc.allocate(theta, r_avg, unit="param", shapes=shapes, r_min=r_min)
    cost = {n: sum(shapes[n]) for n in theta}
    spent = sum(a.ranks[n] * cost[n] for n in theta)
    assert a.target == r_avg * sum(cost.values()) and a.achieved == spent
    assert a.target - max(cost.values()) < spent <= a.target
    check_bounds(a.ranks, r_min, None)
    check_monotone(theta, a.ranks)


@given(theta_dicts(min_size=2), st.integers(1, 8), st.randoms(use_true_random=False))
def test_insertion_order_does_not_matter(theta, r_avg, rnd):
    shuffled = dict(sorted(theta.items(), key=lambda kv: rnd.random()))
    for method in ("sra", "pra"):
        assert alloc.allocate(shuffled, r_avg, method=method) == alloc.allocate(theta, r_avg, method=method)


@given(st.lists(positive_theta, min_size=2, max_size=12, unique=True), st.integers(1, 8),
       st.randoms(use_true_random=False))
def test_permutation_equivariance(values, r_avg, rnd):
    """Moving the θ values to other modules moves their ranks with them (distinct θ: equal θ go by name)."""
    names = MODULE_NAMES[:len(values)]
    perm = rnd.sample(names, len(names))
    theta, moved = dict(zip(names, values)), dict(zip(perm, values))
    for method in ("sra", "pra"):
        a, b = alloc.allocate(theta, r_avg, method=method), alloc.allocate(moved, r_avg, method=method)
        assert all(b.ranks[p] == a.ranks[n] for n, p in zip(names, perm))


@given(st.lists(st.integers(1, 9), min_size=1, max_size=10), st.integers(1, 4))
def test_sra_is_eq15_exactly_when_the_quotas_are_integers(weights, scale):
    """θ_w/Σθ·r_total = θ_w·scale when r_total = scale·Σθ: no rounding, no bound, exactly Eq. 15."""
    theta = {MODULE_NAMES[i]: float(w) for i, w in enumerate(weights)}
    total = scale * sum(weights)
    assert alloc.sra(theta, total).ranks == {n: int(t) * scale for n, t in sorted(theta.items())}


def test_water_filling_keeps_eq15_among_modules_off_their_bounds():
    theta = {"a": 100.0, "b": 2.0, "c": 1.0, "d": 1.0}
    a = alloc.sra(theta, 16, r_min=1, r_max=8)
    assert a.ranks == {"a": 8, "b": 4, "c": 2, "d": 2}  # a capped; the other 8 ranks split 2:1:1 as θ


def test_remainder_ties_go_to_larger_theta_then_to_name():
    same_theta = alloc.sra({"b": 1.0, "a": 1.0, "c": 2.0}, 6, r_min=0)  # quotas 1.5, 1.5, 3: a or b?
    assert same_theta.ranks == {"a": 2, "b": 1, "c": 3}
    other_theta = alloc.sra({"a": 1.0, "b": 3.0}, 2, r_min=0)  # quotas 0.5, 1.5: equal remainders
    assert other_theta.ranks == {"a": 0, "b": 2}


# -----------------------------------------------------------------------------
# Paper rounding, PRA, uniform

@given(theta_dicts(), st.integers(1, 8))
def test_paper_rounding_rounds_each_module_and_reports_target_and_achieved(theta, r_avg):
    """r_w = max(1, floor(q_w + 1/2)) with q_w = θ_w/Σθ·r_total (Eq. 15); a quota within 8 eps of a half
    may land on either side, since Eq. 15 is evaluated in floating point."""
    a = alloc.allocate(theta, r_avg, rounding="paper")
    total = sum(Fraction(t) for t in theta.values())
    if a.message is None:
        for n, t in theta.items():
            q = Fraction(t) / total * r_avg * len(theta)  # exact quota
            expected = max(1, math.floor(q + Fraction(1, 2)))
            near_half = abs(q - math.floor(q) - Fraction(1, 2)) <= 8 * EPS64 * q
            assert a.ranks[n] == expected or (near_half and a.ranks[n] == max(1, expected - 1))
    assert a.target == r_avg * len(theta) and a.achieved == sum(a.ranks.values())


def test_pra_reproduces_the_papers_example():
    a = alloc.allocate(PRA_EXAMPLE, 5, method="pra", categories=3)
    assert [a.ranks[f"w{i}"] for i in range(6)] == [6, 6, 5, 5, 4, 4]
    names = random.Random(0).sample([f"layer.{i}" for i in range(6)], 6)  # same with names in any order
    b = alloc.allocate(dict(zip(names, PRA_EXAMPLE.values())), 5, method="pra")
    assert [b.ranks[n] for n in names] == [6, 6, 5, 5, 4, 4]


@given(theta_dicts(), st.integers(1, 5), st.data())
def test_pra_budget_bounds_and_monotone(theta, categories, data):
    r_min, r_max, budget = data.draw(rank_bounds(len(theta)))
    a = alloc.pra(theta, budget, categories=categories, r_min=r_min, r_max=r_max)
    assert sum(a.ranks.values()) == budget
    check_bounds(a.ranks, r_min, r_max)
    check_monotone(theta, a.ranks)


@given(st.integers(1, 9), st.integers(2, 12), st.sampled_from([1, 3, 5]))
def test_pra_with_equal_groups_and_odd_c_is_the_offset_rule(group, r_avg, categories):
    n = group * categories
    theta = {f"m{i:02d}": float(n - i) for i in range(n)}
    a = alloc.allocate(theta, r_avg, method="pra", categories=categories, r_min=0)
    assert [a.ranks[f"m{i:02d}"] for i in range(n)] == [r_avg + (categories - 1) // 2 - i // group
                                                        for i in range(n)]


@given(st.lists(st.sampled_from(MODULE_NAMES), min_size=1, max_size=12, unique=True), st.integers(0, 8))
def test_uniform_gives_r_avg_everywhere(names, r_avg):
    a = alloc.allocate({n: float(i + 1) for i, n in enumerate(names)}, r_avg, method="uniform", r_min=0)
    assert set(a.ranks.values()) <= {r_avg} and a.message is None


@pytest.mark.parametrize("method", ["sra", "pra"])
def test_degenerate_theta_falls_back_to_uniform_and_says_why(method):
    equal = alloc.allocate({n: 0.3 for n in "abcd"}, 3, method=method)
    assert equal.ranks == dict.fromkeys("abcd", 3) and "equal" in equal.message
    zero = alloc.allocate({n: 0.0 for n in "abcd"}, 3, method=method)
    assert zero.ranks == dict.fromkeys("abcd", 3) and "σ = 0" in zero.message
    odd = alloc.allocate({n: 1.0 for n in "abc"}, 4 / 3, method=method)  # 4 ranks for 3: remainder by name
    assert odd.ranks == {"a": 2, "b": 1, "c": 1} and odd.message


def test_rank_zero_is_allowed():
    a = alloc.sra({"a": 1.0, "b": 1000.0}, 4, r_min=0)
    assert a.ranks == {"a": 0, "b": 4}


# -----------------------------------------------------------------------------
# Errors name the culprit

@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_invalid_theta_is_an_error_naming_the_module(bad):
    with pytest.raises(ValueError, match=r"layers\.2\.mlp\.up_proj"):
        alloc.allocate({"layers.0.attn.q_proj": 1.0, "layers.2.mlp.up_proj": bad}, 4)


def test_infeasible_budgets_are_errors_naming_modules():
    theta = {"layers.0.q": 1.0, "layers.0.v": 2.0}
    with pytest.raises(ValueError, match=r"r_min.*layers\.0\.q"):
        alloc.sra(theta, 3, r_min=2)
    with pytest.raises(ValueError, match=r"r_max.*layers\.0\.q"):
        alloc.sra(theta, 9, r_max=4)
    with pytest.raises(ValueError, match=r"layers\.0\.v"):
        alloc.sra(theta, 9, r_max={"layers.0.q": 8, "layers.0.v": 0})
    with pytest.raises(ValueError, match="not a non-negative integer"):
        alloc.allocate({"a": 1.0}, 2.5)  # 2.5 ranks for one module
    with pytest.raises(ValueError, match="paper"):
        alloc.allocate(theta, 2, method="pra", rounding="paper")
