"""CPU modes: the same guests run in every mode; entry state; faults reach kvmpy's handlers;
kvmpy's own structures never overlap the image."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.arch.x86.modes import Mode, place
from kvmpy.errors import ConfigError
from kvmpy.loader import load_raw
from kvmpy.memory import GuestMemory
from kvmpy.result import StopReason
from kvmpy.sdk.examples import find_example

ALL_MODES = [m.value for m in Mode]


def _paged32_refused(result) -> bool:
    """On KVM-PVM hosts 32-bit paging cannot run; kvmpy must say so in one clear sentence."""
    if result.stop_reason is StopReason.HOST_LIMITATION:
        assert "32-bit paged" in result.message
        return True
    return False


@pytest.mark.kvm
@pytest.mark.parametrize("mode", ALL_MODES)
def test_hello_example_in_every_mode(mode, run_guest):
    result = run_guest(find_example("hello").build(Mode(mode)), mode)
    if mode == "paged32" and _paged32_refused(result):
        return
    assert result.stop_reason is StopReason.EXIT, result.message
    assert result.exit_code == 0
    out = result.output.decode()
    assert f"Hello from a kvmpy guest ({mode} mode)!" in out
    assert "The answer is 42\n" in out
    # Three hypercalls precede the count; the exits-by-type text counts the four before it.
    assert "Exits so far: 3\n" in out
    assert "IO in: 0\nIO out: 5\n" in out
    assert out.endswith("Goodbye.\n")


@pytest.mark.kvm
@pytest.mark.parametrize("mode", ALL_MODES)
def test_same_raw_image_in_every_mode(mode, run_guest):
    path = find_example("hello-raw").build(Mode(mode))
    result = run_guest(path, mode)
    if mode == "paged32" and _paged32_refused(result):
        return
    assert result.stop_reason is StopReason.EXIT, result.message
    assert result.output == b"Hello, raw world!\n"
    # One exit per character through port 0xE9, then the exit hypercall.
    assert result.stats.port(0xE9).writes == len(b"Hello, raw world!\n")
    assert result.exits == {"io": 19}


ENTRY_STATE = r"""
#include <kvmpy.h>
int main(void) {
    unsigned long flags; unsigned short cs, ss;
    __asm__ volatile("pushf; pop %0" : "=r"(flags));
    __asm__ volatile("mov %%cs, %0; mov %%ss, %1" : "=r"(cs), "=r"(ss));
    kv_printf("cs=%x ss=%x cpl=%u iopl=%lu if=%lu sp_aligned=%d\n", cs, ss, cs & 3,
              (flags >> 12) & 3, (flags >> 9) & 1, 1);
    return 0;
}
"""


@pytest.mark.kvm
@pytest.mark.parametrize(
    "mode,cpl,iopl", [("long", 0, 0), ("long-user", 3, 3), ("protected", 0, 0), ("real", 0, 0)]
)
def test_entry_privilege(mode, cpl, iopl, build_guest, kvm):
    from kvmpy.machine import Machine, MachineConfig

    with Machine(MachineConfig(mode=mode, memory="16M"), kvm=kvm) as m:
        m.load_file(build_guest(ENTRY_STATE, mode))
        regs, sregs = m.vcpus[0].fd.get_regs(), m.vcpus[0].fd.get_sregs()
        assert (regs.rflags >> 12) & 3 == iopl
        assert not regs.rflags & (1 << 9)  # interrupts off without an irqchip
        assert sregs.cs.dpl == cpl
        result = m.run(timeout=30)
    assert result.stop_reason is StopReason.EXIT, result.message
    # What the guest itself sees. (On KVM-PVM, pushf at CPL3 shows the host's IOPL and IF,
    # not the vCPU's, so only the CPL is checked from inside.)
    assert f"cpl={cpl}" in result.output.decode()


@pytest.mark.kvm
def test_interrupts_enabled_at_entry_with_irqchip(build_guest, kvm):
    from kvmpy.machine import Machine, MachineConfig

    with Machine(MachineConfig(mode="long-user", memory="16M", irqchip=True), kvm=kvm) as m:
        m.load_file(build_guest(ENTRY_STATE, "long-user"))
        assert m.vcpus[0].fd.get_regs().rflags & (1 << 9)
        result = m.run(timeout=30)
    assert result.stop_reason is StopReason.EXIT, result.message


@pytest.mark.kvm
@pytest.mark.parametrize("mode", ["long", "long-user", "protected"])
def test_stack_is_valid_and_outside_the_image(mode, assemble, kvm):
    from kvmpy.machine import Machine, MachineConfig

    bits = 64 if mode.startswith("long") else 32
    code = assemble("push %eax\n pop %eax\n" if bits == 32 else "push %rax\n pop %rax\n", bits)
    code += bytes.fromhex("b605b20031c031ffef")  # the mode-neutral exit hypercall
    with Machine(MachineConfig(mode=mode, memory="16M"), kvm=kvm) as m:
        m.load(load_raw(code))
        sp = m.boot.regs.rsp
        assert m.memory.is_ram(sp - 8, 8)
        assert not (0 <= sp - 8 < len(code))
        result = m.run(timeout=30)
    assert result.stop_reason is StopReason.EXIT, result.message


# --- faults --------------------------------------------------------------------------------

FAULTS = {
    "page-fault": ("*(volatile int *)0x7000000000ull = 1;", 14),
    "invalid-opcode": ('__asm__ volatile("ud2");', 6),
    # Inline div: gcc turns `1 / z` into compares without a div instruction.
    "divide-error": (
        'unsigned a = 1, d = 0; __asm__ volatile("xor %%edx, %%edx; div %1" : "+a"(a) : "r"(d) : "edx");',
        0,
    ),
    "general-protection": ('__asm__ volatile("hlt");', 13),  # hlt at CPL3
}


@pytest.mark.kvm
@pytest.mark.parametrize("name", FAULTS)
def test_exceptions_at_cpl3_stop_with_vector_and_registers(name, build_guest, run_guest):
    body, vector = FAULTS[name]
    src = '#include <kvmpy.h>\nint main(void) { hc_print_str("before\\n"); ' + body + " return 0; }"
    result = run_guest(build_guest(src, "long-user"), "long-user")
    assert result.stop_reason is StopReason.EXCEPTION, result.message
    f = result.fault
    assert f.vector == vector
    assert result.output == b"before\n"  # the guest ran up to the fault, not past it
    assert result.regs["rip"] == f.rip
    assert 0x100000 <= f.rip < 0x200000  # inside the image, not in kvmpy's stub
    assert result.sregs["cpl"] == 3
    assert f.instruction  # disassembled
    assert f.instruction_bytes
    if vector == 14:
        assert f.cr2 == 0x7000000000
        assert f.error_code & 0b110 == 0b110  # a write, from user mode
        assert "page fault" in result.message and "0x7000000000" in result.message
    if vector == 6:
        assert f.instruction == "ud2"


@pytest.mark.kvm
def test_fault_at_cpl0(build_guest, run_guest):
    src = "#include <kvmpy.h>\nint main(void) { *(volatile long *)0x7000000000ull = 5; return 0; }"
    result = run_guest(build_guest(src, "long"), "long")
    assert result.stop_reason is StopReason.EXCEPTION
    assert result.fault.vector == 14 and result.fault.cr2 == 0x7000000000
    assert result.sregs["cpl"] == 0
    assert result.fault.instruction.startswith("mov")


@pytest.mark.kvm
def test_cpl3_cannot_touch_kvmpy_structures(build_guest, run_guest, kvm):
    """In long-user mode the IDT, GDT, TSS and page tables are supervisor-only."""
    from kvmpy.machine import Machine, MachineConfig

    src = r"""
    #include <kvmpy.h>
    int main(void) {
        unsigned char idtr[10];
        __asm__ volatile("sidt %0" : "=m"(idtr));   /* sidt works at CPL3 without UMIP */
        unsigned long base = *(unsigned long *)(idtr + 2);
        *(volatile unsigned long *)base = 0;        /* must fault, not corrupt the IDT */
        return 0;
    }
    """
    path = build_guest(src, "long-user")
    with Machine(MachineConfig(mode="long-user", memory="16M"), kvm=kvm) as m:
        m.load_file(path)
        idt = m.layout.idt
        before = m.memory.read(idt, 16)
        result = m.run(timeout=30)
        after = m.memory.read(idt, 16)
    if result.stop_reason is StopReason.EXCEPTION and result.fault.vector == 13:
        pytest.skip("sidt is blocked at CPL3 on this host (UMIP); nothing to test")
    assert result.stop_reason is StopReason.EXCEPTION, result.message
    assert result.fault.vector == 14
    assert result.fault.cr2 == idt
    assert before == after


@pytest.mark.kvm
def test_triple_fault_is_a_shutdown_with_registers(build_guest, run_guest):
    # An empty IDT makes the #UD undeliverable: #DF, then a triple fault.
    src = r"""
    #include <kvmpy.h>
    int main(void) {
        struct __attribute__((packed)) { unsigned short limit; unsigned long base; } idtr = {0, 0};
        __asm__ volatile("lidt %0; ud2" : : "m"(idtr));
        return 0;
    }
    """
    result = run_guest(build_guest(src, "long"), "long")
    assert result.stop_reason is StopReason.SHUTDOWN, result.message
    assert "triple fault" in result.message
    assert set(result.regs) >= {"rax", "rip", "rsp", "rflags"}


@pytest.mark.kvm
def test_int3_at_cpl0_is_reported_with_the_instruction(build_guest, run_guest):
    """KVM-PVM's emulator cannot run int3 in 64-bit mode (internal error); elsewhere it is a
    #BP exception. Either way the stop names the instruction."""
    src = '#include <kvmpy.h>\nint main(void) { __asm__ volatile("int3"); return 0; }'
    result = run_guest(build_guest(src, "long"), "long")
    assert result.stop_reason in (StopReason.INTERNAL_ERROR, StopReason.EXCEPTION), result.message
    assert result.fault is not None and result.fault.instruction == "int3"
    if result.stop_reason is StopReason.EXCEPTION:
        assert result.fault.vector == 3


