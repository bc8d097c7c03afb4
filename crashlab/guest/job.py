"""One guest boot as a job: a description goes in, a typed `GuestRun` comes out.

Record, dm-flakey and the checker guest all run this way: the host writes what the guest must do
into a results share, boots a guest that does it and powers itself off, and reads back what it
reported. How the job reaches the guest and its results come back is the transport's business
(crashlab.guest.transport: the host's Python over virtiofs, or a busybox shell over the console);
the boot itself, its deadline and its accounting are here, once.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crashlab.guest.machine import Drive, Machine, MachineError, MachineTimeout
from crashlab.guest.provision import Guest
from crashlab.guest.shares import Share

READ_LIMIT = 64 << 20  # no file a guest writes for the host is legitimately bigger


class JobError(ValueError):
    """A job this transport cannot run; the message says why in one line."""


class GuestFileError(OSError):
    """A file in the results share that the host refuses to read (a link, a device, a FIFO)."""


@dataclass(frozen=True)
class GuestJob:
    """What one boot is asked to do (`payload` is the job.json the in-guest side reads) and what it
    is given: disks, a results share, extra host paths in its read-only view, resources."""

    payload: dict[str, Any]
    share: Path  # the results share: the only host directory the guest can write
    console: Path
    drives: tuple[Drive, ...] = ()
    view_extra: tuple[Path, ...] = ()
    memory_mib: int = 512
    accel: str = "tcg"
    qemu: str | None = None
    timeout_s: float = 600.0
    name: str = "crashlab"

    @property
    def mode(self) -> str:
        return str(self.payload.get("mode", "record"))


@dataclass
class GuestRun:
    """What a boot produced, whatever the transport."""

    transport: str
    result: dict[str, Any]  # what the guest reported: steps, status, errors
    exit_status: int | None  # the in-guest job's exit status; None if it never said
    qemu_exit: int | None
    qemu_argv: list[str] | None
    host_seconds: float
    error: str | None  # why the guest did not finish its job; None if it did
    console: Path
    notes: dict[str, Any] = field(default_factory=dict)  # transport facts for run.json
    timed_out: bool = False  # the guest was still running at its deadline

    @property
    def status(self) -> str:
        return str(self.result.get("status", "unknown"))

    def console_text(self) -> str:
        return read_guest_file(self.console) or ""


@dataclass
class Boot:
    """The machine side of a boot: QEMU's exit, its command line, host seconds, what went wrong."""

    qemu_exit: int | None = None
    qemu_argv: list[str] | None = None
    host_seconds: float = 0.0
    error: str | None = None
    timed_out: bool = False


def boot(job: GuestJob, guest: Guest, *, initrd: Path | None = None, append: str = "",
         shares: Sequence[Share] = (), observer: Callable[[Machine], None] | None = None) -> Boot:
    """Boot a guest that powers itself off when its job is done, and wait for that."""
    t0 = time.monotonic()
    b = Boot()
    try:
        with Machine(guest.kernel, initrd or guest.initrd, append=append, drives=job.drives,
                     shares=shares, memory_mib=job.memory_mib, accel=job.accel, qemu=job.qemu,
                     timeout=job.timeout_s, console_log=job.console, name=job.name) as m:
            b.qemu_argv = [str(a) for a in m.process.args] if m.process else None  # type: ignore[union-attr]
            if observer:
                observer(m)
            b.qemu_exit = m.wait()
    except MachineError as e:
        b.error = str(e)
        b.timed_out = isinstance(e, MachineTimeout)
    b.host_seconds = round(time.monotonic() - t0, 3)
    return b


def read_guest_file(path: Path, limit: int = READ_LIMIT) -> str | None:
    """A file the guest wrote, as text; None if there is none (read_guest_bytes says how)."""
    data = read_guest_bytes(path, limit)
    return None if data is None else data.decode(errors="replace")


def read_guest_bytes(path: Path, limit: int = READ_LIMIT, offset: int = 0) -> bytes | None:
    """A file the guest wrote, from byte `offset`; None if there is none.

    The guest owns the share, so a name there may be a link it planted to a host file, or a FIFO
    that would block the host: only a regular file is read, never through a link, and at most
    `limit` bytes.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise GuestFileError(f"{path}: refused ({e.strerror}): not a regular file the guest wrote") from e
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise GuestFileError(f"{path}: refused: not a regular file")
        if offset:
            f.seek(offset)
        return f.read(limit)


def read_guest_json(path: Path) -> dict[str, Any]:
    """A JSON object the guest wrote; {} when absent, cut short or not an object."""
    try:
        text = read_guest_file(path)
        value = json.loads(text) if text else {}
    except (GuestFileError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def move_guest_file(src: Path, dest: Path) -> bool:
    """Move a regular file out of the share (never a link the guest planted); whether it moved."""
    try:
        st = os.lstat(src)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode):
        raise GuestFileError(f"{src}: refused: not a regular file")
    try:
        os.replace(src, dest)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        # A series guest's share is in the scratch dir, the recording may be elsewhere: copy, still
        # never through a link the guest planted since the lstat.
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f, open(dest, "wb") as out:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise GuestFileError(f"{src}: refused: not a regular file") from None
            shutil.copyfileobj(f, out)
        os.unlink(src)
    return True


def write_json_atomic(path: Path, value: dict[str, Any]) -> None:
    """A request for a guest, renamed into its share in whole: the guest never reads half of one."""
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)
