"""Record a workload in a disposable guest: every write, flush, FUA, discard and mark, in one log.

`record(config, out_dir)` runs a record job in a guest (crashlab.guest.job), which sets up the
recorder, makes the filesystem (so mkfs is the log's baseline), mounts it and runs the workload
with in-band markers in the reserved tail of the logged device. It leaves in `out_dir`:

    write.log        the dm-log-writes-format log (both recorders write the same format)
    data.img         the data disk as the guest left it
    promises.jsonl   the workload's durability promises, keyed by marker
    console.log      the guest's serial console
    workload.out     the workload's stdout and stderr
    run.json         every option and version, guest timings, and the log's summary

Device layout (one data disk of `disk_mib`): the filesystem covers all but the last `reserved_mib`,
where the markers go. Recorder `qemu` logs below the virtio disk (blklogwrites); recorder `dm` logs
the whole data disk with dm-log-writes in the guest, the log on a second, sparse virtio disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

import crashlab
from crashlab import logformat, nbd, proc, rundir
from crashlab.cachemodes import CACHE_MODES, CacheMode
from crashlab.diskmodels import (
    DEFAULT_AIO,
    DEFAULT_DISK,
    DETECT_ZEROES,
    DISCARD,
    DiskError,
    DiskModel,
    check_drive,
    disk_model,
)
from crashlab.filesystems import DEFAULT_DATA_MODE, Filesystem, FilesystemError, filesystem
from crashlab.guest import transport as transports
from crashlab.guest.inguest.record import SERIES_READY, cell_dir, cell_request
from crashlab.guest.job import (
    GuestJob,
    GuestRun,
    JobError,
    move_guest_file,
    read_guest_file,
    read_guest_json,
    write_json_atomic,
)
from crashlab.guest.machine import (
    HOTPLUG_DEVICES,
    Drive,
    Machine,
    MachineError,
    choose_accel,
    find_qemu,
    qemu_version,
)
from crashlab.guest.provision import Guest, provision
from crashlab.guest.shares import host_view
from crashlab.guest.transport import virtiofs_shares
from crashlab.netns import NetnsError
from crashlab.recorders import Recorder

TRANSPORTS = transports.TRANSPORT_NAMES


class ConfigError(ValueError):
    """A configuration that cannot be recorded as asked; the message says why in one line."""


class RecordError(RuntimeError):
    """The guest did not complete the recording."""


# Fields added after run.json and the store existed, with their defaults: the disk (crashlab.diskmodels),
# the user's kernel and QEMU, where the disk lives (crashlab.nbd). Left out of run.json, cell keys and
# slugs at these defaults.
OPTIONAL_FIELDS: Mapping[str, str] = MappingProxyType({
    "disk": DEFAULT_DISK, "aio": DEFAULT_AIO, "discard": DISCARD[0], "detect_zeroes": DETECT_ZEROES[0],
    "kernel": "", "modules": "", "qemu": "", "storage": "local"})
# Left out of run.json at their defaults too, but not cell fields: host-dm's outer guest, and how
# long an NBD client waits for its server.
_RECORD_ONLY_DEFAULTS: Mapping[str, object] = MappingProxyType({"nested": False, "reconnect_delay_s": 0})


@dataclass(frozen=True)
class RecordConfig:
    """What one guest run records; names are parsed into these types by the CLI (or a Cell)."""

    fs: str = "ext4"
    cache: CacheMode = CACHE_MODES["writeback"]
    barrier: bool = True
    data_mode: str = DEFAULT_DATA_MODE  # ext4/ext3 data=
    recorder: Recorder = Recorder.DM  # none: no log (dm-flakey runs use this)
    workload: str = "smallfiles"
    seed: int = 0
    scale: int = 1
    disk_mib: int | None = None  # default per filesystem (Filesystem.default_disk_mib)
    reserved_mib: int = 4  # tail of the logged device for in-band markers
    memory_mib: int = 512
    accel: str = "auto"
    timeout_s: float = 600.0
    # Extra directories searched for workload modules (tests use their own tiny workloads).
    workload_path: tuple[str, ...] = field(default=())
    # Workload parameters (`--param KEY=VALUE`), e.g. ("ops", JSON) for the generated `ops` workload.
    params: tuple[tuple[str, str], ...] = field(default=())
    # How the guest runs the workload (crashlab.guest.transport): "virtiofs" (the host's Python over
    # virtiofs), "shell" (the busybox fallback: one built-in shell workload, qemu recorder, ext4), or
    # "auto": virtiofs when virtiofsd is found, else shell.
    transport: str = "auto"
    # Where the data disk lives (crashlab.nbd.STORAGES): "local", or "nbd", an export of a storage
    # server in a network namespace, logged on the server.
    storage: str = "local"
    # nbd: seconds the guest's QEMU waits for a lost server to come back before failing requests.
    reconnect_delay_s: int = 0
    # The data disk as the guest sees it and as QEMU backs it (crashlab.diskmodels).
    disk: str = DEFAULT_DISK
    aio: str = DEFAULT_AIO
    discard: str = DISCARD[0]
    detect_zeroes: str = DETECT_ZEROES[0]
    # What the user ships: a kernel image with its lib/modules/VERSION, a QEMU binary; "" = the
    # Debian cloud kernel crashlab provisions, qemu-system-x86_64 on PATH.
    kernel: str = ""
    modules: str = ""
    qemu: str = ""

    @property
    def disk_model(self) -> DiskModel:
        return disk_model(self.disk)
    # host-dm only: run the host's side in an outer guest (this host has no device-mapper).
    nested: bool = False

    @property
    def filesystem(self) -> Filesystem:
        return filesystem(self.fs)

    @property
    def disk_bytes(self) -> int:
        return (self.disk_mib or self.filesystem.default_disk_mib + self.reserved_mib) << 20

    @property
    def fs_bytes(self) -> int:
        return self.disk_bytes - (self.reserved_mib << 20)

    def validate(self) -> RecordConfig:
        try:
            fs = self.filesystem
            fs.mount_options(self.barrier, self.data_mode)  # what the filesystem lacks, e.g. XFS barrier=off
        except FilesystemError as e:
            raise ConfigError(str(e)) from None
        if self.reserved_mib < 1:
            raise ConfigError("the marker region needs at least 1 MiB")
        if self.fs_bytes < fs.min_mib << 20:
            raise ConfigError(f"{self.fs} needs at least {fs.min_mib} MiB; the disk leaves "
                              f"{self.fs_bytes >> 20} MiB after the {self.reserved_mib} MiB marker region")
        if self.memory_mib > 1024:
            raise ConfigError("guest memory is capped at 1024 MiB")
        if self.accel not in ("auto", "tcg", "kvm"):
            raise ConfigError(f"accel must be auto, tcg or kvm, not {self.accel!r}")
        try:
            self.disk_model  # noqa: B018 (the lookup is the check)
            check_drive(self.cache.direct, self.cache.name, self.aio, self.discard, self.detect_zeroes)
        except DiskError as e:
            raise ConfigError(str(e)) from None
        if bool(self.kernel) != bool(self.modules):
            raise ConfigError("--kernel and --modules go together (the modules must match the kernel)")
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"unknown transport {self.transport!r}; choose from {', '.join(TRANSPORTS)}")
        if self.nested and self.recorder is not Recorder.HOST_DM:
            raise ConfigError("--nested runs the host-dm recorder one level down; it means nothing for "
                              f"recorder {self.recorder}")
        try:
            nbd.storage(self.storage)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.storage == "nbd" and self.recorder in (Recorder.DM, Recorder.HOST_DM):
            raise ConfigError("storage nbd is logged on its server: use recorder qemu (or none)")
        if self.reconnect_delay_s and self.storage != "nbd":
            raise ConfigError("reconnect-delay applies to storage nbd only")
        if not 0 <= self.reconnect_delay_s <= 3600:
            raise ConfigError(f"reconnect-delay must be 0 to 3600 seconds, not {self.reconnect_delay_s}")
        return self

    def describe(self) -> str:
        opts = mount_options(self) or "defaults"
        drive = "".join(f" {k}={v}" for k, v, default in (
            ("storage", self.storage, "local"), ("disk", self.disk, DEFAULT_DISK),
            ("aio", self.aio, DEFAULT_AIO),
            ("discard", self.discard, DISCARD[0]), ("detect_zeroes", self.detect_zeroes, DETECT_ZEROES[0]),
            ("kernel", self.kernel, ""), ("qemu", self.qemu, "")) if v != default)
        return (f"{self.fs} ({opts}) cache={self.cache.name} recorder={self.recorder} "
                f"workload={self.workload} seed={self.seed} scale={self.scale}{drive}")

    def as_dict(self) -> dict[str, Any]:
        """run.json's `config`: every field, the cache mode and recorder by name, as always stored;
        the fields added later only when set, so a default recording's run.json is as it was."""
        d = {f.name: getattr(self, f.name) for f in fields(self)
             if {**OPTIONAL_FIELDS, **_RECORD_ONLY_DEFAULTS}.get(f.name, object()) != getattr(self, f.name)}
        return {**d, "cache": self.cache.name, "recorder": self.recorder.value}


