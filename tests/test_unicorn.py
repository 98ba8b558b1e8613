"""The unicorn backend on its own (no /dev/kvm): examples in every mode, exceptions through the
IDT, precise stops, preemption, port I/O and MMIO, interrupts, state round trips."""

from __future__ import annotations

import signal
import struct
import threading
import time

import pytest

from kvmpy.arch.x86.modes import TSS_IOMAP_OFFSET, Mode
from kvmpy.devices import Device, Output
from kvmpy.errors import ConfigError
from kvmpy.hv.base import Capability, MsiRoute
from kvmpy.hv.unicorn import CAPABILITIES, unavailable
from kvmpy.hv.unicorn.vcpu import decode_io
from kvmpy.loader import load_raw
from kvmpy.result import StopReason
from kvmpy.sdk.examples import find_example

from .unicorn_harness import Harness

ALL_MODES = [m.value for m in Mode]


def run_example(name: str, mode: str, memory: str = "64M"):
    with Harness(mode, memory) as h:
        h.load_file(find_example(name).build(Mode(mode)))
        stop = h.run()
        return stop, bytes(h.output), h.vcpu.stats


def test_this_unicorn_build_is_usable():
    assert unavailable() is None


def test_capabilities_leave_out_what_lives_in_a_kernel():
    assert Capability.PAGED32 in CAPABILITIES and Capability.MSI in CAPABILITIES
    assert Capability.USERFAULTFD in CAPABILITIES  # lazy restore: the host mapping is shared
    for cap in (Capability.IRQCHIP, Capability.IRQFD, Capability.IOEVENTFD,
                Capability.DIRTY_LOG, Capability.PIT, Capability.COALESCED_IO):  # fmt: skip
        assert cap not in CAPABILITIES
    with Harness("long") as h, pytest.raises(ConfigError, match="irqfd.*unicorn backend"):
        h.vm.irqfd(0, 24)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_hello_in_every_mode(mode, gcc_available):
    stop, out, stats = run_example("hello", mode)
    assert stop.reason is StopReason.EXIT and stop.exit_code == 0
    assert f"Hello from a kvmpy guest ({mode} mode)!".encode() in out
    # The same exits as on KVM: one per hypercall and none for anything else.
    assert b"Exits so far: 3\nIO in: 0\nIO out: 5\nGoodbye.\n" in out
    assert stats.by_reason() == {"io": 17}


@pytest.mark.parametrize("mode", ALL_MODES)
def test_abi_check_passes_in_every_mode(mode, gcc_available):
    stop, out, _ = run_example("abi-check", mode)
    assert b"not ok" not in out
    assert b"13 checks, 0 failures" in out
    assert stop.reason is StopReason.EXIT and stop.exit_code == 0


@pytest.mark.parametrize("mode", ALL_MODES)
def test_raw_image_in_every_mode(mode, gcc_available):
    stop, out, _ = run_example("hello-raw", mode)
    assert out.startswith(b"Hello, raw")
    assert stop.reason is StopReason.EXIT


@pytest.mark.parametrize("mode,ring,error", [("long", 0, 0x2), ("long-user", 3, 0x6)])
def test_fault_example_reports_like_kvm(mode, ring, error, gcc_available):
    stop, out, _ = run_example("fault", mode)
    assert stop.reason is StopReason.EXCEPTION
    assert stop.message.startswith(
        f"#PF page fault in ring {ring} at {stop.fault.rip:#x} (address 0x7000000000), "
        f"error code {error:#x}; faulting instruction: mov qword ptr [rax], 1"
    )
    assert stop.fault.vector == 14 and stop.fault.cr2 == 0x7000000000
    assert stop.fault.cs & 3 == ring
    assert stop.regs.rax == 0x7000000000
    assert b"not reached" not in out


# --- exceptions through the IDT ----------------------------------------------------------------


