"""Guest disk models and host AIO engines: the one table of how the data disk reaches the guest.

The 2008 thread argued about IDE write caches, SCSI ordered queues and virtio barriers; each model
here is one row: the QEMU device (and controller) libvirt generates for that `<target bus=...>`,
how the guest sees the device's volatile write cache, the guest drivers it needs and the kernel
option that provides each. Every model has QEMU's `write-cache=` device property (hw/block/block.h
DEFINE_BLOCK_PROPERTIES), set from the cache mode (crashlab.cachemodes): off for writethrough and
directsync. The guest sees it as VIRTIO_BLK_F_CONFIG_WCE (virtio-blk), the WCE bit of the caching
mode page (scsi-hd, hw/scsi/scsi-disk.c), or IDENTIFY word 85 / SET FEATURES 0x02 (ide-hd,
hw/ide/core.c: what `hdparm -W` reads and sets), and Linux reports it in
/sys/block/DEV/queue/write_cache. Without a write cache Linux sends the device no flushes at all.

Sources: libvirt src/qemu/qemu_command.c (qemuBuildDiskDeviceProps, qemuBuildControllerDevProps),
libvirt docs/formatdomain.rst ("Hard drives, floppy disks, CDROMs", "Controllers"), QEMU
qemu-options.hx (-blockdev `aio=`, `discard=`, `detect-zeroes=`) and block/file-posix.c.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DiskModel:
    name: str
    device: str  # QEMU -device driver of the disk
    controller: str | None  # a -device added for the disk, id `{prefix}{index}`; None: none needed
    controller_prefix: str  # the controller's id prefix, as libvirt names it (scsi0, sata0)
    libvirt_bus: str  # <target bus='...'/> that selects this model
    write_cache: str  # how the guest sees and sets the device's write cache
    guest_modules: tuple[str, ...]  # guest drivers, by module name, loaded only for this model
    guest_prefix: str  # guest block device names: vd (virtio-blk), sd (SCSI disk, libata)

    def device_args(self, index: int, node: str, write_cache: str) -> list[str]:
        """The -device options for the disk at `index` on block node `node` (pure)."""
        args: list[str] = []
        bus: list[str] = []
        if self.controller is not None:
            ctl = f"{self.controller_prefix}{index}"
            args += ["-device", f"{self.controller},id={ctl}"]
            bus = [f"bus={ctl}.0"]
            if self.device == "scsi-hd":
                bus += ["channel=0", "scsi-id=0", "lun=0"]
        elif self.device == "ide-hd":
            # The pc machine's built-in PIIX IDE: two buses of two units; libvirt's hda is ide.0 unit 0.
            bus = [f"bus=ide.{index // 2}", f"unit={index % 2}"]
        # werror/rerror=report: a host error (a full disk above all) reaches the guest as EIO. QEMU's
        # default stops the VM on ENOSPC, and the run would wait out its whole deadline for nothing.
        dev = [self.device, *bus, f"drive={node}", f"write-cache={write_cache}", "werror=report",
               "rerror=report"]
        return [*args, "-device", ",".join(dev)]


DEFAULT_DISK = "virtio-blk"

DISK_MODELS: dict[str, DiskModel] = {
    m.name: m
    for m in (
        DiskModel("virtio-blk", "virtio-blk-pci", None, "", "virtio",
                  "VIRTIO_BLK_F_CONFIG_WCE (virtio write-cache)", ("virtio_blk",), "vd"),
        DiskModel("virtio-scsi", "scsi-hd", "virtio-scsi-pci", "scsi", "scsi",
                  "SCSI WCE bit (caching mode page)", ("virtio_scsi", "sd_mod"), "sd"),
        DiskModel("ide", "ide-hd", None, "", "ide",
                  "ATA IDENTIFY word 85 / SET FEATURES (hdparm -W)", ("ata_piix", "sd_mod"), "sd"),
        DiskModel("ahci", "ide-hd", "ahci", "sata", "sata",
                  "ATA IDENTIFY word 85 / SET FEATURES (hdparm -W)", ("ahci", "sd_mod"), "sd"),
    )
}


@dataclass(frozen=True, slots=True)
class AioMode:
    name: str
    # file-posix.c: "aio=native was specified, but it requires cache.direct=on" (Linux AIO is
    # asynchronous only for O_DIRECT).
    needs_direct: bool


DEFAULT_AIO = "threads"

AIO_MODES: dict[str, AioMode] = {
    a.name: a
    for a in (AioMode("threads", needs_direct=False), AioMode("native", needs_direct=True),
              AioMode("io_uring", needs_direct=False))
}

# -blockdev `discard=` and `detect-zeroes=` as QEMU spells them (qemu-options.hx); the defaults first.
DISCARD = ("ignore", "unmap")
DETECT_ZEROES = ("off", "on", "unmap")

# Guest driver -> the Linux config option that builds it, for the one-line "kernel lacks" message.
KERNEL_OPTIONS: dict[str, str] = {
    "virtio_pci": "CONFIG_VIRTIO_PCI", "virtio_blk": "CONFIG_VIRTIO_BLK",
    "virtio_scsi": "CONFIG_SCSI_VIRTIO", "sd_mod": "CONFIG_BLK_DEV_SD", "ata_piix": "CONFIG_ATA_PIIX",
    "ahci": "CONFIG_SATA_AHCI", "dm_mod": "CONFIG_BLK_DEV_DM", "dm_log_writes": "CONFIG_DM_LOG_WRITES",
    "dm_flakey": "CONFIG_DM_FLAKEY", "fuse": "CONFIG_FUSE_FS", "virtiofs": "CONFIG_VIRTIO_FS",
    "ext4": "CONFIG_EXT4_FS", "xfs": "CONFIG_XFS_FS", "btrfs": "CONFIG_BTRFS_FS",
    "libcrc32c": "CONFIG_LIBCRC32C", "crc32c_intel": "CONFIG_CRYPTO_CRC32C_INTEL",
    "blake2b_generic": "CONFIG_CRYPTO_BLAKE2B", "xxhash_generic": "CONFIG_CRYPTO_XXHASH",
}


def kernel_option(module: str) -> str:
    return KERNEL_OPTIONS.get(module, f"the option that builds {module}")


class DiskError(ValueError):
    """A disk option that does not exist or cannot be combined; one line saying what is valid."""


def disk_model(name: str) -> DiskModel:
    try:
        return DISK_MODELS[name.strip().lower()]
    except KeyError:
        raise DiskError(f"unknown disk model {name!r}; valid models: {', '.join(DISK_MODELS)}") from None


def aio_mode(name: str) -> AioMode:
    try:
        return AIO_MODES[name.strip().lower()]
    except KeyError:
        raise DiskError(f"unknown aio mode {name!r}; valid modes: {', '.join(AIO_MODES)}") from None


def check_drive(cache_direct: bool, cache_name: str, aio: str, discard: str, detect_zeroes: str) -> None:
    """Refuse what QEMU would refuse at startup, before any guest boots."""
    if aio_mode(aio).needs_direct and not cache_direct:
        raise DiskError(f"aio={aio} needs host O_DIRECT (cache=none or directsync), not cache={cache_name}")
    if discard not in DISCARD:
        raise DiskError(f"unknown discard {discard!r}; valid: {', '.join(DISCARD)}")
    if detect_zeroes not in DETECT_ZEROES:
        raise DiskError(f"unknown detect_zeroes {detect_zeroes!r}; valid: {', '.join(DETECT_ZEROES)}")
    if detect_zeroes == "unmap" and discard != "unmap":
        # block.c bdrv_parse_detect_zeroes: "setting detect-zeroes to unmap is not allowed without
        # setting discard operation to unmap"
        raise DiskError("detect_zeroes=unmap needs discard=unmap")
