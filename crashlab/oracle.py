"""The fsync oracle: which promises of a workload a recovered tree keeps, and which it breaks.

A workload (crashlab.workload) writes, after each durability point, a *point* line and then its
*promises*, JSON lines in the promises file:

    {"marker": "fsync-3", "seq": 7}                                          # the point itself
    {"marker": "fsync-3", "seq": 7, "kind": "file", "path": "d/f3", "sha256": "..", "size": 4096}

`seq` is the in-band marker's sequence number. A crash state lies after some durability points (the
markers logged before its crash point, always a prefix in log order); `check` takes their seqs
(`Promises.oracle(present)` binds them, for crashlab.check).

Rules, for one crash state:
- Promises are per path. For each path, the *current* promise is the latest one made at a present
  point: a later promise for a path supersedes an earlier one.
- The crash state may also hold any part of what the workload did after the last present point and
  before the next one (writes issued later cannot be logged before the next marker). So a path may
  instead be found in the state promised for it at the *next* point; and if that promise is `torn`,
  or of kind `any`, in any state at all (the workload mutated it non-atomically on the way).
- So a workload must make, at the next point, a new promise for every path it touched since the
  previous point: the new state if it is now durable, `any` (a release) if it is not.

Kinds (constructors below): `file` (exact content, optional xattrs), `prefix` (first N bytes),
`exists`, `absent`, `any`, `log` (checksummed append log, a prefix of acknowledged records) and
`sqlite` (committed rows of one table, and `PRAGMA integrity_check`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
import struct
import tempfile
import zlib
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

Promise = dict[str, Any]


# -- promise constructors: what workloads call ------------------------------------------------

def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_state(path: str, data: bytes, xattrs: dict[str, bytes] | None = None, *,
               torn: bool = False) -> Promise:
    """`path` is a regular file holding exactly `data` (and these xattrs, if given)."""
    p: Promise = {"kind": "file", "path": path, "sha256": sha256(data), "size": len(data)}
    if xattrs is not None:
        p["xattrs"] = {k: v.hex() for k, v in sorted(xattrs.items())}
    if torn:
        p["torn"] = True
    return p


def prefix(path: str, size: int, digest: str) -> Promise:
    """`path` is a regular file whose first `size` bytes have sha256 `digest` (it may be longer)."""
    return {"kind": "prefix", "path": path, "sha256": digest, "size": size}


def exists(path: str, type_: str) -> Promise:
    """`path` exists and is a `file` or a `dir`, content unpromised."""
    assert type_ in ("file", "dir")
    return {"kind": "exists", "path": path, "type": type_}


def absent(path: str) -> Promise:
    return {"kind": "absent", "path": path}


def anything(path: str) -> Promise:
    """Releases `path`: nothing is promised from this point on (and on the way to it)."""
    return {"kind": "any", "path": path}


def log_prefix(path: str, records: int, chain: str) -> Promise:
    """The first `records` records of the append log at `path` are valid and hash to `chain`."""
    return {"kind": "log", "path": path, "records": records, "chain": chain}


def sqlite_rows(path: str, table: str, rows: Sequence[Sequence[Any]], txn: int) -> Promise:
    """Database `path` passes integrity_check and `table` (by rowid) holds exactly `rows`."""
    return {"kind": "sqlite", "path": path, "table": table, "rows": len(rows), "txn": txn,
            "digest": rows_digest(rows)}


# -- formats shared with workloads -----------------------------------------------------------

def rows_digest(rows: Iterable[Sequence[Any]]) -> str:
    return sha256(json.dumps([list(r) for r in rows], separators=(",", ":")).encode())


# Files beside a database that opening it reads: a WAL to replay, a hot journal to roll back.
SQLITE_SIDE_FILES = ("", "-wal", "-journal")

LOG_MAGIC = b"LREC"
_LOG_HEAD = struct.Struct("<4sIQI")  # magic, payload length, record index, crc32
LOG_MAX_PAYLOAD = 1 << 20


def _log_crc(index: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(struct.pack("<QI", index, len(payload))))


def log_record(index: int, payload: bytes) -> bytes:
    """One append-log record: a header whose crc covers index, length and payload, then the payload."""
    return _LOG_HEAD.pack(LOG_MAGIC, len(payload), index, _log_crc(index, payload)) + payload


def log_chain(prev: str, payload: bytes) -> str:
    """Hash chain over record payloads: names a whole prefix of the log in one digest."""
    return sha256(bytes.fromhex(prev) + payload)


LOG_CHAIN_START = sha256(b"")


def parse_log(data: bytes) -> tuple[list[bytes], str]:
    """The valid records at the start of `data` and why parsing stopped (what a recovering reader
    does: stop at the first record that is short, has a bad checksum or is out of sequence)."""
    records: list[bytes] = []
    off = 0
    while True:
        if off == len(data):
            return records, f"end of file at offset {off}"
        if len(data) - off < _LOG_HEAD.size:
            return records, f"short header at offset {off}"
        magic, length, index, crc = _LOG_HEAD.unpack_from(data, off)
        if magic != LOG_MAGIC:
            what = "zeroes" if not data[off:off + _LOG_HEAD.size].strip(b"\0") else "bad magic"
            return records, f"{what} at offset {off}"
        body = data[off + _LOG_HEAD.size:off + _LOG_HEAD.size + length]
        if length > LOG_MAX_PAYLOAD or len(body) < length:
            return records, f"record {index} truncated at offset {off}"
        if index != len(records):
            return records, f"record {index} out of sequence at offset {off}"
        if _log_crc(index, body) != crc:
            return records, f"record {index} fails its checksum at offset {off}"
        records.append(body)
        off += _LOG_HEAD.size + length


# -- checking ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Violation:
    path: str
    promise: Promise
    found: str

    @property
    def message(self) -> str:
        return f"{self.path}: promised {describe(self.promise)} after {self.promise.get('marker')}, " \
               f"found {self.found}"

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        """As the record keeps it, the message first for a reader of a stored outcome; a shallow
        copy (asdict's deep one was a tenth of a state's cost on a fast checker)."""
        return {"path": self.path, "promise": dict(self.promise), "found": self.found,
                "message": self.message}


def _short(h: str) -> str:
    return h[:12] + ".."


def describe(p: Promise) -> str:
    kind = p["kind"]
    if kind == "file":
        xa = f", xattrs {sorted(p['xattrs'])}" if p.get("xattrs") else ""
        return f"sha256 {_short(p['sha256'])} ({p['size']} B{xa})"
    if kind == "prefix":
        return f"first {p['size']} B with sha256 {_short(p['sha256'])}"
    if kind == "exists":
        return f"a {p['type']}"
    if kind == "absent":
        return "no entry"
    if kind == "any":
        return "nothing"
    if kind == "log":
        return f"{p['records']} acknowledged records (chain {_short(p['chain'])})"
    if kind == "sqlite":
        return f"{p['rows']} rows in {p['table']} as of txn {p['txn']} (digest {_short(p['digest'])}) " \
               "and integrity ok"
    raise ValueError(f"unknown promise kind {kind!r}")


class Stat(NamedTuple):
    """What the oracle needs of an entry's lstat: its mode (type bits included) and size."""

    st_mode: int
    st_size: int


