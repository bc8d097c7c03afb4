"""Crash-state materialisation rate on the shared real logs, against a bare `cp` of the image.

    .venv/bin/python benchmarks/bench_crashstates.py [--count N] [LOG ...]

For each log and cache mode: generate N random states (sorted by base point), then time `build`
(sparse copy of the base + the state's ops, a new file per state) and `checkout` (in place under an
undo journal, no copy). The reference is `cp` of the fully replayed image on the same filesystem,
what a naive tool pays per state before even replaying anything.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

from crashlab import crashstates as cs
from crashlab import logformat, model

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "data" / "logs"
CASES = [  # (log, recorder, baseline)
    ("ext4-dm-barrier-on", "dm", "mount"),
    ("ext4-qemu-noflush", "qemu", None),
    ("nested-hostdm-writeback", "dm", "start"),
]


def time_cp(src: Path, dst: Path, reps: int = 5) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        subprocess.run(["cp", str(src), str(dst)], check=True)
    return (time.perf_counter() - t) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=40)
    ap.add_argument("--modes", default="writeback,unsafe,writethrough")
    ap.add_argument("logs", nargs="*")
    args = ap.parse_args()
    cases: list[tuple[Path, str, str | None]] = [(Path(p), "dm", None) for p in args.logs]
    cases = cases or [(FIXTURES / f"{n}.log.xz", r, b) for n, r, b in CASES]
    workdir = cs.default_workdir()
    print(f"workdir {workdir or tempfile.gettempdir()}, {args.count} random states per row, window inf")
    print(f"{'log':<26} {'mode':<12} {'vol/st':>7} {'build/s':>8} {'checkout/s':>10} "
          f"{'cp s':>7} {'build/cp':>8} {'checkout/cp':>11}")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for log, rec, base in cases:
            with logformat.open_log(log) as r:
                d = cs.log_digest(r)
                full = Path(tmp) / "full.img"
                mfull = model.LogModel(r.index(), model.config(rec, "unsafe", baseline=None))
                cs.build_one(log, cs.CrashState(d[:10], mfull.cfg, mfull.n, "a").id, full)
                cp_s = time_cp(full, Path(tmp) / "cp.img")
                for mode in args.modes.split(","):
                    m = model.LogModel(r.index(), model.config(rec, mode, window="inf", baseline=base))
                    states = cs.generate(m, d, args.count, 1).states
                    vol = sum(len(m.crash(s.end).volatile) for s in states) / max(1, len(states))
                    with cs.Materializer(r, m, d, workdir=tmp) as mat:
                        mat.build(states[0], Path(tmp) / "warm.img")  # first base advance not timed
                        t = time.perf_counter()
                        for s in states:
                            mat.build(s, Path(tmp) / "state.img")
                        b = (time.perf_counter() - t) / len(states)
                    with cs.Materializer(r, m, d, workdir=tmp) as mat:  # a fresh base for checkout
                        mat.build(states[0], Path(tmp) / "warm.img")
                        t = time.perf_counter()
                        for s in states:
                            with mat.checkout(s):
                                pass
                        c = (time.perf_counter() - t) / len(states)
                    print(f"{log.name.removesuffix('.log.xz'):<26} {mode:<12} {vol:>7.0f} {1 / b:>8.1f} "
                          f"{1 / c:>10.1f} {cp_s:>7.3f} {cp_s / b:>8.2f} {cp_s / c:>11.2f}")
    print("build/cp and checkout/cp: states materialised in the time one `cp` of the image takes")


if __name__ == "__main__":
    main()
