"""Bounded random operation sequences (ACE-style), their model, executor, reproducers and shrinking.

An `Op` is one syscall-level operation on a small fixed namespace of files and directories. Three
things consume a sequence:

- `Model`: a pure in-memory model of the tree and of what is durable under POSIX rules (fsync of a
  file makes its data and metadata durable; fsync of a directory makes its entries durable; sync
  makes everything durable). It decides which ops are valid (invalid ones are skipped, so any list
  of ops is a workload and shrinking never breaks one) and, at each durability point, which promises
  (crashlab.oracle) hold: exact content where data and every name on the path are durable, `exists`
  where only the name is, `any` where the name is not durable yet.
- `execute`: runs the valid ops on a real directory through the `op_*` functions below, calling
  `ctx.durable` after each fsync/fdatasync/sync with the model's promises.
- `render_script`: a standalone stdlib script that makes exactly the same syscalls, by embedding the
  source of the same `op_*` functions: the reproducer cannot drift from what was tested.

`random_ops` draws sequences from a `random.Random` (no hypothesis: it runs in the guest);
`op_sequences` is the hypothesis strategy and `find_failing` finds and shrinks a sequence for which a
predicate ("this still corrupts") holds. Hypothesis is imported lazily for the same reason.

The model is POSIX-strict: it does not promise that fsync of a new file makes its name durable, which
ext4, XFS and btrfs do in practice; a Linux-semantics mode would find more bugs and is not here yet.
"""

from __future__ import annotations

import inspect
import json
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from crashlab import oracle

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

Promise = dict[str, Any]

KINDS = ("creat", "write", "falloc", "truncate", "link", "rename", "unlink", "mkdir", "rmdir",
         "setxattr", "removexattr", "fsync", "fdatasync", "sync")
DURABILITY = frozenset({"fsync", "fdatasync", "sync"})
XATTRS = ("user.a", "user.b")
XATTR_SIZE = 16


@dataclass(frozen=True)
class Namespace:
    """The paths a sequence may name: few enough that ops collide, as in ACE's bounded workloads."""

    dirs: tuple[str, ...]
    files: tuple[str, ...]
    offsets: tuple[int, ...] = (0, 1000, 4096, 8000, 16384)
    sizes: tuple[int, ...] = (1, 512, 4096, 5000, 32768)


ACE = Namespace(dirs=("A", "B", "A/C"), files=("foo", "bar", "A/foo", "A/bar", "B/foo", "A/C/foo"))


@dataclass(frozen=True)
class Op:
    kind: str
    path: str = ""
    dest: str = ""  # link/rename target
    off: int = 0
    size: int = 0
    fill: int = 0  # write: the byte written; setxattr: the value's byte
    xattr: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown op kind {self.kind!r}")

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v != _DEFAULTS.get(k)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Op:
        return cls(**d)

    def __str__(self) -> str:
        return f"{self.kind}({', '.join(repr(a) for a in call_args(self))})"


_DEFAULTS = {f.name: f.default for f in fields(Op)}


def dumps(ops: Sequence[Op]) -> str:
    return json.dumps([op.to_json() for op in ops])


def loads(text: str) -> list[Op]:
    return [Op.from_json(d) for d in json.loads(text)]


# -- the syscalls: executed by `execute`, embedded verbatim by `render_script` -----------------

