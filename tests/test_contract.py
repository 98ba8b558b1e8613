"""The backend contract: the same guests give the same results on every CPU backend.

Every test here runs once per backend (`accel`): on KVM (marked `kvm`, so skipped where
/dev/kvm is missing) and on unicorn (everywhere). `KVMPY_DEV=/missing pytest
tests/test_contract.py` proves kvmpy works without KVM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from contextlib import ExitStack

import pytest

from kvmpy.arch.x86.modes import Mode
from kvmpy.hypercalls import HC_PRINT_STR, hc_print_str
from kvmpy.machine import Machine, MachineConfig
from kvmpy.persist import snapshot
from kvmpy.persist.guest import HashchainParams, write_image
from kvmpy.result import Stop, StopReason
from kvmpy.sched import Scheduler
from kvmpy.sdk.examples import find_example

KVMPY = [sys.executable, "-m", "kvmpy"]
MODES = [m.value for m in Mode]
SHORT = HashchainParams(work_bytes=1 << 20, lines=60, rounds_per_line=20_000, memsum_every=7)


@pytest.fixture(params=[pytest.param("kvm", marks=pytest.mark.kvm), "unicorn"])
def accel(request):
    return request.param


@pytest.fixture
def machine(accel):
    """machine(mode, memory="64M") -> a Machine on this test's backend (closed after)."""
    with ExitStack() as stack:

        def make(mode="long-user", memory="64M", **config):
            return stack.enter_context(
                Machine(MachineConfig(mode=mode, memory=memory, accel=accel, **config))
            )

        yield make


def example(name: str, mode: str | None = None):
    ex = find_example(name)
    return ex.build(Mode(mode) if mode else None)


def run_example(machine, name: str, mode: str, timeout: float = 60):
    m = machine(mode)
    m.load_file(example(name, mode))
    return m.run(timeout=timeout)


def paged32_refused(accel: str, mode: str, result) -> bool:
    """KVM-PVM cannot run 32-bit paging; KVM says so, and that is the contract there."""
    return accel == "kvm" and mode == "paged32" and result.stop_reason is StopReason.HOST_LIMITATION


# --- examples, ABI, modes ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_hello(machine, accel, mode, gcc_available):
    result = run_example(machine, "hello", mode)
    if paged32_refused(accel, mode, result):
        return
    assert result.stop_reason is StopReason.EXIT and result.exit_code == 0, result.message
    assert f"Hello from a kvmpy guest ({mode} mode)!".encode() in result.output
    assert result.output.endswith(b"Exits so far: 3\nIO in: 0\nIO out: 5\nGoodbye.\n")
    assert result.exits == {"io": 17}
    assert result.stats.port(0x500).writes == 17


@pytest.mark.parametrize("mode", MODES)
def test_abi_check(machine, accel, mode, gcc_available):
    result = run_example(machine, "abi-check", mode)
    if paged32_refused(accel, mode, result):
        return
    assert b"not ok" not in result.output
    assert b"13 checks, 0 failures" in result.output
    assert result.stop_reason is StopReason.EXIT and result.exit_code == 0
    assert result.exits == {"io": 27}


@pytest.mark.parametrize("mode", MODES)
def test_raw_image_in_every_mode(machine, accel, mode, gcc_available):
    result = run_example(machine, "hello-raw", mode)
    if paged32_refused(accel, mode, result):
        return
    assert result.output.startswith(b"Hello, raw")
    assert result.stop_reason is StopReason.EXIT


@pytest.mark.parametrize("mode,ring,error", [("long", 0, 2), ("long-user", 3, 6)])
def test_fault(machine, accel, mode, ring, error, gcc_available):
    result = run_example(machine, "fault", mode)
    assert result.stop_reason is StopReason.EXCEPTION
    f = result.fault
    assert (f.vector, f.error_code, f.cr2) == (14, error, 0x7000000000)
    assert f.instruction == "mov qword ptr [rax], 1" and f.cs & 3 == ring
    assert result.message == (
        f"#PF page fault in ring {ring} at {f.rip:#x} (address 0x7000000000), error code "
        f"{error:#x}; faulting instruction: mov qword ptr [rax], 1"
    )
    assert result.regs["rax"] == 0x7000000000 and result.regs["rip"] == f.rip
    assert result.sregs["cpl"] == ring
    # The stub's report is counted as the exception it is, not as an I/O exit.
    assert result.exits == {"io": 1, "exception": 1}


