"""The one way crashlab runs an external tool: its own process group, a deadline, death with us.

Every tool (apt, dpkg-deb, depmod, cpio, mkfs, fsck, QEMU's helpers) can hang on bad input or a
sick machine, and a hung tool must not outlive the run or stall it:

- it gets its own session, so a timeout kills its whole group, children included;
- it dies with the crashlab that started it, even one killed with SIGKILL. As root, each thread's
  tools are born in a PID namespace of that thread's own (an "anchor": `unshare --pid` running
  `sleep`, itself under PR_SET_PDEATHSIG), and the kernel kills every process of a namespace when
  its init dies. A spawn then stays a bare vfork, 1.5 ms here; elsewhere util-linux `setpriv
  --pdeathsig` is exec'd in front of each tool, 2.8 ms (a Python preexec hook would force a full
  fork of this large process, 3.3 ms). A campaign spawns four tools per ext4 crash state. Two
  consequences: a tool's `$$` is its pid in the namespace, not the host's, and a grandchild
  orphaned there stays a zombie of `sleep` until the thread ends;
- its exit is waited for on a pidfd, beside its pipes: no polling sleep between the pipes' end and
  the reaping;
- after the kill, the pipes are read for at most a moment: a grandchild that left the group and
  keeps stdout open must not make the timeout never return.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import selectors
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

PR_SET_PDEATHSIG = 1
DRAIN_S = 2.0  # how long the pipes are read after the group is killed
# Inside a guest (its /init says so) the guest's death ends every process anyway, and under TCG a
# preexec hook costs a full fork per spawn: there, tools spawn without it.
IN_GUEST = os.environ.get("CRASHLAB_IN_GUEST") == "1"

# The process's own symbols, libc's among them: ctypes.util.find_library would spawn ldconfig
# (tenths of a second under TCG) every time it is asked.
LIBC = ctypes.CDLL(None, use_errno=True)
SETPRIV = next((p for p in ("/usr/bin/setpriv", "/bin/setpriv") if os.access(p, os.X_OK)), None)
UNSHARE = shutil.which("unshare")
SLEEP = shutil.which("sleep")
CLONE_NEWPID = 0x20000000
ANCHOR_START_S = 5.0
_anchors = threading.local()


def die_with_parent() -> None:
    """For preexec_fn: SIGKILL this child when the process that spawned it dies."""
    LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


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
        cwd: str | Path | None = None, stdout: int | None = subprocess.PIPE,
        env: Mapping[str, str] | None = None) -> Completed:
    """Run `argv` to completion or its deadline; never raises for the tool's own failure."""
    args = [str(a) for a in argv]
    t0 = time.monotonic()
    spawn, hook = args, None
    if IN_GUEST or anchored():
        pass
    elif SETPRIV:
        if shutil.which(args[0]) is None:  # what Popen says of a missing tool, not setpriv's 127
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), args[0])
        spawn = [SETPRIV, "--pdeathsig", "KILL", "--", *args]
    else:
        hook = die_with_parent
    try:
        proc = _popen(spawn, input, stdout, cwd, hook, env)
    except OSError as e:
        if e.errno != errno.ENOMEM or not getattr(_anchors, "ok", False):
            raise
        # The anchor's init is gone (killed from outside): its namespace takes no more children.
        _anchors.ok = None
        if not anchored():
            spawn = [SETPRIV, "--pdeathsig", "KILL", "--", *args] if SETPRIV else args
        proc = _popen(spawn, input, stdout, cwd, hook, env)
    timed_out = False
    try:
        out, err, timed_out = _communicate(proc, input, t0 + timeout)
        if timed_out:
            kill_group(proc)
            out2, err2, drained_out = _communicate(proc, None, time.monotonic() + DRAIN_S)
            out, err = out + out2, err + err2
            if drained_out:  # a grandchild outside the group holds the pipes
                out, err = b"", b""
        proc.wait()
    except BaseException:  # Ctrl-C or SIGTERM while waiting: the tool goes too
        kill_group(proc)
        proc.wait()
        raise
    finally:
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    return Completed(args, None if timed_out else proc.returncode, out, err,
                     time.monotonic() - t0, timed_out)


def _popen(spawn: list[str], input: bytes | None, stdout: int | None, cwd: str | Path | None,
           hook: Callable[[], None] | None, env: Mapping[str, str] | None) -> subprocess.Popen[bytes]:
    with _in_anchor():
        return subprocess.Popen(spawn, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                stdout=stdout, stderr=subprocess.PIPE, cwd=cwd, env=env,
                                start_new_session=True, preexec_fn=hook)