def op_creat(root: str, path: str) -> None:
    os.close(os.open(os.path.join(root, path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))


def op_write(root: str, path: str, off: int, size: int, fill: int) -> None:
    fd = os.open(os.path.join(root, path), os.O_WRONLY)
    try:
        os.pwrite(fd, bytes([fill]) * size, off)
    finally:
        os.close(fd)


def op_falloc(root: str, path: str, off: int, size: int) -> None:
    fd = os.open(os.path.join(root, path), os.O_WRONLY)
    try:
        os.posix_fallocate(fd, off, size)
    finally:
        os.close(fd)


def op_truncate(root: str, path: str, size: int) -> None:
    os.truncate(os.path.join(root, path), size)


def op_link(root: str, path: str, dest: str) -> None:
    os.link(os.path.join(root, path), os.path.join(root, dest))


def op_rename(root: str, path: str, dest: str) -> None:
    os.rename(os.path.join(root, path), os.path.join(root, dest))


def op_unlink(root: str, path: str) -> None:
    os.unlink(os.path.join(root, path))


def op_mkdir(root: str, path: str) -> None:
    os.mkdir(os.path.join(root, path))


def op_rmdir(root: str, path: str) -> None:
    os.rmdir(os.path.join(root, path))


def op_setxattr(root: str, path: str, xattr: str, fill: int) -> None:
    os.setxattr(os.path.join(root, path), xattr, bytes([fill]) * 16)


def op_removexattr(root: str, path: str, xattr: str) -> None:
    os.removexattr(os.path.join(root, path), xattr)


def op_fsync(root: str, path: str) -> None:
    fd = os.open(os.path.join(root, path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def op_fdatasync(root: str, path: str) -> None:
    fd = os.open(os.path.join(root, path), os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def op_sync(root: str) -> None:
    os.sync()


_ARGS: dict[str, tuple[str, ...]] = {
    "creat": ("path",), "write": ("path", "off", "size", "fill"), "falloc": ("path", "off", "size"),
    "truncate": ("path", "size"), "link": ("path", "dest"), "rename": ("path", "dest"),
    "unlink": ("path",), "mkdir": ("path",), "rmdir": ("path",), "setxattr": ("path", "xattr", "fill"),
    "removexattr": ("path", "xattr"), "fsync": ("path",), "fdatasync": ("path",), "sync": (),
}


def _impl(kind: str) -> Callable[..., None]:
    return globals()[f"op_{kind}"]  # type: ignore[no-any-return]


def call_args(op: Op) -> tuple[Any, ...]:
    return tuple(getattr(op, a) for a in _ARGS[op.kind])


# -- the model ---------------------------------------------------------------------------------

def parent(path: str) -> str:
    return path.rpartition("/")[0]


def _lineage(path: str) -> list[str]:
    """`path` and its ancestors, root excluded: the entries that must all be durable for it."""
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top + "/")


@dataclass
class Inode:
    data: bytearray = field(default_factory=bytearray)
    xattrs: dict[str, bytes] = field(default_factory=dict)
    data_dirty: bool = True  # content or size changed since the last fsync/fdatasync
    meta_dirty: bool = True  # xattrs changed since the last fsync


class Model:
    def __init__(self) -> None:
        self.nodes: dict[str, int | None] = {"": None}  # path -> inode number; None: a directory
        self.inodes: dict[int, Inode] = {}
        self.dirty: set[str] = set()  # entries changed since their parent directory was last synced
        self.known: set[str] = set()  # every path that ever existed: the ones with promises
        self.emitted: dict[str, Promise] = {}
        # Since the last point: how often each path's entry changed, and whose content changed.
        self.entry_changes: dict[str, int] = {}
        self.content_changed: set[str] = set()

    # queries
    def is_dir(self, path: str) -> bool:
        return path in self.nodes and self.nodes[path] is None

    def is_file(self, path: str) -> bool:
        return self.nodes.get(path) is not None

    def inode(self, path: str) -> Inode:
        ino = self.nodes[path]
        assert ino is not None
        return self.inodes[ino]

    def _parent_ok(self, path: str) -> bool:
        return path != "" and self.is_dir(parent(path))

    def valid(self, op: Op) -> bool:
        k, p, q = op.kind, op.path, op.dest
        if k == "sync":
            return True
        if k == "creat":
            return self._parent_ok(p) and not self.is_dir(p)
        if k in ("write", "falloc"):
            return self.is_file(p) and op.size > 0
        if k in ("truncate", "unlink", "fdatasync"):
            return self.is_file(p)
        if k == "setxattr":
            return self.is_file(p) and op.xattr in XATTRS
        if k == "removexattr":
            return self.is_file(p) and op.xattr in self.inode(p).xattrs
        if k == "link":
            return self.is_file(p) and self._parent_ok(q) and q not in self.nodes
        if k == "rename":
            if p == "" or p not in self.nodes or not self._parent_ok(q) or p == q:
                return False
            if self.is_file(p):  # over nothing or over another file (not a link to the same inode)
                return q not in self.nodes or (self.is_file(q) and self.nodes[q] != self.nodes[p])
            return q not in self.nodes and not _under(q, p)
        if k == "mkdir":
            return self._parent_ok(p) and p not in self.nodes
        if k == "rmdir":
            return p != "" and self.is_dir(p) and not any(parent(n) == p for n in self.nodes if n)
        if k == "fsync":
            return p in self.nodes
        raise AssertionError(k)

    # updates
    def _entry(self, *paths: str) -> None:
        for path in paths:
            self.dirty.add(path)
            self.known.add(path)
            self.entry_changes[path] = self.entry_changes.get(path, 0) + 1

    def _content(self, ino: int) -> None:
        self.content_changed.update(p for p, i in self.nodes.items() if i == ino)

    def apply(self, op: Op) -> None:
        """Apply a valid op to the model (check `valid` first)."""
        k, p, q = op.kind, op.path, op.dest
        if k == "creat":
            if p in self.nodes:
                ino = self.nodes[p]
                assert ino is not None
                self.inodes[ino].data.clear()
                self.inodes[ino].data_dirty = True
                self._content(ino)
            else:
                ino = max(self.inodes, default=0) + 1
                self.inodes[ino] = Inode()
                self.nodes[p] = ino
                self._entry(p)
        elif k in ("write", "falloc", "truncate"):
            node = self.inode(p)
            end = op.off + op.size
            if k == "write":
                node.data[len(node.data):] = bytes(max(0, op.off - len(node.data)))
                node.data[op.off:end] = bytes([op.fill]) * op.size
            elif k == "falloc":
                node.data.extend(bytes(max(0, end - len(node.data))))
            else:
                del node.data[op.size:]
                node.data.extend(bytes(op.size - len(node.data)))
            node.data_dirty = True
            self._content(self.nodes[p])  # type: ignore[arg-type]
        elif k in ("setxattr", "removexattr"):
            node = self.inode(p)
            if k == "setxattr":
                node.xattrs[op.xattr] = bytes([op.fill]) * XATTR_SIZE
            else:
                del node.xattrs[op.xattr]
            node.meta_dirty = True
            self._content(self.nodes[p])  # type: ignore[arg-type]
        elif k == "link":
            self.nodes[q] = self.nodes[p]
            self._entry(q)
            if p in self.content_changed:
                self.content_changed.add(q)
        elif k == "rename":
            moved = sorted(n for n in self.nodes if _under(n, p))
            for old in moved:
                new = q + old[len(p):]
                self.nodes[new] = self.nodes.pop(old)
                self.known.add(new)
                for path in (old, new):
                    self.entry_changes[path] = self.entry_changes.get(path, 0) + 1
                if old in self.content_changed:
                    self.content_changed.add(new)
            # Entries inside a moved directory live in its inode: their durability moves with it,
            # and only the two names in the parents change.
            inner = {d for d in self.dirty if _under(d, p) and d != p}
            self.dirty = (self.dirty - inner) | {q + d[len(p):] for d in inner} | {p, q}
        elif k in ("unlink", "rmdir"):
            del self.nodes[p]
            self._entry(p)
        elif k == "mkdir":
            self.nodes[p] = None
            self._entry(p)
        elif k == "fsync":
            if self.is_dir(p):
                self.dirty = {d for d in self.dirty if parent(d) != p}
            else:
                self.inode(p).data_dirty = self.inode(p).meta_dirty = False
        elif k == "fdatasync":
            self.inode(p).data_dirty = False
        elif k == "sync":
            self.dirty.clear()
            for node in self.inodes.values():
                node.data_dirty = node.meta_dirty = False
        else:
            raise AssertionError(k)

    # promises
    def promise(self, path: str) -> Promise:
        """What is durable about `path` now."""
        if any(a in self.dirty for a in _lineage(path)):
            return oracle.anything(path)
        if path not in self.nodes:
            return oracle.absent(path)
        if self.is_dir(path):
            return oracle.exists(path, "dir")
        node = self.inode(path)
        if node.data_dirty:
            return oracle.exists(path, "file")
        return oracle.file_state(path, bytes(node.data), None if node.meta_dirty else node.xattrs)

    def point(self) -> list[Promise]:
        """The promises to make at a durability point: every path whose promise changed or that was
        touched since the last point (see crashlab.oracle for why the touched ones must be repeated).
        A path whose content changed, or whose entry changed more than once, may have passed through
        states the promise does not describe: it is marked torn."""
        out = []
        touched = self.content_changed | set(self.entry_changes)
        for path in sorted(self.known):
            p = self.promise(path)
            if path not in self.emitted and p["kind"] in ("any", "absent"):
                continue  # never promised anything: nothing to supersede
            if path in self.content_changed or self.entry_changes.get(path, 0) > 1:
                p["torn"] = True
            if p != self.emitted.get(path) or path in touched:
                out.append(p)
                self.emitted[path] = p
        self.entry_changes.clear()
        self.content_changed.clear()
        return out


def normalize(ops: Iterable[Op]) -> list[Op]:
    """The ops of `ops` that are valid in sequence: what actually runs."""
    model, out = Model(), []
    for op in ops:
        if model.valid(op):
            model.apply(op)
            out.append(op)
    return out


# -- running -------------------------------------------------------------------------------------

class Durable(Protocol):
    def durable(self, name: str, promises: Sequence[Promise] = ...) -> int: ...


def execute(ops: Iterable[Op], root: Path | None, ctx: Durable,
            after_op: Callable[[int, Op], None] | None = None) -> list[Op]:
    """Run the valid ops under `root`, a durability point after each fsync/fdatasync/sync. A final
    point without durability (`ops-end`) releases what the last ops changed, so crash states after
    the last real point still have a next point. Returns the ops that ran. With `root` None, only
    the model runs (a dry run)."""
    model, ran = Model(), []
    for op in ops:
        if not model.valid(op):
            continue
        if root is not None:
            _impl(op.kind)(str(root), *call_args(op))
        model.apply(op)
        ran.append(op)
        if op.kind in DURABILITY:
            ctx.durable(_point_name(len(ran) - 1, op), model.point())
        if after_op is not None:
            after_op(len(ran) - 1, op)
    if model.entry_changes or model.content_changed:
        ctx.durable("ops-end", model.point())
    return ran


@dataclass
class Plan:
    """A `Durable` that only collects: `execute(ops, None, Plan())` is a dry run."""

    points: list[tuple[str, list[Promise]]] = field(default_factory=list)

    def durable(self, name: str, promises: Sequence[Promise] = ()) -> int:
        self.points.append((name, list(promises)))
        return len(self.points) - 1


def plan(ops: Iterable[Op]) -> list[tuple[str, list[Promise]]]:
    """The points and promises `execute(ops)` makes, without touching a filesystem."""
    sink = Plan()
    execute(ops, None, sink)
    return sink.points


def _point_name(index: int, op: Op) -> str:
    return f"{index}:{op}"[:200]


def render_script(ops: Sequence[Op], title: str = "crashlab reproducer") -> str:
    """A standalone Python script making the same syscalls as `execute(ops)` under argv[1]."""
    ops = normalize(ops)
    used = sorted({op.kind for op in ops})
    lines = [
        "#!/usr/bin/env python3",
        f'"""{title}: {len(ops)} operations. Usage: python3 THIS_SCRIPT DIR (an empty directory)."""',
        "",
        "import os",
        "import sys",
        "",
    ]
    for kind in used:
        lines += ["", inspect.getsource(_impl(kind)).rstrip(), ""]
    lines += ["", "ROOT = sys.argv[1]"]
    for op in ops:
        args = ", ".join(repr(a) for a in call_args(op))
        lines.append(f"op_{op.kind}(ROOT{', ' if args else ''}{args})")
        if op.kind in DURABILITY:
            lines.append(f"print({f'durable after {op}'!r}, flush=True)")
    return "\n".join(lines) + "\n"


# -- generating ----------------------------------------------------------------------------------

DEFAULT_WEIGHTS = {"creat": 4, "write": 6, "falloc": 2, "truncate": 2, "link": 2, "rename": 3, "unlink": 2,
            "mkdir": 2, "rmdir": 1, "setxattr": 1, "removexattr": 1, "fsync": 3, "fdatasync": 1,
            "sync": 0.3, "persist": 1}


def _draw(rng: random.Random, ns: Namespace, kind: str, fill: int) -> Op:
    every = ns.files + ns.dirs
    if kind in ("mkdir", "rmdir"):
        return Op(kind, rng.choice(ns.dirs))
    if kind == "rename":
        pool = ns.dirs if rng.random() < 0.25 else ns.files
        return Op(kind, rng.choice(pool), rng.choice(pool))
    if kind == "link":
        return Op(kind, rng.choice(ns.files), rng.choice(ns.files))
    if kind == "fsync":
        return Op(kind, rng.choice((*every, "")))
    if kind in ("setxattr", "removexattr"):
        return Op(kind, rng.choice(ns.files), xattr=rng.choice(XATTRS),
                  fill=fill if kind == "setxattr" else 0)
    if kind == "sync":
        return Op(kind)
    if kind in ("write", "falloc"):
        return Op(kind, rng.choice(ns.files), off=rng.choice(ns.offsets), size=rng.choice(ns.sizes),
                  fill=fill if kind == "write" else 0)
    if kind == "truncate":
        return Op(kind, rng.choice(ns.files), size=rng.choice((0, *ns.offsets[1:], *ns.sizes)))
    return Op(kind, rng.choice(ns.files))


def random_ops(rng: random.Random, n: int, ns: Namespace = ACE, max_points: int | None = None,
               weights: dict[str, float] | None = None) -> list[Op]:
    """About `n` valid ops drawn from `rng` (stdlib only: usable in the guest), at most `max_points`
    of them durability points. Besides the op kinds, `weights` may weigh "persist": what careful
    applications do, fsync a file and then each directory up to the root. Writes get distinct fill
    bytes so stale or misplaced data shows."""
    w = weights or DEFAULT_WEIGHTS
    model, ops = Model(), []
    points = 0

    def take(op: Op) -> bool:
        nonlocal points
        if not model.valid(op) or (op.kind in DURABILITY and max_points is not None and points >= max_points):
            return False
        model.apply(op)
        ops.append(op)
        points += op.kind in DURABILITY
        return True

    while len(ops) < n:
        kind = rng.choices(list(w), list(w.values()))[0]
        if kind == "persist":
            files = sorted(p for p in model.nodes if model.is_file(p))
            if files:
                path = rng.choice(files)
                for target in [path, *reversed(_lineage(parent(path))), ""]:
                    take(Op("fsync", target))
            continue
        # Retry draws until one is valid in the current model; if none is (a write before any
        # creat), create a file so the sequence can go on.
        if not any(take(_draw(rng, ns, kind, 1 + len(ops) % 255)) for _ in range(20)):
            take(Op("creat", rng.choice(ns.files)))
        if max_points is not None and points >= max_points and kind in DURABILITY:
            w = {k: v for k, v in w.items() if k not in DURABILITY and k != "persist"}
    return ops


def op_sequences(ns: Namespace = ACE, max_ops: int = 6) -> SearchStrategy[list[Op]]:
    """Hypothesis strategy for 1..max_ops ops on `ns`; shrinks toward fewer, earlier-listed choices
    (creat and write first, small offsets and sizes)."""
    from hypothesis import strategies as st

    every = ns.files + ns.dirs
    fill = st.integers(1, 255)
    one = st.one_of(
        st.builds(Op, st.just("creat"), st.sampled_from(ns.files)),
        st.builds(Op, st.just("write"), st.sampled_from(ns.files), off=st.sampled_from(ns.offsets),
                  size=st.sampled_from(ns.sizes), fill=fill),
        st.builds(Op, st.just("fsync"), st.sampled_from(("", *every))),
        st.builds(Op, st.just("mkdir"), st.sampled_from(ns.dirs)),
        st.builds(Op, st.just("rename"), st.sampled_from(every), st.sampled_from(every)),
        st.builds(Op, st.just("link"), st.sampled_from(ns.files), st.sampled_from(ns.files)),
        st.builds(Op, st.just("unlink"), st.sampled_from(ns.files)),
        st.builds(Op, st.just("truncate"), st.sampled_from(ns.files),
                  size=st.sampled_from((0, *ns.offsets, *ns.sizes))),
        st.builds(Op, st.just("fdatasync"), st.sampled_from(ns.files)),
        st.builds(Op, st.just("falloc"), st.sampled_from(ns.files), off=st.sampled_from(ns.offsets),
                  size=st.sampled_from(ns.sizes)),
        st.builds(Op, st.just("rmdir"), st.sampled_from(ns.dirs)),
        st.builds(Op, st.just("setxattr"), st.sampled_from(ns.files), xattr=st.sampled_from(XATTRS),
                  fill=fill),
        st.builds(Op, st.just("removexattr"), st.sampled_from(ns.files), xattr=st.sampled_from(XATTRS)),
        st.just(Op("sync")),
    )
    return st.lists(one, min_size=1, max_size=max_ops).map(normalize).filter(bool)


def find_failing(predicate: Callable[[list[Op]], bool], *, ns: Namespace = ACE, max_ops: int = 6,
                 max_examples: int = 200, seed: int = 0) -> list[Op] | None:
    """The smallest op sequence hypothesis finds for which `predicate` holds ("still corrupts"), or
    None. The predicate sees normalized sequences; it may be slow (a guest boot), so max_examples
    bounds the search and hypothesis's own shrinking bounds the rest."""
    from hypothesis import HealthCheck, Phase, find, settings
    from hypothesis.errors import NoSuchExample

    try:
        return find(op_sequences(ns, max_ops), predicate,
                    settings=settings(max_examples=max_examples, database=None, deadline=None,
                                      phases=[Phase.generate, Phase.shrink],
                                      suppress_health_check=list(HealthCheck)),
                    random=random.Random(seed))
    except NoSuchExample:
        return None
