"""Filesystems under test: the one table of what each needs, from mkfs to the fsck verdict.

Adding a filesystem is one row here (and its tests): recording, checking, the guest build, the CLI
choices and matrix validation all read this table. Sources: DESIGN.md, "Filesystems and barriers" and
"Recovery and fsck pitfalls"; Linux 6.1 fs/ext4/super.c (the ext4 driver registers `ext3` too).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from crashlab import undofile
from crashlab.check import outcome as oc
from crashlab.check.outcome import StepVerdict, ToolRun

# Recovery mount: read-write like a reboot; noatime so reading nothing rewrites inodes.
RECOVERY_MOUNT_OPTIONS = "noatime"


@dataclass(frozen=True, slots=True)
class Replay:
    """Log replay in userspace, in place of the recovery mount (it is also what a mount does)."""

    argv: tuple[str, ...]  # `{image}` is the image, the last argument
    # What a kernel mount would decide from the image's first 2 KiB before replaying; None: replay.
    precheck: Callable[[bytes], StepVerdict | None]
    verdict: Callable[[ToolRun], StepVerdict]
    # Options that make the replay keep the blocks it overwrites in the file `{undo}`, and the
    # command that writes them back: a shared image can be replayed, checked and given back as it
    # was, without a copy per state. (): the replay cannot be undone.
    undo: tuple[str, ...] = ()
    revert: tuple[str, ...] = ()  # `{undo}`, `{image}`
    # The same revert done in this process (undo file, image; raises ValueError where it cannot):
    # one spawn fewer a state. None: run `revert`.
    revert_here: Callable[[Path, Path], object] | None = None

    def command(self, image: str, undo: str | None = None) -> list[str]:
        """The replay's argv; with `undo`, keeping what it overwrites there (needs `self.undo`)."""
        extra = [a.replace("{undo}", undo) for a in self.undo] if undo is not None else []
        return [*(a.replace("{image}", image) for a in self.argv[:-1]), *extra,
                self.argv[-1].replace("{image}", image)]

    def revert_command(self, undo: str, image: str) -> list[str]:
        return [a.replace("{undo}", undo).replace("{image}", image) for a in self.revert]


