"""Scheduling real VMs on one host thread: every policy, preemption, shares, VMs that stop.

Runs are short (a few tenths of a second). Nothing here asserts speed; the shares are checked
against loose bounds only where the policy promises them (accuracy is `kvmpy bench sched`'s).
"""

from __future__ import annotations

import threading
from contextlib import ExitStack

import pytest

from kvmpy.kvm.constants import ExitReason
from kvmpy.machine import Machine, MachineConfig
from kvmpy.result import StopReason
from kvmpy.sched import Policy, SchedError, Scheduler, SchedVM, plot

# Counts in its progress page with an I/O point every 2^20 iterations, then touches unmapped
# memory: a #PF that stops the VM in the middle of a schedule.
FAULTS_AFTER_A_WHILE = """
#include <kvmpy.h>
#include <kvmpy/sched.h>
KVMPY_DEFINE_PROGRESS;
int main(void)
{
	for (int k = 0; k < 6; k++) {
		for (uint32_t i = 0; i < (1u << 20); i++)
			kvmpy_progress_add(1);
		kvmpy_io_point();
	}
	*(volatile uint64_t *)0x7000000000ull = 1;
	return 0;
}
"""

# Counts a little, then returns EXIT_CODE from main: the exit hypercall.
EXITS_AFTER_A_WHILE = """
#include <kvmpy.h>
#include <kvmpy/sched.h>
KVMPY_DEFINE_PROGRESS;
int main(void)
{
	for (int k = 0; k < 4; k++) {
		for (uint32_t i = 0; i < (1u << 20); i++)
			kvmpy_progress_add(1);
		kvmpy_io_point();
	}
	return EXIT_CODE;
}
"""


@pytest.fixture(scope="session")
def example(gcc_available):
    from kvmpy.sdk.examples import find_example

    return lambda name: find_example(name).build()


@pytest.fixture
def machines(kvm):
    """machines(*images) -> Machines with those images loaded (closed after the test)."""
    with ExitStack() as stack:

        def make(*images, mode="long-user"):
            out = []
            for image in images:
                m = stack.enter_context(Machine(MachineConfig(mode=mode, memory="16M"), kvm=kvm))
                m.load_file(image)
                out.append(m)
            return out

        yield make


# --- the policies --------------------------------------------------------------------------------


@pytest.mark.kvm
def test_on_io_switches_at_every_port_io_exit(example, machines):
    vms = machines(example("io-heavy"), example("io-heavy"))
    before = [m.vcpus[0].stats.counts[ExitReason.IO] for m in vms]
    result = Scheduler(vms, "on-io").run(0.3)
    ios = [m.vcpus[0].stats.counts[ExitReason.IO] - b for m, b in zip(vms, before, strict=True)]
    a, b = result.vms
    assert (a.name, b.name) == ("io-heavy", "io-heavy-2")
    for vm, n in zip(result.vms, ios, strict=True):
        # Every slice but the last ended at the VM's own I/O exit, and each exit ended one.
        assert vm.slices - 1 <= n <= vm.slices
        assert vm.progress > 0 and vm.state == "running"
    # Strict alternation: each VM is switched to once per slice of the other.
    assert abs(a.switches - b.switches) <= 1 and a.switches > 10
    assert result.switch_cost_us is not None and result.exit_latency_us is None
    assert result.quantum_s is None
    # The vCPUs are as they were before the schedule.
    assert not vms[0].vcpus[0].yield_on_io and not vms[0].vcpus[0].exact_timing


@pytest.mark.kvm
def test_on_io_a_vm_that_never_exits_keeps_the_cpu(example, machines):
    """The lesson of switching on I/O only: the spinner goes first and nobody else runs."""
    vms = machines(example("spin"), example("neo"))
    result = Scheduler(vms, "on-io").run(0.3)
    spin, neo = result.vms
    assert spin.slices == 1 and spin.progress > 0 and spin.host_share == 1.0
    assert neo.slices == 0 and neo.progress == 0 and result.switches == 0


