"""Recovery, fsck and the outcome taxonomy: pure rules, then real images with the explicit host mounts.

The host-mount tests loop-mount images on this host (root only), which is the explicit opt-in path;
the default guest path is tested in test_check_guest.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

from crashlab.check import outcome as oc
from crashlab.check.mounts import HostMounts
from crashlab.check.outcome import CheckRecord, Outcome, StepVerdict, ToolRun, Verdict
from crashlab.check.runner import CheckItem, check_batch, check_image
from crashlab.check.tools import run_tool

FIXTURES = Path(__file__).parent / "data" / "logs"
SIZES = {"ext4": "64M", "ext3": "64M", "xfs": "300M", "btrfs": "128M"}
MKFS = {"ext4": ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"],
        "ext3": ["mkfs.ext3", "-q", "-F"],
        "xfs": ["mkfs.xfs", "-q", "-f"], "btrfs": ["mkfs.btrfs", "-q", "-f", "-m", "single"]}
FSES = ("ext4", "ext3", "xfs", "btrfs")


# --- pure rules -------------------------------------------------------------------------------

def run(rc: int | None = 0, out: str = "", **kw: object) -> ToolRun:
    return ToolRun(argv=["tool"], rc=rc, stdout=out, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("rc", "verdict"), [
    (0, Verdict.OK), (1, Verdict.BAD), (2, Verdict.BAD), (4, Verdict.BAD), (8, Verdict.BAD),
    (12, Verdict.BAD), (16, Verdict.TOOL_ERROR), (32, Verdict.TOOL_ERROR), (128, Verdict.TOOL_ERROR),
    (4 | 128, Verdict.TOOL_ERROR)])
def test_e2fsck_exit_status_is_a_bit_field(rc: int, verdict: Verdict) -> None:
    assert oc.e2fsck_check(run(rc)).verdict is verdict


def test_e2fsck_on_an_unrecovered_journal_is_not_trusted() -> None:
    out = "Warning: skipping journal recovery because doing a read-only filesystem check.\n"
    assert oc.e2fsck_check(run(0, out)).verdict is Verdict.TOOL_ERROR


def test_journal_replay_exit_1_is_success_but_escalation_is_not() -> None:
    assert oc.e2fsck_journal_replay(run(1, "x: recovering journal\n")).verdict is Verdict.OK
    assert oc.e2fsck_journal_replay(run(0)).verdict is Verdict.OK
    assert oc.e2fsck_journal_replay(run(4)).verdict is Verdict.BAD
    escalated = "*** journal has been deleted ***\nPass 1: Checking inodes\n"
    assert oc.e2fsck_journal_replay(run(1, escalated)).verdict is Verdict.BAD


def test_xfs_repair_and_btrfs_exit_codes() -> None:
    assert oc.xfs_repair_check(run(0)).verdict is Verdict.OK
    assert oc.xfs_repair_check(run(1)).verdict is Verdict.BAD
    assert oc.xfs_repair_check(run(2)).verdict is Verdict.TOOL_ERROR
    dirty = "ALERT: The filesystem has valuable metadata changes in a log which is being\nignored"
    assert oc.xfs_repair_check(run(1, dirty)).verdict is Verdict.TOOL_ERROR
    assert oc.btrfs_check(run(0)).verdict is Verdict.OK
    assert oc.btrfs_check(run(1)).verdict is Verdict.BAD


@pytest.mark.parametrize("check", [oc.e2fsck_check, oc.xfs_repair_check, oc.btrfs_check, oc.mount_verdict])
def test_missing_hung_or_killed_tools_are_never_the_filesystems_fault(check: object) -> None:
    for r in (run(None, missing=True), run(None, timed_out=True), run(-9), run(0, error="umount failed")):
        assert check(r).verdict is Verdict.TOOL_ERROR  # type: ignore[operator]


def test_ext4_superblock_precheck() -> None:
    head = bytearray(2048)
    assert oc.ext4_precheck(oc.ext4_superblock(bytes(head))).verdict is Verdict.BAD  # type: ignore[union-attr]
    head[1024 + 0x38:1024 + 0x3A] = (0xEF53).to_bytes(2, "little")
    head[1024 + 0x5C] = 0x4  # has_journal
    assert oc.ext4_precheck(oc.ext4_superblock(bytes(head))).verdict is Verdict.OK  # type: ignore[union-attr]
    head[1024 + 0x60] = 0x4  # needs_recovery
    assert oc.ext4_precheck(oc.ext4_superblock(bytes(head))) is None


OK, BAD, ERR = (StepVerdict(Verdict.OK, "ok"), StepVerdict(Verdict.BAD, "bad"),
                StepVerdict(Verdict.TOOL_ERROR, "err"))


@pytest.mark.parametrize(("recovery", "fsck", "tree", "violations", "expected"), [
    (OK, OK, None, None, Outcome.CONSISTENT),
    (OK, OK, OK, [], Outcome.CONSISTENT),
    (OK, OK, OK, ["lost"], Outcome.DATA_LOSS),
    (OK, BAD, OK, ["lost"], Outcome.FS_INCONSISTENT),
    (BAD, None, None, None, Outcome.UNMOUNTABLE),
    (OK, OK, BAD, None, Outcome.UNMOUNTABLE),
    (ERR, None, None, None, Outcome.CHECKER_ERROR),
    (OK, ERR, OK, ["lost"], Outcome.CHECKER_ERROR),
    (OK, None, None, None, Outcome.CHECKER_ERROR),
    (OK, OK, ERR, None, Outcome.CHECKER_ERROR),
    (OK, BAD, ERR, None, Outcome.FS_INCONSISTENT),
])
def test_classify(recovery: StepVerdict, fsck: StepVerdict | None, tree: StepVerdict | None,
                  violations: list[str] | None, expected: Outcome) -> None:
    assert oc.classify(recovery, fsck, tree, violations)[0] is expected


PREDICATES = [  # outcome, is_fs_corruption, is_failure
    (Outcome.CONSISTENT, False, False),
    (Outcome.DATA_LOSS, False, True),  # the filesystem is fine, a promise is not: a failure, not corrupt
    (Outcome.FS_INCONSISTENT, True, True),
    (Outcome.UNMOUNTABLE, True, True),
    (Outcome.CHECKER_ERROR, False, False),  # our tooling failed: never counted against the filesystem
]


@pytest.mark.parametrize(("outcome", "fs_corruption", "failure"), PREDICATES)
def test_outcome_predicates(outcome: Outcome, fs_corruption: bool, failure: bool) -> None:
    assert outcome.is_fs_corruption is fs_corruption and outcome.is_failure is failure


def test_every_outcome_has_its_predicates_tested() -> None:
    assert [p[0] for p in PREDICATES] == list(Outcome)


def test_record_round_trips_through_json() -> None:
    rec = CheckRecord("s1", "/i.img", "ext4", Outcome.DATA_LOSS, "1 promise(s) broken", "guest",
                      recovery=run(0, "replayed"), fsck=run(0, "x" * (oc.OUTPUT_LIMIT * 2)),
                      violations=[{"path": "f"}], timings={"total": 1.5}, notes=["n"])
    d = json.loads(json.dumps(rec.to_dict()))
    assert d["outcome"] == "data-loss" and d["state_id"] == "s1" and d["violations"] == [{"path": "f"}]
    assert len(d["fsck"]["stdout"]) < oc.OUTPUT_LIMIT + 100  # long outputs are clipped, head and tail
    back = CheckRecord.from_dict(d)
    assert back.outcome is Outcome.DATA_LOSS and back.recovery and back.recovery.stdout == "replayed"


def test_run_tool_kills_a_hung_process_group(tmp_path: Path) -> None:
    script = tmp_path / "hang"
    script.write_text("#!/bin/sh\necho started\nsleep 300 &\nsleep 300\n")
    script.chmod(0o755)
    r = run_tool([str(script)], timeout=0.5)
    assert r.timed_out and r.rc is None and "started" in r.stdout and r.seconds < 5
    assert run_tool(["no-such-tool-crashlab"]).missing


# --- real images, host mounts (explicit opt-in) --------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="loop mounts need root")


def mkfs(fs: str, image: Path) -> Path:
    subprocess.run(["truncate", "-s", SIZES[fs], str(image)], check=True)
    subprocess.run([*MKFS[fs], str(image)], check=True, capture_output=True)
    return image


@contextmanager
def host_mounted(image: Path, fs: str, tmp: Path) -> Iterator[Path]:
    mnt = tmp / f"mnt-{image.name}"
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", fs, "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def write_fsynced(root: Path, name: str, data: bytes) -> None:
    fd = os.open(root / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def expect_files(files: dict[str, bytes]):  # the oracle a workload would give: exact contents
    def oracle(tree: Path) -> list[str]:
        bad = []
        for name, data in files.items():
            p = tree / name
            if not p.is_file():
                bad.append(f"{name}: missing")
            elif p.read_bytes() != data:
                bad.append(f"{name}: wrong content")
        return bad
    return oracle


@pytest.fixture(scope="module")
def clean_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One cleanly unmounted image per filesystem holding an fsynced file `a`; copied per test."""
    if os.geteuid() != 0:
        pytest.skip("loop mounts need root")
    tmp = tmp_path_factory.mktemp("clean")
    out = {}
    for fs in FSES:
        image = mkfs(fs, tmp / f"{fs}.img")
        with host_mounted(image, fs, tmp) as mnt:
            write_fsynced(mnt, "a", b"promised\n" * 100)
        out[fs] = image
    return out


