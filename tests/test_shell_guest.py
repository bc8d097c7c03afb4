"""The busybox-shell fallback (no virtiofsd): its plan, its errors, and one real recording whose log,
promises and final image the rest of crashlab reads unchanged."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from crashlab import logformat, markers, oracle
from crashlab.check.outcome import Outcome
from crashlab.check.runner import check_image
from crashlab.guest import shell as shellguest
from crashlab.guest import transport as transports
from crashlab.guest.provision import Guest
from crashlab.record import ConfigError, RecordConfig, record, resolve_transport
from crashlab.recorders import Recorder
from crashlab.workload import WorkloadContext

pytest_plugins = ["conftest_guest"]


def shell_config(**kw: object) -> RecordConfig:
    base: dict[str, object] = {"recorder": Recorder.QEMU, "workload": shellguest.WORKLOAD,
                               "transport": "shell", "accel": os.environ.get("CRASHLAB_ACCEL", "auto"),
                               "timeout_s": 120}
    return RecordConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_promises_are_written_as_the_python_harness_writes_them(tmp_path: Path) -> None:
    p = shellguest.plan(seed=3, scale=1)
    assert p == shellguest.plan(seed=3, scale=1) and p != shellguest.plan(seed=4, scale=1)
    out = tmp_path / "p.jsonl"
    with out.open("w") as f:  # the same points through WorkloadContext, without a marker writer
        ctx = WorkloadContext(tmp_path, 3, 1, f)
        ctx.points = 1  # seq 0 is workload-start, which the harness writes without a point
        for pt in p.points:
            assert ctx.durable(pt.name, list(pt.promises)) == pt.seq
    assert shellguest.promises_text(p) == out.read_text()
    assert oracle.load_promises(out).points == tuple((pt.seq, pt.name) for pt in p.points)
    assert [m.seq for m in p.markers] == list(range(len(p.files) + 3))
    assert {m.clock_ns for m in p.markers} == {0}  # no clock in this mode


@pytest.mark.parametrize(("kw", "message"), [
    ({"recorder": Recorder.DM}, "only the qemu recorder"),
    ({"fs": "xfs"}, "only ext4"),
    ({"workload": "smallfiles"}, "only the built-in shell workload"),
    ({"transport": "sometimes"}, "unknown transport"),
])
def test_shell_transport_refuses_what_it_cannot_do(kw: dict[str, object], message: str,
                                                   tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        record(shell_config(**kw), tmp_path)


def test_auto_picks_shell_only_without_virtiofsd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CRASHLAB_VIRTIOFSD", raising=False)
    monkeypatch.setattr(transports, "find_virtiofsd", lambda: "/usr/lib/qemu/virtiofsd")
    assert resolve_transport(RecordConfig()) == "virtiofs"
    monkeypatch.setattr(transports, "find_virtiofsd", lambda: None)
    assert resolve_transport(RecordConfig()) == "shell"
    assert resolve_transport(RecordConfig(transport="virtiofs")) == "virtiofs"  # forced stays forced
    monkeypatch.undo()
    monkeypatch.setenv("CRASHLAB_VIRTIOFSD", "none")
    assert resolve_transport(RecordConfig()) == "shell"


def test_console_parsing() -> None:
    text = ("noise\r\nCRASHLAB-SHELL: step mkfs 1.25\r\nCRASHLAB-SHELL-OUT: marker 0\n"
            "CRASHLAB-SHELL: workload_status 0\nCRASHLAB-SHELL: status done\nCRASHLAB-SHELL: exit 0\n")
    result, out, status = shellguest.parse_console(text)
    assert result["steps"] == {"mkfs": 1.25} and result["status"] == "done" and result["workload_status"] == 0
    assert out == ["marker 0"] and result["markers_written"] == [0] and status == 0


@pytest.mark.guest
def test_shell_fallback_records_ext4_and_the_checker_reads_it(guest: Guest, tmp_path: Path) -> None:
    rec = record(shell_config(), tmp_path / "rec", guest=guest)
    run = rec.run
    assert run["transport"] == "shell" and run["guest"]["status"] == "done" and run["guest_exit"] == 0
    assert run["host_seconds"] < 60, run["host_seconds"]
    promised = [json.loads(line) for line in rec.promises.read_text().splitlines()]
    points = {p["seq"]: p["marker"] for p in promised if "kind" not in p}
    with logformat.open_log(rec.log) as reader:
        marks = [e for e in reader.entries() if e.marker]
    found = [(e.marker.seq, e.marker.name) for e in marks if e.marker]
    # Real O_DIRECT: each marker reaches the log once, one sector, in seq order (buffered writes
    # would come as page-cache writebacks: bigger, late, sometimes twice).
    assert {e.nr_sectors for e in marks} == {1}
    assert found[0] == (0, markers.WORKLOAD_START) and found[-1][1] == markers.WORKLOAD_END
    assert [s for s, _ in found] == list(range(len(found)))
    assert {s: n for s, n in found if s in points} == points  # names and seqs match the promises
    assert rec.summary["entries"] > len(found) and rec.summary["flushes"] > 0

    image = tmp_path / "final.img"
    shutil.copyfile(rec.image, image)
    ok = check_image(image, "ext4", "final", host_mount=True, promises=rec.promises, present=None)
    assert ok.outcome is Outcome.CONSISTENT, ok.to_dict()

    lost = tmp_path / "lost.img"
    shutil.copyfile(rec.image, lost)
    subprocess.run(["debugfs", "-w", "-R", f"rm /{shellguest.DIR}/f3", str(lost)], check=True,
                   capture_output=True)
    bad = check_image(lost, "ext4", "lost", host_mount=True, promises=rec.promises, present=None)
    assert bad.outcome is Outcome.DATA_LOSS, bad.to_dict()
