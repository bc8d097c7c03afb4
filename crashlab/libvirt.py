"""A libvirt domain's data disk, read as crashlab cell fields: what a libvirt developer ships.

From a `<domain>` (its one `<disk device='disk'>`) or a bare `<disk>` element this takes the cache
mode, `io=`, `discard=`, `detect_zeroes=`, the bus and the device model, and gives the values that
make QEMU run that disk as libvirt would. The mapping follows libvirt's docs/formatdomain.rst
("Hard drives, floppy disks, CDROMs": the `driver` and `target` elements; "Controllers") and
src/qemu/qemu_command.c, which emits, for a raw file:

- `cache=` -> `cache.direct`/`cache.no-flush` on the nodes and `write-cache=` on the device
  (qemuDomainDiskCachemodeFlags; crashlab.cachemodes has the same table); absent or `default`:
  QEMU's own default, writeback;
- `io=` -> `aio=` on the file (storage) node; absent or `default`: QEMU's, threads;
- `discard=` -> `discard=` on the nodes; absent or `default`: ignore;
- `detect_zeroes=` -> `detect-zeroes=` on the top node; `unmap` without `discard='unmap'` becomes
  `on` (libvirt's virDomainDiskGetDetectZeroesMode does this, it is not an error);
- `<target bus=>` -> the device: virtio `virtio-blk-pci`; scsi `scsi-hd` on the controller of
  that index, which must be `model='virtio-scsi'` (`virtio-scsi-pci`); ide `ide-hd` on the PIIX
  IDE bus; sata `ide-hd` on an AHCI controller. No `bus=`: libvirt derives it from the `dev=`
  prefix (hd: ide, sd: scsi, vd: virtio).

Anything else that changes what the disk does (another format, a network or host-device source,
iotune, blockio, a driver attribute without a mapping here) is refused with the attribute's name,
never ignored: a number measured for a configuration the user did not ship is worse than none.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from crashlab.cachemodes import from_libvirt_disk
from crashlab.diskmodels import AIO_MODES, DETECT_ZEROES, DISCARD, DISK_MODELS, DiskError, check_drive

# <target bus=...> -> crashlab.diskmodels row, through the table's own libvirt_bus column.
BUSES = {m.libvirt_bus: m.name for m in DISK_MODELS.values()}
# libvirt's bus for a target without one (domain_conf.c, from the dev= prefix).
BUS_BY_PREFIX = (("hd", "ide"), ("sd", "scsi"), ("vd", "virtio"))
# <driver> attributes this module maps, or that do not change what the disk does.
DRIVER_ATTRIBUTES = {"name", "type", "cache", "io", "discard", "detect_zeroes"}
# Error policies: crashlab always reports host errors to the guest (werror/rerror=report).
ERROR_POLICIES = ("error_policy", "rerror_policy")
# <disk> children that say where the disk is or how it is named, not how it behaves.
IDENTITY_CHILDREN = {"driver", "source", "target", "address", "alias", "boot", "serial", "backingStore"}


class LibvirtError(ValueError):
    """A domain or disk that cannot be read, or asks for what crashlab cannot honour; one line."""


@dataclass(frozen=True)
class DiskSpec:
    """The cell fields a libvirt disk sets, as names (campaign.Cell.parse takes them)."""

    target: str  # dev= as the domain names it, for messages
    cache: str
    aio: str
    discard: str
    detect_zeroes: str
    disk: str  # crashlab.diskmodels row

    def cell_fields(self) -> dict[str, str]:
        return {"cache": self.cache, "aio": self.aio, "discard": self.discard,
                "detect_zeroes": self.detect_zeroes, "disk": self.disk}

    def describe(self) -> str:
        return (f"{self.target}: disk={self.disk} cache={self.cache} aio={self.aio} "
                f"discard={self.discard} detect_zeroes={self.detect_zeroes}")


def read(path: Path) -> DiskSpec:
    """The data disk of the domain or `<disk>` XML in `path`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise LibvirtError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise LibvirtError(f"{path}: not libvirt XML (not UTF-8 text)") from None
    try:
        return parse(text)
    except LibvirtError as e:
        raise LibvirtError(f"{path}: {e}") from None


def parse(text: str) -> DiskSpec:
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise LibvirtError(f"not XML: {e}") from None
    if root.tag == "disk":
        return disk_spec(root, controllers=None, machine="")
    if root.tag != "domain":
        raise LibvirtError(f"expected a <domain> or <disk> element, got <{root.tag}>")
    disks = [d for d in root.iterfind("devices/disk") if d.get("device", "disk") == "disk"]
    if len(disks) != 1:
        names = ", ".join(_target(d) for d in disks) or "none"
        raise LibvirtError(f"the domain has {len(disks)} disks ({names}); crashlab tests one: "
                           "pass its <disk> element with --disk-xml")
    os_type = root.find("os/type")
    return disk_spec(disks[0], controllers=root.findall("devices/controller"),
                     machine=os_type.get("machine", "") if os_type is not None else "")


