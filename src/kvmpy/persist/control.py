"""The control operations on a running VM, and the unix-socket channel that serves them.

The operations are plain functions of a `VmSession`; the socket server, `kvmpy ctl`, and any
later front end (a REST API) call them as they are:

    pause(session)                      -> {"state": "paused"}
    resume(session)                     -> {"state": "running"}
    stats(session)                      -> state, uptime, output bytes, exit statistics
    snapshot(session, path, store=None) -> what was written (sizes, pages, timings)
    migrate(session, address, progress) -> rounds, pages per round, downtime, total time
    stop(session)                       -> {"state": "stopping"}
    ctrl_alt_del(session)               -> Ctrl-Alt-Del on the machine's i8042, if it has one
    balloon(session, size=None)         -> target, balloon size, guest statistics, RSS

Wire protocol (one request per line, UTF-8 JSON objects; a connection may send several):

    -> {"op": "snapshot", "path": "/var/snap/vm1"}
    <- {"ok": true, "result": {...}}
    <- {"ok": false, "error": "one sentence"}

`migrate` sends progress lines ({"progress": {...}}) before its result. A malformed request
gets an error reply; it never disturbs the VM.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import KvmpyError
from ..result import StopReason
from ..unixsock import listen_unix
from . import snapshot as snapshot_mod
from .errors import ControlError
from .session import VmSession, helper_thread

log = logging.getLogger(__name__)

#: A request line longer than this is refused (the server never buffers more).
MAX_REQUEST = 64 * 1024

Progress = Callable[[dict[str, Any]], None]


# --- the operations ------------------------------------------------------------------------------


def pause(session: VmSession) -> dict[str, Any]:
    session.pause()
    return {"state": "paused"}


def resume(session: VmSession) -> dict[str, Any]:
    session.resume()
    return {"state": "running"}


def stats(session: VmSession) -> dict[str, Any]:
    return session.status()


def snapshot(session: VmSession, path: str, store: str | None = None) -> dict[str, Any]:
    """Write a snapshot to the directory `path` (replaced atomically if it holds one); with
    `store`, its memory goes into that page store, shared with other snapshots. The VM goes on
    afterwards, or stays paused if it was."""
    if not isinstance(path, str) or not path:
        raise ControlError("snapshot needs a directory path")
    if store is not None and (not isinstance(store, str) or not store):
        raise ControlError("snapshot: store must be a directory path")
    return session.call_paused(lambda: snapshot_mod.take(session.machine, path, store=store))


def migrate(
    session: VmSession,
    address: str,
    progress: Progress | None = None,
    *,
    downtime_ms: float | None = None,
    max_rounds: int | None = None,
    auth_key: str | None = None,
) -> dict[str, Any]:
    """Live-migrate the VM to `address` (HOST:PORT, where `kvmpy migrate-receive` listens).
    On success the VM has stopped here and runs there; on failure it keeps running here and
    MigrationError says why. `auth_key` is the shared migration key in hex (`kvmpy ctl`
    sends it over the owner-only control socket); without it, the VMM's $KVMPY_MIGRATION_KEY."""
    from . import migration

    host, port = migration.parse_address(address)
    key = None
    if auth_key is not None:
        try:
            key = bytes.fromhex(auth_key)
        except ValueError:
            raise ControlError("migrate: auth_key must be hex") from None
    return migration.migrate(
        session, host, port, progress=progress, downtime_ms=downtime_ms, max_rounds=max_rounds,
        key=key,
    )  # fmt: skip