def copy(src: Path, dest: Path) -> Path:
    subprocess.run(["cp", "--sparse=always", str(src), str(dest)], check=True)
    return dest


def no_leaks() -> None:
    mounts = Path("/proc/mounts").read_text()
    assert "crashlab-mnt-" not in mounts
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert "crashlab" not in loops and "/pytest-" not in loops


A = {"a": b"promised\n" * 100}


@needs_root
@pytest.mark.parametrize("fs", FSES)
def test_clean_image_is_consistent(fs: str, clean_images: dict[str, Path], tmp_path: Path) -> None:
    image = copy(clean_images[fs], tmp_path / "x.img")
    rec = check_image(image, fs, "clean", oracle=expect_files(A), host_mount=True)
    assert rec.outcome is Outcome.CONSISTENT, rec.to_dict()
    assert rec.oracle_ran and rec.fsck and rec.fsck.rc == 0 and rec.backend == "host"
    json.dumps(rec.to_dict())
    no_leaks()


@needs_root
@pytest.mark.parametrize("fs", FSES)
def test_dirty_log_is_recovered_not_misreported(fs: str, clean_images: dict[str, Path],
                                                tmp_path: Path) -> None:
    """A copy taken while mounted, after an fsync: the promised file lives only in the journal/log."""
    image = copy(clean_images[fs], tmp_path / "live.img")
    files = {"b": b"only in the log\n" * 50}
    with host_mounted(image, fs, tmp_path) as mnt:
        write_fsynced(mnt, "b", files["b"])
        crash = copy(image, tmp_path / "crash.img")
    if fs == "xfs":  # the pitfall: xfs_repair -n on the unrecovered image reports corruption
        assert run_tool(["xfs_repair", "-n", "-f", str(crash)]).rc == 1
    rec = check_image(crash, fs, "dirty", oracle=expect_files({**A, **files}), host_mount=True)
    assert rec.outcome is Outcome.CONSISTENT, rec.to_dict()
    assert rec.violations == []
    if fs in ("ext4", "ext3"):  # replayed in userspace, by e2fsck
        assert rec.recovery and "recovering journal" in rec.recovery.output
    no_leaks()


