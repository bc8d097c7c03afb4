"""Shrinking a failing workload: the smallest op sequence that still corrupts, found with real guests.

`still_fails(ops)` records the generated `ops` workload with exactly these ops in a guest, draws
crash states from the cell's model, checks them, and says whether any state was corrupt or lost
fsynced data. `crashlab.opgen.find_failing` drives it: hypothesis generates sequences, keeps the
first that fails, and shrinks it to one where no op can be removed. Every call boots guests, so the
example budget is the cost: about half a minute per example under TCG.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from crashlab import campaign, opgen
from crashlab.opgen import Op
from crashlab.record import record


def still_fails(cell: campaign.Cell, ops: list[Op], states: int, *, host_mount: bool = False,
                workdir: Path | None = None) -> list[campaign.StateResult]:
    """The failing crash states of `ops` run as `cell`'s workload (empty: it survived)."""

    cell = replace(cell, workload="ops")
    config = replace(cell.record_config(), params=(("ops", opgen.dumps(ops)),))
    with tempfile.TemporaryDirectory(prefix="crashlab-shrink-", dir=workdir) as tmp:
        rec = record(config, Path(tmp) / "rec")
        ids = campaign.generate_states(cell, rec.out_dir, states)
        unit = campaign.CheckUnit(cell, str(rec.out_dir), tuple(ids), host_mount)
        return [r for r in campaign.run_check(unit) if r.outcome.is_failure]


def shrink(cell: campaign.Cell, *, states: int, max_ops: int, examples: int, seed: int,
           host_mount: bool = False, on_example: Callable[[list[Op], bool], None] = lambda o, f: None
           ) -> list[Op] | None:
    """The minimal op sequence for which `cell` still shows a failing state, or None."""

    def predicate(ops: list[Op]) -> bool:
        failed = bool(still_fails(cell, ops, states, host_mount=host_mount))
        on_example(ops, failed)
        return failed

    return opgen.find_failing(predicate, max_ops=max_ops, max_examples=examples, seed=seed)
