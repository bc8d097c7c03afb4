"""The cost job inside the guest: make and mount the filesystem as a recording does, run fio.

The host builds every fio command line (crashlab.cost); the guest runs them in order on the mounted
data disk and leaves each JSON output in the out share as fio-NAME.json. No recorder, no markers:
the disk is what the cache mode and barrier setting make it, nothing more.
"""

from __future__ import annotations

import os
from typing import Any

from crashlab.guest.inguest.init import MNT, OUT
from crashlab.guest.inguest.record import make_and_mount
from crashlab.guest.inguest.runtime import (
    Result,
    disk_facts,
    find_disk,
    load_disk_modules,
    load_fs_modules,
    run,
)


def cost(job: dict[str, Any], result: Result) -> int:
    load_disk_modules(job["disk"])
    data = find_disk(job["data_serial"])
    result.set(uname=os.uname().release, disk=disk_facts(data))
    load_fs_modules(job["fs"])
    make_and_mount(job, data, result)
    for spec in job["fio"]:
        (OUT / f"fio-{spec['name']}.json").write_text(run(*spec["argv"]))
        result.step(f"fio_{spec['name']}")
    run("umount", str(MNT))
    result.step("unmounted", disk=disk_facts(data))
    result.set(status="done")
    return 0
