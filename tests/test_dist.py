"""slora.dist and data-parallel calibration on CPU (gloo): each rank calibrates on a contiguous shard of the
batches, sums are reduced and normalised once, rank 0 allocates and broadcasts.

Stated tolerances: token counts exact; diag(H) and diag(H⁻¹) within rtol 1e-6 of one process (fp32 sums in
another order: a few ulps per addition, far below 1e-6 for these ~100-token sums); ranks exactly equal (they are
computed once, on rank 0); every rank ends with identical results (bitwise: they come from one broadcast).
Process launches cost seconds, so the fast tier holds one launch; the rest is @pytest.mark.slow.
"""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import example, given, strategies as st

from slora import dist, hessian_dist
from tests.dist_launch import launch
from tests.dist_worker import calibrate
from tests.tiny import tiny_model_dir

RTOL = 1e-6


@given(n=st.integers(0, 50), world=st.integers(1, 9))
@example(n=2, world=3)  # fewer items than ranks: the last rank gets nothing
@example(n=0, world=1)
def test_shard_range_is_a_contiguous_disjoint_cover(n, world):
    parts = [dist.shard_range(n, r, world) for r in range(world)]
    assert [i for p in parts for i in p] == list(range(n))  # in order, nothing repeated, nothing padded
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_full_mode_owners_balance_d_in_squared():
    where = hessian_dist.owners({"a": 8, "b": 8, "c": 16, "d": 4}, "full", 2)
    # d_in² loads: c 256 -> rank 0; a 64, b 64, d 16 each go to rank 1, still the lighter (64, 128, 144 < 256)
    assert where == {"c": 0, "a": 1, "b": 1, "d": 1}
    assert set(hessian_dist.owners({"a": 8, "b": 4}, "diag", 3).values()) == {0}


def close(a, b, rtol=RTOL):
    if a is None or b is None:
        return a is b
    return all((x == y) or (math.isfinite(x) and abs(x - y) <= rtol * max(abs(x), abs(y))) for x, y in zip(a, b)) \
        and len(a) == len(b)


def check_against_one_process(tmp_path, kind, world, n_seq, batch, mode):
    model = tiny_model_dir(tmp_path / "m", kind)
    one = calibrate(kind, str(model), n_seq, batch, mode)
    out = tmp_path / "r"
    res = launch(world, ["tests/dist_worker.py", "calib", kind, str(model), str(n_seq), str(batch), mode, str(out)])
    for rank, (rc, text, _) in enumerate(res):
        assert rc == 0, f"rank {rank} failed:\n{text[-3000:]}"
    got = [json.loads((tmp_path / f"r.{r}.json").read_text()) for r in range(world)]
    assert sum(g["batches"] for g in got) == one["batches"]
    assert sum(g["real_tokens"] for g in got) == one["real_tokens"]
    for g in got:
        assert g["tokens"] == one["tokens"]  # exact global token counts on every rank
        assert g["ranks"] == one["ranks"]
        for n in one["diag"]:
            assert close(g["diag"][n], one["diag"][n]), n
            assert close(g["inv_diag"][n], one["inv_diag"][n], rtol=1e-4 if mode == "full" else RTOL), n
        assert g == {**got[0], "batches": g["batches"], "real_tokens": g["real_tokens"]}  # ranks identical
    return got


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
])
def test_ranks_match_one_process(tmp_path, kind, world, n_seq, batch, mode):
    check_against_one_process(tmp_path, kind, world, n_seq, batch, mode)
