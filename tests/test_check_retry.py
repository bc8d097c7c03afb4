"""The checker guest's retries, with a fake transport standing in for QEMU: an image the checker
failed (no boot, QEMU killed, no disk) gets a fresh guest; one that crashed or hung the kernel
does not; a failure that persists is a checker-error that says it was the checker's."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from crashlab.check import guest as checkguest
from crashlab.check.guest import ATTEMPTS, FAULT_BOOT, FAULT_MISSING, FAULT_STOPPED, GuestMounts
from crashlab.check.mounts import MountRequest
from crashlab.check.outcome import Outcome, ToolRun
from crashlab.check.runner import CheckItem, check_batch
from crashlab.guest.inguest.check import RESULTS
from crashlab.guest.job import GuestJob, GuestRun
from crashlab.guest.machine import Machine
from crashlab.guest.provision import Guest
from crashlab.guest.transport import VirtiofsTransport

Boot = Callable[[GuestJob, list[int]], GuestRun]


def run(job: GuestJob, *, events: list[dict[str, Any]], console: str = "", qemu_exit: int | None = 0,
        error: str | None = None, timed_out: bool = False) -> GuestRun:
    """What the transport hands back after a boot that wrote `events` and `console`."""
    with (job.share / RESULTS).open("w") as f:
        f.writelines(json.dumps(ev) + "\n" for ev in events)
    job.console.write_text(console)
    return GuestRun("fake", {}, 0, qemu_exit, [], 1.0, error, job.console, timed_out=timed_out)


def done(i: int) -> dict[str, Any]:
    return {"index": i, "event": "done", "recovery": ToolRun(["mount"], 0, "mounted\n").to_dict(),
            "timings": {"mount": 0.1}}


def start(i: int) -> dict[str, Any]:
    return {"index": i, "event": "start"}


def all_done(job: GuestJob, ids: list[int]) -> GuestRun:
    return run(job, events=[done(i) for i in ids])


def no_boot(job: GuestJob, ids: list[int]) -> GuestRun:
    return run(job, events=[], console="[    0.41] virtio_blk: probe of virtio1 failed\n", qemu_exit=1,
               error="guest init: python did not start")


def killed_at(k: int) -> Boot:
    def boot(job: GuestJob, ids: list[int]) -> GuestRun:
        return run(job, events=[*(done(i) for i in ids[:k]), start(ids[k])], console="mounting\n",
                   qemu_exit=-9)
    return boot


def panicked_at(k: int) -> Boot:
    def boot(job: GuestJob, ids: list[int]) -> GuestRun:
        return run(job, events=[*(done(i) for i in ids[:k]), start(ids[k])],
                   console="EXT4-fs error\nKernel panic - not syncing: Fatal exception\n")
    return boot


def hung_at(k: int) -> Boot:
    def boot(job: GuestJob, ids: list[int]) -> GuestRun:
        return run(job, events=[*(done(i) for i in ids[:k]), start(ids[k])], console="mounting\n",
                   qemu_exit=None, error="guest still running after its hard timeout", timed_out=True)
    return boot


def missing_disk(job: GuestJob, ids: list[int]) -> GuestRun:
    return run(job, events=[{"index": ids[0], "event": "missing"}, *(done(i) for i in ids[1:])])


class FakeTransport:
    """Plays one scripted boot per run; remembers which images each boot was given."""

    def __init__(self, boots: list[Boot]) -> None:
        self.script = list(boots)
        self.given: list[list[int]] = []

    def __call__(self) -> FakeTransport:  # stands in for the VirtiofsTransport class
        return self

    def run(self, job: GuestJob, guest: Guest) -> GuestRun:
        ids = [r["index"] for r in job.payload["requests"]]
        self.given.append(ids)
        return self.script.pop(0)(job, ids)


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    out = []
    for n in range(3):
        out.append(tmp_path / f"s{n}.img")
        out[-1].write_bytes(bytes(4096))
    return out


def mount(monkeypatch: pytest.MonkeyPatch, images: list[Path], boots: list[Boot]
          ) -> tuple[list[Any], FakeTransport, GuestMounts]:
    fake = FakeTransport(boots)
    monkeypatch.setattr(checkguest, "VirtiofsTransport", fake)
    backend = GuestMounts(guest=Guest(Path("k"), Path("i"), "6.1", None, None, (), "key", Path(".")))
    steps = backend.mount_batch([MountRequest(p, "ext4", True, None) for p in images], timeout=5)
    assert not fake.script, "a scripted boot was never used"
    return steps, fake, backend


def test_a_guest_that_does_not_boot_is_retried_in_a_fresh_one(monkeypatch: pytest.MonkeyPatch,
                                                              images: list[Path]) -> None:
    steps, fake, backend = mount(monkeypatch, images, [no_boot, all_done])
    assert fake.given == [[0, 1, 2], [0, 1, 2]] and len(backend.boots) == 2
    for s in steps:
        assert not s.checker_fault and s.recovery is not None and s.recovery.rc == 0
        [why] = s.retries
        assert "checker guest failed" in why and "python did not start" in why


def test_a_guest_that_never_boots_costs_attempts_boots_then_is_the_checkers_fault(
        monkeypatch: pytest.MonkeyPatch, images: list[Path]) -> None:
    steps, fake, _ = mount(monkeypatch, images, [no_boot] * ATTEMPTS)
    assert len(fake.given) == ATTEMPTS >= 2
    for s in steps:
        assert s.checker_fault == FAULT_BOOT and len(s.retries) == ATTEMPTS - 1
        assert s.recovery is not None and s.recovery.error and s.recovery.rc is None


def test_qemu_killed_mid_image_costs_a_retry_not_a_result(monkeypatch: pytest.MonkeyPatch,
                                                          images: list[Path]) -> None:
    steps, fake, _ = mount(monkeypatch, images, [killed_at(1), all_done])
    assert fake.given == [[0, 1, 2], [1, 2]]  # image 0 was done; 1 was cut off, 2 never reached
    assert [s.checker_fault for s in steps] == ["", "", ""]
    assert steps[0].retries == [] and steps[2].retries == []
    assert "checker guest stopped (QEMU exit status -9)" in steps[1].retries[0]


def test_killed_twice_is_stored_as_the_checkers_fault(monkeypatch: pytest.MonkeyPatch,
                                                      images: list[Path]) -> None:
    steps, fake, _ = mount(monkeypatch, images, [killed_at(1), killed_at(0), all_done])
    assert fake.given == [[0, 1, 2], [1, 2], [2]]
    assert steps[1].checker_fault == FAULT_STOPPED and not steps[2].checker_fault


@pytest.mark.parametrize(("boot", "tool", "timed_out"), [(panicked_at(1), False, False),
                                                        (hung_at(1), True, True)])
def test_an_image_that_crashes_or_hangs_the_kernel_is_its_own_result(
        monkeypatch: pytest.MonkeyPatch, images: list[Path], boot: Boot, tool: bool, timed_out: bool) -> None:
    steps, fake, _ = mount(monkeypatch, images, [boot, all_done])
    assert fake.given == [[0, 1, 2], [2]]  # image 1 is not retried: it did this
    s = steps[1]
    assert not s.checker_fault and s.recovery is not None and s.recovery.timed_out == timed_out
    assert (s.recovery.rc is None) == tool  # a crashed kernel is the filesystem's (rc 255)


def test_a_missing_disk_is_retried(monkeypatch: pytest.MonkeyPatch, images: list[Path]) -> None:
    steps, fake, _ = mount(monkeypatch, images, [missing_disk, missing_disk])
    assert fake.given == [[0, 1, 2], [0]]
    assert steps[0].checker_fault == FAULT_MISSING and not steps[1].checker_fault


def test_the_record_of_a_state_the_checker_never_checked_says_so(monkeypatch: pytest.MonkeyPatch,
                                                                 images: list[Path]) -> None:
    fake = FakeTransport([no_boot] * ATTEMPTS)
    monkeypatch.setattr(checkguest, "VirtiofsTransport", fake)
    backend = GuestMounts(guest=Guest(Path("k"), Path("i"), "6.1", None, None, (), "key", Path(".")))
    [rec] = check_batch([CheckItem(images[0], "ext4", "s0")], backend=backend, ext4_recovery="mount")
    assert rec.outcome is Outcome.CHECKER_ERROR and rec.checker_fault == FAULT_BOOT
    assert any(n.startswith("checker retried after: checker guest failed") for n in rec.notes)
    assert rec.fsck is None  # nothing ran on an image nobody recovered
    stored = type(rec).from_dict(json.loads(json.dumps(rec.to_dict())))
    assert stored.checker_fault == FAULT_BOOT


# --- a real checker guest, its QEMU killed mid-batch ------------------------------------------------

@pytest.mark.guest
@pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="no QEMU")
def test_a_real_qemu_killed_mid_batch_costs_a_retry_not_a_result(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    for n in range(300):  # enough that copying the tree out takes the guest a while
        (tree / f"f{n}").write_bytes(bytes([n % 256]) * 2048)
    items = []
    for n in range(3):
        image = tmp_path / f"s{n}.img"
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image), "32M"], check=True)
        items.append(CheckItem(image, "ext4", f"s{n}", oracle=lambda t: [] if len(list(t.iterdir())) >= 300
                               else ["tree incomplete"]))
    killed: list[int] = []

    class KillOnce(VirtiofsTransport):
        """The first boot's QEMU is SIGKILLed as soon as the guest starts on its second image."""

        def run(self, job: GuestJob, guest: Guest, observer: Callable[[Machine], None] | None = None
                ) -> GuestRun:
            def watch(m: Machine) -> None:
                def poll() -> None:
                    while m.is_running():
                        text = (job.share / RESULTS).read_text() if (job.share / RESULTS).exists() else ""
                        started = [json.loads(line) for line in text.splitlines() if '"start"' in line]
                        if len(started) >= 2:
                            killed.append(started[-1]["index"])
                            m.kill()
                            return
                        time.sleep(0.02)
                threading.Thread(target=poll, daemon=True).start()
            return super().run(job, guest, None if killed else watch)

    mp = pytest.MonkeyPatch()
    mp.setattr(checkguest, "VirtiofsTransport", KillOnce)
    try:
        with GuestMounts() as backend:
            records = {r.state_id: r for r in check_batch(items, backend=backend)}
    finally:
        mp.undo()
    assert len(killed) == 1 and len(backend.boots) == 2
    for r in records.values():
        assert r.outcome is Outcome.CONSISTENT and not r.checker_fault, json.dumps(r.to_dict())[:2000]
    cut = records[f"s{killed[0]}"]
    assert any("checker guest stopped" in n for n in cut.notes), cut.notes
