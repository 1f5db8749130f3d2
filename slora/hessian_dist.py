"""Hessian statistics over torchrun ranks: each rank calibrates on its own shard of the batches, then

    sync():         agree on the shared-input groups, then SUM each group's Σ x xᵀ and token count N into one
                    owner rank (rank 0 in diag mode; bin-packed by d_in² in full mode, llm-compressor's
                    _reduce_hessian_to_target_rank), so a full H is normalised and inverted on one rank only;
    gather_stats(): the owners' HessianStats (vectors of d_in floats) on every rank, as JSON.

The allocation is then computed on rank 0 and broadcast (sensitivity.compute): ranks are compared exactly, and
summation order moves fp32 statistics across world sizes (IST-DASLab/gptq#1, GPTQModel#2055), so the ranks must
not be computed independently from statistics that may differ in the last bit. With one process every function
here returns at once.
"""
from __future__ import annotations

import torch
from torch import nn

from slora import dist


def owners(groups: dict[str, int], mode: str, world: int) -> dict[str, int]:
    """Rank that receives each group's sum. `groups` maps group name -> d_in, in model order.

    diag mode: rank 0 (d_in numbers each; nothing to balance). full mode: largest d_in² first onto the rank with
    the least load so far, ties to the lower rank; deterministic, so every rank computes the same map.
    """
    if mode == "diag":
        return {g: 0 for g in groups}
    load, where = [0] * world, {}
    for g in sorted(groups, key=lambda g: -groups[g]):  # stable: model order among equal d_in
        r = min(range(world), key=lambda r: load[r])
        where[g], load[r] = r, load[r] + groups[g] ** 2
    return where


def sync(hooks, modules: dict[str, nn.Linear]) -> None:
    """Sum every rank's accumulators of `hooks` (hessian._Hooks) into their owner ranks, in place.

    A rank that saw no batch has no accumulators and no sharing map: it adopts the other ranks' map and adds
    zero sums. Ranks that saw batches must agree on which modules share an input (error otherwise, on every
    rank). After the call every accumulator holds the global token count; non-owners' sums are released.
    """
    d = dist.get()
    if d.world == 1:
        return
    maps = dist.all_gather_json(hooks.owner)
    seen = [(r, m) for r, m in enumerate(maps) if m]
    if not seen:
        return  # no rank ran a batch: result() names the modules never called
    for r, m in seen:
        if m != seen[0][1]:
            diff = sorted(k for k in set(m) | set(seen[0][1]) if m.get(k) != seen[0][1].get(k))
            raise RuntimeError(f"ranks {seen[0][0]} and {r} found different shared-input groups during "
                               f"calibration (first: {diff[0]!r}); the model must be the same on every rank")
    hooks.owner = dict(seen[0][1])
    groups = [n for n in modules if hooks.owner.get(n) == n]  # owner names, model order
    for g in groups:
        if g not in hooks.accs:
            hooks.accs[g] = hooks.empty(modules[g])
    tokens = torch.tensor([hooks.accs[g].tokens for g in groups], dtype=torch.int64, device=dist.comm_device())
    dist.all_reduce_sum(tokens)
    where = owners({g: modules[g].in_features for g in groups}, hooks.mode, d.world)
    for i, g in enumerate(groups):
        acc = hooks.accs[g]
        dist.reduce_sum(acc.sum, dst=where[g])
        if acc.x_sum is not None:  # full mode's Σ x (EVA's token mean) adds over ranks like Σ x xᵀ
            dist.reduce_sum(acc.x_sum, dst=where[g])
        acc.tokens = int(tokens[i])
        if where[g] != d.rank:
            acc.release()


def _to_json(st) -> dict:
    out = {k: getattr(st, k) for k in ("owner", "tokens", "dead", "damping", "percdamp", "offdiag_share",
                                       "dominant_rows")}
    out["diag"] = st.diag.tolist()  # float64 -> Python float: exact through JSON
    out["inv_diag"] = None if st.inv_diag is None else st.inv_diag.tolist()
    if st.hessian is not None:
        raise ValueError("keep_hessian is not supported under torchrun (the full H lives on its owner rank only)")
    return out


def gather_stats(stats: dict, modules: dict[str, nn.Linear]) -> dict:
    """Every module's HessianStats on every rank, from the owned subset each rank computed (hessian.reduce_all).

    Modules sharing one input get one shared HessianStats object again (sensitivity.from_stats relies on it).
    """
    from slora.hessian import HessianStats  # hessian imports this module: resolve the cycle at call time

    if dist.get().world == 1:
        return stats
    # one collective on every rank (never a conditional one): the owned statistics and the name -> owner map
    mine = {"stats": {st.owner: _to_json(st) for st in stats.values()},
            "names": {n: st.owner for n, st in stats.items()}}
    by_owner, owner_of = {}, {}
    for part in dist.all_gather_json(mine):
        by_owner.update(part["stats"])
        owner_of.update(part["names"])
    rebuilt = {}
    for own, js in by_owner.items():
        vec = {k: (None if js[k] is None else torch.tensor(js[k], dtype=torch.float64)) for k in ("diag", "inv_diag")}
        rebuilt[own] = HessianStats(**{k: v for k, v in js.items() if k not in vec}, **vec)
    lost = [n for n in modules if n not in owner_of or owner_of[n] not in rebuilt]
    if lost:
        raise RuntimeError(f"Hessian statistics missing after the gather for {lost[:5]}")
    return {n: rebuilt[owner_of[n]] for n in modules}
