"""The durability model: which logged writes a host power loss after log entry p must keep, and which
it may keep or lose (DESIGN.md, "The durability model, for a crash after log entry p").

Pure: a list of log `Entry` headers and a `Config` in, a `CrashPoint` (durable and volatile entry
indices) out. No file is touched here; images are built in `crashlab.crashstates`.

Conventions. A crash point is written `end`: the first `end` entries of the log happened, so "a crash
after entry p" is `end = p + 1`. An *op* is an entry that changes the image (a data write or a
discard); flushes, native marks and in-band markers change nothing and are never ops.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

from crashlab import markers, recorders
from crashlab.cachemodes import CacheMode, cache_mode
from crashlab.logformat import Entry, InputError
from crashlab.recorders import LOGGING, Recorder, UnknownRecorder

# The recorders whose logs are taken above the host's page cache, read with the cache mode's rules;
# host-dm's log is taken below it and has rules of its own (Config.host_side). READABLE: every log
# the model reads.
RECORDERS = tuple(r.value for r in LOGGING if r is not Recorder.HOST_DM)
READABLE = tuple(r.value for r in LOGGING)
DEFAULT_BASELINE = markers.WORKLOAD_START
TORN_UNITS = (512, 4096)


class ModelError(InputError, ValueError):
    """A model parameter the user got wrong; the message lists what is valid."""


@dataclass(frozen=True, slots=True)
class Config:
    recorder: Recorder  # qemu or dm: whose view of the I/O the log is
    cache: CacheMode
    window_s: float  # volatility window in seconds; math.inf = only flushes guarantee anything
    baseline: str | None  # name of the native mark or in-band marker that opens the crash window
    torn: int | None = None  # atomic unit in bytes when multi-unit writes may tear, else None

    @property
    def host_side(self) -> bool:
        """The log was taken below the host's page cache (host-dm): the cache mode is already applied
        and every FLUSH entry is one the host sent to its own disk (DESIGN.md, "host-dm")."""
        return self.recorder is Recorder.HOST_DM

    @property
    def flushes_count(self) -> bool:
        """Whether FLUSH entries (and FUA) create durability at all: not when the host drops flushes.
        A host-dm log's flushes are the host kernel's own (fdatasync, journal commits): they count
        under every cache mode, `unsafe` included."""
        return self.host_side or not self.cache.no_flush

    @property
    def prefix_only(self) -> bool:
        """Every write up to the crash point is durable: the guest saw no write cache, so each write
        completed only once it was on stable storage.

        Under `qemu` the log cannot show this by itself. Without a guest write cache QEMU emulates
        FUA on every write with bdrv_co_flush on the top node, and that skips the node's own flush
        (the one blklogwrites logs) when its write generation is already flushed, which is the case
        for the first write after a flush, whose generation is counted only when it finishes. The
        flush still reaches the file below ("flush_children" in block/io.c), so the write is durable
        but no FLUSH entry follows it: qemu-io -t writethrough logs "w f w w f w f" for
        write, flush, write, write, write. Reading such logs with the general rule made a cache=directsync
        ext4 image fs-inconsistent (checkpoint writes dropped behind a journal-superblock update the
        guest could only issue after they completed), which no host power loss can do.

        A host-dm log shows the host's own flush after each such write, so the general rule reads it."""
        return not self.cache.write_cache and not self.host_side


def parse_window(text: str | float | None, cache: CacheMode, recorder: Recorder | None = None) -> float:
    """Seconds from `--window` ('inf', a number of seconds), or the default: the cache mode's, and
    for host-dm none at all (its writes are already past the page cache whose expiry the window is,
    and the guest's tick clocks do not date the host's writeback)."""
    if text is None:
        return math.inf if recorder is Recorder.HOST_DM else cache.default_window_s
    if isinstance(text, int | float):
        value = float(text)
    else:
        try:
            value = float(text.strip().lower().removesuffix("s"))
        except ValueError:
            raise ModelError(f"volatility window {text!r}: expected seconds (30, 0.5) or 'inf'") from None
    if math.isnan(value) or value < 0:
        raise ModelError(f"volatility window {text!r}: must be >= 0 seconds or 'inf'")
    return value


def config(recorder: str | Recorder, cache: str | CacheMode, window: str | float | None = None,
           baseline: str | None = DEFAULT_BASELINE, torn: int | None = None) -> Config:
    """A validated `Config`; unknown names raise with the valid ones listed."""
    mode = cache if isinstance(cache, CacheMode) else cache_mode(cache)
    try:
        rec = recorders.recorder(recorder, LOGGING)
    except UnknownRecorder as e:
        raise ModelError(str(e)) from None
    if torn is not None and torn not in TORN_UNITS:
        raise ModelError(f"torn-write atomic unit {torn}: valid units: {', '.join(map(str, TORN_UNITS))}")
    return Config(rec, mode, parse_window(window, mode, rec), baseline or None, torn)


