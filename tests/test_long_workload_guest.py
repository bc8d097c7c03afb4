"""The long workload (workloads/mailserver.py) in a real guest: its markers span the guest time it
was asked for, and the volatility window changes what the model calls durable on it.

The CI test runs it for a few seconds; the slow one for its default 60 s (~100 s wall under TCG),
long enough for the guest's background writeback (dirty_expire 30 s) to push the maillog out
between flushes, so 1 s, 30 s and inf all give different stable prefixes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from crashlab import logformat, markers, model
from crashlab.cachemodes import CACHE_MODES
from crashlab.guest.provision import Guest
from crashlab.logformat import Entry
from crashlab.record import RecordConfig, Recording, record, timings
from crashlab.recorders import Recorder

pytestmark = pytest.mark.guest
pytest_plugins = ["conftest_guest"]


def recorded(tmp: Path, guest: Guest, barrier: bool, **params: str) -> Recording:
    config = RecordConfig(fs="ext4", cache=CACHE_MODES["writeback"], barrier=barrier, recorder=Recorder.QEMU,
                          workload="mailserver", seed=1, params=tuple(sorted(params.items())),
                          accel=os.environ.get("CRASHLAB_ACCEL", "auto"), timeout_s=600)
    return record(config, tmp, guest=guest)


def entries(rec: Recording) -> list[Entry]:
    with logformat.open_log(rec.log) as reader:
        return reader.index()


def marker_span_s(es: list[Entry]) -> float:
    """Guest seconds between the workload-start and workload-end markers."""
    clock = {e.marker.name: e.marker.clock_ns for e in es if e.marker is not None and not e.marker.is_tick}
    return (clock[markers.WORKLOAD_END] - clock[markers.WORKLOAD_START]) / 1e9


def stable_prefixes(es: list[Entry], window: str, points: list[int], mode: str = "writeback") -> list[int]:
    m = model.LogModel(es, model.config("qemu", mode, window))
    return [m.crash(p).stable for p in points]


def crash_points(es: list[Entry]) -> list[int]:
    lo = model.LogModel(es, model.config("qemu", "writeback", "inf")).lo
    return list(range(lo, len(es) + 1))


def report(rec: Recording, es: list[Entry]) -> str:
    s = rec.summary
    return (f"log {s['log_bytes'] / 2**20:.1f} MiB, {s['entries']} entries ({s['writes']} writes, "
            f"{s['flushes']} flushes, {s['ticks']} ticks); markers span {marker_span_s(es):.1f} s of guest "
            f"time; workload {timings(rec.run)['workload_s']:.1f} s; recording "
            f"{rec.run['host_seconds']:.1f} s host wall")


def test_short_run_spans_its_duration_and_the_window_bites(tmp_path: Path, guest: Guest) -> None:
    rec = recorded(tmp_path, guest, barrier=False, duration="3", deliver="0.3")
    es = entries(rec)
    print(report(rec, es))
    assert 3.0 <= marker_span_s(es) < 60
    assert rec.summary["ticks"] >= 20  # one every 100 ms, give or take a loaded host
    points = crash_points(es)
    one, inf = stable_prefixes(es, "1", points), stable_prefixes(es, "inf", points)
    # A longer window never makes more durable; with barriers off only time makes anything durable.
    assert all(a >= b for a, b in zip(one, inf, strict=True))
    assert any(a > b for a, b in zip(one, inf, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("barrier", [False, True], ids=["barrier-off", "barrier-on"])
def test_sixty_seconds_of_writeback_separate_every_window(tmp_path: Path, guest: Guest,
                                                          barrier: bool) -> None:
    rec = recorded(tmp_path, guest, barrier=barrier)
    es = entries(rec)
    print(report(rec, es))
    assert marker_span_s(es) >= 60
    check_windows(es, barrier)


def check_windows(es: list[Entry], barrier: bool) -> None:
    """What the windows do to a 60 s mailserver log (measured, DESIGN.md "The long workload")."""
    points = crash_points(es)
    for mode in ("writeback", "unsafe"):  # unsafe: the qemu log read as if the host dropped its flushes
        one, thirty, inf = (stable_prefixes(es, w, points, mode) for w in ("1", "30", "inf"))
        assert all(a >= b >= c for a, b, c in zip(one, thirty, inf, strict=True))
        if barrier and mode == "writeback":
            # ext4 with barriers flushes every few seconds whenever anything is dirty (journal
            # commits, each fsync): no write stays unflushed for 1 s, so no window of 1 s or more
            # changes anything.
            assert one == thirty == inf
        else:
            # Without flushes (barrier=0, or read as if the host dropped them) only age makes a
            # write durable: every window gives its own stable prefixes once the run is older than 30 s.
            assert sum(a > b for a, b in zip(one, thirty, strict=True)) > len(points) // 2
            assert sum(b > c for b, c in zip(thirty, inf, strict=True)) > len(points) // 4
