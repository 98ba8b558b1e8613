"""SMP VMs on the scheduler: every vCPU of one or several VMs multiplexed on one host thread.

The guests check their own results (smp-sum's counter and barrier, smp-chain's deterministic
output); the scheduler must start, park, block and resume vCPUs exactly as the vCPU threads do.
"""

from __future__ import annotations

import os
import threading
from contextlib import ExitStack

import pytest

from kvmpy.machine import Machine, MachineConfig
from kvmpy.result import StopReason
from kvmpy.sched import SchedError, SchedPolicy, Scheduler, SchedVM
from kvmpy.sdk.examples import find_example

pytestmark = pytest.mark.kvm

# Every vCPU counts in the shared progress page, forever.
SMP_COUNTER = r"""
#include <kvmpy.h>
#include <kvmpy/smp.h>
#include <kvmpy/sched.h>
KVMPY_DEFINE_PROGRESS;
static void count(void *a)
{
	(void)a;
	for (;;) {
		for (volatile uint32_t i = 0; i < (1u << 12); i++)
			;
		__atomic_fetch_add(&kvmpy_progress.count, 1, __ATOMIC_RELAXED);
	}
}
int main(void)
{
	for (uint32_t i = 1; i < smp_num_cpus(); i++)
		smp_start(i, count, 0);
	count(0);
	return 0;
}
"""

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

FAULT_ON_CPU2 = r"""
#include <kvmpy.h>
#include <kvmpy/smp.h>
static void crash(void *a) { (void)a; *(volatile uint64_t *)0x7ead00000000UL = 1; }
int main(void)
{
	smp_start(2, crash, 0);
	for (;;)
		smp_relax();
}
"""

# CPU 1 waits for CPU 0 to park, which it never does; CPU 0 waits for CPU 1.
DEADLOCK = r"""
#include <kvmpy.h>
#include <kvmpy/smp.h>
static void waits_for_cpu0(void *a) { (void)a; smp_wait(1); }
int main(void)
{
	smp_start(1, waits_for_cpu0, 0);
	smp_wait(2);
	return 0;
}
"""


@pytest.fixture
def machines(kvm):
    """machines((image, vcpus), ...) -> Machines with those images loaded, and their outputs."""
    with ExitStack() as stack:

        def make(*specs, memory="64M"):
            out, outputs = [], []
            for image, vcpus in specs:
                buf = bytearray()
                m = stack.enter_context(
                    Machine(
                        MachineConfig(mode="long-user", memory=memory, vcpus=vcpus),
                        kvm=kvm,
                        console=buf.extend,
                        capture_output=False,
                    )
                )
                m.load_file(image)
                out.append(m)
                outputs.append(buf)
            return out, outputs

        yield make


@pytest.fixture(scope="module")
def chain_reference(gcc_available):
    """smp-chain's output on 2 vCPUs in their own threads: what every schedule must print."""
    with Machine(MachineConfig(mode="long-user", memory="64M", vcpus=2)) as m:
        m.load_file(find_example("smp-chain").build())
        result = m.run(timeout=120)
    assert result.stop_reason is StopReason.EXIT and result.exit_code == 0
    return result.output


@pytest.mark.parametrize("policy", ["timer", "weighted"])
@pytest.mark.parametrize("vcpus", [2, 4])
def test_smp_sum_on_one_thread_is_exact(machines, policy, vcpus):
    (m,), (out,) = machines((find_example("smp-sum").build(), vcpus))
    # A short quantum: smp-sum's ticket lock hands over once per slice when its next owner
    # is descheduled (lock-waiter preemption), so 8000 increments need many slices.
    result = Scheduler([m], policy, quantum=0.0005).run(120)
    (vm,) = result.vms
    text = out.decode()
    assert vm.state == "exit" and vm.exit_code == 0, (vm.message, text)
    assert f"counter {2000 * vcpus} of {2000 * vcpus}" in text and "smp-sum: OK" in text
    assert f"cpus that ran {vcpus} of {vcpus}" in text
    assert [c.cpu for c in vm.vcpus] == list(range(vcpus))
    assert all(c.slices > 0 and c.cpu_s > 0 for c in vm.vcpus)
    assert sum(c.cpu_s for c in vm.vcpus) == pytest.approx(vm.cpu_s)
    assert sum(c.slices for c in vm.vcpus) == vm.slices
    assert result.vms[0].to_dict()["vcpus"][1]["cpu"] == 1


