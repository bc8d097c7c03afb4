"""What failed in a crash state, in words: the one description the gate, the pytest plugin and
`crashlab reproduce` print for a checked state.

Pure: a `CheckRecord` in, lines out. Each step that failed is shown with its command line, its real
exit status and the first lines of its output, because those are what a human acts on without the
store or the image at hand.
"""

from __future__ import annotations

import shlex
from typing import Any

from crashlab.check.outcome import CheckRecord, Outcome, ToolRun, violation_to_json

FSCK_LINES = 25  # enough for e2fsck's pass summary and its first complaints
VIOLATIONS_SHOWN = 5


def exit_text(run: ToolRun) -> str:
    """How a tool ended, as its exit status where it has one."""
    if run.missing:
        return "not found"
    if run.timed_out:
        return f"no exit: killed after {run.seconds:.1f} s"
    if run.rc is None:
        return f"no exit: {run.error}" if run.error else "no exit"
    if run.rc < 0:
        return f"killed by signal {-run.rc}"
    return f"exit {run.rc}"


def violation_text(v: Any) -> str:
    """One broken promise, the same whether fresh from the oracle or read back from the store."""
    v = violation_to_json(v)
    if not isinstance(v, dict):
        return str(v)
    promise = v.get("promise") or {}
    what = f"{promise.get('kind', '?')} promised at {promise.get('marker', '?')}" if promise else ""
    return f"{v.get('path', '?')}: {v.get('found', v.get('message', '?'))}" + (f" ({what})" if what else "")


def _run_lines(name: str, run: ToolRun, limit: int | None) -> list[str]:
    out = [f"  {name}: {shlex.join(run.argv)} -> {exit_text(run)}"]
    text = run.output.rstrip().splitlines()
    shown = text if limit is None else text[:limit]
    out += [f"    {line}" for line in shown]
    if len(text) > len(shown):
        out.append(f"    ... {len(text) - len(shown)} more line(s)")
    return out


def describe_failure(record: CheckRecord, *, output_lines: int | None = FSCK_LINES,
                     violations: int | None = VIOLATIONS_SHOWN) -> list[str]:
    """The outcome and its reason, the oracle's violations, the recovery step when it is what
    failed, and fsck's command, exit status and output. None as a limit: show everything."""
    out = [f"crash state {record.state_id}: {record.outcome} ({record.reason or 'no reason recorded'})"]
    shown = record.violations if violations is None else record.violations[:violations]
    out += [f"  violation: {violation_text(v)}" for v in shown]
    if len(record.violations) > len(shown):
        out.append(f"  ... {len(record.violations) - len(shown)} more violation(s)")
    if record.outcome is Outcome.UNMOUNTABLE:
        # No fsck after a failed recovery: the replay's or the mount's own words are all there is.
        if record.recovery is not None:
            out += _run_lines("recovery", record.recovery, output_lines)
        if record.tree is not None and record.tree.rc != 0:
            out += _run_lines("read-only mount", record.tree, output_lines)
    if record.fsck is not None:
        out += _run_lines("fsck", record.fsck, output_lines)
    return out
