"""ext2/3/4 crash images judged with no kernel mount: the oracle reads the image through debugfs.

libext2fs in a userspace process is the only code that parses the untrusted image, so this path is
safe on any host and needs no checker guest. The runner has already replayed the journal
(`e2fsck -E journal_only`), so what debugfs reads is the recovered filesystem, the same bytes a
read-only `noload` mount would read.

One `debugfs -f` run per image fetches exactly what the oracle will look at
(`Promises.reads`): a parseable listing (`ls -p`) of each parent directory, a `dump` of each path
and an `ea_get` of each promised xattr. Those answers become an `ImageTree`, an in-memory
`oracle.Tree`, and the oracle runs on it unchanged. A callable oracle (crashlab API users) needs a
real directory: it gets the whole tree by `rdump`.

Where this path and a kernel mount can disagree (measured in tests/test_userspace_agreement.py):
the kernel refuses some images debugfs opens, and a file the kernel cannot read in full is short or
absent on the mount path's copy but unreadable here; both are violations either way.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from crashlab import rundir
from crashlab.check.mounts import (
    MNT_EX_FAIL,
    MOUNT_TIMEOUT,
    MountRequest,
    MountSteps,
    OracleSpec,
    cached_promises,
    oracle_failure,
    run_oracle,
)
from crashlab.check.outcome import ToolRun
from crashlab.check.tools import run_tool
from crashlab.filesystems import USERSPACE_READABLE
from crashlab.oracle import Stat

ECHO = "debugfs: "  # debugfs -f echoes each command on stdout before its output
# What debugfs says on stderr when libext2fs cannot open the image at all: no kernel would mount it.
OPEN_FAILED = "while trying to open"


@dataclass
class ImageTree:
    """What debugfs found: the `oracle.Tree` of one image, answered from memory."""

    entries: dict[str, Stat] = field(default_factory=dict)
    contents: dict[str, bytes] = field(default_factory=dict)  # regular files read in full
    xattrs: dict[tuple[str, str], bytes] = field(default_factory=dict)

    def lstat(self, rel: str) -> Stat | None:
        return self.entries.get(_norm(rel))

    def read(self, rel: str) -> bytes:
        try:
            return self.contents[_norm(rel)]
        except KeyError:  # listed as a regular file, but debugfs could not read all of it
            raise OSError(errno.EIO, os.strerror(errno.EIO), rel) from None

    def getxattr(self, rel: str, name: str) -> bytes:
        try:
            return self.xattrs[(_norm(rel), name)]
        except KeyError:
            raise OSError(errno.ENODATA, os.strerror(errno.ENODATA), rel) from None


def _norm(rel: str) -> str:
    return posixpath.normpath(rel).lstrip("/")


def _quote(path: str) -> str:
    """A debugfs argument: its parser takes double quotes; a path with one cannot be asked for."""
    if '"' in path or "\n" in path:
        raise ValueError(f"path {path!r} cannot be passed to debugfs")
    return f'"{path}"'


@dataclass(frozen=True)
class Script:
    """One debugfs run: the commands, and where each dump lands (pure, so it is testable)."""

    text: str
    parents: tuple[str, ...]  # listed with `ls -p`, in command order
    dumps: dict[str, str]  # path -> file name in the output directory
    attrs: dict[tuple[str, str], str]  # (path, xattr) -> file name


def script(paths: Sequence[str], attrs: Sequence[tuple[str, str]]) -> Script:
    rels = sorted({_norm(p) for p in paths} - {"", "."})
    parents = tuple(sorted({posixpath.dirname(r) for r in rels}))
    lines = [f"ls -p {_quote('/' + d)}" for d in parents]
    dumps = {r: f"f{n}" for n, r in enumerate(rels)}
    lines += [f"dump {_quote('/' + r)} {dumps[r]}" for r in rels]
    names = {(_norm(p), a): f"x{n}" for n, (p, a) in enumerate(sorted(set(attrs)))}
    lines += [f"ea_get -f {out} {_quote('/' + p)} {_quote(a)}" for (p, a), out in names.items()]
    return Script("\n".join(lines) + "\n", parents, dumps, names)


def parse_listings(stdout: str, parents: Sequence[str]) -> dict[str, Stat]:
    """Entries by relative path from the `ls -p` blocks of a debugfs -f run, in command order.

    A block is what follows its echoed command; a parent that is missing or not a directory lists
    nothing, so its children are not there, as lstat would say (ENOENT or ENOTDIR)."""
    blocks: list[list[str]] = []
    for line in stdout.splitlines():
        if line.startswith(ECHO):
            blocks.append([])
        elif blocks:
            blocks[-1].append(line)
    entries: dict[str, Stat] = {}
    for parent, block in zip(parents, blocks, strict=False):
        for line in block:
            # /inode/mode/uid/gid/name/size/: a name has no '/', so the fields split cleanly.
            fields = line.split("/")
            if len(fields) != 8 or fields[0] or fields[7] or fields[5] in (".", ".."):
                continue
            try:
                mode, size = int(fields[2], 8), int(fields[6] or 0)
            except ValueError:
                continue
            entries[posixpath.join(parent, fields[5])] = Stat(mode, size)
    return entries


def read_tree(image: Path, paths: Sequence[str], attrs: Sequence[tuple[str, str]],
              timeout: float = MOUNT_TIMEOUT, scratch: Path | None = None) -> tuple[ImageTree, ToolRun]:
    """The oracle's view of `image`, and the debugfs run (rc 32, like a refused mount, when
    libext2fs could not open the image). debugfs writes into `scratch`, emptied of its files
    after; by default into a directory of its own."""
    sc = script(paths, attrs)
    if scratch is None:
        with tempfile.TemporaryDirectory(prefix="crashlab-debugfs-", dir=rundir.tmpfs()) as tmp:
            return _read_tree(image, sc, Path(tmp), timeout)
    try:
        return _read_tree(image, sc, scratch, timeout)
    finally:
        for name in (COMMANDS, *sc.dumps.values(), *sc.attrs.values()):
            (scratch / name).unlink(missing_ok=True)


COMMANDS = "commands"


def _read_tree(image: Path, sc: Script, out_dir: Path, timeout: float) -> tuple[ImageTree, ToolRun]:
    tree = ImageTree()
    cmds = out_dir / COMMANDS
    cmds.write_text(sc.text)
    # cwd is the output directory: dump and ea_get write relative names, so no host path
    # longer than a name is in the script, and none outside it can be written.
    run = _debugfs(["-f", str(cmds), str(image.resolve())], timeout, cwd=str(out_dir))
    run.argv = ["debugfs", "-f", "<oracle reads>", str(image)]
    if run.rc != 0:
        return tree, run
    tree.entries = parse_listings(run.stdout, sc.parents)
    for rel, name in sc.dumps.items():
        st = tree.entries.get(rel)
        out = out_dir / name
        if st is None or not stat.S_ISREG(st.st_mode) or not out.is_file():
            continue
        data = out.read_bytes()
        if len(data) == st.st_size:  # shorter: a read error part way through
            tree.contents[rel] = data
    for key, name in sc.attrs.items():
        out = out_dir / name
        if out.is_file():
            tree.xattrs[key] = out.read_bytes()
    run.stdout = ""  # the listing is in the record as the oracle's verdict, not as text
    return tree, run


def _debugfs(args: list[str], timeout: float, cwd: str | None = None) -> ToolRun:
    """debugfs exits 0 even when libext2fs cannot open the image: that is a refused mount."""
    run = run_tool(["debugfs", *args], timeout, cwd=cwd)
    if OPEN_FAILED in run.stderr and run.rc == 0:
        run.rc = MNT_EX_FAIL
    return run


class UserspaceMounts:
    """A `MountBackend` for ext2/3/4 that never mounts: the oracle reads the image through debugfs.

    It cannot recover by mounting (the runner replays the journal with e2fsck for these
    filesystems); a request that asks it to is answered as a checker error, not guessed."""

    name = "userspace"

    def __init__(self, scratch: Path | None = None) -> None:
        self.scratch = scratch  # where debugfs writes what it reads; None: a directory per image

    def mount_batch(self, requests: Sequence[MountRequest], timeout: float = MOUNT_TIMEOUT
                    ) -> list[MountSteps]:
        return [self.steps(r, timeout) for r in requests]

    def steps(self, req: MountRequest, timeout: float) -> MountSteps:
        steps = MountSteps()
        if req.fs not in USERSPACE_READABLE or req.recover:
            why = (f"the userspace checker reads only {', '.join(sorted(USERSPACE_READABLE))}"
                   if req.fs not in USERSPACE_READABLE
                   else "the userspace checker cannot recover by mounting")
            run = ToolRun(argv=["userspace", req.fs, str(req.image)], error=why, stderr=why + "\n")
            if req.recover:
                steps.recovery = run
            else:
                steps.tree = run
            return steps
        t0 = time.monotonic()
        if req.oracle is not None:
            steps.tree = self._oracle(req.image, req.oracle, steps, timeout)
        elif req.tree_dest is not None:
            req.tree_dest.mkdir(parents=True, exist_ok=True)
            steps.tree = _debugfs(["-R", f"rdump / {_quote(str(req.tree_dest))}", str(req.image)], timeout)
        steps.timings["tree"] = time.monotonic() - t0
        return steps

    def _oracle(self, image: Path, spec: OracleSpec, steps: MountSteps, timeout: float) -> ToolRun:
        try:
            promises = cached_promises(spec.promises)
        except Exception as e:
            steps.violations, steps.oracle_error = [], oracle_failure(e)
            return ToolRun(argv=["oracle", str(spec.promises)], rc=0)
        paths, attrs = promises.reads(spec.present)
        tree, run = read_tree(image, sorted(paths), sorted(attrs), timeout, self.scratch)
        if run.rc == 0:
            t0 = time.monotonic()
            steps.violations, steps.oracle_error = run_oracle(tree, spec)
            steps.timings["oracle"] = time.monotonic() - t0
        return run
