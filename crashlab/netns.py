"""Network namespaces for storage servers, made and torn down with pyroute2 (netlink: no `ip`, no `tc`).

A `Namespace` is one named network namespace joined to the host by a veth pair on a /30 of its own:

    host netns                          crashlab-ns-<owner>-<n>
    clh<hash>  10.213.x.1/30  <──veth──>  cln<hash>  10.213.x.2/30   (+ lo up, default route via .1)

A storage server runs inside (`enter` is its preexec hook) and the guest's QEMU, on the host side,
reaches it at `ns_addr`. The link is where network faults happen, with what this kernel offers:

    link down/up   the host end's admin state (its peer loses carrier with it)
    rate           sch_tbf on both ends
    loss           cls_bpf on the host end, both directions (clsact ingress and egress): a 6-instruction
                   program drops a packet when bpf_get_prandom_u32() falls under the loss fraction
    delay          sch_netem when the kernel has it; this project's hosts do not, and it is refused
                   with the reason rather than faked

The namespace is named after its owner (crashlab.rundir's `<pid>-<start time>`): `reclaim()`, which
every crashlab command and every new namespace runs first, removes those whose owner is gone, so a
`kill -9` leaves nothing for long. Removing a namespace destroys its veth end, and the kernel then
destroys the peer, but asynchronously: `close` deletes the host end itself and waits until it is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import ipaddress
import itertools
import json
import os
import signal
import struct
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from pyroute2 import IPRoute, NetlinkError, netns  # type: ignore[import-untyped]

from crashlab import rundir
from crashlab.proc import LIBC

PREFIX = "crashlab-ns-"
NETNS_DIR = "/run/netns"
POOL = ipaddress.IPv4Network("10.213.0.0/16")  # carved into /30s, one per namespace
PREFIXLEN = 30
TEARDOWN_S = 5.0  # how long `close` waits for the kernel to destroy the veth pair

_counter = itertools.count()


class NetnsError(RuntimeError):
    """A namespace or link operation failed; the message says which and why, in one line."""


@dataclass(frozen=True)
class Plan:
    """Names and addresses of one namespace (pure: tests check them without root)."""

    name: str
    host_if: str
    ns_if: str
    network: ipaddress.IPv4Network

    @property
    def host_addr(self) -> str:
        return str(self.network.network_address + 1)

    @property
    def ns_addr(self) -> str:
        return str(self.network.network_address + 2)


def plan(owner: str, n: int, taken: Collection[ipaddress.IPv4Network] = ()) -> Plan:
    """The plan for namespace `n` of `owner`: interface names (at most 15 bytes, as the kernel wants)
    and the first /30 from the name's hash on that no host address already sits in."""
    name = f"{PREFIX}{owner}-{n}"
    digest = hashlib.sha256(name.encode()).hexdigest()
    blocks = POOL.num_addresses >> (32 - PREFIXLEN)
    start = int(digest[:8], 16) % blocks
    for k in range(blocks):
        net = ipaddress.IPv4Network((int(POOL.network_address) + ((start + k) % blocks << (32 - PREFIXLEN)),
                                     PREFIXLEN))
        if not any(net.overlaps(t) for t in taken):
            return Plan(name, f"clh{digest[:8]}", f"cln{digest[:8]}", net)
    raise NetnsError(f"no free /{PREFIXLEN} left in {POOL}")


def host_networks(ipr: IPRoute) -> list[ipaddress.IPv4Network]:
    """The IPv4 networks of the host's addresses, so a new namespace takes none of them."""
    nets = []
    for a in ipr.get_addr(family=2):
        addr = a.get("IFA_ADDRESS")
        if addr:
            nets.append(ipaddress.IPv4Network(f"{addr}/{a['prefixlen']}", strict=False))
    return nets


def owner_of(name: str) -> str:
    """`<pid>-<start time>` of a namespace's name."""
    return name.removeprefix(PREFIX).rpartition("-")[0]


def owned() -> list[str]:
    """Every crashlab namespace on this host, live owner or not."""
    try:
        return sorted(n for n in netns.listnetns() if n.startswith(PREFIX))
    except OSError:
        return []


