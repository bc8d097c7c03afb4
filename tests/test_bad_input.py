"""Bad input to the log reader, the state builder and the `log`/`crash` commands: one clear line, a
documented exit status, nothing written to the output path (issue 12)."""

from __future__ import annotations

import lzma
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from crashlab import cli as climod
from crashlab import crashstates, logformat, markers, model
from crashlab.cli import cli
from crashlab.logformat import LogWriter, open_log

README = Path(__file__).parent.parent / "README.md"


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def one_line_error(res: Result, code: int, *needles: str) -> None:
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def small_log(path: Path, writes: int = 4, promise: int | None = None) -> Path:
    """`writes` one-sector writes and a flush, with a workload-start marker first."""
    with LogWriter(path) as w:
        w.write(100, markers.encode(markers.Marker(0, 0, markers.WORKLOAD_START)))
        for k in range(writes):
            w.write(k, bytes([k + 1]) * 512)
        w.flush()
        w.close(nr_entries=promise)
    return path


def cut_log(tmp_path: Path) -> Path:
    """A log cut inside its last entry: the superblock promises one entry more than is whole."""
    log = small_log(tmp_path / "cut.log", writes=4)
    raw = log.read_bytes()
    log.write_bytes(raw[:-512 - 100])  # the flush header gone and the last write's data cut
    return log


# --- not a log file ------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", ["", ".xz"])
def test_a_directory_fifo_or_device_is_refused_at_once(tmp_path: Path, suffix: str) -> None:
    d = tmp_path / f"dir{suffix}"
    d.mkdir()
    one_line_error(run("log", "inspect", str(d)), 2, f"{d}: is a directory, not a log file")
    fifo = tmp_path / f"fifo{suffix}"
    os.mkfifo(fifo)
    # In a child with a timeout: a reader that opens a FIFO blocking would hang the test run.
    res = subprocess.run([sys.executable, "-m", "crashlab", "log", "inspect", str(fifo)],
                         capture_output=True, text=True, timeout=60)
    assert (res.returncode, res.stderr.strip()) == (2, f"Error: {fifo}: is a FIFO, not a log file")
    if not suffix:
        one_line_error(run("log", "inspect", "/dev/null"), 2, "is a character device, not a log file")


# --- compressed logs -----------------------------------------------------------------------------

