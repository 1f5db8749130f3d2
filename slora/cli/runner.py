"""One error convention for every slora command: a failure is one line on stderr, never a traceback.

  error: <culprit>: <what is wrong and what to do>

The culprit is the file (with its line), tensor, module or argument the failure is about. Exit status 2 for
invalid arguments (argparse's convention), 1 for a bad input or a failed run, 130 for Ctrl-C and 143 for
SIGTERM (128 + the signal number, the shell's convention). `SLORA_DEBUG=1` prints the traceback first.

Every `python -m slora.<command>` ends with `cli(main)`. Library code raises the error types of slora.errors
(`SloraError(culprit, message)`), or a built-in error whose message starts with the culprit
(`ValueError(f"{path}: ...")`); errors from below (json, UnicodeDecodeError, tokenizers, safetensors, re) are
caught where the file or value is known and re-raised naming it, so the runner never has to guess.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

from slora.errors import Terminated, UsageError, sigterm_as_interrupt


EXIT_FAILED = 1      # a bad input or a failed run
EXIT_USAGE = 2       # invalid arguments (argparse's own status)
EXIT_INTERRUPT = 130  # 128 + SIGINT
EXIT_TERM = 143       # 128 + SIGTERM


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors raised as UsageError (one line, exit 2) instead of usage text plus SystemExit."""

    def error(self, message):
        # argparse's own messages read "argument --lr: invalid float value: 'x'"
        if message.startswith("argument ") and ": " in message:
            flag, _, what = message[len("argument "):].partition(": ")
            raise UsageError(flag.split("/")[0], f"{what} (see {self.prog} --help)")
        raise UsageError(self.prog, f"{message} (see {self.prog} --help)")


def one_line(e: BaseException) -> str:
    """The `<culprit>: <message>` text of an exception, on one line."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:  # "[Errno 13] ...: 'x'" otherwise
        text = f"{e.filename}: {e.strerror}"
    elif isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        text = e.args[0]  # str(KeyError) would wrap the message in quotes
    elif isinstance(e, (ValueError, TypeError, OSError, LookupError, ArithmeticError)) or \
            type(e).__module__.startswith("slora."):  # slora's own error types put the culprit first
        text = str(e)
    else:  # not raised by slora's own checks: say what it is and where the traceback can be seen
        text = f"unexpected {type(e).__name__}: {e} (run with SLORA_DEBUG=1 for the traceback)"
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(e).__name__


def run_cli(main, argv=None) -> int:
    """Run `main(argv)` under the convention; return the exit status instead of exiting (tests call this)."""
    debug = os.environ.get("SLORA_DEBUG", "") not in ("", "0")
    try:
        with sigterm_as_interrupt():
            status = main(argv)
        return status if isinstance(status, int) else 0
    except SystemExit:  # --help and --version exit 0 through argparse
        raise
    except BaseException as e:  # the one place that turns every failure into the one-line convention
        if debug:
            traceback.print_exc()
        # what was cleaned up or kept is said by the code that did it (its notes on the exception), never assumed
        notes = "".join(f"; {n}" for n in getattr(e, "__notes__", ()))
        if isinstance(e, Terminated):
            print(f"error: terminated by SIGTERM{notes}", file=sys.stderr)
            return EXIT_TERM
        if isinstance(e, KeyboardInterrupt):
            print(f"error: interrupted{notes}", file=sys.stderr)
            return EXIT_INTERRUPT
        print(f"error: {one_line(e)}{notes}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, UsageError) else EXIT_FAILED


def cli(main):
    """`if __name__ == "__main__": cli(main)`: run main on sys.argv[1:] and exit with the convention's status."""
    sys.exit(run_cli(main, sys.argv[1:]))