def balloon(session: VmSession, size: int | None = None) -> dict[str, Any]:
    """Set the balloon's target to `size` bytes (the memory the guest should give back; 0
    gives everything back), or with no size only report. Returns the balloon's state, the
    guest's latest memory statistics (asked for, up to 1 s) and what guest RAM occupies."""
    from ..ksm.usage import vm_memory
    from ..vmm.virtio import balloon as find_balloon

    session.check_live()
    dev = find_balloon(session.machine)
    if dev is None:
        raise ControlError("this VM has no balloon device (start it with --balloon)")
    ram = session.machine.memory.size
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= ram:
            raise ControlError(
                f"balloon: the size must be between 0 and the guest's RAM ({ram} bytes)"
            )
        dev.set_target(size // 4096)
    stats = dev.fresh_stats(1.0) if dev.running else dict(dev.last_stats)
    return {
        "target_bytes": dev.num_pages * 4096,
        "actual_bytes": dev.actual * 4096,
        "ballooned_bytes": dev.ballooned.count * 4096,
        "reported_bytes": dev.reported_bytes,
        "discarded_bytes": dev.discarded_bytes,
        "refused_pfns": dev.refused_pfns,
        "driver": dev.running,
        "guest_stats": stats,
        "ram": vm_memory(session.machine.memory.regions),
    }


def stop(session: VmSession) -> dict[str, Any]:
    session.check_live()
    session.machine.request_stop(StopReason.INTERRUPTED, "stopped by the control channel")
    return {"state": "stopping"}


def ctrl_alt_del(session: VmSession) -> dict[str, Any]:
    """Press Ctrl-Alt-Del on the machine's keyboard controller (Firecracker's SendCtrlAltDel:
    Linux reboots, or with reboot=k ... stops). A machine without one is told so."""
    session.check_live()
    for device in session.machine.devices.values():
        press = getattr(device, "ctrl_alt_del", None)
        if callable(press):
            press()
            return {"sent": "ctrl-alt-del"}
    raise ControlError(
        "this machine has no i8042 keyboard controller to send Ctrl-Alt-Del to (Linux machines "
        "have one; SDK guests do not)"
    )


# Each op: (function, {argument: type}, required arguments).
OPS: dict[str, tuple[Callable[..., dict], dict[str, type | tuple[type, ...]], set[str]]] = {
    "pause": (pause, {}, set()),
    "resume": (resume, {}, set()),
    "stats": (stats, {}, set()),
    "snapshot": (snapshot, {"path": str, "store": str}, {"path"}),
    "migrate": (
        migrate,
        {"address": str, "downtime_ms": (int, float), "max_rounds": int, "auth_key": str},
        {"address"},
    ),
    "stop": (stop, {}, set()),
    "ctrl_alt_del": (ctrl_alt_del, {}, set()),
    "balloon": (balloon, {"size": int}, set()),
}


def parse_request(line: bytes) -> tuple[str, dict[str, Any]]:
    """Check one request line; returns (op, arguments) or raises ControlError."""
    try:
        req = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise ControlError("a request must be one JSON object per line") from None
    if not isinstance(req, dict):
        raise ControlError("a request must be a JSON object with an 'op'")
    op = req.pop("op", None)
    if not isinstance(op, str) or op not in OPS:
        raise ControlError(f"unknown op {op!r}: choose one of {', '.join(OPS)}")
    _fn, types, required = OPS[op]
    unknown = sorted(set(req) - set(types))
    if unknown:
        raise ControlError(f"{op} takes no argument {unknown[0]!r}")
    missing = sorted(required - set(req))
    if missing:
        raise ControlError(f"{op} needs {', '.join(missing)}")
    for name, value in req.items():
        kind = types[name]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ControlError(f"{op}: {name} has the wrong type")
    return op, req


def call(session: VmSession, op: str, args: dict[str, Any], progress: Progress | None = None):
    fn = OPS[op][0]
    if op == "migrate":
        return fn(session, progress=progress, **args)
    return fn(session, **args)


# --- the server ----------------------------------------------------------------------------------


class ControlServer:
    """Serves the control protocol for `session` on the unix socket `path` (mode 0600)."""

    def __init__(self, session: VmSession, path: str | os.PathLike):
        self.session = session
        self.path = Path(path)
        self._sock = _listen(self.path)
        self._closed = False
        self._busy = threading.Condition()
        self._in_flight = 0
        self._conns: set[socket.socket] = set()
        self._thread = helper_thread(self._accept_loop, name="kvmpy-control")

    def close(self, wait: float = 10.0) -> None:
        """Stop serving. Requests under way (a migration that is giving up because the VM
        stopped) get `wait` seconds to finish, so the machine outlives them."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        with self._busy:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RD)  # idle connections end their recv()
            self._busy.wait_for(lambda: self._in_flight == 0, timeout=wait)

    def __enter__(self) -> ControlServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            helper_thread(self._serve, conn, name="kvmpy-control-conn")

    def _serve(self, conn: socket.socket) -> None:
        with self._busy:
            self._conns.add(conn)
        try:
            self._serve_lines(conn)
        finally:
            with self._busy:
                self._conns.discard(conn)
            conn.close()

    def _serve_lines(self, conn: socket.socket) -> None:
        buf = b""
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip() and not self._answer(conn, line):
                    return
            if len(buf) > MAX_REQUEST:
                self._send(conn, {"ok": False, "error": "request line too long"})
                _linger(conn)
                return

    def _answer(self, conn: socket.socket, line: bytes) -> bool:
        with self._busy:
            if self._closed:
                return self._send(conn, {"ok": False, "error": "the VM has stopped"})
            self._in_flight += 1
        try:
            op, args = parse_request(line)
            result = call(self.session, op, args, lambda p: self._send(conn, {"progress": p}))
            reply: dict[str, Any] = {"ok": True, "result": result}
        except KvmpyError as e:
            reply = {"ok": False, "error": str(e)}
        except Exception as e:  # a bug must not take the VM down with it
            log.exception("control request failed")
            reply = {"ok": False, "error": f"internal error: {e!r}"}
        finally:
            with self._busy:
                self._in_flight -= 1
                self._busy.notify_all()
        return self._send(conn, reply)

    @staticmethod
    def _send(conn: socket.socket, doc: dict) -> bool:
        try:
            conn.sendall(json.dumps(doc).encode() + b"\n")
            return True
        except OSError:
            return False


def _linger(conn: socket.socket, limit: int = 1 << 20) -> None:
    """Read (a bounded amount of) what the client still sends before closing: closing with
    unread data resets the connection, and the client would lose the error reply."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(1.0)
        while limit > 0 and (data := conn.recv(65536)):
            limit -= len(data)


def _listen(path: Path) -> socket.socket:
    return listen_unix(path, what="the control socket", option="--control path",
                       error=ControlError, backlog=8)  # fmt: skip


# --- the client ----------------------------------------------------------------------------------


#: How long `request` waits for each reply line by default. Snapshots and migrations reply
#: less often (a snapshot writes all of memory first; a migration's stop-and-copy waits up to
#: 5 s for the destination), so they get longer.
DEFAULT_TIMEOUT_S = 5.0
SLOW_OPS_TIMEOUT_S = {"snapshot": 120.0, "migrate": 60.0}


def default_timeout(op: str) -> float:
    return SLOW_OPS_TIMEOUT_S.get(op, DEFAULT_TIMEOUT_S)


def request(
    path: str | os.PathLike,
    op: str,
    args: dict[str, Any] | None = None,
    progress: Progress | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Send one request to the control socket at `path` and return its result (raises
    ControlError with the server's message on failure). `timeout` bounds the connection and
    the wait for each reply line (default: `default_timeout(op)`); a VMM that accepts but
    does not answer (stopped, hung) is a ControlError naming the operation."""
    if timeout is None:
        timeout = default_timeout(op)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(os.fspath(path))
        except TimeoutError:
            raise ControlError(
                f"{op}: could not connect to {path} within {timeout:g} s (the VMM does not "
                "accept connections: stopped or hung?)"
            ) from None
        except OSError as e:
            why = "no VM serves it" if e.errno in (errno.ECONNREFUSED, errno.ENOENT) else e.strerror
            raise ControlError(f"cannot reach the control socket {path}: {why}") from None
        sock.sendall(json.dumps({"op": op, **(args or {})}).encode() + b"\n")
        f = sock.makefile("rb")
        for line in f:
            doc = json.loads(line)
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            if "progress" in doc:
                if progress is not None:
                    progress(doc["progress"])
                continue
            if doc.get("ok"):
                return doc.get("result") or {}
            raise ControlError(doc.get("error") or "the request failed")
        raise ControlError("the VM closed the control connection without answering")
    except TimeoutError:
        raise ControlError(
            f"{op}: no answer from {path} within {timeout:g} s (the VMM may be stopped or hung; "
            "--timeout waits longer)"
        ) from None
    except ValueError as e:
        raise ControlError(f"{op}: no valid answer from {path}: {e}") from None
    except OSError as e:
        raise ControlError(f"{op}: the connection to {path} failed: {e.strerror or e}") from None
    finally:
        sock.close()


def serve_and_run(
    session: VmSession, control: str | os.PathLike | None, timeout: float | None = None
):
    """Run the session in this thread, serving the control channel meanwhile (if given)."""
    server = ControlServer(session, control) if control else None
    try:
        return session.run(timeout, handle_sigint=True)
    finally:
        if server is not None:
            server.close()
