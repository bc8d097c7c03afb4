"""Bad input to the campaign-side commands (run, matrix, report, reproduce, gate, check): one clear
line, exit status 2, and nothing written (no store row, no store file, no recording) before the
input checks out (issue 12). Every case fails before any guest boots."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from fixture_logs import fixture_recording

from crashlab import campaign, crashstates, gate, logformat, markers, oracle
from crashlab.cachemodes import CACHE_MODES
from crashlab.check.outcome import CheckRecord, Outcome
from crashlab.cli import EXIT_USAGE, cli
from crashlab.cli import check as check_cli
from crashlab.logformat import LogWriter
from crashlab.store import Store

FIXTURES = Path(__file__).parent / "data" / "logs"
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT or shutil.which("unshare") is None,
                                reason="a private mount namespace (read-only bind, full tmpfs) needs root")


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def one_line_error(res: Result, *needles: str, code: int = EXIT_USAGE) -> None:
    assert res.exit_code == code, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(autouse=True)
def no_campaign(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused input must never reach the driver (it would record, and write the store)."""
    def refuse(*args: Any, **kw: Any) -> Any:
        raise AssertionError("bad input reached the campaign driver")

    monkeypatch.setattr(campaign, "run_matrix", refuse)
    monkeypatch.setattr(gate, "run_cells", refuse)


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


# --- options -------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["run", "--states", "-5"],
    ["run", "--states", str(10**22)],
    ["run", "--states", "0"],
    ["run", "--workers", "-3"],
    ["run", "-j", "0"],
    ["run", "-j", str(10**6)],
    ["run", "--scale", "0"],
    ["matrix", "--states", "-1"],
    ["matrix", "--scale", "-2"],
    ["gate", "--states", str(10**22)],
    ["gate", "--workers", "-3"],
    ["gate", "--scale", "0"],
], ids=lambda a: " ".join(a)[:40])
def test_out_of_range_options_are_refused_before_anything_is_written(tmp_path: Path, args: list[str]) -> None:
    store = tmp_path / "results" / "crashlab.sqlite"
    res = run(*args, "--store", str(store))
    assert res.exit_code == EXIT_USAGE, res.output
    assert "Invalid value for" in res.stderr and "Traceback" not in res.output
    assert tree(tmp_path) == []


# --- store paths ---------------------------------------------------------------------------------

def foreign_sqlite(path: Path) -> Path:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE mail (id INTEGER)")
    db.commit()
    db.close()
    return path


def directory(path: Path) -> Path:
    path.mkdir()
    return path


def text(path: Path) -> Path:
    path.write_text("not sqlite\n")
    return path


def binary(path: Path) -> Path:
    path.write_bytes(os.urandom(4096))
    return path


BAD_STORES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "directory": (directory, "is a directory, not a results store"),
    "text": (text, "not a SQLite file"),
    "binary": (binary, "not a SQLite file"),
    "foreign": (foreign_sqlite, "a SQLite database but not a results store"),
}
STORE_COMMANDS = {
    "run": ["run", "-q"],
    "matrix": ["matrix", "-q", "--cache", "none"],
    "report": ["report"],
    "reproduce": ["reproduce", "0123456789-qemu-none-w1-e3-a"],
    "gate": ["gate", "--no-sensitivity"],
}


@pytest.mark.parametrize("kind", BAD_STORES)
@pytest.mark.parametrize("command", STORE_COMMANDS)
def test_a_path_that_is_no_store_is_refused_and_left_as_it_was(tmp_path: Path, kind: str,
                                                                command: str) -> None:
    make, needle = BAD_STORES[kind]
    store = make(tmp_path / "s.sqlite")
    before = store.read_bytes() if store.is_file() else None
    one_line_error(run(*STORE_COMMANDS[command], "--store", str(store)), str(store), needle)
    assert (store.read_bytes() if store.is_file() else None) == before
    assert tree(tmp_path) == ["s.sqlite"]


def test_reproduce_refuses_a_missing_store_and_creates_none(tmp_path: Path) -> None:
    store = tmp_path / "results" / "missing.sqlite"
    one_line_error(run(*STORE_COMMANDS["reproduce"], "--store", str(store)), "no results store")
    assert tree(tmp_path) == []