@pytest.mark.kvm
def test_timer_preempts_a_vm_that_never_exits(example, machines):
    vms = machines(example("spin"), example("neo"))
    result = Scheduler(vms, "timer", quantum=0.01).run(0.4)
    spin, neo = result.vms
    assert spin.slices >= 3 and spin.switches >= 2  # taken off the CPU and given it back
    assert neo.progress > 0 and spin.progress > 0
    # Round robin: slices alternate, so they differ by at most one.
    assert abs(spin.slices - neo.slices) <= 1
    assert result.exit_latency_us is not None and result.quantum_s == 0.01
    assert spin.target_share == neo.target_share == 0.5


@pytest.mark.kvm
@pytest.mark.parametrize("weights", [(7, 3), (5, 3, 2)])
def test_weighted_shares_within_a_loose_bound(example, machines, weights):
    names = ["neo", "morpheus", "neo"][: len(weights)]
    vms = machines(*(example(n) for n in names))
    result = Scheduler(vms, "weighted", weights=weights, quantum=0.005).run(0.8)
    total = sum(weights)
    for vm, w in zip(result.vms, weights, strict=True):
        assert vm.target_share == pytest.approx(w / total)
        # The deficit scheduler charges measured time, so host shares hold on a noisy host;
        # progress follows them because neo and morpheus run the same loop.
        assert vm.host_share == pytest.approx(w / total, abs=0.05)
        assert vm.progress_share == pytest.approx(w / total, abs=0.08)
    assert sum(v.host_share for v in result.vms) == pytest.approx(1.0)
    assert [v.name for v in result.vms][-1] == ("neo-2" if len(weights) == 3 else "morpheus")


@pytest.mark.kvm
@pytest.mark.parametrize("weights,nices", [((1, 1), [0, 0]), ((7, 3), [0, 4])])
def test_threads_runs_each_vcpu_in_its_own_thread(example, machines, weights, nices):
    vms = machines(example("spin"), example("spin"))
    seen = []
    for m in vms:
        original = m.vcpus[0].run

        def spy(original=original):
            seen.append(threading.get_ident())
            return original()

        m.vcpus[0].run = spy
    result = Scheduler(vms, "threads", weights=weights).run(0.3)
    assert len(set(seen)) == 2 and threading.get_ident() not in seen
    assert [v.nice for v in result.vms] == nices
    for vm in result.vms:
        assert vm.progress > 0 and vm.host_s > 0 and vm.slices is None
        assert vm.state == "running"
    assert result.switch_cost_us is None and result.quantum_s is None
    assert sum(v.host_share for v in result.vms) == pytest.approx(1.0)


# --- VMs that stop -------------------------------------------------------------------------------


@pytest.mark.kvm
@pytest.mark.parametrize("policy", [p.value for p in Policy])
def test_a_vm_that_faults_leaves_the_rotation_and_the_others_continue(
    build_guest, example, machines, policy
):
    vms = machines(build_guest(FAULTS_AFTER_A_WHILE), example("neo"))
    result = Scheduler(vms, policy, quantum=0.002, names=["faulty", "neo"]).run(0.6)
    faulty, neo = result.vms
    assert faulty.state == "exception"
    assert "#PF page fault" in faulty.message and "0x7000000000" in faulty.message
    assert faulty.stopped_at_s is not None
    assert neo.state == "running"
    # neo made progress after the fault: compare the timeline before and after it.
    tl = result.timeline
    k = next(i for i, t in enumerate(tl.t_s) if t >= faulty.stopped_at_s)
    assert tl.progress[1][-1] > tl.progress[1][k]
    assert tl.progress[0][-1] == tl.progress[0][k]  # the faulted VM did nothing more


