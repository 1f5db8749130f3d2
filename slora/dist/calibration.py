"""Calibration over torchrun ranks: the `group` argument of the method's calibration (hessian.Group), built on
slora.dist. Each rank calibrates on its own shard of the batches, then

    sum_hessians(): agree on the shared-input groups, then SUM each group's Σ x xᵀ and token count N into one
                    owner rank (rank 0 in diag mode; bin-packed by d_in² in full mode, llm-compressor's
                    _reduce_hessian_to_target_rank), so a full H is normalised and inverted on one rank only;
    gather_stats(): the owners' HessianStats (vectors of d_in floats) on every rank, as JSON;
    on_main():      the allocation computed on rank 0 and broadcast.

Ranks are compared exactly, and summation order moves fp32 statistics across world sizes (IST-DASLab/gptq#1,
GPTQModel#2055), so the ranks are computed once from the gathered statistics and broadcast, never independently.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from slora.dist import process_group
from slora.method.hessian import HessianAccumulator, HessianStats


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


VECTORS = ("diag", "inv_diag", "spectrum")  # HessianStats fields that are float64 vectors


class CalibrationGroup:
    """The torchrun ranks of slora.dist.process_group as the method's calibration group (hessian.Group)."""

    def __init__(self):
        self.is_main = process_group.get().is_main

    def sum_hessians(self, owner: dict[str, str], accs: dict[str, HessianAccumulator],
                     modules: dict[str, nn.Linear], mode: str, dtype: torch.dtype
                     ) -> tuple[dict[str, str], dict[str, HessianAccumulator]]:
        """A rank that saw no batch has no accumulators and no sharing map: it adopts the other ranks' map and adds
        zero sums. Ranks that saw batches must agree on which modules share an input (error otherwise, on every
        rank). Returns the agreed map and the accumulators this rank owns, holding the sums of all ranks."""
        d = process_group.get()
        maps = process_group.all_gather_json(owner)
        seen = [(r, m) for r, m in enumerate(maps) if m]
        if not seen:
            return owner, accs  # no rank ran a batch: the caller names the modules never called
        for r, m in seen:
            if m != seen[0][1]:
                diff = sorted(k for k in set(m) | set(seen[0][1]) if m.get(k) != seen[0][1].get(k))
                raise RuntimeError(f"ranks {seen[0][0]} and {r} found different shared-input groups during "
                                   f"calibration (first: {diff[0]!r}); the model must be the same on every rank")
        owner = dict(seen[0][1])
        groups = [n for n in modules if owner.get(n) == n]  # owner names, model order
        for g in groups:
            if g not in accs:
                accs[g] = HessianAccumulator(modules[g].in_features, mode, dtype, modules[g].weight.device)
        tokens = torch.tensor([accs[g].tokens for g in groups], dtype=torch.int64, device=process_group.comm_device())
        process_group.all_reduce_sum(tokens)
        where = owners({g: modules[g].in_features for g in groups}, mode, d.world)
        mine = {}
        for i, g in enumerate(groups):
            acc = accs[g]
            process_group.reduce_sum(acc.sum, dst=where[g])
            if acc.x_sum is not None:  # full mode's Σ x (EVA's token mean) adds over ranks like Σ x xᵀ
                process_group.reduce_sum(acc.x_sum, dst=where[g])
            acc.tokens = int(tokens[i])
            if where[g] == d.rank:
                mine[g] = acc  # the sums of other ranks' groups are freed with `accs`
        return owner, mine

    def gather_stats(self, stats: dict[str, HessianStats], modules: dict[str, nn.Linear]
                     ) -> dict[str, HessianStats]:
        """Every module's HessianStats on every rank, from the owned subset each rank computed. Modules sharing one
        input get one shared HessianStats object again (sensitivity.from_stats relies on it)."""
        # one collective on every rank (never a conditional one): the owned statistics and the name -> owner map
        mine = {"stats": {st.owner: _to_json(st) for st in stats.values()},
                "names": {n: st.owner for n, st in stats.items()}}
        by_owner, owner_of = {}, {}
        for part in process_group.all_gather_json(mine):
            by_owner.update(part["stats"])
            owner_of.update(part["names"])
        rebuilt = {}
        for own, js in by_owner.items():
            vec = {k: (None if js[k] is None else torch.tensor(js[k], dtype=torch.float64)) for k in VECTORS}
            rebuilt[own] = HessianStats(**{k: v for k, v in js.items() if k not in vec}, **vec)
        lost = [n for n in modules if n not in owner_of or owner_of[n] not in rebuilt]
        if lost:
            raise RuntimeError(f"Hessian statistics missing after the gather for {lost[:5]}")
        return {n: rebuilt[owner_of[n]] for n in modules}

    def on_main(self, fn):
        """fn() on rank 0 (a JSON-able value), broadcast to every rank."""
        return process_group.broadcast_json(fn() if self.is_main else None)


def _to_json(st: HessianStats) -> dict:
    out = {f.name: getattr(st, f.name) for f in dataclasses.fields(st) if f.name not in VECTORS}
    # float64 -> Python float: exact through JSON
    out |= {k: None if getattr(st, k) is None else getattr(st, k).tolist() for k in VECTORS}
    return out
