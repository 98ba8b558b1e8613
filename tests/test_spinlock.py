"""kvmpy/spinlock.h and the wait/kick/yield hypercalls: argument checks, kicks that come
before the wait, the locks' exactness under every driver, directed yield and holder grace."""

from __future__ import annotations

import struct
from contextlib import ExitStack

import pytest

from kvmpy.machine import Machine, MachineConfig
from kvmpy.result import StopReason
from kvmpy.sched import Scheduler
from kvmpy.sdk.examples import find_example

pytestmark = pytest.mark.kvm

BAD_ARGUMENTS = r"""
#include <kvmpy.h>
#include <kvmpy/smp.h>
#include <kvmpy/spinlock.h>
static volatile uint32_t word = 5;
static void idle(void *a) { (void)a; }
int main(void)
{
	long r[12];
	r[0] = kvmpy_hypercall(KVMPY_HC_VCPU_WAIT, (unsigned long)&word + 1, 5, 0, 0);
	r[1] = kvmpy_hypercall(KVMPY_HC_VCPU_WAIT, 0x7000000000ul, 5, 0, 0);
	r[2] = kv_vcpu_wait(&word, 6);                              /* changed: -EAGAIN */
	r[3] = kvmpy_hypercall(KVMPY_HC_VCPU_WAIT, (unsigned long)&word, 5, 1, 0);
	r[4] = kv_vcpu_kick(2);                                     /* no such vCPU */
	r[5] = kvmpy_hypercall(KVMPY_HC_VCPU_KICK, 1ul << 32, 0, 0, 0);
	r[6] = kvmpy_hypercall(KVMPY_HC_VCPU_KICK, 1, 0, 0, 7);    /* reserved argument */
	r[7] = kv_vcpu_yield(0);                                    /* the caller */
	r[8] = kv_vcpu_yield(9);
	r[9] = kv_vcpu_yield(KVMPY_YIELD_ANY);
	r[10] = kvmpy_hypercall(KVMPY_HC_VCPU_YIELD, ~0ul, 0, 0, 0); /* 64-bit all ones: any */
	smp_start(1, idle, 0);
	smp_wait(2);
	r[11] = kv_vcpu_yield(1);                                   /* a parked vCPU: fine */
	for (int i = 0; i < 12; i++)
		kv_printf("%ld ", r[i]);
	kv_printf("\n");
	return 0;
}
"""

# CPU 1 kicks CPU 0 before CPU 0 waits: the wait must return at once (the kick is kept, and
# spent: the second wait needs the second kick). Then 300 rounds of ping-pong where each
# side waits for the other's kick: a lost wakeup would block both (a deadlock stop).
KICK_BEFORE_WAIT = r"""
#include <kvmpy.h>
#include <kvmpy/smp.h>
#include <kvmpy/spinlock.h>
#define ROUNDS 300
static volatile uint32_t kicked, turn, second;
static void partner(void *a)
{
	(void)a;
	kv_vcpu_kick(0);
	kicked = 1;
	while (!second)
		smp_relax();
	kv_vcpu_kick(0);
	for (uint32_t r = 0; r < ROUNDS; r++) {
		while (__atomic_load_n(&turn, __ATOMIC_ACQUIRE) != 2 * r + 1)
			kv_vcpu_wait(&turn, 2 * r);
		__atomic_store_n(&turn, 2 * r + 2, __ATOMIC_RELEASE);
		kv_vcpu_kick(0);
	}
}
int main(void)
{
	smp_start(1, partner, 0);
	while (!kicked)
		smp_relax();
	long first = kv_vcpu_wait(0, 0);        /* the kick came first */
	second = 1;
	long again = kv_vcpu_wait(0, 0);        /* the second kick */
	for (uint32_t r = 0; r < ROUNDS; r++) {
		__atomic_store_n(&turn, 2 * r + 1, __ATOMIC_RELEASE);
		kv_vcpu_kick(1);
		while (__atomic_load_n(&turn, __ATOMIC_ACQUIRE) != 2 * r + 2)
			kv_vcpu_wait(&turn, 2 * r + 1);
	}
	smp_wait(2);
	kv_printf("%ld %ld %u\n", first, again, turn);
	return 0;
}
"""

