"""The one way crashlab runs an external tool: its own process group, a deadline, death with us.

Every tool (apt, dpkg-deb, depmod, cpio, mkfs, fsck, QEMU's helpers) can hang on bad input or a
sick machine, and a hung tool must not outlive the run or stall it:

- it gets its own session, so a timeout kills its whole group, children included;
- it gets PR_SET_PDEATHSIG, so a crashlab killed with SIGKILL takes the tool with it: set by
  util-linux `setpriv --pdeathsig` exec'd in front of the tool where there is one, since a Python
  preexec hook forces a full fork of this (large) process, 3.3 ms a spawn against 1.6 ms (measured
  here); a campaign spawns three tools per crash state;
- after the kill, the pipes are read for at most a moment: a grandchild that left the group and
  keeps stdout open must not make the timeout never return.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PR_SET_PDEATHSIG = 1
DRAIN_S = 2.0  # how long the pipes are read after the group is killed
# Inside a guest (its /init says so) the guest's death ends every process anyway, and under TCG a
# preexec hook costs a full fork per spawn: there, tools spawn without it.
IN_GUEST = os.environ.get("CRASHLAB_IN_GUEST") == "1"

_libc = ctypes.CDLL(None, use_errno=True)
SETPRIV = next((p for p in ("/usr/bin/setpriv", "/bin/setpriv") if os.access(p, os.X_OK)), None)


def die_with_parent() -> None:
    """For preexec_fn: SIGKILL this child when the process that spawned it dies."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Completed:
    argv: list[str]
    returncode: int | None  # None: killed at its deadline
    stdout: bytes
    stderr: bytes
    seconds: float
    timed_out: bool

    @property
    def text(self) -> str:
        return (self.stdout + self.stderr).decode(errors="replace")


class ToolError(RuntimeError):
    """A tool failed or hung; the message is one line: the command and its last words."""


def run(argv: Sequence[str | Path], timeout: float, *, input: bytes | None = None,
        cwd: str | Path | None = None, stdout: int | None = subprocess.PIPE) -> Completed:
    """Run `argv` to completion or its deadline; never raises for the tool's own failure."""
    args = [str(a) for a in argv]
    t0 = time.monotonic()
    spawn, hook = args, None
    if not IN_GUEST and SETPRIV:
        if shutil.which(args[0]) is None:  # what Popen says of a missing tool, not setpriv's 127
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), args[0])
        spawn = [SETPRIV, "--pdeathsig", "KILL", "--", *args]
    elif not IN_GUEST:
        hook = die_with_parent
    proc = subprocess.Popen(spawn, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                            stdout=stdout, stderr=subprocess.PIPE, cwd=cwd, start_new_session=True,
                            preexec_fn=hook)
    timed_out = False
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        kill_group(proc)
        try:
            out, err = proc.communicate(timeout=DRAIN_S)
        except subprocess.TimeoutExpired:  # a grandchild outside the group holds the pipes
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
            out, err = b"", b""
            proc.wait()
    except BaseException:  # Ctrl-C or SIGTERM while waiting: the tool goes too
        kill_group(proc)
        proc.wait()
        raise
    return Completed(args, None if timed_out else proc.returncode, out or b"", err or b"",
                     time.monotonic() - t0, timed_out)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def check(argv: Sequence[str | Path], timeout: float, **kw: object) -> str:
    """Run `argv` and return its stdout; a failure or a hang raises ToolError in one line."""
    r = run(argv, timeout, **kw)  # type: ignore[arg-type]
    name = " ".join(r.argv[:3])
    if r.timed_out:
        raise ToolError(f"{name}: no answer after {timeout:.0f} s (killed)")
    if r.returncode != 0:
        last = (r.stderr.decode(errors="replace").strip().splitlines() or [f"exit {r.returncode}"])[-1]
        raise ToolError(f"{name}: {last}")
    return r.stdout.decode(errors="replace")
