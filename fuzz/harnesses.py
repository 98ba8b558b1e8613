"""Fuzz harnesses for every parser of guest, file or network input the VMM exposes.

Each harness is a class with `setup()` (once per process: build machines, a reference
snapshot, a listening server) and `one_input(data: bytes)` (one test case). `one_input` raises
only for a bug: anything a hostile input may legitimately cause (an error reply, a stop
reason, a KvmpyError) is caught and checked here. The same harnesses run under atheris
(coverage-guided, `fuzz/run.py`, `make fuzz`) and under hypothesis (the smoke run in
tests/test_fuzz_smoke.py, inside `make test`).

    hypercalls   the hypercall dispatcher: random number, registers, CPU mode, CR3, and guest
                 memory (page tables included) patched with random bytes
    pio          port-I/O and MMIO dispatch: random ports, directions, sizes, string counts,
                 data offsets, MMIO addresses and lengths, a coalesced ring with random indices
    snapshot     the snapshot reader: manifest, state and memory index mutated or truncated,
                 with the checksums recomputed half of the time so the inner parsers are reached
    migration    the migration receiver: a valid stream's messages mutated, truncated, reordered
    control      the control-channel server: random bytes and mutated requests on its socket
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path

# What an input may cost at most: a hang is a bug (the drivers also enforce a per-input
# timeout), and so is a reply that never comes.
REPLY_TIMEOUT_S = 5.0


class Input:
    """Reads structured values from fuzz bytes; past the end it reads zeros."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out.ljust(n, b"\0")

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "little")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "little")

    def u64(self) -> int:
        return int.from_bytes(self.take(8), "little")

    def pick(self, seq):
        return seq[self.u8() % len(seq)]

    def rest(self) -> bytes:
        out = self.data[self.pos :]
        self.pos = len(self.data)
        return out

    def left(self) -> int:
        return max(0, len(self.data) - self.pos)


# --- hypercalls ----------------------------------------------------------------------------------


class Hypercalls:
    """The dispatcher (`KvmVcpu._hypercall`, the same handling as the fast path) and every built-in
    handler, plus Python handlers that return None, raise, return junk or touch memory."""

    MEMORY = 4 << 20
    MODES = ("real", "protected", "paged32", "long", "long-user")

    def setup(self) -> None:
        from kvmpy.errors import GuestMemoryError
        from kvmpy.kvm import Kvm
        from kvmpy.loader import load_raw
        from kvmpy.machine import Machine, MachineConfig

        self.kvm = Kvm()
        self.machines = {}
        for mode in self.MODES:
            m = Machine(MachineConfig(mode=mode, memory=self.MEMORY), kvm=self.kvm,
                        capture_limit=4096)  # fmt: skip
            m.load(load_raw(b"\xef\xf4", load_addr=0x8000, entry=0x8000))

            def reader(ctx, gva, n, *_):
                return len(ctx.vmem().read(gva, n & 0xFFFF))

            def raiser(ctx, *_):
                raise ValueError("a handler bug")

            m.hypercalls.register(64, lambda ctx, *a: None, "none")
            m.hypercalls.register(65, raiser, "raises")
            m.hypercalls.register(66, lambda ctx, *a: "junk", "junk")
            m.hypercalls.register(67, reader, "reader")
            m.hypercalls.register(68, lambda ctx, a0, *_: a0 * -3, "negative")
            self.machines[mode] = (
                m,
                bytes(m.memory.view(0, self.MEMORY)),
                m.vcpus[0].fd.get_sregs(),
            )
        self.GuestMemoryError = GuestMemoryError

    def _arg(self, r: Input) -> int:
        kind = r.u8() % 5
        if kind == 0:
            return r.u8()
        if kind == 1:
            return r.u32() % self.MEMORY
        if kind == 2:
            return self.MEMORY - (r.u16() % 8192)
        if kind == 3:
            return (1 << 64) - 1 - r.u16()
        return r.u64()

    def one_input(self, data: bytes) -> None:
        from kvmpy.errors import KvmError
        from kvmpy.hv.kvm.vcpu import _RAX, _RBX, _RCX, _RDI, _RSI
        from kvmpy.result import Stop

        r = Input(data)
        m, pristine, sregs0 = self.machines[r.pick(self.MODES)]
        # kvmpy's own numbers (0-15), the harness's handlers (64-69), or anything.
        k = r.u8()
        nr = (k % 16 if k & 0x80 else 64 + k % 6) if r.u8() % 4 else r.u32()
        args = [self._arg(r) for _ in range(4)]
        patches = []
        for _ in range(r.u8() % 4):
            off = r.u32() % self.MEMORY
            chunk = r.take(min(r.u8() % 65, self.MEMORY - off))
            patches.append((off, len(chunk)))
            m.memory.write(off, chunk)
        vcpu = m.vcpus[0]
        try:
            if r.u8() % 3 == 0:
                sregs = type(sregs0).from_buffer_copy(sregs0)
                sregs.cr3 = r.u32() & ~0xFFF
                try:
                    vcpu.fd.set_sregs(sregs)
                except KvmError:
                    return
            u64 = vcpu._u64
            u64[_RAX] = nr
            u64[_RDI], u64[_RSI], u64[_RCX], u64[_RBX] = args
            stop = vcpu._hypercall(nr)
            assert stop is None or isinstance(stop, Stop), stop
            assert len(m.output) <= 4096
        finally:
            for off, n in patches:
                m.memory.write(off, pristine[off : off + n])
            vcpu.fd.set_sregs(sregs0)
            vcpu.stopped = None


