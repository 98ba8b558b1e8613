"""SMP for kvmpy's own guests: secondary vCPUs started and parked by hypercall.

A Linux guest starts its secondaries itself (INIT/SIPI through the in-kernel LAPIC). kvmpy's
SDK guests run in 32- or 64-bit modes from the first instruction, so kvmpy starts them the
paravirtual way (like Xen's VCPUOP_up): CPU 0 runs the image; the others wait, parked in the
VMM, until `hc_cpu_start(cpu, entry, a0, a1)` makes CPU `cpu` run `entry(a0, a1)` on its own
stack; `hc_cpu_park()` ends its run and parks it again; `hc_cpu_wait(mask)` blocks the caller
until every CPU in `mask` is parked. A parked or waiting vCPU sleeps outside the guest: it costs
no host CPU, which matters when vCPUs outnumber host CPUs.

Blocking is a pause of the calling vCPU plus a predicate (`blocked(i)`) its driver checks: the
vCPU thread (vmm/vcpus.py) sleeps on it, a single-thread scheduler skips the vCPU. Guest
arguments are checked like every hypercall's (-EINVAL for a CPU that does not exist or is
the caller, -EBUSY for one that is running).
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..hypercalls import HypercallContext, Hypercalls

if TYPE_CHECKING:
    from ..arch.x86.modes import BootState
    from ..hv.base import VcpuBackend

HC_CPU_START = 7
HC_CPU_PARK = 8
HC_CPU_WAIT = 9

EINVAL = -errno.EINVAL
EBUSY = -errno.EBUSY


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

    def park_secondaries(self, boot: BootState) -> None:
        """kvmpy images start on CPU 0 only."""
        self.boot = boot
        with self._lock:
            for i in range(1, self.n):
                self.parked[i] = True

    def blocked(self, i: int) -> bool:
        if self.parked[i]:
            return True
        mask = self.waiting[i]
        if mask:
            if all(self.parked[c] for c in range(self.n) if mask >> c & 1):
                self.waiting[i] = 0
                return False
            return True
        return False

    def prepare(self, i: int) -> None:
        """Load a started vCPU's registers (in its own thread, before it enters the guest)."""
        with self._lock:
            pending, self._pending[i] = self._pending[i], None
        if pending is not None and self.boot is not None:
            entry, args = pending
            self.vcpus[i].set_regs(self.boot.ap_regs(i, entry, args))

    def blocked_all(self) -> bool:
        """Every vCPU parked or waiting: nothing can wake them (the guest deadlocked)."""
        return all(self.blocked(i) for i in range(self.n))

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

    def register(self, hypercalls: Hypercalls) -> None:
        hypercalls.register(HC_CPU_START, self.hc_start, "cpu_start", replace=True)
        hypercalls.register(HC_CPU_PARK, self.hc_park, "cpu_park", replace=True)
        hypercalls.register(HC_CPU_WAIT, self.hc_wait, "cpu_wait", replace=True)

    def state(self) -> dict:
        with self._lock:
            return {
                "parked": list(self.parked),
                "waiting": list(self.waiting),
                "pending": [list(p[:1]) + list(p[1]) if p else None for p in self._pending],
            }

    def restore(self, d: dict) -> None:
        with self._lock:
            self.parked = [bool(x) for x in d["parked"]][: self.n]
            self.waiting = [int(x) for x in d["waiting"]][: self.n]
            self._pending = [
                (int(p[0]), tuple(int(a) for a in p[1:])) if p else None for p in d["pending"]
            ][: self.n]
