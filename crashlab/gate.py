"""The CI gate: may a proposed cache policy become the default?

A policy (cache mode + barrier setting, on one or more filesystems, under one workload) passes only
if no checked crash state of any of its cells was corrupt or lost fsynced data. Zero observed
failures is not zero risk, so the verdict always carries the exact 95 % upper bound on the rate.

A gate that cannot see failures passes everything, so by default it also runs a configuration
known to be unsafe (ext4, `cache=unsafe`, `barrier=off`, same workload, recorder, seed and crash
model): if that shows no failure either, the gate itself is broken (a blind durability model, a
workload without promises, too few states) and says so with its own exit code rather than passing.

The decision functions here are pure, over stored counts and rows; `run_cells` is the one place
that boots guests.
"""

from __future__ import annotations

import shlex
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from crashlab import report, stats
from crashlab.cachemodes import CACHE_MODES
from crashlab.campaign import CampaignError, Cell, Progress, barrier_name, run_matrix
from crashlab.check.describe import describe_failure
from crashlab.check.outcome import Outcome
from crashlab.store import StateRow, Store

EXIT_PASS = 0
EXIT_REFUSED = 1  # a state of the proposed policy was corrupt or lost fsynced data
EXIT_USAGE = 2  # a bad option (click and CrashlabError use 2)
EXIT_BLIND = 3  # the known-unsafe configuration showed no failure: the gate cannot see failures
EXIT_INCONCLUSIVE = 4  # states missing (a unit failed) or none checkable: no verdict either way

# The known-unsafe reference: only its fs, cache mode and barrier; the rest comes from the policy.
SENSITIVITY = Cell(fs="ext4", cache=CACHE_MODES["unsafe"], barrier=False)
DEFAULT_STATES = 32  # 0 of 32 bounds the failure rate below 9 % at 95 %
DEFAULT_CELL = Cell(cache=CACHE_MODES["none"])
STATES_DESCRIBED = 10  # in full; the rest by id, so a bad policy does not bury the verdict


@dataclass(frozen=True)
class Policy:
    """What the gate is asked about: a cell (cache mode, barrier, workload, recorder, window, seed,
    crash model) on each of `fs`, and the gate's own thresholds."""

    cell: Cell = DEFAULT_CELL  # its `fs` is replaced by each of `fs`
    fs: tuple[str, ...] = ("ext4",)
    states: int = DEFAULT_STATES  # crash states per cell
    sensitivity: bool = True  # also run the known-unsafe reference, which must fail

    def cells(self) -> list[Cell]:
        if not self.fs:
            raise CampaignError("name at least one filesystem")
        # A cell that cannot exist (xfs barrier=off) fails validation: refused rather than dropped,
        # since a gate silently checking fewer filesystems than asked would pass a policy nobody tested.
        return [replace(self.cell, fs=fs).validate() for fs in self.fs]

    def sensitivity_cell(self) -> Cell:
        """The known-unsafe reference: its own window (the host's dirty expiry), everything that
        shapes what the gate can see (workload, recorder, seed, crash model) from the policy."""
        return replace(self.cell, fs=SENSITIVITY.fs, cache=SENSITIVITY.cache, barrier=SENSITIVITY.barrier,
                       window="default").validate()


@dataclass(frozen=True)
class CellCheck:
    """One cell's stored outcomes against the number of states asked for."""

    cell: Cell
    counts: Counter[Outcome]
    expected: int

    @property
    def result(self) -> report.CellResult:
        return report.CellResult(self.cell.key, self.cell.config(), self.counts)

    @property
    def failed(self) -> stats.Rate:
        return self.result.failed

    @property
    def missing(self) -> int:
        return max(0, self.expected - sum(self.counts.values()))

    @property
    def errors(self) -> int:
        return self.counts[Outcome.CHECKER_ERROR]

    def describe(self) -> str:
        r = self.result
        text = (f"{names(self.cell)} "
                f"workload={self.cell.workload} window={self.cell.window_label}"
                + ("" if self.cell.strategy == "random" else f" strategy={self.cell.strategy}")
                + f": {rate_text(r.failed)} (corrupt {r.corrupt.k}, fsync data lost {r.lost.k})")
        extra = [f"{self.errors} {Outcome.CHECKER_ERROR} (not counted)"] if self.errors else []
        extra += [f"{self.missing} of {self.expected} states missing"] if self.missing else []
        return text + (f" [{'; '.join(extra)}]" if extra else "")


def names(cell: Cell) -> str:
    """What the gate varies, as a reader types it: `ext4 cache=none barrier=on`."""
    return f"{cell.fs} cache={cell.cache.name} barrier={barrier_name(cell.barrier)}"


def rate_text(r: stats.Rate) -> str:
    """The observed rate and the number a reader of '0 of n' needs: the exact 95 % upper bound."""
    if not r.n:
        return "no state checked"
    return f"{r.k}/{r.n} failed = {100 * r.value:.1f} %, 95 % upper bound {100 * r.upper95:.1f} %"


