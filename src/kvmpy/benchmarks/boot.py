"""kvmpy bench boot: how long a Linux kernel takes to reach user space, and where the time goes.

One boot (or several, `--runs`) of a kernel with a small initramfs whose /init prints a marker
and powers off. Reported, each as seen by the VMM:

* milestones, in seconds from the first KVM_RUN and in the process's CPU seconds (on a loaded
  shared machine wall time stretches; CPU time much less): first console line, `Run /init`,
  the /init marker, the stop;
* where the wall time went, per vCPU: inside KVM_RUN (guest code, which on a software KVM host
  is emulated ring 0) against VMM time (handling exits in Python); the goal is VMM time at most
  5% of the boot. The same-run reference for the milestones is that split itself: a boot is
  guest work plus VMM work, and this says which one to chase;
* exits by reason and the software-host fallbacks;
* the load average before and after (a boot is only comparable at a similar load);
* with `--sample-hz`, where the guest's time went: vCPU 0 is interrupted at that rate and its
  rip (plus kernel-text words on its stack, a poor man's call chain, as the kernel's guess
  unwinder does) counted; `--system-map` names them.

Goals (issue 10): the minimal microVM kernel to /init in at most 15 s, Debian's cloud kernel in
at most 150 s, VMM time at most 5%.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from collections import Counter
from pathlib import Path

from ..vmm.config import DEFAULT_LINUX_MEMORY
from . import BenchmarkError, positive_int, report

GOAL_INIT_S = {"microvm": 15.0, "debian": 150.0}
GOAL_VMM_SHARE = 0.05
#: /init of the benchmark: the marker (boot/initramfs.py's, which the console monitor knows),
#: then power off (a halt where the kernel has no ACPI).
BENCH_INIT = """#!/bin/sh
echo "kvmpy-init: ready"
busybox poweroff -f
"""
#: How long after the marker a kernel that cannot power off (no ACPI) is given.
AFTER_MARKER_S = 30.0


def _initramfs(applet_links: bool = True) -> Path:
    from .. import benchmarks
    from ..boot.initramfs import build_initramfs

    data = build_initramfs(init=BENCH_INIT, applet_links=applet_links)
    name = "bench-boot-initramfs.cpio" if applet_links else "bench-boot-initramfs-nolinks.cpio"
    return benchmarks.write_cached(name, data)


def boot_once(kernel: str, *, vcpus: int = 1, memory: str = DEFAULT_LINUX_MEMORY,
              acpi: bool = True, mptable: bool = True, append: str = "", timeout: float = 1800.0,
              sample_hz: float = 0.0, console=None, applet_links: bool = True,
              speed_cmdline: bool = True) -> dict:  # fmt: skip
    from ..result import StopReason
    from ..vmm import builder
    from ..vmm.linux import linux_config

    config = linux_config(kernel, initrd=str(_initramfs(applet_links)), vcpus=vcpus, memory=memory,
                          acpi=acpi, mptable=mptable, cmdline=append,
                          speed_cmdline=speed_cmdline)  # fmt: skip
    load0 = os.getloadavg()
    probe0 = cpl0_ns_per_insn()
    cpu0 = time.process_time()
    armed: list[bool] = []

    with builder.build(config, console=console) as m:

        def watch(data: bytes, m=m) -> None:
            if armed or "init_marker" not in m.linux.monitor.milestones:
                return
            armed.append(True)
            # A kernel without ACPI halts on poweroff: end the run a little later.
            t = threading.Timer(
                AFTER_MARKER_S,
                lambda: m.request_stop(StopReason.INTERRUPTED, "the benchmark ended the run"),
            )
            t.daemon = True
            t.start()

        m.output_watchers.append(watch)
        samples: Counter = Counter()
        stop_sampling = threading.Event()
        if sample_hz > 0:
            threading.Thread(target=_sampler, args=(m, sample_hz, samples, stop_sampling),
                             daemon=True, name="boot-sampler").start()  # fmt: skip
        try:
            result = m.run(timeout=timeout)
        finally:
            stop_sampling.set()
        linux = m.linux.to_dict()
        vcpus_stats = [v.stats for v in m.vcpus]
    cpu = time.process_time() - cpu0
    probe1 = cpl0_ns_per_insn()
    if "init_marker" not in linux["milestones_s"]:
        raise BenchmarkError(
            f"the boot did not reach /init's marker: {result.stop_reason.value}: {result.message}"
        )
    milestones = dict(linux["milestones_s"])
    milestones["stop"] = round(result.duration_s, 3)
    per_vcpu = []
    for i, s in enumerate(vcpus_stats):
        per_vcpu.append({
            "vcpu": i,
            "loop_s": round(s.loop_ns / 1e9, 3),
            "kvm_run_s": round(s.run_ns / 1e9, 3),
            "vmm_s": round(s.est_total_vmm_ns / 1e9, 3),
            "exits": s.total,
        })  # fmt: skip
    loop = sum(v["loop_s"] for v in per_vcpu)
    vmm = sum(v["vmm_s"] for v in per_vcpu)
    doc = {
        "kernel": kernel,
        "vcpus": vcpus,
        "memory": memory,
        "acpi": acpi,
        "mptable": mptable,
        "software_host": linux["software_host"],
        "speed_cmdline": linux["speed_cmdline"],
        "stop_reason": result.stop_reason.value,
        "milestones_s": milestones,
        "milestones_cpu_s": linux["milestones_cpu_s"],
        "process_cpu_s": round(cpu, 3),
        "wall_s": round(result.duration_s, 3),
        "kvm_run_s": round(loop - vmm, 3),
        "vmm_s": round(vmm, 3),
        "vmm_share": round(vmm / loop, 4) if loop else None,
        # Run /init in millions of the probe's CPL0 instructions (load-independent-ish).
        "run_init_minsns": round(milestones["run_init"] * 1e3 / ((probe0 + probe1) / 2), 1)
        if "run_init" in milestones
        else None,
        "per_vcpu": per_vcpu,
        "exits": result.exits,
        "fallbacks": dict(sorted(result.stats.fallbacks.items())),
        "ports": {
            f"{p.port:#x}": p.reads + p.writes
            for p in sorted(result.stats.ports.values(), key=lambda p: p.port)
            if p.reads + p.writes
        },  # fmt: skip
        "cpl0_ns_per_insn": [round(probe0, 1), round(probe1, 1)],
        "load_before": [round(x, 2) for x in load0],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "cmdline": linux.get("cmdline", ""),
    }
    if sample_hz > 0:
        doc["samples"] = [[list(k), n] for k, n in samples.most_common()]
        doc["sample_count"] = sum(samples.values())
    return doc


def cpl0_ns_per_insn() -> float:
    """The same-run reference: wall nanoseconds per instruction of kvmpy doctor's CPL0 loop,
    just before and after the boot. On a software host it is the emulator's speed as this
    process gets it at this load (on VT-x/AMD-V, the CPU's); a boot's milestones divided by
    it are comparable across loads."""
    from ..arch.x86.modes import Mode
    from ..doctor import _time_loop

    return _time_loop(None, Mode.LONG, 20_000)


def _sampler(m, hz: float, samples: Counter, stop: threading.Event) -> None:
    """Interrupt vCPU 0 `hz` times a second and note where it was (in its own thread, out of
    KVM_RUN, through the vCPU events)."""
    from ..arch.x86.vmem import Regime, VirtualMemory

    def sample() -> None:
        v = m.vcpus[0]
        regs = v.get_regs()
        key: tuple = (regs.rip,)
        if regs.rip >> 47:
            try:
                vm = VirtualMemory(m.memory, Regime.from_sregs(v.get_sregs()))
                raw = vm.read_partial(regs.rsp, 512)
                words = [
                    int.from_bytes(raw[i : i + 8], "little") for i in range(0, len(raw) - 7, 8)
                ]
                key += tuple(w for w in words if w >> 31 == 0x1_FFFF_FFFF)[:6]
            except Exception:  # noqa: BLE001 - a sample is best effort
                pass
        samples[key] += 1

    while not stop.wait(1 / hz):
        if not m.running:
            continue
        try:
            m.vcpu_call(0, sample)
        except Exception:  # noqa: BLE001 - the VM stopped under us
            return


def symbolize(samples: list, system_map: Path) -> list:
    """[[rip, chain...], n] -> [[\"function+off\", ...], n] with a System.map."""
    addrs, names = [], []
    for line in system_map.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] in "tTwW":
            addrs.append(int(parts[0], 16))
            names.append(parts[2])
    order = sorted(range(len(addrs)), key=addrs.__getitem__)
    addrs = [addrs[i] for i in order]
    names = [names[i] for i in order]

    def name(a: int) -> str:
        i = bisect.bisect_right(addrs, a) - 1
        return f"{names[i]}+{a - addrs[i]:#x}" if i >= 0 and a >> 47 else f"{a:#x}"

    return [[[name(a) for a in key], n] for key, n in samples]


def by_function(samples: list, depth: int = 0) -> list[tuple[str, int]]:
    """Samples summed by the function at `depth` of their chain (0: where the vCPU was)."""
    total: Counter = Counter()
    for key, n in samples:
        if len(key) > depth:
            total[str(key[depth]).split("+")[0]] += n
    return total.most_common()


def measure(kernel: str, *, runs: int = 1, on_run=None, **kw) -> dict:
    from ..cli.boot import resolve_kernel

    path = resolve_kernel(kernel)
    if not Path(path).exists():
        raise BenchmarkError(f"{kernel}: no such kernel (see 'kvmpy kernel list')")
    boots = []
    for i in range(runs):
        boots.append(boot_once(path, **kw))
        if on_run is not None:
            on_run(i, boots[-1])
    name = "debian" if "debian" in path else "microvm" if "microvm" in path else kernel
    init = sorted(b["milestones_s"].get("run_init", float("nan")) for b in boots)
    doc = {
        "kernel": kernel,
        "path": path,
        "runs": boots,
        "median_run_init_s": init[len(init) // 2],
        "goal_run_init_s": GOAL_INIT_S.get(name),
        "goal_vmm_share": GOAL_VMM_SHARE,
    }
    return doc


def add_parser(sub) -> None:
    p = sub.add_parser(
        "boot",
        help="Linux boot time to /init, and where it goes",
        description="Boot a Linux kernel with an initramfs whose /init prints a marker and "
        "powers off: milestones as the VMM sees them (wall and CPU seconds), time inside "
        "KVM_RUN against VMM time (goal: VMM at most 5%%), exits, software-host fallbacks, "
        "the load average. Goals: microvm to /init in 15 s, debian in 150 s.",
    )
    p.add_argument("--kernel", default="microvm", metavar="K",
                   help="microvm (default), debian, or a vmlinux/bzImage path")  # fmt: skip
    p.add_argument("--vcpus", type=positive_int, default=1, metavar="N")
    p.add_argument("--mem", default=DEFAULT_LINUX_MEMORY, metavar="SIZE",
                   help=f"guest RAM (default {DEFAULT_LINUX_MEMORY}, as kvmpy boot)")  # fmt: skip
    p.add_argument("--runs", type=positive_int, default=1, metavar="R")
    p.add_argument("--no-acpi", action="store_true", help="no ACPI tables")
    p.add_argument("--no-mptable", action="store_true",
                   help="no MP table (with --no-acpi: the 8259 in virtual-wire mode, one CPU)")  # fmt: skip
    p.add_argument("--append", action="append", default=[], metavar="CMDLINE",
                   help="more kernel command line (repeatable)")  # fmt: skip
    p.add_argument("--no-speed-cmdline", dest="speed_cmdline", action="store_false",
                   help="leave out the software-host speed-only command line (rodata=off, "
                   "Debian's initcall_blacklist)")  # fmt: skip
    p.add_argument("--sample-hz", type=float, default=0.0, metavar="HZ",
                   help="sample vCPU 0's rip this often (where the guest's time goes)")  # fmt: skip
    p.add_argument("--system-map", metavar="FILE", help="name the samples with this System.map")
    p.add_argument("--console", action="store_true", help="show the guest's console (stderr)")
    p.add_argument("--no-applet-links", action="store_true",
                   help="an initramfs with only /bin/sh linked to busybox")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--timeout", type=float, default=1800.0, metavar="S")
    p.set_defaults(func=cmd_boot, plot=None)


def cmd_boot(args) -> int:
    import sys

    from rich.console import Console

    err = Console(stderr=True, highlight=False)
    console = None
    if args.console:

        def console(data: bytes) -> None:
            sys.stderr.buffer.write(data)
            sys.stderr.flush()

    def on_run(i: int, doc: dict) -> None:
        if not args.json:
            err.print(f"boot {i + 1}/{args.runs}: /init at "
                      f"{doc['milestones_s'].get('run_init', '?')} s")  # fmt: skip

    doc = measure(args.kernel, runs=args.runs, on_run=on_run, vcpus=args.vcpus, memory=args.mem,
                  acpi=not args.no_acpi, mptable=not args.no_mptable, append=" ".join(args.append),
                  timeout=args.timeout, sample_hz=args.sample_hz, console=console,
                  applet_links=not args.no_applet_links,
                  speed_cmdline=args.speed_cmdline)  # fmt: skip
    if args.system_map:
        for b in doc["runs"]:
            if "samples" in b:
                b["samples"] = symbolize(b["samples"], Path(args.system_map))
    return report(args, doc, render, None)


def render(doc: dict, console) -> None:
    from rich.table import Table

    t = Table(title=f"Linux boot: {doc['kernel']} ({doc['path']})")
    for col in ("run", "first line", "Run /init", "marker", "stop", "CPU s to /init",
                "in KVM_RUN", "VMM", "VMM share", "load"):  # fmt: skip
        t.add_column(col, justify="right")
    for i, b in enumerate(doc["runs"]):
        ms, cpu = b["milestones_s"], b["milestones_cpu_s"]
        t.add_row(
            str(i + 1), _s(ms.get("first_line")), _s(ms.get("run_init")),
            _s(ms.get("init_marker")), _s(ms.get("stop")), _s(cpu.get("run_init")),
            _s(b["kvm_run_s"]), _s(b["vmm_s"]),
            f"{b['vmm_share'] * 100:.2f}%" if b["vmm_share"] is not None else "?",
            f"{b['load_before'][0]:.1f}",
        )  # fmt: skip
    console.print(t)
    goal = doc.get("goal_run_init_s")
    if goal:
        console.print(f"median Run /init {doc['median_run_init_s']:.1f} s (goal {goal:.0f} s); "
                      f"VMM share goal {doc['goal_vmm_share'] * 100:.0f}%")  # fmt: skip
    last = doc["runs"][-1]
    console.print(f"exits: {last['exits']}")
    if last["fallbacks"]:
        console.print(f"software-host fallbacks: {last['fallbacks']}")
    if "samples" in last:
        n = last["sample_count"] or 1
        console.print(f"where vCPU 0 was ({last['sample_count']} samples):")
        for fn, c in by_function(last["samples"])[:25]:
            console.print(f"  {c * 100 / n:5.1f}%  {fn}")


def _s(v) -> str:
    return "-" if v is None else f"{v:.2f}"
