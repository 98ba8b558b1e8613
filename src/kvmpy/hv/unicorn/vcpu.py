"""The unicorn vCPU: its run loop, its exits (port I/O, MMIO, `hlt`), exceptions through the
guest's IDT, preemption and the minimal interrupt controller.

Where KVM returns from KVM_RUN for the VMM to handle an exit, unicorn calls back into Python
from inside `uc_emu_start`. The hooks are registered as raw ctypes callbacks: the binding's own
wrappers cost ~8 µs per hypercall, a raw callback with one batched register read ~1.2 µs
(measured here), against ~10 µs for a KVM exit at CPL0 and ~70 µs at CPL3 on KVM-PVM.

Precise stops. A hook cannot end the translation block it was called from: `uc_emu_stop`
takes effect at the next guest memory access (QEMU then restarts that instruction) or at the
end of the block, so the instructions after an `out` would run before the VMM sees the stop.
KVM stops right after the `out`. To match it, every state this backend loads sets QEMU's
HF_IOBPT flag, which makes translated code check the debug registers after each `in`/`out`;
a hook that wants the VM stopped (the exit hypercall, a fault report, `yield_on_io`, a pause
requested while it ran) points DR0/DR7 at the port for that one instruction, the CPU raises a
#DB trap right after it, and the INTR hook ends the run there and puts the guest's debug
registers back. String I/O stops at the end of the instruction (mid-`rep` the trap would skip
the remaining iterations).

Preemption. Python runs signal handlers only between bytecodes of the main thread, and the
main thread is inside `uc_emu_start` while the guest runs. While a vCPU runs in the main thread
a helper thread watches Python's signal wakeup fd and stops the engine when a signal arrives,
so SIGALRM (--timeout, the timer scheduler) and Ctrl-C reach their handlers at once; from other
threads `request_pause(kick=True)` / `kick()` stop the engine directly (uc_emu_stop is meant to
be called from another thread).

Interrupts. No LAPIC: an MSI (signal_msi, or irq_line on a GSI with an MSI route) marks its
vector pending and the vCPU delivers the highest one through the IDT at an instruction
boundary when RFLAGS.IF is set and no `sti`/`mov ss` shadow is active, waking a `hlt`. There
is no in-service register, so the x2APIC EOI write (`wrmsr` 0x80B) needs no effect, and
unicorn 2.1 has no WRMSR hook to see it: QEMU accepts and ignores it.
"""

from __future__ import annotations

import base64
import binascii
import ctypes as C
import functools
import logging
import os
import selectors
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from unicorn import (
    UC_HOOK_INSN,
    UC_HOOK_INSN_INVALID,
    UC_HOOK_INTR,
    UC_HOOK_MEM_FETCH_UNMAPPED,
    UC_HOOK_MEM_READ_UNMAPPED,
    UC_HOOK_MEM_WRITE_UNMAPPED,
    UC_MEM_FETCH_UNMAPPED,
    UcError,
)
from unicorn import unicorn_const as UCC
from unicorn import x86_const as X
from unicorn.unicorn_py3.arch.intel import (
    HOOK_INSN_IN_CFUNC,
    HOOK_INSN_OUT_CFUNC,
    HOOK_INSN_SYSCALL_CFUNC,
)
from unicorn.unicorn_py3.unicorn import (
    HOOK_INSN_INVALID_CFUNC,
    HOOK_INTR_CFUNC,
    HOOK_MEM_INVALID_CFUNC,
    uc_hook_h,
    uclib,
)

from ...arch.x86 import faults
from ...arch.x86.modes import FAULT_PORT
from ...arch.x86.vmem import Regime, VirtualMemory
from ...devices import Output
from ...errors import GuestMemoryError, SnapshotError
from ...hypercalls import ENOSYS, GuestExit, HypercallContext
from ...hypercalls import PORT as HC_PORT
from ...kvm import structs as S
from ...kvm.constants import ExitReason
from ...result import Stop, StopReason
from ...stats import EXACT_FIRST, SAMPLE_EVERY, ExitStats
from ...stats import EXCEPTION as EXCEPTION_REASON
from . import delivery, lib
from . import env as E
from .env import CpuState

if TYPE_CHECKING:
    from ..base import VmOps
    from .vm import UnicornVm

log = logging.getLogger(__name__)

MASK64 = (1 << 64) - 1
#: uc_emu_start's `until`: an address no guest reaches (not canonical, above 4 GiB).
NEVER = 0xFFFF_FFFF_FFFF_FFF0
#: Engine slice while a driver's signals may end a run (set_run_signals): the latest a
#: scheduler's preemption lands. Each slice costs one uc_emu_start, a few µs.
RUN_SIGNAL_SLICE_US = 1000
#: Distinct non-RAM pages a guest may touch before the VM is stopped (each is a small MMIO
#: mapping in the engine; a guest scanning the address space must not grow it without bound).
MAX_UNASSIGNED_PAGES = 256
#: KVM hands string I/O to the VMM in batches of up to this many bytes; one exit is counted per
#: batch so the exit statistics (and the num_exits hypercall) read the same on both backends.
STRING_BATCH = 1024

IO = ExitReason.IO
HLT = ExitReason.HLT
MMIO = ExitReason.MMIO
SHUTDOWN = ExitReason.SHUTDOWN
DR7_IO_BP0 = 0x401 | 2 << 16  # L0 enabled, RW0 = I/O, LEN0 = 1 byte (bit 10 reads as one)

_IO_OPCODES = {0xE4: 2, 0xE5: 2, 0xE6: 2, 0xE7: 2, 0xEC: 1, 0xED: 1, 0xEE: 1, 0xEF: 1}
_STRING_OPCODES = (0x6C, 0x6D, 0x6E, 0x6F)
_PREFIXES = frozenset((0x66, 0x67, 0xF2, 0xF3, 0xF0, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65))


