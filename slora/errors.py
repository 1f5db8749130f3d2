"""slora's error types, raised by every layer above the method and printed by the command runner
(slora.cli.runner) as one line: `error: <culprit>: <message>`.

    SloraError(culprit, message)   a bad input, naming its file (and line), tensor, module or flag
    UsageError(flag, message)      an invalid command-line argument (exit status 2)
    Terminated                     SIGTERM, raised as a KeyboardInterrupt so it cleans up as Ctrl-C does
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


class SloraError(ValueError):
    """A failure that names its culprit (a file, `file:line`, tensor, module or `--flag`). A ValueError: bad input
    is what it reports, and callers that catch ValueError keep working."""

    def __init__(self, culprit, message: str):
        self.culprit, self.message = str(culprit), message
        super().__init__(f"{culprit}: {message}")


class UsageError(SloraError):
    """An invalid command-line argument: exit status 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program stands so that it unwinds exactly as Ctrl-C does (temporary folders
    removed by their `finally`/`except BaseException` blocks)."""


def _on_sigterm(signum, frame):
    raise Terminated(f"signal {signum}")


@contextmanager
def sigterm_as_interrupt():
    """Inside the block SIGTERM raises `Terminated` (a KeyboardInterrupt) instead of killing the process at once.

    Only the main thread may set signal handlers; elsewhere, or when a handler other than the default is already
    installed (an outer block, or the embedding program's own), this changes nothing.
    """
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


