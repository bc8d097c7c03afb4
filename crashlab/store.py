"""The results store: one SQLite file holding every run, cell and crash-state outcome.

SQLite in WAL mode, written as outcomes finish: each state's row is committed on its own, so a
Ctrl-C or a kill loses at most the states in flight, and a rerun of the same command finds what is
already done and skips it. A state's primary key is (cell, state id), so nothing is ever counted
twice whatever order workers finish in.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from crashlab.check.outcome import CheckRecord, Outcome
from crashlab.logformat import InputError

DEFAULT_PATH = Path("results") / "crashlab.sqlite"
SQLITE_MAGIC = b"SQLite format 3\0"  # the first 16 bytes of every SQLite database file
TABLES = frozenset({"runs", "cells", "states"})  # what makes a store; later tables (costs) may be absent

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id   INTEGER PRIMARY KEY,
    started  REAL NOT NULL,
    command  TEXT NOT NULL,
    config   TEXT NOT NULL,   -- JSON: the whole campaign configuration, seeds included
    versions TEXT NOT NULL    -- JSON: QEMU, guest kernel, fs tools, crashlab
);
CREATE TABLE IF NOT EXISTS cells (
    cell      TEXT PRIMARY KEY, -- the canonical key of the configuration
    config    TEXT NOT NULL,    -- JSON
    recording TEXT,             -- directory holding the log, promises, console and run.json
    record    TEXT,             -- JSON: the recording's run.json
    run_id    INTEGER REFERENCES runs(run_id)
);
CREATE TABLE IF NOT EXISTS states (
    cell     TEXT NOT NULL REFERENCES cells(cell),
    state_id TEXT NOT NULL,
    outcome  TEXT NOT NULL,
    detail   TEXT NOT NULL,     -- JSON: fsck output, violations, timings
    run_id   INTEGER REFERENCES runs(run_id),
    checked  REAL NOT NULL,
    PRIMARY KEY (cell, state_id)
);
CREATE INDEX IF NOT EXISTS states_by_id ON states(state_id);
CREATE TABLE IF NOT EXISTS costs (
    cost     TEXT PRIMARY KEY,  -- the canonical key: fs, cache, barrier, disk, accel, fio sizes
    config   TEXT NOT NULL,     -- JSON: the key's fields
    figures  TEXT NOT NULL,     -- JSON: the figures, fio's command lines, versions, guest timings
    run_id   INTEGER REFERENCES runs(run_id),
    measured REAL NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class StateRow:
    cell: str
    state_id: str
    outcome: Outcome
    record: CheckRecord  # the check as stored: outputs clipped, violations as JSON
    run_id: int | None


@dataclass(frozen=True, slots=True)
class CostRow:
    cost: str
    config: dict[str, Any]
    figures: dict[str, Any]  # crashlab.cost.Measured.detail: "figures", "accel", "argv", "versions", ...
    run_id: int | None


@dataclass(frozen=True, slots=True)
class CellRow:
    cell: str
    config: dict[str, Any]
    recording: str | None
    record: dict[str, Any] | None
    run_id: int | None


class StoreError(InputError):
    """A store path that holds no results store, or a store that cannot be read or written (a
    read-only directory, a full disk): one line naming the path."""


class Store:
    """The results store at `path`. `readonly` (report, reproduce) never writes and refuses a
    missing store; otherwise a missing store is created, and removed again if creating it fails."""

    def __init__(self, path: str | Path = DEFAULT_PATH, *, readonly: bool = False) -> None:
        self.path = Path(path)
        existed = _validate_path(self.path, readonly)
        try:
            self.db = _open_readonly(self.path) if readonly else self._open_for_writing(existed)
        except sqlite3.Error as e:
            if not readonly and not existed:
                _remove_new(self.path)
            raise _error(self.path, e) from None

    def _open_for_writing(self, existed: bool) -> sqlite3.Connection:
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"{self.path}: cannot make the store's directory: {e.strerror}") from None
        # WAL puts -wal and -shm files beside the store: its directory must take new files.
        if not os.access(parent, os.W_OK | os.X_OK):
            why = "Read-only file system" if os.statvfs(parent).f_flag & os.ST_RDONLY else "Permission denied"
            raise StoreError(f"{self.path}: cannot write the store's directory {parent}: {why}")
        # Autocommit: every statement is its own transaction, the unit of "nothing lost".
        db = sqlite3.connect(self.path, isolation_level=None, timeout=60)
        try:
            if existed:
                _require_store(self.path, db, allow_empty=True)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
        except BaseException:
            db.close()
            raise
        return db

    def _execute(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        """Every statement goes through here: a full disk or a store gone read-only mid-run is a
        StoreError naming the store, not a sqlite3 traceback."""
        try:
            return self.db.execute(sql, args)
        except sqlite3.Error as e:
            raise _error(self.path, e) from None

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> Iterator[tuple[Any, ...]]:
        cur = self._execute(sql, args)
        try:
            yield from cur
        except sqlite3.Error as e:
            raise _error(self.path, e) from None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- runs ---------------------------------------------------------------------------------

    def begin_run(self, command: str, config: dict[str, Any], versions: dict[str, Any]) -> int:
        cur = self._execute(
            "INSERT INTO runs (started, command, config, versions) VALUES (?, ?, ?, ?)",
            (time.time(), command, _dump(config), _dump(versions)))
        assert cur.lastrowid is not None
        return cur.lastrowid

    def runs(self) -> list[dict[str, Any]]:
        rows = self._rows("SELECT run_id, started, command, config, versions FROM runs ORDER BY run_id")
        return [{"run_id": r[0], "started": r[1], "command": r[2], "config": json.loads(r[3]),
                 "versions": json.loads(r[4])} for r in rows]

    # --- cells --------------------------------------------------------------------------------

    def put_cell(self, cell: str, config: dict[str, Any], run_id: int | None = None) -> None:
        self._execute("INSERT OR IGNORE INTO cells (cell, config, run_id) VALUES (?, ?, ?)",
                        (cell, _dump(config), run_id))

    def set_recording(self, cell: str, recording: str | Path, record: dict[str, Any]) -> None:
        self._execute("UPDATE cells SET recording = ?, record = ? WHERE cell = ?",
                        (str(recording), _dump(record), cell))

    def cell(self, cell: str) -> CellRow | None:
        row = next(self._rows("SELECT cell, config, recording, record, run_id FROM cells WHERE cell = ?",
                              (cell,)), None)
        return _cell(row) if row else None

    def cells(self) -> list[CellRow]:
        rows = self._rows("SELECT cell, config, recording, record, run_id FROM cells ORDER BY cell")
        return [_cell(r) for r in rows]

    # --- states -------------------------------------------------------------------------------

    def put_state(self, cell: str, state_id: str, outcome: Outcome, detail: dict[str, Any],
                  run_id: int | None = None) -> bool:
        """Record one outcome, `detail` being its `CheckRecord.to_dict()`; False if this state of
        this cell was already recorded. A stored checker-error is replaced: it said nothing about
        the image, so a later check of it is the state's first result."""
        cur = self._execute(
            "INSERT INTO states (cell, state_id, outcome, detail, run_id, checked) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (cell, state_id) DO UPDATE SET outcome = excluded.outcome, "
            "detail = excluded.detail, run_id = excluded.run_id, checked = excluded.checked "
            "WHERE states.outcome = ?",
            (cell, state_id, str(outcome), _dump(detail), run_id, time.time(), str(Outcome.CHECKER_ERROR)))
        return cur.rowcount == 1

    def done(self, cell: str) -> set[str]:
        return {r[0] for r in self._rows("SELECT state_id FROM states WHERE cell = ?", (cell,))}

    def counts(self, cell: str) -> Counter[Outcome]:
        rows = self._rows(
            "SELECT outcome, count(*) FROM states WHERE cell = ? GROUP BY outcome", (cell,))
        return Counter({Outcome(o): n for o, n in rows})

    def states(self, cell: str | None = None, outcome: Outcome | None = None) -> Iterator[StateRow]:
        sql = "SELECT cell, state_id, outcome, detail, run_id FROM states WHERE 1"
        args: list[str] = []
        if cell is not None:
            sql, args = sql + " AND cell = ?", [*args, cell]
        if outcome is not None:
            sql, args = sql + " AND outcome = ?", [*args, str(outcome)]
        for r in self._rows(sql + " ORDER BY cell, state_id", args):
            yield _state(r)

    # --- whole store, as an export writes and reads it (crashlab.export) ----------------------

    def raw_states(self) -> Iterator[tuple[str, str, str, str, int | None, float]]:
        """Every state's row as stored (detail as its JSON text), in key order."""
        yield from self._rows("SELECT cell, state_id, outcome, detail, run_id, checked FROM states "
                              "ORDER BY cell, state_id")

    def restore(self, runs: list[dict[str, Any]], cells: list[CellRow],
                states: Iterator[tuple[str, str, str, str, int | None, float]]) -> None:
        """Fill an empty store with exported rows, run ids kept (cells and states name their runs),
        in one transaction: a store half restored is never left looking whole."""
        if any(next(self._rows(f"SELECT count(*) FROM {t}"))[0] for t in sorted(TABLES)):
            raise StoreError(f"{self.path}: not empty: restore only into a new store")
        self._execute("BEGIN")
        try:
            for r in runs:
                self._execute("INSERT INTO runs (run_id, started, command, config, versions) "
                              "VALUES (?, ?, ?, ?, ?)", (r["run_id"], r["started"], r["command"],
                                                         _dump(r["config"]), _dump(r["versions"])))
            for c in cells:
                self._execute("INSERT INTO cells (cell, config, recording, record, run_id) "
                              "VALUES (?, ?, ?, ?, ?)", (c.cell, _dump(c.config), c.recording,
                               _dump(c.record) if c.record is not None else None, c.run_id))
            for row in states:
                self._execute("INSERT INTO states (cell, state_id, outcome, detail, run_id, checked) "
                              "VALUES (?, ?, ?, ?, ?, ?)", row)
            self._execute("COMMIT")
        except BaseException:
            self._execute("ROLLBACK")
            raise

    def find_state(self, state_id: str) -> list[StateRow]:
        """Every cell's row for a crash-state id (an id names one image of one recorded log, so
        more than one row means the same state was checked in cells sharing a recording)."""
        rows = self._rows("SELECT cell, state_id, outcome, detail, run_id FROM states "
                          "WHERE state_id = ?", (state_id,))
        return [_state(r) for r in rows]


    # --- costs (crashlab.cost) -------------------------------------------------------------------
    # A store made before the table existed gets it when opened for writing (SCHEMA); read-only,
    # it has none, and holds no costs.

    def put_cost(self, cost: str, config: dict[str, Any], figures: dict[str, Any],
                 run_id: int | None = None) -> None:
        """Store a measurement, replacing an earlier one of the same key (`cost --again`)."""
        self._execute("INSERT OR REPLACE INTO costs (cost, config, figures, run_id, measured) "
                      "VALUES (?, ?, ?, ?, ?)", (cost, _dump(config), _dump(figures), run_id, time.time()))

    def cost(self, cost: str) -> CostRow | None:
        return next((r for r in self.costs() if r.cost == cost), None)

    def costs(self) -> list[CostRow]:
        has = next(self._rows("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'costs'"), None)
        if not has:
            return []
        rows = self._rows("SELECT cost, config, figures, run_id FROM costs ORDER BY cost")
        return [CostRow(r[0], json.loads(r[1]), json.loads(r[2]), r[3]) for r in rows]


