"""The software-host profile: pure decisions (fallbacks, gates, the syscall stub and its plan),
and a small kernel-like guest that triggers each fallback and forwards a CPL3 `syscall` on
whatever host runs the tests (on VT-x/AMD-V none of it is needed and the guest must get the
same result)."""

from __future__ import annotations

import json
import struct

import pytest

from kvmpy.boot import swhost as SW
from kvmpy.disasm import disassemble_one

# --- pure parts ---------------------------------------------------------------------------------


def test_fallbacks():
    int3 = SW.emulation_fallback(b"\xcc\x90", cpl=0)
    assert int3.name == "int3" and int3.inject_vector == 3
    assert int3.apply(0x1000, 0x2) == (0x1001, 0x2)
    assert SW.emulation_fallback(b"\x9b", 0).name == "fwait"
    clac = SW.emulation_fallback(b"\x0f\x01\xca", 0)
    assert clac.apply(0x10, SW.RFLAGS_AC | 2) == (0x13, 2)
    assert SW.emulation_fallback(b"\x0f\x01\xcb", 0).apply(0, 2) == (3, 2 | SW.RFLAGS_AC)
    # Not ours: other instructions, and anything outside ring 0.
    assert SW.emulation_fallback(b"\x0f\xc7\x0f", 0) is None  # cmpxchg16b
    assert SW.emulation_fallback(b"\xcc", cpl=3) is None
    assert SW.emulation_fallback(b"", 0) is None


def test_gate_roundtrip():
    g = SW.Gate(0xFFFF_FFFF_8140_0B00, 0x10, 0, SW.GATE_INTERRUPT, 0, True)
    raw = g.encode()
    assert len(raw) == 16 and SW.Gate.parse(raw) == g
    assert SW.Gate.parse(g.with_offset(0x1234).encode()).offset == 0x1234


def test_stub_code_reads_as_intended():
    lstar, handler = 0xFFFF_FFFF_8140_0040, 0xFFFF_FFFF_8140_0B00
    code = SW.syscall_stub(lstar, handler)
    assert struct.unpack_from("<QQ", code, len(code) - 16) == (lstar, handler)
    texts, pos = [], 0
    while pos < len(code) - 16 and len(texts) < 10:
        text, size = disassemble_one(code[pos:], pos, 64)
        texts.append(text)
        pos += size
    assert texts == [
        "test byte ptr [rsp + 0x10], 3",  # the faulting CS: ring 3?
        "je 0x22",
        "push rax",
        "mov rax, qword ptr [rsp + 0x10]",  # the faulting rip
        "cmp rax, qword ptr [rip + 0x14]",  # == LSTAR (the data word at 0x28)?
        "pop rax",
        "jne 0x22",
        "mov rsp, qword ptr [rsp + 0x20]",  # the user stack
        "jmp qword ptr [rip + 6]",  # LSTAR
        "jmp qword ptr [rip + 8]",  # 0x22: the kernel's page-fault entry
    ]
    assert len(code) - 16 == 0x28


class FakeGuest:
    """Physical memory as a dict of pages; virtual = physical for the IDT."""

    def __init__(self) -> None:
        self.mem = bytearray(1 << 20)

    def read(self, gpa: int, n: int) -> bytes:
        if gpa + n > len(self.mem):
            raise ValueError("outside RAM")
        return bytes(self.mem[gpa : gpa + n])


def _fake(pf_handler=0xFFFF_FFFF_8140_0B00):
    g = FakeGuest()
    idt = 0x5000
    gate = SW.Gate(pf_handler, 0x10, 0, SW.GATE_INTERRUPT, 0, True).encode()
    g.mem[idt + 14 * 16 : idt + 15 * 16] = gate
    return g, idt


