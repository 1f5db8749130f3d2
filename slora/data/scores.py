"""Task scores: accuracy, F1, MCC, Pearson, Spearman, corpus BLEU-4, ROUGE-1 and ROUGE-L.

Pure functions of two equal-length sequences (predictions first, references second), computed in float64 (or exact
integer counts) and returned as Python floats. No scikit-learn, scipy, nltk or sacrebleu: every convention that
those libraries leave implicit is written in the docstring that uses it.

GLUE conventions (Wang et al., 2019, "GLUE", §3 and Table 1; transformers' `glue_compute_metrics`):
CoLA reports Matthews correlation; STS-B the Pearson and Spearman correlations, ranked by their mean; MRPC and QQP
accuracy and F1, ranked by their mean; every other task accuracy. `GLUE_SCORES` below holds that table, and
`score()` computes any list of score names, including the two means.

Text scores (BLEU-4, ROUGE) share one tokenizer, `words()`: lowercase, then split on runs of whitespace.
Punctuation stays attached to its word ("film," and "film" differ), as in a plain `str.split`.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import numpy as np


def _check_pair(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if len(predictions) == 0:
        raise ValueError("cannot score an empty set of predictions")


# -----------------------------------------------------------------------------
# Classification: accuracy, F1, Matthews correlation


def accuracy(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Fraction of exact matches, (1/n) * sum_i [p_i == y_i]."""
    _check_pair(predictions, references)
    return sum(int(p) == int(y) for p, y in zip(predictions, references)) / len(references)


def _binary_counts(predictions: Sequence[int], references: Sequence[int]) -> tuple[int, int, int, int]:
    """(tp, fp, fn, tn) with 1 as the positive class; any label other than 0 or 1 is an error."""
    tp = fp = fn = tn = 0
    for i, (p, y) in enumerate(zip(predictions, references)):
        p, y = int(p), int(y)
        if p not in (0, 1) or y not in (0, 1):
            raise ValueError(f"binary score needs labels in {{0, 1}}; item {i} has prediction {p}, reference {y}")
        tp += p == 1 and y == 1
        fp += p == 1 and y == 0
        fn += p == 0 and y == 1
        tn += p == 0 and y == 0
    return tp, fp, fn, tn


