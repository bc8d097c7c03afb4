"""Check crash images: recovery, fsck, the workload's oracle, one outcome each.

    record = check_image(Path("state.img"), "ext4", "seed7/p120", oracle=my_oracle, backend=HostMounts())
    for record in check_batch(items):           # one guest boot for the whole batch
        ...

Recovery follows a reboot: ext4 replays its journal in userspace (`e2fsck -E journal_only`, the
default) or by mounting; XFS and btrfs only by mounting. fsck then runs read-only on the host. The
images are modified in place (replayed): they must be disposable copies.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from crashlab.check import outcome as oc
from crashlab.check.mounts import MOUNT_TIMEOUT, SUPPORTED, HostMounts, MountBackend
from crashlab.check.outcome import CheckRecord, StepVerdict, ToolRun, Verdict
from crashlab.check.tools import DEFAULT_TIMEOUT, fsck_argv, journal_replay_argv, run_tool

Oracle = Callable[[Path], Sequence[Any]]  # recovered tree -> violated promises (empty: all kept)
Ext4Recovery = Literal["e2fsck", "mount"]


@dataclass
class CheckItem:
    image: Path
    fs: str
    state_id: str = ""
    oracle: Oracle | None = None


def _run_oracle(oracle: Oracle, tree: Path) -> tuple[list[Any], StepVerdict | None]:
    try:
        return list(oracle(tree)), None
    except Exception as e:  # the oracle is workload code: its crash is ours, not the filesystem's
        return [], StepVerdict(Verdict.TOOL_ERROR, f"oracle raised {type(e).__name__}: {e}")


def check_image(image: Path, fs: str, state_id: str = "", *, oracle: Oracle | None = None,
                backend: MountBackend | None = None, host_mount: bool = False,
                ext4_recovery: Ext4Recovery = "e2fsck", timeout: float = DEFAULT_TIMEOUT,
                mount_timeout: float = MOUNT_TIMEOUT) -> CheckRecord:
    """Recover and check one disposable crash image.

    Mounts go through `backend`; without one, a checker guest is booted for this image alone
    (use `check_batch` for many), or with `host_mount=True` the host's loop mounts are used.
    """
    if fs not in SUPPORTED:
        raise ValueError(f"unsupported filesystem {fs!r}; expected one of {', '.join(SUPPORTED)}")
    if backend is None:
        item = CheckItem(Path(image), fs, state_id, oracle)
        return next(iter(check_batch([item], host_mount=host_mount, ext4_recovery=ext4_recovery,
                                     timeout=timeout, mount_timeout=mount_timeout)))
    t_start = time.monotonic()
    image = Path(image)
    timings: dict[str, float] = {}
    recovery_run: ToolRun | None = None
    recovery = StepVerdict(Verdict.OK, "nothing to recover")
    mount_recovery = fs != "ext4" or ext4_recovery == "mount"

    if not mount_recovery:
        with image.open("rb") as f:
            pre = oc.ext4_precheck(oc.ext4_superblock(f.read(2048)))
        if pre is not None:
            recovery = pre
        else:
            recovery_run = run_tool(journal_replay_argv(str(image)), timeout)
            timings["recovery"] = recovery_run.seconds
            recovery = oc.e2fsck_journal_replay(recovery_run)

    record = CheckRecord(state_id=state_id, image=str(image), fs=fs, outcome=oc.Outcome.CHECKER_ERROR,
                         reason="", backend=backend.name, recovery=recovery_run,
                         notes=[recovery.reason] if recovery_run is None and not mount_recovery else [])
    tree_verdict: StepVerdict | None = None
    fsck: StepVerdict | None = None
    violations: list[Any] | None = None
    with contextlib.ExitStack() as stack:
        tree_dest = None
        if oracle is not None:
            tree_dest = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="crashlab-tree-")))
        if recovery.verdict is Verdict.OK and (mount_recovery or tree_dest is not None):
            steps = backend.mount_steps(image, fs, recover=mount_recovery, tree_dest=tree_dest,
                                        timeout=mount_timeout)
            timings.update(steps.timings)
            record.kernel_log = steps.kernel_log
            if mount_recovery:
                record.recovery = steps.recovery
                recovery = (oc.mount_verdict(steps.recovery, "recovery mount") if steps.recovery
                            else StepVerdict(Verdict.TOOL_ERROR, "backend did not recover"))
            if tree_dest is not None and steps.tree is not None:
                record.tree = steps.tree
                tree_verdict = oc.mount_verdict(steps.tree, "read-only mount")
        if recovery.verdict is Verdict.OK:
            # fsck even when the read-only mount failed: its output says why.
            record.fsck = run_tool(fsck_argv(fs, str(image)), timeout)
            timings["fsck"] = record.fsck.seconds
            fsck = oc.FSCK_VERDICTS[fs](record.fsck)
        if oracle is not None and tree_dest is not None and tree_verdict is not None \
                and tree_verdict.verdict is Verdict.OK:
            t0 = time.monotonic()
            violations, oracle_failure = _run_oracle(oracle, tree_dest)
            timings["oracle"] = time.monotonic() - t0
            record.oracle_ran = oracle_failure is None
            record.violations = violations
            if oracle_failure is not None:
                tree_verdict = oracle_failure
        elif oracle is not None and recovery.verdict is Verdict.OK and tree_verdict is None:
            tree_verdict = StepVerdict(Verdict.TOOL_ERROR, "backend did not produce the tree")
    record.outcome, record.reason = oc.classify(recovery, fsck, tree_verdict, violations)
    timings["total"] = time.monotonic() - t_start
    record.timings = timings
    return record


def check_batch(items: Iterable[CheckItem], *, host_mount: bool = False, backend: MountBackend | None = None,
                ext4_recovery: Ext4Recovery = "e2fsck", timeout: float = DEFAULT_TIMEOUT,
                mount_timeout: float = MOUNT_TIMEOUT, **guest_options: Any) -> Iterator[CheckRecord]:
    """Check many images with one mount backend: one guest boot for the whole batch by default.

    A generator: records come out as images are done, so a caller can store them as they arrive.
    """
    with contextlib.ExitStack() as stack:
        if backend is None:
            if host_mount:
                backend = HostMounts()
            else:
                from crashlab.check.guest import GuestMounts

                backend = stack.enter_context(GuestMounts(**guest_options))
        for item in items:
            yield check_image(item.image, item.fs, item.state_id, oracle=item.oracle, backend=backend,
                              ext4_recovery=ext4_recovery, timeout=timeout, mount_timeout=mount_timeout)