# --- port I/O and MMIO ---------------------------------------------------------------------------


class PortIo:
    """`KvmVcpu._port_io` and the MMIO exit with the kvm_run fields KVM would fill in (and some it
    never would), for kvmpy's own ports, a string-capable ipc pio device, unassigned ports,
    and an MMIO device."""

    MEMORY = 4 << 20
    MMIO_BASE = 0xD000_0000

    def setup(self) -> None:
        from kvmpy.arch.x86.modes import FAULT_PORT
        from kvmpy.devices import Device, Output
        from kvmpy.ipc.pio import CoalescedRing, PioDataPort, PioFlushPort, Relay
        from kvmpy.kvm import Kvm
        from kvmpy.loader import load_raw
        from kvmpy.machine import Machine, MachineConfig

        class Regs(Device):
            name = "regs"

            def __init__(self):
                self.mem = bytearray(256)

            def read(self, offset, size):
                return bytes(self.mem[offset : offset + size])

            def write(self, offset, data):
                self.mem[offset : offset + len(data)] = data[: 256 - offset]
                return Output(b"x") if offset == 0 else None

        self.kvm = Kvm()
        self.machines = []
        for mode in ("real", "long", "long-user"):
            m = Machine(MachineConfig(mode=mode, memory=self.MEMORY), kvm=self.kvm,
                        capture_limit=4096)  # fmt: skip
            m.load(load_raw(b"\xef\xf4", load_addr=0x8000, entry=0x8000))
            a, b = socket.socketpair()
            ring_page = bytearray(4096)
            self.ring_view = memoryview(ring_page)
            data = PioDataPort(Relay(a, 1.0, None), CoalescedRing(self.ring_view, 0x600))
            m.add_pio_device(0x600, 4, data)
            m.add_pio_device(0x604, 1, PioFlushPort(data))
            m.add_pio_device(0x700, 0x100, Regs())
            m.add_mmio_device(self.MMIO_BASE, 0x100, Regs())
            b.setblocking(False)
            self.machines.append((m, b, ring_page))
        self.ports = (0xE9, 0x500, FAULT_PORT, 0x600, 0x601, 0x604, 0x700, 0x7FF, 0x80, 0xFFFF)

    def one_input(self, data: bytes) -> None:
        from kvmpy.hv.kvm.vcpu import _IO_COUNT, _IO_DATA_OFFSET, _IO_DIRECTION, _IO_PORT, _IO_SIZE
        from kvmpy.kvm import constants as K
        from kvmpy.result import Stop

        r = Input(data)
        m, peer, ring = r.pick(self.machines)
        vcpu = m.vcpus[0]
        u8, u16, u32, u64 = vcpu._u8, vcpu._u16, vcpu._u32, vcpu._u64
        limit = len(u8)
        try:
            if r.u8() % 4:  # port I/O
                port = r.pick(self.ports) if r.u8() % 4 else r.u16()
                size = r.pick((1, 2, 4)) if r.u8() % 8 else r.u8()
                legal = r.u8() % 8 != 0
                if legal:  # what KVM hands over: data in the page after kvm_run, at most 4 KiB
                    off = 4096
                    # Mostly short strings: a long one costs thousands of device calls.
                    most = 4096 // max(size, 1) if r.u8() % 8 == 0 else 16
                    count = 1 + (r.u16() % max(1, most))
                else:
                    off = r.u32() % (limit + 64)
                    count = r.u32()
                payload = r.take(min(4096, size * count if legal else 64))
                u8[_IO_DIRECTION] = r.u8() & 1
                u8[_IO_SIZE] = size & 0xFF
                u16[_IO_PORT] = port
                u32[_IO_COUNT] = count & 0xFFFFFFFF
                u64[_IO_DATA_OFFSET] = off
                end = min(limit, off + len(payload))
                if off < limit:
                    u8[off:end] = payload[: end - off]
                # The pio peer has bytes for any `in`, and never a full buffer for `out`.
                with contextlib.suppress(BlockingIOError):
                    while peer.recv(65536):
                        pass
                want = min(size * count, 1 << 16) if 0x600 <= port <= 0x603 else 0
                if want:
                    peer.sendall(b"\xab" * want)
                if r.u8() % 2:  # a coalesced ring with whatever indices
                    ring[:16] = r.take(16)
                stop = vcpu._port_io()
                assert stop is None or isinstance(stop, Stop), stop
            else:  # MMIO
                run = vcpu.fd.run_struct
                mm = run.mmio
                mm.phys_addr = self.MMIO_BASE + (r.u16() % 0x200) if r.u8() % 2 else r.u64()
                mm.len = r.u8() % 10 if r.u8() % 4 else r.u32()
                mm.is_write = r.u8() & 1
                for i, b in enumerate(r.take(8)):
                    mm.data[i] = b
                stop = vcpu._slow_exit(K.ExitReason.MMIO, 1)
                assert stop is None or isinstance(stop, Stop), stop
            assert len(m.output) <= 4096
        finally:
            ring[:8] = bytes(8)
            with contextlib.suppress(BlockingIOError):
                while peer.recv(65536):
                    pass
            # Drop bytes the device did not consume, so the next input starts clean.
            relay_sock = m.pio_bus.entries[0x600].device.relay.sock
            with contextlib.suppress(BlockingIOError):
                while relay_sock.recv(65536):
                    pass
            vcpu.stopped = None


