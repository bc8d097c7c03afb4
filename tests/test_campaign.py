"""Campaigns end to end with real guests: a tiny matrix, a killed-and-resumed run, reproduce."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from crashlab import campaign

pytestmark = pytest.mark.guest

pytest_plugins = ["campaign_fakes"]
CRASHLAB = [sys.executable, "-m", "crashlab"]
TINY = ["--fs", "ext4", "--barrier", "on", "--workload", "smallfiles", "--seed", "7", "-q"]


def crashlab(*args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CRASHLAB, *args], capture_output=True, text=True, timeout=timeout, check=check)


@pytest.fixture(scope="session")
def results_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("campaign")


@pytest.fixture(scope="session")
def tiny_matrix(results_dir: Path) -> Path:
    """Two cells, four states each, checked in checker guests: the default, real path."""
    store = results_dir / "store.sqlite"
    crashlab("matrix", *TINY, "--cache", "writeback,unsafe", "--states", "4", "-j", "2",
             "--store", str(store))
    return store


def test_tiny_matrix_report_has_every_cell_and_counts_add_up(tiny_matrix: Path) -> None:
    out = json.loads(crashlab("report", "--store", str(tiny_matrix), "--format", "json").stdout)
    cells = {c["cache"]: c for c in out["cells"]}
    assert set(cells) == {"writeback", "unsafe"}
    for c in cells.values():
        assert c["states"] + c["checker-error"] == 4
        assert sum(c[o] for o in ("consistent", "data-loss", "fs-inconsistent", "unmountable")) == c["states"]
        assert c["checker-error"] == 0, "the checker guest failed on a real crash image"
    env = out["environment"]
    assert "QEMU" in env["qemu"] and env["crashlab"]
    mail = crashlab("report", "--store", str(tiny_matrix), "--format", "mail").stdout
    assert max(map(len, mail.splitlines())) <= 72
    assert "crashlab matrix" in mail and "--seed 7" in mail


def test_reproduce_rebuilds_the_same_outcome(tiny_matrix: Path, tmp_path: Path) -> None:
    with sqlite3.connect(tiny_matrix) as db:
        state_id, stored = db.execute(
            "SELECT state_id, outcome FROM states ORDER BY state_id LIMIT 1").fetchone()
    kept = tmp_path / "state.img"
    r = crashlab("reproduce", state_id, "--store", str(tiny_matrix), "--keep", str(kept), "--json")
    detail = json.loads(r.stdout)  # nothing but JSON on stdout; the hint goes to stderr
    assert detail["state_id"] == state_id
    assert detail["outcome"] == stored
    assert kept.stat().st_size > 0 and f"crashlab check {kept}" in r.stderr and "--state-id" in r.stderr


def test_killed_campaign_resumes_without_losing_or_double_counting(
        results_dir: Path, tagged: Callable[[str], list[str]]) -> None:
    store = results_dir / "resume.sqlite"
    args = ["run", *TINY, "--cache", "writeback", "--states", "30", "-j", "1", "--unit-states", "1",
            "--host-mount", "--store", str(store)]
    tag = f"CRASHLAB_TEST_TAG={os.getpid()}-{time.monotonic_ns()}"
    env = {**os.environ, tag.split("=")[0]: tag.split("=")[1]}
    proc = subprocess.Popen([*CRASHLAB, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            if store.exists() and _count(store) >= 5:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stdout.read()}"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, output
    before = _rows(store)
    assert 5 <= len(before) < 30, output
    assert not tagged(tag)
    assert not [m for m in Path("/proc/mounts").read_text().splitlines() if "crashlab" in m]

    crashlab(*args)
    after = _rows(store)
    assert len(after) == 30
    assert {k: v for k, v in after.items() if k in before} == before  # nothing redone or rewritten
    with sqlite3.connect(store) as db:
        assert db.execute("SELECT count(*), count(DISTINCT state_id) FROM states").fetchone() == (30, 30)


def _count(store: Path) -> int:
    try:
        with sqlite3.connect(store, timeout=1) as db:
            return db.execute("SELECT count(*) FROM states").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _rows(store: Path) -> dict[str, tuple[str, float]]:
    with sqlite3.connect(store) as db:
        return {r[0]: (r[1], r[2]) for r in db.execute("SELECT state_id, outcome, checked FROM states")}


def test_unknown_names_are_clear_errors() -> None:
    bad = crashlab("run", "--cache", "writebak", "--states", "1", "-q", "--store", os.devnull, check=False)
    assert bad.returncode == 2
    assert "valid modes: writeback, none, writethrough, directsync, unsafe" in bad.stderr
    with pytest.raises(campaign.CampaignError, match="xfs has no barrier=off"):
        campaign.Cell(fs="xfs", barrier=False).validate()
    with pytest.raises(campaign.CampaignError, match="unknown workload"):
        campaign.Cell(workload="nope").validate()
