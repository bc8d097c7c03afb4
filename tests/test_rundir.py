"""Run directories: a dead owner's are reclaimed, a live one's never."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crashlab import rundir


def test_a_killed_process_leaves_what_the_next_run_reclaims(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    code = ("import os, tempfile; from crashlab import rundir; rundir.enter(); "
            "d = tempfile.mkdtemp(prefix='crashlab-check-'); open(d + '/x', 'w').write('x'); "
            "print(rundir.scratch(), rundir.tmpfs(), flush=True); os.kill(os.getpid(), 9)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert r.returncode == -9
    left = [Path(p) for p in r.stdout.split() if p != "None"]
    assert left and all(p.is_dir() for p in left)
    assert not any(rundir.owner_alive(p.name) for p in left)
    mine = rundir.scratch()  # this process's own: alive, so never reclaimed
    removed = rundir.reclaim()
    assert set(left) <= set(removed) and mine.is_dir() and mine not in removed
    assert not any(p.exists() for p in left)


def test_owner_tags_tell_a_reused_pid_apart() -> None:
    assert rundir.owner_alive(rundir.PREFIX + rundir.owner_tag())
    pid = os.getpid()
    assert not rundir.owner_alive(f"{rundir.PREFIX}{pid}-1")  # same pid, another start time
    assert not rundir.owner_alive(f"{rundir.PREFIX}x-1") and not rundir.owner_alive(rundir.PREFIX)


def test_a_dead_owner_its_parent_has_not_reaped_yet_is_dead() -> None:
    # A killed campaign's Dask workers are zombies for a while: their directories are free.
    child = subprocess.Popen(["sleep", "30"])
    try:
        name = rundir.PREFIX + rundir.owner_tag(child.pid)
        assert rundir.owner_alive(name)
        child.kill()
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # dead, still unreaped
        assert Path(f"/proc/{child.pid}/stat").exists() and not rundir.owner_alive(name)
    finally:
        child.kill()
        child.wait()


def _as_from_a_shell() -> None:
    import signal

    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def test_signals_unwind_and_exit_130_and_143(tmp_path: Path) -> None:
    # A CLI command blocked in a tool: SIGTERM and SIGINT both unwind (the tool is killed, the run
    # directory removed) and give their documented exit statuses.
    import signal
    import time

    code = ("import sys; from crashlab import proc, cli, rundir; import click\n"
            "@cli.cli.command('block-for-test')\n"
            "def block() -> None:\n"
            "    print(rundir.scratch(), flush=True); proc.run(['sleep', '600'], 600)\n"
            "sys.argv = ['crashlab', 'block-for-test']; cli.main()\n")
    for sig, status in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        # Started as from a shell: the suite's own process may hold signals blocked or ignored by
        # what ran in it before (both are inherited across exec), which would test them, not crashlab.
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "TMPDIR": str(tmp_path)},
                             preexec_fn=_as_from_a_shell)
        assert p.stdout is not None
        scratch = Path(p.stdout.readline().strip())
        assert scratch.is_dir()
        # Signal once the tool runs (a loaded machine can take seconds to spawn it): a signal
        # inside the spawn is another test's business.
        deadline = time.monotonic() + 60
        while not any((t / "children").read_text().split() for t in Path(f"/proc/{p.pid}/task").iterdir()):
            assert time.monotonic() < deadline and p.poll() is None, "the tool never started"
            time.sleep(0.05)
        p.send_signal(sig)
        try:
            rc = p.wait(60)
        except subprocess.TimeoutExpired:
            status_lines = Path(f"/proc/{p.pid}/status").read_text().splitlines()
            masks = [ln for ln in status_lines if ln.startswith("Sig")]
            p.kill()
            raise AssertionError(f"{sig!r} did not end the run: {masks}") from None
        assert rc == status, p.stderr.read() if p.stderr else ""
        assert not scratch.exists()
        assert subprocess.run(["pgrep", "-f", "sleep 600", "-P", str(p.pid)], capture_output=True).returncode


LEAKY = """
import multiprocessing, sys
lock = multiprocessing.get_context("spawn").Lock()  # a named semaphore, unlinked by the tracker
print(lock._semlock.name, flush=True)
sys.stdin.read()
"""


def test_a_semaphore_a_killed_process_group_left_is_reclaimed_and_a_live_one_kept(tmp_path: Path) -> None:
    # A campaign's Dask nannies make these; a kill -9 of the group takes the tracker that would
    # have unlinked them.
    import multiprocessing
    import signal

    p = subprocess.Popen([sys.executable, "-c", LEAKY], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, start_new_session=True)
    assert p.stdout is not None
    dead = rundir.SHM / ("sem." + p.stdout.readline().strip().lstrip("/"))
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    live = multiprocessing.get_context("spawn").Lock()  # this process maps it
    kept = rundir.SHM / ("sem." + live._semlock.name.lstrip("/"))  # type: ignore[attr-defined]
    try:
        assert dead.exists() and kept.exists()
        assert rundir.reclaim_semaphores() == [] and dead.exists()  # too young to judge
        old = time.time() - 2 * rundir.SEMAPHORE_MIN_AGE_S
        for f in (dead, kept):
            os.utime(f, (old, old))
        assert dead in rundir.reclaim() and not dead.exists()
        assert kept.exists(), "a live process's semaphore was removed"
    finally:
        dead.unlink(missing_ok=True)
        del live
