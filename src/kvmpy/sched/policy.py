"""Who runs next: the scheduling policies as plain objects (no KVM, no clock, no signals).

The scheduler loop (kvmpy.sched.scheduler) asks a policy which runnable VM gets the CPU
(`pick`) and tells it how long that VM actually ran (`charge`). Keeping the decision sans-IO
lets the tests drive it with made-up slice lengths, the way the device models are tested.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import SchedError


class Policy(enum.StrEnum):
    #: Switch to the next VM at every port-I/O exit (a VM that never exits keeps the CPU).
    ON_IO = "on-io"
    #: Round robin, each VM preempted by a host timer after one quantum.
    TIMER = "timer"
    #: Shares in proportion to the weights, one quantum at a time, deficit-based.
    WEIGHTED = "weighted"
    #: One host thread per vCPU, pinned to one CPU: the host's scheduler decides (baseline).
    THREADS = "threads"

    @classmethod
    def parse(cls, text: str | Policy) -> Policy:
        try:
            return cls(text)
        except ValueError:
            names = ", ".join(p.value for p in cls)
            raise SchedError(f"unknown scheduling policy {text!r}: choose one of {names}") from None

    @property
    def uses_weights(self) -> bool:
        """Whether the policy aims at the weights (the others aim at equal shares)."""
        return self in (Policy.WEIGHTED, Policy.THREADS)


def check_weights(weights: Sequence[float]) -> list[float]:
    if not weights:
        raise SchedError("no VMs to schedule")
    out = []
    for i, w in enumerate(weights):
        try:
            w = float(w)
        except (TypeError, ValueError):
            raise SchedError(f"weight of VM {i} is not a number: {w!r}") from None
        if not (math.isfinite(w) and w > 0):
            raise SchedError(f"weights must be positive numbers (VM {i} has {w:g})")
        out.append(w)
    return out


def target_shares(policy: Policy, weights: Sequence[float]) -> list[float]:
    """The share of host time each VM should get under `policy` while all of them run."""
    if policy.uses_weights:
        total = sum(weights)
        return [w / total for w in weights]
    return [1 / len(weights)] * len(weights)


def _after(runnable: Sequence[int], prev: int | None) -> list[int]:
    """`runnable` in round-robin order, starting with the first VM after `prev`."""
    if prev is None:
        return list(runnable)
    later = [i for i in runnable if i > prev]
    return later + [i for i in runnable if i <= prev]


class RoundRobin:
    """The next runnable VM after the previous one (on-io and timer)."""

    def pick(self, runnable: Sequence[int], prev: int | None) -> int:
        return _after(runnable, prev)[0]

    def charge(self, vm: int, ns: float, runnable: Sequence[int]) -> None:
        pass


class DeficitShares:
    """Weighted shares without accumulating error (the weighted policy).

    Every VM holds a credit in nanoseconds. After each slice, every runnable VM earns its
    fraction of the slice's *measured* length and the VM that ran pays the whole of it; the
    next slice goes to the VM with the most credit (ties: round-robin order). Credits always
    sum to zero, a slice that overran is paid back by the VM that overran it, and so no VM
    drifts away from its share: the lag stays within a slice or two however long the run.

    Every slice is one quantum long, also when the same VM runs twice in a row. Merging those
    slices would save timer interrupts, but then the heavier VM would pay the per-slice cost
    (leaving and re-entering the guest, ~0.1 ms on KVM-PVM) less often per unit of time than
    the lighter one and pull ahead in guest progress; equal slices make each VM pay it in
    proportion to its share, so progress shares match host shares too.
    """

    def __init__(self, weights: Sequence[float]):
        self.weights = check_weights(weights)
        self.credit = [0.0] * len(self.weights)
        # Credits that differ by rounding only are a tie (equal weights then alternate).
        self._epsilon = 0.0

    def pick(self, runnable: Sequence[int], prev: int | None) -> int:
        credit, eps = self.credit, self._epsilon
        best = None
        for i in _after(runnable, prev):
            if best is None or credit[i] > credit[best] + eps:
                best = i
        if best is None:
            raise SchedError("no runnable VM to pick")
        return best

    def charge(self, vm: int, ns: float, runnable: Sequence[int]) -> None:
        """`vm` ran for `ns`; `runnable` are the VMs that could have run (including `vm`).

        VMs that have stopped are left out of `runnable`, so the survivors split the CPU
        in proportion to their own weights."""
        weights, credit = self.weights, self.credit
        self._epsilon = max(self._epsilon, abs(ns) * 1e-9)
        total = sum(weights[i] for i in runnable)
        for i in runnable:
            credit[i] += ns * weights[i] / total
        credit[vm] -= ns


# --- policies over vCPUs -----------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class VcpuRef:
    """A vCPU as a policy sees it: what the scheduler runs, one slice at a time. The
    scheduler makes one per vCPU; they compare by identity (cheap in its per-slice path)."""

    #: Its index among every vCPU the scheduler runs (stable for the scheduler's life).
    id: int
    #: Its VM's index among the scheduler's VMs, and its own index in that VM.
    vm: int
    cpu: int
    #: Its VM's weight (the VM's share; its vCPUs share it) and name.
    weight: float
    vm_name: str

    def __str__(self) -> str:
        return f"{self.vm_name}/cpu{self.cpu}"


class SchedPolicy:
    """Which vCPU runs next: the policy object of the single-thread scheduler.

    Subclass it and override `pick` (and `charge` to learn how long each slice really took)
    to try a policy of your own; pass an instance as `Scheduler(vms, MyPolicy())`. The
    scheduler calls `attach(vcpus)` once with every vCPU it runs, then for every slice
    `pick(runnable, prev)`: `runnable` are the vCPUs that can run now (not stopped, not parked,
    not waiting in a blocking hypercall), `prev` the vCPU that ran last. The slice lasts one
    quantum (`preemptive`, ended by the host timer) or until the vCPU's next port-I/O exit
    (`preemptive = False`); it also ends early when the vCPU blocks or yields. Then
    `charge(vcpu, ns, runnable)` gets the slice's host CPU time.

    A vCPU that makes the yield hypercall naming another vCPU (a directed yield, kvmpy/
    spinlock.h) asks for that vCPU to run at once: `on_yield` says whom the rest of the slice
    goes to (by default the target, if it can run; None lets `pick` choose).

    Policies are plain objects: no clock, no KVM, no signals (tests drive them with made-up
    slices)."""

    name = "custom"
    #: Slices end by the host timer after one quantum; False: at port-I/O exits only.
    preemptive = True
    #: Whether the VMs' targets follow their weights (False: equal shares).
    uses_weights = True

    def attach(self, vcpus: Sequence[VcpuRef]) -> None:
        self.vcpus = list(vcpus)

    def pick(self, runnable: Sequence[VcpuRef], prev: VcpuRef | None) -> VcpuRef:
        raise NotImplementedError

    def charge(self, vcpu: VcpuRef, ns: int, runnable: Sequence[VcpuRef]) -> None:
        pass

    def on_yield(
        self, vcpu: VcpuRef, target: VcpuRef | None, runnable: Sequence[VcpuRef]
    ) -> VcpuRef | None:
        return target if target is not None and target in runnable else None


class VmThenVcpu(SchedPolicy):
    """The built-in policies: a VM first, then one of its vCPUs (Xen's credit scheduler).

    A VM's weight is the VM's share however many vCPUs it has and however many of them can
    run; its runnable vCPUs share its slices among themselves (round robin, or equal deficit
    shares under `weighted`). So a VM that parks three of its four vCPUs keeps its share, a
    VM with eight vCPUs does not take eight times the CPU of a VM with one, and one-vCPU VMs
    are scheduled exactly as before SMP: the VM-level picker is the whole story.

    `vm_picker` and each VM's vCPU picker are RoundRobin or DeficitShares objects over
    indices (pick(runnable, prev), charge(i, ns, runnable)).
    """

    def __init__(self, name: str, vm_picker, vcpu_picker, *, preemptive: bool, weights: bool):
        self.name = name
        self.preemptive = preemptive
        self.uses_weights = weights
        self._vm_picker = vm_picker
        self._make_vcpu_picker = vcpu_picker
        self._vcpu_pickers: dict[int, RoundRobin | DeficitShares] = {}
        self._last: dict[int, int] = {}  # VM -> its vCPU that ran last
        self._solo: dict[int, VcpuRef] = {}  # VM -> its only vCPU, for one-vCPU VMs
        self._all_solo = False

    def attach(self, vcpus: Sequence[VcpuRef]) -> None:
        super().attach(vcpus)
        per_vm: dict[int, list[VcpuRef]] = {}
        for v in vcpus:
            per_vm.setdefault(v.vm, []).append(v)
        self._solo = {vm: vs[0] for vm, vs in per_vm.items() if len(vs) == 1}
        # Every VM has one vCPU: a VM index is a vCPU (the scheduler's per-slice path).
        self._all_solo = len(self._solo) == len(per_vm)
        self._vcpu_pickers = {
            vm: self._make_vcpu_picker(len(vs)) for vm, vs in per_vm.items() if len(vs) > 1
        }

    def pick(self, runnable: Sequence[VcpuRef], prev: VcpuRef | None) -> VcpuRef:
        # `runnable` comes in VM order, then vCPU order (round robin relies on it).
        vms = [v.vm for v in runnable]
        if not vms:
            raise SchedError("no runnable vCPU to pick")
        if not self._all_solo and len(set(vms)) != len(vms):
            vms = list(dict.fromkeys(vms))
        vm = self._vm_picker.pick(vms, prev.vm if prev is not None else None)
        solo = self._solo.get(vm)
        if solo is not None:
            return solo
        mine = [v for v in runnable if v.vm == vm]
        if len(mine) == 1:
            return mine[0]
        cpu = self._vcpu_pickers[vm].pick([v.cpu for v in mine], self._last.get(vm))
        return next(v for v in mine if v.cpu == cpu)

    def charge(self, vcpu: VcpuRef, ns: int, runnable: Sequence[VcpuRef]) -> None:
        vm = vcpu.vm
        if self._all_solo:
            vms = [v.vm for v in runnable]
        else:
            vms = list(dict.fromkeys(v.vm for v in runnable))
        if vm not in vms:
            vms.append(vm)
        self._vm_picker.charge(vm, ns, vms)
        if self._all_solo:
            return
        inner = self._vcpu_pickers.get(vm)
        if inner is not None:
            self._last[vm] = vcpu.cpu
            cpus = [v.cpu for v in runnable if v.vm == vm]
            if vcpu.cpu not in cpus:
                cpus.append(vcpu.cpu)
            inner.charge(vcpu.cpu, ns, cpus)


def builtin_policy(policy: Policy, weights: Sequence[float]) -> SchedPolicy:
    """The SchedPolicy object behind a built-in policy name (not `threads`)."""
    if policy is Policy.WEIGHTED:
        return VmThenVcpu(
            policy.value,
            DeficitShares(weights),
            lambda n: DeficitShares([1.0] * n),
            preemptive=True,
            weights=True,
        )
    if policy in (Policy.TIMER, Policy.ON_IO):
        return VmThenVcpu(
            policy.value,
            RoundRobin(),
            lambda n: RoundRobin(),
            preemptive=policy is Policy.TIMER,
            weights=False,
        )
    raise SchedError(f"the {policy.value} policy has no single-thread policy object")
