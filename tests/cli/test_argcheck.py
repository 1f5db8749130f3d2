"""slora/cli/argcheck.py and the argument parsing of `python -m slora.finetune`: values refused before anything loads,
each with one line naming the flag (exit 2), nothing written. The broader corpus is tests/cli/test_runner_inputs.py.
"""
import pytest

from slora.cli import finetune
from slora.cli.argcheck import check_device, check_ranges
from slora.cli.runner import run_cli
from slora.errors import UsageError
from tests.support.corpus import Case, base, expect_one_line, ft, run_case  # noqa: F401 (base: a fixture)


MAX_LABELS = 2 ** 16  # argcheck.COUNT_MAX["num_labels"]


def flag(name, value, culprit=None):
    return Case(f"{name}={value}", lambda t, b: ft(t, b, name, value), 2, culprit or name)


FLAGS = [
    # torch accepts "cpu:7" as a device name; the first tensor read there failed, blamed on the model file
    flag("--device", "cpu:7"), flag("--device", "cpu:1"),
    # AdamW's decoupled decay p <- p·(1 - lr·λ): λ = 1e12 wrote an adapter of values near 7e17
    flag("--weight-decay", "1e12"), flag("--weight-decay", "1.5"), flag("--weight-decay", "inf"),
    Case("lr-times-weight-decay-1", lambda t, b: ft(t, b, "--lr", "2", "--weight-decay", "0.5"), 2, "--weight-decay"),
    # a label count of 10⁸ would allocate a head of 10⁸ rows before the first step
    flag("--num-labels", 10 ** 8), flag("--num-labels", MAX_LABELS + 1),
    # auto measures a CUDA card's memory: on the CPU there is nothing to measure
    flag("--activation-checkpointing", "auto"), flag("--activation-checkpointing", "some"),
    flag("--activation-checkpointing", "-1"),
    # torch's CPU code generator gave NaN gradients for compiled layers on the AVX2 path
    Case("compile-cpu", lambda t, b: ft(t, b, "--compile"), 2, "--compile"),
]


@pytest.mark.parametrize("case", [c.param() for c in FLAGS])
def test_flags(case, tmp_path, base, capsys):
    run_case(finetune.main, case, tmp_path, base, capsys)
    assert not (tmp_path / "run").exists()


def test_bounds_accept_their_edges():
    assert check_device("cpu").type == "cpu" and check_device("cpu:0").index == 0
    args = finetune.parse_args(["--weight-decay", "1", "--lr", "0.5", "--task", "jsonl", "--train-file", "x",
                                "--num-labels", str(MAX_LABELS)])
    check_ranges(args)  # λ = 1 and lr·λ = 0.5 < 1; the largest label count
    with pytest.raises(UsageError, match="--weight-decay"):
        check_ranges(finetune.parse_args(["--weight-decay", "1", "--lr", "1"]))


# -----------------------------------------------------------------------------
# --resume takes no other flag, in any form argparse accepts

RESUME_FORMS = {
    "equals": ["--resume=RUN", "--max-steps=12"],               # two tokens: passed a count of argv tokens
    "flag-after": ["--resume", "RUN", "--fused-optim"],         # a store_true flag
    "flag-before": ["--lr", "0.01", "--resume", "RUN"],
    "abbreviations": ["--res", "RUN", "--max-s", "12"],         # argparse's prefixes of --resume and --max-steps
    "a-default-value": ["--resume", "RUN", "--lr", "0.002"],    # the default lr, given explicitly
    "equals-abbreviated": ["--resu=RUN", "--batch=8"],
}


@pytest.mark.parametrize("form", sorted(RESUME_FORMS))
def test_resume_refuses_every_other_flag(form, tmp_path, capsys):
    argv = [a.replace("RUN", str(tmp_path / "run")) for a in RESUME_FORMS[form]]
    code = run_cli(finetune.main, argv)
    _, err = capsys.readouterr()
    expect_one_line(code, 2, err, "--resume")
    named = [a.split("=")[0] for a in RESUME_FORMS[form] if a.startswith("--") and not a.startswith("--res")]
    flags = {"--max-s": "--max-steps", "--batch": "--batch-size"}
    assert all(flags.get(n, n) in err for n in named), err
    assert not (tmp_path / "run").exists()


def test_resume_alone_parses():
    assert finetune.parse_args(["--resume=somewhere"]).resume == "somewhere"
    assert finetune.parse_args(["--res", "somewhere"]).resume == "somewhere"


def test_activation_checkpointing_values():
    parse = finetune.parse_args
    assert parse([]).activation_checkpointing is False
    assert parse(["--activation-checkpointing"]).activation_checkpointing is True
    assert parse(["--activation-checkpointing", "all"]).activation_checkpointing is True
    assert parse(["--activation-checkpointing", "auto"]).activation_checkpointing == "auto"
    assert parse(["--activation-checkpointing", "3"]).activation_checkpointing == 3


def test_compile_and_auto_refused_under_torchrun(tmp_path, base, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for case in (Case("compile-torchrun", lambda t, b: ft(t, b, "--compile"), 2, "--compile"),):
        run_case(finetune.main, case, tmp_path, base, capsys)
