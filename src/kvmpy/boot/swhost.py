"""The software-host profile: what a Linux guest needs from the VMM on a software KVM host
(KVM-PVM, where guest ring 0 is emulated), as decisions the run loop carries out.

Everything here is pure: functions take exit data, register values and a guest-memory accessor,
and return what to do; `kvmpy.vmm.linux.SoftwareHostProfile` applies it on the KVM vCPUs. None
of it is used on a VT-x/AMD-V host. What was measured and why is in LINUX-ON-THIS-HOST.md and
docs/linux.md; in short:

* **Emulation failures** (KVM_EXIT_INTERNAL_ERROR, suberror 1, instruction bytes in the exit):
  `int3` in ring 0 (the alternatives self-test, `text_poke_bp`) → advance rip by one and inject
  #BP, which is what the CPU would have done; `fwait` (`fpu__drop`) → skip it (no x87 exception
  can be pending: the guest runs with CR0.NE and masked exceptions); `clac`/`stac` → clear/set
  RFLAGS.AC and skip (with `clearcpuid=smap` on the command line the kernel patches them out).
* **Features the emulator lacks** are hidden by the guest command line (KVM_SET_CPUID2 cannot
  hide them on KVM-PVM, except CX16): `SOFTWARE_HOST_CMDLINE`.
* **System calls from user space**: after `syscall` at CPL3 the host leaves the vCPU at CPL3 at
  rip = LSTAR, so fetching the kernel's entry faults (#PF, user access to a supervisor page). kvmpy
  forwards them *inside the guest*, with no VMM exit and no symbol table: when the kernel writes
  LSTAR (learnt through an MSR filter exit, KVM_X86_SET_MSR_FILTER), its IDT is final; kvmpy maps
  a read-only stub page in an unused hole of the kernel half (PML4 slot 401,
  0xffffc88000000000: Linux never maps it, and every process's page tables copy that part of
  the kernel's top-level table) and points IDT vector 14 at it. The stub checks the exception
  frame: a fault at CPL3 with rip == LSTAR is a system call, so it loads the user stack pointer
  from the frame and jumps to LSTAR, now at CPL0, with rcx/r11 as `syscall` left them; anything
  else jumps on to the kernel's own page-fault entry, with the frame untouched.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

MSR_LSTAR = 0xC000_0082

#: Guest command-line additions on a software host. Needed for correctness: `noxsave` (the
#: emulator lacks xrstor), `clearcpuid=` for smap (clac/stac on every entry), popcnt and the
#: SSE/AES family (ldmxcsr in the random pool's SIMD code). `nopti`: the syscall stub lives in
#: the kernel half, which page-table isolation would unmap in user mode. Speed: clearing `erms`
#: and `fsrm` makes memcpy/memset/clear_page use `rep movsq`/`stosq` (or mov loops) instead of
#: byte-wise `rep movsb`/`stosb`, which the emulator steps one byte at a time (they led the
#: profile: copying the initramfs into the page cache, clearing pages); `percpu_alloc=page`
#: avoids memsetting a 2 MiB per-CPU first chunk. Together with the BLAKE2s self test off, the
#: microVM kernel's `Run /init` went from 708 s to 157 s on a loaded machine (load ~12 and ~7:
#: not a clean comparison). `noreplace-smp`: on one vCPU, Linux otherwise rewrites every
#: `lock` prefix of its text into a `ds` prefix, one `text_poke` each (a temporary mm, a TLB
#: flush: 5% of the microVM kernel's boot samples); the lock prefixes are correct on one CPU.
#: The rest are precautions from the experiment (never ablated) or speed (`tsc=reliable
#: no_timer_check`, `cryptomgr.notests`).
SOFTWARE_HOST_CMDLINE = (
    "noxsave nofsgsbase noinvpcid nopti percpu_alloc=page noreplace-smp "
    "clearcpuid=smap,popcnt,clflushopt,pni,ssse3,sse4_1,sse4_2,pclmulqdq,aes,sha_ni,gfni,"
    "erms,fsrm tsc=reliable no_timer_check cryptomgr.notests"
)

#: Speed only, on a software host unless `LinuxBoot.speed_cmdline` is off (`kvmpy boot
#: --no-speed-cmdline`): `rodata=off` skips write-protecting the kernel's text and read-only
#: data (`mark_rodata_ro`: set_memory_ro/nx walk and split the page tables page by page, ~3% of
#: a sampled microVM boot, and more for Debian's 3x larger kernel). The cost: kernel text and
#: rodata stay writable, a hardening the guest gives up for boot time.
SPEED_CMDLINE = "rodata=off"

#: Speed only, for Debian's cloud kernel on top of SPEED_CMDLINE: skip ftrace's weak-function
#: check, trace-event enum updates, tracefs, the first BTF parse and X.509 loading (with
#: rodata=off these moved `Run /init` from ~155 s to ~118 s in the experiment). TCP cubic and
#: the kernel's built-in X.509 keys are then absent. The initcall names are Debian's config's.
DEBIAN_SPEED_CMDLINE = (
    "initcall_blacklist=ftrace_check_for_weak_functions,trace_eval_init,"
    "tracer_init_tracefs,cubictcp_register,bpf_prog_test_run_init,bpf_tcp_ca_kfunc_init,"
    "bpf_key_sig_kfuncs_init,bpf_rstat_kfunc_init,kfunc_init,load_system_certificate_list"
)


def speed_cmdline(debian: bool) -> str:
    """The speed-only switches for a kernel (Debian's gets its initcall_blacklist too)."""
    return f"{SPEED_CMDLINE} {DEBIAN_SPEED_CMDLINE}" if debian else SPEED_CMDLINE


#: In the banner of every kernel Debian builds ("Linux version 6.1.0-57-cloud-amd64
#: (debian-kernel@lists.debian.org) ..."): the bzImage's setup header and the vmlinux both hold
#: it. The initcall names of DEBIAN_SPEED_CMDLINE are those of Debian's configs.
DEBIAN_BANNER = b"(debian-kernel@lists.debian.org)"


def is_debian_kernel(kernel_version: str, vmlinux: bytes | None) -> bool:
    """Whether a kernel is one of Debian's, by its banner (the setup header's kernel_version
    string, else the vmlinux's `linux_banner`)."""
    if DEBIAN_BANNER.decode() in kernel_version:
        return True
    return vmlinux is not None and DEBIAN_BANNER in vmlinux


# --- emulation failures ------------------------------------------------------------------------


@dataclass(frozen=True)
class Fallback:
    """How to get past an instruction the host could not emulate."""

    name: str
    length: int  # bytes to advance rip by
    inject_vector: int | None = None  # an exception to deliver after advancing
    set_rflags: int = 0  # bits to set in RFLAGS
    clear_rflags: int = 0  # bits to clear

    def apply(self, rip: int, rflags: int) -> tuple[int, int]:
        return (rip + self.length) & (1 << 64) - 1, (rflags | self.set_rflags) & ~self.clear_rflags


RFLAGS_AC = 1 << 18
VECTOR_BP = 3

_INT3 = Fallback("int3", 1, inject_vector=VECTOR_BP)
_FWAIT = Fallback("fwait", 1)
_CLAC = Fallback("clac", 3, clear_rflags=RFLAGS_AC)
_STAC = Fallback("stac", 3, set_rflags=RFLAGS_AC)


def emulation_fallback(insn: bytes, cpl: int) -> Fallback | None:
    """The fallback for an emulation failure at ring 0 on `insn` (the exit's instruction
    bytes), or None: then the VM stops with the instruction reported. Only ring-0 code is
    emulated on a software host; a failure elsewhere is not ours to paper over."""
    if cpl != 0 or not insn:
        return None
    if insn[0] == 0xCC:
        return _INT3
    if insn[0] == 0x9B:
        return _FWAIT
    if insn[:3] == b"\x0f\x01\xca":
        return _CLAC
    if insn[:3] == b"\x0f\x01\xcb":
        return _STAC
    return None


# --- IDT gates ---------------------------------------------------------------------------------

GATE_INTERRUPT = 0xE
GATE_TRAP = 0xF
VECTOR_PF = 14


@dataclass(frozen=True)
class Gate:
    offset: int
    selector: int
    ist: int
    type: int
    dpl: int
    present: bool

    @classmethod
    def parse(cls, raw: bytes) -> Gate:
        lo, sel, ist, attr, mid, hi = struct.unpack("<HHBBHI4x", raw[:16])
        return cls(
            offset=lo | (mid << 16) | (hi << 32),
            selector=sel,
            ist=ist & 7,
            type=attr & 0xF,
            dpl=(attr >> 5) & 3,
            present=bool(attr & 0x80),
        )

    def encode(self) -> bytes:
        attr = self.type | (self.dpl << 5) | (0x80 if self.present else 0)
        o = self.offset
        return struct.pack(
            "<HHBBHII", o & 0xFFFF, self.selector, self.ist, attr, (o >> 16) & 0xFFFF,
            o >> 32, 0,
        )  # fmt: skip

    def with_offset(self, offset: int) -> Gate:
        return Gate(offset, self.selector, self.ist, self.type, self.dpl, self.present)


# --- the syscall stub --------------------------------------------------------------------------

#: PML4 slots that x86-64 Linux with 4-level paging and no KASLR never maps
#: (Documentation/x86/x86_64/mm.rst, "unused hole": ffffc88000000000 is slot 401, then the holes
#: at ffffe90000000000, ffffeb0000000000 and fffffc0000000000). They must lie at or above
#: KERNEL_PGD_BOUNDARY (pgd_index(PAGE_OFFSET) = 273), the part of the kernel's top-level table
#: that every new process's page tables copy; the "guard hole reserved for hypervisors" at slot
#: 256 is below it, so a stub there is missing in user processes (measured: /init hung).
UNUSED_SLOTS = (401, 466, 467, 470, 471, 504, 505, 506, 507)
CR4_LA57 = 1 << 12
PAGE = 4096
PTE_P, PTE_RW, PTE_US, PTE_PS = 1, 2, 4, 0x80
PTE_NX = 1 << 63
ADDR_MASK = 0x000F_FFFF_FFFF_F000


def slot_address(slot: int) -> int:
    va = slot << 39
    return va | 0xFFFF_0000_0000_0000 if slot >= 256 else va


def syscall_stub(lstar: int, pf_handler: int) -> bytes:
    """The stub IDT vector 14 points at (position-independent; data words at its end).

    On entry (an interrupt gate: IF clear) the frame is [rsp] error code, +8 rip, +16 cs,
    +24 rflags, +32 rsp, +40 ss.
    """
    code = bytearray()
    code += b"\xf6\x44\x24\x10\x03"  # testb $3, 16(%rsp)        fault in ring 3?
    jz_pass = len(code)
    code += b"\x74\x00"  # jz pass
    code += b"\x50"  # push %rax
    code += b"\x48\x8b\x44\x24\x10"  # mov 16(%rsp), %rax   the faulting rip (frame moved by 8)
    cmp_at = len(code)
    code += b"\x48\x3b\x05\x00\x00\x00\x00"  # cmp lstar(%rip), %rax
    code += b"\x58"  # pop %rax (flags kept)
    jne_pass = len(code)
    code += b"\x75\x00"  # jne pass
    code += b"\x48\x8b\x64\x24\x20"  # mov 32(%rsp), %rsp   the user stack, as `syscall` keeps it
    jmp_lstar = len(code)
    code += b"\xff\x25\x00\x00\x00\x00"  # jmp *lstar(%rip)     entry_SYSCALL_64, now at CPL0
    pass_at = len(code)
    code += b"\xff\x25\x00\x00\x00\x00"  # pass: jmp *handler(%rip)
    while len(code) % 8:
        code += b"\xcc"
    lstar_at = len(code)
    code += struct.pack("<Q", lstar)
    handler_at = len(code)
    code += struct.pack("<Q", pf_handler)
    code[jz_pass + 1] = pass_at - (jz_pass + 2)
    code[jne_pass + 1] = pass_at - (jne_pass + 2)
    struct.pack_into("<i", code, cmp_at + 3, lstar_at - (cmp_at + 7))
    struct.pack_into("<i", code, jmp_lstar + 2, lstar_at - (jmp_lstar + 6))
    struct.pack_into("<i", code, pass_at + 2, handler_at - (pass_at + 6))
    return bytes(code)


class TrapError(Exception):
    """The syscall trap could not be installed (the guest's tables are not as expected)."""


class TrapInstalled(TrapError):
    """Vector 14 already points into one of the holes: the trap is there (a restored or
    migrated guest whose kernel writes LSTAR again, e.g. when it brings up another CPU)."""


@dataclass(frozen=True)
class TrapPages:
    """Four guest-physical pages the VMM owns (reserved in e820): a PDPT, a PD, a PT and the
    stub page."""

    pdpt: int
    pd: int
    pt: int
    stub: int

    @classmethod
    def at(cls, base: int) -> TrapPages:
        return cls(base, base + PAGE, base + 2 * PAGE, base + 3 * PAGE)

    @property
    def size(self) -> int:
        return 4 * PAGE


@dataclass(frozen=True)
class TrapInstall:
    """What `plan_syscall_trap` decided: physical writes to make, and what was found."""

    writes: list[tuple[int, bytes]]
    stub_va: int
    pf_handler: int
    slot: int
    idt_gate_gpa: int


ReadPhys = Callable[[int, int], bytes]
Translate = Callable[[int], int]


def plan_syscall_trap(
    *,
    lstar: int,
    cr3: int,
    cr4: int = 0,
    idt_base: int,
    idt_limit: int,
    read_phys: ReadPhys,
    translate: Translate,
    pages: TrapPages,
) -> TrapInstall:
    """Plan the stub's installation once the kernel has set LSTAR (its IDT is final then:
    trap_init() runs idt_setup_traps() before cpu_init() writes LSTAR). `translate` maps a guest
    virtual address to a physical one through the current page tables; both accessors raise on
    anything outside guest RAM. Raises TrapError if the guest's state is not what Linux leaves."""
    if idt_limit < VECTOR_PF * 16 + 15:
        raise TrapError("the IDT is too short to hold the page-fault vector")
    if lstar >> 47 not in (0x1FFFF,):
        raise TrapError(f"LSTAR {lstar:#x} is not a kernel-half address")
    gate_gpa = translate(idt_base + VECTOR_PF * 16)
    gate = Gate.parse(read_phys(gate_gpa, 16))
    if not gate.present or gate.type not in (GATE_INTERRUPT, GATE_TRAP) or gate.ist:
        raise TrapError(f"IDT vector 14 is not a plain interrupt gate ({gate})")
    if gate.offset >> 47 != 0x1FFFF:
        raise TrapError(f"the page-fault handler {gate.offset:#x} is not in the kernel half")
    if (gate.offset >> 39) & 0x1FF in UNUSED_SLOTS:
        raise TrapInstalled(f"IDT vector 14 already points at a stub ({gate.offset:#x})")
    if cr4 & CR4_LA57:
        raise TrapError("the guest uses 5-level paging, which the syscall trap does not support")
    pml4 = cr3 & ADDR_MASK
    slot = None
    for s in UNUSED_SLOTS:
        if struct.unpack("<Q", read_phys(pml4 + 8 * s, 8))[0] == 0:
            slot = s
            break
    if slot is None:
        raise TrapError("the kernel maps every unused hole of its address space")
    stub_va = slot_address(slot)
    table = PTE_P | PTE_RW  # supervisor-only; the leaf decides write and execute
    writes = [
        (pages.pdpt, struct.pack("<Q", pages.pd | table) + bytes(PAGE - 8)),
        (pages.pd, struct.pack("<Q", pages.pt | table) + bytes(PAGE - 8)),
        (pages.pt, struct.pack("<Q", pages.stub | PTE_P) + bytes(PAGE - 8)),  # read-only, exec
        (pages.stub, syscall_stub(lstar, gate.offset).ljust(PAGE, b"\xcc")),
        # The top-level entry last, then the gate: the stub is complete before anything can
        # reach it.
        (pml4 + 8 * slot, struct.pack("<Q", pages.pdpt | table)),
        (gate_gpa, gate.with_offset(stub_va).encode()),
    ]
    return TrapInstall(writes, stub_va, gate.offset, slot, gate_gpa)
