"""Recorder host-dm: dm-log-writes on the host, under the filesystem that holds the guest's image file.

The log then holds what the host kernel wrote to its own disk: the page cache's writeback of the
image, with the host's flushes, and the host filesystem's own metadata. Crash states are taken of the
image's bytes, so the log is translated to image space through the image file's extents (FIEMAP):
writes inside the image land at their offset in the image, writes elsewhere (journal, inode tables,
bitmaps) are dropped and counted. The image is written in full with zeros before the log starts,
so its extents are allocated, written and fixed for the whole recording: a host write to them is a
write to the image's bytes, and nothing else moves them (DESIGN.md, "host-dm").

Pure at the core (the dm table, dmsetup's argv, FIEMAP's request and reply, the extent map, the
log's translation); thin wrappers run dmsetup through crashlab.proc and the FIEMAP ioctl.
"""

from __future__ import annotations

import bisect
import fcntl
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from crashlab import logformat, markers, proc
from crashlab.logformat import FLUSH, LogReader, LogWriter

LOG_TARGET = "crashlab-hostlw"
FS_BLOCK = 4096  # the host filesystem's block: one page of the host's page cache
# The host filesystem under the image: ext4 with page-sized blocks, its metadata made in full at
# mkfs so no lazy init writes into the log.
MKFS = ("mkfs.ext4", "-q", "-F", "-b", str(FS_BLOCK), "-E", "lazy_itable_init=0,lazy_journal_init=0")
# Native marks the host writes into its log around the guest's run.
MARK_START, MARK_INNER_EXIT = "start", "inner_exit"
DMSETUP_TIMEOUT_S = 60.0
ZERO_CHUNK = 1 << 20


class HostDmError(RuntimeError):
    """The host-side recorder cannot run here, or its image cannot be mapped; one line."""


# --- device-mapper -------------------------------------------------------------------------------

def log_writes_table(dev_sectors: int, data_dev: str, log_dev: str) -> str:
    """The dm table for a log-writes target over the whole of `data_dev`, logging to `log_dev`."""
    if dev_sectors <= 0:
        raise HostDmError(f"{data_dev}: {dev_sectors} sectors: nothing to log")
    return f"0 {dev_sectors} log-writes {data_dev} {log_dev}"


@dataclass(frozen=True)
class Dmsetup:
    """The host's dmsetup, one process per command (a handful per recording: marks by message are
    cheap enough here, unlike the per-fsync marks inside the guest)."""

    binary: str = "dmsetup"
    timeout_s: float = DMSETUP_TIMEOUT_S
    mapper: Path = Path("/dev/mapper")  # where udev (or dmsetup itself) puts the nodes

    def argv(self, *args: str) -> list[str]:
        return [self.binary, *args]

    def create_argv(self, name: str, table: str) -> list[str]:
        return self.argv("create", name, "--table", table)

    def message_argv(self, name: str, message: str) -> list[str]:
        return self.argv("message", name, "0", message)

    def remove_argv(self, name: str) -> list[str]:
        return self.argv("remove", name)

    def run(self, argv: list[str]) -> str:
        try:
            return proc.check(argv, self.timeout_s)
        except (proc.ToolError, OSError) as e:
            raise HostDmError(str(e)) from None

    def create(self, name: str, table: str) -> Path:
        self.run(self.create_argv(name, table))
        node = self.mapper / name
        if not node.exists():
            raise HostDmError(f"dmsetup create {name} made no {node} (without udev, set DM_DISABLE_UDEV=1)")
        return node

    def mark(self, name: str, mark: str) -> None:
        self.run(self.message_argv(name, f"mark {mark}"))

    def remove(self, name: str) -> None:
        """Remove the target: dm-log-writes logs every write not yet followed by a flush, then its
        mark `dm-log-writes-end`."""
        self.run(self.remove_argv(name))

    def unavailable(self) -> str | None:
        """Why this host cannot run dm-log-writes itself, or None if it can."""
        if not (self.mapper / "control").exists():
            return f"no {self.mapper / 'control'} (no device-mapper in this kernel)"
        if os.geteuid() != 0:
            return "device-mapper needs root"
        try:
            targets = self.run(self.argv("targets"))
        except HostDmError as e:
            return f"dmsetup: {e}"
        if "log-writes" not in targets.split():
            return "the kernel's device-mapper has no log-writes target (modprobe dm-log-writes)"
        return None


# --- FIEMAP --------------------------------------------------------------------------------------

