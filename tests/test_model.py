"""The durability model on generated logs (hypothesis) and on the shared real-kernel fixtures.

`gen_log` and `reference_image` are also used by test_crashstates.py: every data sector a generated
log writes is tagged with (writing entry index + 1, sector), so an image says which write left each
sector, and the reference image is built by the simplest possible replay, independent of the
materialiser under test.
"""

from __future__ import annotations

import itertools
import math
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crashlab import markers, model
from crashlab.cachemodes import CACHE_MODES
from crashlab.logformat import FLUSH, FUA, METADATA, Entry, LogReader, LogWriter, open_log

SS = 512
DATA_SECTORS = 64  # the "filesystem" area; in-band markers go to the tail after it
TAIL_SLOTS = 8
FIXTURES = Path("/work/shared/fixtures/logs")

# One generated log step: ("w", sector, nr, flags) | ("d", sector, nr) | ("f", flags) | ("tick", ms)
# | ("mark",) | ("point",)  [a non-tick in-band marker, as after an fsync]
_step = st.one_of(
    # Few distinct positions, so writes often overlap or rewrite the same range exactly.
    st.tuples(st.just("w"), st.sampled_from([0, 8, 20]) | st.integers(0, DATA_SECTORS - 1),
              st.sampled_from([8]) | st.integers(1, 16),
              st.sampled_from([0, 0, 0, METADATA, FUA, FLUSH | FUA, FLUSH])),
    st.tuples(st.just("d"), st.integers(0, DATA_SECTORS - 1), st.integers(1, 16)),
    st.tuples(st.just("f"), st.sampled_from([0, FUA])),
    st.tuples(st.just("tick"), st.integers(0, 3000)),
    st.tuples(st.just("mark")),
    st.tuples(st.just("point")),
)
steps = st.lists(_step, min_size=1, max_size=50)
baseline_at = st.floats(0, 1)


def tagged(index: int, sector: int, nr: int) -> bytes:
    return b"".join(struct.pack("<II", index + 1, sector + k).ljust(SS, b"\xa5") for k in range(nr))


def write_log(path: Path, plan: list[tuple], base_frac: float | None) -> None:
    """Write a log following `plan`; a `workload-start` marker goes at `base_frac` of the way."""
    at = None if base_frac is None else round(base_frac * len(plan))
    clock, seq = 1_000_000_000, 0
    with LogWriter(path, SS) as w:

        def marker(name: str) -> None:
            nonlocal seq
            block = markers.encode(markers.Marker(seq, clock, name), SS)
            w.write(DATA_SECTORS + seq % TAIL_SLOTS, block)
            seq += 1

        for k, step in enumerate(plan):
            if k == at:
                marker(markers.WORKLOAD_START)
            kind = step[0]
            if kind == "w":
                _, sector, nr, flags = step
                nr = min(nr, DATA_SECTORS - sector)
                w.write(sector, tagged(w.nr_entries, sector, nr), flags)
            elif kind == "d":
                _, sector, nr = step
                w.discard(sector, min(nr, DATA_SECTORS - sector))
            elif kind == "f":
                w.flush(step[1])
            elif kind == "tick":
                clock += step[1] * 1_000_000
                marker(markers.TICK)
            elif kind == "mark":
                w.mark(f"m{k}")
            else:
                marker(f"fsync{k}")
        if at == len(plan):
            marker(markers.WORKLOAD_START)


@contextmanager
def gen_log(plan: list[tuple], base_frac: float | None = None) -> Iterator[LogReader]:
    with tempfile.TemporaryDirectory(prefix="crashlab-test-") as d:
        path = Path(d) / "gen.log"
        write_log(path, plan, base_frac)
        with open_log(path) as reader:
            yield reader