def stored_cell(path: Path) -> campaign.Cell:
    """A store holding one checked state of one cell, as a campaign leaves it."""
    cell = campaign.Cell.parse({"cache": "none"})
    with Store(path) as store:
        run_id = store.begin_run("crashlab run --cache none", {}, {"crashlab": "test"})
        store.put_cell(cell.key, cell.config(), run_id)
        store.put_state(cell.key, "s1", Outcome.CONSISTENT, consistent("s1"), run_id)
    return cell


def consistent(state_id: str) -> dict[str, Any]:
    return CheckRecord(state_id, "x.img", "ext4", Outcome.CONSISTENT, "", "host").to_dict()


def in_namespace(setup: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """`argv` run with `setup` (mount commands) done in a private mount namespace: gone with it."""
    script = f"set -e; {setup}; exec {shlex.join(argv)}"
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=120)


CRASHLAB = [sys.executable, "-m", "crashlab"]


def read_only(d: Path) -> str:
    return f"mount --bind {shlex.quote(str(d))} {shlex.quote(str(d))}; " \
           f"mount -o remount,bind,ro {shlex.quote(str(d))}"


@needs_root
def test_report_reads_a_store_in_a_read_only_directory(tmp_path: Path) -> None:
    d = tmp_path / "ro"
    d.mkdir()
    cell = stored_cell(d / "s.sqlite")
    res = in_namespace(read_only(d), [*CRASHLAB, "report", "--store", str(d / "s.sqlite"), "--format", "csv"])
    assert res.returncode == 0, res.stderr
    assert "none" in res.stdout and cell.fs in res.stdout
    assert tree(d) == ["s.sqlite"]  # no -wal or -shm left beside it either


@needs_root
@pytest.mark.parametrize("command", ["run", "matrix", "gate"])
def test_a_read_only_store_directory_is_one_line_before_any_guest(tmp_path: Path, command: str) -> None:
    d = tmp_path / "ro"
    d.mkdir()
    for store in (d / "new.sqlite", d / "s.sqlite"):
        if store.name == "s.sqlite":
            stored_cell(store)
        res = in_namespace(read_only(d), [*CRASHLAB, *STORE_COMMANDS[command], "--store", str(store)])
        assert res.returncode == EXIT_USAGE, res.stderr
        assert res.stderr.strip().splitlines() == [f"Error: {store}: cannot write the store's directory "
                                                   f"{d}: Read-only file system"]
    assert tree(d) == ["s.sqlite"]


FULL_DISK = "mount -t tmpfs -o size=64k tmpfs {d}; dd if=/dev/zero of={d}/fill bs=4k 2>/dev/null || true"


@needs_root
def test_a_full_disk_under_a_new_store_is_one_line_and_leaves_no_file(tmp_path: Path) -> None:
    d = tmp_path / "full"
    d.mkdir()
    store = d / "s.sqlite"
    res = in_namespace(FULL_DISK.format(d=shlex.quote(str(d))),
                       ["sh", "-c", f"{shlex.join([*CRASHLAB, 'run', '-q', '--store', str(store)])}; "
                                    f"echo status=$?; ls -A {shlex.quote(str(d))}"])
    assert res.stderr.strip().splitlines() == [f"Error: {store}: results store: the disk is full"]
    assert res.stdout.split() == ["status=2", "fill"]


MID_RUN = textwrap.dedent("""
    import sys
    from crashlab import campaign, cli
    from crashlab.check.outcome import Outcome

    def run_matrix(cells, states, store, results_dir, **kw):
        store.put_cell(cells[0].key, cells[0].config())
        with open(sys.argv[1], "wb") as f:  # the disk fills while the campaign runs
            try:
                while True:
                    f.write(bytes(4096))
                    f.flush()
            except OSError:
                pass
        for n in range(1000):
            store.put_state(cells[0].key, f"s{n}", Outcome.CONSISTENT, {"pad": "x" * 4000})
        raise AssertionError("the store took 4 MB on a full 64 KiB disk")

    campaign.run_matrix = run_matrix
    sys.argv = ["crashlab", "run", "-q", "--store", sys.argv[2]]
    cli.main()
""")


