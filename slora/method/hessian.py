"""Layer-wise Hessians of nn.Linear inputs from a calibration set: the statistics behind Sensitivity-LoRA.

Reference: Sensitivity-LoRA (arXiv 2509.09119) §4.6 and App. E, which take the GPTQ/OBS layer Hessian
H = 2·X·Xᵀ (Frantar et al. 2022, IST-DASLab/gptq gptq.py) as the Hessian of each weight matrix. For a linear
layer y = W·x with W of shape (d_out, d_in), every output row shares this (d_in, d_in) matrix.

    calibration batches --hooks on target nn.Linear inputs--> HessianAccumulator (Σ x xᵀ and N, fp32)
                        --[several processes: `group.sum_hessians`]--> H = (2/N)·Σ x xᵀ
                        --reduce()--> HessianStats: diag(H), diag(H⁻¹), damping, dominance   (metrics.py)

Several processes (torchrun) are the caller's business: a `group` argument (the `Group` protocol below) sums the
accumulators over processes. Without one, everything stays in this process.

Two passes are provided:
- `collect`: one forward pass with hooks on every target; simple, for models whose Hessians fit together.
- `collect_streaming`: GPTQ-style, block by block over cached block inputs; only one block's Hessians live at a
  time, which is what full mode needs at LLaMA scale (about 0.7 GB of fp32 H per LLaMA-7B layer).
Shape legend: B batch, T sequence, d_in / d_out the Linear's input / output features, N tokens.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol, Sequence

import torch
from torch import nn

from slora.method import eva
from slora.method.cholesky import cholesky_inverse_factor, dominance

Progress = Callable[[str, int, "int | None"], None]  # (stage, done, total or None)


# -----------------------------------------------------------------------------
# Target selection


# -----------------------------------------------------------------------------
# Accumulation

class HessianAccumulator:
    """Per-token mean H = (2/N)·Σ_t x_t x_tᵀ over calibration tokens, shape (d_in, d_in).

    mode "full" keeps the whole matrix (d_in² numbers); mode "diag" keeps only diag(H) = (2/N)·Σ_t x_t²
    (d_in numbers), which is all the paper's metrics (Eqs. 8-10) use. N counts tokens, not sequences, as
    GPTQModel does, so H is comparable across calibration sets of different lengths. The fp32 sum Σ x xᵀ and
    the count N are kept apart and normalised once, when `value` is first read (GPTQModel's
    materialize_global_hessian): so the sums of several ranks add exactly, which a running mean (GPTQ's
    add_batch) would not allow without re-weighting. No batch may be added after `value` was read.

    Speed (the calibration pass should cost little more than the forward pass it rides on):
    - "diag" reduces Σ_t x_t² straight from the activations in the accumulator dtype, with no converted copy;
    - "full" computes only the (tile × tile) blocks of XᵀX on and above the diagonal (H is symmetric: the
      blocks below are mirrored when `value` is read), about 60 % of the FLOPs of the whole product;
    - on CUDA, bf16/fp16 activations go through a half-precision GEMM with fp32 output: a product of two bf16
      numbers is exact in fp32 and the GEMM accumulates in fp32, so this is fp32 accumulation of the same
      activations, at tensor-core speed.
    """

    def __init__(self, d_in: int, mode: str = "full", dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, tile: int = 2048):
        if mode not in ("full", "diag"):
            raise ValueError(f"mode must be 'full' or 'diag', got {mode!r}")
        shape = (d_in, d_in) if mode == "full" else (d_in,)
        self.mode, self.dtype, self.tokens, self.tile = mode, dtype, 0, tile
        self._h = torch.zeros(shape, dtype=dtype, device=device)  # Σ x xᵀ until normalised, then H
        self._mirrored = True  # False while the lower triangle is stale
        self._normalised = False
        # full mode also keeps Σ x (d_in,) for the token mean µ: EVA's covariance is H/2 - µµᵀ (slora.method.eva); the
        # O(n·d_in) sum costs nothing beside the O(n·d_in²) Gram
        self.x_sum = torch.zeros(d_in, dtype=dtype, device=device) if mode == "full" else None

    @property
    def value(self) -> torch.Tensor:
        """diag(H) (d_in,) in "diag" mode, the whole symmetric H (d_in, d_in) in "full" mode."""
        if not self._mirrored:  # copy the upper triangle onto the lower: H is then exactly symmetric
            d, t = self._h.shape[0], self.tile
            for i0 in range(0, d, t):
                blk = self._h[i0:i0 + t, i0:i0 + t]
                blk.copy_(blk.triu() + blk.triu(1).T)  # a GEMM's diagonal block is symmetric only to rounding
                for j0 in range(i0 + t, d, t):
                    self._h[j0:j0 + t, i0:i0 + t] = self._h[i0:i0 + t, j0:j0 + t].T
            self._mirrored = True
        if not self._normalised:
            if self.tokens:  # no tokens: H stays 0, as every dead input's H_jj
                self._h.mul_(2.0 / self.tokens)
            self._normalised = True
        return self._h

    @property
    def sum(self) -> torch.Tensor:
        """The raw Σ x xᵀ (upper block triangle in "full" mode), for the reduction over ranks."""
        if self._normalised:
            raise RuntimeError("the Hessian was already normalised; reduce the sums over ranks first")
        return self._h

    @property
    def mean(self) -> torch.Tensor | None:
        """Token mean µ = Σ x / N (d_in,) in "full" mode (0 before any token), None in "diag" mode."""
        if self.x_sum is None:
            return None
        return self.x_sum / self.tokens if self.tokens else torch.zeros_like(self.x_sum)

    def add_batch(self, x: torch.Tensor) -> None:
        """Add n tokens, x of shape (n, d_in) (already stripped of masked tokens)."""
        n = x.shape[0]
        if self._normalised:
            raise RuntimeError("add_batch after the Hessian value was read")
        if n == 0:  # a fully masked batch carries no information; skipping keeps N a true token count
            return
        x = x.to(self._h.device)
        if self.mode == "diag":
            # ‖x_:,j‖² per feature, reduced in the accumulator dtype from x as it is (no fp32 copy of x)
            self._h.add_(torch.linalg.vector_norm(x, 2, dim=0, dtype=self.dtype).square())  # (d_in,)
        else:
            self._add_gram(x)
            self.x_sum.add_(x.sum(0, dtype=self.dtype))
        self.tokens += n

    def _add_gram(self, x: torch.Tensor) -> None:
        """Σ ← Σ + XᵀX on the upper block triangle, x (n, d_in)."""
        half = x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and self.dtype == torch.float32
        if not half:
            x = x.to(self.dtype)
        d, t = x.shape[1], self.tile
        for i0 in range(0, d, t):
            xi = x[:, i0:i0 + t]  # (n, t): a strided view, no copy
            for j0 in range(i0, d, t):
                blk = self._h[i0:i0 + t, j0:j0 + t]  # (t, t) view into H
                if half:
                    blk.add_(torch.mm(xi.T, x[:, j0:j0 + t], out_dtype=torch.float32))
                else:
                    blk.addmm_(xi.T, x[:, j0:j0 + t])  # (t, n) @ (n, t)
        self._mirrored = False

    def diag(self) -> torch.Tensor:
        return self.value.diagonal() if self.mode == "full" else self.value


class Group(Protocol):
    """How the statistics of several processes that calibrate on shards of the batches are combined (torchrun).

    The method never imports a process group: the caller passes an object with these methods (slora.dist's
    calibration group), or None for one process. Every process calls them in the same order."""

    is_main: bool  # the process that computes the allocation

    def sum_hessians(self, owner: dict[str, str], accs: dict[str, "HessianAccumulator"],
                     modules: dict[str, nn.Linear], mode: str, dtype: torch.dtype
                     ) -> tuple[dict[str, str], dict[str, "HessianAccumulator"]]:
        """Agree on the shared-input map `owner` (module -> the module whose accumulator it uses), add every
        process's sums of each accumulator into one process (its owner there), and return the agreed map and the
        accumulators this process now holds, summed."""

    def gather_stats(self, stats: dict[str, "HessianStats"], modules: dict[str, nn.Linear]
                     ) -> dict[str, "HessianStats"]:
        """Every module's statistics on every process, from the part each process reduced."""

    def on_main(self, fn: Callable[[], object]) -> object:
        """fn() computed on the main process only, its result (plain JSON-able data) given to every process."""