def f1(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Binary F1 of the positive class 1: 2·tp / (2·tp + fp + fn).

    This equals the harmonic mean of precision tp/(tp+fp) and recall tp/(tp+fn). When there is no positive
    prediction and no positive reference (2·tp + fp + fn = 0) F1 is 0, scikit-learn's `zero_division` result.
    """
    _check_pair(predictions, references)
    tp, fp, fn, _ = _binary_counts(predictions, references)
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else 2 * tp / denom


def mcc(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Matthews correlation coefficient, multi-class form (Gorodkin, 2004), as scikit-learn computes it.

    With confusion counts C[y, p], n = sum C, c = trace C, t_k = sum_p C[k, p] (true), p_k = sum_y C[y, k]
    (predicted):  MCC = (c·n − t·p) / sqrt((n² − p·p)(n² − t·t)).
    For two classes this is (tp·tn − fp·fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)). The sums are exact integers;
    only the final division is floating point. When the denominator is 0 (all predictions, or all references,
    in one class) MCC is 0, scikit-learn's convention. The result lies in [−1, 1].
    """
    _check_pair(predictions, references)
    true, pred = Counter(), Counter()
    correct = 0
    for p, y in zip(predictions, references):
        p, y = int(p), int(y)
        true[y] += 1
        pred[p] += 1
        correct += p == y
    n = len(references)
    t_dot_p = sum(true[k] * pred[k] for k in true)
    cov_yp = correct * n - t_dot_p
    cov_pp = n * n - sum(v * v for v in pred.values())
    cov_yy = n * n - sum(v * v for v in true.values())
    if cov_pp == 0 or cov_yy == 0:
        return 0.0
    # Python ints are exact, so the product cannot overflow before the square root.
    return max(-1.0, min(1.0, cov_yp / math.sqrt(cov_pp * cov_yy)))


# -----------------------------------------------------------------------------
# Regression: Pearson and Spearman correlation


def pearson(predictions: Sequence[float], references: Sequence[float]) -> float:
    """Pearson's r = sum (x−x̄)(y−ȳ) / sqrt(sum (x−x̄)² · sum (y−ȳ)²), in float64.

    Undefined when either side is constant (a zero sum of squares): the result is then NaN, as in scipy, and
    the caller decides (a constant regressor has no correlation to report). Clipped to [−1, 1] against rounding.
    """
    _check_pair(predictions, references)
    x = np.asarray(predictions, dtype=np.float64)
    y = np.asarray(references, dtype=np.float64)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("pearson: predictions and references must be finite")
    dx, dy = x - x.mean(), y - y.mean()
    sxx, syy = float(dx @ dx), float(dy @ dy)
    if sxx == 0.0 or syy == 0.0:
        return float("nan")
    return float(np.clip((dx @ dy) / math.sqrt(sxx * syy), -1.0, 1.0))


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks in float64; tied values share the mean of the ranks they span ("average" method).

    Example: [10, 20, 20, 30] -> [1, 2.5, 2.5, 4].
    """
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v), dtype=np.float64)
    sv = v[order]
    start = 0
    for end in range(1, len(v) + 1):
        # a run of equal sorted values ends at `end`; its members get the mean of ranks start+1 .. end
        if end == len(v) or sv[end] != sv[start]:
            ranks[order[start:end]] = (start + 1 + end) / 2.0
            start = end
    return ranks


def spearman(predictions: Sequence[float], references: Sequence[float]) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks (ties handled as in `average_ranks`).

    NaN when either side is constant, as `pearson`.
    """
    _check_pair(predictions, references)
    return pearson(average_ranks(predictions), average_ranks(references))


# -----------------------------------------------------------------------------
# Generation: corpus BLEU-4 and per-sentence ROUGE-1 / ROUGE-L


def words(text: str) -> list[str]:
    """The tokenizer of every text score here: lowercase, split on whitespace."""
    return text.lower().split()


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu(predictions: Sequence[str], references: Sequence[str], max_n: int = 4, smooth: str = "none") -> float:
    """Corpus-level BLEU (Papineni et al., 2002) with one reference per sentence and uniform weights 1/max_n.

    For each order n, p_n = (sum over sentences of clipped n-gram matches) / (sum of candidate n-grams), the
    clipping being min(count in candidate, count in reference). BLEU = BP · exp((1/N) sum_n log p_n), with the
    brevity penalty BP = 1 if c > r else exp(1 − r/c), c and r the total candidate and reference lengths
    (words, tokenized by `words`).

    smooth="none" (sacrebleu's `smooth_method="none"`): any p_n = 0 makes BLEU 0.
    smooth="floor": Chen & Cherry (2014) method 1, NLTK's `method1`: an order with zero matches counts 0.1
    matches instead (p_n = 0.1 / candidate n-grams). Useful on tiny corpora where no 4-gram matches.
    Under either option BLEU is 0 when the candidate corpus is empty or has no n-gram of some order n ≤ max_n
    (p_n = 0/0 carries no evidence). Returns a fraction in [0, 1], not the ×100 of sacrebleu's report.
    """
    _check_pair(predictions, references)
    if smooth not in ("none", "floor"):
        raise ValueError(f"bleu: smooth must be 'none' or 'floor', got {smooth!r}")
    matches, totals = [0] * max_n, [0] * max_n
    c = r = 0
    for pred, ref in zip(predictions, references):
        p, y = words(pred), words(ref)
        c, r = c + len(p), r + len(y)
        for n in range(1, max_n + 1):
            cand, refc = _ngrams(p, n), _ngrams(y, n)
            matches[n - 1] += sum(min(k, refc[g]) for g, k in cand.items())
            totals[n - 1] += max(len(p) - n + 1, 0)
    if c == 0 or min(totals) == 0:
        return 0.0
    log_p = 0.0
    for m, t in zip(matches, totals):
        if m == 0:
            if smooth == "none":
                return 0.0
            m = 0.1
        log_p += math.log(m / t) / max_n
    bp = 1.0 if c > r else math.exp(1.0 - r / c)
    return bp * math.exp(log_p)


def _f_measure(overlap: float, n_pred: int, n_ref: int) -> float:
    """F1 of precision overlap/n_pred and recall overlap/n_ref; 0 when the overlap is 0 or a side is empty."""
    if overlap == 0 or n_pred == 0 or n_ref == 0:
        return 0.0
    p, r = overlap / n_pred, overlap / n_ref
    return 2 * p * r / (p + r)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, by the O(len(a)·len(b)) dynamic programme with one row."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, yj in enumerate(b, start=1):
            # row[j] still holds the previous row's value until it is overwritten here
            prev_diag, row[j] = row[j], prev_diag + 1 if x == yj else max(row[j], row[j - 1])
    return row[-1]


def rouge1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """ROUGE-1 F-measure (Lin, 2004), per sentence and then averaged over sentences.

    Per pair: overlap = sum over words w of min(count_pred(w), count_ref(w)); P = overlap/|pred|,
    R = overlap/|ref|, F = 2PR/(P+R) (beta = 1, as Google's `rouge-score`). A pair with an empty side scores 0.
    No stemming, no stop-word removal; tokens from `words`.
    """
    _check_pair(predictions, references)
    total = 0.0
    for pred, ref in zip(predictions, references):
        p, y = Counter(words(pred)), Counter(words(ref))
        overlap = sum(min(k, y[w]) for w, k in p.items())
        total += _f_measure(overlap, sum(p.values()), sum(y.values()))
    return total / len(references)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """ROUGE-L F-measure (Lin, 2004, §3.1, sentence level), averaged over sentences.

    Per pair: P = LCS/|pred|, R = LCS/|ref|, F = 2PR/(P+R) with beta = 1 (the `rouge-score` F-measure; Lin's
    paper leaves beta open). A pair with an empty side scores 0. Tokens from `words`.
    """
    _check_pair(predictions, references)
    total = 0.0
    for pred, ref in zip(predictions, references):
        p, y = words(pred), words(ref)
        total += _f_measure(lcs_length(p, y), len(p), len(y))
    return total / len(references)


# -----------------------------------------------------------------------------
# Metric names, GLUE's table and the one-call `score`

# name -> function(predictions, references); the keys are the names used in task specs and in metrics.json.
SCORES = {
    "accuracy": accuracy,
    "f1": f1,
    "mcc": mcc,
    "pearson": pearson,
    "spearman": spearman,
    "bleu4": bleu,
    "rouge1": rouge1,
    "rougeL": rouge_l,
}
# Means that GLUE ranks by (Wang et al., 2019): name -> the scores averaged.
COMBINED = {
    "acc_and_f1": ("accuracy", "f1"),
    "pearson_spearman": ("pearson", "spearman"),
}

# GLUE task -> (scores reported, main score). The main score is the one model selection and tables use.
GLUE_SCORES = {
    "cola": (("mcc",), "mcc"),
    "sst2": (("accuracy",), "accuracy"),
    "mrpc": (("accuracy", "f1", "acc_and_f1"), "acc_and_f1"),
    "stsb": (("pearson", "spearman", "pearson_spearman"), "pearson_spearman"),
    "qqp": (("accuracy", "f1", "acc_and_f1"), "acc_and_f1"),
    "mnli": (("accuracy",), "accuracy"),
    "qnli": (("accuracy",), "accuracy"),
    "rte": (("accuracy",), "accuracy"),
}


def score(names: Sequence[str], predictions: Sequence, references: Sequence) -> dict[str, float]:
    """{name: value} for each requested score, in the order asked.

    A combined name (`acc_and_f1`, `pearson_spearman`) is the plain mean of its parts, computed whether or not
    the parts were also requested (and NaN if a part is NaN). An unknown name is an error listing the known ones.
    """
    known = list(SCORES) + list(COMBINED)
    unknown = [m for m in names if m not in known]
    if unknown:
        raise ValueError(f"unknown score(s) {unknown}; known scores: {known}")
    cache: dict[str, float] = {}

    def one(name: str) -> float:
        if name not in cache:
            cache[name] = SCORES[name](predictions, references)
        return cache[name]

    return {m: (sum(one(p) for p in COMBINED[m]) / len(COMBINED[m]) if m in COMBINED else one(m))
            for m in names}
