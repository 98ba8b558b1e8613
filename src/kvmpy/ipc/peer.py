"""One VMM of an inter-VM channel: a kvmpy Machine wired to the shared region, the doorbells or
the pio relay it was handed, running one guest.

`python -m kvmpy.ipc.peer FD` is the separate-process form: FD is its end of the control link
to the server (kvmpy.ipc.server), which sends the configuration and the file descriptors
(SCM_RIGHTS) and answers barriers. The same class runs in a thread for `--same-process`.

The vCPU runs on the calling thread. A monitor thread reads the control link and stops the
vCPU (a signal kick) when the server aborts, the link breaks, the time limit passes or the
guest stops making progress; waits inside device handlers (a barrier, the pio relay) wake on
the same abort, so no path blocks forever on a dead peer.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field

from ..devices import Device
from ..errors import KvmError, KvmpyError
from ..hv.base import Capability
from ..kvm.constants import ExitReason
from ..loader import load_file
from ..result import Stop, StopReason
from ..stats import ExitStats
from . import doorbell
from .control import Aborted, IpcError, Link, PeerGone, make_abort
from .layout import (
    INFO_ERROR,
    INFO_FIRST_TOUCH,
    INFO_GPA,
    INFO_IRQ_LAST_CPU,
    INFO_IRQ_TOTAL,
    INFO_PROGRESS,
    INFO_RUNS,
    INFO_RUNS_DONE,
    INFO_SIZE,
    MASK64,
    MAX_GUEST_RAM,
    MAX_SAMPLES,
    PORT_DATA,
    PORT_DOORBELL,
    PORT_FLUSH,
    PORT_SYNC,
    RUN_RECORD,
    SAMPLES_OFFSET,
    SHM_GPA,
    InfoParams,
    Mechanism,
    PioWidth,
    Role,
    SharedLayout,
    WaitMode,
    unpack_run,
)
from .pio import CoalescedRing, PioDataPort, PioFlushPort, Relay
from .ring import Ring, RingCorrupt

log = logging.getLogger(__name__)

_U64 = struct.Struct("<Q")
# Guest output kept for error messages.
MAX_OUTPUT = 4096


@dataclass(frozen=True)
class PeerSpec:
    """Everything a peer VMM needs besides its file descriptors (sent as JSON)."""

    peer_id: int
    peer: int
    role: str
    mechanism: str
    image: str
    size: int
    runs: int
    pingpong: int = 0
    pio_width: str = "string"
    pio_coalesce: bool = True
    wait_mode: str = "block"
    shm_size: int = 0
    vectors: int = 2
    seed: int = 1
    memory: int = 32 << 20
    cpu: int | None = None
    #: vCPUs of this VM, and which one takes the doorbell interrupts (shm-irq).
    vcpus: int = 1
    irq_cpu: int = 0
    #: Whole run, one wait for the peer (barrier, relay), and no visible progress.
    timeout: float = 120.0
    io_timeout: float = 20.0
    stall_timeout: float = 20.0
    #: CPU backend (MachineConfig.accel).
    accel: str = "auto"

    @classmethod
    def from_dict(cls, d: dict) -> PeerSpec:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class RunWindow:
    """VMM-side view of one run: from the start barrier's release to the run-done exit."""

    t0: int = 0
    exits0: int = 0
    io_ns0: int = 0
    barrier_ns: int = 0
    counters0: dict = field(default_factory=dict)
    result: dict = field(default_factory=dict)


class SyncPort(Device):
    """PORT_SYNC: `in` is the start barrier with the peer (answered once the server says
    go); `out` marks the end of a run. Both record the VMM's counters, so the run's exits,
    its Python time and its relay time are known exactly."""

    name = "ipc-sync"

    def __init__(self, peer: Peer):
        self.peer = peer

    def read(self, offset: int, size: int) -> bytes:
        run = self.peer.barrier()
        return run.to_bytes(8, "little")[:size]

    def write(self, offset: int, data: bytes):
        self.peer.run_done(int.from_bytes(data[:4], "little"))
        return None