@pytest.mark.parametrize(
    "mode,bits", [("real", 16), ("protected", 32), ("paged32", 32), ("long", 64)]
)
def test_divide_error_reaches_the_stub_in_every_mode(mode, bits, assemble):
    code = assemble("xor %eax, %eax\n xor %ecx, %ecx\n div %ecx\n hlt", 64 if bits == 64 else 32)
    with Harness(mode, "16M") as h:
        h.load(load_raw(code))
        stop = h.run()
    assert stop.reason is StopReason.EXCEPTION, stop.message
    assert stop.fault.vector == 0
    assert "div" in stop.fault.instruction
    assert stop.fault.rip == 4  # a fault: the frame holds the faulting instruction


def test_int3_from_ring3_is_a_breakpoint_and_int_0x80_a_gp(assemble):
    with Harness("long-user", "16M") as h:
        h.load(load_raw(assemble("int3\n hlt")))
        stop = h.run()
        assert stop.fault.vector == 3 and stop.fault.cs & 3 == 3
        assert stop.fault.rip == 1  # a trap: the frame holds the next instruction
    with Harness("long-user", "16M") as h:
        h.load(load_raw(assemble("int $0x80\n hlt")))
        stop = h.run()
        # The gate's DPL is 0: #GP with the IDT index in the error code.
        assert stop.fault.vector == 13 and stop.fault.error_code == 0x80 * 8 + 2


def test_syscall_without_efer_sce_is_an_invalid_opcode(assemble):
    with Harness("long-user", "16M") as h:
        h.load(load_raw(assemble("nop\n syscall\n hlt")))
        stop = h.run()
    assert stop.fault.vector == 6 and stop.fault.rip == 1
    assert stop.fault.instruction == "syscall"


def test_syscall_with_sce_enters_lstar_at_cpl0(assemble):
    code = assemble(
        "mov $0x10, %edi\n"  # rdi: where the kernel entry is (set below)
        "syscall\n"
        "1: jmp 1b\n"
        ".org 0x10\n"
        "mov %rcx, %rbx\n mov %r11, %rbp\n"
        "mov $0x500, %dx\n xor %eax, %eax\n mov $7, %edi\n out %eax, %dx\n hlt"
    )
    with Harness("long", "16M") as h:
        h.load(load_raw(code))
        h.vcpu.uc.msr_write(0xC000_0080, 0x501)  # EFER: LME|LMA|SCE
        sregs = h.vcpu.get_sregs()
        sregs.efer |= 1
        h.vcpu.set_sregs(sregs)
        h.vcpu.uc.msr_write(0xC000_0081, 0x08 << 32)  # STAR: kernel CS 0x08
        h.vcpu.uc.msr_write(0xC000_0082, 0x10)  # LSTAR
        h.vcpu.uc.msr_write(0xC000_0084, 0x200)  # FMASK: IF
        stop = h.run()
        regs = h.vcpu.get_regs()
        assert stop.reason is StopReason.EXIT and stop.exit_code == 7
        assert regs.rbx == 7  # the return address: after the 2-byte syscall
        assert h.vcpu.get_sregs().cs.selector == 0x08


def test_a_broken_idt_is_a_triple_fault(assemble):
    with Harness("long", "16M") as h:
        h.load(load_raw(assemble("ud2")))
        sregs = h.vcpu.get_sregs()
        sregs.idt.limit = 0  # every gate is outside the IDT: #GP, then #DF, then shutdown
        h.vcpu.set_sregs(sregs)
        stop = h.run()
    assert stop.reason is StopReason.SHUTDOWN
    assert "triple fault" in stop.message and "ud2" in stop.message


