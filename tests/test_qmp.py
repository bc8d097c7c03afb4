"""The QMP client against a scripted peer on a real Unix socket (with QEMU: test_machine, test_nbd_guest)."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from crashlab.qmp import Monitor, QMPError, QMPProtocolError

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}}
Peer = Callable[[socket.socket], None]


def send(conn: socket.socket, msg: object) -> None:
    conn.sendall(json.dumps(msg).encode() + b"\r\n")


def requests(conn: socket.socket) -> Iterator[dict[str, object]]:
    for line in conn.makefile("rb"):
        yield json.loads(line)


def stall(seconds: float) -> Callable[[dict[str, object]], list[object]]:
    def reply(_: dict[str, object]) -> list[object]:
        time.sleep(seconds)
        return []
    return reply


def answering(replies: dict[str, Callable[[dict[str, object]], list[object]]]) -> Peer:
    """A peer that greets, then answers each command with what `replies[name](request)` lists."""
    def peer(conn: socket.socket) -> None:
        send(conn, GREETING)
        for req in requests(conn):
            name = str(req["execute"])
            out = [{"return": {}, "id": req["id"]}] if name == "qmp_capabilities" else replies[name](req)
            for msg in out:
                send(conn, msg)
    return peer


def serve(tmp_path: Path, peer: Peer) -> tuple[Path, threading.Thread]:
    path = tmp_path / "qmp.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def run() -> None:
        conn, _ = srv.accept()
        srv.close()
        with conn, contextlib.suppress(OSError, KeyError):
            peer(conn)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return path, t


def test_commands_return_values_and_keep_interleaved_events(tmp_path: Path) -> None:
    event = {"event": "DEVICE_DELETED", "data": {"device": "disk1-dev"}, "timestamp": {}}
    path, _ = serve(tmp_path, answering({
        "query-version": lambda r: [event, {"return": {"qemu": {"major": 7}}, "id": r["id"]}],
        "device_del": lambda r: [{"return": {}, "id": r["id"]}],
    }))
    with Monitor.connect(path) as m:
        assert m.greeting["version"] == GREETING["QMP"]["version"]
        assert m.cmd("query-version") == {"qemu": {"major": 7}}
        assert m.cmd("device_del", id="disk1-dev") == {}
        assert m.pull_event(0.0) == event
        assert m.pull_event(0.05) is None


def test_arguments_go_as_sent_and_errors_name_their_class(tmp_path: Path) -> None:
    seen: list[dict[str, object]] = []

    def refuse(r: dict[str, object]) -> list[object]:
        seen.append(r)
        return [{"error": {"class": "GenericError", "desc": "Duplicate node name"}, "id": r["id"]}]
    path, _ = serve(tmp_path, answering({"blockdev-add": refuse}))
    with Monitor.connect(path) as m:
        with pytest.raises(QMPError) as e:
            m.cmd("blockdev-add", **{"node-name": "disk1", "file": {"driver": "file"}})
        assert e.value.cls == "GenericError" and "Duplicate node name" in str(e.value)
    assert seen[0]["arguments"] == {"node-name": "disk1", "file": {"driver": "file"}}


def test_an_event_that_arrives_while_waiting_is_pulled(tmp_path: Path) -> None:
    event = {"event": "SHUTDOWN", "data": {}, "timestamp": {}}

    ready = threading.Event()

    def slow_peer(conn: socket.socket) -> None:
        send(conn, GREETING)
        req = next(requests(conn))
        send(conn, {"return": {}, "id": req["id"]})
        ready.set()
        time.sleep(0.2)
        send(conn, event)
        time.sleep(1)
    path, _ = serve(tmp_path, slow_peer)
    with Monitor.connect(path) as m:
        ready.wait(5)
        assert m.pull_event(5.0) == event


@pytest.mark.parametrize("peer, error", [
    (lambda c: send(c, {"not": "a greeting"}), QMPProtocolError),
    (lambda c: c.sendall(b"{garbage\n"), QMPProtocolError),
    (lambda c: c.sendall(b"[1, 2]\n"), QMPProtocolError),
    (lambda c: None, EOFError),  # closed before a word
    (lambda c: c.sendall(b"x" * (17 << 20)), QMPProtocolError),  # no newline, ever
])
def test_a_peer_that_is_not_qemu_gets_a_clear_error(tmp_path: Path, peer: Peer, error: type) -> None:
    path, _ = serve(tmp_path, peer)
    with pytest.raises(error):
        Monitor.connect(path, timeout=10)


def test_a_reply_that_never_comes_times_out(tmp_path: Path) -> None:
    path, _ = serve(tmp_path, answering({"quit": stall(2)}))
    with Monitor.connect(path) as m:
        m.settimeout(0.2)
        with pytest.raises(TimeoutError):
            m.cmd("quit")


def test_a_reply_to_another_command_is_refused(tmp_path: Path) -> None:
    path, _ = serve(tmp_path, answering({"stop": lambda r: [{"return": {}, "id": "other"}]}))
    with Monitor.connect(path) as m, pytest.raises(QMPProtocolError, match="reply to something else"):
        m.cmd("stop")


def test_listen_accepts_the_connecting_side(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    m = Monitor.listen(path)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(str(path))
    t = threading.Thread(target=answering({"query-status": lambda r: [
        {"return": {"status": "running"}, "id": r["id"]}]}), args=(conn,), daemon=True)
    t.start()
    try:
        m.accept(timeout=5)
        assert m.cmd("query-status") == {"status": "running"}
    finally:
        m.close()
        conn.close()


def test_listen_times_out_when_nobody_connects(tmp_path: Path) -> None:
    with Monitor.listen(tmp_path / "qmp.sock") as m, pytest.raises(TimeoutError):
        m.accept(timeout=0.1)


def test_an_interrupt_mid_command_leaves_nothing_to_print_at_exit(tmp_path: Path) -> None:
    """The failure qemu.qmp had: a Ctrl-C inside a command left asyncio tasks that printed
    tracebacks when collected at exit. Here the interrupted process prints nothing but its own line."""
    path, _ = serve(tmp_path, answering({"quit": stall(60)}))
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from crashlab.qmp import Monitor
        m = Monitor.connect({str(path)!r})
        m.settimeout(None)
        print("connected", flush=True)
        try:
            m.cmd("quit")
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
    """)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline() == "connected\n"
    time.sleep(0.2)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=30)
    assert child.returncode == 130
    assert err == "interrupted\n"