def test_truncated_or_foreign_xz_names_the_users_file(tmp_path: Path) -> None:
    raw = small_log(tmp_path / "a.log", writes=40).read_bytes()
    packed = lzma.compress(raw)
    cut = tmp_path / "cut.log.xz"
    cut.write_bytes(packed[:len(packed) // 2])
    one_line_error(run("log", "inspect", str(cut)), 2, f"{cut}: cannot decompress: truncated .xz")
    junk = tmp_path / "junk.log.xz"
    junk.write_bytes(lzma.compress(b"not a log at all" * 64))
    res = run("log", "inspect", str(junk))
    one_line_error(res, 2, f"{junk}: not a dm-log-writes log: bad superblock")
    assert "crashlab-log-" not in res.output  # the temporary file is ours, not the user's
    notxz = tmp_path / "plain.log.xz"
    notxz.write_bytes(raw)
    one_line_error(run("log", "inspect", str(notxz)), 2, f"{notxz}: cannot decompress:")


def test_xz_is_inflated_only_as_far_as_its_entries_reach(tmp_path: Path) -> None:
    raw = small_log(tmp_path / "a.log").read_bytes()
    bomb = tmp_path / "bomb.log.xz"
    with lzma.open(bomb, "wb", preset=0) as f:
        f.write(raw)
        for _ in range(64):
            f.write(bytes(1 << 20))  # a preallocated log's zero tail, or a bomb: 64 MiB in ~10 KiB
    assert bomb.stat().st_size < 64 << 10
    with open_log(bomb) as reader:
        assert len(reader.index()) == 6 and reader.damage is None
        assert reader.size <= len(raw) + 8192  # read up to the zero header that ends the log


def test_xz_larger_than_the_free_space_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "big.log"
    with LogWriter(log) as w:
        w.write(0, bytes(range(256)) * 512)  # 128 KiB of data the log declares and holds
    big = tmp_path / "big.log.xz"
    big.write_bytes(lzma.compress(log.read_bytes()))
    free = os.statvfs_result((4096, 4096, 0, 0, 16, 0, 0, 0, 0, 255))  # 16 blocks: 64 KiB free
    monkeypatch.setattr(logformat.os, "statvfs", lambda _: free)
    with pytest.raises(logformat.LogFormatError, match=f"{big}: its entries reach byte .* past the "
                                                       "65536 bytes free"):
        open_log(big).__enter__()
    # A header that only claims more than fits reads as the same damaged log the plain file is.
    with LogWriter(log) as w:
        w.write(0, bytes(512))
        w.write(1, bytes(512) * 4)
    claim = bytearray(log.read_bytes())
    claim[3 * 512 + 8:3 * 512 + 16] = (1 << 30).to_bytes(8, "little")  # 2^30 sectors, 4 present
    big.write_bytes(lzma.compress(bytes(claim)))
    with open_log(big) as reader:
        reader.index()
        assert reader.damage is not None and "runs" in reader.damage.reason


# --- entries no device can have ------------------------------------------------------------------

@pytest.mark.parametrize(("op", "why"), [
    (lambda w: w.write(1 << 55, bytes(512)), "WRITE of 1 sectors at sector 36028797018963968 ends past"),
    (lambda w: w.discard(0, (1 << 64) - 1), "DISCARD of 18446744073709551615 sectors at sector 0 ends past"),
], ids=["write-at-2^55", "discard-2^64-1"])
def test_entries_past_byte_2_63_are_damage_not_overflow(tmp_path: Path, op: object, why: str) -> None:
    log = tmp_path / "huge.log"
    with LogWriter(log) as w:
        w.write(1, bytes(512))
        op(w)  # type: ignore[operator]
        w.flush()
    res = run("log", "inspect", str(log))
    assert res.exit_code == 1 and f"entry 1 at byte offset 1536: {why} byte 2^63" in res.stderr
    out = tmp_path / "states"
    gen = run("crash", "generate", str(log), "--cache", "writeback", "--recorder", "qemu", "--out", str(out))
    one_line_error(gen, 1, "damaged log: entry 1", "--salvage")
    assert gen.stdout == "" and not out.exists()
    gen = run("crash", "generate", str(log), "--cache", "writeback", "--recorder", "qemu", "--out", str(out),
              "--baseline", "none", "--salvage")
    assert gen.exit_code == 3, gen.output
    assert "salvaged: " in gen.stderr and "read only the 1 complete entries" in gen.stderr
    assert {p.stat().st_size for p in out.iterdir()} == {1024}  # only the whole first write


# --- damaged logs: refused, or salvaged out loud --------------------------------------------------

def test_damaged_log_is_refused_by_every_command_unless_salvaged(tmp_path: Path) -> None:
    log = cut_log(tmp_path)
    assert run("log", "inspect", str(log)).exit_code == 1
    img = tmp_path / "img"
    one_line_error(run("log", "replay", str(log), str(img)), 1, "damaged log: entry 4", "--salvage")
    assert not img.exists()
    res = run("log", "replay", "--salvage", str(log), str(img))
    assert res.exit_code == 3 and res.stdout.strip() == f"replayed 4 entries of {log} onto {img}"
    assert res.stderr.startswith(f"salvaged: {log}: damaged log: entry 4 at byte offset")

    gen = ["crash", "generate", str(log), "--cache", "none", "--recorder", "qemu", "--baseline", "none"]
    one_line_error(run(*gen), 1, "damaged log", "--salvage")
    res = run(*gen, "--salvage", "--strategy", "prefix", "--count", "2")
    assert res.exit_code == 3, res.output
    ids = res.stdout.split()
    assert len(ids) == 2 and res.stderr.splitlines()[-1].startswith("salvaged: ")
    state = tmp_path / "state.img"
    one_line_error(run("crash", "build", str(log), ids[0], str(state)), 1, "damaged log", "--salvage")
    assert not state.exists()
    res = run("crash", "build", "--salvage", str(log), ids[0], str(state))
    assert res.exit_code == 3 and state.exists() and "salvaged: " in res.stderr
    # Salvage changes nothing for a whole log.
    whole = small_log(tmp_path / "whole.log")
    assert run("log", "replay", "--salvage", str(whole), str(img)).exit_code == 0


def test_replay_size_out_of_range_is_a_usage_error(tmp_path: Path) -> None:
    log, img = small_log(tmp_path / "a.log"), tmp_path / "img"
    for size in ("-1", str(1 << 63), "lots"):
        res = run("log", "replay", "--size", size, str(log), str(img))
        assert res.exit_code == 2 and "Invalid value for '--size'" in res.output
        assert not img.exists()
    one_line_error(run("log", "replay", str(log), str(tmp_path / "no" / "img")), 2,
                   "no/img: cannot write: No such file or directory")


# --- crash-state ids and images ------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["e\u00b2", "e" + "9" * 5000, "t\u00b2-e3", "t" + "5" * 5000 + "-e3"],
                         ids=["end-superscript", "end-5000-digits", "torn-superscript", "torn-5000-digits"])
def test_malformed_state_ids_are_one_line(tmp_path: Path, bad: str) -> None:
    log, img = small_log(tmp_path / "a.log"), tmp_path / "img"
    res = run("crash", "build", str(log), f"0123456789-qemu-none-w1-{bad}-a", str(img))
    one_line_error(res, 2, "crash-state id")
    assert not img.exists()


def _fsize_limit() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_an_image_that_cannot_be_written_is_one_line_and_leaves_dest_alone(tmp_path: Path) -> None:
    log = tmp_path / "wide.log"
    with LogWriter(log) as w:
        w.write(8 << 20 >> 9, bytes(512))  # a 8 MiB image, past the child's 1 MiB file size limit
    res = run("crash", "generate", str(log), "--cache", "none", "--recorder", "qemu", "--count", "1",
              "--baseline", "none")
    state_id = res.stdout.split()[0]
    dest = tmp_path / "dest.img"
    dest.write_bytes(b"keep")
    # SIGXFSZ ignored is inherited through exec: writes past the limit fail with EFBIG instead.
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        child = subprocess.run([sys.executable, "-m", "crashlab", "crash", "build", str(log), state_id,
                                str(dest)], capture_output=True, text=True, timeout=60,
                               preexec_fn=_fsize_limit)
    finally:
        signal.signal(signal.SIGXFSZ, old)
    assert child.returncode == 2, child.stderr
    assert re.fullmatch(r"Error: .*: cannot write: File too large\n", child.stderr), child.stderr
    assert dest.read_bytes() == b"keep"
    one_line_error(run("crash", "build", str(log), state_id, str(tmp_path / "no" / "x.img")), 2,
                   "cannot write: No such file or directory")
    assert not list(tmp_path.glob(".x.img.*"))
    (tmp_path / "file").write_text("")
    one_line_error(run("crash", "generate", str(log), "--cache", "none", "--recorder", "qemu",
                       "--out", str(tmp_path / "file" / "sub")), 2, "cannot make the directory")


def test_builder_errors_are_input_errors(tmp_path: Path) -> None:
    log = small_log(tmp_path / "a.log")
    with open_log(log) as reader:
        digest = crashstates.log_digest(reader)
        m = model.LogModel(reader.index(), model.config("qemu", "none"))
        state = crashstates.generate(m, digest, 1, 0).states[0]
        with crashstates.Materializer(reader, m, digest, workdir=str(tmp_path)) as mat, \
                pytest.raises(logformat.InputError, match="cannot write"):
            mat.build(state, tmp_path / "missing" / "x.img")
        with pytest.raises(logformat.ImageError, match="base image"):
            crashstates.Materializer(reader, m, digest, workdir=str(tmp_path / "missing"))
    assert issubclass(crashstates.CrashStateError, logformat.InputError)


# --- the documented exit statuses ----------------------------------------------------------------

def test_readme_documents_the_exit_statuses() -> None:
    table = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", README.read_text(), re.M))
    assert table.keys() == {str(c) for c in (climod.EXIT_OK, climod.EXIT_DAMAGED, climod.EXIT_USAGE,
                                             climod.EXIT_SALVAGED, climod.EXIT_INTERRUPTED,
                                             climod.EXIT_TERMINATED)}
    assert "damaged" in table[str(climod.EXIT_DAMAGED)] and "salvage" in table[str(climod.EXIT_SALVAGED)]
