"""A synchronous QMP client: one blocking Unix socket, JSON lines, no event loop.

QMP (docs/interop/qmp-spec.rst in QEMU) is a greeting, `qmp_capabilities`, then one reply per
command, with asynchronous events interleaved. crashlab sends one command at a time from the
thread that owns the guest, so a blocking socket is all it takes. qemu.qmp's legacy client runs
an asyncio loop underneath: a unit interrupted mid-command (Ctrl-C reaching a Dask worker) left
that loop's tasks half closed, and they printed tracebacks into the campaign's stderr when the
interpreter collected them at exit. A blocking `recv` interrupted by a signal leaves only a socket
to close.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

MAX_LINE = 16 << 20  # a reply bigger than this is not QEMU talking (query-* replies are kilobytes)


class QMPError(Exception):
    """QEMU answered a command with an error: `cls` is its error class (GenericError, ...)."""

    def __init__(self, command: str, cls: str, desc: str) -> None:
        super().__init__(f"{command}: {cls}: {desc}")
        self.command, self.cls, self.desc = command, cls, desc


class QMPProtocolError(Exception):
    """What came over the socket is not QMP (or the peer closed it mid-session)."""


# Everything a session can raise but a bug: refusals, garbage, a closed socket, a timeout.
FAILURES = (QMPError, QMPProtocolError, OSError, EOFError)


class Monitor:
    """One QMP session. `listen` for a QEMU started with `-chardev socket,path=...` (no server=on:
    QEMU connects, so there is no race with its startup); `connect` for a server socket."""

    def __init__(self) -> None:
        self._listener: socket.socket | None = None
        self._sock: socket.socket | None = None
        self._buf = b""
        self._events: collections.deque[dict[str, Any]] = collections.deque()
        self._next_id = 0
        self.timeout: float | None = 10.0
        self.greeting: dict[str, Any] = {}

    @classmethod
    def listen(cls, path: Path | str) -> Monitor:
        m = cls()
        m._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            m._listener.bind(os.fspath(path))
            m._listener.listen(1)
        except OSError:
            m.close()
            raise
        return m

    @classmethod
    def connect(cls, path: Path | str, timeout: float = 10.0) -> Monitor:
        m = cls()
        m.timeout = timeout
        m._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            m._sock.settimeout(timeout)
            m._sock.connect(os.fspath(path))
            m._handshake()
        except BaseException:
            m.close()
            raise
        return m

    def accept(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for QEMU to connect, then negotiate capabilities."""
        if self._listener is None:
            raise QMPProtocolError("not listening")
        self._listener.settimeout(timeout)
        self._sock, _ = self._listener.accept()
        self._listener.close()
        self._listener = None
        self._sock.settimeout(self.timeout)
        self._handshake()

    def settimeout(self, timeout: float | None) -> None:
        """The deadline of each later command's reply, in seconds (None: wait forever)."""
        self.timeout = timeout
        if self._sock is not None:
            self._sock.settimeout(timeout)

    def _handshake(self) -> None:
        first = self._read()
        greeting = first.get("QMP")
        if not isinstance(greeting, dict):
            raise QMPProtocolError(f"no QMP greeting: {str(first)[:200]}")
        self.greeting = greeting
        self.cmd("qmp_capabilities")

    def cmd(self, command: str, **args: object) -> object:
        """Execute `command`; its `return` value. QMPError if QEMU refused it; TimeoutError if no
        reply came within the timeout; EOFError if QEMU closed the socket first (as `quit` may)."""
        if self._sock is None:
            raise QMPProtocolError("not connected")
        self._next_id += 1
        ident = f"crashlab-{self._next_id}"
        msg: dict[str, Any] = {"execute": command, "id": ident}
        if args:
            msg["arguments"] = args
        self._sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self._events.append(reply)
                continue
            if reply.get("id") != ident:
                raise QMPProtocolError(f"{command}: a reply to something else: {str(reply)[:200]}")
            if "error" in reply:
                err = reply["error"]
                e = err if isinstance(err, dict) else {}
                raise QMPError(command, str(e.get("class", "?")), str(e.get("desc", err)))
            return reply.get("return")

    def pull_event(self, wait: float = 0.0) -> dict[str, Any] | None:
        """The oldest event not yet pulled, waiting up to `wait` seconds for one; None if none came."""
        if self._events:
            return self._events.popleft()
        if self._sock is None:
            raise QMPProtocolError("not connected")
        end = time.monotonic() + wait
        try:
            while not self._events:
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self._sock.settimeout(left)
                try:
                    msg = self._read()
                except TimeoutError:
                    return None
                if "event" in msg:
                    self._events.append(msg)
        finally:
            if self._sock is not None:
                self._sock.settimeout(self.timeout)
        return self._events.popleft()

    def _read(self) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_LINE:
                raise QMPProtocolError(f"a QMP message over {MAX_LINE >> 20} MiB")
            chunk = self._sock.recv(65536)
            if not chunk:
                raise EOFError("QMP socket closed")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError as e:
            raise QMPProtocolError(f"not JSON: {line[:200]!r}") from e
        if not isinstance(msg, dict):
            raise QMPProtocolError(f"not a QMP object: {line[:200]!r}")
        return msg

    def close(self) -> None:
        for s in (self._sock, self._listener):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.close()
        self._sock = self._listener = None

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
