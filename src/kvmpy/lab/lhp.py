"""The lock-holder preemption lab (`kvmpy lab lhp`, docs/lhp.md).

An SMP guest (the bundled `lhp` example) runs a spinlock-heavy loop on 1, 2, 4 and 8 vCPUs,
over-committed on 1 and 2 host CPUs, under each lock/scheduling variant:

  (a) naive-threads   naive ticket lock; one host thread per vCPU, the host's scheduler
  (b) naive-sched     naive ticket lock; kvmpy's timer scheduler (every vCPU on one thread)
  (c) pv-sched        paravirtual test-and-set lock (bounded spin, vcpu_wait, unlock kicks)
      pvticket-sched  the same wait/kick around a FIFO ticket lock (Linux's pv ticketlock)
      pv-threads      the paravirtual lock with one host thread per vCPU
  (d) pv-yield-sched  (c) plus a directed yield to a holder the scheduler marks preempted
  (e) pv-grace-sched  (d) plus a scheduler that stretches the slice of a vCPU announcing a
                      held lock (it yields when it releases it): holder preemption avoided

Each run builds a fresh machine, writes the workload's control block and kvmpy/spinlock.h's
configuration through ELF symbols, warms up, measures a window (the guest's own per-CPU
counters, read without exits, before and after), then sets the stop flag and runs the guest
to its exit, which checks that the lock kept the shared counter exact. Runs are repeated in
rounds (every variant once per round, so slow drifts of a shared host fall on all alike);
each figure is the median of the rounds with its range.
"""

from __future__ import annotations

import json
import os
import statistics
import struct
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import KvmpyError

LOCKS = {"ticket": 0, "pv": 1, "pvticket": 2}
LHP_CALIBRATE = 3
MEMORY = "32M"
QUANTUM = 0.010
#: How long a slice may be stretched for an announced lock holder (variant e).
GRACE = 100e-6
#: A critical section that takes longer than this (or three exits, if longer) lost its CPU.
GAP_MIN_S = 20e-6
#: Running the guest to its exit after the window (the naive lock on 8 vCPUs needs a while).
FINISH_TIMEOUT = 120.0


class LabError(KvmpyError):
    """The lab could not run (a guest that failed its check is a result, not this)."""


@dataclass(frozen=True)
class Variant:
    name: str
    letter: str
    lock: str
    driver: str  # "threads" or "timer"
    summary: str
    yield_to_holder: bool = False
    grace: bool = False

    @property
    def naive(self) -> bool:
        return self.lock == "ticket"


VARIANTS = (
    Variant("naive-threads", "a", "ticket", "threads",
            "naive ticket lock, one host thread per vCPU pinned to the host CPUs (Linux decides)"),
    Variant("naive-sched", "b", "ticket", "timer",
            "naive ticket lock, every vCPU on kvmpy's timer scheduler"),
    Variant("pvticket-sched", "c'", "pvticket", "timer",
            "paravirtual ticket lock (FIFO; bounded spin, vcpu_wait, the unlock kicks the next "
            "ticket), kvmpy's timer scheduler"),
    Variant("pv-sched", "c", "pv", "timer",
            "paravirtual test-and-set lock (bounded spin, vcpu_wait, the unlock kicks one "
            "sleeper; lock stealing), kvmpy's timer scheduler"),
    Variant("pv-threads", "c''", "pv", "threads",
            "the paravirtual lock with one host thread per vCPU (Linux decides)"),
    Variant("pv-yield-sched", "d", "pv", "timer",
            "(c) plus a directed yield to a holder the scheduler marks preempted",
            yield_to_holder=True),
    Variant("pv-grace-sched", "e", "pv", "timer",
            "(d) plus holder grace: the scheduler stretches the slice of a vCPU that announces "
            "a held lock, and the vCPU yields when it releases it",
            yield_to_holder=True, grace=True),
)  # fmt: skip
VARIANT = {v.name: v for v in VARIANTS}
MITIGATIONS = tuple(v.name for v in VARIANTS if not v.naive)


