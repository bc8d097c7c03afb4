"""Real guests on each disk model, on a user's kernel and QEMU, and a gate run from two libvirt XMLs.

Small on purpose (TCG, the 4-file `tiny` workload): each recording is one boot of about 15 s.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from click.testing import CliRunner

from crashlab.cli import cli
from crashlab.guest.provision import Guest

if TYPE_CHECKING:
    from conftest_guest import Recordings

pytest_plugins = ["conftest_guest"]


@pytest.mark.guest
@pytest.mark.parametrize("disk", ["virtio-scsi", "ide"])
@pytest.mark.parametrize("cache", ["writeback", "writethrough"])
def test_each_model_sends_flushes_only_with_its_write_cache_on(recordings: Recordings, disk: str,
                                                                cache: str) -> None:
    rec = recordings.get("qemu", cache=cache, workload="tiny", disk=disk)
    seen = rec.run["guest"]["disk"]
    assert seen["device"].startswith("/dev/sd")  # a SCSI or libata disk, found by its serial
    argv = " ".join(rec.run["options"]["qemu_argv"])
    assert ("scsi-hd,bus=scsi0.0" if disk == "virtio-scsi" else "ide-hd,bus=ide.0") in argv
    if cache == "writeback":
        # SCSI WCE / ATA IDENTIFY say write back: ext4's barriers become SYNCHRONIZE CACHE or
        # FLUSH CACHE EXT, which QEMU logs as FLUSH entries.
        assert seen["write_cache"] == "write back"
        assert seen["flushes"] > 0 and rec.summary["flushes"] > 0
    else:
        # No write cache: Linux strips every flush before the device; QEMU writes through itself.
        assert seen["write_cache"] == "write through"
        assert seen["flushes"] == 0
    assert seen["writes"] > 0


@pytest.mark.guest
def test_a_users_kernel_and_qemu_are_the_ones_booted(tmp_path: Path, guest: Guest) -> None:
    meta = json.loads((guest.directory / "guest.json").read_text())
    moddir = Path(meta["inputs"]["moddir"])
    kernel = tmp_path / "my-build" / "bzImage"
    kernel.parent.mkdir()
    shutil.copy2(guest.kernel, kernel)
    modules = tmp_path / "my-build" / "lib" / "modules" / moddir.name
    shutil.copytree(moddir, modules)
    qemu = tmp_path / "my-qemu"
    qemu.symlink_to(shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64")
    out = tmp_path / "rec"
    r = CliRunner().invoke(cli, ["record", "--recorder", "qemu", "--kernel", str(kernel), "--modules",
                                 str(modules), "--qemu", str(qemu), "--accel", "tcg", "--out", str(out)])
    assert r.exit_code == 0, r.output
    run = json.loads((out / "run.json").read_text())
    v = run["versions"]
    assert v["guest_kernel_package"] == "user-supplied" and v["guest_kernel_image"] == str(kernel)
    assert v["guest_kernel"] == run["guest"]["uname"] == moddir.name  # the version it booted
    assert v["qemu_binary"] == str(qemu) and run["options"]["qemu_argv"][0] == str(qemu)
    assert run["config"]["kernel"] == str(kernel) and run["config"]["qemu"] == str(qemu)


@pytest.mark.guest
def test_gate_compares_two_domain_xmls(tmp_path: Path) -> None:
    def domain(driver: str) -> Path:
        p = tmp_path / f"{len(list(tmp_path.iterdir()))}.xml"
        p.write_text(f"""<domain type='kvm'><name>g</name><devices>
            <disk type='file' device='disk'>{driver}<source file='/img'/>
            <target dev='vda' bus='virtio'/></disk>
            </devices></domain>""")
        return p

    before = domain("<driver name='qemu' type='raw' cache='writeback'/>")
    after = domain("<driver name='qemu' type='raw' cache='none' io='native'/>")
    store = tmp_path / "store" / "s.sqlite"
    r = subprocess.run([sys.executable, "-m", "crashlab", "gate",
                        "--before", str(before), "--after", str(after), "--states", "2", "--no-sensitivity",
                        "--max-rate", "100", "--store", str(store), "-j", "2"],
                       capture_output=True, text=True, timeout=900)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert "before   ext4 cache=writeback barrier=on" in out
    assert "policy   ext4 cache=none barrier=on aio=native" in out
    assert "change   ext4: before 0/2, after 0/2; Fisher exact two-sided p = 1" in out
    assert out.rstrip().splitlines()[-1].startswith("PASS")
