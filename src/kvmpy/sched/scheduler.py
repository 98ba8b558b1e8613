"""The vCPUs of many VMs sharing one host CPU: the scheduling loop and its accounting.

    from kvmpy.sched import Scheduler

    sched = Scheduler([neo, morpheus], "weighted", weights=[7, 3], quantum=0.010)
    result = sched.run(duration=5.0)
    print(result.vm("neo").host_share, result.switch_cost_us)

`on-io`, `timer` and `weighted` run every vCPU of every VM on the calling thread, one backend
`run()` at a time; a policy object (kvmpy.sched.policy) picks the next vCPU among those that
can run (not stopped, not parked, not waiting in a blocking hypercall). A slice ends at a
port-I/O exit (`on-io`, through `yield_on_io`), when the vCPU blocks, or when a timer fires: a
POSIX timer aimed at this thread (hv/signals.py's ThreadTimer) whose signal KVM lets in only
during KVM_RUN (KVM_SET_SIGNAL_MASK), so even a guest that never exits gives the CPU back and
an expiry just before KVM_RUN is not lost. `threads` runs each vCPU in its own host thread
(vmm/vcpus.py), pinned to the chosen CPUs, and leaves the choice to the host's scheduler
(CFS or EEVDF), with the weights turned into nice values: the baseline.

Accounting, per vCPU and per VM (the sum of its vCPUs): host CPU time (the thread's CPU clock
around each slice: what shares are computed from and what the weighted policy charges),
host-clock time inside run() and the part of it inside KVM_RUN, the guest's own progress
counter (kvmpy.sched.progress), slices and switches; per switch, the time from the preemption
(the timer's expiry, or the vCPU's exit) to the next vCPU's entry. docs/sched.md defines every
figure.

Ctrl-C is a signal and Python runs signal handlers in the main thread only, so the scheduler
runs in the main thread (it raises SchedError elsewhere).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from ..arch.x86.modes import (
    PAGE_SIZE,
    PERCPU_LOCKS_HELD,
    PERCPU_PREEMPTED,
    PERCPU_SIZE,
    PERCPU_YIELD_PENDING,
    Mode,
)
from ..errors import GuestMemoryError, KvmpyError
from ..hv.base import VcpuBackend
from ..hv.signals import (
    KICK_SIGNAL,
    MAIN_THREAD_SIGNALS,
    TIMER_SIGNAL,
    ThreadTimer,
    install_timer_handler,
)
from ..kvm import constants as K
from ..limits import duration_problem
from ..machine import Machine
from ..result import Stop, StopReason
from ..vmm.vcpus import DEADLOCK_MESSAGE, VcpuSet
from .errors import SchedError
from .policy import Policy, SchedPolicy, VcpuRef, builtin_policy, check_weights
from .progress import ProgressCounter, find_counter
from .report import Samples, ScheduleResult, Timeline, VcpuReport, VMReport

log = logging.getLogger(__name__)

#: Below this a slice is mostly the cost of leaving and re-entering the guest (~0.1 ms on
#: KVM-PVM, measured by `kvmpy bench sched`), and the VMs would do little but switch.
MIN_QUANTUM = 100e-6
DEFAULT_QUANTUM = 0.010
#: Timeline samples are taken at most this often, and at most MAX_SAMPLES are kept (older ones
#: are thinned out by half when the limit is reached), so a long run stays in bounded memory.
SAMPLE_INTERVAL = 0.010
MAX_SAMPLES = 4000
#: A timer armed for zero would be disarmed instead.
MIN_ARM_NS = 1000
#: The threads policy's main thread wakes this often to sample, display and check the end.
THREADS_POLL = 0.020

# The per-CPU page's paravirtual scheduling words, as indices of u32s (kvmpy/smp.h).
PERCPU_WORDS = PERCPU_SIZE // 4
LOCKS_HELD = PERCPU_LOCKS_HELD // 4
YIELD_PENDING = PERCPU_YIELD_PENDING // 4
PREEMPTED = PERCPU_PREEMPTED // 4

# The host kernel's weight for each nice value 0..19 (kernel/sched/core.c,
# sched_prio_to_weight): what the threads baseline uses to stand for the VMs' weights.
NICE_WEIGHTS = (
    1024, 820, 655, 526, 423, 335, 272, 215, 172, 137,
    110, 87, 70, 56, 45, 36, 29, 23, 18, 15,
)  # fmt: skip

OnTick = Callable[[ScheduleResult], None]


@dataclass(frozen=True)
class SchedVM:
    """One VM to schedule: a machine with its image loaded, and how to treat it. Its vCPUs
    are the machine's (MachineConfig(vcpus=N))."""

    machine: Machine
    weight: float = 1.0
    name: str | None = None
    #: Where the guest's progress counter is; default: its image's `kvmpy_progress` symbol.
    progress_gpa: int | None = None


class _Vcpu:
    """The scheduler's bookkeeping for one vCPU."""

    def __init__(self, ref: VcpuRef, vm: _VM, backend: VcpuBackend):
        self.ref = ref
        self.vm = vm
        self.cpu = ref.cpu
        self.backend = backend
        #: The loop (host CPU) that runs it under the single-thread policies.
        self.loop: _Loop | None = None
        self.reset()

    def reset(self) -> None:
        self.host_ns = 0
        self.cpu_ns = 0
        self.slices = 0
        self.switches = 0
        self.switch_ns = 0
        # Raw sums, not ExitStats' estimate: during a schedule every exit is timed
        # (exact_timing), so the difference is exactly the VMM's time on this run's exits.
        self.vmm_start_ns = sum(self.backend.stats.vmm_ns)
        self.exits_start = self.backend.stats.total
        # Lock-holder preemption (SMP VMs on one thread): timer preemptions while the guest
        # announced a held lock, slices stretched for it (holder_grace), yields it made and
        # directed yields the scheduler carried out.
        self.lhp_preemptions = 0
        self.grace = 0
        self.yields = 0
        self.directed = 0
        # threads policy
        self.ident: int | None = None
        self.cpu_clock: int | None = None
        self.cpu_start_ns = 0
        self.t_start_ns = 0
        self.ctxt_start = 0