@dataclass(frozen=True, slots=True)
class Filesystem:
    name: str  # also the mount type
    # mkfs argv: `{dev}` is the device (filled in the guest), `{bytes}`/`{kib}` the filesystem's size.
    mkfs: tuple[str, ...]
    barrier_on: str  # mount option for barriers on ("": the default)
    barrier_off: str | None  # for barriers off; None: there is no such configuration
    no_barrier_off: str  # why not, when barrier_off is None
    data_modes: tuple[str, ...]  # `data=` choices, the default first; (): the option does not exist
    min_mib: int  # smallest filesystem mkfs accepts (sparse files: size costs nothing)
    default_disk_mib: int
    replay: Replay | None  # userspace log replay; None: only a mount recovers
    fsck: tuple[str, ...]  # read-only check after recovery; `{image}` is the image
    fsck_verdict: Callable[[ToolRun], StepVerdict]
    ro_options: str  # read-only mount for the oracle that forbids any further log replay
    modules: tuple[str, ...]  # guest kernel modules, loaded only for this filesystem; (): built in
    # Host tools copied into the initramfs (the busybox-shell path); the virtiofs path uses the host's.
    binaries: tuple[str, ...]
    required: bool  # a guest cannot be built without `binaries`; otherwise they are optional
    mkfs_version: tuple[str, ...]  # argv printing mkfs's version (first line kept)
    fsck_version: tuple[str, ...]

    def mkfs_argv(self, size_bytes: int) -> list[str]:
        """mkfs making a filesystem of `size_bytes`; `{dev}` is left for the device."""
        return [a.replace("{bytes}", str(size_bytes)).replace("{kib}", str(size_bytes // 1024))
                for a in self.mkfs]

    def mount_options(self, barrier: bool, data_mode: str | None = None) -> str:
        """The recording's mount options; raises FilesystemError for what the filesystem lacks."""
        self.check_barrier(barrier)
        mode = self.check_data_mode(data_mode)
        barrier_opt = self.barrier_on if barrier else self.barrier_off
        return ",".join(o for o in (f"data={mode}" if mode else "", barrier_opt) if o)

    def check_barrier(self, barrier: bool) -> None:
        if not barrier and self.barrier_off is None:
            raise FilesystemError(f"{self.name} has no barrier=off: {self.no_barrier_off}")

    def check_data_mode(self, data_mode: str | None) -> str | None:
        """The data mode to use (None: the filesystem has none); `data_mode` None is the default."""
        if not self.data_modes:
            if data_mode not in (None, DEFAULT_DATA_MODE):
                with_modes = "/".join(n for n, fs in FILESYSTEMS.items() if fs.data_modes)
                raise FilesystemError(f"{self.name} has no data modes (data={data_mode} is for {with_modes})")
            return None
        if data_mode is None:
            return self.data_modes[0]
        if data_mode not in self.data_modes:
            raise FilesystemError(f"unknown data mode {data_mode!r}; "
                                  f"choose from {', '.join(self.data_modes)}")
        return data_mode

    def fsck_argv(self, image: str) -> list[str]:
        return [a.replace("{image}", image) for a in self.fsck]


class FilesystemError(ValueError):
    """A filesystem option that does not exist; the message says why in one line."""


class UnknownFilesystem(FilesystemError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown filesystem {name!r}; valid filesystems: {', '.join(FILESYSTEMS)}")


DEFAULT_DATA_MODE = "ordered"
EXT_DATA_MODES = (DEFAULT_DATA_MODE, "journal", "writeback")
# ext4 and ext3 alike: without lazy init, background inode-table/journal zeroing would write during the
# workload (ext3 has no uninit_bg, so there the options change nothing).
_EXT_MKFS_OPTIONS = ("-F", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", "{dev}", "{kib}k")
# `e2fsck -fn` on a dirty journal checks the stale pre-journal state, so the journal is replayed first
# (on a disposable copy), guarded so it never does more than a kernel mount would.
E2FSCK_REPLAY = Replay(("e2fsck", "-E", "journal_only", "-y", "{image}"),
                       precheck=oc.ext4_head_precheck, verdict=oc.e2fsck_journal_replay,
                       undo=("-z", "{undo}"), revert=("e2undo", "{undo}", "{image}"),
                       revert_here=undofile.apply)
_E2FSCK = ("e2fsck", "-f", "-n", "{image}")
_E2FSPROGS = ("mke2fs", "e2fsck")  # mkfs.ext4 and mkfs.ext3 are links to mke2fs


def _ext(name: str) -> Filesystem:
    return Filesystem(
        name, mkfs=(f"mkfs.{name}", *_EXT_MKFS_OPTIONS), barrier_on="barrier=1", barrier_off="barrier=0",
        no_barrier_off="", data_modes=EXT_DATA_MODES, min_mib=16, default_disk_mib=128,
        replay=E2FSCK_REPLAY, fsck=_E2FSCK, fsck_verdict=oc.e2fsck_check, ro_options="ro,noload",
        modules=(), binaries=_E2FSPROGS, required=True, mkfs_version=(f"mkfs.{name}", "-V"),
        fsck_version=("e2fsck", "-V"))


FILESYSTEMS: dict[str, Filesystem] = {
    fs.name: fs
    for fs in (
        _ext("ext4"),
        # Linux 6.1 has no ext3 driver: the ext4 driver registers the `ext3` type and mounts it.
        _ext("ext3"),
        Filesystem(
            "xfs", mkfs=("mkfs.xfs", "-f", "-q", "-d", "size={bytes}", "{dev}"), barrier_on="",
            barrier_off=None,
            no_barrier_off="'nobarrier' was removed in Linux 4.19 and XFS always flushes; use barrier on",
            data_modes=(), min_mib=300, default_disk_mib=320,
            replay=None,  # xfs_repair refuses a dirty log and -L destroys it: mount to recover
            fsck=("xfs_repair", "-n", "-f", "{image}"), fsck_verdict=oc.xfs_repair_check,
            ro_options="ro,norecovery", modules=("crc32c_intel", "libcrc32c", "xfs"),
            binaries=("mkfs.xfs", "xfs_repair"), required=False, mkfs_version=("mkfs.xfs", "-V"),
            fsck_version=("xfs_repair", "-V")),
        Filesystem(
            "btrfs", mkfs=("mkfs.btrfs", "-f", "-q", "-b", "{bytes}", "{dev}"), barrier_on="",
            barrier_off="nobarrier", no_barrier_off="", data_modes=(), min_mib=114, default_disk_mib=128,
            replay=None,  # the log tree is replayed at mount
            fsck=("btrfs", "check", "--readonly", "{image}"), fsck_verdict=oc.btrfs_check,
            ro_options="ro,rescue=nologreplay",
            # btrfs's softdeps (blake2b-256, xxhash64) are aliases modules.dep does not resolve.
            modules=("crc32c_intel", "libcrc32c", "blake2b_generic", "xxhash_generic", "btrfs"),
            binaries=("mkfs.btrfs", "btrfs"), required=False, mkfs_version=("mkfs.btrfs", "--version"),
            fsck_version=("btrfs", "--version")),
    )
}


# What crashlab.check.userspace can read with no mount (libext2fs through debugfs).
USERSPACE_READABLE = frozenset(n for n, fs in FILESYSTEMS.items() if fs.replay is E2FSCK_REPLAY)

# Every `data=` mode some filesystem has (command-line choices).
DATA_MODES = tuple(dict.fromkeys(m for fs in FILESYSTEMS.values() for m in fs.data_modes))


def filesystem(name: str) -> Filesystem:
    try:
        return FILESYSTEMS[name.strip().lower()]
    except KeyError:
        raise UnknownFilesystem(name) from None
