"""Several cells recorded in one guest (record.record_many): grouping rules, the hot-plug commands,
and real series whose per-cell outputs must match single recordings of the same cells."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from crashlab import logformat, markers, record, rundir
from crashlab.cachemodes import CACHE_MODES
from crashlab.guest.machine import Drive, MachineError, drive_args, hotplug_commands
from crashlab.guest.provision import Guest
from crashlab.record import (
    ConfigError,
    GuestDied,
    RecordConfig,
    RecordError,
    Recording,
    record_many,
    series,
    shareable,
)
from crashlab.recorders import Recorder

if TYPE_CHECKING:
    from conftest_guest import Recordings

pytest_plugins = ["conftest_guest"]
GUEST_WORKLOADS = str(Path(__file__).parent / "guest_workloads")


# --- which cells share a guest (no guest) -----------------------------------------------------------

def test_cells_differing_in_cache_barrier_workload_and_seed_share_a_guest() -> None:
    a = RecordConfig(recorder=Recorder.QEMU)
    for b in (RecordConfig(recorder=Recorder.DM, cache=CACHE_MODES["unsafe"], barrier=False),
              RecordConfig(recorder=Recorder.QEMU, fs="xfs", workload="tiny", seed=7, scale=3),
              RecordConfig(recorder=Recorder.QEMU, aio="io_uring", detect_zeroes="on")):
        assert shareable(a, b) and shareable(b, a)


@pytest.mark.parametrize("kw", [
    {"disk": "virtio-scsi"}, {"disk": "ide"}, {"storage": "nbd"}, {"recorder": Recorder.NONE},
    {"transport": "shell"}, {"recorder": Recorder.HOST_DM}])
def test_what_cannot_be_hot_plugged_or_recorded_so_records_alone(kw: dict[str, object]) -> None:
    c = RecordConfig(**{"recorder": Recorder.QEMU, **kw})  # type: ignore[arg-type]
    assert not shareable(c, c) and not shareable(RecordConfig(recorder=Recorder.QEMU), c)


@pytest.mark.parametrize("kw", [{"memory_mib": 256}, {"kernel": "/k", "modules": "/m"}, {"qemu": "/q"},
                                {"workload_path": ("/elsewhere",)}])
def test_what_belongs_to_the_boot_separates_guests(kw: dict[str, object]) -> None:
    assert not shareable(RecordConfig(recorder=Recorder.QEMU), RecordConfig(recorder=Recorder.QEMU, **kw))  # type: ignore[arg-type]


def test_series_groups_in_order_and_caps_the_group() -> None:
    q, s, m = (RecordConfig(recorder=Recorder.QEMU), RecordConfig(recorder=Recorder.QEMU, disk="ide"),
               RecordConfig(recorder=Recorder.DM, memory_mib=256))
    configs = [q, s, q, m, s, q, m]
    assert series(configs) == [[0, 2, 5], [1], [3, 6], [4]]
    assert series(configs, max_cells=2) == [[0, 2], [1], [3, 6], [4], [5]]
    assert sorted(i for g in series(configs, 1) for i in g) == list(range(len(configs)))


# --- the hot-plug commands (no guest) --------------------------------------------------------------

def _flat(args: dict[str, object], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in args.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = ("on" if v else "off") if isinstance(v, bool) else str(v)
    return out


@pytest.mark.parametrize("mode", list(CACHE_MODES))
@pytest.mark.parametrize("logged", [False, True])
def test_hotplug_gives_the_disk_what_the_command_line_gives_it(mode: str, logged: bool) -> None:
    d = Drive(Path("/d.img"), CACHE_MODES[mode], log=Path("/w.log") if logged else None, serial="data3",
              discard="unmap", detect_zeroes="unmap")
    argv = drive_args(4, d)
    cmds = hotplug_commands(4, d)
    nodes = [_flat(a) for name, a in cmds if name == "blockdev-add"]
    assert [",".join(f"{k}={v}" for k, v in n.items()) for n in nodes] == argv[1:-2:2]
    name, dev = cmds[-1]
    assert name == "device_add" and dev.pop("id") == "disk4-dev"
    assert ",".join([str(dev.pop("driver")), *(f"{k}={v}" for k, v in dev.items())]) == argv[-1]
    assert f"write-cache={CACHE_MODES[mode].device_write_cache}" in argv[-1]
    # typed as QMP wants them: booleans and integers, not the command line's strings
    top = cmds[-2][1]
    assert isinstance(top["cache"], dict) and isinstance(top["cache"]["no-flush"], bool)
    if logged:
        assert top["driver"] == "blklogwrites" and top["log-sector-size"] == 512


def test_a_disk_that_needs_a_controller_is_not_hot_plugged() -> None:
    from crashlab.diskmodels import DISK_MODELS
    with pytest.raises(MachineError, match="virtio-blk only"):
        hotplug_commands(0, Drive(Path("/d"), CACHE_MODES["none"], model=DISK_MODELS["virtio-scsi"]))


def test_bad_input_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    good = RecordConfig(recorder=Recorder.QEMU)
    with pytest.raises(ConfigError, match="2 configs but 1 out_dirs"):
        record_many([good, good], [tmp_path / "a"])
    with pytest.raises(ConfigError, match="at least 300 MiB"):
        record_many([good, RecordConfig(recorder=Recorder.QEMU, fs="xfs", disk_mib=200)],
                    [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(ConfigError, match="needs a recorder"):
        record_many([good, RecordConfig(recorder=Recorder.NONE)], [tmp_path / "a", tmp_path / "b"])
    assert list(tmp_path.iterdir()) == []


class FakeSeries:
    """Stands in for SeriesGuest in the retry-accounting test: `plan` says, per boot, which cell
    kills the guest."""

    boots = 0
    plan: dict[int, int] = {}  # noqa: RUF012 (set per test)
    cells: list[tuple[int, int]] = []  # noqa: RUF012

    def __init__(self, *args: object) -> None:
        type(self).boots += 1
        self.boot = type(self).boots

    def __enter__(self) -> FakeSeries:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def start(self) -> None:
        pass

    def record_cell(self, config: RecordConfig, out_dir: Path, boot: int) -> Recording:
        type(self).cells.append((self.boot, config.seed))
        if self.plan.get(self.boot) == config.seed:
            raise GuestDied(f"killed in boot {self.boot}")
        return Recording(out_dir, config, {"series": {"boot": boot}})


def test_a_dead_guest_costs_a_retry_and_a_cell_that_kills_two_fails_alone(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(record, "SeriesGuest", FakeSeries)
    monkeypatch.setattr(record, "choose_accel", lambda *a: "tcg")
    guest = Guest(kernel=Path("/k"), initrd=Path("/i"), kernel_version="6.1.0", kernel_package=None,
                  package_version=None, modules=(), key="x", directory=tmp_path)
    configs = [RecordConfig(recorder=Recorder.QEMU, seed=i) for i in range(4)]
    # Boot 1 dies on cell 1, boot 2 on cell 1 again (its second: its result), boot 3 on cell 3.
    FakeSeries.boots, FakeSeries.cells, FakeSeries.plan = 0, [], {1: 1, 2: 1, 3: 3}
    out = record._record_series(configs, [tmp_path / str(i) for i in range(4)], guest, None)
    assert FakeSeries.cells == [(1, 0), (1, 1), (2, 1), (3, 2), (3, 3), (4, 3)]
    assert isinstance(out[1], RecordError) and "killed in boot 2" in str(out[1])
    assert [r.run["series"]["boot"] for r in out if isinstance(r, Recording)] == [1, 3, 4]


def test_record_cells_publishes_finished_cells_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    stale = tmp_path / "a.partial-999999999-0"  # a dead campaign's half-written cell: reclaimed
    stale.mkdir()

    def fake_many(configs: list[RecordConfig], dirs: list[Path], **kw: object
                  ) -> list[Recording | RecordError]:
        for d in dirs:
            assert ".partial-" in d.name and d.is_dir() and not (tmp_path / d.name.partition(".")[0]).exists()
            (d / "run.json").write_text(json.dumps({"seed": d.name}))
        return [Recording(dirs[0], configs[0], {"ok": 1}), RecordError("boom")]

    monkeypatch.setattr(record, "record_many", fake_many)
    out = record.record_cells([RecordConfig(), RecordConfig(seed=1)], [tmp_path / "a", tmp_path / "b"])
    assert out[0] == {"ok": 1} and isinstance(out[1], RecordError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"] and (tmp_path / "a" / "run.json").exists()


# --- real series (CI set) --------------------------------------------------------------------------

def structure(rec: Recording) -> dict[str, object]:
    """What must agree between a cell recorded alone and in a series: what the log holds in kind
    (timing differs, so not its bytes), and every promise's marker present."""
    with logformat.open_log(rec.log) as reader:
        es = reader.index()
        image = rec.out_dir / "replayed.img"
        with open(image, "wb") as f:
            f.truncate(rec.config.disk_bytes)
        logformat.replay(reader, image)
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True, check=False)
    image.unlink()
    names = [e.marker.name for e in es if e.marker and not e.marker.is_tick]
    promised = [json.loads(line)["marker"] for line in rec.promises.read_text().splitlines()]
    s = rec.summary
    return {"fsck": fsck.returncode, "markers": names, "promised_present": set(promised) <= set(names),
            "promises": len(promised), "superblock": s["superblock"], "damage": s["damage"],
            "fua": s["fua"] > 0, "flushes": s["flushes"] > 0, "marks": s.get("marks") and s["marks"][-1]}


