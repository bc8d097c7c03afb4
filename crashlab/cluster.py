"""Where campaign units run: Dask distributed, a cluster on this machine unless a scheduler is named.

    with cluster.connect(None, workers=2) as c:          # a LocalCluster, torn down after
        fut = c.submit(fn, unit, resources={"qemu": 1})
    with cluster.connect("tcp://sched:8786") as c: ...   # a running cluster (`crashlab worker`)

Workers run one unit at a time (one thread each) and declare what they have: `qemu` where a
QEMU binary is found, `kvm` where the KVM probe boots (crashlab.guest.machine.choose_accel). A
unit that boots a guest asks for `qemu`, so a worker without QEMU never gets one.

A recording reaches a worker either through a directory every worker sees at the same path (the
local cluster: the client's own results/recordings; a remote one: `--shared-recordings`), or as a
`Bundle`: the files a check needs, compressed, held by the scheduler as data (recomputable if the
worker holding a copy dies) and cached by digest in each worker's scratch directory, so the many
units of one cell unpack it once per worker. Images are built on the worker, never shipped.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crashlab import rundir

DEFAULT_PORT = 8786
# A unit runs at most three times: two retries after an exception, and as many after the death of
# the worker running it (the scheduler's allowed-failures; a remote scheduler's own config rules).
RETRIES = 2
ALLOWED_FAILURES = 2
CONNECT_TIMEOUT_S = 20.0
CHUNK = 1 << 20


class ClusterError(ValueError):
    """A scheduler address that is malformed or does not answer; one line."""


_ADDRESS = re.compile(r"^(?:(tcp|tls)://)?(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+)(?::(\d{1,5}))?$")


def parse_address(text: str) -> str:
    """`tcp://HOST:PORT` from `tcp://HOST:PORT`, `HOST:PORT` or `HOST` (port 8786)."""
    m = _ADDRESS.match(text.strip())
    if not m or (m.group(3) and not 0 < int(m.group(3)) < 65536):
        raise ClusterError(f"scheduler {text!r}: expected tcp://HOST:PORT")
    return f"{m.group(1) or 'tcp'}://{m.group(2)}:{m.group(3) or DEFAULT_PORT}"


def probe(address: str, timeout: float = 5.0) -> None:
    """Refuse a scheduler that does not answer, before anything is written (a plain TCP connect:
    Dask's client would take its whole timeout and print its own traceback-laden warnings)."""
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ClusterError(f"scheduler {address}: cannot connect: {e.strerror or e}") from None


# --- what a worker has ---------------------------------------------------------------------------

def qemu_available() -> bool:
    from crashlab.guest.machine import find_qemu
    from crashlab.guest.provision import ProvisionError

    try:
        find_qemu()
    except ProvisionError:
        return False
    return True


def kvm_works() -> bool:
    """Whether crashlab's guests boot with KVM here (the probe is cached per host and kernel)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    from crashlab.guest.machine import choose_accel
    from crashlab.guest.provision import ProvisionError, provision

    try:
        guest = provision()
        return choose_accel(guest.kernel, guest.initrd) == "kvm"
    except (ProvisionError, OSError):
        return False


def resources_here() -> dict[str, float]:
    """The resources a worker on this machine declares."""
    if not qemu_available():
        return {}
    return {"qemu": 1, **({"kvm": 1} if kvm_works() else {})}


def resource_args(resources: dict[str, float]) -> list[str]:
    """`dask worker --resources` for `resources` (none: no option)."""
    return ["--resources", ",".join(f"{k}={v:g}" for k, v in sorted(resources.items()))] if resources else []


# --- recordings as bundles ---------------------------------------------------------------------

@dataclass(frozen=True)
class Bundle:
    """A directory's files, compressed: `files` name -> its data extents, zlib-compressed (holes
    stay holes); `holes` name -> the size of a file shipped as its size alone, unpacked as a
    sparse file of that size (a check needs the recording's image size, not its content)."""

    digest: str
    files: dict[str, bytes] = field(repr=False)
    holes: dict[str, int] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(map(len, self.files.values()))


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of the file's data, skipping holes (a recording's image is mostly holes)."""
    out, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                break
            return [(0, size)]  # a filesystem that cannot say where holes are: all of it
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, end - start))
        pos = end
    return out


def _pack_file(path: Path) -> bytes:
    """A sparse file as a little header (size, extents) then the data of each extent, compressed."""
    z = zlib.compressobj(1)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        extents = _data_extents(f.fileno(), size)
        parts = [z.compress(json.dumps({"size": size, "extents": extents}).encode() + b"\n")]
        for start, length in extents:
            f.seek(start)
            while length > 0:
                block = f.read(min(CHUNK, length))
                if not block:
                    break
                parts.append(z.compress(block))
                length -= len(block)
    parts.append(z.flush())
    return b"".join(parts)


def _unpack_file(data: bytes, path: Path) -> None:
    raw = io.BytesIO(zlib.decompress(data))
    header = json.loads(raw.readline())
    with open(path, "wb") as f:
        for start, length in header["extents"]:
            f.seek(start)
            f.write(raw.read(length))
        f.truncate(header["size"])


def pack(directory: Path, names: Iterable[str] | None = None, holes: Iterable[str] = ()) -> Bundle:
    """The named files of `directory` (default: every regular file in it); those in `holes` as
    their size alone. The digest covers names, contents and sizes."""
    directory = Path(directory)
    wanted = sorted(names) if names is not None else sorted(
        p.name for p in directory.iterdir() if p.is_file() and not p.is_symlink())
    hole_set = set(holes)
    h = hashlib.sha256()
    files: dict[str, bytes] = {}
    sizes: dict[str, int] = {}
    for name in wanted:
        path = directory / name
        if name in hole_set:
            sizes[name] = path.stat().st_size
            h.update(f"hole {name} {sizes[name]}\n".encode())
        else:
            files[name] = _pack_file(path)
            h.update(f"file {name} {len(files[name])}\n".encode())
            h.update(files[name])
    return Bundle(h.hexdigest()[:16], files, sizes)


def _plain(name: str) -> str:
    # A bundle names files, never paths: nothing it holds may land outside its directory.
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"bundle: not a plain file name: {name!r}")
    return name


def unpack(bundle: Bundle, dest: Path) -> Path:
    """Write the bundle's files as `dest`, atomically: a partial sibling renamed into place. A
    `dest` that already exists wins (another process unpacked or recorded it first)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        return dest
    tmp = dest.with_name(f"{dest.name}.partial-{rundir.owner_tag()}")  # run_record's naming: reclaimable
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, data in bundle.files.items():
            _unpack_file(data, tmp / _plain(name))
        for name, size in bundle.holes.items():
            with open(tmp / _plain(name), "wb") as f:
                f.truncate(size)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not dest.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def cache_dir() -> Path:
    """Where this worker process keeps the bundles it was sent, by digest (its rundir scratch:
    removed when it exits, reclaimed by the next crashlab command if it is killed)."""
    return rundir.scratch() / "bundles"


