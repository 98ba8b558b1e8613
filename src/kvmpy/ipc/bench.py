"""`kvmpy ipc`: one configuration, measured, next to its same-run references.

`run_ipc(options)` starts the two VMMs (kvmpy.ipc.server), lets the guests do one warm-up
run and `runs` measured runs, and turns what the guests and the VMMs recorded into the
figures: the transfer time of each run (guest rdtsc in one timebase, from the sender's start
to the receiver's last checked byte), the userspace exits of both VMMs during it, whether
every byte arrived as sent, and the raw per-layer numbers the report's breakdown is made of.
The references (host memcpy of the same size, an eventfd ping-pong between two host threads,
the exit round trip of `kvmpy bench exits`) are measured in the same invocation.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from dataclasses import dataclass, field, replace

from ..benchmarks import BenchmarkError, build_c
from ..errors import ConfigError
from ..memory import format_size
from .layout import (
    MAX_RUNS,
    MAX_SAMPLES,
    MAX_VECTORS,
    Mechanism,
    PioWidth,
    SharedLayout,
    WaitMode,
    pattern_checksum,
)
from .peer import PeerSpec
from .server import Session

MAX_SIZE = 1 << 40
MAX_MESSAGE = 4096
#: Two rings of 512 KiB: they stay in the CPUs' L2 caches. Measured on a 2 MiB-L2 host:
#: rings of 512 KiB-1 MiB ran ~4 % faster than 256 KiB, 2 MiB and more ~25 % slower.
DEFAULT_SHM = 2 << 20
DEFAULT_ROUNDS = 200
#: Guest RAM of each VM: the example guests need a few pages; the rest is headroom.
GUEST_RAM = 32 << 20


@dataclass(frozen=True)
class IpcOptions:
    mechanism: Mechanism
    size: int = 4096
    runs: int = 5
    #: Round trips per run; 0 = a bulk transfer of `size` bytes, else ping-pong of `size`.
    pingpong: int = 0
    same_process: bool = False
    pio_width: PioWidth = PioWidth.STRING
    pio_coalesce: bool = True
    wait_mode: WaitMode = WaitMode.BLOCK
    shm_size: int = DEFAULT_SHM
    vectors: int = 2
    seed: int = 1
    #: (sender CPU, receiver CPU), or None to leave the VMMs unpinned.
    cpus: tuple[int, int] | None = None
    timeout: float | None = None
    io_timeout: float = 20.0
    stall_timeout: float = 20.0
    start_timeout: float = 60.0
    #: Guest images by role, instead of the bundled examples (tests use hostile guests).
    images: dict[str, str] | None = None
    #: The receiver's vCPUs, and which of them its doorbells interrupt (shm-irq).
    irq_cpu: int = 0
    receiver_vcpus: int = 1
    #: CPU backend of both VMs (MachineConfig.accel).
    accel: str = "auto"

    def validated(self) -> IpcOptions:
        if self.pingpong:
            if not 1 <= self.size <= MAX_MESSAGE:
                raise ConfigError(f"--msg must be between 1 and {MAX_MESSAGE} bytes")
            if self.runs * self.pingpong > MAX_SAMPLES:
                raise ConfigError(
                    f"runs x round trips must be at most {MAX_SAMPLES} (the guest keeps every "
                    "round trip)"
                )
        elif not 1 <= self.size <= MAX_SIZE:
            raise ConfigError(f"--size must be between 1 byte and {format_size(MAX_SIZE)}")
        if not 1 <= self.runs < MAX_RUNS:
            raise ConfigError(f"--runs must be between 1 and {MAX_RUNS - 1}")
        if self.pingpong < 0:
            raise ConfigError("the number of round trips must not be negative")
        if self.mechanism.shared_memory:
            SharedLayout.for_size(self.shm_size)  # raises on a bad size
        if not 2 <= self.vectors <= MAX_VECTORS:
            raise ConfigError(f"--vectors must be between 2 and {MAX_VECTORS}")
        if self.cpus is not None:
            allowed = os.sched_getaffinity(0)
            for cpu in self.cpus:
                if cpu not in allowed:
                    raise ConfigError(f"CPU {cpu} is not one this process may use")
        if not 0 <= self.irq_cpu < self.receiver_vcpus:
            raise ConfigError(
                f"--irq-cpu {self.irq_cpu} is not a vCPU of the receiver (it has "
                f"{self.receiver_vcpus}: give --vcpus)"
            )
        if self.irq_cpu and self.mechanism is not Mechanism.SHM_IRQ:
            raise ConfigError("--irq-cpu is for --mechanism shm-irq (the others have no doorbell)")
        for t in (self.timeout, self.io_timeout, self.stall_timeout, self.start_timeout):
            if t is not None and t <= 0:
                raise ConfigError("timeouts must be positive")
        return self

    def estimated_seconds(self) -> float:
        """A generous bound on the run time, from the slowest rate seen per mechanism."""
        rate = {Mechanism.PIO: 0.5e6, Mechanism.SHM_POLL: 100e6, Mechanism.SHM_IRQ: 50e6}
        if self.pingpong:
            per_run = self.pingpong * 0.01
        else:
            per_run = self.size / rate[self.mechanism]
            if self.mechanism is Mechanism.PIO and self.pio_width is not PioWidth.STRING:
                per_run *= 10 if self.pio_coalesce else 40
        return 60.0 + per_run * (self.runs + 1)


def default_cpus() -> tuple[int, int] | None:
    """The sender on the next-to-last CPU, the receiver on the last (CPU 0 takes most of the
    host's housekeeping); None on a single CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return cpus[-2], cpus[-1]


def guest_image(mechanism: Mechanism) -> str:
    from ..sdk.examples import find_example

    name = "ipc-pio" if mechanism is Mechanism.PIO else "ipc-shm"
    example = find_example(name)
    if example is None:
        raise BenchmarkError(f"the bundled example {name} is missing from this installation")
    return str(example.build())


def specs_for(opts: IpcOptions) -> dict[str, PeerSpec]:
    images = opts.images or {}
    default = None
    timeout = opts.timeout or opts.estimated_seconds()
    specs = {}
    for role, peer_id in (("sender", 0), ("receiver", 1)):
        image = images.get(role)
        if image is None:
            default = default or guest_image(opts.mechanism)
            image = default
        specs[role] = PeerSpec(
            peer_id=peer_id, peer=1 - peer_id, role=role, mechanism=opts.mechanism.label,
            image=image, size=opts.size, runs=opts.runs, pingpong=opts.pingpong,
            pio_width=opts.pio_width.label, pio_coalesce=opts.pio_coalesce,
            wait_mode=opts.wait_mode.name.lower(),
            shm_size=opts.shm_size if opts.mechanism.shared_memory else 0,
            vectors=opts.vectors, seed=opts.seed, memory=GUEST_RAM,
            cpu=opts.cpus[peer_id] if opts.cpus else None, timeout=timeout,
            io_timeout=opts.io_timeout, stall_timeout=opts.stall_timeout,
            vcpus=opts.receiver_vcpus if role == "receiver" else 1,
            irq_cpu=opts.irq_cpu if role == "receiver" else 0, accel=opts.accel,
        )  # fmt: skip
    return specs


# --- the run ----------------------------------------------------------------------------------


@dataclass
class RunFigures:
    """One measured run, both sides."""

    index: int
    seconds: float
    exits: int
    exits_sender: int
    exits_receiver: int
    checksum_ok: bool
    sender: dict = field(repr=False, default_factory=dict)
    receiver: dict = field(repr=False, default_factory=dict)


def run_ipc(opts: IpcOptions) -> dict:
    """Run one configuration and return its JSON-ready result (see docs/ipc.md)."""
    opts = opts.validated()
    session = Session(
        specs_for(opts),
        same_process=opts.same_process,
        start_timeout=opts.start_timeout,
        timeout=opts.timeout or opts.estimated_seconds(),
    )
    raw = session.run()
    return summarize(opts, raw["sender"], raw["receiver"])


def run_guest(opts: IpcOptions, image: str) -> dict:
    """Run a user's guest (built with kvmpy/ipc.h) as both sender and receiver, connected by
    `opts.mechanism`; no measurement. Returns each side's stop, exit code and output."""
    opts = replace(opts, images={"sender": image, "receiver": image}).validated()
    raw = Session(
        specs_for(opts),
        same_process=opts.same_process,
        start_timeout=opts.start_timeout,
        timeout=opts.timeout or 120.0,
        any_exit_code=True,
    ).run()
    return {
        role: {
            "peer_id": r["peer_id"],
            "stop_reason": r["stop_reason"],
            "exit_code": r["exit_code"],
            "output": r["output"],
            "userspace_exits": r["stats"]["total"],
        }
        for role, r in raw.items()
    }


def _ticks_to_s(ticks: float, khz: int) -> float:
    return ticks / (khz * 1e3)


def summarize(opts: IpcOptions, s: dict, r: dict) -> dict:
    khz = s["tsc_khz"] or r["tsc_khz"]
    shared_tsc = bool(s["tsc_shared"] and r["tsc_shared"] and s["tsc_khz"] == r["tsc_khz"])
    n = min(len(s["runs"]), len(r["runs"]))
    if n < opts.runs + 1:
        raise BenchmarkError(
            f"the guests finished {n} of {opts.runs + 1} runs (warm-up included) without an error"
        )
    figures = []
    for k in range(n):
        a, b = s["runs"][k], r["runs"][k]
        if shared_tsc:
            seconds = _ticks_to_s(b["t_end"] - a["t_start"], khz)
        else:
            # No common TSC: the VMMs' host clocks around the run (two exits too long).
            seconds = max(a["vmm"].get("host_ns", 0), b["vmm"].get("host_ns", 0)) / 1e9
        ok = _checksum_ok(opts, k, a, b)
        es, er = a["vmm"].get("exits", -1), b["vmm"].get("exits", -1)
        figures.append(RunFigures(k, seconds, es + er, es, er, ok, a, b))
    warm, measured = figures[0], figures[1:]
    result: dict = {
        "mechanism": opts.mechanism.label,
        "size": opts.size,
        "runs": len(measured),
        "same_process": opts.same_process,
        "timebase": "tsc" if shared_tsc else "host-clock",
        "tsc_khz": khz,
    }
    if opts.pingpong:
        rtts = [_ticks_to_s(t, khz) for t in s["samples"]]
        if not rtts:
            raise BenchmarkError("the sender recorded no round trips")
        per_run = [
            statistics.median(rtts[i * opts.pingpong : (i + 1) * opts.pingpong])
            for i in range(len(measured))
            if rtts[i * opts.pingpong : (i + 1) * opts.pingpong]
        ]
        q = statistics.quantiles(rtts, n=100) if len(rtts) >= 2 else [rtts[0]] * 99
        med = statistics.median(rtts)
        result.update(
            pingpong=opts.pingpong,
            msg=opts.size,
            seconds=med,
            # Both directions' bytes per round trip.
            throughput_bytes_per_s=2 * opts.size / med if med > 0 else 0.0,
            rtt_us={
                "median": statistics.median(rtts) * 1e6,
                "p10": q[9] * 1e6,
                "p90": q[89] * 1e6,
                "p99": q[98] * 1e6,
                "min": min(rtts) * 1e6,
                "per_run_median": [x * 1e6 for x in per_run],
            },
        )
    else:
        secs = [f.seconds for f in measured]
        med = statistics.median(secs)
        result.update(
            seconds=med,
            throughput_bytes_per_s=opts.size / med if med > 0 else 0.0,
            runs_seconds=secs,
        )
    result.update(
        userspace_exits=int(statistics.median(f.exits for f in measured)),
        userspace_exits_by_side={
            "sender": int(statistics.median(f.exits_sender for f in measured)),
            "receiver": int(statistics.median(f.exits_receiver for f in measured)),
        },
        checksum_ok=all(f.checksum_ok for f in figures),
        # Which of the receiver's vCPUs took its last doorbell (its per-CPU %gs:0); None when
        # it took none (a receiver that always found data never waited for a doorbell).
        receiver_irq_cpu={
            "requested": opts.irq_cpu,
            "last_handled_on": r.get("irq_last_cpu") if r.get("irq_total") else None,
            "interrupts": r.get("irq_total", 0),
            "vcpus": opts.receiver_vcpus,
        },  # fmt: skip
        warmup_seconds=warm.seconds,
        first_touch_seconds={
            "sender": _ticks_to_s(s["first_touch_tsc"], khz),
            "receiver": _ticks_to_s(r["first_touch_tsc"], khz),
        },
        options={
            "pio_width": opts.pio_width.label,
            "pio_coalesce": opts.pio_coalesce,
            # What KVM granted: coalescing needs KVM_CAP_COALESCED_PIO.
            "pio_coalesced": bool(s.get("pio_coalesced")),
            "wait_mode": opts.wait_mode.name.lower(),
            "shm_size": opts.shm_size if opts.mechanism.shared_memory else 0,
            "ring_size": SharedLayout.for_size(opts.shm_size).ring_size
            if opts.mechanism.shared_memory
            else 0,
            "vectors": opts.vectors,
            "cpus": list(opts.cpus) if opts.cpus else None,
        },
        layers=layers(opts, measured, khz),
        doorbells_unmatched=s["doorbells_unmatched"] + r["doorbells_unmatched"],
    )
    return result


def _checksum_ok(opts: IpcOptions, k: int, a: dict, b: dict) -> bool:
    seed = opts.seed + k
    if opts.pingpong:
        want = opts.size * opts.pingpong
        return a["mismatches"] == 0 and a["bytes"] == want and b["bytes"] == want
    moved = b["vmm"].get("received", b["vmm"].get("bytes_in"))
    return (
        b["mismatches"] == 0
        and b["bytes"] == opts.size
        and (b["csum_a"], b["csum_b"]) == pattern_checksum(opts.size, seed)
        # The VMM's own count of what went through the ring or the relay.
        and (moved is None or moved == opts.size)
    )


def layers(opts: IpcOptions, runs: list[RunFigures], khz: int) -> dict:
    """Medians over the measured runs of what each layer recorded, per side, in seconds (and
    counts). Guest figures come from rdtsc, VMM figures from the host clock around each exit
    and each relay call; `exit round trips` are counted here and costed by the report with
    the same-run exit benchmark."""

    def med(values) -> float:
        values = list(values)
        return float(statistics.median(values)) if values else 0.0

    out: dict = {}
    for side in ("sender", "receiver"):
        recs = [getattr(f, side) for f in runs]
        tsc = lambda key, recs=recs: med(_ticks_to_s(x[key], khz) for x in recs)  # noqa: E731
        vmm = lambda key, recs=recs: med(x["vmm"].get(key, 0) / 1e9 for x in recs)  # noqa: E731
        cnt = lambda key, recs=recs: med(x["vmm"].get(key, 0) for x in recs)  # noqa: E731
        d = {
            "run": med(_ticks_to_s(x["t_end"] - x["t_start"], khz) for x in recs),
            "work": tsc("work_tsc"),
            "io": tsc("io_tsc"),
            "wait": tsc("wait_tsc"),
            "doorbell": tsc("doorbell_tsc"),
            "doorbells": med(x["doorbells"] for x in recs),
            "waits": med(x["waits"] for x in recs),
            "blocks": med(x["blocks"] for x in recs),
            "irq_latency": med(
                _ticks_to_s(x["irq_lat_tsc"], khz) / x["irq_lat_n"] for x in recs if x["irq_lat_n"]
            ),
            "irq_wake": med(
                _ticks_to_s(x["wake_tsc"], khz) / x["irq_lat_n"] for x in recs if x["irq_lat_n"]
            ),
            "irq_samples": med(x["irq_lat_n"] for x in recs),
            "exits": cnt("exits"),
            "vmm": vmm("vmm_io_ns"),
            "relay_send": vmm("relay_send_ns"),
            "relay_recv": vmm("relay_recv_ns"),
            "relay_wait": vmm("relay_wait_ns"),
            "ring_drains": cnt("ring_drains"),
            "ring_entries": cnt("ring_entries"),
        }
        out[side] = d
    return out


# --- same-run references ----------------------------------------------------------------------


def _ipcref(*args: str, timeout: float = 300) -> list[float]:
    binary = build_c("ipcref.c")
    try:
        proc = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"the reference ipcref {args[0]} took over {timeout:g} s") from None
    if proc.returncode != 0:
        raise BenchmarkError(f"the reference ipcref {args[0]} failed: {proc.stderr.strip()}")
    try:
        return [float(x) for x in json.loads(proc.stdout)["ns"]]
    except (ValueError, KeyError, TypeError):
        raise BenchmarkError(f"ipcref printed no result: {proc.stdout.strip()!r}") from None


