"""No durability points at all: creates, writes, renames, unlinks and directories, never a sync.

Promises nothing, so only fsck judges the result: it measures pure filesystem consistency (a
recovered filesystem must be consistent whatever the cache lost).
"""

from __future__ import annotations

import os

from crashlab.workload import WorkloadContext


def run(ctx: WorkloadContext) -> None:
    rng = ctx.rng
    dirs = [ctx.root / f"d{i}" for i in range(4)]
    for d in dirs:
        d.mkdir(exist_ok=True)
    files: list[os.PathLike[str]] = []
    for n in range(150 * ctx.scale):
        roll = rng.random()
        if files and roll < 0.15:
            os.unlink(files.pop(rng.randrange(len(files))))
        elif files and roll < 0.3:
            i = rng.randrange(len(files))
            dest = rng.choice(dirs) / f"r{n}"
            os.rename(files[i], dest)
            files[i] = dest
        else:
            path = rng.choice(dirs) / f"f{n}"
            with open(path, "wb") as f:
                f.write(rng.randbytes(rng.randint(0, 20000)))
            files.append(path)