class Tree(Protocol):
    """A recovered tree as the oracle reads it: paths are relative to the workload's root, and the
    last component is never followed (lstat semantics). A directory on a mount is one (`DirTree`);
    crashlab.check.userspace reads an ext4 image through libext2fs with no mount at all."""

    def lstat(self, rel: str) -> Stat | None:
        """None when there is no entry (missing, or a parent is not a directory)."""
        ...

    def read(self, rel: str) -> bytes:
        """The whole content of a regular file; OSError if it cannot be read."""
        ...

    def getxattr(self, rel: str, name: str) -> bytes:
        """OSError if the attribute is not there or cannot be read."""
        ...


@dataclass(frozen=True)
class DirTree:
    root: Path

    def lstat(self, rel: str) -> Stat | None:
        try:
            st = os.lstat(self.root / rel)
        except (FileNotFoundError, NotADirectoryError):  # a parent became a file: no entry
            return None
        return Stat(st.st_mode, st.st_size)

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def getxattr(self, rel: str, name: str) -> bytes:
        return os.getxattr(self.root / rel, name, follow_symlinks=False)


def as_tree(tree: Path | str | Tree) -> Tree:
    return DirTree(Path(tree)) if isinstance(tree, (str, os.PathLike)) else tree


def _what(st: Stat | None) -> str:
    if st is None:
        return "no entry"
    if stat.S_ISREG(st.st_mode):
        return f"a file of {st.st_size} B"
    if stat.S_ISDIR(st.st_mode):
        return "a directory"
    return f"an entry of mode {st.st_mode:o}"