def memcpy_reference(size: int, runs: int = 5, cpu: int | None = None) -> dict:
    """Host memcpy (glibc, gcc -O2) of `size` bytes; buffers touched first."""
    ns = _ipcref("memcpy", str(size), str(runs), str(-1 if cpu is None else cpu))
    med = statistics.median(ns)
    return {"size": size, "seconds": med / 1e9, "bytes_per_s": size / (med / 1e9), "runs_ns": ns}


def eventfd_reference(rounds: int = 2000, runs: int = 5, cpus=None) -> dict:
    """Round trip of a token between two host threads through two eventfds."""
    c0, c1 = cpus if cpus else (-1, -1)
    ns = _ipcref("eventfd", str(rounds), str(runs), str(c0), str(c1))
    return {"rtt_seconds": statistics.median(ns) / 1e9, "runs_ns": ns}


def exit_reference(exits: int = 2000, runs: int = 3, cpu: int | None = None) -> dict:
    """`kvmpy bench exits` in long-user mode (CPL3, where the ipc guests run): the round trip
    of one port-I/O exit under the minimal C VMM and under kvmpy."""
    from ..benchmarks import exits as ex
    from ..benchmarks import pinned, write_cached

    image = ex.guest_image(exits)
    path = write_cached(f"exits-guest-{exits}.bin", image)
    binary = build_c("exitloop.c")
    c, k = [], []

    def measure():
        for _ in range(runs):
            c.append(ex.run_c(binary, path, "long-user", exits).ns_per_exit)
            k.append(ex.run_kvmpy(image, "long-user").ns_per_exit)

    if cpu is not None:
        with pinned(cpu):
            measure()
    else:
        measure()
    return {
        "mode": "long-user",
        "exits": exits + 1,
        "c_seconds": statistics.median(c) / 1e9,
        "kvmpy_seconds": statistics.median(k) / 1e9,
        "c_runs_ns": c,
        "kvmpy_runs_ns": k,
    }


def with_reference(opts: IpcOptions, result: dict) -> dict:
    """Add the same-run reference `kvmpy ipc` prints next to a result."""
    cpu = opts.cpus[1] if opts.cpus else None
    if opts.pingpong:
        ref = eventfd_reference(cpus=opts.cpus)
        result["eventfd_rtt_seconds"] = ref["rtt_seconds"]
        result["ratio_to_eventfd"] = result["seconds"] / ref["rtt_seconds"]
    mem = memcpy_reference(opts.size, cpu=cpu)
    result["memcpy_bytes_per_s"] = mem["bytes_per_s"]
    if not opts.pingpong:
        result["ratio_to_memcpy"] = result["throughput_bytes_per_s"] / mem["bytes_per_s"]
    else:
        result["ratio_to_memcpy"] = None
    return result