def mkfs_argv(config: RecordConfig) -> list[str]:
    """mkfs for the filesystem, sized to leave the marker region free; `{dev}` is the device."""
    return config.filesystem.mkfs_argv(config.fs_bytes)


def mount_options(config: RecordConfig) -> str:
    return config.filesystem.mount_options(config.barrier, config.data_mode)


def resolve_transport(config: RecordConfig) -> str:
    return transports.resolve(config.transport)


def job_for(config: RecordConfig, flakey: dict[str, Any] | None = None,
            live_fault: bool = False) -> dict[str, Any]:
    """The guest's job.json (pure); `live_fault`: the disk may fail under the workload (a network
    storage fault), so the guest reports what its kernel saw and does not give up on a failed umount."""
    job = {
        "mode": "record", "recorder": config.recorder.value, "fs": config.fs,
        "mkfs": mkfs_argv(config), "mount_opts": mount_options(config),
        "data_dev": "/dev/vda", "log_dev": "/dev/vdb" if config.recorder.in_guest else None,
        "marker_offset": config.fs_bytes, "marker_length": config.reserved_mib << 20,
        "workload": config.workload, "seed": config.seed, "scale": config.scale,
        "workload_path": [str(Path(p).resolve()) for p in config.workload_path], "flakey": flakey,
        "params": dict(config.params),
        # The disks are found by serial: a SCSI or ATA data disk is an sdX, named in probe order.
        "disk": config.disk, "data_serial": DATA_SERIAL,
        "log_serial": LOG_SERIAL if config.recorder.in_guest else None,
    }
    if live_fault:
        job["live_fault"] = True
    return job


