"""Network storage faults during a recording on `storage=nbd`, and the outcome of such a live run.

A fault is `ACTION[=VALUE]@WHEN`; WHEN is `Ns`, N seconds after the workload's `workload-start`
marker reached the server's image, or `mark:NAME`, when the first in-band marker named NAME (e.g.
`fsync-3`) reached it. Faults run in the order given, each once its time has come:

    link-down / link-up   the veth pair's admin state: TCP stalls, then resumes (latency only)
    rate=1mbit | off      sch_tbf on both ends of the link
    loss=0.05 | 0         cls_bpf, random drops both ways (TCP retransmits: latency only)
    delay=MS              sch_netem, refused where the kernel has none (these hosts: tc only has
                          tbf, htb, clsact and bpf)
    server-kill           SIGKILL qemu-storage-daemon: with reconnect-delay 0 the guest's next
                          requests fail (EIO), and ext4 aborts its journal and goes read-only
    server-restart        a new daemon on the same image and address: within the guest's
                          reconnect-delay, its requests carry on as if nothing had happened

The host watches the server's image itself for the markers (the guest writes them through the
export, so their arrival is what the server has seen), not the guest's clock. After the guest is
done, the server's image is checked as a crash state is (recovery, fsck, the workload's oracle with
the durability markers that reached the image), and the outcome lands in the same taxonomy, beside
what the guest saw: EIO, a read-only remount, the workload's error.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import re
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from crashlab import crashstates, markers
from crashlab.check.outcome import Outcome
from crashlab.check.runner import CheckItem, check_batch
from crashlab.guest.provision import Guest
from crashlab.nbd import StorageServer
from crashlab.netns import NetnsError
from crashlab.record import ConfigError, GuestOutputs, RecordConfig, RecordError, run_guest
from crashlab.recorders import Recorder

# action -> (what its value is, "" for none)
ACTIONS: dict[str, str] = {
    "link-down": "", "link-up": "", "rate": "a tc rate such as 1mbit, or off", "loss": "a fraction 0..1",
    "delay": "milliseconds", "server-kill": "", "server-restart": "",
}
POLL_S = 0.02
_WHEN = re.compile(r"^(?:(?P<s>\d+(?:\.\d+)?)s|mark:(?P<mark>[^\s@]+))$")
_RATE = re.compile(r"^\d+(?:\.\d+)?(?:bit|kbit|mbit|gbit|bps|kbps|mbps)$")


@dataclass(frozen=True)
class Fault:
    action: str
    value: str = ""
    after_s: float | None = None  # after workload-start reached the server
    marker: str | None = None  # or: when this marker reached it

    @classmethod
    def parse(cls, text: str) -> Fault:
        """`ACTION[=VALUE]@WHEN`; ConfigError says what is valid."""
        what, sep, when = text.strip().partition("@")
        action, _, value = what.partition("=")
        if action not in ACTIONS:
            raise ConfigError(f"fault {text!r}: unknown action {action!r}; valid: {', '.join(ACTIONS)}")
        m = _WHEN.match(when)
        if not sep or m is None:
            raise ConfigError(f"fault {text!r}: say when, as ACTION@2.5s (after workload-start) "
                              "or ACTION@mark:NAME")
        fault = cls(action, value, float(m["s"]) if m["s"] else None, m["mark"])
        fault.check_value()
        return fault

    def check_value(self) -> None:
        need = ACTIONS[self.action]
        if not need and self.value:
            raise ConfigError(f"{self.action} takes no value")
        if need and not self.value:
            raise ConfigError(f"{self.action} needs a value: {need}")
        if self.action == "rate" and self.value != "off" and not _RATE.match(self.value):
            raise ConfigError(f"rate {self.value!r}: {need}")
        if self.action in ("loss", "delay"):
            try:
                number = float(self.value)
            except ValueError:
                raise ConfigError(f"{self.action} {self.value!r}: {need}") from None
            if number < 0 or (self.action == "loss" and number > 1):
                raise ConfigError(f"{self.action} {self.value!r}: {need}")

    @property
    def label(self) -> str:
        when = f"{self.after_s:g}s" if self.marker is None else f"mark:{self.marker}"
        return f"{self.action}{'=' + self.value if self.value else ''}@{when}"


@dataclass(frozen=True)
class FaultConfig:
    base: RecordConfig  # storage nbd; recorder qemu logs the server side up to a kill
    faults: tuple[Fault, ...] = ()

    def validate(self) -> FaultConfig:
        if self.base.storage != "nbd":
            raise ConfigError("network faults need storage nbd")
        if self.base.recorder is Recorder.DM:
            raise ConfigError("storage nbd is logged on its server: use recorder qemu (or none)")
        if not self.faults:
            raise ConfigError("name at least one fault")
        self.base.validate()
        return self


def apply(fault: Fault, server: StorageServer) -> None:
    """Do one fault now."""
    ns = server.ns
    if fault.action in ("link-down", "link-up"):
        ns.set_link(fault.action == "link-up")
    elif fault.action == "rate":
        ns.set_rate(None if fault.value == "off" else fault.value)
    elif fault.action == "loss":
        ns.set_loss(float(fault.value))
    elif fault.action == "delay":
        ns.set_delay(float(fault.value))
    elif fault.action == "server-kill":
        server.kill()
    elif fault.action == "server-restart":
        server.restart()


class MarkerWatch:
    """Follows the markers arriving in an image's marker region, in sequence order (the writer
    puts marker `seq` in slot `seq % slots`), reading one slot per look."""

    def __init__(self, image: Path, offset: int, length: int, block: int = markers.PAYLOAD) -> None:
        self.image, self.offset, self.block = image, offset, block
        self.slots = length // block
        self.next_seq = 0

    def poll(self) -> list[markers.Marker]:
        found: list[markers.Marker] = []
        with open(self.image, "rb") as f:
            while True:
                f.seek(self.offset + (self.next_seq % self.slots) * self.block)
                mk = markers.decode(f.read(markers.PAYLOAD))
                if mk is None or mk.seq != self.next_seq:
                    return found
                found.append(mk)
                self.next_seq += 1


def present_markers(image: Path, offset: int, length: int, block: int = markers.PAYLOAD) -> dict[int, str]:
    """Every marker in the image's marker region: seq -> name."""
    out = {}
    with open(image, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        for pos in range(offset, min(offset + length, len(m)), block):
            mk = markers.decode(m[pos:pos + markers.PAYLOAD])
            if mk is not None:
                out[mk.seq] = mk.name
    return out


@dataclass
class Applied:
    fault: str
    at_s: float | None  # seconds after workload-start reached the server; None: never reached
    error: str = ""


class Schedule:
    """The faults, run by a thread for the length of a boot (record.run_guest's `during` hook).

    A daemon restarted from the thread dies when the thread does (PR_SET_PDEATHSIG is per thread),
    so the thread is held until `__exit__` has stopped the server."""

    def __init__(self, faults: Sequence[Fault], server: StorageServer, watch: MarkerWatch) -> None:
        self.faults, self.server, self.watch = list(faults), server, watch
        self.applied: list[Applied] = []
        self.started_at: float | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="crashlab-netfaults", daemon=True)

    def _run(self) -> None:
        seen: set[str] = set()
        pending = list(self.faults)
        while pending and not self._done.is_set():
            for mk in self.watch.poll():
                seen.add(mk.name)
                if mk.name == markers.WORKLOAD_START and self.started_at is None:
                    self.started_at = time.monotonic()
            f = pending[0]
            now = time.monotonic()
            due = (f.marker in seen) if f.marker is not None else (
                self.started_at is not None and now - self.started_at >= (f.after_s or 0.0))
            if due:
                pending.pop(0)
                at = round(now - self.started_at, 3) if self.started_at is not None else None
                try:
                    apply(f, self.server)
                    self.applied.append(Applied(f.label, at))
                except (NetnsError, RuntimeError, OSError) as e:
                    self.applied.append(Applied(f.label, at, str(e)))
                continue
            self._done.wait(POLL_S)
        self.applied += [Applied(f.label, None, "not reached") for f in pending]
        self._done.wait()  # hold the thread: a restarted daemon lives as long as it

    def __enter__(self) -> Schedule:
        self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.server.stop()
        finally:
            self._done.set()
            self._thread.join()


