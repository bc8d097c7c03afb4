"""One disposable QEMU guest, owned from launch to the last temporary file.

Modelled on QEMU's python/qemu/machine/machine.py: the host side listens on a QMP socket that QEMU
connects to (no startup race), the serial console goes to a file, and `shutdown` escalates QMP `quit`
→ SIGTERM → SIGKILL. Unlike it, a `Machine` also owns its virtiofsd daemons and a hard deadline, and
its children die with the host process (PR_SET_PDEATHSIG), so neither Ctrl-C, an exception nor a
SIGKILLed test runner leaves a QEMU or virtiofsd behind.

Cache modes come from `crashlab.cachemodes` (the one table): `cache.direct` on the file nodes,
`cache.no-flush` on every node of the disk and in particular on the top (blklogwrites) node, so that
with `unsafe` a flush never reaches the log, and `write-cache=` on the guest's disk device, whose
model and controller come from `crashlab.diskmodels`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from crashlab import proc, qmp
from crashlab.cachemodes import CACHE_MODES, CacheMode
from crashlab.diskmodels import DEFAULT_AIO, DEFAULT_DISK, DETECT_ZEROES, DISCARD, DISK_MODELS, DiskModel
from crashlab.guest.inguest.init import PROBE_OK
from crashlab.guest.provision import ProvisionError, cache_root, file_identity, missing, which
from crashlab.guest.shares import Share
from crashlab.qmp import Monitor

log = logging.getLogger("crashlab.guest")

VIRTIOFSD_PATHS = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd", "/usr/lib/virtiofsd")
# no_timer_check: on a loaded host a TCG guest's timer looks broken to the kernel, which then dies
# in setup_IO_APIC ("IO-APIC + timer doesn't work!") before userspace.
BASE_APPEND = "console=ttyS0 panic=-1 loglevel=4 no_timer_check rdinit=/init"
PROBE_TIMEOUT_S = 12.0


class MachineError(RuntimeError):
    pass


class MachineTimeout(MachineError):
    pass


class AbnormalShutdown(MachineError):
    """QEMU did not stop when asked over QMP and had to be killed; the message ends with the
    console's tail."""


@dataclass(frozen=True)
class NbdClient:
    """Where an NBD export is, as QEMU's nbd block driver reaches it."""

    host: str
    port: int
    export: str
    # Seconds QEMU holds requests while it reconnects to a lost server; 0: they fail at once (EIO).
    reconnect_delay_s: int = 0


@dataclass(frozen=True)
class Drive:
    """A guest disk backed by a raw host file, optionally logged by a blklogwrites node, or (with
    `nbd`) by an NBD export, `path` then being the server's image, which QEMU never opens."""

    path: Path
    cache: CacheMode
    log: Path | None = None  # blklogwrites log; must be a fresh file (QEMU does not truncate it)
    log_sector_size: int = 512
    serial: str = ""
    model: DiskModel = DISK_MODELS[DEFAULT_DISK]
    aio: str = DEFAULT_AIO  # -blockdev aio= of the data file node
    discard: str = DISCARD[0]  # -blockdev discard= (ignore: guest discards stop at QEMU)
    detect_zeroes: str = DETECT_ZEROES[0]  # -blockdev detect-zeroes= of the top node
    nbd: NbdClient | None = None


