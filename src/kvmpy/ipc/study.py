"""`kvmpy lab ipc`: the whole inter-VM communication study, from measurements to report.

One command runs every configuration (each mechanism at each size, ping-pong latency, the
pio and wait-mode variants, one process against two), measures the same-run references,
and writes `results.json`, the plots and `report.md` into the output directory. The
report's prose is generated from the measured figures; nothing in it is typed in by hand.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import KvmpyError
from ..memory import format_size
from .bench import (
    IpcOptions,
    default_cpus,
    eventfd_reference,
    exit_reference,
    memcpy_reference,
    run_ipc,
)
from .layout import Mechanism, PioWidth, WaitMode

PIO, POLL, IRQ = Mechanism.PIO, Mechanism.SHM_POLL, Mechanism.SHM_IRQ
MECHANISMS = (PIO, POLL, IRQ)
KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
#: The issue's sizes, and a few between them for the throughput curve.
HEADLINE_SIZES = (4 * KIB, 2 * MIB, GIB)
CURVE_SIZES = (4 * KIB, 64 * KIB, 2 * MIB, 32 * MIB, GIB)
#: pio moves ~4 MB/s here: these sizes need --full (1 GiB is ~5 minutes a run).
PIO_FULL_ONLY = (32 * MIB, GIB)
RUNS = 5
ROUNDS = 200
MESSAGES = (64, 4 * KIB)
GOAL_MEMCPY = 0.85
GOAL_PIO = 0.70


class StudyError(KvmpyError):
    """The study could not run or could not write its output."""


@dataclass
class Item:
    key: str
    group: str
    options: IpcOptions
    note: str = ""


@dataclass
class Study:
    full: bool
    runs: int = RUNS
    cpus: tuple[int, int] | None = None
    items: list[Item] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    #: Sizes of the references: exits per run of the exit benchmark, eventfd round trips.
    reference_exits: int = 2000
    reference_rounds: int = 2000


def plan(full: bool = False, runs: int = RUNS, cpus=None) -> Study:
    study = Study(full=full, runs=runs, cpus=cpus)

    def add(key, group, note="", **kw):
        kw.setdefault("runs", runs)
        kw.setdefault("cpus", cpus)
        study.items.append(Item(key, group, IpcOptions(**kw), note))

    for m in MECHANISMS:
        for size in CURVE_SIZES:
            if m is PIO and size in PIO_FULL_ONLY and not full:
                study.skipped.append(
                    {
                        "mechanism": m.label,
                        "size": size,
                        "why": "pio moves a few MB/s on this kind of host; `--full` runs it",
                    }
                )
                continue
            add(f"throughput/{m.label}/{size}", "throughput", mechanism=m, size=size)
    for m in MECHANISMS:
        for msg in MESSAGES:
            add(f"pingpong/{m.label}/{msg}", "pingpong", mechanism=m, size=msg, pingpong=ROUNDS)
    add(
        f"pingpong/{IRQ.label}/64/spin", "wait_modes", mechanism=IRQ, size=64, pingpong=ROUNDS,
        wait_mode=WaitMode.SPIN,
    )  # fmt: skip
    add(
        f"throughput/{IRQ.label}/{2 * MIB}/spin", "wait_modes", mechanism=IRQ, size=2 * MIB,
        wait_mode=WaitMode.SPIN,
    )  # fmt: skip
    for width in (PioWidth.BYTE, PioWidth.DWORD, PioWidth.STRING):
        for coalesce in (False, True):
            add(
                f"pio/{width.label}/{'coalesced' if coalesce else 'plain'}", "pio_variants",
                mechanism=PIO, size=4 * KIB, pio_width=width, pio_coalesce=coalesce,
            )  # fmt: skip
    for m, size in ((PIO, 64 * KIB), (POLL, 2 * MIB), (IRQ, 2 * MIB)):
        add(f"same_process/{m.label}/{size}", "same_process", mechanism=m, size=size,
            same_process=True)  # fmt: skip
    return study


def _host(cpus) -> dict:
    from ..doctor import study_host

    host = study_host()
    host["pinned_cpus"] = list(cpus) if cpus else None
    host["load_average_at_start"] = round(os.getloadavg()[0], 2)  # one figure in this report
    return host


def run_study(study: Study, progress=None) -> dict:
    """Run every item and reference; returns the results document."""
    t0 = time.monotonic()
    cpus = study.cpus
    doc: dict = {
        "study": "ipc",
        "version": 1,
        "full": study.full,
        "runs": study.runs,
        "command": "kvmpy lab ipc" + (" --full" if study.full else ""),
        "host": _host(cpus),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "skipped": study.skipped,
    }
    sizes = sorted({it.options.size for it in study.items if not it.options.pingpong})
    steps = len(study.items) + len(sizes) + 2
    done = 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, steps, what)

    refs: dict = {}
    refs["exit_round_trip"] = exit_reference(study.reference_exits, cpu=cpus[1] if cpus else None)
    tick("exit round trip")
    refs["eventfd"] = eventfd_reference(study.reference_rounds, cpus=cpus)
    tick("eventfd ping-pong")
    refs["memcpy"] = {}
    for size in sizes:
        refs["memcpy"][str(size)] = memcpy_reference(size, study.runs, cpus[1] if cpus else None)
        tick(f"memcpy {format_size(size)}")
    doc["references"] = refs
    groups: dict[str, list] = {}
    for it in study.items:
        try:
            r = run_ipc(it.options)
        except KvmpyError as e:
            r = {
                "mechanism": it.options.mechanism.label,
                "size": it.options.size,
                "error": str(e),
                "checksum_ok": False,
            }
        r["key"] = it.key
        if not it.options.pingpong and "error" not in r:
            mem = refs["memcpy"][str(it.options.size)]
            r["memcpy_bytes_per_s"] = mem["bytes_per_s"]
            r["ratio_to_memcpy"] = r["throughput_bytes_per_s"] / mem["bytes_per_s"]
        elif "error" not in r:
            r["eventfd_rtt_seconds"] = refs["eventfd"]["rtt_seconds"]
            r["ratio_to_eventfd"] = r["seconds"] / refs["eventfd"]["rtt_seconds"]
        groups.setdefault(it.group, []).append(r)
        tick(it.key)
    doc.update(groups)
    doc["breakdown"] = breakdowns(doc)
    doc["goals"] = goals(doc)
    doc["host"]["load_average_at_end"] = round(os.getloadavg()[0], 2)
    doc["elapsed_s"] = round(time.monotonic() - t0, 1)
    return doc


# --- analysis ---------------------------------------------------------------------------------


def find(doc: dict, group: str, key: str) -> dict | None:
    for r in doc.get(group, []):
        if r.get("key") == key and "error" not in r:
            return r
    return None


def best_mechanism(doc: dict) -> Mechanism:
    """The shared-memory mechanism with the higher throughput at the largest size measured."""
    best, rate = POLL, -1.0
    for m in (POLL, IRQ):
        r = find(doc, "throughput", f"throughput/{m.label}/{GIB}")
        if r and r["throughput_bytes_per_s"] > rate:
            best, rate = m, r["throughput_bytes_per_s"]
    return best


def pio_layers(r: dict, exit_rtt: float) -> dict:
    """Seconds per layer of one pio run, each side, from the instrumentation."""
    s, v = r["layers"]["sender"], r["layers"]["receiver"]
    s_exits = s["exits"] * exit_rtt
    r_exits = v["exits"] * exit_rtt
    sender = {
        "guest: make the pattern": s["work"],
        "KVM: coalesced out, emulated in the kernel": max(0.0, s["io"] - s_exits - s["vmm"]),
        "exits to the VMM (mode switch, KVM)": min(s_exits, s["io"]),
        "VMM: Python (drain ring, dispatch)": max(0.0, s["vmm"] - s["relay_send"]),
        "host: relay socket send": s["relay_send"],
        "guest: loop, flush": max(0.0, s["run"] - s["work"] - s["io"]),
    }
    receiver = {
        "guest: check the pattern": v["work"],
        "KVM: rep ins copy into the guest": max(0.0, v["io"] - r_exits - v["vmm"]),
        "exits to the VMM (mode switch, KVM)": min(r_exits, v["io"]),
        "VMM: Python (dispatch)": max(0.0, v["vmm"] - v["relay_wait"] - v["relay_recv"]),
        "host: relay socket receive": v["relay_recv"],
        "VMM: waiting for the sender's bytes": v["relay_wait"],
        "guest: loop": max(0.0, v["run"] - v["work"] - v["io"]),
    }
    return {"sender": sender, "receiver": receiver}


def shm_layers(r: dict) -> dict:
    out = {}
    for side, verb in (("sender", "make the pattern in the ring"), ("receiver", "check it")):
        x = r["layers"][side]
        notify = x["irq_latency"] * x["irq_samples"]
        wake = x["irq_wake"] * x["irq_samples"]
        waiting = "room" if side == "sender" else "data"
        out[side] = {
            f"guest: {verb}": x["work"],
            "guest: doorbell out (ioeventfd, no exit)": x["doorbell"],
            "KVM: notification to handler (irqfd, MSI)": min(notify, x["wait"]),
            "guest: handler to wake-up (iretq)": min(wake, max(0.0, x["wait"] - notify)),
            f"guest: waiting for {waiting}": max(0.0, x["wait"] - notify - wake),
            "guest: ring bookkeeping": max(0.0, x["run"] - x["work"] - x["wait"] - x["doorbell"]),
        }
    return out


def breakdowns(doc: dict) -> dict:
    exit_rtt = doc["references"]["exit_round_trip"]["c_seconds"]
    out: dict = {"exit_round_trip_seconds": exit_rtt}
    pio_size = max(
        (
            r["size"]
            for r in doc.get("throughput", [])
            if r["mechanism"] == "pio" and "error" not in r
        ),
        default=None,
    )
    if pio_size:
        r = find(doc, "throughput", f"throughput/pio/{pio_size}")
        out["pio"] = {"size": pio_size, "seconds": r["seconds"], "layers": pio_layers(r, exit_rtt)}
        exits = r["layers"]["sender"]["exits"] + r["layers"]["receiver"]["exits"]
        vmm = r["layers"]["sender"]["vmm"] + r["layers"]["receiver"]["vmm"]
        waited = r["layers"]["receiver"]["relay_wait"]
        out["pio"]["per_exit"] = {
            "exits": exits,
            "exit_round_trip_us": exit_rtt * 1e6,
            "vmm_python_us": (vmm - waited - r["layers"]["sender"]["relay_send"]
                              - r["layers"]["receiver"]["relay_recv"]) / max(exits, 1) * 1e6,
            "relay_us": (r["layers"]["sender"]["relay_send"] + r["layers"]["receiver"]["relay_recv"])
            / max(exits, 1) * 1e6,
        }  # fmt: skip
    best = best_mechanism(doc)
    for m, size in ((best, GIB), (IRQ, 2 * MIB)):
        r = find(doc, "throughput", f"throughput/{m.label}/{size}")
        if r:
            out[f"{m.label}/{size}"] = {
                "mechanism": m.label, "size": size, "seconds": r["seconds"],
                "layers": shm_layers(r),
            }  # fmt: skip
    out["best"] = best.label
    pp = find(doc, "pingpong", f"pingpong/{IRQ.label}/64")
    if pp:
        s, v = pp["layers"]["sender"], pp["layers"]["receiver"]
        rounds = pp["pingpong"]
        # Per one-way trip: the doorbell write, the injection, the wake-up.
        out["notification"] = {
            "rtt_us": pp["rtt_us"]["median"],
            "doorbell_out_us": (s["doorbell"] + v["doorbell"])
            / max(s["doorbells"] + v["doorbells"], 1) * 1e6,
            "injection_us": statistics.fmean([s["irq_latency"], v["irq_latency"]]) * 1e6,
            "wake_us": statistics.fmean([s["irq_wake"], v["irq_wake"]]) * 1e6,
            "doorbells_per_round": (s["doorbells"] + v["doorbells"]) / rounds,
        }  # fmt: skip
    return out


def goals(doc: dict) -> dict:
    g: dict = {}
    r = find(doc, "throughput", f"throughput/{POLL.label}/{GIB}")
    if r:
        g["shm_poll_1g_vs_memcpy"] = {
            "goal": GOAL_MEMCPY,
            "ratio": r["ratio_to_memcpy"],
            "throughput_bytes_per_s": r["throughput_bytes_per_s"],
            "memcpy_bytes_per_s": r["memcpy_bytes_per_s"],
            "met": r["ratio_to_memcpy"] >= GOAL_MEMCPY,
        }
    irq = [x for x in doc.get("throughput", []) if x["mechanism"] == IRQ.label and "error" not in x]
    if irq:
        worst = max(x["userspace_exits"] for x in irq)
        g["shm_irq_zero_exits"] = {
            "goal": 0,
            "max_userspace_exits_per_run": worst,
            "by_size": {str(x["size"]): x["userspace_exits"] for x in irq},
            "met": worst == 0,
        }
    rtt = doc["references"]["exit_round_trip"]
    pio = find(doc, "throughput", f"throughput/pio/{4 * KIB}")
    big = [x for x in doc.get("throughput", []) if x["mechanism"] == "pio" and "error" not in x]
    if pio and big:
        best_pio = max(big, key=lambda x: x["throughput_bytes_per_s"])
        target = GOAL_PIO * 4096 / rtt["c_seconds"]
        ins_bound = 1024 / rtt["c_seconds"]
        g["pio_string_vs_exit_round_trip"] = {
            "goal": GOAL_PIO,
            "exit_round_trip_seconds": rtt["c_seconds"],
            "kvmpy_exit_round_trip_seconds": rtt["kvmpy_seconds"],
            "target_bytes_per_s": target,
            "throughput_4k_bytes_per_s": pio["throughput_bytes_per_s"],
            "best_throughput_bytes_per_s": best_pio["throughput_bytes_per_s"],
            "best_size": best_pio["size"],
            # Against 4 KiB per exit round trip; the goal is GOAL_PIO of that.
            "ratio": best_pio["throughput_bytes_per_s"] * rtt["c_seconds"] / 4096,
            "ins_bound_bytes_per_s": ins_bound,
            "met": best_pio["throughput_bytes_per_s"] >= target,
        }
    return g


# --- output -----------------------------------------------------------------------------------


def write(doc: dict, out: Path) -> list[Path]:
    from .report import plots, render

    try:
        out.mkdir(parents=True, exist_ok=True)
        files = [out / "results.json"]
        files[0].write_text(json.dumps(doc, indent=1) + "\n")
        files += plots(doc, out)
        report = out / "report.md"
        report.write_text(render(doc, [p.name for p in files if p.suffix == ".png"]))
        files.append(report)
    except OSError as e:
        raise StudyError(f"cannot write the study to {out}: {e.strerror}") from None
    return files


def main_study(out: Path, full: bool, runs: int = RUNS, progress=None) -> tuple[dict, list[Path]]:
    cpus = default_cpus()
    study = plan(full=full, runs=runs, cpus=cpus)
    doc = run_study(study, progress)
    return doc, write(doc, out)
