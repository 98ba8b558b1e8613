"""The ipc study's plots and report, made from its results document (kvmpy.ipc.study).

Everything stated with a number is computed from `doc`; sentences that depend on an outcome
(a goal met or not) are chosen by it.
"""

from __future__ import annotations

from pathlib import Path

from ..memory import format_size

COLORS = {"pio": "#d62728", "shm-poll": "#1f77b4", "shm-irq": "#2ca02c", "memcpy": "#7f7f7f"}
GIB = 1 << 30


def format_rate(bps: float) -> str:
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("KB/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.3g} {unit}"
    return f"{bps:.0f} B/s"


def format_time(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


def _us(x: float) -> str:
    return f"{x:.3g} µs" if x < 1000 else f"{x / 1000:.3g} ms"


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _size(n: int) -> str:
    return format_size(n).replace("K", " KiB").replace("M", " MiB").replace("G", " GiB")


def _ok(results: list[dict]) -> list[dict]:
    return [r for r in results if "error" not in r]


# --- plots ------------------------------------------------------------------------------------


def plots(doc: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    # Throughput against size, log-log, with the memcpy reference.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mech in ("pio", "shm-poll", "shm-irq"):
        pts = sorted(
            (r["size"], r["throughput_bytes_per_s"])
            for r in _ok(doc.get("throughput", []))
            if r["mechanism"] == mech
        )
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", color=COLORS[mech], label=mech)
    mem = sorted((int(k), v["bytes_per_s"]) for k, v in doc["references"]["memcpy"].items())
    ax.plot(*zip(*mem, strict=True), "s--", color=COLORS["memcpy"], label="host memcpy")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("transfer size (bytes)")
    ax.set_ylabel("throughput (bytes/s)")
    ax.set_title("VM-to-VM throughput (median of runs), two VMM processes")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    files.append(out / "throughput.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    # Ping-pong round trip, with p10-p90 and the eventfd reference.
    pp = _ok(doc.get("pingpong", []))
    if pp:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        labels, meds, lo, hi, cols = [], [], [], [], []
        for r in pp:
            labels.append(f"{r['mechanism']}\n{r['msg']} B")
            rt = r["rtt_us"]
            meds.append(rt["median"])
            lo.append(rt["median"] - rt["p10"])
            hi.append(rt["p90"] - rt["median"])
            cols.append(COLORS[r["mechanism"]])
        ax.bar(range(len(meds)), meds, yerr=[lo, hi], color=cols, capsize=3)
        ev = doc["references"]["eventfd"]["rtt_seconds"] * 1e6
        ax.axhline(ev, color=COLORS["memcpy"], ls="--", label=f"eventfd ping-pong ({ev:.3g} µs)")
        ax.set_xticks(range(len(meds)), labels, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("round trip (µs), median, p10-p90")
        ax.set_title("Small-message round trip between two VMs")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        files.append(out / "latency.png")
        fig.savefig(files[-1], dpi=120)
        plt.close(fig)

    # Stacked per-layer breakdown.
    fig = breakdown_figure(doc.get("breakdown", {}))
    if fig is not None:
        files.append(out / "breakdown.png")
        fig.savefig(files[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    return files


def breakdown_figure(bd: dict):
    """The per-layer breakdown: one panel per measured configuration, a stacked bar per side.
    Every layer has its own colour, the same in every panel, and each panel a legend that
    can be read at the size the report shows it."""
    import matplotlib.pyplot as plt

    panels = []
    if "pio" in bd:
        panels.append((f"pio, {_size(bd['pio']['size'])}", _nonzero(bd["pio"]["layers"])))
    for key in (f"{bd.get('best')}/{GIB}", f"shm-irq/{2 << 20}"):
        if key in bd:
            panels.append(
                (f"{bd[key]['mechanism']}, {_size(bd[key]['size'])}", _nonzero(bd[key]["layers"]))
            )
    if not panels:
        return None
    colors = layer_colors(
        name for _, layers in panels for side in ("sender", "receiver") for name in layers[side]
    )
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 2.6 * len(panels) + 0.8))
    if len(panels) == 1:
        axes = [axes]
    for ax, (title, layers) in zip(axes, panels, strict=True):
        names = list(dict.fromkeys([*layers["sender"], *layers["receiver"]]))
        longest = max(sum(layers[side].values()) for side in ("sender", "receiver"))
        unit, scale = (
            ("s", 1.0) if longest >= 2 else ("ms", 1e3) if longest >= 2e-3 else ("µs", 1e6)
        )
        shown: set[str] = set()
        for y, side in enumerate(("sender", "receiver")):
            left = 0.0
            for name in names:
                v = layers[side].get(name, 0.0) * scale
                if v <= 0:
                    continue
                ax.barh(y, v, left=left, color=colors[name], edgecolor="white", linewidth=0.5,
                        label=None if name in shown else name)  # fmt: skip
                shown.add(name)
                left += v
        ax.set_yticks([0, 1], ["sender", "receiver"], fontsize=10)
        ax.set_xlabel(f"{unit} per run", fontsize=10)
        ax.set_title(title, fontsize=11)
        ax.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    return fig


def layer_colors(names) -> dict[str, str]:
    """A distinct colour for each distinct layer name (first come, first served), from
    matplotlib's 20-colour qualitative palettes (40 colours before any repeats)."""
    import matplotlib
    from matplotlib.colors import to_hex

    palette = [to_hex(c) for cmap in ("tab20", "tab20b")
               for c in matplotlib.colormaps[cmap].colors]  # fmt: skip
    # tab20 pairs a strong and a light shade of each hue: strong ones first, so that layers
    # side by side differ in hue.
    palette = palette[0:20:2] + palette[1:20:2] + palette[20:]
    out: dict[str, str] = {}
    for name in names:
        if name not in out:
            out[name] = palette[len(out) % len(palette)]
    return out


def _nonzero(layers: dict) -> dict:
    """Drop the layers that are zero on both sides (no doorbells in shm-poll, say)."""
    keep = [k for k in dict.fromkeys([*layers["sender"], *layers["receiver"]])
            if layers["sender"].get(k) or layers["receiver"].get(k)]  # fmt: skip
    return {side: {k: v for k, v in layers[side].items() if k in keep} for side in layers}


# --- the report -------------------------------------------------------------------------------


def ring_size(doc: dict) -> int:
    for r in _ok(doc.get("throughput", [])):
        if r["options"]["ring_size"]:
            return r["options"]["ring_size"]
    return 0


def render(doc: dict, images: list[str]) -> str:
    h = doc["host"]
    ring = ring_size(doc)
    shm = next((r["options"]["shm_size"] for r in _ok(doc.get("throughput", []))
                if r["options"]["shm_size"]), 0)  # fmt: skip
    refs = doc["references"]
    ert = refs["exit_round_trip"]
    thr = _ok(doc.get("throughput", []))
    g = doc.get("goals", {})
    bd = doc.get("breakdown", {})
    by = {(r["mechanism"], r["size"]): r for r in thr}
    L: list[str] = []
    add = L.append

    def find(mech, size):
        return by.get((mech, size))

    poll1g, irq1g = find("shm-poll", GIB), find("shm-irq", GIB)
    pio4k = find("pio", 4096)
    add("# Three ways for two VMs to talk, measured on kvmpy")
    add("")
    add(f"*Generated by `{doc['command']}` on {doc['started']} in {doc['elapsed_s']:.0f} s. "
        "Rerun it to regenerate this file, the plots and `results.json`.*")  # fmt: skip
    add("")
    # Abstract.
    parts = []
    if poll1g:
        parts.append(
            f"a ring in shared memory with spinning ends (shm-poll) moves 1 GiB at "
            f"{format_rate(poll1g['throughput_bytes_per_s'])}, {_pct(poll1g['ratio_to_memcpy'])} of a "
            "host memcpy of the same size measured in the same run"
        )
    if irq1g:
        parts.append(
            f"the same ring with doorbell interrupts (shm-irq) reaches "
            f"{format_rate(irq1g['throughput_bytes_per_s'])} with "
            f"{g.get('shm_irq_zero_exits', {}).get('max_userspace_exits_per_run', '?')} "
            "userspace exits per transfer"
        )
    if pio4k:
        best = g.get("pio_string_vs_exit_round_trip", {})
        parts.append(
            f"port I/O relayed by the VMMs (pio) manages "
            f"{format_rate(best.get('best_throughput_bytes_per_s', pio4k['throughput_bytes_per_s']))}, "
            "bounded by how KVM emulates string I/O rather than by the VMM's Python"
        )
    add("**Summary.** On this host " + "; ".join(parts) + ".")
    add("")

    add("## 1. The problem")
    add("")
    add("Two virtual machines, each run by its own VMM process, must exchange bytes. The "
        "virtualization-course version of the exercise asks for three mechanisms: a naive "
        "channel over IN/OUT port instructions, shared memory polled by both sides, and shared "
        "memory with interrupts (QEMU's ivshmem-doorbell). We measure the time to move 4 KiB, "
        "2 MiB and 1 GiB with each, the round trip of small messages, and where the time goes "
        "layer by layer: the guest, the CPU's switch out of guest mode, KVM, the VMM (Python), "
        "and the host between the two VMMs.")  # fmt: skip
    add("")
    add("## 2. Setup")
    add("")
    add(f"- Host: {h['cpu_model']}, {h['cpus']} CPUs, Linux {h['kernel']}, Python "
        f"{h['python']}; KVM kind: {h['kind']}. {h['summary']}")  # fmt: skip
    pin = h.get("pinned_cpus")
    add(f"- The sender's VMM is pinned to CPU {pin[0]} and the receiver's to CPU {pin[1]}."
        if pin else "- The VMMs are not pinned (one CPU).")  # fmt: skip
    add(f"- Load average at start {h['load_average_at_start']}, at end "
        f"{h.get('load_average_at_end', '?')} (the machine is shared; other work on it shows "
        "up as spread between runs).")  # fmt: skip
    add(f"- Each configuration: one warm-up run, then {doc['runs']} measured runs; figures are "
        "medians. Every run moves a fresh pattern (another seed); the receiver checks every "
        "byte against it and a Fletcher checksum against its closed form, and the VMMs count "
        "the bytes that went through the ring or the relay.")  # fmt: skip
    add("- Each VM: 32 MiB of RAM, long-user mode (the guest runs at CPL3), the example guests "
        f"`ipc-pio` and `ipc-shm`; shared region {_size(shm)} (two rings of {_size(ring)}).")  # fmt: skip
    add("")
    add("## 3. The mechanisms and their data paths")
    add("")
    add("**pio.** The sender's guest executes `rep outsl` on the data port. KVM's instruction "
        "emulator hands string `out` to userspace one item per exit, so kvmpy registers the "
        "port as a coalesced PIO zone: KVM appends each dword to a ring in the vCPU's mmap and "
        "re-enters the guest without leaving the kernel, until the ring (170 entries) is full. "
        "That write exits to the sender's VMM, whose Python drains the ring and sends the bytes "
        "over a unix socket to the receiver's VMM. The receiver's guest executes `rep insl`, "
        "which KVM batches (up to 1 KiB per exit, the size of its read-ahead buffer); its VMM "
        "answers each batch with one socket read, and waits there if the bytes are not yet in: "
        "that wait, and the socket's buffer limit, are the flow control.")  # fmt: skip
    add("")
    add("```")
    add("guest(CPL3) rep outsl -> [trap] KVM emulator -> coalesced ring (no exit) ... ring full")
    add("  -> exit -> VMM Python: drain ring -> send() -> unix socket -> VMM Python: recv_into()")
    add("  <- KVM copies a KiB into the guest <- exit <- guest(CPL3) rep insl")
    add("```")
    add("")
    add("**shm-poll.** A memfd, created by the ipc server and passed to both VMMs over a unix "
        "socket (SCM_RIGHTS), is mapped into both guests at guest-physical 0x40200000. It holds "
        "two single-producer single-consumer rings with free-running byte indices on separate "
        "cache lines; the producer publishes with a release store, the consumer reads with an "
        "acquire load. Both guests spin. Nothing but the two CPUs' caches is on the data path: "
        "no exit, no VMM, no host code.")  # fmt: skip
    add("")
    add("```")
    add("guest A(CPL3) writes ring, store-release head  ==cache lines==>  guest B(CPL3) reads")
    add("```")
    add("")
    add("**shm-irq.** The same rings; a side with nothing to do raises a waiting flag and sleeps. "
        "The other side, after publishing, rings the doorbell: `out` of (peer << 16 | vector) to "
        "the doorbell port, which KVM matches against an ioeventfd (one per peer and vector, as "
        "ivshmem-doorbell does) and signals in the kernel; that eventfd is an irqfd of the other "
        "VM, routed as an MSI to IDT vector 0x40 + vector, which KVM injects into the vCPU. The "
        "handler, installed by kvmpy into the guest's IDT, counts the interrupt and writes the "
        "x2APIC EOI. A CPL3 guest cannot execute `hlt`, so it sleeps through `int3` into a "
        "ring-0 gate that re-checks the count with interrupts off and then runs `sti; hlt`. "
        "No userspace exit and no Python on this path.")  # fmt: skip
    add("")
    add("```")
    add("guest A: out doorbell -> [trap] KVM ioeventfd -> eventfd -> irqfd -> MSI -> guest B's")
    add("  LAPIC -> wake vCPU B from hlt -> ring-0 handler (count, EOI) -> iretq -> guest B(CPL3)")
    add("```")
    add("")
    add("## 4. Method")
    add("")
    add("Guests timestamp with `rdtsc`. kvmpy sets both VMs' TSC offset to zero "
        "(KVM_VCPU_TSC_OFFSET), so the sender's and the receiver's readings are on one clock and "
        "a transfer is timed from the sender's first byte to the receiver's last checked byte. "
        "After a start barrier through the VMMs, the two guests meet once more in shared memory "
        "(shm) so that neither side's start-up is counted. Userspace exits are counted by the "
        "VMMs between the start barrier and the end-of-run mark (one exit each, not counted). "
        "The guests also time their own work, waits and doorbells; the VMMs time their exit "
        "handling, relay calls and waits with the host clock. First touches of the ring and "
        "buffers (a fault per page on this host) happen before the runs and are reported apart.")  # fmt: skip
    add("")
    add(f"Same-run references: host memcpy (glibc, the same size, touched buffers); an eventfd "
        f"ping-pong between two host threads on the two CPUs: "
        f"{_us(refs['eventfd']['rtt_seconds'] * 1e6)} per round trip; the exit round trip of "
        f"`kvmpy bench exits` at CPL3: {_us(ert['c_seconds'] * 1e6)} under its minimal C VMM, "
        f"{_us(ert['kvmpy_seconds'] * 1e6)} under kvmpy.")  # fmt: skip
    add("")
    add("## 5. Throughput")
    add("")
    add(
        "| mechanism | size | median time | throughput | host memcpy | vs memcpy | userspace exits / run | runs (each) |"
    )
    add("|---|---|---|---|---|---|---|---|")
    for r in sorted(
        thr, key=lambda r: (["pio", "shm-poll", "shm-irq"].index(r["mechanism"]), r["size"])
    ):
        each = " ".join(format_time(x) for x in r["runs_seconds"])
        add(f"| {r['mechanism']} | {_size(r['size'])} | {format_time(r['seconds'])} | "
            f"{format_rate(r['throughput_bytes_per_s'])} | {format_rate(r['memcpy_bytes_per_s'])} | "
            f"{r['ratio_to_memcpy']:.3g} | {r['userspace_exits']} | {each} |")  # fmt: skip
    for s in doc.get("skipped", []):
        add(f"| {s['mechanism']} | {_size(s['size'])} | not run: {s['why']} | | | | | |")
    errors = [r for r in doc.get("throughput", []) if "error" in r]
    for r in errors:
        add(f"| {r['mechanism']} | {_size(r['size'])} | failed: {r['error']} | | | | | |")
    add("")
    if "throughput.png" in images:
        add("![throughput against size](throughput.png)")
        add("")
    ok_all = all(r.get("checksum_ok") for grp in ("throughput", "pingpong", "pio_variants",
                 "wait_modes", "same_process") for r in doc.get(grp, []))  # fmt: skip
    add(f"Every byte of every run arrived intact: **{'yes' if ok_all else 'NO'}**.")
    add("")
    ft = [r["first_touch_seconds"] for r in thr if r["mechanism"] == "shm-poll"]
    if ft:
        add(f"First touch of the 2 × {_size(ring)} of rings (before the runs): "
            f"{format_time(ft[0]['sender'])} in the sender, {format_time(ft[0]['receiver'])} in the receiver.")  # fmt: skip
        add("")
    add("## 6. Latency")
    add("")
    pp = _ok(doc.get("pingpong", [])) + _ok(doc.get("wait_modes", []))
    add("| mechanism | message | median round trip | p10 | p90 | p99 | vs eventfd | exits / run |")
    add("|---|---|---|---|---|---|---|---|")
    for r in pp:
        if "pingpong" not in r:
            continue
        rt = r["rtt_us"]
        tag = (
            " (spinning on the interrupt count)"
            if r["options"]["wait_mode"] == "spin" and r["mechanism"] == "shm-irq"
            else ""
        )
        add(f"| {r['mechanism']}{tag} | {r['msg']} B | {_us(rt['median'])} | {_us(rt['p10'])} | "
            f"{_us(rt['p90'])} | {_us(rt['p99'])} | {r['ratio_to_eventfd']:.3g} | "
            f"{r['userspace_exits']} |")  # fmt: skip
    add("")
    if "latency.png" in images:
        add("![round trips](latency.png)")
        add("")
    add("## 7. Where the time goes")
    add("")
    add(render_breakdown(doc, bd))
    if "breakdown.png" in images:
        add("![per-layer breakdown](breakdown.png)")
        add("")
    add("## 8. Variants")
    add("")
    add(render_variants(doc))
    add("## 9. What explains the differences")
    add("")
    add(render_discussion(doc))
    add("## 10. Goals")
    add("")
    add(render_goals(doc))
    add("## 11. Reproduce")
    add("")
    add("```")
    add("kvmpy lab ipc --out DIR           # this report (a few minutes)")
    add("kvmpy lab ipc --out DIR --full    # also pio at 32 MiB and 1 GiB (much longer)")
    add("kvmpy ipc --mechanism shm-poll --size 1G --json   # one configuration")
    add("```")
    add("")
    return "\n".join(L) + "\n"


def render_breakdown(doc: dict, bd: dict) -> str:
    L = []
    tables = []
    if "pio" in bd:
        tables.append((f"pio, {_size(bd['pio']['size'])} (median run {format_time(bd['pio']['seconds'])})",
                       bd["pio"]["layers"]))  # fmt: skip
    best = bd.get("best")
    for key in (f"{best}/{GIB}", f"shm-irq/{2 << 20}"):
        if key in bd:
            b = bd[key]
            tables.append((f"{b['mechanism']}, {_size(b['size'])} (median run {format_time(b['seconds'])})",
                           b["layers"]))  # fmt: skip
    for title, layers in tables:
        layers = _nonzero(layers)
        L.append(f"**{title}.** Time per run in each layer, per side (the two sides run at the "
                 "same time, so each column adds up to about one run).")  # fmt: skip
        L.append("")
        L.append("| layer | sender | receiver |")
        L.append("|---|---|---|")
        names = list(dict.fromkeys([*layers["sender"], *layers["receiver"]]))
        for n in names:
            s, r = layers["sender"].get(n), layers["receiver"].get(n)
            L.append(
                f"| {n} | {format_time(s) if s is not None else ''} | {format_time(r) if r is not None else ''} |"
            )
        L.append("")
    if "pio" in bd:
        pe = bd["pio"]["per_exit"]
        L.append(f"Per userspace exit of pio ({pe['exits']:.0f} per run, both sides): the exit round "
                 f"trip itself is {_us(pe['exit_round_trip_us'])} (kvmpy bench exits, C VMM, CPL3); "
                 f"kvmpy's Python adds {_us(pe['vmm_python_us'])} and the relay socket "
                 f"{_us(pe['relay_us'])}.")  # fmt: skip
        L.append("")
    if "notification" in bd:
        n = bd["notification"]
        L.append(f"**The notification path** (shm-irq ping-pong, 64 B, median round trip "
                 f"{_us(n['rtt_us'])}, {n['doorbells_per_round']:.2f} doorbells per round trip). "
                 f"From the ringing guest's `rdtsc` just before its doorbell `out` to the first "
                 f"instructions of the peer's interrupt handler: {_us(n['injection_us'])} (the trap "
                 f"into KVM, the ioeventfd, eventfd, irqfd, MSI, waking the halted vCPU); from "
                 f"there to the woken guest code: {_us(n['wake_us'])} (the emulated ring-0 "
                 f"handler and two `iretq`). One way is the sum, "
                 f"{_us(n['injection_us'] + n['wake_us'])}, and the round trip two of them plus "
                 f"the copies. The ringing guest itself gets control back after "
                 f"{_us(n['doorbell_out_us'])}, while its peer is already waking up.")  # fmt: skip
        L.append("")
    return "\n".join(L) + "\n"


def render_variants(doc: dict) -> str:
    L = []
    pv = _ok(doc.get("pio_variants", []))
    if pv:
        L.append("**pio, 4 KiB, by instruction and coalescing.**")
        L.append("")
        L.append("Both sides use the same width: `out`/`in` per byte or per dword, or string "
                 "I/O (`rep outsl`/`rep insl`). The sender's own time is how long its guest "
                 "needed to hand the 4 KiB over (the relay's buffer takes it all); the transfer "
                 "ends when the receiver has it.")  # fmt: skip
        L.append("")
        L.append("| instructions | coalesced ring | transfer | throughput | sender's own time "
                 "| exits (sender) | exits (receiver) |")  # fmt: skip
        L.append("|---|---|---|---|---|---|---|")
        for r in pv:
            o = r["options"]
            ins = {"byte": "`out`/`in` al", "dword": "`out`/`in` eax",
                   "string": "`rep outsl`/`rep insl`"}[o["pio_width"]]  # fmt: skip
            L.append(f"| {ins} | {'yes' if o['pio_coalesce'] else 'no'} | {format_time(r['seconds'])} | "
                     f"{format_rate(r['throughput_bytes_per_s'])} | "
                     f"{format_time(r['layers']['sender']['run'])} | "
                     f"{r['userspace_exits_by_side']['sender']} | "
                     f"{r['userspace_exits_by_side']['receiver']} |")  # fmt: skip
        L.append("")
    wm = [r for r in _ok(doc.get("wait_modes", [])) if "pingpong" not in r]
    base = [
        r
        for r in _ok(doc.get("throughput", []))
        if r["mechanism"] == "shm-irq" and r["size"] == 2 << 20
    ]
    if wm and base:
        L.append(f"**shm-irq, 2 MiB, waiting in `hlt` against spinning on the interrupt count:** "
                 f"{format_rate(base[0]['throughput_bytes_per_s'])} against "
                 f"{format_rate(wm[0]['throughput_bytes_per_s'])}.")  # fmt: skip
        L.append("")
    sp = _ok(doc.get("same_process", []))
    if sp:
        L.append("**One process against two** (both VMMs as threads of one process):")
        L.append("")
        L.append("| mechanism | size | two processes | one process |")
        L.append("|---|---|---|---|")
        thr = {(r["mechanism"], r["size"]): r for r in _ok(doc.get("throughput", []))}
        for r in sp:
            two = thr.get((r["mechanism"], r["size"]))
            L.append(f"| {r['mechanism']} | {_size(r['size'])} | "
                     f"{format_rate(two['throughput_bytes_per_s']) if two else '-'} | "
                     f"{format_rate(r['throughput_bytes_per_s'])} |")  # fmt: skip
        L.append("")
    return "\n".join(L) + "\n"


def render_discussion(doc: dict) -> str:
    bd = doc.get("breakdown", {})
    ert = doc["references"]["exit_round_trip"]
    thr = {(r["mechanism"], r["size"]): r for r in _ok(doc.get("throughput", []))}
    L = []
    pv = {
        (r["options"]["pio_width"], r["options"]["pio_coalesce"]): r
        for r in _ok(doc.get("pio_variants", []))
    }
    plain, coal = pv.get(("string", False)), pv.get(("string", True))
    if "pio" in bd:
        pe = bd["pio"]["per_exit"]
        sender = bd["pio"]["layers"]["sender"]
        top = max(sender, key=sender.get)
        python_share = pe["vmm_python_us"] / (pe["exit_round_trip_us"] + pe["vmm_python_us"])
        bound = "trips through KVM" if python_share < 0.2 else "the VMM's Python as much as KVM"
        text = (f"**pio is bounded by {bound}.** Each trip from CPL3 into the hypervisor and out "
                f"to the VMM costs {_us(ert['c_seconds'] * 1e6)} here even under a minimal C "
                "VMM. KVM's emulator gives userspace one item of a `rep outs` per exit (it "
                "batches only `rep ins`, up to 1 KiB, its read-ahead buffer)")  # fmt: skip
        if plain and coal:
            text += (f": sending 4 KiB with plain `rep outsl` took {format_time(plain['layers']['sender']['run'])} "
                     f"and {plain['userspace_exits_by_side']['sender']} exits; with the coalesced "
                     f"ring {format_time(coal['layers']['sender']['run'])} and "
                     f"{coal['userspace_exits_by_side']['sender']} exits")  # fmt: skip
        text += (". The coalesced ring removes most exits, but every dword still traps into "
                 f"KVM's instruction emulator; the sender's largest layer is \"{top}\" "
                 f"({format_time(sender[top])} of a {format_time(bd['pio']['seconds'])} run), and the receiver's "
                 f"`rep insl` still costs an exit per KiB. Python adds {_us(pe['vmm_python_us'])} "
                 f"per exit ({_pct(python_share)} of a trip) and the relay socket "
                 f"{_us(pe['relay_us'])}.")  # fmt: skip
        L += [text, ""]
    poll = thr.get(("shm-poll", GIB))
    key = f"shm-poll/{GIB}"
    if poll:
        text = ("**shm-poll runs at cache speed.** Neither VMM nor KVM is involved once the "
                "region is mapped: the sender writes the pattern into the ring, the receiver's "
                "CPU pulls the cache lines across, and the only synchronization is a store and "
                f"a load of an index on its own cache line. The {_size(ring_size(doc))} rings stay in the CPUs' "
                "caches, while a 1 GiB host memcpy reads and writes DRAM; shm-poll moved 1 GiB "
                f"at {_pct(poll['ratio_to_memcpy'])} of that memcpy.")  # fmt: skip
        if key in bd:
            lay = bd[key]["layers"]
            recv_busy = lay["receiver"].get("guest: check it", 0) / max(bd[key]["seconds"], 1e-12)
            send_busy = lay["sender"].get("guest: make the pattern in the ring", 0) / max(
                bd[key]["seconds"], 1e-12
            )
            side, other = (
                ("receiver", "sender") if recv_busy >= send_busy else ("sender", "receiver")
            )
            text += (f" The {side} sets the pace: it is busy {_pct(max(recv_busy, send_busy))} of "
                     f"the run, the {other} {_pct(min(recv_busy, send_busy))}")  # fmt: skip
            if side == "receiver":
                text += (" — reading lines the other CPU has just written costs more than "
                         "writing them.")  # fmt: skip
            else:
                text += "."
        L += [text, ""]
    irq = thr.get(("shm-irq", GIB))
    n = bd.get("notification")
    if irq and poll:
        text = (f"**shm-irq pays for sleeping.** At 1 GiB it moved "
                f"{format_rate(irq['throughput_bytes_per_s'])} against shm-poll's "
                f"{format_rate(poll['throughput_bytes_per_s'])}: a side that finds the ring full or "
                "empty goes to sleep and needs a doorbell to continue, and each sleep costs a "
                "trap (`int3`), emulated ring-0 code and an interrupt injection on this host.")  # fmt: skip
        if n:
            text += (f" One notification costs about {_us(n['injection_us'] + n['wake_us'])} from "
                     "doorbell to woken code, against well under a microsecond for a spinning "
                     "reader to see an index change. In exchange a waiting VM uses no CPU, and "
                     "no exit or Python is on the path.")  # fmt: skip
        L += [text, ""]
    ev = doc["references"]["eventfd"]["rtt_seconds"]
    pp = {(r["mechanism"], r["msg"]): r for r in _ok(doc.get("pingpong", []))}
    a, b = pp.get(("shm-poll", 64)), pp.get(("shm-irq", 64))
    if a and b:
        ratio = b["rtt_us"]["median"] / (ev * 1e6)
        cmp_ = ("about as long as" if 0.8 <= ratio <= 1.25
                else "less than" if ratio < 1 else f"{ratio:.1f} times")  # fmt: skip
        L += [f"**Latency.** A 64-byte round trip takes {_us(a['rtt_us']['median'])} with "
              f"polling and {_us(b['rtt_us']['median'])} with doorbells, {cmp_} the "
              f"{_us(ev * 1e6)} two host threads need to bounce an eventfd between the same "
              "two CPUs. Waking a sleeping CPU dominates both, and it is expensive on this "
              "nested host (the eventfd figure moves with the machine's load: compare runs); "
              "the doorbell path adds the guest's trap and emulated handler but never leaves "
              "the kernel. Polling needs no wake-up at all: a cache line crosses between the "
              "two CPUs and back.", ""]  # fmt: skip
    sp = _ok(doc.get("same_process", []))
    if sp:
        ratios = []
        for r in sp:
            two = thr.get((r["mechanism"], r["size"]))
            if two:
                ratios.append(
                    (r["mechanism"], r["throughput_bytes_per_s"] / two["throughput_bytes_per_s"])
                )
        if ratios:
            close = all(0.8 <= x <= 1.25 for _, x in ratios)
            listed = ", ".join(f"{m} {x:.2f}x" for m, x in ratios)
            if close:
                L += [f"**Process separation costs nothing measurable** (one process against two: "
                      f"{listed}): the shared-memory data path does not involve the VMMs at all, "
                      "and for pio it changes only which process the relay socket's other end "
                      "belongs to.", ""]  # fmt: skip
            else:
                L += [f"**One process against two:** {listed}. The mechanisms' data paths are "
                      "the same in both layouts (the VMMs are not on the shared-memory path), so "
                      "differences this large come from the scheduling of the two vCPU threads on "
                      "a shared host; compare the spread between runs in section 5.", ""]  # fmt: skip
    return "\n".join(L) + "\n"


def render_goals(doc: dict) -> str:
    g = doc.get("goals", {})
    L = []
    x = g.get("shm_poll_1g_vs_memcpy")
    if x:
        L.append(f"- **shm-poll at 1 GiB ≥ 85 % of the same-run host memcpy: "
                 f"{'met' if x['met'] else 'not met'}** — {format_rate(x['throughput_bytes_per_s'])} "
                 f"against {format_rate(x['memcpy_bytes_per_s'])}, {_pct(x['ratio'])}.")  # fmt: skip
    x = g.get("shm_irq_zero_exits")
    if x:
        by = ", ".join(f"{_size(int(k))}: {v}" for k, v in x["by_size"].items())
        L.append(f"- **shm-irq with 0 userspace exits on the data path: "
                 f"{'met' if x['met'] else 'not met'}** — exits per transfer, both VMMs: {by}.")  # fmt: skip
    x = g.get("pio_string_vs_exit_round_trip")
    if x:
        L.append(f"- **pio with string I/O at ≥ 70 % of 4 KiB per exit round trip: "
                 f"{'met' if x['met'] else 'not met'}** — the exit round trip is "
                 f"{_us(x['exit_round_trip_seconds'] * 1e6)}, so the target is "
                 f"{format_rate(x['target_bytes_per_s'])}; pio reached "
                 f"{format_rate(x['best_throughput_bytes_per_s'])} ({_size(x['best_size'])}), "
                 f"{_pct(x['ratio'])} of 4 KiB per round trip. The goal assumes KVM hands a "
                 "string I/O instruction to the VMM a page per exit. It does not: `rep outs` "
                 "comes one item per exit (4 bytes with `rep outsl`), and `rep ins` 1 KiB per "
                 "exit at most: that alone caps the receiver at 1 KiB per round trip, "
                 f"{format_rate(x['ins_bound_bytes_per_s'])}, a quarter of what the goal assumes. "
                 "kvmpy's answer, the coalesced ring, keeps the sender out of userspace for 169 "
                 "of every 170 items, so what remains is KVM's per-item emulation in the kernel "
                 "and one exit per KiB on the receiver: the channel is bounded by KVM, and "
                 "Python is a small share of each exit (sections 7 and 9).")  # fmt: skip
    return "\n".join(L) + "\n"
