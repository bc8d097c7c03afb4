"""The checker guest: kernel mounts of crash images inside a long-lived, disposable QEMU guest.

A corrupted image can oops, hang or panic the kernel that mounts it, so by default that kernel is a
guest's. A `CheckerGuest` boots once (per process: a campaign worker keeps its own) and checks
batch after batch: each image is hard-linked into the guest's results share, where the guest's
`serve` job (crashlab.guest.inguest.check) attaches it to a loop device, mounts it as asked and runs
the workload's oracle on the read-only mount, reporting a `start` line before each image and a
`done` line after it. Only a request without a promises file (a callable oracle) or a tree that
cannot be read in full has its tree copied into the share.

When the guest dies on an image (a kernel crash, a hang past the image's deadline) it is replaced
and that image is tried once more, alone, in a fresh guest: only a second death is the image's
result (`unmountable`, console kept, or a hang). When the checker itself fails (the guest does not
boot, QEMU is killed without a kernel crash, an image cannot be attached), the images it failed get
another guest, `ATTEMPTS` in all; one that never gets checked is a checker-error carrying its
`checker_fault`, which campaigns count apart and retry.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from crashlab import rundir
from crashlab.check.mounts import MOUNT_TIMEOUT, MountRequest, MountSteps, OracleSpec
from crashlab.check.outcome import ToolRun, clip
from crashlab.guest.inguest.check import READY, batch_name, results_name
from crashlab.guest.job import (
    GuestFileError,
    read_guest_bytes,
    read_guest_file,
    read_guest_json,
    write_json_atomic,
)
from crashlab.guest.machine import Machine, MachineError, choose_accel
from crashlab.guest.provision import Guest, provision
from crashlab.guest.shares import HostView, host_view, visible_in
from crashlab.guest.transport import guest_path, virtiofs_shares

BOOT_BUDGET_S = 120.0  # boot + Python start under TCG, with margin for a loaded host
LIFETIME_S = 7 * 24 * 3600.0  # the machine's own hard deadline; images have their own
PANIC_SIGNS = ("Kernel panic", "BUG:", "Oops:", "general protection fault", "Call Trace:")
ATTEMPTS = 2  # guests an image gets when the checker guest, not the image, fails
POLL_S = 0.01
# Why the checker, not the image, failed (CheckRecord.checker_fault): the image gets another guest.
FAULT_BOOT = "checker guest failed before any image"  # no boot, no Python, hung or died at start
FAULT_STOPPED = "checker guest stopped mid-image"  # QEMU killed or exited, no kernel crash, no hang
FAULT_MISSING = "image could not be attached in the checker guest"


class GuestFailed(Exception):
    """The checker guest did not come up: the checker's fault, never an image's."""


@dataclass
class Batch:
    """What one batch came back with: events by request index and, if the guest died, how."""

    events: dict[int, dict[str, Any]] = field(default_factory=dict)
    died: str = ""  # "", "panic", "hung" or "stopped"
    console: str = ""  # the console since the batch began, when the guest died
    at: int | None = None  # the request being checked when it died
    seconds: float = 0.0


class CheckerGuest:
    """One long-lived checker guest: booted once, fed batches through its share until closed."""

    def __init__(self, guest: Guest, memory_mib: int = 512, accel: str = "auto", qemu: str | None = None
                 ) -> None:
        self.guest, self.memory_mib, self.qemu = guest, memory_mib, qemu
        self.accel = choose_accel(guest.kernel, guest.initrd, accel, qemu)
        self.machine: Machine | None = None
        self.share = Path()
        self.view: HostView = host_view()
        self.copied: dict[tuple[str, int], str] = {}  # promises files copied into the share
        self.batches = 0
        self.images = 0
        self.boot_seconds = 0.0

    def start(self) -> None:
        t0 = time.monotonic()
        where = rundir.tmpfs() or rundir.scratch()
        self.share = Path(tempfile.mkdtemp(prefix="crashlab-checker-", dir=where))
        shares = virtiofs_shares(self.share, {"mode": "serve"}, self.view)
        self.machine = Machine(self.guest.kernel, self.guest.initrd, shares=shares,
                               memory_mib=self.memory_mib, accel=self.accel, qemu=self.qemu,
                               timeout=LIFETIME_S,
                               console_log=self.share / "console.log", name="crashlab-check")
        try:
            self.machine.launch()
            while read_guest_json(self.share / "result.json").get("status") != READY:
                if not self.machine.is_running() or time.monotonic() - t0 > BOOT_BUDGET_S:
                    said = (read_guest_json(self.share / "result.json").get("error")
                            or self.machine.console_tail(6))
                    raise GuestFailed(f"checker guest did not come up ({self.accel}, "
                                      f"{time.monotonic() - t0:.0f} s): {said or 'no console output'}")
                time.sleep(0.05)
        except (MachineError, GuestFailed, OSError) as e:
            self.close()
            raise GuestFailed(str(e)) from None
        self.boot_seconds = time.monotonic() - t0

    def alive(self) -> bool:
        return self.machine is not None and self.machine.is_running()

    def run(self, requests: Sequence[MountRequest], timeout: float) -> Batch:
        """Check `requests` (indices are their positions); returns when all are answered or the
        guest died. An image gets `2 * timeout + 10` s (two mount steps and the oracle)."""
        assert self.machine is not None
        k, batch, t0 = self.batches, Batch(), time.monotonic()
        self.batches += 1
        base = self.images
        self.images += len(requests)
        links, copies, reqs = [], [], []
        for i, r in enumerate(requests):
            name = f"image-{base + i}.img"
            if not _link(Path(r.image), self.share / name):
                copies.append((self.share / name, Path(r.image)))
            links.append(self.share / name)
            reqs.append({"index": base + i, "image": name, "fs": r.fs, "recover": r.recover,
                         "tree": r.tree_dest is not None, "oracle": self._oracle_job(r.oracle)})
        console_at = _size(self.share / "console.log")
        try:
            write_json_atomic(self.share / batch_name(k), {"timeout": timeout, "requests": reqs})
            deadline_per_image = 2 * timeout + 10
            started: tuple[int, float] | None = None
            read = 0  # bytes of the results file taken: each poll parses only what is new
            while True:
                evs, read = _events(self.share / results_name(k), read)
                for ev in evs:
                    i = ev["index"] - base
                    if 0 <= i < len(reqs):
                        batch.events[i] = ev
                        if ev["event"] == "start":
                            started = (i, time.monotonic()) if started is None or started[0] != i else started
                open_ = [i for i, e in batch.events.items() if e["event"] == "start"]
                if len(batch.events) == len(reqs) and not open_:
                    break
                hung = started is not None and open_ and time.monotonic() - started[1] > deadline_per_image
                if hung or not self.machine.is_running():
                    batch.at = open_[0] if open_ else None
                    console = _read_from(self.share / "console.log", console_at)
                    batch.died = ("hung" if hung else
                                  "panic" if any(sign in console for sign in PANIC_SIGNS) else "stopped")
                    batch.console = console
                    break
                time.sleep(POLL_S)
            for i, ev in batch.events.items():
                ev["index"] = i
                dest = requests[i].tree_dest
                if ev["event"] == "done" and dest is not None:
                    _take_tree(self.share / "trees" / str(base + i), dest)
            for shared, image in copies:  # the guest recovered the copy: it is the image now
                with contextlib.suppress(OSError):
                    shutil.copyfile(shared, image)
        finally:
            for link in links:
                with contextlib.suppress(OSError):
                    link.unlink()
            if batch.died:
                self.close()  # after its trees are out of the share: it goes with the guest
        batch.seconds = time.monotonic() - t0
        return batch

    def _oracle_job(self, spec: OracleSpec | None) -> dict[str, Any] | None:
        """The oracle as the guest gets it; a promises file it cannot see is copied into the share,
        once per file (and version) for the guest's life."""
        if spec is None:
            return None
        src = Path(spec.promises).resolve()
        present = None if spec.present is None else sorted(spec.present)
        if visible_in(self.view, src):
            return {"promises": str(src), "present": present}
        try:
            key = (str(src), os.stat(src).st_mtime_ns)
        except OSError:
            key = (str(src), 0)
        if key not in self.copied:
            name = f"promises-{len(self.copied)}.jsonl"
            # Unreadable here: left out, so the guest's load fails and says so (a checker-error).
            with contextlib.suppress(OSError):
                shutil.copyfile(src, self.share / name)
            self.copied[key] = guest_path(name)
        return {"promises": self.copied[key], "present": present}

    def close(self) -> None:
        if self.machine is not None:
            m, self.machine = self.machine, None
            if m.is_running():
                with contextlib.suppress(OSError):
                    write_json_atomic(self.share / batch_name(self.batches), {"stop": True})
                with contextlib.suppress(MachineError):
                    m.wait(10)
            m._shutdown_quietly(None)
        if self.share != Path():
            shutil.rmtree(self.share, ignore_errors=True)