def pooled(checks: Sequence[CellCheck]) -> stats.Rate:
    k = sum(c.failed.k for c in checks)
    n = sum(c.failed.n for c in checks)
    return stats.rate(k, n)


@dataclass(frozen=True)
class Decision:
    code: int
    verdict: str
    lines: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.code == EXIT_PASS


def decide(policy: Sequence[CellCheck], sensitivity: CellCheck | None) -> Decision:
    """The verdict, in order of what the reader must act on first.

    A failure of the policy is definitive whatever else happened: a real crash state was corrupt
    or lost data, and the gate evidently can see failures. Otherwise a blind sensitivity check
    beats missing states, because rerunning cannot fix a blind gate but can fill in states.
    """
    lines = [f"policy   {c.describe()}" for c in policy]
    if len(policy) > 1:
        lines.append(f"policy   all cells: {rate_text(pooled(policy))}")
    if sensitivity is not None:
        lines.append(f"sensitivity (must fail) {sensitivity.describe()}")
    if any(c.failed.k for c in policy):
        bad = sum(c.failed.k for c in policy)
        return Decision(EXIT_REFUSED, f"REFUSED: {bad} crash state(s) of the proposed policy were corrupt "
                        "or lost fsynced data", lines)
    if sensitivity is not None and (blind := decide_sensitivity(sensitivity)).code == EXIT_BLIND:
        return Decision(EXIT_BLIND, blind.verdict, lines)
    unsure = [c for c in (*policy, *([sensitivity] if sensitivity else [])) if c.missing or not c.failed.n]
    if unsure:
        return Decision(EXIT_INCONCLUSIVE, "INCONCLUSIVE: states missing or uncheckable in "
                        + ", ".join(names(c.cell) for c in unsure) + "; rerun the same command to resume",
                        lines)
    note = "" if sensitivity is not None else " (sensitivity check skipped)"
    return Decision(EXIT_PASS, f"PASS: no crash state of the proposed policy was corrupt or lost fsynced "
                    f"data; {rate_text(pooled(policy))}{note}", lines)


def decide_sensitivity(reference: CellCheck) -> Decision:
    """The known-unsafe configuration alone: it passes only by failing."""
    lines = [f"sensitivity (must fail) {reference.describe()}"]
    r = reference.failed
    if r.k:
        return Decision(EXIT_PASS, f"SENSITIVE: the known-unsafe configuration failed in {r.k} of {r.n} "
                        "states, so this gate can see failures", lines)
    if r.n and not reference.missing:
        return Decision(EXIT_BLIND, f"GATE BROKEN: the known-unsafe configuration showed no failure in "
                        f"{r.n} states, so this gate cannot see failures (blind crash model, a workload "
                        "without fsync promises, or too few states); its pass means nothing", lines)
    return Decision(EXIT_INCONCLUSIVE, "INCONCLUSIVE: the known-unsafe configuration has states missing or "
                    "uncheckable; rerun to resume", lines)


# --- what a failing state looks like in a report -------------------------------------------------

def reproduce_command(state_id: str, store_path: Path, host_mount: bool = False) -> str:
    argv = ["crashlab", "reproduce", state_id, "--store", str(store_path)]
    return shlex.join([*argv, "--host-mount"] if host_mount else argv)


def describe_state(row: StateRow, store_path: Path, host_mount: bool = False) -> str:
    """One failing crash state: what a CI log must show for a human to act without the store."""
    out = describe_failure(row.record)
    out.append(f"  reproduce: {reproduce_command(row.state_id, store_path, host_mount)}")
    return "\n".join(out)


def failures(store: Store, cell: Cell) -> list[StateRow]:
    return worst_first([r for r in store.states(cell.key) if r.outcome.is_failure])


def worst_first(rows: Sequence[StateRow]) -> list[StateRow]:
    """A corrupt filesystem before lost data: it is the one nobody can paper over."""
    severity = {Outcome.UNMOUNTABLE: 0, Outcome.FS_INCONSISTENT: 1, Outcome.DATA_LOSS: 2}
    return sorted(rows, key=lambda r: (severity.get(r.outcome, 3), r.state_id))


def check(store: Store, cell: Cell, states: int) -> CellCheck:
    return CellCheck(cell, store.counts(cell.key), states)


# --- running -------------------------------------------------------------------------------------

def run_cells(cells: Sequence[Cell], states: int, store_path: Path, *, command: str,
              workers: int | None = None, host_mount: bool = False, unit_states: int | None = None,
              on_progress: Callable[[Progress], None] = lambda p: None) -> Progress:
    """Run (or resume) the cells; recordings live beside the store, as for `crashlab matrix`, so a
    gate and a matrix sharing a store share recordings and outcomes."""
    unique = list(dict.fromkeys(cells))  # the sensitivity cell may be one of the policy's
    kw: dict[str, Any] = {} if unit_states is None else {"unit_states": unit_states}
    with Store(store_path) as store:
        return run_matrix(unique, states, store, store_path.parent, command=command, workers=workers,
                          host_mount=host_mount, on_progress=on_progress, **kw)
