"""How a job reaches a guest and its results come back: interchangeable strategies.

- `virtiofs` (the normal one): the guest chroots into a read-only view of the host's interpreter and
  project (crashlab.guest.shares) and runs the job in one Python process; it writes results into
  the results share.
- `shell` (crashlab.guest.shell): no virtiofsd on the host. The job is planned on the host into a
  busybox script shipped inside the initramfs, and results come back on the serial console.
  Degraded, and only for the jobs it can plan.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from crashlab.guest.inguest.init import OUT, guest_env
from crashlab.guest.job import GuestJob, GuestRun, boot, read_guest_file, read_guest_json
from crashlab.guest.machine import Machine, find_virtiofsd
from crashlab.guest.provision import Guest
from crashlab.guest.shares import PROJECT, HostView, ResultsShare, Share, host_view
from crashlab.guest.shell import ShellTransport


class Transport(Protocol):
    name: str

    def check(self, job: GuestJob) -> None:
        """Raise JobError if this transport cannot run `job`."""

    def run(self, job: GuestJob, guest: Guest, observer: Callable[[Machine], None] | None = None
            ) -> GuestRun: ...


class VirtiofsTransport:
    name = "virtiofs"

    def check(self, job: GuestJob) -> None:
        pass  # runs any job the in-guest side knows

    def run(self, job: GuestJob, guest: Guest, observer: Callable[[Machine], None] | None = None
            ) -> GuestRun:
        share = job.share
        shares = virtiofs_shares(share, job.payload, host_view(extra=job.view_extra))
        b = boot(job, guest, shares=shares, observer=observer)
        exit_text = (read_guest_file(share / "exit-status") or "").strip()
        init_error = (read_guest_file(share / "init-error") or "").strip()
        error = b.error or (f"guest init: {init_error}" if init_error else None)
        return GuestRun(self.name, read_guest_json(share / "result.json"),
                        int(exit_text) if exit_text.lstrip("-").isdigit() else None,
                        b.qemu_exit, b.qemu_argv, b.host_seconds, error, job.console,
                        timed_out=b.timed_out)


def virtiofs_shares(share: Path, payload: dict[str, Any], view: HostView) -> list[Share]:
    """Write what the guest's /init and job read into the results `share` (the interpreter and
    project to chroot into, the job), and return the shares a virtiofs guest boots with."""
    (share / "guest.env").write_text(guest_env(sys.executable, str(PROJECT)))
    (share / "job.json").write_text(json.dumps(payload, indent=1))
    return [view, ResultsShare("out", share)]


def guest_path(name: str) -> str:
    """Where a file of the results share is, as the in-guest side sees it."""
    return str(OUT / name)


TRANSPORT_NAMES = ("auto", "virtiofs", "shell")


def resolve(name: str) -> str:
    """`auto` made concrete: virtiofs if virtiofsd is found (CRASHLAB_VIRTIOFSD=none: as if not)."""
    if name != "auto":
        return name
    if os.environ.get("CRASHLAB_VIRTIOFSD") == "none" or find_virtiofsd() is None:
        return "shell"
    return "virtiofs"


def transport(name: str) -> Transport:
    concrete = resolve(name)
    if concrete == "virtiofs":
        return VirtiofsTransport()
    if concrete == "shell":
        return ShellTransport()
    raise ValueError(f"unknown transport {name!r}; choose from {', '.join(TRANSPORT_NAMES)}")