def test_the_backend_is_the_one_asked_for(machine, accel):
    assert machine("long").accel == accel


# --- the command line -----------------------------------------------------------------------------


def kvmpy(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    full = {**os.environ, **(env or {})}
    return subprocess.run([*KVMPY, *args], capture_output=True, timeout=timeout, env=full)


def test_run_json(accel, gcc_available):
    r = kvmpy("run", "hello", "--accel", accel, "--json")
    assert r.returncode == 0, r.stderr.decode()
    doc = json.loads(r.stdout.splitlines()[-1])
    assert doc["accel"] == accel and doc["stop_reason"] == "exit" and doc["exits"] == {"io": 17}


def test_trace_exits(accel, gcc_available):
    r = kvmpy("run", "hello-raw", "--mode", "long", "--accel", accel, "--trace-exits")
    assert r.returncode == 0, r.stderr.decode()
    lines = r.stderr.decode().splitlines()
    assert lines[0] == "[exit 1] io rip=0x4 out port=0xe9 size=1 count=1"
    assert lines[-1].endswith("out port=0x500 size=4 count=1 hypercall=exit(0x0, 0x0, 0x0, 0x0)")


def test_timeout_stops_a_guest_that_never_exits(accel, gcc_available):
    t0 = time.monotonic()
    r = kvmpy("run", "spin", "--accel", accel, "--timeout", "0.5")
    assert r.returncode == 124, r.stderr.decode()
    assert b"time limit" in r.stderr and time.monotonic() - t0 < 30


# --- snapshot and restore --------------------------------------------------------------------------


def hashchain_image(tmp_path_factory) -> object:
    return write_image(tmp_path_factory.mktemp("hashchain") / "short.elf", SHORT)


def uninterrupted_output(image) -> bytes:
    with Machine(MachineConfig(mode="long-user", memory="16M", accel="unicorn")) as m:
        m.load_file(image)
        result = m.run(timeout=120)
    assert result.stop_reason is StopReason.EXIT
    return result.output


@pytest.fixture(scope="module")
def hashchain(tmp_path_factory, gcc_available):
    return hashchain_image(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(hashchain):
    return uninterrupted_output(hashchain)


def snapshot_after(accel: str, image, path, lines: int | None) -> bytes:
    """Run `image` on `accel` and snapshot it at its `lines`-th output line (at an exit), or
    before its first instruction; returns the output before the snapshot."""
    with Machine(MachineConfig(mode="long-user", memory="16M", accel=accel)) as m:
        m.load_file(image)
        if lines is None:
            snapshot.take(m, path)
            return b""

        def counting(ctx, *args):
            r = hc_print_str(ctx, *args)
            if m.output.count(b"\n") == lines:
                m.pause_from_guest()
            return r

        m.hypercalls.register(HC_PRINT_STR, counting, "print_str", replace=True)
        errors = []

        def controller():
            try:
                m.wait_paused(60)
                snapshot.take(m, path)
                m.end_run(Stop(StopReason.INTERRUPTED, 0, "snapshot taken"))
            except BaseException as e:
                errors.append(e)
                m.request_stop(StopReason.VMM_ERROR, str(e))
            finally:
                try:
                    m.resume()
                except Exception:
                    pass

        t = threading.Thread(target=controller, daemon=True)
        t.start()
        result = m.run(timeout=120)
        t.join(10)
        if errors:
            raise errors[0]
        assert result.message == "snapshot taken", result.message
        return result.output


def restore_and_run(path, accel: str, lazy: bool = False) -> bytes:
    restored = snapshot.restore(path, accel=accel, lazy_memory=lazy)
    try:
        assert restored.machine.accel == accel
        result = restored.machine.run(timeout=120)
        assert result.stop_reason is StopReason.EXIT, result.message
        return result.output
    finally:
        restored.close()


@pytest.mark.parametrize("lines", [None, 1, 33])
def test_snapshot_and_restore(accel, hashchain, reference, tmp_path, lines):
    before = snapshot_after(accel, hashchain, tmp_path / "snap", lines)
    assert before + restore_and_run(tmp_path / "snap", accel) == reference


def test_lazy_restore(accel, hashchain, reference, tmp_path):
    before = snapshot_after(accel, hashchain, tmp_path / "snap", 20)
    assert before + restore_and_run(tmp_path / "snap", accel, lazy=True) == reference


def test_live_migration_needs_the_dirty_log(machine, accel, tmp_path, gcc_available):
    """KVM migrates (tests/test_persist.py); unicorn refuses in one sentence."""
    from kvmpy.hv.base import Capability

    m = machine("long-user", "16M")
    if Capability.DIRTY_LOG in m.vm.capabilities:
        return
    with pytest.raises(Exception, match="needs dirty_log support, which the unicorn backend"):
        m.vm.set_dirty_logging(m.memory.regions[0], True)


# --- the schedulers --------------------------------------------------------------------------------


def test_timer_scheduler_preempts_a_guest_that_never_exits(machine, gcc_available):
    vms = []
    for name in ("spin", "neo"):
        m = machine("long-user", "16M")
        m.load_file(example(name))
        vms.append(m)
    result = Scheduler(vms, "timer", quantum=0.01).run(0.5)
    spin, neo = result.vms
    assert spin.slices >= 3 and spin.switches >= 2
    assert spin.progress > 0 and neo.progress > 0
    assert abs(spin.slices - neo.slices) <= 1


def test_on_io_scheduler_switches_at_every_io_exit(machine, gcc_available):
    vms = []
    for _ in range(2):
        m = machine("long-user", "16M")
        m.load_file(example("io-heavy"))
        vms.append(m)
    result = Scheduler(vms, "on-io").run(0.3)
    a, b = result.vms
    assert a.progress > 0 and b.progress > 0
    assert abs(a.switches - b.switches) <= 1 and a.switches > 10


# --- interrupts --------------------------------------------------------------------------------

MSI_GUEST = """
#include <kvmpy.h>
static volatile long irqs;
void handler(void);
__asm__(".globl handler\\n handler:\\n push %rax\\n push %rcx\\n push %rdx\\n"
        " incq irqs(%rip)\\n mov $0x80B, %ecx\\n xor %eax, %eax\\n xor %edx, %edx\\n wrmsr\\n"
        " pop %rdx\\n pop %rcx\\n pop %rax\\n iretq\\n");
int main(void)
{
	while (irqs < 3)
		__asm__ volatile("sti; hlt; cli");
	hc_print_str("three interrupts\\n");
	return (int)irqs;
}
"""


def test_msi_through_the_interrupt_manager(machine, accel, build_guest):
    """A device's MSI (InterruptManager) reaches a ring-0 handler that EOIs through the x2APIC
    MSR; `hlt` with interrupts enabled waits for it."""
    image = build_guest(MSI_GUEST, "long")
    m = machine("long", "16M", irqchip=accel == "kvm")
    m.load_file(image)
    m.set_interrupt_handler(0x40, m.image.symbols["handler"])
    msi = m.interrupts.msi("test", vector=0x40, cpu=0)

    def ring():
        for _ in range(3):
            time.sleep(0.05)
            msi.trigger()

    t = threading.Thread(target=ring)
    t.start()
    result = m.run(timeout=30)
    t.join()
    assert result.stop_reason is StopReason.EXIT and result.exit_code == 3, result.message
    assert result.output == b"three interrupts\n"


def test_a_hypercall_handler_sees_the_registers_of_the_exit(machine, accel, assemble):
    """RIP past the `out` (KVM's view during an I/O exit), arguments in place."""
    from kvmpy.loader import load_raw

    code = assemble(
        "mov $42, %edi\n mov $64, %eax\n mov $0x500, %dx\n out %eax, %dx\n"
        "mov %edi, %ebx\n mov %eax, %edi\n xor %eax, %eax\n out %eax, %dx"
    )
    seen = []
    m = machine("long", "16M")

    def probe(ctx, a0, *_):
        regs = ctx.vcpu.get_regs()
        seen.append((regs.rip, regs.rdi, a0))
        return 7

    m.hypercalls.register(64, probe, "probe")  # users number theirs from 64
    m.load(load_raw(code))
    result = m.run(timeout=30)
    assert result.stop_reason is StopReason.EXIT and result.exit_code == 7
    assert seen == [(15, 42, 42)]  # 5 + 5 + 4 bytes, then the 1-byte out