DATA_SERIAL, LOG_SERIAL = "data", "log"


def needed_drivers(config: RecordConfig) -> list[str]:
    """The guest drivers this recording cannot do without (crashlab.diskmodels.KERNEL_OPTIONS)."""
    fs = config.filesystem
    # Linux 6.1 has no ext3 driver: ext4's registers the type (crashlab.filesystems).
    drivers = list(fs.modules) or ["ext4"]
    drivers += config.disk_model.guest_modules
    if config.recorder is Recorder.DM:
        drivers += ["dm_mod", "dm_log_writes"]
    return drivers


def log_disk_bytes(config: RecordConfig) -> int:
    """The dm recorder's log disk: sparse, so generous (every data write lands there once more)."""
    return max(1 << 30, 8 * config.disk_bytes)


@dataclass
class GuestOutputs:
    """What a guest run leaves in its directory, by name: one place that knows the file names."""

    out_dir: Path

    @property
    def log(self) -> Path:
        return self.out_dir / "write.log"

    @property
    def image(self) -> Path:
        return self.out_dir / "data.img"

    @property
    def promises(self) -> Path:
        return self.out_dir / "promises.jsonl"

    @property
    def console(self) -> Path:
        return self.out_dir / "console.log"


@dataclass
class Recording(GuestOutputs):
    config: RecordConfig
    run: dict[str, Any]

    @property
    def summary(self) -> dict[str, Any]:
        return self.run.get("log") or {}


OUTPUTS = ("write.log", "data.img", "promises.jsonl", "console.log", "workload.out", "run.json", ".guest")


@functools.cache
def tool_version(*argv: str) -> str:
    try:
        r = proc.run(argv, 10)
    except OSError as e:
        return f"unavailable ({e})"
    if r.timed_out:
        return "unavailable (no answer in 10 s)"
    out = r.text.strip().splitlines()
    return out[0].strip() if out else "unknown"


def versions(config: RecordConfig, guest: Guest, qemu: str | None = None) -> dict[str, str]:
    tools = (config.filesystem.mkfs_version, config.filesystem.fsck_version)
    v = {
        "crashlab": crashlab.__version__, "qemu": qemu_version(qemu), "qemu_binary": find_qemu(qemu),
        "python": sys.version.split()[0],
        "host_kernel": os.uname().release,
        "guest_kernel": guest.kernel_version,
        "guest_kernel_package": f"{guest.kernel_package} {guest.package_version}" if guest.kernel_package
        else "user-supplied", "guest_image": guest.key,
        "guest_kernel_image": str(config.kernel or guest.kernel),
    }
    for argv in tools:
        v[argv[0]] = tool_version(*argv)
    if config.storage == "nbd":
        v["qemu-storage-daemon"] = tool_version("qemu-storage-daemon", "--version")
    if config.recorder in (Recorder.DM, Recorder.NONE):  # none: dm-flakey
        v["dmsetup"] = tool_version("dmsetup", "--version")
    return v


