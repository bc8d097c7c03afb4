"""The recording job inside the guest: recorder, mkfs, mount, workload with markers, teardown.

The recorder is set up *before* the filesystem is made, so the log holds mkfs as its baseline: `dm`
puts dm-log-writes over the whole data disk with the log on the second disk; `qemu` needs nothing in
the guest (QEMU's blklogwrites logs below the virtio disk). dm-flakey faults put a flakey target in
the same place.

`serve` is the series form: one boot records cell after cell, each on disks the host hot-plugs for
it (crashlab.record.record_many), its request `cell-K.json` and its outputs in `cell-K/` of the share.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import workloads
from crashlab import markers, workload
from crashlab.guest.inguest.dm import DmControl, dmsetup_create, flakey_table
from crashlab.guest.inguest.init import FLAKEY_TARGET, LOG_TARGET, MNT, OUT
from crashlab.guest.inguest.runtime import (
    Result,
    disk_facts,
    find_disk,
    load_disk_modules,
    load_fs_modules,
    poweroff,
    redirect_fds,
    run,
    sectors,
)


def marker_listener(dm: DmControl | None, target: str, started: threading.Event
                    ) -> Callable[[markers.Marker], None]:
    """Send every durability marker as a native dm mark too (with `dm`; ticks excluded: each native
    mark rewrites the log superblock), and set `started` once `workload-start` is written (the fault
    clock starts there)."""
    def heard(m: markers.Marker) -> None:
        if dm is not None and m.name != markers.TICK:
            dm.message(target, f"mark {m.name}")
        if m.name == markers.WORKLOAD_START:
            started.set()
    return heard


def run_workload(job: dict[str, Any], marker_dev: str, result: Result,
                 listener: Callable[[markers.Marker], None], out: Path = OUT) -> int:
    if job.get("workload_path"):
        workloads.__path__.extend(job["workload_path"])
    argv = [job["workload"], "--root", str(MNT), "--seed", str(job["seed"]), "--scale", str(job["scale"]),
            "--promises", str(out / "promises.jsonl"), "--marker-device", marker_dev,
            "--marker-offset", str(job["marker_offset"]), "--marker-length", str(job["marker_length"])]
    for key, value in job.get("params", {}).items():
        argv += ["--param", f"{key}={value}"]
    result.step("workload_start")
    try:
        with redirect_fds(out / "workload.out"):
            status = workload.main(argv, listener=listener) or 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
        result.set(workload_error=str(e.code))
    except Exception as e:
        status = 1
        result.set(workload_error=f"{type(e).__name__}: {e}", workload_traceback=traceback.format_exc())
    result.step("workload_end", workload_status=status)
    return int(status)


def make_and_mount(job: dict[str, Any], dev: str, result: Result, dm: DmControl | None = None) -> None:
    """The filesystem made on `dev` and mounted at MNT with the job's options."""
    run(*[a.replace("{dev}", dev) for a in job["mkfs"]])
    if dm:
        dm.message(LOG_TARGET, "mark mkfs")
    result.step("mkfs")
    MNT.mkdir(parents=True, exist_ok=True)
    run("mount", "-t", job["fs"], *(["-o", job["mount_opts"]] if job["mount_opts"] else []), dev, str(MNT))
    result.step("mounted")


def record(job: dict[str, Any], result: Result, out: Path = OUT) -> int:
    data, log_dev = job["data_dev"], job["log_dev"]
    if job.get("data_serial"):  # found by serial: which name a SCSI or ATA disk gets is the guest's
        load_disk_modules(job["disk"])
        data = find_disk(job["data_serial"])
        log_dev = find_disk(job["log_serial"]) if job.get("log_serial") else None
    data_sectors = sectors(data)
    result.set(uname=os.uname().release, data_sectors=data_sectors, disk=disk_facts(data))
    dm: DmControl | None = None
    dev = data
    if job["recorder"] == "dm":
        dev = dmsetup_create(LOG_TARGET, f"0 {data_sectors} log-writes {data} {log_dev}")
        dm = DmControl()
    flakey = job.get("flakey")
    if flakey:
        dev = dmsetup_create(FLAKEY_TARGET, flakey_table(data_sectors, data, None))
    load_fs_modules(job["fs"])
    result.step("recorder_ready", device=dev)
    make_and_mount(job, dev, result, dm)
    started = threading.Event()

    fault: threading.Thread | None = None
    if flakey:
        # Loaded now into the inactive slot, so the fault itself is two ioctls (suspend, resume):
        # dmsetup processes take a second each under TCG while the workload runs on.
        table = flakey_table(data_sectors, data, flakey["mode"], flakey.get("corrupt"))
        run("dmsetup", "load", FLAKEY_TARGET, "--table", table)
        result.set(fault_table=table)
        fault = threading.Thread(target=inject, args=(flakey, started, result), daemon=True)
        fault.start()
    status = run_workload(job, dev, result, marker_listener(dm, LOG_TARGET, started), out)
    if fault:
        # A live fault ends with a power cut, whatever the workload did; the image is what it is.
        started.set()  # a workload that failed before its start marker still gets its fault
        fault.join()
        poweroff()

    if job.get("live_fault"):
        # The disk may have failed under the workload (a storage server killed, a link down):
        # what the kernel said is the outcome's evidence, and a failed umount is part of it.
        result.set(kernel=kernel_evidence(MNT))
        try:
            run("umount", str(MNT))
            result.step("unmounted")
        except RuntimeError as e:
            result.set(umount_error=str(e))
        os.sync()
        result.set(status="done")
        return status
    run("umount", str(MNT))
    result.step("unmounted", disk=disk_facts(data))
    if dm:
        dm.close()
        run("dmsetup", "remove", LOG_TARGET)  # logs the dm-log-writes-end mark
        result.step("recorder_removed")
    os.sync()
    result.set(status="done")
    return status


