"""A storage server: one qemu-storage-daemon exporting one image over NBD from a network namespace.

The guest's disk is then the export, reached over a veth pair (crashlab.netns), and the recording is
taken on the server, under the export:

    image file node (cache.direct)  <-  blklogwrites node (log, cache.no-flush)  <-  NBD export
                                                                                     (writethrough)
    guest QEMU: nbd client node (reconnect-delay, cache.no-flush)  ->  virtio-blk (write-cache)

so the log holds what the server was asked to persist, after the cache mode, and the crash states
built from it are what a storage server losing power could leave: the durability model reads it as
any `qemu` (blklogwrites) log. Each half of the cache mode sits where it acts: the host page cache
(`cache.direct`) and dropped flushes (`cache.no-flush`) on the server, the guest-visible write cache
on the device; `writethrough`/`directsync` also make the export itself write through.

`StorageServer` owns one daemon's life as a context manager, like guest.machine.Machine owns QEMU's:
the daemon dies with this process (PR_SET_PDEATHSIG), `stop` escalates QMP quit -> SIGTERM ->
SIGKILL, and its sockets and log live in a temporary directory removed with it. `kill` and
`restart` are the live faults: a killed daemon's image keeps what it had written (the host's page
cache survives a process), so a kill is a server crash, not a power loss; a restarted daemon serves
the same image at the same address, without the log (the recording ends at the kill).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any

from crashlab import proc
from crashlab.cachemodes import CACHE_MODES, CacheMode
from crashlab.diskmodels import DEFAULT_AIO, DISCARD
from crashlab.guest.machine import NbdClient, _stop
from crashlab.guest.provision import which
from crashlab.netns import Namespace
from crashlab.qmp import FAILURES as qmp_failures
from crashlab.qmp import Monitor

# Where a cell's disk lives: one row per kind of storage, the meaning as the README says it.
STORAGES: dict[str, str] = {
    "local": "a raw file on this host, opened by the guest's QEMU (logged there when recorder=qemu)",
    "nbd": "an NBD export of qemu-storage-daemon in a pyroute2 network namespace, logged on the server",
}
NBD_PORT = 10809  # the namespace is the server's own: the standard port never clashes
EXPORT = "data"
START_S = 15.0


class StorageError(RuntimeError):
    """The storage server could not be started or asked something; one line saying why."""


def storage(name: str) -> str:
    """A storage kind by name, or ValueError naming the valid ones."""
    key = str(name).strip().lower()
    if key not in STORAGES:
        raise ValueError(f"unknown storage {name!r}; valid: {', '.join(STORAGES)}")
    return key


@dataclass(frozen=True)
class Export:
    """What one daemon serves: an image, its cache mode, and optionally a blklogwrites log."""

    image: Path
    cache: CacheMode
    log: Path | None = None  # a fresh file: QEMU does not truncate it
    log_sector_size: int = 512
    name: str = EXPORT
    port: int = NBD_PORT
    # The image file's node options as guest.machine.drive_args sets them on a local disk's: the
    # file is here, so these are the server's (non-default values only).
    aio: str = DEFAULT_AIO
    discard: str = DISCARD[0]


def server_argv(export: Export, address: str, qmp: Path, qsd: str = "qemu-storage-daemon") -> list[str]:
    """The daemon's command line (pure). Options run in order: the QMP socket, last, exists only
    once the export is up, so its appearance is the readiness signal."""
    cache = export.cache.blockdev_cache
    aio = [f"aio={export.aio}"] if export.aio != DEFAULT_AIO else []
    discard = [f"discard={export.discard}"] if export.discard != DISCARD[0] else []
    args = [qsd, "--blockdev", ",".join(["driver=file", "node-name=image", f"filename={_opt(export.image)}",
                                          *(f"{k}={v}" for k, v in cache.items()), *aio, *discard])]
    top = "image"
    if export.log is not None:
        # As guest.machine.drive_args does: the log's own caching is not under test.
        log_cache = CACHE_MODES["writeback"].blockdev_cache
        args += ["--blockdev", ",".join(["driver=file", "node-name=log", f"filename={_opt(export.log)}",
                                         *(f"{k}={v}" for k, v in log_cache.items())])]
        args += ["--blockdev", ",".join(["driver=blklogwrites", "node-name=logged", "file=image", "log=log",
                                         f"log-sector-size={export.log_sector_size}",
                                         f"cache.no-flush={cache['cache.no-flush']}", *discard])]
        top = "logged"
    writethrough = "off" if export.cache.write_cache else "on"
    args += ["--nbd-server", f"addr.type=inet,addr.host={address},addr.port={export.port}",
             "--export", f"type=nbd,id=export,node-name={top},name={export.name},writable=on,"
                         f"writethrough={writethrough}",
             "--chardev", f"socket,id=qmp,path={qmp},server=on,wait=off", "--monitor", "chardev=qmp"]
    return args


def _opt(path: Path) -> str:
    """A path as a QEMU option value: a comma is written twice."""
    return str(path).replace(",", ",,")


def _child() -> None:
    # As guest.machine's children: die with us, and leave Ctrl-C to crashlab, which stops us in order.
    proc.die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StorageServer:
    """One qemu-storage-daemon in `ns`, serving `export`; a context manager.

    PR_SET_PDEATHSIG fires when the *thread* that spawned the daemon ends: a thread that restarts
    it must outlive it (crashlab.netfaults keeps its fault thread until the server is stopped).
    """

    def __init__(self, export: Export, ns: Namespace, qsd: str | None = None) -> None:
        self.export, self.ns = export, ns
        self.qsd = qsd or which("qemu-storage-daemon")
        self.process: subprocess.Popen[bytes] | None = None
        self.qmp: Monitor | None = None
        self.temp_dir: Path | None = None
        self.logging = export.log is not None
        self.events: list[tuple[float, str]] = []  # (monotonic seconds, what), for run.json
        self.starts = 0

    @property
    def address(self) -> str:
        assert self.ns.plan is not None
        return self.ns.plan.ns_addr

    def client(self, reconnect_delay_s: int = 0) -> NbdClient:
        return NbdClient(self.address, self.export.port, self.export.name, reconnect_delay_s)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> StorageServer:
        if self.alive():
            raise StorageError("storage server already running")
        self.temp_dir = self.temp_dir or Path(tempfile.mkdtemp(prefix="crashlab-nbd-"))
        qmp = self.temp_dir / f"qmp{self.starts}.sock"
        export = self.export if self.logging else replace(self.export, log=None)
        log_path = self.temp_dir / "qsd.log"
        with open(log_path, "ab") as out:
            self.process = subprocess.Popen(server_argv(export, self.address, qmp, self.qsd),
                                            stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                            preexec_fn=self.ns.preexec(_child), start_new_session=True)
        self.starts += 1
        end = time.monotonic() + START_S
        while not qmp.exists():
            if self.process.poll() is not None or time.monotonic() > end:
                tail = self.log_tail()
                self._reap()
                raise StorageError(f"qemu-storage-daemon did not start: {tail or 'no QMP socket'}")
            time.sleep(0.02)
        try:
            self.qmp = Monitor.connect(qmp, timeout=10.0)
            exports = self.qmp.cmd("query-block-exports")
        except qmp_failures as e:
            self._reap()
            raise StorageError(f"qemu-storage-daemon's QMP did not answer: {e}") from e
        if not exports:
            self._reap()
            raise StorageError(f"qemu-storage-daemon exports nothing: {self.log_tail()}")
        self.events.append((time.monotonic(), "server-start"))
        return self

    def kill(self) -> None:
        """SIGKILL the daemon: the server crashes mid-request. The log, if any, ends here."""
        if self.process is not None and self.alive():
            self.process.kill()
            self.process.wait()
        self._close_qmp()
        self.logging = False
        self.events.append((time.monotonic(), "server-kill"))

    def restart(self) -> None:
        """A new daemon on the same image and address (after a kill), without the log."""
        if self.alive():
            self.kill()
        self.start()

    def stop(self, grace: float = 3.0) -> None:
        """QMP quit, then SIGTERM, then SIGKILL; then the sockets and log go."""
        try:
            if self.alive() and self.qmp is not None:
                with contextlib.suppress(*qmp_failures):  # a daemon that quits closes QMP before replying
                    self.qmp.cmd("quit")
            self._reap(grace)
        finally:
            if self.temp_dir is not None:
                shutil.rmtree(self.temp_dir, ignore_errors=True)
                self.temp_dir = None

    def _reap(self, grace: float = 1.0) -> None:
        self._close_qmp()
        if self.process is not None:
            _stop(self.process, grace)

    def _close_qmp(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = (self.temp_dir / "qsd.log").read_text(errors="replace") if self.temp_dir else ""
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def describe(self) -> dict[str, Any]:
        return {"server": "qemu-storage-daemon", "address": self.address, "port": self.export.port,
                "export": self.export.name, "cache": self.export.cache.name,
                "log": str(self.export.log) if self.export.log else None,
                "namespace": self.ns.name, "pid": self.process.pid if self.process else None}

    def __enter__(self) -> StorageServer:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


@contextlib.contextmanager
def serve(export: Export, qsd: str | None = None) -> Iterator[StorageServer]:
    """A fresh namespace and a daemon in it serving `export`; both gone when the block ends."""
    with Namespace() as ns, StorageServer(export, ns, qsd) as server:
        yield server

