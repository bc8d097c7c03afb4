"""A results store as files that rebuild it to the digit: what results/ ships.

    store.json          runs (commands, seeds, versions) and cells (config, recording's run.json)
    outcomes.jsonl.xz   every state's outcome and check detail, one JSON array a line, in key order
    logs/SLUG.tar.xz    every recording: the write log and what checking it needs (promises,
                        run.json, console, workload output)

The recording's final disk image is left out: a state's image is built from the log alone
(crashstates.Materializer starts from zeros) and only the image's size is needed, which store.json
keeps. Everything is written in a fixed order with no timestamps of its own, so the same store gives
the same bytes. `loaded` restores an export into a temporary store, so every report reads an export
through the same code, and the same rows, as the original store.
"""

from __future__ import annotations

import contextlib
import io
import json
import lzma
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from crashlab.logformat import InputError
from crashlab.record import GuestOutputs
from crashlab.store import CellRow, Store

FORMAT = 1
MANIFEST = "store.json"
OUTCOMES = "outcomes.jsonl.xz"
LOGS = "logs"
# A recording's files as exported (crashlab.record.OUTPUTS without the image and the guest's
# scratch directory).
RECORDING_FILES = ("write.log", "promises.jsonl", "run.json", "console.log", "workload.out")
XZ_PRESET = 6


class ExportError(InputError):
    """A directory that holds no export, or one that cannot be read or written: one line."""


def export(store: Store, dest: Path) -> dict[str, int]:
    """Write `store` to `dest` (made if missing); returns what was written, by kind. Files are
    written beside their final names and renamed, so an interrupted export leaves the previous one
    whole (and a rerun replaces the leftovers)."""
    cells = store.cells()
    missing = [c.cell for c in cells if c.recording and not GuestOutputs(Path(c.recording)).log.is_file()]
    if missing:
        raise ExportError(f"cell {missing[0]}: its recording has no write.log (moved or deleted?)")
    try:
        (dest / LOGS).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"{dest}: cannot make the export directory: {e.strerror}") from None
    recordings = {Path(c.recording).name: Path(c.recording) for c in cells if c.recording}
    for slug, path in sorted(recordings.items()):
        _write(dest / LOGS / f"{slug}.tar.xz", lambda f, p=path: _tar(p, f))
    for stale in (dest / LOGS).iterdir():
        if stale.name.removesuffix(".tar.xz") not in recordings:
            stale.unlink()
    runs = store.runs()
    manifest = {"format": FORMAT, "runs": runs, "cells": [_cell(c) for c in cells],
                # The cost of safety (crashlab cost) the reports set beside the rates.
                "costs": [{"cost": c.cost, "config": c.config, "figures": c.figures, "run_id": c.run_id}
                          for c in store.costs()]}
    states = 0

    def outcomes(f: io.BufferedWriter) -> None:
        nonlocal states
        with lzma.open(f, "wb", preset=XZ_PRESET) as out:
            for row in store.raw_states():
                out.write((json.dumps(list(row)) + "\n").encode())
                states += 1

    _write(dest / OUTCOMES, outcomes)
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    _write(dest / MANIFEST, lambda f: f.write(text.encode()))
    return {"cells": len(cells), "states": states, "recordings": len(recordings), "runs": len(runs)}


def _cell(c: CellRow) -> dict[str, Any]:
    image = GuestOutputs(Path(c.recording)).image if c.recording else None
    return {"cell": c.cell, "config": c.config, "record": c.record, "run_id": c.run_id,
            "recording": Path(c.recording).name if c.recording else None,
            "image_bytes": image.stat().st_size if image and image.exists() else None}


def _write(path: Path, fill: Any) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with tmp.open("wb") as f:
            fill(f)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"{path}: cannot write: {e.strerror}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _tar(recording: Path, f: io.BufferedWriter) -> None:
    """The recording's files, owner, mode and times fixed: the same files give the same bytes."""
    with lzma.open(f, "wb", preset=XZ_PRESET) as xz, \
            tarfile.open(fileobj=xz, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name in RECORDING_FILES:
            path = recording / name
            if not path.is_file():
                continue
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = path.stat().st_size, 0o644, 0
            with path.open("rb") as src:
                tar.addfile(info, src)


# --- reading an export ---------------------------------------------------------------------------

def read_manifest(src: Path) -> dict[str, Any]:
    path = src / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{src}: no {MANIFEST}: not a crashlab export (see `crashlab export`)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ExportError(f"{path}: cannot read the export: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ExportError(f"{path}: not a crashlab export of format {FORMAT}")
    return data


def restore(src: Path, store: Store, recordings: Path | None = None) -> None:
    """Fill an empty store from an export. With `recordings`, the logs are unpacked there (each
    with a sparse image of its size) and the cells point at them, so `crashlab reproduce` works on
    the restored store; without, cells have no recording (enough for every report)."""
    manifest = read_manifest(src)
    cells = []
    for c in manifest["cells"]:
        where = None
        if recordings is not None and c["recording"]:
            where = str(_unpack(src / LOGS / f"{c['recording']}.tar.xz", recordings / c["recording"],
                                c["image_bytes"]))
        cells.append(CellRow(c["cell"], c["config"], where, c["record"], c["run_id"]))

    def states() -> Iterator[tuple[str, str, str, str, int | None, float]]:
        try:
            with lzma.open(src / OUTCOMES, "rt", encoding="utf-8") as f:
                for line in f:
                    cell, state_id, outcome, detail, run_id, checked = json.loads(line)
                    yield cell, state_id, outcome, detail, run_id, checked
        except (OSError, lzma.LZMAError, ValueError) as e:
            raise ExportError(f"{src / OUTCOMES}: cannot read the outcomes: {e}") from None

    store.restore(manifest["runs"], cells, states())
    for c in manifest.get("costs", []):  # an export made before costs were exported has none
        store.put_cost(c["cost"], c["config"], c["figures"], c["run_id"])


def _unpack(archive: Path, dest: Path, image_bytes: int | None) -> Path:
    if (dest / "run.json").exists():
        return dest  # unpacked before (another cell of the same recording)
    tmp = dest.with_name(f"{dest.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(archive, "r:xz") as tar:
            tar.extractall(tmp, filter="data")
        if image_bytes is not None:
            with GuestOutputs(tmp).image.open("wb") as img:
                img.truncate(image_bytes)
        os.replace(tmp, dest)
    except (OSError, tarfile.TarError, lzma.LZMAError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"{archive}: cannot unpack the recording: {e}") from None
    return dest


@contextlib.contextmanager
def loaded(src: Path) -> Iterator[Store]:
    """The export as a store of its own, in a temporary directory removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="crashlab-export-") as tmp, \
            Store(Path(tmp) / "store.sqlite") as store:
        restore(src, store)
        yield store