# --- the snapshot reader -------------------------------------------------------------------------


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _mutate_json(doc, r: Input, depth: int = 0):
    """Replace one value somewhere in `doc` with a random one."""
    choices = [
        None, True, -1, 0, 1, 2**63, 2**64 + 5, -(2**70), 1.5e300, float("nan"), "", "x" * 40,
        "AAAA", [], {}, [1, 2], {"a": 1},
    ]  # fmt: skip
    if isinstance(doc, dict) and doc and depth < 6:
        key = r.pick(sorted(doc, key=str))
        if r.u8() % 3 == 0:
            return {k: v for k, v in doc.items() if k != key}
        return {**doc, key: _mutate_json(doc[key], r, depth + 1)}
    if isinstance(doc, list) and doc and depth < 6:
        i = r.u8() % len(doc)
        out = list(doc)
        if r.u8() % 3 == 0:
            del out[i]
        else:
            out[i] = _mutate_json(doc[i], r, depth + 1)
        return out
    if isinstance(doc, str) and r.u8() % 2:
        raw = bytearray(doc.encode())
        if raw:
            raw[r.u16() % len(raw)] ^= 1 << (r.u8() % 8)
        return raw.decode("ascii", "replace")
    return r.pick(choices)


def _mutate_bytes(data: bytes, r: Input) -> bytes:
    how = r.u8() % 4
    if how == 0 and data:
        return data[: r.u32() % len(data)]  # truncated
    if how == 1 and data:
        out = bytearray(data)
        for _ in range(1 + r.u8() % 4):
            out[r.u32() % len(out)] ^= r.u8() | 1
        return bytes(out)
    if how == 2:
        return data + r.take(r.u8())
    return r.take(r.u16() % 2048)