def replay_fixture(log: str, mark: str, image: Path) -> Path:
    from crashlab import logformat

    with logformat.open_log(FIXTURES / log) as reader:
        end = logformat.mark_end(reader.index(), mark)
        assert end is not None
        logformat.replay(reader, image, end)
    return image


@pytest.mark.skipif(not (FIXTURES / "ext4-dm-barrier-on.log.xz").exists(), reason="no shared fixtures")
def test_real_log_prefix_is_replayed_before_fsck(tmp_path: Path) -> None:
    """A real guest log cut at `fsync50`: the journal holds the workload's directory. Without replay
    the tree is empty and the check would run on stale metadata."""
    image = replay_fixture("ext4-dm-barrier-on.log.xz", "fsync50", tmp_path / "p.img")
    assert oc.ext4_superblock(image.read_bytes()[:2048]).needs_recovery
    seen: list[str] = []

    def oracle(tree: Path) -> list[str]:
        seen.extend(p.name for p in (tree / "d").iterdir())
        return []
    backend = HostMounts() if os.geteuid() == 0 else None
    if backend is None:
        pytest.skip("loop mounts need root")
    rec = check_image(image, "ext4", "fsync50", oracle=oracle, backend=backend)
    assert rec.outcome is Outcome.CONSISTENT, rec.to_dict()
    assert rec.recovery and "recovering journal" in rec.recovery.output
    assert len(seen) > 20
    assert not oc.ext4_superblock(image.read_bytes()[:2048]).needs_recovery


