"""Check-engine throughput, measured side by side in one run: crash states per second and ratios.

    sudo .venv/bin/python benchmarks/bench_throughput.py [--states 400] [--fs-states 60] [--jobs 2]
                                                          [--recordings DIR] [--skip-guest]

1. ext4 full pipeline (build, journal replay, fsck, fsync oracle): `campaign.run_check` units on
   `--jobs` workers, with the userspace checker (the default) and with the checker guest, on the
   same states of one real recording (smallfiles, writeback, barrier off: every outcome class).
2. Harness overhead: the engine's per-state commands run by hand on images prepared beforehand
   (`e2fsck -E journal_only -z UNDO`, `e2fsck -fn`, one `debugfs -f` of the oracle's reads,
   `e2undo`) in a shell loop, on one core, against the engine's per-state seconds on one worker
   (which does the same work, but writes the undo file back in process instead of spawning
   `e2undo`); and the copy-per-state loop the engine used to mirror (sparse copy, replay, fsck,
   debugfs). The three are run alternately, three times, and the best of each is kept: this
   machine's speed moves by a fifth within a minute, and interference only ever slows a run.
3. XFS and btrfs full pipeline (checker guest under this host's accelerator) on `--jobs` workers,
   on a nofsync recording (hundreds of distinct states) and a smallfiles one (few, with barriers):
   from cold (the guests' boots inside the figure), and with each worker's guest already up, as
   in a campaign's cells after its first.
4. Same-check mode: `crashlab crash check` of the ext4-dm-barrier-on fixture with
   `--strategy prefix-fua --check-cmd 'e2fsck -fn {image}'` (with and without --read-only) against a
   bare shell loop running that e2fsck on images prepared beforehand (what replay-log does);
   alternated, the best of three each.

Recordings are made on first use into --recordings (default: a temporary directory) and reused.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from crashlab import campaign, crashstates, logformat, rundir
from crashlab.cachemodes import cache_mode
from crashlab.check import guest as checkguest
from crashlab.check.userspace import script
from crashlab.oracle import load_promises
from crashlab.record import GuestOutputs, RecordConfig, record
from crashlab.recorders import Recorder

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 3  # side-by-side comparisons are run this many times, alternating
FIXTURE = ROOT.parent / "shared" / "fixtures" / "logs" / "ext4-dm-barrier-on.log.xz"
if not FIXTURE.exists():
    FIXTURE = ROOT / "tests" / "data" / "logs" / "ext4-dm-barrier-on.log.xz"


def recording(root: Path, fs: str, barrier: bool, workload: str = "smallfiles") -> Path:
    out = root / f"{fs}-writeback-{'on' if barrier else 'off'}" if workload == "smallfiles" else \
        root / f"{fs}-{workload}-writeback-{'on' if barrier else 'off'}"
    if not (out / "run.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        record(RecordConfig(fs=fs, cache=cache_mode("writeback"), barrier=barrier, recorder=Recorder.QEMU,
                            workload=workload, seed=1), out)
    return out


def cell_of(rec: Path) -> campaign.Cell:
    c = json.loads((rec / "run.json").read_text())["config"]
    return campaign.Cell.parse({k: c[k] for k in ("fs", "cache", "recorder", "workload", "seed", "scale")}
                               | {"barrier": "on" if c["barrier"] else "off"})


def _unit(unit: campaign.CheckUnit) -> list[campaign.StateResult]:
    return campaign.run_check(unit)


def _warm_unit(unit: campaign.CheckUnit) -> int:
    campaign.run_check(unit)
    time.sleep(1)  # so that the other worker takes the other warm-up unit
    return os.getpid()


def pipeline(rec: Path, states: int, jobs: int, checker: str, unit: int = 50, warm: bool = False
             ) -> tuple[float, int, dict[str, int]]:
    """States per second of run_check units on `jobs` workers, as a campaign runs them. `warm`:
    each worker has checked a state (booting its checker guest) before the clock starts, as in
    every cell of a campaign after its first."""
    cell = cell_of(rec)
    ids = campaign.generate_states(cell, rec, states)
    unit = unit or -(-len(ids) // jobs)  # 0: one unit a worker (a log with few distinct states)
    units = [campaign.CheckUnit(cell, str(rec), tuple(ids[k:k + unit]), checker=checker)
             for k in range(0, len(ids), unit)]
    results: list[campaign.StateResult] = []
    with cf.ProcessPoolExecutor(jobs) as pool:
        if warm:
            first = campaign.CheckUnit(cell, str(rec), tuple(ids[:1]), checker=checker)
            pids = set(pool.map(_warm_unit, [first] * jobs))
            if len(pids) < jobs:
                print(f"  (only {len(pids)} of {jobs} workers warmed up)")
        t0 = time.monotonic()
        for unit_results in pool.map(_unit, units):
            results += unit_results
        dt = time.monotonic() - t0
    counts: dict[str, int] = {}
    for r in results:
        counts[r.outcome.value] = counts.get(r.outcome.value, 0) + 1
    return len(results) / dt, len(results), counts


def by_hand(rec: Path, states: int, tmp: Path) -> tuple[float, float, float]:
    """Seconds per state of the engine's own commands run by hand in a shell loop on prepared
    images (one core), of the copy-per-state loop, and of the engine on one worker over the same
    states."""
    cell = cell_of(rec)
    ids = campaign.generate_states(cell, rec, states)
    outs = GuestOutputs(rec)
    promises = load_promises(outs.promises)
    prepared = tmp / "prepared"
    prepared.mkdir()
    lines, copying = [], []
    with logformat.open_log(outs.log) as reader:
        entries = reader.index()
        m = campaign.cell_model(cell, rec, entries)
        digest = crashstates.log_digest(reader)
        with crashstates.Materializer(reader, m, digest, size=outs.image.stat().st_size) as mat:
            for n, sid in enumerate(ids):
                st = crashstates.parse_id(sid)
                mat.build(st, prepared / f"{n}.img")
                paths, attrs = promises.reads(crashstates.present_markers(entries, st.end))
                (prepared / f"{n}.cmds").write_text(script(sorted(paths), sorted(attrs)).text)
                lines.append(f"rm -f u; e2fsck -E journal_only -y -z u {n}.img >/dev/null 2>&1; "
                             f"e2fsck -fn {n}.img >/dev/null 2>&1; "
                             f"debugfs -f {n}.cmds {n}.img >/dev/null 2>&1; "
                             f"[ -e u ] && e2undo u {n}.img >/dev/null 2>&1")
                copying.append(f"cp --sparse=always {n}.img s.img && "
                               "e2fsck -E journal_only -y s.img >/dev/null 2>&1; "
                               "e2fsck -fn s.img >/dev/null 2>&1; "
                               f"debugfs -f {n}.cmds s.img >/dev/null 2>&1; rm -f s.img")
    (prepared / "loop.sh").write_text("\n".join(lines) + "\n")
    (prepared / "copying.sh").write_text("\n".join(copying) + "\n")

    def seconds(run: Callable[[], object]) -> float:
        t0 = time.monotonic()
        run()
        return (time.monotonic() - t0) / len(ids)
    # Alternated, and the best of each kept: this machine's speed moves by a fifth within a minute.
    hand, hand_copying, engine = [], [], []
    for _ in range(ROUNDS):
        hand_copying.append(seconds(lambda: subprocess.run(["sh", "copying.sh"], cwd=prepared, check=True)))
        hand.append(seconds(lambda: subprocess.run(["sh", "loop.sh"], cwd=prepared, check=False)))
        engine.append(seconds(lambda: campaign.run_check(campaign.CheckUnit(cell, str(rec), tuple(ids)))))
    return min(hand), min(hand_copying), min(engine)


def same_check(tmp: Path, jobs: int) -> dict[str, float]:
    log = str(FIXTURE)
    base = [sys.executable, "-m", "crashlab", "crash", "check", log, "--recorder", "dm", "--cache",
            "writeback", "--strategy", "prefix-fua", "--check-cmd", "e2fsck -fn {image}", "--json",
            "-j", str(jobs)]
    out: dict[str, float] = {}
    each = "--no-same-reads"
    images = tmp / "fua"
    subprocess.run([sys.executable, "-m", "crashlab", "crash", "generate", log, "--recorder", "dm", "--cache",
                    "writeback", "--baseline", "none", "--strategy", "prefix-fua", "--count", "100000",
                    "--out", str(images)], capture_output=True, check=True)
    files = sorted(images.glob("*.img"))
    # Alternated, the best of each kept (as in by_hand).
    for _ in range(ROUNDS):
        for name, extra in (("copy", []), ("read-only", ["--read-only"]), ("copy-each", [each]),
                            ("read-only-each", ["--read-only", each])):
            r = subprocess.run(base + extra, capture_output=True, text=True, check=False)
            result = json.loads(r.stdout)
            out[name] = max(out.get(name, 0.0), result["states_per_s"])
            out["states"] = result["states"]
            out[name + "-reused"] = result["same_reads"]
        t0 = time.monotonic()
        subprocess.run(["sh", "-c", 'for f in "$@"; do e2fsck -fn "$f" >/dev/null 2>&1; done', "loop",
                        *map(str, files)], check=False)
        out["loop"] = max(out.get("loop", 0.0), len(files) / (time.monotonic() - t0))
    shutil.rmtree(images)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--states", type=int, default=400)
    ap.add_argument("--fs-states", type=int, default=300)
    ap.add_argument("--hand-states", type=int, default=100)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--recordings", type=Path, default=None)
    ap.add_argument("--skip-guest", action="store_true", help="Leave out every checker-guest figure.")
    args = ap.parse_args()
    rundir.enter()
    recs = args.recordings or Path(tempfile.mkdtemp(prefix="crashlab-bench-"))
    recs.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-", dir=rundir.tmpfs() or rundir.scratch()))
    ext4 = recording(recs, "ext4", barrier=False)
    print(f"jobs {args.jobs}; recordings in {recs}")

    rate, n, counts = pipeline(ext4, args.states, args.jobs, "userspace")
    print(f"ext4 full pipeline, userspace checker : {rate:7.1f} states/s ({n} states, {counts})")
    if not args.skip_guest:
        grate, gn, gcounts = pipeline(ext4, min(args.states, 120), args.jobs, "guest")
        checkguest.close_live_guests()
        print(f"ext4 full pipeline, checker guest     : {grate:7.1f} states/s ({gn} states, {gcounts})")
        print(f"  userspace / guest                   : {rate / grate:7.1f}x")
    hand, hand_copying, engine = by_hand(ext4, args.hand_states, tmp)
    print(f"per state, same commands by hand       : {hand * 1000:7.1f} ms (shell loop, one core)")
    print(f"per state, by hand with a copy a state : {hand_copying * 1000:7.1f} ms")
    print(f"per state, the engine on one worker    : {engine * 1000:7.1f} ms")
    print(f"  harness overhead                    : {100 * (engine / hand - 1):7.1f} %")
    if not args.skip_guest:
        # smallfiles with barriers has few distinct states on XFS (72: each fsync's flush pins the
        # rest), so its figure is mostly two boots; nofsync has hundreds, as a campaign cell does.
        for fs in ("xfs", "btrfs"):
            for workload in ("nofsync", "smallfiles"):
                rec = recording(recs, fs, barrier=True, workload=workload)
                frate, fn, fcounts = pipeline(rec, args.fs_states, args.jobs, "auto", unit=0)
                checkguest.close_live_guests()
                wrate, _, _ = pipeline(rec, args.fs_states, args.jobs, "auto", unit=0, warm=True)
                checkguest.close_live_guests()
                print(f"{fs:5} full pipeline, checker guest     : {frate:7.1f} states/s, {wrate:.1f} with "
                      f"the guests up ({workload}, {fn} distinct states, {fcounts})")
    sc = same_check(tmp, args.jobs)
    print(f"same-check, crash check (copies)       : {sc['copy']:7.1f} states/s "
          f"({sc['states']:.0f} prefix-fua states, {sc['copy-reused']:.0f} given an earlier verdict)")
    print(f"same-check, crash check --read-only    : {sc['read-only']:7.1f} states/s")
    print(f"same-check, --no-same-reads (copies)   : {sc['copy-each']:7.1f} states/s (the command on each)")
    print(f"same-check, --no-same-reads --read-only: {sc['read-only-each']:7.1f} states/s")
    print(f"same-check, bare shell loop            : {sc['loop']:7.1f} states/s")
    print(f"  crash check / loop                  : {sc['copy'] / sc['loop']:7.2f}x (copies), "
          f"{sc['read-only'] / sc['loop']:.2f}x (--read-only)")
    print(f"  --no-same-reads / loop              : {sc['copy-each'] / sc['loop']:7.2f}x (copies), "
          f"{sc['read-only-each'] / sc['loop']:.2f}x (--read-only)")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
