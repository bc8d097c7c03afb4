"""A given bounded op sequence (crashlab.opgen): what shrunk reproducers and generated ACE-style
workloads run.

The sequence comes from `--param ops=FILE` (or CRASHLAB_PARAM_OPS=FILE), or the JSON itself, as written by
`crashlab.opgen.dumps`; without it, a sequence of 12 * scale ops is drawn from the seed, then a
sync. Promises:
as metadata_storm (crashlab.opgen.Model).
"""

from __future__ import annotations

from pathlib import Path

from crashlab import opgen
from crashlab.workload import WorkloadContext


def run(ctx: WorkloadContext) -> None:
    source = ctx.param("ops")
    if source:
        # Inline JSON needs no file the guest can see; anything else names a file.
        ops = opgen.loads(source if source.lstrip().startswith("[") else Path(source).read_text())
    else:
        # ACE ends every workload on a persistence point; a sync promises the whole final tree.
        ops = [*opgen.random_ops(ctx.rng, 12 * ctx.scale, opgen.ACE), opgen.Op("sync")]
    opgen.execute(ops, ctx.root, ctx)