def _read_file(tree: Tree, rel: str) -> tuple[bytes | None, str]:
    st = tree.lstat(rel)
    if st is None or not stat.S_ISREG(st.st_mode):
        return None, _what(st)
    try:
        return tree.read(rel), ""
    except OSError as e:
        return None, f"an unreadable file ({e.strerror})"


def _content(data: bytes) -> str:
    if not data:
        return "0 B"
    if not data.strip(b"\0"):
        return f"{len(data)} B, all zero"
    return f"{len(data)} B with sha256 {_short(sha256(data))}"


def _holds_file(tree: Tree, p: Promise) -> str | None:
    data, why = _read_file(tree, p["path"])
    if data is None:
        return why
    if len(data) != p["size"] or sha256(data) != p["sha256"]:
        return _content(data)
    for name, value in p.get("xattrs", {}).items():
        try:
            got = tree.getxattr(p["path"], name)
        except OSError:
            return f"the right content but no xattr {name}"
        if got.hex() != value:
            return f"the right content but xattr {name} = {got[:32]!r}"
    return None


def _holds_prefix(tree: Tree, p: Promise) -> str | None:
    data, why = _read_file(tree, p["path"])
    if data is None:
        return why
    if len(data) < p["size"]:
        return f"only {len(data)} B"
    head = data[:p["size"]]
    if sha256(head) != p["sha256"]:
        return f"{len(data)} B whose first {p['size']} B differ" + (" (all zero)" if not head.strip(b"\0")
                                                                        else "")
    return None


def _holds_exists(tree: Tree, p: Promise) -> str | None:
    st = tree.lstat(p["path"])
    want = stat.S_ISDIR if p["type"] == "dir" else stat.S_ISREG
    return None if st is not None and want(st.st_mode) else _what(st)


def _holds_absent(tree: Tree, p: Promise) -> str | None:
    st = tree.lstat(p["path"])
    return None if st is None else _what(st)


def _holds_log(tree: Tree, p: Promise) -> str | None:
    data, why = _read_file(tree, p["path"])
    if data is None:
        return why
    records, stop = parse_log(data)
    if len(records) < p["records"]:
        return f"{len(records)} valid records ({stop})"
    chain = LOG_CHAIN_START
    for r in records[:p["records"]]:
        chain = log_chain(chain, r)
    if chain != p["chain"]:
        return f"{len(records)} valid records whose first {p['records']} differ from those written"
    return None


def _log_extra(tree: Tree, current: Promise, nxt: Promise | None) -> str | None:
    """Records past the acknowledged prefix that parse as valid must be records the workload wrote:
    a torn or stale record read as valid is the failure a WAL checksum exists to prevent. Only the
    next point's records can be in the crash state, and only its full prefix has a known chain."""
    data, _ = _read_file(tree, current["path"])
    if data is None or nxt is None or nxt["kind"] != "log":
        return None
    n = len(parse_log(data)[0])
    if n > nxt["records"]:
        return f"{n} valid records, more than the {nxt['records']} written before the next point"
    if n == nxt["records"] and _holds_log(tree, nxt) is not None:
        return f"{n} valid records, the last {n - current['records']} never written"
    return None


def _holds_sqlite(tree: Tree, p: Promise) -> str | None:
    st = tree.lstat(p["path"])
    if st is None or not stat.S_ISREG(st.st_mode):
        return _what(st)
    # Work on a copy: opening replays a WAL or rolls back a hot journal, and the tree may be read-only.
    with tempfile.TemporaryDirectory(prefix="crashlab-oracle-") as tmp:
        db = Path(tmp) / Path(p["path"]).name
        for suffix in SQLITE_SIDE_FILES:
            data, _ = _read_file(tree, p["path"] + suffix)
            if data is not None:
                db.with_name(db.name + suffix).write_bytes(data)
        try:
            con = sqlite3.connect(db, isolation_level=None)
            try:
                integrity = [r[0] for r in con.execute("PRAGMA integrity_check")]
                rows = con.execute(f'SELECT * FROM "{p["table"]}" ORDER BY rowid').fetchall()
            finally:
                con.close()
        except sqlite3.DatabaseError as e:
            return f"a database sqlite cannot read ({e})"
    ok = integrity == ["ok"]
    detail = "integrity ok" if ok else f"integrity_check: {'; '.join(integrity[:3])}"
    if ok and len(rows) == p["rows"] and rows_digest(rows) == p["digest"]:
        return None
    return f"{len(rows)} rows (digest {_short(rows_digest(rows))}), {detail}"