def prepare_out_dir(out_dir: Path) -> Path:
    """`out_dir` made and cleared of a previous run's outputs: QEMU appends to an existing log."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:
        p = out_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    return out_dir


ServerHook = Callable[[nbd.StorageServer], contextlib.AbstractContextManager[Any]]


def cell_drives(config: RecordConfig, outs: GuestOutputs, image: Path | None = None,
                serials: tuple[str, str] = (DATA_SERIAL, LOG_SERIAL)) -> list[Drive]:
    """The data disk with the cell's cache options (and, for qemu, its blklogwrites log), then,
    for dm, the log disk."""
    qemu_log = outs.log if config.recorder is Recorder.QEMU else None
    drives = [Drive(image or outs.image, config.cache, log=qemu_log, serial=serials[0],
                    model=config.disk_model, aio=config.aio, discard=config.discard,
                    detect_zeroes=config.detect_zeroes)]
    if config.recorder is Recorder.DM:  # the log disk is the tool's, not under test: virtio-blk
        drives.append(Drive(outs.log, CACHE_MODES["writeback"], serial=serials[1]))
    return drives


def start_outputs(config: RecordConfig, outs: GuestOutputs, image: Path | None = None) -> None:
    """A clean out_dir with a fresh data disk (unless `image` is given) and a fresh log."""
    prepare_out_dir(outs.out_dir)
    if image is None:
        with open(outs.image, "wb") as f:
            f.truncate(config.disk_bytes)
    if config.recorder is Recorder.QEMU:
        outs.log.touch()
    elif config.recorder is Recorder.DM:
        with open(outs.log, "wb") as f:
            f.truncate(log_disk_bytes(config))


def run_header(config: RecordConfig, guest: Guest, qemu: str | None, accel: str,
               flakey: dict[str, Any] | None = None) -> dict[str, Any]:
    """run.json as it stands before the guest runs: every option and version."""
    return {
        "config": config.as_dict(), "options": {"mount": mount_options(config), "mkfs": mkfs_argv(config),
                                              "accel": accel, "flakey": flakey},
        "versions": versions(config, guest, qemu), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def finish_run(config: RecordConfig, outs: GuestOutputs, run: dict[str, Any], share: Path) -> None:
    """The guest's files out of its share, the log's summary, and run.json written."""
    for name in ("promises.jsonl", "workload.out"):
        move_guest_file(share / name, outs.out_dir / name)
    if config.recorder.logs and outs.log.exists():
        run["log"] = summarize_log(outs.log, truncate=config.recorder.in_guest)
    try:
        (outs.out_dir / "run.json").write_text(json.dumps(run, indent=1, sort_keys=True, default=str))
    except OSError as e:
        why = run.get("error") or e.strerror
        raise RecordError(f"recording {config.describe()} failed: {why}; cannot write run.json "
                          f"({e.strerror}){full_disk_hint(outs.out_dir)}") from e


def run_guest(config: RecordConfig, out_dir: Path, *, guest: Guest | None = None, qemu: str | None = None,
              flakey: dict[str, Any] | None = None,
              observer: Callable[[Machine], None] | None = None, image: Path | None = None,
              during: ServerHook | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Boot one guest for `config` and return run.json's contents (also written to out_dir).

    `extra`: job.json keys over the recording's (crashlab.cost: mode `cost` and its fio command
    lines), so another job gets the recording's disks, drive options and run.json exactly.

    `image`: a data disk made beforehand, used in place of out_dir/data.img and never truncated
    (host-dm: written in full on the logged host filesystem, so its blocks stay where they are).
    With storage nbd, the disk is served for the boot's length (crashlab.nbd.serve) and `during`,
    if given, runs around the boot with the server in hand (crashlab.netfaults' schedule)."""
    config.validate()
    if during is not None and config.storage != "nbd":
        raise ConfigError("network faults need storage nbd")
    transport = transports.transport(config.transport)
    payload = {**job_for(config, flakey, live_fault=during is not None), **(extra or {})}
    outs = GuestOutputs(Path(out_dir).resolve())
    drives = cell_drives(config, outs, image)
    qemu = qemu or config.qemu or None
    job = GuestJob(payload, share=outs.out_dir / ".guest", console=outs.console, drives=tuple(drives),
                   view_extra=tuple(Path(p).resolve() for p in config.workload_path),
                   memory_mib=config.memory_mib, qemu=qemu, timeout_s=config.timeout_s)
    try:
        transport.check(job)
    except JobError as e:
        raise ConfigError(str(e)) from e
    guest = guest or provision(kernel=config.kernel or None, modules=config.modules or None)
    needs = [*needed_drivers(config), "dm_mod", "dm_flakey"] if flakey else needed_drivers(config)
    if lacking := guest.lacking(needs):
        raise ConfigError(lacking)
    start_outputs(config, outs, image)
    job.share.mkdir()
    accel = choose_accel(guest.kernel, guest.initrd, config.accel, qemu)
    job = dataclasses.replace(job, accel=accel)

    run = run_header(config, guest, qemu, accel, flakey)
    if config.storage == "nbd":
        gr = _run_served(config, outs, job, transport, guest, observer, during, run)
    else:
        gr = transport.run(job, guest, observer)
    record_run(run, gr)
    finish_run(config, outs, run, job.share)
    return run


