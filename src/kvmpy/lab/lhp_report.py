"""The lock-holder preemption lab's report and plots, made from its results document.

Every number in the text is computed from `doc`; sentences that depend on an outcome (the
goal met or not, which variant won) are chosen by it.
"""

from __future__ import annotations

from pathlib import Path

from ..plotting import save_figure
from .lhp import VARIANT, LabError, find

COLORS = {
    "naive-threads": "#d62728",
    "naive-sched": "#ff7f0e",
    "pvticket-sched": "#9467bd",
    "pv-sched": "#1f77b4",
    "pv-threads": "#8c564b",
    "pv-yield-sched": "#17becf",
    "pv-grace-sched": "#2ca02c",
}


def _rate(x: float | None) -> str:
    if x is None:
        return "–"
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}/s"
    return f"{x:.3g} /s"


def _g(x: float | None) -> str:
    return "–" if x is None else f"{x:.3g}"


def _m(e: dict | None, key: str) -> float | None:
    if not e or key not in e:
        return None
    return e[key]["median"]


def _range(e: dict, key: str, fmt) -> str:
    if key not in e:
        return "–"
    v = e[key]
    return f"{fmt(v['median'])} [{fmt(v['min'])}–{fmt(v['max'])}]"


def _label(name: str) -> str:
    return f"({VARIANT[name].letter}) {name}"


# --- plots --------------------------------------------------------------------------------------


def plots(doc: dict, out: Path) -> list[Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    results = doc["results"]
    hosts = sorted({e["host_cpus"] for e in results})
    files = []

    # Throughput against vCPUs, one panel per host CPU count, with the runs' range.
    fig = Figure(figsize=(5.5 * len(hosts), 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(hosts), squeeze=False)[0]
    t1 = doc["reference"].get("t1")
    for ax, h in zip(axes, hosts, strict=True):
        for v in doc["plan"]["variants"]:
            pts = sorted(
                (e["vcpus"], e["throughput"])
                for e in results
                if e["variant"] == v
                and "throughput" in e
                and (e["host_cpus"] == h or e["vcpus"] == 1)
            )
            if not pts:
                continue
            xs = [p[0] for p in pts]
            med = [p[1]["median"] for p in pts]
            lo = [p[1]["median"] - p[1]["min"] for p in pts]
            hi = [p[1]["max"] - p[1]["median"] for p in pts]
            ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3, color=COLORS.get(v),
                        label=_label(v))  # fmt: skip
        if t1:
            ax.axhline(t1 * h, color="grey", ls=":", lw=1, label="1 vCPU × host CPUs")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
        ax.set_xlabel("vCPUs")
        ax.set_ylabel("critical sections per second")
        ax.set_title(f"{h} host CPU{'s' if h > 1 else ''}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize="x-small", loc="lower left")
    fig.suptitle("Spinlock throughput (median of runs, bars: range)")
    files.append(save_figure(fig, out / "throughput.png", 110, error=LabError))

    # Relative to the 1-vCPU throughput, per second of host CPU the VM got (a shared host's
    # other processes take a varying part of the CPUs from every run), every over-committed
    # configuration.
    over = sorted({(e["vcpus"], e["host_cpus"]) for e in results if e["vcpus"] > e["host_cpus"]})
    t1c = doc["reference"].get("t1_per_cpu_s")
    if t1c and over:
        fig = Figure(figsize=(max(6.0, 1.6 * len(over)), 4.4), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        variants = doc["plan"]["variants"]
        width = 0.8 / len(variants)
        for j, v in enumerate(variants):
            xs, ys = [], []
            for k, (n, h) in enumerate(over):
                e = find(results, n, h, v)
                if e:
                    xs.append(k + (j - len(variants) / 2 + 0.5) * width)
                    ys.append(e["throughput_per_cpu_s"]["median"] / t1c)
            ax.bar(xs, ys, width, color=COLORS.get(v), label=_label(v))
        ax.axhline(0.8, color="grey", ls="--", lw=1, label="goal: 0.8")
        ax.set_xticks(range(len(over)), [f"{n} vCPUs\n{h} host CPU{'s' if h > 1 else ''}"
                                         for n, h in over])  # fmt: skip
        ax.set_yscale("log")
        ax.set_ylabel("per CPU second, ÷ 1 vCPU alone")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize="x-small", ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.2))
        ax.set_title("Over-committed: critical sections per CPU second, against 1 vCPU alone")
        files.append(save_figure(fig, out / "relative.png", 110, error=LabError))

    # Where the CPU time went: spinning, per variant, on one host CPU.
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for v in doc["plan"]["variants"]:
        pts = sorted(
            (e["vcpus"], e["spin_fraction"]["median"])
            for e in results
            if e["variant"] == v and e["host_cpus"] == 1 and "spin_fraction" in e
        )
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", color=COLORS.get(v), label=_label(v))
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("vCPUs on 1 host CPU")
    ax.set_ylabel("share of the VM's CPU time spent spinning")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="x-small")
    ax.set_title("Time wasted spinning (median of runs)")
    files.append(save_figure(fig, out / "spinning.png", 110, error=LabError))
    return files