def nbd_drive_args(index: int, drive: Drive, nbd: NbdClient) -> list[str]:
    """An NBD-backed disk: the cache mode's direct and write-cache halves are the server's and the
    device's; no-flush also applies here, so `unsafe` flushes never leave the guest's host. The
    file node's options (aio) are the server's too (crashlab.nbd.Export)."""
    if drive.log is not None:
        raise MachineError("an NBD disk is logged on its server, not by a blklogwrites node here")
    if drive.aio != DEFAULT_AIO:
        raise MachineError(f"aio={drive.aio} is an option of the server's file, not of an NBD client")
    discard = [f"discard={drive.discard}"] if drive.discard != DISCARD[0] else []
    zeroes = [f"detect-zeroes={drive.detect_zeroes}"] if drive.detect_zeroes != DETECT_ZEROES[0] else []
    node = ",".join(["driver=nbd", f"node-name=disk{index}", "server.type=inet", f"server.host={nbd.host}",
                     f"server.port={nbd.port}", f"export={nbd.export}",
                     f"reconnect-delay={nbd.reconnect_delay_s}",
                     f"cache.no-flush={drive.cache.blockdev_cache['cache.no-flush']}", *discard, *zeroes])
    dev = drive.model.device_args(index, f"disk{index}", drive.cache.device_write_cache)
    if drive.serial:
        dev[-1] += f",serial={drive.serial}"
    return ["-blockdev", node, *dev]


def drive_nodes(index: int, drive: Drive) -> list[dict[str, str]]:
    """The block nodes of one local drive, in creation order, the top node (`disk{index}`, the
    one its device is attached to) last; options as the command line spells them (pure).

    As libvirt builds them (qemu_command.c): `aio` on the file (storage) node, `discard` on every
    node of the disk, `detect-zeroes` on the node the device is attached to. Non-default values
    only, so a default drive's command line is what it always was."""
    c = drive.cache
    top = f"disk{index}"
    file_node = f"disk{index}-file" if drive.log else top
    cache = c.blockdev_cache
    extra = {"aio": drive.aio} if drive.aio != DEFAULT_AIO else {}
    discard = {"discard": drive.discard} if drive.discard != DISCARD[0] else {}
    zeroes = {"detect-zeroes": drive.detect_zeroes} if drive.detect_zeroes != DETECT_ZEROES[0] else {}
    nodes = [{"driver": "file", "node-name": file_node, "filename": str(drive.path), **cache, **extra,
              **discard, **({} if drive.log else zeroes)}]
    if drive.log:
        # The log's own caching is not under test and must hold every entry when QEMU exits:
        # page cache, flushes kept. Only the top node's no-flush decides whether guest flushes
        # reach the log (DESIGN.md: "sector 0 stays zero" with unsafe).
        nodes.append({"driver": "file", "node-name": f"disk{index}-log", "filename": str(drive.log),
                      **CACHE_MODES["writeback"].blockdev_cache})
        nodes.append({"driver": "blklogwrites", "node-name": top, "file": file_node,
                      "log": f"disk{index}-log", "log-sector-size": str(drive.log_sector_size),
                      "cache.no-flush": cache["cache.no-flush"], **discard, **zeroes})
    return nodes


def device_spec(index: int, drive: Drive) -> list[str]:
    """The -device options of a local drive (its controller first, if its model needs one)."""
    dev = drive.model.device_args(index, f"disk{index}", drive.cache.device_write_cache)
    if drive.serial:
        dev[-1] += f",serial={drive.serial}"
    return dev


def drive_args(index: int, drive: Drive) -> list[str]:
    """The -blockdev/-device options for one drive (pure: tests check them against the tables)."""
    if drive.nbd is not None:
        return nbd_drive_args(index, drive, drive.nbd)
    args = [a for node in drive_nodes(index, drive) for a in ("-blockdev", _options(node))]
    return [*args, *device_spec(index, drive)]


def _options(node: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in node.items())


# QMP takes typed, nested options where the command line takes flat strings (qapi/block-core.json).
_QMP_BOOLS = frozenset({"cache.direct", "cache.no-flush"})
_QMP_INTS = frozenset({"log-sector-size"})


def qmp_blockdev(node: dict[str, str]) -> dict[str, object]:
    """One `drive_nodes` node as `blockdev-add` arguments (pure)."""
    out: dict[str, object] = {}
    for k, v in node.items():
        value: object = v == "on" if k in _QMP_BOOLS else int(v) if k in _QMP_INTS else v
        head, dot, tail = k.partition(".")
        if dot:
            sub = out.setdefault(head, {})
            assert isinstance(sub, dict)
            sub[tail] = value
        else:
            out[k] = value
    return out


