"""The checker guest's side: mount crash images one after another, and report.

The `serve` job of crashlab.guest.inguest, in the guest's one interpreter: booted once, the guest
takes batch after batch of images from its results share (`batch-K.json`, each image a file there
attached to a loop device) until the host stops it, so one boot checks hundreds of images.

Results of batch K go to `results-K.jsonl` in the share, a `start` line before an image and a `done`
line after it, so that when an image crashes or hangs the guest kernel the host knows which one did
it. A request
with an oracle (a promises file and the present seqs) has it run on the read-only mount: its
violations travel in the `done` line, as the record keeps them.

Every process spawned here costs tenths of a second under TCG, several per image: so the kernel log
is read with one syslog(2) call rather than a `dmesg -c` per image, and no tree directory is made in
the share unless a copy is needed.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from crashlab.check.mounts import HostMounts, OracleSpec
from crashlab.check.tools import run_tool
from crashlab.guest.inguest.init import OUT
from crashlab.guest.inguest.runtime import Result, load_fs_modules
from crashlab.proc import LIBC

READY = "serving"  # result.json status once `serve` takes batches
POLL_S = 0.02  # how often an idle serving guest looks for the next batch
# linux/include/uapi/linux/loop.h and fs.h
LOOP_SET_FD, LOOP_CLR_FD, LOOP_CTL_GET_FREE, BLKFLSBUF = 0x4C00, 0x4C01, 0x4C82, 0x1261
SYSLOG_ACTION_READ_CLEAR, SYSLOG_ACTION_SIZE_BUFFER = 4, 10  # linux/include/linux/syslog.h
_LEVEL = re.compile(r"^<\d+>", re.MULTILINE)


def kernel_messages() -> str:
    """Read and clear the kernel ring buffer: what `dmesg -c` prints, without a process."""
    try:
        size = LIBC.klogctl(SYSLOG_ACTION_SIZE_BUFFER, None, 0)
        buf = ctypes.create_string_buffer(max(size, 1))
        n = LIBC.klogctl(SYSLOG_ACTION_READ_CLEAR, buf, size) if size > 0 else -1
    except (OSError, AttributeError):
        n = -1
    if n < 0:
        return run_tool(["dmesg", "-c"], 10).stdout
    return _LEVEL.sub("", buf.raw[:n].decode(errors="replace"))


def batch_name(k: int) -> str:
    return f"batch-{k}.json"


def results_name(k: int) -> str:
    return f"results-{k}.jsonl"


def _oracle(req: dict[str, Any]) -> OracleSpec | None:
    if (o := req.get("oracle")) is None:
        return None
    return OracleSpec(Path(o["promises"]), None if o["present"] is None else frozenset(o["present"]))


def check_one(req: dict[str, Any], dev: str, mounts: HostMounts, timeout: float, out: Path
              ) -> tuple[dict[str, object], dict[str, float]]:
    """Mount one image's device as asked; the `done` event the host reads, and its steps' timings."""
    tree = out / "trees" / str(req["index"]) if req["tree"] else None  # made only for a copy
    steps = mounts.mount_steps(Path(dev), req["fs"], recover=req["recover"], tree_dest=tree,
                               timeout=timeout, oracle=_oracle(req))
    return {"index": req["index"], "event": "done", "device": dev,
            "recovery": steps.recovery.to_dict() if steps.recovery else None,
            "tree": steps.tree.to_dict() if steps.tree else None,
            "violations": steps.violations, "oracle_error": steps.oracle_error,
            "kernel_log": kernel_messages()}, steps.timings


@contextlib.contextmanager
def emitter(path: Path) -> Iterator[Callable[[dict[str, object]], None]]:
    """Append JSON lines to `path`, each flushed at once: a guest that dies leaves every line it wrote."""
    with path.open("a") as results:
        def emit(rec: dict[str, object]) -> None:
            results.write(json.dumps(rec) + "\n")
            results.flush()
        yield emit


@contextlib.contextmanager
def loop_device(image: Path) -> Iterator[str]:
    """`image` attached to a free loop device, by ioctl (no losetup process); its writes are
    flushed to the share before it is detached, so the host's fsck reads the recovered image."""
    ctl = os.open("/dev/loop-control", os.O_RDWR)
    try:
        n = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
    finally:
        os.close(ctl)
    dev = f"/dev/loop{n}"
    backing = os.open(image, os.O_RDWR)
    try:
        fd = os.open(dev, os.O_RDWR)
        try:
            fcntl.ioctl(fd, LOOP_SET_FD, backing)
            try:
                fcntl.ioctl(fd, BLKFLSBUF, 0)  # nothing of the device's previous image is cached
                yield dev
            finally:
                os.fsync(fd)
                os.fsync(backing)
                fcntl.ioctl(fd, LOOP_CLR_FD, 0)
        finally:
            os.close(fd)
    finally:
        os.close(backing)


def serve(job: dict[str, Any], result: Result, out: Path = OUT) -> int:
    """The long-lived form: batch after batch from the share until one says stop."""
    mounts = HostMounts(loop=False, name="guest")
    loaded: set[str] = set()
    kernel_messages()
    result.set(status=READY)
    k = 0
    while True:
        path = out / batch_name(k)
        try:
            batch = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):  # not there yet (the host renames it in whole)
            time.sleep(POLL_S)
            continue
        if batch.get("stop"):
            break
        with emitter(out / results_name(k)) as emit:
            for req in batch["requests"]:
                if req["fs"] not in loaded:
                    load_fs_modules(req["fs"])
                    loaded.add(req["fs"])
                    kernel_messages()
                t0 = time.monotonic()
                emit({"index": req["index"], "event": "start", "uptime": t0})
                try:
                    with loop_device(out / req["image"]) as dev:
                        t1 = time.monotonic()
                        done, timings = check_one(req, dev, mounts, batch["timeout"], out)
                        t2 = time.monotonic()
                except OSError as e:
                    emit({"index": req["index"], "event": "missing", "error": str(e)})
                    continue
                t3 = time.monotonic()
                # Beside the mounts' own: what the whole image cost the guest, for profiles.
                done["timings"] = timings | {"attach": t1 - t0, "detach": t3 - t2, "guest": t3 - t0}
                emit(done)
        k += 1
    result.set(status="done")
    return 0
