"""The guest-backed predicate that shrinking drives: a fixed op sequence recorded in a real guest,
its crash states checked. Under `unsafe` a fsync promises nothing the host keeps, so the sequence
fails; under `writethrough` every completed write is durable, so it survives."""

from __future__ import annotations

import pytest

from crashlab import campaign
from crashlab.cachemodes import CACHE_MODES
from crashlab.opgen import Op
from crashlab.shrink import still_fails

pytestmark = pytest.mark.guest

OPS = [Op("creat", "foo"), Op("write", "foo", off=0, size=32768, fill=7), Op("fsync", "foo"),
       Op("creat", "bar"), Op("write", "bar", off=0, size=4096, fill=9), Op("fsync", "bar"), Op("fsync", "")]


def test_sequence_fails_under_unsafe_and_survives_writethrough() -> None:
    unsafe = campaign.Cell(cache=CACHE_MODES["unsafe"], workload="ops", seed=5)
    failed = still_fails(unsafe, OPS, 8, host_mount=True)
    assert failed, "no crash state of an fsync workload under cache=unsafe lost anything"
    assert all(r.outcome.is_failure for r in failed)
    assert any(v["path"] in ("foo", "bar") for r in failed for v in r.record.violations)
    safe = campaign.Cell(cache=CACHE_MODES["writethrough"], workload="ops", seed=5)
    assert still_fails(safe, OPS, 8, host_mount=True) == []