def _run_served(config: RecordConfig, outs: GuestOutputs, job: GuestJob, transport: transports.Transport,
                guest: Guest, observer: Callable[[Machine], None] | None, during: ServerHook | None,
                run: dict[str, Any]) -> GuestRun:
    """The boot with its data disk an NBD export; the server's facts go into run.json's options."""
    local = job.drives[0]
    # The file's own options (aio, discard) are the server's; the guest's device and the client's
    # node keep the disk model, discard and detect-zeroes.
    export = nbd.Export(local.path, config.cache, log=local.log, aio=config.aio, discard=config.discard)
    try:
        with nbd.serve(export) as server:
            drive = dataclasses.replace(local, log=None, aio=DEFAULT_AIO,
                                        nbd=server.client(config.reconnect_delay_s))
            served = dataclasses.replace(job, drives=(drive, *job.drives[1:]))
            run["options"]["nbd"] = {**server.describe(), "reconnect_delay_s": config.reconnect_delay_s,
                                     "network": server.ns.state()}
            t0 = time.monotonic()
            with during(server) if during is not None else contextlib.nullcontext():
                gr = transport.run(served, guest, observer)
            run["options"]["nbd"]["events"] = [(round(t - t0, 3), what) for t, what in server.events]
    except (nbd.StorageError, NetnsError) as e:
        raise RecordError(f"recording {config.describe()}: storage server: {e}") from e
    return gr


def record_run(run: dict[str, Any], gr: GuestRun) -> None:
    """A guest run's facts into run.json, under the keys run.json has always had."""
    run["options"]["qemu_argv"] = gr.qemu_argv
    if "append" in gr.notes:
        run["options"]["append"] = gr.notes["append"]
    run.update({k: v for k, v in gr.notes.items() if k != "append"})
    run["host_seconds"] = gr.host_seconds
    run["qemu_exit"] = gr.qemu_exit
    run["guest"] = gr.result
    run["guest_exit"] = gr.exit_status
    run["error"] = gr.error


def summarize_log(log: Path, truncate: bool) -> dict[str, Any] | None:
    """The log's summary; `truncate` cuts a dm log disk down to its entries (it is a sparse disk)."""
    try:
        with logformat.open_log(log) as reader:
            entries = reader.index()
            summary = reader.summary().as_dict()
            end = entries[-1].end_offset if entries else reader.sector_size
    except logformat.LogFormatError as e:
        return {"error": str(e)}
    if truncate:
        os.truncate(log, end)
        summary["log_bytes"] = end
    return summary


def _read_json(p: Path) -> dict[str, Any]:
    try:
        value = json.loads(p.read_text())
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def record(config: RecordConfig, out_dir: str | os.PathLike[str], *, guest: Guest | None = None,
           qemu: str | None = None, observer: Callable[[Machine], None] | None = None) -> Recording:
    """Record `config`'s workload into `out_dir`; raises RecordError if the guest did not finish."""
    recordable(config)
    run = run_guest(config, Path(out_dir), guest=guest, qemu=qemu, observer=observer)
    rec = Recording(Path(out_dir).resolve(), config, run)
    check_finished(rec)
    return rec


def recordable(config: RecordConfig) -> None:
    """Refuse, before anything is written, what `record` cannot record."""
    if not config.recorder.logs:
        raise ConfigError("record needs a recorder (qemu or dm); use crashlab.flakey for live faults")
    if config.recorder is Recorder.HOST_DM:
        raise ConfigError("the host-dm recorder runs on the host's side: record it with `crashlab record "
                          "--recorder host-dm [--nested]` (campaigns do not record it)")


def check_finished(rec: Recording) -> None:
    """Raise RecordError unless the guest finished the recording and the workload succeeded."""
    config, run = rec.config, rec.run
    g = run.get("guest", {})
    if run.get("error") or g.get("status") != "done":
        why = run.get("error") or g.get("error") or f"guest status {g.get('status', 'unknown')}"
        raise RecordError(f"recording {config.describe()} failed: {why}{full_disk_hint(rec.out_dir)} "
                          f"(see {rec.console})")
    if g.get("workload_status"):
        raise RecordError(f"workload {config.workload} exited {g['workload_status']}: "
                          f"{g.get('workload_error', '')} (see {rec.out_dir / 'workload.out'})")


