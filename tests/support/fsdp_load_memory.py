"""GPU memory of a sharded load (slora.dist.sharded_load), for the lead to run on N GPUs:

    torchrun --nproc-per-node 2 tests/support/fsdp_load_memory.py [--layers 16 --hidden 2048 --inter 8192 --vocab 128256]

Rank 0 saves a random bf16 LLaMA of that shape (the default is about 1.5 B parameters, 3 GB), then every rank loads
it sharded onto its GPU and runs one forward of 2 x 512 tokens. Each rank prints, as JSON, the model's bytes, its
allocated bytes after the load (expected about 1/N of the model: its shards) and its peak during the forward
(expected its shards plus the root unit and one layer gathered, plus activations). Exit status 1 when the load
holds more than 1/N of the model plus 1 %.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as tdist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from slora.dist import process_group, sharded_load  # noqa: E402
from slora.io.model_folder import meta_model, save_model  # noqa: E402
from tests.support.tiny import fixed_init, tiny_llama_config  # noqa: E402
from slora.models.llama import LlamaForCausalLM  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--device", default="cuda", help="cpu: a smoke run (gloo), memory counted from the shards")
    a = p.parse_args()
    d = process_group.init(a.device)
    cuda = d.device.type == "cuda"
    folder = Path(tempfile.gettempdir()) / f"slora-fsdp-mem-{a.layers}-{a.hidden}-{a.inter}-{a.vocab}"
    cfg = tiny_llama_config(hidden_size=a.hidden, intermediate_size=a.inter, num_hidden_layers=a.layers,
                            num_attention_heads=a.hidden // 128, num_key_value_heads=max(1, a.hidden // 512),
                            vocab_size=a.vocab, max_position_embeddings=1024)
    if d.is_main and not (folder / "model.safetensors.index.json").is_file():
        with torch.device("cpu"):
            model = fixed_init(LlamaForCausalLM(cfg), std=0.02).to(torch.bfloat16)
        save_model(model, folder, max_shard_bytes=2 << 30)
        del model
    tdist.barrier()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = sharded_load.materialise(meta_model(folder, torch.bfloat16), folder, d.device)
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    loaded = torch.cuda.memory_allocated() if cuda else local
    full = sum(p.numel() * p.element_size() for p in model.parameters())  # DTensor: global numel
    ids = torch.randint(3, a.vocab, (2, 512), device=d.device)
    with torch.no_grad():
        model(ids, torch.ones_like(ids))
    peak = torch.cuda.max_memory_allocated() if cuda else None
    print(json.dumps({"rank": d.rank, "world": d.world, "model_gb": full / 1e9, "loaded_gb": loaded / 1e9,
                      "shards_gb": local / 1e9, "loaded_share": loaded / full,
                      "forward_peak_gb": peak and peak / 1e9}), flush=True)
    ok = loaded <= full / d.world * 1.01
    process_group.teardown()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