class _VM:
    """The scheduler's bookkeeping for one VM and its vCPUs."""

    def __init__(self, index: int, spec: SchedVM, name: str, counter: ProgressCounter | None):
        self.index = index
        self.machine = spec.machine
        self.name = name
        self.weight = float(spec.weight)
        self.counter = counter
        self.vcpus = [
            _Vcpu(VcpuRef(0, index, i, self.weight, name), self, v)
            for i, v in enumerate(spec.machine.vcpus)
        ]
        #: More than one vCPU: its vCPUs can block (parked, waiting) and must be prepared.
        self.smp = len(self.vcpus) > 1
        #: The per-CPU page as u32 words, while a single-thread schedule runs (SMP VMs in a
        #: mode that has one): where the paravirtual scheduling words are.
        self.pv: memoryview | None = None
        #: Why the VM stopped; a VM that stopped stays out of later runs of the scheduler.
        self.stop: Stop | None = None
        self.stopped_at_ns: int | None = None
        self.reset()

    def reset(self) -> None:
        for v in self.vcpus:
            v.reset()
        self.switches = 0
        self.switch_ns = 0
        self.progress_start = self.counter.read() if self.counter else 0
        # threads policy
        self.nice: int | None = None
        self.vset: VcpuSet | None = None
        self.exit_times: list[int] = []

    def progress(self) -> int | None:
        if self.counter is None:
            return None
        return ProgressCounter.delta(self.progress_start, self.counter.read())


class _Loop:
    """One host CPU's scheduling loop (the single-thread policies): its share of the vCPUs,
    its own policy object and what it measured. With one host CPU there is one loop, in the
    main thread; with several, one per CPU, each in its own thread."""

    def __init__(self, index: int, cpu: int | None, vcpus: list[_Vcpu], policy: SchedPolicy):
        self.index = index
        self.cpu = cpu
        self.vcpus = vcpus
        self.policy = policy
        #: The vCPU inside run() now (for Ctrl-C and for a VM stopped by another loop).
        self.running: _Vcpu | None = None
        #: A yield hypercall of the running vCPU: (vCPU, the vCPU it named or None).
        self.yield_: tuple[_Vcpu, int | None] | None = None
        #: (vCPU, its VM, the VM's blocked(i)), bound once: looked at before every slice.
        self.entries = [(v, v.vm, v.vm.machine.smp.blocked) for v in vcpus]
        self.reset()

    def reset(self) -> None:
        self.switch_cost = Samples()
        self.exit_latency = Samples()
        self.cpu_total = 0
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None