# linux/fiemap.h: struct fiemap {u64 fm_start, fm_length; u32 fm_flags, fm_mapped_extents,
# fm_extent_count, fm_reserved; struct fiemap_extent fm_extents[]}, each extent {u64 fe_logical,
# fe_physical, fe_length, fe_reserved64[2]; u32 fe_flags, fe_reserved[3]}.
_FIEMAP = struct.Struct("=QQIIII")
_EXTENT = struct.Struct("=QQQ16xI12x")
FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
# Extents whose bytes are not plainly at `physical`: the image could not be read off the disk there.
FIEMAP_NOT_PLAIN = {0x2: "unknown", 0x4: "delalloc", 0x8: "encoded", 0x80: "encrypted",
                    0x100: "not aligned", 0x200: "inline", 0x400: "tail-packed", 0x800: "unwritten",
                    0x2000: "shared"}
FIEMAP_BATCH = 256


@dataclass(frozen=True, slots=True)
class Extent:
    logical: int  # byte offset in the file
    physical: int  # byte offset on the filesystem's device
    length: int
    flags: int = 0


def fiemap_request(start: int, count: int) -> bytearray:
    """The ioctl argument asking for up to `count` extents from byte `start`, after a sync."""
    head = _FIEMAP.pack(start, (1 << 64) - 1 - start, FIEMAP_FLAG_SYNC, 0, count, 0)
    return bytearray(head + bytes(_EXTENT.size * count))


def parse_fiemap(buf: bytes | bytearray) -> list[Extent]:
    """The extents in an answered FIEMAP buffer."""
    _, _, _, mapped, count, _ = _FIEMAP.unpack_from(buf, 0)
    if mapped > count:
        raise HostDmError(f"FIEMAP reports {mapped} extents in room for {count}")
    out = []
    for k in range(mapped):
        logical, physical, length, flags = _EXTENT.unpack_from(buf, _FIEMAP.size + k * _EXTENT.size)
        out.append(Extent(logical, physical, length, flags))
    return out


def fiemap(path: str | os.PathLike[str]) -> list[Extent]:
    """Every extent of the file at `path`, from the kernel (synced first)."""
    out: list[Extent] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        start = 0
        while True:
            buf = fiemap_request(start, FIEMAP_BATCH)
            try:
                fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
            except OSError as e:
                raise HostDmError(f"{path}: FIEMAP: {e.strerror} (the host filesystem must map its "
                                  "files' blocks: ext4, xfs)") from None
            batch = parse_fiemap(buf)
            out += batch
            if not batch or batch[-1].flags & FIEMAP_EXTENT_LAST:
                return out
            start = batch[-1].logical + batch[-1].length
    finally:
        os.close(fd)


def check_extents(extents: Sequence[Extent], size: int, block: int = FS_BLOCK) -> list[Extent]:
    """`extents` sorted, if they map every byte of a `size`-byte file to plain, block-aligned places
    on the device; else HostDmError saying what is wrong (a hole, a delayed or unwritten extent)."""
    pos = 0
    ext = sorted(extents, key=lambda x: x.logical)
    for x in ext:
        bad = [name for bit, name in FIEMAP_NOT_PLAIN.items() if x.flags & bit]
        if bad:
            raise HostDmError(f"image extent at {x.logical} is {', '.join(bad)}: its bytes are not "
                              "plainly on the disk (write the image in full before logging)")
        if x.logical != pos:
            raise HostDmError(f"the image has a hole at bytes {pos}..{x.logical}: write it in full first")
        if (x.logical | x.physical | x.length) % block:
            raise HostDmError(f"image extent {x.logical}+{x.length} at {x.physical} is not "
                              f"{block}-byte aligned")
        pos += x.length
    if pos < size:
        raise HostDmError(f"the image's extents cover {pos} of its {size} bytes")
    return ext


class ExtentMap:
    """Device byte ranges to image byte ranges, through a file's extents (pure)."""

    def __init__(self, extents: Sequence[Extent], size: int) -> None:
        self.size = size
        self.by_physical = sorted(extents, key=lambda x: x.physical)
        self._starts = [x.physical for x in self.by_physical]

    def to_image(self, dev_offset: int, length: int) -> list[tuple[int, int, int]]:
        """(image offset, device offset, length) of each piece of the device range that is image
        bytes, in device order; what falls outside every extent (or past the image) is not there."""
        out = []
        end = dev_offset + length
        k = max(0, bisect.bisect_right(self._starts, dev_offset) - 1)
        for x in self.by_physical[k:]:
            if x.physical >= end:
                break
            lo, hi = max(dev_offset, x.physical), min(end, x.physical + x.length)
            img = x.logical + lo - x.physical
            hi = min(hi, lo + max(0, self.size - img))
            if lo < hi:
                out.append((img, lo, hi - lo))
        return out


