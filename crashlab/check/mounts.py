"""Where the kernel touches a crash image: recovery mounts and the read-only mount for the oracle.

A backend does, for one image: optionally mount read-write and unmount cleanly (log replay, what a
reboot does), then optionally mount read-only and copy the recovered tree into a host directory for
the oracle. The guest backend (crashlab.check.guest) does this inside a disposable QEMU guest; the
host backend here uses loop mounts and is only for disposable machines: a corrupted image can crash
the kernel that mounts it.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from crashlab.check.outcome import ToolRun
from crashlab.check.tools import run_tool

SUPPORTED = ("ext4", "xfs", "btrfs")

# Read-only mount after recovery: options that forbid any further log replay, so what the oracle
# reads is exactly what fsck checks. Recovery already happened and was unmounted cleanly, so on a
# sound image they change nothing.
RO_OPTIONS = {"ext4": "ro,noload", "xfs": "ro,norecovery", "btrfs": "ro,rescue=nologreplay"}
# Recovery mount: read-write like a reboot; noatime so reading nothing rewrites inodes.
RW_OPTIONS = {"ext4": "noatime", "xfs": "noatime", "btrfs": "noatime"}

MOUNT_TIMEOUT = 120.0


@dataclass
class MountSteps:
    recovery: ToolRun | None = None  # read-write mount + clean unmount; None if not asked
    tree: ToolRun | None = None  # read-only mount + copy of the tree; None if not asked
    kernel_log: str = ""
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class MountRequest:
    image: Path
    fs: str
    recover: bool  # mount read-write and unmount cleanly: log replay
    tree_dest: Path | None  # then mount read-only and copy the tree here (an empty directory)


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


def _is_bad_mount(run: ToolRun) -> bool:
    return not (run.timed_out or run.missing or run.error) and run.rc not in (0, None)


class HostMounts:
    """Mounts in the kernel this process runs on: loop mounts of image files on the host (explicit
    opt-in only: `host_mount=True`, `--host-mount`), or, with `loop=False`, the block devices of the
    checker guest, where crashlab.check.inguest uses it."""

    def __init__(self, loop: bool = True, name: str = "host") -> None:
        self.loop, self.name = loop, name

    @contextlib.contextmanager
    def _mounted(self, image: Path, fs: str, options: str, timeout: float,
                 runs: list[ToolRun]) -> Iterator[Path | None]:
        with tempfile.TemporaryDirectory(prefix="crashlab-mnt-") as mnt:
            # mount(8) sets up the loop device with autoclear: the unmount (or a failed mount) frees it.
            opts = f"loop,{options}" if self.loop else options
            m = run_tool(["mount", "-t", fs, "-o", opts, str(image), mnt], timeout)
            runs.append(m)
            if m.rc != 0:
                if m.timed_out:  # a hung mount may still complete later: do not leave it behind
                    run_tool(["umount", "-l", mnt], 30)
                yield None
                return
            try:
                yield Path(mnt)
            finally:
                u = run_tool(["umount", mnt], timeout)
                if u.rc != 0:
                    u.error = u.error or f"umount failed (exit {u.rc})"
                    run_tool(["umount", "-l", mnt], 30)
                runs.append(u)

    def mount_batch(self, requests: Sequence[MountRequest], timeout: float = MOUNT_TIMEOUT
                    ) -> list[MountSteps]:
        return [self.mount_steps(r.image, r.fs, recover=r.recover, tree_dest=r.tree_dest, timeout=timeout)
                for r in requests]

    def mount_steps(self, image: Path, fs: str, *, recover: bool, tree_dest: Path | None,
                    timeout: float = MOUNT_TIMEOUT) -> MountSteps:
        if fs not in SUPPORTED:
            raise ValueError(f"unsupported filesystem {fs!r}")
        steps = MountSteps()
        if recover:
            t0 = time.monotonic()
            runs: list[ToolRun] = []
            with self._mounted(image, fs, RW_OPTIONS[fs], timeout, runs):
                pass
            steps.recovery = merge_runs(["recover-mount", fs, str(image)], runs)
            steps.timings["recovery"] = time.monotonic() - t0
            if steps.recovery.rc != 0:
                return steps
        if tree_dest is not None:
            t0 = time.monotonic()
            runs = []
            with self._mounted(image, fs, RO_OPTIONS[fs], timeout, runs) as mnt:
                if mnt is not None:
                    # A copy, so the mount is gone before fsck reads the image. Unreadable files
                    # make cp fail but are skipped: their absence is then the oracle's to judge.
                    cp = run_tool(["cp", "-a", "--", f"{mnt}/.", str(tree_dest)], timeout)
                    if cp.rc not in (0, None) and not cp.timed_out:
                        cp.stderr += f"(cp exit {cp.rc}: unreadable entries skipped)\n"
                        cp.rc = 0
                    runs.append(cp)
            steps.tree = merge_runs(["tree-mount", fs, str(image)], runs)
            steps.timings["tree"] = time.monotonic() - t0
        return steps
