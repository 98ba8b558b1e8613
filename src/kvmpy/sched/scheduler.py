"""Many VMs, one vCPU each, sharing one host CPU: the scheduling loop and its accounting.

    from kvmpy.sched import Scheduler

    sched = Scheduler([neo, morpheus], "weighted", weights=[7, 3], quantum=0.010)
    result = sched.run(duration=5.0)
    print(result.vm("neo").host_share, result.switch_cost_us)

`on-io`, `timer` and `weighted` run every VM on the calling thread, one `Vcpu.run()` at a time.
A slice ends at a port-I/O exit (`on-io`, through `Vcpu.yield_on_io`) or when a host timer
fires: `setitimer(ITIMER_REAL)` raises SIGALRM, whose handler asks the running vCPU to pause
(`request_pause`: `kvm_run.immediate_exit` plus the signal itself, which makes KVM_RUN return
EINTR), so even a guest that never exits gives the CPU back. `threads` runs each vCPU in its
own host thread, all pinned to one CPU, and leaves the choice to the host's scheduler (CFS or
EEVDF), with the weights turned into nice values: the baseline.

Accounting, per VM: host CPU time (the thread's CPU clock around each slice: what shares are
computed from and what the weighted policy charges), host-clock time inside `Vcpu.run()` and
the part of it inside KVM_RUN, the guest's own progress counter (kvmpy.sched.progress), slices
and switches; per switch, the time from the preemption (the timer's expiry, or the VM's exit)
to the next VM's entry. docs/sched.md defines every figure.

Signals are process-wide and Python runs their handlers in the main thread, so the scheduler
runs in the main thread (it raises SchedError elsewhere), owns SIGALRM and ITIMER_REAL while
it runs, and restores both after.
"""

from __future__ import annotations

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

from ..kvm import constants as K
from ..limits import duration_problem
from ..machine import Machine
from ..result import Stop
from .errors import SchedError
from .policy import DeficitShares, Policy, RoundRobin, check_weights, target_shares
from .progress import ProgressCounter, find_counter
from .report import Samples, ScheduleResult, Timeline, VMReport

log = logging.getLogger(__name__)

#: Below this a slice is mostly the cost of leaving and re-entering the guest (~0.1 ms on
#: KVM-PVM, measured by `kvmpy bench sched`), and the VMs would do little but switch.
MIN_QUANTUM = 100e-6
DEFAULT_QUANTUM = 0.010
#: Timeline samples are taken at most this often, and at most MAX_SAMPLES are kept (older ones
#: are thinned out by half when the limit is reached), so a long run stays in bounded memory.
SAMPLE_INTERVAL = 0.010
MAX_SAMPLES = 4000
#: setitimer rounds to microseconds, and a zero value would disarm the timer instead.
MIN_ARM_NS = 1000
#: The threads policy's main thread wakes this often to sample, display and check the end.
THREADS_POLL = 0.020

# The host kernel's weight for each nice value 0..19 (kernel/sched/core.c,
# sched_prio_to_weight): what the threads baseline uses to stand for the VMs' weights.
NICE_WEIGHTS = (
    1024, 820, 655, 526, 423, 335, 272, 215, 172, 137,
    110, 87, 70, 56, 45, 36, 29, 23, 18, 15,
)  # fmt: skip

OnTick = Callable[[ScheduleResult], None]


@dataclass(frozen=True)
class SchedVM:
    """One VM to schedule: a machine with its image loaded, and how to treat it."""

    machine: Machine
    weight: float = 1.0
    name: str | None = None
    #: Where the guest's progress counter is; default: its image's `kvmpy_progress` symbol.
    progress_gpa: int | None = None


class _VM:
    """The scheduler's bookkeeping for one VM."""

    def __init__(self, index: int, spec: SchedVM, name: str, counter: ProgressCounter | None):
        self.index = index
        self.machine = spec.machine
        self.vcpu = spec.machine.vcpus[0]
        self.name = name
        self.weight = float(spec.weight)
        self.counter = counter
        #: Why the VM stopped; a VM that stopped stays out of later runs of the scheduler.
        self.stop: Stop | None = None
        self.stopped_at_ns: int | None = None
        self.reset()

    def reset(self) -> None:
        self.host_ns = 0
        self.cpu_ns = 0
        self.slices = 0
        self.switches = 0
        self.switch_ns = 0
        self.progress_start = self.counter.read() if self.counter else 0
        # Raw sums, not ExitStats' estimate: during a schedule every exit is timed
        # (exact_timing), so the difference is exactly the VMM's time on this run's exits.
        self.vmm_start_ns = sum(self.vcpu.stats.vmm_ns)
        # threads policy
        self.nice: int | None = None
        self.thread: threading.Thread | None = None
        self.cpu_clock: int | None = None
        self.cpu_start_ns = 0
        self.ctxt_switches = 0
        self.error: BaseException | None = None

    def progress(self) -> int | None:
        if self.counter is None:
            return None
        return ProgressCounter.delta(self.progress_start, self.counter.read())


