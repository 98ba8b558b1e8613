"""Live migration over TCP: pre-copy with KVM's dirty log (docs/persist.md).

Source (`migrate`, run from a thread other than the vCPU's, e.g. a control connection):

  1. HELLO with the machine config; the destination builds an empty machine and says READY.
  2. Round 0 sends every non-zero page while the guest runs; KVM logs the pages it dirties
     meanwhile (KVM_MEM_LOG_DIRTY_PAGES), and GuestMemory.on_write those the VMM writes.
  3. Each further round sends the pages dirtied during the previous one, until what remains
     would take less than the downtime goal at the measured rate (and is small, or stopped
     shrinking), or the round limit is hit.
  4. The vCPU is paused (stop-and-copy): the last dirty pages and the whole vCPU, VM and VMM
     state go over; the destination puts the state in and answers READY_TO_RUN.
  5. The source sends GO and ends its run (StopReason.MIGRATED); the destination runs the VM.

Until the source has READY_TO_RUN, any failure (refused connection, a dropped link, an error
on the destination) resumes the VM on the source, which says so (MigrationError). The
destination runs the VM only on GO, so the two never run at once; the one unsafe instant is a
link that dies after GO has left the source and before it arrives (the VM then runs nowhere).

Downtime is the time from the source vCPU's stop to the destination vCPU's first KVM_RUN:
the source's part (pause to GO sent), one trip over the link (half the round-trip time measured
at the start), and the destination's part (GO received to KVM_RUN). Both sides report it.

Wire format: every message is a 9-byte header (type byte, u64 payload length) and a payload.
"""

from __future__ import annotations

import contextlib
import ctypes as C
import json
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import KvmpyError
from ..machine import Machine
from ..memory import PAGE_SIZE, GuestMemory
from ..result import Stop, StopReason
from ..vmm import builder
from . import lazy, memfile, state
from .errors import ControlError, MigrationError, SnapshotError
from .session import VmSession

log = logging.getLogger(__name__)

PROTOCOL = "kvmpy-migration"
VERSION = 1

DEFAULT_DOWNTIME_MS = 30.0
DEFAULT_MAX_ROUNDS = 30
#: What the stop-and-copy phase costs besides sending pages (state capture and transfer,
#: restore on the destination, the GO round trip); measured ~3-6 ms on loopback here.
FIXED_STOP_COST_MS = 8.0
#: Only this share of the downtime budget is planned for pages: the final round gathers
#: scattered pages and runs while the destination also applies the state.
BUDGET_SAFETY = 0.5
#: A final round this small (1 MiB) is not worth another pre-copy round.
SMALL_FINAL_PAGES = 256
#: A round must send at least this much for its rate to replace the estimate.
RATE_MIN_BYTES = 1 << 20
#: Pages between two progress reports within a round (16 MiB).
PROGRESS_PAGES = 4096
#: Most pages in one PAGESET message (16 MiB): bounds the receiver's buffer.
SET_PAGES = 4096
CONNECT_TIMEOUT_S = 10.0
#: How long either side waits for the other before calling the link dead.
IO_TIMEOUT_S = 60.0
MAX_JSON = 64 << 20

HDR = struct.Struct("<BQ")
RUN = struct.Struct("<QII")  # first logical page, page count, round
SET = struct.Struct("<II")  # round, page count; then u64 page numbers, then the pages

# Message types.
HELLO, READY, PING, PAGES, PAGESET, ZEROSET, ROUND_END, ROUND_ACK = b"HRTPAZDa"
STATE, READY_TO_RUN, GO, RUNNING, ERROR = b"SKGOE"

Progress = Callable[[dict[str, Any]], None]


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise MigrationError(f"not an address: {text!r} (use HOST:PORT)")
    try:
        value = int(port, 10)
    except ValueError:
        raise MigrationError(f"not a port number in {text!r}") from None
    if not 0 <= value <= 65535:
        raise MigrationError(f"port out of range in {text!r}")
    return host.strip("[]"), value


