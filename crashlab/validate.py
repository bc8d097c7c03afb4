"""Model validation: is every state the host really left on its disk one the qemu-recorder model allows?

A host-dm recording holds two logs of one guest run: QEMU's blklogwrites log (what left QEMU, the
model's input) and the host's dm-log-writes log in image space (what the host page cache wrote back
to its disk, in completion order). Each prefix of the host log is a state the host disk really had
at an instant. The check: for every prefix there is a crash point of the qemu log, and a choice of
its volatile writes (or of their torn units), whose image equals the prefix's image, byte for byte
over the filesystem region (the marker region behind it is the recorder's, not the guest's).

Pure: two lists of entries with their data, a model, a result. The search, per host prefix:

- Only crash points whose allowed set is maximal are tried: moving from end c to c + 1 adds one
  volatile op and loses nothing unless something becomes durable (a flush, the window), so the
  candidates are the ends just before that happens, and the log's end.
- At a candidate, the pieces that may persist (volatile ops, or their torn units; FUA ones must)
  are pruned to a greatest fixpoint: the last remaining piece over a sector must hold that sector's
  host value, else it cannot have persisted. What remains is the largest witness; the state is
  allowed iff every sector where the host differs from the durable image is covered by it.
- Pieces interact only through shared sectors, so the fixpoint is kept per connected component and
  a host write recomputes only the components it touches.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from crashlab import hostrecord, logformat, model
from crashlab.logformat import Entry
from crashlab.model import CrashPoint, LogModel

LOOKAHEAD = 24  # candidates tried past the current one before a prefix is called a violation
LOOKBACK = 4
MAX_REPORTED = 10


class DataSource(Protocol):
    def data(self, entry: Entry) -> memoryview: ...


@dataclass(frozen=True, slots=True)
class Violation:
    host_entry: int  # the host prefix [0, host_entry] was no allowed state
    candidate_end: int  # the qemu crash point it came closest at
    sector: int  # a sector no allowed choice explains
    why: str


@dataclass
class Validation:
    prefixes: int = 0  # host prefixes checked (every entry, and the empty one)
    host_states: int = 0  # host images among them (each write that changed a byte makes a new one)
    violations: int = 0
    examples: list[Violation] = field(default_factory=list)
    candidates: int = 0  # maximal crash points of the qemu log
    visited: int = 0  # of them, how many some host state matched
    allowed_log10: float = 0.0  # log10 of sum over candidates of 2**pieces: the model's states, at most
    pieces_max: int = 0
    sectors: int = 0  # size of the compared region, in sectors

    @property
    def passed(self) -> bool:
        return self.violations == 0

    def as_dict(self) -> dict[str, object]:
        d = {k: v for k, v in vars(self).items() if k != "examples"}
        return {**d, "examples": [asdict(v) for v in self.examples], "passed": self.passed}


def _sectors(e: Entry, ss: int, limit: int) -> range:
    return range(e.sector, min(e.sector + e.nr_sectors, limit))


class _Values:
    """Sector values of a log's ops (bytes; None = zero), read lazily from its data."""

    def __init__(self, src: DataSource, ss: int) -> None:
        self.src, self.ss = src, ss
        self.zero = bytes(ss)

    def at(self, e: Entry, s: int) -> bytes | None:
        if e.is_discard:
            return None
        k = (s - e.sector) * self.ss
        v = bytes(self.src.data(e)[k:k + self.ss])
        return None if v == self.zero else v


