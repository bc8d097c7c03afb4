"""The checker guest: kernel mounts of crash images inside a disposable QEMU guest.

A corrupted image can oops, hang or panic the kernel that mounts it, so by default that kernel is a
guest's. One boot serves many images: each is attached as a virtio disk (serial `ck<N>`), and the
guest's `check` job (crashlab.guest.inguest.check) mounts them in turn and runs the workload's
oracle on each read-only mount, reporting the violations as JSON; only a request without a
promises file (a callable oracle) or a tree that cannot be read in full has its tree copied into
the results share.
If an image kills the guest kernel, that image is recorded as what a reboot would have met (a
crashed mount: `unmountable`, console kept) and the images after it get a fresh guest. When the
checker itself fails (the guest does not boot, QEMU is killed without a kernel crash, a disk is not
found), the images it failed get a fresh guest too, `ATTEMPTS` boots in all; one that never gets
checked is a checker-error carrying its `checker_fault`, which campaigns count apart and retry.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from crashlab.cachemodes import cache_mode
from crashlab.check.mounts import MOUNT_TIMEOUT, MountRequest, MountSteps, OracleSpec
from crashlab.check.outcome import ToolRun, clip
from crashlab.guest.inguest.check import RESULTS
from crashlab.guest.job import GuestFileError, GuestJob, read_guest_file
from crashlab.guest.machine import Drive
from crashlab.guest.provision import Guest, provision
from crashlab.guest.shares import HostView, host_view, visible_in
from crashlab.guest.transport import VirtiofsTransport, guest_path

MAX_DISKS = 16  # virtio-blk-pci devices per boot (one PCI slot each)
BOOT_BUDGET_S = 90.0  # boot + Python start under TCG, with margin for a loaded host
PANIC_SIGNS = ("Kernel panic", "BUG:", "Oops:", "general protection fault", "Call Trace:")
ATTEMPTS = 2  # boots an image gets when the checker guest, not the image, fails
# Why the checker, not the image, failed (CheckRecord.checker_fault): the image gets another boot.
FAULT_BOOT = "checker guest failed before any image"  # no boot, no Python, hung or died at start
FAULT_STOPPED = "checker guest stopped mid-image"  # QEMU killed or exited, no kernel crash, no hang
FAULT_MISSING = "disk not found in the checker guest"


class GuestMounts:
    """A `MountBackend` whose mounts happen in a checker guest; a context manager (provisions once)."""

    name = "guest"

    def __init__(self, guest: Guest | None = None, *, memory_mib: int = 512, accel: str = "tcg",
                 max_disks: int = MAX_DISKS, attempts: int = ATTEMPTS) -> None:
        self.guest, self.memory_mib, self.accel, self.max_disks = guest, memory_mib, accel, max_disks
        self.attempts = max(1, attempts)
        self.boots: list[dict[str, float]] = []  # per boot: images, seconds (for reports and tests)

    def __enter__(self) -> GuestMounts:
        if self.guest is None:
            self.guest = provision()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        pass

    def mount_batch(self, requests: Sequence[MountRequest], timeout: float = MOUNT_TIMEOUT
                    ) -> list[MountSteps]:
        if self.guest is None:
            self.__enter__()
        results: list[MountSteps | None] = [None] * len(requests)
        tries = [0] * len(requests)  # boots that said something about each image
        pending = list(range(len(requests)))
        while pending:
            before = list(results)
            for i in self._boot(requests, pending[:self.max_disks], timeout, results):
                tries[i] += 1
                earlier = before[i]
                if earlier is not None and earlier.checker_fault:
                    steps = results[i]
                    assert steps is not None
                    steps.retries[:0] = [*earlier.retries, _why(earlier)]
            # Every boot attributes at least one image, so this ends: an image the guest never
            # reached waits for the next boot, one the checker failed gets `attempts` boots in all.
            pending = [i for i, r in enumerate(results)
                       if r is None or (r.checker_fault and tries[i] < self.attempts)]
        return [r for r in results if r is not None]

    def _boot(self, requests: Sequence[MountRequest], indices: list[int], timeout: float,
              results: list[MountSteps | None]) -> list[int]:
        """One boot for `indices`; fills in `results` for the images it can say something about
        and returns those (all of them when the guest reported nothing at all)."""
        assert self.guest is not None
        with tempfile.TemporaryDirectory(prefix="crashlab-checkguest-") as tmp:
            out = Path(tmp)
            promises: dict[Path, str] = {}
            view = host_view()
            reqs = [{"index": i, "serial": f"ck{i}", "fs": requests[i].fs, "recover": requests[i].recover,
                     "tree": requests[i].tree_dest is not None,
                     "oracle": _oracle_job(requests[i].oracle, out, view, promises)} for i in indices]
            # writeback: the guest's unmount flushes, and the host's fsck reads the same page cache.
            drives = tuple(Drive(Path(requests[i].image).resolve(), cache_mode("writeback"), serial=f"ck{i}")
                           for i in indices)
            job = GuestJob({"mode": "check", "timeout": timeout, "requests": reqs}, share=out,
                           console=out / "console.log", drives=drives, memory_mib=self.memory_mib,
                           accel=self.accel, timeout_s=BOOT_BUDGET_S + len(indices) * (2 * timeout + 10),
                           name="crashlab-check")
            run = VirtiofsTransport().run(job, self.guest)
            crash = ("timeout: " if run.timed_out else "") + (run.error or "")
            if not crash and run.qemu_exit:
                crash = f"QEMU exit status {run.qemu_exit}"
            console = run.console_text()
            events = _events(out / RESULTS)
            seen = []
            for i in indices:
                ev = events.get(i, {})
                if ev.get("event") == "done":
                    results[i] = _steps_from(ev, requests[i], out)
                elif ev.get("event") == "start":
                    # This image was being mounted when the guest stopped: a kernel that crashed is
                    # what a reboot would meet, and a hang is charged to the image too; a guest
                    # that just stopped (QEMU killed, our process dying) says nothing about it.
                    hung = run.timed_out
                    panicked = not hung and any(s in console for s in PANIC_SIGNS)
                    why = ("guest kernel crashed mounting this image" if panicked else
                           "guest hung mounting this image" if hung else
                           f"checker guest stopped ({crash or 'no reason given'})")
                    steps = _failed(requests[i], f"{why}: {_console_tail(console)}", tool=not panicked,
                                    timed_out=hung, fault="" if panicked or hung else FAULT_STOPPED)
                    steps.kernel_log = clip(console)
                    results[i] = steps
                elif ev.get("event") == "missing":
                    results[i] = _failed(requests[i], "disk not found in the guest", tool=True,
                                         fault=FAULT_MISSING)
                else:
                    continue
                seen.append(i)
            self.boots.append({"images": float(len(seen)), "seconds": run.host_seconds})
            if not seen:
                said = str(run.result.get("error") or "") or _console_tail(console) or "no console output"
                why = f"checker guest failed ({crash or 'no results'}): {said}"
                for i in indices:
                    results[i] = _failed(requests[i], why, tool=True, fault=FAULT_BOOT)
                seen = list(indices)
            return seen


def _oracle_job(spec: OracleSpec | None, out: Path, view: HostView, copied: dict[Path, str]
                ) -> dict[str, Any] | None:
    """The oracle as the guest gets it; a promises file it could not see is copied into `out`,
    once per file and boot."""
    if spec is None:
        return None
    src = Path(spec.promises).resolve()
    if visible_in(view, src):
        path = str(src)
    else:
        if src not in copied:
            name = f"promises-{len(copied)}.jsonl"
            # Unreadable here: left out, so the guest's load fails and says so (a checker-error).
            with contextlib.suppress(OSError):
                shutil.copyfile(src, out / name)
            copied[src] = guest_path(name)
        path = copied[src]
    present = None if spec.present is None else sorted(spec.present)
    return {"promises": path, "present": present}


def _events(path: Path) -> dict[int, dict[str, Any]]:
    last: dict[int, dict[str, Any]] = {}
    try:
        text = read_guest_file(path) or ""
    except GuestFileError:
        text = ""
    for line in text.splitlines():
        try:
            ev = json.loads(line)
        except ValueError:  # a line cut by the guest's death
            continue
        if isinstance(ev, dict) and isinstance(ev.get("index"), int):
            last[ev["index"]] = ev
    return last


def _why(steps: MountSteps) -> str:
    run = steps.recovery or steps.tree
    return run.stderr.strip() if run is not None else steps.checker_fault


def _console_tail(console: str, lines: int = 8) -> str:
    tail = console.strip().splitlines()[-lines:]
    return " | ".join(tail)


def _failed(req: MountRequest, why: str, *, tool: bool, timed_out: bool = False, fault: str = ""
            ) -> MountSteps:
    """A step that did not complete: the tool's fault (`tool`) or the filesystem's (a crashed kernel);
    `fault` when the checker guest, not the image, was at fault."""
    run = ToolRun(argv=["guest-mount", req.fs, str(req.image)], rc=None if tool else 255,
                  stderr=why + "\n", timed_out=timed_out, error=why if tool and not timed_out else "")
    steps = MountSteps(checker_fault=fault)
    if req.recover:
        steps.recovery = run
    elif req.tree_dest is not None or req.oracle is not None:
        steps.tree = run
    return steps


def _steps_from(ev: dict[str, Any], req: MountRequest, out: Path) -> MountSteps:
    steps = MountSteps(recovery=ToolRun.from_dict(ev["recovery"]) if ev.get("recovery") else None,
                       tree=ToolRun.from_dict(ev["tree"]) if ev.get("tree") else None,
                       kernel_log=ev.get("kernel_log", ""), timings=dict(ev.get("timings", {})),
                       violations=ev.get("violations"), oracle_error=ev.get("oracle_error", ""))
    src = out / "trees" / str(ev["index"])
    if req.tree_dest is not None and src.is_dir() and not src.is_symlink():
        shutil.rmtree(req.tree_dest, ignore_errors=True)
        shutil.move(str(src), str(req.tree_dest))
    return steps