_HOLDS: dict[str, Callable[[Tree, Promise], str | None]] = {
    "file": _holds_file, "prefix": _holds_prefix, "exists": _holds_exists, "absent": _holds_absent,
    "any": lambda tree, p: None, "log": _holds_log, "sqlite": _holds_sqlite,
}
KINDS = frozenset(_HOLDS)


def verify(tree: Tree, current: Promise, nxt: Promise | None) -> str | None:
    """None if `path` is in the current promised state or may be on its way to the next one;
    otherwise what was found, in words."""
    found = _HOLDS[current["kind"]](tree, current)
    if found is None:
        if current["kind"] == "log":
            return _log_extra(tree, current, nxt)
        return None
    if nxt is not None and (nxt.get("torn") or _HOLDS[nxt["kind"]](tree, nxt) is None):
        return None
    return found


@dataclass(frozen=True)
class Promises:
    """A workload's promises file: its durability points in order and the promises made at each."""

    points: tuple[tuple[int, str], ...]  # (seq, marker name), in seq order
    promises: tuple[Promise, ...]

    def check(self, tree: Path | Tree, present: Collection[int] | None = None) -> list[Violation]:
        return check(tree, self, present)

    def bound(self, present: Collection[int] | None = None
              ) -> tuple[dict[str, Promise], dict[str, Promise]]:
        """Per path, the current promise and the next point's (see `check`): what a crash state
        after the markers `present` is judged by."""
        seqs = [s for s, _ in self.points]
        seqs_in = seqs if present is None else [s for s in seqs if s in set(present)]
        if not seqs_in:
            return {}, {}
        last = seqs_in[-1]
        nxt_seq = next((s for s in seqs if s > last), None)
        current: dict[str, Promise] = {}
        nxt: dict[str, Promise] = {}
        for p in self.promises:
            if p["seq"] <= last:
                current[p["path"]] = p
            elif p["seq"] == nxt_seq:
                nxt[p["path"]] = p
        return current, nxt

    def reads(self, present: Collection[int] | None = None) -> tuple[set[str], set[tuple[str, str]]]:
        """Every path `check` may look at in such a state, and every (path, xattr name): all a
        reader must fetch from an image for the oracle to judge it without a mount."""
        current, nxt = self.bound(present)
        paths: set[str] = set()
        attrs: set[tuple[str, str]] = set()
        for p in (*current.values(), *(nxt[k] for k in nxt if k in current)):
            paths.add(p["path"])
            if p["kind"] == "sqlite":
                paths.update(p["path"] + suffix for suffix in SQLITE_SIDE_FILES)
            attrs.update((p["path"], name) for name in p.get("xattrs", {}))
        return paths, attrs

    def oracle(self, present: Collection[int] | None = None) -> Callable[[Path | Tree], list[Violation]]:
        """The one-argument oracle crashlab.check runs on a recovered tree."""
        return lambda tree: check(tree, self, present)


def parse_promises(lines: Iterable[str]) -> Promises:
    points: dict[int, str] = {}
    promises: list[Promise] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        if "kind" not in rec:
            points[rec["seq"]] = rec["marker"]
            continue
        if rec["kind"] not in KINDS:
            raise ValueError(f"line {n}: unknown promise kind {rec['kind']!r}")
        points.setdefault(rec["seq"], rec["marker"])
        promises.append(rec)
    promises.sort(key=lambda p: p["seq"])  # stable: file order within a point
    return Promises(tuple(sorted(points.items())), tuple(promises))


def load_promises(path: Path) -> Promises:
    with path.open() as f:
        return parse_promises(f)


def check(tree: Path | Tree, promises: Promises | Sequence[Promise], present: Collection[int] | None = None
          ) -> list[Violation]:
    """Every promise broken by `tree` (the workload's root after recovery) in a crash state that lies
    after the in-band markers whose seqs are `present` (None: all of them, no crash). In-band markers
    are logged in order, so only the latest durability point among them matters: passing just its
    seq is the same as passing the whole prefix; ticks and other seqs are ignored."""
    if not isinstance(promises, Promises):
        promises = parse_promises(json.dumps(p) for p in promises)
    current, nxt = promises.bound(present)
    tree = as_tree(tree)
    violations = []
    for path, p in sorted(current.items()):
        found = verify(tree, p, nxt.get(path))
        if found is not None:
            violations.append(Violation(path, p, found))
    return violations