def qmp_device(spec: str, dev_id: str) -> dict[str, object]:
    """A -device option string as `device_add` arguments, with an id to remove it by (pure)."""
    driver, *props = spec.split(",")
    return {"driver": driver, "id": dev_id, **dict(p.split("=", 1) for p in props)}


HOTPLUG_DEVICES = frozenset({"virtio-blk-pci"})  # on the pc machine's ACPI-hotplug PCI bus, no controller


def hotplug_commands(index: int, drive: Drive) -> list[tuple[str, dict[str, object]]]:
    """The QMP commands that attach `drive` to a running guest as disk `index` (pure); what
    `Machine.hotplug` sends and run.json records."""
    if drive.nbd is not None or drive.model.controller is not None \
            or drive.model.device not in HOTPLUG_DEVICES:
        raise MachineError(f"a {drive.model.name} disk is not hot-plugged here (virtio-blk only)")
    cmds: list[tuple[str, dict[str, object]]] = [
        ("blockdev-add", qmp_blockdev(n)) for n in drive_nodes(index, drive)]
    (spec,) = device_spec(index, drive)[1::2]
    return [*cmds, ("device_add", qmp_device(spec, f"disk{index}-dev"))]


def _pdeathsig() -> None:
    # Runs in the child between fork and exec: die with the host process. The child also gets a
    # session of its own (start_new_session), so the terminal's Ctrl-C reaches only crashlab,
    # which shuts the guest down in order; QEMU would otherwise quit on it by itself, mid-cleanup.
    proc.die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def find_qemu(qemu: str | None = None) -> str:
    if qemu:
        if os.path.isfile(qemu) and os.access(qemu, os.X_OK):
            return qemu
        return which(qemu)
    return which("qemu-system-x86_64")


def find_virtiofsd(path: str | None = None) -> str | None:
    for p in (path, os.environ.get("CRASHLAB_VIRTIOFSD"), *VIRTIOFSD_PATHS):
        if p and os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return shutil.which("virtiofsd")


