"""`kvmpy bench api`: many small VMs through one `kvmpy serve --multi` daemon.

Each VM is the `ticker` SDK guest (a numbered, checksummed line per LAPIC timer tick, `hlt`
in between), 16 MiB, in its own VMM process. Through the daemon's Unix socket, with
`--concurrency` clients at once:

  1. create and configure every VM (PUT /vms/ID, machine-config, boot-source);
  2. start them all (InstanceStart), and wait until each has printed `--ticks` lines;
  3. pause them all; check that none prints anything while paused;
  4. snapshot them all (snapshot/create);
  5. stop them all (the Stop action);
  6. load every snapshot into a new VM (snapshot/load, resume_vm) and stop it after its next
     lines.

Checked at the end, for every VM: the output the daemon received is every tick line from 1 in
order with the right checksums, exactly as many bytes as the VMM says it wrote, nothing
written while paused; and each restored VM's first line is the tick after the last one
before its snapshot (state survived). Any failure is an error, not a figure.

Reported: the latency of every request (p50, p99, max) by operation, the time of each phase,
and, as a same-run reference, the same `stats` request sent straight to each VMM's control
socket next to GET /vms/ID/vm/stats through the daemon (the daemon's HTTP hop).
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import BenchmarkError, positive_int, report

KVMPY = [sys.executable, "-m", "kvmpy"]
DEFAULT_VMS = 32
DEFAULT_CONCURRENCY = 8
DEFAULT_TICKS = 5
LATENCY_SAMPLES = 20


def _pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    v = sorted(values)
    k = min(len(v) - 1, max(0, round(p / 100 * (len(v) - 1))))
    return v[k]


def _summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50_ms": round(_pct(values, 50) * 1e3, 2),
            "p99_ms": round(_pct(values, 99) * 1e3, 2),
            "max_ms": round(max(values) * 1e3, 2) if values else 0.0}  # fmt: skip


def _ticks(text: str) -> list[tuple[int, str]]:
    out = []
    for line in text.splitlines():
        p = line.split()
        if len(p) == 4 and p[0] == "tick" and p[2] == "sum":
            out.append((int(p[1]), p[3]))
    return out


def _expected(n: int) -> list[tuple[int, str]]:
    s, out = 0x6B766D7079, []
    for line in range(1, n + 1):
        s = ((s ^ line) * 0x100000001B3) & ((1 << 64) - 1)
        out.append((line, f"{s:016x}"))
    return out


def _check_from(lines: list[tuple[int, str]], first: int, what: str) -> int:
    if not lines:
        raise BenchmarkError(f"{what}: no tick lines")
    if lines[0][0] != first:
        raise BenchmarkError(f"{what}: the ticks start at {lines[0][0]}, not {first}")
    want = _expected(lines[-1][0])
    for i, (n, s) in enumerate(lines):
        if n != first + i or want[n - 1][1] != s:
            raise BenchmarkError(f"{what}: tick line {i} is {n} {s}, not {want[first + i - 1]}")
    return lines[-1][0]


def run(vms: int = DEFAULT_VMS, concurrency: int = DEFAULT_CONCURRENCY,
        ticks: int = DEFAULT_TICKS, workdir: Path | None = None,
        progress=None) -> dict[str, Any]:  # fmt: skip
    from ..client import ApiClientError, Client
    from ..persist import control
    from ..sdk.examples import find_example

    say = progress or (lambda text: None)
    image = str(find_example("ticker").build())  # type: ignore[union-attr]
    own = workdir is None
    work = Path(tempfile.mkdtemp(prefix="kvmpy-bench-api-")) if own else workdir
    assert work is not None
    sock = str(work / "api.sock")
    state = work / "state"
    err = open(work / "serve.stderr", "wb")  # noqa: SIM115 (closed below)
    daemon = subprocess.Popen([*KVMPY, "serve", "--api-sock", sock, "--multi", "--state-dir",
                               str(state)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=err, cwd=work)  # fmt: skip
    ids = [f"vm{i:02d}" for i in range(vms)]
    latencies: dict[str, list[float]] = {}
    phases: dict[str, float] = {}
    local = __import__("threading").local()
    clients: list[Client] = []

    def client() -> Client:
        c = getattr(local, "c", None)
        if c is None:
            c = local.c = Client(sock, timeout=300)
            c.latencies = []
            c._multi = True
            clients.append(c)
        return c

    def each(fn, items, name: str) -> list[Any]:
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(fn, items))
        phases[name] = round(time.perf_counter() - t0, 3)
        say(f"{name}: {len(items)} VMs in {phases[name]:.2f} s")
        return results

    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise BenchmarkError(f"kvmpy serve did not start: "
                                     f"{(work / 'serve.stderr').read_text()[-500:]}")  # fmt: skip
            time.sleep(0.05)
        load_before = os.getloadavg()
        from ..api import models as M

        def create(vm_id: str) -> None:
            c = client()
            c.create_vm(vm_id)
            vm = c.vm(vm_id)
            vm.put_machine_config(M.MachineConfiguration(vcpu_count=1, mem_size_mib=16,
                                                         irqchip=True))  # fmt: skip
            vm.put_boot_source(M.BootSource(kernel_image_path=image))

        each(create, ids, "create")
        each(lambda i: client().vm(i).start(), ids, "start")

        def wait_ticks(vm_id: str) -> None:
            vm = client().vm(vm_id)
            end = time.monotonic() + 120
            while f"tick {ticks} " not in vm.console_tail(65536).data:
                if time.monotonic() > end:
                    raise BenchmarkError(f"{vm_id} printed no tick {ticks} within 120 s")
                time.sleep(0.2)

        each(wait_ticks, ids, "running")
        each(lambda i: client().vm(i).pause(), ids, "pause")
        paused = {i: client().vm(i).stats().output_bytes for i in ids}
        time.sleep(0.5)
        moved = [i for i in ids if client().vm(i).stats().output_bytes != paused[i]]
        if moved:
            raise BenchmarkError(f"paused VMs printed: {', '.join(moved)}")
        # The reference: the same stats request, straight to each VMM's control socket.
        direct: list[float] = []
        via: list[float] = []
        for _ in range(LATENCY_SAMPLES // 4 or 1):
            for i in ids[: max(4, vms // 4)]:
                t0 = time.perf_counter()
                control.request(str(state / i / "control.sock"), "stats")
                direct.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                client().vm(i).stats()
                via.append(time.perf_counter() - t0)
        snaps = {i: work / f"{i}.snap" for i in ids}
        each(lambda i: client().vm(i).create_snapshot(str(snaps[i])), ids, "snapshot")
        each(lambda i: client().vm(i).stop(), ids, "stop")
        last: dict[str, int] = {}
        for i in ids:
            st = client().vm(i).stats()
            tail = client().vm(i).console_tail(256 * 1024)
            if st.state != "Stopped":
                raise BenchmarkError(f"{i} is {st.state} after Stop")
            if not (st.output_bytes == st.console_bytes == tail.output_bytes == len(
                    tail.data.encode())):  # fmt: skip
                raise BenchmarkError(
                    f"{i}: output lost: the VMM wrote {st.output_bytes} bytes, the daemon got "
                    f"{st.console_bytes}")  # fmt: skip
            if st.output_bytes != paused[i]:
                raise BenchmarkError(f"{i} printed after it was paused")
            last[i] = _check_from(_ticks(tail.data), 1, i)
        restored = [f"re{i}" for i in ids]

        def load(i: str) -> None:
            c = client()
            c.create_vm(f"re{i}")
            c.vm(f"re{i}").load_snapshot(str(snaps[i]), resume=True)

        each(load, ids, "load")

        def check_restored(i: str) -> None:
            vm = client().vm(f"re{i}")
            end = time.monotonic() + 120
            while f"tick {last[i] + 2} " not in vm.console_tail(65536).data:
                if time.monotonic() > end:
                    raise BenchmarkError(f"re{i} did not go on from tick {last[i]}")
                time.sleep(0.2)
            _check_from(_ticks(vm.console_tail(65536).data), last[i] + 1, f"re{i}")

        each(check_restored, ids, "restored-running")
        each(lambda i: client().vm(i).stop(), restored, "stop-restored")
    except ApiClientError as e:
        raise BenchmarkError(f"a request failed: {e}") from None
    finally:
        for c in clients:
            for op, t in c.latencies or []:
                latencies.setdefault(op, []).append(t)
            c.close()
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(60)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        err.close()
        if own:
            shutil.rmtree(work, ignore_errors=True)
    control_plane = [t for op, ts in latencies.items() if op not in HEAVY for t in ts]
    return {
        "vms": vms,
        "concurrency": concurrency,
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "phases_s": phases,
        "latency": {op: _summary(ts) for op, ts in sorted(latencies.items())},
        "control_plane": _summary(control_plane),
        "all_requests": _summary([t for ts in latencies.values() for t in ts]),
        "stats_via_daemon": _summary(via),
        "stats_direct_control": _summary(direct),
        "daemon_overhead_ratio": round(_pct(via, 50) / _pct(direct, 50), 2) if direct else None,
        "checked": {
            "vms": vms,
            "output_complete": True,
            "nothing_while_paused": True,
            "restored_continue": True,
        },  # fmt: skip
    }


#: Requests that start or end processes or write snapshots (latency is that work, not the API).
HEAVY = {"action", "create_snapshot", "load_snapshot"}


def render(doc: dict, console) -> None:
    from rich.table import Table

    console.print(
        f"{doc['vms']} VMs through one daemon, {doc['concurrency']} clients at once, "
        f"{doc['cpus']} CPUs, load average before {doc['load_average_before'][0]}"
    )
    t = Table(title="request latency (client side, Unix socket)")
    for col in ("operation", "requests", "p50", "p99", "max"):
        t.add_column(col, justify="right" if col != "operation" else "left")
    rows = [*doc["latency"].items(), ("control plane (not start/stop/snapshot/load)",
                                      doc["control_plane"]), ("all", doc["all_requests"])]  # fmt: skip
    for op, s in rows:
        t.add_row(op, str(s["n"]), f"{s['p50_ms']:.1f} ms", f"{s['p99_ms']:.1f} ms",
                  f"{s['max_ms']:.1f} ms")  # fmt: skip
    console.print(t)
    v, d = doc["stats_via_daemon"], doc["stats_direct_control"]
    console.print(f"stats through the daemon p50 {v['p50_ms']:.2f} ms, straight to the VMM's "
                  f"control socket p50 {d['p50_ms']:.2f} ms (ratio {doc['daemon_overhead_ratio']})")  # fmt: skip
    console.print("phases: " + ", ".join(f"{k} {v:.2f} s" for k, v in doc["phases_s"].items()))
    console.print(f"checked: all {doc['vms']} VMs' output complete and in order, nothing printed "
                  "while paused, every snapshot went on from the right tick")  # fmt: skip


def add_parser(sub) -> None:
    p = sub.add_parser(
        "api",
        help="many small VMs started, paused, snapshotted and stopped through one daemon",
        description="Start --vms ticker guests through one 'kvmpy serve --multi' daemon, pause, "
        "snapshot and stop them, load every snapshot into a new VM; report request latency "
        "(p50/p99) and check that no output or state was lost.",
    )
    p.add_argument("--vms", type=positive_int, default=DEFAULT_VMS, metavar="N",
                   help=f"VMs (default {DEFAULT_VMS})")  # fmt: skip
    p.add_argument("--concurrency", type=positive_int, default=DEFAULT_CONCURRENCY,
                   metavar="C", help=f"requests in flight (default {DEFAULT_CONCURRENCY})")  # fmt: skip
    p.add_argument("--ticks", type=positive_int, default=DEFAULT_TICKS, metavar="T",
                   help="lines each VM prints before the pause (default 5)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--plot", default=None, help=__import__("argparse").SUPPRESS)
    p.set_defaults(func=cmd_api)


def cmd_api(args) -> int:
    from rich.console import Console

    err = Console(stderr=True, highlight=False)
    doc = run(args.vms, args.concurrency, args.ticks, progress=lambda t: err.print(t))
    out = Console(highlight=False, width=110)
    return report(args, doc, render, lambda *_: None, out)
