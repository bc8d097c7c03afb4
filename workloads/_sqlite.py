"""Shared body of sqlite_wal and sqlite_rollback: bank-style transactions on the real sqlite3.

Each transaction inserts rows, updates one and sometimes deletes one, then commits. The workload keeps
its own model of the table, so the promise (the rows after each commit) is not read back from the
database it is about.
"""

from __future__ import annotations

import sqlite3

from crashlab import oracle
from crashlab.workload import WorkloadContext, fsync_dir

DB = "bank.sqlite"
TABLE = "ledger"


def run(ctx: WorkloadContext, journal_mode: str, synchronous: str) -> None:
    rng = ctx.rng
    con = sqlite3.connect(ctx.root / DB, isolation_level=None)
    try:
        con.execute(f"PRAGMA journal_mode={journal_mode}")
        con.execute(f"PRAGMA synchronous={synchronous}")
        # Small pages and an eager checkpoint so the WAL is copied back into the database, and the
        # database file grows, within a CI-sized run.
        con.execute("PRAGMA wal_autocheckpoint=8")
        con.execute(f"CREATE TABLE {TABLE} (id INTEGER PRIMARY KEY, account TEXT, amount INTEGER, memo TEXT)")
        # sqlite syncs the directory when it creates a journal, not when it creates the database.
        fsync_dir(ctx.root)
        model: dict[int, list[object]] = {}
        ctx.durable("schema", [oracle.sqlite_rows(DB, TABLE, [], 0)])
        next_id = 1
        for txn in range(1, 20 * ctx.scale + 1):
            con.execute("BEGIN")
            for _ in range(rng.randint(1, 4)):
                row = [next_id, f"acct{rng.randrange(50)}", rng.randrange(-10**6, 10**6),
                       rng.randbytes(rng.randint(10, 1500)).hex()]
                con.execute(f"INSERT INTO {TABLE} VALUES (?, ?, ?, ?)", row)
                model[next_id] = row
                next_id += 1
            victim = rng.choice(list(model))
            delta = rng.randrange(1, 1000)
            con.execute(f"UPDATE {TABLE} SET amount = amount + ? WHERE id = ?", (delta, victim))
            model[victim][2] += delta  # type: ignore[operator]
            if len(model) > 3 and rng.random() < 0.3:
                gone = rng.choice(list(model))
                con.execute(f"DELETE FROM {TABLE} WHERE id = ?", (gone,))
                del model[gone]
            con.execute("COMMIT")
            ctx.durable(f"txn-{txn}", [oracle.sqlite_rows(DB, TABLE, [model[k] for k in sorted(model)], txn)])
    finally:
        con.close()