def _checkpoint() -> None:
    """A Python-level call: CPython runs pending signal handlers on entering it, so a handler
    for the signal that stopped the engine has run before the loop looks at its flags."""


class UnicornHypercallContext(HypercallContext):
    """HypercallContext reading the translation regime from the engine."""

    __slots__ = ()

    @property
    def regime(self) -> Regime:
        return self.vcpu.cpu.regime()

    def vmem(self) -> VirtualMemory:
        return VirtualMemory(self.memory, self.vcpu.cpu.regime())


class _IoInsn:
    """What the VMM needs to know of the I/O instruction at RIP."""

    __slots__ = ("length", "string", "rep", "count_reg", "count_mask")

    def __init__(self, length: int, string: bool, rep: bool, addr_bits: int):
        self.length = length
        self.string = string
        self.rep = rep
        self.count_mask = {16: 0xFFFF, 32: 0xFFFF_FFFF, 64: MASK64}[addr_bits]


def decode_io(code: bytes, bits: int) -> _IoInsn | None:
    """Decode an in/out/ins/outs instruction (prefixes included)."""
    i = 0
    addr_bits = bits
    rep = False
    while i < len(code) and i < 14:
        b = code[i]
        if b in _PREFIXES:
            if b == 0x67:
                addr_bits = {64: 32, 32: 16, 16: 32}[bits]
            elif b in (0xF2, 0xF3):
                rep = True
            i += 1
        elif bits == 64 and 0x40 <= b <= 0x4F:
            i += 1
        else:
            break
    if i >= len(code):
        return None
    op = code[i]
    if op in _IO_OPCODES:
        return _IoInsn(i + _IO_OPCODES[op], False, False, addr_bits)
    if op in _STRING_OPCODES:
        return _IoInsn(i + 1, True, rep, addr_bits)
    return None


