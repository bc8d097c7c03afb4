"""The host-dm recorder for real: a nested recording in CI (an outer TCG guest plays the host, with
its device-mapper; one tiny shell workload under `cache=writeback`), its logs replayed against the
inner guest's final image, and the validation passing on it; the native path where this host has
device-mapper (the Vagrant VM), skipped with its reason elsewhere."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from crashlab import hostdm, hostrecord, logformat, validate
from crashlab.cachemodes import cache_mode
from crashlab.cli import cli
from crashlab.guest import shell as shellguest
from crashlab.guest.provision import Guest
from crashlab.record import RecordConfig, Recording
from crashlab.recorders import Recorder

pytest_plugins = ["conftest_guest"]


def config(nested: bool, cache: str = "writeback") -> RecordConfig:
    # TCG inside TCG: the inner guest takes about 90 s to its userspace on a quiet machine.
    return RecordConfig(recorder=Recorder.HOST_DM, nested=nested, cache=cache_mode(cache),
                        workload=shellguest.WORKLOAD, transport="shell", memory_mib=256,
                        accel=os.environ.get("CRASHLAB_ACCEL", "auto"), timeout_s=900)


@pytest.fixture(scope="session")
def nested(tmp_path_factory: pytest.TempPathFactory, guest: Guest) -> Recording:
    return hostrecord.record(config(nested=True), tmp_path_factory.mktemp("hostdm") / "wb", guest=guest)


def raw_replay(log: Path, size: int, dest: Path) -> str:
    """SHA-256 of the image a log rebuilds with every data entry written, markers included."""
    fd = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        with logformat.open_log(log) as r:
            for e in r.index():
                if e.carries_data:
                    os.pwrite(fd, r.data(e), e.offset)
                elif e.is_discard:
                    logformat.punch_hole(fd, e.offset, e.length)
    finally:
        os.close(fd)
    return sha(dest)


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def check_recording(rec: Recording, nested: bool, tmp: Path) -> None:
    run = json.loads((rec.out_dir / "run.json").read_text())
    hd = run["host_dm"]
    assert run["config"]["recorder"] == "host-dm" and hd["nested"] is nested
    assert run["config"].get("nested", False) is nested
    assert ("outer guest" in hd["host"]) is nested
    assert hd["map"]["host_fs_writes"] > 0  # the host filesystem's journal and inodes, dropped
    assert hd["map"]["flushes"] > 0 and run["log"]["flushes"] == hd["map"]["flushes"]
    size = rec.image.stat().st_size
    image = sha(rec.image)
    # The host's log in image space, QEMU's log of the same run and the image read off the host
    # disk are one image, byte for byte.
    assert raw_replay(rec.log, size, tmp / "host.img") == image
    assert raw_replay(rec.out_dir / "qemu" / "write.log", size, tmp / "qemu.img") == image
    with logformat.open_log(rec.log) as r:
        es = r.index()
        assert [e.mark for e in es if e.is_mark] == [hostdm.MARK_START, hostdm.MARK_INNER_EXIT,
                                                     "dm-log-writes-end"]
        # What the host wrote to the filesystem region is whole pages of its page cache.
        fs = [e for e in es if e.is_write and e.offset < hd["fs_bytes"]]
        assert fs and all(e.offset % 4096 == 0 and e.length % 4096 == 0 for e in fs)
        # Every in-band marker is an entry of its own (a page holds several), so each is read.
        seqs = {e.marker.seq for e in es if e.marker}
        assert seqs == {m.seq for m in shellguest.plan(rec.config.seed, rec.config.scale).markers}


@pytest.mark.guest
def test_nested_host_dm_replays_to_the_inner_guests_final_image(nested: Recording, tmp_path: Path) -> None:
    check_recording(nested, True, tmp_path)


@pytest.mark.guest
def test_nested_host_dm_validates_against_the_qemu_model(nested: Recording) -> None:
    rep = validate.validate_recording(nested.out_dir)
    torn = rep.readings["torn 4096"]
    assert rep.nested and torn.passed, torn.examples
    assert torn.prefixes > 50 and 1 < torn.visited <= torn.candidates
    r = CliRunner().invoke(cli, ["validate", "--json", str(nested.out_dir)])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["nested"] is True and out["passed"] is True
    text = CliRunner().invoke(cli, ["validate", str(nested.out_dir)]).output
    assert "NESTED: an outer guest played the host" in text


@pytest.mark.guest
def test_native_host_dm_where_this_host_has_device_mapper(guest: Guest, tmp_path: Path) -> None:
    why = hostdm.Dmsetup().unavailable()
    if why:
        pytest.skip(f"native host-dm needs this host's device-mapper: {why} (the Vagrant VM has it)")
    rec = hostrecord.record(config(nested=False), tmp_path / "native", guest=guest)
    check_recording(rec, False, tmp_path)
    assert validate.validate_recording(rec.out_dir).passed