@dataclass
class MapStats:
    """What the translation kept and dropped."""

    entries_in: int = 0
    entries_out: int = 0
    image_writes: int = 0
    image_bytes: int = 0
    host_fs_writes: int = 0  # writes wholly outside the image: the host filesystem's own
    host_fs_bytes: int = 0
    split_writes: int = 0  # writes that straddled the image's edge or two of its extents
    flushes: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


def map_log(reader: LogReader, emap: ExtentMap, dest: str | os.PathLike[str]) -> MapStats:
    """Write `reader`'s device-space log as an image-space log at `dest`: the same entries in the
    same order, each write cut to its image pieces, the host filesystem's own writes dropped. A
    flush keeps its place whatever it carried (it is the host's flush either way), FUA stays on
    every piece of its write, a PREFLUSH on the first."""
    st = MapStats()
    ss = reader.sector_size
    with LogWriter(dest, ss) as w:
        for e in reader.index():
            st.entries_in += 1
            before = w.nr_entries
            if e.is_mark:
                w.mark(e.mark or "")
            elif e.carries_data or e.is_discard:
                pieces = emap.to_image(e.offset, e.length)
                if not pieces:
                    st.host_fs_writes += e.carries_data
                    st.host_fs_bytes += e.length if e.carries_data else 0
                    if e.is_flush:
                        w.flush(e.flags & ~(FLUSH | logformat.DISCARD | logformat.METADATA))
                        st.flushes += 1
                    continue
                st.split_writes += len(pieces) > 1
                data = reader.data(e) if e.carries_data else None
                for k, (img, dev, n) in enumerate(pieces):
                    flags = e.flags if k == 0 else e.flags & ~FLUSH
                    if data is None:
                        w.discard(img // ss, n // ss)
                        continue
                    for off, chunk in marker_runs(bytes(data[dev - e.offset:dev - e.offset + n]), ss):
                        w.write((img + off) // ss, chunk, flags)
                        flags &= ~FLUSH
                    st.image_writes += 1
                    st.image_bytes += n
                if e.carries_data:
                    outside = e.length - sum(n for _, _, n in pieces)
                    st.host_fs_bytes += outside
                st.flushes += e.is_flush
            elif e.is_flush:
                w.flush(e.flags & ~FLUSH)
                st.flushes += 1
            st.entries_out += w.nr_entries - before
    return st


def marker_runs(data: bytes, ss: int) -> list[tuple[int, bytes]]:
    """`data` as (offset, bytes) runs with every in-band marker sector a run of its own: the host
    writes back a page of the marker region holding several markers, and each marker's presence
    must be read from its own entry (crashlab.markers)."""
    if len(data) <= ss or markers.MAGIC not in data:
        return [(0, data)]
    out: list[tuple[int, bytes]] = []
    start = 0
    for off in range(0, len(data), ss):
        if markers.decode(data[off:off + ss]) is not None:
            if start < off:
                out.append((start, data[start:off]))
            out.append((off, data[off:off + ss]))
            start = off + ss
    if start < len(data):
        out.append((start, data[start:]))
    return out


def extract_image(disk: str | os.PathLike[str], extents: Sequence[Extent], size: int,
                  dest: str | os.PathLike[str]) -> None:
    """The image file's bytes read straight off the host disk (a file or a device) into `dest`."""
    src = os.open(disk, os.O_RDONLY)
    try:
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(out, size)
            for x in extents:
                n = min(x.length, size - x.logical)
                done = 0
                while done < n:
                    chunk = os.pread(src, min(ZERO_CHUNK, n - done), x.physical + done)
                    if not chunk:
                        raise HostDmError(f"{disk} ends before the image extent at {x.physical}")
                    if chunk.count(0) != len(chunk):  # keep the copy sparse
                        os.pwrite(out, chunk, x.logical + done)
                    done += len(chunk)
        finally:
            os.close(out)
    finally:
        os.close(src)


def write_zeros(path: str | os.PathLike[str], size: int) -> None:
    """A `size`-byte file of real zeros, synced: every block allocated and written, none unwritten
    (an fallocated extent would be converted, a metadata change, at the guest's first write)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        zero = bytes(ZERO_CHUNK)
        pos = 0
        while pos < size:
            pos += os.write(fd, zero[:size - pos])
        os.fsync(fd)
    finally:
        os.close(fd)


def extents_as_json(extents: Sequence[Extent]) -> list[list[int]]:
    return [[x.logical, x.physical, x.length, x.flags] for x in extents]


def extents_from_json(rows: object) -> list[Extent]:
    if not isinstance(rows, list) or not all(
            isinstance(r, list) and len(r) == 4 and all(isinstance(v, int) and v >= 0 for v in r)
            for r in rows):
        raise HostDmError("the recording's extent list is not [[logical, physical, length, flags], ...]")
    return [Extent(*r) for r in rows]
