"""Campaign scaling on the local Dask cluster: states/s of one small matrix with 1 and 2 workers,
side by side in one run, and the ratio.

    .venv/bin/python benchmarks/bench_scaling.py [--states 120] [--unit-states 10] [--workers 1,2]
                                                 [--recordings DIR]

The matrix is one real ext4 cell (smallfiles, writeback, barrier off: every outcome class), recorded
once into --recordings (default: a temporary directory) and reused, so every run measures the
checking phase alone: `campaign.run_matrix` on a fresh store, its units as Dask futures on a
LocalCluster of N worker processes (one thread each). Cluster start-up is timed apart.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from crashlab import campaign, cluster, rundir
from crashlab.store import Store

CELL = campaign.Cell.parse({"fs": "ext4", "cache": "writeback", "barrier": "off", "workload": "smallfiles",
                            "seed": 1})


def one(workers: int, states: int, unit_states: int, recordings: Path, tmp: Path) -> dict[str, float]:
    run = tmp / f"run-{workers}"
    run.mkdir()
    (run / "recordings").symlink_to(recordings)
    t0 = time.monotonic()
    with cluster.connect(None, workers) as on:
        started = time.monotonic() - t0
        with Store(run / "s.sqlite") as store:
            t1 = time.monotonic()
            prog = campaign.run_matrix([CELL], states, store, run, command="bench", unit_states=unit_states,
                                       on=on)
            wall = time.monotonic() - t1
    assert prog.checked == states and not prog.failed_units, (prog.checked, prog.failed_units)
    return {"start_s": started, "wall_s": wall, "states_per_s": states / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--states", type=int, default=120)
    ap.add_argument("--unit-states", type=int, default=10)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--recordings", type=Path, default=None)
    args = ap.parse_args()
    rundir.enter()
    counts = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        recordings = (args.recordings or Path(tmp) / "recordings").absolute()
        recordings.mkdir(parents=True, exist_ok=True)
        if not (recordings / CELL.recording_slug / "run.json").exists():
            print(f"recording {CELL.label} (once) ...", flush=True)
            campaign.run_record(campaign.RecordUnit(CELL, str(recordings / CELL.recording_slug)))
        print(f"host: {platform.node()}, {len(os.sched_getaffinity(0))} usable cores; cell {CELL.label}; "
              f"{args.states} states, {args.unit_states} a unit")
        # A shared machine's other load caps what a second worker can add: say what it was.
        print(f"load average before: {os.getloadavg()[0]:.2f}")
        got = {n: one(n, args.states, args.unit_states, recordings, Path(tmp)) for n in counts}
        print(f"load average after:  {os.getloadavg()[0]:.2f}")
    print(f"{'workers':>8} {'start s':>8} {'check s':>8} {'states/s':>9}")
    for n, r in got.items():
        print(f"{n:>8} {r['start_s']:>8.1f} {r['wall_s']:>8.1f} {r['states_per_s']:>9.2f}")
    base = got[counts[0]]["states_per_s"]
    for n in counts[1:]:
        print(f"scaling {counts[0]} -> {n} workers: x{got[n]['states_per_s'] / base:.2f}")


if __name__ == "__main__":
    main()
