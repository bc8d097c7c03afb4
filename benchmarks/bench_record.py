"""Boot-to-workload time and recording overhead, measured with real guests.

    .venv/bin/python benchmarks/bench_record.py [--workload smallfiles] [--scale 4] [--repeat 1]

For each recorder (none = dm-flakey-free plain run without a log, qemu, dm) on ext4 with barriers,
cache=writeback, it prints: seconds from QEMU launch to the guest's userspace (/init) and to the
workload's start (guest clock: seconds since boot), the workload's own duration, the host's wall time
for the whole run, and each recorder's workload time as a ratio to the unrecorded run.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
from pathlib import Path

from crashlab.guest.provision import provision
from crashlab.record import RecordConfig, record, run_guest, timings
from crashlab.recorders import Recorder


def userspace_s(console: Path) -> float:
    m = re.search(r"crashlab-init: userspace at ([\d.]+) s", console.read_text(errors="replace"))
    return float(m.group(1)) if m else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="smallfiles")
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--accel", default="auto")
    args = ap.parse_args()
    guest = provision()
    rows: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="crashlab-bench-") as tmp:
        for i in range(args.repeat):
            for recorder in (Recorder.NONE, Recorder.QEMU, Recorder.DM):
                config = RecordConfig(recorder=recorder, workload=args.workload, scale=args.scale,
                                      seed=i, accel=args.accel)
                out = Path(tmp) / f"{recorder}-{i}"
                if not recorder.logs:
                    run = run_guest(config, out, guest=guest)
                else:
                    run = record(config, out, guest=guest).run
                t = timings(run)
                rows.setdefault(recorder, []).append({
                    "userspace": userspace_s(out / "console.log"),
                    "to_workload": t.get("workload_start_s", float("nan")),
                    "workload": t.get("workload_s", float("nan")),
                    "host": float(run["host_seconds"]),
                    "entries": float((run.get("log") or {}).get("entries", 0)),
                    "log_mib": float((run.get("log") or {}).get("log_bytes", 0)) / (1 << 20),
                })
    med = {r: {k: statistics.median(x[k] for x in v) for k in v[0]} for r, v in rows.items()}
    base = med["none"]["workload"]
    print(f"workload {args.workload} scale {args.scale}, ext4 barrier=1, cache=writeback, "
          f"median of {args.repeat}")
    print(f"{'recorder':<9}{'/init s':>9}{'workload-start s':>18}{'workload s':>12}{'ratio':>7}"
          f"{'host s':>9}{'entries':>9}{'log MiB':>9}")
    for r, m in med.items():
        print(f"{r:<9}{m['userspace']:>9.2f}{m['to_workload']:>18.2f}{m['workload']:>12.2f}"
              f"{m['workload'] / base:>7.2f}{m['host']:>9.1f}{m['entries']:>9.0f}{m['log_mib']:>9.1f}")


if __name__ == "__main__":
    main()