@pytest.mark.kvm
@pytest.mark.parametrize("policy", ["timer", "threads"])
def test_the_run_ends_when_every_vm_has_stopped(build_guest, machines, policy):
    a = build_guest(EXITS_AFTER_A_WHILE.replace("EXIT_CODE", "3"))
    b = build_guest(EXITS_AFTER_A_WHILE.replace("EXIT_CODE", "4"))
    vms = machines(a, b)
    result = Scheduler(vms, policy, quantum=0.001).run()  # no duration: until all stop
    assert [v.state for v in result.vms] == ["exit", "exit"]
    assert [v.exit_code for v in result.vms] == [3, 4]
    assert result.duration_limit_s is None
    assert [v.progress for v in result.vms] == [4 << 20, 4 << 20]
    assert result.vms[0].progress_share == pytest.approx(0.5)


@pytest.mark.kvm
@pytest.mark.parametrize("policy", ["timer", "threads"])
def test_stopped_vms_stay_out_of_later_runs(build_guest, example, machines, policy):
    vms = machines(build_guest(EXITS_AFTER_A_WHILE.replace("EXIT_CODE", "0")), example("neo"))
    sched = Scheduler(vms, policy, quantum=0.002)
    first = sched.run(0.3)
    assert first.vms[0].state == "exit"
    exits = vms[0].vcpus[0].stats.total
    second = sched.run(0.1)
    assert second.vms[0].state == "exit" and second.vms[0].host_s == 0
    assert vms[0].vcpus[0].stats.total == exits  # not entered again
    assert second.vms[1].host_s > 0


# --- Ctrl-C, the live view, the plot -------------------------------------------------------------


@pytest.mark.kvm
@pytest.mark.parametrize("policy", ["on-io", "weighted", "threads"])
def test_interrupt_ends_the_schedule_with_a_summary(example, machines, policy):
    vms = machines(example("spin"), example("neo"))
    sched = Scheduler(vms, policy)
    ticks = []

    def on_tick(snapshot):
        ticks.append(snapshot)
        if len(ticks) == 2:
            sched.interrupt()  # what the SIGINT handler does

    result = sched.run(30, on_tick=on_tick, tick_interval=0.05)
    assert result.interrupted and len(ticks) == 2
    assert result.duration_s < 30
    assert all(v.state == "running" for v in result.vms)
    assert result.vms[0].host_s > 0
    assert ticks[1].duration_s >= ticks[0].duration_s


@pytest.mark.kvm
def test_display_ticks_pause_without_switching(example, machines):
    """Under on-io a tick interrupts the spinner to redraw, then resumes the same VM."""
    vms = machines(example("spin"), example("neo"))
    ticks = []
    result = Scheduler(vms, "on-io").run(0.4, on_tick=ticks.append, tick_interval=0.05)
    assert len(ticks) >= 3
    assert result.switches == 0 and result.vms[1].progress == 0
    assert [t.vms[0].cpu_s for t in ticks] == sorted(t.vms[0].cpu_s for t in ticks)