# --- framing -------------------------------------------------------------------------------------


class Link:
    """A TCP connection carrying the migration's messages."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(IO_TIMEOUT_S)
        self._hdr = bytearray(HDR.size)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, kind: int, *parts) -> None:
        views = [memoryview(p).cast("B") for p in parts]
        length = sum(len(v) for v in views)
        bufs = [memoryview(HDR.pack(kind, length)), *views]
        while bufs:
            n = self.sock.sendmsg(bufs)
            while bufs and n >= len(bufs[0]):
                n -= len(bufs[0])
                bufs.pop(0)
            if bufs and n:
                bufs[0] = bufs[0][n:]

    def send_json(self, kind: int, doc: dict) -> None:
        self.send(kind, json.dumps(doc, separators=(",", ":")).encode())

    def recv_into(self, view: memoryview) -> None:
        while len(view):
            n = self.sock.recv_into(view)
            if n == 0:
                raise ConnectionError("the other side closed the connection")
            view = view[n:]

    def recv_header(self) -> tuple[int, int]:
        self.recv_into(memoryview(self._hdr))
        return HDR.unpack(self._hdr)

    def recv_bytes(self, length: int, limit: int = MAX_JSON) -> bytes:
        if length > limit:
            raise MigrationError(f"a migration message of {length} bytes is over the limit")
        buf = bytearray(length)
        self.recv_into(memoryview(buf))
        return bytes(buf)

    def recv_json(self, length: int) -> dict:
        try:
            doc = json.loads(self.recv_bytes(length))
        except (ValueError, UnicodeDecodeError):
            raise MigrationError("the other side sent a malformed message") from None
        if not isinstance(doc, dict):
            raise MigrationError("the other side sent a malformed message")
        return doc

    def expect(self, kind: int) -> dict:
        got, length = self.recv_header()
        if got == ERROR:
            raise MigrationError(f"the destination failed: {self.recv_json(length).get('error')}")
        if got != kind:
            raise MigrationError(f"protocol error: expected {chr(kind)!r}, got {chr(got)!r}")
        return self.recv_json(length)


# --- the source ----------------------------------------------------------------------------------


class DirtyTracker:
    """KVM's dirty log for every RAM slot, plus the pages the VMM wrote (on_write)."""

    def __init__(self, machine: Machine):
        self.machine = machine
        self.memory = machine.memory
        self.layout = memfile.logical_layout(self.memory)
        self.bitmaps = [(C.c_uint64 * -(-(r.size // PAGE_SIZE) // 64))() for r, _ in self.layout]
        self.vmm_pages: set[int] = set()
        self.carried = np.empty(0, dtype=np.int64)

    def start(self) -> None:
        self.memory.on_write = self._vmm_write
        for r, _ in self.layout:
            self.memory.set_dirty_logging(r, True)
        self.collect()  # start from a clean log

    def stop(self) -> None:
        self.memory.on_write = None
        for r, _ in self.layout:
            with contextlib.suppress(Exception):
                self.memory.set_dirty_logging(r, False)

    def _vmm_write(self, gpa: int, length: int) -> None:
        # Runs in the vCPU thread; set.add is atomic under the GIL.
        region = self.memory.region_at(gpa)
        base = next(b for r, b in self.layout if r is region)
        first = (base + gpa - region.gpa) // PAGE_SIZE
        last = (base + gpa - region.gpa + max(length, 1) - 1) // PAGE_SIZE
        self.vmm_pages.update(range(first, last + 1))

    def collect(self) -> np.ndarray:
        """Logical page numbers dirtied since the last call (sorted), with any carried ones."""
        vmm, self.vmm_pages = self.vmm_pages, set()
        parts = [self.carried]
        self.carried = np.empty(0, dtype=np.int64)
        for (r, base), bitmap in zip(self.layout, self.bitmaps, strict=True):
            self.machine.vm.get_dirty_log(r, bitmap)
            bits = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), bitorder="little")
            parts.append(np.flatnonzero(bits[: r.size // PAGE_SIZE]) + base // PAGE_SIZE)
        if vmm:
            parts.append(np.fromiter(vmm, dtype=np.int64))
        return np.unique(np.concatenate(parts))


def _page_arrays(memory: GuestMemory) -> list[tuple[int, int, np.ndarray]]:
    """(first logical page, page count, pages as an (n, 512) uint64 array) per RAM region."""
    return [
        (base // PAGE_SIZE, r.size // PAGE_SIZE,
         np.frombuffer(r.view, dtype=np.uint64).reshape(-1, PAGE_SIZE // 8))
        for r, base in memfile.logical_layout(memory)
    ]  # fmt: skip


class _Sender:
    def __init__(self, link: Link, memory: GuestMemory, tick: Callable[[int], None] | None = None):
        self.link = link
        self.memory = memory
        self.arrays = _page_arrays(memory)
        #: Called with the pages sent so far in the round, every PROGRESS_PAGES or so.
        self.tick = tick
        self._next_tick = PROGRESS_PAGES

    def _progress(self, done: int) -> None:
        if self.tick is not None and done >= self._next_tick:
            self._next_tick = done + PROGRESS_PAGES
            self.tick(done)

    def round_total(self) -> int:
        """Pages round 0 will look at (the data the memfds hold; zero pages are skipped)."""
        return sum(n for r, _ in memfile.logical_layout(self.memory)
                   for _, n in memfile.data_ranges(r)) // PAGE_SIZE  # fmt: skip

    def send_pages(self, pages: np.ndarray, rnd: int) -> tuple[int, int]:
        """Send the (sorted) logical `pages`: non-zero ones with their contents (PAGESET), zero
        ones by number (ZEROSET; the destination may hold older data there). Dirty pages are
        scattered, so they are gathered with one numpy copy per message rather than sent one
        small message each. Returns (pages, bytes of page data sent)."""
        sent = done = 0
        self._next_tick = PROGRESS_PAGES
        for first, count, arr in self.arrays:
            lo, hi = np.searchsorted(pages, [first, first + count])
            local = pages[lo:hi] - first
            for i in range(0, len(local), SET_PAGES):
                part = local[i : i + SET_PAGES]
                data = arr[part]  # gathered copy, (n, 512)
                nonzero = data.any(axis=1)
                numbers = (part + first).astype("<u8")
                if nonzero.any():
                    keep = data[nonzero]
                    nums = numbers[nonzero]
                    self.link.send(PAGESET, SET.pack(rnd, len(nums)), nums.tobytes(), keep.data)
                    sent += keep.nbytes
                if not nonzero.all():
                    nums = numbers[~nonzero]
                    self.link.send(ZEROSET, SET.pack(rnd, len(nums)), nums.tobytes())
                done += len(part)
                self._progress(done)
        return len(pages), sent

    def send_all(self, rnd: int) -> tuple[int, int]:
        """Round 0: every non-zero page (the destination's memory starts zero)."""
        pages = sent = 0
        self._next_tick = PROGRESS_PAGES
        for page, view in memfile.written_runs(self.memory):
            self.link.send(PAGES, RUN.pack(page, len(view) // PAGE_SIZE, rnd), view)
            pages += len(view) // PAGE_SIZE
            sent += len(view)
            self._progress(pages)
        return pages, sent


def migrate(
    session: VmSession,
    host: str,
    port: int,
    *,
    progress: Progress | None = None,
    downtime_ms: float | None = None,
    max_rounds: int | None = None,
) -> dict[str, Any]:
    """Live-migrate the session's VM to a `kvmpy migrate-receive` at host:port."""
    goal_ms = DEFAULT_DOWNTIME_MS if downtime_ms is None else float(downtime_ms)
    rounds_limit = DEFAULT_MAX_ROUNDS if max_rounds is None else int(max_rounds)
    if goal_ms <= 0 or rounds_limit < 1:
        raise MigrationError("the downtime goal and the round limit must be positive")
    with session.exclusive("a migration"):
        return _migrate(session, host, port, progress, goal_ms, rounds_limit)


def _migrate(session, host, port, progress, goal_ms, rounds_limit) -> dict[str, Any]:
    machine = session.machine
    session.check_live()
    t0 = time.monotonic()
    where = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
    except OSError as e:
        raise MigrationError(
            f"cannot connect to {where}: {e.strerror or e}; the VM keeps running here"
        ) from None
    link = Link(sock)
    tracker = DirtyTracker(machine)
    committed = False
    try:
        # Populate a lazily restored memory first: its unserved pages are holes in the memfd.
        lazy.settle(machine.memory)
        link.send_json(
            HELLO,
            {
                "protocol": PROTOCOL,
                "version": VERSION,
                "state_version": state.STATE_VERSION,
                "config": state.config_to_dict(machine),
                "memory": machine.memory.size,
                "page_size": PAGE_SIZE,
            },
        )
        link.expect(READY)
        # One trip over the link is part of the downtime; the best of a few round trips
        # estimates it (a busy destination answers some late).
        trips = []
        for _ in range(5):
            t_ping = time.monotonic()
            link.send_json(PING, {})
            link.expect(PING)
            trips.append(time.monotonic() - t_ping)
        one_way_ms = min(trips) * 1e3 / 2
        current = {"round": 0}

        def tick(done: int) -> None:
            if progress is not None:
                progress({"phase": "sending", "round": current["round"], "sent": done})

        sender = _Sender(link, machine.memory, tick)
        tracker.start()
        rounds: list[dict[str, Any]] = []
        rate = None  # bytes per second, end to end, of the last round that said much
        rnd = 0
        dirty = np.empty(0, dtype=np.int64)
        previous: int | None = None
        budget_s = max(goal_ms - FIXED_STOP_COST_MS, 1.0) / 1e3 * BUDGET_SAFETY
        while True:
            if session.state == "stopped":
                raise MigrationError("the VM stopped during the migration")
            current["round"] = rnd
            if progress is not None:
                total = sender.round_total() if rnd == 0 else len(dirty)
                progress({"phase": "round", "round": rnd, "total": total})
            t = time.monotonic()
            if rnd == 0:
                pages, sent = sender.send_all(rnd)
            else:
                pages, sent = sender.send_pages(dirty, rnd)
            # The destination acknowledges each round once it has stored it: the rate is then
            # what the whole path sustains, and no backlog is left for the stop-and-copy.
            link.send(ROUND_END, RUN.pack(0, pages, rnd))
            link.expect(ROUND_ACK)
            dt = time.monotonic() - t
            if dt > 0 and (rate is None or sent >= RATE_MIN_BYTES):
                rate = max(sent, 1) / dt
            info = {"round": rnd, "pages": pages, "bytes": sent, "seconds": round(dt, 6)}
            rounds.append(info)
            rnd += 1
            # What the next round would send: the pages dirtied while this one was sent.
            dirty = tracker.collect()
            if progress is not None:
                progress({**info, "phase": "pre-copy", "rate_mib_s": _mib_s(sent, dt),
                          "dirty": len(dirty)})  # fmt: skip
            fits = rate is not None and len(dirty) * PAGE_SIZE <= rate * budget_s
            # While rounds still halve what is left, one more is cheap and shortens the
            # stop-and-copy further, which keeps the downtime low on a busy host too.
            shrinking = previous is None or len(dirty) <= previous // 2
            previous = len(dirty)
            small = len(dirty) <= SMALL_FINAL_PAGES
            if rnd >= rounds_limit or (fits and (small or not shrinking)):
                tracker.carried = dirty  # the stop-and-copy round sends them
                break

        final: dict[str, Any] = {}

        def stop_and_copy() -> None:
            nonlocal committed
            # The guest stopped when the vCPU left KVM_RUN, a little before this job started.
            t_stop = session.paused_at
            marks = {"job_start": time.monotonic()}
            # Devices hold still from the last dirty pages to the state (virtio I/O threads
            # write guest RAM on their own); they go on only if the VM stays here.
            with state.devices_quiesced(machine, resume=lambda: not committed):
                dirty = tracker.collect()
                marks["dirty_log"] = time.monotonic()
                pages, sent = sender.send_pages(dirty, rnd)
                link.send(ROUND_END, RUN.pack(0, pages, rnd))
                marks["pages_sent"] = time.monotonic()
                st = state.capture(machine)
                marks["state_captured"] = time.monotonic()
            link.send_json(STATE, st)
            link.expect(ROUND_ACK)  # the last round's, sent before the state was read
            ready = link.expect(READY_TO_RUN)
            t_go = marks["ready_to_run"] = time.monotonic()
            source_ms = (t_go - t_stop) * 1e3
            last = {
                "round": rnd,
                "pages": pages,
                "bytes": sent,
                "seconds": round(marks["pages_sent"] - marks["dirty_log"], 6),
            }
            all_rounds = [*rounds, last]
            link.send_json(
                GO,
                {
                    "source_stop_ms": source_ms,
                    "one_way_ms": one_way_ms,
                    "rounds": len(all_rounds),
                    "pages_per_round": [r["pages"] for r in all_rounds],
                    "source_total_s": t_go - t0,
                },
            )
            committed = True
            session.end_run(Stop(StopReason.MIGRATED, 0, f"migrated to {where}"))
            # The destination reports its part of the downtime once its vCPU runs. The VM is
            # over here either way, so waiting in the paused vCPU thread costs nothing.
            dest_ms = None
            with contextlib.suppress(OSError, MigrationError, ConnectionError):
                link.sock.settimeout(5.0)
                dest_ms = link.expect(RUNNING).get("destination_resume_ms")
            final.update(
                t_stop=t_stop,
                source_ms=source_ms,
                dest_ms=dest_ms,
                final_pages=pages,
                final_bytes=sent,
                destination_restore_ms=ready.get("restore_ms"),
                rounds=all_rounds,
                marks_ms={k: round((v - t_stop) * 1e3, 3) for k, v in marks.items()},
            )
            session.extra["migration"] = _report(final, t0, one_way_ms, goal_ms, where,
                                                 rounds_limit, rate, machine)  # fmt: skip

        session.call_paused(stop_and_copy)
    except (OSError, ConnectionError, MigrationError, SnapshotError, ControlError) as e:
        if session.state == "stopped" and not committed:
            raise MigrationError(
                f"the VM stopped during the migration to {where}; nothing was handed over"
            ) from None
        if committed:
            raise MigrationError(
                f"the VM was handed over to {where}, but the link failed afterwards: {e}"
            ) from None
        msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        log.warning("migration to %s failed (%s); the VM keeps running here", where, msg)
        raise MigrationError(
            f"migration to {where} failed: {msg}; the VM keeps running here"
        ) from None
    finally:
        tracker.stop()
        link.close()
    result = session.extra["migration"]
    if progress is not None:
        progress({"phase": "done", "round": result["rounds"] - 1, "pages": final["final_pages"],
                  "bytes": final["final_bytes"]})  # fmt: skip
    return result


def _report(final, t0, one_way_ms, goal_ms, where, rounds_limit, rate, machine) -> dict:
    dest_ms = final["dest_ms"]
    downtime = final["source_ms"] + one_way_ms + (dest_ms or 0.0)
    return {
        "destination": where,
        "total_s": round(time.monotonic() - t0, 6),
        "downtime_ms": round(downtime, 3),
        "downtime_parts_ms": {
            "source_stop_and_copy": round(final["source_ms"], 3),
            "link_one_way": round(one_way_ms, 3),
            "destination_resume": None if dest_ms is None else round(dest_ms, 3),
        },
        "stop_and_copy_marks_ms": final["marks_ms"],
        "destination_restore_ms": final["destination_restore_ms"],
        "downtime_goal_ms": goal_ms,
        "rounds": len(final["rounds"]),
        "pages_per_round": [r["pages"] for r in final["rounds"]],
        "bytes_per_round": [r["bytes"] for r in final["rounds"]],
        "seconds_per_round": [r["seconds"] for r in final["rounds"]],
        "pages_total": machine.memory.size // PAGE_SIZE,
        "round_limit_hit": len(final["rounds"]) - 1 >= rounds_limit,
        "rate_mib_s": round(rate / (1 << 20), 1) if rate else None,
    }


def _mib_s(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / (1 << 20), 1) if seconds > 0 else 0.0


# --- the destination -----------------------------------------------------------------------------


class Incoming:
    """The receiving side: accepts one migration and builds the machine it carries."""

    def __init__(self, host: str, port: int):
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family, _, _, _, addr = infos[0]
            self.listener = socket.socket(family, socket.SOCK_STREAM)
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind(addr)
            self.listener.listen(1)
        except OSError as e:
            raise MigrationError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        self.address = self.listener.getsockname()[:2]
        self.link: Link | None = None
        self.machine: Machine | None = None
        self.info: dict[str, Any] = {}

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
        with contextlib.suppress(OSError):
            self.listener.close()

    def receive(
        self, *, kvm=None, console=None, capture_output=True, setup=None, accel=None
    ) -> Machine:
        """Wait for a migration and receive it up to GO; returns the machine, ready to run
        (call `running()` just before its first KVM_RUN). On failure nothing is left running
        and MigrationError says why."""
        conn, peer = self.listener.accept()
        self.listener.close()
        link = self.link = Link(conn)
        t0 = time.monotonic()
        try:
            machine = self._receive(link, kvm, console, capture_output, setup, accel)
        except KvmpyError as e:  # this side cannot take the VM (KVM refused its state, ...)
            with contextlib.suppress(OSError):
                link.send_json(ERROR, {"error": str(e)})
            self._discard()
            raise MigrationError(f"the migration was refused: {e}") from None
        except OSError as e:  # the link failed
            self._discard()
            raise MigrationError(
                f"the migration from {peer[0]}:{peer[1]} was aborted: "
                f"{e.strerror or e}; nothing runs here"
            ) from None
        except BaseException:
            self._discard()
            raise
        self.info["total_s"] = time.monotonic() - t0
        self.info["source"] = f"{peer[0]}:{peer[1]}"
        return machine

    def _discard(self) -> None:
        if self.machine is not None:
            self.machine.close()
            self.machine = None

    def _receive(self, link, kvm, console, capture_output, setup, accel=None) -> Machine:
        hello = link.expect(HELLO)
        if hello.get("protocol") != PROTOCOL or hello.get("version") != VERSION:
            raise MigrationError(
                f"the source speaks {hello.get('protocol')} version {hello.get('version')}; "
                f"this kvmpy speaks {PROTOCOL} version {VERSION}"
            )
        if hello.get("state_version") != state.STATE_VERSION or hello.get("page_size") != PAGE_SIZE:
            raise MigrationError("the source's state format differs from this kvmpy's")
        config = state.config_from_dict(hello.get("config"))
        if accel is not None:
            config = state.with_accel(config, accel)
        machine = self.machine = builder.build(
            config, load=False, kvm=kvm, console=console, capture_output=capture_output,
            setup=setup,
        )  # fmt: skip
        if machine.memory.size != hello.get("memory"):
            raise MigrationError("the source's memory size does not match its configuration")
        link.send_json(READY, {})
        memory = machine.memory
        total_pages = memory.size // PAGE_SIZE
        per_round: dict[int, int] = {}
        run = bytearray(RUN.size)
        head = bytearray(SET.size)
        arrays = _page_arrays(memory)
        while True:
            kind, length = link.recv_header()
            if kind == PING:
                link.recv_bytes(length)
                link.send_json(PING, {})
            elif kind == PAGES:
                if length < RUN.size:
                    raise MigrationError("a page message is truncated")
                link.recv_into(memoryview(run))
                first, count, rnd = RUN.unpack(run)
                if count == 0 or first + count > total_pages:
                    raise MigrationError("the source sent pages outside guest memory")
                if length != RUN.size + count * PAGE_SIZE:
                    raise MigrationError("a page message has the wrong length")
                link.recv_into(memfile.locate(memory, first, count))
            elif kind in (PAGESET, ZEROSET):
                if length < SET.size:
                    raise MigrationError("a page-set message is truncated")
                link.recv_into(memoryview(head))
                rnd, count = SET.unpack(head)
                size = count * (8 + (PAGE_SIZE if kind == PAGESET else 0))
                if not 0 < count <= SET_PAGES or length != SET.size + size:
                    raise MigrationError("a page-set message has the wrong length")
                numbers = np.frombuffer(link.recv_bytes(count * 8), dtype="<u8").astype(np.int64)
                if numbers.min() < 0 or numbers.max() >= total_pages:
                    raise MigrationError("the source sent pages outside guest memory")
                if kind == PAGESET:
                    data = np.empty((count, PAGE_SIZE // 8), dtype=np.uint64)
                    link.recv_into(memoryview(data).cast("B"))
                else:
                    data = None
                _scatter(arrays, numbers, data)
            elif kind == ROUND_END:
                link.recv_into(memoryview(run))
                _, pages, rnd = RUN.unpack(run)
                per_round[rnd] = pages
                link.send_json(ROUND_ACK, {})
            elif kind == STATE:
                st = link.recv_json(length)
                t = time.monotonic()
                state.apply(machine, st)
                restore_ms = (time.monotonic() - t) * 1e3
                link.send_json(READY_TO_RUN, {"restore_ms": restore_ms})
                go = link.expect(GO)
                self.t_go = time.monotonic()
                self.info.update(
                    rounds=int(go.get("rounds", len(per_round))),
                    pages_per_round=[per_round[r] for r in sorted(per_round)],
                    source_stop_ms=float(go.get("source_stop_ms", 0.0)),
                    one_way_ms=float(go.get("one_way_ms", 0.0)),
                    source_total_s=go.get("source_total_s"),
                    restore_ms=restore_ms,
                )
                return machine
            elif kind == ERROR:
                raise MigrationError(f"the source gave up: {link.recv_json(length).get('error')}")
            else:
                raise MigrationError(f"protocol error: unexpected message {chr(kind)!r}")

    def running(self) -> dict[str, Any]:
        """Call just before the first KVM_RUN: tells the source, returns the migration report."""
        dest_ms = (time.monotonic() - self.t_go) * 1e3
        with contextlib.suppress(OSError):
            self.link.send_json(RUNNING, {"destination_resume_ms": dest_ms})
        self.link.close()
        i = self.info
        downtime = i["source_stop_ms"] + i["one_way_ms"] + dest_ms
        report = {
            "source": i["source"],
            "total_s": round(i["total_s"] + dest_ms / 1e3, 6),
            "downtime_ms": round(downtime, 3),
            "downtime_parts_ms": {
                "source_stop_and_copy": round(i["source_stop_ms"], 3),
                "link_one_way": round(i["one_way_ms"], 3),
                "destination_resume": round(dest_ms, 3),
            },
            "restore_ms": round(i["restore_ms"], 3),
            "rounds": i["rounds"],
            "pages_per_round": i["pages_per_round"],
        }
        self.report = report
        return report


def _scatter(arrays, numbers: np.ndarray, data: np.ndarray | None) -> None:
    """Write pages `numbers` (logical) from `data` (n, 512), or zero them if data is None."""
    for first, count, arr in arrays:
        inside = (numbers >= first) & (numbers < first + count)
        if inside.any():
            arr[numbers[inside] - first] = 0 if data is None else data[inside]
