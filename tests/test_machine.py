"""The QEMU launcher: options from the cache-mode table, and real boots that must leave nothing behind."""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from pathlib import Path

import pytest

from crashlab import rundir
from crashlab.cachemodes import CACHE_MODES
from crashlab.guest.inguest import dm as guest_dm
from crashlab.guest.inguest.init import guest_env
from crashlab.guest.machine import Drive, Machine, MachineError, MachineTimeout, choose_accel, drive_args
from crashlab.guest.provision import Guest
from crashlab.guest.shares import (
    PROJECT,
    ResultsShare,
    ShareError,
    host_view,
    minimal_paths,
    view_script,
    visible_in,
)

pytest_plugins = ["conftest_guest"]


def _opts(arg: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in arg.split(","))


@pytest.mark.parametrize("mode", list(CACHE_MODES))
def test_drive_args_follow_the_cache_mode_table(mode: str) -> None:
    c = CACHE_MODES[mode]
    args = drive_args(0, Drive(Path("/d.img"), c))
    blockdevs = [_opts(a) for f, a in itertools.pairwise(args) if f == "-blockdev"]
    device = _opts(args[args.index("-device") + 1].split(",", 1)[1])
    assert len(blockdevs) == 1
    assert blockdevs[0]["cache.direct"] == c.blockdev_cache["cache.direct"]
    assert blockdevs[0]["cache.no-flush"] == c.blockdev_cache["cache.no-flush"]
    assert device["write-cache"] == c.device_write_cache and device["drive"] == blockdevs[0]["node-name"]


@pytest.mark.parametrize("mode", list(CACHE_MODES))
def test_blklogwrites_node_carries_no_flush_on_top(mode: str) -> None:
    c = CACHE_MODES[mode]
    args = drive_args(1, Drive(Path("/d.img"), c, log=Path("/w.log")))
    nodes = {o["node-name"]: o for o in (_opts(a) for f, a in itertools.pairwise(args)
                                         if f == "-blockdev")}
    top = nodes["disk1"]
    assert top["driver"] == "blklogwrites" and top["log-sector-size"] == "512"
    assert top["cache.no-flush"] == c.blockdev_cache["cache.no-flush"]
    assert nodes[top["file"]]["cache.direct"] == c.blockdev_cache["cache.direct"]
    assert nodes[top["file"]]["filename"] == "/d.img"
    # The log itself is never the object of study: flushes kept, page cache.
    assert nodes[top["log"]]["cache.no-flush"] == "off" and nodes[top["log"]]["filename"] == "/w.log"
    assert "write-cache=" + c.device_write_cache in args[-1]


def test_memory_cap_and_accel_values() -> None:
    with pytest.raises(MachineError, match="1024"):
        Machine(Path("/k"), Path("/i"), memory_mib=2048)
    with pytest.raises(MachineError, match="choose_accel"):
        Machine(Path("/k"), Path("/i"), accel="auto")


def test_auto_accel_without_kvm_is_tcg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    assert choose_accel(Path("/k"), Path("/i"), "auto") == "tcg"
    assert choose_accel(Path("/k"), Path("/i"), "kvm") == "kvm"


def test_dm_ioctl_layout() -> None:
    # struct dm_ioctl is 312 bytes; DM_TARGET_MSG = _IOWR(0xfd, 14, struct dm_ioctl).
    assert guest_dm.dm_ioctl_number(guest_dm.DM_TARGET_MSG) == 0xC138FD0E
    buf = guest_dm.dm_message_buffer("crashlab-log", "mark fsync-1")
    assert len(buf) % 8 == 0 and int.from_bytes(buf[12:16], "little") == len(buf)
    assert int.from_bytes(buf[16:20], "little") == 312
    assert buf[48:60] == b"crashlab-log" and buf[312 + 8:312 + 8 + 13] == b"mark fsync-1\0"


def _exec_machine(guest: Guest, out: Path, argv: list[str], timeout: float = 120) -> Machine:
    out.mkdir(parents=True, exist_ok=True)
    (out / "guest.env").write_text(guest_env(sys.executable, str(PROJECT)))
    (out / "job.json").write_text(json.dumps({"mode": "exec", "argv": argv}))
    shares = [host_view(), ResultsShare("out", out)]
    return Machine(guest.kernel, guest.initrd, shares=shares, accel=choose_accel(guest.kernel, guest.initrd),
                   timeout=timeout, name="crashlab-test")


def _alive(pid: int) -> bool:
    return rundir.start_time(pid) is not None


