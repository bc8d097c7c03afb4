"""SQLite in WAL mode, synchronous=FULL: every committed transaction survives, integrity_check ok.

Promises: after each COMMIT returns, the ledger table holds exactly the committed rows (see _sqlite).
"""

from __future__ import annotations

from crashlab.workload import WorkloadContext
from workloads import _sqlite


def run(ctx: WorkloadContext) -> None:
    _sqlite.run(ctx, journal_mode="WAL", synchronous="FULL")
