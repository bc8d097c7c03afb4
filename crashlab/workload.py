"""The in-guest workload harness: what every program under `workloads/` runs inside.

A workload is a module `workloads/<name>.py` with `run(ctx: WorkloadContext) -> None`. It is
deterministic from `ctx.seed`, does its file operations under `ctx.root`, and after each durability
point (fsync, fdatasync, sync returned) calls `ctx.durable(name, promises)`: that writes an in-band
marker named `name` and records what must hold after recovery in any crash state that lies after that
marker. The harness writes `workload-start` before the workload and ticks every 100 ms throughout.

The promises file gets one *point* line per durability point, then that point's promises (format
and semantics: crashlab.oracle). Promise constructors live in crashlab.oracle; `fsync_path` and
`fsync_dir` below are the idioms workloads share.

Run in the guest as:
    python3 -m crashlab.workload NAME --root DIR --seed S --scale N --promises FILE
        [--marker-device DEV --marker-offset BYTES --marker-length BYTES --marker-block BYTES]
        [--tick SECONDS] [--param KEY=VALUE ...]

`--param` passes workload-specific settings (e.g. `ops=FILE` for the `ops` workload); the same can
come from the environment as CRASHLAB_PARAM_<KEY>, for runners that cannot add arguments.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from crashlab import markers

Promise = dict[str, Any]  # {"kind": ..., "path": ..., ...}: the oracle (crashlab.oracle) defines the kinds


@dataclass
class WorkloadContext:
    root: Path
    seed: int
    scale: int
    promises_out: TextIO
    marker_writer: markers.MarkerWriter | None = None
    params: dict[str, str] = field(default_factory=dict)
    rng: random.Random = field(init=False)
    points: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def durable(self, name: str, promises: Sequence[Promise] = ()) -> int:
        """Mark a durability point that has just returned, with what it promises from now on.
        Returns the point's marker seq."""
        def save(seq: int) -> None:
            # The point line comes even without promises: the oracle needs every point to know
            # which one follows a crash state.
            self.promises_out.write(json.dumps({"marker": name, "seq": seq}) + "\n")
            for p in promises:
                self.promises_out.write(json.dumps({"marker": name, "seq": seq, **p}, sort_keys=True) + "\n")
            # Saved outside the disk under test before the marker is written: a guest killed in
            # between leaves a promise whose marker never happened (never checked), not a marker
            # whose promise is missing (checked too leniently).
            self.promises_out.flush()

        if self.marker_writer:
            seq = self.marker_writer.mark(name, announce=save).seq
        else:
            seq = self.points
            save(seq)
        self.points += 1
        return seq

    def param(self, key: str, default: str | None = None) -> str | None:
        return self.params.get(key, os.environ.get(f"CRASHLAB_PARAM_{key.upper()}", default))


def fsync_path(path: Path, data_only: bool = False) -> None:
    """fsync (or fdatasync) a file or directory by name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        (os.fdatasync if data_only else os.fsync)(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fsync_path(path)


def write_file(path: Path, data: bytes, sync: bool = True) -> None:
    """Create or truncate `path`, write `data`, and fsync it (not its directory)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def load(name: str) -> Callable[[WorkloadContext], None]:
    try:
        module = importlib.import_module(f"workloads.{name}")
    except ModuleNotFoundError:
        raise SystemExit(f"unknown workload {name!r}; available: {', '.join(available())}") from None
    run: Callable[[WorkloadContext], None] = module.run
    return run


def available() -> list[str]:
    import workloads

    return sorted(p.stem for p in Path(workloads.__path__[0]).glob("*.py") if not p.stem.startswith("_"))


def main(argv: list[str] | None = None, listener: Callable[[markers.Marker], None] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m crashlab.workload")
    ap.add_argument("name")
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--promises", type=Path, required=True)
    ap.add_argument("--marker-device")
    ap.add_argument("--marker-offset", type=int, default=0)
    ap.add_argument("--marker-length", type=int, default=0)
    ap.add_argument("--marker-block", type=int, default=markers.PAYLOAD)
    ap.add_argument("--tick", type=float, default=markers.TICK_INTERVAL_S)
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    if bad := [kv for kv in args.param if "=" not in kv]:
        ap.error(f"--param wants KEY=VALUE, got {bad[0]!r}")
    params = dict(kv.split("=", 1) for kv in args.param)
    run = load(args.name)
    writer = None
    if args.marker_device:
        writer = markers.MarkerWriter(args.marker_device, args.marker_offset, args.marker_length,
                                      args.marker_block, tick_interval=args.tick, listener=listener)
    try:
        with args.promises.open("w") as out:
            ctx = WorkloadContext(args.root, args.seed, args.scale, out, writer, params)
            if writer:
                writer.mark(markers.WORKLOAD_START)
            run(ctx)
            if writer:
                writer.mark(markers.WORKLOAD_END)
    finally:
        if writer:
            writer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