def cached(bundle: Bundle, root: Path | None = None) -> Path:
    """The bundle's directory in the worker's cache, unpacked on first use."""
    return unpack(bundle, (root or cache_dir()) / bundle.digest)


# --- the client side ---------------------------------------------------------------------------

@dataclass
class Cluster:
    """A connected client, and the local cluster behind it when it started one."""

    client: Any
    local: Any = None
    shared: Path | None = None  # recordings every worker reads at the same path; None: ship them
    held: dict[str, Any] = field(default_factory=dict)  # bundle digest -> its future
    seen: set[str] = field(default_factory=set)  # resources some worker offers

    @property
    def workers(self) -> int:
        """Units that can run at once: the workers' threads."""
        info = self.client.scheduler_info(n_workers=-1).get("workers", {})
        return max(1, sum(int(w.get("nthreads", 1)) for w in info.values()))

    @property
    def dashboard(self) -> str | None:
        """The dashboard's address, when there is one to see (bokeh installed on this machine, for
        a cluster started here; for a remote one, the scheduler says whether it serves one)."""
        if self.local is not None and importlib.util.find_spec("bokeh") is None:
            return None
        services = self.client.scheduler_info().get("services", {})
        return str(self.client.dashboard_link) if "dashboard" in services else None

    def offered(self, resource: str) -> bool:
        if resource in self.seen:
            return True
        info = self.client.scheduler_info(n_workers=-1).get("workers", {})
        if any(w.get("resources", {}).get(resource, 0) >= 1 for w in info.values()):
            self.seen.add(resource)  # once offered, taken as offered: one query per resource
            return True
        return False

    def lost(self) -> ClusterError | None:
        """Why futures were cancelled under us, when it is the scheduler that went away."""
        if self.client.status in ("running", "connecting"):
            return None
        return ClusterError(f"scheduler {self.client.scheduler.address}: connection lost; rerun the same "
                            "command to resume")

    def submit(self, fn: Callable[..., Any], *args: Any, resources: dict[str, float] | None = None,
               retries: int = RETRIES) -> Any:
        """Run `fn(*args)` on a worker with `resources`; refused at once (ClusterError) when no
        worker offers them, instead of waiting for one forever."""
        missing = [r for r in (resources or {}) if not self.offered(r)]
        if missing:
            raise ClusterError(f"no worker offers {', '.join(missing)}: no qemu-system-x86_64 where the "
                               "workers run (crashlab worker declares it where it finds one)")
        return self.client.submit(fn, *args, resources=resources or None, retries=retries, pure=False)

    def hold(self, bundle: Bundle) -> Any:
        """The bundle as data on the cluster: units that take it get it once per worker. Held as a
        task (not scattered), so the scheduler can send it again when the worker holding it dies."""
        if bundle.digest not in self.held:
            self.held[bundle.digest] = self.client.submit(_identity, bundle, pure=False,
                                                          key=f"recording-{bundle.digest}")
        return self.held[bundle.digest]

    def as_completed(self, futures: Iterable[Any]) -> Any:
        from distributed import as_completed

        return as_completed(futures, loop=self.client.loop)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        if self.local is not None:  # our own workers: their units unwind first (guests, mounts)
            from crashlab.daskworker import interrupt

            with contextlib.suppress(Exception):
                self.client.run(interrupt)
        with contextlib.suppress(Exception):
            self.client.close(timeout=10)
        if self.local is not None:
            with contextlib.suppress(Exception):
                self.local.close(timeout=60)  # workers unwind their units first (daskworker)


