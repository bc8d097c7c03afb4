"""crashlab.cluster's pure parts and the driver's use of them, on Dask's in-process cluster: units
and bundles survive serialisation, a shipped recording is unpacked once per worker by digest, a
check unit that fails every try is stored as checker-error with its reason, and a record unit on
a remote worker brings its recording back to the client."""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from crashlab import campaign, cluster
from crashlab.cachemodes import CACHE_MODES
from crashlab.campaign import Cell, CheckUnit, RecordUnit, StateResult
from crashlab.check.outcome import CheckRecord, Outcome
from crashlab.cli import campaign as cli
from crashlab.cli import gate as gate_cli
from crashlab.cli import worker as worker_cli
from crashlab.store import Store

pytest_plugins = ["campaign_fakes"]
CELL = Cell(cache=CACHE_MODES["none"])


def recording(d: Path, log: bytes = b"log" * 1000) -> Path:
    d.mkdir(parents=True)
    (d / "write.log").write_bytes(log)
    (d / "run.json").write_text('{"recorder": "qemu"}')
    (d / "promises.jsonl").write_text("")
    with open(d / "data.img", "wb") as f:  # sparse, with data in the middle
        f.truncate(64 << 20)
        f.seek(8 << 20)
        f.write(b"x" * 4096)
    return d


@pytest.mark.parametrize(("text", "address"), [
    ("tcp://10.0.0.1:8786", "tcp://10.0.0.1:8786"), ("sched:9000", "tcp://sched:9000"),
    ("sched", "tcp://sched:8786"), ("tls://[::1]:1", "tls://[::1]:1")])
def test_scheduler_addresses(text: str, address: str) -> None:
    assert cluster.parse_address(text) == address


@pytest.mark.parametrize("text", ["", "http://x:1", "x:99999", "a b:1", "x:port"])
def test_bad_scheduler_addresses_say_what_is_expected(text: str) -> None:
    with pytest.raises(cluster.ClusterError, match="expected tcp://HOST:PORT"):
        cluster.parse_address(text)