# Kernel messages that say the disk failed under the filesystem, and what the filesystem did.
EIO_WORDS = ("I/O error", "error -5")
READ_ONLY_WORDS = ("Remounting filesystem read-only", "Aborting journal", "Detected aborted journal",
                   "Filesystem has been shut down", "forced shutdown", "forced readonly")


def kernel_evidence(mnt: Path, limit: int = 60) -> dict[str, Any]:
    """What /dev/kmsg holds about I/O errors and the filesystem's reaction, and how `mnt` is mounted."""
    lines: list[str] = []
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        return {"error": f"/dev/kmsg: {e.strerror}"}
    try:
        while True:
            try:
                rec = os.read(fd, 8192).decode(errors="replace")
            except BlockingIOError:
                break
            except OSError:  # EPIPE: the ring buffer overwrote what we were reading
                continue
            text = rec.partition(";")[2].strip()
            if any(w in text for w in (*EIO_WORDS, *READ_ONLY_WORDS)):
                lines.append(text)
    finally:
        os.close(fd)
    mode = ""
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[1] == str(mnt):
            mode = parts[3].split(",")[0]
    said_ro = any(w in ln for ln in lines for w in READ_ONLY_WORDS)
    return {"eio": any(w in ln for ln in lines for w in EIO_WORDS), "mount": mode or "not mounted",
            "remounted_ro": said_ro or mode == "ro", "lines": lines[-limit:]}


def inject(flakey: dict[str, Any], started: threading.Event, result: Result) -> None:
    """`after_s` after workload-start, switch dm-flakey to the loaded fault table; cut the power
    `grace_s` later."""
    started.wait()
    time.sleep(flakey["after_s"])
    dm = DmControl()
    dm.suspend(FLAKEY_TARGET)
    dm.resume(FLAKEY_TARGET)
    result.step("fault")
    time.sleep(flakey.get("grace_s", 0.5))
    result.step("poweroff", status="powered-off")
    poweroff()


SERIES_READY = "serving"  # result.json status once `serve` takes cells
POLL_S = 0.02  # how often an idle series guest looks for its next cell


def cell_request(k: int) -> str:
    return f"cell-{k}.json"


def cell_dir(k: int) -> str:
    return f"cell-{k}"


def serve(job: dict[str, Any], result: Result, out: Path = OUT) -> int:
    """Record cell after cell until a request says stop. A cell that fails is reported in its own
    result and torn down; the next one still gets a clean guest. `exit-status` appears in a cell's
    directory (in whole) when its job is over: the host unplugs the disks only then."""
    result.set(status=SERIES_READY)
    k = 0
    while True:
        try:
            req = json.loads((out / cell_request(k)).read_text())
        except (FileNotFoundError, ValueError):  # not there yet (the host renames it in whole)
            time.sleep(POLL_S)
            continue
        if req.get("stop"):
            break
        cell = out / cell_dir(k)
        cell.mkdir(exist_ok=True)
        res = Result(cell / "result.json")
        res.step("cell_start")
        try:
            status = record(req, res, cell)
        except Exception as e:
            res.set(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            status = 2
            release()
        tmp = cell / ".exit-status.tmp"
        tmp.write_text(f"{status}\n")
        os.replace(tmp, cell / "exit-status")
        k += 1
        result.set(cells=k)
    result.set(status="done")
    return 0


def release() -> None:
    """After a failed cell: nothing of it may hold the disks the host is about to unplug."""
    for argv in (("umount", "-l", str(MNT)), ("dmsetup", "remove", "--force", LOG_TARGET)):
        subprocess.run(argv, capture_output=True, check=False)
    os.sync()
