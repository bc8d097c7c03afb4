"""The checker guest's side: mount the attached crash images, one after another, and report.

The `check` job of crashlab.guest.inguest, in the guest's one interpreter (no second Python start).

Each image is a virtio disk whose serial names its request. Results go to `check-results.jsonl` in
the out share, a `start` line before an image and a `done` line after it, so that when an image
crashes or hangs the guest kernel the host knows which one did it and re-runs the rest. A request
with an oracle (a promises file and the present seqs) has it run on the read-only mount: its
violations travel in the `done` line, as the record keeps them.

Every process spawned here costs tenths of a second under TCG, several per image: so the kernel log
is read with one syslog(2) call rather than a `dmesg -c` per image, and no tree directory is made in
the share unless a copy is needed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import re
import time
from pathlib import Path
from typing import Any

from crashlab.check.mounts import HostMounts, OracleSpec
from crashlab.check.tools import run_tool
from crashlab.guest.inguest.init import OUT
from crashlab.guest.inguest.runtime import Result, load_fs_modules

RESULTS = "check-results.jsonl"
SYSLOG_ACTION_READ_CLEAR, SYSLOG_ACTION_SIZE_BUFFER = 4, 10  # linux/include/linux/syslog.h
_LEVEL = re.compile(r"^<\d+>", re.MULTILINE)


def kernel_messages() -> str:
    """Read and clear the kernel ring buffer: what `dmesg -c` prints, without a process."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        size = libc.klogctl(SYSLOG_ACTION_SIZE_BUFFER, None, 0)
        buf = ctypes.create_string_buffer(max(size, 1))
        n = libc.klogctl(SYSLOG_ACTION_READ_CLEAR, buf, size) if size > 0 else -1
    except (OSError, AttributeError):
        n = -1
    if n < 0:
        return run_tool(["dmesg", "-c"], 10).stdout
    return _LEVEL.sub("", buf.raw[:n].decode(errors="replace"))


def devices_by_serial(sys_block: Path = Path("/sys/block")) -> dict[str, str]:
    found = {}
    for d in sorted(sys_block.glob("vd*")):
        serial = d / "serial"
        if serial.exists():
            found[serial.read_text().strip()] = f"/dev/{d.name}"
    return found


def run(job: dict[str, Any], result: Result, out: Path = OUT) -> int:
    devices = devices_by_serial()
    mounts = HostMounts(loop=False, name="guest")
    for fs in sorted({req["fs"] for req in job["requests"]}):
        load_fs_modules(fs)  # xfs and btrfs are modules, loaded only when needed
    kernel_messages()  # boot messages are nobody's kernel log
    with (out / RESULTS).open("a") as results:
        def emit(rec: dict[str, object]) -> None:
            results.write(json.dumps(rec) + "\n")
            results.flush()

        for req in job["requests"]:
            emit({"index": req["index"], "event": "start", "uptime": time.monotonic()})
            dev = devices.get(req["serial"])
            if dev is None:
                emit({"index": req["index"], "event": "missing", "devices": devices})
                continue
            tree = out / "trees" / str(req["index"]) if req["tree"] else None  # made only for a copy
            oracle = None
            if (o := req.get("oracle")) is not None:
                present = None if o["present"] is None else frozenset(o["present"])
                oracle = OracleSpec(Path(o["promises"]), present)
            steps = mounts.mount_steps(Path(dev), req["fs"], recover=req["recover"], tree_dest=tree,
                                       timeout=job["timeout"], oracle=oracle)
            emit({"index": req["index"], "event": "done", "device": dev,
                  "recovery": steps.recovery.to_dict() if steps.recovery else None,
                  "tree": steps.tree.to_dict() if steps.tree else None,
                  "violations": steps.violations, "oracle_error": steps.oracle_error,
                  "timings": steps.timings, "kernel_log": kernel_messages()})
    result.set(status="done")
    return 0
