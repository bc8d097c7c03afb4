"""The default path: kernel mounts in a checker guest (real QEMU under TCG), one boot for all cases.

Images are prepared on the host (mkfs, and loop mounts of freshly made, sound images to put files in);
every check of a crash image then mounts only inside the guest. Oracles come both ways: callables (the
tree is copied out to the host) and promises files (the guest runs the oracle on its mount).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from test_checkers import (
    CRASHED_ORACLE,
    SUPERBLOCK,
    A,
    a_promised,
    copy,
    crashing_promises,
    expect_files,
    host_mounted,
    mkfs,
    write_fsynced,
    zero,
)

from crashlab import rundir
from crashlab.check import guest as checkguest
from crashlab.check.guest import GuestMounts
from crashlab.check.outcome import CheckRecord, Outcome
from crashlab.check.runner import CheckItem, check_batch
from crashlab.oracle import Violation

# One batch of one long-lived guest: ext3 (mounted by the ext4 driver, checked by e2fsprogs like ext4)
# is covered on the host path in test_checkers.py.
FSES = ("ext4", "xfs", "btrfs")

pytestmark = [pytest.mark.guest,
              pytest.mark.skipif(os.geteuid() != 0, reason="image preparation uses loop mounts (root)"),
              pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="no QEMU")]

B = {"b": b"only in the log\n" * 50}


@pytest.fixture(scope="module")
def temp_dirs_before() -> set[Path]:
    return set(Path("/tmp").glob("crashlab-checkguest-*"))


@pytest.fixture(scope="module")
def guest_run(tmp_path_factory: pytest.TempPathFactory,
              temp_dirs_before: set[Path]) -> tuple[dict[str, CheckRecord], GuestMounts]:
    tmp = tmp_path_factory.mktemp("guestcheck")
    # On /dev/shm, which the guest cannot see: the promises files reach it as copies in the out share.
    shm = Path(tempfile.mkdtemp(prefix="crashlab-test-", dir="/dev/shm"))
    promises, bad = a_promised(shm / "promises.jsonl"), crashing_promises(shm / "bad.jsonl")
    items: list[CheckItem] = []
    for fs in FSES:
        clean = mkfs(fs, tmp / f"{fs}-clean.img")
        with host_mounted(clean, fs, tmp) as mnt:
            write_fsynced(mnt, "a", A["a"])
        items.append(CheckItem(copy(clean, tmp / f"{fs}-c.img"), fs, f"{fs}/clean", expect_files(A)))
        nosb = copy(clean, tmp / f"{fs}-nosb.img")
        zero(nosb, *SUPERBLOCK[fs])
        items.append(CheckItem(nosb, fs, f"{fs}/nosb", expect_files(A)))
        live = copy(clean, tmp / f"{fs}-live.img")
        with host_mounted(live, fs, tmp) as mnt:
            write_fsynced(mnt, "b", B["b"])
            dirty = copy(live, tmp / f"{fs}-dirty.img")
            (mnt / "a").unlink()
        items.append(CheckItem(dirty, fs, f"{fs}/dirty", expect_files({**A, **B})))
        items.append(CheckItem(live, fs, f"{fs}/rm", expect_files(A)))
        items.append(CheckItem(copy(live, tmp / f"{fs}-rm-p.img"), fs, f"{fs}/rm-p", promises=promises,
                               present=frozenset({0})))
    items.append(CheckItem(copy(clean, tmp / "btrfs-crash-p.img"), "btrfs", "btrfs/crash-p", promises=bad))
    assert len(items) - 1 <= GuestMounts().batch  # all in one batch (ext4/nosb stays on the host)
    backend = GuestMounts()
    try:
        with backend:
            records = {r.state_id: r for r in check_batch(items, backend=backend)}
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    return records, backend


def test_one_batch_in_one_guest(guest_run: tuple[dict[str, CheckRecord], GuestMounts]) -> None:
    records, backend = guest_run
    # ext4/nosb never reaches the guest: its primary superblock is judged on the host.
    assert len(backend.boots) == 1 and backend.boots[0]["images"] == len(records) - 1
    assert all(r.backend == "guest" for r in records.values())


@pytest.mark.parametrize("fs", FSES)
@pytest.mark.parametrize(("case", "expected"), [
    ("clean", Outcome.CONSISTENT), ("dirty", Outcome.CONSISTENT),
    ("nosb", Outcome.UNMOUNTABLE), ("rm", Outcome.DATA_LOSS)])
def test_outcomes_in_the_guest(guest_run: tuple[dict[str, CheckRecord], GuestMounts], fs: str, case: str,
                               expected: Outcome) -> None:
    rec = guest_run[0][f"{fs}/{case}"]
    assert rec.outcome is expected, json.dumps(rec.to_dict(), indent=1)[:3000]
    json.dumps(rec.to_dict())
    if expected is Outcome.CONSISTENT:
        assert rec.oracle_ran and rec.tree and rec.tree.rc == 0
    if case == "dirty" and fs != "ext4":
        assert rec.recovery and "mount" in rec.recovery.stdout  # replayed by a guest kernel mount
    if case == "rm":
        assert rec.violations == ["a: missing"]


@pytest.mark.parametrize("fs", FSES)
def test_removed_fsynced_file_is_data_loss_by_the_oracle_in_the_guest(
        guest_run: tuple[dict[str, CheckRecord], GuestMounts], fs: str) -> None:
    rec = guest_run[0][f"{fs}/rm-p"]
    assert rec.outcome is Outcome.DATA_LOSS and rec.oracle_ran, json.dumps(rec.to_dict(), indent=1)[:3000]
    assert rec.violations == [Violation("a", rec.violations[0].promise, "no entry")]
    assert rec.to_dict()["violations"][0]["promise"]["sha256"]
    # Judged on the guest's mount: no tree crossed the share.
    assert rec.tree and "oracle-on-mount" in rec.tree.stdout and "$ cp" not in rec.tree.stdout
    assert "oracle" in rec.timings


def test_crashing_oracle_in_the_guest_is_checker_error(
        guest_run: tuple[dict[str, CheckRecord], GuestMounts]) -> None:
    rec = guest_run[0]["btrfs/crash-p"]
    assert rec.outcome is Outcome.CHECKER_ERROR, json.dumps(rec.to_dict(), indent=1)[:3000]
    assert rec.reason == CRASHED_ORACLE and not rec.oracle_ran  # the words the host-side oracle gives


def test_nothing_left_behind(guest_run: tuple[dict[str, CheckRecord], GuestMounts],
                             temp_dirs_before: set[Path]) -> None:
    assert "crashlab-mnt-" not in Path("/proc/mounts").read_text()
    shares = [rundir.tmpfs() or rundir.scratch()]
    assert any(p.glob("crashlab-checker-*") for p in shares)  # the guest lives on for the next unit
    checkguest.close_live_guests()
    assert not any(list(p.glob("crashlab-checker-*")) for p in shares)
    assert not checkguest._LIVE