class _Hooks:
    """Forward pre-hooks that feed target inputs into shared accumulators; removed by close().

    Sharing is found by tensor identity in each forward call: a module whose input is the very tensor another
    target already consumed in this batch (q/k/v, gate/up) joins that module's accumulator, so the input is
    counted once. Weak references keep identity checks safe without holding activations alive.
    """

    def __init__(self, mode: str, dtype: torch.dtype):
        self.mode, self.dtype = mode, dtype
        self.accs: dict[str, HessianAccumulator] = {}  # owner name -> accumulator
        self.owner: dict[str, str] = {}  # module name -> owner name
        self.mask: torch.Tensor | None = None
        self.seen: dict[int, tuple[weakref.ref, str]] = {}
        self.handles: list = []

    def attach(self, modules: dict[str, nn.Linear]) -> None:
        for n, m in modules.items():
            self.handles.append(m.register_forward_pre_hook(self._hook(n)))

    def start_batch(self, mask: torch.Tensor | None) -> None:
        # a mask of all ones selects every token: decided once per batch, so hooks then skip the index copy
        self.mask, self.all_real, self.seen = mask, mask is None or bool(mask.all()), {}

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            hit = self.seen.get(id(x))
            if hit is not None and hit[0]() is x:  # same tensor as an earlier target this batch: shared input
                if self.owner.setdefault(name, hit[1]) != hit[1]:
                    raise RuntimeError(f"{name}: input shared with {hit[1]} now but with {self.owner[name]} "
                                       "in an earlier batch; shared-input detection needs a fixed call order")
                return
            own = self.owner.setdefault(name, name)
            if own != name:
                raise RuntimeError(f"{name}: shared its input with {own} in an earlier batch but received a "
                                   "distinct tensor now; shared-input detection needs a fixed call order")
            if name not in self.accs:
                self.accs[name] = HessianAccumulator(x.shape[-1], self.mode, self.dtype, x.device)
            self.seen[id(x)] = (weakref.ref(x), name)
            self.accs[name].add_batch(_tokens(name, x, self.mask, self.all_real))
        return hook

    def empty(self, module: nn.Linear) -> HessianAccumulator:
        """An accumulator with no tokens for `module` (a rank that saw no calibration batch)."""
        return HessianAccumulator(module.in_features, self.mode, self.dtype, module.weight.device)

    def result(self, modules: dict[str, nn.Linear], group: "Group | None" = None) -> dict[str, HessianAccumulator]:
        """Accumulators keyed like `modules`. With a `group`, the sums of all its processes: a module whose
        accumulator went to another process (its owner there) is left out here."""
        if group is not None:
            self.owner, self.accs = group.sum_hessians(self.owner, self.accs, modules, self.mode, self.dtype)
        missing = [n for n in modules if n not in self.owner]
        if missing:
            raise RuntimeError(f"target modules never called during calibration: {missing}")
        return {n: self.accs[self.owner[n]] for n in modules if self.owner[n] in self.accs}


