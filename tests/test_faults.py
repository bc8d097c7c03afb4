"""A tiny real campaign killed over and over, on a seeded schedule: nothing leaks, nothing is lost.

Each round starts `crashlab run` in a process group of its own, waits until it is under way, then
kills it one of four ways: SIGKILL to its whole process group, SIGINT to the group (a Ctrl-C),
SIGTERM to crashlab, or SIGKILL to one of its QEMUs. After each: once the next crashlab command
has started (it reclaims what a dead run left), no process, mount, loop device, run directory or
tmpfs directory of the killed run may remain, and every outcome stored before the kill is still
there, unchanged. At the end one undisturbed rerun completes the cell: every state exactly once.

"The killed run" is every process that descended from it at the moment of the kill (its Dask
workers and their QEMUs, which start sessions of their own and name their workers' run
directories, not crashlab's), and every run directory that appeared while it ran.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crashlab import rundir
from crashlab.cachemodes import CACHE_MODES
from crashlab.cli.campaign import EXIT_FAILED_UNITS, EXIT_UNCHECKED
from crashlab.guest.provision import Guest
from crashlab.record import RecordConfig, RecordError, record
from crashlab.recorders import Recorder

pytest_plugins = ["conftest_guest"]

CRASHLAB = [sys.executable, "-m", "crashlab"]
# Checked in checker guests (ext4 would otherwise need none): their QEMUs and shares are what a kill
# must not leak, and they keep each round busy long enough to be killed mid-way.
CELL = ["--cache", "unsafe", "--barrier", "off", "--seed", "7", "--unit-states", "2", "-j", "2", "-q",
        "--checker", "guest"]
MORE = 6  # each round asks for this many states beyond what is stored, so it always has work
KINDS = ("group-kill", "ctrl-c", "sigterm", "qemu-kill")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants(root: int) -> dict[int, str]:
    """Every live process below `root`, with its start time: a pid reused later is not the same
    process."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := rundir.proc_stat(int(entry))) and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
            starts[int(entry)] = fields[19]
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found[pid] = starts[pid]
        todo += children.get(pid, [])
    return found


def still_alive(procs: dict[int, str]) -> list[tuple[int, str]]:
    return [(pid, _cmdline(pid)[:160]) for pid, start in procs.items()
            if rundir.start_time(pid) == start]


def dir_owners(dirs: set[Path]) -> list[tuple[int, str]]:
    """The live processes that run directories are named after."""
    owners = {pid for d in dirs if rundir.owner_alive(d.name) and (pid := rundir.owner_pid(d.name))}
    return [(pid, _cmdline(pid)[:160]) for pid in sorted(owners)]


def processes_mentioning(*needles: str) -> list[tuple[int, str]]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            cmd = _cmdline(int(entry))
            if any(n in cmd for n in needles) and rundir.start_time(int(entry)) is not None:
                found.append((int(entry), cmd[:160]))
    return found


def run_dirs() -> set[Path]:
    return {p for root in rundir.roots() for p in root.glob(f"{rundir.PREFIX}*")}


def rows(store: Path) -> dict[str, tuple[str, str]]:
    if not store.exists():
        return {}
    with sqlite3.connect(store) as db:
        return {sid: (outcome, detail) for sid, outcome, detail in
                db.execute("SELECT state_id, outcome, detail FROM states")}


