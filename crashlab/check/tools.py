"""Thin wrappers over the userspace tools: every call has a timeout and ends as a `ToolRun`.

fsck and journal replay run on the host even when mounts run in a guest: they are userspace
programs reading an image file, so a corrupted image can hang or crash them but not the host kernel,
and they run at native speed instead of under TCG.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping, Sequence

from crashlab import filesystems, proc
from crashlab.check.outcome import ToolRun

DEFAULT_TIMEOUT = 120.0


def run_tool(argv: Sequence[str], timeout: float = DEFAULT_TIMEOUT, cwd: str | None = None,
             env: Mapping[str, str] | None = None) -> ToolRun:
    """Run `argv`, never raising for the tool's own failures: those are data for the record.

    crashlab.proc runs it: its own process group (a timeout kills the wrapper's children too), death
    with crashlab, a bounded wait for the pipes. Plain `subprocess` rather than `sh`: under TCG in
    the checker guest every spawn costs tenths of a second, and sh's threads add half again.
    """
    argv = [str(a) for a in argv]
    run = ToolRun(argv=argv)
    t0 = time.monotonic()
    search = os.environ.get("PATH", os.defpath) + ":/usr/sbin:/sbin"  # the PATH of the moment
    done = None
    if (path := _which(argv[0], search)) is not None:
        try:
            # Pipes, not ptys: a guest has none.
            done = proc.run([path, *argv[1:]], timeout, cwd=cwd, env=env)
        except FileNotFoundError:  # removed since it was found: look again next time
            _found.pop((argv[0], search), None)
    if done is None:
        run.missing = True
        run.error = f"{argv[0]} not found"
        return run
    run.timed_out = done.timed_out
    run.rc = done.returncode  # None: killed at the deadline; negative: killed from elsewhere
    run.stdout = _text(done.stdout)
    run.stderr = _text(done.stderr)
    run.seconds = time.monotonic() - t0
    return run


_found: dict[tuple[str, str], str] = {}


def _which(name: str, search: str) -> str | None:
    """`shutil.which`, remembered per name and PATH: its stats cost 0.09 ms a tool (1.00 against
    0.91 ms for /bin/true), three tools a crash state. A tool not found is looked for again each
    time (setup may install it)."""
    if (hit := _found.get((name, search))) is None and (hit := shutil.which(name, path=search)):
        _found[(name, search)] = hit
    return hit


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def tool_versions(fs: str, timeout: float = 10.0) -> dict[str, str]:
    """Versions of the tools whose verdicts go into the record (the first line each prints)."""
    argv = filesystems.filesystem(fs).fsck_version
    run = run_tool(argv, timeout)
    return {argv[0]: (run.output.strip().splitlines() or ["unknown"])[0]}
