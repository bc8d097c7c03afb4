"""One scratch directory per crashlab process, on disk and on tmpfs, reclaimed once its owner is gone.

A campaign makes many temporary files: crash images on /dev/shm (about 100 MB a batch), machine
sockets and consoles, mount points. A `kill -9` leaves them all behind, and nothing but their
owner knew they were there. So every one of them lives under one directory named after its owner
(`crashlab-run-<pid>-<start time>`): the next crashlab command removes every such directory whose
owner is no longer running (a pid reused by another process has another start time).

Python's multiprocessing leaves one more kind of file: a named semaphore (`/dev/shm/sem.mp-*`) of
the spawn context, which Dask's nannies use, is unlinked by multiprocessing's resource tracker, and
a `kill -9` of the process group takes the tracker too. sem_open maps the file before it gives it
its name and every user keeps it mapped, so one that no process maps is nobody's: it goes too.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

PREFIX = "crashlab-run-"
SHM = Path("/dev/shm")
SEMAPHORE_PREFIX = "sem.mp-"  # multiprocessing's named semaphores
SEMAPHORE_MIN_AGE_S = 60.0  # younger ones are left alone, whatever the maps say

_active: dict[str, Path] = {}
_owner = ""


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state is [0], ppid [1], start time
    [19]), or [] for a process that is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return stat.rpartition(")")[2].split()  # the name in parentheses may hold spaces


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None
    once it is gone or a zombie (it holds nothing then, and its parent may not reap it soon)."""
    fields = proc_stat(pid)
    return None if not fields or fields[0] in ("Z", "X") else fields[19]


def owner_tag(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{pid}-{start_time(pid)}"


def owner_pid(name: str) -> int | None:
    """The pid a run directory is named after (pure)."""
    pid_text = name.removeprefix(PREFIX).partition("-")[0]
    return int(pid_text) if pid_text.isdigit() else None


def owner_alive(name: str) -> bool:
    """Whether the process a run directory is named after still runs (pure but for /proc)."""
    pid = owner_pid(name)
    return pid is not None and f"{pid}-{start_time(pid)}" == name.removeprefix(PREFIX)


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
    return removed + reclaim_semaphores()


def reclaim_semaphores(min_age: float = SEMAPHORE_MIN_AGE_S) -> list[Path]:
    """Remove multiprocessing's named semaphores that no process maps; what was removed."""
    try:
        now = time.time()
        stats = [(e.name, e.stat()) for e in os.scandir(SHM) if e.name.startswith(SEMAPHORE_PREFIX)]
        old = [(name, st.st_ino) for name, st in stats if now - st.st_mtime >= min_age]
    except OSError:
        return []
    if not old:
        return []
    used = _inodes_mapped_from(SHM)
    removed = []
    for name, inode in old:
        if inode not in used:
            with contextlib.suppress(OSError):
                (SHM / name).unlink()
                removed.append(SHM / name)
    return removed


def _inodes_mapped_from(directory: Path) -> set[int]:
    """Inodes of the files in `directory` that some process maps. By inode, not name: glibc's
    sem_open maps a temporary file and links it to the name after, so the maps name the other."""
    prefix = f"{directory}/"
    inodes = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as maps:
                for line in maps:
                    fields = line.split(None, 5)  # address perms offset dev inode [path]
                    if len(fields) == 6 and fields[5].startswith(prefix):
                        inodes.add(int(fields[4]))
        except (OSError, ValueError):
            continue
    return inodes


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
