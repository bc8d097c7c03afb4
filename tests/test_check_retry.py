"""The checker guest's retries, with a fake guest standing in for QEMU: an image the checker failed
(no boot, QEMU killed) gets a fresh guest; one that crashed or hung the kernel gets one more, alone,
and only its second death is its result; a failure that persists is a checker-error that says it
was the checker's. Then a real checker guest killed mid-batch."""

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
from crashlab.guest.inguest.check import results_name
from crashlab.guest.provision import Guest

Script = Callable[[int], checkguest.Batch]  # images in the batch -> what the guest did


def done(i: int) -> dict[str, Any]:
    return {"index": i, "event": "done", "recovery": ToolRun(["mount"], 0, "mounted\n").to_dict(),
            "timings": {"mount": 0.1}}


def start(i: int) -> dict[str, Any]:
    return {"index": i, "event": "start"}


def batch(events: list[dict[str, Any]], died: str = "", console: str = "") -> checkguest.Batch:
    at = next((e["index"] for e in events if e["event"] == "start"), None)
    return checkguest.Batch({e["index"]: e for e in events}, died, console, at, 1.0)


def all_done(n: int) -> checkguest.Batch:
    return batch([done(i) for i in range(n)])


def no_boot(n: int) -> checkguest.Batch:
    raise checkguest.GuestFailed("checker guest did not come up (tcg, 3 s): python did not start")


def killed_at(k: int) -> Script:
    return lambda n: batch([*(done(i) for i in range(k)), start(k)], "stopped", "mounting\n")


def panicked_at(k: int) -> Script:
    return lambda n: batch([*(done(i) for i in range(k)), start(k)], "panic",
                           "EXT4-fs error\nKernel panic - not syncing: Fatal exception\n")


def hung_at(k: int) -> Script:
    return lambda n: batch([*(done(i) for i in range(k)), start(k)], "hung", "mounting\n")


def missing_disk(n: int) -> checkguest.Batch:
    return batch([{"index": 0, "event": "missing", "error": "No such file"}, *(done(i) for i in range(1, n))])


class FakeGuests:
    """Stands in for `live_guest`: each batch plays the next script; a script that raises is a guest
    that did not boot. Remembers which images (by request position) each batch was given."""

    def __init__(self, script: list[Script]) -> None:
        self.script = list(script)
        self.given: list[list[int]] = []
        self.requests: list[MountRequest] = []

    def __call__(self, guest: Guest, memory_mib: int, accel: str, qemu: str | None = None) -> FakeGuests:
        if self.script and self.script[0] is no_boot:
            self.script.pop(0)
            self.given.append([])
            no_boot(0)
        return self

    def run(self, requests: list[MountRequest], timeout: float) -> checkguest.Batch:
        self.given.append([self.requests.index(r) for r in requests])
        return self.script.pop(0)(len(requests))


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    out = []
    for n in range(3):
        out.append(tmp_path / f"s{n}.img")
        out[-1].write_bytes(bytes(4096))
    return out


GUEST = Guest(Path("k"), Path("i"), "6.1", None, None, (), "key", Path("."))


def mount(monkeypatch: pytest.MonkeyPatch, images: list[Path], script: list[Script]
          ) -> tuple[list[Any], FakeGuests, GuestMounts]:
    fake = FakeGuests(script)
    monkeypatch.setattr(checkguest, "live_guest", fake)
    backend = GuestMounts(guest=GUEST)
    fake.requests = [MountRequest(p, "ext4", True, None) for p in images]
    steps = backend.mount_batch(fake.requests, timeout=5)
    assert not fake.script, "a scripted batch was never used"
    return steps, fake, backend


def test_a_guest_that_does_not_boot_is_replaced(monkeypatch: pytest.MonkeyPatch, images: list[Path]) -> None:
    steps, fake, backend = mount(monkeypatch, images, [no_boot, all_done])
    assert fake.given == [[], [0, 1, 2]] and len(backend.boots) == 1
    for s in steps:
        assert not s.checker_fault and s.recovery is not None and s.recovery.rc == 0
        [why] = s.retries
        assert "did not come up" in why and "python did not start" in why


