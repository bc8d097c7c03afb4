"""SQLite with a rollback journal (journal_mode=DELETE): every committed transaction survives,
integrity_check ok.

synchronous=EXTRA, not FULL: in DELETE mode the commit point is the unlink of the journal, and only
EXTRA fsyncs the directory after it. With FULL a power cut soon after COMMIT may bring the journal
back and roll the transaction back, which SQLite documents as allowed, so promising the row would
blame the filesystem for SQLite's documented behaviour.

Promises: after each COMMIT returns, the ledger table holds exactly the committed rows (see _sqlite).
"""

from __future__ import annotations

from crashlab.workload import WorkloadContext
from workloads import _sqlite


def run(ctx: WorkloadContext) -> None:
    _sqlite.run(ctx, journal_mode="DELETE", synchronous="EXTRA")
