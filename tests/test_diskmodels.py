"""The disk-model and AIO table, its QEMU options, the libvirt XML mapping, and the cells they make."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from crashlab import libvirt, stats
from crashlab.cachemodes import CACHE_MODES
from crashlab.campaign import CampaignError, Cell, Matrix
from crashlab.cli import cli
from crashlab.diskmodels import AIO_MODES, DISK_MODELS, DiskError, check_drive
from crashlab.guest.machine import Drive, drive_args
from crashlab.guest.provision import DISK_MODULES, Guest
from crashlab.record import ConfigError, RecordConfig, job_for, needed_drivers

# --- the table and QEMU's command line -------------------------------------------------------------


def _devices(args: list[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == "-device"]


@pytest.mark.parametrize("name", sorted(DISK_MODELS))
@pytest.mark.parametrize("cache", ["writeback", "writethrough"])
def test_every_model_takes_the_write_cache_from_the_cache_mode(name: str, cache: str) -> None:
    mode = CACHE_MODES[cache]
    devices = _devices(drive_args(0, Drive(Path("/d.img"), mode, model=DISK_MODELS[name], serial="data")))
    disk = devices[-1]
    assert disk.startswith(DISK_MODELS[name].device + ",")
    assert f"write-cache={'on' if mode.write_cache else 'off'}" in disk.split(",")
    assert "serial=data" in disk.split(",") and "drive=disk0" in disk.split(",")


def test_controllers_are_added_and_named_as_libvirt_names_them() -> None:
    wb = CACHE_MODES["writeback"]
    scsi = _devices(drive_args(0, Drive(Path("/d"), wb, model=DISK_MODELS["virtio-scsi"])))
    assert scsi[0] == "virtio-scsi-pci,id=scsi0" and "bus=scsi0.0" in scsi[1]
    sata = _devices(drive_args(0, Drive(Path("/d"), wb, model=DISK_MODELS["ahci"])))
    assert sata[0] == "ahci,id=sata0" and sata[1].startswith("ide-hd,bus=sata0.0,")
    ide = _devices(drive_args(1, Drive(Path("/d"), wb, model=DISK_MODELS["ide"])))
    assert ide == [ide[0]] and "bus=ide.0" in ide[0] and "unit=1" in ide[0]  # no controller: PIIX's


def test_a_default_drive_has_the_command_line_it_always_had() -> None:
    args = drive_args(0, Drive(Path("/d.img"), CACHE_MODES["none"], serial="data"))
    assert args == [
        "-blockdev", "driver=file,node-name=disk0,filename=/d.img,cache.direct=on,cache.no-flush=off",
        "-device", "virtio-blk-pci,drive=disk0,write-cache=on,werror=report,rerror=report,serial=data"]


def test_aio_discard_and_detect_zeroes_go_on_the_nodes_libvirt_puts_them_on() -> None:
    d = Drive(Path("/d.img"), CACHE_MODES["none"], log=Path("/w.log"), aio="native", discard="unmap",
              detect_zeroes="unmap")
    nodes = [a for a in drive_args(0, d) if a.startswith("driver=")]
    file_node, log_node, top = nodes
    assert "aio=native" in file_node and "discard=unmap" in file_node and "detect-zeroes" not in file_node
    assert "aio" not in log_node and "discard" not in log_node  # the log is the tool's, not under test
    assert "discard=unmap" in top and "detect-zeroes=unmap" in top and "aio" not in top


def test_native_aio_needs_o_direct_and_detect_zeroes_unmap_needs_discard() -> None:
    for name, mode in CACHE_MODES.items():
        if mode.direct:
            check_drive(True, name, "native", "ignore", "off")
        else:
            with pytest.raises(DiskError, match="needs host O_DIRECT"):
                check_drive(False, name, "native", "ignore", "off")
    with pytest.raises(DiskError, match="needs discard=unmap"):
        check_drive(True, "none", "threads", "ignore", "unmap")
    assert not AIO_MODES["io_uring"].needs_direct


def test_the_guest_loads_each_models_drivers_and_the_kernel_says_which_option_is_missing() -> None:
    assert DISK_MODULES["virtio-blk"] == ()  # always loaded
    assert set(DISK_MODULES["virtio-scsi"]) == {"virtio_scsi", "sd_mod"}
    guest = Guest(Path("k"), Path("i"), "6.1-test", None, None, (), "key", Path("d"), absent=("ahci", "xfs"))
    assert guest.lacking(["ext4", "virtio_scsi"]) is None
    msg = guest.lacking(needed_drivers(RecordConfig(disk="ahci", fs="xfs")))
    assert msg is not None and "CONFIG_SATA_AHCI" in msg and "CONFIG_XFS_FS" in msg and "6.1-test" in msg


def test_the_recording_job_finds_its_disks_by_serial() -> None:
    job = job_for(RecordConfig(disk="ide", recorder=RecordConfig().recorder))
    assert job["disk"] == "ide" and job["data_serial"] == "data" and job["log_serial"] == "log"


def test_record_config_refuses_what_qemu_would() -> None:
    with pytest.raises(ConfigError, match="O_DIRECT"):
        RecordConfig(aio="native").validate()
    with pytest.raises(ConfigError, match="unknown disk model 'floppy'"):
        RecordConfig(disk="floppy").validate()
    with pytest.raises(ConfigError, match="go together"):
        RecordConfig(kernel="/boot/vmlinuz").validate()


# --- cells: new fields stay out of keys at their defaults; set, they make another cell ---------------

def test_new_fields_at_their_defaults_leave_key_and_slug_as_they_were() -> None:
    c = Cell()
    assert c.key == ("fs=ext4 cache=writeback barrier=on recorder=qemu workload=smallfiles window=default "
                     "torn=0 data_mode=ordered seed=1 scale=1 strategy=random")
    assert "disk" not in c.stored() and "kernel" not in c.config()


def test_disk_aio_kernel_and_qemu_are_other_cells_and_other_recordings(tmp_path: Path) -> None:
    base = Cell(cache=CACHE_MODES["none"])
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"one kernel")
    variants = [base, Cell.parse({"disk": "ide"}, base), Cell.parse({"aio": "native"}, base),
                Cell.parse({"kernel": str(kernel), "modules": str(tmp_path)}, base)]
    assert len({v.key for v in variants}) == len({v.recording_slug for v in variants}) == len(variants)
    # The same path with other content is another cell: the key carries the digest.
    before = variants[-1].key
    kernel.write_bytes(b"a rebuilt kernel")
    assert Cell.parse({"kernel": str(kernel), "modules": str(tmp_path)}, base).key != before
    assert Cell.from_config(variants[1].config()) == variants[1]


def test_a_matrix_has_disk_and_aio_axes_and_drops_what_qemu_refuses() -> None:
    m = Matrix(cache=("writeback", "none"), barrier=("on",), workload=("smallfiles",),
               disk=("virtio-blk", "ide"), aio=("threads", "native"))
    got = {(c.cache.name, c.disk, c.aio) for c in m.cells()}
    assert ("writeback", "ide", "native") not in got and ("none", "ide", "native") in got
    assert len(got) == 6  # 2 disks x (writeback: threads; none: threads, native)
    assert "--disk virtio-blk,ide --aio threads,native" in m.command()
    assert "--disk" not in Matrix().command()
    with pytest.raises(CampaignError, match="empty: aio=native needs"):
        Matrix(cache=("writeback",), aio=("native",)).cells()


def test_a_matrix_toml_takes_the_new_keys(tmp_path: Path) -> None:
    f = tmp_path / "m.toml"
    f.write_text('cache = ["none"]\ndisk = ["virtio-scsi", "ide"]\naio = "io_uring"\ndiscard = "unmap"\n')
    cells = Matrix.from_toml(f).cells()
    assert {c.disk for c in cells} == {"virtio-scsi", "ide"} and {c.aio for c in cells} == {"io_uring"}
    assert {c.discard for c in cells} == {"unmap"}
    f.write_text("kernel = 3\n")
    with pytest.raises(CampaignError, match="kernel must be a string"):
        Matrix.from_toml(f)


# --- libvirt XML, on the examples of libvirt's own docs and tests ------------------------------------

DOMAIN = """<domain type='kvm'>
  <name>demo</name>
  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none' io='native' discard='unmap' detect_zeroes='unmap'/>
      <source file='/var/lib/libvirt/images/demo.img'/>
      <target dev='sda' bus='scsi'/>
      <address type='drive' controller='0' bus='0' target='0' unit='0'/>
    </disk>
    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='hdc' bus='ide'/>
      <readonly/></disk>
    <controller type='scsi' index='0' model='virtio-scsi'/>
  </devices>
