"""The gate: its decision rules on counts, its failure descriptions, and the real command."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from crashlab import gate, logformat, stats
from crashlab.cachemodes import CACHE_MODES
from crashlab.campaign import CampaignError, Cell, generate_states
from crashlab.check.guest import FAULT_BOOT, FAULT_STOPPED
from crashlab.check.outcome import CheckRecord, Outcome, ToolRun
from crashlab.store import StateRow, Store

# --- decision logic (pure) ------------------------------------------------------------------------

POLICY = Cell(cache=CACHE_MODES["none"], barrier=True)
REFERENCE = gate.Policy().sensitivity_cell()
LOOSE = 0.7  # a max rate that 3 clean states (95 % upper bound 63.2 %) satisfy


def cc(expected: int = 4, cell: Cell = POLICY, unchecked: dict[str, int] | None = None,
       **counts: int) -> gate.CellCheck:
    outcomes = Counter({Outcome(k.replace("_", "-")): v for k, v in counts.items()})
    return gate.CellCheck(cell, outcomes, expected, Counter(unchecked or {}))


def test_clean_policy_with_a_failing_reference_passes_and_quotes_the_upper_bound() -> None:
    d = gate.decide([cc(consistent=4)], cc(cell=REFERENCE, consistent=1, data_loss=3), LOOSE)
    assert d.code == gate.EXIT_PASS and d.passed
    assert "0/4 failed" in d.verdict and "95 % upper bound 52.7 %" in d.verdict  # 1 - 0.05 ** (1/4)
    assert any(line.startswith("sensitivity") and "3/4 failed" in line for line in d.lines)


@pytest.mark.parametrize("bad", ["data_loss", "fs_inconsistent", "unmountable"])
def test_any_corrupt_or_lossy_state_refuses(bad: str) -> None:
    d = gate.decide([cc(consistent=4), cc(consistent=3, **{bad: 1})], cc(cell=REFERENCE, data_loss=4))
    assert d.code == gate.EXIT_REFUSED
    assert "1 crash state(s)" in d.verdict
    assert "all cells: 1/8 failed" in "\n".join(d.lines)


def test_checker_errors_are_not_failures_but_are_shown() -> None:
    d = gate.decide([cc(consistent=3, checker_error=1)], cc(cell=REFERENCE, data_loss=4), LOOSE)
    assert d.code == gate.EXIT_PASS
    assert "0/3 failed" in d.lines[0] and "1 checker-error" in d.lines[0]


def test_a_blind_reference_breaks_the_gate_even_when_the_policy_looks_clean() -> None:
    d = gate.decide([cc(consistent=4)], cc(cell=REFERENCE, consistent=4))
    assert d.code == gate.EXIT_BLIND
    assert "cannot see failures" in d.verdict


def test_a_real_policy_failure_outranks_a_blind_reference() -> None:
    # A failing state is evidence whatever the reference did: the gate plainly saw it.
    d = gate.decide([cc(data_loss=1, consistent=3)], cc(cell=REFERENCE, consistent=4))
    assert d.code == gate.EXIT_REFUSED


@pytest.mark.parametrize(("policy", "reference"), [
    (cc(consistent=2), cc(cell=REFERENCE, data_loss=4)),  # states never stored (a unit failed)
    (cc(checker_error=4), cc(cell=REFERENCE, data_loss=4)),  # nothing checkable
    (cc(consistent=4), cc(cell=REFERENCE, consistent=2)),  # a reference half run may yet fail
    (cc(consistent=4), cc(cell=REFERENCE)),
])
def test_missing_or_uncheckable_states_are_inconclusive_never_a_pass(policy: gate.CellCheck,
                                                                    reference: gate.CellCheck) -> None:
    assert gate.decide([policy], reference, LOOSE).code == gate.EXIT_INCONCLUSIVE


def test_no_sensitivity_passes_on_policy_alone_and_says_so() -> None:
    d = gate.decide([cc(consistent=4)], None, LOOSE)
    assert d.code == gate.EXIT_PASS and "sensitivity check skipped" in d.verdict


@pytest.mark.parametrize("max_rate", [0.01, 0.05, 0.2])
def test_a_pass_needs_the_bound_below_max_rate_and_says_how_many_states_would_do(max_rate: float) -> None:
    need = stats.states_needed(max_rate)
    ref = cc(cell=REFERENCE, data_loss=4)
    short = gate.decide([cc(expected=need - 1, consistent=need - 1)], ref, max_rate)
    assert short.code == gate.EXIT_INCONCLUSIVE
    assert f"{need} states per cell" in short.verdict and f"0/{need - 1} failed" in short.verdict
    enough = gate.decide([cc(expected=need, consistent=need)], ref, max_rate)
    assert enough.code == gate.EXIT_PASS, enough.verdict
    assert f"below the max rate {100 * max_rate:g} %" in enough.verdict


def test_the_default_max_rate_does_not_pass_a_handful_of_clean_states() -> None:
    d = gate.decide([cc(consistent=4)], cc(cell=REFERENCE, data_loss=4))
    assert d.code == gate.EXIT_INCONCLUSIVE and "95 % upper bound 52.7 %" in d.verdict


def test_a_cell_whose_recording_has_too_few_distinct_states_is_told_more_states_cannot_help() -> None:
    few = replace(cc(expected=124, consistent=124), exhausted=True)
    d = gate.decide([few], cc(cell=REFERENCE, data_loss=4), 0.01)
    assert d.code == gate.EXIT_INCONCLUSIVE
    assert "yields only 124 distinct crash states" in d.verdict and "larger workload" in d.verdict
    d = gate.decide([cc(expected=124, consistent=124)], cc(cell=REFERENCE, data_loss=4), 0.01)
    assert "distinct" not in d.verdict  # fewer asked: more states would do


def test_max_rate_holds_per_cell_not_pooled() -> None:
    # 0/299 and 0/60 pool to 0/359, bound below 1 %; the 60-state cell alone is not.
    big = cc(expected=299, consistent=299)
    small = cc(expected=60, cell=replace(POLICY, fs="xfs"), consistent=60)
    assert stats.rate(0, 359).upper95 < 0.01 <= stats.rate(0, 60).upper95
    d = gate.decide([big, small], None, 0.01)
    assert d.code == gate.EXIT_INCONCLUSIVE
    assert "xfs cache=none barrier=on 0/60" in d.verdict and "ext4 cache=none" not in d.verdict


def test_states_the_checker_could_not_check_are_inconclusive_with_the_cause() -> None:
    policy = cc(expected=4, consistent=3, checker_error=1, unchecked={FAULT_BOOT: 1})
    d = gate.decide([policy], cc(cell=REFERENCE, data_loss=4), LOOSE)
    assert d.code == gate.EXIT_INCONCLUSIVE
    assert f"1 state(s) not checked ({FAULT_BOOT})" in d.verdict and "retry" in d.verdict
    assert f"1 not checked: {FAULT_BOOT}" in d.lines[0] and "(not counted)" not in d.lines[0]
    # A reference that could not check its states is not shown blind: it may yet fail.
    ref = cc(cell=REFERENCE, consistent=3, checker_error=1, unchecked={FAULT_STOPPED: 1})
    assert gate.decide([cc(consistent=4)], ref, LOOSE).code == gate.EXIT_INCONCLUSIVE
    assert FAULT_STOPPED in gate.decide_sensitivity(ref).verdict


def test_a_cell_counts_exactly_its_first_n_states(tmp_path: Path) -> None:
    # A store shared with a bigger earlier run: only the states asked for are evidence.
    rec = tmp_path / "rec"
    rec.mkdir()
    with logformat.LogWriter(rec / "write.log") as w:
        for i in range(40):
            w.write(8 * i, bytes(4096))
            if i % 4 == 3:
                w.flush()
    (rec / "run.json").write_text(json.dumps({"config": {"recorder": "qemu", "cache": "none"}}))
    ids, first = generate_states(POLICY, rec, 12), generate_states(POLICY, rec, 4)
    assert len(ids) == 12 and set(first) < set(ids)
    with Store(tmp_path / "s.sqlite") as store:
        store.put_cell(POLICY.key, POLICY.config())
        store.set_recording(POLICY.key, rec, {})
        for i in ids:  # the states a 4-state gate asks for are clean, the bigger run's others are not
            outcome = Outcome.CONSISTENT if i in first else Outcome.DATA_LOSS
            store.put_state(POLICY.key, i, outcome, row(i, str(outcome)).record.to_dict())
        c = gate.check(store, POLICY, 4)
        assert (c.expected, c.counts, c.failures) == (4, Counter({Outcome.CONSISTENT: 4}), [])
        assert {r.state_id for r in c.rows} == set(first)
        c = gate.check(store, POLICY, 12)
        assert c.counts[Outcome.DATA_LOSS] == 8 and len(c.failures) == 8
        assert gate.check(store, POLICY, 20).missing == len(generate_states(POLICY, rec, 20)) - 12
        # Without its recording the ids cannot be known: nothing counts, everything is missing.
        (rec / "write.log").unlink()
        c = gate.check(store, POLICY, 4)
        assert (c.missing, c.rows) == (4, ())


def test_exit_codes_are_distinct() -> None:
    codes = [gate.EXIT_PASS, gate.EXIT_REFUSED, gate.EXIT_USAGE, gate.EXIT_BLIND, gate.EXIT_INCONCLUSIVE]
    assert len(set(codes)) == len(codes)


def test_policy_cells_and_the_reference_share_what_shapes_visibility() -> None:
    p = gate.Policy(Cell.parse(dict(cache="writeback", barrier="on", workload="append_log", seed=9,
                                    strategy="prefix", window="inf")), fs=("ext4", "xfs"))
    cells = p.cells()
    assert [(c.fs, c.cache.name, c.barrier, c.window) for c in cells] == [
        ("ext4", "writeback", True, "inf"), ("xfs", "writeback", True, "inf")]
    ref = p.sensitivity_cell()
    assert (ref.fs, ref.cache.name, ref.barrier, ref.window) == ("ext4", "unsafe", False, "default")
    assert (ref.workload, ref.seed, ref.strategy) == ("append_log", 9, "prefix")


def test_policy_refuses_what_cannot_be_tested_rather_than_dropping_it() -> None:
    with pytest.raises(CampaignError, match="xfs has no barrier=off"):
        gate.Policy(Cell(barrier=False), fs=("ext4", "xfs")).cells()
    with pytest.raises(CampaignError, match="writebak"):
        Cell.parse({"cache": "writebak"})


def row(state_id: str, outcome: str, reason: str = "", **detail: object) -> StateRow:
    rec = CheckRecord(state_id, "/tmp/x.img", "ext4", Outcome(outcome), reason, "host", **detail)  # type: ignore[arg-type]
    return StateRow("cell", state_id, Outcome(outcome), CheckRecord.from_dict(rec.to_dict()), 1)


def test_a_failing_state_description_has_id_outcome_fsck_and_a_runnable_reproduce_command() -> None:
    fsck = ToolRun(["e2fsck", "-f", "-n", "/tmp/x.img"], 4,
                   "Pass 1: Checking inodes\n" + "".join(f"line {i}\n" for i in range(40)), "e2fsck 1.47.0\n")
    violations = [{"path": f"inbox/msg{i}", "found": "no entry",
                   "promise": {"kind": "file", "marker": f"deliver-{i}"}} for i in range(7)]
    text = gate.describe_state(row("abc-e12-r34", "fs-inconsistent", reason="e2fsck exit 4: errors found",
                                   fsck=fsck, violations=violations), Path("/r/my store.sqlite"), True)
    lines = text.splitlines()
    assert lines[0] == "crash state abc-e12-r34: fs-inconsistent (e2fsck exit 4: errors found)"
    assert "  violation: inbox/msg0: no entry (file promised at deliver-0)" in lines
    assert "  ... 2 more violation(s)" in lines
    assert "  fsck: e2fsck -f -n /tmp/x.img -> exit 4" in lines
    assert "    Pass 1: Checking inodes" in lines and "    line 39" not in lines
    assert any(line.strip().endswith("more line(s)") for line in lines)
    cmd = lines[-1].removeprefix("  reproduce: ")
    assert shlex.split(cmd) == ["crashlab", "reproduce", "abc-e12-r34", "--store", "/r/my store.sqlite",
                                "--host-mount"]


def test_worst_first_puts_corruption_before_data_loss() -> None:
    rows = [row("a", "data-loss"), row("b", "fs-inconsistent"), row("c", "unmountable")]
    assert [r.state_id for r in gate.worst_first(rows)] == ["c", "b", "a"]


# --- the command, on real recordings ---------------------------------------------------------------

CRASHLAB = [sys.executable, "-m", "crashlab"]
# Few states, ext4 only, host mounts: the checker-guest path is tested in test_campaign.py.
# A max rate of 60 %: 4 clean states bound the rate below 52.7 %, enough to pass here.
CHEAP = ["--fs", "ext4", "--states", "4", "--max-rate", "60", "-j", "1", "--host-mount"]


@pytest.fixture(scope="session")
def gate_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One store for every gate and plugin test in the session (test_pytest_plugin.py computes the
    same path), so each cell is recorded and checked once."""
    d = tmp_path_factory.getbasetemp() / "crashlab-gate-store"
    d.mkdir(exist_ok=True)
    return d / "crashlab.sqlite"


