"""PEFT-format adapters: round trip, key names, PEFT's pattern resolution replayed, config keys, bad input."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from slora.io.adapter import CONFIG, WEIGHTS, load_adapter, mis_scaled_modules, save_adapter
from slora.models.lora import apply_lora, lora_alphas, lora_modules, lora_ranks
from slora.models.bert import for_sequence_classification
from tests.support.tiny import randomize_lora, tiny_bert, tiny_llama

# The fields of peft 0.21.2's LoraConfig (dataclasses.fields, base PeftConfig fields included), read from the
# installed package with `[f.name for f in dataclasses.fields(peft.LoraConfig)]`. slora must write no other key.
LORA_CONFIG_FIELDS = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out",
    "bias", "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "megatron_config", "megatron_core", "trainable_token_indices", "loftq_config",
    "eva_config", "corda_config", "lora_ga_config", "use_dora", "velora_config", "alora_invocation_tokens",
    "use_qalora", "qalora_group_size", "monteclora_config", "layer_replication", "runtime_config", "lora_bias",
    "target_parameters", "use_bdlora", "arrow_config", "kasa_config", "ensure_weight_tying"}
PREFIX = "base_model.model."


def peft_pattern_key(keys, name):
    """PEFT's get_pattern_key (peft/utils/other.py): first key k with re.match(rf"(.*\\.)?({k})$", name)."""
    for k in keys:
        if re.match(rf"(.*\.)?({k})$", name):
            return k
    return None


def peft_targets(target_modules, name):
    """PEFT's check_target_module_exists for a list: exact name or `.`-suffix."""
    return name in target_modules or any(name.endswith("." + t) for t in target_modules)


def llama_ranks(n_layers):
    """Unequal ranks over q/v/down of every layer, with zeros, deterministic."""
    ranks = {}
    for i in range(n_layers):
        for j, kind in enumerate(("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")):
            ranks[f"model.layers.{i}.{kind}"] = (3 * i + 2 * j) % 5  # 0..4
    return ranks


