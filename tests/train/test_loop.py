"""slora/train.py: loss normalised per optimizer step, non-finite stop (finetune end to end in test_finetune.py)."""
import argparse
import contextlib
import json
import math

import pytest
import torch

from slora.train import divergence, loop, objective, evaluation
from slora.cli import finetune
from slora.data import text
from slora.models.lora import apply_lora, mark_only_lora_trainable
from tests.support.bounds import assert_within, float64_bound, measured_bound, sum_bound
from tests.support.tiny import randomize_lora, tiny_llama, tiny_model_dir

# Tolerances. The LM loss is fp32 whatever the model's dtype: objective casts the logits to fp32 before the
# cross-entropy. The float64 tests below therefore compare
# - losses: sums of N fp32 per-token terms in another order (each term comes from the same row kernel on the same
#   fp32 logits): sum_bound(N, loss), n·eps32·Σ|ℓ_t| with ℓ_t >= 0;
# - gradients: the backward of that row kernel is softmax - onehot per row, the same on both sides, so only float64
#   rounding separates them, bounded by float64_bound (the same gradients of the fp32 model against the float64
#   model measure the computation's rounding error, scaled by 2^-29). A float64 logit within 2^-52 relative of an
#   fp32 rounding boundary could round to another fp32 value on one side; that has probability about 2^-29 per
#   logit, and none of the few thousand logits here is one.


def lm_batch(seed: int, B: int, T: int, vocab: int) -> dict:
    """Right-padded LM batch whose rows hold very different numbers of target tokens (prompt and pad = -100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    labels = ids.clone()
    for i in range(B):
        start, end = i, T - 2 * i  # prompt of i tokens, 2i pad tokens: the target counts differ row to row
        labels[i, :start] = text.IGNORE_INDEX
        labels[i, end:] = text.IGNORE_INDEX
    mask = (torch.arange(T)[None] < (T - 2 * torch.arange(B))[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def grads_after_step(model, micro_batches, kind) -> dict:
    """LoRA gradients of one optimizer step over `micro_batches`, as loop.finetune computes them."""
    denom = objective.step_denominator(sum(objective.target_count(b, kind) for b in micro_batches))
    for b in micro_batches:
        (objective.loss_sum(model, b, kind, "cpu") / denom).backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def split(batch: dict, parts: int) -> list[dict]:
    return [{k: v for k, v in zip(batch, vs)} for vs in zip(*(t.chunk(parts) for t in batch.values()))]


def lora_llama(dtype, targets: list[str], train: bool = False):
    """The tiny LLaMA with seeded non-zero LoRA on `targets`, built in fp32 and then cast: the fp32 and float64
    models hold the same values, so the fp32 one measures the rounding error of the float64 one's computation."""
    model = tiny_llama()
    apply_lora(model, {t: 2 for t in targets}, 4.0)
    randomize_lora(model)
    mark_only_lora_trainable(model, extra=())
    return model.to(dtype).train(train)


ATTN_QV = [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]


def loss_and_grads(model, batch, **kw):
    loss = objective.loss_sum(model, batch, "generation", "cpu", **kw)
    loss.backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), g


@pytest.mark.parametrize("accum", [2, 4])
def test_micro_batches_times_accum_equal_one_big_batch(accum):
    # b x accum and (b·accum) x 1 give the same gradient, also when the micro-batches hold unequal token counts
    model, model32 = lora_llama(torch.float64, ATTN_QV), lora_llama(torch.float32, ATTN_QV)
    batch = lm_batch(0, B=8, T=12, vocab=model.config.vocab_size)
    counts = [objective.target_count(b, "generation") for b in split(batch, accum)]
    assert len(set(counts)) > 1  # the case that per-micro-batch means would get wrong
    big = grads_after_step(model, [batch], "generation")
    big32 = grads_after_step(model32, [batch], "generation")
    small = grads_after_step(model, split(batch, accum), "generation")
    assert big.keys() == small.keys() and len(big) == 8
    for n in big:
        # each micro-batch's loss is divided by the step's count before backward: float64 rounding only
        assert_within(small[n], big[n], float64_bound(big32[n], big[n]), n)
        assert big[n].abs().sum() > 0, n


