"""The oracle's kinds on hand-built trees, the next-point rule, and the promises loader."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from crashlab import oracle
from crashlab.oracle import Violation, check, parse_promises


def at(seq: int, marker: str, *promises: dict) -> list[dict]:
    """A point line and its promises, as crashlab.workload writes them."""
    return [{"marker": marker, "seq": seq}, *({"marker": marker, "seq": seq, **p} for p in promises)]


def promises(*points: list[dict]) -> oracle.Promises:
    return parse_promises(json.dumps(rec) for pt in points for rec in pt)


def only(violations: list[Violation]) -> str:
    assert len(violations) == 1, violations
    return violations[0].message


OLD, NEW = b"old version\n" * 100, b"the new version\n" * 300


# -- file, exists, absent -----------------------------------------------------------------------

def test_file_kept_missing_truncated(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d/f12").write_bytes(b"x" * 4096)
    ps = promises(at(3, "fsync-12", oracle.file_state("d/f12", b"x" * 4096)))
    assert check(tmp_path, ps) == []
    (tmp_path / "d/f12").write_bytes(b"")
    digest = oracle.sha256(b"x" * 4096)[:12]
    assert only(check(tmp_path, ps)) == \
        f"d/f12: promised sha256 {digest}.. (4096 B) after fsync-12, found 0 B"
    (tmp_path / "d/f12").write_bytes(bytes(4096))
    assert only(check(tmp_path, ps)).endswith("found 4096 B, all zero")
    (tmp_path / "d/f12").unlink()
    assert only(check(tmp_path, ps)).endswith("found no entry")
    (tmp_path / "d/f12").mkdir()
    assert only(check(tmp_path, ps)).endswith("found a directory")


def test_file_xattrs(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"data")
    ps = promises(at(0, "fsync", oracle.file_state("f", b"data", {"user.a": b"1" * 16})))
    assert "no xattr user.a" in only(check(tmp_path, ps))
    os.setxattr(f, "user.a", b"2" * 16)
    assert "xattr user.a = b'2222" in only(check(tmp_path, ps))
    os.setxattr(f, "user.a", b"1" * 16)
    assert check(tmp_path, ps) == []


def test_exists_and_absent(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "gone").write_bytes(b"back from the dead")
    ps = promises(at(0, "p", oracle.exists("dir", "dir"), oracle.exists("file", "file"),
                     oracle.absent("gone")))
    msgs = sorted(v.message for v in check(tmp_path, ps))
    assert msgs == ["file: promised a file after p, found no entry",
                    "gone: promised no entry after p, found a file of 18 B"]


def test_path_under_a_file_is_absent_not_an_error(tmp_path: Path) -> None:
    (tmp_path / "A").write_bytes(b"")
    ps = promises(at(0, "p", oracle.absent("A/foo"), oracle.exists("A/bar", "file")))
    assert only(check(tmp_path, ps)) == "A/bar: promised a file after p, found no entry"


# -- present markers, supersession and the next-point rule ---------------------------------------

def replace_history() -> oracle.Promises:
    # Ticks take seqs between points: seqs need not be contiguous.
    return promises(at(1, "replace-0", oracle.file_state("conf", OLD)),
                    at(5, "replace-1", oracle.file_state("conf", NEW)),
                    at(9, "unlink", oracle.absent("conf")))


@pytest.mark.parametrize(("content", "present", "ok"), [
    (OLD, {0, 1, 2}, True),          # after replace-0: old ...
    (NEW, {0, 1, 2}, True),          # ... or on its way to replace-1: new
    (None, {0, 1, 2}, False),        # but not gone: the unlink comes two points later
    (OLD, {1, 2, 5}, False),         # after replace-1 the old version is a lost fsync
    (NEW, {1, 5}, True),
    (None, {1, 5}, True),            # on its way to the unlink
    (None, None, True),              # no crash: the final state
    (NEW, None, False),
    (b"", {1}, False),               # never empty ...
    (OLD[:600] + NEW[600:], {1}, False),  # ... never mixed
    (OLD, set(), True),              # before any point: nothing promised
])
def test_atomic_replace_next_point(tmp_path: Path, content: bytes | None, present: set[int] | None,
                                   ok: bool) -> None:
    if content is not None:
        (tmp_path / "conf").write_bytes(content)
    assert (check(tmp_path, replace_history(), present) == []) is ok


def test_mixed_content_message_names_the_current_promise(tmp_path: Path) -> None:
    (tmp_path / "conf").write_bytes(OLD[:600] + NEW[600:])
    msg = only(check(tmp_path, replace_history(), {1}))
    assert msg.startswith(f"conf: promised sha256 {oracle.sha256(OLD)[:12]}.. (1200 B) after replace-0, "
                          "found 4800 B")


def test_torn_next_promise_releases_the_interval(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"half-written")
    ps = promises(at(0, "a", oracle.file_state("f", b"a")),
                  at(1, "b", oracle.file_state("f", b"b", torn=True)))
    assert check(tmp_path, ps, {0}) == []
    assert only(check(tmp_path, ps, {0, 1})).startswith("f: promised sha256")
    released = promises(at(0, "a", oracle.file_state("f", b"a")), at(1, "b", oracle.anything("f")))
    assert check(tmp_path, released, {0}) == []


# -- prefix ---------------------------------------------------------------------------------------

def test_prefix(tmp_path: Path) -> None:
    data = os.urandom(10000)
    ps = promises(at(0, "fdatasync-0", oracle.prefix("big", 6000, oracle.sha256(data[:6000]))))
    (tmp_path / "big").write_bytes(data)
    assert check(tmp_path, ps) == []  # longer is fine: the next write may be partly there
    (tmp_path / "big").write_bytes(data[:5000])
    assert only(check(tmp_path, ps)).endswith("found only 5000 B")
    (tmp_path / "big").write_bytes(bytes(6000) + data[6000:])
    assert only(check(tmp_path, ps)).endswith("found 10000 B whose first 6000 B differ (all zero)")


# -- append log -----------------------------------------------------------------------------------

def write_log(path: Path, payloads: list[bytes]) -> list[dict]:
    """The log file and, per record, the promise acknowledging it."""
    chain, out = oracle.LOG_CHAIN_START, []
    with path.open("wb") as f:
        for i, payload in enumerate(payloads):
            f.write(oracle.log_record(i, payload))
            chain = oracle.log_chain(chain, payload)
            out.append(oracle.log_prefix(path.name, i + 1, chain))
    return out


PAYLOADS = [f"txn {i} ".encode() * (50 + 40 * i) for i in range(5)]


def log_history(tmp_path: Path) -> oracle.Promises:
    return promises(*(at(i, f"commit-{i}", p) for i, p in enumerate(write_log(tmp_path / "wal", PAYLOADS))))


def test_log_torn_last_record_keeps_the_prefix(tmp_path: Path) -> None:
    ps = log_history(tmp_path)
    wal = tmp_path / "wal"
    assert check(tmp_path, ps) == []
    wal.write_bytes(wal.read_bytes()[:-100])  # record 4 torn mid-payload
    assert only(check(tmp_path, ps)).startswith(
        "wal: promised 5 acknowledged records")  # acknowledged: a lost commit
    assert only(check(tmp_path, ps)).endswith("found 4 valid records (record 4 truncated at offset "
                                              f"{len(wal.read_bytes()) - len(PAYLOADS[4]) - 20 + 100})")
    assert check(tmp_path, ps, {0, 1, 2, 3}) == []  # crash before commit-4 acknowledged: prefix kept


def test_log_corrupted_acknowledged_record(tmp_path: Path) -> None:
    ps = log_history(tmp_path)
    wal = tmp_path / "wal"
    data = bytearray(wal.read_bytes())
    data[len(oracle.log_record(0, PAYLOADS[0])) + 30] ^= 0xFF  # a byte inside record 1
    wal.write_bytes(data)
    msg = only(check(tmp_path, ps, {0, 1, 2}))
    assert msg.startswith("wal: promised 3 acknowledged records")
    assert msg.endswith("found 1 valid records (record 1 fails its checksum at offset "
                        f"{len(oracle.log_record(0, PAYLOADS[0]))})")


def test_log_unwritten_record_read_as_valid(tmp_path: Path) -> None:
    ps = log_history(tmp_path)
    wal = tmp_path / "wal"
    acked = b"".join(oracle.log_record(i, p) for i, p in enumerate(PAYLOADS[:3]))
    # A record with a valid checksum that the workload never wrote (stale data, misdirected write).
    wal.write_bytes(acked + oracle.log_record(3, b"stale junk"))
    assert only(check(tmp_path, ps, {0, 1, 2})).endswith("found 4 valid records, the last 1 never written")
    # Two records past the acknowledged prefix: more than could have been written before commit-3.
    wal.write_bytes(acked + oracle.log_record(3, PAYLOADS[3]) + oracle.log_record(4, PAYLOADS[4]))
    assert "more than the 4 written before the next point" in only(check(tmp_path, ps, {0, 1, 2}))
    # The real next record is fine.
    wal.write_bytes(acked + oracle.log_record(3, PAYLOADS[3]))
    assert check(tmp_path, ps, {0, 1, 2}) == []


def test_parse_log_stops_at_zeroes_and_out_of_sequence() -> None:
    recs = oracle.log_record(0, b"a") + oracle.log_record(2, b"c")
    assert oracle.parse_log(recs) == ([b"a"], "record 2 out of sequence at offset 21")
    assert oracle.parse_log(oracle.log_record(0, b"a") + bytes(100)) == ([b"a"], "zeroes at offset 21")


# -- sqlite -----------------------------------------------------------------------------------------

ROWS = [[1, "alice", 10, "x"], [2, "bob", -5, "y"], [3, "carol", 7, "z"]]


def make_db(path: Path, rows: list[list], journal_mode: str = "DELETE") -> sqlite3.Connection:
    con = sqlite3.connect(path, isolation_level=None)
    con.execute(f"PRAGMA journal_mode={journal_mode}")
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, amount INTEGER, memo TEXT)")
    con.executemany("INSERT INTO t VALUES (?, ?, ?, ?)", rows)
    return con


def test_sqlite_committed_rows(tmp_path: Path) -> None:
    make_db(tmp_path / "db", ROWS).close()
    ps = promises(at(4, "txn-2", oracle.sqlite_rows("db", "t", ROWS, 2)))
    assert check(tmp_path, ps) == []
    con = sqlite3.connect(tmp_path / "db", isolation_level=None)
    con.execute("DELETE FROM t WHERE id = 2")
    con.close()
    msg = only(check(tmp_path, ps))
    assert msg.startswith("db: promised 3 rows in t as of txn 2 (digest ")
    left = oracle.rows_digest([ROWS[0], ROWS[2]])[:12]
    assert msg.endswith(f"after txn-2, found 2 rows (digest {left}..), integrity ok")


def test_sqlite_reads_committed_rows_from_the_wal_without_writing_the_tree(tmp_path: Path) -> None:
    con = make_db(tmp_path / "db", ROWS, "WAL")  # left open: the rows are only in db-wal
    try:
        assert (tmp_path / "db-wal").stat().st_size > 0
        ps = promises(at(0, "txn", oracle.sqlite_rows("db", "t", ROWS, 1)))
        before = sorted(p.name for p in tmp_path.iterdir())
        assert check(tmp_path, ps) == []
        assert sorted(p.name for p in tmp_path.iterdir()) == before
    finally:
        con.close()


def test_sqlite_corrupt_database(tmp_path: Path) -> None:
    make_db(tmp_path / "db", ROWS).close()
    ps = promises(at(0, "txn", oracle.sqlite_rows("db", "t", ROWS, 1)))
    data = bytearray((tmp_path / "db").read_bytes())
    data[4096:8192] = b"\xa5" * 4096  # the table's b-tree page
    (tmp_path / "db").write_bytes(data)
    msg = only(check(tmp_path, ps))
    assert "found a database sqlite cannot read" in msg or "integrity_check:" in msg


# -- loading ---------------------------------------------------------------------------------------

def test_load_promises_points_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "promises.jsonl"
    lines = [*at(7, "a", oracle.absent("x")), *at(3, "b"),
             {"marker": "c", "seq": 9, "kind": "file", "path": "y", "sha256": "00", "size": 0}]
    path.write_text("".join(json.dumps(rec) + "\n" for rec in lines) + "\n")
    ps = oracle.load_promises(path)
    assert ps.points == ((3, "b"), (7, "a"), (9, "c"))
    assert [p["seq"] for p in ps.promises] == [7, 9]
    with pytest.raises(ValueError, match="line 1: unknown promise kind 'bogus'"):
        parse_promises(['{"marker": "a", "seq": 0, "kind": "bogus", "path": "x"}'])


def test_oracle_callable_for_the_checker(tmp_path: Path) -> None:
    ps = replace_history()
    (tmp_path / "conf").write_bytes(OLD)
    assert ps.oracle({1})(tmp_path) == []
    assert len(ps.oracle({5})(tmp_path)) == 1


def test_present_is_a_prefix_named_by_its_last_point(tmp_path: Path) -> None:
    ps = replace_history()
    (tmp_path / "conf").write_bytes(NEW)
    for present in ({5}, {0, 1, 2, 3, 4, 5, 6}, {1, 5}):
        assert check(tmp_path, ps, present) == []
    (tmp_path / "conf").write_bytes(OLD)
    assert only(check(tmp_path, ps, {5, 6})).startswith("conf: promised sha256")