WAIT_ALONE = r"""
#include <kvmpy.h>
#include <kvmpy/spinlock.h>
int main(void) { kv_vcpu_wait(0, 0); return 0; }
"""

# CPU 1 runs once, then spins; CPU 0 waits until the scheduler marks CPU 1 preempted, then
# yields to it; CPU 1, running again, sees CPU 0 marked preempted in its turn.
DIRECTED_YIELD = r"""
#include <kvmpy.h>
#include <kvmpy/smp.h>
#include <kvmpy/spinlock.h>
static volatile uint32_t ran, yielded, saw;
static void spinner(void *a)
{
	(void)a;
	ran = 1;
	while (!yielded)
		smp_relax();
	saw = kv_cpu_preempted(0);
	hc_exit(saw ? 0 : 3);
}
int main(void)
{
	smp_start(1, spinner, 0);
	while (!ran || !kv_cpu_preempted(1))
		smp_relax();
	yielded = 1;
	long r = kv_vcpu_yield(1);
	for (;;)
		smp_relax();
	return (int)r;
}
"""

LOCKS = {"ticket": 0, "pv": 1, "pvticket": 2}


@pytest.fixture
def machine(kvm):
    with ExitStack() as stack:

        def make(image, vcpus, memory="64M"):
            out = bytearray()
            m = stack.enter_context(
                Machine(
                    MachineConfig(mode="long-user", memory=memory, vcpus=vcpus),
                    kvm=kvm,
                    console=out.extend,
                    capture_output=False,
                )
            )
            m.load_file(image)
            return m, out

        yield make


def test_bad_arguments_are_refused(build_guest, run_guest):
    result = run_guest(build_guest(BAD_ARGUMENTS), vcpus=2)
    assert result.stop_reason is StopReason.EXIT, result.message
    assert result.output.split() == [
        b"-22",  # misaligned
        b"-14",  # not mapped
        b"-11",  # the word changed: nothing to wait for
        b"-22",  # reserved argument
        b"-22",
        b"-22",
        b"-22",
        b"-22",  # yield to oneself
        b"-22",
        b"0",
        b"0",
        b"0",
    ]


@pytest.mark.parametrize("driver", ["threads", "timer"])
def test_a_kick_before_the_wait_is_not_lost(build_guest, machine, driver):
    m, out = machine(build_guest(KICK_BEFORE_WAIT), 2, "16M")
    if driver == "threads":
        r = m.run(timeout=60)
        state, code = r.stop_reason.value, r.exit_code
    else:
        vm = Scheduler([m], driver, quantum=0.002).run(60).vms[0]
        state, code = vm.state, vm.exit_code
    assert (state, code) == ("exit", 0), out.decode()
    assert out.split() == [b"0", b"0", b"600"]
    smp = m.smp
    assert smp.waits[0] >= 2 and smp.kicks[1] >= 2


@pytest.mark.parametrize("driver", ["threads", "timer"])
def test_a_wait_nobody_will_kick_is_a_deadlock(build_guest, machine, driver):
    m, _ = machine(build_guest(WAIT_ALONE), 1, "16M")
    if driver == "threads":
        assert m.run(timeout=30).stop_reason is StopReason.DEADLOCK
    else:
        assert Scheduler([m], driver).run(30).vms[0].state == "deadlock"


def configure(m, lock, *, cs=50, think=500, rounds=0, spin_us=50.0, yield_to_holder=False):
    """Write the lhp example's control block and kvmpy/spinlock.h's configuration."""
    sym = m.image.symbols
    khz = m.vcpus[0].fd.get_tsc_khz()
    gap = khz * 20 // 1000
    m.memory.write(
        sym["lhp_control"], struct.pack("<IIIIQQ", LOCKS[lock], cs, think, 0, rounds, gap)
    )
    m.memory.write(
        sym["kv_spin_config"],
        struct.pack("<QQII", int(khz * spin_us / 1000), gap, int(yield_to_holder), 0),
    )


