"""Evaluation of a model on one split: predictions (class, value, or greedy generated text) scored with the
task's scores (slora.data.scores). Under torchrun each rank evaluates its contiguous share of the batches and the
predictions are gathered in order (slora.dist.data_parallel)."""
from __future__ import annotations

import torch
from slora.data import chat, scores, text
from slora.dist import data_parallel
from slora.models.decode import generate_static
from slora.models.lora import merged
from slora.train.objective import forward_inputs, to_device


def eval_batches(feats, cfg, pad_id, side: str = "right") -> tuple[list[dict], list[int]]:
    """(batches, order): evaluation batches of --eval-batch-size (default --batch-size) features, and the example
    index of each row in batch order. With --group-by-length the features are taken longest first
    (text.length_sorted), so a batch pads to a length near its own rows' and generation runs fewer pad positions;
    predictions go back to example order with text.restore_order. Only then: a row's numbers can change with the
    batch it shares (its pad width), in the last bits, and so a greedy token now and then."""
    size = cfg.eval_batch_size or cfg.batch_size
    order = text.length_sorted(feats) if cfg.group_by_length else list(range(len(feats)))
    return list(text.iterate_batches([feats[i] for i in order], size, pad_id, side=side)), order


@torch.no_grad()
def evaluate(model, tok, spec, examples, cfg, pad_id, device, autocast) -> dict:
    model.eval()
    if spec.kind == "generation":
        feats = text.encode_prompts(tok, examples, cfg.max_len)
        stops = chat.stop_ids(tok) + [i for i in (model.config.eos_token_id,) if isinstance(i, int)]
        preds = []
        batches, order = eval_batches(feats, cfg, pad_id, side="left")
        # torchrun: this rank's batches, gathered below; under FSDP2 padded with dummies (real False) that keep
        # every rank's forwards in step, and every batch runs all gen_tokens steps (no rank stops early while
        # another still decodes: each forward all-gathers weights from every rank)
        for batch, real in data_parallel.eval_shard(batches, cfg.fsdp):
            ids, mask = to_device(batch["input_ids"], device), to_device(batch["attention_mask"], device)
            with autocast:
                if cfg.fast_generate:  # the adapters merged for the block (the base restored after), fixed shapes
                    with merged(model):
                        out = generate_static(model, ids, mask, cfg.gen_tokens, stops, graph=device.type == "cuda")
                else:
                    out = model.generate(ids, mask, max_new_tokens=cfg.gen_tokens, eos_token_id=stops,
                                         early_stop=not cfg.fsdp)
            if real:
                preds += text.decode_generations(tok, out.cpu(), batch["input_ids"].shape[1], stops)
        preds = text.restore_order(data_parallel.gather(preds), order)
        refs = [e.label for e in examples]
    else:
        feats = text.encode_encoder(tok, examples, cfg.max_len)
        preds = []
        batches, order = eval_batches(feats, cfg, pad_id)
        for batch, real in data_parallel.eval_shard(batches, cfg.fsdp):
            with autocast:
                logits = model(**forward_inputs(batch, device)).float()
            if real:
                preds += (logits.squeeze(-1) if spec.kind == "regression" else logits.argmax(-1)).tolist()
        preds = text.restore_order(data_parallel.gather(preds), order)
        refs = [f.labels for f in feats]
    return scores.score(spec.scores, preds, refs)
