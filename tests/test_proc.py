"""External tools: a deadline that always returns, and no tool that outlives crashlab."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from crashlab import proc, rundir
from crashlab.check.tools import run_tool

# A tool's pid as this test sees it: `$$` is its pid inside the anchor's PID namespace, while
# /proc (the host's) resolves `self` in the host's. `read` is a builtin: the shell opens the file.
HOST_PID = "read -r pid rest < /proc/self/stat; echo $pid"


def _alive(pid: int) -> bool:
    return rundir.start_time(pid) is not None


def test_a_hung_tool_whose_child_holds_stdout_still_times_out(tmp_path: Path) -> None:
    # The grandchild leaves the tool's process group (setsid) and keeps the pipes open: killing the
    # group does not end it, and a plain communicate() would wait for it for ever.
    pidfile = tmp_path / "grandchild"
    script = f"setsid sh -c '{HOST_PID} > {pidfile}; exec sleep 600' & echo started; sleep 600"
    t0 = time.monotonic()
    r = run_tool(["sh", "-c", script], timeout=1.0)
    took = time.monotonic() - t0
    assert r.timed_out and r.rc is None
    assert took < 1.0 + proc.DRAIN_S + 2, took
    grandchild = int(pidfile.read_text())
    os.kill(grandchild, signal.SIGKILL)


def test_a_tool_dies_with_a_killed_crashlab(tmp_path: Path) -> None:
    pidfile = tmp_path / "tool"
    code = ("import sys; from crashlab import proc; "
            f"proc.run(['sh', '-c', '{HOST_PID} > {pidfile}; exec sleep 600'], 600)")
    parent = subprocess.Popen([sys.executable, "-c", code])
    end = time.monotonic() + 20
    while not (pidfile.exists() and pidfile.read_text().strip()):
        assert time.monotonic() < end
        time.sleep(0.05)
    tool = int(pidfile.read_text())
    assert _alive(tool)
    parent.kill()  # SIGKILL: no cleanup code runs in the parent
    parent.wait()
    end = time.monotonic() + 5
    while _alive(tool) and time.monotonic() < end:
        time.sleep(0.05)
    assert not _alive(tool), "the tool outlived its crashlab"


def test_check_raises_one_line_for_failure_and_hang() -> None:
    with pytest.raises(proc.ToolError, match=r"^sh -c echo no >&2; exit 3: no$"):
        proc.check(["sh", "-c", "echo no >&2; exit 3"], 10)
    with pytest.raises(proc.ToolError, match="no answer after 1 s"):
        proc.check(["sleep", "30"], 1)
    assert proc.check(["sh", "-c", "echo yes"], 10) == "yes\n"


def test_as_root_tools_run_in_a_namespace_of_their_own_that_dies_with_the_thread(tmp_path: Path) -> None:
    if os.geteuid() != 0 or proc.IN_GUEST:
        pytest.skip("the anchor needs root (elsewhere setpriv stands in, tested above)")
    pidfile = tmp_path / "tool"
    results: list[proc.Completed] = []

    def work() -> None:
        assert proc.anchored()
        # The shell waits for the orphan to be under way: the thread's end kills the namespace,
        # and an orphan killed before it wrote its pid would fail the test for the wrong reason.
        script = (f"echo $$; ({HOST_PID} > {pidfile}.new; mv {pidfile}.new {pidfile}; exec sleep 600)"
                  f" >/dev/null 2>&1 & while [ ! -s {pidfile} ]; do sleep 0.01; done")
        results.append(proc.run(["sh", "-c", script], 10))
    t = threading.Thread(target=work)
    t.start()
    t.join(30)
    assert results and results[0].returncode == 0
    assert int(results[0].stdout) < 10  # the shell's pid in a namespace of its own
    tool = int(pidfile.read_text())
    ours = Path("/proc/self/ns/pid").stat().st_ino
    # The thread is gone, so is its anchor, so is the background sleep it left.
    end = time.monotonic() + 5
    while _alive(tool) and time.monotonic() < end:
        time.sleep(0.05)
    assert not _alive(tool), "a tool outlived the thread that started it"
    assert Path("/proc/self/ns/pid").stat().st_ino == ours  # this process itself never moved


def test_output_and_input_go_through_whole() -> None:
    data = os.urandom(3 << 20)
    r = proc.run(["sh", "-c", "cat; echo done >&2"], 30, input=data)
    assert r.returncode == 0 and r.stdout == data and r.stderr == b"done\n"
