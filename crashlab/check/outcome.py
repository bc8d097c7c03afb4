"""The outcome taxonomy and the pure rules that map tool results onto it.

Nothing here runs a process: exit codes, outputs and oracle verdicts come in, a verdict goes out.
That keeps the rules, which decide what is counted as corruption, unit-testable on their own.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

OUTPUT_LIMIT = 64 * 1024  # per stream; fsck on a badly broken fs can print megabytes


class Outcome(enum.StrEnum):
    CONSISTENT = "consistent"
    DATA_LOSS = "data-loss"  # fsck clean after recovery, but a promise of the workload broken
    FS_INCONSISTENT = "fs-inconsistent"  # fsck found errors after recovery
    UNMOUNTABLE = "unmountable"  # recovery (mount or journal replay) failed
    CHECKER_ERROR = "checker-error"  # our tooling failed: never counted as corruption

    @property
    def is_fs_corruption(self) -> bool:
        """The filesystem itself is broken after recovery: what a report counts as `corrupt`."""
        return self in (Outcome.FS_INCONSISTENT, Outcome.UNMOUNTABLE)

    @property
    def is_failure(self) -> bool:
        """Corrupt or lost fsynced data: what a gate refuses and a shrink keeps."""
        return self.is_fs_corruption or self is Outcome.DATA_LOSS


class Verdict(enum.StrEnum):
    """What one step said about the filesystem, before the taxonomy is applied."""

    OK = "ok"  # recovered / fsck clean / mounted
    BAD = "bad"  # the filesystem is at fault: recovery failed, fsck found errors, mount refused
    TOOL_ERROR = "tool-error"  # the tool is at fault or cannot be trusted: missing, hung, misused


def clip(text: str, limit: int = OUTPUT_LIMIT) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - limit} characters cut ...]\n{text[-half:]}"


@dataclass
class ToolRun:
    """One invocation of an external tool (or a guest step), as kept in the record."""

    argv: list[str]
    rc: int | None = None  # None: never exited by itself (missing, timed out, killed)
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    timed_out: bool = False
    missing: bool = False
    error: str = ""  # why the tool could not be run or trusted, in words

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def to_dict(self) -> dict[str, Any]:
        return {"argv": list(self.argv), "rc": self.rc, "stdout": clip(self.stdout),
                "stderr": clip(self.stderr), "seconds": self.seconds, "timed_out": self.timed_out,
                "missing": self.missing, "error": self.error}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ToolRun:
        return cls(**d)


@dataclass(frozen=True)
class StepVerdict:
    verdict: Verdict
    reason: str


def _tool_failure(run: ToolRun) -> StepVerdict | None:
    if run.missing:
        return StepVerdict(Verdict.TOOL_ERROR, f"{run.argv[0]} not found")
    if run.timed_out:
        return StepVerdict(Verdict.TOOL_ERROR, f"{run.argv[0]} hung: killed after {run.seconds:.1f} s")
    if run.error:
        return StepVerdict(Verdict.TOOL_ERROR, run.error)
    if run.rc is None or run.rc < 0:
        return StepVerdict(Verdict.TOOL_ERROR, f"{run.argv[0]} killed by signal {-(run.rc or 0)}")
    return None


# e2fsck(8) exit status is a bit field; these bits say the check itself did not complete.
E2FSCK_CORRECTED, E2FSCK_REBOOT, E2FSCK_UNCORRECTED = 1, 2, 4
E2FSCK_OPERATIONAL, E2FSCK_USAGE, E2FSCK_CANCELED, E2FSCK_LIBRARY = 8, 16, 32, 128
_E2FSCK_TOOL_BITS = E2FSCK_USAGE | E2FSCK_CANCELED | E2FSCK_LIBRARY


def e2fsck_check(run: ToolRun) -> StepVerdict:
    """`e2fsck -fn` after recovery."""
    if (bad := _tool_failure(run)) is not None:
        return bad
    rc = run.rc or 0
    if rc & _E2FSCK_TOOL_BITS:
        return StepVerdict(Verdict.TOOL_ERROR, f"e2fsck exit {rc}: usage, cancel or library error")
    if "skipping journal recovery" in run.output:
        # The check ran on the stale pre-journal state: its answer means nothing either way.
        return StepVerdict(Verdict.TOOL_ERROR, "e2fsck saw an unrecovered journal: recovery did not happen")
    if rc & E2FSCK_OPERATIONAL:
        # After a successful recovery e2fsck could not even open or read the filesystem.
        return StepVerdict(Verdict.BAD, f"e2fsck exit {rc}: the filesystem could not be fully checked")
    if rc & (E2FSCK_UNCORRECTED | E2FSCK_CORRECTED | E2FSCK_REBOOT):
        return StepVerdict(Verdict.BAD, f"e2fsck exit {rc}: errors found")
    return StepVerdict(Verdict.OK, "e2fsck clean")


EXT4_SB_OFFSET, EXT4_MAGIC = 1024, 0xEF53
_EXT4_COMPAT_HAS_JOURNAL, _EXT4_INCOMPAT_RECOVER = 0x4, 0x4


@dataclass(frozen=True)
class Ext4Superblock:
    magic_ok: bool
    has_journal: bool
    needs_recovery: bool


def ext4_superblock(head: bytes) -> Ext4Superblock:
    """The primary superblock's state, from the image's first 2 KiB (struct ext4_super_block)."""
    sb = head[EXT4_SB_OFFSET:EXT4_SB_OFFSET + 1024]
    if len(sb) < 1024 or int.from_bytes(sb[0x38:0x3A], "little") != EXT4_MAGIC:
        return Ext4Superblock(False, False, False)
    compat = int.from_bytes(sb[0x5C:0x60], "little")
    incompat = int.from_bytes(sb[0x60:0x64], "little")
    return Ext4Superblock(magic_ok=True, has_journal=bool(compat & _EXT4_COMPAT_HAS_JOURNAL),
                          needs_recovery=bool(incompat & _EXT4_INCOMPAT_RECOVER))


def ext4_precheck(sb: Ext4Superblock) -> StepVerdict | None:
    """What a kernel mount would decide before any replay; None: go on and replay.

    Needed because e2fsck is more forgiving than the kernel: with a bad primary superblock it
    quietly uses a backup (and with -y writes it back), where a mount fails.
    """
    if not sb.magic_ok:
        return StepVerdict(Verdict.BAD, "primary superblock has no ext4 magic: a mount would fail")
    if not sb.needs_recovery:
        return StepVerdict(Verdict.OK, "journal clean: nothing to replay")
    return None


def ext4_head_precheck(head: bytes) -> StepVerdict | None:
    """`ext4_precheck` from the image's first 2 KiB (ext3 has the same superblock)."""
    return ext4_precheck(ext4_superblock(head))