@pytest.mark.kvm
def test_plot_is_written(example, machines, tmp_path):
    vms = machines(example("neo"), example("morpheus"))
    result = Scheduler(vms, "weighted", weights=[7, 3]).run(0.2)
    assert len(result.timeline.t_s) >= 5
    path = plot(result, tmp_path / "shares.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SchedError, match="must end in"):
        plot(result, tmp_path / "shares.txt")


@pytest.mark.kvm
def test_result_to_dict_has_the_documented_fields(example, machines):
    vms = machines(example("neo"), example("morpheus"))
    doc = Scheduler(vms, "weighted", weights=[7, 3], quantum=0.002).run(0.2).to_dict()
    assert {"policy", "quantum_s", "duration_s", "vms", "switch_cost_us"} <= set(doc)
    assert doc["policy"] == "weighted" and doc["quantum_s"] == 0.002
    for vm in doc["vms"]:
        assert {"name", "target_share", "host_share", "progress_share", "switches"} <= set(vm)
    assert [vm["target_share"] for vm in doc["vms"]] == [0.7, 0.3]
    assert doc["switch_cost_us"] > 0


# --- the progress page and bad input -------------------------------------------------------------


@pytest.mark.kvm
def test_a_guest_without_a_progress_page_has_no_progress_share(assemble, example, kvm, machines):
    from kvmpy.loader import load_raw

    (neo,) = machines(example("neo"))
    with Machine(MachineConfig(mode="long-user", memory="16M"), kvm=kvm) as raw:
        raw.load(load_raw(assemble("1: jmp 1b")))
        result = Scheduler([raw, neo], "timer", quantum=0.005).run(0.1)
    spinner, neo_report = result.vms
    assert spinner.name == "vm0" and spinner.progress is None and spinner.progress_share is None
    assert neo_report.progress_share == 1.0  # the only VM that reports progress
    assert spinner.host_s > 0


@pytest.mark.kvm
@pytest.mark.parametrize(
    "definition,message",
    [
        # An odd address: a load could straddle a page.
        ('__asm__(".data\\n.byte 0\\n.globl kvmpy_progress\\nkvmpy_progress: .quad 0");',
         "not 8-byte aligned"),
        # Outside guest RAM.
        ('__asm__(".globl kvmpy_progress\\n.set kvmpy_progress, 0x7000000000");',
         "not in guest RAM"),
    ],
)  # fmt: skip
def test_a_bad_progress_symbol_is_refused(build_guest, machines, definition, message):
    source = f"#include <kvmpy.h>\n{definition}\nint main(void) {{ for (;;); }}\n"
    vms = machines(build_guest(source))
    with pytest.raises(SchedError, match=message):
        Scheduler(vms, "timer")


@pytest.mark.kvm
def test_progress_page_may_be_given_by_address(example, machines):
    (neo,) = machines(example("neo"))
    gpa = neo.image.symbols["kvmpy_progress"]
    result = Scheduler([SchedVM(neo, 1.0, "x", progress_gpa=gpa)], "timer").run(0.05)
    assert result.vms[0].name == "x" and result.vms[0].progress > 0
    with pytest.raises(SchedError, match="not in guest RAM"):
        Scheduler([SchedVM(neo, progress_gpa=1 << 40)], "timer")


@pytest.mark.kvm
def test_usage_errors(example, machines, kvm):
    neo, morpheus = machines(example("neo"), example("morpheus"))
    with pytest.raises(SchedError, match="no VMs"):
        Scheduler([], "timer")
    with pytest.raises(SchedError, match="positive"):
        Scheduler([neo, morpheus], "weighted", weights=[1, 0])
    with pytest.raises(SchedError, match="positive"):
        Scheduler([neo, morpheus], "weighted", weights=[1, -3])
    with pytest.raises(SchedError, match="2 weights for 1 VMs"):
        Scheduler([neo], "weighted", weights=[1, 2])
    with pytest.raises(SchedError, match="quantum must be at least"):
        Scheduler([neo], "timer", quantum=0)
    with pytest.raises(SchedError, match="listed twice"):
        Scheduler([neo, neo], "timer")
    with pytest.raises(SchedError, match="unknown scheduling policy"):
        Scheduler([neo], "lottery")
    with pytest.raises(SchedError, match="duration must be positive"):
        Scheduler([neo], "timer").run(0)
    with (
        Machine(MachineConfig(mode="long-user", memory="16M"), kvm=kvm) as empty,
        pytest.raises(SchedError, match="load an image"),
    ):
        Scheduler([empty], "timer")
    errors = []
    t = threading.Thread(target=lambda: _catch(errors, Scheduler([neo], "timer").run, 0.1))
    t.start()
    t.join()
    assert errors and "main thread" in str(errors[0])


def _catch(errors, fn, *args):
    try:
        fn(*args)
    except SchedError as e:
        errors.append(e)


@pytest.mark.kvm
def test_stop_reasons_are_reported_as_such(build_guest, machines):
    (vm,) = machines(build_guest(EXITS_AFTER_A_WHILE.replace("EXIT_CODE", "9")))
    result = Scheduler([vm], "on-io").run(5)
    (r,) = result.vms
    assert r.state == StopReason.EXIT.value and r.exit_code == 9
    assert r.to_dict()["exit_code"] == 9 and "stopped_at_s" in r.to_dict()
