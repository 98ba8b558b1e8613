"""The KVM backend's vCPU: its run loop (KVM_RUN, decode the exit, dispatch it, count it).

The hot path is written for the hot path. On our hosts a hypercall round trip (guest at CPL0)
costs ~9.7 µs in a minimal C VMM, ~10.7 µs in a bare Python loop over fcntl.ioctl, and ~11.8 µs
here (`kvmpy bench exits`: ratio 1.22 against C). A naive Python loop pays 13-15 µs: extra
ioctls (KVM_GET_REGS/KVM_SET_REGS), per-exit objects, fcntl's failing buffer parse of an int
argument and two clock reads per exit. Here:

* registers come from the `kvm_run` page (KVM_CAP_SYNC_REGS), so a hypercall is exactly one
  KVM_RUN; its result is written back into that page and flagged in `kvm_dirty_regs`;
* `kvm_run` fields are read through typed memoryviews (`_u8/_u16/_u32/_u64`) at fixed
  indices, not through ctypes attributes;
* counters are preallocated lists and per-port records; nothing is allocated per exit on the
  hypercall path;
* everything the loop touches is bound to a local before it starts.

Rare exits (faults, MMIO, odd I/O) go through `_slow_exit`, where clarity wins.
"""

from __future__ import annotations

import dis
import errno
import fcntl
import logging
import operator
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ...arch.x86.faults import PAGED32_REFUSED, fault_stub_stop, stop_with_fault
from ...arch.x86.modes import FAULT_PORT, Mode
from ...devices import Output
from ...errors import ConfigError, GuestMemoryError
from ...hypercalls import ENOSYS, GuestExit, HypercallContext
from ...hypercalls import PORT as HC_PORT
from ...kvm import constants as K
from ...kvm import structs as S
from ...kvm.vcpu import RUN_DIRTY_REGS, RUN_EXIT_UNION, RUN_SYNC_REGS, RUN_VALID_REGS, VcpuFd
from ...result import Stop, StopReason
from ...stats import EXACT_FIRST, MAX_REASON, SAMPLE_EVERY, ExitStats
from ...stats import EXCEPTION as EXCEPTION_REASON
from ..signals import KICK_SIGNAL

if TYPE_CHECKING:
    from ..base import VmOps

log = logging.getLogger(__name__)

MASK64 = (1 << 64) - 1

MSR_IA32_APIC_BASE = 0x1B
APIC_BASE_BSP = 1 << 8
APIC_BASE_EXTD = 1 << 10  # x2APIC
APIC_BASE_ENABLE = 1 << 11
APIC_DEFAULT_BASE = 0xFEE0_0000
APIC_REG_SVR = 0xF0
APIC_SVR_ENABLE = 1 << 8