class Scheduler:
    """Runs several single-vCPU machines on one host CPU under a policy.

    `vms` are Machines (with images loaded) or SchedVMs; `weights` (or each SchedVM's weight)
    matter to the `weighted` and `threads` policies; `quantum` (seconds) is the slice length
    of `timer` and `weighted`; `cpu` is the host CPU everything is pinned to (default: the
    last one this process may use; `pin=False`: no pinning).
    """

    def __init__(
        self,
        vms: Sequence[Machine | SchedVM],
        policy: Policy | str = Policy.WEIGHTED,
        *,
        weights: Sequence[float] | None = None,
        names: Sequence[str] | None = None,
        quantum: float = DEFAULT_QUANTUM,
        cpu: int | None = None,
        pin: bool = True,
    ):
        self.policy = Policy.parse(policy)
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
        seen: set[int] = set()
        for s in specs:
            if id(s.machine) in seen:
                raise SchedError("the same machine is listed twice; each VM needs its own")
            seen.add(id(s.machine))
            if s.machine.boot is None:
                raise SchedError("load an image into every machine before scheduling it")
        allowed = os.sched_getaffinity(0)
        if cpu is None:
            cpu = max(allowed)
        elif cpu not in allowed:
            raise SchedError(
                f"CPU {cpu} is not one this process may use (allowed: "
                f"{','.join(map(str, sorted(allowed)))})"
            )
        self.cpu: int | None = cpu if pin else None
        self._vms: list[_VM] = []
        used: dict[str, int] = {}
        for i, s in enumerate(specs):
            base = s.name or _default_name(s.machine, i)
            used[base] = used.get(base, 0) + 1
            name = base if used[base] == 1 else f"{base}-{used[base]}"
            counter = find_counter(s.machine, s.progress_gpa, owner=name)
            self._vms.append(_VM(i, s, name, counter))
        self._running: _VM | None = None
        self._interrupted = False
        #: The signal that ended the schedule (SIGINT, SIGTERM), if one did.
        self.signal: int | None = None
        self._ending = False
        self._t_start = 0
        self._cpu_start = self._cpu_total = 0
        self._timeline = Timeline()
        self._sample_ns = int(SAMPLE_INTERVAL * 1e9)
        self._switch_cost = Samples()
        self._exit_latency = Samples()

    @property
    def names(self) -> list[str]:
        return [v.name for v in self._vms]

    # --- signal handlers (run in the main thread, between bytecodes or on EINTR) -------------

    def _on_alarm(self, signum, frame) -> None:
        vm = self._running
        if vm is not None:
            vm.vcpu.request_pause()

    def _on_sigint(self, signum, frame) -> None:
        self._interrupted = True
        self.signal = signum
        vm = self._running
        if vm is not None:
            vm.vcpu.request_pause()

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
        self._switch_cost = Samples()
        self._exit_latency = Samples()
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
                stack.enter_context(self._single_thread_setup())
                self._cpu_start = time.thread_time_ns()
                self._t_start = time.perf_counter_ns()
                deadline = self._t_start + length if length is not None else None
                end = self._run_one_thread(deadline, on_tick, tick_ns)
                self._cpu_total = time.thread_time_ns() - self._cpu_start
        self._sample(end)
        return self._result(end, duration)

    @contextmanager
    def _vcpu_setup(self):
        saved = [(vm.vcpu.yield_on_io, vm.vcpu.exact_timing) for vm in self._vms]
        try:
            for vm in self._vms:
                vm.vcpu.yield_on_io = self.policy is Policy.ON_IO
                # Every exit timed, so that host time splits exactly into KVM_RUN and VMM time.
                vm.vcpu.exact_timing = True
            yield
        finally:
            for vm, (yio, exact) in zip(self._vms, saved, strict=True):
                vm.vcpu.cancel_pause()
                vm.vcpu.yield_on_io, vm.vcpu.exact_timing = yio, exact

    @contextmanager
    def _single_thread_setup(self):
        old_alarm = signal.signal(signal.SIGALRM, self._on_alarm)
        before = os.sched_getaffinity(0)
        try:
            if self.cpu is not None:
                os.sched_setaffinity(0, {self.cpu})
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            self._running = None
            signal.signal(signal.SIGALRM, old_alarm)
            os.sched_setaffinity(0, before)

    def _run_one_thread(self, deadline: int | None, on_tick: OnTick | None, tick_ns: int | None):
        # Locals for everything the loop touches per slice: at a 1 ms quantum this loop's
        # own time is part of every switch it measures.
        now = time.perf_counter_ns
        cpu_clock = time.thread_time_ns
        setitimer, ITIMER_REAL = signal.setitimer, signal.ITIMER_REAL
        vms = self._vms
        picker = DeficitShares(self.weights) if self.policy is Policy.WEIGHTED else RoundRobin()
        yielding = self.policy is Policy.ON_IO
        quantum = None if yielding else int(self.quantum * 1e9)
        exit_io = K.ExitReason.IO
        switch_cost, exit_latency = self._switch_cost, self._exit_latency
        runnable = [vm.index for vm in vms if vm.stop is None]
        start = self._t_start
        next_tick = start + tick_ns if tick_ns else None
        next_sample = start + self._sample_ns
        prev: int | None = None
        t_preempt = 0
        while runnable and not self._interrupted:
            if deadline is not None and now() >= deadline:
                break
            i = picker.pick(runnable, prev)
            vm = vms[i]
            vcpu = vm.vcpu
            counts = vcpu.stats.counts
            switched = prev is not None and i != prev
            first = True
            ran = used = 0
            by_timer = False
            expiry = 0
            slice_end = None if quantum is None else now() + quantum
            while True:
                # The timer goes off at the soonest of the slice's end, the deadline and the
                # next display tick; a tick resumes the same VM in the same slice.
                limit = slice_end
                if deadline is not None and (limit is None or deadline < limit):
                    limit = deadline
                if next_tick is not None and (limit is None or next_tick < limit):
                    limit = next_tick
                self._running = vm
                if self._interrupted:  # Ctrl-C came before the handler could see this VM
                    self._running = None
                    break
                if limit is not None:
                    t_arm = now()
                    wait = max(limit - t_arm, MIN_ARM_NS)
                    setitimer(ITIMER_REAL, wait / 1e9)
                    expiry = t_arm + wait
                c0 = cpu_clock()
                t_enter = now()
                if first:
                    first = False
                    if switched:
                        cost = t_enter - t_preempt
                        switch_cost.add(cost)
                        vm.switches += 1
                        vm.switch_ns += cost
                ios = counts[exit_io]
                stop = vcpu.run()
                t_ret = now()
                c1 = cpu_clock()
                self._running = None
                if limit is not None:
                    setitimer(ITIMER_REAL, 0)
                vcpu.cancel_pause()  # a signal that landed after run() returned
                ran += t_ret - t_enter
                used += c1 - c0
                if stop is not None:
                    vm.stop = stop
                    vm.stopped_at_ns = t_ret - start
                    break
                if self._interrupted:
                    break
                if yielding and counts[exit_io] != ios:
                    break  # on-io: the VM made a port-I/O exit; the next one gets the CPU
                if limit is not None and t_ret >= expiry:
                    if slice_end is not None and t_ret >= slice_end:
                        by_timer = True
                        exit_latency.add(t_ret - expiry)
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
            vm.host_ns += ran
            vm.cpu_ns += used
            vm.slices += 1
            # CPU time, not wall time: if the host lends our CPU to another process during a
            # slice, the VM is charged only for what it got.
            picker.charge(i, used, runnable)
            if vm.stop is not None:
                runnable.remove(i)
            prev = i
            # Preemption: when the timer expired, or when the VM exited (stop or I/O).
            t_preempt = expiry if by_timer else t_ret
            # Sampling and the display are measurement, not scheduling: keep them out of the
            # switch cost by moving the preemption time past them.
            t_book = now()
            if t_book >= next_sample:
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
        runnable = [vm for vm in self._vms if vm.stop is None]
        barrier = threading.Barrier(len(runnable) + 1)
        for vm in runnable:
            vm.nice = nices[vm.index]
            vm.thread = threading.Thread(
                target=self._worker, args=(vm, barrier), name=f"vcpu-{vm.name}", daemon=True
            )
            vm.thread.start()
        try:
            barrier.wait(timeout=30)
        except threading.BrokenBarrierError:
            self._ending = True
            raise SchedError("the vCPU threads did not start") from None
        start = self._t_start = now()
        deadline = start + length if length is not None else None
        for vm in runnable:
            try:
                vm.cpu_clock = time.pthread_getcpuclockid(vm.thread.ident)  # type: ignore[union-attr]
            except (OSError, TypeError):
                vm.cpu_clock = None
        next_tick = start + tick_ns if tick_ns else None
        next_sample = start
        try:
            while not self._interrupted:
                t = now()
                if deadline is not None and t >= deadline:
                    break
                if all(not vm.thread.is_alive() for vm in runnable):  # type: ignore[union-attr]
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
            for vm in runnable:
                vm.vcpu.request_pause(kick=True)
            for vm in runnable:
                t = vm.thread
                while t is not None and t.is_alive():
                    t.join(0.05)
                    vm.vcpu.request_pause(kick=True)  # it may have been between two run()s
                vm.vcpu.cancel_pause()
        errors = [vm for vm in self._vms if vm.error is not None]
        if errors:
            vm = errors[0]
            raise SchedError(f"the vCPU thread of {vm.name} failed: {vm.error}") from vm.error
        return end

    def _worker(self, vm: _VM, barrier: threading.Barrier) -> None:
        vcpu = vm.vcpu
        try:
            if self.cpu is not None:
                os.sched_setaffinity(0, {self.cpu})
            if vm.nice:
                try:
                    # Per thread on Linux: who=0 is the calling thread.
                    os.setpriority(os.PRIO_PROCESS, 0, vm.nice)
                except OSError as e:
                    log.warning("cannot set nice %d for %s: %s", vm.nice, vm.name, e)
                    vm.nice = None
            barrier.wait(timeout=30)
            ctxt0 = _ctxt_switches()
            c0 = vm.cpu_start_ns = time.thread_time_ns()
            t0 = time.perf_counter_ns()
            try:
                while not self._ending:
                    stop = vcpu.run()
                    if stop is not None:
                        vm.stop = stop
                        vm.stopped_at_ns = time.perf_counter_ns() - self._t_start
                        break
            finally:
                vm.cpu_ns = time.thread_time_ns() - c0
                vm.host_ns = time.perf_counter_ns() - t0
                vm.ctxt_switches = vm.switches = _ctxt_switches() - ctxt0
        except BaseException as e:  # reported by the main thread
            vm.error = e
            try:
                barrier.abort()
            except threading.BrokenBarrierError:
                pass

    # --- figures -------------------------------------------------------------------------------

    def _cpu_ns(self, vm: _VM) -> int:
        """Host CPU time spent running the VM so far (of a vCPU thread that is still running,
        read from its CPU clock)."""
        t = vm.thread
        if t is not None and t.is_alive() and vm.cpu_clock is not None and vm.cpu_start_ns:
            try:
                return time.clock_gettime_ns(vm.cpu_clock) - vm.cpu_start_ns
            except OSError:
                pass
        return vm.cpu_ns

    def _host_ns(self, vm: _VM, t: int) -> int:
        """Host-clock time the VM spent inside Vcpu.run() so far."""
        th = vm.thread
        if th is not None and th.is_alive() and self.policy is Policy.THREADS:
            return t - self._t_start
        return vm.host_ns

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

    def _result(self, end: int, duration: float | None, live: bool = False) -> ScheduleResult:
        threads = self.policy is Policy.THREADS
        targets = target_shares(self.policy, self.weights)
        cpu = [self._cpu_ns(vm) for vm in self._vms]
        cpu_total = sum(cpu)
        progress = [vm.progress() for vm in self._vms]
        prog_total = sum(p for p in progress if p is not None)
        reports = []
        for vm, c, p, target in zip(self._vms, cpu, progress, targets, strict=True):
            vmm = max(0, sum(vm.vcpu.stats.vmm_ns) - vm.vmm_start_ns)
            h = self._host_ns(vm, end)
            stop = vm.stop
            reports.append(
                VMReport(
                    name=vm.name,
                    image=vm.machine.image.path if vm.machine.image else None,
                    weight=vm.weight,
                    target_share=target,
                    host_s=h / 1e9,
                    kvm_run_s=max(0.0, h - vmm) / 1e9,
                    cpu_s=c / 1e9,
                    host_share=c / cpu_total if cpu_total else None,
                    progress=p,
                    progress_share=(p / prog_total if prog_total else None)
                    if p is not None
                    else None,
                    switches=vm.switches,
                    slices=None if threads else vm.slices,
                    switch_cost_us_mean=vm.switch_ns / vm.switches / 1e3
                    if vm.switches and not threads
                    else None,
                    state="running" if stop is None else stop.reason.value,
                    exit_code=None if stop is None else stop.exit_code,
                    message="" if stop is None else stop.message,
                    stopped_at_s=None if vm.stopped_at_ns is None else vm.stopped_at_ns / 1e9,
                    nice=vm.nice if threads else None,
                )
            )
        sc, el = self._switch_cost, self._exit_latency
        cpu_all = cpu_total if threads or live else self._cpu_total
        return ScheduleResult(
            policy=self.policy.value,
            quantum_s=self.quantum if self.policy in (Policy.TIMER, Policy.WEIGHTED) else None,
            duration_s=max(0, end - self._t_start) / 1e9,
            duration_limit_s=duration,
            vms=reports,
            switch_cost_us=None if sc.median is None else sc.median / 1e3,
            switch_cost_us_mean=None if sc.mean is None else sc.mean / 1e3,
            exit_latency_us=None if el.median is None else el.median / 1e3,
            cpu_total_s=cpu_all / 1e9,
            cpu=self.cpu,
            interrupted=self._interrupted,
            timeline=self._timeline if not live else Timeline(),
        )


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
