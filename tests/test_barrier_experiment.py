"""DESIGN.md's ext4 barrier experiment, end to end on real kernel logs.

Volatile-cache crash states (everything before the last flush kept, each later write kept or not)
built from dm-log-writes logs recorded under ext4 with and without barriers, recovered by journal
replay and checked by e2fsck: zero corrupt states with barriers, some without.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from crashlab import crashstates, logformat, model
from crashlab.check.runner import CheckItem, check_batch

LOGS = Path(__file__).parent / "data" / "logs"
STATES = 30


def outcomes(log: str, tmp_path: Path) -> Counter[str]:
    # The fixtures carry native marks, not in-band markers: the crash window opens at the mount.
    cfg = model.config("dm", "writeback", window="inf", baseline="mount")
    with logformat.open_log(LOGS / log) as reader:
        m = model.LogModel(reader.index(), cfg)
        digest = crashstates.log_digest(reader)
        camp = crashstates.generate(m, digest, STATES, seed=2008)
        items = []
        with crashstates.Materializer(reader, m, digest, size=256 << 20) as mat:
            for st in camp.states:
                image = tmp_path / f"{st.id}.img"
                mat.build(st, image)
                items.append(CheckItem(image, "ext4", st.id))
        # Host mounts are unneeded here: ext4 recovers in userspace and there is no oracle to feed.
        return Counter(str(r.outcome) for r in check_batch(items, host_mount=True))


@pytest.mark.parametrize(("log", "corrupt"), [("ext4-dm-barrier-on.log.xz", False),
                                              ("ext4-dm-barrier-off.log.xz", True)])
def test_barriers_decide_whether_volatile_cache_corrupts_ext4(log: str, corrupt: bool,
                                                             tmp_path: Path) -> None:
    got = outcomes(log, tmp_path)
    assert sum(got.values()) == STATES
    assert got["checker-error"] == 0, got
    bad = got["fs-inconsistent"] + got["unmountable"]
    if corrupt:
        assert bad > 0, got
    else:
        assert bad == 0, got