@needs_root
def test_a_disk_that_fills_during_a_run_is_one_line(tmp_path: Path) -> None:
    d = tmp_path / "full"
    d.mkdir()
    res = in_namespace(f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(str(d))}",
                       [sys.executable, "-c", MID_RUN, str(d / "fill"), str(d / "s.sqlite")])
    assert res.returncode == EXIT_USAGE, res.stderr
    assert res.stderr.strip().splitlines() == [f"Error: {d / 's.sqlite'}: results store: the disk is full"]


# --- matrix TOML ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("toml", "needle"), [
    (b"\x00\xff\xfe\x80binary", "not a TOML file (not UTF-8 text)"),
    (b"fs = [ext4", "not valid TOML"),
    (b'data_mode = "journal"\n', "unknown keys data_mode; known: aio, barrier, cache"),
    (b'[matrix]\nfs = ["ext4"]\n[extra]\nx = 1\n', "[matrix] must be a table and the only one"),
    (b"matrix = 3\n", "[matrix] must be a table"),
    (b"fs = 3\n", "fs must be a non-empty list"),
    (b"cache = []\n", "cache must be a non-empty list"),
    (b"workload = [[1]]\n", "workload: [[1]] holds a value of the wrong type"),
    (b"torn = [true]\n", "torn: [True] holds a value of the wrong type"),
    (b"states = 0\n", "states 0 is out of range 1..1000000"),
    (b"states = 10000000\n", "states 10000000 is out of range"),
    (b'states = "12"\n', "states must be an integer, not '12'"),
    (b"scale = -1\n", "scale -1 is out of range 1.."),
    (b"seed = 1.5\n", "seed must be an integer"),
    (b"strategy = 1\n", "strategy must be a string"),
    (b'cache = "nonne"\n', "unknown cache mode 'nonne'"),
])
def test_a_bad_matrix_config_is_one_line_and_leaves_no_store(tmp_path: Path, toml: bytes,
                                                             needle: str) -> None:
    config = tmp_path / "m.toml"
    config.write_bytes(toml)
    store = tmp_path / "results" / "crashlab.sqlite"
    one_line_error(run("matrix", "--config", str(config), "--store", str(store)), needle)
    assert tree(tmp_path) == ["m.toml"]


def test_matrix_config_takes_every_option_as_the_command_line_does(tmp_path: Path) -> None:
    assert set(campaign.MATRIX_KEYS) == {f.name for f in fields(campaign.Matrix)}
    config = tmp_path / "m.toml"
    config.write_text('fs = "ext4, xfs"\nbarrier = [true]\nwindow = [30, "inf"]\ntorn = "0,4096"\n'
                      'states = 3\nseed = -7\nscale = 2\nstrategy = "epochs"\n')
    m = campaign.Matrix.from_toml(config)
    assert (m.fs, m.barrier, m.window, m.torn, m.states, m.seed, m.scale, m.strategy) == \
        (("ext4", "xfs"), ("on",), ("30", "inf"), (0, 4096), 3, -7, 2, "epochs")
    assert len(m.cells()) == 2 * len(CACHE_MODES) * 2 * 2 * 2


def test_matrix_config_that_is_a_directory_is_a_usage_error(tmp_path: Path) -> None:
    res = run("matrix", "--config", str(tmp_path), "--store", str(tmp_path / "s.sqlite"))
    assert res.exit_code == EXIT_USAGE and "is a directory" in res.stderr
    assert tree(tmp_path) == []


# --- check: the durability points of a state ------------------------------------------------------

def marker_log(path: Path) -> Path:
    """Four durability markers, seqs 0..3, with a write and a flush after each."""
    with LogWriter(path) as w:
        for seq in range(4):
            w.write(100 + seq, markers.encode(markers.Marker(seq, 0, f"point-{seq}")))
            w.write(seq, bytes([seq + 1]) * 512)
            w.flush()
    return path


def state_of(log: Path, end: int) -> str:
    with logformat.open_log(log) as reader:
        digest = crashstates.log_digest(reader)[:crashstates.DIGEST_CHARS]
    return crashstates.CrashState(digest, campaign.Cell().model_config(), end, "a").id


