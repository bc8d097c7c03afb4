"""`crashlab cost` in a real guest at CI size: one cache mode, one barrier setting, tiny fio jobs.
The parsed figures are positive, the accelerator is labelled, the disk has no recorder on it, every
version and command line is stored, and a second run takes the stored figures without a guest."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from crashlab.cli import cli
from crashlab.store import Store

pytestmark = pytest.mark.guest


def test_fio_in_a_guest_gives_labelled_positive_figures(tmp_path: Path) -> None:
    store = tmp_path / "r.sqlite"
    args = ["cost", "--store", str(store), "--cache", "writeback", "--barrier", "off", "--size", "8",
            "--runtime", "1", "--accel", os.environ.get("CRASHLAB_ACCEL", "auto")]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    print(r.output)
    with Store(store, readonly=True) as s:
        [row] = s.costs()
    accel = row.config["accel"]
    assert accel in ("tcg", "kvm")
    assert f"[{accel.upper()}]" in r.output and "no recorder in the path" in r.output
    assert (accel == "tcg") == ("TCG: an emulated CPU" in r.output)
    figures = row.figures["figures"]
    assert set(figures) == {"seq_mb_s", "rand_iops", "fsync_p50_ms", "fsync_p99_ms"}
    assert all(v > 0 for v in figures.values()), figures
    assert figures["fsync_p99_ms"] >= figures["fsync_p50_ms"]
    d = row.figures
    assert d["versions"]["fio"].startswith("fio-") and d["versions"]["qemu"] and d["versions"]["guest_kernel"]
    assert d["mount"] == "data=ordered,barrier=0"
    assert "--size=8M" in d["argv"]["seqwrite"]
    qemu = " ".join(d["qemu_argv"])
    assert "blklogwrites" not in qemu and "cache.direct=off" in qemu  # writeback, no recorder
    assert d["command"].startswith("crashlab cost --fs ext4 --cache writeback --barrier off")
    run_dir = store.parent / "cost" / f"ext4-writeback-off-virtio-blk-{accel}-8M-1s"
    assert {p.name for p in run_dir.iterdir()} >= {"run.json", "console.log", "fio-seqwrite.json"}
    assert not (run_dir / "data.img").exists()

    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and "(stored)" in again.output, again.output