def test_a_bundle_round_trips_sparse_files_and_ships_holes_as_sizes(tmp_path: Path) -> None:
    src = recording(tmp_path / "rec")
    whole = cluster.pack(src)
    assert whole.nbytes < 64 << 10  # the 64 MiB image is mostly holes: they are not shipped
    out = cluster.unpack(pickle.loads(pickle.dumps(whole)), tmp_path / "out")
    for name in ("write.log", "run.json", "promises.jsonl", "data.img"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert os.stat(out / "data.img").st_blocks * 512 < 1 << 20  # still sparse
    checks = cluster.pack(src, campaign.CHECK_FILES, holes=("data.img",))
    assert checks.holes == {"data.img": 64 << 20} and "data.img" not in checks.files
    # The digest names the content: the same files, the same digest; another log, another one.
    assert cluster.pack(src, campaign.CHECK_FILES, holes=("data.img",)).digest == checks.digest
    other = recording(tmp_path / "other", log=b"other")
    assert cluster.pack(other, campaign.CHECK_FILES, holes=("data.img",)).digest != checks.digest


def test_a_bundle_is_unpacked_once_per_worker_by_digest(tmp_path: Path) -> None:
    bundle = cluster.pack(recording(tmp_path / "rec"), campaign.CHECK_FILES, holes=("data.img",))
    first = cluster.cached(bundle, tmp_path / "cache")
    assert first.name == bundle.digest
    stamp = (first / "write.log").stat().st_mtime_ns
    time.sleep(0.01)
    assert cluster.cached(bundle, tmp_path / "cache") == first
    assert (first / "write.log").stat().st_mtime_ns == stamp  # not written again
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [bundle.digest]  # no partial left


def test_a_bundle_never_writes_outside_its_directory(tmp_path: Path) -> None:
    evil = cluster.Bundle("d", {"../escape": b""})
    with pytest.raises(ValueError, match="not a plain file name"):
        cluster.unpack(evil, tmp_path / "out")
    assert not (tmp_path / "escape").exists() and not (tmp_path / "out").exists()


def test_units_ask_for_qemu_only_when_they_boot_a_guest() -> None:
    xfs = Cell(fs="xfs")
    assert campaign.unit_resources(RecordUnit((CELL,), ("/r",))) == {"qemu": 1}
    assert campaign.unit_resources(CheckUnit(CELL, "/r", ("s",))) == {}  # ext4 in userspace
    assert campaign.unit_resources(CheckUnit(CELL, "/r", ("s",), checker="guest")) == {"qemu": 1}
    assert campaign.unit_resources(CheckUnit(xfs, "/r", ("s",))) == {"qemu": 1}
    assert campaign.unit_resources(CheckUnit(xfs, "/r", ("s",), host_mount=True)) == {}
    unit = CheckUnit(CELL, "/r", ("a", "b"), checker="guest")
    assert pickle.loads(pickle.dumps(unit)) == unit


def test_the_worker_command_runs_one_unit_a_worker_with_its_resources() -> None:
    argv = worker_cli.worker_argv("tcp://s:8786", 3, {"qemu": 1, "kvm": 1}, ("--name", "w"))
    assert argv[1:] == ["-m", "distributed.cli.dask_worker", "tcp://s:8786", "--nthreads", "1",
                        "--nworkers", "3", "--resources", "kvm=1,qemu=1", "--name", "w"]
    assert "--resources" not in worker_cli.worker_argv("tcp://s:8786", 1, {})


def test_a_bad_or_silent_scheduler_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    store = tmp_path / "s.sqlite"
    for args, says in [(["--scheduler", "http://x"], "expected tcp://HOST:PORT"),
                       (["--scheduler", "tcp://127.0.0.1:1"], "cannot connect"),
                       (["--scheduler", "s", "-j", "2"], "-j sizes the cluster started on this machine"),
                       (["--shared-recordings", str(tmp_path)], "--shared-recordings goes with --scheduler")]:
        out = CliRunner().invoke(cli.run_command, ["-q", *args, "--store", str(store)])
        assert out.exit_code == 2, out.output
        assert says in out.stderr and len(out.stderr.strip().splitlines()) == 1
    for args, says in [(["--scheduler", "http://x"], "expected tcp://HOST:PORT"),
                       (["--scheduler", "tcp://127.0.0.1:1"], "cannot connect"),
                       (["--scheduler", "s", "-j", "2"], "-j sizes the cluster started on this machine")]:
        out = CliRunner().invoke(gate_cli.command, [*args, "--store", str(store)])  # the gate, too
        assert out.exit_code == 2, out.output
        assert says in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not store.exists()
    toml = tmp_path / "m.toml"
    toml.write_text('scheduler = "http://nope"\n')
    with pytest.raises(campaign.CampaignError, match="scheduler 'http://nope': expected"):
        campaign.Matrix.from_toml(toml)
    toml.write_text('scheduler = "sched"\nshared_recordings = "/nfs/rec"\n')
    m = campaign.Matrix.from_toml(toml)
    assert (m.scheduler, m.shared_recordings) == ("tcp://sched:8786", "/nfs/rec")
    assert "sched" not in m.command()  # where it runs is not what it is


# --- the driver on Dask's in-process cluster ----------------------------------------------------

class Fakes:
    """Recordings with every file a check reads, checks that fail `fail` times then pass."""

    def __init__(self) -> None:
        self.fail = 0
        self.tries: list[tuple[str, ...]] = []
        self.recordings: list[str] = []

    def record(self, unit: RecordUnit) -> list[dict[str, Any] | str]:
        for d in unit.out_dirs:
            recording(Path(d))
        return [{} for _ in unit.out_dirs]

    def check(self, unit: CheckUnit) -> list[StateResult]:
        self.tries.append(unit.state_ids)
        self.recordings.append(unit.recording)
        if len(self.tries) <= self.fail:
            raise RuntimeError("the worker's disk is full")
        return [StateResult(i, Outcome.CONSISTENT,
                            CheckRecord(i, "", "ext4", Outcome.CONSISTENT, "ok", "userspace").to_dict())
                for i in unit.state_ids]


@pytest.fixture
def fakes(install_fakes: Callable[[Fakes], None]) -> Fakes:
    f = Fakes()
    install_fakes(f)
    return f


def test_a_check_unit_failing_every_try_is_stored_as_checker_error(fakes: Fakes, tmp_path: Path,
                                                                    inprocess: cluster.Cluster) -> None:
    fakes.fail = 99
    with Store(tmp_path / "s.sqlite") as store:
        prog = campaign.run_matrix([CELL], 2, store, tmp_path, command="t", unit_states=2, on=inprocess)
        assert fakes.tries == [("s00", "s01")] * (cluster.RETRIES + 1)
        assert not prog.failed_units and prog.unchecked == {campaign.FAULT_UNIT: 2}
        got = list(store.states(CELL.key))
        assert [(r.state_id, r.outcome) for r in got] == [(s, Outcome.CHECKER_ERROR) for s in ("s00", "s01")]
        assert "RuntimeError: the worker's disk is full" in got[0].record.reason
        fakes.fail, fakes.tries = 0, []  # the next run checks them again
        again = campaign.run_matrix([CELL], 2, store, tmp_path, command="t", unit_states=2, on=inprocess)
        assert again.retried == 2 and fakes.tries == [("s00", "s01")]
        assert {r.outcome for r in store.states(CELL.key)} == {Outcome.CONSISTENT}


def test_a_failure_then_a_success_stores_each_state_once(fakes: Fakes, tmp_path: Path,
                                                         inprocess: cluster.Cluster) -> None:
    fakes.fail = 1
    with Store(tmp_path / "s.sqlite") as store:
        prog = campaign.run_matrix([CELL], 4, store, tmp_path, command="t", unit_states=2, on=inprocess)
        assert len(fakes.tries) == 3 and prog.states_done == 4 and not prog.unchecked
        assert sorted(r.state_id for r in store.states(CELL.key)) == ["s00", "s01", "s02", "s03"]


def test_a_remote_worker_ships_the_recording_both_ways(fakes: Fakes, tmp_path: Path,
                                                       inprocess: cluster.Cluster) -> None:
    remote = cluster.Cluster(inprocess.client)  # as a scheduler elsewhere: no shared disk
    with Store(tmp_path / "s.sqlite") as store:
        prog = campaign.run_matrix([CELL], 4, store, tmp_path, command="t", unit_states=2, on=remote)
        assert prog.states_done == 4
    rec = tmp_path / "recordings" / CELL.recording_slug
    assert (rec / "write.log").read_bytes() == b"log" * 1000  # recorded on the worker, kept here
    assert (rec / "data.img").stat().st_size == 64 << 20
    # The checks read the worker's cached copy, one for both units, not the client's path.
    assert len(set(fakes.recordings)) == 1 and fakes.recordings[0] != str(rec)
    shipped = cluster.pack(rec, campaign.CHECK_FILES, holes=("data.img",))
    assert Path(fakes.recordings[0]).name == shipped.digest


@pytest.mark.parametrize("judge", [["--check-cmd", "e2fsck -fn {image}", "--read-only"], ["--count", "40"]],
                         ids=["check-cmd", "userspace"])
def test_crash_check_on_two_workers_judges_the_same_states_as_on_one(judge: list[str]) -> None:
    """`crash check -j 2` runs its slices on two threads (only a checker guest's on the local Dask
    cluster); -j 1 in this thread alone."""
    import json
    import subprocess
    import sys

    log = Path(__file__).parent / "data" / "logs" / "ext4-dm-barrier-on.log.xz"
    strategy = "prefix-fua" if "--check-cmd" in judge else "random"
    args = [sys.executable, "-m", "crashlab", "crash", "check", str(log), "--fs", "ext4", "--recorder", "dm",
            "--cache", "none", "--strategy", strategy, *judge, "--json"]
    one, two = (subprocess.run([*args, "-j", j], capture_output=True, text=True, timeout=600) for j in "12")
    assert one.returncode == two.returncode, one.stderr + two.stderr
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert (b["jobs"], a["jobs"]) == (2, 1) and a["states"] == b["states"] > 1
    assert a["outcomes"] == b["outcomes"] and a["failed"] == b["failed"]
    assert not two.stderr.strip(), two.stderr  # no executor chatter


def _long_unit(marker: str) -> str:
    """A unit waiting on a child process, as a check waits on QEMU or fsck."""
    import subprocess
    import tempfile

    d = tempfile.mkdtemp(prefix="unit-")  # in the worker's run directory
    Path(marker + ".started").touch()
    try:
        subprocess.run(["sleep", "300"], check=False)
        return "finished"
    finally:
        os.rmdir(d)
        Path(marker).write_text(d)


def test_closing_the_local_cluster_unwinds_running_units_and_leaves_nothing(tmp_path: Path) -> None:
    from crashlab import rundir

    before = {p.name for root in rundir.roots() for p in root.glob(rundir.PREFIX + "*")}
    marker = tmp_path / "unwound"
    t0 = time.monotonic()
    with cluster.connect(None, 1, resources={}) as c:
        fut = c.submit(_long_unit, str(marker))
        pid = next(iter(c.client.run(os.getpid).values()))
        deadline = time.monotonic() + 60
        while not Path(f"{marker}.started").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # the unit is in its `sleep`
        assert not fut.done()
    assert time.monotonic() - t0 < 60
    assert f"{rundir.PREFIX}{pid}-" in marker.read_text()  # its `finally` ran, in the worker's run dir
    left = {p.name for root in rundir.roots() for p in root.glob(rundir.PREFIX + "*")} - before
    assert not [n for n in left if n.startswith(f"{rundir.PREFIX}{pid}-")], left
    assert not Path(f"/proc/{pid}").exists()


def test_a_unit_no_worker_can_take_fails_at_once_instead_of_waiting(fakes: Fakes, tmp_path: Path) -> None:
    with cluster.connect(None, 1, processes=False, resources={}) as bare, \
            Store(tmp_path / "s.sqlite") as store:
        prog = campaign.run_matrix([CELL], 2, store, tmp_path, command="t", on=bare)
    assert prog.failed_units == [f"record {CELL.key}: no worker offers qemu: no qemu-system-x86_64 where "
                                 "the workers run (crashlab worker declares it where it finds one)"]
    assert prog.unscheduled == 0 and not fakes.tries