class Scheduler:
    """Runs the vCPUs of several machines on one host CPU under a policy.

    `vms` are Machines (with images loaded) or SchedVMs, with one vCPU or several;
    `policy` is a built-in policy's name or a SchedPolicy object of your own; `weights` (or
    each SchedVM's weight) are the VMs' shares under `weighted` and `threads` (a VM's vCPUs
    share its slices); `quantum` (seconds) is the slice length of the preemptive policies;
    `cpu` is the host CPU to run on (default: the last one this process may use), or a list
    of them: the single-thread policies then run one loop per CPU, each over a fixed share of
    the vCPUs (the k-th vCPU of the schedule on the (k mod n)-th CPU; no migration), and
    `threads` pins its vCPU threads to all of them; `pin=False`: no pinning.
    `holder_grace` (seconds, at most one quantum): stretch a slice once for a vCPU that
    announces a held spinlock (kvmpy/spinlock.h); it yields when it releases the lock.
    """

    def __init__(
        self,
        vms: Sequence[Machine | SchedVM],
        policy: Policy | str | SchedPolicy = Policy.WEIGHTED,
        *,
        weights: Sequence[float] | None = None,
        names: Sequence[str] | None = None,
        quantum: float = DEFAULT_QUANTUM,
        cpu: int | Sequence[int] | None = None,
        pin: bool = True,
        holder_grace: float = 0.0,
    ):
        if isinstance(policy, SchedPolicy):
            self.policy: Policy | None = None
            self._custom: SchedPolicy | None = policy
            self.policy_name = str(getattr(policy, "name", "custom") or "custom")
        elif isinstance(policy, (str, Policy)):
            self.policy = Policy.parse(policy)
            self._custom = None
            self.policy_name = self.policy.value
        else:
            raise SchedError(
                f"a policy is a name ({', '.join(p.value for p in Policy)}) or a SchedPolicy "
                f"object, not {type(policy).__name__}"
            )
        specs = [v if isinstance(v, SchedVM) else SchedVM(v) for v in vms]
        if not specs:
            raise SchedError("no VMs to schedule")
        if weights is not None:
            if len(weights) != len(specs):
                raise SchedError(f"{len(weights)} weights for {len(specs)} VMs")
            specs = [
                SchedVM(s.machine, w, s.name, s.progress_gpa)
                for s, w in zip(specs, weights, strict=True)
            ]
        if names is not None:
            if len(names) != len(specs):
                raise SchedError(f"{len(names)} names for {len(specs)} VMs")
            specs = [
                SchedVM(s.machine, s.weight, n, s.progress_gpa)
                for s, n in zip(specs, names, strict=True)
            ]
        self.weights = check_weights([s.weight for s in specs])
        try:
            quantum = float(quantum)
        except (TypeError, ValueError):
            raise SchedError(f"the quantum must be a number of seconds (got {quantum!r})") from None
        if not (math.isfinite(quantum) and round(quantum * 1e9) >= round(MIN_QUANTUM * 1e9)):
            raise SchedError(
                f"the quantum must be at least {MIN_QUANTUM * 1e6:.0f} µs (got {quantum:g} s): "
                "shorter slices would be spent leaving and re-entering the guests"
            )
        self.quantum = quantum
        try:
            holder_grace = float(holder_grace)
        except (TypeError, ValueError):
            raise SchedError(f"the holder grace must be seconds (got {holder_grace!r})") from None
        if not (math.isfinite(holder_grace) and 0 <= holder_grace <= quantum):
            raise SchedError(
                f"the holder grace must be between 0 and the quantum (got {holder_grace:g} s)"
            )
        #: How long a slice may be stretched for a vCPU that announces a held spinlock.
        self.holder_grace = holder_grace
        seen: set[int] = set()
        for s in specs:
            if id(s.machine) in seen:
                raise SchedError("the same machine is listed twice; each VM needs its own")
            seen.add(id(s.machine))
            if s.machine.boot is None:
                raise SchedError("load an image into every machine before scheduling it")
        cpus = self._check_cpus(cpu)
        self.cpus: list[int] | None = cpus if pin else None
        self.cpu: int | None = cpus[0] if pin and len(cpus) == 1 else None
        self._vms: list[_VM] = []
        used: dict[str, int] = {}
        for i, s in enumerate(specs):
            base = s.name or _default_name(s.machine, i)
            used[base] = used.get(base, 0) + 1
            name = base if used[base] == 1 else f"{base}-{used[base]}"
            counter = find_counter(s.machine, s.progress_gpa, owner=name)
            self._vms.append(_VM(i, s, name, counter))
        self._vcpus: list[_Vcpu] = []
        for vm in self._vms:
            for v in vm.vcpus:
                v.ref = VcpuRef(len(self._vcpus), vm.index, v.cpu, vm.weight, vm.name)
                self._vcpus.append(v)
        self._loops: list[_Loop] = []
        self._impl: SchedPolicy | None = None
        if self.policy is not Policy.THREADS:
            n = len(cpus)
            for k in range(n):
                mine = [v for i, v in enumerate(self._vcpus) if i % n == k]
                if self._custom is not None:
                    # Each loop decides alone: with several CPUs, each gets its own copy.
                    impl = self._custom if n == 1 else copy.deepcopy(self._custom)
                else:
                    impl = builtin_policy(self.policy, self.weights)  # type: ignore[arg-type]
                impl.attach([v.ref for v in mine])
                loop = _Loop(k, cpus[k] if pin else None, mine, impl)
                for v in mine:
                    v.loop = loop
                self._loops.append(loop)
            self._impl = self._loops[0].policy
        #: VM-level figures and stops are shared by the loops.
        self._lock = threading.Lock()
        self._idle = threading.Condition(threading.Lock())
        self._interrupted = False
        #: The signal that ended the schedule (SIGINT, SIGTERM), if one did.
        self.signal: int | None = None
        self._ending = False
        self._t_start = 0
        self._timeline = Timeline()
        self._sample_ns = int(SAMPLE_INTERVAL * 1e9)

    def _check_cpus(self, cpu: int | Sequence[int] | None) -> list[int]:
        allowed = os.sched_getaffinity(0)
        if cpu is None:
            return [max(allowed)]
        cpus = [cpu] if isinstance(cpu, int) else list(cpu)
        if not cpus:
            raise SchedError("no host CPU given")
        for c in cpus:
            if not isinstance(c, int) or c not in allowed:
                raise SchedError(
                    f"CPU {c} is not one this process may use (allowed: "
                    f"{','.join(map(str, sorted(allowed)))})"
                )
        if len(set(cpus)) != len(cpus):
            raise SchedError(f"a host CPU is listed twice: {','.join(map(str, cpus))}")
        return cpus

    @property
    def names(self) -> list[str]:
        return [v.name for v in self._vms]

    @property
    def vcpus(self) -> list[VcpuRef]:
        """Every vCPU the scheduler runs, as its policy sees them."""
        return [v.ref for v in self._vcpus]

    @property
    def uses_weights(self) -> bool:
        if self._impl is not None:
            return bool(self._impl.uses_weights)
        return True  # threads

    # --- signal handlers (run in the main thread, between bytecodes or on EINTR) -------------

    def _on_sigint(self, signum, frame) -> None:
        self._interrupted = True
        self.signal = signum
        kick = len(self._loops) > 1  # loops in threads of their own
        for loop in self._loops:
            v = loop.running
            if v is not None:
                v.backend.request_pause(kick=kick)

    def interrupt(self) -> None:
        """End the schedule as Ctrl-C would (safe in a signal handler)."""
        self._on_sigint(signal.SIGINT, None)

    # --- running -------------------------------------------------------------------------------

    def run(
        self,
        duration: float | None = None,
        *,
        handle_sigint: bool = False,
        on_tick: OnTick | None = None,
        tick_interval: float = 0.25,
    ) -> ScheduleResult:
        """Run the VMs for `duration` seconds, or until all of them stop if None.

        `handle_sigint`: Ctrl-C ends the schedule (the result says `interrupted`) instead of
        raising KeyboardInterrupt. `on_tick(snapshot)` is called from the scheduling loop about
        every `tick_interval` seconds with the figures so far (for a live view); it runs
        between slices, outside every measured interval.
        """
        if duration is not None:
            try:
                duration = float(duration)
            except (TypeError, ValueError):
                raise SchedError(
                    f"the duration must be a number of seconds (got {duration!r})"
                ) from None
            problem = duration_problem(duration)
            if problem is not None:
                raise SchedError(f"the duration {problem} (got {duration:g} s)")
        if threading.current_thread() is not threading.main_thread():
            raise SchedError(
                "the scheduler needs the main thread: its timer and Ctrl-C are signals, and "
                "Python runs signal handlers there only"
            )
        for vm in self._vms:
            vm.reset()
        self._interrupted = self._ending = False
        self._timeline = Timeline([], [[] for _ in self._vms], [[] for _ in self._vms])
        self._sample_ns = int(SAMPLE_INTERVAL * 1e9)
        for loop in self._loops:
            loop.reset()
        if on_tick is not None and not tick_interval > 0:
            raise SchedError(f"the tick interval must be positive (got {tick_interval!r})")
        tick_ns = int(tick_interval * 1e9) if on_tick else None
        with ExitStack() as stack:
            if handle_sigint:  # SIGTERM too, the same way (kvmpy.signals)
                for sig in (signal.SIGINT, signal.SIGTERM):
                    old_int = signal.signal(sig, self._on_sigint)
                    stack.callback(signal.signal, sig, old_int)
            stack.enter_context(self._vcpu_setup())
            length = int(duration * 1e9) if duration is not None else None
            if self.policy is Policy.THREADS:
                end = self._run_threads(length, on_tick, tick_ns)
            else:
                install_timer_handler()
                stack.enter_context(self._vm_hooks())
                if len(self._loops) == 1:
                    loop = self._loops[0]
                    timer = stack.enter_context(self._loop_setup(loop))
                    cpu0 = time.thread_time_ns()
                    self._t_start = time.perf_counter_ns()
                    deadline = self._t_start + length if length is not None else None
                    end = self._run_loop(loop, timer, deadline, on_tick, tick_ns)
                    loop.cpu_total = time.thread_time_ns() - cpu0
                else:
                    end = self._run_loops(length, on_tick, tick_ns)
        self._sample(end)
        return self._result(end, duration)

    @contextmanager
    def _vcpu_setup(self):
        saved = [(v.backend.yield_on_io, v.backend.exact_timing) for v in self._vcpus]
        yield_on_io = self._impl is not None and not self._impl.preemptive
        try:
            for v in self._vcpus:
                v.backend.yield_on_io = yield_on_io
                # Every exit timed, so that host time splits exactly into KVM_RUN and VMM time.
                v.backend.exact_timing = True
            yield
        finally:
            for v, (yio, exact) in zip(self._vcpus, saved, strict=True):
                v.backend.cancel_pause()
                v.backend.yield_on_io, v.backend.exact_timing = yio, exact

    @contextmanager
    def _vm_hooks(self):
        """For the single-thread policies (main thread): each VM's yield hook, its per-CPU
        words (preempted, yield_pending) and its wake-ups (an idle loop waits for them)."""
        hooked: list[tuple[_VM, object]] = []
        try:
            for vm in self._vms:
                smp = vm.machine.smp
                hooked.append((vm, smp.wake))
                smp.on_yield = functools.partial(self._on_guest_yield, vm)
                smp.wake = self._wake_loops
                vm.pv = _percpu_words(vm)
                if vm.pv is not None and vm.stop is None:
                    for v in vm.vcpus:  # none runs yet: each that could is preempted
                        vm.pv[v.cpu * PERCPU_WORDS + PREEMPTED] = 0 if smp.blocked(v.cpu) else 1
            yield
        finally:
            for vm, wake in hooked:
                vm.machine.smp.on_yield = None
                vm.machine.smp.wake = wake  # type: ignore[assignment]
                pv, vm.pv = vm.pv, None
                if pv is not None:
                    # Nobody knows from here on (vCPU threads leave them 0).
                    for v in vm.vcpus:
                        pv[v.cpu * PERCPU_WORDS + PREEMPTED] = 0
                        pv[v.cpu * PERCPU_WORDS + YIELD_PENDING] = 0
                    pv.release()
            # A vCPU left out of the guest between slices may owe KVM the end of its last
            # I/O instruction: finish it, so the registers are the guest's for whoever
            # reads or runs the machine next.
            for v in self._vcpus:
                if v.vm.stop is None:
                    v.backend.complete_pending_io()

    @contextmanager
    def _loop_setup(self, loop: _Loop):
        """In the loop's own thread: its CPU, and its preemption timer: a timer aimed at this
        thread whose signal KVM lets in only during KVM_RUN (hv/signals.py's ThreadTimer says
        why: no lost expiries, no other thread)."""
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {TIMER_SIGNAL})
        before = os.sched_getaffinity(0)
        timer = None
        masked: list[_Vcpu] = []
        try:
            timer = ThreadTimer()
            for v in loop.vcpus:
                v.backend.set_run_signals({TIMER_SIGNAL})
                masked.append(v)
            if loop.cpu is not None:
                os.sched_setaffinity(0, {loop.cpu})
            yield timer
        finally:
            if timer is not None:
                timer.close()
            for v in masked:
                v.backend.set_run_signals(None)
            ThreadTimer.drain()
            loop.running = None
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            os.sched_setaffinity(0, before)

    def _wake_loops(self) -> None:
        """A vCPU started or kicked another (SmpState.wake): an idle loop may have work."""
        with self._idle:
            self._idle.notify_all()

    def _stop_vm(self, vm: _VM, stop: Stop, t: int) -> None:
        """The first stop of a VM wins; its vCPUs running in other loops leave the guest."""
        with self._lock:
            if vm.stop is not None:
                return
            vm.stop = stop
            vm.stopped_at_ns = t - self._t_start
        for loop in self._loops:
            r = loop.running
            if r is not None and r.vm is vm:
                r.backend.request_pause(kick=True)
        self._wake_loops()

    def _on_guest_yield(self, vm: _VM, cpu: int, target: int | None) -> None:
        """The yield hypercall of vCPU `cpu` (called in its run(), which then returns None)."""
        v = vm.vcpus[cpu]
        if v.loop is not None:
            v.loop.yield_ = (v, target)

    def _runnable(self, loop: _Loop, t: int) -> list[VcpuRef]:
        """The loop's vCPUs that can run now, in VM order then vCPU order. A VM whose vCPUs
        are all blocked by the guest (parked, waiting) can never wake: it stops with
        `deadlock`."""
        out: list[VcpuRef] = []
        for v, vm, blocked in loop.entries:
            if vm.stop is not None:
                continue
            if not blocked(v.cpu):
                out.append(v.ref)
            elif vm.machine.smp.blocked_all():
                self._stop_vm(vm, Stop(StopReason.DEADLOCK, 0, DEADLOCK_MESSAGE), t)
        return out

    def _all_stopped(self) -> bool:
        return all(vm.stop is not None for vm in self._vms)

    def _run_loops(self, length: int | None, on_tick: OnTick | None, tick_ns: int | None):
        """Several host CPUs: one loop thread per CPU; this thread samples and displays."""
        now = time.perf_counter_ns
        ready = threading.Barrier(len(self._loops) + 1)
        self._t_start = now()
        deadline = self._t_start + length if length is not None else None
        for loop in self._loops:
            loop.thread = threading.Thread(
                target=self._loop_thread, args=(loop, deadline, ready),
                name=f"sched-cpu{loop.cpu}", daemon=True,
            )  # fmt: skip
            loop.thread.start()
        try:
            ready.wait(timeout=30)
        except threading.BrokenBarrierError:
            pass
        self._t_start = start = now()
        next_tick = start + tick_ns if tick_ns else None
        next_sample = start
        try:
            while not self._interrupted and not self._ending:
                t = now()
                if deadline is not None and t >= deadline:
                    break
                if not any(loop.thread.is_alive() for loop in self._loops):  # type: ignore[union-attr]
                    break
                if t >= next_sample:
                    self._sample(t)
                    next_sample = t + self._sample_ns
                if next_tick is not None and t >= next_tick:
                    self._tick(on_tick, t)  # type: ignore[arg-type]
                    next_tick = now() + tick_ns  # type: ignore[operator]
                wake = min(x for x in (deadline, next_sample, next_tick) if x is not None)
                time.sleep(min(max(wake - now(), 0) / 1e9, THREADS_POLL))
        finally:
            end = now()
            self._ending = True
            self._wake_loops()
            for loop in self._loops:
                t = loop.thread
                while t is not None and t.is_alive():
                    r = loop.running
                    if r is not None:
                        r.backend.request_pause(kick=True)
                    t.join(0.05)
        failed = [loop for loop in self._loops if loop.error is not None]
        if failed:
            e = failed[0].error
            if isinstance(e, SchedError):
                raise e
            raise SchedError(f"the scheduling loop of CPU {failed[0].cpu} failed: {e!r}") from e
        return end

    def _loop_thread(self, loop: _Loop, deadline: int | None, ready: threading.Barrier) -> None:
        try:
            # Ctrl-C and the like go to the main thread; kicks and the loop's own timer here.
            signal.pthread_sigmask(signal.SIG_BLOCK, MAIN_THREAD_SIGNALS)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {KICK_SIGNAL})
            with self._loop_setup(loop) as timer:
                ready.wait(timeout=30)
                cpu0 = time.thread_time_ns()
                try:
                    self._run_loop(loop, timer, deadline, None, None)
                finally:
                    loop.cpu_total = time.thread_time_ns() - cpu0
        except BaseException as e:  # reported by the main thread
            loop.error = e
            self._ending = True
            try:
                ready.abort()
            except threading.BrokenBarrierError:
                pass

    def _run_loop(
        self,
        loop: _Loop,
        timer: ThreadTimer,
        deadline: int | None,
        on_tick: OnTick | None,
        tick_ns: int | None,
    ):
        # Locals for everything the loop touches per slice: at a 1 ms quantum this loop's
        # own time is part of every switch it measures.
        now = time.perf_counter_ns
        cpu_clock = time.thread_time_ns
        arm, disarm, drain = timer.arm, timer.disarm, timer.drain
        policy = loop.policy
        pick, charge = policy.pick, policy.charge
        yielding = not policy.preemptive
        quantum = None if yielding else int(self.quantum * 1e9)
        exit_io = K.ExitReason.IO
        switch_cost, exit_latency = loop.switch_cost, loop.exit_latency
        vcpus = self._vcpus
        start = self._t_start
        next_tick = start + tick_ns if tick_ns else None
        # Only the main thread's loop samples (with several loops, the main thread does).
        sampling = len(self._loops) == 1
        next_sample = start + self._sample_ns if sampling else None
        single = len(self._loops) == 1
        vm_lock = self._lock
        grace_ns = int(self.holder_grace * 1e9)
        words, preempted_w, pending_w, held_w = PERCPU_WORDS, PREEMPTED, YIELD_PENDING, LOCKS_HELD
        prev: _Vcpu | None = None
        t_preempt = 0
        #: A directed yield: the vCPU that gets the rest of the yielder's slice, and its end.
        handoff: tuple[VcpuRef, int | None] | None = None
        loop.yield_ = None
        while not self._interrupted and not self._ending:
            t_pick = now()
            if deadline is not None and t_pick >= deadline:
                break
            runnable = self._runnable(loop, t_pick)
            if not runnable:
                if single or self._all_stopped():
                    break
                # This CPU's vCPUs all wait for vCPUs on other CPUs: sleep until a start or
                # a kick (or, bounded, the deadline).
                with self._idle:
                    self._idle.wait(0.002)
                prev = None
                continue
            slice_end = None
            if handoff is not None and handoff[0] in runnable:
                ref, slice_end = handoff
            else:
                ref = pick(runnable, prev.ref if prev is not None else None)
                if ref not in runnable:
                    raise SchedError(
                        f"the {self.policy_name} policy picked {ref}, which cannot run now"
                    )
            handoff = None
            v = vcpus[ref.id]
            vm = v.vm
            vcpu = v.backend
            pv = vm.pv
            smp = vm.machine.smp
            prepare = smp.prepare if vm.smp else None
            if pv is not None:
                pv[v.cpu * words + preempted_w] = 0
            counts = vcpu.stats.counts
            switched = prev is not None and v is not prev
            first = True
            ran = used = 0
            by_timer = stretched = False
            expiry = 0
            yielded: int | None | bool = False
            if slice_end is None or slice_end - now() < MIN_ARM_NS:
                slice_end = None if quantum is None else now() + quantum
            while True:
                # The timer goes off at the soonest of the slice's end, the deadline and the
                # next display tick; a tick resumes the same vCPU in the same slice.
                limit = slice_end
                if deadline is not None and (limit is None or deadline < limit):
                    limit = deadline
                if next_tick is not None and (limit is None or next_tick < limit):
                    limit = next_tick
                loop.running = v
                if self._interrupted or vm.stop is not None:
                    # Ctrl-C came before the handler could see this vCPU, or another loop
                    # stopped its VM.
                    loop.running = None
                    break
                if limit is not None:
                    t_arm = now()
                    wait = max(limit - t_arm, MIN_ARM_NS)
                    arm(wait)
                    expiry = t_arm + wait
                c0 = cpu_clock()
                t_enter = now()
                if first:
                    first = False
                    if switched:
                        cost = t_enter - t_preempt
                        switch_cost.add(cost)
                        v.switches += 1
                        v.switch_ns += cost
                        if prev.vm is not vm:  # type: ignore[union-attr]
                            with vm_lock:
                                vm.switches += 1
                                vm.switch_ns += cost
                if prepare is not None:
                    # A secondary started since it last ran loads its start registers (what
                    # the vCPU threads do in VcpuSet._wait_turn), before every entry: with
                    # several loops, a vCPU on another CPU may restart this one the moment it
                    # parks, before run() has even returned.
                    prepare(v.cpu, vcpu.complete_pending_io)
                ios = counts[exit_io]
                stop = vcpu.run()
                t_ret = now()
                c1 = cpu_clock()
                loop.running = None
                if limit is not None and t_ret < expiry:
                    # Ended before its timer (an exit): disarm it, and drop an expiry that
                    # came after run() returned. (One that ended run() was consumed there;
                    # a one-shot timer that fired needs no disarming.)
                    disarm()
                    if now() >= expiry:
                        drain()
                vcpu.cancel_pause()  # a Ctrl-C that landed after run() returned
                ran += t_ret - t_enter
                used += c1 - c0
                if stop is not None:
                    self._stop_vm(vm, stop, t_ret)
                    break
                if self._interrupted or vm.stop is not None:
                    break
                if smp.blocked(v.cpu):
                    # Parked, or waiting in a blocking hypercall: someone else's turn. Under
                    # on-io run() returned right after the hypercall's `out`, which KVM
                    # completes (skips) at the next entry: do it now, before a start loads
                    # new registers that the completion would move past.
                    vcpu.complete_pending_io()
                    break
                y = loop.yield_
                if y is not None and y[0] is v:
                    loop.yield_ = None
                    yielded = y[1]
                    v.yields += 1
                    break
                if yielding and counts[exit_io] != ios:
                    break  # on-io: the vCPU made a port-I/O exit; the next one gets the CPU
                if limit is not None and t_ret >= expiry:
                    if slice_end is not None and t_ret >= slice_end:
                        exit_latency.add(t_ret - expiry)
                        if (
                            grace_ns
                            and pv is not None
                            and not stretched
                            and pv[v.cpu * words + held_w]
                        ):
                            # The guest announced a held spinlock: let it finish the critical
                            # section; it yields when it releases (kvmpy/spinlock.h).
                            stretched = True
                            v.grace += 1
                            pv[v.cpu * words + pending_w] = 1
                            slice_end = t_ret + grace_ns
                            continue
                        by_timer = True
                        break
                    if deadline is not None and t_ret >= deadline:
                        break
                    if next_tick is not None and t_ret >= next_tick:
                        self._tick(on_tick, t_ret)  # type: ignore[arg-type]
                        t_done = now()
                        next_tick = t_done + tick_ns  # type: ignore[operator]
                        if slice_end is not None:
                            slice_end += t_done - t_ret  # the display's time is not the VM's
                # Otherwise run() came back early for a reason that is not ours (a pause
                # another part of the program asked for): continue the slice.
            if first:
                break  # interrupted before the slice began
            v.host_ns += ran
            v.cpu_ns += used
            v.slices += 1
            if pv is not None and vm.stop is None:
                base = v.cpu * words
                if by_timer and pv[base + held_w]:
                    v.lhp_preemptions += 1
                if stretched:
                    pv[base + pending_w] = 0
                if not vm.machine.smp.blocked(v.cpu):
                    pv[base + preempted_w] = 1
            if yielded is not False and yielded is not None:
                # A directed yield: the named vCPU gets the rest of this slice, if the
                # policy agrees and it can run.
                target_ref = vm.vcpus[yielded].ref
                now_runnable = self._runnable(loop, t_ret)
                nxt = policy.on_yield(ref, target_ref, now_runnable)
                if nxt is not None and nxt in now_runnable:
                    handoff = (nxt, slice_end)
                    if nxt == target_ref:
                        v.directed += 1
            # CPU time, not wall time: if the host lends our CPU to another process during a
            # slice, the vCPU is charged only for what it got.
            charge(ref, used, runnable)
            prev = v
            # Preemption: when the timer expired, or when the vCPU exited (stop, I/O, block).
            t_preempt = expiry if by_timer else t_ret
            # Sampling and the display are measurement, not scheduling: keep them out of the
            # switch cost by moving the preemption time past them.
            t_book = now()
            if next_sample is not None and t_book >= next_sample:
                self._sample(t_book)
                next_sample = t_book + self._sample_ns
            if next_tick is not None and t_book >= next_tick:
                self._tick(on_tick, t_book)  # type: ignore[arg-type]
                next_tick = now() + tick_ns  # type: ignore[operator]
            t_preempt += now() - t_book
        return now()

    # --- the threads baseline ------------------------------------------------------------------

    def _run_threads(self, length: int | None, on_tick: OnTick | None, tick_ns: int | None):
        now = time.perf_counter_ns
        nices = nice_values(self.weights)
        live = [vm for vm in self._vms if vm.stop is None]
        ready = threading.Barrier(sum(len(vm.vcpus) for vm in live) + 1)
        try:
            for vm in live:
                vm.nice = nices[vm.index]
                vm.vset = vm.machine.start_vcpus(
                    thread_init=functools.partial(self._thread_init, vm, ready),
                    thread_exit=functools.partial(self._thread_exit, vm),
                )
            ready.wait(timeout=30)
        except (threading.BrokenBarrierError, KvmpyError) as e:
            ready.abort()
            for vm in live:
                if vm.vset is not None:
                    vm.vset.end(5.0)
            raise SchedError(f"the vCPU threads did not start: {e}") from None
        start = self._t_start = now()
        deadline = start + length if length is not None else None
        next_tick = start + tick_ns if tick_ns else None
        next_sample = start
        try:
            while not self._interrupted:
                t = now()
                if deadline is not None and t >= deadline:
                    break
                if all(not vm.vset.running for vm in live):  # type: ignore[union-attr]
                    break
                if t >= next_sample:
                    self._sample(t)
                    next_sample = t + self._sample_ns
                if next_tick is not None and t >= next_tick:
                    self._tick(on_tick, t)  # type: ignore[arg-type]
                    next_tick = now() + tick_ns  # type: ignore[operator]
                wake = min(x for x in (deadline, next_sample, next_tick) if x is not None)
                time.sleep(min(max(wake - now(), 0) / 1e9, THREADS_POLL))
        finally:
            end = now()
            self._ending = True
            for vm in live:
                vset = vm.vset
                assert vset is not None
                if not vset.end(10.0):
                    log.warning("the vCPU threads of %s did not end", vm.name)
                if vset.first_stop is not None:
                    vm.stop = vset.first_stop
                    t_stop = min(vm.exit_times) if vm.exit_times else end
                    vm.stopped_at_ns = max(0, t_stop - start)
        return end

    def _thread_init(self, vm: _VM, ready: threading.Barrier, index: int) -> None:
        """First thing in each vCPU thread of the threads policy."""
        v = vm.vcpus[index]
        if self.cpus is not None:
            os.sched_setaffinity(0, set(self.cpus))
        if vm.nice:
            try:
                # Per thread on Linux: who=0 is the calling thread.
                os.setpriority(os.PRIO_PROCESS, 0, vm.nice)
            except OSError as e:
                log.warning("cannot set nice %d for %s: %s", vm.nice, vm.name, e)
                vm.nice = None
        v.ident = threading.get_ident()
        try:
            v.cpu_clock = time.pthread_getcpuclockid(v.ident)
        except (OSError, TypeError):
            v.cpu_clock = None
        ready.wait(timeout=30)
        v.ctxt_start = _ctxt_switches()
        v.cpu_start_ns = time.thread_time_ns()
        v.t_start_ns = time.perf_counter_ns()

    def _thread_exit(self, vm: _VM, index: int) -> None:
        v = vm.vcpus[index]
        t = time.perf_counter_ns()
        vm.exit_times.append(t)
        if not v.t_start_ns:
            return  # never got past the start barrier
        v.cpu_ns = time.thread_time_ns() - v.cpu_start_ns
        v.host_ns = t - v.t_start_ns
        v.switches = _ctxt_switches() - v.ctxt_start
        v.cpu_clock = None
        v.ident = None

    # --- figures -------------------------------------------------------------------------------

    def _vcpu_cpu_ns(self, v: _Vcpu) -> int:
        """Host CPU time spent running the vCPU so far (of a vCPU thread that is still running,
        read from its CPU clock)."""
        clock = v.cpu_clock
        if clock is not None and v.cpu_start_ns:
            try:
                return time.clock_gettime_ns(clock) - v.cpu_start_ns
            except OSError:
                pass
        return v.cpu_ns

    def _cpu_ns(self, vm: _VM) -> int:
        return sum(self._vcpu_cpu_ns(v) for v in vm.vcpus)

    def _vcpu_host_ns(self, v: _Vcpu, t: int) -> int:
        """Host-clock time the vCPU spent inside run() so far (threads: its thread's life)."""
        if v.cpu_clock is not None and v.t_start_ns:
            return t - v.t_start_ns
        return v.host_ns

    def _sample(self, t: int) -> None:
        tl = self._timeline
        tl.t_s.append((t - self._t_start) / 1e9)
        for vm in self._vms:
            tl.cpu_s[vm.index].append(self._cpu_ns(vm) / 1e9)
            tl.progress[vm.index].append(vm.progress() or 0)
        if len(tl.t_s) > MAX_SAMPLES:
            # Thin out by half and sample half as often: bounded memory however long the run.
            tl.t_s[:] = tl.t_s[::2]
            for series in (*tl.cpu_s, *tl.progress):
                series[:] = series[::2]
            self._sample_ns *= 2

    def _tick(self, on_tick: OnTick, t: int) -> None:
        on_tick(self._result(t, None, live=True))

    def _vcpu_state(self, vm: _VM, v: _Vcpu) -> str:
        if vm.stop is not None:
            return vm.stop.reason.value
        if vm.smp:
            smp = vm.machine.smp
            if smp.parked[v.cpu]:
                return "parked"
            if smp.blocked(v.cpu):
                return "waiting"
        return "running"

    def _result(self, end: int, duration: float | None, live: bool = False) -> ScheduleResult:
        threads = self.policy is Policy.THREADS
        targets = _targets(self.uses_weights, self.weights)
        vcpu_cpu = {id(v): self._vcpu_cpu_ns(v) for v in self._vcpus}
        cpu = [sum(vcpu_cpu[id(v)] for v in vm.vcpus) for vm in self._vms]
        cpu_total = sum(cpu)
        progress = [vm.progress() for vm in self._vms]
        prog_total = sum(p for p in progress if p is not None)
        reports = []
        for vm, c, p, target in zip(self._vms, cpu, progress, targets, strict=True):
            vcpu_reports = []
            h_total = vmm_total = 0
            for v in vm.vcpus:
                vmm = max(0, sum(v.backend.stats.vmm_ns) - v.vmm_start_ns)
                h = self._vcpu_host_ns(v, end)
                h_total += h
                vmm_total += vmm
                vc = vcpu_cpu[id(v)]
                vcpu_reports.append(
                    VcpuReport(
                        cpu=v.cpu,
                        host_s=h / 1e9,
                        kvm_run_s=max(0.0, h - vmm) / 1e9,
                        cpu_s=vc / 1e9,
                        host_share=vc / cpu_total if cpu_total else None,
                        switches=v.switches,
                        slices=None if threads else v.slices,
                        switch_cost_us_mean=v.switch_ns / v.switches / 1e3
                        if v.switches and not threads
                        else None,
                        exits=v.backend.stats.total - v.exits_start,
                        state=self._vcpu_state(vm, v),
                        lhp_preemptions=None if threads else v.lhp_preemptions,
                        grace=None if threads else v.grace,
                        yields=None if threads else v.yields,
                        directed_yields=None if threads else v.directed,
                    )
                )
            stop = vm.stop
            # A VM's host time: its vCPUs' (under threads each vCPU thread's whole life).
            switches = sum(r.switches for r in vcpu_reports) if threads else vm.switches
            reports.append(
                VMReport(
                    name=vm.name,
                    image=vm.machine.image.path if vm.machine.image else None,
                    weight=vm.weight,
                    target_share=target,
                    host_s=h_total / 1e9,
                    kvm_run_s=max(0.0, h_total - vmm_total) / 1e9,
                    cpu_s=c / 1e9,
                    host_share=c / cpu_total if cpu_total else None,
                    progress=p,
                    progress_share=(p / prog_total if prog_total else None)
                    if p is not None
                    else None,
                    switches=switches,
                    slices=None if threads else sum(v.slices for v in vm.vcpus),
                    switch_cost_us_mean=vm.switch_ns / vm.switches / 1e3
                    if vm.switches and not threads
                    else None,
                    state="running" if stop is None else stop.reason.value,
                    exit_code=None if stop is None else stop.exit_code,
                    message="" if stop is None else stop.message,
                    stopped_at_s=None if vm.stopped_at_ns is None else vm.stopped_at_ns / 1e9,
                    nice=vm.nice if threads else None,
                    stop_cpu=None if stop is None or not vm.smp else stop.cpu,
                    vcpus=vcpu_reports,
                )
            )
        sc = Samples.merged([loop.switch_cost for loop in self._loops])
        el = Samples.merged([loop.exit_latency for loop in self._loops])
        cpu_all = cpu_total if threads or live else sum(loop.cpu_total for loop in self._loops)
        preemptive = self._impl is not None and self._impl.preemptive
        return ScheduleResult(
            policy=self.policy_name,
            quantum_s=self.quantum if preemptive else None,
            duration_s=max(0, end - self._t_start) / 1e9,
            duration_limit_s=duration,
            vms=reports,
            switch_cost_us=None if sc.median is None else sc.median / 1e3,
            switch_cost_us_mean=None if sc.mean is None else sc.mean / 1e3,
            exit_latency_us=None if el.median is None else el.median / 1e3,
            cpu_total_s=cpu_all / 1e9,
            cpu=self.cpu,
            cpus=self.cpus,
            holder_grace_s=self.holder_grace,
            interrupted=self._interrupted,
            timeline=self._timeline if not live else Timeline(),
        )