def test_plan_syscall_trap():
    g, idt = _fake()
    plan = SW.plan_syscall_trap(
        lstar=0xFFFF_FFFF_8140_0040, cr3=0x1000, idt_base=idt, idt_limit=4095,
        read_phys=g.read, translate=lambda va: va, pages=SW.TrapPages.at(0x9B000),
    )  # fmt: skip
    assert plan.slot == 401 and plan.stub_va == 0xFFFF_C880_0000_0000
    assert plan.pf_handler == 0xFFFF_FFFF_8140_0B00
    writes = dict(plan.writes)
    assert struct.unpack("<Q", writes[0x1000 + 8 * 401])[0] == 0x9B000 | 3  # no US bit
    assert SW.Gate.parse(writes[idt + 14 * 16]).offset == plan.stub_va
    pt = struct.unpack_from("<Q", writes[0x9B000 + 2 * 4096])[0]
    assert pt == (0x9B000 + 3 * 4096) | 1  # read-only, executable, supervisor
    # The gate is written last: nothing can reach a half-built stub.
    assert plan.writes[-1][0] == idt + 14 * 16


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(lstar=0x40_0000), "kernel-half"),
        (dict(idt_limit=100), "too short"),
        (dict(cr4=SW.CR4_LA57), "5-level"),
        (dict(pf_handler=0x40_0000), "not in the kernel half"),
    ],
)
def test_plan_refuses_what_linux_does_not_do(change, message):
    g, idt = _fake(change.pop("pf_handler", 0xFFFF_FFFF_8140_0B00))
    args = dict(
        lstar=0xFFFF_FFFF_8140_0040, cr3=0x1000, idt_base=idt, idt_limit=4095,
        read_phys=g.read, translate=lambda va: va, pages=SW.TrapPages.at(0x9B000),
    )  # fmt: skip
    args.update(change)
    with pytest.raises(SW.TrapError, match=message):
        SW.plan_syscall_trap(**args)


def test_plan_needs_a_free_slot():
    g, idt = _fake()
    for slot in SW.UNUSED_SLOTS:
        g.mem[0x1000 + 8 * slot : 0x1000 + 8 * slot + 8] = struct.pack("<Q", 0x5000 | 3)
    with pytest.raises(SW.TrapError, match="every unused hole"):
        SW.plan_syscall_trap(
            lstar=0xFFFF_FFFF_8140_0040, cr3=0x1000, idt_base=idt, idt_limit=4095,
            read_phys=g.read, translate=lambda va: va, pages=SW.TrapPages.at(0x9B000),
        )  # fmt: skip


def test_cmdline_profile_has_the_measured_switches():
    for switch in ("noxsave", "nopti", "clearcpuid=smap,popcnt", "sse4_2", "aes", "erms,fsrm",
                   "noreplace-smp"):  # fmt: skip
        assert switch in SW.SOFTWARE_HOST_CMDLINE
    # Linux reads only the last clearcpuid=: there must be exactly one.
    assert SW.SOFTWARE_HOST_CMDLINE.count("clearcpuid=") == 1


# --- a small kernel-like guest on the real host -----------------------------------------------------

KBASE = 0xFFFF_FFFF_8000_0000
KCODE = 0x10000
USER_CODE = 0x200000
USER_STACK = 0x3FF000
TRAP_PAGES = 0x9B000

