"""slora/train.py: loss normalised per optimizer step, non-finite stop (finetune end to end in test_finetune.py)."""
import json

import pytest
import torch

from slora import data, finetune, train
from slora.lora import apply_lora, mark_only_lora_trainable
from tests.tiny import randomize_lora, tiny_llama, tiny_model_dir

TOL = dict(rtol=0, atol=64 * torch.finfo(torch.float64).eps)  # float64: only summation order differs


def lm_batch(seed: int, B: int, T: int, vocab: int) -> dict:
    """Right-padded LM batch whose rows hold very different numbers of target tokens (prompt and pad = -100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    labels = ids.clone()
    for i in range(B):
        start, end = i, T - 2 * i  # prompt of i tokens, 2i pad tokens: the target counts differ row to row
        labels[i, :start] = data.IGNORE_INDEX
        labels[i, end:] = data.IGNORE_INDEX
    mask = (torch.arange(T)[None] < (T - 2 * torch.arange(B))[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def grads_after_step(model, micro_batches, kind) -> dict:
    """LoRA gradients of one optimizer step over `micro_batches`, as train.finetune computes them."""
    denom = train.step_denominator(sum(train.target_count(b, kind) for b in micro_batches))
    for b in micro_batches:
        (train.loss_sum(model, b, kind, "cpu") / denom).backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def split(batch: dict, parts: int) -> list[dict]:
    return [{k: v for k, v in zip(batch, vs)} for vs in zip(*(t.chunk(parts) for t in batch.values()))]


@pytest.mark.parametrize("accum", [2, 4])
def test_micro_batches_times_accum_equal_one_big_batch(accum):
    # b x accum and (b·accum) x 1 give the same gradient, also when the micro-batches hold unequal token counts
    model = tiny_llama().double()
    apply_lora(model, {f"model.layers.{i}.self_attn.{m}": 2 for i in (0, 1) for m in ("q_proj", "v_proj")}, 4.0)
    randomize_lora(model)
    mark_only_lora_trainable(model, extra=())
    batch = lm_batch(0, B=8, T=12, vocab=model.config.vocab_size)
    counts = [train.target_count(b, "generation") for b in split(batch, accum)]
    assert len(set(counts)) > 1  # the case that per-micro-batch means would get wrong
    big = grads_after_step(model, [batch], "generation")
    small = grads_after_step(model, split(batch, accum), "generation")
    assert big.keys() == small.keys() and len(big) == 8
    for n in big:
        torch.testing.assert_close(small[n], big[n], **TOL, msg=n)
        assert big[n].abs().sum() > 0, n


def test_classification_step_loss_is_the_mean():
    # with one micro-batch the normalised sum is F.cross_entropy's mean, bit for bit (the old loss)
    logits = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    model = lambda **kw: logits  # noqa: E731
    batch = {"input_ids": torch.zeros(8, 2, dtype=torch.long), "labels": y}
    got = train.loss_sum(model, batch, "classification", "cpu") / train.target_count(batch, "classification")
    assert got.item() == torch.nn.functional.cross_entropy(logits, y).item()


def test_inf_learning_rate_stops_with_the_step_and_no_adapter(tmp_path):
    model = tiny_model_dir(tmp_path / "m", "encoder")
    rows = [{"text": f"the movie was {'good' if i % 2 else 'bad'}", "label": i % 2} for i in range(24)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--model", str(model), "--task", "jsonl", "--train-file", str(tmp_path / "t.jsonl"), "--batch-size",
            "8", "--calib-n", "8", "--max-steps", "3", "--lr", "inf", "--out", str(tmp_path / "run")]
    with pytest.raises(train.NonFiniteError, match=r"step 2: .* not finite.*--lr inf"):
        finetune.main(argv)
    assert not (tmp_path / "run" / "adapter").exists()