# --- the report -----------------------------------------------------------------------------------


def render(doc: dict, images: list[str]) -> str:
    p, host, cal, ref, g = (
        doc["plan"],
        doc["host"],
        doc["calibration"],
        doc["reference"],
        doc["goal"],
    )
    results = doc["results"]
    L: list[str] = []
    add = L.append
    add(
        "# Lock-holder preemption: over-committed SMP guests, paravirtual spinlocks, directed yield"
    )
    add("")
    mode = "full" if doc["full"] else "short (CI)"
    add(f"`kvmpy lab lhp`, {mode} run: {p['runs']} rounds, {p['window_s']:g} s measured per run "
        f"after {p['warmup_s']:g} s of warm-up; {doc['elapsed_s']:.0f} s in all.")  # fmt: skip
    add("")
    add("## The host")
    add("")
    la0, la1 = host["load_average_at_start"], host.get("load_average_at_end", ["?"] * 3)
    add(
        f"* {host['summary']} ({host['kind']}); CPU: {host['cpu_model'] or 'unknown'}; "
        f"{host['cpus']} CPUs for this process; Linux {host['kernel']}; Python {host['python']}."
    )
    add(f"* Load average (1/5/15 min) at the start: {' / '.join(map(str, la0))}; at the end: "
        f"{' / '.join(map(str, la1))}. The machine is shared: other processes take part of the "
        "host CPUs, which the `cpu_of_wall` column shows (the VM's CPU time over wall time × "
        "host CPUs).")  # fmt: skip
    add(
        f"* One exit to the VMM from CPL3 costs **{cal['exit_us']:.1f} µs** here (measured: "
        f"the median of 5 × 200 hypercalls, {cal['exit_cycles']:.0f} TSC cycles at "
        f"{cal['tsc_khz'] / 1e6:.2f} GHz). On a VT-x/AMD-V host it is 1–2 µs. Sleeping in the VMM "
        "costs a wait and a kick, so the paravirtual locks spin for "
        f"**{cal['spin_limit_us']:.0f} µs** (2 exits) before they sleep: the break-even of "
        "spinning against sleeping sits ~50x higher here than on hardware virtualization."
    )
    add(
        f"* A critical section that took longer than {cal['lhp_gap_us']:.0f} µs of wall time "
        "(the larger of 20 µs and 3 exits) lost its CPU inside: the guest counts it as a "
        "lock-holder preemption (`LHP guest`). kvmpy's scheduler also counts the timer "
        "preemptions of a vCPU that announced a held lock (`LHP host`)."
    )
    add("")
    add("## The workload and the variants")
    add("")
    add(f"Every vCPU of the `lhp` example loops: take the lock, read a shared counter, "
        f"{p['cs_iters']} iterations of work, write the counter back, release, "
        f"{p['think_iters']} iterations of work outside (tunable: `--cs`, `--think`). The guest "
        "checks at its end that the counter equals the sum of the critical sections: every "
        "run below passed that check unless marked. kvmpy's scheduler ran with a "
        f"{p['quantum_s'] * 1e3:g} ms quantum (`timer`: round robin over the runnable vCPUs); "
        f"holder grace {p['grace_s'] * 1e6:g} µs. Host CPUs: "
        + ", ".join(f"{k}: CPU {','.join(map(str, v))}" for k, v in p["host_cpu_sets"].items())
        + ".")  # fmt: skip
    add("")
    add("| variant | what it is |")
    add("|---|---|")
    for v in doc["variants"]:
        add(f"| ({v['letter']}) `{v['name']}` | {v['summary']} |")
    add("")
    add("## The goal")
    add("")
    if g.get("evaluated"):
        verdict = "**met**" if g["met"] else "**not met**"
        add(f"At {g['vcpus']} vCPUs on {g['host_cpus']} host CPU the best mitigation, "
            f"`{g['best']}`, made {_rate(g['best_throughput'])}: **{g['vs_naive']:.0f}x** the "
            f"best naive variant (`{g['best_naive']}`, {_rate(g['naive_throughput'])}; goal "
            f"≥ 3x) and **{g['vs_t1_per_host_cpu']:.2f}** of the 1-vCPU throughput per host CPU "
            f"({_rate(ref['t1'])}, `{ref['t1_variant']}` at 1 vCPU; goal ≥ 0.8; its worst round "
            f"{g['worst_round_vs_t1']:.2f}). Per second of host CPU the VM actually got (other "
            f"processes share this host), it made {_rate(g['best_per_cpu_s'])}: "
            f"**{g['vs_t1_per_cpu_s']:.2f}** of the 1-vCPU figure "
            f"({_rate(ref['t1_per_cpu_s'])}) and {g['vs_naive_per_cpu_s']:.0f}x naive. "
            f"Goal {verdict} (by wall clock: {'yes' if g['met_wall'] else 'no'}; per CPU "
            f"second: {'yes' if g['met_per_cpu_s'] else 'no'}).")  # fmt: skip
    else:
        add("Not evaluated (the 1- and 4-vCPU runs on one host CPU are missing).")
    add("")
    add("## Results")
    add("")
    add(
        "Medians over the rounds, [min–max] for throughput (critical sections per second of "
        "wall time). `per CPU-s`: critical sections per second of host CPU time the VM got. "
        "`×1vCPU`: throughput ÷ (1-vCPU throughput × host CPUs), by wall clock / per CPU "
        "second. `spin`: share of the VM's CPU time spent spinning on the lock. `waits`, "
        "`yields`: hypercalls per second. `fair`: Jain's index of the vCPUs' critical sections "
        "(1: equal). `cpu/wall`: the VM's CPU time ÷ (wall time × host CPUs); `idle`: the host "
        "CPUs' idle share; the rest went to other processes."
    )
    add("")
    configs = sorted({(e["vcpus"], e["host_cpus"]) for e in results})
    for n, h in configs:
        add(f"### {n} vCPU{'s' if n > 1 else ''} on {h} host CPU{'s' if h > 1 else ''}")
        add("")
        add(
            "| variant | critical sections/s | per CPU-s | ×1vCPU | spin | LHP guest | LHP host "
            "| waits/s | yields/s | fair | cpu/wall | idle |"
        )
        add("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for v in p["variants"]:
            e = next((x for x in results if (x["vcpus"], x["host_cpus"], x["variant"]) == (n, h, v)), None)  # fmt: skip
            if e is None:
                continue
            if "unsupported" in e:
                add(f"| {_label(v)} | not run: {e['unsupported']} |||||||||||")
                continue
            dur = p["window_s"]
            rel = _m(e, "throughput") / h / ref["t1"] if ref.get("t1") else None
            t1c = ref.get("t1_per_cpu_s")
            relc = _m(e, "throughput_per_cpu_s") / t1c if t1c else None
            lhp_h = _m(e, "lhp_host")
            idle = _m(e, "idle_of_wall")
            bad = "" if e.get("correct", True) else " **counter check failed**"
            add(
                f"| {_label(v)}{bad} | {_range(e, 'throughput', _rate)} | "
                f"{_rate(_m(e, 'throughput_per_cpu_s'))} | "
                f"{_g(rel)} / {_g(relc)} | {min(_m(e, 'spin_fraction') or 0, 1) * 100:.1f} % | "
                f"{_m(e, 'lhp_guest'):.0f} | {'–' if lhp_h is None else f'{lhp_h:.0f}'} | "
                f"{_m(e, 'waits') / dur:.0f} | {_m(e, 'yields') / dur:.0f} | "
                f"{_m(e, 'fairness') or 0:.3f} | {_m(e, 'cpu_of_wall'):.2f} | "
                f"{'–' if idle is None else f'{idle:.2f}'} |"
            )
        add("")
    for img in images:
        add(f"![{img}]({img})")
        add("")
    add("## What the figures say")
    add("")
    L.extend(_explain(doc))
    add("")
    add("## Reproduce")
    add("")
    add("```sh")
    add(f"kvmpy lab lhp --out DIR{' --full' if doc['full'] else ''} --runs {p['runs']} "
        f"--cs {p['cs_iters']} --think {p['think_iters']}")  # fmt: skip
    add("```")
    add("")
    add(
        "`results.json` has every run (per-vCPU critical sections, waits, kicks, yields, exits, "
        "the guest's exit) and the calibration."
    )
    return "\n".join(L) + "\n"


def _explain(doc: dict) -> list[str]:
    results, ref, cal, p = doc["results"], doc["reference"], doc["calibration"], doc["plan"]
    out: list[str] = []
    add = out.append

    # Per second of host CPU the VM got: on a shared host the wall-clock rates also measure
    # the other processes.
    def thr(n: int, h: int, v: str) -> float | None:
        return _m(find(results, n, h, v), "throughput_per_cpu_s")

    t1c = ref.get("t1_per_cpu_s")
    add("Rates below are critical sections per second of host CPU time the VM received "
        "(`per CPU-s`): on a shared host the wall-clock rates also measure the other "
        "processes.")  # fmt: skip
    add("")
    n = max((e["vcpus"] for e in results if e["host_cpus"] == 1), default=1)
    n = 4 if find(results, 4, 1, "naive-sched") else n
    nb = thr(n, 1, "naive-sched")
    if nb is not None:
        per_slice = nb * p["quantum_s"]
        add(f"* **The naive ticket lock collapses when vCPUs outnumber host CPUs.** At {n} vCPUs "
            f"on one host CPU under kvmpy's scheduler it made {_rate(nb)}, about "
            f"{per_slice:.2g} critical section per {p['quantum_s'] * 1e3:g} ms slice. A ticket "
            "lock hands over in FIFO order, so as soon as the vCPU holding the *next* ticket is "
            "descheduled (lock-waiter preemption), every running vCPU spins until its slice "
            "ends. That is why `LHP host` stays small for it: the holder itself is rarely the "
            "one preempted; its successor is. Linux's scheduler (a) does no better: it cannot "
            "know which thread holds or waits for the lock.")  # fmt: skip
    npt = thr(n, 1, "pvticket-sched")
    if npt is not None:
        add(f"* **Sleeping instead of spinning is not enough with a FIFO lock.** The "
            f"paravirtual ticket lock made {_rate(npt)}: every hand-over now costs a kick and a "
            f"wait (two exits, {2 * cal['exit_us']:.0f} µs here) and a switch to the one vCPU "
            "allowed to take the lock next, which on one host CPU is never the one running. "
            "On hardware virtualization, where an exit costs ~1 µs, the same lock would be "
            "tens of times faster; here the exit cost dominates.")  # fmt: skip
    npv = thr(n, 1, "pv-sched")
    if npv is not None and t1c:
        add(f"* **A paravirtual lock that allows stealing brings back the uncontended speed.** "
            f"`pv-sched` made {_rate(npv)} ({npv / t1c:.2f} of one vCPU alone): the vCPU "
            "that runs takes the lock again and again; the sleepers cost nothing; an unlock "
            "kicks one sleeper and no other until that one has run, so a slice costs a handful "
            "of exits at most. What remains is lock-holder preemption: when a slice ends inside "
            "a critical section, the next vCPU spins its bounded while "
            f"({cal['spin_limit_us']:.0f} µs), then sleeps.")  # fmt: skip
    nd, ne = thr(n, 1, "pv-yield-sched"), thr(n, 1, "pv-grace-sched")
    if nd is not None and ne is not None:
        e_d, e_e = find(results, n, 1, "pv-yield-sched"), find(results, n, 1, "pv-grace-sched")
        add(f"* **Directed yield and holder grace remove that remainder.** With a directed "
            f"yield (d, {_rate(nd)}) a waiter that sees the holder marked preempted gives it "
            "the rest of its slice at once instead of spinning; with holder grace (e, "
            f"{_rate(ne)}) the scheduler does not preempt an announced holder in the first "
            f"place: `LHP host` fell from {_m(e_d, 'lhp_host') or 0:.0f} to "
            f"{_m(e_e, 'lhp_host') or 0:.0f} per window. On one host CPU the differences "
            "between (c), (d) and (e) are small because a lock-holder preemption happens at "
            f"most once per {p['quantum_s'] * 1e3:g} ms slice and costs one or two exits; they "
            "matter more with shorter slices and longer critical sections.")  # fmt: skip
    ntp = thr(n, 1, "pv-threads")
    best_k = max((x for x in (npv, nd, ne) if x is not None), default=None)
    if ntp is not None and best_k is not None:
        gain = best_k / ntp - 1
        verdict = (
            f"kvmpy's own scheduler, which knows, gets {gain:.0%} more from the same guest"
            if gain > 0.02
            else "on one host CPU that leaves little for a scheduler that knows to win: kvmpy's "
            f"best is within {abs(gain):.0%} of it"
        )
        add(f"* **The same paravirtual lock under Linux's scheduler** (c'', {_rate(ntp)}): "
            "a kick wakes a sleeping vCPU thread, which the host may run at once (wake-up "
            "preemption), and every hypercall is an exit; the host does not know who holds the "
            f"lock; {verdict}.")  # fmt: skip
    n2 = 4 if find(results, 4, 2, "pv-sched") else 8
    two = [find(results, n2, 2, v) for v in p["variants"]]
    two = [e for e in two if e]
    if two:
        best2 = max(two, key=lambda e: _m(e, "throughput_per_cpu_s") or 0)
        naive2 = max((e for e in two if VARIANT[e["variant"]].naive),
                     key=lambda e: _m(e, "throughput_per_cpu_s") or 0, default=None)  # fmt: skip
        b2 = _m(best2, "throughput_per_cpu_s") or 0
        share = _m(best2, "cpu_of_wall") or 0
        add(f"* **On two host CPUs** two vCPUs really run at once and contend for the lock. At "
            f"{n2} vCPUs the best, `{best2['variant']}`, made {_rate(b2)} per CPU second"
            + (f" ({b2 / t1c:.2f} of one vCPU alone)" if t1c else "")
            + (f", the best naive variant {_rate(_m(naive2, 'throughput_per_cpu_s'))}"
               if naive2 else "")
            + f". The VM got {share:.0%} of the two CPUs' time (`cpu/wall`), so the wall-clock "
            "figures there say more about the other processes on this host than about the "
            "locks. kvmpy's scheduler runs one loop per host CPU, each over a fixed half of the "
            "vCPUs; a directed yield to a vCPU of the other loop is an ordinary yield.")  # fmt: skip
    one = [_m(find(results, 1, 1, v), "lhp_guest") for v in p["variants"]]
    one = [x for x in one if x is not None]
    if one:
        add(f"* **`LHP guest` at 1 vCPU** ({min(one):.0f}–{max(one):.0f} per window) cannot be "
            "the lock's doing: nobody else wants it. It counts the times the host took the CPU "
            "from the whole VM (other processes, and kvmpy's own slice ends) in the middle of a "
            "critical section; the over-committed rows carry the same background. `LHP host` "
            "counts only what kvmpy's scheduler did, and is the figure holder grace brings near "
            "zero.")  # fmt: skip
    add(
        "* **Fairness** (`fair`): the stealing lock lets the running vCPU take most critical "
        "sections of its slice, but slices rotate, so over a window the vCPUs come out even; "
        "the naive lock is fair by construction and slow."
    )
    return out
