"""The KSM lab (`kvmpy lab ksm`): how fast and how far the host merges N VMs' memory, what
that costs the host (ksmd's CPU) and the guests (copy-on-write), measured honestly.

Each run starts N VMs, one per process (kvmpy.ksm.labvm), running the ksm-fill guest: pages
identical in every VM, nearly identical ones (one word differs) and distinct ones. Once all
have filled their memory and timed a baseline pass, the lab writes the scenario's KSM settings
and starts ksmd, then polls (KSM is asynchronous; every sample is timestamped): each VM's
merged pages (/proc/PID/ksm_stat), the system's counters (/sys/kernel/mm/ksm) and ksmd's CPU
time (/proc/PID/schedstat of the ksmd thread). When merging has settled (or a time limit),
it stops ksmd (merged pages stay merged), classifies every filled page of every VM through
/proc/PID/pagemap and /proc/kpageflags (which of them are KSM pages), and lets the guests
time their passes again: reading merged pages, writing them (each write takes a
copy-on-write fault in the host), writing them once more, and writing pages that were never
merged.

The host's KSM settings are saved first and put back afterwards, whatever happens (an error,
Ctrl-C, SIGTERM); a copy of them is kept on disk until then, so a lab killed with SIGKILL has
its settings restored by the next `kvmpy lab ksm` (or `kvmpy ksm` tells you what they were).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import KvmpyError
from . import usage
from .guest import STEP_BASELINE, STEP_FILLED, STEP_MERGED, STEP_REFERENCE, FillParams
from .sysfs import PAGE_SIZE, Ksm, ksmd_cpu_seconds

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]

#: The settings the goal is measured with: 2000 pages per wake-up every 10 ms is up to
#: 200,000 pages (780 MiB) a second; see docs/memory.md for how they were chosen.
TUNED = {"pages_to_scan": 2000, "sleep_millisecs": 10}
#: The kernel's own defaults (mm/ksm.c), the comparison.
KERNEL_DEFAULTS = {"pages_to_scan": 100, "sleep_millisecs": 20}
GOAL_FRACTION = 0.85
GOAL_SECONDS = 10.0


class LabError(KvmpyError):
    """The lab could not run (a VM failed to start, KSM is missing, a write failed)."""


@dataclass(frozen=True)
class Sizes:
    """What each VM fills (pages of 4 KiB) and its RAM."""

    identical: int = 4096
    partial: int = 1024
    distinct: int = 1024
    timed: int = 1024
    memory: str = "64M"

    @property
    def pages(self) -> int:
        return self.identical + self.partial + self.distinct


@dataclass(frozen=True)
class Scenario:
    name: str
    vms: int
    settings: dict[str, int]
    runs: int
    timeout_s: float


@dataclass(frozen=True)
class Plan:
    name: str
    sizes: Sizes
    scenarios: tuple[Scenario, ...]
    poll_s: float = 0.1
    store: dict[str, Any] = field(default_factory=dict)
    balloon: dict[str, Any] = field(default_factory=dict)


MIN_VMS, MAX_VMS = 2, 16


def plan(kind: str = "default", runs: int | None = None, vms: int | None = None) -> Plan:
    """`quick` (CI, under a minute), `default` (the goal: 8 VMs, tuned, and the kernel's
    defaults), `full` (also 2-16 VMs and a pages_to_scan sweep). `vms` changes the VM count
    of the main scenarios."""
    if vms is not None and not MIN_VMS <= vms <= MAX_VMS:
        raise LabError(f"the lab runs {MIN_VMS} to {MAX_VMS} VMs (got {vms})")
    p = _plan(kind, runs)
    if vms is None:
        return p
    main = ("tuned", "kernel defaults")
    scenarios = tuple(
        Scenario(sc.name, vms, sc.settings, sc.runs, sc.timeout_s) if sc.name in main else sc
        for sc in p.scenarios
    )
    return Plan(p.name, p.sizes, scenarios, p.poll_s, p.store, p.balloon)


def _plan(kind: str, runs: int | None) -> Plan:
    if kind == "quick":
        r = runs or 1
        return Plan("quick", Sizes(512, 128, 128, 128, "32M"), (
            Scenario("tuned", 3, TUNED, r, 20.0),
        ), poll_s=0.1, store={"vms": 3, "successive": 3, "memory": "16M",
                              "work_bytes": 4 << 20, "dirty_pages": 1, "interval_s": 0.2},
            balloon={"pages": 2048, "memory": "32M", "settle_s": 0.5})  # fmt: skip
    r = runs or 3
    scenarios = [
        Scenario("tuned", 8, TUNED, r, 30.0),
        Scenario("kernel defaults", 8, KERNEL_DEFAULTS, 1 if kind == "default" else r, 90.0),
    ]
    if kind == "full":
        for n in (2, 4, 16):
            scenarios.append(Scenario(f"tuned, {n} VMs", n, TUNED, r, 60.0))
        for pages in (250, 500, 1000, 4000):
            scenarios.append(Scenario(
                f"pages_to_scan {pages}", 8, {"pages_to_scan": pages, "sleep_millisecs": 10},
                r, 90.0))  # fmt: skip
    store = {"vms": 8, "successive": 10, "memory": "64M", "work_bytes": 32 << 20,
             "dirty_pages": 4, "interval_s": 0.25}  # fmt: skip
    balloon = {"pages": 16384, "memory": "128M", "settle_s": 1.0}
    return Plan(kind, Sizes(), tuple(scenarios), store=store, balloon=balloon)


# --- saving and restoring the host's settings ------------------------------------------------------


def _saved_path() -> Path:
    from ..benchmarks import cache_dir

    return cache_dir() / "ksm-lab-saved-settings.json"


def recover_left_settings(ksm: Ksm) -> dict | None:
    """A lab killed with SIGKILL could not put the host's settings back; it left them on disk.
    Restore them if their lab is gone; returns what was restored."""
    path = _saved_path()
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    pid = doc.get("pid")
    if isinstance(pid, int) and pid != os.getpid() and _alive(pid):
        raise LabError(f"another KSM lab (pid {pid}) is running; one at a time")
    settings = doc.get("settings")
    if isinstance(settings, dict):
        ksm.restore(settings)
    path.unlink(missing_ok=True)
    return settings


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def host_settings_kept(ksm: Ksm):
    """Save the host's KSM settings (also to disk), and put them back on the way out, whatever
    the way out is: an exception, Ctrl-C, or SIGTERM/SIGHUP (turned into KeyboardInterrupt
    while the lab runs)."""
    saved = ksm.save()
    path = _saved_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "settings": saved}))
    os.replace(tmp, path)

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            old[sig] = signal.signal(sig, interrupt)
    try:
        yield saved
    finally:
        failed = ksm.restore(saved)
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if failed:
            log.warning("could not put back KSM settings: %s", "; ".join(failed))
        else:
            path.unlink(missing_ok=True)


# --- the VMs -------------------------------------------------------------------------------------


class Fleet:
    """The lab's VMs, one process each, and their event streams."""

    def __init__(self, n: int, sizes: Sizes, image: Path, workdir: Path, control: bool = False):
        self.n = n
        self.events: queue.Queue[tuple[int, dict]] = queue.Queue()
        self.procs: list[subprocess.Popen] = []
        self.info: list[dict] = [{} for _ in range(n)]
        self.steps: list[dict[int, dict]] = [{} for _ in range(n)]
        self.exits: list[dict | None] = [None] * n
        # Unix socket paths are limited to 108 bytes: in a short temporary directory, not in
        # --out, which may be anywhere.
        self._sockdir = Path(tempfile.mkdtemp(prefix="kvmpy-lab-")) if control else None
        self.sockets = [self._sockdir / f"vm{i}.sock" for i in range(n)] if control else None
        self.stderr = [workdir / f"vm{i}.err" for i in range(n)]
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if "PYTHONPATH" in env else "")
        for i in range(n):
            params = FillParams(vm_id=i, identical_pages=sizes.identical,
                                partial_pages=sizes.partial, distinct_pages=sizes.distinct,
                                timed_pages=sizes.timed)  # fmt: skip
            cfg = {"params": asdict(params), "memory": sizes.memory, "image": str(image),
                   "control": str(self.sockets[i]) if self.sockets else None,
                   "lab_dir": str(workdir)}  # fmt: skip
            with open(self.stderr[i], "wb") as err:
                p = subprocess.Popen(
                    [sys.executable, "-m", "kvmpy.ksm.labvm", json.dumps(cfg)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                    start_new_session=True, env=env,
                )  # fmt: skip
            self.procs.append(p)
            threading.Thread(target=self._read, args=(i, p), daemon=True).start()

    def _read(self, i: int, p: subprocess.Popen) -> None:
        for line in p.stdout:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            self.events.put((i, doc))
        self.events.put((i, {"event": "eof", "returncode": p.wait()}))

    def _fail(self, i: int, why: str) -> LabError:
        try:
            tail = self.stderr[i].read_text(errors="replace").strip().splitlines()[-1:]
        except OSError:
            tail = []
        return LabError(f"VM {i} of the lab {why}" + (f": {tail[0]}" if tail else ""))

    def wait_one(self, k: int, step: int, timeout: float = 60.0) -> dict:
        """Wait until VM `k` has reached `step`."""
        return self.wait("step", step, timeout, only=k)[0]

    def wait(
        self, what: str, step: int | None = None, timeout: float = 60.0, only: int | None = None
    ) -> list[dict]:
        """Wait until every VM (or VM `only`) has sent event `what` (for "step": that step)."""
        deadline = time.monotonic() + timeout
        which = range(self.n) if only is None else [only]

        def have(i: int) -> dict | None:
            if what == "ready":
                return self.info[i] or None
            if what == "step":
                return self.steps[i].get(step)
            return self.exits[i]

        while any(have(i) is None for i in which):
            left = deadline - time.monotonic()
            if left <= 0:
                late = next(i for i in which if have(i) is None)
                raise self._fail(late, f"did not reach {what} {step or ''} in {timeout:.0f} s")
            try:
                i, doc = self.events.get(timeout=left)
            except queue.Empty:
                continue
            kind = doc.get("event")
            if kind == "ready":
                self.info[i] = doc
            elif kind == "step":
                self.steps[i][doc["step"]] = doc
            elif kind == "exit":
                self.exits[i] = doc
                if what != "exit":
                    raise LabError(f"VM {i} of the lab stopped early: {doc.get('message')}")
            elif kind == "error":
                raise LabError(f"VM {i} of the lab failed: {doc.get('message')}")
            elif kind == "eof" and self.exits[i] is None:
                raise self._fail(i, f"died (exit status {doc.get('returncode')})")
        return [have(i) for i in which]

    def go(self, step: int, only: int | None = None) -> None:
        """Let every VM (or VM `only`) past `step`."""
        for i, p in enumerate(self.procs):
            if only is not None and i != only:
                continue
            with contextlib.suppress(OSError):
                p.stdin.write(json.dumps({"go": step}).encode() + b"\n")
                p.stdin.flush()

    def close(self) -> None:
        for p in self.procs:
            with contextlib.suppress(OSError):
                p.stdin.write(b'{"stop": true}\n')
                p.stdin.close()
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self._sockdir is not None:
            shutil.rmtree(self._sockdir, ignore_errors=True)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- one run -------------------------------------------------------------------------------------


def _with_advisor_off(ksm: Ksm, settings: dict) -> dict:
    """The scenario's settings, with the kernel's advisor off where there is one (it would
    set pages_to_scan itself, and the kernel refuses ours while it is on)."""
    return {"advisor_mode": "none", **settings} if ksm.has("advisor_mode") else dict(settings)


#: pages_shared when the lab started: what other processes had merged.
_baseline_shared: list[int] = []


def _retire_stale(ksm: Ksm, settings: dict) -> None:
    """ksmd forgets the merged pages of processes that have exited only when it runs: the
    previous run's VMs would otherwise still be in its trees (and its counters) when the next
    run starts, and that run's first scan would clean up after them. Let it run until
    pages_shared is back where it was when the lab started (at most 20 s)."""
    if not _baseline_shared or ksm.counters().get("pages_shared", 0) <= _baseline_shared[0]:
        return
    ksm.set(**_with_advisor_off(ksm, settings), run=1)
    deadline = time.monotonic() + 20
    while (ksm.counters().get("pages_shared", 0) > _baseline_shared[0]
           and time.monotonic() < deadline):  # fmt: skip
        time.sleep(0.05)
    ksm.set(run=0)


def _sample(fleet: Fleet, ksm: Ksm, t0: float, cpu0: float | None, smaps: bool) -> dict:
    t = time.monotonic() - t0
    merging = []
    for info in fleet.info:
        st = usage.ksm_stat(info["pid"]) or {}
        merging.append(st.get("ksm_merging_pages", 0))
    c = ksm.counters()
    cpu = ksmd_cpu_seconds()
    s = {
        "t": round(t, 4),
        "merging": merging,
        "pages_shared": c.get("pages_shared", 0),
        "pages_sharing": c.get("pages_sharing", 0),
        "full_scans": c.get("full_scans", 0),
        "pages_scanned": c.get("pages_scanned", 0),
        "ksmd_cpu_s": None if cpu is None or cpu0 is None else round(cpu - cpu0, 4),
    }
    if smaps:
        s["rss"], s["pss"] = [], []
        for info in fleet.info:
            m = usage.mappings([(h, h + n) for h, n in info["ranges"]], info["pid"])
            s["rss"].append(m.get("rss_bytes", 0))
            s["pss"].append(m.get("pss_bytes", 0))
    return s


def first_time(samples: list[dict], key: Callable[[dict], bool]) -> float | None:
    for s in samples:
        if key(s):
            return s["t"]
    return None


def _us_per_page(cycles: int, pages: int, khz: int) -> float:
    return cycles / max(pages, 1) / khz * 1000.0


def measure_run(
    scenario: Scenario, sizes: Sizes, ksm: Ksm, image: Path, workdir: Path, poll_s: float,
    on_fleet: Callable[[Fleet], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One run of `scenario`: start the VMs, merge, measure; the VMs are gone afterwards."""
    _retire_stale(ksm, scenario.settings)
    ksm.set(run=0)
    load_before = os.getloadavg()[0]
    with Fleet(scenario.vms, sizes, image, workdir, control=on_fleet is not None) as fleet:
        fleet.wait("ready", timeout=120)
        filled = fleet.wait("step", STEP_FILLED, timeout=120)
        fleet.go(STEP_FILLED)
        base = fleet.wait("step", STEP_BASELINE, timeout=60)
        khz = [info["tsc_khz"] for info in fleet.info]

        cpu0 = ksmd_cpu_seconds()
        before = ksm.counters()
        t0 = time.monotonic()
        ksm.set(**_with_advisor_off(ksm, scenario.settings), run=1)
        target = sizes.identical * scenario.vms
        samples = [_sample(fleet, ksm, t0, cpu0, smaps=True)]
        last_total, last_change = 0, 0.0
        i = 0
        while True:
            time.sleep(poll_s)
            i += 1
            s = _sample(fleet, ksm, t0, cpu0, smaps=i % 10 == 0)
            samples.append(s)
            total = sum(s["merging"])
            if total != last_total:
                last_total, last_change = total, s["t"]
            settled = s["t"] - last_change
            if (total >= target and settled >= 1.0) or (
                total >= GOAL_FRACTION * target and settled >= 3.0
            ):
                break
            if s["t"] >= scenario.timeout_s:
                break
        ksm.set(run=0)  # merged pages stay merged; ksmd stops competing for the CPU
        end = _sample(fleet, ksm, t0, cpu0, smaps=True)
        samples.append(end)
        classes = [_classify(info, sizes) for info in fleet.info]
        if on_fleet is not None:
            on_fleet(fleet)
        # One VM at a time, so each pass times its own page faults, not N VMs queueing for
        # the host's CPUs.
        for k in range(scenario.vms):
            fleet.go(STEP_BASELINE, only=k)
            while STEP_REFERENCE not in fleet.steps[k]:
                fleet.wait_one(k, STEP_MERGED)
                fleet.go(STEP_MERGED, only=k)
                fleet.wait_one(k, STEP_REFERENCE)
        merged_steps = [fleet.steps[k][STEP_MERGED] for k in range(scenario.vms)]
        ref = [fleet.steps[k][STEP_REFERENCE] for k in range(scenario.vms)]
        fleet.go(STEP_REFERENCE)
        exits = fleet.wait("exit", timeout=60)
    bad = [e for e in exits if e.get("stop_reason") != "exit" or e.get("exit_code") != 0]
    if bad:
        raise LabError(f"a lab VM failed: {bad[0].get('message')} {bad[0].get('output', '')}")

    # Pages merged outside the filled area (the image, kvmpy's tables: the same in every VM)
    # count as mergeable too: from the classification at the end.
    extra = [c["other"] if c else 0 for c in classes]
    mergeable = [sizes.identical + e for e in extra]
    total_mergeable = sum(mergeable)
    for s in samples:
        s["fraction"] = round(sum(s["merging"]) / total_mergeable, 5)
    t85 = first_time(samples, lambda s: sum(s["merging"]) >= GOAL_FRACTION * total_mergeable)
    per_vm_t85 = [
        first_time(samples, lambda s, k=k: s["merging"][k] >= GOAL_FRACTION * mergeable[k])
        for k in range(scenario.vms)
    ]
    slowest = None if None in per_vm_t85 else max(per_vm_t85)
    at85 = next((s for s in samples if s["t"] == t85), None) if t85 is not None else None
    speed = []
    for k in range(scenario.vms):
        r0, w0, n = base[k]["values"]
        r1, w1, w2 = merged_steps[k]["values"]
        w3 = ref[k]["values"][0]
        speed.append({
            "read_before": _us_per_page(r0, n, khz[k]),
            "write_before": _us_per_page(w0, n, khz[k]),
            "read_merged": _us_per_page(r1, n, khz[k]),
            "write_merged": _us_per_page(w1, n, khz[k]),
            "write_again": _us_per_page(w2, n, khz[k]),
            "write_unmerged": _us_per_page(w3, n, khz[k]),
        })  # fmt: skip
    fill = [_us_per_page(f["values"][0], f["values"][1], khz[k]) for k, f in enumerate(filled)]
    rss, pss = sum(end["rss"]), sum(end["pss"])
    return {
        "scenario": scenario.name,
        "vms": scenario.vms,
        "settings": scenario.settings,
        "identical_pages": sizes.identical,
        "mergeable_pages": mergeable,
        "samples": samples,
        "t85_s": t85,
        "t85_slowest_vm_s": slowest,
        "duration_s": end["t"],
        "final_fraction": end["fraction"],
        "ksmd_cpu_s_to_85": at85["ksmd_cpu_s"] if at85 else None,
        "ksmd_cpu_s": end["ksmd_cpu_s"],
        "ksmd_cpu_percent": (
            round(100 * end["ksmd_cpu_s"] / end["t"], 1) if end["ksmd_cpu_s"] is not None else None
        ),
        "full_scans": end["full_scans"] - before.get("full_scans", 0),
        # ksmd's pace: pages it looked at per second of the merge phase.
        "scan_rate_pages_s": round(
            (end["pages_scanned"] - before.get("pages_scanned", 0)) / max(end["t"], 1e-9)
        ),
        "classes": classes,
        "rss_bytes": rss,
        "pss_bytes": pss,
        "saved_bytes": rss - pss,
        # Every duplicate page stored once instead of once per VM.
        "ideal_saved_bytes": round(total_mergeable * (scenario.vms - 1) / scenario.vms) * PAGE_SIZE,
        "speed_us_per_page": speed,
        "fill_us_per_page": fill,
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
    }


def _classify(info: dict, sizes: Sizes) -> dict | None:
    """How many of each kind of page of one VM are KSM pages now (None without root)."""
    flags = usage.ksm_pages(info["pid"], info["area_hva"], sizes.pages)
    if flags is None:
        return None
    a, b = sizes.identical, sizes.identical + sizes.partial
    total = usage.ksm_stat(info["pid"]) or {}
    merged_area = int(flags.sum())
    return {
        "identical": int(flags[:a].sum()),
        "partial": int(flags[a:b].sum()),
        "distinct": int(flags[b:].sum()),
        "other": max(0, total.get("ksm_merging_pages", 0) - merged_area),
    }


# --- the whole lab -------------------------------------------------------------------------------


def summarize(runs: list[dict]) -> dict[str, Any]:
    """Medians and ranges over the runs of one scenario."""

    def stat(values):
        vals = [v for v in values if v is not None]
        if not vals:
            return None
        return {"median": round(statistics.median(vals), 4), "min": round(min(vals), 4),
                "max": round(max(vals), 4), "n": len(vals)}  # fmt: skip

    out: dict[str, Any] = {
        "runs": len(runs),
        "reached_85_in_every_run": all(r["t85_s"] is not None for r in runs),
    }
    for key in ("t85_s", "t85_slowest_vm_s", "ksmd_cpu_s_to_85", "ksmd_cpu_s",
                "ksmd_cpu_percent", "saved_bytes", "final_fraction", "duration_s",
                "full_scans", "scan_rate_pages_s"):  # fmt: skip
        out[key] = stat([r[key] for r in runs])
    for key in ("read_before", "write_before", "read_merged", "write_merged", "write_again",
                "write_unmerged"):  # fmt: skip
        out[key + "_us"] = stat([s[key] for r in runs for s in r["speed_us_per_page"]])
    out["fill_us_per_page"] = stat([f for r in runs for f in r["fill_us_per_page"]])
    cls = [c for r in runs for c in r["classes"] if c]
    if cls:
        out["classes_merged_fraction"] = {
            k: round(sum(c[k] for c in cls) / (len(cls) * max(n, 1)), 4)
            for k, n in (("identical", runs[0]["identical_pages"]),
                         ("partial", runs[0].get("partial_pages", 0) or 1),
                         ("distinct", runs[0].get("distinct_pages", 0) or 1))
        }  # fmt: skip
    return out


def host_info(saved: dict) -> dict[str, Any]:
    from ..doctor import study_host

    mem = ""
    with contextlib.suppress(OSError, IndexError, ValueError):
        kib = int(Path("/proc/meminfo").read_text().splitlines()[0].split()[1])
        mem = f"{kib / (1 << 20):.1f} GiB"
    return {
        **study_host(),
        "cpus": os.cpu_count(),
        "memory": mem,
        "ksm_settings_before": saved,
    }


def run_lab(
    out: Path, kind: str = "default", runs: int | None = None,
    progress: Progress | None = None, ksm: Ksm | None = None, vms: int | None = None,
) -> tuple[dict, list[Path]]:  # fmt: skip
    """Run the lab and write report.md, the plots and results.json into `out`."""
    from .guest import image_path

    p = plan(kind, runs, vms)
    ksm = ksm or Ksm()
    if os.geteuid() != 0:
        raise LabError("the KSM lab changes the host's KSM settings and reads /proc/kpageflags: "
                       "run it as root")  # fmt: skip
    recovered = recover_left_settings(ksm)
    image = image_path()
    work = out / ".work"
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    doc: dict[str, Any] = {"plan": p.name, "sizes": asdict(p.sizes), "poll_s": p.poll_s,
                           "goal": {"fraction": GOAL_FRACTION, "seconds": GOAL_SECONDS}}  # fmt: skip
    if recovered:
        doc["recovered_settings"] = recovered
    total = sum(s.runs for s in p.scenarios) + 2
    done = 0
    with host_settings_kept(ksm) as saved:
        doc["host"] = host_info(saved)
        _baseline_shared[:] = [ksm.counters().get("pages_shared", 0)]
        results = []
        for sc in p.scenarios:
            rs = []
            for r in range(sc.runs):
                if progress:
                    progress(done, total, f"{sc.name}: run {r + 1} of {sc.runs}")
                run = measure_run(sc, p.sizes, ksm, image, work, p.poll_s)
                run["partial_pages"], run["distinct_pages"] = p.sizes.partial, p.sizes.distinct
                rs.append(run)
                done += 1
            results.append({"scenario": asdict(sc), "summary": summarize(rs), "runs": rs})
        doc["scenarios"] = results
        if progress:
            progress(done, total, "snapshot store")
        doc["store"] = store_study(p, image, work)
        done += 1
        if progress:
            progress(done, total, "giving memory back: balloon, free page reporting")
        doc["balloon"] = balloon_study(p.balloon, work)
        done += 1
    doc["host"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    doc["host"]["ksm_settings_after"] = ksm.save()
    doc["elapsed_s"] = round(time.monotonic() - t_start, 1)
    if progress:
        progress(total, total, "report")
    from . import report

    files = report.write(out, doc)
    shutil.rmtree(work, ignore_errors=True)
    return doc, files


def _du(store: Path) -> dict[str, Any]:
    from ..persist.store import PageStore

    ps = PageStore.open(store)
    with ps.lock():
        return ps.usage()


def _step(store: Path, into: dict, plain: dict, steps: list[dict]) -> dict[str, Any]:
    u = _du(store)
    prev = steps[-1] if steps else {"logical_bytes": 0, "plain_bytes": 0}
    return {
        "logical_bytes": prev["logical_bytes"] + into["pages_written"] * PAGE_SIZE,
        "plain_bytes": prev["plain_bytes"] + plain["disk_bytes"],
        "store_bytes": u["disk_bytes"],
        "unique_pages": u["needed_pages"],
        "pages": into["pages_written"],
        "pages_new": into["store"]["pages_new"],
        "snapshot_ms": into["snapshot_ms"],
        "plain_snapshot_ms": plain["snapshot_ms"],
    }


def store_study(p: Plan, image: Path, work: Path) -> dict[str, Any]:
    """Deduplicated snapshots: N identical guests into one page store, and K successive
    snapshots of one guest that keeps writing; each also as a plain snapshot, to compare."""
    from ..persist.control import request

    cfg = p.store
    series = []
    store = work / "store-vms"
    with Fleet(cfg["vms"], p.sizes, image, work, control=True) as fleet:
        fleet.wait("ready", timeout=120)
        fleet.wait("step", STEP_FILLED, timeout=120)
        steps: list[dict] = []
        for i, sock in enumerate(fleet.sockets or []):
            into = request(sock, "snapshot", {"path": str(work / f"vm{i}-store"),
                                              "store": str(store)}, timeout=120)  # fmt: skip
            plain = request(sock, "snapshot", {"path": str(work / f"vm{i}-plain")}, timeout=120)
            steps.append(_step(store, into, plain, steps))
    series.append({
        "name": f"{cfg['vms']} identical guests",
        "what": f"one snapshot of each of {cfg['vms']} ksm-fill VMs, just filled (each "
                f"{p.sizes.pages} pages: {p.sizes.identical} identical in all, the rest their own)",
        "steps": steps,
        "snapshot_ms_median": statistics.median(s["snapshot_ms"] for s in steps),
        "plain_snapshot_ms_median": statistics.median(s["plain_snapshot_ms"] for s in steps),
    })  # fmt: skip
    series.append(_successive(cfg, work))
    return {"series": series}


def _successive(cfg: dict, work: Path) -> dict[str, Any]:
    """K snapshots, `interval_s` apart, of one hashchain guest writing `dirty_pages` pages
    per millisecond over a `work_bytes` area."""
    from ..machine import Machine, MachineConfig
    from ..persist import control
    from ..persist.guest import FOREVER, HashchainParams, set_params
    from ..persist.guest import image_path as hashchain_image
    from ..persist.session import VmSession, helper_thread
    from ..result import StopReason

    store = work / "store-successive"
    steps: list[dict] = []
    errors: list[BaseException] = []
    with Machine(MachineConfig(mode="long-user", memory=cfg["memory"], name="successive")) as m:
        m.load_file(hashchain_image())
        khz = m.vcpus[0].fd.get_tsc_khz()
        set_params(m, HashchainParams(
            work_bytes=cfg["work_bytes"], lines=1, rounds_per_line=1000, memsum_every=0,
            dirty_pages=cfg["dirty_pages"], tick_cycles=khz, ticks=FOREVER))  # fmt: skip
        session = VmSession(m)

        def drive() -> None:
            try:
                deadline = time.monotonic() + 120
                while b"hashchain: ready" not in m.output:
                    if session.state == "stopped" or time.monotonic() > deadline:
                        raise LabError("the successive-snapshot guest never got ready")
                    time.sleep(0.005)
                for k in range(cfg["successive"]):
                    time.sleep(cfg["interval_s"])
                    into = control.snapshot(session, str(work / f"succ{k}-store"), str(store))
                    plain = control.snapshot(session, str(work / f"succ{k}-plain"))
                    steps.append(_step(store, into, plain, steps))
            except BaseException as e:
                errors.append(e)
            finally:
                m.request_stop(StopReason.INTERRUPTED, "done")

        helper_thread(drive, name="ksm-lab-successive")
        session.run(timeout=300)
    if errors:
        raise errors[0]
    return {
        "name": f"{cfg['successive']} successive snapshots",
        "what": f"one hashchain VM writing {cfg['dirty_pages']} pages per ms over "
                f"{cfg['work_bytes'] >> 20} MiB, a snapshot every {cfg['interval_s']} s",
        "steps": steps,
        "snapshot_ms_median": statistics.median(s["snapshot_ms"] for s in steps),
        "plain_snapshot_ms_median": statistics.median(s["plain_snapshot_ms"] for s in steps),
    }  # fmt: skip


# --- giving memory back: the balloon and free page reporting -------------------------------------


def balloon_study(cfg: dict, work: Path) -> dict[str, Any]:
    """Two VMs running the virtio-balloon example: each uses `pages` pages and frees them; one
    reports them to the host (free page reporting), the other gives them back when the host
    inflates its balloon (`kvmpy ctl SOCK balloon SIZE`), and later deflates it. The guest
    RAM's resident size is sampled all along (`kvmpy ctl SOCK stats`, 50 ms apart)."""
    from ..machine import Machine, MachineConfig

    with Machine(MachineConfig(memory="2M", accel="kvm")) as m:
        khz = m.vcpus[0].fd.get_tsc_khz()
    out = {"pages": cfg["pages"], "memory": cfg["memory"], "variants": []}
    for variant in ("free page reporting", "balloon"):
        out["variants"].append(_balloon_vm(cfg, work, variant, khz))
    return out


def _balloon_vm(cfg: dict, work: Path, variant: str, khz: int) -> dict[str, Any]:
    from ..memory import parse_size
    from ..persist.control import request
    from .guest import BalloonParams, balloon_image

    reporting = variant == "free page reporting"
    settle = cfg["settle_s"]
    tag = "report" if reporting else "balloon"
    params = BalloonParams(work_pages=cfg["pages"], report=int(reporting),
                           report_delay=int(khz * 1000 * settle), hold=1,
                           ram_bytes=parse_size(cfg["memory"]))  # fmt: skip
    image = balloon_image(work / f"{tag}.elf", params)
    sockdir = Path(tempfile.mkdtemp(prefix="kvmpy-lab-"))
    sock = sockdir / f"{tag}.sock"
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if "PYTHONPATH" in env else "")
    with open(work / f"{tag}.err", "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvmpy", "run", str(image), "--balloon", "--irqchip",
             "--mem", cfg["memory"], "--control", str(sock)],
            stdout=subprocess.PIPE, stderr=err, start_new_session=True, env=env,
        )  # fmt: skip
    events: list[tuple[float, str]] = []
    t0 = time.monotonic()

    def read() -> None:
        for line in proc.stdout:
            events.append((round(time.monotonic() - t0, 3), line.decode(errors="replace").strip()))

    threading.Thread(target=read, daemon=True).start()
    samples: list[tuple[float, int]] = []

    def sample() -> None:
        try:
            st = request(sock, "stats", timeout=10)
        except KvmpyError:
            return
        samples.append((round(time.monotonic() - t0, 3), st["ram"]["rss_bytes"]))

    def until(pred, limit: float) -> None:
        deadline = time.monotonic() + limit
        while not pred():
            if proc.poll() is not None:
                raise LabError(
                    f"the balloon VM stopped: {(work / f'{tag}.err').read_text()[-300:]}"
                )
            if time.monotonic() > deadline:
                raise LabError(f"the balloon VM ({variant}) did not get there in {limit:.0f} s")
            if sock.exists():
                sample()
            time.sleep(0.05)

    def saw(word: str):
        return lambda: any(word in text for _, text in events)

    actions = []
    try:
        until(saw("freed"), 120)
        if reporting:
            until(saw("reported"), 60)
        else:
            hold = time.monotonic() + settle
            until(lambda: time.monotonic() > hold, 60)
            size = cfg["pages"] * PAGE_SIZE
            actions.append((round(time.monotonic() - t0, 3), f"balloon {size >> 20}M"))
            request(sock, "balloon", {"size": size}, timeout=10)
            until(lambda: request(sock, "balloon", timeout=10)["actual_bytes"] >= size, 60)
            hold = time.monotonic() + settle
            until(lambda: time.monotonic() > hold, 60)
            actions.append((round(time.monotonic() - t0, 3), "balloon 0"))
            request(sock, "balloon", {"size": 0}, timeout=10)
            until(lambda: request(sock, "balloon", timeout=10)["actual_bytes"] == 0, 60)
        hold = time.monotonic() + settle
        until(lambda: time.monotonic() > hold, 60)
        final = request(sock, "balloon", timeout=10)
    finally:
        with contextlib.suppress(KvmpyError):
            request(sock, "stop", timeout=10)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(sockdir, ignore_errors=True)
    # The moment memory went back: the report, or the host's request.
    t_back = (next(t for t, text in events if "reported" in text) if reporting
              else actions[0][0])  # fmt: skip
    # What the freed memory held on the host: the largest sample between the guest's "freed"
    # and the give-back (not the last one before it: under load the "reported" line is read
    # late, after the device may have discarded the pages already).
    t_freed = next((t for t, text in events if "freed" in text), 0.0)
    before = [r for t, r in samples if t_freed <= t <= t_back] or [
        r for t, r in samples if t <= t_back
    ]
    freed = max(before) if before else None
    back = next((t for t, r in samples if t > t_back and freed and r < freed / 10), None)
    return {
        "give_back_s": round(back - t_back, 3) if back is not None else None,
        "variant": variant,
        "samples": samples,
        "events": events,
        "actions": actions,
        "rss_peak_bytes": max(r for _, r in samples),
        "rss_freed_bytes": freed,
        "rss_end_bytes": samples[-1][1],
        "reported_bytes": final["reported_bytes"],
        "discarded_bytes": final["discarded_bytes"],
        "guest_stats": final["guest_stats"],
    }
