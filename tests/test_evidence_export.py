"""results/ rebuilds to the digit: an export (crashlab export) holds every recording and outcome,
and every report made from it is byte for byte the one made from the store; the thread's claims
and a second run's comparison are computed from the numbers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from crashlab import campaign, claims, export, logformat, report
from crashlab.check.outcome import CheckRecord, Outcome
from crashlab.cli import EXIT_USAGE, cli
from crashlab.store import Store

RESULTS = Path(__file__).resolve().parent.parent / "results"


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def recording(where: Path, cell: campaign.Cell) -> Path:
    where.mkdir(parents=True)
    with logformat.LogWriter(where / "write.log", 4096) as w:
        for i in range(12):
            w.write(8 * i, bytes([i + 1]) * 4096)
            if i % 4 == 3:
                w.flush()
    (where / "promises.jsonl").write_text("")
    (where / "run.json").write_text(json.dumps({"config": {"recorder": "qemu", "cache": cell.cache.name},
                                                "versions": {"guest_kernel": "6.1.0"}}))
    (where / "console.log").write_text("booted\n")
    with (where / "data.img").open("wb") as f:
        f.truncate(1 << 20)
    return where


def make_store(path: Path, failures: dict[str, float], n: int = 60, seed: int = 0) -> Store:
    """A store of real cells (so claims find their pairs), each cell's failures drawn at the rate
    `failures` gives its cache/barrier (default 0)."""
    rng = random.Random(seed)
    store = Store(path)
    cells = campaign.Matrix(fs=("ext4",), cache=("writeback", "none", "writethrough"), barrier=("on", "off"),
                            workload=("smallfiles",)).cells()
    cells += campaign.Matrix(cache=("writeback", "none"), barrier=("off",), workload=("smallfiles",),
                             window=("1", "30", "inf")).cells()
    run_id = store.begin_run("crashlab matrix --states 60", {"states": n}, {"qemu": "7.2", "crashlab": "0"})
    for cell in cells:
        store.put_cell(cell.key, cell.config(), run_id)
        rec = path.parent / "recordings" / cell.recording_slug
        if not rec.exists():
            recording(rec, cell)
        store.set_recording(cell.key, rec, json.loads((rec / "run.json").read_text()))
        rate = failures.get(f"{cell.cache.name}/{campaign.barrier_name(cell.barrier)}/{cell.window}",
                            failures.get(f"{cell.cache.name}/{campaign.barrier_name(cell.barrier)}", 0.0))
        for i in range(n):
            outcome = Outcome.DATA_LOSS if rng.random() < rate else Outcome.CONSISTENT
            rec_ = CheckRecord(f"s{i}", f"s{i}.img", "ext4", outcome, "why", "userspace")
            store.put_state(cell.key, f"s{i:03}", outcome, rec_.to_dict(), run_id)
    return store


FAILURES = {"writeback/off": 0.5, "none/off": 0.4, "writeback/off/30": 0.7, "writeback/off/1": 0.1}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return make_store(tmp_path / "a" / "store.sqlite", FAILURES)


def files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_export_is_deterministic_and_keeps_the_logs_not_the_image(store: Store, tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    written = export.export(store, one)
    export.export(store, two)
    assert files(one) == files(two)
    slugs = {Path(c.recording or "").name for c in store.cells()}
    assert written == {"cells": len(store.cells()), "states": 60 * len(store.cells()),
                       "recordings": len(slugs), "runs": 1}
    assert sorted(p.name for p in (one / "logs").iterdir()) == sorted(f"{s}.tar.xz" for s in slugs)
    assert not any("data.img" in name for name in files(one))


def test_every_report_from_the_export_is_byte_for_byte_the_stores(store: Store, tmp_path: Path) -> None:
    export.export(store, tmp_path / "export")
    (tmp_path / "from-store").mkdir()
    (tmp_path / "from-export").mkdir()
    res = run("report", "--store", str(store.path), "--all", str(tmp_path / "from-store"))
    assert res.exit_code == 0, res.output
    res = run("report", "--from", str(tmp_path / "export"), "--all", str(tmp_path / "from-export"))
    assert res.exit_code == 0, res.output
    a, b = files(tmp_path / "from-store"), files(tmp_path / "from-export")
    assert set(a) == set(report.SHIPPED)  # window.png too: the store holds a sweep
    assert a == b


def test_a_restored_store_draws_the_same_states_from_the_unpacked_logs(store: Store, tmp_path: Path) -> None:
    export.export(store, tmp_path / "export")
    res = run("restore", str(tmp_path / "export"), "--store", str(tmp_path / "b" / "s.sqlite"))
    assert res.exit_code == 0, res.output
    with Store(tmp_path / "b" / "s.sqlite", readonly=True) as again:
        assert [c.config for c in again.cells()] == [c.config for c in store.cells()]
        for row in again.cells():
            original = store.cell(row.cell)
            assert original is not None and original.recording and row.recording
            rec = Path(row.recording)
            assert (rec / "data.img").stat().st_size == 1 << 20
            cell = campaign.Cell.from_config(row.config)
            assert campaign.generate_states(cell, rec, 5) == \
                campaign.generate_states(cell, Path(original.recording), 5)
    res = run("restore", str(tmp_path / "export"), "--store", str(tmp_path / "b" / "s.sqlite"))
    assert res.exit_code == EXIT_USAGE and "exists" in res.stderr


def test_claims_verdicts_follow_the_numbers(tmp_path: Path) -> None:
    with make_store(tmp_path / "x" / "s.sqlite", FAILURES) as s:
        found = {f.claim.quote: f for f in claims.evaluate(report.results(s))}
    goodbye = found["say goodbye to your filesystem"]
    assert len(goodbye.pairs) == 2  # writeback vs writethrough, barrier on and off (default window)
    assert goodbye.verdict.startswith("partly") and "off" in goodbye.verdict
    assert found["the host cache is just a big disk write cache"].verdict.startswith("supported")
    window = found["qemu caches data for far, far longer than a typical IDE disk"].verdict
    assert window.startswith("partly") and "1 of 2" in window and "writeback" in window  # none: 0.4 at both
    assert found["ext3 ships without barriers anyway"].verdict.startswith("not tested")
    # Other numbers, other words: writeback with barriers now fails too.
    with make_store(tmp_path / "y" / "s.sqlite", {**FAILURES, "writeback/on": 0.5}) as s:
        found = {f.claim.quote: f for f in claims.evaluate(report.results(s))}
    assert found["say goodbye to your filesystem"].verdict.startswith("supported")
    assert found["the host cache is just a big disk write cache"].verdict.startswith("contradicted")


def test_compare_runs_names_the_cells_that_differ(tmp_path: Path) -> None:
    first = make_store(tmp_path / "1" / "s.sqlite", FAILURES, seed=1)
    same = make_store(tmp_path / "2" / "s.sqlite", FAILURES, seed=2)
    other = make_store(tmp_path / "3" / "s.sqlite", {**FAILURES, "none/on": 0.6}, seed=3)
    for s in (first, same, other):
        s.close()
    res = run("compare-runs", str(first.path), str(same.path))
    assert res.exit_code == 0, res.output
    assert "0 of 12 cells differ significantly" in res.stdout
    export.export(Store(other.path, readonly=True), tmp_path / "exp")
    res = run("compare-runs", str(first.path), str(tmp_path / "exp"), "-o", str(tmp_path / "cmp.txt"))
    assert res.exit_code == 0, res.output
    text = (tmp_path / "cmp.txt").read_text()
    assert "1 of 12 cells differ significantly" in text and "cache=none barrier=on" in text.splitlines()[-1]


@pytest.mark.parametrize("args", [
    ["report", "--from", "/nonexistent/export"],
    ["compare-runs", "/nonexistent/a.sqlite", "/nonexistent/b.sqlite"],
    ["restore", "/nonexistent/export", "--store", "/nonexistent/s.sqlite"],
])
def test_bad_export_input_is_one_line(args: list[str]) -> None:
    res = run(*args)
    assert res.exit_code == EXIT_USAGE, res.output
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_the_shipped_results_rebuild_byte_for_byte(tmp_path: Path) -> None:
    """What results/ ships, rebuilt from its export alone (results/README.md): every table and plot."""
    res = run("report", "--from", str(RESULTS), "--all", str(tmp_path))
    assert res.exit_code == 0, res.output
    rebuilt = files(tmp_path)
    assert {"report.txt", "report.md", "report.csv", "report.json", "rates.png"} <= set(rebuilt)
    for name, data in rebuilt.items():
        assert (RESULTS / name).read_bytes() == data, f"results/{name} differs from its rebuild"
