"""run_matrix's scheduling with fake units (no guest): stored checker-errors are checked again,
states the checker could not check are counted by cause, the progress rate is the checking
phase's, and every state that is not consistent reaches the display as it arrives."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from crashlab import campaign, cluster
from crashlab.cachemodes import CACHE_MODES
from crashlab.campaign import Cell, CheckUnit, Progress, RecordUnit, StateResult
from crashlab.check.guest import FAULT_BOOT
from crashlab.check.outcome import CheckRecord, Outcome
from crashlab.cli import campaign as cli
from crashlab.store import Store

pytest_plugins = ["campaign_fakes"]
CELL = Cell(cache=CACHE_MODES["none"])
RECORD_S = 0.3  # a fake recording's seconds: long beside the fake checks


def result(state_id: str, outcome: Outcome, reason: str = "why", fault: str = "") -> StateResult:
    rec = CheckRecord(state_id, f"/tmp/{state_id}.img", "ext4", outcome, reason, "guest", checker_fault=fault)
    return StateResult(state_id, outcome, rec.to_dict())


class Fakes:
    """Units that run in this process: recordings that take RECORD_S, checks that take 10 ms a state
    and end as `outcomes` says (consistent otherwise); every check unit's ids are kept."""

    def __init__(self) -> None:
        self.outcomes: dict[str, tuple[Outcome, str, str]] = {}
        self.checked: list[tuple[str, ...]] = []

    def record(self, unit: RecordUnit) -> list[dict[str, Any] | str]:
        time.sleep(RECORD_S)
        for d in unit.out_dirs:
            Path(d).mkdir(parents=True)
            (Path(d) / "run.json").write_text("{}")
        return [{"recorded": c.key} for c in unit.cells]

    def check(self, unit: CheckUnit) -> list[StateResult]:
        self.checked.append(unit.state_ids)
        time.sleep(0.01 * len(unit.state_ids))
        return [result(i, *self.outcomes.get(i, (Outcome.CONSISTENT, "", ""))) for i in unit.state_ids]


@pytest.fixture
def fakes(install_fakes: Callable[[Fakes], None]) -> Fakes:
    f = Fakes()
    install_fakes(f)
    return f


def run(store: Store, tmp: Path, on: cluster.Cluster, seen: list[Progress] | None = None,
        **kw: Any) -> Progress:
    def snapshot(p: Progress) -> None:
        if seen is not None:
            seen.append(Progress(**{k: getattr(p, k) for k in vars(p)}))  # arrived is replaced, not cleared

    return campaign.run_matrix([CELL], 12, store, tmp, command="test", workers=1, unit_states=4,
                               on_progress=snapshot, on=on, **kw)


def test_stored_checker_errors_are_checked_again_and_counted_apart(fakes: Fakes, tmp_path: Path,
                                                                   inprocess: cluster.Cluster) -> None:
    fakes.outcomes = {"s03": (Outcome.CHECKER_ERROR, "recovery: checker guest failed (boot)", FAULT_BOOT),
                      "s05": (Outcome.CHECKER_ERROR, "fsck: e2fsck hung: killed after 5.0 s", ""),
                      "s07": (Outcome.DATA_LOSS, "1 promise(s) broken", "")}
    seen: list[Progress] = []
    with Store(tmp_path / "s.sqlite") as store:
        first = run(store, tmp_path, inprocess, seen)
        assert first.unchecked == Counter({FAULT_BOOT: 1, "fsck: e2fsck hung": 1})
        arrived = [(f.state_id, f.outcome, f.checker_fault) for p in seen for f in p.arrived]
        assert arrived == [("s03", Outcome.CHECKER_ERROR, FAULT_BOOT), ("s05", Outcome.CHECKER_ERROR, ""),
                           ("s07", Outcome.DATA_LOSS, "")]
        assert store.counts(CELL.key) == Counter({Outcome.CONSISTENT: 9, Outcome.CHECKER_ERROR: 2,
                                                  Outcome.DATA_LOSS: 1})
        # The same matrix again, the checker now working: only the two gaps are checked.
        fakes.outcomes, fakes.checked = {}, []
        again = run(store, tmp_path, inprocess)
        assert fakes.checked == [("s03", "s05")]
        assert (again.resumed, again.retried, again.checked, again.states_done) == (10, 2, 2, 12)
        assert not again.unchecked
        assert store.counts(CELL.key) == Counter({Outcome.CONSISTENT: 11, Outcome.DATA_LOSS: 1})
        # And once more: nothing left to check.
        fakes.checked = []
        assert run(store, tmp_path, inprocess).resumed == 12 and fakes.checked == []