@dataclass
class Plan:
    full: bool
    runs: int
    configs: list[tuple[int, int]]  # (vCPUs, host CPUs)
    variants: list[str]
    warmup_s: float
    window_s: float
    cs_iters: int = 1000
    think_iters: int = 3000
    quantum_s: float = QUANTUM
    grace_s: float = GRACE
    host_cpus: dict[int, list[int]] = field(default_factory=dict)

    def items(self) -> list[tuple[int, int, int, str]]:
        """(round, vCPUs, host CPUs, variant), round by round."""
        return [
            (r, n, h, v)
            for r in range(self.runs)
            for n, h in self.configs
            for v in self.variants
            if not (n == 1 and h > 1)
        ]


def plan(full: bool = False, runs: int | None = None, *, cs: int = 1000, think: int = 3000,
         quantum: float = QUANTUM) -> Plan:  # fmt: skip
    cpus = sorted(os.sched_getaffinity(0))
    if full:
        configs = [(1, 1), (2, 1), (4, 1), (8, 1), (2, 2), (4, 2), (8, 2)]
        p = Plan(True, runs or 5, configs, [v.name for v in VARIANTS], 0.3, 2.0)
    else:
        p = Plan(False, runs or 3, [(1, 1), (4, 1)], [v.name for v in VARIANTS], 0.15, 0.4)
    if len(cpus) < 2:
        p.configs = [c for c in p.configs if c[1] == 1]
    # One host CPU: the last this process may use (as kvmpy sched); two: the last two.
    p.host_cpus = {1: cpus[-1:], 2: cpus[-2:]}
    p.cs_iters, p.think_iters, p.quantum_s = cs, think, quantum
    return p


# --- the guest --------------------------------------------------------------------------------


class Workload:
    """The built `lhp` example and the symbols the lab reads and writes."""

    def __init__(self) -> None:
        from ..sdk.examples import find_example

        example = find_example("lhp")
        if example is None:
            raise LabError("the bundled lhp example is missing")
        self.image = example.build()

    def machine(self, vcpus: int, console):
        from ..machine import Machine, MachineConfig

        m = Machine(
            MachineConfig(mode="long-user", memory=MEMORY, vcpus=vcpus),
            console=console,
            capture_output=False,
        )
        try:
            m.load_file(self.image)
        except BaseException:
            m.close()
            raise
        return m


def configure(m, *, lock: int, cs: int, think: int, rounds: int, gap: int, spin_limit: int,
              yield_to_holder: bool) -> None:  # fmt: skip
    sym = m.image.symbols
    m.memory.write(sym["lhp_control"], struct.pack("<IIIIQQ", lock, cs, think, 0, rounds, gap))
    m.memory.write(
        sym["kv_spin_config"], struct.pack("<QQII", spin_limit, gap, int(yield_to_holder), 0)
    )


def stop_guest(m) -> None:
    m.memory.write_u32(m.image.symbols["lhp_control"] + 12, 1)


def read_counters(m, n: int) -> list[dict]:
    """Per CPU: the workload's counters and kvmpy/spinlock.h's statistics."""
    sym = m.image.symbols
    out = []
    for i in range(n):
        done, lhp, cs_cycles = struct.unpack("<3Q", m.memory.read(sym["lhp_cpus"] + 64 * i, 24))
        st = struct.unpack("<8Q", m.memory.read(sym["kv_spin_stats"] + 64 * i, 64))
        out.append(
            dict(done=done, lhp=lhp, cs_cycles=cs_cycles, acquires=st[0], contended=st[1],
                 spin_cycles=st[2], gap_cycles=st[3], waits=st[4], kicks=st[5], yields=st[6],
                 holder_preempted=st[7])
        )  # fmt: skip
    return out