@pytest.mark.parametrize(
    "lock,driver,grace,yield_to_holder",
    [
        ("ticket", "threads", 0, False),
        ("ticket", "timer", 0, False),
        ("pv", "threads", 0, False),
        ("pv", "timer", 0, False),
        ("pv", "timer", 0, True),
        ("pv", "timer", 0.0002, True),
        ("pvticket", "threads", 0, False),
        ("pvticket", "timer", 0, False),
    ],
)
def test_every_lock_keeps_the_counter_exact(machine, lock, driver, grace, yield_to_holder):
    vcpus = 4
    m, out = machine(find_example("lhp").build(), vcpus)
    # Few rounds for the FIFO locks: on one CPU the naive one hands over about once per
    # slice, the paravirtual one once per pair of exits.
    rounds = {"ticket": 150, "pvticket": 3_000, "pv": 30_000}[lock]
    # Work enough for every vCPU to span several 1 ms slices: with less, a vCPU could finish
    # all its rounds inside one slice, uncontended, and nobody would wait.
    work = 3000 if lock == "pvticket" else 500
    configure(m, lock, cs=work, think=work, rounds=rounds, yield_to_holder=yield_to_holder)
    cpu = max(__import__("os").sched_getaffinity(0))
    r = Scheduler([m], driver, quantum=0.001, cpu=cpu, holder_grace=grace).run(120)
    vm = r.vms[0]
    text = out.decode()
    assert (vm.state, vm.exit_code) == ("exit", 0), text
    total = rounds * vcpus
    assert f"counter {total} of {total}" in text and "lhp: OK" in text
    stats = read_spin_stats(m, vcpus)
    assert [s[0] for s in stats] == [rounds] * vcpus  # acquires
    if lock != "ticket" and driver == "timer":
        # Holders were preempted (1 ms slices): their waiters slept or yielded to them.
        assert sum(s[4] + s[6] for s in stats) > 0
    if grace:
        assert sum(c.grace for c in vm.vcpus) > 0
        assert sum(c.yields for c in vm.vcpus) > 0  # stretched slices end with a yield


def read_spin_stats(m, n):
    base = m.image.symbols["kv_spin_stats"]
    return [struct.unpack("<8Q", m.memory.read(base + 64 * i, 64)) for i in range(n)]


def test_directed_yield_runs_the_named_vcpu_and_both_see_preempted(build_guest, machine):
    m, out = machine(build_guest(DIRECTED_YIELD), 2, "16M")
    r = Scheduler([m], "timer", quantum=0.002).run(30)
    vm = r.vms[0]
    assert (vm.state, vm.exit_code, vm.stop_cpu) == ("exit", 0, 1), vm.message
    cpu0, cpu1 = vm.vcpus
    assert cpu0.yields == 1 and cpu0.directed_yields == 1
    assert cpu1.directed_yields == 0


def test_the_scheduler_leaves_the_pv_words_clear(build_guest, machine):
    """preempted and yield_pending mean something only while kvmpy's scheduler runs."""
    from kvmpy.arch.x86.modes import PERCPU_PREEMPTED, PERCPU_SIZE, PERCPU_YIELD_PENDING

    m, _ = machine(find_example("lhp").build(), 2)
    configure(m, "pv")
    Scheduler([m], "timer", quantum=0.001, holder_grace=0.0005).run(0.2)
    for cpu in range(2):
        block = m.layout.percpu + cpu * PERCPU_SIZE
        assert m.memory.read_u32(block + PERCPU_PREEMPTED) == 0
        assert m.memory.read_u32(block + PERCPU_YIELD_PENDING) == 0
