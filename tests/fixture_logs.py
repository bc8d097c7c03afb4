"""The fixture logs (tests/data/logs) as recording directories, for tests that check real crash
states without booting a guest."""

from __future__ import annotations

import lzma
import shutil
from pathlib import Path

from crashlab.record import GuestOutputs

FIXTURES = Path(__file__).parent / "data" / "logs"
FIXTURE_DISK = 256 << 20  # tests/data/README.md: every fixture log is of a 256 MiB data disk


def fixture_recording(log: str, out: Path, promises: str = "") -> GuestOutputs:
    """A recording directory as a guest run leaves it, from a fixture log (`promises` as the
    promises.jsonl text: none by default)."""
    rec = GuestOutputs(out)
    out.mkdir()
    with lzma.open(FIXTURES / log) as src, rec.log.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    with rec.image.open("wb") as f:
        f.truncate(FIXTURE_DISK)
    rec.promises.write_text(promises)
    return rec
