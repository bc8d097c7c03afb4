"""The dm-log-writes log format: reading, writing and replaying.

One format, two writers: the kernel's dm-log-writes target (drivers/md/dm-log-writes.c) and QEMU's
`blklogwrites` filter node (block/blklogwrites.c). Layout, in units of the log's sector size:

    sector 0    superblock: u64 magic, u64 version (1), u64 nr_entries, u32 sectorsize, zero padded
    sector 1..  entries: one header sector {u64 sector, u64 nr_sectors, u64 flags, u64 data_len},
                then nr_sectors data sectors (none for FLUSH, DISCARD and MARK entries). A MARK keeps
                its name inline after the 32-byte header, data_len bytes long.

The superblock's nr_entries is stale by design (the kernel updates it only on FUA and MARK entries,
QEMU only on a flush or every 4096 entries, and never at all with cache.no-flush), so the reader
scans on past it and stops at the first header that cannot be valid, reporting how many entries it
recovered beyond the count. Data stays in the file: entries carry offsets and data is read through
an mmap on demand, so a log of any size costs memory only for its headers.

Nothing but `InputError` leaves this module for bad input: a log is untrusted bytes, and the reader
is fuzzed (tests/test_fuzz.py) to hold to that.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import lzma
import mmap
import os
import stat
import struct
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, BinaryIO

from crashlab import markers, rundir
from crashlab.proc import LIBC

MAGIC = 0x6A736677736872
VERSION = 1

FLUSH = 0x1
FUA = 0x2
DISCARD = 0x4
MARK = 0x8
METADATA = 0x10
KNOWN_FLAGS = FLUSH | FUA | DISCARD | MARK | METADATA
FLAG_NAMES = {FLUSH: "FLUSH", FUA: "FUA", DISCARD: "DISCARD", MARK: "MARK", METADATA: "METADATA"}

_SUPER = struct.Struct("<QQQI")
_ENTRY = struct.Struct("<QQQQ")
SECTOR_SIZES = (512, 1024, 2048, 4096)
_ZEROS = bytes(max(SECTOR_SIZES))
# File offsets are signed 64-bit (loff_t): no device, image or log can reach past this byte.
MAX_OFFSET = (1 << 63) - 1
_INFLATE_CHUNK = 1 << 20


class InputError(Exception):
    """Bad input named in one line: the only error type the reader and the builder let escape."""


class LogFormatError(InputError):
    """The file is not a dm-log-writes log, or is damaged where it cannot be scanned past."""


class LogDamagedError(LogFormatError):
    """A log damaged inside the entries its superblock promises, used where that was not allowed."""


class ImageError(InputError):
    """An image or output path that cannot be written (a missing directory, a full disk, EFBIG)."""


def flag_names(flags: int) -> str:
    return "|".join(n for bit, n in FLAG_NAMES.items() if flags & bit) or "WRITE"


@dataclass(frozen=True, slots=True)
class Superblock:
    magic: int
    version: int
    nr_entries: int
    sector_size: int

    @property
    def valid(self) -> bool:
        return self.magic == MAGIC and self.version == VERSION and self.sector_size in SECTOR_SIZES

    @property
    def blank(self) -> bool:
        """All zero: QEMU with cache.no-flush never writes it."""
        return self.magic == self.version == self.nr_entries == self.sector_size == 0


@dataclass(frozen=True, slots=True)
class Entry:
    index: int  # 0-based position in the log
    sector: int  # on the logged device, in log sectors
    nr_sectors: int
    flags: int
    data_len: int
    header_offset: int  # byte offset of the header in the log file
    sector_size: int
    mark: str | None = None  # name of a native MARK entry
    marker: markers.Marker | None = None  # an in-band marker write (never replayed)

    @property
    def data_offset(self) -> int:
        return self.header_offset + self.sector_size

    @property
    def offset(self) -> int:
        """Byte offset on the logged device."""
        return self.sector * self.sector_size

    @property
    def length(self) -> int:
        """Bytes on the logged device (data written or range discarded)."""
        return self.nr_sectors * self.sector_size

    @property
    def end_offset(self) -> int:
        """Byte offset in the log just past this entry."""
        return self.data_offset + (self.length if self.carries_data else 0)

    @property
    def carries_data(self) -> bool:
        return self.nr_sectors > 0 and not self.flags & (DISCARD | MARK)

    @property
    def is_flush(self) -> bool:
        return bool(self.flags & FLUSH)

    @property
    def is_fua(self) -> bool:
        return bool(self.flags & FUA)

    @property
    def is_discard(self) -> bool:
        return bool(self.flags & DISCARD)

    @property
    def is_mark(self) -> bool:
        return bool(self.flags & MARK)

    @property
    def is_metadata(self) -> bool:
        return bool(self.flags & METADATA)

    @property
    def is_write(self) -> bool:
        """A data write the replayer applies (not an in-band marker)."""
        return self.carries_data and self.marker is None

    @property
    def kind(self) -> str:
        if self.is_mark:
            return "mark"
        if self.is_discard:
            return "discard"
        if self.marker is not None:
            return "marker"
        if self.carries_data:
            return "write"
        return "flush" if self.is_flush else "empty"

    def describe(self) -> str:
        what = {
            "mark": f"mark {self.mark!r}",
            "marker": f"marker {self.marker.name!r} seq {self.marker.seq}" if self.marker else "",
            "discard": f"discard {self.offset}+{self.length}",
            "write": f"write {self.offset}+{self.length}",
            "flush": "flush",
            "empty": "empty",
        }[self.kind]
        return f"{self.index:>8}  {flag_names(self.flags):<22} {what}"


@dataclass(frozen=True, slots=True)
class Damage:
    """Where and why the scan stopped early, inside the entries the superblock promises."""

    entry: int
    offset: int
    reason: str

    def __str__(self) -> str:
        return f"entry {self.entry} at byte offset {self.offset}: {self.reason}"


@dataclass(slots=True)
class Summary:
    sector_size: int = 0
    superblock: str = ""  # "valid", "blank" or "invalid"
    superblock_entries: int = 0
    entries: int = 0
    writes: int = 0
    bytes_written: int = 0
    flushes: int = 0
    fua: int = 0
    discards: int = 0
    bytes_discarded: int = 0
    metadata: int = 0
    marks: list[str] = field(default_factory=list)
    markers: int = 0
    ticks: int = 0
    recovered_beyond_superblock: int = 0
    log_bytes: int = 0  # of an .xz: what was inflated, through the header that ends the log
    damage: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__slots__}


def parse_header(head: bytes, ss: int) -> tuple[int, int, int, int] | str:
    """(sector, nr_sectors, flags, data_len) of the `ss`-byte entry header `head`, or why it cannot
    be one. Only what the header itself shows: whether its data fits the log is the caller's."""
    sector, nr_sectors, flags, data_len = _ENTRY.unpack_from(head, 0)
    if flags & ~KNOWN_FLAGS:
        return f"unknown flags {flags:#x}"
    if flags & MARK:
        if nr_sectors or not 0 < data_len <= ss - _ENTRY.size:
            return f"mark with {nr_sectors} sectors and name length {data_len}"
        pad_from = _ENTRY.size + data_len
    else:
        if data_len:
            return f"data_len {data_len} on a non-mark entry"
        if not nr_sectors and not flags & FLUSH:
            return "empty entry without FLUSH (end of log)"
        pad_from = _ENTRY.size
    if head[pad_from:ss] != _ZEROS[:ss - pad_from]:
        return "non-zero padding after the header"
    if nr_sectors and (sector + nr_sectors) * ss > MAX_OFFSET:
        # Not a device but an overflow: no file offset reaches it, so no recorder can have logged it.
        return f"{flag_names(flags)} of {nr_sectors} sectors at sector {sector} ends past byte 2^63"
    return sector, nr_sectors, flags, data_len