# --- several cells in one guest -------------------------------------------------------------------
#
# A boot costs most of a recording under TCG (kernel, Python start, QEMU launch and teardown: about
# 9 s of 11), so one guest records a series of cells: for each, the host hot-plugs the data disk
# with that cell's cache options (and its blklogwrites log, or the dm recorder's log disk) over QMP,
# the guest's `record-serve` job (crashlab.guest.inguest.record.serve) records on it, and the host
# unplugs it again, waiting for the guest to let go (DEVICE_DELETED) and deleting its nodes so the
# log is complete and closed before it is read. Each cell's out_dir gets what `record` writes.

SERIES_ATTEMPTS = 2  # guests a cell may take down before its death is its result
SERIES_BOOT_S = 120.0  # boot + Python start under TCG, with margin for a loaded host
UNPLUG_S = 60.0  # the guest's ACPI eject of a disk


def series_key(config: RecordConfig) -> tuple[object, ...] | None:
    """What configurations must share to be recorded in one guest, or None: this one records alone
    (pure). Cache mode, barrier, data mode, filesystem, workload, seed, scale, params and disk
    options are per cell; the kernel, QEMU, memory and the guest's view of the host are the boot's."""
    model = config.disk_model
    if (config.recorder not in (Recorder.QEMU, Recorder.DM) or config.storage != "local" or config.nested
            or config.transport not in ("auto", "virtiofs")
            or model.controller is not None or model.device not in HOTPLUG_DEVICES):
        return None
    return (config.kernel, config.modules, config.qemu, config.memory_mib, config.accel,
            tuple(sorted(str(Path(p).resolve()) for p in config.workload_path)))


def shareable(a: RecordConfig, b: RecordConfig) -> bool:
    """Whether `a` and `b` can be recorded in one guest, one after the other (pure)."""
    key = series_key(a)
    return key is not None and key == series_key(b)


def series(configs: Sequence[RecordConfig], max_cells: int = 0) -> list[list[int]]:
    """`configs` grouped by the guest that can record them, as indices in their order; a config
    that records alone is a group of one; `max_cells` > 0 caps a group's size (pure)."""
    groups: dict[object, list[list[int]]] = {}
    for i, c in enumerate(configs):
        key = series_key(c)
        runs = groups.setdefault(("alone", i) if key is None else key, [[]])
        if max_cells > 0 and len(runs[-1]) >= max_cells:
            runs.append([])
        runs[-1].append(i)
    return sorted((g for runs in groups.values() for g in runs), key=lambda g: g[0])


def stage(final: Path) -> Path:
    """A fresh sibling of `final` named for this process to record into (`final.partial-OWNER`), so a
    half-written recording is never mistaken for a finished one and two campaigns recording the
    same cell do not share a directory; partials of owners no longer running are removed first."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f"{final.name}.partial-*"):  # left by a killed campaign
        if not rundir.owner_alive(rundir.PREFIX + stale.name.rpartition(".partial-")[2]):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = final.with_name(f"{final.name}.partial-{rundir.owner_tag()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def publish(tmp: Path, final: Path, run: dict[str, Any]) -> dict[str, Any]:
    """`tmp` renamed to `final`; if another campaign recorded it first, theirs (its run.json)."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not (final / "run.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return _read_json(final / "run.json")
    return run


def record_cells(configs: Sequence[RecordConfig], finals: Sequence[str | os.PathLike[str]], *,
                 guest: Guest | None = None, max_cells: int = 0) -> list[dict[str, Any] | RecordError]:
    """`record_many` into `stage`d directories, each renamed to its final name once its cell is
    finished: per cell its run.json, or the RecordError it failed with (its partial removed)."""
    dests = [Path(f) for f in finals]
    tmps = [stage(f) for f in dests]
    try:
        recs = record_many(configs, tmps, guest=guest, max_cells=max_cells)
    except BaseException:
        for t in tmps:
            shutil.rmtree(t, ignore_errors=True)
        raise
    out: list[dict[str, Any] | RecordError] = []
    for tmp, final, r in zip(tmps, dests, recs, strict=True):
        if isinstance(r, RecordError):
            shutil.rmtree(tmp, ignore_errors=True)
            out.append(r)
        else:
            out.append(publish(tmp, final, r.run))
    return out


class GuestDied(RuntimeError):
    """The series guest stopped, hung or would not take or release a cell's disks mid-cell."""