class UnicornVcpu:
    """One vCPU on a unicorn engine (implements hv.base.VcpuBackend)."""

    def __init__(self, vm: UnicornVm, index: int, ops: VmOps):
        self.vm = vm
        self.index = index
        self.ops = ops
        #: For HypercallContext (handlers reach the machine as ctx.machine).
        self.machine = ops
        self.uc = vm.uc
        self._h = lib.handle(vm.uc)
        self.cpu = CpuState(vm.uc, 64)
        self.stats = ExitStats()
        self.ctx = UnicornHypercallContext(self, ops)
        self.trace = False
        self.yield_on_io = False
        self.exact_timing = False
        self.stopped: Stop | None = None
        self.thread_ident: int | None = None
        self._pause_requested = False
        self._stop_requested: Stop | None = None
        #: Signals that end a run (set_run_signals), looked for between engine slices.
        self._run_signals: frozenset[int] | None = None
        self._running = False
        self._kicked = False
        self._final: Stop | None = None
        self._yield = False
        self._bpt_armed = False
        self._saved_dr: tuple[int, int, int] = (0, 0, 0)
        self._hook_error: BaseException | None = None
        self._in_mmio = False
        #: Inside an in/out hook: registers read then are KVM's at an I/O exit (RIP after it).
        self._in_io = False
        self.kick_deferred = False
        self._string_linear = -1
        self._string_bytes = 0
        self._insn_cache: dict[tuple[int, int], _IoInsn | None] = {}
        self._unassigned: set[int] = set()
        self._mmio_pages: set[int] = set()
        self._wake = threading.Condition()
        # Preallocated ctypes objects of the hypercall fast path.
        # Hypercall arguments, then what the I/O permission check needs.
        self._arg_ids = (C.c_int * 7)(
            X.UC_X86_REG_RDI, X.UC_X86_REG_RSI, X.UC_X86_REG_RCX, X.UC_X86_REG_RBX,
            X.UC_X86_REG_RFLAGS, X.UC_X86_REG_CS, X.UC_X86_REG_CR0,
        )  # fmt: skip
        self._arg_vals = (C.c_uint64 * 7)()
        base = C.addressof(self._arg_vals)
        self._arg_ptrs = (C.c_void_p * 7)(*(base + 8 * i for i in range(7)))
        self._denied: tuple[bytes, int] | None = None
        self._rax = C.c_uint64()
        self._reg = C.c_uint64()
        self._out_impl = self._build_out()
        self._hooks: list[Any] = []
        self._install_hooks()

    # --- hooks ---------------------------------------------------------------------------------

    def _hook(self, htype: int, cfunc, fn, *extra) -> None:
        cb = cfunc(fn)
        handle = uc_hook_h()
        args = [C.c_int(e) for e in extra]
        err = uclib.uc_hook_add(
            self.uc._uch, C.byref(handle), htype, C.cast(cb, C.c_void_p), None,
            C.c_uint64(1), C.c_uint64(0), *args,
        )  # fmt: skip
        if err:
            raise UcError(err)
        self._hooks.append(cb)  # ctypes callbacks must outlive the engine's use of them

    def _install_hooks(self) -> None:
        self._hook(UC_HOOK_INSN, HOOK_INSN_OUT_CFUNC, self._on_out, X.UC_X86_INS_OUT)
        self._hook(UC_HOOK_INSN, HOOK_INSN_IN_CFUNC, self._on_in, X.UC_X86_INS_IN)
        self._hook(UC_HOOK_INSN, HOOK_INSN_SYSCALL_CFUNC, self._on_syscall, X.UC_X86_INS_SYSCALL)
        self._hook(UC_HOOK_INSN, HOOK_INSN_SYSCALL_CFUNC, self._on_sysenter, X.UC_X86_INS_SYSENTER)
        self._hook(UC_HOOK_INTR, HOOK_INTR_CFUNC, self._on_intr)
        self._hook(UC_HOOK_INSN_INVALID, HOOK_INSN_INVALID_CFUNC, self._on_invalid)
        self._hook(
            UC_HOOK_MEM_READ_UNMAPPED | UC_HOOK_MEM_WRITE_UNMAPPED | UC_HOOK_MEM_FETCH_UNMAPPED,
            HOOK_MEM_INVALID_CFUNC,
            self._on_unmapped,
        )

    def _on_out(self, _h, port, size, value, _ud) -> None:
        self._out_impl(port, size, value)

    def _build_out(self):
        """The `out` hook with everything it touches bound to locals. The hypercall fast path
        (a 32-bit `out` to 0x500) allocates nothing."""
        stats = self.stats
        counts, vmm_ns, timed = stats.counts, stats.vmm_ns, stats.timed
        hc_stats = stats.port(HC_PORT, "hypercall")
        table = self.ops.hypercalls.table
        ctx = self.ctx
        h = self._h
        read_batch, write = lib.reg_read_batch, lib.reg_write
        ids, ptrs, vals = self._arg_ids, self._arg_ptrs, self._arg_vals
        rax, rax_p, rax_id = self._rax, C.byref(self._rax), X.UC_X86_REG_RAX
        now = time.perf_counter_ns
        sample_mask = 0 if (self.exact_timing or self.trace) else SAMPLE_EVERY - 1
        exact_first = EXACT_FIRST
        fast = not (self.trace or self.yield_on_io)
        slow = self._port_io
        io, hc_port, enosys, vm = IO, HC_PORT, ENOSYS, 1 << 17
        index = self.index

        def out(port: int, size: int, value: int) -> None:
            if port == hc_port and size == 4 and fast:
                ctx.exits = n = ctx.exits + 1
                counts[io] += 1
                hc_stats.writes += 1
                t = now() if not n & sample_mask or n < exact_first else 0
                read_batch(h, ids, ptrs, 7)
                # Unicorn skips the CPU's I/O permission check: CPL > IOPL (or vm86) in
                # protected mode consults the TSS bitmap here (never with kvmpy's modes).
                checked = vals[6] & 1 and ((vals[5] & 3) > (vals[4] >> 12 & 3) or vals[4] & vm)
                if checked and not self._io_allowed(port, size):
                    self._deny_io(port, 0)
                    return
                handler = table.get(value)
                if handler is None:
                    result = enosys
                else:
                    self._in_io = True
                    try:
                        result = handler(ctx, vals[0], vals[1], vals[2], vals[3])
                    except GuestExit as e:
                        self._stop_in_hook(
                            Stop(
                                StopReason.EXIT, e.code, f"exit hypercall, code {e.code}", cpu=index
                            ),
                            port,
                        )
                        return
                    except GuestMemoryError:
                        result = -14
                    except BaseException as e:  # a handler's bug must not unwind into C
                        self._hook_failed(e)
                        return
                    finally:
                        self._in_io = False
                rax.value = result & MASK64
                write(h, rax_id, rax_p)
                if t:
                    dt = now() - t
                    vmm_ns[io] += dt
                    timed[io] += 1
                    hc_stats.time_ns += dt
                    hc_stats.timed += 1
                if self._pause_requested or self._stop_requested is not None:
                    self._precise_stop(port, None)
                return
            slow(port, size, value, True)

        return out

    def _on_in(self, _h, port, size, _ud) -> int:
        try:
            return self._port_io(port, size, 0, False)
        except BaseException as e:
            self._hook_failed(e)
            return 0

    # --- port I/O (all but the hypercall fast path) -----------------------------------------------

    def _read_reg(self, reg: int) -> int:
        lib.reg_read(self._h, reg, C.byref(self._reg))
        return self._reg.value

    def _current_io(self) -> tuple[int, _IoInsn | None]:
        """(linear RIP, decoded instruction) of the I/O instruction a hook was called for."""
        cpu = self.cpu
        regime = cpu.regime()
        rip = cpu.u64(E.EIP)
        bits = regime.code_bits
        linear = rip if bits == 64 else (cpu.seg(E.R_CS).base + rip) & 0xFFFF_FFFF
        key = (linear, regime.cr3)
        insn = self._insn_cache.get(key, False)
        if insn is False:
            code = VirtualMemory(self.ops.memory, regime).read_partial(linear, 15)
            insn = decode_io(code, bits)
            if len(self._insn_cache) > 4096:
                self._insn_cache.clear()
            self._insn_cache[key] = insn
        return linear, insn

    def _port_io(self, port: int, size: int, value: int, out: bool) -> int:
        t0 = time.perf_counter_ns()
        linear, insn = self._current_io()
        mask = (1 << (8 * size)) - 1
        if not self._io_allowed(port, size):
            return self._deny_io(port, 0 if out else self.cpu.gpr("rax") & mask, insn)
        last = True
        new_exit = True
        if insn is not None and insn.string:
            count = self._read_reg(X.UC_X86_REG_RCX) & insn.count_mask if insn.rep else 1
            last = count <= 1
            if linear == self._string_linear and self._string_bytes < STRING_BATCH:
                new_exit = False
                self._string_bytes += size
            else:
                self._string_linear, self._string_bytes = linear, size
            if last:
                self._string_linear = -1
        else:
            self._string_linear = -1
        ctx, stats = self.ctx, self.stats
        entry = self.ops.pio_bus.entries.get(port)
        # kvmpy's exception stubs report through FAULT_PORT: that is an exception, counted as
        # such (as the KVM backend does), not an I/O exit to an unassigned port.
        if entry is None and port == FAULT_PORT and out:
            stop = self._fault_stub(linear, insn)
            if stop is not None:
                if new_exit:
                    ctx.exits += 1
                    stats.counts[EXCEPTION_REASON] += 1
                self._stop_in_hook(stop, port, insn, last)
                return 0
        ps = stats.port(port, entry.device.name if entry else "(unassigned)")
        if new_exit:
            ctx.exits += 1
            stats.counts[IO] += 1
            if out:
                ps.writes += 1
            else:
                ps.reads += 1
            if self.trace:
                self._trace_io(port, size, value, out, insn)
        result = 0
        stop: Stop | None = None
        self._in_io = True
        try:
            if port == HC_PORT and out:
                stop = self._hypercall(value & mask)
            elif entry is None:
                if port == FAULT_PORT and out:
                    stop = self._fault_stub(linear, insn)
                elif not out:
                    result = mask  # nothing there: the bus floats high
            elif out:
                effect = entry.device.write(entry.offset, (value & mask).to_bytes(size, "little"))
                if effect is not None:
                    self._apply(effect)
            else:
                data = bytes(entry.device.read(entry.offset, size)[:size]).ljust(size, b"\xff")
                result = int.from_bytes(data, "little")
        finally:
            self._in_io = False
            dt = time.perf_counter_ns() - t0
            ps.time_ns += dt
            ps.timed += 1
            if new_exit:
                stats.vmm_ns[IO] += dt
                stats.timed[IO] += 1
        if stop is not None:
            self._stop_in_hook(stop, port, insn, last)
        elif (
            self.yield_on_io or self._pause_requested or self._stop_requested is not None
        ) and last:
            self._yield = self.yield_on_io
            self._precise_stop(port, insn)
        return result

    def _io_allowed(self, port: int, size: int) -> bool:
        """The CPU's I/O permission check (SDM vol. 1, 19.5), which unicorn leaves out: at
        CPL > IOPL in protected mode the TSS I/O bitmap must clear every bit of the access."""
        cpu = self.cpu
        cpu.load()
        if not cpu.cr(0) & 1:
            return True
        rflags = cpu.read_rflags()
        if (cpu.hflags & E.HF_CPL) <= (rflags >> 12) & 3 and not rflags & (1 << 17):
            return True
        tr = cpu.table(E.TR)
        if not tr.flags & E.DESC_P or (tr.flags >> 8) & 0xF not in (9, 11) or tr.limit < 103:
            return False
        lin = delivery.Linear(self.ops.memory, cpu)
        try:
            offset = lin.u16(tr.base + 0x66) + (port >> 3)
            if offset + 1 > tr.limit:
                return False
            bits = lin.u16(tr.base + offset) >> (port & 7)
        except delivery.Fault:
            return False
        return not bits & ((1 << size) - 1)

    def _deny_io(self, port: int, keep: int, insn: _IoInsn | None = None) -> int:
        """#GP(0) for a denied `in`/`out`, raised once the instruction has run (hooks cannot
        fault it): the state from before it is kept and put back at the I/O breakpoint, which
        delivers the #GP there. Returns what an `in` leaves in its register (unchanged)."""
        cpu = self.cpu
        cpu.load()
        rip = cpu.u64(E.EIP)
        length = insn.length if insn is not None else 1
        self._denied = (bytes(cpu.buf), rip + length)
        self._arm(port)
        return keep

    def _hypercall(self, nr: int) -> Stop | None:
        ctx = self.ctx
        handler = self.ops.hypercalls.table.get(nr)
        if handler is None:
            result = ENOSYS
        else:
            lib.reg_read_batch(self._h, self._arg_ids, self._arg_ptrs, 4)
            a = self._arg_vals
            try:
                result = handler(ctx, a[0], a[1], a[2], a[3])
            except GuestExit as e:
                return Stop(
                    StopReason.EXIT, e.code, f"exit hypercall, code {e.code}", cpu=self.index
                )
            except GuestMemoryError:
                result = -14
        self._rax.value = result & MASK64
        lib.reg_write(self._h, X.UC_X86_REG_RAX, C.byref(self._rax))
        return None

    def _apply(self, effect) -> None:
        if isinstance(effect, Output):
            self.ops.console_write(effect.data)
        else:
            self.ops.apply_effect(effect, self.index)

    def _fault_stub(self, linear: int, insn: _IoInsn | None) -> Stop | None:
        regs = self.cpu.get_regs()
        regs.rip += insn.length if insn is not None else 2  # KVM reports RIP after the `out`
        return faults.fault_stub_stop(self.ops, regs, self.get_sregs(), self.index)

    def _trace_io(self, port, size, value, out, insn) -> None:
        rip = self.cpu.u64(E.EIP) + (insn.length if insn is not None else 1)  # as KVM: past it
        d = "out" if out else "in"
        count = 1
        if insn is not None and insn.string and insn.rep:
            count = self._read_reg(X.UC_X86_REG_RCX) & insn.count_mask
        extra = f" {d} port={port:#x} size={size} count={count}"
        if port == HC_PORT and out:
            nr = value & ((1 << (8 * size)) - 1)
            args = ", ".join(
                f"{self._read_reg(r):#x}"
                for r in (X.UC_X86_REG_RDI, X.UC_X86_REG_RSI, X.UC_X86_REG_RCX, X.UC_X86_REG_RBX)
            )
            extra += f" hypercall={self.ops.hypercalls.name(nr)}({args})"
        print(f"[exit {self.stats.total}] io rip={rip:#x}{extra}", file=sys.stderr)

    # --- stopping from inside a hook -----------------------------------------------------------

    def _stop_in_hook(self, stop: Stop, port: int, insn=None, last: bool = True) -> None:
        self._final = stop
        if last:
            self._precise_stop(port, insn)
        else:
            self._kick()

    def _precise_stop(self, port: int, insn: _IoInsn | None) -> None:
        """Stop right after the current `in`/`out`: arm an I/O breakpoint on its port (see the
        module docstring), and stop the engine in case this block was translated without the
        breakpoint check (a guest that wrote DR7 itself)."""
        self._arm(port)
        lib.emu_stop(self._h)

    def _arm(self, port: int) -> None:
        """An I/O breakpoint on `port`: a #DB trap right after the current instruction."""
        if not self._bpt_armed:
            r = self._read_reg
            self._saved_dr = (r(X.UC_X86_REG_DR0), r(X.UC_X86_REG_DR6), r(X.UC_X86_REG_DR7))
            self.uc.reg_write(X.UC_X86_REG_DR0, port)
            self.uc.reg_write(X.UC_X86_REG_DR7, DR7_IO_BP0)
            self._bpt_armed = True

    def _disarm(self) -> None:
        if self._bpt_armed:
            self._bpt_armed = False
            dr0, dr6, dr7 = self._saved_dr
            self.uc.reg_write(X.UC_X86_REG_DR0, dr0)
            self.uc.reg_write(X.UC_X86_REG_DR6, dr6)
            self.uc.reg_write(X.UC_X86_REG_DR7, dr7)

    def _hook_failed(self, e: BaseException) -> None:
        if self._hook_error is None:
            self._hook_error = e
        lib.emu_stop(self._h)

    # --- exceptions ----------------------------------------------------------------------------

    def _on_intr(self, _h, intno: int, _ud) -> None:
        try:
            if intno == 1 and self._bpt_armed:
                # Our I/O breakpoint: the precise stop after an in/out, or a denied one.
                self._disarm()
                denied, self._denied = self._denied, None
                if denied is not None:
                    cpu = self.cpu
                    cpu.load()
                    if cpu.u64(E.EIP) == denied[1]:
                        cpu.buf[:] = denied[0]
                        self._deliver(delivery.GP, 0, False, inside=True)
                        if self._final is None and not (
                            self._pause_requested or self._stop_requested or self._yield
                        ):
                            return
                lib.emu_stop(self._h)
                return
            cpu = self.cpu
            b = cpu.load()
            software = bool(E._I32.unpack_from(b, E.EXCEPTION_IS_INT)[0])
            error = E._I32.unpack_from(b, E.ERROR_CODE)[0] & 0xFFFF_FFFF
            self._deliver(intno, error, software, inside=True)
        except BaseException as e:
            self._hook_failed(e)

    def _on_invalid(self, _h, _ud) -> bool:
        try:
            self.cpu.load()
            self._deliver(delivery.UD, None, False, inside=True)
        except BaseException as e:
            self._hook_failed(e)
        return True

    def _deliver(self, vector: int, error: int | None, software: bool, inside: bool) -> None:
        """Deliver through the IDT, or stop the VM as KVM does for a triple fault."""
        try:
            delivery.deliver(
                self.cpu, self.ops.memory, vector, error_code=error, software=software,
                inside=inside,
            )  # fmt: skip
        except delivery.TripleFault:
            self.stats.counts[SHUTDOWN] += 1
            self.ctx.exits += 1
            stop = self._fault_stop(StopReason.SHUTDOWN, "triple fault: the vCPU shut down")
            self._final = stop
            if inside:
                lib.emu_stop(self._h)
        except delivery.Unsupported as e:
            self._final = self._fault_stop(
                StopReason.UNHANDLED_EXIT, f"the unicorn backend does not emulate {e.args[0]}"
            )
            if inside:
                lib.emu_stop(self._h)

    def _on_syscall(self, _h, _ud) -> None:
        self._fast_system_call(False)

    def _on_sysenter(self, _h, _ud) -> None:
        self._fast_system_call(True)

    def _fast_system_call(self, sysenter: bool) -> None:
        try:
            cpu = self.cpu
            regime = cpu.regime()
            rip = cpu.u64(E.EIP)
            linear = rip if regime.long_mode else cpu.seg(E.R_CS).base + rip
            code = VirtualMemory(self.ops.memory, regime).read_partial(linear, 15)
            length = _fast_call_length(code)
            delivery.fast_system_call(cpu, self.ops.memory, sysenter, length)
        except delivery.TripleFault:
            self._final = self._fault_stop(StopReason.SHUTDOWN, "triple fault: the vCPU shut down")
            lib.emu_stop(self._h)
        except BaseException as e:
            self._hook_failed(e)

    def _on_unmapped(self, _h, access: int, address: int, size: int, value: int, _ud) -> bool:
        """An access to guest-physical memory that is neither RAM nor a device: KVM makes it an
        MMIO exit to nothing (reads all ones, writes dropped). Map that page as such and let
        the access go on; an instruction fetch from it stops the VM."""
        try:
            if access == UC_MEM_FETCH_UNMAPPED:
                return False
            page = address & ~0xFFF
            if page in self._unassigned or len(self._unassigned) >= MAX_UNASSIGNED_PAGES:
                return False
            self._unassigned.add(page)
            self.vm.map_mmio_page(page)
            return True
        except BaseException as e:
            self._hook_failed(e)
            return False

    # --- MMIO (called by the VM's mmio_map dispatcher) -----------------------------------------

    def mmio(self, addr: int, size: int, value: int, write: bool) -> int:
        self._in_mmio = True
        try:
            t0 = time.perf_counter_ns()
            self.ctx.exits += 1
            self.stats.counts[MMIO] += 1
            size = min(size, 8)
            if self.trace:
                rip = self._read_reg(X.UC_X86_REG_RIP)
                print(
                    f"[exit {self.stats.total}] mmio rip={rip:#x} "
                    f"{'write' if write else 'read'} addr={addr:#x} len={size}",
                    file=sys.stderr,
                )
            hit = self.ops.mmio_bus.lookup(addr)
            result = 0
            if hit is None:
                ps = self.stats.port(-1)  # MMIO to nothing is counted under port -1
                ps.name = "unassigned mmio"
                if write:
                    ps.writes += 1
                else:
                    ps.reads += 1
                    result = (1 << (8 * size)) - 1
            else:
                device, offset = hit
                if write:
                    effect = device.write(offset, (value & ((1 << (8 * size)) - 1)).to_bytes(
                        size, "little"))  # fmt: skip
                    if effect is not None:
                        self._apply(effect)
                else:
                    data = bytes(device.read(offset, size)[:size]).ljust(size, b"\xff")
                    result = int.from_bytes(data, "little")
            dt = time.perf_counter_ns() - t0
            self.stats.vmm_ns[MMIO] += dt
            self.stats.timed[MMIO] += 1
            return result
        except BaseException as e:
            self._hook_failed(e)
            return 0
        finally:
            self._in_mmio = False

    # --- control from outside the loop ---------------------------------------------------------

    def request_pause(self, kick: bool = False) -> None:
        """Make `run()` return None soon. Safe in a signal handler and from other threads: a
        running engine is stopped at once (`kick` is implied; it is accepted for the protocol)."""
        self._pause_requested = True
        self._kick()
        self._notify()

    def request_stop(
        self, reason: StopReason = StopReason.INTERRUPTED, message: str = "", kick: bool = False
    ) -> None:
        self._stop_requested = Stop(reason, 0, message or "stopped by the host", cpu=self.index)
        self._kick()
        self._notify()

    def cancel_pause(self) -> bool:
        pending = self._pause_requested
        self._pause_requested = False
        return pending

    def set_run_signals(self, signals) -> None:
        """Let `signals`, which the calling thread blocks, end run() (a pause), as KVM lets them
        interrupt KVM_RUN. The engine runs in this thread, and a signal aimed at one thread
        (kvmpy.sched's ThreadTimer) can be waited for only by that thread, so while they are
        set the engine runs in slices of RUN_SIGNAL_SLICE_US and the vCPU looks for a pending
        one between slices (and while halted): preemption is that much late at most."""
        self._run_signals = frozenset(signals) if signals else None

    def _run_signal_pending(self) -> bool:
        signals = self._run_signals
        return bool(signals) and signal.sigtimedwait(signals, 0) is not None

    def _timed_out(self) -> bool:
        out = C.c_size_t(0)
        lib.query(self._h, UCC.UC_QUERY_TIMEOUT, C.byref(out))
        return bool(out.value)

    def kick(self) -> None:
        self._kick()

    def _kick(self) -> None:
        if not self._running:
            return
        if self._in_mmio:
            # Stopping now would make QEMU restart the MMIO instruction after the device has
            # seen it: the kicker thread stops the engine once the access is done.
            self.kick_deferred = True
            _Kicker.get().poke()
            return
        self._kicked = True
        lib.emu_stop(self._h)

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def complete_pending_io(self) -> None:
        """Nothing to complete: an `in`/`out` is finished when its hook returns."""

    # --- interrupts (the VM's minimal interrupt controller calls these) -------------------------

    def interrupt(self) -> None:
        """A vector became pending: wake a halted vCPU, stop a running one to deliver it."""
        self._kick()
        self._notify()
        if self._running:
            _Kicker.get().poke()  # retry until the guest sets IF

    def _try_inject(self) -> bool:
        """Deliver the highest pending vector if the guest accepts interrupts now."""
        cpu = self.cpu
        b = cpu.load()
        if E._U32.unpack_from(b, E.HFLAGS)[0] & E.HF_INHIBIT_IRQ:
            return False
        if not cpu.read_rflags() & E.IF_MASK:
            return False
        vector = self.vm.take_interrupt()
        if vector is None:
            return False
        self._deliver(vector, None, False, inside=False)
        return True

    def interruptible(self) -> bool:
        return bool(self.cpu.read_rflags() & E.IF_MASK)

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> Stop | None:
        """Run until the VM stops (a Stop) or a pause is requested (None); again to continue."""
        self.thread_ident = threading.get_ident()
        main = threading.current_thread() is threading.main_thread()
        kicker = _Kicker.get()
        kicker.enter(self, main)
        t_loop = time.perf_counter_ns()
        try:
            stop = self._loop()
        finally:
            self.stats.loop_ns += time.perf_counter_ns() - t_loop
            kicker.leave(self, main)
            self.thread_ident = None
        if stop is not None:
            self.stopped = stop
        return stop

    def _loop(self) -> Stop | None:
        self._out_impl = self._build_out()
        self.ctx.exits = self.stats.total
        self.vm.sync_mmio()
        h = self._h
        start = lib.emu_start
        never, zero, zero_count = C.c_uint64(NEVER), C.c_uint64(0), C.c_size_t(0)
        sliced = self._run_signals is not None
        timeout = C.c_uint64(RUN_SIGNAL_SLICE_US) if sliced else zero
        rip = self._reg
        rip_p = C.byref(rip)
        while True:
            if self._stop_requested is not None:
                stop, self._stop_requested = self._stop_requested, None
                self._pause_requested = False
                return stop
            if self._pause_requested:
                self._pause_requested = False
                return None
            if self.vm.pending_interrupts():
                self._try_inject()
                if self._final is not None:
                    stop, self._final = self._final, None
                    return stop
            lib.reg_read(h, X.UC_X86_REG_RIP, rip_p)
            self._final = None
            self._kicked = False
            self._running = True
            err = start(h, rip, never, timeout, zero_count)
            self._running = False
            kicked = self._kicked
            _checkpoint()
            self._disarm()
            self._denied = None
            if self._hook_error is not None:
                e, self._hook_error = self._hook_error, None
                log.error("unicorn backend: error in a hook", exc_info=e)
                return self._fault_stop(
                    StopReason.VMM_ERROR, f"the unicorn backend failed in a hook: {e!r}"
                )
            if self._final is not None:
                stop, self._final = self._final, None
                return stop
            if self._yield:
                self._yield = False
                return None
            if err:
                return self._emu_error(err)
            if kicked or self._pause_requested or self._stop_requested is not None:
                continue
            if sliced:
                if self._run_signal_pending():
                    return None
                if self._timed_out():
                    continue
            stop = self._halted()
            if stop is not None:
                return stop

    def _halted(self) -> Stop | None:
        """The engine returned on its own: the guest executed `hlt`."""
        self.ctx.exits += 1
        self.stats.counts[HLT] += 1
        if self.trace:
            rip = self._read_reg(X.UC_X86_REG_RIP)
            print(f"[exit {self.stats.total}] hlt rip={rip:#x}", file=sys.stderr)
        if not self.interruptible():
            return Stop(StopReason.HLT, 0, "hlt", cpu=self.index)
        # With interrupts enabled the CPU sleeps until one arrives (the backend has its own
        # interrupt controller, as KVM has with an irqchip), or a pause or a stop.
        with self._wake:
            while not (
                self.vm.pending_interrupts()
                or self._pause_requested
                or self._stop_requested is not None
            ):
                if self._run_signals is not None:
                    if self._run_signal_pending():
                        return None
                    self._wake.wait(RUN_SIGNAL_SLICE_US / 1e6)
                else:
                    self._wake.wait(0.5)
        return None

    def _emu_error(self, err: int) -> Stop:
        names = {
            UCC.UC_ERR_FETCH_UNMAPPED: "instruction fetch from an address that is not RAM",
            UCC.UC_ERR_READ_UNMAPPED: "read from an address that is not RAM (too many "
            "unassigned pages touched)",
            UCC.UC_ERR_WRITE_UNMAPPED: "write to an address that is not RAM (too many "
            "unassigned pages touched)",
            UCC.UC_ERR_WRITE_PROT: "write to read-only memory",
            UCC.UC_ERR_FETCH_PROT: "instruction fetch from non-executable memory",
            UCC.UC_ERR_INSN_INVALID: "invalid instruction",
        }
        what = names.get(err, f"emulation error {err} ({UcError(err)})")
        return self._fault_stop(StopReason.INTERNAL_ERROR, f"unicorn stopped the vCPU: {what}")

    def _fault_stop(self, reason: StopReason, message: str) -> Stop:
        return faults.stop_with_fault(
            self.ops, reason, message, self.get_regs(), self.get_sregs(), self.index
        )

    # --- state ---------------------------------------------------------------------------------

    def get_regs(self) -> S.kvm_regs:
        regs = self.cpu.get_regs()
        if self._in_io:
            # As KVM reports them during an I/O exit: RIP past the `in`/`out`.
            regs.rip += self._io_length()
        return regs

    def set_regs(self, regs: S.kvm_regs) -> None:
        if self._in_io:
            regs = S.kvm_regs.from_buffer_copy(regs)
            regs.rip -= self._io_length()
        self.cpu.set_regs(regs, inside=self._running)

    def _io_length(self) -> int:
        _linear, insn = self._current_io()
        return insn.length if insn is not None else 1

    def get_sregs(self) -> S.kvm_sregs:
        return self.cpu.get_sregs()

    def set_sregs(self, sregs: S.kvm_sregs) -> None:
        self.cpu.set_sregs(sregs)
        self._insn_cache.clear()
        for i in range(256):
            if sregs.interrupt_bitmap[i // 64] >> (i % 64) & 1:
                self.vm.set_pending(i)

    def get_fpu(self) -> S.kvm_fpu:
        return self.cpu.get_fpu()

    def set_fpu(self, fpu: S.kvm_fpu) -> None:
        self.cpu.set_fpu(fpu)

    def get_msrs(self, indices=None) -> dict[int, int]:
        msrs = self.cpu.get_msrs()
        return msrs if indices is None else {i: msrs[i] for i in indices if i in msrs}

    def set_msrs(self, msrs: dict[int, int]) -> int:
        """Returns how many were set (KVM_SET_MSRS' count); unmodelled MSRs are skipped."""
        dropped = self.cpu.set_msrs(msrs)
        return len(msrs) - len(dropped)

    def tsc_khz(self) -> int:
        """The guest TSC's rate: QEMU's rdtsc here reads the host's TSC."""
        return host_tsc_khz()

    def regs_dict(self) -> dict[str, int]:
        regs = self.get_regs()
        return {name: getattr(regs, name) for name in S.GPR_NAMES}

    def save_state(self) -> dict[str, Any]:
        """This vCPU in the shared CPU-state format (persist/state.py's keys)."""
        events = S.kvm_vcpu_events()
        if self.cpu.load() is not None and self.cpu.hflags & E.HF_INHIBIT_IRQ:
            events.interrupt.shadow = 1
        fpu = self.get_fpu()
        return {
            "regs": _enc(self.get_regs()),
            "sregs": _enc(self.get_sregs()),
            "fpu": _enc(fpu),
            "xsave": _enc(self.cpu.get_xsave(fpu)),
            "msrs": [[i, v] for i, v in self.cpu.get_msrs().items()],
            "debugregs": _enc(self.cpu.get_debugregs()),
            "mp_state": 0,
            "vcpu_events": _enc(events),
        }

    def restore_state(self, d: dict[str, Any]) -> None:
        """Load a vCPU state saved by either backend. The KVM-only parts are dropped, and said
        so in one log line."""
        sregs = _dec(d, "sregs", S.kvm_sregs)
        regs = _dec(d, "regs", S.kvm_regs)
        fpu = _dec(d, "fpu", S.kvm_fpu)
        msrs = d.get("msrs", [])
        if not isinstance(msrs, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(x, int) for x in p) for p in msrs
        ):
            raise StateError("the saved MSR list is malformed")
        self.set_sregs(sregs)
        dropped_msrs = self.cpu.set_msrs({i: v & MASK64 for i, v in msrs})
        self.set_regs(regs)
        self.set_fpu(fpu)
        if "debugregs" in d:
            self.cpu.set_debugregs(_dec(d, "debugregs", S.kvm_debugregs))
        shadow = False
        # The XSAVE area adds only AVX and later state to `fpu` here (no AVX in these engines).
        dropped = [k for k in ("lapic", "xcrs", "cpuid", "tsc_khz") if k in d]
        if "vcpu_events" in d:
            ev = _dec(d, "vcpu_events", S.kvm_vcpu_events)
            shadow = bool(ev.interrupt.shadow)
            if ev.exception.injected or ev.exception.pending or ev.nmi.pending:
                dropped.append("a pending exception or NMI")
        if shadow:
            cpu = self.cpu
            cpu.load()
            cpu.update_hflags(cpu.read_rflags(), inhibit_irq=True)
            cpu.store()
        if dropped_msrs:
            dropped.append(f"{len(dropped_msrs)} MSRs unicorn does not model")
        if dropped:
            log.info("unicorn backend: the restored vCPU state drops %s", ", ".join(dropped))
        self.uc.ctl_flush_tb()  # guest memory was rewritten under the translated code
        self._insn_cache.clear()

    def close(self) -> None:
        self._hooks.clear()