def reclaim() -> list[str]:
    """Remove the namespaces (and their veths) whose owner is no longer running; their names."""
    gone = []
    for name in owned():
        if not rundir.owner_alive(owner_of(name)):
            with contextlib.suppress(NetnsError):
                _destroy(name, f"clh{hashlib.sha256(name.encode()).hexdigest()[:8]}")
                gone.append(name)
    return gone


def _destroy(name: str, host_if: str) -> None:
    with IPRoute() as ipr:
        for idx in ipr.link_lookup(ifname=host_if):
            with contextlib.suppress(NetlinkError):
                ipr.link("del", index=idx)
        end = time.monotonic() + TEARDOWN_S
        while ipr.link_lookup(ifname=host_if) and time.monotonic() < end:
            time.sleep(0.02)
    try:
        netns.remove(name)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise NetnsError(f"cannot remove network namespace {name}: {e.strerror or e}") from e


# --- loss: a tiny classic cls_bpf program ------------------------------------------------------------

_BPF_PROG_LOAD = 5
_SYS_BPF = 321  # x86_64
_SCHED_CLS = 3
_SYS_SETNS, _CLONE_NEWNET = 308, 0x40000000  # x86_64
TC_ACT_OK, TC_ACT_SHOT = 0, 2


def _insn(code: int, imm: int = 0, off: int = 0) -> bytes:
    return struct.pack("<BBhi", code, 0, off, imm)


def loss_program(fraction: float) -> bytes:
    """eBPF for a tc classifier in direct-action mode: drop when a random u32 is below the fraction."""
    threshold = min(int(fraction * 2**32), 2**32 - 1)
    signed = struct.unpack("<i", struct.pack("<I", threshold))[0]  # JMP32 compares it unsigned
    return b"".join([
        _insn(0x85, imm=7),  # call bpf_get_prandom_u32
        _insn(0xA6, imm=signed, off=2),  # if (u32)r0 < threshold: skip to the drop
        _insn(0xB7, imm=TC_ACT_OK),  # r0 = TC_ACT_OK
        _insn(0x95),  # exit
        _insn(0xB7, imm=TC_ACT_SHOT),  # r0 = TC_ACT_SHOT
        _insn(0x95),  # exit
    ])


def load_bpf(program: bytes, name: str) -> int:
    """Load a SCHED_CLS program with the bpf(2) syscall; its fd."""
    insns = ctypes.create_string_buffer(program, len(program))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(4096)
    attr = struct.pack("<IIQQIIQII16s", _SCHED_CLS, len(program) // 8, ctypes.addressof(insns),
                       ctypes.addressof(license_), 1, len(log), ctypes.addressof(log), 0, 0,
                       name.encode()[:15])
    buf = ctypes.create_string_buffer(attr.ljust(128, b"\0"), 128)
    fd = int(LIBC.syscall(_SYS_BPF, _BPF_PROG_LOAD, buf, 128))
    if fd < 0:
        err = ctypes.get_errno()
        raise NetnsError(f"the kernel refused the loss program: {os.strerror(err)} "
                         f"({log.value.decode(errors='replace').strip()[:200]})")
    return fd


# --- inside the namespace, without pyroute2's own fork ------------------------------------------------
# pyroute2 reaches into a namespace (NetNS, netns.create) from a forked child that, on a signal, can
# unwind through the parent's copied stack: in a campaign worker, SIGTERM's SystemExit there ran the
# worker's cleanup handlers and removed its recording directory. These children run one function
# and always leave by os._exit.

