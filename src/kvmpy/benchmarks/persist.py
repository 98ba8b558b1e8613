"""`kvmpy bench persist`: snapshot, restore (eager and lazy) and live migration of a guest with
1 GiB of RAM of which it touched 64 MiB, against plain C moving the same bytes in the same run.

Each run:

  1. a source VM (the hashchain guest) touches `touch` bytes, then idles in a TSC-paced loop;
  2. snapshot it through the control operations (the VM pauses, is written, goes on);
     reference: C writing as many bytes sequentially, with fsync, to the same directory;
  3. with the source paused, restore the snapshot in a new `kvmpy restore` process, eagerly
     (reference: C reading the snapshot's data extents into fresh memory) and lazily (goal:
     the VM runs at most 10 ms after the restore began);
  4. migrate the idle VM to a `kvmpy migrate-receive` process on loopback;
  5. start it again, dirtying `dirty_rate` MiB/s, and migrate that one;
     reference for both: C sending the first round's bytes over loopback TCP (goal: downtime at
     most 30 ms).

The restore figures come from the restored process itself (`--json`): from the start of the
restore (snapshot opened) to the first KVM_RUN, without the interpreter's start-up.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..memory import format_size, parse_size
from . import BenchmarkError, build_c, median, plot_path, positive_int, report, save_figure

LAZY_GOAL_MS = 10.0
DOWNTIME_GOAL_MS = 30.0
DEFAULT_MEMORY = "1G"
DEFAULT_TOUCH = "64M"
DEFAULT_DIRTY_MIB_S = 128.0
DEFAULT_RUNS = 3
#: How long each restored or migrated VM runs before it is stopped (--timeout).
RUN_AFTER_S = 0.3
TICK_S = 0.001
KVMPY = [sys.executable, "-m", "kvmpy"]


def _ref(binary: Path, *args) -> tuple[float, int]:
    proc = subprocess.run(
        [str(binary), *map(str, args)], capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0:
        raise BenchmarkError(f"the C reference failed: {proc.stderr.strip() or proc.returncode}")
    ns, nbytes = proc.stdout.split()
    return int(ns) / 1e6, int(nbytes)


def _last_json(stdout: bytes, what: str) -> dict:
    try:
        return json.loads(stdout[stdout.rindex(b"\n{") + 1 :] if b"\n{" in stdout else stdout)
    except ValueError:
        raise BenchmarkError(f"{what} printed no JSON result") from None


class _Source:
    """A hashchain VM run by a VmSession in the main thread; `drive` runs in a helper thread."""

    def __init__(self, image: Path, memory: str, touch: int, dirty_pages: int):
        from ..machine import Machine, MachineConfig
        from ..persist.guest import FOREVER, HashchainParams, set_params
        from ..persist.session import VmSession

        self.machine = Machine(MachineConfig(mode="long-user", memory=memory))
        self.machine.load_file(image)
        khz = self.machine.vcpus[0].fd.get_tsc_khz()
        params = HashchainParams(
            work_bytes=touch,
            lines=2,
            rounds_per_line=1000,
            memsum_every=0,
            dirty_pages=dirty_pages,
            tick_cycles=max(1, int(khz * 1000 * TICK_S)),
            ticks=FOREVER,
        )
        set_params(self.machine, params)
        self.session = VmSession(self.machine)

    def run(self, drive) -> tuple[Any, dict]:
        from ..persist.session import helper_thread

        out: dict[str, Any] = {}

        def body():
            try:
                deadline = time.monotonic() + 120
                while b"hashchain: ready" not in self.machine.output:
                    if self.session.state == "stopped" or time.monotonic() > deadline:
                        raise BenchmarkError("the benchmark guest never got ready")
                    time.sleep(0.005)
                out["value"] = drive(self.session)
            except BaseException as e:
                out["error"] = e
            finally:
                if self.session.state != "stopped":
                    from ..result import StopReason

                    self.machine.request_stop(StopReason.INTERRUPTED, "benchmark")

        driver = helper_thread(body, name="bench-persist")
        try:
            result = self.session.run(timeout=600)
            driver.join()  # a migration ends the run before its driver is done
        finally:
            self.machine.close()
        if "error" in out:
            raise out["error"]
        return out["value"], result


def _receiver(timeout: float) -> tuple[subprocess.Popen, int]:
    import re

    proc = subprocess.Popen(
        [*KVMPY, "migrate-receive", "--listen", "127.0.0.1:0", "--json", "--timeout", str(timeout)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    line = proc.stderr.readline().decode()
    m = re.search(r"127\.0\.0\.1:(\d+)", line)
    if not m:
        proc.kill()
        raise BenchmarkError(f"kvmpy migrate-receive did not start: {line.strip()}")
    return proc, int(m.group(1))


def _migrate(session, rate_note: str) -> dict:
    from ..persist import control

    dst, port = _receiver(RUN_AFTER_S)
    try:
        result = control.migrate(session, f"127.0.0.1:{port}")
        out, err = dst.communicate(timeout=120)
    finally:
        if dst.poll() is None:
            dst.kill()
            dst.wait()
    dest = _last_json(out, "kvmpy migrate-receive")
    if dest.get("stop_reason") != "timeout":
        raise BenchmarkError(f"the migrated VM did not keep running ({dest.get('message')})")
    result["destination_report"] = dest.get("migration")
    result["dirtying"] = rate_note
    return result


def _restore(path: Path, lazy: bool) -> dict:
    t = time.monotonic()
    proc = subprocess.run(
        [*KVMPY, "restore", str(path), "--json", "--timeout", str(RUN_AFTER_S)]
        + (["--lazy"] if lazy else []),
        capture_output=True,
        timeout=120,
    )
    wall = time.monotonic() - t
    doc = _last_json(proc.stdout, "kvmpy restore")
    if doc.get("stop_reason") != "timeout":
        raise BenchmarkError(
            f"the restored VM did not keep running: {proc.stderr.decode().strip()}"
        )
    r = doc["restore"]
    r["process_wall_s"] = round(wall, 3)
    return r


def one_run(
    image: Path, memory: str, touch: int, dirty_mib_s: float, ref: Path, work: Path
) -> dict:
    from ..persist import control

    snap = work / "snap"
    doc: dict[str, Any] = {}

    def idle(session):
        t = time.monotonic()
        info = control.snapshot(session, str(snap))
        info["op_ms"] = round((time.monotonic() - t) * 1e3, 3)
        doc["snapshot"] = info
        doc["ref_write_ms"], _ = _ref(ref, "write", work / "ref.bin", info["pages_written"] * 4096)
        os.unlink(work / "ref.bin")
        # The source would compete for the CPU with the restored VMs: hold it.
        control.pause(session)
        doc["ref_read_ms"], _ = _ref(ref, "read", snap / "memory")
        doc["eager"] = _restore(snap, lazy=False)
        doc["lazy"] = _restore(snap, lazy=True)
        control.resume(session)
        doc["migrate_idle"] = _migrate(session, "idle")

    _, result = _Source(image, memory, touch, 0).run(idle)
    if result.stop_reason.value != "migrated":
        raise BenchmarkError(f"the idle VM ended with {result.stop_reason.value}")

    pages_per_ms = max(1, round(dirty_mib_s * 256 * TICK_S))

    def dirtying(session):
        time.sleep(0.2)  # let the dirtying settle in
        doc["migrate_dirty"] = _migrate(session, f"{pages_per_ms} pages per ms")

    _, result = _Source(image, memory, touch, pages_per_ms).run(dirtying)
    if result.stop_reason.value != "migrated":
        raise BenchmarkError(f"the dirtying VM ended with {result.stop_reason.value}")
    mig = doc["migrate_dirty"]
    mig["dirty_mib_s"] = round(pages_per_ms / TICK_S / 256, 1)
    # What the guest managed while round 0 was sent: the pages round 1 found dirty. On KVM-PVM
    # the first write to a page after each dirty-log reset traps into KVM (~33 µs from CPL3),
    # which caps how fast a guest can dirty memory while it is being migrated.
    mig["achieved_dirty_mib_s"] = round(
        mig["pages_per_round"][1] / mig["seconds_per_round"][0] / 256, 1
    )
    first = doc["migrate_idle"]["bytes_per_round"][0]
    doc["ref_tcp_ms"], _ = _ref(ref, "tcp", first)
    return doc


def run(
    memory: str = DEFAULT_MEMORY,
    touch: str = DEFAULT_TOUCH,
    dirty_mib_s: float = DEFAULT_DIRTY_MIB_S,
    runs: int = DEFAULT_RUNS,
    directory: Path | None = None,
    on_run=None,
) -> dict[str, Any]:
    from ..persist.guest import image_path

    mem_bytes, touch_bytes = parse_size(memory), parse_size(touch)
    if touch_bytes % 4096 or not 0 < touch_bytes <= mem_bytes - (8 << 20):
        raise BenchmarkError("--touch must be a 4K multiple at least 8M below --mem")
    ref = build_c("persist_ref.c")
    image = image_path()
    samples = []
    with tempfile.TemporaryDirectory(prefix="kvmpy-bench-persist-", dir=directory) as tmp:
        for i in range(runs):
            work = Path(tmp) / f"run{i}"
            work.mkdir()
            samples.append(one_run(image, memory, touch_bytes, dirty_mib_s, ref, work))
            if on_run is not None:
                on_run(i)
    return summarize(samples, memory=mem_bytes, touch=touch_bytes, dirty_mib_s=dirty_mib_s)


def summarize(samples: list[dict], **setup) -> dict[str, Any]:
    def med(get) -> float:
        return round(median([get(s) for s in samples]), 3)

    snap_ms = med(lambda s: s["snapshot"]["op_ms"])
    eager_ms = med(lambda s: s["eager"]["restore_to_first_instruction_ms"])
    lazy_ms = med(lambda s: s["lazy"]["restore_to_first_instruction_ms"])
    doc: dict[str, Any] = {
        "benchmark": "persist",
        **setup,
        "runs": len(samples),
        "snapshot": {
            "ms_median": snap_ms,
            "disk_bytes": samples[-1]["snapshot"]["disk_bytes"],
            "memory_bytes": samples[-1]["snapshot"]["memory_bytes"],
            "pages_written": samples[-1]["snapshot"]["pages_written"],
            "ref_write_ms_median": med(lambda s: s["ref_write_ms"]),
        },
        "eager_restore": {
            "ms_median": eager_ms,
            "memory_ms_median": med(lambda s: s["eager"]["memory_ms"]),
            "ref_read_ms_median": med(lambda s: s["ref_read_ms"]),
        },
        "lazy_restore": {
            "ms_median": lazy_ms,
            # None when no run faulted at all: the handler's background pass can load every
            # page before the guest touches one.
            "first_fault_served_ms_median": (
                round(median(firsts), 3)
                if (
                    firsts := [
                        x
                        for s in samples
                        if (x := s["lazy"].get("first_fault_served_ms")) is not None
                    ]
                )
                else None
            ),  # fmt: skip
            "pages_faulted_median": med(lambda s: s["lazy"]["pages_faulted"]),
            "pages_loaded_median": med(lambda s: s["lazy"]["pages_loaded"]),
            "pages_total": samples[-1]["lazy"]["pages_total"],
            "goal_ms": LAZY_GOAL_MS,
            "goal_met": lazy_ms <= LAZY_GOAL_MS,
        },
        "ref_tcp_ms_median": med(lambda s: s["ref_tcp_ms"]),
    }
    doc["snapshot"]["ratio_to_ref"] = round(snap_ms / doc["snapshot"]["ref_write_ms_median"], 2)
    doc["eager_restore"]["ratio_to_ref"] = round(
        eager_ms / doc["eager_restore"]["ref_read_ms_median"], 2
    )
    doc["lazy_restore"]["ratio_to_eager"] = round(lazy_ms / eager_ms, 3)
    for key in ("migrate_idle", "migrate_dirty"):
        down = med(lambda s, k=key: s[k]["downtime_ms"])
        total = med(lambda s, k=key: s[k]["total_s"])
        last = samples[-1][key]
        doc[key] = {
            "downtime_ms_median": down,
            "total_s_median": total,
            "rounds_median": med(lambda s, k=key: s[k]["rounds"]),
            "pages_per_round_last_run": last["pages_per_round"],
            "downtime_parts_ms_last_run": last["downtime_parts_ms"],
            "total_over_ref_tcp": round(total * 1e3 / doc["ref_tcp_ms_median"], 2),
            "goal_ms": DOWNTIME_GOAL_MS,
            "goal_met": down <= DOWNTIME_GOAL_MS,
            "dirtying": last["dirtying"],
        }
    doc["migrate_dirty"]["achieved_dirty_mib_s_median"] = med(
        lambda s: s["migrate_dirty"]["achieved_dirty_mib_s"]
    )
    doc["samples"] = samples
    doc["python"] = platform.python_version()
    doc["kernel"] = platform.release()
    doc["load_average_at_start"] = os.getloadavg()[0]
    return doc


def render(doc: dict, console) -> None:
    from rich.table import Table

    s, e, lz = doc["snapshot"], doc["eager_restore"], doc["lazy_restore"]
    t = Table(
        title=f"Snapshot and restore: {format_size(doc['memory'])} guest, "
        f"{format_size(doc['touch'])} touched, medians of {doc['runs']} runs"
    )
    for col in ("step", "kvmpy", "reference (C, same bytes)", "ratio", "goal"):
        t.add_column(col, justify="left" if col == "step" else "right")
    t.add_row(
        "snapshot (pause, write, fsync)", f"{s['ms_median']:.1f} ms",
        f"{s['ref_write_ms_median']:.1f} ms write+fsync", f"{s['ratio_to_ref']:.2f}×", "",
    )  # fmt: skip
    t.add_row(
        "eager restore to first KVM_RUN", f"{e['ms_median']:.1f} ms",
        f"{e['ref_read_ms_median']:.1f} ms read", f"{e['ratio_to_ref']:.2f}×", "",
    )  # fmt: skip
    t.add_row(
        "lazy restore to first KVM_RUN", f"{lz['ms_median']:.2f} ms", "",
        f"{lz['ratio_to_eager']:.3f}× eager",
        f"≤ {lz['goal_ms']:.0f} ms: {'met' if lz['goal_met'] else 'NOT met'}",
    )  # fmt: skip
    console.print(t)
    console.print(
        f"snapshot size: {s['disk_bytes'] / (1 << 20):.1f} MiB on disk for "
        f"{s['memory_bytes'] / (1 << 20):.0f} MiB of RAM ({s['pages_written']} pages written); "
        + (
            f"lazy: first fault served at {lz['first_fault_served_ms_median']:.2f} ms, "
            if lz["first_fault_served_ms_median"] is not None
            else "lazy: no fault (the handler loaded every page first), "
        )
        + f"{lz['pages_faulted_median']:.0f} faults and {lz['pages_loaded_median']:.0f} of "
        f"{lz['pages_total']} pages loaded in the VM's first {RUN_AFTER_S} s"
    )
    m = Table(title="Live migration over loopback")
    for col in ("guest", "downtime", "total", "rounds", "pages per round (last run)", "goal"):
        m.add_column(col, justify="left" if col == "guest" else "right")
    for key, label in (("migrate_idle", "idle"), ("migrate_dirty", None)):
        g = doc[key]
        name = label or f"dirtying {doc['dirty_mib_s']:.0f} MiB/s"
        m.add_row(
            name, f"{g['downtime_ms_median']:.1f} ms", f"{g['total_s_median'] * 1e3:.0f} ms",
            f"{g['rounds_median']:.0f}", " ".join(map(str, g["pages_per_round_last_run"])),
            f"≤ {g['goal_ms']:.0f} ms: {'met' if g['goal_met'] else 'NOT met'}",
        )  # fmt: skip
    console.print(m)
    console.print(
        f"the dirtying guest managed {doc['migrate_dirty']['achieved_dirty_mib_s_median']:.0f} "
        f"MiB/s of the {doc['dirty_mib_s']:.0f} asked while round 0 was sent (the first write "
        "to a page after a dirty-log reset traps into KVM)"
    )
    console.print(
        f"reference: C sends the first round's bytes over loopback TCP in "
        f"{doc['ref_tcp_ms_median']:.1f} ms; the idle migration's total is "
        f"{doc['migrate_idle']['total_over_ref_tcp']:.1f}× that"
    )


def plot(doc: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels = ["snapshot", "eager\nrestore", "lazy\nrestore", "downtime\nidle", "downtime\ndirtying"]
    keys = [
        lambda s: s["snapshot"]["op_ms"],
        lambda s: s["eager"]["restore_to_first_instruction_ms"],
        lambda s: s["lazy"]["restore_to_first_instruction_ms"],
        lambda s: s["migrate_idle"]["downtime_ms"],
        lambda s: s["migrate_dirty"]["downtime_ms"],
    ]
    for i, get in enumerate(keys):
        values = [get(s) for s in doc["samples"]]
        ax.scatter([i] * len(values), values, color="tab:orange", zorder=3)
        ax.bar(i, median(values), color="tab:blue", alpha=0.5)
    refs = [
        doc["snapshot"]["ref_write_ms_median"], doc["eager_restore"]["ref_read_ms_median"],
        None, None, None,
    ]  # fmt: skip
    for i, r in enumerate(refs):
        if r is not None:
            ax.hlines(r, i - 0.4, i + 0.4, color="black", ls="--", lw=1)
    ax.hlines(LAZY_GOAL_MS, 1.6, 2.4, color="tab:red", lw=1)
    ax.hlines(DOWNTIME_GOAL_MS, 2.6, 4.4, color="tab:red", lw=1)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("ms")
    ax.set_title(
        f"kvmpy bench persist: {format_size(doc['memory'])} guest, {format_size(doc['touch'])} "
        "touched\nbars: medians, dots: runs, dashed: C reference, red: goals",
        fontsize="medium",
    )
    save_figure(fig, path, dpi=120)


# --- command line --------------------------------------------------------------------------------


def add_parser(sub) -> None:
    p = sub.add_parser(
        "persist",
        help="snapshot, lazy restore and live migration of a 1 GiB guest",
        description="Snapshot a guest with 1 GiB of RAM and 64 MiB touched, restore it in a new "
        "process eagerly and lazily (goal: running within 10 ms), and live-migrate it to "
        "another process over loopback, idle and while it dirties memory (goal: downtime at "
        "most 30 ms); each against C moving the same bytes in the same run. The C reference "
        "is built with gcc on first use and cached.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--runs", type=positive_int, default=DEFAULT_RUNS, metavar="R",
                   help=f"runs (default {DEFAULT_RUNS}); figures are medians")  # fmt: skip
    p.add_argument("--mem", default=DEFAULT_MEMORY, metavar="SIZE",
                   help=f"guest RAM (default {DEFAULT_MEMORY})")  # fmt: skip
    p.add_argument("--touch", default=DEFAULT_TOUCH, metavar="SIZE",
                   help=f"memory the guest touches (default {DEFAULT_TOUCH})")  # fmt: skip
    p.add_argument("--dirty-rate", type=float, default=DEFAULT_DIRTY_MIB_S, metavar="MIB_S",
                   help=f"MiB/s the second migrated guest dirties (default {DEFAULT_DIRTY_MIB_S:g})")  # fmt: skip
    p.add_argument("--dir", type=Path, metavar="DIR",
                   help="where to write snapshots (default: the system's temporary directory)")  # fmt: skip
    p.add_argument("--plot", type=plot_path, metavar="FILE", help="write a plot (.png/.svg/.pdf)")
    p.set_defaults(func=cmd_persist)


def cmd_persist(args) -> int:
    from rich.console import Console

    from ..errors import ConfigError

    if args.dirty_rate <= 0:
        raise ConfigError("--dirty-rate must be positive")
    if args.dir is not None and not args.dir.is_dir():
        raise ConfigError(f"--dir {args.dir} is not a directory")
    err = Console(stderr=True, highlight=False)

    def on_run(i: int) -> None:
        if err.is_terminal:
            err.print(f"run {i + 1}/{args.runs} done")

    try:
        doc = run(args.mem, args.touch, args.dirty_rate, args.runs, args.dir, on_run=on_run)
    except KeyboardInterrupt:
        err.print("kvmpy: interrupted")
        return 130
    out = Console(highlight=False)
    if not out.is_terminal:
        out = Console(highlight=False, width=110)  # rich's 80 columns would fold the tables
    return report(args, doc, render, plot, out)
