"""The unicorn backend: kvmpy guests by binary translation (unicorn 2.1, QEMU 5's TCG), with
no /dev/kvm. See docs/backends.md for what it supports and how fast it is.

What we learned about unicorn's x86 emulation, and what this package does about it:

* CPL3 code, paging (32-bit, PAE, 4-level with 1 GiB pages), `iretq`, `sysret`, `lret` and
  segment loads by the guest work as on hardware: QEMU's helpers do the checks.
* Exceptions and `int n` are not delivered through the IDT: unicorn calls UC_HOOK_INTR and
  would skip the instruction. delivery.py does the delivery (real, protected, long mode).
* `syscall`/`sysenter` only call a hook and skip the instruction (no #UD when EFER.SCE is
  clear, no CPL change): delivery.fast_system_call gives them their architectural behaviour.
* `in`/`out` (string forms too) call UC_HOOK_INSN hooks per item; the TSS I/O bitmap and IOPL
  are checked by the translated code before the hook, as on hardware.
* The register API cannot load segment descriptor caches or read the in-flight exception's
  error code: env.py reads and writes QEMU's CPUX86State through the CPU context, at
  offsets it verifies against the API.
* MSRs: STAR/LSTAR/FMASK, FS/GS bases, SYSENTER_*, PAT, EFER are modelled; unknown MSR writes
  (the x2APIC EOI, 0x80B) are ignored without #GP and there is no WRMSR hook.
* `hlt` ends `uc_emu_start`; `uc_emu_stop` from another thread stops a guest that never
  exits; a hook's stop takes effect at the next memory access or block end, so precise stops
  after I/O use an I/O breakpoint (vcpu.py).
"""

from .vm import CAPABILITIES, UnicornHypervisor, UnicornVm, unavailable, unicorn_version

__all__ = ["CAPABILITIES", "UnicornHypervisor", "UnicornVm", "unavailable", "unicorn_version"]