def zero(image: Path, offset: int, length: int) -> None:
    with image.open("r+b") as f:
        f.seek(offset)
        f.write(bytes(length))


def garbage(image: Path, offset: int, length: int) -> None:
    with image.open("r+b") as f:
        f.seek(offset)
        f.write(os.urandom(length))


SUPERBLOCK = {"ext4": (1024, 1024), "ext3": (1024, 1024), "xfs": (0, 512), "btrfs": (64 * 1024, 4096)}


@needs_root
@pytest.mark.parametrize("fs", FSES)
def test_destroyed_superblock_is_unmountable(fs: str, clean_images: dict[str, Path], tmp_path: Path) -> None:
    image = copy(clean_images[fs], tmp_path / "x.img")
    zero(image, *SUPERBLOCK[fs])
    rec = check_image(image, fs, "nosb", oracle=expect_files(A), host_mount=True)
    assert rec.outcome is Outcome.UNMOUNTABLE, rec.to_dict()
    no_leaks()


def ext4_inode_table(image: Path) -> int:
    out = subprocess.run(["dumpe2fs", str(image)], capture_output=True, text=True, check=True).stdout
    block_size = int(next(line.split()[-1] for line in out.splitlines() if line.startswith("Block size:")))
    first = next(line for line in out.splitlines() if "Inode table at" in line)
    return int(first.split("at")[1].split("-")[0]) * block_size


@needs_root
def test_damaged_inode_table_is_fs_inconsistent(clean_images: dict[str, Path], tmp_path: Path) -> None:
    image = copy(clean_images["ext4"], tmp_path / "x.img")
    garbage(image, ext4_inode_table(image), 4096)
    rec = check_image(image, "ext4", "itable", host_mount=True)
    assert rec.outcome in (Outcome.FS_INCONSISTENT, Outcome.UNMOUNTABLE), rec.to_dict()
    assert rec.outcome is Outcome.FS_INCONSISTENT and rec.fsck and rec.fsck.rc and rec.fsck.rc & 4
    no_leaks()


@needs_root
def test_damaged_xfs_ag_header_is_caught(clean_images: dict[str, Path], tmp_path: Path) -> None:
    image = copy(clean_images["xfs"], tmp_path / "x.img")
    info = subprocess.run(["xfs_db", "-r", "-c", "sb 0", "-c", "p agblocks blocksize", str(image)],
                          capture_output=True, text=True, check=True).stdout
    vals = dict(line.split(" = ") for line in info.splitlines())
    ag1 = int(vals["agblocks"]) * int(vals["blocksize"])
    zero(image, ag1 + 512, 1024)  # AG 1's AGF and AGI
    rec = check_image(image, "xfs", "agf", host_mount=True)
    # XFS 6.x reads every AG header at mount and refuses: a reboot would meet an unmountable fs.
    assert rec.outcome in (Outcome.FS_INCONSISTENT, Outcome.UNMOUNTABLE), rec.to_dict()
    no_leaks()