def recorded(run: object) -> tuple[str, str] | None:
    """(recorder, cache mode) a recording's run.json says its log was made with, or None when it
    names no log this model reads (a dm-flakey run has recorder `none`)."""
    cfg = run.get("config") if isinstance(run, dict) else None
    if not isinstance(cfg, dict) or cfg.get("recorder") not in READABLE:
        return None
    if not isinstance(cfg.get("cache"), str):
        raise ModelError("run.json names a recorder but no cache mode")
    return cfg["recorder"], cache_mode(cfg["cache"]).name


@dataclass(frozen=True, slots=True)
class Reading:
    """Which recorder and cache mode a log is read with, and on whose word."""

    recorder: str
    cache: str
    recorded: tuple[str, str] | None  # (recorder, cache) from the recording's run.json, if there is one

    @property
    def counterfactual(self) -> bool:
        """A qemu log read under a mode it was not recorded in: "had the host done this instead"."""
        return self.recorded is not None and self.recorder == "qemu" and self.cache != self.recorded[1]

    def describe(self) -> str:
        if self.recorded is None:
            return f"as given (no run.json): recorder {self.recorder}, cache {self.cache}"
        rec, cache = self.recorded
        if self.cache == cache:
            return f"as recorded (run.json): recorder {rec}, cache {cache}"
        if self.counterfactual:
            return f"counterfactual: cache {self.cache} on a qemu log recorded under cache {cache} (run.json)"
        # A dm log is the guest-side view whatever the host did: applying a mode is what it is for.
        return f"cache {self.cache} applied to a dm log recorded under cache {cache} (run.json)"


def reading(recorded: tuple[str, str] | None, recorder: str | None = None, cache: str | None = None,
            what_if: str | None = None) -> Reading:
    """The reading of a log from what its run.json recorded and what the user named: `cache` is a
    claim about the recording, `what_if` a counterfactual asked for by name.

    A qemu log already carries the mode it was recorded under (DESIGN.md), so a `cache` that
    contradicts run.json is refused; only `what_if` reads it otherwise. A recorder is a fact of the
    recording and never has a counterfactual."""
    rec = recorder.strip().lower() if recorder else None
    if rec is not None and rec not in READABLE:
        raise ModelError(f"unknown recorder {recorder!r}; valid recorders: {', '.join(READABLE)}")
    named = cache_mode(cache).name if cache else None
    asked = cache_mode(what_if).name if what_if else None
    if recorded is None:
        if named and asked and named != asked:
            raise ModelError(f"--cache {named} and --what-if-cache {asked} disagree; without a run.json "
                             "either names the mode to read the log with")
        mode = asked or named
        if rec is None or mode is None:
            raise ModelError("no run.json beside the log says how it was recorded: "
                             "give --recorder and --cache")
        return Reading(rec, mode, None)
    rrec, rcache = recorded
    if rec is not None and rec != rrec:
        raise ModelError(f"the log was recorded by {rrec} (run.json), not {rec}")
    if rrec == Recorder.HOST_DM and ((named and named != rcache) or (asked and asked != rcache)):
        # Below the host's page cache there is nothing left for a cache mode to change.
        raise ModelError(f"this host-dm log was recorded under cache {rcache} (run.json): it is what the "
                         f"host wrote back under that mode, and no other mode can be read into it "
                         f"(record the workload again with --cache {asked or named})")
    if named and named != rcache:
        if asked is None and rrec == "qemu":
            raise ModelError(f"this qemu log was recorded under cache {rcache} (run.json) and carries that "
                             f"mode already; --cache {named} contradicts it (to ask what would have "
                             f"happened, say so: --what-if-cache {named})")
        if asked is not None and asked != named:
            raise ModelError(f"--cache {named} and --what-if-cache {asked} disagree")
    return Reading(rrec, asked or named or rcache, recorded)


@dataclass(frozen=True, slots=True)
class CrashPoint:
    end: int  # entries [0, end) happened
    stable: int  # every op with index < stable is durable: where a shared base image can stand
    durable_late: tuple[int, ...]  # durable ops at or after `stable` (FUA writes after a volatile one)
    volatile: tuple[int, ...]  # ops that may or may not have persisted, independently, in log order
    flush: int | None  # index of the FLUSH entry that made the writes before it durable
    time_ns: int | None  # guest clock at the crash (last in-band marker before it), if any

    def applied(self, chosen: Sequence[int]) -> list[int]:
        """Ops in [stable, end) a state with `chosen` volatile ops persisted applies, in log order."""
        return sorted({*self.durable_late, *chosen})