# Offsets inside the assembled blob (`.org`), so the VMM can point gates and LSTAR at them.
# Exit code: 42 from the user program + 100 * the CPL the syscall entry ran at + 50 * #BP
# handler runs + 1000 if `stac`/`clac` (when the CPU has SMAP) did not leave RFLAGS.AC as the
# instructions say. Every host must give 92: natively, or through the fallbacks.
GUEST_ASM = """
    # The "kernel": ring 0, running from the high mapping like Linux.
    int3                        # emulation failure on a software host -> #BP injected
    fwait                       # emulation failure on a software host -> skipped
    xor %r14d, %r14d
    mov $7, %eax                # CPUID.(7,0):EBX bit 20: SMAP (clac/stac exist)
    xor %ecx, %ecx
    cpuid
    bt $20, %ebx
    jnc 2f
    stac                        # software host: emulation failure -> AC set, skipped
    pushfq
    pop %rax
    bt $18, %eax
    jc 1f
    add $1000, %r14d
1:  clac                        # software host: emulation failure -> AC cleared, skipped
    pushfq
    pop %rax
    bt $18, %eax
    jnc 2f
    add $1000, %r14d
2:  mov $0xC0000082, %ecx       # LSTAR: the VMM learns it through its MSR filter
    lea syscall_entry(%rip), %rax
    mov %rax, %rdx
    shr $32, %rdx
    wrmsr
    pushq $0x2B                 # iretq to ring 3: ss, rsp, rflags, cs, rip
    pushq $0x3FF000
    pushq $0x2
    pushq $0x33
    pushq $0x200000
    iretq
.org 0x100
bp_handler:                     # #BP: count it
    inc %r15
    iretq
.org 0x200
pf_handler:                     # a page fault the trap did not forward
    mov $99, %edi
    jmp exit
.org 0x300
syscall_entry:                  # exit code 42 + 100*CPL + 50*(#BP count) + r14
    mov %cs, %eax
    and $3, %eax
    imul $100, %eax
    add %eax, %edi
    imul $50, %r15d, %eax
    add %eax, %edi
    add %r14d, %edi
exit:
    mov $0x500, %edx
    xor %eax, %eax
    out %eax, (%dx)
    hlt
.org 0x400
user_code:                      # ring 3
    mov $42, %edi
    syscall
1:  jmp 1b
"""


def _setup_guest(m, blob: bytes) -> None:
    from kvmpy.arch.x86 import gdt as G
    from kvmpy.arch.x86.modes import BootState, Mode, SystemLayout
    from kvmpy.kvm import structs as S

    mem = m.memory
    P, RW, US, PS = 1, 2, 4, 0x80
    # Page tables: low 4 MiB identity (0-2 MiB supervisor, 2-4 MiB user), and the first 2 MiB
    # again at KBASE (PML4[511] -> PDPT[510]), supervisor.
    mem.write_u64(0x1000, 0x2000 | P | RW | US)
    mem.write_u64(0x2000, 0x3000 | P | RW | US)
    mem.write_u64(0x3000, 0x0 | P | RW | PS)
    mem.write_u64(0x3008, 0x200000 | P | RW | US | PS)
    mem.write_u64(0x1000 + 511 * 8, 0x7000 | P | RW)
    mem.write_u64(0x7000 + 510 * 8, 0x8000 | P | RW)
    mem.write_u64(0x8000, 0x0 | P | RW | PS)
    # GDT in Linux's order: kernel code 0x10, kernel data 0x18, user data 0x2B, user code 0x33.
    tss_base = KBASE + 0x6000
    gdt = bytes(16)
    gdt += G.flat_code64(0x10, 0).descriptor() + G.flat_data(0x18, 0).descriptor()
    gdt += G.flat_code32(0x20, 3).descriptor() + G.flat_data(0x28, 3).descriptor()
    gdt += G.flat_code64(0x30, 3).descriptor() + bytes(8)
    gdt += G.Segment(0x40, tss_base, 103, G.TYPE_TSS_AVAIL, s=0).descriptor()
    mem.write(0x4000, gdt)
    tss = bytearray(104)
    struct.pack_into("<Q", tss, 4, KBASE + 0x80000)  # RSP0
    struct.pack_into("<H", tss, 102, 104)
    mem.write(0x6000, bytes(tss))
    idt = bytearray(4096)
    for vector, off in ((3, 0x100), (14, 0x200)):
        g = SW.Gate(KBASE + KCODE + off, 0x10, 0, SW.GATE_INTERRUPT, 0, True)
        idt[vector * 16 : vector * 16 + 16] = g.encode()
    mem.write(0x5000, bytes(idt))
    mem.write(KCODE, blob[:0x400])
    mem.write(USER_CODE, blob[0x400:])

    sregs = S.kvm_sregs()
    sregs.cs = G.flat_code64(0x10, 0).to_kvm()
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, G.flat_data(0x18, 0).to_kvm())
    sregs.tr = G.tss(0x40, tss_base, 103).to_kvm()
    sregs.ldt = G.Segment(0, 0, 0, 0x2, s=0, present=0).to_kvm()
    sregs.gdt = S.kvm_dtable(base=KBASE + 0x4000, limit=len(gdt) - 1)
    sregs.idt = S.kvm_dtable(base=KBASE + 0x5000, limit=4095)
    sregs.cr0 = 0x80050033
    sregs.cr3 = 0x1000
    sregs.cr4 = 0x20 | 0x200 | 0x400  # PAE, OSFXSR, OSXMMEXCPT
    sregs.efer = 0x500 | 1  # LME, LMA, SCE
    regs = S.kvm_regs(rip=KBASE + KCODE, rsp=KBASE + 0x80000, rflags=2)
    vcpu = m.vcpus[0]
    vcpu.set_sregs(sregs)
    vcpu.set_regs(regs)
    vcpu.set_fpu(S.kvm_fpu(fcw=0x37F, mxcsr=0x1F80))
    # STAR: syscall loads CS 0x10 / SS 0x18 (sysret would use 0x23-based user selectors).
    vcpu.set_msrs({0xC000_0081: (0x23 << 48) | (0x10 << 32)})
    m.boot = BootState(Mode.LONG, regs, sregs, SystemLayout(ncpus=0))
    m.entry_ip = regs.rip


