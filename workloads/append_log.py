"""Write-ahead log: one checksummed record per transaction, appended and fdatasync'd before the
transaction is acknowledged.

Promises: after transaction n is acknowledged, a reader finds at least the first n records, exactly
as written; any further record it accepts as valid must be one the workload wrote (a torn record
must fail its checksum). Record format: crashlab.oracle.log_record.
"""

from __future__ import annotations

import os

from crashlab import oracle
from crashlab.workload import WorkloadContext, fsync_dir

LOG = "wal.log"


def run(ctx: WorkloadContext) -> None:
    rng = ctx.rng
    path = ctx.root / LOG
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        # The log's name must be durable before any record is acknowledged.
        os.fsync(fd)
        fsync_dir(ctx.root)
        chain = oracle.LOG_CHAIN_START
        ctx.durable("log-created", [oracle.log_prefix(LOG, 0, chain)])
        for n in range(25 * ctx.scale):
            # Sizes straddle 4 KiB blocks so a torn append can cut a record in the middle.
            payload = f"txn {n}:".encode() + rng.randbytes(rng.randint(16, 6000))
            os.write(fd, oracle.log_record(n, payload))
            os.fdatasync(fd)
            chain = oracle.log_chain(chain, payload)
            ctx.durable(f"commit-{n}", [oracle.log_prefix(LOG, n + 1, chain)])
    finally:
        os.close(fd)