#: A saved vCPU state this backend cannot read (persist reports it as any snapshot error).
StateError = SnapshotError


def _enc(obj) -> str:
    return base64.b64encode(bytes(obj)).decode("ascii")


def _dec(d: dict, key: str, cls):
    text = d.get(key)
    if not isinstance(text, str):
        raise StateError(f"the saved vCPU state has no {key}")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise StateError(f"the saved vCPU {key} is not valid base64") from None
    if len(raw) != C.sizeof(cls):
        raise StateError(f"the saved vCPU {key} is {len(raw)} bytes, expected {C.sizeof(cls)}")
    return cls.from_buffer_copy(raw)


@functools.cache
def host_tsc_khz() -> int:
    """The host TSC's frequency, measured: rdtsc in a scratch engine around 20 ms of
    CLOCK_MONOTONIC."""
    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc

    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0x1000, 0x1000)
    uc.mem_write(0x1000, b"\x0f\x31\xf4")  # rdtsc; hlt

    def sample() -> tuple[int, int]:
        t = time.monotonic_ns()
        uc.emu_start(0x1000, NEVER)
        tsc = (uc.reg_read(X.UC_X86_REG_RDX) << 32) | (uc.reg_read(X.UC_X86_REG_RAX) & 0xFFFF_FFFF)
        return tsc, t

    tsc0, t0 = sample()
    time.sleep(0.02)
    tsc1, t1 = sample()
    return max(1, round((tsc1 - tsc0) * 1e6 / max(t1 - t0, 1)))