def _target(disk: ET.Element) -> str:
    target = disk.find("target")
    return (target.get("dev") if target is not None else None) or "?"


def disk_spec(disk: ET.Element, controllers: list[ET.Element] | None, machine: str) -> DiskSpec:
    """One `<disk>`; `controllers` None: a bare element, whose SCSI controller is not known."""
    name = _target(disk)

    def refuse(what: str) -> LibvirtError:
        return LibvirtError(f"disk {name}: {what} cannot be honoured")

    if (device := disk.get("device", "disk")) != "disk":
        raise refuse(f"device='{device}' (crashlab records a disk)")
    if (kind := disk.get("type", "file")) != "file":
        raise refuse(f"type='{kind}' (crashlab backs the disk with a raw file)")
    if (model := disk.get("model", "virtio")) != "virtio":
        raise refuse(f"model='{model}' (only the default virtio device model)")
    for child in disk:
        if child.tag not in IDENTITY_CHILDREN:
            raise refuse(f"<{child.tag}>")
        if child.tag == "backingStore" and len(child):
            raise refuse("a <backingStore> chain")

    driver = disk.find("driver")
    attrs = dict(driver.attrib) if driver is not None else {}
    for policy in ERROR_POLICIES:
        if attrs.pop(policy, "report") != "report":
            raise refuse(f"{policy}='{driver.get(policy) if driver is not None else ''}' (crashlab "
                         "reports host errors to the guest)")
    if unknown := sorted(set(attrs) - DRIVER_ATTRIBUTES):
        raise refuse(", ".join(f"<driver {k}='{attrs[k]}'>" for k in unknown))
    if attrs.get("name", "qemu") != "qemu":
        raise refuse(f"<driver name='{attrs['name']}'> (only QEMU)")
    if attrs.get("type", "raw") != "raw":
        raise refuse(f"<driver type='{attrs['type']}'> (crashlab records a raw image; a format layer "
                     "adds metadata writes and flushes the model does not know)")
    try:
        mode = from_libvirt_disk(ET.tostring(disk, encoding="unicode"))
    except ValueError as e:
        raise LibvirtError(f"disk {name}: {e}") from None
    aio = _choice(name, "io", attrs, tuple(AIO_MODES))
    discard = _choice(name, "discard", attrs, DISCARD)
    zeroes = _choice(name, "detect_zeroes", attrs, DETECT_ZEROES)
    if zeroes == "unmap" and discard != "unmap":
        zeroes = "on"  # virDomainDiskGetDetectZeroesMode: unmap needs discard=unmap, else on
    spec = DiskSpec(name, mode.name, aio, discard, zeroes, _model(disk, name, controllers, machine))
    try:
        check_drive(mode.direct, mode.name, aio, discard, zeroes)
    except DiskError as e:
        raise LibvirtError(f"disk {name}: {e}") from None
    return spec


def _choice(disk: str, attr: str, attrs: dict[str, str], valid: tuple[str, ...]) -> str:
    """An attribute's value; absent or libvirt's `default` is QEMU's default, the first."""
    value = attrs.get(attr, "default")
    if value == "default":
        return valid[0]
    if value not in valid:
        raise LibvirtError(f"disk {disk}: unknown {attr}='{value}'; valid: default, {', '.join(valid)}")
    return value


def _model(disk: ET.Element, name: str, controllers: list[ET.Element] | None, machine: str) -> str:
    target = disk.find("target")
    bus = target.get("bus") if target is not None else None
    if bus is None:
        bus = next((b for prefix, b in BUS_BY_PREFIX if name.startswith(prefix)), None)
        if bus is None:
            raise LibvirtError(f"disk {name}: no <target bus=...> and no bus libvirt derives from "
                               f"dev='{name}'")
    if bus not in BUSES:
        raise LibvirtError(f"disk {name}: bus='{bus}' cannot be honoured; crashlab models "
                           f"{', '.join(BUSES)}")
    if bus == "ide" and "q35" in machine:
        # libvirt refuses it too: q35 has no IDE controller.
        raise LibvirtError(f"disk {name}: bus='ide' on machine '{machine}', which has no IDE controller")
    if bus == "scsi":
        _scsi_controller(disk, name, controllers)
    return BUSES[bus]


def _scsi_controller(disk: ET.Element, name: str, controllers: list[ET.Element] | None) -> None:
    if controllers is None:
        raise LibvirtError(f"disk {name}: bus='scsi' depends on the domain's <controller type='scsi'>; "
                           "pass the whole domain with --domain-xml")
    address = disk.find("address")
    index = address.get("controller", "0") if address is not None else "0"
    found = [c for c in controllers if c.get("type") == "scsi" and c.get("index", "0") == index]
    # Without a model libvirt picks lsilogic on x86 (qemuDomainDefaultSCSIControllerModel).
    model = found[0].get("model", "lsilogic (libvirt's x86 default)") if found else \
        "lsilogic (libvirt's x86 default: the domain has no such controller)"
    if model != "virtio-scsi":
        raise LibvirtError(f"disk {name}: SCSI controller {index} is {model}; crashlab models "
                           "model='virtio-scsi'")