class Validator:
    """Host prefixes against one qemu-log model; feed host entries in order with `step`."""

    def __init__(self, m: LogModel, qemu_src: DataSource, limit_sectors: int) -> None:
        self.m, self.limit = m, limit_sectors
        self.ss = m.sector_size or 512
        self.qv = _Values(qemu_src, self.ss)
        self.host: dict[int, bytes | None] = {}
        # Durable image as a cut over the ops in log order: per sector, the ops covering it.
        self.hist: dict[int, list[int]] = {}
        for i in m.ops:
            for s in _sectors(m.entries[i], self.ss, self.limit):
                self.hist.setdefault(s, []).append(i)
        self.dur: dict[int, bytes | None] = {}
        self.cut = 0  # ops with index < cut are in `dur` (durable_late ones are pieces)
        self.diff: set[int] = set()
        cps = [m.crash(e) for e in range(0, m.n + 1)]
        self.cands = [c for c in range(m.n + 1) if c == m.n or
                      (cps[c + 1].stable, cps[c + 1].durable_late) != (cps[c].stable, cps[c].durable_late)]
        self.cps = cps
        self.pos = -1
        self.result = Validation(candidates=len(self.cands), sectors=limit_sectors)
        self._visited: set[int] = set()
        total = -math.inf
        for c in self.cands:
            n = len(self._pieces_of(cps[c]))
            self.result.pieces_max = max(self.result.pieces_max, n)
            total = _log10_add(total, n * math.log10(2))
        self.result.allowed_log10 = round(total, 2)
        self._select(0)

    # -- the durable image ------------------------------------------------------------------------

    def _dur_value(self, s: int, cut: int) -> bytes | None:
        ops = self.hist.get(s, [])
        k = bisect.bisect_left(ops, cut)
        return self.qv.at(self.m.entries[ops[k - 1]], s) if k else None

    def _recheck(self, s: int) -> None:
        if self.host.get(s) != self.dur.get(s):
            self.diff.add(s)
        else:
            self.diff.discard(s)

    def _move_cut(self, cut: int) -> None:
        lo, hi = sorted((self.cut, cut))
        touched: set[int] = set()
        k0, k1 = bisect.bisect_left(self.m.ops, lo), bisect.bisect_left(self.m.ops, hi)
        for i in self.m.ops[k0:k1]:
            touched.update(_sectors(self.m.entries[i], self.ss, self.limit))
        self.cut = cut
        for s in touched:
            v = self._dur_value(s, cut)
            if v is None:
                self.dur.pop(s, None)
            else:
                self.dur[s] = v
            self._recheck(s)

    # -- a candidate's pieces and their components --------------------------------------------------

    def _pieces_of(self, cp: CrashPoint) -> list[tuple[int, int, int, bool]]:
        """(op, first sector, end sector, forced) for every piece that may or must persist."""
        out = []
        forced = set(cp.durable_late)
        for i in sorted({*cp.volatile, *cp.durable_late}):
            for off, length in self.m.units(i):
                a, b = off // self.ss, min((off + length) // self.ss, self.limit)
                if a < b:
                    out.append((i, a, b, i in forced))
        return out

    def _select(self, k: int) -> None:
        """Make candidate k current: durable cut, pieces, components, their fixpoints."""
        self.pos = k
        cp = self.cps[self.cands[k]]
        self._move_cut(cp.stable)
        self.pieces = self._pieces_of(cp)
        self.cover: dict[int, list[int]] = {}
        for p, (_, a, b, _) in enumerate(self.pieces):
            for s in range(a, b):
                self.cover.setdefault(s, []).append(p)
        parent = list(range(len(self.pieces)))

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for ps in self.cover.values():
            r = find(ps[0])
            for p in ps[1:]:
                q = find(p)
                if q != r:
                    parent[q] = r
        self.comp = [find(p) for p in range(len(self.pieces))]
        self.members: dict[int, list[int]] = {}
        for p, c in enumerate(self.comp):
            self.members.setdefault(c, []).append(p)
        self.bad: set[int] = set()
        for c in self.members:
            self._fix(c)
        self.uncovered = {s for s in self.diff if s not in self.cover}

    def _fix(self, c: int) -> None:
        """The greatest fixpoint of component c's pieces against the host image."""
        members = self.members[c]
        alive = set(members)
        work = {s for p in members for s in range(self.pieces[p][1], self.pieces[p][2])}
        ok = True
        while work and ok:
            s = work.pop()
            last = next((p for p in reversed(self.cover[s]) if p in alive), None)
            if last is None:
                continue
            i, a, b, forced = self.pieces[last]
            if self.qv.at(self.m.entries[i], s) != self.host.get(s):
                if forced:
                    ok = False
                    break
                alive.discard(last)
                work.update(range(a, b))
        if ok:  # every sector no remaining piece covers must already be right
            covered_alive = {s for p in alive for s in range(self.pieces[p][1], self.pieces[p][2])}
            ok = all(s in covered_alive for p in members
                     for s in range(self.pieces[p][1], self.pieces[p][2]) if s in self.diff)
        if ok:
            self.bad.discard(c)
        else:
            self.bad.add(c)

    def allowed(self) -> bool:
        return not self.bad and not self.uncovered

    # -- host writes --------------------------------------------------------------------------------

    def apply_host(self, e: Entry, values: _Values) -> bool:
        """Apply a host op; whether the image changed."""
        changed = False
        comps: set[int] = set()
        for s in _sectors(e, self.ss, self.limit):
            v = values.at(e, s)
            if self.host.get(s) == v:
                continue
            changed = True
            if v is None:
                self.host.pop(s, None)
            else:
                self.host[s] = v
            self._recheck(s)
            if s in self.cover:
                comps.update(self.comp[p] for p in self.cover[s])
            elif s in self.diff:
                self.uncovered.add(s)
            else:
                self.uncovered.discard(s)
        for c in comps:
            self._fix(c)
        return changed

    def settle(self, host_entry: int) -> None:
        """Find a candidate that allows the current host image, near the last one."""
        start = self.pos
        order = [*range(start, min(len(self.cands), start + LOOKAHEAD + 1)),
                 *range(start - 1, max(-1, start - LOOKBACK - 1), -1)]
        for k in order:
            if k != self.pos:
                self._select(k)
            if self.allowed():
                self._visited.add(k)
                return
        self._select(start)
        r = self.result
        r.violations += 1
        if len(r.examples) < MAX_REPORTED:
            if self.uncovered:
                s = min(self.uncovered)
                why = "the host's bytes differ from the durable image where no volatile write can " \
                    "explain them" if s in self.host else "a durable write the host had not written"
            else:
                c = min(self.bad)
                s = self.pieces[self.members[c][0]][1]
                why = "no choice of the crash point's volatile writes gives the host's bytes"
            r.examples.append(Violation(host_entry, self.cands[start], s, why))

    def finish(self) -> Validation:
        self.result.visited = len(self._visited)
        return self.result


