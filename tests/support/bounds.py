"""Error bounds for the numeric tests: every tolerance in tests/ is one of these three kinds, derived beside it.

torch's fp32 CPU kernels round differently by SIMD path (AVX-512, AVX2 or the default path, chosen with
ATEN_CPU_CAPABILITY), by thread count and by shape, so no tolerance is a number read off one machine:

- a priori: a sum of n terms, in any order, errs by at most γ_{n-1}·Σ|x_i| with γ_k = k·u / (1 - k·u) and
  u = eps/2 (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., §4.2). Two such sums of the same
  terms in different orders differ by at most 2·γ_{n-1}·Σ|x_i| <= n·eps·Σ|x_i| while n·u < 1/2: `sum_bound`.
  A length-n dot product is the same sum of n rounded products: γ_n·Σ|x_i·y_i|.
- measured: for whole forward passes (a model, a calibration, a training step) an a-priori constant would be far
  too loose to catch anything, so the test runs the same computation in float64 as an oracle and takes the fp32
  result's own error against it (`measured_bound`).
- exact: where both sides run the same operations in the same order on the same values (same shapes, same
  kernels), the results are equal bit for bit on any machine; such comparisons say so.
"""
from __future__ import annotations

import copy
import math

import torch

EPS32 = torch.finfo(torch.float32).eps  # 2^-23; unit roundoff u = eps/2
EPS64 = torch.finfo(torch.float64).eps  # 2^-52
EPS16 = torch.finfo(torch.bfloat16).eps  # 2^-7

# The margin of a measured bound. Two fp32 evaluations a and b of one quantity obey |a - b| <= |a - o| + |b - o|
# against the exact value o. b runs the same operations on the same values with other blocking (another batch
# shape, process, thread count or SIMD path), so its error has the same a-priori bound as a's and, measured, the
# same size: a factor 2 for the two sides, and 2 more for the largest entry of one rounding pattern against another's.
MARGIN = 4.0


def sum_bound(n_terms: int, abs_sum, eps: float = EPS32):
    """Largest difference between two evaluations of a sum of `n_terms` terms in different orders (or between one
    and the exact sum): n·eps·Σ|x_i|, from Higham's γ_{n-1} (module docstring). `abs_sum` may be a tensor."""
    return n_terms * eps * abs_sum


def max_error(got, oracle) -> float:
    """max |got - oracle| over the entries where the oracle is finite (got is compared as float64)."""
    got = torch.as_tensor(got, dtype=torch.float64)
    oracle = torch.as_tensor(oracle, dtype=torch.float64)
    finite = torch.isfinite(oracle)
    return float((got[finite] - oracle[finite]).abs().max()) if finite.any() else 0.0


def scale(oracle) -> float:
    """max |oracle| over its finite entries."""
    oracle = torch.as_tensor(oracle, dtype=torch.float64)
    finite = oracle[torch.isfinite(oracle)]
    return float(finite.abs().max()) if finite.numel() else 0.0


def measured_bound(got, oracle, floor: float | None = None) -> float:
    """Largest difference allowed between `got` (fp32) and another fp32 evaluation of the same quantity by other
    kernels: MARGIN times the larger of got's own error against the float64 `oracle`, measured here, and `floor`,
    an a-priori bound that keeps the bound above 0 where got happens to be exact. The default floor is one
    rounding of the result on each side, eps·max|oracle|. Taken over the whole tensor: an entry that is small
    carries the absolute error of the sums of its larger neighbours, so an elementwise relative tolerance would be
    tuned to one machine."""
    floor = EPS32 * scale(oracle) if floor is None else floor
    return MARGIN * max(max_error(got, oracle), floor)


def float64_bound(got32, oracle64) -> float:
    """The same as `measured_bound` for two float64 evaluations that differ in their order of operations only: the
    same computation in fp32 against float64 measures its rounding error, and rounding errors are first order in
    the unit roundoff, so in float64 the error is EPS64/EPS32 = 2^-29 times that. Floor: one float64 rounding of
    the result on each side."""
    return MARGIN * max(max_error(got32, oracle64) * EPS64 / EPS32, EPS64 * scale(oracle64))


def within(a, b, bound: float) -> bool:
    """|a - b| <= bound entrywise; entries that are not finite must match exactly (inf for a dead input)."""
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape:
        return False
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    close = torch.isfinite(a) & torch.isfinite(b) & ((a - b).abs() <= bound)
    return bool((same | close).all())


