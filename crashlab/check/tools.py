"""Thin wrappers over the userspace tools: every call has a timeout and ends as a `ToolRun`.

fsck and journal replay run on the host even when mounts run in a guest: they are userspace
programs reading an image file, so a corrupted image can hang or crash them but not the host kernel,
and they run at native speed instead of under TCG.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence

from crashlab import filesystems
from crashlab.check.outcome import ToolRun

DEFAULT_TIMEOUT = 120.0


def run_tool(argv: Sequence[str], timeout: float = DEFAULT_TIMEOUT) -> ToolRun:
    """Run `argv`, never raising for the tool's own failures: those are data for the record.

    The tool gets its own session so that a timeout kills the whole group: a hung fsck wrapper's
    children would otherwise keep the output pipes open. Plain `subprocess` rather than `sh`: under
    TCG in the checker guest every spawn costs tenths of a second, and sh's threads add half again.
    """
    argv = [str(a) for a in argv]
    run = ToolRun(argv=argv)
    t0 = time.monotonic()
    # Looked up on each call, from the PATH of the moment (tests put fake tools in front).
    path = shutil.which(argv[0], path=os.environ.get("PATH", os.defpath) + ":/usr/sbin:/sbin")
    if path is None:
        run.missing = True
        run.error = f"{argv[0]} not found"
        return run
    # Pipes, not ptys: a guest has none.
    proc = subprocess.Popen([path, *argv[1:]], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        run.timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()  # keeps what was read before the timeout
    run.seconds = time.monotonic() - t0
    run.rc = None if run.timed_out else proc.returncode  # negative: killed by a signal from elsewhere
    run.stdout = _text(out)
    run.stderr = _text(err)
    return run


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def tool_versions(fs: str, timeout: float = 10.0) -> dict[str, str]:
    """Versions of the tools whose verdicts go into the record (the first line each prints)."""
    argv = filesystems.filesystem(fs).fsck_version
    run = run_tool(argv, timeout)
    return {argv[0]: (run.output.strip().splitlines() or ["unknown"])[0]}
