"""Run directories: a dead owner's are reclaimed, a live one's never."""

from __future__ import annotations

import os
import subprocess
import sys
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