def record_many(configs: Sequence[RecordConfig], out_dirs: Sequence[str | os.PathLike[str]], *,
                guest: Guest | None = None, qemu: str | None = None, max_cells: int = 0
                ) -> list[Recording | RecordError]:
    """Record each config into its out_dir, as `record` would, sharing a guest between the configs
    `series` groups together; per config, its Recording or the RecordError `record` would raise.

    A cell whose guest dies is recorded again in a fresh guest (the cells it finished are kept);
    a cell that took down `SERIES_ATTEMPTS` guests fails with the last death as its error. Every
    config is validated (ConfigError) before anything is written."""
    if len(configs) != len(out_dirs):
        raise ConfigError(f"{len(configs)} configs but {len(out_dirs)} out_dirs")
    guests: dict[tuple[str, str], Guest] = {}
    for c in configs:
        recordable(c)
        c.validate()
        key = (c.kernel, c.modules)
        if key not in guests:
            guests[key] = guest or provision(kernel=c.kernel or None, modules=c.modules or None)
        g = guests[key]
        if lacking := g.lacking(needed_drivers(c)):
            raise ConfigError(lacking)
    results: list[Recording | RecordError | None] = [None] * len(configs)
    virtiofs = transports.resolve("auto") == "virtiofs"
    for group in series(configs, max_cells):
        g = guests[(configs[group[0]].kernel, configs[group[0]].modules)]
        if len(group) == 1 or not virtiofs:
            for i in group:
                try:
                    results[i] = record(configs[i], out_dirs[i], guest=g, qemu=qemu)
                except RecordError as e:
                    results[i] = e
            continue
        cells = [configs[i] for i in group]
        done = _record_series(cells, [Path(out_dirs[i]) for i in group], g, qemu)
        for i, r in zip(group, done, strict=True):
            results[i] = r
    return [r for r in results if r is not None]


def _record_series(configs: Sequence[RecordConfig], out_dirs: Sequence[Path], guest: Guest,
                   qemu: str | None) -> list[Recording | RecordError]:
    first = configs[0]
    qemu = qemu or first.qemu or None
    accel = choose_accel(guest.kernel, guest.initrd, first.accel, qemu)
    results: list[Recording | RecordError | None] = [None] * len(configs)
    deaths = [0] * len(configs)
    boots = 0
    while pending := [i for i, r in enumerate(results) if r is None]:
        boots += 1
        with SeriesGuest(guest, first, accel, qemu, sum(configs[i].timeout_s for i in pending)) as sg:
            try:
                sg.start()
            except GuestDied as e:
                for i in pending:  # no cell's fault, but every waiting cell lost a guest
                    deaths[i] += 1
                    if deaths[i] >= SERIES_ATTEMPTS:
                        results[i] = RecordError(f"recording {configs[i].describe()} failed: {e}")
                continue
            for i in pending:
                try:
                    results[i] = sg.record_cell(configs[i], out_dirs[i], boots)
                except RecordError as e:
                    results[i] = e
                except GuestDied as e:
                    deaths[i] += 1
                    if deaths[i] >= SERIES_ATTEMPTS:
                        results[i] = RecordError(f"recording {configs[i].describe()} failed: {e} "
                                                 f"(see {GuestOutputs(out_dirs[i].resolve()).console})")
                    break
    return [r for r in results if r is not None]


