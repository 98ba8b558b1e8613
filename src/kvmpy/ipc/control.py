"""The control connection between the ipc server and a peer VMM, and the waits around it.

Messages are JSON objects, one per SOCK_SEQPACKET datagram, and may carry file descriptors
(SCM_RIGHTS): this is how the server hands each VMM the shared region's memfd, the doorbell
eventfds and the pio relay socket, as QEMU's ivshmem-server does. Every wait has a timeout
and also wakes on an abort eventfd, so a VMM blocked on a dead peer gets a clear error, never
a hang.
"""

from __future__ import annotations

import json
import os
import select
import socket
import time
from collections.abc import Sequence

from ..errors import KvmpyError

MAX_MESSAGE = 1 << 20
MAX_FDS = 16


class IpcError(KvmpyError):
    """An inter-VM channel failed: a peer died or timed out, or broke the protocol."""


class PeerGone(IpcError):
    """The other end closed its connection (its process exited or crashed)."""


class Aborted(IpcError):
    """The wait was cut short because the run is being torn down."""


def make_abort() -> int:
    """An eventfd that, once written, wakes every wait given it."""
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def wait_readable(fd: int, timeout: float, abort: int | None, what: str) -> None:
    """Block until `fd` is readable; IpcError after `timeout` s, Aborted if `abort` fires."""
    _wait(fd, select.POLLIN, timeout, abort, what)


def wait_writable(fd: int, timeout: float, abort: int | None, what: str) -> None:
    _wait(fd, select.POLLOUT, timeout, abort, what)


def _wait(fd: int, events: int, timeout: float, abort: int | None, what: str) -> None:
    poller = select.poll()
    poller.register(fd, events | select.POLLHUP | select.POLLERR)
    if abort is not None:
        poller.register(abort, select.POLLIN)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise IpcError(f"timed out after {timeout:g} s waiting for {what}")
        for rfd, _ev in poller.poll(left * 1000):
            if rfd == abort:
                raise Aborted(f"stopped while waiting for {what}")
            return


class Link:
    """One end of a control connection."""

    def __init__(self, sock: socket.socket, name: str = "peer"):
        self.sock = sock
        self.name = name
        sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def send(self, msg: dict, fds: Sequence[int] = ()) -> None:
        data = json.dumps(msg).encode()
        if len(data) > MAX_MESSAGE:
            raise IpcError(f"control message to {self.name} too large ({len(data)} bytes)")
        try:
            wait_writable(self.sock.fileno(), 30.0, None, f"the control link to {self.name}")
            if fds:
                socket.send_fds(self.sock, [data], list(fds))
            else:
                self.sock.send(data)
        except (BrokenPipeError, ConnectionResetError):
            raise PeerGone(f"{self.name} closed its control connection") from None

    def recv(
        self, timeout: float, abort: int | None = None, what: str | None = None
    ) -> tuple[dict, list[int]]:
        """The next message and the descriptors that came with it."""
        what = what or f"a message from {self.name}"
        wait_readable(self.sock.fileno(), timeout, abort, what)
        try:
            data, fds, flags, _addr = socket.recv_fds(self.sock, MAX_MESSAGE, MAX_FDS)
        except ConnectionResetError:
            data, fds, flags = b"", [], 0
        except BlockingIOError:
            # Readable but nothing to read: a hang-up without data.
            data, fds, flags = b"", [], 0
        if not data:
            for fd in fds:
                os.close(fd)
            raise PeerGone(f"{self.name} closed its control connection")
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            for fd in fds:
                os.close(fd)
            raise IpcError(f"a message from {self.name} was truncated")
        try:
            msg = json.loads(data)
        except ValueError:
            for fd in fds:
                os.close(fd)
            raise IpcError(f"{self.name} sent a malformed control message") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
            for fd in fds:
                os.close(fd)
            raise IpcError(f"{self.name} sent a control message without an op")
        return msg, fds


def link_pair(a: str, b: str) -> tuple[Link, Link]:
    sa, sb = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return Link(sa, b), Link(sb, a)