def calibrate(work: Workload, cpu: int) -> dict:
    """The TSC rate and what one exit to the VMM costs at CPL3 (median of 5 runs of 200)."""
    from ..sched import Scheduler

    samples = []
    khz = 0
    for _ in range(5):
        with work.machine(1, None) as m:
            khz = m.vcpus[0].fd.get_tsc_khz()
            configure(m, lock=LHP_CALIBRATE, cs=0, think=0, rounds=200, gap=0, spin_limit=0,
                      yield_to_holder=False)  # fmt: skip
            r = Scheduler([m], "timer", quantum=1.0, cpu=cpu).run(30)
            if r.vms[0].state != "exit":
                raise LabError(f"the calibration guest did not finish: {r.vms[0].message}")
            c = read_counters(m, 1)[0]
            samples.append(c["cs_cycles"] / c["done"])
    cycles = statistics.median(samples)
    return {"tsc_khz": khz, "exit_cycles": cycles, "exit_us": cycles / khz * 1e3}


# --- one run ----------------------------------------------------------------------------------


def run_one(work: Workload, p: Plan, cal: dict, variant: Variant, vcpus: int, hosts: int) -> dict:
    from ..sched import SchedError, Scheduler

    khz = cal["tsc_khz"]
    spin_limit = int(2 * cal["exit_cycles"])  # sleeping costs a wait and a kick
    gap = int(max(GAP_MIN_S * khz * 1e3, 3 * cal["exit_cycles"]))
    cpus = p.host_cpus[hosts]
    tail = bytearray()

    def console(data: bytes) -> None:
        tail.extend(data)
        del tail[:-2048]

    res: dict = {"variant": variant.name, "vcpus": vcpus, "host_cpus": hosts}
    with work.machine(vcpus, console) as m:
        configure(m, lock=LOCKS[variant.lock], cs=p.cs_iters, think=p.think_iters, rounds=0,
                  gap=gap, spin_limit=spin_limit, yield_to_holder=variant.yield_to_holder)  # fmt: skip
        policy = "threads" if variant.driver == "threads" else "timer"
        try:
            sched = Scheduler(
                [m], policy, quantum=p.quantum_s, cpu=cpus if len(cpus) > 1 else cpus[0],
                holder_grace=p.grace_s if variant.grace else 0.0,
            )  # fmt: skip
        except SchedError as e:
            res["unsupported"] = str(e)
            return res
        sched.run(p.warmup_s)
        before = read_counters(m, vcpus)
        idle0 = cpu_idle(cpus)
        window = sched.run(p.window_s)
        idle1 = cpu_idle(cpus)
        after = read_counters(m, vcpus)
        stop_guest(m)
        t0 = time.monotonic()
        final = sched.run(FINISH_TIMEOUT)
        res["finish_s"] = round(time.monotonic() - t0, 3)
    vm = final.vms[0]
    text = tail.decode(errors="replace")
    res["correct"] = vm.state == "exit" and vm.exit_code == 0 and "lhp: OK" in text
    res["exit"] = {"state": vm.state, "code": vm.exit_code}
    if not res["correct"]:
        res["exit"].update(message=vm.message, output=text.strip()[-300:])
    w = window.vms[0]
    d = [{k: a[k] - b[k] for k in a} for a, b in zip(after, before, strict=True)]
    dur = window.duration_s
    total = sum(x["done"] for x in d)
    hz = khz * 1e3
    spin_s = sum(x["spin_cycles"] for x in d) / hz
    res.update(
        duration_s=dur,
        critical_sections=total,
        throughput=total / dur if dur else 0.0,
        cpu_s=w.cpu_s,
        cpu_of_wall=w.cpu_s / (dur * hosts) if dur else 0.0,
        # The host CPUs' idle time in the window: what neither the VM nor anyone else used.
        idle_of_wall=(idle1 - idle0) / (dur * hosts) if dur and idle0 is not None else None,
        throughput_per_cpu_s=total / w.cpu_s if w.cpu_s else 0.0,
        spin_s=spin_s,
        spin_fraction=spin_s / w.cpu_s if w.cpu_s else 0.0,
        descheduled_while_spinning_s=sum(x["gap_cycles"] for x in d) / hz,
        lhp_guest=sum(x["lhp"] for x in d),
        lhp_host=sum(c.lhp_preemptions or 0 for c in w.vcpus) if policy == "timer" else None,
        grace=sum(c.grace or 0 for c in w.vcpus) if policy == "timer" else None,
        waits=sum(x["waits"] for x in d),
        kicks=sum(x["kicks"] for x in d),
        yields=sum(x["yields"] for x in d),
        holder_preempted_seen=sum(x["holder_preempted"] for x in d),
        contended=sum(x["contended"] for x in d),
        exits=sum(c.exits for c in w.vcpus),
        per_vcpu=[x["done"] for x in d],
        fairness=jain([x["done"] for x in d]),
    )
    return res


