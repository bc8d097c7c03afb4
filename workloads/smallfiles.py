"""Mail spool: deliver small messages (create, write, fsync the file, fsync its directory), and now
and then expunge an old one (unlink, fsync the directory).

Promises: after a delivery, the message has exactly its content; after an expunge, it is gone.
"""

from __future__ import annotations

import os

from crashlab import oracle
from crashlab.workload import WorkloadContext, fsync_dir, write_file

FOLDERS = ("inbox", "archive")


def run(ctx: WorkloadContext) -> None:
    rng = ctx.rng
    for folder in FOLDERS:
        (ctx.root / folder).mkdir(exist_ok=True)
    fsync_dir(ctx.root)
    ctx.durable("spool-ready", [oracle.exists(f, "dir") for f in FOLDERS])

    spool: list[str] = []
    for n in range(24 * ctx.scale):
        if spool and rng.random() < 0.2:
            victim = spool.pop(rng.randrange(len(spool)))
            os.unlink(ctx.root / victim)
            fsync_dir((ctx.root / victim).parent)
            ctx.durable(f"expunge-{n}", [oracle.absent(victim)])
            continue
        name = f"{rng.choice(FOLDERS)}/msg{n:05d}"
        body = f"From: crashlab\nMessage-Id: {n}\n\n".encode() + rng.randbytes(rng.randint(200, 12000))
        write_file(ctx.root / name, body)
        fsync_dir((ctx.root / name).parent)
        spool.append(name)
        ctx.durable(f"deliver-{n}", [oracle.file_state(name, body)])
