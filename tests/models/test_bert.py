"""BERT/RoBERTa encoder: padding invariance, RoBERTa position ids, pooling."""
import copy

import pytest
import torch

from slora.models.bert import BertConfig, mean_pool, position_ids_for
from tests.support.bounds import assert_within, oracles_bound
from tests.support.tiny import tiny_bert, tiny_bert_config


@pytest.mark.parametrize("model_type,pad", [("bert", 0), ("roberta", 1)])
def test_extra_padding_leaves_real_positions_unchanged(model_type, pad):
    m = tiny_bert(seed=1, model_type=model_type, pad_token_id=pad)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 53, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    more = torch.cat([ids, torch.full((2, 6), pad)], 1)
    more_mask = torch.cat([mask, torch.zeros(2, 6, dtype=torch.long)], 1)
    m64 = copy.deepcopy(m).double()
    with torch.no_grad():
        a, a64 = m(ids, mask), m64(ids, mask)
        full, full64 = m(more, more_mask), m64(more, more_mask)
    b, b64 = full[:, :7], full64[:, :7]
    # The padded keys get exactly zero attention weight, so both compute the same exact values, by kernels of
    # other shapes: within each side's own fp32 error against the same model in float64 (bounds.oracles_bound)
    assert_within(b, a, oracles_bound(b, b64, a, a64), "hidden states")
    pooled, pooled64 = mean_pool(full, more_mask), mean_pool(full64, more_mask)
    want, want64 = mean_pool(a, mask), mean_pool(a64, mask)
    assert_within(pooled, want, oracles_bound(pooled, pooled64, want, want64), "mean pool")


def test_roberta_position_ids_offset_by_padding_idx():
    cfg = tiny_bert_config(model_type="roberta", pad_token_id=1)
    ids = torch.tensor([[0, 5, 6, 2, 1, 1]])
    assert position_ids_for(cfg, ids).tolist() == [[2, 3, 4, 5, 1, 1]]
    bert = tiny_bert_config()
    assert position_ids_for(bert, ids).tolist() == [[0, 1, 2, 3, 4, 5]]


def test_token_type_ids_change_the_output():
    m = tiny_bert(seed=3)
    ids = torch.randint(3, 53, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a = m(ids, token_type_ids=torch.zeros_like(ids))
        b = m(ids, token_type_ids=torch.ones_like(ids))
    assert not torch.allclose(a, b)


def test_bad_config_errors():
    with pytest.raises(ValueError, match="model_type must be 'bert' or 'roberta'"):
        BertConfig(model_type="mpnet")
    with pytest.raises(ValueError, match="hidden_act 'swish2'"):
        BertConfig(hidden_act="swish2")


@pytest.mark.parametrize("model_type,pad,body", [("bert", 0, "bert"), ("roberta", 1, "roberta")])
def test_sequence_classification_names_and_head(model_type, pad, body):
    from slora.models.bert import for_sequence_classification
    enc = tiny_bert(seed=6, model_type=model_type, pad_token_id=pad)
    m = for_sequence_classification(enc, num_labels=3, seed=0).eval()
    names = dict(m.named_modules())
    assert f"{body}.encoder.layer.0.attention.self.query" in names  # transformers' / PEFT's module names
    assert "classifier" in names and getattr(m, body) is enc
    ids = torch.randint(3, 53, (2, 5), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = m(ids)
        h = enc(ids)
        want = (m.classifier(enc.pool(h)) if model_type == "bert" else m.classifier(h))
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits, want, rtol=0, atol=0)  # the same ops on the same shapes: bit-identical
    # the seeded head is reproducible
    again = for_sequence_classification(tiny_bert(seed=6, model_type=model_type, pad_token_id=pad), 3, seed=0)
    for (k, a), (_, b) in zip(m.classifier.state_dict().items(), again.classifier.state_dict().items()):
        assert torch.equal(a, b), k
