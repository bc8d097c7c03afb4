"""SIGTERM as an exception, so that a killed run unwinds like an interrupted one.

Ctrl-C raises KeyboardInterrupt where the process is, and every context manager on the way out
removes its guest, its mounts and its files. A plain `kill` would end the process with none of
that; raising `Terminated` from the handler gives it the same unwinding, then exit status 143.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import NoReturn

EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(BaseException):
    """The process got SIGTERM. A BaseException, like KeyboardInterrupt: no `except Exception`
    may swallow it."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


def _raise(signum: int, frame: object) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated (only the main thread can install handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def ignore_more() -> None:
    """Once an interrupt has unwound the run, what is left (exit handlers, the local cluster's
    close) finishes and the documented status is given: a second SIGINT or SIGTERM then would
    otherwise land after the interpreter has put the default handlers back and end the process
    by the signal itself (seen as status -2 in the kill loop). SIGKILL still ends it."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


def exit_after_cleanup(status: int) -> NoReturn:
    """Run every exit handler (guests, clusters, run directories), then end with `status` itself.
    A plain `sys.exit` leaves the status to the interpreter's finalization, and that can still end
    the process by SIGINT: CI's kill loop saw status -2 after "interrupted" was printed and SIGINT
    was ignored (the cause was not found; CPython kills itself with SIGINT at exit once it has seen
    a KeyboardInterrupt escape), so the documented status is given here, after the same cleanup,
    in finalization's order: other threads joined first, then the exit handlers."""
    threading._shutdown()  # type: ignore[attr-defined]  # what finalization calls first
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)
