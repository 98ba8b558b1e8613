"""The scheduler's pieces that need no KVM: policies, weights, units, figures, progress pages."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.memory import GuestMemory
from kvmpy.sched import (
    DeficitShares,
    Policy,
    ProgressCounter,
    RoundRobin,
    SchedError,
    Timeline,
    nice_values,
    parse_duration,
    target_shares,
)
from kvmpy.sched.policy import check_weights
from kvmpy.sched.report import Samples, format_seconds

# --- policies ------------------------------------------------------------------------------------


def test_policy_names():
    assert [p.value for p in Policy] == ["on-io", "timer", "weighted", "threads"]
    assert Policy.parse("on-io") is Policy.ON_IO
    with pytest.raises(SchedError, match="unknown scheduling policy 'fair'.*on-io, timer"):
        Policy.parse("fair")


@pytest.mark.parametrize(
    "weights,message",
    [
        ([], "no VMs"),
        ([1, 0], "positive"),
        ([-2], "positive"),
        ([float("nan")], "positive"),
        ([float("inf")], "positive"),
        (["heavy"], "not a number"),
        ([None], "not a number"),
    ],
)
def test_bad_weights(weights, message):
    with pytest.raises(SchedError, match=message):
        check_weights(weights)


def test_targets_follow_the_weights_only_where_the_policy_uses_them():
    assert target_shares(Policy.WEIGHTED, [7, 3]) == pytest.approx([0.7, 0.3])
    assert target_shares(Policy.THREADS, [5, 3, 2]) == pytest.approx([0.5, 0.3, 0.2])
    assert target_shares(Policy.TIMER, [7, 3]) == [0.5, 0.5]
    assert target_shares(Policy.ON_IO, [1, 1, 1]) == pytest.approx([1 / 3] * 3)


def test_round_robin_goes_round_and_skips_stopped_vms():
    rr = RoundRobin()
    assert rr.pick([0, 1, 2], None) == 0
    assert rr.pick([0, 1, 2], 0) == 1
    assert rr.pick([0, 1, 2], 2) == 0
    assert rr.pick([0, 2], 0) == 2  # VM 1 stopped
    assert rr.pick([0, 2], 1) == 2  # the one after a VM that just stopped
    assert rr.pick([1], 1) == 1


def run_deficit(weights, slices, stops=()):
    """Drive DeficitShares with given slice lengths; returns the picks and the lag of every
    VM (ideal share of the time so far minus time received) after every slice."""
    policy = DeficitShares(weights)
    runnable = list(range(len(weights)))
    ideal = [0.0] * len(weights)
    used = [0.0] * len(weights)
    picks, lags = [], []
    prev = None
    for step, ns in enumerate(slices):
        i = policy.pick(runnable, prev)
        picks.append(i)
        total = sum(weights[j] for j in runnable)
        for j in runnable:
            ideal[j] += ns * weights[j] / total
        used[i] += ns
        policy.charge(i, ns, runnable)
        lags.append([ideal[j] - used[j] for j in range(len(weights))])
        for j in runnable:
            assert policy.credit[j] == pytest.approx(ideal[j] - used[j], abs=1e-6 * (step + 1))
        prev = i
        if step in stops and len(runnable) > 1:
            runnable.remove(runnable[stops[step] % len(runnable)])
    return picks, lags, used


def test_deficit_70_30_gives_seven_slices_of_ten_and_never_two_in_a_row_to_the_light_vm():
    picks, _, used = run_deficit([7, 3], [1.0] * 100)
    assert picks.count(0) == 70 and picks.count(1) == 30
    for k in range(0, 100, 10):  # the pattern repeats every 10 slices
        assert picks[k : k + 10].count(1) == 3
    assert all(not (a == b == 1) for a, b in zip(picks, picks[1:], strict=False))


def test_deficit_equal_weights_alternate_like_round_robin():
    picks, _, _ = run_deficit([1, 1, 1], [1.0] * 9)
    assert picks == [0, 1, 2] * 3


def test_deficit_pays_back_an_overrun():
    # VM 0's first slice runs 3x too long: it then waits until the others have caught up.
    picks, lags, _ = run_deficit([1, 1], [3.0] + [1.0] * 6)
    assert picks[:4] == [0, 1, 1, 1]  # not [0, 1, 0, 1]: the 2-slice overrun is paid back
    assert lags[3] == pytest.approx([0.0, 0.0])


@settings(max_examples=60, deadline=None)
@given(
    weights=st.lists(st.floats(0.05, 100), min_size=1, max_size=6),
    overrun=st.floats(0.0, 0.5),
    seed=st.integers(0, 2**16),
    stop_at=st.dictionaries(st.integers(0, 399), st.integers(0, 5), max_size=3),
)
def test_deficit_lag_stays_bounded_however_long_the_run(weights, overrun, seed, stop_at):
    """Slices of a quantum plus random overruns (the timer's latency): every VM's lag behind
    its share stays within a few slices, never growing with the run's length."""
    import random

    rng = random.Random(seed)
    slices = [1.0 + rng.uniform(0, overrun) for _ in range(400)]
    _, lags, _ = run_deficit(weights, slices, stop_at)
    longest = 1.0 + overrun
    worst = max(abs(x) for step in lags for x in step)
    assert worst <= len(weights) * longest


def test_deficit_survivors_split_by_their_own_weights_after_a_stop():
    policy = DeficitShares([5, 3, 2])
    runnable = [0, 1, 2]
    prev = None
    for _ in range(50):
        i = policy.pick(runnable, prev)
        policy.charge(i, 1.0, runnable)
        prev = i
    runnable.remove(0)  # the heavy VM stops
    counts = {1: 0, 2: 0}
    for _ in range(500):
        i = policy.pick(runnable, prev)
        counts[i] += 1
        policy.charge(i, 1.0, runnable)
        prev = i
    assert counts[1] / 500 == pytest.approx(0.6, abs=0.01)


def test_nice_values_stand_for_the_weights():
    assert nice_values([7, 3]) == [0, 4]  # kernel weights 1024 : 423, i.e. 70.8 % : 29.2 %
    assert nice_values([1, 1, 1]) == [0, 0, 0]
    assert nice_values([1, 1000]) == [19, 0]  # as far as nice goes
    assert nice_values([2, 1]) == [0, 3]


# --- units and figures ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,seconds",
    [("10ms", 0.01), ("5s", 5.0), ("250us", 250e-6), ("100µs", 1e-4), ("1.5", 1.5), ("2m", 120)],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ms", "ten", "-1s", "nan", "inf", "1e999"])
def test_parse_duration_rejects(text):
    with pytest.raises(SchedError, match="not a duration"):
        parse_duration(text)


def test_format_seconds():
    assert format_seconds(0.01) == "10 ms"
    assert format_seconds(250e-6) == "250 µs"
    assert format_seconds(5.0) == "5 s"


def test_samples_keep_exact_mean_and_bounded_memory():
    s = Samples(cap=100)
    assert s.median is None and s.mean is None
    for v in range(1, 10_001):
        s.add(v)
    assert len(s.values) == 100
    assert s.count == 10_000 and s.mean == pytest.approx(5000.5)
    assert 2000 < s.median < 8000  # a uniform sample of 1..10000
    exact = Samples()
    for v in (5, 1, 3, 2):
        exact.add(v)
    assert exact.median == 2.5


def test_timeline_shares():
    tl = Timeline([0.1, 0.2], [[0.0, 3.0], [0.0, 1.0]], [[0, 0], [0, 0]])
    assert tl.shares(tl.cpu_s) == [[None, 0.75], [None, 0.25]]


# --- the progress page ---------------------------------------------------------------------------


@pytest.fixture
def memory():
    mem = GuestMemory()
    mem.add_region(0, 1 << 20)
    yield mem
    mem.close()


def test_progress_counter_reads_the_guest_u64(memory):
    memory.write_u64(0x3000, 12345)
    counter = ProgressCounter(memory, 0x3000, "neo")
    assert counter.read() == 12345
    memory.write_u64(0x3000, 12346)
    assert counter.read() == 12346


@pytest.mark.parametrize(
    "gpa,message",
    [(0x3001, "not 8-byte aligned"), (-8, "not 8-byte aligned"), (1 << 20, "not in guest RAM"),
     ((1 << 20) - 4, "not 8-byte aligned"), (0x7000000000, "not in guest RAM")],
)  # fmt: skip
def test_progress_counter_must_be_aligned_and_in_ram(memory, gpa, message):
    with pytest.raises(SchedError, match=f"neo: its progress counter .* {message}"):
        ProgressCounter(memory, gpa, "neo")


def test_progress_counter_wraps_like_a_u64():
    assert ProgressCounter.delta(10, 25) == 15
    assert ProgressCounter.delta(2**64 - 5, 5) == 10
    assert ProgressCounter.delta(7, 7) == 0


# --- policies over vCPUs -------------------------------------------------------------------------


def refs(*vcpus_per_vm, weights=None):
    from kvmpy.sched import VcpuRef

    out = []
    for vm, n in enumerate(vcpus_per_vm):
        w = weights[vm] if weights else 1.0
        out.extend(VcpuRef(len(out), vm, cpu, w, f"vm{vm}") for cpu in range(n))
    return out


def drive(policy, vcpus, slices, blocked=lambda step, v: False):
    """Pick and charge `slices` slices of 1.0; returns CPU time per vCPU id and per VM."""
    policy.attach(vcpus)
    per_vcpu = [0.0] * len(vcpus)
    prev = None
    for step in range(slices):
        runnable = [v for v in vcpus if not blocked(step, v)]
        v = policy.pick(runnable, prev)
        assert v in runnable
        policy.charge(v, 1.0, runnable)
        per_vcpu[v.id] += 1.0
        prev = v
    per_vm: dict[int, float] = {}
    for v in vcpus:
        per_vm[v.vm] = per_vm.get(v.vm, 0.0) + per_vcpu[v.id]
    return per_vcpu, per_vm


def test_weighted_gives_each_vm_its_weight_whatever_its_vcpu_count():
    from kvmpy.sched import builtin_policy

    vcpus = refs(1, 3, weights=[1, 1])
    per_vcpu, per_vm = drive(builtin_policy(Policy.WEIGHTED, [1, 1]), vcpus, 600)
    assert per_vm == {0: 300.0, 1: 300.0}
    assert per_vcpu[1:] == [100.0, 100.0, 100.0]  # the VM's vCPUs split its share


def test_weighted_keeps_a_vms_share_while_some_of_its_vcpus_are_blocked():
    from kvmpy.sched import builtin_policy

    vcpus = refs(2, 4, weights=[3, 1])
    # VM 1's vCPUs 1-3 are parked the whole time: its one runnable vCPU gets the VM's share.
    per_vcpu, per_vm = drive(
        builtin_policy(Policy.WEIGHTED, [3, 1]), vcpus, 400, lambda step, v: v.vm == 1 and v.cpu
    )
    assert per_vm == {0: 300.0, 1: 100.0}
    assert per_vcpu[:2] == [150.0, 150.0] and per_vcpu[2] == 100.0


def test_timer_goes_round_the_vms_then_round_their_vcpus():
    from kvmpy.sched import builtin_policy

    vcpus = refs(2, 1)
    policy = builtin_policy(Policy.TIMER, [1, 1])
    policy.attach(vcpus)
    order, prev = [], None
    for _ in range(6):
        v = policy.pick(vcpus, prev)
        policy.charge(v, 1.0, vcpus)
        order.append(str(v))
        prev = v
    assert order == ["vm0/cpu0", "vm1/cpu0", "vm0/cpu1", "vm1/cpu0", "vm0/cpu0", "vm1/cpu0"]
    assert not builtin_policy(Policy.ON_IO, [1]).preemptive and policy.preemptive


def test_a_policy_of_ones_own_needs_only_pick():
    from kvmpy.sched import SchedPolicy

    class First(SchedPolicy):
        def pick(self, runnable, prev):
            return runnable[0]

    vcpus = refs(2)
    per_vcpu, _ = drive(First(), vcpus, 4)
    assert per_vcpu == [4.0, 0.0]
    p = First()
    p.attach(vcpus)
    # A directed yield goes to its target if it can run, else back to pick.
    assert p.on_yield(vcpus[0], vcpus[1], vcpus) is vcpus[1]
    assert p.on_yield(vcpus[0], vcpus[1], vcpus[:1]) is None
    assert p.on_yield(vcpus[0], None, vcpus) is None
