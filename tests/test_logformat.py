"""The log format against its own writer (properties), real kernel/QEMU fixtures, and live qemu-io."""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crashlab import logformat, markers
from crashlab.cli import CrashlabError, cli
from crashlab.cli.log import stop_index
from crashlab.logformat import DISCARD, FLUSH, FUA, METADATA, LogWriter, open_log

# Real logs recorded from real guests, copied from shared/fixtures (see tests/data/README.md).
FIXTURES = Path(__file__).parent / "data" / "logs"

# From tests/data/README.md: (superblock count, present entries, entries by (flags, kind)).
FIXTURE_TRUTH = {
    "ext4-dm-barrier-on": (2678, 2678,
                           {(0x0, "write"): 327, (0x10, "write"): 1578, (0x12, "write"): 279,
                            (0x2, "write"): 1, (0x1, "flush"): 65, (0x13, "flush"): 222,
                            (0x4, "discard"): 2, (0x8, "mark"): 204}),
    "ext4-dm-barrier-off": (2396, 2396,
                            {(0x0, "write"): 328, (0x10, "write"): 1857, (0x1, "flush"): 5,
                             (0x4, "discard"): 2, (0x8, "mark"): 204}),
    "ext4-qemu-writecache-on": (1251, 1251,
                                {(0x0, "write"): 746, (0x1, "flush"): 505}),
    "ext4-qemu-writecache-off": (1442, 1442,
                                 {(0x0, "write"): 732, (0x1, "flush"): 710}),
    "ext4-qemu-noflush": (0, 726,
                          {(0x0, "write"): 726}),
    "nested-hostdm-writeback": (4595, 4595,
                                {(0x0, "write"): 4465, (0x1, "flush"): 127, (0x8, "mark"): 3}),
    "nested-hostdm-none": (383, 383,
                           {(0x0, "write"): 242, (0x1, "flush"): 138, (0x8, "mark"): 3}),
    "nested-hostdm-unsafe": (3821, 3821,
                             {(0x0, "write"): 3818, (0x8, "mark"): 3}),
}
FIXTURE_IMAGE_BYTES = 256 << 20


def fixture_digests() -> dict[str, str]:
    """SHA-256 of each fully replayed fixture, as its README records it."""
    text = (FIXTURES.parent / "README.md").read_text()
    return {m[1]: m[2] for m in re.finditer(r"^\| ([\w-]+)\.log\.xz \| 268435456 \| ([0-9a-f]{64}) \|$",
                                             text, re.M)}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.mark.parametrize("name", sorted(FIXTURE_TRUTH))
def test_real_fixture_reads_and_replays_byte_identical(name: str, tmp_path: Path) -> None:
    sb_count, present, kinds = FIXTURE_TRUTH[name]
    digest = fixture_digests()[name]
    with open_log(FIXTURES / f"{name}.log.xz") as reader:
        s = reader.summary()
        assert (s.superblock_entries, s.entries) == (sb_count, present)
        assert s.recovered_beyond_superblock == present - sb_count
        assert s.damage is None
        assert Counter((e.flags, e.kind) for e in reader.entries()) == kinds
        image = tmp_path / "image"
        image.write_bytes(b"")
        with image.open("r+b") as f:
            f.truncate(FIXTURE_IMAGE_BYTES)
        logformat.replay(reader, image)
    assert sha256_file(image) == digest


def test_native_marks_read_from_kernel_log() -> None:
    with open_log(FIXTURES / "ext4-dm-barrier-on.log.xz") as reader:
        marks = [e.mark for e in reader.entries() if e.is_mark]
    assert marks[:3] == ["mkfs", "mount", "fsync1"]
    assert marks[-2:] == ["umount", "dm-log-writes-end"]
    assert f"fsync{200}" in marks


# --- generated logs ------------------------------------------------------------------------------

SECTOR = 512
DEVICE_SECTORS = 64

op_strategy = st.one_of(
    st.tuples(st.just("write"), st.integers(0, DEVICE_SECTORS - 1), st.integers(1, 8),
              st.sampled_from([0, FUA, METADATA, FUA | METADATA]), st.integers(0, 255)),
    st.tuples(st.just("flush"), st.sampled_from([0, FUA | METADATA])),
    st.tuples(st.just("discard"), st.integers(0, DEVICE_SECTORS - 1), st.integers(1, 8)),
    st.tuples(st.just("mark"), st.text("abcdefghij-_0123456789", min_size=1, max_size=20)),
    st.tuples(st.just("marker"), st.integers(0, 1000), st.sampled_from(["tick", "fsync-1", "x"])),
)


