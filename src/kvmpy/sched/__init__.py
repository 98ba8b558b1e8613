"""Scheduling many VMs on one host CPU (`kvmpy sched`, docs/sched.md).

    from kvmpy.sched import Scheduler

    result = Scheduler([neo, morpheus], "weighted", weights=[7, 3], quantum=0.01).run(5.0)
    for vm in result.vms:
        print(vm.name, vm.target_share, vm.host_share, vm.progress_share, vm.switches)

Policies: `on-io` (switch at every port-I/O exit), `timer` (round robin, preempted by a host
timer), `weighted` (deficit-based shares in proportion to weights), `threads` (one host thread
per vCPU; the host's scheduler decides; the baseline). Guests publish their progress in a
`kvmpy_progress` page (guest/include/kvmpy/sched.h).
"""

from .errors import SchedError
from .policy import (
    DeficitShares,
    Policy,
    RoundRobin,
    SchedPolicy,
    VcpuRef,
    VmThenVcpu,
    builtin_policy,
    target_shares,
)
from .progress import ProgressCounter, find_counter
from .report import ScheduleResult, Timeline, VcpuReport, VMReport, plot
from .scheduler import (
    DEFAULT_QUANTUM,
    MIN_QUANTUM,
    Scheduler,
    SchedVM,
    nice_values,
    parse_duration,
)

__all__ = [
    "DEFAULT_QUANTUM",
    "MIN_QUANTUM",
    "DeficitShares",
    "Policy",
    "ProgressCounter",
    "RoundRobin",
    "SchedError",
    "SchedPolicy",
    "SchedVM",
    "ScheduleResult",
    "Scheduler",
    "Timeline",
    "VMReport",
    "VcpuRef",
    "VcpuReport",
    "VmThenVcpu",
    "builtin_policy",
    "find_counter",
    "nice_values",
    "parse_duration",
    "plot",
    "target_shares",
]
