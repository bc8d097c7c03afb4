"""The read-trace shim and the verdicts it lets a log check reuse: the shim's log read back (pure),
the shim on real programs (what it sees and what it must refuse to vouch for), and `crash check`
with and without the reuse on the real fixtures, state by state."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from crashlab import crashstates, logcheck, model, readtrace
from crashlab.check.tools import run_tool

LOGS = Path(__file__).parent / "data" / "logs"


# --- the log, read back ------------------------------------------------------------------------

def test_a_trace_is_complete_only_when_every_process_it_names_reached_its_exit() -> None:
    ok = "C 5 root\nR 4096 1024\nR 0 512\nR 4608 100\nS 6\nE 6\nC 6\nR 8192 4096\nD 6\nD 5\n"
    t = readtrace.parse(ok)
    assert t.complete and t.reusable and not t.wrote
    assert t.reads == ((0, 512), (4096, 1024), (8192, 4096))  # merged, the overlap folded in
    for text, why in [
        ("R 0 1\nD 5\n", "did not start with the shim"),                     # a static command
        ("C 5 root\nR 0 1\n", "did not exit"),                                # killed before its exit
        ("C 5 root\nS 6\nD 5\n", "process 6"),                                # a child never seen again
        ("C 5 root\nE 5\nD 5\n", "exec'd a program without the shim"),        # exec of a static binary
        ("C 5 root\nU mapped\nD 5\n", "mapped"),
        ("C 5 root\nC 6 root\nD 5\nD 6\n", "did not start with the shim"),   # two roots: not one run
    ]:
        t = readtrace.parse(text)
        assert not t.complete and why in t.why, (text, t.why)
    assert readtrace.parse("C 5 root\nE 5\nF 5\nD 5\n").complete  # an exec that failed changes nothing
    assert readtrace.parse("C 5 root\nE 5\nC 5\nD 5\n").complete  # an exec into a traced program
    wrote = readtrace.parse("C 5 root\nW\nD 5\n")
    assert wrote.complete and wrote.wrote and not wrote.reusable


# --- the shim on real programs -------------------------------------------------------------------

@pytest.fixture(scope="module")
def shim() -> Path:
    lib = readtrace.library()
    assert lib is not None, readtrace.unavailable()  # bootstrap installs gcc
    return lib


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = tmp_path / "image"
    img.write_bytes(bytes(range(256)) * 256)  # 64 KiB
    return img


def traced(argv: list[str], image: Path, tmp: Path) -> tuple[int | None, readtrace.Trace]:
    with readtrace.tracing(image, tmp) as (env, log):
        run = run_tool(argv, 60, env=env)
        return run.rc, readtrace.read_log(log)


def test_the_shim_sees_the_ranges_a_program_reads_through_any_path_to_the_file(
        shim: Path, image: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(image)
    rc, t = traced(["dd", f"if={link}", "bs=4096", "skip=3", "count=2", "status=none", "of=/dev/null"],
                   image, tmp_path)
    assert rc == 0 and t.reusable and t.reads == ((12288, 8192),)
    # Through a shell and a pipe, a child of a child, and pread at offsets of its own choosing.
    code = f"import os; fd = os.open({str(image)!r}, 0); os.pread(fd, 10, 60000); os.pread(fd, 5, 7)"
    rc, t = traced(["sh", "-c", f"{sys.executable} -c {shlex.quote(code)} | cat; true"], image, tmp_path)
    assert rc == 0 and t.reusable, t.why
    assert t.reads == ((7, 5), (60000, 10))


@pytest.mark.parametrize("how, why", [
    ("import mmap, os; m = mmap.mmap(os.open('{image}', os.O_RDONLY), 0, prot=mmap.PROT_READ); m[5]",
     "mapped"),
    ("open('{image}', 'r+b').write(b'x')", None),  # a writer: complete, but never reused
    ("import os; os.system('cat {image} > /dev/null')", "system()"),
    ("import os, signal; open('{image}', 'rb').read(9); os.kill(os.getpid(), signal.SIGKILL)",
     "wrote nothing"),  # killed before its first flush: not a word of it
])
def test_what_the_shim_cannot_vouch_for_is_never_reused(shim: Path, image: Path, tmp_path: Path, how: str,
                                                         why: str | None) -> None:
    _, t = traced([sys.executable, "-c", how.replace("{image}", str(image))], image, tmp_path)
    assert not t.reusable
    if why is None:
        assert t.wrote
    else:
        assert not t.complete and why in t.why, t.why


def test_a_program_without_the_shim_leaves_the_trace_incomplete(shim: Path, image: Path,
                                                                 tmp_path: Path) -> None:
    busybox = shutil.which("busybox")
    assert busybox is not None  # busybox-static: the guest's userland, installed by bootstrap
    _, t = traced([busybox, "cat", str(image)], image, tmp_path)  # static: the shim never loads
    assert not t.complete and "static" in t.why
    _, t = traced(["sh", "-c", f"{busybox} cat {image} >/dev/null; true"], image, tmp_path)
    assert not t.complete, "a static grandchild went unseen"
    _, t = traced(["env", "-i", "/bin/cat", str(image)], image, tmp_path)  # the environment cleared
    assert not t.complete


def test_same_reads_hands_back_a_verdict_only_while_the_bytes_read_are_unchanged(
        shim: Path, image: Path, tmp_path: Path) -> None:
    memo = readtrace.SameReads[str]()
    _, t = traced(["dd", f"if={image}", "bs=512", "skip=4", "count=1", "status=none", "of=/dev/null"],
                  image, tmp_path)
    memo.add(image, t, "verdict", "s1")
    data = bytearray(image.read_bytes())
    data[0] ^= 1  # outside what dd read
    image.write_bytes(data)
    assert memo.lookup(image) == ("verdict", "s1")
    data[2048] ^= 1  # inside it
    image.write_bytes(data)
    assert memo.lookup(image) is None and memo.hits == 1


# --- crash check, with and without the reuse, on the fixtures ---------------------------------------

@pytest.mark.parametrize("log, strategy, extra", [
    ("ext4-dm-barrier-on.log.xz", "prefix-fua", ["--read-only"]),
    ("ext4-dm-barrier-off.log.xz", "random", ["--count", "120"]),  # inconsistent states too; copies
])
def test_crash_check_reuses_verdicts_and_judges_every_state_as_running_the_command_on_each(
        shim: Path, log: str, strategy: str, extra: list[str]) -> None:
    args = [sys.executable, "-m", "crashlab", "crash", "check", str(LOGS / log), "--recorder", "dm",
            "--cache", "writeback", "--strategy", strategy, "--check-cmd", "e2fsck -fn {image}", "--json",
            *extra]
    reused, each = (subprocess.run([*args, *more], capture_output=True, text=True, timeout=900)
                    for more in ([], ["--no-same-reads"]))
    assert reused.returncode == each.returncode, reused.stderr + each.stderr
    a, b = json.loads(reused.stdout), json.loads(each.stdout)
    assert a["states"] == b["states"] > 100 and a["outcomes"] == b["outcomes"]
    assert [(f["state_id"], f["outcome"], f["reason"]) for f in a["failed"]] == \
        [(f["state_id"], f["outcome"], f["reason"]) for f in b["failed"]]
    assert b["same_reads"] == 0 and a["same_reads"] > a["states"] // 2  # most states cost no run
    if strategy == "random":
        assert a["outcomes"].get("fs-inconsistent") and any("same_reads_as" in f for f in a["failed"])


def test_a_state_too_large_to_check_out_is_compared_on_its_copy_with_the_same_verdicts(
        shim: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job = logcheck.LogCheck(LOGS / "ext4-dm-barrier-on.log.xz", model.config("dm", "writeback"),
                            check_cmd=("e2fsck", "-fn", "{image}"), read_only=True)

    def verdicts() -> tuple[list[tuple[str, str, str]], int]:
        s = logcheck.check_log(job, jobs=1)
        return [(v.state_id, v.outcome.value, v.reason) for v in s.failed], s.same_reads
    in_place = verdicts()
    monkeypatch.setattr(crashstates, "CHECKOUT_MAX_BYTES", 0)  # no state fits: every one is a copy
    copies = verdicts()
    assert copies == in_place and copies[1] > 100
