"""Where the kernel touches a crash image: recovery mounts and the read-only mount for the oracle.

A backend does, for one image: optionally mount read-write and unmount cleanly (log replay, what a
reboot does), then optionally mount read-only for the oracle: either run the workload's oracle on
the mount itself when the request describes it (`OracleSpec`: a promises file and the present
seqs), or copy the recovered tree into a host directory for a host-side oracle. The guest backend
(crashlab.check.guest) does this inside a disposable QEMU guest; the host backend here uses loop
mounts and is only for disposable machines: a corrupted image can crash the kernel that mounts it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import stat
import tempfile
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from crashlab import filesystems
from crashlab.check.outcome import ToolRun, violation_to_json
from crashlab.check.tools import run_tool
from crashlab.oracle import Promises, Tree, load_promises
from crashlab.proc import LIBC

MOUNT_TIMEOUT = 120.0
MNT_EX_FAIL = 32  # what mount(8) and umount(8) exit with when the call fails
MS_FLAGS = {"ro": 1, "noatime": 1024}  # MS_RDONLY, MS_NOATIME; other options go to the filesystem
MNT_DETACH = 2


@dataclass
class MountSteps:
    recovery: ToolRun | None = None  # read-write mount + clean unmount; None if not asked
    tree: ToolRun | None = None  # read-only mount + oracle or copy of the tree; None if not asked
    kernel_log: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    # The oracle run on the mount (violations as JSON); None: not run there, the tree was copied.
    violations: list[Any] | None = None
    oracle_error: str = ""  # the oracle raised (then `violations` is []): a checker-error
    checker_fault: str = ""  # the checker itself failed, not this image (CheckRecord.checker_fault)
    retries: list[str] = field(default_factory=list)  # why earlier attempts at this image failed
    backend: str = ""  # which backend did this, when a routing backend chose one


@dataclass(frozen=True)
class OracleSpec:
    """The fsync oracle, described so that any process can run it: crashlab.oracle.check(tree,
    load_promises(promises), present)."""

    promises: Path
    present: frozenset[int] | None = None  # seqs of the markers in the crash state; None: all


@dataclass(frozen=True)
class MountRequest:
    image: Path
    fs: str
    recover: bool  # mount read-write and unmount cleanly: log replay
    tree_dest: Path | None  # then mount read-only and copy the tree here (made if needed)
    # Run this oracle on the read-only mount instead of copying; `tree_dest` is then only the
    # fallback for a tree that cannot be read in full.
    oracle: OracleSpec | None = None


class MountBackend(Protocol):
    name: str

    def mount_batch(self, requests: Sequence[MountRequest], timeout: float = MOUNT_TIMEOUT
                    ) -> list[MountSteps]:
        """One `MountSteps` per request, in order; `timeout` bounds each mount step."""
        ...


def merge_runs(argv: list[str], runs: list[ToolRun]) -> ToolRun:
    """Several commands reported as one step; the first failure decides rc, error and timeout."""
    merged = ToolRun(argv=argv, rc=0)
    for r in runs:
        merged.stdout += f"$ {' '.join(r.argv)}\n{r.stdout}"
        merged.stderr += r.stderr
        merged.seconds += r.seconds
        if merged.rc == 0 and not merged.error:
            merged.rc, merged.timed_out, merged.missing, merged.error = r.rc, r.timed_out, r.missing, r.error
    return merged


_PROMISES: dict[tuple[str, int, int], Promises] = {}  # (path, mtime, size) -> Promises: once per process


def cached_promises(path: Path) -> Promises:
    """A promises file, parsed once however many images are judged by it."""
    st = os.stat(path)
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _PROMISES:
        _PROMISES[key] = load_promises(path)
    return _PROMISES[key]


def oracle_reads(spec: OracleSpec) -> set[str] | None:
    """The paths the oracle will read in this state; None when the promises cannot be loaded
    (run_oracle reports that as the workload's failure)."""
    try:
        return cached_promises(spec.promises).reads(spec.present)[0]
    except Exception:
        return None


def oracle_failure(e: Exception) -> str:
    """The words for workload code that failed, wherever the oracle ran (runner._run_oracle too)."""
    return f"oracle raised {type(e).__name__}: {e}"


def run_oracle(tree: Path | Tree, spec: OracleSpec) -> tuple[list[Any], str]:
    """Violations (as the record keeps them, JSON) and an error: a promises file that cannot be
    loaded or an oracle that raises is workload code failing, the checker's fault, not the image's."""

    try:
        found = cached_promises(spec.promises).check(tree, spec.present)
        return [violation_to_json(v) for v in found], ""
    except Exception as e:
        return [], oracle_failure(e)


def unreadable(root: Path, paths: Collection[str] | None = None) -> str | None:
    """The first entry that `cp -a` could not read in full, or None: of the whole tree, or of
    `paths` (relative; what the oracle reads) and the directories that lead to them.

    The oracle gives the same answers on the mount as on a copy only when the copy is complete: on
    an unreadable entry cp leaves it out or short, which the oracle reads as absent or truncated,
    while on the mount it would see an I/O error. So an unreadable tree goes the copy way. An entry
    the oracle never reads cannot change its answer, so with `paths` only those are read: on a
    TCG guest reading every file of the image cost more than the mount."""
    try:
        if paths is None:
            _read_tree(root)
            return None
        seen: set[Path] = set()
        for rel in sorted(paths):
            p = root
            for part in Path(rel.lstrip("/")).parts:
                if p not in seen:
                    seen.add(p)
                    if not _read_entry(p, listing=True):
                        break
                p = p / part
            else:
                if p not in seen:
                    seen.add(p)
                    _read_entry(p, listing=True)
    except OSError as e:
        return f"{e.filename or root}: {e.strerror}"
    return None


def _read_entry(path: Path, listing: bool) -> bool:
    """Read one entry as cp -a would (xattrs; a file's data, a link's target; a directory's
    entries when `listing`); False when it is absent or not a directory where one is needed, which
    is the oracle's to judge, not an unreadable entry."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    for name in os.listxattr(path, follow_symlinks=False):
        os.getxattr(path, name, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        if listing:
            with os.scandir(path) as it:
                for e in it:
                    e.stat(follow_symlinks=False)
        return True
    if stat.S_ISLNK(st.st_mode):
        os.readlink(path)
    elif stat.S_ISREG(st.st_mode):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            while os.read(fd, 1 << 20):
                pass
        finally:
            os.close(fd)
    return False


def _read_tree(root: Path) -> None:
    stack = [root]
    while stack:
        d = stack.pop()
        os.listxattr(d, follow_symlinks=False)
        with os.scandir(d) as it:
            entries = list(it)
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                for name in os.listxattr(e.path, follow_symlinks=False):
                    os.getxattr(e.path, name, follow_symlinks=False)
                stack.append(Path(e.path))
            else:
                _read_entry(Path(e.path), listing=False)


def _syscall(argv: list[str], call: str, args: tuple[Any, ...], timeout: float) -> ToolRun:
    """mount(2) or umount2(2), reported as the mount(8)/umount(8) run (`argv`) it replaces. A
    thread, so that a mount stuck in the kernel is given up after `timeout` as a stuck tool is."""
    run = ToolRun(argv=argv)
    errno: list[int] = []

    def go() -> None:
        errno.append(0 if getattr(LIBC, call)(*args) == 0 else ctypes.get_errno())
    t0 = time.monotonic()
    thread = threading.Thread(target=go, daemon=True, name=call)
    thread.start()
    thread.join(timeout)
    run.seconds = time.monotonic() - t0
    if not errno:
        run.timed_out = True
        return run
    run.rc = MNT_EX_FAIL if errno[0] else 0
    if errno[0]:
        run.stderr = f"{argv[0]}: {argv[-1]}: {os.strerror(errno[0])}\n"
    return run


def _mount_call(fs: str, options: str, device: Path, mnt: str, timeout: float) -> ToolRun:
    opts = options.split(",")
    flags = sum(MS_FLAGS.get(o, 0) for o in opts)
    data = ",".join(o for o in opts if o not in MS_FLAGS)
    return _syscall(["mount", "-t", fs, "-o", options, str(device), mnt], "mount",
                    (str(device).encode(), mnt.encode(), fs.encode(), ctypes.c_ulong(flags),
                     data.encode() or None), timeout)


def _is_bad_mount(run: ToolRun) -> bool:
    return not (run.timed_out or run.missing or run.error) and run.rc not in (0, None)


class HostMounts:
    """Mounts in the kernel this process runs on: loop mounts of image files on the host (explicit
    opt-in only: `host_mount=True`, `--host-mount`), or, with `loop=False`, the block devices of the
    checker guest, where crashlab.guest.inguest.check uses it. There the mounts are system calls, not
    mount(8)/umount(8) processes: under TCG each process costs about half a second per image, and a
    block device needs none of mount(8)'s loop setup."""

    def __init__(self, loop: bool = True, name: str = "host") -> None:
        self.loop, self.name = loop, name

    @contextlib.contextmanager
    def _mounted(self, image: Path, fs: str, options: str, timeout: float,
                 runs: list[ToolRun]) -> Iterator[Path | None]:
        with tempfile.TemporaryDirectory(prefix="crashlab-mnt-") as mnt:
            # mount(8) sets up the loop device with autoclear: the unmount (or a failed mount) frees it.
            try:
                if self.loop:
                    m = run_tool(["mount", "-t", fs, "-o", f"loop,{options}", str(image), mnt], timeout)
                else:
                    m = _mount_call(fs, options, image, mnt, timeout)
            except BaseException:  # a signal mid-mount: the kernel may have finished it all the same
                self._detach(mnt)
                raise
            runs.append(m)
            if m.rc != 0:
                if m.timed_out:  # a hung mount may still complete later: do not leave it behind
                    self._detach(mnt)
                yield None
                return
            try:
                yield Path(mnt)
            finally:
                u = (run_tool(["umount", mnt], timeout) if self.loop else
                     _syscall(["umount", mnt], "umount2", (mnt.encode(), 0), timeout))
                if u.rc != 0:
                    u.error = u.error or f"umount failed (exit {u.rc})"
                    self._detach(mnt)
                runs.append(u)

    def _detach(self, mnt: str) -> None:
        if self.loop:
            run_tool(["umount", "-l", mnt], 30)
        else:
            _syscall(["umount", "-l", mnt], "umount2", (mnt.encode(), MNT_DETACH), 30)

    def mount_batch(self, requests: Sequence[MountRequest], timeout: float = MOUNT_TIMEOUT
                    ) -> list[MountSteps]:
        return [self.mount_steps(r.image, r.fs, recover=r.recover, tree_dest=r.tree_dest, timeout=timeout,
                                 oracle=r.oracle) for r in requests]

    def mount_steps(self, image: Path, fs: str, *, recover: bool, tree_dest: Path | None,
                    timeout: float = MOUNT_TIMEOUT, oracle: OracleSpec | None = None) -> MountSteps:
        fsys = filesystems.filesystem(fs)  # raises UnknownFilesystem, a ValueError
        steps = MountSteps()
        if recover:
            t0 = time.monotonic()
            runs: list[ToolRun] = []
            with self._mounted(image, fs, filesystems.RECOVERY_MOUNT_OPTIONS, timeout, runs):
                pass
            steps.recovery = merge_runs(["recover-mount", fs, str(image)], runs)
            steps.timings["recovery"] = time.monotonic() - t0
            if steps.recovery.rc != 0:
                return steps
        if tree_dest is not None or oracle is not None:
            t0 = time.monotonic()
            runs = []
            # Options that forbid any further log replay, so what the oracle reads is exactly what
            # fsck checks. Recovery already happened and was unmounted cleanly, so on a sound image
            # they change nothing.
            with self._mounted(image, fs, fsys.ro_options, timeout, runs) as mnt:
                if mnt is not None and oracle is not None:
                    t1 = time.monotonic()
                    bad = unreadable(mnt, oracle_reads(oracle))
                    if bad is None:
                        steps.violations, steps.oracle_error = run_oracle(mnt, oracle)
                        steps.timings["oracle"] = time.monotonic() - t1
                    runs.append(ToolRun(argv=["oracle-on-mount", str(oracle.promises)], rc=0,
                                        seconds=time.monotonic() - t1,
                                        stdout=f"unreadable, tree copied instead: {bad}\n" if bad else ""))
                if mnt is not None and steps.violations is None and tree_dest is not None:
                    # A copy, so the mount is gone before fsck reads the image. Unreadable files
                    # make cp fail but are skipped: their absence is then the oracle's to judge.
                    tree_dest.mkdir(parents=True, exist_ok=True)
                    cp = run_tool(["cp", "-a", "--", f"{mnt}/.", str(tree_dest)], timeout)
                    if cp.rc not in (0, None) and not cp.timed_out:
                        cp.stderr += f"(cp exit {cp.rc}: unreadable entries skipped)\n"
                        cp.rc = 0
                    runs.append(cp)
            steps.tree = merge_runs(["tree-mount", fs, str(image)], runs)
            steps.timings["tree"] = time.monotonic() - t0
        return steps