# Indices into the typed views of kvm_run (see <linux/kvm.h>); asserted in tests.
_IO_DIRECTION = RUN_EXIT_UNION  # u8
_IO_SIZE = RUN_EXIT_UNION + 1  # u8
_IO_PORT = (RUN_EXIT_UNION + 2) // 2  # u16
_IO_COUNT = (RUN_EXIT_UNION + 4) // 4  # u32
_IO_DATA_OFFSET = (RUN_EXIT_UNION + 8) // 8  # u64
_IO_WORD = RUN_EXIT_UNION // 4  # u32: direction | size << 8 | port << 16
_HC_OUT32 = K.KVM_EXIT_IO_OUT | 4 << 8 | HC_PORT << 16
_DIRTY = RUN_DIRTY_REGS // 8  # u64
_REG = {name: RUN_SYNC_REGS // 8 + i for i, name in enumerate(S.GPR_NAMES)}  # u64
_RAX, _RBX, _RCX, _RSI, _RDI = _REG["rax"], _REG["rbx"], _REG["rcx"], _REG["rsi"], _REG["rdi"]

_IO = K.ExitReason.IO
_HLT = K.ExitReason.HLT
_OUT = K.KVM_EXIT_IO_OUT


class KvmVcpu:
    """One KVM vCPU and its run loop (the `VcpuBackend` of the KVM backend)."""

    def __init__(self, ops: VmOps, fd: VcpuFd, index: int):
        self.ops = ops
        self.fd = fd
        self.index = index
        self.stats = ExitStats()
        self.ctx = HypercallContext(self, ops)
        #: Called with (vcpu, instruction bytes) when KVM could not emulate an instruction;
        #: returns True when it handled it (a host-specific fallback) and the guest goes on.
        self.on_emulation_failure: Callable[[KvmVcpu, bytes | None], bool] | None = None
        #: Called with (vcpu, msr, value) for a guest `wrmsr` the VM's MSR filter sends to
        #: userspace (`KvmVm.filter_msr_writes`); returns True when the write is done (the
        #: hook applied it), False to give the guest the #GP a refused write raises.
        self.on_msr_write: Callable[[KvmVcpu, int, int], bool] | None = None
        #: Log every exit (kvmpy run --trace-exits).
        self.trace = False
        #: Return None after every handled port-I/O exit (the on-io scheduler).
        self.yield_on_io = False
        #: Time every exit instead of sampling the hypercall fast path (see stats.ExitStats).
        self.exact_timing = False
        #: The last stop, if any.
        self.stopped: Stop | None = None
        self._pause_requested = False
        self._stop_requested: Stop | None = None
        #: The thread inside run(), for kick().
        self.thread_ident: int | None = None
        #: Signals KVM lets in during KVM_RUN though the thread blocks them (set_run_signals).
        self._run_signals: frozenset[int] | None = None
        view = fd.run_view
        self._u8 = view
        self._u16 = view.cast("H")
        self._u32 = view.cast("I")
        self._u64 = view.cast("Q")
        # Ask KVM to copy the general-purpose registers into kvm_run on every exit.
        self._u64[RUN_VALID_REGS // 8] = K.KVM_SYNC_X86_REGS

    def close(self) -> None:
        for v in (self._u16, self._u32, self._u64):
            v.release()
        self.fd.close()

    # --- control from outside the loop (signal handlers, other threads) ------------------------

    def request_pause(self, kick: bool = False) -> None:
        """Make `run()` return None: at once if the vCPU is outside KVM_RUN or a signal
        interrupts it, else at its next exit. Safe in a signal handler. With `kick`, signal the
        thread running the vCPU so a guest that never exits is interrupted too (from another
        thread; see `kick`)."""
        self._pause_requested = True
        self.fd.run_struct.immediate_exit = 1
        if kick:
            self.kick()

    def request_stop(
        self,
        reason: StopReason = StopReason.INTERRUPTED,
        message: str = "",
        kick: bool = False,
        signum: int | None = None,
    ) -> None:
        """Make `run()` return a Stop with `reason` (as `request_pause`, but final); `signum`:
        the signal that asked for it, if one did."""
        self._stop_requested = Stop(
            reason, 0, message or "stopped by the host", cpu=self.index, signum=signum
        )
        self.fd.run_struct.immediate_exit = 1
        if kick:
            self.kick()

    def cancel_pause(self) -> bool:
        """Withdraw a pause that run() has not consumed yet; returns whether one was pending.

        A timer signal can land just after run() returned for another reason (a stop, an I/O
        yield); its pause would then end the vCPU's next run() at once. A scheduler that has
        disarmed its timer calls this before the next run(). Not for signal handlers."""
        pending = self._pause_requested
        self._pause_requested = False
        if self._stop_requested is None:
            self.fd.run_struct.immediate_exit = 0
        return pending

    def set_run_signals(self, signals) -> None:
        """Let `signals`, which the calling thread blocks, interrupt KVM_RUN (and only KVM_RUN:
        KVM_SET_SIGNAL_MASK); run() consumes one that does and returns None, a pause. A timer
        signal that fires just before KVM_RUN then stays pending and ends it at once, where a
        handled signal would be spent before the ioctl. Call in the thread that will run the
        vCPU, after blocking the signals there; None: the thread's own mask again."""
        if signals is None:
            self.fd.set_signal_mask(None)
            self._run_signals = None
            return
        signals = frozenset(signals)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        self.fd.set_signal_mask(set(blocked) - signals)
        self._run_signals = signals

    def kick(self) -> None:
        """Interrupt KVM_RUN in the thread running this vCPU with KICK_SIGNAL.

        immediate_exit alone only stops the *next* KVM_RUN; a guest spinning at CPL3 never
        exits, so the vCPU thread needs a signal. `install_kick_handler()` (done by Machine in
        the main thread) gives that signal a no-op handler: an ignored signal would not
        interrupt the ioctl, a default one would kill the process."""
        ident = self.thread_ident
        if ident is not None:
            try:
                signal.pthread_kill(ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> Stop | None:
        """Run until the VM stops (returns the Stop) or a pause is requested (returns None).

        Calling it again after a stop continues the guest where it stopped (after the `hlt`
        or the exit hypercall), as a debugger's "continue" would."""
        self.thread_ident = threading.get_ident()
        try:
            stop = self._loop()
        finally:
            self.thread_ident = None
        if stop is not None:
            self.stopped = stop
            self.complete_pending_io()
        return stop

    def complete_pending_io(self) -> None:
        """Finish the instruction of the last I/O or MMIO exit inside KVM.

        KVM completes an `in`/`out` or MMIO access on the *next* KVM_RUN; until then the
        vCPU's registers are not consistent, and KVM_SET_REGS would be overwritten by the
        completion. The kernel's documented remedy: enter once with immediate_exit set.
        Call before reading or changing vCPU state after a stop or pause (run() does so after
        a stop).
        """
        if self._u32[2] not in (K.ExitReason.IO, K.ExitReason.MMIO):
            return
        run = self.fd.run_struct
        run.immediate_exit = 1
        try:
            fcntl.ioctl(self.fd.fd, K.KVM_RUN)
        except InterruptedError:
            pass
        finally:
            run.immediate_exit = 0
        # Not an exit: make a second call a no-op.
        self._u32[2] = K.ExitReason.INTR

    def _loop(self) -> Stop | None:
        # Everything the loop touches is a local: a global or attribute lookup per exit is
        # measurable against a ~10 µs round trip (see the module docstring).
        ioctl = fcntl.ioctl
        fd = self.fd.fd
        kvm_run = K.KVM_RUN
        now = time.perf_counter_ns
        u32, u64 = self._u32, self._u64
        stats = self.stats
        counts, vmm_ns, timed = stats.counts, stats.vmm_ns, stats.timed
        hc_stats = stats.port(HC_PORT, "hypercall")
        hc_table = self.ops.hypercalls.table
        ctx = self.ctx
        trace = self.trace
        yield_on_io = self.yield_on_io
        port_io = self._port_io
        slow_exit = self._slow_exit
        sample_mask = 0 if (self.exact_timing or trace) else SAMPLE_EVERY - 1
        exact_first = EXACT_FIRST
        rax, rbx, rcx, rsi, rdi, dirty = _RAX, _RBX, _RCX, _RSI, _RDI, _DIRTY
        sync_regs = K.KVM_SYNC_X86_REGS
        exit_io, exit_hlt, max_reason = _IO, _HLT, MAX_REASON
        io_word, io_data_offset = _IO_WORD, _IO_DATA_OFFSET
        # Tracing and yielding after every I/O exit send hypercalls down the slow path (which
        # does both), so the fast path carries no per-exit test for them.
        hc_out32 = -1 if (trace or yield_on_io) else _HC_OUT32
        mask64, enosys, efault = MASK64, ENOSYS, -14
        index = self.index
        n = stats.total
        t_loop = now()
        try:
            while True:
                try:
                    # No third argument: given an int, CPython's fcntl.ioctl first tries (and
                    # fails) to parse it as two kinds of buffer, raising and clearing a
                    # TypeError each time: ~1 µs per exit, measured.
                    ioctl(fd, kvm_run)
                except InterruptedError:
                    stop = self._interrupted()
                    if stop is not False:
                        return stop
                    continue
                except OSError as e:
                    if e.errno == errno.EAGAIN:
                        # An application processor leaving wait-for-SIPI (seen on KVM-PVM
                        # when the in-kernel LAPIC starts it): enter again.
                        continue
                    return self._run_failed(e)
                reason = u32[2]
                n += 1
                if reason >= max_reason:
                    reason = 0
                counts[reason] += 1
                # Hypercall fast path: a 32-bit `out` to port 0x500. Direction, size and port
                # are the first four bytes of the io exit: one read tests all three. (A
                # `rep outsd` to the port is taken as one hypercall with its first dword.)
                if reason == exit_io and u32[io_word] == hc_out32:
                    t_exit = now() if not n & sample_mask or n < exact_first else 0
                    hc_stats.writes += 1
                    nr = u32[u64[io_data_offset] >> 2]
                    handler = hc_table.get(nr)
                    ctx.exits = n
                    if handler is None:
                        u64[rax] = enosys & mask64
                    else:
                        # `try` costs nothing in CPython 3.11 until something raises, so a
                        # Python handler's mistakes are caught here, in the one try around
                        # the call and the rax write, with no instruction added per exit.
                        try:
                            result = handler(ctx, u64[rdi], u64[rsi], u64[rcx], u64[rbx])
                            u64[rax] = result & mask64
                        except GuestExit as e:
                            return Stop(
                                StopReason.EXIT, e.code, f"exit hypercall, code {e.code}", cpu=index
                            )
                        except GuestMemoryError:
                            u64[rax] = efault & mask64  # a handler touched a bad guest pointer
                        except Exception as e:
                            # Raised by the rax write (None, a numpy int, not an int) or by
                            # the handler: the traceback's line in this frame tells which.
                            if e.__traceback__.tb_lineno in _RESULT_LINES:
                                stop = self._odd_result(nr, result)
                            else:
                                stop = self._handler_raised(nr, e)
                            if stop is not None:
                                return stop
                    u64[dirty] = sync_regs
                    if t_exit:
                        dt = now() - t_exit
                        vmm_ns[reason] += dt
                        timed[reason] += 1
                        hc_stats.time_ns += dt
                        hc_stats.timed += 1
                    continue
                t_exit = now()
                if trace:
                    self._trace(reason)
                if reason == exit_io:
                    stop = port_io()
                    if stop is not None:
                        return stop
                    if yield_on_io:
                        vmm_ns[reason] += now() - t_exit
                        timed[reason] += 1
                        return None
                elif reason == exit_hlt:
                    return Stop(StopReason.HLT, 0, "hlt", cpu=index)
                else:
                    stop = slow_exit(reason, n)
                    if stop is not None:
                        return stop
                vmm_ns[reason] += now() - t_exit
                timed[reason] += 1
        finally:
            stats.loop_ns += now() - t_loop

    # --- port I/O (everything but the hypercall fast path) -------------------------------------

    def _port_io(self) -> Stop | None:
        u8, u16, u32, u64 = self._u8, self._u16, self._u32, self._u64
        port = u16[_IO_PORT]
        out = u8[_IO_DIRECTION] == _OUT
        size = u8[_IO_SIZE]
        count = u32[_IO_COUNT]
        off = u64[_IO_DATA_OFFSET]
        nbytes = size * count
        if size not in (1, 2, 4) or off + nbytes > len(u8):
            # KVM never reports these; a loop over `count` items would run for ever.
            return self._stop_with_fault(
                StopReason.VMM_ERROR,
                f"KVM reported an impossible I/O exit (port {port:#x}, size {size}, count "
                f"{count}, data at offset {off})",
            )
        data = u8[off : off + nbytes]
        entry = self.ops.pio_bus.entries.get(port)
        if entry is None and port == FAULT_PORT and out:
            stop = self._check_fault_stub()
            if stop is not None:  # an exception, not an I/O exit: count it as one
                counts = self.stats.counts
                counts[_IO] -= 1
                counts[EXCEPTION_REASON] += 1
                return stop
        ps = self.stats.port(port, entry.device.name if entry else "(unassigned)")
        t0 = time.perf_counter_ns()
        if out:
            ps.writes += 1
        else:
            ps.reads += 1
        try:
            if port == HC_PORT and out:
                # An 8- or 16-bit hypercall (mode-neutral code), or any hypercall while tracing
                # or yielding on I/O; otherwise 32-bit ones take the fast path.
                return self._hypercall(int.from_bytes(data[:size], "little"))
            if entry is None:
                if not out:
                    data[:] = b"\xff" * nbytes  # nothing there: the bus floats high
                return None
            device, offset = entry.device, entry.offset
            if out:
                if count == 1:
                    effect = device.write(offset, bytes(data))
                    if effect is not None:
                        self._apply(effect)
                elif hasattr(device, "write_string"):
                    effect = device.write_string(offset, size, data)
                    if effect is not None:
                        self._apply(effect)
                else:
                    for i in range(count):
                        effect = device.write(offset, bytes(data[i * size : (i + 1) * size]))
                        if effect is not None:
                            self._apply(effect)
            elif count > 1 and hasattr(device, "read_string"):
                effect = device.read_string(offset, size, data)
                if effect is not None:
                    self._apply(effect)
            else:
                for i in range(count):
                    value = device.read(offset, size)
                    data[i * size : (i + 1) * size] = bytes(value[:size]).ljust(size, b"\xff")
            return None
        except Exception as e:  # a Python device model failed: the VMM's fault, not the guest's
            return self._device_raised(entry.device.name if entry else f"port {port:#x}", e)
        finally:
            ps.time_ns += time.perf_counter_ns() - t0
            ps.timed += 1

    def _hypercall(self, nr: int) -> Stop | None:
        """The hypercall path for everything the fast path does not take."""
        u64 = self._u64
        self.ctx.exits = self.stats.total
        handler = self.ops.hypercalls.table.get(nr)
        if handler is None:
            result = ENOSYS
        else:
            try:
                result = handler(self.ctx, u64[_RDI], u64[_RSI], u64[_RCX], u64[_RBX])
            except GuestExit as e:
                return Stop(
                    StopReason.EXIT, e.code, f"exit hypercall, code {e.code}", cpu=self.index
                )
            except GuestMemoryError:
                result = -14
            except Exception as e:
                return self._handler_raised(nr, e)
        try:
            u64[_RAX] = result & MASK64
        except Exception:
            stop = self._odd_result(nr, result)
            if stop is not None:
                return stop
        u64[_DIRTY] = K.KVM_SYNC_X86_REGS
        if self.trace:
            value = u64[_RAX]
            signed = value - (1 << 64) if value >> 63 else value
            shown = f"{signed}" if -4096 < signed < 0 else f"{value:#x}"
            print(f"    -> {self.ops.hypercalls.name(nr)} returned {shown}", file=sys.stderr)
        return None

    def _handler_raised(self, nr: int, e: Exception) -> Stop:
        """A Python hypercall handler raised: the VMM's side failed, not the guest's, so the VM
        stops with VMM_ERROR (run() itself raises nothing its caller did not ask for)."""
        name = self.ops.hypercalls.name(nr)
        log.debug("hypercall %d (%s) raised", nr, name, exc_info=e)
        detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        return self._stop_with_fault(
            StopReason.VMM_ERROR, f"hypercall {nr} ({name}) handler raised {detail}"
        )

    def _odd_result(self, nr: int, result) -> Stop | None:
        """A handler's result that is not a plain int: None means 0, an integer type (numpy's)
        is taken as its value, anything else stops the VM."""
        if result is None:
            self._u64[_RAX] = 0
            return None
        try:
            self._u64[_RAX] = operator.index(result) & MASK64
            return None
        except Exception:
            pass
        name = self.ops.hypercalls.name(nr)
        return self._stop_with_fault(
            StopReason.VMM_ERROR,
            f"hypercall {nr} ({name}) handler returned {type(result).__name__} {result!r:.60}, "
            "not an int",
        )

    def _apply(self, effect) -> None:
        if isinstance(effect, Output):
            self.ops.console_write(effect.data)
        else:
            self.ops.apply_effect(effect, self.index)

    # --- rare exits ----------------------------------------------------------------------------

    def _slow_exit(self, reason: int, n: int) -> Stop | None:
        ER = K.ExitReason
        run = self.fd.run_struct
        if reason == ER.MMIO:
            return self._mmio(run.mmio)
        if reason in (ER.IRQ_WINDOW_OPEN, ER.INTR):
            return None
        if reason == ER.SHUTDOWN:
            return self._shutdown(n)
        if reason == ER.INTERNAL_ERROR:
            return self._internal_error(run)
        if reason in (ER.X86_WRMSR, ER.X86_RDMSR):
            return self._msr_exit(reason, run.msr)
        if reason == ER.FAIL_ENTRY:
            code = run.fail_entry.hardware_entry_failure_reason
            return self._stop_with_fault(
                StopReason.FAIL_ENTRY, f"the CPU refused the vCPU state (hardware reason {code:#x})"
            )
        if reason == ER.SYSTEM_EVENT:
            kind = run.system_event.type
            if kind == K.KVM_SYSTEM_EVENT_RESET:
                return Stop(StopReason.RESET, 0, "the guest requested a reset", cpu=self.index)
            return self._stop_with_fault(StopReason.SHUTDOWN, f"system event {kind}")
        name = K.ExitReason.name_of(reason)
        return self._stop_with_fault(
            StopReason.UNHANDLED_EXIT, f"kvmpy has no handler for the {name} exit"
        )

    def _device_raised(self, name: str, e: Exception) -> Stop:
        log.debug("device %s raised", name, exc_info=e)
        detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        return self._stop_with_fault(StopReason.VMM_ERROR, f"device {name} raised {detail}")

    def _mmio(self, mmio) -> Stop | None:
        hit = self.ops.mmio_bus.lookup(mmio.phys_addr)
        length = min(mmio.len, 8)
        if hit is None:
            ps = self.stats.port(-1)  # MMIO to nothing is counted under port -1
            ps.name = "unassigned mmio"
            if mmio.is_write:
                ps.writes += 1
            else:
                ps.reads += 1
                for i in range(length):
                    mmio.data[i] = 0xFF
            return None
        device, offset = hit
        try:
            if mmio.is_write:
                effect = device.write(offset, bytes(mmio.data[:length]))
                if effect is not None:
                    self._apply(effect)
            else:
                value = bytes(device.read(offset, length)[:length]).ljust(length, b"\xff")
                for i in range(length):
                    mmio.data[i] = value[i]
        except Exception as e:
            return self._device_raised(device.name, e)
        return None

    def _interrupted(self) -> Stop | None | bool:
        """KVM_RUN returned EINTR: a pause, a stop, or a stray signal (False: keep going)."""
        self.fd.run_struct.immediate_exit = 0
        if self._stop_requested is not None:
            stop, self._stop_requested = self._stop_requested, None
            return stop
        if self._pause_requested:
            self._pause_requested = False
            return None
        signals = self._run_signals
        if signals and signal.sigtimedwait(signals, 0) is not None:
            return None  # the driver's timer (set_run_signals)
        return False

    def _run_failed(self, e: OSError) -> Stop:
        return self._stop_with_fault(StopReason.VMM_ERROR, f"KVM_RUN failed: {e.strerror}")

    def _shutdown(self, n: int) -> Stop:
        regs = self.fd.get_regs()
        if self.ops.mode is Mode.PAGED32 and n == 1 and regs.rip == self.ops.entry_ip:
            return Stop(StopReason.HOST_LIMITATION, 0, PAGED32_REFUSED, cpu=self.index)
        return self._stop_with_fault(StopReason.SHUTDOWN, "triple fault: the vCPU shut down")

    def _internal_error(self, run) -> Stop:
        sub = run.internal.suberror
        names = {
            K.KVM_INTERNAL_ERROR_EMULATION: "KVM could not emulate an instruction",
            K.KVM_INTERNAL_ERROR_SIMUL_EX: "simultaneous exceptions",
            K.KVM_INTERNAL_ERROR_DELIVERY_EV: "an event could not be delivered",
            K.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected hardware exit",
        }
        insn = None
        if sub == K.KVM_INTERNAL_ERROR_EMULATION:
            ef = run.emulation_failure
            if ef.flags & K.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
                insn = bytes(ef.insn_bytes[: min(ef.insn_size, 15)])
            hook = self.on_emulation_failure
            if hook is not None and hook(self, insn):
                return None
        return self._stop_with_fault(
            StopReason.INTERNAL_ERROR,
            f"internal error {sub}: {names.get(sub, 'unknown')}",
            insn_bytes=insn,
        )

    def _msr_exit(self, reason: int, msr) -> Stop | None:
        """An MSR access the VM's filter sent here. Writes go to `on_msr_write`; anything
        without a taker fails as the filter's refusal would (#GP in the guest)."""
        hook = self.on_msr_write
        if reason == K.ExitReason.X86_WRMSR and hook is not None:
            try:
                done = hook(self, msr.index, msr.data)
            except Exception as e:
                return self._device_raised(f"the MSR {msr.index:#x} write handler", e)
            msr.error = 0 if done else 1
            return None
        if reason == K.ExitReason.X86_RDMSR:
            msr.data = 0
        msr.error = 1
        return None

    def _check_fault_stub(self) -> Stop | None:
        """An `out` to FAULT_PORT from one of kvmpy's exception stubs: report the exception."""
        return fault_stub_stop(self.ops, self.fd.get_regs(), self.fd.get_sregs(), self.index)

    def _stop_with_fault(
        self, reason: StopReason, message: str, *, insn_bytes: bytes | None = None
    ) -> Stop:
        return stop_with_fault(
            self.ops, reason, message, self.fd.get_regs(), self.fd.get_sregs(), self.index,
            insn_bytes=insn_bytes,
        )  # fmt: skip

    def _trace(self, reason: int) -> None:
        run = self.fd.run_struct
        rip = self._u64[_REG["rip"]]
        name = K.ExitReason.name_of(reason)
        if reason == _IO:
            io = run.io
            d = "out" if io.direction == _OUT else "in"
            extra = f" {d} port={io.port:#x} size={io.size} count={io.count}"
            if io.port == HC_PORT and io.direction == _OUT:
                u64 = self._u64
                nr = int.from_bytes(self._u8[io.data_offset : io.data_offset + io.size], "little")
                args = ", ".join(f"{u64[r]:#x}" for r in (_RDI, _RSI, _RCX, _RBX))
                extra += f" hypercall={self.ops.hypercalls.name(nr)}({args})"
        elif reason == K.ExitReason.MMIO:
            m = run.mmio
            extra = f" {'write' if m.is_write else 'read'} addr={m.phys_addr:#x} len={m.len}"
        else:
            extra = ""
        print(f"[exit {self.stats.total}] {name} rip={rip:#x}{extra}", file=sys.stderr)

    # --- registers and state -------------------------------------------------------------------

    def regs_dict(self) -> dict[str, int]:
        regs = self.fd.get_regs()
        return {name: getattr(regs, name) for name in S.GPR_NAMES}

    def get_regs(self) -> S.kvm_regs:
        return self.fd.get_regs()

    def set_regs(self, regs: S.kvm_regs) -> None:
        self.fd.set_regs(regs)

    def get_sregs(self) -> S.kvm_sregs:
        return self.fd.get_sregs()

    def set_sregs(self, sregs: S.kvm_sregs) -> None:
        self.fd.set_sregs(sregs)

    def set_fpu(self, fpu: S.kvm_fpu) -> None:
        self.fd.set_fpu(fpu)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        return self.fd.get_msrs(indices)

    def set_msrs(self, msrs: dict[int, int]) -> int:
        return self.fd.set_msrs(msrs)

    def set_mp_state(self, state: int) -> None:
        self.fd.set_mp_state(state)

    def set_cpuid(self, entries: list[S.kvm_cpuid_entry2]) -> None:
        """KVM_SET_CPUID2 (before the vCPU first runs: KVM refuses a change afterwards)."""
        self.fd.set_cpuid2(entries)

    def inject_exception(self, vector: int, error_code: int | None = None) -> None:
        """Deliver exception `vector` at the next entry, as if the current instruction (whose
        rip the caller has set) had raised it. Out of KVM_RUN only."""
        ev = self.fd.get_vcpu_events()
        ev.exception.injected = 1
        ev.exception.pending = 0
        ev.exception.nr = vector
        ev.exception.has_error_code = int(error_code is not None)
        ev.exception.error_code = error_code or 0
        self.fd.set_vcpu_events(ev)

    def enable_x2apic(self, bsp: bool) -> None:
        """Put the in-kernel LAPIC in x2APIC mode and software-enable it (SVR), with spurious
        vector 0xFF: xAPIC MMIO writes from ring 0 shut the vCPU down on KVM-PVM, and SDK guests
        reach the LAPIC through MSRs (EOI: wrmsr 0x80B; ICR: 0x830)."""
        base = APIC_DEFAULT_BASE | APIC_BASE_ENABLE | APIC_BASE_EXTD | (APIC_BASE_BSP if bsp else 0)
        if self.fd.set_msrs({MSR_IA32_APIC_BASE: base}) != 1:
            raise ConfigError("KVM refused to switch the LAPIC to x2APIC mode")
        lapic = self.fd.get_lapic()
        # Through the raw buffer: ctypes hands a c_char array field out as bytes cut at the
        # first NUL (offset 0 of the LAPIC page is zero), so `lapic.regs` is empty.
        raw = memoryview(lapic).cast("B")
        svr = int.from_bytes(raw[APIC_REG_SVR : APIC_REG_SVR + 4], "little")
        raw[APIC_REG_SVR : APIC_REG_SVR + 4] = (svr | APIC_SVR_ENABLE | 0xFF).to_bytes(4, "little")
        raw.release()
        self.fd.set_lapic(lapic)

    def save_state(self) -> dict:
        from . import state

        return state.capture_vcpu(self)

    def restore_state(self, d: dict) -> None:
        from . import state

        state.apply_vcpu(self, d)


def _result_lines(fn) -> frozenset[int]:
    """The lines of `fn` that write a handler's `result & mask64` into rax: an exception raised
    on one of them is the result's fault (None, not an int), not the handler's."""
    lines, prev = set(), [None, None]
    for ins in dis.get_instructions(fn):
        if ins.opname == "BINARY_OP" and ins.argrepr == "&" and prev == ["result", "mask64"]:
            lines.add(ins.positions.lineno)
        prev = [prev[1], ins.argval if ins.opname == "LOAD_FAST" else None]
    return frozenset(lines)


_RESULT_LINES = _result_lines(KvmVcpu._loop)