class SnapshotReader:
    """`format.open_snapshot`, `state.check_version`, `state.config_from_dict`, and, when the
    configuration still fits the prepared machine, `state.apply` and `memfile.read_memory`
    into it: the path of `kvmpy restore` after its Machine is built."""

    def setup(self) -> None:
        from kvmpy.kvm import Kvm
        from kvmpy.loader import load_raw
        from kvmpy.machine import Machine, MachineConfig
        from kvmpy.persist import snapshot

        self.kvm = Kvm()
        self.dir = Path(tempfile.mkdtemp(prefix="kvmpy-fuzz-snap-", dir=_scratch()))
        self.machines = {}
        ref = self.dir / "ref"
        for irqchip in (False, True):
            config = MachineConfig(mode="long-user", memory="1M", irqchip=irqchip)
            m = Machine(config, kvm=self.kvm, capture_limit=4096)
            m.load(load_raw(b"\xf4" * 64, load_addr=0x1000, entry=0x1000))
            m.memory.write(0x3000, b"kvmpy fuzz " * 300)
            self.machines[irqchip] = m
        snapshot.take(self.machines[False], ref)
        self.files = {name: (ref / name).read_bytes() for name in
                      ("manifest.json", "state.json", "memory.index", "memory")}  # fmt: skip
        self.work = self.dir / "work"

    def one_input(self, data: bytes) -> None:
        from kvmpy.errors import KvmpyError
        from kvmpy.persist import format as F
        from kvmpy.persist import memfile, state

        r = Input(data)
        files = dict(self.files)
        manifest = json.loads(files["manifest.json"])
        target = r.pick(("manifest.json", "state.json", "memory.index", "memory", "two"))
        for name in ("state.json", "memory.index") if target == "two" else (target,):
            if name.endswith(".json") and r.u8() % 2:
                doc = _mutate_json(json.loads(files[name]), r)
                files[name] = json.dumps(doc).encode()
            else:
                files[name] = _mutate_bytes(files[name], r)
        if target == "manifest.json" and r.u8() % 2:
            manifest = (
                json.loads(files["manifest.json"]) if _is_json(files["manifest.json"]) else {}
            )
        if r.u8() % 2 and isinstance(manifest, dict):
            # Re-sign, so the parsers behind the checksums see the mutation.
            with contextlib.suppress(Exception):
                manifest["state"]["size"] = len(files["state.json"])
                manifest["state"]["sha256"] = _sha(files["state.json"])
                idx = manifest["memory"]["index"]
                idx["size"] = len(files["memory.index"])
                idx["sha256"] = _sha(files["memory.index"])
            with contextlib.suppress(Exception):
                manifest["checksum"] = F._manifest_checksum(manifest)
            with contextlib.suppress(Exception):
                files["manifest.json"] = json.dumps(manifest).encode()
        if self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir()
        for name, content in files.items():
            if name == "memory" and content == self.files["memory"]:
                os.link(self.dir / "ref" / name, self.work / name)
            else:
                (self.work / name).write_bytes(content)
        try:
            snap = F.open_snapshot(self.work)
        except KvmpyError:
            return
        try:
            state.check_version(snap.state)
            config = state.config_from_dict(snap.state.get("config")).machine
            m = self.machines.get(config.irqchip)
            if m is None or config.memory != m.config.memory or config.mode != m.mode:
                return
            if config.memory != snap.memory_size:
                return
            memfile.read_memory(m.memory, snap.memory_fd, snap.extents)
            state.apply(m, snap.state)
        except KvmpyError:
            return
        finally:
            snap.close()


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
        return True
    except ValueError:
        return False


def _scratch() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


# --- the migration receiver ----------------------------------------------------------------------