class SeriesGuest:
    """One guest recording cell after cell on hot-plugged disks; a context manager that leaves no
    QEMU, virtiofsd or scratch directory behind."""

    def __init__(self, guest: Guest, config: RecordConfig, accel: str, qemu: str | None,
                 budget_s: float) -> None:
        self.guest, self.accel, self.qemu = guest, accel, qemu
        self.base = Path(tempfile.mkdtemp(prefix="crashlab-recorder-", dir=rundir.scratch()))
        self.share = self.base / "share"
        self.share.mkdir()
        self.console = self.base / "console.log"
        view = host_view(extra=tuple(Path(p).resolve() for p in config.workload_path))
        try:
            self.machine = Machine(guest.kernel, guest.initrd, shares=virtiofs_shares(
                self.share, {"mode": "record-serve"}, view), memory_mib=config.memory_mib, accel=accel,
                qemu=qemu, timeout=SERIES_BOOT_S + budget_s + UNPLUG_S, console_log=self.console,
                name="crashlab-record")
        except BaseException:
            shutil.rmtree(self.base, ignore_errors=True)
            raise
        self.cells = 0
        self.idle = True  # no cell under way
        self.console_at = 0  # the first cell's console excerpt starts with the boot
        self.boot_seconds = 0.0
        self.qemu_argv: list[str] | None = None

    def __enter__(self) -> SeriesGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        t0 = time.monotonic()
        try:
            self.machine.launch()
            self.qemu_argv = [str(a) for a in self.machine.process.args] if self.machine.process else None  # type: ignore[union-attr]
            while read_guest_json(self.share / "result.json").get("status") != SERIES_READY:
                if not self.machine.is_running() or time.monotonic() - t0 > SERIES_BOOT_S:
                    said = (read_guest_json(self.share / "result.json").get("error")
                            or self.machine.console_tail(6))
                    raise GuestDied(f"recording guest did not come up ({self.accel}, "
                                    f"{time.monotonic() - t0:.0f} s): {said or 'no console output'}")
                time.sleep(0.05)
        except MachineError as e:
            raise GuestDied(f"recording guest did not come up: {e}") from None
        self.boot_seconds = round(time.monotonic() - t0, 3)

    def record_cell(self, config: RecordConfig, out_dir: Path, boot: int) -> Recording:
        """Record one cell into `out_dir`; RecordError as `record` raises it, GuestDied if the guest
        went down with the cell (its out_dir is then cleared on the next try)."""
        outs = GuestOutputs(Path(out_dir).resolve())
        k = self.cells
        self.cells += 1
        self.idle = False
        start_outputs(config, outs)
        drives = cell_drives(config, outs, serials=(f"{DATA_SERIAL}{k}", f"{LOG_SERIAL}{k}"))
        payload = {**job_for(config), "data_serial": drives[0].serial,
                   "log_serial": drives[1].serial if len(drives) > 1 else None}
        run = run_header(config, self.guest, self.qemu, self.accel)
        cell = self.share / cell_dir(k)
        t0 = time.monotonic()
        plugged: list[tuple[int, Drive]] = []
        hotplug: list[list[object]] = []
        why = ""
        try:
            for j, d in enumerate(drives):
                index = 2 * k + j  # node names are the machine's for its life: never reused
                hotplug += [[name, args] for name, args in self.machine.hotplug(index, d)]
                plugged.append((index, d))
            write_json_atomic(self.share / cell_request(k), payload)
            end = t0 + config.timeout_s
            while not (cell / "exit-status").exists():
                if not self.machine.is_running():
                    raise GuestDied("recording guest stopped mid-cell")
                if time.monotonic() > end:
                    raise GuestDied(f"cell still recording after its {config.timeout_s:.0f} s deadline")
                time.sleep(0.05)
            for index, d in plugged:
                self.machine.unplug(index, d, UNPLUG_S)
        except (GuestDied, MachineError) as e:
            why = str(e)
        else:
            self.idle = True
        exit_text = (read_guest_file(cell / "exit-status") or "").strip() if not why else ""
        self._excerpt(outs.console)
        gr = GuestRun("virtiofs", read_guest_json(cell / "result.json"),
                      int(exit_text) if exit_text.lstrip("-").isdigit() else None, None, self.qemu_argv,
                      round(time.monotonic() - t0, 3), why or None, outs.console)
        record_run(run, gr)
        run["options"]["hotplug"] = hotplug
        run["series"] = {"cell": k, "boot": boot, "boot_seconds": self.boot_seconds}
        if why:
            self.stop()  # nothing may still write the log it summarizes
            finish_run(config, outs, run, cell)
            self.close()
            raise GuestDied(why)
        finish_run(config, outs, run, cell)
        rec = Recording(outs.out_dir, config, run)
        check_finished(rec)
        return rec

    def _excerpt(self, dest: Path) -> None:
        """The console since the cell began (with the boot, for the first) into the cell's console.log."""
        try:
            with open(self.console, "rb") as f:
                f.seek(self.console_at)
                data = f.read()
        except OSError:
            data = b""
        self.console_at += len(data)
        dest.write_bytes(data)

    def stop(self) -> None:
        """Stop the guest: asked to power off between cells; mid-cell (a death, an interrupt) not,
        as it would not hear the request until its cell ends."""
        m = self.machine
        if m.is_running() and self.idle:
            with contextlib.suppress(OSError):
                write_json_atomic(self.share / cell_request(self.cells), {"stop": True})
            with contextlib.suppress(MachineError):
                m.wait(10)
        m._shutdown_quietly(None)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


def full_disk_hint(path: Path, low: int = 64 << 20) -> str:
    """A full host disk reaches the guest as EIO (werror=report): say so beside the guest's error."""
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return ""
    return f"; the host filesystem under {path} has only {free >> 20} MiB free" if free < low else ""


def timings(run: dict[str, Any]) -> dict[str, float]:
    """Guest-clock timings from run.json: seconds since boot of each step, and workload duration."""
    steps = run.get("guest", {}).get("steps", {})
    t = {f"{k}_s": float(v) for k, v in steps.items()}
    if "workload_start" in steps and "workload_end" in steps:
        t["workload_s"] = round(float(steps["workload_end"]) - float(steps["workload_start"]), 3)
    return t


__all__ = ["ConfigError", "RecordConfig", "RecordError", "Recording", "record", "record_cells", "record_many",
           "run_guest", "series", "shareable"]