def run_json(rec: Recording) -> dict[str, object]:
    value = json.loads((rec.out_dir / "run.json").read_text())
    assert isinstance(value, dict)
    return value


SERIES_CELLS = (("qemu", True, "writeback"), ("qemu", True, "unsafe"), ("dm", False, "writeback"))


@pytest.mark.guest
def test_three_cells_in_one_guest_match_single_recordings(recordings: Recordings, guest: Guest,
                                                          tmp_path: Path) -> None:
    singles = [recordings.get(r, barrier=b, cache=c) for r, b, c in SERIES_CELLS]  # shared with test_record
    configs = [s.config for s in singles]
    out = record_many(configs, [tmp_path / f"cell{i}" for i in range(len(configs))], guest=guest)
    assert all(isinstance(r, Recording) for r in out), out
    multi = [r for r in out if isinstance(r, Recording)]
    assert [r.run["series"]["boot"] for r in multi] == [1, 1, 1]
    assert [r.run["series"]["cell"] for r in multi] == [0, 1, 2]
    for one, many in zip(singles, multi, strict=True):
        a, b = run_json(one), run_json(many)
        assert a["config"] == b["config"] and a["options"]["mount"] == b["options"]["mount"]
        assert a["options"]["mkfs"] == b["options"]["mkfs"] and a["versions"] == b["versions"]
        assert set(a) - {"qemu_exit"} <= set(b)  # every key a single recording has
        assert b["guest"]["status"] == "done" and b["guest"]["workload_status"] == 0 and b["guest_exit"] == 0
        assert structure(one) == structure(many), many.config.describe()
        assert structure(many)["fsck"] == 0 and structure(many)["promised_present"]
        assert b["guest"]["disk"]["write_cache"] == a["guest"]["disk"]["write_cache"]  # the cell's cache
        assert subprocess.run(["e2fsck", "-fn", str(many.image)], capture_output=True).returncode == 0
        assert {p.name for p in many.out_dir.iterdir()} >= {"write.log", "data.img", "promises.jsonl",
                                                           "console.log", "workload.out", "run.json"}
    assert multi[1].summary["flushes"] == 0 and multi[1].summary["superblock"] == "blank"  # unsafe
    assert "crashlab-init: userspace at" in multi[0].console.read_text()  # the first has the boot