class LogModel:
    """The durability model over one log's index. Built once per (log, config); `crash(end)` is cheap."""

    def __init__(self, entries: Sequence[Entry], cfg: Config) -> None:
        self.entries = entries
        self.cfg = cfg
        self.n = len(entries)
        # One log, one sector size: the logged device's logical block, which it writes atomically.
        self.sector_size = entries[0].sector_size if entries else None
        if cfg.torn and self.sector_size and cfg.torn % self.sector_size:
            raise ModelError(f"torn-write unit {cfg.torn} B is not a whole number of this log's "
                             f"{self.sector_size}-byte sectors: a device cannot tear inside its own "
                             f"logical block; valid units here: {', '.join(map(str, self.torn_units()))}")
        self.ops = [e.index for e in entries if e.is_write or e.is_discard]
        self.flushes = [e.index for e in entries if e.is_flush]
        self.baseline_index = self._find_baseline()
        # The crash window opens just after the baseline marker: everything before it is settled.
        self.lo = 0 if self.baseline_index is None else self.baseline_index + 1
        self._times()

    def _find_baseline(self) -> int | None:
        name = self.cfg.baseline
        if name is None:
            return None
        for e in self.entries:
            if e.mark == name or (e.marker is not None and e.marker.name == name):
                return e.index
        return None

    def _times(self) -> None:
        """Bounds on when each entry happened, from the in-band markers' guest clocks.

        An op completed no later than any marker logged after it (the log is in completion order),
        so `_op_hi[k]` = min clock of markers after op k bounds its time from above; the crash happened
        no earlier than the last marker before it. Their difference is a lower bound on the op's age,
        so "older than the window" is claimed only when certain (up to one marker write's latency).
        """
        # A host-dm log holds a marker when the host wrote its page back, long after the guest
        # stamped it: its clock bounds nothing about the writes around it there.
        clocks = [] if self.cfg.host_side else [
            (e.index, e.marker.clock_ns) for e in self.entries if e.marker is not None]
        self.has_clock = bool(clocks)
        self._mark_pos = [i for i, _ in clocks]
        self._mark_max: list[int] = []
        top = -1
        for _, c in clocks:
            top = max(top, c)
            self._mark_max.append(top)
        hi = [math.inf] * len(self.ops)
        low = math.inf
        ci = len(clocks) - 1
        for k in range(len(self.ops) - 1, -1, -1):
            while ci >= 0 and clocks[ci][0] > self.ops[k]:
                low = min(low, clocks[ci][1])
                ci -= 1
            hi[k] = low
        self._op_hi = hi  # non-decreasing in k

    def time_at(self, end: int) -> int | None:
        """The guest clock no later than the crash after the first `end` entries, or None."""
        k = bisect.bisect_left(self._mark_pos, end)
        return self._mark_max[k - 1] if k else None

    def crash(self, end: int) -> CrashPoint:
        if not 0 <= end <= self.n:
            raise ModelError(f"crash point {end} outside the log's 0..{self.n} entries")
        cfg = self.cfg
        n_ops = bisect.bisect_left(self.ops, end)  # ops[:n_ops] happened
        t = self.time_at(end)
        # Everything before `cut` is durable; each rule moves the cut, the furthest wins.
        cut = self.lo if end >= self.lo else 0
        flush = None
        if cfg.prefix_only:
            cut = end
        if cfg.flushes_count:
            k = bisect.bisect_left(self.flushes, end)
            if k:
                flush = self.flushes[k - 1]
                cut = max(cut, flush)
        if t is not None and cfg.window_s != math.inf:
            # ops with _op_hi < t - window are certainly older than the window
            limit = t - cfg.window_s * 1e9
            old = bisect.bisect_left(self._op_hi, limit, 0, n_ops)
            if old:
                cut = max(cut, self.ops[old - 1] + 1)
        first = bisect.bisect_left(self.ops, cut, 0, n_ops)
        late: list[int] = []
        volatile: list[int] = []
        for i in self.ops[first:n_ops]:
            # FUA reaches stable storage before it completes, unless the host drops flushes.
            (late if cfg.flushes_count and self.entries[i].is_fua else volatile).append(i)
        stable = volatile[0] if volatile else end
        return CrashPoint(end, stable, tuple(i for i in late if i >= stable), tuple(volatile), flush, t)

    def durable(self, cp: CrashPoint) -> list[int]:
        """Every op the model calls durable at `cp` (for tests and reports: O(ops))."""
        n_stable = bisect.bisect_left(self.ops, cp.stable)
        return [*self.ops[:n_stable], *cp.durable_late]

    def epochs(self) -> list[range]:
        """Crash points grouped by durability epoch: each range of `end` values sees the same last
        flush. Without effective flushes the whole window is one epoch."""
        cuts = [f + 1 for f in self.flushes if f + 1 > self.lo] if self.cfg.flushes_count else []
        bounds = [self.lo, *cuts]
        out = [range(a, b) for a, b in zip(bounds, [*cuts, self.n + 1], strict=True) if a < b]
        return out

    def torn_units(self) -> list[int]:
        """The torn-write units this log can have: whole multiples of its sector size."""
        return [u for u in TORN_UNITS if self.sector_size is None or u % self.sector_size == 0]

    def units(self, index: int) -> list[tuple[int, int]]:
        """A write's atomic pieces as (byte offset on the device, length): split at multiples of the
        torn-write unit, so a piece never straddles a unit the device writes atomically."""
        e = self.entries[index]
        unit = self.cfg.torn
        if unit is None or not e.is_write:
            return [(e.offset, e.length)]
        out = []
        pos, end = e.offset, e.offset + e.length
        while pos < end:
            nxt = min(end, (pos // unit + 1) * unit)
            out.append((pos, nxt - pos))
            pos = nxt
        return out