@pytest.mark.kvm
def test_hlt_at_cpl0_stops_with_code_0(assemble, run_guest):
    result = run_guest(load_raw(assemble("mov $7, %edi\n hlt")), "long")
    assert result.stop_reason is StopReason.HLT
    assert result.exit_code == 0
    assert result.process_exit_status == 0
    assert result.regs["rdi"] == 7


@pytest.mark.kvm
def test_guest_above_4g_of_ram(assemble, kvm):
    """RAM beyond 3 GiB continues at 4 GiB; the identity map covers it."""
    from kvmpy.machine import Machine, MachineConfig

    code = assemble(
        "movabs $0x120000000, %rbx\n movq $0x1122334455667788, %rax\n mov %rax, (%rbx)\n hlt"
    )
    with Machine(MachineConfig(mode="long", memory="5G"), kvm=kvm) as m:
        assert [(r.gpa, r.size) for r in m.memory] == [(0, 3 << 30), (4 << 30, 2 << 30)]
        m.load(load_raw(code))
        result = m.run(timeout=30)
        assert result.stop_reason is StopReason.HLT, result.message
        assert m.memory.read_u64(0x120000000) == 0x1122334455667788


@pytest.mark.kvm
def test_image_at_top_of_ram(assemble, kvm):
    from kvmpy.machine import Machine, MachineConfig

    code = assemble("mov $0x2a, %edi\n xor %eax, %eax\n mov $0x500, %dx\n out %eax, %dx")
    size = 16 << 20
    with Machine(MachineConfig(mode="long-user", memory=size), kvm=kvm) as m:
        m.load(load_raw(code, load_addr=size - 4096))
        assert m.layout.end <= size - 4096
        result = m.run(timeout=30)
    assert result.stop_reason is StopReason.EXIT and result.exit_code == 42


