"""One rank of the distributed calibration tests (tests/dist/test_data_parallel.py): run as `python tests/support/dist_worker.py
calib KIND MODEL_DIR N_SEQ BATCH MODE OUT` under tests/dist_launch.launch, or called in-process with no process
group as the one-process oracle. Writes what the rank ends with as JSON: token counts, diag(H) and diag(H⁻¹)
per module, θ and ranks."""
from __future__ import annotations

import json
import os
import sys

import torch

from safetensors.torch import save_file

from slora.data import tasks, text
from slora.dist import process_group, data_parallel
from slora.method import hessian
from slora.models import targets
from slora.train import loop, objective, evaluation
from slora.dist.calibration import CalibrationGroup
from slora.models.lora import apply_lora, mark_only_lora_trainable
from slora.io.model_folder import load_model
from slora.method.sensitivity import SensitivityConfig, compute


def calib_batches(n_seq: int, batch: int, vocab: int, pad_id: int, encoder: bool) -> list[dict]:
    """Seeded sequences of lengths 1..12, so most batches are padded."""
    g = torch.Generator().manual_seed(7)
    feats = []
    for _ in range(n_seq):
        ids = torch.randint(4, vocab, (int(torch.randint(1, 13, (1,), generator=g)),), generator=g).tolist()
        feats.append(text.Features(ids, [0] * len(ids) if encoder else None))
    return list(text.iterate_batches(feats, batch, pad_id))


def calibrate(kind: str, model_dir: str, n_seq: int, batch: int, mode: str, dtype=torch.float32) -> dict:
    """This rank's view after calibration. `mode` diag, full (θ from the OBS saliency) or eva (EVA's rule on the
    full H). `dtype` float64: the oracle (weights, activations and sums in float64); its θ and ranks come from the
    same float64 statistics."""
    model = load_model(model_dir, dtype=dtype)
    encoder = kind == "encoder"
    batches = [{k: v for k, v in b.items() if k != "labels"}
               for b in calib_batches(n_seq, batch, model.config.vocab_size, 0, encoder)]
    mine = process_group.shard(batches)
    blocks = None if encoder else [(f"model.layers.{i}", m) for i, m in enumerate(model.model.layers)]
    method, mode = ("eva", "full") if mode == "eva" else ("sra", mode)
    cfg = SensitivityConfig(mode=mode, source="obs" if mode == "full" and method == "sra" else "diag", r_avg=2,
                            method=method, dtype="float64" if dtype == torch.float64 else "float32")
    modules = targets.find_linears(model, "all-linear")
    group = CalibrationGroup() if process_group.get().world > 1 else None
    kw = dict(mode=mode, dtype=dtype, group=group)
    if blocks is None:
        stats = hessian.collect(model, mine, modules, **kw)
    else:
        stats = hessian.collect_streaming(blocks, hessian.capture_inputs(model, blocks[0][1], mine), modules, **kw)
    if group is not None:
        stats = group.gather_stats(stats, modules)
    s = compute(model, mine, modules, cfg, blocks=blocks, group=group)
    sens, ranks = {"modules": s.modules}, s.ranks
    return {"batches": len(mine), "tokens": {n: s.tokens for n, s in stats.items()},
            "diag": {n: s.diag.tolist() for n, s in stats.items()},
            "inv_diag": {n: None if s.inv_diag is None else s.inv_diag.tolist() for n, s in stats.items()},
            "theta": {n: v["theta"] for n, v in sens["modules"].items()}, "ranks": ranks,
            "real_tokens": int(sum(int(b["attention_mask"].sum()) for b in mine))}


def lm_features(n_seq: int, vocab: int) -> list[text.Features]:
    """Seeded LM sequences of lengths 2..12 whose first tokens are a prompt (label IGNORE_INDEX): uneven target
    counts per sequence and padding in every batch."""
    g = torch.Generator().manual_seed(11)
    feats = []
    for _ in range(n_seq):
        n = int(torch.randint(2, 13, (1,), generator=g))
        ids = torch.randint(4, vocab, (n,), generator=g).tolist()
        prompt = int(torch.randint(0, n, (1,), generator=g))
        feats.append(text.Features(ids, None, [text.IGNORE_INDEX] * prompt + ids[prompt:]))
    return feats


def grads(model_dir: str, batch: int, accum: int, fsdp: bool, ckpt: bool = False, device=None,
          lm_chunk: int | None = None, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """One optimizer step's gradients: tiny decoder, seeded non-zero LoRA on every linear, dropout 0, micro-batch
    `batch` per rank (global world·batch), `accum` micro-batches; 11 sequences, so the last is short. `ckpt`:
    activation checkpointing per layer, applied before wrapping (torchtune's order). `lm_chunk`: the LM head and
    loss run that many positions at a time (inside the model's forward, through the DDP / FSDP2 wrapper). `dtype`
    float64: the oracle, with the same fp32 values (LoRA drawn in fp32, then cast); its loss is still the fp32
    cross-entropy (objective casts the logits), of the float64 logits."""
    from tests.support.tiny import randomize_lora
    device = torch.device(device) if device is not None else process_group.get().device
    model = load_model(model_dir).to(device)
    ranks = {n: 2 for n in targets.find_linears(model, "all-linear")}
    apply_lora(model, ranks, 4.0, generator=torch.Generator().manual_seed(0))
    randomize_lora(model, seed=3)
    mark_only_lora_trainable(model, extra=())
    model.to(dtype)
    loop.set_activation_checkpointing(model, ckpt)
    fwd = data_parallel.wrap(model, fsdp)
    world = process_group.get().world
    feats = lm_features(11, model.config.vocab_size)
    group = [data_parallel.local_rows(b) for b in text.iterate_batches(feats, batch * world, 0)][:accum]
    model.train()
    loss = objective.backward_step(fwd, group, "lm", device, torch.autocast(device.type, enabled=False), lm_chunk)
    out = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).contiguous().cpu()
           for n, p in model.named_parameters() if p.requires_grad}
    out["loss"] = torch.tensor([data_parallel.global_count(loss.item()) / world], dtype=torch.float64)
    return out