def test_rate_and_eta_come_from_the_checking_phase_alone(fakes: Fakes, tmp_path: Path,
                                                          inprocess: cluster.Cluster) -> None:
    seen: list[Progress] = []
    t0 = time.monotonic()
    with Store(tmp_path / "s.sqlite") as store:
        prog = run(store, tmp_path, inprocess, seen)
    wall = time.monotonic() - t0
    assert prog.checked == 12 and prog.check_seconds >= 0.12
    # One worker: the wall clock holds the recording as well, which the rate must not average in.
    assert prog.check_seconds < wall - RECORD_S * 0.8
    assert prog.rate == pytest.approx(12 / prog.check_seconds) and prog.rate > 12 / wall
    assert all(p.eta is None for p in seen if not p.checked)
    etas = [p.eta for p in seen if p.checked]
    assert etas[-1] == 0 and all(e is not None and e > 0 for e in etas[:-1])
    assert seen[0].current == f"recording {CELL.label}"
    assert any(p.current == f"checking {CELL.label}" for p in seen)
    assert seen[0].total == 12 and prog.total == 12


def test_plain_progress_prints_each_failure_as_it_arrives_and_names_the_cell(
        capsys: pytest.CaptureFixture[str]) -> None:
    show = cli._progress_lines(cells=2, every_s=3600)
    p = Progress(cells=2, states=4, workers=2, recorded=1, states_total=4, unscheduled=1, states_done=4,
                 check_seconds=8.0, checked=4, current=f"checking {CELL.label}")
    p.arrived = [campaign.Finding(CELL, "d1-e5-r9", Outcome.FS_INCONSISTENT, "e2fsck exit 4:\n errors found")]
    show(p)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"fs-inconsistent: {CELL.label}: state d1-e5-r9: e2fsck exit 4: errors found"
    # 2 workers, 4 states in 8 worker-seconds: 1 state/s; 4 of 8 states left.
    assert err[1] == ("progress: cells recorded 1/2, states checked 4/8 (1.00 states/s, about 4 s of "
                      f"checking left); checking {CELL.label}")
    p.arrived = [campaign.Finding(CELL, "d1-e6-r1", Outcome.CHECKER_ERROR, "recovery: no result", FAULT_BOOT)]
    show(p)  # within every_s and nothing else changed: the failure alone
    assert capsys.readouterr().err.splitlines() == [
        f"checker-error: {CELL.label}: state d1-e6-r1: recovery: no result"]


def fake_matrix(prog: Progress) -> Callable[..., Progress]:
    def run_matrix(cells: list[Cell], states: int, store: Store, *a: Any, **kw: Any) -> Progress:
        return prog
    return run_matrix


@pytest.mark.parametrize(("prog", "code", "says"), [
    (Progress(), 0, None),
    (Progress(unchecked=Counter({FAULT_BOOT: 3, "fsck: e2fsck hung": 1})), cli.EXIT_UNCHECKED,
     f"error: 4 state(s) could not be checked: 3 {FAULT_BOOT}, 1 fsck: e2fsck hung; rerun the same "
     "command to retry them"),
    (Progress(failed_units=["record x: boom"], unchecked=Counter({FAULT_BOOT: 1})), cli.EXIT_FAILED_UNITS,
     "error: record x: boom"),
])
def test_matrix_exit_status_says_what_could_not_be_checked(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, prog: Progress, code: int, says: str | None) -> None:
    monkeypatch.setattr(campaign, "run_matrix", fake_matrix(prog))
    out = CliRunner().invoke(cli.run_command, ["-q", "--store", str(tmp_path / "s.sqlite")])
    assert out.exit_code == code, out.output
    assert (says in out.stderr) if says else not out.stderr


def test_the_exit_statuses_are_distinct_and_documented() -> None:
    assert len({0, cli.EXIT_FAILED_UNITS, 2, cli.EXIT_UNCHECKED}) == 4
    for command in (cli.matrix_command, cli.run_command):
        text = CliRunner().invoke(command, ["--help"]).output
        assert f"  {cli.EXIT_UNCHECKED}  some states could not be checked" in text
        assert f"  {cli.EXIT_FAILED_UNITS}  a recording or check unit failed" in text
