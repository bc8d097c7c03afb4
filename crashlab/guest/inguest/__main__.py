"""The in-guest entry point: `python -m crashlab.guest.inguest JOB.json`, run by /init in the chroot.

One interpreter per boot does the whole job: `record` (a workload under a recorder or dm-flakey),
`record-serve` (record cell after cell on hot-plugged disks),
`serve` (mount crash images batch after batch and run their oracles), `hostdm` (play the host for a
nested host-dm recording), `cost` (fio on the data disk: crashlab.cost) or `exec` (a command: tests,
probes).
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from crashlab.guest.inguest.init import OUT
from crashlab.guest.inguest.runtime import Result, redirect_fds

# Each mode's module, imported only when that mode runs: under TCG an import costs some 25 times
# what it does on the host, and importing every mode's (hostdm's pulls in pyroute2) took 6 of a
# checker guest's 9 s to come up.
MODES: dict[str, tuple[str, str]] = {
    "serve": ("crashlab.guest.inguest.check", "serve"),
    "record-serve": ("crashlab.guest.inguest.record", "serve"),
    "record": ("crashlab.guest.inguest.record", "record"),
    "hostdm": ("crashlab.guest.inguest.hostdm", "run"),
    "cost": ("crashlab.guest.inguest.cost", "cost"),
}


def execute(job: dict[str, Any], result: Result) -> int:
    """Run a command in the guest (tests, probes): stdout to the out share."""
    with redirect_fds(OUT / "exec.out"):
        r = subprocess.run(job["argv"], check=False)
    result.set(status="done", exec_status=r.returncode)
    return r.returncode


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(args[0]).read_text())
    result = Result(OUT / "result.json")
    result.step("python_started")
    try:
        mode = job.get("mode", "record")
        if mode == "exec":
            return execute(job, result)
        module, name = MODES[mode]
        run: Callable[[dict[str, Any], Result], int] = getattr(importlib.import_module(module), name)
        return run(job, result)
    except Exception as e:
        result.set(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        print(f"crashlab-guest: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
