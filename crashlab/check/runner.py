"""Check crash images: recovery, fsck, the workload's oracle, one outcome each.

    record = check_image(Path("state.img"), "ext4", "seed7/p120", oracle=oracle, host_mount=True)
    for record in check_batch(items):           # one guest boot per chunk of images
        ...

Recovery follows a reboot: ext4 and ext3 replay their journal in userspace (`e2fsck -E journal_only`, the
default, guarded so it never does more than a kernel mount would) or by mounting; XFS and btrfs only
by mounting. fsck then runs read-only on the host. A batch goes in three phases so that the mounts
of many images share one guest boot: host-side replay, all mounts, host-side fsck and oracle.
The images are modified in place (replayed): they must be disposable copies, unless an item names
an `undo` file (userspace replay only), which lets its caller give a shared image back as it was.

An item whose oracle is a promises file (`promises=`, `present=`) has it run by the mount backend on
the read-only mount itself, in the guest for the guest backend: no copy of the tree leaves it. An
`oracle=` callable cannot cross into the guest, so it gets a copy of the tree on the host.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from crashlab import filesystems
from crashlab.check import outcome as oc
from crashlab.check.guest import GuestMounts
from crashlab.check.mounts import (
    MOUNT_TIMEOUT,
    HostMounts,
    MountBackend,
    MountRequest,
    MountSteps,
    OracleSpec,
    oracle_failure,
)
from crashlab.check.outcome import CheckRecord, StepVerdict, Verdict
from crashlab.check.tools import DEFAULT_TIMEOUT, run_tool
from crashlab.check.userspace import UserspaceMounts
from crashlab.oracle import Violation, load_promises

Oracle = Callable[[Path], Sequence[Any]]  # recovered tree -> violated promises (empty: all kept)
Ext4Recovery = Literal["e2fsck", "mount"]
# Where the oracle's reads and any recovery mount happen. `auto`: ext2/3/4 in userspace (debugfs,
# no kernel touches the image; its journal is replayed by e2fsck), XFS and btrfs in a checker guest,
# whose kernel alone can replay their logs. `host` mounts on this host's kernel: disposable hosts only.
CHECKERS = ("auto", "userspace", "guest", "host")
CHUNK = 64  # images per mount batch: built, then handed to the backend together


@dataclass
class CheckItem:
    """One image to check. The oracle is either `promises` (a workload's promises.jsonl) with the
    seqs of the markers `present` in the crash state (None: all), which the mount backend runs on
    the mount, or an `oracle` callable run on a host copy of the tree. With both, `promises` wins
    (they must agree: campaign.run_check passes both)."""

    image: Path
    fs: str
    state_id: str = ""
    oracle: Oracle | None = None
    promises: Path | None = None
    present: frozenset[int] | None = None
    # The image is not disposable (a shared base checked out in place): the userspace replay keeps
    # what it overwrites in this file, for the caller to revert (filesystems.Replay.revert).
    undo: Path | None = None

    @property
    def oracle_spec(self) -> OracleSpec | None:
        return None if self.promises is None else OracleSpec(Path(self.promises), self.present)

    @property
    def has_oracle(self) -> bool:
        return self.oracle is not None or self.promises is not None


@dataclass
class _State:
    """One image on its way through the phases."""

    item: CheckItem
    record: CheckRecord
    t0: float
    mount_recovery: bool
    recovery: StepVerdict = field(default_factory=lambda: StepVerdict(Verdict.OK, "nothing to recover"))
    tree: StepVerdict | None = None
    tree_dest: Path | None = None
    on_mount: tuple[list[Any], str] | None = None  # (violations, oracle error) from the backend


def _run_oracle(oracle: Oracle, tree: Path) -> tuple[list[Any], StepVerdict | None]:
    try:
        return list(oracle(tree)), None
    except Exception as e:  # the oracle is workload code: its crash is ours, not the filesystem's
        return [], StepVerdict(Verdict.TOOL_ERROR, oracle_failure(e))


def _copy_oracle(item: CheckItem) -> Oracle:
    """The oracle for a host copy of the tree: the callable if there is one, else the promises."""
    if item.oracle is not None:
        return item.oracle
    spec = item.oracle_spec

    def oracle(tree: Path) -> list[Any]:

        assert spec is not None
        return load_promises(spec.promises).check(tree, spec.present)
    return oracle


def _from_json(v: Any) -> Any:
    """A violation as the oracle made it, where it is crashlab.oracle's: the same record either way."""

    if isinstance(v, dict) and v.keys() - {"message"} == {"path", "promise", "found"}:
        return Violation(v["path"], v["promise"], v["found"])
    return v


def _replay(st: _State, replay: filesystems.Replay, timeout: float) -> None:
    with open(st.item.image, "rb") as f:
        pre = replay.precheck(f.read(2048))
    if pre is not None:
        st.recovery = pre
        st.record.notes.append(pre.reason)
        return
    if st.item.undo is not None and not replay.undo:
        raise ValueError(f"{st.item.fs}: its replay cannot be undone: check a disposable copy")
    run = run_tool(replay.command(str(st.item.image), None if st.item.undo is None else str(st.item.undo)),
                   timeout)
    st.record.recovery = run
    st.record.timings["recovery"] = run.seconds
    st.recovery = replay.verdict(run)


def _finish(st: _State, timeout: float) -> CheckRecord:
    rec, fs = st.record, filesystems.filesystem(st.item.fs)
    fsck: StepVerdict | None = None
    violations: list[Any] | None = None
    if st.recovery.verdict is Verdict.OK:
        # fsck even when the read-only mount failed: its output says why.
        rec.fsck = run_tool(fs.fsck_argv(str(st.item.image)), timeout)
        rec.timings["fsck"] = rec.fsck.seconds
        fsck = fs.fsck_verdict(rec.fsck)
    if st.item.has_oracle and st.recovery.verdict is Verdict.OK:
        if st.tree is None:
            st.tree = StepVerdict(Verdict.TOOL_ERROR, "the mount backend did not produce the tree")
        elif st.tree.verdict is Verdict.OK and st.on_mount is not None:
            found, error = st.on_mount
            violations = [_from_json(v) for v in found]
            failure = StepVerdict(Verdict.TOOL_ERROR, error) if error else None
            rec.oracle_ran = failure is None
            rec.violations = violations
            st.tree = failure or st.tree
        elif st.tree.verdict is Verdict.OK and st.tree_dest is not None:
            # A copy: the oracle is a callable, or the tree could not be read in full on the mount.
            t0 = time.monotonic()
            violations, failure = _run_oracle(_copy_oracle(st.item), st.tree_dest)
            rec.timings["oracle"] = time.monotonic() - t0
            rec.oracle_ran = failure is None
            rec.violations = violations
            st.tree = failure or st.tree
    rec.outcome, rec.reason = oc.classify(st.recovery, fsck, st.tree, violations)
    if rec.outcome is not oc.Outcome.CHECKER_ERROR:
        rec.checker_fault = ""  # host-side fsck judged the image anyway: a result, not a gap
    rec.timings["total"] = time.monotonic() - st.t0
    return rec


def _check_chunk(items: Sequence[CheckItem], backend: MountBackend, workdir: Path,
                 ext4_recovery: Ext4Recovery, timeout: float, mount_timeout: float) -> Iterator[CheckRecord]:
    states: list[_State] = []
    for n, item in enumerate(items):
        replay = filesystems.filesystem(item.fs).replay  # raises UnknownFilesystem, a ValueError
        rec = CheckRecord(state_id=item.state_id, image=str(item.image), fs=item.fs,
                          outcome=oc.Outcome.CHECKER_ERROR, reason="", backend=backend.name)
        st = _State(item, rec, time.monotonic(), mount_recovery=replay is None or ext4_recovery == "mount")
        if item.undo is not None and st.mount_recovery:
            raise ValueError(f"{item.image}: a recovery mount cannot be undone: check a disposable copy")
        if item.has_oracle:
            st.tree_dest = workdir / f"tree-{n}"  # made by a backend that copies the tree
        if replay is not None and not st.mount_recovery:
            _replay(st, replay, timeout)
        states.append(st)

    todo = [st for st in states if st.recovery.verdict is Verdict.OK
            and (st.mount_recovery or st.tree_dest is not None)]
    requests = [MountRequest(Path(st.item.image), st.item.fs, st.mount_recovery, st.tree_dest,
                             st.item.oracle_spec) for st in todo]
    for st, steps in zip(todo, backend.mount_batch(requests, mount_timeout), strict=True):
        st.record.timings.update(steps.timings)
        st.record.backend = steps.backend or st.record.backend
        st.record.kernel_log = steps.kernel_log
        st.record.checker_fault = steps.checker_fault
        st.record.notes += [f"checker retried after: {why}" for why in steps.retries]
        if st.mount_recovery:
            st.record.recovery = steps.recovery
            st.recovery = (oc.mount_verdict(steps.recovery, "recovery mount") if steps.recovery
                           else StepVerdict(Verdict.TOOL_ERROR, "the mount backend did not recover"))
        if st.tree_dest is not None and steps.tree is not None:
            st.record.tree = steps.tree
            st.tree = oc.mount_verdict(steps.tree, "read-only mount")
            if steps.violations is not None:
                st.on_mount = (steps.violations, steps.oracle_error)

    for st in states:
        try:
            yield _finish(st, timeout)
        finally:
            if st.tree_dest is not None:
                shutil.rmtree(st.tree_dest, ignore_errors=True)


class RoutedMounts:
    """`auto`: each request to the backend that can serve it without a kernel where one exists."""

    name = "auto"

    def __init__(self, mounting: MountBackend) -> None:
        self.userspace, self.mounting = UserspaceMounts(), mounting

    def route(self, req: MountRequest) -> MountBackend:
        readable = req.fs in filesystems.USERSPACE_READABLE and not req.recover
        return self.userspace if readable else self.mounting

    def mount_batch(self, requests: Sequence[MountRequest], timeout: float = MOUNT_TIMEOUT
                    ) -> list[MountSteps]:
        out: list[MountSteps | None] = [None] * len(requests)
        for backend in (self.userspace, self.mounting):
            mine = [i for i, r in enumerate(requests) if self.route(r) is backend]
            if mine:
                for i, steps in zip(mine, backend.mount_batch([requests[i] for i in mine], timeout),
                                    strict=True):
                    steps.backend = steps.backend or backend.name
                    out[i] = steps
        return [s for s in out if s is not None]


def make_backend(checker: str, stack: contextlib.ExitStack, **guest_options: Any) -> MountBackend:
    """The backend named by `checker` (one of CHECKERS); a guest is provisioned only when an image
    first needs one."""
    if checker not in CHECKERS:
        raise ValueError(f"unknown checker {checker!r}; choose from {', '.join(CHECKERS)}")
    if checker == "userspace":
        return UserspaceMounts()
    mounting: MountBackend = (HostMounts() if checker == "host"
                              else stack.enter_context(GuestMounts(**guest_options)))
    return RoutedMounts(mounting) if checker == "auto" else mounting


def check_batch(items: Iterable[CheckItem], *, host_mount: bool = False, checker: str = "auto",
                backend: MountBackend | None = None,
                ext4_recovery: Ext4Recovery = "e2fsck", timeout: float = DEFAULT_TIMEOUT,
                mount_timeout: float = MOUNT_TIMEOUT, chunk: int = CHUNK, workdir: Path | None = None,
                **guest_options: Any) -> Iterator[CheckRecord]:
    """Check many disposable images, where `checker` says (CHECKERS; `host_mount=True` is `host`),
    unless `backend` is given; scratch files go in `workdir` (by default a directory of its own).

    A generator: records come out chunk by chunk, so a caller can store them as they arrive.
    """
    with contextlib.ExitStack() as stack:
        if backend is None:
            backend = make_backend("host" if host_mount else checker, stack, **guest_options)
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="crashlab-check-")))
        it = iter(items)
        while batch := list(itertools.islice(it, chunk)):
            yield from _check_chunk(batch, backend, workdir, ext4_recovery, timeout, mount_timeout)


def check_image(image: Path, fs: str, state_id: str = "", *, oracle: Oracle | None = None,
                promises: Path | None = None, present: frozenset[int] | None = None,
                backend: MountBackend | None = None, host_mount: bool = False,
                ext4_recovery: Ext4Recovery = "e2fsck", timeout: float = DEFAULT_TIMEOUT,
                mount_timeout: float = MOUNT_TIMEOUT, **guest_options: Any) -> CheckRecord:
    """Recover and check one disposable crash image (a whole guest boot if mounts are in a guest:
    use `check_batch`, or pass a long-lived `backend`, for many)."""
    item = CheckItem(Path(image), fs, state_id, oracle, promises, present)
    return next(iter(check_batch([item], host_mount=host_mount, backend=backend, ext4_recovery=ext4_recovery,
                                 timeout=timeout, mount_timeout=mount_timeout, **guest_options)))
