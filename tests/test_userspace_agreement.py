"""The userspace ext4 path (debugfs, no mount) against the guest-mount path, state by state.

The userspace path is crashlab's default for ext2/3/4 only because it gives the same outcome as a
guest kernel's read-only mount on real crash states: from this suite's own recordings (a barrier-off
mail spool loses fsynced data and corrupts the filesystem; an unsafe one loses data) and the
fixtures' unmountable states. Where the two read a broken directory differently, the promises they
call broken may differ, but only on states fsck already calls corrupt: the outcome is the same
(DESIGN.md, "The userspace ext4 path"). CI checks a small corpus; the slow test checks 200+ states
with every outcome class, XFS-free (only ext4 has the userspace path).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from conftest_guest import Recordings

from crashlab import campaign, crashstates, logformat, model
from crashlab.check import guest as checkguest
from crashlab.check.outcome import Outcome
from crashlab.check.runner import CheckItem, check_batch

pytest_plugins = ["conftest_guest"]
pytestmark = [pytest.mark.guest, pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="no QEMU")]

FIXTURES = Path(__file__).parent / "data" / "logs"
PINNED = json.loads((Path(__file__).parent / "data" / "pinned-states.json").read_text())


def compare(pairs: list[tuple[campaign.StateResult, campaign.StateResult]]) -> Counter[str]:
    classes: Counter[str] = Counter()
    for us, guest in pairs:
        assert us.detail["backend"] == "userspace" and guest.detail["backend"] == "guest"
        assert us.outcome is guest.outcome, (us.state_id, us.detail["reason"], guest.detail["reason"])
        if not us.outcome.is_fs_corruption:
            paths = [sorted(v["path"] for v in r.detail["violations"]) for r in (us, guest)]
            assert paths[0] == paths[1], (us.state_id, paths)
        classes[us.outcome.value] += 1
    return classes


def both_ways(rec: Path, cell: campaign.Cell, count: int
              ) -> list[tuple[campaign.StateResult, campaign.StateResult]]:
    ids = tuple(campaign.generate_states(cell, rec, count))
    us = campaign.run_check(campaign.CheckUnit(cell, str(rec), ids, checker="userspace"))
    guest = campaign.run_check(campaign.CheckUnit(cell, str(rec), ids, checker="guest"))
    assert [r.state_id for r in us] == [r.state_id for r in guest]
    return list(zip(us, guest, strict=True))


def cell_of(rec: Path, **extra: object) -> campaign.Cell:
    c = json.loads((rec / "run.json").read_text())["config"]
    return campaign.Cell.parse({k: c[k] for k in ("fs", "cache", "recorder", "workload", "seed", "scale")}
                               | {"barrier": "on" if c["barrier"] else "off", **extra})


def fixture_unmountable(tmp_path: Path) -> Counter[str]:
    """The noflush fixture's pinned unmountable states (no promises: the mount is the only step)."""
    log = "ext4-qemu-noflush.log.xz"
    ids = [sid for sid, outcome in PINNED[log] if outcome == Outcome.UNMOUNTABLE.value]
    cfg = model.config("qemu", "unsafe", window="inf", baseline="mount")
    records = {}
    for checker in ("userspace", "guest"):
        with logformat.open_log(FIXTURES / log) as reader:
            m = model.LogModel(reader.index(), cfg)
            with crashstates.Materializer(reader, m, crashstates.log_digest(reader), size=256 << 20) as mat:
                items = []
                for sid in ids:
                    image = tmp_path / f"{checker}-{sid}.img"
                    mat.build(crashstates.parse_id(sid), image)
                    items.append(CheckItem(image, "ext4", sid))
        records[checker] = [r.outcome for r in check_batch(items, checker=checker)]
    assert records["userspace"] == records["guest"] == [Outcome.UNMOUNTABLE] * len(ids)
    return Counter({Outcome.UNMOUNTABLE.value: len(ids)})


def test_userspace_and_guest_paths_agree(recordings: Recordings, tmp_path: Path) -> None:
    spool = recordings.get("qemu", barrier=False, cache="writeback")
    classes = compare(both_ways(spool.out_dir, cell_of(spool.out_dir), 24))
    classes += fixture_unmountable(tmp_path)
    checkguest.close_live_guests()
    assert {Outcome.DATA_LOSS.value, Outcome.UNMOUNTABLE.value} <= set(classes), classes


@pytest.mark.slow
def test_userspace_and_guest_paths_agree_on_a_large_corpus(recordings: Recordings, tmp_path: Path) -> None:
    classes: Counter[str] = Counter()
    for rec in (recordings.get("qemu", barrier=False, cache="writeback"),
                recordings.get("qemu", barrier=True, cache="unsafe"),
                recordings.get("qemu", barrier=False, cache="none", workload="metadata_storm"),
                recordings.get("qemu", barrier=False, cache="writeback", workload="sqlite_wal")):
        classes += compare(both_ways(rec.out_dir, cell_of(rec.out_dir), 60))
    classes += fixture_unmountable(tmp_path)
    checkguest.close_live_guests()
    assert sum(classes.values()) >= 200, classes
    assert set(classes) == {o.value for o in Outcome if o is not Outcome.CHECKER_ERROR}, classes