def test_a_guest_that_never_boots_costs_attempts_guests_then_is_the_checkers_fault(
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
    assert steps[1].retries[0].startswith(f"{FAULT_STOPPED}: mounting")


def test_killed_twice_is_stored_as_the_checkers_fault(monkeypatch: pytest.MonkeyPatch,
                                                      images: list[Path]) -> None:
    steps, fake, _ = mount(monkeypatch, images, [killed_at(1), killed_at(0), all_done])
    assert fake.given == [[0, 1, 2], [1, 2], [2]]
    assert steps[1].checker_fault == FAULT_STOPPED and not steps[2].checker_fault


@pytest.mark.parametrize(("script", "tool", "timed_out"), [(panicked_at, False, False),
                                                          (hung_at, True, True)])
def test_an_image_that_kills_two_guests_is_its_own_result(
        monkeypatch: pytest.MonkeyPatch, images: list[Path], script: Callable[[int], Script], tool: bool,
        timed_out: bool) -> None:
    steps, fake, _ = mount(monkeypatch, images, [script(1), script(0), all_done])
    assert fake.given == [[0, 1, 2], [1], [2]]  # image 1 once more, alone, in a fresh guest
    s = steps[1]
    assert not s.checker_fault and s.recovery is not None and s.recovery.timed_out == timed_out
    assert (s.recovery.rc is None) == tool  # a crashed kernel is the filesystem's (rc 255)
    assert "retried in a fresh guest" in s.retries[0]


def test_an_image_that_killed_a_guest_once_is_checked_in_the_next(monkeypatch: pytest.MonkeyPatch,
                                                                  images: list[Path]) -> None:
    steps, fake, _ = mount(monkeypatch, images, [panicked_at(1), all_done, all_done])
    assert fake.given == [[0, 1, 2], [1], [2]]
    assert steps[1].recovery is not None and steps[1].recovery.rc == 0 and not steps[1].checker_fault
    assert "guest kernel crashed mounting this image" in steps[1].retries[0]


def test_a_missing_image_is_the_checkers_fault(monkeypatch: pytest.MonkeyPatch, images: list[Path]) -> None:
    steps, fake, _ = mount(monkeypatch, images, [missing_disk])
    assert fake.given == [[0, 1, 2]]
    assert steps[0].checker_fault == FAULT_MISSING and not steps[1].checker_fault


def test_the_record_of_a_state_the_checker_never_checked_says_so(monkeypatch: pytest.MonkeyPatch,
                                                                 images: list[Path]) -> None:
    fake = FakeGuests([no_boot] * ATTEMPTS)
    monkeypatch.setattr(checkguest, "live_guest", fake)
    backend = GuestMounts(guest=GUEST)
    [rec] = check_batch([CheckItem(images[0], "ext4", "s0")], backend=backend, ext4_recovery="mount")
    assert rec.outcome is Outcome.CHECKER_ERROR and rec.checker_fault == FAULT_BOOT
    assert any(n.startswith("checker retried after: checker guest did not come up") for n in rec.notes)
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
    undisturbed = {r.state_id: r.outcome for r in check_batch(items, backend=GuestMounts())}
    checkguest.close_live_guests()
    killed: list[int] = []
    real_run = checkguest.CheckerGuest.run

    def kill_once(self: checkguest.CheckerGuest, requests: list[MountRequest], timeout: float
                  ) -> checkguest.Batch:
        """The first batch's QEMU is SIGKILLed as soon as the guest starts on its second image."""
        results = self.share / results_name(self.batches)  # the batch about to be given

        def poll() -> None:
            while self.machine is not None and self.machine.is_running():
                text = results.read_text() if results.exists() else ""
                started = [json.loads(line) for line in text.splitlines() if '"start"' in line]
                if len(started) >= 2:
                    killed.append(started[-1]["index"])
                    self.machine.kill()
                    return
                time.sleep(0.02)
        if not killed:
            threading.Thread(target=poll, daemon=True).start()
        return real_run(self, requests, timeout)

    mp = pytest.MonkeyPatch()
    mp.setattr(checkguest.CheckerGuest, "run", kill_once)
    try:
        backend = GuestMounts()
        records = {r.state_id: r for r in check_batch(items, backend=backend)}
    finally:
        mp.undo()
        checkguest.close_live_guests()
    assert len(killed) == 1 and len(backend.boots) == 2
    assert {k: r.outcome for k, r in records.items()} == undisturbed
    for r in records.values():
        assert r.outcome is Outcome.CONSISTENT and not r.checker_fault, json.dumps(r.to_dict())[:2000]
    cut = records[f"s{killed[0]}"]
    assert any(FAULT_STOPPED in n for n in cut.notes), cut.notes


def test_a_cells_own_kernel_and_qemu_boot_its_checker_guest(monkeypatch: pytest.MonkeyPatch,
                                                            images: list[Path]) -> None:
    provisioned: list[tuple[object, object]] = []
    booted: list[object] = []

    def fake_provision(kernel: object = None, modules: object = None) -> Guest:
        provisioned.append((kernel, modules))
        return GUEST

    def fake_live(guest: Guest, memory_mib: int, accel: str, qemu: str | None = None) -> FakeGuests:
        booted.append(qemu)
        return fake

    fake = FakeGuests([all_done])
    fake.requests = [MountRequest(p, "xfs", True, None) for p in images]
    monkeypatch.setattr(checkguest, "provision", fake_provision)
    monkeypatch.setattr(checkguest, "live_guest", fake_live)
    backend = GuestMounts(kernel="/k/bzImage", modules="/k/modules", qemu="/opt/qemu")
    backend.mount_batch(fake.requests, timeout=5)
    assert provisioned == [("/k/bzImage", "/k/modules")] and booted == ["/opt/qemu"]


def test_results_are_taken_line_by_line_and_a_line_being_written_waits(tmp_path: Path) -> None:
    path = tmp_path / results_name(0)
    first = json.dumps({"index": 0, "event": "start"}) + "\n"
    path.write_text(first + '{"index": 0, "ev')
    evs, read = checkguest._events(path)
    assert [e["event"] for e in evs] == ["start"] and read == len(first)
    with path.open("a") as f:
        f.write('ent": "done"}\n' + "not json\n")
    evs, read = checkguest._events(path, read)
    assert [e["event"] for e in evs] == ["done"] and read == path.stat().st_size
    assert checkguest._events(path, read) == ([], read)
    assert checkguest._events(tmp_path / "absent", 0) == ([], 0)