def _identity(value: Any) -> Any:
    return value


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    # Workers spawned with SIGINT ignored keep it ignored from their first instruction on (Python
    # installs its KeyboardInterrupt handler only over the default): Ctrl-C is for the client.
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def start_local(workers: int, processes: bool = True, resources: dict[str, float] | None = None) -> Any:
    """A LocalCluster: `workers` worker processes, one thread each, resources as probed here."""
    import dask
    from distributed import LocalCluster

    with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES}), _sigint_ignored():
        return LocalCluster(  # type: ignore[no-untyped-call]
            n_workers=workers, threads_per_worker=1, processes=processes,
            resources=resources_here() if resources is None else resources,
            dashboard_address="127.0.0.1:0", scheduler_port=0, silence_logs=logging.CRITICAL)


@contextlib.contextmanager
def connect(scheduler: str | None = None, workers: int | None = None, *, shared: Path | None = None,
            processes: bool = True, resources: dict[str, float] | None = None) -> Iterator[Cluster]:
    """A client of the named scheduler, or of a LocalCluster of `workers` (default: usable cores)
    started here and torn down on the way out, whatever the way out (an interrupt included)."""
    from distributed import Client

    from crashlab.daskworker import WorkerSetup, quiet

    quiet()
    local = None
    if scheduler is None:
        local = start_local(workers or len(os.sched_getaffinity(0)), processes, resources)
        client = Client(local, set_as_default=False)  # type: ignore[no-untyped-call]
    else:
        address = parse_address(scheduler)
        try:
            client = Client(address, timeout=CONNECT_TIMEOUT_S,  # type: ignore[no-untyped-call]
                            set_as_default=False)
        except (OSError, TimeoutError) as e:
            raise ClusterError(f"scheduler {address}: cannot connect: {str(e).splitlines()[0]}") from None
    c = Cluster(client, local, shared=shared)
    try:
        client.register_plugin(WorkerSetup())
        yield c
    finally:
        c.close()
