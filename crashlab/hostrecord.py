"""Record with `--recorder host-dm`: the guest's image file on a filesystem on a dm-log-writes device of
the host, so the log holds what the host page cache wrote back, with the host's own flushes.

The host's side, `host_side`, is the same wherever it runs: make the host filesystem on a scratch
disk, write the image in full and map its extents (FIEMAP), put log-writes over the disk, mount it
again through the target, mark `start`, run the guest with QEMU's blklogwrites on the image as
well (the qemu recorder's log of the very same run: what validation compares against), mark
`inner_exit`, unmount (the host's last writeback) and remove the target.

- native: on this host, with its device-mapper (`dmsetup` through crashlab.proc, loop devices over
  files in the output directory); needs root and the dm-log-writes target.
- nested (`--nested`): where the host has none, an outer guest plays the host: its kernel has
  dm-log-writes, it runs the same `host_side` (crashlab.guest.inguest.hostdm) over two virtio
  disks, and the real guest runs in a QEMU inside it. run.json says `"nested": true`.

Then, on this host, whatever ran the host's side: the device log is cut to its entries and kept as
`host-device.log`, translated to image space as `write.log` (the log the model reads), and the
image is read off the host disk as `data.img`. `qemu/` is the inner run's own recording (its
write.log is QEMU's log of the same I/O), usable as a qemu recording by every other command.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from crashlab import hostdm, logformat, proc, recorders
from crashlab.cachemodes import CACHE_MODES
from crashlab.guest import transport as transports
from crashlab.guest.job import GuestFileError, GuestJob, read_guest_file, read_guest_json
from crashlab.guest.machine import Drive, choose_accel
from crashlab.guest.provision import Guest, provision
from crashlab.record import (
    ConfigError,
    GuestOutputs,
    RecordConfig,
    RecordError,
    Recording,
    prepare_out_dir,
    record_run,
    run_guest,
    summarize_log,
    tool_version,
    versions,
)
from crashlab.recorders import Recorder

INNER = "qemu"  # the inner run's recording directory
DEVICE_LOG = "host-device.log"
HOST_DISK = "host-disk.img"
HOST_FS_SLACK = 64 << 20  # the host filesystem's own metadata and journal beside the image
OUTER_MEMORY_MIB = 1024
OUTER_EXTRA_S = 300.0  # the outer guest's boot, mkfs, zeroing and teardown under TCG
TOOL_TIMEOUT_S = 600.0


def host_disk_bytes(config: RecordConfig) -> int:
    return config.disk_bytes + HOST_FS_SLACK


def device_log_bytes(config: RecordConfig) -> int:
    """Sparse, so generous: every write of the run lands there once more, with its header."""
    return max(1 << 30, 8 * config.disk_bytes)


def inner_config(config: RecordConfig) -> RecordConfig:
    """What the guest itself runs under: the qemu recorder on its image, the rest as asked."""
    return dataclasses.replace(config, recorder=Recorder.QEMU, nested=False)


# --- the host's side, wherever it runs ---------------------------------------------------------

def _run(*argv: str | Path) -> str:
    try:
        return proc.check(list(argv), TOOL_TIMEOUT_S)
    except (proc.ToolError, OSError) as e:
        raise hostdm.HostDmError(str(e)) from None


def device_sectors(dev: str | Path) -> int:
    return int(_run("blockdev", "--getsz", dev).strip())


@contextlib.contextmanager
def mounted(dev: str | Path, mnt: Path) -> Iterator[Path]:
    mnt.mkdir(parents=True, exist_ok=True)
    _run("mount", "-t", "ext4", dev, mnt)
    try:
        yield mnt
    finally:
        _run("umount", mnt)


def host_side(config: RecordConfig, disk: str, log_dev: str, mnt: Path, out_dir: Path, guest: Guest,
              dm: hostdm.Dmsetup, qemu: str | None = None,
              step: Callable[[str], None] = lambda name: None) -> dict[str, Any]:
    """Make the host filesystem on `disk`, log it to `log_dev` and run the guest on an image there;
    the inner recording goes to out_dir/qemu. Returns what the host side knows for run.json."""
    _run(*hostdm.MKFS, disk)
    with mounted(disk, mnt):
        image = mnt / "data.img"
        hostdm.write_zeros(image, config.disk_bytes)
        extents = hostdm.check_extents(hostdm.fiemap(image), config.disk_bytes)
    step("host_fs_ready")
    table = hostdm.log_writes_table(device_sectors(disk), disk, log_dev)
    node = dm.create(hostdm.LOG_TARGET, table)
    inner: dict[str, Any] = {}
    try:
        with mounted(node, mnt):
            dm.mark(hostdm.LOG_TARGET, hostdm.MARK_START)
            step("logging")
            try:
                inner = run_guest(inner_config(config), out_dir / INNER, guest=guest, qemu=qemu,
                                  image=mnt / "data.img")
            finally:
                dm.mark(hostdm.LOG_TARGET, hostdm.MARK_INNER_EXIT)
                step("inner_exit")
    finally:
        dm.remove(hostdm.LOG_TARGET)
    step("logged")
    return {"extents": hostdm.extents_as_json(extents), "table": table,
            "inner": {k: inner.get(k) for k in ("error", "host_seconds", "qemu_exit", "guest_exit")}}


# --- native ------------------------------------------------------------------------------------

@contextlib.contextmanager
def loop_device(path: Path) -> Iterator[str]:
    dev = _run("losetup", "--find", "--show", path).strip()
    try:
        yield dev
    finally:
        _run("losetup", "-d", dev)


def _native(config: RecordConfig, out: Path, guest: Guest, qemu: str | None,
            dm: hostdm.Dmsetup) -> dict[str, Any]:
    why = dm.unavailable()
    if why:
        raise ConfigError(f"host-dm needs this host's device-mapper: {why}; without it, --nested runs "
                          "the host's side in an outer guest")
    disk, dlog = out / HOST_DISK, out / DEVICE_LOG
    for path, size in ((disk, host_disk_bytes(config)), (dlog, device_log_bytes(config))):
        with open(path, "wb") as f:
            f.truncate(size)
    with loop_device(disk) as ddev, loop_device(dlog) as ldev:
        host = host_side(config, ddev, ldev, out / ".host-mnt", out, guest, dm, qemu)
    (out / ".host-mnt").rmdir()
    return {"nested": False, "host": f"this host ({os.uname().release}), device-mapper", **host}


# --- nested ------------------------------------------------------------------------------------

def outer_job(config: RecordConfig, guest: Guest, qemu: str | None) -> dict[str, Any]:
    """The outer guest's job.json (pure): the host's side over its two disks, the real guest's
    config and kernel, and where QEMU is."""
    return {"mode": "hostdm", "config": {**config.as_dict(), "workload_path": list(config.workload_path),
                                         "params": [list(p) for p in config.params]},
            "guest": guest.as_dict(), "disk": "/dev/vda", "log_dev": "/dev/vdb", "qemu": qemu}


def config_from_job(d: dict[str, Any]) -> RecordConfig:
    """The RecordConfig an outer job carries (its run.json form back to types)."""
    values = {f.name: d[f.name] for f in dataclasses.fields(RecordConfig) if f.name in d}
    values["cache"] = CACHE_MODES[values["cache"]]
    values["recorder"] = recorders.recorder(values["recorder"])
    values["workload_path"] = tuple(values.get("workload_path", ()))
    values["params"] = tuple(tuple(p) for p in values.get("params", ()))
    return RecordConfig(**values)


def guest_from_job(d: dict[str, Any]) -> Guest:
    return Guest(Path(d["kernel"]), Path(d["initrd"]), d["kernel_version"], d["kernel_package"],
                 d["package_version"], tuple(d["modules"]), d["key"], Path(d["directory"]))


def _nested(config: RecordConfig, out: Path, guest: Guest, qemu: str | None) -> dict[str, Any]:
    disk, dlog = out / HOST_DISK, out / DEVICE_LOG
    for path, size in ((disk, host_disk_bytes(config)), (dlog, device_log_bytes(config))):
        with open(path, "wb") as f:
            f.truncate(size)
    share = out / ".outer"
    share.mkdir()
    wb = CACHE_MODES["writeback"]
    job = GuestJob(outer_job(config, guest, qemu), share=share, console=out / "outer-console.log",
                   drives=(Drive(disk, wb, serial="hostdisk"), Drive(dlog, wb, serial="hostlog")),
                   view_extra=(guest.directory, guest.kernel.parent, guest.initrd.parent,
                               *(Path(p).resolve() for p in config.workload_path)),
                   memory_mib=OUTER_MEMORY_MIB, qemu=qemu, name="crashlab-outer",
                   timeout_s=config.timeout_s + OUTER_EXTRA_S)
    job = dataclasses.replace(job, accel=choose_accel(guest.kernel, guest.initrd, config.accel, qemu))
    gr = transports.transport("virtiofs").run(job, guest)
    outer: dict[str, Any] = {"options": {}}
    record_run(outer, gr)
    inner_dir = share / INNER
    if inner_dir.is_dir() and not inner_dir.is_symlink():
        os.replace(inner_dir, out / INNER)
    host = gr.result.get("host_dm") or {}
    error = gr.error or gr.result.get("error")
    if error or gr.status != "done":
        raise RecordError(f"the outer guest (playing the host) did not finish: "
                          f"{error or f'status {gr.status}'} (see {job.console})")
    shutil.rmtree(share, ignore_errors=True)
    return {"nested": True, "host": f"an outer guest (nested): kernel {gr.result.get('uname', '?')}, "
                                    "its device-mapper", "outer": {k: outer.get(k) for k in (
                                        "host_seconds", "qemu_exit", "guest_exit", "error")},
            "outer_steps": gr.result.get("steps", {}), **host}


# --- both --------------------------------------------------------------------------------------

def record(config: RecordConfig, out_dir: str | os.PathLike[str], *, guest: Guest | None = None,
           qemu: str | None = None, dm: hostdm.Dmsetup | None = None) -> Recording:
    """Record `config` (recorder host-dm) into `out_dir`: write.log in image space, data.img read off
    the host disk, qemu/ (the same run through QEMU's recorder), host-device.log, run.json."""
    if config.recorder is not Recorder.HOST_DM:
        raise ConfigError(f"crashlab.hostrecord records host-dm, not {config.recorder}")
    config.validate()
    if config.transport == "auto" and config.nested:
        config = dataclasses.replace(config, transport="shell")  # Python under TCG-in-TCG: minutes
    if config.nested and transports.resolve(config.transport) != "shell":
        raise ConfigError("--nested runs the guest under TCG inside TCG: only the shell transport "
                          "(workload sh-smallfiles) finishes in reasonable time")
    guest = guest or provision()
    out = prepare_out_dir(Path(out_dir))
    for name in (INNER, DEVICE_LOG, HOST_DISK, ".outer", ".host-mnt", "outer-console.log"):
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    t0 = time.monotonic()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    host = _nested(config, out, guest, qemu) if config.nested else \
        _native(config, out, guest, qemu, dm or hostdm.Dmsetup())
    return finish(config, out, guest, qemu, host, started, time.monotonic() - t0)


def finish(config: RecordConfig, out: Path, guest: Guest, qemu: str | None, host: dict[str, Any],
           started: str, seconds: float) -> Recording:
    """The host's side is done: cut and translate its log, read the image off its disk, run.json."""
    outs = GuestOutputs(out)
    inner = out / INNER
    # Written by a guest when nested (the outer one): read as the guest's files always are.
    inner_run = read_guest_json(inner / "run.json")
    for name in ("write.log", "promises.jsonl", "workload.out", "console.log"):
        if (inner / name).is_symlink() or ((inner / name).exists() and not (inner / name).is_file()):
            raise GuestFileError(f"{inner / name}: refused: not a regular file")
    dlog = out / DEVICE_LOG
    device = summarize_log(dlog, truncate=True)
    extents = hostdm.extents_from_json(host.get("extents", []))
    mapping: dict[str, Any] = {}
    if extents:
        with logformat.open_log(dlog) as reader:
            mapping = hostdm.map_log(reader, hostdm.ExtentMap(extents, config.disk_bytes),
                                     outs.log).as_dict()
        hostdm.extract_image(out / HOST_DISK, extents, config.disk_bytes, outs.image)
        (out / HOST_DISK).unlink()
        with contextlib.suppress(FileNotFoundError):
            (inner / "data.img").unlink()
        os.link(outs.image, inner / "data.img")  # the inner run's recording is whole again
    for name in ("promises.jsonl", "workload.out"):
        text = read_guest_file(inner / name)
        if text is not None:
            (out / name).write_text(text)
    run: dict[str, Any] = {
        "config": config.as_dict(), "options": inner_run.get("options", {}),
        "versions": {**versions(config, guest, qemu), "dmsetup": tool_version("dmsetup", "--version")},
        "started": started, "host_seconds": round(seconds, 3),
        "guest": inner_run.get("guest", {}), "guest_exit": inner_run.get("guest_exit"),
        "qemu_exit": inner_run.get("qemu_exit"), "error": inner_run.get("error"),
        "host_dm": {**host, "device_log": device, "map": mapping, "fs_bytes": config.fs_bytes,
                    "inner_recording": INNER, "inner_log": inner_run.get("log")},
        "log": summarize_log(outs.log, truncate=False) if outs.log.exists() else None,
    }
    for k in ("transport", "degraded"):
        if k in inner_run:
            run[k] = inner_run[k]
    (out / "run.json").write_text(json.dumps(run, indent=1, sort_keys=True, default=str))
    rec = Recording(out, config, run)
    g = run["guest"]
    if run.get("error") or g.get("status") != "done":
        why = run.get("error") or g.get("error") or f"guest status {g.get('status', 'unknown')}"
        raise RecordError(f"recording {config.describe()} failed: {why} (see {inner / 'console.log'})")
    if g.get("workload_status"):
        raise RecordError(f"workload {config.workload} exited {g['workload_status']} "
                          f"(see {out / 'workload.out'})")
    return rec


__all__ = ["host_side", "record"]
