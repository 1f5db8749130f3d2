"""slora/io/model_folder.py: a model folder's tokenizer is checked against its embedding when it is loaded.

A tokenizer.json from another model used to fail at the first batch with torch's `index out of range in self`;
now the load names the file and both sizes (the tokenizer's ids, config.json's vocab_size), and the config's pad and
eos ids, which slora puts into batches, are checked the same way."""
import json
import shutil

import pytest

from slora.cli import finetune
from slora.errors import SloraError
from slora.io.model_folder import load_tokenizer
from tests.support.corpus import Case, base, ft, run_case  # noqa: F401 (base: a fixture)
from tests.support.tiny import WORDS, tiny_model_dir


def with_config(folder, dest, **change):
    shutil.copytree(folder, dest)
    config = json.loads((dest / "config.json").read_text()) | change
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_tokenizer_of_a_larger_vocabulary_is_refused_naming_both_sizes(tmp_path):
    enc = tiny_model_dir(tmp_path / "enc", "encoder")
    n = json.loads((enc / "config.json").read_text())["vocab_size"]
    small = with_config(enc, tmp_path / "small", vocab_size=n - 1)  # the tokenizer's last id has no embedding row
    with pytest.raises(SloraError, match=rf"{small / 'tokenizer.json'}: token .* has id {n - 1}, but the model embeds "
                                         rf"{n - 1} tokens \(config.json vocab_size\): the tokenizer's {n} ids"):
        load_tokenizer(small)
    assert load_tokenizer(with_config(enc, tmp_path / "padded", vocab_size=n + 64)).get_vocab_size() == n
    assert load_tokenizer(small / "tokenizer.json").get_vocab_size() == n  # a file alone: nothing to check against


@pytest.mark.parametrize("key", ["pad_token_id", "eos_token_id"])
def test_special_ids_outside_the_vocabulary_are_refused(tmp_path, key):
    dec = tiny_model_dir(tmp_path / "dec", "decoder")
    n = json.loads((dec / "config.json").read_text())["vocab_size"]
    bad = with_config(dec, tmp_path / "bad", **{key: n})
    with pytest.raises(SloraError, match=rf"{bad / 'config.json'}: {key} {n} is outside the vocabulary of {n}"):
        load_tokenizer(bad)
    listed = with_config(dec, tmp_path / "listed", eos_token_id=[2, n + 5])  # LLaMA-3.1 lists several eos ids
    with pytest.raises(SloraError, match=rf"eos_token_id {n + 5} is outside"):
        load_tokenizer(listed)


def other_tokenizer(t, b):
    """The encoder's folder with the tokenizer of a larger model: the same words, each 100 ids further on."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(specials + [f"filler{i}" for i in range(100)] + list(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "removed")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                 ("[SEP]", 3)])
    model = shutil.copytree(b["enc"], t / "model")
    tok.save(str(model / "tokenizer.json"))
    return ft(t, b, model=model)


def test_finetune_with_the_tokenizer_of_another_model_fails_in_one_line(tmp_path, base, capsys):
    err = run_case(finetune.main, Case("other-tokenizer", other_tokenizer, 1, "{tmp}/model/tokenizer.json"),
                   tmp_path, base, capsys)
    assert "the model embeds" in err and "index out of range" not in err
