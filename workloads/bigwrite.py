"""Large sequential write, the way backups and downloads land: 1 MiB writes, fdatasync after each.

Promises: after each fdatasync, the file starts with everything written so far (it may be longer:
the next chunk may be partly there).
"""

from __future__ import annotations

import hashlib
import os

from crashlab import oracle
from crashlab.workload import WorkloadContext, fsync_dir

FILE = "big.bin"
CHUNK = 1 << 20


def run(ctx: WorkloadContext) -> None:
    rng = ctx.rng
    path = ctx.root / FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.fsync(fd)
        fsync_dir(ctx.root)
        digest = hashlib.sha256()
        ctx.durable("created", [oracle.prefix(FILE, 0, digest.hexdigest())])
        size = 0
        for n in range(8 * ctx.scale):
            chunk = rng.randbytes(CHUNK)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
            os.fdatasync(fd)
            digest.update(chunk)
            size += len(chunk)
            ctx.durable(f"fdatasync-{n}", [oracle.prefix(FILE, size, digest.hexdigest())])
    finally:
        os.close(fd)
