"""Device-mapper from inside the guest: targets made with dmsetup, messages and suspends by ioctl.

Native dm marks are sent with the DM_TARGET_MSG ioctl on /dev/mapper/control, never one dmsetup
process per mark (DESIGN.md: 1.5 s against 58 s for 200).
"""

from __future__ import annotations

import fcntl
import os
import struct
from typing import Any

from crashlab.guest.inguest.runtime import run

# struct dm_ioctl (include/uapi/linux/dm-ioctl.h): u32 version[3], data_size, data_start,
# target_count, s32 open_count, u32 flags, event_nr, padding, u64 dev, char name[128], uuid[129],
# data[7]: 312 bytes. DM_TARGET_MSG is _IOWR(0xfd, 14, struct dm_ioctl).
_DM_IOCTL = struct.Struct("<3IIIIiIIIQ128s129s7s")
_DM_VERSION = (4, 0, 0)
DM_DEV_SUSPEND, DM_TARGET_MSG = 6, 14
DM_SUSPEND_FLAG, DM_SKIP_LOCKFS_FLAG = 1 << 1, 1 << 4


def dm_ioctl_number(cmd: int) -> int:
    return (3 << 30) | (_DM_IOCTL.size << 16) | (0xFD << 8) | cmd  # _IOWR(DM_IOCTL, cmd, dm_ioctl)


def dm_buffer(device: str, payload: bytes = b"", flags: int = 0) -> bytearray:
    """A struct dm_ioctl for `device` followed by `payload`, padded to 8 bytes."""
    size = _DM_IOCTL.size + len(payload)
    size += -size % 8
    head = _DM_IOCTL.pack(*_DM_VERSION, size, _DM_IOCTL.size, 0, 0, flags, 0, 0, 0,
                          device.encode(), b"", b"")
    return bytearray((head + payload).ljust(size, b"\0"))


def dm_message_buffer(device: str, message: str, sector: int = 0) -> bytearray:
    """The ioctl argument that sends `message` to the target of `device` at `sector`."""
    return dm_buffer(device, struct.pack("<Q", sector) + message.encode() + b"\0")


class DmControl:
    """/dev/mapper/control, kept open so each message costs one ioctl."""

    def __init__(self) -> None:
        self.fd = os.open("/dev/mapper/control", os.O_RDWR)

    def message(self, device: str, message: str) -> None:
        fcntl.ioctl(self.fd, dm_ioctl_number(DM_TARGET_MSG), dm_message_buffer(device, message))

    def suspend(self, device: str) -> None:
        """Suspend without freezing the filesystem (a freeze would write and flush it first)."""
        fcntl.ioctl(self.fd, dm_ioctl_number(DM_DEV_SUSPEND),
                    dm_buffer(device, flags=DM_SUSPEND_FLAG | DM_SKIP_LOCKFS_FLAG))

    def resume(self, device: str) -> None:
        """Resume, swapping in the table loaded into the inactive slot, if any."""
        fcntl.ioctl(self.fd, dm_ioctl_number(DM_DEV_SUSPEND), dm_buffer(device))

    def close(self) -> None:
        os.close(self.fd)


def dmsetup_create(name: str, table: str) -> str:
    run("dmsetup", "create", name, "--table", table)
    node = f"/dev/mapper/{name}"
    if not os.path.exists(node):
        raise RuntimeError(f"dmsetup create {name} made no {node} (is DM_DISABLE_UDEV=1 set?)")
    return node


def flakey_table(dev_sectors: int, dev: str, mode: str | None, corrupt: dict[str, Any] | None = None) -> str:
    """A dm-flakey table: always up when `mode` is None, else down for good with `mode`'s feature.

    `error_reads` has no feature of its own in Linux 6.1: a down interval without features fails
    every read *and* write, which is what that mode gives there.
    """
    base = f"0 {dev_sectors} flakey {dev} 0"
    if mode is None:
        return f"{base} 180 0"
    features: list[str] = {"drop_writes": ["drop_writes"], "error_writes": ["error_writes"],
                           "error_reads": [], "corrupt_bio_byte": []}[mode]
    if corrupt:
        features += ["corrupt_bio_byte", str(corrupt["byte"]), corrupt.get("direction", "w"),
                     str(corrupt.get("value", 0)), str(corrupt.get("flags", 0))]
    feat = f" {len(features)} {' '.join(features)}" if features else ""
    return f"{base} 0 180{feat}"