@pytest.mark.kvm
@pytest.mark.parametrize("profile", [True, False], ids=["with-profile", "without-profile"])
def test_small_guest_fallbacks_and_syscall_forwarding(kvm, assemble, profile):
    """Every fallback of the profile, each counted in the exit statistics: int3 -> #BP
    injected, fwait skipped, stac/clac (where the CPU has SMAP) emulated on RFLAGS.AC, the
    LSTAR write taken through the MSR filter (installing the syscall trap), and a CPL3
    `syscall` forwarded by the stub."""
    from kvmpy.doctor import is_software_host
    from kvmpy.machine import Machine, MachineConfig
    from kvmpy.vmm.linux import SoftwareHostProfile

    sw = is_software_host(kvm)
    blob = assemble(GUEST_ASM)
    with Machine(MachineConfig(mode="long", memory="4M", accel="kvm"), kvm=kvm) as m:
        _setup_guest(m, blob)
        swp = None
        if profile and sw:
            swp = SoftwareHostProfile(m, SW.TrapPages.at(TRAP_PAGES))
            swp.install()
        result = m.run(timeout=30)
    fallbacks = result.stats.fallbacks
    if not sw:
        # Native ring 0: int3, fwait and clac run, syscall enters ring 0 by itself; kvmpy
        # handled nothing.
        assert result.exit_code == 92, result.message
        assert fallbacks == {}
        return
    if profile:
        assert result.exit_code == 92, (result.message, fallbacks, swp.trap)
        assert fallbacks["int3"] == 1 and fallbacks["fwait"] == 1
        assert fallbacks["lstar_write"] == 1 and fallbacks["syscall_trap_installed"] == 1
        assert swp.trap["slot"] == 401
        # stac/clac ran where the guest's CPUID shows SMAP (on KVM-PVM it shows the host's
        # bits whatever KVM lists as supported); the exit code says AC came out right.
        assert fallbacks.get("stac", 0) == fallbacks.get("clac", 0) in (0, 1)
    else:
        # The host quirk itself: without the profile int3 is an emulation failure.
        assert result.stop_reason.value == "internal_error"
        assert "int3" in result.message


