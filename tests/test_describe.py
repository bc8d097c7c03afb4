"""describe_failure: what a human reads about a failing crash state (gate, pytest plugin, reproduce)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from fixture_logs import fixture_recording

from crashlab import campaign, gate
from crashlab.check.describe import FSCK_LINES, VIOLATIONS_SHOWN, describe_failure, exit_text
from crashlab.check.outcome import CheckRecord, Outcome, ToolRun
from crashlab.cli import cli
from crashlab.oracle import Violation, file_state
from crashlab.store import Store

FIXTURES = Path(__file__).parent / "data" / "logs"

FSCK_ARGV = ["e2fsck", "-f", "-n", "/tmp/my x.img"]


def fsck(rc: int | None, lines: int = 3, **kw: object) -> ToolRun:
    return ToolRun(FSCK_ARGV, rc, "".join(f"line {i}\n" for i in range(lines)), "e2fsck 1.47.0\n",
                   **kw)  # type: ignore[arg-type]


def record(outcome: Outcome, reason: str = "why", **kw: object) -> CheckRecord:
    return CheckRecord("abc-e12-r34", "/tmp/my x.img", "ext4", outcome, reason, "host", **kw)  # type: ignore[arg-type]


def stored(rec: CheckRecord) -> CheckRecord:
    return CheckRecord.from_dict(json.loads(json.dumps(rec.to_dict())))


@pytest.mark.parametrize("rc", [0, 1, 4, 12])
def test_fsck_line_carries_the_real_exit_code(rc: int) -> None:
    lines = describe_failure(record(Outcome.FS_INCONSISTENT, fsck=fsck(rc)))
    assert f"  fsck: e2fsck -f -n '/tmp/my x.img' -> exit {rc}" in lines
    assert not any("None" in line for line in lines)


def test_fsck_output_is_cut_after_the_first_lines_and_says_how_many_were_cut() -> None:
    n = FSCK_LINES + 15
    lines = describe_failure(record(Outcome.FS_INCONSISTENT, fsck=fsck(4, lines=n)))
    assert "    line 0" in lines and f"    line {FSCK_LINES - 1}" in lines
    assert f"    line {FSCK_LINES}" not in lines
    assert f"    ... {n + 1 - FSCK_LINES} more line(s)" in lines  # + 1: stderr's version line
    everything = describe_failure(record(Outcome.FS_INCONSISTENT, fsck=fsck(4, lines=n)), output_lines=None)
    assert f"    line {n - 1}" in everything and "    e2fsck 1.47.0" in everything


@pytest.mark.parametrize(("run", "text"), [
    (ToolRun(["e2fsck"], 0), "exit 0"),
    (ToolRun(["e2fsck"], 8), "exit 8"),
    (ToolRun(["e2fsck"], -9), "killed by signal 9"),
    (ToolRun(["e2fsck"], None, seconds=30.04, timed_out=True), "no exit: killed after 30.0 s"),
    (ToolRun(["e2fsck"], None, missing=True), "not found"),
    (ToolRun(["e2fsck"], None, error="guest died"), "no exit: guest died"),
])
def test_exit_text(run: ToolRun, text: str) -> None:
    assert exit_text(run) == text


def violations(n: int) -> list[Violation]:
    return [Violation(f"inbox/msg{i}", {**file_state(f"inbox/msg{i}", b"mail"), "marker": f"deliver-{i}",
                                        "seq": i}, "no entry") for i in range(n)]


def test_violations_are_listed_up_to_a_limit() -> None:
    n = VIOLATIONS_SHOWN + 2
    rec = record(Outcome.DATA_LOSS, f"{n} promise(s) broken", fsck=fsck(0), violations=violations(n))
    lines = describe_failure(rec)
    assert lines[0] == f"crash state abc-e12-r34: data-loss ({n} promise(s) broken)"
    assert "  violation: inbox/msg0: no entry (file promised at deliver-0)" in lines
    assert sum(line.startswith("  violation: ") for line in lines) == VIOLATIONS_SHOWN
    assert "  ... 2 more violation(s)" in lines
    assert sum(line.startswith("  violation: ") for line in describe_failure(rec, violations=None)) == n
    assert "  fsck: e2fsck -f -n '/tmp/my x.img' -> exit 0" in lines


def test_a_stored_record_reads_as_the_fresh_one() -> None:
    replay = ToolRun(["e2fsck", "-E", "journal_only"], 1)
    rec = record(Outcome.DATA_LOSS, "3 promise(s) broken", recovery=replay, fsck=fsck(0),
                 violations=[*violations(2), "a: missing"])
    assert describe_failure(stored(rec)) == describe_failure(rec)


def test_unmountable_shows_the_failed_recovery_since_no_fsck_ran() -> None:
    replay = ToolRun(["e2fsck", "-E", "journal_only", "-y", "x.img"], 12,
                     "Superblock has an invalid journal (inode 8).\n")
    lines = describe_failure(stored(record(Outcome.UNMOUNTABLE, "journal replay failed: e2fsck exit 12",
                                           recovery=replay)))
    assert lines[0] == "crash state abc-e12-r34: unmountable (journal replay failed: e2fsck exit 12)"
    assert "  recovery: e2fsck -E journal_only -y x.img -> exit 12" in lines
    assert "    Superblock has an invalid journal (inode 8)." in lines
    assert not any(line.startswith("  fsck:") for line in lines)


def test_a_refused_read_only_mount_is_shown_but_a_successful_one_is_not() -> None:
    ok = ToolRun(["mount", "-o", "ro"], 0, "tree dumped\n")
    refused = ToolRun(["mount", "-o", "ro"], 32, "", "mount: wrong fs type\n")
    lines = describe_failure(record(Outcome.UNMOUNTABLE, tree=refused, fsck=fsck(0)))
    assert "  read-only mount: mount -o ro -> exit 32" in lines and "    mount: wrong fs type" in lines
    fine = describe_failure(record(Outcome.FS_INCONSISTENT, tree=ok, fsck=fsck(4)))
    assert not any("read-only mount" in line for line in fine)


def test_a_record_without_reason_or_fsck_still_says_its_outcome() -> None:
    assert describe_failure(record(Outcome.CHECKER_ERROR, "")) == [
        "crash state abc-e12-r34: checker-error (no reason recorded)"]


# --- on real crash states of a real log, through the store and `crashlab reproduce` ----------------

@pytest.mark.skipif(os.geteuid() != 0, reason="host loop mounts need root")
def test_reproduce_and_the_gate_print_fscks_real_exit_code(tmp_path: Path) -> None:
    # Barriers off, everything volatile may be lost: states that break in every way there is.
    cell = campaign.Cell.parse({"fs": "ext4", "cache": "unsafe", "barrier": "off", "recorder": "dm",
                                "window": "inf"})
    rec = fixture_recording("ext4-dm-barrier-off.log.xz", tmp_path / "rec")
    store_path = tmp_path / "store.sqlite"
    ids = campaign.generate_states(cell, rec.out_dir, 6)
    with Store(store_path) as store:
        run = store.begin_run("test", {}, {})
        store.put_cell(cell.key, cell.config(), run)
        store.set_recording(cell.key, rec.out_dir, {})
        for r in campaign.run_check(campaign.CheckUnit(cell, str(rec.out_dir), tuple(ids), host_mount=True)):
            store.put_state(cell.key, r.state_id, r.outcome, r.detail, run)
        rows = list(store.states(cell.key))
    fscked = [r for r in rows if r.record.fsck is not None]
    assert fscked, "no crash state of the fixture got as far as fsck"
    for row in fscked:
        assert row.record.fsck is not None
        rc = row.record.fsck.rc
        assert isinstance(rc, int)
        fsck_line = re.compile(r"^  fsck: e2fsck .+ -> (.+)$", re.M)
        described = fsck_line.findall(gate.describe_state(row, store_path))
        assert described == [f"exit {rc}"]
        out = CliRunner().invoke(cli, ["reproduce", row.state_id, "--store", str(store_path), "--host-mount"])
        assert out.exit_code == 0, out.output
        assert f"crash state {row.state_id}: {row.outcome} ({row.record.reason})" in out.output
        assert fsck_line.findall(out.output) == [f"exit {rc}"]  # the state rebuilt gives what was stored