def _fast_call_length(code: bytes) -> int:
    """Length of a `syscall` (0F 05) or `sysenter` (0F 34) with its prefixes."""
    i = 0
    while i < len(code) - 1 and (code[i] in _PREFIXES or 0x40 <= code[i] <= 0x4F):
        i += 1
    return i + 2


class _Kicker:
    """One helper thread per process: stops the engine of the vCPU running in the main thread
    when a signal arrives (through Python's signal wakeup fd), finishes deferred kicks, and
    keeps kicking vCPUs whose pending interrupt waits for RFLAGS.IF (unicorn has no interrupt
    window exit: the vCPU looks again every millisecond)."""

    _instance: _Kicker | None = None
    _lock = threading.Lock()

    @classmethod
    def get(cls) -> _Kicker:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poke_r, self._poke_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._main: UnicornVcpu | None = None
        self._old_fd = -1
        self._running: set[UnicornVcpu] = set()
        self._set_lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._serve, name="kvmpy-unicorn-kicker", daemon=True
        )
        self._thread.start()

    def enter(self, vcpu: UnicornVcpu, main: bool) -> None:
        with self._set_lock:
            self._running.add(vcpu)
        if main:
            self._main = vcpu
            try:
                self._old_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
            except ValueError:
                self._old_fd = -1
        if vcpu.vm.pending_interrupts():
            self.poke()  # the kicker looks again for interrupts waiting on RFLAGS.IF

    def leave(self, vcpu: UnicornVcpu, main: bool) -> None:
        with self._set_lock:
            self._running.discard(vcpu)
        if main:
            self._main = None
            try:
                signal.set_wakeup_fd(self._old_fd)
            except ValueError:
                pass
            self._old_fd = -1

    def poke(self) -> None:
        try:
            os.write(self._poke_w, b"\0")
        except BlockingIOError:
            pass

    def _serve(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        sel = selectors.DefaultSelector()
        sel.register(self._r, selectors.EVENT_READ, "signal")
        sel.register(self._poke_r, selectors.EVENT_READ, "poke")
        while True:
            with self._set_lock:
                waiting = [
                    v for v in self._running
                    if v.kick_deferred or v.vm.pending_interrupts()
                ]  # fmt: skip
            for key, _ in sel.select(0.001 if waiting else None):
                try:
                    data = os.read(key.fileobj, 512)
                except BlockingIOError:
                    continue
                if key.data == "signal":
                    old = self._old_fd
                    if old >= 0:
                        try:
                            os.write(old, data)
                        except OSError:
                            pass
                    v = self._main
                    if v is not None:
                        v._kick()
            for v in waiting:
                if v.kick_deferred and not v._in_mmio:
                    v.kick_deferred = False
                    v._kick()
                elif v.vm.pending_interrupts() and v._running:
                    v._kick()
