"""`kvmpy bench net`: virtio-net and virtio-vsock from an SDK guest at CPL3 against host
references on the same TAP and Unix sockets, in the same run.

virtio-net: frames of 64 and 1500 bytes, guest -> host (the guest queues them as fast as the
transmit queue takes them; the host TAP's rx counter confirms each one arrived) and
host -> guest (a C program injects frames into the TAP through an AF_PACKET socket; the
guest counts what it receives). The references are a C program doing the VMM's part on the
same TAP: writing the same frames into it (guest -> host), reading the injected frames from
it (host -> guest).

virtio-vsock: a stream of VSOCK_BYTES in 64 KiB packets each way, between the guest and a C
program on the host Unix socket (Firecracker's convention), against the same C programs
streaming through a host Unix socket pair.

The TAP (a persistent one the benchmark creates and removes) has no address and IPv6 off:
no traffic leaves it, and the host sends nothing of its own into it.

Goals (issue 12): >= 100,000 packets per second guest -> host at 64 bytes; vsock >= 0.3 of
the Unix-socket reference.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from . import BenchmarkError, build_c, plot_path, positive_int, report

PPS_GOAL = 100_000
VSOCK_GOAL = 0.3
MAGIC = 0x484342544E59504B
NET_TX, NET_RX, VSOCK_TX, VSOCK_RX = 1, 2, 3, 4
_HEAD = struct.Struct("<QIIQQQQ")  # magic n_jobs current ready stop status go
_JOB = struct.Struct("<IIQQII QQQQ".replace(" ", ""))
VSOCK_BYTES = 128 << 20
VSOCK_PORT_TX, VSOCK_PORT_RX = 7001, 7002
GUEST_CID = 3


def jobs(count64: int, count1500: int, vsock_bytes: int) -> list[tuple]:
    """(name, kind, frame size, frames, bytes, port)"""
    return [
        ("net-tx-64", NET_TX, 64, count64, 0, 0),
        ("net-tx-1500", NET_TX, 1500, count1500, 0, 0),
        ("net-rx-64", NET_RX, 64, count64, 0, 0),
        ("net-rx-1500", NET_RX, 1500, count1500, 0, 0),
        ("vsock-tx", VSOCK_TX, 0, 0, vsock_bytes, VSOCK_PORT_TX),
        ("vsock-rx", VSOCK_RX, 0, 0, vsock_bytes, VSOCK_PORT_RX),
    ]


# --- the TAP --------------------------------------------------------------------------------


def _tun_ioctl(name: str, persist: int) -> None:
    from ..devices.virtio.tap import IFF_NO_PI, IFF_TAP, IFF_VNET_HDR, TUNSETIFF, TUNSETPERSIST

    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(),
                                               IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))  # fmt: skip
        fcntl.ioctl(fd, TUNSETPERSIST, persist)
    finally:
        os.close(fd)


@contextlib.contextmanager
def bench_tap():
    """A persistent TAP for the whole run (the references and kvmpy attach to it in turn),
    up, IPv6 off, removed at the end."""
    if os.geteuid() != 0:
        raise BenchmarkError("kvmpy bench net creates a TAP device: run it as root")
    name = f"kvnb{os.getpid() % 100000}"
    try:
        _tun_ioctl(name, 1)
    except OSError as e:
        raise BenchmarkError(f"cannot create the TAP {name}: {e.strerror}") from None
    try:
        with contextlib.suppress(OSError):
            Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").write_text("1")
        from ..devices.virtio.tap import TapBackend

        TapBackend(-1, name, False).bring_up()
        yield name
    finally:
        _tun_ioctl(name, 0)  # the last descriptor closes here: the TAP goes away


def tap_counters(name: str) -> dict:
    """The TAP's counters from /proc/net/dev (this process's network namespace)."""
    for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
        iface, _, rest = line.partition(":")
        if iface.strip() == name:
            v = [int(x) for x in rest.split()]
            return {"rx_packets": v[1], "rx_dropped": v[3], "tx_packets": v[9],
                    "tx_dropped": v[11]}  # fmt: skip
    raise BenchmarkError(f"the TAP {name} disappeared")


# --- references ---------------------------------------------------------------------------


def _ref(args: list[str], timeout: float = 300) -> list[int]:
    exe = build_c("netref.c")
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise BenchmarkError(f"netref {args[0]} failed: {proc.stderr.strip()}")
    return [int(x) for x in proc.stdout.split()[-3:] if x.lstrip("-").isdigit()]


def _started(args: list[str]) -> subprocess.Popen:
    """A netref that prints 'ready' once it listens."""
    exe = build_c("netref.c")
    p = subprocess.Popen([str(exe), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)  # fmt: skip
    assert p.stdout is not None
    if p.stdout.readline().strip() != "ready":
        p.kill()
        raise BenchmarkError(f"netref {args[0]} did not start: {p.stderr.read()}")
    return p


def _finish(p: subprocess.Popen, timeout: float = 120) -> list[int]:
    out, err = p.communicate(timeout=timeout)
    if p.returncode != 0:
        raise BenchmarkError(f"netref failed: {err.strip()}")
    return [int(x) for x in out.split()]


def reference_net(tap: str, size: int, count: int) -> dict:
    ns, written = _ref(["tx", tap, str(count), str(size)])
    tx = {"frames": written, "seconds": ns / 1e9, "pps": round(written / (ns / 1e9))}
    reader = _started(["rx", tap, "300"])
    _ref(["inject", tap, str(count), str(size)])
    ns, frames, _ = _finish(reader)
    rx = {"frames": frames, "seconds": ns / 1e9,
          "pps": round((frames - 1) / (ns / 1e9)) if ns else 0}  # fmt: skip
    for d in (tx, rx):
        d["mb_s"] = round(d["pps"] * size / 1e6, 1)
    return {"tx": tx, "rx": rx}


def reference_vsock(nbytes: int) -> dict:
    ns, got = _ref(["pair", str(nbytes)])
    return {"bytes": got, "seconds": ns / 1e9, "mb_s": round(got / (ns / 1e9) / 1e6, 1)}


# --- kvmpy --------------------------------------------------------------------------------


def run_guest(tap: str, job_list: list[tuple], transport: str, workdir: Path) -> dict:
    from ..machine import Machine, MachineConfig
    from ..sdk.examples import find_example
    from ..vmm.virtio import DeviceSpec, attach, install_guest_handlers

    elf = find_example("virtio-netbench").build()
    uds = str(workdir / "v.sock")
    listeners = {}
    for name, kind, *_rest, port in job_list:
        if kind == VSOCK_TX:  # listening before the guest connects
            listeners[name] = _started(["uds-read", f"{uds}_{port}"])
    # An irqchip: the guest sleeps on an interrupt when it has nothing to do.
    with Machine(MachineConfig(mode="long-user", memory="64M", irqchip=True),
                 capture_output=True) as m:  # fmt: skip
        specs = [DeviceSpec.parse_net(f"tap={tap},mac=52:54:00:00:be:01"),
                 DeviceSpec.parse_vsock(f"{GUEST_CID},uds={uds}")]  # fmt: skip
        vset = attach(m, specs, transport)
        try:
            img = m.load_file(elf)
            install_guest_handlers(m, vset)
            base = img.symbols["kvmpy_nbench"]
            blob = bytearray(_HEAD.pack(MAGIC, len(job_list), 0, 0, 0, 0, 0))
            for _name, kind, size, count, nbytes, port in job_list:
                blob += _JOB.pack(kind, size, count, nbytes, port, 0, 0, 0, 0, 0)
            m.memory.write(base, bytes(blob))
            khz = int(m.vcpus[0].fd.get_tsc_khz())
            host = _Host(m, base, tap, job_list, uds, listeners)
            t = threading.Thread(target=host.run, daemon=True)
            t.start()
            result = m.run(timeout=600)
            t.join(30)
            if host.error is not None:
                raise host.error
            head = _HEAD.unpack(m.memory.read(base, _HEAD.size))
            if head[5] != 1:
                raise BenchmarkError(f"the benchmark guest failed (status {head[5]}): "
                                     f"{result.message} {result.output.decode(errors='replace')[-300:]}")  # fmt: skip
            out: dict = {"transport": transport, "tsc_khz": khz, "jobs": {}}
            for i, (name, kind, size, count, _nbytes, _port) in enumerate(job_list):
                raw = m.memory.read(base + _HEAD.size + i * _JOB.size, _JOB.size)
                t_start, t_end, done, errors = _JOB.unpack(raw)[-4:]
                secs = (t_end - t_start) / (khz * 1e3)
                d: dict = {"errors": errors, "seconds": round(secs, 4)}
                if kind in (NET_TX, NET_RX):
                    n = done if kind == NET_TX else max(0, done - 1)
                    pps = n / secs if secs > 0 else 0.0
                    d.update(frames=done, offered=count, pps=round(pps),
                             mb_s=round(pps * size / 1e6, 1))  # fmt: skip
                else:
                    d.update(bytes=done, mb_s=round(done / secs / 1e6, 1) if secs > 0 else 0)
                d.update(host.notes.get(name, {}))
                out["jobs"][name] = d
            out["devices"] = vset.stats()
            out["exits"] = dict(result.exits)
            return out
        finally:
            vset.close()
            for p in listeners.values():
                p.kill()


class _Host:
    """The host side of each job, driven by the guest's `ready` announcements."""

    def __init__(self, m, base, tap, job_list, uds, listeners):
        self.m, self.base, self.tap, self.jobs = m, base, tap, job_list
        self.uds, self.listeners = uds, listeners
        self.error: BaseException | None = None
        self.notes: dict[str, dict] = {}

    def _u64(self, off: int) -> int:
        return self.m.memory.read_u64(self.base + off)

    def _wait_ready(self, i: int) -> None:
        deadline = time.monotonic() + 120
        while self._u64(16) < i + 1 and self._u64(32) == 0:  # ready, status
            if time.monotonic() > deadline:
                raise BenchmarkError(f"the guest never started job {i}")
            time.sleep(0.001)

    def run(self) -> None:
        try:
            for i, (name, kind, size, count, nbytes, port) in enumerate(self.jobs):
                self._wait_ready(i)
                if self._u64(32) > 1:
                    return
                before = tap_counters(self.tap)
                go = self.m.memory.write_u64
                if kind != NET_RX:
                    go(self.base + 40, i + 1)
                if kind == NET_TX:
                    self._wait_job_done(i)
                    self.notes[name] = {
                        "host_received": tap_counters(self.tap)["rx_packets"] - before["rx_packets"]
                    }
                elif kind == NET_RX:
                    inject = subprocess.Popen(
                        [str(build_c("netref.c")), "inject", self.tap, str(count), str(size)],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
                    go(self.base + 40, i + 1)
                    ns, sent = _finish(inject)
                    time.sleep(0.3)  # let the last frames through, then end the job
                    self.m.memory.write_u64(self.base + 24, 1)  # stop
                    _ref(["inject", self.tap, "4", "60"])  # wakes a guest asleep in kv_vq_idle
                    after = tap_counters(self.tap)
                    self.notes[name] = {
                        "injected": sent,
                        "inject_pps": round(sent / (ns / 1e9)),
                        "tap_dropped": after["tx_dropped"] - before["tx_dropped"],
                    }
                elif kind == VSOCK_TX:
                    ns, got = _finish(self.listeners[name])
                    self.notes[name] = {"host_received": got,
                                        "host_mb_s": round(got / (ns / 1e9) / 1e6, 1)}  # fmt: skip
                elif kind == VSOCK_RX:
                    ns, sent = _ref(["uds-write", self.uds, str(port), str(nbytes)])
                    self.notes[name] = {"host_sent": sent,
                                        "host_mb_s": round(sent / (ns / 1e9) / 1e6, 1)}  # fmt: skip
        except BaseException as e:
            self.error = e
            self.m.request_stop()

    def _wait_job_done(self, i: int) -> None:
        deadline = time.monotonic() + 300
        done = _HEAD.size + i * _JOB.size + 48  # the job's t_end
        while self._u64(done) == 0 and self._u64(32) == 0:
            if time.monotonic() > deadline:
                raise BenchmarkError(f"job {i} did not finish")
            time.sleep(0.002)


def _best(runs: list[dict], key: str) -> dict:
    out: dict = {}
    for r in runs:
        for k, v in r.items():
            if k not in out or v.get(key, 0) > out[k].get(key, 0):
                out[k] = v
    return out


def run(transports=("mmio", "pci"), runs: int = 1, count64: int = 200_000,
        count1500: int = 100_000, vsock_bytes: int = VSOCK_BYTES) -> dict:  # fmt: skip
    job_list = jobs(count64, count1500, vsock_bytes)
    ref_runs: list[dict] = []
    guest_runs: dict[str, list[dict]] = {t: [] for t in transports}
    with bench_tap() as tap, tempfile.TemporaryDirectory(prefix="kvmpy-bench-net-") as tmp:
        for _ in range(runs):  # interleaved, so slow phases of the host hit every side alike
            ref = {}
            for size, count in ((64, count64), (1500, count1500)):
                r = reference_net(tap, size, count)
                ref[f"net-tx-{size}"] = r["tx"]
                ref[f"net-rx-{size}"] = r["rx"]
            vs = reference_vsock(vsock_bytes)
            ref["vsock-tx"] = ref["vsock-rx"] = vs
            ref_runs.append(ref)
            for t in transports:
                guest_runs[t].append(run_guest(tap, job_list, t, Path(tmp)))
    doc: dict = {"runs": runs, "load_average": list(os.getloadavg()), "kvmpy": {}}
    doc["reference"] = _best(ref_runs, "pps") | {
        k: v for k, v in _best(ref_runs, "mb_s").items() if k.startswith("vsock")
    }
    for t in transports:
        best = _best([g["jobs"] for g in guest_runs[t]], "pps")
        best |= {k: v for k, v in _best([g["jobs"] for g in guest_runs[t]], "mb_s").items()
                 if k.startswith("vsock")}  # fmt: skip
        doc["kvmpy"][t] = {**guest_runs[t][-1], "jobs": best}
    ref = doc["reference"]
    doc["summary"] = {
        t: {
            "tx64_pps": doc["kvmpy"][t]["jobs"]["net-tx-64"]["pps"],
            "tx64_vs_c": round(doc["kvmpy"][t]["jobs"]["net-tx-64"]["pps"] / ref["net-tx-64"]["pps"], 3),
            "rx64_vs_c": round(doc["kvmpy"][t]["jobs"]["net-rx-64"]["pps"] / max(1, ref["net-rx-64"]["pps"]), 3),
            "vsock_tx_vs_unix": round(doc["kvmpy"][t]["jobs"]["vsock-tx"]["mb_s"] / ref["vsock-tx"]["mb_s"], 3),
            "vsock_rx_vs_unix": round(doc["kvmpy"][t]["jobs"]["vsock-rx"]["mb_s"] / ref["vsock-rx"]["mb_s"], 3),
        }
        for t in transports
    }  # fmt: skip
    doc["goals"] = {"tx64_pps": PPS_GOAL, "vsock_vs_unix": VSOCK_GOAL}
    return doc


def render(doc: dict, console) -> None:
    from rich.table import Table

    t = Table(title="kvmpy bench net (SDK guest at CPL3, polled; C references on the same TAP)")
    for col in ("job", "side", "pps", "MB/s", "notes"):
        t.add_column(col, justify="left" if col in ("job", "side", "notes") else "right")
    ref = doc["reference"]
    for name in ref:
        for side, d in doc["kvmpy"].items():
            j = d["jobs"][name]
            notes = ", ".join(f"{k} {v}" for k, v in j.items()
                              if k in ("host_received", "injected", "tap_dropped", "errors") and v)  # fmt: skip
            t.add_row(name, f"kvmpy {side}", f"{j['pps']:,}" if "pps" in j else "",
                      f"{j['mb_s']:,}", notes)  # fmt: skip
        r = ref[name]
        label = "C on the TAP" if name.startswith("net") else "C, Unix socket pair"
        t.add_row("", label, f"{r['pps']:,}" if "pps" in r else "", f"{r['mb_s']:,}", "")
    console.print(t)
    console.print(f"best of {doc['runs']} interleaved round(s) per side; host load average "
                  f"{doc['load_average'][0]:.1f} at the end")  # fmt: skip
    for side, s in doc["summary"].items():
        console.print(
            f"{side}: guest -> host 64 B {s['tx64_pps']:,} pps (goal >= {PPS_GOAL:,}; "
            f"{s['tx64_vs_c']:.2f}x C), vsock {s['vsock_tx_vs_unix']:.2f}x (guest -> host) and "
            f"{s['vsock_rx_vs_unix']:.2f}x (host -> guest) the Unix-socket pair (goal >= {VSOCK_GOAL})"
        )


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import save_figure

    names = [n for n in doc["reference"] if n.startswith("net")]
    fig, ax = plt.subplots(figsize=(8, 4))
    sides = [("C reference", doc["reference"])] + [
        (f"kvmpy {t}", d["jobs"]) for t, d in doc["kvmpy"].items()
    ]
    width = 0.8 / len(sides)
    for k, (label, jobs_) in enumerate(sides):
        ax.bar([i + k * width for i in range(len(names))], [jobs_[n]["pps"] for n in names],
               width, label=label)  # fmt: skip
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
    ax.set_ylabel("frames per second")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("kvmpy bench net")
    save_figure(fig, path)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "net",
        help="virtio-net and virtio-vsock from a CPL3 guest against C on the same TAP and "
        "Unix sockets",
        description="An SDK guest at CPL3 sends and receives 64- and 1500-byte frames through "
        "virtio-net on a TAP the benchmark creates, and streams through virtio-vsock, over "
        "virtio-mmio and virtio-pci; the references, in the same run, are a C program writing "
        "and reading the same TAP and a Unix socket pair. Goals: >= 100,000 pps guest -> host "
        "at 64 bytes; vsock >= 0.3x the Unix-socket pair. Needs root (it creates a TAP).",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--transport", choices=["mmio", "pci", "both"], default="both")
    p.add_argument("--runs", type=positive_int, default=1, metavar="R",
                   help="rounds of every side, interleaved; figures are each side's best")  # fmt: skip
    p.add_argument("--frames", type=positive_int, default=200_000, metavar="N",
                   help="frames per 64-byte job (half as many at 1500 bytes; default 200000)")  # fmt: skip
    p.add_argument("--vsock-mib", type=positive_int, default=VSOCK_BYTES >> 20, metavar="MIB",
                   help="bytes per vsock stream, in MiB (default 128)")  # fmt: skip
    p.add_argument("--plot", type=plot_path, metavar="FILE", help="write a plot (.png/.svg/.pdf)")
    p.set_defaults(func=cmd_net)


def cmd_net(args) -> int:
    transports = ("mmio", "pci") if args.transport == "both" else (args.transport,)
    doc = run(transports, args.runs, args.frames, max(1, args.frames // 2), args.vsock_mib << 20)
    return report(args, doc, render, plot)
