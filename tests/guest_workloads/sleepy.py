"""A test workload that fsyncs a file every 50 ms for `scale` seconds: long enough to be killed."""

from __future__ import annotations

import os
import time

from crashlab.workload import WorkloadContext


def run(ctx: WorkloadContext) -> None:
    end = time.monotonic() + ctx.scale
    i = 0
    with open(ctx.root / "sleepy", "wb") as f:
        while time.monotonic() < end:
            f.write(b"x" * 512)
            f.flush()
            os.fsync(f.fileno())
            ctx.durable(f"fsync-{i}", [])
            i += 1
            time.sleep(0.05)