def test_sparse_lm_head_gives_the_plain_loss_and_gradients():
    model, model32 = lora_llama(torch.float64, ATTN_QV), lora_llama(torch.float32, ATTN_QV)
    batch = lm_batch(0, B=6, T=14, vocab=model.config.vocab_size)
    (whole, gw), (sparse, gs) = (loss_and_grads(model, batch, target_rows=rows) for rows in (False, True))
    _, g32 = loss_and_grads(model32, batch)
    n_targets = objective.target_count(batch, "generation")
    assert_within(sparse, whole, sum_bound(n_targets, whole.item()), "loss")  # fp32 sum of N terms (top)
    assert gw.keys() == gs.keys() and len(gw) == 8
    for n in gw:
        assert_within(gs[n], gw[n], float64_bound(g32[n], gw[n]), n)
    # the head ran on the target positions only: fewer rows than B x (T-1)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.shape[:-1].numel()))
    objective.loss_sum(model, batch, "generation", "cpu", target_rows=True)
    hook.remove()
    assert seen == [objective.target_count(batch, "generation")] and seen[0] < 6 * 13


def test_sparse_lm_head_is_refused_for_an_encoder_task(tmp_path):
    from slora.errors import UsageError
    model = tiny_model_dir(tmp_path / "m", "encoder")
    rows = [{"text": f"the movie was {'good' if i % 2 else 'bad'}", "label": i % 2} for i in range(24)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--model", str(model), "--task", "jsonl", "--train-file", str(tmp_path / "t.jsonl"), "--sparse-lm-head"]
    with pytest.raises(UsageError, match="--sparse-lm-head: applies to causal-LM tasks"):
        finetune.main(argv + ["--out", str(tmp_path / "run")])


def test_classification_step_loss_is_the_mean():
    # with one micro-batch the normalised sum is F.cross_entropy's mean, bit for bit (the old loss)
    logits = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    model = lambda **kw: logits  # noqa: E731
    batch = {"input_ids": torch.zeros(8, 2, dtype=torch.long), "labels": y}
    got = objective.loss_sum(model, batch, "classification", "cpu") / objective.target_count(batch, "classification")
    assert got.item() == torch.nn.functional.cross_entropy(logits, y).item()


def diverging_run(tmp_path, *extra) -> str:
    """The NonFiniteError message of a run at an absurd learning rate; checks that no adapter was written."""
    model = tiny_model_dir(tmp_path / "m", "encoder")
    rows = [{"text": f"the movie was {'good' if i % 2 else 'bad'}", "label": i % 2} for i in range(24)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / f"run{len(extra)}"
    argv = ["--model", str(model), "--task", "jsonl", "--train-file", str(tmp_path / "t.jsonl"), "--batch-size",
            "4", "--calib-n", "8", "--max-steps", "5", "--lr", "1e30", "--out", str(out), *extra]
    # --lr inf itself is refused as an argument (slora.cli.argcheck); a finite but absurd rate diverges in training
    with pytest.raises(divergence.NonFiniteError, match=r"step \d: .* not finite.*--lr 1e\+30") as e:
        finetune.main(argv)
    assert not (out / "adapter").exists()
    return str(e.value)


def test_inf_learning_rate_stops_with_the_step_and_no_adapter(tmp_path):
    every_step = diverging_run(tmp_path)
    # checked on the device, read only at the last step (log every 50): the same first bad step and value
    assert diverging_run(tmp_path, "--check-finite", "log", "--log-every", "50") == every_step
    # fused AdamW skips the non-finite update on the device; the run still stops, naming a step
    diverging_run(tmp_path, "--check-finite", "log", "--fused-optim", "--log-every", "50")


def test_device_finite_check_names_the_first_bad_step():
    check, args = divergence.DeviceFiniteCheck(), loop.TrainConfig(lr=1e-3)
    check.raise_if_bad(args)  # nothing recorded yet
    one = torch.tensor(1.0)
    check.record(1, one, one)
    check.record(2, one, torch.tensor(2.0))
    check.raise_if_bad(args)  # all finite so far
    check.record(3, one, torch.tensor(math.inf))
    check.record(4, torch.tensor(math.nan), torch.tensor(math.nan))
    check.record(5, one, one)
    with pytest.raises(divergence.NonFiniteError, match="step 3: gradient norm inf is not finite"):
        check.raise_if_bad(args)


def test_fused_optimizer_skips_a_step_whose_gradient_norm_is_not_finite():
    p = torch.nn.Parameter(torch.ones(3))
    opt = loop.make_optimizer([p], loop.TrainConfig(lr=0.1, weight_decay=0.0, fused_optim=True))
    p.grad = torch.tensor([math.nan, 1.0, 1.0])
    opt.found_inf = divergence.skip_flag(torch.linalg.vector_norm(p.grad))
    opt.step()
    assert p.tolist() == [1.0, 1.0, 1.0] and int(opt.state[p]["step"]) == 0  # parameters, moments, count kept
    p.grad = torch.ones(3)
    opt.found_inf = divergence.skip_flag(torch.linalg.vector_norm(p.grad))
    opt.step()
    assert all(v < 1.0 for v in p.tolist()) and int(opt.state[p]["step"]) == 1


class LengthEcho(torch.nn.Module):
    """A stand-in classifier whose prediction for a row is its number of real tokens mod 3: predictions that give
    away which example they belong to, whatever the batch."""

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        return torch.nn.functional.one_hot(attention_mask.sum(-1) % 3, 3).float()  # (B, 3)


def test_length_sorted_evaluation_returns_predictions_in_example_order(monkeypatch):
    from slora.data import scores
    from slora.data.tasks import Example
    from tests.support.tiny import tiny_tokenizer
    tok, _ = tiny_tokenizer("encoder")
    examples = [Example(str(i), " ".join(["good"] * (1 + (7 * i) % 11)), None, 0) for i in range(13)]
    seen = []
    monkeypatch.setattr(scores, "score", lambda metrics, preds, refs: seen.append(preds) or {})
    spec = argparse.Namespace(kind="classification", scores=("accuracy",))
    for group, size in ((False, None), (True, None), (True, 4)):
        args = loop.TrainConfig(max_len=32, batch_size=3, eval_batch_size=size, group_by_length=group, fsdp=False)
        evaluation.evaluate(LengthEcho(), tok, spec, examples, args, 0, "cpu", contextlib.nullcontext())
    want = [(1 + (7 * i) % 11 + 2) % 3 for i in range(13)]  # [CLS] words [SEP]
    assert seen == [want, want, want]


# -----------------------------------------------------------------------------
# Activation checkpointing

def lora_grads(model, batch, kind, checkpointing: bool) -> dict:
    loop.set_activation_checkpointing(model, checkpointing)
    model.train()
    (objective.loss_sum(model, batch, kind, "cpu") / objective.target_count(batch, kind)).backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("family", ["decoder", "bert", "mpnet"])
def test_activation_checkpointing_gives_the_same_nonzero_lora_gradients(family, monkeypatch):
    from slora.models import bert, for_sequence_classification, llama, mpnet
    from tests.support.tiny import tiny_bert, tiny_mpnet
    calls = []
    for mod in (bert, llama, mpnet):  # count the layers that really went through torch.utils.checkpoint
        real = mod.checkpoint
        monkeypatch.setattr(mod, "checkpoint", lambda fn, *a, _c=real, **kw: calls.append(1) or _c(fn, *a, **kw))
    if family == "decoder":
        model, kind = tiny_llama(), "generation"
        targets = [f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "mlp.down_proj")]
        batch = lm_batch(1, B=4, T=10, vocab=model.config.vocab_size)
    else:
        no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        body = tiny_bert(**no_dropout) if family == "bert" else tiny_mpnet(**no_dropout)
        model, kind = for_sequence_classification(body, 3, seed=0), "classification"
        q = "attention.self.query" if family == "bert" else "attention.attn.q"
        targets = [f"{family}.encoder.layer.{i}.{m}" for i in (0, 1) for m in (q, "output.dense")]
        g = torch.Generator().manual_seed(2)
        batch = {"input_ids": torch.randint(4, 53, (4, 9), generator=g),
                 "attention_mask": torch.tensor([[1] * 9, [1] * 7 + [0] * 2, [1] * 5 + [0] * 4, [1] * 9]),
                 "labels": torch.tensor([0, 2, 1, 2])}
    apply_lora(model, {t: 2 for t in targets}, 4.0, dropout=0.0)
    randomize_lora(model)
    mark_only_lora_trainable(model, extra=("classifier",) if family != "decoder" else ())
    plain = lora_grads(model, batch, kind, False)
    assert not calls
    ckpt = lora_grads(model, batch, kind, True)
    assert len(calls) == 2  # both layers
    lora = [n for n in plain if "lora_" in n]
    assert len(lora) == 2 * len(targets) and plain.keys() == ckpt.keys()
    # the recomputed forward runs the same kernels on the same values; the backward may add the gradient
    # contributions of a tensor read by several ops (the residual stream) in another order: fp32 rounding, bounded
    # by the plain gradients' own error against the same model in float64
    plain64 = lora_grads(model.double(), {k: v.double() if v.is_floating_point() else v for k, v in batch.items()},
                         kind, False)
    for n in plain:
        assert_within(ckpt[n], plain[n], measured_bound(plain[n], plain64[n]), n)
    for n in lora:
        assert plain[n].abs().sum() > 0, n


def test_activation_checkpointing_is_refused_on_a_model_without_layer_stacks():
    with pytest.raises(ValueError, match="Linear has no layer stack"):
        loop.set_activation_checkpointing(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_bf16_base_with_checkpointing_end_to_end(tmp_path, kind):
    # --dtype bf16 on the CPU: base loaded as bf16, autocast on, LoRA and head trained and saved in fp32
    from safetensors.torch import load_file
    model = tiny_model_dir(tmp_path / "m", kind)
    if kind == "encoder":
        rows = [{"text": f"the movie was {'good' if i % 2 else 'bad'}", "label": i % 2} for i in range(24)]
        extra = []
    else:
        rows = [{"prompt": "what is the capital of france", "response": "paris"}] * 12
        extra = ["--jsonl-kind", "instructions", "--gen-tokens", "2"]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = finetune.main(["--model", str(model), "--task", "jsonl", "--train-file", str(tmp_path / "t.jsonl"),
                         "--batch-size", "4", "--calib-n", "8", "--max-steps", "2", "--dtype", "bf16",
                         "--activation-checkpointing", "--out", str(tmp_path / "run"), *extra])
    sd = load_file(out / "adapter" / "adapter_model.safetensors")
    assert sd and all(t.dtype == torch.float32 for t in sd.values())
    assert any("lora_B" in k and t.abs().sum() > 0 for k, t in sd.items())  # it trained
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["event"] == "step"]
    assert losses and all(math.isfinite(v) for v in losses)


def test_bf16_base_with_fp32_compute_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--precision: fp32 needs an fp32 base"):
        finetune.main(["--dtype", "bf16", "--precision", "fp32", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_chunked_lm_loss_equals_the_whole_loss_and_gradients(dtype):
    # lm_chunk runs the head and loss over a few positions at a time, recomputed in backward: same sum, same grads
    up = [f"model.layers.{i}.mlp.up_proj" for i in (0, 1)]
    model, model32, model64 = (lora_llama(d, up, train=True) for d in (dtype, torch.float32, torch.float64))
    batch = lm_batch(3, B=4, T=11, vocab=model.config.vocab_size)
    (whole, gw), *chunked = (loss_and_grads(model, batch, lm_chunk=chunk) for chunk in (None, 3, 100))
    assert whole.abs() > 1 and all(g.abs().max() > 0 for g in gw.values())  # a zero loss would prove nothing
    (loss32, g32), (loss64, g64) = (loss_and_grads(m, batch) for m in (model32, model64))
    n_targets = objective.target_count(batch, "generation")
    # the loss: chunk sums of fp32 terms added up, another order of one fp32 sum of N terms (top); in fp32 the
    # head's GEMMs of other shapes also round the logits differently, which the fp32 loss's own error measures
    loss_bound = sum_bound(n_targets, whole.item()) + (
        0 if dtype == torch.float64 else measured_bound(loss32, loss64))
    for loss, g in chunked:
        assert_within(loss, whole, loss_bound, "loss")
        assert g.keys() == gw.keys() and len(g) == 4
        for n in g:  # float64: only float64 rounding differs (top); fp32: the head's GEMMs of other shapes too
            bound = float64_bound(g32[n], g64[n]) if dtype == torch.float64 else measured_bound(g32[n], g64[n])
            assert_within(g[n], gw[n], bound, n)


def test_lm_loss_through_forward_equals_the_logits_loss():
    # the training loss (objective.lm_loss_sum: hidden states from the forward, then the LM head) is the
    # cross-entropy of the model's own logits, shifted by one position
    model = tiny_llama().double()
    batch = lm_batch(4, B=3, T=9, vocab=model.config.vocab_size)
    logits = model(batch["input_ids"], batch["attention_mask"])  # (B, T, V)
    want = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             batch["labels"][:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    got = objective.lm_loss_sum(model, batch, "cpu")
    assert got.dim() == 0 and got.dtype == torch.float32 and want.abs() > 1
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same ops in the same order: bit-identical


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batches_reach_the_gpu_through_pinned_memory_unchanged():
    t = torch.randint(0, 50_000, (8, 257))
    got = objective.to_device(t, torch.device("cuda"))
    assert got.device.type == "cuda" and torch.equal(got.cpu(), t)
    assert objective.to_device(t, "cpu") is t  # on the CPU nothing is copied


def test_every_allocation_sees_the_same_batches_for_a_seed(tmp_path, monkeypatch):
    """The data order has a stream of its own, seeded from --seed alone: two allocations of one seed (whose LoRA
    inits draw different amounts from the init stream) train on the same micro-batches in the same order, every
    epoch; another seed gives another order (so the comparison is not vacuous)."""
    from tests.cli.test_finetune import run
    from tests.support.tiny import sentiment_rows, tiny_model_dir, write_jsonl
    rows = [r | {"text": r["text"] + " " + " ".join(["very"] * (i % 5))} for i, r in enumerate(sentiment_rows(44))]
    data = write_jsonl(tmp_path / "train.jsonl", rows[:36]), write_jsonl(tmp_path / "dev.jsonl", rows[36:])
    model = tiny_model_dir(tmp_path / "m", "encoder")
    seen, real = [], loop.backward_step

    def record(fwd, group, *a, **kw):
        seen[-1].append([b["input_ids"].tolist() for b, _ in group])
        return real(fwd, group, *a, **kw)
    monkeypatch.setattr(loop, "backward_step", record)
    ranks = {}
    for name, extra in (("uniform", ("--alloc", "uniform")), ("sra", ("--targets", "all-linear")),
                        ("other-seed", ("--alloc", "uniform", "--seed", "1"))):
        seen.append([])
        out = run(tmp_path, model, data, "--epochs", "2", "--max-steps", "1000", "--r-avg", "2", *extra, out=name)
        ranks[name] = json.loads((out / "ranks.json").read_text())
    assert ranks["uniform"] != ranks["sra"]  # two allocations (other targets and ranks: another init draw)
    assert len(seen[0]) == 10  # 36 examples at batch 8: 5 micro-batches per epoch, 2 epochs
    assert seen[0] == seen[1]
    assert seen[0] != seen[2]


def test_fast_generate_gives_the_predictions_of_generate(tmp_path):
    """--fast-generate (adapters merged for the block, a preallocated cache) predicts the text generate predicts on
    the CPU (rounding only differs; far from ties on this tiny model), and leaves the trained weights as they were."""
    from tests.cli.test_finetune import run
    from tests.support.tiny import tiny_model_dir, write_jsonl
    rows = [{"prompt": f"say {w} {v}", "response": f"{v} {w}"} for w in ("a", "b", "c", "d") for v in ("e", "f", "g")]
    data = write_jsonl(tmp_path / "t.jsonl", rows[:9]), write_jsonl(tmp_path / "d.jsonl", rows[9:])
    model = tiny_model_dir(tmp_path / "m", "decoder")
    outs = [run(tmp_path, model, data, *extra, "--max-steps", "4", "--lr", "5e-2", "--gen-tokens", "6",
                kind="instructions", out=name) for name, extra in (("eager", ()), ("fast", ("--fast-generate",)))]
    a, b = (json.loads((o / "metrics.json").read_text()) for o in outs)
    assert a["final"] == b["final"] and a["epochs"] == b["epochs"]
    from safetensors.torch import load_file
    wa, wb = (load_file(o / "adapter" / "adapter_model.safetensors") for o in outs)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
