"""What every in-guest job uses: the guest clock, commands, modules, the result file, power-off."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
import sys
import threading
import time
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


def load_disk_modules(model: str) -> None:
    """The drivers of the data disk's model (crashlab.diskmodels); virtio-blk's are always loaded."""
    listing = MODULES / f"crashlab-disk-{model}.list"
    for rel in listing.read_text().split() if listing.exists() else ():
        r = subprocess.run(["insmod", str(MODULES / rel)], capture_output=True, text=True, check=False)
        if r.returncode != 0 and "File exists" not in r.stderr:
            print(f"crashlab-guest: insmod {rel}: {r.stderr.strip()}", file=sys.stderr)


def disk_serials(sys_block: Path = Path("/sys/block")) -> dict[str, str]:
    """{serial: /dev/NAME} of the guest's disks. virtio-blk shows its serial in `serial`; SCSI disks
    and libata's (IDE, AHCI) in `device/vpd_pg80`, the unit serial number VPD page: a 4-byte header,
    then the serial (space-padded on ATA)."""
    found: dict[str, str] = {}
    for d in sorted(sys_block.iterdir()) if sys_block.is_dir() else ():
        try:
            if (d / "serial").exists():
                serial = (d / "serial").read_text()
            elif (d / "device" / "vpd_pg80").exists():
                serial = (d / "device" / "vpd_pg80").read_bytes()[4:].decode(errors="replace")
            else:
                continue
        except OSError:
            continue
        found.setdefault(serial.strip(" \n\0"), f"/dev/{d.name}")
    return found


def find_disk(serial: str, timeout_s: float = 60.0) -> str:
    """The device of the disk with `serial`, waiting for it: SCSI and ATA buses are scanned
    asynchronously after their driver loads."""
    end = time.monotonic() + timeout_s
    while True:
        found = disk_serials()
        if serial in found:
            return found[serial]
        if time.monotonic() > end:
            raise RuntimeError(f"no disk with serial {serial!r} after {timeout_s:.0f} s; "
                               f"disks: {found or 'none'}")
        time.sleep(0.1)


def disk_facts(dev: str) -> dict[str, Any]:
    """What the guest saw of a disk: its write cache as Linux reports it, and the requests it sent
    (/sys/block/DEV/stat, Documentation/block/stat.rst: field 1 reads, 5 writes, 12 discards,
    16 flushes, in completed requests)."""
    base = Path("/sys/class/block", os.path.basename(os.path.realpath(dev)))
    stat = [int(v) for v in (base / "stat").read_text().split()]
    fields = {"reads": 1, "writes": 5, "discards": 12, "flushes": 16}  # older kernels stop earlier
    return {"device": dev, "write_cache": (base / "queue" / "write_cache").read_text().strip(),
            **{name: stat[i - 1] if len(stat) >= i else None for name, i in fields.items()}}


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
