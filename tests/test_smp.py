"""SMP guests: N vCPUs in threads, kvmpy/smp.h, stops and faults on any vCPU, IPIs."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from kvmpy.machine import Machine, MachineConfig
from kvmpy.result import StopReason
from kvmpy.sdk.examples import find_example

pytestmark = pytest.mark.kvm

KVMPY = [sys.executable, "-m", "kvmpy"]


def run_example(name: str, vcpus: int, mode: str = "long-user", timeout: float = 120):
    image = find_example(name).build()
    with Machine(MachineConfig(mode=mode, memory="64M", vcpus=vcpus)) as m:
        m.load_file(image)
        return m.run(timeout=timeout)


@pytest.mark.parametrize("vcpus", [1, 2, 4])
def test_parallel_sum_lock_and_barrier_are_exact(vcpus, gcc_available):
    result = run_example("smp-sum", vcpus)
    text = result.output.decode()
    assert result.stop_reason is StopReason.EXIT and result.exit_code == 0, text
    assert f"cpus that ran {vcpus} of {vcpus}" in text
    assert f"counter {2000 * vcpus} of {2000 * vcpus}" in text
    assert "barrier errors 0" in text and "smp-sum: OK" in text
    # Every vCPU took exits of its own (its start and its park) and they add up.
    if vcpus > 1:
        assert len(result.vcpu_stats) == vcpus
        assert all(s.total > 0 for s in result.vcpu_stats)
        assert result.stats.total == sum(s.total for s in result.vcpu_stats)


SMP_API = r"""
#include <kvmpy.h>
#include <kvmpy/smp.h>
static volatile int go;
static void spin(void *a) { (void)a; while (!go) smp_relax(); }
int main(void)
{
	long bad_cpu = smp_start(9, spin, 0);
	long self = smp_start(0, spin, 0);
	long first = smp_start(1, spin, 0);
	long busy = smp_start(1, spin, 0);
	long wait_self = smp_wait(1);
	long wait_none = smp_wait(0);
	long wait_absent = smp_wait(1ULL << 5);
	long park0 = kvmpy_hypercall(KVMPY_HC_CPU_PARK, 0, 0, 0, 0);
	go = 1;
	long waited = smp_wait(2);
	long again = smp_start(1, spin, 0);
	smp_wait(2);
	kv_printf("%ld %ld %ld %ld %ld %ld %ld %ld %ld %ld\n", bad_cpu, self, first, busy,
		wait_self, wait_none, wait_absent, park0, waited, again);
	return 0;
}
"""


def test_start_park_and_wait_check_their_arguments(build_guest, run_guest):
    result = run_guest(build_guest(SMP_API), vcpus=2, memory="16M")
    assert result.stop_reason is StopReason.EXIT, result.message
    assert result.output.split() == [
        b"-22",
        b"-22",
        b"0",
        b"-16",
        b"-22",
        b"-22",
        b"-22",
        b"-22",
        b"0",
        b"0",
    ]


EXIT_FROM_CPU1 = r"""
#include <kvmpy.h>
#include <kvmpy/smp.h>
static void bye(void *a) { (void)a; hc_exit(7); }
int main(void)
{
	smp_start(1, bye, 0);
	for (;;)
		smp_relax();
}
"""


def test_exit_hypercall_on_a_secondary_stops_the_machine(build_guest, run_guest):
    result = run_guest(build_guest(EXIT_FROM_CPU1), vcpus=3, memory="16M")
    assert result.stop_reason is StopReason.EXIT and result.exit_code == 7
    assert result.cpu == 1
    assert result.process_exit_status == 7


FAULT_ON_CPU2 = r"""
#include <kvmpy.h>
#include <kvmpy/smp.h>
static void crash(void *a)
{
	(void)a;
	__asm__ volatile("movq $0x1234, %%r12\n\tmovq $0, (%0)" : : "r"(0x7ead00000000UL) : "r12", "memory");
}
int main(void)
{
	smp_start(2, crash, 0);
	for (;;)
		smp_relax();
}
"""


def test_a_fault_on_a_secondary_names_its_vcpu_registers_and_instruction(build_guest, run_guest):
    result = run_guest(build_guest(FAULT_ON_CPU2), vcpus=3, memory="16M")
    assert result.stop_reason is StopReason.EXCEPTION, result.message
    assert result.cpu == 2
    assert "#PF page fault in ring 3" in result.message
    assert result.regs["r12"] == 0x1234
    assert result.fault is not None and "mov" in result.fault.instruction


PROTECTED = r"""
#include <kvmpy.h>
#include <kvmpy/smp.h>
static volatile uint32_t seen[4];
static void hello(void *a) { seen[smp_cpu_id()] = 100 + (uint32_t)(unsigned long)a; }
int main(void)
{
	smp_start(1, hello, (void *)1);
	smp_start(2, hello, (void *)2);
	smp_wait(6);
	kv_printf("%u %u %u %u\n", smp_num_cpus(), smp_cpu_id(), seen[1], seen[2]);
	return 0;
}
"""


def test_smp_in_32_bit_protected_mode(build_guest, run_guest):
    """Per-CPU TSS and GS base in a 32-bit mode (kept tiny: CPL0 code is emulated here)."""
    result = run_guest(build_guest(PROTECTED, "protected"), mode="protected", vcpus=3)
    assert result.stop_reason is StopReason.EXIT, result.message
    assert result.output.split() == [b"3", b"0", b"101", b"102"]


def test_ipi_ping_pong_takes_no_exits(gcc_available):
    result = run_example("smp-ipi", 2)
    text = result.output.decode()
    assert result.stop_reason is StopReason.EXIT and result.exit_code == 0, text
    assert "2000 round trips" in text
    assert "exits during the ping-pong: cpu0 0, cpu1 0" in text


def test_cli_reports_per_vcpu_statistics(gcc_available):
    proc = subprocess.run(
        [*KVMPY, "run", "smp-sum", "--vcpus", "2", "--json", "--stats"],
        capture_output=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    doc = json.loads(proc.stdout[proc.stdout.rindex(b"\n{") + 1 :])
    assert len(doc["vcpus"]) == 2
    assert doc["stats"]["total"] == sum(v["total"] for v in doc["vcpus"])
    assert b"VM exits by vCPU" in proc.stderr


def test_timeout_stops_vcpus_that_wait_and_spin(build_guest, run_guest):
    """CPU 0 blocked in smp_wait (outside the guest), CPU 1 spinning at CPL3: both stop."""
    src = r"""