@pytest.mark.parametrize("policy", ["on-io", "timer", "weighted"])
def test_smp_chain_on_one_thread_prints_what_threads_print(machines, chain_reference, policy):
    (m,), (out,) = machines((find_example("smp-chain").build(), 2))
    result = Scheduler([m], policy, quantum=0.002).run(120)
    (vm,) = result.vms
    assert vm.state == "exit" and vm.exit_code == 0, vm.message
    assert bytes(out) == chain_reference
    # CPU 0 waits in smp_wait while CPU 1 works: it is skipped, not spun.
    cpu0, cpu1 = vm.vcpus
    assert cpu1.slices >= 500 and cpu1.exits >= 500  # a start and a park per step


def test_on_io_a_spinning_vcpu_keeps_the_cpu(machines):
    """smp-sum's CPUs wait for each other by spinning at CPL3 (its barrier): under on-io the
    first to spin never exits, so nobody else runs; the lesson of `--vm spin`, per vCPU."""
    (m,), _ = machines((find_example("smp-sum").build(), 2))
    result = Scheduler([m], "on-io").run(0.5)
    (vm,) = result.vms
    assert vm.state == "running" and vm.slices <= 10


def test_two_smp_vms_share_the_cpu_by_weight(build_guest, machines):
    image = build_guest(SMP_COUNTER)
    vms, _ = machines((image, 2), (image, 3), memory="16M")
    result = Scheduler(vms, "weighted", weights=[3, 1], quantum=0.002).run(1.0)
    a, b = result.vms
    assert (a.target_share, b.target_share) == (0.75, 0.25)
    # The VM's weight is the VM's share, whatever its vCPU count; its vCPUs split it.
    assert a.host_share == pytest.approx(0.75, abs=0.05)
    assert b.host_share == pytest.approx(0.25, abs=0.05)
    for vm, n in ((a, 2), (b, 3)):
        assert len(vm.vcpus) == n and all(c.state == "running" for c in vm.vcpus)
        for c in vm.vcpus:
            assert c.host_share == pytest.approx(vm.host_share / n, abs=0.04)
    assert a.progress > 0 and b.progress > 0


@pytest.mark.parametrize("policy", ["timer", "threads"])
def test_a_stop_on_a_secondary_stops_its_vm_and_names_the_vcpu(build_guest, machines, policy):
    (vm_exit, vm_fault, neo), _ = machines(
        (build_guest(EXIT_FROM_CPU1), 3),
        (build_guest(FAULT_ON_CPU2), 3),
        (find_example("neo").build(), 1),
        memory="16M",
    )
    result = Scheduler([vm_exit, vm_fault, neo], policy, quantum=0.002).run(1.0)
    ex, fault, n = result.vms
    assert ex.state == "exit" and ex.exit_code == 7 and ex.stop_cpu == 1
    assert fault.state == "exception" and fault.stop_cpu == 2
    assert "#PF page fault" in fault.message and "0x7ead00000000" in fault.message
    assert fault.to_dict()["stop_cpu"] == 2
    assert n.state == "running" and n.progress > 0 and n.stop_cpu is None


def test_a_vm_whose_vcpus_all_wait_stops_with_deadlock(build_guest, machines, run_guest):
    image = build_guest(DEADLOCK)
    (m, neo), _ = machines((image, 2), (find_example("neo").build(), 1), memory="16M")
    result = Scheduler([m, neo], "timer", quantum=0.002).run(0.5)
    dead, alive = result.vms
    assert dead.state == "deadlock" and "none can wake" in dead.message
    assert alive.state == "running"
    # In vCPU threads too: the last thread to block sees it.
    r = run_guest(image, vcpus=2, timeout=10)
    assert r.stop_reason is StopReason.DEADLOCK


def test_threads_runs_each_vcpu_in_a_thread_pinned_to_the_cpus(machines):
    (m,), (out,) = machines((find_example("smp-sum").build(), 2))
    cpus = sorted(os.sched_getaffinity(0))
    seen = {}
    for v in m.vcpus:
        original = v.run

        def spy(original=original, index=v.index):
            seen[index] = (threading.get_ident(), frozenset(os.sched_getaffinity(0)))
            return original()

        v.run = spy
    result = Scheduler([m], "threads", cpu=cpus).run(120)
    (vm,) = result.vms
    assert vm.state == "exit" and vm.exit_code == 0 and "smp-sum: OK" in out.decode()
    assert len({ident for ident, _ in seen.values()}) == 2
    assert threading.get_ident() not in {ident for ident, _ in seen.values()}
    assert all(aff == frozenset(cpus) for _, aff in seen.values())
    assert result.cpus == cpus and len(vm.vcpus) == 2
    assert all(c.cpu_s > 0 and c.slices is None for c in vm.vcpus)


def test_a_threads_schedule_ends_without_stopping_the_vm(machines, chain_reference):
    """The threads baseline ends its vCPU threads, not the guest: a later schedule, on one
    thread this time, goes on where it left off."""
    (m,), (out,) = machines((find_example("smp-chain").build(), 2))
    sched = Scheduler([m], "threads")
    first = sched.run(0.3)
    assert first.vms[0].state == "running"
    assert 0 < out.count(b"\n") < chain_reference.count(b"\n")
    second = Scheduler([m], "weighted", quantum=0.002).run(120)
    assert second.vms[0].state == "exit" and second.vms[0].exit_code == 0
    assert bytes(out) == chain_reference


