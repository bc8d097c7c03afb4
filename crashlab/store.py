"""The results store: one SQLite file holding every run, cell and crash-state outcome.

SQLite in WAL mode, written as outcomes finish: each state's row is committed on its own, so a
Ctrl-C or a kill loses at most the states in flight, and a rerun of the same command finds what is
already done and skips it. A state's primary key is (cell, state id), so nothing is ever counted
twice whatever order workers finish in.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from crashlab.check.outcome import CheckRecord, Outcome

DEFAULT_PATH = Path("results") / "crashlab.sqlite"

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
"""


@dataclass(frozen=True, slots=True)
class StateRow:
    cell: str
    state_id: str
    outcome: Outcome
    record: CheckRecord  # the check as stored: outputs clipped, violations as JSON
    run_id: int | None


@dataclass(frozen=True, slots=True)
class CellRow:
    cell: str
    config: dict[str, Any]
    recording: str | None
    record: dict[str, Any] | None
    run_id: int | None


class Store:
    def __init__(self, path: str | Path = DEFAULT_PATH) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit: every statement is its own transaction, the unit of "nothing lost".
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=60)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- runs ---------------------------------------------------------------------------------

    def begin_run(self, command: str, config: dict[str, Any], versions: dict[str, Any]) -> int:
        cur = self.db.execute(
            "INSERT INTO runs (started, command, config, versions) VALUES (?, ?, ?, ?)",
            (time.time(), command, _dump(config), _dump(versions)))
        assert cur.lastrowid is not None
        return cur.lastrowid

    def runs(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT run_id, started, command, config, versions FROM runs ORDER BY run_id")
        return [{"run_id": r[0], "started": r[1], "command": r[2], "config": json.loads(r[3]),
                 "versions": json.loads(r[4])} for r in rows]

    # --- cells --------------------------------------------------------------------------------

    def put_cell(self, cell: str, config: dict[str, Any], run_id: int | None = None) -> None:
        self.db.execute("INSERT OR IGNORE INTO cells (cell, config, run_id) VALUES (?, ?, ?)",
                        (cell, _dump(config), run_id))

    def set_recording(self, cell: str, recording: str | Path, record: dict[str, Any]) -> None:
        self.db.execute("UPDATE cells SET recording = ?, record = ? WHERE cell = ?",
                        (str(recording), _dump(record), cell))

    def cell(self, cell: str) -> CellRow | None:
        row = self.db.execute("SELECT cell, config, recording, record, run_id FROM cells WHERE cell = ?",
                              (cell,)).fetchone()
        return _cell(row) if row else None

    def cells(self) -> list[CellRow]:
        rows = self.db.execute("SELECT cell, config, recording, record, run_id FROM cells ORDER BY cell")
        return [_cell(r) for r in rows]

    # --- states -------------------------------------------------------------------------------

    def put_state(self, cell: str, state_id: str, outcome: Outcome, detail: dict[str, Any],
                  run_id: int | None = None) -> bool:
        """Record one outcome, `detail` being its `CheckRecord.to_dict()`; False if this state of
        this cell was already recorded. A stored checker-error is replaced: it said nothing about
        the image, so a later check of it is the state's first result."""
        cur = self.db.execute(
            "INSERT INTO states (cell, state_id, outcome, detail, run_id, checked) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (cell, state_id) DO UPDATE SET outcome = excluded.outcome, "
            "detail = excluded.detail, run_id = excluded.run_id, checked = excluded.checked "
            "WHERE states.outcome = ?",
            (cell, state_id, str(outcome), _dump(detail), run_id, time.time(), str(Outcome.CHECKER_ERROR)))
        return cur.rowcount == 1

    def done(self, cell: str) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT state_id FROM states WHERE cell = ?", (cell,))}

    def counts(self, cell: str) -> Counter[Outcome]:
        rows = self.db.execute(
            "SELECT outcome, count(*) FROM states WHERE cell = ? GROUP BY outcome", (cell,))
        return Counter({Outcome(o): n for o, n in rows.fetchall()})

    def states(self, cell: str | None = None, outcome: Outcome | None = None) -> Iterator[StateRow]:
        sql = "SELECT cell, state_id, outcome, detail, run_id FROM states WHERE 1"
        args: list[str] = []
        if cell is not None:
            sql, args = sql + " AND cell = ?", [*args, cell]
        if outcome is not None:
            sql, args = sql + " AND outcome = ?", [*args, str(outcome)]
        for r in self.db.execute(sql + " ORDER BY cell, state_id", args):
            yield _state(r)

    def find_state(self, state_id: str) -> list[StateRow]:
        """Every cell's row for a crash-state id (an id names one image of one recorded log, so
        more than one row means the same state was checked in cells sharing a recording)."""
        rows = self.db.execute("SELECT cell, state_id, outcome, detail, run_id FROM states "
                               "WHERE state_id = ?", (state_id,))
        return [_state(r) for r in rows]


def _dump(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _state(r: tuple[Any, ...]) -> StateRow:
    return StateRow(r[0], r[1], Outcome(r[2]), CheckRecord.from_dict(json.loads(r[3])), r[4])


def _cell(r: tuple[Any, ...]) -> CellRow:
    return CellRow(r[0], json.loads(r[1]), r[2], json.loads(r[3]) if r[3] else None, r[4])
