"""Crash states: generating them from a seed, naming them, and building their disk images fast.

A crash state is (log, model config, crash point, which volatile writes persisted, which atomic units
of them tore). Its id names all of that in a short printable string:

    1d54ed6b9d-dm-writeback-w30-e1234-r9f3a1c2b7e4d5a6b
    ^log digest ^rec ^cache  ^window ^end  ^selection

with optional fields `-b<base32 name>` (baseline other than `workload-start`; a bare `-b` = none) and
`-t512`/`-t4096` (torn writes) before `-e`. The selection is `a` (every volatile op persisted: the
plain log prefix), `n` (none: only what is durable), `x<hex>` (explicit bitmask over the crash
point's volatile ops, bit k = k-th in log order), `r<16 hex>` (a 64-bit seed that draws the subset
and the tears with a fixed algorithm, so long subsets need not be spelled out) or `o<k>.<s>.<c>`
(hex; writeback order: the host flusher swept the pages the first k volatile ops dirtied in offset
order, starting at the s-th of them, and wrote c before the crash). The id names the log by a
SHA-256 prefix of its bytes and is refused against any other log.

Building never re-replays from entry 0 per state: a base image on tmpfs is advanced through the
log to each state's `stable` point (sort states by it and the base only moves forward), and each
state applies its few ops in [stable, end) to a sparse copy of the base (`build`) or in place under
an undo journal (`checkout`, no copy at all).
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import errno
import hashlib
import math
import os
import random
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from crashlab import logformat, model, recorders, rundir
from crashlab.cachemodes import CACHE_MODES
from crashlab.logformat import LogReader
from crashlab.model import Config, CrashPoint, LogModel

DIGEST_CHARS = 10
# replay-log's --check points: the log prefix after every FUA, flush, mark, or entry.
PREFIX_POINTS: dict[str, Callable[[logformat.Entry], bool]] = {
    "prefix-fua": lambda e: e.is_fua,
    "prefix-flush": lambda e: e.is_flush,
    "prefix-mark": lambda e: e.is_mark or e.marker is not None,
    "prefix-all": lambda e: True,
}
STRATEGIES = ("random", "epochs", "exhaustive", "prefix", "marks", "writeback-order", *PREFIX_POINTS)
PAGE = 4096  # the host page cache's unit of writeback (DESIGN.md, "What the host writes back")
EXHAUSTIVE_MAX_VOLATILE = 10  # 2**10 subsets per crash point at most
_TORN_SALT = 0x746F726E  # keeps the tear draws independent of the subset draw
TEAR_PROBABILITY = 0.25
ZERO_RUN = 1 << 20  # the stretch of a base write tested for zeroes, punched as a hole if so
ZERO_TESTED = 32 << 10  # writes smaller than this go to the base as they are
CHECKOUT_MAX_BYTES = 256 << 20  # overwritten bytes a checkout may hold in memory


class CrashStateError(logformat.InputError, ValueError):
    """A bad or foreign crash-state id, or a state the log cannot have."""


# --- ids -----------------------------------------------------------------------------------------

def log_digest(reader: LogReader) -> str:
    """SHA-256 (hex) of the log's bytes up to the end of its last entry: the same for a log and its
    .xz, and blind to trailing junk past the entries (a preallocated log file)."""
    entries = reader.index()
    stop = entries[-1].end_offset if entries else reader.sector_size
    h = hashlib.sha256()
    with reader.path.open("rb") as f:
        left = stop
        while left > 0:
            chunk = f.read(min(left, 1 << 22))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def _fmt_window(w: float) -> str:
    if w == math.inf:
        return "inf"
    return f"{w:g}" if "e" not in f"{w:g}" else repr(w)


@dataclass(frozen=True, slots=True)
class CrashState:
    digest: str  # DIGEST_CHARS hex of the log's SHA-256
    cfg: Config
    end: int
    sel: str  # "a" | "n" | "x<hex>" | "r<hex>"

    @property
    def id(self) -> str:
        parts = [self.digest, self.cfg.recorder.token, self.cfg.cache.name,
                 f"w{_fmt_window(self.cfg.window_s)}"]
        if self.cfg.baseline != model.DEFAULT_BASELINE:
            name = self.cfg.baseline
            parts.append("b" + (base64.b32encode(name.encode()).decode().rstrip("=").lower() if name else ""))
        if self.cfg.torn:
            parts.append(f"t{self.cfg.torn}")
        parts += [f"e{self.end}", self.sel]
        return "-".join(parts)

    def __str__(self) -> str:
        return self.id


_SEL = re.compile(r"a|n|x[0-9a-f]+|r[0-9a-f]{1,16}|o[0-9a-f]{1,12}\.[0-9a-f]{1,12}\.[0-9a-f]{1,12}")
# ASCII digits only (str.isdigit takes "²", int() then fails) and few enough for int() to take.
_NUMBER = re.compile(r"[0-9]{1,18}")


def parse_id(text: str) -> CrashState:
    """The state an id names; malformed ids raise `CrashStateError` saying what is wrong."""
    parts = text.strip().split("-")
    bad = f"crash-state id {text!r}"
    if len(parts) < 6 or not re.fullmatch(f"[0-9a-f]{{{DIGEST_CHARS}}}", parts[0]):
        raise CrashStateError(f"{bad}: expected DIGEST-RECORDER-CACHE-wWINDOW[-bBASE][-tUNIT]-eEND-SEL")
    digest, rec, cache, *mid, end_s, sel = parts
    if cache not in CACHE_MODES:
        raise CrashStateError(f"{bad}: unknown cache mode {cache!r}")
    baseline: str | None = model.DEFAULT_BASELINE
    torn = None
    window: str | None = None
    for f in mid:
        if f.startswith("w") and window is None:
            window = f[1:]
        elif f.startswith("b"):
            try:
                b32 = f[1:].upper()
                baseline = base64.b32decode(b32 + "=" * (-len(b32) % 8)).decode() if b32 else None
            except (ValueError, UnicodeDecodeError):
                raise CrashStateError(f"{bad}: bad baseline field {f!r}") from None
        elif f.startswith("t") and _NUMBER.fullmatch(f[1:]):
            torn = int(f[1:])
        else:
            raise CrashStateError(f"{bad}: unknown field {f!r}")
    if window is None or not end_s.startswith("e") or not _NUMBER.fullmatch(end_s[1:]) \
            or not _SEL.fullmatch(sel):
        raise CrashStateError(f"{bad}: expected DIGEST-RECORDER-CACHE-wWINDOW[-bBASE][-tUNIT]-eEND-SEL")
    try:
        cfg = model.config(recorders.BY_TOKEN.get(rec, rec), cache, window, baseline, torn)
    except ValueError as e:
        raise CrashStateError(f"{bad}: {e}") from None
    return CrashState(digest, cfg, int(end_s[1:]), sel)


def present_markers(entries: Sequence[logformat.Entry], end: int) -> set[int]:
    """Sequence numbers of the in-band markers a crash state after entry `end` lies after."""
    return {e.marker.seq for e in entries[:end] if e.marker is not None}


# --- resolving a state against the model ----------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Resolved:
    """What a state applies on top of the base image at `cp.stable`, in log order."""

    cp: CrashPoint
    chosen: tuple[int, ...]  # volatile ops that persisted
    tears: dict[int, int] = field(default_factory=dict)  # op -> bitmask of its atomic units kept
    # op -> the byte ranges of it that persisted, when whole pages of it did (writeback order)
    clip: dict[int, tuple[tuple[int, int], ...]] = field(default_factory=dict)

    def ops(self) -> list[tuple[int, int | None]]:
        """(entry index, unit mask or None for whole) for every op in [stable, end) to apply."""
        return [(i, self.tears.get(i)) for i in self.cp.applied(self.chosen)]


def resolve(m: LogModel, state: CrashState) -> Resolved:
    if state.end < m.lo or state.end > m.n:
        raise CrashStateError(f"crash state {state.id}: crash point {state.end} is outside the crash "
                              f"window {m.lo}..{m.n} of this log")
    cp = m.crash(state.end)
    vol = cp.volatile
    sel = state.sel
    tears: dict[int, int] = {}
    if sel == "a":
        chosen = vol
    elif sel == "n":
        chosen = ()
    elif sel[0] == "x":
        bits = int(sel[1:], 16)
        if bits >> len(vol):
            raise CrashStateError(f"crash state {state.id}: selects op {bits.bit_length() - 1} of only "
                                  f"{len(vol)} volatile ops")
        chosen = tuple(v for k, v in enumerate(vol) if bits >> k & 1)
    elif sel[0] == "o":
        k, start, count = (int(f, 16) for f in sel[1:].split("."))
        pages = dirty_pages(m, vol[:k]) if k <= len(vol) else []
        if k > len(vol) or (start >= len(pages) and start) or count > len(pages):
            raise CrashStateError(f"crash state {state.id}: a sweep of {count} pages from page {start} "
                                  f"of the first {k} volatile ops, but this crash point has {len(vol)} "
                                  f"volatile ops dirtying {len(pages)} pages")
        chosen, clip = _sweep(m, vol[:k], pages, start, count)
        return Resolved(cp, chosen, {}, clip)
    else:
        chosen, tears = _draw(m, vol, int(sel[1:], 16))
    return Resolved(cp, chosen, tears)


def dirty_pages(m: LogModel, ops: Sequence[int]) -> list[int]:
    """The host pages (PAGE-sized, by index in the image) that `ops` dirty, in offset order."""
    pages: set[int] = set()
    for i in ops:
        e = m.entries[i]
        pages.update(range(e.offset // PAGE, (e.offset + e.length - 1) // PAGE + 1))
    return sorted(pages)


def _sweep(m: LogModel, ops: Sequence[int], pages: Sequence[int], start: int, count: int
           ) -> tuple[tuple[int, ...], dict[int, tuple[tuple[int, int], ...]]]:
    """What one flusher sweep persisted: `count` pages of `pages` in offset order from the
    `start`-th, wrapping (range_cyclic writeback resumes where the last sweep stopped), each with
    its content as of the last of `ops`; the ops that reach those pages, and their pieces there."""
    written = set((list(pages[start:]) + list(pages[:start]))[:count])
    chosen: list[int] = []
    clip: dict[int, tuple[tuple[int, int], ...]] = {}
    for i in ops:
        e = m.entries[i]
        first, last = e.offset // PAGE, (e.offset + e.length - 1) // PAGE
        hit = [p for p in range(first, last + 1) if p in written]
        if not hit:
            continue
        chosen.append(i)
        if len(hit) < last - first + 1:
            pieces = [(max(e.offset, p * PAGE), min(e.offset + e.length, (p + 1) * PAGE)) for p in hit]
            merged: list[tuple[int, int]] = []
            for a, b in pieces:  # adjacent pages as one range
                if merged and merged[-1][1] == a:
                    merged[-1] = (merged[-1][0], b)
                else:
                    merged.append((a, b))
            clip[i] = tuple((a, b - a) for a, b in merged)
    return tuple(chosen), clip


def _draw(m: LogModel, vol: Sequence[int], seed: int) -> tuple[tuple[int, ...], dict[int, int]]:
    """The subset and tears a `r<seed>` selection stands for. Changing this changes what existing
    ids mean: keep it fixed (random.Random with an int seed is stable across Python versions)."""
    bits = random.Random(seed).getrandbits(len(vol)) if vol else 0
    chosen = tuple(v for k, v in enumerate(vol) if bits >> k & 1)
    tears: dict[int, int] = {}
    if m.cfg.torn:
        rng = random.Random(seed ^ _TORN_SALT)
        for i in chosen:
            k = len(m.units(i))
            if k > 1 and rng.random() < TEAR_PROBABILITY:
                tears[i] = rng.randrange(1, (1 << k) - 1)  # a non-empty proper subset of units
    return chosen, tears


def image_key(m: LogModel, r: Resolved) -> tuple[object, ...]:
    """A key equal for states whose images are certainly identical: the same set of ops applied,
    with ops wholly overwritten by a later applied op of the same range dropped (a rewritten journal
    or metadata block). Different keys may still give equal bytes by coincidence of contents."""
    ops = r.ops()
    seen: set[tuple[int, int]] = set()
    visible: list[tuple[int, object]] = []
    for i, mask in reversed(ops):
        e = m.entries[i]
        rng = (e.offset, e.length)
        if rng in seen:
            continue
        part = r.clip.get(i)
        if mask is None and part is None:
            seen.add(rng)
        visible.append((i, mask if part is None else part))
    # The applied set is every op before `stable`, then `visible`; move the split point past the
    # leading whole ops so states with different `stable` but the same applied set compare equal.
    visible.reverse()
    k, j = bisect.bisect_left(m.ops, r.cp.stable), 0
    while j < len(visible) and k < len(m.ops) and visible[j] == (m.ops[k], None):
        j, k = j + 1, k + 1
    return (k, tuple(visible[j:]))


# --- generation ----------------------------------------------------------------------------------

@dataclass(slots=True)
class Campaign:
    states: list[CrashState]
    duplicates: int = 0  # states dropped because they build the same image as an earlier one
    skipped_epochs: int = 0  # exhaustive: epochs with more volatile ops than the bound
    candidates: list[int] = field(default_factory=list)  # volatile ops per state

    def summary(self, m: LogModel) -> dict[str, object]:
        c = sorted(self.candidates)
        return {
            "states": len(self.states),
            "duplicates_dropped": self.duplicates,
            "skipped_epochs": self.skipped_epochs,
            "entries": m.n,
            "ops": len(m.ops),
            "crash_window": f"{m.lo}..{m.n}",
            "baseline": (f"{m.cfg.baseline!r} at entry {m.baseline_index}" if m.baseline_index is not None
                         else f"{m.cfg.baseline!r} not found: nothing settled" if m.cfg.baseline
                         else "none"),
            "window_s": m.cfg.window_s,
            "window_clock": "tick markers" if m.has_clock else "no markers: window not applied",
            "volatile_per_state": (f"min {c[0]} median {c[len(c) // 2]} max {c[-1]}" if c else "-"),
        }


def generate(m: LogModel, digest: str, count: int, seed: int, strategy: str = "random",
             max_volatile: int = EXHAUSTIVE_MAX_VOLATILE) -> Campaign:
    """Up to `count` distinct crash states, deterministic from `seed`, sorted by their `stable`
    point so a `Materializer` only ever advances its base.

    random: crash points uniform over entries; epochs: uniform over flush epochs, then over the
    epoch's entries; both persist each volatile op with probability 1/2 (and tear, if configured).
    exhaustive: every subset at each crash point of epochs with at most `max_volatile` volatile ops.
    prefix: the log prefix at distinct random points (replay-log / dm-flakey). marks: at every native
    mark and non-tick in-band marker, the worst case (nothing volatile) and the prefix.
    prefix-fua, prefix-flush, prefix-mark, prefix-all: the log prefix just after each FUA write,
    flush, mark (native or in-band) or entry, in log order (xfstests' `replay-log --check`), the
    first `count` of them; the seed plays no part.
    writeback-order: crash points uniform over entries, then what the host flusher persists instead
    of an independent subset (DESIGN.md, "What the host writes back"): a snapshot after the first k
    volatile ops, and one offset-order sweep over the pages they dirtied, from a drawn page, cut
    after a drawn number of pages.
    """
    if strategy not in STRATEGIES:
        raise CrashStateError(f"unknown strategy {strategy!r}; valid strategies: {', '.join(STRATEGIES)}")
    if count < 0:
        raise CrashStateError(f"count {count} must be >= 0")
    digest = digest[:DIGEST_CHARS]
    rng = random.Random(seed)
    camp = Campaign([])
    keys: set[tuple[object, ...]] = set()

    def offer(end: int, sel: str) -> None:
        st = CrashState(digest, m.cfg, end, sel)
        r = resolve(m, st)
        key = image_key(m, r)
        if key in keys:
            camp.duplicates += 1
            return
        keys.add(key)
        camp.states.append(st)
        camp.candidates.append(len(r.cp.volatile))

    points = range(m.lo, m.n + 1)
    if strategy in ("random", "epochs"):
        epochs = m.epochs()
        # Bounded retries: a log with few distinct images cannot yield `count` of them.
        for _ in range(count * 4 + 16):
            if len(camp.states) >= count:
                break
            end = rng.choice(rng.choice(epochs)) if strategy == "epochs" else rng.choice(points)
            offer(end, f"r{rng.getrandbits(64):016x}")
    elif strategy == "prefix":
        for end in sorted(rng.sample(points, min(count * 2, len(points)))):
            if len(camp.states) >= count:
                break
            offer(end, "a")
    elif strategy == "writeback-order":
        for _ in range(count * 4 + 16):
            if len(camp.states) >= count:
                break
            end = rng.choice(points)
            vol = m.crash(end).volatile
            k = rng.randint(0, len(vol))
            npages = len(dirty_pages(m, vol[:k]))
            # Half the sweeps start at the lowest page: a sync or an expiry pass over a clean index.
            start = rng.randrange(npages) if npages and rng.random() < 0.5 else 0
            offer(end, f"o{k:x}.{start:x}.{rng.randint(0, npages):x}")
    elif strategy in PREFIX_POINTS:
        wanted = PREFIX_POINTS[strategy]
        for e in m.entries[m.lo:]:
            if len(camp.states) >= count:
                break
            if wanted(e):
                offer(e.index + 1, "a")
    elif strategy == "marks":
        for e in m.entries[m.lo:]:
            if len(camp.states) >= count:
                break
            if e.is_mark or (e.marker is not None and not e.marker.is_tick):
                offer(e.index + 1, "n")
                if len(camp.states) < count:
                    offer(e.index + 1, "a")
    else:
        epochs = m.epochs()
        rng.shuffle(epochs)
        for ep in epochs:
            if len(camp.states) >= count:
                break
            if len(m.crash(ep[-1]).volatile) > max_volatile:
                camp.skipped_epochs += 1
                continue
            for end in ep:
                nvol = len(m.crash(end).volatile)
                for bits in range(1 << nvol):
                    if len(camp.states) >= count:
                        break
                    offer(end, f"x{bits:x}")
    camp.states.sort(key=lambda s: (m.crash(s.end).stable, s.end, s.sel))
    return camp


# --- materialisation -----------------------------------------------------------------------------

def default_workdir() -> str | None:
    """tmpfs when there is one (images are rebuilt often and thrown away), in this process's run
    directory there, so that a killed run's images are reclaimed by the next."""
    shm = rundir.tmpfs()
    return str(shm) if shm else None


def image_size(entries: Sequence[logformat.Entry]) -> int:
    """The smallest device the log fits: the end of the furthest write, discard or marker (markers
    sit in the device's tail, and mkfs discards the whole device, so real logs name its size)."""
    return max((e.offset + e.length for e in entries if e.nr_sectors and not e.is_mark), default=0)


def sparse_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Copy an image keeping its holes: only data extents are copied (SEEK_DATA/SEEK_HOLE), in the
    kernel (copy_file_range, a reflink where the filesystem has them)."""
    fi = os.open(src, os.O_RDONLY)
    try:
        fo = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            size = os.fstat(fi).st_size
            os.ftruncate(fo, size)
            pos = 0
            while pos < size:
                try:
                    data = os.lseek(fi, pos, os.SEEK_DATA)
                except OSError as e:
                    if e.errno == errno.ENXIO:
                        break
                    raise
                hole = os.lseek(fi, data, os.SEEK_HOLE)
                _copy_range(fi, fo, data, hole - data)
                pos = hole
        finally:
            os.close(fo)
    finally:
        os.close(fi)


def _copy_range(fi: int, fo: int, off: int, length: int) -> None:
    end = off + length
    while off < end:
        try:
            n = os.copy_file_range(fi, fo, end - off, off, off)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            n = os.pwrite(fo, os.pread(fi, min(end - off, 1 << 20), off), off)
        if n == 0:
            raise OSError(f"copy_file_range made no progress at offset {off}")
        off += n


def _all_zero(piece: memoryview) -> bool:
    return bytes(piece).count(0) == len(piece)


class Materializer:
    """Builds crash-state images from one log, keeping a base image at the last durable point.

    Feed states sorted by `stable` (as `generate` returns them): the base then only moves forward
    and the whole campaign replays each log entry once. Going back rebuilds the base from entry 0.
    """

    def __init__(self, reader: LogReader, m: LogModel, digest: str, workdir: str | None = None,
                 size: int | None = None) -> None:
        self.reader, self.model, self.digest = reader, m, digest
        self.size = image_size(reader.index()) if size is None else size
        where = workdir or default_workdir() or tempfile.gettempdir()
        with _writing(f"a {self.size}-byte base image in {where}"):
            self._dir = tempfile.TemporaryDirectory(prefix="crashlab-base-", dir=where)
            self.base = Path(self._dir.name) / "base.img"
            self._fd = -1
            try:
                self._fd = os.open(self.base, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                os.ftruncate(self._fd, self.size)
            except OSError:
                self.close()
                raise
        self._at = 0  # ops [0, _at) are applied to the base
        self.rebuilds = 0
        self._resolved: tuple[CrashState, Resolved] | None = None  # the last state's, asked again

    def resolve(self, state: CrashState) -> Resolved:
        if state.digest != self.digest[:DIGEST_CHARS]:
            raise CrashStateError(f"crash state {state.id} is from log {state.digest}, "
                                  f"not this log ({self.digest[:DIGEST_CHARS]})")
        if state.cfg != self.model.cfg:
            raise CrashStateError(f"crash state {state.id} uses another model config than this builder")
        # A checker asks what a state writes, whether it fits a checkout, then checks it out: once.
        if self._resolved is None or self._resolved[0] != state:
            self._resolved = (state, resolve(self.model, state))
        return self._resolved[1]

    def _advance(self, stable: int) -> None:
        with _writing(f"the base image {self.base}"):
            self._advance_base(stable)

    def _advance_base(self, stable: int) -> None:
        if stable < self._at:
            os.ftruncate(self._fd, 0)
            os.ftruncate(self._fd, self.size)
            self._at = 0
            self.rebuilds += 1
        entries = self.reader.index()
        for e in entries[self._at:stable]:
            if e.is_write:
                self._write_sparse(e)
            else:
                logformat.apply(self.reader, e, self._fd)
        self._at = stable

    def _write_sparse(self, e: logformat.Entry) -> None:
        """Write an entry into the base, its all-zero stretches as holes: mkfs.xfs zeroes its whole
        log, and a base that stores those zeroes costs every state's sparse copy a full read and
        write of them (179 ms a state against 1.7 ms, measured). A hole reads as the same zeroes."""
        data = memoryview(self.reader.data(e))
        if len(data) < ZERO_TESTED:  # a small write is cheaper written than tested
            os.pwrite(self._fd, data, e.offset)
            return
        for start in range(0, len(data), ZERO_RUN):
            piece = data[start:start + ZERO_RUN]
            if _all_zero(piece):
                logformat.punch_hole(self._fd, e.offset + start, len(piece))
            else:
                os.pwrite(self._fd, piece, e.offset + start)

    def _apply(self, fd: int, r: Resolved, undo: list[tuple[int, bytes]] | None) -> None:
        entries = self.reader.index()
        for i, mask in r.ops():
            e = entries[i]
            if i in r.clip:
                pieces = list(r.clip[i])
            elif mask is None:
                pieces = [(e.offset, e.length)]
            else:
                units = self.model.units(i)
                pieces = [u for k, u in enumerate(units) if mask >> k & 1]
            for off, length in pieces:
                if undo is not None:
                    undo.append((off, os.pread(fd, length, off)))
                if e.is_discard:
                    logformat.punch_hole(fd, off, length)
                else:
                    data = self.reader.data(e)
                    os.pwrite(fd, data[off - e.offset:off - e.offset + length], off)

    def build(self, state: CrashState, dest: str | os.PathLike[str]) -> Resolved:
        """Write the state's image to `dest` (a sparse copy of the base plus the state's ops).

        Built beside `dest` and renamed onto it, so a failed build leaves no half image there."""
        r = self.resolve(state)
        self._advance(r.cp.stable)
        dest = Path(dest)
        with _writing(dest):
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
            try:
                os.fchmod(fd, 0o644)
                sparse_copy(self.base, tmp)
                self._apply(fd, r, None)
                os.replace(tmp, dest)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            finally:
                os.close(fd)
        return r

    def written(self, state: CrashState) -> int:
        """The bytes the state's ops write over the base, at most what a checkout keeps in memory."""
        entries = self.reader.index()
        return sum(entries[i].length for i, _ in self.resolve(state).ops())

    def checkout_fits(self, state: CrashState) -> bool:
        """Whether a checkout of the state keeps at most CHECKOUT_MAX_BYTES of overwritten bytes
        in memory (a window with gigabytes of unflushed writes is built as a copy instead)."""
        return self.written(state) <= CHECKOUT_MAX_BYTES

    @contextlib.contextmanager
    def checkout(self, state: CrashState) -> Iterator[Path]:
        """The state's image in place, no copy: valid inside the `with` only, and read-only (use it
        as a qcow2 backing file, hash it, or copy it). Undone from a journal of overwritten bytes,
        held in memory: ask checkout_fits first."""
        r = self.resolve(state)
        self._advance(r.cp.stable)
        undo: list[tuple[int, bytes]] = []
        try:
            with _writing(f"the base image {self.base}"):
                self._apply(self._fd, r, undo)
            yield self.base
        finally:
            for off, old in reversed(undo):
                if old.count(0) == len(old):
                    logformat.punch_hole(self._fd, off, len(old))  # keeps the base sparse
                else:
                    os.pwrite(self._fd, old, off)

    def copy_bytes(self) -> int:
        """What a copy of the base costs: its allocated bytes (a sparse copy skips the holes)."""
        return os.fstat(self._fd).st_blocks * 512

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._dir.cleanup()

    def __enter__(self) -> Materializer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def _writing(what: object) -> Iterator[None]:
    """OSError while writing an image as ImageError naming it: a full disk, a missing directory or
    a file too large for its filesystem is the user's to fix, not a traceback."""
    try:
        yield
    except OSError as e:
        raise logformat.ImageError(f"{what}: cannot write: {e.strerror or e}") from None


def build_one(log: str | os.PathLike[str], state_id: str, dest: str | os.PathLike[str],
              size: int | None = None, salvage: bool = False) -> tuple[Resolved, logformat.Damage | None]:
    """Rebuild one state's image from its id (`crashlab crash build`), and the damage salvaged
    past, if any. A damaged log is refused (LogDamagedError) unless `salvage`: its complete entries
    are then the log. Nothing is written to `dest` before the id, the log and the state check out."""
    state = parse_id(state_id)
    with logformat.open_log(log) as reader:
        if not salvage:
            reader.require_intact()
        digest = log_digest(reader)
        try:
            m = LogModel(reader.index(), state.cfg)
        except model.ModelError as e:
            raise CrashStateError(f"crash state {state.id}: {e}") from None
        with Materializer(reader, m, digest, size=size) as mat:
            r = mat.build(state, dest)
        return r, reader.damage
