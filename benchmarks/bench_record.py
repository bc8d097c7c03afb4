"""Boot-to-workload time and recording overhead, measured with real guests.

    .venv/bin/python benchmarks/bench_record.py [--workload smallfiles] [--scale 4] [--repeat 1]
        [--cells N] [--only recorders|series]

For each recorder (none = dm-flakey-free plain run without a log, qemu, dm) on ext4 with barriers,
cache=writeback, it prints: seconds from QEMU launch to the guest's userspace (/init) and to the
workload's start (guest clock: seconds since boot), the workload's own duration, the host's wall time
for the whole run, and each recorder's workload time as a ratio to the unrecorded run.

Then (`--cells N`, 0 to skip) N cells that differ in recorder, cache mode and barrier, recorded
side by side in one run: one boot per cell (`record`) against all N in one guest over hot-plugged
disks (`record_many`), with the wall time of each way, the series' boot and per-cell seconds, and
the ratio. `plug s` is a cell's host time outside its guest job: hot-plug, the guest picking up
its request, unplug (the guest's eject) and closing the log.
"""

from __future__ import annotations

import argparse
import itertools
import re
import statistics
import tempfile
import time
from pathlib import Path

from crashlab.cachemodes import CACHE_MODES
from crashlab.guest.provision import Guest, provision
from crashlab.record import RecordConfig, Recording, record, record_many, run_guest, timings
from crashlab.recorders import Recorder

# The cells of the series comparison, cycled to --cells: (recorder, cache mode, barrier).
SERIES_CELLS = ((Recorder.QEMU, "writeback", True), (Recorder.QEMU, "none", False),
                (Recorder.QEMU, "unsafe", True), (Recorder.DM, "writeback", True),
                (Recorder.QEMU, "writethrough", False), (Recorder.DM, "none", False))


def userspace_s(console: Path) -> float:
    m = re.search(r"crashlab-init: userspace at ([\d.]+) s", console.read_text(errors="replace"))
    return float(m.group(1)) if m else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="smallfiles")
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--accel", default="auto")
    ap.add_argument("--cells", type=int, default=4)
    ap.add_argument("--only", choices=("recorders", "series"))
    args = ap.parse_args()
    guest = provision()
    if args.only != "series":
        recorders(args, guest)
    if args.only != "recorders" and args.cells > 0:
        in_series(args, guest)


def recorders(args: argparse.Namespace, guest: Guest) -> None:
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


def cell_steps(rec: Recording) -> str:
    """Where a cell's guest seconds went: disk found, mkfs, mount, workload, umount (and teardown)."""
    steps = rec.run["guest"]["steps"]
    order = [k for k in ("cell_start", "python_started", "recorder_ready", "mkfs", "mounted",
                         "workload_start", "workload_end", "unmounted", "recorder_removed") if k in steps]
    return " ".join(f"{b}+{steps[b] - steps[a]:.1f}" for a, b in itertools.pairwise(order))


def in_series(args: argparse.Namespace, guest: Guest) -> None:
    configs = [RecordConfig(recorder=r, cache=CACHE_MODES[c], barrier=b, workload=args.workload,
                            scale=args.scale, seed=i, accel=args.accel)
               for i, (r, c, b) in enumerate(SERIES_CELLS[i % len(SERIES_CELLS)] for i in range(args.cells))]
    with tempfile.TemporaryDirectory(prefix="crashlab-bench-") as tmp:
        t0 = time.monotonic()
        alone = [record(c, Path(tmp) / f"alone-{i}", guest=guest) for i, c in enumerate(configs)]
        alone_s = time.monotonic() - t0
        t0 = time.monotonic()
        many = record_many(configs, [Path(tmp) / f"series-{i}" for i in range(len(configs))], guest=guest)
        series_s = time.monotonic() - t0
        alone_init = userspace_s(alone[0].console)  # before the directory goes
    failed = [r for r in many if not isinstance(r, Recording)]
    if failed:
        raise SystemExit(f"series failed: {failed[0]}")
    recs = [r for r in many if isinstance(r, Recording)]
    boots = len({r.run["series"]["boot"] for r in recs})
    print(f"\n{len(configs)} cells, workload {args.workload} scale {args.scale}, ext4: one boot each vs one "
          f"guest ({boots} boot{'s' if boots > 1 else ''}, first boot to ready "
          f"{recs[0].run['series']['boot_seconds']:.1f} s)")
    print(f"{'cell':<34}{'alone host s':>13}{'series host s':>15}{'plug s':>8}  series guest steps (s)")
    for a, r in zip(alone, recs, strict=True):
        c = r.config
        name = f"{c.recorder} cache={c.cache.name} barrier={int(c.barrier)}"
        steps = r.run["guest"]["steps"]
        plug = r.run["host_seconds"] - (max(steps.values()) - steps["cell_start"])  # outside the job
        print(f"{name:<34}{a.run['host_seconds']:>13.1f}{r.run['host_seconds']:>15.1f}{plug:>8.1f}  "
              f"{cell_steps(r)}")
    print(f"alone, first cell's guest steps (s since boot: /init {alone_init:.1f}): "
          f"{cell_steps(alone[0])}")
    n = len(configs)
    print(f"wall: one boot per cell {alone_s:.1f} s, one guest {series_s:.1f} s, ratio "
          f"{alone_s / series_s:.2f}x ({alone_s / n:.1f} vs {series_s / n:.1f} s a cell)")


if __name__ == "__main__":
    main()