def _percpu_words(vm: _VM) -> memoryview | None:
    """The VM's per-CPU page as u32 words, or None (one vCPU, real mode, no page in RAM)."""
    m = vm.machine
    if not vm.smp or m.mode is Mode.REAL or m.layout is None or not m.layout.percpu:
        return None
    try:
        return m.memory.view(m.layout.percpu, PAGE_SIZE).cast("I")
    except (GuestMemoryError, ValueError, TypeError):
        return None


def _targets(uses_weights: bool, weights: Sequence[float]) -> list[float]:
    if uses_weights:
        total = sum(weights)
        return [w / total for w in weights]
    return [1 / len(weights)] * len(weights)


def nice_values(weights: Sequence[float]) -> list[int]:
    """The nice value (0..19) whose kernel weight, relative to nice 0 for the heaviest VM, is
    closest (in ratio) to each VM's weight. Only ever raising nice needs no privilege."""
    top = max(weights)
    out = []
    for w in weights:
        ratio = math.log(w / top)
        out.append(min(range(20), key=lambda n: abs(math.log(NICE_WEIGHTS[n] / 1024) - ratio)))
    return out


# A bundled example's cached build: NAME-MODE-HASH.elf (kvmpy.sdk.examples).
_EXAMPLE_BUILD = re.compile(r"^(.+)-(?:real|protected|paged32|long|long-user)-[0-9a-f]{16}$")