def start(store: Path, states: int) -> subprocess.Popen[str]:
    return subprocess.Popen([*CRASHLAB, "run", *CELL, "--states", str(states), "--store", str(store)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_under_way(p: subprocess.Popen[str], before: set[Path], timeout: float = 60) -> None:
    """Until the run's own directory exists: its signal handling is in place from there on."""
    end = time.monotonic() + timeout
    while not any(d.name.startswith(f"{rundir.PREFIX}{p.pid}-") for d in run_dirs() - before):
        assert p.poll() is None, p.stderr.read() if p.stderr else ""
        assert time.monotonic() < end, "crashlab did not start"
        time.sleep(0.05)


def kill(p: subprocess.Popen[str], kind: str) -> tuple[str, dict[int, str]]:
    """What was done, and the run's processes at that moment."""
    if kind == "qemu-kill":
        end = time.monotonic() + 60
        while not (qemus := [pid for pid in descendants(p.pid) if "qemu-system" in _cmdline(pid)]):
            if p.poll() is not None or time.monotonic() > end:
                return "no QEMU ran: nothing killed", descendants(p.pid)
            time.sleep(0.05)
    procs = descendants(p.pid)
    if kind == "group-kill":
        os.killpg(p.pid, signal.SIGKILL)
    elif kind == "ctrl-c":
        os.killpg(p.pid, signal.SIGINT)
    elif kind == "sigterm":
        p.send_signal(signal.SIGTERM)
    else:
        os.kill(qemus[0], signal.SIGKILL)
    return kind, procs


def assert_nothing_left(pid: int, procs: dict[int, str], before: set[Path], tag: str) -> None:
    seen = run_dirs() - before  # the dead run's and its workers': what its QEMUs name
    needles = (tag, *(str(d) for d in seen))
    end = time.monotonic() + 30  # PR_SET_PDEATHSIG deaths are asynchronous, and slow under load
    # The owners of those directories too: a worker started after the snapshot (a nanny replacing
    # one the kill took) is the run's as much as one that was there.
    while ((left := still_alive(procs) + processes_mentioning(*needles) + dir_owners(seen))
           and time.monotonic() < end):
        time.sleep(0.1)
    assert left == [], f"processes left behind: {left}"
    subprocess.run([*CRASHLAB, "--version"], check=True, capture_output=True)  # reclaims the dead's
    new_dirs = run_dirs() - before
    assert new_dirs == set(), f"run directories left behind: {new_dirs}"
    mounts = Path("/proc/mounts").read_text()
    assert not any(n in mounts for n in needles), "mounts left behind"
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert not any(n in loops for n in needles), f"loop devices left behind: {loops}"


@pytest.mark.guest
@pytest.mark.parametrize("rounds", [10, pytest.param(40, marks=pytest.mark.slow)])
def test_a_campaign_killed_again_and_again_leaks_and_loses_nothing(rounds: int, tmp_path: Path) -> None:
    rng = random.Random(2008 + rounds)
    store = tmp_path / "results" / "crashlab.sqlite"
    tag = str(tmp_path)
    first = start(store, 2)  # the recording and a first outcome, undisturbed
    assert first.wait(600) == 0, first.stderr.read() if first.stderr else ""
    done = []
    states = 2
    # A killed QEMU costs its unit (a recording) or a retry (a check; twice: states unchecked).
    qemu_kill = {0, EXIT_FAILED_UNITS, EXIT_UNCHECKED}
    for round_ in range(rounds):
        before = rows(store)
        states = len(before) + MORE
        kind = KINDS[round_ % len(KINDS)] if round_ < len(KINDS) else rng.choice(KINDS)
        dirs = run_dirs()
        p = start(store, states)
        wait_under_way(p, dirs)
        time.sleep(rng.uniform(0.2, 6.0))
        procs = descendants(p.pid)
        if p.poll() is None:
            what, procs = kill(p, kind)
            done.append(what)
        status = p.wait(300)
        err = p.stderr.read() if p.stderr else ""
        assert "Traceback" not in err, err
        expected = {"group-kill": {-9}, "ctrl-c": {130}, "sigterm": {143}, "qemu-kill": qemu_kill}[kind]
        assert status in expected | {0}, (kind, status, err)  # 0: it finished before the kill
        assert_nothing_left(p.pid, procs, dirs, tag)
        after = rows(store)
        kept = {k: v for k, v in before.items() if json.loads(v[1]).get("outcome") != "checker-error"}
        assert {k: after.get(k) for k in kept} == kept, f"stored outcomes changed after {kind}"
    assert len([d for d in done if d in KINDS]) >= rounds - 2, done  # the schedule really killed
    final = start(store, states)
    assert final.wait(900) in qemu_kill, final.stderr.read() if final.stderr else ""
    stored = rows(store)
    assert len(stored) == states, sorted(stored)  # every state once: the store's key is (cell, id)
    recordings = store.parent / "recordings"
    assert not list(recordings.glob("*.partial-*")), "a half-made recording was left"


@pytest.mark.guest
def test_a_full_host_disk_fails_the_recording_at_once_and_says_so(guest: Guest, tmp_path: Path) -> None:
    # QEMU's default would pause the guest on ENOSPC and the run would sit out its whole deadline.
    # A small ext4 on a loop device, not a tmpfs: a read fault on a hole of a file on a full tmpfs
    # needs a page, and the host's mmap of the log would die of SIGBUS instead.
    fs_image, full = tmp_path / "small.img", tmp_path / "full"
    full.mkdir()
    subprocess.run(["mkfs.ext4", "-q", "-F", str(fs_image), "12M"], check=True)
    loop = subprocess.run(["losetup", "--find", "--show", str(fs_image)], check=True, capture_output=True,
                          text=True).stdout.strip()
    subprocess.run(["mount", loop, str(full)], check=True)
    try:
        config = RecordConfig(cache=CACHE_MODES["writeback"], recorder=Recorder.QEMU, timeout_s=300,
                              accel=os.environ.get("CRASHLAB_ACCEL", "auto"))
        t0 = time.monotonic()
        with pytest.raises(RecordError, match="MiB free") as e:
            record(config, full / "rec", guest=guest)
        assert time.monotonic() - t0 < 120, "the guest waited on a paused disk"
        assert str(full) in str(e.value)
    finally:
        subprocess.run(["umount", str(full)], check=True)
        subprocess.run(["losetup", "-d", loop], check=True)