def test_tss_io_bitmap_is_enforced_at_cpl3_without_iopl(assemble):
    code = assemble("mov $0x41, %al\n out %al, $0xe9\n out %al, $0x80\n hlt")
    with Harness("long-user", "16M") as h:
        h.load(load_raw(code))
        # Deny port 0x80 in the TSS bitmap and drop IOPL to 0: now the bitmap decides.
        h.memory.write(h.layout.tss + TSS_IOMAP_OFFSET + 0x80 // 8, b"\x01")
        regs = h.vcpu.get_regs()
        regs.rflags &= ~(3 << 12)
        h.vcpu.set_regs(regs)
        stop = h.run()
        assert h.output == b"A"  # port 0xE9 is allowed
    assert stop.fault.vector == 13 and stop.fault.error_code == 0
    assert stop.fault.instruction == "out 0x80, al"


# --- precise stops and control -----------------------------------------------------------------

THREE_IO_EXITS = (
    "mov $3, %eax\n mov $0x500, %dx\n out %eax, %dx\n mov %rax, %rbx\n"
    "mov $0x41, %al\n out %al, $0xe9\n"
    "mov $3, %eax\n mov $0x500, %dx\n out %eax, %dx\n"
    "mov %rax, %rdi\n xor %eax, %eax\n out %eax, %dx\n hlt"
)


def test_yield_on_io_stops_right_after_each_io_instruction(assemble):
    with Harness("long", "16M") as h:
        h.load(load_raw(assemble(THREE_IO_EXITS)))
        h.vcpu.yield_on_io = True
        returns = []
        while True:
            stop = h.vcpu.run()
            returns.append(stop)
            if stop is not None:
                break
            # Exactly after an `out`: nothing of the same block ran on.
            assert h.vcpu.get_regs().rbx == 0
        assert returns[:3] == [None, None, None]
        assert returns[3].reason is StopReason.EXIT and returns[3].exit_code == 2
        assert h.output == b"A"


def test_exit_stops_before_the_next_instruction_and_run_continues(assemble):
    code = assemble("mov $1, %edi\n hlt\n mov $2, %edi\n hlt")
    with Harness("long", "16M") as h:
        h.load(load_raw(code))
        assert h.vcpu.run().reason is StopReason.HLT
        assert h.vcpu.get_regs().rdi == 1
        assert h.vcpu.run().reason is StopReason.HLT
        assert h.vcpu.get_regs().rdi == 2
    code = assemble("xor %edi, %edi\n xor %eax, %eax\n mov $0x500, %dx\n out %eax, %dx\n"
                    "mov $5, %ebx\n hlt")  # fmt: skip
    with Harness("long", "16M") as h:
        h.load(load_raw(code))
        assert h.vcpu.run().reason is StopReason.EXIT
        assert h.vcpu.get_regs().rbx == 0  # the `mov` after the exit did not run
        assert h.vcpu.run().reason is StopReason.HLT
        assert h.vcpu.get_regs().rbx == 5


def test_a_spinning_ring3_guest_is_paused_and_stopped_from_another_thread(assemble):
    with Harness("long-user", "16M") as h:
        h.load(load_raw(assemble("1: inc %rax\n jmp 1b")))
        t = threading.Timer(0.2, h.vcpu.request_pause, kwargs={"kick": True})
        t.start()
        assert h.vcpu.run() is None
        first = h.vcpu.get_regs().rax
        assert first > 1000
        t = threading.Timer(0.2, h.vcpu.request_stop, kwargs={"kick": True})
        t.start()
        stop = h.vcpu.run()
        assert stop.reason is StopReason.INTERRUPTED
        assert h.vcpu.get_regs().rax > first  # it went on where it was paused


def test_a_vcpu_in_a_thread_can_be_stopped(assemble):
    with Harness("long", "16M") as h:
        h.load(load_raw(assemble("1: jmp 1b")))
        stops = []
        t = threading.Thread(target=lambda: stops.append(h.vcpu.run()))
        t.start()
        while h.vcpu.thread_ident is None:
            time.sleep(0.001)
        time.sleep(0.05)
        h.vcpu.request_stop(StopReason.INTERRUPTED, "test", kick=True)
        t.join(timeout=10)
        assert not t.is_alive()
        assert stops[0].reason is StopReason.INTERRUPTED and stops[0].message == "test"


def test_sigalrm_in_the_main_thread_stops_a_guest_that_never_exits(assemble):
    """The --timeout and timer-scheduler path: a Python signal handler runs while the main
    thread is inside uc_emu_start."""
    with Harness("long-user", "16M") as h:
        h.load(load_raw(assemble("1: jmp 1b")))
        old = signal.signal(
            signal.SIGALRM, lambda *_: h.vcpu.request_stop(StopReason.TIMEOUT, "time limit")
        )
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            t0 = time.monotonic()
            stop = h.vcpu.run()
            elapsed = time.monotonic() - t0
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    assert stop.reason is StopReason.TIMEOUT
    assert elapsed < 2


def test_repeated_timer_pauses_preempt_a_spinning_guest(assemble):
    with Harness("long-user", "16M") as h:
        h.load(load_raw(assemble("1: inc %rax\n jmp 1b")))
        old = signal.signal(signal.SIGALRM, lambda *_: h.vcpu.request_pause())
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.01, 0.01)
            pauses = 0
            t0 = time.monotonic()
            while pauses < 10 and time.monotonic() - t0 < 5:
                assert h.vcpu.run() is None
                pauses += 1
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        assert pauses == 10


