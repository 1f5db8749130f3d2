"""slora.data.scores against hand-computed values (the arithmetic is in the comments) and Hypothesis properties.

Oracles: exact fractions worked by hand; for ranks, an O(n²) counting definition; for BLEU/ROUGE, n-gram counts
listed in full. Tolerances: 1e-12 for a few float64 operations, looser only where an affine map adds rounding.
"""
import math

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from slora.data.scores import (GLUE_SCORES, accuracy, average_ranks, bleu, f1, lcs_length, mcc, pearson, rouge1, rouge_l, score, spearman)

TOL = 1e-12

# -----------------------------------------------------------------------------
# Classification

# Binary fixture, pairs (prediction, reference):
#   (1,1) tp  (1,0) fp  (0,0) tn  (0,1) fn  (1,1) tp  (0,0) tn  (1,0) fp  (0,0) tn
#   confusion: tp = 2, fp = 2, fn = 1, tn = 3, n = 8
PRED = [1, 1, 0, 0, 1, 0, 1, 0]
GOLD = [1, 0, 0, 1, 1, 0, 0, 0]


def test_accuracy_by_hand():
    assert accuracy(PRED, GOLD) == pytest.approx(5 / 8, abs=TOL)  # (tp + tn) / n = 5/8


def test_f1_by_hand():
    # 2 tp / (2 tp + fp + fn) = 4 / 7; equivalently P = 2/4, R = 2/3, 2PR/(P+R) = (2/3)/(7/6) = 4/7
    assert f1(PRED, GOLD) == pytest.approx(4 / 7, abs=TOL)


def test_mcc_binary_by_hand():
    # (tp·tn − fp·fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (6 − 2) / sqrt(4·3·5·4) = 4 / sqrt(240)
    assert mcc(PRED, GOLD) == pytest.approx(4 / math.sqrt(240), abs=TOL)


def test_mcc_three_classes_by_hand():
    # pred [0,1,2,0], gold [0,1,1,2]: n = 4, correct c = 2; true counts t = (1,2,1), predicted p = (2,1,1)
    # t·p = 2 + 2 + 1 = 5; (c·n − t·p) = 3; n² − p·p = 16 − 6 = 10; n² − t·t = 16 − 6 = 10  ->  3 / 10
    assert mcc([0, 1, 2, 0], [0, 1, 1, 2]) == pytest.approx(0.3, abs=TOL)


def test_degenerate_conventions():
    assert mcc([1, 1, 1], [0, 1, 0]) == 0.0  # all predictions in one class: denominator 0 -> 0 (sklearn)
    assert mcc([0, 1, 0], [1, 1, 1]) == 0.0  # all references in one class
    assert f1([0, 0], [0, 0]) == 0.0         # no positive anywhere: 2tp + fp + fn = 0 -> 0
    assert mcc([0, 1, 1, 0], [1, 0, 0, 1]) == pytest.approx(-1.0, abs=TOL)  # perfectly wrong


