"""The filesystem table: its lookups and rules, ext3 as the row added to prove one row is enough, and
every list of filesystems (CLI choices, matrices, the guest build) taken from it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import click
import pytest

from crashlab import campaign
from crashlab.check.outcome import ToolRun, Verdict
from crashlab.cli import cli
from crashlab.filesystems import (
    FILESYSTEMS,
    FilesystemError,
    UnknownFilesystem,
    filesystem,
)
from crashlab.guest import provision
from crashlab.record import ConfigError, RecordConfig, job_for, versions
from crashlab.recorders import Recorder


def test_lookup_is_forgiving_about_case_and_names_the_choices_when_it_fails() -> None:
    assert filesystem(" EXT3 ") is FILESYSTEMS["ext3"]
    with pytest.raises(UnknownFilesystem, match="valid filesystems: ext4, ext3, xfs, btrfs") as e:
        filesystem("zfs")
    assert isinstance(e.value, ValueError) and "'zfs'" in str(e.value)


@pytest.mark.parametrize("fs", list(FILESYSTEMS))
def test_every_row_is_complete(fs: str) -> None:
    row = FILESYSTEMS[fs]
    argv = row.mkfs_argv(200 << 20)
    assert argv.count("{dev}") == 1 and not any("{bytes}" in a or "{kib}" in a for a in argv)
    assert any(str(200 << 20) in a or f"{200 << 10}k" in a for a in argv), argv
    assert row.fsck_argv("/x.img")[-1] == "/x.img" and "{image}" not in " ".join(row.fsck_argv("/x.img"))
    assert row.ro_options.startswith("ro,")
    assert 0 < row.min_mib <= row.default_disk_mib
    assert row.fsck_version[0] in (row.fsck[0], *row.binaries)
    if row.replay is not None:
        assert row.replay.command("/x.img")[-1] == "/x.img"


@pytest.mark.parametrize(("fs", "barrier", "data", "expected"), [
    ("ext4", True, None, "data=ordered,barrier=1"),
    ("ext3", False, "journal", "data=journal,barrier=0"),
    ("ext3", True, "writeback", "data=writeback,barrier=1"),
    ("btrfs", False, None, "nobarrier"),
    ("btrfs", True, "ordered", ""),  # the default data mode is accepted where there are none
    ("xfs", True, None, ""),
])
def test_mount_options(fs: str, barrier: bool, data: str | None, expected: str) -> None:
    assert FILESYSTEMS[fs].mount_options(barrier, data) == expected


def test_what_a_filesystem_lacks_is_refused_with_the_reason() -> None:
    with pytest.raises(FilesystemError, match=r"xfs has no barrier=off: 'nobarrier' was removed in Linux 4"):
        FILESYSTEMS["xfs"].mount_options(False)
    with pytest.raises(FilesystemError, match=r"btrfs has no data modes \(data=journal is for ext4/ext3\)"):
        FILESYSTEMS["btrfs"].mount_options(True, "journal")
    with pytest.raises(FilesystemError, match="unknown data mode 'sometimes'; choose from ordered"):
        FILESYSTEMS["ext3"].mount_options(True, "sometimes")


def test_ext3_records_like_ext4_with_its_own_mkfs() -> None:
    c = RecordConfig(fs="ext3", barrier=False, data_mode="journal").validate()
    job = job_for(c)
    assert job["fs"] == "ext3" and job["mkfs"][0] == "mkfs.ext3"
    assert job["mount_opts"] == "data=journal,barrier=0"
    assert f"{c.fs_bytes // 1024}k" in job["mkfs"]
    with pytest.raises(ConfigError, match="ext3 needs at least 16 MiB"):
        RecordConfig(fs="ext3", disk_mib=10).validate()


def test_ext3_is_recovered_and_checked_with_e2fsprogs() -> None:
    ext3, ext4 = FILESYSTEMS["ext3"], FILESYSTEMS["ext4"]
    assert ext3.replay == ext4.replay and ext3.replay is not None
    assert ext3.fsck_argv("i") == ext4.fsck_argv("i") and ext3.fsck_verdict is ext4.fsck_verdict
    assert ext3.modules == () and "ext3" not in provision.FS_MODULES  # the built-in ext4 driver mounts it


def test_ext3_mkfs_makes_an_ext3_filesystem_that_checks_clean(tmp_path: Path) -> None:
    """The row's own mkfs and fsck, for real: an ext3 image (a journal, no extents) that e2fsck passes."""
    ext3 = FILESYSTEMS["ext3"]
    image = tmp_path / "ext3.img"
    size = ext3.min_mib << 20
    subprocess.run(["truncate", "-s", str(size), str(image)], check=True)
    argv = [a.replace("{dev}", str(image)) for a in ext3.mkfs_argv(size)]
    subprocess.run(argv, check=True, capture_output=True)
    features = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True,
                              check=True).stdout
    line = next(x for x in features.splitlines() if x.startswith("Filesystem features:"))
    assert "has_journal" in line and "extent" not in line
    r = subprocess.run(ext3.fsck_argv(str(image)), capture_output=True, text=True, check=False)
    assert ext3.fsck_verdict(ToolRun(argv=argv, rc=r.returncode, stdout=r.stdout)).verdict is Verdict.OK
    with image.open("rb") as f:
        pre = ext3.replay.precheck(f.read(2048)) if ext3.replay else None
    assert pre is not None and pre.verdict is Verdict.OK  # the journal is clean: nothing to replay


def _choices(command: str, option: str) -> list[str]:
    cmd = cli.commands[command]
    assert isinstance(cmd, click.Command)
    param = next(p for p in cmd.params if p.name == option)
    assert isinstance(param.type, click.Choice)
    return list(param.type.choices)


def test_command_line_choices_come_from_the_table() -> None:
    assert _choices("record", "fs") == list(FILESYSTEMS)
    assert _choices("check", "fs") == list(FILESYSTEMS)


def test_matrix_validation_takes_filesystems_from_the_table() -> None:
    cells = campaign.Matrix(fs=("ext3", "xfs"), cache=("none",), barrier=("on", "off"),
                            workload=("smallfiles",)).cells()
    assert {(c.fs, c.barrier) for c in cells} == {("ext3", True), ("ext3", False), ("xfs", True)}
    with pytest.raises(campaign.CampaignError, match="valid filesystems: ext4, ext3"):
        campaign.Matrix(fs=("ext2",)).cells()


def test_guest_build_lists_come_from_the_table() -> None:
    assert set(provision.FS_MODULES) == {"xfs", "btrfs"}  # ext4 and ext3 are built in
    assert provision.FS_MODULES["xfs"] == FILESYSTEMS["xfs"].modules
    assert set(provision.REQUIRED_BINARIES) >= set(FILESYSTEMS["ext4"].binaries)
    assert set(provision.OPTIONAL_BINARIES) == {"mkfs.xfs", "xfs_repair", "mkfs.btrfs", "btrfs"}


def test_versions_name_the_filesystems_tools() -> None:
    from crashlab.guest.provision import Guest

    guest = Guest(Path("k"), Path("i"), "6.1", None, None, (), "key", Path("."))
    v = versions(RecordConfig(fs="ext3", recorder=Recorder.QEMU), guest)  # runs qemu --version only
    assert v["mkfs.ext3"].startswith("mke2fs") and v["e2fsck"].startswith("e2fsck")