def _default_name(machine: Machine, index: int) -> str:
    """The image's file name without its suffix (an example's name for a bundled one)."""
    image = machine.image
    if image is None or not image.path:
        return f"vm{index}"
    stem = os.path.basename(image.path).split(".")[0] or f"vm{index}"
    m = _EXAMPLE_BUILD.match(stem)
    return m.group(1) if m else stem


def _ctxt_switches() -> int:
    """Context switches of the calling thread so far (voluntary and not), per the kernel."""
    total = 0
    try:
        with open("/proc/thread-self/status") as f:
            for line in f:
                if "ctxt_switches:" in line:
                    total += int(line.split()[-1])
    except (OSError, ValueError):
        return 0
    return total


# Nanoseconds per unit: 100us must be exactly 1e-4 s, not 100 * 1e-6.
_UNITS = {"us": 1e3, "µs": 1e3, "ms": 1e6, "s": 1e9, "m": 60e9, "min": 60e9}


def parse_duration(text: str) -> float:
    """'10ms', '5s', '250us', '1.5' (seconds), '2m' -> seconds."""
    s = text.strip().lower()
    num, unit = s, "s"
    for u in sorted(_UNITS, key=len, reverse=True):
        if s.endswith(u):
            num, unit = s[: -len(u)].strip(), u
            break
    try:
        value = round(float(num) * _UNITS[unit]) / 1e9
    except (ValueError, OverflowError):
        raise SchedError(
            f"not a duration: {text!r} (use a finite number with a unit, e.g. 10ms, 5s, 250us)"
        ) from None
    if not math.isfinite(value) or value < 0:
        raise SchedError(
            f"not a duration: {text!r} (use a finite number with a unit, e.g. 10ms, 5s, 250us)"
        )
    return value