def _communicate(proc: subprocess.Popen[bytes], input: bytes | None, deadline: float
                 ) -> tuple[bytes, bytes, bool]:
    """Feed stdin, read stdout and stderr to their end and wait for the exit, all by `deadline`:
    (stdout, stderr, whether the deadline came first). Popen.communicate polls the exit with
    sleeps once the pipes end, a millisecond a tool; a pidfd says the moment it comes."""
    chunks: dict[int, list[bytes]] = {1: [], 2: []}
    with selectors.PollSelector() as sel:
        for n, pipe in ((1, proc.stdout), (2, proc.stderr)):
            if pipe is not None and not pipe.closed:
                sel.register(pipe.fileno(), selectors.EVENT_READ, n)
        pending = memoryview(input or b"")
        stdin = -1
        if proc.stdin is not None and not proc.stdin.closed:
            if pending:
                stdin = proc.stdin.fileno()
                sel.register(stdin, selectors.EVENT_WRITE)
            else:
                proc.stdin.close()
        pidfd = -1
        if proc.returncode is None:
            try:
                pidfd = os.pidfd_open(proc.pid)
                sel.register(pidfd, selectors.EVENT_READ)
            except OSError:  # reaped already, or no pidfds: the pipes' end stands for the exit
                pidfd = -1
        try:
            while sel.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    return b"".join(chunks[1]), b"".join(chunks[2]), True
                for key, _ in sel.select(left):
                    fd = key.fd
                    if fd == pidfd:
                        sel.unregister(fd)
                    elif fd == stdin:
                        assert proc.stdin is not None
                        try:
                            pending = pending[os.write(fd, pending[:65536]):]
                        except BrokenPipeError:
                            pending = pending[:0]
                        if not pending:
                            sel.unregister(fd)
                            proc.stdin.close()
                    else:
                        data = os.read(fd, 65536)
                        if data:
                            chunks[key.data].append(data)
                        else:
                            sel.unregister(fd)
        finally:
            if pidfd >= 0:
                os.close(pidfd)
    return b"".join(chunks[1]), b"".join(chunks[2]), False


def anchored() -> bool:
    """Whether this thread's tools are born in a PID namespace that dies with this thread, making
    one on first use (root only; a thread that cannot gets False, and setpriv)."""
    if getattr(_anchors, "pid", None) != os.getpid():  # a forked child starts afresh
        _anchors.pid, _anchors.ok, _anchors.held = os.getpid(), None, None
    if _anchors.ok is None:
        try:
            _anchors.held = _anchor()
        except OSError:
            _anchors.held = None
        _anchors.ok = _anchors.held is not None
    return bool(_anchors.ok)


class _Anchor:
    """A thread's anchor and the two namespace fds its spawns switch between. Thread-local, so
    dropped when the thread ends: the anchor is dead by then (its PR_SET_PDEATHSIG), and is reaped."""

    def __init__(self, process: subprocess.Popen[bytes], there: int, home: int) -> None:
        self.process, self.there, self.home = process, there, home

    def __del__(self) -> None:
        for fd in (self.there, self.home):
            with contextlib.suppress(OSError):
                os.close(fd)
        kill_group(self.process)
        with contextlib.suppress(Exception):
            self.process.wait(1)


@contextlib.contextmanager
def _in_anchor() -> Iterator[None]:
    """Children forked inside are born in this thread's anchor namespace. Only for the spawn: a
    thread whose pid_for_children is not its own namespace cannot start threads (clone refuses
    CLONE_THREAD across namespaces), and Dask, liblzma and qemu.qmp's callers all do."""
    held = getattr(_anchors, "held", None) if getattr(_anchors, "ok", False) else None
    if held is None:
        yield
        return
    there, home = held.there, held.home
    if LIBC.setns(there, CLONE_NEWPID) != 0:
        _anchors.ok = False  # cannot happen once it worked; setpriv from now on
        raise OSError(ctypes.get_errno(), "setns into the anchor's PID namespace")
    try:
        yield
    finally:
        if LIBC.setns(home, CLONE_NEWPID) != 0:
            raise OSError(ctypes.get_errno(), "setns back into this process's PID namespace")


def _anchor() -> _Anchor | None:
    """Start this thread's anchor; None where it cannot be had."""
    if os.geteuid() != 0 or not (SETPRIV and UNSHARE and SLEEP):
        return None
    # PR_SET_PDEATHSIG fires when the spawning *thread* ends: the namespace lives as long as the
    # thread whose tools it holds. `--kill-child` passes the signal on to the namespace's init.
    p = subprocess.Popen([SETPRIV, "--pdeathsig", "KILL", "--", UNSHARE, "--pid", "--fork",
                          "--kill-child=SIGKILL", "--", SLEEP, "infinity"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    home = os.open("/proc/thread-self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    end = time.monotonic() + ANCHOR_START_S
    while time.monotonic() < end and p.poll() is None:
        with contextlib.suppress(OSError, ValueError, IndexError):  # not forked yet
            init = int(Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()[0])
            there = os.open(f"/proc/{init}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
            if os.fstat(there).st_ino == os.fstat(home).st_ino:
                os.close(there)  # the child, before unshare's namespace: look again
            elif LIBC.setns(there, CLONE_NEWPID) == 0 and LIBC.setns(home, CLONE_NEWPID) == 0:
                return _Anchor(p, there, home)
            else:  # no permission after all (a container): setpriv it is
                os.close(there)
                break
        time.sleep(0.002)
    os.close(home)
    kill_group(p)
    p.wait()
    return None


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
