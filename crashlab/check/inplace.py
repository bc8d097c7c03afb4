"""Crash states judged on the shared base image itself, with no copy per state.

A state is checked out on the materializer's base (its writes applied in place, the overwritten
bytes kept), its journal replayed keeping an undo file (filesystems.Replay.undo), judged by the
userspace backend (fsck and debugfs only read), then the replay's undo file and the checkout's own
journal give the base back. A sparse copy and its unlink were most of a state's time.

The undo file is written back in this process (crashlab.undofile), as `e2undo` would.

A checkout saves the bytes under each op it applies, writes them, and writes the saved bytes back
after, in Python, op by op; a sparse copy is one pass of the kernel over the base's allocated
bytes. A state whose ops write more than 1/COPY_RATIO of what a copy would move (hundreds of ops
on a small base: the barrier-off fixture under `unsafe` checked 7 states/s in place against 50 as
copies) is built as a copy; the project's recordings (13-25 MB of data, 20-50 ops a state) stay in
place.

Two ways out of the fast path keep the outcomes those of a copy per state:
- a revert that fails (a replay killed mid-write, a refused undo file) leaves the base unknown: it
  is built again from the log before the next state, so no state sees another's leftovers;
- a state the replay ran on and could not recover is judged again on a copy: on some broken superblocks
  e2fsck fails differently with an undo file (1.47.0 falls back to a backup superblock and
  crashes instead of going on into a repair); the copy's verdict is the one without it.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from pathlib import Path

from crashlab import crashstates
from crashlab.check.outcome import CheckRecord, Outcome
from crashlab.check.runner import CheckItem, check_batch
from crashlab.check.tools import run_tool
from crashlab.check.userspace import UserspaceMounts
from crashlab.filesystems import FILESYSTEMS, USERSPACE_READABLE, Replay

REVERT_TIMEOUT = 120.0  # e2undo writing back what one journal replay overwrote
COPY_RATIO = 8  # a byte checked out costs about this many bytes of sparse copy (measured below)

# (state, image, undo file or None for a disposable copy) -> what to check
Item = Callable[[crashstates.CrashState, Path, Path | None], CheckItem]


def applies(fs: str, checker: str, host_mount: bool = False) -> bool:
    """Whether states of `fs` judged by `checker` (runner.CHECKERS) can be checked in place: in
    userspace, with a replay that can be undone."""
    spec = FILESYSTEMS.get(fs)
    return (not host_mount and checker in ("auto", "userspace") and spec is not None
            and spec.name in USERSPACE_READABLE and spec.replay is not None and bool(spec.replay.undo))


def check_in_place(fs: str, states: Sequence[crashstates.CrashState],
                   materializer: Callable[[], crashstates.Materializer], item: Item,
                   tmp: Path) -> Generator[CheckRecord, None, None]:
    """Each state's record, in order; `tmp` holds the undo file and any copy."""
    replay = FILESYSTEMS[fs].replay
    assert replay is not None and replay.undo, f"{fs}: its replay cannot be undone"
    undo = tmp / "replay.undo"
    # One scratch directory for every state's check and debugfs run, not two made and removed a state.
    scratch = tmp / "scratch"
    scratch.mkdir(exist_ok=True)
    backend = UserspaceMounts(scratch)
    mat = materializer()
    try:
        for st in states:
            record = None
            if mat.checkout_fits(st) and mat.written(st) * COPY_RATIO <= mat.copy_bytes():
                undo.unlink(missing_ok=True)  # e2fsck refuses an undo file of another run
                with mat.checkout(st) as base:
                    [record] = check_batch([item(st, base, undo)], backend=backend, workdir=scratch)
                    reverted = not undo.exists() or revert(replay, undo, base)
                if not reverted:
                    mat.close()
                    mat = materializer()
            if record is None or (record.recovery is not None  # the replay ran, not only its precheck
                                  and record.outcome in (Outcome.UNMOUNTABLE, Outcome.CHECKER_ERROR)):
                copy = tmp / "state.img"
                mat.build(st, copy)
                try:
                    [record] = check_batch([item(st, copy, None)], backend=backend, workdir=scratch)
                finally:
                    copy.unlink(missing_ok=True)
            yield record
    finally:
        undo.unlink(missing_ok=True)
        mat.close()


def revert(replay: Replay, undo: Path, image: Path) -> bool:
    """Whether the replay's undo file gave `image` back as it was before the replay."""
    if replay.revert_here is not None:
        try:
            replay.revert_here(undo, image)
            return True
        except (OSError, ValueError):
            return False
    return run_tool(replay.revert_command(str(undo), str(image)), REVERT_TIMEOUT).rc == 0