class Peer:
    def __init__(self, spec: PeerSpec, link: Link, fds: dict[str, int]):
        self.spec = spec
        self.link = link
        self.fds = fds
        self.mechanism = Mechanism.parse(spec.mechanism)
        self.role = Role.SENDER if spec.role == "sender" else Role.RECEIVER
        self.name = f"{spec.role} (peer {spec.peer_id})"
        self.abort_fd = make_abort()
        self.abort_reason: str | None = None
        self.go: queue.Queue = queue.Queue()
        self.machine = None
        self.data_port: PioDataPort | None = None
        self.flush_port: PioFlushPort | None = None
        self.relay: Relay | None = None
        self.ring: CoalescedRing | None = None
        self.doorbells = doorbell.DoorbellPort(spec.peer_id)
        self.runs_started = 0
        self.windows: dict[int, RunWindow] = {}
        self.current: RunWindow | None = None
        self.in_barrier = False
        self.done = threading.Event()
        self.tsc_shared = False
        self.tsc_khz = 0
        #: (send ring, receive ring) for the shm mechanisms, as the host sees them.
        self.rings: tuple[Ring, Ring] | None = None

    # --- the VM ------------------------------------------------------------------------------

    def build(self) -> None:
        from ..machine import Machine, MachineConfig

        spec = self.spec
        if spec.memory > MAX_GUEST_RAM:
            raise IpcError(f"guest RAM must end below {MAX_GUEST_RAM:#x} for ipc guests")
        irq = self.mechanism is Mechanism.SHM_IRQ
        m = Machine(
            MachineConfig(
                mode="long-user",
                memory=spec.memory,
                irqchip=irq,
                name=self.name,
                vcpus=spec.vcpus,
                accel=spec.accel,
            ),  # fmt: skip
            capture_output=True,
        )
        self.machine = m
        m.memory.add_region(INFO_GPA, INFO_SIZE, name="ipc-info")
        reserved = [(INFO_GPA, INFO_GPA + INFO_SIZE)]
        shared = None
        if self.mechanism.shared_memory:
            shared = SharedLayout.for_size(spec.shm_size)
            m.memory.add_region(SHM_GPA, spec.shm_size, fd=self.fds["shm"], name="ipc-shm")
            reserved.append((SHM_GPA, SHM_GPA + spec.shm_size))
        image = load_file(spec.image)
        for start, end in image.ranges():
            for lo, hi in reserved:
                if start < hi and lo < end:
                    raise IpcError(
                        f"the guest image [{start:#x}, {end:#x}) overlaps the ipc window at {lo:#x}"
                    )
        m.load(image, reserved=reserved)
        fd = getattr(m.vcpus[0], "fd", None)
        if fd is None:
            # unicorn: the guest's rdtsc is the host's TSC, the same in both VMs.
            self.tsc_shared = True
            self.tsc_khz = m.vcpus[0].tsc_khz()
        else:
            try:
                # One timebase for both VMs: guest rdtsc in the sender and the receiver can be
                # subtracted. (KVM-PVM is there already and ignores the call.)
                fd.set_tsc_offset(0)
                self.tsc_shared = fd.get_tsc_offset() == 0
            except KvmError:
                self.tsc_shared = False
            self.tsc_khz = fd.get_tsc_khz()
        tx_ring = tx_data = rx_ring = rx_data = ring_size = 0
        if shared is not None:
            tx_ring, tx_data, rx_ring, rx_data = shared.rings_for(spec.peer_id)
            ring_size = shared.ring_size
            self._region = region = m.memory.view(SHM_GPA, spec.shm_size)
            self.rings = (
                Ring(region, tx_ring, tx_data, ring_size, "this VM's send ring"),
                Ring(region, rx_ring, rx_data, ring_size, "this VM's receive ring"),
            )
        params = InfoParams(
            mechanism=self.mechanism, peer_id=spec.peer_id, peer=spec.peer, role=self.role,
            pio_width=PioWidth[spec.pio_width.upper()], wait_mode=WaitMode[spec.wait_mode.upper()],
            vectors=spec.vectors, size=spec.size, runs=spec.runs, pingpong=spec.pingpong,
            tsc_khz=self.tsc_khz, shm_size=spec.shm_size if shared else 0, tx_ring=tx_ring,
            tx_data=tx_data, rx_ring=rx_ring, rx_data=rx_data, ring_size=ring_size,
            seed=spec.seed, irq_cpu=spec.irq_cpu,
        )  # fmt: skip
        m.memory.write(INFO_GPA, params.pack())
        m.add_pio_device(PORT_SYNC, 4, SyncPort(self))
        m.add_pio_device(PORT_DOORBELL, 4, self.doorbells)
        if self.mechanism is Mechanism.PIO:
            relay_sock = socket.socket(fileno=self.fds.pop("relay"))
            self.relay = Relay(relay_sock, spec.io_timeout, self.abort_fd)
            # Without KVM_CAP_COALESCED_PIO (Linux < 4.20) every `out` exits; still correct.
            if spec.pio_coalesce and Capability.COALESCED_IO in m.vm.capabilities:
                m.vm.register_coalesced(PORT_DATA, 4, pio=True)
                page = fd.run_view[2 * 4096 : 3 * 4096]
                self.ring = CoalescedRing(page, PORT_DATA)
            self.data_port = PioDataPort(self.relay, self.ring)
            self.flush_port = PioFlushPort(self.data_port)
            m.add_pio_device(PORT_DATA, 4, self.data_port)
            m.add_pio_device(PORT_FLUSH, 4, self.flush_port)
        if irq:
            incoming = [self.fds[f"irq{v}"] for v in range(spec.vectors)]
            outgoing = {spec.peer: [self.fds[f"peer_irq{v}"] for v in range(spec.vectors)]}
            doorbell.wire(m, incoming, outgoing, irq_cpu=spec.irq_cpu)
            doorbell.install_handlers(m, spec.vectors)

    # --- barriers and runs (called from the vCPU thread, inside exits) -----------------------

    def _stats(self) -> ExitStats:
        """The VM's exits so far, every vCPU's (a guest may run its loop on another CPU)."""
        return ExitStats.merged([v.stats for v in self.machine.vcpus])

    def _counters(self) -> dict:
        c = {"doorbells_unmatched": self.doorbells.unmatched}
        if self.data_port is not None:
            d, r = self.data_port, self.relay
            c.update(
                exits_out=d.exits_out, exits_in=d.exits_in, bytes_out=d.bytes_out,
                bytes_in=d.bytes_in, relay_send_ns=r.send_ns, relay_wait_ns=r.wait_ns,
                relay_recv_ns=r.recv_ns,
            )  # fmt: skip
        if self.flush_port is not None:
            c["flushes"] = self.flush_port.flushes
        if self.ring is not None:
            c.update(ring_drains=self.ring.drains, ring_entries=self.ring.entries)
        if self.rings is not None:
            # Checked reads: a guest that wrote impossible indices stops here (RingCorrupt).
            c.update(sent=self.rings[0].indices()[0], received=self.rings[1].indices()[1])
        return c

    def barrier(self) -> int:
        t_enter = time.perf_counter_ns()
        run = self.runs_started
        self.in_barrier = True
        try:
            self.link.send({"op": "barrier", "run": run})
            deadline = time.monotonic() + self.spec.io_timeout
            while True:
                if self.abort_reason is not None:
                    raise Aborted(self.abort_reason)
                try:
                    msg = self.go.get(timeout=0.05)
                except queue.Empty:
                    if time.monotonic() > deadline:
                        raise IpcError(
                            f"the peer did not reach the start barrier of run {run} within "
                            f"{self.spec.io_timeout:g} s"
                        ) from None
                    continue
                if msg.get("run") != run:
                    raise IpcError(f"the server released run {msg.get('run')}, not {run}")
                break
        finally:
            self.in_barrier = False
        stats = self._stats()
        io = int(ExitReason.IO)
        now = time.perf_counter_ns()
        self.current = RunWindow(
            t0=now, exits0=stats.total, io_ns0=stats.vmm_ns[io], barrier_ns=now - t_enter,
            counters0=self._counters(),
        )  # fmt: skip
        self.windows[run] = self.current
        self.runs_started += 1
        return run

    def run_done(self, run: int) -> None:
        w = self.current
        if w is None:
            return  # a stray write; the guest's own business
        self.current = None
        stats = self._stats()
        io = int(ExitReason.IO)
        now = time.perf_counter_ns()
        c1 = self._counters()
        w.result = {
            "host_ns": now - w.t0,
            # This exit is counted already; the barrier's was counted before the window.
            "exits": stats.total - w.exits0 - 1,
            # VMM time of the window's exits; the barrier exit's own time (mostly waiting for
            # the peer) lands in it and is taken out.
            "vmm_io_ns": max(0, stats.vmm_ns[io] - w.io_ns0 - w.barrier_ns),
            # Ring indices run modulo 2^64 like the guest's; the other counters are ours.
            **{k: (c1[k] - w.counters0.get(k, 0)) & MASK64 for k in c1},
        }

    # --- monitoring (its own thread) ---------------------------------------------------------

    def abort(self, reason: str) -> None:
        if self.abort_reason is None:
            self.abort_reason = reason
            os.eventfd_write(self.abort_fd, 1)
            if self.machine is not None:
                self.machine.request_stop(StopReason.INTERRUPTED, reason)

    def _progress(self) -> tuple:
        """Anything that moves while the transfer does: the guest's own counters, and the
        ring indices or relay byte counts, which the guest cannot fake without moving data."""
        mem = self.machine.memory
        done = mem.read_u64(INFO_GPA + INFO_RUNS_DONE)
        rec = INFO_GPA + INFO_RUNS + (min(done, self.spec.runs) * RUN_RECORD.size) + 16
        moved: tuple = ()
        if self.rings is not None:
            moved = (self.rings[0].indices(), self.rings[1].indices())
        elif self.relay is not None:
            moved = (self.relay.sent, self.relay.received)
        progress = mem.read_u64(INFO_GPA + INFO_PROGRESS)
        return done, progress, mem.read_u64(rec), self.runs_started, moved

    def monitor(self) -> None:
        spec = self.spec
        start = time.monotonic()
        last, last_change = None, start
        while not self.done.is_set():
            try:
                msg, fds = self.link.recv(0.1, None, "the server")
            except IpcError as e:
                if "timed out" not in str(e):
                    self.abort(f"lost the ipc server: {e}")
                    return
                msg = None
            if msg is not None:
                for fd in fds:
                    os.close(fd)
                op = msg["op"]
                if op == "go":
                    self.go.put(msg)
                elif op == "abort":
                    self.abort(str(msg.get("reason") or "aborted by the server"))
            now = time.monotonic()
            if now - start > spec.timeout:
                self.abort(f"the run took longer than its {spec.timeout:g} s limit")
            try:
                cur = self._progress()
            except RingCorrupt as e:
                self.abort(f"the shared region is corrupt: {e}")
                continue
            if cur != last or self.in_barrier:
                last, last_change = cur, now
            elif now - last_change > spec.stall_timeout:
                self.abort(
                    f"the guest made no progress for {spec.stall_timeout:g} s "
                    f"(run {cur[0]}, {cur[1]} bytes)"
                )

    # --- the whole thing ---------------------------------------------------------------------

    def run(self) -> dict:
        self.build()
        self.link.send({"op": "ready", "tsc_khz": self.tsc_khz, "tsc_shared": self.tsc_shared})
        mon = threading.Thread(target=self.monitor, name=f"ipc-monitor-{self.spec.peer_id}")
        mon.start()
        error = None
        stop = None
        t0 = time.perf_counter()
        try:
            res = self.machine.run()
            stop = Stop(res.stop_reason, res.exit_code, res.message, cpu=res.cpu)
            # A device of ours that gave up (a dead relay, an abort) stops the machine from
            # its vCPU thread with the error as the message.
            if stop.reason is StopReason.VMM_ERROR:
                error = self.abort_reason or stop.message
        finally:
            elapsed = time.perf_counter() - t0
            if self.data_port is not None and error is None:
                try:
                    self.data_port.flush()  # whatever the guest sent and did not flush
                except IpcError as e:
                    error = str(e)
            self.done.set()
            mon.join()
        if stop is not None and stop.reason is StopReason.INTERRUPTED and self.abort_reason:
            error = self.abort_reason
        return self.collect(stop, error, elapsed)

    def collect(self, stop, error: str | None, elapsed: float) -> dict:
        m = self.machine
        mem = m.memory
        spec = self.spec
        runs = []
        done = min(mem.read_u64(INFO_GPA + INFO_RUNS_DONE), spec.runs + 1)
        for i in range(done):
            rec = unpack_run(mem.view(INFO_GPA + INFO_RUNS + i * RUN_RECORD.size, RUN_RECORD.size))
            w = self.windows.get(i)
            rec["vmm"] = w.result if w is not None else {}
            runs.append(rec)
        samples = []
        if spec.pingpong and self.role is Role.SENDER and done > 1:
            n = min((done - 1) * spec.pingpong, MAX_SAMPLES)
            raw = mem.read(INFO_GPA + SAMPLES_OFFSET, 8 * n)
            samples = list(struct.unpack(f"<{n}Q", raw))
        output = m.output[-MAX_OUTPUT:].decode(errors="replace")
        return {
            "op": "result",
            "peer_id": spec.peer_id,
            "role": spec.role,
            "error": error,
            "stop_reason": stop.reason.value if stop is not None else None,
            "exit_code": stop.exit_code if stop is not None else None,
            "message": stop.message if stop is not None else error,
            "guest_error": mem.read_u64(INFO_GPA + INFO_ERROR),
            "output": output,
            "tsc_khz": self.tsc_khz,
            "tsc_shared": self.tsc_shared,
            "first_touch_tsc": mem.read_u64(INFO_GPA + INFO_FIRST_TOUCH),
            "runs": runs,
            "samples": samples,
            "stats": ExitStats.merged([v.stats for v in m.vcpus]).to_dict(),
            "irq_cpu": spec.irq_cpu,
            "irq_last_cpu": mem.read_u32(INFO_GPA + INFO_IRQ_LAST_CPU),
            "irq_total": mem.read_u64(INFO_GPA + INFO_IRQ_TOTAL),
            "elapsed_s": elapsed,
            "doorbells_unmatched": self.doorbells.unmatched,
            "pio_coalesced": self.ring is not None,
            "coalesced_stray": self.ring.stray if self.ring is not None else 0,
            "pio_stray": self.data_port.stray if self.data_port is not None else 0,
        }

    def close(self) -> None:
        if self.ring is not None:
            self.ring.release()
        if self.rings is not None:
            for r in self.rings:
                r.release()
            self._region.release()
        if self.relay is not None:
            self.relay.sock.close()
        if self.machine is not None:
            self.machine.close()
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        os.close(self.abort_fd)


