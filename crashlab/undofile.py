"""e2fsprogs' undo files (`e2fsck -z FILE`, format E2UNDO02): read one and write its saved blocks
back into the image, as `e2undo FILE IMAGE` does, without a process.

An ext4 state checked in place (check.inplace) is replayed with an undo file and then given back;
`e2undo` was one of the four tools spawned for every state, about a fifth of the harness's cost.
The file was written a moment ago, on this host, by the e2fsck that replayed the state, so what is
checked is what a torn or foreign file would get wrong: the magic, the FINISHED state that e2fsck
sets only when it closes the file (a killed replay leaves it unset), the features, the sizes, and
every saved block inside both files. e2undo's crc32c checks guard against a file damaged in
storage, which this one never is; its superblock comparison guards against undo files applied out
of order, which one file per replay, applied at once, rules out.

Layout (e2fsprogs lib/ext2fs/undo_io.c, misc/e2undo.c): a 512-byte header; the blocks of the file
are `block_size` bytes; at block `key_offset` a key block (16 bytes of magic, crc, reserved, then
16-byte keys: the filesystem block, a crc, the byte count), followed by the saved data of its keys
in key order, each rounded up to whole blocks, then the next key block, until `num_keys` keys.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"E2UNDO02"
KEYBLOCK_MAGIC = 0xCADECADE
STATE_FINISHED = 0x1
COMPAT_FS_OFFSET = 0x1
# magic, num_keys, super_offset, key_offset, block_size, fs_block_size, sb_crc, state, f_compat,
# f_incompat, f_rocompat, pad, fs_offset
HEADER = struct.Struct("<8sQQQIIIIIIIIQ")
KEY_BLOCK_HEAD = struct.Struct("<IIQ")
KEY = struct.Struct("<QII")
MAX_BLOCK_SIZE = 1 << 20  # e2undo's own bounds on the undo block size
MIN_BLOCK_SIZE = 1024


class UndoError(ValueError):
    """An undo file that cannot be applied as it is; the message says why in one line."""


@dataclass(frozen=True, slots=True)
class Saved:
    """One extent the replay overwrote: where it goes in the image, and its old bytes."""

    offset: int
    data: bytes


def read(path: Path) -> list[Saved]:
    """The saved extents of a finished undo file, in the order e2fsck saved them."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UndoError(f"{path}: {e.strerror}") from None
    if len(raw) < HEADER.size or raw[:8] != MAGIC:
        raise UndoError(f"{path}: not an undo file")
    (_, num_keys, _, key_offset, block_size, fs_block_size, _, state, compat, incompat, rocompat, _,
     fs_offset) = HEADER.unpack_from(raw)
    if not state & STATE_FINISHED:
        raise UndoError(f"{path}: unfinished (the replay that wrote it did not end)")
    if incompat or rocompat:
        raise UndoError(f"{path}: unknown undo features {incompat:#x}/{rocompat:#x}")
    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE or not fs_block_size:
        raise UndoError(f"{path}: block size {block_size} (filesystem {fs_block_size}) out of range")
    base = fs_offset if compat & COMPAT_FS_OFFSET else 0
    per_block = block_size // KEY.size - 1
    saved: list[Saved] = []
    blk = key_offset
    while len(saved) < num_keys:
        at = blk * block_size
        if at + block_size > len(raw):
            raise UndoError(f"{path}: {num_keys} keys, the file ends after {len(saved)}")
        magic, _, _ = KEY_BLOCK_HEAD.unpack_from(raw, at)
        if magic != KEYBLOCK_MAGIC:
            raise UndoError(f"{path}: no key block at block {blk}")
        blk += 1
        for n in range(min(per_block, num_keys - len(saved))):
            fsblk, _, size = KEY.unpack_from(raw, at + KEY_BLOCK_HEAD.size + n * KEY.size)
            start = blk * block_size
            if start + size > len(raw):
                raise UndoError(f"{path}: block {fsblk}'s {size} bytes run past the file's end")
            saved.append(Saved(base + fsblk * fs_block_size, raw[start:start + size]))
            blk += -(-size // block_size)
    return saved


def apply(undo: Path, image: Path) -> int:
    """Write the undo file's saved extents back into `image`; the bytes written. Nothing is
    written unless every extent lies within the image."""
    saved = read(undo)
    fd = os.open(image, os.O_WRONLY)
    try:
        size = os.fstat(fd).st_size
        for s in saved:
            if s.offset + len(s.data) > size:
                raise UndoError(f"{undo}: an extent at byte {s.offset} lies past {image}'s end ({size})")
        # e2fsck saves a block once, before its first write, so extents do not overlap; backwards,
        # the first saved (the oldest bytes) would win if they ever did.
        for s in reversed(saved):
            os.pwrite(fd, s.data, s.offset)
    finally:
        os.close(fd)
    return sum(len(s.data) for s in saved)