def test_profile_only_on_a_software_host(monkeypatch):
    """Nothing of the profile on VT-x/AMD-V: no command-line switches, no hooks."""
    pytest.importorskip("kvmpy.vmm.linux")
    from kvmpy.vmm import linux as L

    class FakeMachine:
        virtio = None

    boot = L.LinuxBoot("vmlinux", cmdline="quiet")
    for sw in (False, True):
        p = L.LinuxPlatform(FakeMachine(), boot, software_host=sw)
        line = p.full_cmdline()
        assert line.startswith(L.BASE_CMDLINE) and line.endswith(" quiet")
        assert (SW.SOFTWARE_HOST_CMDLINE in line) is sw
        assert ("clearcpuid=" in line) is sw and ("noxsave" in line) is sw


DEBIAN_BANNER_LINE = (
    b"Linux version 6.1.0-57-cloud-amd64 (debian-kernel@lists.debian.org) (gcc-12 (Debian "
    b"12.2.0-14+deb12u1) 12.2.0) #1 SMP PREEMPT_DYNAMIC Debian 6.1.192-3\n"
)


def test_debian_kernel_by_its_banner():
    # The bzImage's setup header string, or the banner inside a bare vmlinux.
    assert SW.is_debian_kernel("6.1.0-57-cloud-amd64 (debian-kernel@lists.debian.org) #1", None)
    assert SW.is_debian_kernel("", b"\0" * 100 + DEBIAN_BANNER_LINE + b"\0")
    # kvmpy's own build (root@host), and a bzImage of unknown origin.
    assert not SW.is_debian_kernel("6.1.192 (root@kvmpy) #1 SMP", None)
    assert not SW.is_debian_kernel("", b"Linux version 6.1.192 (root@kvmpy) (gcc-12)")


def test_speed_cmdline_on_a_software_host_debian_gets_its_blacklist():
    pytest.importorskip("kvmpy.vmm.linux")
    from kvmpy.boot.linux import Kernel, Vmlinux
    from kvmpy.vmm import linux as L

    def kernel(banner: bytes) -> Kernel:
        return Kernel(Vmlinux(b"\x7fELF" + banner, (), 0, "vmlinux"), None, "vmlinux")

    debian, other = kernel(DEBIAN_BANNER_LINE), kernel(b"Linux version 6.1.192 (root@kvmpy)")
    on, off = L.LinuxBoot("vmlinux"), L.LinuxBoot("vmlinux", speed_cmdline=False)
    both = f"{SW.SPEED_CMDLINE} {SW.DEBIAN_SPEED_CMDLINE}"
    assert L.speed_cmdline_for(on, debian, software_host=True) == both
    assert L.speed_cmdline_for(on, other, software_host=True) == "rodata=off"
    assert L.speed_cmdline_for(off, debian, software_host=True) == ""
    # Never on VT-x/AMD-V: it is part of the software-host profile.
    assert L.speed_cmdline_for(on, debian, software_host=False) == ""

    class FakeMachine:
        virtio = None

    p = L.LinuxPlatform(FakeMachine(), L.LinuxBoot("vmlinux", cmdline="quiet"), True)
    assert "rodata=off" not in p.full_cmdline()  # load() decides; nothing before it
    p.speed_cmdline = both
    line = p.full_cmdline()
    # After the profile, before the user's own switches (which win).
    assert line.index(SW.SOFTWARE_HOST_CMDLINE) < line.index(both)
    assert line.endswith(both + " quiet")


def test_speed_cmdline_in_the_config_file():
    pytest.importorskip("kvmpy.vmm.linux")
    from kvmpy.errors import ConfigError
    from kvmpy.vmm.config import VmConfig
    from kvmpy.vmm.linux import linux_config

    for value in (True, False):
        d = json.loads(linux_config("/k/vmlinux", speed_cmdline=value).to_json())
        assert d["boot"].get("speed_cmdline", True) is value
        assert VmConfig.from_dict(d).boot.speed_cmdline is value
    d["boot"]["speed_cmdline"] = "yes"
    with pytest.raises(ConfigError, match="boot.speed_cmdline must be true or false"):
        VmConfig.from_dict(d)
