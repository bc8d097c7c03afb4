"""A minimal test workload: `4 * scale` small files, each written and fsynced, with a promise."""

from __future__ import annotations

import os

from crashlab.workload import WorkloadContext


def run(ctx: WorkloadContext) -> None:
    for i in range(4 * ctx.scale):
        path = ctx.root / f"f{i}"
        data = ctx.rng.randbytes(1000 + i)
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        ctx.durable(f"fsync-{i}", [{"kind": "size", "path": f"f{i}", "size": len(data)}])
    print(f"tiny: wrote {4 * ctx.scale} files")