# --- placement of kvmpy's structures (no KVM needed) -----------------------------------------


def _overlaps(a, b):
    return a[0] < b[1] and b[0] < a[1]


@settings(max_examples=200, deadline=None)
@given(
    mode=st.sampled_from(list(Mode)),
    images=st.lists(
        st.tuples(st.integers(0, (16 << 20) // 4096 - 1), st.integers(1, 512)),
        max_size=4,
    ),
)
def test_system_area_never_overlaps_the_image(mode, images):
    memory = GuestMemory()
    try:
        memory.add_region(0, 16 << 20)
        reserved = [(p * 4096, p * 4096 + n * 4096) for p, n in images]
        try:
            layout = place(mode, memory, reserved)
        except ConfigError:
            return  # no room is a clear error, never an overlap
        for area in layout.reserved_ranges():
            assert memory.is_ram(area[0], area[1] - area[0])
            for r in reserved:
                assert not _overlaps(area, r)
        assert not _overlaps(*layout.reserved_ranges())
        if mode is Mode.REAL:
            assert layout.end <= 0x100000 and layout.stack_top <= 0x100000
    finally:
        memory.close()


def test_no_room_is_a_clear_error():
    memory = GuestMemory()
    try:
        memory.add_region(0, 1 << 20)
        with pytest.raises(ConfigError, match="no room"):
            place(Mode.LONG, memory, [(0, 1 << 20)])
    finally:
        memory.close()


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown mode 'turbo'"):
        Mode.parse("turbo")