class MigrationReceiver:
    """`migration.Incoming` fed a recorded migration stream with its messages mutated,
    truncated, dropped or repeated, over a real socket. Machines are built once per
    configuration and reused (building one per input would dominate the run)."""

    def setup(self) -> None:
        from kvmpy.kvm import Kvm
        from kvmpy.machine import Machine
        from kvmpy.persist import migration, state

        self.kvm = Kvm()
        self.migration = migration
        cache: dict = {}
        real_machine = Machine

        def machine_factory(config, **kw):
            cfg = config.validated()
            if cfg.memory > (16 << 20):
                from kvmpy.errors import ConfigError

                raise ConfigError("fuzz: memory over 16M is not built")
            key = (cfg.mode, cfg.memory, cfg.irqchip, cfg.pit)
            if key not in cache:
                if len(cache) >= 8:  # bounded: fuzzed sizes would otherwise grow the cache
                    cache.pop(next(iter(cache))).close()
                cache[key] = real_machine(cfg, kvm=self.kvm, capture_limit=4096)
            m = cache[key]
            return _Unclosable(m)

        migration.Machine = machine_factory
        self.messages = self._record(state)

    def _record(self, state) -> list[tuple[int, bytes]]:
        """A short, valid stream from a real source machine."""
        import numpy as np

        from kvmpy.loader import load_raw
        from kvmpy.machine import Machine, MachineConfig

        M = self.migration
        src = Machine(MachineConfig(mode="long-user", memory="2M"), kvm=self.kvm)
        src.load(load_raw(b"\xf4" * 16, load_addr=0x1000, entry=0x1000))
        src.memory.write(0x5000, b"page" * 1024)
        st = state.capture(src)
        cfg = state.config_to_dict(src)
        hello = {"protocol": M.PROTOCOL, "version": M.VERSION, "state_version": state.STATE_VERSION,
                 "config": cfg, "memory": src.memory.size, "page_size": 4096}  # fmt: skip
        page = bytes(src.memory.view(0x5000, 4096))
        nums = np.array([5, 6], dtype="<u8").tobytes()
        msgs = [
            (M.HELLO, json.dumps(hello).encode()),
            (M.PING, b"{}"),
            (M.PAGES, M.RUN.pack(1, 1, 0) + bytes(src.memory.view(0x1000, 4096))),
            (M.ROUND_END, M.RUN.pack(0, 1, 0)),
            (M.PAGESET, M.SET.pack(1, 1) + nums[:8] + page),
            (M.ZEROSET, M.SET.pack(1, 2) + nums),
            (M.ROUND_END, M.RUN.pack(0, 3, 1)),
            (M.STATE, json.dumps(st).encode()),
            (M.GO, json.dumps({"source_stop_ms": 1.0, "one_way_ms": 0.1, "rounds": 2}).encode()),
        ]
        src.close()
        return msgs

    def one_input(self, data: bytes) -> None:
        from kvmpy.errors import KvmpyError

        M = self.migration
        r = Input(data)
        msgs = list(self.messages)
        for _ in range(1 + r.u8() % 3):
            i = r.u8() % len(msgs)
            kind, payload = msgs[i]
            how = r.u8() % 6
            if how == 0:
                del msgs[i]
            elif how == 1:
                msgs.insert(i, (kind, payload))
            elif how == 2:
                msgs[i] = (r.u8(), payload)
            elif how == 3 and kind in (M.HELLO, M.STATE, M.GO) and _is_json(payload):
                msgs[i] = (kind, json.dumps(_mutate_json(json.loads(payload), r)).encode())
            else:
                msgs[i] = (kind, _mutate_bytes(payload, r))
        handshake = r.u8() % 4 == 0
        if handshake:
            auth = {"nonce": r.take(32).hex(), "mac": r.take(32).hex()}
            msgs = [(M.AUTH, json.dumps(_mutate_json(auth, r)).encode()), *msgs]
        stream = b"".join(M.HDR.pack(k, len(p)) + p for k, p in msgs)
        if r.u8() % 4 == 0:  # a lying length or a cut stream
            stream = stream[: r.u32() % (len(stream) + 1)]
        a, b = socket.socketpair()
        try:
            a.settimeout(REPLY_TIMEOUT_S)
            feeder = threading.Thread(target=_feed, args=(b, stream), daemon=True)
            feeder.start()
            link = M.Link(a, timeout=REPLY_TIMEOUT_S)
            incoming = M.Incoming.__new__(M.Incoming)
            incoming.link = link
            incoming.machine = None
            incoming.info = {}
            try:
                if handshake:  # the destination's first words with a stranger
                    M._server_handshake(link, b"fuzz-key-0123456789abcdef")
                else:
                    incoming._receive(link, self.kvm, None, True, None)
            except (KvmpyError, OSError, ConnectionError, M._NotAMigration):
                pass
            with contextlib.suppress(OSError):
                a.shutdown(socket.SHUT_RDWR)
            feeder.join(REPLY_TIMEOUT_S)
            assert not feeder.is_alive(), "the feeder is stuck"
        finally:
            a.close()
            b.close()


