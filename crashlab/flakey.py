"""Live faults with dm-flakey in the guest: no log, the fault happens to the running filesystem.

dm-flakey sits where the recorder would (over the whole data disk; the markers' tail included), up
for good until the fault, then switched with `dmsetup suspend --nolockfs` / `load` / `resume` (a
plain suspend would freeze, and so flush, the filesystem first) into a down interval with the mode's
feature:

    drop_writes   writes are acknowledged and discarded: a power cut with a non-volatile disk
    error_writes  writes fail with EIO: a failing device
    error_reads   Linux 6.1 has no error_reads feature; a down interval without features fails every
                  read and write, which is what this mode gives there (stated in the result)
    corrupt_bio_byte  optional, with `CorruptBio`: one byte of each matching bio set to a value

The guest cuts its power `grace_s` after the fault (reboot(2), no sync, no unmount), and the data
image is handed back as the disk holds it. The markers are written through dm-flakey too, so the
last marker that reached the image is the crash point: `last_marker` finds it.
"""

from __future__ import annotations

import json
import mmap
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from crashlab import markers
from crashlab.guest.machine import Machine
from crashlab.guest.provision import Guest
from crashlab.record import ConfigError, GuestOutputs, RecordConfig, RecordError, run_guest
from crashlab.recorders import Recorder

MODES = ("drop_writes", "error_writes", "error_reads", "corrupt_bio_byte")


@dataclass(frozen=True)
class CorruptBio:
    byte: int  # 1-based byte of the bio's data (dm-flakey's Nth_byte)
    direction: str = "w"  # r | w
    value: int = 0
    flags: int = 0  # only bios with all these bi_opf flags

    def validate(self) -> None:
        if self.byte < 1 or self.direction not in ("r", "w") or not 0 <= self.value <= 255:
            raise ConfigError(f"corrupt_bio_byte: byte >= 1, direction r|w, value 0-255; got {self}")


@dataclass(frozen=True)
class FlakeyConfig:
    base: RecordConfig = field(default_factory=lambda: RecordConfig(recorder=Recorder.NONE))
    mode: str = "drop_writes"
    after_s: float | None = None  # seconds after the workload starts; None: drawn from the seed
    max_after_s: float = 2.0
    grace_s: float = 0.5  # the workload runs on this long into the fault before the power cut
    corrupt: CorruptBio | None = None

    def fault_after(self) -> float:
        if self.after_s is not None:
            return self.after_s
        return round(random.Random(f"flakey-{self.base.seed}").uniform(0.0, self.max_after_s), 3)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown fault {self.mode!r}; choose from {', '.join(MODES)}")
        if self.mode == "corrupt_bio_byte" and self.corrupt is None:
            raise ConfigError("corrupt_bio_byte needs its byte, direction and value (CorruptBio)")
        if self.corrupt:
            self.corrupt.validate()
            if self.mode in ("drop_writes", "error_writes") and self.corrupt.direction == "w":
                raise ConfigError(f"dm-flakey refuses {self.mode} with corrupt_bio_byte on writes")
        if self.after_s is not None and self.after_s < 0:
            raise ConfigError("the fault time must be >= 0 seconds")

    def job(self) -> dict[str, Any]:
        return {"mode": self.mode, "after_s": self.fault_after(), "grace_s": self.grace_s,
                "corrupt": asdict(self.corrupt) if self.corrupt else None}


@dataclass
class FlakeyResult(GuestOutputs):
    config: FlakeyConfig
    run: dict[str, Any]
    last_marker: markers.Marker | None  # the last marker that reached the image: the crash point

    @property
    def fault_after_s(self) -> float:
        return float(self.run["options"]["flakey"]["after_s"])


def last_marker(image: Path, offset: int, length: int, block: int = markers.PAYLOAD) -> markers.Marker | None:
    """The marker with the highest sequence number in the image's marker region."""
    best: markers.Marker | None = None
    with open(image, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        for pos in range(offset, min(offset + length, len(m)), block):
            mk = markers.decode(m[pos:pos + markers.PAYLOAD])
            if mk is not None and (best is None or mk.seq > best.seq):
                best = mk
    return best


def inject(config: FlakeyConfig, out_dir: str | Path, *, guest: Guest | None = None, qemu: str | None = None,
           observer: Callable[[Machine], None] | None = None) -> FlakeyResult:
    """Run the workload under dm-flakey, fault it, cut the power; the image is in `out_dir`."""
    config.validate()
    base = config.base
    if base.recorder is not Recorder.NONE:
        raise ConfigError("a live fault runs without a recorder (recorder='none')")
    run = run_guest(base, Path(out_dir), guest=guest, qemu=qemu, flakey=config.job(), observer=observer)
    out = Path(out_dir).resolve()
    files = GuestOutputs(out)
    g = run.get("guest", {})
    if run.get("error") or g.get("status") != "powered-off":
        why = run.get("error") or g.get("error") or f"guest status {g.get('status', 'unknown')}"
        raise RecordError(f"flakey {config.mode} on {base.describe()} failed: {why} "
                          f"(see {files.console})")
    mk = last_marker(files.image, base.fs_bytes, base.reserved_mib << 20)
    run["last_marker"] = asdict(mk) if mk else None
    (out / "run.json").write_text(json.dumps(run, indent=1, sort_keys=True, default=str))
    return FlakeyResult(out, config, run, mk)
