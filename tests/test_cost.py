"""The cost of safety without a guest: fio's command lines, the parsing of real fio JSON (tests/data/fio,
captured from a guest), the store's costs table on old and new stores, the report's cost table and
plot, and the command's refusals and resumption."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from crashlab import cost, report
from crashlab.cachemodes import CACHE_MODES
from crashlab.check.outcome import Outcome
from crashlab.cli import cli
from crashlab.record import RecordConfig
from crashlab.recorders import Recorder
from crashlab.store import Store

DATA = Path(__file__).parent / "data" / "fio"


def outputs() -> dict[str, str]:
    return {name: (DATA / f"{name}.json").read_text() for name in cost.FIO_JOBS}


def test_figures_from_real_fio_output() -> None:
    f = cost.figures(outputs())
    # 5 MiB in 1458 ms (the job's whole runtime, final fsync included); fio's own numbers otherwise.
    assert f == cost.Figures(seq_mb_s=round(5242880 / 1.458 / 1e6, 3), rand_iops=163.5,
                             fsync_p50_ms=21.6269, fsync_p99_ms=73.9246)


def test_notes_before_the_json_are_skipped() -> None:
    o = outputs()
    o["fsync"] = "fio: note: something\n" + o["fsync"]
    assert cost.figures(o) == cost.figures(outputs())


def doc(**job: object) -> str:
    return json.dumps({"fio version": "fio-3.33", "jobs": [{"jobname": "x", "error": 0, **job}]})


@pytest.mark.parametrize(("name", "text", "says"), [
    ("seqwrite", "not json at all", "not JSON"),
    ("seqwrite", '{"jobs": []}', "no single job"),
    ("seqwrite", doc(error=5), "error 5"),
    ("seqwrite", doc(job_runtime=0, write={"io_bytes": 1}), "no job runtime"),
    ("randwrite", doc(write={"iops": 0.0}), "no IOPS"),
    ("fsync", doc(sync={"lat_ns": {"percentile": {"50.000000": 1000}}}), "fsync latency p99"),
])
def test_unreadable_fio_output_is_one_clear_error(name: str, text: str, says: str) -> None:
    o = outputs()
    o[name] = text
    with pytest.raises(cost.CostError, match=says):
        cost.figures(o)


def test_a_missing_job_output_is_named() -> None:
    o = outputs()
    del o["randwrite"]
    with pytest.raises(cost.CostError, match="no fio output for randwrite"):
        cost.figures(o)


def test_fio_command_lines() -> None:
    c = cost.CostConfig(RecordConfig(), size_mib=16, runtime_s=2.5)
    argvs = c.argvs("/mnt")
    assert list(argvs) == ["seqwrite", "randwrite", "fsync"]
    assert argvs["seqwrite"] == ["fio", "--name=seqwrite", "--filename=/mnt/fio-data", "--size=16M",
                                 "--runtime=2.5", "--ioengine=psync", "--randrepeat=1",
                                 "--output-format=json", "--percentile_list=50:99", "--rw=write", "--bs=1M",
                                 "--end_fsync=1"]
    assert "--direct=1" in argvs["randwrite"] and "--filename=/mnt/fio-data" in argvs["randwrite"]
    assert "--fsync=1" in argvs["fsync"] and "--filename=/mnt/fio-fsync" in argvs["fsync"]


def test_the_guest_disk_is_the_recordings_without_a_recorder() -> None:
    rec = RecordConfig(fs="ext4", cache=CACHE_MODES["none"], barrier=False, aio="native")
    gc = cost.CostConfig(rec, size_mib=200).guest_config
    assert gc.recorder is Recorder.NONE
    assert (gc.cache, gc.barrier, gc.aio, gc.disk) == (rec.cache, False, "native", rec.disk)
    assert gc.fs_bytes >= 2 * 200 << 20  # both fio files fit


@pytest.mark.parametrize(("kw", "says"), [
    ({"size_mib": 0}, "--size 0"), ({"runtime_s": 0.1}, "--runtime 0.1"),
])
def test_bad_sizes_are_refused(kw: dict[str, float], says: str) -> None:
    with pytest.raises(cost.CostError, match=says):
        cost.CostConfig(RecordConfig(), **kw).validate()  # type: ignore[arg-type]


def test_key_and_command_name_every_setting() -> None:
    c = cost.CostConfig(RecordConfig(cache=CACHE_MODES["unsafe"], barrier=False, aio="io_uring"), 8, 1.0)
    fields = c.key_fields("tcg")
    assert fields == {"fs": "ext4", "cache": "unsafe", "barrier": "off", "disk": "virtio-blk", "accel": "tcg",
                      "size_mib": 8, "runtime_s": 1.0, "aio": "io_uring"}
    assert cost.cost_key(fields) == cost.cost_key(dict(reversed(list(fields.items()))))
    assert cost.slug(fields) == "ext4-unsafe-off-virtio-blk-tcg-8M-1s"
    assert cost.command(fields) == ("crashlab cost --fs ext4 --cache unsafe --barrier off --disk virtio-blk "
                                    "--accel tcg --size 8 --runtime 1 --aio io_uring --again")
    assert cost.accel_label("tcg") == "TCG"


# --- the store --------------------------------------------------------------------------------------

OLD_SCHEMA = """
CREATE TABLE runs (run_id INTEGER PRIMARY KEY, started REAL NOT NULL, command TEXT NOT NULL,
                   config TEXT NOT NULL, versions TEXT NOT NULL);
