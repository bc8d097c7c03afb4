"""Network storage without a guest: the namespace plumbing read back through pyroute2 itself, the
storage server's command line and a real qemu-storage-daemon logging a qemu-io client's writes over
NBD, fault parsing, and the storage axis of cells."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from pyroute2 import IPRoute, NetNS

from crashlab import logformat, netns, report
from crashlab.cachemodes import CACHE_MODES
from crashlab.campaign import Cell, Matrix
from crashlab.check.outcome import Outcome
from crashlab.diskmodels import DISK_MODELS
from crashlab.guest.machine import Drive, NbdClient, drive_args
from crashlab.nbd import Export, StorageServer, server_argv
from crashlab.netfaults import Fault
from crashlab.record import ConfigError, RecordConfig
from crashlab.recorders import Recorder

needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("qemu-storage-daemon"),
                                reason="network namespaces need root")


# --- pure ------------------------------------------------------------------------------------------

def test_plan_names_fit_the_kernel_and_avoid_taken_networks() -> None:
    p = netns.plan("123-456", 0)
    assert len(p.host_if) <= 15 and len(p.ns_if) <= 15 and p.host_if != p.ns_if
    assert p.network.subnet_of(netns.POOL) and p.network.prefixlen == 30
    assert {p.host_addr, p.ns_addr} == {str(h) for h in p.network.hosts()}
    q = netns.plan("123-456", 0, taken=[p.network])
    assert q.name == p.name and not q.network.overlaps(p.network)
    wide = netns.plan("123-456", 0, taken=[ipaddress.IPv4Network("10.213.0.0/17")])
    assert not wide.network.overlaps(ipaddress.IPv4Network("10.213.0.0/17"))
    assert netns.owner_of(p.name) == "123-456"


def test_loss_program_drops_below_its_threshold() -> None:
    prog = netns.loss_program(0.25)
    assert len(prog) == 6 * 8
    imm = int.from_bytes(prog[8 + 4:8 + 8], "little", signed=False)
    assert imm == 2**30  # a quarter of the u32 range
    assert netns.loss_program(1.0)[12:16] == (2**32 - 1).to_bytes(4, "little")


def test_server_argv_puts_each_half_of_the_cache_mode_where_it_acts(tmp_path: Path) -> None:
    for mode in CACHE_MODES.values():
        argv = server_argv(Export(tmp_path / "a,b.img", mode, log=tmp_path / "w.log"), "10.213.0.2",
                           tmp_path / "q.sock")
        text = " ".join(argv)
        assert f"filename={tmp_path}/a,,b.img,cache.direct={'on' if mode.direct else 'off'}" in text
        assert f"driver=blklogwrites,node-name=logged,file=image,log=log,log-sector-size=512," \
               f"cache.no-flush={'on' if mode.no_flush else 'off'}" in text
        through = "off" if mode.write_cache else "on"
        assert f"node-name=logged,name=data,writable=on,writethrough={through}" in text
        assert argv.index("--monitor") > argv.index("--export")  # the QMP socket is the ready signal
    plain = " ".join(server_argv(Export(tmp_path / "i", CACHE_MODES["none"]), "10.213.0.2", tmp_path / "q"))
    assert "blklogwrites" not in plain and "node-name=image,name=data" in plain


def test_an_nbd_drive_reaches_its_export_and_refuses_a_local_log(tmp_path: Path) -> None:
    client = NbdClient("10.213.0.2", 10809, "data", reconnect_delay_s=5)
    args = drive_args(0, Drive(tmp_path / "i", CACHE_MODES["unsafe"], serial="data", nbd=client))
    assert args[1] == ("driver=nbd,node-name=disk0,server.type=inet,server.host=10.213.0.2,server.port=10809,"
                       "export=data,reconnect-delay=5,cache.no-flush=on")
    assert "write-cache=on" in args[3] and "werror=report" in args[3]
    with pytest.raises(Exception, match="logged on its server"):
        drive_args(0, Drive(tmp_path / "i", CACHE_MODES["none"], log=tmp_path / "l", nbd=client))


def test_an_nbd_drive_keeps_its_disk_model_and_leaves_the_file_options_to_the_server(tmp_path: Path) -> None:
    client = NbdClient("10.213.0.2", 10809, "data")
    drive = Drive(tmp_path / "i", CACHE_MODES["none"], serial="data", nbd=client,
                  model=DISK_MODELS["virtio-scsi"], discard="unmap", detect_zeroes="unmap")
    args = drive_args(0, drive)
    assert args[1].endswith("cache.no-flush=off,discard=unmap,detect-zeroes=unmap")
    assert args[2:4] == ["-device", "virtio-scsi-pci,id=scsi0"]
    assert args[5].startswith("scsi-hd,bus=scsi0.0") and args[5].endswith(",serial=data")
    with pytest.raises(Exception, match="server's file"):
        drive_args(0, replace(drive, aio="native"))
    export = Export(tmp_path / "i", CACHE_MODES["none"], log=tmp_path / "l", aio="native", discard="unmap")
    served = " ".join(server_argv(export, "10.213.0.2", tmp_path / "q"))
    assert "cache.no-flush=off,aio=native,discard=unmap" in served
    assert "log-sector-size=512,cache.no-flush=off,discard=unmap" in served
    plain = server_argv(Export(tmp_path / "i", CACHE_MODES["none"]), "10.213.0.2", tmp_path / "q")
    assert "aio=" not in " ".join(plain)
    cell = Cell.parse({"storage": "nbd", "disk": "virtio-scsi", "cache": "none"})
    assert cell.key.endswith(" strategy=random storage=nbd disk=virtio-scsi")
    assert cell.record_config().storage == "nbd" and cell.record_config().disk == "virtio-scsi"


@pytest.mark.parametrize(("text", "expected"), [
    ("server-kill@1.5s", Fault("server-kill", "", 1.5, None)),
    ("link-down@mark:fsync-3", Fault("link-down", "", None, "fsync-3")),
    ("rate=1mbit@0s", Fault("rate", "1mbit", 0.0, None)),
    ("loss=0.05@2s", Fault("loss", "0.05", 2.0, None)),
])
def test_faults_parse(text: str, expected: Fault) -> None:
    assert Fault.parse(text) == expected and Fault.parse(expected.label) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("explode@1s", "unknown action"), ("server-kill", "say when"), ("server-kill@soon", "say when"),
    ("loss=1.5@0s", "fraction"), ("rate=fast@0s", "tc rate"), ("link-up=3@1s", "takes no value"),
    ("delay@1s", "needs a value"),
])
def test_bad_faults_say_why(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Fault.parse(text)


def test_storage_axis_leaves_local_cells_as_they_were() -> None:
    local = Cell()
    assert "storage" not in local.key and "storage" not in local.stored()
    nbd = Cell.parse({"storage": "nbd"})
    assert nbd.key == local.key + " storage=nbd"
    assert nbd.recording_slug != local.recording_slug and "storage=nbd" in nbd.label
    assert Cell.from_config(nbd.config()) == nbd and Cell.from_config(local.config()) == local
    assert "--storage" not in Matrix().command()
    m = Matrix(cache=("none",), barrier=("on",), workload=("smallfiles",), storage=("local", "nbd"))
    assert [c.storage for c in m.cells()] == ["local", "nbd"] and "--storage local,nbd" in m.command()
    with pytest.raises(ValueError, match="unknown storage"):
        Cell.parse({"storage": "iscsi"})
    with pytest.raises(ConfigError, match="recorder qemu"):
        RecordConfig(storage="nbd", recorder=Recorder.DM).validate()
    assert "storage" not in RecordConfig().as_dict()


# --- real: namespaces and a storage server, no guest ------------------------------------------

def _links(ipr: IPRoute, name: str) -> list[int]:
    return list(ipr.link_lookup(ifname=name))


@needs_root
def test_namespace_plumbing_as_netlink_sees_it() -> None:
    with netns.Namespace() as ns:
        p = ns.plan
        assert p is not None and p.name in netns.owned()
        with IPRoute() as ipr:
            (idx,) = _links(ipr, p.host_if)
            link = ipr.get_links(idx)[0]
            assert link.get(("IFLA_LINKINFO", "IFLA_INFO_KIND")) == "veth" and link["flags"] & 1
            assert [(a.get("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=idx, family=2)] \
                == [(p.host_addr, 30)]
        with NetNS(p.name) as inside:
            (peer,) = inside.link_lookup(ifname=p.ns_if)
            assert [(a.get("IFA_ADDRESS"), a["prefixlen"]) for a in inside.get_addr(index=peer, family=2)] \
                == [(p.ns_addr, 30)]
            lo = inside.get_links(inside.link_lookup(ifname="lo")[0])[0]
            assert lo["flags"] & 1
            default = [r for r in inside.get_routes(family=2)
                       if r["dst_len"] == 0 and r.get("RTA_TABLE") == 254]
            assert [r.get("RTA_GATEWAY") for r in default] == [p.host_addr]

        ns.set_link(False)
        with IPRoute() as ipr:
            assert not ipr.get_links(_links(ipr, p.host_if)[0])[0]["flags"] & 1
        ns.set_link(True)
        ns.set_rate("1mbit")
        ns.set_loss(0.1)
        state = ns.state()
        assert state["host"]["up"] and {"tbf", "clsact"} <= set(state["host"]["qdiscs"])
        assert "tbf" in state["ns"]["qdiscs"]
        with IPRoute() as ipr:
            idx = _links(ipr, p.host_if)[0]
            kinds = [f.get_attr("TCA_KIND") for parent in (0xFFFFFFF2, 0xFFFFFFF3)
                     for f in ipr.get_filters(idx, parent=parent)]
            assert "bpf" in kinds
        ns.set_loss(0)
        ns.set_rate(None)
        assert ns.state()["host"]["qdiscs"] == ["noqueue"]
    with IPRoute() as ipr:
        assert not _links(ipr, p.host_if)
    assert p.name not in netns.owned()


@needs_root
def test_reclaim_removes_a_dead_owners_namespace_and_spares_a_live_one() -> None:
    live = netns.Namespace().create()
    dead = netns.Namespace(netns.plan("999999999-1", 0)).create()  # as a killed run leaves one
    try:
        assert dead.name in netns.owned() and live.name in netns.owned()
        assert netns.reclaim() == [dead.name]
        assert dead.name not in netns.owned() and live.name in netns.owned()
        with IPRoute() as ipr:
            assert dead.plan and not _links(ipr, dead.plan.host_if)
    finally:
        dead.close()
        live.close()


@needs_root
def test_a_storage_server_logs_a_clients_writes_over_nbd(tmp_path: Path) -> None:
    image, log = tmp_path / "data.img", tmp_path / "write.log"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    log.touch()
    with netns.Namespace() as ns, StorageServer(Export(image, CACHE_MODES["writeback"], log=log), ns) as srv:
        c = srv.client()
        opts = f"driver=nbd,server.type=inet,server.host={c.host},server.port={c.port},export={c.export}"
        r = subprocess.run(["qemu-io", "--image-opts", opts, "-c", "write -P 0x5a 4096 8192", "-c", "flush"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        pid, temp = srv.process.pid if srv.process else 0, srv.temp_dir
        srv.kill()
        assert not srv.alive()
        srv.restart()
        assert srv.alive() and [what for _, what in srv.events] == ["server-start", "server-kill",
                                                                  "server-start"]
    assert temp is not None and not temp.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with logformat.open_log(log) as reader:
        entries = reader.index()
    writes = [e for e in entries if e.is_write]
    assert [(w.sector * 512, w.nr_sectors * 512) for w in writes] == [(4096, 8192)]
    assert any(e.is_flush for e in entries[entries.index(writes[0]):])
    assert image.read_bytes()[4096:4096 + 8192] == b"\x5a" * 8192


def test_reports_gain_a_storage_column_only_when_a_cell_uses_nbd() -> None:
    local = report.CellResult(Cell().key, Cell().config(), Counter({Outcome.CONSISTENT: 3}))
    remote = Cell.parse({"storage": "nbd"})
    served = report.CellResult(remote.key, remote.config(), Counter({Outcome.DATA_LOSS: 1}))
    assert "storage" not in report.markdown([local]).splitlines()[0]
    head, _, row_local, row_nbd = report.markdown([local, served]).splitlines()[:4]
    assert "| storage |" in head and "| local |" in row_local and "| nbd |" in row_nbd
    assert [r["storage"] for r in report.table_rows([local, served])] == ["local", "nbd"]