class Lottery(SchedPolicy):
    """A policy of one's own: a lottery among the runnable vCPUs, tickets by VM weight."""

    name = "lottery"

    def __init__(self, seed=1):
        import random

        self.rng = random.Random(seed)
        self.picks = []

    def pick(self, runnable, prev):
        v = self.rng.choices(runnable, weights=[r.weight for r in runnable])[0]
        self.picks.append(v)
        return v


def test_a_policy_of_ones_own(machines):
    (m,), (out,) = machines((find_example("smp-sum").build(), 2))
    policy = Lottery()
    result = Scheduler([m], policy, quantum=0.0005).run(120)
    assert result.policy == "lottery" and result.quantum_s == 0.0005
    assert result.vms[0].state == "exit" and "smp-sum: OK" in out.decode()
    assert {str(v) for v in policy.picks} == {"smp-sum/cpu0", "smp-sum/cpu1"}
    assert [v.cpu for v in policy.vcpus] == [0, 1]


class Stubborn(SchedPolicy):
    def pick(self, runnable, prev):
        return self.vcpus[1]  # parked at first


def test_a_policy_that_picks_a_blocked_vcpu_is_refused(machines):
    (m,), _ = machines((find_example("smp-sum").build(), 2))
    with pytest.raises(SchedError, match="picked smp-sum/cpu1, which cannot run now"):
        Scheduler([m], Stubborn()).run(1.0)


def test_a_policy_must_be_a_name_or_an_object(machines):
    (m,), _ = machines((find_example("smp-sum").build(), 2))
    with pytest.raises(SchedError, match="a policy is a name"):
        Scheduler([SchedVM(m)], object())


# --- several host CPUs: one loop per CPU ------------------------------------------------------

TWO_CPUS = sorted(os.sched_getaffinity(0))[-2:]
needs_two = pytest.mark.skipif(len(TWO_CPUS) < 2, reason="needs two host CPUs")


@needs_two
@pytest.mark.parametrize("policy", ["on-io", "timer", "weighted"])
def test_smp_chain_on_two_loops_prints_what_threads_print(machines, chain_reference, policy):
    (m,), (out,) = machines((find_example("smp-chain").build(), 2))
    result = Scheduler([m], policy, quantum=0.002, cpu=TWO_CPUS).run(120)
    (vm,) = result.vms
    assert vm.state == "exit" and vm.exit_code == 0, vm.message
    assert bytes(out) == chain_reference
    assert result.cpu is None and result.cpus == TWO_CPUS


@needs_two
def test_smp_sum_on_two_loops_is_exact(machines):
    (m,), (out,) = machines((find_example("smp-sum").build(), 4))
    seen = {}
    for v in m.vcpus:
        original = v.run

        def spy(original=original, index=v.index):
            seen.setdefault(index, set()).add(threading.get_ident())
            return original()

        v.run = spy
    result = Scheduler([m], "timer", quantum=0.0005, cpu=TWO_CPUS).run(120)
    assert result.vms[0].state == "exit" and "smp-sum: OK" in out.decode()
    # vCPUs 0 and 2 on one loop thread, 1 and 3 on the other; neither is the main thread.
    assert all(len(t) == 1 for t in seen.values())
    assert seen[0] == seen[2] and seen[1] == seen[3] and seen[0] != seen[1]
    assert threading.get_ident() not in seen[0] | seen[1]
    assert result.switch_cost_us is not None


@needs_two
def test_a_stop_on_one_loop_stops_the_vms_vcpus_on_the_other(build_guest, machines):
    """CPU 1 (second loop) exits while CPU 0 and 2 (first loop) spin: the run ends at once."""
    (m,), _ = machines((build_guest(EXIT_FROM_CPU1), 3), memory="16M")
    result = Scheduler([m], "timer", quantum=0.05, cpu=TWO_CPUS).run(30)
    vm = result.vms[0]
    assert (vm.state, vm.exit_code, vm.stop_cpu) == ("exit", 7, 1)
    assert result.duration_s < 5


@needs_two
def test_a_policy_of_ones_own_is_copied_per_cpu(machines):
    (m,), (out,) = machines((find_example("smp-sum").build(), 2))
    policy = Lottery()
    result = Scheduler([m], policy, quantum=0.0005, cpu=TWO_CPUS).run(120)
    assert result.vms[0].state == "exit" and "smp-sum: OK" in out.decode()
    assert policy.picks == []  # each loop used its own copy
