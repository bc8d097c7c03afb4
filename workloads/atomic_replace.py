"""Atomic replace, the way editors and config managers save: write a temp file, fsync it, rename it
over the target, fsync the directory.

Promises: after each replace the target holds exactly the new version; until the next replace's
point it may hold the old or the new one (the oracle's next-point rule), never an empty, truncated or
mixed file.
"""

from __future__ import annotations

import os

from crashlab import oracle
from crashlab.workload import WorkloadContext, fsync_dir, write_file

TARGETS = ("app.conf", "state.json", "index.db")


def run(ctx: WorkloadContext) -> None:
    rng = ctx.rng
    for n in range(20 * ctx.scale):
        target = rng.choice(TARGETS)
        # Versions differ in size and content so mixed or stale data is always detectable.
        body = f"version {n} of {target}\n".encode() + rng.randbytes(rng.randint(1, 6) * 1500)
        tmp = ctx.root / f".{target}.tmp"
        write_file(tmp, body)
        os.rename(tmp, ctx.root / target)
        fsync_dir(ctx.root)
        ctx.durable(f"replace-{n}", [oracle.file_state(target, body)])