def test_bad_inputs():
    with pytest.raises(ValueError, match="3 predictions but 2 references"):
        accuracy([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="empty"):
        mcc([], [])
    with pytest.raises(ValueError, match=r"item 1 has prediction 2"):
        f1([0, 2], [0, 1])
    with pytest.raises(ValueError, match="unknown score.*'auc'.*known scores"):
        score(["auc"], [0], [0])


labels3 = st.integers(0, 2)
label_pairs = st.integers(1, 30).flatmap(lambda n: st.tuples(st.lists(labels3, min_size=n, max_size=n),
                                                             st.lists(labels3, min_size=n, max_size=n)))


@given(label_pairs)
@example(([0], [0]))
@example(([0, 1, 1, 0], [1, 0, 0, 1]))
def test_mcc_bounded_and_symmetric(pair):
    p, y = pair
    m = mcc(p, y)
    assert -1.0 <= m <= 1.0
    assert m == pytest.approx(mcc(y, p), abs=TOL)  # the formula is symmetric in predictions and references


@given(st.integers(1, 30).flatmap(lambda n: st.tuples(st.lists(st.integers(0, 1), min_size=n, max_size=n),
                                                      st.lists(st.integers(0, 1), min_size=n, max_size=n))))
def test_f1_bounded_and_perfect(pair):
    p, y = pair
    assert 0.0 <= f1(p, y) <= 1.0
    assert f1(y, y) == (1.0 if 1 in y else 0.0)


# -----------------------------------------------------------------------------
# Regression

# x = [1, 2, 2, 4], y = [1, 3, 2, 5]
# Pearson: x̄ = 2.25, ȳ = 2.75; dx = [−1.25, −0.25, −0.25, 1.75], dy = [−1.75, 0.25, −0.75, 2.25]
#   Σ dx·dy = 2.1875 − 0.0625 + 0.1875 + 3.9375 = 6.25; Σ dx² = 4.75; Σ dy² = 8.75  ->  6.25 / sqrt(41.5625)
# Spearman: ranks x = [1, 2.5, 2.5, 4] (the tie shares ranks 2 and 3), ranks y = [1, 3, 2, 4]; both means 2.5
#   dx = [−1.5, 0, 0, 1.5], dy = [−1.5, 0.5, −0.5, 1.5]; Σ dx·dy = 4.5, Σ dx² = 4.5, Σ dy² = 5  ->  4.5/sqrt(22.5)
X = [1.0, 2.0, 2.0, 4.0]
Y = [1.0, 3.0, 2.0, 5.0]


def test_pearson_by_hand():
    assert pearson(X, Y) == pytest.approx(6.25 / math.sqrt(41.5625), abs=TOL)


def test_spearman_with_ties_by_hand():
    assert average_ranks(X).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert spearman(X, Y) == pytest.approx(4.5 / math.sqrt(22.5), abs=TOL)


def test_constant_side_is_nan():
    assert math.isnan(pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert math.isnan(spearman([1.0, 2.0, 3.0], [7.0, 7.0, 7.0]))


def naive_ranks(v):
    """Rank by counting: #{j: v_j < v_i} + (#{j: v_j == v_i} + 1) / 2, the average rank of v_i's tie group."""
    return [sum(w < x for w in v) + (sum(w == x for w in v) + 1) / 2 for x in v]


small_ints = st.integers(-5, 5).map(float)  # few distinct values, so ties are common
vectors = st.lists(small_ints, min_size=3, max_size=20)


@given(vectors)
@example([2.0, 2.0, 2.0])
@example([3.0, 1.0, 2.0, 1.0])
def test_average_ranks_match_counting(v):
    assert average_ranks(v).tolist() == naive_ranks(v)


@given(st.permutations(list(range(8))))
def test_spearman_without_ties_is_classic_formula(perm):
    # no ties: rho = 1 − 6 Σ d² / (n (n² − 1)), d the rank differences
    n = len(perm)
    d2 = sum((i - p) ** 2 for i, p in enumerate(perm))
    assert spearman(list(range(n)), perm) == pytest.approx(1 - 6 * d2 / (n * (n * n - 1)), abs=1e-12)


@given(st.integers(3, 20).flatmap(lambda n: st.tuples(st.lists(small_ints, min_size=n, max_size=n),
                                                      st.lists(small_ints, min_size=n, max_size=n))),
       st.floats(0.25, 8.0), st.floats(-10.0, 10.0))
@example(([0.0, 1.0, 2.0], [0.0, 1.0, 2.0]), 1.0, 0.0)
def test_pearson_affine_invariance(pair, a, b):
    x, y = (np.array(v) for v in pair)
    r = pearson(x, y)
    if math.isnan(r):
        assert len(set(x.tolist())) == 1 or len(set(y.tolist())) == 1
        return
    # r(a·x + b, y) = r(x, y) for a > 0 and −r(x, y) for a < 0; rounding of a·x + b is a few eps per term
    assert pearson(a * x + b, y) == pytest.approx(r, abs=1e-9)
    assert pearson(-a * x + b, y) == pytest.approx(-r, abs=1e-9)
    assert spearman(x, y) == pytest.approx(pearson(naive_ranks(x.tolist()), naive_ranks(y.tolist())), abs=TOL)


# -----------------------------------------------------------------------------
# Generation

# Two-sentence corpus, one reference each (lowercased, whitespace tokens):
#   c1 = "the cat sat on the mat"  r1 = "the cat sat on a mat"         (6 and 6 words)
#   c2 = "a dog barked"            r2 = "the dog barked loudly"        (3 and 4 words)
# 1-grams: c1 {the:2, cat, sat, on, mat}, clipped against r1 {the:1, ...} -> 1+1+1+1+1 = 5 of 6;
#          c2 {a, dog, barked} vs r2 -> dog, barked = 2 of 3.                      p1 = 7/9
# 2-grams: c1 {the cat, cat sat, sat on, on the, the mat} vs r1 {the cat, cat sat, sat on, on a, a mat} -> 3 of 5;
#          c2 {a dog, dog barked} vs r2 {the dog, dog barked, barked loudly} -> 1 of 2.       p2 = 4/7
# 3-grams: c1 {the cat sat, cat sat on, sat on the, on the mat} vs r1 -> the cat sat, cat sat on = 2 of 4;
#          c2 {a dog barked} -> 0 of 1.                                                     p3 = 2/5
# 4-grams: c1 {the cat sat on, cat sat on the, sat on the mat} -> 1 of 3; c2 has none.      p4 = 1/3
# c = 9 < r = 10: BP = exp(1 − 10/9).  BLEU = exp(−1/9) · (7/9 · 4/7 · 2/5 · 1/3)^(1/4) = exp(−1/9) · (8/135)^(1/4)
CANDS = ["the cat sat on the mat", "a dog barked"]
REFS = ["The cat sat on a mat", "the dog barked loudly"]  # capital T: the tokenizer lowercases


def test_bleu4_by_hand():
    assert bleu(CANDS, REFS) == pytest.approx(math.exp(-1 / 9) * (8 / 135) ** 0.25, abs=TOL)


def test_bleu_smoothing():
    # "a b c d" vs "a b c e": p1 = 3/4, p2 = 2/3, p3 = 1/2, p4 = 0/1; c = r = 4 so BP = 1
    assert bleu(["a b c d"], ["a b c e"]) == 0.0  # no smoothing: a zero precision zeroes BLEU
    # floor (Chen & Cherry method 1): p4 = 0.1/1  ->  (3/4 · 2/3 · 1/2 · 0.1)^(1/4) = 0.025^(1/4)
    assert bleu(["a b c d"], ["a b c e"], smooth="floor") == pytest.approx(0.025 ** 0.25, abs=TOL)
    assert bleu(["a b c"], ["a b c"]) == 0.0  # no 4-gram in the candidate corpus at all: no evidence -> 0
    with pytest.raises(ValueError, match="smooth"):
        bleu(["a"], ["a"], smooth="exp")


# ROUGE pair 1: pred "the mat was on the cat" (6), ref "the cat sat on the red mat" (7)
#   ROUGE-1 overlap: the min(2,2) + mat + on + cat = 5 ("was" unmatched) -> F = 2·5 / (6 + 7) = 10/13
#   LCS: "the on the" = 3 (cat and mat come in opposite orders, so at most one of them joins) -> F = 2·3/13 = 6/13
# pair 2: empty prediction -> 0 for both.  Averages over the 2 pairs: ROUGE-1 = 5/13, ROUGE-L = 3/13.
R_PRED = ["the mat was on the cat", ""]
R_REF = ["the cat sat on the red mat", "a description"]


def test_rouge_by_hand():
    assert lcs_length("the mat was on the cat".split(), "the cat sat on the red mat".split()) == 3
    assert rouge1(R_PRED, R_REF) == pytest.approx(5 / 13, abs=TOL)
    assert rouge_l(R_PRED, R_REF) == pytest.approx(3 / 13, abs=TOL)
    assert rouge1(["THE Cat"], ["the cat"]) == 1.0  # lowercased


sentences = st.lists(st.lists(st.sampled_from("a b c d e".split()), min_size=0, max_size=8).map(" ".join),
                     min_size=1, max_size=5)


@given(sentences)
@example(["a b c d"])
def test_identical_corpus_scores_one(corpus):
    if any(len(s.split()) >= 4 for s in corpus):  # a 4-gram exists, so every p_n is defined
        assert bleu(corpus, corpus) == pytest.approx(1.0, abs=TOL)
    for s in corpus:  # ROUGE per pair: identical non-empty sentences score 1, an empty pair 0 (stated convention)
        assert rouge1([s], [s]) == rouge_l([s], [s]) == (1.0 if s else 0.0)


@given(sentences, sentences)
def test_text_metrics_bounded(a, b):
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    for metric in (bleu, rouge1, rouge_l):
        assert 0.0 <= metric(a, b) <= 1.0 + TOL
    assert rouge_l(a, b) <= rouge1(a, b) + TOL  # an LCS is a multiset of matched unigrams


# -----------------------------------------------------------------------------
# score() and the GLUE table


def test_score_combined_and_glue_table():
    out = score(["acc_and_f1", "accuracy"], PRED, GOLD)
    assert list(out) == ["acc_and_f1", "accuracy"]
    assert out["acc_and_f1"] == pytest.approx((5 / 8 + 4 / 7) / 2, abs=TOL)
    sts = score(["pearson_spearman"], X, Y)["pearson_spearman"]
    assert sts == pytest.approx((6.25 / math.sqrt(41.5625) + 4.5 / math.sqrt(22.5)) / 2, abs=TOL)
    assert GLUE_SCORES["cola"][1] == "mcc"
    assert GLUE_SCORES["stsb"][1] == "pearson_spearman"
    assert {GLUE_SCORES[t][1] for t in ("mrpc", "qqp")} == {"acc_and_f1"}
    assert {GLUE_SCORES[t][1] for t in ("sst2", "mnli", "qnli", "rte")} == {"accuracy"}
    for metrics, main in GLUE_SCORES.values():
        assert main in metrics and score(metrics, [0, 1, 1], [0, 1, 0])  # every name is known to score()