def _tokens(name: str, x: torch.Tensor, mask: torch.Tensor | None, all_real: bool = False) -> torch.Tensor:
    """Rows of x that are real tokens: (B, T, d_in) or (B*T, d_in) with mask (B, T) -> (n, d_in); else all rows.

    `all_real` (the mask is all ones) skips the boolean-index copy of x."""
    if mask is not None and x.dim() == 3:
        if x.shape[:2] != mask.shape:
            raise ValueError(f"{name}: input {tuple(x.shape)} does not match attention_mask {tuple(mask.shape)}")
        return x.reshape(-1, x.shape[-1]) if all_real else x[mask.to(x.device) != 0]  # (n, d_in)
    if mask is not None and x.dim() == 2 and x.shape[0] == mask.numel() and not all_real:
        return x[mask.reshape(-1).to(x.device) != 0]  # tokens already flattened to (B*T, d_in)
    return x.reshape(-1, x.shape[-1])  # e.g. (B, d_in) head inputs: every row is one sample


class _Calibrating:
    """no_grad, eval mode (dropout off, so calibration is deterministic) and TF32 off (X·Xᵀ in TF32 errs by
    ~1e-3; GPTQ turns it off too); every module's train flag and the matmul precision are restored on exit."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.flags = {m: m.training for m in self.model.modules()}
        self.precision = torch.get_float32_matmul_precision()
        self.grad = torch.no_grad()
        self.grad.__enter__()
        self.model.eval()
        torch.set_float32_matmul_precision("highest")

    def __exit__(self, *exc):
        torch.set_float32_matmul_precision(self.precision)
        for m, flag in self.flags.items():
            m.train(flag)
        self.grad.__exit__(*exc)


def accumulate(model: nn.Module, batches: Iterable[dict], modules: dict[str, nn.Linear], *, mode: str = "diag",
               dtype: torch.dtype = torch.float32, progress: Progress | None = None, group: "Group | None" = None
               ) -> dict[str, HessianAccumulator]:
    """One calibration pass: `model(**batch)` for each batch, with hooks on `modules`, under torch.no_grad()
    in eval mode.

    Tokens where batch["attention_mask"] (B, T) is 0 are dropped. Modules with a shared input map to the same
    accumulator object. Accumulators live on the device of the inputs (the model's device). With a `group`, each
    process passes its own shard of the batches; the sums are then added over the group, and a module whose sum
    went to another process is absent from the result.
    Peak memory: the model's forward pass plus one accumulator per distinct input: d_in² numbers each in
    "full" mode (LLaMA-7B: ~22 GB fp32 for all 32 layers, hence `collect_streaming`), d_in in "diag" mode.
    """
    hooks = _Hooks(mode, dtype)
    total = len(batches) if hasattr(batches, "__len__") else None
    try:
        hooks.attach(modules)
        with _Calibrating(model):
            for i, batch in enumerate(batches):
                hooks.start_batch(batch.get("attention_mask"))
                model(**batch)
                if progress is not None:
                    progress("calibrate", i + 1, total)
    finally:
        hooks.close()
    return hooks.result(modules, group)


# -----------------------------------------------------------------------------
# Reduction to what the metrics need

@dataclass
class HessianStats:
    """Per-input statistics of one H (shared by every module that reads the same input)."""
    owner: str  # module whose accumulator this is (the first of a q/k/v or gate/up group)
    tokens: int  # N, unmasked calibration tokens
    diag: torch.Tensor  # (d_in,) float64 on CPU: diag(H), the paper's sensitivity vector
    inv_diag: torch.Tensor | None = None  # (d_in,) float64 CPU: diag((H+λI)⁻¹), +inf at dead inputs
    dead: int = 0  # inputs with H_jj = 0
    damping: float | None = None  # λ used for the inverse
    percdamp: float | None = None  # λ / mean(live diag H)
    offdiag_share: float | None = None
    dominant_rows: float | None = None
    spectrum: torch.Tensor | None = None  # (d_in,) float64 CPU: EVA's explained-variance ratios (eva.ratios)


SPECTRA = (None, "centred", "uncentred")  # EVA's spectrum: none, of the covariance H/2 - µµᵀ, or of H itself


def reduce(acc: HessianAccumulator, owner: str, *, percdamp: float = 0.01, blocksize: int = 128,
           spectrum: str | None = None) -> HessianStats:
    """Everything metrics.py uses from one accumulator; in full mode also the inverse diagonal and dominance, and
    with `spectrum` EVA's explained-variance ratios of H (eva.ratios), so the whole H never leaves this process."""
    diag = acc.diag().to("cpu", torch.float64)
    stats = HessianStats(owner, acc.tokens, diag, dead=int((diag == 0).sum()))
    if acc.mode == "full":
        inv = cholesky_inverse_factor(acc.value, percdamp, blocksize, name=owner)
        stats.inv_diag = inv.inv_diag.to("cpu", torch.float64)
        stats.damping, stats.percdamp = inv.damping, inv.percdamp
        stats.offdiag_share, stats.dominant_rows = dominance(acc.value)
    if spectrum is not None:
        if acc.mode != "full" or spectrum not in SPECTRA:
            raise ValueError(f"spectrum {spectrum!r} needs mode 'full' and one of {SPECTRA[1:]}")
        stats.spectrum = eva.ratios(acc.value, mean=acc.mean.to("cpu", torch.float64) if spectrum == "centred"
                                    else None)
    return stats


def reduce_all(accs: dict[str, HessianAccumulator], **kw) -> dict[str, HessianStats]:
    """Reduce each distinct accumulator once; the first name (model order) of a shared group owns it."""
    by_acc: dict[int, HessianStats] = {}
    for name, acc in accs.items():
        if id(acc) not in by_acc:
            by_acc[id(acc)] = reduce(acc, name, **kw)
    return {name: by_acc[id(acc)] for name, acc in accs.items()}


def collect(model: nn.Module, batches: Iterable[dict], modules: dict[str, nn.Linear], *, mode: str = "diag",
            dtype: torch.dtype = torch.float32, percdamp: float = 0.01, blocksize: int = 128,
            spectrum: str | None = None, progress: Progress | None = None, group: "Group | None" = None
            ) -> dict[str, HessianStats]:
    """One-pass calibration then reduction. Peak memory as `accumulate`, plus 3·d_in² while inverting one H."""
    accs = accumulate(model, batches, modules, mode=mode, dtype=dtype, progress=progress, group=group)
    return reduce_all(accs, percdamp=percdamp, blocksize=blocksize, spectrum=spectrum)


# -----------------------------------------------------------------------------
# Layer-by-layer streaming (GPTQ llama_sequential) for full mode at LLaMA scale

@dataclass
class CachedInput:
    """The call of the first block for one calibration batch."""
    args: tuple  # positional args; args[0] is the hidden state (B, T, D)
    kwargs: dict  # keyword args (position embeddings, attention bias, ...) reused unchanged for every block
    mask: torch.Tensor | None  # batch["attention_mask"] (B, T)


def capture_inputs(model: nn.Module, block: nn.Module, batches: Iterable[dict]) -> list[CachedInput]:
    """Run the model on each batch and record the inputs of `block` (the first transformer block).

    The forward runs to the end rather than being stopped by an exception (gptq's Catcher); that costs one
    ordinary forward pass per batch. Memory: one (B, T, D) hidden state per batch, kept on the device.
    """
    cache: list[CachedInput] = []
    mask: list[torch.Tensor | None] = [None]

    def hook(module, args, kwargs):
        cache.append(CachedInput(tuple(args), dict(kwargs), mask[0]))
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with _Calibrating(model):
            for batch in batches:
                mask[0], before = batch.get("attention_mask"), len(cache)
                model(**batch)
                if len(cache) != before + 1:
                    raise RuntimeError(f"the first block was called {len(cache) - before} times in one batch")
    finally:
        handle.remove()
    return cache


def collect_streaming(blocks: Sequence[tuple[str, nn.Module]], inputs: list[CachedInput],
                      modules: dict[str, nn.Linear], *,
                      mode: str = "full", dtype: torch.dtype = torch.float32, percdamp: float = 0.01,
                      blocksize: int = 128, spectrum: str | None = None, progress: Progress | None = None,
                      group: "Group | None" = None) -> dict[str, HessianStats]:
    """Hessian statistics block by block: each block runs over all cached inputs with hooks on its targets only,
    its Hessians are reduced (and optionally copied to CPU) and freed, and its outputs feed the next block.

    `blocks` are (qualified name, module) in forward order, e.g. [("model.layers.0", layer0), ...]; each must
    map (hidden, *args[1:], **kwargs) to hidden or a tuple starting with it, as HF decoder layers do, with the
    same kwargs for every block. `modules` (from find_linears on the whole model) go to the block whose name
    prefixes theirs; one inside no block is an error. Matches `collect` because weights are not modified.
    Peak memory: the cached hidden states twice (inputs and outputs, n_batches·B·T·D each) plus one block's
    accumulators (LLaMA-7B: ~0.7 GB fp32) plus 3·d_in² while inverting one H.
    """
    outside = [n for n in modules if not any(n.startswith(prefix + ".") for prefix, _ in blocks)]
    if outside:
        raise ValueError(f"target modules outside every streamed block: {outside[:5]}")
    stats: dict[str, HessianStats] = {}
    hidden = [c.args[0] for c in inputs]
    for b, (prefix, block) in enumerate(blocks):
        mine = {n: m for n, m in modules.items() if n.startswith(prefix + ".")}  # this block's targets only
        hooks = _Hooks(mode, dtype)
        try:
            hooks.attach(mine)
            with _Calibrating(block):
                for i, c in enumerate(inputs):
                    hooks.start_batch(c.mask)
                    out = block(hidden[i], *c.args[1:], **c.kwargs)
                    hidden[i] = out[0] if isinstance(out, (tuple, list)) else out
        finally:
            hooks.close()
        accs = hooks.result(mine, group)
        stats.update(reduce_all(accs, percdamp=percdamp, blocksize=blocksize, spectrum=spectrum))
        del accs, hooks  # free this block's Hessians before the next block accumulates
        if progress is not None:
            progress("stream", b + 1, len(blocks))
    return stats
