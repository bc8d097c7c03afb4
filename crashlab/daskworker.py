"""The worker side of crashlab's Dask cluster: a worker plugin every crashlab client registers.

Imported only where Dask runs (a client connecting, a worker unpickling the plugin): importing
distributed costs seconds, which no other crashlab command should pay.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from crashlab import rundir, signals

UNWIND_TIMEOUT_S = 30.0  # a closing worker waits this long for its units to remove guests and mounts


def quiet() -> None:
    # A serious tool prints its own progress: Dask's warnings about slow event loops and lost
    # workers would only bury it (failures reach the client as the units' exceptions).
    for name in ("distributed", "dask", "tornado", "bokeh"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _interrupt_units(worker: Any, timeout: float = UNWIND_TIMEOUT_S) -> None:
    """Make the units running on `worker` unwind, as a SIGTERM made the old pool's workers unwind:
    signals.Terminated raised in each unit's thread, and this process's children (QEMU, fsck) ended so a
    thread waiting on one wakes to it; their context managers then remove guests, mounts and files."""
    threads = dict(getattr(worker, "active_threads", {}))
    if not threads:
        return
    for ident in threads:
        # Terminated, not SystemExit: no `except Exception` swallows it, and Dask takes it for the
        # unit's failure, where a SystemExit would take the whole worker down.
        terminated = ctypes.py_object(signals.Terminated)
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), terminated)
    _terminate_children()
    # The threads are the worker's pool: they live on, and leave active_threads as a unit ends.
    deadline = time.monotonic() + timeout
    while set(threads) & set(getattr(worker, "active_threads", {})) and time.monotonic() < deadline:
        time.sleep(0.05)


def interrupt(dask_worker: Any) -> None:
    """Run by a closing client on each of its local workers (`Client.run`): the units unwind
    before the nanny's few seconds of grace are up and it kills the process."""
    _interrupt_units(dask_worker)


def _terminate_children() -> None:
    me = str(os.getpid())
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and (fields := rundir.proc_stat(int(proc.name))) and fields[1] == me:
            with contextlib.suppress(OSError):
                os.kill(int(proc.name), signal.SIGTERM)


class WorkerSetup(WorkerPlugin):
    """A Dask worker plugin, registered by every crashlab client: the worker's temporary files go
    to a run directory of its own (crashlab.rundir), Ctrl-C is the client's to act on, Dask is
    quiet, and a worker asked to close (or sent SIGTERM) unwinds its running units first."""

    name = "crashlab"
    idempotent = True

    def __init__(self) -> None:
        self._entered = False

    def setup(self, worker: Any) -> None:
        quiet()
        # An in-process worker (its loop on a thread of the client) shares the client's run
        # directory, made on first use and removed at the client's exit: removing it when the
        # cluster closes would pull it from under the client (pytest's basetemp lives there).
        if threading.current_thread() is threading.main_thread():  # a worker process of its own
            rundir.enter()
            self._entered = True
            signal.signal(signal.SIGINT, signal.SIG_IGN)

            def on_term(signum: int, frame: object) -> None:
                _interrupt_units(worker)
                rundir.leave()
                os._exit(128 + signum)

            signal.signal(signal.SIGTERM, on_term)

    def teardown(self, worker: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            _interrupt_units(worker)
        if self._entered:
            rundir.leave()
