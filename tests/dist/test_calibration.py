"""Calibration over torchrun ranks on CPU (gloo), slora.dist.calibration: each rank calibrates on a contiguous shard
of the batches, sums are reduced and normalised once on an owner rank, rank 0 allocates and broadcasts.

Stated tolerances: token counts exact; ranks exactly equal (they are computed once, on rank 0); every rank ends
with identical results (bitwise: they come from one broadcast). diag(H) and diag(H⁻¹) are compared with one process
against an error bound measured in the test (`fp32_bound`): the ranks run the forward in other processes with
other thread counts, and fp32 kernels round differently by thread count, shape and SIMD path, so the activations
themselves differ, not only the order of the sums. The bound is tests.support.bounds.measured_bound: MARGIN (4)
times the one-process fp32 error against a float64 oracle (the same model and batches in float64), never less
than N·eps·max|H_jj| (`sum_bound` of a sum of N tokens), taken per module over the whole vector: an input feature
whose x_j is small carries the absolute error of its layer, so an elementwise relative tolerance would be tuned
to one machine. A wrong reduction (a batch counted twice or missed, a wrong N) moves diag(H) by O(1), far above
it.
"""
from __future__ import annotations

import json

import pytest
import torch

from slora.dist import calibration
from tests.support.bounds import measured_bound, scale, sum_bound, within
from tests.support.dist_launch import launch
from tests.support.dist_worker import calibrate
from tests.support.tiny import tiny_model_dir


def test_full_mode_owners_balance_d_in_squared():
    where = calibration.owners({"a": 8, "b": 8, "c": 16, "d": 4}, "full", 2)
    # d_in² loads: c 256 -> rank 0; a 64, b 64, d 16 each go to rank 1, still the lighter (64, 128, 144 < 256)
    assert where == {"c": 0, "a": 1, "b": 1, "d": 1}
    assert set(calibration.owners({"a": 8, "b": 4}, "diag", 3).values()) == {0}


def fp32_bound(one: list, oracle: list, tokens: int) -> float:
    """Largest difference allowed between two fp32 results of one module's vector: MARGIN times the larger of the
    one-process fp32 error against the float64 oracle (the forward's own error, measured here) and the a-priori
    bound N·eps·max|v| of a sum of N tokens. Entries that are +inf (dead inputs of diag(H⁻¹)) must match exactly."""
    return measured_bound(one, oracle, floor=sum_bound(tokens, scale(oracle)))


def close(a, b, bound: float) -> bool:
    if a is None or b is None:
        return a is b
    return within(a, b, bound)


def check_against_one_process(tmp_path, kind, world, n_seq, batch, mode):
    model = tiny_model_dir(tmp_path / "m", kind)
    one = calibrate(kind, str(model), n_seq, batch, mode)
    oracle = calibrate(kind, str(model), n_seq, batch, mode, dtype=torch.float64)
    out = tmp_path / "r"
    res = launch(world, ["tests/support/dist_worker.py", "calib", kind, str(model), str(n_seq), str(batch), mode, str(out)])
    for rank, (rc, text, _) in enumerate(res):
        assert rc == 0, f"rank {rank} failed:\n{text[-3000:]}"
    got = [json.loads((tmp_path / f"r.{r}.json").read_text()) for r in range(world)]
    assert sum(g["batches"] for g in got) == one["batches"]
    assert sum(g["real_tokens"] for g in got) == one["real_tokens"]
    for g in got:
        assert g["tokens"] == one["tokens"]  # exact global token counts on every rank
        assert g["ranks"] == one["ranks"]
        for n in one["diag"]:
            for key in ("diag", "inv_diag"):
                if one[key][n] is None:
                    assert g[key][n] is None, (key, n)
                    continue
                bound = fp32_bound(one[key][n], oracle[key][n], one["tokens"][n])
                assert close(g[key][n], one[key][n], bound), (key, n, bound)
        assert g == {**got[0], "batches": g["batches"], "real_tokens": g["real_tokens"]}  # ranks identical
    return got


@pytest.mark.slow
def test_two_ranks_uneven_padded_encoder_diag(tmp_path):
    got = check_against_one_process(tmp_path, "encoder", 2, n_seq=7, batch=2, mode="diag")  # 4 batches: 2 + 2
    assert [g["batches"] for g in got] == [2, 2]


@pytest.mark.slow
@pytest.mark.parametrize("kind,world,n_seq,batch,mode", [
    ("encoder", 3, 9, 2, "diag"),   # 5 batches: 2, 2, 1
    ("encoder", 3, 3, 2, "full"),   # 2 batches: rank 2 calibrates nothing
    ("decoder", 2, 7, 3, "full"),   # streamed layer by layer, H reduced per layer to its owner
    ("decoder", 3, 5, 1, "diag"),
    ("decoder", 1, 5, 2, "diag"),   # torchrun with one process
    ("encoder", 2, 6, 2, "eva"),    # EVA: each H's spectrum on its owner rank, gathered like diag(H)
    ("decoder", 3, 7, 3, "eva"),    # ... streamed layer by layer
])
def test_ranks_match_one_process(tmp_path, kind, world, n_seq, batch, mode):
    check_against_one_process(tmp_path, kind, world, n_seq, batch, mode)
