"""Slow tier: slora's own model code on the real offline checkpoints (fetched by `python -m slora.assets`).

Pinned numbers and where they come from:
- SmolLM2 perplexity: 18.37 on the first 256 tokens (210 here: the text is shorter) of the Wikipedia summary
  "20th-century classical music", measured with this code on 2026-11-29; assets.md saw 17.95 on another summary
  with transformers. A wrong q/k un-permutation gives ~221, so the band [15, 22] separates right from wrong.
- MiniLM token ids: transformers' BertTokenizer built from the shipped vocab.txt (not from tokenizer.json).
- MPNet cosines: transformers 5.24.0 `AutoModel` (MPNetModel) on all-mpnet-base-v2, the same padded ids from
  slora's tokenizer, mean pooling, measured 2026-12-01 (`tests/comparisons/mpnet_compat.py` compares the hidden states).
"""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from slora.io.assets import data_dir, model_dir
from slora.io.model_folder import load_model, load_tokenizer
from slora.models.bert import mean_pool
from tests.support.bounds import assert_within, measured_bound

pytestmark = pytest.mark.slow

SENTENCE = "The movie's plot was surprisingly clever, but 42 minutes too long!"
MINILM_IDS = [101, 1996, 3185, 1005, 1055, 5436, 2001, 10889, 12266, 1010, 2021, 4413, 2781, 2205, 2146, 999, 102]
MPNET_COSINES = [0.66011, -0.02767, 0.09256]  # (eating food, bread), (food, stock market), (bread, stock market)
CHATML = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def smollm2():
    path = model_dir("smollm2")
    return load_model(path), load_tokenizer(path)


@pytest.fixture(scope="module")
def minilm():
    path = model_dir("minilm")
    return load_model(path), load_tokenizer(path)


def test_smollm2_perplexity_on_wikipedia(smollm2):
    model, tok = smollm2
    wiki = json.loads((data_dir("wiki") / "summaries_en-us.json").read_text())
    ids = torch.tensor([tok.encode(wiki["20th-century classical music"]["extract"]).ids[:256]])
    with torch.no_grad():
        nll = F.cross_entropy(model(ids)[0, :-1], ids[0, 1:])
    ppl = math.exp(nll.item())
    assert 15.0 < ppl < 22.0, ppl


def test_smollm2_answers_paris(smollm2):
    model, tok = smollm2
    prompt = torch.tensor([tok.encode(CHATML).ids])
    out = model.generate(prompt, max_new_tokens=20)
    answer = tok.decode(out[0, prompt.shape[1]:].tolist())
    assert "Paris" in answer, answer


# two paraphrases and one sentence on another topic
PARAPHRASES = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."]


def padded_batch(tok, sentences, pad_id):
    """Right-padded ids (B, T) and attention mask (B, T) of `sentences`, padded with `pad_id`."""
    enc = tok.encode_batch(sentences)
    T = max(len(e.ids) for e in enc)
    ids = torch.tensor([e.ids + [pad_id] * (T - len(e.ids)) for e in enc])
    mask = torch.tensor([[1] * len(e.ids) + [0] * (T - len(e.ids)) for e in enc])
    return ids, mask


def test_minilm_tokenizer_ids(minilm):
    _, tok = minilm
    assert tok.encode(SENTENCE).ids == MINILM_IDS


def test_minilm_paraphrases_are_closer_than_cross_topic(minilm):
    model, tok = minilm
    ids, mask = padded_batch(tok, PARAPHRASES, pad_id=0)
    with torch.no_grad():
        e = F.normalize(mean_pool(model(ids, mask), mask), dim=-1)
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[1, 2] + 0.3, sim


@pytest.fixture(scope="module")
def mpnet():
    from slora.io.assets import ASSETS, is_built
    if not is_built(ASSETS["mpnet"]):
        pytest.skip("optional asset mpnet is not built (python -m slora.assets --only mpnet)")
    path = model_dir("mpnet")
    return load_model(path), load_tokenizer(path)


def test_mpnet_tokenizer_padding_and_truncation_are_off(mpnet):
    _, tok = mpnet
    short, long = tok.encode("A man is eating food."), tok.encode(" ".join([SENTENCE] * 20))
    assert short.ids[0] == 0 and short.ids[-1] == 2 and 1 not in short.ids  # <s> … </s>, no <pad> (id 1)
    assert len(long.ids) > 128  # the file's own truncation at 128 would cut it


def test_mpnet_sentence_similarities_match_transformers(mpnet):
    # all-mpnet-base-v2 is a sentence-embedding model with mean pooling (its 1_Pooling/config.json). The pinned
    # cosines come from transformers 5.24.0's MPNetModel on the same ids (see the module docstring), in fp32 on
    # another machine: they agree within half a unit of their 5 decimals plus bounds.measured_bound of this run's
    # fp32 cosines against the same model in float64 (the other implementation's fp32 error has the same size).
    # The relative-position bias matters here: with the bias table zeroed slora gives 0.795 / 0.219 / 0.216,
    # flipped 0.764 / 0.167 / 0.167, far outside that.
    model, tok = mpnet
    ids, mask = padded_batch(tok, PARAPHRASES, pad_id=1)
    def cosines(m):
        with torch.no_grad():
            e = F.normalize(mean_pool(m(ids, mask), mask), dim=-1)
        sim = e @ e.T
        return sim, torch.stack([sim[0, 1], sim[0, 2], sim[1, 2]])
    sim, got = cosines(model)
    _, got64 = cosines(copy.deepcopy(model).double())
    assert_within(got, MPNET_COSINES, 0.5e-5 + measured_bound(got, got64), "cosines")
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[1, 2] + 0.3, sim
