"""The CI gate: may a proposed cache policy become the default?

A policy (cache mode + barrier setting, on one or more filesystems, under one workload) passes only
if no checked crash state of any of its cells was corrupt or lost fsynced data, and that is enough
evidence: zero observed failures is not zero risk, so each cell's exact 95 % upper bound on its
failure rate must be below `max_rate` (1 %: 299 states without a failure), or the gate is
inconclusive and says how many states would do. States the checker could not check (its guest did
not boot or was killed) are never evidence either way: they make the verdict inconclusive.

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

from crashlab import logformat, report, stats
from crashlab.cachemodes import CACHE_MODES
from crashlab.campaign import (
    CELL_OPTIONAL,
    CampaignError,
    Cell,
    Progress,
    barrier_name,
    generate_states,
    run_matrix,
)
from crashlab.check.describe import describe_failure
from crashlab.check.outcome import Outcome
from crashlab.store import StateRow, Store

EXIT_PASS = 0
EXIT_REFUSED = 1  # a state of the proposed policy was corrupt or lost fsynced data
EXIT_USAGE = 2  # a bad option (click and CrashlabError use 2)
EXIT_BLIND = 3  # the known-unsafe configuration showed no failure: the gate cannot see failures
EXIT_INCONCLUSIVE = 4  # states missing, not checked, or too few to bound the rate: no verdict either way

# The known-unsafe reference: only its fs, cache mode and barrier; the rest comes from the policy.
SENSITIVITY = Cell(fs="ext4", cache=CACHE_MODES["unsafe"], barrier=False)
DEFAULT_MAX_RATE = 0.01  # a pass bounds the failure rate below this at 95 %
# As many as can pass at the default max rate (299): fewer could never pass, whatever they showed.
DEFAULT_STATES = stats.states_needed(DEFAULT_MAX_RATE)
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
    max_rate: float = DEFAULT_MAX_RATE  # the 95 % upper bound of each cell's failure rate must be below

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
    """One cell's stored outcomes over the states asked for (its first `expected` ids)."""

    cell: Cell
    counts: Counter[Outcome]
    expected: int
    unchecked: Counter[str] = field(default_factory=Counter)  # checker-errors the checker caused, by why
    rows: tuple[StateRow, ...] = ()  # the stored states counted, when read from a store
    exhausted: bool = False  # its recording yields fewer distinct crash states than were asked

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
        """Checker-errors charged to the image (a hang mounting it, its oracle raising)."""
        return self.counts[Outcome.CHECKER_ERROR] - sum(self.unchecked.values())

    @property
    def failures(self) -> list[StateRow]:
        return worst_first([r for r in self.rows if r.outcome.is_failure])

    def describe(self) -> str:
        r = self.result
        text = (f"{names(self.cell)} "
                f"workload={self.cell.workload} window={self.cell.window_label}"
                + ("" if self.cell.strategy == "random" else f" strategy={self.cell.strategy}")
                + f": {rate_text(r.failed)} (corrupt {r.corrupt.k}, fsync data lost {r.lost.k})")
        extra = [f"{n} not checked: {why}" for why, n in sorted(self.unchecked.items())]
        extra += [f"{self.errors} {Outcome.CHECKER_ERROR} (not counted)"] if self.errors else []
        extra += [f"{self.missing} of {self.expected} states missing"] if self.missing else []
        return text + (f" [{'; '.join(extra)}]" if extra else "")


def names(cell: Cell) -> str:
    """What the gate varies, as a reader types it: `ext4 cache=none barrier=on`, and the disk,
    kernel and QEMU when they are not the defaults (a --before/--after pair may differ only there)."""
    extra = "".join(f" {k}={getattr(cell, k)}" for k, default in CELL_OPTIONAL.items()
                    if getattr(cell, k) != default and k != "modules")
    return f"{cell.fs} cache={cell.cache.name} barrier={barrier_name(cell.barrier)}{extra}"


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


def decide(policy: Sequence[CellCheck], sensitivity: CellCheck | None,
           max_rate: float = DEFAULT_MAX_RATE) -> Decision:
    """The verdict, in order of what the reader must act on first.

    A failure of the policy is definitive whatever else happened: a real crash state was corrupt
    or lost data, and the gate evidently can see failures. Otherwise a blind sensitivity check
    beats missing states, because rerunning cannot fix a blind gate but can fill in states. A pass
    then needs every asked state checked and each cell's 95 % upper bound below `max_rate`; per
    cell, because `--states` is per cell and a pooled bound would let one filesystem ride on
    another's states.
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
    gaps = [why for c in (*policy, *([sensitivity] if sensitivity else [])) if (why := gap(c))]
    if gaps:
        return Decision(EXIT_INCONCLUSIVE, "INCONCLUSIVE: " + "; ".join(gaps)
                        + "; rerun the same command to resume and retry them", lines)
    weak = [c for c in policy if c.failed.upper95 >= max_rate]
    if weak:
        need = stats.states_needed(max_rate)
        few = [c for c in weak if c.exhausted]
        # More --states cannot help a cell whose recording has no more distinct states to give.
        bigger = ("; " + ", ".join(names(c.cell) for c in few) + f": its recording yields only "
                  f"{', '.join(str(c.expected) for c in few)} distinct crash states, so it needs a larger "
                  "workload (a higher scale)") if few else ""
        return Decision(EXIT_INCONCLUSIVE, "INCONCLUSIVE: no failure, but too few states: "
                        + ", ".join(f"{names(c.cell)} {rate_text(c.failed)}" for c in weak)
                        + f", not below the max rate {percent(max_rate)}; {need} states per cell without "
                        "a failure would bound it below" + bigger, lines)
    note = "" if sensitivity is not None else " (sensitivity check skipped)"
    return Decision(EXIT_PASS, f"PASS: no crash state of the proposed policy was corrupt or lost fsynced "
                    f"data; {rate_text(pooled(policy))}, below the max rate {percent(max_rate)}{note}", lines)


def compare(before: Sequence[CellCheck], after: Sequence[CellCheck]) -> list[str]:
    """A proposed change, cell by cell (one per filesystem, in the same order): both failure rates
    and Fisher's exact two-sided p that they differ, Holm-adjusted when there are several cells."""
    tests = stats.compare_many([(b.failed, a.failed) for b, a in zip(before, after, strict=True)])
    lines = []
    for b, a, (p, q) in zip(before, after, tests, strict=True):
        holm = f", Holm-adjusted over {len(tests)} cells p = {q:.4g}" if len(tests) > 1 else ""
        verdict = "differ at 5 %" if q < 0.05 else "no significant difference at 5 %"
        lines.append(f"change   {b.cell.fs}: before {b.failed.k}/{b.failed.n}, after "
                     f"{a.failed.k}/{a.failed.n}; Fisher exact two-sided p = {p:.4g}{holm}: {verdict}")
    return lines


