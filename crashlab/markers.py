"""In-band markers: one-sector O_DIRECT writes that carry a name and the guest clock.

Native dm-log-writes marks only exist under the `dm` recorder and bunch up without barriers, so
durability points and time are also written *through the data path*, to a reserved tail region of the
logged device that the filesystem never touches. They then land in the log in completion order under
both recorders and every cache mode (DESIGN.md, "Marks that work everywhere"). The replayer recognises
them by magic and checksum and does not write them.

Layout of the first 512 bytes of a marker block (little-endian, rest of the block zero):

    0   8  magic  b"CRLBMARK"
    8   4  version (1)
    12  4  crc32 of bytes 16..512
    16  8  sequence number (per writer, from 0)
    24  8  guest CLOCK_MONOTONIC in nanoseconds
    32  2  name length
    34  .. name, UTF-8
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

MAGIC = b"CRLBMARK"
VERSION = 1
PAYLOAD = 512
_HEAD = struct.Struct("<8sII")
_BODY = struct.Struct("<QQH")
MAX_NAME = PAYLOAD - _HEAD.size - _BODY.size

TICK = "tick"
WORKLOAD_START = "workload-start"
WORKLOAD_END = "workload-end"
TICK_INTERVAL_S = 0.1


@dataclass(frozen=True, slots=True)
class Marker:
    seq: int
    clock_ns: int
    name: str

    @property
    def is_tick(self) -> bool:
        return self.name == TICK


def encode(marker: Marker, block_size: int = PAYLOAD) -> bytes:
    """The marker block for `marker`, `block_size` bytes (a multiple of 512)."""
    if block_size < PAYLOAD or block_size % PAYLOAD:
        raise ValueError(f"marker block size {block_size} is not a multiple of {PAYLOAD}")
    name = marker.name.encode()
    if len(name) > MAX_NAME:
        raise ValueError(f"marker name longer than {MAX_NAME} bytes: {marker.name!r}")
    body = _BODY.pack(marker.seq, marker.clock_ns, len(name)) + name
    body = body.ljust(PAYLOAD - _HEAD.size, b"\0")
    head = _HEAD.pack(MAGIC, VERSION, zlib.crc32(body))
    return (head + body).ljust(block_size, b"\0")


def decode(data: bytes | memoryview) -> Marker | None:
    """The marker in `data`, or None if `data` is not a marker block (cheap on ordinary data)."""
    if len(data) < PAYLOAD or bytes(data[:8]) != MAGIC:
        return None
    _, version, crc = _HEAD.unpack_from(data, 0)
    body = bytes(data[_HEAD.size:PAYLOAD])
    if version != VERSION or zlib.crc32(body) != crc:
        return None
    seq, clock_ns, name_len = _BODY.unpack_from(body, 0)
    if name_len > MAX_NAME:
        return None
    try:
        name = body[_BODY.size:_BODY.size + name_len].decode()
    except UnicodeDecodeError:
        return None
    return Marker(seq, clock_ns, name)


class MarkerWriter:
    """Writes markers round-robin into `[offset, offset + length)` of `device` with O_DIRECT.

    O_DIRECT without O_DSYNC: the write must reach the recorder in completion order but must not be
    FUA, or it would itself be a durability point. Writes are serialised so sequence numbers follow
    completion order. `tick_interval` > 0 starts a thread that writes a `tick` marker that often.
    """

    def __init__(self, device: str, offset: int, length: int, block_size: int = PAYLOAD,
                 tick_interval: float = 0.0, listener: Callable[[Marker], None] | None = None) -> None:
        if offset % block_size or length < block_size:
            raise ValueError(f"marker region {offset}+{length} not aligned to {block_size}")
        self.device, self.offset, self.block_size = device, offset, block_size
        self.slots = length // block_size
        self.seq = 0
        # Told of every marker once written (the guest sends native dm marks, starts fault clocks).
        self.listener = listener
        self._lock = threading.Lock()
        self._buf = mmap.mmap(-1, block_size)  # page-aligned, as O_DIRECT needs
        self._fd = os.open(device, os.O_WRONLY | getattr(os, "O_DIRECT", 0))
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if tick_interval > 0:
            self._ticker = threading.Thread(target=self._tick_loop, args=(tick_interval,), daemon=True)
            self._ticker.start()

    def mark(self, name: str, announce: Callable[[int], None] | None = None) -> Marker:
        """Write a marker; `announce(seq)` runs first, under the lock, so what the marker stands for
        can be saved before the marker can reach the log."""
        with self._lock:
            if announce is not None:
                announce(self.seq)
            marker = Marker(self.seq, time.monotonic_ns(), name)
            self._buf.seek(0)
            self._buf.write(encode(marker, self.block_size))
            pos = self.offset + (self.seq % self.slots) * self.block_size
            if os.pwritev(self._fd, [self._buf], pos) != self.block_size:
                raise OSError(f"short marker write to {self.device} at {pos}")
            self.seq += 1
            if self.listener is not None:
                self.listener(marker)
            return marker

    def _tick_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.mark(TICK)

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        os.close(self._fd)
        self._buf.close()

    def __enter__(self) -> MarkerWriter:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