@needs_root
@pytest.mark.parametrize("fs", FSES)
def test_removed_fsynced_file_is_data_loss(fs: str, clean_images: dict[str, Path], tmp_path: Path) -> None:
    image = copy(clean_images[fs], tmp_path / "x.img")
    with host_mounted(image, fs, tmp_path) as mnt:
        (mnt / "a").unlink()
    rec = check_image(image, fs, "rm", oracle=expect_files(A), host_mount=True)
    assert rec.outcome is Outcome.DATA_LOSS, rec.to_dict()
    assert rec.violations == ["a: missing"] and rec.to_dict()["violations"] == ["a: missing"]
    no_leaks()


@pytest.fixture
def fake_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("e2fsck", "xfs_repair", "btrfs"):
        (bindir / tool).write_text("#!/bin/sh\nsleep 300 &\nwait\n")
        (bindir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return bindir


@needs_root
@pytest.mark.parametrize("fs", FSES)
def test_hung_fsck_is_checker_error(fs: str, clean_images: dict[str, Path], tmp_path: Path,
                                    fake_tools: Path) -> None:
    image = copy(clean_images[fs], tmp_path / "x.img")
    if fs in ("ext4", "ext3"):
        # A journal to replay, so the hung e2fsck is met at recovery as well as at the check.
        with host_mounted(image, fs, tmp_path) as mnt:
            write_fsynced(mnt, "b", b"x")
            image = copy(image, tmp_path / "dirty.img")
    rec = check_image(image, fs, "hang", host_mount=True, timeout=1.0)
    assert rec.outcome is Outcome.CHECKER_ERROR, rec.to_dict()
    assert "hung" in rec.reason and not rec.outcome.is_failure
    run_ = rec.recovery if fs in ("ext4", "ext3") else rec.fsck
    assert run_ and run_.timed_out and run_.seconds < 10
    no_leaks()


@needs_root
def test_missing_fsck_is_checker_error(clean_images: dict[str, Path], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    image = copy(clean_images["btrfs"], tmp_path / "x.img")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("mount", "umount"):
        os.symlink(shutil.which(tool), bindir / tool)  # type: ignore[arg-type]
    monkeypatch.setenv("PATH", str(bindir))
    monkeypatch.setattr("crashlab.check.tools.shutil.which",
                        lambda name, path=None: str(bindir / name) if (bindir / name).exists() else None)
    rec = check_image(image, "btrfs", "nofsck", host_mount=True)
    assert rec.outcome is Outcome.CHECKER_ERROR and "not found" in rec.reason, rec.to_dict()


@needs_root
def test_batch_and_cli(clean_images: dict[str, Path], tmp_path: Path) -> None:
    from crashlab.cli import cli

    images = [copy(clean_images[fs], tmp_path / f"{fs}.img") for fs in FSES]
    items = [CheckItem(p, fs, fs, expect_files(A)) for p, fs in zip(images, FSES, strict=True)]
    recs = list(check_batch(items, host_mount=True))
    assert [r.outcome for r in recs] == [Outcome.CONSISTENT] * len(FSES)
    assert [r.state_id for r in recs] == list(FSES)

    promises = tmp_path / "promises.jsonl"
    from crashlab.oracle import file_state

    promises.write_text(json.dumps({"marker": "fsync1", "seq": 0}) + "\n"
                        + json.dumps({"marker": "fsync1", "seq": 0, **file_state("a", A["a"])}) + "\n")
    ok = CliRunner().invoke(cli, ["check", str(images[0]), "--fs", "ext4", "--host-mount", "--json",
                                  "--promises", str(promises), "--markers", "fsync1"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["outcome"] == "consistent"
    with host_mounted(images[0], "ext4", tmp_path) as mnt:
        (mnt / "a").write_bytes(b"changed")
    bad = CliRunner().invoke(cli, ["check", str(images[0]), "--fs", "ext4", "--host-mount", "--json",
                                   "--promises", str(promises)])
    assert bad.exit_code == 1, bad.output
    rec = json.loads(bad.output)
    assert rec["outcome"] == "data-loss" and rec["violations"][0]["path"] == "a"
    # The CLI checks a copy: the image itself is left as it was.
    assert "needs_recovery" not in subprocess.run(["dumpe2fs", "-h", str(images[0])], capture_output=True,
                                                  text=True).stdout
    no_leaks()


# --- the oracle as a promises file: run on the mount, no copy of the tree ------------------------

def promises_file(path: Path, promises: list[dict[str, object]]) -> Path:
    """A workload's promises.jsonl with one durability point (seq 0) making `promises`."""
    lines = [{"marker": "fsync1", "seq": 0}] + [{"marker": "fsync1", "seq": 0, **p} for p in promises]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def a_promised(path: Path) -> Path:
    from crashlab.oracle import file_state

    return promises_file(path, [file_state("a", A["a"])])


def crashing_promises(path: Path) -> Path:
    """Loads, then makes the oracle raise on any tree: a promise without a path."""
    return promises_file(path, [{"kind": "exists", "type": "file"}])


CRASHED_ORACLE = "oracle tree: oracle raised KeyError: 'path'"


def removed(clean: Path, fs: str, tmp: Path, name: str) -> Path:
    image = copy(clean, tmp / name)
    with host_mounted(image, fs, tmp) as mnt:
        (mnt / "a").unlink()
    return image


@needs_root
@pytest.mark.parametrize("fs", FSES)
def test_oracle_on_the_mount_gives_what_the_copy_gives(fs: str, clean_images: dict[str, Path],
                                                       tmp_path: Path) -> None:
    from crashlab.oracle import load_promises

    promises = a_promised(tmp_path / "promises.jsonl")
    present = frozenset({0})
    items = [CheckItem(copy(clean_images[fs], tmp_path / "ok.img"), fs, "ok", promises=promises,
                       present=present),
             CheckItem(removed(clean_images[fs], fs, tmp_path, "rm.img"), fs, "rm", promises=promises,
                       present=present),
             CheckItem(removed(clean_images[fs], fs, tmp_path, "rm-copy.img"), fs, "rm-copy",
                       load_promises(promises).oracle(present))]
    ok, rm, rm_copy = check_batch(items, host_mount=True)
    assert ok.outcome is Outcome.CONSISTENT and ok.oracle_ran and ok.violations == [], ok.to_dict()
    assert rm.outcome is Outcome.DATA_LOSS and rm.oracle_ran, rm.to_dict()
    assert rm.to_dict()["violations"] == rm_copy.to_dict()["violations"]
    violation = rm.to_dict()["violations"][0]
    assert violation["path"] == "a" and violation["found"] == "no entry"
    assert str(rm.violations[0]) == str(rm_copy.violations[0])  # the oracle's own Violation again
    for rec in (ok, rm):
        assert rec.tree and "oracle-on-mount" in rec.tree.stdout and "$ cp" not in rec.tree.stdout
        assert "oracle" in rec.timings
    assert rm_copy.tree and "$ cp" in rm_copy.tree.stdout
    no_leaks()


@needs_root
def test_crashing_oracle_on_the_mount_is_checker_error_as_on_a_copy(clean_images: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    from crashlab.oracle import load_promises

    bad = crashing_promises(tmp_path / "bad.jsonl")
    items = [CheckItem(copy(clean_images["ext4"], tmp_path / "m.img"), "ext4", "mount", promises=bad),
             CheckItem(copy(clean_images["ext4"], tmp_path / "c.img"), "ext4", "copy",
                       load_promises(bad).oracle()),
             CheckItem(copy(clean_images["ext4"], tmp_path / "n.img"), "ext4", "nofile",
                       promises=tmp_path / "no-such.jsonl")]
    on_mount, on_copy, nofile = check_batch(items, host_mount=True)
    for rec in (on_mount, on_copy):
        assert rec.outcome is Outcome.CHECKER_ERROR and rec.reason == CRASHED_ORACLE, rec.to_dict()
        assert not rec.oracle_ran and not rec.outcome.is_failure
    assert nofile.outcome is Outcome.CHECKER_ERROR and "FileNotFoundError" in nofile.reason, nofile.to_dict()
    no_leaks()


@needs_root
def test_unreadable_tree_is_copied_for_the_oracle(clean_images: dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry the mount cannot read would look different to the oracle on the mount (an I/O error)
    than on a copy (left out by cp): such a tree goes the copy way, as every tree used to."""
    monkeypatch.setattr("crashlab.check.mounts.unreadable",
                        lambda root, paths=None: f"{root}/a: Input/output error")
    promises = a_promised(tmp_path / "promises.jsonl")
    image = removed(clean_images["ext4"], "ext4", tmp_path, "rm.img")
    rec = check_image(image, "ext4", "rm", promises=promises, host_mount=True)
    assert rec.outcome is Outcome.DATA_LOSS and rec.oracle_ran, rec.to_dict()
    assert rec.to_dict()["violations"][0]["found"] == "no entry"
    assert rec.tree and "tree copied instead" in rec.tree.stdout and "$ cp" in rec.tree.stdout
    no_leaks()


def test_unreadable_finds_what_cp_could_not_read(tmp_path: Path) -> None:
    from crashlab.check.mounts import unreadable

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"x" * 3_000_000)
    os.symlink("nowhere", tmp_path / "d" / "dangling")
    assert unreadable(tmp_path) is None
    if os.geteuid() != 0:  # root reads a mode-000 file anyway
        (tmp_path / "d" / "f").chmod(0)
        assert unreadable(tmp_path) == f"{tmp_path}/d/f: Permission denied"


def test_unreadable_reads_only_what_the_oracle_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the oracle's paths, an entry it never reads cannot send the tree the copy way, and one
    on the way to what it reads (a directory it lists) still does."""
    from crashlab.check import mounts

    for d in ("keep", "other"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "f").write_bytes(b"x" * 5000)
    real_open = os.open

    def failing_open(path: str | os.PathLike[str], flags: int, *a: int) -> int:
        if Path(path) == tmp_path / "other" / "f":
            raise OSError(5, "Input/output error", str(path))
        return real_open(path, flags, *a)

    monkeypatch.setattr(mounts.os, "open", failing_open)
    assert mounts.unreadable(tmp_path) == f"{tmp_path}/other/f: Input/output error"
    assert mounts.unreadable(tmp_path, {"keep/f", "missing/g", "keep/f/below"}) is None
    assert mounts.unreadable(tmp_path, {"other/f"}) == f"{tmp_path}/other/f: Input/output error"
    assert mounts.unreadable(tmp_path, set()) is None


def test_guest_sees_the_project_but_not_the_rest_of_the_host(tmp_path: Path) -> None:
    from crashlab.guest.shares import host_view, visible_in

    view = host_view()
    assert visible_in(view, Path(__file__))
    assert not visible_in(view, tmp_path)  # promises there are copied into the results share
    assert not visible_in(view, Path("/dev/shm")) and not visible_in(view, Path("/run"))
    assert not visible_in(view, Path(__file__).parent / "missing")


def test_records_serialise_every_field() -> None:
    """to_dict is written out by hand (asdict's deep copy was a tenth of a fast state's cost): a
    field added to ToolRun or Violation must not be dropped from the store."""
    from dataclasses import fields

    from crashlab.check.outcome import ToolRun
    from crashlab.oracle import Violation

    run = ToolRun(argv=["e2fsck"], rc=1, stdout="o", stderr="e", seconds=0.5, timed_out=True,
                  missing=True, error="x")
    assert ToolRun.from_dict(run.to_dict()) == run
    assert list(run.to_dict()) == [f.name for f in fields(ToolRun)]
    v = Violation("a", {"kind": "file", "marker": "m", "sha256": "0" * 64, "size": 1}, "no entry")
    assert list(v.to_dict()) == [*(f.name for f in fields(Violation)), "message"]
