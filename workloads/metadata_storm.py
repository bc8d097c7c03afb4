"""Metadata storm, fsstress-style: a seeded mix of creat, write, fallocate, truncate, link, rename,
unlink, mkdir, rmdir and xattrs over a few directories, with fsync of files and directories, fdatasync
and sync in between.

Promises (crashlab.opgen.Model, POSIX-strict): at each durability point, every path whose name
(and its parents' names) is durable is promised: exact content and xattrs where the data is durable
too, existence where only the name is, absence where its removal is durable; paths with a pending
name change are released. The run ends with a sync, which promises the whole final tree.
"""

from __future__ import annotations

from crashlab import opgen
from crashlab.workload import WorkloadContext

NAMESPACE = opgen.Namespace(
    dirs=("d0", "d1", "d0/d2", "d1/d3"),
    files=("f0", "f1", "d0/f2", "d0/f3", "d1/f4", "d1/f5", "d0/d2/f6", "d1/d3/f7"),
    offsets=(0, 512, 4096, 10000, 65536),
    sizes=(1, 700, 4096, 12288, 70000),
)

# Directory fsyncs are what make names durable: weigh them up so most paths get promised.
WEIGHTS = {**opgen.DEFAULT_WEIGHTS, "fsync": 4, "persist": 3}


def run(ctx: WorkloadContext) -> None:
    ops = opgen.random_ops(ctx.rng, 120 * ctx.scale, NAMESPACE, max_points=27 * ctx.scale, weights=WEIGHTS)
    # End on a sync so that the final state is promised in full: the strongest check of the run.
    opgen.execute([*ops, opgen.Op("sync")], ctx.root, ctx)