def gap(c: CellCheck) -> str:
    """Why a cell's states are not all evidence, or '' if they are."""
    why = [f"{n} state(s) not checked ({cause})" for cause, n in sorted(c.unchecked.items())]
    why += [f"{c.missing} of {c.expected} states missing"] if c.missing else []
    why += ["no state checkable"] if not c.failed.n and not why else []
    return f"{names(c.cell)}: {', '.join(why)}" if why else ""


def percent(rate: float) -> str:
    return f"{100 * rate:g} %"


def decide_sensitivity(reference: CellCheck) -> Decision:
    """The known-unsafe configuration alone: it passes only by failing."""
    lines = [f"sensitivity (must fail) {reference.describe()}"]
    r = reference.failed
    if r.k:
        return Decision(EXIT_PASS, f"SENSITIVE: the known-unsafe configuration failed in {r.k} of {r.n} "
                        "states, so this gate can see failures", lines)
    if r.n and not reference.missing and not reference.unchecked:
        return Decision(EXIT_BLIND, f"GATE BROKEN: the known-unsafe configuration showed no failure in "
                        f"{r.n} states, so this gate cannot see failures (blind crash model, a workload "
                        "without fsync promises, or too few states); its pass means nothing", lines)
    return Decision(EXIT_INCONCLUSIVE, "INCONCLUSIVE: the known-unsafe configuration has states missing or "
                    f"not checked ({gap(reference) or 'none checkable'}); rerun to resume", lines)


# --- what a failing state looks like in a report -------------------------------------------------

def reproduce_command(state_id: str, store_path: Path, host_mount: bool = False) -> str:
    argv = ["crashlab", "reproduce", state_id, "--store", str(store_path)]
    return shlex.join([*argv, "--host-mount"] if host_mount else argv)


def describe_state(row: StateRow, store_path: Path, host_mount: bool = False) -> str:
    """One failing crash state: what a CI log must show for a human to act without the store."""
    out = describe_failure(row.record)
    out.append(f"  reproduce: {reproduce_command(row.state_id, store_path, host_mount)}")
    return "\n".join(out)


def worst_first(rows: Sequence[StateRow]) -> list[StateRow]:
    """A corrupt filesystem before lost data: it is the one nobody can paper over."""
    severity = {Outcome.UNMOUNTABLE: 0, Outcome.FS_INCONSISTENT: 1, Outcome.DATA_LOSS: 2}
    return sorted(rows, key=lambda r: (severity.get(r.outcome, 3), r.state_id))


def check(store: Store, cell: Cell, states: int) -> CellCheck:
    """The cell's first `states` ids, as the matrix asked for them, and what is stored for each;
    rows of other ids (a bigger earlier run in the same store) are not counted. Without a readable
    recording the ids cannot be known: every state counts as missing."""
    row = store.cell(cell.key)
    try:
        ids = generate_states(cell, Path(row.recording), states) if row and row.recording else []
    except (OSError, logformat.InputError, CampaignError):
        ids = []
    asked = set(ids)
    rows = tuple(r for r in store.states(cell.key) if r.state_id in asked)
    unchecked = Counter(r.record.checker_fault for r in rows
                        if r.outcome is Outcome.CHECKER_ERROR and r.record.checker_fault)
    return CellCheck(cell, Counter(r.outcome for r in rows), len(ids) or states, unchecked, rows,
                     exhausted=0 < len(ids) < states)


# --- running -------------------------------------------------------------------------------------

def run_cells(cells: Sequence[Cell], states: int, store_path: Path, *, command: str,
              workers: int | None = None, host_mount: bool = False, unit_states: int | None = None,
              on_progress: Callable[[Progress], None] = lambda p: None,
              scheduler: str | None = None) -> Progress:
    """Run (or resume) the cells; recordings live beside the store, as for `crashlab matrix`, so a
    gate and a matrix sharing a store share recordings and outcomes."""
    unique = list(dict.fromkeys(cells))  # the sensitivity cell may be one of the policy's
    kw: dict[str, Any] = {} if unit_states is None else {"unit_states": unit_states}
    with Store(store_path) as store:
        return run_matrix(unique, states, store, store_path.parent, command=command, workers=workers,
                          host_mount=host_mount, on_progress=on_progress, scheduler=scheduler, **kw)