def cpu_idle(cpus: list[int]) -> float | None:
    """Seconds the given host CPUs have been idle since boot (/proc/stat, USER_HZ ticks)."""
    hz = os.sysconf("SC_CLK_TCK")
    want = {f"cpu{c}" for c in cpus}
    total = 0
    try:
        with open("/proc/stat") as f:
            for line in f:
                fields = line.split()
                if fields and fields[0] in want:
                    total += int(fields[4]) + int(fields[5])  # idle, iowait
    except (OSError, ValueError, IndexError):
        return None
    return total / hz


def jain(xs: list[int]) -> float | None:
    """Jain's fairness index: 1 when every vCPU did the same, 1/n when one did everything."""
    s, sq = sum(xs), sum(x * x for x in xs)
    return s * s / (len(xs) * sq) if sq else None


# --- the study --------------------------------------------------------------------------------


def host_info() -> dict:
    from ..doctor import study_host

    return study_host()


def run_lab(p: Plan, progress: Callable[[int, int, str], None] | None = None) -> dict:
    t0 = time.monotonic()
    work = Workload()
    host = host_info()
    cal = calibrate(work, p.host_cpus[1][0])
    items = p.items()
    raw: list[dict] = []
    for k, (r, n, h, v) in enumerate(items):
        if progress:
            progress(k, len(items), f"round {r + 1}: {n} vCPU(s) on {h} host CPU(s), {v}")
        res = run_one(work, p, cal, VARIANT[v], n, h)
        res["round"] = r
        raw.append(res)
    if progress:
        progress(len(items), len(items), "done")
    host["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    doc = {
        "lab": "lhp",
        "full": p.full,
        "plan": {k: v for k, v in asdict(p).items() if k != "host_cpus"}
        | {"host_cpu_sets": {str(k): v for k, v in p.host_cpus.items()}},
        "variants": [asdict(v) for v in VARIANTS if v.name in p.variants],
        "host": host,
        "calibration": cal
        | {
            "spin_limit_us": 2 * cal["exit_us"],
            "lhp_gap_us": max(GAP_MIN_S * 1e6, 3 * cal["exit_us"]),
        },
        "runs": raw,
        "elapsed_s": round(time.monotonic() - t0, 1),
    }
    doc["results"] = summarize(raw)
    doc["reference"] = reference(doc["results"])
    doc["goal"] = goal(doc["results"], doc["reference"])
    return doc


METRICS = (
    "throughput", "throughput_per_cpu_s", "cpu_of_wall", "idle_of_wall", "spin_fraction", "spin_s", "lhp_guest",
    "lhp_host", "grace", "waits", "kicks", "yields", "holder_preempted_seen", "exits",
    "fairness", "finish_s",
)  # fmt: skip


def summarize(raw: list[dict]) -> list[dict]:
    """Median, min and max of every metric over the rounds, per (vCPUs, host CPUs, variant)."""
    groups: dict[tuple[int, int, str], list[dict]] = {}
    for r in raw:
        groups.setdefault((r["vcpus"], r["host_cpus"], r["variant"]), []).append(r)
    out = []
    for (n, h, v), rs in groups.items():
        entry: dict = {"vcpus": n, "host_cpus": h, "variant": v, "runs": len(rs)}
        if all("unsupported" in r for r in rs):
            entry["unsupported"] = rs[0]["unsupported"]
            out.append(entry)
            continue
        rs = [r for r in rs if "unsupported" not in r]
        entry["correct"] = all(r["correct"] for r in rs)
        entry["failures"] = [r["exit"] for r in rs if not r["correct"]]
        for m in METRICS:
            xs = [r[m] for r in rs if r.get(m) is not None]
            if xs:
                entry[m] = {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}
        out.append(entry)
    return out