def _validate_path(path: Path, readonly: bool) -> bool:
    """Refuse what cannot be a store before SQLite touches it (SQLite would take a directory's
    error for "unable to open", and turn an empty path into a new database); True if it exists."""
    try:
        st = path.stat()
    except FileNotFoundError:
        if readonly:
            raise StoreError(f"{path}: no results store (run `crashlab matrix` first)") from None
        return False
    except OSError as e:
        raise StoreError(f"{path}: cannot read the results store: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise StoreError(f"{path}: is a directory, not a results store")
    if not stat.S_ISREG(st.st_mode):
        raise StoreError(f"{path}: is not a regular file, not a results store")
    try:
        with path.open("rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except OSError as e:
        raise StoreError(f"{path}: cannot read the results store: {e.strerror}") from None
    if head != SQLITE_MAGIC and not (head == b"" and not readonly):
        raise StoreError(f"{path}: not a SQLite file, so not a results store")
    return True


def _open_readonly(path: Path) -> sqlite3.Connection:
    """A connection that cannot write. In a read-only directory a WAL store with no -wal file
    cannot be opened `mode=ro` (the reader would have to create -shm), but then no writer can be
    at work either (it would need -wal there), so the file alone is the whole store."""
    quoted = "file:" + urllib.parse.quote(path.absolute().as_posix())
    try:
        db = sqlite3.connect(f"{quoted}?mode=ro", uri=True)
        _require_store(path, db)
        return db
    except sqlite3.OperationalError as e:
        if not (e.sqlite_errorname or "").startswith("SQLITE_CANTOPEN") or Path(f"{path}-wal").exists():
            raise
    db = sqlite3.connect(f"{quoted}?immutable=1", uri=True)
    _require_store(path, db)
    return db


def _require_store(path: Path, db: sqlite3.Connection, allow_empty: bool = False) -> None:
    """Refuse a SQLite database that is someone else's: crashlab would add its tables to it."""
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not tables >= TABLES and not (allow_empty and not tables):
        db.close()
        raise StoreError(f"{path}: a SQLite database but not a results store "
                         f"(no {', '.join(sorted(TABLES - tables))} table)")


# What a SQLite error means for the user of a store, by SQLite's primary error name; others are
# passed on in SQLite's words.
SQLITE_ERRORS = {
    "SQLITE_FULL": "the disk is full",
    "SQLITE_READONLY": "the store is read-only",
    "SQLITE_CANTOPEN": "cannot open it (is its directory read-only?)",
    "SQLITE_NOTADB": "not a SQLite file, so not a results store",
    "SQLITE_CORRUPT": "the database file is damaged",
    "SQLITE_BUSY": "another process holds it locked",
}


def _error(path: Path, e: sqlite3.Error) -> StoreError:
    # Extended names (SQLITE_READONLY_DIRECTORY, SQLITE_IOERR_WRITE) narrow a primary one.
    name = e.sqlite_errorname or ""
    why = next((text for primary, text in SQLITE_ERRORS.items()
                if name == primary or name.startswith(primary + "_")), str(e))
    return StoreError(f"{path}: results store: {why}")


def _remove_new(path: Path) -> None:
    """Undo a store creation that failed (a full disk leaves a 0-byte file)."""
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        p.unlink(missing_ok=True)


def _dump(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _state(r: tuple[Any, ...]) -> StateRow:
    return StateRow(r[0], r[1], Outcome(r[2]), CheckRecord.from_dict(json.loads(r[3])), r[4])


def _cell(r: tuple[Any, ...]) -> CellRow:
    return CellRow(r[0], json.loads(r[1]), r[2], json.loads(r[3]) if r[3] else None, r[4])