def _link(src: Path, dest: Path) -> bool:
    """The image in the share: a hard link where it can be (same filesystem, no copy), else a copy
    (False) that must be copied back once the guest has recovered it."""
    try:
        os.link(src, dest)
        return True
    except OSError:
        shutil.copyfile(src, dest)
        return False


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_from(path: Path, offset: int) -> str:
    text = ""
    with contextlib.suppress(GuestFileError):
        text = read_guest_file(path) or ""
    return text[offset:] if len(text) >= offset else text


def _events(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The events of the complete lines after byte `offset`, and the offset after them: a line
    still being written is read again at the next poll (re-parsing the whole file at every poll
    cost a tenth of the host's CPU on a long batch)."""
    try:
        data = read_guest_bytes(path, offset=offset) or b""
    except GuestFileError:
        return [], offset
    whole = data[:data.rfind(b"\n") + 1]
    out = []
    for line in whole.splitlines():
        try:
            ev = json.loads(line)
        except ValueError:  # a line cut by the guest's death
            continue
        if isinstance(ev, dict) and isinstance(ev.get("index"), int):
            out.append(ev)
    return out, offset + len(whole)


def _take_tree(src: Path, dest: Path) -> None:
    if src.is_dir() and not src.is_symlink():
        shutil.rmtree(dest, ignore_errors=True)
        shutil.move(str(src), str(dest))


# One live checker guest per process and configuration: a campaign worker boots it for its first
# unit that needs one and keeps it for every later unit. Closed at exit; a worker killed outright
# takes its QEMU and virtiofsd with it (PR_SET_PDEATHSIG) and its share is reclaimed by rundir.
_LIVE: dict[tuple[str, int, str, str | None], CheckerGuest] = {}


def live_guest(guest: Guest, memory_mib: int, accel: str, qemu: str | None = None) -> CheckerGuest:
    key = (guest.key, memory_mib, accel, qemu)
    g = _LIVE.get(key)
    if g is None or not g.alive():
        if g is not None:
            g.close()
        g = CheckerGuest(guest, memory_mib, accel, qemu)
        g.start()
        _LIVE[key] = g
    return g


def close_live_guests() -> None:
    for g in _LIVE.values():
        g.close()
    _LIVE.clear()


atexit.register(close_live_guests)


class GuestMounts:
    """A `MountBackend` whose mounts happen in a long-lived checker guest; a context manager."""

    name = "guest"

    def __init__(self, guest: Guest | None = None, *, memory_mib: int = 512, accel: str = "auto",
                 attempts: int = ATTEMPTS, batch: int = 64, kernel: str = "", modules: str = "",
                 qemu: str = "") -> None:
        """`kernel`/`modules`/`qemu`: the user's own (a cell's): recovery mounts are their kernel's,
        as a reboot on their machine would be; provisioned only when an image needs the guest."""
        self.guest, self.memory_mib, self.accel, self.batch = guest, memory_mib, accel, batch
        self.kernel, self.modules, self.qemu = kernel, modules, qemu
        self.attempts = max(1, attempts)
        self.boots: list[dict[str, float]] = []  # per batch: images, seconds (for reports and tests)

    def __enter__(self) -> GuestMounts:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        pass  # the guest outlives this backend: the next unit in this process reuses it

    def _live(self) -> CheckerGuest:
        if self.guest is None:
            self.guest = provision(self.kernel or None, self.modules or None)
        return live_guest(self.guest, self.memory_mib, self.accel, self.qemu or None)

    def mount_batch(self, requests: Sequence[MountRequest], timeout: float = MOUNT_TIMEOUT
                    ) -> list[MountSteps]:
        results: list[MountSteps | None] = [None] * len(requests)
        faults = [0] * len(requests)  # guests that failed this image for reasons of their own
        killed: set[int] = set()  # images that killed a guest once
        notes: dict[int, list[str]] = {}
        while pending := [i for i, r in enumerate(results) if r is None]:
            # An image that killed a guest is retried alone in a fresh one.
            todo = [i for i in pending if i in killed][:1] or pending[:self.batch]
            try:
                g = self._live()
            except GuestFailed as e:
                for i in todo:
                    faults[i] += 1
                    if faults[i] >= self.attempts:
                        results[i] = _failed(requests[i], str(e), tool=True, fault=FAULT_BOOT)
                    else:
                        notes.setdefault(i, []).append(str(e))
                continue
            b = g.run([requests[i] for i in todo], timeout)
            self.boots.append({"images": float(len(b.events)), "seconds": b.seconds})
            for j, ev in b.events.items():
                i = todo[j]
                if ev["event"] == "done":
                    results[i] = _steps_from(ev, requests[i])
                elif ev["event"] == "missing":
                    results[i] = _failed(requests[i], f"{FAULT_MISSING}: {ev.get('error', '')}", tool=True,
                                         fault=FAULT_MISSING)
            if b.died and b.at is not None:
                self._died(todo[b.at], b, requests, results, faults, killed, notes)
        out = [r for r in results if r is not None]
        for i, steps in enumerate(out):
            steps.retries[:0] = notes.get(i, [])
        return out

    def _died(self, i: int, b: Batch, requests: Sequence[MountRequest], results: list[MountSteps | None],
              faults: list[int], killed: set[int], notes: dict[int, list[str]]) -> None:
        """The guest died checking image `i`: retry it, or record what it did."""
        results[i] = None
        tail = _console_tail(b.console) or "no console output"
        why = {"panic": "guest kernel crashed mounting this image",
               "hung": "guest hung mounting this image"}.get(b.died, "")
        if why and i in killed:  # the second guest it killed: the image's own result
            steps = _failed(requests[i], f"{why}: {tail}", tool=b.died == "hung", timed_out=b.died == "hung")
            steps.kernel_log = clip(b.console)
            results[i] = steps
        elif why:
            killed.add(i)
            notes.setdefault(i, []).append(f"{why}; retried in a fresh guest: {tail}")
        else:
            faults[i] += 1
            why = f"{FAULT_STOPPED}: {tail}"
            if faults[i] >= self.attempts:
                results[i] = _failed(requests[i], why, tool=True, fault=FAULT_STOPPED)
            else:
                notes.setdefault(i, []).append(why)


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


def _steps_from(ev: dict[str, Any], req: MountRequest) -> MountSteps:
    return MountSteps(recovery=ToolRun.from_dict(ev["recovery"]) if ev.get("recovery") else None,
                      tree=ToolRun.from_dict(ev["tree"]) if ev.get("tree") else None,
                      kernel_log=ev.get("kernel_log", ""), timings=dict(ev.get("timings", {})),
                      violations=ev.get("violations"), oracle_error=ev.get("oracle_error", ""))