@pytest.mark.guest
def test_a_guest_killed_mid_series_keeps_finished_cells_and_records_the_rest_again(
        guest: Guest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    configs = [RecordConfig(recorder=Recorder.QEMU, workload="tiny", workload_path=(GUEST_WORKLOADS,),
                            seed=i, timeout_s=300) for i in range(2)]
    killed: list[int] = []
    real = record.SeriesGuest.record_cell

    def kill_mid_second(self: record.SeriesGuest, config: RecordConfig, out_dir: Path, boot: int
                        ) -> Recording:
        if config.seed == 1 and not killed:  # SIGKILL QEMU under the cell, as a host crash would
            killed.append(boot)
            threading.Timer(1.5, self.machine.kill).start()
        return real(self, config, out_dir, boot)

    monkeypatch.setattr(record.SeriesGuest, "record_cell", kill_mid_second)
    out = record_many(configs, [tmp_path / f"cell{i}" for i in range(2)], guest=guest)
    assert killed == [1]
    assert all(isinstance(r, Recording) for r in out), out
    recs = [r for r in out if isinstance(r, Recording)]
    assert [r.run["series"]["boot"] for r in recs] == [1, 2]  # the first kept, the second again
    for r in recs:
        with logformat.open_log(r.log) as reader:
            names = [e.marker.name for e in reader.index() if e.marker and not e.marker.is_tick]
        assert names[0] == markers.WORKLOAD_START and names[-1] == markers.WORKLOAD_END
        assert r.run["error"] is None and r.run["guest"]["status"] == "done"
    assert not list(rundir.scratch().glob("crashlab-recorder-*"))  # no series guest's scratch left