def _child_exit(run: Callable[[], bytes], w: int) -> None:
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            out = b"0" + run()
        except BaseException as e:  # to the parent, whatever it was
            out = b"1" + f"{type(e).__name__}: {e}".encode()
        os.write(w, out)
    finally:
        os._exit(0)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def inside(name: str, fn: Callable[[Plan], Any], the_plan: Plan) -> Any:
    """`fn(plan)` run in a forked child that has joined namespace `name`; its JSON-able result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        def run() -> bytes:
            _setns(name)
            return json.dumps(fn(the_plan)).encode()
        _child_exit(run, w)
    os.close(w)
    try:
        out = _read_all(r)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    if not out or out[:1] != b"0":
        raise NetnsError(f"in namespace {name}: {out[1:].decode(errors='replace') or 'the child died'}")
    return json.loads(out[1:])


def _create(name: str) -> None:
    """A named namespace: a child unshares its network, pyroute2 binds it under /run/netns."""
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.close(go_w)

        def unshare() -> bytes:
            if LIBC.unshare(_CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) failed")
            os.write(w, b"ready")  # then wait until the parent has bound our namespace
            os.read(go_r, 1)
            return b""
        _child_exit(unshare, w)
    os.close(w)
    os.close(go_r)
    try:
        ready = os.read(r, 5)
        if ready != b"ready":
            raise NetnsError(f"cannot create namespace {name}: {_read_all(r)[1:].decode(errors='replace')}")
        netns.attach(name, pid)
    finally:
        os.close(go_w)
        os.close(r)
        os.waitpid(pid, 0)


def _setns(name: str) -> None:
    fd = os.open(f"{NETNS_DIR}/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if LIBC.syscall(_SYS_SETNS, fd, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name} failed")
    finally:
        os.close(fd)


def _configure_inside(p: Plan) -> None:
    with IPRoute() as ns:
        ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        peer = ns.link_lookup(ifname=p.ns_if)[0]
        ns.addr("add", index=peer, address=p.ns_addr, prefixlen=PREFIXLEN)
        ns.link("set", index=peer, state="up")
        ns.route("add", dst="default", gateway=p.host_addr)


CLSACT_INGRESS, CLSACT_EGRESS = "ffff:fff2", "ffff:fff3"
TC_H_ROOT = 0xFFFFFFFF


class Namespace:
    """One network namespace with a veth pair to the host, as a context manager.

    >>> with Namespace() as ns:
    ...     subprocess.Popen(argv, preexec_fn=ns.enter)   # a server inside
    ...     ns.set_link(False); ns.set_link(True)          # a link flap
    """

    def __init__(self, the_plan: Plan | None = None) -> None:
        self.plan = the_plan
        self.created = False
        self.shaping: dict[str, Any] = {}  # what is applied now, by kind, for run.json

    @property
    def name(self) -> str:
        assert self.plan is not None
        return self.plan.name

    def create(self) -> Namespace:
        reclaim()
        with IPRoute() as ipr:
            self.plan = self.plan or plan(rundir.owner_tag(), next(_counter), host_networks(ipr))
            p = self.plan
            try:
                _create(p.name)
                self.created = True
                ipr.link("add", ifname=p.host_if, kind="veth", peer={"ifname": p.ns_if, "net_ns_fd": p.name})
                idx = self._host_index(ipr)
                ipr.addr("add", index=idx, address=p.host_addr, prefixlen=PREFIXLEN)
                ipr.link("set", index=idx, state="up")
                inside(p.name, _configure_inside, p)
            except (NetlinkError, OSError, NetnsError) as e:
                self.close()
                raise NetnsError(f"cannot set up network namespace {p.name}: {_why(e)}") from e
        return self

    def close(self) -> None:
        """Remove the namespace and its veth pair; safe to call twice."""
        if self.plan is not None and self.created:
            _destroy(self.plan.name, self.plan.host_if)
            self.created = False
            self.shaping = {}

    def __enter__(self) -> Namespace:
        return self.create()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def enter(self) -> None:
        """For preexec_fn: move the child into this namespace (setns(2); no `ip netns exec`)."""
        _setns(self.name)

    def preexec(self, then: Callable[[], None]) -> Callable[[], None]:
        def hook() -> None:
            self.enter()
            then()
        return hook

    # -- faults ------------------------------------------------------------------------------------

    def set_link(self, up: bool) -> None:
        """The host end up or down; its peer in the namespace loses carrier with it."""
        with IPRoute() as ipr:
            self._netlink(lambda: ipr.link("set", index=self._host_index(ipr), state="up" if up else "down"),
                          f"link {'up' if up else 'down'}")
        self.shaping["link"] = "up" if up else "down"

    def set_rate(self, rate: str | None, burst: int = 32 << 10, latency_ms: int = 400) -> None:
        """sch_tbf at `rate` (tc's units: '1mbit', '200kbit') on both ends; None removes it."""
        p = self.plan
        assert p is not None

        def apply(ipr: Any, idx: int) -> None:
            # A root qdisc is deleted by its handle, as the kernel listed it.
            for q in ipr.get_qdiscs(idx):
                if q["parent"] == TC_H_ROOT and q.get("TCA_KIND") == "tbf":
                    ipr.tc("del", index=idx, handle=q["handle"], parent=TC_H_ROOT)
            if rate is not None:
                ipr.tc("add", "tbf", idx, rate=rate, burst=burst, latency=f"{latency_ms}ms")

        with IPRoute() as ipr:
            self._netlink(lambda: apply(ipr, self._host_index(ipr)), f"rate {rate}")
        def apply_inside(plan: Plan) -> None:
            with IPRoute() as ns:
                apply(ns, ns.link_lookup(ifname=plan.ns_if)[0])

        inside(p.name, apply_inside, p)
        self.shaping["rate"] = rate

    def set_loss(self, fraction: float) -> None:
        """Drop that fraction of packets, both directions, at the host end; 0 removes the filter."""
        if not 0.0 <= fraction <= 1.0:
            raise NetnsError(f"loss must be a fraction between 0 and 1, not {fraction}")
        with IPRoute() as ipr:
            idx = self._host_index(ipr)
            with contextlib.suppress(NetlinkError):
                ipr.tc("del", "clsact", idx)
            if fraction > 0:
                fd = load_bpf(loss_program(fraction), "crashlab_loss")
                try:
                    def attach() -> None:
                        ipr.tc("add", "clsact", idx)
                        for parent in (CLSACT_INGRESS, CLSACT_EGRESS):
                            ipr.tc("add-filter", "bpf", idx, ":1", fd=fd, name="crashlab_loss",
                                   parent=parent, classid=1, direct_action=True)
                    self._netlink(attach, f"loss {fraction}")
                finally:
                    os.close(fd)  # the filters hold the program
        self.shaping["loss"] = fraction

    def set_delay(self, ms: float) -> None:
        """sch_netem delay on the host end, if this kernel has netem."""
        with IPRoute() as ipr:
            idx = self._host_index(ipr)
            try:
                ipr.tc("add", "netem", idx, delay=int(ms * 1000))
            except NetlinkError as e:
                if e.code == errno.ENOENT:
                    raise NetnsError("delay needs sch_netem, which this kernel does not have (it has "
                                     "tbf and cls_bpf: use rate or loss)") from None
                raise NetnsError(f"delay {ms} ms: {_why(e)}") from e
        self.shaping["delay_ms"] = ms

    # -- what is there -----------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Links and addresses on both sides, read back through netlink (for run.json and tests)."""
        p = self.plan
        assert p is not None

        def side(ipr: Any, ifname: str) -> dict[str, Any]:
            idx = ipr.link_lookup(ifname=ifname)
            if not idx:
                return {"ifname": ifname, "present": False}
            link = ipr.get_links(idx[0])[0]
            addrs = [f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.get_addr(index=idx[0], family=2)]
            qdiscs = sorted({str(q.get("TCA_KIND")) for q in ipr.get_qdiscs(idx[0])})
            return {"ifname": ifname, "present": True, "kind": link.get(("IFLA_LINKINFO", "IFLA_INFO_KIND")),
                    "up": bool(link["flags"] & 1), "addresses": addrs, "qdiscs": qdiscs}

        with IPRoute() as ipr:
            host = side(ipr, p.host_if)
        def read_inside(plan: Plan) -> dict[str, Any]:
            with IPRoute() as ns:
                routes = [(r.get("RTA_DST") or "default", r.get("RTA_GATEWAY"))
                          for r in ns.get_routes(family=2) if r.get("RTA_TABLE") == 254]
                return {"ns": side(ns, plan.ns_if), "routes": routes}

        return {"name": p.name, "host": host, **inside(p.name, read_inside, p), "shaping": dict(self.shaping)}

    def _host_index(self, ipr: IPRoute) -> int:
        assert self.plan is not None
        found = ipr.link_lookup(ifname=self.plan.host_if)
        if not found:
            raise NetnsError(f"{self.plan.host_if} is gone")
        return int(found[0])

    @staticmethod
    def _netlink(op: Callable[[], object], what: str) -> None:
        try:
            op()
        except NetlinkError as e:
            raise NetnsError(f"{what}: {_why(e)}") from e


def _why(e: BaseException) -> str:
    if isinstance(e, NetlinkError):
        return f"{os.strerror(e.code)} (netlink error {e.code})"
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e)