def data_bytes(nr_sectors: int, flags: int, ss: int) -> int:
    """Bytes of data that follow an entry's header in the log (none for discards and marks)."""
    return nr_sectors * ss if nr_sectors and not flags & (DISCARD | MARK) else 0


def choose_sector_size(sb: Superblock, requested: int | None, name: str,
                       header_fits: Callable[[int], bool]) -> int:
    """The log's sector size: the one asked for, the superblock's, or for a blank superblock the
    first whose first header parses and whose data fits (`header_fits(size)`)."""
    if requested is not None:
        if requested not in SECTOR_SIZES:
            raise LogFormatError(f"sector size {requested} is not one of {SECTOR_SIZES}")
        return requested
    if sb.valid:
        return sb.sector_size
    if not sb.blank:
        raise LogFormatError(
            f"{name}: not a dm-log-writes log: bad superblock at byte offset 0 "
            f"(magic {sb.magic:#x}, version {sb.version}, sector size {sb.sector_size})")
    # A blank superblock (QEMU, cache.no-flush): the first header that parses decides.
    for size in SECTOR_SIZES:
        if header_fits(size):
            return size
    raise LogFormatError(f"{name}: blank superblock and no valid entry at any sector size")


_FILE_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
               stat.S_IFCHR: "a character device"}