@dataclass
class FaultResult(GuestOutputs):
    config: FaultConfig
    run: dict[str, Any]
    outcome: Outcome
    reason: str
    applied: list[Applied] = field(default_factory=list)

    @property
    def seen(self) -> dict[str, Any]:
        """What the guest saw: its kernel's evidence and the workload's status and error."""
        g = self.run.get("guest", {})
        k = g.get("kernel", {})
        return {"eio": bool(k.get("eio")), "remounted_ro": bool(k.get("remounted_ro")),
                "mount": k.get("mount", ""), "workload_status": g.get("workload_status"),
                "workload_error": g.get("workload_error", ""), "umount_error": g.get("umount_error", "")}

    def as_dict(self) -> dict[str, Any]:
        return {"outcome": str(self.outcome), "reason": self.reason, "seen": self.seen,
                "faults": [dataclasses.asdict(a) for a in self.applied],
                "reconnect_delay_s": self.config.base.reconnect_delay_s}


def inject(config: FaultConfig, out_dir: str | Path, *, guest: Guest | None = None, qemu: str | None = None,
           host_mount: bool = False) -> FaultResult:
    """Record the workload on an NBD export with the faults, then check the server's image."""
    config.validate()
    base = config.base
    out = Path(out_dir).resolve()
    outs = GuestOutputs(out)
    schedules: list[Schedule] = []

    def during(server: StorageServer) -> Schedule:
        schedules.append(Schedule(config.faults, server,
                                  MarkerWatch(outs.image, base.fs_bytes, base.reserved_mib << 20)))
        return schedules[0]

    run = run_guest(base, out, guest=guest, qemu=qemu, during=during)
    applied = schedules[0].applied if schedules else []
    g = run.get("guest", {})
    if run.get("error") or g.get("status") != "done":
        why = run.get("error") or g.get("error") or f"guest status {g.get('status', 'unknown')}"
        raise RecordError(f"network faults on {base.describe()}: the guest did not finish: {why} "
                          f"(see {outs.console})")
    present = present_markers(outs.image, base.fs_bytes, base.reserved_mib << 20)
    with tempfile.TemporaryDirectory(prefix="crashlab-live-", dir=crashstates.default_workdir()) as tmp:
        copy = Path(tmp) / "final.img"  # recovery writes to the image: the kept one stays as left
        crashstates.sparse_copy(outs.image, copy)
        item = CheckItem(copy, base.fs, "live-" + "+".join(f.label for f in config.faults),
                         promises=outs.promises, present=frozenset(present))
        record = next(iter(check_batch([item], host_mount=host_mount)))
    result = FaultResult(out, config, run, record.outcome, record.reason, applied)
    run["netfaults"] = {**result.as_dict(), "check": record.to_dict(), "markers_on_image": len(present)}
    (out / "run.json").write_text(json.dumps(run, indent=1, sort_keys=True, default=str))
    return result
