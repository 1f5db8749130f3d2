"""slora/data/tasks.py: class labels of JSONL classification are bounded before anything of their size is allocated.

Without --num-labels the classes are those seen in training, 0..K-1 with K = 1 + the largest label; one label of 10⁸
used to build the set of range(K) to find the missing classes (9 GB), then fail with an unexpected MemoryError.
"""
import tracemalloc

import pytest

from slora.data import tasks
from slora.errors import SloraError
from tests.support.tiny import write_jsonl

HUGE = 10 ** 7  # a structure with one entry per class of range(HUGE) takes hundreds of MB


def rows(top):
    out = [{"text": f"the movie was {w}", "label": i % 2} for i, w in enumerate(["good", "bad"] * 5)]
    out[3]["label"] = top
    return out


def test_a_huge_label_is_an_error_naming_its_line_without_allocating_its_count(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", rows(HUGE))
    tracemalloc.start()
    try:
        with pytest.raises(SloraError, match=rf"train.jsonl:4: label {HUGE}, but no training example has class 2, "
                                             r"3, 4, 5, 6 \.\.\.; labels must be 0\.\.K-1"):
            tasks.load_jsonl("classification", train, train)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # anything of one byte per class would be HUGE bytes; reading ten records needs a few kB
    assert peak < HUGE // 10, f"peak {peak:,} bytes"


def test_stated_classes_bound_every_label(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", rows(1))
    dev = write_jsonl(tmp_path / "dev.jsonl", rows(HUGE))
    with pytest.raises(SloraError, match=rf"dev.jsonl:4: label {HUGE} is outside the classes 0..2 stated"):
        tasks.load_jsonl("classification", train, dev, num_labels=3)
    spec, _ = tasks.load_jsonl("classification", train, train, num_labels=3)
    assert spec.num_labels == 3


def test_consecutive_labels_give_their_count(tmp_path):
    data = [{"text": "a", "label": i % 5} for i in range(10)]
    train = write_jsonl(tmp_path / "train.jsonl", data)
    assert tasks.load_jsonl("classification", train, train)[0].num_labels == 5
