"""What every in-guest job uses: the guest clock, commands, modules, the result file, power-off."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from crashlab.guest.inguest.init import MODULES


def uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def run(*argv: str) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {r.returncode}: {(r.stderr or r.stdout).strip()}")
    return r.stdout


def sectors(dev: str) -> int:
    return int(Path("/sys/class/block", os.path.basename(os.path.realpath(dev)), "size").read_text())


def load_fs_modules(fs: str) -> None:
    listing = MODULES / f"crashlab-{fs}.list"
    if not listing.exists():
        return  # built in (ext4)
    for rel in listing.read_text().split():
        r = subprocess.run(["insmod", str(MODULES / rel)], capture_output=True, text=True, check=False)
        if r.returncode != 0 and "File exists" not in r.stderr:
            print(f"crashlab-guest: insmod {rel}: {r.stderr.strip()}", file=sys.stderr)


def poweroff() -> None:
    """Power off now, like pulling the plug: no sync, no unmount."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.reboot(0x4321FEDC)  # LINUX_REBOOT_CMD_POWER_OFF
    os._exit(1)  # only reached without CAP_SYS_BOOT


class Result:
    """result.json in the out share, rewritten at each step so a killed guest still leaves a trail."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"steps": {}, "status": "running"}
        self._lock = threading.Lock()

    def step(self, name: str, **extra: Any) -> None:
        with self._lock:
            self.data["steps"][name] = round(uptime(), 3)
            self.data.update(extra)
            self._save()

    def set(self, **extra: Any) -> None:
        with self._lock:
            self.data.update(extra)
            self._save()

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


@contextlib.contextmanager
def redirect_fds(path: Path) -> Iterator[None]:
    """Send fds 1 and 2 to `path` (the workload's stdout comes back through the out share)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)