def write_ops(path: Path, ops: list[tuple], sector_size: int = SECTOR, **close: object) -> None:
    with LogWriter(path, sector_size) as w:
        for op in ops:
            match op:
                case ("write", sector, n, flags, fill):
                    n = min(n, DEVICE_SECTORS - sector)
                    w.write(sector, bytes([fill, (sector + fill) % 256]) * (n * sector_size // 2), flags)
                case ("flush", flags):
                    w.flush(flags)
                case ("discard", sector, n):
                    w.discard(sector, min(n, DEVICE_SECTORS - sector))
                case ("mark", name):
                    w.mark(name)
                case ("marker", seq, name):
                    w.write(DEVICE_SECTORS, markers.encode(markers.Marker(seq, seq * 100, name), sector_size))
        w.close(**close)  # type: ignore[arg-type]


def apply_to_bytearray(ops: list[tuple], sector_size: int = SECTOR) -> bytearray:
    disk = bytearray((DEVICE_SECTORS + 1) * sector_size)
    for op in ops:
        match op:
            case ("write", sector, n, _, fill):
                n = min(n, DEVICE_SECTORS - sector)
                disk[sector * sector_size:(sector + n) * sector_size] = (
                    bytes([fill, (sector + fill) % 256]) * (n * sector_size // 2))
            case ("discard", sector, n):
                n = min(n, DEVICE_SECTORS - sector)
                disk[sector * sector_size:(sector + n) * sector_size] = bytes(n * sector_size)
    return disk


fast = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@fast
@given(ops=st.lists(op_strategy, max_size=30), sector_size=st.sampled_from([512, 4096]))
def test_write_then_read_round_trips(tmp_path: Path, ops: list[tuple], sector_size: int) -> None:
    log = tmp_path / "rt.log"
    write_ops(log, ops, sector_size)
    with open_log(log) as reader:
        entries = reader.index()
        assert reader.sector_size == sector_size
        assert len(entries) == len(ops)
        for op, e in zip(ops, entries, strict=True):
            assert e.kind == op[0]
            if op[0] == "write":
                n = min(op[2], DEVICE_SECTORS - op[1])
                assert (e.sector, e.nr_sectors, e.flags) == (op[1], n, op[3])
                assert bytes(reader.data(e)[:2]) == bytes([op[4], (op[1] + op[4]) % 256])
            elif op[0] == "flush":
                assert e.flags == FLUSH | op[1]
            elif op[0] == "discard":
                assert (e.sector, e.nr_sectors, e.flags) == (op[1], min(op[2], DEVICE_SECTORS - op[1]),
                                                              DISCARD)
            elif op[0] == "mark":
                assert e.mark == op[1]
            else:
                assert e.marker == markers.Marker(op[1], op[1] * 100, op[2])
        assert reader.summary().damage is None


@fast
@given(ops=st.lists(op_strategy, max_size=30), data=st.data())
def test_replay_to_k_equals_first_k_entries_applied(tmp_path: Path, ops: list[tuple],
                                                    data: st.DataObject) -> None:
    k = data.draw(st.integers(0, len(ops)))
    log, image = tmp_path / "r.log", tmp_path / "r.img"
    write_ops(log, ops)
    image.write_bytes(bytes((DEVICE_SECTORS + 1) * SECTOR))
    with open_log(log) as reader:
        logformat.replay(reader, image, k)
    assert image.read_bytes() == apply_to_bytearray(ops[:k])


@fast
@given(ops=st.lists(op_strategy, min_size=1, max_size=20), data=st.data())
def test_log_cut_anywhere_reads_to_last_complete_entry(tmp_path: Path, ops: list[tuple],
                                                       data: st.DataObject) -> None:
    log = tmp_path / "cut.log"
    write_ops(log, ops)
    with open_log(log) as reader:
        ends = [e.end_offset for e in reader.index()]
    raw = log.read_bytes()
    cut = data.draw(st.integers(0, len(raw)))
    log.write_bytes(raw[:cut])
    if cut < SECTOR:
        with pytest.raises(logformat.LogFormatError, match="too short"):
            open_log(log).__enter__()
        return
    complete = sum(1 for end in ends if end <= cut)
    with open_log(log) as reader:
        s = reader.summary()
    assert s.entries == complete
    if complete < len(ops):
        # The report names the first missing entry and where it should have started.
        start = ends[complete - 1] if complete else SECTOR
        assert s.damage is not None
        assert s.damage.startswith(f"entry {complete} at byte offset {start}:")
    else:
        assert s.damage is None


def test_stale_superblock_is_scanned_past_and_counted(tmp_path: Path) -> None:
    log = tmp_path / "stale.log"
    ops = [("write", i, 1, 0, i) for i in range(10)] + [("flush", 0)]
    write_ops(log, ops, nr_entries=4)
    with open_log(log) as reader:
        s = reader.summary()
    assert (s.superblock_entries, s.entries, s.recovered_beyond_superblock) == (4, 11, 7)
    assert s.damage is None


def test_blank_superblock_detects_sector_size(tmp_path: Path) -> None:
    log = tmp_path / "blank.log"
    write_ops(log, [("write", 1, 2, 0, 7), ("flush", 0)], sector_size=4096, blank_superblock=True)
    with open_log(log) as reader:
        s = reader.summary()
    assert (s.superblock, s.sector_size, s.entries, s.recovered_beyond_superblock) == ("blank", 4096, 2, 2)


def test_garbage_header_is_damage_naming_entry_and_offset(tmp_path: Path) -> None:
    log = tmp_path / "garbage.log"
    write_ops(log, [("write", i, 1, 0, i) for i in range(6)])
    raw = bytearray(log.read_bytes())
    third = SECTOR + 2 * 2 * SECTOR  # superblock, then (header + one data sector) per entry
    raw[third + 16:third + 24] = (0x400).to_bytes(8, "little")  # an unknown flag
    log.write_bytes(bytes(raw))
    result = CliRunner().invoke(cli, ["log", "inspect", str(log)])
    assert result.exit_code == 1
    assert f"entry 2 at byte offset {third}: unknown flags 0x400" in result.output
    result = CliRunner().invoke(cli, ["log", "replay", str(log), str(tmp_path / "img")])
    assert result.exit_code == 1 and "--salvage" in result.output
    assert not (tmp_path / "img").exists()
    result = CliRunner().invoke(cli, ["log", "replay", "--salvage", str(log), str(tmp_path / "img")])
    assert result.exit_code == 3 and "replayed 2 entries" in result.stdout
    assert f"salvaged: {log}: damaged log: entry 2 at byte offset {third}" in result.stderr


def test_not_a_log_is_a_clear_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"hello world" * 100)
    result = CliRunner().invoke(cli, ["log", "inspect", str(junk)])
    assert result.exit_code == 2
    assert "not a dm-log-writes log: bad superblock at byte offset 0" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["log", "inspect", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "no such log" in result.output


def test_replay_targets(tmp_path: Path) -> None:
    log = tmp_path / "t.log"
    ops = [("write", 0, 1, 0, 1), ("flush", 0), ("mark", "m1"), ("write", 1, 1, 0, 2),
           ("marker", 0, "fsync-1"), ("flush", 0), ("write", 2, 1, 0, 3)]
    write_ops(log, ops)
    with open_log(log) as reader:
        entries = reader.index()
        assert logformat.mark_end(entries, "m1") == 3 and logformat.mark_end(entries, "zz") is None
        assert logformat.flush_end(entries, 2) == 6 and logformat.flush_end(entries, 3) is None
        assert stop_index(reader, "all") == 7
        assert stop_index(reader, "entry:4") == 4
        assert stop_index(reader, "mark:m1") == 3
        assert stop_index(reader, "mark:fsync-1") == 5
        assert stop_index(reader, "flush:2") == 6
        for bad, why in (("flush:3", "only 2 flush"), ("entry:8", "only 7 entries"), ("mark:zz", "no mark"),
                         ("everything", "expected all")):
            with pytest.raises(CrashlabError, match=why):
                stop_index(reader, bad)
    result = CliRunner().invoke(cli, ["log", "replay", str(log), str(tmp_path / "i.img"), "--to", "flush:9"])
    assert result.exit_code == 2 and "only 2 flush entries" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "i.img").exists()


def test_markers_are_recognised_and_not_replayed(tmp_path: Path) -> None:
    log, image = tmp_path / "m.log", tmp_path / "m.img"
    write_ops(log, [("marker", 5, "workload-start"), ("write", 0, 1, 0, 9), ("marker", 6, "tick")])
    image.write_bytes(bytes((DEVICE_SECTORS + 1) * SECTOR))
    with open_log(log) as reader:
        s = reader.summary()
        logformat.replay(reader, image)
    assert (s.writes, s.markers, s.ticks) == (1, 2, 1)
    assert image.read_bytes()[DEVICE_SECTORS * SECTOR:] == bytes(SECTOR)


# --- a real writer no one here wrote: QEMU's blklogwrites through qemu-io --------------------------

QEMU_IO = shutil.which("qemu-io")


@pytest.mark.skipif(QEMU_IO is None, reason="qemu-io missing: the setup installs qemu-utils")
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_qemu_blklogwrites_log_replays_to_identical_image(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    size = 8 << 20
    data, log, rebuilt = tmp_path / "data.img", tmp_path / "write.log", tmp_path / "rebuilt.img"
    for f in (data, rebuilt):
        f.write_bytes(b"")
        with f.open("r+b") as fh:
            fh.truncate(size)
    log.write_bytes(b"")  # QEMU does not truncate its log: always start fresh
    commands: list[str] = []
    issued: list[tuple[str, int, int]] = []  # (kind, offset, length) in the order issued
    for _ in range(rng.randint(20, 60)):
        offset = rng.randrange(0, size - (64 << 10), 512)
        length = rng.randrange(512, 64 << 10, 512)
        if rng.random() < 0.2 and issued:
            commands.append(f"discard {offset} {length}")
            issued.append(("discard", offset, length))
        else:
            commands.append(f"write -P {rng.randrange(1, 256)} {offset} {length}")
            issued.append(("write", offset, length))
        if rng.random() < 0.3:
            commands.append("flush")
            issued.append(("flush", 0, 0))
    commands += ["write -P 7 0 4096", "flush"]
    issued += [("write", 0, 4096), ("flush", 0, 0)]
    opts = (f"driver=blklogwrites,discard=unmap,log-sector-size=512,file.driver=file,"
            f"file.filename={data},log.driver=file,log.filename={log}")
    argv = [QEMU_IO, "--image-opts", opts]
    for c in commands:
        argv += ["-c", c]
    subprocess.run(argv, check=True, capture_output=True, timeout=60)

    result = CliRunner().invoke(cli, ["log", "inspect", "--json", "--entries", str(log)])
    assert result.exit_code == 0, result.output
    s = json.loads(result.output)
    data_ops = [op for op in issued if op[0] != "flush"]
    logged = [(e["kind"], e["offset"], e["length"]) for e in s["entry_list"] if e["kind"] != "flush"]
    assert logged == data_ops
    assert s["writes"] == sum(op[0] == "write" for op in issued)
    assert s["bytes_written"] == sum(op[2] for op in issued if op[0] == "write")
    assert s["discards"] == sum(op[0] == "discard" for op in issued)
    assert s["bytes_discarded"] == sum(op[2] for op in issued if op[0] == "discard")
    # Every flush issued is logged between the data operations around it. qemu-io's default cache
    # is writethrough, so QEMU also emulates FUA on each write with a flush of its own, logged for
    # every write but the first after a flush (see model.Config.prefix_only): flush entries are
    # checked by position, and their total only as a lower bound.
    def flush_after(ops: list[tuple[str, int, int]]) -> list[bool]:
        out: list[bool] = []
        for kind, *_ in ops:
            if kind == "flush":
                if out:
                    out[-1] = True
            else:
                out.append(False)
        return out

    logged_ops = [(e["kind"], e["offset"], e["length"]) for e in s["entry_list"]]
    assert all(got or not want for want, got in zip(flush_after(issued), flush_after(logged_ops),
                                                    strict=True))
    assert s["flushes"] >= sum(op[0] == "flush" for op in issued)

    result = CliRunner().invoke(cli, ["log", "replay", str(log), str(rebuilt)])
    assert result.exit_code == 0, result.output
    assert sha256_file(rebuilt) == sha256_file(data)