#include <kvmpy.h>
#include <kvmpy/smp.h>
static void spin(void *a) { (void)a; for (;;) smp_relax(); }
int main(void) { smp_start(1, spin, 0); smp_wait(2); return 0; }
"""
    t0 = time.monotonic()
    result = run_guest(build_guest(src), vcpus=2, memory="16M", timeout=0.5)
    assert result.stop_reason is StopReason.TIMEOUT
    assert time.monotonic() - t0 < 10


def test_pause_reads_every_vcpu_in_its_own_thread(gcc_available):
    image = find_example("smp-chain").build()
    with Machine(MachineConfig(mode="long-user", memory="64M", vcpus=4)) as m:
        m.load_file(image)
        seen = {}

        def controller():
            while m.output.count(b"\n") < 5:
                time.sleep(0.001)
            m.pause()
            for i in range(4):
                seen[i] = m.vcpu_call(i, lambda: threading.current_thread().name)
            m.request_stop(StopReason.INTERRUPTED, "done")
            m.resume()

        t = threading.Thread(target=controller)
        t.start()
        result = m.run(timeout=60)
        t.join()
    assert result.stop_reason is StopReason.INTERRUPTED
    assert seen == {i: f"vm-vcpu{i}" for i in range(4)}


def test_smp_state_round_trip_keeps_every_field():
    """What a snapshot records of the SMP layer comes back whole: a start caught before its
    vCPU loaded the registers included (losing it left that vCPU parked after a restore)."""
    from kvmpy.vmm.smp import SmpState

    a = SmpState([None] * 3)
    a.parked = [False, False, True]
    a.waiting = [0b110, 0, 0]
    a._pending[1] = (0x401000, (7, 8))
    a.kicked[2] = True
    a.kick_waiting[1] = True
    b = SmpState([None] * 3)
    b.restore(a.state())
    assert b.state() == a.state()
    assert b._pending[1] == (0x401000, (7, 8))
