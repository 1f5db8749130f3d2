"""slora.errors: the one-line convention, its exit statuses and SLORA_DEBUG, for every kind of exception."""
import signal

import pytest

from slora.cli.runner import ArgumentParser, one_line, run_cli
from slora.errors import SloraError, Terminated, UsageError, sigterm_as_interrupt


def raising(e):
    def main(argv):
        raise e
    return main


def noted(e, note):
    e.add_note(note)
    return e


@pytest.mark.parametrize("exc,code,line", [
    (SloraError("d/t.jsonl:3", "label 7 is outside 0..1"), 1, "error: d/t.jsonl:3: label 7 is outside 0..1"),
    (UsageError("--lr", "must be finite"), 2, "error: --lr: must be finite"),
    (ValueError("model/config.json: bad"), 1, "error: model/config.json: bad"),
    (KeyError("apply_lora: no module named 'x'"), 1, "error: apply_lora: no module named 'x'"),  # no quotes around
    (FileNotFoundError(2, "No such file or directory", "/no/such"), 1, "error: /no/such: No such file or directory"),
    (ValueError("first line\n  second line"), 1, "error: first line second line"),  # always one line
    (FloatingPointError("step 3: loss nan is not finite"), 1, "error: step 3: loss nan is not finite"),
    (RuntimeError("CUDA out of memory"), 1,
     "error: unexpected RuntimeError: CUDA out of memory (run with SLORA_DEBUG=1 for the traceback)"),
    # nothing is claimed about clean-up unless the code that cleaned up said so (a note on the exception)
    (KeyboardInterrupt(), 130, "error: interrupted"),
    (Terminated("signal 15"), 143, "error: terminated by SIGTERM"),
    (noted(Terminated("signal 15"), "temporary files were removed (x)"), 143,
     "error: terminated by SIGTERM; temporary files were removed (x)"),
])
def test_each_failure_is_one_line_with_its_status(exc, code, line, capsys, monkeypatch):
    monkeypatch.delenv("SLORA_DEBUG", raising=False)
    assert run_cli(raising(exc), []) == code
    err = capsys.readouterr().err
    assert err == line + "\n"


def test_debug_prints_the_traceback_first(capsys, monkeypatch):
    monkeypatch.setenv("SLORA_DEBUG", "1")
    assert run_cli(raising(SloraError("x.json", "bad")), []) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.rstrip().splitlines()[-1] == "error: x.json: bad"


def test_argparse_errors_name_the_flag_and_exit_2(capsys):
    def main(argv):
        p = ArgumentParser(prog="python -m slora.x")
        p.add_argument("--lr", type=float)
        p.add_argument("path")
        p.parse_args(argv)
    assert run_cli(main, ["--lr", "fast", "p"]) == 2
    assert capsys.readouterr().err.startswith("error: --lr: invalid float value: 'fast'")
    assert run_cli(main, []) == 2
    assert capsys.readouterr().err.startswith("error: python -m slora.x: the following arguments are required: path")
    with pytest.raises(SystemExit) as e:  # --help still prints and exits 0
        run_cli(main, ["--help"])
    assert e.value.code == 0


def test_success_returns_main_status():
    assert run_cli(lambda argv: None, []) == 0
    assert run_cli(lambda argv: 3, []) == 3


def test_sigterm_handler_only_inside_the_block():
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with sigterm_as_interrupt():
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        with sigterm_as_interrupt():  # nested: the outer handler stays
            pass
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_one_line_of_an_exception_without_message():
    assert one_line(ValueError()) == "ValueError"
