"""Hugging Face-folder I/O: bit-exact round trips, sharding, strict loading that names the culprit."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from slora.io.model_folder import load_model, save_model
from tests.support.tiny import tiny_bert, tiny_llama


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("make", [lambda: tiny_llama(seed=1), lambda: tiny_llama(seed=1, tie_word_embeddings=True),
                                  lambda: tiny_bert(seed=1), lambda: tiny_bert(seed=1, model_type="roberta",
                                                                               pad_token_id=1)])
@pytest.mark.parametrize("shard", [None, 20_000])
def test_save_load_round_trip_is_bit_exact(tmp_path, make, shard):
    m = make()
    save_model(m, tmp_path / "ckpt", max_shard_bytes=shard)
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    if shard:
        assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    else:
        assert "model.safetensors" in files
    back = load_model(tmp_path / "ckpt")
    _same_state(m, back)
    ids = torch.randint(3, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(m(ids), back(ids))


def test_tied_lm_head_is_not_written_and_is_tied_after_load(tmp_path):
    save_model(tiny_llama(tie_word_embeddings=True), tmp_path / "c")
    assert "lm_head.weight" not in load_file(tmp_path / "c" / "model.safetensors")
    back = load_model(tmp_path / "c")
    assert back.lm_head.weight is back.model.embed_tokens.weight


def test_load_casts_dtype(tmp_path):
    save_model(tiny_bert(), tmp_path / "c")
    m = load_model(tmp_path / "c", dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}


def _edit(tmp_path, fn):
    save_model(tiny_llama(seed=2), tmp_path / "c")
    f = tmp_path / "c" / "model.safetensors"
    sd = load_file(f)
    fn(sd)
    save_file(sd, f)
    return tmp_path / "c"


def test_missing_tensor_is_named(tmp_path):
    path = _edit(tmp_path, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor\(s\): model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(path)


def test_unexpected_tensor_is_named(tmp_path):
    path = _edit(tmp_path, lambda sd: sd.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\): model\.layers\.0\.extra\.weight"):
        load_model(path)


def test_misshaped_tensor_is_named(tmp_path):
    path = _edit(tmp_path, lambda sd: sd.update({"model.norm.weight": torch.ones(7)}))
    with pytest.raises(ValueError, match=r"model\.norm\.weight: files \(7,\) vs model \(32,\)"):
        load_model(path)


def test_unsupported_model_type(tmp_path):
    save_model(tiny_bert(), tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        load_model(tmp_path / "c")


def test_config_missing_a_field(tmp_path):
    save_model(tiny_llama(), tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    del cfg["intermediate_size"]
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json.*missing required field\(s\): intermediate_size"):
        load_model(tmp_path / "c")


def test_truncated_safetensors_file(tmp_path):
    save_model(tiny_llama(), tmp_path / "c")
    f = tmp_path / "c" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors: cannot read safetensors file"):
        load_model(tmp_path / "c")


def test_missing_shard_is_named(tmp_path):
    save_model(tiny_llama(), tmp_path / "c", max_shard_bytes=20_000)
    shard = sorted((tmp_path / "c").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_model(tmp_path / "c")


def test_checkpoint_saved_inside_a_task_model_loads(tmp_path):
    # transformers' BertForSequenceClassification saves the body under `bert.`; the encoder loads it without rename.
    m = tiny_bert(seed=5)
    save_model(m, tmp_path / "c")
    f = tmp_path / "c" / "model.safetensors"
    sd = {"bert." + k: v for k, v in load_file(f).items()}
    sd["bert.embeddings.position_ids"] = torch.arange(64)[None]
    save_file(sd, f)
    _same_state(m, load_model(tmp_path / "c"))


def test_nonfinite_count_screens_by_sum_and_counts_exactly():
    from slora.io.weights import nonfinite_count
    big = torch.full((4,), 3e38)  # finite entries whose fp32 sum overflows: not a damaged tensor
    assert nonfinite_count(big) == 0
    x = torch.randn(100, dtype=torch.bfloat16)
    x[[3, 50]] = torch.tensor([float("nan"), float("-inf")], dtype=torch.bfloat16)
    assert nonfinite_count(x) == 2
    both = torch.tensor([float("inf"), float("-inf"), 1.0])  # inf + -inf sums to nan: still found
    assert nonfinite_count(both) == 2
    assert nonfinite_count(torch.arange(5)) == 0  # integer tensors hold no NaN