def test_cancel_pause(assemble):
    with Harness("long", "16M") as h:
        h.load(load_raw(assemble(THREE_IO_EXITS)))
        v = h.vcpu
        assert v.cancel_pause() is False
        v.request_pause()
        assert v.cancel_pause() is True
        assert v.run().reason is StopReason.EXIT
        v2 = Harness("long", "16M")
        try:
            v2.load(load_raw(assemble(THREE_IO_EXITS)))
            v2.vcpu.request_pause()
            v2.vcpu.request_stop(StopReason.INTERRUPTED, "host says stop")
            v2.vcpu.cancel_pause()
            stop = v2.vcpu.run()
            assert stop.reason is StopReason.INTERRUPTED and stop.message == "host says stop"
        finally:
            v2.close()


# --- devices -----------------------------------------------------------------------------------


class Recorder(Device):
    name = "recorder"

    def __init__(self):
        self.writes = []
        self.reads = 0

    def read(self, offset, size):
        self.reads += 1
        return bytes([0x41 + self.reads - 1]) * size

    def write(self, offset, data):
        self.writes.append((offset, bytes(data)))
        return Output(b"<%d>" % offset)


def test_port_io_string_io_and_the_bus(assemble):
    code = assemble(
        "mov $0x600, %dx\n mov $0x11, %al\n out %al, %dx\n"
        "inc %dx\n in %dx, %al\n mov %eax, %edi\n"
        "lea msg(%rip), %rsi\n mov $3, %ecx\n mov $0x602, %dx\n rep outsb\n"
        "lea buf(%rip), %rdi\n mov $2, %ecx\n rep insb\n"
        "mov $0x1234, %dx\n in %dx, %eax\n mov %eax, %ebp\n"
        "mov buf(%rip), %bx\n hlt\n"
        'msg: .ascii "abc"\n buf: .word 0'
    )
    rec = Recorder()
    with Harness("long", "16M") as h:
        h.pio_bus.register(0x600, 4, rec)
        h.load(load_raw(code))
        stop = h.run()
        regs = h.vcpu.get_regs()
        ports = h.vcpu.stats.to_dict()["by_port"]
    assert stop.reason is StopReason.HLT
    assert rec.writes == [(0, b"\x11"), (2, b"a"), (2, b"b"), (2, b"c")]
    assert regs.rdi & 0xFF == 0x41
    assert regs.rbx & 0xFFFF == 0x4342  # rep insb read 'B', 'C'
    assert regs.rbp == 0xFFFFFFFF  # a port nobody owns floats high
    assert h.output == b"<0><2><2><2>"
    # One exit per string instruction (KVM batches string I/O), one per plain in/out.
    assert ports["0x602"]["out"] == 1 and ports["0x602"]["in"] == 1
    assert ports["0x600"]["out"] == 1 and ports["0x601"]["in"] == 1


