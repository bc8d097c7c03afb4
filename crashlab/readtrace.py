"""Which bytes of an image a command read, and the verdicts that reuses.

A check command (`e2fsck -fn {image}`) reads a few hundred kilobytes of a 256 MiB image, and the
prefix states of one log differ in a few blocks each, most of them journal or file data the
checker never looks at. A deterministic command whose every read returns the same bytes takes the
same path and gives the same verdict, so a state whose bytes at every range the command read for
an earlier state are unchanged is given that state's verdict without a run of its own.

The reads are recorded by `native/readtrace.c`, an LD_PRELOAD shim, compiled here once per
machine (gcc) into the cache beside the guest kernel. The reuse is only as sound as the trace is
complete, so a trace counts only when every process of the command carried the shim to its exit
and none read the image in a way the shim cannot see (a mapping, stdio, sendfile, system(); a
static binary or a cleared environment leaves a process unaccounted for); and never for a command
that wrote the image, timed out or was killed. Raw system calls and io_uring are not seen: a
command reading the image that way must be run with the reuse off (`--no-same-reads`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from crashlab import proc
from crashlab.guest.provision import cache_root

SOURCE = Path(__file__).with_name("native") / "readtrace.c"
BUILD_TIMEOUT_S = 120.0
KEEP = 4  # earlier read sets a state is compared with: most hits are on the one just before
MAX_KEPT = 64 << 20  # a command that read more than this of an image is not worth remembering

V = TypeVar("V")


@dataclass(frozen=True)
class Trace:
    """What the shim saw of one run: the byte ranges read (merged, in order), whether the trace
    accounts for every read, and whether the image was written."""

    reads: tuple[tuple[int, int], ...]
    complete: bool
    wrote: bool
    why: str = ""  # why it is incomplete

    @property
    def reusable(self) -> bool:
        return self.complete and not self.wrote


def parse(text: str) -> Trace:
    """Read the shim's log (its format is in native/readtrace.c)."""
    ranges: list[tuple[int, int]] = []
    roots = 0
    wrote = False
    why = ""
    named: set[str] = set()  # every process the log says ran: each must reach its exit
    exited: set[str] = set()
    execs: dict[str, int] = {}  # pid: execs not yet followed by the new image's start or a failure
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "R":
            off, _, length = rest.partition(" ")
            ranges.append((int(off), int(length)))
        elif kind == "W":
            wrote = True
        elif kind == "U":
            why = why or rest
        elif kind in ("C", "E", "F", "S", "D"):
            pid, _, tag = rest.partition(" ")
            named.add(pid)
            if kind == "C":
                roots += tag == "root"
                execs[pid] = max(0, execs.get(pid, 0) - 1)
                exited.discard(pid)
            elif kind == "E":
                execs[pid] = execs.get(pid, 0) + 1
            elif kind == "F":
                execs[pid] = max(0, execs.get(pid, 0) - 1)
            elif kind == "D":
                exited.add(pid)
        elif line:
            why = why or f"an unreadable trace line {line[:40]!r}"
    if not why:
        if roots != 1:
            why = "the command did not start with the shim (a static binary?)"
        elif unaccounted := sorted(named - exited, key=int):
            why = f"process {unaccounted[0]} ran without the shim or did not exit"
        elif pending := [p for p, n in execs.items() if n]:
            why = f"process {pending[0]} exec'd a program without the shim"
    return Trace(merge(ranges), not why, wrote, why)


def merge(ranges: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[list[int]] = []
    for off, length in sorted(ranges):
        if length <= 0:
            continue
        if out and off <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], off + length - out[-1][0])
        else:
            out.append([off, length])
    return tuple((a, b) for a, b in out)


def contents(image: str | os.PathLike[str], reads: Sequence[tuple[int, int]]) -> bytes:
    """The image's size and its bytes at `reads`: all a command that read only those saw. Kept
    whole, not hashed: comparing two copies is ten times quicker than hashing one (measured)."""
    with open(image, "rb") as f:
        fd = f.fileno()
        parts = [os.fstat(fd).st_size.to_bytes(8, "little")]
        parts += (os.pread(fd, length, off) for off, length in reads)
    return b"".join(parts)


def library() -> Path | None:
    """The shim, compiled on first use into the cache (by a hash of its source and the compiler);
    None where there is no compiler or the build fails (`unavailable()` says why)."""
    built = _build()
    return built if isinstance(built, Path) else None


def unavailable() -> str:
    """Why reads cannot be traced here ("" when they can)."""
    built = _build()
    return built if isinstance(built, str) else ""


@functools.cache
def _build() -> Path | str:
    """The shim's path, or why there is none."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        return "no C compiler (gcc)"
    version = proc.run([gcc, "--version"], 30).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + version).hexdigest()[:16]
    dest = cache_root() / f"readtrace-{key}.so"
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".readtrace-", suffix=".so", dir=dest.parent)
    os.close(fd)
    try:
        done = proc.run([gcc, "-O2", "-shared", "-fPIC", "-o", tmp, str(SOURCE), "-ldl"], BUILD_TIMEOUT_S)
        if done.returncode != 0:
            first = (done.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[0]
            return f"the shim did not build: {first[:200]}"
        os.replace(tmp, dest)  # another process building the same source renames the same bytes
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return dest


@contextlib.contextmanager
def tracing(image: Path, workdir: str | os.PathLike[str]) -> Iterator[tuple[dict[str, str], Path]]:
    """The environment that has a command's reads of `image` traced, and the log they go to
    (removed after)."""
    lib = library()
    assert lib is not None
    fd, log = tempfile.mkstemp(prefix=".reads-", dir=workdir)
    os.close(fd)
    os.unlink(log)  # the shim creates it: a log that never appears means the shim never ran
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(filter(None, [str(lib), env.get("LD_PRELOAD", "")]))
    env.update(CRASHLAB_TRACE_FILE=str(image), CRASHLAB_TRACE_LOG=log, CRASHLAB_TRACE_ROOT="1")
    try:
        yield env, Path(log)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(log)


def read_log(log: Path) -> Trace:
    try:
        return parse(log.read_text(errors="replace"))
    except FileNotFoundError:
        return Trace((), False, False, "the shim wrote nothing (a static binary?)")


@dataclass
class _Seen(Generic[V]):
    reads: tuple[tuple[int, int], ...]
    seen: bytes  # what the command read, as `contents` gives it
    value: V
    state_id: str


class SameReads(Generic[V]):
    """Verdicts of earlier runs, each with the bytes its command read; a state whose bytes there
    are the same gets the verdict back. One per worker: its states come in `stable` order, so
    neighbours, which share the most, meet."""

    def __init__(self, keep: int = KEEP) -> None:
        self._seen: deque[_Seen[V]] = deque(maxlen=keep)
        self.hits = 0

    def lookup(self, image: str | os.PathLike[str]) -> tuple[V, str] | None:
        """(verdict, the state it came from), or None."""
        for k, seen in enumerate(self._seen):
            if contents(image, seen.reads) == seen.seen:
                if k:  # the most recent hit first next time
                    del self._seen[k]
                    self._seen.appendleft(seen)
                self.hits += 1
                return seen.value, seen.state_id
        return None

    def add(self, image: str | os.PathLike[str], trace: Trace, value: V, state_id: str) -> None:
        if trace.reusable and sum(n for _, n in trace.reads) <= MAX_KEPT:
            self._seen.appendleft(_Seen(trace.reads, contents(image, trace.reads), value, state_id))

