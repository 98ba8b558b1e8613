"""The virtio fuzz harness: each input is a little program that a hostile guest runs against
one device on one transport: raw register reads and writes (virtio-mmio registers, PCI config
space through ECAM and 0xCF8/0xCFC, the virtio-pci BAR), a driver's bring-up, random
descriptor chains (direct and indirect, buffers inside and outside RAM), random bytes written
over the rings and tables, random block requests, notifies and resets.

What counts as a failure: any exception out of the device or transport (the VMM would have
crashed), a device `internal_error` (device code raised; it was contained but is a bug), an
access outside guest RAM (every memory access goes through `AuditedMemory.view`, which checks
what it hands out), or an input that runs longer than the hang limit.

    python -m kvmpy.devices.virtio.fuzz --device block --runs 1000000          # atheris
    python -m kvmpy.devices.virtio.fuzz --device rng --runs 20000 --random     # no atheris
    python -m kvmpy.devices.virtio.fuzz --device net --runs 1000000
    python -m kvmpy.devices.virtio.fuzz --device vsock --runs 1000000

The smoke run in `make test` (tests/test_virtio_fuzz.py) drives the same `Harness.one` from
hypothesis and from a seeded random stream.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import resource
import socket
import struct
import sys
import tempfile
import time

from ...errors import GuestMemoryError
from ...memory import GuestMemory
from ..pci.host import PciHost
from . import balloon as BL
from . import block as B
from . import mmio as M
from . import net as N
from . import pci as P
from . import vsock as V
from .console import VirtioConsole
from .constants import F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1
from .driver import Arena, DriverQueue, MmioRegs, PciRegs, start
from .rng import VirtioRng
from .wiring import CallbackIrq

# Guest RAM with a hole: a buffer spanning [RAM0_END, RAM1_START) must be refused.
RAM0_END = 0x20000
RAM1_START = 0x30000
RAM1_END = 0x40000
APERTURE = 0xE100_0000
DEVICES = ("console", "block", "rng", "net", "vsock", "balloon")
DISK_SIZE = 64 * 1024
MAX_OPS = 64
#: CPU seconds one input may take (CPU, not wall time: on a shared machine a stall of the
#: process is not a hang; libFuzzer's -timeout catches real ones by wall time).
HANG_S = 2.0


class FuzzFailure(AssertionError):
    pass


class AuditedMemory(GuestMemory):
    """GuestMemory that proves no access escapes RAM: every view it hands out is checked
    against the regions, and refused requests are counted."""

    refused = 0

    def view(self, gpa: int, length: int) -> memoryview:
        try:
            v = super().view(gpa, length)
        except GuestMemoryError:
            AuditedMemory.refused += 1
            raise
        if not (
            (gpa >= 0 and gpa + length <= RAM0_END)
            or (gpa >= RAM1_START and gpa + length <= RAM1_END)
        ):
            raise FuzzFailure(f"access outside guest RAM: {gpa:#x}+{length:#x}")
        return v


def audited_discard(memory: GuestMemory):
    """The balloon's discard callback: what a guest makes the device release must be whole
    pages of its RAM; anything else reaching a real discard is a failure."""

    def discard(gpa: int, length: int) -> bool:
        ok = memory.discard(gpa, length)
        if ok and not (
            gpa % 4096 == 0
            and length % 4096 == 0
            and (
                (gpa >= 0 and gpa + length <= RAM0_END)
                or (gpa >= RAM1_START and gpa + length <= RAM1_END)
            )
        ):
            raise FuzzFailure(f"memory released outside guest RAM: {gpa:#x}+{length:#x}")
        return ok

    return discard


class Reader:
    """Consumes an input's bytes; returns zeros once they run out."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b.ljust(n, b"\0")

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack("<H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def addr(self) -> int:
        """Mostly inside RAM, sometimes at its edges or anywhere."""
        k = self.u8() % 8
        if k < 5:
            return self.u16() % RAM0_END
        if k == 5:
            return RAM1_START + self.u16() % (RAM1_END - RAM1_START)
        if k == 6:
            return (RAM0_END, RAM1_START, RAM1_END)[self.u8() % 3] - self.u8() % 32
        return self.u64()


class Harness:
    def __init__(self, device: str):
        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}")
        self.kind = device
        self.memory = AuditedMemory()
        self.memory.add_region(0, RAM0_END)
        self.memory.add_region(RAM1_START, RAM1_END - RAM1_START)
        # In memory where there is a tmpfs: flushes then cost nothing.
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, self.disk = tempfile.mkstemp(prefix="kvmpy-fuzz-", suffix=".img", dir=shm)
        os.ftruncate(fd, DISK_SIZE)
        os.close(fd)
        self.inputs = 0
        self.needs_reset = 0
        self.slowest = 0.0

    def close(self) -> None:
        self.memory.close()
        os.unlink(self.disk)

    def make_device(self, r: Reader):
        if self.kind == "net":
            self.backend = _NetBackend(offloads=bool(r.u8() & 1))
            return N.VirtioNet(self.backend, mac=bytes([2, 0, 0, 0, 0, r.u8()]))
        if self.kind == "vsock":
            self.host = _VsockHost()
            return V.VirtioVsock(3 + r.u8() % 2, host=self.host)
        if self.kind == "block":
            return B.VirtioBlock(self.disk, readonly=bool(r.u8() & 1 == 0 and r.u8() & 1))
        if self.kind == "console":
            return VirtioConsole(sink=lambda b: None)
        if self.kind == "balloon":
            return BL.VirtioBalloon(discard=audited_discard(self.memory),
                                    ram_pages=(RAM0_END + RAM1_END - RAM1_START) // 4096,
                                    pfn_limit=RAM1_END // 4096)  # fmt: skip
        return VirtioRng(max_request=1 + r.u16())

    def one(self, data: bytes) -> None:
        t0 = time.process_time()
        r = Reader(data)
        mem = self.memory
        for region in mem:
            region.view[:] = bytes(region.size)
        dev = self.make_device(r)
        pci = r.u8() & 1
        irq = CallbackIrq()
        vectors: list[CallbackIrq] = []
        host = None
        if pci:
            host = PciHost(APERTURE, 1 << 24)

            def vec(i, cpu):
                v = _Vec()
                vectors.append(v)
                return v

            fn = P.VirtioPci(dev, mem, vec, intx=irq)
            slot = host.add(fn)
            transport = fn
            regs = PciRegs(host, slot)
        else:
            transport = M.VirtioMmio(dev, mem, irq, base=0xD000_0000)
            regs = MmioRegs(transport)
        queues: list[DriverQueue] = []
        try:
            for _ in range(MAX_OPS):
                if r.left() <= 0:
                    break
                queues = self._op(r, dev, transport, regs, host, queues)
        finally:
            self.inputs += 1
            if dev.broken is not None:
                self.needs_reset += 1
            internal = dev.internal_errors
            bounded = self._bounded(dev)
            transport.close()
            if self.kind == "net":
                self.backend.peer.close()
            elif self.kind == "vsock":
                self.host.close()
            dt = time.process_time() - t0
            self.slowest = max(self.slowest, dt)
        if internal:
            raise FuzzFailure(f"{dev.name}: {internal} internal error(s): {dev.broken}")
        if bounded:
            raise FuzzFailure(f"{dev.name}: {bounded}")
        if dt > HANG_S:
            raise FuzzFailure(f"input took {dt:.2f} s of CPU (hang limit {HANG_S} s)")

    def _bounded(self, dev) -> str | None:
        """What a device holds must stay within its bounds, whatever the input did."""
        if self.kind == "net":
            if len(dev._pending) > N.RX_PENDING_FRAMES or dev._pending_bytes > N.RX_PENDING_BYTES:
                return f"receive queue unbounded: {len(dev._pending)} frames"
        elif self.kind == "vsock":
            if len(dev.conns) + len(dev._handshakes) > V.MAX_CONNS:
                return f"{len(dev.conns)} connections"
            for c in dev.conns.values():
                if len(c.out) > V.CONN_BUF:
                    return f"connection holds {len(c.out)} bytes > {V.CONN_BUF}"
            if len(dev._rsts) > V.MAX_QUEUED_RSTS:
                return "resets queue unbounded"
        return None

    def _op(self, r: Reader, dev, transport, regs, host, queues):
        op = r.u8() % 24  # 2 and 3 (bring-ups, dozens of register accesses each) are rarer
        mem = self.memory
        if self.kind in ("net", "vsock") and op & 1:  # half of the operations: traffic
            return self._device_op(r, dev, regs, queues)
        if op == 0:  # raw register write
            size = (1, 2, 4, 8)[r.u8() % 4]
            value = r.u64() & ((1 << (8 * size)) - 1)
            if host is None:
                transport.write(r.u16() % 0x200, value.to_bytes(size, "little"))
            else:
                self._pci_write(r, host, regs, size, value)
        elif op == 1:  # raw register read
            size = (1, 2, 4, 8)[r.u8() % 4]
            if host is None:
                out = transport.read(r.u16() % 0x200, size)
            else:
                out = self._pci_read(r, host, regs, size)
            if len(out) != size:
                raise FuzzFailure(f"a {size}-byte read returned {len(out)} bytes")
        elif op == 2:  # a driver's bring-up, with random feature choices
            feats = F_VERSION_1 | (F_EVENT_IDX if r.u8() & 1 else 0)
            feats |= F_INDIRECT_DESC if r.u8() & 1 else 0
            feats |= dev.device_features & (r.u32() & 0x7FFF)
            size = 1 << (r.u8() % 9)
            try:
                return start(regs, Arena(mem, 0x100 * (r.u8() % 16), 0x10000), len(dev.queues),
                             size=size, features=feats)  # fmt: skip
            except (RuntimeError, MemoryError):
                return []  # the device refused (e.g. NEEDS_RESET); the driver gives up
        elif op in (3, 4, 12, 13, 14) and queues:  # a chain of random buffers, maybe indirect
            q = queues[r.u8() % len(queues)]
            n_out, n_in = r.u8() % 4, r.u8() % 4
            if self.kind == "block" and n_out:
                hdr = r.addr() % (RAM0_END - 16)
                mem.write(hdr, struct.pack("<IIQ", (0, 1, 4, 8, 11, 13, 2, 99)[r.u8() % 8], 0,
                                           r.u16() % 200 if r.u8() & 7 else r.u64()))  # fmt: skip
                outs = [(hdr, 16 + 512 * (r.u8() % 3))]
                n_out -= 1
            else:
                outs = []
            outs += [(r.addr(), r.u16() % 4096) for _ in range(n_out)]
            ins = [(r.addr(), r.u16() % 4096) for _ in range(n_in)]
            need = 1 if r.u8() & 1 else len(outs) + len(ins)
            if (outs or ins) and len(q.free) >= need and len(outs) + len(ins) <= q.size:
                indirect = None
                if need == 1:
                    indirect = r.addr() % (RAM0_END - 128) & ~15
                q.add(outs, ins, indirect_at=indirect)
        elif op in (5, 15, 16) and queues:  # notify
            regs.notify(queues[r.u8() % len(queues)].index)
        elif op in (6, 17, 18) and queues:  # random bytes over a ring or descriptor table
            q = queues[r.u8() % len(queues)]
            base = (q.desc, q.avail, q.used)[r.u8() % 3]
            mem_off = base + r.u16() % (16 * q.size + 8)
            blob = r.take(1 + r.u8() % 16)
            if mem.is_ram(mem_off, len(blob)):
                mem.write(mem_off, blob)
        elif op == 7 and queues:  # the avail index, anywhere
            q = queues[r.u8() % len(queues)]
            mem.write_u16(q.avail + 2, r.u16())
        elif op in (8, 19):  # random bytes anywhere in RAM
            a = r.addr()
            blob = r.take(1 + r.u8() % 32)
            if mem.is_ram(a, len(blob)):
                mem.write(a, blob)
        elif op == 9:  # reset
            regs.reset()
            return []
        elif op in (10, 20, 21) and queues:  # take what the device completed
            for q in queues:
                try:
                    q.take_used()
                except GuestMemoryError:
                    pass
        elif op in (11, 22) and self.kind == "console":
            dev.feed(r.take(r.u8()))
        elif op in (11, 22) and self.kind == "balloon":
            self._balloon_op(r, dev, regs, queues)
        elif op == 23 and self.kind == "balloon":
            if r.u8() & 1:
                dev.set_target(r.u32())
            else:
                dev.request_stats()
        return queues

    def _device_op(self, r: Reader, dev, regs, queues):
        """virtio-net and virtio-vsock: traffic both ways with hostile headers."""
        mem = self.memory
        if not queues:  # a driver's bring-up first, with random feature choices
            feats = F_VERSION_1 | (dev.device_features & r.u32() & ~0xFFFF_FFFF_0000_0000)
            feats |= (F_EVENT_IDX if r.u8() & 1 else 0) | (F_INDIRECT_DESC if r.u8() & 1 else 0)
            try:
                return start(regs, Arena(mem, 0x100 * (r.u8() % 16), 0x10000), len(dev.queues),
                             size=1 << (2 + r.u8() % 5), features=feats)  # fmt: skip
            except (RuntimeError, MemoryError):
                return []
        op = r.u8() % 8
        if op in (0, 1) and queues:  # a guest transmit chain: a header we shape, then bytes
            q = queues[1 if len(queues) > 1 else 0]
            buf = r.addr() % (RAM0_END - 0x1100)
            if self.kind == "net":
                hdr = bytes([r.u8() % 4, (0, 1, 3, 4, 0x81, r.u8())[r.u8() % 6]]) + r.take(10)
            else:
                hdr = struct.pack(
                    "<QQIIIHHIII",
                    (dev.cid, dev.cid, dev.cid, r.u64())[r.u8() % 4],
                    (2, 2, 2, r.u64())[r.u8() % 4],
                    r.u8() % 4, r.u8() % 4,
                    (0, 0, 0, r.u16() % 0x1100, r.u32())[r.u8() % 5],
                    (1, 1, 1, r.u16())[r.u8() % 4], r.u8() % 9, r.u8() % 4,
                    (V.CONN_BUF, r.u32(), 0)[r.u8() % 3], (0, r.u32())[r.u8() % 2],
                )  # fmt: skip
            body = r.take(r.u8())
            if self.kind == "vsock" and hdr[30] == 5 and not hdr[24:28].strip(b"\0"):
                hdr = hdr[:24] + struct.pack("<I", len(body)) + hdr[28:]  # RW: a fitting len
            mem.write(buf, hdr + body)
            n = len(hdr) + (r.u16() % 0x1000 if r.u8() & 1 else len(body))
            if q.free and len(q.free) >= 2:
                split = r.u8() % 3
                if split and n > split * 4:
                    q.add([(buf, split * 4), (buf + split * 4, n - split * 4)], [])
                else:
                    q.add([(buf, n)], [])
            regs.notify(q.index)
        elif op == 2 and queues:  # receive buffers of random sizes
            q = queues[0]
            for _ in range(1 + r.u8() % 4):
                if q.free:
                    n = r.u16() % 0x800 if r.u8() % 8 == 0 else 44 + r.u16() % 0x800
                    q.add([], [(r.addr() % (RAM0_END - 0x900), n)])
            regs.notify(0)
        elif op == 3:  # the host side sends something
            if self.kind == "net":
                n = (r.u8(), r.u16() % 2000, 70000)[r.u8() % 3]
                self.backend.inject(r.take(min(n, 64)).ljust(n, b"\xa5"))
                dev.process(0)
            else:
                self.host.act(r, dev)
        elif op == 4:  # the host side reads what reached it
            if self.kind == "net":
                self.backend.drain()
            else:
                self.host.drain()
                dev.poll_host()
        elif op == 5 and self.kind == "net":
            dev.set_link(bool(r.u8() & 1))
        elif op == 5:
            dev.poll_host()
        elif op == 6 and queues and self.kind == "vsock" and len(queues) > 2:
            q = queues[2]
            if q.free:
                q.add([], [(r.addr() % (RAM0_END - 16), r.u8() % 12)])
            regs.notify(2)
        elif op == 7 and self.kind == "vsock":  # a snapshot and restore of the device
            dev.restore_state(dev.state())
        return queues

    def _balloon_op(self, r: Reader, dev, regs, queues) -> None:
        """A buffer of frame numbers (mostly of RAM, sometimes of the hole or anywhere) on a
        random queue, or a free-page report, then a notify."""
        if not queues:
            return
        mem = self.memory
        q = queues[r.u8() % len(queues)]
        n = r.u8() % 64
        pfns = []
        for _ in range(n):
            k = r.u8() % 4
            if k < 2:
                pfns.append(r.u16() % (RAM0_END // 4096))
            elif k == 2:
                pfns.append((RAM0_END // 4096) + r.u8() % ((RAM1_END - RAM0_END) // 4096 + 4))
            else:
                pfns.append(r.u32())
        at = r.addr() % (RAM0_END - 4 * 64) & ~3
        mem.write(at, struct.pack(f"<{n}I", *pfns))
        if len(q.free) < 2:
            return
        if r.u8() & 1:
            q.add([(at, 4 * n)], [])
        else:
            q.add([], [(r.addr() & ~0xFFF, (1 + r.u8() % 8) * 4096)])  # a free-page report
        regs.notify(q.index)

    def _pci_write(self, r: Reader, host, regs, size: int, value: int) -> None:
        where = r.u8() % 4
        data = value.to_bytes(size, "little")
        if where == 0:
            host.ecam_device.write(regs.slot << 15 | r.u16() % 0x1000, data)
        elif where == 1:
            host.port_device.write(r.u8() % 8, data)
        else:
            host.aperture_device.write(regs.bar - APERTURE + r.u16() % P.BAR_SIZE, data)

    def _pci_read(self, r: Reader, host, regs, size: int) -> bytes:
        where = r.u8() % 4
        if where == 0:
            return host.ecam_device.read(regs.slot << 15 | r.u16() % 0x1000, size)
        if where == 1:
            return host.port_device.read(r.u8() % 8, size)
        return host.aperture_device.read(regs.bar - APERTURE + r.u16() % P.BAR_SIZE, size)

    def report(self) -> dict:
        return {
            "device": self.kind,
            "inputs": self.inputs,
            "inputs_ending_in_needs_reset": self.needs_reset,
            "refused_out_of_ram": AuditedMemory.refused,
            "accesses_outside_ram": 0,
            "slowest_input_cpu_s": round(self.slowest, 4),
            "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }


class _NetBackend:
    """A datagram socket pair: the host network virtio-net talks to in the fuzzer."""

    name = "fuzz"

    def __init__(self, offloads: bool):
        from .tap import SocketBackend

        self.offloads = offloads
        self.inner, self.peer = SocketBackend.pair("fuzz")
        self.peer.setblocking(False)

    def fileno(self) -> int:
        return self.inner.fileno()

    def read_into(self, buf):
        return self.inner.read_into(buf)

    def write(self, iov) -> int:
        return self.inner.write(iov)

    def set_offload(self, flags: int) -> None:
        self.flags = flags

    def close(self) -> None:
        self.inner.close()

    def inject(self, frame: bytes) -> None:
        try:
            self.peer.send(frame)
        except OSError:  # too long for a datagram, or the buffer is full
            pass

    def drain(self) -> None:
        try:
            while self.peer.recv(1 << 17):
                pass
        except OSError:
            pass


class _VsockHost:
    """Host sockets for virtio-vsock without the filesystem: guest connections get one end
    of a socket pair (ports divisible by 3 are refused, as if nobody listened)."""

    path = "fuzz"

    def __init__(self):
        self.peers: list[socket.socket] = []

    def connect(self, port: int) -> socket.socket:
        if port % 3 == 0 or len(self.peers) > 64:
            raise ConnectionRefusedError
        a, b = socket.socketpair()
        for s in (a, b):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        b.setblocking(False)
        self.peers.append(b)
        a.setblocking(False)
        return a

    def act(self, r: Reader, dev) -> None:
        k = r.u8() % 4
        if k == 0 and len(self.peers) <= 64:  # a host client: a CONNECT line, or not
            a, b = socket.socketpair()
            b.setblocking(False)
            self.peers.append(b)
            line = (b"CONNECT %d\n" % (r.u8() % 4), r.take(r.u8() % 40), b"CONNECT 1")[r.u8() % 3]
            b.send(line)
            with dev.lock:
                dev.host_connect(a)
            dev.poll_host()
        elif k == 1 and self.peers:  # data from the host
            try:
                self.peers[r.u8() % len(self.peers)].send(r.take(r.u8()) * (1 + r.u8() % 64))
            except OSError:
                pass
            dev.poll_host()
        elif k == 2 and self.peers:  # a host client goes away
            self.peers[r.u8() % len(self.peers)].close()
            dev.poll_host()
        else:
            dev.poll_host()

    def drain(self) -> None:
        for p in self.peers:
            try:
                while p.recv(1 << 16):
                    pass
            except OSError:
                pass

    def close(self, listener=None) -> None:
        for p in self.peers:
            p.close()
        self.peers.clear()


class _Vec(CallbackIrq):
    def configure(self, address: int, data: int) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=DEVICES, required=True)
    p.add_argument("--runs", type=int, default=100000)
    p.add_argument("--random", action="store_true", help="seeded random inputs, no atheris")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-len", type=int, default=256,
                   help="largest input in bytes (about 4 bytes per operation; default 256)")  # fmt: skip
    args, rest = p.parse_known_args(argv)
    logging.getLogger("kvmpy").setLevel(logging.ERROR)  # NEEDS_RESET warnings: millions
    h = Harness(args.device)
    t0 = time.perf_counter()
    if args.random:
        rng = random.Random(args.seed)
        for i in range(args.runs):
            h.one(rng.randbytes(rng.randrange(0, args.max_len + 1)))
            if i and i % 100000 == 0:
                print(f"{i} inputs, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    else:
        import atheris  # the `fuzz` extra: pip install -e '.[fuzz]'

        def target(data: bytes) -> None:
            h.one(data)
            # libFuzzer ends the process with _exit (no atexit): report as we go.
            if h.inputs % 50000 == 0 or h.inputs == args.runs:
                rep = h.report()
                rep["seconds"] = round(time.perf_counter() - t0, 1)
                print("FUZZ-REPORT " + json.dumps(rep), file=sys.stderr, flush=True)

        atheris.instrument_all()  # coverage of every loaded module (kvmpy's devices included)
        atheris.Setup([sys.argv[0], f"-runs={args.runs}", "-timeout=10", "-rss_limit_mb=1024",
                       f"-max_len={args.max_len}", "-len_control=20", *rest], target)  # fmt: skip
        atheris.Fuzz()
    rep = h.report()
    rep["seconds"] = round(time.perf_counter() - t0, 1)
    print("FUZZ-REPORT " + json.dumps(rep))
    h.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