def find(results: list[dict], vcpus: int, hosts: int, variant: str) -> dict | None:
    for e in results:
        if (e["vcpus"], e["host_cpus"], e["variant"]) == (vcpus, hosts, variant):
            return e if "throughput" in e else None
    return None


def reference(results: list[dict]) -> dict:
    """The 1-vCPU throughput on one host CPU: the naive lock, uncontended, in its own thread
    (nothing to mitigate), and the best of every variant's own 1-vCPU figure."""
    base = find(results, 1, 1, "naive-threads")
    ones = [e for e in results if e["vcpus"] == 1 and "throughput" in e]
    return {
        "t1": base["throughput"]["median"] if base else None,
        "t1_per_cpu_s": base["throughput_per_cpu_s"]["median"] if base else None,
        "t1_variant": "naive-threads",
        "per_variant": {e["variant"]: e["throughput"]["median"] for e in ones},
    }


def goal(results: list[dict], ref: dict, vcpus: int = 4, hosts: int = 1) -> dict:
    """Issue 14's goal: at 4 vCPUs on 1 host CPU, the best mitigation reaches >= 3x the naive
    variant's throughput and >= 0.8 of the 1-vCPU throughput per host CPU."""
    naive = [find(results, vcpus, hosts, v) for v in ("naive-threads", "naive-sched")]
    naive = [e for e in naive if e]
    mits = [e for e in (find(results, vcpus, hosts, v) for v in MITIGATIONS) if e]
    if not naive or not mits or not ref.get("t1"):
        return {"evaluated": False}
    best = max(mits, key=lambda e: e["throughput"]["median"])
    best_naive = max(naive, key=lambda e: e["throughput"]["median"])
    b, nv = best["throughput"]["median"], best_naive["throughput"]["median"]
    per_host = b / hosts
    # Per second of host CPU the VM got: other processes on a shared host take a varying part
    # of the CPU from every run, the reference's included.
    bc = best["throughput_per_cpu_s"]["median"]
    nc = best_naive["throughput_per_cpu_s"]["median"]
    t1c = ref.get("t1_per_cpu_s")
    vs_t1 = per_host / ref["t1"]
    vs_t1_cpu = bc / t1c if t1c else None
    return {
        "evaluated": True,
        "vcpus": vcpus,
        "host_cpus": hosts,
        "best": best["variant"],
        "best_throughput": b,
        "best_naive": best_naive["variant"],
        "naive_throughput": nv,
        "vs_naive": b / nv if nv else None,
        "vs_t1_per_host_cpu": vs_t1,
        "worst_round_vs_t1": best["throughput"]["min"] / hosts / ref["t1"],
        "best_per_cpu_s": bc,
        "vs_naive_per_cpu_s": bc / nc if nc else None,
        "vs_t1_per_cpu_s": vs_t1_cpu,
        "met_wall": bool(nv and b / nv >= 3 and vs_t1 >= 0.8),
        "met_per_cpu_s": bool(nc and vs_t1_cpu and bc / nc >= 3 and vs_t1_cpu >= 0.8),
        "met": bool(nv and b / nv >= 3 and (vs_t1 >= 0.8 or (vs_t1_cpu or 0) >= 0.8)),
    }


def write(doc: dict, out: Path) -> list[Path]:
    from .lhp_report import plots, render

    try:
        out.mkdir(parents=True, exist_ok=True)
        files = [out / "results.json"]
        files[0].write_text(json.dumps(_rounded(doc), separators=(",", ":")) + "\n")
        files += plots(doc, out)
        report = out / "report.md"
        report.write_text(render(doc, [f.name for f in files if f.suffix == ".png"]))
        files.append(report)
    except OSError as e:
        raise LabError(f"cannot write the lab's results to {out}: {e.strerror}") from None
    return files


def _rounded(x):
    """Floats to 6 significant digits: the figures are medians of noisy runs."""
    if isinstance(x, float):
        return float(f"{x:.6g}")
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


def main_lab(out: Path, full: bool, runs: int | None = None, progress=None, **params):
    p = plan(full, runs, **params)
    doc = run_lab(p, progress)
    return doc, write(doc, out)
