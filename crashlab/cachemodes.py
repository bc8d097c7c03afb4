"""QEMU disk cache modes: the one table the whole project uses.

Source: QEMU block.c `bdrv_parse_cache_mode`, blockdev.c, qemu-options.hx; libvirt formatdomain.rst
(`<driver cache='...'/>`). See DESIGN.md, "Cache modes".
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CacheMode:
    name: str
    direct: bool  # cache.direct: host O_DIRECT, bypassing the host page cache
    no_flush: bool  # cache.no-flush: guest flushes are dropped, even at shutdown
    write_cache: bool  # the guest sees a volatile write cache (virtio-blk write-cache=on)
    # Seconds an unflushed write may stay volatile before it is taken as persisted (DESIGN.md,
    # "volatility window"): host dirty expiry for page-cache modes, an assumed 1 s disk cache for
    # `none`, 0 where nothing is ever volatile.
    default_window_s: float

    @property
    def blockdev_cache(self) -> dict[str, str]:
        """The `cache.*` options for a `-blockdev` node."""
        return {"cache.direct": _onoff(self.direct), "cache.no-flush": _onoff(self.no_flush)}

    @property
    def device_write_cache(self) -> str:
        """The `write-cache=` property of the guest's virtio-blk device."""
        return _onoff(self.write_cache)


def _onoff(flag: bool) -> str:
    return "on" if flag else "off"


HOST_DIRTY_EXPIRE_S = 30.0  # vm.dirty_expire_centisecs = 3000 on a stock kernel
DISK_CACHE_WINDOW_S = 1.0  # an assumption, stated as such in every report

CACHE_MODES: dict[str, CacheMode] = {
    m.name: m
    for m in (
        CacheMode("writeback", direct=False, no_flush=False, write_cache=True,
                  default_window_s=HOST_DIRTY_EXPIRE_S),
        CacheMode("none", direct=True, no_flush=False, write_cache=True,
                  default_window_s=DISK_CACHE_WINDOW_S),
        CacheMode("writethrough", direct=False, no_flush=False, write_cache=False, default_window_s=0.0),
        CacheMode("directsync", direct=True, no_flush=False, write_cache=False, default_window_s=0.0),
        CacheMode("unsafe", direct=False, no_flush=True, write_cache=True,
                  default_window_s=HOST_DIRTY_EXPIRE_S),
    )
}


class UnknownCacheMode(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown cache mode {name!r}; valid modes: {', '.join(CACHE_MODES)}")


def cache_mode(name: str) -> CacheMode:
    try:
        return CACHE_MODES[name.strip().lower()]
    except KeyError:
        raise UnknownCacheMode(name) from None


def from_libvirt_disk(xml: str) -> CacheMode:
    """The cache mode of a libvirt `<disk>` element; libvirt's default (no `cache=`) is QEMU's, writeback."""
    try:
        disk = ET.fromstring(xml)
    except ET.ParseError as e:
        raise ValueError(f"not a libvirt <disk> element: {e}") from None
    if disk.tag != "disk":
        raise ValueError(f"expected a <disk> element, got <{disk.tag}>")
    driver = disk.find("driver")
    mode = driver.get("cache") if driver is not None else None
    if mode in (None, "default"):
        return CACHE_MODES["writeback"]
    return cache_mode(mode)
