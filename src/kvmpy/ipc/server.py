"""The ipc server: starts a sender VMM and a receiver VMM and connects them.

It plays the part of QEMU's ivshmem-server: it creates the shared region (a sealed memfd),
one eventfd per peer and doorbell vector, and for pio a socket pair for the relay, and hands
each VMM its share over a unix socket (SCM_RIGHTS) together with its configuration. It then
releases the two guests' start barriers run after run (the receiver first), collects each
VMM's result, and notices a VMM that dies, never starts or stalls: the other is stopped and
the caller gets one IpcError saying which and when.

Peers are processes (`python -m kvmpy.ipc.peer FD`) by default, or threads in this process
(same_process=True), which run the same code over the same kind of sockets.
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass

from ..memory import PAGE_SIZE
from .control import IpcError, Link, PeerGone, link_pair
from .layout import EINVAL, EPROTO, MAGIC, SHM_HEADER, VERSION, Mechanism, SharedLayout
from .peer import PeerSpec, serve

ROLES = ("sender", "receiver")
#: How long a VMM may take to start (import, build its VM) before it counts as not started.
START_TIMEOUT = 60.0
#: Between releasing the receiver's barrier and the sender's: the receiver is then back in
#: its guest, waiting, when the sender's first byte goes out.
RELEASE_GAP = 0.001
#: How long a stopped peer gets to report before it is killed.
GRACE = 10.0
#: What the example guests put in the info page's error field.
GUEST_ERRORS = {
    EPROTO: "EPROTO: the peer's ring indices are impossible",
    EINVAL: "EINVAL: parameters it cannot use",
}


@dataclass
class PeerHandle:
    role: str
    link: Link
    proc: subprocess.Popen | None = None
    thread: threading.Thread | None = None
    stderr: object = None
    result: dict | None = None
    error: str | None = None
    ready: bool = False
    barrier: int | None = None
    gone: bool = False

    def describe(self) -> str:
        if self.proc is not None:
            return f"the {self.role} VMM (pid {self.proc.pid})"
        return f"the {self.role} VMM (thread)"

    def exit_status(self, wait: float = 2.0) -> str:
        if self.proc is None:
            return ""
        try:
            code = self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            return ""
        if code < 0:
            try:
                import signal

                name = signal.Signals(-code).name
            except ValueError:
                name = str(-code)
            return f", killed by {name}"
        return f", exit status {code}"

    def stderr_tail(self) -> str:
        if self.stderr is None:
            return ""
        try:
            self.stderr.seek(0)
            text = self.stderr.read().decode(errors="replace").strip()
        except (OSError, ValueError):
            return ""
        lines = [line for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else ""


class Session:
    """One sender and one receiver, for one configuration."""

    def __init__(
        self,
        specs: dict[str, PeerSpec],
        *,
        same_process: bool = False,
        start_timeout: float = START_TIMEOUT,
        timeout: float = 600.0,
        any_exit_code: bool = False,
    ):
        self.specs = specs
        #: A guest that exits with a nonzero code is a result, not a failure (user guests).
        self.any_exit_code = any_exit_code
        self.mechanism = Mechanism.parse(specs["sender"].mechanism)
        self.same_process = same_process
        self.start_timeout = start_timeout
        self.timeout = timeout
        self.peers: dict[str, PeerHandle] = {}
        self._fds: dict[str, dict[str, int]] = {role: {} for role in ROLES}
        self._owned: list[int] = []

    # --- resources ---------------------------------------------------------------------------

    def _make_resources(self) -> None:
        spec = self.specs["sender"]
        if self.mechanism.shared_memory:
            layout = SharedLayout.for_size(spec.shm_size)
            fd = os.memfd_create("kvmpy-ipc-shm", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            self._owned.append(fd)
            os.ftruncate(fd, layout.size)
            # Neither VMM can shrink the region under the other's mapping (SIGBUS).
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            os.pwrite(fd, SHM_HEADER.pack(MAGIC, VERSION, 2, layout.size, layout.ring_size), 0)
            for role in ROLES:
                self._fds[role]["shm"] = fd
        if self.mechanism is Mechanism.SHM_IRQ:
            vectors = spec.vectors
            bells = {
                role: [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(vectors)] for role in ROLES
            }
            for fds in bells.values():
                self._owned.extend(fds)
            for role, other in (("sender", "receiver"), ("receiver", "sender")):
                for v in range(vectors):
                    self._fds[role][f"irq{v}"] = bells[role][v]
                    self._fds[role][f"peer_irq{v}"] = bells[other][v]
        if self.mechanism is Mechanism.PIO:
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            for s in (a, b):
                # Room for a few exits' worth in flight, not the whole transfer: the relay's
                # backpressure is the sender's flow control.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 * 1024)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
            self._owned.extend([a.detach(), b.detach()])
            self._fds["sender"]["relay"] = self._owned[-2]
            self._fds["receiver"]["relay"] = self._owned[-1]

    def _start_peer(self, role: str) -> PeerHandle:
        ours, theirs = link_pair(f"the {role} VMM", "the ipc server")
        handle = PeerHandle(role, ours)
        if self.same_process:
            t = threading.Thread(target=_serve_thread, args=(theirs,), name=f"ipc-{role}")
            handle.thread = t
            t.start()
        else:
            fd = theirs.sock.fileno()
            os.set_inheritable(fd, True)
            # Kept until teardown: the peer's last words if it dies.
            handle.stderr = tempfile.TemporaryFile()  # noqa: SIM115
            try:
                handle.proc = subprocess.Popen(
                    [sys.executable, "-m", "kvmpy.ipc.peer", str(fd)],
                    pass_fds=(fd,),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=handle.stderr,
                    # Out of the terminal's process group: Ctrl-C reaches the server, which
                    # stops the peers by closing their links, instead of three tracebacks.
                    start_new_session=True,
                )
            finally:
                theirs.close()
        spec = self.specs[role]
        names = list(self._fds[role])
        ours.send(
            {"op": "config", "spec": asdict(spec), "fds": names},
            [self._fds[role][n] for n in names],
        )
        return handle

    # --- the run -----------------------------------------------------------------------------

    def run(self) -> dict[str, dict]:
        """Run both peers to the end; their result dicts by role, or IpcError."""
        from ..hv.signals import install_kick_handler

        if self.same_process:
            install_kick_handler()
        try:
            self._make_resources()
            for role in ROLES:
                self.peers[role] = self._start_peer(role)
            self._serve()
            return {role: self.peers[role].result for role in ROLES}
        finally:
            self._teardown()

    def _serve(self) -> None:
        t_start = time.monotonic()
        deadline_start = t_start + self.start_timeout
        deadline = t_start + self.start_timeout + self.timeout
        handles = list(self.peers.values())
        while not all(h.result is not None for h in handles):
            now = time.monotonic()
            if not all(h.ready for h in handles) and now > deadline_start:
                late = [h for h in handles if not h.ready]
                self._fail(late[0], f"did not start within {self.start_timeout:g} s", started=False)
            if now > deadline:
                self._fail(None, f"the transfer did not finish within {self.timeout:g} s")
            poller = select.poll()
            for h in handles:
                if h.result is None:
                    poller.register(h.link.fileno(), select.POLLIN)
            events = poller.poll(200)
            for fd, _ev in events:
                h = next(x for x in handles if x.link.fileno() == fd)
                try:
                    msg, fds = h.link.recv(1.0, None)
                except PeerGone:
                    h.gone = True
                    self._fail(h, "died", started=h.ready)
                except IpcError as e:
                    self._fail(h, f"broke the protocol: {e}", started=h.ready)
                for x in fds:
                    os.close(x)
                self._handle(h, msg)
            for h in handles:
                if h.proc is not None and h.result is None and h.proc.poll() is not None:
                    # Exited without a word: the link's EOF may still be in flight.
                    time.sleep(0.05)
                    if h.result is None:
                        h.gone = True
                        self._fail(h, "died", started=h.ready)

    def _handle(self, h: PeerHandle, msg: dict) -> None:
        op = msg["op"]
        if op == "ready":
            h.ready = True
        elif op == "barrier":
            h.barrier = msg.get("run")
            s, r = self.peers["sender"], self.peers["receiver"]
            if s.barrier is not None and s.barrier == r.barrier:
                run = s.barrier
                s.barrier = r.barrier = None
                r.link.send({"op": "go", "run": run})
                time.sleep(RELEASE_GAP)
                s.link.send({"op": "go", "run": run})
        elif op == "result":
            h.result = msg
            if msg.get("error"):
                self._fail(h, f"stopped: {msg['error']}", started=True, result=msg)
            elif msg.get("stop_reason") != "exit" or (
                msg.get("exit_code") != 0 and not self.any_exit_code
            ):
                why = msg.get("message") or msg.get("stop_reason")
                code = msg.get("guest_error") or 0
                if code:
                    why += f"; the guest reports {GUEST_ERRORS.get(code, f'error {code}')}"
                out = msg.get("output", "").strip()
                detail = f" (guest output: {out.splitlines()[-1]})" if out else ""
                self._fail(h, f"'s guest stopped: {why}{detail}", started=True, result=msg)
        elif op == "error":
            h.result = msg
            self._fail(h, f"failed: {msg.get('message')}", started=h.ready, result=msg)

    def _fail(
        self, h: PeerHandle | None, what: str, *, started: bool = True, result: dict | None = None
    ) -> None:
        """Stop the other peer(s), wait briefly for their reports, raise one clear error."""
        others = [x for x in self.peers.values() if x is not h and x.result is None]
        sep = "" if what.startswith("'") else " "
        reason = f"{h.describe()}{sep}{what}" if h is not None else what
        for o in others:
            try:
                o.link.send({"op": "abort", "reason": f"stopped because {reason}"})
            except IpcError:
                pass
        end = time.monotonic() + GRACE
        for o in others:
            while o.result is None and not o.gone and time.monotonic() < end:
                try:
                    msg, fds = o.link.recv(max(0.01, end - time.monotonic()), None)
                except IpcError:
                    break
                for x in fds:
                    os.close(x)
                if msg["op"] in ("result", "error"):
                    o.result = msg
        if h is not None and h.gone:
            status = h.exit_status()
            tail = h.stderr_tail()
            reason = f"{h.describe()} died{status}" + (f": {tail}" if tail else "")
            if not started:
                reason += " before its VM started"
        parts = [reason]
        for o in others:
            if o.result is not None and (o.result.get("error") or o.result.get("message")):
                parts.append(
                    f"the {o.role} was stopped ({o.result.get('error') or o.result.get('message')})"
                )
            else:
                parts.append(f"the {o.role} was stopped")
        raise IpcError("; ".join(parts))

    def _teardown(self) -> None:
        for h in self.peers.values():
            h.link.close()
        for h in self.peers.values():
            if h.proc is not None:
                try:
                    h.proc.wait(GRACE)
                except subprocess.TimeoutExpired:
                    h.proc.kill()
                    h.proc.wait()
            if h.thread is not None:
                h.thread.join(GRACE)
            if h.stderr is not None:
                h.stderr.close()
        for fd in self._owned:
            try:
                os.close(fd)
            except OSError:
                pass
        self._owned.clear()


def _serve_thread(link: Link) -> None:
    # The peer closes the descriptors it was given; in this process they are duplicates
    # that arrived over the socket like in the other mode, so the server's stay open.
    try:
        serve(link)
    finally:
        link.close()


def page_round(n: int) -> int:
    return (n + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
