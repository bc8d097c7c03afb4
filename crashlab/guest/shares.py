"""What a guest may see of the host: a read-only view of named host paths, and one results directory.

A checker guest mounts crash images, and a crash image is untrusted input: a kernel it compromises
must not reach the host. The guest's `mount -o ro` protects nothing (the guest can remount), so the
protection is at the daemon's side. A `HostView` exports only the paths the guest needs (the host's
/usr, a short list of /etc files, the Python interpreter, the venv and the project), each at its own
path and each a read-only bind mount, assembled in a mount namespace private to its virtiofsd: a write
from the guest meets EROFS in the host kernel, and the view vanishes with the daemon, so nothing is
left mounted on the host whatever happens to crashlab. A `ResultsShare` is the one writable export:
the run's own output directory.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import crashlab

PROJECT = Path(crashlab.__file__).resolve().parent.parent
# /etc files the guest's tools read (loader cache, mke2fs defaults, user names for Python and
# sqlite). Not /etc as a whole: it holds the host's secrets (shadow, ssh keys).
ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "mke2fs.conf", "passwd", "group",
             "nsswitch.conf", "localtime", "alternatives")
# Merged-/usr links (or, on an older layout, directories) that binaries and the loader expect.
ROOT_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
# Mount points the guest's /init mounts over (proc, sysfs, devtmpfs, a tmpfs for scratch space).
MOUNT_POINTS = ("proc", "sys", "dev", "run", "tmp")


class ShareError(ValueError):
    """A share that cannot be exported as asked."""


@dataclass(frozen=True)
class ResultsShare:
    """A host directory the guest may write: the run's results and nothing else."""

    tag: str
    directory: Path
    cache: str = "none"  # virtiofsd -o cache=: "none" makes guest writes reach the host file at once

    def daemon_argv(self, virtiofsd: str, socket: Path, scratch: Path) -> list[str]:
        return [virtiofsd, f"--socket-path={socket}", "-o", f"source={self.directory}",
                "-o", "sandbox=chroot", "-o", f"cache={self.cache}"]


@dataclass(frozen=True)
class HostView:
    """Host paths exported read-only, each at its own path in the guest."""

    tag: str
    paths: tuple[Path, ...]
    cache: str = "auto"

    def daemon_argv(self, virtiofsd: str, socket: Path, scratch: Path) -> list[str]:
        root = scratch / f"view-{self.tag}"
        root.mkdir(parents=True, exist_ok=True)
        script = view_script(root, self.paths) + "\nexec " + shlex.join(
            [virtiofsd, f"--socket-path={socket}", "-o", f"source={root}", "-o", "sandbox=chroot",
             "-o", f"cache={self.cache}"])
        # The mounts live in the daemon's own namespace: private propagation keeps them off the host.
        return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-ec", script]


Share = ResultsShare | HostView


def minimal_paths(paths: Iterable[Path]) -> list[Path]:
    """Absolute, resolved, without duplicates or paths already under another one (pure)."""
    resolved = sorted({Path(os.path.abspath(p)) for p in paths}, key=lambda p: (len(p.parts), str(p)))
    kept: list[Path] = []
    for p in resolved:
        if p == Path("/"):
            raise ShareError("refusing to export the host's whole root filesystem to a guest")
        if not any(p.is_relative_to(k) for k in kept):
            kept.append(p)
    return sorted(kept)


def view_script(root: Path, paths: Sequence[Path]) -> str:
    """The shell that builds the view under `root` (pure: tests read it).

    A tmpfs root with the mount points and merged-/usr links, then one read-only bind per path
    (a file or a directory), then the tmpfs itself made read-only.
    """
    q = shlex.quote
    lines = [f"mount -t tmpfs -o mode=0755 crashlab-view {q(str(root))}"]
    for d in MOUNT_POINTS:
        lines.append(f"mkdir -p {q(str(root / d))}")
    for name in ROOT_LINKS:
        link = Path("/") / name
        if link.is_symlink():
            lines.append(f"ln -s {q(os.readlink(link))} {q(str(root / name))}")
    for p in minimal_paths(paths):
        target = root / p.relative_to("/")
        dest = q(str(target))
        make = f"mkdir -p {dest}" if p.is_dir() else f"mkdir -p {q(str(target.parent))} && : > {dest}"
        lines.append(f"{make} && mount --bind {q(str(p))} {dest} && mount -o remount,bind,ro {dest}")
    lines.append(f"mount -o remount,ro {q(str(root))}")
    return "\n".join(lines)


def guest_root_paths(extra: Iterable[Path] = ()) -> tuple[Path, ...]:
    """What a guest running the host's Python and tools needs to see, plus `extra`: existing paths."""
    wanted = [Path("/usr"), *(Path("/etc") / f for f in ETC_FILES),
              Path(sys.base_prefix), Path(sys.prefix), Path(os.path.realpath(sys.executable)).parent,
              PROJECT, *extra]
    wanted += [Path("/") / n for n in ROOT_LINKS if os.path.isdir(f"/{n}") and not os.path.islink(f"/{n}")]
    return tuple(minimal_paths(p for p in wanted if os.path.lexists(p)))


def host_view(tag: str = "hostroot", extra: Iterable[Path] = ()) -> HostView:
    return HostView(tag, guest_root_paths(extra))


def visible_in(view: HostView, path: Path) -> bool:
    """Whether the guest reads this host file at the same path through `view`."""
    p = Path(os.path.abspath(path))
    return p.exists() and any(p.is_relative_to(v) for v in view.paths)
