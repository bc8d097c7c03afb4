"""The host-dm recorder's pieces without a guest: dmsetup's commands against a fake dmsetup, FIEMAP
on a real file, the extent map, the device log's translation to image space, and the model and the
writeback-order strategy on the real nested host-dm fixtures."""

from __future__ import annotations

import json
import random
import stat
import struct
from pathlib import Path

import pytest
from test_model import FIXTURES

from crashlab import crashstates as cs
from crashlab import hostdm, hostrecord, logformat, model, validate
from crashlab.cachemodes import CACHE_MODES
from crashlab.guest.provision import Guest
from crashlab.logformat import FUA, LogWriter
from crashlab.record import ConfigError, RecordConfig, record
from crashlab.recorders import Recorder

SS = 512
NESTED = {mode: FIXTURES / f"nested-hostdm-{mode}.log.xz" for mode in ("writeback", "none", "unsafe")}


# --- dmsetup -------------------------------------------------------------------------------------

def fake_dmsetup(tmp: Path, targets: str = "log-writes v1 [dm]\nlinear v1\n",
                 fail: str = "") -> hostdm.Dmsetup:
    """A dmsetup that logs its argv, makes the node on create, and fails the command named `fail`."""
    mapper = tmp / "mapper"
    mapper.mkdir()
    (mapper / "control").touch()
    script = tmp / "dmsetup"
    script.write_text(f"""#!/bin/sh
echo "$*" >> {tmp}/calls
[ "$1" = "{fail}" ] && {{ echo "device-mapper: $1 ioctl failed: Device or resource busy" >&2; exit 1; }}
case "$1" in
    targets) printf '{targets}' ;;
    create) touch {mapper}/"$2" ;;
    remove) rm -f {mapper}/"$2" ;;
esac
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return hostdm.Dmsetup(str(script), 10, mapper)


def calls(tmp: Path) -> list[str]:
    return (tmp / "calls").read_text().splitlines()


def test_dmsetup_commands_are_the_log_writes_ones(tmp_path: Path) -> None:
    dm = fake_dmsetup(tmp_path)
    assert dm.unavailable() is None
    table = hostdm.log_writes_table(409600, "/dev/loop3", "/dev/loop4")
    assert table == "0 409600 log-writes /dev/loop3 /dev/loop4"
    assert dm.create(hostdm.LOG_TARGET, table) == tmp_path / "mapper" / hostdm.LOG_TARGET
    dm.mark(hostdm.LOG_TARGET, hostdm.MARK_START)
    dm.remove(hostdm.LOG_TARGET)
    assert calls(tmp_path) == ["targets", f"create {hostdm.LOG_TARGET} --table {table}",
                               f"message {hostdm.LOG_TARGET} 0 mark start", f"remove {hostdm.LOG_TARGET}"]
    with pytest.raises(hostdm.HostDmError, match="nothing to log"):
        hostdm.log_writes_table(0, "/dev/loop3", "/dev/loop4")


def test_dmsetup_failures_are_one_line(tmp_path: Path) -> None:
    dm = fake_dmsetup(tmp_path, fail="remove")
    with pytest.raises(hostdm.HostDmError, match=r"^.*dmsetup remove .*Device or resource busy$"):
        dm.remove("x")


def test_a_host_without_log_writes_or_device_mapper_says_which(tmp_path: Path) -> None:
    assert "no log-writes target" in (fake_dmsetup(tmp_path, targets="linear v1\n").unavailable() or "")
    assert "no " in (hostdm.Dmsetup(mapper=tmp_path / "none").unavailable() or "")
    # The native recorder refuses up front and points at --nested; nothing is recorded.
    cfg = RecordConfig(recorder=Recorder.HOST_DM, workload="sh-smallfiles", transport="shell")
    guest = Guest(tmp_path / "k", tmp_path / "i", "6.1", None, None, (), "key", tmp_path)
    with pytest.raises(ConfigError, match="--nested"):
        hostrecord.record(cfg, tmp_path / "out", guest=guest, dm=hostdm.Dmsetup(mapper=tmp_path / "none"))
    assert not (tmp_path / "out" / "write.log").exists()


def test_host_dm_goes_through_its_own_recorder_and_nested_only_with_it() -> None:
    with pytest.raises(ConfigError, match="--recorder host-dm"):
        record(RecordConfig(recorder=Recorder.HOST_DM), "/nonexistent")
    with pytest.raises(ConfigError, match="--nested"):
        RecordConfig(recorder=Recorder.QEMU, nested=True).validate()
    # run.json of every other recording is unchanged; a nested one says so.
    assert "nested" not in RecordConfig().as_dict()
    assert RecordConfig(recorder=Recorder.HOST_DM, nested=True).as_dict()["nested"] is True


def test_the_outer_job_carries_the_config_and_guest_back_to_their_types(tmp_path: Path) -> None:
    cfg = RecordConfig(recorder=Recorder.HOST_DM, nested=True, cache=CACHE_MODES["none"], scale=2,
                       workload_path=("/w",), params=(("k", "v"),))
    guest = Guest(tmp_path / "vmlinuz", tmp_path / "initrd.img", "6.1.0", "linux-image", "1", ("a.ko",),
                  "abc", tmp_path)
    job = json.loads(json.dumps(hostrecord.outer_job(cfg, guest, None)))
    assert job["mode"] == "hostdm" and (job["disk"], job["log_dev"]) == ("/dev/vda", "/dev/vdb")
    assert hostrecord.config_from_job(job["config"]) == cfg
    assert hostrecord.guest_from_job(job["guest"]) == guest
    assert hostrecord.inner_config(cfg).recorder is Recorder.QEMU


# --- FIEMAP and the extent map ---------------------------------------------------------------------

def test_fiemap_maps_a_written_file_in_full(tmp_path: Path) -> None:
    img = tmp_path / "img"
    hostdm.write_zeros(img, 3 << 20)
    try:
        extents = hostdm.fiemap(img)
    except hostdm.HostDmError as e:
        pytest.skip(f"this filesystem has no FIEMAP: {e}")
    ext = hostdm.check_extents(extents, 3 << 20)
    assert sum(x.length for x in ext) >= 3 << 20 and ext[0].logical == 0
    # A sparse file has holes, and check_extents says so.
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(1 << 20)
        f.seek(512 << 10)
        f.write(b"x" * 4096)
    with pytest.raises(hostdm.HostDmError, match="hole"):
        hostdm.check_extents(hostdm.fiemap(sparse), 1 << 20)


def test_fiemap_reply_parses_and_bad_extents_are_refused() -> None:
    buf = hostdm.fiemap_request(0, 2)
    struct.pack_into("=I", buf, 20, 2)  # fm_mapped_extents
    struct.pack_into("=QQQ16xI12x", buf, 32, 0, 8192, 4096, 0)
    struct.pack_into("=QQQ16xI12x", buf, 32 + 56, 4096, 65536, 4096, hostdm.FIEMAP_EXTENT_LAST)
    ext = hostdm.parse_fiemap(buf)
    assert ext == [hostdm.Extent(0, 8192, 4096), hostdm.Extent(4096, 65536, 4096, 1)]
    assert hostdm.check_extents(ext, 8192) == ext
    with pytest.raises(hostdm.HostDmError, match="unwritten"):
        hostdm.check_extents([hostdm.Extent(0, 0, 8192, 0x800)], 8192)
    with pytest.raises(hostdm.HostDmError, match="cover 4096 of its 8192"):
        hostdm.check_extents(ext[:1], 8192)
    with pytest.raises(hostdm.HostDmError, match="not \\[\\["):
        hostdm.extents_from_json([[1, 2]])


def test_extent_map_cuts_device_ranges_into_image_pieces() -> None:
    # Image bytes 0..8K at device 64K, 8K..12K at device 16K; the image is 10K long.
    em = hostdm.ExtentMap([hostdm.Extent(0, 65536, 8192), hostdm.Extent(8192, 16384, 4096)], 10240)
    assert em.to_image(0, 16384) == []  # host metadata before the image
    assert em.to_image(60 << 10, 8192) == [(0, 65536, 4096)]  # straddles the extent's start
    assert em.to_image(16384, 4096) == [(8192, 16384, 2048)]  # cut at the image's end
    assert em.to_image(65536 + 4096, 4096) == [(4096, 65536 + 4096, 4096)]


def test_map_log_keeps_image_writes_and_flushes_and_drops_the_host_fs(tmp_path: Path) -> None:
    img_at = 1 << 20  # the image's one extent starts at device byte 1 MiB
    em = hostdm.ExtentMap([hostdm.Extent(0, img_at, 64 << 10)], 64 << 10)
    rng = random.Random(1)
    a, b, journal = rng.randbytes(4096), rng.randbytes(8192), rng.randbytes(4096)
    dev = tmp_path / "dev.log"
    with LogWriter(dev, SS) as w:
        w.mark("start")
        w.write(img_at // SS, a)
        w.write(8, journal, logformat.METADATA)  # host journal
        w.flush(FUA | logformat.METADATA)
        w.write((img_at - 4096) // SS, b, FUA)  # half host metadata, half image
        w.mark("inner_exit")
    out = tmp_path / "img.log"
    with logformat.open_log(dev) as r:
        st = hostdm.map_log(r, em, out)
    assert (st.image_writes, st.host_fs_writes, st.split_writes, st.flushes) == (2, 1, 0, 1)
    assert st.host_fs_bytes == 4096 + 4096 and st.image_bytes == 8192
    with logformat.open_log(out) as r:
        es = r.index()
        assert [e.kind for e in es] == ["mark", "write", "flush", "write", "mark"]
        assert (es[1].offset, bytes(r.data(es[1]))) == (0, a)
        assert (es[3].offset, bytes(r.data(es[3])), es[3].is_fua) == (0, b[4096:], True)
        assert st.entries_out == len(es)


def test_extract_image_reads_the_extents_off_the_disk(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    data = random.Random(2).randbytes(3 * 4096)
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
        f.seek(65536)
        f.write(data)
    ext = [hostdm.Extent(4096, 65536, 8192), hostdm.Extent(0, 65536 + 8192, 4096)]
    hostdm.extract_image(disk, ext, 12288, tmp_path / "img")
    assert (tmp_path / "img").read_bytes() == data[8192:] + data[:8192]


# --- the model and the strategy on the real nested fixtures ------------------------------------------

@pytest.mark.parametrize("mode", list(NESTED))
def test_host_dm_model_reads_host_flushes_in_every_mode(mode: str) -> None:
    with logformat.open_log(NESTED[mode]) as r:
        es = r.index()
    m = model.LogModel(es, model.config("host-dm", mode))
    assert m.cfg.window_s == float("inf") and not m.cfg.prefix_only and m.cfg.flushes_count
    flushes = [e.index for e in es if e.is_flush]
    assert (len(flushes) == 0) == (mode == "unsafe")  # what reached the host: no flush under unsafe
    for end in (*flushes[:20], len(es)):
        cp = m.crash(end + 1 if end < len(es) else end)
        last = max((f for f in flushes if f <= cp.end - 1), default=None)
        assert cp.flush == last
        # Everything before the host's last flush is durable, everything after it volatile.
        assert all(i > (last or -1) for i in cp.volatile)
        assert set(m.durable(cp)) == {i for i in m.ops if i < cp.end and (last is not None and i < last)}
    # The qemu model under unsafe reads no durability into flushes; the host-dm one always does.
    assert model.config("qemu", "unsafe").flushes_count is False


def test_host_dm_ids_round_trip_and_no_other_cache_mode_is_read_into_them() -> None:
    with logformat.open_log(NESTED["writeback"]) as r:
        m = model.LogModel(r.index(), model.config("host-dm", "writeback"))
        camp = cs.generate(m, cs.log_digest(r), 5, 1)
    for s in camp.states:
        assert "-hostdm-writeback-winf-" in s.id and cs.parse_id(s.id) == s
    with pytest.raises(model.ModelError, match="no other mode"):
        model.reading(("host-dm", "writeback"), what_if="unsafe")
    assert model.reading(("host-dm", "writeback")).describe() == \
        "as recorded (run.json): recorder host-dm, cache writeback"


@pytest.mark.parametrize("mode", ["writeback", "unsafe"])
def test_the_host_flusher_writes_in_offset_order(mode: str) -> None:
    # What writeback-order is learnt from: per flush epoch, a few ascending sweeps, not a scatter.
    with logformat.open_log(NESTED[mode]) as r:
        writes, epochs, runs = validate.sweeps(r.index())
    assert writes > 1000 and runs < writes / 20
    assert runs <= 2 * epochs + 40


@pytest.mark.parametrize("mode", ["writeback", "unsafe"])
def test_writeback_order_states_are_one_offset_order_sweep(mode: str, tmp_path: Path) -> None:
    with logformat.open_log(NESTED[mode]) as r:
        m = model.LogModel(r.index(), model.config("qemu", mode, "inf", None))
        digest = cs.log_digest(r)
        camp = cs.generate(m, digest, 12, 3, "writeback-order")
        assert len(camp.states) == 12
        assert camp.states == cs.generate(m, digest, 12, 3, "writeback-order").states  # deterministic
        built = 0
        with cs.Materializer(r, m, digest, workdir=str(tmp_path), size=256 << 20) as mat:
            for st in camp.states:
                assert st.sel[0] == "o" and cs.parse_id(st.id) == st
                k, start, count = (int(f, 16) for f in st.sel[1:].split("."))
                res = cs.resolve(m, st)
                snap = res.cp.volatile[:k]
                pages = cs.dirty_pages(m, snap)
                swept = set((pages[start:] + pages[:start])[:count])
                assert set(res.chosen) <= set(snap)  # nothing after the snapshot
                for i in res.chosen:  # each chosen op reaches the sweep, and only its swept pages
                    e = m.entries[i]
                    pieces = res.clip.get(i, ((e.offset, e.length),))
                    for off, n in pieces:
                        assert {p for p in range(off // cs.PAGE, (off + n - 1) // cs.PAGE + 1)} <= swept
                for i in set(snap) - set(res.chosen):
                    e = m.entries[i]
                    touched = range(e.offset // cs.PAGE, (e.offset + e.length - 1) // cs.PAGE + 1)
                    assert not set(touched) & swept
                if built < 3:  # the image: each swept page as of the snapshot, the rest as durable
                    mat.build(st, tmp_path / "s.img")
                    img = (tmp_path / "s.img").read_bytes()
                    expect = bytearray(256 << 20)
                    for i in [*m.durable(res.cp), *sorted(res.chosen)]:
                        e = m.entries[i]
                        for off, n in res.clip.get(i, ((e.offset, e.length),)):
                            expect[off:off + n] = bytes(r.data(e))[off - e.offset:off - e.offset + n]
                    assert img == bytes(expect)
                    built += 1
    with pytest.raises(cs.CrashStateError, match="volatile ops"):
        cs.resolve(m, cs.CrashState(digest[:10], m.cfg, m.n, "o" + "f" * 12 + ".0.0"))