def run_gate(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CRASHLAB, "gate", *CHEAP, "--store", str(store), *args], capture_output=True,
                          text=True, timeout=900)


@pytest.mark.guest
def test_gate_passes_cache_none_with_barriers(gate_store: Path) -> None:
    out = run_gate(gate_store, "--cache", "none", "--barrier", "on")
    assert out.returncode == gate.EXIT_PASS, out.stdout + out.stderr
    assert "policy   ext4 cache=none barrier=on workload=smallfiles window=1s: 0/4 failed" in out.stdout
    assert "95 % upper bound 52.7 %" in out.stdout
    assert "sensitivity (must fail) ext4 cache=unsafe barrier=off" in out.stdout
    assert out.stdout.rstrip().splitlines()[-1].startswith("PASS:")


@pytest.mark.guest
def test_gate_refuses_unsafe_without_barriers_naming_each_state(gate_store: Path) -> None:
    out = run_gate(gate_store, "--cache", "unsafe", "--barrier", "off", "--no-sensitivity")
    assert out.returncode == gate.EXIT_REFUSED, out.stdout + out.stderr
    cell = gate.Policy(Cell(cache=CACHE_MODES["unsafe"], barrier=False)).cells()[0]
    with Store(gate_store) as store:
        bad = gate.check(store, cell, 4).failures
    assert bad, "the unsafe cell failed no state, yet the gate refused it"
    for r in bad:
        assert f"crash state {r.state_id}: {r.outcome}" in out.stdout
        assert f"crashlab reproduce {r.state_id} --store {gate_store} --host-mount" in out.stdout
    assert "sensitivity" not in out.stdout
    assert out.stdout.rstrip().splitlines()[-1].startswith("REFUSED:")


@pytest.mark.guest
def test_gate_with_a_blind_model_says_it_is_broken(gate_store: Path) -> None:
    # Same cell as the reference: one recording serves policy and sensitivity check.
    out = run_gate(gate_store, "--cache", "unsafe", "--barrier", "off", "--strategy", "prefix")
    assert out.returncode == gate.EXIT_BLIND, out.stdout + out.stderr
    assert "GATE BROKEN" in out.stdout and "cannot see failures" in out.stdout


def test_gate_usage_errors_exit_2() -> None:
    out = subprocess.run([*CRASHLAB, "gate", "--fs", "ext4,xfs", "--barrier", "off", "--store", "/dev/null"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == gate.EXIT_USAGE and "xfs has no barrier=off" in out.stderr
    out = subprocess.run([*CRASHLAB, "gate", "--max-rate", "0", "--store", "/dev/null"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == gate.EXIT_USAGE and "--max-rate" in out.stderr and "Traceback" not in out.stderr