# e2fsck prints these only when it went past the journal into a full check. With -y that repairs
# the image, so nothing after it can be checked; the kernel would have refused to mount instead.
_E2FSCK_ESCALATED = ("Pass 1:", "journal has been deleted", "Cannot proceed")


def e2fsck_journal_replay(run: ToolRun) -> StepVerdict:
    """`e2fsck -E journal_only -y`: replays the journal only, like the kernel at mount.

    Exit 0 or 1 (the replay counts as a correction) is success. 4 or 8 means the journal or the
    superblock could not be used, which is what a failed mount means on a real reboot.
    """
    if (bad := _tool_failure(run)) is not None:
        return bad
    rc = run.rc or 0
    if rc & _E2FSCK_TOOL_BITS:
        return StepVerdict(Verdict.TOOL_ERROR, f"e2fsck exit {rc}: usage, cancel or library error")
    if rc & (E2FSCK_OPERATIONAL | E2FSCK_UNCORRECTED):
        return StepVerdict(Verdict.BAD, f"journal replay failed: e2fsck exit {rc}")
    if any(s in run.output for s in _E2FSCK_ESCALATED):
        return StepVerdict(Verdict.BAD, "journal unusable: e2fsck went past journal replay into a repair")
    replayed = "recovering journal" in run.output
    return StepVerdict(Verdict.OK, "journal replayed" if replayed else "journal clean")


XFS_DIRTY_LOG = "valuable metadata changes in a log"


def xfs_repair_check(run: ToolRun) -> StepVerdict:
    """`xfs_repair -n`: 0 clean, 1 corruption found; anything else is the tool's failure."""
    if (bad := _tool_failure(run)) is not None:
        return bad
    if XFS_DIRTY_LOG in run.output:
        # -n ignores a dirty log and then reports its absence as corruption: recovery did not happen.
        return StepVerdict(Verdict.TOOL_ERROR, "xfs_repair saw a dirty log: recovery did not happen")
    if run.rc == 0:
        return StepVerdict(Verdict.OK, "xfs_repair -n clean")
    if run.rc == 1:
        return StepVerdict(Verdict.BAD, "xfs_repair -n found corruption")
    return StepVerdict(Verdict.TOOL_ERROR, f"xfs_repair exit {run.rc}")


def btrfs_check(run: ToolRun) -> StepVerdict:
    """`btrfs check --readonly`: any non-zero exit is an error found (or an unreadable tree)."""
    if (bad := _tool_failure(run)) is not None:
        return bad
    if run.rc == 0:
        return StepVerdict(Verdict.OK, "btrfs check clean")
    return StepVerdict(Verdict.BAD, f"btrfs check exit {run.rc}: errors found")