class Machine:
    """A QEMU guest booted from a kernel and initramfs, as a context manager.

    >>> with Machine(guest.kernel, guest.initrd, drives=[...], shares=[...]) as m:
    ...     status = m.wait()      # the guest powers itself off; QEMU's exit status
    """

    def __init__(self, kernel: Path, initrd: Path, *, append: str = "", drives: Sequence[Drive] = (),
                 shares: Sequence[Share] = (), memory_mib: int = 512, cpus: int = 1,
                 accel: str = "tcg", qemu: str | None = None, virtiofsd: str | None = None,
                 timeout: float = 600.0, console_log: Path | None = None, name: str = "crashlab") -> None:
        if memory_mib > 1024:
            raise MachineError("guest memory is capped at 1024 MiB on these machines")
        if accel not in ("tcg", "kvm"):
            raise MachineError(f"accel must be tcg or kvm (resolve 'auto' with choose_accel): {accel!r}")
        self.kernel, self.initrd, self.append = Path(kernel), Path(initrd), append
        self.drives, self.shares = list(drives), list(shares)
        self.memory_mib, self.cpus, self.accel = memory_mib, cpus, accel
        self.qemu = find_qemu(qemu)
        self.virtiofsd = find_virtiofsd(virtiofsd) if self.shares else None
        if self.shares and not self.virtiofsd:
            raise missing("virtiofsd", "virtiofsd (QEMU's /usr/lib/qemu/virtiofsd)")
        self.timeout, self.name = timeout, name
        self.temp_dir: Path | None = None
        self.console_log = console_log
        self.process: subprocess.Popen[bytes] | None = None
        self.daemons: list[subprocess.Popen[bytes]] = []
        self.qmp: Monitor | None = None
        self.deadline = 0.0
        self.launched_at = 0.0
        self.exitcode: int | None = None
        self.version: object = None  # QMP query-version, once launched

    # -- the command line ------------------------------------------------------------------------

    def argv(self, qmp_sock: Path, vfs_socks: Sequence[Path], console: Path) -> list[str]:
        mem = f"{self.memory_mib}M"
        args = [self.qemu, "-name", self.name, "-nodefaults", "-no-user-config", "-display", "none",
                "-no-reboot", "-accel", self.accel, "-cpu", "max" if self.accel == "tcg" else "host",
                "-smp", str(self.cpus), "-m", mem,
                "-kernel", str(self.kernel), "-initrd", str(self.initrd),
                "-append", f"{BASE_APPEND} {self.append}".strip(),
                "-chardev", f"file,id=console,path={console}", "-serial", "chardev:console",
                "-chardev", f"socket,id=qmp,path={qmp_sock}", "-mon", "chardev=qmp,mode=control"]
        if self.shares:
            # vhost-user needs guest RAM the daemon can map: a shared memfd.
            args += ["-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
                     "-numa", "node,memdev=mem"]
        for i, d in enumerate(self.drives):
            args += drive_args(i, d)
        for i, (s, sock) in enumerate(zip(self.shares, vfs_socks, strict=True)):
            args += ["-chardev", f"socket,id=vfs{i},path={sock}",
                     "-device", f"vhost-user-fs-pci,chardev=vfs{i},tag={s.tag}"]
        return args

    # -- life ------------------------------------------------------------------------------------

    def launch(self) -> None:
        if self.process is not None:
            raise MachineError("machine already launched")
        self.launched_at = time.monotonic()
        self.deadline = self.launched_at + self.timeout
        self.temp_dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-machine-"))
        try:
            self._launch(self.temp_dir)
        except BaseException as e:
            self._shutdown_quietly(e)
            raise

    def _launch(self, tmp: Path) -> None:
        console = self.console_log or tmp / "console.log"
        self.console_log = console
        vfs_socks = []
        for i, s in enumerate(self.shares):
            sock = tmp / f"vfs{i}.sock"
            log = open(tmp / f"virtiofsd-{s.tag}.log", "wb")  # noqa: SIM115 (lives with the daemon)
            assert self.virtiofsd
            self.daemons.append(subprocess.Popen(
                s.daemon_argv(self.virtiofsd, sock, tmp),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, preexec_fn=_pdeathsig,
                start_new_session=True))
            log.close()
            vfs_socks.append(sock)
        for sock, d in zip(vfs_socks, self.daemons, strict=True):
            self._await_socket(sock, d, tmp / f"virtiofsd-{self.shares[self.daemons.index(d)].tag}.log")
        qmp_sock = tmp / "qmp.sock"
        self.qmp = Monitor.listen(qmp_sock)
        qlog = open(tmp / "qemu.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(self.argv(qmp_sock, vfs_socks, console), stdin=subprocess.DEVNULL,
                                        stdout=qlog, stderr=qlog, preexec_fn=_pdeathsig,
                                        start_new_session=True)
        qlog.close()
        try:
            self.qmp.accept(timeout=min(30.0, self.timeout))
            self.qmp.settimeout(10.0)
            self.version = self.qmp.cmd("query-version")  # what actually runs, for the record
        except qmp.FAILURES as e:
            self._reap(1.0)
            raise MachineError(f"QEMU did not come up: {self.qemu_log_tail() or e}") from e

    def _await_socket(self, sock: Path, daemon: subprocess.Popen[bytes], log: Path) -> None:
        end = time.monotonic() + 10
        while not sock.exists():
            if daemon.poll() is not None or time.monotonic() > end:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
                raise MachineError(f"virtiofsd did not start: {tail[0] if tail else 'no socket'}")
            time.sleep(0.01)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the guest to power off; QEMU's exit status. The hard deadline always applies."""
        if self.process is None:
            raise MachineError("machine not launched")
        end = self.deadline if timeout is None else min(self.deadline, time.monotonic() + timeout)
        try:
            self.exitcode = self.process.wait(max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            tail = self.console_tail(3)  # before shutdown removes a console kept in the temp dir
            self._shutdown_quietly(None)
            hard = "hard timeout" if end == self.deadline else "timeout"
            raise MachineTimeout(f"guest still running after its {hard} "
                                 f"({end - self.launched_at:.0f} s); console: {tail}") from None
        return self.exitcode

    def cmd(self, command: str, **args: object) -> object:
        if self.qmp is None:
            raise MachineError("no QMP connection")
        return self.qmp.cmd(command, **args)

    def hotplug(self, index: int, drive: Drive) -> list[tuple[str, dict[str, object]]]:
        """Attach `drive` to the running guest as disk `index`; the commands sent, for the record.
        A command QEMU refuses raises MachineError, with the nodes already added removed again."""
        cmds = hotplug_commands(index, drive)
        added: list[str] = []
        try:
            for name, args in cmds:
                self.cmd(name, **args)
                if name == "blockdev-add":
                    added.append(str(args["node-name"]))
        except qmp.FAILURES as e:
            self._del_nodes(added)
            raise MachineError(f"hot-plugging disk {index}: {type(e).__name__}: {e}") from e
        return cmds

    def unplug(self, index: int, drive: Drive, timeout: float = 60.0) -> None:
        """Detach disk `index`: `device_del`, wait for the guest to let go of it (DEVICE_DELETED),
        then delete its block nodes, which closes its files: a blklogwrites log is complete and
        closed when this returns."""
        dev_id = f"disk{index}-dev"
        end = min(self.deadline, time.monotonic() + timeout)
        try:
            self.cmd("device_del", id=dev_id)
            while True:
                left = end - time.monotonic()
                if left <= 0 or not self.is_running():
                    raise MachineTimeout(f"the guest did not release disk {index} in {timeout:.0f} s")
                ev = self.qmp.pull_event(wait=min(left, 1.0)) if self.qmp else None
                if ev and ev.get("event") == "DEVICE_DELETED" and ev.get("data", {}).get("device") == dev_id:
                    break
        except MachineError:
            raise
        except qmp.FAILURES as e:
            raise MachineError(f"unplugging disk {index}: {type(e).__name__}: {e}") from e
        nodes = [str(a["node-name"]) for name, a in hotplug_commands(index, drive) if name == "blockdev-add"]
        if failed := self._del_nodes(nodes):
            raise MachineError(f"unplugging disk {index}: {failed}")

    def _del_nodes(self, nodes: Sequence[str]) -> str:
        """blockdev-del `nodes`, the last added first; what failed, or ''."""
        failed = []
        for node in reversed(nodes):
            try:
                self.cmd("blockdev-del", **{"node-name": node})
            except qmp.FAILURES as e:
                failed.append(f"blockdev-del {node}: {e}")
        return "; ".join(failed)

    def kill(self) -> None:
        """SIGKILL QEMU now, as a host crash would (the test of cleanup after a mid-run kill)."""
        if self.is_running():
            assert self.process
            self.process.kill()

    def shutdown(self, grace: float = 3.0) -> None:
        """Stop QEMU (QMP quit → SIGTERM → SIGKILL), its daemons, and remove the temp dir.

        Raises AbnormalShutdown, after everything is cleaned up, when QEMU was still running and did
        not quit when asked; a guest that already powered off (or was killed) is a normal end.
        """
        abnormal = ""
        try:
            if self.is_running():
                abnormal = self._quit(grace)
            elif self.process is not None:
                self._reap(grace)
        finally:
            tail = self.console_tail(8) if abnormal else ""  # before the temp dir goes
            if self.qmp is not None:
                self.qmp.close()
                self.qmp = None
            for d in self.daemons:
                if _stop(d, grace) != "exited":
                    log.warning("%s: virtiofsd %d had to be signalled", self.name, d.pid)
            self.daemons = []
            if self.temp_dir is not None:
                shutil.rmtree(self.temp_dir, ignore_errors=True)
                self.temp_dir = None
        if abnormal:
            raise AbnormalShutdown(f"{self.name}: {abnormal}; console: {tail}")

    def _quit(self, grace: float) -> str:
        """Ask QEMU to quit over QMP, then escalate; why it was abnormal, or ''."""
        asked = ""
        if self.qmp is None:
            asked = "no QMP connection"
        else:
            try:
                self.qmp.settimeout(grace)
                self.qmp.cmd("quit")
            except (EOFError, ConnectionError):
                pass  # QEMU closed the socket as it quit, before its reply
            except qmp.FAILURES as e:
                asked = f"QMP quit failed ({type(e).__name__}: {e})"
        assert self.process is not None
        how = _stop(self.process, grace)
        self.exitcode = self.process.returncode
        if how == "exited" and not asked:
            return ""
        why = f"{asked or 'QEMU ignored QMP quit'}; stopped by {how}"
        log.warning("%s: %s", self.name, why)
        return why

    def _reap(self, grace: float) -> None:
        if self.process is not None:
            _stop(self.process, grace)
            self.exitcode = self.process.returncode

    def console_tail(self, lines: int = 20) -> str:
        try:
            text = Path(self.console_log).read_text(errors="replace") if self.console_log else ""
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def qemu_log_tail(self) -> str:
        if self.temp_dir is None or not (self.temp_dir / "qemu.log").exists():
            return ""
        return " | ".join((self.temp_dir / "qemu.log").read_text(errors="replace").strip().splitlines()[-3:])

    def __enter__(self) -> Machine:
        self.launch()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        if ev is None:
            self.shutdown()
        else:
            self._shutdown_quietly(ev)

    def _shutdown_quietly(self, cause: BaseException | None) -> None:
        """Shut down when another error is already the one to report: log an abnormal end."""
        try:
            self.shutdown()
        except AbnormalShutdown as e:
            log.warning("%s (while handling %s)", e, type(cause).__name__ if cause else "a timeout")


def _stop(p: subprocess.Popen[bytes], grace: float) -> str:
    """Wait `grace` seconds, then SIGTERM, then SIGKILL; always reaps. Returns what ended it:
    "exited", "SIGTERM" or "SIGKILL"."""
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None and p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)
        try:
            p.wait(grace if sig != signal.SIGKILL else None)
            return "exited" if sig is None else sig.name
        except subprocess.TimeoutExpired:
            continue
    return "SIGKILL"