def reference_image(reader: LogReader, m: model.LogModel, applied: dict[int, int | None],
                    size: int) -> bytearray:
    """Apply exactly the ops in `applied` (index -> unit mask or None for whole), in log order."""
    img = bytearray(size)
    for i in sorted(applied):
        e = reader.index()[i]
        mask = applied[i]
        pieces = m.units(i) if mask is not None else [(e.offset, e.length)]
        for k, (off, length) in enumerate(pieces):
            if mask is not None and not mask >> k & 1:
                continue
            if e.is_discard:
                img[off:off + length] = bytes(length)
            else:
                img[off:off + length] = reader.data(e)[off - e.offset:off - e.offset + length]
    return img


def writer_of(img: bytes | bytearray, sector: int) -> int | None:
    """Which entry wrote this sector of a generated-log image (None: zero, never written or discarded)."""
    (tag,) = struct.unpack_from("<I", img, sector * SS)
    return tag - 1 if tag else None


def covers(e: Entry, sector: int) -> bool:
    return e.sector <= sector < e.sector + e.nr_sectors


RECORDER_MODES = [(r, c) for r in model.RECORDERS for c in CACHE_MODES]
settings.register_profile("crashlab", deadline=None, max_examples=60,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("crashlab")


# --- config --------------------------------------------------------------------------------------

def test_config_names_errors_and_defaults() -> None:
    with pytest.raises(ValueError, match="valid modes: writeback, none, writethrough, directsync, unsafe"):
        model.config("qemu", "writeback-ish")
    with pytest.raises(model.ModelError, match="valid recorders: qemu, dm"):
        model.config("kvm", "none")
    with pytest.raises(model.ModelError, match="512, 4096"):
        model.config("dm", "none", torn=1024)
    with pytest.raises(model.ModelError, match="seconds"):
        model.config("dm", "none", window="soon")
    with pytest.raises(model.ModelError, match=">= 0"):
        model.config("dm", "none", window="-1")
    assert model.config("dm", "writeback").window_s == 30.0
    assert model.config("dm", "none").window_s == 1.0
    assert model.config("dm", "unsafe").window_s == 30.0
    assert model.config("dm", "none", window="inf").window_s == math.inf
    assert model.config("qemu", " None ", window="2.5s").window_s == 2.5
    assert model.config("dm", "directsync").prefix_only
    # QEMU's FUA emulation leaves no FLUSH entry after some durable writes: see Config.prefix_only.
    assert model.config("qemu", "directsync").prefix_only
    assert not model.config("qemu", "writeback").prefix_only
    assert not model.config("dm", "unsafe").flushes_count


# --- properties on generated logs ----------------------------------------------------------------

@given(steps, st.sampled_from(RECORDER_MODES), st.data())
def test_durable_and_volatile_partition_the_ops_before_the_crash(plan: list[tuple], rm: tuple[str, str],
                                                                 data: st.DataObject) -> None:
    with gen_log(plan, data.draw(st.none() | baseline_at)) as r:
        m = model.LogModel(r.index(), model.config(*rm, window=data.draw(st.sampled_from(["inf", 0, 1, 5]))))
        end = data.draw(st.integers(m.lo, m.n))
        cp = m.crash(end)
        durable, vol = m.durable(cp), list(cp.volatile)
        assert sorted(durable + vol) == [i for i in m.ops if i < end]
        assert not set(durable) & set(vol)
        assert all(i < cp.stable for i in durable if i not in cp.durable_late)
        assert vol == sorted(vol) and (not vol or vol[0] == cp.stable)


@given(steps, st.sampled_from(["writethrough", "directsync"]), st.data())
def test_dm_writethrough_is_a_prefix(plan: list[tuple], mode: str, data: st.DataObject) -> None:
    with gen_log(plan, data.draw(st.none() | baseline_at)) as r:
        m = model.LogModel(r.index(), model.config("dm", mode, window="inf"))
        for end in range(m.lo, m.n + 1):
            cp = m.crash(end)
            assert cp.volatile == ()
            assert m.durable(cp) == [i for i in m.ops if i < end]


@given(steps, st.sampled_from(model.RECORDERS), st.data())
def test_unsafe_flushes_and_fua_create_no_durability(plan: list[tuple], rec: str,
                                                     data: st.DataObject) -> None:
    with gen_log(plan, data.draw(st.none() | baseline_at)) as r:
        m = model.LogModel(r.index(), model.config(rec, "unsafe", window="inf"))
        for end in range(m.lo, m.n + 1):
            # Only the baseline settles anything: exactly the ops before its marker.
            assert m.durable(m.crash(end)) == [i for i in m.ops if i < m.lo]


@given(steps, st.sampled_from(["writeback", "none"]), st.sampled_from(model.RECORDERS), st.data())
def test_flush_makes_earlier_writes_durable_and_fua_is_durable(plan: list[tuple], mode: str, rec: str,
                                                                data: st.DataObject) -> None:
    with gen_log(plan) as r:
        m = model.LogModel(r.index(), model.config(rec, mode, window="inf", baseline=None))
        end = data.draw(st.integers(0, m.n))
        flushes = [e.index for e in r.index()[:end] if e.is_flush]
        durable = set(m.durable(m.crash(end)))
        for i in m.ops:
            if i >= end:
                assert i not in durable
                continue
            e = r.index()[i]
            expected = bool(flushes and i < flushes[-1]) or e.is_fua
            assert (i in durable) == expected, (i, e.describe(), flushes)


@given(steps, st.sampled_from(RECORDER_MODES), st.sampled_from([0.0, 0.5, 2.0, 10.0]), baseline_at, st.data())
def test_old_writes_and_pre_baseline_writes_are_always_durable(
        plan: list[tuple], rm: tuple[str, str], window: float, base: float, data: st.DataObject) -> None:
    with gen_log(plan, base) as r:
        entries = r.index()
        m = model.LogModel(entries, model.config(*rm, window=window))
        base_idx = next(e.index for e in entries if e.marker and e.marker.name == markers.WORKLOAD_START)
        end = data.draw(st.integers(m.lo, m.n))
        durable = set(m.durable(m.crash(end)))
        before = [e.marker.clock_ns for e in entries[:end] if e.marker]
        for i in m.ops:
            if i >= end:
                continue
            if i < base_idx:
                assert i in durable
            after = [e.marker.clock_ns for e in entries[i + 1:] if e.marker]
            if before and after and max(before) - min(after) > window * 1e9:
                assert i in durable, f"op {i} is at least {(max(before) - min(after)) / 1e9} s old"


@given(steps)
def test_epochs_cover_the_crash_window_once(plan: list[tuple]) -> None:
    with gen_log(plan, 0.3) as r:
        for mode in ("writeback", "unsafe"):
            m = model.LogModel(r.index(), model.config("qemu", mode))
            ends = [end for ep in m.epochs() for end in ep]
            assert ends == list(range(m.lo, m.n + 1))
            for ep in m.epochs():  # one epoch, one last flush
                assert len({m.crash(end).flush for end in ep}) == 1


@given(st.integers(0, 40), st.integers(1, 40), st.sampled_from([512, 4096]))
def test_torn_units_are_aligned_and_tile_the_write(sector: int, nr: int, unit: int) -> None:
    with gen_log([("w", sector % DATA_SECTORS, nr, 0)]) as r:
        m = model.LogModel(r.index(), model.config("dm", "writeback", torn=unit))
        e = r.index()[0]
        pieces = m.units(0)
        assert pieces[0][0] == e.offset and sum(length for _, length in pieces) == e.length
        for (a, la), (b, _) in itertools.pairwise(pieces):
            assert a + la == b and b % unit == 0
        assert all(0 < length <= unit for _, length in pieces)


def test_window_needs_markers_after_the_write() -> None:
    # A write's age is bounded below by (last marker before the crash) - (first marker after the
    # write); the last write has no marker after it, so it is never durable by age.
    plan = [("tick", 0), ("w", 0, 1, 0), ("tick", 100), ("tick", 5000), ("w", 1, 1, 0)]
    with gen_log(plan) as r:
        m = model.LogModel(r.index(), model.config("dm", "writeback", window=1, baseline=None))
        cp = m.crash(m.n)
        assert m.durable(cp) == [1] and cp.volatile == (4,)
        assert cp.time_ns == 1_000_000_000 + 5_100_000_000
        # Between two ticks 5 s apart, the write may have completed just before the second one.
        assert m.durable(m.crash(3)) == [] and m.crash(3).volatile == (1,)
        m = model.LogModel(r.index(), model.config("dm", "writeback", window=10, baseline=None))
        assert m.durable(m.crash(m.n)) == []


# --- real kernel logs ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ext4-dm-barrier-on", "ext4-dm-barrier-off"])
def test_dm_fixture_writeback_keeps_everything_before_the_last_flush(name: str) -> None:
    with open_log(FIXTURES / f"{name}.log.xz") as r:
        entries = r.index()
        m = model.LogModel(entries, model.config("dm", "writeback", baseline="mount"))
        assert m.baseline_index == next(e.index for e in entries if e.mark == "mount")
        for end in range(m.lo, m.n + 1, 7):
            cp = m.crash(end)
            last_flush = max((e.index for e in entries[:end] if e.is_flush), default=-1)
            durable = set(m.durable(cp))
            assert all(i in durable for i in m.ops if i < last_flush or i < m.lo)
            assert all(i > last_flush for i in cp.volatile)
            # FUA writes (the journal commit records) are never volatile with barriers.
            assert not any(entries[i].is_fua for i in cp.volatile)


def test_dm_fixture_barrier_off_leaves_far_more_volatile_than_barrier_on() -> None:
    # Averaged over crash points, not at the native marks: without barriers the marks bunch up
    # before the writes they should follow (DESIGN.md), so nothing is yet logged after them.
    def mean_volatile(name: str) -> float:
        with open_log(FIXTURES / f"{name}.log.xz") as r:
            m = model.LogModel(r.index(), model.config("dm", "writeback", baseline="mount"))
            points = range(m.lo, m.n + 1, 5)
            return sum(len(m.crash(end).volatile) for end in points) / len(points)
    on, off = mean_volatile("ext4-dm-barrier-on"), mean_volatile("ext4-dm-barrier-off")
    assert off > 20 * on, (on, off)


# --- the reading: whose word the recorder and cache mode are taken on -----------------------------

def test_reading_takes_a_qemu_logs_mode_from_its_recording() -> None:
    wb = ("qemu", "writeback")
    assert model.reading(wb) == model.Reading("qemu", "writeback", wb)
    assert model.reading(wb, "qemu", "WriteBack").describe().startswith("as recorded")
    with pytest.raises(model.ModelError, match=r"contradicts it.*--what-if-cache unsafe"):
        model.reading(wb, "qemu", "unsafe")
    with pytest.raises(model.ModelError, match="recorded by qemu"):
        model.reading(wb, "dm", "writeback")
    cf = model.reading(wb, what_if="unsafe")
    assert (cf.cache, cf.counterfactual) == ("unsafe", True) and cf.describe().startswith("counterfactual")
    assert model.reading(wb, "qemu", "unsafe", what_if="unsafe").counterfactual
    with pytest.raises(model.ModelError, match="disagree"):
        model.reading(wb, cache="none", what_if="unsafe")
    # A dm log is the guest-side view under any host mode: the model applies whichever is named.
    dm = model.reading(("dm", "writeback"), cache="unsafe")
    assert (dm.cache, dm.counterfactual) == ("unsafe", False) and "dm log" in dm.describe()
    # Without a run.json nothing is recorded to contradict, and nothing can be assumed either.
    assert model.reading(None, "qemu", "unsafe").describe().startswith("as given")
    with pytest.raises(model.ModelError, match="give --recorder and --cache"):
        model.reading(None, cache="unsafe")
    assert model.recorded({"config": {"recorder": "qemu", "cache": "none"}}) == ("qemu", "none")
    assert model.recorded({"config": {"recorder": "none", "cache": "none"}}) is None  # a dm-flakey run
    assert model.recorded(["not", "a", "run"]) is None