class MmioRegs(Device):
    name = "mmio-regs"

    def __init__(self):
        self.regs = {0: 0x1122334455667788}
        self.writes = []

    def read(self, offset, size):
        return self.regs.get(offset, 0).to_bytes(8, "little")[:size]

    def write(self, offset, data):
        self.writes.append((offset, bytes(data)))


def test_mmio_devices_and_unassigned_mmio(assemble):
    code = assemble(
        "mov $0xD0000000, %esi\n mov (%rsi), %ebx\n movl $5, 8(%rsi)\n"
        "mov $0xD0100000, %esi\n mov (%rsi), %ecx\n movl $7, (%rsi)\n mov (%rsi), %rdx\n hlt"
    )
    dev = MmioRegs()
    with Harness("long", "16M") as h:
        h.mmio_bus.register(0xD000_0000, 0x10, dev)
        h.load(load_raw(code))
        # Map [3 GiB, 4 GiB) in the guest's page tables: 1 GiB page 3 of the identity map.
        pdpt = h.memory.read_u64(h.boot.sregs.cr3) & ~0xFFF
        h.memory.write_u64(pdpt + 3 * 8, 0xC000_0000 | 0x83)
        stop = h.run()
        regs = h.vcpu.get_regs()
        st = h.vcpu.stats
    assert stop.reason is StopReason.HLT, stop.message
    assert regs.rbx == 0x55667788
    assert dev.writes == [(8, b"\x05\x00\x00\x00")]
    assert regs.rcx == 0xFFFFFFFF and regs.rdx == (1 << 64) - 1
    # Unicorn's MMIO regions take at most 4 bytes per access: the 8-byte read is two exits.
    assert st.by_reason()["mmio"] == 6
    assert st.port(-1).reads == 3 and st.port(-1).writes == 1


def test_an_msi_wakes_a_halted_guest_and_runs_its_handler(assemble):
    # Handler at 0x100 (vector 0x40): count in rbx, iretq. Main: sti; hlt; then exit(rbx).
    code = assemble(
        "sti\n hlt\n"
        "mov %rbx, %rdi\n xor %eax, %eax\n mov $0x500, %dx\n out %eax, %dx\n"
        ".org 0x100\n inc %rbx\n iretq"
    )
    with Harness("long", "16M") as h:
        h.load(load_raw(code))
        from kvmpy.arch.x86 import gdt as G
        from kvmpy.arch.x86.modes import SEL_KCODE

        h.memory.write(h.layout.idt + 0x40 * 16, G.gate64(0x100, SEL_KCODE))
        h.vm.set_routes([MsiRoute(24, 0xFEE0_0000, 0x40)])
        threading.Timer(0.1, h.vm.irq_line, args=(24, 1)).start()
        stop = h.run()
    assert stop.reason is StopReason.EXIT and stop.exit_code == 1


# --- state -------------------------------------------------------------------------------------


def test_decode_io():
    assert decode_io(bytes.fromhex("ef"), 64).length == 1
    assert decode_io(bytes.fromhex("66ef"), 16).length == 2
    i = decode_io(bytes.fromhex("f3 6e".replace(" ", "")), 64)
    assert i.string and i.rep and i.count_mask == (1 << 64) - 1
    i = decode_io(bytes.fromhex("67f36c"), 32)
    assert i.string and i.count_mask == 0xFFFF
    assert decode_io(bytes.fromhex("e6e9"), 32).length == 2
    assert decode_io(bytes.fromhex("90"), 64) is None