# --- versions and acceleration -----------------------------------------------------------------

def qemu_version(qemu: str | None = None) -> str:
    try:
        out = proc.check([find_qemu(qemu), "--version"], 30)
    except proc.ToolError as e:
        raise MachineError(str(e)) from None
    return out.splitlines()[0].strip()


def choose_accel(kernel: Path, initrd: Path, accel: str = "auto", qemu: str | None = None) -> str:
    """`auto`: KVM only if a short probe boot reaches /init (here /dev/kvm hangs stock kernels).

    The probe's verdict is cached per host kernel, QEMU binary and guest kernel.
    """
    if accel != "auto":
        return accel
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    key = json.dumps([os.uname().release, file_identity(find_qemu(qemu)), file_identity(kernel)],
                     sort_keys=True)
    store = cache_root() / "kvm-probe.json"
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = probe_kvm(kernel, initrd, qemu)
        store.parent.mkdir(parents=True, exist_ok=True)
        store.write_text(json.dumps(known))
    return "kvm" if known[key] else "tcg"


def probe_kvm(kernel: Path, initrd: Path, qemu: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> bool:
    try:
        with Machine(kernel, initrd, append="crashlab.probe", accel="kvm", qemu=qemu, timeout=timeout,
                     memory_mib=256, name="crashlab-probe") as m:
            m.wait()
            return PROBE_OK in (Path(m.console_log).read_text(errors="replace") if m.console_log else "")
    except (MachineError, ProvisionError, OSError):
        return False