@pytest.mark.guest
def test_exec_in_guest_round_trips_through_the_out_share(guest: Guest, tmp_path: Path) -> None:
    with _exec_machine(guest, tmp_path, ["sh", "-c", "echo hello from $(uname -r); exit 3"]) as m:
        assert m.cmd("query-status")["status"] == "running"  # type: ignore[index]
        assert m.version["qemu"]["major"] >= 7  # type: ignore[index]
        assert m.wait() == 0
    assert (tmp_path / "exec.out").read_text().strip() == f"hello from {guest.kernel_version}"
    assert json.loads((tmp_path / "result.json").read_text())["exec_status"] == 3
    assert (tmp_path / "exit-status").read_text().strip() == "3"


@pytest.mark.guest
def test_killing_qemu_mid_run_leaves_nothing_behind(guest: Guest, tmp_path: Path) -> None:
    with _exec_machine(guest, tmp_path, ["sleep", "600"]) as m:
        assert m.temp_dir is not None and m.temp_dir.exists()
        temp_dir, pids = m.temp_dir, [m.pid, *(d.pid for d in m.daemons)]
        assert len(pids) == 3 and all(pid is not None and _alive(pid) for pid in pids)
        # Wait until the guest is in its job (virtiofs mounted, the chroot's python started).
        end = time.monotonic() + 90
        while not (tmp_path / "result.json").exists():
            assert time.monotonic() < end, m.console_tail()
            time.sleep(0.2)
        m.kill()
        assert m.wait(timeout=10) == -9
    assert not temp_dir.exists()
    assert not any(_alive(p) for p in pids if p is not None), "a QEMU or virtiofsd survived"
    assert not [p for p in os.listdir("/tmp") if p.startswith("crashlab-test-machine-")]
    mounts = Path("/proc/mounts").read_text()
    assert str(tmp_path) not in mounts and "virtiofs" not in mounts


@pytest.mark.guest
def test_hard_timeout_stops_the_guest_and_cleans_up(guest: Guest, tmp_path: Path) -> None:
    m = _exec_machine(guest, tmp_path, ["sleep", "600"], timeout=4)
    with pytest.raises(MachineTimeout, match="hard timeout"), m:
        pids = [m.pid, *(d.pid for d in m.daemons)]
        m.wait()
    assert m.temp_dir is None
    assert not any(_alive(p) for p in pids if p is not None)


def test_host_view_never_exports_the_whole_root_and_keeps_secrets_out() -> None:
    with pytest.raises(ShareError, match="whole root"):
        minimal_paths([Path("/usr"), Path("/")])
    assert minimal_paths([Path("/usr/lib"), Path("/usr"), Path("/work/p/.venv"), Path("/work/p")]) == [
        Path("/usr"), Path("/work/p")]
    view = host_view()
    assert PROJECT in view.paths or any(PROJECT.is_relative_to(p) for p in view.paths)
    for secret in ("/etc/shadow", "/etc/ssh", "/root/.ssh", "/etc/hostname"):
        assert not visible_in(view, Path(secret)), secret
    script = view_script(Path("/x/view"), view.paths)
    assert script.count("mount --bind") == len(view.paths)
    assert script.count("remount,bind,ro") == len(view.paths)
    assert script.endswith("mount -o remount,ro /x/view")


@pytest.mark.guest
def test_guest_cannot_write_the_host_even_after_remounting_rw(guest: Guest, tmp_path: Path) -> None:
    # The guest is root in its own kernel: `mount -o remount,rw /` succeeds there. The host side must
    # still refuse every write (EROFS from the daemon's read-only binds) and show no secret.
    canary = PROJECT / f".crashlab-escape-{os.getpid()}"
    script = (f"mount -o remount,rw / && echo remounted; echo pwned > {canary}; echo project=$?; "
              "mkdir /usr/crashlab-escape; echo usr=$?; test -e /etc/shadow; echo shadow=$?; "
              "echo written > /run/crashlab/out/mine; echo out=$?")
    with _exec_machine(guest, tmp_path / "out", ["sh", "-c", script]) as m:
        assert m.wait() == 0
    said = (tmp_path / "out" / "exec.out").read_text()
    assert "remounted" in said, said
    assert "project=0" not in said and "usr=0" not in said and "shadow=1" in said, said
    assert "Read-only file system" in said
    assert not canary.exists() and not Path("/usr/crashlab-escape").exists()
    assert (tmp_path / "out" / "mine").read_text() == "written\n"  # the results share stays writable
    assert "crashlab-view" not in Path("/proc/mounts").read_text()  # the view lived in the daemon's namespace
