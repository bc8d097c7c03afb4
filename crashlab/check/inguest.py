"""The checker guest's side: mount the attached crash images, one after another, and report.

Run by the guest's /init (crashlab.guestinit, `exec` mode) inside the chroot of the host's root:
    python -m crashlab.check.inguest /run/crashlab/out/check.json

Each image is a virtio disk whose serial names its request. Results go to `check-results.jsonl` in
the out share, a `start` line before an image and a `done` line after it, so that when an image
crashes or hangs the guest kernel the host knows which one did it and re-runs the rest.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from crashlab.check.mounts import HostMounts
from crashlab.check.tools import run_tool

RESULTS = "check-results.jsonl"


def devices_by_serial(sys_block: Path = Path("/sys/block")) -> dict[str, str]:
    found = {}
    for d in sorted(sys_block.glob("vd*")):
        serial = d / "serial"
        if serial.exists():
            found[serial.read_text().strip()] = f"/dev/{d.name}"
    return found


def main(argv: list[str]) -> int:
    job_path = Path(argv[0])
    job = json.loads(job_path.read_text())
    out = job_path.parent
    devices = devices_by_serial()
    mounts = HostMounts(loop=False, name="guest")
    from crashlab.guestinit import load_fs_modules  # the extension point provision.py offers

    for fs in sorted({req["fs"] for req in job["requests"]}):
        load_fs_modules(fs)  # xfs and btrfs are modules, loaded only when needed
    run_tool(["dmesg", "-c"], 10)  # boot messages are nobody's kernel log
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
            tree = None
            if req["tree"]:
                tree = out / "trees" / str(req["index"])
                tree.mkdir(parents=True)
            steps = mounts.mount_steps(Path(dev), req["fs"], recover=req["recover"], tree_dest=tree,
                                       timeout=job["timeout"])
            klog = run_tool(["dmesg", "-c"], 10).stdout
            emit({"index": req["index"], "event": "done", "device": dev,
                  "recovery": steps.recovery.to_dict() if steps.recovery else None,
                  "tree": steps.tree.to_dict() if steps.tree else None,
                  "timings": steps.timings, "kernel_log": klog})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
