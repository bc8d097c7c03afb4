"""Every workload in a real guest at CI size: its oracle passes on the final image, and fails with a
precise message once a promised file is removed or truncated (edited with debugfs, in userspace)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from crashlab.cachemodes import CACHE_MODES
from crashlab.check.runner import CheckItem, check_batch
from crashlab.oracle import load_promises
from crashlab.record import RecordConfig, Recording, record
from crashlab.recorders import Recorder
from crashlab.workload import available

pytestmark = pytest.mark.guest

WORKLOADS = available()
# mailserver runs 60 s by default (tests/test_long_workload_guest.py records that): CI size here.
PARAMS = {"mailserver": (("duration", "3"), ("deliver", "0.3"))}
SEED = 1  # the generated `ops` workload leaves a non-empty promised file at this seed (not at every seed)


@pytest.fixture(scope="module")
def recordings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Recording]:
    out = {}
    for name in WORKLOADS:
        config = RecordConfig(fs="ext4", cache=CACHE_MODES["writeback"], recorder=Recorder.QEMU,
                              workload=name, seed=SEED, scale=1, params=PARAMS.get(name, ()))
        out[name] = record(config, tmp_path_factory.mktemp(name))
    return out


def promised_file(rec: Recording) -> str | None:
    """A file whose latest promise is non-empty content: what must be there after the final point."""
    promises = [json.loads(line) for line in rec.promises.read_text().splitlines() if line.strip()]
    latest = {p["path"]: p for p in promises if "path" in p}  # later promises supersede earlier ones
    files = {path: p for path, p in latest.items() if p.get("kind") in ("file", "log", "sqlite", "prefix")}
    for path, p in sorted(files.items()):
        if p.get("size", 1) > 0 and p.get("records", 1) > 0:
            return path
    return None


def debugfs(image: Path, *requests: str) -> None:
    for req in requests:
        subprocess.run(["debugfs", "-w", "-R", req, str(image)], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def checked(recordings: dict[str, Recording], tmp_path_factory: pytest.TempPathFactory
            ) -> dict[tuple[str, str], object]:
    """Final, removed and truncated images of every workload, checked in one checker-guest boot."""
    work = tmp_path_factory.mktemp("images")
    items, keys = [], []
    for name, rec in recordings.items():
        promises = load_promises(rec.promises)
        variants = {"final": None}
        if (path := promised_file(rec)) is not None:
            variants |= {"removed": [f"rm /{path}"],
                         "truncated": [f"rm /{path}", f"write /dev/null /{path}"]}
        for variant, edits in variants.items():
            image = work / f"{name}-{variant}.img"
            shutil.copyfile(rec.image, image)
            if edits:
                debugfs(image, *edits)
            items.append(CheckItem(image, "ext4", f"{name}-{variant}", promises.oracle(None),
                                   promises=rec.promises, present=None))
            keys.append((name, variant))
    records = list(check_batch(items))
    return dict(zip(keys, records, strict=True))


@pytest.mark.parametrize("name", WORKLOADS)
def test_final_image_keeps_every_promise(name: str, checked: dict) -> None:
    rec = checked[(name, "final")]
    assert str(rec.outcome) == "consistent", (rec.reason, rec.violations)


@pytest.mark.parametrize("name", [w for w in WORKLOADS if w != "nofsync"])
@pytest.mark.parametrize("variant", ["removed", "truncated"])
def test_damaged_promised_file_is_data_loss(name: str, variant: str, checked: dict,
                                            recordings: dict[str, Recording]) -> None:
    path = promised_file(recordings[name])
    assert path is not None, f"{name} promised no file"
    rec = checked[(name, variant)]
    assert str(rec.outcome) == "data-loss", (rec.reason, rec.violations)
    violations = rec.to_dict()["violations"]
    assert any(v["path"] == path and v["found"] for v in violations), violations


def test_nofsync_promises_nothing(recordings: dict[str, Recording]) -> None:
    assert promised_file(recordings["nofsync"]) is None
