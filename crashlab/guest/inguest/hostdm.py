"""The outer guest's job when it plays the host for `--recorder host-dm --nested`: the host's side
(crashlab.hostrecord.host_side) over its two virtio disks, the real guest in a QEMU inside it, the
inner recording into the results share."""

from __future__ import annotations

import os
from typing import Any

from crashlab import hostdm, hostrecord
from crashlab.guest.inguest.init import MNT, OUT
from crashlab.guest.inguest.runtime import Result


def run(job: dict[str, Any], result: Result) -> int:
    config = hostrecord.config_from_job(job["config"])
    guest = hostrecord.guest_from_job(job["guest"])
    result.set(uname=os.uname().release)
    host = hostrecord.host_side(config, job["disk"], job["log_dev"], MNT, OUT, guest, hostdm.Dmsetup(),
                                job.get("qemu"), step=result.step)
    os.sync()
    result.set(host_dm=host, status="done")
    return 0