CREATE TABLE cells (cell TEXT PRIMARY KEY, config TEXT NOT NULL, recording TEXT, record TEXT, run_id INTEGER);
CREATE TABLE states (cell TEXT NOT NULL, state_id TEXT NOT NULL, outcome TEXT NOT NULL, detail TEXT NOT NULL,
                     run_id INTEGER, checked REAL NOT NULL, PRIMARY KEY (cell, state_id));
"""


def old_store(path: Path) -> Path:
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.close()
    return path


def detail(seq: float, **extra: object) -> dict[str, object]:
    figs = {"seq_mb_s": seq, "rand_iops": 150.0, "fsync_p50_ms": 20.0, "fsync_p99_ms": 70.0}
    return {"figures": figs, "accel": "tcg", "command": "crashlab cost --fs ext4 --again",
            "host_storage": {"device": "/dev/vda", "mount": "/", "fstype": "ext4", "options": "rw"}, **extra}


FIELDS = {"fs": "ext4", "cache": "writeback", "barrier": "on", "disk": "virtio-blk", "accel": "tcg",
          "size_mib": 8, "runtime_s": 1.0}


def test_an_old_store_reads_without_costs_and_gains_the_table_when_written(tmp_path: Path) -> None:
    path = old_store(tmp_path / "old.sqlite")
    with Store(path, readonly=True) as s:
        assert s.costs() == [] and s.cost("anything") is None
    with Store(path) as s:
        s.put_cost(cost.cost_key(FIELDS), FIELDS, detail(3.0))
        s.put_cost(cost.cost_key(FIELDS), FIELDS, detail(4.0))  # --again replaces
        assert s.cells() == []
    with Store(path, readonly=True) as s:
        [row] = s.costs()
        assert row.config == FIELDS and row.figures["figures"]["seq_mb_s"] == 4.0


# --- the report ---------------------------------------------------------------------------------

def store_with_cells(path: Path, costs: bool) -> Store:
    s = Store(path)
    run = s.begin_run("crashlab matrix", {"seed": 1}, {"qemu": "7.2"})
    for cache, bad in (("writeback", 3), ("unsafe", 9)):
        for workload in ("smallfiles", "nofsync"):
            cell = f"{cache}/{workload}"
            s.put_cell(cell, {"fs": "ext4", "cache": cache, "barrier": "on", "recorder": "qemu",
                              "workload": workload, "window": "30s"}, run)
            for i in range(20):
                outcome = Outcome.FS_INCONSISTENT if i < bad else Outcome.CONSISTENT
                s.put_state(cell, f"s{i}", outcome, {"state_id": f"s{i}", "outcome": str(outcome)}, run)
        if costs:
            fields = {**FIELDS, "cache": cache}
            s.put_cost(cost.cost_key(fields), fields, detail(3.0 if cache == "writeback" else 9.0))
    return s


def test_a_store_without_costs_reports_as_before(tmp_path: Path) -> None:
    with store_with_cells(tmp_path / "r.sqlite", costs=False) as s:
        cells = report.results(s)
        env = report.environment(s, cells)
        costs = report.cost_results(s, cells)
    assert costs == []
    assert report.markdown(cells, env, costs) == report.markdown(cells, env)
    assert report.mail(cells, env, ["c"], costs) == report.mail(cells, env, ["c"])


def test_cost_table_sits_beside_the_pooled_corruption_rate(tmp_path: Path) -> None:
    with store_with_cells(tmp_path / "r.sqlite", costs=True) as s:
        cells = report.results(s)
        env = report.environment(s, cells)
        costs = report.cost_results(s, cells)
        only_unsafe = report.cost_results(s, cells, {"cache": "unsafe", "workload": "nofsync"})
    assert [c.config["cache"] for c in only_unsafe] == ["unsafe"]
    unsafe = next(c for c in costs if c.config["cache"] == "unsafe")
    assert (unsafe.corrupt.k, unsafe.corrupt.n, unsafe.cells) == (18, 40, 2)  # both workloads pooled
    md = report.markdown(cells, env, costs)
    assert md.startswith(report.markdown(cells).rstrip("\n"))
    assert "| ext4 | unsafe | on | virtio-blk | TCG | 9.0 | 150 | 20.00 | 70.00 | 8 MiB, 1.0 s | 18/40" in md
    text = report.mail(cells, env, ["crashlab matrix"], costs)
    assert all(len(line) <= report.MAIL_WIDTH for line in text.splitlines())
    assert "TCG = emulated CPU" in text and "crashlab cost --fs ext4 --again" in text
    assert "guest images on the host's ext4 on /dev/vda" in text.replace("\n", " ")
    assert "host's ext4 on /dev/vda." in md
    assert ["ext4", "unsafe", "on", "TCG", "9.0", "150"] in [line.split()[:6] for line in text.splitlines()]


def test_plot_cost_writes_a_png(tmp_path: Path) -> None:
    with store_with_cells(tmp_path / "r.sqlite", costs=True) as s:
        costs = report.cost_results(s, report.results(s))
    out = tmp_path / "cost.png"
    report.plot_cost(costs, out, "test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the command --------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "says"), [
    (["--barrier", "maybe"], "--barrier 'maybe': on or off"),
    (["--cache", "bogus"], "unknown cache mode 'bogus'"),
    (["--size", "0"], "--size 0"),
    (["--fs", "xfs", "--barrier", "off"], "nobarrier"),
    (["--aio", "native", "--cache", "writeback"], "native"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, args: list[str], says: str) -> None:
    store = tmp_path / "results" / "r.sqlite"
    r = CliRunner().invoke(cli, ["cost", "--store", str(store), *args])
    assert r.exit_code == 2, r.output
    assert says in r.output and len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert not (tmp_path / "results").exists()


def test_a_stored_figure_is_not_measured_again(tmp_path: Path) -> None:
    store = tmp_path / "r.sqlite"
    with store_with_cells(store, costs=True):
        pass
    r = CliRunner().invoke(cli, ["cost", "--store", str(store), "--cache", "writeback,unsafe",
                                 "--barrier", "on", "--size", "8", "--runtime", "1", "--accel", "tcg"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].startswith("cost of safety: fio in the guest") and "no recorder in the path" in lines[0]
    assert lines[1] == ("ext4 cache=writeback barrier=on disk=virtio-blk [TCG]: seq write 3.0 MB/s, random "
                        "write 150 IOPS, fsync p50 20.00 ms p99 70.00 ms (stored)")
    assert lines[2].startswith("ext4 cache=unsafe") and lines[2].endswith("(stored)")
    assert lines[3].startswith("TCG: an emulated CPU")
    assert not (tmp_path / "cost").exists()  # no guest was booted


def test_report_command_shows_costs_and_plots_them(tmp_path: Path) -> None:
    store = tmp_path / "r.sqlite"
    with store_with_cells(store, costs=True):
        pass
    runner = CliRunner()
    md = runner.invoke(cli, ["report", "--store", str(store), "--format", "markdown"])
    assert md.exit_code == 0 and "Cost of safety: fio in the guest" in md.output, md.output
    png = tmp_path / "cost.png"
    r = runner.invoke(cli, ["report", "--store", str(store), "--format", "cost-png", "-o", str(png)])
    assert r.exit_code == 0 and png.read_bytes()[:4] == b"\x89PNG", r.output


def test_a_store_with_costs_only_reports_them_and_refuses_what_needs_cells(tmp_path: Path) -> None:
    store = tmp_path / "r.sqlite"
    with Store(store) as s:
        s.put_cost(cost.cost_key(FIELDS), FIELDS, detail(3.0))
    runner = CliRunner()
    md = runner.invoke(cli, ["report", "--store", str(store), "--format", "markdown"])
    assert md.exit_code == 0 and "| ext4 | writeback | on | virtio-blk | TCG | 3.0 |" in md.output
    assert "no cells" in md.output
    csv_out = runner.invoke(cli, ["report", "--store", str(store), "--format", "csv"])
    assert csv_out.exit_code == 2 and "no stored states match" in csv_out.output


def test_an_out_that_is_a_file_is_one_line_before_any_guest(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    r = CliRunner().invoke(cli, ["cost", "--store", str(tmp_path / "r.sqlite"), "--out",
                                 str(tmp_path / "file" / "sub"), "--cache", "unsafe", "--barrier", "off",
                                 "--accel", "tcg"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 2, r.output  # the note, then the error
    assert "Not a directory" in r.output and "Traceback" not in r.output
    with Store(tmp_path / "r.sqlite", readonly=True) as s:
        assert s.costs() == []


def test_the_host_storage_is_the_deepest_mount_holding_the_image(tmp_path: Path) -> None:
    mounts = ("/dev/vda / ext4 rw,relatime 0 0\ntmpfs /tmp tmpfs rw 0 0\n"
              "/dev/vdb /tmpdata xfs rw 0 0\n")
    assert cost.mount_of(Path("/tmp/x/y"), mounts) == {"device": "tmpfs", "mount": "/tmp", "fstype": "tmpfs",
                                                       "options": "rw"}
    assert cost.mount_of(Path("/tmpdata2"), mounts)["device"] == "/dev/vda"  # a prefix is not a parent
    assert cost.mount_of(Path("/x"), "") == {}


def test_costs_travel_in_an_export_and_report_from_it_as_from_the_store(tmp_path: Path) -> None:
    from crashlab import export

    with store_with_cells(tmp_path / "r.sqlite", costs=True) as s:
        export.export(s, tmp_path / "export")
        with export.loaded(tmp_path / "export") as restored:
            assert [(c.cost, c.config, c.figures) for c in restored.costs()] == \
                [(c.cost, c.config, c.figures) for c in s.costs()]
            cells = report.results(restored)
            got = report.markdown(cells, report.environment(restored, cells),
                                  report.cost_results(restored, cells))
        cells = report.results(s)
        want = report.markdown(cells, report.environment(s, cells), report.cost_results(s, cells))
    assert got == want and "cost" in want.lower()