def _log10_add(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    hi, lo = max(a, b), min(a, b)
    return hi + math.log10(1 + 10 ** (lo - hi))


def validate(m: LogModel, qemu_src: DataSource, host: Sequence[Entry], host_src: DataSource,
             limit_bytes: int) -> Validation:
    """Every prefix of the `host` log (image space) against the qemu-log model `m`."""
    ss = m.sector_size or 512
    if host and host[0].sector_size != ss:
        raise ValueError(f"the host log's sectors are {host[0].sector_size} bytes, the qemu log's {ss}")
    v = Validator(m, qemu_src, limit_bytes // ss)
    hv = _Values(host_src, ss)
    states = 1  # the empty prefix
    v.settle(-1)
    for e in host:
        if (e.is_write or e.is_discard) and v.apply_host(e, hv):
            states += 1
        v.settle(e.index)
    r = v.finish()
    r.prefixes = len(host) + 1
    r.host_states = states
    return r


def sweeps(entries: Iterable[Entry]) -> tuple[int, int, int]:
    """(writes, flush epochs with writes, ascending offset runs): how far the host's writeback is
    one sweep in offset order per epoch (runs == epochs) or scattered (runs == writes)."""
    writes = epochs = runs = 0
    last: int | None = None
    in_epoch = False
    for e in entries:
        if e.is_flush:
            in_epoch, last = False, None
        if not e.is_write:
            continue
        writes += 1
        if not in_epoch:
            epochs += 1
            in_epoch = True
        if last is None or e.offset < last:
            runs += 1
        last = e.offset
    return writes, epochs, runs


# --- recordings (the edge: files in, a report out) ------------------------------------------------

PAGE_UNIT = 4096  # the host page: the unit page-cache writeback persists
TORN_READINGS: tuple[int | None, ...] = (PAGE_UNIT, None)


@dataclass(frozen=True)
class RecordingReport:
    """One host-dm recording validated: its facts and one Validation per reading of the model."""

    path: str
    cache: str
    nested: bool
    host: str
    fs_bytes: int
    sweeps: tuple[int, int, int]
    readings: dict[str, Validation]  # "torn 4096" / "whole writes" -> result

    @property
    def passed(self) -> bool:
        """The first reading (torn at the host page, by default) decides: page-cache writeback
        persists pages, and a model without tears forbids what it does to multi-page writes."""
        return next(iter(self.readings.values())).passed

    def as_dict(self) -> dict[str, object]:
        return {"path": self.path, "cache": self.cache, "nested": self.nested, "host": self.host,
                "fs_bytes": self.fs_bytes, "sweeps": dict(zip(("writes", "epochs", "runs"), self.sweeps,
                                                              strict=True)),
                "readings": {k: v.as_dict() for k, v in self.readings.items()}, "passed": self.passed}


def reading_name(torn: int | None) -> str:
    return f"torn {torn}" if torn else "whole writes"


class RecordingError(ValueError):
    """A directory that is not a host-dm recording with its qemu twin; one line."""


def host_dm_recording(run_dir: Path) -> tuple[dict[str, object], Path, Path]:
    """(run.json, host-dm image-space log, qemu log of the same run) of a host-dm recording."""
    try:
        run = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError) as e:
        raise RecordingError(f"{run_dir}: no readable run.json ({e})") from None
    cfg = run.get("config") if isinstance(run, dict) else None
    if not isinstance(cfg, dict) or cfg.get("recorder") != "host-dm":
        raise RecordingError(f"{run_dir}: not a host-dm recording (run.json names recorder "
                             f"{cfg.get('recorder') if isinstance(cfg, dict) else None!r})")
    host, qemu = run_dir / "write.log", run_dir / "qemu" / "write.log"
    for p in (host, qemu):
        if not p.is_file():
            raise RecordingError(f"{run_dir}: {p.name} missing ({p})")
    return run, host, qemu


def validate_recording(run_dir: Path, torns: Sequence[int | None] = TORN_READINGS) -> RecordingReport:
    """Validate one host-dm recording: its host log against its qemu twin's model, per reading
    (baseline none: the host's every state counts, mkfs included; window inf: no clock dates both)."""
    run, host_log, qemu_log = host_dm_recording(run_dir)
    cfg: dict[str, Any] = run["config"]  # type: ignore[assignment]
    hd: dict[str, Any] = run.get("host_dm") or {}  # type: ignore[assignment]
    try:  # the filesystem region: the marker region behind it is the recorder's, not the guest's
        fs_bytes = int(hd.get("fs_bytes") or hostrecord.config_from_job(cfg).fs_bytes)
    except (KeyError, TypeError, ValueError) as e:
        raise RecordingError(f"{run_dir}: run.json's config is not a recording's ({e})") from None
    with logformat.open_log(qemu_log) as qr, logformat.open_log(host_log) as hr:
        readings = {}
        for torn in torns:
            m = LogModel(qr.index(), model.config("qemu", str(cfg["cache"]), "inf", None, torn))
            readings[reading_name(torn)] = validate(m, qr, hr.index(), hr, fs_bytes)
        sw = sweeps(hr.index())
    return RecordingReport(str(run_dir), str(cfg["cache"]), bool(hd.get("nested")), str(hd.get("host", "?")),
                           fs_bytes, sw, readings)
