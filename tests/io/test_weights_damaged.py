"""A damaged safetensors file is named wherever slora reads one: a model folder (slora/io/weights.py, through
`python -m slora.finetune`), an adapter given to `python -m slora.merge` (slora/io/adapter.py, slora/io/merge.py),
a base given to merge. Each is one line `error: <file>: ...`, never `unexpected SafetensorError`. (A training
checkpoint's file: tests/train/test_resume.py.)"""
import shutil
import struct

import pytest

from slora.cli import finetune, merge as merge_cmd
from tests.support.corpus import Case, base, ft, run_case  # noqa: F401 (base: a fixture)


def garbage_header(path):
    raw = bytearray(path.read_bytes())
    raw[8:20] = b"not a header"  # the JSON header starts after its 8-byte length
    path.write_bytes(bytes(raw))


def truncated(path):
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) // 2])


def empty(path):
    path.write_bytes(b"")


def header_too_long(path):
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2 ** 40) + raw[8:])  # a header length beyond the file


DAMAGE = {f.__name__: f for f in (garbage_header, truncated, empty, header_too_long)}


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory):
    """A complete encoder run (SEQ_CLS adapter with a head) and a decoder run (CAUSAL_LM), to merge."""
    d = tmp_path_factory.mktemp("runs")
    enc = finetune.main([str(a) for a in ft(d / "e", base)])
    dec = finetune.main([str(a) for a in ft(d / "d", base, model=base["dec"], train=base["gtrain"], dev=base["gdev"],
                                             kind="instructions")])
    return {"enc": enc, "dec": dec}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_model_folder_is_named(damage, tmp_path, base, capsys):
    def make(t, b):
        model = shutil.copytree(b["enc"], t / "model")
        DAMAGE[damage](model / "model.safetensors")
        return ft(t, b, model=model)
    run_case(finetune.main, Case(damage, make, 1, "{tmp}/model/model.safetensors"), tmp_path, base, capsys)


@pytest.mark.parametrize("kind", ["enc", "dec"])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_adapter_given_to_merge_is_named(damage, kind, runs, tmp_path, base, capsys):
    def make(t, b):
        run = shutil.copytree(runs[kind], t / "run")
        DAMAGE[damage](run / "adapter" / "adapter_model.safetensors")
        return [run, t / "merged"]
    err = run_case(merge_cmd.main, Case(damage, make, 1, "{tmp}/run/adapter/adapter_model.safetensors"), tmp_path,
                   base, capsys)
    assert "unexpected" not in err and "does not fit" not in err  # damaged, not a misfit for the base


@pytest.mark.parametrize("damage", ["garbage_header", "truncated"])
def test_damaged_base_given_to_merge_is_named(damage, runs, tmp_path, base, capsys):
    def make(t, b):
        model = shutil.copytree(b["enc"], t / "base")
        DAMAGE[damage](model / "model.safetensors")
        return [runs["enc"], t / "merged", "--base", model]
    run_case(merge_cmd.main, Case(damage, make, 1, "{tmp}/base/model.safetensors"), tmp_path, base, capsys)
