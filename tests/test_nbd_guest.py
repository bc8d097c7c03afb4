"""Guests on network storage, on real parts: a TCG guest whose disk is an NBD export of
qemu-storage-daemon in a pyroute2 namespace records a workload; crash states built from the server's
log check consistent with barriers; a server killed mid-workload is seen by the guest and reported;
and nothing is left behind, after a normal run or a `kill -9`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from crashlab import campaign, netns
from crashlab.cachemodes import CACHE_MODES
from crashlab.check.outcome import Outcome
from crashlab.guest.provision import Guest
from crashlab.netfaults import Fault, FaultConfig, inject
from crashlab.record import RecordConfig, Recording, record
from crashlab.recorders import Recorder

pytest_plugins = ["conftest_guest"]
GUEST_WORKLOADS = str(Path(__file__).parent / "guest_workloads")
pytestmark = [pytest.mark.guest,
              pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")]


def _config(**kw: object) -> RecordConfig:
    base = dict(cache=CACHE_MODES["writeback"], recorder=Recorder.QEMU, storage="nbd",
                accel=os.environ.get("CRASHLAB_ACCEL", "auto"), workload_path=(GUEST_WORKLOADS,),
                timeout_s=300)
    return RecordConfig(**{**base, **kw})  # type: ignore[arg-type]


def _storage_processes() -> list[int]:
    """qemu-storage-daemons serving an image of a crashlab run (by their command line)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"qemu-storage-daemon") and b"crashlab-nbd-" in b" ".join(argv):
            out.append(int(pid))
    return out


def _veths() -> list[str]:
    with IPRoute() as ipr:
        return [str(link.get("IFLA_IFNAME")) for link in ipr.get_links()
                if str(link.get("IFLA_IFNAME")).startswith("clh")]


def _nothing_left() -> None:
    assert netns.owned() == [] and _veths() == [] and _storage_processes() == []


@pytest.fixture(scope="session")
def nbd_recording(tmp_path_factory: pytest.TempPathFactory, guest: Guest) -> Recording:
    return record(_config(workload="smallfiles"), tmp_path_factory.mktemp("nbd") / "rec", guest=guest)


def test_a_guest_on_an_nbd_export_records_on_the_server(nbd_recording: Recording) -> None:
    run = nbd_recording.run
    served = run["options"]["nbd"]
    assert served["server"] == "qemu-storage-daemon" and served["log"] == str(nbd_recording.log)
    net = served["network"]
    assert net["host"]["kind"] == "veth" and net["ns"]["addresses"] == [f"{served['address']}/30"]
    assert any(f"server.host={served['address']}" in a for a in run["options"]["qemu_argv"])
    assert not any("blklogwrites" in a for a in run["options"]["qemu_argv"])  # the log is the server's
    s = nbd_recording.summary
    assert s["writes"] > 0 and s["flushes"] > 0 and s["fua"] == 0 and s["markers"] > 0
    assert run["config"]["storage"] == "nbd" and "qemu-storage-daemon" in run["versions"]
    _nothing_left()


def test_crash_states_of_the_servers_log_check_consistent_with_barriers(nbd_recording: Recording) -> None:
    cell = campaign.Cell(cache=CACHE_MODES["writeback"], barrier=True, workload="smallfiles", storage="nbd")
    rec_dir = Path(nbd_recording.out_dir)
    ids = campaign.generate_states(cell, rec_dir, 8)
    assert len(ids) == 8
    results = campaign.run_check(campaign.CheckUnit(cell, str(rec_dir), tuple(ids)))
    assert [r.outcome for r in results] == [Outcome.CONSISTENT] * 8, [r.detail.get("reason") for r in results]


def test_a_server_killed_mid_workload_is_seen_by_the_guest_and_reported(guest: Guest, tmp_path: Path) -> None:
    config = FaultConfig(_config(workload="sleepy", scale=3), (Fault.parse("server-kill@1s"),))
    res = inject(config, tmp_path / "kill", guest=guest)
    seen = res.seen
    assert seen["eio"] or seen["remounted_ro"], res.run["guest"].get("kernel")
    assert seen["workload_status"] != 0 and "Input/output error" in seen["workload_error"]
    assert [(a.fault, a.error) for a in res.applied] == [("server-kill@1s", "")]
    assert res.applied[0].at_s is not None and res.applied[0].at_s >= 1.0
    assert res.outcome in tuple(Outcome) and res.outcome is not Outcome.CHECKER_ERROR
    assert res.run["netfaults"]["outcome"] == str(res.outcome)
    assert [what for _, what in res.run["options"]["nbd"]["events"]] == ["server-start", "server-kill"]
    _nothing_left()


_KILLED_RUN = """
import sys
from crashlab import rundir
from crashlab.cachemodes import CACHE_MODES
from crashlab.record import RecordConfig, record
from crashlab.recorders import Recorder
rundir.enter()
record(RecordConfig(recorder=Recorder.QEMU, storage="nbd", workload="sleepy", scale=60, timeout_s=300,
                    workload_path=(sys.argv[2],)), sys.argv[1])
"""


def test_a_killed_run_leaves_nothing_once_the_next_command_starts(guest: Guest, tmp_path: Path) -> None:
    p = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(tmp_path / "rec"), GUEST_WORKLOADS],
                         start_new_session=True)
    try:
        end = time.monotonic() + 120
        while not (_storage_processes() and netns.owned()):  # the server is up: the guest is booting
            assert p.poll() is None and time.monotonic() < end, "the run never started its server"
            time.sleep(0.1)
        time.sleep(2)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    finally:
        if p.poll() is None:
            p.kill()
    end = time.monotonic() + 10
    while _storage_processes() and time.monotonic() < end:  # PR_SET_PDEATHSIG
        time.sleep(0.1)
    assert _storage_processes() == []
    assert netns.owned(), "a killed run cannot remove its namespace itself"
    r = subprocess.run([sys.executable, "-m", "crashlab", "workload", "list"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    _nothing_left()
