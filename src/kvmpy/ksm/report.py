"""The KSM lab's report: report.md, merge.png, cpu.png, cow.png (and store.png), results.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..plotting import save_figure
from .lab import GOAL_FRACTION, GOAL_SECONDS, LabError

MIB = 1 << 20


def write(out: Path, doc: dict) -> list[Path]:
    files = plots(doc, out)
    (out / "results.json").write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    (out / "report.md").write_text(render(doc, [f.name for f in files]))
    return [out / "report.md", *files, out / "results.json"]


def _median_run(sc: dict) -> dict:
    """The run whose time to 85% is the median one (the first run if none reached it)."""
    runs = sc["runs"]
    timed = sorted((r for r in runs if r["t85_s"] is not None), key=lambda r: r["t85_s"])
    return timed[(len(timed) - 1) // 2] if timed else runs[0]


def _label(sc: dict) -> str:
    s = sc["scenario"]["settings"]
    return (f"{sc['scenario']['name']} ({sc['scenario']['vms']} VMs, {s['pages_to_scan']} pages / "
            f"{s['sleep_millisecs']} ms)")  # fmt: skip


def plots(doc: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    # The curves of the main scenarios; a --full run's sweeps get their own plot.
    every = doc.get("scenarios", [])
    scenarios = [sc for sc in every if sc["scenario"]["name"] in ("tuned", "kernel defaults")]
    scenarios = scenarios or every
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    # Merged fraction over time: the median run of each scenario, each VM thin, the total bold.
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for i, sc in enumerate(scenarios):
        run = _median_run(sc)
        color = colors[i % len(colors)]
        t = [s["t"] for s in run["samples"]]
        for k, m in enumerate(run["mergeable_pages"]):
            ax.plot(t, [100 * s["merging"][k] / m for s in run["samples"]], color=color,
                    lw=0.6, alpha=0.45)  # fmt: skip
        ax.plot(t, [100 * s["fraction"] for s in run["samples"]], color=color, lw=2,
                label=_label(sc))  # fmt: skip
    ax.axhline(100 * GOAL_FRACTION, color="grey", ls="--", lw=1)
    ax.axvline(GOAL_SECONDS, color="grey", ls=":", lw=1)
    ax.set_xlabel("seconds since ksmd was started")
    ax.set_ylabel("duplicate pages merged (%)")
    ax.set_title("KSM merging identical guests (bold: all VMs; thin: each VM)")
    ax.set_ylim(0, 105)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    files.append(save_figure(fig, out / "merge.png", error=LabError))
    plt.close(fig)

    # ksmd's CPU time over the same runs.
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for i, sc in enumerate(scenarios):
        run = _median_run(sc)
        pts = [(s["t"], s["ksmd_cpu_s"]) for s in run["samples"] if s["ksmd_cpu_s"] is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), color=colors[i % len(colors)], label=_label(sc))
    ax.set_xlabel("seconds since ksmd was started")
    ax.set_ylabel("ksmd CPU time (s)")
    ax.set_title("What merging costs the host: ksmd's CPU time")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(save_figure(fig, out / "cpu.png", error=LabError))
    plt.close(fig)

    sweep = _sweep_plot(plt, every, out)
    if sweep is not None:
        files.append(sweep)

    # What merging costs the guests, per page touched.
    if scenarios:
        sm = scenarios[0]["summary"]
        keys = [("read_before", "read\nbefore"), ("write_before", "write\nbefore"),
                ("read_merged", "read\nmerged"), ("write_merged", "write merged\n(copy-on-write)"),
                ("write_again", "write\nagain"), ("write_unmerged", "write\nnever merged")]  # fmt: skip
        vals = [(lbl, sm[k + "_us"]) for k, lbl in keys if sm.get(k + "_us")]
        fig, ax = plt.subplots(figsize=(8, 4.2))
        med = [v["median"] for _, v in vals]
        err = [[v["median"] - v["min"] for _, v in vals], [v["max"] - v["median"] for _, v in vals]]
        ax.bar(range(len(vals)), med, yerr=err, capsize=3,
               color=["#7f7f7f", "#7f7f7f", "#1f77b4", "#d62728", "#7f7f7f", "#2ca02c"][: len(vals)])  # fmt: skip
        ax.set_xticks(range(len(vals)), [lbl for lbl, _ in vals], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("µs per page (median, min-max over VMs and runs)")
        ax.set_title(
            f"Guest cost of merging: one word per page ({scenarios[0]['scenario']['name']})"
        )
        ax.grid(True, axis="y", which="both", alpha=0.3)
        fig.tight_layout()
        files.append(save_figure(fig, out / "cow.png", error=LabError))
        plt.close(fig)

    bl = doc.get("balloon")
    if bl and bl.get("variants"):
        fig, axes = plt.subplots(1, len(bl["variants"]), figsize=(10, 4), sharey=True)
        for ax, v in zip(axes, bl["variants"], strict=True):
            t = [s[0] for s in v["samples"]]
            ax.plot(t, [s[1] / MIB for s in v["samples"]], "-", color="#1f77b4")
            for when, text in v["events"]:
                for word in ("touched", "freed", "reported", "balloon at"):
                    if word in text:
                        ax.axvline(when, color="grey", ls=":", lw=1)
                        ax.annotate(word, (when, 0.98), xycoords=("data", "axes fraction"),
                                    rotation=90, fontsize=7, va="top")  # fmt: skip
            for when, text in v["actions"]:
                ax.axvline(when, color="#d62728", ls="--", lw=1)
                ax.annotate(f"host: {text}", (when, 0.5), xycoords=("data", "axes fraction"),
                            rotation=90, fontsize=7, va="center", color="#d62728")  # fmt: skip
            ax.set_title(v["variant"])
            ax.set_xlabel("seconds since the VM started")
            ax.grid(True, alpha=0.3)
        axes[0].set_ylabel("guest RAM resident on the host (MiB)")
        fig.suptitle("Giving memory back: RSS as the guest uses, frees and returns memory")
        fig.tight_layout()
        files.append(save_figure(fig, out / "balloon.png", error=LabError))
        plt.close(fig)

    store = doc.get("store")
    if store and store.get("series"):
        fig, ax = plt.subplots(figsize=(8, 4.2))
        for i, series in enumerate(store["series"]):
            n = list(range(1, len(series["steps"]) + 1))
            ax.plot(n, [s["logical_bytes"] / MIB for s in series["steps"]], "--",
                    color=colors[i % len(colors)], label=f"{series['name']}: without dedup")  # fmt: skip
            ax.plot(n, [s["store_bytes"] / MIB for s in series["steps"]], "o-",
                    color=colors[i % len(colors)], label=f"{series['name']}: page store")  # fmt: skip
        ax.set_xlabel("snapshots taken")
        ax.set_ylabel("MiB")
        ax.set_title("Snapshot space: separate snapshots against one deduplicated page store")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        files.append(save_figure(fig, out / "store.png", error=LabError))
        plt.close(fig)
    return files


def _sweep_plot(plt, scenarios: list[dict], out: Path) -> Path | None:
    """--full: time to 85% against the number of VMs, and against pages_to_scan (with
    ksmd's CPU share), medians with min-max bars."""
    by_vms = sorted((sc["scenario"]["vms"], sc["summary"]) for sc in scenarios
                    if sc["scenario"]["settings"] == scenarios[0]["scenario"]["settings"]
                    and sc["summary"]["t85_s"])  # fmt: skip
    by_pages = sorted((sc["scenario"]["settings"]["pages_to_scan"], sc["summary"])
                      for sc in scenarios if sc["scenario"]["vms"] == 8
                      and sc["scenario"]["settings"]["sleep_millisecs"] == 10
                      and sc["summary"]["t85_s"])  # fmt: skip
    if len(by_vms) < 3 and len(by_pages) < 3:
        return None

    def bars(points, key):
        x = [p for p, _ in points]
        med = [s[key]["median"] for _, s in points]
        err = [[s[key]["median"] - s[key]["min"] for _, s in points],
               [s[key]["max"] - s[key]["median"] for _, s in points]]  # fmt: skip
        return x, med, err

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    x, med, err = bars(by_vms, "t85_s")
    a.errorbar(x, med, yerr=err, fmt="o-", capsize=3, label="85% merged")
    x2, med2, err2 = bars(by_vms, "ksmd_cpu_s_to_85")
    a.errorbar(x2, med2, yerr=err2, fmt="s--", capsize=3, label="ksmd CPU time to 85%")
    a.set_xlabel("VMs (each 6,144 pages, 4,096 identical)")
    a.set_ylabel("seconds")
    a.set_title("tuned settings, more VMs")
    a.grid(True, alpha=0.3)
    a.legend(fontsize=8)
    x, med, err = bars(by_pages, "t85_s")
    b.errorbar(x, med, yerr=err, fmt="o-", capsize=3, label="85% merged (s)")
    b.axhline(GOAL_SECONDS, color="grey", ls=":", lw=1)
    b.set_xscale("log", base=2)
    b.set_xlabel("pages_to_scan (sleep 10 ms), 8 VMs")
    b.set_ylabel("seconds to 85%")
    b2 = b.twinx()
    x3, med3, _ = bars(by_pages, "ksmd_cpu_percent")
    b2.plot(x3, med3, "s--", color="#d62728", label="ksmd CPU while merging (%)")
    b2.set_ylabel("ksmd CPU, % of one CPU", color="#d62728")
    b.set_title("8 VMs, faster scanning")
    b.grid(True, alpha=0.3)
    fig.tight_layout()
    path = save_figure(fig, out / "sweep.png", error=LabError)
    plt.close(fig)
    return path


def _s(st: dict | None, fmt: str = "{:.2f}", scale: float = 1.0) -> str:
    """'median (min-max)' of a summary statistic."""
    if not st:
        return "n/a"
    m, lo, hi = (st[k] * scale for k in ("median", "min", "max"))
    if st["n"] == 1 or lo == hi:
        return fmt.format(m)
    return f"{fmt.format(m)} ({fmt.format(lo)}-{fmt.format(hi)})"


def render(doc: dict, images: list[str]) -> str:
    h = doc["host"]
    sz = doc["sizes"]
    lines: list[str] = []
    add = lines.append
    add("# KSM lab: same-page merging of kvmpy guests\n")
    add(f"Produced by `kvmpy lab ksm` ({doc['plan']} plan) in {doc['elapsed_s']:.0f} s.\n")
    add("## Host\n")
    add(f"* {h['kind'] or 'unknown kind of'} KVM host, {h['cpu_model']}, {h['cpus']} CPUs, "
        f"{h['memory']} RAM, kernel {h['kernel']}, Python {h['python']}")  # fmt: skip
    add(f"* load average (1, 5, 15 min) at the start {', '.join(map(str, h['load_average_at_start']))}"
        f", at the end {', '.join(map(str, h.get('load_average_at_end', [])))}: other jobs shared "
        "the CPUs throughout")  # fmt: skip
    before = h["ksm_settings_before"]
    add("* the host's KSM settings before the lab, put back afterwards: "
        + ", ".join(f"{k} {v}" for k, v in before.items()))  # fmt: skip
    after = h.get("ksm_settings_after")
    if after is not None:
        add(f"* after the lab: {'identical' if after == before else 'DIFFERENT: ' + str(after)}")
    add("")
    add("## Method\n")
    mib = lambda pages: f"{pages * 4096 / MIB:g} MiB"  # noqa: E731
    add(f"Each VM is a separate kvmpy process (`--mergeable`: private anonymous guest RAM marked "
        f"MADV_MERGEABLE) with {sz['memory']} of RAM, running the `ksm-fill` guest at CPL3. It "
        f"fills {sz['identical']} pages ({mib(sz['identical'])}) identical in every VM, "
        f"{sz['partial']} *partly identical* pages (the same as in the other VMs but for one "
        f"8-byte word, which whole-page merging cannot merge) and {sz['distinct']} distinct ones, "
        "times a pass over some of them, and waits. Then the lab writes the scenario's "
        "settings, starts ksmd, and polls every "
        f"{doc['poll_s'] * 1000:.0f} ms: each VM's merged pages (`ksm_merging_pages` in "
        "/proc/PID/ksm_stat), the counters in /sys/kernel/mm/ksm and ksmd's CPU time "
        "(/proc/PID/schedstat of the ksmd thread). Every sample carries its time: merging is "
        "asynchronous, so a time is a poll's, at most one interval after the fact. A run ends "
        "when every duplicate page is merged and nothing changed for 1 s (3 s once 85% are), "
        "or at its time limit. The lab then stops ksmd (merged pages stay merged), checks every "
        "filled page of every VM in /proc/PID/pagemap and /proc/kpageflags (KPF_KSM), and lets "
        f"the guests time a pass over {sz['timed']} pages again: reading merged pages, writing "
        "them (each write takes a copy-on-write fault in the host), writing them again, writing "
        "pages that were never merged.\n")  # fmt: skip
    add("*Duplicate pages* are a VM's identical pages plus the few pages of kvmpy's own that are "
        "the same in every VM (the guest image, page tables), counted at the end of each run; "
        "the fraction merged is the sum over all VMs of `ksm_merging_pages` over the sum of "
        "duplicate pages. Memory saved is Σ RSS − Σ PSS of the guest RAM mappings (a page "
        "mapped by n VMs counts 1/n in each PSS). Figures are medians over runs (and VMs), "
        "with the range in parentheses.\n")  # fmt: skip
    if doc.get("recovered_settings"):
        add("(A lab killed earlier had left the host's settings changed; they were put back "
            "before this one started.)\n")  # fmt: skip

    add("## Results\n")
    add("| scenario | VMs | pages_to_scan / sleep | runs | 85% merged after (s) | slowest VM (s) "
        "| ksmd CPU to 85% (s) | ksmd CPU while merging | scan rate (pages/s) | merged at the end "
        "| memory saved | of ideal |")  # fmt: skip
    add("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for sc in doc.get("scenarios", []):
        s, c = sc["summary"], sc["scenario"]
        ideal = sc["runs"][0]["ideal_saved_bytes"]
        saved = s["saved_bytes"]
        add(f"| {c['name']} | {c['vms']} | {c['settings']['pages_to_scan']} / "
            f"{c['settings']['sleep_millisecs']} ms | {s['runs']} | {_s(s['t85_s'])} | "
            f"{_s(s['t85_slowest_vm_s'])} | {_s(s['ksmd_cpu_s_to_85'], '{:.3f}')} | "
            f"{_s(s['ksmd_cpu_percent'], '{:.1f}')}% | {_s(s['scan_rate_pages_s'], '{:.0f}')} | "
            f"{_s(s['final_fraction'], '{:.1f}', 100)}% | {_s(saved, '{:.1f}', 1 / MIB)} MiB | "
            f"{100 * saved['median'] / ideal:.0f}% |")  # fmt: skip
    add("")
    goal = _goal(doc)
    if goal:
        add(goal + "\n")
    cls = next((sc["summary"].get("classes_merged_fraction") for sc in doc.get("scenarios", [])
                if sc["summary"].get("classes_merged_fraction")), None)  # fmt: skip
    if cls:
        other = [c["other"] for sc in doc["scenarios"] for r in sc["runs"] for c in r["classes"]
                 if c]  # fmt: skip
        add(f"**Which pages merged** (checked page by page at the end of each run): identical "
            f"{100 * cls['identical']:.1f}%, partly identical {100 * cls['partial']:.1f}%, "
            f"distinct {100 * cls['distinct']:.1f}%; besides, {min(other)}-{max(other)} pages per "
            "VM outside the filled area (the image and kvmpy's tables). A page that differs in "
            "a single word is as unmergeable as a random one.\n")  # fmt: skip

    if doc.get("scenarios"):
        sc0 = doc["scenarios"][0]
        s = sc0["summary"]
        add(f"**What merging costs the guests** ({sc0['scenario']['name']}; µs per page, one "
            "word per page, on this host):\n")  # fmt: skip
        add("| pass | µs per page |")
        add("|---|---|")
        for k, what in (("read_before", "read, before merging"),
                        ("write_before", "write, before merging"),
                        ("read_merged", "read a merged page"),
                        ("write_merged", "write a merged page (copy-on-write)"),
                        ("write_again", "write it again"),
                        ("write_unmerged", "write a page KSM scanned but never merged")):  # fmt: skip
            add(f"| {what} | {_s(s.get(k + '_us'), '{:.3f}')} |")
        add(f"| (first touch while filling, for comparison) | {_s(s.get('fill_us_per_page'))} |")
        add("")
        add(_cow_text(s) + "\n")

    if doc.get("store"):
        add(render_store(doc["store"]))
    if doc.get("balloon"):
        add(render_balloon(doc["balloon"]))
    for img in images:
        add(f"![{img}]({img})\n")
    return "\n".join(lines)


def _goal(doc: dict) -> str:
    for sc in doc.get("scenarios", []):
        c, s = sc["scenario"], sc["summary"]
        if c["name"] != "tuned" or not s["t85_s"]:
            continue
        if c["vms"] != 8:
            return (f"(The goal is stated for 8 VMs; this run had {c['vms']}: "
                    f"{s['t85_s']['median']:.2f} s to 85%.)")  # fmt: skip
        worst = s["t85_s"]["max"]
        met = s["reached_85_in_every_run"] and worst <= GOAL_SECONDS
        cpu = s["ksmd_cpu_s_to_85"]
        return (f"**Goal** ({c['vms']} identical guests, ≥ {100 * GOAL_FRACTION:.0f}% of their "
                f"duplicate pages merged within {GOAL_SECONDS:.0f} s with tuned settings, "
                f"pages_to_scan {c['settings']['pages_to_scan']} and sleep_millisecs "
                f"{c['settings']['sleep_millisecs']}): **{'met' if met else 'NOT met'}**, "
                f"{s['t85_s']['median']:.2f} s median, {worst:.2f} s at worst over "
                f"{s['runs']} runs; ksmd used {_s(cpu, '{:.3f}')} s of CPU to get there "
                f"({_s(s['ksmd_cpu_percent'], '{:.1f}')}% of one CPU over the whole merge phase).")  # fmt: skip
    return ""


def _cow_text(s: dict) -> str:
    wm, wb = s.get("write_merged_us"), s.get("write_before_us")
    rm = s.get("read_merged_us")
    if not wm or not wb:
        return ""
    return (f"A write to a merged page costs {wm['median']:.1f} µs here against "
            f"{wb['median'] * 1000:.0f} ns before merging: the host must copy the page and the "
            "VM's mapping is rebuilt (on this software-KVM host a shadow-paging fault, much "
            "dearer than on VT-x/AMD-V with EPT). Even a read of a merged page costs "
            f"{rm['median']:.1f} µs the first time, because merging replaced the page under the "
            "VM and its mapping is rebuilt on first touch. Once written, a page is private "
            "again and costs nothing more. A guest that rewrites merged memory pays this once "
            "per page per merge.")  # fmt: skip


def _median_new(series: dict) -> str:
    import statistics

    later = [s["pages_new"] for s in series["steps"][1:]]
    return f"{statistics.median(later):.0f}" if later else "n/a"


def render_store(st: dict[str, Any]) -> str:
    out = ["## Deduplicated snapshots\n"]
    for series in st.get("series", []):
        last = series["steps"][-1]
        saved = 1 - last["store_bytes"] / max(last["logical_bytes"], 1)
        out.append(f"* **{series['name']}**: {series['what']}. {len(series['steps'])} snapshots "
                   f"hold {last['logical_bytes'] / MIB:.1f} MiB of non-zero pages between them; "
                   f"the page store keeps {last['unique_pages']} unique pages in "
                   f"{last['store_bytes'] / MIB:.1f} MiB on disk: "
                   f"**{100 * saved:.0f}% saved** ({last['logical_bytes'] / max(last['store_bytes'], 1):.1f}x). "
                   f"Separate snapshot directories would take {last['plain_bytes'] / MIB:.1f} MiB. "
                   f"Each snapshot after the first added a median of {_median_new(series)} new "
                   f"pages. Median snapshot time {series['snapshot_ms_median']:.0f} ms into the "
                   f"store, {series['plain_snapshot_ms_median']:.0f} ms as a plain snapshot.")  # fmt: skip
    out.append("")
    return "\n".join(out)


def render_balloon(bl: dict[str, Any]) -> str:
    out = ["## Giving memory back: the balloon and free page reporting\n"]
    out.append(f"Two VMs ({bl['memory']} each, `--balloon --irqchip`) run the `virtio-balloon` "
               f"example: each uses {bl['pages']} pages ({bl['pages'] * 4096 / MIB:.0f} MiB), "
               "frees them, and waits in `hlt` for the host. What their RAM occupies on the host "
               "(RSS of the guest RAM mapping, from `kvmpy ctl SOCK stats`) was sampled every "
               "50 ms; balloon.png shows it over time.\n")  # fmt: skip
    for v in bl["variants"]:
        peak, at_free, end = (v[k] / MIB for k in ("rss_peak_bytes", "rss_freed_bytes",
                                                     "rss_end_bytes"))  # fmt: skip
        if v["variant"] == "balloon":
            how = ("freeing alone gave nothing back; the host then asked for the memory "
                   f"(`kvmpy ctl SOCK balloon {bl['pages'] * 4096 >> 20}M`), the guest inflated "
                   "its balloon with the freed pages and the device discarded them; deflating "
                   "later (`balloon 0`) gives the guest its pages back without touching the host's "
                   "memory until the guest uses them")  # fmt: skip
        else:
            how = (
                "the guest reported the freed pages on its own, 2 MiB at a time, and the "
                f"device discarded them ({v['reported_bytes'] / MIB:.0f} MiB reported)"
            )
        took = v.get("give_back_s")
        out.append(
            f"* **{v['variant']}**: RSS {peak:.1f} MiB at its peak, still {at_free:.1f} MiB "
            f"after the guest had freed its memory, {end:.1f} MiB at the end"
            + (
                f" ({took:.2f} s after the {'report' if v['variant'] != 'balloon' else 'request'}"
                ", at the 50 ms sampling)"
                if took is not None
                else ""
            )
            + f": {how}."
        )
    out.append("")
    return "\n".join(out)
