"""The cost of safety: what each cache mode and barrier setting costs in throughput and latency.

The other half of the 2008 argument: a safe mode is only worth arguing for next to what it costs.
One guest boot per configuration runs Debian's fio on the data disk, configured exactly as a
recording cell configures it (crashlab.record.run_guest: cache mode, disk model, aio, discard), but
with no recorder in the path: the recorder's own cost is not the cache mode's.

FIO_JOBS is the one table of what is measured. `fio_argv` (the command lines) and `figures` (the
parsing of `fio --output-format=json`) are pure; `measure` boots the guest. Every figure goes out
with the accelerator it ran under: TCG figures are an emulated CPU's, comparable only with each
other within one run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from crashlab.guest.job import GuestFileError, read_guest_file
from crashlab.guest.provision import Guest, which
from crashlab.record import OPTIONAL_FIELDS, RecordConfig, RecordError, run_guest, tool_version
from crashlab.recorders import Recorder

DRIVE_KEYS = ("aio", "discard", "detect_zeroes")  # in a cost's key only when off their defaults
DEFAULT_SIZE_MIB = 64
DEFAULT_RUNTIME_S = 5.0
PERCENTILES = (50.0, 99.0)
NOTE = ("fio in the guest on the data disk as a recording configures it, with no recorder in the "
        "path (the recorder's own cost is not the cache mode's)")


class CostError(ValueError):
    """A fio result that cannot be read, or a measurement that cannot be made; one line."""


@dataclass(frozen=True, slots=True)
class FioJob:
    name: str
    file: str  # in the filesystem under test; seqwrite lays out the file randwrite overwrites
    options: tuple[str, ...]
    figure: str  # the figure it gives, a key of Figures
    what: str


FIO_JOBS: dict[str, FioJob] = {j.name: j for j in (
    FioJob("seqwrite", "fio-data", ("--rw=write", "--bs=1M", "--end_fsync=1"), "seq_mb_s",
           "sequential write: 1 MiB buffered writes, one fsync at the end (MB/s, fsync included)"),
    FioJob("randwrite", "fio-data", ("--rw=randwrite", "--bs=4k", "--direct=1", "--time_based"),
           "rand_iops", "random write: 4 KiB O_DIRECT writes over that file (IOPS)"),
    FioJob("fsync", "fio-fsync", ("--rw=write", "--bs=4k", "--fsync=1", "--time_based"), "fsync_p50_ms",
           "fsync latency: 4 KiB appends to a new file, fsync after each (p50/p99 of the fsync)"),
)}


@dataclass(frozen=True, slots=True)
class Figures:
    seq_mb_s: float
    rand_iops: float
    fsync_p50_ms: float
    fsync_p99_ms: float

    def as_dict(self) -> dict[str, float]:
        return {"seq_mb_s": self.seq_mb_s, "rand_iops": self.rand_iops,
                "fsync_p50_ms": self.fsync_p50_ms, "fsync_p99_ms": self.fsync_p99_ms}


def fio_argv(job: FioJob, directory: str, size_mib: int, runtime_s: float) -> list[str]:
    """The fio command line of `job` on files in `directory` (pure). randrepeat: the same random
    offsets every run."""
    return ["fio", f"--name={job.name}", f"--filename={directory}/{job.file}", f"--size={size_mib}M",
            f"--runtime={runtime_s:g}", "--ioengine=psync", "--randrepeat=1", "--output-format=json",
            f"--percentile_list={':'.join(f'{p:g}' for p in PERCENTILES)}", *job.options]


def _json(name: str, text: str) -> dict[str, Any]:
    """fio's JSON document; fio may print notes before it, so it starts at the first '{'."""
    start = text.find("{")
    try:
        doc = json.loads(text[start:]) if start >= 0 else None
    except ValueError as e:
        raise CostError(f"fio {name}: output is not JSON: {e}") from None
    if doc is None:
        raise CostError(f"fio {name}: output is not JSON")
    if not isinstance(doc, dict) or not isinstance(doc.get("jobs"), list) or len(doc["jobs"]) != 1:
        raise CostError(f"fio {name}: output holds no single job")
    job: dict[str, Any] = doc["jobs"][0]
    if job.get("error"):
        raise CostError(f"fio {name}: job error {job['error']}")
    return job


def _positive(value: object, what: str) -> float:
    if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise CostError(f"fio reported no {what} ({value!r})")
    return float(value)


def _percentile(lat: Mapping[str, Any], p: float, what: str) -> float:
    pct = lat.get("percentile") or {}
    return _positive(pct.get(f"{p:.6f}"), f"{what} p{p:g}") / 1e6  # ns -> ms


def seq_mb_s(job: Mapping[str, Any]) -> float:
    """Bytes written over the job's whole run (`job_runtime`), the final fsync included: it is
    where a host write cache and none differ."""
    w = job.get("write") or {}
    ms = _positive(job.get("job_runtime"), "job runtime")
    return _positive(w.get("io_bytes"), "bytes written") / (ms / 1e3) / 1e6


def figures(outputs: Mapping[str, str]) -> Figures:
    """The figures from each job's fio JSON output, by job name (pure)."""
    jobs = {name: _json(name, outputs[name]) for name in FIO_JOBS if name in outputs}
    if missing := [n for n in FIO_JOBS if n not in jobs]:
        raise CostError(f"no fio output for {', '.join(missing)}")
    sync = jobs["fsync"].get("sync") or {}
    lat = sync.get("lat_ns") or {}
    return Figures(seq_mb_s=round(seq_mb_s(jobs["seqwrite"]), 3),
                   rand_iops=round(_positive((jobs["randwrite"].get("write") or {}).get("iops"), "IOPS"), 1),
                   fsync_p50_ms=round(_percentile(lat, 50.0, "fsync latency"), 4),
                   fsync_p99_ms=round(_percentile(lat, 99.0, "fsync latency"), 4))


# --- configurations -------------------------------------------------------------------------------

@dataclass(frozen=True)
class CostConfig:
    """One measurement: the disk as `record` configures it, and fio's sizes."""

    record: RecordConfig
    size_mib: int = DEFAULT_SIZE_MIB
    runtime_s: float = DEFAULT_RUNTIME_S

    def validate(self) -> CostConfig:
        if not 1 <= self.size_mib <= 1024:
            raise CostError(f"--size {self.size_mib}: 1 to 1024 MiB")
        if not 0.5 <= self.runtime_s <= 600:
            raise CostError(f"--runtime {self.runtime_s:g}: 0.5 to 600 seconds")
        self.guest_config.validate()
        return self

    @property
    def guest_config(self) -> RecordConfig:
        """No recorder; a disk that holds both fio files (sparse: only what fio writes is used)."""
        r = self.record
        fs_mib = max(r.filesystem.default_disk_mib, r.filesystem.min_mib, 2 * self.size_mib + 32)
        return replace(r, recorder=Recorder.NONE, workload="fio", disk_mib=fs_mib + r.reserved_mib)

    def key_fields(self, accel: str) -> dict[str, Any]:
        """The cell-like key: what the figures depend on (the resolved accelerator included)."""
        r = self.record
        opt = {k: getattr(r, k) for k in DRIVE_KEYS if getattr(r, k) != OPTIONAL_FIELDS[k]}
        return {"fs": r.fs, "cache": r.cache.name, "barrier": "on" if r.barrier else "off", "disk": r.disk,
                "accel": accel, "size_mib": self.size_mib, "runtime_s": self.runtime_s, **opt}

    def argvs(self, directory: str) -> dict[str, list[str]]:
        return {j.name: fio_argv(j, directory, self.size_mib, self.runtime_s) for j in FIO_JOBS.values()}


def cost_key(fields: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={fields[k]}" for k in sorted(fields))


def slug(fields: Mapping[str, Any]) -> str:
    return "-".join(str(fields[k]) for k in ("fs", "cache", "barrier", "disk", "accel")) + (
        f"-{fields['size_mib']}M-{fields['runtime_s']:g}s")


def command(fields: Mapping[str, Any]) -> str:
    """The explicit command that measures exactly this configuration again (pure)."""
    flags = {"fs": "fs", "cache": "cache", "barrier": "barrier", "disk": "disk", "accel": "accel",
             "size_mib": "size", "runtime_s": "runtime", **{k: k.replace("_", "-") for k in DRIVE_KEYS}}
    words = [f"--{flag} {fields[k]:g}" if isinstance(fields[k], float) else f"--{flag} {fields[k]}"
             for k, flag in flags.items() if k in fields]
    return " ".join(["crashlab cost", *words, "--again"])


def mount_of(path: Path, mounts: str) -> dict[str, str]:
    """The /proc/mounts entry holding the resolved `path` (the deepest mount point above it): where the
    guest's image lives decides what a host fdatasync costs, so every figure names it."""
    best: list[str] = []
    for line in mounts.splitlines():
        parts = line.split()
        deeper = len(parts) >= 4 and len(parts[1]) >= len(best[1] if best else "")
        if deeper and path.is_relative_to(parts[1]):
            best = parts
    return {"device": best[0], "mount": best[1], "fstype": best[2], "options": best[3]} if best else {}


def fio_version() -> str:
    """The host's fio, which the guest runs too (it sees the host's /usr over virtiofs)."""
    try:
        return tool_version(which("fio"), "--version")
    except RuntimeError:
        return "unavailable"


@dataclass(frozen=True)
class Measured:
    key: str
    fields: dict[str, Any]
    figures: Figures
    detail: dict[str, Any]  # argv, versions, fio's per-job numbers, guest timings: run.json's facts


def measure(config: CostConfig, out_dir: Path, *, guest: Guest | None = None) -> Measured:
    """Boot one guest that makes the filesystem, mounts it with the barrier setting and runs
    FIO_JOBS in order; the figures with everything they came from."""
    gc = config.validate().guest_config
    fio = which("fio")
    from crashlab.guest.inguest.init import MNT

    argvs = config.argvs(str(MNT))
    try:
        run = run_guest(gc, out_dir, guest=guest, extra={"mode": "cost", "fio": [
            {"name": n, "argv": [fio, *a[1:]]} for n, a in argvs.items()]})
    finally:
        (Path(out_dir) / "data.img").unlink(missing_ok=True)  # fio's bytes, up to twice --size: not evidence
    g = run.get("guest", {})
    if run.get("error") or g.get("status") != "done":
        why = run.get("error") or g.get("error") or f"guest status {g.get('status', 'unknown')}"
        raise RecordError(f"fio in the guest ({gc.describe()}) failed: {why} (see {out_dir}/console.log)")
    outputs: dict[str, str] = {}
    for name in FIO_JOBS:
        try:
            text = read_guest_file(Path(out_dir).resolve() / ".guest" / f"fio-{name}.json")
        except GuestFileError as e:
            raise CostError(str(e)) from None
        if text is not None:
            outputs[name] = text
            (Path(out_dir) / f"fio-{name}.json").write_text(text)
    figs = figures(outputs)
    accel = str(run["options"]["accel"])
    fields = config.key_fields(accel)
    versions = {**run["versions"], "fio": fio_version()}
    detail = {"figures": figs.as_dict(), "accel": accel, "versions": versions, "argv": argvs,
              "jobs": {j.name: j.what for j in FIO_JOBS.values()}, "note": NOTE,
              "mount": run["options"]["mount"], "mkfs": run["options"]["mkfs"],
              "qemu_argv": run["options"].get("qemu_argv"), "guest": g.get("steps", {}),
              "disk": g.get("disk"), "host_seconds": run.get("host_seconds"),
              "host_storage": mount_of(Path(out_dir).resolve(), Path("/proc/mounts").read_text())}
    return Measured(cost_key(fields), fields, figs, detail)


def accel_label(accel: str) -> str:
    """How a figure's accelerator is shown wherever the figure is: TCG in capitals."""
    return accel.upper()


__all__ = ["FIO_JOBS", "CostConfig", "CostError", "Figures", "figures", "fio_argv", "measure"]