def serve(link: Link, config_timeout: float = 30.0) -> int:
    """Receive a configuration on `link`, run the peer, send its result. Returns the process
    exit status (0 when a result, even a failed run's, reached the server)."""
    try:
        msg, fds = link.recv(config_timeout, None, "the configuration from the ipc server")
    except IpcError as e:
        print(f"kvmpy ipc peer: {e}", file=sys.stderr)
        return 1
    if msg["op"] != "config":
        print(f"kvmpy ipc peer: expected a configuration, got {msg['op']!r}", file=sys.stderr)
        return 1
    names = msg.get("fds", [])
    if len(names) != len(fds):
        link.send({"op": "error", "message": "the file descriptors did not arrive"})
        return 1
    spec = PeerSpec.from_dict(msg["spec"])
    if spec.cpu is not None:
        try:
            os.sched_setaffinity(0, {spec.cpu})
        except OSError:
            pass  # a CPU we may not use: run unpinned rather than fail
    peer = Peer(spec, link, dict(zip(names, fds, strict=True)))
    try:
        try:
            result = peer.run()
        except KvmpyError as e:
            result = {"op": "error", "message": str(e)}
        link.send(result)
    except PeerGone:
        return 1
    finally:
        peer.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m kvmpy.ipc.peer CONTROL_FD (started by kvmpy ipc)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="kvmpy ipc peer: %(message)s")
    from ..hv.signals import install_kick_handler

    install_kick_handler()
    sock = socket.socket(fileno=int(argv[0]))
    return serve(Link(sock, "the ipc server"))


if __name__ == "__main__":
    sys.exit(main())