def test_check_derives_each_states_present_markers_from_the_log(tmp_path: Path) -> None:
    log = marker_log(tmp_path / "m.log")
    with logformat.open_log(log) as reader:
        entries = reader.index()
    ends = [0, 1, 4, 7, len(entries)]
    derived = check_cli.state_markers(log, [state_of(log, e) for e in ends])
    assert derived == [frozenset(crashstates.present_markers(entries, e)) for e in ends]
    assert derived[0] == frozenset() and derived[-1] == frozenset(range(4))
    assert len(set(derived)) == len(derived)  # each end lies after a different prefix of the points


def test_check_log_is_refused_for_another_logs_state_or_an_end_past_it(tmp_path: Path) -> None:
    log = marker_log(tmp_path / "m.log")
    other = tmp_path / "other.log"
    with LogWriter(other) as w:
        w.write(0, bytes(512))
    promises = tmp_path / "p.jsonl"
    promises.write_text('{"marker": "point-0", "seq": 0}\n')
    image = tmp_path / "x.img"
    image.write_bytes(bytes(4096))
    base = ["check", str(image), "--fs", "ext4", "--promises", str(promises), "--log", str(log)]
    one_line_error(run(*base, "--state-id", state_of(other, 1)), "not of")
    one_line_error(run(*base, "--state-id", state_of(log, 999)), "crash point after entry 999")
    one_line_error(run(*base, "--state-id", "nonsense"), "crash-state id 'nonsense'")
    one_line_error(run(*base), "--log derives")
    one_line_error(run(*base, "--state-id", state_of(log, 1), "--markers", "point-0"), "--log derives")
    one_line_error(run("check", str(image), "--fs", "ext4", "--markers", "point-0"), "--markers")
    assert image.read_bytes() == bytes(4096)


# --- reproduce: its JSON and the check command it suggests -----------------------------------------

@pytest.mark.skipif(not ROOT, reason="host loop mounts need root")
def test_reproduce_json_keep_and_its_check_command_give_reproduces_outcome(tmp_path: Path) -> None:
    """The fixture holds no in-band markers, so no durability point of a promise is present in any
    state: `check` without the state's points would take the end state's promises (d/f200 exists)
    for a state cut early, and report data loss that reproduce does not."""
    cell = campaign.Cell.parse({"recorder": "dm", "cache": "none"})
    rec_dir = fixture_recording("ext4-dm-barrier-on.log.xz", tmp_path / "rec", promises=(
        json.dumps({"marker": "fsync200", "seq": 0}) + "\n"
        + json.dumps({"marker": "fsync200", "seq": 0, **oracle.exists("d/f200", "file")}) + "\n")).out_dir
    # A state cut early, before d/f200 was written: a drawn state's id with its crash point moved there.
    drawn = crashstates.parse_id(campaign.generate_states(cell, rec_dir, 1)[0])
    state_id = replace(drawn, end=258, sel="n").id
    store = tmp_path / "s.sqlite"
    with Store(store) as s:
        s.put_cell(cell.key, cell.config())
        s.set_recording(cell.key, rec_dir, {})
        s.put_state(cell.key, state_id, Outcome.CONSISTENT, consistent(state_id))
    kept = tmp_path / "kept.img"
    res = run("reproduce", state_id, "--store", str(store), "--keep", str(kept), "--json", "--host-mount")
    assert res.exit_code == 0, res.output
    reproduced = json.loads(res.stdout)  # the whole of stdout: the --keep hint is on stderr
    suggested = shlex.split(res.stderr.strip().splitlines()[-1])
    assert suggested[:3] == ["crashlab", "check", str(kept)] and "--log" in suggested
    checked = run(*suggested[1:], "--json")
    assert checked.exit_code in (0, 1, 3), checked.output
    record = json.loads(checked.stdout)
    assert (record["outcome"], record["violations"]) == (reproduced["outcome"], reproduced["violations"])
    assert reproduced["violations"] == []
    # What it suggested before: the end state's promises, which this early state breaks.
    naive = run("check", str(kept), "--fs", "ext4", "--promises", str(rec_dir / "promises.jsonl"),
                "--host-mount", "--json")
    assert json.loads(naive.stdout)["violations"] != []
