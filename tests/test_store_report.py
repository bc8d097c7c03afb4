"""The results store and every report format, on outcomes written straight into a store."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path

import pytest

from crashlab import report
from crashlab.check.outcome import CheckRecord, Outcome, ToolRun
from crashlab.store import Store, StoreError

CELLS = {
    "ext4/writeback/on": ({"fs": "ext4", "cache": "writeback", "barrier": "on", "recorder": "qemu",
                           "workload": "smallfiles", "window": "30s"}, {"consistent": 30}),
    "ext4/unsafe/off": ({"fs": "ext4", "cache": "unsafe", "barrier": "off", "recorder": "qemu",
                         "workload": "smallfiles", "window": "30s"},
                        {"consistent": 18, "fs-inconsistent": 6, "unmountable": 2, "data-loss": 3,
                         "checker-error": 1}),
}


def checked(state_id: str, outcome: str) -> dict[str, object]:
    """What the campaign stores for a state: its check record."""
    fsck = ToolRun(["e2fsck", "-fn", f"{state_id}.img"], 4 if outcome == Outcome.FS_INCONSISTENT else 0)
    rec = CheckRecord(state_id, f"{state_id}.img", "ext4", Outcome(outcome), "why", "host", fsck=fsck)
    return rec.to_dict()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "r.sqlite")
    run = s.begin_run("crashlab matrix", {"seed": 1}, {"qemu": "7.2"})
    for cell, (config, outcomes) in CELLS.items():
        s.put_cell(cell, config, run)
        n = 0
        for outcome, count in outcomes.items():
            for _ in range(count):
                assert s.put_state(cell, f"s{n}", Outcome(outcome), checked(f"s{n}", outcome), run)
                n += 1
    return s


def test_store_is_wal_and_never_counts_a_state_twice(store: Store) -> None:
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert not store.put_state("ext4/writeback/on", "s0", Outcome.FS_INCONSISTENT,
                               checked("s0", "fs-inconsistent"))
    assert store.counts("ext4/writeback/on") == {"consistent": 30}
    assert len(store.done("ext4/unsafe/off")) == 30


def test_a_stored_checker_error_is_replaced_by_the_next_result_and_nothing_else_is(store: Store) -> None:
    cell = "ext4/unsafe/off"
    [gap] = [r.state_id for r in store.states(cell, Outcome.CHECKER_ERROR)]
    assert store.put_state(cell, gap, Outcome.CHECKER_ERROR, checked(gap, "checker-error"), 7)
    assert store.put_state(cell, gap, Outcome.DATA_LOSS, checked(gap, "data-loss"), 8)
    [row] = [r for r in store.find_state(gap) if r.cell == cell]
    assert (row.outcome, row.record.outcome, row.run_id) == (Outcome.DATA_LOSS, Outcome.DATA_LOSS, 8)
    assert not store.put_state(cell, gap, Outcome.CONSISTENT, checked(gap, "consistent"), 9)
    assert store.counts(cell)["checker-error"] == 0 and store.counts(cell)["data-loss"] == 4


def test_store_survives_reopen(store: Store) -> None:
    path = store.path
    store.close()
    with Store(path) as again:
        assert again.counts("ext4/unsafe/off")["unmountable"] == 2
        assert [r["command"] for r in again.runs()] == ["crashlab matrix"]
        rows = again.find_state("s3")
        assert {r.cell for r in rows} == set(CELLS)


def test_stored_rows_read_back_as_typed_check_records(store: Store) -> None:
    rows = list(store.states("ext4/unsafe/off", Outcome.FS_INCONSISTENT))
    assert len(rows) == 6
    for r in rows:
        assert r.outcome is Outcome.FS_INCONSISTENT and r.record.outcome is Outcome.FS_INCONSISTENT
        assert r.record.state_id == r.state_id and r.record.fsck and r.record.fsck.rc == 4
    assert set(store.counts("ext4/unsafe/off")) <= set(Outcome)


def test_rates_add_up(store: Store) -> None:
    cells = {c.cell: c for c in report.results(store)}
    unsafe = cells["ext4/unsafe/off"]
    assert unsafe.checked == 29  # the checker-error state is not counted
    assert (unsafe.corrupt.k, unsafe.lost.k, unsafe.failed.k) == (8, 3, 11)
    safe = cells["ext4/writeback/on"]
    assert safe.corrupt.k == 0 and safe.corrupt.upper95 == pytest.approx(0.0950, abs=1e-4)


def test_mail_fits_72_columns_and_names_everything(store: Store) -> None:
    text = report.mail(report.results(store), {"qemu": "QEMU emulator version 7.2.22", "kernel": "6.1.0"},
                       ["crashlab matrix --fs ext4 --cache writeback,unsafe --barrier on,off --seed 1"])
    assert max(len(line) for line in text.splitlines()) <= 72
    assert "unsafe" in text and "writeback" in text and "7.2.22" in text
    assert "8 28% [15,46]" in text  # 8 of 29 corrupt
    assert "crashlab matrix --fs ext4" in text
    assert "1 state(s) ended in checker-error" in text


def test_mail_never_cuts_a_value_to_fit() -> None:
    """A cell of 1000 states once read "100": columns are as wide as their values, and the counts
    before the rates go when the table would not fit."""
    def cell(fs: str, cache: str, counts: dict[Outcome, int]) -> report.CellResult:
        return report.CellResult(f"{fs}/{cache}", {"fs": fs, "cache": cache, "barrier": "off",
                                                   "workload": "metadata_storm"}, Counter(counts))
    cells = [cell("btrfs", "writethrough", {Outcome.CONSISTENT: 20}),
             cell("ext4", "none", {Outcome.FS_INCONSISTENT: 697, Outcome.DATA_LOSS: 250,
                                   Outcome.CONSISTENT: 53})]
    lines = report.mail(cells, {}, []).splitlines()
    assert max(len(line) for line in lines) <= 72
    row = next(line for line in lines if line.startswith("ext4"))
    assert row.split()[:5] == ["ext4", "none", "off", "metadata_storm", "1000"]
    assert "70% [67,72]" in row and "25% [22,28]" in row
    assert any(line.startswith("btrfs writethrough") for line in lines)


def test_csv_json_markdown_agree(store: Store) -> None:
    cells = report.results(store)
    rows = list(csv.DictReader(io.StringIO(report.csv_text(cells))))
    as_json = json.loads(report.json_text(cells))["cells"]
    assert [r["cache"] for r in rows] == [r["cache"] for r in as_json] == ["unsafe", "writeback"]
    for r, j in zip(rows, as_json, strict=True):
        assert int(r["states"]) == j["states"]
        assert sum(int(r[o]) for o in report.OUTCOMES) == j["states"] + j["checker-error"]
    md = report.markdown(cells)
    assert md.count("\n| ext4 |") == 2


def test_plot_writes_a_png(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "p.png"
    report.plot(report.results(store), out, "test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_uses_fisher(store: Store) -> None:
    cells = {c.cell: c for c in report.results(store)}
    text = report.compare(cells["ext4/writeback/on"], cells["ext4/unsafe/off"])
    assert "Fisher exact" in text and "p = 0.00" in text


def test_store_rejects_garbage_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"not a database" * 100)
    with pytest.raises(StoreError, match="not a SQLite file"):
        Store(bad)
    assert bad.read_bytes() == b"not a database" * 100


def test_long_commands_fold_into_lines_a_shell_still_reads() -> None:
    import shlex

    cmd = ("crashlab matrix --fs ext4 --cache writeback,none,writethrough,directsync,unsafe --barrier on,off "
           "--recorder qemu --workload smallfiles,nofsync --states 12 --seed 1")
    lines = report.shell_lines(cmd, 72, indent="  ")
    assert len(lines) > 1 and all(len(line) <= 72 for line in lines)
    assert all(line.endswith(" \\") for line in lines[:-1])
    assert shlex.split("\n".join(lines).replace("\\\n", " ")) == shlex.split(cmd)


def test_each_cell_says_how_many_states_bound_it_below_the_target(store: Store) -> None:
    clean, failing = (next(c for c in report.results(store) if c.cell == k)
                      for k in ("ext4/writeback/on", "ext4/unsafe/off"))
    need = report.stats.states_needed(report.TARGET_BOUND)
    assert (clean.states_for_bound, clean.bound_text) == (need, f"{need} ({need - 30} more)")
    assert (failing.states_for_bound, failing.bound_text) == (None, "-")  # a bound on zero does not apply
    assert f"| {need} ({need - 30} more) |" in report.markdown([clean])
    assert report.table_rows([clean])[0]["states_for_0.3pct"] == need


def test_windows_are_ordered_by_length_not_as_text() -> None:
    def cell(window: str, spec: str) -> report.CellResult:
        return report.CellResult(f"ext4/{window}", {"fs": "ext4", "cache": "writeback", "barrier": "off",
                                                    "workload": "mailserver", "window": window,
                                                    "window_spec": spec}, Counter({Outcome.CONSISTENT: 5}))
    windows = ["inf", "30s", "5s", "1s", "0.1s", "0s"]
    text = report.mail([cell(w, w.removesuffix("s")) for w in windows], {}, [])
    groups = [line.removeprefix("window=").rstrip(":") for line in text.splitlines()
              if line.startswith("window=")]
    assert groups == windows[::-1]
    assert "Volatility window(s): 0s, 0.1s, 1s, 5s, 30s, inf;" in text