def eval_examples(kind: str, n: int) -> tuple:
    """(spec, examples): n seeded sentiment sentences (encoder) or prompts whose reference is a few words (decoder)."""
    from tests.support.tiny import WORDS
    if kind == "encoder":
        spec = tasks.TaskSpec("t", "classification", 2, ("text",), "label", ("accuracy", "f1"), "accuracy")
        rows = [tasks.Example(str(i), " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(1 + i % 6)), None,
                             i % 2) for i in range(n)]
    else:
        spec = tasks.TaskSpec("t", "generation", 0, ("prompt",), "response", ("rouge1", "bleu4"), "rouge1")
        rows = [tasks.Example(str(i), " ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(1 + i % 5)), None,
                             " ".join(WORDS[i % 7:i % 7 + 2])) for i in range(n)]
    return spec, rows


def evaluate_split(kind: str, model_dir: str, n: int, batch: int, fsdp: bool) -> dict:
    """evaluation.evaluate on `n` examples at batch size `batch`: the scores, the predictions in example order (read from
    scores.score's arguments) and how many forwards this rank ran (a sharded evaluation runs about 1/world)."""
    from slora.data import scores
    from slora.models import for_sequence_classification
    from slora.io.model_folder import load_tokenizer
    model = load_model(model_dir)
    if kind == "encoder":
        model = for_sequence_classification(model, 2, seed=3)  # a head whose predictions are not all one class
    data_parallel.wrap(model, fsdp)
    forwards = []
    model.register_forward_pre_hook(lambda m, a: forwards.append(1))
    seen, score = {}, scores.score

    def keep(names, preds, refs):  # the gathered predictions, as evaluate hands them to the metrics
        seen["preds"] = preds
        return score(names, preds, refs)
    scores.score = keep
    spec, examples = eval_examples(kind, n)
    cfg = loop.TrainConfig(max_len=32, batch_size=batch, gen_tokens=5, fsdp=fsdp)
    result = evaluation.evaluate(model, load_tokenizer(model_dir), spec, examples, cfg, 0, torch.device("cpu"),
                                 torch.autocast("cpu", enabled=False))
    scores.score = score
    return {"scores": result, "preds": seen["preds"], "forwards": len(forwards)}


def generate_until(model_dir: str, eos: int) -> list[int]:
    """Greedy generation under FSDP2 from rank r's own prompt (PROMPTS[r]) with stop id `eos`, every step run
    (early_stop False), as slora.train.evaluation generates under FSDP2."""
    model = load_model(model_dir)
    data_parallel.wrap(model, True)
    ids = torch.tensor([PROMPTS[process_group.get().rank]])
    out = model.generate(ids, max_new_tokens=8, eos_token_id=eos, early_stop=False)
    return out[0].tolist()


PROMPTS = [[14, 6], [8, 8, 19, 4, 10]]  # token ids of the tiny vocabulary: rank 0 and rank 1's prompts


if __name__ == "__main__":
    what, *rest = sys.argv[1:]
    d = process_group.init(os.environ.get("SLORA_TEST_DEVICE", "cpu"))  # cuda: tests/dist/test_data_parallel.py's gpu tier
    with process_group.guard():
        if what == "calib":
            kind, model_dir, n_seq, batch, mode, out = rest
            res = calibrate(kind, model_dir, int(n_seq), int(batch), mode)
            with open(f"{out}.{d.rank}.json", "w") as f:
                json.dump(res, f)
        elif what == "grads":
            model_dir, batch, accum, fsdp, out = rest
            g = grads(model_dir, int(batch), int(accum), "fsdp" in fsdp, "ckpt" in fsdp,
                      lm_chunk=3 if "chunk" in fsdp else None)  # 3 of at most 11 positions: several chunks
            save_file(g, f"{out}.{d.rank}.safetensors")
        elif what == "eval":  # test_sharded_fsdp_evaluation_matches_one_process
            kind, model_dir, n, batch, out = rest
            with open(f"{out}.{d.rank}.json", "w") as f:
                json.dump(evaluate_split(kind, model_dir, int(n), int(batch), True), f)
        elif what == "generate":  # test_fsdp_generation_stops_together
            model_dir, eos, out = rest
            with open(f"{out}.{d.rank}.json", "w") as f:
                json.dump(generate_until(model_dir, int(eos)), f)
        elif what == "mismatch":  # test_lora_shape_mismatch_is_an_error_on_every_rank
            model = load_model(rest[0])
            names = list(targets.find_linears(model, "q_proj,v_proj"))
            apply_lora(model, {n: 2 + (d.rank == 1 and i == 1) for i, n in enumerate(names)}, 4.0)
            mark_only_lora_trainable(model, extra=())
            data_parallel.wrap(model, rest[1] == "fsdp")
        elif what == "fail":  # test_failure_inside_a_collective_is_reported
            process_group.all_reduce_sum(torch.ones(1))
            if d.rank == 1:
                raise ValueError("injected on rank 1")
            process_group.all_reduce_sum(torch.ones(1))  # never completes: rank 1 is gone
        else:
            raise SystemExit(f"unknown worker task {what!r}")
    process_group.teardown()