def open_input(path: Path, name: str) -> BinaryIO:
    """`path` opened for reading if it is a regular file or a block device, else LogFormatError.

    O_NONBLOCK so that a FIFO is refused instead of blocking the open until a writer comes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise LogFormatError(f"{name}: cannot open: {e.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        os.close(fd)
        what = _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise LogFormatError(f"{name}: is {what}, not a log file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


class LogReader:
    """A dm-log-writes log opened for reading, scanned lazily through an mmap."""

    def __init__(self, path: str | os.PathLike[str], sector_size: int | None = None,
                 name: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path)
        self.name = str(path if name is None else name)  # what messages call it: the user's file
        self._file = open_input(self.path, self.name)
        st = os.fstat(self._file.fileno())
        self.size = self._file.seek(0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size
        if self.size < 512:
            self._file.close()
            raise LogFormatError(f"{self.name}: {self.size} bytes is too short for a log superblock")
        try:
            self._map = mmap.mmap(self._file.fileno(), self.size, prot=mmap.PROT_READ)
        except OSError as e:
            self._file.close()
            raise LogFormatError(f"{self.name}: cannot map: {e.strerror}") from None
        self.superblock = Superblock(*_SUPER.unpack_from(self._map, 0))
        self.damage: Damage | None = None
        self._entries: list[Entry] | None = None
        try:
            self.sector_size = choose_sector_size(
                self.superblock, sector_size, self.name,
                lambda size: size < self.size and self._header(0, size, size)[0] is not None)
        except LogFormatError:
            self.close()
            raise

    def _header(self, index: int, offset: int, ss: int) -> tuple[Entry | None, str]:
        """The entry whose header starts at `offset`, or None with the reason it cannot be one."""
        if offset + ss > self.size:
            return None, f"header needs {ss} bytes, {self.size - offset} left"
        fields = parse_header(self._map[offset:offset + ss], ss)
        if isinstance(fields, str):
            return None, fields
        sector, nr_sectors, flags, data_len = fields
        entry = Entry(index, sector, nr_sectors, flags, data_len, offset, ss)
        if entry.end_offset > self.size:
            return None, (f"{flag_names(flags)} of {nr_sectors} sectors runs "
                          f"{entry.end_offset - self.size} bytes past the end of the log")
        if flags & MARK:
            raw = self._map[offset + _ENTRY.size:offset + _ENTRY.size + data_len]
            name = raw.rstrip(b"\0").decode(errors="replace")
            return Entry(index, sector, nr_sectors, flags, data_len, offset, ss, mark=name), ""
        if entry.carries_data and self._map[entry.data_offset:entry.data_offset + 8] == markers.MAGIC:
            found = markers.decode(self._map[entry.data_offset:entry.data_offset + markers.PAYLOAD])
            if found is not None:
                return Entry(index, sector, nr_sectors, flags, data_len, offset, ss, marker=found), ""
        return entry, ""

    def __iter__(self) -> Iterator[Entry]:
        return self.entries()

    def entries(self) -> Iterator[Entry]:
        """Every entry in log order; stops at the first header that cannot be valid.

        Stopping inside the superblock's count is damage (a cut or overwritten log) and is recorded
        in `self.damage`; stopping past it is just the end of the log.
        """
        if self._entries is not None:
            yield from self._entries
            return
        found: list[Entry] = []
        ss, offset, index = self.sector_size, self.sector_size, 0
        promised = self.superblock.nr_entries if self.superblock.valid else 0
        while offset < self.size:
            entry, why = self._header(index, offset, ss)
            if entry is None:
                if index < promised:
                    self.damage = Damage(index, offset, f"{why}; the superblock promises {promised} entries")
                break
            found.append(entry)
            yield entry
            offset, index = entry.end_offset, index + 1
        else:
            if index < promised:
                self.damage = Damage(index, offset, f"log ends; the superblock promises {promised} entries")
        self._entries = found

    def index(self) -> list[Entry]:
        """All entries as a list (headers only; data stays in the file)."""
        if self._entries is None:
            for _ in self.entries():
                pass
        assert self._entries is not None
        return self._entries

    def data(self, entry: Entry) -> memoryview:
        """The data an entry writes, as a view into the mapped log (no copy)."""
        if not entry.carries_data:
            return memoryview(b"")
        return memoryview(self._map)[entry.data_offset:entry.data_offset + entry.length]

    def summary(self) -> Summary:
        s = Summary(sector_size=self.sector_size, log_bytes=self.size)
        sb = self.superblock
        s.superblock = "valid" if sb.valid else "blank" if sb.blank else "invalid"
        s.superblock_entries = sb.nr_entries if sb.valid else 0
        for e in self.entries():
            s.entries += 1
            s.flushes += e.is_flush
            s.fua += e.is_fua
            s.metadata += e.is_metadata
            if e.is_mark:
                s.marks.append(e.mark or "")
            elif e.marker is not None:
                s.markers += 1
                s.ticks += e.marker.is_tick
            elif e.is_discard:
                s.discards += 1
                s.bytes_discarded += e.length
            elif e.carries_data:
                s.writes += 1
                s.bytes_written += e.length
        s.recovered_beyond_superblock = max(0, s.entries - s.superblock_entries)
        s.damage = str(self.damage) if self.damage else None
        return s

    def require_intact(self) -> None:
        """Refuse a log damaged inside the entries its superblock promises (LogDamagedError)."""
        self.index()
        if self.damage is not None:
            raise LogDamagedError(f"{self.name}: damaged log: {self.damage}")

    def close(self) -> None:
        with contextlib.suppress(AttributeError, BufferError):
            self._map.close()
        self._file.close()

    def __enter__(self) -> LogReader:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


@contextlib.contextmanager
def open_log(path: str | os.PathLike[str], sector_size: int | None = None) -> Iterator[LogReader]:
    """Open a log; `.xz` logs are decompressed to a temporary file first (mmap needs a real file),
    only as far as their entries reach and never past the free space there."""
    path = Path(path)
    if not path.exists():
        raise LogFormatError(f"{path}: no such log")
    if path.suffix != ".xz":
        with LogReader(path, sector_size) as reader:
            yield reader
        return
    # In this process's run directory, so a killed run's inflated log is reclaimed by the next.
    shm = rundir.tmpfs()
    tmpdir = str(shm) if shm else tempfile.gettempdir()
    with open_input(path, str(path)) as raw, lzma.open(raw) as src, \
            tempfile.NamedTemporaryFile(prefix="crashlab-log-", dir=tmpdir) as tmp:
        free = os.statvfs(tmpdir)
        _Inflater(src, tmp.fileno(), str(path), tmpdir, free.f_bavail * free.f_frsize).run(sector_size)
        with LogReader(tmp.name, sector_size, name=path) as reader:
            yield reader


class _Inflater:
    """Decompresses an .xz log into `fd` as far as a `LogReader` will look and no further.

    Junk or zeroes past a log's end (a preallocated log file, an xz bomb) are never inflated: the
    walk below follows the entry chain exactly as `LogReader` does and stops at the header that ends
    it. Bytes past `room` are counted but not stored, so a header declaring more data than fits is
    refused only if the log really holds that much; otherwise it reads as the same cut log the
    uncompressed file is. All-zero chunks become holes.
    """

    def __init__(self, src: IO[bytes], fd: int, name: str, where: str, room: int) -> None:
        self.src = src
        self.fd, self.name, self.where, self.room = fd, name, where, room
        self.have = 0  # bytes of the log decompressed so far
        self.eof = False

    def ensure(self, n: int) -> bool:
        """Whether the log holds at least `n` bytes, decompressing exactly up to them."""
        while self.have < n and not self.eof:
            try:
                chunk = self.src.read(min(_INFLATE_CHUNK, n - self.have))
            except (lzma.LZMAError, EOFError) as e:
                why = "truncated .xz (the compressed data ends early)" if isinstance(e, EOFError) else e
                raise LogFormatError(f"{self.name}: cannot decompress: {why}") from None
            if not chunk:
                self.eof = True
                break
            keep = chunk[:max(0, self.room - self.have)]
            if keep.count(0) != len(keep):
                try:
                    os.pwrite(self.fd, keep, self.have)
                except OSError as e:
                    raise LogFormatError(f"{self.name}: cannot decompress into {self.where}: "
                                         f"{e.strerror}") from None
            self.have += len(chunk)
        return self.have >= n

    def read(self, offset: int, n: int) -> bytes:
        """Decompressed bytes: holes (zero chunks, bytes past `room`) read as zeroes, as they will
        once the file is extended to its full length."""
        return os.pread(self.fd, n, offset).ljust(n, b"\0")

    def next_entry(self, offset: int, ss: int) -> int | None:
        """Where the entry starting at `offset` ends, if it is whole (as `LogReader._header` sees
        it), else None."""
        if not self.ensure(offset + ss):
            return None
        fields = parse_header(self.read(offset, ss), ss)
        if isinstance(fields, str):
            return None
        end = offset + ss + data_bytes(fields[1], fields[2], ss)
        return end if self.ensure(end) else None

    def run(self, sector_size: int | None) -> None:
        self.ensure(2 * max(SECTOR_SIZES))  # the superblock and the first header at every size
        used = self.have
        if self.have >= 512:  # else LogReader calls it too short
            sb = Superblock(*_SUPER.unpack(self.read(0, _SUPER.size)))
            ss = choose_sector_size(sb, sector_size, self.name,
                                    lambda size: self.next_entry(size, size) is not None)
            offset = ss
            while (end := self.next_entry(offset, ss)) is not None:
                offset = end
            used = max(used, min(offset + ss, self.have))  # through the header that ends the log
        if used > self.room:
            raise LogFormatError(f"{self.name}: its entries reach byte {used}, past the {self.room} "
                                 f"bytes free in {self.where} to decompress it into")
        os.ftruncate(self.fd, self.have)


class LogWriter:
    """Writes a log in the kernel's layout (used by tests and to re-emit edited logs)."""

    def __init__(self, path: str | os.PathLike[str], sector_size: int = 512) -> None:
        if sector_size not in SECTOR_SIZES:
            raise ValueError(f"sector size {sector_size} is not one of {SECTOR_SIZES}")
        self.sector_size = sector_size
        self.nr_entries = 0
        self._file = Path(path).open("wb")  # noqa: SIM115 - owned for the writer's lifetime
        self._file.write(b"\0" * sector_size)

    def _header(self, sector: int, nr_sectors: int, flags: int, inline: bytes = b"") -> None:
        head = _ENTRY.pack(sector, nr_sectors, flags, len(inline) if flags & MARK else 0) + inline
        self._file.write(head.ljust(self.sector_size, b"\0"))
        self.nr_entries += 1

    def write(self, sector: int, data: bytes, flags: int = 0) -> None:
        if not data or len(data) % self.sector_size:
            raise ValueError(f"write of {len(data)} bytes is not whole {self.sector_size}-byte sectors")
        self._header(sector, len(data) // self.sector_size, flags)
        self._file.write(data)

    def flush(self, flags: int = 0) -> None:
        self._header(0, 0, FLUSH | flags)

    def discard(self, sector: int, nr_sectors: int) -> None:
        self._header(sector, nr_sectors, DISCARD)

    def mark(self, name: str) -> None:
        raw = name.encode()
        if not 0 < len(raw) <= self.sector_size - _ENTRY.size:
            raise ValueError(f"mark name of {len(raw)} bytes does not fit a header sector")
        self._header(0, 0, MARK, raw)

    def close(self, nr_entries: int | None = None, blank_superblock: bool = False) -> None:
        """Finish the log; `nr_entries`/`blank_superblock` write a stale or missing count, as real
        recorders leave it."""
        if self._file.closed:
            return
        self._file.seek(0)
        if not blank_superblock:
            count = self.nr_entries if nr_entries is None else nr_entries
            self._file.write(_SUPER.pack(MAGIC, VERSION, count, self.sector_size))
        self._file.close()

    def __enter__(self) -> LogWriter:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# --- replay ------------------------------------------------------------------------------------

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
LIBC.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Discard a range of an image file: a hole reads as zeroes and costs no space. Falls back to
    writing zeroes where the filesystem cannot punch holes."""
    if length <= 0:
        return
    if LIBC.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENODEV):
        raise OSError(err, os.strerror(err))
    zero = bytes(min(length, 1 << 20))
    end = offset + length
    while offset < end:
        offset += os.pwrite(fd, zero[:end - offset], offset)


def apply(reader: LogReader, entry: Entry, fd: int) -> None:
    """Apply one entry to an open image: writes are written, discards punched; flushes, native
    marks and in-band markers change nothing."""
    if entry.is_write:
        os.pwrite(fd, reader.data(entry), entry.offset)
    elif entry.is_discard:
        punch_hole(fd, entry.offset, entry.length)


def mark_end(entries: Sequence[Entry], name: str) -> int | None:
    """How many entries run through the first native mark or in-band marker named `name`; None if
    there is none."""
    for e in entries:
        if e.mark == name or (e.marker is not None and e.marker.name == name):
            return e.index + 1
    return None


def flush_end(entries: Sequence[Entry], n: int) -> int | None:
    """How many entries run through the `n`-th flush entry (from 1); None if there are fewer."""
    flushes = [e.index for e in entries if e.is_flush]
    return flushes[n - 1] + 1 if 0 < n <= len(flushes) else None


def replay(reader: LogReader, image: str | os.PathLike[str], stop: int | None = None,
           start: int = 0) -> int:
    """Apply entries [start, stop) to `image` (created if missing); returns the number applied."""
    entries = reader.index()
    stop = len(entries) if stop is None else stop
    try:
        fd = os.open(image, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            for entry in entries[start:stop]:
                apply(reader, entry, fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise ImageError(f"{image}: cannot write: {e.strerror or e}") from None
    return max(0, stop - start)
