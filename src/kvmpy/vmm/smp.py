"""SMP for kvmpy's own guests: secondary vCPUs started and parked by hypercall.

A Linux guest starts its secondaries itself (INIT/SIPI through the in-kernel LAPIC). kvmpy's
SDK guests run in 32- or 64-bit modes from the first instruction, so kvmpy starts them the
paravirtual way (like Xen's VCPUOP_up): CPU 0 runs the image; the others wait, parked in the
VMM, until `hc_cpu_start(cpu, entry, a0, a1)` makes CPU `cpu` run `entry(a0, a1)` on its own
stack; `hc_cpu_park()` ends its run and parks it again; `hc_cpu_wait(mask)` blocks the caller
until every CPU in `mask` is parked. A parked or waiting vCPU sleeps outside the guest: it costs
no host CPU, which matters when vCPUs outnumber host CPUs.

Paravirtual scheduling (kvmpy/spinlock.h; every machine, one vCPU or many): `vcpu_wait(addr,
val)` blocks the caller until another vCPU's `vcpu_kick(cpu)` (a kick that comes first is kept:
the next wait returns at once, like KVM's PV unhalt), unless the u32 at `addr` no longer holds
`val` (the futex check, done in the VMM). `vcpu_yield(cpu)` gives up the CPU, to `cpu` if the
driver can (a directed yield: the single-thread scheduler switches to it at once; vCPU threads
can only sched_yield()).

Blocking is a pause of the calling vCPU plus a predicate (`blocked(i)`) its driver checks: the
vCPU thread (vmm/vcpus.py) sleeps on it, a single-thread scheduler skips the vCPU. Guest
arguments are checked like every hypercall's (-EINVAL for a CPU that does not exist or is
the caller, -EBUSY for one that is running, -EINVAL for reserved arguments that are not 0).
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import GuestMemoryError
from ..hypercalls import HypercallContext, Hypercalls

if TYPE_CHECKING:
    from ..arch.x86.modes import BootState
    from ..hv.base import VcpuBackend

HC_CPU_START = 7
HC_CPU_PARK = 8
HC_CPU_WAIT = 9
HC_VCPU_WAIT = 10
HC_VCPU_KICK = 11
HC_VCPU_YIELD = 12

#: vcpu_yield's "no vCPU in particular" (32- and 64-bit all ones).
YIELD_ANY = (0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF)

EINVAL = -errno.EINVAL
EBUSY = -errno.EBUSY
EAGAIN = -errno.EAGAIN
EFAULT = -errno.EFAULT

#: A yield hook: (vCPU that yields, the vCPU it names or None).
YieldHook = Callable[[int, "int | None"], None]


class SmpState:
    """Which vCPUs are parked or waiting, and what a started one runs next."""

    def __init__(self, vcpus: list[VcpuBackend], wake: Callable[[], None] = lambda: None):
        self.vcpus = vcpus
        self.n = len(vcpus)
        self._lock = threading.Lock()
        self.parked = [False] * self.n
        self.waiting: list[int] = [0] * self.n  # CPU mask the vCPU waits for, 0: none
        self._pending: list[tuple[int, tuple[int, ...]] | None] = [None] * self.n
        self.boot: BootState | None = None
        #: Called after a change that may unblock a vCPU (the vCPU threads re-check).
        self.wake = wake
        self.starts = 0
        #: A kick not yet consumed by a wait, per vCPU (at most one is kept).
        self.kicked = [False] * self.n
        #: Blocked in vcpu_wait until kicked.
        self.kick_waiting = [False] * self.n
        #: Set by a driver that can switch vCPUs itself (the single-thread scheduler): called by
        #: vcpu_yield, which then pauses the caller. None: vCPU threads, where a yield is
        #: sched_yield().
        self.on_yield: YieldHook | None = None
        #: Calls per vCPU, for statistics.
        self.waits = [0] * self.n
        self.kicks = [0] * self.n
        self.yields = [0] * self.n

    def park_secondaries(self, boot: BootState) -> None:
        """kvmpy images start on CPU 0 only."""
        self.boot = boot
        with self._lock:
            for i in range(1, self.n):
                self.parked[i] = True

    def blocked(self, i: int) -> bool:
        if self.parked[i]:
            return True
        if self.kick_waiting[i]:
            with self._lock:
                return self._blocked(i)
        mask = self.waiting[i]
        if mask:
            if all(self.parked[c] for c in range(self.n) if mask >> c & 1):
                self.waiting[i] = 0
                return False
            return True
        return False

    def _blocked(self, i: int) -> bool:
        """blocked(i), with the lock held."""
        if self.parked[i]:
            return True
        if self.kick_waiting[i]:
            if not self.kicked[i]:
                return True
            # The kick ends the wait, and is spent on it.
            self.kicked[i] = self.kick_waiting[i] = False
            return False
        mask = self.waiting[i]
        if mask:
            if all(self.parked[c] for c in range(self.n) if mask >> c & 1):
                self.waiting[i] = 0
                return False
            return True
        return False

    def prepare(self, i: int, before: Callable[[], None] | None = None) -> None:
        """Load a started vCPU's registers (in its own thread, before it enters the guest).
        `before()` runs first when there is a start to load: a driver that has not completed
        the vCPU's last I/O instruction (KVM would skip it past the new registers) does it
        there."""
        with self._lock:
            pending, self._pending[i] = self._pending[i], None
        if pending is not None and self.boot is not None:
            if before is not None:
                before()
            entry, args = pending
            self.vcpus[i].set_regs(self.boot.ap_regs(i, entry, args))

    def blocked_all(self) -> bool:
        """Every vCPU parked or waiting: nothing can wake them (the guest deadlocked). One
        snapshot under the lock that kicks, starts and parks take: vCPU by vCPU, a kick landing
        between two looks would make a live guest look dead."""
        with self._lock:
            return all(self._blocked(i) for i in range(self.n))

    # --- hypercalls ----------------------------------------------------------------------

    def hc_start(self, ctx: HypercallContext, cpu: int, entry: int, a0: int, a1: int) -> int:
        if not 0 <= cpu < self.n or cpu == ctx.cpu or self.boot is None:
            return EINVAL
        with self._lock:
            if not self.parked[cpu]:
                return EBUSY
            self._pending[cpu] = (entry, (a0, a1))
            self.parked[cpu] = False
            self.starts += 1
        self.wake()
        return 0

    def hc_park(self, ctx: HypercallContext, a0: int, a1: int, a2: int, a3: int) -> int:
        if ctx.cpu == 0:
            return EINVAL  # CPU 0 runs the image; it ends it with hc_exit
        with self._lock:
            self.parked[ctx.cpu] = True
        ctx.vcpu.request_pause()
        self.wake()
        return 0

    def hc_wait(self, ctx: HypercallContext, mask: int, a1: int, a2: int, a3: int) -> int:
        if mask == 0 or mask >> self.n or mask >> ctx.cpu & 1:
            return EINVAL
        if all(self.parked[c] for c in range(self.n) if mask >> c & 1):
            return 0
        self.waiting[ctx.cpu] = mask
        ctx.vcpu.request_pause()
        return 0

    def hc_vcpu_wait(
        self, ctx: HypercallContext, addr: int, expected: int, a2: int, a3: int
    ) -> int:
        if a2 or a3:
            return EINVAL
        i = ctx.cpu
        if addr:
            if addr & 3:
                return EINVAL
            try:
                value = int.from_bytes(ctx.vmem().read(addr, 4), "little")
            except GuestMemoryError:
                return EFAULT
            if value != expected & 0xFFFF_FFFF:
                return EAGAIN  # it changed already: nothing to wait for
        self.waits[i] += 1
        with self._lock:
            if self.kicked[i]:
                self.kicked[i] = False
                return 0
            self.kick_waiting[i] = True
        ctx.vcpu.request_pause()
        return 0

    def hc_vcpu_kick(self, ctx: HypercallContext, cpu: int, a1: int, a2: int, a3: int) -> int:
        if a1 or a2 or a3 or not 0 <= cpu < self.n:
            return EINVAL
        self.kicks[ctx.cpu] += 1
        with self._lock:
            self.kicked[cpu] = True
            waiting = self.kick_waiting[cpu]
        if waiting:
            self.wake()
        return 0

    def hc_vcpu_yield(self, ctx: HypercallContext, cpu: int, a1: int, a2: int, a3: int) -> int:
        if a1 or a2 or a3:
            return EINVAL
        if cpu in YIELD_ANY:
            target = None
        elif 0 <= cpu < self.n and cpu != ctx.cpu:
            target = cpu
        else:
            return EINVAL
        self.yields[ctx.cpu] += 1
        hook = self.on_yield
        if hook is not None:
            hook(ctx.cpu, target)
            ctx.vcpu.request_pause()
        else:
            # A host thread per vCPU: the host decides who runs next, whatever the target.
            os.sched_yield()
        return 0

    def register(self, hypercalls: Hypercalls) -> None:
        """The SMP hypercalls (machines with more than one vCPU)."""
        hypercalls.register(HC_CPU_START, self.hc_start, "cpu_start", replace=True)
        hypercalls.register(HC_CPU_PARK, self.hc_park, "cpu_park", replace=True)
        hypercalls.register(HC_CPU_WAIT, self.hc_wait, "cpu_wait", replace=True)

    def register_pv(self, hypercalls: Hypercalls) -> None:
        """Wait, kick and yield (every machine)."""
        hypercalls.register(HC_VCPU_WAIT, self.hc_vcpu_wait, "vcpu_wait", replace=True)
        hypercalls.register(HC_VCPU_KICK, self.hc_vcpu_kick, "vcpu_kick", replace=True)
        hypercalls.register(HC_VCPU_YIELD, self.hc_vcpu_yield, "vcpu_yield", replace=True)

    def state(self) -> dict:
        with self._lock:
            return {
                "parked": list(self.parked),
                "waiting": list(self.waiting),
                "kicked": list(self.kicked),
                "kick_waiting": list(self.kick_waiting),
                "pending": [list(p[:1]) + list(p[1]) if p else None for p in self._pending],
            }

    def restore(self, d: dict) -> None:
        with self._lock:
            self.parked = [bool(x) for x in d["parked"]][: self.n]
            self.waiting = [int(x) for x in d["waiting"]][: self.n]
            # A start the snapshot caught before its vCPU loaded the registers.
            self._pending = [
                (int(p[0]), tuple(int(a) for a in p[1:])) if p else None for p in d["pending"]
            ][: self.n]
            # Snapshots from before vcpu_wait have neither (nobody waited); pad to n.
            pad = [False] * self.n
            self.kicked = ([bool(x) for x in d.get("kicked", ())] + pad)[: self.n]
            self.kick_waiting = ([bool(x) for x in d.get("kick_waiting", ())] + pad)[: self.n]