@pytest.mark.parametrize("mode", ALL_MODES)
def test_registers_round_trip_through_the_shared_format(mode, assemble):
    with Harness(mode, "16M") as h:
        h.load(load_raw(assemble("hlt", 64 if mode.startswith("long") else 32)))
        sregs = h.vcpu.get_sregs()
        assert bytes(sregs) == bytes(h.boot.sregs) or _same_sregs(sregs, h.boot.sregs)
        regs = h.vcpu.get_regs()
        assert regs.rip == h.boot.regs.rip and regs.rsp == h.boot.regs.rsp
        assert regs.rflags == h.boot.regs.rflags
        state = h.vcpu.save_state()
    with Harness(mode, "16M") as h2:
        h2.vcpu.restore_state(state)
        assert bytes(h2.vcpu.get_regs()) == bytes(regs)
        assert _same_sregs(h2.vcpu.get_sregs(), sregs)


def _same_sregs(a, b) -> bool:
    fields = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
    for f in fields:
        x, y = getattr(a, f), getattr(b, f)
        if (x.selector, x.base, x.limit, x.type, x.dpl, x.db, x.l, x.g, x.s) != (
            y.selector, y.base, y.limit, y.type, y.dpl, y.db, y.l, y.g, y.s,
        ):  # fmt: skip
            return False
        if x.present != y.present:
            return False
    return (
        (a.gdt.base, a.gdt.limit, a.idt.base, a.idt.limit) == (b.gdt.base, b.gdt.limit,
                                                               b.idt.base, b.idt.limit)
        and (a.cr0 & ~0x10, a.cr3, a.cr4, a.efer) == (b.cr0 & ~0x10, b.cr3, b.cr4, b.efer)
    )  # fmt: skip


def test_fpu_and_sse_state_round_trip(assemble):
    code = assemble("fld1\n fldpi\n movq %rax, %xmm1\n hlt")
    with Harness("long", "16M") as h:
        h.load(load_raw(code))
        regs = h.vcpu.get_regs()
        regs.rax = 0x0123456789ABCDEF
        h.vcpu.set_regs(regs)
        assert h.run().reason is StopReason.HLT
        fpu = h.vcpu.get_fpu()
        state = h.vcpu.save_state()
    assert int.from_bytes(bytes(fpu.xmm[1][:8]), "little") == 0x0123456789ABCDEF
    assert (fpu.fsw >> 11) & 7 == 6 and fpu.ftwx == 0xC0  # two values pushed: ST0=pi, ST1=1
    assert struct.unpack_from("<QH", bytes(fpu.fpr[1]))[1] == 0x3FFF  # 1.0's exponent
    with Harness("long", "16M") as h2:
        h2.vcpu.restore_state(state)
        assert bytes(h2.vcpu.get_fpu()) == bytes(fpu)


def test_snapshot_mid_run_and_restore_in_a_new_engine(gcc_available):
    """Pause hashchain part way, save vCPU + RAM, resume in a fresh VM: identical output."""
    ex = find_example("hashchain").build(Mode.LONG_USER)
    with Harness("long-user") as h:
        h.load_file(ex)
        full = h.run()
        reference = bytes(h.output)
    assert full.reason is StopReason.EXIT
    with Harness("long-user") as h:
        h.load_file(ex)
        # Yield at every I/O exit and save after the 100th.
        h.vcpu.yield_on_io = True
        for _ in range(100):
            assert h.vcpu.run() is None
        state = h.vcpu.save_state()
        ram = h.memory.read(0, h.memory.size)
        stats = h.vcpu.stats
        first = bytes(h.output)
        layout = h.layout
    with Harness("long-user") as h2:
        h2.memory.write(0, ram)
        h2.layout = layout
        h2.vcpu.restore_state(state)
        h2.vcpu.stats.counts[:] = stats.counts
        h2.vcpu.stats.ports.update(stats.ports)
        stop = h2.run()
        assert stop.reason is StopReason.EXIT
        assert first + bytes(h2.output) == reference
