"""slora/models/recompute.py: which layers of a stack recompute under each setting (the gradients of partial
recomputation are checked bit for bit in tests/train/test_memory.py)."""
from slora.models.recompute import recomputed


def test_recomputed_settings():
    assert [recomputed(False, i) for i in range(3)] == [False] * 3
    assert [recomputed(True, i) for i in range(3)] == [True] * 3
    assert [recomputed(2, i) for i in range(4)] == [True, True, False, False]
    assert [recomputed(0, i) for i in range(2)] == [False, False]