def assert_within(a, b, bound: float, what: str = "") -> None:
    """`within`, failing with the largest difference and the bound."""
    if not within(a, b, bound):
        a64 = torch.as_tensor(a, dtype=torch.float64)
        b64 = torch.as_tensor(b, dtype=torch.float64)
        diff = (a64 - b64).abs() if a64.shape == b64.shape else None
        worst = float(diff[torch.isfinite(diff)].max()) if diff is not None and torch.isfinite(diff).any() else math.inf
        raise AssertionError(f"{what}: largest difference {worst:.3g} exceeds the bound {bound:.3g}"
                             if diff is not None else f"{what}: shapes {tuple(a64.shape)} != {tuple(b64.shape)}")


def spread_bound(one, other, floor: float | None = None) -> float:
    """Largest difference allowed between `one` and a third fp32 evaluation, where no float64 oracle can run (a
    whole training run): `other` computes the same quantity from the same examples batched differently (another
    micro-batch split, summed in another order), and its difference from `one` measures how far rounding moves
    the result, amplification through the optimizer steps included. MARGIN times that spread, or `floor` (default:
    one rounding on each side, eps·max|one|), whichever is larger."""
    floor = EPS32 * scale(one) if floor is None else floor
    return MARGIN * max(max_error(other, one), floor)


def pooled_bounds(got: dict, reference: dict) -> dict:
    """Per tensor of a state dict (gradients, an adapter), MARGIN times the largest error of `got` against
    `reference` relative to its tensor's largest entry, pooled over all tensors, times each tensor's largest
    entry; never below one rounding on each side (eps relative). All the tensors come out of the same forward and
    backward passes (and optimizer steps), and one small tensor's error is a noisy estimate of how far rounding
    moves it: the pool of all of them is a steadier one."""
    rel = max(max_error(got[k], reference[k]) / max(scale(reference[k]), 1e-300) for k in reference)
    return {k: MARGIN * max(rel, EPS32) * scale(reference[k]) for k in reference}


def pooled_measured_bounds(got32: dict, oracle64: dict) -> dict:
    """`measured_bound` for every tensor of a state dict, pooled (`pooled_bounds`) over the tensors."""
    return pooled_bounds(got32, oracle64)


def pooled_spread_bounds(one: dict, other: dict) -> dict:
    """`spread_bound` for every tensor of a state dict (an adapter after training), pooled (`pooled_bounds`)."""
    return pooled_bounds(other, one)


def oracles_bound(a, oracle_a, b, oracle_b) -> float:
    """Largest difference allowed between two fp32 results `a` and `b` that compute the same exact value by other
    operations (a LoRA branch against a merged weight, a padded batch against an unpadded one), each with its own
    float64 oracle (the same code on the same inputs in float64). The triangle inequality gives
    |a - b| <= |a - o_a| + |o_a - o_b| + |o_b - b|: the two measured errors, plus the oracles' own difference,
    the same rounding in float64 (2^-29 times the fp32 errors, with MARGIN), plus one rounding of the result.
    Nothing here is a statistical margin. A bug that changes the exact value of one side moves its oracle with it,
    so the comparison still sees it."""
    errors = max_error(a, oracle_a) + max_error(b, oracle_b)
    return errors * (1 + MARGIN * EPS64 / EPS32) + EPS32 * max(scale(oracle_a), scale(oracle_b))


def assert_argmax_decided(logits32: torch.Tensor, logits64: torch.Tensor, what: str = "") -> None:
    """Each row's argmax wins by more than twice the measured bound of the logits (`measured_bound` against the
    same rows in float64): rounding by other kernels (a key/value cache, padding, another batch shape) moves no
    logit by as much, so greedy tokens computed those ways compare exactly. (V,) or (N, V) logits."""
    top2 = logits32.reshape(-1, logits32.shape[-1]).topk(2, dim=-1).values  # (N, 2)
    margin = float((top2[:, 0] - top2[:, 1]).min())
    bound = measured_bound(logits32, logits64)
    assert margin > 2 * bound, f"{what}: a greedy choice wins by {margin:.3g}, within rounding ({2 * bound:.3g})"



def decided_rollout(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding of `n` tokens after the prompt `ids` (1, T) by re-running the whole sequence each step (no
    key/value cache), each choice checked to win by more than rounding (assert_argmax_decided, against the model in
    float64), so that a cached, padded or batched decode of the same prompt must give exactly these tokens."""
    T, seq = ids.shape[1], ids
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
        assert_argmax_decided(model(seq)[0, T - 1:-1], copy.deepcopy(model).double()(seq)[0, T - 1:-1], "rollout")
    return seq