def mount_verdict(run: ToolRun, what: str = "mount") -> StepVerdict:
    """A mount (or mount+unmount) step: refusal is the filesystem's fault, a hang is ours."""
    if (bad := _tool_failure(run)) is not None:
        return bad
    if run.rc == 0:
        return StepVerdict(Verdict.OK, f"{what} ok")
    return StepVerdict(Verdict.BAD, f"{what} failed (exit {run.rc})")


def violation_to_json(v: Any) -> Any:
    """Violations come from the workload's oracle, whatever their type: keep them as JSON."""
    if hasattr(v, "to_dict"):
        return v.to_dict()
    if is_dataclass(v) and not isinstance(v, type):
        # The message is what a reader of a stored outcome (report, gate, reproduce) wants first.
        return {**asdict(v), **({"message": v.message} if hasattr(v, "message") else {})}
    if isinstance(v, dict | str | int | float | list):
        return v
    return str(v)


def classify(recovery: StepVerdict, fsck: StepVerdict | None, tree: StepVerdict | None,
             violations: list[Any] | None) -> tuple[Outcome, str]:
    """The outcome of one crash state, and the reason in words.

    Steps in the order a reboot meets them: a step that could not be trusted stops the
    classification there (checker-error), because nothing after it can be interpreted.
    `tree` is the read-only mount that hands the recovered tree to the oracle (None: not needed).
    """
    if recovery.verdict is Verdict.TOOL_ERROR:
        return Outcome.CHECKER_ERROR, f"recovery: {recovery.reason}"
    if recovery.verdict is Verdict.BAD:
        return Outcome.UNMOUNTABLE, recovery.reason
    if tree is not None and tree.verdict is Verdict.BAD:
        return Outcome.UNMOUNTABLE, tree.reason
    if fsck is None or fsck.verdict is Verdict.TOOL_ERROR:
        return Outcome.CHECKER_ERROR, f"fsck: {fsck.reason if fsck else 'not run'}"
    if fsck.verdict is Verdict.BAD:
        return Outcome.FS_INCONSISTENT, fsck.reason
    if tree is not None and tree.verdict is Verdict.TOOL_ERROR:
        return Outcome.CHECKER_ERROR, f"oracle tree: {tree.reason}"
    if violations:
        return Outcome.DATA_LOSS, f"{len(violations)} promise(s) broken"
    return Outcome.CONSISTENT, "recovered, fsck clean" + ("" if violations is None else ", promises kept")


@dataclass
class CheckRecord:
    """Everything known about one crash state's check. JSON-serialisable through `to_dict`."""

    state_id: str
    image: str
    fs: str
    outcome: Outcome
    reason: str
    backend: str  # "guest" or "host": where the kernel mounts happened
    recovery: ToolRun | None = None
    fsck: ToolRun | None = None
    tree: ToolRun | None = None  # read-only mount + tree dump for the oracle
    oracle_ran: bool = False
    violations: list[Any] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase and "total"
    kernel_log: str = ""  # guest kernel messages during this image's mounts
    notes: list[str] = field(default_factory=list)  # decisions taken without running a tool
    # Set on a checker-error whose cause is the checker, not the image (its guest did not boot, was
    # killed, found no disk): a few words saying which. Such a state was not checked at all, so
    # campaigns count it apart and check it again.
    checker_fault: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "state_id": self.state_id, "image": self.image, "fs": self.fs,
            "outcome": str(self.outcome), "reason": self.reason, "backend": self.backend,
            "recovery": self.recovery.to_dict() if self.recovery else None,
            "fsck": self.fsck.to_dict() if self.fsck else None,
            "tree": self.tree.to_dict() if self.tree else None,
            "oracle_ran": self.oracle_ran,
            "violations": [violation_to_json(v) for v in self.violations],
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "kernel_log": clip(self.kernel_log),
            "notes": list(self.notes),
            "checker_fault": self.checker_fault,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckRecord:
        runs = {k: ToolRun.from_dict(d[k]) if d.get(k) else None for k in ("recovery", "fsck", "tree")}
        return cls(state_id=d["state_id"], image=d["image"], fs=d["fs"], outcome=Outcome(d["outcome"]),
                   reason=d["reason"], backend=d["backend"], oracle_ran=d["oracle_ran"],
                   violations=d["violations"], timings=d["timings"], kernel_log=d.get("kernel_log", ""),
                   notes=d.get("notes", []), checker_fault=d.get("checker_fault", ""), **runs)
