"""One scratch directory per crashlab process, on disk and on tmpfs, reclaimed once its owner is gone.

A campaign makes many temporary files: crash images on /dev/shm (about 100 MB a batch), machine
sockets and consoles, mount points. A `kill -9` leaves them all behind, and nothing but their
owner knew they were there. So every one of them lives under one directory named after its owner
(`crashlab-run-<pid>-<start time>`): the next crashlab command removes every such directory whose
owner is no longer running (a pid reused by another process has another start time).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

PREFIX = "crashlab-run-"
SHM = Path("/dev/shm")

_active: dict[str, Path] = {}
_owner = ""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None
    once it is gone or a zombie (it holds nothing then, and its parent may not reap it soon)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the name in parentheses may hold spaces
    return None if fields[0] in ("Z", "X") else fields[19]


def owner_tag(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{pid}-{_start_time(pid)}"


def owner_alive(name: str) -> bool:
    """Whether the process a run directory is named after still runs (pure but for /proc)."""
    tag = name.removeprefix(PREFIX)
    pid_text, _, start = tag.partition("-")
    if not pid_text.isdigit():
        return False
    return _start_time(int(pid_text)) == start


def roots() -> list[Path]:
    """Where run directories live: the temp dir, and tmpfs when there is one."""
    found = [Path(os.environ.get("TMPDIR") or "/tmp")]
    if SHM.is_dir() and os.access(SHM, os.W_OK):
        found.append(SHM)
    return found


def reclaim() -> list[Path]:
    """Remove every run directory whose owner is gone; what was removed."""
    removed = []
    for root in roots():
        try:
            names = [e.name for e in os.scandir(root) if e.name.startswith(PREFIX) and e.is_dir()]
        except OSError:
            continue
        for name in names:
            if not owner_alive(name):
                shutil.rmtree(root / name, ignore_errors=True)
                removed.append(root / name)
    return removed


def _mine(root: Path) -> Path:
    key = str(root)
    if key not in _active:
        path = root / f"{PREFIX}{owner_tag()}"
        path.mkdir(mode=0o700, exist_ok=True)
        if not _active:
            global _owner
            _owner = owner_tag()
            atexit.register(leave)
        _active[key] = path
    return _active[key]


def scratch() -> Path:
    """This process's directory in the temp dir."""
    return _mine(roots()[0])


def tmpfs() -> Path | None:
    """This process's directory on /dev/shm, if there is a writable one."""
    r = roots()
    return _mine(r[1]) if len(r) > 1 else None


def enter() -> None:
    """Reclaim the dead's directories, then send this process's temp files (and its children's,
    which inherit `tempfile.tempdir`) into its own; removed again at a normal exit."""
    reclaim()
    tempfile.tempdir = str(scratch())


def leave() -> None:
    if _active and owner_tag() == _owner:  # a forked child inherits the table, not the ownership
        for path in _active.values():
            shutil.rmtree(path, ignore_errors=True)
        _active.clear()
        tempfile.tempdir = None
