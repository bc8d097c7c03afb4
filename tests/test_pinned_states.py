"""Crash-state ids and outcomes pinned from real recordings, as computed before the guest-layer redesign.

tests/data/pinned-states.json was made by the code of commit 0fd525b (the last one before the
redesign) from the in-repo fixture logs: 8 states per log, seed 2008, recovered and checked with
e2fsprogs. Refactors must give the same ids, in the same order, with the same outcomes; a change
of the model or the checkers that moves them must say so by regenerating the file in its commit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crashlab import crashstates, logformat, model
from crashlab.check.runner import CheckItem, check_batch

DATA = Path(__file__).parent / "data"
PINNED = json.loads((DATA / "pinned-states.json").read_text())
CASES = {"ext4-dm-barrier-off.log.xz": ("dm", "writeback"), "ext4-dm-barrier-on.log.xz": ("dm", "none"),
         "ext4-qemu-writecache-on.log.xz": ("qemu", "writeback"),
         "ext4-qemu-noflush.log.xz": ("qemu", "unsafe")}


@pytest.mark.parametrize("log", sorted(CASES))
def test_ids_and_outcomes_are_what_they_were(log: str, tmp_path: Path) -> None:
    recorder, cache = CASES[log]
    # The fixtures carry native marks, not in-band markers: the crash window opens at the mount.
    cfg = model.config(recorder, cache, window="inf", baseline="mount")
    with logformat.open_log(DATA / "logs" / log) as reader:
        m = model.LogModel(reader.index(), cfg)
        digest = crashstates.log_digest(reader)
        states = crashstates.generate(m, digest, len(PINNED[log]), seed=2008).states
        items = []
        with crashstates.Materializer(reader, m, digest, size=256 << 20) as mat:
            for st in states:
                mat.build(st, tmp_path / f"{st.id}.img")
                items.append(CheckItem(tmp_path / f"{st.id}.img", "ext4", st.id))
    got = [[r.state_id, str(r.outcome)] for r in check_batch(items, host_mount=True)]
    assert got == PINNED[log]
    assert len({o for _, o in got}) > 1 or log != "ext4-dm-barrier-off.log.xz"  # the pins can tell