def ids(vocab, seed=0):
    return torch.randint(3, vocab, (2, 7), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def llama_adapter(tmp_path):
    """A 12-layer tiny LLaMA (layer 1 vs 11 tests the anchoring) with "scale" alphas, saved as an adapter."""
    model = tiny_llama(seed=5, num_hidden_layers=12)
    apply_lora(model, llama_ranks(12), alpha=16, alpha_policy="scale")
    randomize_lora(model)
    save_adapter(model, tmp_path / "adapter", "tiny-llama", "CAUSAL_LM")
    return model, tmp_path / "adapter"


# -----------------------------------------------------------------------------
# Round trips

def test_causal_lm_round_trip_gives_identical_outputs(llama_adapter):
    model, folder = llama_adapter
    fresh = tiny_llama(seed=5, num_hidden_layers=12)
    load_adapter(fresh, folder)
    assert lora_ranks(fresh) == lora_ranks(model) and lora_alphas(fresh) == lora_alphas(model)
    assert [m.scaling for m in lora_modules(fresh).values()] == [m.scaling for m in lora_modules(model).values()]
    x = ids(61)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_keys_are_peft_names_of_the_model_modules(llama_adapter):
    model, folder = llama_adapter
    tensors = load_file(str(folder / WEIGHTS))
    linears = {n: m for n, m in tiny_llama(num_hidden_layers=12).named_modules() if isinstance(m, torch.nn.Linear)}
    want = set()
    for name, r in llama_ranks(12).items():
        if r:
            want |= {f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"}
            assert tensors[f"{PREFIX}{name}.lora_A.weight"].shape == (r, linears[name].in_features)
            assert tensors[f"{PREFIX}{name}.lora_B.weight"].shape == (linears[name].out_features, r)
    assert set(tensors) == want


@pytest.mark.parametrize("model_type,pad,body", [("bert", 0, "bert"), ("roberta", 1, "roberta")])
def test_sequence_classification_round_trip_with_head(tmp_path, model_type, pad, body):
    def task_model(head_seed):
        return for_sequence_classification(tiny_bert(seed=2, model_type=model_type, pad_token_id=pad),
                                           num_labels=3, seed=head_seed).eval()
    model = task_model(head_seed=0)
    ranks = {f"{body}.encoder.layer.0.attention.self.query": 3, f"{body}.encoder.layer.0.attention.self.value": 1,
             f"{body}.encoder.layer.1.attention.self.query": 0, f"{body}.encoder.layer.1.attention.self.value": 2}
    apply_lora(model, ranks, alpha=8, alpha_policy="constant", dropout=0.1)
    randomize_lora(model)
    save_adapter(model, tmp_path / "a", "tiny-bert", "SEQ_CLS")
    tensors = load_file(str(tmp_path / "a" / WEIGHTS))
    head_keys = {k for k in tensors if "lora_" not in k}
    assert head_keys == {f"{PREFIX}classifier.{k}" for k in model.classifier.state_dict()}
    fresh = task_model(head_seed=1)  # a different head: the adapter must bring its own
    load_adapter(fresh, tmp_path / "a")
    x = ids(53)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    cfg = json.loads((tmp_path / "a" / CONFIG).read_text())
    assert cfg["modules_to_save"] == ["classifier"] and cfg["task_type"] == "SEQ_CLS"
    assert cfg["lora_dropout"] == 0.1


def test_rslora_round_trip(tmp_path):
    model = apply_lora(tiny_llama(seed=1), {"model.layers.0.self_attn.q_proj": 4, "model.layers.1.mlp.up_proj": 1},
                       alpha=6, alpha_policy="rslora")
    randomize_lora(model)
    save_adapter(model, tmp_path / "a", "x", "CAUSAL_LM")
    assert json.loads((tmp_path / "a" / CONFIG).read_text())["use_rslora"] is True
    fresh = load_adapter(tiny_llama(seed=1), tmp_path / "a")
    assert [m.scaling for m in lora_modules(fresh).values()] == [6 / 2, 6 / 1]
    with torch.no_grad():
        assert torch.equal(fresh(ids(61)), model(ids(61)))


# -----------------------------------------------------------------------------
# The config, checked with PEFT's own rules written out here

def test_config_has_only_lora_config_keys(llama_adapter):
    cfg = json.loads((llama_adapter[1] / CONFIG).read_text())
    assert set(cfg) <= LORA_CONFIG_FIELDS
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    assert cfg["fan_in_fan_out"] is False and cfg["inference_mode"] is True and cfg["modules_to_save"] is None


def test_patterns_match_exactly_one_module_and_resolve_to_slora(llama_adapter):
    model, folder = llama_adapter
    cfg = json.loads((folder / CONFIG).read_text())
    names = [n for n, _ in tiny_llama(num_hidden_layers=12).named_modules() if n]
    for field in ("rank_pattern", "alpha_pattern"):
        for key in cfg[field]:
            hits = [n for n in names if re.match(rf"(.*\.)?({key})$", n)]
            assert len(hits) == 1, (field, key, hits)
    want_r, want_alpha = lora_ranks(model), lora_alphas(model)
    assert len(set(want_alpha.values())) > 2  # "scale" gives unequal alphas: the alpha_pattern is exercised
    for name in names:
        targeted = peft_targets(cfg["target_modules"], name)
        assert targeted == (name in want_r), name
        if targeted:
            rk = peft_pattern_key(cfg["rank_pattern"], name)
            ak = peft_pattern_key(cfg["alpha_pattern"], name)
            r = cfg["rank_pattern"][rk] if rk else cfg["r"]
            alpha = cfg["alpha_pattern"][ak] if ak else cfg["lora_alpha"]
            assert (r, alpha) == (want_r[name], want_alpha[name]), name


def test_rank_zero_modules_are_not_targets(llama_adapter):
    cfg = json.loads((llama_adapter[1] / CONFIG).read_text())
    zeros = [n for n, r in llama_ranks(12).items() if r == 0]
    assert zeros
    for name in zeros:
        assert not peft_targets(cfg["target_modules"], name)
        assert peft_pattern_key(cfg["rank_pattern"], name) is None
    assert all(v > 0 for v in cfg["rank_pattern"].values()) and cfg["r"] > 0


# adapter_config.json exactly as peft 0.21.2 `save_pretrained` wrote it for LoraConfig(r=4, lora_alpha=8,
# target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"layers.1.self_attn.q_proj": 2},
# alpha_pattern={"down_proj": 3}, task_type="CAUSAL_LM") on transformers' LlamaForCausalLM of a tiny slora
# checkpoint (tests/comparisons/peft_compat.py's peft-to-slora case checks the outputs of such an adapter in slora).
PEFT_0_21_2_CONFIG = {
    "alora_invocation_tokens": None, "alpha_pattern": {"down_proj": 3}, "arrow_config": None, "auto_mapping": None,
    "base_model_name_or_path": "/tmp/base", "bias": "none", "corda_config": None, "ensure_weight_tying": False,
    "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
    "init_lora_weights": True, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 8, "lora_bias": False, "lora_dropout": 0.0,
    "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
    "monteclora_config": None, "peft_type": "LORA", "peft_version": "0.21.2", "qalora_group_size": 16, "r": 4,
    "rank_pattern": {"layers.1.self_attn.q_proj": 2}, "revision": None,
    "target_modules": ["down_proj", "q_proj", "v_proj"], "target_parameters": None, "task_type": "CAUSAL_LM",
    "trainable_token_indices": None, "use_bdlora": None, "use_dora": False, "use_qalora": False,
    "use_rslora": False, "velora_config": None}


def test_loads_a_config_written_by_peft(tmp_path):
    """Short target names, default r/alpha, partial patterns: PEFT's suffix and first-match rules decide."""
    model = tiny_llama(seed=3)
    want = {}
    for i in (0, 1):
        want[f"model.layers.{i}.self_attn.q_proj"] = (2 if i == 1 else 4, 8)
        want[f"model.layers.{i}.self_attn.v_proj"] = (4, 8)
        want[f"model.layers.{i}.mlp.down_proj"] = (4, 3)
    lin = dict(model.named_modules())
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for n, (r, _) in want.items():
        tensors[f"{PREFIX}{n}.lora_A.weight"] = torch.randn(r, lin[n].in_features, generator=g)
        tensors[f"{PREFIX}{n}.lora_B.weight"] = torch.randn(lin[n].out_features, r, generator=g)
    (tmp_path / CONFIG).write_text(json.dumps(PEFT_0_21_2_CONFIG))
    save_file(tensors, str(tmp_path / WEIGHTS))
    load_adapter(model, tmp_path)
    assert {n: (m.r, m.alpha) for n, m in lora_modules(model).items()} == want
    assert torch.equal(model.model.layers[1].self_attn.q_proj.lora_B.weight,
                       tensors[f"{PREFIX}model.layers.1.self_attn.q_proj.lora_B.weight"])


# -----------------------------------------------------------------------------
# One global scaling (vLLM drops rank_pattern/alpha_pattern and scales every module by lora_alpha/r)

def global_scaling_updates(folder) -> dict[str, torch.Tensor]:
    """What a loader that applies one lora_alpha/r (α/√r with rsLoRA) to every module computes: {module: s·B A},
    float64 (vLLM `lora/peft_helper.py` vllm_lora_scaling_factor)."""
    config = json.loads((folder / CONFIG).read_text())
    s = config["lora_alpha"] / (config["r"] ** 0.5 if config["use_rslora"] else config["r"])
    tensors = load_file(str(folder / WEIGHTS))
    names = {k[len(PREFIX):-len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")}
    return {n: s * tensors[f"{PREFIX}{n}.lora_B.weight"].double() @ tensors[f"{PREFIX}{n}.lora_A.weight"].double()
            for n in names}


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("policy", ["constant", "scale", "rslora"])
def test_one_global_scaling_loader_gets_slora_update(tmp_path, policy, fold):
    model = tiny_llama(seed=5, num_hidden_layers=4)
    apply_lora(model, llama_ranks(4), alpha=16, alpha_policy=policy)
    randomize_lora(model)
    save_adapter(model, tmp_path / "a", "tiny-llama", "CAUSAL_LM", fold_scaling=fold)
    config = json.loads((tmp_path / "a" / CONFIG).read_text())
    # float64 oracle: slora's effective update scaling_w · B_w A_w from the live factors
    layers = lora_modules(model)
    want = {n: m.scaling * m.lora_B.weight.double() @ m.lora_A.weight.double() for n, m in layers.items()}
    # tolerance: folding rounds each entry of B once to fp32 (relative error <= u = 2^-24), so elementwise
    # |Δ| <= u·scaling·(|B| |A|); twice that bound allows for the float64 products
    bound = {n: 2 * 2.0 ** -24 * m.scaling * m.lora_B.weight.double().abs() @ m.lora_A.weight.double().abs()
             for n, m in layers.items()}
    got = global_scaling_updates(tmp_path / "a")
    assert set(got) == set(want)
    exact = fold or policy == "scale"  # "scale" keeps α_w/r_w constant; the others only once folded
    assert (mis_scaled_modules(model, config) == []) == exact
    close = [bool(((got[n] - want[n]).abs() <= bound[n]).all()) for n in want]
    assert all(close) if exact else not all(close)
    # PEFT's rules (patterns honoured) and slora's loader give the same update either way
    fresh = load_adapter(tiny_llama(seed=5, num_hidden_layers=4), tmp_path / "a")
    for n, m in lora_modules(fresh).items():
        d = m.scaling * m.lora_B.weight.double() @ m.lora_A.weight.double()
        assert ((d - want[n]).abs() <= bound[n]).all(), n
    x = ids(61)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=1e-5, atol=1e-5)


def test_scale_policy_global_pair_is_the_common_rank_and_its_alpha(llama_adapter):
    model, folder = llama_adapter
    config = json.loads((folder / CONFIG).read_text())
    ranks = list(lora_ranks(model).values())
    assert config["r"] == max(set(ranks), key=lambda r: (ranks.count(r), -r))  # the most common, ties: smallest
    assert config["lora_alpha"] == lora_alphas(model)[next(n for n, r in lora_ranks(model).items()
                                                           if r == config["r"])]
    assert mis_scaled_modules(model, config) == []


# -----------------------------------------------------------------------------
# Writing

def test_write_is_atomic_and_refuses_foreign_folders(tmp_path, llama_adapter):
    model, folder = llama_adapter
    save_adapter(model, folder, "tiny-llama", "CAUSAL_LM")  # replacing an adapter folder is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary folder left behind
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes"):
        save_adapter(model, other, "x", "CAUSAL_LM")
    assert (other / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("kw,err,match", [
    (dict(task_type="CLASSIFY"), ValueError, "task_type"),
    (dict(task_type="SEQ_CLS"), ValueError, "classifier"),  # LLaMA has no classification head
    (dict(task_type="CAUSAL_LM", modules_to_save=["head"]), ValueError, "head"),
])
def test_bad_save_arguments(tmp_path, kw, err, match):
    model = apply_lora(tiny_llama(), {"model.layers.0.self_attn.q_proj": 2}, alpha=4)
    with pytest.raises(err, match=match):
        save_adapter(model, tmp_path / "a", "x", **kw)
    assert not (tmp_path / "a").exists()


def test_save_without_lora_or_with_mixed_rslora_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layer"):
        save_adapter(tiny_llama(), tmp_path / "a", "x", "CAUSAL_LM")
    m = apply_lora(tiny_llama(), {"model.layers.0.self_attn.q_proj": 2}, alpha=4, alpha_policy="rslora")
    apply_lora(m, {"model.layers.0.self_attn.v_proj": 2}, alpha=4, alpha_policy="constant")
    with pytest.raises(ValueError, match="use_rslora"):
        save_adapter(m, tmp_path / "a", "x", "CAUSAL_LM")


# -----------------------------------------------------------------------------
# Reading bad adapters

def _edit(folder, config=None, tensors=None):
    if config is not None:
        cfg = json.loads((folder / CONFIG).read_text())
        cfg.update(config)
        (folder / CONFIG).write_text(json.dumps(cfg))
    if tensors is not None:
        t = load_file(str(folder / WEIGHTS))
        tensors(t)
        save_file(t, str(folder / WEIGHTS))


Q0A = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"  # rank 0 in llama_ranks: not in the adapter
V0A = f"{PREFIX}model.layers.0.self_attn.v_proj.lora_A.weight"  # rank 2


@pytest.mark.parametrize("config,tensors,match", [
    (None, lambda t: t.pop(V0A), f"missing tensor.*{re.escape(V0A)}"),
    (None, lambda t: t.update({Q0A: torch.zeros(2, 32)}), f"unexpected tensor.*{re.escape(Q0A)}"),
    (None, lambda t: t.update({V0A: torch.zeros(3, 32)}), f"mis-shaped.*{re.escape(V0A)}"),
    ({"use_dora": True}, None, "use_dora"),
    ({"layers_to_transform": [0]}, None, "layers_to_transform"),
    ({"bias": "all"}, None, "bias"),
    ({"peft_type": "ADALORA"}, None, "peft_type"),
    ({"init_lora_weights": "pissa"}, None, "pissa"),
    ({"target_modules": ["nothing_here"], "rank_pattern": {}, "alpha_pattern": {}}, None, "match no module"),
    ({"rank_pattern": {"q_proj": 0}}, None, "integer > 0"),
])
def test_bad_adapters_are_errors_naming_the_culprit(llama_adapter, config, tensors, match):
    _, folder = llama_adapter
    _edit(folder, config, tensors)
    fresh = tiny_llama(seed=5, num_hidden_layers=12)
    with pytest.raises((ValueError, TypeError), match=match):
        load_adapter(fresh, folder)
    assert not lora_modules(fresh)  # nothing was applied


def test_missing_files_and_double_load(tmp_path, llama_adapter):
    _, folder = llama_adapter
    with pytest.raises(FileNotFoundError, match=CONFIG):
        load_adapter(tiny_llama(), tmp_path / "nowhere")
    m = load_adapter(tiny_llama(seed=5, num_hidden_layers=12), folder)
    with pytest.raises(ValueError, match="already has a LoRA layer"):
        load_adapter(m, folder)
    (folder / WEIGHTS).write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match=WEIGHTS):
        load_adapter(tiny_llama(seed=5, num_hidden_layers=12), folder)