def _feed(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):  # the receiver's replies
            pass


class _Unclosable:
    """A cached machine handed to the receiver: its close() does nothing."""

    def __init__(self, machine):
        object.__setattr__(self, "_m", machine)

    def __getattr__(self, name):
        return getattr(self._m, name)

    def __setattr__(self, name, value):
        setattr(self._m, name, value)

    def close(self) -> None:
        pass


# --- the control-channel server ------------------------------------------------------------------


class ControlServer:
    """A real ControlServer on a unix socket, for a session whose VM has not started (so no
    operation acts on anything): random bytes, mutated requests, over-long lines, several
    requests on one connection. Every request line must get exactly one reply line, soon."""

    def setup(self) -> None:
        from kvmpy.kvm import Kvm
        from kvmpy.loader import load_raw
        from kvmpy.machine import Machine, MachineConfig
        from kvmpy.persist.control import ControlServer as Server
        from kvmpy.persist.session import VmSession

        self.kvm = Kvm()
        self.machine = Machine(MachineConfig(mode="long", memory="1M"), kvm=self.kvm)
        self.machine.load(load_raw(b"\xf4"))
        self.dir = tempfile.mkdtemp(prefix="kvmpy-fuzz-ctl-", dir=_scratch())
        self.path = os.path.join(self.dir, "ctl.sock")
        self.server = Server(VmSession(self.machine), self.path)
        self.requests = [
            {"op": "stats"}, {"op": "pause"}, {"op": "resume"}, {"op": "stop"},
            {"op": "snapshot", "path": "/nonexistent/x"}, {"op": "migrate", "address": "h:1"},
        ]  # fmt: skip

    def one_input(self, data: bytes) -> None:
        r = Input(data)
        how = r.u8() % 4
        if how == 0:
            payload = r.rest()
        elif how == 1:
            payload = json.dumps(_mutate_json(r.pick(self.requests), r)).encode() + b"\n"
        elif how == 2:
            payload = b"".join(json.dumps(r.pick(self.requests)).encode() + b"\n"
                               for _ in range(1 + r.u8() % 3)) + r.rest()  # fmt: skip
        else:
            payload = b"x" * (64 * 1024 + r.u16()) + b"\n"
        lines = [ln for ln in payload.split(b"\n")[:-1] if ln.strip()]
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(REPLY_TIMEOUT_S)
            s.connect(self.path)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            got = b""
            t0 = time.monotonic()
            while chunk := s.recv(65536):
                got += chunk
                assert time.monotonic() - t0 < REPLY_TIMEOUT_S
        replies = [json.loads(x) for x in got.splitlines()]
        # Nothing acts on a VM that has not started: only stats may succeed.
        assert all(isinstance(x, dict) and (x.get("ok") is False or set(x["result"]) >= {"state"})
                   for x in replies), replies  # fmt: skip
        if len(payload) <= 64 * 1024:
            assert len(replies) == len(lines), (payload[:200], replies)


HARNESSES = {
    "hypercalls": Hypercalls,
    "pio": PortIo,
    "snapshot": SnapshotReader,
    "migration": MigrationReceiver,
    "control": ControlServer,
}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


__all__ = ["HARNESSES", "Input", "b64", "struct"]
