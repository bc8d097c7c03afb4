"""Seconds per crash image checked: the checker guest (default, TCG) against host loop mounts.

    sudo .venv/bin/python benchmarks/bench_check.py [--fs ext4] [--count 16] [--scale 1] [--repeat 1]

Builds one image with the `smallfiles` workload run on a host loop mount, and `count` copies of it
taken while still mounted (a dirty journal: each needs recovery, like a crash state). Each copy is
then checked like `campaign.run_check` does: recovery, fsck, the workload's oracle on the recovered
tree with every durability point present. Prints, per backend, wall seconds per image (the guest's
boot included, one boot per batch) and the in-guest seconds per image of the read-only mount step
(mount, oracle or tree copy, unmount), then the guest/host ratio. Both backends must agree on every
outcome and violation, or the run fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from crashlab import crashstates
from crashlab.check.runner import CheckItem, check_batch
from crashlab.filesystems import FILESYSTEMS, filesystem
from crashlab.oracle import load_promises
from crashlab.workload import WorkloadContext, load


@contextmanager
def mounted(image: Path, fs: str, mnt: Path) -> Iterator[Path]:
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", fs, "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def make_images(tmp: Path, fs: str, count: int, scale: int, workload: str) -> tuple[list[Path], Path]:
    base = tmp / "base.img"
    size = filesystem(fs).default_disk_mib << 20  # what a recording's filesystem is made with
    subprocess.run(["truncate", "-s", str(size), str(base)], check=True)
    argv = [a.replace("{dev}", str(base)) for a in filesystem(fs).mkfs_argv(size)]
    subprocess.run(argv, check=True, capture_output=True)
    promises = tmp / "promises.jsonl"
    images = []
    with mounted(base, fs, tmp / "mnt") as mnt, promises.open("w") as out:
        load(workload)(WorkloadContext(mnt, seed=1, scale=scale, promises_out=out))
        out.flush()
        os.sync()
        for n in range(count):
            img = tmp / f"crash{n}.img"
            subprocess.run(["cp", "--sparse=always", str(base), str(img)], check=True)
            images.append(img)
    return images, promises


def items_for(images: list[Path], fs: str, promises: Path, tmp: Path, tag: str) -> list[CheckItem]:
    """Fresh copies (checking replays images in place), described the way run_check does."""
    oracle = load_promises(promises).oracle(None)
    serialisable = "promises" in {f.name for f in dataclasses.fields(CheckItem)}
    items = []
    for img in images:
        copy = tmp / f"{tag}-{img.name}"
        subprocess.run(["cp", "--sparse=always", str(img), str(copy)], check=True)
        extra: dict[str, Any] = {"promises": promises, "present": None} if serialisable else {}
        items.append(CheckItem(copy, fs, img.stem, oracle=oracle, **extra))
    return items


def run(items: list[CheckItem], **kw: Any) -> tuple[float, list[dict[str, Any]]]:
    t0 = time.monotonic()
    recs = [r.to_dict() for r in check_batch(items, **kw)]
    wall = time.monotonic() - t0
    for it in items:
        it.image.unlink(missing_ok=True)
    return wall, recs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fs", default="ext4", choices=list(FILESYSTEMS))
    ap.add_argument("--count", type=int, default=16, help="images (16: one guest boot)")
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--workload", default="smallfiles")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--no-host", action="store_true", help="guest only (no host loop mounts)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root: images are prepared with loop mounts")
    from crashlab.check.guest import GuestMounts
    from crashlab.guest.provision import provision

    guest = provision()
    with tempfile.TemporaryDirectory(prefix="crashlab-bench-check-", dir=crashstates.default_workdir()) as t:
        tmp = Path(t)
        images, promises = make_images(tmp, args.fs, args.count, args.scale, args.workload)
        points = len(load_promises(promises).points)
        print(f"{args.fs}, {args.workload} scale {args.scale}: {points} durability points, "
              f"{args.count} images per batch, {args.repeat} repeat(s)")
        rows: dict[str, list[float]] = {"guest": [], "guest-step": [], "boot": [], "host": []}
        for r in range(args.repeat):
            backend = GuestMounts(guest)
            wall, grecs = run(items_for(images, args.fs, promises, tmp, f"g{r}"), backend=backend)
            rows["guest"].append(wall / args.count)
            rows["guest-step"].append(statistics.mean(d["timings"].get("tree", 0.0) for d in grecs))
            rows["boot"].append(sum(b["seconds"] for b in backend.boots) / len(backend.boots))
            if args.no_host:
                continue
            wall, hrecs = run(items_for(images, args.fs, promises, tmp, f"h{r}"), host_mount=True)
            rows["host"].append(wall / args.count)
            for g, h in zip(grecs, hrecs, strict=True):
                same = (g["outcome"], g["violations"]) == (h["outcome"], h["violations"])
                if not same:
                    sys.exit(f"guest and host disagree on {g['state_id']}:\n{json.dumps([g, h], indent=1)}")
        outcomes = sorted({d["outcome"] for d in grecs})
        print(f"outcomes: {', '.join(outcomes)} (guest and host agree)" if not args.no_host
              else f"outcomes: {', '.join(outcomes)}")
        med = {k: statistics.median(v) for k, v in rows.items() if v}
        print(f"guest boot (whole batch, wall)       {med['boot']:7.2f} s")
        print(f"guest: read-only mount step, in-guest {med['guest-step']:7.2f} s/image")
        print(f"guest: wall per image (boot shared)   {med['guest']:7.2f} s/image")
        if "host" in med:
            print(f"host loop mounts: wall per image      {med['host']:7.2f} s/image")
            print(f"guest/host ratio                      {med['guest'] / med['host']:7.1f}x")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