</domain>"""


def disk(driver: str = "<driver name='qemu' type='raw'/>", target: str = "<target dev='vda' bus='virtio'/>",
         attrs: str = "type='file' device='disk'", extra: str = "") -> str:
    return f"<disk {attrs}>{driver}<source file='/var/lib/libvirt/images/a.img'/>{target}{extra}</disk>"


def test_a_domain_gives_its_disk_cache_io_discard_zeroes_and_bus() -> None:
    spec = libvirt.parse(DOMAIN)
    assert spec.cell_fields() == {"cache": "none", "aio": "native", "discard": "unmap",
                                  "detect_zeroes": "unmap", "disk": "virtio-scsi"}
    assert Cell.parse(spec.cell_fields()).validate().disk == "virtio-scsi"


def want(cache: str, aio: str, discard: str, zeroes: str, model: str) -> dict[str, str]:
    return {"cache": cache, "aio": aio, "discard": discard, "detect_zeroes": zeroes, "disk": model}


IDE, SATA = "<target dev='hda' bus='ide'/>", "<target dev='sdb' bus='sata'/>"


@pytest.mark.parametrize(("xml", "expected"), [
    (disk(), want("writeback", "threads", "ignore", "off", "virtio-blk")),  # libvirt's defaults are QEMU's
    (disk("<driver name='qemu' type='raw' cache='default' io='default' discard='default'/>"),
     want("writeback", "threads", "ignore", "off", "virtio-blk")),
    (disk("<driver name='qemu' type='raw' cache='writethrough' io='io_uring'/>", IDE),
     want("writethrough", "io_uring", "ignore", "off", "ide")),
    (disk("<driver name='qemu' type='raw' cache='directsync' io='native'/>", SATA),
     want("directsync", "native", "ignore", "off", "ahci")),
    # unmap without discard=unmap is on, as libvirt's virDomainDiskGetDetectZeroesMode makes it
    (disk("<driver name='qemu' type='raw' cache='unsafe' detect_zeroes='unmap'/>"),
     want("unsafe", "threads", "ignore", "on", "virtio-blk")),
    # no bus: libvirt's from the dev= prefix
    (disk(target="<target dev='hdb'/>"),
     want("writeback", "threads", "ignore", "off", "ide")),
])
def test_disk_elements_map_as_libvirt_maps_them(xml: str, expected: dict[str, str]) -> None:
    assert libvirt.parse(xml).cell_fields() == expected


@pytest.mark.parametrize(("xml", "message"), [
    (disk("<driver name='qemu' type='raw' cache='bogus'/>"), "unknown cache mode 'bogus'"),
    (disk("<driver name='qemu' type='raw' io='posix'/>"), "unknown io='posix'"),
    (disk("<driver name='qemu' type='raw' discard='trim'/>"), "unknown discard='trim'"),
    (disk("<driver name='qemu' type='raw' detect_zeroes='yes'/>"), "unknown detect_zeroes='yes'"),
    (disk("<driver name='qemu' type='raw' cache='writeback' io='native'/>"), "needs host O_DIRECT"),
    (disk("<driver name='qemu' type='qcow2'/>"), "type='qcow2'"),
    (disk("<driver name='qemu' type='raw' iothread='1'/>"), "iothread='1'"),
    (disk("<driver name='qemu' type='raw' error_policy='stop'/>"), "error_policy='stop'"),
    (disk(target="<target dev='sdz' bus='usb'/>"), "bus='usb' cannot be honoured"),
    (disk(target="<target dev='xyz'/>"), "no <target bus"),
    (disk(target="<target dev='sda' bus='scsi'/>"), "pass the whole domain"),
    (disk(attrs="type='network' device='disk'"), "type='network'"),
    (disk(attrs="type='file' device='cdrom'"), "device='cdrom'"),
    (disk(attrs="type='file' device='disk' model='virtio-transitional'"), "model='virtio-transitional'"),
    (disk(extra="<iotune><total_bytes_sec>1000</total_bytes_sec></iotune>"), "<iotune>"),
    (disk(extra="<blockio logical_block_size='4096'/>"), "<blockio>"),
    ("<network/>", "expected a <domain> or <disk>"),
    ("<disk", "not XML"),
    (DOMAIN.replace(" model='virtio-scsi'", ""), "lsilogic"),
    (DOMAIN.replace("model='virtio-scsi'", "model='lsisas1068'"), "lsisas1068"),
    (DOMAIN.replace("device='cdrom'", "device='disk'"), "2 disks"),
    (DOMAIN.replace("machine='pc-i440fx-7.2'", "machine='pc-q35-7.2'").replace("bus='scsi'", "bus='ide'"),
     "no IDE controller"),
])
def test_what_cannot_be_honoured_is_refused_by_name(xml: str, message: str) -> None:
    with pytest.raises(libvirt.LibvirtError, match=message.replace("(", r"\(").replace("?", r"\?")):
        libvirt.parse(xml)


def test_the_cli_refuses_an_xml_and_an_option_that_both_set_the_cache(tmp_path: Path) -> None:
    xml = tmp_path / "d.xml"
    xml.write_text(disk())
    store = tmp_path / "none" / "s.sqlite"
    for extra in (["--cache", "none"], ["--disk", "ide"], ["--disk-xml", str(xml)]):
        r = CliRunner().invoke(cli, ["run", "--domain-xml", str(xml), *extra, "--store", str(store)])
        assert r.exit_code == 2 and "give one" in r.output and "Traceback" not in r.output
    bad = tmp_path / "bad.xml"
    bad.write_text(disk("<driver name='qemu' type='raw' cache='nope'/>"))
    r = CliRunner().invoke(cli, ["matrix", "--domain-xml", str(bad), "--store", str(store)])
    assert r.exit_code == 2 and "bad.xml: disk vda: unknown cache mode 'nope'" in r.output
    r = CliRunner().invoke(cli, ["gate", "--before", str(xml), "--store", str(store)])
    assert r.exit_code == 2 and "go together" in r.output
    assert not store.parent.exists()  # refused before anything was made


# --- the gate's comparison ---------------------------------------------------------------------------

def test_holm_adjusts_step_down_and_stays_monotone() -> None:
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5]) == [0.5]
    assert stats.holm([0.6, 0.9]) == [1.0, 1.0]


def test_a_change_is_compared_per_filesystem_with_fisher_and_holm() -> None:
    from collections import Counter

    from crashlab.check.outcome import Outcome
    from crashlab.gate import CellCheck, compare

    def check(fs: str, bad: int, n: int) -> CellCheck:
        return CellCheck(Cell(fs=fs), Counter({Outcome.DATA_LOSS: bad, Outcome.CONSISTENT: n - bad}), n)

    one = compare([check("ext4", 10, 30)], [check("ext4", 0, 30)])
    p = stats.fisher_exact(10, 20, 0, 30)
    assert len(one) == 1 and f"p = {p:.4g}" in one[0] and "differ at 5 %" in one[0] and "Holm" not in one[0]
    two = compare([check("ext4", 10, 30), check("xfs", 1, 30)], [check("ext4", 0, 30), check("xfs", 0, 30)])
    assert all("Holm-adjusted over 2 cells" in line for line in two)
    assert "no significant difference" in two[1]
